//! What is in the maps ([`Applied`]), and the ordered operations that turn it into the desired state.
//!
//! Update order (DESIGN.md section 3; no blackhole, never a half-written Service): write new
//! backends, then the MEMBERS entries of backends entering the frontend, then slots up to
//! max(old, new), then the master with the new count, then delete slots above the new count, then
//! the MEMBERS entries of backends that left; unused backends and rev-NAT entries are deleted last
//! ([`Applied::gc`]). A removed frontend goes in reverse: master first, then its slots, then its
//! members. So every slot `1..=count` of a master always names a backend that exists and is a
//! member of that frontend.
//!
//! New backend and rev-NAT ids come from a cursor that only moves forward, so a freed id is not
//! handed out again while conntrack or affinity entries may still hold it (see `ids.rs`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::OnceLock;

use lb_common::{BACKEND_ACTIVE, BACKEND_TERMINATING, SVC_FLAG_TERMINATING_FALLBACK};

use crate::desired::{DesiredState, FrontendState};
use crate::ids::{advance, id_after, Cursors, IdSpace};
use crate::slots;
use crate::{BackendAddr, Frontend};

/// One frontend as it is in the maps.
///
/// The master entry (slot 0) exists iff `rev_nat_id != 0` (every master xlb writes has a rev-NAT
/// id >= 1); an entry with `rev_nat_id == 0` only describes leftover slots or members.
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
    /// Backend ids with a MEMBERS entry for this frontend, holding that backend's address.
    pub members: BTreeSet<u32>,
}

impl AppliedFrontend {
    fn has_master(&self) -> bool {
        self.rev_nat_id != 0
    }
    /// Nothing of the frontend is left in the maps.
    fn is_empty(&self) -> bool {
        !self.has_master() && self.slots.is_empty() && self.members.is_empty()
    }
}

/// The datapath maps' content, as the agent last wrote (or read back) it.
///
/// Change it through [`Applied::apply`]: that keeps a private index (address -> id, ids in use,
/// unreferenced ids) and the id cursors up to date, so planning one Service does not scan the
/// whole maps. The index is built lazily on first use; after editing the public fields directly
/// (e.g. while reading the maps back) call [`Applied::reindex`] if the index may already have
/// been built.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    pub frontends: BTreeMap<Frontend, AppliedFrontend>,
    /// Backend id -> (address, state `lb_common::BACKEND_*`).
    pub backends: BTreeMap<u32, (BackendAddr, u8)>,
    /// Rev-NAT id -> frontend it restores.
    pub rev_nat: BTreeMap<u32, Frontend>,
    index: OnceLock<Index>,
    /// Where new ids are searched from. History, not map content: it survives
    /// [`Applied::reindex`] and is not compared. `None` until the first [`Applied::apply`]
    /// (until then, the index's cursors past the largest ids present stand for it).
    cursors: Option<Cursors>,
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
#[derive(Clone, Debug)]
struct Index {
    /// Address -> id (the smallest id when a read-back map holds an address twice).
    backend_of: HashMap<BackendAddr, u32>,
    /// Backend ids; referrers are slots and member entries.
    backends: IdSpace,
    /// Rev-NAT ids; referrers are masters.
    revs: IdSpace,
    /// Past the largest ids present (entries or references) when the index was built.
    cursors: Cursors,
}

