//! Decodes frames produced by the datapath and recomputes their checksums with etherparse,
//! so a checksum bug in xlb cannot hide behind a matching bug in the test.

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use etherparse::{
    Ethernet2Header, Icmpv4Header, Ipv4Header, NetHeaders, PacketHeaders, TcpHeader,
    TransportHeader, UdpHeader,
};

/// The L4 part of a decoded IPv4 frame.
#[derive(Clone, Debug)]
pub enum L4 {
    Tcp(TcpHeader),
    Udp(UdpHeader),
    Icmp(Icmpv4Header),
}

/// An Ethernet + IPv4 frame, decoded.
#[derive(Clone, Debug)]
pub struct Decoded {
    pub eth: Ethernet2Header,
    pub ip: Ipv4Header,
    pub l4: L4,
    /// Bytes after the L4 header (for ICMP errors: the quoted datagram).
    pub payload: Vec<u8>,
}

impl Decoded {
    pub fn tcp(&self) -> Result<&TcpHeader> {
        match &self.l4 {
            L4::Tcp(tcp) => Ok(tcp),
            other => bail!("expected TCP, got {other:?}"),
        }
    }
    pub fn udp(&self) -> Result<&UdpHeader> {
        match &self.l4 {
            L4::Udp(udp) => Ok(udp),
            other => bail!("expected UDP, got {other:?}"),
        }
    }
    pub fn icmp(&self) -> Result<&Icmpv4Header> {
        match &self.l4 {
            L4::Icmp(icmp) => Ok(icmp),
            other => bail!("expected ICMP, got {other:?}"),
        }
    }
}

/// Decodes an Ethernet/IPv4/{TCP,UDP,ICMP} frame.
pub fn decode(frame: &[u8]) -> Result<Decoded> {
    let headers =
        PacketHeaders::from_ethernet_slice(frame).map_err(|e| anyhow!("decoding frame: {e}"))?;
    let eth = headers
        .link
        .and_then(|l| l.ethernet2())
        .context("no Ethernet II header")?;
    let ip = match headers.net {
        Some(NetHeaders::Ipv4(ip, _)) => ip,
        other => bail!("expected IPv4, got {other:?}"),
    };
    let l4 = match headers.transport {
        Some(TransportHeader::Tcp(tcp)) => L4::Tcp(tcp),
        Some(TransportHeader::Udp(udp)) => L4::Udp(udp),
        Some(TransportHeader::Icmpv4(icmp)) => L4::Icmp(icmp),
        other => bail!("expected TCP, UDP or ICMPv4, got {other:?}"),
    };
    let payload = headers.payload.slice().to_vec();
    Ok(Decoded {
        eth,
        ip,
        l4,
        payload,
    })
}

/// Decodes `frame` and checks its IPv4 header checksum and its TCP/UDP/ICMP checksum against
/// etherparse's own computation. A zero UDP checksum ("none") is accepted.
pub fn decode_checked(frame: &[u8]) -> Result<Decoded> {
    let d = decode(frame)?;
    let ip_sum = d.ip.calc_header_checksum();
    ensure!(
        d.ip.header_checksum == ip_sum,
        "IPv4 header checksum {:#06x}, expected {ip_sum:#06x}",
        d.ip.header_checksum
    );
    match &d.l4 {
        L4::Tcp(tcp) => {
            let sum = tcp.calc_checksum_ipv4(&d.ip, &d.payload)?;
            ensure!(
                tcp.checksum == sum,
                "TCP checksum {:#06x}, expected {sum:#06x}",
                tcp.checksum
            );
        }
        L4::Udp(udp) if udp.checksum == 0 => {}
        L4::Udp(udp) => {
            let sum = udp.calc_checksum_ipv4(&d.ip, &d.payload)?;
            ensure!(
                udp.checksum == sum,
                "UDP checksum {:#06x}, expected {sum:#06x}",
                udp.checksum
            );
        }
        L4::Icmp(icmp) => {
            let sum = icmp.icmp_type.calc_checksum(&d.payload);
            ensure!(
                icmp.checksum == sum,
                "ICMP checksum {:#06x}, expected {sum:#06x}",
                icmp.checksum
            );
        }
    }
    Ok(d)
}

