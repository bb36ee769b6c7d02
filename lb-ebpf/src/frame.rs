//! One packet interface for the tc and the XDP programs, so parsing, NAT and the flow logic are
//! written once and compiled for both hooks.
//!
//! tc programs use the skb helpers (`bpf_skb_load_bytes`, `bpf_l3/l4_csum_replace`), which cope
//! with non-linear skbs and CHECKSUM_PARTIAL. XDP uses `bpf_xdp_load_bytes` /
//! `bpf_xdp_store_bytes` (direct packet access at header offsets that vary with IP options makes
//! LLVM reuse bounds checks across re-derived packet pointers, which the verifier rejects), and
//! updates checksums in software (RFC 1624) with the same flag semantics as the tc helpers: XDP
//! frames are never CHECKSUM_PARTIAL.
//!
//! The common shape (no IP options, TCP/UDP, headers linear) is read and rewritten with direct
//! packet access at fixed offsets on both hooks ([`Frame::direct`], `parse::parse_direct`,
//! `nat::rewrite_direct`); XDP then updates the L4 checksum on the packet itself too.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_F_MARK_MANGLED_0,
        TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::{bpf_fib_lookup, bpf_xdp_load_bytes, bpf_xdp_store_bytes},
    programs::{TcContext, XdpContext},
};

/// `BPF_F_HDR_FIELD_MASK`: the low bits of the csum-replace flags hold the field size.
const FIELD_SIZE_MASK: u64 = 0xf;

/// What the datapath needs from a packet context.
pub trait Frame {
    /// Verdict: let the packet continue untouched (or as rewritten) into the stack.
    const PASS: i32;
    /// Verdict: drop the packet.
    const DROP: i32;
    /// Whether this is the XDP hook (which hands some work to the tc program, see `from_net`).
    const XDP: bool;

    /// Length of the frame in bytes.
    fn len(&self) -> usize;
    /// Reads a `T` at `off`.
    fn load<T: Copy>(&self, off: usize) -> Result<T, ()>;
    /// Writes `v` at `off`.
    fn store<T: Copy>(&self, off: usize, v: &T) -> Result<(), ()>;
    /// Updates the 16-bit IP-style checksum at `off` for a field changing `from` -> `to`
    /// (`size` bytes: 2 or 4), as `bpf_l3_csum_replace`.
    fn l3_csum_replace(&self, off: usize, from: u64, to: u64, size: u64) -> Result<(), ()>;
    /// The same for an L4 checksum, as `bpf_l4_csum_replace` (`flags`: size in the low bits,
    /// `BPF_F_PSEUDO_HDR`, `BPF_F_MARK_MANGLED_0`).
    fn l4_csum_replace(&self, off: usize, from: u64, to: u64, flags: u64) -> Result<(), ()>;
    /// ifindex of the device the packet arrived on (ingress) or leaves by (egress).
    fn ifindex(&self) -> u32;
    /// `bpf_fib_lookup` on this context.
    fn fib_lookup(&self, params: &mut FibParams, flags: u32) -> i64;
    /// The start of the frame for direct reads and writes, when its first `n` bytes are in the
    /// linear part (tc pulls them in with `bpf_skb_pull_data` when the frame is long enough but
    /// they are not), else `None`: use [`Frame::load`] / [`Frame::store`]. The pointer is valid
    /// only until the next helper call that may change the packet (the csum helpers, stores,
    /// pulls): callers take it again after those. `n` must be a constant, so the verifier sees
    /// every access at a fixed offset below it.
    fn direct(&self, n: usize) -> Option<*mut u8>;
}

impl Frame for TcContext {
    const PASS: i32 = TC_ACT_OK;
    const DROP: i32 = TC_ACT_SHOT;
    const XDP: bool = false;

    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }
    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Result<T, ()> {
        TcContext::load(self, off).map_err(|_| ())
    }
    #[inline(always)]
    fn store<T: Copy>(&self, off: usize, v: &T) -> Result<(), ()> {
        TcContext::store(self, off, v, 0).map_err(|_| ())
    }
    #[inline(always)]
    fn l3_csum_replace(&self, off: usize, from: u64, to: u64, size: u64) -> Result<(), ()> {
        TcContext::l3_csum_replace(self, off, from, to, size).map_err(|_| ())
    }
    #[inline(always)]
    fn l4_csum_replace(&self, off: usize, from: u64, to: u64, flags: u64) -> Result<(), ()> {
        TcContext::l4_csum_replace(self, off, from, to, flags).map_err(|_| ())
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: reading a field of the program's own context.
        unsafe { (*self.skb.skb).ifindex }
    }
    #[inline(always)]
    fn direct(&self, n: usize) -> Option<*mut u8> {
        if self.data() + n <= self.data_end() {
            return Some(self.data() as *mut u8);
        }
        // Not linear (GRO'd or paged skbs): pull the headers in once, if the frame has them.
        if (TcContext::len(self) as usize) < n || self.pull_data(n as u32).is_err() {
            return None;
        }
        // The pull invalidated the old pointers: take them again.
        if self.data() + n <= self.data_end() {
            return Some(self.data() as *mut u8);
        }
        None
    }
    #[inline(always)]
    fn fib_lookup(&self, params: &mut FibParams, flags: u32) -> i64 {
        // SAFETY: `params` is a valid, writable struct of the size passed.
        unsafe {
            bpf_fib_lookup(
                self.skb.skb.cast(),
                params,
                size_of::<FibParams>() as i32,
                flags,
            )
        }
    }
}

