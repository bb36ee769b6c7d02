//! Time to sweep a conntrack map of 1M entries (issue 8). The real `CONNTRACK` map of the eBPF
//! object (LRU hash, loaded unpinned) is filled with batched updates with flows as the datapath
//! writes them (a forward and a reply entry each), half of them expired. Then the agent's sweeper
//! ([`lb_userspace::ct_gc::CtGc`], batched lookups and deletes):
//! - one complete sweep, not sliced (the headline number), then a second one over what is left
//!   (nothing to delete: the cost of a sweep that only reads);
//! - on a fresh fill, the sliced sweep the agent runs between events: how many slices, and the
//!   longest (how long a sweep holds an endpoint update back at most);
//! - optionally, on a fresh fill, the per-entry fallback (kernels without batch ops), to compare.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use aya::Ebpf;
use lb_common::{ct_state, ip4, map_names, port, CtKey, CtValue, CT_FORWARD, CT_REPLY, PROTO_TCP};
use lb_userspace::bpf_batch::BatchMap;
use lb_userspace::ct_gc::{now_coarse_ns, CtGc, GcConfig};
use lb_userspace::datapath::{LoadOptions, MapSizes};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SweepResults {
    /// Entries in the map before the sweep.
    pub entries: u64,
    /// Of which expired.
    pub expired: u64,
    pub max_entries: u32,
    /// Batched map operations (false: the kernel had none, per-entry fallback).
    pub batched: bool,
    /// Writing the entries with batched updates.
    pub fill_s: f64,
    /// The complete sweep: read every entry, delete the expired ones.
    pub sweep_s: f64,
    pub deleted: u64,
    /// A second sweep over the live half (reads only).
    pub resweep_s: f64,
    pub resweep_entries: u64,
    /// The agent's sliced sweep of the same fill: working time, slices, longest slice.
    pub sliced_s: f64,
    pub slices: u32,
    pub max_slice_ms: f64,
    /// The per-entry fallback on the same fill, when measured.
    pub per_entry_s: Option<f64>,
}

/// A flow `i` as the datapath stores it: (client, frontend) forward, (backend, client) reply.
/// Clients are in 10.200.0.0/13, which no other part of the bench uses.
pub(crate) fn flow(i: u32, expires_ns: u64, state: u8) -> [(CtKey, CtValue); 2] {
    let client = ip4([10, 200 + (i >> 24) as u8, (i >> 16) as u8, (i >> 8) as u8]);
    let cport = port(1024 + (i & 0xff) as u16 * 200);
    let frontend = ip4([10, 96, 0, 1]);
    let backend = ip4([10, 244, (i % 7) as u8, 10 + (i % 13) as u8]);
    let (fport, bport) = (port(80), port(8080));
    let fwd = CtKey {
        saddr: client,
        daddr: frontend,
        sport: cport,
        dport: fport,
        proto: PROTO_TCP,
        dir: CT_FORWARD,
        _pad: 0,
    };
    let rev = CtKey {
        saddr: backend,
        daddr: client,
        sport: bport,
        dport: cport,
        proto: PROTO_TCP,
        dir: CT_REPLY,
        _pad: 0,
    };
    let v = |nat_addr, nat_port| CtValue {
        backend_id: 1 + i % 13,
        nat_addr,
        nat_port,
        state,
        flags: 0,
        rev_nat_id: 1,
        expires_ns,
        ..CtValue::default()
    };
    [(fwd, v(backend, bport)), (rev, v(frontend, fport))]
}

/// A freshly loaded object's conntrack map holding `entries` entries, every other flow expired.
struct Filled {
    /// Keeps the object (and so the map) alive.
    _ebpf: Ebpf,
    map: BatchMap<CtKey, CtValue>,
    written: u64,
    expired: u64,
    max_entries: u32,
    fill_s: f64,
}

