//! End to end: `xlb trace` on a 2-node netns cluster with agents running. The binary runs in
//! node1's network namespace (so it sees the node's devices and routes) against node1's pins,
//! and must answer from the live state: a packet to no Service passes untouched, a new flow to
//! a ClusterIP gets a backend of that Service (and the rewritten headers say so), a Service
//! without endpoints is refused, a packet of a live connection follows its conntrack entry to
//! the backend that answered it. And a trace is a dry run: it writes no conntrack, affinity or
//! counter entry on the node.
//! Root only: `#[ignore = "needs root"]`, run by `cargo xtask test`.

use std::net::Ipv4Addr;
use std::path::Path;

use aya::maps::{HashMap as BpfHashMap, MapData};
use lb_common::{map_names, AffinityKey, AffinityValue, CtKey, CtValue};
use lb_testkit::serde_json::{self, Value};
use lb_testkit::service_yaml::{write_atomic, Endpoint, SvcManifest, SvcPort};
use xlb_tests::e2e::Env;

const CLIENT: &str = "client";
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 100);
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 1);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 2);
const WEB_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const WEB_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);

/// `xlb trace ARGS -o json` in node1's namespace against node1's pins: the parsed report.
fn trace(env: &Env, args: &[&str]) -> Value {
    let out = trace_raw(env, args, "json");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("trace {args:?}: {e}: {out}"))
}

