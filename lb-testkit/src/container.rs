//! The agent run from its container image, the way the DaemonSet runs it: podman, in a node's
//! network namespace (the DaemonSet's `hostNetwork`), with the DaemonSet's mounts (the host's
//! bpffs, a cgroup v2 directory) and security context (the five capabilities, read-only root,
//! user 0).
//!
//! The container runs in the foreground of a `podman run --rm` child whose output (the agent's
//! log) goes to a file, followed like [`crate::Agent`]'s. Dropping the handle removes the
//! container (`podman rm --force`); the pins it made are the caller's to clean (they live in
//! the host's bpffs, which is the point of the mount). Containers are named after the test's
//! unique prefix, so [`crate::cleanup_stale`] removes those of crashed runs
//! ([`remove_stale`]).
//!
//! What podman needs on this kind of machine: `--runtime runc` (crun refuses hosts with hybrid
//! cgroups), and explicit `--ulimit`s no higher than the limits podman itself runs with (its
//! defaults are above them, and raising a hard limit needs CAP_SYS_RESOURCE, which the machine's
//! root does not have).

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{io_err, Error, Result};
use crate::logwatch::{strip_ansi, LogWatch};
use crate::netns::run_cmd;
#[cfg(doc)]
use crate::netns::NetNs;

/// The environment variable naming the image under test (`cargo xtask test` sets it to the id
/// of the image it just built).
pub const IMAGE_ENV: &str = "XLB_IMAGE";
/// The image when [`IMAGE_ENV`] is not set: what `cargo xtask image` tags by default.
pub const DEFAULT_IMAGE: &str = "localhost/xlb:latest";
/// The capabilities deploy/daemonset.yaml adds (after dropping all).
pub const DAEMONSET_CAPS: [&str; 5] = ["NET_ADMIN", "SYS_ADMIN", "BPF", "PERFMON", "SYS_RESOURCE"];
/// Threads the container may have (`--ulimit nproc`): plenty for the agent's runtime, and below
/// the limit podman's monitor runs with here.
const NPROC: u64 = 4096;
/// How long `podman stop` lets the agent exit after SIGTERM before it is killed.
const STOP_TIMEOUT_S: u32 = 10;
/// Longest sleep between two looks at the container while waiting for its log.
const WAIT_SLICE: Duration = Duration::from_millis(100);

/// The image the tests run: `$XLB_IMAGE`, else [`DEFAULT_IMAGE`]; an error naming the command
/// that builds it when podman does not have it.
pub fn image_under_test() -> Result<String> {
    let image = std::env::var(IMAGE_ENV).unwrap_or_else(|_| DEFAULT_IMAGE.to_string());
    let exists = Command::new("podman")
        .args(["image", "exists", &image])
        .status()
        .map_err(io_err("running podman (`cargo xtask setup` installs it)"))?;
    if exists.success() {
        Ok(image)
    } else {
        Err(Error::Invalid(format!(
            "image {image} not found: build it with `cargo xtask image` (`cargo xtask test` \
             builds it and sets {IMAGE_ENV})"
        )))
    }
}

/// A bind mount of a host path into the container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub host: PathBuf,
    pub container: PathBuf,
    pub read_only: bool,
    /// Mounts made on the host below `host` later appear in the container too (Kubernetes'
    /// `mountPropagation: HostToContainer`, `rslave`).
    pub host_to_container: bool,
}

impl Mount {
    /// The `--volume` value.
    fn volume(&self) -> OsString {
        let mut v = self.host.clone().into_os_string();
        v.push(":");
        v.push(&self.container);
        let mut opts = Vec::new();
        if self.read_only {
            opts.push("ro");
        }
        if self.host_to_container {
            opts.push("rslave");
        }
        if !opts.is_empty() {
            v.push(":");
            v.push(opts.join(","));
        }
        v
    }
}

/// How to run one container.
#[derive(Clone, Debug)]
pub struct ContainerSpec {
    pub image: String,
    /// The container's name; starts with the test's unique prefix.
    pub name: String,
    /// The network namespace to join (`--network ns:PATH`); None: podman's own.
    pub netns: Option<PathBuf>,
    pub mounts: Vec<Mount>,
    /// Capabilities added after dropping all of them.
    pub cap_add: Vec<String>,
    pub read_only_root: bool,
    pub env: Vec<(String, String)>,
    /// The arguments after the image (the entrypoint's arguments).
    pub args: Vec<String>,
    /// Where the container's output goes (appended to).
    pub log_path: PathBuf,
}

