//! Telling from the L4 checksum field whether a tc packet is `CHECKSUM_PARTIAL`, so a
//! translation needs one checksum helper call instead of two.
//!
//! A tc program cannot read `skb->ip_summed`, yet the L4 checksum of a rewrite depends on it:
//! for a `CHECKSUM_PARTIAL` skb (a pod's own TCP with offload, the common case) the field holds
//! the pseudo-header sum only, so an address change updates it and a port change must not
//! (the port is payload, summed later); for any other skb the field is the full checksum and
//! both change it. `bpf_l4_csum_replace` knows `ip_summed`, which is why a DNAT took two calls:
//! the address with `BPF_F_PSEUDO_HDR`, then the port. Each costs ~25 ns per packet here.
//!
//! The two cases update the field in opposite directions: the pseudo-header sum moves by
//! `+(to - from)`, the full checksum (stored complemented) by `-(to - from)`. So after the
//! address call, the field tells which one the kernel did ([`after_address_update`]), and the
//! port is then updated in software (full checksum) or left alone (partial). The prediction
//! reproduces the kernel's arithmetic exactly (`inet_proto_csum_replace4`, `csum_replace4`,
//! `csum_add`, `csum_fold`); when the field matches both predictions (the address change does
//! not move the sum) or neither, the answer is `None` and the caller keeps the helper for the
//! port. A wrong answer would need the field to match the other case's prediction, which the
//! exact arithmetic rules out; `CHECKSUM_COMPLETE` updates the field as a full checksum and its
//! `skb->csum` only for the pseudo header, which the helper call already did.

/// How the kernel treated the L4 checksum of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Summed {
    /// `CHECKSUM_PARTIAL`: the field is the pseudo-header sum; payload changes do not touch it.
    Partial,
    /// Any other: the field is the full checksum.
    Full,
}

/// The kernel's `csum_add`: 32-bit one's-complement addition with end-around carry.
#[inline(always)]
const fn add(csum: u32, addend: u32) -> u32 {
    let res = csum.wrapping_add(addend);
    res.wrapping_add((res < addend) as u32)
}

/// The kernel's `csum_sub`.
#[inline(always)]
const fn sub(csum: u32, addend: u32) -> u32 {
    add(csum, !addend)
}

