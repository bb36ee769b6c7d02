//! `cargo xtask <command>`: developer and CI tasks for xlb.
//!
//! - `setup`: check and install what building and testing need (root).
//! - `run [--keep]`: the demo: a 2-node netns cluster running the examples, traffic tallies.
//! - `cluster up|down`: the demo cluster left running / removed.
//! - `test`: setup, build, `cargo test --workspace` with the netns end-to-end tests.
//! - `image [--tag T]`: the DaemonSet's image (static musl binary, `FROM scratch`, podman).

mod build;
mod demo;
mod image;
mod setup;
mod test;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "xlb developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check requirements and install the missing ones (apt packages, nightly + rust-src, the
    /// musl target, bpf-linker, bpffs).
    Setup,
    /// Build xlb and run the demo on a 2-node network-namespace cluster.
    Run {
        /// Leave the cluster running afterwards (remove it with `cargo xtask cluster down`).
        #[arg(long)]
        keep: bool,
    },
    /// Start or remove the demo cluster.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Setup, build, then `cargo test --workspace` (root: includes the netns end-to-end tests).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter, `-- --nocapture`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the DaemonSet's image (root): the static (musl) release binary in a `FROM scratch`
    /// image (deploy/Dockerfile), built with podman.
    Image {
        /// Tag of the image (repeatable); default localhost/xlb:latest.
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Benchmark xlb against kube-proxy-shaped iptables-legacy, iptables-nft and nftables rules
    /// (root). Writes target/bench/results.{json,md} and SVG plots.
    Bench {
        /// The smaller set (under 5 minutes).
        #[arg(long)]
        quick: bool,
        /// Further arguments for xlb-bench.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Serve serve-hostname in the current network namespace until killed (the demo's pods).
    #[command(hide = true)]
    ServeHostname {
        #[arg(long)]
        name: String,
        #[arg(long)]
        tcp: Vec<u16>,
        #[arg(long)]
        udp: Vec<u16>,
    },
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Create the demo cluster (examples, client pod, one agent per node) and leave it running.
    Up,
    /// Remove every namespace, agent and pin of the demo cluster.
    Down,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup => setup::setup(),
        Cmd::Run { keep } => demo::run(keep),
        Cmd::Cluster {
            action: ClusterAction::Up,
        } => demo::cluster_up(),
        Cmd::Cluster {
            action: ClusterAction::Down,
        } => demo::cluster_down(),
        Cmd::Test { args } => test::test(&args),
        Cmd::Image { tags } => image::image(&tags),
        Cmd::Bench { quick, args } => {
            setup::setup()?;
            let mut cmd = build::cargo();
            cmd.args(["run", "--release", "-p", "lb-bench", "--"]);
            if quick {
                cmd.arg("--quick");
            }
            let status = cmd.args(&args).status()?;
            anyhow::ensure!(status.success(), "xlb-bench failed ({status})");
            Ok(())
        }
        Cmd::ServeHostname { name, tcp, udp } => {
            let bound = lb_testkit::server::bind(&tcp, &udp)?;
            lb_testkit::ServeHostname::serve(&name, bound)?.wait_forever()
        }
    }
}
