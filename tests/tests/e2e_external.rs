//! End to end from outside the cluster: an external client (its own namespace on the fabric,
//! 172.31.0.200) reaches Services through both nodes of the 2-node netns cluster, with real TCP
//! and UDP clients and serve-hostname backends on both nodes. Each agent runs as on a real node:
//! `--node-name nodeK`, `--devices eth0` and an `--xdp-mode`.
//!
//! Covered, through node1 and node2 alike: NodePort (the tutorial's `service-web`, nodePort
//! 30080) to a local backend (not SNATed) and a remote one (SNATed to the node, answered back
//! through it) in XDP modes native, generic and off; LoadBalancer ingress IPs and externalIPs
//! (one held by a node, one routed to a node); externalTrafficPolicy Local (local endpoints only,
//! the client's own address, a node without endpoints drops, healthCheckNodePort's JSON with 200
//! / 503) and internalTrafficPolicy Local; pods use every endpoint of an eTP Local Service;
//! loadBalancerSourceRanges; hairpin through a NodePort; TCP and UDP on one port number; the
//! NodePort released when its Service goes; long-lived connections across agent restarts; tuple
//! reuse by one client; a uniform backend choice for new flows in every XDP mode. The NodePort
//! tests run in all three XDP modes; the others in native mode (where XDP hands flows it cannot
//! transmit on a veth to tc), except the LoadBalancer / externalIP test (generic, where XDP
//! transmits itself) and the TCP + UDP test (off: tc only).
//!
//! Root only: `#[ignore = "needs root"]`, run by `cargo xtask test`. Every wait is bounded
//! (`CONVERGE`, the clients' 2 s timeouts); everything is removed by the `Env` guards.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_common::{SCOPE_EXT, SCOPE_INT};
use lb_testkit::cluster::{node_ip, EXTERNAL_IP};
use lb_testkit::service_yaml::{self, Endpoint, ExtSvcManifest, SvcManifest, SvcOptions, SvcPort};
use lb_testkit::{http_request, Close, Dial, Pod, XdpMode};
use xlb_tests::e2e::external::{
    assert_answered_by, assert_refused, assert_silent, assert_snat_only_to_remote, assert_xdp_mode,
    frontend, peer_marks, peers_since, start_node_agents, stat, tally_from, wait_frontend_on,
    wait_no_frontend_on, SNAT_PORTS,
};
use xlb_tests::e2e::{assert_burst_in, hostport, reused_port, Env, REUSED_PORTS};

const NODES: [u8; 2] = [1, 2];
/// Requests of a tally that must reach both backends of a 2-endpoint Service: with a uniform
/// random choice one of them is missed with probability 2^-23.
const SPREAD: usize = 24;
/// The source of hairpinned packets (a pod reaching itself through a frontend), see
/// docs/architecture.md.
const HAIRPIN_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);
/// A second external client, outside every loadBalancerSourceRanges of the tests.
const OTHER_EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 201);

fn pod_ip(node: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node, host)
}

fn ep(env: &Env, pod: &str) -> Endpoint {
    let p = env.pod(pod);
    Endpoint::ready(p.ip, &format!("node{}", p.node), &p.name)
}

fn write(env: &Env, m: &ExtSvcManifest) {
    m.write_to(&env.manifests).expect("writing manifest");
}

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddr {
    (ip, port).into()
}

/// The tutorial's service-web (examples/service-web.yaml: NodePort 30080, pods 10.244.1.40 on
/// node1 and 10.244.2.40 on node2, port 443) with its pods serving: the Env, the pod names and
/// the backends ("addr:port").
fn service_web_env() -> (Env, Vec<String>, Vec<String>) {
    let mut env = Env::new();
    let example = service_yaml::examples_dir().join("service-web.yaml");
    std::fs::copy(&example, env.manifests.join("service-web.yaml")).expect("copying service-web");
    let svc = service_yaml::load_examples(&env.manifests)
        .expect("reading service-web")
        .remove(0);
    assert_eq!(svc.node_ports, [30080]);
    let mut names = Vec::new();
    for p in &svc.pods {
        env.add_pod(p.node, &p.name, p.ip, &p.tcp_ports, &p.udp_ports);
        names.push(p.name.clone());
    }
    let backends = svc.pods.iter().map(|p| hostport(p.ip, 443)).collect();
    (env, names, backends)
}

