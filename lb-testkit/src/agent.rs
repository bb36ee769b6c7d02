//! The `xlb agent` process of one node, and the `xlb inspect` / `xlb cleanup` calls tests make.
//!
//! The agent runs in the node's network namespace (entered before `exec`, mount namespace kept, so
//! its pins under /sys/fs/bpf are visible to the test and to `xlb inspect`). Its log goes to a file
//! that is printed when a test fails, and that the handle follows ([`LogWatch`]) to see the agent
//! become ready, or log anything else a test waits for, the moment it is written. Dropping the
//! handle kills the agent and runs `xlb cleanup`, which detaches the programs and removes the pins.
//!
//! The same handle runs the agent under measurement in the benchmark: the time from spawn to
//! "agent ready" ([`Agent::ready_after`]) and the resident memory ([`Agent::rss_mib`]).

use std::fs::OpenOptions;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Deserialize;

use crate::error::{io_err, Error, Result};
use crate::logwatch::{strip_ansi, LogWatch};
use crate::netns::{run_cmd, NetNs};

/// How long an agent may take from start to "agent ready", unless its spec says otherwise.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// What the agent logs once its first full sync is applied.
pub const READY_MARKER: &str = "agent ready";
/// How long [`Agent::stop`] waits for the agent to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest sleep between two looks at the agent while waiting for its log: a write or an exit
/// wakes the wait at once; this only bounds how late an abandon request is noticed.
const WAIT_SLICE: Duration = Duration::from_millis(100);

static XLB_BIN: OnceLock<PathBuf> = OnceLock::new();

/// Use `path` as the `xlb` binary for the rest of this process (agents, inspect, cleanup), e.g.
/// the benchmark's release build. Set once; an error if it is not a file or was set already.
pub fn use_xlb_bin(path: &Path) -> Result<()> {
    if !path.is_file() {
        return Err(Error::Agent(format!("{} does not exist", path.display())));
    }
    XLB_BIN
        .set(path.to_path_buf())
        .map_err(|p| Error::Agent(format!("xlb binary already set to {}", p.display())))
}

/// The `xlb` binary: the one given to [`use_xlb_bin`], else `$XLB_BIN`, else
/// `<workspace>/target/debug/xlb` (honouring `CARGO_TARGET_DIR`).
pub fn xlb_bin() -> Result<PathBuf> {
    if let Some(p) = XLB_BIN.get() {
        return Ok(p.clone());
    }
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
    /// How long [`Agent::start`] and [`Agent::restart`] wait for "agent ready".
    pub ready_timeout: Duration,
    /// `RUST_LOG` of the agent; None: the caller's `RUST_LOG`, else "info".
    pub log_filter: Option<String>,
    /// Asked while waiting for the agent: true gives up (e.g. the benchmark was interrupted).
    pub abandon: Option<fn() -> bool>,
    /// `--node-name`: which EndpointSlice endpoints are local (nodeName), hence which flows
    /// from outside are not SNATed and what externalTrafficPolicy Local serves. None: not passed.
    pub node_name: Option<String>,
    /// `--devices` (external devices, e.g. "eth0"). None: the agent's default (the device of
    /// the default route).
    pub devices: Option<String>,
    /// `--xdp-mode`. None: the agent's default (native).
    pub xdp_mode: Option<XdpMode>,
    /// `--socket-lb` and `--cgroup-path`. Always passed: [`SocketLb::Off`] by default, so a
    /// test agent never attaches to the machine's root cgroup.
    pub socket_lb: SocketLb,
    /// Environment variables set for the agent process (e.g. KUBERNETES_SERVICE_HOST/PORT, as
    /// a DaemonSet's pod has them).
    pub env: Vec<(String, String)>,
    /// The `xlb` binary of this agent; None: [`xlb_bin`]. The upgrade test starts an older
    /// build's agent (`crate::oldbuild`), then the new one on the same pins.
    pub bin: Option<PathBuf>,
}

/// Socket load balancing of a test agent (`--socket-lb`, `--cgroup-path`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SocketLb {
    /// `--socket-lb off`.
    #[default]
    Off,
    /// `--socket-lb host --cgroup-path PATH` (a [`crate::cgroup::TestCgroup`]'s path).
    Host(PathBuf),
    /// `--socket-lb all --cgroup-path PATH`.
    All(PathBuf),
}

