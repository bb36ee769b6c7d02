//! The conntrack sweeper against the real eBPF object's pinned maps (root, bpffs at /sys/fs/bpf).
//!
//! What it proves: a sweep removes exactly the expired conntrack entries (both entries of each
//! dead flow, hairpin flows included) and the stale affinity entries, leaves every live entry
//! untouched, counts the live ones by state, and the interval reacts to what the sweep found;
//! the per-entry fallback and the sliced sweep the agent runs do the same.
//!
//! Run: `cargo test -p lb-userspace --test ct_gc -- --include-ignored` (as root).

mod common;
use common::Pins;

use std::collections::BTreeMap;
use std::time::Duration;

use lb_common::{
    ct_state, ip4, port, AffinityKey, AffinityValue, CtKey, CtTimeouts, CtValue, CT_FORWARD, CT_F_HAIRPIN,
    HAIRPIN_ADDR, PROTO_TCP, PROTO_UDP, SVC_FLAG_AFFINITY,
};
use lb_model::{Applied, AppliedFrontend, Frontend, Proto};
use lb_userspace::ct_gc::{affinity_timeout, next_interval, now_coarse_ns, CtGc, GcConfig, SweepReport};
use lb_userspace::datapath::{Datapath, LoadOptions, MapSizes, PinnedMaps};

const SEC: u64 = 1_000_000_000;
const CT_MAX: u32 = 4096;

/// The real object loaded on fresh pins with a small conntrack map, and a sweeper on them.
/// Fields drop in order: the pins are removed last.
struct Bed {
    maps: PinnedMaps,
    gc: CtGc,
    applied: Applied,
    _dp: Datapath,
    _pins: Pins,
}

impl Bed {
    fn new(tag: &str, cfg: GcConfig) -> Self {
        let pins = Pins::new("ctgc", tag);
        let opts = LoadOptions {
            sizes: MapSizes { conntrack: CT_MAX, affinity: 256, ..MapSizes::default() },
            service_cidr: None,
            ct_timeouts: CtTimeouts { tcp_close: 5, ..CtTimeouts::DEFAULT },
            ..LoadOptions::default()
        };
        let dp =
            Datapath::open_with_options(&pins.0, &opts).expect("loading the datapath (needs root and the eBPF object)");
        let maps = PinnedMaps::open(&pins.0).expect("opening the pinned maps");
        let gc = CtGc::open(&pins.0, cfg).expect("opening the sweeper");
        Bed { maps, gc, applied: applied(), _dp: dp, _pins: pins }
    }

    fn sweep(&mut self) -> SweepReport {
        let applied = &self.applied;
        self.gc.sweep(&|id| affinity_timeout(applied, id)).expect("sweep")
    }
}

/// Both entries of flow `i` (a client-to-ClusterIP flow, or a hairpin one), as the datapath
/// writes them: the reply key is the forward key's `pair`.
fn flow(i: u32, state: u8, expires_ns: u64, hairpin: bool) -> [(CtKey, CtValue); 2] {
    let client = ip4([10, 244, 1, (i % 200) as u8 + 2]);
    let backend = if hairpin { client } else { ip4([10, 244, 2, 10]) };
    let proto = if state >= ct_state::UDP_UNREPLIED { PROTO_UDP } else { PROTO_TCP };
    let fwd = CtKey {
        saddr: client,
        daddr: ip4([10, 96, 0, 80]),
        sport: port(10_000 + i as u16),
        dport: port(80),
        proto,
        dir: CT_FORWARD,
        _pad: 0,
    };
    let value = |nat_addr, nat_port| CtValue {
        backend_id: 1,
        nat_addr,
        nat_port,
        state,
        flags: if hairpin { CT_F_HAIRPIN } else { 0 },
        rev_nat_id: 7,
        expires_ns,
        ..CtValue::default()
    };
    // A backend port of its own per flow, so the sweep's report of the live flows' backend
    // ports (the reply pre-filter's) can be checked exactly.
    let fv = value(backend, port(20_000 + i as u16));
    let rev = fwd.pair(&fv);
    if hairpin {
        assert_eq!(rev.daddr, ip4(HAIRPIN_ADDR));
    }
    [(fwd, fv), (rev, value(fwd.daddr, fwd.dport))]
}

struct Written {
    live: BTreeMap<CtKey, CtValue>,
    dead: Vec<CtKey>,
}

