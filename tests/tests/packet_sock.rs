//! Program tests of the socket load balancer (`sock_connect4`, `sock_sendmsg4`,
//! `sock_recvmsg4`, `sock_getpeername4`). BPF_PROG_TEST_RUN does not run cgroup sock_addr
//! programs, so these go through real sockets: each test loads the real object with private
//! maps, programs Services through the shipped planner and executor, attaches the four programs
//! to a dedicated child cgroup ([`TestCgroup`], removed at the end), and drives sockets that a
//! process of that cgroup made inside the test's own network namespace. The backends are
//! serve-hostname servers on 127.0.0.1 of that namespace (one port per "pod"), so a translated
//! connection is answered by the pod it was sent to, and an untranslated one to a Service
//! address fails with ENETUNREACH (the namespace has no route but loopback). Needs root.
//!
//! Run: `cargo test -p xlb-tests --test packet_sock -- --include-ignored`

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use lb_common::{
    ip4, port, Stat, PROTO_TCP, PROTO_UDP, SVC_FLAG_AFFINITY, SVC_FLAG_CLUSTER_IP,
    SVC_FLAG_LOAD_BALANCER, SVC_FLAG_SOURCE_RANGES,
};
use lb_testkit::client::{connect_socket, udp_exchange};
use lb_testkit::{unique_prefix, ClientError, NetNs, ServeHostname, TestCgroup};
use lb_userspace::datapath::{own_netns_cookie, LoadOptions};
use xlb_tests::packet::harness::{BackendSpec, Extras, ServiceSpec, TestDatapath};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// Pod `k` (0-based) serves TCP and UDP on this port + k of 127.0.0.1.
const POD_PORT: u16 = 9001;
const REV_NAT_ID: u32 = 7;
const TIMEOUT: Duration = Duration::from_secs(2);

fn pod_name(k: usize) -> String {
    format!("pod-{k}")
}

fn pod_addr(k: usize) -> SocketAddrV4 {
    SocketAddrV4::new(LOCALHOST, POD_PORT + k as u16)
}

/// A Service at `frontend` over pods `0..pods` (backend ids 1..).
fn service(frontend: SocketAddrV4, proto: u8, flags: u32, pods: usize) -> ServiceSpec {
    ServiceSpec {
        frontend,
        proto,
        rev_nat_id: REV_NAT_ID,
        flags,
        affinity_timeout: if flags & SVC_FLAG_AFFINITY != 0 {
            10_800
        } else {
            0
        },
        backends: (0..pods)
            .map(|k| BackendSpec {
                id: k as u32 + 1,
                addr: pod_addr(k),
            })
            .collect(),
    }
}

/// One test's world. Field order is drop order: the links go with the datapath, then the
/// servers, the cgroup and the namespaces.
struct Bed {
    dp: TestDatapath,
    _pods: Vec<ServeHostname>,
    cg: TestCgroup,
    ns: NetNs,
    /// A second namespace, with its own pods (see [`Bed::other`]).
    other: Option<(NetNs, Vec<ServeHostname>)>,
}

/// A namespace with loopback up and `pods` serve-hostname servers on 127.0.0.1.
fn namespace(name: &str, pods: usize, tag: &str) -> Result<(NetNs, Vec<ServeHostname>)> {
    let ns = NetNs::create(name)?;
    let servers = (0..pods)
        .map(|k| {
            let port = pod_addr(k).port();
            ServeHostname::start(&ns, &format!("{tag}{}", pod_name(k)), &[port], &[port])
        })
        .collect::<lb_testkit::Result<Vec<_>>>()?;
    Ok((ns, servers))
}

impl Bed {
    /// `pods` pods, the object loaded with `opts` (its netns cookie set to this namespace's
    /// when `host` is true) and its socket programs attached to a fresh cgroup.
    fn new(pods: usize, host: bool, opts: LoadOptions) -> Result<Bed> {
        let prefix = unique_prefix();
        let (ns, servers) = namespace(&format!("{prefix}sock"), pods, "")?;
        let cookie = ns.run(own_netns_cookie)??;
        let opts = LoadOptions {
            host_netns_cookie: if host { cookie } else { 0 },
            ..opts
        };
        let mut dp = TestDatapath::load_options(&opts)?;
        let cg = TestCgroup::create(&prefix)?;
        dp.attach_sock(cg.path())?;
        Ok(Bed {
            dp,
            _pods: servers,
            cg,
            ns,
            other: None,
        })
    }

    /// A second namespace (pods named "other-pod-K"), whose sockets are in the cgroup too.
    fn add_other(&mut self, pods: usize) -> Result<()> {
        let name = format!("{}-other", self.ns.name());
        self.other = Some(namespace(&name, pods, "other-")?);
        Ok(())
    }

