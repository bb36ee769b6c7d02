//! Traffic for the datapath measurements: what each backend pod serves (lb-testkit's server, with
//! a greeting port and a sink), and the clients (connection rate + latency, one long stream)
//! running in the client pod.
//!
//! The greeting port answers from the accepting thread, which blocks in accept(2), writes the pod
//! name and closes ([`TcpMode::Greet`]): no thread per connection and no polling, so what is
//! measured is the network path. Peers are not recorded (a list growing by one entry per
//! connection would colour the latency tail).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use lb_testkit::{NetNs, ServeSpec, TcpMode};
use serde::{Deserialize, Serialize};

use crate::stats::Latency;

/// Port of the greeting server (one line, then close).
pub const GREET_PORT: u16 = 8080;
/// Port of the sink (reads and discards until EOF).
pub const SINK_PORT: u16 = 5001;
const IO_TIMEOUT: Duration = Duration::from_secs(1);

/// What every backend pod serves: the greeting on [`GREET_PORT`], the sink on [`SINK_PORT`].
pub fn servers() -> ServeSpec {
    ServeSpec {
        tcp: vec![(GREET_PORT, TcpMode::Greet), (SINK_PORT, TcpMode::Sink)],
        udp: vec![],
        record_peers: false,
    }
}

/// Close with RST (SO_LINGER 0): no TIME_WAIT, so ports and state do not pile up.
fn set_linger0(s: &TcpStream) {
    let lg = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket, correctly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &lg as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

/// One request: connect, read the greeting line, close with RST. Returns the greeting.
pub fn request(addr: SocketAddr) -> std::io::Result<String> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    set_linger0(&s);
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut buf = [0u8; 128];
    let mut got = 0;
    while !buf[..got].contains(&b'\n') {
        let n = (&s).read(&mut buf[got..])?;
        if n == 0 || got + n == buf.len() {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                "no greeting line",
            ));
        }
        got += n;
    }
    Ok(String::from_utf8_lossy(&buf[..got]).trim_end().to_string())
}

/// New connections per second and request latency of one sequential client.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConnResult {
    pub conns_per_s: f64,
    pub latency: Latency,
    pub requests: usize,
    pub errors: usize,
}

/// Untimed requests before each measured point.
pub const WARM_UP: usize = 50;

/// Sequential fresh-connection requests from `client` to `addr` for `duration` (at most `max`
/// requests), after an untimed warm-up ([`WARM_UP`] requests) that must succeed.
pub fn conn_rate(
    client: &NetNs,
    addr: SocketAddr,
    duration: Duration,
    max: usize,
) -> anyhow::Result<ConnResult> {
    client.run(|| -> anyhow::Result<ConnResult> {
        for i in 0..WARM_UP {
            request(addr).with_context(|| format!("warm-up request {i} to {addr}"))?;
        }
        let mut lat = Vec::with_capacity(max.min(1 << 20));
        let mut errors = 0;
        let started = Instant::now();
        while started.elapsed() < duration
            && lat.len() + errors < max
            && !crate::interrupt::interrupted()
        {
            let t = Instant::now();
            match request(addr) {
                Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1e6),
                Err(_) => errors += 1,
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        crate::interrupt::check()?;
        if lat.is_empty() {
            bail!("no successful request to {addr} ({errors} errors)");
        }
        Ok(ConnResult {
            conns_per_s: lat.len() as f64 / elapsed,
            latency: Latency::from_us(&lat).expect("non-empty"),
            requests: lat.len(),
            errors,
        })
    })?
}

/// Gbit/s of one TCP stream from `client` to the sink at `addr`, for `duration`.
pub fn stream(client: &NetNs, addr: SocketAddr, duration: Duration) -> anyhow::Result<f64> {
    client.run(|| -> anyhow::Result<f64> {
        let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        let buf = vec![0x5au8; 128 * 1024];
        let mut sent = 0u64;
        let started = Instant::now();
        while started.elapsed() < duration && !crate::interrupt::interrupted() {
            s.write_all(&buf).context("streaming")?;
            sent += buf.len() as u64;
        }
        let secs = started.elapsed().as_secs_f64();
        let _ = s.shutdown(Shutdown::Write);
        crate::interrupt::check()?;
        Ok(sent as f64 * 8.0 / secs / 1e9)
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[ignore = "needs root"]
    fn servers_answer_and_stop_on_loopback() {
        let _serial = crate::root_test();
        let ns = NetNs::create(&format!("xlbb{}-unit-traffic", std::process::id())).unwrap();
        let servers = lb_testkit::ServeHostname::start_with(&ns, "pod-a", &servers()).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], GREET_PORT));
        let r = conn_rate(&ns, addr, Duration::from_millis(200), 500).unwrap();
        assert!(r.requests > 10 && r.errors == 0, "{r:?}");
        assert!(r.latency.p50_us > 0.0 && r.latency.p99_us >= r.latency.p50_us);
        let g = ns.run(|| request(addr)).unwrap().unwrap();
        assert_eq!(g, "pod-a");
        let gbit = stream(
            &ns,
            SocketAddr::from(([127, 0, 0, 1], SINK_PORT)),
            Duration::from_millis(200),
        )
        .unwrap();
        assert!(gbit > 0.01, "{gbit}");
        drop(servers);
        // Stopped: nothing listens any more.
        assert!(ns.run(|| request(addr)).unwrap().is_err());
    }
}
