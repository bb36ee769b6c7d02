//! BPF_PROG_TEST_RUN tests of the real `from_pod` / `to_pod` programs: crafted frames in, exact
//! frames, verdicts and map side effects out. Frames are built and checked with etherparse
//! (see `xlb_tests::packet`), never with xlb's own code. Needs root.
//!
//! Run: `cargo test -p xlb-tests --test packet`

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::{ensure, Context as _, Result};
use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type, IpNumber, PacketBuilder};
use lb_common::{
    ct_state, ip4, port, AffinityValue, CT_FORWARD, CT_REPLY, PROTO_TCP, PROTO_UDP,
    SVC_FLAG_AFFINITY, SVC_FLAG_CLUSTER_IP,
};
use xlb_tests::packet::{
    build::{arp_request, as_fragment, ipv6_udp, Tcp, TcpFlags, Udp, HOST_MAC, POD_MAC},
    harness::{
        ct_key, now_coarse_ns, BackendSpec, ServiceSpec, TestDatapath, TC_ACT_OK, TC_ACT_REDIRECT,
        TC_ACT_SHOT,
    },
    verify::decode_checked,
};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKEND_IPS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 244, 1, 10),
    Ipv4Addr::new(10, 244, 1, 11),
    Ipv4Addr::new(10, 244, 2, 12),
];
const BACKEND_PORT: u16 = 9376;
const REV_NAT_ID: u32 = 7;

fn client(sport: u16) -> SocketAddrV4 {
    SocketAddrV4::new(CLIENT_IP, sport)
}

fn frontend(proto: u8) -> SocketAddrV4 {
    SocketAddrV4::new(VIP, if proto == PROTO_TCP { 80 } else { 53 })
}

fn backends() -> Vec<BackendSpec> {
    BACKEND_IPS
        .iter()
        .enumerate()
        .map(|(i, ip)| BackendSpec {
            id: 100 + i as u32,
            addr: SocketAddrV4::new(*ip, BACKEND_PORT),
        })
        .collect()
}

fn service(proto: u8, backends: Vec<BackendSpec>) -> ServiceSpec {
    ServiceSpec {
        frontend: frontend(proto),
        proto,
        rev_nat_id: REV_NAT_ID,
        flags: SVC_FLAG_CLUSTER_IP,
        affinity_timeout: 0,
        backends,
    }
}

/// A datapath with the three-backend Service for `proto`.
fn datapath_with_service(proto: u8) -> Result<TestDatapath> {
    let mut dp = TestDatapath::load()?;
    dp.set_service(&service(proto, backends()))?;
    Ok(dp)
}

