//! End to end of socket load balancing: host-network clients of node1 (sockets made by a
//! process in node1's network namespace and in a dedicated child cgroup, see
//! `lb_testkit::cgroup`) reach Services through the agents' cgroup programs, attached with
//! `--socket-lb host|all --cgroup-path <that cgroup>`, so nothing else on the machine is touched.
//!
//! Covered: a ClusterIP over TCP and UDP (connected and unconnected: the answer comes from the
//! Service address, getpeername returns it), a Service without endpoints refused at connect
//! (ECONNREFUSED, at once), sessionAffinity across new connections of a host client, NodePort
//! on the node's own address and a LoadBalancer IP of an externalTrafficPolicy Local Service
//! (host clients use every endpoint, as pods do), `--socket-lb all` translating a pod's sockets
//! at connect time while `host` leaves them to the tc path, and the cgroup links: swapped on
//! restart, removed by `--socket-lb off` and by `xlb cleanup`.
//!
//! Root only: `#[ignore = "needs root"]`, run by `cargo xtask test`. Every wait is bounded.

use std::collections::BTreeMap;
use std::io::{BufRead as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use lb_common::SCOPE_EXT;
use lb_testkit::agent::SocketLb;
use lb_testkit::service_yaml::{self, Endpoint, ExtSvcManifest, SvcManifest, SvcOptions, SvcPort};
use lb_testkit::{inspect_stats, unique_prefix, ClientError, HostClient, TestCgroup};
use lb_userspace::datapath::{query_cgroup, SockHook};
use xlb_tests::e2e::external::wait_frontend_on;
use xlb_tests::e2e::{hostport, Env};

/// Requests that must reach both backends of a 2-endpoint Service (a uniform random choice
/// misses one with probability 2^-23).
const SPREAD: usize = 24;
const WEB_PORT: u16 = 8080;
const DNS_PORT: u16 = 5353;

fn pod_ip(node: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node, host)
}

fn node_ip(k: u8) -> Ipv4Addr {
    lb_testkit::cluster::node_ip(k)
}

/// One test's world: the cluster, then the cgroup (dropped after the agents are cleaned up).
struct SockEnv {
    env: Env,
    cg: TestCgroup,
}

impl SockEnv {
    /// A 2-node cluster and an empty test cgroup; no agents yet.
    fn new() -> Self {
        let env = Env::new();
        let cg = TestCgroup::create(&unique_prefix()).expect("creating the test cgroup");
        SockEnv { env, cg }
    }

    /// Start the agents: node1 with `node1`'s socket-LB mode on the test cgroup, node2 with
    /// `node2`'s (both as real nodes: --node-name, --devices eth0, tc only).
    fn start(
        &mut self,
        node1: fn(std::path::PathBuf) -> SocketLb,
        node2: fn(std::path::PathBuf) -> SocketLb,
    ) {
        let path = self.cg.path().to_path_buf();
        self.env.start_agents_per_node(|node, spec| {
            spec.node_name = Some(node.name.clone());
            spec.devices = Some("eth0".into());
            spec.xdp_mode = Some(lb_testkit::XdpMode::Off);
            spec.socket_lb = if node.index == 1 {
                node1(path.clone())
            } else {
                node2(path.clone())
            };
        });
    }

    /// A host-network client of node1.
    fn host(&self) -> HostClient<'_> {
        HostClient::new(&self.env.cluster.node(1).ns, &self.cg)
    }

    fn ep(&self, pod: &str) -> Endpoint {
        let p = self.env.pod(pod);
        Endpoint::ready(p.ip, &format!("node{}", p.node), &p.name)
    }

    /// Programs attached to the test cgroup at each hook.
    fn attached(&self) -> BTreeMap<&'static str, Vec<u32>> {
        SockHook::ALL
            .iter()
            .map(|h| {
                let ids = query_cgroup(self.cg.path(), *h)
                    .unwrap_or_else(|e| panic!("querying {}: {e}", self.cg.path().display()));
                (h.prog(), ids)
            })
            .collect()
    }

    /// Node `k`'s counter `name`.
    fn stat(&self, k: u8, name: &str) -> u64 {
        inspect_stats(&self.env.pin(k))
            .unwrap_or_else(|e| panic!("inspect stats on node{k}: {e}"))
            .get(name)
            .copied()
            .unwrap_or(0)
    }
}

fn host(p: std::path::PathBuf) -> SocketLb {
    SocketLb::Host(p)
}
fn all(p: std::path::PathBuf) -> SocketLb {
    SocketLb::All(p)
}
fn off(_: std::path::PathBuf) -> SocketLb {
    SocketLb::Off
}

