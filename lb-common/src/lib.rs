//! Map keys and values shared by the xlb eBPF programs (`lb-ebpf`) and userspace.
//!
//! Every type here is `#[repr(C)]` with explicit padding fields, so the kernel and user side agree
//! byte for byte; `bytemuck`'s derived `Pod` proves there is no implicit padding, which makes the
//! `aya::Pod` implementations sound. Addresses and ports are stored in
//! **network byte order**, exactly as they appear in packets, so the datapath never converts:
//! an IPv4 address is `u32::from_ne_bytes(ip.octets())`, a port is `port.to_be()`. Use the
//! helpers [`ip4`] / [`port`] / [`ip4_from`] / [`port_from`] on the user side.
//!
//! The layout follows Cilium's `bpf/lib/lb.h`: a Service frontend has a master entry (slot 0)
//! holding the backend count and flags, and slots `1..=count` holding backend ids, so an endpoint
//! change rewrites one slot instead of the whole Service.
#![cfg_attr(not(test), no_std)]

use bytemuck::{Pod, Zeroable};

/// IP protocol numbers used in keys.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

pub mod csum;

/// Names of the maps, as declared in lb-ebpf and pinned under `--pin-path`.
/// Bump the suffix of a name whenever its key or value layout changes, so an upgraded agent
/// finds no incompatible pin under the same name (Cilium's `_v2` practice).
pub mod map_names {
    /// V2: the value ends with `svc_port_id` (the master's Service port, [`crate::SvcName`]);
    /// a V1 value is the first 20 bytes of a V2 one.
    pub const SERVICES: &str = "XLB_SVC_V2";
    pub const BACKENDS: &str = "XLB_BE_V1";
    /// V3: the value also carries a second address and port (the SNAT of a flow from outside
    /// the node to a backend on another node). V2: a state and an expiry.
    pub const CONNTRACK: &str = "XLB_CT_V3";
    /// V3: room for [`crate::STATS_SLOTS`] counters, so a new counter needs no new map.
    pub const STATS: &str = "XLB_STATS_V3";
    pub const AFFINITY: &str = "XLB_AFF_V1";
    /// (frontend, backend id) -> backend address: which backends are members of which frontend.
    pub const MEMBERS: &str = "XLB_MEMBER_V1";
    /// (src, dst, IP id, proto) of a fragmented datagram -> its L4 ports.
    pub const FRAGS: &str = "XLB_FRAG_V1";
    /// LPM trie: (frontend, client CIDR) of `loadBalancerSourceRanges`.
    pub const SRC_RANGES: &str = "XLB_SRCRANGE_V1";
    /// ifindex of an external device -> its node address (the SNAT source).
    pub const DEVICES: &str = "XLB_DEV_V1";
    /// Array of `u32` backend ids: the Maglev tables, `XLB_MAGLEV_M` entries each; table `t`
    /// is entries `t * M .. (t + 1) * M`. A master with `SVC_FLAG_MAGLEV` names its table.
    pub const MAGLEV: &str = "XLB_MAGLEV_V1";
    /// Per-CPU LRU hash: rev-NAT id -> `u32` round-robin counter of that frontend.
    pub const RR: &str = "XLB_RR_V1";
    /// LRU hash: (socket cookie, backend) -> frontend, written by the connect / sendmsg socket
    /// hooks so recvmsg and getpeername show the Service address.
    pub const SOCK_REV: &str = "XLB_SOCKREV_V1";
    /// Array of [`crate::FEFILTER_MAP_WORDS`] `u64`, two pre-filters in one map:
    /// - words `0..FEFILTER_WORDS`, the frontend pre-filter: one bit per
    ///   [`crate::fefilter_bit`] of an address. A set bit: the address may be a frontend (or a
    ///   live flow's original destination) outside the Service CIDR; clear: it is neither, and a
    ///   packet to it outside the Service CIDR passes without a map lookup;
    /// - words [`crate::PORTFILTER_OFFSET`]`..`, the reply pre-filter: bit `port` (host order)
    ///   of every backend port. Every reply entry of conntrack has a backend's port as its
    ///   source port, so a packet whose source port's bit is clear cannot be an answer of a
    ///   translated flow and passes the answer paths without a conntrack lookup.
    ///
    /// Bits are set before a master (address) or a member (port) that needs them is written
    /// and cleared only by the agent's sweep; pinned, so a restarted agent keeps them. V2: the
    /// reply half (V1 had the frontend half only).
    pub const FEFILTER: &str = "XLB_FEFILTER_V2";
    /// Hash: Service port id (`u32`, [`crate::ServiceValue::svc_port_id`]) ->
    /// [`crate::SvcName`]. Written by the agent before a master names the id; pinned, so
    /// `xlb inspect` shows names while the agent is down. Never read by the datapath.
    pub const SVCNAME: &str = "XLB_SVCNAME_V1";
    /// Per-CPU array of [`crate::SvcStats`], [`crate::DEFAULT_SVC_PORTS_MAX`] + 1 entries,
    /// index: Service port id (0 collects flows of frontends without an id).
    pub const SVCSTATS: &str = "XLB_SVCSTATS_V1";
    pub const ALL: [&str; 15] = [
        SERVICES, BACKENDS, CONNTRACK, STATS, AFFINITY, MEMBERS, FRAGS, SRC_RANGES, DEVICES,
        MAGLEV, RR, SOCK_REV, FEFILTER, SVCNAME, SVCSTATS,
    ];
    /// Per-CPU array of one [`crate::TraceRecord`]: what a packet run by `xlb trace` (global
    /// `XLB_DRY_RUN` = 1) did. Written only in dry run; deliberately not in [`ALL`]: never
    /// pinned, so each trace gets a private, zeroed record.
    pub const TRACE: &str = "XLB_TRACE";
    /// Per-CPU array of one [`crate::CtKey`]: the tuple of the last packet this CPU
    /// translated towards a backend (`from_pod`, `from_net`), so `to_pod` / `to_net` can pass
    /// that packet without a reply lookup. A cache of the moment: not in [`ALL`], never
    /// pinned, each loaded object has its own.
    pub const LAST_FWD: &str = "XLB_LASTFWD";
    /// Per-CPU array of one [`crate::ClockCache`]: the coarse clock as it was read at the
    /// current jiffy (see `lb-ebpf/src/conntrack.rs` `now_ns`). Not in [`ALL`], never pinned.
    pub const CLOCK: &str = "XLB_CLOCK";
}

