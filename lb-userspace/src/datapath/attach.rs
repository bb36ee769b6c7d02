//! Attaching the programs to pod devices as pinned TCX links, forgetting vanished devices, and
//! `xlb cleanup`.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::SchedClassifierLink;
use aya::programs::{SchedClassifier, TcAttachType};
use lb_common::prog_names;

use super::{io_err, Datapath, Error, PinLayout, Result};

/// A tc hook xlb attaches to pod devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    /// `from_pod` at tc ingress of the host-side veth (packets leaving the pod).
    FromPod,
    /// `to_pod` at tc egress of the host-side veth (packets going into the pod).
    ToPod,
}

impl Hook {
    pub const ALL: [Hook; 2] = [Hook::FromPod, Hook::ToPod];
    /// The program attached at this hook.
    pub fn prog(self) -> &'static str {
        match self {
            Hook::FromPod => prog_names::FROM_POD,
            Hook::ToPod => prog_names::TO_POD,
        }
    }
    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::FromPod => TcAttachType::Ingress,
            Hook::ToPod => TcAttachType::Egress,
        }
    }
    pub(super) fn suffix(self) -> &'static str {
        match self {
            Hook::FromPod => "from_pod",
            Hook::ToPod => "to_pod",
        }
    }
}

impl Datapath {
    /// Attach both hooks to `ifname` (idempotent). A pinned link left by an earlier agent gets the
    /// freshly loaded program swapped in atomically; otherwise a new TCX link is created and pinned.
    pub fn attach(&mut self, ifname: &str) -> Result<()> {
        let ifindex = nix::net::if_::if_nametoindex(ifname)
            .map_err(|e| Error::Attach { iface: ifname.to_string(), reason: e.to_string() })?;
        if self.attached.get(&ifindex).map(String::as_str) == Some(ifname) {
            return Ok(());
        }
        for hook in Hook::ALL {
            let pin = self.pins.link(ifindex, ifname, hook);
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(hook.prog())
                .expect("program checked at load")
                .try_into()
                .expect("program type checked at load");
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
                        continue;
                    }
                    Err(reason) => {
                        tracing::warn!(iface = ifname, hook = hook.suffix(), %reason, "stale link pin, re-attaching");
                        let _ = fs::remove_file(&pin);
                    }
                }
            }
            let id = prog.attach(ifname, hook.attach_type()).map_err(|e| attach_err(format!("{e:#}")))?;
            let link = prog.take_link(id).map_err(|e| attach_err(e.to_string()))?;
            match FdLink::try_from(link) {
                Ok(fd_link) => {
                    fd_link.pin(&pin).map_err(|e| attach_err(format!("pinning link: {e}")))?;
                }
                Err(_) => {
                    // Legacy netlink tc filter (kernel < 6.6): it persists by itself; keep it
                    // attached by leaking our handle instead of detaching on drop.
                    tracing::info!(iface = ifname, "attached as a netlink tc filter (no TCX)");
                }
            }
        }
        self.attached.insert(ifindex, ifname.to_string());
        Ok(())
    }

    /// Forget interfaces that disappeared and remove their link pins (the kernel detached them).
    pub fn forget_missing(&mut self, present: &BTreeMap<u32, String>) {
        // Called on every device scan: touch bpffs only when an interface came or went.
        if *present == self.last_present {
            return;
        }
        self.last_present = present.clone();
        self.attached.retain(|idx, name| present.get(idx) == Some(name));
        if let Ok(rd) = fs::read_dir(self.pins.links()) {
            for entry in rd.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let keep = parse_link_pin(&name)
                    .map(|(idx, ifname)| present.get(&idx).map(String::as_str) == Some(ifname))
                    .unwrap_or(false);
                if !keep {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }
}

/// Parse a link pin file name `<ifindex>-<ifname>-<hook>`.
fn parse_link_pin(name: &str) -> Option<(u32, &str)> {
    let (idx, rest) = name.split_once('-')?;
    let ifname = rest.rsplit_once('-').map(|(n, _)| n)?;
    Some((idx.parse().ok()?, ifname))
}

/// Detach everything xlb attached under `pin_path` and remove all its pins (maps of earlier
/// versions included). Safe to run twice.
pub fn cleanup(pin_path: &Path) -> Result<usize> {
    let pins = PinLayout::new(pin_path);
    let mut removed = 0;
    if let Ok(rd) = fs::read_dir(pins.links()) {
        for entry in rd.flatten() {
            // Unpinning drops the last reference: the kernel detaches the program.
            match PinnedLink::from_pin(entry.path()) {
                Ok(link) => {
                    let _ = link.unpin();
                }
                Err(_) => {
                    let _ = fs::remove_file(entry.path());
                }
            }
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
        assert_eq!(parse_link_pin("12-xp1-3-from_pod"), Some((12, "xp1-3")));
        assert_eq!(parse_link_pin("7-veth0-to_pod"), Some((7, "veth0")));
        assert_eq!(parse_link_pin("garbage"), None);
    }
}
