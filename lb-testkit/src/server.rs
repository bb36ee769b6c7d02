//! serve-hostname, like Kubernetes' serve_hostname image the tutorials use, extended so tests can
//! prove which pod a long-lived connection talks to. Each TCP port has a [`TcpMode`]:
//! - [`TcpMode::Converse`] (the tests' default): on accept write "<podname>\n", then answer every
//!   received line with "<podname> <line>\n" until EOF; the line "close" makes the server close
//!   the connection first (no answer), so a client can end a connection without its own socket
//!   going through TIME_WAIT;
//! - [`TcpMode::Greet`]: write "<podname>\n" and close, from the accepting thread itself (no
//!   thread per connection), so a connection-rate or latency measurement sees the network path;
//! - [`TcpMode::Sink`]: read and discard until EOF (a throughput sink).
//!
//! UDP ports answer each datagram with "<podname>".
//!
//! It can record the source address of every connection and datagram (a test asserts the backend
//! saw the client pod's own IP, i.e. no SNAT). Sockets are bound inside the pod's namespace and
//! then served from ordinary threads that block in accept(2) / recv(2) / read(2): nothing polls.
//! Dropping the server shuts every socket down, which wakes those threads, and joins them.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{io_err, Result};
use crate::netns::NetNs;

/// Back-off after a failed accept / recv that is not the server stopping (e.g. EMFILE).
const ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// What a TCP port does with each connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpMode {
    /// The greeting, then an answer per line until EOF or "close" (a thread per connection).
    Converse,
    /// The greeting, then close, answered by the accepting thread.
    Greet,
    /// Read and discard until EOF (a thread per connection).
    Sink,
}

/// The ports of a server and what each does.
#[derive(Clone, Debug, Default)]
pub struct ServeSpec {
    pub tcp: Vec<(u16, TcpMode)>,
    pub udp: Vec<u16>,
    /// Keep the source address of every connection and datagram ([`ServeHostname::peers`]).
    /// Off under load: the list grows by one entry per connection.
    pub record_peers: bool,
}

impl ServeSpec {
    /// serve-hostname as the tests use it: [`TcpMode::Converse`] on every TCP port, peers recorded.
    pub fn hostname(tcp_ports: &[u16], udp_ports: &[u16]) -> Self {
        ServeSpec {
            tcp: tcp_ports.iter().map(|&p| (p, TcpMode::Converse)).collect(),
            udp: udp_ports.to_vec(),
            record_peers: true,
        }
    }
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    record_peers: bool,
    peers: Mutex<Vec<SocketAddr>>,
    /// Open connections of the per-connection threads, shut down on stop to wake their reads.
    /// Registered and stopped under this lock, so no connection is missed.
    conns: Mutex<HashMap<u64, Arc<TcpStream>>>,
    next_conn: AtomicU64,
}

impl Shared {
    fn record(&self, peer: SocketAddr) {
        if self.record_peers {
            self.peers.lock().unwrap().push(peer);
        }
    }
}

/// A running serve-hostname; stops (joining its threads) on drop.
pub struct ServeHostname {
    shared: Arc<Shared>,
    /// Kept open until the threads are joined, so shutting them down on drop cannot hit a
    /// descriptor number that was reused.
    listeners: Vec<Arc<TcpListener>>,
    udp: Vec<Arc<UdpSocket>>,
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
    tcp: Vec<(TcpListener, TcpMode)>,
    udp: Vec<UdpSocket>,
    record_peers: bool,
}

