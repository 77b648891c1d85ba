//! The usage metrics, as Envoy stats with labels: counted in the VM per
//! request (no host call), and handed to Envoy on the root's tick, one call
//! per stat that moved.
//!
//! Labels travel in the stat name (`azure_openai_requests_total_caller=.=
//! team-a;.;model=.=gpt-4o;.;...`) and Envoy's `stats_config.stats_tags`
//! turn them back into labels, one rule per label
//! (`(_?caller=\.=(.*?);\.;)`), so `/stats/prometheus` shows
//! `azure_openai_requests_total{caller="team-a",model="gpt-4o",...}`. Label
//! values come only from the configuration (names, aliases, deployments,
//! checked at load to hold no `;` or `=`, `config::check_label`) and from fixed sets (status
//! codes, operations, token types, bucket bounds), never from a request.
//!
//! Histograms are Prometheus histograms made of counters: `_bucket` with
//! an `le` label (cumulative), `_sum` and `_count`, so that they too are
//! counted in the VM and cost nothing per request.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::config::Config;
use crate::host_api::{log, Host, Level, MetricKind};
use crate::routes::Operation;
use crate::usage::Usage;

/// Bucket bounds of the latency histograms, in milliseconds.
pub const BUCKETS_MS: [u64; 12] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 120_000, 300_000,
];

/// A label the filter did not learn (an unknown key has no caller).
pub const UNKNOWN: &str = "-";

/// What one request was, for its metrics: indices into the configuration.
#[derive(Debug, Clone, Default)]
pub struct RequestRecord {
    pub caller: Option<usize>,
    /// The model alias.
    pub model: Option<usize>,
    /// The target it went to: its upstream and deployment.
    pub target: Option<usize>,
    pub operation: Option<Operation>,
    /// The status the caller got (0: none, the caller left first).
    pub status: u16,
    pub usage: Option<Usage>,
    pub duration_ms: u64,
    /// Time to the first byte of the answer, when one came.
    pub ttfb_ms: Option<u64>,
}

/// A counter's count not yet handed to Envoy, and its id once defined.
#[derive(Debug, Default, Clone, Copy)]
struct Count {
    id: Option<u32>,
    pending: i64,
}

impl Count {
    fn add(&mut self, delta: i64) {
        self.pending = self.pending.saturating_add(delta);
    }
}

/// A histogram: cumulative buckets (the last is `+Inf`), sum, count.
#[derive(Debug, Default, Clone, Copy)]
struct Histogram {
    buckets: [Count; BUCKETS_MS.len() + 1],
    sum: Count,
    count: Count,
}

