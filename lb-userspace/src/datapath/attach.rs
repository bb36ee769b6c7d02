//! Attaching the programs as pinned links: `from_pod` / `to_pod` on pod devices (TCX), and
//! `from_net_xdp` (XDP), `from_net` (tc ingress) and `to_net` (tc egress) on the external
//! devices; forgetting vanished devices, detaching devices that are no longer external, the
//! `DEVICES` map, and `xlb cleanup` (which also removes the socket-LB cgroup links of
//! [`super::socklb`]).
//!
//! Every link is pinned under `PIN/links/<ifindex>-<ifname>-<hook>`. A restarted agent finds the
//! pins and swaps its freshly loaded programs into them with `bpf_link_update` (aya's
//! `attach_to_link`), for TCX and XDP links alike: nothing is detached, no packet misses a
//! program. The XDP pin's name carries the mode (`from_net_xdp_native` / `from_net_xdp_generic`),
//! because a link keeps the mode it was created with: an agent started with another
//! `--xdp-mode` removes the old link (the kernel allows one XDP mode per device) and creates one.

use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::HashMap;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::SchedClassifierLink;
use aya::programs::xdp::XdpLink;
use aya::programs::{SchedClassifier, TcAttachType, Xdp, XdpMode as AyaXdpMode};
use lb_common::{map_names, prog_names, DeviceValue, DEV_F_XDP_TX};

use super::{io_err, Datapath, Error, PinLayout, Result};
use crate::devices::XdpMode;

/// A hook xlb attaches a program to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    /// `from_pod` at tc ingress of the host-side veth (packets leaving the pod).
    FromPod,
    /// `to_pod` at tc egress of the host-side veth (packets going into the pod).
    ToPod,
    /// `from_net_xdp` as native (driver) XDP on an external device.
    FromNetXdpNative,
    /// `from_net_xdp` as generic (skb) XDP on an external device.
    FromNetXdpGeneric,
    /// `from_net` at tc ingress of an external device (alone with `--xdp-mode off`; behind XDP
    /// otherwise, for what XDP hands to the stack).
    FromNet,
    /// `to_net` at tc egress of an external device.
    ToNet,
}

impl Hook {
    /// The hooks of a pod device.
    pub const POD: [Hook; 2] = [Hook::FromPod, Hook::ToPod];
    /// The tc hooks of an external device (attached before XDP, so that what XDP hands to the
    /// stack always finds `from_net`).
    pub const EXTERNAL_TC: [Hook; 2] = [Hook::FromNet, Hook::ToNet];
    /// Every hook.
    pub const ALL: [Hook; 6] =
        [Hook::FromPod, Hook::ToPod, Hook::FromNetXdpNative, Hook::FromNetXdpGeneric, Hook::FromNet, Hook::ToNet];

    /// The program attached at this hook.
    pub fn prog(self) -> &'static str {
        match self {
            Hook::FromPod => prog_names::FROM_POD,
            Hook::ToPod => prog_names::TO_POD,
            Hook::FromNetXdpNative | Hook::FromNetXdpGeneric => prog_names::FROM_NET_XDP,
            Hook::FromNet => prog_names::FROM_NET,
            Hook::ToNet => prog_names::TO_NET,
        }
    }

    /// The XDP hook of `mode` (None for `off`).
    pub fn xdp(mode: XdpMode) -> Option<Hook> {
        match mode {
            XdpMode::Native | XdpMode::Auto => Some(Hook::FromNetXdpNative),
            XdpMode::Generic => Some(Hook::FromNetXdpGeneric),
            XdpMode::Off => None,
        }
    }

    /// A hook of external devices (as opposed to pod devices).
    pub fn is_external(self) -> bool {
        !matches!(self, Hook::FromPod | Hook::ToPod)
    }

    fn tc_attach_type(self) -> TcAttachType {
        match self {
            Hook::FromPod | Hook::FromNet => TcAttachType::Ingress,
            _ => TcAttachType::Egress,
        }
    }

    /// The last part of the link's pin name (no '-' in it: the pin name is split at the last one).
    pub(super) fn suffix(self) -> &'static str {
        match self {
            Hook::FromPod => "from_pod",
            Hook::ToPod => "to_pod",
            Hook::FromNetXdpNative => "from_net_xdp_native",
            Hook::FromNetXdpGeneric => "from_net_xdp_generic",
            Hook::FromNet => "from_net",
            Hook::ToNet => "to_net",
        }
    }

    fn from_suffix(s: &str) -> Option<Hook> {
        Hook::ALL.into_iter().find(|h| h.suffix() == s)
    }
}

