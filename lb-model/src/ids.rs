//! Id bookkeeping for backend ids (BACKENDS keys) and frontend ids (the masters' `rev_nat_id`):
//! which ids are in use, where the next new id is searched from, and which backend ids no longer
//! have a user (to garbage-collect).
//!
//! # Why new ids come from a forward-only cursor, not the smallest free id
//!
//! An id lives on after its map entry is deleted. A conntrack entry keeps the `backend_id` and
//! `rev_nat_id` of its flow, and an affinity entry is keyed by a `rev_nat_id` and stores a
//! `backend_id`, for as long as those entries live (an established TCP flow: a day). Handing a
//! freed id to the next new backend or frontend would give those stale entries a new meaning: an
//! affinity entry of a deleted backend would pin clients to whichever backend got its id, and a
//! re-created Service would inherit the flows and affinity of the Service that had its frontend
//! id (the datapath re-selects a re-used tuple only when the master's `rev_nat_id` differs). A
//! frontend id is the identity of one incarnation of a frontend: it has no map of its own, only
//! the master holds it.
//!
//! So a new id is the first id at or after a cursor that is not in use, and the cursor then moves
//! past it. The cursor only moves forward, wrapping from `u32::MAX` back to 1 (ids in use are
//! skipped, 0 is never an id); a freed id comes back only after 2^32 - 1 further ids were
//! handed out, far longer than any conntrack or affinity entry lives. The cursor starts past the
//! largest id ever seen: past the largest id present in the maps after a read-back (what an
//! earlier agent freed above that is unknown, a small risk only at a restart), then past every
//! id handed out.
//!
//! Everything is incremental so a plan for one Service costs O(log n), not a scan of every id.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// The id after `id` in handing-out order: `id + 1`, and 1 after `u32::MAX` (0 is never an id).
pub(crate) const fn id_after(id: u32) -> u32 {
    if id == u32::MAX {
        1
    } else {
        id + 1
    }
}

/// Move `cursor` past `id` when `id` lies at or ahead of it (an id just handed out). Ahead means
/// within the next 2^31 ids, wrapping (serial-number arithmetic, RFC 1982), so the cursor never
/// moves back to an older id that is re-written (e.g. a backend's state change).
pub(crate) fn advance(cursor: &mut u32, id: u32) {
    if id != 0 && id.wrapping_sub(*cursor) < 1 << 31 {
        *cursor = id_after(id);
    }
}

/// Where the next new id of each space is searched from (the next id to try, >= 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cursors {
    pub backend: u32,
    pub rev_nat: u32,
    /// The next Maglev table index to try (`0..tables`, wrapping): a freed table is written
    /// again only after every other free one was, long after any packet that read its old
    /// master finished.
    pub table: u32,
    /// The next Service port id to try (`1..=max`, wrapping to 1 in the bounded pool).
    pub svc_port: u32,
}

impl Cursors {
    /// Cursors past the largest ids present (the table cursor at 0, the Service port cursor
    /// at 1: [`Cursors::with_svc_port`] sets it).
    pub fn past(max_backend: u32, max_rev_nat: u32) -> Self {
        Cursors {
            backend: id_after(max_backend),
            rev_nat: id_after(max_rev_nat),
            table: 0,
            svc_port: 1,
        }
    }

    /// The same with the Service port cursor past `max_svc_port`.
    pub fn with_svc_port(self, max_svc_port: u32) -> Self {
        Cursors {
            svc_port: id_after(max_svc_port),
            ..self
        }
    }
}

/// Ids in use of `1..=u32::MAX`, kept as the free ones: disjoint inclusive intervals
/// (start -> end). Intervals rather than a set of gaps keep it small whatever ids a read-back map
/// holds.
#[derive(Clone, Debug)]
pub(crate) struct IdPool {
    free: BTreeMap<u32, u32>,
    /// The largest id handed out (`u32::MAX`, or the size of a bounded space such as the
    /// Service port ids). Ids above it may be in use (read back) but are never free.
    max: u32,
    /// How many ids `free` holds, so that a bounded space that is used up (every free id
    /// already handed out in the plan being made) answers at once instead of walking every
    /// reserved id on each request: a plan with more Service ports than `--service-ports-max`
    /// would otherwise cost O(ports x max).
    free_count: u64,
}

