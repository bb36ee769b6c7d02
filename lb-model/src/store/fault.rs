//! A [`MapStore`] that fails chosen writes: a full map, a failing syscall, in the middle of a
//! plan, to prove that no failure leaves a Service half-written.

use std::fmt;

use lb_common::{Backend, MemberKey, MemberValue, ServiceKey, ServiceValue, SrcRangeKey, SvcName};

use super::{MapStore, MapWrite};
use crate::maglev::Geometry;

/// Picks the writes that fail: `rule(n, write)` for write number `n` (from 0).
type Rule = Box<dyn FnMut(usize, &MapWrite) -> bool>;

/// Wraps a store and fails the writes a rule picks (the write is not performed). Reads pass
/// through.
pub struct FaultStore<S> {
    inner: S,
    /// Whether write number `n` (counting every write offered, from 0) fails.
    rule: Rule,
    writes: usize,
    injected: Vec<MapWrite>,
    /// [`FaultStore::in_pieces`]: the piece size of [`MapStore::write_pieces`] (0: the
    /// default, everything at once).
    piece: usize,
}

/// An error of a [`FaultStore`]: injected, or the inner store's own.
#[derive(Debug)]
pub enum FaultError<E> {
    Injected(MapWrite),
    Store(E),
}

impl<E: fmt::Display> fmt::Display for FaultError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FaultError::Injected(w) => write!(f, "injected failure of a write to {}", w.map_name()),
            FaultError::Store(e) => e.fmt(f),
        }
    }
}

impl<S> FaultStore<S> {
    /// Fail the writes `rule(n, write)` picks; `n` counts the writes offered, from 0.
    pub fn new(inner: S, rule: impl FnMut(usize, &MapWrite) -> bool + 'static) -> Self {
        FaultStore {
            inner,
            rule: Box::new(rule),
            writes: 0,
            injected: Vec::new(),
            piece: 0,
        }
    }

    /// Take [`MapStore::write_pieces`] batches in pieces of `piece` writes (asking for each
    /// piece's encoding just before writing it, telling each one done right after), as the
    /// real store's pipeline does: the executor must end up exactly as with whole batches.
    pub fn in_pieces(mut self, piece: usize) -> Self {
        self.piece = piece;
        self
    }

    /// Fail write number `n` (from 0) only.
    pub fn fail_nth(inner: S, n: usize) -> Self {
        Self::new(inner, move |i, _| i == n)
    }

    /// Fail every write `pred` matches (e.g. every put into BACKENDS: a full map).
    pub fn fail_matching(inner: S, pred: impl Fn(&MapWrite) -> bool + 'static) -> Self {
        Self::new(inner, move |_, w| pred(w))
    }

    /// Writes offered so far, failed ones included.
    pub fn writes(&self) -> usize {
        self.writes
    }

