//! Why a packet could not be handled, and what happens to it then.

use aya_ebpf::bindings::TC_ACT_OK;
use lb_common::Stat;

use crate::{frame::Frame, stats::bump};

/// A failure after the packet was recognised as ours. Each maps to one counter and a verdict.
///
/// `repr(i32)`: a `Result<i32, Fault>` then keeps both payloads in the same 32-bit slot. With a
/// one-byte `Fault`, the `Ok` payload is undefined on the `Err` path, and LLVM may copy that
/// undefined register around, which the verifier rejects ("R1 !read_ok").
#[derive(Clone, Copy)]
#[repr(i32)]
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
    /// Counts the fault and returns the hook's drop verdict.
    #[inline(always)]
    pub fn verdict<C: Frame>(self) -> i32 {
        bump(match self {
            Fault::NoBackend => Stat::DropNoBackend,
            Fault::Rewrite => Stat::DropRewriteFailed,
            Fault::Unrefusable => Stat::DropUnrefusable,
        });
        C::DROP
    }
}

/// Verdict for a packet passed on untouched.
pub const PASS: i32 = TC_ACT_OK;
