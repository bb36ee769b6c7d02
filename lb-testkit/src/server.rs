//! serve-hostname, like Kubernetes' serve_hostname image the tutorials use, extended so tests can
//! prove which pod a long-lived connection talks to:
//! - TCP: on accept write "<podname>\n", then answer every received line with "<podname> <line>\n"
//!   until EOF; the line "close" makes the server close the connection first (no answer), so a
//!   client can end a connection without its own socket going through TIME_WAIT;
//! - UDP: answer each datagram with "<podname>".
//!
//! It records the source address of every connection and datagram (a test asserts the backend saw
//! the client pod's own IP, i.e. no SNAT). Sockets are bound inside the pod's namespace and then
//! served from ordinary threads; everything stops when the server is dropped.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{io_err, Result};
use crate::netns::NetNs;

/// How often blocked threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    peers: Mutex<Vec<SocketAddr>>,
}

/// A running serve-hostname; stops (joining its threads) on drop.
pub struct ServeHostname {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for ServeHostname {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeHostname")
            .field("threads", &self.threads.len())
            .finish()
    }
}

/// Sockets bound for serve-hostname (in whatever namespace the binding thread was in).
pub struct Bound {
    tcp: Vec<TcpListener>,
    udp: Vec<UdpSocket>,
}

/// Bind 0.0.0.0 on each port in the current thread's network namespace.
pub fn bind(tcp_ports: &[u16], udp_ports: &[u16]) -> Result<Bound> {
    let any = Ipv4Addr::UNSPECIFIED;
    let tcp = tcp_ports
        .iter()
        .map(|&p| TcpListener::bind((any, p)).map_err(io_err(format!("binding TCP port {p}"))))
        .collect::<Result<Vec<_>>>()?;
    let udp = udp_ports
        .iter()
        .map(|&p| UdpSocket::bind((any, p)).map_err(io_err(format!("binding UDP port {p}"))))
        .collect::<Result<Vec<_>>>()?;
    Ok(Bound { tcp, udp })
}

impl ServeHostname {
    /// Serve `name` on the given ports inside `ns`.
    pub fn start(ns: &NetNs, name: &str, tcp_ports: &[u16], udp_ports: &[u16]) -> Result<Self> {
        let bound = ns.run(|| bind(tcp_ports, udp_ports))??;
        Self::serve(name, bound)
    }

    /// Serve already bound sockets.
    pub fn serve(name: &str, bound: Bound) -> Result<Self> {
        let shared = Arc::new(Shared::default());
        let mut threads = Vec::new();
        for l in bound.tcp {
            l.set_nonblocking(true)
                .map_err(io_err("listener nonblocking"))?;
            let (shared, name) = (shared.clone(), name.to_string());
            threads.push(std::thread::spawn(move || accept_loop(l, &name, &shared)));
        }
        for s in bound.udp {
            s.set_read_timeout(Some(POLL))
                .map_err(io_err("udp read timeout"))?;
            let (shared, name) = (shared.clone(), name.to_string());
            threads.push(std::thread::spawn(move || udp_loop(s, &name, &shared)));
        }
        Ok(ServeHostname { shared, threads })
    }

    /// Source addresses seen so far, in arrival order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.shared.peers.lock().unwrap().clone()
    }

    /// Serve until the process ends (the demo's pod processes).
    pub fn wait_forever(self) -> ! {
        loop {
            std::thread::park();
        }
    }
}

impl Drop for ServeHostname {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn accept_loop(l: TcpListener, name: &str, shared: &Arc<Shared>) {
    let mut conns = Vec::new();
    while !shared.stop.load(Ordering::SeqCst) {
        match l.accept() {
            Ok((stream, peer)) => {
                shared.peers.lock().unwrap().push(peer);
                let (shared, name) = (shared.clone(), name.to_string());
                conns.push(std::thread::spawn(move || {
                    if let Err(e) = serve_conn(stream, &name, &shared) {
                        tracing::debug!(error = %e, "serve-hostname connection ended");
                    }
                }));
                conns.retain(|c: &JoinHandle<()>| !c.is_finished());
            }
            // Nothing to accept: wait for the next connection (or the stop flag's next look).
            Err(e) if e.kind() == ErrorKind::WouldBlock => wait_readable(&l, POLL),
            Err(e) => {
                tracing::warn!(error = %e, "serve-hostname accept");
                std::thread::sleep(POLL);
            }
        }
    }
    for c in conns {
        let _ = c.join();
    }
}

/// Block until `fd` is readable (for a listener: a connection is waiting) or `timeout` passed.
fn wait_readable(fd: &impl AsRawFd, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; the result only decides when to try accept() again.
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
}

fn serve_conn(stream: TcpStream, name: &str, shared: &Shared) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(POLL))?;
    let mut w = stream.try_clone()?;
    w.write_all(format!("{name}\n").as_bytes())?;
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        match r.read_line(&mut line) {
            Ok(0) => return Ok(()),
            Ok(_) if line == "close\n" => return Ok(()),
            Ok(_) if line.ends_with('\n') => {
                w.write_all(format!("{name} {}\n", line.trim_end()).as_bytes())?;
                line.clear();
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e),
        }
    }
}

fn udp_loop(s: UdpSocket, name: &str, shared: &Shared) {
    let mut buf = [0u8; 2048];
    while !shared.stop.load(Ordering::SeqCst) {
        match s.recv_from(&mut buf) {
            Ok((_, peer)) => {
                shared.peers.lock().unwrap().push(peer);
                let _ = s.send_to(name.as_bytes(), peer);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => {
                tracing::debug!(error = %e, "serve-hostname udp");
                std::thread::sleep(POLL);
            }
        }
    }
}
