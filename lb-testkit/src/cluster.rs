//! The netns test cluster: a fabric bridge, node namespaces with routed (Calico-style) pods, and
//! an external client.
//!
//! ```text
//!   fabric netns: bridge br0 (172.31.0.1/24, the nodes' default gateway)
//!      |- n1 <-> node1 netns eth0 172.31.0.11/24, pod CIDR 10.244.1.0/24
//!      |- n2 <-> node2 netns eth0 172.31.0.12/24, pod CIDR 10.244.2.0/24
//!      |- ext <-> external client netns eth0 172.31.0.200/24 (`Cluster::external`)
//!      `- xNNN <-> more external clients 172.31.0.NNN/24 (`Cluster::add_external`)
//!   pod netns: eth0 POD_IP/32, default via 169.254.1.1 <-> node netns "xpN" (169.254.1.1/32,
//!      route POD_IP/32 dev xpN): Calico-style routed veths, so traffic crosses the host veth
//!      where the agent attaches from_pod / to_pod.
//! ```
//!
//! Every namespace name starts with the cluster's prefix, so concurrent clusters never collide
//! and [`crate::cleanup_stale`] finds leftovers of crashed runs.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use crate::client::{self, ClientError, Dial, TcpConn, UdpConn};
use crate::error::{Error, Result};
use crate::netns::NetNs;
use crate::server::{ServeHostname, ServeSpec};

/// Address of the fabric bridge: the nodes' default gateway.
pub const FABRIC_GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 1);
/// Address of the external client (outside the cluster, on the fabric).
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 200);
/// The gateway address every pod uses; each host veth holds it (Calico practice).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// Where bpffs is mounted; each cluster pins under `BPFFS/<prefix>/<node>`.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Uplink address of node `k` (1-based): 172.31.0.1k.
pub fn node_ip(k: u8) -> Ipv4Addr {
    Ipv4Addr::new(172, 31, 0, 10 + k)
}

/// A node: a network namespace with an uplink to the fabric and routes to the other nodes' pods.
#[derive(Debug)]
pub struct Node {
    pub index: u8,
    pub name: String,
    pub ip: Ipv4Addr,
    pub ns: NetNs,
    pin_path: PathBuf,
}

impl Node {
    /// The pod CIDR of this node: 10.244.K.0/24.
    pub fn pod_cidr(&self) -> String {
        format!("10.244.{}.0/24", self.index)
    }
    /// Where this node's agent pins its maps and links.
    pub fn pin_path(&self) -> PathBuf {
        self.pin_path.clone()
    }
}

/// A pod: a network namespace behind a routed veth on its node. Dropping it stops its server and
/// deletes the namespace (which removes the veth pair and the node's route to it).
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub node: u8,
    /// Name of the host side of the veth, in the node's namespace.
    pub host_veth: String,
    node_netns: String,
    server: Mutex<Option<ServeHostname>>,
    // Declared last: dropped after the server, whose sockets would otherwise keep it alive.
    pub ns: NetNs,
}

