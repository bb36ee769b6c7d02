//! The frontend pre-filter (`lb_common::map_names::FEFILTER`): one bit per
//! `lb_common::fefilter_bit` of an address, set by the agent for every frontend address outside
//! the Service CIDR and every original destination of a live translated flow. A packet whose
//! destination is outside the Service CIDR and whose bit is clear is neither to a frontend nor
//! part of a translated flow, so it passes without a conntrack or SERVICES lookup: the lookup
//! of one array word (inlined by the verifier) replaces two hash lookups on the path of every
//! non-Service packet.

//!
//! The same map holds the reply pre-filter (words from `PORTFILTER_OFFSET`): one bit per port,
//! set for every backend port. A reply entry of conntrack is keyed by its backend's address
//! and port as the source (`CtKey::pair`), so a packet whose source port's bit is clear is no
//! answer of a translated flow: the answer paths (`to_pod`, `to_net`) pass it without the
//! conntrack lookup, which for such packets could only miss. Those are the request direction of
//! every connection into a pod from an ephemeral port (a Service flow's forward packets, and
//! every direct one), whose miss meets a cold bucket of the large conntrack table once per
//! flow; a SYN's stale-flow check (`to_pod`) is such a lookup on every new connection.

use lb_common::{fefilter_bit, FEFILTER_WORDS, PORTFILTER_OFFSET};

use crate::maps::FEFILTER;

/// See `lb_common::global_names::FEFILTER_ON`: set by the agent at load time when it keeps the
/// filters; 0 (the default, and any loader that does not know them): not consulted.
#[unsafe(no_mangle)]
static XLB_FEFILTER_ON: u32 = 0;

#[inline(always)]
fn on() -> bool {
    // SAFETY: a plain read of a load-time constant; volatile so the loader's value is used.
    let on = unsafe { core::ptr::read_volatile(&XLB_FEFILTER_ON) };
    on != 0
}

/// Whether bit `bit % 64` of map word `word` is set (true when the word cannot be read).
#[inline(always)]
fn bit_set(word: u32, bit: u32) -> bool {
    match FEFILTER.get(word) {
        Some(w) => *w & (1u64 << (bit % 64)) != 0,
        None => true,
    }
}

/// Whether `daddr` (network order) may be a frontend or a live flow's original destination.
/// False only when the filter is on and the address's bit is clear.
#[inline(always)]
pub fn may_be_frontend(daddr: u32) -> bool {
    if !on() {
        return true;
    }
    let bit = fefilter_bit(daddr);
    let word = bit / 64;
    if word >= FEFILTER_WORDS {
        return true;
    }
    bit_set(word, bit)
}

/// Whether a conntrack reply entry may have `sport` (network order) as its source port, i.e.
/// whether `sport` may be a backend's port. False only when the filter is on and the port's
/// bit is clear.
#[inline(always)]
pub fn may_be_reply(sport: u16) -> bool {
    if !on() {
        return true;
    }
    let port = u32::from(u16::from_be(sport));
    bit_set(PORTFILTER_OFFSET + port / 64, port)
}
