//! Backend selection for a new flow: the client's affine backend when sessionAffinity applies,
//! is fresh and is still a member of the Service, else the frontend's algorithm (its master's
//! flags, `--lb-algorithm` / the `xlb.io/lb-algorithm` annotation):
//!
//! - random (no flag): a uniformly random slot (Cilium's "random"; slots `1..=count`);
//! - round-robin (`SVC_FLAG_ALG_RR`): slot `counter % count + 1` with a per-CPU counter per
//!   frontend (`RR`, keyed by the rev-NAT id), so the flows one CPU handles (one client's,
//!   typically) visit every slot in turn;
//! - Maglev (`SVC_FLAG_ALG_MAGLEV`): entry `table * M + lb_common::maglev_flow_hash(client) % M` of `MAGLEV`,
//!   the table the master names in `backend_id`, holds the backend id (one lookup). The hash is
//!   of the client's address, port and protocol, not of the frontend, so the same client port
//!   reaches the same pod through every node (the control plane uses the same `lb_common` function).
//!
//! Membership (`MEMBERS`) is checked by address for affinity, so a stale id can never send a
//! flow to another pod; slots and Maglev tables only ever name members (the agent's write order).

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_get_prandom_u32, maps::lpm_trie::Key};
use lb_common::{
    AffinityKey, AffinityValue, MemberKey, ServiceKey, ServiceValue, SrcRangeKey,
    BACKEND_F_LOCAL, SCOPE_EXT, SCOPE_INT, SVC_FLAG_AFFINITY, SVC_FLAG_ALG_MAGLEV,
    SVC_FLAG_ALG_RR, SVC_FLAG_SOURCE_RANGES, SVC_FLAG_TWO_SCOPES,
};

use crate::{
    fault::Fault,
    maps::{AFFINITY, BACKENDS, MAGLEV, MEMBERS, RR, SERVICES, SRC_RANGES},
    parse::Packet,
};

/// Who sends a packet to a frontend, which decides the backend set of an externalTrafficPolicy
/// Local frontend: clients outside the node get the node-local endpoints (`SCOPE_EXT`), pods
/// every endpoint (`SCOPE_INT`, kube-proxy's behaviour).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Client {
    Pod,
    Outside,
}

/// The frontend `pkt` is sent to, as `client` sees it: its master key and master entry.
#[inline(always)]
pub fn frontend(pkt: &Packet, client: Client) -> Option<(ServiceKey, ServiceValue)> {
    let key = ServiceKey::new(pkt.daddr, pkt.dport, pkt.proto, SCOPE_EXT, 0);
    // SAFETY: copied out at once.
    let master = unsafe { *SERVICES.get(&key)? };
    if client == Client::Pod && master.flags & SVC_FLAG_TWO_SCOPES != 0 {
        let int_key = ServiceKey { scope: SCOPE_INT, ..key };
        // SAFETY: copied out at once.
        if let Some(int) = unsafe { SERVICES.get(&int_key) } {
            // Source ranges are filed under the frontend, not the scope: pods are held to them
            // too (kube-proxy's firewall chain sees every source).
            let mut int = *int;
            int.flags |= master.flags & SVC_FLAG_SOURCE_RANGES;
            return Some((int_key, int));
        }
    }
    Some((key, master))
}

/// Whether `pkt`'s client may use the frontend (loadBalancerSourceRanges): always, unless the
/// master lists source ranges and none holds the client.
#[inline(always)]
pub fn source_allowed(pkt: &Packet, master: &ServiceValue) -> bool {
    if master.flags & SVC_FLAG_SOURCE_RANGES == 0 {
        return true;
    }
    let key = Key::new(
        SrcRangeKey::FRONTEND_BITS + 32,
        SrcRangeKey {
            addr: pkt.daddr,
            port: pkt.dport,
            proto: pkt.proto,
            _pad: 0,
            client: pkt.saddr,
        },
    );
    SRC_RANGES.get(&key).is_some()
}

const NS_PER_SEC: u64 = 1_000_000_000;

/// Entries per Maglev table (see `lb_common::global_names::MAGLEV_M`), set at load time.
#[unsafe(no_mangle)]
static XLB_MAGLEV_M: u32 = lb_common::DEFAULT_MAGLEV_M;

/// A chosen backend: its id, address and port (network order).
pub struct Selected {
    pub id: u32,
    pub addr: u32,
    pub port: u16,
    /// The backend runs on this node (`BACKEND_F_LOCAL`).
    pub local: bool,
}

