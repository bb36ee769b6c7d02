//! `xlb trace`: where would this packet go? The packet is built here (etherparse), run once
//! with BPF_PROG_TEST_RUN through a private copy of the eBPF object loaded over the node's
//! pinned maps with the global `XLB_DRY_RUN` = 1, and the outcome is read back: the verdict,
//! the output frame (the rewritten headers) and the trace record (`lb_common::TraceRecord`:
//! the counters the run would have bumped, the conntrack entry it followed or would have
//! written). In dry run the programs write no map (no conntrack, affinity, round-robin,
//! fragment or counter update), so a trace changes nothing on the node, and it answers with
//! exactly the code and the state that serve real packets.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;

use anyhow::{anyhow, bail, Context as _};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use aya::Ebpf;
use etherparse::{NetHeaders, PacketBuilder, PacketHeaders, TcpHeader, TransportHeader};
use lb_common::{
    map_names, prog_names, Backend, ServiceKey, ServiceValue, Stat, SvcName, TraceRecord,
    CT_F_HAIRPIN, CT_F_SNAT, CT_REPLY, PROTO_TCP, PROTO_UDP, SCOPE_EXT, TRACE_FLOW_EXISTING,
    TRACE_FLOW_NEW,
};
use serde::Serialize;

use crate::datapath::{self, load_programs, LoadOptions, PinLayout};

/// tc verdicts.
const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;
/// XDP verdicts.
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

/// Room for a frame that grows (a refused UDP datagram becomes an ICMP error).
const OUT_SLACK: usize = 256;
/// The client port when `--src` names none.
pub const DEFAULT_SPORT: u16 = 40_000;

/// The transport protocol of a traced packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn number(self) -> u8 {
        match self {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        }
    }
}

/// A TCP flag of a traced segment (`--flags syn,ack`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TcpFlag {
    Syn,
    Ack,
    Fin,
    Rst,
    Psh,
}

/// The program a packet is run through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TraceHook {
    /// A pod sends (tc ingress of its host-side veth).
    FromPod,
    /// A packet goes into a pod (tc egress of its veth).
    ToPod,
    /// A client outside the node (tc ingress of an external device: the whole path).
    FromNet,
    /// The XDP program of external devices.
    FromNetXdp,
    /// An answer leaves the node (tc egress of an external device).
    ToNet,
}

impl TraceHook {
    pub fn prog(self) -> &'static str {
        match self {
            TraceHook::FromPod => prog_names::FROM_POD,
            TraceHook::ToPod => prog_names::TO_POD,
            TraceHook::FromNet => prog_names::FROM_NET,
            TraceHook::FromNetXdp => prog_names::FROM_NET_XDP,
            TraceHook::ToNet => prog_names::TO_NET,
        }
    }
    fn is_xdp(self) -> bool {
        self == TraceHook::FromNetXdp
    }
}

/// What to trace.
#[derive(Clone, Debug)]
pub struct Request {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: Proto,
    /// TCP flags; empty: a bare SYN (the first packet of a connection).
    pub flags: Vec<TcpFlag>,
    /// The device the packet arrives on (its ifindex is in the program's context, e.g. for
    /// the next-hop lookup); None: chosen from the source address.
    pub device: Option<String>,
    /// The program; None: from the device (pod device: `from_pod`, external: `from_net`).
    pub hook: Option<TraceHook>,
    /// The Service CIDR the agent runs with (unallocated addresses in it are refused); None:
    /// read from the program attached on the node, if any.
    pub service_cidr: Option<(Ipv4Addr, u8)>,
}

/// One side of a packet: the headers that matter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Headers {
    pub src_mac: String,
    pub dst_mac: String,
    pub src: String,
    pub dst: String,
    /// "tcp", "udp", "icmp" or the IP protocol number.
    pub proto: String,
    /// TCP flags ("syn,ack"); ICMP type/code ("type 3 code 3").
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// The Service a packet meets: its frontend and, when the agent recorded it, its name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceInfo {
    /// "addr:port/PROTO".
    pub frontend: String,
    /// "namespace/name" (None: the agent recorded no name for this frontend).
    pub name: Option<String>,
    /// The Service port's name ("" for an only, unnamed port).
    pub port_name: Option<String>,
    pub svc_port_id: u32,
    pub rev_nat_id: u32,
    /// Backends in the frontend's slots now (its master's count).
    pub backends: u32,
}

