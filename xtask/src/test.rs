//! `cargo xtask test`: the one command CI runs. Setup, then `cargo test --workspace` (unit, packet
//! and netns end-to-end tests) with `XLB_BIN` pointing at the `xlb` binary that same cargo run
//! builds (lb-userspace has integration tests, so cargo builds its binary first). One cargo
//! invocation: a separate `cargo build` resolves features differently and compiles kube twice.
//! Leftovers of crashed earlier runs are removed before, and of this run after. `--no-fail-fast`:
//! CI sees every test binary's "test result:" line, not just the first failing one.
//! `--include-ignored`: root-only tests are `#[ignore = "needs root"]`, so a plain `cargo test` as a
//! normal user says what it skipped; this command runs as root and includes them.
//! The DaemonSet's image is built first (`cargo xtask image`, its own cargo invocation for the
//! musl target: a nested cargo inside `cargo test` would wait for this one's lock), and its id
//! goes to the image test as `XLB_IMAGE`.
//! So is the agent of the previous release (`lb_testkit::oldbuild`, commit
//! `UPGRADE_FROM`, cached under target/xlb-old/), which the upgrade test starts from
//! (`XLB_OLD_BIN`).

use anyhow::{bail, Context as _, Result};

use crate::build::{cargo, target_dir};

pub fn test(extra: &[String]) -> Result<()> {
    crate::setup::setup()?;
    let image = crate::image::build(&[crate::image::DEFAULT_TAG.to_string()])?;
    let old_xlb = lb_testkit::oldbuild::old_xlb(lb_testkit::oldbuild::UPGRADE_FROM)
        .context("building the previous release's agent for the upgrade test")?;
    let xlb = target_dir().join("debug/xlb");
    report_stale("before");
    let status = cargo()
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(with_ignored(extra))
        .env("XLB_BIN", &xlb)
        .env("XLB_OLD_BIN", &old_xlb)
        .env("XLB_IMAGE", &image.id)
        .status()
        .context("running cargo test")?;
    report_stale("after");
    if !status.success() {
        bail!("cargo test --workspace failed ({status})");
    }
    Ok(())
}

/// `extra` with `--include-ignored` passed to the test binaries (after the `--` separator).
fn with_ignored(extra: &[String]) -> Vec<String> {
    let mut args = extra.to_vec();
    match args.iter().position(|a| a == "--") {
        Some(i) => args.insert(i + 1, "--include-ignored".into()),
        None => args.extend(["--".into(), "--include-ignored".into()]),
    }
    args
}

fn report_stale(when: &str) {
    for r in lb_testkit::cleanup_stale(lb_testkit::TEST_BASE) {
        println!("test: removed stale {r} ({when} the run)");
    }
}

#[cfg(test)]
mod tests {
    use super::with_ignored;

    #[test]
    fn root_tests_are_included_whatever_the_extra_arguments() {
        assert_eq!(with_ignored(&[]), ["--", "--include-ignored"]);
        let extra = ["packet".to_string(), "--".into(), "--nocapture".into()];
        assert_eq!(with_ignored(&extra), ["packet", "--", "--include-ignored", "--nocapture"]);
    }
}
