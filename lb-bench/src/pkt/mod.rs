//! Per-packet cost of xlb's programs through BPF_PROG_TEST_RUN, at growing numbers of Services,
//! next to a no-op program measured the same way in the same run.
//!
//! Method: the kernel re-runs the *same* buffer when `repeat > 1`, and xlb rewrites that buffer
//! (DNAT), so every run after the first would measure a packet to the backend, not to the
//! Service. So each sample is one run (`repeat = 1`) of a fresh frame; a round is the mean of many
//! samples and the reported figure is the median of several rounds. The kernel's per-run timer
//! overhead is in every figure, the no-op's included, so ratios to the floor stay meaningful.
//!
//! Before each size the conntrack map is filled to its capacity with live flows of other
//! clients (`Loaded::fill_conntrack`): every size is measured on the same table, full as on a
//! busy node (each insert evicts), so the sizes differ only in their Services. Filled once and
//! left to fill up, the first sizes' SYNs inserted into an emptier table than the last's, and
//! the scaling target measured conntrack fill (1.34x) instead of the number of Services.
//!
//! The external path (issue 10): `from_net_xdp` (XDP) and `from_net` (tc ingress) on packets from
//! a client outside the node to a NodePort on the node's address, next to the XDP and tc no-ops,
//! at the same numbers of Services (the two NodePort frontends are programmed beside the ClusterIP
//! ones, by the same planner and executor). A local backend is DNAT and pass to the stack; a
//! remote backend is DNAT + SNAT to the node's address, a FIB lookup and a redirect; its answer
//! (to the node's SNAT port) is restored and redirected the same way.
//!
//! FIB lookups in a test run: the kernel runs the program in the caller's network namespace, as
//! if the packet came in on loopback (ifindex 1; XDP's `ingress_ifindex` and tc's `ifindex`
//! default to it, and an XDP test run can only name another device whose driver registered an
//! XDP receive queue). `bpf_fib_lookup` then needs forwarding on and a route with a resolved
//! neighbour, or the program drops the packet as unroutable (`drop_no_route`: forwarding off
//! gives `BPF_FIB_LKUP_RET_FWD_DISABLED`) or, in XDP, hands it to tc (no neighbour). So the whole
//! measurement runs in a network namespace of its own: forwarding on, an uplink `ext0` (a veth)
//! holding the node's address, a default route through a gateway with a permanent neighbour
//! entry, and the DEVICES entry the agent would write for `ext0` (XDP may transmit). The lookup
//! then succeeds with `ext0` as the next hop, a device other than the one the packet came in
//! by, so XDP answers `XDP_REDIRECT` (not `XDP_TX`) and tc `TC_ACT_REDIRECT`; test runs do not
//! carry out the redirect.

pub mod frame;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context as _};
use aya::maps::{HashMap, IterableMap as _, MapData};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use aya::Ebpf;
use lb_common::{
    ip4, map_names, port, prog_names, CtKey, CtValue, DeviceValue, CT_FORWARD, DEV_F_XDP_TX,
    PROTO_TCP, SCOPE_EXT, SVC_FLAG_CLUSTER_IP, SVC_FLAG_NODE_PORT,
};
use lb_model::planner::plan;
use lb_model::{Applied, BackendAddr, DesiredState, Frontend, FrontendState, Proto, SvcKey};
use lb_testkit::NetNs;
use lb_userspace::datapath::{load_programs, LoadOptions, MapSizes, ObjectMaps};
use serde::{Deserialize, Serialize};

use crate::rules::{cluster_ip, SERVICE_PORT};
use crate::stats::{mean, median};

/// Endpoints of most Services; every tenth has [`WIDE`] (the "10 for part of them").
const NARROW: usize = 3;
const WIDE: usize = 10;
const TARGET_PORT: u16 = 8080;
/// The client of every measured flow (a pod address).
const CLIENT: [u8; 4] = [10, 244, 1, 2];
/// A pod address that is no frontend.
const NON_SERVICE: [u8; 4] = [10, 244, 1, 99];
/// The Service CIDR the object is loaded with: every `rules::cluster_ip` is in it.
const SERVICE_CIDR: (std::net::Ipv4Addr, u8) = (std::net::Ipv4Addr::new(10, 96, 0, 0), 12);

/// The node's address on its uplink `ext0` in the measurement namespace (the NodePort address).
const NODE_ADDR: [u8; 4] = [192, 168, 77, 1];
/// The uplink's gateway, with a permanent neighbour entry.
const GATEWAY: &str = "192.168.77.2";
const GATEWAY_MAC: &str = "02:00:00:00:77:02";
const UPLINK: &str = "ext0";
/// A client outside the cluster.
const EXT_CLIENT: [u8; 4] = [198, 51, 100, 7];
/// nodePorts of the Service with backends on this node and of the one with backends elsewhere.
const NP_LOCAL: u16 = 30080;
const NP_REMOTE: u16 = 30081;
/// A node port no Service uses.
const NP_NONE: u16 = 30099;

/// Verdicts.
const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

/// Probe programs of the eBPF object that measure the floors under the packet kinds
/// (`lb-ebpf/src/floor.rs`): each parses the frame as the real programs do, then does one
/// primitive (nothing; one conntrack lookup; the two conntrack inserts of a new flow; the
/// DNAT rewrite). Measured when present, at the largest size, on fresh tuples.
pub const FLOOR_PROBES: [&str; 5] = [
    "floor_parse",
    "floor_ct_lookup",
    "floor_ct_pair",
    "floor_nat",
    "floor_ct_hit",
];