impl Pod {
    /// Start serve-hostname in this pod (replacing a running one).
    pub fn serve(&self, tcp_ports: &[u16], udp_ports: &[u16]) -> Result<()> {
        self.serve_with(&ServeSpec::hostname(tcp_ports, udp_ports))
    }
    /// Start a server as `spec` says in this pod (replacing a running one).
    pub fn serve_with(&self, spec: &ServeSpec) -> Result<()> {
        // The old server goes first: the new one binds the same ports.
        self.stop_serving();
        let server = ServeHostname::start_with(&self.ns, &self.name, spec)?;
        *self.server.lock().unwrap() = Some(server);
        Ok(())
    }
    /// Stop this pod's server (connections are closed).
    pub fn stop_serving(&self) {
        self.server.lock().unwrap().take();
    }
    /// Source addresses of every connection / datagram the server received.
    pub fn peers(&self) -> Vec<std::net::SocketAddr> {
        self.server
            .lock()
            .unwrap()
            .as_ref()
            .map(|s| s.peers())
            .unwrap_or_default()
    }
    /// One TCP request from this pod: the first line the server sends.
    pub fn tcp_request(
        &self,
        addr: impl Into<std::net::SocketAddr>,
    ) -> Result<String, ClientError> {
        client::tcp_request(&self.ns, addr.into())
    }
    /// One UDP request from this pod (connected socket).
    pub fn udp_request(
        &self,
        addr: impl Into<std::net::SocketAddr>,
    ) -> Result<String, ClientError> {
        client::udp_request(&self.ns, addr.into())
    }
    /// A long-lived TCP connection from this pod.
    pub fn tcp_connect(
        &self,
        addr: impl Into<std::net::SocketAddr>,
    ) -> Result<TcpConn, ClientError> {
        TcpConn::open(&self.ns, addr.into())
    }
    /// A UDP flow from this pod: a socket bound to `src_port` (None: any) connected to `addr`.
    pub fn udp_conn(
        &self,
        src_port: Option<u16>,
        addr: impl Into<std::net::SocketAddr>,
    ) -> Result<UdpConn, ClientError> {
        UdpConn::open(&self.ns, src_port, addr.into())
    }
    /// Short TCP connections one after the other from this pod (see [`client::tcp_burst`]).
    pub fn tcp_burst(
        &self,
        dials: &[Dial],
        timeout: std::time::Duration,
        max_errors: usize,
    ) -> Result<Vec<Result<String, ClientError>>, ClientError> {
        client::tcp_burst(&self.ns, dials, timeout, max_errors)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.stop_serving();
        // Deleting the veth now (rather than with the namespace, which the kernel tears down
        // asynchronously) makes removal visible to the node at once, as a deleted pod's would be.
        let _ = crate::netns::ip(&["-n", &self.node_netns, "link", "del", &self.host_veth]);
    }
}

/// A client outside the cluster: a namespace on the fabric (no agent, no xlb), reaching
/// NodePorts on the node addresses, and LoadBalancer IPs and externalIPs through routes to a
/// node ([`External::route_via`]), as a router in front of the nodes would. Dereferences to its
/// [`NetNs`].
#[derive(Debug)]
pub struct External {
    pub name: String,
    /// Its address on the fabric.
    pub addr: Ipv4Addr,
    pub ns: NetNs,
}

impl std::ops::Deref for External {
    type Target = NetNs;
    fn deref(&self) -> &NetNs {
        &self.ns
    }
}

impl External {
    /// Route `dst`/32 (an address no node holds: a LoadBalancer IP, an externalIP) via node
    /// address `via`, replacing an earlier route for it.
    pub fn route_via(&self, dst: Ipv4Addr, via: Ipv4Addr) -> Result<()> {
        self.ns
            .ip(&[
                "route",
                "replace",
                &format!("{dst}/32"),
                "via",
                &via.to_string(),
            ])
            .map(|_| ())
    }
    /// Restrict the ephemeral ports of this client (`net.ipv4.ip_local_port_range`, "MIN MAX"),
    /// e.g. so they never collide with source ports a test binds explicitly.
    pub fn set_ephemeral_ports(&self, range: &str) -> Result<()> {
        self.ns.sysctl("net.ipv4.ip_local_port_range", range)
    }
    /// One TCP request: the first line the server sends.
    pub fn tcp_request(
        &self,
        addr: impl Into<std::net::SocketAddr>,
    ) -> Result<String, ClientError> {
        client::tcp_request(&self.ns, addr.into())
    }
    /// One UDP request (connected socket, so a port unreachable is [`ClientError::Refused`]).
    pub fn udp_request(
        &self,
        addr: impl Into<std::net::SocketAddr>,
    ) -> Result<String, ClientError> {
        client::udp_request(&self.ns, addr.into())
    }
    /// A long-lived TCP connection.
    pub fn tcp_connect(
        &self,
        addr: impl Into<std::net::SocketAddr>,
    ) -> Result<TcpConn, ClientError> {
        TcpConn::open(&self.ns, addr.into())
    }
    /// A UDP flow: a socket bound to `src_port` (None: any) connected to `addr`.
    pub fn udp_conn(
        &self,
        src_port: Option<u16>,
        addr: impl Into<std::net::SocketAddr>,
    ) -> Result<UdpConn, ClientError> {
        UdpConn::open(&self.ns, src_port, addr.into())
    }
    /// Short TCP connections one after the other (see [`client::tcp_burst`]).
    pub fn tcp_burst(
        &self,
        dials: &[Dial],
        timeout: std::time::Duration,
        max_errors: usize,
    ) -> Result<Vec<Result<String, ClientError>>, ClientError> {
        client::tcp_burst(&self.ns, dials, timeout, max_errors)
    }
}

