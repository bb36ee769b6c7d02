//! `to_pod`: tc egress on the host side of pod veths, i.e. packets going into a pod.
//! Replies of translated flows get their source restored to the frontend the client used;
//! ICMP errors about translated flows are translated back (see `icmp`).

use aya_ebpf::{macros::classifier, programs::TcContext};
use lb_common::{Stat, PROTO_SCTP};

use crate::{
    conntrack::{self, alive, now_ns, reply_key_of, Dir},
    fault::{Fault, PASS},
    icmp,
    maps::CONNTRACK,
    nat, parse,
    parse::Parsed,
    stats::bump,
};

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    try_to_pod(&ctx).unwrap_or_else(Fault::verdict)
}

#[inline(always)]
fn try_to_pod(ctx: &TcContext) -> Result<i32, Fault> {
    let pkt = match parse::parse(ctx) {
        Ok(Parsed::L4(pkt)) => pkt,
        Ok(Parsed::IcmpError(outer, quoted)) => return icmp::to_client(ctx, &outer, &quoted),
        Err(skip) => return Ok(skip.pass()),
    };
    if pkt.proto == PROTO_SCTP {
        return Ok(PASS);
    }
    let key = reply_key_of(&pkt);
    let Some(entry) = CONNTRACK.get_ptr_mut(&key) else {
        return Ok(PASS);
    };
    // SAFETY: a live map value; copied out before any other map operation.
    let ct = unsafe { *entry };
    let now = now_ns();
    if !alive(&ct, now) {
        bump(Stat::CtExpired);
        return Ok(PASS);
    }
    if pkt.is_syn_only() {
        // An answer is never a bare SYN: this is a new connection towards the pod on a tuple
        // a Service flow used before. The stale flow must not rewrite it.
        conntrack::remove_flow(&key, &ct);
        bump(Stat::CtStaleReplyRemoved);
        return Ok(PASS);
    }
    if pkt.has_l4 {
        conntrack::update(&key, entry, &pkt, Dir::Reply, now, false);
    } else {
        bump(Stat::FragmentTranslated);
    }
    nat::snat(ctx, &pkt, ct.nat_addr, ct.nat_port)?;
    bump(Stat::Reply);
    Ok(PASS)
}
