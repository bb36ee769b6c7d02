//! The maps shared with userspace. Names come from `lb_common::map_names` (checked at compile
//! time below, since `#[map(name = ..)]` only takes a literal). None is pinned in the ELF: the
//! agent chooses pin paths with `EbpfLoader::map_pin_path`, and tests load them unpinned.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray},
};
use lb_common::{
    map_names, AffinityKey, AffinityValue, Backend, CtKey, CtValue, DeviceValue, FragKey,
    FragValue, MemberKey, MemberValue, ServiceKey, ServiceValue, SockRevKey, SockRevValue,
    SrcRangeKey, SvcName, SvcStats, DEFAULT_AFFINITY_MAX, DEFAULT_BACKENDS_MAX, DEFAULT_CONNTRACK_MAX,
    DEFAULT_DEVICES_MAX, DEFAULT_FRAGS_MAX, DEFAULT_MAGLEV_M, DEFAULT_MAGLEV_TABLES,
    DEFAULT_MEMBERS_MAX, DEFAULT_RR_MAX, DEFAULT_SERVICES_MAX, DEFAULT_SOCK_REV_MAX,
    DEFAULT_SRC_RANGES_MAX, DEFAULT_SVC_PORTS_MAX, FEFILTER_MAP_WORDS, STATS_SLOTS,
};

/// Frontends: master entries (slot 0) and backend slots `1..=count`. A reply is restored from
/// the frontend its conntrack entry carries; the master's `rev_nat_id` only tells one
/// incarnation of a frontend from the next (there is no reverse-NAT map).
#[map(name = "XLB_SVC_V2")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(DEFAULT_SERVICES_MAX, 0);

/// Backend id -> address.
#[map(name = "XLB_BE_V1")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::with_max_entries(DEFAULT_BACKENDS_MAX, 0);

/// Forward and reply entries of every translated flow. LRU, so a full table evicts the
/// coldest flows instead of refusing new ones.
#[map(name = "XLB_CT_V3")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_MAX, 0);

/// sessionAffinity ClientIP: (client, Service) -> backend and last use.
#[map(name = "XLB_AFF_V1")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(DEFAULT_AFFINITY_MAX, 0);

/// (frontend, backend id) -> backend address: checks that a flow's or an affinity entry's
/// backend is still a member of its frontend.
#[map(name = "XLB_MEMBER_V1")]
pub static MEMBERS: HashMap<MemberKey, MemberValue> =
    HashMap::with_max_entries(DEFAULT_MEMBERS_MAX, 0);

/// First fragments' ports, so later fragments of a translated datagram follow it.
#[map(name = "XLB_FRAG_V1")]
pub static FRAGS: LruHashMap<FragKey, FragValue> =
    LruHashMap::with_max_entries(DEFAULT_FRAGS_MAX, 0);

/// Per-CPU counters indexed by `lb_common::Stat`.
#[map(name = "XLB_STATS_V3")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_SLOTS, 0);

/// loadBalancerSourceRanges: (frontend, client CIDR) -> 1. Looked up only for frontends whose
/// master has `SVC_FLAG_SOURCE_RANGES` (aya adds the `BPF_F_NO_PREALLOC` LPM tries need).
#[map(name = "XLB_SRCRANGE_V1")]
pub static SRC_RANGES: LpmTrie<SrcRangeKey, u8> =
    LpmTrie::with_max_entries(DEFAULT_SRC_RANGES_MAX, 0);

/// ifindex of an external device -> the node's address on it (SNAT source), written by the agent.
#[map(name = "XLB_DEV_V1")]
pub static DEVICES: HashMap<u32, DeviceValue> = HashMap::with_max_entries(DEFAULT_DEVICES_MAX, 0);

/// The Maglev tables (see `lb_common::map_names::MAGLEV`); the agent sizes it at load time to
/// `--maglev-tables * M`.
#[map(name = "XLB_MAGLEV_V1")]
pub static MAGLEV: Array<u32> = Array::with_max_entries(DEFAULT_MAGLEV_TABLES * DEFAULT_MAGLEV_M, 0);