/// Names of the programs in the eBPF object.
pub mod prog_names {
    pub const FROM_POD: &str = "from_pod";
    pub const TO_POD: &str = "to_pod";
    /// Traffic from outside the node: native/generic XDP on the external devices.
    pub const FROM_NET_XDP: &str = "from_net_xdp";
    /// The same at tc ingress: for devices without XDP (`--xdp-mode off`), and, next to XDP, for
    /// what XDP hands over (refusals, a next hop without a neighbour entry, ICMP errors).
    pub const FROM_NET: &str = "from_net";
    /// tc egress on the external devices: answers of local backends to clients outside.
    pub const TO_NET: &str = "to_net";
    /// Socket load balancing (cgroup sock_addr hooks): clients in the node's own network
    /// namespace (and with `--socket-lb all`, pods) get the backend at connect / sendmsg time.
    pub const SOCK_CONNECT4: &str = "sock_connect4";
    pub const SOCK_SENDMSG4: &str = "sock_sendmsg4";
    pub const SOCK_RECVMSG4: &str = "sock_recvmsg4";
    pub const SOCK_GETPEERNAME4: &str = "sock_getpeername4";
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
    /// Conntrack lifetimes, a [`crate::CtTimeouts`].
    pub const CT_TIMEOUTS: &str = "XLB_CT_TIMEOUTS";
    /// SNAT source ports for flows from outside to a backend on another node, a
    /// [`crate::PortRange`] (host order, inclusive).
    pub const SNAT_PORTS: &str = "XLB_SNAT_PORTS";
    /// Entries per Maglev table (`u32`, a prime; default [`crate::DEFAULT_MAGLEV_M`]).
    pub const MAGLEV_M: &str = "XLB_MAGLEV_M";
    /// `--socket-lb host`: the network-namespace cookie of the node's own namespace (`u64`);
    /// the socket hooks translate only sockets of that namespace. 0 (`all`): every socket.
    pub const HOST_NETNS_COOKIE: &str = "XLB_HOST_NETNS_COOKIE";
    /// `u32`: 1 when the agent maintains [`crate::map_names::FEFILTER`] (both halves), so the
    /// datapath may trust a clear bit; 0 (the object's default): the filters are not consulted.
    pub const FEFILTER_ON: &str = "XLB_FEFILTER_ON";
    /// `u32`: 1 in the copy of the object `xlb trace` loads to run a packet through with
    /// BPF_PROG_TEST_RUN: the programs read every map but write none (no conntrack, affinity,
    /// round-robin, fragment or counter update). 0 (the object's default, the attached
    /// programs): the verifier sees a constant and drops the dry-run branches.
    pub const DRY_RUN: &str = "XLB_DRY_RUN";
}

/// Words (`u64`) of the frontend pre-filter [`map_names::FEFILTER`]: 65536 bits.
pub const FEFILTER_WORDS: u32 = 1024;
/// First word of the reply pre-filter in [`map_names::FEFILTER`]: 1024 words, bit `port` (host
/// order) of each port, `port / 64` its word, `port % 64` its bit.
pub const PORTFILTER_OFFSET: u32 = FEFILTER_WORDS;
/// Words of the reply pre-filter: one bit per port.
pub const PORTFILTER_WORDS: u32 = 65536 / 64;
/// Length of the [`map_names::FEFILTER`] array: both pre-filters.
pub const FEFILTER_MAP_WORDS: u32 = FEFILTER_WORDS + PORTFILTER_WORDS;

/// The pre-filter bit (`0..FEFILTER_WORDS * 64`) of an IPv4 address given as it sits in a
/// packet or a map key (`addr_be`: the network-order bytes read as a native `u32`, e.g.
/// `u32::from_ne_bytes(ip.octets())`). A fold of the high half into the low half, then a
/// multiplicative mix whose top 16 bits are the bit: the addresses of one subnet (which differ
/// in their last octets) spread over the whole filter.
/// The word is `bit / 64`, the bit in it `bit % 64`. One definition for the datapath and the
/// agent.
#[inline(always)]
pub const fn fefilter_bit(addr_be: u32) -> u32 {
    (addr_be ^ (addr_be >> 16)).wrapping_mul(0x9E37_79B1) >> 16
}

/// An inclusive range of ports, host byte order (a load-time global).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

/// Default SNAT port range: above Linux's default ephemeral range (32768-60999), so the node's
/// own connections never take a port the datapath hands out.
pub const DEFAULT_SNAT_PORTS: PortRange = PortRange { min: 61_000, max: 65_535 };

impl Default for PortRange {
    fn default() -> Self {
        DEFAULT_SNAT_PORTS
    }
}

/// The link-local address a hairpin flow (a pod reaching itself through a Service) is SNATed to,
/// so the pod sees a peer other than itself and its replies come back to the datapath. Cilium
/// uses the same address (`IPV4_LOOPBACK`); kube-proxy masquerades to the node address instead.
pub const HAIRPIN_ADDR: [u8; 4] = [169, 254, 42, 1];

