//! Bounded IPv4 + L4 parsing with `bpf_skb_load_bytes` (works on non-linear skbs and needs no
//! packet-pointer bounds proofs). Only what the datapath needs is kept in [`Packet`].
//!
//! Three shapes come out of [`parse`]:
//! - a TCP/UDP/SCTP packet with its ports ([`Parsed::L4`]), also the first fragment of a
//!   fragmented datagram (its ports are recorded in `FRAGS`) and later fragments whose first
//!   fragment was seen (ports taken from `FRAGS`, `has_l4 == false`);
//! - an ICMP error quoting a TCP/UDP packet ([`Parsed::IcmpError`]), which the programs translate
//!   when the quoted packet belongs to a translated flow;
//! - anything else is a [`Skip`] and passes untouched.

use aya_ebpf::bindings::BPF_ANY;
use lb_common::{FragKey, FragValue, Stat, PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{frame::Frame, maps::FRAGS, stats::bump};

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

pub const PROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// ICMP header (type, code, checksum, rest-of-header) before the quoted datagram.
const ICMP_HLEN: usize = 8;

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
    /// TCP flags byte (0 for UDP/SCTP and for non-first fragments).
    pub tcp_flags: u8,
    /// TCP header length in bytes (0 for UDP/SCTP).
    pub tcp_hlen: usize,
    /// False for a non-first fragment: the ports came from `FRAGS`, there is no L4 header to
    /// rewrite (the first fragment's checksum update covers the whole datagram).
    pub has_l4: bool,
    /// Parsed by the direct path: IPv4 without options (L4 at [`L4_OFF_DIRECT`]), the L4 header
    /// in the linear part, so the NAT may write it with direct stores (see `nat`).
    pub direct: bool,
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

    /// A SYN with ACK: the answer to a new TCP connection.
    #[inline(always)]
    pub fn is_syn_ack(&self) -> bool {
        self.is_tcp() && self.has_tcp_flag(TCP_SYN) && self.has_tcp_flag(TCP_ACK)
    }

    /// A SYN without ACK: the first packet of a new TCP connection.
    #[inline(always)]
    pub fn is_syn_only(&self) -> bool {
        self.is_tcp() && self.has_tcp_flag(TCP_SYN) && !self.has_tcp_flag(TCP_ACK)
    }
}

/// The packet an ICMP error quotes (RFC 792: its IP header and at least 8 bytes of L4 header).
#[derive(Clone, Copy)]
pub struct Quoted {
    /// Offset of the quoted IP header from the start of the frame.
    pub ip_off: usize,
    /// Offset of the quoted L4 header.
    pub l4_off: usize,
    /// Bytes of the quoted L4 header present in the frame.
    pub l4_len: usize,
    pub proto: u8,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
}

/// What [`parse`] found.
pub enum Parsed {
    L4(Packet),
    /// An ICMP destination-unreachable / time-exceeded error (`outer.proto == PROTO_ICMP`,
    /// `outer.l4_off` is the ICMP header) quoting a TCP/UDP packet.
    IcmpError(Packet, Quoted),
}

/// Why a frame is not translated. [`Skip::pass`] counts it and lets it through untouched.
#[derive(Clone, Copy)]
pub enum Skip {
    /// Not IPv4 (ARP, IPv6, ...), or another L4 protocol than TCP/UDP/SCTP: not ours.
    NotOurs,
    /// Truncated or inconsistent headers.
    Malformed,
    /// An IPv4 fragment we cannot follow (its first fragment was not seen).
    Fragment,
}

impl Skip {
    /// Counts the skip; the packet passes untouched (`C::PASS`).
    #[inline(always)]
    pub fn pass<C: Frame>(self) -> i32 {
        match self {
            Skip::NotOurs => {}
            Skip::Malformed => bump(Stat::PassMalformed),
            Skip::Fragment => bump(Stat::PassFragment),
        }
        C::PASS
    }
}

/// Offset of the L4 header when the IPv4 header has no options (the direct path).
pub const L4_OFF_DIRECT: usize = L3_OFF + Ipv4Hdr::LEN;
/// Bytes the direct path needs linear: up to the end of the UDP header (both ports).
pub const DIRECT_UDP_LEN: usize = L4_OFF_DIRECT + 8;
/// The same up to the end of a TCP header without options (flags at 13, checksum at 16).
pub const DIRECT_TCP_LEN: usize = L4_OFF_DIRECT + 20;

