//! A minimal Envoy rate-limit service for the tests, on Kuadrant's Limitador
//! engine with its Redis storage.
//!
//! It answers `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`
//! the way envoyproxy/ratelimit (the reference service) does, with
//! Limitador's limits, counters and Redis scripts doing the counting:
//!
//! - Each descriptor of a request is decided on its own: its entries become
//!   Limitador's values, bound as `descriptors[0]` (so a limit reads
//!   `descriptors[0].caller`, as in limitador-server's files).
//! - The hits it adds are the descriptor's own `hits_addend` when Envoy set
//!   it (0 then means "check without adding"), else the request's
//!   `hits_addend`, else 1.
//! - A descriptor's hits are always added; the descriptor is over its limit
//!   when a counter it matches is past its maximum afterwards. The answer is
//!   OVER_LIMIT when any descriptor is. This is envoyproxy/ratelimit's rule
//!   (INCRBY, then compare), and the one a cost charged at stream end needs:
//!   that charge is never refused, it only makes the next check fail.
//!   (Limitador's own `check_rate_limited_and_update` adds nothing when over,
//!   which would drop such a charge.)
//! - Requests are decided one at a time in this process, so a single
//!   instance is exact even with many Envoys sending to it at once. Several
//!   instances over one Redis can let a few more through under races:
//!   Limitador's Redis storage reads, then increments.
//! - Storage failures answer gRPC UNAVAILABLE, as limitador-server does, so
//!   Envoy's `failure_mode_deny` decides.
//!
//! Usage: `test-rls --redis redis://127.0.0.1:PORT --limits FILE
//! [--listen 127.0.0.1:0] [--record FILE]`. It prints `listening on ADDR`
//! once it serves; with `--record` it appends every request it decided to
//! FILE as a JSON line, so that tests can see exactly what Envoy sent.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use limitador::counter::Counter;
use limitador::limit::{Context, Limit, Namespace};
use limitador::storage::redis::AsyncRedisStorage;
use limitador::storage::AsyncStorage;
use limitador::{AsyncRateLimiter, AsyncRateLimiterBuilder};
use serde_json::json;
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

struct Args {
    redis: String,
    limits: String,
    listen: SocketAddr,
    record: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut redis = None;
    let mut limits = None;
    let mut listen = "127.0.0.1:0".to_string();
    let mut record = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) => (name.to_string(), Some(value.to_string())),
            None => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or(format!("{name} needs a value"))
        };
        match name.as_str() {
            "--redis" => redis = Some(value()?),
            "--limits" => limits = Some(value()?),
            "--listen" => listen = value()?,
            "--record" => record = Some(value()?),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(Args {
        redis: redis.ok_or("--redis redis://HOST:PORT is required")?,
        limits: limits.ok_or("--limits FILE is required")?,
        listen: listen
            .parse()
            .map_err(|e| format!("--listen {listen}: {e}"))?,
        record,
    })
}

/// Limitador's limits file: a YAML list of limits, read with the crate's own
/// deserializer (namespace, max_value, seconds, name, conditions, variables).
fn read_limits(path: &str) -> Result<Vec<Limit>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    serde_norway::from_str(&text).map_err(|e| format!("{path}: {e}"))
}

struct Service {
    limiter: AsyncRateLimiter,
    /// One decision at a time (see the module comment).
    decide: Mutex<()>,
    record: Option<std::sync::Mutex<std::fs::File>>,
}

fn unavailable(err: limitador::errors::LimitadorError) -> Status {
    eprintln!("test-rls: storage error: {err}");
    Status::unavailable(format!("rate-limit storage: {err}"))
}

/// The most restrictive counter a descriptor matched, as Envoy's
/// DescriptorStatus (it makes `x-ratelimit-*` headers from it).
fn status(code: Code, counters: &[Counter]) -> DescriptorStatus {
    let tightest = counters
        .iter()
        .min_by_key(|c| c.remaining().unwrap_or(c.max_value()));
    let Some(counter) = tightest else {
        return DescriptorStatus {
            code: code.into(),
            ..Default::default()
        };
    };
    let window = counter.window().as_secs();
    // Envoy's RateLimit has a unit, not a number of seconds: the window's
    // own unit when it is one, else seconds (requests_per_unit is then the
    // maximum per window, which is what Envoy shows in x-ratelimit-limit).
    let unit = match window {
        1 => Unit::Second,
        60 => Unit::Minute,
        3600 => Unit::Hour,
        86400 => Unit::Day,
        _ => Unit::Second,
    };
    let reset = counter.expires_in().unwrap_or(counter.window());
    DescriptorStatus {
        code: code.into(),
        current_limit: Some(RateLimit {
            name: counter.limit().name().unwrap_or_default().to_string(),
            requests_per_unit: u32::try_from(counter.max_value()).unwrap_or(u32::MAX),
            unit: unit.into(),
        }),
        limit_remaining: u32::try_from(counter.remaining().unwrap_or(0)).unwrap_or(u32::MAX),
        duration_until_reset: Some(PbDuration {
            // Rounded up: a client told to wait 0 s would retry at once.
            seconds: i64::try_from(reset.as_secs() + u64::from(reset.subsec_nanos() > 0))
                .unwrap_or(i64::MAX),
            nanos: 0,
        }),
        quota: None,
    }
}