/// service-web from the outside, through both nodes, in each XDP mode: every request is
/// answered, by pods on both nodes; the backend on the entry node sees the client's own
/// address, the one on the other node the entry node's address with a SNAT port (and its
/// answers return through the entry node, or the client's connection would not complete).
#[test]
#[ignore = "needs root"]
fn node_port_service_web_through_both_nodes_in_every_xdp_mode() {
    let (mut env, names, backends) = service_web_env();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let backends: Vec<&str> = backends.iter().map(String::as_str).collect();

    for mode in XdpMode::ALL {
        start_node_agents(&mut env, mode);
        for k in NODES {
            assert_xdp_mode(&env, k, mode);
            wait_frontend_on(
                &env,
                k,
                &frontend(node_ip(k), 30080, "TCP"),
                SCOPE_EXT,
                &backends,
            );
        }
        for k in NODES {
            let what = format!("--xdp-mode {mode}, via node{k}");
            let pods: Vec<&Pod> = names.iter().map(|n| env.pod(n)).collect();
            let marks = peer_marks(&pods);
            let deferred = stat(&env, k, "xdp_deferred");
            let hits = tally_from(
                &env.cluster.external,
                sock(node_ip(k), 30080),
                SPREAD,
                false,
            );
            assert_answered_by(&what, &hits, SPREAD, &names, &names);
            assert_snat_only_to_remote(&what, &pods, &marks, k);
            // The XDP program saw the packets: native XDP on a veth cannot transmit, so it
            // hands the flows to the remote backend to tc; with XDP off nothing is deferred.
            let deferred = stat(&env, k, "xdp_deferred") - deferred;
            match mode {
                XdpMode::Native => assert!(deferred > 0, "{what}: XDP deferred nothing"),
                XdpMode::Off => assert_eq!(deferred, 0, "{what}"),
                XdpMode::Generic => {}
            }
        }
        // The next mode starts from scratch: `xlb cleanup` detaches everything.
        env.agents.clear();
    }
}

/// New flows from outside are spread uniformly over the backends, local and remote alike, in
/// every XDP mode (architecture: "a uniformly random slot"): 200 connections through each node
/// to service-web's 2 pods, each pod must get at least 35% (a fair choice misses that with
/// probability ~1e-5; a 3:1 bias, e.g. a choice made twice when XDP hands a flow to tc, hits
/// it). All modes are measured before anything is asserted, so a failure shows every mode.
#[test]
#[ignore = "needs root"]
fn node_port_backend_choice_is_uniform_in_every_xdp_mode() {
    const N: usize = 200;
    let (mut env, names, backends) = service_web_env();
    let backends: Vec<&str> = backends.iter().map(String::as_str).collect();
    let mut tallies = Vec::new();
    for mode in XdpMode::ALL {
        start_node_agents(&mut env, mode);
        for k in NODES {
            let fe = frontend(node_ip(k), 30080, "TCP");
            wait_frontend_on(&env, k, &fe, SCOPE_EXT, &backends);
        }
        for k in NODES {
            let hits = tally_from(&env.cluster.external, sock(node_ip(k), 30080), N, false);
            tallies.push((mode, k, hits));
        }
        env.agents.clear();
    }
    let uneven: Vec<_> = tallies
        .iter()
        .filter(|(_, _, hits)| {
            names
                .iter()
                .any(|n| hits.get(n).copied().unwrap_or(0) * 100 < N * 35)
        })
        .collect();
    assert!(
        uneven.is_empty(),
        "backend choice is not uniform (pod {} is on node1, {} on node2): {uneven:#?}\nall: {tallies:#?}",
        names[0],
        names[1]
    );
}

/// A LoadBalancer Service with an ingress IP and two externalIPs, one a node's own address,
/// one held by no node and routed to a node by the client's router: TCP and UDP through each
/// node (XDP generic), local backends not SNATed, remote ones SNATed; pods reach them too.
#[test]
#[ignore = "needs root"]
fn load_balancer_ip_and_external_ips_from_outside() {
    let lb_ip = Ipv4Addr::new(192, 168, 100, 21);
    let unheld = Ipv4Addr::new(192, 168, 200, 21);
    let mut env = Env::new();
    env.add_pod(1, "lb-a", pod_ip(1, 21), &[8080], &[8080]);
    env.add_pod(2, "lb-b", pod_ip(2, 21), &[8080], &[8080]);
    env.add_pod(1, "client", pod_ip(1, 100), &[], &[]);
    let svc = ExtSvcManifest::new(
        SvcManifest {
            name: "lb".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 10, 21),
            ports: vec![
                SvcPort::tcp("http", 80, 8080).node_port(30021),
                SvcPort::udp("echo", 80, 8080).node_port(30021),
            ],
            endpoints: vec![ep(&env, "lb-a"), ep(&env, "lb-b")],
        },
        SvcOptions::load_balancer(&[lb_ip]).external_ips(&[unheld, node_ip(2)]),
    );
    write(&env, &svc);
    start_node_agents(&mut env, XdpMode::Generic);
    let all = ["10.244.1.21:8080", "10.244.2.21:8080"];
    for k in NODES {
        for addr in [lb_ip, unheld, node_ip(2)] {
            for proto in ["TCP", "UDP"] {
                wait_frontend_on(&env, k, &frontend(addr, 80, proto), SCOPE_EXT, &all);
            }
        }
    }
    let pods = ["lb-a", "lb-b"];
    let ext = &env.cluster.external;
    let mut cases: Vec<(String, Ipv4Addr, u8)> = Vec::new();
    for k in NODES {
        ext.route_via(lb_ip, node_ip(k)).unwrap();
        ext.route_via(unheld, node_ip(k)).unwrap();
        cases.push((
            format!("LoadBalancer IP {lb_ip} routed to node{k}"),
            lb_ip,
            k,
        ));
        cases.push((
            format!("externalIP {unheld} (no node holds it) routed to node{k}"),
            unheld,
            k,
        ));
        if k == 2 {
            cases.push((
                format!("externalIP {} (node2's own address)", node_ip(2)),
                node_ip(2),
                2,
            ));
        }
        for (what, addr, via) in cases.drain(..) {
            for udp in [false, true] {
                let what = format!("{what} {}", if udp { "UDP" } else { "TCP" });
                let pods_now: Vec<&Pod> = pods.iter().map(|n| env.pod(n)).collect();
                let marks = peer_marks(&pods_now);
                let hits = tally_from(ext, sock(addr, 80), SPREAD, udp);
                assert_answered_by(&what, &hits, SPREAD, &pods, &pods);
                assert_snat_only_to_remote(&what, &pods_now, &marks, via);
            }
        }
    }
    // Pods reach the same addresses (translated on their own node, no SNAT).
    let client = env.pod("client");
    for addr in [lb_ip, unheld, node_ip(2)] {
        let what = format!("pod client -> {addr}:80");
        let hits = tally_from(&client.ns, sock(addr, 80), SPREAD, false);
        assert_answered_by(&what, &hits, SPREAD, &pods, &pods);
    }
}

