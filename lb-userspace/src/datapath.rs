//! The BPF datapath: loads the eBPF object, keeps its maps and program links pinned under
//! `--pin-path`, attaches programs to pod devices, executes planned map operations and reads the
//! maps back. This is the only module that touches aya.
//!
//! Pin layout (all under the pin path, on bpffs):
//! ```text
//! maps/XLB_SVC_V1 ...          the maps, reused by every later agent (restart keeps state)
//! links/<ifindex>-<ifname>-<hook>   TCX links: programs stay attached when the agent exits
//! ```
//! On restart the agent loads fresh program instances and swaps them into the pinned links with
//! `bpf_link_update` (aya's `attach_to_link`): atomic, so no packet misses a program.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::SchedClassifierLink;
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use lb_common::{
    global_names, map_names, prog_names, AffinityKey, AffinityValue, Backend, CtKey, CtTimeouts, CtValue, FragKey,
    FragValue, MemberKey, MemberValue, RevNat, ServiceKey, ServiceValue, Stat, STAT_COUNT,
};
use lb_model::{Applied, Frontend, MapOp, Plan, ReadBack};
use thiserror::Error;

/// bpffs magic number (statfs f_type).
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Debug, Error)]
pub enum Error {
    #[error("{path} is not on a bpf filesystem: mount one with `mount -t bpf bpf {path}` (or its parent)")]
    NotBpffs { path: PathBuf },
    #[error("I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("attaching to {iface}: {reason}")]
    Attach { iface: String, reason: String },
    #[error("the eBPF object is empty: xlb was built with AYA_BUILD_SKIP=1")]
    EmptyObject,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// A tc hook xlb attaches to pod devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    /// `from_pod` at tc ingress of the host-side veth (packets leaving the pod).
    FromPod,
    /// `to_pod` at tc egress of the host-side veth (packets going into the pod).
    ToPod,
}

impl Hook {
    pub const ALL: [Hook; 2] = [Hook::FromPod, Hook::ToPod];
    fn prog(self) -> &'static str {
        match self {
            Hook::FromPod => prog_names::FROM_POD,
            Hook::ToPod => prog_names::TO_POD,
        }
    }
    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::FromPod => TcAttachType::Ingress,
            Hook::ToPod => TcAttachType::Egress,
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            Hook::FromPod => "from_pod",
            Hook::ToPod => "to_pod",
        }
    }
}

/// Map capacities chosen at load time (only effective when the maps are created, not when reused).
#[derive(Clone, Debug)]
pub struct MapSizes {
    pub services: u32,
    pub backends: u32,
    pub rev_nat: u32,
    pub conntrack: u32,
    pub affinity: u32,
    pub members: u32,
    pub frags: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            services: lb_common::DEFAULT_SERVICES_MAX,
            backends: lb_common::DEFAULT_BACKENDS_MAX,
            rev_nat: lb_common::DEFAULT_REV_NAT_MAX,
            conntrack: lb_common::DEFAULT_CONNTRACK_MAX,
            affinity: lb_common::DEFAULT_AFFINITY_MAX,
            members: lb_common::DEFAULT_MEMBERS_MAX,
            frags: lb_common::DEFAULT_FRAGS_MAX,
        }
    }
}

impl MapSizes {
    /// (map name, capacity) of every sized map.
    fn by_name(&self) -> [(&'static str, u32); 7] {
        [
            (map_names::SERVICES, self.services),
            (map_names::BACKENDS, self.backends),
            (map_names::REV_NAT, self.rev_nat),
            (map_names::CONNTRACK, self.conntrack),
            (map_names::AFFINITY, self.affinity),
            (map_names::MEMBERS, self.members),
            (map_names::FRAGS, self.frags),
        ]
    }
}

/// Everything fixed when the eBPF object is loaded.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Map capacities (only effective when the maps are created, not when pinned ones are reused).
    pub sizes: MapSizes,
    /// Service CIDR whose unallocated addresses are refused; `None` disables.
    pub service_cidr: Option<(Ipv4Addr, u8)>,
    /// Conntrack lifetimes (the `CT_TIMEOUTS` global).
    pub ct_timeouts: CtTimeouts,
}

