//! The real eBPF object, loaded without pinning (each [`TestDatapath`] has private maps, so tests
//! run in parallel), with helpers to program Services and to run `from_pod` / `to_pod` on one
//! frame through BPF_PROG_TEST_RUN.
//!
//! Services are programmed exactly as the agent programs them: the object is loaded by the
//! agent's loader (`LoadOptions`), each [`ServiceSpec`] becomes a desired frontend, the shipped
//! planner (`lb_model::planner::plan`) turns it into map operations, and the shipped executor
//! (`lb_model::store::execute`) writes them through the agent's map store (`ObjectMaps`). The
//! only direct map writes are the helpers that model states the agent never writes: conntrack
//! and affinity entries (the datapath's own), and [`TestDatapath::remove_backend`] of a backend
//! a Service still uses.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    Ebpf,
};
use lb_common::{
    ip4, map_names, port, prog_names, AffinityKey, AffinityValue, Backend, CtKey, CtTimeouts,
    CtValue, DeviceValue, FragKey, FragValue, MemberKey, ServiceKey, Stat, SCOPE_EXT,
};
use lb_model::planner::plan;
use lb_model::{
    Applied, BackendAddr, DesiredState, Frontend, FrontendState, MapOp, Plan, Proto, SvcKey,
};
use lb_userspace::datapath::{load_programs, LoadOptions, ObjectMaps};

/// tc verdicts.
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
/// XDP verdicts.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// The hook a `from_net` run goes through: the XDP program or its tc ingress twin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetHook {
    Xdp,
    Tc,
}

impl NetHook {
    pub const ALL: [NetHook; 2] = [NetHook::Xdp, NetHook::Tc];
    /// The verdict for "continue into the stack".
    pub fn pass(self) -> u32 {
        match self {
            NetHook::Xdp => XDP_PASS,
            NetHook::Tc => TC_ACT_OK,
        }
    }
    pub fn drop(self) -> u32 {
        match self {
            NetHook::Xdp => XDP_DROP,
            NetHook::Tc => TC_ACT_SHOT,
        }
    }
    /// The verdict for "sent out of `ifindex`" when the packet came in on `ingress`.
    pub fn sent(self, ifindex: u32, ingress: u32) -> u32 {
        match self {
            NetHook::Xdp if ifindex == ingress => XDP_TX,
            NetHook::Xdp => XDP_REDIRECT,
            NetHook::Tc => TC_ACT_REDIRECT,
        }
    }
}

/// Verdict and output frame of one program run.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub verdict: u32,
    pub frame: Vec<u8>,
}

/// One backend of a [`ServiceSpec`].
#[derive(Clone, Copy, Debug)]
pub struct BackendSpec {
    pub id: u32,
    pub addr: SocketAddrV4,
}

/// A frontend with its backends and the ids they have in the maps. New ids are handed out by
/// the planner; the harness points its cursors at the ids named here, so new backends must
/// name ids that follow each other in the order given (as the planner hands them out).
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub frontend: SocketAddrV4,
    pub proto: u8,
    /// The frontend's id in its master (one incarnation of the frontend; conntrack and
    /// affinity entries carry it).
    pub rev_nat_id: u32,
    pub flags: u32,
    pub affinity_timeout: u32,
    pub backends: Vec<BackendSpec>,
}

impl ServiceSpec {
    pub fn master_key(&self) -> ServiceKey {
        ServiceKey::new(
            ip4(self.frontend.ip().octets()),
            port(self.frontend.port()),
            self.proto,
            SCOPE_EXT,
            0,
        )
    }

    /// The `MEMBERS` key of backend `id` of this frontend.
    pub fn member_key(&self, id: u32) -> MemberKey {
        MemberKey::of(&self.master_key(), id)
    }

    /// This Service without backend `id`.
    pub fn without(&self, id: u32) -> ServiceSpec {
        ServiceSpec {
            backends: self
                .backends
                .iter()
                .copied()
                .filter(|b| b.id != id)
                .collect(),
            ..self.clone()
        }
    }

