//! Batched operations on BPF hash maps (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_UPDATE_BATCH`,
//! `BPF_MAP_DELETE_BATCH`, kernel >= 5.6) through the raw bpf(2) syscall: aya 0.14 has no batch
//! API. One syscall moves thousands of entries, where aya's iterator needs two syscalls per entry
//! (`get_next_key` + `lookup`), which is what makes sweeping a conntrack map of a million entries
//! take a fraction of a second.
//!
//! [`BatchMap`] wraps an aya [`HashMap`] (`BPF_MAP_TYPE_HASH` or `LRU_HASH`) typed over
//! [`aya::Pod`] keys and values. The first batch call that fails with `EINVAL`, `ENOTSUPP` or
//! `EOPNOTSUPP` (a kernel or map type without batch ops) switches the map to per-entry operations
//! through aya (`iter` / `insert` / `remove`) for good; everything else is reported as an error.
//!
//! Kernel semantics this relies on (kernel/bpf/hashtab.c, kernel/bpf/syscall.c):
//! - a lookup batch walks whole hash buckets: `count` in is the buffer capacity, out is the number
//!   of entries written; `out_batch` is an opaque cursor to pass as `in_batch` next time. The last
//!   chunk fails with `ENOENT` *and* still returns its entries. `ENOSPC` means one bucket holds more
//!   entries than the buffer: retry with a bigger buffer.
//! - delete and update batches process keys in order and stop at the first failing key, with
//!   `count` set to the number processed before it. A key already gone (the datapath or LRU
//!   removed it) fails with `ENOENT`: it is skipped and the batch goes on after it.
//! - the walk is not a snapshot: entries added or removed meanwhile may be seen or missed, which is
//!   fine for garbage collection (the next sweep gets them).
//!
//! [`array_update`] and [`array_lookup`] write and read a run of consecutive entries of an array
//! map (`BPF_MAP_TYPE_ARRAY`) in one syscall per chunk (a Maglev table: 16381 entries in one
//! `BPF_MAP_UPDATE_BATCH` instead of 16381 `BPF_MAP_UPDATE_ELEM`). The kernel's generic batch
//! ops serve arrays: an update batch writes `keys[i] -> values[i]` in order; a lookup batch
//! starts after the key `in_batch` points to (at index 0 without one) and returns `count`
//! entries. Callers fall back to per-entry operations when [`is_unsupported`] says so.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;

use aya::maps::{HashMap, IterableMap, Map, MapData, MapError};
use aya::Pod;

/// A lookup buffer never grows beyond this (a bucket this large means a broken hash).
const MAX_CHUNK: u32 = 1 << 20;
/// Keys per delete/update syscall; the kernel reschedules between keys, so this only bounds
/// how long one syscall runs.
const WRITE_CHUNK: usize = 65_536;

// bpf(2) commands (include/uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// The kernel-internal "operation not supported" errno, which leaks to userspace from bpf(2).
const ENOTSUPP: i32 = 524;

/// `union bpf_attr`'s `batch` member (the struct used by `BPF_MAP_*_BATCH`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// One raw `bpf(cmd, attr)` call. On failure `attr.count` still holds what the kernel wrote back.
fn sys_bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid, initialised `bpf_attr` prefix of the size we pass; every pointer
    // in it refers to a live buffer of the length the kernel will use (checked by the callers).
    let ret = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, attr as *mut BatchAttr, std::mem::size_of::<BatchAttr>() as libc::c_uint)
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether `e` says the kernel (or this map type) has no such batch operation, so that per-entry
/// operations should be used instead.
pub fn is_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP))
}

fn errno(e: &io::Error) -> Option<i32> {
    e.raw_os_error()
}

fn map_err(what: &str, e: MapError) -> io::Error {
    match e {
        MapError::SyscallError(s) => io::Error::new(s.io_error.kind(), format!("{what}: {}: {}", s.call, s.io_error)),
        other => io::Error::other(format!("{what}: {other}")),
    }
}

