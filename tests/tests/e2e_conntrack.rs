//! End to end, issue 8: connections that follow one another over time. Each test reproduces one
//! way flows that end (or whose Service changes) broke traffic with a conntrack keyed on the
//! tuple alone and never expiring, on a 2-node netns cluster with one `xlb agent` per node:
//!
//! 1. direct pod connections after a burst of Service connections from the same client ports;
//! 2. scale-down while another Service shares the removed pods;
//! 3. a ClusterIP re-used by a new Service;
//! 4. hairpin: a pod reaching itself through its ClusterIP;
//! 5. UDP to a backend port without listener: ECONNREFUSED through the Service;
//! 6. a UDP flow moving off a pod that left its Service but still serves another;
//! 7. closed flows leaving the conntrack map, with no new traffic;
//! 8. a long-lived connection that keeps its backend across steps of the above and an agent
//!    restart;
//!
//! and two more of the datapath duties: a TCP client behind a Service learns its path
//! MTU (ICMP fragmentation needed, translated back), and a UDP datagram larger than the MTU
//! reaches its backend (every IP fragment follows the first).
//!
//! Tuple re-use is provoked deterministically: the client binds its source ports explicitly from
//! a small range (`REUSED_PORTS`) and ends connections so that its own socket leaves no
//! TIME_WAIT behind for the re-used 4-tuple (RST, or the server closing first; see
//! `lb_testkit::Close`). Root only: `#[ignore = "needs root"]`, run by `cargo xtask test`; each
//! test builds its own cluster, so they run in parallel.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use lb_testkit::service_yaml::{Endpoint, SvcManifest, SvcPort};
use lb_testkit::{metric_sum, wait_until, AgentSpec, ClientError, Close, Dial, InspectCt, Pod};
use xlb_tests::e2e::{
    assert_burst, hostport, reused_port, reused_port_dials, rst_or_server_fin, tally_tcp,
    tally_udp, Env,
};

const CLIENT: &str = "client";
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 100);
/// serve-hostname's port in every backend pod (TCP, and UDP where a test serves UDP).
const TARGET: u16 = 9376;

/// The backend pods: two on the client's node, two on the other.
const WEB: [(&str, u8, Ipv4Addr); 4] = [
    ("web-1", 1, Ipv4Addr::new(10, 244, 1, 11)),
    ("web-2", 1, Ipv4Addr::new(10, 244, 1, 12)),
    ("web-3", 2, Ipv4Addr::new(10, 244, 2, 11)),
    ("web-4", 2, Ipv4Addr::new(10, 244, 2, 12)),
];

fn web(name: &str) -> (&'static str, u8, Ipv4Addr) {
    *WEB.iter()
        .find(|w| w.0 == name)
        .unwrap_or_else(|| panic!("no pod {name}"))
}

fn pod_addr(name: &str) -> SocketAddr {
    (web(name).2, TARGET).into()
}

/// A cluster with the client pod on node1 and the named WEB pods serving TCP (and UDP if `udp`)
/// on [`TARGET`]; agents not started yet.
fn env_with(pods: &[&str], udp: bool) -> Env {
    let mut env = Env::new();
    env.add_client(1, CLIENT, CLIENT_IP);
    for name in pods {
        let (name, node, ip) = web(name);
        let udp_ports: &[u16] = if udp { &[TARGET] } else { &[] };
        env.add_pod(node, name, ip, &[TARGET], udp_ports);
    }
    env
}

/// A ClusterIP Service `name` at `vip:port` (TCP or UDP) to [`TARGET`] on the named pods.
fn svc(name: &str, vip: Ipv4Addr, port: SvcPort, pods: &[&str]) -> SvcManifest {
    SvcManifest {
        name: name.into(),
        cluster_ip: vip,
        ports: vec![port],
        endpoints: pods
            .iter()
            .map(|p| {
                let (name, node, ip) = web(p);
                Endpoint::ready(ip, &format!("node{node}"), name)
            })
            .collect(),
    }
}

fn tcp_svc(name: &str, vip: Ipv4Addr, pods: &[&str]) -> SvcManifest {
    svc(name, vip, SvcPort::tcp("http", 80, TARGET), pods)
}

fn udp_svc(name: &str, vip: Ipv4Addr, pods: &[&str]) -> SvcManifest {
    svc(name, vip, SvcPort::udp("dns", 53, TARGET), pods)
}

