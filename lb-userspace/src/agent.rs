//! The agent: source events -> cluster state -> desired state -> planned map ops -> datapath.
//!
//! One task owns the datapath and the state, so there is no locking on the hot control path.
//! Events are coalesced by draining whatever is already queued (no sleep), so a single endpoint
//! change reaches the maps within milliseconds while a burst becomes one plan.
//! On start the maps are read back (never flushed): the first plan after the source's first full
//! sync only writes what differs, so a restart disturbs no established flow.
//! The same loop sweeps expired conntrack entries ([`crate::ct_gc`]) in short slices between
//! events.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lb_model::{
    diff, Applied, ClusterState, Config as ModelConfig, DesiredState, Frontend, Problem, SourceEvent,
};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::ct_gc::{CtGc, GcConfig};
use crate::datapath::{Datapath, LoadOptions, MapSizes, PinnedMaps};
use crate::metrics::{KindLabel, Metrics, ReasonLabel};

/// Where the agent gets the cluster from.
pub enum Source {
    Manifests(PathBuf),
    /// The Kubernetes source: its events, and the observer through which it reports skipped
    /// objects (wired to the agent's metrics once they exist).
    Kubernetes { rx: mpsc::Receiver<SourceEvent>, observer: std::sync::Arc<ProblemObserver> },
}

/// Receives problems and API errors from the Kubernetes source; counts them once the agent's
/// metrics are set.
#[derive(Default)]
pub struct ProblemObserver {
    metrics: std::sync::OnceLock<Metrics>,
}

impl lb_kube::Observer for ProblemObserver {
    fn problem(&self, p: &Problem) {
        if let Some(m) = self.metrics.get() {
            m.invalid_objects.get_or_create(&KindLabel { kind: p.kind.to_string() }).inc();
        }
    }
    fn watch_error(&self, kind: &'static str, _e: &kube::runtime::watcher::Error) {
        if let Some(m) = self.metrics.get() {
            m.api_errors.get_or_create(&KindLabel { kind: kind.to_string() }).inc();
        }
    }
}

pub struct AgentConfig {
    pub pin_path: PathBuf,
    pub pod_devices: Vec<glob::Pattern>,
    pub metrics_addr: Option<SocketAddr>,
    pub model: ModelConfig,
    pub map_sizes: MapSizes,
    /// Service CIDR: unallocated addresses in it are refused (None: no such refusal).
    pub service_cidr: Option<(std::net::Ipv4Addr, u8)>,
    /// Conntrack lifetimes (a load-time global of the eBPF programs).
    pub ct_timeouts: lb_common::CtTimeouts,
    /// Conntrack sweeper settings.
    pub ct_gc: GcConfig,
    /// How often to look for new pod devices and retry failed frontends.
    pub tick: Duration,
}

/// Log a skipped object and count it.
pub fn report_problem(metrics: &Metrics, p: &Problem) {
    tracing::warn!(object = %p.object, kind = p.kind, reason = %p.reason, "skipping invalid input");
    metrics.invalid_objects.get_or_create(&KindLabel { kind: p.kind.to_string() }).inc();
}

