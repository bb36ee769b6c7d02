//! End to end: `xlb status` on a 2-node netns cluster. The binary runs in node1's network
//! namespace against node1's pins and must report what is really there: the pod device's links
//! with the programs the kernel has in them (names, tags), the maps' fill against the
//! capacities the agent was started with, the agent up and synced on kube-proxy's health port,
//! and, once kube-proxy-shaped rules exist in node1's namespace (an iptables `KUBE-SERVICES`
//! chain in the nat table, nft's `ip kube-proxy` table; created in the test's namespace only,
//! gone with it), a warning naming them. With the agent stopped it still reads the pins and
//! says the agent is down.
//! Root only: `#[ignore = "needs root"]`, run by `cargo xtask test`.

use std::net::Ipv4Addr;
use std::time::Duration;

use lb_testkit::serde_json::{self, Value};
use lb_testkit::service_yaml::{Endpoint, SvcManifest, SvcPort};
use lb_testkit::{unique_prefix, wait_until, SocketLb, TestCgroup};
use xlb_tests::e2e::Env;

const CLIENT: &str = "client";
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 100);
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 8, 1);
const WEB_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const WEB_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);

fn status_raw(env: &Env, output: &str) -> String {
    let node = env.cluster.node(1);
    let bin = lb_testkit::agent::xlb_bin().expect("the xlb binary");
    let mut cmd = node.ns.command(bin).expect("a command in node1");
    cmd.args(["status", "-o", output, "--pin-path"])
        .arg(node.pin_path());
    let out = cmd.output().expect("running xlb status");
    assert!(
        out.status.success(),
        "xlb status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn status(env: &Env) -> Value {
    let out = status_raw(env, "json");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status: {e}: {out}"))
}

/// Runs `program args` in node1's namespace; it must succeed.
fn in_node1(env: &Env, program: &str, args: &[&str]) {
    let out = env
        .cluster
        .node(1)
        .ns
        .command(program)
        .expect("a command in node1")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn map_row<'a>(s: &'a Value, name: &str) -> &'a Value {
    s["maps"]
        .as_array()
        .and_then(|m| m.iter().find(|r| r["name"] == name))
        .unwrap_or_else(|| panic!("no map {name} in {s:#}"))
}

