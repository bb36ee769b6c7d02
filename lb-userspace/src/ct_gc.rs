//! Conntrack garbage collection: the agent sweeps expired entries out of `CONNTRACK`, and stale
//! entries out of `AFFINITY`, with batched map operations ([`crate::bpf_batch`]).
//!
//! The datapath already treats an expired entry as a miss, so the sweep is not needed for
//! correctness; it keeps the LRU map from filling with dead flows, which would make the kernel
//! evict *live* flows' entries. Both entries of a flow carry the same expiry, so a flow's forward
//! and reply entries go in the same sweep.
//!
//! The pure parts (what is expired, counts by state, the next interval) are separate from the I/O
//! ([`CtGc`]) and unit-tested. The interval adapts like Cilium's (`pkg/maps/ctmap/gc`): it
//! shortens when a sweep deleted a large share of the map's capacity or the map is filling up,
//! and grows by 1.5x when a sweep deleted little, within `[min, max]` (default 1 s .. 30 s). With
//! the defaults, entries of flows closed by RST (10 s) are gone at most 10 + 30 s after the last
//! packet, with no new traffic.
//!
//! A sweep of a large map is cut into slices ([`GcConfig::slice`], 2 ms by default): the agent
//! loop calls [`CtGc::step`] and handles source events between slices, so a million-entry sweep
//! never holds an endpoint update back for more than one slice. Measured on a 2-core VM: a sweep
//! of 1M entries (half expired) takes about 0.45 s of work in ~200 slices of at most 2.5 ms; the
//! per-entry fallback takes 2.9 s.
//!
//! Race (the same as Cilium's): an entry read as expired and re-created by the datapath in the
//! microseconds before the delete is deleted too. The flow then takes the miss path once more.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use lb_common::{ct_state, map_names, AffinityKey, AffinityValue, CtKey, CtValue, SVC_FLAG_AFFINITY};
use lb_model::Applied;

use crate::bpf_batch::{BatchMap, Scan};
use crate::datapath::PinLayout;

const NS_PER_SEC: u64 = 1_000_000_000;

/// CLOCK_MONOTONIC_COARSE in ns: the clock of `bpf_ktime_get_coarse_ns()`, which the datapath
/// writes into `CtValue::expires_ns` and `AffinityValue::last_used_ns`.
pub fn now_coarse_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * NS_PER_SEC + ts.tv_nsec as u64
}

/// Seconds an entry has left at `now` (negative once expired).
pub fn time_left_s(v: &CtValue, now_ns: u64) -> f64 {
    (v.expires_ns as i128 - now_ns as i128) as f64 / NS_PER_SEC as f64
}

/// An entry whose expiry has come is dead: the datapath treats it as a miss.
pub const fn ct_expired(v: &CtValue, now_ns: u64) -> bool {
    v.expires_ns <= now_ns
}

/// Sweep settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GcConfig {
    /// Shortest time between the end of a sweep and the start of the next.
    pub min_interval: Duration,
    /// Longest time between sweeps; bounds how long a dead entry stays after it expired.
    pub max_interval: Duration,
    /// Longest one [`CtGc::step`] works before handing control back to the agent loop.
    pub slice: Duration,
    /// Entries per batched lookup (about 1 ms of work for 1024 entries, with their deletes).
    pub chunk: u32,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            min_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(30),
            slice: Duration::from_millis(2),
            chunk: 1024,
        }
    }
}

/// Entries counted by conntrack state (`lb_common::ct_state`), index 0 for unknown states.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateCounts([u64; 8]);

impl StateCounts {
    fn slot(state: u8) -> usize {
        if ct_state::ALL.contains(&state) {
            state as usize
        } else {
            0
        }
    }
    pub fn add(&mut self, state: u8) {
        self.0[Self::slot(state)] += 1;
    }
    pub fn get(&self, state: u8) -> u64 {
        self.0[Self::slot(state)]
    }
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
    /// (state name, count) for every known state and "unknown", zeros included (for gauges).
    pub fn named(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        ct_state::ALL.iter().map(|s| (ct_state::name(*s), self.get(*s))).chain([("unknown", self.0[0])])
    }
}

