//! Conntrack: a forward entry keyed by the client's tuple (value: the backend) and a reply entry
//! keyed by the backend's answer tuple (value: the frontend to restore).
//!
//! Entries have a state (`lb_common::ct_state`) and an absolute expiry. Both entries of a flow
//! always hold the same state and expiry: every state change and every refresh writes the pair,
//! and a refresh happens at most once a second per flow (Cilium's `CT_REPORT_INTERVAL` idea), so
//! a busy flow costs one lookup per packet and no map write. An expired entry is a miss, whether
//! or not the agent's sweeper has removed it yet.

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
};
use lb_common::{
    ct_state, ClockCache, CtKey, CtTimeouts, CtValue, Stat, CT_FORWARD, CT_F_FIN_FWD, CT_F_FIN_REV,
    CT_REPLY, HAIRPIN_ADDR,
};

use crate::{
    maps::{CLOCK, CONNTRACK},
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats::bump,
};

/// Lifetimes, set by the agent at load time (`lb_common::global_names::CT_TIMEOUTS`).
#[unsafe(no_mangle)]
static XLB_CT_TIMEOUTS: CtTimeouts = CtTimeouts::DEFAULT;

/// An entry's expiry is pushed forward at most this often.
const REFRESH_NS: u64 = 1_000_000_000;
const NS_PER_SEC: u64 = 1_000_000_000;

/// Which side sent a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// From the client (towards the frontend / backend).
    Forward,
    /// From the backend (the answer).
    Reply,
}

/// CLOCK_MONOTONIC_COARSE in ns: cheaper than the precise clock, and a tick (a few ms) is
/// nothing against lifetimes of seconds.
///
/// Read through a per-CPU cache keyed by the jiffy (`CLOCK`): the coarse clock only moves at a
/// tick, when jiffies move too, so within one jiffy the value read first is the value. Reading
/// `jiffies_64` costs a few ns where the coarse clock's seqcount read measured about 30 ns more
/// per packet (the bench's floor probes), and every translated packet reads the clock once. At
/// a tick the two may be seen one update apart, so a cached value is at most one tick old: the
/// precision the coarse clock has anyway. In dry run (`xlb trace`) the cache is not written.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: no arguments, always callable.
    let jiffies = unsafe { bpf_jiffies64() };
    if let Some(c) = CLOCK.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array, valid for this program run; no other
        // run on this CPU interleaves (preemption is off for BPF).
        unsafe {
            if (*c).jiffies == jiffies && (*c).ns != 0 {
                return (*c).ns;
            }
            // SAFETY: no arguments, always callable.
            let ns = bpf_ktime_get_coarse_ns();
            if !crate::trace::dry_run() {
                *c = ClockCache { jiffies, ns };
            }
            return ns;
        }
    }
    // SAFETY: no arguments, always callable.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Lifetime of `state` in ns.
#[inline(always)]
fn lifetime_ns(state: u8) -> u64 {
    // SAFETY: a plain read of a load-time constant; volatile so the compiler keeps the load
    // (the loader patches the value after compilation).
    let secs = unsafe { core::ptr::read_volatile(XLB_CT_TIMEOUTS.field_of(state)) };
    u64::from(secs) * NS_PER_SEC
}

/// The forward key of `pkt` (client -> frontend).
#[inline(always)]
pub fn forward_key(pkt: &Packet) -> CtKey {
    CtKey {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        dir: CT_FORWARD,
        _pad: 0,
    }
}

/// The reply key of `pkt`, an answer from a backend (backend -> client).
#[inline(always)]
pub fn reply_key_of(pkt: &Packet) -> CtKey {
    CtKey {
        dir: CT_REPLY,
        ..forward_key(pkt)
    }
}

/// The reply key a direct (non-Service) connection of `pkt` would collide with: the answer
/// tuple of `pkt` (daddr -> saddr).
#[inline(always)]
pub fn answer_key_of(pkt: &Packet) -> CtKey {
    CtKey {
        saddr: pkt.daddr,
        daddr: pkt.saddr,
        sport: pkt.dport,
        dport: pkt.sport,
        proto: pkt.proto,
        dir: CT_REPLY,
        _pad: 0,
    }
}

