//! Clients that run inside a pod's namespace. Errors distinguish "refused" (RST or ICMP port
//! unreachable: what a Service without endpoints must answer, at once) from "timeout" (a
//! blackhole) so tests can assert which one happened.
//!
//! Besides single requests there are bursts of short TCP connections ([`tcp_burst`]) with an
//! explicit source port and a chosen way of closing ([`Close`]), so a test can make a client
//! re-use the same 4-tuples for Service and direct connections deterministically, and UDP sockets
//! with a fixed source port ([`UdpConn`]) that keep talking as one flow.

use std::io::{self, BufRead, BufReader, ErrorKind, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::netns::NetNs;

/// Connect and read timeouts of the clients.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connection refused (TCP RST) or ECONNREFUSED from an ICMP port unreachable (UDP).
    #[error("connection refused")]
    Refused,
    /// No answer within the timeout.
    #[error("timed out")]
    Timeout,
    /// No route / host or network unreachable.
    #[error("unreachable: {0}")]
    Unreachable(io::Error),
    /// The peer closed the connection before answering.
    #[error("connection closed by peer")]
    Closed,
    /// Anything else (including failing to enter the namespace).
    #[error("{0}")]
    Other(String),
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            ErrorKind::ConnectionRefused => ClientError::Refused,
            ErrorKind::WouldBlock | ErrorKind::TimedOut => ClientError::Timeout,
            ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof | ErrorKind::BrokenPipe => {
                ClientError::Closed
            }
            ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => {
                ClientError::Unreachable(e)
            }
            _ => ClientError::Other(e.to_string()),
        }
    }
}

impl From<crate::Error> for ClientError {
    fn from(e: crate::Error) -> Self {
        ClientError::Other(e.to_string())
    }
}

impl ClientError {
    pub fn is_refused(&self) -> bool {
        matches!(self, ClientError::Refused)
    }
    pub fn is_timeout(&self) -> bool {
        matches!(self, ClientError::Timeout)
    }
}

/// Connect from `ns` to `addr` and return the first line the server sends (without newline).
pub fn tcp_request(ns: &NetNs, addr: SocketAddr) -> Result<String, ClientError> {
    let mut conn = TcpConn::open(ns, addr)?;
    Ok(std::mem::take(&mut conn.greeting))
}

/// Send one datagram from a connected UDP socket in `ns` and return the answer. Connected, so an
/// ICMP port unreachable surfaces as [`ClientError::Refused`].
pub fn udp_request(ns: &NetNs, addr: SocketAddr) -> Result<String, ClientError> {
    UdpConn::open(ns, None, addr)?.request()
}

/// A connected UDP socket (created in a pod's namespace), optionally bound to a fixed source
/// port: every request is a datagram of the same flow. An ICMP error for the flow surfaces as the
/// result of the next request ([`ClientError::Refused`] for port unreachable).
#[derive(Debug)]
pub struct UdpConn {
    sock: UdpSocket,
    local: SocketAddr,
}

impl UdpConn {
    /// Bind (port 0: any) and connect; requests wait [`TIMEOUT`] for their answer.
    pub fn open(ns: &NetNs, src_port: Option<u16>, addr: SocketAddr) -> Result<Self, ClientError> {
        let sock = ns.run(|| -> io::Result<UdpSocket> {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, src_port.unwrap_or(0)))?;
            s.connect(addr)?;
            Ok(s)
        })??;
        sock.set_read_timeout(Some(TIMEOUT))?;
        let local = sock.local_addr()?;
        Ok(UdpConn { sock, local })
    }

    /// The client's own address of this flow.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Send one datagram and return the answer (serve-hostname's pod name).
    pub fn request(&self) -> Result<String, ClientError> {
        self.request_with(b"hostname?")
    }

    /// [`UdpConn::request`] with the given payload (e.g. larger than the MTU: IP fragments).
    pub fn request_with(&self, payload: &[u8]) -> Result<String, ClientError> {
        self.sock.send(payload)?;
        let mut buf = [0u8; 2048];
        let n = self.sock.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_string())
    }
}

