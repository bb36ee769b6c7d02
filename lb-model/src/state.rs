//! The cluster as the agent knows it: Services (k8s-openapi objects), EndpointSlices (in the
//! compact form of [`crate::slice`]) and this node. Both sources (manifests directory,
//! Kubernetes API) feed it through [`SourceEvent`]s, which carry k8s-openapi objects.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::slice::{NodeNames, Slice};
use crate::Problem;

/// A Service's identity: (namespace, name). EndpointSlices find their Service through the
/// `kubernetes.io/service-name` label in their own namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
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
// Events are moved once through a channel, so the size difference costs nothing worth boxing
// (which would change the contract every source codes against).
#[allow(clippy::large_enum_variant)]
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
    Resync {
        services: Option<Vec<Service>>,
        slices: Option<Vec<EndpointSlice>>,
    },
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
    /// kube-proxy's `--nodeport-addresses`: empty means every node address
    /// ([`NodeInfo::addresses`]) gets the NodePort frontends; otherwise only the node addresses
    /// inside one of these CIDRs do (a node address outside all of them serves no NodePort).
    pub nodeport_addresses: Vec<crate::Cidr>,
    /// The cluster's NodePort range (the API server's `--service-node-port-range`), both ends
    /// inclusive. A nodePort outside it is a problem for that Service port, which then gets no
    /// NodePort frontend (its other frontends stay): the API server never allocates one there,
    /// so it is a hand-written manifest, and answering on a port the node may use for
    /// something else would steal its traffic.
    pub nodeport_range: (u16, u16),
    /// How new flows pick a backend (`--lb-algorithm`), unless a Service's
    /// [`ALGORITHM_ANNOTATION`] says otherwise.
    pub lb_algorithm: Algorithm,
}

/// The annotation that overrides `--lb-algorithm` for one Service: `random`, `round-robin`
/// or `maglev`. Any other value is a problem for that Service, which then uses the default.
pub const ALGORITHM_ANNOTATION: &str = "xlb.io/lb-algorithm";

/// How the datapath picks a backend for a new flow (after session affinity, when set).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Algorithm {
    /// A uniformly random slot.
    #[default]
    Random,
    /// The slots in turn: a per-CPU counter per frontend, so one client's flows (one CPU)
    /// visit every backend once per round.
    RoundRobin,
    /// Maglev consistent hashing of the client (address, port, protocol): every node picks
    /// the same backend for a client, and a backend change moves few clients.
    Maglev,
}

impl Algorithm {
    pub const ALL: [Algorithm; 3] = [Algorithm::Random, Algorithm::RoundRobin, Algorithm::Maglev];

    /// The flag and annotation value.
    pub const fn name(self) -> &'static str {
        match self {
            Algorithm::Random => "random",
            Algorithm::RoundRobin => "round-robin",
            Algorithm::Maglev => "maglev",
        }
    }

    /// Parse a flag or annotation value (exact, lower case).
    pub fn parse(s: &str) -> Result<Algorithm, String> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| {
                format!("unknown load-balancing algorithm {s:?} (random, round-robin or maglev)")
            })
    }

    /// The master flag that selects it in the datapath (`SVC_FLAG_ALG_*`; none for random).
    pub const fn flag(self) -> u32 {
        match self {
            Algorithm::Random => 0,
            Algorithm::RoundRobin => lb_common::SVC_FLAG_ALG_RR,
            Algorithm::Maglev => lb_common::SVC_FLAG_ALG_MAGLEV,
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Algorithm::parse(s)
    }
}

/// The API server's default NodePort range.
pub const DEFAULT_NODEPORT_RANGE: (u16, u16) = (30000, 32767);

impl Default for Config {
    fn default() -> Self {
        Config {
            service_proxy_name: Some("xlb".to_string()),
            nodeport_addresses: Vec::new(),
            nodeport_range: DEFAULT_NODEPORT_RANGE,
            lb_algorithm: Algorithm::Random,
        }
    }
}

