//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, section 3.4): the lookup table of one frontend, and the flow hash
//! the datapath indexes it with. Pure and deterministic: every node builds the same table from
//! the same backends, whatever their backend ids, so a client reaches the same pod through
//! any node.
//!
//! - A backend is named `"addr:port"` ([`backend_name`]). Its preference list is the
//!   permutation `offset, offset + skip, offset + 2 skip, ... (mod M)` with
//!   `offset = h1(name) % M` and `skip = h2(name) % (M - 1) + 1`; h1 and h2 are SipHash-2-4 with
//!   two fixed keys ([`siphash24`]: never a per-process random key, so every node and every
//!   agent run agrees). M is prime, so every skip is coprime with M and each list is a
//!   permutation of all M entries.
//! - [`populate`]: the backends take turns, in name order, each claiming the next entry of
//!   its list that is still empty, until the table is full. Every backend gets
//!   `floor(M / N)` or `ceil(M / N)` entries (uniform spread), and removing one backend moves
//!   little more than its own `1 / N` share (minimal disruption, see the tests).
//! - The datapath hashes the client, not the frontend ([`flow_hash`]: jhash of the client
//!   address, client port and protocol): the same client port reaches the same pod through
//!   every node's NodePort, whose addresses differ. Entry `table * M + flow_hash % M` of
//!   `MAGLEV` holds the backend id.
//!
//! [`Geometry`] is the shape of the `MAGLEV` array (`--maglev-table-size` M,
//! `--maglev-tables`).

use std::fmt;
use std::net::Ipv4Addr;

use crate::BackendAddr;

/// The shape of the `MAGLEV` array: `tables` tables of `m` entries (M, a prime).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Geometry {
    /// Entries per table (Maglev's M): a prime, the `XLB_MAGLEV_M` global.
    pub m: u32,
    /// How many tables the array holds (`--maglev-tables`).
    pub tables: u32,
}

impl Default for Geometry {
    fn default() -> Self {
        Geometry {
            m: lb_common::DEFAULT_MAGLEV_M,
            tables: lb_common::DEFAULT_MAGLEV_TABLES,
        }
    }
}

impl Geometry {
    /// Whether `m` and `tables` are usable: `m` a prime, `1 <= tables < m` (so `m` is the
    /// largest prime factor of the array's length, [`Geometry::from_len`]), and the array's
    /// length `tables * m` fits in a `u32` index.
    pub fn check(m: u32, tables: u32) -> Result<Geometry, String> {
        if !is_prime(m) {
            return Err(format!("the Maglev table size {m} is not a prime"));
        }
        if tables == 0 || tables >= m {
            return Err(format!(
                "{tables} Maglev tables: there must be at least 1 and fewer than the table size {m}"
            ));
        }
        if u64::from(tables) * u64::from(m) > u64::from(u32::MAX) {
            return Err(format!(
                "{tables} Maglev tables of {m} entries do not fit in one BPF array"
            ));
        }
        Ok(Geometry { m, tables })
    }

    /// The shape of a `MAGLEV` array of `len` entries (its `max_entries`): M is the largest
    /// prime factor of `len`. Exact for every array the agent creates ([`Geometry::check`]: M
    /// prime and more than `tables`, so no prime factor of `tables` reaches M). `None` for 0.
    pub fn from_len(len: u32) -> Option<Geometry> {
        if len == 0 {
            return None;
        }
        let mut n = len;
        let mut largest = 1;
        let mut p = 2u32;
        while u64::from(p) * u64::from(p) <= u64::from(n) {
            while n.is_multiple_of(p) {
                largest = p;
                n /= p;
            }
            p += if p == 2 { 1 } else { 2 };
        }
        if n > 1 {
            largest = largest.max(n);
        }
        Some(Geometry {
            m: largest,
            tables: len / largest,
        })
    }

    /// Entries of the whole array.
    pub fn len(&self) -> u64 {
        u64::from(self.m) * u64::from(self.tables)
    }