/// Default map capacities (overridable by the agent at load time).
pub const DEFAULT_SERVICES_MAX: u32 = 262_144;
pub const DEFAULT_BACKENDS_MAX: u32 = 262_144;
pub const DEFAULT_CONNTRACK_MAX: u32 = 262_144;
pub const DEFAULT_AFFINITY_MAX: u32 = 65_536;
pub const DEFAULT_MEMBERS_MAX: u32 = 262_144;
pub const DEFAULT_FRAGS_MAX: u32 = 8_192;
pub const DEFAULT_SRC_RANGES_MAX: u32 = 16_384;
pub const DEFAULT_DEVICES_MAX: u32 = 64;
/// Maglev table size: a prime (Maglev's M); 65537 suits Services with hundreds of backends.
pub const DEFAULT_MAGLEV_M: u32 = 16_381;
/// Maglev tables the MAGLEV array has room for (each `M * 4` bytes).
pub const DEFAULT_MAGLEV_TABLES: u32 = 128;
pub const DEFAULT_RR_MAX: u32 = 65_536;
pub const DEFAULT_SOCK_REV_MAX: u32 = 262_144;
/// Service ports (namespace, name, port name) that can have an id (`--service-ports-max`):
/// the entries of [`map_names::SVCNAME`] and, plus one, of [`map_names::SVCSTATS`]. Ids must
/// fit the `u16` [`CtValue::svc_port_id`], so the flag is capped at [`SVC_PORTS_LIMIT`].
pub const DEFAULT_SVC_PORTS_MAX: u32 = 16_384;
/// The largest `--service-ports-max` (ids are `u16` in conntrack entries).
pub const SVC_PORTS_LIMIT: u32 = u16::MAX as u32;

/// Bytes of [`SvcName::namespace`] / [`SvcName::name`] (Kubernetes names are at most 63) and
/// [`SvcName::port_name`] (an IANA service name, at most 15).
pub const SVC_NAME_LEN: usize = 64;
pub const SVC_PORT_NAME_LEN: usize = 32;

/// Value of [`map_names::SVCNAME`]: the Service port an id stands for, NUL-padded UTF-8.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SvcName {
    pub namespace: [u8; SVC_NAME_LEN],
    pub name: [u8; SVC_NAME_LEN],
    /// Empty for a Service's only, unnamed port.
    pub port_name: [u8; SVC_PORT_NAME_LEN],
}

impl Default for SvcName {
    fn default() -> Self {
        Zeroable::zeroed()
    }
}

/// Value of [`map_names::SVCSTATS`] (per CPU; userspace sums the CPUs): what the datapath did
/// with the packets of one Service port's frontends. Counted in the forward direction only
/// (client -> frontend). A packet is counted once, whichever path (XDP or tc) translated it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Pod, Zeroable)]
pub struct SvcStats {
    /// New flows given a backend (a conntrack pair written, or a flow without one).
    pub new_flows: u64,
    /// Translated packets (the first of a flow and established ones).
    pub packets: u64,
    /// Bytes of those packets (the IP datagram, header included).
    pub bytes: u64,
    /// New flows refused: the Service port has no endpoints (TCP RST / ICMP unreachable, or
    /// a socket call failed with ECONNREFUSED).
    pub refused_no_endpoints: u64,
    /// Dropped: externalTrafficPolicy Local and no endpoint on this node.
    pub dropped_no_local_endpoint: u64,
    /// Dropped: the client is outside the loadBalancerSourceRanges.
    pub dropped_source_range: u64,
    /// Dropped (or, at the socket hooks, failed with EAGAIN): a slot or backend vanished
    /// mid-update.
    pub dropped_no_backend: u64,
    /// Dropped: no free SNAT port for a flow to a backend on another node.
    pub dropped_snat_ports_exhausted: u64,
}

impl SvcStats {
    /// `self + o`, field by field (wrapping): summing the CPUs' slots.
    pub const fn plus(&self, o: &SvcStats) -> SvcStats {
        SvcStats {
            new_flows: self.new_flows.wrapping_add(o.new_flows),
            packets: self.packets.wrapping_add(o.packets),
            bytes: self.bytes.wrapping_add(o.bytes),
            refused_no_endpoints: self.refused_no_endpoints.wrapping_add(o.refused_no_endpoints),
            dropped_no_local_endpoint: self
                .dropped_no_local_endpoint
                .wrapping_add(o.dropped_no_local_endpoint),
            dropped_source_range: self.dropped_source_range.wrapping_add(o.dropped_source_range),
            dropped_no_backend: self.dropped_no_backend.wrapping_add(o.dropped_no_backend),
            dropped_snat_ports_exhausted: self
                .dropped_snat_ports_exhausted
                .wrapping_add(o.dropped_snat_ports_exhausted),
        }
    }
}

/// Value of [`map_names::CLOCK`]: `CLOCK_MONOTONIC_COARSE` in ns as one program run read it,
/// and the jiffy it was read in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ClockCache {
    pub jiffies: u64,
    pub ns: u64,
}

/// Value of [`map_names::TRACE`]: what one dry-run packet did (`xlb trace`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Pod, Zeroable)]
pub struct TraceRecord {
    /// Bit `s` set: the run counted [`Stat`] `s` (in dry run `stats::bump` lands here, not
    /// in `STATS`): the reasons behind the verdict.
    pub stats: u64,
    /// The conntrack entry the packet followed ([`TRACE_FLOW_EXISTING`]) or the forward entry
    /// it would have created ([`TRACE_FLOW_NEW`]): backend, rev-NAT id, Service port id.
    pub flow: CtValue,
    /// `TRACE_FLOW_*`.
    pub flow_kind: u32,
    /// `CT_FORWARD` / `CT_REPLY`: which entry `flow` is.
    pub flow_dir: u32,
}

