//! `results.md`: the tables with ratios (the numbers that travel between machines) and one line
//! per target.

use std::fmt::Write as _;

use crate::netfilter::NfMode;
use crate::results::Results;
use crate::stats::ratio;

fn opt(v: Option<f64>, digits: usize, suffix: &str) -> String {
    v.map(|v| format!("{v:.digits$}{suffix}"))
        .unwrap_or_else(|| "–".into())
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
        "Machine: {} ({} CPUs), {}. Run took {:.0} s. Absolute numbers on a shared VM drift from run to run; \
         compare the ratios.\n",
        r.machine.cpu_model, r.machine.cpus, r.machine.kernel, r.elapsed_s
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
            "- {mark} **{}**: {} — {}",
            t.verdict(),
            t.target,
            t.measured
        );
    }
    md.push('\n');

    if let Some(p) = &r.per_packet {
        let _ = writeln!(md, "## Per-packet cost (ns, BPF_PROG_TEST_RUN)\n");
        let _ = writeln!(
            md,
            "No-op floor: {:.0} ns ({}). Method: {}.\n",
            p.noop_ns, p.noop_source, p.method
        );
        let _ = writeln!(md, "| Services | established | new flow (SYN) | reply | non-Service | established / no-op | SYN / no-op | established vs 1st size |");
        let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|");
        let first = p.rows.first().map(|f| f.established_ns);
        for row in &p.rows {
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} |",
                row.services,
                row.established_ns,
                row.new_flow_ns,
                row.reply_ns,
                row.non_service_ns,
                opt(ratio(Some(row.established_ns), Some(p.noop_ns)), 2, "x"),
                opt(ratio(Some(row.new_flow_ns), Some(p.noop_ns)), 2, "x"),
                opt(ratio(Some(row.established_ns), first), 2, "x"),
            );
        }
        md.push('\n');
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
        let _ = writeln!(
            md,
            "| Services | mode | conn/s | vs direct | p50 µs | p99 µs | errors | setup s |"
        );
        let _ = writeln!(md, "|---:|---|---:|---:|---:|---:|---:|---:|");
        let mut sizes: Vec<usize> = d.rows.iter().map(|r| r.services).collect();
        sizes.sort_unstable();
        sizes.dedup();
        for n in sizes {
            let direct = d
                .rows
                .iter()
                .find(|r| r.services == n && r.mode == "direct")
                .map(|r| r.conn.conns_per_s);
            for row in d.rows.iter().filter(|r| r.services == n) {
                let _ = writeln!(
                    md,
                    "| {n} | {} | {:.0} | {} | {:.0} | {:.0} | {} | {:.2} |",
                    row.mode,
                    row.conn.conns_per_s,
                    opt(ratio(Some(row.conn.conns_per_s), direct), 2, "x"),
                    row.conn.latency.p50_us,
                    row.conn.latency.p99_us,
                    row.conn.errors,
                    row.setup_s
                );
            }
        }
        md.push('\n');
        if !d.streams.is_empty() {
            let _ = writeln!(md, "## One long TCP stream\n");
            let _ = writeln!(md, "| mode | Services | Gbit/s | vs direct |");
            let _ = writeln!(md, "|---|---:|---:|---:|");
            let direct = d
                .streams
                .iter()
                .find(|s| s.mode == "direct")
                .map(|s| s.gbit_s);
            for s in &d.streams {
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.2} | {} |",
                    s.mode,
                    s.services,
                    s.gbit_s,
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
            "| xlb agent: first map update alone | {} | |",
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
            "\nAgent RSS when ready: {}.\n",
            opt(c.xlb_rss_mib, 1, " MiB")
        );
    }

    let errors: Vec<&String> = r
        .errors
        .iter()
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
                reply_ns: 60.0,
                non_service_ns: 50.0,
            }],
            ..Default::default()
        });
        r.targets = crate::targets::evaluate(&r);
        let md = render(&r);
        assert_eq!(
            md.lines().filter(|l| l.starts_with("- ")).count(),
            r.targets.len()
        );
        assert!(
            md.contains("| 1 | 80 | 200 | 60 | 50 | 2.00x | 5.00x | 1.00x |"),
            "{md}"
        );
        assert!(md.contains("✅ **met**: established-flow packet within 3x"));
        assert!(md.contains("➖ **not measured**"));
        assert!(!md.contains("## Errors"));
        assert!(!md.contains("## Conntrack sweep"));
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
}
