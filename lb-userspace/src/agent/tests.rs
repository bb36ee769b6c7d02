//! The agent's event and tick handling over a fake dataplane (no root, no BPF).

use std::collections::BTreeSet;
use std::io;
use std::time::{Duration, Instant};

use lb_common::{CtTimeouts, ServiceKey, Stat};
use lb_model::store::{FaultStore, MapWrite, MemStore};
use lb_model::{Applied, Frontend, Plan, Problem, SourceEvent};
use prometheus_client::registry::Registry;

use super::*;
use crate::ct_gc::SweepReport;
use lb_model::store::ExecReport;

/// Runs the shipped executor on in-memory maps, failing every master write of the frontends in
/// `fail` (as a full map would), and records the plans it is given.
#[derive(Default)]
struct FakeDataplane {
    maps: MemStore,
    plans: Vec<Plan>,
    fail: BTreeSet<Frontend>,
    devices: usize,
    stats: Vec<(Stat, u64)>,
    sweep: Option<io::Result<SweepReport>>,
}

impl Dataplane for FakeDataplane {
    fn execute(&mut self, plan: &Plan, applied: &mut Applied) -> ExecReport {
        self.plans.push(plan.clone());
        let masters: BTreeSet<ServiceKey> = self.fail.iter().map(|fe| fe.key(0)).collect();
        let fail = move |w: &MapWrite| matches!(w, MapWrite::PutService(k, _) if masters.contains(k));
        lb_model::store::execute(&mut FaultStore::fail_matching(&mut self.maps, fail), plan, applied)
    }
    fn attach_devices(&mut self, _globs: &[glob::Pattern]) -> usize {
        self.devices
    }
    fn packet_stats(&self) -> Option<Vec<(Stat, u64)>> {
        Some(self.stats.clone())
    }
    fn sweep_deadline(&self) -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }
    fn sweep_step(&mut self, _applied: &Applied) -> Option<io::Result<SweepReport>> {
        self.sweep.take()
    }
}

fn config() -> AgentConfig {
    AgentConfig {
        pin_path: "/nonexistent/xlb-agent-test".into(),
        pod_devices: Vec::new(),
        metrics_addr: None,
        model: lb_model::Config::default(),
        map_sizes: MapSizes::default(),
        service_cidr: None,
        ct_timeouts: CtTimeouts::DEFAULT,
        snat_ports: lb_common::DEFAULT_SNAT_PORTS,
        ct_gc: GcConfig::default(),
        tick: Duration::from_millis(250),
    }
}

fn agent() -> (Agent<FakeDataplane>, Registry) {
    let (metrics, registry) = Metrics::new();
    (Agent::new(config(), metrics, FakeDataplane::default(), Applied::default()), registry)
}

/// The metrics text has exactly this line.
#[track_caller]
fn assert_metric(registry: &Registry, line: &str) {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
}

/// Service `name` (ClusterIP `ip`, port 80) and its slice with endpoints `eps` (port 8080).
fn service(name: &str, ip: &str, eps: &[&str]) -> Vec<AgentEvent> {
    let eps: String = eps.iter().map(|a| format!("- addresses: [\"{a}\"]\n  conditions: {{ready: true}}\n")).collect();
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  clusterIP: {ip}\n  ports: [{{port: 80, targetPort: 8080}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{port: 8080, protocol: TCP}}]\nendpoints:\n{eps}"
    );
    let parsed = lb_model::yaml_docs::parse("test.yaml", &yaml);
    assert!(parsed.problems.is_empty(), "{:?}", parsed.problems);
    let services = parsed.services.into_iter().map(SourceEvent::ServiceUpsert);
    let slices = parsed.slices.into_iter().map(SourceEvent::SliceUpsert);
    services.chain(slices).map(AgentEvent::Source).collect()
}

/// The frontends a plan writes.
fn planned(plan: &Plan) -> Vec<String> {
    plan.frontends.iter().map(|(fe, _)| fe.to_string()).collect()
}

fn synced() -> AgentEvent {
    AgentEvent::Source(SourceEvent::Synced)
}

#[test]
fn problems_and_api_errors_on_the_channel_are_counted_and_plan_nothing() {
    let (mut agent, registry) = agent();
    agent.on_events(service("a", "10.96.0.1", &["10.244.1.1"]).into_iter().chain([synced()]));
    assert_eq!(agent.dataplane().plans.len(), 1);

    let problem = Problem { object: "bad.yaml".into(), kind: "parse", reason: "not YAML".into() };
    agent.on_event(AgentEvent::Problem(problem));
    agent.on_event(AgentEvent::ApiError { kind: "EndpointSlice" });
    agent.on_event(AgentEvent::ApiError { kind: "EndpointSlice" });
    assert_metric(&registry, "xlb_invalid_objects_total{kind=\"parse\"} 1");
    assert_metric(&registry, "xlb_api_errors_total{kind=\"EndpointSlice\"} 2");
    assert_eq!(agent.dataplane().plans.len(), 1, "problems alone plan nothing");
    // Only cluster events count as source events.
    assert_metric(&registry, "xlb_source_events_total 3");
}