/// The backend a packet goes to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendInfo {
    pub id: u32,
    /// "addr:port".
    pub addr: String,
    /// The endpoint runs on this node.
    pub local: bool,
}

/// What `xlb trace` found.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The program the packet ran through.
    pub program: String,
    /// The device whose ifindex the program saw (None: loopback).
    pub device: Option<String>,
    /// Why this program and device.
    pub chosen: String,
    /// "pass", "drop", "redirect" (tc) / "pass", "drop", "tx", "redirect" (XDP).
    pub verdict: String,
    pub verdict_code: u32,
    /// One line: what happens to the packet.
    pub summary: String,
    /// "new" (a new flow, would get a conntrack pair), "established" (a live conntrack entry
    /// carried it), "reply" (an answer of a tracked flow), or None.
    pub flow: Option<String>,
    pub service: Option<ServiceInfo>,
    pub backend: Option<BackendInfo>,
    /// The node address and port a flow from outside to a backend on another node is SNATed to.
    pub snat: Option<String>,
    pub hairpin: bool,
    /// The datapath counters the run bumped (`xlb inspect stats` names): the reasons.
    pub reasons: Vec<String>,
    pub input: Headers,
    /// The packet as the program left it (None: it could not be decoded).
    pub output: Option<Headers>,
    /// Whether the program changed the frame.
    pub rewritten: bool,
}

/// The frame of `req`: Ethernet, IPv4 and a TCP segment (a bare SYN unless flags are given)
/// or an empty UDP datagram, checksums filled in.
pub fn build_frame(req: &Request) -> Vec<u8> {
    let macs = ([0x02, 0, 0, 0, 0, 0x01], [0x02, 0, 0, 0, 0, 0xfe]);
    let b = PacketBuilder::ethernet2(macs.0, macs.1).ipv4(
        req.src.ip().octets(),
        req.dst.ip().octets(),
        64,
    );
    let payload: &[u8] = &[];
    let mut out = Vec::new();
    match req.proto {
        Proto::Tcp => {
            let mut tcp = TcpHeader::new(req.src.port(), req.dst.port(), 1_000, 64_240);
            let flags = if req.flags.is_empty() {
                &[TcpFlag::Syn][..]
            } else {
                &req.flags[..]
            };
            for f in flags {
                match f {
                    TcpFlag::Syn => tcp.syn = true,
                    TcpFlag::Ack => {
                        tcp.ack = true;
                        tcp.acknowledgment_number = 1;
                    }
                    TcpFlag::Fin => tcp.fin = true,
                    TcpFlag::Rst => tcp.rst = true,
                    TcpFlag::Psh => tcp.psh = true,
                }
            }
            let b = b.tcp_header(tcp);
            out.reserve(b.size(0));
            b.write(&mut out, payload).expect("writing to a Vec");
        }
        Proto::Udp => {
            let b = b.udp(req.src.port(), req.dst.port());
            out.reserve(b.size(0));
            b.write(&mut out, payload).expect("writing to a Vec");
        }
    }
    out
}

