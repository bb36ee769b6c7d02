//! Control-plane measurements: programming a large Service set from cold (xlb's agent from spawn
//! to ready, next to iptables-restore on both backends and `nft -f` of the same set), the agent's
//! memory, the same agent restarted on its pins (its read-back of the maps), and the time from
//! one endpoint change to the datapath using it. The agent's own timings come from its log
//! ([`crate::agentlog`]).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use lb_common::{ip4, ip4_from, port, ServiceKey, PROTO_TCP, SCOPE_EXT};
use lb_testkit::NetNs;
use lb_userspace::datapath::PinnedMaps;
use serde::{Deserialize, Serialize};

use crate::agentlog;
use crate::bed::{start_agent, unique_prefix, Bed};
use crate::netfilter::{Installed, NfMode};
use crate::rules::{xlb_dir, ServiceSet, SetSpec, SERVICE_PORT};
use crate::stats::{median, Latency};
use crate::traffic::request;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ColdResults {
    pub services: usize,
    pub endpoints: usize,
    /// xlb: agent spawn to "agent ready" (load + verify programs, read manifests, write maps).
    pub xlb_s: Option<f64>,
    /// xlb: the map writes of the first sync alone (`micros=` of the first `maps updated`
    /// line of an agent that also logs `sync_micros=`; not measured with an older agent).
    pub xlb_apply_s: Option<f64>,
    /// xlb: the whole first sync (`sync_micros=`, or an older agent's `micros=`).
    #[serde(default)]
    pub xlb_sync_s: Option<f64>,
    /// Map operations of the first sync (`ops=`).
    #[serde(default)]
    pub xlb_apply_ops: Option<u64>,
    /// The agent's `startup phases` split of the first sync: (phase, seconds).
    #[serde(default)]
    pub startup_phases: Vec<(String, f64)>,
    pub xlb_rss_mib: Option<f64>,
    /// The same agent restarted on its pins (SIGTERM, start again): spawn to ready.
    #[serde(default)]
    pub restart_s: Option<f64>,
    /// The restarted agent's read-back of the pinned maps (`maps read back micros=`).
    #[serde(default)]
    pub readback_s: Option<f64>,
    /// Frontends and backends it read back.
    #[serde(default)]
    pub readback_frontends: Option<u64>,
    #[serde(default)]
    pub readback_backends: Option<u64>,
    /// The restarted agent's resident memory when ready.
    #[serde(default)]
    pub restart_rss_mib: Option<f64>,
    /// xlb with the Kubernetes source (the DaemonSet's): the same Services and EndpointSlices
    /// listed from the fake API server (lb-fakeapi: real HTTP list and watch, JSON) on the
    /// namespace's loopback; agent spawn to ready.
    #[serde(default)]
    pub kube_s: Option<f64>,
    /// Its map writes of the first sync alone.
    #[serde(default)]
    pub kube_apply_s: Option<f64>,
    /// Its resident memory when ready.
    #[serde(default)]
    pub kube_rss_mib: Option<f64>,
    /// Wall time of the restore / `nft -f`, by mode label (the median of its runs).
    pub netfilter_s: Vec<(String, f64)>,
    /// Every run behind a median: (what, seconds of each run). Single runs are not listed.
    #[serde(default)]
    pub runs: Vec<(String, Vec<f64>)>,
    pub errors: Vec<String>,
}

/// Cold starts of xlb (each source) and of iptables-legacy-restore, the programming target's
/// reference, whose figures are the medians.
pub const COLD_RUNS: usize = 3;

/// The median of `f` over the runs that have it.
fn median_of(runs: &[ColdResults], f: impl Fn(&ColdResults) -> Option<f64>) -> Option<f64> {
    median(&runs.iter().filter_map(f).collect::<Vec<_>>())
}

impl ColdResults {
    /// Records the seconds of each run behind a median (nothing for a single run).
    fn note_runs(&mut self, what: &str, runs: Vec<f64>) {
        if runs.len() > 1 {
            self.runs.push((what.to_string(), runs));
        }
    }

