//! The node's network interfaces as the agent sees them: names, indexes, IPv4 addresses and the
//! device of the IPv4 default route; which of them are external devices (`--devices`), and the
//! flags that describe them (`--devices`, `--xdp-mode`).
//!
//! Everything is read from the agent's own network namespace, once per agent tick: one
//! `getifaddrs(3)` (links with their indexes, and addresses) and one read of `/proc/net/route`
//! (the kernel's main routing table, IPv4). `/proc/net/route` is used instead of a netlink crate:
//! it is the same table, costs no dependency, and its format has not changed since Linux 2.2.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::Ipv4Addr;

/// One interface of the node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    /// IPv4 addresses, in the kernel's order (the primary address of each subnet first).
    pub addrs: Vec<Ipv4Addr>,
}

/// The node's interfaces, by ifindex, and the device of its IPv4 default route.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interfaces {
    pub links: BTreeMap<u32, Interface>,
    /// The device of the IPv4 default route with the lowest metric (main table), if any.
    pub default_route: Option<String>,
}

impl Interfaces {
    /// The interfaces of the calling thread's network namespace, now.
    pub fn scan() -> io::Result<Self> {
        let mut links: BTreeMap<u32, Interface> = BTreeMap::new();
        let mut addrs: Vec<(String, Ipv4Addr)> = Vec::new();
        for ifa in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
            let Some(addr) = ifa.address else { continue };
            if let Some(ll) = addr.as_link_addr() {
                // One AF_PACKET entry per link (up or down), with its index.
                let entry = links.entry(ll.ifindex() as u32).or_default();
                entry.name = ifa.interface_name;
            } else if let Some(sin) = addr.as_sockaddr_in() {
                // IPv4 entries carry the address label ("eth0" or "eth0:1"); the kernel requires a
                // label to start with the device's name, and device names cannot contain ':'.
                let dev = ifa.interface_name.split(':').next().unwrap_or_default().to_string();
                addrs.push((dev, sin.ip()));
            }
        }
        let by_name: BTreeMap<String, u32> = links.iter().map(|(i, l)| (l.name.clone(), *i)).collect();
        for (dev, addr) in addrs {
            if let Some(l) = by_name.get(&dev).and_then(|i| links.get_mut(i)) {
                if !l.addrs.contains(&addr) {
                    l.addrs.push(addr);
                }
            }
        }
        let default_route = match std::fs::read_to_string("/proc/net/route") {
            Ok(text) => parse_default_route(&text),
            // No IPv4 at all (or no procfs): no default route.
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok(Interfaces { links, default_route })
    }

    /// ifindex -> name of every interface.
    pub fn names(&self) -> BTreeMap<u32, String> {
        self.links.iter().map(|(i, l)| (*i, l.name.clone())).collect()
    }

    /// The ifindex of the interface called `name`.
    pub fn index_of(&self, name: &str) -> Option<u32> {
        self.links.iter().find(|(_, l)| l.name == name).map(|(i, _)| *i)
    }
}

/// The device of the IPv4 default route in `/proc/net/route` text: destination 0.0.0.0/0, route
/// up (RTF_UP), lowest metric first (the kernel prefers it too). The file lists the main table
/// only, which is where a node's default route lives.
pub fn parse_default_route(text: &str) -> Option<String> {
    const RTF_UP: u32 = 0x1;
    let mut best: Option<(u32, &str)> = None;
    // Header: Iface Destination Gateway Flags RefCnt Use Metric Mask MTU Window IRTT
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let hex = |s: &str| u32::from_str_radix(s, 16).ok();
        let (Some(dest), Some(flags), Some(mask)) = (hex(f[1]), hex(f[3]), hex(f[7])) else { continue };
        let Ok(metric) = f[6].parse::<u32>() else { continue };
        if dest != 0 || mask != 0 || flags & RTF_UP == 0 {
            continue;
        }
        if best.is_none_or(|(m, _)| metric < m) {
            best = Some((metric, f[0]));
        }
    }
    best.map(|(_, dev)| dev.to_string())
}

