//! The one contract between the control plane and the Service maps.
//!
//! - [`MapStore`]: put, delete and iterate the maps the agent writes (SERVICES, BACKENDS,
//!   MEMBERS, SRC_RANGES, and the Maglev tables of MAGLEV) with the `lb-common` key and value
//!   types. Like Cilium's `LBMaps`
//!   (`pkg/loadbalancer/maps`) it has a real implementation (aya maps, in lb-userspace's
//!   `datapath::maps`, over a loaded object or over the pins), an in-memory fake ([`MemStore`])
//!   and a fault-injecting wrapper ([`FaultStore`]).
//! - [`MapWrite::of`]: the one encoding of a [`MapOp`] into a map entry.
//! - [`execute`]: the one executor of a [`crate::Plan`] (prepare, then each frontend, then gc).
//! - [`crate::ReadBack::read`]: the one read-back of the maps into an [`crate::Applied`].
//!
//! Deleting a key that is not there is not an error for any implementation: a restarted agent
//! may replay deletes.

mod exec;
mod fault;
mod mem;

pub use exec::{execute, ExecReport};

pub use fault::{FaultError, FaultStore};
pub use mem::MemStore;

use std::fmt;

use lb_common::{
    map_names, Backend, MemberKey, MemberValue, ServiceKey, ServiceValue, SrcRangeKey, SvcName,
};

use crate::maglev::{Entries, Geometry};
use crate::planner::MapOp;

/// The SERVICES, BACKENDS, MEMBERS, SRC_RANGES and MAGLEV maps, as the agent writes and reads
/// them back.
///
/// SRC_RANGES is an LPM trie whose key is `{prefix_len: u32, data: SrcRangeKey}` (aya's
/// `lpm_trie::Key<SrcRangeKey>`); the methods take the two parts, so this crate needs no aya.
/// The value is always 1. Only the first `prefix_len` bits of a key count (two keys that
/// differ only after them are one entry): xlb always writes the client range's network
/// address, so every entry has one key.
pub trait MapStore {
    type Error: fmt::Display;

