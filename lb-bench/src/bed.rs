//! The test bed of the datapath measurements: a one-node netns cluster (lb-testkit) with a client
//! pod and four backend pods serving [`crate::traffic::servers`], all on routed veths so every
//! packet crosses the node namespace where xlb's tc programs or the netfilter rules sit. xlb's
//! agent runs through lb-testkit's handle, as in the end-to-end tests.
//!
//! Each mode gets a fresh bed, so no state of one mode (conntrack registered by an iptables
//! table, leftover maps) can colour the next.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use lb_testkit::{Agent, AgentSpec, Cluster, NetNs, Pod};

use crate::rules::{ExtraPort, SetSpec};
use crate::traffic::{GREET_PORT, SINK_PORT};

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
/// Backends 10.244.1.10 ..= .13: the probed Service uses the first three, endpoint changes swap
/// the third for the fourth.
const BACKENDS: u8 = 4;

/// A unique namespace prefix of this process: "xlbb<pid>-<n>-" (found by `cleanup_stale("xlbb")`
/// once the process is gone).
pub fn unique_prefix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}{}-{}-",
        crate::BASE,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub struct Bed {
    // Drop order: pods (with their servers), then the cluster, then the scratch directory.
    pub client: Pod,
    pub backends: Vec<Pod>,
    pub cluster: Cluster,
    scratch: tempfile::TempDir,
}

impl Bed {
    pub fn new() -> anyhow::Result<Self> {
        let cluster = Cluster::new(&unique_prefix(), 1).context("creating the netns cluster")?;
        let client = cluster.add_pod(1, "client", CLIENT_IP)?;
        let mut backends = Vec::new();
        for k in 0..BACKENDS {
            let pod = cluster.add_pod(1, &format!("be{k}"), Ipv4Addr::new(10, 244, 1, 10 + k))?;
            pod.serve_with(&crate::traffic::servers())
                .with_context(|| format!("serving in {}", pod.name))?;
            backends.push(pod);
        }
        let scratch = tempfile::Builder::new().prefix("xlb-bench-").tempdir()?;
        Ok(Bed {
            client,
            backends,
            cluster,
            scratch,
        })
    }

    pub fn node(&self) -> &NetNs {
        &self.cluster.node(1).ns
    }

    pub fn scratch(&self) -> &Path {
        self.scratch.path()
    }

    /// The Service set of `n` Services whose last one is backed by the first three pods.
    pub fn set_spec(&self, n: usize) -> SetSpec {
        SetSpec {
            services: n,
            endpoints_per_service: 3,
            target_port: GREET_PORT,
            probe_endpoints: self.backends[..3].iter().map(|p| p.ip).collect(),
            probe_extra_ports: vec![ExtraPort {
                name: "stream",
                port: SINK_PORT,
            }],
        }
    }

    /// Greeting address of backend `k` (the no-translation baseline).
    pub fn direct(&self, k: usize) -> SocketAddr {
        SocketAddrV4::new(self.backends[k].ip, GREET_PORT).into()
    }

    /// Start xlb's agent on the node with `manifests` and wait (up to `timeout`) until it is
    /// ready; its [`Agent::ready_after`] is the time from spawn to ready.
    pub fn start_agent(&self, manifests: &Path, timeout: Duration) -> anyhow::Result<Agent> {
        let node = self.cluster.node(1);
        start_agent(
            &node.ns,
            manifests,
            &node.pin_path(),
            &self.scratch().join("agent.log"),
            timeout,
        )
    }

    pub fn pin_path(&self) -> PathBuf {
        self.cluster.node(1).pin_path()
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        // Node pin directories are removed by the agents; the cluster's root is ours to remove.
        let _ = std::fs::remove_dir(self.cluster.pin_root());
    }
}

/// Start `xlb agent --manifests DIR` in `netns` as the benchmark measures it (info logging,
/// metrics off) and wait up to `timeout` until it is ready. Ctrl-C abandons the wait.
pub fn start_agent(
    netns: &NetNs,
    manifests: &Path,
    pin: &Path,
    log: &Path,
    timeout: Duration,
) -> anyhow::Result<Agent> {
    let mut spec = AgentSpec::new(netns, manifests, pin, log);
    spec.ready_timeout = timeout;
    spec.log_filter = Some("info".into());
    spec.abandon = Some(crate::interrupt::interrupted);
    let agent = Agent::start(spec);
    crate::interrupt::check()?;
    Ok(agent?)
}
