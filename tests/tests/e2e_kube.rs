//! End to end with the Kubernetes source: `xlb agent --kubeconfig` talks real HTTP list/watch to
//! the in-process fake API server (lb-fakeapi), and traffic through the netns cluster follows the
//! API events: create a Service and its slice, scale up, mark an endpoint not ready, survive a
//! 410 Gone relist and an API server restart mid-stream, delete the Service. Root only:
//! `#[ignore = "needs root"]`, run by `cargo xtask test`.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use lb_fakeapi::{FakeApi, Kind};
use lb_testkit::agent::{find_frontend, inspect_services};
use lb_testkit::service_yaml::{Endpoint, SvcManifest, SvcPort};
use lb_testkit::{wait_until, Agent, AgentSpec, ClientError};
use xlb_tests::e2e::{tally_tcp, Env, CONVERGE, MAP_SIZE_ARGS};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 7);
const FRONTEND: &str = "10.96.7.7:80/TCP";

fn pod_ip(node: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node, host)
}

/// Put the Service and its EndpointSlice of `m` into the fake API server (as the API server and
/// the endpoint controller would).
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

/// Wait until node1's maps give FRONTEND exactly `want` ("addr:port"), or it is absent (None).
fn wait_node1(pin: &Path, want: Option<&[Ipv4Addr]>) {
    let want: Option<Vec<String>> = want.map(|w| {
        let mut v: Vec<String> = w.iter().map(|ip| format!("{ip}:9376")).collect();
        v.sort();
        v
    });
    let ok = wait_until(CONVERGE, Duration::from_millis(20), || {
        let Ok(svcs) = inspect_services(pin) else {
            return false;
        };
        match (&want, find_frontend(&svcs, FRONTEND)) {
            (Some(w), Some(f)) => &f.backend_addrs() == w,
            (None, None) => true,
            _ => false,
        }
    });
    assert!(
        ok,
        "{FRONTEND} never became {want:?}: {:#?}",
        inspect_services(pin)
    );
}

#[test]
#[ignore = "needs root"]
fn agent_follows_the_api_server_through_relists_and_restarts() {
    let mut env = Env::new();
    for (node, host, name) in [(1, 10, "kb-a"), (2, 10, "kb-b"), (1, 11, "kb-c")] {
        env.add_pod(node, name, pod_ip(node, host), &[9376], &[]);
    }
    env.add_pod(1, "kb-client", pod_ip(1, 100), &[], &[]);
    let node1 = env.cluster.node(1);

    // The API server listens on node1's loopback, where its agent runs.
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
    let kubeconfig = env.dir.0.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let mut node = Node::default();
    node.metadata.name = Some("node1".into());
    api.upsert(&node).unwrap();

    let ep = |host_node: u8, host: u8, name: &str| {
        Endpoint::ready(pod_ip(host_node, host), &format!("node{host_node}"), name)
    };
    let mut svc = SvcManifest {
        name: "kb-hostnames".into(),
        cluster_ip: VIP,
        ports: vec![SvcPort::tcp("default", 80, 9376)],
        endpoints: vec![ep(1, 10, "kb-a"), ep(2, 10, "kb-b")],
    };
    publish(&api, &svc);

    let pin = node1.pin_path();
    let mut spec = AgentSpec::new(
        &node1.ns,
        &PathBuf::new(),
        &pin,
        &env.dir.0.join("agent-kube.log"),
    );
    spec.extra_args = [
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--node-name",
        "node1",
        "--service-cidr",
        "10.96.0.0/12",
    ]
    .into_iter()
    .chain(MAP_SIZE_ARGS)
    .map(String::from)
    .collect();
    let agent = Agent::start(spec).expect("agent with the Kubernetes source");
    let client = env.pod("kb-client");
    let target = SocketAddr::from((VIP, 80));

    // 1. Created through the API: both pods answer.
    wait_node1(&pin, Some(&[pod_ip(1, 10), pod_ip(2, 10)]));
    let hits = tally_tcp(client, target, 20);
    assert!(
        hits.contains_key("kb-a") && hits.contains_key("kb-b"),
        "{hits:?}"
    );

    // 2. Scale up: the new pod is used.
    svc.endpoints.push(ep(1, 11, "kb-c"));
    publish(&api, &svc);
    wait_node1(&pin, Some(&[pod_ip(1, 10), pod_ip(1, 11), pod_ip(2, 10)]));
    assert!(tally_tcp(client, target, 30).contains_key("kb-c"));

    // 3. One endpoint not ready: never hit again.
    svc.endpoints[0].ready = false;
    publish(&api, &svc);
    wait_node1(&pin, Some(&[pod_ip(1, 11), pod_ip(2, 10)]));
    let hits = tally_tcp(client, target, 30);
    assert!(
        !hits.contains_key("kb-a"),
        "not-ready pod was used: {hits:?}"
    );

    // 4. 410 Gone: history compacted and watches dropped, so the agent must relist; a change made
    //    meanwhile is picked up by the relist.
    api.compact();
    svc.endpoints[0].ready = true;
    publish(&api, &svc);
    api.compact();
    api.drop_watches();
    wait_node1(&pin, Some(&[pod_ip(1, 10), pod_ip(1, 11), pod_ip(2, 10)]));

    // 5. API server restarted mid-stream, with a change while it was down. Traffic keeps flowing
    //    on the last state in between.
    rt.block_on(api.stop());
    svc.endpoints.retain(|e| e.pod != "kb-b");
    publish(&api, &svc);
    let hits = tally_tcp(client, target, 10);
    assert_eq!(
        hits.values().sum::<usize>(),
        10,
        "traffic must keep working while the API is down: {hits:?}"
    );
    node1
        .ns
        .run(|| {
            let _g = rt.enter();
            api.start()
        })
        .unwrap()
        .expect("restart the API server in node1");
    wait_node1(&pin, Some(&[pod_ip(1, 10), pod_ip(1, 11)]));

    // 6. Service deleted: its frontend is gone and, the ClusterIP being in --service-cidr,
    //    connecting is refused (a RST), not left to time out.
    api.delete(Kind::Service, "default", "kb-hostnames");
    wait_node1(&pin, None);
    let err = client
        .tcp_request(target)
        .expect_err("deleted Service must not answer");
    assert!(
        matches!(err, ClientError::Refused),
        "expected a refusal, got {err:?}"
    );
    assert!(agent.log().contains("agent ready"));
}