/// State and flags after `pkt` went `dir` on a flow in `state` with `flags`.
#[inline(always)]
fn next_state(state: u8, flags: u8, pkt: &Packet, dir: Dir) -> (u8, u8) {
    if !pkt.is_tcp() {
        if dir == Dir::Reply && state == ct_state::UDP_UNREPLIED {
            return (ct_state::UDP_REPLIED, flags);
        }
        return (state, flags);
    }
    if state == ct_state::TCP_CLOSED || pkt.has_tcp_flag(TCP_RST) {
        return (ct_state::TCP_CLOSED, flags);
    }
    let mut flags = flags;
    if pkt.has_tcp_flag(TCP_FIN) {
        flags |= match dir {
            Dir::Forward => CT_F_FIN_FWD,
            Dir::Reply => CT_F_FIN_REV,
        };
    }
    let fins = flags & (CT_F_FIN_FWD | CT_F_FIN_REV);
    let state = if fins == CT_F_FIN_FWD | CT_F_FIN_REV {
        ct_state::TCP_CLOSING
    } else if fins != 0 {
        ct_state::TCP_FIN_WAIT
    } else if state == ct_state::TCP_SYN_SENT
        && pkt.has_tcp_flag(TCP_ACK)
        && (dir == Dir::Reply || !pkt.has_tcp_flag(TCP_SYN))
    {
        // The backend's SYN-ACK, or the client's ACK after it (when the answer took another path).
        ct_state::TCP_ESTABLISHED
    } else {
        state
    };
    (state, flags)
}

/// The state a new flow starts in.
#[inline(always)]
fn initial_state(pkt: &Packet) -> (u8, u8) {
    if !pkt.is_tcp() {
        return (ct_state::UDP_UNREPLIED, 0);
    }
    let start = if pkt.is_syn_only() {
        ct_state::TCP_SYN_SENT
    } else {
        // Picked up mid-stream (its entry expired or was evicted).
        ct_state::TCP_ESTABLISHED
    };
    next_state(start, 0, pkt, Dir::Forward)
}

/// Whether an entry is still alive at `now`.
#[inline(always)]
pub fn alive(v: &CtValue, now: u64) -> bool {
    v.expires_ns > now
}

/// Applies `pkt` (sent `dir`) to the live flow whose entry at `key` is `entry` (holding `cur`,
/// the copy the caller took right after its lookup, so the value is not read twice): a state change,
/// or a due refresh, writes both entries; a missing pair is re-created. `force_pair` checks the
/// pair now even without a refresh (a SYN re-using a live flow needs its reply entry at once).
#[inline(always)]
pub fn update(
    key: &CtKey,
    entry: *mut CtValue,
    cur: &CtValue,
    pkt: &Packet,
    dir: Dir,
    now: u64,
    force_pair: bool,
) {
    let cur = *cur;
    if crate::trace::dry_run() {
        // `xlb trace`: the flow is what the packet followed; its entries stay as they are.
        crate::trace::existing(&cur, key.dir);
        return;
    }
    let (state, flags) = next_state(cur.state, cur.flags, pkt, dir);
    let expires_ns = now + lifetime_ns(state);
    let changed = state != cur.state || flags != cur.flags;
    let due = changed || expires_ns >= cur.expires_ns + REFRESH_NS;
    if !due && !force_pair {
        return;
    }
    let pair_key = key.pair(&cur);
    if !due {
        // Only make sure the pair exists; the expiry stays as it is.
        if CONNTRACK.get_ptr(&pair_key).is_none() {
            recreate_pair(key, &pair_key, &cur);
        }
        return;
    }
    // SAFETY: as above; plain stores into the map value (other CPUs may race, and any of the
    // racing values is a valid state).
    unsafe {
        (*entry).state = state;
        (*entry).flags = flags;
        (*entry).expires_ns = expires_ns;
    }
    match CONNTRACK.get_ptr_mut(&pair_key) {
        Some(pair) => {
            // SAFETY: a live map value returned by the lookup just above.
            unsafe {
                (*pair).state = state;
                (*pair).flags = flags;
                (*pair).expires_ns = expires_ns;
            }
        }
        None => {
            let now_value = CtValue {
                state,
                flags,
                expires_ns,
                ..cur
            };
            recreate_pair(key, &pair_key, &now_value);
        }
    }
}

/// Writes the lost pair of the entry at `key` that holds `v`.
#[inline(always)]
fn recreate_pair(key: &CtKey, pair_key: &CtKey, v: &CtValue) {
    if CONNTRACK
        .insert(pair_key, &key.pair_value(v), BPF_ANY.into())
        .is_ok()
    {
        bump(Stat::CtReplyRecreated);
    }
}