    fn other(&self) -> &NetNs {
        &self.other.as_ref().expect("add_other first").0
    }

    fn socket_in(&self, ns: &NetNs, ty: i32) -> Result<OwnedFd> {
        Ok(self.cg.socket(ns, ty)?)
    }

    /// A TCP connection from a new socket of the cgroup in `ns` (bound to `bind` first).
    fn connect_in(
        &self,
        ns: &NetNs,
        bind: Option<Ipv4Addr>,
        dst: SocketAddrV4,
    ) -> Result<TcpStream, ClientError> {
        let fd = self
            .socket_in(ns, libc::SOCK_STREAM)
            .map_err(|e| ClientError::Other(e.to_string()))?;
        if let Some(ip) = bind {
            bind_fd(&fd, ip).map_err(|e| ClientError::Other(format!("bind {ip}: {e}")))?;
        }
        let s = connect_socket(fd, None, dst, TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        Ok(s)
    }

    /// Connect from the test namespace, read the greeting: (pod, getpeername).
    fn tcp(&self, dst: SocketAddrV4) -> Result<(String, SocketAddr), ClientError> {
        tcp_answer(self.connect_in(&self.ns, None, dst)?)
    }

    fn udp_socket(&self) -> Result<UdpSocket> {
        let s = UdpSocket::from(self.socket_in(&self.ns, libc::SOCK_DGRAM)?);
        s.set_read_timeout(Some(TIMEOUT))?;
        Ok(s)
    }
}

fn tcp_answer(stream: TcpStream) -> Result<(String, SocketAddr), ClientError> {
    use std::io::BufRead as _;
    let peer = stream.peer_addr()?;
    let mut line = String::new();
    std::io::BufReader::new(&stream).read_line(&mut line)?;
    Ok((line.trim_end().to_string(), peer))
}

fn bind_fd(fd: &OwnedFd, ip: Ipv4Addr) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: ip4(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a valid descriptor and a sockaddr_in of the length given.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn is_unreachable(e: &ClientError) -> bool {
    matches!(e, ClientError::Unreachable(_))
}

fn tally(answers: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for a in answers {
        *t.entry(a).or_default() += 1;
    }
    t
}

#[test]
#[ignore = "needs root"]
fn connect_translates_a_cluster_ip_and_getpeername_shows_it() -> Result<()> {
    let mut bed = Bed::new(3, true, LoadOptions::default())?;
    let fe = SocketAddrV4::new(CLUSTER_IP, 80);
    bed.dp
        .set_service(&service(fe, PROTO_TCP, SVC_FLAG_CLUSTER_IP, 3))?;
    let mut pods = Vec::new();
    for _ in 0..60 {
        let (pod, peer) = bed.tcp(fe).context("connect to the ClusterIP")?;
        ensure!(peer == SocketAddr::V4(fe), "getpeername says {peer}");
        pods.push(pod);
    }
    let t = tally(pods);
    ensure!(
        t.len() == 3,
        "60 connections reach every pod (random selection): {t:?}"
    );
    // The socket's own address is a real one: nothing else about it is rewritten.
    let s = bed.connect_in(&bed.ns, None, fe)?;
    ensure!(s.local_addr()?.ip() == std::net::IpAddr::V4(LOCALHOST));
    let translated = bed.dp.stat(Stat::SockTranslated)?;
    ensure!(translated == 61, "sock_translated {translated}");
    ensure!(bed.dp.stat(Stat::SockRevTranslated)? >= 60);
    // Every connection recorded (socket, backend) -> frontend.
    let rev = bed.dp.sock_rev()?;
    ensure!(rev.len() >= 61, "{} SOCK_REV entries", rev.len());
    ensure!(rev.iter().all(|(k, v)| k._pad == 0
        && (v.addr, v.port) == (ip4(CLUSTER_IP.octets()), port(80))
        && k.addr == ip4(LOCALHOST.octets())));
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn udp_answers_come_from_the_service_address() -> Result<()> {
    let mut bed = Bed::new(2, true, LoadOptions::default())?;
    let fe = SocketAddrV4::new(CLUSTER_IP, 53);
    bed.dp
        .set_service(&service(fe, PROTO_UDP, SVC_FLAG_CLUSTER_IP, 2))?;
    // Unconnected: sendto the Service, recvfrom says the Service answered.
    let sock = bed.udp_socket()?;
    let a = udp_exchange(&sock, fe.into()).context("unconnected request")?;
    ensure!(a.peer == SocketAddr::V4(fe), "recvfrom source {}", a.peer);
    // Connected: getpeername and the answer's source are the Service.
    let sock = bed.udp_socket()?;
    sock.connect(fe)?;
    ensure!(sock.peer_addr()? == SocketAddr::V4(fe));
    sock.send(b"hostname?")?;
    let mut buf = [0u8; 64];
    let (n, from) = sock.recv_from(&mut buf)?;
    ensure!(
        from == SocketAddr::V4(fe),
        "connected recvfrom source {from}"
    );
    ensure!(String::from_utf8_lossy(&buf[..n]).starts_with("pod-"));
    ensure!(bed.dp.stat(Stat::SockTranslated)? == 2);
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn an_unconnected_udp_socket_keeps_its_backend_while_it_is_a_member() -> Result<()> {
    let mut bed = Bed::new(2, true, LoadOptions::default())?;
    let fe = SocketAddrV4::new(CLUSTER_IP, 53);
    let svc = service(fe, PROTO_UDP, SVC_FLAG_CLUSTER_IP, 2);
    bed.dp.set_service(&svc)?;
    let sock = bed.udp_socket()?;
    let answers = (0..20)
        .map(|_| udp_exchange(&sock, fe.into()).map(|a| a.text))
        .collect::<Result<Vec<_>, _>>()?;
    let t = tally(answers.clone());
    ensure!(
        t.len() == 1,
        "one socket, one backend (as one UDP flow on the tc path): {t:?}"
    );
    // Its backend leaves the Service: the next datagram moves at once.
    let first = &answers[0];
    let k: usize = first.trim_start_matches("pod-").parse()?;
    bed.dp.remove_from_service(&svc, k as u32 + 1)?;
    let next = udp_exchange(&sock, fe.into())?;
    ensure!(next.text != *first, "still sent to {first} after it left");
    ensure!(next.peer == SocketAddr::V4(fe));
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn recvmsg_shows_the_backend_once_the_service_is_gone() -> Result<()> {
    let mut bed = Bed::new(1, true, LoadOptions::default())?;
    let fe = SocketAddrV4::new(CLUSTER_IP, 53);
    let svc = service(fe, PROTO_UDP, SVC_FLAG_CLUSTER_IP, 1);
    bed.dp.set_service(&svc)?;
    let sock = bed.udp_socket()?;
    // Two requests, then the Service goes before the second answer is read.
    sock.send_to(b"1", fe)?;
    sock.send_to(b"2", fe)?;
    let mut buf = [0u8; 64];
    let (_, from) = sock.recv_from(&mut buf)?;
    ensure!(from == SocketAddr::V4(fe));
    bed.dp.delete_service(&svc)?;
    let (_, from) = sock.recv_from(&mut buf)?;
    ensure!(
        from == SocketAddr::V4(pod_addr(0)),
        "after the delete the source is {from}"
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn a_frontend_without_endpoints_is_refused_at_connect_and_sendto() -> Result<()> {
    let opts = LoadOptions {
        service_cidr: Some((Ipv4Addr::new(10, 96, 0, 0), 12)),
        ..LoadOptions::default()
    };
    let mut bed = Bed::new(1, true, opts)?;
    let tcp_fe = SocketAddrV4::new(CLUSTER_IP, 80);
    let udp_fe = SocketAddrV4::new(CLUSTER_IP, 53);
    bed.dp
        .set_service(&service(tcp_fe, PROTO_TCP, SVC_FLAG_CLUSTER_IP, 0))?;
    bed.dp.set_service(&ServiceSpec {
        rev_nat_id: REV_NAT_ID + 1,
        ..service(udp_fe, PROTO_UDP, SVC_FLAG_CLUSTER_IP, 0)
    })?;
    let started = Instant::now();
    match bed.tcp(tcp_fe) {
        Err(ClientError::Refused) => {}
        other => bail!("connect to an empty Service: {other:?}"),
    }
    let sock = bed.udp_socket()?;
    match sock.send_to(b"x", udp_fe) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        other => bail!("sendto an empty Service: {other:?}"),
    }
    match sock.connect(udp_fe) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        other => bail!("UDP connect to an empty Service: {other:?}"),
    }
    // An address of the Service CIDR that no Service uses fails the same way.
    match bed.tcp(SocketAddrV4::new(Ipv4Addr::new(10, 96, 9, 9), 80)) {
        Err(ClientError::Refused) => {}
        other => bail!("connect to an unallocated ClusterIP: {other:?}"),
    }
    let took = started.elapsed();
    ensure!(took < Duration::from_millis(500), "refusals took {took:?}");
    ensure!(bed.dp.stat(Stat::SockRefused)? == 4);
    // Outside the Service CIDR, a non-frontend is not ours: untouched (no route here).
    match bed.tcp(SocketAddrV4::new(Ipv4Addr::new(10, 200, 0, 1), 80)) {
        Err(e) if is_unreachable(&e) => {}
        other => bail!("connect to a non-Service address: {other:?}"),
    }
    ensure!(bed.dp.stat(Stat::SockRefused)? == 4 && bed.dp.stat(Stat::SockTranslated)? == 0);
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn affinity_holds_for_every_socket_of_a_namespace() -> Result<()> {
    let mut bed = Bed::new(3, true, LoadOptions::default())?;
    let fe = SocketAddrV4::new(CLUSTER_IP, 80);
    bed.dp.set_service(&service(
        fe,
        PROTO_TCP,
        SVC_FLAG_CLUSTER_IP | SVC_FLAG_AFFINITY,
        3,
    ))?;
    // Each connection is a new socket made by a new process: one client all the same.
    let pods = (0..30)
        .map(|_| bed.tcp(fe).map(|(p, _)| p))
        .collect::<Result<Vec<_>, _>>()?;
    let t = tally(pods);
    ensure!(t.len() == 1, "affinity: {t:?}");
    // One affinity record, for the namespace's client address 0.a.b.c.
    let aff = bed.dp.affinity()?;
    ensure!(aff.len() == 1, "{aff:?}");
    let client = aff[0].0.client.to_ne_bytes();
    ensure!(
        client[0] == 0,
        "the client of a socket is its namespace: {client:?}"
    );
    let cookie = bed.ns.run(own_netns_cookie)??;
    let folded = (cookie ^ (cookie >> 24) ^ (cookie >> 48)) as u32 & 0x00ff_ffff;
    ensure!(
        u32::from_be_bytes(client) == folded,
        "client {client:?} is not the namespace cookie {cookie}"
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn host_mode_translates_only_the_nodes_namespace() -> Result<()> {
    // Host mode: the cookie is the test namespace's; the other namespace is a "pod".
    let mut bed = Bed::new(1, true, LoadOptions::default())?;
    bed.add_other(1)?;
    let fe = SocketAddrV4::new(CLUSTER_IP, 80);
    bed.dp
        .set_service(&service(fe, PROTO_TCP, SVC_FLAG_CLUSTER_IP, 1))?;
    let (pod, _) = bed.tcp(fe)?;
    ensure!(pod == "pod-0");
    match bed.connect_in(bed.other(), None, fe) {
        Err(e) if is_unreachable(&e) => {}
        other => bail!("a pod's socket in host mode: {:?}", other.map(tcp_answer)),
    }
    ensure!(bed.dp.stat(Stat::SockTranslated)? == 1);

    // All: every namespace (the other one reaches its own 127.0.0.1 backend).
    let mut bed = Bed::new(1, false, LoadOptions::default())?;
    bed.add_other(1)?;
    bed.dp
        .set_service(&service(fe, PROTO_TCP, SVC_FLAG_CLUSTER_IP, 1))?;
    let (pod, peer) = tcp_answer(bed.connect_in(bed.other(), None, fe)?)?;
    ensure!(
        pod == "other-pod-0" && peer == SocketAddr::V4(fe),
        "{pod} {peer}"
    );
    let (pod, _) = bed.tcp(fe)?;
    ensure!(pod == "pod-0");
    ensure!(bed.dp.stat(Stat::SockTranslated)? == 2);
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn source_ranges_are_checked_for_bound_sockets_and_left_to_the_packet_path_otherwise() -> Result<()>
{
    let mut bed = Bed::new(1, true, LoadOptions::default())?;
    let allowed = Ipv4Addr::new(192, 168, 7, 7);
    let denied = Ipv4Addr::new(192, 168, 8, 8);
    for ip in [allowed, denied] {
        bed.ns
            .ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
    }
    let fe = SocketAddrV4::new(LB_IP, 80);
    let extras = Extras {
        src_ranges: vec![(Ipv4Addr::new(192, 168, 7, 0), 24)],
        ..Extras::default()
    };
    bed.dp.set_service_with(
        &service(
            fe,
            PROTO_TCP,
            SVC_FLAG_LOAD_BALANCER | SVC_FLAG_SOURCE_RANGES,
            1,
        ),
        &extras,
    )?;
    let (pod, peer) = tcp_answer(bed.connect_in(&bed.ns, Some(allowed), fe)?)?;
    ensure!(pod == "pod-0" && peer == SocketAddr::V4(fe));
    for bind in [Some(denied), None] {
        match bed.connect_in(&bed.ns, bind, fe) {
            Err(e) if is_unreachable(&e) => {}
            other => bail!("bound to {bind:?}: {:?}", other.map(tcp_answer)),
        }
    }
    ensure!(bed.dp.stat(Stat::SockTranslated)? == 1);
    Ok(())
}
