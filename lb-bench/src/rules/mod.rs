//! One set of Services, rendered in every shape the benchmark compares: kube-proxy's iptables
//! rules (`iptables-restore` input), kube-proxy's nftables ruleset (`nft -f` input) and the
//! Service + EndpointSlice manifests xlb's agent reads. Same Services, same endpoints, same
//! order, so each mode programs exactly the same thing.
//!
//! Every Service but the last points at made-up endpoint addresses (10.128.0.0/10, never
//! contacted); the last one, the probed one (last in iptables' linear chain, the worst case),
//! points at the real pods. With [`ExternalSpec`], two NodePort Services (externalTrafficPolicy
//! Cluster) come just before the probe: one whose pods run on the node the external client
//! connects to (a local backend), one whose pods run on the other node (a remote backend).

pub mod iptables;
pub mod nft;
pub mod xlb_dir;

use std::net::Ipv4Addr;

/// The Service port every generated Service exposes.
pub const SERVICE_PORT: u16 = 80;
/// Where made-up endpoint addresses start.
const FAKE_ENDPOINT_BASE: u32 = u32::from_be_bytes([10, 128, 0, 0]);
/// Where ClusterIPs start (10.96.0.0/12 is kube's default service CIDR; .0.0 and .0.1 skipped).
/// The Service CIDR the agents run with (`--service-cidr`, as deploy/daemonset.yaml passes
/// it): every [`cluster_ip`] is in it.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
const CLUSTER_IP_BASE: u32 = u32::from_be_bytes([10, 96, 0, 10]);
/// Pod CIDR (kube-proxy's --cluster-cidr): traffic from outside it to a ClusterIP is masqueraded.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The node the made-up endpoints and the ClusterIP probe's pods claim to run on (the node
/// whose rules / agent are measured).
pub const NODE: &str = "node1";
/// The other node (remote backends of the NodePort probe).
pub const OTHER_NODE: &str = "node2";

/// One extra port of the probed Service (e.g. the throughput sink), translated port-for-port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtraPort {
    pub name: &'static str,
    pub port: u16,
}

/// A Service with one or more TCP ports and its ready endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Svc {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    /// (port name, service port, target port).
    pub ports: Vec<(String, u16, u16)>,
    pub endpoints: Vec<Ipv4Addr>,
    /// type NodePort (externalTrafficPolicy Cluster) with this nodePort on its first port.
    pub node_port: Option<u16>,
    /// The node every endpoint runs on (EndpointSlice `nodeName`).
    pub endpoint_node: &'static str,
}

/// The two NodePort Services of a set (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalSpec {
    /// nodePort of the Service backed by pods on [`NODE`].
    pub local_node_port: u16,
    pub local_endpoints: Vec<Ipv4Addr>,
    /// nodePort of the Service backed by pods on [`OTHER_NODE`].
    pub remote_node_port: u16,
    pub remote_endpoints: Vec<Ipv4Addr>,
}

/// N Services in a fixed order; the last one is the probed one.
#[derive(Clone, Debug)]
pub struct ServiceSet {
    pub services: Vec<Svc>,
}

/// How to generate a [`ServiceSet`].
#[derive(Clone, Debug)]
pub struct SetSpec {
    pub services: usize,
    /// Endpoints of each made-up Service.
    pub endpoints_per_service: usize,
    /// Every Service port's target port.
    pub target_port: u16,
    /// The real pods behind the last Service.
    pub probe_endpoints: Vec<Ipv4Addr>,
    pub probe_extra_ports: Vec<ExtraPort>,
    /// The NodePort Services (inserted before the probe, so a set of `services` has
    /// `services + 2` Services).
    pub external: Option<ExternalSpec>,
}

impl ServiceSet {
    pub fn generate(spec: &SetSpec) -> Self {
        let n = spec.services.max(1);
        let mut services = Vec::with_capacity(n + 2);
        for i in 0..n {
            let last = i + 1 == n;
            if last {
                if let Some(ext) = &spec.external {
                    for (k, (role, node_port, eps, node)) in [
                        ("local", ext.local_node_port, &ext.local_endpoints, NODE),
                        (
                            "remote",
                            ext.remote_node_port,
                            &ext.remote_endpoints,
                            OTHER_NODE,
                        ),
                    ]
                    .into_iter()
                    .enumerate()
                    {
                        services.push(Svc {
                            name: format!("nodeport-{role}"),
                            cluster_ip: cluster_ip(n + k),
                            ports: vec![("http".to_string(), SERVICE_PORT, spec.target_port)],
                            endpoints: eps.clone(),
                            node_port: Some(node_port),
                            endpoint_node: node,
                        });
                    }
                }
            }
            let mut ports = vec![("http".to_string(), SERVICE_PORT, spec.target_port)];
            let endpoints = if last {
                ports.extend(
                    spec.probe_extra_ports
                        .iter()
                        .map(|p| (p.name.to_string(), p.port, p.port)),
                );
                spec.probe_endpoints.clone()
            } else {
                (0..spec.endpoints_per_service)
                    .map(|k| {
                        Ipv4Addr::from(
                            FAKE_ENDPOINT_BASE + (i * spec.endpoints_per_service + k) as u32,
                        )
                    })
                    .collect()
            };
            services.push(Svc {
                name: format!("svc-{i:06}"),
                cluster_ip: cluster_ip(i),
                ports,
                endpoints,
                node_port: None,
                endpoint_node: NODE,
            });
        }
        ServiceSet { services }
    }

