//! Socket load balancing: cgroup `sock_addr` hooks that translate a frontend to a backend when a
//! socket connects or sends, so no packet of the flow is ever addressed to the frontend (no
//! conntrack, no per-packet NAT). This is how processes in the node's own network namespace
//! (kubelet probes, hostNetwork pods, the node's tools) reach Services: their packets never
//! cross a pod veth, where `from_pod` runs.
//!
//! - `sock_connect4` (connect(2), TCP and UDP) and `sock_sendmsg4` (sendto / sendmsg with an
//!   address on an unconnected UDP socket): the destination (`user_ip4:user_port`) is looked up
//!   as a frontend with `Client::Pod` semantics (an externalTrafficPolicy Local external
//!   frontend uses every endpoint, as for pods; kube-proxy sends node-originated traffic to the
//!   cluster-wide endpoints too), a backend is selected with `lb::select` (affinity first, then
//!   the frontend's algorithm), the destination is rewritten, and (socket cookie, backend) ->
//!   frontend is recorded in `SOCK_REV`.
//! - `sock_recvmsg4` (recvfrom / recvmsg of UDP) and `sock_getpeername4`: a source / peer that
//!   `SOCK_REV` knows for this socket is shown as the frontend again, so a UDP answer comes from
//!   the Service address and getpeername() returns it.
//! - A frontend without endpoints fails connect() / sendmsg() with ECONNREFUSED at once
//!   (`bpf_set_retval`), as the tc path answers with a RST / port unreachable; so does an
//!   address in the Service CIDR that no Service uses.
//!
//! Which sockets: those of processes in the cgroup the agent attaches to (`--cgroup-path`), and
//! with a non-zero `XLB_HOST_NETNS_COOKIE` (`--socket-lb host`) only those of the node's own
//! network namespace; 0 (`--socket-lb all`) translates pods' sockets too.
//!
//! The client of a socket is not known at connect time (the source address is chosen after the
//! hook, when the socket is not bound). So the client a selection sees is its network namespace:
//! the address `0.a.b.c` (0.0.0.0/8, never a real source), with `a.b.c` the low 24 bits of the
//! namespace cookie. Session affinity is therefore per network namespace (Cilium keys socket-LB
//! affinity by the netns cookie too): every host process shares one affinity entry per Service,
//! as they share the node's address with kube-proxy. The client port an algorithm may hash is the
//! bound port, else 16 bits of the socket cookie (so sockets spread over a Maglev table).
//! loadBalancerSourceRanges need the real source: a frontend with ranges is translated only for
//! a socket bound to an address inside them, and otherwise left to the packet path (from_pod
//! for pods, the network for the host), which sees the real source.
//!
//! An unconnected UDP socket keeps sending to the backend it got while that backend is a member
//! of the frontend (the tc path keeps a UDP flow on its backend the same way): `SOCK_REV` also
//! holds, with `_pad == SOCK_FWD`, (socket cookie, frontend) -> backend id.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use lb_common::{
    MemberKey, ServiceKey, SockRevKey, SockRevValue, Stat, PROTO_TCP, PROTO_UDP, SCOPE_EXT,
    SVC_FLAG_SOURCE_RANGES,
};

use crate::{
    conntrack::now_ns,
    from_pod::in_service_cidr,
    lb::{self, Client},
    maps::{MEMBERS, SERVICES, SOCK_REV},
    parse::Packet,
    stats::bump,
    svcstats::{self, Drop},
};

/// See `lb_common::global_names::HOST_NETNS_COOKIE`: set by the agent at load time.
#[unsafe(no_mangle)]
static XLB_HOST_NETNS_COOKIE: u64 = 0;

/// Return values of sock_addr programs: go on with the (possibly rewritten) call, or fail it
/// (with -EPERM, or the error set by `bpf_set_retval`).
const PROCEED: i32 = 1;
const REJECT: i32 = 0;

const ECONNREFUSED: i32 = 111;
const EAGAIN: i32 = 11;

/// `SockRevKey::_pad` of a forward entry: (socket cookie, frontend) -> backend id in
/// `SockRevValue::addr`. Reverse entries have 0.
const SOCK_FWD: u16 = 1;

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore(&ctx);
    // The only return value the kernel accepts at this hook.
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    restore(&ctx);
    PROCEED
}

