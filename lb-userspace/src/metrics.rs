//! Prometheus metrics, /healthz and /readyz over HTTP (axum).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// Every metric the agent exports. Cloning shares the underlying values.
#[derive(Clone)]
pub struct Metrics {
    pub source_events: Counter,
    pub invalid_objects: Family<KindLabel, Counter>,
    /// Failed list/watch calls to the Kubernetes API, by kind (retried with backoff).
    pub api_errors: Family<KindLabel, Counter>,
    pub syncs: Counter,
    /// From the first event of a batch to the last map write of its plan.
    pub sync_latency: Histogram,
    pub map_ops: Counter,
    pub map_op_errors: Family<KindLabel, Counter>,
    pub frontends: Gauge,
    pub backends: Gauge,
    pub devices: Gauge,
    pub datapath_packets: Family<ReasonLabel, Counter>,
    pub ready: Arc<AtomicBool>,
    /// Unix seconds of the reconcile loop's last turn (liveness).
    pub heartbeat: Arc<AtomicU64>,
}

impl Metrics {
    pub fn new() -> (Self, Registry) {
        let mut r = Registry::with_prefix("xlb");
        let m = Metrics {
            source_events: Counter::default(),
            invalid_objects: Family::default(),
            api_errors: Family::default(),
            syncs: Counter::default(),
            sync_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            map_ops: Counter::default(),
            map_op_errors: Family::default(),
            frontends: Gauge::default(),
            backends: Gauge::default(),
            devices: Gauge::default(),
            datapath_packets: Family::default(),
            ready: Arc::new(AtomicBool::new(false)),
            heartbeat: Arc::new(AtomicU64::new(now_secs())),
        };
        r.register("source_events", "Events received from the source", m.source_events.clone());
        r.register(
            "invalid_objects",
            "Objects or files skipped because they are invalid, by kind of problem",
            m.invalid_objects.clone(),
        );
        r.register("api_errors", "Failed Kubernetes list/watch calls, by kind", m.api_errors.clone());
        r.register("syncs", "Reconciliations that wrote the maps", m.syncs.clone());
        r.register(
            "sync_latency_seconds",
            "Time from a source event to its map writes being done",
            m.sync_latency.clone(),
        );
        r.register("map_ops", "BPF map writes and deletes done", m.map_ops.clone());
        r.register("map_op_errors", "BPF map operations that failed (e.g. map full)", m.map_op_errors.clone());
        r.register("frontends", "Service frontends in the maps", m.frontends.clone());
        r.register("backends", "Backends in the maps", m.backends.clone());
        r.register("devices", "Pod devices with programs attached", m.devices.clone());
        r.register(
            "datapath_packets",
            "Packets handled by the eBPF programs, by verdict or reason",
            m.datapath_packets.clone(),
        );
        (m, r)
    }

    pub fn beat(&self) {
        self.heartbeat.store(now_secs(), Ordering::Relaxed);
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

struct HttpState {
    registry: Registry,
    metrics: Metrics,
}

/// Serve /metrics, /healthz, /readyz on `addr` until the process exits.
pub async fn serve(addr: SocketAddr, metrics: Metrics, registry: Registry) -> anyhow::Result<()> {
    let state = Arc::new(HttpState { registry, metrics });
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving metrics, /healthz and /readyz");
    axum::serve(listener, app).await?;
    Ok(())
}

async fn metrics_handler(State(s): State<Arc<HttpState>>) -> impl IntoResponse {
    let mut body = String::new();
    match encode(&mut body, &s.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            body,
        ),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain")], e.to_string()),
    }
}

async fn healthz(State(s): State<Arc<HttpState>>) -> impl IntoResponse {
    let age = now_secs().saturating_sub(s.metrics.heartbeat.load(Ordering::Relaxed));
    if age <= 30 {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("reconcile loop stalled for {age}s\n"))
    }
}

async fn readyz(State(s): State<Arc<HttpState>>) -> impl IntoResponse {
    if s.metrics.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not synced yet\n")
    }
}
