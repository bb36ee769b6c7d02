//! Prometheus metrics, /healthz and /readyz over HTTP (axum).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use lb_common::{Stat, SvcStats};
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

/// A Service port: namespace, name, port name ("" for an unnamed port) and protocol.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct SvcLabel {
    pub namespace: String,
    pub name: String,
    pub port: String,
    pub protocol: String,
}

/// A Service port and why its new flows were refused or dropped.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SvcDropLabel {
    pub namespace: String,
    pub name: String,
    pub port: String,
    pub protocol: String,
    pub reason: &'static str,
}

/// The reasons of `xlb_service_drops_total`, with the counter of `SvcStats` each reads.
pub const SVC_DROP_REASONS: [(&str, fn(&SvcStats) -> u64); 5] = [
    ("refused_no_endpoints", |s| s.refused_no_endpoints),
    ("drop_no_local_endpoint", |s| s.dropped_no_local_endpoint),
    ("drop_source_range", |s| s.dropped_source_range),
    ("drop_no_backend", |s| s.dropped_no_backend),
    ("drop_snat_ports_exhausted", |s| s.dropped_snat_ports_exhausted),
];

/// What the last look at the per-Service counters saw of one Service port id.
#[derive(Clone, Debug)]
pub struct SvcSeen {
    pub label: SvcLabel,
    pub stats: SvcStats,
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
    /// External devices with from_net / to_net (and XDP) attached.
    pub external_devices: Gauge,
    /// healthCheckNodePort listeners serving.
    pub health_check_servers: Gauge,
    /// healthCheckNodePort listeners that could not be bound (counted once per failure streak).
    pub health_check_bind_errors: Counter,
    pub datapath_packets: Family<ReasonLabel, Counter>,
    /// Live conntrack entries by state, as of the last sweep.
    pub conntrack_entries: Family<StateLabel, Gauge>,
    /// Expired conntrack entries the sweeper deleted.
    pub conntrack_gc_deleted: Counter,
    /// Stale affinity entries the sweeper deleted.
    pub affinity_gc_deleted: Counter,
    /// Time one sweep spent working (the sum of its slices).
    pub conntrack_gc_duration: Histogram,
    /// Live conntrack entries / capacity, as of the last sweep.
    pub conntrack_fill_ratio: Gauge<f64, AtomicU64>,
    /// The sweep interval chosen after the last sweep.
    pub conntrack_gc_interval: Gauge<f64, AtomicU64>,
    /// Sweeps abandoned on a map error.
    pub conntrack_gc_errors: Counter,
    /// Per Service port (`XLB_SVCSTATS_V1`): new flows, translated packets and their bytes
    /// (client -> Service direction), refused / dropped new flows by reason.
    pub service_new_flows: Family<SvcLabel, Counter>,
    pub service_packets: Family<SvcLabel, Counter>,
    pub service_bytes: Family<SvcLabel, Counter>,
    pub service_drops: Family<SvcDropLabel, Counter>,
    /// Service ports planned without an id (every id of `--service-ports-max` in use): no
    /// name in `xlb inspect`, no per-Service counters.
    pub service_port_ids_exhausted: Counter,
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
            external_devices: Gauge::default(),
            health_check_servers: Gauge::default(),
            health_check_bind_errors: Counter::default(),
            datapath_packets: Family::default(),
            conntrack_entries: Family::default(),
            conntrack_gc_deleted: Counter::default(),
            affinity_gc_deleted: Counter::default(),
            conntrack_gc_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            conntrack_fill_ratio: Gauge::default(),
            conntrack_gc_interval: Gauge::default(),
            conntrack_gc_errors: Counter::default(),
            service_new_flows: Family::default(),
            service_packets: Family::default(),
            service_bytes: Family::default(),
            service_drops: Family::default(),
            service_port_ids_exhausted: Counter::default(),
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
            "external_devices",
            "External devices with the programs for traffic from outside the node attached",
            m.external_devices.clone(),
        );
        r.register(
            "health_check_servers",
            "healthCheckNodePort listeners serving",
            m.health_check_servers.clone(),
        );
        r.register(
            "health_check_bind_errors",
            "healthCheckNodePort listeners that could not be bound (retried on every tick)",
            m.health_check_bind_errors.clone(),
        );
        r.register(
            "datapath_packets",
            "Packets handled by the eBPF programs, by verdict or reason",
            m.datapath_packets.clone(),
        );
        r.register(
            "conntrack_entries",
            "Live conntrack entries by state, as of the last sweep",
            m.conntrack_entries.clone(),
        );
        r.register(
            "conntrack_gc_deleted",
            "Expired conntrack entries removed by the sweeper",
            m.conntrack_gc_deleted.clone(),
        );
        r.register(
            "affinity_gc_deleted",
            "Stale session-affinity entries removed by the sweeper",
            m.affinity_gc_deleted.clone(),
        );
        r.register(
            "conntrack_gc_duration_seconds",
            "Time one conntrack sweep spent working (sum of its slices)",
            m.conntrack_gc_duration.clone(),
        );
        r.register(
            "conntrack_fill_ratio",
            "Live conntrack entries divided by the map's capacity, as of the last sweep",
            m.conntrack_fill_ratio.clone(),
        );
        r.register(
            "conntrack_gc_interval_seconds",
            "Time until the next conntrack sweep, as chosen after the last one",
            m.conntrack_gc_interval.clone(),
        );
        r.register("conntrack_gc_errors", "Conntrack sweeps abandoned on a map error", m.conntrack_gc_errors.clone());
        r.register("service_new_flows", "New flows of a Service port given a backend", m.service_new_flows.clone());
        r.register(
            "service_packets",
            "Packets of a Service port translated by the datapath (client to Service direction)",
            m.service_packets.clone(),
        );
        r.register("service_bytes", "Bytes (IP datagrams) of those packets", m.service_bytes.clone());
        r.register(
            "service_drops",
            "New flows of a Service port refused (no endpoints) or dropped, by reason",
            m.service_drops.clone(),
        );
        r.register(
            "service_port_ids_exhausted",
            "Service ports planned without an id because --service-ports-max ids are in use",
            m.service_port_ids_exhausted.clone(),
        );
        (m, r)
    }

    pub fn beat(&self) {
        self.heartbeat.store(now_secs(), Ordering::Relaxed);
    }

    /// Count an object or file skipped as invalid (`kind` of [`lb_model::Problem`]).
    pub fn invalid_object(&self, kind: &str) {
        self.invalid_objects.get_or_create(&KindLabel { kind: kind.to_string() }).inc();
    }

    /// Count a failed Kubernetes list/watch call of `kind` (Service, EndpointSlice, Node).
    pub fn api_error(&self, kind: &str) {
        self.api_errors.get_or_create(&KindLabel { kind: kind.to_string() }).inc();
    }

    /// Count a failed map operation: `prepare` (a write the frontends depend on) or `frontend`.
    pub fn map_op_error(&self, kind: &str) {
        self.map_op_errors.get_or_create(&KindLabel { kind: kind.to_string() }).inc();
    }

    /// Turn the datapath's STATS counters into Prometheus counters, by their increase since
    /// `last` (which is updated).
    pub fn observe_packet_stats(&self, stats: &[(Stat, u64)], last: &mut BTreeMap<&'static str, u64>) {
        for &(stat, v) in stats {
            let prev = last.insert(stat.name(), v).unwrap_or(0);
            if v > prev {
                self.datapath_packets.get_or_create(&ReasonLabel { reason: stat.name().to_string() }).inc_by(v - prev);
            }
        }
    }

    /// Turn the per-Service counters (`stats[id]`, summed over CPUs) into Prometheus
    /// counters for the Service ports in `live` (id -> label: the ids masters name, with a
    /// name), by their increase since `seen` (updated). A counter that went down started over
    /// (its id was handed to a new Service port, or re-named): its whole value is the
    /// increase. Service ports that are gone leave the families.
    ///
    /// A Service port's series appear when one of its counters first moves (all of its series
    /// at once, so a port with traffic shows the same lines as before): most Service ports of
    /// a large cluster see no traffic on a given node, and 8 series each (label sets of four
    /// strings, hash-map slots) cost ~2 KiB per port, ~20 MiB at 10k ports.
    pub fn observe_svc_stats(
        &self,
        stats: &[SvcStats],
        live: &BTreeMap<u32, SvcLabel>,
        seen: &mut BTreeMap<u32, SvcSeen>,
    ) {
        let gone: Vec<u32> =
            seen.iter().filter(|(id, s)| live.get(id) != Some(&s.label)).map(|(id, _)| *id).collect();
        for id in gone {
            if let Some(s) = seen.remove(&id) {
                // Another id may carry the same label now (a re-created Service keeps its
                // name): only drop label sets no live id uses.
                if !live.values().any(|l| *l == s.label) {
                    self.forget_svc(&s.label);
                }
            }
        }
        for (id, label) in live {
            let Some(now) = stats.get(*id as usize) else { continue };
            // Nothing moved since the last second (most Service ports of a large cluster):
            // its series exist already, and nothing is hashed or allocated. At 10k Service
            // ports, touching every series each second took ~35 ms of the agent's loop, which
            // an endpoint change arriving then had to wait for.
            if seen.get(id).is_some_and(|s| s.label == *label && s.stats == *now) {
                continue;
            }
            // No series yet and nothing counted: nothing to show (nor to remember).
            if !seen.contains_key(id) && *now == SvcStats::default() {
                continue;
            }
            let prev = seen.get(id).map(|s| s.stats).unwrap_or_default();
            let inc = |now: u64, prev: u64| if now >= prev { now - prev } else { now };
            self.service_new_flows.get_or_create(label).inc_by(inc(now.new_flows, prev.new_flows));
            self.service_packets.get_or_create(label).inc_by(inc(now.packets, prev.packets));
            self.service_bytes.get_or_create(label).inc_by(inc(now.bytes, prev.bytes));
            for (reason, field) in SVC_DROP_REASONS {
                self.service_drops.get_or_create(&drop_label(label, reason)).inc_by(inc(field(now), field(&prev)));
            }
            seen.insert(*id, SvcSeen { label: label.clone(), stats: *now });
        }
    }

    fn forget_svc(&self, label: &SvcLabel) {
        self.service_new_flows.remove(label);
        self.service_packets.remove(label);
        self.service_bytes.remove(label);
        for (reason, _) in SVC_DROP_REASONS {
            self.service_drops.remove(&drop_label(label, reason));
        }
    }

    /// Record a completed conntrack sweep.
    pub fn observe_ct_sweep(&self, r: &crate::ct_gc::SweepReport) {
        for (state, n) in r.live.named() {
            self.conntrack_entries.get_or_create(&StateLabel { state }).set(n as i64);
        }
        self.conntrack_gc_deleted.inc_by(r.deleted);
        self.affinity_gc_deleted.inc_by(r.affinity_deleted);
        self.conntrack_gc_duration.observe(r.busy.as_secs_f64());
        self.conntrack_fill_ratio.set(r.fill_ratio);
        self.conntrack_gc_interval.set(r.next_interval.as_secs_f64());
    }
}

