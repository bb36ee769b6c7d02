//! Connection rate, latency and stream throughput from a client pod to the last of N Services,
//! for each mode on its own bed: no translation (straight to a pod), xlb, and the three
//! kube-proxy shapes. While xlb runs at the largest size, the endpoint-change latency is measured
//! on the same agent (see [`crate::control::endpoint_changes`]).
//!
//! Interleaved rounds (issue 12): a single run of one mode after another drifts by about ±10% on
//! a shared VM, enough to decide a 0.95x target either way. So every mode has a bed of its own
//! (a [`Station`]), all of them live at once; at each size every bed gets the Services (rules or
//! an agent), then several rounds go through all modes' points, each round in another order
//! ([`round_order`]), and a row is the median of its rounds with their range
//! ([`DpRow::round_rates`]). A slow minute then costs every mode one round, not one mode its
//! only measurement. The idle beds stay up meanwhile (their agents idle, their servers blocked
//! in accept): the same background for every mode.
//!
//! The external path is measured on the same beds, rules and agents, as points of the same
//! rounds: connection rate from the external client to node1's NodePort, for a Service whose
//! pods run on node1 (local backend) and one whose pods run on node2 (remote backend; xlb and
//! netfilter SNAT those flows to node1's address), next to the external client connecting to
//! the pod itself through node1 (no translation). xlb runs from_net as the agent's default on a
//! veth uplink does (`--xdp-mode auto`: tc only); the other `--xdp-mode`s of the plan (native
//! and generic XDP) get beds and agents of their own, measured on the external path only.
//!
//! Socket load balancing (issue 11): one bed with an agent with `--socket-lb all` translates
//! the client pod's sockets at connect time (no per-packet NAT, no conntrack), another with
//! `--socket-lb host` serves a host-network client in node1's namespace ([`XLB_SOCKLB_HOST`],
//! next to that client connecting to the pod itself, [`DIRECT_HOST`], measured on the direct
//! bed). The programs are attached to a dedicated child cgroup per bed that holds the benchmark
//! process only while those rows are measured ([`crate::socklb`]); the datapath's
//! `sock_translated` counter must account for every connection, so a row can never silently
//! measure the tc path.
//!
//! The floor of the ClusterIP rows ([`DIRECT_NOOP`]): a bed whose client connects to a pod
//! directly through the object's no-op tc program at xlb's pod hooks ([`crate::noophooks`]).
//! No tc datapath can be faster than that row, nor cost less per run than its program.
//!
//! After the rounds of a size, one more point of each kind of traffic runs on the xlb,
//! `--socket-lb all` and no-op beds with the kernel's run statistics on ([`crate::progstats`]):
//! what each program cost per run on real traffic. Never during the rounds: counting costs every run two
//! clock reads, which would lower xlb's compared rates.

use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

use crate::bed::{Backend, Bed};
use crate::control::{endpoint_changes, ChangeResults};
use crate::netfilter::{Installed, NfMode};
use crate::noophooks::NoopHooks;
use crate::progstats::{self, ProgCost, StatsOn};
use crate::rules::{xlb_dir, ServiceSet, SERVICE_PORT};
use crate::socklb::BenchCgroup;
use crate::stats::{Latency, Spread};
use crate::traffic::{conn_rate, request, stream, ConnResult, SINK_PORT, WARM_UP};
use lb_testkit::{Agent, NetNs, SocketLb};

/// What translates the client's traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No translation: the client connects to a pod IP.
    Direct,
    /// xlb's tc path (`--socket-lb off`): from_pod / to_pod translate every packet.
    Xlb,
    /// xlb's socket load balancing: `--socket-lb all` for the client pod, and `--socket-lb
    /// host` for a host-network client ([`XLB_SOCKLB_HOST`]).
    XlbSocket,
    Netfilter(NfMode),
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Xlb => "xlb",
            Mode::XlbSocket => "xlb-socklb",
            Mode::Netfilter(m) => m.label(),
        }
    }
}

/// The rows of a host-network client (node1's namespace): to a pod directly...
pub const DIRECT_HOST: &str = "direct-host";
/// ...and to the ClusterIP through `--socket-lb host`.
pub const XLB_SOCKLB_HOST: &str = "xlb-socklb-host";
/// The client pod to a pod directly through no-op tc programs at xlb's pod hooks: the floor of
/// the connection-rate and real-traffic targets (see [`crate::noophooks`]).
pub const DIRECT_NOOP: &str = "direct-noop-tc";

/// Every label of the ClusterIP rows, in table and plot order.
pub fn row_labels() -> Vec<&'static str> {
    let mut v = vec![Mode::Direct.label(), DIRECT_HOST, DIRECT_NOOP];
    v.extend([Mode::Xlb, Mode::XlbSocket].map(Mode::label));
    v.push(XLB_SOCKLB_HOST);
    v.extend(NfMode::ALL.map(NfMode::label));
    v
}

/// The no-translation row a ClusterIP row is compared with: the same client to a pod.
pub fn baseline_of(label: &str) -> &'static str {
    if label == DIRECT_HOST || label == XLB_SOCKLB_HOST {
        DIRECT_HOST
    } else {
        Mode::Direct.label()
    }
}

/// How xlb's agent runs from_net on the node's uplink (`--xdp-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    Native,
    Generic,
    /// tc ingress only.
    Off,
}

