//! A simulated datapath: the four maps userspace writes as BTreeMaps, executing `MapOp`s one by
//! one and checking after each op that the datapath could never pick a missing slot or backend,
//! nor a backend that is not a member of the frontend. It also remembers every backend and
//! rev-NAT id it ever held, and fails when a new entry takes an id that was used before (ids are
//! quarantined: conntrack and affinity entries may still hold them).

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{Backend, MemberKey, MemberValue, RevNat, ServiceKey, ServiceValue};
use lb_model::{Applied, BackendAddr, DesiredState, Frontend, MapOp, Plan, ReadBack};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sim {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
    pub rev_nat: BTreeMap<u32, RevNat>,
    pub members: BTreeMap<MemberKey, MemberValue>,
    /// Every backend / rev-NAT id the maps ever held.
    pub used_backend_ids: BTreeSet<u32>,
    pub used_rev_nat_ids: BTreeSet<u32>,
}

/// Record `id` as used when `new` (its entry did not exist); fail when it was used before.
fn first_use(used: &mut BTreeSet<u32>, id: u32, new: bool, what: &str) {
    if new && !used.insert(id) {
        panic!("{what} id {id} handed out again");
    }
}

impl Sim {
    pub fn exec(&mut self, op: &MapOp) {
        match *op {
            MapOp::PutBackend { id, backend, state } => {
                let new = !self.backends.contains_key(&id);
                first_use(&mut self.used_backend_ids, id, new, "backend");
                self.backends.insert(id, backend.to_map(state));
            }
            MapOp::DeleteBackend { id } => {
                self.backends.remove(&id);
            }
            MapOp::PutRevNat { id, frontend } => {
                let new = !self.rev_nat.contains_key(&id);
                first_use(&mut self.used_rev_nat_ids, id, new, "rev-NAT");
                self.rev_nat.insert(id, frontend.to_rev_nat());
            }
            MapOp::DeleteRevNat { id } => {
                self.rev_nat.remove(&id);
            }
            MapOp::PutMember {
                frontend,
                backend_id,
                backend,
            } => {
                self.members
                    .insert(frontend.member_key(backend_id), backend.to_member());
            }
            MapOp::DeleteMember {
                frontend,
                backend_id,
            } => {
                self.members.remove(&frontend.member_key(backend_id));
            }
            MapOp::PutSlot {
                frontend,
                slot,
                backend_id,
            } => {
                assert_ne!(slot, 0, "slot 0 is the master");
                self.services.insert(
                    frontend.key(slot),
                    ServiceValue {
                        backend_id,
                        ..Default::default()
                    },
                );
            }
            MapOp::DeleteSlot { frontend, slot } => {
                self.services.remove(&frontend.key(slot));
            }
            MapOp::PutMaster {
                frontend,
                count,
                rev_nat_id,
                flags,
                affinity_timeout,
            } => {
                let v = ServiceValue {
                    backend_id: 0,
                    count,
                    rev_nat_id,
                    flags,
                    affinity_timeout,
                };
                self.services.insert(frontend.key(0), v);
            }
            MapOp::DeleteMaster { frontend } => {
                self.services.remove(&frontend.key(0));
            }
        }
    }

    /// Every master with count n has slots 1..=n, each pointing to an existing backend that is a
    /// member of the frontend (a MEMBERS entry with the backend's address), and its rev-NAT entry
    /// exists and restores this frontend.
    pub fn check_no_blackhole(&self) -> Result<(), String> {
        for (k, v) in self.services.iter().filter(|(k, _)| k.slot == 0) {
            let fe = Frontend::from_key(k).unwrap();
            for slot in 1..=v.count {
                let s = self
                    .services
                    .get(&k.with_slot(slot as u16))
                    .ok_or(format!("{fe}: slot {slot} missing"))?;
                let id = s.backend_id;
                let b = self
                    .backends
                    .get(&id)
                    .ok_or(format!("{fe}: slot {slot} -> missing backend {id}"))?;
                let m = self
                    .members
                    .get(&fe.member_key(id))
                    .ok_or(format!("{fe}: slot {slot} -> backend {id} is no member"))?;
                if (m.addr, m.port) != (b.addr, b.port) {
                    return Err(format!("{fe}: member {id} has another address: {m:?}"));
                }
            }
            let r = self
                .rev_nat
                .get(&v.rev_nat_id)
                .ok_or(format!("{fe}: rev-NAT {} missing", v.rev_nat_id))?;
            if (r.addr, r.port) != (k.addr, k.port) {
                return Err(format!(
                    "{fe}: rev-NAT {} restores another frontend",
                    v.rev_nat_id
                ));
            }
        }
        Ok(())
    }