/// The headers of `frame` (None: not Ethernet/IPv4).
pub fn headers(frame: &[u8]) -> Option<Headers> {
    let h = PacketHeaders::from_ethernet_slice(frame).ok()?;
    let eth = h.link.clone()?.ethernet2()?;
    let Some(NetHeaders::Ipv4(ip, _)) = &h.net else {
        return None;
    };
    let mac = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let (sport, dport, proto, detail) = match &h.transport {
        Some(TransportHeader::Tcp(t)) => {
            let mut f = Vec::new();
            for (on, name) in [
                (t.syn, "syn"),
                (t.ack, "ack"),
                (t.fin, "fin"),
                (t.rst, "rst"),
                (t.psh, "psh"),
            ] {
                if on {
                    f.push(name);
                }
            }
            (
                Some(t.source_port),
                Some(t.destination_port),
                "tcp".to_string(),
                f.join(","),
            )
        }
        Some(TransportHeader::Udp(u)) => (
            Some(u.source_port),
            Some(u.destination_port),
            "udp".into(),
            String::new(),
        ),
        Some(TransportHeader::Icmpv4(i)) => {
            let b = i.to_bytes();
            (
                None,
                None,
                "icmp".into(),
                format!("type {} code {}", b[0], b[1]),
            )
        }
        _ => (None, None, format!("{}", ip.protocol.0), String::new()),
    };
    let ep = |a: [u8; 4], p: Option<u16>| match p {
        Some(p) => format!("{}:{p}", Ipv4Addr::from(a)),
        None => Ipv4Addr::from(a).to_string(),
    };
    Some(Headers {
        src_mac: mac(eth.source),
        dst_mac: mac(eth.destination),
        src: ep(ip.source, sport),
        dst: ep(ip.destination, dport),
        proto,
        detail,
    })
}

/// The outcome of one dry-run program run.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    pub verdict: u32,
    pub frame: Vec<u8>,
    pub record: TraceRecord,
}

/// Runs program `prog` (loaded, of an object loaded with `dry_run`) once on `frame`, as if it
/// arrived on `ifindex` (None: loopback), and reads the trace record. The record map is the
/// object's own (never pinned): it must be fresh, i.e. this is the object's first run, or the
/// record holds earlier runs' bits too (the packet tests reset it with [`reset_record`]).
pub fn run_frame(
    ebpf: &Ebpf,
    prog: &str,
    frame: &[u8],
    ifindex: Option<u32>,
) -> anyhow::Result<RunOutcome> {
    let (verdict, frame) = test_run_frame(ebpf, prog, frame, ifindex)?;
    Ok(RunOutcome { verdict, frame, record: read_record(ebpf)? })
}

/// BPF_PROG_TEST_RUN of program `prog` (a loaded tc classifier or XDP program of `ebpf`) on
/// `frame`, as if it arrived on device `ifindex` (which must exist in the calling thread's
/// network namespace; None: loopback), so its FIB lookups see that namespace's routes and
/// neighbours. Returns the verdict and the frame as the program left it. `xlb trace` and the
/// packet tests run packets through this one function.
pub fn test_run_frame(
    ebpf: &Ebpf,
    prog: &str,
    frame: &[u8],
    ifindex: Option<u32>,
) -> anyhow::Result<(u32, Vec<u8>)> {
    let program = ebpf
        .program(prog)
        .with_context(|| format!("program {prog} is not in the object"))?;
    let mut out = vec![0u8; frame.len() + OUT_SLACK];
    // The context a test run may set: __sk_buff up to `ifindex` (offset 40), or xdp_md.
    let (skb_ctx, xdp_ctx) = match ifindex {
        Some(ifx) => {
            let mut skb = [0u8; 44];
            skb[40..44].copy_from_slice(&ifx.to_ne_bytes());
            let mut xdp = [0u8; 24];
            xdp[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
            xdp[12..16].copy_from_slice(&ifx.to_ne_bytes());
            (Some(skb), Some(xdp))
        }
        None => (None, None),
    };
    let result = match program {
        aya::programs::Program::Xdp(_) => {
            let xdp: &Xdp = program.try_into()?;
            xdp.test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: xdp_ctx.as_ref().map(|c| &c[..]),
                ..Default::default()
            })
        }
        _ => {
            let tc: &SchedClassifier = program.try_into()?;
            tc.test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: skb_ctx.as_ref().map(|c| &c[..]),
                ..Default::default()
            })
        }
    }
    .with_context(|| format!("BPF_PROG_TEST_RUN of {prog}"))?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}

