//! Why a packet could not be handled, and what happens to it then.

use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT};
use lb_common::Stat;

use crate::stats::bump;

/// A failure after the packet was recognised as ours. Each maps to one counter and a verdict.
#[derive(Clone, Copy)]
pub enum Fault {
    /// The master entry promised a backend, but the slot or the backend is gone (an update is
    /// in flight). Dropped: the client retransmits and finds a consistent Service.
    NoBackend,
    /// A rewrite helper failed, so the packet may be half-translated: drop it.
    Rewrite,
    /// The packet must be refused but has a shape we do not answer (IPv4 options on UDP).
    Unrefusable,
}

impl Fault {
    /// Counts the fault and returns the tc verdict.
    #[inline(always)]
    pub fn verdict(self) -> i32 {
        let (stat, verdict) = match self {
            Fault::NoBackend => (Stat::DropNoBackend, TC_ACT_SHOT),
            Fault::Rewrite => (Stat::DropRewriteFailed, TC_ACT_SHOT),
            Fault::Unrefusable => (Stat::DropUnrefusable, TC_ACT_SHOT),
        };
        bump(stat);
        verdict
    }
}

/// Verdict for a packet passed on untouched.
pub const PASS: i32 = TC_ACT_OK;