    /// The medians of xlb's cold starts from manifests; the read-back figures of the one
    /// that was restarted on its pins; every run's errors.
    fn absorb_xlb(&mut self, runs: &[ColdResults]) {
        self.xlb_s = median_of(runs, |r| r.xlb_s);
        self.xlb_apply_s = median_of(runs, |r| r.xlb_apply_s);
        self.xlb_sync_s = median_of(runs, |r| r.xlb_sync_s);
        self.xlb_apply_ops = runs.iter().find_map(|r| r.xlb_apply_ops);
        self.xlb_rss_mib = median_of(runs, |r| r.xlb_rss_mib);
        if let Some(first) = runs.first() {
            self.startup_phases = first
                .startup_phases
                .iter()
                .filter_map(|(phase, _)| {
                    let m = median_of(runs, |r| {
                        r.startup_phases.iter().find(|p| &p.0 == phase).map(|p| p.1)
                    })?;
                    Some((phase.clone(), m))
                })
                .collect();
        }
        if let Some(r) = runs.iter().find(|r| r.restart_s.is_some()) {
            self.restart_s = r.restart_s;
            self.restart_rss_mib = r.restart_rss_mib;
            self.readback_s = r.readback_s;
            self.readback_frontends = r.readback_frontends;
            self.readback_backends = r.readback_backends;
        }
        self.note_runs(
            "xlb agent: spawn to ready",
            runs.iter().filter_map(|r| r.xlb_s).collect(),
        );
        self.note_runs(
            "xlb agent: map writes of the first sync",
            runs.iter().filter_map(|r| r.xlb_apply_s).collect(),
        );
        self.errors
            .extend(runs.iter().flat_map(|r| r.errors.clone()));
    }

    /// The medians of xlb's cold starts from the Kubernetes source.
    fn absorb_kube(&mut self, runs: &[ColdResults]) {
        self.kube_s = median_of(runs, |r| r.kube_s);
        self.kube_apply_s = median_of(runs, |r| r.kube_apply_s);
        self.kube_rss_mib = median_of(runs, |r| r.kube_rss_mib);
        self.note_runs(
            "xlb agent, Kubernetes source: spawn to ready",
            runs.iter().filter_map(|r| r.kube_s).collect(),
        );
        self.errors
            .extend(runs.iter().flat_map(|r| r.errors.clone()));
    }

    pub fn netfilter(&self, mode: NfMode) -> Option<f64> {
        self.netfilter_s
            .iter()
            .find(|(m, _)| m == mode.label())
            .map(|(_, s)| *s)
    }
}