fn trace_raw(env: &Env, args: &[&str], output: &str) -> String {
    let node = env.cluster.node(1);
    let bin = lb_testkit::agent::xlb_bin().expect("the xlb binary");
    let mut cmd = node.ns.command(bin).expect("a command in node1");
    cmd.arg("trace")
        .args(args)
        .args(["-o", output, "--pin-path"])
        .arg(node.pin_path());
    let out = cmd.output().expect("running xlb trace");
    assert!(
        out.status.success(),
        "xlb trace {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The keys of the pinned hash map `name` of node1.
fn keys<K: aya::Pod, V: aya::Pod>(pin: &Path, name: &str) -> Vec<K> {
    let data = MapData::from_pin(pin.join("maps").join(name)).expect("opening a pinned map");
    let map = aya::maps::Map::from_map_data(data).expect("a map");
    let map: BpfHashMap<_, K, V> = BpfHashMap::try_from(map).expect("a hash map");
    map.keys()
        .collect::<Result<Vec<_>, _>>()
        .expect("reading the keys")
}

fn str_of<'a>(v: &'a Value, path: &str) -> &'a str {
    v.pointer(path)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {path} in {v:#}"))
}

#[test]
#[ignore = "needs root"]
fn trace_answers_from_the_live_maps_and_writes_nothing() {
    let mut env = Env::new();
    env.add_pod(1, "web-a", WEB_A, &[9376], &[]);
    env.add_pod(2, "web-b", WEB_B, &[9376], &[]);
    env.add_client(1, CLIENT, CLIENT_IP);
    let web = SvcManifest {
        name: "web".into(),
        cluster_ip: WEB_VIP,
        ports: vec![SvcPort::tcp("http", 80, 9376)],
        endpoints: vec![
            Endpoint::ready(WEB_A, "node1", "web-a"),
            Endpoint::ready(WEB_B, "node2", "web-b"),
        ],
    };
    // sessionAffinity ClientIP: a real new flow would write an affinity entry, a trace must not.
    let yaml = web
        .to_yaml()
        .replacen("spec:\n", "spec:\n  sessionAffinity: ClientIP\n", 1);
    write_atomic(&env.manifests.join("web.yaml"), &yaml).expect("writing web.yaml");
    env.write(&SvcManifest {
        name: "empty".into(),
        cluster_ip: EMPTY_VIP,
        ports: vec![SvcPort::tcp("http", 80, 9376)],
        endpoints: vec![],
    });
    // With a Service CIDR: the trace must find it in the attached programs (no flag given).
    env.start_agents_with(|spec| {
        spec.extra_args
            .extend(["--service-cidr".to_string(), "10.96.0.0/12".to_string()])
    });
    env.wait_backends(
        "10.96.7.1:80/TCP",
        &["10.244.1.10:9376", "10.244.2.10:9376"],
    );
    env.wait_frontend("10.96.7.2:80/TCP");
    env.wait_programs_attached(CLIENT);
    let pin = env.pin(1);
    let veth = env.pod(CLIENT).host_veth.clone();
    let new_flows = || {
        lb_testkit::inspect_stats(&pin)
            .expect("inspect stats")
            .get("new_flow")
            .copied()
            .unwrap_or(0)
    };
    let flows_before = new_flows();

    // Not a Service: a pod talking to another pod directly passes untouched.
    let r = trace(
        &env,
        &["--src", "10.244.1.100:40001", "--dst", "10.244.2.10:9376"],
    );
    assert_eq!(str_of(&r, "/program"), "from_pod", "{r:#}");
    assert_eq!(
        str_of(&r, "/device"),
        veth,
        "chosen from the route to the source: {r:#}"
    );
    assert_eq!(str_of(&r, "/verdict"), "pass", "{r:#}");
    assert_eq!(r["rewritten"], Value::Bool(false), "{r:#}");
    assert!(r["flow"].is_null() && r["backend"].is_null(), "{r:#}");
    assert!(
        str_of(&r, "/summary").contains("not a Service frontend"),
        "{r:#}"
    );

    // A new flow to the ClusterIP: a backend of the Service, the destination rewritten to it.
    let r = trace(
        &env,
        &[
            "--src",
            "10.244.1.100:40002",
            "--dst",
            "10.96.7.1:80",
            "--flags",
            "syn",
        ],
    );
    assert_eq!(str_of(&r, "/verdict"), "pass", "{r:#}");
    println!("trace of a new flow:\n{r:#}");
    assert_eq!(str_of(&r, "/flow"), "new", "{r:#}");
    let backend = str_of(&r, "/backend/addr").to_string();
    assert!(
        ["10.244.1.10:9376", "10.244.2.10:9376"].contains(&backend.as_str()),
        "{r:#}"
    );
    assert_eq!(r["rewritten"], Value::Bool(true), "{r:#}");
    assert_eq!(str_of(&r, "/input/dst"), "10.96.7.1:80", "{r:#}");
    assert_eq!(
        str_of(&r, "/output/dst"),
        backend,
        "DNAT to the backend: {r:#}"
    );
    assert_eq!(
        str_of(&r, "/output/src"),
        "10.244.1.100:40002",
        "the client's own address: {r:#}"
    );
    assert_eq!(str_of(&r, "/service/frontend"), "10.96.7.1:80/TCP", "{r:#}");
    assert_eq!(r["service"]["backends"], Value::from(2), "{r:#}");
    // The Service's name, as the agent recorded it (XLB_SVCNAME_V1).
    assert_eq!(r["service"]["name"].as_str(), Some("default/web"), "{r:#}");
    assert_eq!(r["service"]["port_name"].as_str(), Some("http"), "{r:#}");
    assert!(str_of(&r, "/summary").contains("default/web"), "{r:#}");
    assert!(
        r["reasons"]
            .as_array()
            .is_some_and(|a| a.contains(&Value::from("new_flow"))),
        "{r:#}"
    );

    // A dry run: no conntrack entry of the traced tuples, no affinity entry, no counter moved.
    let ct: Vec<CtKey> = keys::<CtKey, CtValue>(&pin, map_names::CONNTRACK);
    let client_be = u32::from_ne_bytes(CLIENT_IP.octets());
    assert!(
        ct.iter()
            .all(|k| k.saddr != client_be && k.daddr != client_be),
        "a trace wrote conntrack entries: {ct:?}"
    );
    let aff: Vec<AffinityKey> = keys::<AffinityKey, AffinityValue>(&pin, map_names::AFFINITY);
    assert!(aff.is_empty(), "a trace wrote affinity entries: {aff:?}");
    assert_eq!(
        new_flows(),
        flows_before,
        "a trace moved the node's counters"
    );

    // No endpoints: refused at once, a RST back to the client.
    let r = trace(
        &env,
        &["--src", "10.244.1.100:40003", "--dst", "10.96.7.2:80"],
    );
    assert!(str_of(&r, "/summary").starts_with("refused"), "{r:#}");
    assert!(str_of(&r, "/summary").contains("no endpoints"), "{r:#}");
    assert!(
        r["reasons"]
            .as_array()
            .is_some_and(|a| a.contains(&Value::from("refused_tcp"))),
        "{r:#}"
    );
    assert!(
        str_of(&r, "/output/detail").contains("rst"),
        "the answer is a RST: {r:#}"
    );
    assert_eq!(
        str_of(&r, "/output/dst"),
        "10.244.1.100:40003",
        "sent back to the client: {r:#}"
    );

    // An address of the Service CIDR no Service has: refused too (the agent's --service-cidr,
    // read from the attached programs' load-time globals).
    let r = trace(
        &env,
        &["--src", "10.244.1.100:40004", "--dst", "10.96.7.9:80"],
    );
    assert!(
        str_of(&r, "/summary").contains("no Service has it"),
        "{r:#}"
    );
    assert_eq!(
        str_of(&r, "/verdict"),
        "redirect",
        "bounced back into the pod: {r:#}"
    );

    // An established connection: a packet of its tuple follows its conntrack entry to the pod
    // that answered it, whatever a new draw would pick.
    let conn = env
        .pod(CLIENT)
        .tcp_connect((WEB_VIP, 80))
        .expect("connecting to web");
    let answered = match conn.greeting() {
        "web-a" => "10.244.1.10:9376",
        "web-b" => "10.244.2.10:9376",
        other => panic!("answered by {other}"),
    };
    let src = conn.local_addr().to_string();
    for _ in 0..4 {
        let r = trace(
            &env,
            &["--src", &src, "--dst", "10.96.7.1:80", "--flags", "ack,psh"],
        );
        assert_eq!(str_of(&r, "/flow"), "established", "{r:#}");
        assert_eq!(str_of(&r, "/backend/addr"), answered, "{r:#}");
        assert_eq!(str_of(&r, "/output/dst"), answered, "{r:#}");
    }
    // The affinity entry the real connection wrote is the only one.
    assert_eq!(
        keys::<AffinityKey, AffinityValue>(&pin, map_names::AFFINITY).len(),
        1
    );

    // The table names the same things.
    let table = trace_raw(
        &env,
        &["--src", &src, "--dst", "10.96.7.1:80", "--flags", "ack"],
        "table",
    );
    println!("{table}");
    assert!(
        table.contains("established flow") && table.contains(answered),
        "{table}"
    );
    assert!(table.contains(&veth), "{table}");
    drop(conn);
}

/// A client outside the cluster reaching a NodePort of node1 whose only endpoint runs on node2:
/// the trace runs `from_net` on node1's external device (the route to the client's address
/// says which), and shows the new flow DNATed to the backend, SNATed to node1's address and
/// sent out (redirect); and again nothing is written.
#[test]
#[ignore = "needs root"]
fn trace_of_a_node_port_from_outside_goes_through_from_net() {
    use lb_testkit::cluster::{node_ip, EXTERNAL_IP};
    use lb_testkit::service_yaml::{ExtSvcManifest, SvcOptions};
    use lb_testkit::XdpMode;

    let mut env = Env::new();
    env.add_pod(2, "np-b", WEB_B, &[9376], &[]);
    let svc = ExtSvcManifest::new(
        SvcManifest {
            name: "np".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 7, 30),
            ports: vec![SvcPort::tcp("web", 80, 9376).node_port(30077)],
            endpoints: vec![Endpoint::ready(WEB_B, "node2", "np-b")],
        },
        SvcOptions::node_port(),
    );
    svc.write_to(&env.manifests).expect("writing np.yaml");
    xlb_tests::e2e::external::start_node_agents(&mut env, XdpMode::Off);
    let frontend = format!("{}:30077/TCP", node_ip(1));
    xlb_tests::e2e::external::wait_frontend_on(
        &env,
        1,
        &frontend,
        lb_common::SCOPE_EXT,
        &["10.244.2.10:9376"],
    );
    let pin = env.pin(1);
    let ct_before = keys::<CtKey, CtValue>(&pin, map_names::CONNTRACK).len();

    let src = format!("{EXTERNAL_IP}:45000");
    let dst = format!("{}:30077", node_ip(1));
    let r = trace(&env, &["--src", &src, "--dst", &dst]);
    println!("trace of a NodePort from outside:\n{r:#}");
    assert_eq!(str_of(&r, "/program"), "from_net", "{r:#}");
    assert_eq!(str_of(&r, "/device"), "eth0", "{r:#}");
    assert_eq!(str_of(&r, "/flow"), "new", "{r:#}");
    assert_eq!(str_of(&r, "/backend/addr"), "10.244.2.10:9376", "{r:#}");
    assert_eq!(r["service"]["name"].as_str(), Some("default/np"), "{r:#}");
    let snat = str_of(&r, "/snat");
    assert!(
        snat.starts_with(&format!("{}:", node_ip(1))),
        "SNATed to node1's address: {r:#}"
    );
    assert_eq!(str_of(&r, "/output/src"), snat, "{r:#}");
    assert_eq!(str_of(&r, "/output/dst"), "10.244.2.10:9376", "{r:#}");
    assert_eq!(
        str_of(&r, "/verdict"),
        "redirect",
        "sent on towards node2: {r:#}"
    );
    assert!(
        r["reasons"]
            .as_array()
            .is_some_and(|a| a.contains(&Value::from("snat"))),
        "{r:#}"
    );
    assert_eq!(
        keys::<CtKey, CtValue>(&pin, map_names::CONNTRACK).len(),
        ct_before,
        "a trace wrote conntrack"
    );

    // The same client through the XDP program, asked for by name.
    let r = trace(
        &env,
        &[
            "--src",
            &src,
            "--dst",
            &dst,
            "--device",
            "eth0",
            "--hook",
            "from-net-xdp",
        ],
    );
    assert_eq!(str_of(&r, "/program"), "from_net_xdp", "{r:#}");
    assert_eq!(str_of(&r, "/backend/addr"), "10.244.2.10:9376", "{r:#}");
}
