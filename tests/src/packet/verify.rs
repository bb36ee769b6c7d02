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
