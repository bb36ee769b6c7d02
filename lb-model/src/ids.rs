//! Id bookkeeping for the BACKENDS and REV_NAT maps: which ids are free (smallest first, so ids
//! stay small and dense), and which ids no longer have a user (to garbage-collect).
//!
//! Everything is incremental so a plan for one Service costs O(log n), not a scan of every id.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Free ids of `1..=u32::MAX` as disjoint inclusive intervals (start -> end). Intervals rather than
/// a set of gaps keep it small whatever ids a read-back map holds.
#[derive(Clone, Debug)]
pub(crate) struct IdPool {
    free: BTreeMap<u32, u32>,
}

impl Default for IdPool {
    fn default() -> Self {
        IdPool {
            free: BTreeMap::from([(1, u32::MAX)]),
        }
    }
}

impl IdPool {
    /// Mark `id` used.
    pub fn take(&mut self, id: u32) {
        let Some((&start, &end)) = self.free.range(..=id).next_back() else {
            return;
        };
        if id == 0 || id > end {
            return;
        }
        self.free.remove(&start);
        if start < id {
            self.free.insert(start, id - 1);
        }
        if id < end {
            self.free.insert(id + 1, end);
        }
    }

    /// Mark `id` free again.
    pub fn give(&mut self, id: u32) {
        if id == 0 || self.is_free(id) {
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
        if id < u32::MAX {
            if let Some(ne) = self.free.remove(&(id + 1)) {
                end = ne;
            }
        }
        self.free.insert(start, end);
    }

    pub fn is_free(&self, id: u32) -> bool {
        id != 0
            && self
                .free
                .range(..=id)
                .next_back()
                .is_some_and(|(_, &end)| id <= end)
    }

    /// The smallest free id not in `reserved` (ids handed out earlier in the same plan).
    pub fn smallest_free(&self, reserved: &BTreeSet<u32>) -> u32 {
        self.smallest_free_from(1, reserved)
    }

    /// The smallest free id `>= from` not in `reserved`. A plan handing out many ids passes the
    /// last one + 1, so it never walks again over the ids it already reserved.
    pub fn smallest_free_from(&self, from: u32, reserved: &BTreeSet<u32>) -> u32 {
        let from = from.max(1);
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
                    return id;
                }
                if id == end {
                    break;
                }
                id += 1;
            }
        }
        // 2^32 - 1 ids in use: the maps hold a few hundred thousand entries at most.
        unreachable!("id space exhausted")
    }
}

/// One id space (backend ids or rev-NAT ids): an id is in use while its map entry exists or
/// something refers to it; an entry nothing refers to is garbage.
#[derive(Clone, Debug, Default)]
pub(crate) struct IdSpace {
    pub pool: IdPool,
    /// How many map entries refer to each id (slots for backends, masters for rev-NAT).
    refs: HashMap<u32, u32>,
    /// Ids whose map entry exists but has no referrer.
    pub unused: BTreeSet<u32>,
}

impl IdSpace {
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
    fn pool_hands_out_smallest_free_and_reuses_freed_ids() {
        let mut p = IdPool::default();
        let none = BTreeSet::new();
        assert_eq!(p.smallest_free(&none), 1);
        for id in [1, 2, 3, 5] {
            p.take(id);
        }
        assert_eq!(p.smallest_free(&none), 4);
        assert_eq!(p.smallest_free(&BTreeSet::from([4])), 6);
        assert_eq!(p.smallest_free(&BTreeSet::from([4, 6, 7])), 8);
        assert_eq!(p.smallest_free_from(5, &BTreeSet::new()), 6);
        assert_eq!(p.smallest_free_from(4, &BTreeSet::new()), 4);
        assert_eq!(p.smallest_free_from(2, &BTreeSet::from([4])), 6);
        assert_eq!(p.smallest_free_from(0, &BTreeSet::new()), 4);
        p.give(2);
        assert_eq!(p.smallest_free(&none), 2);
        p.give(2); // idempotent
        p.take(2);
        p.take(4);
        assert_eq!(p.smallest_free(&none), 6);
        // Everything given back merges into the initial interval.
        for id in [1, 2, 3, 4, 5] {
            p.give(id);
        }
        assert_eq!(p.free, BTreeMap::from([(1, u32::MAX)]));
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
