//! The planner: the ordered map operations ([`Plan`] of [`MapOp`]s) that turn what is in the
//! maps ([`Applied`]) into the desired state.
//!
//! Update order (no blackhole, never a half-written Service): write new backends, then the
//! MEMBERS entries of backends entering the frontend, then slots up to max(old, new), then the
//! master with the new count, then delete slots above the new count, then the MEMBERS entries of
//! backends that left; unused backends are deleted last ([`Applied::gc`]). A removed frontend
//! goes in reverse: master first, then its slots, then its members. So every slot `1..=count` of
//! a master always names a backend that exists and is a member of that frontend.
//! [`crate::store::execute`] runs a plan in this order.
//!
//! Source ranges (SRC_RANGES, `loadBalancerSourceRanges`) follow the same rule around the
//! master that carries `SVC_FLAG_SOURCE_RANGES`: ranges entering are written first in the
//! frontend's ops (before the master that may gain the flag), ranges leaving are deleted last
//! (after the master that may lose the flag, or after a removed frontend's master, slots and
//! members), so the datapath never checks a flagged master against missing ranges.
//!
//! The two scopes of one (address, port, protocol) (`SCOPE_EXT` and the `SCOPE_INT` entry of an
//! externalTrafficPolicy Local frontend) are planned as one unit: one entry of
//! [`Plan::frontends`], named by the `SCOPE_EXT` frontend, so a failure in either stops both,
//! and a retry of that frontend plans both. The datapath reads `SCOPE_INT` only through a
//! `SCOPE_EXT` master with `SVC_FLAG_TWO_SCOPES`, so when the desired `SCOPE_EXT` master has
//! that flag the `SCOPE_INT` ops come first (it is whole before the master can point pods at
//! it), and otherwise the `SCOPE_EXT` ops come first (the master has lost the flag before the
//! `SCOPE_INT` entry goes).
//!
//! New backend and frontend ids come from a cursor that only moves forward, so a freed id is not
//! handed out again while conntrack or affinity entries may still hold it (see `ids.rs`).
//!
//! Maglev tables (`SVC_FLAG_ALG_MAGLEV`, [`crate::maglev`]): a table is a pure function of a
//! backend set, so frontends with the same backends share one (all frontends of a Service port
//! usually do). A frontend keeps its table while its backend set stays ("rebuilt
//! incrementally": only frontends whose backends changed get a new one); otherwise it uses a
//! table already holding its new set, or one written for it: [`MapOp::PutMaglevTable`] writes
//! the whole table into a free index in the prepare phase (after the backends it names), and
//! the master switches to it in the frontend's ops, after its members and slots. The old table
//! is freed by that master write, never written while a master names it, and handed out again
//! only after every other free table (a cursor), so a packet that read the old master still
//! finds the old content. When no table is free, the frontend's ops are left out of the plan
//! and it is reported failed ([`Plan::unplanned`]), like a full map: nothing of it is written,
//! and the agent retries it.

use std::collections::{BTreeSet, HashMap};

use lb_common::{
    BACKEND_ACTIVE, BACKEND_TERMINATING, SCOPE_EXT, SCOPE_INT, SVC_FLAG_TERMINATING_FALLBACK,
    SVC_FLAG_TWO_SCOPES,
};