/// externalTrafficPolicy Local (XDP native): through each node only that node's endpoints,
/// which see the external client's own address; a node without local endpoints drops (no
/// answer at all, no pod reached, counted): node2, then node1 once the only endpoint moved to
/// node2, which then serves it; the healthCheckNodePort answers kube-proxy's JSON with 200 /
/// 503 on each node and follows the endpoints; pods use every endpoint of such a Service, also
/// through a node without local ones. internalTrafficPolicy Local: pods reach only their node's
/// endpoints.
#[test]
#[ignore = "needs root"]
fn traffic_policy_local_external_and_internal() {
    let both_ip = Ipv4Addr::new(192, 168, 100, 31);
    let one_ip = Ipv4Addr::new(192, 168, 100, 32);
    let mut env = Env::new();
    env.add_pod(1, "loc-a", pod_ip(1, 31), &[8080], &[]);
    env.add_pod(2, "loc-b", pod_ip(2, 31), &[8080], &[]);
    env.add_pod(1, "only-a", pod_ip(1, 32), &[8080], &[]);
    env.add_pod(1, "client1", pod_ip(1, 100), &[], &[]);
    env.add_pod(2, "client2", pod_ip(2, 100), &[], &[]);
    let local_svc = |name: &str, vip: u8, np: u16, hc: u16, lb: Ipv4Addr, eps: Vec<Endpoint>| {
        ExtSvcManifest::new(
            SvcManifest {
                name: name.into(),
                cluster_ip: Ipv4Addr::new(10, 96, 10, vip),
                ports: vec![SvcPort::tcp("http", 80, 8080).node_port(np)],
                endpoints: eps,
            },
            SvcOptions::load_balancer(&[lb]).external_local(Some(hc)),
        )
    };
    let both = local_svc(
        "local-both",
        31,
        30031,
        31031,
        both_ip,
        vec![ep(&env, "loc-a"), ep(&env, "loc-b")],
    );
    let mut one = local_svc(
        "local-one",
        32,
        30032,
        31032,
        one_ip,
        vec![ep(&env, "only-a")],
    );
    let itp = ExtSvcManifest::new(
        SvcManifest {
            name: "itp".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 10, 33),
            ports: vec![SvcPort::tcp("http", 80, 8080)],
            endpoints: vec![ep(&env, "loc-a"), ep(&env, "loc-b")],
        },
        SvcOptions::default().internal_local(),
    );
    for m in [&both, &one, &itp] {
        write(&env, m);
    }
    start_node_agents(&mut env, XdpMode::Native);
    let local_of = |k: u8| if k == 1 { "loc-a" } else { "loc-b" };
    let be = |pod: &str| hostport(env.pod(pod).ip, 8080);
    for k in NODES {
        let local = be(local_of(k));
        for fe in [
            frontend(node_ip(k), 30031, "TCP"),
            frontend(both_ip, 80, "TCP"),
        ] {
            wait_frontend_on(&env, k, &fe, SCOPE_EXT, &[&local]);
            wait_frontend_on(&env, k, &fe, SCOPE_INT, &[&be("loc-a"), &be("loc-b")]);
        }
        let one_local: Vec<String> = if k == 1 { vec![be("only-a")] } else { vec![] };
        let one_local: Vec<&str> = one_local.iter().map(String::as_str).collect();
        for fe in [
            frontend(node_ip(k), 30032, "TCP"),
            frontend(one_ip, 80, "TCP"),
        ] {
            wait_frontend_on(&env, k, &fe, SCOPE_EXT, &one_local);
            wait_frontend_on(&env, k, &fe, SCOPE_INT, &[&be("only-a")]);
        }
        wait_frontend_on(&env, k, "10.96.10.33:80/TCP", SCOPE_EXT, &[&local]);
    }
    let ext = &env.cluster.external;

    // Only the local endpoint, and it sees the client itself.
    for k in NODES {
        ext.route_via(both_ip, node_ip(k)).unwrap();
        ext.route_via(one_ip, node_ip(k)).unwrap();
        let local = env.pod(local_of(k));
        for target in [sock(node_ip(k), 30031), sock(both_ip, 80)] {
            let what = format!("eTP Local {target} via node{k}");
            let mark = local.peers().len();
            let hits = tally_from(ext, target, 10, false);
            assert_answered_by(&what, &hits, 10, &[&local.name], &[&local.name]);
            let seen = peers_since(local, mark);
            assert!(
                seen.len() == 10 && seen.iter().all(|a| a.ip() == IpAddr::V4(EXTERNAL_IP)),
                "{what}: the backend must see the real client {EXTERNAL_IP}: {seen:?}"
            );
        }
    }

    // local-one: node1 serves it, node2 has no local endpoint and drops it.
    let only_a = env.pod("only-a");
    let mark = only_a.peers().len();
    let hits = tally_from(ext, sock(node_ip(1), 30032), 5, false);
    assert_answered_by("local-one via node1", &hits, 5, &["only-a"], &["only-a"]);
    assert!(peers_since(only_a, mark)
        .iter()
        .all(|a| a.ip() == IpAddr::V4(EXTERNAL_IP)));
    let mark = only_a.peers().len();
    let drops = stat(&env, 2, "drop_no_local_endpoint");
    assert_silent(
        "local-one NodePort via node2",
        ext.tcp_request(sock(node_ip(2), 30032)),
    );
    assert_silent(
        "local-one LB IP via node2",
        ext.tcp_request(sock(one_ip, 80)),
    );
    assert_eq!(
        peers_since(only_a, mark),
        [],
        "a node without local endpoints reached a pod"
    );
    assert!(
        stat(&env, 2, "drop_no_local_endpoint") > drops,
        "node2's drops are not counted"
    );

    // healthCheckNodePort, asked from outside on each node. The listener follows the maps by a
    // moment (it is updated right after them): wait for the status, then check the answer.
    let health = |k: u8, port: u16, name: &str, local: usize| {
        let want_status = if local > 0 { 200 } else { 503 };
        let get = || http_request(ext.ns.name(), sock(node_ip(k), port), "/healthz");
        lb_testkit::wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            get().is_ok_and(|r| r.status == want_status)
        });
        let r = get().unwrap_or_else(|e| panic!("health check node{k}:{port}: {e}"));
        assert_eq!(r.status, want_status, "node{k}:{port}: {r:?}");
        assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"), "{r:?}");
        let body: lb_testkit::serde_json::Value = lb_testkit::serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("node{k}:{port} body {:?}: {e}", r.body));
        assert_eq!(
            body,
            lb_testkit::serde_json::json!({
                "service": {"namespace": "default", "name": name},
                "localEndpoints": local,
                "serviceProxyHealthy": true,
            }),
            "node{k}:{port}"
        );
    };
    health(1, 31031, "local-both", 1);
    health(2, 31031, "local-both", 1);
    health(1, 31032, "local-one", 1);
    health(2, 31032, "local-one", 0);

    // Pods use every endpoint: client2 on node2 reaches only-a on node1 through node2's
    // NodePort and the LoadBalancer IP; client1 reaches both pods of local-both.
    let client1 = env.pod("client1");
    let client2 = env.pod("client2");
    for target in [sock(node_ip(2), 30032), sock(one_ip, 80)] {
        let hits = tally_from(&client2.ns, target, 4, false);
        assert_answered_by(
            &format!("pod on node2 -> {target}"),
            &hits,
            4,
            &["only-a"],
            &["only-a"],
        );
    }
    for target in [sock(node_ip(1), 30031), sock(both_ip, 80)] {
        let hits = tally_from(&client1.ns, target, SPREAD, false);
        assert_answered_by(
            &format!("pod on node1 -> {target}"),
            &hits,
            SPREAD,
            &["loc-a", "loc-b"],
            &["loc-a", "loc-b"],
        );
    }

    // internalTrafficPolicy Local: each pod client reaches its own node's endpoint only.
    for (client, local) in [(client1, "loc-a"), (client2, "loc-b")] {
        let mark = env.pod(local).peers().len();
        let hits = tally_from(
            &client.ns,
            sock(Ipv4Addr::new(10, 96, 10, 33), 80),
            10,
            false,
        );
        assert_answered_by(
            &format!("iTP Local from {}", client.name),
            &hits,
            10,
            &[local],
            &[local],
        );
        assert!(peers_since(env.pod(local), mark)
            .iter()
            .all(|a| a.ip() == IpAddr::V4(client.ip)));
    }

    // local-one's endpoint moves to node2: now node2 serves it and node1 drops it, and the
    // health checks say so.
    one.svc.endpoints = vec![ep(&env, "loc-b")];
    write(&env, &one);
    wait_frontend_on(
        &env,
        2,
        &frontend(node_ip(2), 30032, "TCP"),
        SCOPE_EXT,
        &[&be("loc-b")],
    );
    wait_frontend_on(&env, 1, &frontend(node_ip(1), 30032, "TCP"), SCOPE_EXT, &[]);
    let hits = tally_from(ext, sock(node_ip(2), 30032), 4, false);
    assert_answered_by(
        "local-one via node2 after the move",
        &hits,
        4,
        &["loc-b"],
        &["loc-b"],
    );
    health(2, 31032, "local-one", 1);
    health(1, 31032, "local-one", 0);
    let marks = peer_marks(&[env.pod("loc-a"), env.pod("loc-b"), env.pod("only-a")]);
    let drops = stat(&env, 1, "drop_no_local_endpoint");
    assert_silent(
        "local-one NodePort via node1 after the move",
        ext.tcp_request(sock(node_ip(1), 30032)),
    );
    assert_eq!(
        peer_marks(&[env.pod("loc-a"), env.pod("loc-b"), env.pod("only-a")]),
        marks,
        "node1 reached a pod"
    );
    assert!(
        stat(&env, 1, "drop_no_local_endpoint") > drops,
        "node1's drops are not counted"
    );
}

