//! The cluster as the agent knows it: Services, EndpointSlices and this node, as k8s-openapi objects.
//! Both sources (manifests directory, Kubernetes API) feed it through [`SourceEvent`]s.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// A Service's identity: (namespace, name). EndpointSlices find their Service through the
/// `kubernetes.io/service-name` label in their own namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What a source tells the agent.
#[derive(Clone, Debug)]
pub enum SourceEvent {
    /// A Service was added or changed.
    ServiceUpsert(Service),
    /// A Service was deleted (namespace, name).
    ServiceDelete { namespace: String, name: String },
    /// An EndpointSlice was added or changed.
    SliceUpsert(EndpointSlice),
    /// An EndpointSlice was deleted (namespace, name of the slice).
    SliceDelete { namespace: String, name: String },
    /// The full set of objects of one or both kinds (initial list, relist after 410 Gone, or a
    /// manifests-directory rescan): replaces everything the state held of that kind. `None` leaves
    /// that kind as it is (the Kubernetes source relists each kind on its own).
    Resync { services: Option<Vec<Service>>, slices: Option<Vec<EndpointSlice>> },
    /// This node changed (name, addresses).
    Node(NodeInfo),
    /// Every watched kind has been listed at least once: pruning stale map entries is now safe.
    Synced,
}

/// This node, as far as the datapath cares.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct NodeInfo {
    pub name: String,
    /// InternalIP / ExternalIP addresses of the node (NodePort frontends).
    pub addresses: Vec<Ipv4Addr>,
}

/// Agent configuration that changes what the model produces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Value of the `service.kubernetes.io/service-proxy-name` label this proxy answers to; Services
    /// labelled with another name are skipped (kube-proxy semantics). `None`: skip every labelled one.
    pub service_proxy_name: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config { service_proxy_name: Some("xlb".to_string()) }
    }
}

/// All Services and EndpointSlices, indexed so a change finds the Services it touches.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub services: BTreeMap<ServiceKey, Service>,
    /// Slices by the Service they belong to, then by slice name.
    pub slices: BTreeMap<ServiceKey, BTreeMap<String, EndpointSlice>>,
    /// Slice name (namespace, slice name) -> owning Service, so a delete finds its Service.
    pub slice_owner: BTreeMap<(String, String), ServiceKey>,
    pub node: NodeInfo,
    /// True once a `Synced` event arrived.
    pub synced: bool,
}

/// What an event changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Services whose frontends must be recomputed.
    pub services: BTreeSet<ServiceKey>,
    /// Everything must be recomputed (node addresses changed, or first sync completed).
    pub all: bool,
}

impl ClusterState {
    /// Apply one event and return which Services changed. Objects equal to what is held already
    /// produce no change (a manifests rescan or a relist that changed nothing costs nothing).
    pub fn apply(&mut self, event: SourceEvent) -> Changes {
        let _ = event;
        todo!("lb-model: ClusterState::apply")
    }

    /// The slices of a Service (empty if none).
    pub fn slices_of(&self, key: &ServiceKey) -> impl Iterator<Item = &EndpointSlice> {
        self.slices.get(key).into_iter().flat_map(|m| m.values())
    }
}