/// The probe that runs on the established row's tracked tuple (a conntrack hit) instead of
/// fresh tuples.
const HIT_PROBE: &str = "floor_ct_hit";

/// The floors of the packet kinds from the probes' figures (ns, test-run overhead included):
/// each kind's floor is one probe whose work is a strict part of that kind's work on the same
/// kind of tuple, so the kind cannot cost less: a new flow not less than its parse and the two
/// conntrack inserts (fresh tuples, as the SYN rows); an established packet not less than its
/// parse, the conntrack lookup that finds its flow and the DNAT rewrite (`floor_ct_hit`, on the
/// established row's own tuple; `floor_nat`, without the lookup, when an older object lacks it);
/// a non-Service packet not less than the parse. Probes are not
/// added up: a lookup of a fresh tuple (`floor_ct_lookup`) meets cache-cold buckets that the
/// established row's one repeated tuple never does, so sums would overshoot the rows.
pub fn floors_of(probes: &[(String, f64)]) -> Vec<PktFloor> {
    let get = |n: &str| probes.iter().find(|(p, _)| p == n).map(|(_, ns)| *ns);
    [
        (
            "syn",
            "floor_ct_pair",
            "parse and the two conntrack inserts of a new flow",
        ),
        (
            "established",
            HIT_PROBE,
            "parse, the conntrack hit and the DNAT rewrite",
        ),
        ("established", "floor_nat", "parse and the DNAT rewrite"),
        ("non_service", "floor_parse", "the parse alone"),
    ]
    .into_iter()
    .filter(|(kind, probe, _)| {
        // One floor per kind: the first listed probe that was measured.
        *kind != "established" || *probe == HIT_PROBE || get(HIT_PROBE).is_none()
    })
    .filter_map(|(kind, probe, what)| {
        let mut what = format!("{what}, probe {probe}");
        if kind == "syn" {
            // What any flow table of this size costs a SYN, one entry per flow or two: the
            // lookup that finds the tuple new.
            if let Some(lookup) = get("floor_ct_lookup") {
                what.push_str(&format!(
                    "; the lookup that finds a tuple new costs {lookup:.0} ns alone, probe floor_ct_lookup"
                ));
            }
        }
        Some(PktFloor {
            kind: kind.into(),
            what,
            ns: get(probe)?,
        })
    })
    .collect()
}

/// How many samples to take.
#[derive(Clone, Copy, Debug)]
pub struct PktPlan {
    pub rounds: usize,
    pub samples_per_round: usize,
}

/// Median ns per packet of each kind at one number of Services.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PktRow {
    pub services: usize,
    pub established_ns: f64,
    pub new_flow_ns: f64,
    /// A SYN on the tuple of a closed flow of the same client port (a busy client re-using
    /// its ports: the closed flow lives on for `tcp_close` seconds), which the new flow takes
    /// over. 0 in results of older runs.
    #[serde(default)]
    pub syn_reuse_ns: f64,
    pub reply_ns: f64,
    pub non_service_ns: f64,
}

/// Median ns per packet of the external path through one hook at one number of Services.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ExtPktRow {
    pub services: usize,
    /// "xdp" (`from_net_xdp`) or "tc" (`from_net`, tc ingress).
    pub hook: String,
    /// NodePort, backend on this node: DNAT, pass to the stack.
    pub established_local_ns: f64,
    pub new_flow_local_ns: f64,
    /// A SYN to the local NodePort on the tuple of a closed flow of the same client port (an
    /// outside client re-using its ports within the close timeout), which the new flow takes
    /// over. 0 in results of older runs.
    #[serde(default)]
    pub syn_reuse_local_ns: f64,
    /// NodePort, backend on another node: DNAT + SNAT, FIB lookup, redirect.
    pub established_remote_ns: f64,
    pub new_flow_remote_ns: f64,
    /// The remote backend's answer to the node's SNAT port: restored, FIB lookup, redirect.
    pub reply_remote_ns: f64,
    /// To a node port no Service uses: passed.
    pub non_service_ns: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PktResults {
    pub method: String,
    /// The floor, measured like the rows.
    pub noop_ns: f64,
    /// Where the floor program came from (for the report).
    pub noop_source: String,
    pub rows: Vec<PktRow>,
    /// The XDP floor (`noop_xdp`), measured like the rows (absent in older results).
    #[serde(default)]
    pub noop_xdp_ns: Option<f64>,
    /// The external path, per hook and number of Services (absent in older results).
    #[serde(default)]
    pub external: Vec<ExtPktRow>,
    /// Why the external path was not (fully) measured.
    #[serde(default)]
    pub external_error: Option<String>,
    /// Floors of packet kinds measured with probe programs (what a kind cannot go below on
    /// this kernel), shown next to the targets.
    #[serde(default)]
    pub floors: Vec<PktFloor>,
    /// The probe programs' own figures (ns per run), measured like the rows at the largest size.
    #[serde(default)]
    pub probes: Vec<(String, f64)>,
}

