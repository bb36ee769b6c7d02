//! End to end: Service names in `xlb inspect` and per-Service metrics, on a 2-node netns
//! cluster. Three Services ("web" port "http" with two endpoints, "api" port "grpc" with one,
//! "empty" without endpoints); a client pod on node1 makes requests, keeps a connection to
//! web and one to api, and is refused by empty. Then:
//!
//! - `xlb inspect services|backends|conntrack`, table and JSON, name every frontend, backend
//!   and flow by namespace/name:port, and `--service NS/NAME`, `--frontend IP:PORT` and
//!   `--client IP` keep exactly the matching rows;
//! - node1's `/metrics` has `xlb_service_*` counters labelled with the Service's namespace,
//!   name, port and protocol that match what the client did (new flows exactly, packets and
//!   bytes consistent with them, the refusal by reason), and a deleted Service leaves them;
//! - after node1's agent stopped, inspect still shows the names (from the pinned
//!   `XLB_SVCNAME_V1`).
//!
//! Root only: `#[ignore = "needs root"]`, run by `cargo xtask test`.

use std::net::Ipv4Addr;
use std::time::Duration;

use lb_testkit::serde_json::{self, Value};
use lb_testkit::service_yaml::{Endpoint, SvcManifest, SvcPort};
use lb_testkit::{wait_until, ClientError};
use xlb_tests::e2e::{Env, CONVERGE};

const CLIENT: &str = "client";
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 100);
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 9, 1);
const API_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 9, 2);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 9, 3);
const WEB_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const WEB_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);
/// Requests the client makes to web (each a new flow), besides its long-lived connection.
const WEB_REQUESTS: usize = 5;

/// `xlb inspect WHAT -o OUTPUT --pin-path <node1> FILTERS...`; must succeed.
fn inspect(env: &Env, what: &str, output: &str, filters: &[&str]) -> String {
    let bin = lb_testkit::agent::xlb_bin().expect("the xlb binary");
    let out = std::process::Command::new(bin)
        .args(["inspect", what, "-o", output, "--pin-path"])
        .arg(env.pin(1))
        .args(filters)
        .output()
        .expect("running xlb inspect");
    assert!(
        out.status.success(),
        "xlb inspect {what} {filters:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn rows(env: &Env, what: &str, filters: &[&str]) -> Vec<Value> {
    let out = inspect(env, what, "json", filters);
    match serde_json::from_str(&out) {
        Ok(Value::Array(rows)) => rows,
        other => panic!("inspect {what} {filters:?}: {other:?}: {out}"),
    }
}

/// The Service a row names, as "ns/name:port" ("-" for none).
fn svc(row: &Value) -> String {
    match &row["service"] {
        Value::Null => "-".into(),
        s => format!(
            "{}/{}:{}",
            s["namespace"].as_str().unwrap_or("?"),
            s["name"].as_str().unwrap_or("?"),
            s["port"].as_str().unwrap_or("?")
        ),
    }
}

fn frontend_row<'a>(rows: &'a [Value], frontend: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["frontend"] == frontend)
        .unwrap_or_else(|| panic!("no frontend {frontend} in {rows:#?}"))
}

