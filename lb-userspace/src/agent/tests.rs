//! The agent's event and tick handling over a fake dataplane (no root, no BPF).

use std::collections::BTreeSet;
use std::io;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use lb_common::{CtTimeouts, ServiceKey, Stat};
use lb_model::store::{FaultStore, MapWrite, MemStore};
use lb_model::{Applied, Frontend, Plan, Problem, SourceEvent};
use prometheus_client::registry::Registry;

use super::*;
use crate::ct_gc::SweepReport;
use crate::devices::{Interface, Interfaces, Selected};
use lb_model::store::ExecReport;

/// Runs the shipped executor on in-memory maps, failing every master write of the frontends in
/// `fail` (as a full map would), and records the plans it is given.
#[derive(Default)]
struct FakeDataplane {
    maps: MemStore,
    plans: Vec<Plan>,
    fail: BTreeSet<Frontend>,
    devices: usize,
    /// What `interfaces` reports.
    ifs: Interfaces,
    /// The pod devices and external devices of the last `attach`.
    last_pods: BTreeSet<u32>,
    last_external: Selected,
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
    fn interfaces(&mut self) -> io::Result<Interfaces> {
        Ok(self.ifs.clone())
    }
    fn attach(&mut self, _ifs: &Interfaces, pods: &BTreeSet<u32>, external: &Selected) -> Attached {
        self.last_pods = pods.clone();
        self.last_external = external.clone();
        Attached { pods: self.devices, external: external.devices.len() }
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
        devices: DeviceSelection::None,
        xdp_mode: XdpMode::Native,
        node_name: None,
        health_check_bind: None,
        metrics_addr: None,
        healthz_addr: None,
        healthz_timeout: crate::proxyhealth::DEFAULT_TIMEOUT,
        model: lb_model::Config::default(),
        map_sizes: MapSizes::default(),
        service_cidr: None,
        ct_timeouts: CtTimeouts::DEFAULT,
        snat_ports: lb_common::DEFAULT_SNAT_PORTS,
        maglev_m: lb_common::DEFAULT_MAGLEV_M,
        ct_gc: GcConfig::default(),
        tick: Duration::from_millis(250),
        socket_lb: crate::datapath::SocketLb::Off,
        cgroup_path: None,
    }
}

fn agent() -> (Agent<FakeDataplane>, Registry) {
    agent_with(config(), Interfaces::default())
}

/// An agent configured by `cfg` over a fake dataplane whose node has the interfaces `ifs`.
fn agent_with(cfg: AgentConfig, ifs: Interfaces) -> (Agent<FakeDataplane>, Registry) {
    let (metrics, registry) = Metrics::new();
    let dp = FakeDataplane { ifs, ..FakeDataplane::default() };
    (Agent::new(cfg, metrics, dp, Applied::default()), registry)
}

/// Interfaces (ifindex, name, IPv4 addresses), the default route via `default_route`.
fn interfaces(default_route: Option<&str>, links: &[(u32, &str, &[&str])]) -> Interfaces {
    Interfaces {
        links: links
            .iter()
            .map(|(i, n, a)| {
                let addrs = a.iter().map(|s| s.parse().unwrap()).collect();
                (*i, Interface { name: n.to_string(), addrs })
            })
            .collect(),
        default_route: default_route.map(str::to_string),
    }
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// Parse manifests into events (no problems allowed).
fn manifests(yaml: &str) -> Vec<AgentEvent> {
    let parsed = lb_model::yaml_docs::parse("test.yaml", yaml);
    assert!(parsed.problems.is_empty(), "{:?}", parsed.problems);
    let services = parsed.services.into_iter().map(SourceEvent::ServiceUpsert);
    let slices = parsed.slices.into_iter().map(SourceEvent::SliceUpsert);
    services.chain(slices).map(AgentEvent::Source).collect()
}

/// A NodePort Service `web` (ClusterIP 10.96.0.10, nodePort 30080) with one endpoint.
const NODEPORT_WEB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
    spec:\n  type: NodePort\n  clusterIP: 10.96.0.10\n  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]\n---\n\
    apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
    metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}\n\
    addressType: IPv4\nports: [{port: 8080, protocol: TCP}]\n\
    endpoints:\n- addresses: [10.244.1.5]\n  conditions: {ready: true}\n  nodeName: n1\n";

