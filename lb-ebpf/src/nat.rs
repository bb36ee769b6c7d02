//! Address/port rewrites with incremental checksum updates.
//!
//! `bpf_l4_csum_replace` with `BPF_F_PSEUDO_HDR` handles the pseudo-header part of an address
//! change (and CHECKSUM_PARTIAL skbs from local pods correctly); ports are plain L4 data.
//! UDP uses `BPF_F_MARK_MANGLED_0`: a zero checksum means "none" and stays zero, and a computed
//! zero is written as 0xffff.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};

use crate::{
    fault::Fault,
    parse::{Packet, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF},
};

/// Rewrites the destination to `addr:port` (client -> frontend becomes client -> backend).
#[inline(always)]
pub fn dnat(ctx: &TcContext, pkt: &Packet, addr: u32, port: u16) -> Result<(), Fault> {
    let l4 = L4::of(pkt);
    rewrite(
        ctx,
        &l4,
        IP_DST_OFF,
        pkt.daddr,
        addr,
        pkt.l4_off + 2,
        pkt.dport,
        port,
    )
}

/// Rewrites the source to `addr:port` (backend -> client becomes frontend -> client).
#[inline(always)]
pub fn snat(ctx: &TcContext, pkt: &Packet, addr: u32, port: u16) -> Result<(), Fault> {
    let l4 = L4::of(pkt);
    rewrite(
        ctx, &l4, IP_SRC_OFF, pkt.saddr, addr, pkt.l4_off, pkt.sport, port,
    )
}

/// Where the L4 checksum is and how the kernel must treat it.
struct L4 {
    csum_off: usize,
    flags: u64,
}

impl L4 {
    #[inline(always)]
    fn of(pkt: &Packet) -> Self {
        if pkt.is_tcp() {
            L4 {
                csum_off: pkt.l4_off + 16,
                flags: 0,
            }
        } else {
            L4 {
                csum_off: pkt.l4_off + 6,
                flags: u64::from(BPF_F_MARK_MANGLED_0),
            }
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rewrite(
    ctx: &TcContext,
    l4: &L4,
    addr_off: usize,
    old_addr: u32,
    new_addr: u32,
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), Fault> {
    let pseudo = u64::from(BPF_F_PSEUDO_HDR);
    ctx.l4_csum_replace(
        l4.csum_off,
        old_addr.into(),
        new_addr.into(),
        l4.flags | pseudo | 4,
    )
    .map_err(|_| Fault::Rewrite)?;
    ctx.l4_csum_replace(l4.csum_off, old_port.into(), new_port.into(), l4.flags | 2)
        .map_err(|_| Fault::Rewrite)?;
    ctx.l3_csum_replace(IP_CSUM_OFF, old_addr.into(), new_addr.into(), 4)
        .map_err(|_| Fault::Rewrite)?;
    ctx.store(addr_off, &new_addr, 0)
        .map_err(|_| Fault::Rewrite)?;
    ctx.store(port_off, &new_port, 0)
        .map_err(|_| Fault::Rewrite)?;
    Ok(())
}
