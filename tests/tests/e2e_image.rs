//! The DaemonSet's image end to end: the agent runs from the image `cargo xtask image` built
//! (`FROM scratch` around the static binary), in node1's network namespace, the way
//! deploy/daemonset.yaml runs it: hostNetwork, the five capabilities and nothing else, a
//! read-only root file system, the host's bpffs at /sys/fs/bpf (HostToContainer) and a cgroup v2
//! directory at /run/xlb/cgroupv2 (read-only) for `--socket-lb host`, `--manifests` from a
//! mounted directory in place of the API server. That proves the image carries everything the
//! agent needs (no loader, no libc, no other program).
//!
//! Shown: a pod's connections and datagrams to a ClusterIP reach both endpoints (tc programs
//! on the pod's veth); a host-network socket in the mounted cgroup reaches it too (cgroup
//! programs, attached through the read-only mount); the DaemonSet's probes (/healthz, /readyz
//! on 127.0.0.1:9477) answer from the container; `xlb inspect` inside the running container
//! (what `kubectl exec ds/xlb -- xlb inspect` does) sees the pins; and when the container
//! stops, the programs and maps stay pinned in the host's bpffs and keep serving, which is why
//! the DaemonSet mounts the host's bpffs rather than a container's own.
//!
//! The image: `$XLB_IMAGE` (`cargo xtask test` builds it first and sets it), else
//! localhost/xlb:latest; run `cargo xtask image` before running this test alone. The cgroup is a
//! test cgroup (lb_testkit::cgroup), not the machine's root. Root only: `#[ignore = "needs root"]`.
//! The container, the pins, the namespaces and the cgroup are removed also when the test fails.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use lb_testkit::agent::{find_frontend, inspect_services, READY_MARKER, READY_TIMEOUT};
use lb_testkit::container::{image_under_test, Container, ContainerSpec, Mount};
use lb_testkit::service_yaml::{Endpoint, SvcManifest, SvcPort};
use lb_testkit::{http_request, serde_json, unique_prefix, wait_until, HostClient, TestCgroup};
use xlb_tests::e2e::{hostport, tally_tcp, tally_udp, Env, CONVERGE, MAP_SIZE_ARGS};

const WEB_PORT: u16 = 8080;
const DNS_PORT: u16 = 5353;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 70);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 100);
/// Requests that must reach both endpoints of the Service (a uniform random choice misses one
/// with probability 2^-23).
const SPREAD: usize = 24;
/// The DaemonSet's metrics and probe address.
const PROBES: &str = "127.0.0.1:9477";
/// Where the DaemonSet mounts the host's cgroup v2 root (here: the test cgroup).
const CGROUP_IN_CONTAINER: &str = "/run/xlb/cgroupv2";
const MANIFESTS_IN_CONTAINER: &str = "/etc/xlb/manifests";
const XLB_IN_IMAGE: &str = "/usr/local/bin/xlb";

/// One test's world. Field order is drop order: the container first (nothing re-pins), then the
/// cluster (its drop runs `xlb cleanup` on the pins the container left), then the cgroup.
struct ImageEnv {
    agent: Option<Container>,
    env: Env,
    cg: TestCgroup,
}

fn pod_ip(node: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node, host)
}

fn mount(host: &Path, container: &str, read_only: bool, host_to_container: bool) -> Mount {
    Mount {
        host: host.to_path_buf(),
        container: container.into(),
        read_only,
        host_to_container,
    }
}

impl ImageEnv {
    /// Two web pods (node1, node2), a client pod on node1, a ClusterIP Service over both pods,
    /// and the agent of node1 started from `image` in a container, ready.
    fn start(image: &str) -> Self {
        let mut env = Env::new();
        let cg = TestCgroup::create(&unique_prefix()).expect("creating the test cgroup");
        env.add_pod(1, "web-1", pod_ip(1, 10), &[WEB_PORT], &[DNS_PORT]);
        env.add_pod(2, "web-2", pod_ip(2, 10), &[WEB_PORT], &[DNS_PORT]);
        env.add_client(1, "client", CLIENT_IP);
        env.write(&SvcManifest {
            name: "web".into(),
            cluster_ip: VIP,
            ports: vec![
                SvcPort::tcp("http", 80, WEB_PORT),
                SvcPort::udp("dns", 53, DNS_PORT),
            ],
            endpoints: vec![
                Endpoint::ready(pod_ip(1, 10), "node1", "web-1"),
                Endpoint::ready(pod_ip(2, 10), "node2", "web-2"),
            ],
        });

        let node = env.cluster.node(1);
        let pin = node.pin_path();
        let mut spec = ContainerSpec::daemonset(
            image,
            &format!("{}agent", env.cluster.prefix()),
            &node.ns.path(),
            &env.dir.0.join("container.log"),
        );
        spec.mounts = vec![
            mount(
                Path::new(lb_testkit::cluster::BPFFS),
                "/sys/fs/bpf",
                false,
                true,
            ),
            mount(cg.path(), CGROUP_IN_CONTAINER, true, false),
            mount(&env.manifests, MANIFESTS_IN_CONTAINER, true, false),
        ];
        let pin = pin.display().to_string();
        spec.args = [
            "agent",
            "--manifests",
            MANIFESTS_IN_CONTAINER,
            "--node-name",
            "node1",
            "--pin-path",
            &pin,
            "--pod-devices",
            "xp*",
            "--metrics-addr",
            PROBES,
            "--socket-lb",
            "host",
            "--cgroup-path",
            CGROUP_IN_CONTAINER,
            "--devices",
            "eth0",
            "--xdp-mode",
            "off",
        ]
        .into_iter()
        .chain(MAP_SIZE_ARGS)
        .map(String::from)
        .collect();
        let mut s = ImageEnv {
            agent: None,
            env,
            cg,
        };
        let agent = s.agent.insert(Container::start(spec).expect("podman run"));
        agent
            .wait_log(READY_TIMEOUT, |l| l.contains(READY_MARKER))
            .unwrap_or_else(|e| panic!("the agent in the image never got ready: {e}"));
        s
    }