/// The whole cluster; dropping it removes every namespace it created (pods are owned by the
/// caller and removed when they drop).
#[derive(Debug)]
pub struct Cluster {
    prefix: String,
    next_veth: AtomicU32,
    // Drop order: the external client and nodes before the fabric they are attached to.
    pub external: External,
    pub nodes: Vec<Node>,
    pub fabric: NetNs,
}

impl Cluster {
    /// Build a fabric and `n_nodes` (1..=9) nodes whose namespaces start with `prefix`.
    pub fn new(prefix: &str, n_nodes: u8) -> Result<Self> {
        if !(1..=9).contains(&n_nodes) {
            return Err(Error::Invalid(format!(
                "n_nodes must be 1..=9, got {n_nodes}"
            )));
        }
        let fabric = NetNs::create(&format!("{prefix}fabric"))?;
        fabric.ip(&["link", "add", "br0", "type", "bridge"])?;
        fabric.ip(&["addr", "add", &format!("{FABRIC_GATEWAY}/24"), "dev", "br0"])?;
        fabric.ip(&["link", "set", "br0", "up"])?;

        let mut nodes = Vec::new();
        for k in 1..=n_nodes {
            nodes.push(Self::make_node(prefix, &fabric, k)?);
        }
        for node in &nodes {
            for other in nodes.iter().filter(|o| o.index != node.index) {
                node.ns.ip(&[
                    "route",
                    "add",
                    &other.pod_cidr(),
                    "via",
                    &other.ip.to_string(),
                ])?;
            }
        }
        let ns = NetNs::create(&format!("{prefix}ext"))?;
        attach_uplink(&fabric, "ext", &ns, EXTERNAL_IP)?;
        let external = External {
            name: "ext".into(),
            addr: EXTERNAL_IP,
            ns,
        };
        Ok(Cluster {
            prefix: prefix.to_string(),
            next_veth: AtomicU32::new(0),
            external,
            nodes,
            fabric,
        })
    }

