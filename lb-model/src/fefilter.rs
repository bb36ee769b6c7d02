//! The frontend pre-filter (`lb_common::map_names::FEFILTER`) as the agent keeps it: which
//! addresses need a bit, and which words to write.
//!
//! Contract with the datapath (`lb-ebpf/src/fefilter.rs`): a clear bit for an address outside
//! the Service CIDR means "no frontend and no live translated flow has this destination", and
//! such packets pass without a map lookup. So:
//! - a bit is set (its word written) before any master with that address is written: the
//!   executor calls [`write_before`] before anything of a plan;
//! - a bit is cleared only when neither a frontend (desired or in the maps) nor the original
//!   destination of a live conntrack forward entry uses the address, as two consecutive
//!   conntrack sweeps found ([`Filter::sweep_done`]); the clear goes out with the next
//!   [`write_before`];
//! - the words are never cleared on start: a restarted agent reads them back
//!   ([`Filter::from_words`]) and keeps what the previous one set.
//!
//! Addresses inside the Service CIDR need no bit (the datapath always looks them up); with no
//! Service CIDR configured, every frontend address needs one.
//!
//! The reply pre-filter (the map's words from `lb_common::PORTFILTER_OFFSET`, bit = port) is
//! kept by the same rules with ports for addresses (`Applied::port_filter`, a [`Filter`] used
//! through its `*_bits` methods): a clear bit means "no reply entry of conntrack has this
//! source port", and answer paths pass such packets without a lookup. Every reply entry's
//! source port is its backend's port, so a port's bit is set before any member (or backend)
//! with the port is written, and cleared only when neither a backend (desired or in the maps)
//! nor a live flow (its reply entry, or the one its forward entry would re-create) uses it, as
//! two consecutive sweeps found.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use lb_common::{fefilter_bit, FEFILTER_WORDS, PORTFILTER_OFFSET, PORTFILTER_WORDS};

// One `Filter` shape serves both halves of the map.
const _: () = assert!(FEFILTER_WORDS == PORTFILTER_WORDS);

use crate::cidr::{self, Cidr};
use crate::planner::{MapOp, Plan};
use crate::store::MapStore;
use crate::Frontend;

/// The filter's words as the map holds them, and what the agent still has to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    words: Vec<u64>,
    /// The configured Service CIDR: its addresses need no bit (`None`: every address does).
    pub service_cidr: Option<Cidr>,
    /// The map's content is unknown (read back all zero while frontends exist: pinned by an
    /// agent that did not keep the filter): the next write sets every bit, and the sweeps
    /// clear what is not needed.
    pub fill: bool,
    /// Bits to clear with the next [`write_before`] (decided by a sweep), by word.
    pending: BTreeMap<u32, u64>,
    /// Bits set since the last completed sweep: never cleared by the next one.
    set_since: Vec<u64>,
    /// Bits the last completed sweep found unneeded (`None` before the first).
    prev_drop: Option<Vec<u64>>,
}

impl Default for Filter {
    fn default() -> Self {
        Filter {
            words: vec![0; FEFILTER_WORDS as usize],
            service_cidr: None,
            fill: false,
            pending: BTreeMap::new(),
            set_since: vec![0; FEFILTER_WORDS as usize],
            prev_drop: None,
        }
    }
}

/// The (word index, bit mask) of an address.
pub fn position(addr: Ipv4Addr) -> (u32, u64) {
    bit_position(fefilter_bit(u32::from_ne_bytes(addr.octets())))
}

/// The bits of those of `addrs` that need one when `service_cidr` is the Service CIDR.
fn bits_of(
    addrs: impl IntoIterator<Item = Ipv4Addr>,
    service_cidr: Option<Cidr>,
) -> impl Iterator<Item = u32> {
    addrs
        .into_iter()
        .filter(move |a| needs_bit(*a, service_cidr))
        .map(|a| fefilter_bit(u32::from_ne_bytes(a.octets())))
}

/// The (word index, bit mask) of bit `bit`.
pub fn bit_position(bit: u32) -> (u32, u64) {
    (bit / 64, 1u64 << (bit % 64))
}

/// Whether `addr` needs a bit when `service_cidr` is the configured Service CIDR.
pub fn needs_bit(addr: Ipv4Addr, service_cidr: Option<Cidr>) -> bool {
    !service_cidr.is_some_and(|c| cidr::contains(c, addr))
}

impl Filter {
    /// The filter read back from the map (missing words read as 0). `has_frontends`: the
    /// other maps hold frontends, so an all-zero filter cannot be trusted (see [`Filter::fill`]).
    pub fn from_words(words: &[u64], has_frontends: bool) -> Self {
        let mut f = Filter::default();
        for (dst, src) in f.words.iter_mut().zip(words) {
            *dst = *src;
        }
        f.fill = has_frontends && f.words.iter().all(|w| *w == 0);
        f
    }