impl Histogram {
    fn observe(&mut self, value: u64) {
        for (bucket, le) in self.buckets.iter_mut().zip(BUCKETS_MS) {
            if value <= le {
                bucket.add(1);
            }
        }
        if let Some(inf) = self.buckets.last_mut() {
            inf.add(1);
        }
        self.sum.add(i64::try_from(value).unwrap_or(i64::MAX));
        self.count.add(1);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct RequestKey {
    caller: Option<usize>,
    model: Option<usize>,
    target: Option<usize>,
    operation: Option<usize>,
    status: u16,
}

/// Per caller and model: tokens by type, latency.
#[derive(Debug, Default)]
struct ModelStats {
    tokens: [Count; 4],
    duration: Histogram,
    ttfb: Histogram,
}

#[derive(Debug, Default)]
struct Gauge {
    id: Option<u32>,
    pending: Option<u64>,
    /// The value last set (set again only when it changes).
    last: Option<u64>,
}

const TOKEN_TYPES: [&str; 4] = ["input", "output", "cached_input", "reasoning_output"];

/// What happened at a target of a pool, for its counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetEvent {
    /// A request (or a failover attempt) was sent to it.
    Request,
    /// It answered 429.
    Throttled,
    /// A request left it for another target.
    Failover,
}

const TARGET_COUNTERS: [(TargetEvent, &str); 3] = [
    (TargetEvent::Request, "azure_openai_target_requests_total"),
    (
        TargetEvent::Throttled,
        "azure_openai_target_throttled_total",
    ),
    (TargetEvent::Failover, "azure_openai_target_failovers_total"),
];

/// A target's counters and its cooling gauge.
#[derive(Debug, Default)]
struct TargetStats {
    counts: [Count; 3],
    cooling: Gauge,
}

/// The VM's metrics, between two flushes; keyed by configuration indices,
/// so a request costs a map lookup and a few additions. Names are written
/// only when a stat is first handed to Envoy.
#[derive(Debug, Default)]
pub struct Recorder {
    requests: BTreeMap<RequestKey, Count>,
    /// Per caller, model and target.
    models: BTreeMap<(Option<usize>, usize, Option<usize>), ModelStats>,
    /// Remaining requests and tokens, per target.
    remaining: BTreeMap<usize, [Gauge; 2]>,
    /// Per target of a pool.
    targets: BTreeMap<usize, TargetStats>,
    /// Requests refused for a caller's limits: per caller, limit
    /// (`requests`, `tokens`, `-` when the rate-limit service does not say)
    /// and scope (`local`, `global`).
    limited: BTreeMap<(Option<usize>, &'static str, &'static str), Count>,
    dirty: bool,
}

/// `name_label=.=value;.;...` for the labels given.
fn stat_name(name: &str, labels: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(name.len() + labels.len() * 24);
    out.push_str(name);
    for (i, (label, value)) in labels.iter().enumerate() {
        out.push(if i == 0 { '_' } else { ';' });
        let _ = write!(out, "{label}=.={value};.");
    }
    if !labels.is_empty() {
        out.push(';');
    }
    out
}

/// The label values of a model and target: alias, upstream, deployment.
fn model_labels(
    config: &Config,
    model: Option<usize>,
    target: Option<usize>,
) -> (&str, &str, &str) {
    let alias = model
        .and_then(|m| config.models.get(m))
        .map_or(UNKNOWN, |m| m.alias.as_str());
    match target.and_then(|t| config.target_upstream(t)) {
        Some((target, upstream)) => (alias, &upstream.name, &target.deployment),
        None => (alias, UNKNOWN, UNKNOWN),
    }
}

fn caller_label(config: &Config, caller: Option<usize>) -> &str {
    caller
        .and_then(|c| config.caller(c))
        .map_or(UNKNOWN, |c| c.name.as_str())
}

impl Recorder {
    /// Counts a request that has ended.
    pub fn record(&mut self, request: &RequestRecord) {
        let key = RequestKey {
            caller: request.caller,
            model: request.model,
            target: request.target,
            operation: request.operation.map(Operation::index),
            status: request.status,
        };
        self.requests.entry(key).or_default().add(1);
        self.dirty = true;
        let Some(model) = request.model else {
            return;
        };
        let stats = self
            .models
            .entry((request.caller, model, request.target))
            .or_default();
        if let Some(usage) = request.usage {
            let counts = [
                usage.input,
                usage.output,
                usage.cached_input,
                usage.reasoning_output,
            ];
            for (count, tokens) in stats.tokens.iter_mut().zip(counts) {
                count.add(i64::try_from(tokens).unwrap_or(i64::MAX));
            }
        }
        stats.duration.observe(request.duration_ms);
        if let Some(ttfb) = request.ttfb_ms {
            stats.ttfb.observe(ttfb);
        }
    }

    /// The latest of Azure's remaining-quota headers for a target.
    pub fn remaining(&mut self, target: usize, requests: Option<u64>, tokens: Option<u64>) {
        let gauges = self.remaining.entry(target).or_default();
        for (gauge, value) in gauges.iter_mut().zip([requests, tokens]) {
            if value.is_some() {
                gauge.pending = value;
                self.dirty = true;
            }
        }
    }

    /// Counts an event at a target.
    pub fn target(&mut self, target: usize, event: TargetEvent) {
        let stats = self.targets.entry(target).or_default();
        if let Some(i) = TARGET_COUNTERS.iter().position(|(e, _)| *e == event) {
            if let Some(count) = stats.counts.get_mut(i) {
                count.add(1);
                self.dirty = true;
            }
        }
    }

    /// Counts a request refused for a caller's limits.
    pub fn limited(&mut self, caller: Option<usize>, limit: &'static str, scope: &'static str) {
        self.limited
            .entry((caller, limit, scope))
            .or_default()
            .add(1);
        self.dirty = true;
    }

    /// Whether each target of a pool is cooling down right now (the tick).
    pub fn cooling(&mut self, cooldowns: &crate::pool::Cooldowns, now: u64, targets: usize) {
        for target in 0..targets {
            let cooling = u64::from(cooldowns.is_cooling(target, now));
            let stats = self.targets.entry(target).or_default();
            if stats.cooling.last != Some(cooling) {
                stats.cooling.pending = Some(cooling);
                stats.cooling.last = Some(cooling);
                self.dirty = true;
            }
        }
    }

