//! The agent: source events -> cluster state -> desired state -> planned map ops -> datapath.
//!
//! ```text
//! source::start ──AgentEvent──> Agent::on_events ── ClusterState::apply, then plan + execute
//! tick (250 ms) ──────────────> Agent::on_tick   ── device scan (pod and external devices, node
//!                                                   addresses), packet counters, retries
//! sweep deadline ─────────────> Agent::on_sweep  ── one slice of the conntrack sweep
//! ```
//!
//! The node's addresses (NodePort frontends) are the Node object's (Kubernetes source) merged with
//! the IPv4 addresses of the external devices, found by the device scan; a change of either
//! re-plans every frontend. After every change the healthCheckNodePort listeners
//! ([`crate::healthcheck`]) are brought up to date with the local endpoint counts.
//!
//! One task owns the [`Agent`] (state and datapath), so there is no locking on the hot control
//! path. Events are coalesced by draining whatever is already queued (no sleep), so a single
//! endpoint change reaches the maps within milliseconds while a burst becomes one plan.
//! On start the maps are read back (never flushed), and nothing is planned before the source's
//! first full sync: the first plan only writes what differs, so a restart disturbs no established
//! flow. The conntrack sweep runs in short slices between events.

mod dataplane;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use lb_model::{
    planner, Applied, Changes, ClusterState, Config as ModelConfig, DesiredState, Frontend, NodeInfo, Problem,
    SourceEvent, SvcKey,
};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

pub use self::dataplane::{Attached, BpfDataplane, Dataplane};
use crate::ct_gc::GcConfig;
use crate::datapath::MapSizes;
use crate::devices::{DeviceSelection, ExternalDevices, XdpMode};
use crate::healthcheck::HealthServers;
use crate::metrics::Metrics;
pub use crate::source::AgentEvent;

pub struct AgentConfig {
    pub pin_path: PathBuf,
    pub pod_devices: Vec<glob::Pattern>,
    /// External devices (`--devices`): where traffic from outside the node is translated.
    pub devices: DeviceSelection,
    /// How `from_net` runs on the external devices (`--xdp-mode`).
    pub xdp_mode: XdpMode,
    /// This node's name (`--node-name`), for a source that does not name the node itself (the
    /// manifests directory): local endpoints are those with this nodeName. The Kubernetes
    /// source's Node object takes precedence.
    pub node_name: Option<String>,
    /// Where the healthCheckNodePort servers listen (the agent: 0.0.0.0); None: no servers.
    pub health_check_bind: Option<IpAddr>,
    pub metrics_addr: Option<SocketAddr>,
    /// kube-proxy's health port (`--healthz-addr`, [`crate::proxyhealth`]); None: not served.
    pub healthz_addr: Option<SocketAddr>,
    /// How long a change may wait for the maps before the health port says 503
    /// (`--healthz-timeout`).
    pub healthz_timeout: Duration,
    pub model: ModelConfig,
    pub map_sizes: MapSizes,
    /// Service CIDR: unallocated addresses in it are refused (None: no such refusal).
    pub service_cidr: Option<(std::net::Ipv4Addr, u8)>,
    /// Conntrack lifetimes (a load-time global of the eBPF programs).
    pub ct_timeouts: lb_common::CtTimeouts,
    /// SNAT source ports of flows from outside to backends on other nodes (a load-time global).
    pub snat_ports: lb_common::PortRange,
    /// Entries per Maglev table (`--maglev-table-size`, a prime; a load-time global). The
    /// number of tables is `map_sizes.maglev_tables`.
    pub maglev_m: u32,
    /// Conntrack sweeper settings.
    pub ct_gc: GcConfig,
    /// How often to look for new pod devices and retry failed frontends.
    pub tick: Duration,
    /// Socket load balancing (`--socket-lb`): which sockets the cgroup hooks translate.
    pub socket_lb: crate::datapath::SocketLb,
    /// The cgroup v2 directory the socket-LB programs attach to (`--cgroup-path`); None: the
    /// cgroup v2 root ([`crate::datapath::default_cgroup_path`]).
    pub cgroup_path: Option<PathBuf>,
}

