//! Socket load balancing (`--socket-lb`): the four cgroup `sock_addr` programs
//! (`sock_connect4`, `sock_sendmsg4`, `sock_recvmsg4`, `sock_getpeername4`) attached to a cgroup
//! v2 directory (`--cgroup-path`, default the cgroup v2 root) as bpf_links pinned under
//! `PIN/links/cgroup-<program>`.
//!
//! As with the device links, a restarted agent swaps its freshly loaded programs into the pinned
//! links with `BPF_LINK_UPDATE` (aya 0.14 has no `attach_to_link` for cgroup programs, so this
//! module makes the few bpf(2) calls itself): nothing is detached, no connect() misses a
//! program. A pinned link of another cgroup (the flag changed) or of another attach type is
//! replaced; `--socket-lb off` removes the links; `xlb cleanup` removes them with the rest.
//!
//! `host` mode restricts the programs to sockets of the agent's own network namespace: the
//! namespace cookie (`SO_NETNS_COOKIE`) becomes the `XLB_HOST_NETNS_COOKIE` global.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use lb_common::prog_names;

use super::{Datapath, Error, PinLayout, Result};

/// Which sockets the socket-LB programs translate (`--socket-lb`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum SocketLb {
    /// Sockets of the node's own network namespace (host-network processes, hostNetwork pods);
    /// other pods go through the per-packet path.
    #[default]
    Host,
    /// Every socket of the cgroup, pods' too (Cilium's default): pods' connected sockets get
    /// their backend at connect time.
    All,
    /// No socket load balancing (the links are removed).
    Off,
}

impl SocketLb {
    pub fn name(self) -> &'static str {
        match self {
            SocketLb::Host => "host",
            SocketLb::All => "all",
            SocketLb::Off => "off",
        }
    }
}

/// A cgroup hook of the socket load balancer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SockHook {
    Connect4,
    Sendmsg4,
    Recvmsg4,
    Getpeername4,
}

// enum bpf_attach_type (include/uapi/linux/bpf.h).
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_UDP4_SENDMSG: u32 = 14;
const BPF_CGROUP_UDP4_RECVMSG: u32 = 19;
const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;

impl SockHook {
    pub const ALL: [SockHook; 4] =
        [SockHook::Connect4, SockHook::Sendmsg4, SockHook::Recvmsg4, SockHook::Getpeername4];

    /// The program attached at this hook.
    pub fn prog(self) -> &'static str {
        match self {
            SockHook::Connect4 => prog_names::SOCK_CONNECT4,
            SockHook::Sendmsg4 => prog_names::SOCK_SENDMSG4,
            SockHook::Recvmsg4 => prog_names::SOCK_RECVMSG4,
            SockHook::Getpeername4 => prog_names::SOCK_GETPEERNAME4,
        }
    }

    /// The kernel's `bpf_attach_type` of the hook.
    pub fn attach_type(self) -> u32 {
        match self {
            SockHook::Connect4 => BPF_CGROUP_INET4_CONNECT,
            SockHook::Sendmsg4 => BPF_CGROUP_UDP4_SENDMSG,
            SockHook::Recvmsg4 => BPF_CGROUP_UDP4_RECVMSG,
            SockHook::Getpeername4 => BPF_CGROUP_INET4_GETPEERNAME,
        }
    }

    /// The names of the four programs.
    pub fn progs() -> [&'static str; 4] {
        Self::ALL.map(Self::prog)
    }
}

/// Prefix of the cgroup link pins in `PIN/links` (device link pins start with an ifindex).
pub(super) const PIN_PREFIX: &str = "cgroup-";

impl PinLayout {
    /// The pin of the cgroup link of `hook`.
    pub fn sock_link(&self, hook: SockHook) -> PathBuf {
        self.links().join(format!("{PIN_PREFIX}{}", hook.prog()))
    }
}

/// statfs magic of cgroup v2 (`CGROUP2_SUPER_MAGIC`).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Whether `path` is a directory of a cgroup v2 hierarchy.
pub fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|st| st.filesystem_type().0 as i64 == CGROUP2_SUPER_MAGIC)
}

/// The cgroup v2 root: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid
/// ones (systemd's layout with v1 controllers); None when neither is cgroup v2.
pub fn default_cgroup_path() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"].into_iter().map(PathBuf::from).find(|p| is_cgroup2(p))
}

