//! `from_net_xdp` (XDP) and `from_net` (tc ingress): traffic arriving on the node's external
//! devices, i.e. clients outside the node reaching NodePorts, LoadBalancer IPs and externalIPs,
//! and the answers of backends on other nodes to flows this node SNATed.
//!
//! Both hooks run the same code (`Frame`). A flow to a backend on this node is DNATed and goes
//! up the stack to the pod; its answers leave through `to_net`, which restores the frontend.
//! A flow to a backend on another node is DNATed and SNATed to this node (so the answer comes
//! back here), with a source port from `XLB_SNAT_PORTS` whose answer tuple is free, and sent
//! straight out with the next hop from `bpf_fib_lookup`; the answer arrives here, is restored
//! to frontend -> client and sent out the same way. Such packets cannot go up the stack: their
//! source is a local address, which the stack drops as a martian.
//!
//! XDP does everything it can do in place. What it cannot, it hands to the tc program untouched
//! (`XDP_PASS`, counted `xdp_deferred`): refusals (which resize the frame), next hops without a
//! neighbour entry (tc resolves them with `bpf_redirect_neigh`), transmits on devices whose XDP
//! cannot transmit (`DEV_F_XDP_TX`), ICMP errors. So in the XDP modes the agent attaches both.
//! A new flow XDP hands on is set up first (backend, SNAT port, conntrack pair), so tc continues
//! it as an established flow and the backend is chosen once.

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, bpf_redir_neigh, xdp_action},
    helpers::{bpf_get_prandom_u32, bpf_redirect, bpf_redirect_neigh},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    CtKey, CtValue, PortRange, Stat, CT_F_SNAT, CT_REPLY, DEFAULT_SNAT_PORTS, DEV_F_XDP_TX,
    PROTO_SCTP, SVC_FLAG_DROP_NO_LOCAL, SVC_FLAG_NODE_PORT,
};
use network_types::eth::EthHdr;

use crate::{
    conntrack::{self, alive, forward_key, now_ns, reply_key_of, Dir, Reuse, Target},
    fault::Fault,
    frame::Frame,
    from_pod::stale_reason,
    icmp,
    lb::{self, Client},
    maps::{CONNTRACK, DEVICES},
    nat, parse,
    parse::{Packet, Parsed, Skip},
    refuse::refuse,
    stats::bump,
    svcstats::{self, Drop},
};

/// See `lb_common::global_names::SNAT_PORTS`: set by the agent at load time.
#[unsafe(no_mangle)]
static XLB_SNAT_PORTS: PortRange = DEFAULT_SNAT_PORTS;

/// Ports tried for a new SNATed flow before it is dropped as `drop_snat_ports_exhausted`.
const SNAT_TRIES: u32 = 32;

const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

#[xdp]
pub fn from_net_xdp(ctx: XdpContext) -> u32 {
    from_outside(&ctx).unwrap_or_else(Fault::verdict::<XdpContext>) as u32
}

#[classifier]
// Inlined into the program section: no BPF-to-BPF call on every packet.
#[inline(always)]
pub fn from_net(ctx: TcContext) -> i32 {
    from_outside(&ctx).unwrap_or_else(Fault::verdict::<TcContext>)
}

/// The next hop of a packet that must leave the node as it is (not go up the stack).
struct NextHop {
    ifindex: u32,
    /// The gateway (or the destination itself when it is on link), network order.
    via: u32,
    /// MACs to write, valid when `resolved`.
    smac: [u8; 6],
    dmac: [u8; 6],
    /// The neighbour entry exists (else only `bpf_redirect_neigh` can send it).
    resolved: bool,
}

/// What each hook does where they differ: refusing, and sending a packet out.
trait Hook: Frame {
    /// Refuses a new flow to a frontend without endpoints.
    fn refuse_flow(&self, pkt: &Packet) -> Result<i32, Fault>;
    /// Whether this hook can send a packet to `hop` itself. Checked before anything is written,
    /// so XDP can still hand the untouched packet to tc when it cannot.
    fn can_send(&self, hop: &NextHop) -> bool;
    /// Sends the rewritten packet to `hop`.
    fn send(&self, hop: &NextHop) -> Result<i32, Fault>;
}

