//! Rebuilding an [`Applied`] from the entries of the maps, in whatever order a map iteration
//! yields them: at the agent's start (a restart reconciles, never flushes), for `xlb inspect`,
//! and in tests. [`ReadBack::read`] reads a [`MapStore`]; the entry-by-entry methods are there
//! for tests that build odd map contents by hand. Linear in the number of entries.

use std::collections::BTreeSet;

use lb_common::{Backend, MemberKey, MemberValue, ServiceKey, ServiceValue, SrcRangeKey, SvcName};

use crate::applied::{Applied, AppliedFrontend};
use crate::maglev;
use crate::store::MapStore;
use crate::svcport::SvcPortName;
use crate::{BackendAddr, Frontend};

/// Map entries read so far. Entries with an unknown protocol number are skipped.
///
/// Slots, backends and members are collected as they come (hash order) and sorted once in
/// [`ReadBack::finish`], which then builds each frontend in one pass: at 100k endpoints that is
/// several times faster than inserting every entry into ordered maps as it arrives.
#[derive(Debug, Default)]
pub struct ReadBack {
    applied: Applied,
    /// (frontend, slot >= 1, backend id).
    slots: Vec<(Frontend, u16, u32)>,
    /// (id, address, state), in the order read.
    backends: Vec<(u32, BackendAddr, u8)>,
    members: Vec<(Frontend, u32, MemberValue)>,
}

impl ReadBack {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every entry of SERVICES, BACKENDS, MEMBERS, SRC_RANGES and SVCNAME in `store`, as an [`Applied`],
    /// with the Maglev tables the masters name (see [`ReadBack::maglev_tables`]).
    pub fn read<S: MapStore + ?Sized>(store: &S) -> Result<Applied, S::Error> {
        let mut r = ReadBack::new();
        store.for_each_service(&mut |k, v| r.service(k, v))?;
        store.for_each_backend(&mut |id, b| r.backend(id, b))?;
        store.for_each_member(&mut |k, v| r.member(k, v))?;
        store.for_each_src_range(&mut |len, k| r.src_range(len, k))?;
        store.for_each_svc_name(&mut |id, v| r.svc_name(id, v))?;
        r.applied.svc_ports_max = store.svc_ports_max();
        let mut applied = r.finish();
        Self::maglev_tables(&mut applied, store.maglev_geometry(), |t| {
            store.read_maglev_table(t)
        })?;
        // The pre-filters: kept as pinned, never cleared on start (see `fefilter`).
        let words = store.read_filter_words()?;
        let half = (lb_common::PORTFILTER_OFFSET as usize).min(words.len());
        let has_frontends = !applied.frontends.is_empty();
        applied.filter = crate::fefilter::Filter::from_words(&words[..half], has_frontends);
        applied.port_filter = crate::fefilter::Filter::from_words(&words[half..], has_frontends);
        Ok(applied)
    }

    /// The Maglev tables of a read-back `applied` (the MAGLEV array has the shape `geometry`,
    /// `read(t)` gives the entries of table `t`): every table a master names (inside the
    /// array) is read, and its content is known ([`crate::applied::AppliedTables::content`])
    /// when it is exactly the table of the backends it names, built now: so a table that an
    /// interrupted write left half-written, or one of another table size, is rebuilt into a
    /// new table by the next plan, while a whole one stays as it is (a restart writes nothing).
    pub fn maglev_tables<E>(
        applied: &mut Applied,
        geometry: maglev::Geometry,
        mut read: impl FnMut(u32) -> Result<Vec<u32>, E>,
    ) -> Result<(), E> {
        applied.maglev.geometry = geometry;
        applied.maglev.content.clear();
        let named: BTreeSet<u32> = applied
            .frontends
            .values()
            .filter_map(|af| af.table)
            .filter(|t| *t < geometry.tables)
            .collect();
        for t in named {
            let entries = read(t)?;
            let mut ids = entries.clone();
            ids.sort_unstable();
            ids.dedup();
            let backends: Option<Vec<(BackendAddr, u32)>> = ids
                .iter()
                .map(|id| applied.backends.get(id).map(|(b, _)| (*b, *id)))
                .collect();
            let Some(backends) = backends else {
                continue; // An entry names a missing backend (or 0: never written).
            };
            if entries.len() == geometry.m as usize
                && maglev::table(&backends, geometry.m) == entries
            {
                applied.maglev.content.insert(t, ids);
            }
        }
        applied.reindex();
        Ok(())
    }

