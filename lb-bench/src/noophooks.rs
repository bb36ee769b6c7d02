//! The floor of the real-traffic targets: the eBPF object's no-op tc program (`noop_tc`, which
//! returns `TC_ACT_OK`) attached where xlb's agent attaches `from_pod` and `to_pod` (TCX ingress
//! and egress of the host side of every pod veth on node1), on a bed whose client connects to a
//! pod directly. What that row loses against plain "direct" is what any program at those hooks
//! costs the same traffic (the hook, the program call, and with run statistics on, their two
//! clock reads), before it does any work: a connection rate no tc datapath can beat and a cost
//! per run none can go below.
//!
//! The links belong to the loaded object: dropping a [`NoopHooks`] detaches them.

use std::collections::BTreeMap;

use anyhow::{anyhow, Context as _};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::Ebpf;
use lb_common::prog_names::NOOP_TC;
use lb_testkit::NetNs;
use lb_userspace::datapath::{load_programs, LoadOptions};

/// `noop_tc` attached to both directions of some devices; detached on drop.
pub struct NoopHooks {
    /// Owns the program and its links.
    _ebpf: Ebpf,
    /// The program's id (for its run statistics), with its name.
    id: u32,
}

impl NoopHooks {
    /// Load the object's `noop_tc` and attach it to TCX ingress and egress of each of
    /// `devices` in `ns`.
    pub fn attach(ns: &NetNs, devices: &[String]) -> anyhow::Result<Self> {
        ns.run(|| -> anyhow::Result<Self> {
            let mut ebpf = LoadOptions::default()
                .load_object(None)
                .context("loading the eBPF object")?;
            load_programs(&mut ebpf, &[NOOP_TC]).map_err(|e| anyhow!("{e}"))?;
            let prog: &mut SchedClassifier = ebpf
                .program_mut(NOOP_TC)
                .with_context(|| format!("no {NOOP_TC} in the object"))?
                .try_into()?;
            for dev in devices {
                for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
                    prog.attach(dev, hook)
                        .with_context(|| format!("attaching {NOOP_TC} to {dev} ({hook:?})"))?;
                }
            }
            let id = prog.info()?.id();
            Ok(NoopHooks { _ebpf: ebpf, id })
        })?
    }

    /// The program to read run statistics of: its id and name.
    pub fn programs(&self) -> BTreeMap<u32, String> {
        BTreeMap::from([(self.id, NOOP_TC.to_string())])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progstats::{snapshot_of, StatsOn};

    /// The no-op program runs on every packet through both directions of the device while
    /// attached, and is gone (detached and unloaded) once the hooks drop.
    #[test]
    #[ignore = "needs root"]
    fn noop_hooks_count_the_device_traffic_and_detach_on_drop() {
        let _serial = crate::root_test();
        let prefix = crate::bed::unique_prefix();
        let (a, b) = (
            NetNs::create(&format!("{prefix}na")).unwrap(),
            NetNs::create(&format!("{prefix}nb")).unwrap(),
        );
        a.ip(&[
            "link",
            "add",
            "nh0",
            "type",
            "veth",
            "peer",
            "name",
            "nh1",
            "netns",
            b.name(),
        ])
        .unwrap();
        a.ip(&["addr", "add", "10.99.0.1/24", "dev", "nh0"])
            .unwrap();
        a.ip(&["link", "set", "nh0", "up"]).unwrap();
        b.ip(&["addr", "add", "10.99.0.2/24", "dev", "nh1"])
            .unwrap();
        b.ip(&["link", "set", "nh1", "up"]).unwrap();
        let hooks = NoopHooks::attach(&a, &["nh0".to_string()]).unwrap();
        let ids = hooks.programs();
        let runs = || snapshot_of(&ids).values().map(|c| c.run_cnt).sum::<u64>();
        let (before, after) = {
            let _on = StatsOn::enable().unwrap();
            let before = runs();
            a.run(|| {
                let s = std::net::UdpSocket::bind("10.99.0.1:0").unwrap();
                for _ in 0..20 {
                    s.send_to(b"x", "10.99.0.2:9").unwrap();
                }
            })
            .unwrap();
            (before, runs())
        };
        // 20 datagrams out through egress (and ARP both ways, ICMP port unreachable back in).
        assert!(after >= before + 20, "runs {before} -> {after}");
        drop(hooks);
        assert!(
            snapshot_of(&ids).is_empty(),
            "the program outlived its hooks"
        );
    }
}
