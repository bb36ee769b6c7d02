//! The floor of the per-packet measurement: a tc classifier that returns at once.
//!
//! The eBPF object is expected to carry `noop_tc`; until it does, the same two instructions
//! (`r0 = 0; exit`) are loaded here with the raw `bpf(2)` syscall, which is all a no-op program is.
//! Either way it runs through the same BPF_PROG_TEST_RUN path as xlb's programs.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use anyhow::bail;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

/// `union bpf_attr` is at most this large for the commands used here; the rest stays zero.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn put_u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }
    fn get_u32(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.0[off..off + 4].try_into().unwrap())
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, zero-initialised bpf_attr of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A loaded no-op tc program.
pub struct RawNoop {
    fd: OwnedFd,
}

impl RawNoop {
    pub fn load() -> anyhow::Result<Self> {
        // mov64 r0, 0 ; exit
        let insns: [u64; 2] = [
            u64::from_le_bytes([0xb7, 0, 0, 0, 0, 0, 0, 0]),
            u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
        ];
        let license = b"GPL\0";
        let mut attr = Attr([0; 128]);
        attr.put_u32(0, BPF_PROG_TYPE_SCHED_CLS); // prog_type
        attr.put_u32(4, insns.len() as u32); // insn_cnt
        attr.put_u64(8, insns.as_ptr() as u64); // insns
        attr.put_u64(16, license.as_ptr() as u64); // license
        let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
        // SAFETY: the kernel returned a new file descriptor we own.
        Ok(RawNoop {
            fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
        })
    }

    /// One BPF_PROG_TEST_RUN of `frame`, `repeat` times; the kernel's mean duration per run.
    pub fn test_run(&self, frame: &[u8], repeat: u32) -> anyhow::Result<Duration> {
        let mut out = vec![0u8; frame.len() + 64];
        let mut attr = Attr([0; 128]);
        attr.put_u32(0, self.fd.as_raw_fd() as u32); // prog_fd
        attr.put_u32(8, frame.len() as u32); // data_size_in
        attr.put_u32(12, out.len() as u32); // data_size_out
        attr.put_u64(16, frame.as_ptr() as u64); // data_in
        attr.put_u64(24, out.as_mut_ptr() as u64); // data_out
        attr.put_u32(32, repeat); // repeat
        bpf(BPF_PROG_TEST_RUN, &mut attr)?;
        let retval = attr.get_u32(4);
        if retval != 0 {
            bail!("no-op program returned {retval}");
        }
        Ok(Duration::from_nanos(u64::from(attr.get_u32(36)))) // duration
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_noop_runs_and_reports_a_duration() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let noop = RawNoop::load().unwrap();
        let frame = crate::pkt::frame::tcp(
            [10, 0, 0, 1],
            1000,
            [10, 0, 0, 2],
            80,
            crate::pkt::frame::ACK,
        );
        let d = noop.test_run(&frame, 1000).unwrap();
        assert!(
            d > Duration::ZERO && d < Duration::from_micros(100),
            "{d:?}"
        );
        // A frame shorter than an Ethernet header is rejected by the kernel.
        assert!(noop.test_run(&[0u8; 4], 1).is_err());
    }
}