impl LoadOptions {
    /// Load xlb's eBPF object with these sizes and globals, its maps pinned under `pins` (reusing
    /// pins an earlier agent left) or, with `None`, unpinned (benchmarks, tests). The programs are
    /// not loaded into the kernel yet.
    pub fn load_object(&self, pins: Option<&PinLayout>) -> Result<Ebpf> {
        let obj = crate::ebpf_object();
        if obj.is_empty() {
            return Err(Error::EmptyObject);
        }
        let mut loader = EbpfLoader::new();
        for (name, size) in self.sizes.by_name() {
            loader.map_max_entries(name, size);
        }
        let map_paths: Vec<(&'static str, PathBuf)> = match pins {
            Some(pins) => map_names::ALL.iter().map(|n| (*n, pins.map(n))).collect(),
            None => Vec::new(),
        };
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let (cidr_addr, cidr_mask) = service_cidr_words(self.service_cidr);
        loader
            .override_global(global_names::SERVICE_CIDR_ADDR, &cidr_addr, true)
            .override_global(global_names::SERVICE_CIDR_MASK, &cidr_mask, true)
            .override_global(global_names::CT_TIMEOUTS, &self.ct_timeouts, true);
        Ok(loader.load(obj)?)
    }
}

/// Paths under a pin directory.
#[derive(Clone, Debug)]
pub struct PinLayout {
    pub root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        PinLayout { root: root.into() }
    }
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }
    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }
    fn link(&self, ifindex: u32, ifname: &str, hook: Hook) -> PathBuf {
        self.links().join(format!("{ifindex}-{ifname}-{}", hook.suffix()))
    }
}

/// Check `path` (or its nearest existing ancestor) is on bpffs.
pub fn check_bpffs(path: &Path) -> Result<()> {
    let mut p = path;
    loop {
        if p.exists() {
            break;
        }
        match p.parent() {
            Some(parent) => p = parent,
            None => break,
        }
    }
    let st = nix::sys::statfs::statfs(p).map_err(|e| Error::Io { path: p.to_path_buf(), source: e.into() })?;
    if st.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        return Err(Error::NotBpffs { path: p.to_path_buf() });
    }
    Ok(())
}

/// The loaded programs and the pinned maps.
pub struct Datapath {
    ebpf: Ebpf,
    pins: PinLayout,
    /// Interfaces with both hooks attached: ifindex -> name.
    attached: BTreeMap<u32, String>,
    /// The interface set `forget_missing` last saw: unchanged means nothing to forget.
    last_present: BTreeMap<u32, String>,
}

/// Result of executing a plan.
#[derive(Debug, Default)]
pub struct ExecReport {
    pub ops_ok: usize,
    /// Frontends whose ops stopped at an error (the map entries keep their previous, consistent state).
    pub failed: Vec<(Frontend, String)>,
    /// Failed prepare ops (a backend or rev-NAT write); frontends using them are skipped.
    pub prepare_failed: Vec<String>,
}

impl Datapath {
    /// Load the eBPF object with maps pinned under `pin_path` (reusing pins from an earlier agent).
    pub fn open(pin_path: &Path, sizes: &MapSizes) -> Result<Self> {
        Self::open_with(pin_path, sizes, None)
    }

    /// [`Datapath::open`], with a Service CIDR whose unallocated addresses are refused.
    pub fn open_with(pin_path: &Path, sizes: &MapSizes, service_cidr: Option<(Ipv4Addr, u8)>) -> Result<Self> {
        let opts = LoadOptions { sizes: sizes.clone(), service_cidr, ..LoadOptions::default() };
        Self::open_with_options(pin_path, &opts)
    }

