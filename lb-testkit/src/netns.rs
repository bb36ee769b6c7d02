//! Network namespace guards.
//!
//! Namespaces are created with iproute2 (`ip netns add`, bind-mounted under /run/netns) and deleted
//! on `Drop`, together with every process still inside. Code runs inside a namespace by entering
//! only its network namespace (`setns(CLONE_NEWNET)`) on a dedicated thread, or in a child process
//! before `exec`: unlike `ip netns exec`, this keeps the mount namespace, so /sys/fs/bpf (the pins)
//! stays visible (`ip netns exec` mounts a fresh /sys, which hides them). A socket keeps the namespace it was created in, so sockets
//! made inside can be used from any thread afterwards.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::error::{io_err, Error, Result};

const NETNS_DIR: &str = "/run/netns";

/// Run `ip ARGS`, returning stdout; a non-zero exit is an error carrying stderr.
pub fn ip(args: &[&str]) -> Result<String> {
    run_cmd(Command::new("ip").args(args))
}

/// Run a prepared command to completion, returning stdout or an error with its stderr.
pub fn run_cmd(cmd: &mut Command) -> Result<String> {
    let desc = format!("{cmd:?}");
    let out = cmd.output().map_err(io_err(format!("running {desc}")))?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd: desc,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace, deleted (with the processes inside) when dropped.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Create `name` with its loopback up. Fails if it exists already.
    pub fn create(name: &str) -> Result<Self> {
        ip(&["netns", "add", name])?;
        let ns = NetNs {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount that holds the namespace.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// Run `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Open the namespace file (for `setns`).
    pub fn open(&self) -> Result<OwnedFd> {
        open_ns(&self.name)
    }

    /// Run `f` on a fresh thread that has entered this network namespace; sockets it creates
    /// belong to the namespace. The calling thread is unaffected.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        run_in(&self.name, f)
    }

    /// Write a sysctl of this namespace (`key` in dotted form, e.g. "net.ipv4.ip_forward").
    /// /proc/sys/net resolves to the namespace of the writing thread.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.run(|| std::fs::write(&path, value).map_err(io_err(format!("writing {path}"))))?
    }

    /// A command that runs in this network namespace (and the caller's mount namespace).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        command_in(&self.name, program)
    }

    /// Processes whose network namespace is this one.
    pub fn pids(&self) -> Vec<i32> {
        pids_in(&self.name)
    }

    /// Processes whose network namespace is the one named `name`.
    pub fn pids_of(name: &str) -> Vec<i32> {
        pids_in(name)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        delete_netns(&self.name);
    }
}

/// A command for `program` that enters network namespace `name` before `exec` (mount namespace
/// unchanged, so /sys/fs/bpf stays visible).
pub fn command_in(name: &str, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
    let fd = open_ns(name)?;
    let mut cmd = Command::new(program);
    // SAFETY: only async-signal-safe calls (setns) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Spawn `cmd` in network namespace `name`, from a thread that entered it: the child inherits
/// the thread's namespace. Without a `pre_exec` hook (see [`command_in`]) std spawns with
/// posix_spawn (a vfork) instead of fork, which copies the page tables of the whole caller: the
/// benchmark, holding 100k endpoints' objects, paid ~0.1 s per agent start for that fork, and
/// "spawn to ready" counted it.
pub fn spawn_in(name: &str, cmd: &mut Command) -> Result<std::process::Child> {
    run_in(name, || cmd.spawn())?
        .map_err(|e| Error::Invalid(format!("spawning {cmd:?} in {name}: {e}")))
}

/// Run `f` on a fresh thread that has entered the network namespace `name` (see [`NetNs::run`]).
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let fd = open_ns(name)?;
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET)
                .map_err(|e| Error::Invalid(format!("setns into {name}: {e}")))?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

fn open_ns(name: &str) -> Result<OwnedFd> {
    let path = Path::new(NETNS_DIR).join(name);
    let f = File::open(&path).map_err(io_err(format!("opening {}", path.display())))?;
    Ok(f.into())
}

fn pids_in(name: &str) -> Vec<i32> {
    ip(&["netns", "pids", name])
        .map(|out| {
            out.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Kill every process in the namespace (they were started by the testkit), then delete it.
fn delete_netns(name: &str) {
    for pid in pids_in(name) {
        if pid != std::process::id() as i32 {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    if let Err(e) = ip(&["netns", "del", name]) {
        tracing::warn!(netns = name, error = %e, "deleting network namespace");
    }
}

/// Names of the existing network namespaces that start with `prefix`.
pub fn list_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// Delete every namespace whose name starts with `prefix`, killing the processes inside.
/// Returns the names removed.
pub fn delete_with_prefix(prefix: &str) -> Vec<String> {
    let names = list_with_prefix(prefix);
    for n in &names {
        delete_netns(n);
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[ignore = "needs root"]
    fn namespace_is_isolated_and_removed_on_drop() {
        let name = format!("xlbt{}-unit-ns", std::process::id());
        {
            let ns = NetNs::create(&name).unwrap();
            ns.ip(&[
                "link", "add", "dummy0", "type", "veth", "peer", "name", "dummy1",
            ])
            .unwrap();
            // Visible inside, not in the root namespace.
            assert!(ns.ip(&["link", "show", "dummy0"]).is_ok());
            assert!(ip(&["link", "show", "dummy0"]).is_err());
            // A thread inside sees the namespace's loopback only.
            let bound = ns
                .run(|| std::net::TcpListener::bind("127.0.0.1:0").map(|l| l.local_addr().unwrap()))
                .unwrap()
                .unwrap();
            assert_eq!(bound.ip().to_string(), "127.0.0.1");
            // A child process runs inside too.
            let out = run_cmd(ns.command("ip").unwrap().args(["-o", "link", "show"])).unwrap();
            assert!(out.contains("dummy0"), "{out}");
            // So does one spawned from a thread inside (posix_spawn, no pre_exec), while this
            // thread stays where it was.
            let mut cmd = Command::new("ip");
            cmd.args(["-o", "link", "show"]).stdout(std::process::Stdio::piped());
            let out = spawn_in(&name, &mut cmd).unwrap().wait_with_output().unwrap();
            assert!(String::from_utf8_lossy(&out.stdout).contains("dummy0"));
            assert!(ip(&["link", "show", "dummy0"]).is_err());
            assert!(list_with_prefix(&name).contains(&name));
        }
        assert!(list_with_prefix(&name).is_empty());
    }
}