/// Open the datapath, serve the metrics, and run the agent on `events` until the source closes
/// the channel or a SIGTERM / SIGINT arrives.
pub async fn run(config: AgentConfig, events: mpsc::Receiver<AgentEvent>) -> anyhow::Result<()> {
    let (metrics, registry) = Metrics::new();
    let agent = Agent::open(config, metrics.clone())?;
    if let Some(addr) = agent.config.healthz_addr {
        let health = agent.proxy_health().clone();
        tokio::spawn(async move {
            if let Err(e) = crate::proxyhealth::serve(addr, health).await {
                tracing::error!(error = %format!("{e:#}"), "kube-proxy health port (--healthz-addr) failed");
            }
        });
    }
    if let Some(addr) = agent.config.metrics_addr {
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, metrics, registry).await {
                tracing::error!(error = %format!("{e:#}"), "metrics server failed");
            }
        });
    }
    agent.run(events).await
}

/// The control loop's state: the cluster as the source described it, the frontends the maps
/// should hold, what they hold, and the kernel side they are written through.
pub struct Agent<D = BpfDataplane> {
    config: AgentConfig,
    metrics: Metrics,
    /// The cluster as the source described it.
    state: ClusterState,
    /// The frontends the maps should hold (kube-proxy semantics).
    desired: DesiredState,
    /// What the maps hold: read back at start, then updated by every op that succeeded.
    applied: Applied,
    dataplane: D,
    /// The first full sync has been applied: pruning and readiness start here.
    synced_once: bool,
    /// Frontends whose plan failed (e.g. map full), retried on the next tick.
    retry: BTreeSet<Frontend>,
    /// The STATS values last seen, to turn them into counter increments.
    last_stats: BTreeMap<&'static str, u64>,
    /// The per-Service counters last seen, by Service port id, and when to read them next.
    last_svc_stats: BTreeMap<u32, crate::metrics::SvcSeen>,
    svc_stats_due: Instant,
    /// Which devices are external (with its memory of default-route devices).
    external: ExternalDevices,
    /// This node as the source described it (Kubernetes: its Node object), before merging.
    source_node: NodeInfo,
    /// The IPv4 addresses of the external devices, as of the last device scan (sorted).
    device_addrs: Vec<Ipv4Addr>,
    /// healthCheckNodePort listeners (None: disabled).
    health: Option<HealthServers>,
    /// Where the last sync's time went (logged once, at the first sync).
    phases: Phases,
    /// kube-proxy's health state (served on `--healthz-addr`).
    proxy_health: crate::proxyhealth::ProxyHealth,
}

/// The parts of one sync, timed.
#[derive(Clone, Copy, Debug, Default)]
struct Phases {
    /// Applying the events to the cluster state.
    absorb: Duration,
    /// Rebuilding (or updating) the desired frontends.
    model: Duration,
    /// Planning the map operations.
    plan: Duration,
    /// Writing them (`Dataplane::execute`).
    write: Duration,
}

impl Agent<BpfDataplane> {
    /// Load the programs and read the pinned maps back (see [`BpfDataplane::open`]).
    pub fn open(config: AgentConfig, metrics: Metrics) -> anyhow::Result<Self> {
        let (dataplane, applied) = BpfDataplane::open(&config)?;
        Ok(Agent::new(config, metrics, dataplane, applied))
    }
}

