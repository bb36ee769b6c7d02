//! The simulated datapath: the shipped executor (`lb_model::store::execute`) and read-back
//! (`ReadBack::read`) on the shipped in-memory store (`MemStore`), behind a store that checks
//! after every single write that the datapath could never pick a missing slot or backend, nor a
//! backend that is not a member of the frontend. It also remembers every backend and frontend
//! id the maps ever held, and fails when a new backend entry or master takes an id that was used
//! before (ids are quarantined: conntrack and affinity entries may still hold them).
//!
//! Two more orderings are checked after every write: a `SCOPE_EXT` master with
//! `SVC_FLAG_TWO_SCOPES` always has its `SCOPE_INT` master (pods are never sent to a missing
//! entry), and a master with `SVC_FLAG_SOURCE_RANGES` never misses a source range the desired
//! state wants ([`Sim::expect`]): the ranges go in before the flag and out after it.
//!
//! Maglev tables: a master that names a table (`SVC_FLAG_ALG_MAGLEV` with backends) always
//! names a table inside the array that was written whole, every entry an existing backend that
//! is a member of the frontend; and a table is never written while a master names it. The
//! simulated array is small (M = 13, [`SIM_GEOMETRY`]), so tables run out in some tests.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;

use lb_common::{
    Backend, MemberKey, MemberValue, ServiceKey, ServiceValue, SrcRangeKey, SvcName, SCOPE_EXT,
    SCOPE_INT, SVC_FLAG_SOURCE_RANGES, SVC_FLAG_TWO_SCOPES,
};
use lb_model::maglev::{self, Geometry};
use lb_model::store::{execute, ExecReport, FaultStore, MapStore, MapWrite, MemStore};
use lb_model::{Applied, BackendAddr, ClusterState, DesiredState, Frontend, Plan, ReadBack};

/// The model and the simulated maps, driven through events as the agent drives the real ones
/// (each test adds the driving methods it needs).
pub struct World {
    pub state: ClusterState,
    pub desired: DesiredState,
    pub applied: Applied,
    pub sim: Sim,
}

/// The simulated MAGLEV array: 64 tables of 13 entries.
pub const SIM_GEOMETRY: Geometry = Geometry { m: 13, tables: 64 };

/// What the agent reads back from empty maps of the simulated shape.
pub fn empty_applied() -> Applied {
    Sim::with_geometry(SIM_GEOMETRY).to_applied()
}

impl World {
    pub fn new() -> World {
        World::with_geometry(SIM_GEOMETRY)
    }