/// The frontend of the (single-port) Service `s`, "addr:port/PROTO".
fn frontend(s: &SvcManifest) -> String {
    format!("{}:{}/{}", s.cluster_ip, s.ports[0].port, s.ports[0].proto)
}

fn vip(s: &SvcManifest) -> SocketAddr {
    (s.cluster_ip, s.ports[0].port).into()
}

/// Write `s` and wait until every node's maps give its frontend exactly its endpoints.
fn apply(env: &Env, s: &SvcManifest) {
    env.write(s);
    let want: Vec<String> = s.endpoints.iter().map(|e| hostport(e.ip, TARGET)).collect();
    env.wait_backends(
        &frontend(s),
        &want.iter().map(String::as_str).collect::<Vec<_>>(),
    );
}

/// Write the Services, start the agents (with `configure` applied to their specs) and wait
/// until every node has programmed them.
fn start_with(env: &mut Env, services: &[&SvcManifest], configure: impl Fn(&mut AgentSpec)) {
    for s in services {
        env.write(s);
    }
    env.start_agents_with(configure);
    for s in services {
        apply(env, s);
    }
}

fn start(env: &mut Env, services: &[&SvcManifest]) {
    start_with(env, services, |_| {});
}

fn pod_names(s: &SvcManifest) -> Vec<String> {
    s.endpoints.iter().map(|e| e.pod.clone()).collect()
}

/// `n` connections from the client to Service `s`, from the re-used ports, closed alternately by
/// RST and by the server: every one answered by a pod of `s`. Returns the answers per pod.
fn service_round(env: &Env, what: &str, s: &SvcManifest, n: usize) -> Vec<(String, usize)> {
    let pods = pod_names(s);
    let dials = reused_port_dials(n, |_| vip(s), rst_or_server_fin);
    let tally = assert_burst(what, env.pod(CLIENT), &dials, |_, who| {
        pods.iter().any(|p| p == who)
    });
    tally.into_iter().collect()
}

// ---- The steps; the single-failure tests run one each, the long-lived test runs them in turn.

/// Failure 1: `n` Service connections to `s` (all its pods), then `n` direct connections to
/// those pods' own addresses from the same source ports: every direct connection is answered by
/// the pod it addressed.
fn step_direct_after_burst(env: &Env, s: &SvcManifest, n: usize) {
    let pods = pod_names(s);
    // The Service connections end with a RST, except the last round of ports, which the client
    // closes with a FIN: those sockets stay in TIME_WAIT towards the ClusterIP for 60 s (no
    // more connections to `s` from these ports meanwhile), which does not block the direct
    // connections below (another 4-tuple), and leaves flows in a closing state.
    let rounds = n.div_ceil(100);
    let dials = reused_port_dials(
        n,
        |_| vip(s),
        |k| {
            if k / 100 + 1 == rounds {
                Close::Fin
            } else {
                Close::Rst
            }
        },
    );
    let tally = assert_burst("Service connections", env.pod(CLIENT), &dials, |_, who| {
        pods.iter().any(|p| p == who)
    });
    assert_eq!(
        tally.len(),
        pods.len(),
        "not spread over the pods: {tally:?}"
    );

    // Direct: the k-th from reused_port(k) to pod (k / 100) % len, so every port meets every pod
    // several times, including the one its stale Service flows were translated to.
    let target = |k: usize| pods[(k / 100) % pods.len()].clone();
    let dials = reused_port_dials(n, |k| pod_addr(&target(k)), |_| Close::Rst);
    assert_burst(
        "direct connections after the Service burst",
        env.pod(CLIENT),
        &dials,
        |k, who| who == target(k),
    );
}

/// Failure 2: Service `a` (3 pods) shares 2 pods with another Service; connections with re-used
/// ports, scale `a` to its first pod, then `n` new connections with the same ports all reach it.
fn step_scale_down(env: &Env, a: &mut SvcManifest, n: usize) {
    let before = service_round(env, "before the scale-down", a, 600);
    let keep = a.endpoints[0].pod.clone();
    assert!(
        before.iter().any(|(who, _)| *who != keep),
        "no connection went to the pods about to be removed: {before:?}"
    );
    a.endpoints.truncate(1);
    apply(env, a);
    let dials = reused_port_dials(n, |_| vip(a), rst_or_server_fin);
    assert_burst("after the scale-down", env.pod(CLIENT), &dials, |_, who| {
        who == keep
    });
}

