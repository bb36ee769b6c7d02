//! Backend selection for a new flow: the client's affine backend when sessionAffinity applies,
//! is fresh and is still a member of the Service, else a uniformly random slot (Cilium's
//! "random" algorithm; slots `1..=count`). Membership (`MEMBERS`) is checked by address, so a
//! stale id can never send a flow to another pod.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_get_prandom_u32, maps::lpm_trie::Key};
use lb_common::{
    AffinityKey, AffinityValue, MemberKey, ServiceKey, ServiceValue, SrcRangeKey,
    BACKEND_F_LOCAL, SCOPE_EXT, SCOPE_INT, SVC_FLAG_AFFINITY, SVC_FLAG_SOURCE_RANGES,
    SVC_FLAG_TWO_SCOPES,
};

use crate::{
    fault::Fault,
    maps::{AFFINITY, BACKENDS, MEMBERS, SERVICES, SRC_RANGES},
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
        return random_slot(master_key, master.count);
    }
    let key = AffinityKey {
        client: pkt.saddr,
        rev_nat_id: master.rev_nat_id,
    };
    let selected = match affine(&key, master_key, master.affinity_timeout, now) {
        Some(selected) => selected,
        None => random_slot(master_key, master.count)?,
    };
    let value = AffinityValue {
        backend_id: selected.id,
        _pad: 0,
        last_used_ns: now,
    };
    // Losing the affinity record only costs stickiness for the next flow.
    let _ = AFFINITY.insert(&key, &value, BPF_ANY.into());
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

#[inline(always)]
fn random_slot(master_key: &ServiceKey, count: u32) -> Result<Selected, Fault> {
    if count == 0 {
        return Err(Fault::NoBackend);
    }
    // SAFETY: no arguments, always callable.
    let slot = unsafe { bpf_get_prandom_u32() } % count + 1;
    let slot_key = master_key.with_slot(slot as u16);
    // SAFETY: values are copied out at once.
    let id = unsafe { SERVICES.get(&slot_key) }
        .ok_or(Fault::NoBackend)?
        .backend_id;
    let backend = unsafe { *BACKENDS.get(&id).ok_or(Fault::NoBackend)? };
    Ok(Selected {
        id,
        addr: backend.addr,
        port: backend.port,
        local: backend.state & BACKEND_F_LOCAL != 0,
    })
}