/// Cursor and buffers of one walk over a map with [`BatchMap::next_chunk`].
pub struct Scan<K, V> {
    keys: Vec<K>,
    values: Vec<V>,
    /// Opaque kernel cursor (a bucket index for hash maps; as large as a key for other types).
    token: Vec<u8>,
    started: bool,
    done: bool,
    chunk: u32,
    /// Per-entry mode: the whole map read at once, handed out `chunk` entries at a time.
    buffered: Option<(Vec<K>, Vec<V>, usize)>,
}

impl<K: Pod, V: Pod> Scan<K, V> {
    /// A walk from the start, `chunk` entries per step (at least 1).
    pub fn new(chunk: u32) -> Self {
        Scan {
            keys: Vec::new(),
            values: Vec::new(),
            token: vec![0; std::mem::size_of::<K>().max(8)],
            started: false,
            done: false,
            chunk: chunk.max(1),
            buffered: None,
        }
    }
    /// Keys of the last chunk.
    pub fn keys(&self) -> &[K] {
        &self.keys
    }
    /// Values of the last chunk (same order as [`Scan::keys`]).
    pub fn values(&self) -> &[V] {
        &self.values
    }
    /// Whether the walk reached the end (the last chunk may still hold entries).
    pub fn is_done(&self) -> bool {
        self.done
    }
}

/// A typed hash map with batched operations (see the module docs).
pub struct BatchMap<K, V> {
    map: HashMap<MapData, K, V>,
    batch: bool,
}

impl<K: Pod, V: Pod> BatchMap<K, V> {
    /// Wrap a hash or LRU hash map whose key and value sizes match `K` and `V`.
    pub fn new(map: Map) -> io::Result<Self> {
        let map = HashMap::try_from(map).map_err(|e| map_err("opening the map", e))?;
        Ok(BatchMap { map, batch: true })
    }

    /// Open a map pinned at `path`.
    pub fn from_pin(path: &Path) -> io::Result<Self> {
        let what = format!("opening {}", path.display());
        let data = MapData::from_pin(path).map_err(|e| map_err(&what, e))?;
        Self::new(Map::from_map_data(data).map_err(|e| map_err(&what, e))?)
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.map.map().fd().as_fd()
    }

    /// The map's capacity, from the kernel.
    pub fn max_entries(&self) -> io::Result<u32> {
        Ok(self.map.map().info().map_err(|e| map_err("map info", e))?.max_entries())
    }

    /// Whether batch operations are (still) used.
    pub fn batched(&self) -> bool {
        self.batch
    }

    /// Use per-entry operations from now on, as on a kernel without batch ops (tests, benchmarks).
    pub fn force_per_entry(&mut self) {
        self.batch = false;
    }

    fn fall_back(&mut self, op: &str, e: &io::Error) {
        tracing::warn!(op, error = %e, "BPF batch operations unavailable; using per-entry map operations");
        self.batch = false;
    }

    /// Read the next chunk of `scan` into its buffers ([`Scan::keys`], [`Scan::values`]).
    /// Returns `false` once the walk is over and nothing is left; a `true` chunk may be empty
    /// (keep calling).
    pub fn next_chunk(&mut self, scan: &mut Scan<K, V>) -> io::Result<bool> {
        if let Some((keys, values, pos)) = &mut scan.buffered {
            let end = (*pos + scan.chunk as usize).min(keys.len());
            scan.keys.clear();
            scan.values.clear();
            scan.keys.extend_from_slice(&keys[*pos..end]);
            scan.values.extend_from_slice(&values[*pos..end]);
            *pos = end;
            scan.done = end == keys.len();
            return Ok(!scan.keys.is_empty());
        }
        if scan.done {
            scan.keys.clear();
            scan.values.clear();
            return Ok(false);
        }
        if self.batch {
            match self.lookup_batch(scan) {
                Ok(()) => return Ok(!scan.keys.is_empty() || !scan.done),
                Err(e) if is_unsupported(&e) && !scan.started => self.fall_back("lookup", &e),
                Err(e) => return Err(e),
            }
        }
        // Per-entry: read the whole map with aya now, hand it out chunk by chunk.
        let mut keys = Vec::new();
        let mut values = Vec::new();
        for item in self.map.iter() {
            let (k, v) = item.map_err(|e| map_err("iterating the map", e))?;
            keys.push(k);
            values.push(v);
        }
        scan.started = true;
        scan.buffered = Some((keys, values, 0));
        self.next_chunk(scan)
    }

