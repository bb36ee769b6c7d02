//! Address/port rewrites with incremental checksum updates.
//!
//! `bpf_l4_csum_replace` with `BPF_F_PSEUDO_HDR` handles the pseudo-header part of an address
//! change (and CHECKSUM_PARTIAL skbs from local pods correctly); ports are plain L4 data.
//! UDP uses `BPF_F_MARK_MANGLED_0`: a zero checksum means "none" and stays zero, and a computed
//! zero is written as 0xffff. A non-first fragment has no L4 header: only its IP header changes
//! (the first fragment's L4 checksum update already covers the whole datagram).
//!
//! A packet the direct parser read (`Packet::direct`, tc) is rewritten with direct stores: the
//! address and port, and the IP checksum updated in software (RFC 1624; the IP checksum is never
//! offloaded, so plain arithmetic on the field is all `bpf_l3_csum_replace` did). Only the L4
//! checksum keeps its helper (it knows CHECKSUM_PARTIAL and CHECKSUM_COMPLETE): at most two
//! calls per rewrite, one for the address (pseudo header), one for the port; for TCP usually
//! one: the field after the address call tells whether the skb is CHECKSUM_PARTIAL
//! (`lb_common::csum`), and the port is then updated in software or, for a partial checksum,
//! left alone. The stores come first, since the helpers invalidate packet pointers. XDP frames are never CHECKSUM_PARTIAL,
//! so there the L4 checksum is updated in software on the packet as well. Other packets (IP
//! options, later fragments, non-linear headers) keep the helper path.

use aya_ebpf::bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR};
use lb_common::csum::{self, Summed};

use crate::{
    fault::Fault,
    frame::{csum_update, Frame},
    parse::{
        Packet, DIRECT_TCP_LEN, DIRECT_UDP_LEN, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, L4_OFF_DIRECT,
    },
};
/// Rewrites the destination to `addr:port` (client -> frontend becomes client -> backend).
#[inline(always)]
pub fn dnat<C: Frame>(ctx: &C, pkt: &Packet, addr: u32, port: u16) -> Result<(), Fault> {
    if rewrite_direct(ctx, pkt, true, addr, Some(port))? {
        return Ok(());
    }
    set_addr(ctx, pkt, IP_DST_OFF, pkt.daddr, addr)?;
    set_port(ctx, pkt, pkt.l4_off + 2, pkt.dport, port)
}

/// Rewrites the source to `addr:port` (backend -> client becomes frontend -> client).
#[inline(always)]
pub fn snat<C: Frame>(ctx: &C, pkt: &Packet, addr: u32, port: u16) -> Result<(), Fault> {
    if rewrite_direct(ctx, pkt, false, addr, Some(port))? {
        return Ok(());
    }
    set_addr(ctx, pkt, IP_SRC_OFF, pkt.saddr, addr)?;
    set_port(ctx, pkt, pkt.l4_off, pkt.sport, port)
}

/// Rewrites the source address only (the hairpin SNAT keeps the client's port).
#[inline(always)]
pub fn snat_addr<C: Frame>(ctx: &C, pkt: &Packet, addr: u32) -> Result<(), Fault> {
    if rewrite_direct(ctx, pkt, false, addr, None)? {
        return Ok(());
    }
    set_addr(ctx, pkt, IP_SRC_OFF, pkt.saddr, addr)
}

/// Rewrites the destination address only (a hairpin reply back to the pod itself).
#[inline(always)]
pub fn dnat_addr<C: Frame>(ctx: &C, pkt: &Packet, addr: u32) -> Result<(), Fault> {
    if rewrite_direct(ctx, pkt, true, addr, None)? {
        return Ok(());
    }
    set_addr(ctx, pkt, IP_DST_OFF, pkt.daddr, addr)
}