/// Sort one chunk: expired keys go to `expired`, live entries are counted by state.
pub fn classify_ct(keys: &[CtKey], values: &[CtValue], now_ns: u64, live: &mut StateCounts, expired: &mut Vec<CtKey>) {
    for (k, v) in keys.iter().zip(values) {
        if ct_expired(v, now_ns) {
            expired.push(*k);
        } else {
            live.add(v.state);
        }
    }
}

/// The affinity timeout (seconds) of the frontend owning `rev_nat_id`, if it still exists and
/// has sessionAffinity ClientIP.
pub fn affinity_timeout(applied: &Applied, rev_nat_id: u32) -> Option<u32> {
    let fe = applied.rev_nat.get(&rev_nat_id)?;
    let af = applied.frontends.get(fe)?;
    (af.rev_nat_id == rev_nat_id && af.flags & SVC_FLAG_AFFINITY != 0).then_some(af.affinity_timeout)
}

/// Whether an affinity entry is dead: its frontend is gone (or no longer has affinity,
/// `timeout_s` None), or it was last used longer than the timeout ago (the datapath's rule).
pub fn affinity_expired(v: &AffinityValue, timeout_s: Option<u32>, now_ns: u64) -> bool {
    match timeout_s {
        None => true,
        Some(t) => now_ns.saturating_sub(v.last_used_ns) > u64::from(t) * NS_PER_SEC,
    }
}

/// The next sweep interval after a sweep that deleted `deleted` entries and left `live` in a map
/// of `max_entries`, following Cilium's `ctmap/gc`:
/// - the map is at least 90% full: `min` (the LRU would soon evict live flows);
/// - more than 25% of the capacity was deleted: shorter by that share (up to 10x);
/// - the map is at least half full: halved;
/// - less than 5% of the capacity was deleted: 1.5x longer;
/// - otherwise unchanged;
///
/// always within `[min, max]`.
pub fn next_interval(
    prev: Duration,
    deleted: u64,
    live: u64,
    max_entries: u32,
    min: Duration,
    max: Duration,
) -> Duration {
    let cap = f64::from(max_entries.max(1));
    let fill = live as f64 / cap;
    let deleted_share = deleted as f64 / cap;
    let prev_s = prev.as_secs_f64();
    let next_s = if fill >= 0.9 {
        min.as_secs_f64()
    } else if deleted_share > 0.25 {
        prev_s * (1.0 - deleted_share.min(0.9))
    } else if fill >= 0.5 {
        prev_s / 2.0
    } else if deleted_share < 0.05 {
        prev_s * 1.5
    } else {
        prev_s
    };
    let next = Duration::from_millis((next_s * 1000.0).round() as u64);
    next.clamp(min, max.max(min))
}

/// What one complete sweep did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SweepReport {
    /// Conntrack entries read.
    pub scanned: u64,
    /// Conntrack entries deleted (expired).
    pub deleted: u64,
    /// Live conntrack entries by state.
    pub live: StateCounts,
    /// The original destinations (network order) of the live forward entries: the addresses
    /// the frontend pre-filter must keep (`lb_model::fefilter`).
    pub destinations: std::collections::BTreeSet<u32>,
    /// The backend ports (host order) of the live entries: the source ports of the reply
    /// entries, and of those the forward entries would re-create (`recreate_pair` after an LRU
    /// eviction): the ports the reply pre-filter must keep (`lb_model::fefilter`). A bitmap
    /// (bit = port, empty until the first one): one store per entry, in every slice of a large
    /// table.
    pub reply_ports: Vec<u64>,
    pub affinity_scanned: u64,
    pub affinity_deleted: u64,
    pub max_entries: u32,
    /// Live entries / capacity.
    pub fill_ratio: f64,
    /// Time spent sweeping (the sum of the slices).
    pub busy: Duration,
    /// From the first slice to the end of the last.
    pub wall: Duration,
    pub slices: u32,
    /// The longest slice: how long the sweep held the agent loop at most.
    pub max_slice: Duration,
    /// Batched map operations (false: per-entry fallback).
    pub batched: bool,
    /// When the next sweep starts, after this one ended.
    pub next_interval: Duration,
}

