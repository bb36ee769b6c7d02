//! `cargo xtask setup`: check each requirement and install only what is missing (the
//! toolchain combination verified on this machine kind: aya 0.14, aya-build 0.2.0, bpf-linker on
//! LLVM 22, nightly rust-src). One line per check; unattended (CI=true or not), every install is non-interactive.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context as _, Result};

/// Packages the eBPF build (bpf-linker against LLVM 22) and the tests (iproute2, bpftool, the
/// benchmark's iptables/nftables) need.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "libxml2-dev",
    "bpftool",
    "iproute2",
    // e2e: pods' checksum offload switched off and on (`ethtool -K`).
    "ethtool",
    "iptables",
    "nftables",
    // `cargo xtask image` and its test: podman builds and runs the image; runc is its runtime
    // (crun refuses hosts with hybrid cgroups); musl-gcc compiles the C parts (ring) of the
    // static musl binary.
    "podman",
    "runc",
    "musl-tools",
];

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPFFS: &str = "/sys/fs/bpf";

fn line(status: &str, what: &str) {
    println!("setup: {status:<10} {what}");
}

/// Run a command inheriting stdout/stderr (installs show their progress); error on failure.
fn run(cmd: &mut Command) -> Result<()> {
    let desc = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("running {desc}"))?;
    if !status.success() {
        bail!("{desc} failed ({status})");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

fn stdout_of(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// `~/.cargo/bin` first in PATH, so tools installed by `cargo install` are found.
pub fn path_with_cargo_bin() -> std::ffi::OsString {
    let mut paths: Vec<PathBuf> = Vec::new();
    if let Some(home) = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
    {
        paths.push(home.join("bin"));
    }
    paths.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(paths).unwrap_or_default()
}

pub fn setup() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "xtask needs root: it installs packages, mounts bpffs, loads eBPF programs and creates network \
             namespaces. Run it as root (e.g. `sudo -E env PATH=$PATH cargo xtask ...`)."
        );
    }
    disk();
    apt()?;
    nightly()?;
    musl_target()?;
    bpf_linker()?;
    bpffs()?;
    Ok(())
}

/// Free space a clean `cargo xtask test` needs under the target directory. Measured: ~2.3 GB of
/// test build (dev profile, line tables only, no incremental cache as in CI; 3.6 GB with it),
/// ~0.8 GB for the image's musl build and the previous release's agent, plus headroom.
const DISK_NEEDED_GIB: u64 = 6;

/// Warn, before hours of building, when the target directory's file system is short of space:
/// a full disk shows up much later as a linker "Bus error" or "No space left on device".
/// Only a warning: an incremental run needs far less than a clean one.
fn disk() {
    let target = crate::build::target_dir();
    let dir = target
        .ancestors()
        .find(|d| d.exists())
        .unwrap_or(std::path::Path::new("/"))
        .canonicalize()
        .unwrap_or_else(|_| "/".into());
    let dir = dir.as_path();
    match nix::sys::statvfs::statvfs(dir) {
        Ok(st) => {
            let free_gib = (st.blocks_available() as u64 * st.fragment_size() as u64) >> 30;
            if free_gib < DISK_NEEDED_GIB {
                line(
                    "WARNING",
                    &format!(
                        "disk: {free_gib} GiB free at {}; a clean build and test run needs about \
                         {DISK_NEEDED_GIB} GiB (free space, or set CARGO_TARGET_DIR elsewhere)",
                        dir.display()
                    ),
                );
            } else {
                line(
                    "ok",
                    &format!("disk: {free_gib} GiB free at {}", dir.display()),
                );
            }
        }
        Err(e) => line(
            "WARNING",
            &format!("disk: cannot read free space at {}: {e}", dir.display()),
        ),
    }
}

