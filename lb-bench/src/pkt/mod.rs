//! Per-packet cost of xlb's programs through BPF_PROG_TEST_RUN, at growing numbers of Services,
//! next to a no-op program measured the same way in the same run.
//!
//! Method: the kernel re-runs the *same* buffer when `repeat > 1`, and xlb rewrites that buffer
//! (DNAT), so every run after the first would measure a packet to the backend, not to the
//! Service. So each sample is one run (`repeat = 1`) of a fresh frame; a round is the mean of many
//! samples and the reported figure is the median of several rounds. The kernel's per-run timer
//! overhead is in every figure, the no-op's included, so ratios to the floor stay meaningful.

pub mod frame;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context as _};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use aya::Ebpf;
use lb_common::{prog_names, SCOPE_EXT, SVC_FLAG_CLUSTER_IP};
use lb_model::planner::plan;
use lb_model::{Applied, BackendAddr, DesiredState, Frontend, FrontendState, Proto, SvcKey};
use lb_userspace::datapath::{load_programs, LoadOptions, MapSizes, ObjectMaps};
use serde::{Deserialize, Serialize};

use crate::rules::{cluster_ip, SERVICE_PORT};
use crate::stats::{mean, median};

/// Endpoints of most Services; every tenth has [`WIDE`] (the "10 for part of them").
const NARROW: usize = 3;
const WIDE: usize = 10;
const TARGET_PORT: u16 = 8080;
/// The client of every measured flow (a pod address).
const CLIENT: [u8; 4] = [10, 244, 1, 2];
/// A pod address that is no frontend.
const NON_SERVICE: [u8; 4] = [10, 244, 1, 99];

/// How many samples to take.
#[derive(Clone, Copy, Debug)]
pub struct PktPlan {
    pub rounds: usize,
    pub samples_per_round: usize,
}

/// Median ns per packet of each kind at one number of Services.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PktRow {
    pub services: usize,
    pub established_ns: f64,
    pub new_flow_ns: f64,
    pub reply_ns: f64,
    pub non_service_ns: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PktResults {
    pub method: String,
    /// The floor, measured like the rows.
    pub noop_ns: f64,
    /// Where the floor program came from (for the report).
    pub noop_source: String,
    pub rows: Vec<PktRow>,
}

/// The object loaded unpinned with maps big enough for the largest size, programmed as the
/// agent programs it (planner and executor of `lb_model`).
struct Loaded {
    ebpf: Ebpf,
    /// What the maps hold.
    applied: Applied,
    /// The Services filled so far.
    desired: DesiredState,
    filled: usize,
    next_backend: u32,
}

fn endpoints_of(i: usize) -> usize {
    if i % 10 == 9 {
        WIDE
    } else {
        NARROW
    }
}

impl Loaded {
    fn load(max_services: usize) -> anyhow::Result<Self> {
        let eps: usize = (0..max_services).map(endpoints_of).sum();
        let opts = LoadOptions {
            sizes: MapSizes {
                services: (max_services + eps + 1024) as u32,
                backends: (eps + 1024) as u32,
                conntrack: 1 << 20,
                members: (eps + 1024) as u32,
                ..MapSizes::default()
            },
            ..LoadOptions::default()
        };
        let mut ebpf = opts.load_object(None).context("loading the eBPF object")?;
        load_programs(
            &mut ebpf,
            &[
                prog_names::FROM_POD,
                prog_names::TO_POD,
                prog_names::NOOP_TC,
            ],
        )
        .map_err(|e| anyhow!("{e}"))?;
        Ok(Loaded {
            ebpf,
            applied: Applied::default(),
            desired: DesiredState::default(),
            filled: 0,
            next_backend: 1,
        })
    }

    /// Add Services until there are `n`: one plan for the new ones, executed as the agent
    /// executes its plans.
    fn fill_to(&mut self, n: usize) -> anyhow::Result<()> {
        let mut touched = BTreeSet::new();
        for i in self.filled..n {
            let fe = Frontend {
                addr: cluster_ip(i),
                port: SERVICE_PORT,
                proto: Proto::Tcp,
                scope: SCOPE_EXT,
            };
            let backends = (0..endpoints_of(i))
                .map(|_| {
                    let k = self.next_backend;
                    self.next_backend += 1;
                    BackendAddr {
                        addr: Ipv4Addr::from(u32::from_be_bytes([10, 128, 0, 0]) + k),
                        port: TARGET_PORT,
                        proto: Proto::Tcp,
                    }
                })
                .collect();
            let st = FrontendState {
                service: SvcKey {
                    namespace: "bench".into(),
                    name: format!("svc-{i}"),
                },
                port_name: "http".into(),
                backends,
                flags: SVC_FLAG_CLUSTER_IP,
                affinity_timeout: 0,
                ..FrontendState::default()
            };
            self.desired.set_frontend(fe, st);
            touched.insert(fe);
        }
        let p = plan(&self.applied, &self.desired, &touched);
        let mut maps = ObjectMaps::of(&mut self.ebpf).map_err(|e| anyhow!("{e}"))?;
        let report = lb_model::store::execute(&mut maps.store(), &p, &mut self.applied);
        ensure!(
            report.is_clean(),
            "programming {} Services: {} frontends failed, first: {:?}",
            n,
            report.failed.len(),
            report.failed.first()
        );
        self.filled = self.filled.max(n);
        Ok(())
    }

    fn prog(&self, name: &str) -> anyhow::Result<&SchedClassifier> {
        Ok(self
            .ebpf
            .program(name)
            .with_context(|| format!("program {name}"))?
            .try_into()?)
    }
}