/// Round-robin counters, per CPU, by rev-NAT id.
#[map(name = "XLB_RR_V1")]
pub static RR: LruPerCpuHashMap<u32, u32> = LruPerCpuHashMap::with_max_entries(DEFAULT_RR_MAX, 0);

/// (socket cookie, backend) -> frontend, for recvmsg / getpeername of translated sockets.
#[map(name = "XLB_SOCKREV_V1")]
pub static SOCK_REV: LruHashMap<SockRevKey, SockRevValue> =
    LruHashMap::with_max_entries(DEFAULT_SOCK_REV_MAX, 0);

/// `xlb trace`: what a dry-run packet did (see `trace`). Written only in dry run, never
/// pinned (not in `map_names::ALL`): each trace's copy of the object has its own.
#[map(name = "XLB_TRACE")]
pub static TRACE: PerCpuArray<lb_common::TraceRecord> = PerCpuArray::with_max_entries(1, 0);

/// The last packet this CPU translated towards a backend (see `lastfwd`). Never pinned (not
/// in `map_names::ALL`): a cache of the moment, private to each loaded object.
#[map(name = "XLB_LASTFWD")]
pub static LAST_FWD: PerCpuArray<lb_common::CtKey> = PerCpuArray::with_max_entries(1, 0);

/// The coarse clock as read at this CPU's current jiffy (see `conntrack::now_ns`). Never
/// pinned (not in `map_names::ALL`): a cache of the moment, private to each loaded object.
#[map(name = "XLB_CLOCK")]
pub static CLOCK: PerCpuArray<lb_common::ClockCache> = PerCpuArray::with_max_entries(1, 0);

/// The frontend and reply pre-filters (see `fefilter`), written by the agent.
#[map(name = "XLB_FEFILTER_V2")]
pub static FEFILTER: Array<u64> = Array::with_max_entries(FEFILTER_MAP_WORDS, 0);

/// Service port id -> (namespace, name, port name). Written by the agent, read by `xlb
/// inspect` / `xlb trace`; the programs never read it (declared here so it is created and
/// pinned with the others).
#[map(name = "XLB_SVCNAME_V1")]
pub static SVCNAME: HashMap<u32, SvcName> = HashMap::with_max_entries(DEFAULT_SVC_PORTS_MAX, 0);

/// Per-CPU counters per Service port, indexed by `svc_port_id` (see `svcstats`); the agent
/// sizes it to `--service-ports-max + 1` at load time.
#[map(name = "XLB_SVCSTATS_V1")]
pub static SVCSTATS: PerCpuArray<SvcStats> =
    PerCpuArray::with_max_entries(DEFAULT_SVC_PORTS_MAX + 1, 0);

const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

// The literals above must match the shared names userspace looks up.
const _: () = assert!(same("XLB_SVC_V2", map_names::SERVICES));
const _: () = assert!(same("XLB_BE_V1", map_names::BACKENDS));
const _: () = assert!(same("XLB_CT_V3", map_names::CONNTRACK));
const _: () = assert!(same("XLB_SRCRANGE_V1", map_names::SRC_RANGES));
const _: () = assert!(same("XLB_DEV_V1", map_names::DEVICES));
const _: () = assert!(same("XLB_MAGLEV_V1", map_names::MAGLEV));
const _: () = assert!(same("XLB_RR_V1", map_names::RR));
const _: () = assert!(same("XLB_SOCKREV_V1", map_names::SOCK_REV));
const _: () = assert!(same("XLB_MEMBER_V1", map_names::MEMBERS));
const _: () = assert!(same("XLB_FRAG_V1", map_names::FRAGS));
const _: () = assert!(same("XLB_AFF_V1", map_names::AFFINITY));
const _: () = assert!(same("XLB_STATS_V3", map_names::STATS));
const _: () = assert!(same("XLB_FEFILTER_V2", map_names::FEFILTER));
const _: () = assert!(same("XLB_SVCNAME_V1", map_names::SVCNAME));
const _: () = assert!(same("XLB_SVCSTATS_V1", map_names::SVCSTATS));
const _: () = assert!(same("XLB_TRACE", map_names::TRACE));
const _: () = assert!(same("XLB_LASTFWD", map_names::LAST_FWD));
const _: () = assert!(same("XLB_CLOCK", map_names::CLOCK));
