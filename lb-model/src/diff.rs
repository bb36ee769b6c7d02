//! What is in the maps ([`Applied`]), and the ordered operations that turn it into the desired state.
//!
//! Update order (DESIGN.md section 3; no blackhole, never a half-written Service): write new
//! backends, then slots up to max(old, new), then the master with the new count, then delete
//! slots above the new count; unused backends and rev-NAT entries are deleted last ([`Applied::gc`]).
//! A removed frontend goes in reverse: master first, then its slots.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::OnceLock;

use lb_common::{BACKEND_ACTIVE, BACKEND_TERMINATING, SVC_FLAG_TERMINATING_FALLBACK};

use crate::desired::{DesiredState, FrontendState};
use crate::ids::IdSpace;
use crate::slots;
use crate::{BackendAddr, Frontend};

/// One frontend as it is in the maps.
///
/// The master entry (slot 0) exists iff `rev_nat_id != 0` (every master xlb writes has a rev-NAT
/// id >= 1); an entry with `rev_nat_id == 0` only describes leftover slots.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct AppliedFrontend {
    pub rev_nat_id: u32,
    pub flags: u32,
    pub affinity_timeout: u32,
    /// Backend ids of slots 1..=len; 0 marks a missing slot. May be longer than `count` when an
    /// update was interrupted (the next plan deletes the extra slots).
    pub slots: Vec<u32>,
    /// The master's backend count (what the datapath selects from).
    pub count: u32,
}

impl AppliedFrontend {
    fn has_master(&self) -> bool {
        self.rev_nat_id != 0
    }
}

/// The datapath maps' content, as the agent last wrote (or read back) it.
///
/// Change it through [`Applied::apply`]: that keeps a private index (address -> id, free ids,
/// unreferenced ids) up to date, so planning one Service does not scan the whole maps. The index
/// is built lazily on first use; after editing the public fields directly (e.g. while reading the
/// maps back) call [`Applied::reindex`] if the index may already have been built.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    pub frontends: BTreeMap<Frontend, AppliedFrontend>,
    /// Backend id -> (address, state `lb_common::BACKEND_*`).
    pub backends: BTreeMap<u32, (BackendAddr, u8)>,
    /// Rev-NAT id -> frontend it restores.
    pub rev_nat: BTreeMap<u32, Frontend>,
    index: OnceLock<Index>,
}

impl PartialEq for Applied {
    fn eq(&self, other: &Self) -> bool {
        self.frontends == other.frontends
            && self.backends == other.backends
            && self.rev_nat == other.rev_nat
    }
}
impl Eq for Applied {}

/// Derived lookups over [`Applied`].
#[derive(Clone, Debug, Default)]
struct Index {
    /// Address -> id (the smallest id when a read-back map holds an address twice).
    backend_of: HashMap<BackendAddr, u32>,
    /// Backend ids; referrers are slots.
    backends: IdSpace,
    /// Frontend -> rev-NAT id of its REV_NAT entry.
    rev_of: HashMap<Frontend, u32>,
    /// Rev-NAT ids; referrers are masters.
    revs: IdSpace,
}

impl Index {
    fn build(a: &Applied) -> Index {
        let mut ix = Index::default();
        for (id, (b, _)) in &a.backends {
            ix.backend_of.entry(*b).or_insert(*id);
        }
        for (id, fe) in &a.rev_nat {
            ix.rev_of.entry(*fe).or_insert(*id);
        }
        for af in a.frontends.values() {
            for id in &af.slots {
                ix.backends.add_ref(*id, a.backends.contains_key(id));
            }
            ix.revs
                .add_ref(af.rev_nat_id, a.rev_nat.contains_key(&af.rev_nat_id));
        }
        for id in a.backends.keys() {
            ix.backends.refresh(*id, true);
        }
        for id in a.rev_nat.keys() {
            ix.revs.refresh(*id, true);
        }
        ix
    }
}

