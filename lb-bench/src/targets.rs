//! The targets of issue 12 (and those of issue 5 that still hold), checked against a run's
//! results and printed (met / not met / not measured). They are never asserted: a shared 2-core
//! VM cannot fail a build on a number. Where a floor of this machine is measured (e.g. what the
//! kernel's batched map update costs per entry), it is shown next to the target, and a target
//! below its floor says so.

use serde::{Deserialize, Serialize};

use crate::datapath::{DpRow, DIRECT_NOOP};
use crate::netfilter::NfMode;
use crate::results::Results;
use crate::stats::ratio;

/// Issue 12's real-traffic cost per run before the work (about 900 / 450 ns): the target is
/// half of it.
pub const FROM_POD_BEFORE_NS: f64 = 900.0;
pub const TO_POD_BEFORE_NS: f64 = 450.0;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetCheck {
    pub target: String,
    pub measured: String,
    /// `None`: not measured in this run.
    pub met: Option<bool>,
    /// What this machine cannot go below, when measured (absent in older results).
    #[serde(default)]
    pub floor: Option<String>,
}

impl TargetCheck {
    fn new(target: impl Into<String>, measured: Option<(String, bool)>) -> Self {
        let (measured, met) = match measured {
            Some((m, ok)) => (m, Some(ok)),
            None => ("not measured".to_string(), None),
        };
        TargetCheck {
            target: target.into(),
            measured,
            met,
            floor: None,
        }
    }

    fn with_floor(mut self, floor: Option<String>) -> Self {
        self.floor = floor;
        self
    }

    pub fn verdict(&self) -> &'static str {
        match self.met {
            Some(true) => "met",
            Some(false) => "not met",
            None => "not measured",
        }
    }
}

fn conn_rate(rows: &[DpRow], mode: &str, services: usize) -> Option<f64> {
    rows.iter()
        .find(|r| r.mode == mode && r.services == services)
        .map(|r| r.conn.conns_per_s)
}

/// "(medians of N interleaved rounds)" or nothing for results from before the rounds.
fn rounds_note(r: &Results) -> String {
    match r.datapath.as_ref().map(|d| d.rounds) {
        Some(n) if n > 0 => format!("; medians of {n} interleaved rounds"),
        _ => String::new(),
    }
}

