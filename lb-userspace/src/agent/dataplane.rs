//! The kernel side of the agent: what it writes plans to, attaches programs with, reads packet
//! counters from and sweeps conntrack through. [`BpfDataplane`] is the real one (root, bpffs);
//! the agent's unit tests drive the agent through a fake.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::Ipv4Addr;
use std::time::Instant;

use anyhow::Context as _;
use lb_common::Stat;
use lb_model::store::ExecReport;
use lb_model::{Applied, Plan};

use super::AgentConfig;
use crate::ct_gc::{self, CtGc, SweepReport};
use crate::datapath::{default_cgroup_path, own_netns_cookie, Datapath, LoadOptions, PinnedMaps, SocketLb};
use crate::devices::{DeviceSelection, Interfaces, Selected};

/// How many devices have their programs attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attached {
    /// Pod devices (`from_pod` / `to_pod`).
    pub pods: usize,
    /// External devices (`from_net_xdp` / `from_net` / `to_net`).
    pub external: usize,
}

/// What the agent needs of the kernel.
pub trait Dataplane {
    /// Execute `plan` in order, recording each successful op in `applied` (a failure stops only
    /// its frontend; see [`Datapath::execute`]).
    fn execute(&mut self, plan: &Plan, applied: &mut Applied) -> ExecReport;
    /// The node's interfaces now (names, IPv4 addresses, the default route's device).
    fn interfaces(&mut self) -> io::Result<Interfaces>;
    /// Bring the attachments up to date with the interfaces `ifs`: forget vanished devices,
    /// attach the pod programs to `pods` (ifindexes), the external programs to
    /// `external.devices` (detaching devices no longer external when the selection is
    /// authoritative) and keep the `DEVICES` map equal to the attached external devices.
    fn attach(&mut self, ifs: &Interfaces, pods: &BTreeSet<u32>, external: &Selected) -> Attached;
    /// The datapath's packet counters, summed over CPUs (None when they cannot be read now).
    fn packet_stats(&self) -> Option<Vec<(Stat, u64)>>;
    /// The per-Service counters of ids `0..=upto`, summed over CPUs, index = Service port id
    /// (None when they cannot be read now, or the datapath has none).
    fn svc_stats(&self, _upto: u32) -> Option<Vec<lb_common::SvcStats>> {
        None
    }
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
    /// The external selection last acted on (None: none yet): stale external links are looked
    /// for only when it changes, so bpffs is not read on every tick.
    last_external: Option<BTreeMap<u32, String>>,
    /// What `DEVICES` was last made to hold (None: not written yet, stale entries may be there).
    devices_written: Option<BTreeMap<u32, Option<Ipv4Addr>>>,
    /// The last `DEVICES` write error logged.
    devices_error: Option<String>,
    /// The last attach error logged per (ifindex, external), so a device that keeps failing is
    /// logged once per distinct error, not on every tick.
    attach_errors: BTreeMap<(u32, bool), String>,
}