/// How a connection of a burst ends. It decides what the client's kernel keeps of the 4-tuple,
/// hence whether the next connection may use the same source port to the same destination at
/// once (connect() fails with EADDRNOTAVAIL while a socket of that 4-tuple exists).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Close {
    /// SO_LINGER 0: close() sends a RST and frees the socket at once (no TIME_WAIT anywhere), so
    /// the same 4-tuple can be connected again immediately.
    Rst,
    /// The client shuts down first (FIN) and reads the server's FIN. The client's socket then
    /// sits in TIME_WAIT for 60 s: that 4-tuple cannot be connected again meanwhile (the same
    /// port towards other destinations can, thanks to SO_REUSEADDR).
    Fin,
    /// The server closes first (serve-hostname's `close` line): the client reads EOF, sends its
    /// FIN and waits until the server's last ACK took its socket to CLOSED. The TIME_WAIT is on
    /// the server's side, which accepts a new SYN of the same 4-tuple with later timestamps
    /// (RFC 6191), so the client can connect the same 4-tuple again at once.
    ServerFin,
}

/// One short connection of a burst: connect (from `src_port`, or an ephemeral port), read the
/// greeting, close as `close` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dial {
    pub src_port: Option<u16>,
    pub dst: SocketAddr,
    pub close: Close,
}

/// Run `dials` one after the other from `ns` (one thread inside the namespace for the whole
/// burst): each result is the greeting (the answering pod's name) or why it failed. `timeout`
/// bounds the connect and every read. Stops early once `max_errors` dials failed (a blackhole
/// costs `timeout` per dial), so the result may be shorter than `dials`.
pub fn tcp_burst(
    ns: &NetNs,
    dials: &[Dial],
    timeout: Duration,
    max_errors: usize,
) -> Result<Vec<Result<String, ClientError>>, ClientError> {
    Ok(ns.run(|| {
        let mut out = Vec::with_capacity(dials.len());
        let mut errors = 0;
        for d in dials {
            let r = dial(d, timeout);
            errors += usize::from(r.is_err());
            out.push(r);
            if errors >= max_errors {
                break;
            }
        }
        out
    })?)
}

/// One dial from the calling thread's network namespace.
pub fn dial(d: &Dial, timeout: Duration) -> Result<String, ClientError> {
    let stream = connect_from(d.src_port, d.dst, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut reader = BufReader::new(&stream);
    let greeting = read_line(&mut reader)?;
    match d.close {
        Close::Rst => setsockopt(
            &stream,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        )?,
        Close::Fin => {
            stream.shutdown(Shutdown::Write)?;
            expect_eof(&mut reader)?;
        }
        Close::ServerFin => {
            (&stream).write_all(b"close\n")?;
            expect_eof(&mut reader)?;
            stream.shutdown(Shutdown::Write)?;
            wait_tcp_closed(&stream, timeout)?;
        }
    }
    Ok(greeting)
}

fn read_line(reader: &mut impl BufRead) -> Result<String, ClientError> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(ClientError::Closed);
    }
    Ok(line.trim_end_matches('\n').to_string())
}

fn expect_eof(reader: &mut impl BufRead) -> Result<(), ClientError> {
    let mut rest = String::new();
    match reader.read_line(&mut rest)? {
        0 => Ok(()),
        _ => Err(ClientError::Other(format!(
            "expected the server to close, got {rest:?}"
        ))),
    }
}

/// Linux `TCP_CLOSE` (`tcp_info.tcpi_state`).
const TCP_STATE_CLOSE: u8 = 7;