pub async fn run(cfg: AgentConfig, source: Source) -> anyhow::Result<()> {
    let (metrics, registry) = Metrics::new();
    let opts = LoadOptions {
        sizes: cfg.map_sizes.clone(),
        service_cidr: cfg.service_cidr,
        ct_timeouts: cfg.ct_timeouts,
    };
    let mut dp = Datapath::open_with_options(&cfg.pin_path, &opts)
        .with_context(|| format!("opening the datapath at {}", cfg.pin_path.display()))?;
    let mut applied = dp.read_applied().context("reading the pinned maps back")?;
    tracing::info!(
        pin_path = %cfg.pin_path.display(),
        frontends = applied.frontends.len(),
        backends = applied.backends.len(),
        "datapath loaded; state restored from pinned maps"
    );
    let stats_maps = PinnedMaps::open(&cfg.pin_path).context("opening pinned maps for stats")?;
    let mut gc = CtGc::open(&cfg.pin_path, cfg.ct_gc.clone()).context("opening the conntrack maps for the sweeper")?;

    if let Some(addr) = cfg.metrics_addr {
        let (m, r) = (metrics.clone(), registry);
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, m, r).await {
                tracing::error!(error = %format!("{e:#}"), "metrics server failed");
            }
        });
    }

    let mut rx = match source {
        Source::Kubernetes { rx, observer } => {
            let _ = observer.metrics.set(metrics.clone());
            rx
        }
        Source::Manifests(dir) => {
            let (tx, rx) = mpsc::channel(1024);
            let m = metrics.clone();
            tokio::spawn(async move {
                let on_problem = move |p: &Problem| report_problem(&m, p);
                if let Err(e) = crate::source::manifests::run(dir, tx, on_problem).await {
                    tracing::error!(error = %format!("{e:#}"), "manifests source stopped");
                }
            });
            rx
        }
    };

    let mut state = ClusterState::default();
    let mut desired = DesiredState::default();
    let mut loop_state = LoopState::default();
    let mut tick = tokio::time::interval(cfg.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    attach_devices(&mut dp, &cfg.pod_devices, &metrics);

    loop {
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else {
                    tracing::warn!("source closed; keeping the datapath as it is");
                    break;
                };
                let started = Instant::now();
                let mut changes = lb_model::state::Changes::default();
                let mut absorb = |ev: SourceEvent, changes: &mut lb_model::state::Changes| {
                    metrics.source_events.inc();
                    let c = state.apply(ev);
                    for p in &c.problems {
                        report_problem(&metrics, p);
                    }
                    changes.all |= c.all;
                    changes.services.extend(c.services);
                };
                absorb(ev, &mut changes);
                // Coalesce: take everything already queued, without waiting.
                while let Ok(ev) = rx.try_recv() {
                    absorb(ev, &mut changes);
                }
                if !state.synced {
                    continue; // Never prune (or half-apply) before every kind has been listed once.
                }
                let full = !loop_state.synced_once || changes.all;
                reconcile(&mut dp, &mut applied, &mut desired, &state, &cfg, &metrics, &mut loop_state, full, &changes.services, started);
                if !loop_state.synced_once {
                    loop_state.synced_once = true;
                    // The initial parse and plan peak far above the steady state; hand the freed
                    // pages back to the OS (glibc keeps them otherwise).
                    // SAFETY: malloc_trim only releases free heap memory.
                    #[cfg(target_env = "gnu")]
                    unsafe {
                        libc::malloc_trim(0);
                    }
                    metrics.ready.store(true, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(
                        frontends = applied.frontends.len(),
                        backends = applied.backends.len(),
                        "agent ready"
                    );
                }
            }
            _ = tokio::time::sleep_until(gc.deadline().into()) => {
                // At most one slice (a few ms) per turn: events are handled between slices.
                match gc.step(&|id| crate::ct_gc::affinity_timeout(&applied, id)) {
                    None => {}
                    Some(Ok(report)) => metrics.observe_ct_sweep(&report),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "conntrack sweep failed; retrying after the interval");
                        metrics.conntrack_gc_errors.inc();
                    }
                }
            }
            _ = tick.tick() => {
                metrics.beat();
                attach_devices(&mut dp, &cfg.pod_devices, &metrics);
                update_packet_stats(&stats_maps, &metrics, &mut loop_state.last_stats);
                if loop_state.synced_once && !loop_state.retry.is_empty() {
                    let touched = std::mem::take(&mut loop_state.retry);
                    tracing::info!(frontends = touched.len(), "retrying frontends that failed to apply");
                    let plan = diff::plan(&applied, &desired, &touched);
                    execute(&mut dp, &mut applied, &plan, &metrics, &mut loop_state, Instant::now());
                }
            }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: exiting; programs stay attached, maps stay pinned"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: exiting; programs stay attached, maps stay pinned"); break; }
        }
    }
    Ok(())
}