impl SocketLb {
    /// The agent's arguments.
    pub fn args(&self) -> Vec<String> {
        let (mode, path) = match self {
            SocketLb::Off => return vec!["--socket-lb".into(), "off".into()],
            SocketLb::Host(p) => ("host", p),
            SocketLb::All(p) => ("all", p),
        };
        vec![
            "--socket-lb".into(),
            mode.into(),
            "--cgroup-path".into(),
            path.display().to_string(),
        ]
    }
}

/// How the agent runs `from_net` on its external devices (`--xdp-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum XdpMode {
    /// Native (driver) XDP, tc ingress behind it.
    Native,
    /// Generic (skb) XDP, tc ingress behind it.
    Generic,
    /// tc ingress only.
    Off,
}

impl XdpMode {
    pub const ALL: [XdpMode; 3] = [XdpMode::Native, XdpMode::Generic, XdpMode::Off];

    /// The flag's value.
    pub fn as_arg(self) -> &'static str {
        match self {
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
            XdpMode::Off => "off",
        }
    }

    /// The attach mode `ip link show` prints after the MTU for a device with this mode's XDP
    /// program ("xdp", "xdpgeneric"); None for `Off` (no XDP program).
    pub fn ip_link_word(self) -> Option<&'static str> {
        match self {
            XdpMode::Native => Some("xdp"),
            XdpMode::Generic => Some("xdpgeneric"),
            XdpMode::Off => None,
        }
    }
}

impl std::fmt::Display for XdpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_arg())
    }
}

impl AgentSpec {
    /// The test defaults: pod veths are "xp*", metrics off, [`READY_TIMEOUT`].
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
            ready_timeout: READY_TIMEOUT,
            log_filter: None,
            abandon: None,
            node_name: None,
            devices: None,
            xdp_mode: None,
            socket_lb: SocketLb::Off,
            env: Vec::new(),
            bin: None,
        }
    }
}

/// A running (or stopped) agent.
#[derive(Debug)]
pub struct Agent {
    spec: AgentSpec,
    child: Option<Child>,
    /// Log length when the current process started: its lines come after it.
    log_start: u64,
    spawned_at: Instant,
    /// Spawn to "agent ready" of the current process (zero until it was ready). Timed by the
    /// log write itself, not by a polling interval.
    pub ready_after: Duration,
    keep: bool,
}

impl Agent {
    /// A handle that has not started its process yet ([`Agent::spawn`]); dropping it still
    /// cleans up the spec's pins (e.g. a test that expects the agent to refuse them).
    pub fn new(spec: AgentSpec) -> Self {
        Agent {
            spec,
            child: None,
            log_start: 0,
            spawned_at: Instant::now(),
            ready_after: Duration::ZERO,
            keep: false,
        }
    }

    /// Start and wait (up to the spec's `ready_timeout`) for "agent ready".
    pub fn start(spec: AgentSpec) -> Result<Self> {
        let mut agent = Agent::new(spec);
        agent.spawn()?;
        agent.wait_ready(agent.spec.ready_timeout)?;
        Ok(agent)
    }

