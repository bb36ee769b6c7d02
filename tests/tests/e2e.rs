//! End to end: the `xlb` binary (one agent per node, manifests directory) on a 2-node netns
//! cluster, with real TCP/UDP clients in pods and serve-hostname backends. The scenarios of the
//! tutorials: a Service reaches all its pods, readiness is followed, no endpoints means refused
//! (RST, port unreachable), backends see the client's own address, established connections
//! survive updates and agent restarts, bad input changes nothing, new pods get the programs.
//! Root only: `#[ignore = "needs root"]`, run by `cargo xtask test`.

use std::net::{Ipv4Addr, SocketAddr};

use lb_testkit::service_yaml::{set_endpoint_ready, write_atomic, Endpoint, SvcManifest, SvcPort};
use xlb_tests::e2e::{example_file, hostport, tally_tcp, tally_udp, Env};

const CLIENT: &str = "client";
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 100);
const HOSTNAMES: &str = "10.96.0.80:80/TCP";
const HOSTNAMES_VIP: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 96, 0, 80), 80);
/// A Service written after an invalid manifest, to know when the agents have read both.
const SENTINEL: &str = "10.96.0.99:80/TCP";

fn ip(node: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node, host)
}

/// Examples loaded, their pods serving, a client pod on node1, agents ready, hostnames programmed.
fn examples_env() -> (Env, Vec<lb_testkit::service_yaml::ExampleService>) {
    let mut env = Env::new();
    let examples = env.with_examples();
    env.add_pod(1, CLIENT, CLIENT_IP, &[], &[]);
    env.start_agents();
    let hostnames = examples
        .iter()
        .find(|s| s.name == "hostnames")
        .expect("hostnames example");
    let backends: Vec<String> = hostnames
        .pods
        .iter()
        .map(|p| hostport(p.ip, 9376))
        .collect();
    env.wait_backends(
        HOSTNAMES,
        &backends.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    (env, examples)
}

#[test]
#[ignore = "needs root"]
fn hostnames_example_reaches_every_pod_and_backends_see_the_client_ip() {
    let (env, examples) = examples_env();
    let hostnames = examples.iter().find(|s| s.name == "hostnames").unwrap();
    let hits = tally_tcp(env.pod(CLIENT), HOSTNAMES_VIP.into(), 30);
    for p in &hostnames.pods {
        assert!(
            hits.get(&p.name).copied().unwrap_or(0) > 0,
            "{} never answered: {hits:?}",
            p.name
        );
    }
    assert_eq!(hits.values().sum::<usize>(), 30);
    assert_eq!(hits.len(), 3, "only the 3 pods answer: {hits:?}");

    // No SNAT: every backend saw the client pod's own address.
    for p in &hostnames.pods {
        let peers = env.pod(&p.name).peers();
        assert!(!peers.is_empty());
        assert!(
            peers.iter().all(|a| a.ip() == CLIENT_IP),
            "{}: {peers:?}",
            p.name
        );
    }

    // The other examples answer through their ClusterIPs too.
    for s in examples.iter().filter(|s| s.name != "hostnames") {
        let (port, _) = s.ports[0];
        let hits = tally_tcp(env.pod(CLIENT), (s.cluster_ip, port).into(), 12);
        assert!(
            hits.keys().all(|who| s.pods.iter().any(|p| &p.name == who)),
            "{}: {hits:?}",
            s.name
        );
    }
}

#[test]
#[ignore = "needs root"]
fn endpoint_marked_not_ready_is_never_hit_afterwards() {
    let (env, examples) = examples_env();
    let hostnames = examples.iter().find(|s| s.name == "hostnames").unwrap();
    let victim = hostnames.pods.iter().find(|p| p.node == 2).unwrap();
    set_endpoint_ready(&example_file(&env, hostnames), victim.ip, false).unwrap();
    let rest: Vec<String> = hostnames
        .pods
        .iter()
        .filter(|p| p.ip != victim.ip)
        .map(|p| hostport(p.ip, 9376))
        .collect();
    env.wait_backends(
        HOSTNAMES,
        &rest.iter().map(String::as_str).collect::<Vec<_>>(),
    );

    let seen_before = env.pod(&victim.name).peers().len();
    let hits = tally_tcp(env.pod(CLIENT), HOSTNAMES_VIP.into(), 30);
    assert_eq!(
        hits.get(&victim.name),
        None,
        "not-ready pod answered: {hits:?}"
    );
    assert_eq!(hits.values().sum::<usize>(), 30);
    assert_eq!(hits.len(), 2, "{hits:?}");
    assert_eq!(
        env.pod(&victim.name).peers().len(),
        seen_before,
        "the not-ready pod got connections"
    );

    // Ready again: it is selected again.
    set_endpoint_ready(&example_file(&env, hostnames), victim.ip, true).unwrap();
    let all: Vec<String> = hostnames
        .pods
        .iter()
        .map(|p| hostport(p.ip, 9376))
        .collect();
    env.wait_backends(
        HOSTNAMES,
        &all.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let hits = tally_tcp(env.pod(CLIENT), HOSTNAMES_VIP.into(), 30);
    assert!(hits.contains_key(&victim.name), "{hits:?}");
}

#[test]
#[ignore = "needs root"]
fn service_without_endpoints_is_refused() {
    let mut env = Env::new();
    env.add_pod(1, CLIENT, CLIENT_IP, &[], &[]);
    let svc = SvcManifest {
        name: "empty".into(),
        cluster_ip: Ipv4Addr::new(10, 96, 5, 1),
        ports: vec![
            SvcPort::tcp("http", 80, 8080),
            SvcPort::udp("dns", 53, 5353),
        ],
        endpoints: vec![],
    };
    env.write(&svc);
    env.start_agents();
    env.wait_frontend("10.96.5.1:80/TCP");
    env.wait_frontend("10.96.5.1:53/UDP");
    let client = env.pod(CLIENT);

    // Refused, i.e. answered: a RST (ECONNREFUSED on connect) and an ICMP port unreachable
    // (ECONNREFUSED on the connected UDP socket), never a silence that times out.
    let err = client.tcp_request((svc.cluster_ip, 80)).unwrap_err();
    assert!(err.is_refused(), "TCP: {err}");
    let err = client.udp_request((svc.cluster_ip, 53)).unwrap_err();
    assert!(err.is_refused(), "UDP: {err}");
}

#[test]
#[ignore = "needs root"]
fn udp_through_a_cluster_ip_reaches_every_pod() {
    let mut env = Env::new();
    env.add_pod(1, CLIENT, CLIENT_IP, &[], &[]);
    env.add_pod(1, "dns-a", ip(1, 53), &[], &[5353]);
    env.add_pod(2, "dns-b", ip(2, 53), &[], &[5353]);
    let svc = SvcManifest {
        name: "dns".into(),
        cluster_ip: Ipv4Addr::new(10, 96, 0, 53),
        ports: vec![SvcPort::udp("dns", 53, 5353)],
        endpoints: vec![
            Endpoint::ready(ip(1, 53), "node1", "dns-a"),
            Endpoint::ready(ip(2, 53), "node2", "dns-b"),
        ],
    };
    env.write(&svc);
    env.start_agents();
    env.wait_backends(
        "10.96.0.53:53/UDP",
        &["10.244.1.53:5353", "10.244.2.53:5353"],
    );
    let hits = tally_udp(env.pod(CLIENT), (svc.cluster_ip, 53).into(), 20);
    assert_eq!(
        hits.get("dns-a").copied().unwrap_or(0) + hits.get("dns-b").copied().unwrap_or(0),
        20,
        "{hits:?}"
    );
    assert!(
        hits.contains_key("dns-a") && hits.contains_key("dns-b"),
        "{hits:?}"
    );
    for pod in ["dns-a", "dns-b"] {
        assert!(env.pod(pod).peers().iter().all(|a| a.ip() == CLIENT_IP));
    }
}

#[test]
#[ignore = "needs root"]
fn remote_backend_on_node2_is_reached_from_node1() {
    let mut env = Env::new();
    env.add_pod(1, CLIENT, CLIENT_IP, &[], &[]);
    env.add_pod(2, "far", ip(2, 60), &[8080], &[]);
    let svc = SvcManifest {
        name: "far".into(),
        cluster_ip: Ipv4Addr::new(10, 96, 0, 60),
        ports: vec![SvcPort::tcp("http", 80, 8080)],
        endpoints: vec![Endpoint::ready(ip(2, 60), "node2", "far")],
    };
    env.write(&svc);
    env.start_agents();
    env.wait_backends("10.96.0.60:80/TCP", &["10.244.2.60:8080"]);
    let hits = tally_tcp(env.pod(CLIENT), (svc.cluster_ip, 80).into(), 5);
    assert_eq!(hits.get("far"), Some(&5), "{hits:?}");
    let peers = env.pod("far").peers();
    assert!(peers.iter().all(|a| a.ip() == CLIENT_IP), "{peers:?}");
}

#[test]
#[ignore = "needs root"]
fn long_lived_connection_survives_endpoint_updates_and_agent_restart() {
    let mut env = Env::new();
    env.add_pod(1, CLIENT, CLIENT_IP, &[], &[]);
    env.add_pod(1, "echo-a", ip(1, 70), &[7000], &[]);
    env.add_pod(2, "echo-b", ip(2, 70), &[7000], &[]);
    env.add_pod(2, "echo-c", ip(2, 71), &[7000], &[]);
    let mut svc = SvcManifest {
        name: "echo".into(),
        cluster_ip: Ipv4Addr::new(10, 96, 0, 70),
        ports: vec![SvcPort::tcp("echo", 7000, 7000)],
        endpoints: vec![
            Endpoint::ready(ip(1, 70), "node1", "echo-a"),
            Endpoint::ready(ip(2, 70), "node2", "echo-b"),
        ],
    };
    env.write(&svc);
    env.start_agents();
    env.wait_backends(
        "10.96.0.70:7000/TCP",
        &["10.244.1.70:7000", "10.244.2.70:7000"],
    );
    let vip: SocketAddr = (svc.cluster_ip, 7000).into();

    let mut conn = env.pod(CLIENT).tcp_connect(vip).unwrap();
    let pod = conn.greeting().to_string();
    assert!(pod == "echo-a" || pod == "echo-b", "{pod}");
    assert_eq!(conn.request("1").unwrap(), format!("{pod} 1"));

    // Endpoint update: the other pod leaves, a new one joins. The connection keeps its pod.
    let other = if pod == "echo-a" { "echo-b" } else { "echo-a" };
    svc.endpoints.retain(|e| e.pod != other);
    svc.endpoints
        .push(Endpoint::ready(ip(2, 71), "node2", "echo-c"));
    env.write(&svc);
    let mut now: Vec<String> = svc.endpoints.iter().map(|e| hostport(e.ip, 7000)).collect();
    now.sort();
    env.wait_backends(
        "10.96.0.70:7000/TCP",
        &now.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!(conn.request("2").unwrap(), format!("{pod} 2"));
    let hits = tally_tcp(env.pod(CLIENT), vip, 10);
    assert!(
        !hits.contains_key(other),
        "removed endpoint still selected: {hits:?}"
    );

    // Agent restart on the client's node: SIGTERM leaves programs and maps in place, so the
    // connection and new connections work during the gap and after the restart.
    let before = env.inspect(1);
    env.agents[0].stop().unwrap();
    assert_eq!(conn.request("3").unwrap(), format!("{pod} 3"));
    let hits = tally_tcp(env.pod(CLIENT), vip, 6);
    assert!(
        hits.keys().all(|k| !k.starts_with("<error")),
        "during the gap: {hits:?}"
    );
    env.agents[0].restart().unwrap();
    assert_eq!(conn.request("4").unwrap(), format!("{pod} 4"));
    assert_eq!(env.inspect(1), before, "restart changed the maps");
    let hits = tally_tcp(env.pod(CLIENT), vip, 6);
    assert!(
        hits.keys().all(|k| !k.starts_with("<error")),
        "after restart: {hits:?}"
    );
}

#[test]
#[ignore = "needs root"]
fn invalid_manifest_changes_nothing_else() {
    let (env, _) = examples_env();
    let before = (env.inspect(1), env.inspect(2));
    write_atomic(
        &env.manifests.join("broken.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken}\nspec:\n  clusterIP: not-an-ip\n  ports: [{port: 99999}]\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: [this, is, not, a, map]\n---\n{ unbalanced: [\n",
    )
    .unwrap();
    // A valid change written after the broken file: the agents handle the files in the order
    // they were written, so once it is in the maps the broken file has been read and acted on.
    let sentinel = SvcManifest {
        name: "sentinel".into(),
        cluster_ip: Ipv4Addr::new(10, 96, 0, 99),
        ports: vec![SvcPort::tcp("http", 80, 9376)],
        endpoints: vec![],
    };
    env.write(&sentinel);
    env.wait_frontend(SENTINEL);
    let without_sentinel = |k: u8| {
        let mut s = env.inspect(k);
        s.retain(|f| f.frontend != SENTINEL);
        s
    };
    assert_eq!(
        (without_sentinel(1), without_sentinel(2)),
        before,
        "an invalid manifest changed the maps"
    );
    let hits = tally_tcp(env.pod(CLIENT), HOSTNAMES_VIP.into(), 10);
    assert!(hits.keys().all(|k| k.starts_with("hostnames-")), "{hits:?}");
    for a in &env.agents {
        assert!(
            a.log().contains("broken.yaml"),
            "the problem is not reported in the log"
        );
    }
}

#[test]
#[ignore = "needs root"]
fn pod_created_after_the_agent_started_gets_the_programs() {
    let mut env = Env::new();
    env.add_pod(2, "old", ip(2, 80), &[8080], &[]);
    let mut svc = SvcManifest {
        name: "late".into(),
        cluster_ip: Ipv4Addr::new(10, 96, 0, 81),
        ports: vec![SvcPort::tcp("http", 80, 8080)],
        endpoints: vec![Endpoint::ready(ip(2, 80), "node2", "old")],
    };
    env.write(&svc);
    env.start_agents();
    env.wait_backends("10.96.0.81:80/TCP", &["10.244.2.80:8080"]);

    // A client and a backend whose veths appear only now.
    env.add_pod(1, "late-client", ip(1, 81), &[], &[]);
    env.add_pod(1, "new", ip(1, 80), &[8080], &[]);
    svc.endpoints = vec![Endpoint::ready(ip(1, 80), "node1", "new")];
    env.write(&svc);
    env.wait_backends("10.96.0.81:80/TCP", &["10.244.1.80:8080"]);
    // The client's veth translates its requests, the backend's its replies.
    env.wait_programs_attached("late-client");
    env.wait_programs_attached("new");
    let vip: SocketAddr = (svc.cluster_ip, 80).into();
    let hits = tally_tcp(env.pod("late-client"), vip, 5);
    assert_eq!(hits.get("new"), Some(&5), "{hits:?}");
}

/// Runs `ethtool -K DEV FEATURE on|off` in `ns`.
fn offload(ns: &lb_testkit::netns::NetNs, dev: &str, feature: &str, on: bool) {
    let state = if on { "on" } else { "off" };
    ns.command("ethtool")
        .and_then(|mut c| lb_testkit::netns::run_cmd(c.args(["-K", dev, feature, state])))
        .unwrap_or_else(|e| {
            panic!("ethtool -K {dev} {feature} {state} (is ethtool installed?): {e}")
        });
}

/// The L4 checksum of every translated segment must be right whether the pods offload their
/// checksums (CHECKSUM_PARTIAL: the field holds the pseudo-header sum, finished later) or
/// compute them (the field is the full checksum): `from_pod` and `to_pod` tell the two apart
/// from the field and update the port in software or not at all (`lb_common::csum`). The
/// receiving side makes every checksum count: the node side of each pod veth computes
/// partial checksums at transmit (`tx off`) and the pods verify what they receive (`rx off`),
/// so a wrong one is a dropped segment and a connection that times out. Local and remote
/// backends, several connections with multi-segment lines each way, both sender modes.
#[test]
#[ignore = "needs root"]
fn checksums_are_right_whether_pods_offload_them_or_not() {
    let mut env = Env::new();
    env.add_pod(1, CLIENT, CLIENT_IP, &[], &[]);
    env.add_pod(1, "sum-local", ip(1, 70), &[8080], &[]);
    env.add_pod(2, "sum-remote", ip(2, 70), &[8080], &[]);
    let svc = SvcManifest {
        name: "sum".into(),
        cluster_ip: Ipv4Addr::new(10, 96, 0, 70),
        ports: vec![SvcPort::tcp("http", 80, 8080)],
        endpoints: vec![
            Endpoint::ready(ip(1, 70), "node1", "sum-local"),
            Endpoint::ready(ip(2, 70), "node2", "sum-remote"),
        ],
    };
    env.write(&svc);
    env.start_agents();
    env.wait_backends(
        "10.96.0.70:80/TCP",
        &["10.244.1.70:8080", "10.244.2.70:8080"],
    );
    let pods = [CLIENT, "sum-local", "sum-remote"];
    for name in pods {
        let pod = env.pod(name);
        offload(&env.cluster.node(pod.node).ns, &pod.host_veth, "tx", false);
        offload(&pod.ns, "eth0", "rx", false);
    }
    let line = "x".repeat(3000);
    for pods_offload in [true, false] {
        for name in pods {
            offload(&env.pod(name).ns, "eth0", "tx", pods_offload);
        }
        let mut seen = std::collections::BTreeSet::new();
        for k in 0..12 {
            let mut conn = env
                .pod(CLIENT)
                .tcp_connect((svc.cluster_ip, 80))
                .unwrap_or_else(|e| panic!("offload {pods_offload}, connection {k}: {e}"));
            let pod = conn.greeting().to_string();
            for _ in 0..3 {
                let answer = conn.request(&line).unwrap_or_else(|e| {
                    panic!("offload {pods_offload}, {pod}, connection {k}: {e}")
                });
                assert_eq!(answer, format!("{pod} {line}"), "offload {pods_offload}");
            }
            seen.insert(pod);
        }
        assert_eq!(seen.len(), 2, "offload {pods_offload}: {seen:?}");
    }
}
