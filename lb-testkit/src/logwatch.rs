//! Following a log file as it grows: an inotify watch wakes the reader the moment a process
//! appends to the file (or closes it, e.g. by exiting), and only the new complete lines are read.
//! So a test waiting for a log line reacts to the write itself, and a measured time to a log
//! line is not rounded up to a polling interval.

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{io_err, Result};

/// The lines appended to a file after a given offset, with a way to sleep until there are more.
#[derive(Debug)]
pub struct LogWatch {
    path: PathBuf,
    inotify: OwnedFd,
    offset: u64,
    partial: Vec<u8>,
}

impl LogWatch {
    /// Watch `path` (which must exist) for lines written after byte `offset`.
    pub fn new(path: &Path, offset: u64) -> Result<Self> {
        let what = format!("watching {}", path.display());
        // SAFETY: plain syscall; the descriptor is owned right below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io_err(what)(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let inotify = unsafe { OwnedFd::from_raw_fd(fd) };
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|e| io_err(what.clone())(std::io::Error::other(e)))?;
        // SAFETY: valid descriptor and NUL-terminated path.
        let wd = unsafe {
            libc::inotify_add_watch(
                inotify.as_raw_fd(),
                c_path.as_ptr(),
                libc::IN_MODIFY | libc::IN_CLOSE_WRITE,
            )
        };
        if wd < 0 {
            return Err(io_err(what)(std::io::Error::last_os_error()));
        }
        Ok(LogWatch {
            path: path.to_path_buf(),
            inotify,
            offset,
            partial: Vec::new(),
        })
    }

    /// The complete lines written since the last call (ANSI colour sequences removed).
    pub fn new_lines(&mut self) -> Result<Vec<String>> {
        let what = || format!("reading {}", self.path.display());
        let mut f = File::open(&self.path).map_err(io_err(what()))?;
        f.seek(SeekFrom::Start(self.offset))
            .map_err(io_err(what()))?;
        let mut buf = std::mem::take(&mut self.partial);
        let n = f.read_to_end(&mut buf).map_err(io_err(what()))?;
        self.offset += n as u64;
        let complete = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        self.partial = buf.split_off(complete);
        Ok(String::from_utf8_lossy(&buf)
            .lines()
            .map(strip_ansi)
            .collect())
    }

    /// Sleep until the file is written to or closed by a writer, or `timeout` passed.
    pub fn wait(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut pfd = libc::pollfd {
            fd: self.inotify.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                break;
            }
        }
        // Drain the events: the file itself says what changed.
        let mut events = [0u8; 4096];
        // SAFETY: valid descriptor (non-blocking) and buffer.
        while unsafe {
            libc::read(
                self.inotify.as_raw_fd(),
                events.as_mut_ptr().cast(),
                events.len(),
            )
        } > 0
        {}
    }
}

/// `s` without ANSI colour sequences (ESC '[' ... final letter).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn wakes_on_appended_lines_and_keeps_partial_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "before\n").unwrap();
        let mut w = LogWatch::new(&path, 7).unwrap();
        assert!(w.new_lines().unwrap().is_empty());
        let writer = std::thread::spawn({
            let path = path.clone();
            move || {
                let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
                f.write_all(b"\x1b[32m INFO\x1b[0m agent ready\nhalf")
                    .unwrap();
            }
        });
        // Woken by the write (the timeout only bounds a failure).
        let mut lines = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while lines.is_empty() && Instant::now() < deadline {
            w.wait(Duration::from_secs(10));
            lines = w.new_lines().unwrap();
        }
        writer.join().unwrap();
        assert_eq!(lines, [" INFO agent ready"]);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b" a line\n")
            .unwrap();
        assert_eq!(w.new_lines().unwrap(), ["half a line"]);
    }
}