impl SweepReport {
    /// The ports of [`SweepReport::reply_ports`], ascending.
    pub fn live_backend_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.reply_ports.iter().enumerate().flat_map(|(w, bits)| {
            (0..64u16).filter(move |b| bits & (1 << b) != 0).map(move |b| w as u16 * 64 + b)
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Conntrack,
    Affinity,
}

/// A sweep in progress.
struct Run {
    phase: Phase,
    ct: Scan<CtKey, CtValue>,
    aff: Scan<AffinityKey, AffinityValue>,
    started: Instant,
    report: SweepReport,
    ct_doomed: Vec<CtKey>,
    aff_doomed: Vec<AffinityKey>,
}

/// Looks up the affinity timeout (seconds) of the frontend owning a rev-NAT id (None: no such
/// frontend with affinity). The agent passes `|id| affinity_timeout(&applied, id)`.
pub type AffinityLookup<'a> = &'a dyn Fn(u32) -> Option<u32>;

/// The sweeper: owns its own handles on the pinned maps.
pub struct CtGc {
    cfg: GcConfig,
    ct: BatchMap<CtKey, CtValue>,
    aff: Option<BatchMap<AffinityKey, AffinityValue>>,
    max_entries: u32,
    interval: Duration,
    next_at: Instant,
    run: Option<Run>,
}

impl CtGc {
    /// The first sweep starts `min_interval` after this, and the interval starts at `max_interval`.
    pub fn new(
        ct: BatchMap<CtKey, CtValue>,
        aff: Option<BatchMap<AffinityKey, AffinityValue>>,
        cfg: GcConfig,
    ) -> io::Result<Self> {
        let max_entries = ct.max_entries()?;
        Ok(CtGc {
            interval: cfg.max_interval.max(cfg.min_interval),
            next_at: Instant::now() + cfg.min_interval,
            cfg,
            ct,
            aff,
            max_entries,
            run: None,
        })
    }

    /// Open the conntrack and affinity maps pinned under `pin_path`.
    pub fn open(pin_path: &Path, cfg: GcConfig) -> io::Result<Self> {
        let pins = PinLayout::new(pin_path);
        let ct = BatchMap::from_pin(&pins.map(map_names::CONNTRACK))?;
        let aff = BatchMap::from_pin(&pins.map(map_names::AFFINITY))?;
        Self::new(ct, Some(aff), cfg)
    }

    /// The current interval between sweeps.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// When [`CtGc::step`] has work: now while a sweep is in progress, else the next sweep's start.
    pub fn deadline(&self) -> Instant {
        if self.run.is_some() {
            Instant::now()
        } else {
            self.next_at
        }
    }

    /// Whether a sweep is in progress.
    pub fn sweeping(&self) -> bool {
        self.run.is_some()
    }

    /// Use per-entry map operations (as on a kernel without batch ops).
    pub fn force_per_entry(&mut self) {
        self.ct.force_per_entry();
        if let Some(a) = &mut self.aff {
            a.force_per_entry();
        }
    }

    /// Work on the sweep for at most one slice (starting one if it is due). Returns the report
    /// when a sweep completes. On an error the sweep is abandoned and retried after the interval.
    pub fn step(&mut self, affinity: AffinityLookup<'_>) -> Option<io::Result<SweepReport>> {
        if self.run.is_none() && Instant::now() < self.next_at {
            return None;
        }
        self.work(Some(self.cfg.slice), affinity)
    }

    /// Run a complete sweep now (finishing one in progress), without slicing.
    pub fn sweep(&mut self, affinity: AffinityLookup<'_>) -> io::Result<SweepReport> {
        loop {
            if let Some(r) = self.work(None, affinity) {
                return r;
            }
        }
    }

    fn work(&mut self, budget: Option<Duration>, affinity: AffinityLookup<'_>) -> Option<io::Result<SweepReport>> {
        let slice_start = Instant::now();
        let mut run = self.run.take().unwrap_or_else(|| Run {
            phase: Phase::Conntrack,
            ct: Scan::new(self.cfg.chunk),
            aff: Scan::new(self.cfg.chunk),
            started: slice_start,
            report: SweepReport { max_entries: self.max_entries, batched: self.ct.batched(), ..Default::default() },
            ct_doomed: Vec::new(),
            aff_doomed: Vec::new(),
        });
        let outcome = loop {
            match self.chunk(&mut run, affinity) {
                Ok(true) => {}
                Ok(false) => break Ok(true),
                Err(e) => break Err(e),
            }
            if budget.is_some_and(|b| slice_start.elapsed() >= b) {
                break Ok(false);
            }
        };
        let took = slice_start.elapsed();
        run.report.busy += took;
        run.report.slices += 1;
        run.report.max_slice = run.report.max_slice.max(took);
        match outcome {
            Ok(false) => {
                self.run = Some(run);
                None
            }
            Ok(true) => Some(Ok(self.finish(run))),
            Err(e) => {
                self.next_at = Instant::now() + self.interval;
                Some(Err(e))
            }
        }
    }

    /// One chunk of the current phase. Ok(false): the sweep is complete.
    fn chunk(&mut self, run: &mut Run, affinity: AffinityLookup<'_>) -> io::Result<bool> {
        match run.phase {
            Phase::Conntrack => {
                if !self.ct.next_chunk(&mut run.ct)? {
                    run.phase = Phase::Affinity;
                    return Ok(true);
                }
                let now = now_coarse_ns();
                run.ct_doomed.clear();
                run.report.scanned += run.ct.keys().len() as u64;
                classify_ct(run.ct.keys(), run.ct.values(), now, &mut run.report.live, &mut run.ct_doomed);
                for (k, v) in run.ct.keys().iter().zip(run.ct.values()) {
                    if ct_expired(v, now) {
                        continue;
                    }
                    // The reply entry's source port is the backend's: its own key's, or for a
                    // forward entry the one its lost pair would be re-created with.
                    let reply_port = if k.dir == lb_common::CT_FORWARD {
                        run.report.destinations.insert(k.daddr);
                        v.nat_port
                    } else {
                        k.sport
                    };
                    let port = usize::from(u16::from_be(reply_port));
                    let ports = &mut run.report.reply_ports;
                    if ports.is_empty() {
                        ports.resize(lb_common::PORTFILTER_WORDS as usize, 0);
                    }
                    ports[port / 64] |= 1 << (port % 64);
                }
                if !run.ct_doomed.is_empty() {
                    run.report.deleted += self.ct.delete(&run.ct_doomed)? as u64;
                }
                Ok(true)
            }
            Phase::Affinity => {
                let Some(aff) = &mut self.aff else { return Ok(false) };
                if !aff.next_chunk(&mut run.aff)? {
                    return Ok(false);
                }
                let now = now_coarse_ns();
                run.aff_doomed.clear();
                run.report.affinity_scanned += run.aff.keys().len() as u64;
                for (k, v) in run.aff.keys().iter().zip(run.aff.values()) {
                    if affinity_expired(v, affinity(k.rev_nat_id), now) {
                        run.aff_doomed.push(*k);
                    }
                }
                if !run.aff_doomed.is_empty() {
                    run.report.affinity_deleted += aff.delete(&run.aff_doomed)? as u64;
                }
                Ok(true)
            }
        }
    }

    fn finish(&mut self, run: Run) -> SweepReport {
        let mut r = run.report;
        let live = r.live.total();
        r.wall = run.started.elapsed();
        r.batched = r.batched && self.ct.batched();
        r.fill_ratio = live as f64 / f64::from(self.max_entries.max(1));
        self.interval = next_interval(
            self.interval,
            r.deleted,
            live,
            self.max_entries,
            self.cfg.min_interval,
            self.cfg.max_interval,
        );
        r.next_interval = self.interval;
        self.next_at = Instant::now() + self.interval;
        tracing::debug!(
            scanned = r.scanned,
            deleted = r.deleted,
            live,
            affinity_deleted = r.affinity_deleted,
            busy_us = r.busy.as_micros() as u64,
            slices = r.slices,
            max_slice_us = r.max_slice.as_micros() as u64,
            next_s = r.next_interval.as_secs_f64(),
            "conntrack sweep"
        );
        if r.deleted > 0 || r.affinity_deleted > 0 {
            tracing::info!(
                deleted = r.deleted,
                live,
                fill = format!("{:.3}", r.fill_ratio),
                affinity_deleted = r.affinity_deleted,
                busy_ms = format!("{:.1}", r.busy.as_secs_f64() * 1e3),
                next_s = r.next_interval.as_secs_f64(),
                "conntrack sweep removed expired entries"
            );
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{ct_state::*, CtKey, CT_FORWARD};
    use lb_model::{AppliedFrontend, Frontend, Proto};

    use super::*;

    const S: Duration = Duration::from_secs(1);
    const MIN: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(30);

    fn entry(i: u32, state: u8, expires_ns: u64) -> (CtKey, CtValue) {
        let k = CtKey { saddr: i, daddr: 1, sport: 2, dport: 3, proto: 6, dir: CT_FORWARD, _pad: 0 };
        (k, CtValue { state, expires_ns, ..Default::default() })
    }

    #[test]
    fn expiry_is_inclusive_and_time_left_signed() {
        let v = CtValue { expires_ns: 10 * NS_PER_SEC, ..Default::default() };
        assert!(!ct_expired(&v, 10 * NS_PER_SEC - 1));
        assert!(ct_expired(&v, 10 * NS_PER_SEC));
        assert_eq!(time_left_s(&v, 7 * NS_PER_SEC), 3.0);
        assert_eq!(time_left_s(&v, 12 * NS_PER_SEC), -2.0);
    }

    #[test]
    fn classify_splits_expired_from_live_by_state() {
        let now = 100 * NS_PER_SEC;
        let entries = [
            entry(1, TCP_ESTABLISHED, now + 1),
            entry(2, TCP_CLOSED, now),
            entry(3, TCP_CLOSED, now + 5),
            entry(4, UDP_REPLIED, now - 1),
            entry(5, 99, now + 1),
            entry(6, TCP_ESTABLISHED, now + 2),
        ];
        let (keys, values): (Vec<_>, Vec<_>) = entries.iter().copied().unzip();
        let mut live = StateCounts::default();
        let mut expired = Vec::new();
        classify_ct(&keys, &values, now, &mut live, &mut expired);
        assert_eq!(expired.iter().map(|k| k.saddr).collect::<Vec<_>>(), [2, 4]);
        assert_eq!(live.get(TCP_ESTABLISHED), 2);
        assert_eq!(live.get(TCP_CLOSED), 1);
        assert_eq!(live.get(UDP_REPLIED), 0);
        assert_eq!(live.get(99), 1);
        assert_eq!(live.total(), 4);
        let named: Vec<_> = live.named().collect();
        assert_eq!(named.len(), 8);
        assert!(named.contains(&("established", 2)));
        assert!(named.contains(&("unknown", 1)));
        assert!(named.contains(&("syn_sent", 0)));
    }

    #[test]
    fn interval_shrinks_on_big_deletes_and_fill_grows_when_idle() {
        let cap = 100_000;
        // Little deleted, map mostly empty: 1.5x, capped at max.
        assert_eq!(next_interval(10 * S, 100, 1_000, cap, MIN, MAX), 15 * S);
        assert_eq!(next_interval(25 * S, 0, 0, cap, MIN, MAX), MAX);
        // Between 5% and 25% deleted: unchanged.
        assert_eq!(next_interval(10 * S, 10_000, 1_000, cap, MIN, MAX), 10 * S);
        // More than 25% of the capacity deleted: shorter by that share, up to 10x.
        assert_eq!(next_interval(10 * S, 50_000, 1_000, cap, MIN, MAX), 5 * S);
        assert_eq!(next_interval(30 * S, 95_000, 1_000, cap, MIN, MAX), 3 * S);
        assert_eq!(next_interval(2 * S, 95_000, 1_000, cap, MIN, MAX), MIN);
        // Half full: halved; 90% full: straight to min.
        assert_eq!(next_interval(20 * S, 0, 60_000, cap, MIN, MAX), 10 * S);
        assert_eq!(next_interval(30 * S, 0, 90_000, cap, MIN, MAX), MIN);
        // Bounds hold whatever comes in, and min wins over a max below it.
        assert_eq!(next_interval(Duration::ZERO, 0, 0, cap, MIN, MAX), MIN);
        assert_eq!(next_interval(10 * S, 0, 0, 0, MIN, MAX), 15 * S, "capacity 0 divides by nothing");
        assert_eq!(next_interval(10 * S, 0, 0, cap, 5 * S, 2 * S), 5 * S);
    }

    /// The bound: with the defaults, entries of a burst of connections closed by RST
    /// (10 s) are gone within a minute with no new traffic, whatever state the sweeper was in.
    #[test]
    fn rst_burst_is_gone_within_a_minute_with_defaults() {
        let cfg = GcConfig::default();
        let close = lb_common::CtTimeouts::DEFAULT.tcp_close as u64;
        let cap = lb_common::DEFAULT_CONNTRACK_MAX;
        for burst in [10u64, 30_000, 200_000] {
            for start_interval in [cfg.min_interval, 7 * S, cfg.max_interval] {
                for phase_ms in [0u64, 1, 9_999, 29_999] {
                    // A sweep ended `phase_ms` after the last packet of the burst (t = 0).
                    let expires = close * 1000;
                    let mut t = phase_ms;
                    let mut interval = start_interval;
                    let mut left = burst;
                    while left > 0 {
                        t += interval.as_millis() as u64;
                        let deleted = if t >= expires { std::mem::take(&mut left) } else { 0 };
                        interval = next_interval(interval, deleted, left, cap, cfg.min_interval, cfg.max_interval);
                    }
                    assert!(t <= 60_000, "burst {burst}, start {start_interval:?}, phase {phase_ms}: gone at {t} ms");
                }
            }
        }
    }

    #[test]
    fn affinity_entries_die_with_their_frontend_or_timeout() {
        let now = 1_000 * NS_PER_SEC;
        let v = AffinityValue { backend_id: 1, _pad: 0, last_used_ns: now - 100 * NS_PER_SEC };
        assert!(affinity_expired(&v, None, now));
        assert!(affinity_expired(&v, Some(99), now));
        assert!(!affinity_expired(&v, Some(100), now));
        assert!(!affinity_expired(&v, Some(10_800), now));
        // A clock that went "back" (entry from the future) is not expired.
        let future = AffinityValue { last_used_ns: now + NS_PER_SEC, ..v };
        assert!(!affinity_expired(&future, Some(0), now));

        let mut applied = Applied::default();
        let fe = |port| Frontend { addr: "10.96.0.1".parse().unwrap(), port, proto: Proto::Tcp, scope: 0 };
        applied.frontends.insert(
            fe(80),
            AppliedFrontend { rev_nat_id: 7, flags: SVC_FLAG_AFFINITY, affinity_timeout: 300, ..Default::default() },
        );
        applied.frontends.insert(fe(81), AppliedFrontend { rev_nat_id: 8, flags: 0, ..Default::default() });
        applied.rev_nat.insert(7, fe(80));
        applied.rev_nat.insert(8, fe(81));
        assert_eq!(affinity_timeout(&applied, 7), Some(300));
        assert_eq!(affinity_timeout(&applied, 8), None, "no affinity any more");
        assert_eq!(affinity_timeout(&applied, 9), None, "no such frontend");
    }
}