    /// The words, in map order.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Whether the bit of `addr` is set.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        let (w, m) = position(addr);
        self.words[w as usize] & m != 0
    }

    /// Whether bit `bit` is set (the reply pre-filter: `bit` is a port, host order).
    pub fn contains_bit(&self, bit: u32) -> bool {
        let (w, m) = bit_position(bit);
        self.words.get(w as usize).is_some_and(|v| v & m != 0)
    }

    /// Records a word as written.
    pub fn set_word(&mut self, word: u32, value: u64) {
        let i = word as usize;
        if let Some(w) = self.words.get_mut(i) {
            let set = value & !*w;
            self.set_since[i] |= set;
            *w = value;
            // A bit set again is no longer to be cleared; one cleared is done.
            if let Some(clear) = self.pending.get_mut(&word) {
                *clear &= !set & value;
                if *clear == 0 {
                    self.pending.remove(&word);
                }
            }
        }
    }

    /// The words to write so that every address of `addrs` that needs a bit has one, on top of
    /// the pending clears: (word index, new value), each word once, in index order.
    pub fn to_set(&self, addrs: impl IntoIterator<Item = Ipv4Addr>) -> Vec<(u32, u64)> {
        self.to_set_bits(bits_of(addrs, self.service_cidr))
    }

    /// [`Filter::to_set`] by bit: every bit of `bits` set, on top of the pending clears.
    ///
    /// The words are built in a copy of the whole filter (8 KiB): a first sync names every
    /// backend port of 100k endpoints, one store each.
    pub fn to_set_bits(&self, bits: impl IntoIterator<Item = u32>) -> Vec<(u32, u64)> {
        let mut next = self.words.clone();
        for (w, clear) in &self.pending {
            next[*w as usize] &= !clear;
        }
        for bit in bits {
            let (w, m) = bit_position(bit);
            if let Some(v) = next.get_mut(w as usize) {
                *v |= m;
            }
        }
        next.iter()
            .zip(&self.words)
            .enumerate()
            .filter(|(_, (new, old))| new != old)
            .map(|(w, (new, _))| (w as u32, *new))
            .collect()
    }

    /// A conntrack sweep completed; `needed` holds every address a frontend (desired or in
    /// the maps) uses now and the original destination of every live forward entry it saw.
    /// A bit is cleared (by the next [`write_before`]) only when this sweep and the one before
    /// both found it unneeded and it was not set in between: this sweep started after the
    /// previous one ended, so after every frontend the previous one did not see was removed,
    /// and it saw every live flow such a frontend left.
    pub fn sweep_done(&mut self, needed: impl IntoIterator<Item = Ipv4Addr>) {
        self.sweep_done_bits(bits_of(needed, self.service_cidr));
    }

    /// [`Filter::sweep_done`] by bit: `needed` holds every bit still in use.
    pub fn sweep_done_bits(&mut self, needed: impl IntoIterator<Item = u32>) {
        let mut keep = vec![0u64; self.words.len()];
        for bit in needed {
            let (w, m) = bit_position(bit);
            if let Some(k) = keep.get_mut(w as usize) {
                *k |= m;
            }
        }
        let drop: Vec<u64> = self.words.iter().zip(&keep).map(|(w, k)| w & !k).collect();
        if let Some(prev) = &self.prev_drop {
            for (i, ((d, p), s)) in drop.iter().zip(prev).zip(&self.set_since).enumerate() {
                let clear = d & p & !s;
                if clear != 0 {
                    *self.pending.entry(i as u32).or_default() |= clear;
                }
            }
        }
        self.prev_drop = Some(drop);
        self.set_since.iter_mut().for_each(|s| *s = 0);
    }

    /// Words a sweep decided to clear that are not written yet.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// Writes the filter words `plan` needs before anything of it is written: every bit of every