    /// Start the process without waiting for readiness (e.g. to test traffic during start-up).
    pub fn spawn(&mut self) -> Result<()> {
        if self.is_running() {
            return Err(Error::Agent("already running".into()));
        }
        let bin = match &self.spec.bin {
            Some(b) => b.clone(),
            None => xlb_bin()?,
        };
        std::fs::create_dir_all(&self.spec.pin_path)
            .map_err(io_err(format!("creating {}", self.spec.pin_path.display())))?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.spec.log_path)
            .map_err(io_err(format!("opening {}", self.spec.log_path.display())))?;
        self.log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log2 = log.try_clone().map_err(io_err("cloning log fd"))?;
        // The demo's detached agent needs setsid between fork and exec; every other start is
        // spawned from inside the namespace (no fork of this process, see `netns::spawn_in`).
        let mut cmd = if self.spec.detach {
            crate::netns::command_in(&self.spec.netns, &bin)?
        } else {
            Command::new(&bin)
        };
        cmd.arg("agent");
        // An empty manifests path: the source is given in `extra_args` (e.g. --kubeconfig).
        if !self.spec.manifests.as_os_str().is_empty() {
            cmd.arg("--manifests").arg(&self.spec.manifests);
        }
        let metrics = self
            .spec
            .metrics_addr
            .map_or_else(|| "none".to_string(), |a| a.to_string());
        cmd.arg("--pin-path").arg(&self.spec.pin_path).args([
            "--pod-devices",
            &self.spec.pod_devices,
            "--metrics-addr",
            &metrics,
        ]);
        if let Some(n) = &self.spec.node_name {
            cmd.args(["--node-name", n]);
        }
        if let Some(d) = &self.spec.devices {
            cmd.args(["--devices", d]);
        }
        if let Some(m) = self.spec.xdp_mode {
            cmd.args(["--xdp-mode", m.as_arg()]);
        }
        cmd.args(self.spec.socket_lb.args());
        cmd.envs(self.spec.env.iter().map(|(k, v)| (k, v)));
        cmd.args(&self.spec.extra_args)
            // The log is a file that is read back: no colour sequences in it.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        match &self.spec.log_filter {
            Some(f) => {
                cmd.env("RUST_LOG", f);
            }
            None if std::env::var_os("RUST_LOG").is_none() => {
                cmd.env("RUST_LOG", "info");
            }
            None => {}
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
        self.ready_after = Duration::ZERO;
        self.spawned_at = Instant::now();
        let child = if self.spec.detach {
            cmd.spawn()
                .map_err(io_err(format!("starting {}", bin.display())))?
        } else {
            crate::netns::spawn_in(&self.spec.netns, &mut cmd)?
        };
        self.child = Some(child);
        Ok(())
    }

    /// Wait until the current process logged [`READY_MARKER`]; an exit first is an error. Sets
    /// [`Agent::ready_after`].
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        self.wait_log(timeout, |l| l.contains(READY_MARKER))?;
        self.ready_after = self.spawned_at.elapsed();
        Ok(())
    }

    /// Wait until the current process logs a line for which `matches` holds (lines it logged
    /// already count) and return that line. An error when the agent exits first or `timeout`
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
                None => Some("agent not started".to_string()),
                Some(Ok(Some(status))) => Some(format!("agent exited with {status}")),
                Some(_) => None,
            };
            if let Some(line) = watch.new_lines()?.into_iter().find(|l| matches(l)) {
                return Ok(line);
            }
            let give_up = if let Some(why) = exited {
                Some(why)
            } else if Instant::now() >= deadline {
                Some(format!("not there after {timeout:?}"))
            } else if self.spec.abandon.is_some_and(|f| f()) {
                Some("abandoned".to_string())
            } else {
                None
            };
            if let Some(why) = give_up {
                return Err(Error::Agent(format!(
                    "{why} while waiting for a log line; log:\n{}",
                    self.log()
                )));
            }
            watch.wait(
                deadline
                    .saturating_duration_since(Instant::now())
                    .min(WAIT_SLICE),
            );
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Resident memory of the running agent, MiB (`VmRSS`).
    pub fn rss_mib(&self) -> Option<f64> {
        rss_mib(self.pid()?)
    }

    /// SIGTERM and wait for the exit (up to 10 s, then SIGKILL). Programs and pins stay:
    /// traffic keeps flowing.
    pub fn stop(&mut self) -> Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        match wait_exit(&mut child, STOP_TIMEOUT) {
            Some(s) => Ok(Some(s)),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(Error::Agent(format!(
                    "did not exit within {STOP_TIMEOUT:?} of SIGTERM; log:\n{}",
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
        self.wait_ready(self.spec.ready_timeout)
    }

    /// The whole log file (every start), without colour sequences.
    pub fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.spec.log_path).unwrap_or_default())
    }

    /// The log of the current process, without colour sequences.
    pub fn log_since_start(&self) -> String {
        let log = std::fs::read(&self.spec.log_path).unwrap_or_default();
        let start = (self.log_start as usize).min(log.len());
        strip_ansi(&String::from_utf8_lossy(&log[start..]))
    }

    pub fn spec(&self) -> &AgentSpec {
        &self.spec
    }

    /// The spec the next [`Agent::spawn`] / [`Agent::restart`] uses (e.g. other flags).
    pub fn spec_mut(&mut self) -> &mut AgentSpec {
        &mut self.spec
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

/// Wait (up to `timeout`) for `child` to exit, woken by the exit itself (a pidfd), and reap it.
fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    if let Ok(Some(s)) = child.try_wait() {
        return Some(s);
    }
    // SAFETY: pidfd_open of our own child, not yet reaped (so its pid is not reused).
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    if fd >= 0 {
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let deadline = Instant::now() + timeout;
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
            events: libc::POLLIN,
            revents: 0,
        };
        // A pidfd is readable once the process exited.
        while pfd.revents == 0 && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, ms) };
        }
    }
    child.try_wait().ok().flatten()
}