    /// Load the eBPF object as `opts` says, with maps pinned under `pin_path` (reusing pins from an
    /// earlier agent), and load its programs.
    pub fn open_with_options(pin_path: &Path, opts: &LoadOptions) -> Result<Self> {
        if crate::ebpf_object().is_empty() {
            return Err(Error::EmptyObject);
        }
        check_bpffs(pin_path)?;
        let pins = PinLayout::new(pin_path);
        for dir in [pins.maps(), pins.links()] {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let mut ebpf = opts.load_object(Some(&pins))?;
        for hook in Hook::ALL {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(hook.prog())
                .ok_or(Error::Attach { iface: String::new(), reason: format!("program {} missing", hook.prog()) })?
                .try_into()
                .map_err(|source| Error::Program { name: hook.prog(), source })?;
            prog.load().map_err(|source| Error::Program { name: hook.prog(), source })?;
        }
        Ok(Datapath { ebpf, pins, attached: BTreeMap::new(), last_present: BTreeMap::new() })
    }

    pub fn pins(&self) -> &PinLayout {
        &self.pins
    }

    /// Interfaces currently attached (ifindex -> name).
    pub fn attached(&self) -> &BTreeMap<u32, String> {
        &self.attached
    }

    /// Attach both hooks to `ifname` (idempotent). A pinned link left by an earlier agent gets the
    /// freshly loaded program swapped in atomically; otherwise a new TCX link is created and pinned.
    pub fn attach(&mut self, ifname: &str) -> Result<()> {
        let ifindex = nix::net::if_::if_nametoindex(ifname)
            .map_err(|e| Error::Attach { iface: ifname.to_string(), reason: e.to_string() })?;
        if self.attached.get(&ifindex).map(String::as_str) == Some(ifname) {
            return Ok(());
        }
        for hook in Hook::ALL {
            let pin = self.pins.link(ifindex, ifname, hook);
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(hook.prog())
                .expect("program checked at load")
                .try_into()
                .expect("program type checked at load");
            let attach_err =
                |reason: String| Error::Attach { iface: ifname.to_string(), reason };
            if pin.exists() {
                // Swap our program into the link an earlier agent pinned: no gap.
                let swapped = PinnedLink::from_pin(&pin)
                    .map_err(|e| e.to_string())
                    .and_then(|p| SchedClassifierLink::try_from(FdLink::from(p)).map_err(|e| e.to_string()))
                    .and_then(|link| prog.attach_to_link(link).map_err(|e| e.to_string()));
                match swapped {
                    Ok(id) => {
                        // The pin keeps the link; our copy of the fd may close with the program.
                        let _ = prog.take_link(id);
                        continue;
                    }
                    Err(reason) => {
                        tracing::warn!(iface = ifname, hook = hook.suffix(), %reason, "stale link pin, re-attaching");
                        let _ = fs::remove_file(&pin);
                    }
                }
            }
            let id = prog.attach(ifname, hook.attach_type()).map_err(|e| attach_err(format!("{e:#}")))?;
            let link = prog.take_link(id).map_err(|e| attach_err(e.to_string()))?;
            match FdLink::try_from(link) {
                Ok(fd_link) => {
                    fd_link.pin(&pin).map_err(|e| attach_err(format!("pinning link: {e}")))?;
                }
                Err(_) => {
                    // Legacy netlink tc filter (kernel < 6.6): it persists by itself; keep it
                    // attached by leaking our handle instead of detaching on drop.
                    tracing::info!(iface = ifname, "attached as a netlink tc filter (no TCX)");
                }
            }
        }
        self.attached.insert(ifindex, ifname.to_string());
        Ok(())
    }

    /// Forget interfaces that disappeared and remove their link pins (the kernel detached them).
    pub fn forget_missing(&mut self, present: &BTreeMap<u32, String>) {
        // Called on every device scan: touch bpffs only when an interface came or went.
        if *present == self.last_present {
            return;
        }
        self.last_present = present.clone();
        self.attached.retain(|idx, name| present.get(idx) == Some(name));
        if let Ok(rd) = fs::read_dir(self.pins.links()) {
            for entry in rd.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let keep = parse_link_pin(&name)
                    .map(|(idx, ifname)| present.get(&idx).map(String::as_str) == Some(ifname))
                    .unwrap_or(false);
                if !keep {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }

    /// Execute `plan` in order, recording every successful op in `applied`. A failing op stops only
    /// its frontend (whose master still describes a consistent, older state).
    pub fn execute(&mut self, plan: &Plan, applied: &mut Applied) -> ExecReport {
        let mut report = ExecReport::default();
        let mut maps = match TypedMaps::borrow(&mut self.ebpf) {
            Ok(m) => m,
            Err(e) => {
                report.prepare_failed.push(e.to_string());
                return report;
            }
        };
        let mut failed_prepare = Vec::new();
        for op in &plan.prepare {
            tracing::debug!(?op, "map op");
            match maps.exec(op) {
                Ok(()) => {
                    applied.apply(op);
                    report.ops_ok += 1;
                }
                Err(e) => {
                    report.prepare_failed.push(format!("{op:?}: {e}"));
                    failed_prepare.push(op.clone());
                }
            }
        }
        // A slot must never point at a backend that was not written: skip those frontends.
        let blocked = plan.blocked_by(&failed_prepare);
        for (fe, ops) in &plan.frontends {
            if blocked.contains(fe) {
                report.failed.push((*fe, "skipped: a backend or rev-NAT entry it needs could not be written".into()));
                continue;
            }
            for op in ops {
                tracing::debug!(?op, "map op");
                match maps.exec(op) {
                    Ok(()) => {
                        applied.apply(op);
                        report.ops_ok += 1;
                    }
                    Err(e) => {
                        report.failed.push((*fe, format!("{op:?}: {e}")));
                        break;
                    }
                }
            }
        }
        for op in applied.gc() {
            tracing::debug!(?op, "map op");
            if maps.exec(&op).is_ok() {
                applied.apply(&op);
                report.ops_ok += 1;
            }
        }
        report
    }

    /// Read the maps back into an [`Applied`] (used at start, so a restart reconciles, never flushes).
    pub fn read_applied(&mut self) -> Result<Applied> {
        let maps = TypedMaps::borrow(&mut self.ebpf)?;
        read_applied(&maps.services, &maps.backends, &maps.rev_nat, &maps.members)
    }
}

/// Network-order (address, mask) words of a CIDR for the eBPF globals; (0, 0) disables.
pub fn service_cidr_words(cidr: Option<(Ipv4Addr, u8)>) -> (u32, u32) {
    match cidr {
        Some((addr, len)) if len > 0 => {
            let mask = u32::MAX << (32 - u32::from(len.min(32)));
            let mask_be = mask.to_be();
            (lb_common::ip4(addr.octets()) & mask_be, mask_be)
        }
        _ => (0, 0),
    }
}

/// Parse a link pin file name `<ifindex>-<ifname>-<hook>`.
fn parse_link_pin(name: &str) -> Option<(u32, &str)> {
    let (idx, rest) = name.split_once('-')?;
    let ifname = rest.rsplit_once('-').map(|(n, _)| n)?;
    Some((idx.parse().ok()?, ifname))
}

/// Typed views of the writable maps of a loaded object.
struct TypedMaps<'a> {
    services: HashMap<&'a mut MapData, ServiceKey, ServiceValue>,
    backends: HashMap<&'a mut MapData, u32, Backend>,
    rev_nat: HashMap<&'a mut MapData, u32, RevNat>,
    members: HashMap<&'a mut MapData, MemberKey, MemberValue>,
}

impl<'a> TypedMaps<'a> {
    fn borrow(ebpf: &'a mut Ebpf) -> Result<Self> {
        let mut services = None;
        let mut backends = None;
        let mut rev_nat = None;
        let mut members = None;
        for (name, map) in ebpf.maps_mut() {
            match name {
                n if n == map_names::SERVICES => services = Some(map),
                n if n == map_names::BACKENDS => backends = Some(map),
                n if n == map_names::REV_NAT => rev_nat = Some(map),
                n if n == map_names::MEMBERS => members = Some(map),
                _ => {}
            }
        }
        fn typed<'m, K: aya::Pod, V: aya::Pod>(
            name: &'static str,
            m: Option<&'m mut Map>,
        ) -> Result<HashMap<&'m mut MapData, K, V>> {
            let m = m.ok_or(Error::Map { name, source: aya::maps::MapError::InvalidName { name: name.into() } })?;
            HashMap::try_from(m).map_err(|source| Error::Map { name, source })
        }
        Ok(TypedMaps {
            services: typed(map_names::SERVICES, services)?,
            backends: typed(map_names::BACKENDS, backends)?,
            rev_nat: typed(map_names::REV_NAT, rev_nat)?,
            members: typed(map_names::MEMBERS, members)?,
        })
    }

