//! Bounded IPv4 + L4 parsing with `bpf_skb_load_bytes` (works on non-linear skbs and needs no
//! packet-pointer bounds proofs). Only what the datapath needs is kept in [`Packet`].

use aya_ebpf::programs::TcContext;
use lb_common::{Stat, PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{fault::PASS, stats::bump};

/// Offset of the IPv4 header (untagged Ethernet only).
pub const L3_OFF: usize = EthHdr::LEN;
/// Offsets of fields inside the IPv4 header.
pub const IP_CSUM_OFF: usize = L3_OFF + 10;
pub const IP_SRC_OFF: usize = L3_OFF + 12;
pub const IP_DST_OFF: usize = L3_OFF + 16;

/// TCP flag bits (byte 13 of the TCP header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const ETH_P_IPV4_BE: u16 = 0x0800u16.to_be();
/// More-fragments flag and fragment offset in the host-order `frags` field.
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;

/// A parsed IPv4 TCP/UDP/SCTP packet. Addresses and ports in network byte order, as in the
/// packet and in the map keys.
#[derive(Clone, Copy)]
pub struct Packet {
    /// IPv4 header length in bytes (20..=60).
    pub ip_hlen: usize,
    /// IPv4 total length (header + L4), host order.
    pub ip_tot_len: u16,
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: usize,
    pub proto: u8,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte (0 for UDP/SCTP).
    pub tcp_flags: u8,
    /// TCP header length in bytes (0 for UDP/SCTP).
    pub tcp_hlen: usize,
}

impl Packet {
    #[inline(always)]
    pub fn is_tcp(&self) -> bool {
        self.proto == PROTO_TCP
    }

    #[inline(always)]
    pub fn has_tcp_flag(&self, flag: u8) -> bool {
        self.tcp_flags & flag != 0
    }
}

/// Why a frame is not translated. [`Skip::pass`] counts it and lets it through untouched.
#[derive(Clone, Copy)]
pub enum Skip {
    /// Not IPv4 (ARP, IPv6, ...), or another L4 protocol than TCP/UDP/SCTP: not ours.
    NotOurs,
    /// Truncated or inconsistent headers.
    Malformed,
    /// An IPv4 fragment: the L4 ports are not (reliably) there.
    Fragment,
}

impl Skip {
    #[inline(always)]
    pub fn pass(self) -> i32 {
        match self {
            Skip::NotOurs => {}
            Skip::Malformed => bump(Stat::PassMalformed),
            Skip::Fragment => bump(Stat::PassFragment),
        }
        PASS
    }
}

/// Parses Ethernet + IPv4 (options allowed) + the L4 ports (and TCP flags).
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Packet, Skip> {
    let ether_type: u16 = ctx.load(12).map_err(|_| Skip::NotOurs)?;
    if ether_type != ETH_P_IPV4_BE {
        return Err(Skip::NotOurs);
    }
    let ip: Ipv4Hdr = ctx.load(L3_OFF).map_err(|_| Skip::Malformed)?;
    let ip_hlen = usize::from(ip.ihl());
    let ip_tot_len = ip.tot_len();
    if ip.version() != 4 || ip_hlen < Ipv4Hdr::LEN || usize::from(ip_tot_len) < ip_hlen {
        return Err(Skip::Malformed);
    }
    // The IP datagram must be all there (Ethernet padding after it is fine).
    if L3_OFF + usize::from(ip_tot_len) > ctx.len() as usize {
        return Err(Skip::Malformed);
    }
    let frags = u16::from_be_bytes(ip.frags);
    if frags & (IP_MF | IP_OFFSET_MASK) != 0 {
        return Err(Skip::Fragment);
    }
    let min_l4 = match ip.proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        PROTO_SCTP => 12,
        _ => return Err(Skip::NotOurs),
    };
    let l4_len = usize::from(ip_tot_len) - ip_hlen;
    if l4_len < min_l4 {
        return Err(Skip::Malformed);
    }
    let l4_off = L3_OFF + ip_hlen;
    let ports: [u16; 2] = ctx.load(l4_off).map_err(|_| Skip::Malformed)?;
    let (mut tcp_flags, mut tcp_hlen) = (0, 0);
    if ip.proto == PROTO_TCP {
        let off_flags: [u8; 2] = ctx.load(l4_off + 12).map_err(|_| Skip::Malformed)?;
        tcp_hlen = usize::from(off_flags[0] >> 4) * 4;
        if tcp_hlen < 20 || tcp_hlen > l4_len {
            return Err(Skip::Malformed);
        }
        tcp_flags = off_flags[1];
    }
    Ok(Packet {
        ip_hlen,
        ip_tot_len,
        l4_off,
        proto: ip.proto,
        saddr: u32::from_ne_bytes(ip.src_addr),
        daddr: u32::from_ne_bytes(ip.dst_addr),
        sport: ports[0],
        dport: ports[1],
        tcp_flags,
        tcp_hlen,
    })
}