/// Failure 3: Service `a` is deleted and its ClusterIP given to `c` on other pods: `n` new
/// connections with the ports the old flows used all reach `c`'s pods.
fn step_cluster_ip_reuse(env: &Env, a: &SvcManifest, c: &SvcManifest, n: usize) {
    assert_eq!(a.cluster_ip, c.cluster_ip);
    service_round(env, "before the ClusterIP is re-used", a, 400);
    env.delete(&a.name);
    env.wait_no_frontend(&frontend(a));
    apply(env, c);
    let pods = pod_names(c);
    let dials = reused_port_dials(n, |_| vip(c), rst_or_server_fin);
    assert_burst(
        "after the ClusterIP went to a new Service",
        env.pod(CLIENT),
        &dials,
        |_, who| pods.iter().any(|p| p == who),
    );
}

/// Whether the flows of `entry` are the ones a burst from `ports` made (forward entries carry
/// the client port as source, reply entries as destination).
fn from_ports(e: &InspectCt, ports: &std::ops::Range<u16>) -> bool {
    if e.dir == "forward" {
        e.saddr == CLIENT_IP && ports.contains(&e.sport)
    } else {
        e.daddr == CLIENT_IP && ports.contains(&e.dport)
    }
}

/// Deadline of failure 7, only there to make "never swept" fail: closed flows live 10 s and
/// the sweep interval is at most 30 s, so they are gone well before.
const GC_DEADLINE: Duration = Duration::from_secs(90);

/// Wait until no conntrack entry of any node involves the client except those `keep` accepts,
/// looking at the maps (`xlb inspect conntrack`). Panics with what is left after
/// [`GC_DEADLINE`].
fn wait_client_flows_swept(env: &Env, keep: impl Fn(&InspectCt) -> bool) {
    let left = || -> Vec<(u8, InspectCt)> {
        env.conntrack_of(CLIENT_IP)
            .into_iter()
            .filter(|(_, e)| !keep(e))
            .collect()
    };
    let ok = wait_until(GC_DEADLINE, Duration::from_millis(500), || {
        left().is_empty()
    });
    let left = left();
    assert!(
        ok,
        "{} conntrack entries of closed flows never swept ({} expired); first: {:#?}",
        left.len(),
        left.iter().filter(|(_, e)| e.expired).count(),
        &left[..left.len().min(6)]
    );
}

// ---- The tests.

#[test]
#[ignore = "needs root"]
fn direct_pod_connections_after_a_burst_of_service_connections_are_not_rewritten() {
    let mut env = env_with(&["web-1", "web-2", "web-3", "web-4"], false);
    let s = tcp_svc(
        "web",
        Ipv4Addr::new(10, 96, 1, 1),
        &["web-1", "web-2", "web-3", "web-4"],
    );
    start(&mut env, &[&s]);
    step_direct_after_burst(&env, &s, 2000);
}

#[test]
#[ignore = "needs root"]
fn scale_down_while_another_service_shares_the_removed_pods() {
    let mut env = env_with(&["web-1", "web-2", "web-3"], false);
    let mut a = tcp_svc(
        "a",
        Ipv4Addr::new(10, 96, 2, 1),
        &["web-1", "web-2", "web-3"],
    );
    // Same pods and target port: the same backends (ids) stay in use after `a` drops them.
    let b = tcp_svc("b", Ipv4Addr::new(10, 96, 2, 2), &["web-2", "web-3"]);
    start(&mut env, &[&a, &b]);
    step_scale_down(&env, &mut a, 300);
    // The other Service still reaches its pods.
    let hits = tally_tcp(env.pod(CLIENT), vip(&b), 20);
    assert!(
        hits.keys().all(|who| who == "web-2" || who == "web-3") && hits.len() == 2,
        "{hits:?}"
    );
}

#[test]
#[ignore = "needs root"]
fn cluster_ip_reused_by_a_new_service_reaches_only_its_pods() {
    let mut env = env_with(&["web-1", "web-2", "web-3"], false);
    let x = Ipv4Addr::new(10, 96, 3, 1);
    let a = tcp_svc("a", x, &["web-1", "web-2"]);
    // Another Service keeps web-1 and web-2 (so their backends) in use after `a` is deleted.
    let other = tcp_svc("other", Ipv4Addr::new(10, 96, 3, 2), &["web-1", "web-2"]);
    let c = tcp_svc("c", x, &["web-3"]);
    start(&mut env, &[&a, &other]);
    step_cluster_ip_reuse(&env, &a, &c, 300);
}

