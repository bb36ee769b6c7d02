//! The Service maps as an `lb_model::store::MapStore` ([`AyaStore`]): over a loaded object's
//! maps ([`ObjectMaps`], what the agent executes plans on and reads back at start) or over the
//! pins ([`PinnedMaps`], for `xlb inspect`, metrics and tests).
//!
//! The Service maps are SERVICES, BACKENDS, MEMBERS (hashes), SRC_RANGES (an LPM trie,
//! created with `BPF_F_NO_PREALLOC` as the kernel requires, keyed by aya's
//! `lpm_trie::Key<SrcRangeKey>`) and MAGLEV (an array of `tables * M` backend ids). A Maglev
//! table is written and read with one batch syscall ([`crate::bpf_batch::array_update`]),
//! or entry by entry on a kernel without batch operations on arrays. The array's shape comes
//! from its length ([`Geometry::from_len`]: M is the largest prime factor), so the pins alone
//! describe it (`xlb inspect`), whatever `--maglev-table-size` the agent was started with.

use std::borrow::BorrowMut;
use std::path::Path;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, IterableMap, Map, MapData, MapError, PerCpuArray};
use aya::Ebpf;
use lb_common::{
    map_names, AffinityKey, AffinityValue, Backend, CtKey, CtValue, FragKey, FragValue, MemberKey, MemberValue,
    ServiceKey, ServiceValue, SrcRangeKey, Stat, SvcName, SvcStats, STAT_COUNT,
};
use lb_model::maglev::Geometry;
use lb_model::store::{BatchClass, MapStore, MapWrite};
use lb_model::{Applied, ReadBack};

use super::{Error, PinLayout, Result};

/// SERVICES, BACKENDS, MEMBERS, SRC_RANGES and MAGLEV as a [`MapStore`], borrowed from an
/// [`ObjectMaps`] (`T = &mut MapData`) or a [`PinnedMaps`] (`T = MapData`).
pub struct AyaStore<'m, T> {
    services: &'m mut HashMap<T, ServiceKey, ServiceValue>,
    backends: &'m mut HashMap<T, u32, Backend>,
    members: &'m mut HashMap<T, MemberKey, MemberValue>,
    src_ranges: &'m mut LpmTrie<T, SrcRangeKey, u8>,
    maglev: &'m mut Array<T, u32>,
    /// The frontend pre-filter (`None`: a handle without it, which cannot write it).
    fefilter: Option<&'m mut Array<T, u64>>,
    geometry: Geometry,
    /// SVCNAME and SVCSTATS (`None`: pins of a build without Service names; reads see no
    /// names, writes fail).
    svc: Option<SvcMaps<'m, T>>,
}

/// SVCNAME and SVCSTATS of an [`AyaStore`].
struct SvcMaps<'m, T> {
    names: &'m mut HashMap<T, u32, SvcName>,
    stats: &'m mut PerCpuArray<T, SvcStats>,
    /// SVCNAME's capacity: ids `1..=max`.
    max: u32,
}

/// The Service port maps of an object or of the pins, typed.
pub struct SvcMapsOwned<T> {
    pub names: HashMap<T, u32, SvcName>,
    pub stats: PerCpuArray<T, SvcStats>,
    pub max: u32,
}

impl<T: BorrowMut<MapData>> SvcMapsOwned<T> {
    fn of(names: HashMap<T, u32, SvcName>, stats: PerCpuArray<T, SvcStats>) -> Result<Self> {
        let max = IterableMap::map(&names)
            .info()
            .map_err(map_err(map_names::SVCNAME))?
            .max_entries();
        Ok(SvcMapsOwned { names, stats, max })
    }

