//! Control-plane measurements: programming a large Service set from cold (xlb's agent from spawn
//! to ready, next to iptables-restore on both backends and `nft -f` of the same set), the agent's
//! memory, and the time from one endpoint change to the datapath using it.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use lb_common::{ip4, ip4_from, port, ServiceKey, PROTO_TCP, SCOPE_EXT};
use lb_testkit::NetNs;
use lb_userspace::datapath::PinnedMaps;
use serde::{Deserialize, Serialize};

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
    /// xlb: the first map update alone, as the agent logged it.
    pub xlb_apply_s: Option<f64>,
    pub xlb_rss_mib: Option<f64>,
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

    for mode in NfMode::ALL {
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
            &["--devices".to_string(), "none".to_string()],
        );
        let agent = match agent {
            Ok(a) => a,
            Err(e) => {
                let _ = std::fs::remove_dir(&pin_root);
                return Err(e);
            }
        };
        res.xlb_s = Some(agent.ready_after.as_secs_f64());
        res.xlb_apply_s = first_apply_micros(&agent.log_since_start()).map(|us| us as f64 / 1e6);
        res.xlb_rss_mib = agent.rss_mib();
        drop(agent);
        let _ = std::fs::remove_dir(&pin_root);
        Ok(())
    })();
    if let Err(e) = outcome {
        res.errors.push(format!("xlb: {e:#}"));
    }
    progress("cold programming: xlb");
    Ok(res)
}

/// `micros=N` of the first "maps updated" line of an agent log: the duration of the first map
/// update, as the agent measured it.
fn first_apply_micros(log: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains("maps updated"))?;
    let rest = &line[line.find("micros=")? + "micros=".len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
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

    #[test]
    fn parses_the_first_apply_duration() {
        let log = "x INFO datapath loaded\nx INFO maps updated ops=12 frontends=3 backends=4 micros=1534\n\
                   x INFO agent ready\nx INFO maps updated ops=1 micros=9\n";
        assert_eq!(first_apply_micros(log), Some(1534));
        assert_eq!(first_apply_micros("agent ready"), None);
    }
}