/// `live` live flows in various states, `dead` expired ones (one in ten hairpin), flow ids
/// starting at `first`.
fn write_flows(maps: &mut PinnedMaps, first: u32, live: u32, dead: u32) -> Written {
    let now = now_coarse_ns();
    let live_states = [
        (ct_state::TCP_ESTABLISHED, now + 3_600 * SEC),
        (ct_state::TCP_SYN_SENT, now + 60 * SEC),
        (ct_state::TCP_CLOSED, now + 30 * SEC),
        (ct_state::UDP_REPLIED, now + 120 * SEC),
    ];
    let dead_states = [
        (ct_state::TCP_CLOSED, now - SEC),
        (ct_state::TCP_FIN_WAIT, now - 100 * SEC),
        (ct_state::UDP_UNREPLIED, now - 2 * SEC),
        (ct_state::TCP_ESTABLISHED, now.saturating_sub(3_600 * SEC)),
    ];
    let mut w = Written { live: BTreeMap::new(), dead: Vec::new() };
    for n in 0..live + dead {
        let i = first + n;
        let is_live = n < live;
        let (state, exp) = if is_live { live_states[n as usize % 4] } else { dead_states[n as usize % 4] };
        for (k, v) in flow(i, state, exp, n % 10 == 3) {
            maps.conntrack.insert(k, v, 0).expect("writing a conntrack entry");
            if is_live {
                w.live.insert(k, v);
            } else {
                w.dead.push(k);
            }
        }
    }
    w
}

fn conntrack(maps: &PinnedMaps) -> BTreeMap<CtKey, CtValue> {
    maps.conntrack.iter().map(|r| r.expect("reading conntrack")).collect()
}

fn check_exact(maps: &PinnedMaps, live: &BTreeMap<CtKey, CtValue>, dead: &[CtKey]) {
    let now = conntrack(maps);
    for k in dead {
        assert!(!now.contains_key(k), "expired entry {k:?} survived the sweep");
    }
    assert_eq!(&now, live, "the live entries must stay exactly as written");
}

/// Frontends 7 (affinity, 100 s) and 8 (no affinity); rev-NAT 9 belongs to nobody.
fn applied() -> Applied {
    let mut a = Applied::default();
    let fe = |port| Frontend { addr: "10.96.0.80".parse().unwrap(), port, proto: Proto::Tcp, scope: 0 };
    a.frontends.insert(
        fe(80),
        AppliedFrontend { rev_nat_id: 7, flags: SVC_FLAG_AFFINITY, affinity_timeout: 100, ..Default::default() },
    );
    a.frontends.insert(fe(81), AppliedFrontend { rev_nat_id: 8, ..Default::default() });
    a.rev_nat.insert(7, fe(80));
    a.rev_nat.insert(8, fe(81));
    a
}

/// (kept, removed) affinity keys.
fn write_affinity(maps: &mut PinnedMaps) -> (Vec<AffinityKey>, Vec<AffinityKey>) {
    let now = now_coarse_ns();
    let key = |c: u8, rev_nat_id| AffinityKey { client: ip4([10, 244, 1, c]), rev_nat_id };
    let val = |ago: u64| AffinityValue { backend_id: 1, _pad: 0, last_used_ns: now - ago * SEC };
    let entries = [
        (key(1, 7), val(10), true),   // recent, frontend with affinity
        (key(2, 7), val(200), false), // older than the 100 s timeout
        (key(3, 8), val(1), false),   // frontend without affinity
        (key(4, 9), val(1), false),   // no such frontend
    ];
    let (mut kept, mut removed) = (Vec::new(), Vec::new());
    for (k, v, keep) in entries {
        maps.affinity.insert(k, v, 0).expect("writing an affinity entry");
        if keep {
            kept.push(k)
        } else {
            removed.push(k)
        }
    }
    (kept, removed)
}

fn live_by_state(live: &BTreeMap<CtKey, CtValue>, state: u8) -> u64 {
    live.values().filter(|v| v.state == state).count() as u64
}

fn check_report(r: &SweepReport, live: &BTreeMap<CtKey, CtValue>, deleted: usize) {
    assert_eq!(r.deleted, deleted as u64, "{r:?}");
    assert_eq!(r.scanned, (live.len() + deleted) as u64, "{r:?}");
    assert_eq!(r.live.total(), live.len() as u64, "{r:?}");
    for s in ct_state::ALL {
        assert_eq!(r.live.get(s), live_by_state(live, s), "state {}", ct_state::name(s));
    }
    assert_eq!(r.max_entries, CT_MAX);
    // The backend ports of the live flows: a reply entry's source port, a forward entry's
    // backend port (its lost pair would be re-created with it); none of an expired flow.
    let want: std::collections::BTreeSet<u16> = live
        .iter()
        .map(|(k, v)| u16::from_be(if k.dir == CT_FORWARD { v.nat_port } else { k.sport }))
        .collect();
    let got: std::collections::BTreeSet<u16> = r.live_backend_ports().collect();
    assert_eq!(got, want, "backend ports of the live flows");
    assert!((r.fill_ratio - live.len() as f64 / f64::from(CT_MAX)).abs() < 1e-9);
}

