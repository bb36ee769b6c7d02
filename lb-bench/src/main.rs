//! `xlb-bench [--quick] [--out target/bench]`: xlb next to kube-proxy's iptables and nftables
//! shapes, side by side in one run on the same netns topology (issue 5). Run from the workspace
//! root, as root; `cargo xtask bench [--quick]` does exactly that.

mod agentlog;
mod bed;
mod control;
mod datapath;
mod interrupt;
mod netfilter;
mod noophooks;
mod pkt;
mod plot;
mod progstats;
mod report;
mod results;
mod rules;
mod settle;
mod socklb;
mod stats;
mod sweep;
mod targets;
mod traffic;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use crate::datapath::{DpPlan, XdpMode};
use crate::pkt::PktPlan;
use crate::results::{Machine, Results};

/// Name prefix of every namespace and pin directory the benchmark creates.
pub const BASE: &str = "xlbb";

#[derive(Parser)]
#[command(
    name = "xlb-bench",
    about = "xlb vs kube-proxy (iptables-legacy, iptables-nft, nftables), side by side"
)]
struct Cli {
    /// A smaller set that finishes in under 5 minutes.
    #[arg(long)]
    quick: bool,
    /// Where results.json, results.md and the plots go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Only redraw results.md and the plots from an existing results.json in --out.
    #[arg(long)]
    report_only: bool,
    /// Run only these phases (comma-separated); default: all.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Phase>,
    /// Interleaved connection-rate rounds per size (default: 5, --quick: 3).
    #[arg(long)]
    rounds: Option<usize>,
}

/// The phases of a run, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Phase {
    /// Per-packet cost (BPF_PROG_TEST_RUN).
    Pkt,
    /// Conntrack sweep.
    Sweep,
    /// Connections through the netns cluster (ClusterIP and NodePort).
    Datapath,
    /// Programming from cold.
    Cold,
}