impl ContainerSpec {
    /// As deploy/daemonset.yaml runs the agent: in the network namespace bound at `netns` (a
    /// node's [`NetNs::path`]: the DaemonSet's hostNetwork), with its capabilities, a read-only
    /// root and `RUST_LOG=info`; no mounts or arguments yet.
    pub fn daemonset(image: &str, name: &str, netns: &Path, log_path: &Path) -> Self {
        ContainerSpec {
            image: image.to_string(),
            name: name.to_string(),
            netns: Some(netns.to_path_buf()),
            mounts: Vec::new(),
            cap_add: DAEMONSET_CAPS.iter().map(|c| c.to_string()).collect(),
            read_only_root: true,
            // The log is a file that is read back: no colour sequences in it.
            env: vec![
                ("RUST_LOG".into(), "info".into()),
                ("NO_COLOR".into(), "1".into()),
            ],
            args: Vec::new(),
            log_path: log_path.to_path_buf(),
        }
    }

    /// The arguments of `podman run`.
    pub fn run_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(s.into());
        for s in [
            "run",
            "--rm",
            "--pull",
            "never",
            "--runtime",
            "runc",
            "--name",
            &self.name,
        ] {
            push(s);
        }
        let (nofile, _) = rlimit(libc::RLIMIT_NOFILE);
        let (nproc, _) = rlimit(libc::RLIMIT_NPROC);
        push("--ulimit");
        push(&format!("nofile={nofile}:{nofile}"));
        let nproc = nproc.min(NPROC);
        push("--ulimit");
        push(&format!("nproc={nproc}:{nproc}"));
        if self.read_only_root {
            push("--read-only");
        }
        push("--user");
        push("0");
        push("--cap-drop");
        push("ALL");
        if !self.cap_add.is_empty() {
            push("--cap-add");
            push(&self.cap_add.join(","));
        }
        for (k, v) in &self.env {
            push("--env");
            push(&format!("{k}={v}"));
        }
        if let Some(ns) = &self.netns {
            a.push("--network".into());
            let mut v = OsString::from("ns:");
            v.push(ns);
            a.push(v);
        }
        for m in &self.mounts {
            a.push("--volume".into());
            a.push(m.volume());
        }
        a.push(self.image.clone().into());
        a.extend(self.args.iter().map(OsString::from));
        a
    }
}

/// (soft, hard) limit of `resource` of this process; a generous default when unknown.
fn rlimit(resource: libc::__rlimit_resource_t) -> (u64, u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out pointer.
    if unsafe { libc::getrlimit(resource, &mut r) } == 0 {
        (r.rlim_cur.min(1 << 20), r.rlim_max.min(1 << 20))
    } else {
        (1024, 1024)
    }
}

/// A running (or stopped) container.
#[derive(Debug)]
pub struct Container {
    spec: ContainerSpec,
    child: Option<Child>,
    /// Log length when the container started: its lines come after it.
    log_start: u64,
}