impl<D: Dataplane> Agent<D> {
    /// An agent over `dataplane`, whose maps hold `applied`.
    pub fn new(config: AgentConfig, metrics: Metrics, dataplane: D, applied: Applied) -> Self {
        let external = ExternalDevices::new(config.devices.clone());
        let health = config.health_check_bind.map(HealthServers::new);
        let proxy_health = crate::proxyhealth::ProxyHealth::new(config.healthz_timeout);
        let mut agent = Agent {
            config,
            metrics,
            state: ClusterState::default(),
            desired: DesiredState::default(),
            applied,
            dataplane,
            synced_once: false,
            retry: BTreeSet::new(),
            last_stats: BTreeMap::new(),
            last_svc_stats: BTreeMap::new(),
            svc_stats_due: Instant::now(),
            external,
            source_node: NodeInfo::default(),
            device_addrs: Vec::new(),
            health,
            phases: Phases::default(),
            proxy_health,
        };
        // The node name of the flags, until a source says otherwise.
        agent.state.apply(SourceEvent::Node(agent.merged_node()));
        agent
    }

    /// This node as the model sees it: the source's name (else `--node-name`), and the source's
    /// addresses together with the external devices' (sorted, deduplicated).
    fn merged_node(&self) -> NodeInfo {
        let name = if self.source_node.name.is_empty() {
            self.config.node_name.clone().unwrap_or_default()
        } else {
            self.source_node.name.clone()
        };
        let mut addresses: Vec<Ipv4Addr> =
            self.source_node.addresses.iter().chain(&self.device_addrs).copied().collect();
        addresses.sort();
        addresses.dedup();
        NodeInfo { name, addresses }
    }

    /// This node as the model sees it now.
    pub fn node(&self) -> &NodeInfo {
        &self.state.node
    }

    /// What the maps hold.
    pub fn applied(&self) -> &Applied {
        &self.applied
    }

    pub fn dataplane(&self) -> &D {
        &self.dataplane
    }

    /// kube-proxy's health state: changes waiting for the maps, the last full sync.
    pub fn proxy_health(&self) -> &crate::proxyhealth::ProxyHealth {
        &self.proxy_health
    }

    /// The first full sync has been applied (`/readyz` says ready).
    pub fn is_ready(&self) -> bool {
        self.synced_once
    }

    /// The control loop: events (drained and coalesced), ticks and sweep slices, until the source
    /// closes or a signal arrives. Exiting leaves the programs attached and the maps pinned.
    pub async fn run(mut self, mut events: mpsc::Receiver<AgentEvent>) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(self.config.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        self.scan_devices();
        loop {
            tokio::select! {
                ev = events.recv() => {
                    let Some(ev) = ev else {
                        tracing::warn!("source closed; keeping the datapath as it is");
                        break;
                    };
                    // Coalesce: take everything already queued, without waiting.
                    let queued = std::iter::from_fn(|| events.try_recv().ok());
                    self.on_events(std::iter::once(ev).chain(queued));
                }
                _ = tokio::time::sleep_until(self.dataplane.sweep_deadline().into()) => self.on_sweep(),
                _ = tick.tick() => self.on_tick(),
                _ = sigterm.recv() => { tracing::info!("SIGTERM: exiting; programs stay attached, maps stay pinned"); break; }
                _ = sigint.recv() => { tracing::info!("SIGINT: exiting; programs stay attached, maps stay pinned"); break; }
            }
        }
        Ok(())
    }

    /// Take in a batch of events and bring the maps up to date with one plan. Nothing is planned
    /// before the source's first full sync (so nothing is pruned that was merely not listed yet);
    /// the first plan after it covers every frontend.
    pub fn on_events(&mut self, events: impl IntoIterator<Item = AgentEvent>) {
        let started = Instant::now();
        let mut changes = Changes::default();
        let mut cluster_changed = false;
        for ev in events {
            match ev {
                AgentEvent::Source(SourceEvent::Node(node)) => {
                    // The Node object's addresses are merged with the devices' before the model
                    // sees them.
                    self.source_node = node;
                    let merged = self.merged_node();
                    self.metrics.source_events.inc();
                    cluster_changed = true;
                    changes.all |= self.state.apply(SourceEvent::Node(merged)).all;
                }
                AgentEvent::Source(ev) => {
                    self.metrics.source_events.inc();
                    cluster_changed = true;
                    let c = self.state.apply(ev);
                    c.problems.iter().for_each(|p| self.report_problem(p));
                    changes.all |= c.all;
                    changes.services.extend(c.services);
                }
                AgentEvent::Problem(p) => self.report_problem(&p),
                AgentEvent::ApiError { kind } => self.metrics.api_error(kind),
                AgentEvent::NodeEligible(e) => self.proxy_health.set_node_eligible(e),
            }
        }
        if !cluster_changed {
            return;
        }
        // Pending until a plan put it (and everything else) into the maps.
        self.proxy_health.queued();
        if !self.state.synced {
            return;
        }
        let full = !self.synced_once || changes.all;
        self.phases = Phases { absorb: started.elapsed(), ..Phases::default() };
        self.reconcile(full, &changes.services, started);
        if !self.synced_once {
            self.first_sync_done();
        }
    }