    fn borrow(&mut self) -> SvcMaps<'_, T> {
        SvcMaps { names: &mut self.names, stats: &mut self.stats, max: self.max }
    }

    /// Every id's counters (`1..=max`), summed over the CPUs: one batch lookup, or a lookup
    /// per id on a kernel without batch operations on arrays. Index `i` holds id `i` (0: the
    /// frontends without an id, never counted).
    /// `upto`: only ids `0..=upto` (the largest id in use), so a reader pays for the Service
    /// ports that exist, not for the map's capacity.
    pub fn stats(&self, upto: Option<u32>) -> Result<Vec<SvcStats>> {
        let name = map_names::SVCSTATS;
        let map: &MapData = IterableMap::map(&self.stats);
        let cap = map.info().map_err(map_err(name))?.max_entries();
        let len = upto.map_or(cap, |u| u.saturating_add(1).min(cap));
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| Error::Io { path: "/sys/devices/system/cpu/possible".into(), source: e })?;
        match crate::bpf_batch::percpu_array_lookup(map, len, std::mem::size_of::<SvcStats>(), cpus) {
            Ok(words) => {
                const W: usize = std::mem::size_of::<SvcStats>() / 8;
                let per_entry = cpus * W;
                return Ok(words
                    .chunks_exact(per_entry)
                    .map(|entry| {
                        let mut sum = [0u64; W];
                        for cpu in entry.chunks_exact(W) {
                            for (s, v) in sum.iter_mut().zip(cpu) {
                                *s = s.wrapping_add(*v);
                            }
                        }
                        // Field order of the #[repr(C)] struct of u64s.
                        SvcStats {
                            new_flows: sum[0],
                            packets: sum[1],
                            bytes: sum[2],
                            refused_no_endpoints: sum[3],
                            dropped_no_local_endpoint: sum[4],
                            dropped_source_range: sum[5],
                            dropped_no_backend: sum[6],
                            dropped_snat_ports_exhausted: sum[7],
                        }
                    })
                    .collect());
            }
            Err(e) if crate::bpf_batch::is_unsupported(&e) => {}
            Err(e) => return Err(batch_err_of(name, e)),
        }
        (0..len)
            .map(|i| {
                let per_cpu = self.stats.get(&i, 0).map_err(map_err(name))?;
                Ok(per_cpu.iter().fold(SvcStats::default(), |a, v| a.plus(v)))
            })
            .collect()
    }

    /// Every SVCNAME entry.
    pub fn names(&self) -> Result<Vec<(u32, SvcName)>> {
        let mut out = Vec::new();
        for_each(&self.names, map_names::SVCNAME, |id, v| out.push((id, v)))?;
        Ok(out)
    }
}

impl<T: BorrowMut<MapData>> SvcMaps<'_, T> {
    /// Start the counters of `ids` from zero (their ids are getting a new name).
    fn zero(&mut self, ids: &[u32]) -> Result<()> {
        let name = map_names::SVCSTATS;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| Error::Io { path: "/sys/devices/system/cpu/possible".into(), source: e })?;
        let map: &MapData = IterableMap::map(&*self.stats);
        // Ids past the array (read back from a larger map) have no counters.
        let len = map.info().map_err(map_err(name))?.max_entries();
        let ids: Vec<u32> = ids.iter().copied().filter(|id| *id < len).collect();
        match crate::bpf_batch::percpu_array_zero(map, &ids, std::mem::size_of::<SvcStats>(), cpus) {
            Ok(()) => return Ok(()),
            Err(e) if crate::bpf_batch::is_unsupported(&e) => {}
            Err(e) => return Err(batch_err_of(name, e)),
        }
        for id in ids {
            let zeros = aya::maps::PerCpuValues::try_from(vec![SvcStats::default(); cpus])
                .map_err(|source| Error::Io { path: "/sys/devices/system/cpu/possible".into(), source })?;
            self.stats.set(id, zeros, 0).map_err(map_err(name))?;
        }
        Ok(())
    }
}

/// The shape of a MAGLEV array from its length.
fn geometry_of<T: std::borrow::Borrow<MapData>>(a: &Array<T, u32>) -> Result<Geometry> {
    Geometry::from_len(a.len()).ok_or(Error::Map {
        name: map_names::MAGLEV,
        source: MapError::InvalidName { name: "MAGLEV array of length 0".into() },
    })
}

/// The array index range of Maglev table `table`, checked against the array.
fn table_range(g: Geometry, table: u32) -> Result<u32> {
    if table >= g.tables {
        return Err(Error::Map {
            name: map_names::MAGLEV,
            source: MapError::OutOfBounds { index: table.saturating_mul(g.m), max_entries: g.m * g.tables },
        });
    }
    Ok(table * g.m)
}

/// The SRC_RANGES value of every entry (the trie is a set: presence is the answer).
const SRC_RANGE_PRESENT: u8 = 1;

fn map_err(name: &'static str) -> impl Fn(MapError) -> Error {
    move |source| Error::Map { name, source }
}

