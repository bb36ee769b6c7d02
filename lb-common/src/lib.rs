//! Map keys and values shared by the xlb eBPF programs (`lb-ebpf`) and userspace.
//!
//! Every type here is `#[repr(C)]` with explicit padding fields, so the kernel and user side agree
//! byte for byte and `aya::Pod` is sound (no implicit padding). Addresses and ports are stored in
//! **network byte order**, exactly as they appear in packets, so the datapath never converts:
//! an IPv4 address is `u32::from_ne_bytes(ip.octets())`, a port is `port.to_be()`. Use the
//! helpers [`ip4`] / [`port`] / [`ip4_from`] / [`port_from`] on the user side.
//!
//! The layout follows Cilium's `bpf/lib/lb.h`: a Service frontend has a master entry (slot 0)
//! holding the backend count and flags, and slots `1..=count` holding backend ids, so an endpoint
//! change rewrites one slot instead of the whole Service.
#![no_std]

/// IP protocol numbers used in keys.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// Names of the maps, as declared in lb-ebpf and pinned under `--pin-path`.
/// Bump the suffix of a name whenever its key or value layout changes, so an upgraded agent
/// finds no incompatible pin under the same name (Cilium's `_v2` practice).
pub mod map_names {
    pub const SERVICES: &str = "XLB_SVC_V1";
    pub const BACKENDS: &str = "XLB_BE_V1";
    pub const REV_NAT: &str = "XLB_RNAT_V1";
    pub const CONNTRACK: &str = "XLB_CT_V1";
    pub const STATS: &str = "XLB_STATS_V1";
    pub const AFFINITY: &str = "XLB_AFF_V1";
    pub const ALL: [&str; 6] = [SERVICES, BACKENDS, REV_NAT, CONNTRACK, STATS, AFFINITY];
}

/// Names of the programs in the eBPF object.
pub mod prog_names {
    pub const FROM_POD: &str = "from_pod";
    pub const TO_POD: &str = "to_pod";
    /// Do-nothing programs, for benchmark floors only.
    pub const NOOP_TC: &str = "noop_tc";
    pub const NOOP_XDP: &str = "noop_xdp";
}

/// Load-time globals of the eBPF object (set with `EbpfLoader::override_global`).
pub mod global_names {
    /// Service CIDR address and mask (network byte order); mask 0 disables. A packet to an
    /// address in it that matches no frontend is refused (kube-proxy's nftables mode rejects
    /// traffic to unallocated ClusterIPs the same way), so a deleted Service fails fast.
    pub const SERVICE_CIDR_ADDR: &str = "XLB_SERVICE_CIDR_ADDR";
    pub const SERVICE_CIDR_MASK: &str = "XLB_SERVICE_CIDR_MASK";
}

/// Default map capacities (overridable by the agent at load time).
pub const DEFAULT_SERVICES_MAX: u32 = 262_144;
pub const DEFAULT_BACKENDS_MAX: u32 = 262_144;
pub const DEFAULT_REV_NAT_MAX: u32 = 131_072;
pub const DEFAULT_CONNTRACK_MAX: u32 = 262_144;
pub const DEFAULT_AFFINITY_MAX: u32 = 65_536;

/// Scope of a frontend entry. Only `SCOPE_EXT` is used until traffic policy Local splits a
/// Service into an external and an internal backend set.
pub const SCOPE_EXT: u8 = 0;
pub const SCOPE_INT: u8 = 1;

/// Key of `SERVICES`: one frontend (addr, port, proto, scope) and a slot.
/// Slot 0 is the master entry, slots `1..=count` hold backend ids.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Frontend IPv4 address, network byte order.
    pub addr: u32,
    /// Frontend port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
    pub slot: u16,
    pub _pad: u16,
}

impl ServiceKey {
    pub const fn new(addr: u32, port: u16, proto: u8, scope: u8, slot: u16) -> Self {
        Self { addr, port, proto, scope, slot, _pad: 0 }
    }
    /// The same frontend with another slot.
    pub const fn with_slot(self, slot: u16) -> Self {
        Self { slot, ..self }
    }
}