/// address a master of the plan is written for, and of every port a member or backend of the
/// plan is written with (and first, when a half's content is unknown, every bit of it),
/// together with the clears a sweep decided. Returns the plan entries whose bit could not be
/// written: they must not be written now (their master would be invisible to packets the
/// frontend filter lets pass, their backend's answers to the reply filter); the agent retries
/// them like any failed frontend.
pub fn write_before<S: MapStore + ?Sized>(
    store: &mut S,
    plan: &Plan,
    filter: &mut Filter,
    ports: &mut Filter,
) -> BTreeSet<Frontend> {
    let mut blocked = BTreeSet::new();
    if !fill(store, filter, 0, "frontend") {
        // Nothing may be trusted yet: hold back every master of the plan.
        blocked.extend(masters(plan).map(|(label, _)| label));
    } else {
        let writes = filter.to_set(masters(plan).map(|(_, addr)| addr));
        let failed = put_words(store, filter, 0, writes, "frontend");
        blocked.extend(
            masters(plan)
                .filter(|(_, addr)| {
                    needs_bit(*addr, filter.service_cidr) && failed.contains(&position(*addr).0)
                })
                .map(|(label, _)| label),
        );
    }
    let backend_ports = plan.prepare.iter().filter_map(|op| match op {
        MapOp::PutBackend { backend, .. } => Some(u32::from(backend.port)),
        _ => None,
    });
    let port_failed = if fill(store, ports, PORTFILTER_OFFSET, "reply") {
        let writes = ports.to_set_bits(backend_ports.chain(members(plan).map(|(_, p)| p)));
        !put_words(store, ports, PORTFILTER_OFFSET, writes, "reply").is_empty()
    } else {
        true
    };
    if port_failed {
        // A backend whose port's bit may be clear must not be given to a flow (its answers
        // would pass untranslated): hold back every frontend of the plan that adds members.
        // (Writing an array word fails only when the map itself is broken.)
        blocked.extend(members(plan).map(|(label, _)| label));
    }
    blocked
}

/// With `f.fill`: sets every bit of the half at `offset`. False while that failed.
fn fill<S: MapStore + ?Sized>(store: &mut S, f: &mut Filter, offset: u32, what: &str) -> bool {
    if !f.fill {
        return true;
    }
    let mut ok = true;
    for w in 0..f.words.len() as u32 {
        match store.put_filter_word(offset + w, u64::MAX) {
            Ok(()) => f.set_word(w, u64::MAX),
            Err(e) => {
                tracing::warn!(word = offset + w, filter = what, error = %e, "writing a pre-filter failed");
                ok = false;
            }
        }
    }
    f.fill = !ok;
    ok
}

/// Writes `writes` (words of the half at `offset`); returns the words that failed.
fn put_words<S: MapStore + ?Sized>(
    store: &mut S,
    f: &mut Filter,
    offset: u32,
    writes: Vec<(u32, u64)>,
    what: &str,
) -> BTreeSet<u32> {
    let mut failed = BTreeSet::new();
    for (w, v) in writes {
        match store.put_filter_word(offset + w, v) {
            Ok(()) => f.set_word(w, v),
            Err(e) => {
                tracing::warn!(word = offset + w, filter = what, error = %e, "writing a pre-filter failed");
                failed.insert(w);
            }
        }
    }
    failed
}

/// (plan entry, port) of every member the plan writes.
fn members(plan: &Plan) -> impl Iterator<Item = (Frontend, u32)> + '_ {
    plan.frontends.iter().flat_map(|(label, ops)| {
        ops.iter().filter_map(move |op| match op {
            MapOp::PutMember { backend, .. } => Some((*label, u32::from(backend.port))),
            _ => None,
        })
    })
}

