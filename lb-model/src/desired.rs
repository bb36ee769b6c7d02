//! Desired datapath state, computed from the cluster state with kube-proxy's semantics.

use std::collections::{BTreeMap, BTreeSet, HashMap};

pub use crate::kube_proxy::{service_frontends, service_frontends_of};
use crate::state::{ClusterState, Config, ServiceKey};
use crate::{BackendAddr, Cidr, Frontend, Problem};
use lb_common::{
    BACKEND_ACTIVE, BACKEND_F_LOCAL, BACKEND_TERMINATING, SCOPE_EXT, SCOPE_INT,
    SVC_FLAG_TERMINATING_FALLBACK,
};

/// What one frontend should look like in the maps.
///
/// `Default` is for callers that program frontends by hand (packet tests, benchmarks):
/// `FrontendState { backends, flags, ..Default::default() }`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FrontendState {
    /// The Service this frontend belongs to.
    pub service: ServiceKey,
    /// The Service port's name ("" when unnamed).
    pub port_name: String,
    /// Backends to use, in a stable order (sorted). Empty: refuse new flows (RST / ICMP unreachable).
    pub backends: Vec<BackendAddr>,
    /// `lb_common::SVC_FLAG_*`.
    pub flags: u32,
    /// sessionAffinity ClientIP timeout in seconds (0 when affinity is off).
    pub affinity_timeout: u32,
    /// The backends of `backends` whose endpoint runs on this node (EndpointSlice `nodeName` ==
    /// this node's name). Their BACKENDS entry carries `BACKEND_F_LOCAL`: the datapath does not
    /// SNAT flows from outside to them (the answer comes back through this node anyway), so
    /// they see the client's address.
    pub local: BTreeSet<BackendAddr>,
    /// `loadBalancerSourceRanges`: the client ranges allowed in, written to SRC_RANGES for
    /// this frontend's (address, port, protocol). Only meaningful with
    /// `SVC_FLAG_SOURCE_RANGES` on a `SCOPE_EXT` frontend (the planner writes none for another
    /// scope: the trie key has no scope). The flag with no range drops every client.
    pub src_ranges: BTreeSet<Cidr>,
}

/// Every frontend the datapath should serve, and which Service produced which frontends.
///
/// Besides the public maps it keeps two private indexes, maintained by [`Self::update_service`]:
/// who waits for a frontend another Service owns (so it gets it when the owner lets go), and how
/// many frontends use each backend as active / terminating (a backend's map state is global).
#[derive(Clone, Debug, Default)]
pub struct DesiredState {
    pub frontends: BTreeMap<Frontend, FrontendState>,
    /// Frontends of each Service (to remove a Service's old frontends on change).
    pub by_service: BTreeMap<ServiceKey, Vec<Frontend>>,
    /// Services that produce a frontend owned by another Service.
    waiting: BTreeMap<Frontend, BTreeSet<ServiceKey>>,
    /// The frontends each Service waits for (to drop its claims when it is recomputed).
    waiting_of: BTreeMap<ServiceKey, Vec<Frontend>>,
    /// Per backend: number of frontends using it as [active, terminating], and how many of
    /// them say it runs on this node.
    backend_use: HashMap<BackendAddr, [u32; 3]>,
}