/// loadBalancerSourceRanges (XDP native): the listed client reaches the LoadBalancer IP through
/// either node; another external client and a pod are dropped (no answer, counted); the same
/// Service's NodePort is not restricted; widening the ranges lets the other client in.
#[test]
#[ignore = "needs root"]
fn load_balancer_source_ranges_drop_other_clients() {
    let lb_ip = Ipv4Addr::new(192, 168, 100, 41);
    let mut env = Env::new();
    env.add_pod(1, "sr-a", pod_ip(1, 41), &[8080], &[]);
    env.add_pod(2, "sr-b", pod_ip(2, 41), &[8080], &[]);
    env.add_pod(1, "client", pod_ip(1, 100), &[], &[]);
    let mut svc = ExtSvcManifest::new(
        SvcManifest {
            name: "ranged".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 10, 41),
            ports: vec![SvcPort::tcp("http", 80, 8080).node_port(30041)],
            endpoints: vec![ep(&env, "sr-a"), ep(&env, "sr-b")],
        },
        SvcOptions::load_balancer(&[lb_ip]).source_ranges(&["172.31.0.200/32"]),
    );
    write(&env, &svc);
    start_node_agents(&mut env, XdpMode::Native);
    let all = ["10.244.1.41:8080", "10.244.2.41:8080"];
    for k in NODES {
        wait_frontend_on(&env, k, &frontend(lb_ip, 80, "TCP"), SCOPE_EXT, &all);
        wait_frontend_on(
            &env,
            k,
            &frontend(node_ip(k), 30041, "TCP"),
            SCOPE_EXT,
            &all,
        );
    }
    let other = env
        .cluster
        .add_external("other", OTHER_EXTERNAL_IP)
        .expect("second external client");
    let ext = &env.cluster.external;
    let pods = ["sr-a", "sr-b"];
    for k in NODES {
        ext.route_via(lb_ip, node_ip(k)).unwrap();
        other.route_via(lb_ip, node_ip(k)).unwrap();
        let hits = tally_from(ext, sock(lb_ip, 80), SPREAD, false);
        assert_answered_by(
            &format!("allowed client via node{k}"),
            &hits,
            SPREAD,
            &pods,
            &pods,
        );
        let marks = peer_marks(&[env.pod("sr-a"), env.pod("sr-b")]);
        let drops = stat(&env, k, "drop_source_range");
        assert_silent(
            &format!("{OTHER_EXTERNAL_IP} via node{k}"),
            other.tcp_request(sock(lb_ip, 80)),
        );
        assert!(
            stat(&env, k, "drop_source_range") > drops,
            "node{k} did not count the drop"
        );
        assert_eq!(
            peer_marks(&[env.pod("sr-a"), env.pod("sr-b")]),
            marks,
            "a pod was reached"
        );
        // The NodePort of the same Service is not restricted.
        let hits = tally_from(&other, sock(node_ip(k), 30041), 6, false);
        assert_answered_by(
            &format!("NodePort via node{k} from {OTHER_EXTERNAL_IP}"),
            &hits,
            6,
            &pods,
            &[],
        );
    }
    // A pod is outside the ranges too.
    let drops = stat(&env, 1, "drop_source_range");
    assert_silent(
        "pod client -> LB IP",
        env.pod("client").tcp_request(sock(lb_ip, 80)),
    );
    assert!(stat(&env, 1, "drop_source_range") > drops);

    // Widened to the other client: it gets in.
    svc.opts.source_ranges = vec!["172.31.0.200/31".into()];
    write(&env, &svc);
    let ok = lb_testkit::wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        other.tcp_request(sock(lb_ip, 80)).is_ok()
    });
    assert!(
        ok,
        "{OTHER_EXTERNAL_IP} still dropped after the ranges were widened"
    );
}