impl XdpMode {
    /// The agent's default first: on this bed's veth uplink `--xdp-mode auto` runs tc only.
    pub const ALL: [XdpMode; 3] = [XdpMode::Off, XdpMode::Native, XdpMode::Generic];
    pub fn arg(self) -> &'static str {
        match self {
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
            XdpMode::Off => "off",
        }
    }
    /// The mode label of external rows: plain "xlb" is the agent's default on this bed
    /// (`--xdp-mode auto`, which is tc only on a veth uplink).
    pub fn label(self) -> &'static str {
        match self {
            XdpMode::Native => "xlb-native-xdp",
            XdpMode::Generic => "xlb-generic",
            XdpMode::Off => "xlb",
        }
    }
}

/// Every mode label of the external rows, in table order.
pub fn external_labels() -> Vec<&'static str> {
    let mut v = vec![Mode::Direct.label()];
    v.extend(XdpMode::ALL.map(XdpMode::label));
    v.extend(NfMode::ALL.map(NfMode::label));
    v
}

/// The traffic of the no-op station's statistics point: the client pod to a pod.
pub const NOOP_TRAFFIC: &str = "to a pod, untranslated";

/// What to measure and for how long.
#[derive(Clone, Copy, Debug)]
pub struct DpPlan {
    pub sizes: &'static [usize],
    /// One measured point (one mode, one round).
    pub point: Duration,
    /// Interleaved rounds per size: every mode's points once per round.
    pub rounds: usize,
    pub max_requests: usize,
    pub stream: Duration,
    pub endpoint_changes: usize,
    /// The xlb agent's `--xdp-mode`s measured on the external path; the first one is the
    /// agent of the ClusterIP rows too.
    pub xdp_modes: &'static [XdpMode],
}

impl DpPlan {
    /// The `--xdp-mode` of the agent behind the ClusterIP row "xlb".
    fn first_xdp(&self) -> XdpMode {
        self.xdp_modes.first().copied().unwrap_or(XdpMode::Native)
    }

    /// The beds of a run, in table order.
    fn stations(&self) -> Vec<Station> {
        let mut v = vec![Station::Direct, Station::DirectNoop];
        v.push(Station::Xlb(self.first_xdp()));
        v.extend(self.xdp_modes.iter().skip(1).map(|&m| Station::Xlb(m)));
        v.extend([Station::SockAll, Station::SockHost]);
        v.extend(NfMode::ALL.map(Station::Netfilter));
        v
    }

    /// Points of one round.
    fn points_per_round(&self) -> usize {
        self.stations().iter().map(|s| s.points(self).len()).sum()
    }

    /// Progress steps of [`run`]: per size, each bed's setup, every point of every round and
    /// the statistics points; then the endpoint changes.
    pub fn steps(&self) -> usize {
        let stats = self
            .stations()
            .iter()
            .filter(|s| s.counts_programs(self))
            .count();
        self.sizes.len() * (self.stations().len() + self.rounds * self.points_per_round() + stats)
            + 1
    }
}

/// What runs on the node1 of one bed while a size is measured. Every station has a bed of its
/// own, all of them live at the same time, so that the rounds can go from one to the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Station {
    /// Nothing: the no-translation baselines (client pod, host-network client, external client
    /// to a pod).
    Direct,
    /// The client pod to a pod, through `noop_tc` at xlb's pod hooks ([`DIRECT_NOOP`]).
    DirectNoop,
    /// xlb's agent, `--socket-lb off`, `--xdp-mode` this; the plan's first mode also carries the
    /// ClusterIP row "xlb", the others only their external rows.
    Xlb(XdpMode),
    /// `--socket-lb all`: the client pod's sockets translated at connect time.
    SockAll,
    /// `--socket-lb host`: a host-network client in node1's namespace.
    SockHost,
    Netfilter(NfMode),
}

/// Where a point's client sits and what it dials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Point {
    /// The client pod, to the probe's ClusterIP (direct: to a pod).
    Pod,
    /// A host-network client in node1's namespace, to the ClusterIP (direct-host: to a pod).
    Host,
    /// The external client, to node1's NodePort (direct: to a pod through node1).
    External(Backend),
}

impl Point {
    /// The traffic of a statistics point.
    fn traffic(self) -> String {
        match self {
            Point::Pod => "ClusterIP".into(),
            Point::Host => "ClusterIP, host client".into(),
            Point::External(b) => format!("NodePort {}", b.label()),
        }
    }
}

impl Station {
    fn points(self, plan: &DpPlan) -> Vec<Point> {
        let ext = Backend::ALL.map(Point::External);
        match self {
            Station::Direct => [Point::Pod, Point::Host].into_iter().chain(ext).collect(),
            Station::DirectNoop => vec![Point::Pod],
            Station::Xlb(m) if m == plan.first_xdp() => {
                std::iter::once(Point::Pod).chain(ext).collect()
            }
            Station::Xlb(_) => ext.to_vec(),
            Station::SockAll => vec![Point::Pod],
            Station::SockHost => vec![Point::Host],
            Station::Netfilter(_) => std::iter::once(Point::Pod).chain(ext).collect(),
        }
    }

