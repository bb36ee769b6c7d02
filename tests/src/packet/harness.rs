//! The real eBPF object, loaded without pinning (each [`TestDatapath`] has private maps, so tests
//! run in parallel), with helpers to program Services like the agent does and to run
//! `from_pod` / `to_pod` on one frame through BPF_PROG_TEST_RUN.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::{anyhow, ensure, Context as _, Result};
use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf, EbpfLoader,
};
use lb_common::{
    global_names, ip4, map_names, port, prog_names, AffinityKey, AffinityValue, Backend, CtKey,
    CtTimeouts, CtValue, FragKey, FragValue, MemberKey, MemberValue, RevNat, ServiceKey,
    ServiceValue, Stat, BACKEND_ACTIVE, SCOPE_EXT,
};

/// tc verdicts.
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// Room for frames that grow (a refused UDP datagram becomes a 70-byte ICMP error).
const OUT_SLACK: usize = 256;

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

/// A frontend with its backends, written like the agent writes it (backends, slots, master).
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub frontend: SocketAddrV4,
    pub proto: u8,
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

/// The loaded programs and their (unpinned) maps.
pub struct TestDatapath {
    ebpf: Ebpf,
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
        let (addr, mask) = lb_userspace::datapath::service_cidr_words(cidr);
        let mut ebpf = EbpfLoader::new()
            .override_global(global_names::SERVICE_CIDR_ADDR, &addr, true)
            .override_global(global_names::SERVICE_CIDR_MASK, &mask, true)
            .override_global(global_names::CT_TIMEOUTS, &timeouts, true)
            .load(&object()?)
            .context("loading the eBPF object")?;
        for name in [prog_names::FROM_POD, prog_names::TO_POD] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .try_into()
                .with_context(|| format!("program {name} is not a tc classifier"))?;
            prog.load().map_err(|e| anyhow!("loading {name}: {e}"))?;
        }
        for name in map_names::ALL {
            ebpf.map(name)
                .with_context(|| format!("map {name} missing from the object"))?;
        }
        Ok(TestDatapath { ebpf })
    }

    /// Runs program `name` on `frame`.
    pub fn run(&self, name: &str, frame: &[u8]) -> Result<Outcome> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(name)
            .with_context(|| format!("program {name}"))?
            .try_into()?;
        let mut out = vec![0u8; frame.len() + OUT_SLACK];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of {name}"))?;
        out.truncate(result.data_size_out as usize);
        Ok(Outcome {
            verdict: result.return_value,
            frame: out,
        })
    }

    pub fn from_pod(&self, frame: &[u8]) -> Result<Outcome> {
        self.run(prog_names::FROM_POD, frame)
    }

    pub fn to_pod(&self, frame: &[u8]) -> Result<Outcome> {
        self.run(prog_names::TO_POD, frame)
    }

    /// Writes a Service in the agent's order: backends, members, slots, rev-NAT, then the master.
    pub fn set_service(&mut self, svc: &ServiceSpec) -> Result<()> {
        let mut backends = self.hash::<u32, Backend>(map_names::BACKENDS)?;
        for b in &svc.backends {
            let value = Backend {
                addr: ip4(b.addr.ip().octets()),
                port: port(b.addr.port()),
                proto: svc.proto,
                state: BACKEND_ACTIVE,
            };
            backends.insert(b.id, value, 0)?;
        }
        let master_key = svc.master_key();
        let mut members = self.hash::<MemberKey, MemberValue>(map_names::MEMBERS)?;
        for b in &svc.backends {
            let value = MemberValue {
                addr: ip4(b.addr.ip().octets()),
                port: port(b.addr.port()),
                _pad: 0,
            };
            members.insert(svc.member_key(b.id), value, 0)?;
        }
        let mut services = self.hash::<ServiceKey, ServiceValue>(map_names::SERVICES)?;
        for (i, b) in svc.backends.iter().enumerate() {
            let slot = u16::try_from(i + 1)?;
            services.insert(
                master_key.with_slot(slot),
                ServiceValue {
                    backend_id: b.id,
                    ..Default::default()
                },
                0,
            )?;
        }
        let master = ServiceValue {
            backend_id: 0,
            count: u32::try_from(svc.backends.len())?,
            rev_nat_id: svc.rev_nat_id,
            flags: svc.flags,
            affinity_timeout: svc.affinity_timeout,
        };
        let mut rev_nat = self.hash::<u32, RevNat>(map_names::REV_NAT)?;
        let frontend = RevNat {
            addr: master_key.addr,
            port: master_key.port,
            _pad: 0,
        };
        rev_nat.insert(svc.rev_nat_id, frontend, 0)?;
        let mut services = self.hash::<ServiceKey, ServiceValue>(map_names::SERVICES)?;
        services.insert(master_key, master, 0)?;
        Ok(())
    }

    /// Removes backend `id` from the Service `svc` in the agent's order: slots rewritten and master
    /// count lowered, the trailing slot deleted, then the member entry. `BACKENDS` keeps it (see
    /// [`TestDatapath::remove_backend`]). Returns the Service as it is now.
    pub fn remove_from_service(&mut self, svc: &ServiceSpec, id: u32) -> Result<ServiceSpec> {
        let rest = svc.without(id);
        ensure!(
            rest.backends.len() + 1 == svc.backends.len(),
            "backend {id} is not in the Service"
        );
        self.set_service(&rest)?;
        let trailing = u16::try_from(svc.backends.len())?;
        self.hash::<ServiceKey, ServiceValue>(map_names::SERVICES)?
            .remove(&svc.master_key().with_slot(trailing))?;
        self.hash::<MemberKey, MemberValue>(map_names::MEMBERS)?
            .remove(&svc.member_key(id))?;
        Ok(rest)
    }

    /// Deletes the Service `svc` in the agent's order: master, slots, members, rev-NAT
    /// (`BACKENDS` keeps its backends).
    pub fn delete_service(&mut self, svc: &ServiceSpec) -> Result<()> {
        let master_key = svc.master_key();
        let mut services = self.hash::<ServiceKey, ServiceValue>(map_names::SERVICES)?;
        services.remove(&master_key)?;
        for slot in 1..=svc.backends.len() {
            services.remove(&master_key.with_slot(u16::try_from(slot)?))?;
        }
        let mut members = self.hash::<MemberKey, MemberValue>(map_names::MEMBERS)?;
        for b in &svc.backends {
            members.remove(&svc.member_key(b.id))?;
        }
        self.hash::<u32, RevNat>(map_names::REV_NAT)?
            .remove(&svc.rev_nat_id)?;
        Ok(())
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

    /// Removes backend `id` from `BACKENDS` (as the agent does once no Service uses it).
    pub fn remove_backend(&mut self, id: u32) -> Result<()> {
        self.hash::<u32, Backend>(map_names::BACKENDS)?
            .remove(&id)?;
        Ok(())
    }

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

    /// Writes (creates or replaces) the conntrack entry at `key`.
    pub fn ct_set(&mut self, key: &CtKey, value: CtValue) -> Result<()> {
        self.hash::<CtKey, CtValue>(map_names::CONNTRACK)?
            .insert(key, value, 0)?;
        Ok(())
    }

    /// Deletes the conntrack entry at `key` (which must exist).
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

    /// Writes (creates or replaces) the affinity record at `key`.
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