/// Unpin a link: dropping the last reference detaches its program.
fn unpin_link(pin: &Path) {
    match PinnedLink::from_pin(pin) {
        Ok(link) => {
            let _ = link.unpin();
        }
        Err(_) => {
            let _ = fs::remove_file(pin);
        }
    }
}

impl Datapath {
    /// Attach both pod hooks to `ifname` (idempotent). A pinned link left by an earlier agent gets
    /// the freshly loaded program swapped in atomically; otherwise a new TCX link is created and
    /// pinned.
    pub fn attach(&mut self, ifname: &str) -> Result<()> {
        let ifindex = nix::net::if_::if_nametoindex(ifname)
            .map_err(|e| Error::Attach { iface: ifname.to_string(), reason: e.to_string() })?;
        if self.attached.get(&ifindex).map(String::as_str) == Some(ifname) {
            return Ok(());
        }
        for hook in Hook::POD {
            self.attach_tc(ifname, ifindex, hook)?;
        }
        self.attached.insert(ifindex, ifname.to_string());
        Ok(())
    }

    /// Load the programs of external devices (`from_net`, `to_net`, and `from_net_xdp` unless
    /// `mode` is off), to be attached in `mode`. Fails with [`Error::MissingProgram`] when the
    /// object has no such program.
    pub fn load_external(&mut self, mode: XdpMode) -> Result<()> {
        let mut names = vec![prog_names::FROM_NET, prog_names::TO_NET];
        if mode != XdpMode::Off {
            names.push(prog_names::FROM_NET_XDP);
        }
        super::load_programs(&mut self.ebpf, &names)?;
        self.xdp_mode = Some(mode);
        Ok(())
    }

    /// Attach the external programs to `ifname` (idempotent): tc ingress `from_net`, tc egress
    /// `to_net`, then XDP `from_net_xdp` in the loaded mode (removing an XDP link of another mode
    /// an earlier agent left). Pinned links are reused with the new programs swapped in.
    pub fn attach_external(&mut self, ifname: &str) -> Result<()> {
        let mode = self
            .xdp_mode
            .ok_or(Error::MissingProgram(prog_names::FROM_NET))?
            .on_device(ifname);
        let ifindex = nix::net::if_::if_nametoindex(ifname)
            .map_err(|e| Error::Attach { iface: ifname.to_string(), reason: e.to_string() })?;
        if self.external.get(&ifindex).map(String::as_str) == Some(ifname) {
            return Ok(());
        }
        for hook in Hook::EXTERNAL_TC {
            self.attach_tc(ifname, ifindex, hook)?;
        }
        let want = Hook::xdp(mode);
        for other in [Hook::FromNetXdpNative, Hook::FromNetXdpGeneric] {
            let pin = self.pins.link(ifindex, ifname, other);
            if Some(other) != want && pin.exists() {
                tracing::info!(iface = ifname, hook = other.suffix(), "removing the XDP link of another --xdp-mode");
                unpin_link(&pin);
            }
        }
        if let Some(hook) = want {
            self.attach_xdp(ifname, ifindex, hook)?;
        }
        self.external.insert(ifindex, ifname.to_string());
        self.external_flags.insert(ifindex, device_flags(mode, ifname));
        Ok(())
    }

