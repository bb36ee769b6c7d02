//! Empty library target: aya-build needs the crate to have one; the programs live in `main.rs`.
#![no_std]