    fn make_node(prefix: &str, fabric: &NetNs, k: u8) -> Result<Node> {
        let name = format!("node{k}");
        let ns = NetNs::create(&format!("{prefix}{name}"))?;
        // Forwarding node; rp_filter off because replies of translated flows arrive on a different
        // interface than the route back to their (rewritten) source would suggest.
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        let ip = node_ip(k);
        attach_uplink(fabric, &format!("n{k}"), &ns, ip)?;
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &FABRIC_GATEWAY.to_string(),
        ])?;
        let pin_path = PathBuf::from(BPFFS)
            .join(prefix.trim_end_matches('-'))
            .join(&name);
        Ok(Node {
            index: k,
            name,
            ip,
            ns,
            pin_path,
        })
    }

    /// Another client outside the cluster, at `addr` (172.31.0.NNN, NNN not a node's or the
    /// gateway's) on the fabric; its namespace is "<prefix>ext-<name>". Removed when dropped.
    pub fn add_external(&self, name: &str, addr: Ipv4Addr) -> Result<External> {
        let [a, b, c, d] = addr.octets();
        let taken = addr == FABRIC_GATEWAY
            || addr == EXTERNAL_IP
            || self.nodes.iter().any(|n| n.ip == addr);
        if [a, b, c] != [172, 31, 0] || taken || d == 0 || d == 255 {
            return Err(Error::Invalid(format!(
                "external address {addr} is not a free 172.31.0.0/24 address"
            )));
        }
        let ns = NetNs::create(&format!("{}ext-{name}", self.prefix))?;
        attach_uplink(&self.fabric, &format!("x{d}"), &ns, addr)?;
        Ok(External {
            name: name.to_string(),
            addr,
            ns,
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Node `k` (1-based).
    pub fn node(&self, k: u8) -> &Node {
        &self.nodes[usize::from(k) - 1]
    }

    /// Directory holding the pin paths of every node of this cluster.
    pub fn pin_root(&self) -> PathBuf {
        PathBuf::from(BPFFS).join(self.prefix.trim_end_matches('-'))
    }

    /// Add a pod `name` with address `ip` on node `k`, routed Calico-style: in the pod,
    /// `POD_IP/32` on eth0 and a default route via 169.254.1.1; on the node, 169.254.1.1 on the
    /// veth (answers ARP) and a /32 route to the pod.
    pub fn add_pod(&self, k: u8, name: &str, ip: Ipv4Addr) -> Result<Pod> {
        let node = self
            .nodes
            .get(usize::from(k).wrapping_sub(1))
            .ok_or_else(|| Error::Invalid(format!("no node {k}")))?;
        let ns = NetNs::create(&format!("{}pod-{name}", self.prefix))?;
        let host_veth = format!("xp{}", self.next_veth.fetch_add(1, Ordering::Relaxed));
        let ns_name = ns.name().to_string();
        node.ns.ip(&[
            "link", "add", &host_veth, "type", "veth", "peer", "name", "eth0", "netns", &ns_name,
        ])?;
        // Pod side.
        ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&[
            "route",
            "add",
            &POD_GATEWAY.to_string(),
            "dev",
            "eth0",
            "scope",
            "link",
        ])?;
        ns.ip(&["route", "add", "default", "via", &POD_GATEWAY.to_string()])?;
        // Node side.
        node.ns.ip(&[
            "addr",
            "add",
            &format!("{POD_GATEWAY}/32"),
            "dev",
            &host_veth,
        ])?;
        node.ns.ip(&["link", "set", &host_veth, "up"])?;
        node.ns
            .ip(&["route", "add", &format!("{ip}/32"), "dev", &host_veth])?;
        Ok(Pod {
            name: name.to_string(),
            ip,
            node: k,
            host_veth,
            node_netns: node.ns.name().to_string(),
            server: Mutex::new(None),
            ns,
        })
    }

    /// Remove a pod now (same as dropping it).
    pub fn remove_pod(&self, pod: Pod) {
        drop(pod);
    }
}

impl Drop for Cluster {
    /// Agents remove their own node directories; this removes the cluster's pin root (and cleans
    /// any node directory an agent handle left behind, e.g. a leaked or never-dropped one).
    fn drop(&mut self) {
        crate::remove_pin_root(&self.pin_root());
    }
}

/// A veth pair: `fabric_side` enslaved to the fabric bridge, "eth0" with `ip`/24 in `ns`.
fn attach_uplink(fabric: &NetNs, fabric_side: &str, ns: &NetNs, ip: Ipv4Addr) -> Result<()> {
    fabric.ip(&[
        "link",
        "add",
        fabric_side,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns.name(),
    ])?;
    fabric.ip(&["link", "set", fabric_side, "master", "br0", "up"])?;
    ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    Ok(())
}
