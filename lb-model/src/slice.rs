//! EndpointSlices as [`crate::ClusterState`] keeps them: only what the kube-proxy rules read.
//!
//! Why not the k8s-openapi object: the state holds every slice of the cluster for as long as it
//! exists, and an `Endpoint` of k8s-openapi is ~350 bytes inline plus a heap string per address
//! and per node name, of which the rules read the first address, three conditions and the node
//! name. At 100k endpoints the objects cost ~60 MiB; this form costs ~3 MiB (24 bytes per
//! endpoint, node names shared). Sources keep sending k8s-openapi objects
//! ([`crate::SourceEvent`]); [`Slice::from_k8s`] converts them when the state stores them.
//!
//! The conversion resolves every default the rules apply (a missing `ready` means ready, a
//! missing `serving` follows `ready`, an unset port name is ""), and drops what can never
//! produce a backend (a slice of another address family, an endpoint whose first address is
//! not IPv4, a port of an unknown protocol). Two objects that differ only in what is dropped
//! therefore compare equal, and an upsert of one after the other is no change: the frontends
//! are a function of this form, so they would not change either.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::Proto;

/// One EndpointSlice's ports and endpoints (empty for a slice that is not `IPv4`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Slice {
    /// In the slice's order: the first port of a (name, protocol) decides, as in
    /// [`Slice::port`].
    pub ports: Box<[SlicePort]>,
    pub endpoints: Box<[Endpoint]>,
}

/// A port of a slice whose protocol xlb knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    /// "" for an unset name (the Service port's name is "" too then).
    pub name: Box<str>,
    pub proto: Proto,
    /// 0 when the number is missing or not a valid port (the slice then has no backend for
    /// this port name and protocol).
    pub port: u16,
}

/// An endpoint with an IPv4 first address, its conditions resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The first address (the API calls them fungible; kube-proxy uses the first).
    pub addr: Ipv4Addr,
    /// `conditions.ready`, unset = true (API docs: unknown is to be read as ready).
    pub ready: bool,
    /// `conditions.serving`, unset = `ready`.
    pub serving: bool,
    /// `conditions.terminating`, unset = false.
    pub terminating: bool,
    /// `nodeName`, shared between the endpoints of one node ([`NodeNames`]).
    pub node: Option<Arc<str>>,
}

impl Endpoint {
    /// Whether the endpoint runs on node `node` (an empty name is no node).
    pub fn on_node(&self, node: &str) -> bool {
        !node.is_empty() && self.node.as_deref() == Some(node)
    }
}

impl Slice {
    /// The compact form of `slice`; node names are shared through `names`.
    pub fn from_k8s(slice: &EndpointSlice, names: &mut NodeNames) -> Slice {
        if slice.address_type != "IPv4" {
            return Slice::default();
        }
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some(SlicePort {
                    // An unknown protocol matches no Service port: such a port never decides.
                    proto: Proto::from_k8s(p.protocol.as_deref())?,
                    name: p.name.as_deref().unwrap_or("").into(),
                    port: p.port.and_then(|n| u16::try_from(n).ok()).unwrap_or(0),
                })
            })
            .collect();
        let endpoints = slice
            .endpoints
            .iter()
            .flatten()
            .filter_map(|ep| {
                let addr = ep.addresses.first()?.parse::<Ipv4Addr>().ok()?;
                let c = ep.conditions.as_ref();
                let ready = c.and_then(|c| c.ready).unwrap_or(true);
                Some(Endpoint {
                    addr,
                    ready,
                    serving: c.and_then(|c| c.serving).unwrap_or(ready),
                    terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                    node: ep.node_name.as_deref().map(|n| names.intern(n)),
                })
            })
            .collect();
        Slice { ports, endpoints }
    }

    /// The backend port for a Service port named `name` (unset == "") with protocol `proto`:
    /// the number of the slice's first port with that name and protocol (how a named
    /// targetPort resolves). `None` when there is none or its number is not a valid port.
    pub fn port(&self, name: &str, proto: Proto) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| &*p.name == name && p.proto == proto)
            .map(|p| p.port)
            .filter(|p| *p != 0)
    }
}

/// Node names shared by the endpoints that name them: a cluster has few nodes and many
/// endpoints, and one allocation per endpoint would cost more than the endpoint itself.
#[derive(Clone, Debug, Default)]
pub struct NodeNames {
    names: HashSet<Arc<str>>,
    /// Size after the last [`NodeNames::prune`]: the next one is due when the set doubles.
    kept: usize,
}

