//! BPF_PROG_TEST_RUN tests of the pre-filters (`XLB_FEFILTER_V2`, `lb_model::fefilter`):
//! a packet from a pod to an address outside the Service CIDR whose filter bit is clear passes
//! untouched without a conntrack or SERVICES lookup; the bit of a frontend stays while a live
//! flow still uses it after its Service is gone. The reply half: a packet into a pod whose
//! source port no backend uses passes without a reply lookup, a backend's answers are restored,
//! and a backend port keeps its bit while a live flow uses it. Needs root.
//!
//! Run: `cargo test -p xlb-tests --test packet_fefilter -- --include-ignored`

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{ensure, Context as _, Result};
use lb_common::{
    ct_state, ip4, port, CtValue, Stat, CT_FORWARD, CT_REPLY, PROTO_TCP, SVC_FLAG_CLUSTER_IP,
};
use lb_model::fefilter::Filter;
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

/// An established reply entry (backend `be` -> client `cl`) that restores the frontend.
fn live_reply(be: SocketAddrV4, cl: SocketAddrV4) -> (lb_common::CtKey, CtValue) {
    let key = ct_key(be, cl, PROTO_TCP, CT_REPLY);
    let value = CtValue {
        backend_id: 100,
        nat_addr: ip4(VIP.octets()),
        nat_port: port(80),
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
    // A backend's port: every reply entry has one as its source (the reply pre-filter).
    let other = SocketAddrV4::new(clear_address(&dp)?, BACKEND_PORT);
    // A Service flow whose answer tuple (other -> client) a direct connection now re-uses.
    let (reply, value) = live_reply(other, client(40_002));
    dp.ct_set(&reply, value)?;
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

/// A datapath where the client's SYN (returned) was translated to the Service's backend, and
/// the Service was deleted after it: a live flow to a gone Service.
fn flow_to_a_gone_service() -> Result<(TestDatapath, Tcp)> {
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
    Ok((dp, syn))
}

#[test]
#[ignore = "needs root"]
fn an_established_flow_is_still_translated_after_its_service_is_gone() -> Result<()> {
    let (mut dp, _syn) = flow_to_a_gone_service()?;
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
    let destinations: Vec<u32> = dp
        .conntrack()?
        .into_iter()
        .filter(|(k, v)| k.dir == CT_FORWARD && v.expires_ns > now_coarse_ns())
        .map(|(k, _)| lb_common::fefilter_bit(k.daddr))
        .collect();
    sweeps_keep_what_is_used(&dp.applied().filter, &destinations, "flow's destination")
}

/// Two sweeps that found `used` (bits) clear nothing of `filter`; two that found nothing clear
/// the one word the flow's bit is in.
fn sweeps_keep_what_is_used(filter: &Filter, used: &[u32], what: &str) -> Result<()> {
    let mut f = filter.clone();
    f.sweep_done_bits(used.iter().copied());
    f.sweep_done_bits(used.iter().copied());
    ensure!(
        f.pending() == 0,
        "a sweep would clear the bit of a live {what}"
    );
    let mut f = filter.clone();
    f.sweep_done_bits([]);
    f.sweep_done_bits([]);
    ensure!(
        f.pending() == 1,
        "two sweeps without the flow left {} words",
        f.pending()
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn a_packet_into_a_pod_from_a_port_no_backend_uses_skips_the_reply_lookup() -> Result<()> {
    let mut dp = TestDatapath::load()?;
    dp.set_service(&service())?;
    let ports = &dp.applied().port_filter;
    ensure!(
        ports.contains_bit(u32::from(BACKEND_PORT)),
        "the backend port's bit was not set"
    );
    const UNUSED: u16 = 45_678;
    ensure!(
        !ports.contains_bit(u32::from(UNUSED)),
        "an unused port has its bit"
    );

    // A reply entry whose source port no backend has (the datapath never writes one: planted
    // here to show the lookup is skipped). The packet passes as it is.
    let be_unused = SocketAddrV4::new(BACKEND, UNUSED);
    let (key, value) = live_reply(be_unused, client(40_000));
    dp.ct_set(&key, value)?;
    let frame = ack(be_unused, client(40_000)).frame();
    for (prog, out) in [
        ("to_pod", dp.to_pod(&frame)?),
        ("to_net", dp.to_net(&frame, 1)?),
    ] {
        ensure!(out.verdict == TC_ACT_OK, "{prog}: verdict {}", out.verdict);
        ensure!(
            out.frame == frame,
            "{prog}: a packet from an unused port was rewritten"
        );
    }
    ensure!(dp.stat(Stat::Reply)? == 0, "counted as a reply");

    // The same entry from the backend's port is looked up: its source is restored.
    let be = SocketAddrV4::new(BACKEND, BACKEND_PORT);
    let (key, value) = live_reply(be, client(40_001));
    dp.ct_set(&key, value)?;
    let out = dp.to_pod(&ack(be, client(40_001)).frame())?;
    let d = decode_checked(&out.frame)?;
    ensure!(
        Ipv4Addr::from(d.ip.source) == VIP,
        "the answer's source was not restored"
    );
    ensure!(dp.stat(Stat::Reply)? == 1);
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn a_backend_port_keeps_its_bit_while_a_live_flow_answers_from_it() -> Result<()> {
    let (mut dp, syn) = flow_to_a_gone_service()?;
    let bit = u32::from(BACKEND_PORT);
    ensure!(
        dp.applied().port_filter.contains_bit(bit),
        "the bit went with the Service"
    );
    // The backend's answer still reaches the client from the frontend.
    let be = SocketAddrV4::new(BACKEND, BACKEND_PORT);
    let syn_ack = Tcp {
        ack: syn.seq + 1,
        ..Tcp::new(be, client(40_000), TcpFlags::SYN_ACK)
    };
    let out = dp.to_pod(&syn_ack.frame())?;
    let d = decode_checked(&out.frame)?;
    ensure!(
        Ipv4Addr::from(d.ip.source) == VIP,
        "the live flow's answer was not restored"
    );

    // What the agent's sweeps decide from this conntrack table (as `ct_gc` reports it: the
    // source ports of the live reply entries): the live flow keeps the port's bit.
    let live: Vec<u32> = dp
        .conntrack()?
        .into_iter()
        .filter(|(k, v)| k.dir == CT_REPLY && v.expires_ns > now_coarse_ns())
        .map(|(k, _)| u32::from(u16::from_be(k.sport)))
        .collect();
    ensure!(live == vec![bit], "reply entries: {live:?}");
    sweeps_keep_what_is_used(&dp.applied().port_filter, &live, "flow's backend port")
}