#[test]
#[ignore = "needs root"]
fn hairpin_pod_reaches_itself_through_its_cluster_ip() {
    // One pod per node, each the only backend of its own Service (TCP and UDP).
    let mut env = env_with(&["web-1", "web-3"], true);
    let services: Vec<(SvcManifest, SvcManifest)> = [("web-1", 1u8), ("web-3", 2)]
        .iter()
        .map(|(pod, i)| {
            let vip = Ipv4Addr::new(10, 96, 4, *i);
            (
                tcp_svc(&format!("{pod}-tcp"), vip, &[pod]),
                udp_svc(&format!("{pod}-udp"), vip, &[pod]),
            )
        })
        .collect();
    let all: Vec<&SvcManifest> = services.iter().flat_map(|(t, u)| [t, u]).collect();
    start(&mut env, &all);
    let hairpin = Ipv4Addr::from(lb_common::HAIRPIN_ADDR);
    for (t, u) in &services {
        let name = t.endpoints[0].pod.clone();
        let pod: &Pod = env.pod(&name);
        // TCP: 100 connections in a row, half closed by RST, half by FIN (ephemeral ports).
        let dials: Vec<Dial> = (0..100)
            .map(|k| Dial {
                src_port: None,
                dst: vip(t),
                close: if k % 2 == 0 { Close::Rst } else { Close::Fin },
            })
            .collect();
        assert_burst(
            &format!("hairpin TCP from {name}"),
            pod,
            &dials,
            |_, who| who == name,
        );
        // UDP: 50 flows of one datagram, then one flow of 20.
        let hits = tally_udp(pod, vip(u), 50);
        assert_eq!(
            hits.get(&name),
            Some(&50),
            "hairpin UDP from {name}: {hits:?}"
        );
        let conn = pod.udp_conn(None, vip(u)).expect("UDP socket");
        for i in 0..20 {
            match conn.request() {
                Ok(who) if who == name => {}
                other => panic!("hairpin UDP flow from {name}, datagram {i}: {other:?}"),
            }
        }
        // The pod saw itself as another peer: the hairpin address, never its own.
        let peers = pod.peers();
        assert!(
            peers.len() >= 150 && peers.iter().all(|p| p.ip() == hairpin),
            "{name} saw peers other than {hairpin}: {:?}",
            peers
                .iter()
                .filter(|p| p.ip() != hairpin)
                .take(5)
                .collect::<Vec<_>>()
        );
    }
}

#[test]
#[ignore = "needs root"]
fn udp_to_a_backend_port_without_listener_is_refused() {
    // web-1 (client's node) and web-3 (other node) listen on TCP only: UDP 9376 is closed and
    // their kernels answer with ICMP port unreachable, which must come back as the ClusterIP's.
    let mut env = env_with(&["web-1", "web-3"], false);
    // The kernel rate-limits ICMP errors per destination (a burst of 6, then one a second): the
    // pods' own limit would make later datagrams time out, whatever the datapath does.
    for pod in ["web-1", "web-3"] {
        env.pod(pod)
            .ns
            .sysctl("net.ipv4.icmp_ratelimit", "0")
            .expect("icmp_ratelimit");
    }
    let local = udp_svc("local", Ipv4Addr::new(10, 96, 5, 1), &["web-1"]);
    let remote = udp_svc("remote", Ipv4Addr::new(10, 96, 5, 2), &["web-3"]);
    start(&mut env, &[&local, &remote]);
    let client = env.pod(CLIENT);
    // The port unreachable comes back: ECONNREFUSED on the connected socket, not a time-out.
    let refused = |what: &str, r: Result<String, ClientError>| match r {
        Err(ClientError::Refused) => {}
        other => panic!("{what}: expected ECONNREFUSED, got {other:?}"),
    };
    for s in [&local, &remote] {
        // New flows.
        for i in 0..5 {
            refused(
                &format!("{} new socket {i}", s.name),
                client.udp_request(vip(s)),
            );
        }
        // One flow from a fixed port: every datagram gets its error.
        let conn = client
            .udp_conn(Some(reused_port(7)), vip(s))
            .expect("UDP socket");
        for i in 0..5 {
            refused(&format!("{} same socket {i}", s.name), conn.request());
        }
    }
}