    /// The writes that were failed.
    pub fn injected(&self) -> &[MapWrite] {
        &self.injected
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    pub fn inner_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    pub fn into_inner(self) -> S {
        self.inner
    }

    fn offer<E>(&mut self, w: MapWrite) -> Result<(), FaultError<E>> {
        let n = self.writes;
        self.writes += 1;
        if (self.rule)(n, &w) {
            self.injected.push(w.clone());
            return Err(FaultError::Injected(w));
        }
        Ok(())
    }
}

impl<S: MapStore> MapStore for FaultStore<S> {
    type Error = FaultError<S::Error>;

    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), Self::Error> {
        self.offer(MapWrite::PutService(*key, *value))?;
        self.inner
            .put_service(key, value)
            .map_err(FaultError::Store)
    }
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), Self::Error> {
        self.offer(MapWrite::DeleteService(*key))?;
        self.inner.delete_service(key).map_err(FaultError::Store)
    }
    fn put_backend(&mut self, id: u32, value: &Backend) -> Result<(), Self::Error> {
        self.offer(MapWrite::PutBackend(id, *value))?;
        self.inner.put_backend(id, value).map_err(FaultError::Store)
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), Self::Error> {
        self.offer(MapWrite::DeleteBackend(id))?;
        self.inner.delete_backend(id).map_err(FaultError::Store)
    }
    fn put_member(&mut self, key: &MemberKey, value: &MemberValue) -> Result<(), Self::Error> {
        self.offer(MapWrite::PutMember(*key, *value))?;
        self.inner.put_member(key, value).map_err(FaultError::Store)
    }
    fn delete_member(&mut self, key: &MemberKey) -> Result<(), Self::Error> {
        self.offer(MapWrite::DeleteMember(*key))?;
        self.inner.delete_member(key).map_err(FaultError::Store)
    }
    fn put_src_range(&mut self, prefix_len: u32, key: &SrcRangeKey) -> Result<(), Self::Error> {
        self.offer(MapWrite::PutSrcRange(prefix_len, *key))?;
        self.inner
            .put_src_range(prefix_len, key)
            .map_err(FaultError::Store)
    }
    fn delete_src_range(&mut self, prefix_len: u32, key: &SrcRangeKey) -> Result<(), Self::Error> {
        self.offer(MapWrite::DeleteSrcRange(prefix_len, *key))?;
        self.inner
            .delete_src_range(prefix_len, key)
            .map_err(FaultError::Store)
    }
    fn for_each_service(
        &self,
        f: &mut dyn FnMut(&ServiceKey, &ServiceValue),
    ) -> Result<(), Self::Error> {
        self.inner.for_each_service(f).map_err(FaultError::Store)
    }
    fn for_each_backend(&self, f: &mut dyn FnMut(u32, &Backend)) -> Result<(), Self::Error> {
        self.inner.for_each_backend(f).map_err(FaultError::Store)
    }
    fn for_each_member(
        &self,
        f: &mut dyn FnMut(&MemberKey, &MemberValue),
    ) -> Result<(), Self::Error> {
        self.inner.for_each_member(f).map_err(FaultError::Store)
    }
    fn for_each_src_range(&self, f: &mut dyn FnMut(u32, &SrcRangeKey)) -> Result<(), Self::Error> {
        self.inner.for_each_src_range(f).map_err(FaultError::Store)
    }
    fn maglev_geometry(&self) -> Geometry {
        self.inner.maglev_geometry()
    }
    fn put_maglev_table(&mut self, table: u32, entries: &[u32]) -> Result<(), Self::Error> {
        self.offer(MapWrite::PutMaglevTable(table, entries.into()))?;
        self.inner
            .put_maglev_table(table, entries)
            .map_err(FaultError::Store)
    }
    fn put_svc_name(&mut self, id: u32, name: &SvcName) -> Result<(), Self::Error> {
        self.offer(MapWrite::PutSvcName(id, *name))?;
        self.inner.put_svc_name(id, name).map_err(FaultError::Store)
    }
    fn delete_svc_name(&mut self, id: u32) -> Result<(), Self::Error> {
        self.offer(MapWrite::DeleteSvcName(id))?;
        self.inner.delete_svc_name(id).map_err(FaultError::Store)
    }
    fn for_each_svc_name(&self, f: &mut dyn FnMut(u32, &SvcName)) -> Result<(), Self::Error> {
        self.inner.for_each_svc_name(f).map_err(FaultError::Store)
    }
    fn svc_ports_max(&self) -> u32 {
        self.inner.svc_ports_max()
    }
    fn read_maglev_table(&self, table: u32) -> Result<Vec<u32>, Self::Error> {
        self.inner
            .read_maglev_table(table)
            .map_err(FaultError::Store)
    }
    fn write_pieces(
        &mut self,
        len: usize,
        encode: &mut dyn FnMut(std::ops::Range<usize>) -> Vec<MapWrite>,
        done: &mut dyn FnMut(std::ops::Range<usize>),
    ) -> (usize, Option<Self::Error>) {
        if self.piece == 0 {
            return super::write_in_one_piece(self, len, encode, done);
        }
        let mut at = 0;
        while at < len {
            let end = (at + self.piece).min(len);
            let writes = encode(at..end);
            let (n, err) = self.write_batch(&writes);
            let n = n.min(end - at);
            done(at..at + n);
            if n < end - at {
                return (at + n, err);
            }
            at = end;
        }
        (len, None)
    }
}