/// The cgroup id of a cgroup v2 directory (its inode number, which is the kernfs id the kernel
/// reports in link info).
pub fn cgroup_id(path: &Path) -> io::Result<u64> {
    Ok(fs::metadata(path)?.ino())
}

/// `SO_NETNS_COOKIE` (Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the calling thread's network namespace (what `bpf_get_netns_cookie` returns
/// for its sockets).
pub fn own_netns_cookie() -> io::Result<u64> {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned right below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid descriptor, pointer and length of a live local.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

// bpf(2) commands and link type (include/uapi/linux/bpf.h).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_UPDATE: libc::c_long = 29;
pub(crate) const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// One raw `bpf(cmd, attr)` call with an attribute struct `A` (a prefix of `union bpf_attr`).
pub(crate) fn sys_bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised prefix of `union bpf_attr` of the size passed;
    // the pointers in it refer to live buffers (checked by the callers).
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut A, std::mem::size_of::<A>() as libc::c_uint) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// An fd of the object pinned at `path` (`BPF_OBJ_GET`).
pub(crate) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjAttr { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// What `BPF_OBJ_GET_INFO_BY_FD` says of a cgroup link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLinkInfo {
    pub link_type: u32,
    pub prog_id: u32,
    /// 0 when the cgroup is gone (the link was auto-detached).
    pub cgroup_id: u64,
    pub attach_type: u32,
}

pub(crate) fn link_info(fd: BorrowedFd<'_>) -> io::Result<CgroupLinkInfo> {
    // struct bpf_link_info up to the cgroup member of its union (type, id, prog_id, then the
    // 8-aligned union), with room for the rest of the union.
    #[repr(C)]
    #[derive(Default)]
    struct Info {
        link_type: u32,
        id: u32,
        prog_id: u32,
        _pad: u32,
        cgroup_id: u64,
        attach_type: u32,
        _rest: [u32; 13],
    }
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = Info::default();
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<Info>() as u32,
        info: &mut info as *mut Info as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(CgroupLinkInfo {
        link_type: info.link_type,
        prog_id: info.prog_id,
        cgroup_id: info.cgroup_id,
        attach_type: info.attach_type,
    })
}