/// [`TraceRecord::flow_kind`]: no flow was looked up or set up.
pub const TRACE_FLOW_NONE: u32 = 0;
/// A new flow: `flow` is the forward entry the packet would have written.
pub const TRACE_FLOW_NEW: u32 = 1;
/// A live conntrack entry carried the packet: `flow` is that entry.
pub const TRACE_FLOW_EXISTING: u32 = 2;

/// Scope of a frontend entry. `SCOPE_EXT` holds every frontend. An external frontend (NodePort,
/// LoadBalancer, externalIP) of an externalTrafficPolicy Local Service has a second entry with
/// `SCOPE_INT` (its master flagged [`SVC_FLAG_TWO_SCOPES`]): the node-local backends serve
/// clients from outside (`SCOPE_EXT`), every backend serves pods (`SCOPE_INT`), as kube-proxy does.
pub const SCOPE_EXT: u8 = 0;
pub const SCOPE_INT: u8 = 1;

/// Key of `SERVICES`: one frontend (addr, port, proto, scope) and a slot.
/// Slot 0 is the master entry, slots `1..=count` hold backend ids.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
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
/// On a `SCOPE_EXT` master: pods use the `SCOPE_INT` entry of the same frontend.
pub const SVC_FLAG_TWO_SCOPES: u32 = 1 << 8;
/// loadBalancerSourceRanges: new flows from clients outside the frontend's `SRC_RANGES` are dropped.
pub const SVC_FLAG_SOURCE_RANGES: u32 = 1 << 9;
/// externalTrafficPolicy Local with endpoints only on other nodes: a master with `count == 0`
/// drops new flows (kube-proxy does, so a load balancer's health check moves traffic away)
/// instead of refusing them, which is only right when the Service has no endpoint at all.
pub const SVC_FLAG_DROP_NO_LOCAL: u32 = 1 << 10;
/// Backend selection (`--lb-algorithm`, annotation `xlb.io/lb-algorithm`): round-robin over
/// the slots (a per-CPU counter per frontend). Without either algorithm flag: random.
pub const SVC_FLAG_ALG_RR: u32 = 1 << 11;
/// Backend selection: Maglev consistent hashing of the client (address, port, protocol); the
/// master's `backend_id` field holds the index of the frontend's table in `MAGLEV` (only when
/// `count > 0`: a master without endpoints names no table and refuses before selecting).
pub const SVC_FLAG_ALG_MAGLEV: u32 = 1 << 12;

/// Value of `SERVICES`. For the master (slot 0): `count`, `rev_nat_id`, `flags`,
/// `affinity_timeout`; `backend_id` is 0. For a slot: only `backend_id`.
/// A master with `count == 0` means "Service without endpoints": refuse new flows at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Pod, Zeroable)]
pub struct ServiceValue {
    /// A slot: the backend id. A master with `SVC_FLAG_ALG_MAGLEV`: its Maglev table index
    /// (a new table is written whole into a free index before the master names it).
    pub backend_id: u32,
    pub count: u32,
    /// Master only: the identity of this incarnation of the frontend, >= 1. It stays while the
    /// frontend exists; a frontend removed and created again gets a new one (ids come from a
    /// forward-only cursor). Conntrack and affinity entries carry it, so a SYN on a live tuple
    /// or an affinity entry of an earlier Service at the same address is not taken for this
    /// one. The name is Cilium's, whose replies are restored from a reverse-NAT table by this
    /// id; xlb has no such table (reply entries carry the frontend itself).
    pub rev_nat_id: u32,
    pub flags: u32,
    /// Session affinity timeout in seconds (sessionAffinity ClientIP).
    pub affinity_timeout: u32,
    /// Master only: the Service port (namespace, name, port name) this frontend belongs to,
    /// `1..=`[`DEFAULT_SVC_PORTS_MAX`] (its name in [`map_names::SVCNAME`], its counters at that
    /// index of [`map_names::SVCSTATS`]); 0: none (no id was free). Slots: 0.
    pub svc_port_id: u32,
}

/// Backend state: selectable for new flows.
pub const BACKEND_ACTIVE: u8 = 0;
/// Serving but terminating: only used when a Service has no ready endpoint.
pub const BACKEND_TERMINATING: u8 = 1;
/// A bit of `Backend::state`: the endpoint runs on this node. Flows from outside to a local
/// backend keep the client's address (no SNAT); to a backend on another node they are SNATed
/// to the node so the answer comes back through it.
pub const BACKEND_F_LOCAL: u8 = 1 << 7;

/// Value of `BACKENDS` (key: backend id, `u32`). Ids are stable for an (addr, port, proto).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Pod, Zeroable)]
pub struct Backend {
    /// Backend IPv4 address, network byte order.
    pub addr: u32,
    /// Backend port, network byte order.
    pub port: u16,
    pub proto: u8,
    /// [`BACKEND_ACTIVE`] or [`BACKEND_TERMINATING`], plus the bit [`BACKEND_F_LOCAL`].
    pub state: u8,
}

/// Direction of a conntrack entry.
/// `CT_FORWARD`: key is the client's original tuple (client -> frontend); value's `nat_*` is the backend.
pub const CT_FORWARD: u8 = 0;
/// `CT_REPLY`: key is the reply tuple (backend -> client, or backend -> [`HAIRPIN_ADDR`] for a
/// hairpin flow); value's `nat_*` is the frontend.
pub const CT_REPLY: u8 = 1;

/// Key of `CONNTRACK` (LRU hash): a full 5-tuple plus direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    pub _pad: u16,
}

