//! The tuple of the last packet this CPU translated towards a backend (`LAST_FWD`, a per-CPU
//! slot), so the egress programs can pass that very packet without a reply lookup.
//!
//! A packet `from_pod` (tc ingress of the client's veth) or `from_net` (the uplink) translates
//! to a local backend is forwarded by the stack within the same softirq on the same CPU, and
//! meets `to_pod` (tc egress of the backend's veth) next. There it is the forward direction of
//! its own flow, never an answer: a reply lookup of its tuple can only miss, and a miss in a
//! large conntrack table touches a cold bucket (the bench's `floor_ct_lookup`), about half of
//! `to_pod`'s runs on a busy Service. A slot that holds another tuple (packets of a burst, or
//! anything that ran in between) just means the lookup happens as before, so the cache can
//! only save work, never change a verdict. SYNs always take the lookup: a SYN is where a stale
//! flow on the reversed tuple is removed (`to_pod`).

use lb_common::{CtKey, CT_FORWARD};

use crate::{maps::LAST_FWD, parse::Packet};

/// Records that `pkt` leaves with source `saddr:sport` and destination `daddr:dport`.
#[inline(always)]
pub fn record(pkt: &Packet, saddr: u32, sport: u16, daddr: u32, dport: u16) {
    if crate::trace::dry_run() {
        return;
    }
    if let Some(slot) = LAST_FWD.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array, valid for this program run.
        unsafe {
            *slot = CtKey {
                saddr,
                daddr,
                sport,
                dport,
                proto: pkt.proto,
                dir: CT_FORWARD,
                _pad: 0,
            }
        };
    }
}

/// Whether `pkt` (not a SYN, with its L4 header) is the packet this CPU translated last.
#[inline(always)]
pub fn is_last(pkt: &Packet) -> bool {
    if !pkt.has_l4 || pkt.has_tcp_flag(crate::parse::TCP_SYN) {
        return false;
    }
    match LAST_FWD.get(0) {
        Some(l) => {
            l.daddr == pkt.daddr
                && l.saddr == pkt.saddr
                && l.sport == pkt.sport
                && l.dport == pkt.dport
                && l.proto == pkt.proto
        }
        None => false,
    }
}