/// One map write or delete. Executed strictly in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutBackend {
        id: u32,
        backend: BackendAddr,
        state: u8,
    },
    DeleteBackend {
        id: u32,
    },
    PutRevNat {
        id: u32,
        frontend: Frontend,
    },
    DeleteRevNat {
        id: u32,
    },
    /// Slot `slot` (>= 1) of `frontend` -> backend id.
    PutSlot {
        frontend: Frontend,
        slot: u16,
        backend_id: u32,
    },
    DeleteSlot {
        frontend: Frontend,
        slot: u16,
    },
    /// The master entry (slot 0).
    PutMaster {
        frontend: Frontend,
        count: u32,
        rev_nat_id: u32,
        flags: u32,
        affinity_timeout: u32,
    },
    DeleteMaster {
        frontend: Frontend,
    },
}

/// Operations grouped so a failure (e.g. a full map) stops only the frontend it hit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// New/changed backends and rev-NAT entries, written before any frontend refers to them.
    /// When one fails, skip the frontends [`Plan::blocked_by`] names.
    pub prepare: Vec<MapOp>,
    /// Per-frontend ops in update order. If one op fails, skip the rest of that frontend's ops.
    pub frontends: Vec<(Frontend, Vec<MapOp>)>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.prepare.is_empty() && self.frontends.iter().all(|(_, ops)| ops.is_empty())
    }
    pub fn op_count(&self) -> usize {
        self.prepare.len() + self.frontends.iter().map(|(_, o)| o.len()).sum::<usize>()
    }

    /// Frontends whose ops refer to an id written by one of the `failed` prepare ops: they must be
    /// skipped, or a slot would point to a missing backend (or a master to a missing rev-NAT).
    pub fn blocked_by(&self, failed: &[MapOp]) -> BTreeSet<Frontend> {
        let backends: BTreeSet<u32> = failed
            .iter()
            .filter_map(|op| {
                if let MapOp::PutBackend { id, .. } = op {
                    Some(*id)
                } else {
                    None
                }
            })
            .collect();
        let revs: BTreeSet<u32> = failed
            .iter()
            .filter_map(|op| {
                if let MapOp::PutRevNat { id, .. } = op {
                    Some(*id)
                } else {
                    None
                }
            })
            .collect();
        let needs = |op: &MapOp| match op {
            MapOp::PutSlot { backend_id, .. } => backends.contains(backend_id),
            MapOp::PutMaster { rev_nat_id, .. } => revs.contains(rev_nat_id),
            _ => false,
        };
        self.frontends
            .iter()
            .filter(|(_, ops)| ops.iter().any(needs))
            .map(|(fe, _)| *fe)
            .collect()
    }
}