/// Whether backend `id` at `addr:port` is (still) a member of the frontend `master_key`.
#[inline(always)]
pub fn is_member(master_key: &ServiceKey, id: u32, addr: u32, port: u16) -> bool {
    // SAFETY: the value is read at once.
    match unsafe { MEMBERS.get(&MemberKey::of(master_key, id)) } {
        Some(m) => m.addr == addr && m.port == port,
        None => false,
    }
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
        return by_algorithm(pkt, master_key, master);
    }
    let key = AffinityKey {
        client: pkt.saddr,
        rev_nat_id: master.rev_nat_id,
    };
    let selected = match affine(&key, master_key, master.affinity_timeout, now) {
        Some(selected) => selected,
        None => by_algorithm(pkt, master_key, master)?,
    };
    let value = AffinityValue {
        backend_id: selected.id,
        _pad: 0,
        last_used_ns: now,
    };
    // Losing the affinity record only costs stickiness for the next flow.
    if !crate::trace::dry_run() {
        let _ = AFFINITY.insert(&key, &value, BPF_ANY.into());
    }
    Ok(selected)
}

/// The client's previous backend, if used within `timeout_s` and still a member.
#[inline(always)]
fn affine(key: &AffinityKey, master_key: &ServiceKey, timeout_s: u32, now: u64) -> Option<Selected> {
    // SAFETY: the value is copied out at once.
    let last = unsafe { *AFFINITY.get(key)? };
    if now.wrapping_sub(last.last_used_ns) > u64::from(timeout_s) * NS_PER_SEC {
        return None;
    }
    // SAFETY: copied out at once.
    let member = unsafe { *MEMBERS.get(&MemberKey::of(master_key, last.backend_id))? };
    // SAFETY: copied out at once.
    let backend = unsafe { *BACKENDS.get(&last.backend_id)? };
    Some(Selected {
        id: last.backend_id,
        addr: member.addr,
        port: member.port,
        local: backend.state & BACKEND_F_LOCAL != 0,
    })
}

/// A backend by the frontend's algorithm (the master's `SVC_FLAG_ALG_*`).
#[inline(always)]
fn by_algorithm(
    pkt: &Packet,
    master_key: &ServiceKey,
    master: &ServiceValue,
) -> Result<Selected, Fault> {
    let count = master.count;
    if count == 0 {
        return Err(Fault::NoBackend);
    }
    if master.flags & SVC_FLAG_ALG_MAGLEV != 0 {
        return maglev(pkt, master.backend_id);
    }
    let n = if master.flags & SVC_FLAG_ALG_RR != 0 {
        rr_next(master.rev_nat_id)
    } else {
        // SAFETY: no arguments, always callable.
        unsafe { bpf_get_prandom_u32() }
    };
    slot(master_key, n % count + 1)
}

/// This CPU's round-robin counter of the frontend `rev_nat_id`, advanced. A frontend this CPU
/// has not served yet starts at a random point (its counter is created then), so CPUs do not
/// all start on slot 1.
#[inline(always)]
fn rr_next(rev_nat_id: u32) -> u32 {
    if let Some(c) = RR.get_ptr_mut(&rev_nat_id) {
        // SAFETY: this CPU's value of a live entry; per-CPU, so no other program writes it
        // meanwhile (preemption is off while a program runs).
        unsafe {
            let n = *c;
            if !crate::trace::dry_run() {
                *c = n.wrapping_add(1);
            }
            return n;
        }
    }
    // SAFETY: no arguments, always callable.
    let n = unsafe { bpf_get_prandom_u32() };
    // A lost counter (map full, a race with another CPU's insert) only costs evenness.
    if !crate::trace::dry_run() {
        let _ = RR.insert(&rev_nat_id, &n.wrapping_add(1), BPF_ANY.into());
    }
    n
}

/// The backend of Maglev table `table` for the client of `pkt`.
#[inline(always)]
fn maglev(pkt: &Packet, table: u32) -> Result<Selected, Fault> {
    // SAFETY: a load-time constant, read volatile so the loader's value is used.
    let m = unsafe { core::ptr::read_volatile(&XLB_MAGLEV_M) };
    if m == 0 {
        return Err(Fault::NoBackend);
    }
    let hash = lb_common::maglev_flow_hash(u32::from_be(pkt.saddr), u16::from_be(pkt.sport), pkt.proto);
    let index = table.wrapping_mul(m).wrapping_add(hash % m);
    let id = *MAGLEV.get(index).ok_or(Fault::NoBackend)?;
    if id == 0 {
        return Err(Fault::NoBackend);
    }
    backend(id)
}

/// The backend in slot `slot` (`1..=count`) of the frontend `master_key`.
#[inline(always)]
fn slot(master_key: &ServiceKey, slot: u32) -> Result<Selected, Fault> {
    let slot_key = master_key.with_slot(slot as u16);
    // SAFETY: values are copied out at once.
    let id = unsafe { SERVICES.get(&slot_key) }
        .ok_or(Fault::NoBackend)?
        .backend_id;
    backend(id)
}

/// Backend `id` from `BACKENDS`.
#[inline(always)]
fn backend(id: u32) -> Result<Selected, Fault> {
    // SAFETY: copied out at once.
    let backend = unsafe { *BACKENDS.get(&id).ok_or(Fault::NoBackend)? };
    Ok(Selected {
        id,
        addr: backend.addr,
        port: backend.port,
        local: backend.state & BACKEND_F_LOCAL != 0,
    })
}