    /// Detach the external programs from a device that is no longer external, and drop its
    /// `DEVICES` entry.
    pub fn detach_external(&mut self, ifindex: u32, ifname: &str) {
        for hook in Hook::ALL.into_iter().filter(|h| h.is_external()) {
            let pin = self.pins.link(ifindex, ifname, hook);
            if pin.exists() {
                unpin_link(&pin);
            }
        }
        self.external.remove(&ifindex);
        self.external_flags.remove(&ifindex);
    }

    /// External devices with their programs attached (ifindex -> name).
    pub fn external(&self) -> &BTreeMap<u32, String> {
        &self.external
    }

    /// Devices (ifindex, name) with external links pinned, whether or not this agent attached them.
    pub fn pinned_external(&self) -> Vec<(u32, String)> {
        let mut out: Vec<(u32, String)> = self
            .link_pins()
            .into_iter()
            .filter(|(_, _, hook, _)| hook.is_external())
            .map(|(idx, name, _, _)| (idx, name))
            .collect();
        out.dedup();
        out
    }

    /// Make the `DEVICES` map hold exactly `want` (ifindex -> the device's address; None: 0, an
    /// external device without an address), with the flags found when the device was attached
    /// ([`DEV_F_XDP_TX`]). Entries of other devices (vanished, or left by an earlier agent) are
    /// removed.
    pub fn sync_devices_map(&mut self, want: &BTreeMap<u32, Option<Ipv4Addr>>) -> Result<()> {
        let name = map_names::DEVICES;
        let map = self.ebpf.map_mut(name).ok_or(Error::Map {
            name,
            source: aya::maps::MapError::InvalidName { name: name.into() },
        })?;
        let mut devices: HashMap<_, u32, DeviceValue> =
            HashMap::try_from(map).map_err(|source| Error::Map { name, source })?;
        let present: Vec<u32> = devices.keys().filter_map(|k| k.ok()).collect();
        for idx in present.iter().filter(|i| !want.contains_key(i)) {
            match devices.remove(idx) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => return Err(Error::Map { name, source }),
            }
        }
        for (idx, addr) in want {
            let flags = self.external_flags.get(idx).copied().unwrap_or(0);
            let value = DeviceValue { addr: addr.map_or(0, |a| lb_common::ip4(a.octets())), flags };
            if devices.get(idx, 0).ok() != Some(value) {
                devices.insert(idx, value, 0).map_err(|source| Error::Map { name, source })?;
            }
        }
        Ok(())
    }

    /// Attach the tc program of `hook` to `ifname`, reusing (swapping into) a pinned link.
    fn attach_tc(&mut self, ifname: &str, ifindex: u32, hook: Hook) -> Result<()> {
        let pin = self.pins.link(ifindex, ifname, hook);
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(hook.prog())
            .ok_or(Error::MissingProgram(hook.prog()))?
            .try_into()
            .map_err(|source| Error::Program { name: hook.prog(), source })?;
        let attach_err = |reason: String| Error::Attach { iface: ifname.to_string(), reason };
        if pin.exists() {
            // Swap our program into the link an earlier agent pinned: no gap.
            let swapped = PinnedLink::from_pin(&pin)
                .map_err(|e| e.to_string())
                .and_then(|p| SchedClassifierLink::try_from(FdLink::from(p)).map_err(|e| e.to_string()))
                .and_then(|link| prog.attach_to_link(link).map_err(|e| e.to_string()));
            match swapped {
                Ok(id) => {
                    // The pin keeps the link; our copy of the fd may close with the program.
                    let _ = prog.take_link(id);
                    return Ok(());
                }
                Err(reason) => {
                    tracing::warn!(iface = ifname, hook = hook.suffix(), %reason, "stale link pin, re-attaching");
                    let _ = fs::remove_file(&pin);
                }
            }
        }
        let id = prog.attach(ifname, hook.tc_attach_type()).map_err(|e| attach_err(format!("{e:#}")))?;
        let link = prog.take_link(id).map_err(|e| attach_err(e.to_string()))?;
        match FdLink::try_from(link) {
            Ok(fd_link) => {
                fd_link.pin(&pin).map_err(|e| attach_err(format!("pinning link: {e}")))?;
            }
            Err(_) => {
                // Legacy netlink tc filter (kernel < 6.6): it persists by itself (taking the
                // link out of the wrapper leaves it attached).
                tracing::info!(iface = ifname, hook = hook.suffix(), "attached as a netlink tc filter (no TCX)");
            }
        }
        Ok(())
    }

    /// Attach `from_net_xdp` to `ifname` as `hook` says (native or generic), reusing (swapping
    /// into) a pinned XDP link.
    fn attach_xdp(&mut self, ifname: &str, ifindex: u32, hook: Hook) -> Result<()> {
        let pin = self.pins.link(ifindex, ifname, hook);
        let name = hook.prog();
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .ok_or(Error::MissingProgram(name))?
            .try_into()
            .map_err(|source| Error::Program { name, source })?;
        let attach_err = |reason: String| Error::Attach { iface: ifname.to_string(), reason };
        if pin.exists() {
            let swapped = PinnedLink::from_pin(&pin)
                .map_err(|e| e.to_string())
                .and_then(|p| XdpLink::try_from(FdLink::from(p)).map_err(|e| e.to_string()))
                .and_then(|link| prog.attach_to_link(link).map_err(|e| e.to_string()));
            match swapped {
                Ok(id) => {
                    let _ = prog.take_link(id);
                    return Ok(());
                }
                Err(reason) => {
                    tracing::warn!(iface = ifname, hook = hook.suffix(), %reason, "stale XDP link pin, re-attaching");
                    unpin_link(&pin);
                }
            }
        }
        let mode = match hook {
            Hook::FromNetXdpGeneric => AyaXdpMode::Skb,
            _ => AyaXdpMode::Driver,
        };
        let id = prog.attach_to_if_index(ifindex, mode).map_err(|e| {
            let hint = if mode == AyaXdpMode::Driver {
                " (does the driver support native XDP? try --xdp-mode generic or off)"
            } else {
                ""
            };
            attach_err(format!("XDP {}: {e:#}{hint}", hook.suffix()))
        })?;
        let link = prog.take_link(id).map_err(|e| attach_err(e.to_string()))?;
        match FdLink::try_from(link) {
            Ok(fd_link) => {
                fd_link.pin(&pin).map_err(|e| attach_err(format!("pinning XDP link: {e}")))?;
            }
            Err(_) => {
                // Netlink XDP (kernel < 5.9, no XDP bpf_link): the program stays attached by
                // itself, but a restarted agent cannot swap it; `xlb cleanup` does not see it.
                tracing::warn!(iface = ifname, "XDP attached through netlink (no bpf_link for XDP): not pinned");
            }
        }
        Ok(())
    }

    /// Every link pin: (ifindex, ifname, hook, path).
    fn link_pins(&self) -> Vec<(u32, String, Hook, PathBuf)> {
        let mut out = Vec::new();
        if let Ok(rd) = fs::read_dir(self.pins.links()) {
            for entry in rd.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some((idx, ifname, hook)) = parse_link_pin(&name) {
                    out.push((idx, ifname.to_string(), hook, entry.path()));
                }
            }
        }
        out.sort_by(|a, b| (a.0, &a.1, a.2).cmp(&(b.0, &b.1, b.2)));
        out
    }

    /// Forget interfaces that disappeared and remove their link pins (the kernel detached them).
    pub fn forget_missing(&mut self, present: &BTreeMap<u32, String>) {
        // Called on every device scan: touch bpffs only when an interface came or went.
        if *present == self.last_present {
            return;
        }
        self.last_present = present.clone();
        self.attached.retain(|idx, name| present.get(idx) == Some(name));
        self.external.retain(|idx, name| present.get(idx) == Some(name));
        let external = &self.external;
        self.external_flags.retain(|idx, _| external.contains_key(idx));
        if let Ok(rd) = fs::read_dir(self.pins.links()) {
            for entry in rd.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                // The socket-LB links belong to a cgroup, not to a device.
                if name.starts_with(super::socklb::PIN_PREFIX) {
                    continue;
                }
                let keep = parse_link_pin(&name)
                    .map(|(idx, ifname, _)| present.get(&idx).map(String::as_str) == Some(ifname))
                    .unwrap_or(false);
                if !keep {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }
}

/// `DeviceValue::flags` of an external device attached in `mode`: XDP may transmit
/// ([`DEV_F_XDP_TX`]) in generic mode, and in native mode except on a veth (whose XDP transmit
/// needs XDP or GRO on the peer, or the frame is dropped silently) or a device whose driver
/// cannot be asked (the safe side: XDP then leaves forwarding to tc).
fn device_flags(mode: XdpMode, ifname: &str) -> u32 {
    match mode {
        XdpMode::Off => 0,
        XdpMode::Generic => DEV_F_XDP_TX,
        XdpMode::Native | XdpMode::Auto => match crate::devices::driver(ifname) {
            Ok(d) if d != "veth" => DEV_F_XDP_TX,
            Ok(_) => 0,
            Err(e) => {
                tracing::info!(iface = ifname, error = %e, "driver unknown: XDP leaves forwarding to tc");
                0
            }
        },
    }
}

/// Parse a link pin file name `<ifindex>-<ifname>-<hook>`.
pub fn parse_link_pin(name: &str) -> Option<(u32, &str, Hook)> {
    let (idx, rest) = name.split_once('-')?;
    let (ifname, hook) = rest.rsplit_once('-')?;
    Some((idx.parse().ok()?, ifname, Hook::from_suffix(hook)?))
}

/// Detach everything xlb attached under `pin_path` (pod and external devices, TCX and XDP links,
/// the socket-LB cgroup links) and remove all its pins (maps of earlier versions included). Safe
/// to run twice.
pub fn cleanup(pin_path: &Path) -> Result<usize> {
    let pins = PinLayout::new(pin_path);
    let mut removed = 0;
    if let Ok(rd) = fs::read_dir(pins.links()) {
        for entry in rd.flatten() {
            // Unpinning drops the last reference: the kernel detaches the program.
            unpin_link(&entry.path());
            removed += 1;
        }
    }
    if let Ok(rd) = fs::read_dir(pins.maps()) {
        for entry in rd.flatten() {
            fs::remove_file(entry.path()).map_err(io_err(&entry.path()))?;
            removed += 1;
        }
    }
    for dir in [pins.links(), pins.maps(), pins.root.clone()] {
        let _ = fs::remove_dir(&dir);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pin_names_round_trip() {
        assert_eq!(parse_link_pin("12-xp1-3-from_pod"), Some((12, "xp1-3", Hook::FromPod)));
        assert_eq!(parse_link_pin("7-veth0-to_pod"), Some((7, "veth0", Hook::ToPod)));
        assert_eq!(parse_link_pin("garbage"), None);
        assert_eq!(parse_link_pin("3-eth0-unknown_hook"), None);
        for hook in Hook::ALL {
            let pin = format!("4-br-ex_1-{}", hook.suffix());
            assert_eq!(parse_link_pin(&pin), Some((4, "br-ex_1", hook)), "{pin}");
            assert!(!hook.suffix().contains('-'));
        }
    }

    #[test]
    fn hooks_know_their_programs_and_kinds() {
        assert_eq!(Hook::xdp(XdpMode::Native), Some(Hook::FromNetXdpNative));
        assert_eq!(Hook::xdp(XdpMode::Generic), Some(Hook::FromNetXdpGeneric));
        assert_eq!(Hook::xdp(XdpMode::Off), None);
        assert_eq!(Hook::FromNetXdpGeneric.prog(), prog_names::FROM_NET_XDP);
        assert!(Hook::POD.iter().all(|h| !h.is_external()));
        assert!(Hook::EXTERNAL_TC.iter().all(|h| h.is_external()));
        assert_eq!(Hook::FromNet.tc_attach_type(), TcAttachType::Ingress);
        assert_eq!(Hook::ToNet.tc_attach_type(), TcAttachType::Egress);
    }
}