/// Hairpin through the NodePort (XDP native): the only backend of a NodePort Service reaches
/// itself through its own node's NodePort (TCP and UDP), on node1 and on node2, and through the
/// other node's NodePort (which SNATs it and sends it back).
#[test]
#[ignore = "needs root"]
fn hairpin_through_the_node_port_on_both_nodes() {
    let mut env = Env::new();
    env.add_pod(1, "hp-a", pod_ip(1, 51), &[8080], &[8080]);
    env.add_pod(2, "hp-b", pod_ip(2, 51), &[8080], &[8080]);
    let hp = |env: &Env, name: &str, vip: u8, np: u16| {
        ExtSvcManifest::new(
            SvcManifest {
                name: name.into(),
                cluster_ip: Ipv4Addr::new(10, 96, 10, vip),
                ports: vec![
                    SvcPort::tcp("http", 80, 8080).node_port(np),
                    SvcPort::udp("echo", 80, 8080).node_port(np),
                ],
                endpoints: vec![ep(env, name)],
            },
            SvcOptions::node_port(),
        )
    };
    write(&env, &hp(&env, "hp-a", 51, 30051));
    write(&env, &hp(&env, "hp-b", 52, 30052));
    start_node_agents(&mut env, XdpMode::Native);
    for (k, pod, np) in [(1u8, "hp-a", 30051u16), (2, "hp-b", 30052)] {
        let be = hostport(env.pod(pod).ip, 8080);
        for n in NODES {
            wait_frontend_on(&env, n, &frontend(node_ip(n), np, "TCP"), SCOPE_EXT, &[&be]);
            wait_frontend_on(&env, n, &frontend(node_ip(n), np, "UDP"), SCOPE_EXT, &[&be]);
        }
        let p = env.pod(pod);
        let other = 3 - k;
        for via in [k, other] {
            let target = sock(node_ip(via), np);
            let what = format!("{pod} on node{k} -> its NodePort via node{via}");
            for udp in [false, true] {
                let mark = p.peers().len();
                let hits = tally_from(&p.ns, target, 3, udp);
                assert_answered_by(&what, &hits, 3, &[pod], &[pod]);
                // Its own node bounces it back with the hairpin address as the source; the
                // other node SNATs it to its own address and sends it back.
                let seen = peers_since(p, mark);
                let ok = |a: &SocketAddr| {
                    if via == k {
                        a.ip() == IpAddr::V4(HAIRPIN_IP)
                    } else {
                        a.ip() == IpAddr::V4(node_ip(via)) && SNAT_PORTS.contains(&a.port())
                    }
                };
                assert!(
                    seen.len() == 3 && seen.iter().all(ok),
                    "{what}: {pod} saw {seen:?}"
                );
            }
        }
    }
}