    fn agent(&self) -> &Container {
        self.agent.as_ref().expect("the container")
    }

    /// Wait until node1's maps give `frontend` exactly `backends`.
    fn wait_backends(&self, frontend: &str, backends: &[String]) {
        let pin = self.env.pin(1);
        let ok = wait_until(CONVERGE, Duration::from_millis(50), || {
            inspect_services(&pin).is_ok_and(|s| {
                find_frontend(&s, frontend).is_some_and(|f| f.backend_addrs() == backends)
            })
        });
        assert!(
            ok,
            "{frontend} never had {backends:?}: {:#?}",
            inspect_services(&pin)
        );
    }
}

/// Both endpoints answered, and nothing else (no error).
fn assert_both(what: &str, hits: &BTreeMap<String, usize>) {
    let names: Vec<&str> = hits.keys().map(String::as_str).collect();
    assert_eq!(names, ["web-1", "web-2"], "{what}: {hits:?}");
}

#[test]
#[ignore = "needs root"]
fn the_agent_from_the_image_serves_a_cluster_ip_as_the_daemonset_runs_it() {
    let image = image_under_test().unwrap_or_else(|e| panic!("{e}"));
    // The image is the static binary alone: one layer, the binary as the entrypoint.
    let config = lb_testkit::netns::run_cmd(std::process::Command::new("podman").args([
        "image",
        "inspect",
        "--format",
        "{{json .Config.Entrypoint}} {{len .RootFS.Layers}}",
        &image,
    ]))
    .expect("podman image inspect");
    assert_eq!(config.trim(), format!("[\"{XLB_IN_IMAGE}\"] 1"));

    let mut s = ImageEnv::start(&image);
    let tcp_fe = SocketAddr::from((VIP, 80));
    let udp_fe = SocketAddr::from((VIP, 53));
    let web = [
        hostport(pod_ip(1, 10), WEB_PORT),
        hostport(pod_ip(2, 10), WEB_PORT),
    ];
    let dns = [
        hostport(pod_ip(1, 10), DNS_PORT),
        hostport(pod_ip(2, 10), DNS_PORT),
    ];
    s.wait_backends(&format!("{VIP}:80/TCP"), &web);
    s.wait_backends(&format!("{VIP}:53/UDP"), &dns);

    // A pod's flows: the tc programs on its veth, attached by the agent in the container.
    let client = s.env.pod("client");
    assert_both(
        "TCP from the client pod",
        &tally_tcp(client, tcp_fe, SPREAD),
    );
    assert_both(
        "UDP from the client pod",
        &tally_udp(client, udp_fe, SPREAD),
    );
    assert!(
        s.env.conntrack(1).iter().any(|e| e.involves(CLIENT_IP)),
        "the client's flows went through from_pod"
    );

    // A host-network socket in the mounted cgroup: translated at connect time.
    let host = HostClient::new(&s.env.cluster.node(1).ns, &s.cg);
    let a = host
        .tcp_request(tcp_fe)
        .expect("a host-network client through the cgroup programs");
    assert!(a.text.starts_with("web-") && a.peer == tcp_fe, "{a:?}");

    // The DaemonSet's liveness and readiness probes.
    let node1 = s.env.cluster.node(1).ns.name().to_string();
    let probes: SocketAddr = PROBES.parse().unwrap();
    for path in ["/healthz", "/readyz"] {
        let r = http_request(&node1, probes, path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(r.status, 200, "{path}: {r:?}");
    }

    // `kubectl exec ds/xlb -- xlb inspect services`: the CLI in the image reads the pins.
    let pin = s.env.pin(1).display().to_string();
    let out = s
        .agent()
        .exec(&[
            XLB_IN_IMAGE,
            "inspect",
            "services",
            "-o",
            "json",
            "--pin-path",
            &pin,
        ])
        .expect("xlb inspect in the container");
    let services: serde_json::Value = serde_json::from_str(&out).expect("inspect JSON");
    let fe = services
        .as_array()
        .and_then(|a| a.iter().find(|s| s["frontend"] == format!("{VIP}:80/TCP")))
        .unwrap_or_else(|| panic!("no {VIP}:80/TCP in {out}"));
    assert_eq!(fe["count"], 2, "{fe}");

    // The container stops; the programs and maps stay in the host's bpffs and keep serving.
    s.agent
        .as_mut()
        .expect("the container")
        .stop()
        .expect("podman stop");
    let links = s.env.pin(1).join("links");
    let pinned = std::fs::read_dir(&links).map(|d| d.count()).unwrap_or(0);
    assert!(
        pinned > 0,
        "no links pinned under {} after the container stopped",
        links.display()
    );
    let client = s.env.pod("client");
    assert_both(
        "TCP from the client pod with the container stopped",
        &tally_tcp(client, tcp_fe, SPREAD),
    );
}