/// The fields of the context. Every access is a volatile 4-byte (or pointer-sized) load or
/// store: the verifier accepts only those sizes for `user_port`, `protocol` and `sk`, and the
/// compiler would otherwise narrow a load of which only 16 bits are used.
struct Addr {
    sa: *mut bpf_sock_addr,
}

impl Addr {
    #[inline(always)]
    fn of(ctx: &SockAddrContext) -> Self {
        Addr { sa: ctx.sock_addr }
    }
    /// Destination (connect, sendmsg) or source / peer (recvmsg, getpeername), network order.
    #[inline(always)]
    fn ip(&self) -> u32 {
        // SAFETY: the context pointer the kernel passed; a readable field.
        unsafe { core::ptr::read_volatile(&raw const (*self.sa).user_ip4) }
    }
    /// The port, network order (the low 16 bits of the field as it lies in memory).
    #[inline(always)]
    fn port(&self) -> u16 {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(&raw const (*self.sa).user_port) as u16 }
    }
    #[inline(always)]
    fn protocol(&self) -> u32 {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(&raw const (*self.sa).protocol) }
    }
    #[inline(always)]
    fn set(&self, ip: u32, port: u16) {
        // SAFETY: the kernel lets connect / sendmsg / recvmsg / getpeername programs write both.
        unsafe {
            core::ptr::write_volatile(&raw mut (*self.sa).user_ip4, ip);
            core::ptr::write_volatile(&raw mut (*self.sa).user_port, u32::from(port));
        }
    }
    /// The address and port (network order) the socket is bound to; 0 where it is not.
    #[inline(always)]
    fn bound(&self) -> (u32, u16) {
        // SAFETY: `sk` of a sock_addr context is a valid (non-null) socket pointer, whose
        // `src_ip4` and `src_port` (host order) are readable.
        unsafe {
            let sk = core::ptr::read_volatile(&raw const (*self.sa).__bindgen_anon_1.sk);
            let ip = core::ptr::read_volatile(&raw const (*sk).src_ip4);
            let port = core::ptr::read_volatile(&raw const (*sk).src_port) as u16;
            (ip, port.to_be())
        }
    }
}

/// The network namespace of the socket, or None when it is not one this datapath translates
/// (`--socket-lb host` and another namespace than the node's).
#[inline(always)]
fn netns_cookie(ctx: &SockAddrContext) -> Option<u64> {
    // SAFETY: a sock_addr context is a valid argument of this helper.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: a plain read of a load-time constant; volatile so the compiler keeps the load.
    let host = unsafe { core::ptr::read_volatile(&XLB_HOST_NETNS_COOKIE) };
    (host == 0 || cookie == host).then_some(cookie)
}

/// The client a selection sees for a socket of network namespace `netns`: `0.a.b.c`, where
/// `a.b.c` is the namespace cookie folded to 24 bits (big-endian), in network order.
#[inline(always)]
fn netns_client(netns: u64) -> u32 {
    let low = (netns ^ (netns >> 24) ^ (netns >> 48)) as u32 & 0x00ff_ffff;
    low.to_be()
}

/// Fails the call with `-errno` (the program returns [`REJECT`]).
#[inline(always)]
fn fail(errno: i32) -> i32 {
    // SAFETY: plain helper call, allowed at connect and sendmsg hooks.
    unsafe { bpf_set_retval(-errno) };
    REJECT
}