/// TCP and UDP on the same port number and the same nodePort (DNS-style 53/TCP + 53/UDP,
/// nodePort 30053), XDP off (tc only): each works through both nodes, each keeps working
/// while the other is removed, and once the Service is deleted the NodePort is released:
/// refused (RST / port unreachable from the node itself) on both nodes.
#[test]
#[ignore = "needs root"]
fn tcp_and_udp_on_one_node_port_and_released_after_delete() {
    let mut env = Env::new();
    env.add_pod(1, "dns-a", pod_ip(1, 53), &[5353], &[5353]);
    env.add_pod(2, "dns-b", pod_ip(2, 53), &[5353], &[5353]);
    let tcp = SvcPort::tcp("dns-tcp", 53, 5353).node_port(30053);
    let udp = SvcPort::udp("dns", 53, 5353).node_port(30053);
    let mut svc = ExtSvcManifest::new(
        SvcManifest {
            name: "dns".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 10, 53),
            ports: vec![tcp.clone(), udp.clone()],
            endpoints: vec![ep(&env, "dns-a"), ep(&env, "dns-b")],
        },
        SvcOptions::node_port(),
    );
    write(&env, &svc);
    start_node_agents(&mut env, XdpMode::Off);
    assert_xdp_mode(&env, 1, XdpMode::Off);
    let all = ["10.244.1.53:5353", "10.244.2.53:5353"];
    let pods = ["dns-a", "dns-b"];
    let ext = &env.cluster.external;
    let wait = |k: u8, proto: &str, present: bool| {
        let fe = frontend(node_ip(k), 30053, proto);
        if present {
            wait_frontend_on(&env, k, &fe, SCOPE_EXT, &all);
        } else {
            wait_no_frontend_on(&env, k, &fe);
        }
    };
    let works = |k: u8, udp: bool| {
        let what = format!("{} to node{k}:30053", if udp { "UDP" } else { "TCP" });
        let hits = tally_from(ext, sock(node_ip(k), 30053), SPREAD, udp);
        assert_answered_by(&what, &hits, SPREAD, &pods, &pods);
    };
    for k in NODES {
        wait(k, "TCP", true);
        wait(k, "UDP", true);
        works(k, false);
        works(k, true);
    }
    // Only TCP: UDP is not ours any more (the node's own stack refuses it), TCP still works.
    svc.svc.ports = vec![tcp.clone()];
    write(&env, &svc);
    for k in NODES {
        wait(k, "UDP", false);
        works(k, false);
        assert_refused(
            &format!("UDP node{k} without the UDP port"),
            ext.udp_request(sock(node_ip(k), 30053)),
        );
    }
    // Only UDP: the other way round.
    svc.svc.ports = vec![udp.clone()];
    write(&env, &svc);
    for k in NODES {
        wait(k, "TCP", false);
        wait(k, "UDP", true);
        works(k, true);
        assert_refused(
            &format!("TCP node{k} without the TCP port"),
            ext.tcp_request(sock(node_ip(k), 30053)),
        );
    }
    // Deleted: the NodePort is released on both nodes, for both protocols.
    svc.svc.ports = vec![tcp, udp];
    write(&env, &svc);
    for k in NODES {
        wait(k, "TCP", true);
        works(k, false);
    }
    env.delete("dns");
    for k in NODES {
        wait(k, "TCP", false);
        wait(k, "UDP", false);
        let t = Instant::now();
        assert_refused(
            &format!("TCP node{k} after delete"),
            ext.tcp_request(sock(node_ip(k), 30053)),
        );
        assert_refused(
            &format!("UDP node{k} after delete"),
            ext.udp_request(sock(node_ip(k), 30053)),
        );
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "refusals took {:?}",
            t.elapsed()
        );
    }
}

