//! BPF_PROG_TEST_RUN tests of the dry run behind `xlb trace` (global `XLB_DRY_RUN` = 1): every
//! program of the dry-run object passes the verifier, the packets that write maps in a real
//! run (new flows with affinity and round-robin, a first fragment, a refusal, a state change of
//! a live flow, a stale entry that would be removed, a reply) leave conntrack, affinity,
//! round-robin, fragments and the counters exactly as they were, and the trace record says
//! what the run did (the counters it would have bumped, the flow it followed or would have set
//! up). The attached object (dry run 0) never touches the record. Needs root.
//!
//! Run: `cargo test -p xlb-tests --test packet_trace -- --include-ignored`

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{ensure, Result};
use lb_common::{
    ct_state, ip4, port, CtValue, Stat, TraceRecord, CT_FORWARD, CT_REPLY, PROTO_TCP, PROTO_UDP,
    SVC_FLAG_AFFINITY, SVC_FLAG_ALG_RR, SVC_FLAG_CLUSTER_IP, TRACE_FLOW_EXISTING, TRACE_FLOW_NEW,
};
use lb_userspace::datapath::LoadOptions;
use lb_userspace::trace::{read_record, reset_record, run_frame, stat_names};
use xlb_tests::packet::{
    build::{as_fragment, Tcp, TcpFlags, Udp},
    harness::{
        ct_key, now_coarse_ns, BackendSpec, ServiceSpec, TestDatapath, TC_ACT_OK, TC_ACT_REDIRECT,
    },
    verify::decode_checked,
};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const TCP_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
const UDP_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 53);
const EMPTY_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 20), 80);
const UNALLOCATED: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 99), 80);
const POD: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 50), 8080);

fn client(p: u16) -> SocketAddrV4 {
    SocketAddrV4::new(CLIENT_IP, p)
}

fn backends(first: u32) -> Vec<BackendSpec> {
    (0..3u8)
        .map(|i| BackendSpec {
            id: first + u32::from(i),
            addr: SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 10 + i), 9376),
        })
        .collect()
}

/// The Services of [`dry_datapath`]: TCP (affinity), UDP (round-robin), none without endpoints.
fn services() -> Vec<ServiceSpec> {
    vec![
        ServiceSpec {
            frontend: TCP_VIP,
            proto: PROTO_TCP,
            rev_nat_id: 1,
            flags: SVC_FLAG_CLUSTER_IP | SVC_FLAG_AFFINITY,
            affinity_timeout: 10_800,
            backends: backends(100),
        },
        ServiceSpec {
            frontend: UDP_VIP,
            proto: PROTO_UDP,
            rev_nat_id: 2,
            flags: SVC_FLAG_CLUSTER_IP | SVC_FLAG_ALG_RR,
            affinity_timeout: 0,
            backends: backends(200),
        },
        ServiceSpec {
            frontend: EMPTY_VIP,
            proto: PROTO_TCP,
            rev_nat_id: 3,
            flags: SVC_FLAG_CLUSTER_IP,
            affinity_timeout: 0,
            backends: vec![],
        },
    ]
}

/// The object (dry run or not) with [`services`], in a Service CIDR.
fn dry_datapath(dry_run: bool) -> Result<TestDatapath> {
    let mut dp = TestDatapath::load_options(&LoadOptions {
        service_cidr: Some((Ipv4Addr::new(10, 96, 0, 0), 12)),
        dry_run,
        ..LoadOptions::default()
    })?;
    for svc in services() {
        dp.set_service(&svc)?;
    }
    Ok(dp)
}

