//! Polling helpers: the datapath converges asynchronously (inotify -> agent -> maps), so tests wait
//! for an observable condition with a deadline instead of sleeping a fixed time.

use std::time::{Duration, Instant};

/// Poll `cond` every `poll` until it returns true or `timeout` elapses. Returns whether it held.
pub fn wait_until(timeout: Duration, poll: Duration, mut cond: impl FnMut() -> bool) -> bool {
    wait_for(timeout, poll, || cond().then_some(())).is_some()
}

/// Poll `f` every `poll` until it returns `Some`, or `None` after `timeout`.
pub fn wait_for<T>(
    timeout: Duration,
    poll: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(poll);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gives_up_after_timeout_and_returns_early_on_success() {
        let start = Instant::now();
        assert!(!wait_until(
            Duration::from_millis(50),
            Duration::from_millis(5),
            || { false }
        ));
        assert!(start.elapsed() >= Duration::from_millis(50));
        let mut n = 0;
        assert_eq!(
            wait_for(Duration::from_secs(5), Duration::from_millis(1), || {
                n += 1;
                (n == 3).then_some(n)
            }),
            Some(3)
        );
    }
}