impl Index {
    fn build(a: &Applied) -> Index {
        let mut backend_of = HashMap::new();
        let mut backends = IdSpace::default();
        let mut revs = IdSpace::default();
        for (id, (b, _)) in &a.backends {
            backend_of.entry(*b).or_insert(*id);
        }
        let mut max_backend = a.backends.keys().next_back().copied().unwrap_or(0);
        let mut max_rev = a.rev_nat.keys().next_back().copied().unwrap_or(0);
        for af in a.frontends.values() {
            for &id in af.slots.iter().chain(&af.members) {
                backends.add_ref(id, a.backends.contains_key(&id));
                max_backend = max_backend.max(id);
            }
            revs.add_ref(af.rev_nat_id, a.rev_nat.contains_key(&af.rev_nat_id));
            max_rev = max_rev.max(af.rev_nat_id);
        }
        for id in a.backends.keys() {
            backends.refresh(*id, true);
        }
        for id in a.rev_nat.keys() {
            revs.refresh(*id, true);
        }
        Index {
            backend_of,
            backends,
            revs,
            cursors: Cursors::past(max_backend, max_rev),
        }
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
    /// MEMBERS entry: backend `backend_id`, at address `backend`, is a member of `frontend`.
    /// Written before any slot of the frontend names the id.
    PutMember {
        frontend: Frontend,
        backend_id: u32,
        backend: BackendAddr,
    },
    /// Deleted after no slot `1..=count` of the frontend names the id any more.
    DeleteMember {
        frontend: Frontend,
        backend_id: u32,
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
    /// skipped, or a slot or member would name a missing backend (or a master a missing rev-NAT).
    pub fn blocked_by(&self, failed: &[MapOp]) -> BTreeSet<Frontend> {
        let mut backends = BTreeSet::new();
        let mut revs = BTreeSet::new();
        for op in failed {
            match *op {
                MapOp::PutBackend { id, .. } => backends.insert(id),
                MapOp::PutRevNat { id, .. } => revs.insert(id),
                _ => false,
            };
        }
        let needs = |op: &MapOp| match op {
            MapOp::PutSlot { backend_id, .. } | MapOp::PutMember { backend_id, .. } => {
                backends.contains(backend_id)
            }
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
        if self.cursors.is_none() {
            // Fixed from the content before the first change, as a plan on it saw them.
            self.cursors = Some(self.index().cursors);
        }
        let ix = self.index.get_mut();
        match *op {
            MapOp::PutBackend { id, backend, state } => {
                if let Some(c) = &mut self.cursors {
                    advance(&mut c.backend, id);
                }
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
                if let Some(c) = &mut self.cursors {
                    advance(&mut c.rev_nat, id);
                }
                self.rev_nat.insert(id, frontend);
                if let Some(ix) = ix {
                    ix.revs.refresh(id, true);
                }
            }
            MapOp::DeleteRevNat { id } => {
                self.rev_nat.remove(&id);
                if let Some(ix) = ix {
                    ix.revs.refresh(id, false);
                }
            }
            MapOp::PutMember {
                frontend,
                backend_id,
                ..
            } => {
                let e = self.frontends.entry(frontend).or_default();
                if e.members.insert(backend_id) {
                    if let Some(ix) = ix {
                        ix.backends
                            .add_ref(backend_id, self.backends.contains_key(&backend_id));
                    }
                }
            }
            MapOp::DeleteMember {
                frontend,
                backend_id,
            } => {
                let Some(e) = self.frontends.get_mut(&frontend) else {
                    return;
                };
                if !e.members.remove(&backend_id) {
                    return;
                }
                if e.is_empty() {
                    self.frontends.remove(&frontend);
                }
                if let Some(ix) = ix {
                    ix.backends
                        .drop_ref(backend_id, self.backends.contains_key(&backend_id));
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
                if e.is_empty() {
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
                if e.is_empty() {
                    self.frontends.remove(&frontend);
                }
                if let Some(ix) = ix {
                    ix.revs.drop_ref(old, self.rev_nat.contains_key(&old));
                }
            }
        }
    }

    /// Deletes of backends no slot or member entry refers to any more, and of rev-NAT entries
    /// whose frontend is gone. Run after the frontend ops of a plan, so nothing in use is removed.
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

    /// Backend id for an address: the existing one (ids are stable), else the id a plan would
    /// hand out next: the first unused id from the cursor on that is not in `reserved` (ids
    /// already handed out in the same plan).
    pub fn backend_id(&self, b: &BackendAddr, reserved: &BTreeSet<u32>) -> u32 {
        let ix = self.index();
        match ix.backend_of.get(b) {
            Some(&id) => id,
            None => ix.backends.pool.next_free(self.cursors().backend, reserved),
        }
    }

    /// Drop the derived index; call after editing the public fields directly.
    pub fn reindex(&mut self) {
        self.index = OnceLock::new();
    }

    fn index(&self) -> &Index {
        self.index.get_or_init(|| Index::build(self))
    }

    fn cursors(&self) -> Cursors {
        self.cursors.unwrap_or_else(|| self.index().cursors)
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
        cursors: applied.cursors(),
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
    /// Where the next new ids are searched from; past every id this plan handed out.
    cursors: Cursors,
}

impl Planner<'_> {
    /// Most slots a frontend can have (slot numbers are u16, 0 is the master).
    const MAX_SLOTS: usize = u16::MAX as usize;

    fn update(&mut self, fe: &Frontend, st: &FrontendState) -> Vec<MapOp> {
        let cur = self.applied.frontends.get(fe);
        let old: &[u32] = cur.map(|c| c.slots.as_slice()).unwrap_or(&[]);
        let members = cur.map(|c| &c.members);
        let fallback = if st.flags & SVC_FLAG_TERMINATING_FALLBACK != 0 {
            BACKEND_TERMINATING
        } else {
            BACKEND_ACTIVE
        };
        let wanted: Vec<(u32, &BackendAddr)> = st
            .backends
            .iter()
            .take(Self::MAX_SLOTS)
            .map(|b| (self.backend(b, fallback), b))
            .collect();
        let ids: Vec<u32> = wanted.iter().map(|(id, _)| *id).collect();
        let rev = self.rev_nat(fe, cur);
        self.restate_leaving(cur);
        let new = slots::assign(old, &ids);
        let n = new.len();
        // Members first: a slot may name an id only once the id is a member.
        let mut ops: Vec<MapOp> = wanted
            .iter()
            .filter(|(id, _)| !members.is_some_and(|m| m.contains(id)))
            .map(|&(backend_id, b)| MapOp::PutMember {
                frontend: *fe,
                backend_id,
                backend: *b,
            })
            .collect();
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
        delete_slots(fe, old, n, &mut ops);
        // Members last: only now does no slot 1..=count name the ids that left.
        if let Some(members) = members.filter(|m| !m.is_empty()) {
            let staying: BTreeSet<u32> = new.iter().copied().collect();
            delete_members(fe, members.difference(&staying), &mut ops);
        }
        ops
    }

    /// Master first (new flows stop at once), then the slots, then the members.
    fn remove(&mut self, fe: &Frontend) -> Vec<MapOp> {
        let Some(cur) = self.applied.frontends.get(fe) else {
            return Vec::new();
        };
        self.restate_leaving(Some(cur));
        let mut ops = Vec::new();
        if cur.has_master() {
            ops.push(MapOp::DeleteMaster { frontend: *fe });
        }
        delete_slots(fe, &cur.slots, 0, &mut ops);
        delete_members(fe, cur.members.iter(), &mut ops);
        ops
    }

    /// A backend's state depends on every frontend using it: when a touched frontend stops using
    /// a backend that other (untouched) frontends keep, its state may change (e.g. the last
    /// frontend using it as ready went away: now it is only a terminating fallback).
    fn restate_leaving(&mut self, cur: Option<&AppliedFrontend>) {
        let Some(cur) = cur else {
            return;
        };
        for id in cur.slots.iter().chain(&cur.members) {
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
                let id = self
                    .ix
                    .backends
                    .pool
                    .next_free(self.cursors.backend, &self.reserved);
                self.cursors.backend = id_after(id);
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

    /// The rev-NAT id of a desired frontend: the one its master uses when the REV_NAT entry
    /// restores this frontend, or is missing (queues its PutRevNat); else a new id. A frontend
    /// without a master gets a new id even when an unused REV_NAT entry for it is still there, so
    /// a re-created Service never shares conntrack or affinity entries with its earlier self.
    fn rev_nat(&mut self, fe: &Frontend, cur: Option<&AppliedFrontend>) -> u32 {
        let kept = cur.filter(|c| c.has_master()).map(|c| c.rev_nat_id);
        if let Some(id) = kept {
            match self.applied.rev_nat.get(&id) {
                Some(f) if f == fe => return id,
                None if !self.rev_reserved.contains(&id) => {
                    self.rev_reserved.insert(id);
                    self.prepare.push(MapOp::PutRevNat { id, frontend: *fe });
                    return id;
                }
                _ => {}
            }
        }
        let id = self
            .ix
            .revs
            .pool
            .next_free(self.cursors.rev_nat, &self.rev_reserved);
        self.cursors.rev_nat = id_after(id);
        self.rev_reserved.insert(id);
        self.prepare.push(MapOp::PutRevNat { id, frontend: *fe });
        id
    }
}

/// Delete the slots of `old` from index `from` on (the ones above the new count).
fn delete_slots(fe: &Frontend, old: &[u32], from: usize, ops: &mut Vec<MapOp>) {
    for (i, &id) in old.iter().enumerate().skip(from) {
        if id != 0 {
            ops.push(MapOp::DeleteSlot {
                frontend: *fe,
                slot: slot_no(i),
            });
        }
    }
}

fn delete_members<'a>(fe: &Frontend, ids: impl Iterator<Item = &'a u32>, ops: &mut Vec<MapOp>) {
    ops.extend(ids.map(|&backend_id| MapOp::DeleteMember {
        frontend: *fe,
        backend_id,
    }));
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