/// connect4 / sendmsg4: a frontend becomes a backend.
#[inline(always)]
fn translate(ctx: &SockAddrContext) -> i32 {
    let Some(netns) = netns_cookie(ctx) else {
        return PROCEED;
    };
    let addr = Addr::of(ctx);
    let proto = addr.protocol();
    if proto != u32::from(PROTO_TCP) && proto != u32::from(PROTO_UDP) {
        return PROCEED;
    }
    let (bound_ip, bound_port) = addr.bound();
    let mut pkt = Packet {
        ip_hlen: 0,
        ip_tot_len: 0,
        l4_off: 0,
        proto: proto as u8,
        saddr: bound_ip,
        daddr: addr.ip(),
        sport: bound_port,
        dport: addr.port(),
        tcp_flags: 0,
        tcp_hlen: 0,
        has_l4: true,
        direct: false,
    };
    let Some((master_key, master)) = lb::frontend(&pkt, Client::Pod) else {
        // An unallocated Service address fails at once, as on the tc path.
        if in_service_cidr(pkt.daddr) {
            bump(Stat::SockRefused);
            return fail(ECONNREFUSED);
        }
        return PROCEED;
    };
    if master.flags & SVC_FLAG_SOURCE_RANGES != 0
        && (bound_ip == 0 || !lb::source_allowed(&pkt, &master))
    {
        // The real source is known only to the packet path: leave the socket to it.
        return PROCEED;
    }
    if master.count == 0 {
        bump(Stat::SockRefused);
        svcstats::dropped(master.svc_port_id, Drop::Refused);
        return fail(ECONNREFUSED);
    }
    // SAFETY: a sock_addr context is a valid argument of this helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let fwd_key = SockRevKey {
        cookie,
        addr: pkt.daddr,
        port: pkt.dport,
        _pad: SOCK_FWD,
    };
    let udp = pkt.proto == PROTO_UDP;
    let kept = if udp {
        kept_backend(&fwd_key, &master_key)
    } else {
        None
    };
    let (backend_addr, backend_port) = match kept {
        Some(b) => b,
        None => {
            // The selection's client is the namespace; its port the bound one, else 16 bits of
            // the socket cookie.
            pkt.saddr = netns_client(netns);
            if pkt.sport == 0 {
                pkt.sport = (cookie ^ (cookie >> 16) ^ (cookie >> 32) ^ (cookie >> 48)) as u16;
            }
            let Ok(selected) = lb::select(&pkt, &master_key, &master, now_ns()) else {
                // A slot or backend vanished mid-update: the caller may retry at once.
                bump(Stat::DropNoBackend);
                svcstats::dropped(master.svc_port_id, Drop::NoBackend);
                return fail(EAGAIN);
            };
            // A socket-LB flow: counted once per selection (its packets bypass the tc path).
            svcstats::new_flow(master.svc_port_id);
            if udp {
                let id = SockRevValue {
                    addr: selected.id,
                    port: 0,
                    _pad: 0,
                };
                // Losing it only moves the socket's next datagram to a fresh selection.
                let _ = SOCK_REV.insert(&fwd_key, &id, 0);
            }
            (selected.addr, selected.port)
        }
    };
    let rev_key = SockRevKey {
        cookie,
        addr: backend_addr,
        port: backend_port,
        _pad: 0,
    };
    let frontend = SockRevValue {
        addr: pkt.daddr,
        port: pkt.dport,
        _pad: 0,
    };
    if SOCK_REV.insert(&rev_key, &frontend, 0).is_err() {
        bump(Stat::SockRevInsertFailed);
    }
    addr.set(backend_addr, backend_port);
    bump(Stat::SockTranslated);
    PROCEED
}

/// The backend an unconnected UDP socket sent this frontend to before, while it is a member.
#[inline(always)]
fn kept_backend(fwd_key: &SockRevKey, master_key: &ServiceKey) -> Option<(u32, u16)> {
    // SAFETY: copied out at once.
    let id = unsafe { SOCK_REV.get(fwd_key)? }.addr;
    // SAFETY: copied out at once.
    let member = unsafe { *MEMBERS.get(&MemberKey::of(master_key, id))? };
    Some((member.addr, member.port))
}

/// recvmsg4 / getpeername4: a backend this socket was sent to shows as the frontend, while that
/// frontend exists.
#[inline(always)]
fn restore(ctx: &SockAddrContext) {
    if netns_cookie(ctx).is_none() {
        return;
    }
    let addr = Addr::of(ctx);
    // SAFETY: a sock_addr context is a valid argument of this helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevKey {
        cookie,
        addr: addr.ip(),
        port: addr.port(),
        _pad: 0,
    };
    // SAFETY: copied out at once.
    let Some(frontend) = (unsafe { SOCK_REV.get(&key) }).copied() else {
        return;
    };
    let proto = addr.protocol() as u8;
    let master_key = ServiceKey::new(frontend.addr, frontend.port, proto, SCOPE_EXT, 0);
    // SAFETY: only presence is checked.
    if unsafe { SERVICES.get(&master_key) }.is_none() {
        // The Service is gone: the socket's peer is the backend again.
        let _ = SOCK_REV.remove(&key);
        return;
    }
    addr.set(frontend.addr, frontend.port);
    bump(Stat::SockRevTranslated);
}