    pub fn probe(&self) -> &Svc {
        self.services
            .last()
            .expect("a set has at least one Service")
    }

    /// The NodePort Service backed by pods on the measured node (None without [`ExternalSpec`]).
    #[cfg(test)]
    pub fn nodeport_local(&self) -> Option<&Svc> {
        self.services.iter().find(|s| s.name == "nodeport-local")
    }

    /// The NodePort Service backed by pods on the other node.
    #[cfg(test)]
    pub fn nodeport_remote(&self) -> Option<&Svc> {
        self.services.iter().find(|s| s.name == "nodeport-remote")
    }

    pub fn endpoint_count(&self) -> usize {
        self.services
            .iter()
            .map(|s| s.endpoints.len() * s.ports.len())
            .sum()
    }
}

/// ClusterIP of Service `i`.
pub fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(CLUSTER_IP_BASE + i as u32)
}

/// A short stable hash of `parts`, upper-case base32 like kube-proxy's chain-name suffixes
/// (it hashes with SHA-256; any stable hash gives the same rule shape and length).
pub fn chain_hash(parts: &[&str]) -> String {
    // FNV-1a 64, then 16 base32 characters (80 bits from two rounds).
    let fnv = |seed: u64| {
        let mut h = 0xcbf29ce484222325u64 ^ seed;
        for p in parts {
            for b in p.bytes().chain(std::iter::once(0)) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x100000001b3);
            }
        }
        h
    };
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let (a, b) = (fnv(0), fnv(0x9e3779b97f4a7c15));
    (0..16)
        .map(|i| {
            let v = if i < 12 {
                a >> (i * 5)
            } else {
                b >> ((i - 12) * 5)
            };
            ALPHABET[(v & 31) as usize] as char
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec(n: usize) -> SetSpec {
        SetSpec {
            services: n,
            endpoints_per_service: 3,
            target_port: 8080,
            probe_endpoints: vec![Ipv4Addr::new(10, 244, 1, 10), Ipv4Addr::new(10, 244, 1, 11)],
            probe_extra_ports: vec![ExtraPort {
                name: "stream",
                port: 5001,
            }],
            external: None,
        }
    }

    /// [`spec`] with the two NodePort Services.
    pub(crate) fn spec_ext(n: usize) -> SetSpec {
        SetSpec {
            external: Some(ExternalSpec {
                local_node_port: 30080,
                local_endpoints: vec![Ipv4Addr::new(10, 244, 1, 10)],
                remote_node_port: 30081,
                remote_endpoints: vec![
                    Ipv4Addr::new(10, 244, 2, 10),
                    Ipv4Addr::new(10, 244, 2, 11),
                ],
            }),
            ..spec(n)
        }
    }

    #[test]
    fn set_has_distinct_addresses_and_a_real_probe() {
        let set = ServiceSet::generate(&spec(1000));
        assert_eq!(set.services.len(), 1000);
        let ips: std::collections::BTreeSet<_> =
            set.services.iter().map(|s| s.cluster_ip).collect();
        assert_eq!(ips.len(), 1000);
        let eps: std::collections::BTreeSet<_> = set
            .services
            .iter()
            .flat_map(|s| s.endpoints.clone())
            .collect();
        assert_eq!(eps.len(), 999 * 3 + 2);
        let probe = set.probe();
        assert_eq!(probe.endpoints[0], Ipv4Addr::new(10, 244, 1, 10));
        assert_eq!(probe.ports.len(), 2);
        assert!(set.services[0].cluster_ip.to_string().starts_with("10.96."));
        assert_eq!(set.endpoint_count(), 999 * 3 + 2 * 2);
        // At least one Service even when asked for none.
        assert_eq!(ServiceSet::generate(&spec(0)).services.len(), 1);
        assert!(set.nodeport_local().is_none());
    }

    #[test]
    fn nodeport_services_come_just_before_the_probe() {
        let set = ServiceSet::generate(&spec_ext(10));
        assert_eq!(set.services.len(), 12);
        let local = set.nodeport_local().unwrap();
        let remote = set.nodeport_remote().unwrap();
        assert_eq!(set.services[9].name, "nodeport-local");
        assert_eq!(set.services[10].name, "nodeport-remote");
        assert_eq!(set.probe().name, "svc-000009");
        assert_eq!((local.node_port, local.endpoint_node), (Some(30080), NODE));
        assert_eq!(
            (remote.node_port, remote.endpoint_node),
            (Some(30081), OTHER_NODE)
        );
        assert_eq!(remote.endpoints.len(), 2);
        let ips: std::collections::BTreeSet<_> =
            set.services.iter().map(|s| s.cluster_ip).collect();
        assert_eq!(ips.len(), 12);
        assert_eq!(set.probe().node_port, None);
        assert_eq!(set.endpoint_count(), 9 * 3 + 2 * 2 + 1 + 2);
    }

    #[test]
    fn chain_hashes_are_stable_distinct_and_short() {
        let a = chain_hash(&["default/svc-000001", "http"]);
        assert_eq!(a, chain_hash(&["default/svc-000001", "http"]));
        assert_ne!(a, chain_hash(&["default/svc-000002", "http"]));
        assert_ne!(chain_hash(&["ab", "c"]), chain_hash(&["a", "bc"]));
        assert_eq!(a.len(), 16);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_uppercase() || ('2'..='7').contains(&c)));
    }
}