/// Conntrack states (`CtValue::state`). Both entries of a flow always hold the same state and
/// expiry: every transition and every refresh writes the pair.
pub mod ct_state {
    /// TCP: the client's SYN was seen, no answer yet.
    pub const TCP_SYN_SENT: u8 = 1;
    /// TCP: the backend answered (SYN-ACK), or the flow was picked up mid-stream.
    pub const TCP_ESTABLISHED: u8 = 2;
    /// TCP: a FIN from one side (half-closed).
    pub const TCP_FIN_WAIT: u8 = 3;
    /// TCP: FINs from both sides.
    pub const TCP_CLOSING: u8 = 4;
    /// TCP: a RST was seen.
    pub const TCP_CLOSED: u8 = 5;
    /// UDP (and other datagram protocols): no reply yet.
    pub const UDP_UNREPLIED: u8 = 6;
    /// UDP: the backend answered.
    pub const UDP_REPLIED: u8 = 7;

    /// Stable names, for `xlb inspect` and metrics labels.
    pub const fn name(state: u8) -> &'static str {
        match state {
            TCP_SYN_SENT => "syn_sent",
            TCP_ESTABLISHED => "established",
            TCP_FIN_WAIT => "fin_wait",
            TCP_CLOSING => "closing",
            TCP_CLOSED => "closed",
            UDP_UNREPLIED => "udp_unreplied",
            UDP_REPLIED => "udp_replied",
            _ => "unknown",
        }
    }
    pub const ALL: [u8; 7] = [
        TCP_SYN_SENT,
        TCP_ESTABLISHED,
        TCP_FIN_WAIT,
        TCP_CLOSING,
        TCP_CLOSED,
        UDP_UNREPLIED,
        UDP_REPLIED,
    ];
    /// Whether a new connection may re-use the tuple (a SYN here starts a new flow).
    pub const fn is_closing(state: u8) -> bool {
        matches!(state, TCP_FIN_WAIT | TCP_CLOSING | TCP_CLOSED)
    }
}

/// `CtValue::flags`: a FIN was seen from the client (forward direction).
pub const CT_F_FIN_FWD: u8 = 1 << 0;
/// `CtValue::flags`: a FIN was seen from the backend (reply direction).
pub const CT_F_FIN_REV: u8 = 1 << 1;
/// `CtValue::flags`: hairpin flow: the client is its own backend, its source is SNATed to
/// [`HAIRPIN_ADDR`] on the way in and restored on the way back.
pub const CT_F_HAIRPIN: u8 = 1 << 2;
/// `CtValue::flags`: the flow is also SNATed (from outside the node to a backend on another
/// node). Forward entry: `snat_*` is the node address and port the backend sees. Reply entry
/// (keyed by the backend's answer to that address): `snat_*` is the client to restore.
pub const CT_F_SNAT: u8 = 1 << 3;

/// Value of `CONNTRACK`.
///
/// The forward entry stores the backend address itself, not only its id: an established TCP flow
/// is translated with this one lookup, and keeps its backend even after the endpoint left the
/// Service (kube-proxy keeps conntrack entries of removed TCP endpoints too). A UDP datagram, and
/// a SYN re-using a live tuple, check that the backend is still a member of the frontend
/// (`MEMBERS`, by address), and re-select at once when it is not.
///
/// An entry whose `expires_ns` has passed counts as a miss; the agent's sweeper deletes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Pod, Zeroable)]
pub struct CtValue {
    pub backend_id: u32,
    /// Forward: backend address. Reply: frontend address. Network byte order.
    pub nat_addr: u32,
    /// Forward: backend port. Reply: frontend port. Network byte order.
    pub nat_port: u16,
    /// One of [`ct_state`].
    pub state: u8,
    /// `CT_F_*`.
    pub flags: u8,
    /// The frontend's `ServiceValue::rev_nat_id` when the flow was set up.
    pub rev_nat_id: u32,
    /// With [`CT_F_SNAT`] only. Forward: the node address the flow is SNATed to. Reply: the
    /// client address to restore as the destination. Network byte order.
    pub snat_addr: u32,
    /// With [`CT_F_SNAT`] only: the port that goes with `snat_addr`. Network byte order.
    pub snat_port: u16,
    /// The frontend's `ServiceValue::svc_port_id` when the flow was set up (per-Service
    /// counters of established packets). 0: unknown (entries of older builds) or none. Ids
    /// above `u16::MAX` are not recorded (0).
    pub svc_port_id: u16,
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC_COARSE) after which the entry is dead.
    /// Refreshed at most once a second per flow, so busy flows do not write the map per packet.
    pub expires_ns: u64,
}

impl CtKey {
    /// The key of the other entry of the same flow, given this entry's value.
    pub const fn pair(&self, v: &CtValue) -> CtKey {
        let hairpin = v.flags & CT_F_HAIRPIN != 0;
        let snat = v.flags & CT_F_SNAT != 0;
        if self.dir == CT_FORWARD {
            // (client, frontend, cport, fport) -> (backend, client | hairpin | node, bport, cport | snat port)
            CtKey {
                saddr: v.nat_addr,
                daddr: if snat {
                    v.snat_addr
                } else if hairpin {
                    u32::from_ne_bytes(HAIRPIN_ADDR)
                } else {
                    self.saddr
                },
                sport: v.nat_port,
                dport: if snat { v.snat_port } else { self.sport },
                proto: self.proto,
                dir: CT_REPLY,
                _pad: 0,
            }
        } else {
            // (backend, client | hairpin | node, bport, cport | snat port) -> (client, frontend, cport, fport)
            CtKey {
                saddr: if snat {
                    v.snat_addr
                } else if hairpin {
                    self.saddr
                } else {
                    self.daddr
                },
                daddr: v.nat_addr,
                sport: if snat { v.snat_port } else { self.dport },
                dport: v.nat_port,
                proto: self.proto,
                dir: CT_FORWARD,
                _pad: 0,
            }
        }
    }