    #[cfg(test)]
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Hands what moved to Envoy: a stat is defined the first time it
    /// moves (once per VM), then moved by what it gained since.
    pub fn flush(&mut self, host: &mut dyn Host, config: &Config) {
        if !std::mem::take(&mut self.dirty) {
            return;
        }
        for (key, count) in &mut self.requests {
            flush_count(host, count, || {
                let (model, upstream, deployment) = model_labels(config, key.model, key.target);
                let operation = key
                    .operation
                    .and_then(|i| Operation::ALL.get(i))
                    .map_or(UNKNOWN, |op| op.name());
                stat_name(
                    "azure_openai_requests_total",
                    &[
                        ("caller", caller_label(config, key.caller)),
                        ("model", model),
                        ("upstream", upstream),
                        ("deployment", deployment),
                        ("operation", operation),
                        ("status", &key.status.to_string()),
                    ],
                )
            });
        }
        for ((caller, model, target), stats) in &mut self.models {
            let caller = caller_label(config, *caller);
            let (alias, upstream, deployment) = model_labels(config, Some(*model), *target);
            for (count, kind) in stats.tokens.iter_mut().zip(TOKEN_TYPES) {
                flush_count(host, count, || {
                    stat_name(
                        "azure_openai_tokens_total",
                        &[
                            ("caller", caller),
                            ("model", alias),
                            ("upstream", upstream),
                            ("deployment", deployment),
                            ("type", kind),
                        ],
                    )
                });
            }
            let labels = [
                ("caller", caller),
                ("model", alias),
                ("deployment", deployment),
            ];
            for (name, histogram) in [
                ("azure_openai_request_duration_ms", &mut stats.duration),
                ("azure_openai_time_to_first_byte_ms", &mut stats.ttfb),
            ] {
                flush_histogram(host, name, &labels, histogram);
            }
        }
        for (target, stats) in &mut self.targets {
            let (_, upstream, deployment) = model_labels(config, None, Some(*target));
            let labels = [("upstream", upstream), ("deployment", deployment)];
            for (count, (_, name)) in stats.counts.iter_mut().zip(TARGET_COUNTERS) {
                flush_count(host, count, || stat_name(name, &labels));
            }
            if let Some(value) = stats.cooling.pending.take() {
                let name = stat_name("azure_openai_target_cooling", &labels);
                if let Some(id) = define(host, &mut stats.cooling.id, MetricKind::Gauge, &name) {
                    host.set_metric(id, value);
                }
            }
        }
        for ((caller, limit, scope), count) in &mut self.limited {
            flush_count(host, count, || {
                stat_name(
                    "azure_openai_limited_total",
                    &[
                        ("caller", caller_label(config, *caller)),
                        ("limit", limit),
                        ("scope", scope),
                    ],
                )
            });
        }
        for (target, gauges) in &mut self.remaining {
            let (_, upstream, deployment) = model_labels(config, None, Some(*target));
            let labels = [("upstream", upstream), ("deployment", deployment)];
            for (gauge, name) in gauges.iter_mut().zip([
                "azure_openai_ratelimit_remaining_requests",
                "azure_openai_ratelimit_remaining_tokens",
            ]) {
                let Some(value) = gauge.pending.take() else {
                    continue;
                };
                let name = stat_name(name, &labels);
                if let Some(id) = define(host, &mut gauge.id, MetricKind::Gauge, &name) {
                    host.set_metric(id, value);
                }
            }
        }
    }
}

fn flush_count(host: &mut dyn Host, count: &mut Count, name: impl FnOnce() -> String) {
    if count.pending == 0 {
        return;
    }
    let id = match count.id {
        Some(id) => Some(id),
        None => define(host, &mut count.id, MetricKind::Counter, &name()),
    };
    if let Some(id) = id {
        host.add_to_metric(id, std::mem::take(&mut count.pending));
    }
}

fn flush_histogram(
    host: &mut dyn Host,
    name: &str,
    labels: &[(&str, &str)],
    histogram: &mut Histogram,
) {
    let bounds = BUCKETS_MS
        .iter()
        .map(u64::to_string)
        .chain(std::iter::once("+Inf".to_string()));
    for (bucket, le) in histogram.buckets.iter_mut().zip(bounds) {
        flush_count(host, bucket, || {
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            stat_name(&format!("{name}_bucket"), &with_le)
        });
    }
    flush_count(host, &mut histogram.sum, || {
        stat_name(&format!("{name}_sum"), labels)
    });
    flush_count(host, &mut histogram.count, || {
        stat_name(&format!("{name}_count"), labels)
    });
}

fn define(host: &mut dyn Host, id: &mut Option<u32>, kind: MetricKind, name: &str) -> Option<u32> {
    if id.is_none() {
        match host.define_metric(kind, name) {
            Ok(defined) => *id = Some(defined),
            Err(status) => log(
                host,
                Level::Error,
                format_args!(
                    "azure-openai-filter: could not define metric {name} (status {})",
                    status.0
                ),
            ),
        }
    }
    *id
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{FakeHost, World};

    fn config() -> Config {
        let json = serde_json::json!({
            "upstreams": {"west": {"endpoint": "acme-west", "cluster": "w",
                                   "auth": {"api_key": {"value": "k"}}}},
            "models": {"gpt-4.1": {"upstream": "west", "deployment": "gpt41-prod"}},
            "callers": [{"name": "team-a", "key_sha256": "0".repeat(64), "models": ["*"]}]
        });
        Config::from_json(json.to_string().as_bytes(), &|_| None).unwrap()
    }

    fn record(status: u16, usage: Option<Usage>, ttfb: Option<u64>) -> RequestRecord {
        RequestRecord {
            caller: Some(0),
            model: Some(0),
            target: Some(0),
            operation: Some(Operation::ChatCompletions),
            status,
            usage,
            duration_ms: 700,
            ttfb_ms: ttfb,
        }
    }

    const REQUESTS_200: &str = "azure_openai_requests_total_caller=.=team-a;.;model=.=gpt-4.1;.;upstream=.=west;.;deployment=.=gpt41-prod;.;operation=.=chat/completions;.;status=.=200;.;";

    #[test]
    fn names_carry_their_labels() {
        assert_eq!(
            stat_name("x_total", &[("caller", "a.b"), ("status", "200")]),
            "x_total_caller=.=a.b;.;status=.=200;.;"
        );
        assert_eq!(stat_name("x", &[]), "x");
    }

    #[test]
    fn requests_are_counted_in_the_vm_and_flushed_once() {
        let world = World::new(0);
        let mut host = FakeHost::new(&world, 1);
        let config = config();
        let mut recorder = Recorder::default();
        let usage = Usage {
            input: 10,
            output: 4,
            cached_input: 2,
            reasoning_output: 1,
        };
        for _ in 0..3 {
            recorder.record(&record(200, Some(usage), Some(120)));
        }
        recorder.record(&RequestRecord {
            status: 401,
            duration_ms: 1,
            ..RequestRecord::default()
        });
        assert_eq!(world.stat(REQUESTS_200), 0, "nothing before the flush");
        recorder.flush(&mut host, &config);
        assert_eq!(world.stat(REQUESTS_200), 3);
        assert_eq!(world.stat("azure_openai_requests_total_caller=.=-;.;model=.=-;.;upstream=.=-;.;deployment=.=-;.;operation=.=-;.;status=.=401;.;"), 1);
        let tokens = |kind: &str| {
            world.stat(&format!("azure_openai_tokens_total_caller=.=team-a;.;model=.=gpt-4.1;.;upstream=.=west;.;deployment=.=gpt41-prod;.;type=.={kind};.;"))
        };
        assert_eq!(
            (
                tokens("input"),
                tokens("output"),
                tokens("cached_input"),
                tokens("reasoning_output")
            ),
            (30, 12, 6, 3)
        );
        // Buckets are cumulative; sum and count go with them.
        let bucket = |le: &str| {
            world.stat(&format!("azure_openai_time_to_first_byte_ms_bucket_caller=.=team-a;.;model=.=gpt-4.1;.;deployment=.=gpt41-prod;.;le=.={le};.;"))
        };
        assert_eq!((bucket("100"), bucket("250"), bucket("+Inf")), (0, 3, 3));
        assert_eq!(world.stat("azure_openai_request_duration_ms_sum_caller=.=team-a;.;model=.=gpt-4.1;.;deployment=.=gpt41-prod;.;"), 2100);
        assert_eq!(world.stat("azure_openai_request_duration_ms_count_caller=.=team-a;.;model=.=gpt-4.1;.;deployment=.=gpt41-prod;.;"), 3);
        // Later requests add to the same stats.
        recorder.record(&record(200, None, None));
        recorder.flush(&mut host, &config);
        assert_eq!(world.stat(REQUESTS_200), 4);
        assert_eq!(tokens("input"), 30);
        recorder.flush(&mut host, &config);
        assert!(!recorder.is_dirty());
        assert_eq!(world.stat(REQUESTS_200), 4);
    }

    #[test]
    fn remaining_quota_keeps_the_latest_value() {
        let world = World::new(0);
        let mut host = FakeHost::new(&world, 1);
        let mut recorder = Recorder::default();
        recorder.remaining(0, Some(10), Some(5000));
        recorder.remaining(0, Some(9), None);
        recorder.flush(&mut host, &config());
        assert_eq!(world.stat("azure_openai_ratelimit_remaining_requests_upstream=.=west;.;deployment=.=gpt41-prod;.;"), 9);
        assert_eq!(world.stat("azure_openai_ratelimit_remaining_tokens_upstream=.=west;.;deployment=.=gpt41-prod;.;"), 5000);
    }
}