/// Which interfaces are external devices (`--devices`): where traffic from outside the node
/// arrives, and where the `from_net` / `to_net` programs are attached.
#[derive(Clone, Debug, Default)]
pub enum DeviceSelection {
    /// The device of the IPv4 default route (the default). Once a device was selected it stays
    /// selected while it exists, so a default route that briefly disappears or moves does not
    /// detach anything.
    #[default]
    DefaultRoute,
    /// Devices whose names match one of these globs (an exact name is a glob too); a matching
    /// device that appears later is attached then.
    Globs(Vec<glob::Pattern>),
    /// No external devices: traffic from outside the node is not translated (`--devices none`).
    None,
}

impl DeviceSelection {
    /// Parse `--devices`: `DEV,...` (names or globs such as `eth*`), or `none`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() || s.eq_ignore_ascii_case("none") {
            return Ok(DeviceSelection::None);
        }
        let mut globs = Vec::new();
        for g in s.split(',').map(str::trim) {
            if g.is_empty() {
                return Err(format!("{s:?}: empty device name in the list"));
            }
            if g.len() > 15 && !g.contains(['*', '?', '[']) {
                return Err(format!("{g:?}: a device name has at most 15 characters"));
            }
            if g.contains(['/', ':']) || g.chars().any(char::is_whitespace) {
                return Err(format!("{g:?}: not a device name"));
            }
            globs.push(glob::Pattern::new(g).map_err(|e| format!("{g:?}: {e}"))?);
        }
        Ok(DeviceSelection::Globs(globs))
    }
}

/// An external device the programs are (to be) attached to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalDevice {
    pub name: String,
    /// Its first IPv4 address (the kernel lists the primary one first): the SNAT source of flows
    /// from outside to backends on other nodes (`DEVICES` map). None: the device has none yet.
    pub addr: Option<Ipv4Addr>,
}

/// The external devices chosen from the interfaces as they are now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selected {
    /// ifindex -> device.
    pub devices: BTreeMap<u32, ExternalDevice>,
    /// True when the selection is known: external links on other devices may be detached. False
    /// when the default route is needed but missing (e.g. at boot), so a restarted agent does not
    /// detach what its predecessor attached before the route is back.
    pub authoritative: bool,
    /// Every IPv4 address of the selected devices, sorted, deduplicated (node addresses).
    pub addrs: Vec<Ipv4Addr>,
}

/// [`DeviceSelection`] with its memory of devices selected through the default route.
#[derive(Clone, Debug, Default)]
pub struct ExternalDevices {
    selection: DeviceSelection,
    /// Devices ever selected as the default route's device in this run (by name).
    sticky: BTreeSet<String>,
}

impl ExternalDevices {
    pub fn new(selection: DeviceSelection) -> Self {
        ExternalDevices { selection, sticky: BTreeSet::new() }
    }

    pub fn selection(&self) -> &DeviceSelection {
        &self.selection
    }

    /// The external devices among `ifs` (never `lo`). Call it on every scan: a device named by
    /// the selection that appears later is selected then.
    pub fn select(&mut self, ifs: &Interfaces) -> Selected {
        let mut out = Selected { authoritative: true, ..Selected::default() };
        let chosen = |name: &str| -> bool {
            match &self.selection {
                DeviceSelection::None => false,
                DeviceSelection::Globs(g) => g.iter().any(|p| p.matches(name)),
                DeviceSelection::DefaultRoute => {
                    self.sticky.contains(name) || ifs.default_route.as_deref() == Some(name)
                }
            }
        };
        for (idx, l) in &ifs.links {
            if l.name == "lo" || !chosen(&l.name) {
                continue;
            }
            out.devices.insert(*idx, ExternalDevice { name: l.name.clone(), addr: l.addrs.first().copied() });
            out.addrs.extend(&l.addrs);
        }
        if let DeviceSelection::DefaultRoute = self.selection {
            match &ifs.default_route {
                Some(dev) if ifs.index_of(dev).is_some() => {
                    self.sticky.insert(dev.clone());
                }
                _ => out.authoritative = !self.sticky.is_empty(),
            }
        }
        out.addrs.sort();
        out.addrs.dedup();
        out
    }
}