/// Everything inspect must show from node1's pins, agent running or not (`empty`: whether
/// the Service "empty" still exists).
fn check_inspect(env: &Env, empty: bool) {
    // services: every frontend named; filters.
    let all = rows(env, "services", &[]);
    let web = frontend_row(&all, "10.96.9.1:80/TCP");
    assert_eq!(svc(web), "default/web:http", "{web:#}");
    let web_id = web["svc_port_id"].as_u64().expect("svc_port_id");
    assert!(web_id > 0, "{web:#}");
    assert_eq!(
        svc(frontend_row(&all, "10.96.9.2:81/TCP")),
        "default/api:grpc"
    );
    if empty {
        assert_eq!(
            svc(frontend_row(&all, "10.96.9.3:80/TCP")),
            "default/empty:http"
        );
    } else {
        assert!(
            !all.iter().any(|r| r["frontend"] == "10.96.9.3:80/TCP"),
            "{all:#?}"
        );
    }
    let only_web = rows(env, "services", &["--service", "default/web"]);
    assert!(
        !only_web.is_empty() && only_web.iter().all(|r| svc(r) == "default/web:http"),
        "{only_web:#?}"
    );
    assert!(only_web.iter().any(|r| r["frontend"] == "10.96.9.1:80/TCP"));
    let at_api = rows(env, "services", &["--frontend", "10.96.9.2:81"]);
    assert_eq!(at_api.len(), 1, "{at_api:#?}");
    assert_eq!(svc(&at_api[0]), "default/api:grpc");
    assert!(rows(env, "services", &["--service", "default/nope"]).is_empty());
    let table = inspect(env, "services", "table", &[]);
    for name in ["default/web:http", "default/api:grpc"] {
        assert!(table.contains(name), "{name} missing from\n{table}");
    }
    assert_eq!(table.contains("default/empty:http"), empty, "{table}");

    // backends: each backend names the Service ports using it; --service keeps api's only.
    let backends = rows(env, "backends", &[]);
    let a = backends
        .iter()
        .find(|b| b["addr"] == WEB_A.to_string())
        .unwrap_or_else(|| panic!("no backend {WEB_A}: {backends:#?}"));
    let a_services: Vec<String> = a["services"]
        .as_array()
        .expect("services")
        .iter()
        .map(|s| {
            format!(
                "{}/{}:{}",
                s["namespace"].as_str().unwrap(),
                s["name"].as_str().unwrap(),
                s["port"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        a_services,
        ["default/api:grpc", "default/web:http"],
        "{a:#}"
    );
    let api_backends = rows(env, "backends", &["--service", "default/api"]);
    assert_eq!(api_backends.len(), 1, "{api_backends:#?}");
    assert_eq!(api_backends[0]["addr"], WEB_A.to_string());
    let web_backends = rows(env, "backends", &["--frontend", "10.96.9.1:80"]);
    let mut addrs: Vec<&str> = web_backends
        .iter()
        .filter_map(|b| b["addr"].as_str())
        .collect();
    addrs.sort_unstable();
    assert_eq!(addrs, ["10.244.1.10", "10.244.2.10"], "{web_backends:#?}");
    let table = inspect(env, "backends", "table", &[]);
    assert!(table.contains("default/api:grpc"), "{table}");

    // conntrack: the client's flows, named; each filter keeps its flows only.
    let mine = rows(env, "conntrack", &["--client", &CLIENT_IP.to_string()]);
    let live_web = mine.iter().any(|r| {
        r["dir"] == "forward"
            && r["daddr"] == WEB_VIP.to_string()
            && r["state"] == "established"
            && r["svc_port_id"].as_u64() == Some(web_id)
    });
    assert!(live_web, "the live connection to web: {mine:#?}");
    for r in &mine {
        assert!(
            ["default/web:http", "default/api:grpc"].contains(&svc(r).as_str()),
            "{r:#}"
        );
        if r["dir"] == "forward" {
            assert_eq!(r["saddr"], CLIENT_IP.to_string(), "{r:#}");
        } else {
            assert_eq!(r["daddr"], CLIENT_IP.to_string(), "{r:#}");
        }
    }
    let api_flows = rows(env, "conntrack", &["--service", "default/api"]);
    assert!(
        api_flows
            .iter()
            .any(|r| r["dir"] == "forward" && r["state"] == "established"),
        "the live connection to api: {api_flows:#?}"
    );
    assert!(
        api_flows.iter().all(|r| svc(r) == "default/api:grpc"),
        "{api_flows:#?}"
    );
    let at_api = rows(env, "conntrack", &["--frontend", "10.96.9.2:81"]);
    assert_eq!(
        at_api.len(),
        api_flows.len(),
        "{at_api:#?} vs {api_flows:#?}"
    );
    assert!(rows(env, "conntrack", &["--client", "10.244.9.9"]).is_empty());
    let table = inspect(
        env,
        "conntrack",
        "table",
        &["--client", &CLIENT_IP.to_string()],
    );
    assert!(table.contains("default/web:http"), "{table}");
}

/// The value of `metric{namespace="default",name=NAME,port=PORT,protocol="TCP"[,reason=..]}`.
fn svc_metric(
    page: &str,
    metric: &str,
    name: &str,
    port: &str,
    reason: Option<&str>,
) -> Option<f64> {
    let mut labels = format!(r#"namespace="default",name="{name}",port="{port}",protocol="TCP""#);
    if let Some(r) = reason {
        labels += &format!(r#",reason="{r}""#);
    }
    let prefix = format!("{metric}{{{labels}}} ");
    page.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
#[ignore = "needs root"]
fn inspect_names_services_and_filters_and_metrics_count_per_service() {
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
    env.write(&SvcManifest {
        name: "api".into(),
        cluster_ip: API_VIP,
        ports: vec![SvcPort::tcp("grpc", 81, 9376)],
        endpoints: vec![Endpoint::ready(WEB_A, "node1", "web-a")],
    });
    env.write(&SvcManifest {
        name: "empty".into(),
        cluster_ip: EMPTY_VIP,
        ports: vec![SvcPort::tcp("http", 80, 9376)],
        endpoints: vec![],
    });
    env.start_agents_per_node(|node, spec| {
        if node.index == 1 {
            spec.metrics_addr = Some("127.0.0.1:9477".parse().unwrap());
        }
    });
    env.wait_backends(
        "10.96.9.1:80/TCP",
        &["10.244.1.10:9376", "10.244.2.10:9376"],
    );
    env.wait_backends("10.96.9.2:81/TCP", &["10.244.1.10:9376"]);
    env.wait_frontend("10.96.9.3:80/TCP");
    env.wait_programs_attached(CLIENT);

    let client = env.pod(CLIENT);
    for i in 0..WEB_REQUESTS {
        client
            .tcp_request((WEB_VIP, 80))
            .unwrap_or_else(|e| panic!("request {i} to web: {e}"));
    }
    client.tcp_request((API_VIP, 81)).expect("request to api");
    match client.tcp_request((EMPTY_VIP, 80)) {
        Err(ClientError::Refused) => {}
        other => panic!("empty must refuse: {other:?}"),
    }
    let web_conn = client
        .tcp_connect((WEB_VIP, 80))
        .expect("connecting to web");
    let api_conn = client
        .tcp_connect((API_VIP, 81))
        .expect("connecting to api");

    check_inspect(&env, true);

    // Metrics: what the client did, by Service port. The agent reads the counters once a
    // second; wait for the last of them, then check all.
    let web_flows = (WEB_REQUESTS + 1) as f64;
    let mut page = String::new();
    let seen = wait_until(CONVERGE, Duration::from_millis(200), || {
        page = env.agents[0].metrics().unwrap_or_default();
        svc_metric(&page, "xlb_service_new_flows_total", "web", "http", None) == Some(web_flows)
            && svc_metric(&page, "xlb_service_new_flows_total", "api", "grpc", None) == Some(2.0)
            && svc_metric(
                &page,
                "xlb_service_drops_total",
                "empty",
                "http",
                Some("refused_no_endpoints"),
            ) == Some(1.0)
    });
    let service_lines: Vec<&str> = page
        .lines()
        .filter(|l| l.starts_with("xlb_service_"))
        .collect();
    assert!(
        seen,
        "per-Service counters never matched: {service_lines:#?}"
    );
    for (name, port, flows) in [("web", "http", web_flows), ("api", "grpc", 2.0)] {
        let packets =
            svc_metric(&page, "xlb_service_packets_total", name, port, None).expect("packets");
        let bytes = svc_metric(&page, "xlb_service_bytes_total", name, port, None).expect("bytes");
        // A TCP connection sends at least a SYN and an ACK (and a request); every IPv4 TCP
        // packet is at least 40 bytes.
        assert!(
            packets >= 2.0 * flows,
            "{name}: {packets} packets for {flows} flows: {service_lines:#?}"
        );
        assert!(
            bytes >= 40.0 * packets,
            "{name}: {bytes} bytes for {packets} packets"
        );
        assert_eq!(
            svc_metric(
                &page,
                "xlb_service_drops_total",
                name,
                port,
                Some("refused_no_endpoints")
            ),
            Some(0.0),
            "{name}"
        );
    }
    assert_eq!(
        svc_metric(&page, "xlb_service_new_flows_total", "empty", "http", None),
        Some(0.0)
    );

    // A deleted Service's counters leave the page.
    env.delete("empty");
    env.wait_no_frontend("10.96.9.3:80/TCP");
    let gone = wait_until(CONVERGE, Duration::from_millis(200), || {
        page = env.agents[0].metrics().unwrap_or_default();
        !page.contains(r#"name="empty""#)
    });
    assert!(
        gone,
        "empty's counters stayed: {:#?}",
        page.lines()
            .filter(|l| l.contains("empty"))
            .collect::<Vec<_>>()
    );
    assert!(svc_metric(&page, "xlb_service_new_flows_total", "web", "http", None).is_some());

    // The agent stops; the pins (names included) stay, the programs keep running.
    env.agents[0].stop().expect("stopping node1's agent");
    check_inspect(&env, false);
    drop((web_conn, api_conn));
}