/// The trace record, merged over CPUs (the run happened on one of them).
pub fn read_record(ebpf: &Ebpf) -> anyhow::Result<TraceRecord> {
    let map = ebpf
        .map(map_names::TRACE)
        .context("the TRACE map is not in the object")?;
    let arr = PerCpuArray::<&MapData, TraceRecord>::try_from(map)?;
    let mut rec = TraceRecord::default();
    for r in arr.get(&0, 0)?.iter() {
        rec.stats |= r.stats;
        if r.flow_kind != 0 {
            rec.flow = r.flow;
            rec.flow_kind = r.flow_kind;
            rec.flow_dir = r.flow_dir;
        }
    }
    Ok(rec)
}

/// Zeroes the trace record (before another run of the same object).
pub fn reset_record(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let map = ebpf
        .map_mut(map_names::TRACE)
        .context("the TRACE map is not in the object")?;
    let mut arr = PerCpuArray::<&mut MapData, TraceRecord>::try_from(map)?;
    let n = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    let zero = aya::maps::PerCpuValues::try_from(vec![TraceRecord::default(); n])?;
    arr.set(0, zero, 0)?;
    Ok(())
}

/// The names of the counters set in `stats` (a `TraceRecord::stats` bitmask).
pub fn stat_names(stats: u64) -> Vec<String> {
    Stat::ALL
        .iter()
        .filter(|&&s| (s as u32) < 64 && stats & (1u64 << (s as u32)) != 0)
        .map(|s| s.name().to_string())
        .collect()
}

fn has(stats: u64, s: Stat) -> bool {
    stats & (1u64 << (s as u32)) != 0
}

/// The verdict's name.
pub fn verdict_name(xdp: bool, v: u32) -> String {
    if xdp {
        match v {
            XDP_DROP => "drop".into(),
            XDP_PASS => "pass".into(),
            XDP_TX => "tx".into(),
            XDP_REDIRECT => "redirect".into(),
            other => format!("xdp {other}"),
        }
    } else {
        match v as i32 {
            TC_ACT_OK | -1 => "pass".into(),
            TC_ACT_SHOT => "drop".into(),
            TC_ACT_REDIRECT => "redirect".into(),
            other => format!("tc {other}"),
        }
    }
}

/// Link pins: ifindex -> (ifname, hooks).
fn attached(pins: &PinLayout) -> BTreeMap<u32, (String, Vec<datapath::Hook>)> {
    let mut out: BTreeMap<u32, (String, Vec<datapath::Hook>)> = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir(pins.links()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some((idx, ifname, hook)) = datapath::parse_link_pin(&name) {
                out.entry(idx)
                    .or_insert_with(|| (ifname.to_string(), Vec::new()))
                    .1
                    .push(hook);
            }
        }
    }
    out
}

/// The device the route to `addr` leaves through (/proc/net/route, longest prefix).
pub fn route_device(addr: Ipv4Addr) -> Option<String> {
    let text = std::fs::read_to_string("/proc/net/route").ok()?;
    route_device_in(&text, addr)
}

fn route_device_in(text: &str, addr: Ipv4Addr) -> Option<String> {
    let a = u32::from_ne_bytes(addr.octets());
    let mut best: Option<(u32, String)> = None;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let (Ok(dst), Ok(mask)) = (u32::from_str_radix(f[1], 16), u32::from_str_radix(f[7], 16))
        else {
            continue;
        };
        // Both are the kernel's network-order words printed as host integers.
        if a & mask != dst {
            continue;
        }
        let len = mask.count_ones();
        if best.as_ref().is_none_or(|(l, _)| len > *l) {
            best = Some((len, f[0].to_string()));
        }
    }
    best.map(|(_, d)| d)
}

