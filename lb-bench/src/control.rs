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
use crate::stats::Latency;
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
    /// Wall time of the restore / `nft -f`, by mode label.
    pub netfilter_s: Vec<(String, f64)>,
    pub errors: Vec<String>,
}

impl ColdResults {
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
        let outcome = (|| -> anyhow::Result<f64> {
            let ns = NetNs::create(&format!("{}cold", unique_prefix()))?;
            let installed = Installed::apply(ns.name(), mode, &text)?;
            let took = installed.took.as_secs_f64();
            drop(installed);
            drop(ns);
            Ok(took)
        })();
        match outcome {
            Ok(s) => res.netfilter_s.push((mode.label().to_string(), s)),
            Err(e) => res.errors.push(format!("{}: {e:#}", mode.label())),
        }
        crate::interrupt::check()?;
        progress(&format!("cold programming: {}", mode.label()));
    }

    let outcome = (|| -> anyhow::Result<()> {
        let prefix = unique_prefix();
        let ns = NetNs::create(&format!("{prefix}cold"))?;
        let scratch = tempfile::Builder::new()
            .prefix("xlb-bench-cold-")
            .tempdir()?;
        let dir = scratch.path().join("manifests");
        xlb_dir::write_all(&set, &dir)?;
        let pin_root = Path::new(lb_testkit::cluster::BPFFS).join(prefix.trim_end_matches('-'));
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
        let agent = match agent {
            Ok(a) => a,
            Err(e) => {
                let _ = std::fs::remove_dir(&pin_root);
                return Err(e);
            }
        };
        let mut agent = agent;
        res.xlb_s = Some(agent.ready_after.as_secs_f64());
        res.xlb_rss_mib = agent.rss_mib();
        let log = agent.log_since_start();
        if let Some(u) = agentlog::first_update(&log) {
            res.xlb_apply_s = u.write_micros.map(secs);
            res.xlb_sync_s = u.sync_micros.map(secs);
            res.xlb_apply_ops = u.ops;
        }
        res.startup_phases = agentlog::startup_phases(&log)
            .into_iter()
            .map(|(k, us)| (k, secs(us)))
            .collect();
        // Restart on the pins, as after an upgrade or a crash: the new agent reads the maps
        // back before it syncs.
        crate::interrupt::check()?;
        match agent.restart() {
            Ok(()) => {
                res.restart_s = Some(agent.ready_after.as_secs_f64());
                res.restart_rss_mib = agent.rss_mib();
                if let Some(rb) = agentlog::read_back(&agent.log_since_start()) {
                    res.readback_s = Some(secs(rb.micros));
                    res.readback_frontends = rb.frontends;
                    res.readback_backends = rb.backends;
                }
            }
            Err(e) => {
                crate::interrupt::check()?;
                res.errors.push(format!("xlb restart on its pins: {e:#}"));
            }
        }
        drop(agent);
        let _ = std::fs::remove_dir(&pin_root);
        Ok(())
    })();
    if let Err(e) = outcome {
        res.errors.push(format!("xlb: {e:#}"));
    }
    progress("cold programming: xlb");
    if let Err(e) = kube_cold(&set, &mut res) {
        crate::interrupt::check()?;
        res.errors.push(format!("xlb, Kubernetes source: {e:#}"));
    }
    progress("cold programming: xlb, Kubernetes source");
    Ok(res)
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