/// The least a packet kind can cost here: a probe program doing only the unavoidable part.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PktFloor {
    /// "established", "syn" or "non_service".
    pub kind: String,
    /// What the probe does.
    pub what: String,
    /// Median ns per run, measured like the rows (no-op overhead included).
    pub ns: f64,
}

/// The object loaded unpinned with maps big enough for the largest size, programmed as the
/// agent programs it (planner and executor of `lb_model`).
struct Loaded {
    ebpf: Ebpf,
    /// Taken out of the object (the loaded programs keep using them): the datapath's
    /// conntrack, to remove the flows new-flow samples create, and the agent's DEVICES.
    conntrack: HashMap<MapData, CtKey, CtValue>,
    devices: HashMap<MapData, u32, DeviceValue>,
    /// What the maps hold.
    applied: Applied,
    /// The Services filled so far.
    desired: DesiredState,
    filled: usize,
    next_backend: u32,
}

fn endpoints_of(i: usize) -> usize {
    if i % 10 == 9 {
        WIDE
    } else {
        NARROW
    }
}

impl Loaded {
    fn load(max_services: usize) -> anyhow::Result<Self> {
        let eps: usize = (0..max_services).map(endpoints_of).sum();
        let opts = LoadOptions {
            sizes: MapSizes {
                services: (max_services + eps + 1024) as u32,
                backends: (eps + 1024) as u32,
                conntrack: 1 << 20,
                members: (eps + 1024) as u32,
                ..MapSizes::default()
            },
            // As a cluster configures it (`--service-cidr`): ClusterIPs need no pre-filter bit,
            // so the non-Service row sees the filter as a node does.
            service_cidr: Some(SERVICE_CIDR),
            ..LoadOptions::default()
        };
        let mut ebpf = opts.load_object(None).context("loading the eBPF object")?;
        load_programs(
            &mut ebpf,
            &[
                prog_names::FROM_POD,
                prog_names::TO_POD,
                prog_names::NOOP_TC,
                prog_names::FROM_NET_XDP,
                prog_names::FROM_NET,
                prog_names::NOOP_XDP,
            ],
        )
        .map_err(|e| anyhow!("{e}"))?;
        // The floor probes, where the object has them (never attached by the agent).
        for name in FLOOR_PROBES {
            if ebpf.program(name).is_some() {
                if let Err(e) = load_programs(&mut ebpf, &[name]) {
                    tracing::warn!(program = name, error = %e, "floor probe not loaded");
                }
            }
        }
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("no map {name} in the object"))
        };
        let conntrack = HashMap::try_from(take(&mut ebpf, map_names::CONNTRACK)?)?;
        let devices = HashMap::try_from(take(&mut ebpf, map_names::DEVICES)?)?;
        Ok(Loaded {
            ebpf,
            conntrack,
            devices,
            applied: {
                let mut applied = Applied::default();
                applied.filter.service_cidr = Some(SERVICE_CIDR);
                applied
            },
            desired: DesiredState::default(),
            filled: 0,
            next_backend: 1,
        })
    }

    /// Add Services until there are `n`: one plan for the new ones, executed as the agent
    /// executes its plans.
    fn fill_to(&mut self, n: usize) -> anyhow::Result<()> {
        let mut touched = BTreeSet::new();
        for i in self.filled..n {
            let fe = Frontend {
                addr: cluster_ip(i),
                port: SERVICE_PORT,
                proto: Proto::Tcp,
                scope: SCOPE_EXT,
            };
            let backends = (0..endpoints_of(i))
                .map(|_| {
                    let k = self.next_backend;
                    self.next_backend += 1;
                    BackendAddr {
                        addr: Ipv4Addr::from(u32::from_be_bytes([10, 128, 0, 0]) + k),
                        port: TARGET_PORT,
                        proto: Proto::Tcp,
                    }
                })
                .collect();
            let st = FrontendState {
                service: SvcKey {
                    namespace: "bench".into(),
                    name: format!("svc-{i}"),
                },
                port_name: "http".into(),
                backends,
                flags: SVC_FLAG_CLUSTER_IP,
                affinity_timeout: 0,
                ..Default::default()
            };
            self.desired.set_frontend(fe, st);
            touched.insert(fe);
        }
        self.execute(&touched)
            .with_context(|| format!("programming {n} Services"))?;
        self.filled = self.filled.max(n);
        Ok(())
    }

    /// Fill the conntrack map to its capacity with live flows of other clients, so every size
    /// is measured on the same table: full, as on a busy node, where each insert evicts.
    /// Without it the rows of the first sizes insert into a table that is still filling and
    /// look cheaper, and the scaling target would measure conntrack fill, not Services.
    fn fill_conntrack(&mut self) -> anyhow::Result<()> {
        let capacity = self.conntrack.map().info()?.max_entries();
        let live = lb_userspace::ct_gc::now_coarse_ns() + 3_600 * 1_000_000_000;
        let (keys, values): (Vec<CtKey>, Vec<CtValue>) = (0..capacity / 2)
            .flat_map(|i| crate::sweep::flow(i, live, lb_common::ct_state::TCP_ESTABLISHED))
            .unzip();
        lb_userspace::bpf_batch::hash_update(self.conntrack.map(), &keys, &values)
            .map_err(|(n, e)| anyhow!("wrote {n} of {} entries: {e}", keys.len()))
    }

    /// Plan the `touched` frontends and run the plan, as the agent does.
    fn execute(&mut self, touched: &BTreeSet<Frontend>) -> anyhow::Result<()> {
        let p = plan(&self.applied, &self.desired, touched);
        let mut maps = ObjectMaps::of(&mut self.ebpf).map_err(|e| anyhow!("{e}"))?;
        let report = lb_model::store::execute(&mut maps.store(), &p, &mut self.applied);
        ensure!(
            report.is_clean(),
            "{} frontends failed, first: {:?}",
            report.failed.len(),
            report.failed.first()
        );
        Ok(())
    }

    /// The two NodePort frontends on the node's address as the model produces them for
    /// externalTrafficPolicy Cluster (`SVC_FLAG_NODE_PORT`; the endpoints on this node marked
    /// local), and the DEVICES entries the agent writes for the uplink `ext0` (`ifindex`) and,
    /// as test runs come in on it, loopback.
    fn add_external(&mut self, uplink_ifindex: u32) -> anyhow::Result<()> {
        let mut touched = BTreeSet::new();
        for (name, node_port, node, local) in [
            ("nodeport-local", NP_LOCAL, 1, true),
            ("nodeport-remote", NP_REMOTE, 2, false),
        ] {
            let fe = Frontend {
                addr: Ipv4Addr::from(NODE_ADDR),
                port: node_port,
                proto: Proto::Tcp,
                scope: SCOPE_EXT,
            };
            let backends: Vec<BackendAddr> = (0..NARROW as u8)
                .map(|k| BackendAddr {
                    addr: Ipv4Addr::new(10, 244, node, 10 + k),
                    port: TARGET_PORT,
                    proto: Proto::Tcp,
                })
                .collect();
            let st = FrontendState {
                service: SvcKey {
                    namespace: "bench".into(),
                    name: name.into(),
                },
                port_name: "http".into(),
                local: if local {
                    backends.iter().copied().collect()
                } else {
                    BTreeSet::new()
                },
                backends,
                flags: SVC_FLAG_NODE_PORT,
                affinity_timeout: 0,
                ..Default::default()
            };
            self.desired.set_frontend(fe, st);
            touched.insert(fe);
        }
        self.execute(&touched)
            .context("programming the NodePort frontends")?;
        let dev = DeviceValue {
            addr: ip4(NODE_ADDR),
            flags: DEV_F_XDP_TX,
        };
        for ifindex in [1, uplink_ifindex] {
            self.devices.insert(ifindex, dev, 0)?;
        }
        Ok(())
    }

    fn prog(&self, name: &str) -> anyhow::Result<Prog<'_>> {
        prog_of(&self.ebpf, name)
    }
}