pub fn evaluate(r: &Results) -> Vec<TargetCheck> {
    let mut out = Vec::new();
    let pkt = r.per_packet.as_ref().filter(|p| !p.rows.is_empty());

    // Per-packet cost flat in the number of Services.
    out.push(TargetCheck::new(
        "per-packet cost at 100k Services within 1.2x of 1 Service",
        pkt.and_then(|p| {
            let (first, last) = (p.rows.first()?, p.rows.last()?);
            let kinds = [
                (
                    "established",
                    ratio(Some(last.established_ns), Some(first.established_ns))?,
                ),
                (
                    "new flow",
                    ratio(Some(last.new_flow_ns), Some(first.new_flow_ns))?,
                ),
                ("reply", ratio(Some(last.reply_ns), Some(first.reply_ns))?),
            ];
            let (kind, worst) = kinds.iter().copied().max_by(|a, b| a.1.total_cmp(&b.1))?;
            Some((
                format!(
                    "worst {worst:.2}x ({kind}, {} vs {} Services)",
                    last.services, first.services
                ),
                worst <= 1.2,
            ))
        }),
    ));
    type Pick = fn(&crate::pkt::PktRow) -> f64;
    let kinds: [(&str, f64, Pick, &str); 3] = [
        (
            "established-flow packet within 3x of the no-op program",
            3.0,
            |row| row.established_ns,
            "established",
        ),
        (
            "new-flow SYN within 5x of the no-op program",
            5.0,
            |row| row.new_flow_ns,
            "syn",
        ),
        (
            "non-Service packet within 1.5x of the no-op program",
            1.5,
            |row| row.non_service_ns,
            "non_service",
        ),
    ];
    for (label, limit, pick, kind) in kinds {
        let floor = pkt.and_then(|p| {
            let f = p.floors.iter().find(|f| f.kind == kind)?;
            let x = ratio(Some(f.ns), Some(p.noop_ns))?;
            Some(format!(
                "{x:.2}x ({:.0} ns: {}){}",
                f.ns,
                f.what,
                if x > limit {
                    ": the target is below the floor"
                } else {
                    ""
                }
            ))
        });
        out.push(
            TargetCheck::new(
                label,
                pkt.and_then(|p| {
                    let last = p.rows.last()?;
                    let x = ratio(Some(pick(last)), Some(p.noop_ns))?;
                    Some((
                        format!(
                            "{x:.2}x ({:.0} ns vs {:.0} ns, {} Services)",
                            pick(last),
                            p.noop_ns,
                            last.services
                        ),
                        x <= limit,
                    ))
                }),
            )
            .with_floor(floor),
        );
    }

    let dp = r.datapath.as_ref();
    out.push(TargetCheck::new(
        format!(
            "real traffic: from_pod <= {:.0} ns and to_pod <= {:.0} ns per run (half of issue 12's {:.0} / {:.0} ns; kernel run statistics, xlb connection-rate traffic)",
            FROM_POD_BEFORE_NS / 2.0,
            TO_POD_BEFORE_NS / 2.0,
            FROM_POD_BEFORE_NS,
            TO_POD_BEFORE_NS
        ),
        dp.and_then(|d| {
            let here = d
                .prog_costs
                .iter()
                .filter(|c| c.mode == "xlb" && c.traffic == "ClusterIP");
            let n = here.clone().map(|c| c.services).max()?;
            let cost = |prog: &str| {
                here.clone()
                    .find(|c| c.services == n && c.program == prog)
                    .and_then(|c| c.ns_per_run())
            };
            let (from, to) = (cost("from_pod")?, cost("to_pod")?);
            Some((
                format!("from_pod {from:.0} ns, to_pod {to:.0} ns per run ({n} Services)"),
                from <= FROM_POD_BEFORE_NS / 2.0 && to <= TO_POD_BEFORE_NS / 2.0,
            ))
        }),
    )
    .with_floor(dp.and_then(|d| {
        // The no-op program at the same hooks, on the same kind of connections (to a pod),
        // at the largest size measured.
        let c = d
            .prog_costs
            .iter()
            .filter(|c| c.mode == DIRECT_NOOP)
            .max_by_key(|c| c.services)?;
        Some(format!(
            "{:.0} ns per run: a no-op tc program at the same hooks, {DIRECT_NOOP} at {} Services",
            c.ns_per_run()?,
            c.services
        ))
    })));
    let xlb_sizes = |d: &crate::datapath::DpResults| -> Vec<usize> {
        let mut v: Vec<usize> = d
            .rows
            .iter()
            .filter(|r| r.mode == "xlb")
            .map(|r| r.services)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    // `mode`'s connection rate against direct's, at every size xlb was measured.
    let vs_direct = |d: &crate::datapath::DpResults, mode: &str| -> Vec<(usize, f64)> {
        xlb_sizes(d)
            .into_iter()
            .filter_map(|n| {
                Some((
                    n,
                    ratio(conn_rate(&d.rows, mode, n), conn_rate(&d.rows, "direct", n))?,
                ))
            })
            .collect()
    };
    let by_size = |per: &[(usize, f64)]| -> String {
        per.iter()
            .map(|(n, x)| format!("{n}: {x:.2}x"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let note = rounds_note(r);
    out.push(
        TargetCheck::new(
            "xlb new-connection rate >= 0.95x the no-translation baseline at every size",
            dp.and_then(|d| {
                let per = vs_direct(d, "xlb");
                let (wn, worst) = per.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1))?;
                Some((
                    format!(
                        "worst {worst:.2}x at {wn} Services ({}{note})",
                        by_size(&per)
                    ),
                    worst >= 0.95,
                ))
            }),
        )
        .with_floor(dp.and_then(|d| {
            // No tc datapath goes faster than no-op programs at its hooks.
            let per = vs_direct(d, DIRECT_NOOP);
            let lowest = per.iter().map(|p| p.1).min_by(f64::total_cmp)?;
            Some(format!(
                "{DIRECT_NOOP} (no-op tc programs at xlb's pod hooks, to a pod) {}{}",
                by_size(&per),
                if lowest < 0.95 {
                    ": the target is below the floor"
                } else {
                    ""
                }
            ))
        })),
    );
    // The closest netfilter mode over all sizes, among `modes`.
    let above = |modes: &[NfMode]| -> Option<(String, bool)> {
        let d = dp?;
        let mut worst: Option<(f64, usize, &str)> = None;
        for n in xlb_sizes(d) {
            let xlb = conn_rate(&d.rows, "xlb", n)?;
            for m in modes {
                if let Some(x) = ratio(Some(xlb), conn_rate(&d.rows, m.label(), n)) {
                    if worst.is_none_or(|w| x < w.0) {
                        worst = Some((x, n, m.label()));
                    }
                }
            }
        }
        let (x, n, m) = worst?;
        Some((
            format!("closest: {x:.2}x of {m} at {n} Services{note}"),
            x > 1.0,
        ))
    };
    out.push(TargetCheck::new(
        "xlb new-connection rate above nftables at every size",
        above(&[NfMode::Nftables]),
    ));
    out.push(TargetCheck::new(
        "xlb new-connection rate above every netfilter mode at every size",
        above(&NfMode::ALL),
    ));

    let cold = r.cold.as_ref();
    let size = |c: &crate::control::ColdResults| {
        format!("{} Services / {} endpoints", c.services, c.endpoints)
    };
    out.push(TargetCheck::new(
        "programming 10k Services / 100k endpoints >= 10x faster than iptables-legacy-restore",
        // Judged on the source a node runs (the Kubernetes API, as the DaemonSet does) when it
        // was measured; the manifests directory (the VM demo's source, YAML parsing most of
        // it) is shown next to it.
        cold.and_then(|c| {
            let legacy = c.netfilter(NfMode::IptablesLegacy)?;
            let files = ratio(Some(legacy), c.xlb_s);
            let kube = ratio(Some(legacy), c.kube_s);
            let files_text = files.map(|x| {
                format!(
                    "{x:.1}x ({:.2} s) from manifests",
                    c.xlb_s.unwrap_or_default()
                )
            });
            match kube {
                Some(x) => Some((
                    format!(
                        "{x:.1}x ({:.2} s vs {legacy:.2} s, {}) from the Kubernetes API; {}",
                        c.kube_s?,
                        size(c),
                        files_text.unwrap_or_else(|| "manifests not measured".into())
                    ),
                    x >= 10.0,
                )),
                None => Some((
                    format!("{} (vs {legacy:.2} s, {})", files_text?, size(c)),
                    files? >= 10.0,
                )),
            }
        }),
    ));
    // What a batched update costs per entry on this kernel (the conntrack fill of the sweep
    // phase), times the first sync's map operations. An estimate, not a proven floor: the
    // conntrack map is an LRU hash, the Service maps are plain hashes and arrays (cheaper per
    // entry), so it is never called impossible on its strength.
    let write_floor = cold.and_then(|c| {
        let s = r.sweep.as_ref().filter(|s| s.entries > 0 && s.fill_s > 0.0)?;
        let ops = c.xlb_apply_ops?;
        let per = s.fill_s / s.entries as f64;
        Some(format!(
            "estimate {:.3} s: {ops} map operations x {:.0} ns, a batched update into the LRU conntrack map (plain hash maps cost less)",
            per * ops as f64,
            per * 1e9,
        ))
    });
    out.push(
        TargetCheck::new(
            "map writes of the first sync alone <= 0.15 s at 10k Services / 100k endpoints",
            cold.and_then(|c| {
                let s = c.xlb_apply_s?;
                Some((format!("{s:.3} s ({})", size(c)), s <= 0.15))
            }),
        )
        .with_floor(write_floor),
    );
    out.push(TargetCheck::new(
        "agent memory under 100 MiB at 10k Services / 100k endpoints",
        // Both sources when both were measured: the manifests directory (the VM demo's) and
        // the Kubernetes API (a node's); the worse one decides.
        cold.and_then(|c| {
            let mib = c.xlb_rss_mib?;
            let kube = c
                .kube_rss_mib
                .map(|k| format!(", {k:.1} MiB from the Kubernetes API"))
                .unwrap_or_default();
            let worst = mib.max(c.kube_rss_mib.unwrap_or(0.0));
            Some((
                format!("{mib:.1} MiB from manifests{kube} ({})", size(c)),
                worst < 100.0,
            ))
        }),
    ));
    out.push(TargetCheck::new(
        "restart read-back of the pinned maps <= 0.5 s at 10k Services / 100k endpoints",
        cold.and_then(|c| {
            let s = c.readback_s?;
            Some((
                format!(
                    "{s:.3} s ({}; restart spawn to ready {})",
                    size(c),
                    c.restart_s
                        .map(|r| format!("{r:.2} s"))
                        .unwrap_or_else(|| "–".into())
                ),
                s <= 0.5,
            ))
        }),
    ));
    out.push(TargetCheck::new(
        "one endpoint change live in under 10 ms p99",
        dp.and_then(|d| d.endpoint_change.as_ref())
            .filter(|c| c.latency.samples > 0)
            .map(|c| {
                let p99_ms = c.latency.p99_us / 1000.0;
                (
                    format!(
                        "p99 {p99_ms:.1} ms (p50 {:.1} ms, {} changes at {} Services)",
                        c.latency.p50_us / 1000.0,
                        c.latency.samples,
                        c.services
                    ),
                    p99_ms < 10.0,
                )
            }),
    ));
    out.push(TargetCheck::new(
        "sweeping a conntrack map of 1M entries (half expired) in <= 1 s",
        r.sweep.as_ref().map(|s| {
            (
                format!(
                    "{:.3} s ({} entries, {} deleted{})",
                    s.sweep_s,
                    s.entries,
                    s.deleted,
                    if s.batched {
                        ""
                    } else {
                        ", per-entry fallback"
                    }
                ),
                s.sweep_s <= 1.0,
            )
        }),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{ChangeResults, ColdResults};
    use crate::datapath::DpResults;
    use crate::pkt::{PktFloor, PktResults, PktRow};
    use crate::progstats::ProgCost;
    use crate::stats::Latency;
    use crate::traffic::ConnResult;

    fn row(mode: &str, services: usize, rate: f64) -> DpRow {
        DpRow {
            mode: mode.into(),
            services,
            conn: ConnResult {
                conns_per_s: rate,
                ..Default::default()
            },
            round_rates: vec![rate],
            setup_s: 0.0,
            agent_rss_mib: None,
        }
    }

    fn cost(program: &str, services: usize, ns: u64) -> ProgCost {
        ProgCost {
            services,
            mode: "xlb".into(),
            traffic: "ClusterIP".into(),
            program: program.into(),
            runs: 1000,
            run_time_ns: ns * 1000,
            connections: 250,
            conns_per_s: 10_000.0,
            ..ProgCost::default()
        }
    }

    fn sample() -> Results {
        let pkt = |n, e, s| PktRow {
            services: n,
            established_ns: e,
            new_flow_ns: s,
            syn_reuse_ns: 0.0,
            reply_ns: 50.0,
            non_service_ns: 40.0,
        };
        Results {
            per_packet: Some(PktResults {
                noop_ns: 30.0,
                rows: vec![pkt(1, 80.0, 140.0), pkt(100_000, 85.0, 160.0)],
                floors: vec![PktFloor {
                    kind: "syn".into(),
                    what: "two LRU inserts".into(),
                    ns: 180.0,
                }],
                ..Default::default()
            }),
            datapath: Some(DpResults {
                rows: vec![
                    row("direct", 1, 1000.0),
                    row("xlb", 1, 990.0),
                    row("iptables-legacy", 1, 900.0),
                    row("nftables", 1, 800.0),
                    row("direct", 10_000, 1000.0),
                    row("xlb", 10_000, 900.0),
                    row("iptables-legacy", 10_000, 400.0),
                    row("nftables", 10_000, 950.0),
                ],
                endpoint_change: Some(ChangeResults {
                    services: 10_000,
                    latency: Latency {
                        samples: 10,
                        p50_us: 2000.0,
                        p99_us: 12_000.0,
                        max_us: 12_000.0,
                    },
                    new_backend_served: true,
                }),
                rounds: 5,
                prog_costs: vec![
                    // The largest size decides.
                    cost("from_pod", 1, 900),
                    cost("to_pod", 1, 450),
                    cost("from_pod", 10_000, 440),
                    cost("to_pod", 10_000, 230),
                ],
                ..Default::default()
            }),
            cold: Some(ColdResults {
                services: 10_000,
                endpoints: 100_000,
                xlb_s: Some(1.0),
                xlb_apply_s: Some(0.12),
                xlb_apply_ops: Some(400_000),
                xlb_rss_mib: Some(40.0),
                readback_s: Some(0.7),
                restart_s: Some(1.1),
                netfilter_s: vec![("iptables-legacy".into(), 25.0)],
                ..Default::default()
            }),
            sweep: Some(crate::sweep::SweepResults {
                entries: 1_000_000,
                deleted: 500_000,
                fill_s: 0.5,
                sweep_s: 1.2,
                batched: true,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn find<'a>(t: &'a [TargetCheck], s: &str) -> &'a TargetCheck {
        t.iter()
            .find(|c| c.target.contains(s))
            .unwrap_or_else(|| panic!("no target {s}: {t:#?}"))
    }

    #[test]
    fn every_target_is_judged_from_the_numbers() {
        let t = evaluate(&sample());
        let met: Vec<Option<bool>> = t.iter().map(|c| c.met).collect();
        // 160/140 = 1.14 (flat); 85/30 = 2.8 (<3); 160/30 = 5.3 (>5); 40/30 = 1.33 (<1.5);
        // to_pod 230 > 225; 0.90 at 10k (<0.95); nftables 950 beats xlb 900; so does not
        // every netfilter mode; 25x faster; writes 0.12 s; 40 MiB; read-back 0.7 s;
        // p99 12 ms; sweep 1.2 s.
        assert_eq!(
            met,
            vec![
                Some(true),
                Some(true),
                Some(false),
                Some(true),
                Some(false),
                Some(false),
                Some(false),
                Some(false),
                Some(true),
                Some(true),
                Some(true),
                Some(false),
                Some(false),
                Some(false),
            ]
        );
        assert!(t[0].measured.contains("new flow"), "{}", t[0].measured);
        let every = find(&t, ">= 0.95x");
        assert!(
            every.measured.contains("worst 0.90x at 10000 Services (1: 0.99x, 10000: 0.90x; medians of 5 interleaved rounds)"),
            "{}",
            every.measured
        );
        let nft = find(&t, "above nftables");
        assert!(
            nft.measured.contains("0.95x of nftables at 10000"),
            "{}",
            nft.measured
        );
        let real = find(&t, "real traffic");
        assert_eq!(
            real.measured,
            "from_pod 440 ns, to_pod 230 ns per run (10000 Services)"
        );
        assert_eq!(find(&t, "SYN").verdict(), "not met");
        // The SYN floor of the probe: 180/30 = 6x, above the 5x target.
        let syn_floor = find(&t, "SYN").floor.clone().unwrap();
        assert!(
            syn_floor.contains("6.00x") && syn_floor.contains("below the floor"),
            "{syn_floor}"
        );
        assert!(find(&t, "established-flow").floor.is_none());
        // 400k operations at 500 ns each (0.5 s for 1M entries): 0.2 s, an estimate only.
        let wf = find(&t, "map writes").floor.clone().unwrap();
        assert!(
            wf.starts_with("estimate 0.200 s") && !wf.contains("below the floor"),
            "{wf}"
        );
        assert!(
            find(&t, "read-back")
                .measured
                .contains("restart spawn to ready 1.10 s"),
            "{:?}",
            find(&t, "read-back")
        );
    }

    /// The no-op station gives the connection-rate and real-traffic targets their floors;
    /// without it they have none.
    #[test]
    fn the_no_op_hooks_are_the_floor_of_the_traffic_targets() {
        let t = evaluate(&sample());
        assert!(find(&t, ">= 0.95x").floor.is_none());
        assert!(find(&t, "real traffic").floor.is_none());
        let mut r = sample();
        let d = r.datapath.as_mut().unwrap();
        d.rows.push(row(DIRECT_NOOP, 1, 980.0));
        d.rows.push(row(DIRECT_NOOP, 10_000, 940.0));
        for (n, ns) in [(1, 90), (10_000, 95)] {
            d.prog_costs.push(ProgCost {
                mode: DIRECT_NOOP.into(),
                traffic: crate::datapath::NOOP_TRAFFIC.into(),
                ..cost("noop_tc", n, ns)
            });
        }
        let t = evaluate(&r);
        let rate = find(&t, ">= 0.95x").floor.clone().unwrap();
        assert!(
            rate.contains("1: 0.98x, 10000: 0.94x") && rate.ends_with("below the floor"),
            "{rate}"
        );
        let real = find(&t, "real traffic").floor.clone().unwrap();
        assert!(
            real.starts_with("95 ns per run") && real.contains("10000 Services"),
            "{real}"
        );
        // The targets themselves are judged on xlb's figures as before.
        assert_eq!(find(&t, ">= 0.95x").met, Some(false));
        assert_eq!(find(&t, "real traffic").met, Some(false));
    }

    #[test]
    fn missing_phases_are_not_measured_rather_than_failed() {
        let t = evaluate(&Results::default());
        assert_eq!(t.len(), 14);
        assert!(t
            .iter()
            .all(|c| c.met.is_none() && c.verdict() == "not measured" && c.floor.is_none()));
    }

    /// Programming is judged on the Kubernetes source when it was measured (the node's path),
    /// with the manifests figure next to it; without it, on the manifests.
    #[test]
    fn programming_is_judged_on_the_kubernetes_source_when_measured() {
        let mut r = sample();
        let manifests_only = find(&evaluate(&r), "programming").clone();
        assert!(
            manifests_only.measured.contains("from manifests"),
            "{manifests_only:?}"
        );
        let c = r.cold.as_mut().unwrap();
        let legacy = c.netfilter(NfMode::IptablesLegacy).unwrap();
        c.kube_s = Some(legacy / 5.0);
        let t = evaluate(&r);
        let p = find(&t, "programming");
        assert_eq!(p.met, Some(false), "{p:?}");
        assert!(
            p.measured.contains("5.0x")
                && p.measured.contains("Kubernetes API")
                && p.measured.contains("from manifests"),
            "{p:?}"
        );
    }

    /// An agent without helper B's log lines: the writes alone and the read-back stay "not
    /// measured" while the rest of the cold phase is judged.
    #[test]
    fn an_older_agent_leaves_its_new_figures_unmeasured() {
        let mut r = sample();
        let c = r.cold.as_mut().unwrap();
        c.xlb_apply_s = None;
        c.readback_s = None;
        let t = evaluate(&r);
        assert_eq!(find(&t, "map writes").met, None);
        assert_eq!(find(&t, "read-back").met, None);
        assert_eq!(find(&t, "programming").met, Some(true));
    }
}
