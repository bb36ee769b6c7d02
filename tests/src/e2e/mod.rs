//! Scaffolding of the end-to-end tests (tests/tests/e2e.rs): one [`Env`] per test, with its own
//! name prefix, a 2-node netns cluster, a manifests directory, pods and one `xlb agent` per node.
//! Dropping it stops the agents (`xlb cleanup`), deletes pods and namespaces and the directory,
//! also when the test panics (the agent logs are printed then).
//!
//! The tests need root (namespaces, BPF): each is `#[ignore = "needs root"]`, so a plain
//! `cargo test` lists them as ignored; `cargo xtask test` runs them with `--include-ignored`.
//! Nothing here sleeps to let something happen: a test waits for the event itself (a log line
//! of the agent, the maps' state through `xlb inspect -o json`), and the deadlines of those
//! waits only bound a failure.

pub mod external;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use lb_testkit::agent::{find_frontend, inspect_services};
use lb_testkit::service_yaml::{self, SvcManifest};
use lb_testkit::{
    inspect_conntrack, unique_prefix, wait_until, Agent, AgentSpec, ClientError, Close, Cluster,
    Dial, InspectCt, InspectService, NetNs, Node, Pod,
};

/// How long the datapath may take to reflect a manifest change.
pub const CONVERGE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);

/// Small maps: tests need a handful of entries and load faster without 262k-entry maps.
pub const MAP_SIZE_ARGS: [&str; 6] = [
    "--services-map-size",
    "4096",
    "--backends-map-size",
    "4096",
    "--conntrack-map-size",
    "16384",
];

