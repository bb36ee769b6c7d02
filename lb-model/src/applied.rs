//! What is in the maps: [`Applied`], kept up to date with every map operation that succeeded
//! ([`Applied::apply`]), and the garbage it leaves ([`Applied::gc`]).
//!
//! New backend and frontend (rev-NAT) ids come from a cursor that only moves forward, so a freed
//! id is not handed out again while conntrack or affinity entries may still hold it (see `ids.rs`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::OnceLock;

use crate::ids::{advance, Cursors, IdPool, IdSpace};
use crate::maglev::{self, Geometry};
use crate::planner::MapOp;
use crate::svcport::SvcPortName;
use crate::{BackendAddr, Cidr, Frontend};

/// One frontend as it is in the maps.
///
/// The master entry (slot 0) exists iff `rev_nat_id != 0` (every master xlb writes has an id
/// >= 1); an entry with `rev_nat_id == 0` only describes leftover slots, members or source
/// ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct AppliedFrontend {
    /// The identity of this incarnation of the frontend, as its master holds it: it stays while
    /// the frontend exists, and a frontend that is removed and created again gets a new one.
    /// Conntrack and affinity entries carry it, so a connection or a client pinned to an earlier
    /// Service at the same address is not taken for one of this Service. (The name is
    /// Cilium's; xlb keeps no reverse-NAT table: reply entries carry the frontend itself.)
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
    /// SRC_RANGES entries of this frontend's (address, port, protocol): client ranges allowed
    /// in when the master has `SVC_FLAG_SOURCE_RANGES`. Filed under the `SCOPE_EXT` frontend
    /// (the trie key has no scope).
    pub src_ranges: BTreeSet<Cidr>,
    /// The Maglev table the master names (`SVC_FLAG_ALG_MAGLEV` with at least one backend, see
    /// [`maglev::names_table`]; the master's `backend_id` field holds it). A table named by a
    /// master is never written: a changed backend set is written whole into a free table,
    /// then the master is switched to it, which frees the old one.
    pub table: Option<u32>,
    /// The Service port id the master carries ([`crate::svcport`]); 0: none.
    pub svc_port_id: u32,
}

impl AppliedFrontend {
    pub(crate) fn has_master(&self) -> bool {
        self.rev_nat_id != 0
    }
    /// Nothing of the frontend is left in the maps.
    fn is_empty(&self) -> bool {
        !self.has_master()
            && self.slots.is_empty()
            && self.members.is_empty()
            && self.src_ranges.is_empty()
    }
}

/// The `MAGLEV` array: its shape and what xlb knows of its tables.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct AppliedTables {
    /// The array's shape (M and the number of tables), from the map.
    pub geometry: Geometry,
    /// Table index -> the backend ids it holds (sorted, distinct), for the tables whose
    /// content is known: written by a plan, or read back and found equal, entry for entry, to
    /// the table those backends give. A table whose write may have failed half-way is not
    /// here. A master naming a table that is not here gets a new table at the next plan.
    pub content: BTreeMap<u32, Vec<u32>>,
}

/// The datapath maps' content, as the agent last wrote (or read back) it.
///
/// Change it through [`Applied::apply`]: that keeps a private index (address -> id, ids in use,
/// unreferenced ids) and the id cursors up to date, so planning one Service does not scan the
/// whole maps. The index is built lazily on first use; after editing the public fields directly
/// (e.g. in a test) call [`Applied::reindex`] if the index may already have been built.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    pub frontends: BTreeMap<Frontend, AppliedFrontend>,
    /// Backend id -> (address, state `lb_common::BACKEND_*`).
    pub backends: BTreeMap<u32, (BackendAddr, u8)>,
    /// Frontend id (`rev_nat_id`) -> the frontend whose master holds it: the masters indexed by
    /// id, for whoever meets an id in a conntrack or affinity entry. No map of its own; kept by
    /// [`Applied::apply`] and rebuilt from the masters by a read-back.
    pub rev_nat: BTreeMap<u32, Frontend>,
    /// The Maglev tables ([`AppliedFrontend::table`] says which master names which).
    pub maglev: AppliedTables,
    /// The frontend pre-filter's words and the clears a sweep decided (not compared: the
    /// filter is a cache of the other maps and the conntrack table).
    pub filter: crate::fefilter::Filter,
    /// The reply pre-filter (bit = backend port, see `fefilter`), kept like `filter`.
    pub port_filter: crate::fefilter::Filter,
    /// SVCNAME: Service port id -> its name.
    pub svc_names: BTreeMap<u32, SvcPortName>,
    /// The Service port ids SVCNAME / SVCSTATS have room for (`1..=` this; the maps' size,
    /// `--service-ports-max`). 0: [`lb_common::DEFAULT_SVC_PORTS_MAX`].
    pub svc_ports_max: u32,
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
            && self.svc_names == other.svc_names
            && self.maglev.geometry == other.maglev.geometry
            // The content of tables no master names is history (kept for re-use), not state.
            && self.frontends.values().filter_map(|af| af.table).all(|t| {
                self.maglev.content.get(&t) == other.maglev.content.get(&t)
            })
    }
}
impl Eq for Applied {}

