//! Loading xlb's eBPF object: map capacities, load-time globals, pins, and its programs. The
//! agent, the packet tests and the benchmarks all load it here.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::programs::SchedClassifier;
use aya::{Ebpf, EbpfLoader};
use lb_common::{global_names, map_names, CtTimeouts, PortRange};

use super::{Error, PinLayout, Result};

/// bpffs magic number (statfs f_type).
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Map capacities chosen at load time (only effective when the maps are created, not when reused).
#[derive(Clone, Debug)]
pub struct MapSizes {
    pub services: u32,
    pub backends: u32,
    pub conntrack: u32,
    pub affinity: u32,
    pub members: u32,
    pub frags: u32,
    /// Maglev tables the MAGLEV array has room for (`--maglev-tables`).
    pub maglev_tables: u32,
    /// Service ports that can have an id (`--service-ports-max`): SVCNAME's entries, and
    /// SVCSTATS's minus one (index 0 is "no id").
    pub svc_ports: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            services: lb_common::DEFAULT_SERVICES_MAX,
            backends: lb_common::DEFAULT_BACKENDS_MAX,
            conntrack: lb_common::DEFAULT_CONNTRACK_MAX,
            affinity: lb_common::DEFAULT_AFFINITY_MAX,
            members: lb_common::DEFAULT_MEMBERS_MAX,
            frags: lb_common::DEFAULT_FRAGS_MAX,
            maglev_tables: lb_common::DEFAULT_MAGLEV_TABLES,
            svc_ports: lb_common::DEFAULT_SVC_PORTS_MAX,
        }
    }
}

impl MapSizes {
    /// (map name, capacity) of every sized map.
    fn by_name(&self) -> [(&'static str, u32); 8] {
        let svc_ports = self.svc_ports.clamp(1, lb_common::SVC_PORTS_LIMIT);
        [
            (map_names::SVCNAME, svc_ports),
            (map_names::SVCSTATS, svc_ports + 1),
            (map_names::SERVICES, self.services),
            (map_names::BACKENDS, self.backends),
            (map_names::CONNTRACK, self.conntrack),
            (map_names::AFFINITY, self.affinity),
            (map_names::MEMBERS, self.members),
            (map_names::FRAGS, self.frags),
        ]
    }
}

/// Everything fixed when the eBPF object is loaded.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Map capacities (only effective when the maps are created, not when pinned ones are reused).
    pub sizes: MapSizes,
    /// Service CIDR whose unallocated addresses are refused; `None` disables.
    pub service_cidr: Option<(Ipv4Addr, u8)>,
    /// Conntrack lifetimes (the `CT_TIMEOUTS` global).
    pub ct_timeouts: CtTimeouts,
    /// SNAT source ports of flows from outside to backends on other nodes (the `SNAT_PORTS` global).
    pub snat_ports: PortRange,
    /// Entries per Maglev table, a prime (the `MAGLEV_M` global; the MAGLEV array holds
    /// `sizes.maglev_tables` tables of this size).
    pub maglev_m: u32,
    /// `--socket-lb host`: the cookie of the node's network namespace; 0: every namespace
    /// (the `HOST_NETNS_COOKIE` global).
    pub host_netns_cookie: u64,
    /// `xlb trace`: the programs read the maps but write none (the `DRY_RUN` global) and
    /// record what they did in the unpinned `TRACE` map. Never set for attached programs.
    pub dry_run: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            sizes: MapSizes::default(),
            service_cidr: None,
            ct_timeouts: CtTimeouts::default(),
            snat_ports: PortRange::default(),
            maglev_m: lb_common::DEFAULT_MAGLEV_M,
            host_netns_cookie: 0,
            dry_run: false,
        }
    }
}

impl LoadOptions {
    /// Load xlb's eBPF object with these sizes and globals, its maps pinned under `pins` (reusing
    /// pins an earlier agent left) or, with `None`, unpinned (benchmarks, tests). The programs are
    /// not loaded into the kernel yet ([`load_programs`]).
    pub fn load_object(&self, pins: Option<&PinLayout>) -> Result<Ebpf> {
        self.load_object_from(crate::ebpf_object(), pins)
    }

    /// [`LoadOptions::load_object`] of another build of the object (e.g. a mutant the packet
    /// tests are run against).
    pub fn load_object_from(&self, obj: &[u8], pins: Option<&PinLayout>) -> Result<Ebpf> {
        self.load_object_pinned_at(obj, pins, &[])
    }

    /// (map name, capacity) of every map whose capacity the loader sets (from flags); a pinned
    /// map reused keeps the capacity it was created with.
    pub fn max_entries_overrides(&self) -> Vec<(&'static str, u32)> {
        let mut v = self.sizes.by_name().to_vec();
        v.push((map_names::MAGLEV, self.sizes.maglev_tables.max(1).saturating_mul(self.maglev_m)));
        v
    }

    /// [`LoadOptions::load_object_from`], with some maps pinned at another path than
    /// `pins.map(name)` (`pin_at`: a migration creates its new map under a temporary pin).
    pub fn load_object_pinned_at(
        &self,
        obj: &[u8],
        pins: Option<&PinLayout>,
        pin_at: &[(&'static str, PathBuf)],
    ) -> Result<Ebpf> {
        if obj.is_empty() {
            return Err(Error::EmptyObject);
        }
        let mut loader = EbpfLoader::new();
        for (name, size) in self.max_entries_overrides() {
            loader.map_max_entries(name, size);
        }
        let map_paths: Vec<(&'static str, PathBuf)> = match pins {
            Some(pins) => map_names::ALL
                .iter()
                .map(|n| match pin_at.iter().find(|(m, _)| m == n) {
                    Some((_, p)) => (*n, p.clone()),
                    None => (*n, pins.map(n)),
                })
                .collect(),
            None => Vec::new(),
        };
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let (cidr_addr, cidr_mask) = service_cidr_words(self.service_cidr);
        let dry_run = u32::from(self.dry_run);
        loader
            .override_global(global_names::SERVICE_CIDR_ADDR, &cidr_addr, true)
            .override_global(global_names::SERVICE_CIDR_MASK, &cidr_mask, true)
            .override_global(global_names::CT_TIMEOUTS, &self.ct_timeouts, true)
            .override_global(global_names::SNAT_PORTS, &self.snat_ports, true)
            .override_global(global_names::MAGLEV_M, &self.maglev_m, true)
            .override_global(global_names::HOST_NETNS_COOKIE, &self.host_netns_cookie, true)
            .override_global(global_names::DRY_RUN, &dry_run, true)
            // Every writer of the Service maps goes through `lb_model::store::execute`, which
            // keeps the frontend pre-filter: the programs may trust it.
            .override_global(global_names::FEFILTER_ON, &1u32, true);
        Ok(loader.load(obj)?)
    }
}

/// Load the programs `names` (tc classifiers or XDP) of a loaded object into the kernel (the
/// verifier runs here; its log is in the error).
pub fn load_programs(ebpf: &mut Ebpf, names: &[&'static str]) -> Result<()> {
    for &name in names {
        let prog = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
        let loaded = match prog {
            aya::programs::Program::Xdp(xdp) => xdp.load(),
            aya::programs::Program::CgroupSockAddr(sock) => sock.load(),
            other => {
                let tc: &mut SchedClassifier = other
                    .try_into()
                    .map_err(|source| Error::Program { name, source })?;
                tc.load()
            }
        };
        loaded.map_err(|source| Error::Program { name, source })?;
    }
    Ok(())
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
}