use crate::applied::{Applied, AppliedFrontend, Index};
use crate::desired::{DesiredState, FrontendState};
use crate::ids::Cursors;
use crate::maglev::{self, Entries};
use crate::slots;
use crate::svcport::SvcPortName;
use crate::{cidr, BackendAddr, Cidr, Frontend};

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
    /// The master entry (slot 0). `rev_nat_id` names this incarnation of the frontend (see
    /// [`crate::AppliedFrontend::rev_nat_id`]). `table`: the Maglev table it names when
    /// [`maglev::names_table`]`(flags, count)` (written whole before), else 0.
    PutMaster {
        frontend: Frontend,
        count: u32,
        rev_nat_id: u32,
        flags: u32,
        affinity_timeout: u32,
        table: u32,
        /// The frontend's Service port ([`crate::svcport`]); 0: none. Its SVCNAME entry is
        /// written before (a prepare op).
        svc_port_id: u32,
    },
    DeleteMaster {
        frontend: Frontend,
    },
    /// SRC_RANGES entry: clients in `range` may use `frontend` (a `SCOPE_EXT` frontend; the
    /// entry is keyed by its address, port and protocol). Written before the master that gets
    /// `SVC_FLAG_SOURCE_RANGES`.
    PutSrcRange {
        frontend: Frontend,
        range: Cidr,
    },
    /// Deleted after the master lost `SVC_FLAG_SOURCE_RANGES` (or no longer lists the range),
    /// or after the frontend is gone.
    DeleteSrcRange {
        frontend: Frontend,
        range: Cidr,
    },
    /// MAGLEV: Maglev table `table` written whole: `entries` (M backend ids), the table of the
    /// backends `backends` (their ids, sorted). A prepare op: written into a table no master
    /// names, after the backends, before the masters that will name it.
    PutMaglevTable {
        table: u32,
        backends: Vec<u32>,
        entries: Entries,
    },
    /// SVCNAME: Service port id `id` is `name`. A prepare op, before the masters that name
    /// the id; writing it also starts the id's per-Service counters from zero (the id may
    /// have counted for an earlier Service port).
    PutSvcName {
        id: u32,
        name: SvcPortName,
    },
    /// A gc op: no master names the id any more.
    DeleteSvcName {
        id: u32,
    },
}

impl MapOp {
    /// The frontend an op writes (`None` for a backend op).
    pub fn frontend(&self) -> Option<&Frontend> {
        match self {
            MapOp::PutBackend { .. }
            | MapOp::DeleteBackend { .. }
            | MapOp::PutMaglevTable { .. }
            | MapOp::PutSvcName { .. }
            | MapOp::DeleteSvcName { .. } => None,
            MapOp::PutMember { frontend, .. }
            | MapOp::DeleteMember { frontend, .. }
            | MapOp::PutSlot { frontend, .. }
            | MapOp::DeleteSlot { frontend, .. }
            | MapOp::PutMaster { frontend, .. }
            | MapOp::DeleteMaster { frontend }
            | MapOp::PutSrcRange { frontend, .. }
            | MapOp::DeleteSrcRange { frontend, .. } => Some(frontend),
        }
    }
}

/// Operations grouped so a failure (e.g. a full map) stops only the frontend it hit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// New/changed backends, written before any frontend refers to them.
    /// When one fails, skip the frontends [`Plan::blocked_by`] names.
    pub prepare: Vec<MapOp>,
    /// Per-frontend ops in update order. If one op fails, skip the rest of that frontend's ops.
    /// One entry holds both scopes of an (address, port, protocol) (see the module docs), named
    /// by its `SCOPE_EXT` frontend (or by its only frontend when it has no `SCOPE_EXT` one):
    /// planning that frontend again plans both.
    pub frontends: Vec<(Frontend, Vec<MapOp>)>,
    /// Plan entries (named as in [`Plan::frontends`]) that could not be planned, and why: no
    /// free Maglev table. Nothing of them is in the plan (they keep their state in the maps);
    /// the executor reports them failed, so the agent retries them.
    pub unplanned: Vec<(Frontend, String)>,
    /// Service ports that got no id because every id of `1..=--service-ports-max` is in use:
    /// their frontends are written with id 0 (no name, no per-Service counters).
    pub svc_ids_exhausted: Vec<SvcPortName>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.prepare.is_empty()
            && self.frontends.iter().all(|(_, ops)| ops.is_empty())
            && self.unplanned.is_empty()
    }
    pub fn op_count(&self) -> usize {
        self.prepare.len() + self.frontends.iter().map(|(_, o)| o.len()).sum::<usize>()
    }

    /// The frontends to skip because one of the `failed` prepare ops (backend writes) failed:
    /// those whose ops name a failed backend (a slot or member would name a missing backend),
    /// and those that hold it in `applied` (the maps before this plan's frontend ops). The
    /// second kind is not unsafe to run, but skipping it keeps it in the maps as it was, so
    /// re-planning it (the agent retries failed frontends) queues the backend write again: a
    /// state change of a backend the frontend keeps, or of one it leaves.
    ///
    /// A failed Maglev table write blocks the frontends whose master would name that table.
    pub fn blocked_by(&self, failed: &[MapOp], applied: &Applied) -> BTreeSet<Frontend> {
        let ids: BTreeSet<u32> = failed
            .iter()
            .filter_map(|op| match *op {
                MapOp::PutBackend { id, .. } => Some(id),
                _ => None,
            })
            .collect();
        let tables: BTreeSet<u32> = failed
            .iter()
            .filter_map(|op| match *op {
                MapOp::PutMaglevTable { table, .. } => Some(table),
                _ => None,
            })
            .collect();
        let svc_ids: BTreeSet<u32> = failed
            .iter()
            .filter_map(|op| match *op {
                MapOp::PutSvcName { id, .. } => Some(id),
                _ => None,
            })
            .collect();
        if ids.is_empty() && tables.is_empty() && svc_ids.is_empty() {
            return BTreeSet::new();
        }
        let names = |op: &MapOp| match op {
            MapOp::PutSlot { backend_id, .. }
            | MapOp::PutMember { backend_id, .. }
            | MapOp::DeleteMember { backend_id, .. } => ids.contains(backend_id),
            MapOp::PutMaster {
                flags,
                count,
                table,
                svc_port_id,
                ..
            } => {
                (maglev::names_table(*flags, *count) && tables.contains(table))
                    || svc_ids.contains(svc_port_id)
            }
            _ => false,
        };
        let holds = |fe: &Frontend| {
            [*fe, fe.with_scope(SCOPE_EXT), fe.with_scope(SCOPE_INT)]
                .iter()
                .filter_map(|fe| applied.frontends.get(fe))
                .any(|af| {
                    af.slots
                        .iter()
                        .chain(&af.members)
                        .any(|id| ids.contains(id))
                })
        };
        self.frontends
            .iter()
            .filter(|(fe, ops)| ops.iter().any(names) || holds(fe))
            .map(|(fe, _)| *fe)
            .collect()
    }
}