    fn lookup_batch(&self, scan: &mut Scan<K, V>) -> io::Result<()> {
        loop {
            let cap = scan.chunk as usize;
            scan.keys.clear();
            scan.values.clear();
            scan.keys.reserve(cap);
            scan.values.reserve(cap);
            let mut out_token = vec![0u8; scan.token.len()];
            let mut attr = BatchAttr {
                in_batch: if scan.started { scan.token.as_ptr() as u64 } else { 0 },
                out_batch: out_token.as_mut_ptr() as u64,
                keys: scan.keys.as_mut_ptr() as u64,
                values: scan.values.as_mut_ptr() as u64,
                count: scan.chunk,
                map_fd: self.fd().as_raw_fd() as u32,
                elem_flags: 0,
                flags: 0,
            };
            let res = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
            let n = (attr.count as usize).min(cap);
            match res {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(libc::ENOENT) => scan.done = true,
                Err(e) if errno(&e) == Some(libc::ENOSPC) && scan.chunk < MAX_CHUNK => {
                    // One bucket is larger than the buffer: grow and retry from the same cursor.
                    scan.chunk = (scan.chunk * 2).min(MAX_CHUNK);
                    continue;
                }
                Err(e) => return Err(e),
            }
            // SAFETY: the kernel wrote `n` (<= capacity) whole keys and values into the buffers,
            // and any byte pattern is a valid `Pod`.
            unsafe {
                scan.keys.set_len(n);
                scan.values.set_len(n);
            }
            scan.token = out_token;
            scan.started = true;
            return Ok(());
        }
    }

    /// Delete `keys`. Keys already gone are skipped. Returns how many entries this call deleted.
    pub fn delete(&mut self, keys: &[K]) -> io::Result<usize> {
        if self.batch {
            match self.delete_batch(keys) {
                Ok(n) => return Ok(n),
                Err((0, e)) if is_unsupported(&e) => self.fall_back("delete", &e),
                Err((_, e)) => return Err(e),
            }
        }
        let mut deleted = 0;
        for k in keys {
            match self.map.remove(k) {
                Ok(()) => deleted += 1,
                Err(MapError::KeyNotFound) => {}
                Err(MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(map_err("deleting an entry", e)),
            }
        }
        Ok(deleted)
    }

    /// On error: how many keys were deleted before it, and the error.
    fn delete_batch(&self, keys: &[K]) -> Result<usize, (usize, io::Error)> {
        let mut deleted = 0;
        let mut rest = keys;
        while !rest.is_empty() {
            let n = rest.len().min(WRITE_CHUNK);
            let mut attr = BatchAttr {
                keys: rest.as_ptr() as u64,
                count: n as u32,
                map_fd: self.fd().as_raw_fd() as u32,
                ..Default::default()
            };
            let res = sys_bpf(BPF_MAP_DELETE_BATCH, &mut attr);
            let done = (attr.count as usize).min(n);
            match res {
                Ok(()) => {
                    deleted += done;
                    rest = &rest[n..];
                }
                // Key `done` is already gone: skip it, go on after it.
                Err(e) if errno(&e) == Some(libc::ENOENT) => {
                    deleted += done;
                    rest = &rest[done + 1..];
                }
                Err(e) => return Err((deleted, e)),
            }
        }
        Ok(deleted)
    }

    /// Insert or overwrite `keys[i] -> values[i]` with `flags` (`BPF_ANY` = 0, `BPF_NOEXIST`,
    /// `BPF_EXIST`). Returns how many were written; stops at the first error.
    pub fn update(&mut self, keys: &[K], values: &[V], flags: u64) -> io::Result<usize> {
        if keys.len() != values.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "keys and values differ in length"));
        }
        if self.batch {
            match self.update_batch(keys, values, flags) {
                Ok(n) => return Ok(n),
                Err((0, e)) if is_unsupported(&e) => self.fall_back("update", &e),
                Err((_, e)) => return Err(e),
            }
        }
        for (i, (k, v)) in keys.iter().zip(values).enumerate() {
            self.map.insert(k, v, flags).map_err(|e| map_err(&format!("writing entry {i}"), e))?;
        }
        Ok(keys.len())
    }

    fn update_batch(&self, keys: &[K], values: &[V], flags: u64) -> Result<usize, (usize, io::Error)> {
        update_chunks(self.fd().as_raw_fd(), keys, values, flags)
    }
}