/// What one run measures.
struct Plan {
    pkt_sizes: &'static [usize],
    pkt: PktPlan,
    dp: DpPlan,
    cold_services: usize,
    cold_endpoints_per_service: usize,
    /// Entries in the conntrack map whose sweep is timed.
    sweep_entries: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Plan {
                pkt_sizes: &[1, 1_000, 10_000, 100_000],
                pkt: PktPlan {
                    rounds: 5,
                    samples_per_round: 2_000,
                },
                dp: DpPlan {
                    sizes: &[1, 1_000, 10_000],
                    point: Duration::from_millis(500),
                    rounds: 3,
                    max_requests: 200_000,
                    stream: Duration::from_secs(1),
                    endpoint_changes: 20,
                    xdp_modes: &[XdpMode::Off, XdpMode::Native],
                },
                cold_services: 1_000,
                cold_endpoints_per_service: 10,
                sweep_entries: 1_000_000,
            }
        } else {
            Plan {
                pkt_sizes: &[1, 1_000, 10_000, 100_000],
                pkt: PktPlan {
                    rounds: 9,
                    samples_per_round: 10_000,
                },
                dp: DpPlan {
                    sizes: &[1, 1_000, 10_000],
                    point: Duration::from_secs(2),
                    rounds: 5,
                    max_requests: 1_000_000,
                    stream: Duration::from_secs(3),
                    endpoint_changes: 100,
                    xdp_modes: &XdpMode::ALL,
                },
                cold_services: 10_000,
                cold_endpoints_per_service: 10,
                sweep_entries: 1_000_000,
            }
        }
    }

    /// Progress steps of the phases that run: floors + sizes, conntrack sweep, the datapath
    /// points, 3 netfilter + xlb.
    fn steps(&self, runs: impl Fn(Phase) -> bool) -> u64 {
        [
            (Phase::Pkt, 1 + self.pkt_sizes.len()),
            (Phase::Sweep, 1),
            (Phase::Datapath, self.dp.steps()),
            (Phase::Cold, 4),
        ]
        .into_iter()
        .filter(|(p, _)| runs(*p))
        .map(|(_, n)| n as u64)
        .sum()
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    std::fs::create_dir_all(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    if cli.report_only {
        let json = std::fs::read_to_string(cli.out.join("results.json"))?;
        let mut r: Results = serde_json::from_str(&json)?;
        r.targets = targets::evaluate(&r);
        return write_outputs(&r, &cli.out);
    }
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!("xlb-bench needs root (network namespaces, BPF, netfilter)");
    }
    interrupt::install()?;
    // First: the cleanup of leftovers runs `xlb cleanup` of this binary.
    ensure_xlb_binary()?;
    for leftover in lb_testkit::cleanup_stale(BASE) {
        eprintln!("removed leftover of an earlier run: {leftover}");
    }

    let mut plan = Plan::new(cli.quick);
    if let Some(r) = cli.rounds {
        plan.dp.rounds = r.max(1);
    }
    let runs = |p: Phase| cli.only.is_empty() || cli.only.contains(&p);
    let bar = ProgressBar::new(plan.steps(runs));
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let started = Instant::now();
    let mut r = Results {
        quick: cli.quick,
        machine: Machine::detect(),
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        ..Default::default()
    };
    let step = |msg: &str| {
        bar.inc(1);
        bar.set_message(msg.to_string());
    };

    if runs(Phase::Pkt) {
        let phase_started = Instant::now();
        bar.set_message("per-packet cost");
        match pkt::run(plan.pkt_sizes, plan.pkt, step) {
            Ok(p) => r.per_packet = Some(p),
            Err(e) => r.errors.push(format!("per-packet: {e:#}")),
        }
        r.phases_s
            .push(("pkt".into(), phase_started.elapsed().as_secs_f64()));
        interrupt::check()?;
    }
    if runs(Phase::Sweep) {
        let phase_started = Instant::now();
        bar.set_message("conntrack sweep");
        match sweep::run(plan.sweep_entries, !cli.quick) {
            Ok(s) => r.sweep = Some(s),
            Err(e) => r.errors.push(format!("conntrack sweep: {e:#}")),
        }
        step("conntrack sweep");
        r.phases_s
            .push(("sweep".into(), phase_started.elapsed().as_secs_f64()));
        interrupt::check()?;
    }
    if runs(Phase::Datapath) {
        let phase_started = Instant::now();
        bar.set_message("connections through the netns cluster");
        match datapath::run(&plan.dp, step) {
            Ok(d) => r.datapath = Some(d),
            Err(e) => r.errors.push(format!("datapath: {e:#}")),
        }
        r.phases_s
            .push(("datapath".into(), phase_started.elapsed().as_secs_f64()));
        interrupt::check()?;
    }
    if runs(Phase::Cold) {
        let phase_started = Instant::now();
        bar.set_message("cold programming");
        match control::cold(plan.cold_services, plan.cold_endpoints_per_service, step) {
            Ok(c) => r.cold = Some(c),
            Err(e) => r.errors.push(format!("cold programming: {e:#}")),
        }
        r.phases_s
            .push(("cold".into(), phase_started.elapsed().as_secs_f64()));
        interrupt::check()?;
    }
    bar.finish_with_message("done");

    r.elapsed_s = started.elapsed().as_secs_f64();
    r.targets = targets::evaluate(&r);
    write_outputs(&r, &cli.out)?;
    for t in &r.targets {
        println!("{:>12}  {} — {}", t.verdict(), t.target, t.measured);
    }
    println!("results: {}", cli.out.join("results.md").display());
    Ok(())
}

fn write_outputs(r: &Results, out: &Path) -> anyhow::Result<()> {
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(r)?)?;
    std::fs::write(out.join("results.md"), report::render(r))?;
    for (name, err) in plot::draw_all(r, out) {
        eprintln!("plot {name}: {err:#}");
    }
    Ok(())
}

/// Build the release `xlb` binary (a no-op when up to date) and make the testkit run it (agents,
/// inspect, cleanup). `XLB_BIN` overrides it, as in the tests.
fn ensure_xlb_binary() -> anyhow::Result<()> {
    if let Some(p) = std::env::var_os("XLB_BIN") {
        lb_testkit::use_xlb_bin(Path::new(&p))?;
        return Ok(());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args(["build", "--release", "-p", "lb-userspace", "--bin", "xlb"])
        .status()
        .context("running cargo build for the xlb binary")?;
    anyhow::ensure!(status.success(), "building xlb failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    let bin =
        std::fs::canonicalize(target.join("release/xlb")).context("locating target/release/xlb")?;
    lb_testkit::use_xlb_bin(&bin)?;
    Ok(())
}

/// Root tests of this crate run one at a time: the socket-LB test moves the whole test process
/// into a cgroup whose socket programs translate every connection to its Services, which would
/// reach the sockets of a root test running beside it.
#[cfg(test)]
pub(crate) fn root_test() -> std::sync::MutexGuard<'static, ()> {
    static ROOT_TEST: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ROOT_TEST.lock().unwrap_or_else(|e| e.into_inner())
}