    fn exec(&mut self, op: &MapOp) -> Result<(), aya::maps::MapError> {
        match op {
            MapOp::PutBackend { id, backend, state } => self.backends.insert(id, backend.to_map(*state), 0),
            MapOp::DeleteBackend { id } => ignore_missing(self.backends.remove(id)),
            MapOp::PutRevNat { id, frontend } => self.rev_nat.insert(id, frontend.to_rev_nat(), 0),
            MapOp::DeleteRevNat { id } => ignore_missing(self.rev_nat.remove(id)),
            MapOp::PutMember { frontend, backend_id, backend } => {
                self.members.insert(frontend.member_key(*backend_id), backend.to_member(), 0)
            }
            MapOp::DeleteMember { frontend, backend_id } => {
                ignore_missing(self.members.remove(&frontend.member_key(*backend_id)))
            }
            MapOp::PutSlot { frontend, slot, backend_id } => self.services.insert(
                frontend.key(*slot),
                ServiceValue { backend_id: *backend_id, ..Default::default() },
                0,
            ),
            MapOp::DeleteSlot { frontend, slot } => ignore_missing(self.services.remove(&frontend.key(*slot))),
            MapOp::PutMaster { frontend, count, rev_nat_id, flags, affinity_timeout } => self.services.insert(
                frontend.key(0),
                ServiceValue {
                    backend_id: 0,
                    count: *count,
                    rev_nat_id: *rev_nat_id,
                    flags: *flags,
                    affinity_timeout: *affinity_timeout,
                },
                0,
            ),
            MapOp::DeleteMaster { frontend } => ignore_missing(self.services.remove(&frontend.key(0))),
        }
    }
}