/// The ops that make `applied` match `desired` for the `touched` frontends (all frontends of
/// `applied` and `desired` for a full reconcile). Frontends in `touched` that `desired` lacks are removed.
/// A touched frontend brings the other scope of its (address, port, protocol) along (see the
/// module docs).
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
        tables: Vec::new(),
        table_of: HashMap::new(),
        table_reserved: BTreeSet::new(),
        known: None,
        svc_ids: HashMap::new(),
        svc_reserved: BTreeSet::new(),
        names: Vec::new(),
        svc_ids_exhausted: Vec::new(),
    };
    let mut frontends = Vec::new();
    let mut unplanned = Vec::new();
    // `touched` is sorted and the scope is the last field of a Frontend: the frontends of one
    // (address, port, protocol) are adjacent.
    let mut touched = touched.iter().peekable();
    while let Some(first) = touched.next() {
        let mut group: BTreeSet<Frontend> = BTreeSet::from([*first]);
        while let Some(fe) = touched.next_if(|fe| same_group(fe, first)) {
            group.insert(*fe);
        }
        let ext = first.with_scope(SCOPE_EXT);
        for fe in [ext, first.with_scope(SCOPE_INT)] {
            if applied.frontends.contains_key(&fe) || desired.frontends.contains_key(&fe) {
                group.insert(fe);
            }
        }
        let label = if group.contains(&ext) { ext } else { *first };
        let int_first = desired
            .frontends
            .get(&ext)
            .is_some_and(|st| st.flags & SVC_FLAG_TWO_SCOPES != 0);
        // Sorted: SCOPE_EXT (0) first. With TWO_SCOPES wanted it goes last.
        let mut order: Vec<Frontend> = group.into_iter().collect();
        if int_first && order[0] == ext {
            order.rotate_left(1);
        }
        let mut ops = Vec::new();
        let mut failed = None;
        for fe in &order {
            match desired.frontends.get(fe) {
                Some(st) => match p.update(fe, st) {
                    Ok(o) => ops.extend(o),
                    Err(e) => {
                        failed = Some(format!("{fe}: {e}"));
                        break;
                    }
                },
                None => ops.extend(p.remove(fe)),
            }
        }
        if let Some(e) = failed {
            // Nothing of the entry: both scopes keep what the maps hold.
            unplanned.push((label, e));
        } else if !ops.is_empty() {
            frontends.push((label, ops));
        }
    }
    let mut prepare = p.names;
    prepare.extend(p.prepare);
    // Tables after the backends they name.
    prepare.extend(p.tables);
    Plan {
        prepare,
        frontends,
        unplanned,
        svc_ids_exhausted: p.svc_ids_exhausted,
    }
}