impl BpfDataplane {
    /// Load the programs with the maps pinned under `cfg.pin_path` (reusing an earlier agent's),
    /// and read back what the maps hold (never flushed: a restart only writes what differs).
    pub fn open(cfg: &AgentConfig) -> anyhow::Result<(Self, Applied)> {
        // `--socket-lb host`: the socket hooks translate only sockets of this (the agent's, the
        // node's) network namespace.
        let host_netns_cookie = match cfg.socket_lb {
            SocketLb::Host => own_netns_cookie()
                .context("reading the network namespace cookie (SO_NETNS_COOKIE, Linux 5.14) for --socket-lb host")?,
            SocketLb::All | SocketLb::Off => 0,
        };
        let opts = LoadOptions {
            sizes: cfg.map_sizes.clone(),
            service_cidr: cfg.service_cidr,
            ct_timeouts: cfg.ct_timeouts,
            snat_ports: cfg.snat_ports,
            maglev_m: cfg.maglev_m,
            host_netns_cookie,
            dry_run: false,
        };
        // A pinned MAGLEV array of another shape cannot serve the programs loaded now (they
        // index it with this M): a new one is created and the tables restored into it below.
        let maglev = lb_model::maglev::Geometry { m: cfg.maglev_m, tables: cfg.map_sizes.maglev_tables };
        // Pins of another layout are refused before anything is touched, the stale Maglev
        // array included (`Datapath::open_with_options` checks again, right before it loads).
        crate::datapath::migrate::Upgrade::prepare(
            &crate::datapath::PinLayout::new(&cfg.pin_path),
            &opts,
            crate::ebpf_object(),
        )
        .with_context(|| format!("opening the datapath at {}", cfg.pin_path.display()))?;
        let stale_maglev = PinnedMaps::unpin_stale_maglev(&cfg.pin_path, maglev)
            .context("checking the pinned Maglev tables")?;
        let mut datapath = Datapath::open_with_options(&cfg.pin_path, &opts)
            .with_context(|| format!("opening the datapath at {}", cfg.pin_path.display()))?;
        if !matches!(cfg.devices, DeviceSelection::None) {
            datapath.load_external(cfg.xdp_mode).with_context(|| {
                format!(
                    "loading the programs of external devices (--xdp-mode {}); \
                     `--devices none` runs without translating traffic from outside the node",
                    cfg.xdp_mode.name()
                )
            })?;
        }
        attach_socket_lb(&mut datapath, cfg, host_netns_cookie)?;
        let read_started = Instant::now();
        let mut applied = datapath.read_applied().context("reading the pinned maps back")?;
        // The whole read-back into `Applied` (every Service map, the Maglev tables the masters
        // name, the id index): what a restart costs before the first plan. The bench parses it.
        applied.build_index();
        tracing::info!(
            micros = read_started.elapsed().as_micros() as u64,
            frontends = applied.frontends.len(),
            backends = applied.backends.len(),
            "maps read back"
        );
        // The pre-filters: addresses in the Service CIDR need no bit. Pinned by an agent that
        // did not keep them (a half all zero next to frontends): every bit of it is set now,
        // before the new programs, which trust it, are attached (the sweeps clear what is not
        // needed).
        applied.filter.service_cidr = cfg.service_cidr;
        if applied.filter.fill || applied.port_filter.fill {
            datapath.execute(&lb_model::Plan::default(), &mut applied);
        }
                if let Some(old) = stale_maglev {
            // No program reads the new array yet: the tables the masters name go in place.
            let plan = lb_model::planner::restore_tables(&applied);
            let report = datapath.execute(&plan, &mut applied);
            tracing::warn!(
                old_table_size = old.m,
                old_tables = old.tables,
                table_size = maglev.m,
                tables = maglev.tables,
                restored = plan.prepare.len(),
                failed = report.prepare_failed.len(),
                "the Maglev tables had another shape: created a new array and rebuilt the tables in use"
            );
        }
        tracing::info!(
            pin_path = %cfg.pin_path.display(),
            frontends = applied.frontends.len(),
            backends = applied.backends.len(),
            "datapath loaded; state restored from pinned maps"
        );
        let maps = PinnedMaps::open(&cfg.pin_path).context("opening pinned maps for stats")?;
        let ct_gc =
            CtGc::open(&cfg.pin_path, cfg.ct_gc.clone()).context("opening the conntrack maps for the sweeper")?;
        let dp = BpfDataplane {
            datapath,
            maps,
            ct_gc,
            last_external: None,
            devices_written: None,
            devices_error: None,
            attach_errors: BTreeMap::new(),
        };
        Ok((dp, applied))
    }
}

/// Socket load balancing as `--socket-lb` says: the cgroup programs loaded and attached to
/// `--cgroup-path` (swapped into the links an earlier agent pinned), or their links removed.
fn attach_socket_lb(datapath: &mut Datapath, cfg: &AgentConfig, netns_cookie: u64) -> anyhow::Result<()> {
    if cfg.socket_lb == SocketLb::Off {
        let n = datapath.detach_sock();
        if n > 0 {
            tracing::info!(links = n, "--socket-lb off: socket load balancing links removed");
        }
        return Ok(());
    }
    let cgroup = match &cfg.cgroup_path {
        Some(p) => p.clone(),
        None => default_cgroup_path().context(
            "no cgroup v2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified: pass --cgroup-path, \
             or --socket-lb off (host-network clients then do not reach Services)",
        )?,
    };
    datapath.load_sock().context("loading the socket load balancing programs")?;
    datapath
        .attach_sock(&cgroup)
        .with_context(|| format!("attaching socket load balancing to {} (--cgroup-path)", cgroup.display()))?;
    tracing::info!(
        mode = cfg.socket_lb.name(),
        cgroup = %cgroup.display(),
        netns_cookie,
        "socket load balancing attached"
    );
    Ok(())
}