impl Default for IdPool {
    fn default() -> Self {
        Self::bounded(u32::MAX)
    }
}

impl IdPool {
    /// A pool of the ids `1..=max` (at least 1).
    pub fn bounded(max: u32) -> Self {
        let max = max.max(1);
        IdPool {
            free: BTreeMap::from([(1, max)]),
            max,
            free_count: u64::from(max),
        }
    }

    /// Mark `id` used.
    pub fn take(&mut self, id: u32) {
        let Some((&start, &end)) = self.free.range(..=id).next_back() else {
            return;
        };
        if id == 0 || id > end {
            return;
        }
        self.free.remove(&start);
        self.free_count -= 1;
        if start < id {
            self.free.insert(start, id - 1);
        }
        if id < end {
            self.free.insert(id + 1, end);
        }
    }

    /// Mark `id` free again.
    pub fn give(&mut self, id: u32) {
        if id == 0 || id > self.max || self.is_free(id) {
            return;
        }
        let mut start = id;
        let mut end = id;
        if let Some((&ps, &pe)) = self.free.range(..id).next_back() {
            if pe == id - 1 {
                self.free.remove(&ps);
                start = ps;
            }
        }
        if id < self.max {
            if let Some(ne) = self.free.remove(&(id + 1)) {
                end = ne;
            }
        }
        self.free.insert(start, end);
        self.free_count += 1;
    }

    pub fn is_free(&self, id: u32) -> bool {
        id != 0
            && self
                .free
                .range(..=id)
                .next_back()
                .is_some_and(|(_, &end)| id <= end)
    }

    /// The first free id at or after `cursor` that is not in `reserved` (new ids handed out
    /// earlier in the same plan), wrapping from `u32::MAX` back to 1.
    pub fn next_free(&self, cursor: u32, reserved: &BTreeSet<u32>) -> u32 {
        self.first_free_from(cursor.max(1), reserved)
            .or_else(|| self.first_free_from(1, reserved))
            // 2^32 - 1 ids in use: the maps hold a few hundred thousand entries at most.
            .expect("id space exhausted")
    }

    /// Hand out a new id: the first free one at or after `cursor` not in `reserved`; the
    /// cursor moves past it and it joins `reserved` (the ids handed out in the same plan).
    pub fn hand_out(&self, cursor: &mut u32, reserved: &mut BTreeSet<u32>) -> u32 {
        let id = self.next_free(*cursor, reserved);
        *cursor = id_after(id);
        reserved.insert(id);
        id
    }

    /// [`IdPool::hand_out`] in a bounded space that may be full: `None` when no id is free.
    /// The cursor wraps from `max` back to 1.
    pub fn try_hand_out(&self, cursor: &mut u32, reserved: &mut BTreeSet<u32>) -> Option<u32> {
        if reserved.len() as u64 >= self.free_count {
            // Every free id is already handed out in this plan (`reserved` only ever holds
            // ids this pool had free).
            return None;
        }
        let from = if *cursor > self.max {
            1
        } else {
            (*cursor).max(1)
        };
        let id = self
            .first_free_from(from, reserved)
            .or_else(|| self.first_free_from(1, reserved))?;
        *cursor = if id >= self.max { 1 } else { id + 1 };
        reserved.insert(id);
        Some(id)
    }

    /// The first free id `>= from` not in `reserved`, if any before the end of the id space.
    fn first_free_from(&self, from: u32, reserved: &BTreeSet<u32>) -> Option<u32> {
        let first = self
            .free
            .range(..=from)
            .next_back()
            .filter(|(_, &end)| end >= from);
        for (&start, &end) in first
            .into_iter()
            .chain(self.free.range(from.saturating_add(1)..))
        {
            let mut id = start.max(from);
            loop {
                if !reserved.contains(&id) {
                    return Some(id);
                }
                if id == end {
                    break;
                }
                id += 1;
            }
        }
        None
    }
}