/// The Service is a ClusterIP frontend (other kinds come with NodePort / LB / externalIP).
pub const SVC_FLAG_CLUSTER_IP: u32 = 1 << 0;
pub const SVC_FLAG_NODE_PORT: u32 = 1 << 1;
pub const SVC_FLAG_LOAD_BALANCER: u32 = 1 << 2;
pub const SVC_FLAG_EXTERNAL_IP: u32 = 1 << 3;
/// externalTrafficPolicy / internalTrafficPolicy Local.
pub const SVC_FLAG_EXT_LOCAL: u32 = 1 << 4;
pub const SVC_FLAG_INT_LOCAL: u32 = 1 << 5;
/// sessionAffinity: ClientIP.
pub const SVC_FLAG_AFFINITY: u32 = 1 << 6;
/// The slots hold serving+terminating endpoints because no ready endpoint exists.
pub const SVC_FLAG_TERMINATING_FALLBACK: u32 = 1 << 7;

/// Value of `SERVICES`. For the master (slot 0): `count`, `rev_nat_id`, `flags`,
/// `affinity_timeout`; `backend_id` is 0. For a slot: only `backend_id`.
/// A master with `count == 0` means "Service without endpoints": refuse new flows at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceValue {
    pub backend_id: u32,
    pub count: u32,
    pub rev_nat_id: u32,
    pub flags: u32,
    /// Session affinity timeout in seconds (sessionAffinity ClientIP).
    pub affinity_timeout: u32,
}

/// Backend state: selectable for new flows.
pub const BACKEND_ACTIVE: u8 = 0;
/// Serving but terminating: only used when a Service has no ready endpoint.
pub const BACKEND_TERMINATING: u8 = 1;

/// Value of `BACKENDS` (key: backend id, `u32`). Ids are stable for an (addr, port, proto).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Backend {
    /// Backend IPv4 address, network byte order.
    pub addr: u32,
    /// Backend port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub state: u8,
}

/// Value of `REV_NAT` (key: rev-NAT id, `u32`): the frontend to restore on replies.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RevNat {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Direction of a conntrack entry.
/// `CT_FORWARD`: key is the client's original tuple (client -> frontend); value's `nat_*` is the backend.
pub const CT_FORWARD: u8 = 0;
/// `CT_REPLY`: key is the reply tuple (backend -> client); value's `nat_*` is the frontend.
pub const CT_REPLY: u8 = 1;

/// Key of `CONNTRACK` (LRU hash): a full 5-tuple plus direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    pub _pad: u16,
}

/// TCP flags seen on a flow (`CtValue::flags`).
pub const CT_SEEN_SYN: u8 = 1 << 0;
pub const CT_SEEN_FIN: u8 = 1 << 1;
pub const CT_SEEN_RST: u8 = 1 << 2;

/// Value of `CONNTRACK`.
///
/// The forward entry stores the backend address itself, not only its id: an established TCP flow
/// is translated with this one lookup, and keeps its backend even after the endpoint left the
/// Service (kube-proxy keeps conntrack entries of removed TCP endpoints too). UDP flows check the
/// backend id is still in `BACKENDS` and are re-selected at once when it is gone, so DNS over UDP
/// does not blackhole.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtValue {
    pub backend_id: u32,
    /// Forward: backend address. Reply: frontend address. Network byte order.
    pub nat_addr: u32,
    /// Forward: backend port. Reply: frontend port. Network byte order.
    pub nat_port: u16,
    pub flags: u8,
    pub _pad: u8,
    pub rev_nat_id: u32,
    /// bpf_ktime_get_ns() of the last refresh (refreshed at most once a second).
    pub last_seen_ns: u64,
}

/// Key of `AFFINITY` (LRU hash): sessionAffinity ClientIP is per (client address, Service port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey {
    /// Client IPv4 address, network byte order.
    pub client: u32,
    pub rev_nat_id: u32,
}