/// Bind 0.0.0.0 on each port of `spec` in the current thread's network namespace.
pub fn bind_spec(spec: &ServeSpec) -> Result<Bound> {
    let any = Ipv4Addr::UNSPECIFIED;
    let tcp = spec
        .tcp
        .iter()
        .map(|&(p, mode)| {
            TcpListener::bind((any, p))
                .map(|l| (l, mode))
                .map_err(io_err(format!("binding TCP port {p}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let udp = spec
        .udp
        .iter()
        .map(|&p| UdpSocket::bind((any, p)).map_err(io_err(format!("binding UDP port {p}"))))
        .collect::<Result<Vec<_>>>()?;
    Ok(Bound {
        tcp,
        udp,
        record_peers: spec.record_peers,
    })
}

/// Bind serve-hostname's ports ([`ServeSpec::hostname`]) in the current thread's namespace.
pub fn bind(tcp_ports: &[u16], udp_ports: &[u16]) -> Result<Bound> {
    bind_spec(&ServeSpec::hostname(tcp_ports, udp_ports))
}

impl ServeHostname {
    /// Serve `name` on the given ports inside `ns` ([`ServeSpec::hostname`]).
    pub fn start(ns: &NetNs, name: &str, tcp_ports: &[u16], udp_ports: &[u16]) -> Result<Self> {
        Self::start_with(ns, name, &ServeSpec::hostname(tcp_ports, udp_ports))
    }

    /// Serve `name` inside `ns` as `spec` says.
    pub fn start_with(ns: &NetNs, name: &str, spec: &ServeSpec) -> Result<Self> {
        let bound = ns.run(|| bind_spec(spec))??;
        Self::serve(name, bound)
    }

    /// Serve already bound sockets.
    pub fn serve(name: &str, bound: Bound) -> Result<Self> {
        let shared = Arc::new(Shared {
            record_peers: bound.record_peers,
            ..Shared::default()
        });
        let mut server = ServeHostname {
            shared,
            listeners: Vec::new(),
            udp: Vec::new(),
            threads: Vec::new(),
        };
        let greeting: Arc<[u8]> = format!("{name}\n").into_bytes().into();
        for (l, mode) in bound.tcp {
            let l = Arc::new(l);
            server.listeners.push(l.clone());
            let (shared, name, greeting) =
                (server.shared.clone(), name.to_string(), greeting.clone());
            server.threads.push(std::thread::spawn(move || {
                accept_loop(&l, mode, &name, &greeting, &shared)
            }));
        }
        for s in bound.udp {
            let s = Arc::new(s);
            server.udp.push(s.clone());
            let (shared, name) = (server.shared.clone(), name.to_string());
            server
                .threads
                .push(std::thread::spawn(move || udp_loop(&s, &name, &shared)));
        }
        Ok(server)
    }

    /// Source addresses seen so far, in arrival order (empty unless the spec records peers).
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
        {
            let conns = self.shared.conns.lock().unwrap();
            self.shared.stop.store(true, Ordering::SeqCst);
            for c in conns.values() {
                shutdown(c.as_ref());
            }
        }
        // A blocked accept(2) returns EINVAL, a blocked recv(2) returns at once.
        for l in &self.listeners {
            shutdown(l.as_ref());
        }
        for s in &self.udp {
            shutdown(s.as_ref());
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// shutdown(2) both directions; wakes every thread blocked on the socket. On an unconnected UDP
/// socket it reports ENOTCONN but still wakes a blocked receiver, which is all it is used for.
fn shutdown(fd: &impl AsRawFd) {
    // SAFETY: the descriptor is owned by a live socket object; shutdown does not close it.
    unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
}

fn accept_loop(l: &TcpListener, mode: TcpMode, name: &str, greeting: &[u8], shared: &Arc<Shared>) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    loop {
        let accepted = l.accept();
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let (mut stream, peer) = match accepted {
            Ok(a) => a,
            // A connection reset before it was accepted concerns that connection only.
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                ) =>
            {
                continue
            }
            Err(e) => {
                tracing::warn!(error = %e, "serve-hostname accept");
                std::thread::sleep(ERROR_BACKOFF);
                continue;
            }
        };
        shared.record(peer);
        if mode == TcpMode::Greet {
            if let Err(e) = stream.write_all(greeting) {
                tracing::debug!(error = %e, "serve-hostname greeting");
            }
            continue;
        }
        let Some((id, stream)) = register(shared, stream) else {
            break;
        };
        let (shared, name) = (shared.clone(), name.to_string());
        conns.push(std::thread::spawn(move || {
            let r = match mode {
                TcpMode::Converse => converse(&stream, &name),
                _ => sink(&stream),
            };
            if let Err(e) = r {
                tracing::debug!(error = %e, "serve-hostname connection ended");
            }
            // The registry's reference goes last: only then is the socket closed (FIN).
            shared.conns.lock().unwrap().remove(&id);
        }));
        conns.retain(|c| !c.is_finished());
    }
    for c in conns {
        let _ = c.join();
    }
}

/// Add a connection to the registry, unless the server is stopping.
fn register(shared: &Shared, stream: TcpStream) -> Option<(u64, Arc<TcpStream>)> {
    let mut conns = shared.conns.lock().unwrap();
    if shared.stop.load(Ordering::SeqCst) {
        return None;
    }
    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let stream = Arc::new(stream);
    conns.insert(id, stream.clone());
    Some((id, stream))
}

fn converse(stream: &TcpStream, name: &str) -> std::io::Result<()> {
    let mut w = stream;
    w.write_all(format!("{name}\n").as_bytes())?;
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 || line == "close\n" {
            return Ok(());
        }
        if line.ends_with('\n') {
            w.write_all(format!("{name} {}\n", line.trim_end()).as_bytes())?;
        }
    }
}

fn sink(mut stream: &TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    while stream.read(&mut buf)? > 0 {}
    Ok(())
}

fn udp_loop(s: &UdpSocket, name: &str, shared: &Shared) {
    let mut buf = [0u8; 2048];
    loop {
        // nix, not `UdpSocket::recv_from`: after the shutdown(2) in `Drop` recvfrom(2) returns
        // with no address, which std asserts against (a panic message in every test's output).
        let received = nix::sys::socket::recvfrom::<nix::sys::socket::SockaddrIn>(s.as_raw_fd(), &mut buf);
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        match received {
            Ok((_, None)) => std::thread::sleep(ERROR_BACKOFF),
            Ok((_, Some(peer))) => {
                let peer = SocketAddr::V4(peer.into());
                shared.record(peer);
                let _ = s.send_to(name.as_bytes(), peer);
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::debug!(error = %e, "serve-hostname udp");
                std::thread::sleep(ERROR_BACKOFF);
            }
        }
    }
}