/// The program and device of `req`, and why.
fn choose(
    pins: &PinLayout,
    req: &Request,
) -> anyhow::Result<(TraceHook, Option<(u32, String)>, String)> {
    let links = attached(pins);
    let hook_of = |hooks: &[datapath::Hook]| {
        if hooks.contains(&datapath::Hook::FromPod) {
            Some(TraceHook::FromPod)
        } else if hooks.contains(&datapath::Hook::FromNet) {
            Some(TraceHook::FromNet)
        } else {
            None
        }
    };
    if let Some(dev) = &req.device {
        let idx = nix::net::if_::if_nametoindex(dev.as_str())
            .with_context(|| format!("no device {dev}"))?;
        let hook = match (req.hook, links.get(&idx).and_then(|(_, h)| hook_of(h))) {
            (Some(h), _) => h,
            (None, Some(h)) => h,
            (None, None) => bail!(
                "{dev} has no xlb program attached (not a pod device or an external device of the agent): \
                 say which program with --hook"
            ),
        };
        return Ok((hook, Some((idx, dev.clone())), format!("--device {dev}")));
    }
    let src = *req.src.ip();
    if let Some(dev) = route_device(src) {
        if let Some((&idx, (name, hooks))) = links.iter().find(|(_, (n, _))| *n == dev) {
            if let Some(h) = hook_of(hooks) {
                let hook = req.hook.unwrap_or(h);
                let kind = if h == TraceHook::FromPod {
                    "a pod device"
                } else {
                    "an external device"
                };
                return Ok((
                    hook,
                    Some((idx, name.clone())),
                    format!("{src} is routed via {name}, {kind}"),
                ));
            }
        }
    }
    let hook = req.hook.unwrap_or(TraceHook::FromPod);
    Ok((
        hook,
        None,
        format!(
            "{src} is not routed via a device xlb attached: run as {} on loopback",
            hook.prog()
        ),
    ))
}

/// The Service CIDR of the programs attached under `pins` (the agent's `--service-cidr`): read
/// from the load-time globals of a running `from_pod` / `from_net`. None when nothing is
/// attached or it cannot be read.
pub fn attached_service_cidr(pins: &PinLayout) -> Option<(Ipv4Addr, u8)> {
    let (addr, mask) = crate::status::attached_globals(pins)?;
    if mask == 0 {
        return None;
    }
    let len = u32::from_be(mask).leading_ones() as u8;
    Some((Ipv4Addr::from(addr.to_ne_bytes()), len))
}

/// Traces `req` against the maps pinned under `pin_path`.
pub fn trace(pin_path: &Path, req: &Request) -> anyhow::Result<Report> {
    let pins = PinLayout::new(pin_path);
    // Loading over missing pins would create (and pin) new maps: a trace must change nothing.
    let missing: Vec<&str> = map_names::ALL
        .iter()
        .copied()
        .filter(|n| !pins.map(n).exists())
        .collect();
    if !missing.is_empty() {
        bail!(
            "no xlb maps under {} (missing: {}): is the agent running with --pin-path {}?",
            pins.maps().display(),
            missing.join(", "),
            pin_path.display()
        );
    }
    let (hook, device, chosen) = choose(&pins, req)?;
    let maglev_m = aya::maps::MapInfo::from_pin(pins.map(map_names::MAGLEV))
        .ok()
        .and_then(|i| lb_model::maglev::Geometry::from_len(i.max_entries()))
        .map(|g| g.m)
        .unwrap_or(lb_common::DEFAULT_MAGLEV_M);
    let service_cidr = req.service_cidr.or_else(|| attached_service_cidr(&pins));
    let opts = LoadOptions {
        dry_run: true,
        service_cidr,
        maglev_m,
        ..LoadOptions::default()
    };
    let mut ebpf = opts
        .load_object(Some(&pins))
        .context("loading a dry-run copy of the eBPF object")?;
    load_programs(&mut ebpf, &[hook.prog()]).map_err(|e| anyhow!("{e}"))?;
    let frame = build_frame(req);
    let out = run_frame(&ebpf, hook.prog(), &frame, device.as_ref().map(|d| d.0))?;
    let mut report = explain(&ebpf, req, hook, &frame, &out);
    report.device = device.map(|d| d.1);
    report.chosen = chosen;
    Ok(report)
}

/// A map of the loaded object as a hash map.
fn hash<'a, K: aya::Pod, V: aya::Pod>(
    ebpf: &'a Ebpf,
    name: &str,
) -> Option<BpfHashMap<&'a MapData, K, V>> {
    BpfHashMap::try_from(ebpf.map(name)?).ok()
}