impl Config {
    /// Whether node address `ip` gets NodePort frontends (`--nodeport-addresses`).
    pub fn is_nodeport_address(&self, ip: Ipv4Addr) -> bool {
        self.nodeport_addresses.is_empty()
            || self
                .nodeport_addresses
                .iter()
                .any(|c| crate::cidr::contains(*c, ip))
    }

    /// Whether `port` lies in [`Config::nodeport_range`].
    pub fn is_nodeport_in_range(&self, port: u16) -> bool {
        (self.nodeport_range.0..=self.nodeport_range.1).contains(&port)
    }
}

/// All Services and EndpointSlices, indexed so a change finds the Services it touches.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    /// Boxed for the same reason as the slices: a Service is ~0.8 KiB inline, and BTreeMap nodes
    /// of 11 slots filled by one-at-a-time inserts are half empty (10k Services: ~16 MiB
    /// unboxed, ~9 MiB boxed).
    pub services: BTreeMap<ServiceKey, Box<Service>>,
    /// Slices by the Service they belong to, then sorted by slice name ([`Slice`]: what the
    /// rules read of an EndpointSlice).
    /// A sorted vector rather than a map: most Services have one or two slices, and a B-tree
    /// node has 11 slots (10k Services: ~0.6 MiB instead of ~6 MiB).
    pub slices: BTreeMap<ServiceKey, Vec<(String, Slice)>>,
    /// Slice name (namespace, slice name) -> owning Service, so a delete finds its Service.
    pub slice_owner: BTreeMap<(String, String), ServiceKey>,
    pub node: NodeInfo,
    /// True once a `Synced` event arrived.
    pub synced: bool,
    /// The node names of the slices' endpoints, each held once.
    pub node_names: NodeNames,
}

/// What an event changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Services whose frontends must be recomputed.
    pub services: BTreeSet<ServiceKey>,
    /// Everything must be recomputed (node addresses changed, or first sync completed).
    pub all: bool,
    /// Objects of the event that were skipped (e.g. an EndpointSlice without its Service label).
    pub problems: Vec<Problem>,
}

/// Label naming the Service an EndpointSlice belongs to.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

/// The key of an object: its namespace ("default" when unset, as the API server defaults it) and
/// name. `None` without a name: such an object cannot be addressed and is skipped.
pub fn object_key(meta: &ObjectMeta) -> Option<ServiceKey> {
    Some(ServiceKey {
        namespace: meta
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string()),
        name: meta.name.clone()?,
    })
}

/// The Service an EndpointSlice belongs to, from its `kubernetes.io/service-name` label.
fn slice_service(slice: &EndpointSlice, slice_key: &ServiceKey) -> Option<ServiceKey> {
    let name = slice.metadata.labels.as_ref()?.get(LABEL_SERVICE_NAME)?;
    if name.is_empty() {
        return None;
    }
    Some(ServiceKey {
        namespace: slice_key.namespace.clone(),
        name: name.clone(),
    })
}

/// Where a slice is filed, or why it is not.
enum SliceFiling {
    Owned {
        slice: ServiceKey,
        owner: ServiceKey,
    },
    Skipped(Problem),
}

fn file_slice(slice: &EndpointSlice) -> SliceFiling {
    let Some(key) = object_key(&slice.metadata) else {
        return SliceFiling::Skipped(Problem {
            object: "EndpointSlice".to_string(),
            kind: "invalid_slice",
            reason: "metadata.name is missing".to_string(),
        });
    };
    match slice_service(slice, &key) {
        Some(owner) => SliceFiling::Owned { slice: key, owner },
        None => SliceFiling::Skipped(Problem {
            object: key.to_string(),
            kind: "invalid_slice",
            reason: format!("EndpointSlice has no {LABEL_SERVICE_NAME} label"),
        }),
    }
}