/// The direct rewrite of the destination (`dst`) or source address to `addr` and, when given,
/// its port to `port`. `Ok(false)`: the packet is not direct (or its headers are no longer
/// linear), nothing was written, use the helper path.
#[inline(always)]
fn rewrite_direct<C: Frame>(
    ctx: &C,
    pkt: &Packet,
    dst: bool,
    addr: u32,
    port: Option<u16>,
) -> Result<bool, Fault> {
    if !pkt.direct {
        return Ok(false);
    }
    let tcp = pkt.is_tcp();
    let (old_addr, old_port) = if dst {
        (pkt.daddr, pkt.dport)
    } else {
        (pkt.saddr, pkt.sport)
    };
    let addr_changes = old_addr != addr;
    let port_changes = port.is_some_and(|p| p != old_port);
    if !addr_changes && !port_changes {
        return Ok(true);
    }
    // Constant offsets (no IP options), so the verifier can check every access against one
    // bound.
    let addr_off = if dst { IP_DST_OFF } else { IP_SRC_OFF };
    let port_off = if dst {
        L4_OFF_DIRECT + 2
    } else {
        L4_OFF_DIRECT
    };
    let end = if tcp { DIRECT_TCP_LEN } else { DIRECT_UDP_LEN };
    // Taken again: an earlier rewrite of this packet called the csum helpers.
    let Some(p) = ctx.direct(end) else {
        return Ok(false);
    };
    let csum_off = if tcp {
        L4_OFF_DIRECT + 16
    } else {
        L4_OFF_DIRECT + 6
    };
    // SAFETY: `direct` checked that `end` bytes from `p` are in the linear packet; each access
    // is at a constant offset below `end`, aligned to its size (see `parse::parse_direct`).
    unsafe {
        if addr_changes {
            let csum = p.add(IP_CSUM_OFF).cast::<u16>();
            csum.write(csum_update(csum.read(), old_addr.into(), addr.into(), 4));
            p.add(addr_off).cast::<u32>().write(addr);
        }
        if let Some(port) = port.filter(|_| port_changes) {
            p.add(port_off).cast::<u16>().write(port);
        }
        if C::XDP {
            // XDP frames are never CHECKSUM_PARTIAL: the L4 checksum is plain arithmetic too
            // (the pseudo-header part of the address is an ordinary update), with the UDP
            // zero-checksum rule of BPF_F_MARK_MANGLED_0.
            let l4 = p.add(csum_off).cast::<u16>();
            let old = l4.read();
            if tcp || old != 0 {
                let mut new = old;
                if addr_changes {
                    new = csum_update(new, old_addr.into(), addr.into(), 4);
                }
                if let Some(port) = port.filter(|_| port_changes) {
                    new = csum_update(new, old_port.into(), port.into(), 2);
                }
                if !tcp && new == 0 {
                    new = 0xffff;
                }
                l4.write(new);
            }
            return Ok(true);
        }
    }
    // The L4 checksum last: the helpers invalidate `p`.
    let (_, flags) = l4_csum(pkt);
    if addr_changes {
        // SAFETY: as above (`p` is still valid: no helper ran since `direct`).
        let before = unsafe { p.add(csum_off).cast::<u16>().read() };
        ctx.l4_csum_replace(
            csum_off,
            old_addr.into(),
            addr.into(),
            flags | u64::from(BPF_F_PSEUDO_HDR) | 4,
        )
        .map_err(|_| Fault::Rewrite)?;
        // TCP: the field now tells whether the skb is CHECKSUM_PARTIAL, and the port needs no
        // second helper call (`lb_common::csum`). UDP keeps the helper (its zero checksum).
        if let Some(port) = port.filter(|_| port_changes && tcp) {
            if let Some(p) = ctx.direct(end) {
                // SAFETY: `direct` checked `end` bytes again; constant offset below `end`.
                let field = unsafe { p.add(csum_off).cast::<u16>() };
                // SAFETY: as above.
                let after = unsafe { field.read() };
                match csum::after_address_update(before, after, old_addr, addr) {
                    // The port is payload of a partial checksum: nothing to add.
                    Some(Summed::Partial) => return Ok(true),
                    Some(Summed::Full) => {
                        // SAFETY: as above.
                        unsafe { field.write(csum_update(after, old_port.into(), port.into(), 2)) };
                        return Ok(true);
                    }
                    None => {}
                }
            }
        }
    }
    if let Some(port) = port.filter(|_| port_changes) {
        ctx.l4_csum_replace(csum_off, old_port.into(), port.into(), flags | 2)
            .map_err(|_| Fault::Rewrite)?;
    }
    Ok(true)
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
