//! The real eBPF object, loaded without pinning (each [`TestDatapath`] has private maps, so tests
//! run in parallel), with helpers to program Services like the agent does and to run
//! `from_pod` / `to_pod` on one frame through BPF_PROG_TEST_RUN.

use std::{collections::BTreeMap, net::SocketAddrV4};

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf, EbpfLoader,
};
use lb_common::{
    ip4, map_names, port, prog_names, AffinityKey, AffinityValue, Backend, CtKey, CtValue, RevNat,
    ServiceKey, ServiceValue, Stat, BACKEND_ACTIVE, SCOPE_EXT,
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
}

/// The loaded programs and their (unpinned) maps.
pub struct TestDatapath {
    ebpf: Ebpf,
}

impl TestDatapath {
    /// Loads the object and both programs (a verifier rejection is returned with its log).
    pub fn load() -> Result<Self> {
        Self::load_with_service_cidr(None)
    }

    /// [`TestDatapath::load`] with the agent's `--service-cidr` global set.
    pub fn load_with_service_cidr(cidr: Option<(std::net::Ipv4Addr, u8)>) -> Result<Self> {
        let (addr, mask) = lb_userspace::datapath::service_cidr_words(cidr);
        let mut ebpf = EbpfLoader::new()
            .override_global(lb_common::global_names::SERVICE_CIDR_ADDR, &addr, true)
            .override_global(lb_common::global_names::SERVICE_CIDR_MASK, &mask, true)
            .load(lb_userspace::ebpf_object())
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

    /// Writes a Service in the agent's order: backends, slots, rev-NAT, then the master.
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

    pub fn affinity(&mut self) -> Result<Vec<(AffinityKey, AffinityValue)>> {
        let map = self.hash::<AffinityKey, AffinityValue>(map_names::AFFINITY)?;
        Ok(map.iter().collect::<Result<Vec<_>, _>>()?)
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
