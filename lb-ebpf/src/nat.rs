//! Address/port rewrites with incremental checksum updates.
//!
//! `bpf_l4_csum_replace` with `BPF_F_PSEUDO_HDR` handles the pseudo-header part of an address
//! change (and CHECKSUM_PARTIAL skbs from local pods correctly); ports are plain L4 data.
//! UDP uses `BPF_F_MARK_MANGLED_0`: a zero checksum means "none" and stays zero, and a computed
//! zero is written as 0xffff. A non-first fragment has no L4 header: only its IP header changes
//! (the first fragment's L4 checksum update already covers the whole datagram).

use aya_ebpf::bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR};

use crate::{
    fault::Fault,
    frame::Frame,
    parse::{Packet, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF},
};

/// Rewrites the destination to `addr:port` (client -> frontend becomes client -> backend).
#[inline(always)]
pub fn dnat<C: Frame>(ctx: &C, pkt: &Packet, addr: u32, port: u16) -> Result<(), Fault> {
    set_addr(ctx, pkt, IP_DST_OFF, pkt.daddr, addr)?;
    set_port(ctx, pkt, pkt.l4_off + 2, pkt.dport, port)
}

/// Rewrites the source to `addr:port` (backend -> client becomes frontend -> client).
#[inline(always)]
pub fn snat<C: Frame>(ctx: &C, pkt: &Packet, addr: u32, port: u16) -> Result<(), Fault> {
    set_addr(ctx, pkt, IP_SRC_OFF, pkt.saddr, addr)?;
    set_port(ctx, pkt, pkt.l4_off, pkt.sport, port)
}

/// Rewrites the source address only (the hairpin SNAT keeps the client's port).
#[inline(always)]
pub fn snat_addr<C: Frame>(ctx: &C, pkt: &Packet, addr: u32) -> Result<(), Fault> {
    set_addr(ctx, pkt, IP_SRC_OFF, pkt.saddr, addr)
}

/// Rewrites the destination address only (a hairpin reply back to the pod itself).
#[inline(always)]
pub fn dnat_addr<C: Frame>(ctx: &C, pkt: &Packet, addr: u32) -> Result<(), Fault> {
    set_addr(ctx, pkt, IP_DST_OFF, pkt.daddr, addr)
}

/// Offset of the L4 checksum and the flags `bpf_l4_csum_replace` needs for it.
#[inline(always)]
fn l4_csum(pkt: &Packet) -> (usize, u64) {
    if pkt.is_tcp() {
        (pkt.l4_off + 16, 0)
    } else {
        (pkt.l4_off + 6, u64::from(BPF_F_MARK_MANGLED_0))
    }
}

/// Replaces an IPv4 address field, fixing the IP checksum and (with the pseudo header) the L4 one.
#[inline(always)]
fn set_addr<C: Frame>(ctx: &C, pkt: &Packet, off: usize, old: u32, new: u32) -> Result<(), Fault> {
    if old == new {
        return Ok(());
    }
    if pkt.has_l4 {
        let (csum_off, flags) = l4_csum(pkt);
        ctx.l4_csum_replace(
            csum_off,
            old.into(),
            new.into(),
            flags | u64::from(BPF_F_PSEUDO_HDR) | 4,
        )
        .map_err(|_| Fault::Rewrite)?;
    }
    ctx.l3_csum_replace(IP_CSUM_OFF, old.into(), new.into(), 4)
        .map_err(|_| Fault::Rewrite)?;
    ctx.store(off, &new).map_err(|_| Fault::Rewrite)
}

/// Replaces an L4 port field (nothing to do in a fragment without L4 header).
#[inline(always)]
fn set_port<C: Frame>(ctx: &C, pkt: &Packet, off: usize, old: u16, new: u16) -> Result<(), Fault> {
    if old == new || !pkt.has_l4 {
        return Ok(());
    }
    let (csum_off, flags) = l4_csum(pkt);
    ctx.l4_csum_replace(csum_off, old.into(), new.into(), flags | 2)
        .map_err(|_| Fault::Rewrite)?;
    ctx.store(off, &new).map_err(|_| Fault::Rewrite)
}