/// Deleting what is already gone is success (a restart may replay deletes).
fn ignore_missing(r: Result<(), MapError>, name: &'static str) -> Result<()> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other.map_err(map_err(name)),
    }
}

/// Every entry of `map`, each handed to `f`: one `BPF_MAP_LOOKUP_BATCH` per 16k entries, or
/// aya's iterator (two syscalls per entry) on a kernel without batch lookups.
fn for_each<T: BorrowMut<MapData>, K: aya::Pod, V: aya::Pod>(
    map: &HashMap<T, K, V>,
    name: &'static str,
    mut f: impl FnMut(K, V),
) -> Result<()> {
    match crate::bpf_batch::hash_lookup_all::<K, V>(IterableMap::map(map)) {
        Ok((keys, values)) => {
            keys.into_iter().zip(values).for_each(|(k, v)| f(k, v));
            return Ok(());
        }
        Err(e) if crate::bpf_batch::is_unsupported(&e) => {}
        Err(e) => return Err(batch_err_of(name, e)),
    }
    for item in map.iter() {
        let (k, v) = item.map_err(map_err(name))?;
        f(k, v);
    }
    Ok(())
}

impl<T: BorrowMut<MapData>> MapStore for AyaStore<'_, T> {
    type Error = Error;

    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        self.services.insert(key, value, 0).map_err(map_err(map_names::SERVICES))
    }
    fn delete_service(&mut self, key: &ServiceKey) -> Result<()> {
        ignore_missing(self.services.remove(key), map_names::SERVICES)
    }
    fn put_backend(&mut self, id: u32, value: &Backend) -> Result<()> {
        self.backends.insert(id, value, 0).map_err(map_err(map_names::BACKENDS))
    }
    fn delete_backend(&mut self, id: u32) -> Result<()> {
        ignore_missing(self.backends.remove(&id), map_names::BACKENDS)
    }
    fn put_member(&mut self, key: &MemberKey, value: &MemberValue) -> Result<()> {
        self.members.insert(key, value, 0).map_err(map_err(map_names::MEMBERS))
    }
    fn delete_member(&mut self, key: &MemberKey) -> Result<()> {
        ignore_missing(self.members.remove(key), map_names::MEMBERS)
    }
    fn put_src_range(&mut self, prefix_len: u32, key: &SrcRangeKey) -> Result<()> {
        self.src_ranges
            .insert(&Key::new(prefix_len, *key), SRC_RANGE_PRESENT, 0)
            .map_err(map_err(map_names::SRC_RANGES))
    }
    fn delete_src_range(&mut self, prefix_len: u32, key: &SrcRangeKey) -> Result<()> {
        // An exact-prefix delete (the kernel's trie delete does no longest-prefix match).
        ignore_missing(self.src_ranges.remove(&Key::new(prefix_len, *key)), map_names::SRC_RANGES)
    }
    fn for_each_service(&self, f: &mut dyn FnMut(&ServiceKey, &ServiceValue)) -> Result<()> {
        for_each(self.services, map_names::SERVICES, |k, v| f(&k, &v))
    }
    fn for_each_backend(&self, f: &mut dyn FnMut(u32, &Backend)) -> Result<()> {
        for_each(self.backends, map_names::BACKENDS, |id, b| f(id, &b))
    }
    fn for_each_member(&self, f: &mut dyn FnMut(&MemberKey, &MemberValue)) -> Result<()> {
        for_each(self.members, map_names::MEMBERS, |k, v| f(&k, &v))
    }
    fn for_each_src_range(&self, f: &mut dyn FnMut(u32, &SrcRangeKey)) -> Result<()> {
        // Keys only: the value is always the same, and a value lookup on a trie is a
        // longest-prefix match, not the entry the key came from.
        for key in self.src_ranges.keys() {
            let key = key.map_err(map_err(map_names::SRC_RANGES))?;
            f(key.prefix_len(), &key.data());
        }
        Ok(())
    }
    fn maglev_geometry(&self) -> Geometry {
        self.geometry
    }
    fn put_maglev_table(&mut self, table: u32, entries: &[u32]) -> Result<()> {
        let start = table_range(self.geometry, table)?;
        if entries.len() != self.geometry.m as usize {
            return Err(Error::Map {
                name: map_names::MAGLEV,
                source: MapError::InvalidValueSize { size: entries.len(), expected: self.geometry.m as usize },
            });
        }
        match crate::bpf_batch::array_update(IterableMap::map(&*self.maglev), start, entries) {
            Ok(()) => return Ok(()),
            Err(e) if crate::bpf_batch::is_unsupported(&e) => {
                tracing::debug!(error = %e, "no batch update on arrays; writing the Maglev table entry by entry");
            }
            Err(e) => return Err(batch_err(e)),
        }
        for (i, id) in entries.iter().enumerate() {
            self.maglev.set(start + i as u32, id, 0).map_err(map_err(map_names::MAGLEV))?;
        }
        Ok(())
    }
    fn write_batch(&mut self, writes: &[MapWrite]) -> (usize, Option<Error>) {
        let Some(first) = writes.first() else { return (0, None) };
        let class = first.batch_class();
        let done = match class {
            BatchClass::PutService | BatchClass::DeleteService => batch_parts(writes, |w| match w {
                MapWrite::PutService(k, v) if class == BatchClass::PutService => Some((*k, Some(*v))),
                MapWrite::DeleteService(k) if class == BatchClass::DeleteService => Some((*k, None)),
                _ => None,
            })
            .and_then(|(k, v): (Vec<ServiceKey>, Vec<ServiceValue>)| {
                let map: &MapData = IterableMap::map(&*self.services);
                hash_batch(map, map_names::SERVICES, &k, &v, class == BatchClass::DeleteService)
            }),
            BatchClass::PutBackend | BatchClass::DeleteBackend => batch_parts(writes, |w| match w {
                MapWrite::PutBackend(id, v) if class == BatchClass::PutBackend => Some((*id, Some(*v))),
                MapWrite::DeleteBackend(id) if class == BatchClass::DeleteBackend => Some((*id, None)),
                _ => None,
            })
            .and_then(|(k, v): (Vec<u32>, Vec<Backend>)| {
                let map: &MapData = IterableMap::map(&*self.backends);
                hash_batch(map, map_names::BACKENDS, &k, &v, class == BatchClass::DeleteBackend)
            }),
            BatchClass::PutMember | BatchClass::DeleteMember => batch_parts(writes, |w| match w {
                MapWrite::PutMember(k, v) if class == BatchClass::PutMember => Some((*k, Some(*v))),
                MapWrite::DeleteMember(k) if class == BatchClass::DeleteMember => Some((*k, None)),
                _ => None,
            })
            .and_then(|(k, v): (Vec<MemberKey>, Vec<MemberValue>)| {
                let map: &MapData = IterableMap::map(&*self.members);
                hash_batch(map, map_names::MEMBERS, &k, &v, class == BatchClass::DeleteMember)
            }),
            BatchClass::PutSvcName | BatchClass::DeleteSvcName => self.svc_name_batch(writes, class),
            _ => None,
        };
        if let Some(done) = done {
            return done;
        }
        // Another class, a mixed slice, or no batch operations in this kernel: one by one.
        for (i, w) in writes.iter().enumerate() {
            if let Err(e) = w.apply_to(self) {
                return (i, Some(e));
            }
        }
        (writes.len(), None)
    }
    fn put_filter_word(&mut self, word: u32, value: u64) -> Result<()> {
        let name = map_names::FEFILTER;
        let Some(f) = self.fefilter.as_mut() else {
            return Err(Error::Map { name, source: MapError::InvalidName { name: name.into() } });
        };
        f.set(word, value, 0).map_err(map_err(name))
    }
    fn read_filter_words(&self) -> Result<Vec<u64>> {
        let Some(f) = self.fefilter.as_ref() else {
            return Ok(Vec::new());
        };
        (0..f.len())
            .map(|i| f.get(&i, 0).map_err(map_err(map_names::FEFILTER)))
            .collect()
    }
    fn put_svc_name(&mut self, id: u32, name: &SvcName) -> Result<()> {
        let svc = self.svc_maps(map_names::SVCNAME)?;
        svc.zero(&[id])?;
        svc.names.insert(id, name, 0).map_err(map_err(map_names::SVCNAME))
    }
    fn delete_svc_name(&mut self, id: u32) -> Result<()> {
        let svc = self.svc_maps(map_names::SVCNAME)?;
        ignore_missing(svc.names.remove(&id), map_names::SVCNAME)
    }
    fn for_each_svc_name(&self, f: &mut dyn FnMut(u32, &SvcName)) -> Result<()> {
        match &self.svc {
            Some(svc) => for_each(svc.names, map_names::SVCNAME, |id, v| f(id, &v)),
            None => Ok(()),
        }
    }
    fn svc_ports_max(&self) -> u32 {
        self.svc.as_ref().map_or(lb_common::DEFAULT_SVC_PORTS_MAX, |s| s.max)
    }
    fn read_maglev_table(&self, table: u32) -> Result<Vec<u32>> {
        let start = table_range(self.geometry, table)?;
        let m = self.geometry.m;
        match crate::bpf_batch::array_lookup(IterableMap::map(&*self.maglev), start, m) {
            Ok(v) => return Ok(v),
            Err(e) if crate::bpf_batch::is_unsupported(&e) => {}
            Err(e) => return Err(batch_err(e)),
        }
        (start..start + m)
            .map(|i| self.maglev.get(&i, 0).map_err(map_err(map_names::MAGLEV)))
            .collect()
    }
}

