//! Test infrastructure for xlb: a cluster of network namespaces (fabric bridge, nodes, routed pods,
//! an external client), serve-hostname servers and clients inside pods, the `xlb agent` process
//! per node, and the manifests it reads. Used by the end-to-end tests, by `cargo xtask run` and by
//! the benchmark (lb-bench), which runs its agent and pod servers through the same handles.
//!
//! Everything created is removed by `Drop` guards, also when a test panics; what a killed process
//! leaves behind is found by its name prefix and removed by [`cleanup_stale`].

pub mod agent;
pub mod cgroup;
pub mod client;
pub mod cluster;
pub mod container;
pub mod error;
pub mod logwatch;
pub mod netns;
pub mod oldbuild;
pub mod server;
pub mod service_yaml;
pub mod wait;

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

pub use agent::{
    http_request, inspect_conntrack, inspect_services, inspect_stats, metric_sum, use_xlb_bin,
    xlb_bin, Agent, AgentSpec, HttpResponse, InspectCt, InspectService, SocketLb, XdpMode,
};
pub use cgroup::TestCgroup;
pub use client::{ClientError, Close, Dial, HostAnswer, HostClient, TcpConn, UdpConn};
pub use cluster::{Cluster, External, Node, Pod};
pub use error::{Error, Result};
pub use netns::NetNs;
/// Re-exported for tests that read the JSON of `xlb inspect` or of the agent's HTTP servers.
pub use serde_json;
pub use server::{ServeHostname, ServeSpec, TcpMode};
pub use wait::{wait_for, wait_until};

/// Name prefix of everything the tests create; followed by the creating process id.
pub const TEST_BASE: &str = "xlbt";

/// A prefix unique to this process and call: "xlbt<pid>-<n>-". Short, because interface names are
/// not derived from it (namespace names have no practical length limit).
pub fn unique_prefix() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{TEST_BASE}{}-{}-",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn pid_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// The pid embedded after `base` in a name "<base><pid>-...", if any.
fn embedded_pid(base: &str, name: &str) -> Option<i32> {
    name.strip_prefix(base)?.split('-').next()?.parse().ok()
}

/// Remove containers, namespaces, pin directories and test cgroups named "<base><pid>-..."
/// whose creating process is gone (crashed or killed test runs). Those of live processes are
/// left alone, so concurrent runs are safe. Returns what was removed.
pub fn cleanup_stale(base: &str) -> Vec<String> {
    let stale = |name: &str| embedded_pid(base, name).is_some_and(|pid| !pid_alive(pid));
    let mut removed = Vec::new();
    // Containers first: an agent left running in one would pin again.
    removed.extend(container::remove_stale(base, stale));
    for dir in pin_dirs(base).into_iter().filter(|d| stale(d)) {
        remove_pin_root(&Path::new(cluster::BPFFS).join(&dir));
        removed.push(format!("{}/{dir}", cluster::BPFFS));
    }
    for ns in netns::list_with_prefix(base)
        .into_iter()
        .filter(|n| stale(n))
    {
        netns::delete_with_prefix(&ns);
        removed.push(ns);
    }
    for cg in cgroup::list_with_prefix(base) {
        let name = cg
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if stale(&name) {
            cgroup::remove_cgroup(&cg);
            removed.push(cg.display().to_string());
        }
    }
    removed
}

/// Remove everything whose name starts with `prefix`: agents and other processes in those
/// namespaces (killed), their pins (`xlb cleanup`, then removed) and the namespaces.
/// Used by `cargo xtask cluster down` for the demo's fixed prefix.
pub fn remove_prefix(prefix: &str) -> Vec<String> {
    let mut removed = Vec::new();
    // Stop the agents first so nothing re-pins while the pins are removed.
    for ns in netns::list_with_prefix(prefix) {
        for pid in netns::NetNs::pids_of(&ns) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let pin_prefix = prefix.trim_end_matches('-');
    for dir in pin_dirs(pin_prefix) {
        remove_pin_root(&Path::new(cluster::BPFFS).join(&dir));
        removed.push(format!("{}/{dir}", cluster::BPFFS));
    }
    removed.extend(netns::delete_with_prefix(prefix));
    removed
}

/// Entries of bpffs starting with `prefix`.
fn pin_dirs(prefix: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(cluster::BPFFS) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// A cluster's pin root holds one directory per node: clean each, then remove the root.
pub(crate) fn remove_pin_root(root: &Path) {
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                if let Err(e) = agent::cleanup_pins(&e.path()) {
                    tracing::warn!(error = %e, "cleanup of stale pins");
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(root);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_unique_and_carry_the_pid() {
        let (a, b) = (unique_prefix(), unique_prefix());
        assert_ne!(a, b);
        assert_eq!(embedded_pid(TEST_BASE, &a), Some(std::process::id() as i32));
        assert_eq!(embedded_pid(TEST_BASE, "xlbtfoo-1-"), None);
        assert_eq!(embedded_pid(TEST_BASE, "other"), None);
    }
}