/// The NodePort frontends (addresses) in the applied maps.
fn nodeport_addrs(agent: &Agent<FakeDataplane>) -> Vec<Ipv4Addr> {
    let addrs: BTreeSet<Ipv4Addr> =
        agent.applied().frontends.keys().filter(|fe| fe.port == 30080).map(|fe| fe.addr).collect();
    addrs.into_iter().collect()
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

/// kube-proxy's health semantics: a change that cannot reach the maps (a full map) stays
/// pending, so the health port turns 503 once it is older than the timeout; the retry that
/// lands it clears it.
#[test]
fn a_change_that_cannot_be_applied_makes_the_health_port_stale() {
    let (mut agent, _registry) = agent();
    // Pending: turns stale once older than the timeout (the arithmetic is proxyhealth's test).
    let stale = |agent: &Agent<FakeDataplane>| agent.proxy_health().report().pending_since.is_some();
    // Events before the first full sync are pending too.
    agent.on_events(service("a", "10.96.0.1", &["10.244.1.1"]));
    assert!(stale(&agent), "the initial listing never completed");
    agent.on_event(synced());
    assert!(!stale(&agent) && agent.proxy_health().report().synced);

    let fe = Frontend {
        addr: "10.96.0.2".parse().unwrap(),
        port: 80,
        proto: lb_model::Proto::Tcp,
        scope: lb_common::SCOPE_EXT,
    };
    agent.dataplane.fail.insert(fe);
    agent.on_events(service("b", "10.96.0.2", &["10.244.1.2"]));
    agent.on_tick();
    assert!(stale(&agent), "a frontend that keeps failing is a change that never lands");
    agent.dataplane.fail.clear();
    agent.on_tick();
    assert!(!stale(&agent));
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

#[test]
fn the_default_route_device_is_external_and_its_addresses_serve_node_ports() {
    let mut cfg = config();
    cfg.devices = DeviceSelection::DefaultRoute;
    cfg.pod_devices = vec![glob::Pattern::new("veth*").unwrap(), glob::Pattern::new("eth*").unwrap()];
    let ifs = interfaces(Some("eth0"), &[(1, "lo", &["127.0.0.1"]), (2, "eth0", &["172.31.0.11"]), (3, "veth1", &[])]);
    let (mut agent, registry) = agent_with(cfg, ifs);
    agent.on_tick();
    // eth0 matches a pod glob too, but an external device is never a pod device.
    assert_eq!(agent.dataplane().last_pods, BTreeSet::from([3]));
    assert_eq!(agent.dataplane().last_external.devices.keys().copied().collect::<Vec<_>>(), [2]);
    assert_metric(&registry, "xlb_external_devices 1");
    assert_eq!(agent.node().addresses, [ip("172.31.0.11")]);

    let mut first = manifests(NODEPORT_WEB);
    first.push(synced());
    agent.on_events(first);
    assert_eq!(nodeport_addrs(&agent), [ip("172.31.0.11")]);

    // An address is added to eth0: one full re-plan adds the NodePort on it.
    agent.dataplane.ifs = interfaces(Some("eth0"), &[(2, "eth0", &["172.31.0.11", "172.31.0.99"]), (3, "veth1", &[])]);
    agent.on_tick();
    assert_eq!(agent.dataplane().plans.len(), 2);
    assert_eq!(nodeport_addrs(&agent), [ip("172.31.0.11"), ip("172.31.0.99")]);
    // Nothing changed: no plan.
    agent.on_tick();
    assert_eq!(agent.dataplane().plans.len(), 2);
    // The first address goes: its NodePort frontend goes with it.
    agent.dataplane.ifs = interfaces(Some("eth0"), &[(2, "eth0", &["172.31.0.99"])]);
    agent.on_tick();
    assert_eq!(nodeport_addrs(&agent), [ip("172.31.0.99")]);
}

#[test]
fn node_object_addresses_and_device_addresses_are_merged() {
    let mut cfg = config();
    cfg.devices = DeviceSelection::parse("eth0").unwrap();
    let (mut agent, _registry) = agent_with(cfg, interfaces(None, &[(2, "eth0", &["10.0.0.1", "192.168.7.1"])]));
    agent.on_tick();
    let node = NodeInfo { name: "n1".into(), addresses: vec![ip("10.0.0.1"), ip("203.0.113.4")] };
    let mut events = vec![AgentEvent::Source(SourceEvent::Node(node))];
    events.extend(manifests(NODEPORT_WEB));
    events.push(synced());
    agent.on_events(events);
    assert_eq!(agent.node().name, "n1");
    assert_eq!(agent.node().addresses, [ip("10.0.0.1"), ip("192.168.7.1"), ip("203.0.113.4")]);
    assert_eq!(nodeport_addrs(&agent), [ip("10.0.0.1"), ip("192.168.7.1"), ip("203.0.113.4")]);

    // The Node object loses its ExternalIP: the devices' addresses stay.
    let node = NodeInfo { name: "n1".into(), addresses: vec![ip("10.0.0.1")] };
    agent.on_event(AgentEvent::Source(SourceEvent::Node(node)));
    assert_eq!(nodeport_addrs(&agent), [ip("10.0.0.1"), ip("192.168.7.1")]);
}

#[test]
fn nodeport_addresses_limit_the_node_addresses_that_serve_node_ports() {
    let mut cfg = config();
    cfg.devices = DeviceSelection::parse("eth*").unwrap();
    cfg.model.nodeport_addresses = vec![(ip("10.0.0.0"), 8)];
    let ifs = interfaces(None, &[(2, "eth0", &["10.0.0.1"]), (3, "eth1", &["192.168.7.1"])]);
    let (mut agent, _registry) = agent_with(cfg, ifs);
    agent.on_tick();
    let mut events = manifests(NODEPORT_WEB);
    events.push(synced());
    agent.on_events(events);
    assert_eq!(agent.node().addresses, [ip("10.0.0.1"), ip("192.168.7.1")]);
    assert_eq!(nodeport_addrs(&agent), [ip("10.0.0.1")]);
}

#[test]
fn the_node_name_flag_names_the_node_of_a_source_without_one() {
    let mut cfg = config();
    cfg.node_name = Some("n1".into());
    let (agent, _registry) = agent_with(cfg, Interfaces::default());
    assert_eq!(agent.node().name, "n1");
}

/// A LoadBalancer Service `lb` with externalTrafficPolicy Local and healthCheckNodePort `hc`,
/// with endpoints (address, node).
fn local_lb(hc: u16, eps: &[(&str, &str)]) -> Vec<AgentEvent> {
    let eps: String = eps
        .iter()
        .map(|(a, n)| format!("- addresses: [\"{a}\"]\n  conditions: {{ready: true}}\n  nodeName: {n}\n"))
        .collect();
    manifests(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: lb, namespace: default}}\n\
         spec:\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: {hc}\n  \
         clusterIP: 10.96.0.20\n  ports: [{{port: 80, targetPort: 8080, nodePort: 30081}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: lb-1, namespace: default, labels: {{kubernetes.io/service-name: lb}}}}\n\
         addressType: IPv4\nports: [{{port: 8080, protocol: TCP}}]\nendpoints:\n{eps}"
    ))
}

