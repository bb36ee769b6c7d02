//! `cargo xtask test`: the one command CI runs. Setup, build xlb, then `cargo test --workspace`
//! (unit, packet and netns end-to-end tests) with `XLB_BIN` pointing at the binary just built.
//! Leftovers of crashed earlier runs are removed before, and of this run after. `--no-fail-fast`:
//! CI sees every test binary's "test result:" line, not just the first failing one.

use anyhow::{bail, Context as _, Result};

use crate::build::{build_xlb, cargo};

pub fn test(extra: &[String]) -> Result<()> {
    crate::setup::setup()?;
    let xlb = build_xlb()?;
    report_stale("before");
    let status = cargo()
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(extra)
        .env("XLB_BIN", &xlb)
        .status()
        .context("running cargo test")?;
    report_stale("after");
    if !status.success() {
        bail!("cargo test --workspace failed ({status})");
    }
    Ok(())
}

fn report_stale(when: &str) {
    for r in lb_testkit::cleanup_stale(lb_testkit::TEST_BASE) {
        println!("test: removed stale {r} ({when} the run)");
    }
}