/// Whether two frontends are scopes of one (address, port, protocol).
fn same_group(a: &Frontend, b: &Frontend) -> bool {
    (a.addr, a.port, a.proto) == (b.addr, b.port, b.proto)
}

/// State of one [`plan`] call: ids handed out so far, and the prepare ops.
struct Planner<'a> {
    applied: &'a Applied,
    ix: &'a Index,
    desired: &'a DesiredState,
    prepare: Vec<MapOp>,
    /// Backends whose id (and PutBackend, if needed) this plan already settled.
    ids: HashMap<BackendAddr, u32>,
    /// New backend / frontend ids handed out in this plan.
    reserved: BTreeSet<u32>,
    rev_reserved: BTreeSet<u32>,
    /// Where the next new ids are searched from; past every id this plan handed out.
    cursors: Cursors,
    /// `PutMaglevTable` ops, appended to `prepare` after the backends.
    tables: Vec<MapOp>,
    /// The table this plan gives each backend set (sorted ids): kept, re-used or written.
    table_of: HashMap<Vec<u32>, u32>,
    /// Tables this plan writes or re-uses: not free for another backend set.
    table_reserved: BTreeSet<u32>,
    /// Backend set -> a table of `applied` known to hold it (built on first use).
    known: Option<HashMap<Vec<u32>, u32>>,
    /// The id this plan gives each Service port (kept, found, or handed out).
    svc_ids: HashMap<SvcPortName, u32>,
    /// Service port ids handed out in this plan.
    svc_reserved: BTreeSet<u32>,
    /// `PutSvcName` ops of new ids: the first prepare ops.
    names: Vec<MapOp>,
    svc_ids_exhausted: Vec<SvcPortName>,
}

