//! The test bed of the datapath measurements: a two-node netns cluster (lb-testkit) with a client
//! pod and four backend pods on node1 and three backend pods on node2, all serving
//! [`crate::traffic::servers`] on routed veths, so every packet crosses the node namespace where
//! xlb's programs or the netfilter rules sit, and lb-testkit's external client on the fabric.
//! Only node1 is measured (its rules, its agent): ClusterIP traffic from the client pod, and
//! NodePort traffic from the external client to node1's address, answered by a pod on node1 (a
//! local backend) or on node2 (a remote backend: node1 must SNAT so the answer comes back
//! through it). node2 only routes. xlb's agent runs through lb-testkit's handle, as in the
//! end-to-end tests.
//!
//! Each mode gets a fresh bed, so no state of one mode (conntrack registered by an iptables
//! table, leftover maps) can colour the next.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use lb_testkit::{Agent, AgentSpec, Cluster, NetNs, Pod, SocketLb};

use crate::rules::{ExternalSpec, ExtraPort, SetSpec, NODE};
use crate::traffic::{GREET_PORT, SINK_PORT};

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
/// Backends 10.244.1.10 ..= .13: the probed Service uses the first three, endpoint changes swap
/// the third for the fourth. The local NodePort Service uses the first three too.
const BACKENDS: u8 = 4;
/// Backends 10.244.2.10 ..= .12 on node2: the remote NodePort Service.
const REMOTE_BACKENDS: u8 = 3;
/// nodePort of the Service backed by node1's pods.
pub const LOCAL_NODE_PORT: u16 = 30080;
/// nodePort of the Service backed by node2's pods.
pub const REMOTE_NODE_PORT: u16 = 30081;

/// Where the backend of an external (NodePort) connection runs, seen from the node it enters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Local,
    Remote,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Backend::Local, Backend::Remote];
    pub fn label(self) -> &'static str {
        match self {
            Backend::Local => "local",
            Backend::Remote => "remote",
        }
    }
}

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
    /// Pods on node2.
    pub remote_backends: Vec<Pod>,
    pub cluster: Cluster,
    scratch: tempfile::TempDir,
}