/// Wait until the socket reached CLOSED (our FIN was acknowledged), so its 4-tuple is free.
fn wait_tcp_closed(stream: &TcpStream, timeout: Duration) -> Result<(), ClientError> {
    let deadline = Instant::now() + timeout;
    loop {
        // SAFETY: tcp_info is plain old data; the kernel fills at most `len` bytes.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: valid descriptor, pointer and length of a live local.
        let r = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error().into());
        }
        if info.tcpi_state == TCP_STATE_CLOSE {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ClientError::Other(format!(
                "socket still in TCP state {} {timeout:?} after our FIN",
                info.tcpi_state
            )));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn setsockopt<T>(fd: &impl AsRawFd, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: `value` is a live reference of the size passed.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// A TCP connection from `src_port` (SO_REUSEADDR, so a port whose earlier socket is in
/// TIME_WAIT towards another destination can be bound) to `dst`, within `timeout`.
fn connect_from(
    src_port: Option<u16>,
    dst: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let SocketAddr::V4(dst) = dst else {
        return Err(io::Error::new(ErrorKind::InvalidInput, "IPv4 only"));
    };
    // SAFETY: socket(2) with constant arguments; the descriptor is owned right below.
    let raw = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    connect_socket(fd, src_port, dst, timeout)
}

/// Connect the TCP socket `fd` (made anywhere, e.g. by [`crate::cgroup::TestCgroup::socket`])
/// from `src_port` (SO_REUSEADDR) to `dst` within `timeout`; the stream is left blocking.
pub fn connect_socket(
    fd: OwnedFd,
    src_port: Option<u16>,
    dst: SocketAddrV4,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let raw = fd.as_raw_fd();
    // SAFETY: F_GETFL / F_SETFL on a valid descriptor.
    unsafe {
        let flags = libc::fcntl(raw, libc::F_GETFL);
        if flags < 0 || libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &1i32)?;
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    if let Some(port) = src_port {
        let local = sockaddr_in(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
        // SAFETY: valid descriptor and sockaddr_in of the given length.
        if unsafe { libc::bind(raw, (&local as *const libc::sockaddr_in).cast(), len) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let remote = sockaddr_in(dst);
    // SAFETY: as above.
    if unsafe { libc::connect(raw, (&remote as *const libc::sockaddr_in).cast(), len) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        let mut pfd = libc::pollfd {
            fd: raw,
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        match unsafe { libc::poll(&mut pfd, 1, ms) } {
            n if n < 0 => return Err(io::Error::last_os_error()),
            0 => return Err(io::Error::new(ErrorKind::TimedOut, "connect timed out")),
            _ => {}
        }
        let mut err: i32 = 0;
        let mut elen = std::mem::size_of::<i32>() as libc::socklen_t;
        // SAFETY: valid descriptor, pointer and length of a live local.
        let r = unsafe {
            libc::getsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut err as *mut i32).cast(),
                &mut elen,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err));
        }
    }
    let stream = TcpStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// A long-lived TCP connection (created in a pod's namespace) speaking serve-hostname's line
/// protocol.
#[derive(Debug)]
pub struct TcpConn {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    greeting: String,
    local: SocketAddr,
}

impl TcpConn {
    /// Connect (timeout [`TIMEOUT`]) and read the greeting line.
    pub fn open(ns: &NetNs, addr: SocketAddr) -> Result<Self, ClientError> {
        let stream = ns.run(|| TcpStream::connect_timeout(&addr, TIMEOUT))??;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        let local = stream.local_addr()?;
        let mut conn = TcpConn {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
            greeting: String::new(),
            local,
        };
        conn.greeting = conn.recv_line()?;
        Ok(conn)
    }

    /// The first line the server sent: serve-hostname's pod name.
    pub fn greeting(&self) -> &str {
        &self.greeting
    }

    /// The client's own address of this connection.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn send_line(&mut self, line: &str) -> Result<(), ClientError> {
        self.writer.write_all(format!("{line}\n").as_bytes())?;
        Ok(())
    }

    /// The next line (without newline); [`ClientError::Closed`] at EOF.
    pub fn recv_line(&mut self) -> Result<String, ClientError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(ClientError::Closed);
        }
        Ok(line.trim_end_matches('\n').to_string())
    }

    /// Send `line` and return the answer.
    pub fn request(&mut self, line: &str) -> Result<String, ClientError> {
        self.send_line(line)?;
        self.recv_line()
    }
}

