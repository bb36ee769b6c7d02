//! What xlb's programs cost on real traffic: the kernel's per-program run statistics
//! (`run_time_ns` / `run_cnt` of `struct bpf_prog_info`), read with `BPF_OBJ_GET_INFO_BY_FD`
//! from the programs behind an agent's pinned links, before and after a connection-rate point.
//!
//! The kernel only counts while statistics are on (`kernel.bpf_stats_enabled`), and counting
//! costs every program run two clock reads, so they are on only around the dedicated points
//! ([`StatsOn`]): never during the interleaved rounds whose rates are compared. `StatsOn` asks
//! for them with `BPF_ENABLE_STATS`, the same switch as the sysctl but held by a file
//! descriptor: the kernel turns it off again when the descriptor closes, even if the benchmark
//! is killed. Kernels without it (< 5.8) get the sysctl, set to 1 and restored to its previous
//! value when the guard drops.
//!
//! An agent attaches one loaded program to many links (`from_pod` on every pod device): the
//! links lead to program ids, and each program is counted once.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::Path;

use anyhow::Context as _;
use aya::programs::links::{FdLink, PinnedLink};
use serde::{Deserialize, Serialize};

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Program run statistics are on while this lives.
pub struct StatsOn {
    _fd: Option<OwnedFd>,
    /// The sysctl's value before it was set (the fallback path).
    restore: Option<String>,
    pub method: &'static str,
}

impl StatsOn {
    pub fn enable() -> anyhow::Result<Self> {
        match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => Ok(StatsOn {
                _fd: Some(fd),
                restore: None,
                method: "BPF_ENABLE_STATS (kernel.bpf_stats_enabled while held)",
            }),
            Err(e) => {
                tracing::debug!(error = %e, "BPF_ENABLE_STATS; falling back to the sysctl");
                let old = std::fs::read_to_string(SYSCTL)
                    .with_context(|| format!("reading {SYSCTL}"))?
                    .trim()
                    .to_string();
                std::fs::write(SYSCTL, "1").with_context(|| format!("writing {SYSCTL}"))?;
                Ok(StatsOn {
                    _fd: None,
                    restore: Some(old),
                    method: "sysctl kernel.bpf_stats_enabled (restored afterwards)",
                })
            }
        }
    }
}

impl Drop for StatsOn {
    fn drop(&mut self) {
        if let Some(old) = self.restore.take() {
            if let Err(e) = std::fs::write(SYSCTL, &old) {
                eprintln!("restoring {SYSCTL} to {old}: {e}");
            }
        }
    }
}

#[cfg(test)]
/// Whether the kernel counts program runs right now (the sysctl's view).
pub fn stats_enabled() -> Option<bool> {
    std::fs::read_to_string(SYSCTL)
        .ok()
        .map(|s| s.trim() != "0")
}

/// One program's counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub name: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// The counters of every program behind the links pinned under `pin_root/links`, by program id.
pub fn snapshot(pin_root: &Path) -> anyhow::Result<BTreeMap<u32, Counters>> {
    let dir = pin_root.join("links");
    let mut ids: BTreeMap<u32, String> = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let file = entry.file_name().to_string_lossy().into_owned();
        let link = match PinnedLink::from_pin(entry.path()) {
            Ok(l) => FdLink::from(l),
            Err(e) => {
                tracing::debug!(pin = file, error = %e, "not a link pin");
                continue;
            }
        };
        let info = link
            .info()
            .with_context(|| format!("link info of {file}"))?;
        ids.entry(info.program_id())
            .or_insert_with(|| hook_of_pin(&file).to_string());
    }
    Ok(snapshot_of(&ids))
}

/// The counters of the programs `ids` (id -> the name to use when the program has none).
pub fn snapshot_of(ids: &BTreeMap<u32, String>) -> BTreeMap<u32, Counters> {
    let mut out = BTreeMap::new();
    for p in aya::programs::loaded_programs() {
        let Ok(p) = p else { continue };
        if let Some(hook) = ids.get(&p.id()) {
            let name = p
                .name_as_str()
                .filter(|n| !n.is_empty())
                .unwrap_or(hook)
                .to_string();
            out.insert(
                p.id(),
                Counters {
                    name,
                    run_time_ns: p.run_time().as_nanos() as u64,
                    run_cnt: p.run_count(),
                },
            );
        }
    }
    out
}