/// Swap `prog` into the link `link` (`BPF_LINK_UPDATE`, atomic).
fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct UpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = UpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    sys_bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// The ids of the programs attached to cgroup `path` at `hook` (`BPF_PROG_QUERY`, this cgroup's
/// own attachments, not inherited ones).
pub fn query_cgroup(path: &Path, hook: SockHook) -> io::Result<Vec<u32>> {
    #[repr(C)]
    struct QueryAttr {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    let dir = File::open(path)?;
    let mut ids = vec![0u32; 64];
    let mut attr = QueryAttr {
        target_fd: dir.as_raw_fd() as u32,
        attach_type: hook.attach_type(),
        query_flags: 0,
        attach_flags: 0,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        _pad: 0,
        prog_attach_flags: 0,
        link_ids: 0,
        link_attach_flags: 0,
        revision: 0,
    };
    sys_bpf(BPF_PROG_QUERY, &mut attr)?;
    ids.truncate(attr.prog_cnt as usize);
    Ok(ids)
}

/// Whether the link pinned at `pin` is attached to cgroup `id` at `hook`; its fd when it is.
fn pinned_link_of(pin: &Path, cgroup: u64, hook: SockHook) -> std::result::Result<OwnedFd, String> {
    let fd = obj_get(pin).map_err(|e| format!("opening the pin: {e}"))?;
    let info = link_info(fd.as_fd()).map_err(|e| format!("link info: {e}"))?;
    if info.link_type != BPF_LINK_TYPE_CGROUP || info.attach_type != hook.attach_type() {
        return Err(format!("not a {} cgroup link: {info:?}", hook.prog()));
    }
    if info.cgroup_id != cgroup {
        return Err(format!("attached to cgroup id {} (0: a removed cgroup), not {cgroup}", info.cgroup_id));
    }
    Ok(fd)
}

/// Unpin the link at `pin`: the last reference goes, the kernel detaches the program.
fn unpin(pin: &Path) {
    match PinnedLink::from_pin(pin) {
        Ok(link) => {
            let _ = link.unpin();
        }
        Err(_) => {
            let _ = fs::remove_file(pin);
        }
    }
}

impl Datapath {
    /// Load the four socket-LB programs (the verifier runs here).
    pub fn load_sock(&mut self) -> Result<()> {
        super::load_programs(&mut self.ebpf, &SockHook::progs())
    }

    /// Attach the socket-LB programs to the cgroup v2 directory `cgroup` (idempotent). A link
    /// an earlier agent pinned for the same cgroup and hook gets the freshly loaded program
    /// swapped in atomically; a pinned link of another cgroup is removed and a new link
    /// created and pinned.
    pub fn attach_sock(&mut self, cgroup: &Path) -> Result<()> {
        let err = |reason: String| Error::Attach { iface: format!("cgroup {}", cgroup.display()), reason };
        if !is_cgroup2(cgroup) {
            return Err(err("not a cgroup v2 directory (--cgroup-path)".into()));
        }
        let id = cgroup_id(cgroup).map_err(|e| err(e.to_string()))?;
        for hook in SockHook::ALL {
            let name = hook.prog();
            let pin = self.pins.sock_link(hook);
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or(Error::MissingProgram(name))?
                .try_into()
                .map_err(|source| Error::Program { name, source })?;
            let prog_fd = prog.fd().map_err(|source| Error::Program { name, source })?;
            if pin.exists() {
                let swapped = pinned_link_of(&pin, id, hook)
                    .and_then(|link| link_update(link.as_fd(), prog_fd.as_fd()).map_err(|e| format!("BPF_LINK_UPDATE: {e}")));
                match swapped {
                    Ok(()) => continue,
                    Err(reason) => {
                        tracing::info!(hook = name, %reason, "replacing the pinned socket-LB link");
                        unpin(&pin);
                    }
                }
            }
            let dir = File::open(cgroup).map_err(|e| err(e.to_string()))?;
            let link_id = prog.attach(&dir, CgroupAttachMode::Single).map_err(|e| err(format!("{name}: {e:#}")))?;
            let link = prog.take_link(link_id).map_err(|e| err(e.to_string()))?;
            let fd_link = FdLink::try_from(link)
                .map_err(|e| err(format!("{name}: no bpf_link for cgroup programs (kernel < 5.7?): {e}")))?;
            fd_link.pin(&pin).map_err(|e| err(format!("pinning the {name} link: {e}")))?;
        }
        Ok(())
    }

    /// Remove the socket-LB links (`--socket-lb off`); returns how many there were.
    pub fn detach_sock(&self) -> usize {
        detach_sock_links(&self.pins)
    }
}

/// Unpin (and so detach) every socket-LB link under `pins`.
pub(super) fn detach_sock_links(pins: &PinLayout) -> usize {
    let mut n = 0;
    for hook in SockHook::ALL {
        let pin = pins.sock_link(hook);
        if pin.exists() {
            unpin(&pin);
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_know_their_programs_and_attach_types() {
        assert_eq!(SockHook::progs(), ["sock_connect4", "sock_sendmsg4", "sock_recvmsg4", "sock_getpeername4"]);
        let types: Vec<u32> = SockHook::ALL.iter().map(|h| h.attach_type()).collect();
        assert_eq!(types, [10, 14, 19, 29]);
        let pins = PinLayout::new("/sys/fs/bpf/xlb");
        assert_eq!(pins.sock_link(SockHook::Connect4), Path::new("/sys/fs/bpf/xlb/links/cgroup-sock_connect4"));
        for hook in SockHook::ALL {
            let name = pins.sock_link(hook).file_name().unwrap().to_string_lossy().into_owned();
            assert!(name.starts_with(PIN_PREFIX));
            assert_eq!(super::super::attach::parse_link_pin(&name), None, "{name} must not look like a device pin");
        }
    }

    #[test]
    fn socket_lb_modes_have_names() {
        assert_eq!(SocketLb::default(), SocketLb::Host);
        assert_eq!([SocketLb::Host, SocketLb::All, SocketLb::Off].map(SocketLb::name), ["host", "all", "off"]);
    }

    #[test]
    fn the_default_cgroup_path_is_a_cgroup2_mount() {
        // /sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on hybrid ones (this CI's).
        if let Some(p) = default_cgroup_path() {
            assert!(is_cgroup2(&p), "{}", p.display());
            assert!(cgroup_id(&p).unwrap() > 0);
        }
        assert!(!is_cgroup2(Path::new("/proc")));
    }

    #[test]
    fn the_netns_cookie_of_this_namespace_is_stable() {
        // SO_NETNS_COOKIE needs Linux 5.14; the same namespace always has the same cookie.
        let a = own_netns_cookie().unwrap();
        assert_ne!(a, 0);
        assert_eq!(own_netns_cookie().unwrap(), a);
    }
}