/// (plan entry, address) of every master the plan writes.
fn masters(plan: &Plan) -> impl Iterator<Item = (Frontend, Ipv4Addr)> + '_ {
    plan.frontends.iter().flat_map(|(label, ops)| {
        ops.iter().filter_map(move |op| match op {
            MapOp::PutMaster { frontend, .. } => Some((*label, frontend.addr)),
            _ => None,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
        Ipv4Addr::new(a, b, c, d)
    }

    #[test]
    fn bits_of_one_subnet_spread_over_the_filter() {
        let bits: std::collections::BTreeSet<u32> = (0..=255u8)
            .map(|d| fefilter_bit(u32::from_ne_bytes([10, 0, 0, d])))
            .collect();
        assert!(bits.len() > 250, "{} distinct bits of 256", bits.len());
        assert!(bits.iter().all(|b| *b < FEFILTER_WORDS * 64));
    }

    #[test]
    fn set_covers_addresses_outside_the_service_cidr_only() {
        let f = Filter {
            service_cidr: Some((ip(10, 96, 0, 0), 12)),
            ..Filter::default()
        };
        let ops = f.to_set([ip(10, 96, 0, 10), ip(192, 168, 1, 5)]);
        let mut g = f.clone();
        for (w, v) in &ops {
            g.set_word(*w, *v);
        }
        assert!(g.contains(ip(192, 168, 1, 5)));
        assert!(
            !g.contains(ip(10, 96, 0, 10))
                || position(ip(10, 96, 0, 10)) == position(ip(192, 168, 1, 5))
        );
        // Without a CIDR every frontend address gets its bit.
        let all = Filter::default().to_set([ip(10, 96, 0, 10)]);
        assert_eq!(all.len(), 1);
        // Already set: nothing to write.
        assert!(g.to_set([ip(192, 168, 1, 5)]).is_empty());
    }

    #[test]
    fn set_writes_each_word_once_with_every_bit() {
        let f = Filter::default();
        let addrs: Vec<Ipv4Addr> = (0..5000u32)
            .map(|i| Ipv4Addr::from(0xc0a8_0000 + i))
            .collect();
        let ops = f.to_set(addrs.iter().copied());
        let words: std::collections::BTreeSet<u32> = ops.iter().map(|(w, _)| *w).collect();
        assert_eq!(words.len(), ops.len());
        let mut g = f.clone();
        for (w, v) in ops {
            g.set_word(w, v);
        }
        assert!(addrs.iter().all(|a| g.contains(*a)));
    }

    fn apply(f: &mut Filter, writes: Vec<(u32, u64)>) {
        for (w, v) in writes {
            f.set_word(w, v);
        }
    }

    #[test]
    fn a_bit_is_cleared_only_after_two_sweeps_found_it_unneeded() {
        let mut f = Filter::default();
        let (a, b) = (ip(192, 168, 1, 5), ip(203, 0, 113, 9));
        assert_ne!(position(a), position(b));
        let w = f.to_set([a, b]);
        apply(&mut f, w);
        // The first sweep after the bits were set clears nothing.
        f.sweep_done([a]);
        assert_eq!(f.pending(), 0);
        // The second agrees that b is unneeded: cleared; a stays.
        f.sweep_done([a]);
        assert_eq!(f.pending(), 1);
        let w = f.to_set([]);
        apply(&mut f, w);
        assert!(f.contains(a) && !f.contains(b));
        // Nothing more to clear.
        f.sweep_done([a]);
        f.sweep_done([a]);
        assert_eq!(f.pending(), 0);
    }

    #[test]
    fn a_bit_set_again_between_sweeps_is_kept() {
        let mut f = Filter::default();
        let b = ip(203, 0, 113, 9);
        let w = f.to_set([b]);
        apply(&mut f, w);
        f.sweep_done([]);
        f.sweep_done([]);
        let w = f.to_set([]);
        apply(&mut f, w);
        assert!(!f.contains(b));
        // Set again (a new frontend), then a sweep that saw neither it nor a flow: kept once.
        let w = f.to_set([b]);
        apply(&mut f, w);
        f.sweep_done([]);
        assert_eq!(f.pending(), 0);
        assert!(f.contains(b));
    }

    #[test]
    fn a_master_written_with_a_pending_clear_keeps_its_bit() {
        let mut f = Filter::default();
        let b = ip(203, 0, 113, 9);
        let w = f.to_set([b]);
        apply(&mut f, w);
        f.sweep_done([]);
        f.sweep_done([]);
        assert_eq!(f.pending(), 1);
        // A plan writes a master at b before the clear went out: the word keeps the bit.
        let w = f.to_set([b]);
        apply(&mut f, w);
        assert!(f.contains(b));
    }

    #[test]
    fn port_bits_are_exact_and_cleared_after_two_sweeps() {
        let mut ports = Filter::default();
        let w = ports.to_set_bits([8080, 53, 65535]);
        apply(&mut ports, w);
        assert!(ports.contains_bit(8080) && ports.contains_bit(53) && ports.contains_bit(65535));
        // One bit per port: neighbours stay clear.
        assert!(!ports.contains_bit(8081) && !ports.contains_bit(52) && !ports.contains_bit(40000));
        // Out of range: ignored, never a panic.
        assert!(ports.to_set_bits([70000]).is_empty());
        assert!(!ports.contains_bit(70000));
        // 53 is still used (a backend, or a live reply entry); 8080 and 65535 no more.
        ports.sweep_done_bits([53]);
        assert_eq!(ports.pending(), 0);
        ports.sweep_done_bits([53, 65535]);
        let w = ports.to_set_bits([]);
        apply(&mut ports, w);
        assert!(ports.contains_bit(53) && ports.contains_bit(65535) && !ports.contains_bit(8080));
    }

    #[test]
    fn read_back_words_are_kept() {
        let mut f = Filter::default();
        for (w, v) in f.to_set([ip(192, 168, 1, 5)]) {
            f.set_word(w, v);
        }
        let g = Filter::from_words(f.words(), true);
        assert_eq!(f.words(), g.words());
        assert!(g.contains(ip(192, 168, 1, 5)));
        assert!(!g.fill);
        // All zero next to frontends: written by an agent that did not keep it.
        assert!(Filter::from_words(&[], true).fill);
        assert!(!Filter::from_words(&[], false).fill);
    }
}