impl<'m, T: BorrowMut<MapData>> AyaStore<'m, T> {
    fn svc_maps(&mut self, name: &'static str) -> Result<&mut SvcMaps<'m, T>> {
        self.svc
            .as_mut()
            .ok_or(Error::Map { name, source: MapError::InvalidName { name: name.into() } })
    }

    /// SVCNAME puts (the ids' counters zeroed first) or deletes as one batch; None: write
    /// them one by one.
    fn svc_name_batch(&mut self, writes: &[MapWrite], class: BatchClass) -> Option<(usize, Option<Error>)> {
        let (ids, names): (Vec<u32>, Vec<SvcName>) = batch_parts(writes, |w| match w {
            MapWrite::PutSvcName(id, v) if class == BatchClass::PutSvcName => Some((*id, Some(*v))),
            MapWrite::DeleteSvcName(id) if class == BatchClass::DeleteSvcName => Some((*id, None)),
            _ => None,
        })?;
        let svc = self.svc.as_mut()?;
        let delete = class == BatchClass::DeleteSvcName;
        if !delete {
            if let Err(e) = svc.zero(&ids) {
                return Some((0, Some(e)));
            }
        }
        let map: &MapData = IterableMap::map(&*svc.names);
        hash_batch(map, map_names::SVCNAME, &ids, &names, delete)
    }
}

/// A batch syscall's error as a map error of MAGLEV.
fn batch_err(e: std::io::Error) -> Error {
    batch_err_of(map_names::MAGLEV, e)
}

/// A batch syscall's error as a map error of `name`.
fn batch_err_of(name: &'static str, e: std::io::Error) -> Error {
    Error::Map { name, source: MapError::SyscallError(aya::sys::SyscallError { call: "bpf_map_batch", io_error: e }) }
}

/// `writes` (all of one [`BatchClass`]) as the keys and values of one batch: puts give both,
/// deletes keys only. None for a write of another class (never passed by the executor).
fn batch_parts<K: Copy, V: Copy>(
    writes: &[MapWrite],
    part: impl Fn(&MapWrite) -> Option<(K, Option<V>)>,
) -> Option<(Vec<K>, Vec<V>)> {
    let mut keys = Vec::with_capacity(writes.len());
    let mut values = Vec::with_capacity(writes.len());
    for w in writes {
        let (k, v) = part(w)?;
        keys.push(k);
        values.extend(v);
    }
    Some((keys, values))
}

/// One batch update (`delete == false`) or delete of `keys` (`values`) in the hash map `map`:
/// `Some((performed, error))`, or None when the kernel has no batch operation for it (the
/// caller then writes entry by entry).
fn hash_batch<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    name: &'static str,
    keys: &[K],
    values: &[V],
    delete: bool,
) -> Option<(usize, Option<Error>)> {
    let r = if delete {
        crate::bpf_batch::hash_delete(map, keys)
    } else {
        crate::bpf_batch::hash_update(map, keys, values)
    };
    match r {
        Ok(()) => Some((keys.len(), None)),
        Err((0, e)) if crate::bpf_batch::is_unsupported(&e) => None,
        Err((n, e)) => Some((n, Some(batch_err_of(name, e)))),
    }
}