    /// The value of the other entry of the flow whose entry at `self` holds `v`: the addresses
    /// each side restores are the other side's key.
    pub const fn pair_value(&self, v: &CtValue) -> CtValue {
        let snat = v.flags & CT_F_SNAT != 0;
        let mut out = *v;
        if self.dir == CT_FORWARD {
            out.nat_addr = self.daddr;
            out.nat_port = self.dport;
            if snat {
                out.snat_addr = self.saddr;
                out.snat_port = self.sport;
            }
        } else {
            out.nat_addr = self.saddr;
            out.nat_port = self.sport;
            if snat {
                out.snat_addr = self.daddr;
                out.snat_port = self.dport;
            }
        }
        out
    }
}

/// Conntrack lifetimes in seconds (the load-time global [`global_names::CT_TIMEOUTS`]).
/// Defaults: netfilter's as kube-proxy configures it (24 h established, 120 s half-closed,
/// 30 s / 120 s UDP) and Cilium's (60 s SYN, 10 s closing).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtTimeouts {
    pub tcp_syn: u32,
    pub tcp_established: u32,
    pub tcp_fin_wait: u32,
    pub tcp_close: u32,
    pub udp: u32,
    pub udp_stream: u32,
}

impl CtTimeouts {
    pub const DEFAULT: CtTimeouts = CtTimeouts {
        tcp_syn: 60,
        tcp_established: 86_400,
        tcp_fin_wait: 120,
        tcp_close: 10,
        udp: 30,
        udp_stream: 120,
    };
    /// Lifetime of `state`, in seconds.
    pub const fn of(&self, state: u8) -> u32 {
        *self.field_of(state)
    }
    /// The field holding the lifetime of `state` (the datapath reads just that one field of
    /// its load-time copy).
    pub const fn field_of(&self, state: u8) -> &u32 {
        match state {
            ct_state::TCP_SYN_SENT => &self.tcp_syn,
            ct_state::TCP_ESTABLISHED => &self.tcp_established,
            ct_state::TCP_FIN_WAIT => &self.tcp_fin_wait,
            ct_state::TCP_CLOSING | ct_state::TCP_CLOSED => &self.tcp_close,
            ct_state::UDP_REPLIED => &self.udp_stream,
            _ => &self.udp,
        }
    }
}

impl Default for CtTimeouts {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Key of `MEMBERS`: a frontend (as in [`ServiceKey`], slot 0) and one of its backend ids.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct MemberKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
    pub backend_id: u32,
}

impl MemberKey {
    pub const fn of(fe: &ServiceKey, backend_id: u32) -> Self {
        MemberKey { addr: fe.addr, port: fe.port, proto: fe.proto, scope: fe.scope, backend_id }
    }
}

/// Value of `MEMBERS`: the member's address, so a conntrack or affinity entry holding an id is
/// checked by identity (address and port), not only by the id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Pod, Zeroable)]
pub struct MemberValue {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Key of `FRAGS` (LRU hash): one fragmented datagram as it arrived.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct FragKey {
    pub saddr: u32,
    pub daddr: u32,
    /// IP identification, network byte order.
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Value of `FRAGS`: the L4 ports the first fragment carried (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Pod, Zeroable)]
pub struct FragValue {
    pub sport: u16,
    pub dport: u16,
}

/// Key of `AFFINITY` (LRU hash): sessionAffinity ClientIP is per (client address, Service port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct AffinityKey {
    /// Client IPv4 address, network byte order.
    pub client: u32,
    /// The frontend's `ServiceValue::rev_nat_id` (this incarnation of the Service port).
    pub rev_nat_id: u32,
}

/// Value of `AFFINITY`: the backend chosen for that client, and when it was last used.
/// The entry is used only while that backend is still a member of the frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Pod, Zeroable)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    /// bpf_ktime_get_coarse_ns() of the last new flow that used it.
    pub last_used_ns: u64,
}

/// The data part of a `SRC_RANGES` LPM-trie key (the trie's `prefixlen` comes first, outside
/// this struct): a frontend, then a client address. An entry for a CIDR `a/n` has prefix length
/// [`SrcRangeKey::FRONTEND_BITS`] + n, so every lookup matches the frontend exactly and the
/// client by its longest prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SrcRangeKey {
    /// Frontend address, network byte order.
    pub addr: u32,
    /// Frontend port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
    /// Client address (or the CIDR's network address), network byte order.
    pub client: u32,
}

impl SrcRangeKey {
    /// Bits of the key before the client address.
    pub const FRONTEND_BITS: u32 = 64;
}

/// Key of `SOCK_REV`: a socket the socket hooks translated, and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SockRevKey {
    /// `bpf_get_socket_cookie`.
    pub cookie: u64,
    /// Backend address and port, network byte order.
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Value of `SOCK_REV`: the frontend the socket asked for, network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Pod, Zeroable)]
pub struct SockRevValue {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Value of `DEVICES` (key: ifindex, `u32`): an external device the agent attached to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Pod, Zeroable)]
pub struct DeviceValue {
    /// The node's primary IPv4 address on the device, network byte order: the SNAT source of
    /// flows from outside to a backend on another node. 0: none (such flows are dropped,
    /// counted `drop_no_route`).
    pub addr: u32,
    /// `DEV_F_*`.
    pub flags: u32,
}