/// One run of `prog` on `frame`: kernel-measured duration and output frame.
fn run_once(prog: &SchedClassifier, frame: &[u8]) -> anyhow::Result<(Duration, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 256];
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ..Default::default()
    })?;
    out.truncate(r.data_size_out as usize);
    Ok((r.duration, out))
}

/// Median over rounds of the mean over samples of `sample(k)` (ns).
fn measure(
    plan: PktPlan,
    mut sample: impl FnMut(usize) -> anyhow::Result<Duration>,
) -> anyhow::Result<f64> {
    let mut k = 0;
    let mut rounds = Vec::with_capacity(plan.rounds);
    // One untimed warm-up round brings code and map buckets into cache for every kind alike.
    for r in 0..=plan.rounds {
        let mut ns = Vec::with_capacity(plan.samples_per_round);
        for _ in 0..plan.samples_per_round {
            ns.push(sample(k)?.as_nanos() as f64);
            k += 1;
        }
        if r > 0 {
            rounds.push(mean(&ns).unwrap_or(0.0));
        }
        crate::interrupt::check()?;
    }
    median(&rounds).ok_or_else(|| anyhow!("no samples"))
}

/// Source address and port of new flow number `k` (distinct for a million flows).
fn new_flow_src(k: usize, salt: usize) -> ([u8; 4], u16) {
    let n = k + salt * 1_000_000;
    let port = 1024 + (n % 60_000) as u16;
    let host = (n / 60_000) as u32;
    (
        u32::to_be_bytes(u32::from_be_bytes([10, 245, 0, 0]) + host),
        port,
    )
}

/// Measure every packet kind at each size in `sizes` (ascending), and the floor.
pub fn run(
    sizes: &[usize],
    plan: PktPlan,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<PktResults> {
    let max = sizes.iter().copied().max().unwrap_or(1);
    let mut l = Loaded::load(max)?;
    let mut res = PktResults {
        method: format!(
            "BPF_PROG_TEST_RUN, repeat=1 per sample (xlb rewrites the buffer, so a kernel repeat would re-run a \
             translated packet); mean of {} samples per round, median of {} rounds",
            plan.samples_per_round, plan.rounds
        ),
        ..Default::default()
    };
    let ack_probe = |probe: [u8; 4]| frame::tcp(CLIENT, 33333, probe, SERVICE_PORT, frame::ACK);

    // The floor, on the same frame as the established flow.
    let floor_frame = ack_probe(cluster_ip(0).octets());
    let p = l.prog(prog_names::NOOP_TC)?;
    res.noop_ns = measure(plan, |_| Ok(run_once(p, &floor_frame)?.0))?;
    res.noop_source = "noop_tc from the eBPF object".into();
    progress("no-op floor");

    for (salt, &n) in sizes.iter().enumerate() {
        l.fill_to(n)?;
        let probe = cluster_ip(n - 1).octets();
        let from_pod = l.prog(prog_names::FROM_POD)?;
        let to_pod = l.prog(prog_names::TO_POD)?;

        // New flows: a fresh source port per sample, so each one selects and creates conntrack.
        let new_flow_ns = measure(plan, |k| {
            let (src, sport) = new_flow_src(k, salt + 1);
            Ok(run_once(
                from_pod,
                &frame::tcp(src, sport, probe, SERVICE_PORT, frame::SYN),
            )?
            .0)
        })?;

        // One tracked flow; every later packet of it is a conntrack hit.
        let (_, out) = run_once(
            from_pod,
            &frame::tcp(CLIENT, 33333, probe, SERVICE_PORT, frame::SYN),
        )?;
        let (backend, backend_port) = frame::dst_of(&out).context("translated SYN")?;
        if backend == probe {
            bail!("the SYN to {probe:?}:{SERVICE_PORT} was not translated: is the Service programmed?");
        }
        let ack = ack_probe(probe);
        let established_ns = measure(plan, |_| Ok(run_once(from_pod, &ack)?.0))?;
        let reply = frame::tcp(backend, backend_port, CLIENT, 33333, frame::ACK);
        let reply_ns = measure(plan, |_| Ok(run_once(to_pod, &reply)?.0))?;
        let other = frame::tcp(CLIENT, 33334, NON_SERVICE, TARGET_PORT, frame::ACK);
        let non_service_ns = measure(plan, |_| Ok(run_once(from_pod, &other)?.0))?;

        res.rows.push(PktRow {
            services: n,
            established_ns,
            new_flow_ns,
            reply_ns,
            non_service_ns,
        });
        progress(&format!("per-packet at {n} Services"));
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_flow_sources_are_distinct() {
        let mut seen = std::collections::BTreeSet::new();
        for k in 0..200_000 {
            assert!(seen.insert(new_flow_src(k, 1)));
        }
        assert!(!seen.contains(&new_flow_src(0, 2)));
        assert_eq!((0..100).map(endpoints_of).sum::<usize>(), 90 * 3 + 10 * 10);
    }

    #[test]
    #[ignore = "needs root"]
    fn per_packet_run_on_the_real_object() {
        let res = run(
            &[1, 20],
            PktPlan {
                rounds: 2,
                samples_per_round: 50,
            },
            |_| {},
        )
        .unwrap();
        assert_eq!(res.rows.len(), 2);
        for r in &res.rows {
            for v in [
                r.established_ns,
                r.new_flow_ns,
                r.reply_ns,
                r.non_service_ns,
            ] {
                assert!(v > 0.0 && v < 1e6, "{r:?}");
            }
        }
        assert!(res.noop_ns > 0.0);
    }
}