/// GET / on 127.0.0.1:port: (status, localEndpoints).
async fn health_get(port: u16) -> io::Result<(u16, u64)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await?;
    let mut buf = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut buf)).await??;
    let status = buf.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(body).map_err(io::Error::other)?;
    Ok((status, v["localEndpoints"].as_u64().unwrap_or(u64::MAX)))
}

#[tokio::test]
async fn health_check_ports_follow_services_and_local_endpoints() {
    let mut cfg = config();
    cfg.node_name = Some("n1".into());
    cfg.health_check_bind = Some(Ipv4Addr::LOCALHOST.into());
    let (mut agent, registry) = agent_with(cfg, Interfaces::default());
    let hc = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port();

    // Nothing is served before the first full sync.
    agent.on_events(local_lb(hc, &[("10.244.1.5", "n1"), ("10.244.2.5", "n2")]));
    assert_eq!(agent.health_servers().unwrap().listening().count(), 0);
    agent.on_event(synced());
    assert_metric(&registry, "xlb_health_check_servers 1");
    assert_eq!(health_get(hc).await.unwrap(), (200, 1));

    // The local endpoint leaves: 503, without a restart of the listener.
    agent.on_events(local_lb(hc, &[("10.244.2.5", "n2")]));
    assert_eq!(health_get(hc).await.unwrap(), (503, 0));

    // The Service goes: its port closes.
    agent.on_event(AgentEvent::Source(SourceEvent::ServiceDelete { namespace: "default".into(), name: "lb".into() }));
    assert_metric(&registry, "xlb_health_check_servers 0");
    let mut closed = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, hc)).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(closed, "port {hc} still open after its Service was deleted");
}

#[tokio::test]
async fn a_health_check_port_in_use_is_counted_and_retried_on_ticks() {
    let mut cfg = config();
    cfg.node_name = Some("n1".into());
    cfg.health_check_bind = Some(Ipv4Addr::LOCALHOST.into());
    let (mut agent, registry) = agent_with(cfg, Interfaces::default());
    let squatter = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let hc = squatter.local_addr().unwrap().port();
    let mut events = local_lb(hc, &[("10.244.1.5", "n1")]);
    events.push(synced());
    agent.on_events(events);
    assert_metric(&registry, "xlb_health_check_bind_errors_total 1");
    assert!(agent.is_ready(), "a bind failure is not fatal");
    agent.on_tick();
    assert_metric(&registry, "xlb_health_check_bind_errors_total 1");
    drop(squatter);
    agent.on_tick();
    assert_metric(&registry, "xlb_health_check_servers 1");
    assert_eq!(health_get(hc).await.unwrap(), (200, 1));
}
