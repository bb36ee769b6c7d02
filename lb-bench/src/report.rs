//! `results.md`: the tables with ratios (the numbers that travel between machines) and one line
//! per target.

use std::fmt::Write as _;

use crate::netfilter::NfMode;
use crate::results::Results;
use crate::stats::{ratio, Spread};

fn opt(v: Option<f64>, digits: usize, suffix: &str) -> String {
    v.map(|v| format!("{v:.digits$}{suffix}"))
        .unwrap_or_else(|| "–".into())
}

/// "min–max" of the rounds' rates, or – for a single measurement.
fn range(rates: &[f64]) -> String {
    match Spread::of(rates) {
        Some(s) if s.n > 1 => format!("{:.0}–{:.0}", s.min, s.max),
        _ => "–".into(),
    }
}

/// How the connection-rate rows were measured.
fn rounds_text(d: &crate::datapath::DpResults) -> String {
    if d.rounds == 0 {
        return "One point per mode and size.\n".into();
    }
    format!(
        "Every mode on a bed of its own, all live at once; {} interleaved rounds per size (each round \
         through every mode's points in another order, {:.1} s each). conn/s, p50 and p99 are medians \
         over the rounds, range is the lowest and highest round, vs direct is the ratio of medians: \
         the targets are judged on these.\n",
        d.rounds, d.point_s
    )
}