impl Dataplane for BpfDataplane {
    fn execute(&mut self, plan: &Plan, applied: &mut Applied) -> ExecReport {
        self.datapath.execute(plan, applied)
    }

    fn interfaces(&mut self) -> io::Result<Interfaces> {
        Interfaces::scan()
    }

    fn attach(&mut self, ifs: &Interfaces, pods: &BTreeSet<u32>, external: &Selected) -> Attached {
        let dp = &mut self.datapath;
        let present = ifs.names();
        dp.forget_missing(&present);
        let errors = &mut self.attach_errors;
        errors.retain(|(idx, _), _| present.contains_key(idx));
        let mut report = |idx: u32, name: &str, is_external: bool, r: crate::datapath::Result<()>| match r {
            Ok(()) => {
                errors.remove(&(idx, is_external));
                let what = if is_external { "external device" } else { "pod device" };
                tracing::info!(device = %name, ifindex = idx, "programs attached to {what}");
            }
            // The device may vanish between listing and attaching; try again next tick.
            Err(e) => {
                let msg = e.to_string();
                if errors.get(&(idx, is_external)) != Some(&msg) {
                    let what = if is_external { "external device" } else { "pod device" };
                    tracing::warn!(device = %name, error = %msg, "attaching to {what} failed; retrying on every tick");
                    errors.insert((idx, is_external), msg);
                }
            }
        };

        // Devices that are no longer external (another --devices, or --devices none).
        let selected: BTreeMap<u32, String> =
            external.devices.iter().map(|(i, d)| (*i, d.name.clone())).collect();
        if external.authoritative && self.last_external.as_ref() != Some(&selected) {
            for (idx, name) in dp.pinned_external() {
                if selected.get(&idx) != Some(&name) {
                    tracing::info!(device = %name, ifindex = idx, "no longer an external device: detaching");
                    dp.detach_external(idx, &name);
                }
            }
            self.last_external = Some(selected);
        }
        for (idx, dev) in &external.devices {
            if !dp.external().contains_key(idx) {
                let r = dp.attach_external(&dev.name);
                report(*idx, &dev.name, true, r);
            }
        }
        for idx in pods {
            let Some(name) = present.get(idx) else { continue };
            if !dp.attached().contains_key(idx) {
                let r = dp.attach(name);
                report(*idx, name, false, r);
            }
        }

        // DEVICES: the attached external devices and their addresses.
        let want: BTreeMap<u32, Option<Ipv4Addr>> = external
            .devices
            .iter()
            .filter(|(idx, _)| dp.external().contains_key(idx))
            .map(|(idx, d)| (*idx, d.addr))
            .collect();
        if self.devices_written.as_ref() != Some(&want) {
            match dp.sync_devices_map(&want) {
                Ok(()) => {
                    self.devices_written = Some(want);
                    self.devices_error = None;
                }
                Err(e) => {
                    let msg = e.to_string();
                    if self.devices_error.as_ref() != Some(&msg) {
                        tracing::warn!(error = %msg, "writing the DEVICES map failed; retrying on every tick");
                        self.devices_error = Some(msg);
                    }
                    self.devices_written = None;
                }
            }
        }
        // After an upgrade: the old build's map pins go once its programs left every link.
        dp.finish_upgrade();
        Attached { pods: dp.attached().len(), external: dp.external().len() }
    }

    fn packet_stats(&self) -> Option<Vec<(Stat, u64)>> {
        self.maps.stats().ok()
    }

    fn svc_stats(&self, upto: u32) -> Option<Vec<lb_common::SvcStats>> {
        self.maps.svc.as_ref()?.stats(Some(upto)).ok()
    }

    fn sweep_deadline(&self) -> Instant {
        self.ct_gc.deadline()
    }

    fn sweep_step(&mut self, applied: &Applied) -> Option<io::Result<SweepReport>> {
        self.ct_gc.step(&|id| ct_gc::affinity_timeout(applied, id))
    }
}