fn nul_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn proto_name(p: u8) -> &'static str {
    match p {
        PROTO_TCP => "TCP",
        PROTO_UDP => "UDP",
        _ => "?",
    }
}

/// The Service of frontend `dst`/`proto` (its `SCOPE_EXT` master) as the maps hold it.
fn service_of(
    ebpf: &Ebpf,
    dst: SocketAddrV4,
    proto: u8,
    svc_port_id: Option<u32>,
) -> Option<ServiceInfo> {
    let svc = hash::<ServiceKey, ServiceValue>(ebpf, map_names::SERVICES)?;
    let key = ServiceKey::new(
        lb_common::ip4(dst.ip().octets()),
        lb_common::port(dst.port()),
        proto,
        SCOPE_EXT,
        0,
    );
    let master = svc.get(&key, 0).ok()?;
    let id = svc_port_id
        .filter(|&i| i != 0)
        .unwrap_or(master.svc_port_id);
    let name = (id != 0)
        .then(|| hash::<u32, SvcName>(ebpf, map_names::SVCNAME).and_then(|m| m.get(&id, 0).ok()))
        .flatten();
    Some(ServiceInfo {
        frontend: format!("{dst}/{}", proto_name(proto)),
        name: name.map(|n| format!("{}/{}", nul_str(&n.namespace), nul_str(&n.name))),
        port_name: name.map(|n| nul_str(&n.port_name)),
        svc_port_id: id,
        rev_nat_id: master.rev_nat_id,
        backends: master.count,
    })
}

fn sock(addr: u32, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(addr.to_ne_bytes()), u16::from_be(port))
}

