//! Test frames, built with etherparse (checksums computed by etherparse, not by xlb).

use std::net::{Ipv4Addr, SocketAddrV4};

use etherparse::{
    icmpv4::{DestUnreachableHeader, TimeExceededCode},
    Icmpv4Type, IpHeaders, IpNumber, Ipv4Header, Ipv4Options, PacketBuilder, TcpHeader,
};

/// MAC of the client pod and of the host side of its veth.
pub const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

/// TCP flags of a test segment.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
    pub psh: bool,
}

impl TcpFlags {
    pub const SYN: TcpFlags = TcpFlags {
        syn: true,
        ack: false,
        fin: false,
        rst: false,
        psh: false,
    };
    pub const SYN_ACK: TcpFlags = TcpFlags {
        syn: true,
        ack: true,
        fin: false,
        rst: false,
        psh: false,
    };
    pub const ACK: TcpFlags = TcpFlags {
        syn: false,
        ack: true,
        fin: false,
        rst: false,
        psh: false,
    };
    pub const PSH_ACK: TcpFlags = TcpFlags {
        syn: false,
        ack: true,
        fin: false,
        rst: false,
        psh: true,
    };
    pub const RST: TcpFlags = TcpFlags {
        syn: false,
        ack: false,
        fin: false,
        rst: true,
        psh: false,
    };
    pub const FIN_ACK: TcpFlags = TcpFlags {
        syn: false,
        ack: true,
        fin: true,
        rst: false,
        psh: false,
    };
}

/// A TCP segment from `src` to `dst` (Ethernet from `src_mac` to `dst_mac`).
#[derive(Clone, Debug)]
pub struct Tcp {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub seq: u32,
    pub ack: u32,
    pub flags: TcpFlags,
    pub payload: Vec<u8>,
    /// IPv4 options (a multiple of 4 bytes, at most 40).
    pub ip_options: Vec<u8>,
    pub macs: ([u8; 6], [u8; 6]),
}

impl Tcp {
    /// A segment leaving the client pod.
    pub fn new(src: SocketAddrV4, dst: SocketAddrV4, flags: TcpFlags) -> Self {
        Tcp {
            src,
            dst,
            seq: 1_000,
            ack: 0,
            flags,
            payload: Vec::new(),
            ip_options: Vec::new(),
            macs: (POD_MAC, HOST_MAC),
        }
    }

    pub fn frame(&self) -> Vec<u8> {
        let mut tcp = TcpHeader::new(self.src.port(), self.dst.port(), self.seq, 64_240);
        tcp.acknowledgment_number = self.ack;
        tcp.syn = self.flags.syn;
        tcp.ack = self.flags.ack;
        tcp.fin = self.flags.fin;
        tcp.rst = self.flags.rst;
        tcp.psh = self.flags.psh;
        let ip = ipv4(
            *self.src.ip(),
            *self.dst.ip(),
            IpNumber::TCP,
            &self.ip_options,
        );
        let builder = PacketBuilder::ethernet2(self.macs.0, self.macs.1)
            .ip(IpHeaders::Ipv4(ip, Default::default()))
            .tcp_header(tcp);
        let mut out = Vec::with_capacity(builder.size(self.payload.len()));
        builder
            .write(&mut out, &self.payload)
            .expect("etherparse writes the frame");
        out
    }
}

/// A UDP datagram from `src` to `dst`.
#[derive(Clone, Debug)]
pub struct Udp {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub payload: Vec<u8>,
    /// IPv4 options (a multiple of 4 bytes, at most 40).
    pub ip_options: Vec<u8>,
    pub macs: ([u8; 6], [u8; 6]),
}

impl Udp {
    pub fn new(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Self {
        Udp {
            src,
            dst,
            payload: payload.to_vec(),
            ip_options: Vec::new(),
            macs: (POD_MAC, HOST_MAC),
        }
    }

    pub fn frame(&self) -> Vec<u8> {
        let ip = ipv4(
            *self.src.ip(),
            *self.dst.ip(),
            IpNumber::UDP,
            &self.ip_options,
        );
        let builder = PacketBuilder::ethernet2(self.macs.0, self.macs.1)
            .ip(IpHeaders::Ipv4(ip, Default::default()))
            .udp(self.src.port(), self.dst.port());
        let mut out = Vec::with_capacity(builder.size(self.payload.len()));
        builder
            .write(&mut out, &self.payload)
            .expect("etherparse writes the frame");
        out
    }

    /// The frame with the UDP checksum field zeroed ("no checksum", legal for IPv4).
    pub fn frame_without_checksum(&self) -> Vec<u8> {
        let mut frame = self.frame();
        let csum = 14 + 20 + self.ip_options.len() + 6;
        frame[csum..csum + 2].fill(0);
        frame
    }
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: IpNumber, options: &[u8]) -> Ipv4Header {
    let mut ip =
        Ipv4Header::new(0, 64, proto, src.octets(), dst.octets()).expect("valid IPv4 header");
    ip.identification = 0x1234;
    ip.dont_fragment = true;
    ip.options =
        Ipv4Options::try_from(options).expect("IPv4 options: multiple of 4, at most 40 bytes");
    ip
}

/// An ARP request from the pod for the gateway.
pub fn arp_request() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&POD_MAC);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&POD_MAC);
    f.extend_from_slice(&[10, 244, 0, 5]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[169, 254, 1, 1]);
    f
}