impl Applied {
    /// Record an op that the datapath executed successfully.
    pub fn apply(&mut self, op: &MapOp) {
        let ix = self.index.get_mut();
        match *op {
            MapOp::PutBackend { id, backend, state } => {
                let old = self.backends.insert(id, (backend, state));
                if let Some(ix) = ix {
                    if let Some((ob, _)) = old.filter(|(ob, _)| *ob != backend) {
                        forget(&mut ix.backend_of, &ob, id);
                    }
                    ix.backend_of.entry(backend).or_insert(id);
                    ix.backends.refresh(id, true);
                }
            }
            MapOp::DeleteBackend { id } => {
                let old = self.backends.remove(&id);
                if let Some(ix) = ix {
                    if let Some((ob, _)) = old {
                        forget(&mut ix.backend_of, &ob, id);
                    }
                    ix.backends.refresh(id, false);
                }
            }
            MapOp::PutRevNat { id, frontend } => {
                let old = self.rev_nat.insert(id, frontend);
                if let Some(ix) = ix {
                    if let Some(of) = old.filter(|of| *of != frontend) {
                        forget(&mut ix.rev_of, &of, id);
                    }
                    ix.rev_of.entry(frontend).or_insert(id);
                    ix.revs.refresh(id, true);
                }
            }
            MapOp::DeleteRevNat { id } => {
                let old = self.rev_nat.remove(&id);
                if let Some(ix) = ix {
                    if let Some(of) = old {
                        forget(&mut ix.rev_of, &of, id);
                    }
                    ix.revs.refresh(id, false);
                }
            }
            MapOp::PutSlot {
                frontend,
                slot,
                backend_id,
            } => {
                if slot == 0 {
                    return;
                }
                let i = usize::from(slot) - 1;
                let e = self.frontends.entry(frontend).or_default();
                if e.slots.len() <= i {
                    e.slots.resize(i + 1, 0);
                }
                let old = std::mem::replace(&mut e.slots[i], backend_id);
                if let Some(ix) = ix {
                    ix.backends.drop_ref(old, self.backends.contains_key(&old));
                    ix.backends
                        .add_ref(backend_id, self.backends.contains_key(&backend_id));
                }
            }
            MapOp::DeleteSlot { frontend, slot } => {
                let Some(e) = self.frontends.get_mut(&frontend) else {
                    return;
                };
                let i = usize::from(slot).wrapping_sub(1);
                let Some(old) = e.slots.get_mut(i).map(|s| std::mem::replace(s, 0)) else {
                    return;
                };
                while e.slots.last() == Some(&0) {
                    e.slots.pop();
                }
                if !e.has_master() && e.slots.is_empty() {
                    self.frontends.remove(&frontend);
                }
                if let Some(ix) = ix {
                    ix.backends.drop_ref(old, self.backends.contains_key(&old));
                }
            }
            MapOp::PutMaster {
                frontend,
                count,
                rev_nat_id,
                flags,
                affinity_timeout,
            } => {
                let e = self.frontends.entry(frontend).or_default();
                let old = std::mem::replace(&mut e.rev_nat_id, rev_nat_id);
                e.count = count;
                e.flags = flags;
                e.affinity_timeout = affinity_timeout;
                if let Some(ix) = ix {
                    ix.revs.drop_ref(old, self.rev_nat.contains_key(&old));
                    ix.revs
                        .add_ref(rev_nat_id, self.rev_nat.contains_key(&rev_nat_id));
                }
            }
            MapOp::DeleteMaster { frontend } => {
                let Some(e) = self.frontends.get_mut(&frontend) else {
                    return;
                };
                let old = std::mem::take(&mut e.rev_nat_id);
                e.count = 0;
                e.flags = 0;
                e.affinity_timeout = 0;
                if e.slots.is_empty() {
                    self.frontends.remove(&frontend);
                }
                if let Some(ix) = ix {
                    ix.revs.drop_ref(old, self.rev_nat.contains_key(&old));
                }
            }
        }
    }

    /// Deletes of backends no slot refers to any more and of rev-NAT entries whose frontend is gone.
    /// Run after the frontend ops of a plan, so nothing in use is removed.
    pub fn gc(&self) -> Vec<MapOp> {
        let ix = self.index();
        let backends = ix
            .backends
            .unused
            .iter()
            .map(|&id| MapOp::DeleteBackend { id });
        let revs = ix.revs.unused.iter().map(|&id| MapOp::DeleteRevNat { id });
        backends.chain(revs).collect()
    }

    /// Backend id for an address: the existing one (ids are stable), else the smallest unused
    /// id that is not in `reserved` (ids already handed out in the same plan).
    pub fn backend_id(&self, b: &BackendAddr, reserved: &BTreeSet<u32>) -> u32 {
        let ix = self.index();
        match ix.backend_of.get(b) {
            Some(&id) => id,
            None => ix.backends.pool.smallest_free(reserved),
        }
    }

    /// Drop the derived index; call after editing the public fields directly.
    pub fn reindex(&mut self) {
        self.index = OnceLock::new();
    }

