//! Operating the agent as kube-proxy's replacement (issue 13, items 1 and 6), on the netns
//! cluster. Root only: `#[ignore = "needs root"]`, run by `cargo xtask test`.
//!
//! - The API server address: on a node without kube-proxy the pod's KUBERNETES_SERVICE_HOST is
//!   the `kubernetes` Service's ClusterIP, which only works once xlb runs. With `--api-server`
//!   the agent must reach the API server there and never try the ClusterIP; without it, the
//!   KUBERNETES_SERVICE_HOST/PORT of the manifest are honoured (and warned about when inside
//!   --service-cidr).
//! - kube-proxy's health port: /healthz and /livez answer 200 with kube-proxy's JSON while the
//!   maps are in sync, 503 once a change waited longer than --healthz-timeout (a Service that
//!   does not fit the services map: a change that really cannot be applied), and 200 again once
//!   it is gone.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use lb_fakeapi::FakeApi;
use lb_testkit::agent::{find_frontend, http_request, inspect_services};
use lb_testkit::service_yaml::{Endpoint, SvcManifest, SvcPort};
use lb_testkit::{wait_until, Agent, AgentSpec};
use xlb_tests::e2e::{tally_tcp, Env, CONVERGE, MAP_SIZE_ARGS};

/// The `kubernetes` Service's ClusterIP as kubelet puts it into every pod's environment.
const KUBERNETES_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
const KUBERNETES_PORT: u16 = 443;

fn pod_ip(node: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node, host)
}