impl Container {
    /// Start the container (`podman run` in the foreground of a child process).
    pub fn start(spec: ContainerSpec) -> Result<Self> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log_path)
            .map_err(io_err(format!("opening {}", spec.log_path.display())))?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log2 = log
            .try_clone()
            .map_err(io_err("duplicating the log descriptor"))?;
        let child = Command::new("podman")
            .args(spec.run_args())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .map_err(io_err("running podman (`cargo xtask setup` installs it)"))?;
        Ok(Container {
            spec,
            child: Some(child),
            log_start,
        })
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Wait until the container logs a line for which `matches` holds (lines it logged already
    /// count) and return that line. An error when the container exits first or `timeout`
    /// passes; the error carries the log.
    pub fn wait_log(
        &mut self,
        timeout: Duration,
        mut matches: impl FnMut(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut watch = LogWatch::new(&self.spec.log_path, self.log_start)?;
        loop {
            // Looked at before reading, so a line written just before an exit is still seen.
            let exited = match self.child.as_mut().map(|c| c.try_wait()) {
                None => Some("container not running".to_string()),
                Some(Ok(Some(status))) => Some(format!("podman run exited with {status}")),
                Some(_) => None,
            };
            if let Some(line) = watch.new_lines()?.into_iter().find(|l| matches(l)) {
                return Ok(line);
            }
            let why = match exited {
                Some(why) => why,
                None if Instant::now() >= deadline => format!("not there after {timeout:?}"),
                None => {
                    watch.wait(
                        deadline
                            .saturating_duration_since(Instant::now())
                            .min(WAIT_SLICE),
                    );
                    continue;
                }
            };
            return Err(Error::Agent(format!(
                "{why} while waiting for a log line of container {}; log:\n{}",
                self.spec.name,
                self.log()
            )));
        }
    }

    /// Run a command inside the running container (`podman exec`, as `kubectl exec` would):
    /// its stdout, or an error with its stderr.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        run_cmd(
            Command::new("podman")
                .args(["exec", &self.spec.name])
                .args(args),
        )
    }

    /// Whether the container's `podman run` is still going.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// `podman stop` (SIGTERM, SIGKILL after 10 s) and wait for the container to be gone.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let stopped = run_cmd(Command::new("podman").args([
            "stop",
            "--time",
            &STOP_TIMEOUT_S.to_string(),
            &self.spec.name,
        ]));
        if stopped.is_err() {
            let _ = child.kill();
        }
        let _ = child.wait();
        stopped.map(|_| ())
    }

    /// The container's output since it started, without colour sequences.
    pub fn log(&self) -> String {
        let log = std::fs::read(&self.spec.log_path).unwrap_or_default();
        let start = (self.log_start as usize).min(log.len());
        strip_ansi(&String::from_utf8_lossy(&log[start..]))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- container {} log ({}) ----\n{}---- end of container log ----",
                self.spec.name,
                self.spec.log_path.display(),
                self.log()
            );
        }
        remove(&self.spec.name);
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `podman rm --force --time 0 NAME`: kill and remove it, whatever its state.
fn remove(name: &str) -> bool {
    Command::new("podman")
        .args(["rm", "--force", "--time", "0", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Remove the containers named "<base><pid>-..." whose creating process is gone. Nothing when
/// podman is not installed.
pub(crate) fn remove_stale(base: &str, stale: impl Fn(&str) -> bool) -> Vec<String> {
    let Ok(out) = Command::new("podman")
        .args(["ps", "--all", "--format", "{{.Names}}"])
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with(base) && stale(n))
        .filter(|n| remove(n))
        .map(|n| format!("container {n}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_like_the_daemonset() {
        let mut spec = ContainerSpec::daemonset(
            "localhost/xlb:latest",
            "xlbt1-0-agent",
            Path::new("/run/netns/xlbt1-0-node1"),
            Path::new("/tmp/log"),
        );
        spec.mounts.push(Mount {
            host: "/sys/fs/bpf".into(),
            container: "/sys/fs/bpf".into(),
            read_only: false,
            host_to_container: true,
        });
        spec.mounts.push(Mount {
            host: "/sys/fs/cgroup/unified/x".into(),
            container: "/run/xlb/cgroupv2".into(),
            read_only: true,
            host_to_container: false,
        });
        spec.args = vec!["agent".into(), "--pin-path".into(), "/sys/fs/bpf/x".into()];
        let args: Vec<String> = spec
            .run_args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = args.join(" ");
        for want in [
            "--runtime runc",
            "--read-only",
            "--cap-drop ALL --cap-add NET_ADMIN,SYS_ADMIN,BPF,PERFMON,SYS_RESOURCE",
            "--network ns:/run/netns/xlbt1-0-node1",
            "--volume /sys/fs/bpf:/sys/fs/bpf:rslave",
            "--volume /sys/fs/cgroup/unified/x:/run/xlb/cgroupv2:ro",
            "localhost/xlb:latest agent --pin-path /sys/fs/bpf/x",
        ] {
            assert!(joined.contains(want), "{want:?} missing in {joined}");
        }
        assert!(
            joined.ends_with("/sys/fs/bpf/x"),
            "the image's arguments come last"
        );
        // Both limits explicit, at most this process's own (raising needs CAP_SYS_RESOURCE).
        let nofile = args.iter().find(|a| a.starts_with("nofile=")).unwrap();
        let (soft, _) = rlimit(libc::RLIMIT_NOFILE);
        assert_eq!(nofile, &format!("nofile={soft}:{soft}"));
        assert!(args.iter().any(|a| a.starts_with("nproc=")));
    }
}