fn apt_installed(pkg: &str) -> bool {
    stdout_of(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .contains("install ok installed")
}

fn apt() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !apt_installed(p))
        .collect();
    for p in APT_PACKAGES.iter().filter(|p| !missing.contains(p)) {
        line("ok", &format!("apt {p}"));
    }
    if missing.is_empty() {
        return Ok(());
    }
    line("installing", &format!("apt {}", missing.join(" ")));
    let noninteractive = |c: &mut Command| {
        c.env("DEBIAN_FRONTEND", "noninteractive");
    };
    let mut update = Command::new("apt-get");
    update.args(["update", "-q"]);
    noninteractive(&mut update);
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing);
    noninteractive(&mut install);
    run(&mut update)
        .and_then(|_| run(&mut install))
        .map_err(|e| {
            line(
                "FAILED",
                &format!("apt {}: install them with apt-get ({e})", missing.join(" ")),
            );
            e
        })?;
    for p in &missing {
        if !apt_installed(p) {
            line(
                "FAILED",
                &format!("apt {p}: still not installed; is it in your apt sources (LLVM 22: apt.llvm.org)?"),
            );
            bail!("apt package {p} missing");
        }
        line("ok", &format!("apt {p} (installed)"));
    }
    Ok(())
}

fn nightly() -> Result<()> {
    let toolchains = stdout_of(Command::new("rustup").args(["toolchain", "list"]));
    if toolchains.lines().any(|l| l.starts_with("nightly")) {
        line("ok", "rust nightly toolchain");
    } else {
        line("installing", "rust nightly toolchain");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
        .inspect_err(|_| {
            line(
                "FAILED",
                "rust nightly: run `rustup toolchain install nightly`",
            )
        })?;
    }
    let comps = stdout_of(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]));
    if comps.lines().any(|l| l.starts_with("rust-src")) {
        line("ok", "rust-src (nightly)");
    } else {
        line("installing", "rust-src (nightly)");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))
        .inspect_err(|_| {
            line(
                "FAILED",
                "rust-src: run `rustup component add rust-src --toolchain nightly`",
            )
        })?;
    }
    Ok(())
}

/// The Rust standard library for the image's static binary (`cargo xtask image`).
fn musl_target() -> Result<()> {
    let target = crate::image::MUSL_TARGET;
    let installed = stdout_of(
        Command::new("rustup")
            .args(["target", "list", "--installed"])
            .current_dir(crate::build::workspace_root()),
    );
    if installed.lines().any(|l| l.trim() == target) {
        line("ok", &format!("rust target {target}"));
        return Ok(());
    }
    line("installing", &format!("rust target {target}"));
    run(Command::new("rustup")
        .args(["target", "add", target])
        .current_dir(crate::build::workspace_root()))
    .inspect_err(|_| {
        line(
            "FAILED",
            &format!("rust target: run `rustup target add {target}`"),
        )
    })?;
    line("ok", &format!("rust target {target} (installed)"));
    Ok(())
}

fn bpf_linker() -> Result<()> {
    let path = path_with_cargo_bin();
    if succeeds(
        Command::new("bpf-linker")
            .arg("--version")
            .env("PATH", &path),
    ) {
        line("ok", "bpf-linker");
        return Ok(());
    }
    line(
        "installing",
        "bpf-linker (cargo install, LLVM 22; takes a few minutes)",
    );
    let llvm_path = std::env::join_paths(
        std::iter::once(PathBuf::from(LLVM_PREFIX).join("bin")).chain(std::env::split_paths(&path)),
    )?;
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("PATH", llvm_path)
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX))
    .inspect_err(|_| {
        line(
            "FAILED",
            "bpf-linker: see the cargo install output above (needs llvm-22-dev)",
        )
    })?;
    line("ok", "bpf-linker (installed)");
    Ok(())
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 2 && f[1] == BPFFS && f[2] == "bpf"
        })
}

fn bpffs() -> Result<()> {
    if bpffs_mounted() {
        line("ok", &format!("bpffs at {BPFFS}"));
        return Ok(());
    }
    line("installing", &format!("mount -t bpf bpf {BPFFS}"));
    run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
        .inspect_err(|_| line("FAILED", &format!("bpffs: run `mount -t bpf bpf {BPFFS}`")))?;
    line("ok", &format!("bpffs at {BPFFS} (mounted)"));
    Ok(())
}
