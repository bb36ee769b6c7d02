//! `to_pod`: tc egress on the host side of pod veths, i.e. packets going into a pod.
//! Replies of translated flows get their source restored to the frontend the client used.

use aya_ebpf::{macros::classifier, programs::TcContext};
use lb_common::{Stat, PROTO_SCTP};

use crate::{
    conntrack::{self, now_ns, reply_key_of},
    fault::{Fault, PASS},
    maps::{CONNTRACK, REV_NAT},
    nat, parse,
    stats::bump,
};

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    try_to_pod(&ctx).unwrap_or_else(Fault::verdict)
}

#[inline(always)]
fn try_to_pod(ctx: &TcContext) -> Result<i32, Fault> {
    let pkt = match parse::parse(ctx) {
        Ok(pkt) => pkt,
        Err(skip) => return Ok(skip.pass()),
    };
    if pkt.proto == PROTO_SCTP {
        return Ok(PASS);
    }
    let Some(entry) = CONNTRACK.get_ptr_mut(reply_key_of(&pkt)) else {
        return Ok(PASS);
    };
    // SAFETY: a live map value; copied out before any other map operation.
    let ct = unsafe { *entry };
    let (addr, port) = if ct.nat_addr != 0 {
        (ct.nat_addr, ct.nat_port)
    } else {
        // An entry written without the frontend: restore it from the rev-NAT table.
        // SAFETY: copied out at once.
        match unsafe { REV_NAT.get(ct.rev_nat_id) } {
            Some(rev) => (rev.addr, rev.port),
            None => return Ok(PASS),
        }
    };
    conntrack::touch(entry, &pkt, now_ns());
    nat::snat(ctx, &pkt, addr, port)?;
    bump(Stat::Reply);
    Ok(PASS)
}