impl Planner<'_> {
    /// Most slots a frontend can have (slot numbers are u16, 0 is the master).
    const MAX_SLOTS: usize = u16::MAX as usize;

    /// The ops of a desired frontend; an error when it needs a Maglev table and none is free.
    fn update(&mut self, fe: &Frontend, st: &FrontendState) -> Result<Vec<MapOp>, String> {
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
        let svc_port_id = self.svc_port(st, cur);
        self.restate_leaving(cur);
        let new = slots::assign(old, &ids);
        let n = new.len();
        let table = if maglev::names_table(st.flags, n as u32) {
            Some(self.table(cur, &wanted)?)
        } else {
            None
        };
        // Source ranges entering first: the master may gain SVC_FLAG_SOURCE_RANGES below.
        let ranges = wanted_ranges(fe, st);
        let held_ranges = cur.map(|c| &c.src_ranges);
        let mut ops: Vec<MapOp> = ranges
            .iter()
            .filter(|r| !held_ranges.is_some_and(|h| h.contains(r)))
            .map(|&range| MapOp::PutSrcRange {
                frontend: *fe,
                range,
            })
            .collect();
        // Members next: a slot may name an id only once the id is a member.
        ops.extend(
            wanted
                .iter()
                .filter(|(id, _)| !members.is_some_and(|m| m.contains(id)))
                .map(|&(backend_id, b)| MapOp::PutMember {
                    frontend: *fe,
                    backend_id,
                    backend: *b,
                }),
        );
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
                && c.table == table
                && c.svc_port_id == svc_port_id
        });
        if !master_ok {
            ops.push(MapOp::PutMaster {
                frontend: *fe,
                count: n as u32,
                rev_nat_id: rev,
                flags: st.flags,
                affinity_timeout: st.affinity_timeout,
                table: table.unwrap_or(0),
                svc_port_id,
            });
        }
        delete_slots(fe, old, n, &mut ops);
        // Members last: only now does no slot 1..=count name the ids that left.
        if let Some(members) = members.filter(|m| !m.is_empty()) {
            let staying: BTreeSet<u32> = new.iter().copied().collect();
            delete_members(fe, members.difference(&staying), &mut ops);
        }
        // Ranges leaving last: the master no longer needs them (or lost the flag).
        if let Some(held) = held_ranges {
            delete_ranges(fe, held.difference(&ranges), &mut ops);
        }
        Ok(ops)
    }

    /// The Maglev table for the backends `wanted` (id, address) of a frontend whose maps
    /// state is `cur`: the one it names when that holds these backends; else one this plan
    /// already gives them; else a free table known to hold them; else a free table, written
    /// whole in the prepare phase. An error when no table is free.
    fn table(
        &mut self,
        cur: Option<&AppliedFrontend>,
        wanted: &[(u32, &BackendAddr)],
    ) -> Result<u32, String> {
        let g = self.applied.maglev.geometry;
        let mut key: Vec<u32> = wanted.iter().map(|(id, _)| *id).collect();
        key.sort_unstable();
        key.dedup();
        let content = &self.applied.maglev.content;
        if let Some(t) = cur.and_then(|c| c.table) {
            if t < g.tables && content.get(&t) == Some(&key) {
                self.table_of.entry(key).or_insert(t);
                return Ok(t);
            }
        }
        if let Some(&t) = self.table_of.get(&key) {
            return Ok(t);
        }
        if let Some(&t) = self.known().get(&key) {
            // Free tables this plan writes are not re-used for what they held.
            if self.ix.tables.contains_key(&t) || !self.table_reserved.contains(&t) {
                self.table_reserved.insert(t);
                self.table_of.insert(key, t);
                return Ok(t);
            }
        }
        let t = self.free_table().ok_or_else(|| {
            format!(
                "no free Maglev table (all {} are in use; raise --maglev-tables)",
                g.tables
            )
        })?;
        let backends: Vec<(BackendAddr, u32)> = wanted.iter().map(|(id, b)| (**b, *id)).collect();
        self.tables.push(MapOp::PutMaglevTable {
            table: t,
            backends: key.clone(),
            entries: maglev::table(&backends, g.m).into(),
        });
        self.table_of.insert(key, t);
        Ok(t)
    }

    /// Backend set -> a table of `applied` whose content is known to be that set (a table a
    /// master names when there are several).
    fn known(&mut self) -> &HashMap<Vec<u32>, u32> {
        let (applied, ix) = (self.applied, self.ix);
        self.known.get_or_insert_with(|| {
            let tables = applied.maglev.geometry.tables;
            let mut known: HashMap<Vec<u32>, u32> = HashMap::new();
            for (&t, ids) in applied.maglev.content.iter().filter(|(t, _)| **t < tables) {
                let named = ix.tables.contains_key(&t);
                known
                    .entry(ids.clone())
                    .and_modify(|held| {
                        if named && !ix.tables.contains_key(held) {
                            *held = t;
                        }
                    })
                    .or_insert(t);
            }
            known
        })
    }

    /// A table no master names and this plan does not use, from the table cursor on
    /// (wrapping), so a freed table comes back last.
    fn free_table(&mut self) -> Option<u32> {
        let n = self.applied.maglev.geometry.tables;
        for k in 0..n {
            let t = (self.cursors.table.wrapping_add(k)) % n;
            if !self.ix.tables.contains_key(&t) && !self.table_reserved.contains(&t) {
                self.cursors.table = (t + 1) % n;
                self.table_reserved.insert(t);
                return Some(t);
            }
        }
        None
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
        delete_ranges(fe, cur.src_ranges.iter(), &mut ops);
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
                    .hand_out(&mut self.cursors.backend, &mut self.reserved);
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

    /// The Service port id of a desired frontend: the one its master holds while SVCNAME
    /// still names its Service port with it; else the id another frontend of the Service port
    /// has (in the maps or in this plan); else a new one, whose name is written first. 0 for a
    /// frontend without a Service, or when every id is in use.
    fn svc_port(&mut self, st: &FrontendState, cur: Option<&AppliedFrontend>) -> u32 {
        let Some(name) = SvcPortName::of(st) else {
            return 0;
        };
        if let Some(id) = cur
            .filter(|c| c.has_master() && c.svc_port_id != 0)
            .map(|c| c.svc_port_id)
            .filter(|id| self.applied.svc_names.get(id) == Some(&name))
        {
            return id;
        }
        if let Some(&id) = self.svc_ids.get(&name) {
            return id;
        }
        if let Some(&id) = self.ix.svc_of.get(&name) {
            self.svc_ids.insert(name, id);
            return id;
        }
        let handed = self
            .ix
            .svcs
            .pool
            .try_hand_out(&mut self.cursors.svc_port, &mut self.svc_reserved);
        match handed {
            Some(id) => {
                self.names.push(MapOp::PutSvcName {
                    id,
                    name: name.clone(),
                });
                self.svc_ids.insert(name, id);
                id
            }
            None => {
                if !self.svc_ids_exhausted.contains(&name) {
                    self.svc_ids_exhausted.push(name.clone());
                }
                self.svc_ids.insert(name, 0);
                0
            }
        }
    }

    /// The id of a desired frontend: the one its master holds (the same incarnation of the
    /// frontend), else a new one. A frontend without a master always gets a new id, so a
    /// re-created Service never shares conntrack or affinity entries with its earlier self.
    fn rev_nat(&mut self, fe: &Frontend, cur: Option<&AppliedFrontend>) -> u32 {
        let kept = cur.filter(|c| c.has_master()).map(|c| c.rev_nat_id);
        // Two masters of a read-back map may hold one id: only the one it is filed under keeps it.
        if let Some(id) = kept.filter(|id| self.applied.rev_nat.get(id) == Some(fe)) {
            return id;
        }
        self.ix
            .revs
            .pool
            .hand_out(&mut self.cursors.rev_nat, &mut self.rev_reserved)
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

fn delete_ranges<'a>(fe: &Frontend, ranges: impl Iterator<Item = &'a Cidr>, ops: &mut Vec<MapOp>) {
    ops.extend(ranges.map(|&range| MapOp::DeleteSrcRange {
        frontend: *fe,
        range,
    }));
}

/// The source ranges a desired frontend must have in SRC_RANGES, normalized (one key per
/// range): those of a `SCOPE_EXT` frontend; none for another scope, whose ranges would share
/// the `SCOPE_EXT` frontend's keys.
fn wanted_ranges(fe: &Frontend, st: &FrontendState) -> BTreeSet<Cidr> {
    if fe.scope != SCOPE_EXT {
        return BTreeSet::new();
    }
    st.src_ranges.iter().map(|r| cidr::normalize(*r)).collect()
}

/// Slot number of slot index `i` (index 0 = slot 1).
fn slot_no(i: usize) -> u16 {
    u16::try_from(i + 1).unwrap_or(u16::MAX)
}

/// The writes that fill a MAGLEV array no program reads yet (just created, e.g. because the
/// pinned one had another shape): each table a master names whose content is unknown, written
/// in place from the backends of its master's slots. Never for an array a program may read:
/// it writes tables masters name. A table outside the array, or one whose backends are not all
/// known, is left to the next plan (which moves its master to a new table).
pub fn restore_tables(applied: &Applied) -> Plan {
    let g = applied.maglev.geometry;
    let mut done = BTreeSet::new();
    let mut prepare = Vec::new();
    for af in applied.frontends.values() {
        let Some(t) = af.table.filter(|t| *t < g.tables) else {
            continue;
        };
        if applied.maglev.content.contains_key(&t) || !done.insert(t) {
            continue;
        }
        let ids = af.slots.iter().take(af.count as usize).copied();
        let backends: Option<Vec<(BackendAddr, u32)>> = ids
            .map(|id| applied.backends.get(&id).map(|(b, _)| (*b, id)))
            .collect();
        let Some(backends) = backends.filter(|b| b.len() == af.count as usize) else {
            continue;
        };
        let mut key: Vec<u32> = backends.iter().map(|(_, id)| *id).collect();
        key.sort_unstable();
        key.dedup();
        prepare.push(MapOp::PutMaglevTable {
            table: t,
            backends: key,
            entries: maglev::table(&backends, g.m).into(),
        });
    }
    Plan {
        prepare,
        ..Plan::default()
    }
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
