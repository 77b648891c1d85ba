//! The filter's stats on the dynamic-module ABI.
//!
//! The logic names a stat with its labels in the name
//! (`azure_openai_requests_total_caller=.=team-a;.;model=.=gpt-4o;.;`, see
//! `crate::metrics`), defined the first time it moves; Envoy's `stats_tags`
//! turn that back into labels for the Wasm build. The ABI instead defines
//! stats only while the configuration loads (`config_new`; later
//! definitions are refused as "frozen") and gives them real labels. So the
//! native layer defines, at load, one labelled stat per family below, and
//! maps each name the logic defines later to its family and label values.
//!
//! Envoy prefixes dynamic-module stats with `dynamicmodulescustom.` and
//! drops that prefix in `/stats` and `/stats/prometheus`, so the Prometheus
//! names and labels are the same as the Wasm build's
//! (`azure_openai_requests_total{caller="team-a",...}`).
//!
//! A family missing here is reported once per name as a failed
//! definition (the logic logs it); `every_family_of_the_logic_is_known`
//! keeps the list true.

use std::collections::HashMap;

/// A stat family: its name, whether it is a gauge, its label names (in the
/// order the logic writes them).
pub struct Family {
    pub name: &'static str,
    pub gauge: bool,
    pub labels: &'static [&'static str],
}

const MODEL: &[&str] = &["caller", "model", "deployment"];
const MODEL_LE: &[&str] = &["caller", "model", "deployment", "le"];
const TARGET: &[&str] = &["upstream", "deployment"];

pub const FAMILIES: &[Family] = &[
    Family {
        name: "azure_openai_requests_total",
        gauge: false,
        labels: &[
            "caller",
            "model",
            "upstream",
            "deployment",
            "operation",
            "status",
        ],
    },
    Family {
        name: "azure_openai_tokens_total",
        gauge: false,
        labels: &["caller", "model", "upstream", "deployment", "type"],
    },
    Family {
        name: "azure_openai_request_duration_ms_bucket",
        gauge: false,
        labels: MODEL_LE,
    },
    Family {
        name: "azure_openai_request_duration_ms_sum",
        gauge: false,
        labels: MODEL,
    },
    Family {
        name: "azure_openai_request_duration_ms_count",
        gauge: false,
        labels: MODEL,
    },
    Family {
        name: "azure_openai_time_to_first_byte_ms_bucket",
        gauge: false,
        labels: MODEL_LE,
    },
    Family {
        name: "azure_openai_time_to_first_byte_ms_sum",
        gauge: false,
        labels: MODEL,
    },
    Family {
        name: "azure_openai_time_to_first_byte_ms_count",
        gauge: false,
        labels: MODEL,
    },
    Family {
        name: "azure_openai_target_requests_total",
        gauge: false,
        labels: TARGET,
    },
    Family {
        name: "azure_openai_target_throttled_total",
        gauge: false,
        labels: TARGET,
    },
    Family {
        name: "azure_openai_target_failovers_total",
        gauge: false,
        labels: TARGET,
    },
    Family {
        name: "azure_openai_target_cooling",
        gauge: true,
        labels: TARGET,
    },
    Family {
        name: "azure_openai_limited_total",
        gauge: false,
        labels: &["caller", "limit", "scope"],
    },
    Family {
        name: "azure_openai_ratelimit_remaining_requests",
        gauge: true,
        labels: TARGET,
    },
    Family {
        name: "azure_openai_ratelimit_remaining_tokens",
        gauge: true,
        labels: TARGET,
    },
    Family {
        name: "azure_openai_filter.token_fetches",
        gauge: false,
        labels: &[],
    },
    Family {
        name: "azure_openai_filter.token_fetch_failures",
        gauge: false,
        labels: &[],
    },
    Family {
        name: "azure_openai_filter.requests_held_for_token",
        gauge: false,
        labels: &[],
    },
    Family {
        name: "azure_openai_filter.requests_token_unavailable",
        gauge: false,
        labels: &[],
    },
    Family {
        name: "azure_openai_filter.requests_waiting_for_token",
        gauge: true,
        labels: &[],
    },
];

/// A stat name split into its family and label values.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed<'a> {
    pub family: usize,
    pub values: Vec<&'a str>,
}

/// Splits a name the logic made (`crate::metrics::stat_name`): the family,
/// then `_label=.=value;.;` for the first label and `label=.=value;.;` for
/// the others. None if the family or its labels are not the known ones.
pub fn parse(name: &str) -> Option<Parsed<'_>> {
    if let Some(family) = FAMILIES.iter().position(|f| f.name == name) {
        return FAMILIES
            .get(family)
            .filter(|f| f.labels.is_empty())
            .map(|_| Parsed {
                family,
                values: Vec::new(),
            });
    }
    let first = name.find("=.=")?;
    let base_end = name.get(..first)?.rfind('_')?;
    let base = name.get(..base_end)?;
    let family = FAMILIES.iter().position(|f| f.name == base)?;
    let labels = FAMILIES.get(family)?.labels;
    let rest = name.get(base_end + 1..)?.strip_suffix(";.;")?;
    let mut values = Vec::with_capacity(labels.len());
    for (pair, label) in rest.split(";.;").zip(labels.iter()) {
        let (got, value) = pair.split_once("=.=")?;
        if got != *label {
            return None;
        }
        values.push(value);
    }
    (values.len() == labels.len() && rest.split(";.;").count() == labels.len())
        .then_some(Parsed { family, values })
}

/// What a name the logic defined resolves to, per worker.
#[derive(Debug, Clone)]
pub struct Stat {
    pub family: usize,
    pub values: Vec<String>,
}

/// The stats one worker has defined: the logic's ids index `stats`.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub by_name: HashMap<String, u32>,
    pub stats: Vec<Stat>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_into_family_and_values() {
        let parsed = parse(
            "azure_openai_requests_total_caller=.=team-a;.;model=.=gpt-4o;.;upstream=.=west;.;\
             deployment=.=gpt4o-prod;.;operation=.=chat;.;status=.=200;.;",
        );
        assert_eq!(
            parsed,
            Some(Parsed {
                family: 0,
                values: vec!["team-a", "gpt-4o", "west", "gpt4o-prod", "chat", "200"],
            })
        );
        let bucket = parse(
            "azure_openai_time_to_first_byte_ms_bucket_caller=.=a;.;model=.=m;.;deployment=.=d;.;le=.=+Inf;.;",
        );
        assert_eq!(bucket.map(|p| p.values), Some(vec!["a", "m", "d", "+Inf"]));
        assert!(parse("azure_openai_filter.token_fetches").is_some());
        assert_eq!(parse("azure_openai_unknown_total_caller=.=a;.;"), None);
        // Labels out of order or missing are refused, not mislabelled.
        assert_eq!(
            parse("azure_openai_limited_total_limit=.=a;.;caller=.=b;.;scope=.=c;.;"),
            None
        );
        assert_eq!(parse("azure_openai_limited_total_caller=.=b;.;"), None);
    }
}
