//! `from_pod`: tc ingress on the host side of pod veths, i.e. packets leaving a pod.
//!
//! Established flow: one conntrack lookup, DNAT to the stored backend. A conntrack hit that may
//! not keep its backend (expired, a new connection on a closed tuple, a backend that left the
//! Service) starts over. New flow to a frontend: master lookup, backend selection, conntrack
//! pair, DNAT. Frontend without endpoints: refuse. A pod that selected itself is hairpinned.

use aya_ebpf::{bindings::TC_ACT_SHOT, macros::classifier, programs::TcContext};
use lb_common::{CtKey, CtValue, Stat, CT_F_HAIRPIN, PROTO_SCTP};

use crate::{
    conntrack::{
        self, alive, answer_key_of, forward_key, now_ns, reply_key_of, Dir, Reuse, HAIRPIN,
    },
    fault::{Fault, PASS},
    fefilter, icmp,
    lb::{self, Client},
    maps::CONNTRACK,
    nat, parse,
    parse::{Packet, Parsed, Skip},
    refuse::{bounce, refuse, swap_macs},
    stats::bump,
    svcstats::{self, Drop},
};

/// See `lb_common::global_names`: set by the agent at load time, read-only afterwards.
#[unsafe(no_mangle)]
static XLB_SERVICE_CIDR_ADDR: u32 = 0;
#[unsafe(no_mangle)]
static XLB_SERVICE_CIDR_MASK: u32 = 0;

