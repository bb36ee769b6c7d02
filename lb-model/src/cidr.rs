//! IPv4 CIDRs as `(network address, prefix length)`, and the parsing of the flags and fields that
//! hold them (`--nodeport-addresses`, `spec.loadBalancerSourceRanges`, `--nodeport-range`).
//!
//! A plain tuple rather than a type of its own: it is what [`crate::Config`] carries, it orders
//! and compares as the maps need, and it needs no conversion at the agent's flag parser.

use std::net::{IpAddr, Ipv4Addr};

/// An IPv4 CIDR: network address and prefix length (0..=32).
pub type Cidr = (Ipv4Addr, u8);

/// What a CIDR string is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    V4(Cidr),
    /// A valid IPv6 CIDR: not ours to program (IPv4 datapath), not an error either (dual-stack
    /// Services list both families).
    V6,
}

/// Parse `"a.b.c.d/n"` (or an IPv6 CIDR) as Go's `net.ParseCIDR` does, after trimming
/// whitespace (kube-proxy trims too). Host bits are allowed and cleared ("10.1.2.3/8" is
/// 10.0.0.0/8). A bare address without a prefix length is an error, as for kube-proxy.
pub fn parse(s: &str) -> Result<Parsed, String> {
    let s = s.trim();
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not a CIDR (no /prefix length)"))?;
    let len: u8 = len
        .parse()
        .map_err(|_| format!("{s:?} is not a CIDR (bad prefix length)"))?;
    match addr.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) if len <= 32 => Ok(Parsed::V4(normalize((a, len)))),
        Ok(IpAddr::V6(_)) if len <= 128 => Ok(Parsed::V6),
        Ok(_) => Err(format!("{s:?} is not a CIDR (prefix length too long)")),
        Err(_) => Err(format!("{s:?} is not a CIDR (bad address)")),
    }
}

/// Parse an IPv4 CIDR; an IPv6 one is an error here (for flags of the IPv4 agent).
pub fn parse_v4(s: &str) -> Result<Cidr, String> {
    match parse(s)? {
        Parsed::V4(c) => Ok(c),
        Parsed::V6 => Err(format!("{:?} is not an IPv4 CIDR", s.trim())),
    }
}

/// The network mask of a prefix length (clamped to 32).
pub const fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else if len >= 32 {
        u32::MAX
    } else {
        u32::MAX << (32 - len)
    }
}

/// The range with its host bits cleared and the length clamped to 32: one range, one
/// representation (in the model and as an LPM trie key).
pub fn normalize((addr, len): Cidr) -> Cidr {
    let len = len.min(32);
    (Ipv4Addr::from(u32::from(addr) & mask(len)), len)
}

/// Whether `ip` lies in `cidr`.
pub fn contains((net, len): Cidr, ip: Ipv4Addr) -> bool {
    u32::from(ip) & mask(len) == u32::from(net) & mask(len)
}

/// Parse a port range `"min-max"` (both inclusive, 1..=65535, min <= max), as
/// `--service-node-port-range` is written. A single port `"n"` is the range n-n.
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let s = s.trim();
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{s:?} is not a port range (min-max, 1-65535)"))
    };
    let (min, max) = (port(a)?, port(b)?);
    if min > max {
        return Err(format!("{s:?} is not a port range (min > max)"));
    }
    Ok((min, max))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_v4_and_v6_and_clears_host_bits() {
        assert_eq!(parse("10.0.0.0/8"), Ok(Parsed::V4((ip("10.0.0.0"), 8))));
        assert_eq!(parse(" 10.1.2.3/8 "), Ok(Parsed::V4((ip("10.0.0.0"), 8))));
        assert_eq!(parse("0.0.0.0/0"), Ok(Parsed::V4((ip("0.0.0.0"), 0))));
        assert_eq!(parse("192.0.2.7/32"), Ok(Parsed::V4((ip("192.0.2.7"), 32))));
        assert_eq!(parse("fd00::/8"), Ok(Parsed::V6));
        for bad in [
            "10.0.0.1",
            "10.0.0.0/33",
            "10.0.0.0/",
            "foo/8",
            "",
            "/8",
            "fd00::/129",
            "10.0.0.0/-1",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_v4("10.0.0.0/8"), Ok((ip("10.0.0.0"), 8)));
        assert!(parse_v4("fd00::/8").is_err());
    }

    #[test]
    fn contains_matches_the_prefix_only() {
        assert!(contains((ip("10.0.0.0"), 8), ip("10.255.1.2")));
        assert!(!contains((ip("10.0.0.0"), 8), ip("11.0.0.1")));
        assert!(contains((ip("0.0.0.0"), 0), ip("203.0.113.1")));
        assert!(contains((ip("192.0.2.7"), 32), ip("192.0.2.7")));
        assert!(!contains((ip("192.0.2.7"), 32), ip("192.0.2.8")));
        // Host bits of the range do not matter.
        assert!(contains((ip("10.9.9.9"), 8), ip("10.0.0.1")));
        assert_eq!(normalize((ip("10.9.9.9"), 40)), (ip("10.9.9.9"), 32));
        assert_eq!(mask(0), 0);
        assert_eq!(mask(24), 0xffff_ff00);
    }

    #[test]
    fn port_ranges() {
        assert_eq!(parse_port_range("30000-32767"), Ok((30000, 32767)));
        assert_eq!(parse_port_range(" 80 - 81 "), Ok((80, 81)));
        assert_eq!(parse_port_range("8080"), Ok((8080, 8080)));
        for bad in ["", "0-10", "10-5", "1-65536", "a-b", "1-2-3"] {
            assert!(parse_port_range(bad).is_err(), "{bad:?}");
        }
    }
}