/// How `from_net` runs on the external devices (`--xdp-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum XdpMode {
    /// Native XDP on devices whose driver is not veth, tc only on veth devices. On a veth,
    /// native XDP can transmit nothing itself (XDP_TX needs XDP or GRO on the peer), so it only
    /// adds a hop in front of tc: measured here, NodePort connections to a local backend at 10k
    /// Services ran at 0.74x of direct with native XDP on the veth uplink, 0.91x with tc only.
    #[default]
    Auto,
    /// Native (driver) XDP: `from_net_xdp` in the driver, `from_net` at tc ingress behind it.
    Native,
    /// Generic (skb) XDP, for drivers without native XDP support.
    Generic,
    /// No XDP: `from_net` at tc ingress only.
    Off,
}

impl XdpMode {
    pub fn name(self) -> &'static str {
        match self {
            XdpMode::Auto => "auto",
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
            XdpMode::Off => "off",
        }
    }
}

impl XdpMode {
    /// The mode used on device `ifname`: `Auto` becomes `Off` on a veth and `Native` elsewhere
    /// (also when the driver cannot be asked: native attach then fails loudly, not silently).
    pub fn on_device(self, ifname: &str) -> XdpMode {
        match self {
            XdpMode::Auto => match driver(ifname) {
                Ok(d) if d == "veth" => XdpMode::Off,
                _ => XdpMode::Native,
            },
            other => other,
        }
    }
}

/// The driver of device `ifname`, as `ethtool -i` names it ("veth", "virtio_net", "mlx5_core",
/// ...), asked of the kernel in the calling thread's network namespace (`SIOCETHTOOL`
/// `ETHTOOL_GDRVINFO`). Devices without ethtool support fail with `EOPNOTSUPP`.
pub fn driver(ifname: &str) -> io::Result<String> {
    use std::os::fd::AsRawFd as _;

    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

    const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;
    /// `struct ethtool_drvinfo` (linux/ethtool.h).
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    let name = ifname.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{ifname:?} is not a device name")));
    }
    // SAFETY: plain-old-data C structs, all-zero is a valid value of each.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
    let sock = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).map_err(io::Error::from)?;
    // SAFETY: SIOCETHTOOL reads the ifreq and writes at most size_of::<DrvInfo>() bytes to
    // ifru_data, which points to `info`, alive for the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL as _, &mut ifr) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(info.driver.len());
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// The local port range of the kernel (`/proc/sys/net/ipv4/ip_local_port_range`, "MIN\tMAX").
pub fn local_port_range() -> io::Result<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
    parse_local_port_range(&text).ok_or_else(|| io::Error::other(format!("unexpected ip_local_port_range {text:?}")))
}

fn parse_local_port_range(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_whitespace().map(|p| p.parse::<u16>().ok());
    Some((it.next()??, it.next()??))
}

