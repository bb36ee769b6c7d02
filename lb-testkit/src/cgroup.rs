//! A dedicated cgroup v2 child for the socket load balancing tests, so the agent's cgroup
//! programs (`--cgroup-path`) never see a socket of anything else on the machine.
//!
//! The cgroup is created under the cgroup v2 mount (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified`
//! on hybrid hosts like systemd's legacy layout) and named after the test's unique prefix, so
//! [`crate::cleanup_stale`] removes those of crashed runs. It only ever holds short-lived
//! processes of the test: [`TestCgroup::socket`] forks a child that enters the cgroup and a
//! network namespace, creates one socket and hands it back over a unix socket (SCM_RIGHTS). The
//! kernel runs a cgroup's sock_addr programs for the cgroup and namespace the *socket* was
//! created in (`sk->sk_cgrp_data`, `sock_net(sk)`), whichever thread later calls connect(2),
//! sendmsg(2) or recvmsg(2) on it; so the test drives such a socket from its own threads as a
//! host-network client of that node. Dropping the guard kills whatever is left inside and
//! removes the cgroup, also when the test panics.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{io_err, Error, Result};
use crate::netns::NetNs;

/// statfs magic of cgroup v2 (`CGROUP2_SUPER_MAGIC`).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Where cgroup v2 may be mounted: unified hosts, then hybrid ones.
const CGROUP2_CANDIDATES: [&str; 2] = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];

/// Whether `path` is a directory of a cgroup v2 hierarchy.
pub fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|st| st.filesystem_type().0 as i64 == CGROUP2_SUPER_MAGIC)
}

/// The cgroup v2 mount of this machine.
pub fn cgroup2_root() -> Result<PathBuf> {
    CGROUP2_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| is_cgroup2(p))
        .ok_or_else(|| {
            Error::Invalid(format!(
                "no cgroup v2 hierarchy at {CGROUP2_CANDIDATES:?} (socket load balancing needs one)"
            ))
        })
}

/// A child cgroup of the cgroup v2 root, removed (with what is left inside) when dropped.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

/// How long a [`TestCgroup::socket`] child may take.
const CHILD_TIMEOUT: Duration = Duration::from_secs(5);

impl TestCgroup {
    /// Create `<cgroup v2 root>/<prefix>socklb` (`prefix` from [`crate::unique_prefix`]).
    pub fn create(prefix: &str) -> Result<Self> {
        let path = cgroup2_root()?.join(format!("{prefix}socklb"));
        std::fs::create_dir(&path).map_err(io_err(format!("creating {}", path.display())))?;
        Ok(TestCgroup { path })
    }

    /// The cgroup's directory (the agent's `--cgroup-path`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Processes in the cgroup now.
    pub fn procs(&self) -> Vec<i32> {
        procs_of(&self.path)
    }

    /// A socket (`AF_INET`, `ty`: `SOCK_STREAM` or `SOCK_DGRAM`, close-on-exec) created by a
    /// process inside this cgroup and inside the network namespace `netns`: to the kernel's
    /// cgroup hooks it is a socket of a host-network process of that namespace.
    pub fn socket(&self, netns: &NetNs, ty: libc::c_int) -> Result<OwnedFd> {
        let ns = netns.open()?;
        let procs_path = self.path.join("cgroup.procs");
        let procs = OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .map_err(io_err(format!("opening {}", procs_path.display())))?;
        let mut pair = [0i32; 2];
        // SAFETY: a valid out array of two descriptors.
        if unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                0,
                pair.as_mut_ptr(),
            )
        } != 0
        {
            return Err(io_err("socketpair")(io::Error::last_os_error()));
        }
        // SAFETY: fresh descriptors nobody else owns.
        let (rx, tx) = unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
        let (procs_fd, ns_fd, tx_fd) = (procs.as_raw_fd(), ns.as_raw_fd(), tx.as_raw_fd());
        // SAFETY: the child only makes async-signal-safe system calls (no allocation, no lock)
        // and leaves with _exit; see `make_socket_and_exit`.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io_err("fork")(io::Error::last_os_error()));
        }
        if pid == 0 {
            // SAFETY: in the freshly forked child, with descriptors valid in it.
            unsafe { make_socket_and_exit(procs_fd, ns_fd, tx_fd, ty) }
        }
        // Our copy of the sending end goes, so the child's exit is an EOF here.
        drop(tx);
        let received = recv_fd(&rx);
        let status = wait_child(pid, CHILD_TIMEOUT);
        match (received, status) {
            (Ok(fd), _) => Ok(fd),
            (Err(e), Some(code)) if code != 0 => Err(Error::Invalid(format!(
                "the socket process in {} failed at step {code} ({}): {e}",
                self.path.display(),
                match code {
                    1 => "entering the cgroup",
                    2 => "entering the network namespace",
                    3 => "socket(2)",
                    _ => "sending the socket",
                }
            ))),
            (Err(e), _) => Err(io_err("receiving the socket")(e)),
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_cgroup(&self.path);
    }
}