impl Bed {
    pub fn new() -> anyhow::Result<Self> {
        let cluster = Cluster::new(&unique_prefix(), 2).context("creating the netns cluster")?;
        let client = cluster.add_pod(1, "client", CLIENT_IP)?;
        let serve = |node: u8, name: String, ip: Ipv4Addr| -> anyhow::Result<Pod> {
            let pod = cluster.add_pod(node, &name, ip)?;
            pod.serve_with(&crate::traffic::servers())
                .with_context(|| format!("serving in {}", pod.name))?;
            Ok(pod)
        };
        let backends = (0..BACKENDS)
            .map(|k| serve(1, format!("be{k}"), Ipv4Addr::new(10, 244, 1, 10 + k)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let remote_backends = (0..REMOTE_BACKENDS)
            .map(|k| serve(2, format!("rbe{k}"), Ipv4Addr::new(10, 244, 2, 10 + k)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // The external client reaches the pods directly (the no-translation baseline of the
        // external rows) through node1, the node its NodePort connections enter: the same first
        // hop. node1 must not tell it about the shorter way to node2's pods (ICMP redirect).
        let node1 = cluster.node(1);
        cluster.external.ip(&[
            "route",
            "add",
            "10.244.0.0/16",
            "via",
            &node1.ip.to_string(),
        ])?;
        for key in [
            "net.ipv4.conf.all.send_redirects",
            "net.ipv4.conf.default.send_redirects",
            "net.ipv4.conf.eth0.send_redirects",
        ] {
            node1.ns.sysctl(key, "0")?;
        }
        let scratch = tempfile::Builder::new().prefix("xlb-bench-").tempdir()?;
        Ok(Bed {
            client,
            backends,
            remote_backends,
            cluster,
            scratch,
        })
    }

    /// The external client (outside the cluster, on the fabric).
    pub fn external(&self) -> &NetNs {
        &self.cluster.external
    }

    pub fn node(&self) -> &NetNs {
        &self.cluster.node(1).ns
    }

    pub fn scratch(&self) -> &Path {
        self.scratch.path()
    }

    /// The Service set of `n` Services whose last one is backed by the first three pods, with
    /// the two NodePort Services before it (local: the same three pods; remote: node2's pods).
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
            external: Some(ExternalSpec {
                local_node_port: LOCAL_NODE_PORT,
                local_endpoints: self.backends[..3].iter().map(|p| p.ip).collect(),
                remote_node_port: REMOTE_NODE_PORT,
                remote_endpoints: self.remote_backends.iter().map(|p| p.ip).collect(),
            }),
        }
    }

    /// Greeting address of backend `k` (the no-translation baseline).
    pub fn direct(&self, k: usize) -> SocketAddr {
        SocketAddrV4::new(self.backends[k].ip, GREET_PORT).into()
    }

    /// The pods behind the NodePort Service of `backend`.
    pub fn external_pods(&self, backend: Backend) -> &[Pod] {
        match backend {
            Backend::Local => &self.backends[..3],
            Backend::Remote => &self.remote_backends,
        }
    }

    /// The NodePort of `backend`'s Service on node1's address.
    pub fn nodeport(&self, backend: Backend) -> SocketAddr {
        let port = match backend {
            Backend::Local => LOCAL_NODE_PORT,
            Backend::Remote => REMOTE_NODE_PORT,
        };
        SocketAddrV4::new(self.cluster.node(1).ip, port).into()
    }

    /// Greeting address of the first pod behind `backend`'s NodePort Service (the external
    /// no-translation baseline).
    pub fn direct_external(&self, backend: Backend) -> SocketAddr {
        SocketAddrV4::new(self.external_pods(backend)[0].ip, GREET_PORT).into()
    }

    /// Start xlb's agent on node1 with `manifests`, from_net on its uplink in `xdp_mode`
    /// (`--xdp-mode` value), and wait (up to `timeout`) until it is ready; its
    /// [`Agent::ready_after`] is the time from spawn to ready.
    ///
    /// Connections closed with RST stay in conntrack for `--ct-timeout-tcp-close` (10 s by
    /// default); the benchmark makes that 1 s, as it does for netfilter's conntrack
    /// (`nf_conntrack_tcp_timeout_close`), so both keep the same window of closed flows.
    pub fn start_agent(
        &self,
        manifests: &Path,
        timeout: Duration,
        xdp_mode: &str,
    ) -> anyhow::Result<Agent> {
        self.start_agent_socklb(manifests, timeout, xdp_mode, SocketLb::Off)
    }

    /// [`Bed::start_agent`] with socket load balancing `socket_lb` (`--socket-lb`,
    /// `--cgroup-path`; [`SocketLb::Off`] for every other row).
    pub fn start_agent_socklb(
        &self,
        manifests: &Path,
        timeout: Duration,
        xdp_mode: &str,
        socket_lb: SocketLb,
    ) -> anyhow::Result<Agent> {
        let node = self.cluster.node(1);
        let args = [
            "--node-name",
            NODE,
            "--devices",
            "eth0",
            "--xdp-mode",
            xdp_mode,
            "--ct-timeout-tcp-close",
            "1",
            // As deploy/daemonset.yaml runs it: every `rules::cluster_ip` is in this range.
            "--service-cidr",
            crate::rules::SERVICE_CIDR,
        ];
        start_agent_spec(
            &node.ns,
            manifests,
            &node.pin_path(),
            &self.scratch().join("agent.log"),
            timeout,
            &args.map(String::from),
            socket_lb,
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

/// Start `xlb agent --manifests DIR [extra]` in `netns` as the benchmark measures it (info
/// logging, metrics off) and wait up to `timeout` until it is ready. Ctrl-C abandons the wait.
pub fn start_agent(
    netns: &NetNs,
    manifests: &Path,
    pin: &Path,
    log: &Path,
    timeout: Duration,
    extra: &[String],
) -> anyhow::Result<Agent> {
    start_agent_spec(netns, manifests, pin, log, timeout, extra, SocketLb::Off)
}

/// [`start_agent`] with `--socket-lb` / `--cgroup-path` from `socket_lb`.
fn start_agent_spec(
    netns: &NetNs,
    manifests: &Path,
    pin: &Path,
    log: &Path,
    timeout: Duration,
    extra: &[String],
    socket_lb: SocketLb,
) -> anyhow::Result<Agent> {
    let mut spec = AgentSpec::new(netns, manifests, pin, log);
    spec.extra_args = extra.to_vec();
    spec.socket_lb = socket_lb;
    spec.ready_timeout = timeout;
    spec.log_filter = Some("info".into());
    spec.abandon = Some(crate::interrupt::interrupted);
    let agent = Agent::start(spec);
    crate::interrupt::check()?;
    Ok(agent?)
}