/// RFC 1071 one's complement sum of `data` (odd length padded with a zero byte) added to `sum`,
/// not folded.
fn ones_sum(data: &[u8], mut sum: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Whether `data` (checksum field included) sums to 0xffff, i.e. its checksum is right.
fn sums_ok(data: &[u8], pseudo: u64) -> bool {
    fold(ones_sum(data, pseudo)) == 0xffff
}

/// The TCP/UDP pseudo-header sum.
fn pseudo_sum(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u64 {
    let mut sum = ones_sum(src, 0);
    sum = ones_sum(dst, sum);
    sum + u64::from(proto) + len as u64
}

/// Whether the TCP (6) or UDP (17) segment `l4` from `src` to `dst` has a right checksum
/// (a zero UDP checksum, "none", counts as right).
pub fn l4_checksum_ok(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> bool {
    if proto == 17 && l4.len() >= 8 && l4[6..8] == [0, 0] {
        return true;
    }
    sums_ok(l4, pseudo_sum(&src, &dst, proto, l4.len()))
}

/// What [`verify_checksums`] could check besides the outer IP header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Checked {
    /// The TCP/UDP/ICMP checksum of the packet (not for a fragment).
    pub l4: bool,
    /// ICMP error: the quoted IP header's checksum.
    pub inner_ip: bool,
    /// ICMP error: the quoted TCP/UDP checksum (only when the whole inner datagram is quoted).
    pub inner_l4: bool,
}

/// Recomputes every checksum of an Ethernet/IPv4 frame from raw bytes with RFC 1071 sums, sharing
/// no code with xlb nor with etherparse: the IPv4 header; TCP/UDP with the pseudo header; ICMP
/// over the whole message; for an ICMP error, the quoted IPv4 header and, when the quote holds
/// the whole inner datagram, its TCP/UDP checksum. Fails on the first wrong one.
pub fn verify_checksums(frame: &[u8]) -> Result<Checked> {
    ensure!(frame.len() >= 34, "frame of {} bytes", frame.len());
    ensure!(frame[12..14] == [0x08, 0x00], "not IPv4");
    let ip = &frame[14..];
    let (hdr_len, total) = ipv4_lengths(ip)?;
    ensure!(
        ip.len() >= total,
        "IPv4 total length {total} > {} bytes",
        ip.len()
    );
    ensure!(sums_ok(&ip[..hdr_len], 0), "IPv4 header checksum wrong");
    let mut checked = Checked::default();
    if is_fragment(ip) {
        return Ok(checked);
    }
    let (src, dst, proto) = addrs(ip);
    let l4 = &ip[hdr_len..total];
    match proto {
        6 | 17 => {
            ensure!(
                l4_checksum_ok(src, dst, proto, l4),
                "{} checksum wrong",
                if proto == 6 { "TCP" } else { "UDP" }
            );
            checked.l4 = true;
        }
        1 => {
            ensure!(l4.len() >= 8, "ICMP message of {} bytes", l4.len());
            ensure!(sums_ok(l4, 0), "ICMP checksum wrong");
            checked.l4 = true;
            if matches!(l4[0], 3 | 11 | 12) {
                let inner = &l4[8..];
                let (inner_hdr, inner_total) = ipv4_lengths(inner).context("quoted IPv4 header")?;
                ensure!(inner.len() >= inner_hdr, "quoted IPv4 header cut");
                ensure!(
                    sums_ok(&inner[..inner_hdr], 0),
                    "quoted IPv4 header checksum wrong"
                );
                checked.inner_ip = true;
                let (isrc, idst, iproto) = addrs(inner);
                if matches!(iproto, 6 | 17) && inner.len() >= inner_total && !is_fragment(inner) {
                    ensure!(
                        l4_checksum_ok(isrc, idst, iproto, &inner[inner_hdr..inner_total]),
                        "quoted {} checksum wrong",
                        if iproto == 6 { "TCP" } else { "UDP" }
                    );
                    checked.inner_l4 = true;
                }
            }
        }
        _ => {}
    }
    Ok(checked)
}

/// (header length, total length) of an IPv4 header.
fn ipv4_lengths(ip: &[u8]) -> Result<(usize, usize)> {
    ensure!(ip.len() >= 20, "IPv4 header cut at {} bytes", ip.len());
    ensure!(ip[0] >> 4 == 4, "IP version {}", ip[0] >> 4);
    let hdr_len = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    ensure!(
        hdr_len >= 20 && total >= hdr_len,
        "IPv4 lengths {hdr_len}/{total}"
    );
    Ok((hdr_len, total))
}

fn is_fragment(ip: &[u8]) -> bool {
    u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0
}

fn addrs(ip: &[u8]) -> ([u8; 4], [u8; 4], u8) {
    let src = [ip[12], ip[13], ip[14], ip[15]];
    let dst = [ip[16], ip[17], ip[18], ip[19]];
    (src, dst, ip[9])
}
