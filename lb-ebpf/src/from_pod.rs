//! `from_pod`: tc ingress on the host side of pod veths, i.e. packets leaving a pod.
//!
//! Established flow: one conntrack lookup, DNAT to the stored backend. New flow to a frontend:
//! master lookup, backend selection, conntrack pair, DNAT. Frontend without endpoints: refuse.

use aya_ebpf::{macros::classifier, programs::TcContext};
use lb_common::{ServiceKey, Stat, PROTO_SCTP, SCOPE_EXT};

use crate::{
    conntrack::{self, forward_key, now_ns},
    fault::{Fault, PASS},
    lb,
    maps::{BACKENDS, CONNTRACK, SERVICES},
    nat, parse,
    parse::{Packet, TCP_ACK, TCP_SYN},
    refuse::refuse,
    stats::bump,
};

/// See `lb_common::global_names`: set by the agent at load time, read-only afterwards.
#[unsafe(no_mangle)]
static XLB_SERVICE_CIDR_ADDR: u32 = 0;
#[unsafe(no_mangle)]
static XLB_SERVICE_CIDR_MASK: u32 = 0;

/// Whether `daddr` is in the configured Service CIDR (never, when none is configured).
#[inline(always)]
fn in_service_cidr(daddr: u32) -> bool {
    // SAFETY: plain reads of load-time constants; volatile so the compiler keeps the loads
    // (the loader patches the values after compilation).
    let (addr, mask) = unsafe {
        (
            core::ptr::read_volatile(&XLB_SERVICE_CIDR_ADDR),
            core::ptr::read_volatile(&XLB_SERVICE_CIDR_MASK),
        )
    };
    mask != 0 && daddr & mask == addr
}

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    try_from_pod(&ctx).unwrap_or_else(Fault::verdict)
}

#[inline(always)]
fn try_from_pod(ctx: &TcContext) -> Result<i32, Fault> {
    let pkt = match parse::parse(ctx) {
        Ok(pkt) => pkt,
        Err(skip) => return Ok(skip.pass()),
    };
    if pkt.proto == PROTO_SCTP {
        return Ok(other_proto(&pkt));
    }
    let now = now_ns();
    let key = forward_key(&pkt);
    let mut reselected = false;
    if let Some(entry) = CONNTRACK.get_ptr_mut(key) {
        // SAFETY: a live map value; copied out before any other map operation.
        let ct = unsafe { *entry };
        if keeps_backend(&pkt, ct.backend_id) {
            conntrack::touch(entry, &pkt, now);
            nat::dnat(ctx, &pkt, ct.nat_addr, ct.nat_port)?;
            bump(Stat::Established);
            return Ok(PASS);
        }
        // Stale pair: the new selection rewrites the forward entry; drop both in case the
        // Service is gone altogether (then the packet passes untouched).
        conntrack::forget_reply(&pkt, ct.nat_addr, ct.nat_port);
        let _ = CONNTRACK.remove(key);
        reselected = true;
    }
    new_flow(ctx, &pkt, now, reselected)
}

/// Whether a conntrack hit may use its stored backend.
///
/// TCP keeps its backend even after it left the Service (as kube-proxy's conntrack does): the
/// connection lives or dies with that pod. Only a fresh SYN (a new connection reusing the
/// tuple) checks the backend still exists. UDP has no connection to lose, so every datagram
/// checks and the flow moves on as soon as the backend is gone (DNS must not blackhole).
#[inline(always)]
fn keeps_backend(pkt: &Packet, backend_id: u32) -> bool {
    if pkt.is_tcp() && !(pkt.has_tcp_flag(TCP_SYN) && !pkt.has_tcp_flag(TCP_ACK)) {
        return true;
    }
    // SAFETY: existence check only.
    unsafe { BACKENDS.get(backend_id) }.is_some()
}

/// First packet of a flow (or a UDP flow whose backend left): select, track, DNAT.
#[inline(always)]
fn new_flow(ctx: &TcContext, pkt: &Packet, now: u64, reselected: bool) -> Result<i32, Fault> {
    let master_key = ServiceKey::new(pkt.daddr, pkt.dport, pkt.proto, SCOPE_EXT, 0);
    // SAFETY: the master is copied out at once.
    let Some(master) = (unsafe { SERVICES.get(master_key) }).copied() else {
        // An unallocated ClusterIP (or a port the Service does not have): refuse at once
        // instead of letting the packet leave untranslated and time out.
        if in_service_cidr(pkt.daddr) {
            return refuse(ctx, pkt);
        }
        // Not a frontend: not ours, and no map write.
        return Ok(PASS);
    };
    if master.count == 0 {
        return refuse(ctx, pkt);
    }
    let selected = lb::select(pkt, &master_key, &master, now)?;
    if !conntrack::create(pkt, selected.id, &selected.backend, master.rev_nat_id, now) {
        bump(Stat::CtInsertFailed);
    }
    nat::dnat(ctx, pkt, selected.backend.addr, selected.backend.port)?;
    bump(if reselected {
        Stat::Reselected
    } else {
        Stat::NewFlow
    });
    Ok(PASS)
}

/// SCTP is not translated yet: count packets to an SCTP frontend so the gap is visible.
#[inline(always)]
fn other_proto(pkt: &Packet) -> i32 {
    let master_key = ServiceKey::new(pkt.daddr, pkt.dport, pkt.proto, SCOPE_EXT, 0);
    // SAFETY: existence check only.
    if unsafe { SERVICES.get(master_key) }.is_some() {
        bump(Stat::PassOtherProto);
    }
    PASS
}
