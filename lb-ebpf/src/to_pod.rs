//! Answers on their way to a client: `to_pod` (tc egress on the host side of pod veths, packets
//! going into a pod) and `to_net` (tc egress on the external devices, packets leaving the node).
//! Replies of translated flows get their source restored to the frontend the client used (and,
//! for a SNATed flow, their destination restored to the client); ICMP errors about translated
//! flows are translated back (see `icmp`). Both hooks run the same code: what differs is only
//! which clients' answers pass there (pods' there, outside clients' here).

use aya_ebpf::{macros::classifier, programs::TcContext};
use lb_common::{ct_state, Stat, CT_F_SNAT, PROTO_SCTP};

use crate::{
    conntrack::{self, alive, now_ns, reply_key_of, Dir},
    fault::Fault,
    fefilter,
    frame::Frame,
    icmp,
    maps::CONNTRACK,
    nat, parse,
    parse::Parsed,
    stats::bump,
};

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    to_client(&ctx).unwrap_or_else(Fault::verdict::<TcContext>)
}

#[classifier]
pub fn to_net(ctx: TcContext) -> i32 {
    to_client(&ctx).unwrap_or_else(Fault::verdict::<TcContext>)
}

#[inline(always)]
fn to_client<C: Frame>(ctx: &C) -> Result<i32, Fault> {
    let pkt = match parse::parse(ctx) {
        Ok(Parsed::L4(pkt)) => pkt,
        Ok(Parsed::IcmpError(outer, quoted)) => return icmp::to_client(ctx, &outer, &quoted),
        Err(skip) => return Ok(skip.pass::<C>()),
    };
    if pkt.proto == PROTO_SCTP {
        return Ok(C::PASS);
    }
    if crate::lastfwd::is_last(&pkt) {
        // The packet this CPU just translated towards its backend: the forward direction of
        // its flow, whose reply lookup could only miss (see `lastfwd`).
        bump(Stat::ForwardPassed);
        return Ok(C::PASS);
    }
    if !fefilter::may_be_reply(pkt.sport) {
        // No backend uses the source port: no reply entry has this tuple (and a SYN has no
        // stale flow to remove), see `fefilter`.
        return Ok(C::PASS);
    }
    let key = reply_key_of(&pkt);
    let Some(entry) = CONNTRACK.get_ptr_mut(&key) else {
        return Ok(C::PASS);
    };
    // SAFETY: a live map value; copied out before any other map operation.
    let ct = unsafe { *entry };
    let now = now_ns();
    if !alive(&ct, now) {
        bump(Stat::CtExpired);
        return Ok(C::PASS);
    }
    if pkt.is_syn_only() || (pkt.is_syn_ack() && ct_state::is_closing(ct.state)) {
        // An answer is never a bare SYN: this is a new connection towards the pod on a tuple
        // a Service flow used before. A SYN-ACK answering on the tuple of a closed Service
        // flow answers a new (direct) connection that re-used it. The stale flow must not
        // rewrite either.
        conntrack::remove_flow(&key, &ct);
        bump(Stat::CtStaleReplyRemoved);
        return Ok(C::PASS);
    }
    if pkt.has_l4 {
        conntrack::update(&key, entry, &ct, &pkt, Dir::Reply, now, false);
    } else {
        bump(Stat::FragmentTranslated);
    }
    nat::snat(ctx, &pkt, ct.nat_addr, ct.nat_port)?;
    if ct.flags & CT_F_SNAT != 0 {
        nat::dnat(ctx, &pkt, ct.snat_addr, ct.snat_port)?;
    }
    bump(Stat::Reply);
    Ok(C::PASS)
}