fn prog_of<'a>(ebpf: &'a Ebpf, name: &str) -> anyhow::Result<Prog<'a>> {
    let p = ebpf
        .program(name)
        .with_context(|| format!("program {name}"))?;
    Ok(match p {
        aya::programs::Program::Xdp(x) => Prog::Xdp(x),
        other => Prog::Tc(other.try_into()?),
    })
}

/// Remove both conntrack entries of the TCP flow `src:sport -> dst:dport` (if any).
fn forget_flow(
    conntrack: &mut HashMap<MapData, CtKey, CtValue>,
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
) {
    let key = CtKey {
        saddr: ip4(src),
        daddr: ip4(dst),
        sport: port(sport),
        dport: port(dport),
        proto: PROTO_TCP,
        dir: CT_FORWARD,
        _pad: 0,
    };
    if let Ok(v) = conntrack.get(&key, 0) {
        let _ = conntrack.remove(&key.pair(&v));
        let _ = conntrack.remove(&key);
    }
}

/// A loaded program of either kind.
#[derive(Clone, Copy)]
enum Prog<'a> {
    Tc(&'a SchedClassifier),
    Xdp(&'a Xdp),
}

/// One program run: kernel-measured duration, verdict, output frame.
struct Run {
    duration: Duration,
    verdict: u32,
    frame: Vec<u8>,
}

impl Prog<'_> {
    fn run(self, frame: &[u8]) -> anyhow::Result<Run> {
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let r = match self {
            Prog::Tc(p) => p.test_run(opts)?,
            Prog::Xdp(p) => p.test_run(opts)?,
        };
        out.truncate(r.data_size_out as usize);
        Ok(Run {
            duration: r.duration,
            verdict: r.return_value,
            frame: out,
        })
    }
}

/// One run of `prog` on `frame`: kernel-measured duration and output frame.
fn run_once(prog: Prog<'_>, frame: &[u8]) -> anyhow::Result<(Duration, Vec<u8>)> {
    let r = prog.run(frame)?;
    Ok((r.duration, r.frame))
}

/// Median over rounds of the mean over samples of `sample(k)` (ns).
fn measure(
    plan: PktPlan,
    mut sample: impl FnMut(usize) -> anyhow::Result<Duration>,
) -> anyhow::Result<f64> {
    let mut k = 0;
    let mut rounds = Vec::with_capacity(plan.rounds);
    // One untimed warm-up round brings code and map buckets into cache for every kind alike.
    for r in 0..=plan.rounds {
        let mut ns = Vec::with_capacity(plan.samples_per_round);
        for _ in 0..plan.samples_per_round {
            ns.push(sample(k)?.as_nanos() as f64);
            k += 1;
        }
        if r > 0 {
            rounds.push(mean(&ns).unwrap_or(0.0));
        }
        crate::interrupt::check()?;
    }
    median(&rounds).ok_or_else(|| anyhow!("no samples"))
}