/// The hook part of a link pin's name: `<ifindex>-<ifname>-<hook>` or `cgroup-<prog>`.
fn hook_of_pin(file: &str) -> &str {
    file.rsplit_once('-').map_or(file, |(_, h)| h)
}

/// What each program did between two snapshots: the programs that ran, by name (programs of
/// the same name, e.g. after an agent restart, are added up).
pub fn delta(before: &BTreeMap<u32, Counters>, after: &BTreeMap<u32, Counters>) -> Vec<Counters> {
    let mut by_name: BTreeMap<String, Counters> = BTreeMap::new();
    for (id, a) in after {
        let b = before.get(id);
        let runs = a.run_cnt.saturating_sub(b.map_or(0, |b| b.run_cnt));
        if runs == 0 {
            continue;
        }
        let time = a.run_time_ns.saturating_sub(b.map_or(0, |b| b.run_time_ns));
        let c = by_name.entry(a.name.clone()).or_insert_with(|| Counters {
            name: a.name.clone(),
            ..Default::default()
        });
        c.run_cnt += runs;
        c.run_time_ns += time;
    }
    by_name.into_values().collect()
}

/// One program's cost over one measured point.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProgCost {
    pub services: usize,
    /// The row whose agent ran it ("xlb", "xlb-socklb").
    pub mode: String,
    /// The traffic of the point ("ClusterIP", "NodePort local", "NodePort remote").
    pub traffic: String,
    pub program: String,
    pub runs: u64,
    pub run_time_ns: u64,
    /// Connections of the point (warm-up included: every one of them ran the programs).
    pub connections: usize,
    /// The point's rate with statistics on (for context; not compared with the rounds).
    pub conns_per_s: f64,
    /// How many times the point was counted; this is the one of median cost per run (0: a
    /// results file from before repeats, counted once).
    #[serde(default)]
    pub repeats: usize,
    /// The lowest and highest cost per run over the repeats, ns.
    #[serde(default)]
    pub ns_range: Option<(f64, f64)>,
}

impl ProgCost {
    pub fn ns_per_run(&self) -> Option<f64> {
        (self.runs > 0).then(|| self.run_time_ns as f64 / self.runs as f64)
    }
    pub fn runs_per_conn(&self) -> Option<f64> {
        (self.connections > 0).then(|| self.runs as f64 / self.connections as f64)
    }
}

