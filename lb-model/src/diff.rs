//! What is in the maps ([`Applied`]), and the ordered operations that turn it into the desired state.
//!
//! Update order (DESIGN.md section 3; no blackhole, never a half-written Service): write new
//! backends, then slots up to max(old, new), then the master with the new count, then delete
//! slots above the new count; unused backends and rev-NAT entries are deleted last ([`Applied::gc`]).
//! A removed frontend goes in reverse: master first, then its slots.

use std::collections::{BTreeMap, BTreeSet};

use crate::desired::DesiredState;
use crate::{BackendAddr, Frontend};

/// One frontend as it is in the maps.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct AppliedFrontend {
    pub rev_nat_id: u32,
    pub flags: u32,
    pub affinity_timeout: u32,
    /// Backend ids of slots 1..=len.
    pub slots: Vec<u32>,
}

/// The datapath maps' content, as the agent last wrote (or read back) it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub frontends: BTreeMap<Frontend, AppliedFrontend>,
    /// Backend id -> (address, state `lb_common::BACKEND_*`).
    pub backends: BTreeMap<u32, (BackendAddr, u8)>,
    /// Rev-NAT id -> frontend it restores.
    pub rev_nat: BTreeMap<u32, Frontend>,
}

/// One map write or delete. Executed strictly in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutBackend { id: u32, backend: BackendAddr, state: u8 },
    DeleteBackend { id: u32 },
    PutRevNat { id: u32, frontend: Frontend },
    DeleteRevNat { id: u32 },
    /// Slot `slot` (>= 1) of `frontend` -> backend id.
    PutSlot { frontend: Frontend, slot: u16, backend_id: u32 },
    DeleteSlot { frontend: Frontend, slot: u16 },
    /// The master entry (slot 0).
    PutMaster { frontend: Frontend, count: u32, rev_nat_id: u32, flags: u32, affinity_timeout: u32 },
    DeleteMaster { frontend: Frontend },
}

/// Operations grouped so a failure (e.g. a full map) stops only the frontend it hit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// New/changed backends and rev-NAT entries, written before any frontend refers to them.
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
}

impl Applied {
    /// Record an op that the datapath executed successfully.
    pub fn apply(&mut self, op: &MapOp) {
        let _ = op;
        todo!("lb-model: Applied::apply")
    }

    /// Deletes of backends no slot refers to any more and of rev-NAT entries whose frontend is gone.
    /// Run after the frontend ops of a plan, so nothing in use is removed.
    pub fn gc(&self) -> Vec<MapOp> {
        todo!("lb-model: Applied::gc")
    }

    /// Backend id for an address: the existing one (ids are stable), else a fresh unused one.
    pub fn backend_id(&self, b: &BackendAddr, reserved: &BTreeSet<u32>) -> u32 {
        let _ = (b, reserved);
        todo!("lb-model: Applied::backend_id")
    }
}

/// The ops that make `applied` match `desired` for the `touched` frontends (all frontends of
/// `applied` and `desired` for a full reconcile). Frontends in `touched` that `desired` lacks are removed.
pub fn plan(applied: &Applied, desired: &DesiredState, touched: &BTreeSet<Frontend>) -> Plan {
    let _ = (applied, desired, touched);
    todo!("lb-model: plan")
}

/// Every frontend in either state (for a full reconcile after start or resync).
pub fn all_frontends(applied: &Applied, desired: &DesiredState) -> BTreeSet<Frontend> {
    applied.frontends.keys().chain(desired.frontends.keys()).copied().collect()
}