    /// The frontend as the control plane names it.
    pub fn model_frontend(&self) -> Result<Frontend> {
        Ok(Frontend {
            addr: *self.frontend.ip(),
            port: self.frontend.port(),
            proto: Proto::from_number(self.proto)
                .with_context(|| format!("protocol {}", self.proto))?,
            scope: SCOPE_EXT,
        })
    }

    /// Backend `b` as the control plane names it.
    pub fn model_backend(&self, b: &BackendSpec) -> Result<BackendAddr> {
        Ok(BackendAddr {
            addr: *b.addr.ip(),
            port: b.addr.port(),
            proto: self.model_frontend()?.proto,
        })
    }

    /// What the maps should hold for this frontend.
    fn desired(&self) -> Result<FrontendState> {
        Ok(FrontendState {
            service: SvcKey {
                namespace: "packet-test".into(),
                name: self.frontend.to_string(),
            },
            port_name: String::new(),
            backends: self
                .backends
                .iter()
                .map(|b| self.model_backend(b))
                .collect::<Result<_>>()?,
            flags: self.flags,
            affinity_timeout: self.affinity_timeout,
            ..Default::default()
        })
    }
}

/// What [`TestDatapath::set_service_with`] adds to a [`ServiceSpec`].
#[derive(Clone, Debug, Default)]
pub struct Extras {
    /// Backends whose endpoint runs on this node (`BACKEND_F_LOCAL`).
    pub local: Vec<SocketAddrV4>,
    /// loadBalancerSourceRanges (network address, prefix length); the Service's flags must
    /// carry `SVC_FLAG_SOURCE_RANGES`.
    pub src_ranges: Vec<(Ipv4Addr, u8)>,
}

/// The conntrack key of the tuple `saddr -> daddr` of `proto`, direction `dir`.
pub fn ct_key(saddr: SocketAddrV4, daddr: SocketAddrV4, proto: u8, dir: u8) -> CtKey {
    CtKey {
        saddr: ip4(saddr.ip().octets()),
        daddr: ip4(daddr.ip().octets()),
        sport: port(saddr.port()),
        dport: port(daddr.port()),
        proto,
        dir,
        _pad: 0,
    }
}

/// The object under test: the one built into lb-userspace, or the file named by
/// `XLB_TEST_EBPF_OBJECT` (to run the tests against a modified datapath, e.g. a mutant).
fn object() -> Result<std::borrow::Cow<'static, [u8]>> {
    match std::env::var_os("XLB_TEST_EBPF_OBJECT") {
        Some(path) => Ok(std::fs::read(&path)
            .with_context(|| format!("reading {}", path.to_string_lossy()))?
            .into()),
        None => Ok(lb_userspace::ebpf_object().into()),
    }
}

/// `clock_gettime(CLOCK_MONOTONIC_COARSE)` in ns: the clock of `bpf_ktime_get_coarse_ns`, which
/// conntrack expiries (`CtValue::expires_ns`) are measured on.
pub fn now_coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC_COARSE)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The loaded programs and their (unpinned) maps, with the control plane's view of them.
pub struct TestDatapath {
    ebpf: Ebpf,
    /// What the maps hold, as the executor recorded it (the agent's `Applied`).
    applied: Applied,
    /// The frontends the tests asked for.
    desired: DesiredState,
}

impl TestDatapath {
    /// Loads the object and both programs (a verifier rejection is returned with its log).
    pub fn load() -> Result<Self> {
        Self::load_with(None, CtTimeouts::DEFAULT)
    }

    /// [`TestDatapath::load`] with the agent's `--service-cidr` global set.
    pub fn load_with_service_cidr(cidr: Option<(Ipv4Addr, u8)>) -> Result<Self> {
        Self::load_with(cidr, CtTimeouts::DEFAULT)
    }

    /// [`TestDatapath::load`] with the Service CIDR and conntrack lifetimes globals set.
    pub fn load_with(cidr: Option<(Ipv4Addr, u8)>, timeouts: CtTimeouts) -> Result<Self> {
        Self::load_options(&LoadOptions {
            service_cidr: cidr,
            ct_timeouts: timeouts,
            ..LoadOptions::default()
        })
    }