/// Derived lookups over [`Applied`].
#[derive(Clone, Debug)]
pub(crate) struct Index {
    /// Address -> id (the smallest id when a read-back map holds an address twice).
    pub backend_of: HashMap<BackendAddr, u32>,
    /// Backend ids; referrers are slots and member entries.
    pub backends: IdSpace,
    /// Frontend ids; referrers are masters (they have no map entry of their own).
    pub revs: IdSpace,
    /// Maglev table index -> how many masters name it (absent: free).
    pub tables: HashMap<u32, u32>,
    /// Service port name -> id (the smallest id when a read-back map holds a name twice).
    pub svc_of: HashMap<SvcPortName, u32>,
    /// Service port ids (bounded); referrers are masters, the entry is the SVCNAME one.
    pub svcs: IdSpace,
    /// Past the largest ids present (entries or references) when the index was built.
    pub cursors: Cursors,
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
        let mut max_rev = 0;
        let mut tables: HashMap<u32, u32> = HashMap::new();
        let mut max_table = None;
        for af in a.frontends.values() {
            if let Some(t) = af.table {
                *tables.entry(t).or_default() += 1;
                max_table = max_table.max(Some(t));
            }
            for &id in af.slots.iter().chain(&af.members) {
                backends.add_ref(id, a.backends.contains_key(&id));
                max_backend = max_backend.max(id);
            }
            revs.add_ref(af.rev_nat_id, false);
            max_rev = max_rev.max(af.rev_nat_id);
        }
        for id in a.backends.keys() {
            backends.refresh(*id, true);
        }
        let mut svcs = IdSpace::with_pool(IdPool::bounded(a.svc_ports_max()));
        let mut svc_of = HashMap::new();
        let mut max_svc = a.svc_names.keys().next_back().copied().unwrap_or(0);
        for (id, name) in &a.svc_names {
            svc_of.entry(name.clone()).or_insert(*id);
        }
        for af in a.frontends.values() {
            svcs.add_ref(af.svc_port_id, a.svc_names.contains_key(&af.svc_port_id));
            max_svc = max_svc.max(af.svc_port_id);
        }
        for id in a.svc_names.keys() {
            svcs.refresh(*id, true);
        }
        let max_svc = if max_svc >= a.svc_ports_max() {
            0
        } else {
            max_svc
        };
        let mut cursors = Cursors::past(max_backend, max_rev).with_svc_port(max_svc);
        cursors.table = max_table.map_or(0, |t| next_table(t, a.maglev.geometry));
        Index {
            backend_of,
            backends,
            revs,
            tables,
            svc_of,
            svcs,
            cursors,
        }
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
                table,
                svc_port_id,
            } => {
                if let Some(c) = &mut self.cursors {
                    advance(&mut c.rev_nat, rev_nat_id);
                }
                let e = self.frontends.entry(frontend).or_default();
                let old = std::mem::replace(&mut e.rev_nat_id, rev_nat_id);
                let old_svc = std::mem::replace(&mut e.svc_port_id, svc_port_id);
                e.count = count;
                e.flags = flags;
                e.affinity_timeout = affinity_timeout;
                let new_table = maglev::names_table(flags, count).then_some(table);
                let old_table = std::mem::replace(&mut e.table, new_table);
                unindex_master(&mut self.rev_nat, old, &frontend);
                if rev_nat_id != 0 {
                    self.rev_nat.insert(rev_nat_id, frontend);
                }
                if let Some(ix) = ix {
                    ix.revs.drop_ref(old, false);
                    ix.revs.add_ref(rev_nat_id, false);
                    if old_svc != svc_port_id {
                        ix.svcs
                            .drop_ref(old_svc, self.svc_names.contains_key(&old_svc));
                        ix.svcs
                            .add_ref(svc_port_id, self.svc_names.contains_key(&svc_port_id));
                    }
                    if old_table != new_table {
                        unuse_table(&mut ix.tables, old_table);
                        if let Some(t) = new_table {
                            *ix.tables.entry(t).or_default() += 1;
                        }
                    }
                }
            }
            MapOp::PutMaglevTable {
                table,
                ref backends,
                ..
            } => {
                self.maglev.content.insert(table, backends.clone());
                if let Some(c) = &mut self.cursors {
                    c.table = next_table(table, self.maglev.geometry);
                }
            }
            MapOp::PutSvcName { id, ref name } => {
                if let Some(c) = &mut self.cursors {
                    advance_svc(&mut c.svc_port, id, self.svc_ports_max);
                }
                let old = self.svc_names.insert(id, name.clone());
                if let Some(ix) = ix {
                    if let Some(old) = old.filter(|o| o != name) {
                        forget(&mut ix.svc_of, &old, id);
                    }
                    ix.svc_of.entry(name.clone()).or_insert(id);
                    ix.svcs.refresh(id, true);
                }
            }
            MapOp::DeleteSvcName { id } => {
                let old = self.svc_names.remove(&id);
                if let Some(ix) = ix {
                    if let Some(old) = old {
                        forget(&mut ix.svc_of, &old, id);
                    }
                    ix.svcs.refresh(id, false);
                }
            }
            MapOp::PutSrcRange { frontend, range } => {
                self.frontends
                    .entry(frontend)
                    .or_default()
                    .src_ranges
                    .insert(crate::cidr::normalize(range));
            }
            MapOp::DeleteSrcRange { frontend, range } => {
                let Some(e) = self.frontends.get_mut(&frontend) else {
                    return;
                };
                e.src_ranges.remove(&crate::cidr::normalize(range));
                if e.is_empty() {
                    self.frontends.remove(&frontend);
                }
            }
            MapOp::DeleteMaster { frontend } => {
                let Some(e) = self.frontends.get_mut(&frontend) else {
                    return;
                };
                let old = std::mem::take(&mut e.rev_nat_id);
                let old_svc = std::mem::take(&mut e.svc_port_id);
                e.count = 0;
                e.flags = 0;
                e.affinity_timeout = 0;
                let old_table = e.table.take();
                if e.is_empty() {
                    self.frontends.remove(&frontend);
                }
                unindex_master(&mut self.rev_nat, old, &frontend);
                if let Some(ix) = ix {
                    ix.revs.drop_ref(old, false);
                    ix.svcs
                        .drop_ref(old_svc, self.svc_names.contains_key(&old_svc));
                    unuse_table(&mut ix.tables, old_table);
                }
            }
        }
    }

    /// Forget what Maglev table `table` holds: it is about to be written, and a write that
    /// fails may leave it half-written (the executor calls this before each table write).
    pub fn forget_table(&mut self, table: u32) {
        self.maglev.content.remove(&table);
    }

    /// How many masters name Maglev table `table` (0: the table is free).
    pub fn table_users(&self, table: u32) -> u32 {
        self.index().tables.get(&table).copied().unwrap_or(0)
    }

    /// The frontends whose slots or members name a backend that one of `ops` (`PutBackend`)
    /// writes. A scan of every frontend: for the executor's failure path only.
    pub fn frontends_using(&self, ops: &[MapOp]) -> Vec<Frontend> {
        let ids: BTreeSet<u32> = ops
            .iter()
            .filter_map(|op| match *op {
                MapOp::PutBackend { id, .. } => Some(id),
                _ => None,
            })
            .collect();
        if ids.is_empty() {
            return Vec::new();
        }
        self.frontends
            .iter()
            .filter(|(_, af)| {
                af.slots
                    .iter()
                    .chain(&af.members)
                    .any(|id| ids.contains(id))
            })
            .map(|(fe, _)| *fe)
            .collect()
    }

    /// Deletes of backends no slot or member entry refers to any more. Run after the frontend
    /// ops of a plan, so nothing in use is removed.
    pub fn gc(&self) -> Vec<MapOp> {
        let ix = self.index();
        ix.backends
            .unused
            .iter()
            .map(|&id| MapOp::DeleteBackend { id })
            .chain(ix.svcs.unused.iter().map(|&id| MapOp::DeleteSvcName { id }))
            .collect()
    }

    /// The Service port ids SVCNAME has room for (see [`Applied::svc_ports_max`] field).
    pub fn svc_ports_max(&self) -> u32 {
        if self.svc_ports_max == 0 {
            lb_common::DEFAULT_SVC_PORTS_MAX
        } else {
            self.svc_ports_max
        }
    }

    /// The name of the Service port a frontend's master names, if any.
    pub fn svc_name_of(&self, fe: &Frontend) -> Option<&SvcPortName> {
        let id = self.frontends.get(fe)?.svc_port_id;
        self.svc_names.get(&id)
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

    /// Make the next new backend id the first unused one at or after `id`.
    ///
    /// The agent never calls this: its cursors only move forward (see `ids.rs`). It is for
    /// callers that must know the ids in advance, such as the packet tests, which name them.
    pub fn seek_backend_id(&mut self, id: u32) {
        let mut c = self.cursors();
        c.backend = id.max(1);
        self.cursors = Some(c);
    }

    /// Make the next new frontend id (`rev_nat_id`) the first unused one at or after `id`.
    /// As [`Applied::seek_backend_id`], never called by the agent.
    pub fn seek_rev_nat_id(&mut self, id: u32) {
        let mut c = self.cursors();
        c.rev_nat = id.max(1);
        self.cursors = Some(c);
    }

    /// Drop the derived index; call after editing the public fields directly.
    pub fn reindex(&mut self) {
        self.index = OnceLock::new();
    }

    /// Build the private index now rather than at the first plan (the agent does it as part of
    /// its read-back, so the first plan after a restart does not pay for it).
    pub fn build_index(&self) {
        self.index();
    }

    pub(crate) fn index(&self) -> &Index {
        self.index.get_or_init(|| Index::build(self))
    }

    pub(crate) fn cursors(&self) -> Cursors {
        self.cursors.unwrap_or_else(|| self.index().cursors)
    }
}

