//! Rebuilding an [`Applied`] from the entries of the maps, in whatever order a map iteration
//! yields them: at the agent's start (a restart reconciles, never flushes), for `xlb inspect`,
//! and in tests. Feed every entry of SERVICES, BACKENDS, REV_NAT and MEMBERS, then
//! [`ReadBack::finish`]. Linear in the number of entries.

use std::collections::{BTreeMap, HashMap};

use lb_common::{Backend, MemberKey, MemberValue, RevNat, ServiceKey, ServiceValue};

use crate::diff::{Applied, AppliedFrontend};
use crate::{BackendAddr, Frontend, Proto};

/// Map entries read so far. Entries with an unknown protocol number are skipped.
#[derive(Debug, Default)]
pub struct ReadBack {
    applied: Applied,
    slots: BTreeMap<Frontend, BTreeMap<u16, u32>>,
    rev_nat: Vec<(u32, RevNat)>,
    members: Vec<(Frontend, u32, MemberValue)>,
}

impl ReadBack {
    pub fn new() -> Self {
        Self::default()
    }

    /// A SERVICES entry: a master (slot 0) or a slot.
    pub fn service(&mut self, k: &ServiceKey, v: &ServiceValue) {
        let Some(fe) = Frontend::from_key(k) else {
            return;
        };
        if k.slot == 0 {
            let e = self.applied.frontends.entry(fe).or_default();
            e.rev_nat_id = v.rev_nat_id;
            e.flags = v.flags;
            e.affinity_timeout = v.affinity_timeout;
            e.count = v.count;
        } else {
            self.slots
                .entry(fe)
                .or_default()
                .insert(k.slot, v.backend_id);
        }
    }

    /// A BACKENDS entry.
    pub fn backend(&mut self, id: u32, b: &Backend) {
        if let Some(addr) = BackendAddr::from_map(b) {
            self.applied.backends.insert(id, (addr, b.state));
        }
    }

    /// A REV_NAT entry.
    pub fn rev_nat(&mut self, id: u32, r: &RevNat) {
        self.rev_nat.push((id, *r));
    }

    /// A MEMBERS entry.
    pub fn member(&mut self, k: &MemberKey, v: &MemberValue) {
        if let Some((fe, id)) = Frontend::from_member_key(k) {
            self.members.push((fe, id, *v));
        }
    }

    /// The maps' content as an [`Applied`].
    ///
    /// - Slots: all of them, also leftovers above the master's count (an interrupted update) and
    ///   holes (0), so the next plan repairs them.
    /// - REV_NAT holds no protocol: an entry belongs to the frontend whose master uses its id and
    ///   has its address and port. An entry no master uses (an interrupted removal) is kept under
    ///   the TCP frontend of its address, so gc deletes it and new ids are handed out past it.
    /// - A MEMBERS entry whose address is not its backend's (never written so by xlb) is left
    ///   out when a slot of its frontend names the id, so the next plan rewrites it; otherwise it
    ///   is kept, so the next plan deletes it unless the frontend still wants that backend.
    pub fn finish(self) -> Applied {
        let ReadBack {
            mut applied,
            slots,
            rev_nat,
            members,
        } = self;
        for (fe, s) in slots {
            let e: &mut AppliedFrontend = applied.frontends.entry(fe).or_default();
            let max = s.keys().copied().max().unwrap_or(0);
            e.slots = (1..=max).map(|i| s.get(&i).copied().unwrap_or(0)).collect();
        }
        let mut user: HashMap<(u32, RevNat), Frontend> = HashMap::new();
        for (fe, af) in applied
            .frontends
            .iter()
            .filter(|(_, af)| af.rev_nat_id != 0)
        {
            user.entry((af.rev_nat_id, fe.to_rev_nat())).or_insert(*fe);
        }
        for (id, r) in rev_nat {
            let fe = user.get(&(id, r)).copied().unwrap_or_else(|| Frontend {
                addr: lb_common::ip4_from(r.addr).into(),
                port: lb_common::port_from(r.port),
                proto: Proto::Tcp,
                scope: lb_common::SCOPE_EXT,
            });
            applied.rev_nat.insert(id, fe);
        }
        for (fe, id, v) in members {
            let right = applied
                .backends
                .get(&id)
                .is_some_and(|(b, _)| b.to_member() == v);
            let e = applied.frontends.entry(fe).or_default();
            if right || !e.slots.contains(&id) {
                e.members.insert(id);
            }
        }
        applied
    }
}