/// Turns a run's outcome into the report (the maps of `ebpf` name the Service and backend).
pub fn explain(
    ebpf: &Ebpf,
    req: &Request,
    hook: TraceHook,
    frame: &[u8],
    out: &RunOutcome,
) -> Report {
    let rec = &out.record;
    let stats = rec.stats;
    let proto = req.proto.number();
    let verdict = verdict_name(hook.is_xdp(), out.verdict);
    let input = headers(frame).expect("the built frame decodes");
    let output = headers(&out.frame);
    let rewritten = out.frame != frame;
    let (mut flow, mut backend, mut snat, mut hairpin) = (None, None, None, false);
    let mut service = None;
    if rec.flow_kind == TRACE_FLOW_NEW || rec.flow_kind == TRACE_FLOW_EXISTING {
        let ct = rec.flow;
        let reply = rec.flow_dir == u32::from(CT_REPLY);
        flow = Some(
            match (rec.flow_kind, reply) {
                (TRACE_FLOW_NEW, _) => "new",
                (_, false) => "established",
                (_, true) => "reply",
            }
            .to_string(),
        );
        if reply {
            // The reply entry holds the frontend: the Service the answer comes from.
            service = service_of(
                ebpf,
                sock(ct.nat_addr, ct.nat_port),
                proto,
                Some(u32::from(ct.svc_port_id)),
            );
        } else {
            let be = hash::<u32, Backend>(ebpf, map_names::BACKENDS)
                .and_then(|m| m.get(&ct.backend_id, 0).ok());
            backend = Some(BackendInfo {
                id: ct.backend_id,
                addr: sock(ct.nat_addr, ct.nat_port).to_string(),
                local: be.is_some_and(|b| b.state & lb_common::BACKEND_F_LOCAL != 0),
            });
            if ct.flags & CT_F_SNAT != 0 {
                snat = Some(sock(ct.snat_addr, ct.snat_port).to_string());
            }
            hairpin = ct.flags & CT_F_HAIRPIN != 0;
            service = service_of(ebpf, req.dst, proto, Some(u32::from(ct.svc_port_id)));
        }
    } else if !matches!(hook, TraceHook::ToPod | TraceHook::ToNet) {
        service = service_of(ebpf, req.dst, proto, None);
    }
    let reasons = stat_names(stats);
    let svc_name = |s: &Option<ServiceInfo>| match s {
        Some(ServiceInfo {
            name: Some(n),
            frontend,
            ..
        }) => format!("{n} ({frontend})"),
        Some(s) => s.frontend.clone(),
        None => format!("{}/{}", req.dst, proto_name(proto)),
    };
    let summary = if let (Some(f), Some(b)) = (&flow, &backend) {
        let mut s = match f.as_str() {
            "new" => format!(
                "new flow to {}: backend {} (id {})",
                svc_name(&service),
                b.addr,
                b.id
            ),
            _ => format!(
                "established flow of {}: backend {} (id {}, from conntrack)",
                svc_name(&service),
                b.addr,
                b.id
            ),
        };
        if let Some(n) = &snat {
            s.push_str(&format!(", SNATed to {n}"));
        }
        if hairpin {
            s.push_str(", hairpin (the pod is its own backend)");
        }
        s
    } else if flow.as_deref() == Some("reply") {
        format!(
            "reply of a flow of {}: source restored to the frontend",
            svc_name(&service)
        )
    } else if has(stats, Stat::RefusedTcp) || has(stats, Stat::RefusedUdp) {
        match &service {
            Some(s) if s.backends == 0 => {
                format!("refused: {} has no endpoints", svc_name(&service))
            }
            _ => format!(
                "refused: {} is in the Service CIDR but no Service has it",
                req.dst
            ),
        }
    } else if has(stats, Stat::DropSourceRange) {
        format!(
            "dropped: {} is outside the loadBalancerSourceRanges of {}",
            req.src.ip(),
            svc_name(&service)
        )
    } else if has(stats, Stat::DropNoLocalEndpoint) {
        format!(
            "dropped: {} has no endpoint on this node (externalTrafficPolicy Local)",
            svc_name(&service)
        )
    } else if has(stats, Stat::PassMalformed) {
        "passes untouched: malformed".into()
    } else if has(stats, Stat::PassOtherProto) {
        "passes untouched: a protocol xlb does not translate".into()
    } else if !reasons.is_empty() && !rewritten && verdict == "pass" {
        format!("passes untouched ({})", reasons.join(", "))
    } else if reasons.is_empty() && !rewritten && out.verdict == 0 {
        match &service {
            Some(s) if s.backends == 0 => {
                format!("passes untouched: {} has no endpoints", s.frontend)
            }
            Some(s) => format!(
                "passes untouched by {}: {} is served by another program",
                hook.prog(),
                s.frontend
            ),
            None => format!(
                "passes untouched: {}/{} is not a Service frontend",
                req.dst,
                proto_name(proto)
            ),
        }
    } else {
        format!(
            "{verdict} ({})",
            if reasons.is_empty() {
                "no counter".to_string()
            } else {
                reasons.join(", ")
            }
        )
    };
    Report {
        program: hook.prog().to_string(),
        device: None,
        chosen: String::new(),
        verdict,
        verdict_code: out.verdict,
        summary,
        flow,
        service,
        backend,
        snat,
        hairpin,
        reasons,
        input,
        output,
        rewritten,
    }
}

/// Prints a report as a table.
pub fn print_table(r: &Report) {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    let mut row = |k: &str, v: String| {
        t.add_row(vec![k.to_string(), v]);
    };
    row(
        "program",
        format!(
            "{} on {} ({})",
            r.program,
            r.device.as_deref().unwrap_or("lo"),
            r.chosen
        ),
    );
    row("verdict", r.verdict.clone());
    row("result", r.summary.clone());
    if let Some(s) = &r.service {
        let name = match (&s.name, &s.port_name) {
            (Some(n), Some(p)) if !p.is_empty() => format!("{n} port {p}"),
            (Some(n), _) => n.clone(),
            _ => "(no name recorded)".into(),
        };
        row(
            "service",
            format!(
                "{name}  {}  ({} backends, rev-NAT id {})",
                s.frontend, s.backends, s.rev_nat_id
            ),
        );
    }
    if let Some(b) = &r.backend {
        row(
            "backend",
            format!(
                "{} (id {}{})",
                b.addr,
                b.id,
                if b.local { ", local" } else { "" }
            ),
        );
    }
    if !r.reasons.is_empty() {
        row("counters", r.reasons.join(", "));
    }
    let fmt = |h: &Headers| {
        let d = if h.detail.is_empty() {
            String::new()
        } else {
            format!(" [{}]", h.detail)
        };
        format!(
            "{} -> {} {}{d}  ({} -> {})",
            h.src, h.dst, h.proto, h.src_mac, h.dst_mac
        )
    };
    row("in", fmt(&r.input));
    match &r.output {
        Some(o) if r.rewritten => row("out", fmt(o)),
        Some(_) => row("out", "unchanged".into()),
        None => row("out", "(not IPv4)".into()),
    }
    println!("{t}");
}

