//! The `xlb agent` process of one node, and the `xlb inspect` / `xlb cleanup` calls tests make.
//!
//! The agent runs in the node's network namespace (entered before `exec`, mount namespace kept, so
//! its pins under /sys/fs/bpf are visible to the test and to `xlb inspect`). Its log goes to a file
//! that is printed when a test fails. Dropping the handle kills the agent and runs `xlb cleanup`,
//! which detaches the programs and removes the pins.

use std::fs::OpenOptions;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Deserialize;

use crate::error::{io_err, Error, Result};
use crate::netns::{run_cmd, NetNs};
use crate::wait::wait_for;

/// How long an agent may take from start to "agent ready".
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// What the agent logs once its first full sync is applied.
pub const READY_MARKER: &str = "agent ready";

/// The `xlb` binary: `$XLB_BIN`, else `<workspace>/target/debug/xlb` (honouring `CARGO_TARGET_DIR`).
pub fn xlb_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("XLB_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(Error::Agent(format!(
                "XLB_BIN={} does not exist",
                p.display()
            )))
        };
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let p = target.join("debug/xlb");
    if p.is_file() {
        Ok(p)
    } else {
        Err(Error::Agent(format!(
            "xlb binary not found at {}: run `cargo build -p lb-userspace` or set XLB_BIN",
            p.display()
        )))
    }
}

/// How to run one node's agent.
#[derive(Clone, Debug)]
pub struct AgentSpec {
    /// Name of the node's network namespace.
    pub netns: String,
    /// Manifests directory (`--manifests`); empty when `extra_args` names another source.
    pub manifests: PathBuf,
    pub pin_path: PathBuf,
    /// Appended to on every start.
    pub log_path: PathBuf,
    /// `--pod-devices` value.
    pub pod_devices: String,
    /// Further arguments after the standard ones.
    pub extra_args: Vec<String>,
    /// `--metrics-addr` (inside the node's namespace); None: "none", no HTTP endpoint.
    pub metrics_addr: Option<SocketAddr>,
    /// Start the agent in its own session (survives the terminal; the demo's `--keep`).
    pub detach: bool,
}

impl AgentSpec {
    /// The test defaults: pod veths are "xp*", metrics off.
    pub fn new(netns: &NetNs, manifests: &Path, pin_path: &Path, log_path: &Path) -> Self {
        AgentSpec {
            netns: netns.name().to_string(),
            manifests: manifests.to_path_buf(),
            pin_path: pin_path.to_path_buf(),
            log_path: log_path.to_path_buf(),
            pod_devices: "xp*".to_string(),
            extra_args: Vec::new(),
            metrics_addr: None,
            detach: false,
        }
    }
}

/// A running (or stopped) agent.
#[derive(Debug)]
pub struct Agent {
    spec: AgentSpec,
    child: Option<Child>,
    /// Log length when the current process started: readiness is looked for after it.
    log_start: u64,
    keep: bool,
}

impl Agent {
    /// Start and wait for "agent ready".
    pub fn start(spec: AgentSpec) -> Result<Self> {
        let mut agent = Agent {
            spec,
            child: None,
            log_start: 0,
            keep: false,
        };
        agent.spawn()?;
        agent.wait_ready(READY_TIMEOUT)?;
        Ok(agent)
    }