impl Hook for TcContext {
    #[inline(always)]
    fn refuse_flow(&self, pkt: &Packet) -> Result<i32, Fault> {
        refuse(self, pkt)
    }
    #[inline(always)]
    fn can_send(&self, _hop: &NextHop) -> bool {
        true
    }
    #[inline(always)]
    fn send(&self, hop: &NextHop) -> Result<i32, Fault> {
        if hop.resolved {
            set_macs(self, hop)?;
            // SAFETY: plain helper call; the verdict tells the kernel to redirect.
            return Ok(unsafe { bpf_redirect(hop.ifindex, 0) } as i32);
        }
        let mut nh = bpf_redir_neigh {
            nh_family: u32::from(AF_INET),
            __bindgen_anon_1: aya_ebpf::bindings::bpf_redir_neigh__bindgen_ty_1 {
                ipv4_nh: hop.via,
            },
        };
        // SAFETY: `nh` is a valid struct of the size passed.
        Ok(unsafe {
            bpf_redirect_neigh(
                hop.ifindex,
                &mut nh,
                size_of::<bpf_redir_neigh>() as i32,
                0,
            )
        } as i32)
    }
}

impl Hook for XdpContext {
    #[inline(always)]
    fn refuse_flow(&self, _pkt: &Packet) -> Result<i32, Fault> {
        Ok(defer())
    }
    #[inline(always)]
    fn can_send(&self, hop: &NextHop) -> bool {
        // SAFETY: copied out at once.
        let tx = unsafe { DEVICES.get(&hop.ifindex) }
            .is_some_and(|d| d.flags & DEV_F_XDP_TX != 0);
        hop.resolved && tx
    }
    #[inline(always)]
    fn send(&self, hop: &NextHop) -> Result<i32, Fault> {
        set_macs(self, hop)?;
        if hop.ifindex == Frame::ifindex(self) {
            return Ok(xdp_action::XDP_TX as i32);
        }
        // SAFETY: plain helper call; the verdict tells the kernel to redirect.
        Ok(unsafe { bpf_redirect(hop.ifindex, 0) } as i32)
    }
}

/// XDP hands the untouched packet to the tc program.
#[inline(always)]
fn defer() -> i32 {
    bump(Stat::XdpDeferred);
    xdp_action::XDP_PASS as i32
}

#[inline(always)]
fn set_macs<C: Frame>(ctx: &C, hop: &NextHop) -> Result<(), Fault> {
    let mut eth: EthHdr = ctx.load(0).map_err(|_| Fault::Rewrite)?;
    eth.dst_addr = hop.dmac;
    eth.src_addr = hop.smac;
    ctx.store(0, &eth).map_err(|_| Fault::Rewrite)
}

/// The next hop towards `daddr` for a packet from `saddr` (after translation), or `None` when
/// there is no route (counted and dropped by the caller).
#[inline(always)]
fn next_hop<C: Frame>(ctx: &C, pkt: &Packet, saddr: u32, daddr: u32) -> Option<NextHop> {
    // SAFETY: an all-zero bpf_fib_lookup is a valid input struct.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = pkt.proto;
    p.__bindgen_anon_1.tot_len = pkt.ip_tot_len;
    p.ifindex = ctx.ifindex();
    p.__bindgen_anon_3.ipv4_src = saddr;
    p.__bindgen_anon_4.ipv4_dst = daddr;
    let ret = ctx.fib_lookup(&mut p, 0);
    if ret != BPF_FIB_LKUP_RET_SUCCESS && ret != BPF_FIB_LKUP_RET_NO_NEIGH {
        return None;
    }
    Some(NextHop {
        ifindex: p.ifindex,
        // SAFETY: the lookup wrote the IPv4 member (the next hop) for an AF_INET lookup.
        via: unsafe { p.__bindgen_anon_4.ipv4_dst },
        smac: p.smac,
        dmac: p.dmac,
        resolved: ret == BPF_FIB_LKUP_RET_SUCCESS,
    })
}

