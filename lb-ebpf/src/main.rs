//! xlb's eBPF datapath: tc classifiers on the host side of pod veths.
//!
//! - `from_pod` (tc ingress): packets leaving a pod. Established flows are translated with one
//!   conntrack lookup; new flows to a Service frontend get a backend (random slot, or the
//!   client's affine backend), a conntrack pair and a DNAT. Services without endpoints are
//!   refused at once (TCP RST / ICMP port unreachable sent back into the pod).
//! - `to_pod` (tc egress): replies going into a pod get their source restored to the frontend.
//!
//! - Conntrack entries have states and lifetimes (`conntrack`), hairpin flows are SNATed to a
//!   link-local address, ICMP errors about translated flows are translated back (`icmp`), and
//!   later IPv4 fragments follow their first fragment (`parse`).
//!
//! Anything that is not IPv4 TCP/UDP to a frontend is passed untouched, with no map write.
//!
//! Off the BPF target the crate is an empty program (its dependencies are BPF-only), so a plain
//! host `cargo build` of the workspace, which lists this crate among its members, still
//! succeeds; the real object is built by `lb-userspace/build.rs` for `bpfel-unknown-none`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod csum;
#[cfg(target_arch = "bpf")]
mod fault;
#[cfg(target_arch = "bpf")]
mod fefilter;
#[cfg(target_arch = "bpf")]
mod floor;
#[cfg(target_arch = "bpf")]
mod frame;
#[cfg(target_arch = "bpf")]
mod from_net;
#[cfg(target_arch = "bpf")]
mod from_pod;
#[cfg(target_arch = "bpf")]
mod icmp;
// The last packet translated towards a backend on this CPU (to_pod passes it without a lookup).
#[cfg(target_arch = "bpf")]
mod lastfwd;
#[cfg(target_arch = "bpf")]
mod lb;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod noop;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod refuse;
#[cfg(target_arch = "bpf")]
mod sock;
#[cfg(target_arch = "bpf")]
mod stats;
// Per-Service counters (new flows, packets, bytes, refusals and drops by reason).
#[cfg(target_arch = "bpf")]
mod svcstats;
#[cfg(target_arch = "bpf")]
mod to_pod;
// `xlb trace`: the dry-run switch (no map writes) and what a traced packet recorded.
#[cfg(target_arch = "bpf")]
mod trace;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects programs with a reachable panic path, so this never runs.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