    fn index(&self) -> &Index {
        self.index.get_or_init(|| Index::build(self))
    }
}

/// Remove `key -> id` from a reverse map if it still points at `id`.
fn forget<K: std::hash::Hash + Eq>(m: &mut HashMap<K, u32>, key: &K, id: u32) {
    if m.get(key) == Some(&id) {
        m.remove(key);
    }
}

/// The ops that make `applied` match `desired` for the `touched` frontends (all frontends of
/// `applied` and `desired` for a full reconcile). Frontends in `touched` that `desired` lacks are removed.
///
/// Cost is proportional to the touched frontends and their backends.
pub fn plan(applied: &Applied, desired: &DesiredState, touched: &BTreeSet<Frontend>) -> Plan {
    let mut p = Planner {
        applied,
        ix: applied.index(),
        desired,
        prepare: Vec::new(),
        ids: HashMap::new(),
        reserved: BTreeSet::new(),
        rev_reserved: BTreeSet::new(),
        next_rev: 1,
    };
    let mut frontends = Vec::new();
    for fe in touched {
        let ops = match desired.frontends.get(fe) {
            Some(st) => p.update(fe, st),
            None => p.remove(fe),
        };
        if !ops.is_empty() {
            frontends.push((*fe, ops));
        }
    }
    Plan {
        prepare: p.prepare,
        frontends,
    }
}

/// State of one [`plan`] call: ids handed out so far, and the prepare ops.
struct Planner<'a> {
    applied: &'a Applied,
    ix: &'a Index,
    desired: &'a DesiredState,
    prepare: Vec<MapOp>,
    /// Backends whose id (and PutBackend, if needed) this plan already settled.
    ids: HashMap<BackendAddr, u32>,
    /// New backend / rev-NAT ids handed out in this plan.
    reserved: BTreeSet<u32>,
    rev_reserved: BTreeSet<u32>,
    /// Every pool id below this one is taken or reserved (new rev-NAT ids are handed out in
    /// increasing order), so the search for the next one starts here.
    next_rev: u32,
}

