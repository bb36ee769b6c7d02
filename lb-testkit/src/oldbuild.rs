//! The `xlb` binary of an older commit, for the upgrade test (tests/tests/e2e_upgrade.rs): the
//! new build must start on the pins the previous release left and migrate them under load.
//!
//! Built once into `<target>/xlb-old/<commit>/xlb` from `git archive` of that commit (the
//! checkout is never touched: no worktree, no checkout), with its own target directory (sharing
//! the workspace's would overwrite `target/debug/xlb`, the binary every other test runs). The
//! sources and the build directory are removed afterwards: only the binary is kept. `cargo xtask
//! test` builds it before the tests (its time shows apart); a test that finds no binary builds
//! it itself. Concurrent callers wait on a lock file instead of building twice.
//!
//! The commit must be in the repository's history: a shallow clone without it is an error that
//! says how to fetch it, never a skipped test.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::error::{io_err, Error, Result};

/// The previous released build: the upgrade test starts its agents from it. Its SERVICES map is
/// `XLB_SVC_V1` (20-byte values), which this build migrates to `XLB_SVC_V2`.
pub const UPGRADE_FROM: &str = "3d57951";

/// The workspace root (lb-testkit lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Where the binary of `commit` is cached.
pub fn cached_path(commit: &str) -> PathBuf {
    target_dir().join("xlb-old").join(commit).join("xlb")
}

/// The `xlb` binary of `commit`: the cached one, else built now (minutes: a whole debug build
/// with its eBPF object). `$XLB_OLD_BIN` overrides (a binary built elsewhere).
pub fn old_xlb(commit: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("XLB_OLD_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(Error::Agent(format!(
                "XLB_OLD_BIN={} does not exist",
                p.display()
            )))
        };
    }
    let bin = cached_path(commit);
    let dir = bin.parent().expect("cache path has a parent").to_path_buf();
    std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let lock_path = dir.join(".lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(format!("opening {}", lock_path.display())))?;
    // SAFETY: a valid descriptor; the lock is released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io_err(format!("locking {}", lock_path.display()))(
            std::io::Error::last_os_error(),
        ));
    }
    if bin.is_file() {
        return Ok(bin);
    }
    let started = Instant::now();
    build(commit, &dir, &bin)?;
    println!(
        "oldbuild: built the xlb of commit {commit} in {:.0} s ({})",
        started.elapsed().as_secs_f64(),
        bin.display()
    );
    Ok(bin)
}

fn build(commit: &str, dir: &Path, bin: &Path) -> Result<()> {
    let root = workspace_root();
    let rev = format!("{commit}^{{commit}}");
    let found = Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["rev-parse", "--verify", "--quiet", &rev])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(io_err(
            "running git (needed to build the agent the upgrade test starts from)",
        ))?;
    if !found.success() {
        return Err(Error::Agent(format!(
            "git commit {commit} (the previous xlb build, which the upgrade test starts its agents from) is not \
             in the history of {}: a shallow clone, or not a git checkout. Fetch the history \
             (`git fetch --unshallow`, or a clone with full history) and run the test again",
            root.display()
        )));
    }
    let src = dir.join("src");
    let target = dir.join("target");
    for d in [&src, &target] {
        if d.exists() {
            std::fs::remove_dir_all(d).map_err(io_err(format!("removing {}", d.display())))?;
        }
    }
    std::fs::create_dir_all(&src).map_err(io_err(format!("creating {}", src.display())))?;
    // `git archive | tar -x`: the commit's tracked files, without touching the checkout.
    let mut archive = Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["archive", "--format=tar", commit])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(io_err("running git archive"))?;
    let tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(&src)
        .stdin(archive.stdout.take().expect("piped stdout"))
        .status()
        .map_err(io_err("running tar"))?;
    let git = archive.wait().map_err(io_err("waiting for git archive"))?;
    if !git.success() || !tar.success() {
        return Err(Error::Agent(format!(
            "extracting commit {commit}: git archive {git}, tar {tar}"
        )));
    }
    println!(
        "oldbuild: building the xlb of commit {commit} (cargo build -p lb-userspace in {})",
        src.display()
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&src)
        .args(["build", "--locked", "-p", "lb-userspace", "--bin", "xlb"])
        // Build time is CI time: no debug info, dependencies unoptimized (the workspace builds
        // them at opt-level 2). The old agent only has to run the test's few Services; its
        // eBPF object is built in release whatever the profile.
        .args([
            "--config",
            "profile.dev.debug=0",
            "--config",
            "profile.dev.package.\"*\".opt-level=0",
        ])
        .env("CARGO_TARGET_DIR", &target)
        .env("PATH", path_with_cargo_bin())
        .status()
        .map_err(io_err("running cargo build"))?;
    if !status.success() {
        return Err(Error::Agent(format!(
            "building the xlb of commit {commit} failed ({status})"
        )));
    }
    let built = target.join("debug/xlb");
    let tmp = dir.join("xlb.tmp");
    std::fs::copy(&built, &tmp).map_err(io_err(format!("copying {}", built.display())))?;
    std::fs::rename(&tmp, bin).map_err(io_err(format!("renaming to {}", bin.display())))?;
    // Only the binary is kept: the build directory is gigabytes.
    for d in [&src, &target] {
        let _ = std::fs::remove_dir_all(d);
    }
    Ok(())
}

/// PATH with ~/.cargo/bin first (bpf-linker, rustup's cargo).
fn path_with_cargo_bin() -> std::ffi::OsString {
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