/// One id space (backend ids or frontend ids): an id is in use while its map entry exists or
/// something refers to it; an entry nothing refers to is garbage. (Frontend ids have no entry:
/// they are in use while a master holds them.)
#[derive(Clone, Debug, Default)]
pub(crate) struct IdSpace {
    pub pool: IdPool,
    /// How many map entries refer to each id (slots and members for backends, masters for
    /// frontend ids).
    refs: HashMap<u32, u32>,
    /// Ids whose map entry exists but has no referrer.
    pub unused: BTreeSet<u32>,
}

impl IdSpace {
    /// An empty space over `pool` (e.g. a bounded one).
    pub fn with_pool(pool: IdPool) -> Self {
        IdSpace {
            pool,
            ..IdSpace::default()
        }
    }

    /// Re-derive the state of `id` after its entry (`present`) or its references changed.
    pub fn refresh(&mut self, id: u32, present: bool) {
        if id == 0 {
            return;
        }
        let refs = self.refs.get(&id).copied().unwrap_or(0);
        if present || refs > 0 {
            self.pool.take(id);
        } else {
            self.pool.give(id);
        }
        if present && refs == 0 {
            self.unused.insert(id);
        } else {
            self.unused.remove(&id);
        }
    }

    pub fn add_ref(&mut self, id: u32, present: bool) {
        if id == 0 {
            return;
        }
        *self.refs.entry(id).or_default() += 1;
        self.refresh(id, present);
    }