/// Whether two inclusive ranges share a port.
pub fn ranges_overlap(a: (u16, u16), b: (u16, u16)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
        eth0\t0000A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n\
        wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
        eth0\t00000000\t0100A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
        down0\t00000000\t0100A8C0\t0002\t0\t0\t1\t00000000\t0\t0\t0\n";

    #[test]
    fn the_default_route_with_the_lowest_metric_wins() {
        assert_eq!(parse_default_route(ROUTES).as_deref(), Some("eth0"));
        // Only a subnet route: no default route.
        let subnet_only: String = ROUTES.lines().take(2).map(|l| format!("{l}\n")).collect();
        assert_eq!(parse_default_route(&subnet_only), None);
        assert_eq!(parse_default_route(""), None);
        // A host default route that is not the first line, and garbage lines are skipped.
        let text = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
            bad line\n\
            ens3\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(parse_default_route(text).as_deref(), Some("ens3"));
    }

    #[test]
    fn loopback_has_no_driver_and_bad_names_are_refused() {
        // lo has no ethtool driver info (EOPNOTSUPP), or reports none; either way no panic.
        let _ = driver("lo");
        assert_eq!(driver("").unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(driver("a-name-far-too-long").unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert!(driver("xlb-no-such0").is_err());
    }

    #[test]
    fn scanning_this_namespace_finds_loopback() {
        let ifs = Interfaces::scan().expect("getifaddrs");
        let lo = ifs.index_of("lo").expect("lo exists in every namespace");
        assert!(ifs.links[&lo].addrs.contains(&Ipv4Addr::LOCALHOST), "{ifs:?}");
    }

    fn ifs(default_route: Option<&str>, links: &[(u32, &str, &[[u8; 4]])]) -> Interfaces {
        Interfaces {
            links: links
                .iter()
                .map(|(i, n, a)| {
                    let addrs = a.iter().map(|o| Ipv4Addr::from(*o)).collect();
                    (*i, Interface { name: n.to_string(), addrs })
                })
                .collect(),
            default_route: default_route.map(str::to_string),
        }
    }

    #[test]
    fn device_flag_values() {
        assert!(matches!(DeviceSelection::parse("none"), Ok(DeviceSelection::None)));
        assert!(matches!(DeviceSelection::parse(""), Ok(DeviceSelection::None)));
        match DeviceSelection::parse("eth0, bond*") {
            Ok(DeviceSelection::Globs(g)) => assert_eq!(g.len(), 2),
            other => panic!("{other:?}"),
        }
        for bad in ["eth0,,eth1", "averyveryverylongname", "eth0:1", "a b", "eth[", "../x"] {
            assert!(DeviceSelection::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn explicit_devices_follow_the_globs_and_carry_their_addresses() {
        let mut ext = ExternalDevices::new(DeviceSelection::parse("eth*,bond0").unwrap());
        let now = ifs(
            Some("eth0"),
            &[
                (1, "lo", &[[127, 0, 0, 1]]),
                (2, "eth0", &[[10, 0, 0, 5], [10, 0, 0, 6]]),
                (3, "eth1", &[]),
                (4, "veth1", &[[169, 254, 1, 1]]),
            ],
        );
        let s = ext.select(&now);
        assert!(s.authoritative);
        assert_eq!(s.devices.keys().copied().collect::<Vec<_>>(), [2, 3]);
        assert_eq!(s.devices[&2].addr, Some(Ipv4Addr::new(10, 0, 0, 5)));
        assert_eq!(s.devices[&3].addr, None);
        assert_eq!(s.addrs, [Ipv4Addr::new(10, 0, 0, 5), Ipv4Addr::new(10, 0, 0, 6)]);
        // bond0 appears later: it is selected then.
        let mut later = now.clone();
        later.links.insert(9, Interface { name: "bond0".into(), addrs: vec![Ipv4Addr::new(192, 168, 1, 2)] });
        assert!(ext.select(&later).devices.contains_key(&9));
    }

    #[test]
    fn the_default_route_device_is_sticky_and_unknown_without_a_route() {
        let mut ext = ExternalDevices::new(DeviceSelection::DefaultRoute);
        // No default route yet: nothing selected, and the selection is not authoritative.
        let s = ext.select(&ifs(None, &[(2, "eth0", &[[10, 0, 0, 5]])]));
        assert!(s.devices.is_empty());
        assert!(!s.authoritative);
        let s = ext.select(&ifs(Some("eth0"), &[(2, "eth0", &[[10, 0, 0, 5]]), (3, "eth1", &[[10, 1, 0, 5]])]));
        assert_eq!(s.devices.keys().copied().collect::<Vec<_>>(), [2]);
        assert!(s.authoritative);
        // The route moves to eth1: both are external now; the route vanishes: eth0 and eth1 stay.
        let s = ext.select(&ifs(Some("eth1"), &[(2, "eth0", &[[10, 0, 0, 5]]), (3, "eth1", &[[10, 1, 0, 5]])]));
        assert_eq!(s.devices.keys().copied().collect::<Vec<_>>(), [2, 3]);
        let s = ext.select(&ifs(None, &[(2, "eth0", &[[10, 0, 0, 5]]), (3, "eth1", &[[10, 1, 0, 5]])]));
        assert_eq!(s.devices.len(), 2);
        assert!(s.authoritative);
        assert_eq!(s.addrs, [Ipv4Addr::new(10, 0, 0, 5), Ipv4Addr::new(10, 1, 0, 5)]);
    }

    #[test]
    fn no_devices_selects_nothing() {
        let mut ext = ExternalDevices::new(DeviceSelection::None);
        let s = ext.select(&ifs(Some("eth0"), &[(2, "eth0", &[[10, 0, 0, 5]])]));
        assert!(s.devices.is_empty() && s.addrs.is_empty() && s.authoritative);
    }

    #[test]
    fn local_port_ranges() {
        assert_eq!(parse_local_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_local_port_range("x"), None);
        assert!(ranges_overlap((61000, 65535), (32768, 61000)));
        assert!(!ranges_overlap((61000, 65535), (32768, 60999)));
    }
}