impl ClusterState {
    /// Apply one event and return which Services changed. Objects equal to what is held already
    /// produce no change (a manifests rescan or a relist that changed nothing costs nothing).
    pub fn apply(&mut self, event: SourceEvent) -> Changes {
        let mut changes = Changes::default();
        let event = compact_event(event);
        match event {
            SourceEvent::ServiceUpsert(svc) => self.upsert_service(svc, &mut changes),
            SourceEvent::ServiceDelete { namespace, name } => {
                let key = ServiceKey { namespace, name };
                if self.services.remove(&key).is_some() {
                    changes.services.insert(key);
                }
            }
            SourceEvent::SliceUpsert(slice) => self.upsert_slice(slice, &mut changes),
            SourceEvent::SliceDelete { namespace, name } => {
                if let Some(owner) = self.remove_slice(&(namespace, name)) {
                    changes.services.insert(owner);
                }
            }
            SourceEvent::Resync { services, slices } => {
                if let Some(services) = services {
                    self.resync_services(services, &mut changes);
                }
                if let Some(slices) = slices {
                    self.resync_slices(slices, &mut changes);
                }
            }
            SourceEvent::Node(node) => {
                // Node name matters too: traffic policy Local selects endpoints by node name.
                if node != self.node {
                    self.node = node;
                    changes.all = true;
                }
            }
            SourceEvent::Synced => {
                if !self.synced {
                    self.synced = true;
                    changes.all = true;
                }
            }
        }
        changes
    }

    /// The slices of a Service (empty if none), by slice name.
    pub fn slices_of(&self, key: &ServiceKey) -> impl Iterator<Item = &Slice> {
        self.slices
            .get(key)
            .into_iter()
            .flat_map(|m| m.iter().map(|(_, s)| s))
    }

    fn upsert_service(&mut self, svc: Service, changes: &mut Changes) {
        let Some(key) = object_key(&svc.metadata) else {
            changes.problems.push(Problem {
                object: "Service".to_string(),
                kind: "invalid_service",
                reason: "metadata.name is missing".to_string(),
            });
            return;
        };
        if self.services.get(&key).map(|b| &**b) != Some(&svc) {
            self.services.insert(key.clone(), held_copy(&svc));
            changes.services.insert(key);
        }
    }

    fn upsert_slice(&mut self, slice: EndpointSlice, changes: &mut Changes) {
        match file_slice(&slice) {
            SliceFiling::Owned { slice: key, owner } => {
                let id = (key.namespace, key.name);
                let slice = Slice::from_k8s(&slice, &mut self.node_names);
                let held = self.slices.get(&owner).and_then(|m| find_slice(m, &id.1));
                if held == Some(&slice) {
                    return;
                }
                // The label may have moved the slice to another Service: the old one changes too.
                if let Some(old_owner) = self.slice_owner.get(&id).filter(|o| **o != owner).cloned()
                {
                    self.remove_slice(&id);
                    changes.services.insert(old_owner);
                }
                insert_slice(
                    self.slices.entry(owner.clone()).or_default(),
                    id.1.clone(),
                    slice,
                );
                self.slice_owner.insert(id, owner.clone());
                changes.services.insert(owner);
                self.node_names.prune_if_grown();
            }
            SliceFiling::Skipped(problem) => {
                // A slice that lost its label no longer counts for its former Service.
                if let Some(key) = object_key(&slice.metadata) {
                    if let Some(owner) = self.remove_slice(&(key.namespace, key.name)) {
                        changes.services.insert(owner);
                    }
                }
                changes.problems.push(problem);
            }
        }
    }

    /// Remove a slice by (namespace, name); returns the Service it belonged to.
    fn remove_slice(&mut self, id: &(String, String)) -> Option<ServiceKey> {
        let owner = self.slice_owner.remove(id)?;
        if let Some(m) = self.slices.get_mut(&owner) {
            remove_slice_named(m, &id.1);
            if m.is_empty() {
                self.slices.remove(&owner);
            }
        }
        Some(owner)
    }