/// Resident memory of process `pid`, MiB (`VmRSS` of /proc/PID/status).
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
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
    /// Forward: the backend the flow is translated to. Reply: the frontend restored.
    #[serde(default)]
    pub nat_addr: Option<std::net::Ipv4Addr>,
    #[serde(default)]
    pub nat_port: u16,
    /// A flow from outside SNATed to the node: forward, the node address and port the backend
    /// sees; reply, the client the answer is restored to.
    #[serde(default)]
    pub snat: Option<(std::net::Ipv4Addr, u16)>,
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

/// An HTTP answer: status code, header fields (names lower-cased) and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` over HTTP/1.0 to `addr` from inside the network namespace `netns`: the whole
/// answer, whatever its status (e.g. a healthCheckNodePort's 503).
pub fn http_request(netns: &str, addr: SocketAddr, path: &str) -> Result<HttpResponse> {
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
    parse_http(&String::from_utf8_lossy(&raw)).map_err(|e| Error::Agent(format!("{what}: {e}")))
}

fn parse_http(text: &str) -> std::result::Result<HttpResponse, String> {
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header in {text:?}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: body.to_string(),
    })
}

/// `GET path` over HTTP/1.0 to `addr` from inside the network namespace `netns`: the body of a
/// 200 answer (any other status is an error).
pub fn http_get(netns: &str, addr: SocketAddr, path: &str) -> Result<String> {
    let r = http_request(netns, addr, path)?;
    if r.status != 200 {
        return Err(Error::Agent(format!(
            "GET http://{addr}{path} in {netns}: status {}",
            r.status
        )));
    }
    Ok(r.body)
}

/// Run `xlb inspect stats -o json --pin-path PIN`: datapath counter name -> packets.
pub fn inspect_stats(pin_path: &Path) -> Result<std::collections::BTreeMap<String, u64>> {
    let out = inspect_raw(pin_path, "stats")?;
    serde_json::from_str(&out).map_err(|e| Error::Inspect(format!("{e}: {out}")))
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
    fn test_agents_never_attach_socket_lb_to_the_root_cgroup_by_default() {
        let ns_spec = SocketLb::default();
        assert_eq!(ns_spec.args(), ["--socket-lb", "off"]);
        let host = SocketLb::Host("/sys/fs/cgroup/unified/xlbt1-0-socklb".into());
        assert_eq!(
            host.args(),
            [
                "--socket-lb",
                "host",
                "--cgroup-path",
                "/sys/fs/cgroup/unified/xlbt1-0-socklb"
            ]
        );
        assert_eq!(SocketLb::All("/x".into()).args()[1], "all");
    }

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
            "proto":"TCP","backend_id":3,"state":"closed","flags":[],"expires_in_s":-0.5,"expired":true},
            {"dir":"forward","saddr":"172.31.0.200","sport":50000,"daddr":"172.31.0.11","dport":30080,
            "proto":"TCP","nat_addr":"10.244.2.40","nat_port":443,"snat":["172.31.0.11",61234],
            "backend_id":5,"rev_nat_id":2,"state":"established","flags":["snat"],"expires_in_s":86399.0,"expired":false}]"#;
        let ct: Vec<InspectCt> = serde_json::from_str(json).unwrap();
        assert_eq!(ct[0].state, None);
        assert_eq!(ct[0].nat_addr, Some("10.244.1.10".parse().unwrap()));
        assert_eq!(ct[0].nat_port, 9376);
        assert_eq!(ct[0].snat, None);
        assert_eq!(ct[1].state.as_deref(), Some("closed"));
        assert!(ct[1].expired && !ct[0].expired);
        assert!(ct[1].involves("10.244.1.100".parse().unwrap()));
        assert!(!ct[1].involves("10.244.1.11".parse().unwrap()));
        assert_eq!(ct[2].snat, Some(("172.31.0.11".parse().unwrap(), 61234)));
    }

    #[test]
    fn parses_an_http_answer_of_any_status() {
        let r = parse_http(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\
             X-Content-Type-Options: nosniff\r\n\r\n{\"localEndpoints\":0}",
        )
        .unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("X-Content-Type-Options"), Some("nosniff"));
        assert_eq!(r.body, "{\"localEndpoints\":0}");
        assert!(parse_http("garbage").is_err());
    }

    #[test]
    fn reads_the_resident_memory_of_a_process() {
        let me = rss_mib(std::process::id()).unwrap();
        assert!(me > 0.1 && me < 100_000.0, "{me}");
        assert_eq!(rss_mib(u32::MAX), None);
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