    /// Start the process without waiting for readiness (e.g. to test traffic during start-up).
    pub fn spawn(&mut self) -> Result<()> {
        if self.is_running() {
            return Err(Error::Agent("already running".into()));
        }
        let bin = xlb_bin()?;
        std::fs::create_dir_all(&self.spec.pin_path)
            .map_err(io_err(format!("creating {}", self.spec.pin_path.display())))?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.spec.log_path)
            .map_err(io_err(format!("opening {}", self.spec.log_path.display())))?;
        self.log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log2 = log.try_clone().map_err(io_err("cloning log fd"))?;
        let mut cmd = crate::netns::command_in(&self.spec.netns, &bin)?;
        cmd.arg("agent");
        // An empty manifests path: the source is given in `extra_args` (e.g. --kubeconfig).
        if !self.spec.manifests.as_os_str().is_empty() {
            cmd.arg("--manifests").arg(&self.spec.manifests);
        }
        let metrics = self
            .spec
            .metrics_addr
            .map_or_else(|| "none".to_string(), |a| a.to_string());
        cmd.arg("--pin-path")
            .arg(&self.spec.pin_path)
            .args([
                "--pod-devices",
                &self.spec.pod_devices,
                "--metrics-addr",
                &metrics,
            ])
            .args(&self.spec.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        if self.spec.detach {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: setsid is async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    libc::setsid();
                    Ok(())
                });
            }
        }
        let child = cmd
            .spawn()
            .map_err(io_err(format!("starting {}", bin.display())))?;
        self.child = Some(child);
        Ok(())
    }

    /// Wait until the current process logged [`READY_MARKER`]; an exit first is an error.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let ready = wait_for(timeout, Duration::from_millis(50), || {
            if self.log_since_start().contains(READY_MARKER) {
                return Some(Ok(()));
            }
            match self.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(status))) => {
                    Some(Err(format!("agent exited with {status} before ready")))
                }
                None => Some(Err("agent not started".to_string())),
                _ => None,
            }
        });
        match ready {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(Error::Agent(format!("{e}; log:\n{}", self.log()))),
            None => Err(Error::Agent(format!(
                "not ready after {timeout:?}; log:\n{}",
                self.log()
            ))),
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGTERM and wait (up to 10 s, then SIGKILL). Programs and pins stay: traffic keeps flowing.
    pub fn stop(&mut self) -> Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let status = wait_for(Duration::from_secs(10), Duration::from_millis(20), || {
            child.try_wait().ok().flatten()
        });
        match status {
            Some(s) => Ok(Some(s)),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(Error::Agent(format!(
                    "did not exit within 10 s of SIGTERM; log:\n{}",
                    self.log()
                )))
            }
        }
    }

    /// SIGKILL (a crash): nothing is cleaned up by the agent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stop (SIGTERM) if running, start again and wait until ready.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()?;
        self.wait_ready(READY_TIMEOUT)
    }

    /// The whole log file (every start).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.spec.log_path).unwrap_or_default()
    }

    fn log_since_start(&self) -> String {
        let log = std::fs::read(&self.spec.log_path).unwrap_or_default();
        let start = (self.log_start as usize).min(log.len());
        String::from_utf8_lossy(&log[start..]).into_owned()
    }

    pub fn spec(&self) -> &AgentSpec {
        &self.spec
    }

    /// The agent's `/metrics` page (Prometheus text), fetched inside the node's namespace.
    /// An error when the spec has no metrics address or the agent does not answer.
    pub fn metrics(&self) -> Result<String> {
        let addr = self
            .spec
            .metrics_addr
            .ok_or_else(|| Error::Agent("started without a metrics address".into()))?;
        http_get(&self.spec.netns, addr, "/metrics")
    }

    /// Leave the agent running and its pins in place when this handle drops (demo `--keep`).
    pub fn keep_running(mut self) {
        self.keep = true;
        if let Some(child) = self.child.take() {
            std::mem::forget(child);
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if std::thread::panicking() {
            eprintln!(
                "---- xlb agent log ({}) ----\n{}---- end of agent log ----",
                self.spec.log_path.display(),
                self.log()
            );
        }
        self.kill();
        if let Err(e) = cleanup_pins(&self.spec.pin_path) {
            eprintln!("cleanup of {}: {e}", self.spec.pin_path.display());
        }
    }
}

/// `xlb cleanup --pin-path PIN` (detaches programs, removes pins), then remove the directory.
/// A missing directory is not an error.
pub fn cleanup_pins(pin_path: &Path) -> Result<()> {
    if !pin_path.exists() {
        return Ok(());
    }
    let result = xlb_bin().and_then(|bin| {
        run_cmd(
            Command::new(bin)
                .arg("cleanup")
                .arg("--pin-path")
                .arg(pin_path),
        )
        .map(|_| ())
    });
    // Whatever xlb did, leave no pins behind (unlinking a pinned link also detaches it).
    if pin_path.exists() {
        std::fs::remove_dir_all(pin_path)
            .map_err(io_err(format!("removing {}", pin_path.display())))?;
    }
    result
}

/// One backend slot of a Service, as `xlb inspect services -o json` prints it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct InspectBackend {
    #[serde(default)]
    pub slot: u16,
    pub id: u32,
    pub addr: String,
    pub port: u16,
    pub proto: String,
    pub state: String,
}

/// One frontend, as `xlb inspect services -o json` prints it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct InspectService {
    pub frontend: String,
    pub addr: String,
    pub port: u16,
    pub proto: String,
    #[serde(default)]
    pub scope: u8,
    #[serde(default)]
    pub rev_nat_id: u32,
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default)]
    pub affinity_timeout: u32,
    pub count: u32,
    #[serde(default)]
    pub backends: Vec<InspectBackend>,
}

impl InspectService {
    /// "addr:port" of every backend, sorted.
    pub fn backend_addrs(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .backends
            .iter()
            .map(|b| format!("{}:{}", b.addr, b.port))
            .collect();
        v.sort();
        v
    }
}

/// Run `xlb inspect services -o json --pin-path PIN` and parse it.
pub fn inspect_services(pin_path: &Path) -> Result<Vec<InspectService>> {
    let out = inspect_raw(pin_path, "services")?;
    serde_json::from_str(&out).map_err(|e| Error::Inspect(format!("{e}: {out}")))
}

/// Raw JSON of `xlb inspect WHAT -o json --pin-path PIN`.
pub fn inspect_raw(pin_path: &Path, what: &str) -> Result<String> {
    let bin = xlb_bin()?;
    run_cmd(
        Command::new(bin)
            .args(["inspect", what, "-o", "json", "--pin-path"])
            .arg(pin_path),
    )
}

