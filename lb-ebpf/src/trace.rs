//! `xlb trace` support: the dry-run switch and the trace record. In the copy of the object
//! `xlb trace` loads (global `XLB_DRY_RUN` = 1) the programs read the live maps but write none
//! of them, so running a packet through with BPF_PROG_TEST_RUN changes nothing on the node.
//! What the run did goes into `TRACE` instead (a private, unpinned per-CPU record): the
//! counters it would have bumped (the reasons behind the verdict) and the conntrack entry it
//! followed or would have created (the backend, the Service). The attached programs have 0, a
//! load-time constant the verifier folds, so the checks and the record cost them nothing.

use lb_common::{CtValue, Stat, CT_FORWARD, TRACE_FLOW_EXISTING, TRACE_FLOW_NEW};

use crate::maps::TRACE;

/// See `lb_common::global_names::DRY_RUN`.
#[unsafe(no_mangle)]
static XLB_DRY_RUN: u32 = 0;

/// Whether this program run must not write any map (`xlb trace`).
#[inline(always)]
pub fn dry_run() -> bool {
    // SAFETY: a plain read of a load-time constant; volatile so the compiler keeps the load
    // (the loader patches the value after compilation).
    unsafe { core::ptr::read_volatile(&XLB_DRY_RUN) != 0 }
}

/// Dry run: records that the run counted `stat` (instead of counting it in `STATS`).
#[inline(always)]
pub fn stat(stat: Stat) {
    if let Some(rec) = TRACE.get_ptr_mut(0) {
        let bit = stat as u32;
        if bit < 64 {
            // SAFETY: this CPU's value of the private trace record, valid for this run.
            unsafe { (*rec).stats |= 1u64 << bit };
        }
    }
}

/// Dry run: records the conntrack entry (direction `dir`) a packet of a live flow followed.
#[inline(always)]
pub fn existing(ct: &CtValue, dir: u8) {
    flow(ct, TRACE_FLOW_EXISTING, dir);
}

/// Dry run: records the forward entry a new flow would have written.
#[inline(always)]
pub fn new_flow(ct: &CtValue) {
    flow(ct, TRACE_FLOW_NEW, CT_FORWARD);
}

#[inline(always)]
fn flow(ct: &CtValue, kind: u32, dir: u8) {
    if let Some(rec) = TRACE.get_ptr_mut(0) {
        // SAFETY: as in `stat`.
        unsafe {
            (*rec).flow = *ct;
            (*rec).flow_kind = kind;
            (*rec).flow_dir = u32::from(dir);
        }
    }
}
