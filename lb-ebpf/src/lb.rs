//! Backend selection for a new flow: the client's affine backend when sessionAffinity applies
//! and is fresh, else a uniformly random slot (Cilium's "random" algorithm; slots `1..=count`).

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_get_prandom_u32};
use lb_common::{AffinityKey, AffinityValue, Backend, ServiceKey, ServiceValue, SVC_FLAG_AFFINITY};

use crate::{
    fault::Fault,
    maps::{AFFINITY, BACKENDS, SERVICES},
    parse::Packet,
};

const NS_PER_SEC: u64 = 1_000_000_000;

/// A chosen backend and its id (the conntrack entry keeps both).
pub struct Selected {
    pub id: u32,
    pub backend: Backend,
}

/// Chooses a backend of the Service whose master entry is `master` (at `master_key`), which has
/// at least one slot.
#[inline(always)]
pub fn select(
    pkt: &Packet,
    master_key: &ServiceKey,
    master: &ServiceValue,
    now: u64,
) -> Result<Selected, Fault> {
    if master.flags & SVC_FLAG_AFFINITY == 0 {
        return random_slot(master_key, master.count);
    }
    let key = AffinityKey {
        client: pkt.saddr,
        rev_nat_id: master.rev_nat_id,
    };
    let selected = match affine(&key, master.affinity_timeout, now) {
        Some(selected) => selected,
        None => random_slot(master_key, master.count)?,
    };
    let value = AffinityValue {
        backend_id: selected.id,
        _pad: 0,
        last_used_ns: now,
    };
    // Losing the affinity record only costs stickiness for the next flow.
    let _ = AFFINITY.insert(key, value, BPF_ANY.into());
    Ok(selected)
}

/// The client's previous backend, if used within `timeout_s` and still present.
#[inline(always)]
fn affine(key: &AffinityKey, timeout_s: u32, now: u64) -> Option<Selected> {
    // SAFETY: the value is copied out at once.
    let last = unsafe { *AFFINITY.get(key)? };
    if now.wrapping_sub(last.last_used_ns) > u64::from(timeout_s) * NS_PER_SEC {
        return None;
    }
    // SAFETY: copied out at once.
    let backend = unsafe { *BACKENDS.get(last.backend_id)? };
    Some(Selected {
        id: last.backend_id,
        backend,
    })
}

#[inline(always)]
fn random_slot(master_key: &ServiceKey, count: u32) -> Result<Selected, Fault> {
    if count == 0 {
        return Err(Fault::NoBackend);
    }
    // SAFETY: no arguments, always callable.
    let slot = unsafe { bpf_get_prandom_u32() } % count + 1;
    let slot_key = master_key.with_slot(slot as u16);
    // SAFETY: values are copied out at once.
    let id = unsafe { SERVICES.get(slot_key) }
        .ok_or(Fault::NoBackend)?
        .backend_id;
    let backend = unsafe { *BACKENDS.get(id).ok_or(Fault::NoBackend)? };
    Ok(Selected { id, backend })
}
