//! Building xlb the way the tests use it: debug profile (the `test` profile inherits it, so
//! `cargo test` afterwards reuses the same dependency artifacts).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::setup::path_with_cargo_bin;

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `cargo` as invoked by `cargo xtask`, with ~/.cargo/bin (bpf-linker) on PATH.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root())
        .env("PATH", path_with_cargo_bin());
    c
}

/// `cargo build -p lb-userspace`; returns the path of the `xlb` binary.
pub fn build_xlb() -> Result<PathBuf> {
    println!("build: cargo build -p lb-userspace");
    let status = cargo()
        .args(["build", "-p", "lb-userspace"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build -p lb-userspace failed ({status})");
    }
    let bin = target_dir().join("debug/xlb");
    if !bin.is_file() {
        bail!("build succeeded but {} is missing", bin.display());
    }
    Ok(bin.canonicalize().unwrap_or(bin))
}

/// The cargo target directory (CARGO_TARGET_DIR or <workspace>/target).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}