/// Where a new flow goes: its backend, and for a flow SNATed to the node, the node's address
/// and port (network order). `flags` are `CT_F_HAIRPIN` / `CT_F_SNAT`.
pub struct Target {
    pub backend_id: u32,
    pub addr: u32,
    pub port: u16,
    pub snat_addr: u32,
    pub snat_port: u16,
    pub rev_nat_id: u32,
    /// The master's `svc_port_id` (per-Service counters of the flow's established packets).
    pub svc_port_id: u32,
    pub flags: u8,
}

/// The live forward entry of a flow that is over (expired, closed, or its backend left) whose
/// tuple a new flow of the same client takes: the entry (from the caller's lookup) and the copy
/// taken right after that lookup.
pub struct Reuse {
    pub entry: *mut CtValue,
    pub old: CtValue,
}

/// The flow that was over on `pkt`'s tuple (`reuse`) gets no successor: drop it with its pair,
/// so no reply is restored to a stale frontend.
#[inline(always)]
pub fn forget(pkt: &Packet, reuse: &Option<Reuse>) {
    if let Some(r) = reuse {
        remove_flow(&forward_key(pkt), &r.old);
    }
}

/// Inserts the forward and reply entries of a new flow of `pkt` to `t`.
/// Returns false when an insert failed (the flow is still translated, just not pinned).
///
/// With `reuse`, the new flow takes over the old flow's entries instead of removing them and
/// inserting new ones: the forward key is the same tuple, so its value is overwritten in
/// place, and so is the reply entry when the new flow answers on the old one's reply tuple
/// (same backend); otherwise only the old reply entry is removed and the new one inserted.
/// A client that re-uses its ports (every busy client: a closed flow lives on for
/// `tcp_close` seconds) thus pays no insert into the large LRU table for the forward entry,
/// whose insert evicts once the table is full, and no delete.
#[inline(always)]
pub fn create(pkt: &Packet, t: &Target, now: u64, reuse: Option<&Reuse>) -> bool {
    let (state, seen) = initial_state(pkt);
    let forward = CtValue {
        backend_id: t.backend_id,
        nat_addr: t.addr,
        nat_port: t.port,
        state,
        flags: t.flags | seen,
        rev_nat_id: t.rev_nat_id,
        snat_addr: t.snat_addr,
        snat_port: t.snat_port,
        // Ids above u16::MAX cannot be recorded (the agent caps --service-ports-max below it).
        svc_port_id: if t.svc_port_id > u16::MAX as u32 { 0 } else { t.svc_port_id as u16 },
        expires_ns: now + lifetime_ns(state),
    };
    if crate::trace::dry_run() {
        // `xlb trace`: record the flow it would be, write nothing.
        crate::trace::new_flow(&forward);
        return true;
    }
    let key = forward_key(pkt);
    let reply_key = key.pair(&forward);
    let reply = key.pair_value(&forward);
    let fwd_ok = match reuse {
        Some(r) => {
            // SAFETY: the live map value of `key` the caller looked up in this run; a plain
            // store, as `update` does (a racing writer leaves one valid value or the other).
            unsafe { *r.entry = forward };
            let old_reply = key.pair(&r.old);
            if old_reply == reply_key {
                if let Some(p) = CONNTRACK.get_ptr_mut(&reply_key) {
                    // SAFETY: a live map value returned by the lookup just above.
                    unsafe { *p = reply };
                    return true;
                }
            } else {
                let _ = CONNTRACK.remove(&old_reply);
            }
            true
        }
        None => CONNTRACK.insert(&key, &forward, BPF_ANY.into()).is_ok(),
    };
    let rep_ok = CONNTRACK.insert(&reply_key, &reply, BPF_ANY.into()).is_ok();
    fwd_ok && rep_ok
}

/// Removes the entry at `key` (holding `v`) and its pair. Missing entries are fine.
#[inline(always)]
pub fn remove_flow(key: &CtKey, v: &CtValue) {
    if crate::trace::dry_run() {
        return;
    }
    let _ = CONNTRACK.remove(&key.pair(v));
    let _ = CONNTRACK.remove(key);
}

/// Network-order [`HAIRPIN_ADDR`].
pub const HAIRPIN: u32 = u32::from_ne_bytes(HAIRPIN_ADDR);