/// Deleting what is already gone is success (a restart may replay deletes).
fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// Read SERVICES, BACKENDS, REV_NAT and MEMBERS back (see [`ReadBack`]); linear in the entries.
fn read_applied<T: std::borrow::Borrow<MapData>>(
    services: &HashMap<T, ServiceKey, ServiceValue>,
    backends: &HashMap<T, u32, Backend>,
    rev_nat: &HashMap<T, u32, RevNat>,
    members: &HashMap<T, MemberKey, MemberValue>,
) -> Result<Applied> {
    let map_err = |name| move |source| Error::Map { name, source };
    let mut r = ReadBack::new();
    for item in services.iter() {
        let (k, v) = item.map_err(map_err(map_names::SERVICES))?;
        r.service(&k, &v);
    }
    for item in backends.iter() {
        let (id, b) = item.map_err(map_err(map_names::BACKENDS))?;
        r.backend(id, &b);
    }
    for item in rev_nat.iter() {
        let (id, v) = item.map_err(map_err(map_names::REV_NAT))?;
        r.rev_nat(id, &v);
    }
    for item in members.iter() {
        let (k, v) = item.map_err(map_err(map_names::MEMBERS))?;
        r.member(&k, &v);
    }
    Ok(r.finish())
}

/// Read-only access to the pinned maps of a running (or exited) agent, for `xlb inspect`, metrics
/// and tests. Opening by path needs no program load.
pub struct PinnedMaps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub backends: HashMap<MapData, u32, Backend>,
    pub rev_nat: HashMap<MapData, u32, RevNat>,
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub members: HashMap<MapData, MemberKey, MemberValue>,
    pub frags: HashMap<MapData, FragKey, FragValue>,
    pub stats: PerCpuArray<MapData, u64>,
}

