//! Refusing a new flow to a Service without endpoints, at once and in place: the packet itself
//! is turned into the answer (TCP RST|ACK, or ICMP port unreachable for UDP) and redirected back
//! out of the interface it came in on, i.e. into the client pod. This is kube-proxy's REJECT.
//!
//! The answer is built whole on the stack, its checksums computed in full, then the skb is
//! resized with `bpf_skb_change_tail` and overwritten with one store.

use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use lb_common::{Stat, PROTO_TCP};
use network_types::{eth::EthHdr, icmp::Icmpv4Hdr, ip::Ipv4Hdr, tcp::TcpHdr};

use crate::{
    csum::{fold, sum},
    fault::Fault,
    parse::{Packet, L3_OFF, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats::bump,
};

const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const TTL: u8 = 64;
/// Bytes of the offending datagram's L4 header quoted in an ICMP error (RFC 792).
const QUOTED_L4: usize = 8;

/// Answers `pkt` (to a frontend with no endpoints) and returns the verdict.
#[inline(always)]
pub fn refuse(ctx: &TcContext, pkt: &Packet) -> Result<i32, Fault> {
    if pkt.proto == PROTO_TCP {
        if pkt.has_tcp_flag(TCP_RST) {
            // Never answer a RST (RFC 793); like REJECT, the packet goes no further.
            bump(Stat::RefusedTcp);
            return Ok(TC_ACT_SHOT);
        }
        tcp_reset(ctx, pkt)?;
        bump(Stat::RefusedTcp);
    } else {
        port_unreachable(ctx, pkt)?;
        bump(Stat::RefusedUdp);
    }
    Ok(bounce(ctx))
}

/// IPv4 pseudo header for the TCP checksum.
#[repr(C, align(4))]
struct PseudoHdr {
    saddr: u32,
    daddr: u32,
    zero: u8,
    proto: u8,
    len: [u8; 2],
}

#[repr(C)]
struct RstFrame {
    eth: EthHdr,
    ip: Ipv4Hdr,
    tcp: TcpHdr,
}

/// Turns the TCP segment into RST|ACK from the frontend (RFC 793 reset generation: seq is the
/// segment's ack if it had one; ack covers the segment's data, SYN and FIN).
#[inline(always)]
fn tcp_reset(ctx: &TcContext, pkt: &Packet) -> Result<(), Fault> {
    let eth: EthHdr = ctx.load(0).map_err(|_| Fault::Rewrite)?;
    let tcp_in: TcpHdr = ctx.load(pkt.l4_off).map_err(|_| Fault::Rewrite)?;
    let payload = u32::from(pkt.ip_tot_len) - (pkt.ip_hlen + pkt.tcp_hlen) as u32;
    let seq = if pkt.has_tcp_flag(TCP_ACK) {
        u32::from_be_bytes(tcp_in.ack_seq)
    } else {
        0
    };
    let ack = u32::from_be_bytes(tcp_in.seq)
        .wrapping_add(payload)
        .wrapping_add(u32::from(pkt.has_tcp_flag(TCP_SYN)))
        .wrapping_add(u32::from(pkt.has_tcp_flag(TCP_FIN)));

    let mut tcp = tcp_in;
    tcp.source = tcp_in.dest;
    tcp.dest = tcp_in.source;
    tcp.seq = seq.to_be_bytes();
    tcp.ack_seq = ack.to_be_bytes();
    // Data offset 5 (no options), flags RST|ACK; bytes 12..14 of the header.
    tcp._bitfield_1 = network_types::bitfield::BitfieldU16::new([5 << 4, TCP_RST | TCP_ACK]);
    tcp.window = [0; 2];
    tcp.check = [0; 2];
    tcp.urg_ptr = [0; 2];
    let tcp_len = TcpHdr::LEN as u16;
    let pseudo = PseudoHdr {
        saddr: pkt.daddr,
        daddr: pkt.saddr,
        zero: 0,
        proto: PROTO_TCP,
        len: tcp_len.to_be_bytes(),
    };
    tcp.check = fold(sum(&tcp, sum(&pseudo, 0)));

    let frame = RstFrame {
        eth: swapped(&eth),
        ip: ip_header(
            PROTO_TCP,
            pkt.daddr,
            pkt.saddr,
            Ipv4Hdr::LEN as u16 + tcp_len,
        ),
        tcp,
    };
    replace_with(ctx, &frame)
}

/// The ICMP message: header and the quoted datagram (the checksummed part).
#[repr(C)]
struct IcmpBody {
    icmp: Icmpv4Hdr,
    quoted_ip: Ipv4Hdr,
    quoted_l4: [u8; QUOTED_L4],
}

#[repr(C)]
struct IcmpFrame {
    eth: EthHdr,
    ip: Ipv4Hdr,
    body: IcmpBody,
}

/// Turns the UDP datagram into ICMP port unreachable from the frontend, quoting the original
/// IP header and the first 8 bytes of its L4 header so the client's socket gets ECONNREFUSED.
#[inline(always)]
fn port_unreachable(ctx: &TcContext, pkt: &Packet) -> Result<(), Fault> {
    if pkt.ip_hlen != Ipv4Hdr::LEN {
        // The quote would need the options too; such datagrams are not answered.
        return Err(Fault::Unrefusable);
    }
    let eth: EthHdr = ctx.load(0).map_err(|_| Fault::Rewrite)?;
    let quoted_ip: Ipv4Hdr = ctx.load(L3_OFF).map_err(|_| Fault::Rewrite)?;
    let quoted_l4: [u8; QUOTED_L4] = ctx.load(pkt.l4_off).map_err(|_| Fault::Rewrite)?;
    let mut body = IcmpBody {
        icmp: Icmpv4Hdr {
            type_: ICMP_DEST_UNREACH,
            code: ICMP_PORT_UNREACH,
            check: [0; 2],
            data: [0; 4],
        },
        quoted_ip,
        quoted_l4,
    };
    body.icmp.check = fold(sum(&body, 0));
    let frame = IcmpFrame {
        eth: swapped(&eth),
        ip: ip_header(
            IPPROTO_ICMP,
            pkt.daddr,
            pkt.saddr,
            (Ipv4Hdr::LEN + size_of::<IcmpBody>()) as u16,
        ),
        body,
    };
    replace_with(ctx, &frame)
}

/// The Ethernet header of an answer: back to where the packet came from.
#[inline(always)]
fn swapped(eth: &EthHdr) -> EthHdr {
    EthHdr {
        dst_addr: eth.src_addr,
        src_addr: eth.dst_addr,
        ether_type: eth.ether_type,
    }
}

/// A fresh option-less IPv4 header with its checksum.
#[inline(always)]
fn ip_header(proto: u8, saddr: u32, daddr: u32, tot_len: u16) -> Ipv4Hdr {
    let mut ip = Ipv4Hdr {
        vihl: 0x45,
        tos: 0,
        tot_len: tot_len.to_be_bytes(),
        id: [0; 2],
        frags: [0; 2],
        ttl: TTL,
        proto,
        check: [0; 2],
        src_addr: saddr.to_ne_bytes(),
        dst_addr: daddr.to_ne_bytes(),
    };
    ip.check = fold(sum(&ip, 0));
    ip
}

/// Resizes the skb to exactly `frame` and overwrites it.
#[inline(always)]
fn replace_with<T>(ctx: &TcContext, frame: &T) -> Result<(), Fault> {
    // SAFETY: the skb pointer comes from the program context.
    let ret = unsafe { bpf_skb_change_tail(ctx.skb.skb, size_of::<T>() as u32, 0) };
    if ret != 0 {
        return Err(Fault::Rewrite);
    }
    ctx.store(0, frame, 0).map_err(|_| Fault::Rewrite)
}

/// Swaps the Ethernet addresses of the frame in place (it goes back where it came from).
#[inline(always)]
pub fn swap_macs(ctx: &TcContext) -> Result<(), Fault> {
    let eth: EthHdr = ctx.load(0).map_err(|_| Fault::Rewrite)?;
    ctx.store(0, &swapped(&eth), 0).map_err(|_| Fault::Rewrite)
}

/// Sends the frame back out of the interface it arrived on (towards the pod).
#[inline(always)]
pub fn bounce(ctx: &TcContext) -> i32 {
    // SAFETY: reading a field of the program context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain helper call; returns TC_ACT_REDIRECT, or TC_ACT_SHOT on bad flags.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}