    /// Whether the array holds no table.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The array index of entry `entry` of table `table`.
    pub fn index(&self, table: u32, entry: u32) -> u32 {
        table * self.m + entry
    }
}

/// Whether `n` is a prime (trial division; `n` is at most a few hundred thousand in practice).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n < 4 {
        return true;
    }
    if n.is_multiple_of(2) {
        return false;
    }
    let mut d = 3u32;
    while u64::from(d) * u64::from(d) <= u64::from(n) {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// The name a backend is hashed by: `"addr:port"` (the same on every node, unlike its id).
pub fn backend_name(b: &BackendAddr) -> String {
    format!("{}:{}", b.addr, b.port)
}

/// SipHash-2-4 keys of the two hashes of a backend name (fixed: every node must agree).
const OFFSET_KEY: (u64, u64) = (0x786c_622d_6d61_676c, 0x6576_2d6f_6666_7365);
const SKIP_KEY: (u64, u64) = (0x786c_622d_6d61_676c, 0x6576_2d73_6b69_7073);

/// SipHash-2-4 (Aumasson and Bernstein) of `data` with the key `(k0, k1)` (the little-endian
/// halves of the 16-byte key).
pub fn siphash24(k0: u64, k1: u64, data: &[u8]) -> u64 {
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    }
    let compress = |v: &mut [u64; 4], m: u64| {
        v[3] ^= m;
        round(v);
        round(v);
        v[0] ^= m;
    };
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        compress(&mut v, u64::from_le_bytes(w));
    }
    let mut last = (data.len() as u64) << 56;
    for (i, b) in chunks.remainder().iter().enumerate() {
        last |= u64::from(*b) << (8 * i);
    }
    compress(&mut v, last);
    v[2] ^= 0xff;
    for _ in 0..4 {
        round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// A backend's preference list: `(offset, skip)`, both `< m`, `skip >= 1`.
fn permutation(name: &[u8], m: u32) -> (u32, u32) {
    let h1 = siphash24(OFFSET_KEY.0, OFFSET_KEY.1, name);
    let h2 = siphash24(SKIP_KEY.0, SKIP_KEY.1, name);
    let m64 = u64::from(m);
    let offset = (h1 % m64) as u32;
    let skip = if m > 1 {
        (h2 % (m64 - 1)) as u32 + 1
    } else {
        1
    };
    (offset, skip)
}

/// The Maglev population of a table of `m` entries (a prime) for backends named `names`, in
/// that order: entry -> index into `names`. Empty when there is no backend. With more
/// backends than entries, the last ones get none.
///
/// # Panics
/// When `m` is not a prime (a preference list would not visit every entry).
pub fn populate<N: AsRef<[u8]>>(names: &[N], m: u32) -> Vec<u32> {
    assert!(is_prime(m), "the Maglev table size {m} is not a prime");
    if names.is_empty() {
        return Vec::new();
    }
    const EMPTY: u32 = u32::MAX;
    let prefs: Vec<(u32, u32)> = names.iter().map(|n| permutation(n.as_ref(), m)).collect();
    // Each backend's next candidate entry: its list, walked with `skip`.
    let mut next: Vec<u32> = prefs.iter().map(|(offset, _)| *offset).collect();
    let mut entry = vec![EMPTY; m as usize];
    let mut filled = 0u32;
    loop {
        for (i, &(_, skip)) in prefs.iter().enumerate() {
            let mut c = next[i];
            while entry[c as usize] != EMPTY {
                c = add_mod(c, skip, m);
            }
            entry[c as usize] = i as u32;
            next[i] = add_mod(c, skip, m);
            filled += 1;
            if filled == m {
                return entry;
            }
        }
    }
}

/// `(a + b) % m` for `a, b < m` without overflow.
fn add_mod(a: u32, b: u32, m: u32) -> u32 {
    ((u64::from(a) + u64::from(b)) % u64::from(m)) as u32
}

/// The table of one frontend: `m` backend ids, for the backends `backends` (address and id),
/// populated in address order (so the order given does not matter, and every node agrees).
/// Empty without backends.
pub fn table(backends: &[(BackendAddr, u32)], m: u32) -> Vec<u32> {
    let mut sorted: Vec<&(BackendAddr, u32)> = backends.iter().collect();
    sorted.sort_by_key(|(b, _)| *b);
    let names: Vec<String> = sorted.iter().map(|(b, _)| backend_name(b)).collect();
    populate(&names, m)
        .into_iter()
        .map(|i| sorted[i as usize].1)
        .collect()
}

/// The hash the datapath picks a client's entry with (`lb_common::maglev_flow_hash`: jhash of
/// the client's address, port (host order) and IP protocol), shared with the datapath.
pub fn flow_hash(client: Ipv4Addr, port: u16, proto: u8) -> u32 {
    lb_common::maglev_flow_hash(u32::from(client), port, proto)
}

/// The entry of a table a client uses: `flow_hash % m`.
pub fn flow_entry(client: Ipv4Addr, port: u16, proto: u8, m: u32) -> u32 {
    flow_hash(client, port, proto) % m
}

pub use lb_common::jhash_3words;

/// Whether a master with `flags` and `count` names a Maglev table (in its `backend_id` field):
/// Maglev selection and at least one backend. A master without backends refuses before any
/// selection, so it needs no table.
pub fn names_table(flags: u32, count: u32) -> bool {
    flags & lb_common::SVC_FLAG_ALG_MAGLEV != 0 && count > 0
}

/// The entries of one table (backend ids), shared by the ops and writes that carry it. Its
/// `Debug` prints a summary, not 16381 numbers.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Entries(std::sync::Arc<[u32]>);

impl Entries {
    pub fn as_slice(&self) -> &[u32] {
        &self.0
    }
}

impl From<Vec<u32>> for Entries {
    fn from(v: Vec<u32>) -> Self {
        Entries(v.into())
    }
}

impl From<&[u32]> for Entries {
    fn from(v: &[u32]) -> Self {
        Entries(v.into())
    }
}

impl std::ops::Deref for Entries {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        &self.0
    }
}