#[test]
#[ignore = "needs root"]
fn status_reports_links_programs_maps_agent_and_other_proxies() {
    // Declared before the cluster, so it is removed after the agents are gone.
    let cg = TestCgroup::create(&unique_prefix()).expect("creating the test cgroup");
    let mut env = Env::new();
    env.add_pod(1, "web-a", WEB_A, &[9376], &[]);
    env.add_pod(2, "web-b", WEB_B, &[9376], &[]);
    env.add_client(1, CLIENT, CLIENT_IP);
    env.write(&SvcManifest {
        name: "web".into(),
        cluster_ip: WEB_VIP,
        ports: vec![SvcPort::tcp("http", 80, 9376)],
        endpoints: vec![
            Endpoint::ready(WEB_A, "node1", "web-a"),
            Endpoint::ready(WEB_B, "node2", "web-b"),
        ],
    });
    // Node1's agent also attaches the socket programs, to the test's cgroup.
    let cg_path = cg.path().to_path_buf();
    env.start_agents_per_node(|node, spec| {
        if node.index == 1 {
            spec.socket_lb = SocketLb::Host(cg_path.clone());
        }
    });
    env.wait_backends(
        "10.96.8.1:80/TCP",
        &["10.244.1.10:9376", "10.244.2.10:9376"],
    );
    env.wait_programs_attached(CLIENT);
    // One live connection: two conntrack entries.
    let conn = env
        .pod(CLIENT)
        .tcp_connect((WEB_VIP, 80))
        .expect("connecting to web");

    // The agent reports synced on its health port once its first sync is done.
    let mut s = status(&env);
    let up = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        s = status(&env);
        s["agent"]["state"] == "up"
    });
    assert!(
        up,
        "the agent never reported up and synced: {:#}",
        s["agent"]
    );
    assert!(
        s["agent"]["body"]["lastUpdated"].is_string(),
        "{:#}",
        s["agent"]
    );

    // The client's veth has from_pod and to_pod, each with a program the kernel runs.
    let veth = env.pod(CLIENT).host_veth.clone();
    let links = s["links"].as_array().expect("links");
    for hook in ["from_pod", "to_pod"] {
        let l = links
            .iter()
            .find(|l| {
                l["hook"] == hook
                    && l["target"]
                        .as_str()
                        .is_some_and(|t| t.starts_with(&format!("{veth} (")))
            })
            .unwrap_or_else(|| panic!("no {hook} link on {veth}: {links:#?}"));
        assert_eq!(l["present"], Value::Bool(true), "{l:#}");
        let id = l["prog_id"]
            .as_u64()
            .unwrap_or_else(|| panic!("no program in {l:#}"));
        let p = s["programs"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["id"].as_u64() == Some(id)))
            .unwrap_or_else(|| panic!("program {id} not listed: {s:#}"));
        assert_eq!(p["name"], hook, "{p:#}");
        assert_eq!(p["tag"].as_str().map(str::len), Some(16), "{p:#}");
        assert_eq!(
            p["this_build"],
            Value::Bool(true),
            "the agent is this binary: {p:#}"
        );
    }
    assert!(
        s["build"].as_str().is_some_and(|b| b.starts_with("xlb ")),
        "{s:#}"
    );
    // The socket programs' cgroup links, named by the cgroup's path.
    for prog in [
        "sock_connect4",
        "sock_sendmsg4",
        "sock_recvmsg4",
        "sock_getpeername4",
    ] {
        let l = links
            .iter()
            .find(|l| l["hook"] == prog)
            .unwrap_or_else(|| panic!("no {prog} link: {links:#?}"));
        assert_eq!(
            l["target"],
            format!("cgroup {}", cg.path().display()),
            "{l:#}"
        );
        assert!(l["prog_id"].is_u64() && l["present"] == true, "{l:#}");
    }

    // Fill against the capacities the agent was started with (tests/src/e2e MAP_SIZE_ARGS).
    let svc = map_row(&s, lb_common::map_names::SERVICES);
    assert_eq!(svc["capacity"], Value::from(4096), "{svc:#}");
    assert_eq!(
        svc["entries"],
        Value::from(3),
        "one master and two slots: {svc:#}"
    );
    let ct = map_row(&s, lb_common::map_names::CONNTRACK);
    assert_eq!(ct["capacity"], Value::from(16384), "{ct:#}");
    assert!(
        ct["entries"].as_u64().is_some_and(|n| n >= 2),
        "the connection's pair: {ct:#}"
    );
    assert_eq!(
        map_row(&s, lb_common::map_names::BACKENDS)["entries"],
        Value::from(2)
    );
    assert!(
        s["other_proxies"].as_array().is_some_and(Vec::is_empty),
        "{s:#}"
    );
    assert!(
        !status_raw(&env, "table").contains("WARNING"),
        "no warning on a clean node"
    );
    drop(conn);

    // kube-proxy's rules in node1's namespace: iptables (legacy) KUBE-SERVICES in nat, and
    // the nftables table of its nftables mode.
    in_node1(
        &env,
        "iptables-legacy",
        &["-w", "5", "-t", "nat", "-N", "KUBE-SERVICES"],
    );
    in_node1(
        &env,
        "iptables-legacy",
        &[
            "-w",
            "5",
            "-t",
            "nat",
            "-A",
            "KUBE-SERVICES",
            "-d",
            "10.96.0.1/32",
            "-p",
            "tcp",
            "--dport",
            "443",
            "-j",
            "RETURN",
        ],
    );
    in_node1(&env, "nft", &["add", "table", "ip", "kube-proxy"]);
    in_node1(
        &env,
        "iptables-nft",
        &["-w", "5", "-t", "nat", "-N", "KUBE-SERVICES"],
    );
    let s = status(&env);
    let other = s["other_proxies"].as_array().expect("other_proxies");
    assert!(
        other
            .iter()
            .any(|p| p["backend"] == "iptables-legacy" && p["rules"] == 1),
        "the KUBE-SERVICES chain: {other:#?}"
    );
    assert!(
        other
            .iter()
            .any(|p| p["backend"] == "iptables-nft" && p["rules"] == 0),
        "the iptables-nft chain: {other:#?}"
    );
    assert!(
        other.iter().any(|p| p["what"] == "table ip kube-proxy"),
        "the nft table: {other:#?}"
    );
    let warnings = s["warnings"].as_array().expect("warnings");
    assert!(
        warnings
            .iter()
            .any(|w| w.as_str().is_some_and(|w| w.contains("KUBE-SERVICES"))),
        "{warnings:#?}"
    );
    let table = status_raw(&env, "table");
    println!("{table}");
    assert!(
        table.contains("WARNING") && table.contains("kube-proxy"),
        "{table}"
    );
    // Node2's namespace has none of them.
    let node2 = env.cluster.node(2);
    let bin = lb_testkit::agent::xlb_bin().expect("the xlb binary");
    let out = node2
        .ns
        .command(bin)
        .expect("a command in node2")
        .args(["status", "-o", "json", "--pin-path"])
        .arg(node2.pin_path())
        .output()
        .expect("xlb status on node2");
    let s2: Value = serde_json::from_slice(&out.stdout).expect("status JSON of node2");
    assert!(
        s2["other_proxies"].as_array().is_some_and(Vec::is_empty),
        "{s2:#}"
    );
    // ... and asking created no legacy nat table there (which would turn on conntrack).
    let tables = node2
        .ns
        .command("cat")
        .expect("a command in node2")
        .arg("/proc/net/ip_tables_names")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(
        !tables.lines().any(|l| l == "nat"),
        "status created a nat table: {tables}"
    );

    // The agent stopped: the programs stay attached and status says the agent is down.
    env.agents[0].stop().expect("stopping node1's agent");
    let s = status(&env);
    assert_eq!(s["agent"]["state"], "down", "{:#}", s["agent"]);
    assert!(
        s["links"].as_array().is_some_and(|l| l
            .iter()
            .any(|l| l["hook"] == "from_pod" && !l["prog_id"].is_null())),
        "links survive the agent: {s:#}"
    );
}