    /// The row label of `point` on this station.
    fn label(self, point: Point) -> &'static str {
        match (self, point) {
            (Station::Direct, Point::Host) => DIRECT_HOST,
            (Station::Direct, _) => Mode::Direct.label(),
            (Station::DirectNoop, _) => DIRECT_NOOP,
            (Station::Xlb(m), Point::External(_)) => m.label(),
            (Station::Xlb(_), _) => Mode::Xlb.label(),
            (Station::SockAll, _) => Mode::XlbSocket.label(),
            (Station::SockHost, _) => XLB_SOCKLB_HOST,
            (Station::Netfilter(m), _) => m.label(),
        }
    }

    /// The mode of the station's stream row (the largest size), if it has one.
    fn stream_mode(self, plan: &DpPlan) -> Option<Mode> {
        match self {
            Station::Direct => Some(Mode::Direct),
            Station::Xlb(m) if m == plan.first_xdp() => Some(Mode::Xlb),
            Station::Netfilter(m) => Some(Mode::Netfilter(m)),
            _ => None,
        }
    }

    /// Whether the real-traffic cost of the station's programs is read after its rounds.
    fn counts_programs(self, plan: &DpPlan) -> bool {
        self == Station::Xlb(plan.first_xdp())
            || self == Station::SockAll
            || self == Station::DirectNoop
    }

    fn name(self) -> String {
        match self {
            Station::Xlb(m) => format!("xlb --xdp-mode {}", m.arg()),
            Station::Direct => "direct".into(),
            Station::DirectNoop => "direct through no-op tc programs".into(),
            Station::SockAll => "xlb --socket-lb all".into(),
            Station::SockHost => "xlb --socket-lb host".into(),
            Station::Netfilter(m) => m.label().into(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DpRow {
    pub mode: String,
    pub services: usize,
    /// Medians over the rounds (connection rate, p50 and p99); requests and errors summed.
    #[serde(flatten)]
    pub conn: ConnResult,
    /// The connection rate of each round, in round order (absent in results from before the
    /// rounds existed).
    #[serde(default)]
    pub round_rates: Vec<f64>,
    /// Time to install the rules / to get the agent ready for this size, seconds.
    pub setup_s: f64,
    /// xlb only: the agent's resident memory after the rounds.
    pub agent_rss_mib: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StreamRow {
    pub mode: String,
    pub services: usize,
    /// Median of the samples.
    pub gbit_s: f64,
    /// Lowest and highest sample (absent in older results).
    #[serde(default)]
    pub range: Option<(f64, f64)>,
}

/// Connections from the external client to node1's NodePort (or, for "direct", to the pod).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExtRow {
    pub mode: String,
    /// "local" (the pod runs on node1) or "remote" (on node2).
    pub backend: String,
    pub services: usize,
    /// Medians over the rounds, as [`DpRow::conn`].
    #[serde(flatten)]
    pub conn: ConnResult,
    #[serde(default)]
    pub round_rates: Vec<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DpResults {
    pub rows: Vec<DpRow>,
    /// The external path (absent in results from before it existed).
    #[serde(default)]
    pub external: Vec<ExtRow>,
    pub streams: Vec<StreamRow>,
    pub endpoint_change: Option<ChangeResults>,
    /// Interleaved rounds per size (0 in results from before they existed: one point each).
    #[serde(default)]
    pub rounds: usize,
    /// Seconds of one point.
    #[serde(default)]
    pub point_s: f64,
    /// Real-traffic cost per program run (kernel run statistics), per size and point.
    #[serde(default)]
    pub prog_costs: Vec<ProgCost>,
    /// How the run statistics were turned on.
    #[serde(default)]
    pub stats_method: Option<String>,
    /// Modes that failed, with the reason (the run goes on with the others).
    pub errors: Vec<String>,
}

/// One station's bed and what runs on it at the current size. Fields drop in order: the agent
/// or rules first, then the socket-LB cgroup (the agent's programs are attached to it), then
/// the bed.
struct Live {
    station: Station,
    agent: Option<Agent>,
    rules: Option<Installed>,
    /// The manifests directory of the current size (xlb stations).
    manifests: Option<PathBuf>,
    probe_file: Option<PathBuf>,
    /// The probe's ClusterIP on its greeting port and on the sink.
    svc: Option<(SocketAddr, SocketAddr)>,
    setup_s: f64,
    /// Installed for the current size.
    ready: bool,
    cgroup: Option<BenchCgroup>,
    /// [`Station::DirectNoop`]: the no-op programs on node1's pod veths.
    noop: Option<NoopHooks>,
    bed: Bed,
}

impl Live {
    fn new(station: Station) -> anyhow::Result<Self> {
        let bed = Bed::new()?;
        let cgroup = match station {
            Station::SockAll | Station::SockHost => {
                Some(BenchCgroup::create(&crate::bed::unique_prefix())?)
            }
            _ => None,
        };
        Ok(Live {
            station,
            agent: None,
            rules: None,
            manifests: None,
            probe_file: None,
            svc: None,
            setup_s: 0.0,
            ready: false,
            cgroup,
            noop: None,
            bed,
        })
    }

    /// Stop what runs on node1 (the agent removes nothing: its handle kills it and removes the
    /// pins; the rules are flushed).
    fn teardown(&mut self) {
        self.ready = false;
        self.agent = None;
        self.rules = None;
        self.noop = None;
        self.svc = None;
        self.probe_file = None;
        if let Some(dir) = self.manifests.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// Program `n` Services in this station's way.
    fn install(&mut self, n: usize, plan: &DpPlan) -> anyhow::Result<()> {
        self.teardown();
        let set = ServiceSet::generate(&self.bed.set_spec(n));
        let probe = set.probe();
        self.svc = Some((
            SocketAddrV4::new(probe.cluster_ip, SERVICE_PORT).into(),
            SocketAddrV4::new(probe.cluster_ip, SINK_PORT).into(),
        ));
        let timeout = Duration::from_secs(300);
        match self.station {
            Station::Direct => self.setup_s = 0.0,
            Station::DirectNoop => {
                let started = std::time::Instant::now();
                let bed = &self.bed;
                let devices: Vec<String> = std::iter::once(&bed.client)
                    .chain(&bed.backends)
                    .map(|p| p.host_veth.clone())
                    .collect();
                self.noop = Some(NoopHooks::attach(bed.node(), &devices)?);
                self.setup_s = started.elapsed().as_secs_f64();
            }
            Station::Xlb(_) | Station::SockAll | Station::SockHost => {
                let dir = self.bed.scratch().join(format!("manifests-{n}"));
                self.manifests = Some(dir.clone());
                self.probe_file = Some(xlb_dir::write_all(&set, &dir)?);
                let agent = match self.station {
                    Station::Xlb(m) => self.bed.start_agent(&dir, timeout, m.arg())?,
                    Station::SockAll | Station::SockHost => {
                        let cg = self.cgroup.as_ref().expect("socket-LB stations have one");
                        let lb = if self.station == Station::SockAll {
                            SocketLb::All(cg.path().to_path_buf())
                        } else {
                            SocketLb::Host(cg.path().to_path_buf())
                        };
                        self.bed
                            .start_agent_socklb(&dir, timeout, plan.first_xdp().arg(), lb)?
                    }
                    _ => unreachable!(),
                };
                self.setup_s = agent.ready_after.as_secs_f64();
                self.agent = Some(agent);
            }
            Station::Netfilter(m) => {
                let rules = Installed::apply(self.bed.node().name(), m, &m.render(&set))?;
                conntrack_friendly(&self.bed);
                self.setup_s = rules.took.as_secs_f64();
                self.rules = Some(rules);
            }
        }
        self.ready = true;
        Ok(())
    }

    fn svc(&self) -> anyhow::Result<SocketAddr> {
        self.svc.map(|s| s.0).context("no Services installed")
    }

    /// One point: a connection rate from `point`'s client.
    fn measure(&self, point: Point, plan: &DpPlan) -> anyhow::Result<ConnResult> {
        let bed = &self.bed;
        let names: Vec<&str> = bed.backends[..3].iter().map(|p| p.name.as_str()).collect();
        let from = |client: &NetNs, target: SocketAddr| -> anyhow::Result<ConnResult> {
            let greeting = client
                .run(|| request(target))?
                .with_context(|| format!("first request to {target}"))?;
            if !names.contains(&greeting.as_str()) {
                bail!("{target} answered {greeting:?}, not one of {names:?}");
            }
            conn_rate(client, target, plan.point, plan.max_requests)
        };
        let through = |client: &NetNs| -> anyhow::Result<ConnResult> {
            let cg = self.cgroup.as_ref().context("no socket-LB cgroup")?;
            let svc = self.svc()?;
            through_sockets(bed, cg, || from(client, svc))
        };
        match (self.station, point) {
            (Station::Direct | Station::DirectNoop, Point::Pod) => {
                from(&bed.client.ns, bed.direct(0))
            }
            (Station::Direct, Point::Host) => from(bed.node(), bed.direct(0)),
            (Station::Direct, Point::External(b)) => {
                measure_external(bed, plan, b, bed.direct_external(b))
            }
            (Station::SockAll, Point::Pod) => through(&bed.client.ns),
            (Station::SockHost, Point::Host) => through(bed.node()),
            (_, Point::Pod) => from(&bed.client.ns, self.svc()?),
            (_, Point::External(b)) => measure_external(bed, plan, b, bed.nodeport(b)),
            (s, p) => bail!("{s:?} has no point {p:?}"),
        }
    }
}

/// The order of a round's points: a different rotation each round, reversed every other round,
/// so that no mode always runs first, last or right after the same neighbour, and a drift
/// within a round (another process waking up, caches warming) falls on different modes.
pub fn round_order(points: usize, round: usize, rounds: usize) -> Vec<usize> {
    if points == 0 {
        return Vec::new();
    }
    let shift = round * points / rounds.max(1);
    let mut v: Vec<usize> = (0..points).map(|k| (k + shift) % points).collect();
    if round % 2 == 1 {
        v.reverse();
    }
    v
}

/// The row of several rounds: the median rate, the medians of p50 and p99, the largest
/// maximum, requests and errors summed.
pub fn combine(rounds: &[ConnResult]) -> Option<(ConnResult, Vec<f64>)> {
    let rates: Vec<f64> = rounds.iter().map(|c| c.conns_per_s).collect();
    let med = |f: &dyn Fn(&ConnResult) -> f64| {
        Spread::of(&rounds.iter().map(f).collect::<Vec<_>>()).map_or(0.0, |s| s.median)
    };
    let conn = ConnResult {
        conns_per_s: Spread::of(&rates)?.median,
        latency: Latency {
            samples: rounds.iter().map(|c| c.latency.samples).sum(),
            p50_us: med(&|c| c.latency.p50_us),
            p99_us: med(&|c| c.latency.p99_us),
            max_us: rounds.iter().map(|c| c.latency.max_us).fold(0.0, f64::max),
        },
        requests: rounds.iter().map(|c| c.requests).sum(),
        errors: rounds.iter().map(|c| c.errors).sum(),
    };
    Some((conn, rates))
}

/// Every mode at every size: per size, each station's bed gets the Services (rules or an
/// agent), then the rounds go through every station's points in turn ([`round_order`]), then
/// the programs' real-traffic cost is read ([`crate::progstats`]), and at the largest size the
/// streams and the endpoint changes are measured. `progress` is told after each step.
pub fn run(plan: &DpPlan, mut progress: impl FnMut(&str)) -> anyhow::Result<DpResults> {
    let mut res = DpResults {
        rounds: plan.rounds,
        point_s: plan.point.as_secs_f64(),
        ..Default::default()
    };
    let mut lives = Vec::new();
    let t = std::time::Instant::now();
    for station in plan.stations() {
        match Live::new(station) {
            Ok(l) => lives.push(l),
            Err(e) => {
                crate::interrupt::check()?;
                let msg = format!("{}: bed: {e:#}", station.name());
                eprintln!("datapath benchmark failed for {msg}");
                res.errors.push(msg);
            }
        }
    }
    tracing::info!(secs = t.elapsed().as_secs_f64(), "beds up");
    let largest = plan.sizes.iter().copied().max().unwrap_or(1);
    for &n in plan.sizes {
        for live in lives.iter_mut() {
            let t = std::time::Instant::now();
            let installed = live.install(n, plan);
            tracing::info!(
                station = live.station.name(),
                n,
                secs = t.elapsed().as_secs_f64(),
                "installed"
            );
            if let Err(e) = installed {
                crate::interrupt::check()?;
                let msg = format!("{} at {n} Services: setup: {e:#}", live.station.name());
                eprintln!("datapath benchmark failed for {msg}");
                res.errors.push(msg);
                live.teardown();
            }
            progress(&format!("{} at {n} Services: set up", live.station.name()));
        }
        let t = std::time::Instant::now();
        measure_rounds(plan, n, &lives, &mut res, &mut progress)?;
        tracing::info!(n, secs = t.elapsed().as_secs_f64(), "rounds");
        let t = std::time::Instant::now();
        for live in lives.iter().filter(|l| l.station.counts_programs(plan)) {
            if live.ready {
                if let Err(e) = program_costs(live, plan, n, &mut res) {
                    crate::interrupt::check()?;
                    res.errors.push(format!(
                        "{} at {n} Services: program statistics: {e:#}",
                        live.station.name()
                    ));
                }
            }
            progress(&format!(
                "{} at {n} Services: program cost",
                live.station.name()
            ));
        }
        tracing::info!(n, secs = t.elapsed().as_secs_f64(), "program costs");
        let t = std::time::Instant::now();
        if n == largest {
            for live in lives.iter().filter(|l| l.ready) {
                let Some(mode) = live.station.stream_mode(plan) else {
                    continue;
                };
                let target = match live.station {
                    Station::Direct => SocketAddrV4::new(live.bed.backends[0].ip, SINK_PORT).into(),
                    _ => live.svc.map(|s| s.1).context("no Services installed")?,
                };
                if let Err(e) = stream_row(&live.bed, plan, mode, n, target, &mut res) {
                    crate::interrupt::check()?;
                    res.errors
                        .push(format!("{} stream at {n} Services: {e:#}", mode.label()));
                }
            }
            if plan.endpoint_changes > 0 {
                let xlb = lives
                    .iter()
                    .find(|l| l.ready && l.station == Station::Xlb(plan.first_xdp()));
                if let Some(live) = xlb {
                    let set = ServiceSet::generate(&live.bed.set_spec(n));
                    let probe_file = live.probe_file.as_ref().context("no probe file")?;
                    match endpoint_changes(&live.bed, &set, probe_file, plan.endpoint_changes) {
                        Ok(ch) => res.endpoint_change = Some(ch),
                        Err(e) => {
                            crate::interrupt::check()?;
                            res.errors.push(format!("endpoint changes: {e:#}"));
                        }
                    }
                }
                progress("endpoint changes");
            }
        }
        tracing::info!(
            n,
            secs = t.elapsed().as_secs_f64(),
            "streams and endpoint changes"
        );
        for live in lives.iter_mut() {
            let t = std::time::Instant::now();
            live.teardown();
            tracing::info!(
                station = live.station.name(),
                n,
                secs = t.elapsed().as_secs_f64(),
                "torn down"
            );
        }
        crate::interrupt::check()?;
    }
    let t = std::time::Instant::now();
    drop(lives);
    tracing::info!(secs = t.elapsed().as_secs_f64(), "beds down");
    Ok(res)
}

/// The interleaved rounds of size `n`: every ready station's points once per round, then one
/// row per label (and backend) from the rounds' results.
fn measure_rounds(
    plan: &DpPlan,
    n: usize,
    lives: &[Live],
    res: &mut DpResults,
    progress: &mut impl FnMut(&str),
) -> anyhow::Result<()> {
    let items: Vec<(usize, Point)> = lives
        .iter()
        .enumerate()
        .flat_map(|(i, l)| l.station.points(plan).into_iter().map(move |p| (i, p)))
        .collect();
    let mut samples: Vec<Vec<ConnResult>> = vec![Vec::new(); items.len()];
    for round in 0..plan.rounds {
        for k in round_order(items.len(), round, plan.rounds) {
            let (i, point) = items[k];
            let live = &lives[i];
            let label = live.station.label(point);
            let what = match point {
                Point::External(b) => format!("{label} NodePort, {} backend", b.label()),
                _ => label.to_string(),
            };
            if live.ready {
                match live.measure(point, plan) {
                    Ok(c) => samples[k].push(c),
                    Err(e) => {
                        crate::interrupt::check()?;
                        let msg = format!("{what} at {n} Services, round {}: {e:#}", round + 1);
                        eprintln!("datapath benchmark failed for {msg}");
                        res.errors.push(msg);
                    }
                }
            }
            crate::interrupt::check()?;
            progress(&format!("{what} at {n} Services, round {}", round + 1));
        }
    }
    for (k, (i, point)) in items.iter().enumerate() {
        let live = &lives[*i];
        let Some((conn, round_rates)) = combine(&samples[k]) else {
            continue;
        };
        let mode = live.station.label(*point).to_string();
        match point {
            Point::External(b) => res.external.push(ExtRow {
                mode,
                backend: b.label().into(),
                services: n,
                conn,
                round_rates,
            }),
            Point::Pod | Point::Host => res.rows.push(DpRow {
                mode,
                services: n,
                conn,
                round_rates,
                setup_s: live.setup_s,
                agent_rss_mib: live.agent.as_ref().and_then(|a| a.rss_mib()),
            }),
        }
    }
    Ok(())
}

/// Times each program-cost point is counted ([`program_costs`]): the median is reported.
const COST_REPEATS: usize = 3;

/// [`COST_REPEATS`] more points of each of the station's kinds of traffic with the kernel's run
/// statistics on, outside the rounds (counting slows every program run a little): what each of
/// its programs cost per run on that traffic, the median over the repeats
/// ([`progstats::median_of_repeats`]).
fn program_costs(live: &Live, plan: &DpPlan, n: usize, res: &mut DpResults) -> anyhow::Result<()> {
    let on = StatsOn::enable()?;
    res.stats_method = Some(on.method.to_string());
    let pin = live.bed.pin_path();
    // The agent's programs, behind its pinned links; the no-op station's own program.
    let snapshot = || match &live.noop {
        Some(noop) => Ok(progstats::snapshot_of(&noop.programs())),
        None => progstats::snapshot(&pin),
    };
    let mut before = snapshot()?;
    let mut repeats = Vec::new();
    for _ in 0..COST_REPEATS {
        let mut costs = Vec::new();
        for point in live.station.points(plan) {
            let conn = live.measure(point, plan)?;
            let after = snapshot()?;
            // The first request (greeting check) and the warm-up ran the programs too.
            let connections = 1 + WARM_UP + conn.requests + conn.errors;
            for c in progstats::delta(&before, &after) {
                costs.push(ProgCost {
                    services: n,
                    mode: live.station.label(point).to_string(),
                    traffic: match live.station {
                        Station::DirectNoop => NOOP_TRAFFIC.to_string(),
                        _ => point.traffic(),
                    },
                    program: c.name,
                    runs: c.run_cnt,
                    run_time_ns: c.run_time_ns,
                    connections,
                    conns_per_s: conn.conns_per_s,
                    ..ProgCost::default()
                });
            }
            before = after;
        }
        repeats.push(costs);
    }
    drop(on);
    res.prog_costs.extend(progstats::median_of_repeats(repeats));
    Ok(())
}

/// Run `measure` with this process inside the socket-LB cgroup `cg` (its client sockets are
/// created there), and check that the agent's socket programs translated every connection it
/// made (`sock_translated`), so the row is the socket path and not the tc path.
fn through_sockets(
    bed: &Bed,
    cg: &BenchCgroup,
    measure: impl FnOnce() -> anyhow::Result<ConnResult>,
) -> anyhow::Result<ConnResult> {
    let before = sock_translated(bed)?;
    let conn = {
        let _inside = cg.enter()?;
        measure()?
    };
    let translated = sock_translated(bed)? - before;
    if translated < conn.requests as u64 {
        bail!(
            "sock_translated rose by {translated} over {} connections: the sockets were not \
             translated at connect time",
            conn.requests
        );
    }
    Ok(conn)
}

/// The datapath's `sock_translated` counter of node1's agent.
fn sock_translated(bed: &Bed) -> anyhow::Result<u64> {
    let maps = lb_userspace::datapath::PinnedMaps::open(&bed.pin_path())
        .context("opening the agent's maps")?;
    Ok(maps
        .stats()?
        .into_iter()
        .find(|(s, _)| *s == lb_common::Stat::SockTranslated)
        .map_or(0, |(_, v)| v))
}

/// Connection rate from the external client to `target`, which must first answer with the name
/// of one of the pods behind `backend`'s NodePort Service.
fn measure_external(
    bed: &Bed,
    plan: &DpPlan,
    backend: Backend,
    target: SocketAddr,
) -> anyhow::Result<ConnResult> {
    let names: Vec<&str> = bed
        .external_pods(backend)
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    let greeting = bed
        .external()
        .run(|| request(target))?
        .with_context(|| format!("first request from the external client to {target}"))?;
    if !names.contains(&greeting.as_str()) {
        bail!("{target} answered {greeting:?}, not one of {names:?}");
    }
    conn_rate(bed.external(), target, plan.point, plan.max_requests)
        .with_context(|| format!("{} backend via {target}", backend.label()))
}

/// Samples of one long TCP stream per mode. One sample decides nothing here: the same build
/// measured 0.55x and 1.14x of direct in two runs an hour apart (the 2-core VM places sender,
/// receiver and softirq differently from run to run), so the row is the median of a few.
const STREAM_SAMPLES: usize = 3;

/// One long TCP stream from the client to `target` ([`STREAM_SAMPLES`] times, each
/// `plan.stream` long), recorded for `mode` at `n` Services as the median and range.
fn stream_row(
    bed: &Bed,
    plan: &DpPlan,
    mode: Mode,
    n: usize,
    target: SocketAddr,
    res: &mut DpResults,
) -> anyhow::Result<()> {
    let mut samples = Vec::with_capacity(STREAM_SAMPLES);
    for _ in 0..STREAM_SAMPLES {
        samples.push(stream(&bed.client.ns, target, plan.stream)?);
    }
    let gbit = crate::stats::median(&samples).unwrap_or(0.0);
    let lo = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = samples.iter().copied().fold(0.0, f64::max);
    res.streams.push(StreamRow {
        mode: mode.label().into(),
        services: n,
        gbit_s: gbit,
        range: Some((lo, hi)),
    });
    Ok(())
}

/// Connections closed with RST leave conntrack entries in CLOSE (10 s by default): shorten that
/// in the node namespace so thousands of short connections per second do not fill the table.
/// The sysctls exist once conntrack is active in the namespace, i.e. after the rules are in.
fn conntrack_friendly(bed: &Bed) {
    for (key, value) in [
        ("net.netfilter.nf_conntrack_tcp_timeout_close", "1"),
        ("net.netfilter.nf_conntrack_tcp_timeout_time_wait", "1"),
    ] {
        if let Err(e) = bed.node().sysctl(key, value) {
            tracing::debug!(key, error = %e, "conntrack sysctl");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The socket-LB rows end to end at one Service: the client pod through `--socket-lb all`
    /// and a host-network client through `--socket-lb host`, every connection translated at
    /// connect time (checked by [`through_sockets`]); the cgroup is gone afterwards and the
    /// process back where it was.
    #[test]
    #[ignore = "needs root"]
    fn socket_lb_rows_translate_every_connection_and_leave_no_cgroup() {
        let _serial = crate::root_test();
        let bed = Bed::new().unwrap();
        let set = ServiceSet::generate(&bed.set_spec(1));
        let dir = bed.scratch().join("manifests");
        xlb_dir::write_all(&set, &dir).unwrap();
        let probe = set.probe();
        let svc: SocketAddr = SocketAddrV4::new(probe.cluster_ip, SERVICE_PORT).into();
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let path;
        {
            let cg = BenchCgroup::create(&crate::bed::unique_prefix()).unwrap();
            path = cg.path().to_path_buf();
            for (lb, client) in [
                (SocketLb::All(path.clone()), &bed.client.ns),
                (SocketLb::Host(path.clone()), bed.node()),
            ] {
                let agent = bed
                    .start_agent_socklb(&dir, Duration::from_secs(30), "native", lb.clone())
                    .unwrap();
                let r = through_sockets(&bed, &cg, || {
                    conn_rate(client, svc, Duration::from_millis(300), 2_000)
                })
                .unwrap();
                eprintln!("{lb:?}: {:.0} conn/s, {} errors", r.conns_per_s, r.errors);
                assert!(r.requests > 50 && r.errors == 0, "{r:?}");
                drop(agent);
            }
            // Outside the cgroup the socket programs see nothing: the tc path (off) would
            // translate the pod's connections, so the check refuses them.
            let agent = bed
                .start_agent_socklb(&dir, Duration::from_secs(30), "native", SocketLb::Off)
                .unwrap();
            let err = through_sockets(&bed, &cg, || {
                conn_rate(&bed.client.ns, svc, Duration::from_millis(100), 200)
            })
            .unwrap_err();
            assert!(format!("{err:#}").contains("not translated"), "{err:#}");
            drop(agent);
        }
        assert!(!path.exists(), "{} left behind", path.display());
        assert_eq!(std::fs::read_to_string("/proc/self/cgroup").unwrap(), own);
    }

    /// The external bed end to end with xlb, from_net in native XDP and in tc: both NodePort
    /// Services answer the external client (remote flows SNATed by node1), and a burst of
    /// connections costs no datapath drop. Prints the datapath counters (cumulative per agent).
    #[test]
    #[ignore = "needs root"]
    fn external_bed_with_xlb_serves_both_nodeports_without_drops() {
        let _serial = crate::root_test();
        let plan = DpPlan {
            sizes: &[1],
            point: Duration::from_millis(500),
            // Few enough that the SNAT ports of a backend stay mostly free (a run of taken
            // ports longer than the datapath's tries is dropped as drop_snat_ports_exhausted).
            rounds: 1,
            max_requests: 2_000,
            stream: Duration::ZERO,
            endpoint_changes: 0,
            xdp_modes: &[XdpMode::Native],
        };
        let bed = Bed::new().unwrap();
        let set = ServiceSet::generate(&bed.set_spec(1));
        let dir = bed.scratch().join("manifests");
        xlb_dir::write_all(&set, &dir).unwrap();
        for xdp in [XdpMode::Native, XdpMode::Off] {
            let agent = bed
                .start_agent(&dir, Duration::from_secs(30), xdp.arg())
                .unwrap();
            for backend in Backend::ALL {
                let r = measure_external(&bed, &plan, backend, bed.nodeport(backend)).unwrap();
                let maps = lb_userspace::datapath::PinnedMaps::open(&bed.pin_path()).unwrap();
                let stats: Vec<String> = maps
                    .stats()
                    .unwrap()
                    .into_iter()
                    .filter(|(_, v)| *v > 0)
                    .map(|(s, v)| format!("{s:?}={v}"))
                    .collect();
                eprintln!(
                    "{} {}: {:.0} conn/s, {} errors, p50 {:.0} µs, p99 {:.0} µs; {}",
                    xdp.label(),
                    backend.label(),
                    r.conns_per_s,
                    r.errors,
                    r.latency.p50_us,
                    r.latency.p99_us,
                    stats.join(" ")
                );
                assert!(r.requests > 100, "{r:?}");
                assert!(
                    !stats.iter().any(|s| s.starts_with("Drop")),
                    "drops: {stats:?}"
                );
            }
            drop(agent);
        }
    }

    #[test]
    fn every_round_runs_every_point_once_in_another_order() {
        let rounds = 5;
        let orders: Vec<Vec<usize>> = (0..rounds).map(|r| round_order(20, r, rounds)).collect();
        for o in &orders {
            let mut sorted = o.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..20).collect::<Vec<_>>());
        }
        // No point is first in two rounds, and the rounds differ.
        let firsts: std::collections::BTreeSet<usize> = orders.iter().map(|o| o[0]).collect();
        assert_eq!(firsts.len(), rounds);
        assert_eq!(round_order(0, 1, 3), Vec::<usize>::new());
        assert_eq!(round_order(3, 0, 0), vec![0, 1, 2]);
    }

    #[test]
    fn rounds_combine_into_medians() {
        let c = |rate: f64, p50: f64, p99: f64, max: f64, errors| ConnResult {
            conns_per_s: rate,
            latency: Latency {
                samples: 10,
                p50_us: p50,
                p99_us: p99,
                max_us: max,
            },
            requests: 10,
            errors,
        };
        let (row, rates) = combine(&[
            c(900.0, 80.0, 150.0, 400.0, 0),
            c(1200.0, 70.0, 140.0, 300.0, 1),
            c(1000.0, 75.0, 900.0, 2000.0, 0),
        ])
        .unwrap();
        assert_eq!(rates, vec![900.0, 1200.0, 1000.0]);
        assert_eq!(row.conns_per_s, 1000.0);
        assert_eq!(
            (row.latency.p50_us, row.latency.p99_us, row.latency.max_us),
            (75.0, 150.0, 2000.0)
        );
        assert_eq!((row.requests, row.errors, row.latency.samples), (30, 1, 30));
        assert!(combine(&[]).is_none());
    }

    /// The beds and points of the quick and the full plan: every ClusterIP label and every
    /// external label measured exactly once per round.
    #[test]
    fn the_plans_measure_every_row_once_per_round() {
        for xdp_modes in [&[XdpMode::Off, XdpMode::Native][..], &XdpMode::ALL[..]] {
            let plan = DpPlan {
                sizes: &[1, 10],
                point: Duration::from_secs(1),
                rounds: 3,
                max_requests: 10,
                stream: Duration::ZERO,
                endpoint_changes: 1,
                xdp_modes,
            };
            let mut cluster = Vec::new();
            let mut external = Vec::new();
            for s in plan.stations() {
                for p in s.points(&plan) {
                    match p {
                        Point::External(b) => external.push((s.label(p), b.label())),
                        _ => cluster.push(s.label(p)),
                    }
                }
            }
            let mut want = row_labels();
            want.sort_unstable();
            cluster.sort_unstable();
            assert_eq!(cluster, want);
            let mut want_ext: Vec<(&str, &str)> = external_labels()
                .into_iter()
                .filter(|l| !l.starts_with("xlb-") || xdp_modes.iter().any(|m| m.label() == *l))
                .flat_map(|l| Backend::ALL.map(|b| (l, b.label())))
                .collect();
            want_ext.sort_unstable();
            external.sort_unstable();
            assert_eq!(external, want_ext);
            assert_eq!(plan.points_per_round(), cluster.len() + external.len());
            let stats = plan
                .stations()
                .iter()
                .filter(|s| s.counts_programs(&plan))
                .count();
            assert_eq!(stats, 3);
        }
    }
}