#[derive(Default)]
struct LoopState {
    synced_once: bool,
    /// Frontends whose plan failed (e.g. map full), retried on the next tick.
    retry: BTreeSet<Frontend>,
    last_stats: BTreeMap<&'static str, u64>,
}

#[allow(clippy::too_many_arguments)]
fn reconcile(
    dp: &mut Datapath,
    applied: &mut Applied,
    desired: &mut DesiredState,
    state: &ClusterState,
    cfg: &AgentConfig,
    metrics: &Metrics,
    loop_state: &mut LoopState,
    full: bool,
    services: &BTreeSet<lb_model::SvcKey>,
    started: Instant,
) {
    let mut touched: BTreeSet<Frontend> = std::mem::take(&mut loop_state.retry);
    if full {
        let (d, problems) = DesiredState::rebuild(state, &cfg.model);
        for p in &problems {
            report_problem(metrics, p);
        }
        *desired = d;
        touched.extend(diff::all_frontends(applied, desired));
    } else {
        for key in services {
            let (t, problems) = desired.update_service(state, key, &cfg.model);
            for p in &problems {
                report_problem(metrics, p);
            }
            touched.extend(t);
        }
    }
    let plan = diff::plan(applied, desired, &touched);
    execute(dp, applied, &plan, metrics, loop_state, started);
}

fn execute(
    dp: &mut Datapath,
    applied: &mut Applied,
    plan: &lb_model::Plan,
    metrics: &Metrics,
    loop_state: &mut LoopState,
    started: Instant,
) {
    if plan.is_empty() {
        return;
    }
    let report = dp.execute(plan, applied);
    let elapsed = started.elapsed();
    metrics.syncs.inc();
    metrics.sync_latency.observe(elapsed.as_secs_f64());
    metrics.map_ops.inc_by(report.ops_ok as u64);
    metrics.frontends.set(applied.frontends.len() as i64);
    metrics.backends.set(applied.backends.len() as i64);
    for e in &report.prepare_failed {
        tracing::error!(error = %e, "map write failed (is a map full?)");
        metrics.map_op_errors.get_or_create(&KindLabel { kind: "prepare".into() }).inc();
    }
    for (fe, e) in &report.failed {
        tracing::error!(frontend = %fe, error = %e, "frontend not updated; it keeps its previous state and will be retried");
        metrics.map_op_errors.get_or_create(&KindLabel { kind: "frontend".into() }).inc();
        loop_state.retry.insert(*fe);
    }
    tracing::info!(
        ops = report.ops_ok,
        frontends = applied.frontends.len(),
        backends = applied.backends.len(),
        micros = elapsed.as_micros() as u64,
        "maps updated"
    );
}

/// Attach to every present device matching the globs; forget vanished ones.
fn attach_devices(dp: &mut Datapath, globs: &[glob::Pattern], metrics: &Metrics) {
    let present: BTreeMap<u32, String> = match nix::net::if_::if_nameindex() {
        Ok(ifs) => ifs
            .iter()
            .map(|i| (i.index(), i.name().to_string_lossy().into_owned()))
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "listing interfaces failed");
            return;
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
    metrics.devices.set(dp.attached().len() as i64);
}

/// Turn the per-CPU STATS counters into Prometheus counters (by delta).
fn update_packet_stats(maps: &PinnedMaps, metrics: &Metrics, last: &mut BTreeMap<&'static str, u64>) {
    let Ok(stats) = maps.stats() else { return };
    for (stat, v) in stats {
        let prev = last.insert(stat.name(), v).unwrap_or(0);
        if v > prev {
            metrics
                .datapath_packets
                .get_or_create(&ReasonLabel { reason: stat.name().to_string() })
                .inc_by(v - prev);
        }
    }
}