fn stats(pairs: &[(&'static str, u64)]) -> BTreeMap<&'static str, u64> {
    pairs.iter().copied().collect()
}

fn backend_of(addr: SocketAddrV4) -> Result<BackendSpec> {
    backends()
        .into_iter()
        .find(|b| b.addr == addr)
        .with_context(|| format!("{addr} is not a backend"))
}

/// The destination of a translated frame (checksums verified on the way).
fn destination(frame: &[u8]) -> Result<SocketAddrV4> {
    let d = decode_checked(frame)?;
    let dport = match &d.l4 {
        xlb_tests::packet::verify::L4::Tcp(t) => t.destination_port,
        xlb_tests::packet::verify::L4::Udp(u) => u.destination_port,
        other => anyhow::bail!("unexpected L4 {other:?}"),
    };
    Ok(SocketAddrV4::new(Ipv4Addr::from(d.ip.destination), dport))
}

/// Sends `seg` through from_pod and checks it comes out as exactly `seg` sent to one of the
/// backends (so addresses, ports and every checksum match etherparse's). Returns the backend.
fn send_tcp(dp: &TestDatapath, seg: &Tcp) -> Result<BackendSpec> {
    let out = dp.from_pod(&seg.frame())?;
    ensure!(out.verdict == TC_ACT_OK, "verdict {}", out.verdict);
    let backend = backend_of(destination(&out.frame)?)?;
    let expected = Tcp {
        dst: backend.addr,
        ..seg.clone()
    }
    .frame();
    ensure!(
        out.frame == expected,
        "translated frame differs:\n got {:02x?}\nwant {:02x?}",
        out.frame,
        expected
    );
    Ok(backend)
}

fn send_udp(dp: &TestDatapath, dgram: &Udp) -> Result<BackendSpec> {
    let out = dp.from_pod(&dgram.frame())?;
    ensure!(out.verdict == TC_ACT_OK, "verdict {}", out.verdict);
    let backend = backend_of(destination(&out.frame)?)?;
    let expected = Udp {
        dst: backend.addr,
        ..dgram.clone()
    }
    .frame();
    ensure!(
        out.frame == expected,
        "translated frame differs:\n got {:02x?}\nwant {:02x?}",
        out.frame,
        expected
    );
    Ok(backend)
}

/// The conntrack pair of one flow client -> frontend translated to `backend`, and nothing else.
fn assert_ct_pair(
    dp: &mut TestDatapath,
    cl: SocketAddrV4,
    proto: u8,
    backend: BackendSpec,
) -> Result<()> {
    let ct: BTreeMap<_, _> = dp.conntrack()?.into_iter().collect();
    ensure!(ct.len() == 2, "expected 2 conntrack entries, got {ct:?}");
    let fwd = ct
        .get(&ct_key(cl, frontend(proto), proto, CT_FORWARD))
        .context("no forward entry")?;
    ensure!(
        fwd.backend_id == backend.id,
        "forward backend id {}",
        fwd.backend_id
    );
    ensure!(fwd.nat_addr == ip4(backend.addr.ip().octets()) && fwd.nat_port == port(BACKEND_PORT));
    ensure!(fwd.rev_nat_id == REV_NAT_ID);
    let rep = ct
        .get(&ct_key(backend.addr, cl, proto, CT_REPLY))
        .context("no reply entry")?;
    ensure!(rep.nat_addr == ip4(VIP.octets()) && rep.nat_port == port(frontend(proto).port()));
    ensure!(rep.backend_id == backend.id && rep.rev_nat_id == REV_NAT_ID);
    // Both entries carry the same state and expiry, and point at each other.
    let fwd_key = ct_key(cl, frontend(proto), proto, CT_FORWARD);
    let rep_key = ct_key(backend.addr, cl, proto, CT_REPLY);
    ensure!(fwd_key.pair(fwd) == rep_key && rep_key.pair(rep) == fwd_key);
    ensure!(
        fwd.state == rep.state && fwd.expires_ns == rep.expires_ns,
        "entries differ: {fwd:?} / {rep:?}"
    );
    let want_state = if proto == PROTO_TCP {
        [ct_state::TCP_SYN_SENT, ct_state::TCP_ESTABLISHED]
    } else {
        [ct_state::UDP_UNREPLIED, ct_state::UDP_REPLIED]
    };
    ensure!(
        want_state.contains(&fwd.state),
        "state {}",
        ct_state::name(fwd.state)
    );
    ensure!(
        fwd.expires_ns > now_coarse_ns(),
        "entry already expired: {fwd:?}"
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn tcp_flow_is_translated_tracked_and_reverse_translated() -> Result<()> {
    let mut dp = datapath_with_service(PROTO_TCP)?;
    let cl = client(40_000);
    let syn = Tcp::new(cl, frontend(PROTO_TCP), TcpFlags::SYN);
    let backend = send_tcp(&dp, &syn)?;
    assert_ct_pair(&mut dp, cl, PROTO_TCP, backend)?;

    // A later segment of the same flow goes to the same backend.
    let data = Tcp {
        seq: 1_001,
        ack: 5_001,
        flags: TcpFlags::PSH_ACK,
        payload: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        ..syn.clone()
    };
    ensure!(
        send_tcp(&dp, &data)?.id == backend.id,
        "flow moved to another backend"
    );

    // The backend's answer reaches the client from the frontend.
    let mut syn_ack = Tcp::new(backend.addr, cl, TcpFlags::SYN_ACK);
    syn_ack.seq = 5_000;
    syn_ack.ack = 1_001;
    syn_ack.macs = (HOST_MAC, POD_MAC);
    let out = dp.to_pod(&syn_ack.frame())?;
    ensure!(out.verdict == TC_ACT_OK);
    let expected = Tcp {
        src: frontend(PROTO_TCP),
        ..syn_ack.clone()
    }
    .frame();
    decode_checked(&out.frame)?;
    ensure!(
        out.frame == expected,
        "reply differs:\n got {:02x?}\nwant {:02x?}",
        out.frame,
        expected
    );

    assert_ct_pair(&mut dp, cl, PROTO_TCP, backend)?;
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[("new_flow", 1), ("established", 1), ("reply", 1)])
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn udp_flow_is_translated_tracked_and_reverse_translated() -> Result<()> {
    let mut dp = datapath_with_service(PROTO_UDP)?;
    let cl = client(33_333);
    let query = Udp::new(cl, frontend(PROTO_UDP), b"\x12\x34 dns query");
    let backend = send_udp(&dp, &query)?;
    assert_ct_pair(&mut dp, cl, PROTO_UDP, backend)?;
    ensure!(
        send_udp(
            &dp,
            &Udp {
                payload: b"second".to_vec(),
                ..query.clone()
            }
        )?
        .id == backend.id
    );

    let mut answer = Udp::new(backend.addr, cl, b"\x12\x34 dns answer");
    answer.macs = (HOST_MAC, POD_MAC);
    let out = dp.to_pod(&answer.frame())?;
    ensure!(out.verdict == TC_ACT_OK);
    decode_checked(&out.frame)?;
    ensure!(
        out.frame
            == Udp {
                src: frontend(PROTO_UDP),
                ..answer
            }
            .frame(),
        "reply differs"
    );
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[("new_flow", 1), ("established", 1), ("reply", 1)])
    );
    Ok(())
}

/// Keeps this test's thread on the CPU it runs on: the per-CPU slot `from_pod` writes is only
/// seen by a `to_pod` run on the same CPU, as on a node (one softirq carries the packet through
/// both).
fn stay_on_this_cpu() -> Result<()> {
    // SAFETY: plain syscalls about the calling thread; `set` is a zeroed, then filled cpu_set_t.
    unsafe {
        let cpu = libc::sched_getcpu();
        ensure!(
            cpu >= 0,
            "sched_getcpu: {}",
            std::io::Error::last_os_error()
        );
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        ensure!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) == 0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// The packet `from_pod` just translated meets `to_pod` next on a node (the backend's veth):
/// there it passes untouched without a reply lookup, and is counted. A SYN still takes the
/// lookup (where stale reversed flows are removed), answers are still restored, and a tuple
/// that is not the last one translated takes the lookup as before: over several flows in turn,
/// TCP and UDP, the frames out are exactly what they were without the shortcut.
#[test]
#[ignore = "needs root"]
fn to_pod_passes_the_packet_from_pod_just_translated() -> Result<()> {
    stay_on_this_cpu()?;
    for proto in [PROTO_TCP, PROTO_UDP] {
        let mut dp = datapath_with_service(proto)?;
        let mut passed = 0;
        let mut replies = 0;
        for round in 0..3u16 {
            let flows: Vec<SocketAddrV4> =
                (0..3).map(|k| client(41_000 + 10 * round + k)).collect();
            let mut translated = Vec::new();
            for &cl in &flows {
                // The first packet of each flow (a SYN for TCP): to_pod takes the lookup.
                let (first, later) = if proto == PROTO_TCP {
                    let syn = Tcp::new(cl, frontend(proto), TcpFlags::SYN);
                    let data = Tcp {
                        seq: 1_001,
                        ack: 5_001,
                        flags: TcpFlags::PSH_ACK,
                        payload: b"GET /".to_vec(),
                        ..syn.clone()
                    };
                    (syn.frame(), data.frame())
                } else {
                    let q = Udp::new(cl, frontend(proto), b"query");
                    let q2 = Udp {
                        payload: b"again".to_vec(),
                        ..q.clone()
                    };
                    (q.frame(), q2.frame())
                };
                let out = dp.from_pod(&first)?;
                ensure!(out.verdict == TC_ACT_OK);
                let before = dp.stat(lb_common::Stat::ForwardPassed)?;
                let fwd = dp.to_pod(&out.frame)?;
                ensure!(
                    fwd.verdict == TC_ACT_OK && fwd.frame == out.frame,
                    "first packet changed by to_pod"
                );
                if proto == PROTO_TCP {
                    ensure!(
                        dp.stat(lb_common::Stat::ForwardPassed)? == before,
                        "a SYN skipped the reply lookup"
                    );
                } else {
                    passed += 1;
                }
                // A later packet right after its translation: passed without a lookup.
                let out = dp.from_pod(&later)?;
                ensure!(out.verdict == TC_ACT_OK);
                let fwd = dp.to_pod(&out.frame)?;
                ensure!(
                    fwd.verdict == TC_ACT_OK && fwd.frame == out.frame,
                    "later packet changed by to_pod"
                );
                passed += 1;
                ensure!(
                    dp.stat(lb_common::Stat::ForwardPassed)? == passed,
                    "not passed as the last translated"
                );
                translated.push((cl, out.frame));
            }
            // Out of order (another flow was translated since): the lookup runs, misses, and
            // the packet passes untouched all the same.
            for (_, frame) in translated.iter().take(2) {
                let fwd = dp.to_pod(frame)?;
                ensure!(fwd.verdict == TC_ACT_OK && fwd.frame == *frame);
            }
            ensure!(dp.stat(lb_common::Stat::ForwardPassed)? == passed);
            // Each backend's answer is still restored to the frontend.
            for (cl, frame) in &translated {
                let backend = destination(frame)?;
                let answer = if proto == PROTO_TCP {
                    let mut a = Tcp::new(backend, *cl, TcpFlags::ACK);
                    a.macs = (HOST_MAC, POD_MAC);
                    (
                        a.frame(),
                        Tcp {
                            src: frontend(proto),
                            ..a
                        }
                        .frame(),
                    )
                } else {
                    let mut a = Udp::new(backend, *cl, b"answer");
                    a.macs = (HOST_MAC, POD_MAC);
                    (
                        a.frame(),
                        Udp {
                            src: frontend(proto),
                            ..a
                        }
                        .frame(),
                    )
                };
                let out = dp.to_pod(&answer.0)?;
                ensure!(out.verdict == TC_ACT_OK);
                decode_checked(&out.frame)?;
                ensure!(out.frame == answer.1, "answer not restored");
                replies += 1;
            }
            ensure!(dp.stat(lb_common::Stat::Reply)? == replies);
        }
    }
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn udp_zero_checksum_stays_zero() -> Result<()> {
    let mut dp = datapath_with_service(PROTO_UDP)?;
    let cl = client(33_334);
    let query = Udp::new(cl, frontend(PROTO_UDP), b"no checksum");
    let frame = query.frame_without_checksum();
    let out = dp.from_pod(&frame)?;
    ensure!(out.verdict == TC_ACT_OK);
    let backend = backend_of(destination(&out.frame)?)?;
    let expected = Udp {
        dst: backend.addr,
        ..query.clone()
    }
    .frame_without_checksum();
    ensure!(
        out.frame == expected,
        "got {:02x?}\nwant {:02x?}",
        out.frame,
        expected
    );

    let mut answer = Udp::new(backend.addr, cl, b"no checksum either");
    answer.macs = (HOST_MAC, POD_MAC);
    let out = dp.to_pod(&answer.frame_without_checksum())?;
    ensure!(
        out.frame
            == Udp {
                src: frontend(PROTO_UDP),
                ..answer
            }
            .frame_without_checksum()
    );
    assert_eq!(dp.nonzero_stats()?, stats(&[("new_flow", 1), ("reply", 1)]));
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn new_flows_spread_over_all_backends() -> Result<()> {
    let mut dp = datapath_with_service(PROTO_TCP)?;
    let mut per_backend: BTreeMap<u32, u32> = BTreeMap::new();
    for sport in 20_000..20_300 {
        let b = send_tcp(
            &dp,
            &Tcp::new(client(sport), frontend(PROTO_TCP), TcpFlags::SYN),
        )?;
        *per_backend.entry(b.id).or_default() += 1;
    }
    // Uniform over 3: about 100 each; below 50 has a probability far under 1e-9.
    ensure!(
        per_backend.len() == 3,
        "not all backends used: {per_backend:?}"
    );
    ensure!(
        per_backend.values().all(|n| *n >= 50),
        "skewed spread: {per_backend:?}"
    );
    ensure!(
        dp.conntrack()?.len() == 600,
        "expected a forward and a reply entry per flow"
    );
    assert_eq!(dp.nonzero_stats()?, stats(&[("new_flow", 300)]));
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn session_affinity_keeps_a_client_on_one_backend() -> Result<()> {
    let mut dp = TestDatapath::load()?;
    let mut svc = service(PROTO_TCP, backends());
    svc.flags |= SVC_FLAG_AFFINITY;
    svc.affinity_timeout = 10_800;
    dp.set_service(&svc)?;
    let mut chosen = BTreeSet::new();
    for sport in 30_000..30_030 {
        chosen.insert(
            send_tcp(
                &dp,
                &Tcp::new(client(sport), frontend(PROTO_TCP), TcpFlags::SYN),
            )?
            .id,
        );
    }
    ensure!(chosen.len() == 1, "affine client used {chosen:?}");
    let aff = dp.affinity()?;
    ensure!(aff.len() == 1, "affinity entries {aff:?}");
    let (key, value) = aff[0];
    ensure!(key.client == ip4(CLIENT_IP.octets()) && key.rev_nat_id == REV_NAT_ID);
    ensure!(chosen.contains(&value.backend_id));
    assert_eq!(dp.nonzero_stats()?, stats(&[("new_flow", 30)]));

    // A record older than the timeout is stale: flows spread again. The record is aged on the
    // coarse clock before each new flow (the clock the test controls).
    let mut dp = TestDatapath::load()?;
    svc.affinity_timeout = 1;
    dp.set_service(&svc)?;
    let mut chosen = BTreeSet::new();
    for sport in 30_000..30_030 {
        for (key, value) in dp.affinity()? {
            let last_used_ns = now_coarse_ns() - 2_000_000_000;
            dp.affinity_set(
                &key,
                AffinityValue {
                    last_used_ns,
                    ..value
                },
            )?;
        }
        chosen.insert(
            send_tcp(
                &dp,
                &Tcp::new(client(sport), frontend(PROTO_TCP), TcpFlags::SYN),
            )?
            .id,
        );
    }
    ensure!(
        chosen.len() > 1,
        "expired affinity still pinned the client to {chosen:?}"
    );
    Ok(())
}

/// Removes `gone` from the Service (the agent rewrites slots and master, deletes the member
/// entry, then the backend).
fn remove_from_service(dp: &mut TestDatapath, proto: u8, gone: BackendSpec) -> Result<()> {
    dp.remove_from_service(&service(proto, backends()), gone.id)?;
    dp.remove_backend(gone.id)
}

#[test]
#[ignore = "needs root"]
fn udp_flow_is_reselected_when_its_backend_goes() -> Result<()> {
    let mut dp = datapath_with_service(PROTO_UDP)?;
    let cl = client(44_444);
    let dgram = Udp::new(cl, frontend(PROTO_UDP), b"ping");
    let first = send_udp(&dp, &dgram)?;
    remove_from_service(&mut dp, PROTO_UDP, first)?;
    let second = send_udp(&dp, &dgram)?;
    ensure!(
        second.id != first.id,
        "UDP flow stayed on removed backend {first:?}"
    );
    assert_ct_pair(&mut dp, cl, PROTO_UDP, second)?;
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[("new_flow", 2), ("reselected", 1)])
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn tcp_flow_keeps_its_backend_when_it_goes() -> Result<()> {
    let mut dp = datapath_with_service(PROTO_TCP)?;
    let cl = client(44_445);
    let syn = Tcp::new(cl, frontend(PROTO_TCP), TcpFlags::SYN);
    let first = send_tcp(&dp, &syn)?;
    remove_from_service(&mut dp, PROTO_TCP, first)?;
    let ack = Tcp {
        seq: 1_001,
        ack: 1,
        flags: TcpFlags::ACK,
        ..syn.clone()
    };
    ensure!(send_tcp(&dp, &ack)?.id == first.id, "TCP flow moved");
    assert_ct_pair(&mut dp, cl, PROTO_TCP, first)?;

    // A new connection reusing the tuple (a fresh SYN) must not go to the departed backend.
    let again = send_tcp(&dp, &Tcp { seq: 90_000, ..syn })?;
    ensure!(
        again.id != first.id,
        "new SYN sent to removed backend {first:?}"
    );
    assert_ct_pair(&mut dp, cl, PROTO_TCP, again)?;
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[("new_flow", 2), ("established", 1), ("ct_tuple_reused", 1)])
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn ipv4_options_are_translated() -> Result<()> {
    let mut dp = datapath_with_service(PROTO_TCP)?;
    let cl = client(40_001);
    let mut syn = Tcp::new(cl, frontend(PROTO_TCP), TcpFlags::SYN);
    syn.ip_options = vec![1, 1, 1, 1, 1, 1, 1, 0]; // NOPs + end of list: IHL 7
    syn.payload = b"with options".to_vec();
    let backend = send_tcp(&dp, &syn)?;
    assert_ct_pair(&mut dp, cl, PROTO_TCP, backend)?;

    let mut reply = Tcp::new(backend.addr, cl, TcpFlags::SYN_ACK);
    reply.ip_options = vec![1, 1, 1, 0];
    reply.macs = (HOST_MAC, POD_MAC);
    let out = dp.to_pod(&reply.frame())?;
    ensure!(
        out.frame
            == Tcp {
                src: frontend(PROTO_TCP),
                ..reply
            }
            .frame(),
        "reply with options differs"
    );
    assert_eq!(dp.nonzero_stats()?, stats(&[("new_flow", 1), ("reply", 1)]));
    Ok(())
}

/// Katran-style fixtures: frames that must come out byte-identical with TC_ACT_OK and no
/// conntrack entry, from both programs.
#[test]
#[ignore = "needs root"]
fn frames_that_are_not_ours_pass_untouched() -> Result<()> {
    let mut dp = datapath_with_service(PROTO_TCP)?;
    let syn = Tcp::new(client(40_002), frontend(PROTO_TCP), TcpFlags::SYN).frame();
    let direct_syn = Tcp::new(
        client(40_002),
        SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 10), BACKEND_PORT),
        TcpFlags::SYN,
    )
    .frame();
    let mut bad_ihl = syn.clone();
    bad_ihl[14] = 0x44;
    let mut icmp_echo = Vec::new();
    PacketBuilder::ethernet2(POD_MAC, HOST_MAC)
        .ipv4(CLIENT_IP.octets(), VIP.octets(), 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut icmp_echo, b"ping")?;
    let cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        (
            "TCP to a non-Service address",
            Tcp::new(
                client(40_003),
                SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 99), 80),
                TcpFlags::SYN,
            )
            .frame(),
            None,
        ),
        (
            "TCP to the Service IP on another port",
            Tcp::new(client(40_004), SocketAddrV4::new(VIP, 81), TcpFlags::SYN).frame(),
            None,
        ),
        (
            "UDP to a TCP-only frontend",
            Udp::new(client(40_005), frontend(PROTO_TCP), b"x").frame(),
            None,
        ),
        ("ICMP echo to the Service IP", icmp_echo, None),
        ("ARP request", arp_request(), None),
        ("IPv6 UDP", ipv6_udp(), None),
        (
            "cut in the TCP header",
            syn[..14 + 20 + 10].to_vec(),
            Some("pass_malformed"),
        ),
        ("IPv4 header length 16", bad_ihl, Some("pass_malformed")),
        (
            // First fragments of Service flows are translated (tests/tests/packet_conntrack.rs);
            // one to another address is not ours.
            "first fragment to a non-Service address",
            as_fragment(&direct_syn, true, 0),
            None,
        ),
        (
            "later fragment whose first fragment was not seen",
            as_fragment(&syn, false, 185),
            Some("pass_fragment"),
        ),
    ];
    let mut expected_stats = BTreeMap::new();
    for (what, frame, stat) in &cases {
        for (prog, out) in [
            ("from_pod", dp.from_pod(frame)?),
            ("to_pod", dp.to_pod(frame)?),
        ] {
            ensure!(
                out.verdict == TC_ACT_OK,
                "{what} via {prog}: verdict {}",
                out.verdict
            );
            ensure!(&out.frame == frame, "{what} via {prog}: frame changed");
            if let Some(stat) = stat {
                *expected_stats.entry(*stat).or_insert(0) += 1;
            }
        }
        ensure!(dp.conntrack()?.is_empty(), "{what}: conntrack written");
    }
    assert_eq!(dp.nonzero_stats()?, expected_stats);
    Ok(())
}

/// A Service whose master entry says "no endpoints".
fn datapath_without_endpoints(proto: u8) -> Result<TestDatapath> {
    let mut dp = TestDatapath::load()?;
    dp.set_service(&service(proto, Vec::new()))?;
    Ok(dp)
}

#[test]
#[ignore = "needs root"]
fn tcp_to_a_service_without_endpoints_is_reset() -> Result<()> {
    let mut dp = datapath_without_endpoints(PROTO_TCP)?;
    let cl = client(40_010);
    // (segment, expected RST seq, expected RST ack): the answer never has IP options.
    let syn = Tcp {
        seq: 1_000,
        ..Tcp::new(cl, frontend(PROTO_TCP), TcpFlags::SYN)
    };
    let data = Tcp {
        seq: 5_000,
        ack: 7_777,
        flags: TcpFlags::PSH_ACK,
        payload: b"hello".to_vec(),
        ..syn.clone()
    };
    let with_options = Tcp {
        ip_options: vec![1, 1, 1, 0],
        payload: vec![7; 100],
        ..data.clone()
    };
    for (seg, want_seq, want_ack) in [
        (syn, 0, 1_001),
        (data, 7_777, 5_005),
        (with_options, 7_777, 5_100),
    ] {
        let out = dp.from_pod(&seg.frame())?;
        ensure!(out.verdict == TC_ACT_REDIRECT, "verdict {}", out.verdict);
        ensure!(
            out.frame.len() == 54,
            "RST frame is {} bytes",
            out.frame.len()
        );
        let d = decode_checked(&out.frame)?;
        ensure!(
            d.eth.source == HOST_MAC && d.eth.destination == POD_MAC,
            "MACs not swapped"
        );
        ensure!(
            d.ip.source == VIP.octets() && d.ip.destination == CLIENT_IP.octets(),
            "IPs not swapped"
        );
        ensure!(d.ip.protocol == IpNumber::TCP && d.ip.time_to_live == 64);
        let tcp = d.tcp()?;
        ensure!(
            tcp.source_port == 80 && tcp.destination_port == cl.port(),
            "ports not swapped"
        );
        ensure!(
            tcp.rst && tcp.ack && !tcp.syn && !tcp.fin && !tcp.psh,
            "flags {tcp:?}"
        );
        ensure!(
            tcp.sequence_number == want_seq,
            "seq {}",
            tcp.sequence_number
        );
        ensure!(
            tcp.acknowledgment_number == want_ack,
            "ack {}",
            tcp.acknowledgment_number
        );
        ensure!(d.payload.is_empty());
    }
    // A RST is never answered.
    let rst = Tcp::new(cl, frontend(PROTO_TCP), TcpFlags::RST);
    ensure!(dp.from_pod(&rst.frame())?.verdict == TC_ACT_SHOT);
    ensure!(dp.conntrack()?.is_empty());
    assert_eq!(dp.nonzero_stats()?, stats(&[("refused_tcp", 4)]));
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn udp_to_a_service_without_endpoints_gets_port_unreachable() -> Result<()> {
    let mut dp = datapath_without_endpoints(PROTO_UDP)?;
    let cl = client(40_020);
    // An empty datagram (the frame grows) and a long one (the frame shrinks).
    for payload in [Vec::new(), vec![0xab; 200]] {
        let dgram = Udp::new(cl, frontend(PROTO_UDP), &payload);
        let frame = dgram.frame();
        let out = dp.from_pod(&frame)?;
        ensure!(out.verdict == TC_ACT_REDIRECT, "verdict {}", out.verdict);
        ensure!(
            out.frame.len() == 14 + 20 + 8 + 20 + 8,
            "ICMP frame is {} bytes",
            out.frame.len()
        );
        let d = decode_checked(&out.frame)?;
        ensure!(
            d.eth.source == HOST_MAC && d.eth.destination == POD_MAC,
            "MACs not swapped"
        );
        ensure!(d.ip.source == VIP.octets() && d.ip.destination == CLIENT_IP.octets());
        ensure!(d.ip.protocol == IpNumber::ICMP && d.ip.time_to_live == 64);
        let icmp = d.icmp()?;
        ensure!(
            icmp.icmp_type == Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
            "ICMP type {:?}",
            icmp.icmp_type
        );
        ensure!(
            d.payload == frame[14..14 + 20 + 8],
            "quote is not the original IP header + 8 bytes"
        );
    }
    // Quoting a header with options is not supported: such a datagram is dropped, not answered.
    let with_options = Udp {
        ip_options: vec![1, 1, 1, 0],
        ..Udp::new(cl, frontend(PROTO_UDP), b"x")
    };
    ensure!(dp.from_pod(&with_options.frame())?.verdict == TC_ACT_SHOT);
    ensure!(dp.conntrack()?.is_empty());
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[("refused_udp", 2), ("drop_unrefusable", 1)])
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn unallocated_addresses_in_the_service_cidr_are_refused() -> Result<()> {
    let mut dp = TestDatapath::load_with_service_cidr(Some((Ipv4Addr::new(10, 96, 0, 0), 12)))?;
    dp.set_service(&service(PROTO_TCP, backends()))?;
    let cl = client(40_020);
    // The Service itself is still translated.
    let backend = send_tcp(&dp, &Tcp::new(cl, frontend(PROTO_TCP), TcpFlags::SYN))?;
    ensure!(backends().iter().any(|b| b.id == backend.id));
    // Another port of the ClusterIP, and an unallocated ClusterIP: RST from that address.
    for dst in [
        SocketAddrV4::new(VIP, 81),
        SocketAddrV4::new(Ipv4Addr::new(10, 111, 3, 4), 80),
    ] {
        let out = dp.from_pod(&Tcp::new(cl, dst, TcpFlags::SYN).frame())?;
        ensure!(
            out.verdict == TC_ACT_REDIRECT,
            "{dst}: verdict {}",
            out.verdict
        );
        let d = decode_checked(&out.frame)?;
        ensure!(
            d.ip.source == dst.ip().octets() && d.tcp()?.rst,
            "{dst}: not a RST from the address"
        );
    }
    // UDP to an unallocated ClusterIP: port unreachable.
    let out = dp.from_pod(
        &Udp::new(
            cl,
            SocketAddrV4::new(Ipv4Addr::new(10, 100, 0, 1), 53),
            b"q",
        )
        .frame(),
    )?;
    ensure!(
        out.verdict == TC_ACT_REDIRECT && out.frame.len() == 70,
        "verdict {}",
        out.verdict
    );
    // Outside the CIDR: untouched.
    let outside = Tcp::new(
        cl,
        SocketAddrV4::new(Ipv4Addr::new(10, 112, 0, 1), 80),
        TcpFlags::SYN,
    )
    .frame();
    let out = dp.from_pod(&outside)?;
    ensure!(out.verdict == TC_ACT_OK && out.frame == outside);
    assert_eq!(
        dp.nonzero_stats()?,
        stats(&[("new_flow", 1), ("refused_tcp", 2), ("refused_udp", 1)])
    );
    Ok(())
}
