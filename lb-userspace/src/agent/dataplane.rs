//! The kernel side of the agent: what it writes plans to, attaches programs with, reads packet
//! counters from and sweeps conntrack through. [`BpfDataplane`] is the real one (root, bpffs);
//! the agent's unit tests drive the agent through a fake.

use std::collections::BTreeMap;
use std::io;
use std::time::Instant;

use anyhow::Context as _;
use lb_common::Stat;
use lb_model::store::ExecReport;
use lb_model::{Applied, Plan};

use super::AgentConfig;
use crate::ct_gc::{self, CtGc, SweepReport};
use crate::datapath::{Datapath, LoadOptions, PinnedMaps};

/// What the agent needs of the kernel.
pub trait Dataplane {
    /// Execute `plan` in order, recording each successful op in `applied` (a failure stops only
    /// its frontend; see [`Datapath::execute`]).
    fn execute(&mut self, plan: &Plan, applied: &mut Applied) -> ExecReport;
    /// Attach the programs to every present device matching `globs` and forget vanished ones;
    /// returns how many devices have them attached.
    fn attach_devices(&mut self, globs: &[glob::Pattern]) -> usize;
    /// The datapath's packet counters, summed over CPUs (None when they cannot be read now).
    fn packet_stats(&self) -> Option<Vec<(Stat, u64)>>;
    /// When [`Dataplane::sweep_step`] has work next.
    fn sweep_deadline(&self) -> Instant;
    /// At most one slice (a few ms) of a conntrack and affinity sweep, starting one if it is due;
    /// the report when a sweep completes. Affinity timeouts come from `applied`.
    fn sweep_step(&mut self, applied: &Applied) -> Option<io::Result<SweepReport>>;
}

/// The loaded programs with their pinned maps, and the conntrack sweeper.
pub struct BpfDataplane {
    datapath: Datapath,
    /// The pinned maps opened by path, for the STATS counters.
    maps: PinnedMaps,
    ct_gc: CtGc,
}

impl BpfDataplane {
    /// Load the programs with the maps pinned under `cfg.pin_path` (reusing an earlier agent's),
    /// and read back what the maps hold (never flushed: a restart only writes what differs).
    pub fn open(cfg: &AgentConfig) -> anyhow::Result<(Self, Applied)> {
        let opts =
            LoadOptions { sizes: cfg.map_sizes.clone(), service_cidr: cfg.service_cidr, ct_timeouts: cfg.ct_timeouts, snat_ports: cfg.snat_ports };
        let mut datapath = Datapath::open_with_options(&cfg.pin_path, &opts)
            .with_context(|| format!("opening the datapath at {}", cfg.pin_path.display()))?;
        let applied = datapath.read_applied().context("reading the pinned maps back")?;
        tracing::info!(
            pin_path = %cfg.pin_path.display(),
            frontends = applied.frontends.len(),
            backends = applied.backends.len(),
            "datapath loaded; state restored from pinned maps"
        );
        let maps = PinnedMaps::open(&cfg.pin_path).context("opening pinned maps for stats")?;
        let ct_gc =
            CtGc::open(&cfg.pin_path, cfg.ct_gc.clone()).context("opening the conntrack maps for the sweeper")?;
        Ok((BpfDataplane { datapath, maps, ct_gc }, applied))
    }
}

impl Dataplane for BpfDataplane {
    fn execute(&mut self, plan: &Plan, applied: &mut Applied) -> ExecReport {
        self.datapath.execute(plan, applied)
    }

    fn attach_devices(&mut self, globs: &[glob::Pattern]) -> usize {
        let dp = &mut self.datapath;
        let present: BTreeMap<u32, String> = match nix::net::if_::if_nameindex() {
            Ok(ifs) => ifs.iter().map(|i| (i.index(), i.name().to_string_lossy().into_owned())).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "listing interfaces failed");
                return dp.attached().len();
            }
        };
        dp.forget_missing(&present);
        for (idx, name) in &present {
            if !globs.iter().any(|g| g.matches(name)) || dp.attached().contains_key(idx) {
                continue;
            }
            match dp.attach(name) {
                Ok(()) => tracing::info!(device = %name, ifindex = idx, "programs attached"),
                // The device may vanish between listing and attaching; try again next tick.
                Err(e) => tracing::warn!(device = %name, error = %e, "attach failed"),
            }
        }
        dp.attached().len()
    }

    fn packet_stats(&self) -> Option<Vec<(Stat, u64)>> {
        self.maps.stats().ok()
    }

    fn sweep_deadline(&self) -> Instant {
        self.ct_gc.deadline()
    }

    fn sweep_step(&mut self, applied: &Applied) -> Option<io::Result<SweepReport>> {
        self.ct_gc.step(&|id| ct_gc::affinity_timeout(applied, id))
    }
}