/// A host-network client of a node: its sockets are made by a process in the node's network
/// namespace and in a test cgroup ([`crate::cgroup::TestCgroup::socket`]), so the socket load
/// balancer attached to that cgroup translates them, and nothing else on the machine is
/// touched. The test's own threads then use the sockets.
#[derive(Clone, Copy, Debug)]
pub struct HostClient<'a> {
    pub ns: &'a NetNs,
    pub cgroup: &'a crate::cgroup::TestCgroup,
}

/// What a host client got: the answer (serve-hostname's pod name) and who it came from as the
/// client's kernel reports it (getpeername(2) for connected sockets, the source address of
/// recvfrom(2) otherwise).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostAnswer {
    pub text: String,
    pub peer: SocketAddr,
}

impl<'a> HostClient<'a> {
    pub fn new(ns: &'a NetNs, cgroup: &'a crate::cgroup::TestCgroup) -> Self {
        HostClient { ns, cgroup }
    }

    fn socket(&self, ty: libc::c_int) -> Result<OwnedFd, ClientError> {
        Ok(self.cgroup.socket(self.ns, ty)?)
    }

    /// A TCP connection to `dst` (connect within `timeout`), with read / write timeouts of
    /// [`TIMEOUT`].
    pub fn tcp_connect(
        &self,
        dst: SocketAddr,
        timeout: Duration,
    ) -> Result<TcpStream, ClientError> {
        let SocketAddr::V4(dst) = dst else {
            return Err(ClientError::Other("IPv4 only".into()));
        };
        let stream = connect_socket(self.socket(libc::SOCK_STREAM)?, None, dst, timeout)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        Ok(stream)
    }

    /// Connect to `dst`, read the greeting line; the peer is getpeername(2).
    pub fn tcp_request(&self, dst: SocketAddr) -> Result<HostAnswer, ClientError> {
        let stream = self.tcp_connect(dst, TIMEOUT)?;
        let peer = stream.peer_addr()?;
        let text = read_line(&mut BufReader::new(&stream))?;
        Ok(HostAnswer { text, peer })
    }

    /// An unconnected UDP socket (bound to an ephemeral port on its first send), with a read
    /// timeout of [`TIMEOUT`].
    pub fn udp_socket(&self) -> Result<UdpSocket, ClientError> {
        let sock = UdpSocket::from(self.socket(libc::SOCK_DGRAM)?);
        sock.set_read_timeout(Some(TIMEOUT))?;
        Ok(sock)
    }

    /// One datagram from a new unconnected socket (sendto / recvfrom); the peer is the
    /// answer's source address.
    pub fn udp_request(&self, dst: SocketAddr) -> Result<HostAnswer, ClientError> {
        udp_exchange(&self.udp_socket()?, dst)
    }

    /// One datagram from a new socket connected to `dst`; the peer is getpeername(2), and the
    /// answer's source must be the same.
    pub fn udp_connected_request(&self, dst: SocketAddr) -> Result<HostAnswer, ClientError> {
        let sock = self.udp_socket()?;
        sock.connect(dst)?;
        let peer = sock.peer_addr()?;
        let answer = udp_exchange(&sock, dst)?;
        if answer.peer != peer {
            return Err(ClientError::Other(format!(
                "getpeername says {peer}, the answer came from {}",
                answer.peer
            )));
        }
        Ok(answer)
    }
}

/// Send one datagram to `dst` from `sock` and receive the answer with its source.
pub fn udp_exchange(sock: &UdpSocket, dst: SocketAddr) -> Result<HostAnswer, ClientError> {
    sock.send_to(b"hostname?", dst)?;
    let mut buf = [0u8; 2048];
    let (n, peer) = sock.recv_from(&mut buf)?;
    Ok(HostAnswer {
        text: String::from_utf8_lossy(&buf[..n]).trim_end().to_string(),
        peer,
    })
}