#[test]
#[ignore = "needs root"]
fn sweep_removes_exactly_the_expired_entries_and_the_interval_reacts() {
    let cfg = GcConfig::default();
    let (min, max) = (cfg.min_interval, cfg.max_interval);
    let mut bed = Bed::new("sweep", cfg);
    assert_eq!(bed.gc.interval(), max);

    // 700 dead flows = 1400 entries, 34% of the capacity: the interval shortens by that share.
    let w = write_flows(&mut bed.maps, 0, 60, 700);
    let (aff_kept, aff_removed) = write_affinity(&mut bed.maps);
    let r = bed.sweep();
    assert!(r.batched, "this kernel has batch ops; the fallback must not kick in");
    check_report(&r, &w.live, w.dead.len());
    check_exact(&bed.maps, &w.live, &w.dead);
    assert_eq!((r.affinity_scanned, r.affinity_deleted), (4, 3));
    for k in &aff_kept {
        assert!(bed.maps.affinity.get(k, 0).is_ok(), "live affinity entry {k:?} removed");
    }
    for k in &aff_removed {
        assert!(bed.maps.affinity.get(k, 0).is_err(), "stale affinity entry {k:?} kept");
    }
    let shortened = next_interval(max, 1400, 120, CT_MAX, min, max);
    assert!(shortened < max * 3 / 4, "{shortened:?}");
    assert_eq!(bed.gc.interval(), shortened);
    assert_eq!(r.next_interval, shortened);

    // Nothing to delete: 1.5x longer.
    let r = bed.sweep();
    check_report(&r, &w.live, 0);
    assert_eq!(r.affinity_deleted, 0);
    let grown = next_interval(shortened, 0, 120, CT_MAX, min, max);
    assert!(grown > shortened);
    assert_eq!(bed.gc.interval(), grown);

    // More than half full of live flows: halved.
    let more = write_flows(&mut bed.maps, 1_000, 1_000, 0);
    let mut live = w.live.clone();
    live.extend(more.live);
    let r = bed.sweep();
    check_report(&r, &live, 0);
    assert!(r.fill_ratio > 0.5, "{r:?}");
    assert_eq!(bed.gc.interval(), next_interval(grown, 0, 2120, CT_MAX, min, max));
    assert!(bed.gc.interval() < grown);
    check_exact(&bed.maps, &live, &[]);
}

#[test]
#[ignore = "needs root"]
fn per_entry_fallback_sweeps_the_same() {
    let mut bed = Bed::new("fallback", GcConfig::default());
    bed.gc.force_per_entry();
    let w = write_flows(&mut bed.maps, 0, 40, 90);
    let (aff_kept, _) = write_affinity(&mut bed.maps);
    let r = bed.sweep();
    assert!(!r.batched);
    check_report(&r, &w.live, w.dead.len());
    check_exact(&bed.maps, &w.live, &w.dead);
    assert_eq!(r.affinity_deleted, 3);
    let left: Vec<AffinityKey> = bed.maps.affinity.keys().map(|k| k.unwrap()).collect();
    assert_eq!(left, aff_kept);
}

/// The agent's way: `step` works one slice at a time, and only once the sweep is due.
#[test]
#[ignore = "needs root"]
fn sliced_steps_sweep_the_same_and_wait_for_the_interval() {
    let cfg = GcConfig {
        min_interval: Duration::from_millis(50),
        max_interval: Duration::from_millis(200),
        slice: Duration::ZERO, // one chunk per step
        chunk: 64,
    };
    let mut bed = Bed::new("sliced", cfg);
    let w = write_flows(&mut bed.maps, 0, 100, 300);
    write_affinity(&mut bed.maps);
    let applied = bed.applied.clone();
    let lookup = |id| affinity_timeout(&applied, id);
    let gc = &mut bed.gc;
    assert!(gc.step(&lookup).is_none(), "the first sweep waits for min_interval");
    std::thread::sleep(Duration::from_millis(60));
    let mut steps = 0;
    let r = loop {
        steps += 1;
        assert!(steps < 10_000);
        if let Some(r) = gc.step(&lookup) {
            break r.expect("sweep");
        }
        assert!(gc.sweeping());
    };
    assert!(r.slices >= 800 / 64, "{r:?}");
    assert_eq!(r.slices, steps);
    assert!(!gc.sweeping());
    assert!(gc.step(&lookup).is_none(), "the next sweep waits for the interval");
    check_report(&r, &w.live, w.dead.len());
    check_exact(&bed.maps, &w.live, &w.dead);
}