    pub fn drop_ref(&mut self, id: u32, present: bool) {
        if id == 0 {
            return;
        }
        if let Entry::Occupied(mut e) = self.refs.entry(id) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
        self.refresh(id, present);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_hands_out_the_first_free_id_from_the_cursor() {
        let mut p = IdPool::default();
        let none = BTreeSet::new();
        assert_eq!(p.next_free(1, &none), 1);
        assert_eq!(p.next_free(0, &none), 1, "0 is never an id");
        for id in [1, 2, 3, 5] {
            p.take(id);
        }
        assert_eq!(p.next_free(1, &none), 4);
        assert_eq!(p.next_free(1, &BTreeSet::from([4])), 6);
        assert_eq!(p.next_free(1, &BTreeSet::from([4, 6, 7])), 8);
        assert_eq!(p.next_free(5, &none), 6);
        assert_eq!(p.next_free(4, &none), 4);
        assert_eq!(p.next_free(2, &BTreeSet::from([4])), 6);
        p.give(2);
        assert_eq!(
            p.next_free(3, &none),
            4,
            "a freed id behind the cursor is not found"
        );
        p.give(2); // idempotent
        p.take(2);
        p.take(4);
        assert_eq!(p.next_free(1, &none), 6);
        // Everything given back merges into the initial interval.
        for id in [1, 2, 3, 4, 5] {
            p.give(id);
        }
        assert_eq!(p.free, BTreeMap::from([(1, u32::MAX)]));
    }

    #[test]
    fn pool_wraps_from_the_end_of_the_id_space_to_the_first_free_id() {
        let mut p = IdPool::default();
        for id in [1, 2, u32::MAX - 1, u32::MAX] {
            p.take(id);
        }
        assert_eq!(p.next_free(u32::MAX - 1, &BTreeSet::new()), 3);
        assert_eq!(p.next_free(u32::MAX, &BTreeSet::from([3])), 4);
        assert_eq!(p.next_free(u32::MAX - 2, &BTreeSet::new()), u32::MAX - 2);
    }

    #[test]
    fn cursor_moves_only_forward_and_wraps_past_zero() {
        assert_eq!(id_after(0), 1);
        assert_eq!(id_after(7), 8);
        assert_eq!(id_after(u32::MAX), 1);
        let mut c = 5;
        advance(&mut c, 5);
        assert_eq!(c, 6);
        advance(&mut c, 9);
        assert_eq!(c, 10);
        advance(&mut c, 3); // an older id re-written: the cursor stays
        assert_eq!(c, 10);
        advance(&mut c, 0);
        assert_eq!(c, 10);
        let mut c = u32::MAX;
        advance(&mut c, u32::MAX);
        assert_eq!(c, 1);
        let mut c = u32::MAX - 1;
        advance(&mut c, 2); // handed out after wrapping: ahead of the cursor
        assert_eq!(c, 3);
        assert_eq!(
            Cursors::past(0, 4),
            Cursors {
                backend: 1,
                rev_nat: 5,
                table: 0,
                svc_port: 1,
            }
        );
    }

    #[test]
    fn bounded_pool_wraps_at_its_size_and_runs_out() {
        let mut p = IdPool::bounded(3);
        let mut reserved = BTreeSet::new();
        let mut cursor = 2;
        assert_eq!(p.try_hand_out(&mut cursor, &mut reserved), Some(2));
        assert_eq!(p.try_hand_out(&mut cursor, &mut reserved), Some(3));
        assert_eq!(cursor, 1, "wraps to 1 after the last id");
        assert_eq!(p.try_hand_out(&mut cursor, &mut reserved), Some(1));
        assert_eq!(
            p.try_hand_out(&mut cursor, &mut reserved),
            None,
            "all taken"
        );
        for id in [1, 2, 3] {
            p.take(id);
        }
        p.take(7); // read back above the size: in use, never free
        p.give(7);
        assert!(!p.is_free(7));
        p.give(2);
        let mut cursor = 3;
        assert_eq!(p.try_hand_out(&mut cursor, &mut BTreeSet::new()), Some(2));
    }

    #[test]
    fn a_used_up_bounded_pool_answers_none_for_every_further_request() {
        // More requests in one plan than the space holds (more Service ports than
        // --service-ports-max): every id once, then None each time, with the count of free
        // ids kept right through take and give.
        let mut p = IdPool::bounded(1000);
        p.take(10);
        p.take(10);
        p.give(11); // already free: no change
        let mut reserved = BTreeSet::new();
        let mut cursor = 500;
        let mut got = BTreeSet::new();
        for _ in 0..999 {
            let id = p.try_hand_out(&mut cursor, &mut reserved).expect("a free id");
            assert!(got.insert(id), "{id} handed out twice");
        }
        assert!(!got.contains(&10));
        for _ in 0..5000 {
            assert_eq!(p.try_hand_out(&mut cursor, &mut reserved), None);
        }
        p.give(10);
        assert_eq!(p.try_hand_out(&mut cursor, &mut reserved), Some(10));
    }

    #[test]
    fn pool_handles_the_ends_of_the_id_space() {
        let mut p = IdPool::default();
        p.take(u32::MAX);
        p.take(0); // ignored: 0 is never an id
        assert!(!p.is_free(u32::MAX));
        assert!(!p.is_free(0));
        p.give(u32::MAX);
        assert!(p.is_free(u32::MAX));
        assert_eq!(p.free, BTreeMap::from([(1, u32::MAX)]));
    }

    #[test]
    fn space_tracks_unreferenced_entries() {
        let mut s = IdSpace::default();
        s.refresh(3, true); // entry written, nothing refers to it yet
        assert_eq!(s.unused, BTreeSet::from([3]));
        s.add_ref(3, true);
        assert!(s.unused.is_empty());
        s.add_ref(3, true);
        s.drop_ref(3, true);
        assert!(s.unused.is_empty(), "still one referrer");
        s.drop_ref(3, true);
        assert_eq!(s.unused, BTreeSet::from([3]));
        assert!(!s.pool.is_free(3));
        s.refresh(3, false); // entry deleted
        assert!(s.unused.is_empty());
        assert!(s.pool.is_free(3));
        // A reference to an id without entry keeps the id from being handed out.
        s.add_ref(9, false);
        assert!(!s.pool.is_free(9));
        assert!(s.unused.is_empty());
    }
}