    /// A world whose MAGLEV array has the shape `g`.
    pub fn with_geometry(g: Geometry) -> World {
        let sim = Sim::with_geometry(g);
        World {
            state: ClusterState {
                node: super::node(),
                ..Default::default()
            },
            desired: DesiredState::default(),
            // What the agent reads back from its (empty) maps at start.
            applied: sim.to_applied(),
            sim,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sim {
    pub maps: MemStore,
    /// Every backend / frontend id the maps ever held.
    pub used_backend_ids: BTreeSet<u32>,
    pub used_rev_nat_ids: BTreeSet<u32>,
    /// SRC_RANGES keys the desired state wants ([`Sim::expect`]).
    pub want_ranges: BTreeSet<(u32, SrcRangeKey)>,
    /// (address, port, protocol) of the desired masters with `SVC_FLAG_SOURCE_RANGES`.
    pub want_flagged: BTreeSet<(u32, u16, u8)>,
    /// Whether [`Sim::expect`] was called: the source-range order is checked only then.
    pub expecting: bool,
}

/// Record `id` as used when `new` (its entry did not hold it); fail when it was used before.
fn first_use(used: &mut BTreeSet<u32>, id: u32, new: bool, what: &str) {
    if new && !used.insert(id) {
        panic!("{what} id {id} handed out again");
    }
}

/// The SRC_RANGES keys of `desired` (ranges of `SCOPE_EXT` frontends).
pub fn range_keys(desired: &DesiredState) -> BTreeSet<(u32, SrcRangeKey)> {
    desired
        .frontends
        .iter()
        .filter(|(fe, _)| fe.scope == SCOPE_EXT)
        .flat_map(|(fe, st)| st.src_ranges.iter().map(|r| fe.src_range_key(*r)))
        .collect()
}

/// The SRC_RANGES key data of a frontend with client 0 (to compare the frontend part).
fn range_frontend(k: &SrcRangeKey) -> (u32, u16, u8) {
    (k.addr, k.port, k.proto)
}

impl Sim {
    /// Empty maps with a MAGLEV array of the shape `g`.
    pub fn with_geometry(g: Geometry) -> Sim {
        Sim {
            maps: MemStore::with_geometry(g),
            ..Sim::default()
        }
    }

    /// The desired state the next plans head for: a flagged master must never miss one of
    /// its source ranges.
    pub fn expect(&mut self, desired: &DesiredState) {
        self.expecting = true;
        self.want_ranges = range_keys(desired);
        self.want_flagged = desired
            .frontends
            .iter()
            .filter(|(_, st)| st.flags & SVC_FLAG_SOURCE_RANGES != 0)
            .map(|(fe, _)| {
                let k = fe.key(0);
                (k.addr, k.port, k.proto)
            })
            .collect();
    }

    /// Run `plan` with the shipped executor, checking after every write. `fail()` is asked
    /// before each write whether it fails (a failing write is not performed). Returns the
    /// executor's report and the number of failed writes.
    pub fn execute(
        &mut self,
        plan: &Plan,
        applied: &mut Applied,
        mut fail: impl FnMut() -> bool + 'static,
    ) -> (ExecReport, usize) {
        let mut store = FaultStore::new(&mut *self, move |_, _| fail());
        let report = execute(&mut store, plan, applied);
        (report, store.injected().len())
    }

    /// Run `plan` with every write succeeding.
    pub fn run(&mut self, plan: &Plan, applied: &mut Applied) -> ExecReport {
        let report = execute(self, plan, applied);
        assert!(report.is_clean(), "{report:?}");
        report
    }

    /// Every master with count n has slots 1..=n, each pointing to an existing backend that is a
    /// member of the frontend (a MEMBERS entry with the backend's address), and every master
    /// has its own frontend id.
    pub fn check_no_blackhole(&self) -> Result<(), String> {
        let m = &self.maps;
        let mut ids = BTreeMap::new();
        for (k, v) in m.services.iter().filter(|(k, _)| k.slot == 0) {
            let fe = Frontend::from_key(k).unwrap();
            for slot in 1..=v.count {
                let s = m
                    .services
                    .get(&k.with_slot(slot as u16))
                    .ok_or(format!("{fe}: slot {slot} missing"))?;
                let id = s.backend_id;
                let b = m
                    .backends
                    .get(&id)
                    .ok_or(format!("{fe}: slot {slot} -> missing backend {id}"))?;
                let mb = m
                    .members
                    .get(&fe.member_key(id))
                    .ok_or(format!("{fe}: slot {slot} -> backend {id} is no member"))?;
                if (mb.addr, mb.port) != (b.addr, b.port) {
                    return Err(format!("{fe}: member {id} has another address: {mb:?}"));
                }
            }
            if v.rev_nat_id == 0 {
                return Err(format!("{fe}: master without a frontend id"));
            }
            if k.scope == SCOPE_EXT
                && v.flags & SVC_FLAG_TWO_SCOPES != 0
                && !m.services.contains_key(&fe.with_scope(SCOPE_INT).key(0))
            {
                return Err(format!(
                    "{fe}: TWO_SCOPES master without its SCOPE_INT master"
                ));
            }
            if let Some(other) = ids.insert(v.rev_nat_id, fe) {
                return Err(format!("{fe} and {other} share id {}", v.rev_nat_id));
            }
            if maglev::names_table(v.flags, v.count) {
                self.check_table(&fe, v.backend_id)?;
            }
        }
        Ok(())
    }

    /// Maglev table `t` of the master of `fe` is inside the array, written whole, and every
    /// entry names an existing backend that is a member of `fe`.
    fn check_table(&self, fe: &Frontend, t: u32) -> Result<(), String> {
        let m = &self.maps;
        let g = m.maglev_geometry;
        if t >= g.tables {
            return Err(format!("{fe}: table {t} outside the {} tables", g.tables));
        }
        let entries = m
            .maglev
            .get(&t)
            .ok_or(format!("{fe}: names table {t}, never written"))?;
        if entries.len() != g.m as usize {
            return Err(format!("{fe}: table {t} has {} entries", entries.len()));
        }
        let ids: BTreeSet<u32> = entries.iter().copied().collect();
        for id in ids {
            let b = m
                .backends
                .get(&id)
                .ok_or(format!("{fe}: table {t} -> missing backend {id}"))?;
            let mb = m
                .members
                .get(&fe.member_key(id))
                .ok_or(format!("{fe}: table {t} -> backend {id} is no member"))?;
            if (mb.addr, mb.port) != (b.addr, b.port) {
                return Err(format!("{fe}: member {id} has another address: {mb:?}"));
            }
        }
        Ok(())
    }

    /// The masters that name Maglev table `t`.
    pub fn table_users(&self, t: u32) -> Vec<Frontend> {
        self.maps
            .services
            .iter()
            .filter(|(k, v)| {
                k.slot == 0 && maglev::names_table(v.flags, v.count) && v.backend_id == t
            })
            .map(|(k, _)| Frontend::from_key(k).unwrap())
            .collect()
    }

    /// The source-range order, checked before a write: a master is written with
    /// `SVC_FLAG_SOURCE_RANGES` only once the trie holds every range the desired state wants
    /// for it; while a master is flagged, a range goes only when the master keeps the flag,
    /// the range is not wanted and every wanted range is in already (new ranges in before old
    /// ones out; the flag off before the last ranges go).
    fn check_range_order(&self, w: &MapWrite) -> Result<(), String> {
        let m = &self.maps;
        let flagged = |triple: (u32, u16, u8)| {
            m.services.iter().any(|(k, v)| {
                k.slot == 0
                    && (k.addr, k.port, k.proto) == triple
                    && v.flags & SVC_FLAG_SOURCE_RANGES != 0
            })
        };
        match w {
            MapWrite::PutService(k, v) if k.slot == 0 && v.flags & SVC_FLAG_SOURCE_RANGES != 0 => {
                let me = (k.addr, k.port, k.proto);
                if let Some(missing) = self
                    .want_ranges
                    .iter()
                    .find(|w| range_frontend(&w.1) == me && !m.src_ranges.contains(w))
                {
                    return Err(format!(
                        "flagged master written before its range {missing:?}"
                    ));
                }
            }
            MapWrite::DeleteSrcRange(len, k) if flagged(range_frontend(k)) => {
                let me = range_frontend(k);
                if !self.want_flagged.contains(&me) {
                    return Err("range deleted before its master lost the flag".into());
                }
                if self.want_ranges.contains(&(*len, *k)) {
                    return Err("wanted range deleted under a flagged master".into());
                }
                if let Some(missing) = self
                    .want_ranges
                    .iter()
                    .find(|w| range_frontend(&w.1) == me && !m.src_ranges.contains(w))
                {
                    return Err(format!(
                        "old range deleted before new range {missing:?} is in"
                    ));
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// After a write: the invariant holds, and no id was handed out twice.
    fn checked(&mut self, w: MapWrite) -> Result<(), Infallible> {
        let order = if self.expecting {
            self.check_range_order(&w)
        } else {
            Ok(())
        };
        if let Err(e) = order {
            panic!("source ranges out of order at {w:?}: {e}");
        }
        if let MapWrite::PutMaglevTable(t, _) = &w {
            let users = self.table_users(*t);
            if !users.is_empty() {
                panic!("Maglev table {t} written while {users:?} name it");
            }
        }
        match &w {
            MapWrite::PutBackend(id, _) => {
                let new = !self.maps.backends.contains_key(id);
                first_use(&mut self.used_backend_ids, *id, new, "backend");
            }
            MapWrite::PutService(k, v) if k.slot == 0 => {
                // Name before master: a master never names a Service port id without a name.
                if v.svc_port_id != 0 && !self.maps.svc_names.contains_key(&v.svc_port_id) {
                    panic!(
                        "master {k:?} names Service port id {} before its name",
                        v.svc_port_id
                    );
                }
                let held = self.maps.services.get(k).map(|old| old.rev_nat_id);
                first_use(
                    &mut self.used_rev_nat_ids,
                    v.rev_nat_id,
                    held != Some(v.rev_nat_id),
                    "frontend",
                );
            }
            MapWrite::DeleteSvcName(id) => {
                let holders: Vec<&ServiceKey> = self
                    .maps
                    .services
                    .iter()
                    .filter(|(k, v)| k.slot == 0 && v.svc_port_id == *id)
                    .map(|(k, _)| k)
                    .collect();
                if !holders.is_empty() {
                    panic!("name of Service port id {id} deleted while {holders:?} name it");
                }
            }
            _ => {}
        }
        w.apply_to(&mut self.maps)?;
        if let Err(e) = self.check_no_blackhole() {
            panic!("blackhole after {w:?}: {e}");
        }
        Ok(())
    }

    /// The maps read back as an `Applied` (the agent's read-back).
    pub fn to_applied(&self) -> Applied {
        match ReadBack::read(&self.maps) {
            Ok(a) => a,
            Err(e) => match e {},
        }
    }

    /// The maps hold exactly the desired state: one master per desired frontend with its count,
    /// flags and timeout, its backends in slots 1..=count and as its members, no other entry,
    /// backends in the right state, no unused backend.
    pub fn check_equals(&self, desired: &DesiredState) -> Result<(), String> {
        let m = &self.maps;
        self.check_no_blackhole()?;
        let masters: BTreeSet<Frontend> = m
            .services
            .keys()
            .filter(|k| k.slot == 0)
            .map(|k| Frontend::from_key(k).unwrap())
            .collect();
        let want: BTreeSet<Frontend> = desired.frontends.keys().copied().collect();
        if masters != want {
            return Err(format!("masters {masters:?} != desired {want:?}"));
        }
        let mut used = BTreeSet::new();
        let mut entries = 0;
        for (fe, st) in &desired.frontends {
            let master = m.services[&fe.key(0)];
            if (master.count as usize, master.flags, master.affinity_timeout)
                != (st.backends.len(), st.flags, st.affinity_timeout)
            {
                return Err(format!("{fe}: master {master:?} != {st:?}"));
            }
            if maglev::names_table(master.flags, master.count) {
                // The table holds exactly the Maglev table of the desired backends.
                let t = master.backend_id;
                let ids: Vec<(BackendAddr, u32)> = (1..=master.count)
                    .map(|slot| {
                        let id = m.services[&fe.key(slot as u16)].backend_id;
                        (BackendAddr::from_map(&m.backends[&id]).unwrap(), id)
                    })
                    .collect();
                let want = maglev::table(&ids, m.maglev_geometry.m);
                if m.maglev.get(&t) != Some(&want) {
                    return Err(format!("{fe}: table {t} is not the table of its backends"));
                }
            } else if master.backend_id != 0 {
                return Err(format!(
                    "{fe}: master without a table has backend_id {}",
                    master.backend_id
                ));
            }
            let mut got = Vec::new();
            for slot in 1..=master.count {
                let id = m.services[&fe.key(slot as u16)].backend_id;
                used.insert(id);
                let b = m.backends[&id];
                if Some(b.state) != desired.backend_state(&BackendAddr::from_map(&b).unwrap()) {
                    return Err(format!("{fe}: backend {id} state {}", b.state));
                }
                got.push(BackendAddr::from_map(&b).unwrap());
            }
            got.sort();
            if got != st.backends {
                return Err(format!("{fe}: slots hold {got:?}, want {:?}", st.backends));
            }
            entries += 1 + master.count as usize;
        }
        if entries != m.services.len() {
            return Err(format!(
                "{} SERVICES entries, want {entries}",
                m.services.len()
            ));
        }
        let want_members: BTreeMap<MemberKey, MemberValue> = desired
            .frontends
            .keys()
            .flat_map(|fe| {
                let count = m.services[&fe.key(0)].count as u16;
                (1..=count).map(move |slot| {
                    let id = m.services[&fe.key(slot)].backend_id;
                    let b = BackendAddr::from_map(&m.backends[&id]).unwrap();
                    (fe.member_key(id), b.to_member())
                })
            })
            .collect();
        if want_members != m.members {
            return Err(format!("members {:?}, want {want_members:?}", m.members));
        }
        let want_ranges = range_keys(desired);
        if want_ranges != m.src_ranges {
            return Err(format!(
                "source ranges {:?}, want {want_ranges:?}",
                m.src_ranges
            ));
        }
        if used.len() != m.backends.len() {
            return Err(format!(
                "unused backends: {:?}",
                m.backends
                    .keys()
                    .filter(|id| !used.contains(id))
                    .collect::<Vec<_>>()
            ));
        }
        let addrs: BTreeSet<_> = m
            .backends
            .values()
            .map(|b| (b.addr, b.port, b.proto))
            .collect();
        if addrs.len() != m.backends.len() {
            return Err("one backend address under two ids".into());
        }
        Ok(())
    }
}

/// The in-memory maps, checked after every write.
impl MapStore for Sim {
    type Error = Infallible;

    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), Infallible> {
        self.checked(MapWrite::PutService(*key, *value))
    }
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), Infallible> {
        self.checked(MapWrite::DeleteService(*key))
    }
    fn put_backend(&mut self, id: u32, value: &Backend) -> Result<(), Infallible> {
        self.checked(MapWrite::PutBackend(id, *value))
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), Infallible> {
        self.checked(MapWrite::DeleteBackend(id))
    }
    fn put_member(&mut self, key: &MemberKey, value: &MemberValue) -> Result<(), Infallible> {
        self.checked(MapWrite::PutMember(*key, *value))
    }
    fn delete_member(&mut self, key: &MemberKey) -> Result<(), Infallible> {
        self.checked(MapWrite::DeleteMember(*key))
    }
    fn put_src_range(&mut self, prefix_len: u32, key: &SrcRangeKey) -> Result<(), Infallible> {
        self.checked(MapWrite::PutSrcRange(prefix_len, *key))
    }
    fn delete_src_range(&mut self, prefix_len: u32, key: &SrcRangeKey) -> Result<(), Infallible> {
        self.checked(MapWrite::DeleteSrcRange(prefix_len, *key))
    }
    fn for_each_src_range(&self, f: &mut dyn FnMut(u32, &SrcRangeKey)) -> Result<(), Infallible> {
        self.maps.for_each_src_range(f)
    }
    fn for_each_service(
        &self,
        f: &mut dyn FnMut(&ServiceKey, &ServiceValue),
    ) -> Result<(), Infallible> {
        self.maps.for_each_service(f)
    }
    fn for_each_backend(&self, f: &mut dyn FnMut(u32, &Backend)) -> Result<(), Infallible> {
        self.maps.for_each_backend(f)
    }
    fn for_each_member(
        &self,
        f: &mut dyn FnMut(&MemberKey, &MemberValue),
    ) -> Result<(), Infallible> {
        self.maps.for_each_member(f)
    }
    fn maglev_geometry(&self) -> Geometry {
        self.maps.maglev_geometry
    }
    fn put_maglev_table(&mut self, table: u32, entries: &[u32]) -> Result<(), Infallible> {
        self.checked(MapWrite::PutMaglevTable(table, entries.into()))
    }
    fn read_maglev_table(&self, table: u32) -> Result<Vec<u32>, Infallible> {
        self.maps.read_maglev_table(table)
    }
    fn put_svc_name(&mut self, id: u32, name: &SvcName) -> Result<(), Infallible> {
        self.checked(MapWrite::PutSvcName(id, *name))
    }
    fn delete_svc_name(&mut self, id: u32) -> Result<(), Infallible> {
        self.checked(MapWrite::DeleteSvcName(id))
    }
    fn for_each_svc_name(&self, f: &mut dyn FnMut(u32, &SvcName)) -> Result<(), Infallible> {
        self.maps.for_each_svc_name(f)
    }
}
