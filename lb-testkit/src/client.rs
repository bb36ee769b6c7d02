//! Clients that run inside a pod's namespace. Errors distinguish "refused" (RST or ICMP port
//! unreachable: what a Service without endpoints must answer, at once) from "timeout" (a
//! blackhole) so tests can assert which one happened.

use std::io::{self, BufRead, BufReader, ErrorKind, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

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
    ns.run(|| -> Result<String, ClientError> {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        s.connect(addr)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.send(b"hostname?")?;
        let mut buf = [0u8; 2048];
        let n = s.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_string())
    })?
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