fn drop_label(l: &SvcLabel, reason: &'static str) -> SvcDropLabel {
    SvcDropLabel {
        namespace: l.namespace.clone(),
        name: l.name.clone(),
        port: l.port.clone(),
        protocol: l.protocol.clone(),
        reason,
    }
}

/// The Service ports of `applied` that have an id and a name: id -> labels (the protocol of
/// the first frontend naming the id).
pub fn live_service_ports(applied: &lb_model::Applied) -> BTreeMap<u32, SvcLabel> {
    let mut out = BTreeMap::new();
    for (fe, af) in &applied.frontends {
        if af.svc_port_id == 0 || af.rev_nat_id == 0 || out.contains_key(&af.svc_port_id) {
            continue;
        }
        let Some(n) = applied.svc_names.get(&af.svc_port_id) else { continue };
        out.insert(
            af.svc_port_id,
            SvcLabel {
                namespace: n.namespace.clone(),
                name: n.name.clone(),
                port: n.port_name.clone(),
                protocol: fe.proto.to_string(),
            },
        );
    }
    out
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ct_gc::{StateCounts, SweepReport};

    #[test]
    fn per_service_counters_increase_by_what_the_datapath_counted_and_leave_with_the_service() {
        let (m, r) = Metrics::new();
        let web = SvcLabel {
            namespace: "default".into(),
            name: "web".into(),
            port: "http".into(),
            protocol: "TCP".into(),
        };
        let live = BTreeMap::from([(3, web.clone())]);
        let mut seen = BTreeMap::new();
        let mut stats = vec![SvcStats::default(); 4];
        stats[3] = SvcStats { new_flows: 2, packets: 10, bytes: 1000, refused_no_endpoints: 1, ..Default::default() };
        m.observe_svc_stats(&stats, &live, &mut seen);
        stats[3].packets = 15;
        m.observe_svc_stats(&stats, &live, &mut seen);
        // A second with nothing new (skipped): the series stay as they are.
        m.observe_svc_stats(&stats, &live, &mut seen);
        let text = |r: &Registry| {
            let mut t = String::new();
            encode(&mut t, r).unwrap();
            t
        };
        let t = text(&r);
        let sel = r#"{namespace="default",name="web",port="http",protocol="TCP"}"#;
        for line in [
            format!("xlb_service_new_flows_total{sel} 2"),
            format!("xlb_service_packets_total{sel} 15"),
            format!("xlb_service_bytes_total{sel} 1000"),
            r#"xlb_service_drops_total{namespace="default",name="web",port="http",protocol="TCP",reason="refused_no_endpoints"} 1"#.to_string(),
            r#"xlb_service_drops_total{namespace="default",name="web",port="http",protocol="TCP",reason="drop_source_range"} 0"#.to_string(),
        ] {
            assert!(t.lines().any(|l| l == line), "missing {line:?} in\n{t}");
        }
        // The id starts over for another Service port: the old one leaves, the new one
        // counts from the map's value.
        let api = SvcLabel { name: "api".into(), ..web.clone() };
        stats[3] = SvcStats { packets: 4, ..Default::default() };
        m.observe_svc_stats(&stats, &BTreeMap::from([(3, api)]), &mut seen);
        let t = text(&r);
        assert!(!t.contains(r#"name="web""#), "{t}");
        assert!(t.lines().any(|l| l == r#"xlb_service_packets_total{namespace="default",name="api",port="http",protocol="TCP"} 4"#), "{t}");
        m.observe_svc_stats(&stats, &BTreeMap::new(), &mut seen);
        assert!(!text(&r).contains("xlb_service_packets_total{"), "no Service port left");
    }

    #[test]
    fn a_service_port_gets_its_series_when_a_counter_first_moves() {
        let (m, r) = Metrics::new();
        let label = |name: &str| SvcLabel {
            namespace: "default".into(),
            name: name.into(),
            port: "".into(),
            protocol: "UDP".into(),
        };
        let live = BTreeMap::from([(1, label("idle")), (2, label("busy"))]);
        let mut seen = BTreeMap::new();
        let mut stats = vec![SvcStats::default(); 3];
        m.observe_svc_stats(&stats, &live, &mut seen);
        let text = || {
            let mut t = String::new();
            encode(&mut t, &r).unwrap();
            t
        };
        let t = text();
        assert!(!t.lines().any(|l| l.starts_with("xlb_service_") && l.contains("namespace=")), "{t}");
        assert!(seen.is_empty());
        // One drop is enough for all eight series of the port, zeros included.
        stats[2].dropped_source_range = 1;
        m.observe_svc_stats(&stats, &live, &mut seen);
        let t = text();
        let busy = t.lines().filter(|l| l.starts_with("xlb_service_") && l.contains(r#"name="busy""#));
        assert_eq!(busy.count(), 8, "{t}");
        let zero = r#"xlb_service_new_flows_total{namespace="default",name="busy",port="",protocol="UDP"} 0"#;
        assert!(t.lines().any(|l| l == zero), "{t}");
        assert!(!t.contains(r#"name="idle""#), "{t}");
    }

    #[test]
    fn a_sweep_shows_up_under_the_documented_names() {
        let (m, r) = Metrics::new();
        let mut live = StateCounts::default();
        live.add(lb_common::ct_state::TCP_ESTABLISHED);
        live.add(lb_common::ct_state::TCP_ESTABLISHED);
        live.add(lb_common::ct_state::UDP_REPLIED);
        m.observe_ct_sweep(&SweepReport {
            scanned: 10,
            deleted: 7,
            live,
            affinity_deleted: 2,
            max_entries: 100,
            fill_ratio: 0.03,
            busy: Duration::from_millis(3),
            next_interval: Duration::from_millis(1500),
            ..Default::default()
        });
        let mut text = String::new();
        encode(&mut text, &r).unwrap();
        for line in [
            "xlb_conntrack_entries{state=\"established\"} 2",
            "xlb_conntrack_entries{state=\"udp_replied\"} 1",
            "xlb_conntrack_entries{state=\"closed\"} 0",
            "xlb_conntrack_gc_deleted_total 7",
            "xlb_affinity_gc_deleted_total 2",
            "xlb_conntrack_gc_duration_seconds_count 1",
            "xlb_conntrack_fill_ratio 0.03",
            "xlb_conntrack_gc_interval_seconds 1.5",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
