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
use std::collections::VecDeque;
use std::ops::Range;
use std::os::fd::AsFd;
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
        let delete = matches!(
            class,
            BatchClass::DeleteService | BatchClass::DeleteBackend | BatchClass::DeleteMember
        );
        let done = match class {
            BatchClass::PutService | BatchClass::DeleteService => {
                batch_parts(writes, service_part(delete)).and_then(|(k, v)| {
                    hash_batch(IterableMap::map(&*self.services), map_names::SERVICES, &k, &v, delete)
                })
            }
            BatchClass::PutBackend | BatchClass::DeleteBackend => {
                batch_parts(writes, backend_part(delete)).and_then(|(k, v)| {
                    hash_batch(IterableMap::map(&*self.backends), map_names::BACKENDS, &k, &v, delete)
                })
            }
            BatchClass::PutMember | BatchClass::DeleteMember => {
                batch_parts(writes, member_part(delete)).and_then(|(k, v)| {
                    hash_batch(IterableMap::map(&*self.members), map_names::MEMBERS, &k, &v, delete)
                })
            }
            BatchClass::PutSvcName | BatchClass::DeleteSvcName => self.svc_name_batch(writes, class),
            _ => None,
        };
        if let Some(done) = done {
            return done;
        }
        // Another class, a mixed slice, or no batch operations in this kernel: one by one.
        per_entry(self, writes)
    }
    fn write_pieces(
        &mut self,
        len: usize,
        encode: &mut dyn FnMut(Range<usize>) -> Vec<MapWrite>,
        done: &mut dyn FnMut(Range<usize>),
    ) -> (usize, Option<Error>) {
        let class = if len >= PIPELINE_MIN { encode(0..1).first().map(MapWrite::batch_class) } else { None };
        let piped = match class {
            Some(c @ (BatchClass::PutService | BatchClass::DeleteService)) => {
                let fd = IterableMap::map(&*self.services).fd().as_fd();
                let delete = c == BatchClass::DeleteService;
                Some(pipelined(hash_piece(fd, map_names::SERVICES, delete), len, encode, done, service_part(delete)))
            }
            Some(c @ (BatchClass::PutBackend | BatchClass::DeleteBackend)) => {
                let fd = IterableMap::map(&*self.backends).fd().as_fd();
                let delete = c == BatchClass::DeleteBackend;
                Some(pipelined(hash_piece(fd, map_names::BACKENDS, delete), len, encode, done, backend_part(delete)))
            }
            Some(c @ (BatchClass::PutMember | BatchClass::DeleteMember)) => {
                let fd = IterableMap::map(&*self.members).fd().as_fd();
                let delete = c == BatchClass::DeleteMember;
                Some(pipelined(hash_piece(fd, map_names::MEMBERS, delete), len, encode, done, member_part(delete)))
            }
            Some(BatchClass::PutSvcName) => self.svc_name_pipelined(len, encode, done),
            // Small batches (a thread is not worth it), SVCNAME deletes (rare), the rest: in
            // one piece, as the default does.
            _ => None,
        };
        // Where the rest starts: `len` (all written, or failed), or the first write the
        // pipeline did not take (another class, or no batch operations in this kernel).
        let from = match piped {
            Some(Piped::Written(n, None)) => n,
            Some(Piped::Written(n, Some((name, e)))) => return (n, Some(batch_err_of(name, e))),
            Some(Piped::Unsupported) | None => 0,
        };
        if from >= len {
            return (len, None);
        }
        let writes = encode(from..len);
        let (n, err) = if from == 0 {
            self.write_batch(&writes)
        } else {
            // After a pipelined part: the rest one by one (never happens with the executor,
            // which passes one class per batch).
            per_entry(self, &writes)
        };
        let n = n.min(writes.len());
        done(from..from + n);
        (from + n, if n < writes.len() { err } else { None })
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

    /// SVCNAME puts pipelined ([`pipelined`]): each piece zeroes its ids' counters, then
    /// writes their names, as [`AyaStore::svc_name_batch`] does for a whole batch. None: no
    /// SVCNAME here (the caller's one-piece path reports it).
    fn svc_name_pipelined(
        &mut self,
        len: usize,
        encode: &mut dyn FnMut(Range<usize>) -> Vec<MapWrite>,
        done: &mut dyn FnMut(Range<usize>),
    ) -> Option<Piped> {
        let svc = self.svc.as_mut()?;
        let stats: &MapData = IterableMap::map(&*svc.stats);
        // Ids past the array (read back from a larger map) have no counters.
        let stats_len = stats.info().ok()?.max_entries();
        let cpus = aya::util::nr_cpus().ok()?;
        let names = IterableMap::map(&*svc.names).fd().as_fd();
        let stats = stats.fd().as_fd();
        let write = move |ids: &[u32], values: &[SvcName]| -> Written {
            let zero: Vec<u32> = ids.iter().copied().filter(|id| *id < stats_len).collect();
            crate::bpf_batch::percpu_array_zero_fd(stats, &zero, std::mem::size_of::<SvcStats>(), cpus)
                .map_err(|e| (0, map_names::SVCSTATS, e))?;
            crate::bpf_batch::hash_update_fd(names, ids, values).map_err(|(n, e)| (n, map_names::SVCNAME, e))
        };
        Some(pipelined(write, len, encode, done, |w| match w {
            MapWrite::PutSvcName(id, v) => Some((*id, Some(*v))),
            _ => None,
        }))
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

/// `writes` one by one, in order, up to the first failing one.
fn per_entry<S: MapStore + ?Sized>(store: &mut S, writes: &[MapWrite]) -> (usize, Option<S::Error>) {
    for (i, w) in writes.iter().enumerate() {
        if let Err(e) = w.apply_to(store) {
            return (i, Some(e));
        }
    }
    (writes.len(), None)
}

/// Writes per piece of a pipelined batch ([`pipelined`]): one syscall of a few ms, about as
/// long as the executor takes to encode and record them.
const PIECE: usize = 4096;
/// Batches from this size on are pipelined; smaller ones (every sync after the first few, at
/// any scale) are not worth a thread.
const PIPELINE_MIN: usize = 2 * PIECE;
/// Pieces queued for the writer thread beyond the one it is writing.
const AHEAD: usize = 2;

/// What writing one piece did: how many of its writes were performed before the failing one,
/// the map that failed, the error.
type Written = std::result::Result<(), (usize, &'static str, std::io::Error)>;

/// One piece as one `BPF_MAP_UPDATE_BATCH` (`delete`: `BPF_MAP_DELETE_BATCH` of the keys) on
/// the hash map `fd`, named `name`.
fn hash_piece<'f, K: aya::Pod, V: aya::Pod>(
    fd: std::os::fd::BorrowedFd<'f>,
    name: &'static str,
    delete: bool,
) -> impl Fn(&[K], &[V]) -> Written + Send + 'f {
    move |keys, values| {
        let r = if delete {
            crate::bpf_batch::hash_delete_fd(fd, keys)
        } else {
            crate::bpf_batch::hash_update_fd(fd, keys, values)
        };
        r.map_err(|(n, e)| (n, name, e))
    }
}

/// How a [`pipelined`] batch went.
#[derive(Debug)]
enum Piped {
    /// This many writes were performed, each reported to `done`; with the error of the next
    /// one, or without when the next is of another class (the caller writes the rest).
    Written(usize, Option<(&'static str, std::io::Error)>),
    /// The kernel has no batch operation for this map: nothing was written.
    Unsupported,
}

/// Write the `len` writes `encode(0..len)` of one class (keys and values from `part`; a
/// piece's keys and values written by `write`, e.g. [`hash_piece`]), strictly in order, as a
/// pipeline: this thread encodes a piece of [`PIECE`] writes and hands it to a writer thread,
/// which issues its syscall while this thread encodes the next one and hands the performed
/// ones to `done` (the executor's bookkeeping). At 10k Services / 100k endpoints this overlaps
/// the kernel's ~0.13 s of hash inserts with the executor's ~0.1 s of encoding and recording.
///
/// Order and failure are exactly those of one batch syscall: the writer writes the pieces in
/// order and, once one fails, attempts nothing after it (pieces already queued are dropped);
/// `done` is told only of performed writes, in order.
fn pipelined<K: aya::Pod + Send, V: aya::Pod + Send>(
    write: impl Fn(&[K], &[V]) -> Written + Send,
    len: usize,
    encode: &mut dyn FnMut(Range<usize>) -> Vec<MapWrite>,
    done: &mut dyn FnMut(Range<usize>),
    part: impl Fn(&MapWrite) -> Option<(K, Option<V>)>,
) -> Piped {
    type Outcome = Written;
    std::thread::scope(|s| {
        let (to_writer, pieces) = std::sync::mpsc::sync_channel::<(Vec<K>, Vec<V>)>(AHEAD);
        let (to_main, results) = std::sync::mpsc::channel::<Outcome>();
        s.spawn(move || {
            let mut failed = false;
            for (keys, values) in pieces {
                if failed {
                    // Nothing after a failing write is attempted.
                    continue;
                }
                let r = write(&keys, &values);
                failed = r.is_err();
                if to_main.send(r).is_err() {
                    break;
                }
            }
        });
        let mut in_flight: VecDeque<Range<usize>> = VecDeque::new();
        // The next write to encode; where encoding stopped at a write of another class.
        let mut next = 0;
        let mut other_class: Option<usize> = None;
        let mut written = 0;
        let outcome = loop {
            while other_class.is_none() && next < len && in_flight.len() <= AHEAD {
                let r = next..(next + PIECE).min(len);
                let writes = encode(r.clone());
                let mut keys = Vec::with_capacity(writes.len());
                let mut values = Vec::with_capacity(writes.len());
                for w in &writes {
                    let Some((k, v)) = part(w) else { break };
                    keys.push(k);
                    values.extend(v);
                }
                let end = r.start + keys.len();
                if end < r.end {
                    other_class = Some(end);
                }
                next = end;
                if keys.is_empty() {
                    break;
                }
                in_flight.push_back(r.start..end);
                if to_writer.send((keys, values)).is_err() {
                    break;
                }
            }
            let Some(r) = in_flight.pop_front() else {
                break Piped::Written(written, None);
            };
            match results.recv() {
                Ok(Ok(())) => {
                    done(r.clone());
                    written = r.end;
                }
                Ok(Err((k, name, e))) => {
                    if written == 0 && k == 0 && crate::bpf_batch::is_unsupported(&e) {
                        break Piped::Unsupported;
                    }
                    let k = k.min(r.len());
                    done(r.start..r.start + k);
                    break Piped::Written(r.start + k, Some((name, e)));
                }
                Err(_) => {
                    break Piped::Written(written, Some(("", std::io::Error::other("the map writer thread ended"))));
                }
            }
        };
        // The writer drops whatever is still queued and ends.
        drop(to_writer);
        outcome
    })
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
/// The SERVICES key and value (`None`: a delete) of a write of the batch's kind (puts, or
/// deletes when `delete`); `None` for any other write. One per map, shared by the one-batch
/// ([`batch_parts`]) and the pipelined ([`pipelined`]) paths.
fn service_part(delete: bool) -> impl Fn(&MapWrite) -> Option<(ServiceKey, Option<ServiceValue>)> {
    move |w| match w {
        MapWrite::PutService(k, v) if !delete => Some((*k, Some(*v))),
        MapWrite::DeleteService(k) if delete => Some((*k, None)),
        _ => None,
    }
}

/// [`service_part`] for BACKENDS.
fn backend_part(delete: bool) -> impl Fn(&MapWrite) -> Option<(u32, Option<Backend>)> {
    move |w| match w {
        MapWrite::PutBackend(id, v) if !delete => Some((*id, Some(*v))),
        MapWrite::DeleteBackend(id) if delete => Some((*id, None)),
        _ => None,
    }
}

/// [`service_part`] for MEMBERS.
fn member_part(delete: bool) -> impl Fn(&MapWrite) -> Option<(MemberKey, Option<MemberValue>)> {
    move |w| match w {
        MapWrite::PutMember(k, v) if !delete => Some((*k, Some(*v))),
        MapWrite::DeleteMember(k) if delete => Some((*k, None)),
        _ => None,
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `ids[i] -> values[i]` as BACKENDS puts (the test map holds `u64 -> u64`).
    fn puts(ids: &[(u32, u32)]) -> Vec<MapWrite> {
        ids.iter().map(|&(id, addr)| MapWrite::PutBackend(id, Backend { addr, ..Backend::default() })).collect()
    }

    fn part(w: &MapWrite) -> Option<(u64, Option<u64>)> {
        match w {
            MapWrite::PutBackend(id, b) => Some((u64::from(*id), Some(u64::from(b.addr)))),
            _ => None,
        }
    }

    /// Runs [`pipelined`] over `writes`; returns its outcome and the ranges handed to `done`.
    fn run(map: &MapData, delete: bool, writes: &[MapWrite]) -> (Piped, Vec<Range<usize>>) {
        let mut done = Vec::new();
        let mut encode = |r: Range<usize>| writes[r].to_vec();
        let write = hash_piece::<u64, u64>(map.fd().as_fd(), "test", delete);
        let piped = if delete {
            pipelined(write, writes.len(), &mut encode, &mut |r| done.push(r), |w| match w {
                MapWrite::DeleteBackend(id) => Some((u64::from(*id), None)),
                _ => None,
            })
        } else {
            pipelined(write, writes.len(), &mut encode, &mut |r| done.push(r), part)
        };
        (piped, done)
    }

    fn contents(map: &MapData) -> std::collections::BTreeMap<u64, u64> {
        let (k, v) = crate::bpf_batch::hash_lookup_all::<u64, u64>(map).unwrap();
        k.into_iter().zip(v).collect()
    }

    /// `done` saw exactly `0..n`, in order and contiguous.
    fn assert_done(done: &[Range<usize>], n: usize) {
        let mut at = 0;
        for r in done {
            assert_eq!(r.start, at, "{done:?}");
            at = r.end;
        }
        assert_eq!(at, n, "{done:?}");
    }

    #[test]
    #[ignore = "needs root"]
    fn pipelined_batch_writes_everything_in_order() {
        let map = crate::bpf_batch::tests::create_data(1, 40_000).expect("creating a BPF map (needs root)");
        // Key 7 twice, far apart (different pieces): the later value wins, as in one batch.
        let mut ids: Vec<(u32, u32)> = (0..30_000).map(|i| (i, i * 10)).collect();
        ids.push((7, 1));
        let (piped, done) = run(&map, false, &puts(&ids));
        assert!(matches!(piped, Piped::Written(30_001, None)), "{piped:?}");
        assert_done(&done, 30_001);
        let all = contents(&map);
        assert_eq!(all.len(), 30_000);
        assert_eq!(all[&7], 1);
        assert_eq!(all[&29_999], 299_990);
        // Deletes, pipelined too.
        let dels: Vec<MapWrite> = (0..25_000).map(MapWrite::DeleteBackend).collect();
        let (piped, done) = run(&map, true, &dels);
        assert!(matches!(piped, Piped::Written(25_000, None)), "{piped:?}");
        assert_done(&done, 25_000);
        assert_eq!(contents(&map).len(), 5_000);
    }

    #[test]
    #[ignore = "needs root"]
    fn pipelined_batch_stops_at_the_first_failure() {
        // Full after 12,000 keys: the write of one more fails (E2BIG). The writes after it
        // rewrite existing keys, which would succeed: none of them may be attempted.
        let map = crate::bpf_batch::tests::create_data(1, 12_000).expect("creating a BPF map (needs root)");
        let mut ids: Vec<(u32, u32)> = (0..12_000).map(|i| (i, 1)).collect();
        ids.push((99_999, 1));
        ids.extend((0..8_000).map(|i| (i, 2)));
        let (piped, done) = run(&map, false, &puts(&ids));
        let Piped::Written(n, Some(e)) = piped else { panic!("{piped:?}") };
        assert_eq!(n, 12_000, "{e:?}");
        assert_done(&done, 12_000);
        let all = contents(&map);
        assert_eq!(all.len(), 12_000);
        assert!(all.values().all(|v| *v == 1), "a write after the failing one was performed");
    }

    #[test]
    #[ignore = "needs root"]
    fn pipelined_batch_stops_before_another_class() {
        let map = crate::bpf_batch::tests::create_data(1, 40_000).expect("creating a BPF map (needs root)");
        let mut writes = puts(&(0..10_000).map(|i| (i, 1)).collect::<Vec<_>>());
        writes.push(MapWrite::DeleteBackend(3));
        writes.extend(puts(&(10_000..20_000).map(|i| (i, 1)).collect::<Vec<_>>()));
        let (piped, done) = run(&map, false, &writes);
        assert!(matches!(piped, Piped::Written(10_000, None)), "{piped:?}");
        assert_done(&done, 10_000);
        assert_eq!(contents(&map).len(), 10_000);
    }
}