/// Value of `AFFINITY`: the backend chosen for that client, and when it was last used.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    /// bpf_ktime_get_ns() of the last new flow that used it.
    pub last_used_ns: u64,
}

/// Index of the per-CPU `STATS` array: one counter per verdict / reason.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// A new flow to a frontend got a backend and was translated.
    NewFlow = 0,
    /// A packet of an established flow was translated (conntrack hit).
    Established = 1,
    /// A reply was reverse-translated back to the frontend address.
    Reply = 2,
    /// A TCP packet to a Service without endpoints was answered with a RST.
    RefusedTcp = 3,
    /// A UDP packet to a Service without endpoints was answered with ICMP port unreachable.
    RefusedUdp = 4,
    /// Passed untouched: truncated or malformed headers.
    PassMalformed = 5,
    /// Passed untouched: IPv4 fragment (not yet followed).
    PassFragment = 6,
    /// Dropped: slot or backend missing while the master said it exists (transient during an update).
    DropNoBackend = 7,
    /// Conntrack insert failed (the flow is still translated, but not pinned to its backend).
    CtInsertFailed = 8,
    /// A UDP flow's backend disappeared, so the flow was re-selected.
    Reselected = 9,
    /// A checksum / packet rewrite helper failed; the packet was dropped.
    DropRewriteFailed = 10,
    /// A packet to a frontend of an unsupported protocol (e.g. ICMP echo) passed untouched.
    PassOtherProto = 11,
}

pub const STAT_COUNT: u32 = 12;

impl Stat {
    pub const ALL: [Stat; STAT_COUNT as usize] = [
        Stat::NewFlow,
        Stat::Established,
        Stat::Reply,
        Stat::RefusedTcp,
        Stat::RefusedUdp,
        Stat::PassMalformed,
        Stat::PassFragment,
        Stat::DropNoBackend,
        Stat::CtInsertFailed,
        Stat::Reselected,
        Stat::DropRewriteFailed,
        Stat::PassOtherProto,
    ];
    /// Stable snake_case name, used for metrics labels and `xlb inspect stats`.
    pub const fn name(self) -> &'static str {
        match self {
            Stat::NewFlow => "new_flow",
            Stat::Established => "established",
            Stat::Reply => "reply",
            Stat::RefusedTcp => "refused_tcp",
            Stat::RefusedUdp => "refused_udp",
            Stat::PassMalformed => "pass_malformed",
            Stat::PassFragment => "pass_fragment",
            Stat::DropNoBackend => "drop_no_backend",
            Stat::CtInsertFailed => "ct_insert_failed",
            Stat::Reselected => "reselected",
            Stat::DropRewriteFailed => "drop_rewrite_failed",
            Stat::PassOtherProto => "pass_other_proto",
        }
    }
}

/// Network-order u32 of an IPv4 address given as octets.
#[inline(always)]
pub const fn ip4(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}
/// Octets of a network-order u32 address.
#[inline(always)]
pub const fn ip4_from(addr: u32) -> [u8; 4] {
    addr.to_ne_bytes()
}
/// Network-order port.
#[inline(always)]
pub const fn port(p: u16) -> u16 {
    p.to_be()
}
/// Host-order port from a network-order one.
#[inline(always)]
pub const fn port_from(p: u16) -> u16 {
    u16::from_be(p)
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all types are #[repr(C)], Copy, and have no implicit padding (checked by the
    // size assertions below), so any byte pattern read from a map is a valid value.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for RevNat {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
}

// Layout guards: a change here is an ABI change with the kernel side (bump map names).
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 12);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 20);
const _: () = assert!(core::mem::size_of::<Backend>() == 8);
const _: () = assert!(core::mem::size_of::<RevNat>() == 8);
const _: () = assert!(core::mem::size_of::<CtKey>() == 16);
const _: () = assert!(core::mem::size_of::<CtValue>() == 24);
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 8);
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);