impl NodeNames {
    /// The shared copy of `name`.
    pub fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.names.get(name) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(name);
        self.names.insert(n.clone());
        n
    }

    /// Forget names no endpoint uses any more (nodes come and go over the agent's life).
    pub fn prune(&mut self) {
        self.names.retain(|n| Arc::strong_count(n) > 1);
        self.kept = self.names.len();
    }

    /// [`NodeNames::prune`] when the set has doubled since the last one (so the cost stays
    /// proportional to what was added).
    pub fn prune_if_grown(&mut self) {
        if self.names.len() > 2 * self.kept.max(32) {
            self.prune();
        }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn k8s(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).unwrap()
    }

    fn slice(family: &str, ports: serde_json::Value, eps: serde_json::Value) -> EndpointSlice {
        k8s(json!({
            "metadata": {"name": "s", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": family, "ports": ports, "endpoints": eps,
        }))
    }

    #[test]
    fn conditions_take_the_api_defaults() {
        let mut names = NodeNames::default();
        let s = Slice::from_k8s(
            &slice(
                "IPv4",
                json!([]),
                json!([
                    {"addresses": ["10.0.0.1"]},
                    {"addresses": ["10.0.0.2"], "conditions": {"ready": false}},
                    {"addresses": ["10.0.0.3"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                ]),
            ),
            &mut names,
        );
        let c: Vec<_> = s
            .endpoints
            .iter()
            .map(|e| (e.ready, e.serving, e.terminating))
            .collect();
        assert_eq!(
            c,
            vec![
                (true, true, false),
                (false, false, false),
                (false, true, true)
            ]
        );
    }

    #[test]
    fn what_cannot_give_a_backend_is_dropped() {
        let mut names = NodeNames::default();
        let eps = json!([
            {"addresses": ["fd00::1", "10.0.0.9"]},
            {"addresses": []},
            {"addresses": ["10.0.0.1", "10.0.0.2"], "nodeName": "n1"},
        ]);
        let ports = json!([{"name": "x", "protocol": "ICMP", "port": 1}, {"port": 80}]);
        assert_eq!(
            Slice::from_k8s(&slice("IPv6", ports.clone(), eps.clone()), &mut names),
            Slice::default()
        );
        let s = Slice::from_k8s(&slice("IPv4", ports, eps), &mut names);
        assert_eq!(s.endpoints.len(), 1);
        assert_eq!(s.endpoints[0].addr, Ipv4Addr::new(10, 0, 0, 1));
        assert!(s.endpoints[0].on_node("n1") && !s.endpoints[0].on_node("n2"));
        assert_eq!(
            &*s.ports,
            &[SlicePort {
                name: "".into(),
                proto: Proto::Tcp,
                port: 80
            }]
        );
    }

    #[test]
    fn the_first_port_of_a_name_and_protocol_decides() {
        let mut names = NodeNames::default();
        let s = Slice::from_k8s(
            &slice(
                "IPv4",
                json!([
                    {"name": "a", "protocol": "UDP", "port": 53},
                    {"name": "a", "port": 70000},
                    {"name": "a", "port": 81},
                    {"name": "b", "port": 0},
                ]),
                json!([]),
            ),
            &mut names,
        );
        assert_eq!(s.port("a", Proto::Udp), Some(53));
        assert_eq!(
            s.port("a", Proto::Tcp),
            None,
            "invalid number shadows the later port"
        );
        assert_eq!(s.port("b", Proto::Tcp), None);
        assert_eq!(s.port("", Proto::Tcp), None);
    }

    #[test]
    fn node_names_are_shared_and_pruned_when_unused() {
        let mut names = NodeNames::default();
        let eps = json!([
            {"addresses": ["10.0.0.1"], "nodeName": "n1"},
            {"addresses": ["10.0.0.2"], "nodeName": "n1"},
        ]);
        let s = Slice::from_k8s(&slice("IPv4", json!([]), eps), &mut names);
        let (a, b) = (
            s.endpoints[0].node.clone().unwrap(),
            s.endpoints[1].node.clone().unwrap(),
        );
        assert!(Arc::ptr_eq(&a, &b));
        names.intern("gone");
        assert_eq!(names.len(), 2);
        drop((a, b));
        names.prune();
        assert_eq!(names.len(), 1);
        drop(s);
        names.prune();
        assert!(names.is_empty());
    }

    #[test]
    fn objects_differing_only_in_dropped_parts_compare_equal() {
        let mut names = NodeNames::default();
        let plain = slice(
            "IPv4",
            json!([{"port": 80}]),
            json!([{"addresses": ["10.0.0.1"]}]),
        );
        let full = slice(
            "IPv4",
            json!([{"port": 80, "protocol": "TCP", "appProtocol": "http"}]),
            json!([{"addresses": ["10.0.0.1"], "hostname": "h", "zone": "z",
                    "conditions": {"ready": true, "serving": true},
                    "targetRef": {"kind": "Pod", "name": "p"}}]),
        );
        assert_eq!(
            Slice::from_k8s(&plain, &mut names),
            Slice::from_k8s(&full, &mut names)
        );
    }
}