impl DesiredState {
    /// Recompute the frontends of one Service from `state` (removing it when it is gone or skipped).
    /// Returns the frontends touched (old and new), for [`crate::planner::plan`], and any problems.
    ///
    /// Cost is proportional to this Service (and to a Service waiting for a frontend it releases),
    /// never to the number of Services.
    pub fn update_service(
        &mut self,
        state: &ClusterState,
        key: &ServiceKey,
        cfg: &Config,
    ) -> (Vec<Frontend>, Vec<Problem>) {
        let (produced, mut problems) = match state.services.get(key) {
            Some(svc) => service_frontends_of(svc, state.slices_of(key), &state.node, cfg),
            None => (Vec::new(), Vec::new()),
        };
        for fe in self.waiting_of.remove(key).unwrap_or_default() {
            if let Some(w) = self.waiting.get_mut(&fe) {
                w.remove(key);
                if w.is_empty() {
                    self.waiting.remove(&fe);
                }
            }
        }
        let old = self.by_service.remove(key).unwrap_or_default();
        for fe in &old {
            self.remove_frontend(fe);
        }
        let mut touched: BTreeSet<Frontend> = old.iter().copied().collect();
        let mut owned = Vec::with_capacity(produced.len());
        // A Service claims the scopes of one (address, port, protocol) together: the SCOPE_INT
        // entry of an externalTrafficPolicy Local frontend is only read through its SCOPE_EXT
        // master (SVC_FLAG_TWO_SCOPES), so the two must belong to the same Service. Claiming
        // them one by one could pair one Service's master with another's SCOPE_INT backends.
        let mut produced = produced.into_iter().peekable();
        while let Some(first) = produced.next() {
            let mut group = vec![first];
            while let Some(next) = produced.next_if(|(fe, _)| same_group(fe, &group[0].0)) {
                group.push(next);
            }
            let held = group
                .iter()
                .flat_map(|(fe, _)| [fe.with_scope(SCOPE_EXT), fe.with_scope(SCOPE_INT), *fe])
                .find_map(|fe| self.frontends.get(&fe).map(|other| (fe, other)));
            if let Some((fe, other)) = held {
                problems.push(Problem {
                    object: key.to_string(),
                    kind: "frontend_conflict",
                    reason: format!("frontend {fe} already belongs to Service {}", other.service),
                });
                for (fe, _) in &group {
                    self.waiting.entry(*fe).or_default().insert(key.clone());
                    self.waiting_of.entry(key.clone()).or_default().push(*fe);
                }
                continue;
            }
            for (fe, st) in group {
                self.insert_frontend(fe, st);
                owned.push(fe);
                touched.insert(fe);
            }
        }
        if !owned.is_empty() {
            self.by_service.insert(key.clone(), owned);
        }
        // Hand released frontends to the first Service waiting for them.
        let released: Vec<Frontend> = old
            .into_iter()
            .filter(|fe| !self.frontends.contains_key(fe) && self.waiting.contains_key(fe))
            .collect();
        for fe in released {
            if self.frontends.contains_key(&fe) {
                continue; // taken by an earlier hand-over in this loop
            }
            let Some(next) = self.waiting.get(&fe).and_then(|w| w.first()).cloned() else {
                continue;
            };
            let (t, p) = self.update_service(state, &next, cfg);
            touched.extend(t);
            problems.extend(p);
        }
        (touched.into_iter().collect(), problems)
    }

    /// Recompute everything.
    pub fn rebuild(state: &ClusterState, cfg: &Config) -> (Self, Vec<Problem>) {
        let mut desired = DesiredState::default();
        let mut problems = Vec::new();
        for key in state.services.keys() {
            let (_, p) = desired.update_service(state, key, cfg);
            problems.extend(p);
        }
        (desired, problems)
    }

    /// The `lb_common::BACKEND_*` state a backend must have in the map: active when any frontend
    /// uses it as a ready endpoint, terminating when all use it as a draining fallback, plus
    /// `BACKEND_F_LOCAL` when a frontend using it says it runs on this node (slices that
    /// disagree about an address's node only do so while they are rewritten; "local" wins, as
    /// in kube-proxy's slice cache). `None` when no frontend uses it.
    pub fn backend_state(&self, b: &BackendAddr) -> Option<u8> {
        let [active, terminating, local] = *self.backend_use.get(b)?;
        let local = if local > 0 { BACKEND_F_LOCAL } else { 0 };
        if active > 0 {
            Some(BACKEND_ACTIVE | local)
        } else if terminating > 0 {
            Some(BACKEND_TERMINATING | local)
        } else {
            None
        }
    }

    /// Set one frontend's desired state directly, outside any Service's filing (`by_service`
    /// is left alone): for callers that program frontends without Kubernetes objects, such as
    /// the packet tests and the benchmarks. The agent goes through [`Self::update_service`].
    pub fn set_frontend(&mut self, fe: Frontend, st: FrontendState) {
        self.insert_frontend(fe, st);
    }

    /// Remove one frontend set with [`Self::set_frontend`].
    pub fn remove_frontend(&mut self, fe: &Frontend) {
        if let Some(old) = self.frontends.remove(fe) {
            self.count_backends(&old, false);
        }
    }

    /// File a frontend (its owner's `by_service` entry is the caller's job).
    fn insert_frontend(&mut self, fe: Frontend, st: FrontendState) {
        if let Some(old) = self.frontends.remove(&fe) {
            self.count_backends(&old, false);
        }
        self.count_backends(&st, true);
        self.frontends.insert(fe, st);
    }

    fn count_backends(&mut self, st: &FrontendState, add: bool) {
        let which = usize::from(st.flags & SVC_FLAG_TERMINATING_FALLBACK != 0);
        for b in &st.backends {
            let local = usize::from(st.local.contains(b));
            let e = self.backend_use.entry(*b).or_default();
            if add {
                e[which] += 1;
                e[2] += local as u32;
            } else {
                e[which] = e[which].saturating_sub(1);
                e[2] = e[2].saturating_sub(local as u32);
                if e[..2] == [0, 0] {
                    self.backend_use.remove(b);
                }
            }
        }
    }
}

/// Whether two frontends are scopes of one (address, port, protocol).
fn same_group(a: &Frontend, b: &Frontend) -> bool {
    (a.addr, a.port, a.proto) == (b.addr, b.port, b.proto)
}