/// `xlb trace`.
pub fn run(pin_path: &Path, req: &Request, output: crate::inspect::Output) -> anyhow::Result<()> {
    let report = trace(pin_path, req)?;
    match output {
        crate::inspect::Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        crate::inspect::Output::Table => print_table(&report),
    }
    Ok(())
}

/// `--src IP[:PORT]`.
pub fn parse_src(s: &str) -> Result<SocketAddrV4, String> {
    if let Ok(a) = s.parse::<SocketAddrV4>() {
        return Ok(a);
    }
    let ip: Ipv4Addr = s
        .parse()
        .map_err(|e| format!("{s}: {e} (expected IP or IP:PORT)"))?;
    Ok(SocketAddrV4::new(ip, DEFAULT_SPORT))
}

/// `--dst IP:PORT`.
pub fn parse_dst(s: &str) -> Result<SocketAddrV4, String> {
    s.parse()
        .map_err(|e| format!("{s}: {e} (expected IP:PORT)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(proto: Proto, flags: Vec<TcpFlag>) -> Request {
        Request {
            src: "10.244.1.5:40000".parse().unwrap(),
            dst: "10.96.0.10:53".parse().unwrap(),
            proto,
            flags,
            device: None,
            hook: None,
            service_cidr: None,
        }
    }

    #[test]
    fn built_frames_decode_to_what_was_asked() {
        let h = headers(&build_frame(&req(Proto::Tcp, vec![]))).unwrap();
        assert_eq!(
            (
                h.src.as_str(),
                h.dst.as_str(),
                h.proto.as_str(),
                h.detail.as_str()
            ),
            ("10.244.1.5:40000", "10.96.0.10:53", "tcp", "syn")
        );
        let h = headers(&build_frame(&req(
            Proto::Tcp,
            vec![TcpFlag::Ack, TcpFlag::Psh],
        )))
        .unwrap();
        assert_eq!(h.detail, "ack,psh");
        let h = headers(&build_frame(&req(Proto::Udp, vec![]))).unwrap();
        assert_eq!((h.proto.as_str(), h.detail.as_str()), ("udp", ""));
    }

    #[test]
    fn routes_pick_the_longest_prefix() {
        let text =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                    eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                    vethab\t0501F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";
        assert_eq!(
            route_device_in(text, "10.244.1.5".parse().unwrap()).as_deref(),
            Some("vethab")
        );
        assert_eq!(
            route_device_in(text, "10.0.0.7".parse().unwrap()).as_deref(),
            Some("eth0")
        );
        assert_eq!(
            route_device_in(text, "8.8.8.8".parse().unwrap()).as_deref(),
            Some("eth0")
        );
    }

    #[test]
    fn stat_bits_name_the_counters() {
        let bits = (1u64 << Stat::NewFlow as u32) | (1u64 << Stat::RefusedTcp as u32);
        assert_eq!(
            stat_names(bits),
            vec!["new_flow".to_string(), Stat::RefusedTcp.name().to_string()]
        );
        assert_eq!(verdict_name(false, 2), "drop");
        assert_eq!(verdict_name(true, 3), "tx");
    }

    #[test]
    fn sources_default_their_port() {
        assert_eq!(
            parse_src("10.0.0.1").unwrap(),
            "10.0.0.1:40000".parse().unwrap()
        );
        assert_eq!(
            parse_src("10.0.0.1:5").unwrap(),
            "10.0.0.1:5".parse().unwrap()
        );
        assert!(parse_dst("10.0.0.1").is_err());
    }
}