    /// Create or replace a SERVICES entry (a master at slot 0, or a slot).
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), Self::Error>;
    /// Delete a SERVICES entry; a missing one is success.
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), Self::Error>;
    /// Create or replace the BACKENDS entry of backend `id`.
    fn put_backend(&mut self, id: u32, value: &Backend) -> Result<(), Self::Error>;
    /// Delete the BACKENDS entry of backend `id`; a missing one is success.
    fn delete_backend(&mut self, id: u32) -> Result<(), Self::Error>;
    /// Create or replace a MEMBERS entry.
    fn put_member(&mut self, key: &MemberKey, value: &MemberValue) -> Result<(), Self::Error>;
    /// Delete a MEMBERS entry; a missing one is success.
    fn delete_member(&mut self, key: &MemberKey) -> Result<(), Self::Error>;
    /// Create (or keep) the SRC_RANGES entry `(prefix_len, key)`.
    fn put_src_range(&mut self, prefix_len: u32, key: &SrcRangeKey) -> Result<(), Self::Error>;
    /// Delete the SRC_RANGES entry `(prefix_len, key)` (exact prefix, no longest-prefix
    /// match); a missing one is success.
    fn delete_src_range(&mut self, prefix_len: u32, key: &SrcRangeKey) -> Result<(), Self::Error>;

    /// Every SERVICES entry, in the map's order.
    fn for_each_service(
        &self,
        f: &mut dyn FnMut(&ServiceKey, &ServiceValue),
    ) -> Result<(), Self::Error>;
    /// Every BACKENDS entry, in the map's order.
    fn for_each_backend(&self, f: &mut dyn FnMut(u32, &Backend)) -> Result<(), Self::Error>;
    /// Every MEMBERS entry, in the map's order.
    fn for_each_member(
        &self,
        f: &mut dyn FnMut(&MemberKey, &MemberValue),
    ) -> Result<(), Self::Error>;
    /// Every SRC_RANGES entry `(prefix_len, key)`, in the map's order.
    fn for_each_src_range(&self, f: &mut dyn FnMut(u32, &SrcRangeKey)) -> Result<(), Self::Error>;

    /// The MAGLEV array's shape: `tables` tables of `m` entries.
    fn maglev_geometry(&self) -> Geometry;
    /// Write Maglev table `table` (`< tables`) whole: `entries` holds `m` backend ids. Only
    /// ever called for a table no master names.
    fn put_maglev_table(&mut self, table: u32, entries: &[u32]) -> Result<(), Self::Error>;
    /// The `m` entries of Maglev table `table` (`< tables`); an entry never written reads 0.
    fn read_maglev_table(&self, table: u32) -> Result<Vec<u32>, Self::Error>;

    /// Create or replace the SVCNAME entry of Service port id `id`, and zero the id's
    /// per-Service counters (SVCSTATS) first: a new id may have counted for an earlier
    /// Service port.
    fn put_svc_name(&mut self, id: u32, name: &SvcName) -> Result<(), Self::Error>;
    /// Delete the SVCNAME entry of `id`; a missing one is success.
    fn delete_svc_name(&mut self, id: u32) -> Result<(), Self::Error>;
    /// Every SVCNAME entry, in the map's order.
    fn for_each_svc_name(&self, f: &mut dyn FnMut(u32, &SvcName)) -> Result<(), Self::Error>;
    /// The Service port ids SVCNAME and SVCSTATS have room for (`1..=` this).
    fn svc_ports_max(&self) -> u32 {
        lb_common::DEFAULT_SVC_PORTS_MAX
    }

    /// Write word `word` of the pre-filter map (`lb_common::map_names::FEFILTER`: the frontend
    /// half, then the reply half from `lb_common::PORTFILTER_OFFSET`; see [`crate::fefilter`]).
    /// The default keeps nothing (stores without the filter map: the in-memory one, whose
    /// plans and read-backs the filter does not change).
    fn put_filter_word(&mut self, _word: u32, _value: u64) -> Result<(), Self::Error> {
        Ok(())
    }
    /// Every word of the pre-filter map, both halves (empty: the store keeps none).
    fn read_filter_words(&self) -> Result<Vec<u64>, Self::Error> {
        Ok(Vec::new())
    }

    /// Perform `writes` strictly in order. The executor only passes writes of one
    /// [`BatchClass`] (one map, all puts or all deletes), so a real store can hand them to the
    /// kernel in one `BPF_MAP_*_BATCH` syscall, which also processes keys in order and stops at
    /// the first failing one. Returns how many writes were performed; when that is fewer than
    /// all, the error of the write at that index (nothing after it was attempted). The default
    /// performs them one by one, so the in-memory and fault-injecting stores see every single
    /// write as before.
    fn write_batch(&mut self, writes: &[MapWrite]) -> (usize, Option<Self::Error>) {
        for (i, w) in writes.iter().enumerate() {
            if let Err(e) = w.apply_to(self) {
                return (i, Some(e));
            }
        }
        (writes.len(), None)
    }

    /// [`MapStore::write_batch`] of a batch of `len` writes handed over in pieces, so that a
    /// store can write one piece while the caller encodes the next one and records the ones
    /// written: `encode(range)` returns the writes `range` of the batch (pure: it may be asked
    /// for the same range again), and `done(range)` is told which writes were performed, in
    /// order, contiguously from 0, as they complete. Same contract as `write_batch`: strictly
    /// in order, nothing after the first failing write is attempted; returns how many were
    /// performed (exactly the ones passed to `done`) and, when fewer than `len`, the error of
    /// the write at that index.
    ///
    /// Why: at 100k endpoints the kernel's work in the batch syscalls and the executor's
    /// bookkeeping ([`crate::Applied::apply`]) take about as long each; the real store
    /// (lb-userspace's `AyaStore`) overlaps them by issuing the syscalls of a large batch from
    /// a second thread. The default encodes everything, calls `write_batch` once and reports
    /// once, so the in-memory and fault-injecting stores see exactly the writes they saw
    /// before.
    fn write_pieces(
        &mut self,
        len: usize,
        encode: &mut dyn FnMut(std::ops::Range<usize>) -> Vec<MapWrite>,
        done: &mut dyn FnMut(std::ops::Range<usize>),
    ) -> (usize, Option<Self::Error>) {
        write_in_one_piece(self, len, encode, done)
    }
}

/// [`MapStore::write_pieces`] as one `write_batch` of the whole batch, reported once (the
/// default, and what a store that pipelines nothing does).
pub fn write_in_one_piece<S: MapStore + ?Sized>(
    store: &mut S,
    len: usize,
    encode: &mut dyn FnMut(std::ops::Range<usize>) -> Vec<MapWrite>,
    done: &mut dyn FnMut(std::ops::Range<usize>),
) -> (usize, Option<S::Error>) {
    let writes = encode(0..len);
    let (n, err) = store.write_batch(&writes);
    let n = n.min(len);
    done(0..n);
    (n, if n < len { err } else { None })
}