/// An IPv6 UDP datagram (not handled by xlb yet: must pass untouched).
pub fn ipv6_udp() -> Vec<u8> {
    let src = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
    let dst = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
    let builder = PacketBuilder::ethernet2(POD_MAC, HOST_MAC)
        .ipv6(src, dst, 64)
        .udp(40_000, 53);
    let mut out = Vec::new();
    builder
        .write(&mut out, b"query")
        .expect("etherparse writes the frame");
    out
}

/// `frame` with the IPv4 fragmentation fields set (`more_fragments`, offset in 8-byte units),
/// and its IP header checksum recomputed.
pub fn as_fragment(frame: &[u8], more_fragments: bool, offset_units: u16) -> Vec<u8> {
    let mut out = frame.to_vec();
    let (mut ip, _) = Ipv4Header::from_slice(&out[14..]).expect("an IPv4 frame");
    ip.more_fragments = more_fragments;
    ip.dont_fragment = false;
    ip.fragment_offset = offset_units.try_into().expect("13-bit offset");
    ip.header_checksum = ip.calc_header_checksum();
    let hdr = ip.to_bytes();
    out[14..14 + hdr.len()].copy_from_slice(&hdr);
    out
}

/// The IPv4 packet inside an Ethernet frame (what an ICMP error quotes).
pub fn ip_packet(frame: &[u8]) -> Vec<u8> {
    frame[14..].to_vec()
}

/// Which ICMP error an [`IcmpError`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpErrorKind {
    /// Destination unreachable, port unreachable (type 3 code 3).
    PortUnreachable,
    /// Destination unreachable, fragmentation needed (type 3 code 4) with the next-hop MTU.
    FragNeeded { mtu: u16 },
    /// Time exceeded in transit (type 11 code 0).
    TimeExceeded,
}

impl IcmpErrorKind {
    fn icmp_type(self) -> Icmpv4Type {
        match self {
            IcmpErrorKind::PortUnreachable => {
                Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port)
            }
            IcmpErrorKind::FragNeeded { mtu } => {
                Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: mtu,
                })
            }
            IcmpErrorKind::TimeExceeded => {
                Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit)
            }
        }
    }
}

/// An ICMP error from `src` to `dst` quoting `quote` (an IPv4 packet, whole or cut, as
/// [`ip_packet`] returns it).
#[derive(Clone, Debug)]
pub struct IcmpError {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub kind: IcmpErrorKind,
    pub quote: Vec<u8>,
    pub macs: ([u8; 6], [u8; 6]),
}

impl IcmpError {
    /// An error going into the client pod (Ethernet from the host side).
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, kind: IcmpErrorKind, quote: &[u8]) -> Self {
        IcmpError {
            src,
            dst,
            kind,
            quote: quote.to_vec(),
            macs: (HOST_MAC, POD_MAC),
        }
    }

    pub fn frame(&self) -> Vec<u8> {
        let mut ip = ipv4(self.src, self.dst, IpNumber::ICMP, &[]);
        ip.dont_fragment = false;
        let builder = PacketBuilder::ethernet2(self.macs.0, self.macs.1)
            .ip(IpHeaders::Ipv4(ip, Default::default()))
            .icmpv4(self.kind.icmp_type());
        let mut out = Vec::with_capacity(builder.size(self.quote.len()));
        builder
            .write(&mut out, &self.quote)
            .expect("etherparse writes the frame");
        out
    }
}

/// A fragment of the (unfragmented, option-less) IPv4 frame `frame`: the bytes `range` of its IP
/// payload (the start a multiple of 8), with `more_fragments`, the offset, the total length and
/// the header checksum set. The first fragment (`range.start == 0`) carries the L4 header; the
/// L4 checksum stays the one of the whole datagram.
pub fn fragment(frame: &[u8], range: std::ops::Range<usize>, more_fragments: bool) -> Vec<u8> {
    assert!(
        range.start.is_multiple_of(8),
        "fragment offsets are multiples of 8"
    );
    let (mut ip, payload) = Ipv4Header::from_slice(&frame[14..]).expect("an IPv4 frame");
    let payload = &payload[..usize::from(ip.total_len) - ip.header_len()];
    let part = &payload[range.clone()];
    ip.dont_fragment = false;
    ip.more_fragments = more_fragments;
    ip.fragment_offset = u16::try_from(range.start / 8)
        .expect("offset")
        .try_into()
        .expect("13-bit offset");
    ip.set_payload_len(part.len()).expect("payload length");
    ip.header_checksum = ip.calc_header_checksum();
    let mut out = frame[..14].to_vec();
    out.extend_from_slice(&ip.to_bytes());
    out.extend_from_slice(part);
    out
}

/// `frame` with another IP identification (and its header checksum recomputed).
pub fn with_ip_id(frame: &[u8], id: u16) -> Vec<u8> {
    let mut out = frame.to_vec();
    let (mut ip, _) = Ipv4Header::from_slice(&out[14..]).expect("an IPv4 frame");
    ip.identification = id;
    ip.header_checksum = ip.calc_header_checksum();
    let hdr = ip.to_bytes();
    out[14..14 + hdr.len()].copy_from_slice(&hdr);
    out
}