fn open_pinned(pins: &PinLayout, name: &'static str) -> Result<Map> {
    let path = pins.map(name);
    let data = MapData::from_pin(&path).map_err(|source| Error::Map { name, source })?;
    Map::from_map_data(data).map_err(|source| Error::Map { name, source })
}

impl PinnedMaps {
    pub fn open(pin_path: &Path) -> Result<Self> {
        let pins = PinLayout::new(pin_path);
        macro_rules! typed {
            ($name:expr) => {
                open_pinned(&pins, $name)?.try_into().map_err(|source| Error::Map { name: $name, source })?
            };
        }
        Ok(PinnedMaps {
            services: typed!(map_names::SERVICES),
            backends: typed!(map_names::BACKENDS),
            rev_nat: typed!(map_names::REV_NAT),
            conntrack: typed!(map_names::CONNTRACK),
            affinity: typed!(map_names::AFFINITY),
            members: typed!(map_names::MEMBERS),
            frags: typed!(map_names::FRAGS),
            stats: typed!(map_names::STATS),
        })
    }

    pub fn applied(&self) -> Result<Applied> {
        read_applied(&self.services, &self.backends, &self.rev_nat, &self.members)
    }

    /// Datapath counters summed over CPUs, by `Stat`.
    pub fn stats(&self) -> Result<Vec<(Stat, u64)>> {
        let mut out = Vec::with_capacity(STAT_COUNT as usize);
        for s in Stat::ALL {
            let v = self
                .stats
                .get(&(s as u32), 0)
                .map_err(|source| Error::Map { name: map_names::STATS, source })?;
            out.push((s, v.iter().sum()));
        }
        Ok(out)
    }
}

/// Detach everything xlb attached under `pin_path` and remove all its pins. Safe to run twice.
pub fn cleanup(pin_path: &Path) -> Result<usize> {
    let pins = PinLayout::new(pin_path);
    let mut removed = 0;
    if let Ok(rd) = fs::read_dir(pins.links()) {
        for entry in rd.flatten() {
            // Unpinning drops the last reference: the kernel detaches the program.
            match PinnedLink::from_pin(entry.path()) {
                Ok(link) => {
                    let _ = link.unpin();
                }
                Err(_) => {
                    let _ = fs::remove_file(entry.path());
                }
            }
            removed += 1;
        }
    }
    if let Ok(rd) = fs::read_dir(pins.maps()) {
        for entry in rd.flatten() {
            fs::remove_file(entry.path()).map_err(io_err(&entry.path()))?;
            removed += 1;
        }
    }
    for dir in [pins.links(), pins.maps(), pins.root.clone()] {
        let _ = fs::remove_dir(&dir);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_cidr_words_are_network_order() {
        let (a, m) = service_cidr_words(Some((Ipv4Addr::new(10, 96, 0, 0), 12)));
        assert_eq!(a.to_ne_bytes(), [10, 96, 0, 0]);
        assert_eq!(m.to_ne_bytes(), [255, 240, 0, 0]);
        let inside = lb_common::ip4([10, 111, 255, 1]);
        let outside = lb_common::ip4([10, 112, 0, 1]);
        assert_eq!(inside & m, a);
        assert_ne!(outside & m, a);
        assert_eq!(service_cidr_words(None), (0, 0));
        assert_eq!(service_cidr_words(Some((Ipv4Addr::new(10, 0, 0, 0), 0))), (0, 0));
    }

    #[test]
    fn link_pin_names_round_trip() {
        assert_eq!(parse_link_pin("12-xp1-3-from_pod"), Some((12, "xp1-3")));
        assert_eq!(parse_link_pin("7-veth0-to_pod"), Some((7, "veth0")));
        assert_eq!(parse_link_pin("garbage"), None);
    }
}