/// The costs of repeated counting points, one per (mode, traffic, program): the repeat of
/// median cost per run, with the range over the repeats. `repeats[k]` holds the costs of the
/// `k`-th repeat; the order is the first repeat's. One noisy point (the VM's neighbours, a
/// kernel worker) then moves the range, not the figure a target is judged on, as the
/// connection-rate rounds are judged on their medians.
pub fn median_of_repeats(repeats: Vec<Vec<ProgCost>>) -> Vec<ProgCost> {
    let key = |c: &ProgCost| {
        (
            c.services,
            c.mode.clone(),
            c.traffic.clone(),
            c.program.clone(),
        )
    };
    let mut order = Vec::new();
    let mut groups: BTreeMap<_, Vec<ProgCost>> = BTreeMap::new();
    for c in repeats.into_iter().flatten() {
        let k = key(&c);
        if !groups.contains_key(&k) {
            order.push(k.clone());
        }
        groups.entry(k).or_default().push(c);
    }
    order
        .into_iter()
        .filter_map(|k| {
            let mut g = groups.remove(&k)?;
            let n = g.len();
            let cost = |c: &ProgCost| c.ns_per_run().unwrap_or(0.0);
            g.sort_by(|a, b| cost(a).total_cmp(&cost(b)));
            let range = (cost(&g[0]), cost(&g[n - 1]));
            let mut mid = g.swap_remove(n / 2);
            mid.repeats = n;
            mid.ns_range = Some(range);
            Some(mid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(program: &str, traffic: &str, ns: u64) -> ProgCost {
        ProgCost {
            services: 10,
            mode: "xlb".into(),
            traffic: traffic.into(),
            program: program.into(),
            runs: 100,
            run_time_ns: ns * 100,
            connections: 10,
            conns_per_s: 1000.0,
            ..ProgCost::default()
        }
    }

    #[test]
    fn repeats_give_the_median_run_with_its_range_in_first_order() {
        let reps = vec![
            vec![
                cost("to_pod", "ClusterIP", 200),
                cost("from_pod", "ClusterIP", 400),
            ],
            vec![
                cost("to_pod", "ClusterIP", 260),
                cost("from_pod", "ClusterIP", 700),
            ],
            // A program that ran only in this repeat.
            vec![
                cost("to_pod", "ClusterIP", 190),
                cost("from_pod", "ClusterIP", 420),
                cost("from_net", "ClusterIP", 900),
            ],
        ];
        let m = median_of_repeats(reps);
        let got: Vec<_> = m
            .iter()
            .map(|c| {
                (
                    c.program.as_str(),
                    c.ns_per_run().unwrap() as u64,
                    c.repeats,
                    c.ns_range,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("to_pod", 200, 3, Some((190.0, 260.0))),
                ("from_pod", 420, 3, Some((400.0, 700.0))),
                ("from_net", 900, 1, Some((900.0, 900.0))),
            ]
        );
        assert!(median_of_repeats(Vec::new()).is_empty());
    }

    fn c(name: &str, t: u64, n: u64) -> Counters {
        Counters {
            name: name.into(),
            run_time_ns: t,
            run_cnt: n,
        }
    }

    #[test]
    fn delta_keeps_the_programs_that_ran_and_merges_names() {
        let before = BTreeMap::from([(1, c("from_pod", 1_000, 10)), (2, c("to_pod", 500, 10))]);
        let after = BTreeMap::from([
            (1, c("from_pod", 10_000, 30)),
            (2, c("to_pod", 500, 10)),
            // New since the first snapshot, and a second program of the same name.
            (3, c("from_net", 4_000, 8)),
            (4, c("from_pod", 2_000, 10)),
        ]);
        let d = delta(&before, &after);
        assert_eq!(d, vec![c("from_net", 4_000, 8), c("from_pod", 11_000, 30)]);
    }

    #[test]
    fn pin_names_give_the_hook() {
        assert_eq!(hook_of_pin("12-xp3-from_pod"), "from_pod");
        assert_eq!(
            hook_of_pin("2-eth0-from_net_xdp_native"),
            "from_net_xdp_native"
        );
        assert_eq!(hook_of_pin("cgroup-sock_connect4"), "sock_connect4");
        assert_eq!(hook_of_pin("odd"), "odd");
    }

    /// The kernel counts a program's runs while the guard lives, and not after it; the sysctl
    /// is left as it was (`BPF_ENABLE_STATS` does not show in it: the sysctl keeps its own
    /// value on top of the shared switch).
    #[test]
    #[ignore = "needs root"]
    fn programs_are_counted_only_while_the_guard_lives() {
        use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
        let _serial = crate::root_test();
        let sysctl = stats_enabled().unwrap();
        let mut ebpf = lb_userspace::datapath::LoadOptions::default()
            .load_object(None)
            .unwrap();
        lb_userspace::datapath::load_programs(&mut ebpf, &[lb_common::prog_names::NOOP_TC])
            .unwrap();
        let prog: &SchedClassifier = ebpf
            .program(lb_common::prog_names::NOOP_TC)
            .unwrap()
            .try_into()
            .unwrap();
        let frame = crate::pkt::frame::tcp([10, 0, 0, 1], 1000, [10, 0, 0, 2], 80, 0x02);
        let runs = |n: usize| {
            for _ in 0..n {
                let opts = TestRunOptions {
                    data_in: Some(&frame),
                    ..Default::default()
                };
                prog.test_run(opts).unwrap();
            }
            let i = prog.info().unwrap();
            (i.run_count(), i.run_time())
        };
        let (c0, _) = runs(0);
        let counted = {
            let _on = StatsOn::enable().unwrap();
            runs(10)
        };
        assert_eq!(counted.0, c0 + 10, "runs counted while on");
        assert!(counted.1.as_nanos() > 0);
        if !sysctl {
            assert_eq!(runs(10).0, counted.0, "runs counted after the guard");
        }
        assert_eq!(stats_enabled(), Some(sysctl));
    }

    #[test]
    fn cost_per_run_and_per_connection() {
        let p = ProgCost {
            runs: 400,
            run_time_ns: 200_000,
            connections: 100,
            ..Default::default()
        };
        assert_eq!(p.ns_per_run(), Some(500.0));
        assert_eq!(p.runs_per_conn(), Some(4.0));
        assert_eq!(ProgCost::default().ns_per_run(), None);
    }
}