/// How a translated packet leaves: up the stack (a local backend) or out to a next hop; or it
/// cannot leave from here: this hook cannot send it (XDP hands it to tc), or there is no route.
enum Exit {
    Stack,
    Out(NextHop),
    Defer,
    NoRoute,
}

/// The way out of a packet about to be rewritten to `saddr -> daddr` (SNATed when `snat`).
#[inline(always)]
fn exit<C: Hook>(ctx: &C, pkt: &Packet, snat: bool, saddr: u32, daddr: u32) -> Exit {
    if !snat {
        return Exit::Stack;
    }
    let Some(hop) = next_hop(ctx, pkt, saddr, daddr) else {
        return Exit::NoRoute;
    };
    if !ctx.can_send(&hop) {
        return Exit::Defer;
    }
    Exit::Out(hop)
}

/// The verdict of a packet that cannot leave from here (left untouched), or `None`.
#[inline(always)]
fn stay<C: Hook>(exit: &Exit) -> Option<i32> {
    match exit {
        Exit::Defer => Some(defer()),
        Exit::NoRoute => {
            bump(Stat::DropNoRoute);
            Some(C::DROP)
        }
        Exit::Stack | Exit::Out(_) => None,
    }
}

#[inline(always)]
fn leave<C: Hook>(ctx: &C, exit: &Exit) -> Result<i32, Fault> {
    match exit {
        Exit::Out(hop) => ctx.send(hop),
        _ => Ok(C::PASS),
    }
}