/// Two web pods (node1, node2) serving TCP WEB_PORT and UDP DNS_PORT.
fn add_web_pods(s: &mut SockEnv) {
    s.env
        .add_pod(1, "web-1", pod_ip(1, 10), &[WEB_PORT], &[DNS_PORT]);
    s.env
        .add_pod(2, "web-2", pod_ip(2, 10), &[WEB_PORT], &[DNS_PORT]);
}

/// A ClusterIP Service `name` at `ip`: TCP 80 -> WEB_PORT, UDP 53 -> DNS_PORT, on `pods`.
fn web_service(s: &SockEnv, name: &str, ip: Ipv4Addr, pods: &[&str]) -> SvcManifest {
    SvcManifest {
        name: name.into(),
        cluster_ip: ip,
        ports: vec![
            SvcPort::tcp("http", 80, WEB_PORT),
            SvcPort::udp("dns", 53, DNS_PORT),
        ],
        endpoints: pods.iter().map(|p| s.ep(p)).collect(),
    }
}

fn tally(
    n: usize,
    mut req: impl FnMut() -> Result<lb_testkit::HostAnswer, ClientError>,
    peer: SocketAddr,
) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for i in 0..n {
        let a = req().unwrap_or_else(|e| panic!("request {i} to {peer}: {e}"));
        assert_eq!(
            a.peer, peer,
            "request {i}: the answer must come from the Service address"
        );
        *t.entry(a.text).or_default() += 1;
    }
    t
}

#[test]
#[ignore = "needs root"]
fn host_client_reaches_a_cluster_ip_over_tcp_and_udp() {
    let mut s = SockEnv::new();
    add_web_pods(&mut s);
    let ip = Ipv4Addr::new(10, 96, 0, 50);
    s.env
        .write(&web_service(&s, "sock-web", ip, &["web-1", "web-2"]));
    s.start(host, host);
    let backends = [
        hostport(pod_ip(1, 10), WEB_PORT),
        hostport(pod_ip(2, 10), WEB_PORT),
    ];
    s.env
        .wait_backends(&format!("{ip}:80/TCP"), &[&backends[0], &backends[1]]);
    let dns = [
        hostport(pod_ip(1, 10), DNS_PORT),
        hostport(pod_ip(2, 10), DNS_PORT),
    ];
    s.env
        .wait_backends(&format!("{ip}:53/UDP"), &[&dns[0], &dns[1]]);

    let tcp_fe = SocketAddr::from((ip, 80));
    let udp_fe = SocketAddr::from((ip, 53));
    let h = s.host();
    let t = tally(SPREAD, || h.tcp_request(tcp_fe), tcp_fe);
    assert_eq!(t.len(), 2, "TCP from the host reaches both pods: {t:?}");
    let t = tally(SPREAD, || h.udp_request(udp_fe), udp_fe);
    assert_eq!(
        t.len(),
        2,
        "unconnected UDP from the host reaches both pods: {t:?}"
    );
    let t = tally(4, || h.udp_connected_request(udp_fe), udp_fe);
    assert!(t.keys().all(|p| p.starts_with("web-")), "{t:?}");
    // The pods see the node's own address: host clients are not SNATed.
    let peers = s.env.pod("web-2").peers();
    assert!(
        peers
            .iter()
            .any(|p| p.ip() == std::net::IpAddr::V4(node_ip(1))),
        "web-2 saw {peers:?}"
    );
    assert!(s.stat(1, "sock_translated") >= (2 * SPREAD + 4) as u64);
    assert_eq!(
        s.stat(2, "sock_translated"),
        0,
        "node2's programs skip node1's sockets (host mode)"
    );

    // A host socket outside the test cgroup is not translated: the cgroup scopes the programs.
    let outside = s
        .env
        .cluster
        .node(1)
        .ns
        .run(|| TcpStream::connect_timeout(&tcp_fe, Duration::from_millis(300)))
        .expect("entering node1");
    assert!(
        outside.is_err(),
        "a socket outside the cgroup reached the ClusterIP"
    );

    // In host mode a pod's socket in the cgroup is left to the per-packet path (conntrack).
    let client_ip = pod_ip(1, 100);
    s.env.add_client(1, "client-1", client_ip);
    let pod_client = HostClient::new(&s.env.pod("client-1").ns, &s.cg);
    let a = pod_client
        .tcp_request(tcp_fe)
        .expect("pod client through the tc path");
    assert!(a.text.starts_with("web-") && a.peer == tcp_fe);
    assert!(
        s.env.conntrack(1).iter().any(|e| e.involves(client_ip)),
        "the pod's flow went through from_pod"
    );
}

