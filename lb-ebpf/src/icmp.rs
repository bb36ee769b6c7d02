//! ICMP errors about translated flows, translated back so the socket that caused them gets them:
//! a UDP client of a Service gets ECONNREFUSED from the backend's port unreachable, a TCP client
//! gets its path MTU from fragmentation-needed, traceroute-style time exceeded finds its flow.
//!
//! - `to_pod` ([`to_client`]): the error goes into a client pod and quotes what the client sent
//!   after DNAT (client -> backend). The quote's destination becomes the frontend again, and so
//!   does the outer source when the backend itself sent the error.
//! - `from_pod` ([`from_client`]): the error leaves a client pod and quotes a reply it got
//!   (frontend -> client). The quote's source becomes the backend, and so does the outer
//!   destination, so the backend's socket gets the error.
//!
//! Every checksum update inside the ICMP message is plain field arithmetic (`bpf_l3_csum_replace`
//! works on any 16-bit checksum field, whatever the skb's checksum state). A consistent quoted IP
//! header always sums to zero, so changing an address in it together with its checksum leaves
//! the ICMP checksum as it was; the quoted port and quoted L4 checksum are accounted for.

use lb_common::{CtKey, Stat, CT_FORWARD, CT_F_HAIRPIN, CT_F_SNAT, CT_REPLY, PROTO_UDP};

use crate::{
    conntrack::{alive, now_ns},
    fault::Fault,
    frame::Frame,
    maps::CONNTRACK,
    parse::{Packet, Quoted, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF},
    stats::bump,
};

/// One address + port pair of the quoted packet to replace.
struct Change {
    addr_off: usize,
    old_addr: u32,
    new_addr: u32,
    port_off: usize,
    old_port: u16,
    new_port: u16,
}

/// `to_pod`: an error for a client about a packet it sent to a backend through a frontend.
#[inline(always)]
pub fn to_client<C: Frame>(ctx: &C, outer: &Packet, q: &Quoted) -> Result<i32, Fault> {
    // The flow's reply entry (backend, client, bport, cport); its frontend goes back into the
    // quote's destination, and into the outer source when the backend sent the error.
    translate(ctx, outer, q, CT_REPLY)
}

/// `from_pod`: an error from a client about a reply it got from a frontend.
#[inline(always)]
pub fn from_client<C: Frame>(ctx: &C, outer: &Packet, q: &Quoted) -> Result<i32, Fault> {
    // The flow's forward entry (client, frontend, cport, fport); its backend goes back into the
    // quote's source, and into the outer destination when the error was sent to the frontend.
    translate(ctx, outer, q, CT_FORWARD)
}