/// Parses Ethernet + IPv4 (options allowed) + the L4 ports (and TCP flags), or an ICMP error.
///
/// The common shape (an unfragmented TCP/UDP packet without IP options, headers in the linear
/// part) is read with direct packet access at fixed offsets (tc; [`Frame::direct`]); anything
/// else, and XDP, goes through [`parse_slow`], which reads with the load helpers.
#[inline(always)]
pub fn parse<C: Frame>(ctx: &C) -> Result<Parsed, Skip> {
    if let Some(parsed) = parse_direct(ctx) {
        return parsed;
    }
    parse_slow(ctx)
}

/// The direct path of [`parse`]: `None` hands the packet to [`parse_slow`] (which gives the
/// same answer for every packet the direct path answers: it is only faster).
#[inline(always)]
fn parse_direct<C: Frame>(ctx: &C) -> Option<Result<Parsed, Skip>> {
    let p = ctx.direct(DIRECT_UDP_LEN)?;
    // SAFETY: `direct` checked that DIRECT_UDP_LEN bytes from `p` are in the packet; every
    // read below is at a constant offset under it. Reads are unaligned-safe per field size on
    // BPF (the verifier allows them on packet pointers).
    let (ether_type, vihl, tot_len, frags, proto, saddr, daddr, sport, dport) = unsafe {
        (
            p.add(12).cast::<u16>().read(),
            p.add(L3_OFF).read(),
            u16::from_be(p.add(L3_OFF + 2).cast::<u16>().read()),
            u16::from_be(p.add(L3_OFF + 6).cast::<u16>().read()),
            p.add(L3_OFF + 9).read(),
            p.add(IP_SRC_OFF).cast::<u32>().read(),
            p.add(IP_DST_OFF).cast::<u32>().read(),
            p.add(L4_OFF_DIRECT).cast::<u16>().read(),
            p.add(L4_OFF_DIRECT + 2).cast::<u16>().read(),
        )
    };
    if ether_type != ETH_P_IPV4_BE {
        return Some(Err(Skip::NotOurs));
    }
    // IPv4 without options, not a fragment, TCP or UDP: everything else takes the slow path.
    if vihl != 0x45 || frags & (IP_MF | IP_OFFSET_MASK) != 0 {
        return None;
    }
    let min_l4 = match proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        PROTO_SCTP | PROTO_ICMP => return None,
        _ => return Some(Err(Skip::NotOurs)),
    };
    let tot = usize::from(tot_len);
    if tot < Ipv4Hdr::LEN + min_l4 || L3_OFF + tot > ctx.len() {
        return None;
    }
    let mut pkt = Packet {
        ip_hlen: Ipv4Hdr::LEN,
        ip_tot_len: tot_len,
        l4_off: L4_OFF_DIRECT,
        proto,
        saddr,
        daddr,
        sport,
        dport,
        tcp_flags: 0,
        tcp_hlen: 0,
        has_l4: true,
        direct: true,
    };
    if proto == PROTO_TCP {
        let p = ctx.direct(DIRECT_TCP_LEN)?;
        // SAFETY: as above, for DIRECT_TCP_LEN bytes.
        let (off, flags) = unsafe {
            (
                p.add(L4_OFF_DIRECT + 12).read(),
                p.add(L4_OFF_DIRECT + 13).read(),
            )
        };
        pkt.tcp_hlen = usize::from(off >> 4) * 4;
        if pkt.tcp_hlen < 20 || pkt.tcp_hlen > tot - Ipv4Hdr::LEN {
            return None;
        }
        pkt.tcp_flags = flags;
    }
    Some(Ok(Parsed::L4(pkt)))
}