#[test]
#[ignore = "needs root"]
fn an_empty_service_is_refused_at_connect_from_the_host() {
    let mut s = SockEnv::new();
    let ip = Ipv4Addr::new(10, 96, 0, 51);
    s.env.write(&web_service(&s, "sock-empty", ip, &[]));
    s.start(host, host);
    s.env.wait_frontend(&format!("{ip}:80/TCP"));
    s.env.wait_frontend(&format!("{ip}:53/UDP"));
    let h = s.host();
    let started = Instant::now();
    match h.tcp_request(SocketAddr::from((ip, 80))) {
        Err(ClientError::Refused) => {}
        other => panic!("TCP to an empty Service: {other:?}"),
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(500),
        "refused after {took:?}: not at connect"
    );
    match h.udp_request(SocketAddr::from((ip, 53))) {
        Err(ClientError::Refused) => {}
        other => panic!("UDP to an empty Service: {other:?}"),
    }
    assert_eq!(s.stat(1, "sock_refused"), 2);
}

#[test]
#[ignore = "needs root"]
fn affinity_holds_across_new_connections_from_a_host_client() {
    let mut s = SockEnv::new();
    s.env.add_pod(1, "web-1", pod_ip(1, 11), &[WEB_PORT], &[]);
    s.env.add_pod(1, "web-2", pod_ip(1, 12), &[WEB_PORT], &[]);
    s.env.add_pod(2, "web-3", pod_ip(2, 13), &[WEB_PORT], &[]);
    let ip = Ipv4Addr::new(10, 96, 0, 52);
    let m = SvcManifest {
        name: "sock-sticky".into(),
        cluster_ip: ip,
        ports: vec![SvcPort::tcp("http", 80, WEB_PORT)],
        endpoints: ["web-1", "web-2", "web-3"]
            .iter()
            .map(|p| s.ep(p))
            .collect(),
    };
    let yaml = m
        .to_yaml()
        .replacen("spec:\n", "spec:\n  sessionAffinity: ClientIP\n", 1);
    service_yaml::write_atomic(&s.env.manifests.join("sock-sticky.yaml"), &yaml).unwrap();
    s.start(host, host);
    s.env.wait_frontend(&format!("{ip}:80/TCP"));
    let fe = SocketAddr::from((ip, 80));
    let h = s.host();
    // Every request is a new connection from a new socket (made by a new process).
    let t = tally(20, || h.tcp_request(fe), fe);
    assert_eq!(t.len(), 1, "one host client, one pod: {t:?}");
}

#[test]
#[ignore = "needs root"]
fn nodeport_and_a_local_policy_load_balancer_ip_work_from_the_host() {
    let mut s = SockEnv::new();
    add_web_pods(&mut s);
    s.env.add_pod(2, "local-2", pod_ip(2, 20), &[WEB_PORT], &[]);
    let np = ExtSvcManifest::new(
        SvcManifest {
            name: "sock-np".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 53),
            ports: vec![SvcPort::tcp("http", 80, WEB_PORT).node_port(30081)],
            endpoints: vec![s.ep("web-1"), s.ep("web-2")],
        },
        SvcOptions::node_port(),
    );
    np.write_to(&s.env.manifests).unwrap();
    // externalTrafficPolicy Local with its only endpoint on node2: outside clients of node1
    // are dropped, node1's host clients use every endpoint (kube-proxy's rule for traffic from
    // the node itself).
    let lb_ip = Ipv4Addr::new(192, 0, 2, 60);
    let local = ExtSvcManifest::new(
        SvcManifest {
            name: "sock-local".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 54),
            ports: vec![SvcPort::tcp("http", 80, WEB_PORT).node_port(30082)],
            endpoints: vec![s.ep("local-2")],
        },
        SvcOptions::load_balancer(&[lb_ip]).external_local(None),
    );
    local.write_to(&s.env.manifests).unwrap();
    s.start(host, host);
    let web = [
        hostport(pod_ip(1, 10), WEB_PORT),
        hostport(pod_ip(2, 10), WEB_PORT),
    ];
    let node_port = SocketAddr::from((node_ip(1), 30081));
    wait_frontend_on(
        &s.env,
        1,
        &format!("{node_port}/TCP"),
        SCOPE_EXT,
        &[&web[0], &web[1]],
    );
    let lb_fe = SocketAddr::from((lb_ip, 80));
    wait_frontend_on(&s.env, 1, &format!("{lb_fe}/TCP"), SCOPE_EXT, &[]);
    let local_np = SocketAddr::from((node_ip(1), 30082));
    wait_frontend_on(&s.env, 1, &format!("{local_np}/TCP"), SCOPE_EXT, &[]);

    let h = s.host();
    let t = tally(SPREAD, || h.tcp_request(node_port), node_port);
    assert_eq!(t.len(), 2, "NodePort on the node's own address: {t:?}");
    for fe in [lb_fe, local_np] {
        let t = tally(4, || h.tcp_request(fe), fe);
        assert_eq!(t.keys().collect::<Vec<_>>(), ["local-2"], "{fe}: {t:?}");
    }
}