#[test]
#[ignore = "needs root"]
fn udp_flow_moves_off_a_pod_that_left_its_service_but_serves_another() {
    let mut env = env_with(&["web-1", "web-3"], true);
    let mut a = udp_svc("a", Ipv4Addr::new(10, 96, 6, 1), &["web-1", "web-3"]);
    let b = udp_svc("b", Ipv4Addr::new(10, 96, 6, 2), &["web-1", "web-3"]);
    start(&mut env, &[&a, &b]);

    let conn = env
        .pod(CLIENT)
        .udp_conn(Some(reused_port(0)), vip(&a))
        .expect("UDP socket");
    let first = conn.request().expect("first datagram");
    for i in 0..10 {
        assert_eq!(
            conn.request().ok().as_deref(),
            Some(first.as_str()),
            "datagram {i}"
        );
    }
    // The pod answering the flow leaves `a` but stays in `b`.
    let rest = if first == "web-1" { "web-3" } else { "web-1" };
    a.endpoints.retain(|e| e.pod == rest);
    apply(&env, &a);
    for i in 0..20 {
        let r = conn.request();
        assert_eq!(
            r.as_ref().ok().map(String::as_str),
            Some(rest),
            "datagram {i} of the flow after {first} left the Service: {r:?}"
        );
    }
    let hits = tally_udp(env.pod(CLIENT), vip(&b), 20);
    assert_eq!(hits.len(), 2, "the other Service lost a pod: {hits:?}");
}

#[test]
#[ignore = "needs root"]
fn tcp_client_learns_the_path_mtu_through_a_cluster_ip() {
    // Pods keep MTU 1500 (so TCP announces MSS 1460), the links between the nodes get 1200: a
    // full-sized segment is too big where node1 forwards it to node2, and node1 answers with
    // ICMP fragmentation needed quoting the translated packet (client -> web-3). The client's
    // socket only takes it if it quotes the ClusterIP the socket is connected to.
    let mut env = env_with(&["web-3"], false);
    let s = tcp_svc("far", Ipv4Addr::new(10, 96, 9, 1), &["web-3"]);
    start(&mut env, &[&s]);
    for node in &env.cluster.nodes {
        node.ns
            .ip(&["link", "set", "eth0", "mtu", "1200"])
            .expect("node uplink MTU");
        env.cluster
            .fabric
            .ip(&["link", "set", &format!("n{}", node.index), "mtu", "1200"])
            .expect("fabric port MTU");
    }
    let mut conn = env.pod(CLIENT).tcp_connect(vip(&s)).expect("connect");
    assert_eq!(conn.greeting(), "web-3");
    for i in 0..5 {
        let line = format!("{i}{}", "x".repeat(4000));
        let answer = conn.request(&line);
        assert!(
            answer.as_ref().is_ok_and(|a| *a == format!("web-3 {line}")),
            "request {i} of 4 kB through a 1200-byte path: {:?}",
            answer.map(|a| a.len()),
        );
    }
}

#[test]
#[ignore = "needs root"]
fn udp_datagrams_larger_than_the_mtu_reach_the_backend() {
    // A 4 kB datagram leaves the client as 3 IP fragments; only the first carries the ports.
    let mut env = env_with(&["web-1", "web-3"], true);
    let local = udp_svc("local", Ipv4Addr::new(10, 96, 10, 1), &["web-1"]);
    let remote = udp_svc("remote", Ipv4Addr::new(10, 96, 10, 2), &["web-3"]);
    start(&mut env, &[&local, &remote]);
    let big = vec![b'x'; 4000];
    for s in [&local, &remote] {
        let pod = &s.endpoints[0].pod;
        let conn = env
            .pod(CLIENT)
            .udp_conn(Some(reused_port(3)), vip(s))
            .expect("UDP socket");
        for i in 0..10 {
            let r = conn.request_with(&big);
            assert_eq!(
                r.as_ref().ok(),
                Some(pod),
                "fragmented datagram {i} to {}: {r:?}",
                s.name
            );
        }
        for i in 0..10 {
            let conn = env.pod(CLIENT).udp_conn(None, vip(s)).expect("UDP socket");
            let r = conn.request_with(&big);
            assert_eq!(
                r.as_ref().ok(),
                Some(pod),
                "fragmented datagram of new flow {i} to {}: {r:?}",
                s.name
            );
        }
    }
}