pub fn render(r: &Results) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# xlb benchmark ({})\n",
        if r.quick { "--quick" } else { "full" }
    );
    let _ = writeln!(
        md,
        "Machine: {} ({} CPUs), {}. Run took {:.0} s{}. Absolute numbers on a shared VM drift from run to run; \
         compare the ratios.\n",
        r.machine.cpu_model,
        r.machine.cpus,
        r.machine.kernel,
        r.elapsed_s,
        if r.phases_s.is_empty() {
            String::new()
        } else {
            let p: Vec<String> = r
                .phases_s
                .iter()
                .map(|(k, v)| format!("{k} {v:.0} s"))
                .collect();
            format!(" ({})", p.join(", "))
        }
    );

    let _ = writeln!(md, "## Targets\n");
    for t in &r.targets {
        let mark = match t.met {
            Some(true) => "✅",
            Some(false) => "❌",
            None => "➖",
        };
        let _ = writeln!(
            md,
            "- {mark} **{}**: {} — {}{}",
            t.verdict(),
            t.target,
            t.measured,
            t.floor
                .as_ref()
                .map(|f| format!(" (floor: {f})"))
                .unwrap_or_default()
        );
    }
    md.push('\n');

    if let Some(p) = &r.per_packet {
        let _ = writeln!(md, "## Per-packet cost (ns, BPF_PROG_TEST_RUN)\n");
        let _ = writeln!(
            md,
            "No-op floor: {:.0} ns ({}){}. Method: {}.\n",
            p.noop_ns,
            p.noop_source,
            p.noop_xdp_ns
                .map(|x| format!("; XDP no-op floor (noop_xdp): {x:.0} ns"))
                .unwrap_or_default(),
            p.method
        );
        if !p.probes.is_empty() {
            let probes: Vec<String> = p
                .probes
                .iter()
                .map(|(n, ns)| format!("`{n}` {ns:.0} ns"))
                .collect();
            let floors: Vec<String> = p
                .floors
                .iter()
                .map(|f| {
                    format!(
                        "{} >= {:.0} ns ({}; {})",
                        f.kind,
                        f.ns,
                        opt(ratio(Some(f.ns), Some(p.noop_ns)), 2, "x of the no-op"),
                        f.what
                    )
                })
                .collect();
            let _ = writeln!(
                md,
                "Floor probes (programs of the object that parse and do one primitive, on fresh tuples at the largest size): {}. \
                 Floors: {}.\n",
                probes.join(", "),
                if floors.is_empty() { "–".to_string() } else { floors.join("; ") }
            );
        }
        let _ = writeln!(md, "SYN, port re-used: a SYN on the tuple of a closed flow of the same client port, which a busy client's connections meet \
            (a closed flow lives on for the close timeout); the new flow takes the old one's entries over.\n");
        let _ = writeln!(md, "| Services | established | new flow (SYN) | SYN, port re-used | reply | non-Service | established / no-op | SYN / no-op | established vs 1st size |");
        let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let first = p.rows.first().map(|f| f.established_ns);
        for row in &p.rows {
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {} | {} | {} |",
                row.services,
                row.established_ns,
                row.new_flow_ns,
                opt(Some(row.syn_reuse_ns).filter(|&n| n > 0.0), 0, ""),
                row.reply_ns,
                row.non_service_ns,
                opt(ratio(Some(row.established_ns), Some(p.noop_ns)), 2, "x"),
                opt(ratio(Some(row.new_flow_ns), Some(p.noop_ns)), 2, "x"),
                opt(ratio(Some(row.established_ns), first), 2, "x"),
            );
        }
        md.push('\n');
        if !p.external.is_empty() {
            let _ = writeln!(
                md,
                "### External path: NodePort packets from outside the node (ns)\n\n\
                 `from_net_xdp` (hook xdp) and `from_net` (hook tc, tc ingress) on TCP packets from an external client to a \
                 NodePort on the node's address. Local: the backend runs on this node (DNAT, pass to the stack). Remote: \
                 it runs on another node (DNAT + SNAT to the node's address, FIB lookup, redirect); reply: its answer to the \
                 node's SNAT port (restored, FIB lookup, redirect). A new-flow SYN's conntrack pair is removed after its run, \
                 outside the timing. SYN re-used: a SYN to the local NodePort on the tuple of the same client's closed flow \
                 (a RST, untimed, closed it), which the new flow takes over. Ratios are to the no-op of the same hook.\n"
            );
            let _ = writeln!(md, "| Services | hook | established, local | SYN, local | SYN re-used, local | established, remote | SYN, remote | reply, remote | non-Service | no-op | established local / no-op | SYN local / no-op | established remote / no-op | SYN remote / no-op |");
            let _ = writeln!(
                md,
                "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            for row in &p.external {
                let floor = if row.hook == "xdp" {
                    p.noop_xdp_ns
                } else {
                    Some(p.noop_ns)
                };
                let x = |v: f64| opt(ratio(Some(v), floor), 2, "x");
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {} |",
                    row.services,
                    row.hook,
                    row.established_local_ns,
                    row.new_flow_local_ns,
                    // 0: a result of an older run, which did not measure it.
                    opt(Some(row.syn_reuse_local_ns).filter(|v| *v > 0.0), 0, ""),
                    row.established_remote_ns,
                    row.new_flow_remote_ns,
                    row.reply_remote_ns,
                    row.non_service_ns,
                    opt(floor, 0, ""),
                    x(row.established_local_ns),
                    x(row.new_flow_local_ns),
                    x(row.established_remote_ns),
                    x(row.new_flow_remote_ns),
                );
            }
            md.push('\n');
        }
    }

    if let Some(s) = &r.sweep {
        let _ = writeln!(md, "## Conntrack sweep\n");
        let _ = writeln!(
            md,
            "The agent's sweeper over a conntrack map (LRU hash, capacity {}) holding flows as the datapath writes them, \
             {}; a complete sweep unless noted, seconds of work.\n",
            s.max_entries,
            if s.batched { "batched lookups and deletes" } else { "per-entry operations (no batch ops in this kernel)" }
        );
        let _ = writeln!(md, "| what | entries | deleted | seconds |");
        let _ = writeln!(md, "|---|---:|---:|---:|");
        let mut rows = vec![
            (
                "fill (batched updates)".to_string(),
                s.entries,
                None,
                s.fill_s,
            ),
            (
                format!("sweep, {} expired", s.expired),
                s.entries,
                Some(s.deleted),
                s.sweep_s,
            ),
            (
                "sweep again, nothing expired".into(),
                s.resweep_entries,
                Some(0),
                s.resweep_s,
            ),
            (
                "sliced sweep as the agent runs it (fresh fill)".into(),
                s.entries,
                Some(s.deleted),
                s.sliced_s,
            ),
        ];
        if let Some(p) = s.per_entry_s {
            rows.push((
                "per-entry fallback (fresh fill)".into(),
                s.entries,
                Some(s.deleted),
                p,
            ));
        }
        for (what, entries, deleted, secs) in rows {
            let deleted = deleted.map(|d| d.to_string()).unwrap_or_default();
            let _ = writeln!(md, "| {what} | {entries} | {deleted} | {secs:.3} |");
        }
        let _ = writeln!(
            md,
            "\nThe sliced sweep took {} slices, the longest {:.2} ms: the agent handles events between slices.\n",
            s.slices, s.max_slice_ms
        );
    }

    if let Some(d) = &r.datapath {
        let _ = writeln!(md, "## New connections to the last Service (one sequential client, fresh connection per request, SO_LINGER 0)\n");
        let labels = crate::datapath::row_labels();
        if d.rows.iter().any(|r| r.mode.starts_with("xlb-socklb")) {
            let _ = writeln!(
                md,
                "xlb: the tc path (`--socket-lb off`, from_pod / to_pod translate every packet). \
                 xlb-socklb: `--socket-lb all`, the client pod's socket gets a backend at connect(2) \
                 (no per-packet NAT, no conntrack). Host-network client in node1's namespace: \
                 direct-host to the pod, xlb-socklb-host to the ClusterIP with `--socket-lb host`; \
                 its \"vs direct\" is to direct-host. The socket programs are attached to a child \
                 cgroup holding the benchmark while these rows run; every connection is counted \
                 in `sock_translated`.\n"
            );
        }
        if d.rows
            .iter()
            .any(|r| r.mode == crate::datapath::DIRECT_NOOP)
        {
            let _ = writeln!(
                md,
                "{}: the client pod to a pod, as direct, through the object's no-op tc program \
                 (`noop_tc`) attached where the agent attaches from_pod and to_pod (TCX ingress and \
                 egress of node1's pod veths): what any tc datapath costs this traffic before it \
                 does any work, the floor of the connection-rate target.\n",
                crate::datapath::DIRECT_NOOP
            );
        }
        let _ = writeln!(md, "{}", rounds_text(d));
        let _ = writeln!(
            md,
            "| Services | mode | conn/s | range | vs direct | p50 µs | p99 µs | errors | setup s |"
        );
        let _ = writeln!(md, "|---:|---|---:|---:|---:|---:|---:|---:|---:|");
        let mut sizes: Vec<usize> = d.rows.iter().map(|r| r.services).collect();
        sizes.sort_unstable();
        sizes.dedup();
        for n in sizes {
            let baseline = |mode: &str| {
                let base = crate::datapath::baseline_of(mode);
                d.rows
                    .iter()
                    .find(|r| r.services == n && r.mode == base)
                    .map(|r| r.conn.conns_per_s)
            };
            let mut rows: Vec<_> = d.rows.iter().filter(|r| r.services == n).collect();
            rows.sort_by_key(|r| {
                labels
                    .iter()
                    .position(|l| *l == r.mode)
                    .unwrap_or(usize::MAX)
            });
            for row in rows {
                let direct = baseline(&row.mode);
                let _ = writeln!(
                    md,
                    "| {n} | {} | {:.0} | {} | {} | {:.0} | {:.0} | {} | {:.2} |",
                    row.mode,
                    row.conn.conns_per_s,
                    range(&row.round_rates),
                    opt(ratio(Some(row.conn.conns_per_s), direct), 2, "x"),
                    row.conn.latency.p50_us,
                    row.conn.latency.p99_us,
                    row.conn.errors,
                    row.setup_s
                );
            }
        }
        md.push('\n');
        if !d.external.is_empty() {
            let _ = writeln!(
                md,
                "## New connections from outside the node to a NodePort (external client, same client loop)\n\n\
                 To node1's address and nodePort; local: the Service's pods run on node1, remote: on node2 (node1 SNATs). \
                 direct: the external client connects to the pod itself, routed through node1 (no translation; a pod on node2 \
                 answers it straight from node2). \
                 xlb: from_net at tc ingress only, the agent's default (`--xdp-mode auto`) on this veth uplink; \
                 xlb-native-xdp: native XDP; xlb-generic: generic XDP. The netfilter modes masquerade NodePort traffic (externalTrafficPolicy Cluster), \
                 local backends included; xlb SNATs only flows to remote backends.\n"
            );
            let _ = writeln!(
                md,
                "| Services | backend | mode | conn/s | range | vs direct | p50 µs | p99 µs | errors |"
            );
            let _ = writeln!(md, "|---:|---|---|---:|---:|---:|---:|---:|---:|");
            let mut keys: Vec<(usize, &str)> = d
                .external
                .iter()
                .map(|r| (r.services, r.backend.as_str()))
                .collect();
            keys.sort_unstable();
            keys.dedup();
            for (n, backend) in keys {
                let here = || {
                    d.external
                        .iter()
                        .filter(move |r| r.services == n && r.backend == backend)
                };
                let direct = here()
                    .find(|r| r.mode == "direct")
                    .map(|r| r.conn.conns_per_s);
                let mut rows: Vec<_> = here().collect();
                rows.sort_by_key(|r| {
                    crate::datapath::external_labels()
                        .iter()
                        .position(|l| *l == r.mode)
                        .unwrap_or(usize::MAX)
                });
                for row in rows {
                    let _ = writeln!(
                        md,
                        "| {n} | {backend} | {} | {:.0} | {} | {} | {:.0} | {:.0} | {} |",
                        row.mode,
                        row.conn.conns_per_s,
                        range(&row.round_rates),
                        opt(ratio(Some(row.conn.conns_per_s), direct), 2, "x"),
                        row.conn.latency.p50_us,
                        row.conn.latency.p99_us,
                        row.conn.errors,
                    );
                }
            }
            md.push('\n');
        }
        if !d.prog_costs.is_empty() {
            let _ = writeln!(
                md,
                "## Real-traffic cost per program run (kernel run statistics)\n\n\
                 More connection-rate points per kind of traffic after the rounds of each size, on the xlb \
                 agent of the rows above, on the `--socket-lb all` agent and on the no-op programs of {}, with \
                 the kernel's run statistics on ({}); never during the rounds (counting adds two clock reads to \
                 every run). `run_time_ns / run_cnt` of each program behind the agent's pinned links \
                 (`BPF_OBJ_GET_INFO_BY_FD`), over a point; connections include the warm-up. Each point is \
                 counted {} times in turn: ns / run and the counts are of the repeat of median cost, range is \
                 the lowest and highest repeat. The no-op's cost per run is the floor of the real-traffic \
                 target: the hook, the program call and the counting.\n",
                crate::datapath::DIRECT_NOOP,
                d.stats_method.as_deref().unwrap_or("kernel.bpf_stats_enabled"),
                d.prog_costs.iter().map(|c| c.repeats.max(1)).max().unwrap_or(1)
            );
            let _ = writeln!(
                md,
                "| Services | mode | traffic | program | ns / run | range | runs / connection | runs | conn/s while counting |"
            );
            let _ = writeln!(md, "|---:|---|---|---|---:|---:|---:|---:|---:|");
            for c in &d.prog_costs {
                let range = c
                    .ns_range
                    .map(|(lo, hi)| format!("{lo:.0}–{hi:.0}"))
                    .unwrap_or_default();
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {:.0} |",
                    c.services,
                    c.mode,
                    c.traffic,
                    c.program,
                    opt(c.ns_per_run(), 0, ""),
                    range,
                    opt(c.runs_per_conn(), 1, ""),
                    c.runs,
                    c.conns_per_s
                );
            }
            md.push('\n');
        }
        if !d.streams.is_empty() {
            let _ = writeln!(md, "## One long TCP stream\n");
            let _ = writeln!(
                md,
                "Median of the samples of one long stream per mode (range: lowest and highest).\n"
            );
            let _ = writeln!(md, "| mode | Services | Gbit/s | range | vs direct |");
            let _ = writeln!(md, "|---|---:|---:|---:|---:|");
            let direct = d
                .streams
                .iter()
                .find(|s| s.mode == "direct")
                .map(|s| s.gbit_s);
            for s in &d.streams {
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.2} | {} | {} |",
                    s.mode,
                    s.services,
                    s.gbit_s,
                    s.range
                        .map(|(lo, hi)| format!("{lo:.2}–{hi:.2}"))
                        .unwrap_or_default(),
                    opt(ratio(Some(s.gbit_s), direct), 2, "x")
                );
            }
            md.push('\n');
        }
        if let Some(c) = &d.endpoint_change {
            let _ = writeln!(
                md,
                "Endpoint change at {} Services (manifest rewritten → maps hold the new backend): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} changes; new pod served afterwards: {}.\n",
                c.services,
                c.latency.p50_us / 1000.0,
                c.latency.p99_us / 1000.0,
                c.latency.max_us / 1000.0,
                c.latency.samples,
                if c.new_backend_served { "yes" } else { "NO" }
            );
        }
        let rss: Vec<String> = d
            .rows
            .iter()
            .filter_map(|r| {
                r.agent_rss_mib
                    .map(|m| format!("{} Services: {m:.1} MiB", r.services))
            })
            .collect();
        if !rss.is_empty() {
            let _ = writeln!(md, "Agent RSS in the datapath runs: {}.\n", rss.join(", "));
        }
    }

    if let Some(c) = &r.cold {
        let _ = writeln!(
            md,
            "## Programming {} Services / {} endpoints from cold\n",
            c.services, c.endpoints
        );
        let _ = writeln!(md, "| what | seconds | vs xlb |");
        let _ = writeln!(md, "|---|---:|---:|");
        let _ = writeln!(
            md,
            "| xlb agent: spawn to ready | {} | 1.00x |",
            opt(c.xlb_s, 3, "")
        );
        let _ = writeln!(
            md,
            "| xlb agent: first sync (events, model, plan, map writes) | {} | |",
            opt(c.xlb_sync_s, 3, "")
        );
        for (phase, secs) in &c.startup_phases {
            let _ = writeln!(md, "| xlb agent: first sync, {phase} | {secs:.3} | |");
        }
        let _ = writeln!(
            md,
            "| xlb agent: map writes of the first sync alone{} | {} | |",
            c.xlb_apply_ops
                .map(|o| format!(" ({o} operations)"))
                .unwrap_or_default(),
            opt(c.xlb_apply_s, 3, "")
        );
        for m in NfMode::ALL {
            let s = c.netfilter(m);
            let tool = match m {
                NfMode::IptablesLegacy => "iptables-legacy-restore",
                NfMode::IptablesNft => "iptables-nft-restore",
                NfMode::Nftables => "nft -f",
            };
            let _ = writeln!(
                md,
                "| {tool} | {} | {} |",
                opt(s, 3, ""),
                opt(ratio(s, c.xlb_s), 1, "x")
            );
        }
        let _ = writeln!(
            md,
            "| xlb agent, Kubernetes source (the same objects listed from the fake API server): spawn to ready | {} | {} |",
            opt(c.kube_s, 3, ""),
            opt(ratio(c.kube_s, c.xlb_s), 2, "x")
        );
        let _ = writeln!(
            md,
            "| xlb agent, Kubernetes source: map writes of the first sync alone | {} | |",
            opt(c.kube_apply_s, 3, "")
        );
        let _ = writeln!(
            md,
            "| xlb agent restarted on its pins: spawn to ready | {} | |",
            opt(c.restart_s, 3, "")
        );
        let _ = writeln!(
            md,
            "| xlb agent restarted: read-back of the pinned maps{} | {} | |",
            match (c.readback_frontends, c.readback_backends) {
                (Some(f), Some(b)) => format!(" ({f} frontends, {b} backends)"),
                _ => String::new(),
            },
            opt(c.readback_s, 3, "")
        );
        let _ = writeln!(
            md,
            "\nAgent RSS when ready: {}; after the restart: {}; with the Kubernetes source: {}. A \
             figure the agent does not log (an agent before issue 12) shows as –.\n",
            opt(c.xlb_rss_mib, 1, " MiB"),
            opt(c.restart_rss_mib, 1, " MiB"),
            opt(c.kube_rss_mib, 1, " MiB")
        );
        if !c.runs.is_empty() {
            // One cold start varies by 5-20% on a shared VM: the targets' figures are medians.
            let runs: Vec<String> = c
                .runs
                .iter()
                .map(|(what, secs)| {
                    let each: Vec<String> = secs.iter().map(|s| format!("{s:.3}")).collect();
                    format!("{what}: {} s", each.join(", "))
                })
                .collect();
            let _ = writeln!(
                md,
                "xlb (both sources, RSS included) and iptables-legacy-restore are the medians of \
                 {} cold starts each, the other netfilter modes one run; the restart is of the \
                 last xlb run. Runs: {}.\n",
                crate::control::COLD_RUNS,
                runs.join("; ")
            );
        }
    }

    let pkt_external_error = r
        .per_packet
        .as_ref()
        .and_then(|p| p.external_error.as_ref())
        .map(|e| format!("per-packet, external path: {e}"));
    let errors: Vec<&String> = r
        .errors
        .iter()
        .chain(pkt_external_error.iter())
        .chain(r.datapath.iter().flat_map(|d| d.errors.iter()))
        .chain(r.cold.iter().flat_map(|c| c.errors.iter()))
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(md, "## Errors\n");
        for e in errors {
            let _ = writeln!(md, "- {}", e.replace('\n', " "));
        }
        md.push('\n');
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_has_a_line_per_target_and_the_ratios() {
        let mut r = Results::default();
        r.per_packet = Some(crate::pkt::PktResults {
            noop_ns: 40.0,
            rows: vec![crate::pkt::PktRow {
                services: 1,
                established_ns: 80.0,
                new_flow_ns: 200.0,
                syn_reuse_ns: 150.0,
                reply_ns: 60.0,
                non_service_ns: 50.0,
            }],
            ..Default::default()
        });
        r.targets = crate::targets::evaluate(&r);
        r.elapsed_s = 20.0;
        r.phases_s = vec![("pkt".into(), 12.3), ("cold".into(), 7.0)];
        let md = render(&r);
        assert!(md.contains("Run took 20 s (pkt 12 s, cold 7 s)."), "{md}");
        assert_eq!(
            md.lines().filter(|l| l.starts_with("- ")).count(),
            r.targets.len()
        );
        assert!(
            md.contains("| 1 | 80 | 200 | 150 | 60 | 50 | 2.00x | 5.00x | 1.00x |"),
            "{md}"
        );
        assert!(md.contains("✅ **met**: established-flow packet within 3x"));
        assert!(md.contains("➖ **not measured**"));
        assert!(!md.contains("## Errors"));
        assert!(!md.contains("## Conntrack sweep"));
        assert!(!md.contains("External path") && !md.contains("NodePort"));
    }

    #[test]
    fn report_has_the_external_rows_with_ratios_to_their_floor_and_to_direct() {
        use crate::datapath::{DpResults, ExtRow};
        use crate::traffic::ConnResult;
        let ext = |mode: &str, backend: &str, rate: f64| ExtRow {
            mode: mode.into(),
            backend: backend.into(),
            services: 1000,
            conn: ConnResult {
                conns_per_s: rate,
                ..Default::default()
            },
            round_rates: vec![],
        };
        let r = Results {
            per_packet: Some(crate::pkt::PktResults {
                noop_ns: 40.0,
                noop_xdp_ns: Some(20.0),
                external: vec![
                    crate::pkt::ExtPktRow {
                        services: 1,
                        hook: "xdp".into(),
                        established_local_ns: 100.0,
                        new_flow_local_ns: 300.0,
                        syn_reuse_local_ns: 250.0,
                        established_remote_ns: 150.0,
                        new_flow_remote_ns: 400.0,
                        reply_remote_ns: 120.0,
                        non_service_ns: 60.0,
                    },
                    crate::pkt::ExtPktRow {
                        services: 1,
                        hook: "tc".into(),
                        established_local_ns: 100.0,
                        new_flow_local_ns: 300.0,
                        syn_reuse_local_ns: 0.0,
                        established_remote_ns: 160.0,
                        new_flow_remote_ns: 400.0,
                        reply_remote_ns: 130.0,
                        non_service_ns: 70.0,
                    },
                ],
                external_error: Some("tc at 10 Services: boom".into()),
                ..Default::default()
            }),
            datapath: Some(DpResults {
                external: vec![
                    ext("nftables", "remote", 500.0),
                    ext("xlb", "remote", 900.0),
                    ext("direct", "remote", 1000.0),
                    ext("direct", "local", 2000.0),
                    ext("xlb", "local", 1900.0),
                ],
                ..Default::default()
            }),
            ..Default::default()
        };
        let md = render(&r);
        assert!(md.contains("XDP no-op floor (noop_xdp): 20 ns"), "{md}");
        assert!(
            md.contains("| 1 | xdp | 100 | 300 | 250 | 150 | 400 | 120 | 60 | 20 | 5.00x | 15.00x | 7.50x | 20.00x |"),
            "{md}"
        );
        assert!(
            md.contains("| 1 | tc | 100 | 300 | – | 160 | 400 | 130 | 70 | 40 | 2.50x | 7.50x | 4.00x | 10.00x |"),
            "{md}"
        );
        // Local rows first, direct first within a backend, ratios to that backend's direct.
        let local = md
            .find("| 1000 | local | direct | 2000 | – | 1.00x")
            .expect("local direct row");
        let xlb_local = md
            .find("| 1000 | local | xlb | 1900 | – | 0.95x")
            .expect("local xlb row");
        let remote = md
            .find("| 1000 | remote | direct | 1000 | – | 1.00x")
            .expect("remote direct");
        let xlb_remote = md
            .find("| 1000 | remote | xlb | 900 | – | 0.90x")
            .expect("remote xlb");
        let nft = md
            .find("| 1000 | remote | nftables | 500 | – | 0.50x")
            .expect("remote nft");
        assert!(local < xlb_local && xlb_local < remote && remote < xlb_remote && xlb_remote < nft);
        assert!(
            md.contains("- per-packet, external path: tc at 10 Services: boom"),
            "{md}"
        );
    }

    #[test]
    fn socket_lb_rows_sit_after_xlb_and_host_rows_compare_to_the_host_baseline() {
        use crate::datapath::{DpResults, DpRow};
        use crate::traffic::ConnResult;
        let row = |mode: &str, rate: f64| DpRow {
            mode: mode.into(),
            services: 1000,
            conn: ConnResult {
                conns_per_s: rate,
                ..Default::default()
            },
            round_rates: vec![rate, rate],
            setup_s: 0.0,
            agent_rss_mib: None,
        };
        let r = Results {
            datapath: Some(DpResults {
                rows: vec![
                    row("direct", 1000.0),
                    row("direct-host", 2000.0),
                    row("xlb", 900.0),
                    row("nftables", 800.0),
                    row("xlb-socklb", 990.0),
                    row("xlb-socklb-host", 1900.0),
                ],
                ..Default::default()
            }),
            ..Default::default()
        };
        let md = render(&r);
        let at = |s: &str| md.find(s).unwrap_or_else(|| panic!("{s} missing:\n{md}"));
        let order = [
            at("| 1000 | direct | 1000 | 1000–1000 | 1.00x |"),
            at("| 1000 | direct-host | 2000 | 2000–2000 | 1.00x |"),
            at("| 1000 | xlb | 900 | 900–900 | 0.90x |"),
            at("| 1000 | xlb-socklb | 990 | 990–990 | 0.99x |"),
            at("| 1000 | xlb-socklb-host | 1900 | 1900–1900 | 0.95x |"),
            at("| 1000 | nftables | 800 | 800–800 | 0.80x |"),
        ];
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{md}");
        assert!(md.contains("`--socket-lb all`"), "{md}");
    }

    #[test]
    fn report_has_the_sweep_rows() {
        let r = Results {
            sweep: Some(crate::sweep::SweepResults {
                entries: 1_000_000,
                expired: 500_000,
                deleted: 500_000,
                sweep_s: 0.4321,
                slices: 200,
                max_slice_ms: 2.5,
                batched: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let md = render(&r);
        assert!(
            md.contains("| sweep, 500000 expired | 1000000 | 500000 | 0.432 |"),
            "{md}"
        );
        assert!(md.contains("200 slices, the longest 2.50 ms"), "{md}");
        assert!(!md.contains("per-entry fallback (fresh fill)"), "{md}");
    }

    /// The rounds' range next to the median, the program costs, the cold phase's new figures
    /// and a target's floor.
    #[test]
    fn report_has_ranges_program_costs_readback_and_floors() {
        use crate::control::ColdResults;
        use crate::datapath::{DpResults, DpRow};
        use crate::progstats::ProgCost;
        use crate::traffic::ConnResult;
        let row = |mode: &str, rates: Vec<f64>| DpRow {
            mode: mode.into(),
            services: 10,
            conn: ConnResult {
                conns_per_s: Spread::of(&rates).unwrap().median,
                ..Default::default()
            },
            round_rates: rates,
            setup_s: 0.5,
            agent_rss_mib: None,
        };
        let mut r = Results {
            datapath: Some(DpResults {
                rows: vec![
                    row("direct", vec![1000.0, 1100.0, 900.0]),
                    row("xlb", vec![990.0, 700.0, 1000.0]),
                ],
                rounds: 3,
                point_s: 0.8,
                prog_costs: vec![ProgCost {
                    services: 10,
                    mode: "xlb".into(),
                    traffic: "ClusterIP".into(),
                    program: "from_pod".into(),
                    runs: 4000,
                    run_time_ns: 2_000_000,
                    connections: 1000,
                    conns_per_s: 9000.0,
                    repeats: 3,
                    ns_range: Some((480.0, 610.0)),
                }],
                stats_method: Some("BPF_ENABLE_STATS".into()),
                ..Default::default()
            }),
            cold: Some(ColdResults {
                services: 10_000,
                endpoints: 100_000,
                xlb_s: Some(0.8),
                xlb_sync_s: Some(0.5),
                xlb_apply_s: Some(0.1),
                xlb_apply_ops: Some(300_000),
                startup_phases: vec![("parse".into(), 0.3), ("write".into(), 0.1)],
                restart_s: Some(0.9),
                readback_s: Some(0.2),
                readback_frontends: Some(10_000),
                readback_backends: Some(100_000),
                ..Default::default()
            }),
            ..Default::default()
        };
        r.targets = crate::targets::evaluate(&r);
        r.targets[0].floor = Some("5.00x (150 ns: a probe)".into());
        let md = render(&r);
        assert!(md.contains("3 interleaved rounds per size"), "{md}");
        assert!(md.contains("Run took 0 s."), "{md}");
        assert!(
            md.contains("| 10 | direct | 1000 | 900–1100 | 1.00x |"),
            "{md}"
        );
        assert!(md.contains("| 10 | xlb | 990 | 700–1000 | 0.99x |"), "{md}");
        assert!(
            md.contains("| 10 | xlb | ClusterIP | from_pod | 500 | 480–610 | 4.0 | 4000 | 9000 |"),
            "{md}"
        );
        assert!(md.contains("(BPF_ENABLE_STATS)"), "{md}");
        assert!(
            md.contains("| xlb agent: first sync, parse | 0.300 | |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| xlb agent: map writes of the first sync alone (300000 operations) | 0.100 | |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| xlb agent restarted: read-back of the pinned maps (10000 frontends, 100000 backends) | 0.200 | |"),
            "{md}"
        );
        assert!(md.contains(" (floor: 5.00x (150 ns: a probe))"), "{md}");
        assert!(md.contains("✅ **met**: restart read-back"), "{md}");
    }
}
