//! One set of Services, rendered in every shape the benchmark compares: kube-proxy's iptables
//! rules (`iptables-restore` input), kube-proxy's nftables ruleset (`nft -f` input) and the
//! Service + EndpointSlice manifests xlb's agent reads. Same Services, same endpoints, same
//! order, so each mode programs exactly the same thing.
//!
//! Every Service but the last points at made-up endpoint addresses (10.128.0.0/10, never
//! contacted); the last one, the probed one (last in iptables' linear chain, the worst case),
//! points at the real pods.

pub mod iptables;
pub mod xlb_dir;
pub mod nft;

use std::net::Ipv4Addr;

/// The Service port every generated Service exposes.
pub const SERVICE_PORT: u16 = 80;
/// Where made-up endpoint addresses start.
const FAKE_ENDPOINT_BASE: u32 = u32::from_be_bytes([10, 128, 0, 0]);
/// Where ClusterIPs start (10.96.0.0/12 is kube's default service CIDR; .0.0 and .0.1 skipped).
const CLUSTER_IP_BASE: u32 = u32::from_be_bytes([10, 96, 0, 10]);
/// Pod CIDR (kube-proxy's --cluster-cidr): traffic from outside it to a ClusterIP is masqueraded.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";

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
}

impl ServiceSet {
    pub fn generate(spec: &SetSpec) -> Self {
        let n = spec.services.max(1);
        let mut services = Vec::with_capacity(n);
        for i in 0..n {
            let last = i + 1 == n;
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
            });
        }
        ServiceSet { services }
    }

    pub fn probe(&self) -> &Svc {
        self.services
            .last()
            .expect("a set has at least one Service")
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
