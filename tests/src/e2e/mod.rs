//! Scaffolding of the end-to-end tests (tests/tests/e2e.rs): one [`Env`] per test, with its own
//! name prefix, a 2-node netns cluster, a manifests directory, pods and one `xlb agent` per node.
//! Dropping it stops the agents (`xlb cleanup`), deletes pods and namespaces and the directory,
//! also when the test panics (the agent logs are printed then).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use lb_testkit::agent::{find_frontend, inspect_services};
use lb_testkit::manifests::{self, SvcManifest};
use lb_testkit::{unique_prefix, wait_until, Agent, AgentSpec, Cluster, InspectService, Pod};

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

/// True when running as root; otherwise the test prints why it is skipped.
pub fn root_or_skip() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the netns end-to-end tests need root (run `cargo xtask test`)");
        return false;
    }
    true
}

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
    pub fn with_examples(&mut self) -> Vec<manifests::ExampleService> {
        manifests::copy_dir(&manifests::examples_dir(), &self.manifests).expect("copying examples");
        let services = manifests::load_examples(&self.manifests).expect("reading examples");
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

    /// Start one agent per node and wait until each is ready.
    pub fn start_agents(&mut self) {
        for node in &self.cluster.nodes {
            let log = self.dir.0.join(format!("{}.log", node.name));
            let mut spec = AgentSpec::new(&node.ns, &self.manifests, &node.pin_path(), &log);
            spec.extra_args = MAP_SIZE_ARGS.iter().map(|s| s.to_string()).collect();
            let agent =
                Agent::start(spec).unwrap_or_else(|e| panic!("agent on {}: {e}", node.name));
            self.agents.push(agent);
        }
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

    /// Wait until `frontend` is present on every node (whatever its backends).
    pub fn wait_frontend(&self, frontend: &str) {
        let ok = wait_until(CONVERGE, POLL, || {
            self.cluster.nodes.iter().all(|n| {
                inspect_services(&n.pin_path()).is_ok_and(|s| find_frontend(&s, frontend).is_some())
            })
        });
        assert!(
            ok,
            "{frontend} never appeared; node1: {:#?}",
            inspect_services(&self.pin(1))
        );
    }
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
pub fn example_file(env: &Env, svc: &manifests::ExampleService) -> PathBuf {
    env.manifests
        .join(Path::new(svc.file.file_name().expect("example file name")))
}