impl Frame for XdpContext {
    const PASS: i32 = xdp_action::XDP_PASS as i32;
    const DROP: i32 = xdp_action::XDP_DROP as i32;
    const XDP: bool = true;

    #[inline(always)]
    fn len(&self) -> usize {
        self.data_end() - self.data()
    }
    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Result<T, ()> {
        let mut v = core::mem::MaybeUninit::<T>::uninit();
        // SAFETY: the helper writes exactly `size_of::<T>()` bytes into `v` or fails.
        let ret = unsafe {
            bpf_xdp_load_bytes(self.ctx, off as u32, v.as_mut_ptr().cast(), size_of::<T>() as u32)
        };
        if ret != 0 {
            return Err(());
        }
        // SAFETY: initialised by the successful helper call.
        Ok(unsafe { v.assume_init() })
    }
    #[inline(always)]
    fn store<T: Copy>(&self, off: usize, v: &T) -> Result<(), ()> {
        // SAFETY: the helper reads `size_of::<T>()` bytes from `v`.
        let ret = unsafe {
            bpf_xdp_store_bytes(
                self.ctx,
                off as u32,
                (v as *const T).cast_mut().cast(),
                size_of::<T>() as u32,
            )
        };
        if ret != 0 {
            return Err(());
        }
        Ok(())
    }
    #[inline(always)]
    fn l3_csum_replace(&self, off: usize, from: u64, to: u64, size: u64) -> Result<(), ()> {
        let old: u16 = self.load(off)?;
        self.store(off, &csum_update(old, from, to, size))
    }
    #[inline(always)]
    fn l4_csum_replace(&self, off: usize, from: u64, to: u64, flags: u64) -> Result<(), ()> {
        let old: u16 = self.load(off)?;
        let mangled_0 = flags & u64::from(BPF_F_MARK_MANGLED_0) != 0;
        if mangled_0 && old == 0 {
            // UDP without checksum stays without one.
            return Ok(());
        }
        // XDP frames are never CHECKSUM_PARTIAL, so `BPF_F_PSEUDO_HDR` needs no special case:
        // the pseudo-header part of an address change is an ordinary update of the checksum.
        let mut new = csum_update(old, from, to, flags & FIELD_SIZE_MASK);
        if mangled_0 && new == 0 {
            new = 0xffff;
        }
        self.store(off, &new)
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: reading a field of the program's own context.
        unsafe { (*self.ctx).ingress_ifindex }
    }
    #[inline(always)]
    fn direct(&self, n: usize) -> Option<*mut u8> {
        // Only at constant offsets below `n` (the direct parser's fixed-offset headers), which
        // the verifier checks against this one bound; variable offsets keep the helpers.
        // Multi-buffer frames whose headers are not in the first buffer fall back too.
        if self.data() + n <= self.data_end() {
            return Some(self.data() as *mut u8);
        }
        None
    }
    #[inline(always)]
    fn fib_lookup(&self, params: &mut FibParams, flags: u32) -> i64 {
        // SAFETY: as for tc.
        unsafe {
            bpf_fib_lookup(
                self.ctx.cast(),
                params,
                size_of::<FibParams>() as i32,
                flags,
            )
        }
    }
}

/// RFC 1624 incremental update of a checksum stored as-is (network order bytes read into a
/// native u16) when a `size`-byte field (2 or 4) changes from `from` to `to` (both given as
/// the field's in-memory bytes, as the tc helpers take them).
#[inline(always)]
pub fn csum_update(old: u16, from: u64, to: u64, size: u64) -> u16 {
    // One's-complement arithmetic is byte-order independent as long as every 16-bit word is
    // taken the same way: here, all as native reads of in-memory bytes.
    let mut sum = u32::from(!old);
    if size == 4 {
        let (f, t) = (from as u32, to as u32);
        sum += u32::from(!(f as u16)) + u32::from(!((f >> 16) as u16));
        sum += (t & 0xffff) + (t >> 16);
    } else {
        sum += u32::from(!(from as u16)) + u32::from(to as u16);
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