    /// Loads the object with `opts` (the agent's load options) and every program.
    pub fn load_options(opts: &LoadOptions) -> Result<Self> {
        let mut ebpf = opts
            .load_object_from(&object()?, None)
            .context("loading the eBPF object")?;
        load_programs(
            &mut ebpf,
            &[
                prog_names::FROM_POD,
                prog_names::TO_POD,
                prog_names::FROM_NET,
                prog_names::FROM_NET_XDP,
                prog_names::TO_NET,
                prog_names::SOCK_CONNECT4,
                prog_names::SOCK_SENDMSG4,
                prog_names::SOCK_RECVMSG4,
                prog_names::SOCK_GETPEERNAME4,
            ],
        )
        .map_err(|e| anyhow!("{e}"))?;
        for name in map_names::ALL {
            ebpf.map(name)
                .with_context(|| format!("map {name} missing from the object"))?;
        }
        // The Maglev tables' shape is the loaded array's (as the agent's read-back finds it).
        let mut applied = Applied::default();
        applied.maglev.geometry = ObjectMaps::of(&mut ebpf)
            .map_err(|e| anyhow!("{e}"))?
            .maglev_geometry;
        Ok(TestDatapath {
            ebpf,
            applied,
            desired: DesiredState::default(),
        })
    }