#[inline(always)]
fn from_outside<C: Hook>(ctx: &C) -> Result<i32, Fault> {
    let pkt = match parse::parse(ctx) {
        Ok(Parsed::L4(pkt)) => pkt,
        Ok(Parsed::IcmpError(outer, quoted)) => {
            if C::XDP {
                return Ok(defer());
            }
            if let Some((src, dst)) = icmp::snat_flow(ctx, &outer, &quoted)? {
                let Some(hop) = next_hop(ctx, &outer, src, dst) else {
                    bump(Stat::DropNoRoute);
                    return Ok(C::DROP);
                };
                return ctx.send(&hop);
            }
            return icmp::from_client(ctx, &outer, &quoted);
        }
        Err(skip) => return Ok(skip.pass::<C>()),
    };
    if pkt.proto == PROTO_SCTP {
        return Ok(C::PASS);
    }
    let key = forward_key(&pkt);
    let mut reason = None;
    // The live entry of a flow that is over on this tuple: a new flow of the same client
    // takes its entries over (`conntrack::create`), as in `from_pod`; every other way out
    // below removes them first (`conntrack::forget`), so no answer is restored to a stale frontend.
    let mut reuse = None;
    if let Some(entry) = CONNTRACK.get_ptr_mut(&key) {
        // SAFETY: a live map value; copied out before any other map operation.
        let ct = unsafe { *entry };
        let now = now_ns();
        if !alive(&ct, now) {
            reason = Some(Stat::CtExpired);
        } else {
            match stale_reason(&pkt, &ct, Client::Outside) {
                None => return established(ctx, &pkt, &key, entry, &ct, now),
                Some(stat) => reason = Some(stat),
            }
        }
        reuse = Some(Reuse { entry, old: ct });
    }
    if in_snat_range(pkt.dport) {
        if let Some(verdict) = snat_reply(ctx, &pkt)? {
            conntrack::forget(&pkt, &reuse);
            return Ok(verdict);
        }
    }
    if !pkt.has_l4 {
        conntrack::forget(&pkt, &reuse);
        return Ok(Skip::Fragment.pass::<C>());
    }
    // Not a frontend: not ours. (Unlike `from_pod`, a bare SYN here does not remove a stale
    // reply entry of its tuple: behind XDP, tc sees the SYN XDP just translated, whose reply
    // entry is the new flow's. `to_client` drops a closed flow's entries when its tuple answers
    // a new connection instead.)
    let Some((master_key, master)) = lb::frontend(&pkt, Client::Outside) else {
        conntrack::forget(&pkt, &reuse);
        return Ok(C::PASS);
    };
    if let Some(stat) = reason {
        bump(stat);
    }
    let id = master.svc_port_id;
    if !lb::source_allowed(&pkt, &master) {
        conntrack::forget(&pkt, &reuse);
        bump(Stat::DropSourceRange);
        svcstats::dropped(id, Drop::SourceRange);
        return Ok(C::DROP);
    }
    if master.count == 0 {
        conntrack::forget(&pkt, &reuse);
        if master.flags & SVC_FLAG_DROP_NO_LOCAL != 0 {
            bump(Stat::DropNoLocalEndpoint);
            svcstats::dropped(id, Drop::NoLocalEndpoint);
            return Ok(C::DROP);
        }
        if !C::XDP {
            // XDP hands the refusal to tc, which counts it.
            svcstats::dropped(id, Drop::Refused);
        }
        return ctx.refuse_flow(&pkt);
    }
    let now = now_ns();
    let selected = lb::select(&pkt, &master_key, &master, now).inspect_err(|_| {
        conntrack::forget(&pkt, &reuse);
        svcstats::dropped(id, Drop::NoBackend);
    })?;
    let mut target = Target {
        backend_id: selected.id,
        addr: selected.addr,
        port: selected.port,
        snat_addr: 0,
        snat_port: 0,
        rev_nat_id: master.rev_nat_id,
        svc_port_id: master.svc_port_id,
        flags: 0,
    };
    if !selected.local {
        let Some(node) = snat_source(ctx, &pkt, master.flags) else {
            conntrack::forget(&pkt, &reuse);
            bump(Stat::DropNoRoute);
            return Ok(C::DROP);
        };
        target.snat_addr = node;
        target.flags = CT_F_SNAT;
    }
    let snat = target.flags & CT_F_SNAT != 0;
    let exit = exit(ctx, &pkt, snat, target.snat_addr, target.addr);
    if matches!(exit, Exit::NoRoute) {
        conntrack::forget(&pkt, &reuse);
        return Ok(stay::<C>(&exit).unwrap_or(C::DROP));
    }
    if snat {
        let Some(port) = snat_port(&pkt, &target, now) else {
            conntrack::forget(&pkt, &reuse);
            bump(Stat::DropSnatPortsExhausted);
            svcstats::dropped(id, Drop::SnatPortsExhausted);
            return Ok(C::DROP);
        };
        target.snat_port = port;
    }
    if !conntrack::create(&pkt, &target, now, reuse.as_ref()) {
        bump(Stat::CtInsertFailed);
    }
    bump(Stat::NewFlow);
    svcstats::new_flow(id);
    if snat {
        bump(Stat::Snat);
    }
    if let Some(verdict) = stay::<C>(&exit) {
        // XDP cannot send it: the flow is set up (so the backend stays the one chosen here and
        // the choice stays uniform), and tc sends this packet as the flow's first (and counts
        // it as an established packet).
        return Ok(verdict);
    }
    svcstats::first_packet(id, pkt.ip_tot_len);
    nat::dnat(ctx, &pkt, target.addr, target.port)?;
    if snat {
        nat::snat(ctx, &pkt, target.snat_addr, target.snat_port)?;
        crate::lastfwd::record(
            &pkt,
            target.snat_addr,
            target.snat_port,
            target.addr,
            target.port,
        );
    } else {
        crate::lastfwd::record(&pkt, pkt.saddr, pkt.sport, target.addr, target.port);
    }
    leave(ctx, &exit)
}

/// A packet of a live flow from outside: DNAT (and SNAT) as its forward entry says.
#[inline(always)]
fn established<C: Hook>(
    ctx: &C,
    pkt: &Packet,
    key: &CtKey,
    entry: *mut CtValue,
    ct: &CtValue,
    now: u64,
) -> Result<i32, Fault> {
    let snat = ct.flags & CT_F_SNAT != 0;
    let exit = exit(ctx, pkt, snat, ct.snat_addr, ct.nat_addr);
    if let Some(verdict) = stay::<C>(&exit) {
        return Ok(verdict);
    }
    if pkt.has_l4 {
        conntrack::update(key, entry, ct, pkt, Dir::Forward, now, pkt.is_syn_only());
    } else {
        bump(Stat::FragmentTranslated);
    }
    bump(Stat::Established);
    svcstats::packet(ct.svc_port_id, pkt.ip_tot_len);
    nat::dnat(ctx, pkt, ct.nat_addr, ct.nat_port)?;
    if snat {
        nat::snat(ctx, pkt, ct.snat_addr, ct.snat_port)?;
        crate::lastfwd::record(pkt, ct.snat_addr, ct.snat_port, ct.nat_addr, ct.nat_port);
    } else {
        crate::lastfwd::record(pkt, pkt.saddr, pkt.sport, ct.nat_addr, ct.nat_port);
    }
    leave(ctx, &exit)
}