/// `DeviceValue::flags`: XDP on this device may transmit (`XDP_TX` / `XDP_REDIRECT`). Set for
/// generic XDP and for native XDP on real NICs; not for native XDP on a veth, whose transmit
/// needs the peer to run XDP or GRO (otherwise the frame is silently dropped): there XDP leaves
/// forwarding to the tc program.
pub const DEV_F_XDP_TX: u32 = 1 << 0;

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
    /// A packet to a frontend of an unsupported protocol (SCTP) passed untouched.
    PassOtherProto = 11,
    /// A packet that had to be refused but has a shape we do not answer (UDP with IP options): dropped.
    DropUnrefusable = 12,
    /// A conntrack entry was found expired (counted as a miss).
    CtExpired = 13,
    /// A SYN re-used the tuple of a closed, closing or stale flow, which started over.
    CtTupleReused = 14,
    /// A direct (non-Service) SYN removed a stale reply entry of its tuple.
    CtStaleReplyRemoved = 15,
    /// A hairpin flow (a pod reaching itself through a Service) was translated.
    Hairpin = 16,
    /// An ICMP error quoting a translated flow was translated back.
    IcmpErrorTranslated = 17,
    /// A non-first IPv4 fragment of a translated flow followed its first fragment.
    FragmentTranslated = 18,
    /// A lost reply entry of a live flow was re-created.
    CtReplyRecreated = 19,
    /// A new flow from outside to a backend on another node found no free SNAT port: dropped.
    DropSnatPortsExhausted = 20,
    /// A new flow to a LoadBalancer IP from a client outside its loadBalancerSourceRanges: dropped.
    DropSourceRange = 21,
    /// externalTrafficPolicy Local, no endpoint on this node (but some elsewhere): dropped.
    DropNoLocalEndpoint = 22,
    /// XDP handed a packet of ours to the tc program untouched (a refusal, a next hop without
    /// a neighbour entry, an ICMP error, a fragment).
    XdpDeferred = 23,
    /// A translated packet from outside could not be forwarded (no route): dropped.
    DropNoRoute = 24,
    /// A flow from outside to a backend on another node was SNATed to the node.
    Snat = 25,
    /// Socket LB: a connect() or an unconnected sendmsg() to a frontend got a backend (the
    /// socket's destination was rewritten; counted per call, not per packet).
    SockTranslated = 26,
    /// Socket LB: recvmsg() / getpeername() of a translated socket showed the frontend again.
    SockRevTranslated = 27,
    /// Socket LB: a connect() / sendmsg() to a frontend without endpoints (or to an address of
    /// the Service CIDR no Service uses) failed with ECONNREFUSED.
    SockRefused = 28,
    /// Socket LB: the (socket, backend) -> frontend record could not be written, so
    /// recvmsg() / getpeername() of that socket show the backend.
    SockRevInsertFailed = 29,
    /// `to_pod` / `to_net`: a packet this CPU had just translated towards a backend (the
    /// forward direction of its flow, never an answer) passed without a reply lookup.
    ForwardPassed = 30,
}

pub const STAT_COUNT: u32 = 31;
/// Capacity of the `STATS` array: counters can be added up to it without a new map.
pub const STATS_SLOTS: u32 = 64;
const _: () = assert!(STAT_COUNT <= STATS_SLOTS);

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
        Stat::DropUnrefusable,
        Stat::CtExpired,
        Stat::CtTupleReused,
        Stat::CtStaleReplyRemoved,
        Stat::Hairpin,
        Stat::IcmpErrorTranslated,
        Stat::FragmentTranslated,
        Stat::CtReplyRecreated,
        Stat::DropSnatPortsExhausted,
        Stat::DropSourceRange,
        Stat::DropNoLocalEndpoint,
        Stat::XdpDeferred,
        Stat::DropNoRoute,
        Stat::Snat,
        Stat::SockTranslated,
        Stat::SockRevTranslated,
        Stat::SockRefused,
        Stat::SockRevInsertFailed,
        Stat::ForwardPassed,
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
            Stat::DropUnrefusable => "drop_unrefusable",
            Stat::CtExpired => "ct_expired",
            Stat::CtTupleReused => "ct_tuple_reused",
            Stat::CtStaleReplyRemoved => "ct_stale_reply_removed",
            Stat::Hairpin => "hairpin",
            Stat::IcmpErrorTranslated => "icmp_error_translated",
            Stat::FragmentTranslated => "fragment_translated",
            Stat::CtReplyRecreated => "ct_reply_recreated",
            Stat::DropSnatPortsExhausted => "drop_snat_ports_exhausted",
            Stat::DropSourceRange => "drop_source_range",
            Stat::DropNoLocalEndpoint => "drop_no_local_endpoint",
            Stat::XdpDeferred => "xdp_deferred",
            Stat::DropNoRoute => "drop_no_route",
            Stat::Snat => "snat",
            Stat::SockTranslated => "sock_translated",
            Stat::SockRevTranslated => "sock_rev_translated",
            Stat::SockRefused => "sock_refused",
            Stat::SockRevInsertFailed => "sock_rev_insert_failed",
            Stat::ForwardPassed => "forward_passed",
        }
    }
}

/// The Linux kernel's `jhash_3words` (Bob Jenkins' lookup3 final mix, include/linux/jhash.h).
#[inline(always)]
pub const fn jhash_3words(a: u32, b: u32, c: u32, initval: u32) -> u32 {
    let iv = initval.wrapping_add(0xdead_beef).wrapping_add(3 << 2);
    let (mut a, mut b, mut c) = (a.wrapping_add(iv), b.wrapping_add(iv), c.wrapping_add(iv));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(24));
    c
}

