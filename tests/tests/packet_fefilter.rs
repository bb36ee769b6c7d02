//! BPF_PROG_TEST_RUN tests of the frontend pre-filter (`XLB_FEFILTER_V1`, `lb_model::fefilter`):
//! a packet from a pod to an address outside the Service CIDR whose filter bit is clear passes
//! untouched without a conntrack or SERVICES lookup; the bit of a frontend stays while a live
//! flow still uses it after its Service is gone. Needs root.
//!
//! Run: `cargo test -p xlb-tests --test packet_fefilter -- --include-ignored`

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{ensure, Context as _, Result};
use lb_common::{
    ct_state, ip4, port, CtValue, Stat, CT_FORWARD, CT_REPLY, PROTO_TCP, SVC_FLAG_CLUSTER_IP,
};
use xlb_tests::packet::{
    build::{Tcp, TcpFlags},
    harness::{ct_key, now_coarse_ns, BackendSpec, ServiceSpec, TestDatapath, TC_ACT_OK},
    verify::decode_checked,
};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const BACKEND_PORT: u16 = 9376;
const REV_NAT_ID: u32 = 7;

fn client(sport: u16) -> SocketAddrV4 {
    SocketAddrV4::new(CLIENT_IP, sport)
}

fn frontend() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, 80)
}

fn service() -> ServiceSpec {
    ServiceSpec {
        frontend: frontend(),
        proto: PROTO_TCP,
        rev_nat_id: REV_NAT_ID,
        flags: SVC_FLAG_CLUSTER_IP,
        affinity_timeout: 0,
        backends: vec![BackendSpec {
            id: 100,
            addr: SocketAddrV4::new(BACKEND, BACKEND_PORT),
        }],
    }
}

/// A pod address (no frontend) whose filter bit is clear in `dp`.
fn clear_address(dp: &TestDatapath) -> Result<Ipv4Addr> {
    (1..=254u8)
        .map(|d| Ipv4Addr::new(10, 244, 7, d))
        .find(|a| !dp.applied().filter.contains(*a))
        .context("every candidate address has its bit set")
}

/// A live established forward entry of `cl -> dst` that DNATs to the backend.
fn live_forward(cl: SocketAddrV4, dst: SocketAddrV4) -> (lb_common::CtKey, CtValue) {
    let key = ct_key(cl, dst, PROTO_TCP, CT_FORWARD);
    let value = CtValue {
        backend_id: 100,
        nat_addr: ip4(BACKEND.octets()),
        nat_port: port(BACKEND_PORT),
        state: ct_state::TCP_ESTABLISHED,
        rev_nat_id: REV_NAT_ID,
        expires_ns: now_coarse_ns() + 60_000_000_000,
        ..CtValue::default()
    };
    (key, value)
}

fn ack(cl: SocketAddrV4, dst: SocketAddrV4) -> Tcp {
    Tcp {
        seq: 1_001,
        ack: 5_001,
        flags: TcpFlags::PSH_ACK,
        payload: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        ..Tcp::new(cl, dst, TcpFlags::ACK)
    }
}