/// Insert or overwrite `keys[i] -> values[i]` (`BPF_ANY`) in the hash map `map`, in order, with
/// `BPF_MAP_UPDATE_BATCH`. On error: how many were written before the failing key (which is
/// `keys[n]`; nothing after it was attempted), and the error. `K` and `V` must have the map's
/// key and value sizes (the kernel reads `count` of each): callers take them from an aya
/// `HashMap<_, K, V>`, which checked them when it was opened.
pub fn hash_update<K: Pod, V: Pod>(map: &MapData, keys: &[K], values: &[V]) -> Result<(), (usize, io::Error)> {
    hash_update_fd(map.fd().as_fd(), keys, values)
}

/// [`hash_update`] on the map's file descriptor, which (unlike `MapData`) can be handed to
/// another thread for the duration of a scoped write.
pub fn hash_update_fd<K: Pod, V: Pod>(fd: BorrowedFd<'_>, keys: &[K], values: &[V]) -> Result<(), (usize, io::Error)> {
    if keys.len() != values.len() {
        return Err((0, io::Error::new(io::ErrorKind::InvalidInput, "keys and values differ in length")));
    }
    update_chunks(fd.as_raw_fd(), keys, values, 0).map(|_| ())
}

/// `BPF_MAP_UPDATE_BATCH` of `keys[i] -> values[i]` into the map `fd`, in chunks, in order
/// (`elem_flags`: `BPF_ANY`, ...). Ok: how many were written; on error: how many were written
/// before the failing key, and the error.
fn update_chunks<K: Pod, V: Pod>(
    fd: std::os::fd::RawFd,
    keys: &[K],
    values: &[V],
    elem_flags: u64,
) -> Result<usize, (usize, io::Error)> {
    let mut written = 0;
    for (ks, vs) in keys.chunks(WRITE_CHUNK).zip(values.chunks(WRITE_CHUNK)) {
        let mut attr = BatchAttr {
            keys: ks.as_ptr() as u64,
            values: vs.as_ptr() as u64,
            count: ks.len() as u32,
            map_fd: fd as u32,
            elem_flags,
            ..Default::default()
        };
        let res = sys_bpf(BPF_MAP_UPDATE_BATCH, &mut attr);
        let done = (attr.count as usize).min(ks.len());
        if let Err(e) = res {
            return Err((written + done, e));
        }
        written += ks.len();
    }
    Ok(written)
}

/// Delete `keys` from the hash map `map`, in order, with `BPF_MAP_DELETE_BATCH`; a key already
/// gone is skipped (success). On error: how many keys were processed before the failing one
/// (`keys[n]`), and the error.
pub fn hash_delete<K: Pod>(map: &MapData, keys: &[K]) -> Result<(), (usize, io::Error)> {
    hash_delete_fd(map.fd().as_fd(), keys)
}

/// [`hash_delete`] on the map's file descriptor (see [`hash_update_fd`]).
pub fn hash_delete_fd<K: Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> Result<(), (usize, io::Error)> {
    let mut done_total = 0;
    while done_total < keys.len() {
        let rest = &keys[done_total..];
        let n = rest.len().min(WRITE_CHUNK);
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            count: n as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let res = sys_bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        let done = (attr.count as usize).min(n);
        match res {
            Ok(()) => done_total += n,
            // Key `done` is already gone: skip it, go on after it.
            Err(e) if errno(&e) == Some(libc::ENOENT) => done_total += done + 1,
            Err(e) => return Err((done_total + done, e)),
        }
    }
    Ok(())
}

