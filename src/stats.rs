//! The filter's own stats, under `wasmcustom.azure_openai_filter.*` in
//! Envoy's `/stats` (counters and gauges add up across workers).

use crate::host_api::{log, Host, Level, MetricKind};

#[derive(Debug, Clone, Copy)]
pub enum Metric {
    /// Token requests sent to identity endpoints.
    TokenFetches,
    /// Token requests that did not yield a token.
    TokenFetchFailures,
    /// Requests that had to wait for a token.
    RequestsHeld,
    /// Requests answered 503 because no token could be had in time.
    TokenUnavailable,
    /// Requests waiting for a token right now (gauge).
    RequestsWaiting,
}

const METRICS: [(Metric, MetricKind, &str); 5] = [
    (Metric::TokenFetches, MetricKind::Counter, "token_fetches"),
    (
        Metric::TokenFetchFailures,
        MetricKind::Counter,
        "token_fetch_failures",
    ),
    (
        Metric::RequestsHeld,
        MetricKind::Counter,
        "requests_held_for_token",
    ),
    (
        Metric::TokenUnavailable,
        MetricKind::Counter,
        "requests_token_unavailable",
    ),
    (
        Metric::RequestsWaiting,
        MetricKind::Gauge,
        "requests_waiting_for_token",
    ),
];

/// Metric ids of this VM (Envoy hands out a new id per definition, so they
/// are defined once per VM and kept).
#[derive(Debug, Default)]
pub struct Metrics {
    ids: [Option<u32>; 5],
}

impl Metrics {
    pub fn define(host: &mut dyn Host) -> Self {
        let mut metrics = Metrics::default();
        for (slot, (_, kind, name)) in metrics.ids.iter_mut().zip(METRICS) {
            let full = format!("azure_openai_filter.{name}");
            match host.define_metric(kind, &full) {
                Ok(id) => *slot = Some(id),
                Err(status) => log(
                    host,
                    Level::Error,
                    format_args!(
                        "azure-openai-filter: could not define metric {full} (status {})",
                        status.0
                    ),
                ),
            }
        }
        metrics
    }

    /// A stat that fails to move is not worth failing a request for, so
    /// this cannot fail.
    pub fn add(&self, host: &mut dyn Host, metric: Metric, delta: i64) {
        if let Some(Some(id)) = self.ids.get(metric as usize) {
            host.add_to_metric(*id, delta);
        }
    }
}