/// One conntrack entry, as `xlb inspect conntrack -o json` prints it (the fields tests use; the
/// others are ignored).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct InspectCt {
    /// "forward" or "reply".
    pub dir: String,
    pub saddr: std::net::Ipv4Addr,
    pub sport: u16,
    pub daddr: std::net::Ipv4Addr,
    pub dport: u16,
    pub proto: String,
    #[serde(default)]
    pub backend_id: u32,
    /// The conntrack state name (`lb_common::ct_state::name`), when the binary prints one.
    #[serde(default)]
    pub state: Option<String>,
    /// Past its expiry: a miss for the datapath, waiting for the sweeper.
    #[serde(default)]
    pub expired: bool,
}

impl InspectCt {
    /// Whether `addr` is either end of the entry's tuple.
    pub fn involves(&self, addr: std::net::Ipv4Addr) -> bool {
        self.saddr == addr || self.daddr == addr
    }
}

/// Run `xlb inspect conntrack -o json --pin-path PIN` and parse it.
pub fn inspect_conntrack(pin_path: &Path) -> Result<Vec<InspectCt>> {
    let out = inspect_raw(pin_path, "conntrack")?;
    serde_json::from_str(&out).map_err(|e| Error::Inspect(format!("{e}: {out}")))
}

/// `GET path` over HTTP/1.0 to `addr` from inside the network namespace `netns`: the body.
pub fn http_get(netns: &str, addr: SocketAddr, path: &str) -> Result<String> {
    let what = format!("GET http://{addr}{path} in {netns}");
    let raw = crate::netns::run_in(netns, || -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        // HTTP/1.0: the server closes after the response, so reading to EOF gets all of it.
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        Ok(buf)
    })?
    .map_err(io_err(what.clone()))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| Error::Agent(format!("{what}: no HTTP header in {text:?}")))?;
    if !head.starts_with("HTTP/1.") || head.split_whitespace().nth(1) != Some("200") {
        return Err(Error::Agent(format!("{what}: {head}")));
    }
    Ok(body.to_string())
}

/// The sum of every sample of metric `name` (any labels) in a Prometheus text page; None when
/// it has no sample.
pub fn metric_sum(page: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in page.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // Exactly this name: followed by labels or the value, not a longer name.
        let rest = match rest.chars().next() {
            Some('{') => rest.split_once('}').map_or("", |(_, v)| v),
            Some(' ') => rest,
            _ => continue,
        };
        if let Some(v) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// The frontend "addr:port/PROTO" in `services`, if present.
pub fn find_frontend<'a>(
    services: &'a [InspectService],
    frontend: &str,
) -> Option<&'a InspectService> {
    services.iter().find(|s| s.frontend == frontend)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_inspect_json() {
        let json = r#"[{"frontend":"10.96.0.80:80/TCP","addr":"10.96.0.80","port":80,"proto":"TCP","scope":0,
            "rev_nat_id":1,"flags":["cluster_ip"],"affinity_timeout":0,"count":1,
            "backends":[{"slot":1,"id":4,"addr":"10.244.1.10","port":9376,"proto":"TCP","state":"active"}]}]"#;
        let s: Vec<InspectService> = serde_json::from_str(json).unwrap();
        assert_eq!(s[0].backend_addrs(), vec!["10.244.1.10:9376".to_string()]);
        assert!(find_frontend(&s, "10.96.0.80:80/TCP").is_some());
        assert!(find_frontend(&s, "10.96.0.80:80/UDP").is_none());
    }

    #[test]
    fn parses_conntrack_json_with_or_without_a_state() {
        let json = r#"[{"dir":"forward","saddr":"10.244.1.100","sport":40000,"daddr":"10.96.0.80","dport":80,
            "proto":"TCP","nat_addr":"10.244.1.10","nat_port":9376,"backend_id":3,"rev_nat_id":1,"age_ms":5},
            {"dir":"reply","saddr":"10.244.1.10","sport":9376,"daddr":"10.244.1.100","dport":40000,
            "proto":"TCP","backend_id":3,"state":"closed","flags":[],"expires_in_s":-0.5,"expired":true}]"#;
        let ct: Vec<InspectCt> = serde_json::from_str(json).unwrap();
        assert_eq!(ct[0].state, None);
        assert_eq!(ct[1].state.as_deref(), Some("closed"));
        assert!(ct[1].expired && !ct[0].expired);
        assert!(ct[1].involves("10.244.1.100".parse().unwrap()));
        assert!(!ct[1].involves("10.244.1.11".parse().unwrap()));
    }

    #[test]
    fn sums_prometheus_samples_of_exactly_one_name() {
        let page = "# HELP xlb_conntrack_gc_deleted Entries removed\n\
                    # TYPE xlb_conntrack_gc_deleted counter\n\
                    xlb_conntrack_gc_deleted_total 12\n\
                    xlb_conntrack_gc_deleted_total_more 100\n\
                    xlb_datapath_packets_total{reason=\"reply\"} 3\n\
                    xlb_datapath_packets_total{reason=\"new_flow\"} 4.5\n";
        assert_eq!(
            metric_sum(page, "xlb_conntrack_gc_deleted_total"),
            Some(12.0)
        );
        assert_eq!(metric_sum(page, "xlb_datapath_packets_total"), Some(7.5));
        assert_eq!(metric_sum(page, "xlb_nothing"), None);
    }
}