fn fill(entries: usize) -> anyhow::Result<Filled> {
    // Room above the fill: an LRU map starts evicting a little before it is full.
    let max_entries = (entries as u32).next_power_of_two().max(1024);
    let opts = LoadOptions {
        sizes: MapSizes {
            conntrack: max_entries,
            ..MapSizes::default()
        },
        ..LoadOptions::default()
    };
    let mut ebpf = opts.load_object(None).context("loading the eBPF object")?;
    let map = ebpf
        .take_map(map_names::CONNTRACK)
        .context("no conntrack map in the object")?;
    let mut map: BatchMap<CtKey, CtValue> = BatchMap::new(map)?;
    let now = now_coarse_ns();
    let (dead, live) = (now - 1_000_000_000, now + 3_600 * 1_000_000_000);
    let mut keys = Vec::with_capacity(entries);
    let mut values = Vec::with_capacity(entries);
    for i in 0..(entries / 2) as u32 {
        let (exp, state) = if i % 2 == 0 {
            (dead, ct_state::TCP_CLOSED)
        } else {
            (live, ct_state::TCP_ESTABLISHED)
        };
        for (k, v) in flow(i, exp, state) {
            keys.push(k);
            values.push(v);
        }
    }
    let started = Instant::now();
    let written = map
        .update(&keys, &values, 0)
        .context("filling the conntrack map")?;
    let fill_s = started.elapsed().as_secs_f64();
    ensure!(
        written == keys.len(),
        "wrote {written} of {} entries",
        keys.len()
    );
    Ok(Filled {
        _ebpf: ebpf,
        map,
        written: written as u64,
        expired: values.iter().filter(|v| v.expires_ns <= now).count() as u64,
        max_entries,
        fill_s,
    })
}

/// Fill a conntrack map with `entries` entries and time its sweeps (see the module docs).
pub fn run(entries: usize, compare_per_entry: bool) -> anyhow::Result<SweepResults> {
    // Complete sweep, then a second one that deletes nothing.
    let f = fill(entries)?;
    let (written, expired, max_entries, fill_s) = (f.written, f.expired, f.max_entries, f.fill_s);
    let mut gc = CtGc::new(f.map, None, GcConfig::default())?;
    let first = gc.sweep(&|_| None).context("sweeping")?;
    // Fewer read than written would be LRU evictions: then the numbers mean something else.
    ensure!(
        first.scanned == written && first.deleted == expired,
        "first sweep: {first:?}"
    );
    let second = gc.sweep(&|_| None).context("sweeping again")?;
    ensure!(
        second.deleted == 0 && second.scanned == written - expired,
        "second sweep: {second:?}"
    );
    drop(gc);
    crate::interrupt::check()?;

    // The agent's sliced sweep (due at once).
    let f = fill(entries)?;
    let cfg = GcConfig {
        min_interval: Duration::from_millis(1),
        ..GcConfig::default()
    };
    let mut gc = CtGc::new(f.map, None, cfg)?;
    std::thread::sleep(Duration::from_millis(2));
    let sliced = loop {
        if let Some(r) = gc.step(&|_| None) {
            break r.context("sliced sweep")?;
        }
    };
    ensure!(
        sliced.scanned == written && sliced.deleted == expired,
        "sliced sweep: {sliced:?}"
    );
    drop(gc);
    crate::interrupt::check()?;

    let per_entry_s = if compare_per_entry {
        let f = fill(entries)?;
        let mut gc = CtGc::new(f.map, None, GcConfig::default())?;
        gc.force_per_entry();
        let r = gc.sweep(&|_| None).context("per-entry sweep")?;
        ensure!(
            r.scanned == written && r.deleted == expired,
            "per-entry sweep: {r:?}"
        );
        Some(r.busy.as_secs_f64())
    } else {
        None
    };

    Ok(SweepResults {
        entries: first.scanned,
        expired,
        max_entries,
        batched: first.batched,
        fill_s,
        sweep_s: first.busy.as_secs_f64(),
        deleted: first.deleted,
        resweep_s: second.busy.as_secs_f64(),
        resweep_entries: second.scanned,
        sliced_s: sliced.busy.as_secs_f64(),
        slices: sliced.slices,
        max_slice_ms: sliced.max_slice.as_secs_f64() * 1e3,
        per_entry_s,
    })
}
