//! Waiting for the machine to be quiet before a timed cold start.
//!
//! Why: the kernel finishes tearing down what a run leaves behind after the run has returned.
//! Freeing the pinned maps of an agent (a preallocated conntrack table of 1M entries, per-CPU
//! maps) and the rules of a dropped network namespace runs in kernel workers for a second or
//! more (`vmstat` shows one of the 2 cores busy in the kernel after each cold start). A timed
//! start in that window shares the cores with it: on this VM a Kubernetes-source cold start of
//! 0.54 s read 0.83 s once. Both sides of the programming target (xlb's agent and the netfilter
//! restores) wait here first, so neither is timed against the cleanup of the one before.

use std::time::{Duration, Instant};

/// One sample window.
const WINDOW: Duration = Duration::from_millis(100);
/// Quiet windows in a row that count as settled.
const QUIET_WINDOWS: u32 = 3;
/// The busy share of all CPUs below which a window is quiet.
const QUIET_BUSY: f64 = 0.10;
/// Give up after this long (a machine that is never quiet is timed as it is).
const MAX_WAIT: Duration = Duration::from_secs(10);

/// CPU time counters of all CPUs together (the `cpu` line of /proc/stat), in clock ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct CpuTimes {
    /// Ticks spent idle or waiting for I/O.
    idle: u64,
    /// Every tick.
    total: u64,
}

impl CpuTimes {
    /// The aggregate `cpu` line of /proc/stat's text: user nice system idle iowait irq
    /// softirq steal (guest time is already counted in user).
    fn parse(stat: &str) -> Option<CpuTimes> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        if v.len() < 5 {
            return None;
        }
        Some(CpuTimes {
            idle: v[3] + v[4],
            total: v.iter().sum(),
        })
    }

    fn read() -> Option<CpuTimes> {
        CpuTimes::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// The busy share of the time between `self` and a later sample `then`.
    fn busy_until(self, then: CpuTimes) -> f64 {
        let total = then.total.saturating_sub(self.total);
        if total == 0 {
            return 0.0;
        }
        let idle = then.idle.saturating_sub(self.idle);
        1.0 - idle as f64 / total as f64
    }
}

/// Waits until the CPUs have been quiet for a few windows in a row (or [`MAX_WAIT`] passed);
/// returns how long it waited. Without /proc/stat it returns at once.
pub fn wait_quiet() -> Duration {
    let started = Instant::now();
    let Some(mut last) = CpuTimes::read() else {
        return Duration::ZERO;
    };
    let mut quiet = 0;
    while quiet < QUIET_WINDOWS && started.elapsed() < MAX_WAIT {
        std::thread::sleep(WINDOW);
        let Some(now) = CpuTimes::read() else { break };
        if last.busy_until(now) < QUIET_BUSY {
            quiet += 1;
        } else {
            quiet = 0;
        }
        last = now;
    }
    if quiet < QUIET_WINDOWS {
        tracing::warn!(
            waited_s = started.elapsed().as_secs_f64(),
            "the machine did not quiet down; timing anyway"
        );
    }
    started.elapsed()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  100 5 50 800 45 0 10 0 0 0\n\
                        cpu0 50 2 25 400 20 0 5 0 0 0\n\
                        intr 12345\n";

    #[test]
    fn the_aggregate_line_counts_idle_and_iowait_as_idle() {
        let t = CpuTimes::parse(STAT).unwrap();
        assert_eq!(
            t,
            CpuTimes {
                idle: 845,
                total: 1010
            }
        );
    }

    #[test]
    fn malformed_text_is_no_sample() {
        assert_eq!(CpuTimes::parse("intr 1\n"), None);
        assert_eq!(CpuTimes::parse("cpu  1 2 x 4 5\n"), None);
        assert_eq!(CpuTimes::parse("cpu  1 2 3\n"), None);
    }

    #[test]
    fn busy_share_is_of_the_ticks_between_two_samples() {
        let a = CpuTimes {
            idle: 800,
            total: 1000,
        };
        // 100 ticks later, 25 of them busy.
        let b = CpuTimes {
            idle: 875,
            total: 1100,
        };
        assert!((a.busy_until(b) - 0.25).abs() < 1e-9);
        assert_eq!(a.busy_until(a), 0.0);
    }

    #[test]
    fn the_live_counters_parse_and_a_wait_ends() {
        assert!(
            CpuTimes::read().is_some(),
            "/proc/stat has a cpu line on Linux"
        );
        assert!(wait_quiet() <= MAX_WAIT + Duration::from_secs(1));
    }
}