/// The Service maps of a loaded object (pinned or not), typed.
pub struct ObjectMaps<'a> {
    pub services: HashMap<&'a mut MapData, ServiceKey, ServiceValue>,
    pub backends: HashMap<&'a mut MapData, u32, Backend>,
    pub members: HashMap<&'a mut MapData, MemberKey, MemberValue>,
    pub src_ranges: LpmTrie<&'a mut MapData, SrcRangeKey, u8>,
    pub maglev: Array<&'a mut MapData, u32>,
    /// The frontend pre-filter (absent from an object built without it).
    pub fefilter: Option<Array<&'a mut MapData, u64>>,
    /// MAGLEV's shape (from its length).
    pub maglev_geometry: Geometry,
    /// SVCNAME and SVCSTATS.
    pub svc: Option<SvcMapsOwned<&'a mut MapData>>,
}

impl<'a> ObjectMaps<'a> {
    pub fn of(ebpf: &'a mut Ebpf) -> Result<Self> {
        let mut services = None;
        let mut backends = None;
        let mut members = None;
        let mut src_ranges = None;
        let mut maglev = None;
        let mut fefilter = None;
        let mut svcname = None;
        let mut svcstats = None;
        for (name, map) in ebpf.maps_mut() {
            match name {
                n if n == map_names::SERVICES => services = Some(map),
                n if n == map_names::BACKENDS => backends = Some(map),
                n if n == map_names::MEMBERS => members = Some(map),
                n if n == map_names::SRC_RANGES => src_ranges = Some(map),
                n if n == map_names::MAGLEV => maglev = Some(map),
                n if n == map_names::FEFILTER => fefilter = Some(map),
                n if n == map_names::SVCNAME => svcname = Some(map),
                n if n == map_names::SVCSTATS => svcstats = Some(map),
                _ => {}
            }
        }
        fn found<'m>(name: &'static str, m: Option<&'m mut Map>) -> Result<&'m mut Map> {
            m.ok_or(Error::Map { name, source: MapError::InvalidName { name: name.into() } })
        }
        fn typed<'m, K: aya::Pod, V: aya::Pod>(
            name: &'static str,
            m: Option<&'m mut Map>,
        ) -> Result<HashMap<&'m mut MapData, K, V>> {
            HashMap::try_from(found(name, m)?).map_err(map_err(name))
        }
        let maglev: Array<&mut MapData, u32> =
            Array::try_from(found(map_names::MAGLEV, maglev)?).map_err(map_err(map_names::MAGLEV))?;
        let maglev_geometry = geometry_of(&maglev)?;
        Ok(ObjectMaps {
            services: typed(map_names::SERVICES, services)?,
            backends: typed(map_names::BACKENDS, backends)?,
            members: typed(map_names::MEMBERS, members)?,
            src_ranges: LpmTrie::try_from(found(map_names::SRC_RANGES, src_ranges)?)
                .map_err(map_err(map_names::SRC_RANGES))?,
            maglev,
            maglev_geometry,
            fefilter: match fefilter {
                Some(m) => Some(Array::try_from(m).map_err(map_err(map_names::FEFILTER))?),
                None => None,
            },
            svc: match (svcname, svcstats) {
                (Some(n), Some(s)) => Some(SvcMapsOwned::of(
                    HashMap::try_from(n).map_err(map_err(map_names::SVCNAME))?,
                    PerCpuArray::try_from(s).map_err(map_err(map_names::SVCSTATS))?,
                )?),
                _ => None,
            },
        })
    }

    pub fn store(&mut self) -> AyaStore<'_, &'a mut MapData> {
        AyaStore {
            services: &mut self.services,
            backends: &mut self.backends,
            members: &mut self.members,
            src_ranges: &mut self.src_ranges,
            maglev: &mut self.maglev,
            fefilter: self.fefilter.as_mut(),
            geometry: self.maglev_geometry,
            svc: self.svc.as_mut().map(SvcMapsOwned::borrow),
        }
    }
}