/// Every entry of the hash map `map` with `BPF_MAP_LOOKUP_BATCH` (a few syscalls for the whole
/// map, where iterating costs two per entry). Not a snapshot (see the module docs); the agent
/// reads its own Service maps, which nothing else writes meanwhile.
pub fn hash_lookup_all<K: Pod, V: Pod>(map: &MapData) -> io::Result<(Vec<K>, Vec<V>)> {
    let mut keys: Vec<K> = Vec::new();
    let mut values: Vec<V> = Vec::new();
    let mut chunk: u32 = 16_384;
    let tlen = std::mem::size_of::<K>().max(8);
    let mut token = vec![0u8; tlen];
    let mut out_token = vec![0u8; tlen];
    let mut started = false;
    loop {
        let filled = keys.len();
        keys.reserve(chunk as usize);
        values.reserve(chunk as usize);
        let mut attr = BatchAttr {
            in_batch: if started { token.as_ptr() as u64 } else { 0 },
            out_batch: out_token.as_mut_ptr() as u64,
            // SAFETY of the pointers: `reserve` above left room for `chunk` more entries.
            keys: unsafe { keys.as_mut_ptr().add(filled) } as u64,
            values: unsafe { values.as_mut_ptr().add(filled) } as u64,
            count: chunk,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        let res = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = (attr.count as usize).min(chunk as usize);
        let last = match res {
            Ok(()) => false,
            Err(e) if errno(&e) == Some(libc::ENOENT) => true,
            Err(e) if errno(&e) == Some(libc::ENOSPC) && chunk < MAX_CHUNK => {
                // One bucket is larger than the buffer: grow and retry from the same cursor.
                chunk = (chunk * 2).min(MAX_CHUNK);
                continue;
            }
            Err(e) => return Err(e),
        };
        // SAFETY: the kernel wrote `n` (<= chunk) whole keys and values after the `filled` ones,
        // and any byte pattern is a valid `Pod`.
        unsafe {
            keys.set_len(filled + n);
            values.set_len(filled + n);
        }
        if last {
            return Ok((keys, values));
        }
        std::mem::swap(&mut token, &mut out_token);
        started = true;
    }
}

/// Write `values` to the entries `start, start + 1, ...` of the array map `map` (element size
/// `size_of::<V>()`) with `BPF_MAP_UPDATE_BATCH`. On error nothing says how far it got.
pub fn array_update<V: Pod>(map: &MapData, start: u32, values: &[V]) -> io::Result<()> {
    let end = u64::from(start) + values.len() as u64;
    if end > u64::from(u32::MAX) + 1 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "array indexes past u32::MAX"));
    }
    let keys: Vec<u32> = (0..values.len() as u32).map(|i| start + i).collect();
    for (ks, vs) in keys.chunks(WRITE_CHUNK).zip(values.chunks(WRITE_CHUNK)) {
        let mut attr = BatchAttr {
            keys: ks.as_ptr() as u64,
            values: vs.as_ptr() as u64,
            count: ks.len() as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        sys_bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
        if attr.count as usize != ks.len() {
            return Err(io::Error::other(format!(
                "batch update wrote {} of {} entries",
                attr.count,
                ks.len()
            )));
        }
    }
    Ok(())
}

