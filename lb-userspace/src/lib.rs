//! The xlb agent, CLI and BPF datapath driver.
//!
//! `datapath` is the only module that touches aya for programs and Service maps (everything it
//! executes is planned by the pure `lb-model` crate); `ct_gc` sweeps conntrack through
//! `bpf_batch`'s batched map operations.

pub mod agent;
pub mod bpf_batch;
pub mod ct_gc;
pub mod devices;
pub mod datapath;
pub mod healthcheck;
pub mod inspect;
pub mod memtrim;
pub mod metrics;
pub mod proxyhealth;
pub mod source;
pub mod status;
pub mod trace;

/// The compiled eBPF object (all programs and maps), built by `build.rs` from `lb-ebpf`.
pub fn ebpf_object() -> &'static [u8] {
    static OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb-ebpf"));
    OBJ
}