impl fmt::Debug for Entries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<u32> = self.0.to_vec();
        ids.sort_unstable();
        ids.dedup();
        write!(f, "<{} entries of backends {ids:?}>", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Proto;
    use std::collections::BTreeMap;

    fn backends(n: usize) -> Vec<(BackendAddr, u32)> {
        (0..n)
            .map(|i| {
                let b = BackendAddr {
                    addr: Ipv4Addr::new(10, 244, (i / 250) as u8, (i % 250) as u8 + 1),
                    port: 8080,
                    proto: Proto::Tcp,
                };
                (b, i as u32 + 1)
            })
            .collect()
    }

    fn shares(t: &[u32]) -> BTreeMap<u32, usize> {
        let mut s = BTreeMap::new();
        for id in t {
            *s.entry(*id).or_default() += 1;
        }
        s
    }

    #[test]
    fn siphash_matches_the_reference_vectors() {
        // The SipHash paper's key 00 01 .. 0f.
        let (k0, k1) = (0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908);
        assert_eq!(siphash24(k0, k1, &[]), 0x726f_db47_dd0e_0e31);
        let msg: Vec<u8> = (0..15).collect();
        assert_eq!(siphash24(k0, k1, &msg), 0xa129_ca61_49be_45e5);
        let msg: Vec<u8> = (0..8).collect();
        assert_eq!(siphash24(k0, k1, &msg), 0x93f5_f579_9a93_2462);
    }

    #[test]
    fn primes_and_geometry() {
        let primes: Vec<u32> = (0..30).filter(|n| is_prime(*n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(16_381) && is_prime(65_537) && is_prime(251));
        assert!(!is_prime(16_383) && !is_prime(65_535) && !is_prime(1));
        assert!(Geometry::check(16_381, 128).is_ok());
        assert!(Geometry::check(16_383, 128)
            .unwrap_err()
            .contains("not a prime"));
        assert!(Geometry::check(13, 13).is_err());
        assert!(Geometry::check(13, 0).is_err());
        assert!(Geometry::check(65_537, 65_536)
            .unwrap_err()
            .contains("do not fit"));
        for (m, t) in [
            (16_381, 128),
            (65_537, 1),
            (65_537, 300),
            (13, 12),
            (251, 250),
            (2, 1),
        ] {
            let g = Geometry::check(m, t).unwrap();
            assert_eq!(Geometry::from_len(m * t), Some(g), "{m} x {t}");
        }
        assert_eq!(Geometry::from_len(0), None);
        assert_eq!(Geometry::default().m, 16_381);
    }

    #[test]
    fn population_is_a_permutation_walk() {
        // Every entry is owned, by a backend that listed it; and one backend owns everything.
        let t = populate(&["a"], 13);
        assert_eq!(t, vec![0; 13]);
        assert!(populate::<&str>(&[], 13).is_empty());
        let t = populate(
            &[
                "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n",
            ],
            13,
        );
        assert_eq!(t.len(), 13);
        let owners: std::collections::BTreeSet<u32> = t.iter().copied().collect();
        assert_eq!(owners.len(), 13, "13 of 14 backends get one entry each");
        assert!(!owners.contains(&13), "the last one gets none");
    }

    /// The spread is uniform: Maglev gives each backend floor(M/N) or ceil(M/N) entries.
    #[test]
    fn spread_is_uniform() {
        println!("Maglev spread (entries per backend):");
        for m in [16_381u32, 65_537] {
            for n in [3usize, 10, 100, 1000] {
                let t = table(&backends(n), m);
                let s = shares(&t);
                let (min, max) = (*s.values().min().unwrap(), *s.values().max().unwrap());
                println!(
                    "  M={m:>5} N={n:>4}: min {min} max {max} (ideal {:.1}); largest/smallest = {:.4}",
                    f64::from(m) / n as f64,
                    max as f64 / min as f64
                );
                assert_eq!(s.len(), n, "every backend has entries");
                assert!(max - min <= 1, "M={m} N={n}: {min}..{max}");
                if n <= 100 {
                    assert!(max as f64 / min as f64 <= 1.03, "within a few percent");
                }
            }
        }
    }

    /// The most a change of one backend may move, as a multiple of the ideal 1/N (or
    /// 1/(N+1)): Maglev moves the entries of that backend plus a few others, fewer the larger
    /// M is against N (the paper asks for M >> N; 65537 for Services with hundreds of
    /// backends). Measured (see the printed figures) with some margin.
    fn disruption_bound(m: u32, n: usize) -> f64 {
        match (m, n) {
            (_, 0..=3) => 1.05,
            (_, 4..=10) => 1.12,
            (16_381, 11..=30) => 1.4,
            (_, 11..=30) => 1.2,
            (16_381, _) => 2.8,
            (_, _) => 1.8,
        }
    }

    /// Removing 1 of N backends moves close to 1/N of the entries: those of the removed
    /// backend, plus few others.
    #[test]
    fn removing_one_backend_moves_about_one_nth() {
        println!("Maglev disruption when 1 of N backends is removed (fraction of entries moved):");
        for m in [16_381u32, 65_537] {
            for n in [3usize, 10, 30, 100] {
                let all = backends(n);
                let before = table(&all, m);
                let mut worst = 0.0f64;
                let mut sum = 0.0;
                // Remove each of a few backends in turn (all of them for small N).
                let victims: Vec<usize> = (0..n).step_by((n / 10).max(1)).collect();
                for &v in &victims {
                    let rest: Vec<_> = all
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| *i != v)
                        .map(|(_, b)| *b)
                        .collect();
                    let after = table(&rest, m);
                    let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
                    let own = before.iter().filter(|id| **id == all[v].1).count();
                    // Every entry of the removed backend moves; others should mostly stay.
                    assert!(moved >= own);
                    let f = moved as f64 / f64::from(m);
                    worst = worst.max(f);
                    sum += f;
                }
                let ideal = 1.0 / n as f64;
                println!(
                    "  M={m:>5} N={n:>3}: moved {:.4} on average, {worst:.4} at worst; 1/N = {ideal:.4} (worst / ideal = {:.2})",
                    sum / victims.len() as f64,
                    worst / ideal
                );
                assert!(
                    worst <= ideal * disruption_bound(m, n),
                    "M={m} N={n}: moved {worst} of the table"
                );
            }
        }
    }

    /// Adding a backend takes about 1/(N+1) of the entries.
    #[test]
    fn adding_one_backend_moves_about_one_over_n_plus_one() {
        println!("Maglev disruption when a backend is added to N:");
        for (m, n) in [
            (16_381u32, 3usize),
            (16_381, 10),
            (16_381, 100),
            (65_537, 100),
        ] {
            let all = backends(n + 1);
            let before = table(&all[..n], m);
            let after = table(&all, m);
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
            let f = moved as f64 / f64::from(m);
            println!(
                "  M={m} N={n} -> {}: moved {f:.4}; 1/(N+1) = {:.4}",
                n + 1,
                1.0 / (n + 1) as f64
            );
            assert!(
                f <= disruption_bound(m, n) / (n + 1) as f64,
                "M={m} N={n}: {f}"
            );
        }
    }

    /// Two independent builds are identical, whatever order or ids the backends come in: the
    /// same names give the same owners.
    #[test]
    fn builds_are_deterministic() {
        for m in [16_381u32, 65_537] {
            let a = table(&backends(10), m);
            let b = table(&backends(10), m);
            assert_eq!(a, b);
            let mut shuffled = backends(10);
            shuffled.reverse();
            assert_eq!(table(&shuffled, m), a, "order does not matter");
            // Other ids (another node's agent): the same backend at every entry.
            let renumbered: Vec<_> = backends(10)
                .into_iter()
                .map(|(b, id)| (b, id + 100))
                .collect();
            let c = table(&renumbered, m);
            assert!(a.iter().zip(&c).all(|(x, y)| x + 100 == *y));
        }
        println!("Two independent builds (M=16381 and 65537, N=10) are identical");
        // Pinned values: a change of the hash or the population changes every node's choice at
        // once, which must be deliberate (mixed agent versions would disagree).
        let t = table(&backends(3), 13);
        println!("M=13, backends 10.244.0.1-3:8080 (ids 1-3): {t:?}");
        assert_eq!(t, PINNED_13, "the population changed");
    }

    /// The table of [`backends`]`(3)` at M = 13.
    const PINNED_13: [u32; 13] = [1, 1, 1, 2, 1, 2, 1, 3, 2, 2, 3, 3, 3];

    #[test]
    fn flow_hash_spreads_client_ports() {
        let m = 16_381;
        let client = Ipv4Addr::new(172, 31, 0, 200);
        let t = table(&backends(3), m);
        let mut hits = BTreeMap::new();
        for port in 40_000..46_000u16 {
            *hits
                .entry(t[flow_entry(client, port, 6, m) as usize])
                .or_insert(0usize) += 1;
        }
        println!("6000 client ports over 3 backends: {hits:?}");
        assert_eq!(hits.len(), 3);
        assert!(hits.values().all(|n| (1700..=2300).contains(n)), "{hits:?}");
        // jhash_3words is the kernel's (values from include/linux/jhash.h compiled as C).
        assert_eq!(jhash_3words(0, 0, 0, 0), 459_859_287);
        assert_eq!(jhash_3words(1, 2, 3, 4), 2_164_462_655);
        assert_eq!(flow_hash(client, 40_000, 6), 3_294_967_545);
        assert_ne!(flow_hash(client, 1, 6), flow_hash(client, 1, 17));
    }

    #[test]
    fn names_table_needs_maglev_and_backends() {
        use lb_common::{SVC_FLAG_ALG_MAGLEV, SVC_FLAG_ALG_RR};
        assert!(names_table(SVC_FLAG_ALG_MAGLEV, 1));
        assert!(!names_table(SVC_FLAG_ALG_MAGLEV, 0));
        assert!(!names_table(SVC_FLAG_ALG_RR, 3));
        assert!(!names_table(0, 3));
    }
}