/// Removes a directory on drop.
#[derive(Debug)]
pub struct DirGuard(pub PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One test's world. Field order is drop order: agents, pods, cluster, files.
pub struct Env {
    pub agents: Vec<Agent>,
    pods: BTreeMap<String, Pod>,
    pub cluster: Cluster,
    pub manifests: PathBuf,
    /// Scratch directory of this test (logs, manifests), removed on drop.
    pub dir: DirGuard,
}

impl Env {
    /// A 2-node cluster with an empty manifests directory and no agents yet.
    // Not `Default`: it creates namespaces and needs root.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        let prefix = unique_prefix();
        let dir = DirGuard(std::env::temp_dir().join(prefix.trim_end_matches('-')));
        let manifests = dir.0.join("manifests");
        std::fs::create_dir_all(&manifests).expect("creating the manifests directory");
        let cluster = Cluster::new(&prefix, 2).expect("creating the netns cluster");
        Env {
            agents: Vec::new(),
            pods: BTreeMap::new(),
            cluster,
            manifests,
            dir,
        }
    }

    /// Copy the repository's examples/ into the manifests directory and create (and serve) the
    /// pods their EndpointSlices name.
    pub fn with_examples(&mut self) -> Vec<service_yaml::ExampleService> {
        service_yaml::copy_dir(&service_yaml::examples_dir(), &self.manifests)
            .expect("copying examples");
        let services = service_yaml::load_examples(&self.manifests).expect("reading examples");
        for s in &services {
            for p in &s.pods {
                self.add_pod(p.node, &p.name, p.ip, &p.tcp_ports, &p.udp_ports);
            }
        }
        services
    }

    /// Add a pod on node `k` serving serve-hostname on the given ports (none: a client).
    pub fn add_pod(&mut self, k: u8, name: &str, ip: Ipv4Addr, tcp: &[u16], udp: &[u16]) -> &Pod {
        let pod = self
            .cluster
            .add_pod(k, name, ip)
            .unwrap_or_else(|e| panic!("adding pod {name}: {e}"));
        if !tcp.is_empty() || !udp.is_empty() {
            pod.serve(tcp, udp)
                .unwrap_or_else(|e| panic!("serving in {name}: {e}"));
        }
        self.pods.insert(name.to_string(), pod);
        &self.pods[name]
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .get(name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Write (or replace) a Service manifest.
    pub fn write(&self, svc: &SvcManifest) -> PathBuf {
        svc.write_to(&self.manifests).expect("writing manifest")
    }

    /// Add a client pod (no server) on node `k` whose ephemeral ports are
    /// [`CLIENT_EPHEMERAL_PORTS`], so they never collide with ports a test binds explicitly
    /// below 50000 (e.g. [`REUSED_PORTS`]).
    pub fn add_client(&mut self, k: u8, name: &str, ip: Ipv4Addr) -> &Pod {
        let pod = self.add_pod(k, name, ip, &[], &[]);
        pod.ns
            .sysctl("net.ipv4.ip_local_port_range", CLIENT_EPHEMERAL_PORTS)
            .unwrap_or_else(|e| panic!("ephemeral ports of {name}: {e}"));
        pod
    }

    /// Delete the manifest file of Service `name` (as `kubectl delete` would the Service and
    /// its EndpointSlice).
    pub fn delete(&self, name: &str) {
        let path = self.manifests.join(format!("{name}.yaml"));
        std::fs::remove_file(&path).unwrap_or_else(|e| panic!("deleting {}: {e}", path.display()));
    }

    /// Start one agent per node and wait until each is ready.
    pub fn start_agents(&mut self) {
        self.start_agents_with(|_| {});
    }

    /// [`Env::start_agents`], with `configure` applied to each node's spec (after the defaults).
    pub fn start_agents_with(&mut self, configure: impl Fn(&mut AgentSpec)) {
        self.start_agents_per_node(|_, spec| configure(spec));
    }

    /// [`Env::start_agents`], with `configure` applied to each node's spec (after the
    /// defaults), knowing the node (e.g. for `--node-name`).
    pub fn start_agents_per_node(&mut self, configure: impl Fn(&Node, &mut AgentSpec)) {
        for node in &self.cluster.nodes {
            let log = self.dir.0.join(format!("{}.log", node.name));
            let mut spec = AgentSpec::new(&node.ns, &self.manifests, &node.pin_path(), &log);
            spec.extra_args = MAP_SIZE_ARGS.iter().map(|s| s.to_string()).collect();
            configure(node, &mut spec);
            let agent =
                Agent::start(spec).unwrap_or_else(|e| panic!("agent on {}: {e}", node.name));
            self.agents.push(agent);
        }
    }

    /// Wait until the agent of `pod`'s node logged that it attached the programs to the pod's
    /// veth (it scans for new devices every 250 ms).
    pub fn wait_programs_attached(&mut self, pod: &str) {
        let pod = self.pods.get(pod).unwrap_or_else(|| panic!("no pod {pod}"));
        let device = format!("device={}", pod.host_veth);
        let agent = self
            .agents
            .get_mut(usize::from(pod.node) - 1)
            .unwrap_or_else(|| panic!("no agent on node{}", pod.node));
        agent
            .wait_log(CONVERGE, |l| {
                l.contains("programs attached") && l.split_whitespace().any(|w| w == device)
            })
            .unwrap_or_else(|e| panic!("{} never got the programs: {e}", pod.host_veth));
    }

    pub fn pin(&self, k: u8) -> PathBuf {
        self.cluster.node(k).pin_path()
    }

    /// `xlb inspect services` of node `k`.
    pub fn inspect(&self, k: u8) -> Vec<InspectService> {
        inspect_services(&self.pin(k)).unwrap_or_else(|e| panic!("inspect on node{k}: {e}"))
    }

    /// Wait until, on every node, `frontend` ("addr:port/PROTO") has exactly the backends
    /// `expected` ("addr:port"). Panics with the last inspect output otherwise.
    pub fn wait_backends(&self, frontend: &str, expected: &[&str]) {
        let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
        want.sort();
        let ok = wait_until(CONVERGE, POLL, || {
            self.cluster.nodes.iter().all(|n| {
                inspect_services(&n.pin_path()).is_ok_and(|s| {
                    find_frontend(&s, frontend).is_some_and(|f| f.backend_addrs() == want)
                })
            })
        });
        assert!(
            ok,
            "{frontend} never had backends {want:?}; node1: {:#?}",
            inspect_services(&self.pin(1))
        );
    }

    /// Wait until `frontend` is gone from every node.
    pub fn wait_no_frontend(&self, frontend: &str) {
        self.wait_presence(frontend, false);
    }

    /// `xlb inspect conntrack` of node `k`.
    pub fn conntrack(&self, k: u8) -> Vec<InspectCt> {
        inspect_conntrack(&self.pin(k))
            .unwrap_or_else(|e| panic!("inspect conntrack on node{k}: {e}"))
    }

    /// The conntrack entries of every node that involve `addr` (as source or destination).
    pub fn conntrack_of(&self, addr: Ipv4Addr) -> Vec<(u8, InspectCt)> {
        self.cluster
            .nodes
            .iter()
            .flat_map(|n| {
                self.conntrack(n.index)
                    .into_iter()
                    .filter(|e| e.involves(addr))
                    .map(move |e| (n.index, e))
            })
            .collect()
    }

    /// Wait until `frontend` is present on every node (whatever its backends).
    pub fn wait_frontend(&self, frontend: &str) {
        self.wait_presence(frontend, true);
    }

    fn wait_presence(&self, frontend: &str, present: bool) {
        let ok = wait_until(CONVERGE, POLL, || {
            self.cluster.nodes.iter().all(|n| {
                inspect_services(&n.pin_path())
                    .is_ok_and(|s| find_frontend(&s, frontend).is_some() == present)
            })
        });
        assert!(
            ok,
            "{frontend} never {}; node1: {:#?}",
            if present { "appeared" } else { "went away" },
            inspect_services(&self.pin(1))
        );
    }
}

/// Ephemeral ports of client pods made by [`Env::add_client`].
pub const CLIENT_EPHEMERAL_PORTS: &str = "50000 60999";
/// The small range of source ports the tuple-reuse tests bind explicitly: every port is used
/// many times, for Service and direct connections alike.
pub const REUSED_PORTS: std::ops::Range<u16> = 40000..40100;
/// Connect and read timeout of burst connections: a lost SYN is retransmitted after 1 s and
/// still makes it; a connection whose SYN-ACK is rewritten (or dropped) fails.
pub const BURST_TIMEOUT: Duration = Duration::from_secs(2);
/// A burst stops after this many failed connections (each may cost [`BURST_TIMEOUT`]).
pub const BURST_MAX_ERRORS: usize = 10;

/// The `k`-th port of [`REUSED_PORTS`], cycling.
pub fn reused_port(k: usize) -> u16 {
    let n = usize::from(REUSED_PORTS.end - REUSED_PORTS.start);
    REUSED_PORTS.start + (k % n) as u16
}

/// `n` dials, the `k`-th from [`reused_port`]`(k)` to `dst(k)`, closed as `close(k)`.
pub fn reused_port_dials(
    n: usize,
    dst: impl Fn(usize) -> SocketAddr,
    close: impl Fn(usize) -> Close,
) -> Vec<Dial> {
    (0..n)
        .map(|k| Dial {
            src_port: Some(reused_port(k)),
            dst: dst(k),
            close: close(k),
        })
        .collect()
}

/// Closing alternates per round of [`REUSED_PORTS`]: a RST round, then a round the server
/// closes first. Both leave the client's 4-tuple free at once, so the next round re-uses it.
pub fn rst_or_server_fin(k: usize) -> Close {
    let n = usize::from(REUSED_PORTS.end - REUSED_PORTS.start);
    if (k / n).is_multiple_of(2) {
        Close::Rst
    } else {
        Close::ServerFin
    }
}

/// Run `dials` from `client` and assert every one was answered and `ok(k, answer)` holds for
/// each. Returns the answers per pod. Panics with a summary (failures by kind, the first ones,
/// the tally) otherwise.
pub fn assert_burst(
    what: &str,
    client: &Pod,
    dials: &[Dial],
    ok: impl Fn(usize, &str) -> bool,
) -> BTreeMap<String, usize> {
    assert_burst_in(what, &client.ns, dials, ok)
}

/// [`assert_burst`] from any namespace (e.g. an external client's).
pub fn assert_burst_in(
    what: &str,
    client: &NetNs,
    dials: &[Dial],
    ok: impl Fn(usize, &str) -> bool,
) -> BTreeMap<String, usize> {
    let results = lb_testkit::client::tcp_burst(client, dials, BURST_TIMEOUT, BURST_MAX_ERRORS)
        .unwrap_or_else(|e| panic!("{what}: burst from {}: {e}", client.name()));
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    let mut first = Vec::new();
    for (k, (d, r)) in dials.iter().zip(&results).enumerate() {
        let bad = match r {
            Ok(who) => {
                *tally.entry(who.clone()).or_default() += 1;
                (!ok(k, who)).then(|| format!("answered by {who}"))
            }
            Err(e) => Some(format!("error: {e}")),
        };
        if let Some(bad) = bad {
            let kind = match r {
                Ok(_) => "wrong pod".to_string(),
                Err(e) => error_kind(e),
            };
            *kinds.entry(kind).or_default() += 1;
            if first.len() < 10 {
                first.push(format!("#{k} :{:?} -> {}: {bad}", d.src_port, d.dst));
            }
        }
    }
    let failed: usize = kinds.values().sum();
    assert!(
        failed == 0 && results.len() == dials.len(),
        "{what}: {failed} of {} connections failed{} ({kinds:?}); first: {first:#?}; answers: {tally:?}",
        results.len(),
        if results.len() < dials.len() {
            format!(" (stopped early, {} planned)", dials.len())
        } else {
            String::new()
        },
    );
    tally
}

fn error_kind(e: &ClientError) -> String {
    match e {
        ClientError::Refused => "refused",
        ClientError::Timeout => "timeout",
        ClientError::Unreachable(_) => "unreachable",
        ClientError::Closed => "closed",
        ClientError::Other(_) => "other",
    }
    .to_string()
}

/// `n` TCP requests from `client` to `target`: answers per pod name (errors as "<error: ...>").
pub fn tally_tcp(client: &Pod, target: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    tally(n, || client.tcp_request(target))
}

/// `n` UDP requests (each from a new socket, so a new flow) from `client` to `target`.
pub fn tally_udp(client: &Pod, target: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    tally(n, || client.udp_request(target))
}

fn tally(
    n: usize,
    mut req: impl FnMut() -> Result<String, lb_testkit::ClientError>,
) -> BTreeMap<String, usize> {
    let mut hits = BTreeMap::new();
    for _ in 0..n {
        let who = req().unwrap_or_else(|e| format!("<error: {e}>"));
        *hits.entry(who).or_default() += 1;
    }
    hits
}

/// "a.b.c.d:port".
pub fn hostport(ip: Ipv4Addr, port: u16) -> String {
    format!("{ip}:{port}")
}

/// The manifests file of an example Service.
pub fn example_file(env: &Env, svc: &service_yaml::ExampleService) -> PathBuf {
    env.manifests
        .join(Path::new(svc.file.file_name().expect("example file name")))
}
