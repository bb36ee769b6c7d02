//! Helpers for the BPF_PROG_TEST_RUN packet tests (`tests/tests/packet.rs`,
//! `tests/tests/packet_conntrack.rs`):
//!
//! - [`build`]: frames built with etherparse (TCP, UDP, ICMP errors quoting a packet, IPv4
//!   fragments), independent of the code under test;
//! - [`verify`]: decoding output frames, and recomputing every checksum independently (etherparse,
//!   and raw RFC 1071 sums including the quoted header of ICMP errors);
//! - [`harness`]: the real eBPF object loaded unpinned with chosen conntrack lifetimes, its maps
//!   filled with `lb-common` types, programs run on a frame.

pub mod build;
pub mod harness;
pub mod verify;