    /// A SERVICES entry: a master (slot 0) or a slot.
    pub fn service(&mut self, k: &ServiceKey, v: &ServiceValue) {
        let Some(fe) = Frontend::from_key(k) else {
            return;
        };
        if k.slot == 0 {
            let e = self.applied.frontends.entry(fe).or_default();
            e.rev_nat_id = v.rev_nat_id;
            e.flags = v.flags;
            e.affinity_timeout = v.affinity_timeout;
            e.count = v.count;
            e.table = maglev::names_table(v.flags, v.count).then_some(v.backend_id);
            e.svc_port_id = v.svc_port_id;
        } else {
            self.slots.push((fe, k.slot, v.backend_id));
        }
    }

    /// A SVCNAME entry.
    pub fn svc_name(&mut self, id: u32, v: &SvcName) {
        if id != 0 {
            self.applied.svc_names.insert(id, SvcPortName::from_map(v));
        }
    }

    /// A BACKENDS entry.
    pub fn backend(&mut self, id: u32, b: &Backend) {
        if let Some(addr) = BackendAddr::from_map(b) {
            self.backends.push((id, addr, b.state));
        }
    }

    /// A MEMBERS entry.
    pub fn member(&mut self, k: &MemberKey, v: &MemberValue) {
        if let Some((fe, id)) = Frontend::from_member_key(k) {
            self.members.push((fe, id, *v));
        }
    }

    /// A SRC_RANGES entry, filed under its `SCOPE_EXT` frontend. Keys xlb never writes
    /// (prefix shorter than the frontend, padding set, unknown protocol) are skipped; host
    /// bits after the prefix are dropped, as the trie ignores them.
    pub fn src_range(&mut self, prefix_len: u32, k: &SrcRangeKey) {
        if let Some((fe, range)) = Frontend::from_src_range_key(prefix_len, k) {
            self.applied
                .frontends
                .entry(fe)
                .or_default()
                .src_ranges
                .insert(range);
        }
    }

    /// The maps' content as an [`Applied`].
    ///
    /// - Slots: all of them, also leftovers above the master's count (an interrupted update) and
    ///   holes (0), so the next plan repairs them.
    /// - Frontend ids come from the masters (`rev_nat_id`); when two masters hold the same id
    ///   (never written so by xlb) the first frontend keeps it and the next plan gives the other
    ///   a new one.
    /// - A MEMBERS entry whose address is not its backend's (never written so by xlb) is left
    ///   out when a slot of its frontend names the id, so the next plan rewrites it; otherwise it
    ///   is kept, so the next plan deletes it unless the frontend still wants that backend.
    pub fn finish(self) -> Applied {
        let ReadBack {
            mut applied,
            mut slots,
            mut backends,
            mut members,
        } = self;
        // Sorted by id (stable: of two entries with one id, the one read last wins, as a map
        // insert would have it), then built in one go from the sorted run.
        backends.sort_by_key(|(id, _, _)| *id);
        let mut last: Vec<(u32, (BackendAddr, u8))> = Vec::with_capacity(backends.len());
        for (id, addr, state) in backends {
            match last.last_mut() {
                Some((lid, v)) if *lid == id => *v = (addr, state),
                _ => last.push((id, (addr, state))),
            }
        }
        applied.backends = last.into_iter().collect();
        // Stable for the same reason: the slot read last wins.
        slots.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        for run in slots.chunk_by(|a, b| a.0 == b.0) {
            let max = run.last().map_or(0, |(_, slot, _)| usize::from(*slot));
            let mut ids = vec![0; max];
            for (_, slot, id) in run {
                ids[usize::from(*slot) - 1] = *id;
            }
            let e: &mut AppliedFrontend = applied.frontends.entry(run[0].0).or_default();
            e.slots = ids;
        }
        for (fe, af) in applied.frontends.iter().filter(|(_, af)| af.has_master()) {
            applied.rev_nat.entry(af.rev_nat_id).or_insert(*fe);
        }
        members.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        for run in members.chunk_by(|a, b| a.0 == b.0) {
            let e = applied.frontends.entry(run[0].0).or_default();
            for (_, id, v) in run {
                let right = applied
                    .backends
                    .get(id)
                    .is_some_and(|(b, _)| b.to_member() == *v);
                if right || !e.slots.contains(id) {
                    e.members.insert(*id);
                }
            }
        }
        applied
    }
}