impl Planner<'_> {
    /// Most slots a frontend can have (slot numbers are u16, 0 is the master).
    const MAX_SLOTS: usize = u16::MAX as usize;

    fn update(&mut self, fe: &Frontend, st: &FrontendState) -> Vec<MapOp> {
        let cur = self.applied.frontends.get(fe);
        let old: &[u32] = cur.map(|c| c.slots.as_slice()).unwrap_or(&[]);
        let fallback = if st.flags & SVC_FLAG_TERMINATING_FALLBACK != 0 {
            BACKEND_TERMINATING
        } else {
            BACKEND_ACTIVE
        };
        let ids: Vec<u32> = st
            .backends
            .iter()
            .take(Self::MAX_SLOTS)
            .map(|b| self.backend(b, fallback))
            .collect();
        let rev = self.rev_nat(fe, cur);
        self.restate_leaving(old);
        let new = slots::assign(old, &ids);
        let n = new.len();
        let mut ops = Vec::new();
        for (i, &id) in new.iter().enumerate() {
            if old.get(i) != Some(&id) {
                ops.push(MapOp::PutSlot {
                    frontend: *fe,
                    slot: slot_no(i),
                    backend_id: id,
                });
            }
        }
        let master_ok = cur.is_some_and(|c| {
            c.has_master()
                && c.rev_nat_id == rev
                && c.count as usize == n
                && c.flags == st.flags
                && c.affinity_timeout == st.affinity_timeout
        });
        if !master_ok {
            ops.push(MapOp::PutMaster {
                frontend: *fe,
                count: n as u32,
                rev_nat_id: rev,
                flags: st.flags,
                affinity_timeout: st.affinity_timeout,
            });
        }
        for (i, &id) in old.iter().enumerate().skip(n) {
            if id != 0 {
                ops.push(MapOp::DeleteSlot {
                    frontend: *fe,
                    slot: slot_no(i),
                });
            }
        }
        ops
    }

    /// Master first (new flows stop at once), then the slots.
    fn remove(&mut self, fe: &Frontend) -> Vec<MapOp> {
        let Some(cur) = self.applied.frontends.get(fe) else {
            return Vec::new();
        };
        self.restate_leaving(&cur.slots);
        let mut ops = vec![MapOp::DeleteMaster { frontend: *fe }];
        for (i, &id) in cur.slots.iter().enumerate() {
            if id != 0 {
                ops.push(MapOp::DeleteSlot {
                    frontend: *fe,
                    slot: slot_no(i),
                });
            }
        }
        ops
    }

    /// A backend's state depends on every frontend using it: when a touched frontend stops using
    /// a backend that other (untouched) frontends keep, its state may change (e.g. the last
    /// frontend using it as ready went away: now it is only a terminating fallback).
    fn restate_leaving(&mut self, old_slots: &[u32]) {
        for id in old_slots {
            let Some((b, _)) = self.applied.backends.get(id) else {
                continue;
            };
            if self.desired.backend_state(b).is_some() {
                self.backend(b, BACKEND_ACTIVE);
            }
        }
    }

    /// The id of a desired backend; queues its PutBackend when it is new or changes state.
    fn backend(&mut self, b: &BackendAddr, fallback_state: u8) -> u32 {
        if let Some(&id) = self.ids.get(b) {
            return id;
        }
        let state = self.desired.backend_state(b).unwrap_or(fallback_state);
        let id = match self.ix.backend_of.get(b) {
            Some(&id) => {
                if self.applied.backends.get(&id).map(|(_, s)| *s) != Some(state) {
                    self.prepare.push(MapOp::PutBackend {
                        id,
                        backend: *b,
                        state,
                    });
                }
                id
            }
            None => {
                let from = self
                    .reserved
                    .last()
                    .map_or(1, |last| last.saturating_add(1));
                let id = self
                    .ix
                    .backends
                    .pool
                    .smallest_free_from(from, &self.reserved);
                self.reserved.insert(id);
                self.prepare.push(MapOp::PutBackend {
                    id,
                    backend: *b,
                    state,
                });
                id
            }
        };
        self.ids.insert(*b, id);
        id
    }

    /// The rev-NAT id of a desired frontend: its REV_NAT entry's, else the id its master already
    /// uses (if free), else a new one; queues the PutRevNat when the entry is missing.
    fn rev_nat(&mut self, fe: &Frontend, cur: Option<&AppliedFrontend>) -> u32 {
        if let Some(&id) = self.ix.rev_of.get(fe) {
            return id;
        }
        let id = cur
            .map(|c| c.rev_nat_id)
            .filter(|&id| {
                id != 0
                    && !self.applied.rev_nat.contains_key(&id)
                    && !self.rev_reserved.contains(&id)
            })
            .unwrap_or_else(|| {
                let from = self.next_rev;
                self.ix
                    .revs
                    .pool
                    .smallest_free_from(from, &self.rev_reserved)
            });
        if self.ix.revs.pool.is_free(id) && id >= self.next_rev {
            self.next_rev = id.saturating_add(1);
        }
        self.rev_reserved.insert(id);
        self.prepare.push(MapOp::PutRevNat { id, frontend: *fe });
        id
    }
}

/// Slot number of slot index `i` (index 0 = slot 1).
fn slot_no(i: usize) -> u16 {
    u16::try_from(i + 1).unwrap_or(u16::MAX)
}

/// Every frontend in either state (for a full reconcile after start or resync).
pub fn all_frontends(applied: &Applied, desired: &DesiredState) -> BTreeSet<Frontend> {
    applied
        .frontends
        .keys()
        .chain(desired.frontends.keys())
        .copied()
        .collect()
}