/// Everything the datapath may write, as comparable text.
fn snapshot(dp: &mut TestDatapath) -> Result<String> {
    let mut ct = dp.conntrack()?;
    ct.sort_by_key(|(k, _)| (k.saddr, k.daddr, k.sport, k.dport, k.proto, k.dir));
    let mut aff = dp.affinity()?;
    aff.sort_by_key(|(k, _)| (k.client, k.rev_nat_id));
    let svc_stats = services()
        .iter()
        .map(|svc| dp.svc_stats(svc))
        .collect::<Result<Vec<_>>>()?;
    Ok(format!(
        "ct {ct:?}\naffinity {aff:?}\nfrags {:?}\nrr {:?} {:?}\nstats {:?}\nper-Service {svc_stats:?}",
        dp.frags()?,
        dp.rr_counters(1)?,
        dp.rr_counters(2)?,
        dp.nonzero_stats()?
    ))
}

/// Runs `prog` on `frame` with a fresh record.
fn run(dp: &mut TestDatapath, prog: &str, frame: &[u8]) -> Result<(u32, Vec<u8>, TraceRecord)> {
    reset_record(dp.ebpf_mut())?;
    let out = run_frame(dp.ebpf_mut(), prog, frame, None)?;
    Ok((out.verdict, out.frame, out.record))
}

fn has(rec: &TraceRecord, s: Stat) -> bool {
    rec.stats & (1u64 << s as u32) != 0
}