/// The kernel's `csum_fold`: folded to 16 bits and complemented.
#[inline(always)]
const fn fold(csum: u32) -> u16 {
    let mut sum = (csum & 0xffff) + (csum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The field after `inet_proto_csum_replace4(field, skb, from, to, pseudohdr = true)` on a
/// `CHECKSUM_PARTIAL` skb: `~csum_fold(csum_add(csum_sub(csum_unfold(*sum), from), to))`.
#[inline(always)]
pub const fn partial_after(field: u16, from: u32, to: u32) -> u16 {
    !fold(add(sub(field as u32, from), to))
}

/// The field after the same call on any other skb: `csum_replace4(field, from, to)`, i.e.
/// `csum_fold(csum_add(csum_sub(~csum_unfold(*sum), from), to))`.
#[inline(always)]
pub const fn full_after(field: u16, from: u32, to: u32) -> u16 {
    fold(add(sub(!(field as u32), from), to))
}

/// Which update `bpf_l4_csum_replace(.., from, to, BPF_F_PSEUDO_HDR | 4)` made, given the field
/// `before` and `after` it (as stored: the in-memory bytes read as a native u16; `from` / `to`
/// the address's in-memory bytes as a native u32, as the helper takes them). `None`: cannot
/// tell (both or neither prediction match); the caller must not guess.
#[inline(always)]
pub const fn after_address_update(before: u16, after: u16, from: u32, to: u32) -> Option<Summed> {
    let partial = partial_after(before, from, to) == after;
    let full = full_after(before, from, to) == after;
    match (partial, full) {
        (true, false) => Some(Summed::Partial),
        (false, true) => Some(Summed::Full),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One's-complement sum of 16-bit words, the way a receiver checks a segment.
    fn ones_sum(words: &[u16]) -> u16 {
        let mut s: u32 = 0;
        for w in words {
            s += u32::from(*w);
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    fn halves(x: u32) -> [u16; 2] {
        [x as u16, (x >> 16) as u16]
    }

    proptest! {
        /// A full checksum stays valid: a "segment" of a pseudo-header address, some data and
        /// its checksum sums to 0xffff before and after the address changes.
        #[test]
        fn full_update_keeps_a_segment_valid(from: u32, to: u32, data: [u16; 6]) {
            let mut words = halves(from).to_vec();
            words.extend_from_slice(&data);
            let csum = !ones_sum(&words);
            let after = full_after(csum, from, to);
            let mut check = halves(to).to_vec();
            check.extend_from_slice(&data);
            check.push(after);
            prop_assert!(matches!(ones_sum(&check), 0xffff | 0));
        }

        /// A partial field is the (uncomplemented) pseudo-header sum: after the change it is the
        /// sum with the new address.
        #[test]
        fn partial_update_is_the_new_pseudo_sum(from: u32, to: u32, rest: [u16; 4]) {
            let mut words = halves(from).to_vec();
            words.extend_from_slice(&rest);
            let field = ones_sum(&words);
            let after = partial_after(field, from, to);
            let mut new = halves(to).to_vec();
            new.extend_from_slice(&rest);
            let want = ones_sum(&new);
            // One's complement has two zeros.
            prop_assert!(after == want || (after | want) == 0xffff && (after == 0 || want == 0));
        }

        /// The answer is never the other case: each case's own result is recognised as itself
        /// or not at all.
        #[test]
        fn never_mistakes_one_case_for_the_other(field: u16, from: u32, to: u32) {
            prop_assert_ne!(
                after_address_update(field, partial_after(field, from, to), from, to),
                Some(Summed::Full)
            );
            prop_assert_ne!(
                after_address_update(field, full_after(field, from, to), from, to),
                Some(Summed::Partial)
            );
        }
    }

    #[test]
    fn tells_the_cases_apart_when_the_sum_moves() {
        let (from, to) = (u32::from_ne_bytes([10, 96, 0, 10]), u32::from_ne_bytes([10, 244, 1, 10]));
        for field in [0x0000, 0x1234, 0xfffe, 0xffff, 0x8000] {
            assert_eq!(
                after_address_update(field, partial_after(field, from, to), from, to),
                Some(Summed::Partial),
                "{field:#x}"
            );
            assert_eq!(
                after_address_update(field, full_after(field, from, to), from, to),
                Some(Summed::Full),
                "{field:#x}"
            );
        }
    }

    #[test]
    fn an_address_change_that_does_not_move_the_sum_is_not_told() {
        // Swapping the two 16-bit halves leaves every one's-complement sum as it is.
        let from = u32::from_ne_bytes([10, 1, 10, 2]);
        let to = u32::from_ne_bytes([10, 2, 10, 1]);
        let mut untold = 0;
        for field in [0x0000, 0x1234, 0xffff, 0x8000] {
            let (p, f) = (partial_after(field, from, to), full_after(field, from, to));
            if p == f {
                // The two updates leave the same field: nothing to tell them apart.
                untold += 1;
                assert_eq!(after_address_update(field, p, from, to), None);
            } else {
                // Only the representation of zero differs: still told right.
                assert_eq!(after_address_update(field, p, from, to), Some(Summed::Partial));
                assert_eq!(after_address_update(field, f, from, to), Some(Summed::Full));
            }
        }
        assert!(untold > 0);
        // Nor is a field that matches neither.
        let (from, to) = (1, 2);
        let odd = partial_after(0x1234, from, to).wrapping_add(7);
        assert_eq!(after_address_update(0x1234, odd, from, to), None);
    }
}
