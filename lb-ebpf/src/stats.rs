//! Per-CPU verdict counters.

use lb_common::Stat;

use crate::maps::STATS;

/// Adds one to `stat` on this CPU. Per-CPU slots need no atomics.
#[inline(always)]
pub fn bump(stat: Stat) {
    if crate::trace::dry_run() {
        // `xlb trace`: the reason goes into the trace record, the node's counters stay.
        crate::trace::stat(stat);
        return;
    }
    if let Some(counter) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: the pointer is this CPU's slot of a per-CPU array, valid for this program run.
        unsafe { *counter += 1 };
    }
}