/// Long-lived external connections (XDP native) through each node to a local backend and to a
/// remote (SNATed) one keep answering, every 20 ms, while both agents are restarted one after
/// the other, and still talk to the same pods afterwards.
#[test]
#[ignore = "needs root"]
fn long_lived_external_connections_survive_agent_restarts() {
    let mut env = Env::new();
    env.add_pod(1, "keep-a", pod_ip(1, 61), &[7000], &[]);
    env.add_pod(2, "keep-b", pod_ip(2, 61), &[7000], &[]);
    for (name, vip, np) in [("keep-a", 61u8, 30061u16), ("keep-b", 62, 30062)] {
        write(
            &env,
            &ExtSvcManifest::new(
                SvcManifest {
                    name: name.into(),
                    cluster_ip: Ipv4Addr::new(10, 96, 10, vip),
                    ports: vec![SvcPort::tcp("echo", 7000, 7000).node_port(np)],
                    endpoints: vec![ep(&env, name)],
                },
                SvcOptions::node_port(),
            ),
        );
    }
    start_node_agents(&mut env, XdpMode::Native);
    for k in NODES {
        wait_frontend_on(
            &env,
            k,
            &frontend(node_ip(k), 30061, "TCP"),
            SCOPE_EXT,
            &["10.244.1.61:7000"],
        );
        wait_frontend_on(
            &env,
            k,
            &frontend(node_ip(k), 30062, "TCP"),
            SCOPE_EXT,
            &["10.244.2.61:7000"],
        );
    }
    // via node1: local keep-a, remote keep-b; via node2: remote keep-a, local keep-b.
    let mut conns = Vec::new();
    for k in NODES {
        for (np, pod) in [(30061, "keep-a"), (30062, "keep-b")] {
            let c = env
                .cluster
                .external
                .tcp_connect(sock(node_ip(k), np))
                .unwrap_or_else(|e| panic!("connecting via node{k} to {pod}: {e}"));
            assert_eq!(c.greeting(), pod);
            conns.push((format!("node{k}:{np}"), pod.to_string(), c));
        }
    }
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let talker = {
        let stop = stop.0.clone();
        let deadline = Instant::now() + Duration::from_secs(120);
        std::thread::spawn(move || {
            let mut sent = 0usize;
            let mut errors: Vec<String> = Vec::new();
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                for (what, pod, c) in conns.iter_mut() {
                    let line = sent.to_string();
                    match c.request(&line) {
                        Ok(a) if a == format!("{pod} {line}") => {}
                        Ok(a) => errors.push(format!("{what}: {a:?}")),
                        Err(e) => errors.push(format!("{what}: {e}")),
                    }
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (conns, sent, errors)
        })
    };
    for k in NODES {
        let before = env.inspect(k);
        env.agents[usize::from(k) - 1].restart().unwrap();
        assert_eq!(
            env.inspect(k),
            before,
            "the restart of node{k}'s agent changed its maps"
        );
        // New connections work after the restart, through both nodes.
        for n in NODES {
            let hits = tally_from(&env.cluster.external, sock(node_ip(n), 30062), 3, false);
            assert_answered_by(
                &format!("new via node{n}"),
                &hits,
                3,
                &["keep-b"],
                &["keep-b"],
            );
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.0.store(true, Ordering::SeqCst);
    let (mut conns, sent, errors) = talker.join().expect("talker thread");
    assert!(
        errors.is_empty(),
        "{} of {sent} requests failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(10)]
    );
    assert!(sent >= 40, "only {sent} requests were sent");
    for (what, pod, c) in conns.iter_mut() {
        assert_eq!(c.request("last").unwrap(), format!("{pod} last"), "{what}");
    }
}

/// Sets the flag when dropped, also when the test panics: the talker thread stops then.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Many short flows one after another from one external client (XDP native), re-using the same
/// 100 source ports towards both nodes' NodePort: TCP connections closed by RST and by the
/// server's FIN alternately (each 4-tuple is reused four times, local and remote backends
/// alike), then UDP flows on the same ports, each kept on one backend while it lives.
#[test]
#[ignore = "needs root"]
fn tuple_reuse_by_one_external_client() {
    let mut env = Env::new();
    env.add_pod(1, "ru-a", pod_ip(1, 71), &[8080], &[8080]);
    env.add_pod(2, "ru-b", pod_ip(2, 71), &[8080], &[8080]);
    let svc = ExtSvcManifest::new(
        SvcManifest {
            name: "reuse".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 10, 71),
            ports: vec![
                SvcPort::tcp("http", 80, 8080).node_port(30071),
                SvcPort::udp("echo", 80, 8080).node_port(30071),
            ],
            endpoints: vec![ep(&env, "ru-a"), ep(&env, "ru-b")],
        },
        SvcOptions::node_port(),
    );
    write(&env, &svc);
    start_node_agents(&mut env, XdpMode::Native);
    let all = ["10.244.1.71:8080", "10.244.2.71:8080"];
    for k in NODES {
        wait_frontend_on(
            &env,
            k,
            &frontend(node_ip(k), 30071, "TCP"),
            SCOPE_EXT,
            &all,
        );
        wait_frontend_on(
            &env,
            k,
            &frontend(node_ip(k), 30071, "UDP"),
            SCOPE_EXT,
            &all,
        );
    }
    let n_ports = usize::from(REUSED_PORTS.end - REUSED_PORTS.start);
    // Rounds of 100 dials alternate the node; pairs of rounds alternate the way of closing.
    let dials: Vec<Dial> = (0..8 * n_ports)
        .map(|k| {
            let round = k / n_ports;
            Dial {
                src_port: Some(reused_port(k)),
                dst: sock(node_ip(1 + (round % 2) as u8), 30071),
                close: if (round / 2) % 2 == 0 {
                    Close::Rst
                } else {
                    Close::ServerFin
                },
            }
        })
        .collect();
    let reused = [
        stat(&env, 1, "ct_tuple_reused"),
        stat(&env, 2, "ct_tuple_reused"),
    ];
    let tally = assert_burst_in(
        "TCP tuple reuse",
        &env.cluster.external,
        &dials,
        |_, who| who == "ru-a" || who == "ru-b",
    );
    assert_eq!(tally.len(), 2, "{tally:?}");
    for k in NODES {
        assert!(
            stat(&env, k, "ct_tuple_reused") > reused[usize::from(k) - 1],
            "node{k} never saw a reused tuple"
        );
    }

    // UDP: each (source port, node) flow, opened twice, sticks to one backend.
    let mut backend_of: BTreeMap<(u16, u8), String> = BTreeMap::new();
    for pass in 0..2 {
        for k in 0..2 * n_ports {
            let port = reused_port(k);
            let node = 1 + (k / n_ports) as u8;
            let conn = env
                .cluster
                .external
                .udp_conn(Some(port), sock(node_ip(node), 30071))
                .unwrap_or_else(|e| panic!("UDP socket :{port}: {e}"));
            let who = conn
                .request()
                .unwrap_or_else(|e| panic!("UDP pass {pass} :{port} via node{node}: {e}"));
            let first = backend_of
                .entry((port, node))
                .or_insert_with(|| who.clone());
            assert_eq!(
                &who, first,
                "UDP flow :{port} via node{node} moved between backends"
            );
        }
    }
    let used: std::collections::BTreeSet<&String> = backend_of.values().collect();
    assert_eq!(used.len(), 2, "UDP flows used {used:?}");
}