#[tonic::async_trait]
impl RateLimitService for Service {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let request = request.into_inner();
        if request.domain.is_empty() {
            return Err(Status::invalid_argument("the domain must not be empty"));
        }
        if request.descriptors.iter().any(|d| d.is_negative_hits) {
            return Err(Status::invalid_argument(
                "negative hits_addend (is_negative_hits) is not supported",
            ));
        }
        let namespace = Namespace::from(request.domain.as_str());
        let mut statuses = Vec::with_capacity(request.descriptors.len());
        let mut over = false;
        let mut recorded = Vec::with_capacity(request.descriptors.len());
        {
            let _one_at_a_time = self.decide.lock().await;
            for descriptor in &request.descriptors {
                let values: HashMap<String, String> = descriptor
                    .entries
                    .iter()
                    .map(|e| (e.key.clone(), e.value.clone()))
                    .collect();
                let hits = match &descriptor.hits_addend {
                    Some(own) => own.value,
                    None => u64::from(request.hits_addend.max(1)),
                };
                let mut ctx = Context::default();
                ctx.list_binding("descriptors".to_string(), vec![values]);
                if hits > 0 {
                    self.limiter
                        .update_counters(&namespace, &ctx, hits)
                        .await
                        .map_err(unavailable)?;
                }
                // Delta 0: over when a counter is past its maximum now.
                let result = self
                    .limiter
                    .is_rate_limited(&namespace, &ctx, 0)
                    .await
                    .map_err(unavailable)?;
                let code = if result.limited {
                    Code::OverLimit
                } else {
                    Code::Ok
                };
                over |= result.limited;
                statuses.push(status(code, &result.counters));
                recorded.push(json!({
                    "entries": descriptor.entries.iter()
                        .map(|e| [e.key.as_str(), e.value.as_str()]).collect::<Vec<_>>(),
                    "hits_addend": descriptor.hits_addend.as_ref().map(|h| h.value),
                    "hits": hits,
                    "code": code.as_str_name(),
                    "counters": result.counters.iter().map(|c| json!({
                        "limit": c.limit().name(),
                        "max": c.max_value(),
                        "remaining": c.remaining(),
                    })).collect::<Vec<_>>(),
                }));
            }
        }
        let overall = if over { Code::OverLimit } else { Code::Ok };
        if let Some(file) = &self.record {
            let line = json!({
                "domain": request.domain,
                "hits_addend": request.hits_addend,
                "descriptors": recorded,
                "overall_code": overall.as_str_name(),
            });
            if let Ok(mut file) = file.lock() {
                // A line at a time, flushed: tests read it while this runs.
                let _ = writeln!(file, "{line}").and_then(|()| file.flush());
            }
        }
        Ok(Response::new(RateLimitResponse {
            overall_code: overall.into(),
            statuses,
            ..Default::default()
        }))
    }
}

async fn run(args: Args) -> Result<(), String> {
    let limits = read_limits(&args.limits)?;
    let storage = AsyncRedisStorage::new(&args.redis)
        .await
        .map_err(|e| format!("redis {}: {e}", args.redis))?;
    let limiter =
        AsyncRateLimiterBuilder::new(AsyncStorage::with_counter_storage(Box::new(storage))).build();
    let count = limits.len();
    limiter
        .configure_with(limits)
        .await
        .map_err(|e| format!("limits: {e}"))?;
    let record = match &args.record {
        Some(path) => Some(std::sync::Mutex::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("{path}: {e}"))?,
        )),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    println!("listening on {address} ({count} limits)");
    std::io::stdout().flush().map_err(|e| e.to_string())?;

    let service = Service {
        limiter,
        decide: Mutex::new(()),
        record,
    };
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    tonic::transport::Server::builder()
        .timeout(Duration::from_secs(30))
        .add_service(RateLimitServiceServer::new(service))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            },
        )
        .await
        .map_err(|e| e.to_string())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(err) => {
            eprintln!("test-rls: {err}");
            eprintln!(
                "usage: test-rls --redis redis://127.0.0.1:PORT --limits FILE \
                 [--listen 127.0.0.1:0] [--record FILE]"
            );
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("test-rls: {err}");
            ExitCode::FAILURE
        }
    }
}