impl<S: MapStore + ?Sized> MapStore for &mut S {
    type Error = S::Error;
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), S::Error> {
        (**self).put_service(key, value)
    }
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), S::Error> {
        (**self).delete_service(key)
    }
    fn put_backend(&mut self, id: u32, value: &Backend) -> Result<(), S::Error> {
        (**self).put_backend(id, value)
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), S::Error> {
        (**self).delete_backend(id)
    }
    fn put_member(&mut self, key: &MemberKey, value: &MemberValue) -> Result<(), S::Error> {
        (**self).put_member(key, value)
    }
    fn delete_member(&mut self, key: &MemberKey) -> Result<(), S::Error> {
        (**self).delete_member(key)
    }
    fn put_src_range(&mut self, prefix_len: u32, key: &SrcRangeKey) -> Result<(), S::Error> {
        (**self).put_src_range(prefix_len, key)
    }
    fn delete_src_range(&mut self, prefix_len: u32, key: &SrcRangeKey) -> Result<(), S::Error> {
        (**self).delete_src_range(prefix_len, key)
    }
    fn for_each_service(
        &self,
        f: &mut dyn FnMut(&ServiceKey, &ServiceValue),
    ) -> Result<(), S::Error> {
        (**self).for_each_service(f)
    }
    fn for_each_backend(&self, f: &mut dyn FnMut(u32, &Backend)) -> Result<(), S::Error> {
        (**self).for_each_backend(f)
    }
    fn for_each_member(&self, f: &mut dyn FnMut(&MemberKey, &MemberValue)) -> Result<(), S::Error> {
        (**self).for_each_member(f)
    }
    fn for_each_src_range(&self, f: &mut dyn FnMut(u32, &SrcRangeKey)) -> Result<(), S::Error> {
        (**self).for_each_src_range(f)
    }
    fn maglev_geometry(&self) -> Geometry {
        (**self).maglev_geometry()
    }
    fn put_maglev_table(&mut self, table: u32, entries: &[u32]) -> Result<(), S::Error> {
        (**self).put_maglev_table(table, entries)
    }
    fn read_maglev_table(&self, table: u32) -> Result<Vec<u32>, S::Error> {
        (**self).read_maglev_table(table)
    }
    fn put_filter_word(&mut self, word: u32, value: u64) -> Result<(), S::Error> {
        (**self).put_filter_word(word, value)
    }
    fn put_svc_name(&mut self, id: u32, name: &SvcName) -> Result<(), S::Error> {
        (**self).put_svc_name(id, name)
    }
    fn delete_svc_name(&mut self, id: u32) -> Result<(), S::Error> {
        (**self).delete_svc_name(id)
    }
    fn for_each_svc_name(&self, f: &mut dyn FnMut(u32, &SvcName)) -> Result<(), S::Error> {
        (**self).for_each_svc_name(f)
    }
    fn svc_ports_max(&self) -> u32 {
        (**self).svc_ports_max()
    }
    fn read_filter_words(&self) -> Result<Vec<u64>, S::Error> {
        (**self).read_filter_words()
    }
    fn write_batch(&mut self, writes: &[MapWrite]) -> (usize, Option<S::Error>) {
        (**self).write_batch(writes)
    }
    fn write_pieces(
        &mut self,
        len: usize,
        encode: &mut dyn FnMut(std::ops::Range<usize>) -> Vec<MapWrite>,
        done: &mut dyn FnMut(std::ops::Range<usize>),
    ) -> (usize, Option<S::Error>) {
        (**self).write_pieces(len, encode, done)
    }
}

/// Which writes may share one batch: the same map, and all puts or all deletes. SRC_RANGES
/// (an LPM trie, rare) and Maglev tables (one batch of their own already) are never batched
/// with other writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BatchClass {
    PutService,
    DeleteService,
    PutBackend,
    DeleteBackend,
    PutMember,
    DeleteMember,
    PutSvcName,
    DeleteSvcName,
    /// Written on its own.
    Single,
}

/// One map write: a [`MapOp`] as the entry it puts or the key it deletes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapWrite {
    PutService(ServiceKey, ServiceValue),
    DeleteService(ServiceKey),
    PutBackend(u32, Backend),
    DeleteBackend(u32),
    PutMember(MemberKey, MemberValue),
    DeleteMember(MemberKey),
    /// SRC_RANGES: (prefix length, key data).
    PutSrcRange(u32, SrcRangeKey),
    DeleteSrcRange(u32, SrcRangeKey),
    /// MAGLEV: table index, its entries.
    PutMaglevTable(u32, Entries),
    /// SVCNAME: Service port id, its name (and the id's counters start from zero).
    PutSvcName(u32, SvcName),
    DeleteSvcName(u32),
}

