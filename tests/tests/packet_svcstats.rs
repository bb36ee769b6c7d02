//! BPF_PROG_TEST_RUN tests of the per-Service counters (`XLB_SVCSTATS_V1`): the real programs
//! count new flows, translated packets and their bytes, and refused or dropped new flows by
//! reason, at the index of the Service port id the master carries (and, for established
//! packets, the conntrack entry). Frames are built with etherparse. Needs root.
//!
//! Run: `cargo test -p xlb-tests --test packet_svcstats -- --include-ignored`

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{ensure, Context as _, Result};
use lb_common::{
    SvcStats, CT_FORWARD, PROTO_TCP, PROTO_UDP, SVC_FLAG_CLUSTER_IP, SVC_FLAG_DROP_NO_LOCAL,
    SVC_FLAG_EXT_LOCAL, SVC_FLAG_LOAD_BALANCER, SVC_FLAG_NODE_PORT, SVC_FLAG_SOURCE_RANGES,
};
use lb_userspace::datapath::LoadOptions;
use xlb_tests::packet::{
    build::{Tcp, TcpFlags, Udp},
    harness::{
        ct_key, BackendSpec, Extras, NetHook, ServiceSpec, TestDatapath, TC_ACT_OK,
        TC_ACT_REDIRECT, TC_ACT_SHOT,
    },
};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const API: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 11);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 200);
/// Any ifindex: the from_net paths tested here never route (local backend, drops, refusals).
const IFINDEX: u32 = 1;

fn client(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(CLIENT_IP, port)
}

fn service(
    ip: Ipv4Addr,
    port: u16,
    proto: u8,
    rev_nat_id: u32,
    backend_id: Option<u32>,
) -> ServiceSpec {
    ServiceSpec {
        frontend: SocketAddrV4::new(ip, port),
        proto,
        rev_nat_id,
        flags: SVC_FLAG_CLUSTER_IP,
        affinity_timeout: 0,
        backends: backend_id
            .map(|id| BackendSpec {
                id,
                addr: SocketAddrV4::new(POD, 9376),
            })
            .into_iter()
            .collect(),
    }
}

/// The IP datagram length of an Ethernet frame (what `bytes` counts).
fn ip_len(frame: &[u8]) -> u64 {
    (frame.len() - 14) as u64
}