/// Whether `daddr` is in the configured Service CIDR (never, when none is configured).
#[inline(always)]
pub(crate) fn in_service_cidr(daddr: u32) -> bool {
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
// Inlined into the program section: no BPF-to-BPF call on every packet.
#[inline(always)]
pub fn from_pod(ctx: TcContext) -> i32 {
    try_from_pod(&ctx).unwrap_or_else(Fault::verdict::<TcContext>)
}

#[inline(always)]
fn try_from_pod(ctx: &TcContext) -> Result<i32, Fault> {
    let pkt = match parse::parse(ctx) {
        Ok(Parsed::L4(pkt)) => pkt,
        Ok(Parsed::IcmpError(outer, quoted)) => return icmp::from_client(ctx, &outer, &quoted),
        Err(skip) => return Ok(skip.pass::<TcContext>()),
    };
    if pkt.proto == PROTO_SCTP {
        return Ok(other_proto(&pkt));
    }
    if pkt.daddr == HAIRPIN {
        return hairpin_reply(ctx, &pkt);
    }
    if !in_service_cidr(pkt.daddr) && !fefilter::may_be_frontend(pkt.daddr) {
        // No frontend and no live translated flow has this destination (the pre-filter): not
        // ours, without a map lookup. A direct SYN still drops a stale Service flow whose
        // answer tuple it re-uses, as on the full path.
        if pkt.is_syn_only() {
            forget_stale_reply(&pkt);
        }
        return Ok(PASS);
    }
    let key = forward_key(&pkt);
    let Some(entry) = CONNTRACK.get_ptr_mut(&key) else {
        if !pkt.has_l4 {
            // A later fragment whose flow is unknown: it cannot start a flow.
            return Ok(Skip::Fragment.pass::<TcContext>());
        }
        return new_flow(ctx, &pkt, None);
    };
    // SAFETY: a live map value; copied out before any other map operation.
    let ct = unsafe { *entry };
    // The clock is read only where it is needed: a packet that is not ours never pays it.
    let now = now_ns();
    let reason = if !alive(&ct, now) {
        Stat::CtExpired
    } else {
        match stale_reason(&pkt, &ct, Client::Pod) {
            None => {
                if pkt.has_l4 {
                    conntrack::update(&key, entry, &ct, &pkt, Dir::Forward, now, pkt.is_syn_only());
                } else {
                    bump(Stat::FragmentTranslated);
                }
                bump(Stat::Established);
                svcstats::packet(ct.svc_port_id, pkt.ip_tot_len);
                return forward(ctx, &pkt, &ct);
            }
            Some(stat) => stat,
        }
    };
    if !pkt.has_l4 {
        // A later fragment cannot start a flow. The old flow is over: drop its pair so no
        // reply is restored to a stale frontend.
        conntrack::remove_flow(&key, &ct);
        return Ok(Skip::Fragment.pass::<TcContext>());
    }
    bump(reason);
    // The old flow is over; the new one takes over its entries, or removes them when there is
    // no new flow (see `new_flow`).
    new_flow(ctx, &pkt, Some(Reuse { entry, old: ct }))
}

/// Why a live conntrack hit must not keep its backend, or `None` when it keeps it.
///
/// TCP keeps its backend even after it left the Service (as kube-proxy's conntrack does): the
/// connection lives or dies with that pod. A SYN without ACK is a new connection on the tuple:
/// after a close it always starts over; on a live entry it keeps the backend only while the
/// Service is the same (rev-NAT id) and the backend still a member. UDP has no connection to
/// lose: every datagram checks membership, and moves on at once (DNS must not blackhole).
/// `client` says which backend set of the frontend applies (see `lb::Client`).
#[inline(always)]
pub fn stale_reason(pkt: &Packet, ct: &CtValue, client: Client) -> Option<Stat> {
    if pkt.is_tcp() && !pkt.is_syn_only() {
        // The established path: nothing more to look up.
        return None;
    }
    if pkt.is_tcp() && lb_common::ct_state::is_closing(ct.state) {
        // A SYN after a close always starts over: no lookup decides it (a busy client's
        // re-used ports meet this on every connection).
        return Some(Stat::CtTupleReused);
    }
    let frontend = lb::frontend(pkt, client);
    let member = |(key, _): &(lb_common::ServiceKey, lb_common::ServiceValue)| {
        lb::is_member(key, ct.backend_id, ct.nat_addr, ct.nat_port)
    };
    if pkt.is_tcp() {
        let same_service = frontend.is_some_and(|f| f.1.rev_nat_id == ct.rev_nat_id);
        if same_service && frontend.as_ref().is_some_and(member) {
            return None;
        }
        return Some(Stat::CtTupleReused);
    }
    if frontend.as_ref().is_some_and(member) {
        None
    } else {
        Some(Stat::Reselected)
    }
}

/// Translates a packet of the flow `ct` (the forward entry) towards its backend.
#[inline(always)]
fn forward(ctx: &TcContext, pkt: &Packet, ct: &CtValue) -> Result<i32, Fault> {
    nat::dnat(ctx, pkt, ct.nat_addr, ct.nat_port)?;
    if ct.flags & CT_F_HAIRPIN == 0 {
        crate::lastfwd::record(pkt, pkt.saddr, pkt.sport, ct.nat_addr, ct.nat_port);
        return Ok(PASS);
    }
    // The pod is its own backend: it must see another peer than itself, and the packet goes
    // straight back into it.
    nat::snat_addr(ctx, pkt, HAIRPIN)?;
    swap_macs(ctx)?;
    bump(Stat::Hairpin);
    Ok(bounce(ctx))
}

/// A pod answering a hairpin flow (to [`HAIRPIN`]): restore the frontend as the source and the
/// pod itself as the destination, and send it straight back in.
#[inline(always)]
fn hairpin_reply(ctx: &TcContext, pkt: &Packet) -> Result<i32, Fault> {
    let key = reply_key_of(pkt);
    let Some(entry) = CONNTRACK.get_ptr_mut(&key) else {
        return Ok(PASS);
    };
    // SAFETY: a live map value; copied out before any other map operation.
    let ct = unsafe { *entry };
    let now = now_ns();
    if !alive(&ct, now) {
        return Ok(PASS);
    }
    conntrack::update(&key, entry, &ct, pkt, Dir::Reply, now, false);
    nat::snat(ctx, pkt, ct.nat_addr, ct.nat_port)?;
    nat::dnat_addr(ctx, pkt, pkt.saddr)?;
    swap_macs(ctx)?;
    bump(Stat::Reply);
    bump(Stat::Hairpin);
    Ok(bounce(ctx))
}

/// First packet of a flow (or one that starts over): select, track, DNAT.
///
/// `reuse`: the entry of the flow that is over on this tuple, taken over by the new
/// flow (`conntrack::create`), or removed with its pair when no new flow starts.
#[inline(always)]
fn new_flow(ctx: &TcContext, pkt: &Packet, reuse: Option<Reuse>) -> Result<i32, Fault> {
    let Some((master_key, master)) = lb::frontend(pkt, Client::Pod) else {
        conntrack::forget(pkt, &reuse);
        // An unallocated ClusterIP (or a port the Service does not have): refuse at once
        // instead of letting the packet leave untranslated and time out.
        if in_service_cidr(pkt.daddr) {
            return refuse(ctx, pkt);
        }
        // Not a frontend: not ours, and no map write, except that a direct connection must
        // not have its answers rewritten by a stale Service flow that used the same tuple.
        if pkt.is_syn_only() {
            forget_stale_reply(pkt);
        }
        return Ok(PASS);
    };
    let id = master.svc_port_id;
    if !lb::source_allowed(pkt, &master) {
        conntrack::forget(pkt, &reuse);
        bump(Stat::DropSourceRange);
        svcstats::dropped(id, Drop::SourceRange);
        return Ok(TC_ACT_SHOT);
    }
    if master.count == 0 {
        conntrack::forget(pkt, &reuse);
        svcstats::dropped(id, Drop::Refused);
        return refuse(ctx, pkt);
    }
    let now = now_ns();
    let selected = lb::select(pkt, &master_key, &master, now).inspect_err(|_| {
        conntrack::forget(pkt, &reuse);
        svcstats::dropped(id, Drop::NoBackend);
    })?;
    let flags = if selected.addr == pkt.saddr {
        CT_F_HAIRPIN
    } else {
        0
    };
    let target = conntrack::Target {
        backend_id: selected.id,
        addr: selected.addr,
        port: selected.port,
        snat_addr: 0,
        snat_port: 0,
        rev_nat_id: master.rev_nat_id,
        svc_port_id: master.svc_port_id,
        flags,
    };
    if !conntrack::create(pkt, &target, now, reuse.as_ref()) {
        bump(Stat::CtInsertFailed);
    }
    bump(Stat::NewFlow);
    svcstats::new_flow(id);
    svcstats::first_packet(id, pkt.ip_tot_len);
    let ct = CtValue {
        nat_addr: selected.addr,
        nat_port: selected.port,
        flags,
        ..CtValue::default()
    };
    forward(ctx, pkt, &ct)
}

/// Removes the Service flow whose reply tuple is the answer tuple of the direct SYN `pkt`.
#[inline(always)]
fn forget_stale_reply(pkt: &Packet) {
    // The stale flow's reply entry has the destination port as its source: none when no
    // backend uses that port (see `fefilter`).
    if !fefilter::may_be_reply(pkt.dport) {
        return;
    }
    let key: CtKey = answer_key_of(pkt);
    // SAFETY: copied out at once.
    if let Some(stale) = unsafe { CONNTRACK.get(&key) }.copied() {
        conntrack::remove_flow(&key, &stale);
        bump(Stat::CtStaleReplyRemoved);
    }
}

/// SCTP is not translated yet: count packets to an SCTP frontend so the gap is visible.
#[inline(always)]
fn other_proto(pkt: &Packet) -> i32 {
    if lb::frontend(pkt, Client::Pod).is_some() {
        bump(Stat::PassOtherProto);
    }
    PASS
}