    /// [`Agent::on_events`] for one event.
    pub fn on_event(&mut self, ev: AgentEvent) {
        self.on_events([ev]);
    }

    /// The periodic work: liveness, the device scan (new pod and external devices, node
    /// addresses), packet counters, the frontends whose last plan failed, and health check
    /// ports that failed to bind.
    pub fn on_tick(&mut self) {
        self.metrics.beat();
        self.proxy_health.beat();
        self.scan_devices();
        if self.health.as_ref().is_some_and(|h| h.failing().next().is_some()) {
            self.update_health();
        }
        if let Some(stats) = self.dataplane.packet_stats() {
            self.metrics.observe_packet_stats(&stats, &mut self.last_stats);
        }
        self.observe_svc_stats();
        if self.synced_once && !self.retry.is_empty() {
            let touched = std::mem::take(&mut self.retry);
            tracing::info!(frontends = touched.len(), "retrying frontends that failed to apply");
            let plan = planner::plan(&self.applied, &self.desired, &touched);
            self.execute(&plan, Instant::now());
            self.note_sync();
        }
    }

    /// One slice of the conntrack sweep (events are handled between slices).
    pub fn on_sweep(&mut self) {
        match self.dataplane.sweep_step(&self.applied) {
            None => {}
            Some(Ok(report)) => {
                self.metrics.observe_ct_sweep(&report);
                self.sweep_filter(&report);
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "conntrack sweep failed; retrying after the interval");
                self.metrics.conntrack_gc_errors.inc();
            }
        }
    }

    /// After a complete conntrack sweep: the frontend pre-filter keeps the bits of every
    /// frontend (desired or in the maps) and of every live flow's original destination, the
    /// reply pre-filter those of every backend port and every live flow's backend port; each
    /// clears the rest once two sweeps agree (`lb_model::fefilter`); the clears go out now.
    fn sweep_filter(&mut self, report: &crate::ct_gc::SweepReport) {
        let needed = self
            .desired
            .frontends
            .keys()
            .chain(self.applied.frontends.keys())
            .map(|fe| fe.addr)
            .chain(report.destinations.iter().map(|a| Ipv4Addr::from(a.to_ne_bytes())))
            .collect::<Vec<_>>();
        self.applied.filter.sweep_done(needed);
        // The reply pre-filter keeps every backend's port (desired or in the maps) and every
        // live flow's backend port (the source port of its reply entry).
        let ports = self
            .desired
            .frontends
            .values()
            .flat_map(|f| f.backends.iter().map(|b| u32::from(b.port)))
            .chain(self.applied.backends.values().map(|(b, _)| u32::from(b.port)))
            .chain(report.live_backend_ports().map(u32::from));
        self.applied.port_filter.sweep_done_bits(ports);
        let n = self.applied.filter.pending() + self.applied.port_filter.pending();
        if n > 0 {
            self.dataplane.execute(&lb_model::Plan::default(), &mut self.applied);
            let left = self.applied.filter.pending() + self.applied.port_filter.pending();
            tracing::debug!(words = n, left, "pre-filter bits cleared");
        }
    }

    /// Log a skipped object and count it.
    fn report_problem(&self, p: &Problem) {
        tracing::warn!(object = %p.object, kind = p.kind, reason = %p.reason, "skipping invalid input");
        self.metrics.invalid_object(p.kind);
    }

    /// Scan the interfaces: attach the programs to new pod and external devices, detach
    /// devices that are no longer external, and follow the external devices' addresses (a change
    /// re-plans every frontend, so NodePort frontends follow).
    fn scan_devices(&mut self) {
        let ifs = match self.dataplane.interfaces() {
            Ok(ifs) => ifs,
            Err(e) => {
                tracing::warn!(error = %e, "listing interfaces failed");
                return;
            }
        };
        let selected = self.external.select(&ifs);
        // A device is a pod device or an external one, never both.
        let pods: BTreeSet<u32> = ifs
            .links
            .iter()
            .filter(|(idx, l)| {
                !selected.devices.contains_key(idx) && self.config.pod_devices.iter().any(|g| g.matches(&l.name))
            })
            .map(|(idx, _)| *idx)
            .collect();
        let n = self.dataplane.attach(&ifs, &pods, &selected);
        self.metrics.devices.set(n.pods as i64);
        self.metrics.external_devices.set(n.external as i64);
        if selected.addrs != self.device_addrs {
            tracing::info!(addresses = ?selected.addrs, "addresses of the external devices changed");
            self.device_addrs = selected.addrs;
            self.node_changed();
        }
    }

    /// The device addresses changed: give the model the merged node and re-plan if it differs.
    fn node_changed(&mut self) {
        let merged = self.merged_node();
        if merged == self.state.node {
            return;
        }
        tracing::info!(node = %merged.name, addresses = ?merged.addresses, "node addresses changed");
        let started = Instant::now();
        let changes = self.state.apply(SourceEvent::Node(merged));
        if changes.all && self.synced_once {
            self.reconcile(true, &BTreeSet::new(), started);
        }
    }

    /// Bring the healthCheckNodePort listeners up to date with the cluster (after the first
    /// full sync only: before it, endpoint counts are incomplete).
    fn update_health(&mut self) {
        let Some(health) = self.health.as_mut() else { return };
        if !self.synced_once {
            return;
        }
        let want = lb_model::health::health_checks_for(&self.state, &self.config.model);
        for (port, e) in health.update(&want) {
            tracing::warn!(port, error = %e, "cannot listen on a healthCheckNodePort; retrying on every tick");
            self.metrics.health_check_bind_errors.inc();
        }
        self.metrics.health_check_servers.set(health.listening().count() as i64);
    }

    /// The healthCheckNodePort listeners (None: disabled).
    pub fn health_servers(&self) -> Option<&HealthServers> {
        self.health.as_ref()
    }

    /// Recompute the desired frontends (all of them, or those of `services`), then plan and
    /// execute the difference, together with the frontends waiting for a retry.
    fn reconcile(&mut self, full: bool, services: &BTreeSet<SvcKey>, started: Instant) {
        let mut touched: BTreeSet<Frontend> = std::mem::take(&mut self.retry);
        let model_started = Instant::now();
        if full {
            let (desired, problems) = DesiredState::rebuild(&self.state, &self.config.model);
            problems.iter().for_each(|p| self.report_problem(p));
            self.desired = desired;
            touched.extend(planner::all_frontends(&self.applied, &self.desired));
        } else {
            for key in services {
                let (t, problems) = self.desired.update_service(&self.state, key, &self.config.model);
                problems.iter().for_each(|p| self.report_problem(p));
                touched.extend(t);
            }
        }
        self.phases.model = model_started.elapsed();
        let plan_started = Instant::now();
        let plan = planner::plan(&self.applied, &self.desired, &touched);
        self.phases.plan = plan_started.elapsed();
        self.execute(&plan, started);
        self.note_sync();
        self.update_health();
    }

    /// Tell the health port whether the maps hold everything: frontends that failed to apply
    /// (e.g. a full map) keep a change pending until a retry succeeds.
    fn note_sync(&self) {
        if self.retry.is_empty() {
            self.proxy_health.updated();
        } else {
            self.proxy_health.queued();
        }
    }

    /// The per-Service counters into metrics, once a second (one batch read of the ids in
    /// use: the map holds 64 bytes per id and CPU).
    fn observe_svc_stats(&mut self) {
        let now = Instant::now();
        if now < self.svc_stats_due {
            return;
        }
        self.svc_stats_due = now + Duration::from_secs(1);
        let live = crate::metrics::live_service_ports(&self.applied);
        let upto = live.keys().next_back().copied().unwrap_or(0);
        if live.is_empty() && self.last_svc_stats.is_empty() {
            return;
        }
        if let Some(stats) = self.dataplane.svc_stats(upto) {
            self.metrics.observe_svc_stats(&stats, &live, &mut self.last_svc_stats);
        }
    }

    /// Write `plan`; frontends that failed are retried on the next tick.
    fn execute(&mut self, plan: &lb_model::Plan, started: Instant) {
        if !plan.svc_ids_exhausted.is_empty() {
            tracing::warn!(
                service_ports = plan.svc_ids_exhausted.len(),
                first = %plan.svc_ids_exhausted[0],
                "no free Service port id (raise --service-ports-max): these get no name and no per-Service counters"
            );
            self.metrics.service_port_ids_exhausted.inc_by(plan.svc_ids_exhausted.len() as u64);
        }
        if plan.is_empty() {
            self.phases.write = Duration::ZERO;
            return;
        }
        let write_started = Instant::now();
        let report = self.dataplane.execute(plan, &mut self.applied);
        self.phases.write = write_started.elapsed();
        let elapsed = started.elapsed();
        let m = &self.metrics;
        m.syncs.inc();
        m.sync_latency.observe(elapsed.as_secs_f64());
        m.map_ops.inc_by(report.ops_ok as u64);
        m.frontends.set(self.applied.frontends.len() as i64);
        m.backends.set(self.applied.backends.len() as i64);
        for e in &report.prepare_failed {
            tracing::error!(error = %e, "map write failed (is a map full?)");
            m.map_op_error("prepare");
        }
        for (fe, e) in &report.failed {
            tracing::error!(frontend = %fe, error = %e, "frontend not updated; it keeps its previous state and will be retried");
            m.map_op_error("frontend");
            self.retry.insert(*fe);
        }
        tracing::info!(
            ops = report.ops_ok,
            frontends = self.applied.frontends.len(),
            backends = self.applied.backends.len(),
            // The map writes alone (`Datapath::execute`); the whole sync (absorbing events,
            // rebuild, plan, writes) is `sync_micros`. The bench parses both.
            micros = self.phases.write.as_micros() as u64,
            sync_micros = elapsed.as_micros() as u64,
            "maps updated"
        );
    }

    /// The first full sync is in the maps: the agent is ready.
    fn first_sync_done(&mut self) {
        self.synced_once = true;
        self.proxy_health.set_synced();
        // Where the time from spawn to ready went (the bench and `docs/bench` read it): the
        // source's first read (manifests: reading and parsing every file; 0 for the Kubernetes
        // source, whose lists arrive over the network), absorbing it into the cluster state plus
        // the desired-state rebuild, the plan, and the map writes.
        let p = &self.phases;
        tracing::info!(
            parse_micros = crate::source::first_read_micros(),
            model_micros = (p.absorb + p.model).as_micros() as u64,
            plan_micros = p.plan.as_micros() as u64,
            write_micros = p.write.as_micros() as u64,
            "startup phases"
        );
        self.update_health();
        // The initial parse and plan peak far above the steady state; hand the freed pages back
        // to the OS (glibc keeps them otherwise).
        let trim = Instant::now();
        crate::memtrim::release_freed_memory();
        tracing::info!(micros = trim.elapsed().as_micros() as u64, "freed memory returned");
        self.metrics.ready.store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(frontends = self.applied.frontends.len(), backends = self.applied.backends.len(), "agent ready");
    }
}