/// The hash a Maglev frontend picks a client's table entry with: `jhash_3words` of the client
/// address and port (host order) and the IP protocol, with a fixed seed. One definition for the
/// datapath and the control plane, so both pick the same entry on every node.
#[inline(always)]
pub const fn maglev_flow_hash(client: u32, port: u16, proto: u8) -> u32 {
    const SEED: u32 = 0x786c_6221;
    jhash_3words(client, port as u32, proto as u32, SEED)
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

    /// `aya::Pod` for types whose `bytemuck::Pod` derive already proved them padding-free and
    /// valid for any bytes (the orphan rule forbids a blanket impl).
    macro_rules! aya_pod {
        ($($t:ty),* $(,)?) => {$(
            const _: fn() = || {
                fn is_pod<T: bytemuck::Pod>() {}
                is_pod::<$t>();
            };
            // SAFETY: `$t: bytemuck::Pod` (checked just above): #[repr(C)], Copy, no padding,
            // every bit pattern valid, which is exactly what `aya::Pod` requires.
            unsafe impl aya::Pod for $t {}
        )*};
    }

    aya_pod!(
        ServiceKey,
        ServiceValue,
        Backend,
        CtKey,
        CtValue,
        AffinityKey,
        AffinityValue,
        CtTimeouts,
        MemberKey,
        MemberValue,
        FragKey,
        FragValue,
        SrcRangeKey,
        DeviceValue,
        PortRange,
        SockRevKey,
        SockRevValue,
        SvcName,
        SvcStats,
        TraceRecord,
    );
}

// Layout guards: a change here is an ABI change with the kernel side (bump map names).
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 12);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 24);
const _: () = assert!(core::mem::size_of::<Backend>() == 8);
const _: () = assert!(core::mem::size_of::<CtKey>() == 16);
const _: () = assert!(core::mem::size_of::<CtValue>() == 32);
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 8);
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);
const _: () = assert!(core::mem::size_of::<CtTimeouts>() == 24);
const _: () = assert!(core::mem::size_of::<MemberKey>() == 12);
const _: () = assert!(core::mem::size_of::<MemberValue>() == 8);
const _: () = assert!(core::mem::size_of::<FragKey>() == 12);
const _: () = assert!(core::mem::size_of::<FragValue>() == 4);
const _: () = assert!(core::mem::size_of::<SrcRangeKey>() == 12);
const _: () = assert!(core::mem::size_of::<DeviceValue>() == 8);
const _: () = assert!(core::mem::size_of::<SockRevKey>() == 16);
const _: () = assert!(core::mem::size_of::<SockRevValue>() == 8);
const _: () = assert!(core::mem::size_of::<SvcName>() == 160);
const _: () = assert!(core::mem::size_of::<SvcStats>() == 64);
const _: () = assert!(core::mem::size_of::<TraceRecord>() == 48);

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(flags: u8) -> (CtKey, CtValue) {
        let key = CtKey {
            saddr: ip4([10, 244, 1, 5]),
            daddr: ip4([10, 96, 0, 10]),
            sport: port(40000),
            dport: port(80),
            proto: PROTO_TCP,
            dir: CT_FORWARD,
            _pad: 0,
        };
        let value = CtValue {
            backend_id: 7,
            nat_addr: ip4([10, 244, 2, 9]),
            nat_port: port(9376),
            flags,
            ..CtValue::default()
        };
        (key, value)
    }

    #[test]
    fn pair_of_a_forward_entry_is_the_backends_answer_tuple() {
        let (key, value) = flow(0);
        let reply = key.pair(&value);
        assert_eq!(reply.dir, CT_REPLY);
        assert_eq!((reply.saddr, reply.sport), (value.nat_addr, value.nat_port));
        assert_eq!((reply.daddr, reply.dport), (key.saddr, key.sport));
        // The reply entry holds the frontend; its pair is the forward key again.
        let reply_value = CtValue { nat_addr: key.daddr, nat_port: key.dport, ..value };
        assert_eq!(reply.pair(&reply_value), key);
    }

    #[test]
    fn pair_of_a_hairpin_flow_goes_through_the_hairpin_address() {
        let (mut key, mut value) = flow(CT_F_HAIRPIN);
        value.nat_addr = key.saddr; // the pod is its own backend
        key.sport = port(41000);
        let reply = key.pair(&value);
        assert_eq!(reply.daddr, ip4(HAIRPIN_ADDR));
        assert_eq!(reply.saddr, key.saddr);
        let reply_value = CtValue { nat_addr: key.daddr, nat_port: key.dport, ..value };
        assert_eq!(reply.pair(&reply_value), key);
    }

    #[test]
    fn pair_of_a_snat_flow_is_the_backends_answer_to_the_node() {
        let (key, mut value) = flow(CT_F_SNAT);
        value.snat_addr = ip4([172, 31, 0, 11]);
        value.snat_port = port(61_234);
        let reply = key.pair(&value);
        assert_eq!((reply.saddr, reply.sport), (value.nat_addr, value.nat_port));
        assert_eq!((reply.daddr, reply.dport), (value.snat_addr, value.snat_port));
        let reply_value = key.pair_value(&value);
        // The reply restores the frontend as the source and the client as the destination.
        assert_eq!((reply_value.nat_addr, reply_value.nat_port), (key.daddr, key.dport));
        assert_eq!((reply_value.snat_addr, reply_value.snat_port), (key.saddr, key.sport));
        assert_eq!(reply.pair(&reply_value), key);
        assert_eq!(reply.pair_value(&reply_value), value);
    }

    #[test]
    fn every_state_has_a_name_and_a_lifetime() {
        let t = CtTimeouts::DEFAULT;
        for s in ct_state::ALL {
            assert_ne!(ct_state::name(s), "unknown");
            assert!(t.of(s) > 0);
        }
        assert_eq!(t.of(ct_state::TCP_CLOSED), 10);
        assert_eq!(t.of(ct_state::TCP_ESTABLISHED), 86_400);
        assert!(ct_state::is_closing(ct_state::TCP_FIN_WAIT));
        assert!(!ct_state::is_closing(ct_state::TCP_ESTABLISHED));
    }
}