/// Program `services` Services with `endpoints_per_service` endpoints each, in every mode, from
/// cold (a fresh namespace each).
pub fn cold(
    services: usize,
    endpoints_per_service: usize,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<ColdResults> {
    let spec = SetSpec {
        services,
        endpoints_per_service,
        target_port: 8080,
        probe_endpoints: (0..endpoints_per_service)
            .map(|k| Ipv4Addr::new(10, 244, 1, 10 + k as u8))
            .collect(),
        probe_extra_ports: vec![],
        external: None,
    };
    let set = ServiceSet::generate(&spec);
    let mut res = ColdResults {
        services,
        endpoints: set.endpoint_count(),
        ..Default::default()
    };

    // A developer's knob for profiling xlb's own cold start: the netfilter modes take ~2 minutes.
    let netfilter_modes: &[NfMode] = if std::env::var_os("XLB_BENCH_COLD_XLB_ONLY").is_some() {
        &[]
    } else {
        &NfMode::ALL
    };
    for &mode in netfilter_modes {
        let text = mode.render(&set);
        // The programming target's reference is timed like xlb, the others once (nft -f of
        // this set takes minutes).
        let repeats = if mode == NfMode::IptablesLegacy {
            COLD_RUNS
        } else {
            1
        };
        let outcome = (0..repeats)
            .map(|_| -> anyhow::Result<f64> {
                let ns = NetNs::create(&format!("{}cold", unique_prefix()))?;
                // Not timed against the cleanup of the run before (see `settle`).
                crate::settle::wait_quiet();
                let installed = Installed::apply(ns.name(), mode, &text)?;
                let took = installed.took.as_secs_f64();
                drop(installed);
                drop(ns);
                crate::interrupt::check()?;
                Ok(took)
            })
            .collect::<anyhow::Result<Vec<f64>>>();
        match outcome {
            Ok(runs) => {
                if let Some(m) = median(&runs) {
                    res.netfilter_s.push((mode.label().to_string(), m));
                }
                res.note_runs(mode.label(), runs);
            }
            Err(e) => res.errors.push(format!("{}: {e:#}", mode.label())),
        }
        crate::interrupt::check()?;
        progress(&format!("cold programming: {}", mode.label()));
    }

    // xlb is timed COLD_RUNS times and its figures are the medians: one cold start on this
    // shared VM varies by 5-10%, as much as the targets' margins. The last run is restarted on
    // its pins.
    let mut xlb_runs = Vec::new();
    for k in 0..COLD_RUNS {
        match xlb_cold_once(&set, k + 1 == COLD_RUNS) {
            Ok(one) => xlb_runs.push(one),
            Err(e) => {
                crate::interrupt::check()?;
                res.errors.push(format!("xlb: {e:#}"));
                break;
            }
        }
    }
    res.absorb_xlb(&xlb_runs);
    progress("cold programming: xlb");
    let mut kube_runs = Vec::new();
    for _ in 0..COLD_RUNS {
        let mut one = ColdResults::default();
        match kube_cold(&set, &mut one) {
            Ok(()) => kube_runs.push(one),
            Err(e) => {
                crate::interrupt::check()?;
                res.errors.push(format!("xlb, Kubernetes source: {e:#}"));
                break;
            }
        }
    }
    res.absorb_kube(&kube_runs);
    progress("cold programming: xlb, Kubernetes source");
    Ok(res)
}

/// One cold start of xlb's agent from the manifests of `set` in a fresh namespace, restarted on
/// its pins afterwards when `restart` (the read-back figures).
fn xlb_cold_once(set: &ServiceSet, restart: bool) -> anyhow::Result<ColdResults> {
    let mut one = ColdResults::default();
    let prefix = unique_prefix();
    let ns = NetNs::create(&format!("{prefix}cold"))?;
    let scratch = tempfile::Builder::new()
        .prefix("xlb-bench-cold-")
        .tempdir()?;
    let dir = scratch.path().join("manifests");
    xlb_dir::write_all(set, &dir)?;
    let pin_root = Path::new(lb_testkit::cluster::BPFFS).join(prefix.trim_end_matches('-'));
    // After the manifests are written (their writeback included): see `settle`.
    crate::settle::wait_quiet();
    let agent = start_agent(
        &ns,
        &dir,
        &pin_root.join("cold"),
        &scratch.path().join("agent.log"),
        Duration::from_secs(600),
        // A bare namespace: no default route, so no external device to look for.
        &[
            "--devices".to_string(),
            "none".to_string(),
            "--service-cidr".to_string(),
            crate::rules::SERVICE_CIDR.to_string(),
        ],
    );
    let mut agent = match agent {
        Ok(a) => a,
        Err(e) => {
            let _ = std::fs::remove_dir(&pin_root);
            return Err(e);
        }
    };
    one.xlb_s = Some(agent.ready_after.as_secs_f64());
    one.xlb_rss_mib = agent.rss_mib();
    let log = agent.log_since_start();
    if let Some(u) = agentlog::first_update(&log) {
        one.xlb_apply_s = u.write_micros.map(secs);
        one.xlb_sync_s = u.sync_micros.map(secs);
        one.xlb_apply_ops = u.ops;
    }
    one.startup_phases = agentlog::startup_phases(&log)
        .into_iter()
        .map(|(k, us)| (k, secs(us)))
        .collect();
    // Restart on the pins, as after an upgrade or a crash: the new agent reads the maps
    // back before it syncs.
    crate::interrupt::check()?;
    if restart {
        match agent.restart() {
            Ok(()) => {
                one.restart_s = Some(agent.ready_after.as_secs_f64());
                one.restart_rss_mib = agent.rss_mib();
                if let Some(rb) = agentlog::read_back(&agent.log_since_start()) {
                    one.readback_s = Some(secs(rb.micros));
                    one.readback_frontends = rb.frontends;
                    one.readback_backends = rb.backends;
                }
            }
            Err(e) => {
                crate::interrupt::check()?;
                one.errors.push(format!("xlb restart on its pins: {e:#}"));
            }
        }
    }
    drop(agent);
    let _ = std::fs::remove_dir(&pin_root);
    Ok(one)
}

/// [`cold`] for xlb with the Kubernetes source: the Service set's objects (the manifests the
/// other run reads, parsed back untimed) are put into the fake API server, which listens on
/// the loopback of a fresh namespace; the agent there lists and watches them with kube-rs, as
/// the DaemonSet does, and is timed from spawn to ready.
fn kube_cold(set: &ServiceSet, res: &mut ColdResults) -> anyhow::Result<()> {
    let scratch = tempfile::Builder::new()
        .prefix("xlb-bench-cold-kube-")
        .tempdir()?;
    let dir = scratch.path().join("manifests");
    xlb_dir::write_all(set, &dir)?;
    let (mut services, mut slices) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)?;
        let parsed = lb_model::yaml_docs::parse(&path.display().to_string(), &text);
        if let Some(p) = parsed.problems.first() {
            bail!("generated manifest {}: {p:?}", path.display());
        }
        services.extend(parsed.services);
        slices.extend(parsed.slices);
    }
    let prefix = unique_prefix();
    let ns = NetNs::create(&format!("{prefix}coldk"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let listener = ns.run(|| std::net::TcpListener::bind("127.0.0.1:0"))??;
    let api = {
        let _g = rt.enter();
        lb_fakeapi::FakeApi::new(listener)?
    };
    let mut node = k8s_openapi::api::core::v1::Node::default();
    node.metadata.name = Some(COLD_NODE.into());
    api.upsert(&node)?;
    for s in &services {
        api.upsert(s)?;
    }
    for s in &slices {
        api.upsert(s)?;
    }
    let kubeconfig = scratch.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let pin_root = Path::new(lb_testkit::cluster::BPFFS).join(prefix.trim_end_matches('-'));
    crate::settle::wait_quiet();
    let agent = start_agent(
        &ns,
        Path::new(""),
        &pin_root.join("cold"),
        &scratch.path().join("agent.log"),
        Duration::from_secs(600),
        &[
            "--kubeconfig".to_string(),
            kubeconfig.display().to_string(),
            "--node-name".to_string(),
            COLD_NODE.to_string(),
            "--devices".to_string(),
            "none".to_string(),
            "--service-cidr".to_string(),
            crate::rules::SERVICE_CIDR.to_string(),
        ],
    );
    let outcome = agent.map(|agent| {
        res.kube_s = Some(agent.ready_after.as_secs_f64());
        res.kube_rss_mib = agent.rss_mib();
        if let Some(u) = agentlog::first_update(&agent.log_since_start()) {
            res.kube_apply_s = u.write_micros.map(secs);
        }
        drop(agent);
    });
    let _ = std::fs::remove_dir(&pin_root);
    rt.block_on(api.stop());
    drop(api);
    outcome
}

/// The node the Kubernetes-source agent of [`kube_cold`] runs as.
const COLD_NODE: &str = "bench-node";

fn secs(micros: u64) -> f64 {
    micros as f64 / 1e6
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ChangeResults {
    pub services: usize,
    /// Manifest rewritten (atomic rename) to the new backend set in the maps.
    pub latency: Latency,
    /// After the last change, a client reached the newly added pod through the Service.
    pub new_backend_served: bool,
}

/// The probe's backends as the pinned maps hold them now.
fn probe_backends(maps: &PinnedMaps, cluster_ip: Ipv4Addr) -> anyhow::Result<BTreeSet<Ipv4Addr>> {
    let master = ServiceKey::new(
        ip4(cluster_ip.octets()),
        port(SERVICE_PORT),
        PROTO_TCP,
        SCOPE_EXT,
        0,
    );
    let Ok(m) = maps.services.get(&master, 0) else {
        return Ok(BTreeSet::new());
    };
    let mut out = BTreeSet::new();
    for slot in 1..=m.count as u16 {
        let Ok(s) = maps.services.get(&master.with_slot(slot), 0) else {
            continue;
        };
        if let Ok(b) = maps.backends.get(&s.backend_id, 0) {
            out.insert(Ipv4Addr::from(ip4_from(b.addr)));
        }
    }
    Ok(out)
}

/// Alternate the probe's third endpoint between the third and fourth pod `count` times, timing
/// each manifest rewrite until the maps hold the new set; then check the added pod is served.
/// The agent must be running on `bed` with `set` written to `probe_file`'s directory.
pub fn endpoint_changes(
    bed: &Bed,
    set: &ServiceSet,
    probe_file: &Path,
    count: usize,
) -> anyhow::Result<ChangeResults> {
    let probe = set.probe();
    let maps = PinnedMaps::open(&bed.pin_path()).context("opening the agent's pinned maps")?;
    let a: Vec<Ipv4Addr> = bed.backends[..3].iter().map(|p| p.ip).collect();
    let b: Vec<Ipv4Addr> = vec![a[0], a[1], bed.backends[3].ip];
    let mut lat = Vec::with_capacity(count);
    for i in 0..count {
        let next = if i % 2 == 0 { &b } else { &a };
        let want: BTreeSet<Ipv4Addr> = next.iter().copied().collect();
        let text = xlb_dir::manifest(probe, next);
        let started = Instant::now();
        lb_testkit::service_yaml::write_atomic(probe_file, &text)?;
        loop {
            if probe_backends(&maps, probe.cluster_ip)? == want {
                break;
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("change {i}: the maps did not reach {want:?} within 30 s");
            }
            crate::interrupt::check()?;
            std::thread::sleep(Duration::from_micros(100));
        }
        lat.push(started.elapsed().as_secs_f64() * 1e6);
        // Let the agent's watcher settle so changes are measured one at a time.
        std::thread::sleep(Duration::from_millis(30));
    }
    // Leave the set with the fourth pod in it and show a client reaches that pod.
    if count.is_multiple_of(2) {
        lb_testkit::service_yaml::write_atomic(probe_file, &xlb_dir::manifest(probe, &b))?;
        let want: BTreeSet<Ipv4Addr> = b.iter().copied().collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        while probe_backends(&maps, probe.cluster_ip)? != want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let target = std::net::SocketAddrV4::new(probe.cluster_ip, SERVICE_PORT).into();
    let added = bed.backends[3].name.clone();
    let new_backend_served = bed
        .client
        .ns
        .run(|| (0..60).any(|_| request(target).is_ok_and(|g| g == added)))?;
    Ok(ChangeResults {
        services: set.services.len(),
        latency: Latency::from_us(&lat).unwrap_or_default(),
        new_backend_served,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(s: f64, write: f64, parse: f64, restart: Option<f64>) -> ColdResults {
        ColdResults {
            xlb_s: Some(s),
            xlb_apply_s: Some(write),
            xlb_apply_ops: Some(320_000),
            xlb_rss_mib: Some(80.0 + s),
            startup_phases: vec![("parse".into(), parse), ("write".into(), write)],
            restart_s: restart,
            readback_s: restart.map(|r| r / 5.0),
            ..Default::default()
        }
    }

    /// A cold start's figures are the medians of its runs (one slow run moves nothing), the
    /// read-back is the restarted run's, and every run is listed.
    #[test]
    fn cold_starts_are_judged_on_their_medians() {
        let mut res = ColdResults::default();
        res.absorb_xlb(&[
            run(1.3, 0.14, 0.86, None),
            run(1.9, 0.30, 1.40, None),
            run(1.4, 0.15, 0.90, Some(1.2)),
        ]);
        assert_eq!(res.xlb_s, Some(1.4));
        assert_eq!(res.xlb_apply_s, Some(0.15));
        assert_eq!(res.xlb_rss_mib, Some(81.4));
        assert_eq!(
            res.startup_phases,
            vec![("parse".to_string(), 0.90), ("write".to_string(), 0.15)]
        );
        assert_eq!(
            (res.restart_s, res.readback_s),
            (Some(1.2), Some(1.2 / 5.0))
        );
        assert_eq!(
            res.runs[0],
            ("xlb agent: spawn to ready".to_string(), vec![1.3, 1.9, 1.4])
        );
        // A single run is its own figure and lists nothing.
        let mut one = ColdResults::default();
        one.absorb_xlb(&[run(1.3, 0.14, 0.86, Some(1.1))]);
        assert_eq!((one.xlb_s, one.restart_s), (Some(1.3), Some(1.1)));
        assert!(one.runs.is_empty());
    }
}