/// Read the `count` entries `start, start + 1, ...` of the array map `map` (element size
/// `size_of::<V>()`) with `BPF_MAP_LOOKUP_BATCH`.
pub fn array_lookup<V: Pod>(map: &MapData, start: u32, count: u32) -> io::Result<Vec<V>> {
    let mut keys: Vec<u32> = Vec::with_capacity(count as usize);
    let mut values: Vec<V> = Vec::with_capacity(count as usize);
    // The cursor is the last key read: the walk continues after it.
    let mut prev: u32 = start.wrapping_sub(1);
    let mut out_token: u32 = 0;
    let mut started = start > 0;
    while (values.len() as u32) < count {
        let want = (count - values.len() as u32).min(MAX_CHUNK);
        let filled = values.len();
        let mut attr = BatchAttr {
            in_batch: if started { &prev as *const u32 as u64 } else { 0 },
            out_batch: &mut out_token as *mut u32 as u64,
            // SAFETY of the pointers: `reserve` below leaves room for `want` more entries.
            keys: 0,
            values: 0,
            count: want,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        keys.reserve(want as usize);
        values.reserve(want as usize);
        // SAFETY: pointers into the spare capacity reserved above.
        attr.keys = unsafe { keys.as_mut_ptr().add(filled) } as u64;
        attr.values = unsafe { values.as_mut_ptr().add(filled) } as u64;
        let res = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = (attr.count as usize).min(want as usize);
        // SAFETY: the kernel wrote `n` whole keys and values after the `filled` ones, and any
        // byte pattern is a valid `Pod`.
        unsafe {
            keys.set_len(filled + n);
            values.set_len(filled + n);
        }
        match res {
            Ok(()) => {}
            // The end of the array: fine only if everything asked for was read.
            Err(e) if errno(&e) == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
        if n == 0 {
            break;
        }
        prev = out_token;
        started = true;
    }
    if values.len() as u32 != count || keys.first().is_some_and(|k| *k != start) {
        return Err(io::Error::other(format!(
            "batch lookup read {} of {count} entries from {start}",
            values.len()
        )));
    }
    Ok(values)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::fd::{FromRawFd, OwnedFd};

    use super::*;

    #[test]
    fn attr_matches_the_kernel_layout() {
        // struct { in_batch, out_batch, keys, values: u64; count, map_fd: u32; elem_flags, flags: u64 }
        assert_eq!(std::mem::size_of::<BatchAttr>(), 56);
        assert_eq!(std::mem::offset_of!(BatchAttr, count), 32);
        assert_eq!(std::mem::offset_of!(BatchAttr, map_fd), 36);
        assert_eq!(std::mem::offset_of!(BatchAttr, elem_flags), 40);
        assert_eq!(std::mem::offset_of!(BatchAttr, flags), 48);
    }

    #[test]
    fn unsupported_errors_are_told_apart() {
        for e in [libc::EINVAL, libc::EOPNOTSUPP, ENOTSUPP] {
            assert!(is_unsupported(&io::Error::from_raw_os_error(e)), "{e}");
        }
        for e in [libc::ENOENT, libc::ENOSPC, libc::EPERM, libc::EFAULT] {
            assert!(!is_unsupported(&io::Error::from_raw_os_error(e)), "{e}");
        }
    }

    #[test]
    fn scan_token_fits_any_cursor() {
        assert_eq!(Scan::<u32, u64>::new(0).token.len(), 8);
        assert_eq!(Scan::<[u8; 16], u64>::new(10).token.len(), 16);
        assert_eq!(Scan::<u32, u64>::new(0).chunk, 1);
    }

    /// A plain hash (or LRU hash) map created with BPF_MAP_CREATE: exercises the syscalls without
    /// the eBPF object. Needs root (or CAP_BPF).
    fn create(map_type: u32, max_entries: u32) -> io::Result<BatchMap<u64, u64>> {
        BatchMap::new(Map::from_map_data(create_data(map_type, max_entries)?).map_err(|e| map_err("map", e))?)
    }

    /// [`create`]'s map (`u64` keys and values) as aya's `MapData`, for other modules' tests.
    pub(crate) fn create_data(map_type: u32, max_entries: u32) -> io::Result<MapData> {
        #[repr(C)]
        #[derive(Default)]
        struct CreateAttr {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            map_flags: u32,
        }
        let attr = CreateAttr { map_type, key_size: 8, value_size: 8, max_entries, map_flags: 0 };
        // SAFETY: a valid BPF_MAP_CREATE attribute prefix of the size given.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                0 as libc::c_long,
                &attr as *const CreateAttr,
                std::mem::size_of::<CreateAttr>(),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        MapData::from_fd(fd).map_err(|e| map_err("from_fd", e))
    }

    fn read_all(m: &mut BatchMap<u64, u64>, chunk: u32) -> Vec<(u64, u64)> {
        let mut scan = Scan::new(chunk);
        let mut all = Vec::new();
        let mut steps = 0;
        while m.next_chunk(&mut scan).unwrap() {
            all.extend(scan.keys().iter().copied().zip(scan.values().iter().copied()));
            steps += 1;
            assert!(steps < 100_000, "the walk does not end");
        }
        all.sort_unstable();
        all
    }

    fn exercise(map_type: u32, per_entry: bool) {
        let mut m = create(map_type, 8192).expect("creating a BPF map (needs root)");
        if per_entry {
            m.force_per_entry();
        }
        assert_eq!(m.max_entries().unwrap(), 8192);
        assert!(read_all(&mut m, 16).is_empty());
        let keys: Vec<u64> = (0..5000).collect();
        let values: Vec<u64> = keys.iter().map(|k| k * 10).collect();
        assert_eq!(m.update(&keys, &values, 0).unwrap(), 5000);
        // Tiny chunks force ENOSPC growth on multi-entry buckets; big ones end with ENOENT.
        for chunk in [1, 7, 4096, 100_000] {
            let all = read_all(&mut m, chunk);
            assert_eq!(all.len(), 5000, "chunk {chunk}");
            assert!(all.iter().all(|(k, v)| *v == k * 10));
        }
        // Deleting evens plus keys that were never there (skipped, not an error).
        let doomed: Vec<u64> = (0..5000).filter(|k| k % 2 == 0).chain(10_000..10_010).collect();
        assert_eq!(m.delete(&doomed).unwrap(), 2500);
        assert_eq!(m.delete(&doomed).unwrap(), 0);
        let all = read_all(&mut m, 64);
        assert_eq!(all.len(), 2500);
        assert!(all.iter().all(|(k, _)| k % 2 == 1));
        assert_eq!(m.batched(), !per_entry);
    }

    #[test]
    #[ignore = "needs root"]
    fn hash_update_delete_and_lookup_all_in_order() {
        let m = create(1, 4096).unwrap(); // BPF_MAP_TYPE_HASH
        let map = m.map.map();
        let keys: Vec<u64> = (0..3000).collect();
        let values: Vec<u64> = keys.iter().map(|k| k * 10).collect();
        hash_update(map, &keys, &values).unwrap();
        // A later write of the same key in one batch wins: keys are processed in order.
        hash_update(map, &[7u64, 7], &[1u64, 2]).unwrap();
        let (mut k, v) = hash_lookup_all::<u64, u64>(map).unwrap();
        let mut all: Vec<(u64, u64)> = k.iter().copied().zip(v).collect();
        all.sort_unstable();
        k.sort_unstable();
        assert_eq!(k, keys);
        assert_eq!(all[7], (7, 2));
        assert_eq!(all[2999], (2999, 29990));
        // Deleting keys that are gone is success, and the others still go.
        hash_delete(map, &[5u64, 5, 100_000, 6]).unwrap();
        let (k, _) = hash_lookup_all::<u64, u64>(map).unwrap();
        assert_eq!(k.len(), 2998);
        assert!(!k.contains(&5) && !k.contains(&6));
        // A full map: the batch stops at the first key that does not fit and says where.
        let more: Vec<u64> = (10_000..12_000).collect();
        let (n, e) = hash_update::<u64, u64>(map, &more, &more).unwrap_err();
        assert_eq!(n, 4096 - 2998, "{e}");
        // An empty map reads as empty.
        let empty = create(1, 16).unwrap();
        assert!(hash_lookup_all::<u64, u64>(empty.map.map()).unwrap().0.is_empty());
    }

    #[test]
    #[ignore = "needs root"]
    fn batch_ops_on_a_hash_map() {
        exercise(1, false); // BPF_MAP_TYPE_HASH
    }

    #[test]
    #[ignore = "needs root"]
    fn batch_ops_on_an_lru_hash_map() {
        exercise(9, false); // BPF_MAP_TYPE_LRU_HASH
    }

    #[test]
    #[ignore = "needs root"]
    fn per_entry_fallback_does_the_same() {
        exercise(9, true);
    }

    /// An array map (`BPF_MAP_TYPE_ARRAY`, u32 -> u32) of `max_entries`. Needs root.
    fn create_array(max_entries: u32) -> io::Result<MapData> {
        #[repr(C)]
        struct CreateAttr {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            map_flags: u32,
        }
        let attr = CreateAttr { map_type: 2, key_size: 4, value_size: 4, max_entries, map_flags: 0 };
        // SAFETY: a valid BPF_MAP_CREATE attribute prefix of the size given.
        let fd = unsafe {
            libc::syscall(libc::SYS_bpf, 0 as libc::c_long, &attr as *const CreateAttr, std::mem::size_of::<CreateAttr>())
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        MapData::from_fd(fd).map_err(|e| map_err("from_fd", e))
    }

    #[test]
    #[ignore = "needs root"]
    fn array_batches_write_and_read_runs_of_entries() {
        let (m, tables) = (16_381u32, 3u32);
        let map = create_array(m * tables).expect("creating a BPF array (needs root)");
        for t in 0..tables {
            let values: Vec<u32> = (0..m).map(|i| t * 100_000 + i).collect();
            array_update(&map, t * m, &values).unwrap();
        }
        for t in [2, 0, 1] {
            let got: Vec<u32> = array_lookup(&map, t * m, m).unwrap();
            assert_eq!(got.len(), m as usize);
            assert!(got.iter().enumerate().all(|(i, v)| *v == t * 100_000 + i as u32), "table {t}");
        }
        // Runs that end at the last entry, or go past it.
        let tail: Vec<u32> = array_lookup(&map, m * tables - 5, 5).unwrap();
        assert_eq!(tail, (m - 5..m).map(|i| 200_000 + i).collect::<Vec<_>>());
        assert!(array_lookup::<u32>(&map, m * tables - 5, 6).is_err());
        assert!(array_update(&map, m * tables - 1, &[1u32, 2]).is_err());
    }
}

/// Zero the entries `keys` of the per-CPU array `map` (element size `value_size`, `cpus`
/// possible CPUs) with `BPF_MAP_UPDATE_BATCH`: a per-CPU value in a batch is one slot of
/// `round_up(value_size, 8)` bytes per possible CPU. Used to start a Service port id's
/// counters from zero when the id gets a (new) name.
pub fn percpu_array_zero(map: &MapData, keys: &[u32], value_size: usize, cpus: usize) -> io::Result<()> {
    percpu_array_zero_fd(map.fd().as_fd(), keys, value_size, cpus)
}

/// [`percpu_array_zero`] on the map's file descriptor (see [`hash_update_fd`]).
pub fn percpu_array_zero_fd(fd: BorrowedFd<'_>, keys: &[u32], value_size: usize, cpus: usize) -> io::Result<()> {
    let stride = cpus.max(1) * value_size.div_ceil(8);
    // At most ~4 MiB of zeros per syscall.
    let per_chunk = (512 * 1024 / stride.max(1)).max(1);
    for ks in keys.chunks(per_chunk) {
        let zeros = vec![0u64; ks.len() * stride];
        let mut attr = BatchAttr {
            keys: ks.as_ptr() as u64,
            values: zeros.as_ptr() as u64,
            count: ks.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        sys_bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
    }
    Ok(())
}

/// Read entries `0..count` of the per-CPU array `map` (element size `value_size`, `cpus`
/// possible CPUs) with `BPF_MAP_LOOKUP_BATCH`: `count` runs of `cpus` slots of
/// `round_up(value_size, 8) / 8` words each (entry after entry, CPU after CPU). A handful of
/// syscalls for every Service port's counters, where a lookup per entry would be thousands.
pub fn percpu_array_lookup(map: &MapData, count: u32, value_size: usize, cpus: usize) -> io::Result<Vec<u64>> {
    let stride = cpus.max(1) * value_size.div_ceil(8);
    let mut keys = vec![0u32; count as usize];
    let mut words = vec![0u64; count as usize * stride];
    let chunk = ((1usize << 20) / stride.max(1)).max(1) as u32;
    let mut read: u32 = 0;
    let mut prev: u32 = 0;
    let mut token: u32 = 0;
    while read < count {
        let want = (count - read).min(chunk);
        let mut attr = BatchAttr {
            in_batch: if read > 0 { &prev as *const u32 as u64 } else { 0 },
            out_batch: &mut token as *mut u32 as u64,
            keys: keys[read as usize..].as_mut_ptr() as u64,
            values: words[read as usize * stride..].as_mut_ptr() as u64,
            count: want,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        let res = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = attr.count.min(want);
        read += n;
        match res {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
        if n == 0 {
            break;
        }
        prev = token;
    }
    if read != count {
        return Err(io::Error::other(format!("batch lookup read {read} of {count} per-CPU entries")));
    }
    Ok(words)
}