#[test]
#[ignore = "needs root"]
fn all_mode_translates_a_pods_sockets_at_connect() {
    let mut s = SockEnv::new();
    add_web_pods(&mut s);
    let ip = Ipv4Addr::new(10, 96, 0, 55);
    s.env
        .write(&web_service(&s, "sock-all", ip, &["web-1", "web-2"]));
    let client_ip = pod_ip(1, 100);
    s.env.add_client(1, "client-1", client_ip);
    s.start(all, off);
    s.env.wait_frontend(&format!("{ip}:80/TCP"));
    s.env.wait_frontend(&format!("{ip}:53/UDP"));
    let pod_client = HostClient::new(&s.env.pod("client-1").ns, &s.cg);
    let tcp_fe = SocketAddr::from((ip, 80));
    let udp_fe = SocketAddr::from((ip, 53));
    let t = tally(SPREAD, || pod_client.tcp_request(tcp_fe), tcp_fe);
    assert_eq!(t.len(), 2, "{t:?}");
    let t = tally(SPREAD, || pod_client.udp_request(udp_fe), udp_fe);
    assert_eq!(t.len(), 2, "{t:?}");
    // The packets were addressed to the pods from the start: no Service flow in conntrack.
    let flows: Vec<_> = s
        .env
        .conntrack(1)
        .into_iter()
        .filter(|e| e.involves(client_ip))
        .collect();
    assert!(
        flows.is_empty(),
        "socket-LB flows went through from_pod: {flows:?}"
    );
    // Host clients are translated too.
    let a = s.host().tcp_request(tcp_fe).expect("host client");
    assert!(a.text.starts_with("web-"));
}

#[test]
#[ignore = "needs root"]
fn cgroup_links_are_swapped_on_restart_and_removed_by_off_and_cleanup() {
    let mut s = SockEnv::new();
    add_web_pods(&mut s);
    let ip = Ipv4Addr::new(10, 96, 0, 56);
    s.env
        .write(&web_service(&s, "sock-restart", ip, &["web-1", "web-2"]));
    s.start(host, off);
    s.env.wait_frontend(&format!("{ip}:80/TCP"));
    let fe = SocketAddr::from((ip, 80));
    let before = s.attached();
    assert!(
        before.values().all(|ids| ids.len() == 1),
        "one program per hook: {before:?}"
    );

    // A connection across the restart keeps working; the restarted agent's programs are
    // swapped into the same links (one program per hook, new ids).
    let mut conn = s
        .host()
        .tcp_connect(fe, Duration::from_secs(2))
        .expect("connect");
    let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
    let mut greeting = String::new();
    reader.read_line(&mut greeting).unwrap();
    s.env.agents[0].restart().expect("restarting node1's agent");
    let after = s.attached();
    assert!(
        after.values().all(|ids| ids.len() == 1),
        "still one program per hook: {after:?}"
    );
    for (hook, ids) in &after {
        assert_ne!(
            ids, &before[hook],
            "{hook}: the old program is still attached"
        );
    }
    conn.write_all(b"ping\n").unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line.trim_end(), format!("{} ping", greeting.trim_end()));
    // The restarted agent's getpeername program reads the pinned SOCK_REV.
    assert_eq!(conn.peer_addr().unwrap(), fe);
    assert!(
        s.host().tcp_request(fe).is_ok(),
        "new connections after the restart"
    );

    // --socket-lb off removes the links.
    s.env.agents[0].spec_mut().socket_lb = SocketLb::Off;
    s.env.agents[0]
        .restart()
        .expect("restarting with --socket-lb off");
    assert!(
        s.attached().values().all(Vec::is_empty),
        "{:?}",
        s.attached()
    );
    // On again, then `xlb cleanup` (the agents' handles drop) detaches them.
    s.env.agents[0].spec_mut().socket_lb = SocketLb::Host(s.cg.path().to_path_buf());
    s.env.agents[0]
        .restart()
        .expect("restarting with --socket-lb host");
    assert!(s.attached().values().all(|ids| ids.len() == 1));
    let agents = std::mem::take(&mut s.env.agents);
    drop(agents);
    assert!(
        s.attached().values().all(Vec::is_empty),
        "after cleanup: {:?}",
        s.attached()
    );
}
