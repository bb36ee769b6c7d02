//! The frontend pre-filter (`lb_common::map_names::FEFILTER`): one bit per
//! `lb_common::fefilter_bit` of an address, set by the agent for every frontend address outside
//! the Service CIDR and every original destination of a live translated flow. A packet whose
//! destination is outside the Service CIDR and whose bit is clear is neither to a frontend nor
//! part of a translated flow, so it passes without a conntrack or SERVICES lookup: the lookup
//! of one array word (inlined by the verifier) replaces two hash lookups on the path of every
//! non-Service packet.

use lb_common::{fefilter_bit, FEFILTER_WORDS};

use crate::maps::FEFILTER;

/// See `lb_common::global_names::FEFILTER_ON`: set by the agent at load time when it keeps the
/// filter; 0 (the default, and any loader that does not know the filter): not consulted.
#[unsafe(no_mangle)]
static XLB_FEFILTER_ON: u32 = 0;

/// Whether `daddr` (network order) may be a frontend or a live flow's original destination.
/// False only when the filter is on and the address's bit is clear.
#[inline(always)]
pub fn may_be_frontend(daddr: u32) -> bool {
    // SAFETY: a plain read of a load-time constant; volatile so the loader's value is used.
    if unsafe { core::ptr::read_volatile(&XLB_FEFILTER_ON) } == 0 {
        return true;
    }
    let bit = fefilter_bit(daddr);
    let word = bit / 64;
    if word >= FEFILTER_WORDS {
        return true;
    }
    match FEFILTER.get(word) {
        Some(w) => *w & (1u64 << (bit % 64)) != 0,
        None => true,
    }
}