/// The answer of a backend on another node to a flow this node SNATed: restore frontend ->
/// client and send it out. `None`: not such an answer.
#[inline(always)]
fn snat_reply<C: Hook>(ctx: &C, pkt: &Packet) -> Result<Option<i32>, Fault> {
    let key = reply_key_of(pkt);
    let Some(entry) = CONNTRACK.get_ptr_mut(&key) else {
        return Ok(None);
    };
    // SAFETY: a live map value; copied out before any other map operation.
    let ct = unsafe { *entry };
    let now = now_ns();
    if ct.flags & CT_F_SNAT == 0 || !alive(&ct, now) {
        return Ok(None);
    }
    let exit = exit(ctx, pkt, true, ct.nat_addr, ct.snat_addr);
    if let Some(verdict) = stay::<C>(&exit) {
        return Ok(Some(verdict));
    }
    if pkt.has_l4 {
        conntrack::update(&key, entry, &ct, pkt, Dir::Reply, now, false);
    } else {
        bump(Stat::FragmentTranslated);
    }
    bump(Stat::Reply);
    nat::snat(ctx, pkt, ct.nat_addr, ct.nat_port)?;
    nat::dnat(ctx, pkt, ct.snat_addr, ct.snat_port)?;
    leave(ctx, &exit).map(Some)
}

#[inline(always)]
fn snat_ports() -> PortRange {
    // SAFETY: a plain read of a load-time constant; volatile so the compiler keeps the load.
    unsafe { core::ptr::read_volatile(&XLB_SNAT_PORTS) }
}

/// Whether a destination port (network order) can be a SNAT port of this node.
#[inline(always)]
fn in_snat_range(dport: u16) -> bool {
    let range = snat_ports();
    let p = u16::from_be(dport);
    p >= range.min && p <= range.max
}

/// The node address a flow to a backend on another node is SNATed to: the NodePort's own
/// address, else the address of the device the packet came in by.
#[inline(always)]
fn snat_source<C: Frame>(ctx: &C, pkt: &Packet, flags: u32) -> Option<u32> {
    if flags & SVC_FLAG_NODE_PORT != 0 {
        return Some(pkt.daddr);
    }
    // SAFETY: copied out at once.
    let dev = unsafe { DEVICES.get(&ctx.ifindex()) }?;
    (dev.addr != 0).then_some(dev.addr)
}

/// A SNAT port (network order) whose answer tuple (backend -> node:port) no live flow holds.
/// Each try is a fresh random port: probing consecutive ports from one random start clusters
/// the taken ones, and at a third of the range in use runs of taken ports longer than the
/// tries appear (measured: drops at ~35% occupancy); independent tries fail only with
/// probability occupancy^tries.
#[inline(always)]
fn snat_port(pkt: &Packet, t: &Target, now: u64) -> Option<u16> {
    let range = snat_ports();
    if range.max < range.min {
        return None;
    }
    let size = u32::from(range.max - range.min) + 1;
    let mut i = 0;
    while i < SNAT_TRIES {
        // SAFETY: no arguments, always callable.
        let port = (u32::from(range.min) + unsafe { bpf_get_prandom_u32() } % size) as u16;
        let key = CtKey {
            saddr: t.addr,
            daddr: t.snat_addr,
            sport: t.port,
            dport: port.to_be(),
            proto: pkt.proto,
            dir: CT_REPLY,
            _pad: 0,
        };
        // SAFETY: copied out at once.
        let taken = unsafe { CONNTRACK.get(&key) }.is_some_and(|v| alive(v, now));
        if !taken {
            return Some(port.to_be());
        }
        i += 1;
    }
    None
}
