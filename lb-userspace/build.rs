//! Builds the eBPF programs (crate `lb-ebpf`, nightly, bpfel-unknown-none) with aya-build and
//! leaves the object at `$OUT_DIR/xlb-ebpf`, embedded by `src/lib.rs`.
//!
//! With `AYA_BUILD_SKIP=1` (clippy/check without bpf-linker, as aya's own integration-test crate
//! allows) an empty object is written instead: the binary builds but cannot load programs.

use std::{env, fs, path::PathBuf};

use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    let skip = env::var("AYA_BUILD_SKIP").map(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip.unwrap_or(false) {
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        fs::write(out_dir.join("xlb-ebpf"), []).context("writing stub eBPF object")?;
        return Ok(());
    }
    if which_bpf_linker().is_none() {
        return Err(anyhow!(
            "bpf-linker not found in PATH. Run `cargo xtask setup` (installs LLVM 22 dev packages, \
             rust-src for nightly and bpf-linker), or set AYA_BUILD_SKIP=1 to build without eBPF programs."
        ));
    }
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../lb-ebpf");
    let ebpf_common = manifest_dir.join("../lb-common");
    // aya-build tracks lb-ebpf's directory; the shared types live in lb-common.
    println!("cargo:rerun-if-changed={}", ebpf_common.display());
    let root_dir = ebpf_dir.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "lb-ebpf", root_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}

fn which_bpf_linker() -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    let home_bin = env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin"));
    env::split_paths(&path)
        .chain(home_bin)
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file())
}