    fn resync_services(&mut self, services: Vec<Service>, changes: &mut Changes) {
        let mut fresh = BTreeMap::new();
        // By reference, the decoded objects freed only at the end: see `held_copy`.
        for svc in &services {
            match object_key(&svc.metadata) {
                Some(key) => {
                    fresh.insert(key, held_copy(svc));
                }
                None => changes.problems.push(Problem {
                    object: "Service".to_string(),
                    kind: "invalid_service",
                    reason: "metadata.name is missing".to_string(),
                }),
            }
        }
        free_aside(services);
        changes
            .services
            .extend(differing_keys(&self.services, &fresh));
        self.services = fresh;
    }

    fn resync_slices(&mut self, slices: Vec<EndpointSlice>, changes: &mut Changes) {
        let mut fresh: BTreeMap<ServiceKey, Vec<(String, Slice)>> = BTreeMap::new();
        let mut owners = BTreeMap::new();
        // By reference, the decoded objects freed only at the end: see `held_copy`.
        for slice in &slices {
            match file_slice(slice) {
                SliceFiling::Owned { slice: key, owner } => {
                    let id = (key.namespace, key.name);
                    // A duplicate in the list: the last one wins, and leaves its former owner.
                    if let Some(prev) = owners.insert(id.clone(), owner.clone()) {
                        if let Some(m) = fresh.get_mut(&prev) {
                            remove_slice_named(m, &id.1);
                        }
                    }
                    let compact = Slice::from_k8s(slice, &mut self.node_names);
                    insert_slice(fresh.entry(owner).or_default(), id.1, compact);
                }
                SliceFiling::Skipped(problem) => changes.problems.push(problem),
            }
        }
        free_aside(slices);
        fresh.retain(|_, m| !m.is_empty());
        fresh.values_mut().for_each(|m| m.shrink_to_fit());
        changes
            .services
            .extend(differing_keys(&self.slices, &fresh));
        self.slices = fresh;
        self.slice_owner = owners;
        self.node_names.prune();
    }
}

/// Lists longer than this are freed on a helper thread by [`free_aside`].
const FREE_ASIDE_MIN: usize = 1_000;

/// Drops a decoded list, on a helper thread when it is long.
///
/// Why: a full list's objects are many small allocations (a k8s-openapi EndpointSlice is dozens
/// of `String`s and `Option`s per endpoint), and nothing waits for them to be freed. Freeing
/// 10k EndpointSlices with 100k endpoints took ~33 ms on the 2-core bench VM, on the critical
/// path of the agent's cold start (list, absorb, plan, write), while the second core idles
/// through the plan. Short lists (every later relist of a small cluster, the tests) are freed
/// in place: a thread is not worth it. If no thread can be started the list is freed here.
fn free_aside<T: Send + 'static>(list: Vec<T>) {
    if list.len() < FREE_ASIDE_MIN {
        drop(list);
        return;
    }
    // A failed spawn drops the closure, and the list with it, on this thread.
    let _ = std::thread::Builder::new()
        .name("xlb-free".into())
        .spawn(move || drop(list));
}

/// The slice named `name` among a Service's slices (sorted by name).
fn find_slice<'a>(slices: &'a [(String, Slice)], name: &str) -> Option<&'a Slice> {
    slices
        .binary_search_by(|(n, _)| n.as_str().cmp(name))
        .ok()
        .map(|i| &slices[i].1)
}

/// Insert or replace the slice named `name`, keeping the order by name.
fn insert_slice(slices: &mut Vec<(String, Slice)>, name: String, slice: Slice) {
    match slices.binary_search_by(|(n, _)| n.as_str().cmp(&name)) {
        Ok(i) => slices[i].1 = slice,
        Err(i) => slices.insert(i, (name, slice)),
    }
}

/// Remove the slice named `name`, if there.
fn remove_slice_named(slices: &mut Vec<(String, Slice)>, name: &str) {
    if let Ok(i) = slices.binary_search_by(|(n, _)| n.as_str().cmp(name)) {
        slices.remove(i);
    }
}