#[test]
fn problems_found_by_the_model_are_counted() {
    let (mut agent, registry) = agent();
    let mut slice = lb_model::yaml_docs::parse(
        "s.yaml",
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: orphan}\naddressType: IPv4\n",
    )
    .slices;
    agent.on_event(AgentEvent::Source(SourceEvent::SliceUpsert(slice.remove(0))));
    assert_metric(&registry, "xlb_invalid_objects_total{kind=\"invalid_slice\"} 1");
}

#[test]
fn nothing_is_planned_before_the_first_full_sync_and_then_everything() {
    let (mut agent, registry) = agent();
    agent.on_events(service("a", "10.96.0.1", &["10.244.1.1"]));
    agent.on_events(service("b", "10.96.0.2", &["10.244.1.2"]));
    assert!(agent.dataplane().plans.is_empty(), "planned before Synced");
    assert!(agent.dataplane().maps.services.is_empty());
    assert!(!agent.is_ready());
    assert_metric(&registry, "xlb_syncs_total 0");

    agent.on_event(synced());
    assert!(agent.is_ready());
    assert!(agent.metrics.ready.load(std::sync::atomic::Ordering::Relaxed));
    let plans = &agent.dataplane().plans;
    assert_eq!(plans.len(), 1);
    assert_eq!(planned(&plans[0]), ["10.96.0.1:80/TCP", "10.96.0.2:80/TCP"]);
    assert_eq!(agent.applied().frontends.len(), 2);
    assert_metric(&registry, "xlb_syncs_total 1");
    assert_metric(&registry, "xlb_frontends 2");
    assert_metric(&registry, "xlb_backends 2");
}

#[test]
fn a_queued_burst_is_one_plan() {
    let (mut agent, registry) = agent();
    let mut burst = service("a", "10.96.0.1", &["10.244.1.1"]);
    burst.push(synced());
    burst.extend(service("a", "10.96.0.1", &["10.244.1.1", "10.244.1.2"]));
    burst.extend(service("b", "10.96.0.2", &["10.244.1.3"]));
    agent.on_events(burst);
    assert_eq!(agent.dataplane().plans.len(), 1);
    assert_eq!(agent.applied().backends.len(), 3);
    assert_metric(&registry, "xlb_syncs_total 1");
}

#[test]
fn after_the_first_sync_only_the_changed_service_is_planned() {
    let (mut agent, _registry) = agent();
    let mut first = service("a", "10.96.0.1", &["10.244.1.1"]);
    first.extend(service("b", "10.96.0.2", &["10.244.1.2"]));
    first.push(synced());
    agent.on_events(first);
    agent.on_events(service("b", "10.96.0.2", &["10.244.1.2", "10.244.1.3"]));
    let plans = &agent.dataplane().plans;
    assert_eq!(plans.len(), 2);
    assert_eq!(planned(&plans[1]), ["10.96.0.2:80/TCP"]);
    // An event that changes nothing writes nothing.
    agent.on_events(service("b", "10.96.0.2", &["10.244.1.2", "10.244.1.3"]));
    assert_eq!(agent.dataplane().plans.len(), 2);
}

#[test]
fn a_failed_frontend_is_retried_on_the_next_tick() {
    let (mut agent, registry) = agent();
    let fe: Frontend = Frontend {
        addr: "10.96.0.1".parse().unwrap(),
        port: 80,
        proto: lb_model::Proto::Tcp,
        scope: lb_common::SCOPE_EXT,
    };
    agent.dataplane.fail.insert(fe);
    agent.on_events(service("a", "10.96.0.1", &["10.244.1.1"]).into_iter().chain([synced()]));
    assert_metric(&registry, "xlb_map_op_errors_total{kind=\"frontend\"} 1");
    assert!(!agent.dataplane().maps.services.contains_key(&fe.key(0)));

    agent.dataplane.fail.clear();
    agent.on_tick();
    let plans = &agent.dataplane().plans;
    assert_eq!(plans.len(), 2);
    assert_eq!(planned(&plans[1]), ["10.96.0.1:80/TCP"]);
    assert!(agent.dataplane().maps.services.contains_key(&fe.key(0)));
    assert_eq!(agent.applied().frontends.len(), 1);
    // Retried once: the next tick has nothing to do.
    agent.on_tick();
    assert_eq!(agent.dataplane().plans.len(), 2);
}

#[test]
fn ticks_report_devices_and_packet_counters_by_increase() {
    let (mut agent, registry) = agent();
    agent.dataplane.devices = 3;
    agent.dataplane.stats = vec![(Stat::Established, 5)];
    agent.on_tick();
    agent.dataplane.stats = vec![(Stat::Established, 7)];
    agent.on_tick();
    assert_metric(&registry, "xlb_devices 3");
    let line = format!("xlb_datapath_packets_total{{reason=\"{}\"}} 7", Stat::Established.name());
    assert_metric(&registry, &line);
}

#[test]
fn sweep_slices_report_completed_sweeps_and_errors() {
    let (mut agent, registry) = agent();
    agent.on_sweep();
    assert_metric(&registry, "xlb_conntrack_gc_errors_total 0");
    agent.dataplane.sweep = Some(Err(io::Error::other("injected")));
    agent.on_sweep();
    assert_metric(&registry, "xlb_conntrack_gc_errors_total 1");
    agent.dataplane.sweep = Some(Ok(SweepReport { deleted: 4, ..Default::default() }));
    agent.on_sweep();
    assert_metric(&registry, "xlb_conntrack_gc_deleted_total 4");
}
