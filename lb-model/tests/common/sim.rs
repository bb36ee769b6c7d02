//! A simulated datapath: the three maps as BTreeMaps, executing `MapOp`s one by one and checking
//! after each op that the datapath could never pick a missing slot or backend.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{Backend, RevNat, ServiceKey, ServiceValue};
use lb_model::{Applied, AppliedFrontend, BackendAddr, DesiredState, Frontend, MapOp, Plan};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sim {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
    pub rev_nat: BTreeMap<u32, RevNat>,
}

impl Sim {
    pub fn exec(&mut self, op: &MapOp) {
        match *op {
            MapOp::PutBackend { id, backend, state } => {
                self.backends.insert(id, backend.to_map(state));
            }
            MapOp::DeleteBackend { id } => {
                self.backends.remove(&id);
            }
            MapOp::PutRevNat { id, frontend } => {
                let r = RevNat {
                    addr: lb_common::ip4(frontend.addr.octets()),
                    port: lb_common::port(frontend.port),
                    _pad: 0,
                };
                self.rev_nat.insert(id, r);
            }
            MapOp::DeleteRevNat { id } => {
                self.rev_nat.remove(&id);
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

    /// Every master with count n has slots 1..=n, each pointing to an existing backend, and its
    /// rev-NAT entry exists and restores this frontend.
    pub fn check_no_blackhole(&self) -> Result<(), String> {
        for (k, v) in self.services.iter().filter(|(k, _)| k.slot == 0) {
            let fe = Frontend::from_key(k).unwrap();
            for slot in 1..=v.count {
                let s = self
                    .services
                    .get(&k.with_slot(slot as u16))
                    .ok_or(format!("{fe}: slot {slot} missing"))?;
                if !self.backends.contains_key(&s.backend_id) {
                    return Err(format!(
                        "{fe}: slot {slot} -> missing backend {}",
                        s.backend_id
                    ));
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
        let mut a = Applied::default();
        let mut slots: BTreeMap<Frontend, BTreeMap<u16, u32>> = BTreeMap::new();
        for (k, v) in &self.services {
            let fe = Frontend::from_key(k).unwrap();
            if k.slot == 0 {
                let e: &mut AppliedFrontend = a.frontends.entry(fe).or_default();
                e.rev_nat_id = v.rev_nat_id;
                e.flags = v.flags;
                e.affinity_timeout = v.affinity_timeout;
                e.count = v.count;
            } else {
                slots.entry(fe).or_default().insert(k.slot, v.backend_id);
            }
        }
        for (fe, s) in slots {
            let e = a.frontends.entry(fe).or_default();
            let max = s.keys().copied().max().unwrap_or(0);
            e.slots = (1..=max).map(|i| s.get(&i).copied().unwrap_or(0)).collect();
        }
        for (id, b) in &self.backends {
            a.backends
                .insert(*id, (BackendAddr::from_map(b).unwrap(), b.state));
        }
        for (id, r) in &self.rev_nat {
            // REV_NAT has no protocol: take it from the master using this id.
            let fe = a
                .frontends
                .iter()
                .find(|(_, af)| af.rev_nat_id == *id)
                .map(|(fe, _)| *fe)
                .unwrap();
            assert_eq!(
                (lb_common::ip4(fe.addr.octets()), lb_common::port(fe.port)),
                (r.addr, r.port)
            );
            a.rev_nat.insert(*id, fe);
        }
        a
    }

    /// The maps hold exactly the desired state: one master per desired frontend with its count,
    /// flags and timeout, its backends in slots 1..=count, no other entry, backends in the right
    /// state, no unused backend or rev-NAT entry.
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
