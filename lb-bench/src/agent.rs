//! The `xlb agent` process under measurement.
//!
//! Like lb-testkit's `Agent`, but timed from spawn to "agent ready" with a caller-chosen deadline
//! (10k Services / 100k endpoints may need longer than a test's 30 s), with its resident memory
//! and the duration it logged for the first map update. Dropping it kills the agent and runs
//! `xlb cleanup`, which detaches the programs and removes the pins.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use lb_testkit::NetNs;

const READY_MARKER: &str = "agent ready";

pub struct AgentProc {
    child: Child,
    pin: PathBuf,
    log: PathBuf,
    /// Spawn to "agent ready".
    pub ready_after: Duration,
}

impl AgentProc {
    /// Spawn `xlb agent --manifests DIR` in `netns` and wait (up to `timeout`) until it is ready.
    pub fn start(
        netns: &NetNs,
        manifests: &Path,
        pin: &Path,
        log: &Path,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let bin = lb_testkit::xlb_bin()?;
        std::fs::create_dir_all(pin).with_context(|| format!("creating {}", pin.display()))?;
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = lb_testkit::netns::command_in(netns.name(), &bin)?;
        cmd.arg("agent")
            .arg("--manifests")
            .arg(manifests)
            .arg("--pin-path")
            .arg(pin)
            .args(["--pod-devices", "xp*", "--metrics-addr", "none"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(out));
        let started = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut agent = AgentProc {
            child,
            pin: pin.to_path_buf(),
            log: log.to_path_buf(),
            ready_after: Duration::ZERO,
        };
        loop {
            if agent.log_text().contains(READY_MARKER) {
                agent.ready_after = started.elapsed();
                return Ok(agent);
            }
            if let Some(status) = agent.child.try_wait()? {
                bail!(
                    "xlb agent exited with {status} before ready:\n{}",
                    agent.log_tail()
                );
            }
            if started.elapsed() > timeout {
                bail!(
                    "xlb agent not ready after {timeout:?}:\n{}",
                    agent.log_tail()
                );
            }
            crate::interrupt::check()?;
            // Fine-grained: this poll bounds the precision of the cold-start figure.
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Resident memory now, MiB.
    pub fn rss_mib(&self) -> Option<f64> {
        rss_mib(self.child.id())
    }

    /// Duration of the first map update the agent logged ("maps updated ... micros=N").
    pub fn first_apply(&self) -> Option<Duration> {
        first_apply_micros(&self.log_text()).map(Duration::from_micros)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Err(e) = lb_testkit::agent::cleanup_pins(&self.pin) {
            eprintln!("cleanup of {}: {e}", self.pin.display());
        }
    }
}

/// Resident memory of process `pid`, MiB.
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// `micros=N` of the first "maps updated" line of an agent log.
fn first_apply_micros(log: &str) -> Option<u64> {
    let log = strip_ansi(log);
    let line = log.lines().find(|l| l.contains("maps updated"))?;
    let rest = &line[line.find("micros=")? + "micros=".len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The text without ANSI colour sequences (ESC '[' ... final letter).
fn strip_ansi(s: &str) -> String {
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

    #[test]
    fn parses_the_first_apply_duration_and_own_rss() {
        let log = "x INFO datapath loaded\nx INFO maps updated ops=12 frontends=3 backends=4 micros=1534\n\
                   x INFO agent ready\nx INFO maps updated ops=1 micros=9\n";
        assert_eq!(first_apply_micros(log), Some(1534));
        assert_eq!(first_apply_micros("agent ready"), None);
        let coloured = "\x1b[32m INFO\x1b[0m maps updated \x1b[3mmicros\x1b[0m\x1b[2m=\x1b[0m77\n";
        assert_eq!(first_apply_micros(coloured), Some(77));
        let me = rss_mib(std::process::id()).unwrap();
        assert!(me > 0.1 && me < 10_000.0, "{me}");
    }
}
