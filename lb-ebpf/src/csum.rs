//! Full Internet checksums over small headers built on the stack (for the refusal packets).
//! Translations use the kernel's incremental helpers instead (see `nat`).

use aya_ebpf::helpers::bpf_csum_diff;

/// One's-complement sum of `value`'s bytes, unfolded. `T` must be a multiple of 4 bytes
/// (`bpf_csum_diff` works on 32-bit words) and at most 512 bytes.
#[inline(always)]
pub fn sum<T>(value: &T, seed: u32) -> u32 {
    const { assert!(size_of::<T>().is_multiple_of(4) && size_of::<T>() <= 512) };
    // SAFETY: `from` is empty; `to` points at `size_of::<T>()` readable bytes on the stack.
    let ret = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            (value as *const T).cast_mut().cast(),
            size_of::<T>() as u32,
            seed,
        )
    };
    ret as u32
}

/// Folds an unfolded sum to the 16-bit checksum, ready to store as-is (native order) into the
/// header, as the kernel's `csum_fold` does.
#[inline(always)]
pub fn fold(sum: u32) -> [u8; 2] {
    let mut s = (sum & 0xffff) + (sum >> 16);
    s = (s & 0xffff) + (s >> 16);
    (!(s as u16)).to_ne_bytes()
}
