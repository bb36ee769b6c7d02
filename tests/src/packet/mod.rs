//! Helpers for the BPF_PROG_TEST_RUN packet tests (`tests/tests/packet.rs`):
//!
//! - [`build`]: frames built with etherparse, independent of the code under test;
//! - [`verify`]: decoding output frames and recomputing every checksum independently;
//! - [`harness`]: the real eBPF object loaded unpinned, its maps filled with `lb-common` types,
//!   programs run on a frame.

pub mod build;
pub mod harness;
pub mod verify;
