//! Stable slot assignment: which backend id goes in which slot of a frontend.
//!
//! A backend that stays keeps its slot; new backends fill freed slots; when the count shrinks the
//! backends of slots above the new count move into the holes, so slots stay `1..=count` dense.
//! One endpoint added or removed therefore rewrites one slot (plus the master), never the Service.

use std::collections::HashSet;

/// New slot contents (index 0 = slot 1) for backend ids `want` (distinct), given the current
/// contents `old` (0 = empty slot). The result has exactly `want.len()` entries.
pub(crate) fn assign(old: &[u32], want: &[u32]) -> Vec<u32> {
    let n = want.len();
    let wanted: HashSet<u32> = want.iter().copied().collect();
    let mut placed: HashSet<u32> = HashSet::with_capacity(n);
    let mut new = vec![0u32; n];
    let mut movers = Vec::new();
    for (i, &id) in old.iter().enumerate() {
        // `placed.insert` also drops a second slot holding the same id (a read-back oddity).
        if id == 0 || !wanted.contains(&id) || !placed.insert(id) {
            continue;
        }
        if i < n {
            new[i] = id;
        } else {
            movers.push(id);
        }
    }
    let mut fill = want
        .iter()
        .copied()
        .filter(|id| !placed.contains(id))
        .chain(movers);
    for slot in new.iter_mut().filter(|s| **s == 0) {
        *slot = fill.next().expect("holes = new backends + movers");
    }
    new
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writes(old: &[u32], new: &[u32]) -> usize {
        new.iter()
            .enumerate()
            .filter(|(i, id)| old.get(*i) != Some(id))
            .count()
    }

    #[test]
    fn staying_backends_keep_their_slots() {
        assert_eq!(assign(&[4, 5, 6], &[4, 5, 6]), vec![4, 5, 6]);
        assert_eq!(assign(&[6, 4, 5], &[4, 5, 6]), vec![6, 4, 5]);
    }

    #[test]
    fn added_backend_takes_one_new_slot() {
        let new = assign(&[6, 4, 5], &[4, 5, 6, 7]);
        assert_eq!(new, vec![6, 4, 5, 7]);
        assert_eq!(writes(&[6, 4, 5], &new), 1);
    }

    #[test]
    fn removed_backend_hole_is_filled_by_the_last_slot() {
        let new = assign(&[1, 2, 3, 4, 5], &[1, 3, 4, 5]);
        assert_eq!(new, vec![1, 5, 3, 4]);
        assert_eq!(writes(&[1, 2, 3, 4, 5], &new), 1);
    }

    #[test]
    fn replaced_backend_reuses_the_slot() {
        assert_eq!(assign(&[1, 2, 3], &[1, 3, 9]), vec![1, 9, 3]);
    }

    #[test]
    fn holes_and_duplicates_from_a_read_back_are_repaired() {
        assert_eq!(assign(&[0, 2, 2, 7], &[2, 3]), vec![3, 2]);
        assert_eq!(assign(&[5, 6], &[]), Vec::<u32>::new());
        assert_eq!(assign(&[], &[1, 2]), vec![1, 2]);
    }
}