#[test]
#[ignore = "needs root"]
fn closed_flows_leave_the_conntrack_map_without_new_traffic() {
    let all = ["web-1", "web-2", "web-3", "web-4"];
    let mut env = env_with(&all, false);
    let s = tcp_svc("web", Ipv4Addr::new(10, 96, 7, 1), &all);
    start_with(&mut env, &[&s], |spec| {
        spec.metrics_addr = Some("127.0.0.1:9477".parse().unwrap())
    });

    // 1000 flows closed by RST, 1000 by FIN (each port once: a FIN leaves the client's socket
    // in TIME_WAIT), then no traffic at all.
    let (rst_ports, fin_ports) = (42000..43000u16, 43000..44000u16);
    let dials = |ports: &std::ops::Range<u16>, close| -> Vec<Dial> {
        ports
            .clone()
            .map(|p| Dial {
                src_port: Some(p),
                dst: vip(&s),
                close,
            })
            .collect()
    };
    let ok = |_: usize, who: &str| all.contains(&who);
    assert_burst(
        "RST-closed",
        env.pod(CLIENT),
        &dials(&rst_ports, Close::Rst),
        ok,
    );
    assert_burst(
        "FIN-closed",
        env.pod(CLIENT),
        &dials(&fin_ports, Close::Fin),
        ok,
    );

    // The flows are in the map now, in the state their close left them in (when the binary
    // prints states). A flow closed long enough ago may already be gone.
    let entries = env.conntrack(1);
    let of = |ports| {
        entries
            .iter()
            .filter(move |e| from_ports(e, ports))
            .collect::<Vec<_>>()
    };
    let (rst, fin) = (of(&rst_ports), of(&fin_ports));
    assert!(
        fin.len() >= 1000,
        "the FIN-closed flows are not in node1's map: {} entries",
        fin.len()
    );
    // A FIN-closed flow may also end with a RST: when the server's ACK of the client's FIN is
    // overtaken by its own FIN (they leave from different CPUs), the client's TIME_WAIT socket
    // answers the stale ACK and the already closed server socket answers that with a RST.
    for (flows, want) in [(&rst, &["closed"][..]), (&fin, &["closing", "closed"][..])] {
        let wrong: Vec<_> = flows
            .iter()
            .filter(|e| e.state.as_deref().is_some_and(|st| !want.contains(&st)))
            .collect();
        assert!(
            wrong.is_empty(),
            "{} of {} entries not {want:?}: {:#?}",
            wrong.len(),
            flows.len(),
            &wrong[..wrong.len().min(4)]
        );
    }

    wait_client_flows_swept(&env, |_| false);
    let page = env.agents[0].metrics().expect("node1 metrics");
    let deleted = metric_sum(&page, "xlb_conntrack_gc_deleted_total");
    assert!(
        deleted.is_some_and(|n| n >= 1.0),
        "xlb_conntrack_gc_deleted_total = {deleted:?}; conntrack metrics: {:?}",
        page.lines()
            .filter(|l| l.contains("conntrack"))
            .collect::<Vec<_>>()
    );
}

/// How the long-lived connection is doing: answers so far, and the first failure if any.
#[derive(Default)]
struct TalkerState {
    answered: usize,
    failure: Option<String>,
}

/// A long-lived connection talked on from its own thread, so it carries traffic while the test
/// goes through its steps.
struct Talker {
    stop: Arc<AtomicBool>,
    state: Arc<(Mutex<TalkerState>, Condvar)>,
    handle: Option<std::thread::JoinHandle<()>>,
}

/// Deadline of [`Talker::wait_answer`], only there to make a stalled connection fail.
const TALKER_DEADLINE: Duration = Duration::from_secs(10);

