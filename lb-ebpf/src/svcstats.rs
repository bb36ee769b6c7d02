//! Per-Service counters (`SVCSTATS`, a per-CPU array of `lb_common::SvcStats` indexed by the
//! Service port id the master carries, and the conntrack entry after it). The agent sums the
//! CPUs and labels them with the Service's namespace, name and port (`XLB_SVCNAME_V1`).
//!
//! The established path pays one per-CPU array lookup (the kernel inlines it: an index bound
//! check and an address computation) and two adds: no helper call, no atomics. Id 0 (no id, or
//! a flow set up by an older build) is not counted. In dry run (`xlb trace`) nothing is written.
//! Only the forward direction (client -> frontend) is counted, and only where the packet is
//! translated or refused: a packet XDP hands to tc untouched is counted by tc.

use lb_common::SvcStats;

use crate::maps::SVCSTATS;

/// This CPU's counters of Service port `id`, or `None` (id 0, out of range, dry run).
#[inline(always)]
fn slot(id: u32) -> Option<*mut SvcStats> {
    if id == 0 || crate::trace::dry_run() {
        return None;
    }
    SVCSTATS.get_ptr_mut(id)
}

/// A packet of a live flow was translated: `ip_len` bytes (the IP datagram).
#[inline(always)]
pub fn packet(id: u16, ip_len: u16) {
    if let Some(s) = slot(u32::from(id)) {
        // SAFETY: this CPU's slot of a per-CPU array, valid for this program run; no other
        // program run on this CPU can interleave (per-CPU, preemption off for BPF).
        unsafe {
            (*s).packets += 1;
            (*s).bytes += u64::from(ip_len);
        }
    }
}

/// A new flow got a backend (conntrack pair written); its first packet is counted where it
/// is translated ([`first_packet`]), since XDP may hand it to tc.
#[inline(always)]
pub fn new_flow(id: u32) {
    if let Some(s) = slot(id) {
        // SAFETY: as in `packet`.
        unsafe { (*s).new_flows += 1 };
    }
}

/// The first packet of a new flow was translated here.
#[inline(always)]
pub fn first_packet(id: u32, ip_len: u16) {
    if let Some(s) = slot(id) {
        // SAFETY: as in `packet`.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += u64::from(ip_len);
        }
    }
}

/// Why a new flow of a Service port was not given a backend.
#[derive(Clone, Copy)]
pub enum Drop {
    /// No endpoints: refused (RST / ICMP unreachable / ECONNREFUSED).
    Refused,
    /// externalTrafficPolicy Local without a local endpoint.
    NoLocalEndpoint,
    /// Client outside the loadBalancerSourceRanges.
    SourceRange,
    /// A slot or backend vanished mid-update.
    NoBackend,
    /// No free SNAT port.
    SnatPortsExhausted,
}

/// Counts a new flow of Service port `id` that was refused or dropped for `why`.
#[inline(always)]
pub fn dropped(id: u32, why: Drop) {
    if let Some(s) = slot(id) {
        // SAFETY: as in `packet`.
        unsafe {
            match why {
                Drop::Refused => (*s).refused_no_endpoints += 1,
                Drop::NoLocalEndpoint => (*s).dropped_no_local_endpoint += 1,
                Drop::SourceRange => (*s).dropped_source_range += 1,
                Drop::NoBackend => (*s).dropped_no_backend += 1,
                Drop::SnatPortsExhausted => (*s).dropped_snat_ports_exhausted += 1,
            }
        }
    }
}
