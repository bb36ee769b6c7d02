//! Per-packet cost of xlb's programs through BPF_PROG_TEST_RUN, at growing numbers of Services,
//! next to a no-op program measured the same way in the same run.
//!
//! Method: the kernel re-runs the *same* buffer when `repeat > 1`, and xlb rewrites that buffer
//! (DNAT), so every run after the first would measure a packet to the backend, not to the
//! Service. So each sample is one run (`repeat = 1`) of a fresh frame; a round is the mean of many
//! samples and the reported figure is the median of several rounds. The kernel's per-run timer
//! overhead is in every figure, the no-op's included, so ratios to the floor stay meaningful.

pub mod frame;

use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use aya::maps::{HashMap, MapData};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use aya::Ebpf;
use lb_common::{
    ip4, map_names, port, prog_names, Backend, MemberKey, MemberValue, RevNat, ServiceKey,
    ServiceValue, BACKEND_ACTIVE, PROTO_TCP, SCOPE_EXT, SVC_FLAG_CLUSTER_IP,
};
use lb_userspace::datapath::{LoadOptions, MapSizes};
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

/// The object loaded unpinned with maps big enough for the largest size.
struct Loaded {
    ebpf: Ebpf,
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
                rev_nat: (max_services + 1024) as u32,
                conntrack: 1 << 20,
                members: (eps + 1024) as u32,
                ..MapSizes::default()
            },
            ..LoadOptions::default()
        };
        let mut ebpf = opts.load_object(None).context("loading the eBPF object")?;
        for name in [
            prog_names::FROM_POD,
            prog_names::TO_POD,
            prog_names::NOOP_TC,
        ] {
            let Some(p) = ebpf.program_mut(name) else {
                bail!("program {name} missing from the object");
            };
            let p: &mut SchedClassifier = p
                .try_into()
                .with_context(|| format!("{name} is not a classifier"))?;
            p.load().map_err(|e| anyhow!("loading {name}: {e}"))?;
        }
        Ok(Loaded {
            ebpf,
            filled: 0,
            next_backend: 1,
        })
    }

    fn hash<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &str,
    ) -> anyhow::Result<HashMap<&mut MapData, K, V>> {
        let m = self
            .ebpf
            .map_mut(name)
            .with_context(|| format!("map {name}"))?;
        Ok(HashMap::try_from(m)?)
    }

    /// Add Services until there are `n`, written in the agent's order (backends, rev-NAT,
    /// members, slots, master).
    fn fill_to(&mut self, n: usize) -> anyhow::Result<()> {
        for i in self.filled..n {
            let fe = ServiceKey::new(
                ip4(cluster_ip(i).octets()),
                port(SERVICE_PORT),
                PROTO_TCP,
                SCOPE_EXT,
                0,
            );
            let count = endpoints_of(i);
            let first = self.next_backend;
            self.next_backend += count as u32;
            let ids = first..first + count as u32;
            let backend = |id: u32| Backend {
                addr: ip4((u32::from_be_bytes([10, 128, 0, 0]) + id).to_be_bytes()),
                port: port(TARGET_PORT),
                proto: PROTO_TCP,
                state: BACKEND_ACTIVE,
            };
            let mut backends = self.hash::<u32, Backend>(map_names::BACKENDS)?;
            for id in ids.clone() {
                backends.insert(id, backend(id), 0)?;
            }
            let rev_nat_id = i as u32 + 1;
            self.hash::<u32, RevNat>(map_names::REV_NAT)?.insert(
                rev_nat_id,
                RevNat {
                    addr: fe.addr,
                    port: fe.port,
                    _pad: 0,
                },
                0,
            )?;
            // The datapath checks a re-used or affinity-pinned flow's backend is a member.
            let mut members = self.hash::<MemberKey, MemberValue>(map_names::MEMBERS)?;
            for id in ids.clone() {
                let b = backend(id);
                let m = MemberValue {
                    addr: b.addr,
                    port: b.port,
                    _pad: 0,
                };
                members.insert(MemberKey::of(&fe, id), m, 0)?;
            }
            let mut services = self.hash::<ServiceKey, ServiceValue>(map_names::SERVICES)?;
            for (slot, backend_id) in (1..).zip(ids) {
                let v = ServiceValue {
                    backend_id,
                    ..Default::default()
                };
                services.insert(fe.with_slot(slot), v, 0)?;
            }
            let master = ServiceValue {
                backend_id: 0,
                count: count as u32,
                rev_nat_id,
                flags: SVC_FLAG_CLUSTER_IP,
                affinity_timeout: 0,
            };
            self.hash::<ServiceKey, ServiceValue>(map_names::SERVICES)?
                .insert(fe, master, 0)?;
        }
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
    fn per_packet_run_on_the_real_object() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
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