    /// Run the ops of a plan and then gc, checking after every op. `fail(i)` says whether the
    /// i-th op (counting every op offered) fails; a failing op is not executed, and the rest of
    /// its frontend is skipped, as the real executor does. Returns the number of failures.
    pub fn execute(
        &mut self,
        plan: &Plan,
        applied: &mut Applied,
        mut fail: impl FnMut() -> bool,
    ) -> usize {
        let mut failures = 0;
        let mut failed_prepare = Vec::new();
        let mut run = |sim: &mut Sim, applied: &mut Applied, op: &MapOp| -> bool {
            if fail() {
                failures += 1;
                return false;
            }
            sim.exec(op);
            applied.apply(op);
            if let Err(e) = sim.check_no_blackhole() {
                panic!("blackhole after {op:?}: {e}");
            }
            true
        };
        for op in &plan.prepare {
            if !run(self, applied, op) {
                failed_prepare.push(op.clone());
            }
        }
        let blocked = plan.blocked_by(&failed_prepare);
        for (fe, ops) in &plan.frontends {
            if blocked.contains(fe) {
                continue;
            }
            for op in ops {
                if !run(self, applied, op) {
                    break;
                }
            }
        }
        for op in applied.gc() {
            run(self, applied, &op);
        }
        failures
    }

    /// The maps read back as an `Applied` (what the agent's read-back produces).
    pub fn to_applied(&self) -> Applied {
        let mut r = ReadBack::new();
        self.services.iter().for_each(|(k, v)| r.service(k, v));
        self.backends.iter().for_each(|(id, b)| r.backend(*id, b));
        self.rev_nat.iter().for_each(|(id, v)| r.rev_nat(*id, v));
        self.members.iter().for_each(|(k, v)| r.member(k, v));
        r.finish()
    }

    /// The maps hold exactly the desired state: one master per desired frontend with its count,
    /// flags and timeout, its backends in slots 1..=count and as its members, no other entry,
    /// backends in the right state, no unused backend or rev-NAT entry.
    pub fn check_equals(&self, desired: &DesiredState) -> Result<(), String> {
        let masters: BTreeSet<Frontend> = self
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
            let m = self.services[&fe.key(0)];
            if (m.count as usize, m.flags, m.affinity_timeout)
                != (st.backends.len(), st.flags, st.affinity_timeout)
            {
                return Err(format!("{fe}: master {m:?} != {st:?}"));
            }
            let mut got = Vec::new();
            for slot in 1..=m.count {
                let id = self.services[&fe.key(slot as u16)].backend_id;
                used.insert(id);
                let b = self.backends[&id];
                if Some(b.state) != desired.backend_state(&BackendAddr::from_map(&b).unwrap()) {
                    return Err(format!("{fe}: backend {id} state {}", b.state));
                }
                got.push(BackendAddr::from_map(&b).unwrap());
            }
            got.sort();
            if got != st.backends {
                return Err(format!("{fe}: slots hold {got:?}, want {:?}", st.backends));
            }
            entries += 1 + m.count as usize;
        }
        if entries != self.services.len() {
            return Err(format!(
                "{} SERVICES entries, want {entries}",
                self.services.len()
            ));
        }
        let want_members: BTreeMap<MemberKey, MemberValue> = desired
            .frontends
            .keys()
            .flat_map(|fe| {
                let count = self.services[&fe.key(0)].count as u16;
                (1..=count).map(move |slot| {
                    let id = self.services[&fe.key(slot)].backend_id;
                    let b = BackendAddr::from_map(&self.backends[&id]).unwrap();
                    (fe.member_key(id), b.to_member())
                })
            })
            .collect();
        if want_members != self.members {
            return Err(format!("members {:?}, want {want_members:?}", self.members));
        }
        if used.len() != self.backends.len() {
            return Err(format!(
                "unused backends: {:?}",
                self.backends
                    .keys()
                    .filter(|id| !used.contains(id))
                    .collect::<Vec<_>>()
            ));
        }
        let addrs: BTreeSet<_> = self
            .backends
            .values()
            .map(|b| (b.addr, b.port, b.proto))
            .collect();
        if addrs.len() != self.backends.len() {
            return Err("one backend address under two ids".into());
        }
        if self.rev_nat.len() != want.len() {
            return Err(format!(
                "{} rev-NAT entries for {} frontends",
                self.rev_nat.len(),
                want.len()
            ));
        }
        Ok(())
    }
}