    /// Attaches the socket load balancing programs (`sock_connect4`, `sock_sendmsg4`,
    /// `sock_recvmsg4`, `sock_getpeername4`) to the cgroup v2 directory `cgroup`. The links are
    /// not pinned: they are detached when this datapath is dropped. BPF_PROG_TEST_RUN does not
    /// run cgroup sock_addr programs, so they are tested through real sockets of the cgroup.
    pub fn attach_sock(&mut self, cgroup: &std::path::Path) -> Result<()> {
        for name in lb_userspace::datapath::SockHook::progs() {
            let prog: &mut aya::programs::CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .with_context(|| format!("program {name}"))?
                .try_into()?;
            let dir = std::fs::File::open(cgroup)
                .with_context(|| format!("opening {}", cgroup.display()))?;
            prog.attach(dir, aya::programs::CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
        }
        Ok(())
    }

    /// The `SOCK_REV` entries (written by the socket programs).
    pub fn sock_rev(&mut self) -> Result<Vec<(lb_common::SockRevKey, lb_common::SockRevValue)>> {
        let map = self.hash::<lb_common::SockRevKey, lb_common::SockRevValue>(map_names::SOCK_REV)?;
        Ok(map.iter().collect::<Result<Vec<_>, _>>()?)
    }

    /// Runs program `name` on `frame`.
    pub fn run(&self, name: &str, frame: &[u8]) -> Result<Outcome> {
        self.run_on(name, frame, None)
    }

    /// Runs program `name` (tc or XDP) on `frame` as if it arrived on device `ifindex` (which
    /// must exist in the calling thread's network namespace; `None`: loopback). The program's
    /// FIB lookups see that namespace's routes and neighbours.
    pub fn run_on(&self, name: &str, frame: &[u8], ifindex: Option<u32>) -> Result<Outcome> {
        let (verdict, frame) = lb_userspace::trace::test_run_frame(&self.ebpf, name, frame, ifindex)?;
        Ok(Outcome { verdict, frame })
    }

    /// Runs `from_net` through `hook` on `frame` arriving on `ifindex`.
    pub fn from_net(&self, hook: NetHook, frame: &[u8], ifindex: u32) -> Result<Outcome> {
        let name = match hook {
            NetHook::Xdp => prog_names::FROM_NET_XDP,
            NetHook::Tc => prog_names::FROM_NET,
        };
        self.run_on(name, frame, Some(ifindex))
    }

    /// Runs `to_net` (tc egress of an external device) on `frame`.
    pub fn to_net(&self, frame: &[u8], ifindex: u32) -> Result<Outcome> {
        self.run_on(prog_names::TO_NET, frame, Some(ifindex))
    }

    /// Writes the `DEVICES` entry of an external device, as the agent does when it attaches.
    pub fn set_device(&mut self, ifindex: u32, addr: Ipv4Addr, flags: u32) -> Result<()> {
        let value = DeviceValue {
            addr: ip4(addr.octets()),
            flags,
        };
        self.hash::<u32, DeviceValue>(map_names::DEVICES)?
            .insert(ifindex, value, 0)?;
        Ok(())
    }

    pub fn from_pod(&self, frame: &[u8]) -> Result<Outcome> {
        self.run(prog_names::FROM_POD, frame)
    }

    pub fn to_pod(&self, frame: &[u8]) -> Result<Outcome> {
        self.run(prog_names::TO_POD, frame)
    }

    /// Programs the Service `svc` (creates it, or updates it to these backends, flags and
    /// timeout) as the agent does: the planner's ops (backends, members, slots, master, leftover
    /// slots and members, then unused backends), executed by the shipped executor.
    ///
    /// A new frontend gets `svc.rev_nat_id`, new backends the ids `svc` names (they must follow
    /// each other in the order given); an existing frontend or backend must keep its id.
    pub fn set_service(&mut self, svc: &ServiceSpec) -> Result<()> {
        self.set_service_with(svc, &Extras::default())
    }

    /// [`TestDatapath::set_service`] with what the control plane adds for external traffic:
    /// backends on this node and loadBalancerSourceRanges.
    pub fn set_service_with(&mut self, svc: &ServiceSpec, extras: &Extras) -> Result<()> {
        let fe = svc.model_frontend()?;
        let has_master = self
            .applied
            .frontends
            .get(&fe)
            .is_some_and(|af| af.rev_nat_id != 0);
        if !has_master {
            self.applied.seek_rev_nat_id(svc.rev_nat_id);
        }
        let mut new_ids = Vec::new();
        for b in &svc.backends {
            if self.backend_id(&svc.model_backend(b)?).is_none() {
                new_ids.push(b.id);
            }
        }
        if let Some(&first) = new_ids.iter().min() {
            self.applied.seek_backend_id(first);
        }
        let mut state = svc.desired()?;
        for addr in &extras.local {
            state.local.insert(svc.model_backend(&BackendSpec { id: 0, addr: *addr })?);
        }
        state.src_ranges.extend(extras.src_ranges.iter().copied());
        self.desired.set_frontend(fe, state);
        let p = plan(&self.applied, &self.desired, &BTreeSet::from([fe]));
        self.check_ids(&p, svc)?;
        self.execute(&p)
    }

    /// Removes backend `id` from the Service `svc` as the agent does (slots rewritten and the
    /// master count lowered, the trailing slot deleted, then the member entry; the backend entry
    /// too once no Service uses it). Returns the Service as it is now.
    pub fn remove_from_service(&mut self, svc: &ServiceSpec, id: u32) -> Result<ServiceSpec> {
        let rest = svc.without(id);
        ensure!(
            rest.backends.len() + 1 == svc.backends.len(),
            "backend {id} is not in the Service"
        );
        self.set_service(&rest)?;
        Ok(rest)
    }

    /// Deletes the Service `svc` as the agent does: master, slots, members, then the backends no
    /// other Service uses.
    pub fn delete_service(&mut self, svc: &ServiceSpec) -> Result<()> {
        let fe = svc.model_frontend()?;
        self.desired.remove_frontend(&fe);
        let p = plan(&self.applied, &self.desired, &BTreeSet::from([fe]));
        self.execute(&p)
    }

    /// Deletes `svc` and creates its frontend again with `rev_nat_id` (a ClusterIP given to a new
    /// Service). Returns the new Service.
    pub fn recreate_frontend(&mut self, svc: &ServiceSpec, rev_nat_id: u32) -> Result<ServiceSpec> {
        self.delete_service(svc)?;
        let new = ServiceSpec {
            rev_nat_id,
            ..svc.clone()
        };
        self.set_service(&new)?;
        Ok(new)
    }

    /// Makes sure backend `id` is not in `BACKENDS`. The agent deletes a backend once no Service
    /// uses it, which the executor already did when the last Service let it go; a backend a
    /// Service still uses is deleted by a direct map write (a state the agent never writes: a
    /// slot naming a missing backend).
    pub fn remove_backend(&mut self, id: u32) -> Result<()> {
        if self.applied.backends.contains_key(&id) {
            self.hash::<u32, Backend>(map_names::BACKENDS)?
                .remove(&id)?;
            self.applied.apply(&MapOp::DeleteBackend { id });
        }
        Ok(())
    }

    /// The id the maps hold for backend `b`.
    fn backend_id(&self, b: &BackendAddr) -> Option<u32> {
        self.applied
            .backends
            .iter()
            .find(|(_, (addr, _))| addr == b)
            .map(|(id, _)| *id)
    }

    /// The plan gives the frontend and its backends the ids `svc` names.
    fn check_ids(&self, p: &Plan, svc: &ServiceSpec) -> Result<()> {
        let mut ids: BTreeMap<BackendAddr, u32> = self
            .applied
            .backends
            .iter()
            .map(|(id, (b, _))| (*b, *id))
            .collect();
        let mut rev_nat_id = self
            .applied
            .frontends
            .get(&svc.model_frontend()?)
            .map(|af| af.rev_nat_id);
        for op in p
            .prepare
            .iter()
            .chain(p.frontends.iter().flat_map(|(_, ops)| ops))
        {
            match *op {
                MapOp::PutBackend { id, backend, .. } => {
                    ids.insert(backend, id);
                }
                MapOp::PutMaster { rev_nat_id: id, .. } => rev_nat_id = Some(id),
                _ => {}
            }
        }
        for b in &svc.backends {
            let got = ids.get(&svc.model_backend(b)?).copied();
            if got != Some(b.id) {
                bail!(
                    "backend {} gets id {got:?}, the test names {}: an existing backend keeps \
                     its id, new ones get ids that follow each other in the order given",
                    b.addr,
                    b.id
                );
            }
        }
        ensure!(
            rev_nat_id == Some(svc.rev_nat_id),
            "{} has rev-NAT id {rev_nat_id:?}, the test names {} (a live frontend keeps its id; \
             use recreate_frontend)",
            svc.frontend,
            svc.rev_nat_id
        );
        Ok(())
    }

    /// Executes `p` with the agent's executor on the object's maps; every op must succeed.
    fn execute(&mut self, p: &Plan) -> Result<()> {
        let mut maps = ObjectMaps::of(&mut self.ebpf).map_err(|e| anyhow!("{e}"))?;
        let report = lb_model::store::execute(&mut maps.store(), p, &mut self.applied);
        ensure!(report.is_clean(), "programming the maps: {report:?}");
        Ok(())
    }

    /// The loaded object (e.g. for `lb_userspace::trace`'s run and record helpers).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// What the maps hold, as the executor recorded it (the agent's `Applied`): e.g. the Maglev
    /// table a frontend's master names (`frontends[..].table`).
    pub fn applied(&self) -> &Applied {
        &self.applied
    }

    /// The entries of Maglev table `table`, read from the `MAGLEV` map.
    pub fn maglev_table(&mut self, table: u32) -> Result<Vec<u32>> {
        use lb_model::store::MapStore as _;
        let mut maps = ObjectMaps::of(&mut self.ebpf).map_err(|e| anyhow!("{e}"))?;
        let entries = maps.store().read_maglev_table(table).map_err(|e| anyhow!("{e}"))?;
        Ok(entries)
    }

    /// The round-robin counters (`RR`) of frontend `rev_nat_id`, one per CPU (None: no entry).
    pub fn rr_counters(&mut self, rev_nat_id: u32) -> Result<Option<Vec<u32>>> {
        let map = self.ebpf.map_mut(map_names::RR).context("RR map")?;
        let rr = aya::maps::PerCpuHashMap::<&mut MapData, u32, u32>::try_from(map)?;
        match rr.get(&rev_nat_id, 0) {
            Ok(v) => Ok(Some(v.iter().copied().collect())),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The conntrack entries (written by the datapath).
    pub fn conntrack(&mut self) -> Result<Vec<(CtKey, CtValue)>> {
        let map = self.hash::<CtKey, CtValue>(map_names::CONNTRACK)?;
        Ok(map.iter().collect::<Result<Vec<_>, _>>()?)
    }

    /// The conntrack entry at `key`, if any.
    pub fn ct_get(&mut self, key: &CtKey) -> Result<Option<CtValue>> {
        let map = self.hash::<CtKey, CtValue>(map_names::CONNTRACK)?;
        match map.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes (creates or replaces) the conntrack entry at `key`: a direct map write, as only the
    /// datapath writes conntrack.
    pub fn ct_set(&mut self, key: &CtKey, value: CtValue) -> Result<()> {
        self.hash::<CtKey, CtValue>(map_names::CONNTRACK)?
            .insert(key, value, 0)?;
        Ok(())
    }

    /// Deletes the conntrack entry at `key` (which must exist): a direct map write (the agent's
    /// sweeper deletes only expired entries).
    pub fn ct_delete(&mut self, key: &CtKey) -> Result<()> {
        self.hash::<CtKey, CtValue>(map_names::CONNTRACK)?
            .remove(key)?;
        Ok(())
    }

    pub fn frags(&mut self) -> Result<Vec<(FragKey, FragValue)>> {
        let map = self.hash::<FragKey, FragValue>(map_names::FRAGS)?;
        Ok(map.iter().collect::<Result<Vec<_>, _>>()?)
    }

    pub fn affinity(&mut self) -> Result<Vec<(AffinityKey, AffinityValue)>> {
        let map = self.hash::<AffinityKey, AffinityValue>(map_names::AFFINITY)?;
        Ok(map.iter().collect::<Result<Vec<_>, _>>()?)
    }

    /// Writes (creates or replaces) the affinity record at `key`: a direct map write, as only
    /// the datapath writes affinity records.
    pub fn affinity_set(&mut self, key: &AffinityKey, value: AffinityValue) -> Result<()> {
        self.hash::<AffinityKey, AffinityValue>(map_names::AFFINITY)?
            .insert(key, value, 0)?;
        Ok(())
    }

    /// Every counter, summed over CPUs, by `Stat::name`.
    pub fn stats(&mut self) -> Result<BTreeMap<&'static str, u64>> {
        let map = self.ebpf.map_mut(map_names::STATS).context("STATS map")?;
        let stats = PerCpuArray::<&mut MapData, u64>::try_from(map)?;
        let mut out = BTreeMap::new();
        for stat in Stat::ALL {
            let per_cpu = stats.get(&(stat as u32), 0)?;
            out.insert(stat.name(), per_cpu.iter().sum());
        }
        Ok(out)
    }

    /// The Service port id the master of `svc` carries (0: none), and that id's per-Service
    /// counters (`XLB_SVCSTATS_V1`), summed over CPUs.
    pub fn svc_stats(&mut self, svc: &ServiceSpec) -> Result<(u32, lb_common::SvcStats)> {
        let id = self
            .applied
            .frontends
            .get(&svc.model_frontend()?)
            .map_or(0, |af| af.svc_port_id);
        let map = self.ebpf.map_mut(map_names::SVCSTATS).context("SVCSTATS map")?;
        let stats = PerCpuArray::<&mut MapData, lb_common::SvcStats>::try_from(map)?;
        let sum = stats
            .get(&id, 0)?
            .iter()
            .fold(lb_common::SvcStats::default(), |a, v| a.plus(v));
        Ok((id, sum))
    }

    /// One counter, summed over CPUs.
    pub fn stat(&mut self, stat: Stat) -> Result<u64> {
        let map = self.ebpf.map_mut(map_names::STATS).context("STATS map")?;
        let stats = PerCpuArray::<&mut MapData, u64>::try_from(map)?;
        Ok(stats.get(&(stat as u32), 0)?.iter().sum())
    }

    /// The counters that are not zero (what a test asserts on: everything else must be zero).
    pub fn nonzero_stats(&mut self) -> Result<BTreeMap<&'static str, u64>> {
        Ok(self.stats()?.into_iter().filter(|(_, v)| *v != 0).collect())
    }

    fn hash<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &str,
    ) -> Result<HashMap<&mut MapData, K, V>> {
        let map = self
            .ebpf
            .map_mut(name)
            .with_context(|| format!("map {name}"))?;
        HashMap::try_from(map).with_context(|| format!("map {name} as a hash map"))
    }
}