/// Source address and port of new flow number `k` (distinct for a million flows).
fn new_flow_src(k: usize, salt: usize) -> ([u8; 4], u16) {
    let n = k + salt * 1_000_000;
    let port = 1024 + (n % 60_000) as u16;
    let host = (n / 60_000) as u32;
    (
        u32::to_be_bytes(u32::from_be_bytes([10, 245, 0, 0]) + host),
        port,
    )
}

/// Measure every packet kind at each size in `sizes` (ascending), and the floors, in a network
/// namespace of its own (see the module docs for why).
pub fn run(
    sizes: &[usize],
    plan: PktPlan,
    progress: impl FnMut(&str) + Send,
) -> anyhow::Result<PktResults> {
    let ns = NetNs::create(&format!("{}pkt", crate::bed::unique_prefix()))?;
    let uplink = uplink(&ns).context("setting up the measurement namespace")?;
    ns.run(|| run_in_namespace(sizes, plan, uplink, progress))?
}

/// Forwarding on, the uplink `ext0` (a veth) with the node's address, a default route through a gateway
/// whose neighbour entry is permanent. Returns the uplink's ifindex.
fn uplink(ns: &NetNs) -> anyhow::Result<u32> {
    ns.sysctl("net.ipv4.ip_forward", "1")?;
    let node = Ipv4Addr::from(NODE_ADDR);
    // A veth pair (this kernel may lack the dummy driver); the peer only gives it a carrier.
    let peer = format!("{UPLINK}p");
    ns.ip(&["link", "add", UPLINK, "type", "veth", "peer", "name", &peer])?;
    ns.ip(&["addr", "add", &format!("{node}/24"), "dev", UPLINK])?;
    ns.ip(&["link", "set", &peer, "up"])?;
    ns.ip(&["link", "set", UPLINK, "up"])?;
    ns.ip(&[
        "neigh",
        "add",
        GATEWAY,
        "lladdr",
        GATEWAY_MAC,
        "dev",
        UPLINK,
        "nud",
        "permanent",
    ])?;
    ns.ip(&["route", "add", "default", "via", GATEWAY, "dev", UPLINK])?;
    // "N: ext0: <...> ..."
    let line = ns.ip(&["-o", "link", "show", UPLINK])?;
    line.split(':')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("no ifindex in {line:?}"))
}

fn run_in_namespace(
    sizes: &[usize],
    plan: PktPlan,
    uplink: u32,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<PktResults> {
    let max = sizes.iter().copied().max().unwrap_or(1);
    let mut l = Loaded::load(max)?;
    let mut res = PktResults {
        method: format!(
            "BPF_PROG_TEST_RUN, repeat=1 per sample (xlb rewrites the buffer, so a kernel repeat would re-run a \
             translated packet); mean of {} samples per round, median of {} rounds",
            plan.samples_per_round, plan.rounds
        ),
        ..Default::default()
    };
    if let Err(e) = l.add_external(uplink) {
        res.external_error = Some(format!("{e:#}"));
    }
    let ack_probe = |probe: [u8; 4]| frame::tcp(CLIENT, 33333, probe, SERVICE_PORT, frame::ACK);

    // The floors, on the same frame as the established flow of their hook.
    let floor_frame = ack_probe(cluster_ip(0).octets());
    let p = l.prog(prog_names::NOOP_TC)?;
    res.noop_ns = measure(plan, |_| Ok(run_once(p, &floor_frame)?.0))?;
    res.noop_source = "noop_tc from the eBPF object".into();
    let floor_frame = frame::tcp(EXT_CLIENT, 40000, NODE_ADDR, NP_LOCAL, frame::ACK);
    let p = l.prog(prog_names::NOOP_XDP)?;
    res.noop_xdp_ns = Some(measure(plan, |_| Ok(run_once(p, &floor_frame)?.0))?);
    progress("no-op floors");

    for (salt, &n) in sizes.iter().enumerate() {
        l.fill_to(n)?;
        l.fill_conntrack()
            .with_context(|| format!("filling conntrack before {n} Services"))?;
        let probe = cluster_ip(n - 1).octets();
        let from_pod = l.prog(prog_names::FROM_POD)?;
        let to_pod = l.prog(prog_names::TO_POD)?;

        // New flows: a fresh source port per sample, so each one selects and creates conntrack.
        let new_flow_ns = measure(plan, |k| {
            let (src, sport) = new_flow_src(k, salt + 1);
            Ok(run_once(
                from_pod,
                &frame::tcp(src, sport, probe, SERVICE_PORT, frame::SYN),
            )?
            .0)
        })?;

        // Busy clients re-use their ports: a SYN on the tuple of a closed flow. Each sample's
        // tuple was closed (RST, untimed) after its SYN of the round before; the untimed
        // warm-up round creates them.
        let reuse_pool = plan.samples_per_round;
        let syn_reuse_ns = measure(plan, |k| {
            let (src, sport) = new_flow_src(k % reuse_pool, 50 + salt);
            let took = run_once(
                from_pod,
                &frame::tcp(src, sport, probe, SERVICE_PORT, frame::SYN),
            )?
            .0;
            run_once(
                from_pod,
                &frame::tcp(src, sport, probe, SERVICE_PORT, frame::RST),
            )?;
            Ok(took)
        })?;

        // One tracked flow; every later packet of it is a conntrack hit.
        let (_, out) = run_once(
            from_pod,
            &frame::tcp(CLIENT, 33333, probe, SERVICE_PORT, frame::SYN),
        )?;
        let (backend, backend_port) = frame::dst_of(&out).context("translated SYN")?;
        if backend == probe {
            bail!("the SYN to {probe:?}:{SERVICE_PORT} was not translated: is the Service programmed?");
        }
        let ack = ack_probe(probe);
        let established_ns = measure(plan, |_| Ok(run_once(from_pod, &ack)?.0))?;
        let reply = frame::tcp(backend, backend_port, CLIENT, 33333, frame::ACK);
        let reply_ns = measure(plan, |_| Ok(run_once(to_pod, &reply)?.0))?;
        let other = frame::tcp(CLIENT, 33334, NON_SERVICE, TARGET_PORT, frame::ACK);
        let non_service_ns = measure(plan, |_| Ok(run_once(from_pod, &other)?.0))?;

        res.rows.push(PktRow {
            services: n,
            established_ns,
            new_flow_ns,
            syn_reuse_ns,
            reply_ns,
            non_service_ns,
        });

        if res.external_error.is_none() {
            for (h, hook) in Hook::ALL.into_iter().enumerate() {
                match external_row(&mut l, hook, n, 4 * salt + h, plan) {
                    Ok(row) => res.external.push(row),
                    Err(e) => {
                        res.external_error =
                            Some(format!("{} at {n} Services: {e:#}", hook.label()));
                        break;
                    }
                }
            }
        }
        progress(&format!("per-packet at {n} Services"));
    }

    // The probes, with the maps as full as the largest size left them; SYNs to the probe
    // Service from sources no row used (salt 100).
    let dst = cluster_ip(max - 1).octets();
    let tracked = ack_probe(dst);
    for name in FLOOR_PROBES {
        let Ok(p) = l.prog(name) else { continue };
        let ns = measure(plan, |k| {
            if name == HIT_PROBE {
                return Ok(run_once(p, &tracked)?.0);
            }
            let (src, sport) = new_flow_src(k, 100);
            Ok(run_once(p, &frame::tcp(src, sport, dst, SERVICE_PORT, frame::SYN))?.0)
        });
        match ns {
            Ok(ns) => res.probes.push((name.to_string(), ns)),
            Err(e) => tracing::warn!(program = name, error = %e, "floor probe"),
        }
    }
    res.floors = floors_of(&res.probes);
    Ok(res)
}

/// The two hooks of the external path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    Xdp,
    Tc,
}