/// Access to the pinned maps of a running (or exited) agent, for `xlb inspect`, metrics and
/// tests. Opening by path needs no program load.
pub struct PinnedMaps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub backends: HashMap<MapData, u32, Backend>,
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub members: HashMap<MapData, MemberKey, MemberValue>,
    pub src_ranges: LpmTrie<MapData, SrcRangeKey, u8>,
    pub frags: HashMap<MapData, FragKey, FragValue>,
    pub stats: PerCpuArray<MapData, u64>,
    pub maglev: Array<MapData, u32>,
    /// MAGLEV's shape (from its length).
    pub maglev_geometry: Geometry,
    /// SVCNAME and SVCSTATS; `None` when the pins are of a build without Service names.
    pub svc: Option<SvcMapsOwned<MapData>>,
}

fn open_pinned(pins: &PinLayout, name: &'static str) -> Result<Map> {
    let path = pins.map(name);
    let data = MapData::from_pin(&path).map_err(map_err(name))?;
    Map::from_map_data(data).map_err(map_err(name))
}

impl PinnedMaps {
    pub fn open(pin_path: &Path) -> Result<Self> {
        let pins = PinLayout::new(pin_path);
        macro_rules! typed {
            ($name:expr) => {
                open_pinned(&pins, $name)?.try_into().map_err(map_err($name))?
            };
        }
        let maglev: Array<MapData, u32> = typed!(map_names::MAGLEV);
        let maglev_geometry = geometry_of(&maglev)?;
        Ok(PinnedMaps {
            maglev,
            maglev_geometry,
            services: typed!(map_names::SERVICES),
            backends: typed!(map_names::BACKENDS),
            conntrack: typed!(map_names::CONNTRACK),
            affinity: typed!(map_names::AFFINITY),
            members: typed!(map_names::MEMBERS),
            src_ranges: typed!(map_names::SRC_RANGES),
            frags: typed!(map_names::FRAGS),
            stats: typed!(map_names::STATS),
            svc: if pins.map(map_names::SVCNAME).exists() && pins.map(map_names::SVCSTATS).exists() {
                Some(SvcMapsOwned::of(typed!(map_names::SVCNAME), typed!(map_names::SVCSTATS))?)
            } else {
                None
            },
        })
    }