/// Kill the processes of cgroup `path` and remove it (waiting a little for the exits).
pub(crate) fn remove_cgroup(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for pid in procs_of(path) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        match std::fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) if Instant::now() >= deadline => {
                eprintln!("removing cgroup {}: {e}", path.display());
                return;
            }
            // EBUSY while a killed process is still exiting.
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn procs_of(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path.join("cgroup.procs"))
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Cgroups under the cgroup v2 root whose names start with `prefix`.
pub(crate) fn list_with_prefix(prefix: &str) -> Vec<PathBuf> {
    let Ok(root) = cgroup2_root() else {
        return Vec::new();
    };
    let Ok(rd) = std::fs::read_dir(&root) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect()
}

/// Control buffer for one descriptor (`CMSG_SPACE(sizeof(int))` is 24 bytes on 64-bit).
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

/// The forked child: enter the cgroup and the namespace, make the socket, send it, exit.
/// Exit codes name the step that failed (1 cgroup, 2 namespace, 3 socket, 4 send).
///
/// # Safety
/// Only in a freshly forked child; the descriptors must be valid in it.
unsafe fn make_socket_and_exit(procs: i32, ns: i32, tx: i32, ty: libc::c_int) -> ! {
    // SAFETY (whole body): raw system calls on valid descriptors and stack buffers.
    unsafe {
        // "0": the writing process.
        if libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
            libc::_exit(1);
        }
        if libc::setns(ns, libc::CLONE_NEWNET) != 0 {
            libc::_exit(2);
        }
        let sock = libc::socket(libc::AF_INET, ty | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            libc::_exit(3);
        }
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        let mut cbuf = CmsgBuf([0; 64]);
        let mut msg: libc::msghdr = core::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(size_of::<i32>() as u32) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<i32>() as u32) as _;
        core::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), sock);
        if libc::sendmsg(tx, &msg, 0) != 1 {
            libc::_exit(4);
        }
        libc::_exit(0)
    }
}

/// Receive one descriptor (SCM_RIGHTS) on `rx`, within [`CHILD_TIMEOUT`].
fn recv_fd(rx: &OwnedFd) -> io::Result<OwnedFd> {
    let tv = libc::timeval {
        tv_sec: CHILD_TIMEOUT.as_secs() as _,
        tv_usec: 0,
    };
    // SAFETY: valid descriptor, pointer and length of a live local.
    unsafe {
        libc::setsockopt(
            rx.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut cbuf = CmsgBuf([0; 64]);
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { core::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = cbuf.0.len() as _;
    // SAFETY: as above; MSG_CMSG_CLOEXEC marks the received descriptor close-on-exec.
    let n = unsafe { libc::recvmsg(rx.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled `msg`; CMSG_FIRSTHDR checks the control length.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if n == 0
            || cmsg.is_null()
            || (*cmsg).cmsg_level != libc::SOL_SOCKET
            || (*cmsg).cmsg_type != libc::SCM_RIGHTS
        {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "no descriptor received",
            ));
        }
        let fd = core::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>());
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Reap child `pid` (waiting up to `timeout`, then killing it): its exit code, if it exited.
fn wait_child(pid: libc::pid_t, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: our own child; a valid out pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
        }
        if r < 0 {
            return None;
        }
        if Instant::now() >= deadline {
            // SAFETY: our own child, not yet reaped.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn netns_cookie(fd: &OwnedFd) -> u64 {
        let mut cookie = 0u64;
        let mut len = size_of::<u64>() as libc::socklen_t;
        // SAFETY: valid descriptor, pointer and length of a live local (SO_NETNS_COOKIE = 71).
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                71,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        cookie
    }

    #[test]
    #[ignore = "needs root"]
    fn sockets_come_from_the_namespace_and_the_cgroup_is_removed_on_drop() {
        let prefix = format!("xlbt{}-unit-cg-", std::process::id());
        let ns = NetNs::create(&format!("{prefix}ns")).unwrap();
        let path;
        {
            let cg = TestCgroup::create(&prefix).unwrap();
            path = cg.path().to_path_buf();
            assert!(is_cgroup2(&path));
            assert_eq!(list_with_prefix(&prefix), vec![path.clone()]);
            let sock = cg.socket(&ns, libc::SOCK_DGRAM).unwrap();
            let same_ns = ns
                .run(|| {
                    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                    netns_cookie(&OwnedFd::from(s))
                })
                .unwrap();
            assert_eq!(
                netns_cookie(&sock),
                same_ns,
                "the socket belongs to the namespace"
            );
            let tcp = cg.socket(&ns, libc::SOCK_STREAM).unwrap();
            assert_eq!(netns_cookie(&tcp), same_ns);
            // The socket processes are gone: the cgroup holds nothing.
            assert!(cg.procs().is_empty(), "{:?}", cg.procs());
        }
        assert!(!path.exists(), "{} left behind", path.display());
    }
}