impl Hook {
    const ALL: [Hook; 2] = [Hook::Xdp, Hook::Tc];
    fn label(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::Tc => "tc",
        }
    }
    fn program(self) -> &'static str {
        match self {
            Hook::Xdp => prog_names::FROM_NET_XDP,
            Hook::Tc => prog_names::FROM_NET,
        }
    }
    fn pass(self) -> u32 {
        match self {
            Hook::Xdp => XDP_PASS,
            Hook::Tc => TC_ACT_OK,
        }
    }
    fn redirect(self) -> u32 {
        match self {
            Hook::Xdp => XDP_REDIRECT,
            Hook::Tc => TC_ACT_REDIRECT,
        }
    }
}

/// What a verdict means, for errors.
fn verdict_name(hook: Hook, v: u32) -> &'static str {
    match (hook, v) {
        (Hook::Xdp, 1) => "XDP_DROP",
        (Hook::Xdp, 2) => "XDP_PASS (handed to tc, or passed)",
        (Hook::Xdp, 3) => "XDP_TX",
        (Hook::Xdp, 4) => "XDP_REDIRECT",
        (Hook::Tc, 0) => "TC_ACT_OK",
        (Hook::Tc, 2) => "TC_ACT_SHOT",
        (Hook::Tc, 7) => "TC_ACT_REDIRECT",
        _ => "unexpected",
    }
}

/// Run `prog` on `frame` and check the verdict is `want`.
fn run_expect(
    prog: Prog<'_>,
    hook: Hook,
    frame: &[u8],
    want: u32,
    what: &str,
) -> anyhow::Result<Run> {
    let r = prog.run(frame)?;
    ensure!(
        r.verdict == want,
        "{what}: verdict {} ({}), expected {} ({})",
        r.verdict,
        verdict_name(hook, r.verdict),
        want,
        verdict_name(hook, want)
    );
    Ok(r)
}