#[test]
#[ignore = "needs root"]
fn a_non_service_packet_with_a_clear_bit_passes_untouched_without_lookups() -> Result<()> {
    let mut dp = TestDatapath::load()?;
    dp.set_service(&service())?;
    ensure!(
        dp.applied().filter.contains(VIP),
        "the frontend's bit was not set"
    );
    let other = SocketAddrV4::new(clear_address(&dp)?, 8080);

    // A live forward entry for the tuple, as if a flow to `other` were translated: a lookup
    // would DNAT the packet. The filter answers first, so it passes as it is.
    let (key, value) = live_forward(client(40_000), other);
    dp.ct_set(&key, value)?;
    let frame = ack(client(40_000), other).frame();
    let out = dp.from_pod(&frame)?;
    ensure!(out.verdict == TC_ACT_OK, "verdict {}", out.verdict);
    ensure!(
        out.frame == frame,
        "a packet to a clear address was rewritten"
    );
    ensure!(
        dp.nonzero_stats()?.is_empty(),
        "counted: {:?}",
        dp.nonzero_stats()?
    );

    // The same entry on the frontend (whose bit is set) is looked up and translated.
    let (key, value) = live_forward(client(40_001), frontend());
    dp.ct_set(&key, value)?;
    let out = dp.from_pod(&ack(client(40_001), frontend()).frame())?;
    ensure!(out.verdict == TC_ACT_OK, "verdict {}", out.verdict);
    let d = decode_checked(&out.frame)?;
    ensure!(
        Ipv4Addr::from(d.ip.destination) == BACKEND,
        "not translated"
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn a_direct_syn_to_a_clear_address_still_removes_a_stale_reply_entry() -> Result<()> {
    let mut dp = TestDatapath::load()?;
    dp.set_service(&service())?;
    let other = SocketAddrV4::new(clear_address(&dp)?, 8080);
    // A Service flow whose answer tuple (other -> client) a direct connection now re-uses.
    let reply = ct_key(other, client(40_002), PROTO_TCP, CT_REPLY);
    dp.ct_set(
        &reply,
        CtValue {
            backend_id: 100,
            nat_addr: ip4(VIP.octets()),
            nat_port: port(80),
            state: ct_state::TCP_ESTABLISHED,
            rev_nat_id: REV_NAT_ID,
            expires_ns: now_coarse_ns() + 60_000_000_000,
            ..CtValue::default()
        },
    )?;
    let syn = Tcp::new(client(40_002), other, TcpFlags::SYN).frame();
    let out = dp.from_pod(&syn)?;
    ensure!(
        out.verdict == TC_ACT_OK && out.frame == syn,
        "the direct SYN was touched"
    );
    ensure!(
        dp.ct_get(&reply)?.is_none(),
        "the stale reply entry is still there"
    );
    ensure!(dp.stat(Stat::CtStaleReplyRemoved)? == 1);
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn an_established_flow_is_still_translated_after_its_service_is_gone() -> Result<()> {
    let mut dp = TestDatapath::load()?;
    let svc = service();
    dp.set_service(&svc)?;
    let syn = Tcp::new(client(40_000), frontend(), TcpFlags::SYN);
    let out = dp.from_pod(&syn.frame())?;
    let d = decode_checked(&out.frame)?;
    ensure!(
        Ipv4Addr::from(d.ip.destination) == BACKEND,
        "SYN not translated"
    );

    dp.delete_service(&svc)?;
    // Only a sweep clears bits, and only when no live flow uses the address any more.
    ensure!(
        dp.applied().filter.contains(VIP),
        "the bit went with the Service"
    );
    let out = dp.from_pod(&ack(client(40_000), frontend()).frame())?;
    ensure!(out.verdict == TC_ACT_OK, "verdict {}", out.verdict);
    let d = decode_checked(&out.frame)?;
    ensure!(
        Ipv4Addr::from(d.ip.destination) == BACKEND,
        "the live flow lost its translation"
    );
    // A new connection to the gone Service is not translated.
    let fresh = Tcp::new(client(40_001), frontend(), TcpFlags::SYN).frame();
    let out = dp.from_pod(&fresh)?;
    ensure!(
        out.frame == fresh,
        "a new flow to a gone Service was translated"
    );

    // What the agent's sweeps decide from this conntrack table: the live flow's original
    // destination keeps the bit, however many sweeps run.
    let destinations: Vec<Ipv4Addr> = dp
        .conntrack()?
        .into_iter()
        .filter(|(k, v)| k.dir == CT_FORWARD && v.expires_ns > now_coarse_ns())
        .map(|(k, _)| Ipv4Addr::from(k.daddr.to_ne_bytes()))
        .collect();
    let mut filter = dp.applied().filter.clone();
    filter.sweep_done(destinations.clone());
    filter.sweep_done(destinations);
    ensure!(
        filter.pending() == 0,
        "a sweep would clear a bit a live flow uses"
    );
    // Without the flow two sweeps clear it.
    let mut filter = dp.applied().filter.clone();
    filter.sweep_done([]);
    filter.sweep_done([]);
    ensure!(filter.pending() == 1);
    Ok(())
}