impl MapWrite {
    /// The encoding of `op` into map entries: the only place that knows which entry each
    /// operation writes.
    pub fn of(op: &MapOp) -> MapWrite {
        match *op {
            MapOp::PutBackend { id, backend, state } => {
                MapWrite::PutBackend(id, backend.to_map(state))
            }
            MapOp::DeleteBackend { id } => MapWrite::DeleteBackend(id),
            MapOp::PutMember {
                frontend,
                backend_id,
                backend,
            } => MapWrite::PutMember(frontend.member_key(backend_id), backend.to_member()),
            MapOp::DeleteMember {
                frontend,
                backend_id,
            } => MapWrite::DeleteMember(frontend.member_key(backend_id)),
            MapOp::PutSlot {
                frontend,
                slot,
                backend_id,
            } => MapWrite::PutService(
                frontend.key(slot),
                ServiceValue {
                    backend_id,
                    ..ServiceValue::default()
                },
            ),
            MapOp::DeleteSlot { frontend, slot } => MapWrite::DeleteService(frontend.key(slot)),
            MapOp::PutMaster {
                frontend,
                count,
                rev_nat_id,
                flags,
                affinity_timeout,
                table,
                svc_port_id,
            } => MapWrite::PutService(
                frontend.key(0),
                ServiceValue {
                    backend_id: table,
                    count,
                    rev_nat_id,
                    flags,
                    affinity_timeout,
                    svc_port_id,
                },
            ),
            MapOp::DeleteMaster { frontend } => MapWrite::DeleteService(frontend.key(0)),
            MapOp::PutSrcRange { frontend, range } => {
                let (len, key) = frontend.src_range_key(range);
                MapWrite::PutSrcRange(len, key)
            }
            MapOp::DeleteSrcRange { frontend, range } => {
                let (len, key) = frontend.src_range_key(range);
                MapWrite::DeleteSrcRange(len, key)
            }
            MapOp::PutMaglevTable {
                table, ref entries, ..
            } => MapWrite::PutMaglevTable(table, entries.clone()),
            MapOp::PutSvcName { id, ref name } => MapWrite::PutSvcName(id, name.to_map()),
            MapOp::DeleteSvcName { id } => MapWrite::DeleteSvcName(id),
        }
    }

    /// Perform this write on `store`.
    pub fn apply_to<S: MapStore + ?Sized>(&self, store: &mut S) -> Result<(), S::Error> {
        match self {
            MapWrite::PutService(k, v) => store.put_service(k, v),
            MapWrite::DeleteService(k) => store.delete_service(k),
            MapWrite::PutBackend(id, v) => store.put_backend(*id, v),
            MapWrite::DeleteBackend(id) => store.delete_backend(*id),
            MapWrite::PutMember(k, v) => store.put_member(k, v),
            MapWrite::DeleteMember(k) => store.delete_member(k),
            MapWrite::PutSrcRange(len, k) => store.put_src_range(*len, k),
            MapWrite::DeleteSrcRange(len, k) => store.delete_src_range(*len, k),
            MapWrite::PutMaglevTable(t, e) => store.put_maglev_table(*t, e),
            MapWrite::PutSvcName(id, v) => store.put_svc_name(*id, v),
            MapWrite::DeleteSvcName(id) => store.delete_svc_name(*id),
        }
    }

    /// The batch this write may share (see [`MapStore::write_batch`]).
    pub fn batch_class(&self) -> BatchClass {
        match self {
            MapWrite::PutService(..) => BatchClass::PutService,
            MapWrite::DeleteService(_) => BatchClass::DeleteService,
            MapWrite::PutBackend(..) => BatchClass::PutBackend,
            MapWrite::DeleteBackend(_) => BatchClass::DeleteBackend,
            MapWrite::PutMember(..) => BatchClass::PutMember,
            MapWrite::DeleteMember(_) => BatchClass::DeleteMember,
            MapWrite::PutSvcName(..) => BatchClass::PutSvcName,
            MapWrite::DeleteSvcName(_) => BatchClass::DeleteSvcName,
            // SRC_RANGES, MAGLEV and whatever else: one by one.
            #[allow(unreachable_patterns)]
            _ => BatchClass::Single,
        }
    }

    /// The name of the map written (`lb_common::map_names`).
    pub fn map_name(&self) -> &'static str {
        match self {
            MapWrite::PutService(..) | MapWrite::DeleteService(_) => map_names::SERVICES,
            MapWrite::PutBackend(..) | MapWrite::DeleteBackend(_) => map_names::BACKENDS,
            MapWrite::PutMember(..) | MapWrite::DeleteMember(_) => map_names::MEMBERS,
            MapWrite::PutSrcRange(..) | MapWrite::DeleteSrcRange(..) => map_names::SRC_RANGES,
            MapWrite::PutMaglevTable(..) => map_names::MAGLEV,
            MapWrite::PutSvcName(..) | MapWrite::DeleteSvcName(_) => map_names::SVCNAME,
        }
    }

    /// A put (create or replace), not a delete.
    pub fn is_put(&self) -> bool {
        matches!(
            self,
            MapWrite::PutService(..)
                | MapWrite::PutBackend(..)
                | MapWrite::PutMember(..)
                | MapWrite::PutSrcRange(..)
                | MapWrite::PutMaglevTable(..)
                | MapWrite::PutSvcName(..)
        )
    }
}