/// Every external packet kind through `hook` at the current size. `salt` keeps the flows of
/// each (size, hook) apart. A new flow's conntrack pair is removed after its run (untimed), so
/// SYN samples leave the table, and the remote Service's SNAT ports, as they found them.
fn external_row(
    l: &mut Loaded,
    hook: Hook,
    n: usize,
    salt: usize,
    plan: PktPlan,
) -> anyhow::Result<ExtPktRow> {
    let Loaded {
        ebpf, conntrack, ..
    } = l;
    let prog = prog_of(ebpf, hook.program())?;
    let (pass, redirect) = (hook.pass(), hook.redirect());
    let sport = 40_000 + 2 * salt as u16;

    // Local backend: one tracked flow, then its packets; then new flows.
    let syn = frame::tcp(EXT_CLIENT, sport, NODE_ADDR, NP_LOCAL, frame::SYN);
    let out = run_expect(prog, hook, &syn, pass, "SYN to the local NodePort")?;
    let (be, _) = frame::dst_of(&out.frame).context("translated SYN")?;
    ensure!(be[..3] == [10, 244, 1], "local NodePort SYN went to {be:?}");
    let ack = frame::tcp(EXT_CLIENT, sport, NODE_ADDR, NP_LOCAL, frame::ACK);
    run_expect(prog, hook, &ack, pass, "packet of a local NodePort flow")?;
    let established_local_ns = measure(plan, |_| Ok(prog.run(&ack)?.duration))?;
    let new_flow = |conntrack: &mut HashMap<MapData, CtKey, CtValue>,
                    k: usize,
                    np: u16,
                    salt: usize,
                    want: u32|
     -> anyhow::Result<Duration> {
        let (src, sp) = new_flow_src(k, 100 + salt);
        let r = run_expect(
            prog,
            hook,
            &frame::tcp(src, sp, NODE_ADDR, np, frame::SYN),
            want,
            "new-flow SYN",
        )?;
        forget_flow(conntrack, src, sp, NODE_ADDR, np);
        Ok(r.duration)
    };
    let new_flow_local_ns = measure(plan, |k| new_flow(conntrack, k, NP_LOCAL, 2 * salt, pass))?;
    // A client re-using its ports: a SYN on the tuple its RST (untimed) closed in the round
    // before; the untimed warm-up round creates them. With XDP the RST reaches the stack too.
    let reuse_pool = plan.samples_per_round;
    let syn_reuse_local_ns = measure(plan, |k| {
        let (src, sp) = new_flow_src(k % reuse_pool, 150 + salt);
        let syn = frame::tcp(src, sp, NODE_ADDR, NP_LOCAL, frame::SYN);
        let took = run_expect(prog, hook, &syn, pass, "SYN on a re-used tuple")?.duration;
        let rst = frame::tcp(src, sp, NODE_ADDR, NP_LOCAL, frame::RST);
        run_expect(prog, hook, &rst, pass, "RST of a local NodePort flow")?;
        Ok(took)
    })?;
    for k in 0..reuse_pool {
        let (src, sp) = new_flow_src(k, 150 + salt);
        forget_flow(conntrack, src, sp, NODE_ADDR, NP_LOCAL);
    }

    // Remote backend: SNAT to the node, FIB lookup, redirect.
    let syn = frame::tcp(EXT_CLIENT, sport + 1, NODE_ADDR, NP_REMOTE, frame::SYN);
    let out = run_expect(prog, hook, &syn, redirect, "SYN to the remote NodePort")?;
    let (be, bport) = frame::dst_of(&out.frame).context("translated SYN")?;
    let (snat, snat_port) = frame::src_of(&out.frame).context("translated SYN")?;
    ensure!(
        be[..3] == [10, 244, 2] && snat == NODE_ADDR,
        "remote NodePort SYN became {snat:?}:{snat_port} -> {be:?}:{bport}"
    );
    let ack = frame::tcp(EXT_CLIENT, sport + 1, NODE_ADDR, NP_REMOTE, frame::ACK);
    run_expect(
        prog,
        hook,
        &ack,
        redirect,
        "packet of a remote NodePort flow",
    )?;
    let established_remote_ns = measure(plan, |_| Ok(prog.run(&ack)?.duration))?;
    let reply = frame::tcp(be, bport, NODE_ADDR, snat_port, frame::ACK);
    let out = run_expect(prog, hook, &reply, redirect, "answer of a remote backend")?;
    ensure!(
        frame::dst_of(&out.frame) == Some((EXT_CLIENT, sport + 1))
            && frame::src_of(&out.frame) == Some((NODE_ADDR, NP_REMOTE)),
        "the remote backend's answer was not restored to NodePort -> client"
    );
    let reply_remote_ns = measure(plan, |_| Ok(prog.run(&reply)?.duration))?;
    let new_flow_remote_ns = measure(plan, |k| {
        new_flow(conntrack, k, NP_REMOTE, 2 * salt + 1, redirect)
    })?;

    let other = frame::tcp(EXT_CLIENT, sport, NODE_ADDR, NP_NONE, frame::ACK);
    run_expect(prog, hook, &other, pass, "packet to an unused node port")?;
    let non_service_ns = measure(plan, |_| Ok(prog.run(&other)?.duration))?;

    Ok(ExtPktRow {
        services: n,
        hook: hook.label().into(),
        established_local_ns,
        new_flow_local_ns,
        syn_reuse_local_ns,
        established_remote_ns,
        new_flow_remote_ns,
        reply_remote_ns,
        non_service_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_floor_is_one_probe_of_a_part_of_the_kind() {
        let probes = |names: &[(&str, f64)]| -> Vec<(String, f64)> {
            names.iter().map(|(n, v)| (n.to_string(), *v)).collect()
        };
        let f = floors_of(&probes(&[
            ("floor_parse", 100.0),
            ("floor_ct_lookup", 150.0),
            ("floor_ct_pair", 400.0),
            ("floor_nat", 160.0),
        ]));
        let ns = |k: &str| f.iter().find(|x| x.kind == k).map(|x| x.ns);
        assert_eq!(ns("syn"), Some(400.0));
        assert_eq!(ns("established"), Some(160.0));
        assert_eq!(ns("non_service"), Some(100.0));
        assert!(f[0].what.contains("floor_ct_pair"), "{:?}", f[0]);
        assert!(f[0].what.contains("costs 150 ns alone"), "{:?}", f[0]);
        // With the hit probe, the established floor is the lookup that finds the flow plus the
        // DNAT, and only that one.
        let f = floors_of(&probes(&[
            ("floor_parse", 100.0),
            ("floor_nat", 160.0),
            ("floor_ct_hit", 210.0),
        ]));
        let established: Vec<_> = f.iter().filter(|x| x.kind == "established").collect();
        assert_eq!(established.len(), 1, "{f:?}");
        assert_eq!(established[0].ns, 210.0);
        assert!(established[0].what.contains("floor_ct_hit"), "{f:?}");
        // Only what the probes present can say.
        let f = floors_of(&probes(&[("floor_parse", 90.0)]));
        assert_eq!(f.len(), 1);
        assert!(floors_of(&[]).is_empty());
    }

    #[test]
    fn new_flow_sources_are_distinct() {
        let mut seen = std::collections::BTreeSet::new();
        for k in 0..200_000 {
            assert!(seen.insert(new_flow_src(k, 1)));
        }
        assert!(!seen.contains(&new_flow_src(0, 2)));
        assert_eq!((0..100).map(endpoints_of).sum::<usize>(), 90 * 3 + 10 * 10);
    }

    #[test]
    #[ignore = "needs root"]
    fn per_packet_run_on_the_real_object() {
        let _serial = crate::root_test();
        let res = run(
            &[1, 20],
            PktPlan {
                rounds: 2,
                samples_per_round: 50,
            },
            |_| {},
        )
        .unwrap();
        assert_eq!(res.rows.len(), 2);
        for r in &res.rows {
            for v in [
                r.established_ns,
                r.new_flow_ns,
                r.reply_ns,
                r.non_service_ns,
            ] {
                assert!(v > 0.0 && v < 1e6, "{r:?}");
            }
        }
        assert!(res.noop_ns > 0.0);
        assert!(res.external_error.is_none(), "{:?}", res.external_error);
        assert_eq!(res.external.len(), 4);
        for r in &res.external {
            for v in [
                r.established_local_ns,
                r.new_flow_local_ns,
                r.syn_reuse_local_ns,
                r.established_remote_ns,
                r.new_flow_remote_ns,
                r.reply_remote_ns,
                r.non_service_ns,
            ] {
                assert!(v > 0.0 && v < 1e6, "{r:?}");
            }
        }
        assert!(res.noop_xdp_ns.is_some_and(|v| v > 0.0));
    }

    /// What the module docs say about FIB lookups in test runs: a remote-backend SYN is dropped
    /// while forwarding is off, handed to tc by XDP (tc redirects through the neighbour
    /// subsystem) while the next hop has no neighbour entry, and redirected by both once it has.
    #[test]
    #[ignore = "needs root"]
    fn fib_lookup_in_a_test_run_needs_forwarding_and_a_resolved_next_hop() {
        let _serial = crate::root_test();
        let ns = NetNs::create(&format!("xlbb{}-unit-fib", std::process::id())).unwrap();
        let verdicts = |ifindex: u32| {
            ns.run(|| {
                let mut l = Loaded::load(1).unwrap();
                l.add_external(ifindex).unwrap();
                let syn = frame::tcp(EXT_CLIENT, 40_000, NODE_ADDR, NP_REMOTE, frame::SYN);
                let xdp = l.prog(prog_names::FROM_NET_XDP).unwrap().run(&syn).unwrap();
                let tc = l.prog(prog_names::FROM_NET).unwrap().run(&syn).unwrap();
                (xdp.verdict, tc.verdict)
            })
            .unwrap()
        };
        // Fresh namespace: forwarding off, no route.
        assert_eq!(verdicts(1), (1, 2), "XDP_DROP, TC_ACT_SHOT (drop_no_route)");
        // Forwarding on, a route whose gateway has no neighbour entry.
        ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
        ns.ip(&[
            "link", "add", UPLINK, "type", "veth", "peer", "name", "ext0p",
        ])
        .unwrap();
        ns.ip(&["addr", "add", "192.168.77.1/24", "dev", UPLINK])
            .unwrap();
        ns.ip(&["link", "set", "ext0p", "up"]).unwrap();
        ns.ip(&["link", "set", UPLINK, "up"]).unwrap();
        ns.ip(&["route", "add", "default", "via", GATEWAY, "dev", UPLINK])
            .unwrap();
        let line = ns.ip(&["-o", "link", "show", UPLINK]).unwrap();
        let ifindex: u32 = line.split(':').next().unwrap().trim().parse().unwrap();
        assert_eq!(
            verdicts(ifindex),
            (XDP_PASS, TC_ACT_REDIRECT),
            "XDP defers, tc redirect_neigh"
        );
        // Resolved: both redirect.
        ns.ip(&[
            "neigh",
            "add",
            GATEWAY,
            "lladdr",
            GATEWAY_MAC,
            "dev",
            UPLINK,
            "nud",
            "permanent",
        ])
        .unwrap();
        assert_eq!(verdicts(ifindex), (XDP_REDIRECT, TC_ACT_REDIRECT));
    }
}