impl Talker {
    /// Send "n" on `conn` (whose pod is `pod`) every 100 ms until stopped; stop at the first
    /// error or wrong answer.
    fn start(mut conn: lb_testkit::TcpConn, pod: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new((Mutex::new(TalkerState::default()), Condvar::new()));
        let (flag, shared) = (stop.clone(), state.clone());
        let handle = std::thread::spawn(move || {
            let mut n = 0usize;
            while !flag.load(Ordering::SeqCst) {
                n += 1;
                let want = format!("{pod} {n}");
                let r = conn.request(&n.to_string());
                let mut st = shared.0.lock().unwrap();
                match r {
                    Ok(got) if got == want => st.answered += 1,
                    other => st.failure = Some(format!("request {n}: {other:?}")),
                }
                shared.1.notify_all();
                if st.failure.is_some() {
                    return;
                }
                drop(st);
                // Pacing only: the connection carries a request every 100 ms.
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Talker {
            stop,
            state,
            handle: Some(handle),
        }
    }

    /// Wait until the connection answered a request it sent after this call: it still works.
    /// Panics with the failure if it broke.
    fn wait_answer(&self, after: &str) {
        let (lock, cv) = &*self.state;
        let st = lock.lock().unwrap();
        let seen = st.answered;
        let (st, _) = cv
            .wait_timeout_while(st, TALKER_DEADLINE, |st| {
                st.failure.is_none() && st.answered < seen + 2
            })
            .unwrap();
        assert!(
            st.failure.is_none() && st.answered >= seen + 2,
            "the long-lived connection broke {after}: {:?} ({} answers)",
            st.failure,
            st.answered
        );
    }

    /// Stop; panics if the connection broke on the way.
    fn finish(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .expect("running")
            .join()
            .expect("talker thread");
        let st = self.state.0.lock().unwrap();
        assert!(
            st.failure.is_none(),
            "the long-lived connection broke: {:?}",
            st.failure
        );
    }
}

impl Drop for Talker {
    fn drop(&mut self) {
        // A failing test stops the thread too (it holds the connection).
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[test]
#[ignore = "needs root"]
fn long_lived_connection_keeps_its_backend_through_all_of_it() {
    let mut env = env_with(&["web-1", "web-2", "web-3", "web-4"], false);
    let x = Ipv4Addr::new(10, 96, 8, 1);
    let mut a = tcp_svc("a", x, &["web-1", "web-2", "web-3"]);
    let b = tcp_svc("b", Ipv4Addr::new(10, 96, 8, 2), &["web-2", "web-3"]);
    start(&mut env, &[&a, &b]);

    // Opened first, from an ephemeral port (outside the re-used range); kept to the end.
    let conn = env
        .pod(CLIENT)
        .tcp_connect(vip(&a))
        .expect("long-lived connection");
    let pod = conn.greeting().to_string();
    let lport = conn.local_addr().port();
    let talker = Talker::start(conn, pod);
    talker.wait_answer("at the start");

    // On `b`: its last round leaves TIME_WAIT sockets towards b's ClusterIP, not a's.
    step_direct_after_burst(&env, &b, 400);
    talker.wait_answer("after the direct connections");
    step_scale_down(&env, &mut a, 300);
    talker.wait_answer("after the scale-down");
    let c = tcp_svc("c", x, &["web-4"]);
    step_cluster_ip_reuse(&env, &a, &c, 300);
    talker.wait_answer("after the ClusterIP was re-used");

    // Agent restart on the client's node: traffic during the gap and after.
    env.agents[0].stop().expect("stopping node1's agent");
    talker.wait_answer("with node1's agent stopped");
    let during = reused_port_dials(50, |_| vip(&c), rst_or_server_fin);
    assert_burst(
        "during the agent restart",
        env.pod(CLIENT),
        &during,
        |_, w| w == "web-4",
    );
    env.agents[0].restart().expect("restarting node1's agent");
    talker.wait_answer("after node1's agent restarted");
    // The short flows all end; the long-lived one stays, established.
    let long_lived = |e: &InspectCt| {
        (e.dir == "forward" && e.saddr == CLIENT_IP && e.sport == lport)
            || (e.dir == "reply" && e.daddr == CLIENT_IP && e.dport == lport)
    };
    wait_client_flows_swept(&env, long_lived);
    let mine: Vec<InspectCt> = env
        .conntrack(1)
        .into_iter()
        .filter(|e| long_lived(e))
        .collect();
    assert_eq!(mine.len(), 2, "the long-lived flow's entries: {mine:#?}");
    for e in &mine {
        assert!(
            !e.expired && e.state.as_deref().is_none_or(|s| s == "established"),
            "{e:?}"
        );
    }

    talker.wait_answer("once the short flows were swept");
    talker.finish();
}