/// Looks up the flow the quote belongs to (its entry in direction `dir`, keyed by the quote's
/// answer tuple) and rewrites the quoted peer (`dir == CT_REPLY`: the destination, else the
/// source) and the matching outer address to that entry's NAT address and port.
#[inline(always)]
fn translate<C: Frame>(ctx: &C, outer: &Packet, q: &Quoted, dir: u8) -> Result<i32, Fault> {
    let key = CtKey {
        saddr: q.daddr,
        daddr: q.saddr,
        sport: q.dport,
        dport: q.sport,
        proto: q.proto,
        dir,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    let Some(ct) = (unsafe { CONNTRACK.get(&key) }).copied() else {
        return Ok(C::PASS);
    };
    // Errors about SNATed flows (from outside to another node) are not translated yet.
    if !alive(&ct, now_ns()) || ct.flags & (CT_F_HAIRPIN | CT_F_SNAT) != 0 {
        return Ok(C::PASS);
    }
    let to_client = dir == CT_REPLY;
    let change = if to_client {
        Change {
            addr_off: q.ip_off + 16,
            old_addr: q.daddr,
            port_off: q.l4_off + 2,
            old_port: q.dport,
            new_addr: ct.nat_addr,
            new_port: ct.nat_port,
        }
    } else {
        Change {
            addr_off: q.ip_off + 12,
            old_addr: q.saddr,
            port_off: q.l4_off,
            old_port: q.sport,
            new_addr: ct.nat_addr,
            new_port: ct.nat_port,
        }
    };
    rewrite_quote(ctx, outer, q, &change)?;
    let (outer_off, outer_addr) = if to_client {
        (IP_SRC_OFF, outer.saddr)
    } else {
        (IP_DST_OFF, outer.daddr)
    };
    if outer_addr == change.old_addr {
        set_outer_addr(ctx, outer_off, outer_addr, ct.nat_addr)?;
    }
    bump(Stat::IcmpErrorTranslated);
    Ok(C::PASS)
}

/// `from_net` (tc): an ICMP error about a flow this node SNATed to a backend on another node,
/// arriving at the node. Either it quotes what the node sent the backend (node:port ->
/// backend), and goes to the client, quoting client -> frontend; or it quotes what the node sent
/// the client (frontend -> client), and goes to the backend, quoting backend -> node:port. The
/// outer source, when it is the quoted destination itself, becomes what that peer was to the
/// other side. Returns the new outer (source, destination) for the caller to send it on (its
/// source may be a local address, so it cannot go up the stack), or `None`: not such an error.
#[inline(always)]
pub fn snat_flow<C: Frame>(ctx: &C, outer: &Packet, q: &Quoted) -> Result<Option<(u32, u32)>, Fault> {
    let key = CtKey {
        saddr: q.daddr,
        daddr: q.saddr,
        sport: q.dport,
        dport: q.sport,
        proto: q.proto,
        dir: CT_REPLY,
        _pad: 0,
    };
    let now = now_ns();
    // SAFETY: copied out at once.
    let towards_backend = unsafe { CONNTRACK.get(&key) }.copied();
    let (src, dst) = match towards_backend {
        // The reply entry of the flow: nat = frontend, snat = client.
        Some(ct) if ct.flags & CT_F_SNAT != 0 && alive(&ct, now) => {
            ((ct.snat_addr, ct.snat_port), (ct.nat_addr, ct.nat_port))
        }
        _ => {
            let fwd = CtKey { dir: CT_FORWARD, ..key };
            // SAFETY: copied out at once.
            match unsafe { CONNTRACK.get(&fwd) }.copied() {
                // The forward entry: nat = backend, snat = the node's address and port.
                Some(ct) if ct.flags & CT_F_SNAT != 0 && alive(&ct, now) => {
                    ((ct.nat_addr, ct.nat_port), (ct.snat_addr, ct.snat_port))
                }
                _ => return Ok(None),
            }
        }
    };
    rewrite_quote(
        ctx,
        outer,
        q,
        &Change {
            addr_off: q.ip_off + 12,
            old_addr: q.saddr,
            new_addr: src.0,
            port_off: q.l4_off,
            old_port: q.sport,
            new_port: src.1,
        },
    )?;
    rewrite_quote(
        ctx,
        outer,
        q,
        &Change {
            addr_off: q.ip_off + 16,
            old_addr: q.daddr,
            new_addr: dst.0,
            port_off: q.l4_off + 2,
            old_port: q.dport,
            new_port: dst.1,
        },
    )?;
    set_outer_addr(ctx, IP_DST_OFF, outer.daddr, src.0)?;
    let outer_src = if outer.saddr == q.daddr { dst.0 } else { outer.saddr };
    set_outer_addr(ctx, IP_SRC_OFF, outer.saddr, outer_src)?;
    bump(Stat::IcmpErrorTranslated);
    Ok(Some((outer_src, src.0)))
}

/// Replaces one address and port of the quoted packet, with the quoted IP and L4 checksums and
/// the ICMP checksum.
#[inline(always)]
fn rewrite_quote<C: Frame>(ctx: &C, outer: &Packet, q: &Quoted, c: &Change) -> Result<(), Fault> {
    let icmp_csum = outer.l4_off + 2;
    let replace = |off: usize, old: u64, new: u64, size: u64| {
        ctx.l3_csum_replace(off, old, new, size)
            .map_err(|_| Fault::Rewrite)
    };
    // The quoted L4 checksum, when quoted (UDP: always within the 8 bytes; TCP: bytes 16-17)
    // and in use (a zero UDP checksum means none and stays zero).
    let l4_csum_off = if q.proto == PROTO_UDP { q.l4_off + 6 } else { q.l4_off + 16 };
    if l4_csum_off + 2 <= q.l4_off + q.l4_len {
        let old: u16 = ctx.load(l4_csum_off).map_err(|_| Fault::Rewrite)?;
        if old != 0 || q.proto != PROTO_UDP {
            replace(l4_csum_off, c.old_addr.into(), c.new_addr.into(), 4)?;
            replace(l4_csum_off, c.old_port.into(), c.new_port.into(), 2)?;
            let mut new: u16 = ctx.load(l4_csum_off).map_err(|_| Fault::Rewrite)?;
            if new == 0 && q.proto == PROTO_UDP {
                // 0 and 0xffff are the same one's-complement value: the ICMP sum is unchanged.
                new = 0xffff;
                ctx.store(l4_csum_off, &new).map_err(|_| Fault::Rewrite)?;
            }
            replace(icmp_csum, old.into(), new.into(), 2)?;
        }
    }
    // The quoted IP header stays consistent, so it adds nothing to the ICMP checksum change.
    replace(q.ip_off + 10, c.old_addr.into(), c.new_addr.into(), 4)?;
    ctx.store(c.addr_off, &c.new_addr)
        .map_err(|_| Fault::Rewrite)?;
    replace(icmp_csum, c.old_port.into(), c.new_port.into(), 2)?;
    ctx.store(c.port_off, &c.new_port)
        .map_err(|_| Fault::Rewrite)
}

/// Replaces an outer IP address (ICMP has no pseudo header: only the IP checksum changes).
#[inline(always)]
fn set_outer_addr<C: Frame>(ctx: &C, off: usize, old: u32, new: u32) -> Result<(), Fault> {
    ctx.l3_csum_replace(IP_CSUM_OFF, old.into(), new.into(), 4)
        .map_err(|_| Fault::Rewrite)?;
    ctx.store(off, &new).map_err(|_| Fault::Rewrite)
}
