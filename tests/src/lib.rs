//! Integration tests live in tests/tests/*.rs; this crate only groups them.
pub mod e2e;
pub mod packet;
