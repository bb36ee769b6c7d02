//! BPF_PROG_TEST_RUN tests of conntrack state, lifetimes and lookup rules (issue 8), run through
//! the real `from_pod` / `to_pod` programs: every state transition, expiry, tuple re-use,
//! membership checks, stale reply entries, affinity, hairpin, ICMP error translation and IPv4
//! fragments. The clock is controlled by writing `expires_ns` (CLOCK_MONOTONIC_COARSE, the clock
//! of `bpf_ktime_get_coarse_ns`) into entries; lifetimes are set at load time to values that
//! differ per state, so a wrong lifetime shows. Needs root.
//!
//! Run: `cargo test -p xlb-tests --test packet_conntrack -- --include-ignored`

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::{ensure, Context as _, Result};
use lb_common::{
    ct_state, ip4, port, CtKey, CtTimeouts, CtValue, FragKey, FragValue, Stat, CT_FORWARD,
    CT_F_FIN_FWD, CT_F_FIN_REV, CT_F_HAIRPIN, CT_REPLY, HAIRPIN_ADDR, PROTO_TCP, PROTO_UDP,
    SVC_FLAG_AFFINITY, SVC_FLAG_CLUSTER_IP,
};
use xlb_tests::packet::{
    build::{
        fragment, ip_packet, with_ip_id, IcmpError, IcmpErrorKind, Tcp, TcpFlags, Udp, HOST_MAC,
        POD_MAC,
    },
    harness::{
        ct_key, now_coarse_ns, BackendSpec, Outcome, ServiceSpec, TestDatapath, TC_ACT_OK,
        TC_ACT_REDIRECT,
    },
    verify::{l4_checksum_ok, verify_checksums},
};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
/// The Service under test, and another Service that shares its backends.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const OTHER_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const BACKEND_PORT: u16 = 9376;
const REV_NAT_ID: u32 = 7;
const OTHER_REV_NAT_ID: u32 = 8;
const NEW_REV_NAT_ID: u32 = 9;

/// Lifetimes that differ per state (seconds).
const TIMEOUTS: CtTimeouts = CtTimeouts {
    tcp_syn: 11,
    tcp_established: 3_000,
    tcp_fin_wait: 222,
    tcp_close: 33,
    udp: 44,
    udp_stream: 555,
};
const NS: u64 = 1_000_000_000;
/// Allowance between the test's and the program's reading of the coarse clock.
const CLOCK_SLACK_NS: u64 = 20_000_000;

fn client(sport: u16) -> SocketAddrV4 {
    SocketAddrV4::new(CLIENT_IP, sport)
}

fn fport(proto: u8) -> u16 {
    if proto == PROTO_TCP {
        80
    } else {
        53
    }
}

fn frontend(proto: u8) -> SocketAddrV4 {
    SocketAddrV4::new(VIP, fport(proto))
}

fn backend(i: u32) -> BackendSpec {
    let ip = [
        Ipv4Addr::new(10, 244, 1, 10),
        Ipv4Addr::new(10, 244, 1, 11),
        Ipv4Addr::new(10, 244, 2, 12),
    ][i as usize];
    BackendSpec {
        id: 100 + i,
        addr: SocketAddrV4::new(ip, BACKEND_PORT),
    }
}

fn a() -> BackendSpec {
    backend(0)
}
fn b() -> BackendSpec {
    backend(1)
}

fn service(proto: u8, backends: &[BackendSpec]) -> ServiceSpec {
    ServiceSpec {
        frontend: frontend(proto),
        proto,
        rev_nat_id: REV_NAT_ID,
        flags: SVC_FLAG_CLUSTER_IP,
        affinity_timeout: 0,
        backends: backends.to_vec(),
    }
}

/// Another Service (another ClusterIP) with the same backends, so they stay in `BACKENDS`
/// after they left [`service`].
fn other_service(proto: u8, backends: &[BackendSpec]) -> ServiceSpec {
    ServiceSpec {
        frontend: SocketAddrV4::new(OTHER_VIP, fport(proto)),
        rev_nat_id: OTHER_REV_NAT_ID,
        ..service(proto, backends)
    }
}

fn load() -> Result<TestDatapath> {
    TestDatapath::load_with(None, TIMEOUTS)
}

/// A datapath with [`service`] on `backends`.
fn with_service(proto: u8, backends: &[BackendSpec]) -> Result<(TestDatapath, ServiceSpec)> {
    let mut dp = load()?;
    let svc = service(proto, backends);
    dp.set_service(&svc)?;
    Ok((dp, svc))
}

/// Moves the Service from its backends to only `to` (adds it, then removes the others as the
/// agent does: slot, master count, member).
fn move_service_to(
    dp: &mut TestDatapath,
    svc: &ServiceSpec,
    to: BackendSpec,
) -> Result<ServiceSpec> {
    let mut now = ServiceSpec {
        backends: svc.backends.clone(),
        ..svc.clone()
    };
    if !now.backends.iter().any(|x| x.id == to.id) {
        now.backends.push(to);
        dp.set_service(&now)?;
    }
    for gone in svc.backends.iter().filter(|x| x.id != to.id) {
        now = dp.remove_from_service(&now, gone.id)?;
    }
    Ok(now)
}

