//! The cgroup of the socket load balancing rows: the agent's cgroup programs (`--socket-lb
//! host|all --cgroup-path`) are attached to a dedicated child of the cgroup v2 mount
//! ([`lb_testkit::TestCgroup`], `xlbb<pid>-<n>-socklb`), never to the machine's root.
//!
//! The kernel runs a cgroup's sock_addr programs for the cgroup a socket was created in, and the
//! benchmark's client is a thread of this process (in the client pod's or the node's network
//! namespace). So while a socket-LB row is measured, the whole process is moved into that
//! cgroup ([`Inside`]: `cgroup.procs` of a non-threaded cgroup moves every thread), and moved
//! back to where it was right after, before the agent is stopped and before the cgroup is
//! removed. Agents are started while the process is outside, so they never inherit the cgroup.
//! Nothing else is ever in it: the guard ([`BenchCgroup`]) removes it when dropped, and
//! `cleanup_stale("xlbb")` removes one a killed run left behind.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use anyhow::Context as _;
use lb_testkit::TestCgroup;

/// Held while the process is inside a socket-LB cgroup: the cgroup is per process, so two
/// [`Inside`] periods (tests run in parallel threads) must not overlap.
static INSIDE: Mutex<()> = Mutex::new(());

/// The dedicated cgroup; removed when dropped (unless this process could not leave it).
pub struct BenchCgroup {
    cg: Option<TestCgroup>,
}

impl BenchCgroup {
    /// Create `<cgroup v2 root>/<prefix>socklb`.
    pub fn create(prefix: &str) -> anyhow::Result<Self> {
        let cg = TestCgroup::create(prefix).context("creating the socket-LB cgroup")?;
        Ok(BenchCgroup { cg: Some(cg) })
    }

    /// The agent's `--cgroup-path`.
    pub fn path(&self) -> &Path {
        self.cg.as_ref().expect("present until dropped").path()
    }

    /// Move this process into the cgroup until the returned guard is dropped.
    pub fn enter(&self) -> anyhow::Result<Inside<'_>> {
        let lock = INSIDE.lock().unwrap_or_else(|p| p.into_inner());
        let root = lb_testkit::cgroup::cgroup2_root()?;
        let back = own_cgroup(&root)?;
        write_procs(self.path()).context("moving the benchmark into the socket-LB cgroup")?;
        Ok(Inside {
            _lock: lock,
            _cg: self,
            back,
            root,
        })
    }

    fn holds_us(&self) -> bool {
        self.cg
            .as_ref()
            .is_some_and(|cg| cg.procs().contains(&(std::process::id() as i32)))
    }
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        // Removing the cgroup kills what is inside: never this process.
        if self.holds_us() {
            eprintln!(
                "the benchmark is still in {}: left for the next run's cleanup",
                self.path().display()
            );
            std::mem::forget(self.cg.take());
        }
    }
}

/// This process is in the socket-LB cgroup while this lives.
pub struct Inside<'a> {
    // Released after `drop` has moved the process back (fields drop after the body).
    _lock: MutexGuard<'static, ()>,
    _cg: &'a BenchCgroup,
    /// The cgroup the process came from.
    back: PathBuf,
    root: PathBuf,
}

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        if let Err(e) = write_procs(&self.back) {
            // The original cgroup may have gone meanwhile: the root takes any process.
            eprintln!(
                "moving the benchmark back to {}: {e}; moving it to {}",
                self.back.display(),
                self.root.display()
            );
            if let Err(e) = write_procs(&self.root) {
                eprintln!("moving the benchmark to {}: {e}", self.root.display());
            }
        }
    }
}

/// Move the writing process (all its threads) into cgroup `dir`.
fn write_procs(dir: &Path) -> std::io::Result<()> {
    std::fs::write(dir.join("cgroup.procs"), "0")
}

/// This process's cgroup in the v2 hierarchy mounted at `root` (the `0::` line of
/// /proc/self/cgroup).
fn own_cgroup(root: &Path) -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    parse_own_cgroup(&text, root).context("no cgroup v2 entry (0::) in /proc/self/cgroup")
}

fn parse_own_cgroup(text: &str, root: &Path) -> Option<PathBuf> {
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(root.join(rel.trim().trim_start_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_v2_line_names_the_cgroup_under_the_mount() {
        let root = Path::new("/sys/fs/cgroup/unified");
        let hybrid = "9:name=systemd:/\n4:memory:/x/y\n0::/\n";
        assert_eq!(parse_own_cgroup(hybrid, root), Some(root.to_path_buf()));
        let nested = "0::/user.slice/session-1.scope\n";
        assert_eq!(
            parse_own_cgroup(nested, root),
            Some(root.join("user.slice/session-1.scope"))
        );
        assert_eq!(parse_own_cgroup("4:memory:/x\n", root), None);
    }

    /// The process goes in and comes back out; the cgroup is removed on drop.
    #[test]
    #[ignore = "needs root"]
    fn the_benchmark_enters_and_leaves_the_cgroup_and_it_is_removed() {
        let _serial = crate::root_test();
        let prefix = format!("xlbb{}-unit-socklb-", std::process::id());
        let me = std::process::id() as i32;
        let path;
        {
            let cg = BenchCgroup::create(&prefix).unwrap();
            path = cg.path().to_path_buf();
            assert!(!cg.holds_us());
            {
                let _in = cg.enter().unwrap();
                assert!(cg.holds_us(), "not in {}", path.display());
                // A thread started inside is inside too.
                let inner = std::thread::spawn(|| {
                    std::fs::read_to_string("/proc/thread-self/cgroup").unwrap()
                })
                .join()
                .unwrap();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                assert!(inner.contains(&name), "{inner}");
            }
            assert!(!cg.holds_us());
            assert!(!std::fs::read_to_string(path.join("cgroup.procs"))
                .unwrap()
                .split_whitespace()
                .any(|p| p == me.to_string()));
        }
        assert!(!path.exists(), "{} left behind", path.display());
    }
}