/// [`parse`] with the load helpers: IP options, fragments, ICMP errors, SCTP, XDP.
#[inline(always)]
fn parse_slow<C: Frame>(ctx: &C) -> Result<Parsed, Skip> {
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
    if L3_OFF + usize::from(ip_tot_len) > ctx.len() {
        return Err(Skip::Malformed);
    }
    let l4_off = L3_OFF + ip_hlen;
    let l4_len = usize::from(ip_tot_len) - ip_hlen;
    let mut pkt = Packet {
        ip_hlen,
        ip_tot_len,
        l4_off,
        proto: ip.proto,
        saddr: u32::from_ne_bytes(ip.src_addr),
        daddr: u32::from_ne_bytes(ip.dst_addr),
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        tcp_hlen: 0,
        has_l4: true,
        direct: false,
    };
    let frags = u16::from_be_bytes(ip.frags);
    let min_l4 = match ip.proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        PROTO_SCTP => 12,
        PROTO_ICMP if frags & (IP_MF | IP_OFFSET_MASK) == 0 => {
            return icmp_error(ctx, pkt, l4_len);
        }
        PROTO_ICMP => return Err(Skip::Fragment),
        _ => return Err(Skip::NotOurs),
    };
    // Built only for fragments: unfragmented packets (nearly all) never touch FRAGS.
    let frag_key = || FragKey {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        id: u16::from_ne_bytes(ip.id),
        proto: ip.proto,
        _pad: 0,
    };
    if frags & IP_OFFSET_MASK != 0 {
        // A later fragment: no L4 header. Follow the first fragment if it was seen.
        // SAFETY: copied out at once.
        let ports = unsafe { FRAGS.get(&frag_key()) }.copied().ok_or(Skip::Fragment)?;
        pkt.sport = ports.sport;
        pkt.dport = ports.dport;
        pkt.has_l4 = false;
        return Ok(Parsed::L4(pkt));
    }
    if l4_len < min_l4 {
        return Err(Skip::Malformed);
    }
    let ports: [u16; 2] = ctx.load(l4_off).map_err(|_| Skip::Malformed)?;
    pkt.sport = ports[0];
    pkt.dport = ports[1];
    if ip.proto == PROTO_TCP {
        let off_flags: [u8; 2] = ctx.load(l4_off + 12).map_err(|_| Skip::Malformed)?;
        pkt.tcp_hlen = usize::from(off_flags[0] >> 4) * 4;
        if pkt.tcp_hlen < 20 || pkt.tcp_hlen > l4_len {
            return Err(Skip::Malformed);
        }
        pkt.tcp_flags = off_flags[1];
    }
    if frags & IP_MF != 0 {
        // The first fragment: remember its ports for the fragments that follow. Losing the
        // record (LRU eviction) only means those fragments pass untranslated, as before.
        let ports = FragValue {
            sport: pkt.sport,
            dport: pkt.dport,
        };
        if !crate::trace::dry_run() {
            let _ = FRAGS.insert(&frag_key(), &ports, BPF_ANY.into());
        }
    }
    Ok(Parsed::L4(pkt))
}

/// An ICMP error quoting a TCP/UDP packet; other ICMP (echo, ...) is not ours.
#[inline(always)]
fn icmp_error<C: Frame>(ctx: &C, outer: Packet, l4_len: usize) -> Result<Parsed, Skip> {
    let type_code: [u8; 2] = ctx.load(outer.l4_off).map_err(|_| Skip::NotOurs)?;
    if type_code[0] != ICMP_DEST_UNREACH && type_code[0] != ICMP_TIME_EXCEEDED {
        return Err(Skip::NotOurs);
    }
    // The quoted IP header (without options, as every stack sends its own packets) and the
    // first 8 bytes of its L4 header, which hold both ports (and the UDP checksum).
    if l4_len < ICMP_HLEN + Ipv4Hdr::LEN + 8 {
        return Err(Skip::Malformed);
    }
    let ip_off = outer.l4_off + ICMP_HLEN;
    let inner: Ipv4Hdr = ctx.load(ip_off).map_err(|_| Skip::Malformed)?;
    if inner.version() != 4 || usize::from(inner.ihl()) != Ipv4Hdr::LEN {
        return Err(Skip::Malformed);
    }
    if inner.proto != PROTO_TCP && inner.proto != PROTO_UDP {
        return Err(Skip::NotOurs);
    }
    let l4_off = ip_off + Ipv4Hdr::LEN;
    let ports: [u16; 2] = ctx.load(l4_off).map_err(|_| Skip::Malformed)?;
    Ok(Parsed::IcmpError(
        outer,
        Quoted {
            ip_off,
            l4_off,
            l4_len: l4_len - ICMP_HLEN - Ipv4Hdr::LEN,
            proto: inner.proto,
            saddr: u32::from_ne_bytes(inner.src_addr),
            daddr: u32::from_ne_bytes(inner.dst_addr),
            sport: ports[0],
            dport: ports[1],
        },
    ))
}