fn stats(pairs: &[(&'static str, u64)]) -> BTreeMap<&'static str, u64> {
    pairs.iter().copied().collect()
}

fn fwd_key(cl: SocketAddrV4, proto: u8) -> CtKey {
    ct_key(cl, frontend(proto), proto, CT_FORWARD)
}

fn reply_key(from: SocketAddrV4, cl: SocketAddrV4, proto: u8) -> CtKey {
    ct_key(from, cl, proto, CT_REPLY)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Checks verdict, exact output frame and (independently) every checksum of `out`.
fn expect_frame(out: &Outcome, verdict: u32, expected: &[u8]) -> Result<()> {
    ensure!(
        out.verdict == verdict,
        "verdict {} (want {verdict})",
        out.verdict
    );
    ensure!(
        out.frame == expected,
        "frame differs:\n got {}\nwant {}",
        hex(&out.frame),
        hex(expected)
    );
    verify_checksums(&out.frame)?;
    Ok(())
}

/// Sends `frame` through from_pod (`to_pod` false) or to_pod, expecting it back unchanged.
fn expect_untouched(dp: &TestDatapath, to_pod: bool, frame: &[u8]) -> Result<()> {
    let out = if to_pod {
        dp.to_pod(frame)?
    } else {
        dp.from_pod(frame)?
    };
    ensure!(out.verdict == TC_ACT_OK, "verdict {}", out.verdict);
    ensure!(
        out.frame == frame,
        "frame changed:\n got {}\nwant {}",
        hex(&out.frame),
        hex(frame)
    );
    Ok(())
}

/// A client segment to the TCP frontend.
fn seg(cl: SocketAddrV4, flags: TcpFlags) -> Tcp {
    Tcp::new(cl, frontend(PROTO_TCP), flags)
}

/// A segment from `from` to the client, going into the client pod.
fn answer(from: SocketAddrV4, cl: SocketAddrV4, flags: TcpFlags) -> Tcp {
    Tcp {
        seq: 5_000,
        ack: 1_001,
        macs: (HOST_MAC, POD_MAC),
        ..Tcp::new(from, cl, flags)
    }
}

/// from_pod must DNAT `s` to `to`, and nothing else.
fn dnat_tcp(dp: &TestDatapath, s: &Tcp, to: BackendSpec) -> Result<()> {
    let out = dp.from_pod(&s.frame())?;
    expect_frame(
        &out,
        TC_ACT_OK,
        &Tcp {
            dst: to.addr,
            ..s.clone()
        }
        .frame(),
    )
    .with_context(|| format!("{:?} from {} via from_pod", s.flags, s.src))
}

/// to_pod must restore the frontend as the source of `s`, and nothing else.
fn snat_tcp(dp: &TestDatapath, s: &Tcp) -> Result<()> {
    let out = dp.to_pod(&s.frame())?;
    expect_frame(
        &out,
        TC_ACT_OK,
        &Tcp {
            src: frontend(PROTO_TCP),
            ..s.clone()
        }
        .frame(),
    )
    .with_context(|| format!("{:?} from {} via to_pod", s.flags, s.src))
}

fn dnat_udp(dp: &TestDatapath, d: &Udp, to: BackendSpec) -> Result<()> {
    let out = dp.from_pod(&d.frame())?;
    expect_frame(
        &out,
        TC_ACT_OK,
        &Udp {
            dst: to.addr,
            ..d.clone()
        }
        .frame(),
    )
    .with_context(|| format!("datagram from {} via from_pod", d.src))
}

fn snat_udp(dp: &TestDatapath, d: &Udp) -> Result<()> {
    let out = dp.to_pod(&d.frame())?;
    expect_frame(
        &out,
        TC_ACT_OK,
        &Udp {
            src: frontend(PROTO_UDP),
            ..d.clone()
        }
        .frame(),
    )
    .with_context(|| format!("datagram from {} via to_pod", d.src))
}

/// Sends with `send`, then reads the flow at `fwd_key` ([`flow`]): it must be in `state`, with
/// the expiry of that state's lifetime from the time of `send`.
fn after(
    dp: &mut TestDatapath,
    fwd_key: CtKey,
    state: u8,
    send: impl FnOnce(&TestDatapath) -> Result<()>,
) -> Result<Flow> {
    let ((), window) = timed(|| send(dp))?;
    let f = flow(dp, fwd_key)?;
    f.check_state(state, window)?;
    Ok(f)
}

/// Runs `f` between two readings of the coarse clock.
fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, (u64, u64))> {
    let t0 = now_coarse_ns();
    let r = f()?;
    Ok((r, (t0, now_coarse_ns())))
}

/// Both entries of one flow, read back and checked against each other.
#[derive(Clone, Copy, Debug)]
struct Flow {
    fwd_key: CtKey,
    fwd: CtValue,
    rep_key: CtKey,
    rep: CtValue,
}

/// Reads the flow whose forward entry is at `fwd_key`; both entries must exist, point at each
/// other (`CtKey::pair`), and carry the same state, flags, expiry, backend and rev-NAT id.
fn flow(dp: &mut TestDatapath, fwd_key: CtKey) -> Result<Flow> {
    let fwd = dp
        .ct_get(&fwd_key)?
        .with_context(|| format!("no forward entry {fwd_key:?}"))?;
    let rep_key = fwd_key.pair(&fwd);
    let rep = dp
        .ct_get(&rep_key)?
        .with_context(|| format!("no reply entry {rep_key:?} for forward {fwd:?}"))?;
    ensure!(
        rep_key.pair(&rep) == fwd_key,
        "reply entry {rep_key:?} = {rep:?} does not pair back to {fwd_key:?}"
    );
    ensure!(
        fwd.state == rep.state && fwd.expires_ns == rep.expires_ns,
        "entries differ: forward {fwd:?}, reply {rep:?}"
    );
    ensure!(
        fwd.flags == rep.flags,
        "flags differ: forward {fwd:?}, reply {rep:?}"
    );
    ensure!(
        fwd.backend_id == rep.backend_id && fwd.rev_nat_id == rep.rev_nat_id,
        "ids differ: forward {fwd:?}, reply {rep:?}"
    );
    Ok(Flow {
        fwd_key,
        fwd,
        rep_key,
        rep,
    })
}

impl Flow {
    /// The flow goes to `to`, restores `fe` and was set up for `rev_nat_id`.
    fn check_nat(&self, to: BackendSpec, fe: SocketAddrV4, rev_nat_id: u32) -> Result<()> {
        ensure!(
            self.fwd.backend_id == to.id
                && self.fwd.nat_addr == ip4(to.addr.ip().octets())
                && self.fwd.nat_port == port(to.addr.port()),
            "forward entry {:?} does not go to {to:?}",
            self.fwd
        );
        ensure!(
            self.rep.nat_addr == ip4(fe.ip().octets()) && self.rep.nat_port == port(fe.port()),
            "reply entry {:?} does not restore {fe}",
            self.rep
        );
        ensure!(
            self.fwd.rev_nat_id == rev_nat_id,
            "rev-NAT id {} (want {rev_nat_id})",
            self.fwd.rev_nat_id
        );
        Ok(())
    }

    /// The flow is in `state`, with an expiry set within `window` to its state's lifetime.
    fn check_state(&self, state: u8, window: (u64, u64)) -> Result<()> {
        ensure!(
            self.fwd.state == state,
            "state {} (want {})",
            ct_state::name(self.fwd.state),
            ct_state::name(state)
        );
        let lifetime = u64::from(TIMEOUTS.of(state)) * NS;
        let (lo, hi) = (window.0 + lifetime, window.1 + lifetime);
        ensure!(
            self.fwd.expires_ns + CLOCK_SLACK_NS >= lo
                && self.fwd.expires_ns <= hi + CLOCK_SLACK_NS,
            "{} expiry {} not in [{lo}, {hi}] (now + {} s); expires in {} ms",
            ct_state::name(state),
            self.fwd.expires_ns,
            lifetime / NS,
            (self.fwd.expires_ns as i128 - now_coarse_ns() as i128) / 1_000_000
        );
        Ok(())
    }

    /// The FIN flags of the flow are exactly `fin`.
    fn check_fin(&self, fin: u8) -> Result<()> {
        ensure!(
            self.fwd.flags & (CT_F_FIN_FWD | CT_F_FIN_REV) == fin,
            "flags {:#x} (want FIN bits {fin:#x})",
            self.fwd.flags
        );
        Ok(())
    }

    /// Writes both entries with `expires_ns`.
    fn set_expiry(&self, dp: &mut TestDatapath, expires_ns: u64) -> Result<()> {
        dp.ct_set(
            &self.fwd_key,
            CtValue {
                expires_ns,
                ..self.fwd
            },
        )?;
        dp.ct_set(
            &self.rep_key,
            CtValue {
                expires_ns,
                ..self.rep
            },
        )
    }
}

fn ct_len(dp: &mut TestDatapath) -> Result<usize> {
    Ok(dp.conntrack()?.len())
}

fn ensure_gone(dp: &mut TestDatapath, k: &CtKey) -> Result<()> {
    let v = dp.ct_get(k)?;
    ensure!(v.is_none(), "entry {k:?} still there: {v:?}");
    Ok(())
}

/// A TCP flow client -> frontend on `cl`, handshaken to `to` (SYN, SYN-ACK): ESTABLISHED.
fn established(dp: &mut TestDatapath, cl: SocketAddrV4, to: BackendSpec) -> Result<Flow> {
    dnat_tcp(dp, &seg(cl, TcpFlags::SYN), to)?;
    snat_tcp(dp, &answer(to.addr, cl, TcpFlags::SYN_ACK))?;
    let f = flow(dp, fwd_key(cl, PROTO_TCP))?;
    ensure!(f.fwd.state == ct_state::TCP_ESTABLISHED, "handshake: {f:?}");
    Ok(f)
}

/// Sends `syn` through from_pod: it must be DNATed to one of `members` (and nothing else), whose
/// flow is returned with that member.
fn syn_to_a_member(
    dp: &mut TestDatapath,
    syn: &Tcp,
    members: &[BackendSpec],
) -> Result<(Flow, BackendSpec)> {
    let out = dp.from_pod(&syn.frame())?;
    let f = flow(dp, fwd_key(syn.src, PROTO_TCP))?;
    let to = *members
        .iter()
        .find(|x| x.id == f.fwd.backend_id)
        .with_context(|| format!("backend {} is no member", f.fwd.backend_id))?;
    expect_frame(
        &out,
        TC_ACT_OK,
        &Tcp {
            dst: to.addr,
            ..syn.clone()
        }
        .frame(),
    )?;
    Ok((f, to))
}

fn data(cl: SocketAddrV4) -> Tcp {
    Tcp {
        seq: 1_001,
        ack: 5_001,
        payload: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        ..seg(cl, TcpFlags::PSH_ACK)
    }
}

// ---------------------------------------------------------------------------------------------
// TCP state machine
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root"]
fn tcp_syn_creates_a_syn_sent_pair() -> Result<()> {
    let (mut dp, _) = with_service(PROTO_TCP, &[a()])?;
    let cl = client(40_000);
    let f = after(
        &mut dp,
        fwd_key(cl, PROTO_TCP),
        ct_state::TCP_SYN_SENT,
        |dp| dnat_tcp(dp, &seg(cl, TcpFlags::SYN), a()),
    )?;
    ensure!(
        f.rep_key == reply_key(a().addr, cl, PROTO_TCP),
        "reply key {:?}",
        f.rep_key
    );
    f.check_nat(a(), frontend(PROTO_TCP), REV_NAT_ID)?;
    f.check_fin(0)?;
    ensure!(f.fwd.flags & CT_F_HAIRPIN == 0, "hairpin flag on {f:?}");
    ensure!(ct_len(&mut dp)? == 2);
    assert_eq!(dp.nonzero_stats()?, stats(&[("new_flow", 1)]));
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn tcp_non_syn_first_packet_creates_an_established_pair() -> Result<()> {
    let (mut dp, _) = with_service(PROTO_TCP, &[a()])?;
    let cl = client(40_001);
    let f = after(
        &mut dp,
        fwd_key(cl, PROTO_TCP),
        ct_state::TCP_ESTABLISHED,
        |dp| dnat_tcp(dp, &data(cl), a()),
    )?;
    f.check_nat(a(), frontend(PROTO_TCP), REV_NAT_ID)?;
    assert_eq!(dp.nonzero_stats()?, stats(&[("new_flow", 1)]));
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn tcp_syn_ack_from_the_backend_establishes_both_entries() -> Result<()> {
    let (mut dp, _) = with_service(PROTO_TCP, &[a()])?;
    let cl = client(40_002);
    dnat_tcp(&dp, &seg(cl, TcpFlags::SYN), a())?;
    let f = after(
        &mut dp,
        fwd_key(cl, PROTO_TCP),
        ct_state::TCP_ESTABLISHED,
        |dp| snat_tcp(dp, &answer(a().addr, cl, TcpFlags::SYN_ACK)),
    )?;
    f.check_nat(a(), frontend(PROTO_TCP), REV_NAT_ID)?;
    f.check_fin(0)?;
    // The client's ACK keeps the state.
    dnat_tcp(&dp, &data(cl), a())?;
    ensure!(flow(&mut dp, fwd_key(cl, PROTO_TCP))?.fwd.state == ct_state::TCP_ESTABLISHED);
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[("new_flow", 1), ("reply", 1), ("established", 1)])
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn tcp_fin_from_the_client_is_fin_wait_then_fin_from_the_backend_is_closing() -> Result<()> {
    let (mut dp, _) = with_service(PROTO_TCP, &[a()])?;
    let cl = client(40_003);
    established(&mut dp, cl, a())?;
    let fin = Tcp {
        seq: 1_001,
        ack: 5_001,
        ..seg(cl, TcpFlags::FIN_ACK)
    };
    let f = after(
        &mut dp,
        fwd_key(cl, PROTO_TCP),
        ct_state::TCP_FIN_WAIT,
        |dp| dnat_tcp(dp, &fin, a()),
    )?;
    f.check_fin(CT_F_FIN_FWD)?;
    f.check_nat(a(), frontend(PROTO_TCP), REV_NAT_ID)?;

    let back_fin = Tcp {
        seq: 5_001,
        ack: 1_002,
        ..answer(a().addr, cl, TcpFlags::FIN_ACK)
    };
    let f = after(
        &mut dp,
        fwd_key(cl, PROTO_TCP),
        ct_state::TCP_CLOSING,
        |dp| snat_tcp(dp, &back_fin),
    )?;
    f.check_fin(CT_F_FIN_FWD | CT_F_FIN_REV)?;
    // The last ACK is still translated and does not reopen the flow.
    dnat_tcp(
        &dp,
        &Tcp {
            seq: 1_002,
            ack: 5_002,
            ..seg(cl, TcpFlags::ACK)
        },
        a(),
    )?;
    ensure!(flow(&mut dp, fwd_key(cl, PROTO_TCP))?.fwd.state == ct_state::TCP_CLOSING);
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[("new_flow", 1), ("reply", 2), ("established", 2)])
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn tcp_fin_from_the_backend_first_is_fin_wait_then_fin_from_the_client_is_closing() -> Result<()> {
    let (mut dp, _) = with_service(PROTO_TCP, &[a()])?;
    let cl = client(40_004);
    established(&mut dp, cl, a())?;
    let f = after(
        &mut dp,
        fwd_key(cl, PROTO_TCP),
        ct_state::TCP_FIN_WAIT,
        |dp| snat_tcp(dp, &answer(a().addr, cl, TcpFlags::FIN_ACK)),
    )?;
    f.check_fin(CT_F_FIN_REV)?;
    let f = after(
        &mut dp,
        fwd_key(cl, PROTO_TCP),
        ct_state::TCP_CLOSING,
        |dp| dnat_tcp(dp, &seg(cl, TcpFlags::FIN_ACK), a()),
    )?;
    f.check_fin(CT_F_FIN_FWD | CT_F_FIN_REV)?;
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[("new_flow", 1), ("reply", 2), ("established", 1)])
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn tcp_rst_from_the_client_closes_the_flow() -> Result<()> {
    let (mut dp, _) = with_service(PROTO_TCP, &[a()])?;
    let cl = client(40_005);
    established(&mut dp, cl, a())?;
    let rst = Tcp {
        seq: 1_001,
        ..seg(cl, TcpFlags::RST)
    };
    let f = after(
        &mut dp,
        fwd_key(cl, PROTO_TCP),
        ct_state::TCP_CLOSED,
        |dp| dnat_tcp(dp, &rst, a()),
    )?;
    f.check_nat(a(), frontend(PROTO_TCP), REV_NAT_ID)?;
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[("new_flow", 1), ("reply", 1), ("established", 1)])
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn tcp_rst_from_the_backend_closes_the_flow() -> Result<()> {
    let (mut dp, _) = with_service(PROTO_TCP, &[a()])?;
    let cl = client(40_006);
    // Refused right after the SYN: SYN_SENT -> CLOSED.
    dnat_tcp(&dp, &seg(cl, TcpFlags::SYN), a())?;
    let rst = Tcp {
        flags: TcpFlags {
            rst: true,
            ack: true,
            ..TcpFlags::default()
        },
        seq: 0,
        ..answer(a().addr, cl, TcpFlags::RST)
    };
    let f = after(
        &mut dp,
        fwd_key(cl, PROTO_TCP),
        ct_state::TCP_CLOSED,
        |dp| snat_tcp(dp, &rst),
    )?;
    f.check_nat(a(), frontend(PROTO_TCP), REV_NAT_ID)?;
    assert_eq!(dp.nonzero_stats()?, stats(&[("new_flow", 1), ("reply", 1)]));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// UDP states
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root"]
fn udp_first_datagram_is_unreplied_and_a_reply_makes_it_replied() -> Result<()> {
    let (mut dp, _) = with_service(PROTO_UDP, &[a()])?;
    let cl = client(41_000);
    let query = Udp::new(cl, frontend(PROTO_UDP), b"query");
    let f = after(
        &mut dp,
        fwd_key(cl, PROTO_UDP),
        ct_state::UDP_UNREPLIED,
        |dp| dnat_udp(dp, &query, a()),
    )?;
    ensure!(
        f.rep_key == reply_key(a().addr, cl, PROTO_UDP),
        "reply key {:?}",
        f.rep_key
    );
    f.check_nat(a(), frontend(PROTO_UDP), REV_NAT_ID)?;

    let mut reply = Udp::new(a().addr, cl, b"answer");
    reply.macs = (HOST_MAC, POD_MAC);
    after(
        &mut dp,
        fwd_key(cl, PROTO_UDP),
        ct_state::UDP_REPLIED,
        |dp| snat_udp(dp, &reply),
    )?;
    // More datagrams keep it replied.
    dnat_udp(&dp, &query, a())?;
    ensure!(flow(&mut dp, fwd_key(cl, PROTO_UDP))?.fwd.state == ct_state::UDP_REPLIED);
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[("new_flow", 1), ("reply", 1), ("established", 1)])
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Expiry and refresh
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root"]
fn expired_forward_entry_is_a_miss_and_the_next_packet_reselects() -> Result<()> {
    let (mut dp, svc) = with_service(PROTO_TCP, &[a()])?;
    let cl = client(42_000);
    let old = established(&mut dp, cl, a())?;
    old.set_expiry(&mut dp, now_coarse_ns() - 1)?;
    move_service_to(&mut dp, &svc, b())?;
    // A non-SYN packet on a live entry would keep A: expired, it is a new flow (ESTABLISHED,
    // as a mid-stream pick-up) to the Service as it is now.
    let f = after(
        &mut dp,
        fwd_key(cl, PROTO_TCP),
        ct_state::TCP_ESTABLISHED,
        |dp| dnat_tcp(dp, &data(cl), b()),
    )?;
    ensure_gone(&mut dp, &old.rep_key)?;
    f.check_nat(b(), frontend(PROTO_TCP), REV_NAT_ID)?;
    ensure!(ct_len(&mut dp)? == 2, "{:?}", dp.conntrack()?);
    assert_eq!(dp.stat(Stat::CtExpired)?, 1);
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[("new_flow", 2), ("reply", 1), ("ct_expired", 1)])
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn expired_reply_entry_is_not_used() -> Result<()> {
    let (mut dp, _) = with_service(PROTO_UDP, &[a()])?;
    let cl = client(42_001);
    dnat_udp(&dp, &Udp::new(cl, frontend(PROTO_UDP), b"q"), a())?;
    let f = flow(&mut dp, fwd_key(cl, PROTO_UDP))?;
    f.set_expiry(&mut dp, now_coarse_ns() - 1)?;
    let mut reply = Udp::new(a().addr, cl, b"late answer");
    reply.macs = (HOST_MAC, POD_MAC);
    expect_untouched(&dp, true, &reply.frame())?;
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[("new_flow", 1), ("ct_expired", 1)])
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn refresh_rewrites_the_expiry_of_both_entries_at_most_once_a_second() -> Result<()> {
    let (mut dp, _) = with_service(PROTO_TCP, &[a()])?;
    let cl = client(42_002);
    let f = established(&mut dp, cl, a())?;
    let lifetime = u64::from(TIMEOUTS.tcp_established) * NS;

    // Refreshed half a second ago: a packet does not write the entries.
    let fresh = now_coarse_ns() + lifetime - NS / 2;
    f.set_expiry(&mut dp, fresh)?;
    dnat_tcp(&dp, &data(cl), a())?;
    snat_tcp(&dp, &answer(a().addr, cl, TcpFlags::ACK))?;
    let g = flow(&mut dp, f.fwd_key)?;
    ensure!(
        g.fwd.expires_ns == fresh,
        "refreshed within a second: expiry moved by {} ns",
        g.fwd.expires_ns as i128 - fresh as i128
    );

    // Refreshed 5 s ago: a client packet refreshes both entries.
    f.set_expiry(&mut dp, now_coarse_ns() + lifetime - 5 * NS)?;
    after(&mut dp, f.fwd_key, ct_state::TCP_ESTABLISHED, |dp| {
        dnat_tcp(dp, &data(cl), a())
    })?;

    // And so does a reply.
    f.set_expiry(&mut dp, now_coarse_ns() + lifetime - 5 * NS)?;
    after(&mut dp, f.fwd_key, ct_state::TCP_ESTABLISHED, |dp| {
        snat_tcp(dp, &answer(a().addr, cl, TcpFlags::ACK))
    })?;
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[("new_flow", 1), ("reply", 3), ("established", 2)])
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn missing_reply_entry_is_recreated_at_the_next_refresh() -> Result<()> {
    let (mut dp, _) = with_service(PROTO_TCP, &[a()])?;
    let cl = client(42_003);
    let f = established(&mut dp, cl, a())?;
    dp.ct_delete(&f.rep_key)?;
    let lifetime = u64::from(TIMEOUTS.tcp_established) * NS;
    dp.ct_set(
        &f.fwd_key,
        CtValue {
            expires_ns: now_coarse_ns() + lifetime - 5 * NS,
            ..f.fwd
        },
    )?;
    let g = after(&mut dp, f.fwd_key, ct_state::TCP_ESTABLISHED, |dp| {
        dnat_tcp(dp, &data(cl), a())
    })?;
    ensure!(g.rep_key == f.rep_key);
    g.check_nat(a(), frontend(PROTO_TCP), REV_NAT_ID)?;
    // The re-created entry translates the replies again.
    snat_tcp(&dp, &answer(a().addr, cl, TcpFlags::ACK))?;
    assert_eq!(dp.stat(Stat::CtReplyRecreated)?, 1);
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[
            ("new_flow", 1),
            ("reply", 2),
            ("established", 1),
            ("ct_reply_recreated", 1)
        ])
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tuple re-use by a new connection
// ---------------------------------------------------------------------------------------------

/// A flow to A brought to `state` by `close`; then a new SYN on the tuple must be a new flow
/// (SYN_SENT, no FIN flags) selected from the Service as it is now: once with A still the only
/// member (only the state tells the SYN starts over), once with the Service moved to B.
fn syn_reuses_a_closing_tuple(
    sport: u16,
    state: u8,
    close: impl Fn(&TestDatapath, SocketAddrV4) -> Result<()>,
    close_stats: &[(&'static str, u64)],
) -> Result<()> {
    for moved in [false, true] {
        let (mut dp, svc) = with_service(PROTO_TCP, &[a()])?;
        let cl = client(sport);
        let old = established(&mut dp, cl, a())?;
        close(&dp, cl)?;
        let closing = flow(&mut dp, old.fwd_key)?;
        ensure!(
            closing.fwd.state == state,
            "state {} after closing",
            ct_state::name(closing.fwd.state)
        );
        let to = if moved {
            move_service_to(&mut dp, &svc, b())?;
            b()
        } else {
            a()
        };
        let syn = Tcp {
            seq: 77_000,
            ..seg(cl, TcpFlags::SYN)
        };
        let ((), window) = timed(|| dnat_tcp(&dp, &syn, to))?;
        if moved {
            ensure_gone(&mut dp, &old.rep_key)?;
        }
        let f = flow(&mut dp, old.fwd_key)?;
        f.check_nat(to, frontend(PROTO_TCP), REV_NAT_ID)
            .with_context(|| format!("Service moved: {moved}"))?;
        f.check_state(ct_state::TCP_SYN_SENT, window)
            .with_context(|| format!("Service moved: {moved}"))?;
        f.check_fin(0)?;
        ensure!(ct_len(&mut dp)? == 2, "{:?}", dp.conntrack()?);
        let mut want = stats(&[("new_flow", 2), ("ct_tuple_reused", 1)]);
        for (k, v) in close_stats {
            *want.entry(k).or_default() += v;
        }
        assert_eq!(dp.nonzero_stats()?, want, "Service moved: {moved}");
    }
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn syn_on_a_fin_wait_entry_starts_a_new_flow() -> Result<()> {
    syn_reuses_a_closing_tuple(
        43_000,
        ct_state::TCP_FIN_WAIT,
        |dp, cl| dnat_tcp(dp, &seg(cl, TcpFlags::FIN_ACK), a()),
        &[("reply", 1), ("established", 1)],
    )
}

#[test]
#[ignore = "needs root"]
fn syn_on_a_closing_entry_starts_a_new_flow() -> Result<()> {
    syn_reuses_a_closing_tuple(
        43_001,
        ct_state::TCP_CLOSING,
        |dp, cl| {
            dnat_tcp(dp, &seg(cl, TcpFlags::FIN_ACK), a())?;
            snat_tcp(dp, &answer(a().addr, cl, TcpFlags::FIN_ACK))
        },
        &[("reply", 2), ("established", 1)],
    )
}

#[test]
#[ignore = "needs root"]
fn syn_on_a_closed_entry_starts_a_new_flow() -> Result<()> {
    syn_reuses_a_closing_tuple(
        43_002,
        ct_state::TCP_CLOSED,
        |dp, cl| dnat_tcp(dp, &seg(cl, TcpFlags::RST), a()),
        &[("reply", 1), ("established", 1)],
    )
}

#[test]
#[ignore = "needs root"]
fn syn_on_a_live_entry_whose_backend_left_the_frontend_reselects() -> Result<()> {
    let (mut dp, svc) = with_service(PROTO_TCP, &[a()])?;
    dp.set_service(&other_service(PROTO_TCP, &[a()]))?;
    let (syn_sent, est) = (client(43_010), client(43_011));
    dnat_tcp(&dp, &seg(syn_sent, TcpFlags::SYN), a())?;
    established(&mut dp, est, a())?;
    move_service_to(&mut dp, &svc, b())?;
    // A stays in BACKENDS (the other Service uses it) but is no longer a member of this one.
    for cl in [syn_sent, est] {
        let f = after(
            &mut dp,
            fwd_key(cl, PROTO_TCP),
            ct_state::TCP_SYN_SENT,
            |dp| dnat_tcp(dp, &seg(cl, TcpFlags::SYN), b()),
        )?;
        ensure_gone(&mut dp, &reply_key(a().addr, cl, PROTO_TCP))?;
        f.check_nat(b(), frontend(PROTO_TCP), REV_NAT_ID)?;
    }
    ensure!(ct_len(&mut dp)? == 4, "{:?}", dp.conntrack()?);
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[("new_flow", 4), ("reply", 1), ("ct_tuple_reused", 2)])
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn syn_on_a_live_entry_of_a_recreated_frontend_reselects() -> Result<()> {
    let (mut dp, svc) = with_service(PROTO_TCP, &[a()])?;
    let cl = client(43_020);
    established(&mut dp, cl, a())?;
    // The ClusterIP is given to a new Service (another rev-NAT id), with the same pod.
    dp.recreate_frontend(&svc, NEW_REV_NAT_ID)?;
    // A packet of the running connection keeps its entry as it is.
    dnat_tcp(&dp, &data(cl), a())?;
    let f = flow(&mut dp, fwd_key(cl, PROTO_TCP))?;
    f.check_nat(a(), frontend(PROTO_TCP), REV_NAT_ID)?;
    ensure!(f.fwd.state == ct_state::TCP_ESTABLISHED);
    // A new connection on the tuple belongs to the new Service.
    let f = after(
        &mut dp,
        fwd_key(cl, PROTO_TCP),
        ct_state::TCP_SYN_SENT,
        |dp| dnat_tcp(dp, &seg(cl, TcpFlags::SYN), a()),
    )?;
    f.check_nat(a(), frontend(PROTO_TCP), NEW_REV_NAT_ID)?;
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[
            ("new_flow", 2),
            ("reply", 1),
            ("established", 1),
            ("ct_tuple_reused", 1)
        ])
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn retransmitted_syn_on_a_live_entry_keeps_its_backend() -> Result<()> {
    let (mut dp, _) = with_service(PROTO_TCP, &[a(), b(), backend(2)])?;
    let cl = client(43_030);
    let syn = seg(cl, TcpFlags::SYN);
    let (first, to) = syn_to_a_member(&mut dp, &syn, &[a(), b(), backend(2)])?;
    for _ in 0..5 {
        dnat_tcp(&dp, &syn, to)?;
    }
    let f = flow(&mut dp, first.fwd_key)?;
    // (A SYN on a live entry may refresh the expiry: it re-checks the pair at once.)
    let same =
        |x: CtValue, y: CtValue| CtValue { expires_ns: 0, ..x } == CtValue { expires_ns: 0, ..y };
    ensure!(
        same(f.fwd, first.fwd) && same(f.rep, first.rep),
        "entries changed: {first:?} -> {f:?}"
    );
    // Also once established (a SYN from a client that lost its state).
    snat_tcp(&dp, &answer(to.addr, cl, TcpFlags::SYN_ACK))?;
    dnat_tcp(&dp, &syn, to)?;
    let f = flow(&mut dp, first.fwd_key)?;
    f.check_nat(to, frontend(PROTO_TCP), REV_NAT_ID)?;
    ensure!(f.fwd.state == ct_state::TCP_ESTABLISHED, "{f:?}");
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[("new_flow", 1), ("established", 6), ("reply", 1)])
    );
    Ok(())
}

/// A busy client over time: four source ports, each used for connection after connection
/// (SYN, SYN-ACK, data, RST: the port's flow is closed and lives on until the next SYN takes
/// the tuple over), against a Service of three pods that is scaled down to two, then to one,
/// and back to three. Each new connection must go to a current member, be restored on its
/// answers, and leave exactly one pair per port: the old flow's reply entry is gone when the
/// new one went to another pod (its late answer is not rewritten), reused when it went to the
/// same pod.
#[test]
#[ignore = "needs root"]
fn ports_reused_connection_after_connection_through_scaling_keep_one_pair_each() -> Result<()> {
    let all = [a(), b(), backend(2)];
    let (mut dp, svc) = with_service(PROTO_TCP, &all)?;
    let ports = [43_060, 43_061, 43_062, 43_063];
    let mut last: BTreeMap<u16, BackendSpec> = BTreeMap::new();
    let (mut moved, mut same) = (0, 0);
    let mut current = svc.clone();
    for round in 0..24 {
        match round {
            8 => current = dp.remove_from_service(&current, backend(2).id)?,
            12 => current = dp.remove_from_service(&current, b().id)?,
            16 => {
                current = svc.clone();
                dp.set_service(&current)?;
            }
            _ => {}
        }
        for &p in &ports {
            let cl = client(p);
            let syn = Tcp {
                seq: 10_000 + round,
                ..seg(cl, TcpFlags::SYN)
            };
            let (f, to) = syn_to_a_member(&mut dp, &syn, &current.backends)
                .with_context(|| format!("round {round}, port {p}"))?;
            f.check_nat(to, frontend(PROTO_TCP), REV_NAT_ID)?;
            ensure!(
                f.fwd.state == ct_state::TCP_SYN_SENT,
                "round {round}: {f:?}"
            );
            if let Some(prev) = last.insert(p, to) {
                if prev.id != to.id {
                    moved += 1;
                    ensure_gone(&mut dp, &reply_key(prev.addr, cl, PROTO_TCP))?;
                    // The previous pod's late answer is not the new flow's: untouched.
                    expect_untouched(&dp, true, &answer(prev.addr, cl, TcpFlags::ACK).frame())?;
                } else {
                    same += 1;
                }
            }
            snat_tcp(&dp, &answer(to.addr, cl, TcpFlags::SYN_ACK))?;
            dnat_tcp(&dp, &data(cl), to)?;
            snat_tcp(&dp, &answer(to.addr, cl, TcpFlags::ACK))?;
            dnat_tcp(&dp, &seg(cl, TcpFlags::RST), to)?;
            let f = flow(&mut dp, fwd_key(cl, PROTO_TCP))?;
            ensure!(f.fwd.state == ct_state::TCP_CLOSED, "round {round}: {f:?}");
        }
        ensure!(
            ct_len(&mut dp)? == 2 * ports.len(),
            "round {round}: {:?}",
            dp.conntrack()?
        );
    }
    // Both ways of taking a tuple over happened (random selection over 3, then 1, then 3 pods).
    ensure!(moved > 0 && same > 0, "moved {moved}, same {same}");
    let st = dp.nonzero_stats()?;
    let conns = 24 * ports.len() as u64;
    ensure!(st.get("new_flow") == Some(&conns), "{st:?}");
    ensure!(
        st.get("ct_tuple_reused") == Some(&(conns - ports.len() as u64)),
        "{st:?}"
    );
    ensure!(st.get("ct_insert_failed").is_none(), "{st:?}");
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn non_syn_packet_keeps_its_backend_after_it_left_the_service() -> Result<()> {
    let (mut dp, svc) = with_service(PROTO_TCP, &[a()])?;
    let cl = client(43_040);
    let before = established(&mut dp, cl, a())?;
    move_service_to(&mut dp, &svc, b())?;
    dp.remove_backend(a().id)?;
    dnat_tcp(&dp, &data(cl), a())?;
    snat_tcp(&dp, &answer(a().addr, cl, TcpFlags::ACK))?;
    let f = flow(&mut dp, before.fwd_key)?;
    f.check_nat(a(), frontend(PROTO_TCP), REV_NAT_ID)?;
    ensure!(f.fwd.state == ct_state::TCP_ESTABLISHED);
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[("new_flow", 1), ("reply", 2), ("established", 1)])
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn udp_datagram_reselects_when_its_backend_left_this_frontend() -> Result<()> {
    let (mut dp, svc) = with_service(PROTO_UDP, &[a()])?;
    dp.set_service(&other_service(PROTO_UDP, &[a()]))?;
    let cl = client(43_050);
    let query = Udp::new(cl, frontend(PROTO_UDP), b"query");
    dnat_udp(&dp, &query, a())?;
    let mut reply = Udp::new(a().addr, cl, b"answer");
    reply.macs = (HOST_MAC, POD_MAC);
    snat_udp(&dp, &reply)?;
    move_service_to(&mut dp, &svc, b())?;
    let f = after(
        &mut dp,
        fwd_key(cl, PROTO_UDP),
        ct_state::UDP_UNREPLIED,
        |dp| dnat_udp(dp, &query, b()),
    )?;
    ensure_gone(&mut dp, &reply_key(a().addr, cl, PROTO_UDP))?;
    f.check_nat(b(), frontend(PROTO_UDP), REV_NAT_ID)?;
    ensure!(ct_len(&mut dp)? == 2, "{:?}", dp.conntrack()?);
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[("new_flow", 2), ("reply", 1), ("reselected", 1)])
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Direct (non-Service) traffic and stale reply entries
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root"]
fn direct_syn_removes_the_stale_reply_entry_and_is_not_rewritten() -> Result<()> {
    let (mut dp, _) = with_service(PROTO_TCP, &[a()])?;
    let cl = client(44_000);
    let old = established(&mut dp, cl, a())?;
    dnat_tcp(&dp, &seg(cl, TcpFlags::RST), a())?;
    // The client now connects to the pod itself from the same port.
    let direct = Tcp::new(cl, a().addr, TcpFlags::SYN);
    expect_untouched(&dp, false, &direct.frame())?;
    ensure_gone(&mut dp, &old.rep_key)?;
    assert_eq!(dp.stat(Stat::CtStaleReplyRemoved)?, 1);
    // The pod's SYN-ACK reaches the client from the pod, not from the ClusterIP.
    expect_untouched(&dp, true, &answer(a().addr, cl, TcpFlags::SYN_ACK).frame())?;
    expect_untouched(
        &dp,
        true,
        &Tcp {
            seq: 5_001,
            ..answer(a().addr, cl, TcpFlags::PSH_ACK)
        }
        .frame(),
    )?;
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[
            ("new_flow", 1),
            ("reply", 1),
            ("established", 1),
            ("ct_stale_reply_removed", 1)
        ])
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn pure_syn_into_the_pod_on_a_reply_entry_is_not_rewritten() -> Result<()> {
    let (mut dp, _) = with_service(PROTO_TCP, &[a()])?;
    let cl = client(44_001);
    dnat_tcp(&dp, &seg(cl, TcpFlags::SYN), a())?;
    let old = flow(&mut dp, fwd_key(cl, PROTO_TCP))?;
    // The backend pod opens a connection to the client with the flow's ports.
    let syn = Tcp {
        macs: (HOST_MAC, POD_MAC),
        ..Tcp::new(a().addr, cl, TcpFlags::SYN)
    };
    expect_untouched(&dp, true, &syn.frame())?;
    ensure_gone(&mut dp, &old.rep_key)?;
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[("new_flow", 1), ("ct_stale_reply_removed", 1)])
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Session affinity
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root"]
fn affinity_entry_whose_backend_left_the_service_is_ignored() -> Result<()> {
    let mut dp = load()?;
    let svc = ServiceSpec {
        flags: SVC_FLAG_CLUSTER_IP | SVC_FLAG_AFFINITY,
        affinity_timeout: 10_800,
        ..service(PROTO_TCP, &[a()])
    };
    dp.set_service(&svc)?;
    dp.set_service(&other_service(PROTO_TCP, &[a()]))?;
    dnat_tcp(&dp, &seg(client(45_000), TcpFlags::SYN), a())?;
    let aff = dp.affinity()?;
    ensure!(
        aff.len() == 1 && aff[0].0.rev_nat_id == REV_NAT_ID && aff[0].1.backend_id == a().id,
        "affinity {aff:?}"
    );
    move_service_to(&mut dp, &svc, b())?;
    // A is still a backend (of the other Service), but not of this one any more.
    for sport in 45_001..45_005 {
        dnat_tcp(&dp, &seg(client(sport), TcpFlags::SYN), b())?;
    }
    let aff = dp.affinity()?;
    ensure!(
        aff.len() == 1 && aff[0].1.backend_id == b().id,
        "affinity {aff:?}"
    );
    assert_eq!(dp.nonzero_stats()?, stats(&[("new_flow", 5)]));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Hairpin
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root"]
fn hairpin_flow_is_snated_to_the_link_local_address_and_bounced_back() -> Result<()> {
    let me = BackendSpec {
        id: 200,
        addr: SocketAddrV4::new(CLIENT_IP, 8080),
    };
    let (mut dp, _) = with_service(PROTO_TCP, &[me])?;
    let hairpin = Ipv4Addr::from(HAIRPIN_ADDR);
    let cl = client(46_000);
    let syn = seg(cl, TcpFlags::SYN);
    let ((), window) = timed(|| {
        let out = dp.from_pod(&syn.frame())?;
        expect_frame(
            &out,
            TC_ACT_REDIRECT,
            &Tcp {
                src: SocketAddrV4::new(hairpin, cl.port()),
                dst: me.addr,
                macs: (HOST_MAC, POD_MAC),
                ..syn.clone()
            }
            .frame(),
        )
    })?;
    let f = flow(&mut dp, fwd_key(cl, PROTO_TCP))?;
    ensure!(
        f.rep_key
            == ct_key(
                me.addr,
                SocketAddrV4::new(hairpin, cl.port()),
                PROTO_TCP,
                CT_REPLY
            ),
        "reply key {:?}",
        f.rep_key
    );
    ensure!(f.fwd.flags & CT_F_HAIRPIN != 0, "no hairpin flag: {f:?}");
    f.check_nat(me, frontend(PROTO_TCP), REV_NAT_ID)?;
    f.check_state(ct_state::TCP_SYN_SENT, window)?;

    // The pod answers itself: out of its veth (from_pod) to 169.254.42.1.
    let syn_ack = Tcp {
        seq: 5_000,
        ack: 1_001,
        ..Tcp::new(
            me.addr,
            SocketAddrV4::new(hairpin, cl.port()),
            TcpFlags::SYN_ACK,
        )
    };
    let out = dp.from_pod(&syn_ack.frame())?;
    expect_frame(
        &out,
        TC_ACT_REDIRECT,
        &Tcp {
            src: frontend(PROTO_TCP),
            dst: cl,
            macs: (HOST_MAC, POD_MAC),
            ..syn_ack.clone()
        }
        .frame(),
    )?;
    ensure!(flow(&mut dp, f.fwd_key)?.fwd.state == ct_state::TCP_ESTABLISHED);

    // Later client segments take the same path.
    let d = data(cl);
    let out = dp.from_pod(&d.frame())?;
    expect_frame(
        &out,
        TC_ACT_REDIRECT,
        &Tcp {
            src: SocketAddrV4::new(hairpin, cl.port()),
            dst: me.addr,
            macs: (HOST_MAC, POD_MAC),
            ..d.clone()
        }
        .frame(),
    )?;
    ensure!(ct_len(&mut dp)? == 2, "{:?}", dp.conntrack()?);
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[
            ("new_flow", 1),
            ("reply", 1),
            ("established", 1),
            ("hairpin", 3)
        ])
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// ICMP errors
// ---------------------------------------------------------------------------------------------

/// A UDP flow client -> frontend to A; returns the query as the backend received it.
fn udp_flow(dp: &TestDatapath, cl: SocketAddrV4) -> Result<Udp> {
    let query = Udp::new(cl, frontend(PROTO_UDP), b"query for a closed port");
    dnat_udp(dp, &query, a())?;
    Ok(Udp {
        dst: a().addr,
        ..query
    })
}

/// `err` through to_pod must come out as `want`, with every checksum (inner ones included)
/// right.
fn expect_icmp(out: &Outcome, want: &IcmpError, whole_quote: bool) -> Result<()> {
    expect_frame(out, TC_ACT_OK, &want.frame())?;
    let checked = verify_checksums(&out.frame)?;
    ensure!(
        checked.l4 && checked.inner_ip && checked.inner_l4 == whole_quote,
        "checked {checked:?}"
    );
    Ok(())
}

/// The backend answers the client's datagram with port unreachable quoting `quote(datagram)`:
/// to_pod must make it come from the frontend and quote what the client sent (the frontend).
fn port_unreachable_from_the_backend(
    sport: u16,
    quote: impl Fn(&Udp) -> Vec<u8>,
    whole_quote: bool,
) -> Result<()> {
    let (mut dp, _) = with_service(PROTO_UDP, &[a()])?;
    let received = udp_flow(&dp, client(sport))?;
    let err = IcmpError::new(
        *a().addr.ip(),
        CLIENT_IP,
        IcmpErrorKind::PortUnreachable,
        &quote(&received),
    );
    let sent = Udp {
        dst: frontend(PROTO_UDP),
        ..received
    };
    let want = IcmpError {
        src: VIP,
        quote: quote(&sent),
        ..err.clone()
    };
    expect_icmp(&dp.to_pod(&err.frame())?, &want, whole_quote)?;
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[("new_flow", 1), ("icmp_error_translated", 1)])
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn icmp_port_unreachable_from_the_backend_is_translated_back() -> Result<()> {
    port_unreachable_from_the_backend(47_000, |d| ip_packet(&d.frame()), true)
}

#[test]
#[ignore = "needs root"]
fn icmp_port_unreachable_quoting_only_8_bytes_is_translated_back() -> Result<()> {
    port_unreachable_from_the_backend(47_001, |d| ip_packet(&d.frame())[..28].to_vec(), false)
}

#[test]
#[ignore = "needs root"]
fn icmp_error_quoting_a_udp_datagram_without_checksum_keeps_it_zero() -> Result<()> {
    port_unreachable_from_the_backend(47_002, |d| ip_packet(&d.frame_without_checksum()), true)
}

#[test]
#[ignore = "needs root"]
fn icmp_time_exceeded_quoting_8_bytes_of_tcp_is_translated_back() -> Result<()> {
    let (mut dp, _) = with_service(PROTO_TCP, &[a()])?;
    let cl = client(47_003);
    let syn = seg(cl, TcpFlags::SYN);
    dnat_tcp(&dp, &syn, a())?;
    let received = Tcp {
        dst: a().addr,
        ..syn.clone()
    };
    // A router quotes the IP header and 8 bytes: ports and sequence number, no TCP checksum.
    let err = IcmpError::new(
        ROUTER,
        CLIENT_IP,
        IcmpErrorKind::TimeExceeded,
        &ip_packet(&received.frame())[..28],
    );
    let want = IcmpError {
        quote: ip_packet(&syn.frame())[..28].to_vec(),
        ..err.clone()
    };
    expect_icmp(&dp.to_pod(&err.frame())?, &want, false)?;
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[("new_flow", 1), ("icmp_error_translated", 1)])
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn icmp_frag_needed_for_a_tcp_flow_is_translated_back() -> Result<()> {
    let (mut dp, _) = with_service(PROTO_TCP, &[a()])?;
    let cl = client(47_010);
    established(&mut dp, cl, a())?;
    let big = Tcp {
        payload: vec![0x5a; 1_200],
        ..data(cl)
    };
    dnat_tcp(&dp, &big, a())?;
    let received = Tcp {
        dst: a().addr,
        ..big.clone()
    };
    let kind = IcmpErrorKind::FragNeeded { mtu: 1_100 };
    // Linux quotes up to 576 bytes; quote the headers and some payload (the TCP checksum is in).
    let err = IcmpError::new(
        *a().addr.ip(),
        CLIENT_IP,
        kind,
        &ip_packet(&received.frame())[..60],
    );
    let want = IcmpError {
        src: VIP,
        quote: ip_packet(&big.frame())[..60].to_vec(),
        ..err.clone()
    };
    expect_icmp(&dp.to_pod(&err.frame())?, &want, false)?;
    // With the whole segment quoted, the inner TCP checksum is checked too.
    let small = Tcp {
        payload: b"abc".to_vec(),
        ..data(cl)
    };
    dnat_tcp(&dp, &small, a())?;
    let received = Tcp {
        dst: a().addr,
        ..small.clone()
    };
    let err = IcmpError::new(
        *a().addr.ip(),
        CLIENT_IP,
        kind,
        &ip_packet(&received.frame()),
    );
    let want = IcmpError {
        src: VIP,
        quote: ip_packet(&small.frame()),
        ..err.clone()
    };
    expect_icmp(&dp.to_pod(&err.frame())?, &want, true)?;
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[
            ("new_flow", 1),
            ("reply", 1),
            ("established", 2),
            ("icmp_error_translated", 2)
        ])
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn icmp_time_exceeded_from_a_router_keeps_its_source_and_fixes_the_quote() -> Result<()> {
    let (mut dp, _) = with_service(PROTO_UDP, &[a()])?;
    let cl = client(47_020);
    let received = udp_flow(&dp, cl)?;
    let err = IcmpError::new(
        ROUTER,
        CLIENT_IP,
        IcmpErrorKind::TimeExceeded,
        &ip_packet(&received.frame()),
    );
    let want = IcmpError {
        quote: ip_packet(
            &Udp {
                dst: frontend(PROTO_UDP),
                ..received
            }
            .frame(),
        ),
        ..err.clone()
    };
    expect_icmp(&dp.to_pod(&err.frame())?, &want, true)?;
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[("new_flow", 1), ("icmp_error_translated", 1)])
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn icmp_error_from_the_client_about_a_reply_is_translated_toward_the_backend() -> Result<()> {
    let (mut dp, _) = with_service(PROTO_UDP, &[a()])?;
    let cl = client(47_030);
    udp_flow(&dp, cl)?;
    // The reply the client got (from the frontend), and the one the backend sent.
    let got = Udp::new(frontend(PROTO_UDP), cl, b"answer to a closed socket");
    let sent = Udp {
        src: a().addr,
        ..got.clone()
    };
    let err = IcmpError {
        macs: (POD_MAC, HOST_MAC),
        ..IcmpError::new(
            CLIENT_IP,
            VIP,
            IcmpErrorKind::PortUnreachable,
            &ip_packet(&got.frame()),
        )
    };
    let want = IcmpError {
        dst: *a().addr.ip(),
        quote: ip_packet(&sent.frame()),
        ..err.clone()
    };
    expect_icmp(&dp.from_pod(&err.frame())?, &want, true)?;
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[("new_flow", 1), ("icmp_error_translated", 1)])
    );
    Ok(())
}

/// Port unreachable from the backend quoting `sent` (through to_pod), and from the client
/// quoting `got` (through from_pod), must both pass untouched.
fn icmp_errors_pass_untouched(dp: &TestDatapath, sent: &Udp, got: &Udp) -> Result<()> {
    let err = IcmpError::new(
        *a().addr.ip(),
        CLIENT_IP,
        IcmpErrorKind::PortUnreachable,
        &ip_packet(&sent.frame()),
    );
    expect_untouched(dp, true, &err.frame()).context("error from the backend")?;
    let err = IcmpError {
        macs: (POD_MAC, HOST_MAC),
        ..IcmpError::new(
            CLIENT_IP,
            VIP,
            IcmpErrorKind::PortUnreachable,
            &ip_packet(&got.frame()),
        )
    };
    expect_untouched(dp, false, &err.frame()).context("error from the client")
}

#[test]
#[ignore = "needs root"]
fn icmp_error_for_an_unknown_flow_passes_untouched() -> Result<()> {
    let (mut dp, _) = with_service(PROTO_UDP, &[a()])?;
    udp_flow(&dp, client(47_040))?;
    // Another client port: no flow.
    let stranger = client(47_041);
    icmp_errors_pass_untouched(
        &dp,
        &Udp::new(stranger, a().addr, b"direct"),
        &Udp::new(frontend(PROTO_UDP), stranger, b"x"),
    )?;
    assert_eq!(dp.nonzero_stats()?, stats(&[("new_flow", 1)]));
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn icmp_error_for_an_expired_flow_passes_untouched() -> Result<()> {
    let (mut dp, _) = with_service(PROTO_UDP, &[a()])?;
    let cl = client(47_045);
    let received = udp_flow(&dp, cl)?;
    flow(&mut dp, fwd_key(cl, PROTO_UDP))?.set_expiry(&mut dp, now_coarse_ns() - 1)?;
    icmp_errors_pass_untouched(&dp, &received, &Udp::new(frontend(PROTO_UDP), cl, b"x"))?;
    assert_eq!(dp.nonzero_stats()?, stats(&[("new_flow", 1)]));
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn icmp_error_with_a_truncated_quote_passes_untouched() -> Result<()> {
    let (mut dp, _) = with_service(PROTO_UDP, &[a()])?;
    let cl = client(47_050);
    let received = ip_packet(&udp_flow(&dp, cl)?.frame());
    // Cut inside the quoted IP header, right after it (no L4 ports), and after the ports but
    // short of the 8 L4 bytes RFC 792 requires.
    for cut in [12, 20, 24] {
        let err = IcmpError::new(
            *a().addr.ip(),
            CLIENT_IP,
            IcmpErrorKind::PortUnreachable,
            &received[..cut],
        );
        expect_untouched(&dp, true, &err.frame())
            .with_context(|| format!("quote of {cut} bytes"))?;
    }
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[("new_flow", 1), ("pass_malformed", 3)])
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// IPv4 fragments
// ---------------------------------------------------------------------------------------------

/// A 72-byte UDP datagram (8 + 64) in two fragments: 48 bytes with the UDP header, then 24.
fn fragments_of(d: &Udp) -> (Vec<u8>, Vec<u8>) {
    let whole = d.frame();
    (
        fragment(&whole, 0..48, true),
        fragment(&whole, 48..72, false),
    )
}

fn big_query(cl: SocketAddrV4) -> Udp {
    let payload: Vec<u8> = (0..64u8).collect();
    Udp::new(cl, frontend(PROTO_UDP), &payload)
}

#[test]
#[ignore = "needs root"]
fn udp_fragments_follow_their_first_fragment() -> Result<()> {
    let (mut dp, _) = with_service(PROTO_UDP, &[a()])?;
    let cl = client(48_000);
    let query = big_query(cl);
    let (first, later) = fragments_of(&query);
    let (want_first, want_later) = fragments_of(&Udp {
        dst: a().addr,
        ..query.clone()
    });
    let out_first = dp.from_pod(&first)?;
    expect_frame(&out_first, TC_ACT_OK, &want_first).context("first fragment")?;
    let f = flow(&mut dp, fwd_key(cl, PROTO_UDP))?;
    f.check_nat(a(), frontend(PROTO_UDP), REV_NAT_ID)?;
    let frags = dp.frags()?;
    let want_key = FragKey {
        saddr: ip4(CLIENT_IP.octets()),
        daddr: ip4(VIP.octets()),
        id: 0x1234u16.to_be(),
        proto: PROTO_UDP,
        _pad: 0,
    };
    let want_value = FragValue {
        sport: port(cl.port()),
        dport: port(53),
    };
    ensure!(frags == vec![(want_key, want_value)], "FRAGS {frags:?}");

    let out_later = dp.from_pod(&later)?;
    expect_frame(&out_later, TC_ACT_OK, &want_later).context("later fragment")?;
    // The reassembled datagram has a right UDP checksum for its new destination.
    let mut udp = out_first.frame[34..].to_vec();
    udp.extend_from_slice(&out_later.frame[34..]);
    ensure!(udp.len() == 72);
    ensure!(
        l4_checksum_ok(CLIENT_IP.octets(), a().addr.ip().octets(), PROTO_UDP, &udp),
        "reassembled UDP checksum wrong"
    );
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[
            ("new_flow", 1),
            ("established", 1),
            ("fragment_translated", 1)
        ])
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn udp_reply_fragments_follow_their_first_fragment() -> Result<()> {
    let (mut dp, _) = with_service(PROTO_UDP, &[a()])?;
    let cl = client(48_010);
    dnat_udp(&dp, &Udp::new(cl, frontend(PROTO_UDP), b"q"), a())?;
    let payload: Vec<u8> = (100..164u8).collect();
    let reply = Udp {
        macs: (HOST_MAC, POD_MAC),
        ..Udp::new(a().addr, cl, &payload)
    };
    let (first, later) = fragments_of(&reply);
    let (want_first, want_later) = fragments_of(&Udp {
        src: frontend(PROTO_UDP),
        ..reply.clone()
    });
    expect_frame(&dp.to_pod(&first)?, TC_ACT_OK, &want_first).context("first fragment")?;
    expect_frame(&dp.to_pod(&later)?, TC_ACT_OK, &want_later).context("later fragment")?;
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[("new_flow", 1), ("reply", 2), ("fragment_translated", 1)])
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn later_fragment_of_an_unknown_datagram_passes_untouched() -> Result<()> {
    let (mut dp, _) = with_service(PROTO_UDP, &[a()])?;
    let cl = client(48_020);
    let query = big_query(cl);
    // The first fragment of datagram 0x1234 went through; 0x4321 was never seen.
    let (first, _) = fragments_of(&query);
    dp.from_pod(&first)?;
    let (_, later) = fragments_of(&query);
    let stranger = with_ip_id(&later, 0x4321);
    expect_untouched(&dp, false, &stranger)?;
    verify_checksums(&stranger)?;
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[("new_flow", 1), ("pass_fragment", 1)])
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The independent checksum verifier itself (no root needed)
// ---------------------------------------------------------------------------------------------

/// Recomputes the ICMP checksum of an option-less IPv4 ICMP frame in place.
fn fix_icmp_checksum(frame: &mut [u8]) {
    let icmp = &mut frame[34..];
    icmp[2..4].fill(0);
    let mut sum: u32 = icmp
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    icmp[2..4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

#[test]
fn checksum_verifier_rejects_each_wrong_checksum() -> Result<()> {
    let tcp = data(client(49_000)).frame();
    let udp = Udp::new(client(49_001), frontend(PROTO_UDP), b"odd length").frame();
    let icmp_udp = IcmpError::new(
        *a().addr.ip(),
        CLIENT_IP,
        IcmpErrorKind::PortUnreachable,
        &ip_packet(&udp),
    )
    .frame();
    let icmp_tcp = IcmpError::new(
        ROUTER,
        CLIENT_IP,
        IcmpErrorKind::FragNeeded { mtu: 1_400 },
        &ip_packet(&tcp),
    )
    .frame();
    for (what, frame, inner_l4) in [
        ("TCP", &tcp, false),
        ("UDP", &udp, false),
        ("ICMP/UDP", &icmp_udp, true),
        ("ICMP/TCP", &icmp_tcp, true),
    ] {
        let checked = verify_checksums(frame).with_context(|| what.to_string())?;
        ensure!(checked.l4 && checked.inner_ip == inner_l4 && checked.inner_l4 == inner_l4);
    }
    // (frame, byte to corrupt, whether to fix the ICMP checksum after, what must be caught)
    let ip_csum = 14 + 10;
    let l4 = 34;
    let inner = 34 + 8;
    let cases = [
        (&tcp, ip_csum, false, "IPv4 header"),
        (&tcp, 14 + 12, false, "IPv4 source"),
        (&tcp, l4 + 16, false, "TCP checksum"),
        (&tcp, tcp.len() - 1, false, "TCP payload"),
        (&udp, l4 + 6, false, "UDP checksum"),
        (&udp, 14 + 16, false, "UDP pseudo header (destination)"),
        (&udp, udp.len() - 1, false, "UDP last odd byte"),
        (&icmp_udp, l4 + 2, false, "ICMP checksum"),
        (&icmp_udp, l4 + 5, false, "ICMP rest of header"),
        (&icmp_udp, inner + 10, true, "quoted IPv4 header checksum"),
        (&icmp_udp, inner + 20 + 6, true, "quoted UDP checksum"),
        (&icmp_udp, inner + 20 + 2, true, "quoted UDP port"),
        (&icmp_tcp, inner + 20 + 16, true, "quoted TCP checksum"),
        (&icmp_tcp, inner + 16, true, "quoted destination"),
    ];
    for (frame, at, fix, what) in cases {
        let mut bad = frame.clone();
        bad[at] ^= 0x10;
        if fix {
            fix_icmp_checksum(&mut bad);
        }
        ensure!(
            verify_checksums(&bad).is_err(),
            "a wrong {what} was not caught"
        );
    }
    // A zero UDP checksum means none.
    let mut none = udp.clone();
    none[l4 + 6..l4 + 8].fill(0);
    verify_checksums(&none)?;
    Ok(())
}