/// Move the Service port cursor past `id` when it lies at or ahead of it, wrapping at `max`.
fn advance_svc(cursor: &mut u32, id: u32, max: u32) {
    let max = if max == 0 {
        lb_common::DEFAULT_SVC_PORTS_MAX
    } else {
        max
    };
    if id != 0 && id >= *cursor && id <= max {
        *cursor = if id == max { 1 } else { id + 1 };
    }
}

/// The table index after `table`, wrapping at the number of tables.
fn next_table(table: u32, g: Geometry) -> u32 {
    table.wrapping_add(1) % g.tables.max(1)
}

/// One master fewer names `table`.
fn unuse_table(tables: &mut HashMap<u32, u32>, table: Option<u32>) {
    let Some(t) = table else { return };
    if let Some(n) = tables.get_mut(&t) {
        *n -= 1;
        if *n == 0 {
            tables.remove(&t);
        }
    }
}

/// Forget `id -> frontend` when that master held it (two masters of a read-back map may share
/// an id; the other one keeps it).
fn unindex_master(rev_nat: &mut BTreeMap<u32, Frontend>, id: u32, frontend: &Frontend) {
    if id != 0 && rev_nat.get(&id) == Some(frontend) {
        rev_nat.remove(&id);
    }
}

/// Remove `key -> id` from a reverse map if it still points at `id`.
fn forget<K: std::hash::Hash + Eq>(m: &mut HashMap<K, u32>, key: &K, id: u32) {
    if m.get(key) == Some(&id) {
        m.remove(key);
    }
}