#[test]
#[ignore = "needs root"]
fn dry_run_writes_no_map_and_records_what_it_did() -> Result<()> {
    let mut dp = dry_datapath(true)?;
    // A live flow (a SYN was seen: syn_sent) and an expired one, written as the datapath
    // would (direct map writes: only the datapath writes conntrack).
    let now = now_coarse_ns();
    let live_key = ct_key(client(41000), TCP_VIP, PROTO_TCP, CT_FORWARD);
    let live = CtValue {
        backend_id: 101,
        nat_addr: ip4([10, 244, 1, 11]),
        nat_port: port(9376),
        state: ct_state::TCP_SYN_SENT,
        rev_nat_id: 1,
        expires_ns: now + 60_000_000_000,
        ..CtValue::default()
    };
    dp.ct_set(&live_key, live)?;
    dp.ct_set(&live_key.pair(&live), live_key.pair_value(&live))?;
    let old_key = ct_key(client(41001), TCP_VIP, PROTO_TCP, CT_FORWARD);
    let old = CtValue {
        expires_ns: now.saturating_sub(1),
        ..live
    };
    dp.ct_set(&old_key, old)?;
    dp.ct_set(&old_key.pair(&old), old_key.pair_value(&old))?;
    let before = snapshot(&mut dp)?;

    // A new TCP flow to the affinity Service: a backend of it, the destination rewritten.
    let (v, out, rec) = run(
        &mut dp,
        "from_pod",
        &Tcp::new(client(40000), TCP_VIP, TcpFlags::SYN).frame(),
    )?;
    ensure!(v == TC_ACT_OK, "verdict {v}");
    ensure!(
        rec.flow_kind == TRACE_FLOW_NEW && (100..103).contains(&rec.flow.backend_id),
        "{rec:?}"
    );
    ensure!(
        rec.flow.rev_nat_id == 1 && has(&rec, Stat::NewFlow),
        "{rec:?} {:?}",
        stat_names(rec.stats)
    );
    let d = decode_checked(&out)?;
    ensure!(
        d.ip.destination == rec.flow.nat_addr.to_ne_bytes(),
        "DNAT to the recorded backend"
    );

    // A new UDP flow to the round-robin Service, and a first fragment of one.
    let udp = Udp::new(client(40001), UDP_VIP, b"q").frame();
    let (_, _, rec) = run(&mut dp, "from_pod", &udp)?;
    ensure!(
        rec.flow_kind == TRACE_FLOW_NEW && (200..203).contains(&rec.flow.backend_id),
        "{rec:?}"
    );
    let (_, _, rec) = run(&mut dp, "from_pod", &as_fragment(&udp, true, 0))?;
    ensure!(
        rec.flow_kind == TRACE_FLOW_NEW,
        "a first fragment starts the flow: {rec:?}"
    );

    // Refusals: no endpoints, and an unallocated Service-CIDR address.
    for dst in [EMPTY_VIP, UNALLOCATED] {
        let (v, _, rec) = run(
            &mut dp,
            "from_pod",
            &Tcp::new(client(40002), dst, TcpFlags::SYN).frame(),
        )?;
        ensure!(
            v == TC_ACT_REDIRECT && has(&rec, Stat::RefusedTcp),
            "{dst}: {v} {rec:?}"
        );
        ensure!(rec.flow_kind == 0, "{rec:?}");
    }

    // Not a Service: nothing recorded, nothing changed.
    let direct = Tcp::new(client(40003), POD, TcpFlags::SYN).frame();
    let (v, out, rec) = run(&mut dp, "from_pod", &direct)?;
    ensure!(
        v == TC_ACT_OK && out == direct && rec == TraceRecord::default(),
        "{rec:?}"
    );

    // The live flow: followed to its backend; a real run would move it to established.
    let (_, out, rec) = run(
        &mut dp,
        "from_pod",
        &Tcp::new(client(41000), TCP_VIP, TcpFlags::ACK).frame(),
    )?;
    ensure!(
        rec.flow_kind == TRACE_FLOW_EXISTING && rec.flow_dir == u32::from(CT_FORWARD),
        "{rec:?}"
    );
    ensure!(
        rec.flow.backend_id == 101 && has(&rec, Stat::Established),
        "{rec:?}"
    );
    ensure!(decode_checked(&out)?.ip.destination == [10, 244, 1, 11]);
    // Its reply, into the pod: the reply entry restores the frontend.
    let reply = Tcp::new(
        SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 11), 9376),
        client(41000),
        TcpFlags::SYN_ACK,
    )
    .frame();
    let (_, out, rec) = run(&mut dp, "to_pod", &reply)?;
    ensure!(
        rec.flow_kind == TRACE_FLOW_EXISTING && rec.flow_dir == u32::from(CT_REPLY),
        "{rec:?}"
    );
    ensure!(
        decode_checked(&out)?.ip.source == TCP_VIP.ip().octets(),
        "source restored"
    );

    // The expired flow: a real run removes the pair and starts over.
    let (_, _, rec) = run(
        &mut dp,
        "from_pod",
        &Tcp::new(client(41001), TCP_VIP, TcpFlags::SYN).frame(),
    )?;
    ensure!(
        rec.flow_kind == TRACE_FLOW_NEW && has(&rec, Stat::CtExpired),
        "{rec:?}"
    );

    // from_net (tc and XDP) on a new flow and on the live one: whatever they decide (no
    // DEVICES entry here: no SNAT source), they write nothing either.
    for prog in ["from_net", "from_net_xdp"] {
        for (sport, flags) in [(40004, TcpFlags::SYN), (41000, TcpFlags::ACK)] {
            run(
                &mut dp,
                prog,
                &Tcp::new(client(sport), TCP_VIP, flags).frame(),
            )?;
        }
    }

    let after = snapshot(&mut dp)?;
    ensure!(
        before == after,
        "a dry run changed the maps:\nbefore {before}\nafter  {after}"
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn the_attached_object_never_writes_the_record() -> Result<()> {
    let mut dp = dry_datapath(false)?;
    let out = run_frame(
        dp.ebpf_mut(),
        "from_pod",
        &Tcp::new(client(40000), TCP_VIP, TcpFlags::SYN).frame(),
        None,
    )?;
    ensure!(out.record == TraceRecord::default(), "{:?}", out.record);
    ensure!(read_record(dp.ebpf_mut())? == TraceRecord::default());
    // ... and it does write the maps (the real run the dry one is the image of).
    ensure!(!dp.conntrack()?.is_empty() && !dp.affinity()?.is_empty());
    ensure!(dp.stat(Stat::NewFlow)? == 1);
    let (id, per_svc) = dp.svc_stats(&services()[0])?;
    ensure!(id != 0 && per_svc.new_flows == 1, "{id} {per_svc:?}");
    Ok(())
}