/// The copy of a Service the state holds for as long as the Service exists: a copy made on this
/// thread rather than the decoded object itself. A source decodes objects on threads of its own
/// (the manifests source parses on several), whose allocator arenas then mostly hold freed
/// temporaries; a long-lived string per Service left in them keeps their pages resident
/// (malloc_trim returns only whole free pages): at 10k Services, tens of MiB.
///
/// The decoded objects of a resync are freed only after every copy is made: glibc's per-thread
/// cache hands a chunk just freed (from whichever arena) to the next allocation of its size, so
/// copying one object right after freeing the previous one would land the copy in the decoding
/// thread's arena again. Copying 10k compacted Services costs a few milliseconds.
fn held_copy(svc: &Service) -> Box<Service> {
    Box::new(svc.clone())
}

/// Keys whose values differ between two maps (added, removed or changed).
fn differing_keys<V: PartialEq>(
    old: &BTreeMap<ServiceKey, V>,
    new: &BTreeMap<ServiceKey, V>,
) -> Vec<ServiceKey> {
    let removed_or_changed = old
        .iter()
        .filter(|(k, v)| new.get(*k) != Some(*v))
        .map(|(k, _)| k);
    let added = new.keys().filter(|k| !old.contains_key(*k));
    removed_or_changed.chain(added).cloned().collect()
}

/// `event` with its Services made compact ([`compact_service`]): the state holds every object
/// of the cluster for as long as it exists, so what the model never reads is dropped before it
/// is stored (and before it is compared with what is held, so both sides of an equality check
/// are compact). Slices are stored in the form of [`Slice::from_k8s`], compact by construction.
fn compact_event(event: SourceEvent) -> SourceEvent {
    match event {
        SourceEvent::ServiceUpsert(mut svc) => {
            compact_service(&mut svc);
            SourceEvent::ServiceUpsert(svc)
        }
        SourceEvent::Resync {
            mut services,
            slices,
        } => {
            services.iter_mut().flatten().for_each(compact_service);
            SourceEvent::Resync { services, slices }
        }
        other => other,
    }
}

/// The annotation `kubectl apply` leaves on objects: a JSON copy of the whole manifest.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drop the parts of an object's metadata no rule of the model reads (managed fields, owner
/// references, the last-applied copy of the object, finalizers).
fn compact_meta(m: &mut ObjectMeta) {
    m.managed_fields = None;
    m.owner_references = None;
    m.finalizers = None;
    if let Some(a) = &mut m.annotations {
        a.remove(LAST_APPLIED);
    }
}

/// A Service as the model keeps it: metadata compacted, selector and status conditions
/// dropped, lists without spare capacity.
pub fn compact_service(svc: &mut Service) {
    compact_meta(&mut svc.metadata);
    if let Some(spec) = &mut svc.spec {
        // kube-proxy never reads the selector (EndpointSlices say which pods back a Service),
        // and it is a B-tree node per Service (10k Services: ~6 MiB).
        spec.selector = None;
        if let Some(p) = &mut spec.ports {
            p.shrink_to_fit();
        }
    }
    if let Some(st) = &mut svc.status {
        st.conditions = None;
    }
}

/// An EndpointSlice with what the model never reads dropped, for a source that holds slices
/// until the state takes them (the manifests source's first scan: 10k slices wait for the
/// state at once). Per endpoint the model reads its addresses, its conditions and its node
/// name; the pod reference, hostname, zone, hints and deprecated topology are dropped (at 100k
/// endpoints they are tens of MiB), and the lists lose their spare capacity (a slice of 10
/// endpoints decoded into a vector of 16). The state itself keeps [`Slice`]s.
pub fn compact_slice(slice: &mut EndpointSlice) {
    compact_meta(&mut slice.metadata);
    for ep in slice.endpoints.iter_mut().flatten() {
        ep.target_ref = None;
        ep.hostname = None;
        ep.hints = None;
        ep.zone = None;
        ep.deprecated_topology = None;
        ep.addresses.shrink_to_fit();
    }
    if let Some(e) = &mut slice.endpoints {
        e.shrink_to_fit();
    }
    if let Some(p) = &mut slice.ports {
        p.shrink_to_fit();
    }
}