#[test]
#[ignore = "needs root"]
fn new_flows_packets_and_bytes_are_counted_for_their_service_port_only() -> Result<()> {
    let mut dp = TestDatapath::load()?;
    let web = service(WEB, 80, PROTO_TCP, 1, Some(1));
    let api = service(API, 80, PROTO_TCP, 2, None);
    dp.set_service(&web)?;
    dp.set_service(&api)?;
    let (web_id, zero) = dp.svc_stats(&web)?;
    let (api_id, _) = dp.svc_stats(&api)?;
    ensure!(
        web_id != 0 && api_id != 0 && web_id != api_id,
        "ids {web_id} {api_id}"
    );
    ensure!(
        zero == SvcStats::default(),
        "a new id starts at zero: {zero:?}"
    );

    let syn = Tcp::new(client(40_000), web.frontend, TcpFlags::SYN).frame();
    ensure!(dp.from_pod(&syn)?.verdict == TC_ACT_OK);
    let fwd = dp
        .ct_get(&ct_key(client(40_000), web.frontend, PROTO_TCP, CT_FORWARD))?
        .context("forward entry")?;
    ensure!(
        u32::from(fwd.svc_port_id) == web_id,
        "the flow records its Service port: {fwd:?}"
    );
    let mut want = SvcStats {
        new_flows: 1,
        packets: 1,
        bytes: ip_len(&syn),
        ..SvcStats::default()
    };
    ensure!(
        dp.svc_stats(&web)?.1 == want,
        "after the SYN: {:?}",
        dp.svc_stats(&web)?.1
    );

    // Established packets of the flow: packets and bytes, no new flow.
    for payload in [&b"GET / HTTP/1.1\r\n\r\n"[..], &[7u8; 1000][..], &[][..]] {
        let seg = Tcp {
            payload: payload.to_vec(),
            ..Tcp::new(client(40_000), web.frontend, TcpFlags::PSH_ACK)
        };
        let frame = seg.frame();
        ensure!(dp.from_pod(&frame)?.verdict == TC_ACT_OK);
        want.packets += 1;
        want.bytes += ip_len(&frame);
    }
    ensure!(
        dp.svc_stats(&web)?.1 == want,
        "after the data: {:?}, want {want:?}",
        dp.svc_stats(&web)?.1
    );

    // The backend's answers (to_pod) are not counted: forward direction only.
    let answer = Tcp::new(
        SocketAddrV4::new(POD, 9376),
        client(40_000),
        TcpFlags::SYN_ACK,
    )
    .frame();
    ensure!(dp.to_pod(&answer)?.verdict == TC_ACT_OK);
    ensure!(dp.svc_stats(&web)?.1 == want, "answers are not counted");
    // A second flow.
    let syn2 = Tcp::new(client(40_001), web.frontend, TcpFlags::SYN).frame();
    ensure!(dp.from_pod(&syn2)?.verdict == TC_ACT_OK);
    want.new_flows += 1;
    want.packets += 1;
    want.bytes += ip_len(&syn2);
    ensure!(dp.svc_stats(&web)?.1 == want);
    // The other Service saw none of it.
    ensure!(
        dp.svc_stats(&api)?.1 == SvcStats::default(),
        "{:?}",
        dp.svc_stats(&api)?.1
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn refusals_and_source_range_drops_are_counted_by_reason() -> Result<()> {
    let mut dp = TestDatapath::load()?;
    let empty_tcp = service(WEB, 80, PROTO_TCP, 1, None);
    let empty_udp = service(WEB, 53, PROTO_UDP, 2, None);
    let lb = ServiceSpec {
        frontend: SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 10), 80),
        flags: SVC_FLAG_LOAD_BALANCER | SVC_FLAG_SOURCE_RANGES,
        ..service(WEB, 80, PROTO_TCP, 3, Some(1))
    };
    dp.set_service(&empty_tcp)?;
    dp.set_service(&empty_udp)?;
    dp.set_service_with(
        &lb,
        &Extras {
            src_ranges: vec![(Ipv4Addr::new(198, 51, 100, 0), 24)],
            ..Extras::default()
        },
    )?;

    let out = dp.from_pod(&Tcp::new(client(40_010), empty_tcp.frontend, TcpFlags::SYN).frame())?;
    ensure!(
        out.verdict == TC_ACT_REDIRECT,
        "refused with a RST: {}",
        out.verdict
    );
    let out = dp.from_pod(&Udp::new(client(40_011), empty_udp.frontend, b"q").frame())?;
    ensure!(
        out.verdict == TC_ACT_REDIRECT,
        "refused with ICMP: {}",
        out.verdict
    );
    for svc in [&empty_tcp, &empty_udp] {
        let (_, s) = dp.svc_stats(svc)?;
        ensure!(
            s == SvcStats {
                refused_no_endpoints: 1,
                ..SvcStats::default()
            },
            "{}: {s:?}",
            svc.frontend
        );
    }
    // A pod outside the source ranges: dropped, counted for the LoadBalancer's Service port.
    let out = dp.from_pod(&Tcp::new(client(40_012), lb.frontend, TcpFlags::SYN).frame())?;
    ensure!(out.verdict == TC_ACT_SHOT, "dropped: {}", out.verdict);
    let (_, s) = dp.svc_stats(&lb)?;
    ensure!(
        s == SvcStats {
            dropped_source_range: 1,
            ..SvcStats::default()
        },
        "{s:?}"
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn external_traffic_is_counted_once_whichever_hook_translates_it() -> Result<()> {
    // NodePort, local backend: XDP translates the SYN and passes it up; tc ingress then sees a
    // packet to the pod, which is not ours. One new flow, one packet.
    let np = ServiceSpec {
        frontend: SocketAddrV4::new(NODE_IP, 30_080),
        flags: SVC_FLAG_NODE_PORT,
        ..service(NODE_IP, 30_080, PROTO_TCP, 1, Some(1))
    };
    let local = Extras {
        local: vec![SocketAddrV4::new(POD, 9376)],
        ..Extras::default()
    };
    let src = SocketAddrV4::new(OUTSIDE, 41_000);
    let mut dp = TestDatapath::load()?;
    dp.set_service_with(&np, &local)?;
    let syn = Tcp::new(src, np.frontend, TcpFlags::SYN).frame();
    let out = dp.from_net(NetHook::Xdp, &syn, IFINDEX)?;
    ensure!(
        out.verdict == NetHook::Xdp.pass() && out.frame != syn,
        "XDP translated it"
    );
    let behind = dp.from_net(NetHook::Tc, &out.frame, IFINDEX)?;
    ensure!(
        behind.verdict == NetHook::Tc.pass() && behind.frame == out.frame,
        "tc leaves it"
    );
    let (_, s) = dp.svc_stats(&np)?;
    ensure!(
        s == SvcStats {
            new_flows: 1,
            packets: 1,
            bytes: ip_len(&syn),
            ..SvcStats::default()
        },
        "{s:?}"
    );

    // Without endpoints: XDP hands the packet to tc untouched, tc refuses and counts it.
    let empty = ServiceSpec {
        backends: vec![],
        ..np.clone()
    };
    let mut dp = TestDatapath::load()?;
    dp.set_service(&empty)?;
    let out = dp.from_net(NetHook::Xdp, &syn, IFINDEX)?;
    ensure!(
        out.verdict == NetHook::Xdp.pass() && out.frame == syn,
        "XDP defers the refusal"
    );
    ensure!(
        dp.svc_stats(&empty)?.1 == SvcStats::default(),
        "XDP did not count it"
    );
    let out = dp.from_net(NetHook::Tc, &syn, IFINDEX)?;
    ensure!(
        out.verdict == TC_ACT_REDIRECT,
        "tc refuses: {}",
        out.verdict
    );
    ensure!(
        dp.svc_stats(&empty)?.1
            == SvcStats {
                refused_no_endpoints: 1,
                ..SvcStats::default()
            }
    );

    // externalTrafficPolicy Local without a local endpoint: dropped by either hook.
    let no_local = ServiceSpec {
        flags: SVC_FLAG_NODE_PORT | SVC_FLAG_EXT_LOCAL | SVC_FLAG_DROP_NO_LOCAL,
        ..empty
    };
    for hook in NetHook::ALL {
        let mut dp = TestDatapath::load()?;
        dp.set_service(&no_local)?;
        let out = dp.from_net(hook, &syn, IFINDEX)?;
        ensure!(out.verdict == hook.drop(), "{hook:?}: {}", out.verdict);
        let (_, s) = dp.svc_stats(&no_local)?;
        ensure!(
            s == SvcStats {
                dropped_no_local_endpoint: 1,
                ..SvcStats::default()
            },
            "{hook:?}: {s:?}"
        );
    }
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn flows_without_a_recorded_id_and_dry_runs_are_not_counted() -> Result<()> {
    let web = service(WEB, 80, PROTO_TCP, 1, Some(1));
    let mut dp = TestDatapath::load()?;
    dp.set_service(&web)?;
    ensure!(
        dp.from_pod(&Tcp::new(client(40_020), web.frontend, TcpFlags::SYN).frame())?
            .verdict
            == TC_ACT_OK
    );
    let before = dp.svc_stats(&web)?.1;
    // An entry as an older build wrote it (svc_port_id 0): still translated, not counted.
    let key = ct_key(client(40_020), web.frontend, PROTO_TCP, CT_FORWARD);
    let mut old = dp.ct_get(&key)?.context("forward entry")?;
    old.svc_port_id = 0;
    dp.ct_set(&key, old)?;
    let out = dp.from_pod(&Tcp::new(client(40_020), web.frontend, TcpFlags::ACK).frame())?;
    ensure!(
        out.verdict == TC_ACT_OK
            && out.frame != Tcp::new(client(40_020), web.frontend, TcpFlags::ACK).frame()
    );
    ensure!(
        dp.svc_stats(&web)?.1 == before,
        "not counted: {:?}",
        dp.svc_stats(&web)?.1
    );

    // `xlb trace`'s dry run writes no map, these counters included.
    let mut dry = TestDatapath::load_options(&LoadOptions {
        dry_run: true,
        ..LoadOptions::default()
    })?;
    dry.set_service(&web)?;
    ensure!(
        dry.from_pod(&Tcp::new(client(40_021), web.frontend, TcpFlags::SYN).frame())?
            .verdict
            == TC_ACT_OK
    );
    ensure!(
        dry.svc_stats(&web)?.1 == SvcStats::default(),
        "{:?}",
        dry.svc_stats(&web)?.1
    );
    Ok(())
}