    /// The Service maps as a [`MapStore`].
    pub fn store(&mut self) -> AyaStore<'_, MapData> {
        AyaStore {
            services: &mut self.services,
            backends: &mut self.backends,
            members: &mut self.members,
            src_ranges: &mut self.src_ranges,
            maglev: &mut self.maglev,
            fefilter: None,
            geometry: self.maglev_geometry,
            svc: self.svc.as_mut().map(SvcMapsOwned::borrow),
        }
    }

    /// The shape of the MAGLEV array pinned under `pin_path`; None when none is pinned.
    pub fn pinned_maglev_geometry(pin_path: &Path) -> Result<Option<Geometry>> {
        let path = PinLayout::new(pin_path).map(map_names::MAGLEV);
        if !path.exists() {
            return Ok(None);
        }
        let data = MapData::from_pin(&path).map_err(map_err(map_names::MAGLEV))?;
        let len = data.info().map_err(map_err(map_names::MAGLEV))?.max_entries();
        Ok(Geometry::from_len(len))
    }

    /// Unpin the MAGLEV array under `pin_path` when its shape is not `want` (another
    /// `--maglev-table-size` or `--maglev-tables` than the agent that created it), so the next
    /// load creates one of the wanted shape: the programs index it with the load-time M, so a
    /// pinned array of another M must not be reused. The programs still attached keep the old
    /// array until the new ones replace them. Returns the old shape when it unpinned it; the
    /// caller then restores the tables the masters name into the new array
    /// (`lb_model::planner::restore_tables`) before the new programs are attached.
    pub fn unpin_stale_maglev(pin_path: &Path, want: Geometry) -> Result<Option<Geometry>> {
        match Self::pinned_maglev_geometry(pin_path)? {
            Some(old) if old != want => {
                let path = PinLayout::new(pin_path).map(map_names::MAGLEV);
                std::fs::remove_file(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
                Ok(Some(old))
            }
            _ => Ok(None),
        }
    }

    /// The Service maps read back (`lb_model::ReadBack`).
    pub fn applied(&mut self) -> Result<Applied> {
        ReadBack::read(&self.store())
    }

    /// Datapath counters summed over CPUs, by `Stat`.
    pub fn stats(&self) -> Result<Vec<(Stat, u64)>> {
        let mut out = Vec::with_capacity(STAT_COUNT as usize);
        for s in Stat::ALL {
            let v = self.stats.get(&(s as u32), 0).map_err(map_err(map_names::STATS))?;
            out.push((s, v.iter().sum()));
        }
        Ok(out)
    }
}
