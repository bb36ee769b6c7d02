//! Conntrack entries: a forward entry keyed by the client's tuple (value: the backend) and a
//! reply entry keyed by the backend's answer tuple (value: the frontend to restore).

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_ns};
use lb_common::{
    Backend, CtKey, CtValue, CT_FORWARD, CT_REPLY, CT_SEEN_FIN, CT_SEEN_RST, CT_SEEN_SYN,
};

use crate::{
    maps::CONNTRACK,
    parse::{Packet, TCP_FIN, TCP_RST, TCP_SYN},
};

/// `last_seen_ns` is rewritten at most this often, so busy flows do not write the map per packet.
const REFRESH_NS: u64 = 1_000_000_000;

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: no arguments, always callable.
    unsafe { bpf_ktime_get_ns() }
}

/// The forward key of `pkt` (client -> frontend).
#[inline(always)]
pub fn forward_key(pkt: &Packet) -> CtKey {
    CtKey {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        dir: CT_FORWARD,
        _pad: 0,
    }
}

/// The key under which `to_pod` finds the reply of `pkt` (an incoming packet, backend -> client).
#[inline(always)]
pub fn reply_key_of(pkt: &Packet) -> CtKey {
    CtKey {
        dir: CT_REPLY,
        ..forward_key(pkt)
    }
}

/// The reply key of a client flow translated to `backend_addr:backend_port`.
#[inline(always)]
pub fn reply_key(pkt: &Packet, backend_addr: u32, backend_port: u16) -> CtKey {
    CtKey {
        saddr: backend_addr,
        daddr: pkt.saddr,
        sport: backend_port,
        dport: pkt.sport,
        proto: pkt.proto,
        dir: CT_REPLY,
        _pad: 0,
    }
}

/// The conntrack flags a TCP packet contributes.
#[inline(always)]
fn seen_flags(pkt: &Packet) -> u8 {
    let mut seen = 0;
    if pkt.has_tcp_flag(TCP_SYN) {
        seen |= CT_SEEN_SYN;
    }
    if pkt.has_tcp_flag(TCP_FIN) {
        seen |= CT_SEEN_FIN;
    }
    if pkt.has_tcp_flag(TCP_RST) {
        seen |= CT_SEEN_RST;
    }
    seen
}

/// Marks an entry as used by `pkt`: writes only when a second has passed or a new flag shows.
#[inline(always)]
pub fn touch(entry: *mut CtValue, pkt: &Packet, now: u64) {
    let seen = seen_flags(pkt);
    // SAFETY: `entry` is a live map value returned by a lookup in this program run.
    unsafe {
        if now.wrapping_sub((*entry).last_seen_ns) >= REFRESH_NS {
            (*entry).last_seen_ns = now;
        }
        if (*entry).flags & seen != seen {
            (*entry).flags |= seen;
        }
    }
}

/// Inserts the forward and reply entries of a new flow of `pkt` to `backend`.
/// Returns false when an insert failed (the flow is still translated, just not pinned).
#[inline(always)]
pub fn create(pkt: &Packet, backend_id: u32, backend: &Backend, rev_nat_id: u32, now: u64) -> bool {
    let flags = seen_flags(pkt);
    let forward = CtValue {
        backend_id,
        nat_addr: backend.addr,
        nat_port: backend.port,
        flags,
        _pad: 0,
        rev_nat_id,
        last_seen_ns: now,
    };
    let reply = CtValue {
        nat_addr: pkt.daddr,
        nat_port: pkt.dport,
        ..forward
    };
    let fwd_ok = CONNTRACK
        .insert(forward_key(pkt), forward, BPF_ANY.into())
        .is_ok();
    let rep_ok = CONNTRACK
        .insert(
            reply_key(pkt, backend.addr, backend.port),
            reply,
            BPF_ANY.into(),
        )
        .is_ok();
    fwd_ok && rep_ok
}

/// Drops the reply entry of a flow that is being moved away from `backend_addr:backend_port`.
#[inline(always)]
pub fn forget_reply(pkt: &Packet, backend_addr: u32, backend_port: u16) {
    // A missing entry (already evicted) is fine.
    let _ = CONNTRACK.remove(reply_key(pkt, backend_addr, backend_port));
}