/// A listener on the ClusterIP-like address that counts the connections it accepts (and drops
/// them). Stops its thread on drop.
struct CountingListener {
    count: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CountingListener {
    fn start(listener: TcpListener) -> Self {
        listener.set_nonblocking(true).unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (count.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok(_conn) => {
                        c.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        CountingListener {
            count,
            stop,
            thread: Some(thread),
        }
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl Drop for CountingListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Put the Service and its EndpointSlice of `m` into the fake API server.
fn publish(api: &FakeApi, m: &SvcManifest) {
    let parsed = lb_model::yaml_docs::parse("test", &m.to_yaml());
    assert!(parsed.problems.is_empty(), "{:?}", parsed.problems);
    for s in &parsed.services {
        api.upsert(s).expect("upsert Service");
    }
    for s in &parsed.slices {
        api.upsert(s).expect("upsert EndpointSlice");
    }
}

/// Wait until the maps under `pin` have `frontend` ("addr:port/TCP").
fn wait_frontend(pin: &Path, frontend: &str) {
    let ok = wait_until(CONVERGE, Duration::from_millis(20), || {
        inspect_services(pin).is_ok_and(|s| find_frontend(&s, frontend).is_some())
    });
    assert!(
        ok,
        "{frontend} never appeared: {:#?}",
        inspect_services(pin)
    );
}

#[test]
#[ignore = "needs root"]
fn the_agent_uses_the_given_api_server_and_never_the_cluster_ip() {
    let mut env = Env::new();
    env.add_pod(1, "ops-a", pod_ip(1, 10), &[9376], &[]);
    env.add_pod(1, "ops-client", pod_ip(1, 100), &[], &[]);
    let node1 = env.cluster.node(1);

    // The `kubernetes` Service's ClusterIP, reachable in node1 (as it would be once a Service
    // proxy runs), with a listener that counts every connection attempt to it.
    node1
        .ns
        .ip(&[
            "addr",
            "add",
            &format!("{KUBERNETES_CLUSTER_IP}/32"),
            "dev",
            "lo",
        ])
        .expect("ClusterIP-like address on node1's lo");
    let cluster_ip = node1
        .ns
        .run(|| TcpListener::bind((KUBERNETES_CLUSTER_IP, KUBERNETES_PORT)))
        .unwrap()
        .expect("listener on the ClusterIP-like address");
    let cluster_ip = CountingListener::start(cluster_ip);

    // The API server's own address: node1's loopback.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = node1
        .ns
        .run(|| TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .expect("bind in node1");
    let api = {
        let _g = rt.enter();
        FakeApi::new(listener).expect("fake API server")
    };
    let mut node = Node::default();
    node.metadata.name = Some("node1".into());
    api.upsert(&node).unwrap();
    let vip = Ipv4Addr::new(10, 96, 8, 8);
    publish(
        &api,
        &SvcManifest {
            name: "ops-hostnames".into(),
            cluster_ip: vip,
            ports: vec![SvcPort::tcp("default", 80, 9376)],
            endpoints: vec![Endpoint::ready(pod_ip(1, 10), "node1", "ops-a")],
        },
    );

    let pin = node1.pin_path();
    let mut spec = AgentSpec::new(
        &node1.ns,
        &PathBuf::new(),
        &pin,
        &env.dir.0.join("agent-ops.log"),
    );
    let args = |api_server: Option<&str>| -> Vec<String> {
        let mut a = vec![
            "--in-cluster",
            "--node-name",
            "node1",
            "--service-cidr",
            "10.96.0.0/12",
        ];
        if let Some(url) = api_server {
            a.extend(["--api-server", url]);
        }
        a.into_iter()
            .chain(MAP_SIZE_ARGS)
            .map(String::from)
            .collect()
    };
    spec.extra_args = args(Some(&api.url()));
    // What a DaemonSet's pod has in its environment.
    spec.env = vec![
        (
            "KUBERNETES_SERVICE_HOST".into(),
            KUBERNETES_CLUSTER_IP.to_string(),
        ),
        (
            "KUBERNETES_SERVICE_PORT".into(),
            KUBERNETES_PORT.to_string(),
        ),
    ];
    let mut agent = Agent::start(spec).expect("agent with --api-server");

    // The Service came through the given address and is served.
    wait_frontend(&pin, "10.96.8.8:80/TCP");
    let hits = tally_tcp(env.pod("ops-client"), SocketAddr::from((vip, 80)), 10);
    assert_eq!(hits.get("ops-a"), Some(&10), "{hits:?}");
    assert!(
        api.requests().iter().any(|r| r.contains("/services")),
        "the fake API server saw no list/watch: {:?}",
        api.requests()
    );
    let log = agent.log();
    assert!(
        log.lines().any(|l| l.contains("Kubernetes API server")
            && l.contains(&api.url())
            && l.contains("--api-server")),
        "the agent must say which address it uses and why:\n{log}"
    );
    assert_eq!(
        cluster_ip.count(),
        0,
        "the agent connected to the ClusterIP"
    );

    // Control: without --api-server the same environment is honoured, so the ClusterIP is
    // tried (the listener does count), and the agent warns that it is inside --service-cidr.
    agent.stop().expect("stop the agent");
    agent.spec_mut().extra_args = args(None);
    agent.spawn().expect("agent without --api-server");
    let ok = wait_until(CONVERGE, Duration::from_millis(20), || {
        cluster_ip.count() > 0
    });
    assert!(
        ok,
        "KUBERNETES_SERVICE_HOST/PORT were not used:\n{}",
        agent.log_since_start()
    );
    agent
        .wait_log(CONVERGE, |l| l.contains("inside --service-cidr"))
        .expect("the ClusterIP warning");
    agent.kill();
}

/// GET `path` of the health port in node1: status and JSON body.
fn health(netns: &str, addr: SocketAddr, path: &str) -> Option<(u16, serde_json::Value)> {
    let r = http_request(netns, addr, path).ok()?;
    let body =
        serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{path}: {e}: {:?}", r.body));
    assert_eq!(r.header("content-type"), Some("application/json"), "{path}");
    Some((r.status, body))
}

/// kube-proxy's fields are there and are RFC 3339 times.
#[track_caller]
fn assert_kube_proxy_fields(body: &serde_json::Value, with_node: bool) {
    for field in ["lastUpdated", "currentTime"] {
        let s = body[field]
            .as_str()
            .unwrap_or_else(|| panic!("no {field} in {body}"));
        s.parse::<Timestamp>()
            .unwrap_or_else(|e| panic!("{field} {s:?} is not RFC 3339: {e}"));
    }
    assert_eq!(body.get("nodeEligible").is_some(), with_node, "{body}");
}

#[test]
#[ignore = "needs root"]
fn the_health_port_says_503_while_a_change_cannot_reach_the_maps() {
    let mut env = Env::new();
    env.add_pod(1, "hz-a", pod_ip(1, 20), &[9376], &[]);
    for host in 21..24 {
        env.add_pod(1, &format!("hz-b{host}"), pod_ip(1, host), &[9376], &[]);
    }
    env.add_pod(1, "hz-client", pod_ip(1, 100), &[], &[]);
    let small = SvcManifest {
        name: "hz-small".into(),
        cluster_ip: Ipv4Addr::new(10, 96, 9, 1),
        ports: vec![SvcPort::tcp("default", 80, 9376)],
        endpoints: vec![Endpoint::ready(pod_ip(1, 20), "node1", "hz-a")],
    };
    env.write(&small);

    let node1 = env.cluster.node(1);
    let pin = node1.pin_path();
    let mut spec = AgentSpec::new(
        &node1.ns,
        &env.manifests,
        &pin,
        &env.dir.0.join("agent-hz.log"),
    );
    let healthz: SocketAddr = "127.0.0.1:10256".parse().unwrap();
    // Room for the small Service only (a master and one slot): a larger one cannot be applied.
    spec.extra_args = [
        "--services-map-size",
        "4",
        "--backends-map-size",
        "4096",
        "--conntrack-map-size",
        "16384",
        "--healthz-addr",
        "127.0.0.1:10256",
        "--healthz-timeout",
        "1",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let mut agent = Agent::start(spec).expect("agent");
    let ns = node1.ns.name().to_string();

    // In sync: 200 on both paths, kube-proxy's JSON.
    let ok = wait_until(CONVERGE, Duration::from_millis(20), || {
        health(&ns, healthz, "/healthz").is_some_and(|(s, _)| s == 200)
    });
    assert!(
        ok,
        "/healthz never answered 200: {:?}",
        health(&ns, healthz, "/healthz")
    );
    let (_, body) = health(&ns, healthz, "/healthz").unwrap();
    assert_kube_proxy_fields(&body, true);
    assert_eq!(
        (&body["nodeEligible"], &body["synced"]),
        (&true.into(), &true.into()),
        "{body}"
    );
    let (status, body) = health(&ns, healthz, "/livez").unwrap();
    assert_eq!(status, 200, "{body}");
    assert_kube_proxy_fields(&body, false);

    // A Service with three endpoints needs four more entries: the services map is full, the
    // frontend fails and is retried on every tick, and the change stays pending.
    let big = SvcManifest {
        name: "hz-big".into(),
        cluster_ip: Ipv4Addr::new(10, 96, 9, 2),
        ports: vec![SvcPort::tcp("default", 80, 9376)],
        endpoints: (21..24)
            .map(|h| Endpoint::ready(pod_ip(1, h), "node1", &format!("hz-b{h}")))
            .collect(),
    };
    env.write(&big);
    agent
        .wait_log(CONVERGE, |l| l.contains("frontend not updated"))
        .expect("the map-full failure");
    let ok = wait_until(CONVERGE, Duration::from_millis(50), || {
        health(&ns, healthz, "/healthz").is_some_and(|(s, _)| s == 503)
    });
    assert!(
        ok,
        "/healthz never turned 503: {:?}",
        health(&ns, healthz, "/healthz")
    );
    let (_, body) = health(&ns, healthz, "/healthz").unwrap();
    assert_kube_proxy_fields(&body, true);
    assert!(body["pendingSince"].is_string(), "{body}");
    assert_ne!(
        body["lastUpdated"], body["currentTime"],
        "stale: lastUpdated is the last sync: {body}"
    );
    let (status, body) = health(&ns, healthz, "/livez").unwrap();
    assert_eq!(status, 503, "{body}");
    assert_kube_proxy_fields(&body, false);
    // The datapath keeps serving what it has.
    let hits = tally_tcp(
        env.pod("hz-client"),
        SocketAddr::from((small.cluster_ip, 80)),
        5,
    );
    assert_eq!(hits.get("hz-a"), Some(&5), "{hits:?}");

    // The Service that did not fit is deleted: nothing is pending any more.
    env.delete("hz-big");
    let ok = wait_until(CONVERGE, Duration::from_millis(50), || {
        health(&ns, healthz, "/healthz").is_some_and(|(s, _)| s == 200)
    });
    assert!(
        ok,
        "/healthz never came back to 200: {:?}",
        health(&ns, healthz, "/healthz")
    );
    let (status, body) = health(&ns, healthz, "/livez").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body["pendingSince"].is_null(), "{body}");
    drop(agent);
}
