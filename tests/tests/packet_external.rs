//! BPF_PROG_TEST_RUN tests of the external path: `from_net` through both hooks (XDP and its tc
//! ingress twin) and `to_net`, on crafted frames, with exact headers, verdicts and map side
//! effects checked, and checksums verified by etherparse (never by xlb's own code). Needs root.
//!
//! The FIB lookups of the programs see the routes and neighbours of the network namespace the
//! test run is made from, so every test builds its own small namespace ([`Node`]): an "eth0"
//! with the node address, permanent neighbour entries for the other node and the client, and a
//! route to the other node's pods, like node 1 of the netns test cluster.
//!
//! Run: `cargo test -p xlb-tests --test packet_external -- --include-ignored`

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{ensure, Context as _, Result};
use lb_common::{
    ct_state, ip4, port, CtValue, PortRange, Stat, CT_FORWARD, CT_F_SNAT, CT_REPLY, DEV_F_XDP_TX,
    PROTO_TCP, PROTO_UDP, SVC_FLAG_DROP_NO_LOCAL, SVC_FLAG_EXT_LOCAL, SVC_FLAG_LOAD_BALANCER,
    SVC_FLAG_NODE_PORT, SVC_FLAG_SOURCE_RANGES,
};
use lb_testkit::netns::NetNs;
use lb_userspace::datapath::LoadOptions;
use xlb_tests::packet::{
    build::{ip_packet, IcmpError, IcmpErrorKind, Tcp, TcpFlags, Udp},
    harness::{ct_key, BackendSpec, Extras, NetHook, Outcome, ServiceSpec, TestDatapath},
    verify::decode_checked,
};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 11);
const OTHER_NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 12);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 200);
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 20);
const NODE_PORT: u16 = 30080;
const POD_PORT: u16 = 8080;
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
const OTHER_NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x12];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xc8];
const REV_NAT_ID: u32 = 9;

/// A node namespace: "eth0" (NODE_IP/24, NODE_MAC) whose peer stays in the namespace, the
/// other node and the client as permanent neighbours, the other node's pods routed via it.
struct Node {
    ns: NetNs,
    eth0: u32,
}

impl Node {
    fn new(tag: &str) -> Result<Node> {
        let ns = NetNs::create(&format!("xlbpx-{tag}"))?;
        let mac = |m: [u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "peer0"])?;
        ns.ip(&["link", "set", "eth0", "address", &mac(NODE_MAC)])?;
        ns.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["link", "set", "peer0", "up"])?;
        ns.ip(&["link", "set", "lo", "up"])?;
        for (ip, m) in [(OTHER_NODE_IP, OTHER_NODE_MAC), (CLIENT_IP, CLIENT_MAC)] {
            ns.ip(&[
                "neigh", "replace", &ip.to_string(), "lladdr", &mac(m), "dev", "eth0", "nud",
                "permanent",
            ])?;
        }
        ns.ip(&["route", "add", "10.244.2.0/24", "via", &OTHER_NODE_IP.to_string()])?;
        ns.ip(&["route", "add", "192.0.2.0/24", "dev", "eth0"])?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        let index = ns.ip(&["-o", "link", "show", "eth0"])?;
        let eth0: u32 = index
            .split(':')
            .next()
            .and_then(|i| i.trim().parse().ok())
            .context("ifindex of eth0")?;
        Ok(Node { ns, eth0 })
    }

    /// Runs `from_net` through `hook` on `frame` as if it arrived on eth0.
    fn from_net(&self, dp: &TestDatapath, hook: NetHook, frame: &[u8]) -> Result<Outcome> {
        self.ns.run(|| dp.from_net(hook, frame, self.eth0))?
    }

    /// Runs `to_net` on `frame` leaving by eth0.
    fn to_net(&self, dp: &TestDatapath, frame: &[u8]) -> Result<Outcome> {
        self.ns.run(|| dp.to_net(frame, self.eth0))?
    }
}

fn client(sport: u16) -> SocketAddrV4 {
    SocketAddrV4::new(CLIENT_IP, sport)
}

fn node_port() -> SocketAddrV4 {
    SocketAddrV4::new(NODE_IP, NODE_PORT)
}

fn pod(ip: Ipv4Addr) -> SocketAddrV4 {
    SocketAddrV4::new(ip, POD_PORT)
}

/// A frame from the client (arriving at the node from the client's MAC).
fn from_client(src: SocketAddrV4, dst: SocketAddrV4, flags: TcpFlags) -> Vec<u8> {
    let mut t = Tcp::new(src, dst, flags);
    t.macs = (CLIENT_MAC, NODE_MAC);
    t.frame()
}

/// A NodePort Service (on NODE_IP:NODE_PORT) with one backend.
fn nodeport(backend: Ipv4Addr, flags: u32) -> ServiceSpec {
    ServiceSpec {
        frontend: node_port(),
        proto: PROTO_TCP,
        rev_nat_id: REV_NAT_ID,
        flags: SVC_FLAG_NODE_PORT | flags,
        affinity_timeout: 0,
        backends: vec![BackendSpec {
            id: 1,
            addr: pod(backend),
        }],
    }
}

/// A datapath with `svc`, its backend marked local when it is LOCAL_POD, and eth0 registered
/// as an external device (XDP may transmit on it when `xdp_tx`).
fn datapath(node: &Node, opts: &LoadOptions, svc: &ServiceSpec, xdp_tx: bool) -> Result<TestDatapath> {
    datapath_with(node, opts, svc, &Extras::default(), xdp_tx)
}

/// [`datapath`] with source ranges (and the local backends named too).
fn datapath_with(
    node: &Node,
    opts: &LoadOptions,
    svc: &ServiceSpec,
    extras: &Extras,
    xdp_tx: bool,
) -> Result<TestDatapath> {
    let mut dp = TestDatapath::load_options(opts)?;
    let mut extras = extras.clone();
    extras.local.extend(svc.backends.iter().map(|b| b.addr).filter(|a| *a.ip() == LOCAL_POD));
    dp.set_service_with(svc, &extras)?;
    dp.set_device(node.eth0, NODE_IP, if xdp_tx { DEV_F_XDP_TX } else { 0 })?;
    Ok(dp)
}

fn tcp_ports(frame: &[u8]) -> Result<(SocketAddrV4, SocketAddrV4)> {
    let d = decode_checked(frame)?;
    let tcp = d.tcp()?;
    Ok((
        SocketAddrV4::new(Ipv4Addr::from(d.ip.source), tcp.source_port),
        SocketAddrV4::new(Ipv4Addr::from(d.ip.destination), tcp.destination_port),
    ))
}

#[test]
#[ignore = "needs root"]
fn nodeport_to_a_local_backend_is_dnated_without_snat_and_its_answer_restored() -> Result<()> {
    let node = Node::new("local")?;
    for hook in NetHook::ALL {
        let dp = datapath(&node, &LoadOptions::default(), &nodeport(LOCAL_POD, 0), true)?;
        let mut dp = dp;
        let syn = from_client(client(40001), node_port(), TcpFlags::SYN);
        let out = node.from_net(&dp, hook, &syn)?;
        ensure!(out.verdict == hook.pass(), "{hook:?}: SYN verdict {}", out.verdict);
        if hook == NetHook::Xdp {
            // Behind XDP the tc program sees what XDP passed on: it must leave it (and the
            // flow XDP set up) alone.
            let behind = node.from_net(&dp, NetHook::Tc, &out.frame)?;
            ensure!(behind.verdict == NetHook::Tc.pass() && behind.frame == out.frame, "tc behind XDP");
            let rep_key = ct_key(pod(LOCAL_POD), client(40001), PROTO_TCP, CT_REPLY);
            ensure!(dp.ct_get(&rep_key)?.is_some(), "tc behind XDP kept the new flow's reply entry");
        }
        let (src, dst) = tcp_ports(&out.frame)?;
        ensure!(src == client(40001), "{hook:?}: the client address is kept, got {src}");
        ensure!(dst == pod(LOCAL_POD), "{hook:?}: DNAT to the local pod, got {dst}");
        let fwd = dp
            .ct_get(&ct_key(client(40001), node_port(), PROTO_TCP, CT_FORWARD))?
            .context("forward entry")?;
        ensure!(fwd.flags & CT_F_SNAT == 0 && fwd.state == ct_state::TCP_SYN_SENT);

        // The pod's answer leaves by eth0: to_net restores the NodePort as its source.
        let mut answer = Tcp::new(pod(LOCAL_POD), client(40001), TcpFlags::SYN_ACK);
        answer.macs = (NODE_MAC, CLIENT_MAC);
        let out = node.to_net(&dp, &answer.frame())?;
        ensure!(out.verdict == 0, "to_net verdict {}", out.verdict);
        let (src, dst) = tcp_ports(&out.frame)?;
        ensure!(src == node_port() && dst == client(40001), "{hook:?}: answer {src} -> {dst}");
        let fwd = dp
            .ct_get(&ct_key(client(40001), node_port(), PROTO_TCP, CT_FORWARD))?
            .context("forward entry")?;
        ensure!(fwd.state == ct_state::TCP_ESTABLISHED, "{hook:?}: state {}", fwd.state);

        // The next client packet takes the conntrack path.
        let ack = from_client(client(40001), node_port(), TcpFlags::ACK);
        let out = node.from_net(&dp, hook, &ack)?;
        ensure!(out.verdict == hook.pass());
        ensure!(tcp_ports(&out.frame)?.1 == pod(LOCAL_POD));
        ensure!(dp.stat(Stat::Established)? == 1 && dp.stat(Stat::Snat)? == 0);
    }
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn nodeport_to_a_remote_backend_is_snated_to_the_node_and_sent_to_the_next_hop() -> Result<()> {
    let node = Node::new("remote")?;
    for hook in NetHook::ALL {
        let mut dp = datapath(&node, &LoadOptions::default(), &nodeport(REMOTE_POD, 0), true)?;
        let syn = from_client(client(40002), node_port(), TcpFlags::SYN);
        let out = node.from_net(&dp, hook, &syn)?;
        ensure!(
            out.verdict == hook.sent(node.eth0, node.eth0),
            "{hook:?}: SYN verdict {}",
            out.verdict
        );
        let d = decode_checked(&out.frame)?;
        ensure!(d.eth.destination == OTHER_NODE_MAC, "{hook:?}: next hop MAC {:?}", d.eth.destination);
        ensure!(d.eth.source == NODE_MAC, "{hook:?}: source MAC {:?}", d.eth.source);
        let (src, dst) = tcp_ports(&out.frame)?;
        ensure!(dst == pod(REMOTE_POD), "{hook:?}: DNAT to the remote pod, got {dst}");
        ensure!(*src.ip() == NODE_IP, "{hook:?}: SNAT to the node, got {src}");
        let range = lb_common::DEFAULT_SNAT_PORTS;
        ensure!((range.min..=range.max).contains(&src.port()), "SNAT port {}", src.port());

        let fwd = dp
            .ct_get(&ct_key(client(40002), node_port(), PROTO_TCP, CT_FORWARD))?
            .context("forward entry")?;
        ensure!(fwd.flags & CT_F_SNAT != 0);
        ensure!((fwd.snat_addr, fwd.snat_port) == (ip4(NODE_IP.octets()), port(src.port())));
        let rep = dp
            .ct_get(&ct_key(pod(REMOTE_POD), src, PROTO_TCP, CT_REPLY))?
            .context("reply entry keyed by the backend's answer to the node")?;
        ensure!((rep.nat_addr, rep.nat_port) == (ip4(NODE_IP.octets()), port(NODE_PORT)));
        ensure!((rep.snat_addr, rep.snat_port) == (ip4(CLIENT_IP.octets()), port(40002)));

        // The backend answers the node; from_net restores NodePort -> client and sends it on.
        let mut answer = Tcp::new(pod(REMOTE_POD), src, TcpFlags::SYN_ACK);
        answer.macs = (OTHER_NODE_MAC, NODE_MAC);
        let out = node.from_net(&dp, hook, &answer.frame())?;
        ensure!(out.verdict == hook.sent(node.eth0, node.eth0), "{hook:?}: answer verdict {}", out.verdict);
        let d = decode_checked(&out.frame)?;
        ensure!(d.eth.destination == CLIENT_MAC);
        let (asrc, adst) = tcp_ports(&out.frame)?;
        ensure!(asrc == node_port() && adst == client(40002), "{hook:?}: answer {asrc} -> {adst}");

        // The rest of the connection keeps its SNAT port.
        let ack = from_client(client(40002), node_port(), TcpFlags::PSH_ACK);
        let out = node.from_net(&dp, hook, &ack)?;
        ensure!(tcp_ports(&out.frame)? == (src, pod(REMOTE_POD)), "{hook:?}: same translation");
        let fwd = dp
            .ct_get(&ct_key(client(40002), node_port(), PROTO_TCP, CT_FORWARD))?
            .context("forward entry")?;
        ensure!(fwd.state == ct_state::TCP_ESTABLISHED);
        ensure!(dp.stat(Stat::Snat)? == 1 && dp.stat(Stat::NewFlow)? == 1);
    }
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn xdp_hands_a_remote_flow_to_tc_where_it_cannot_transmit() -> Result<()> {
    let node = Node::new("defer")?;
    let mut dp = datapath(&node, &LoadOptions::default(), &nodeport(REMOTE_POD, 0), false)?;
    let syn = from_client(client(40003), node_port(), TcpFlags::SYN);
    let out = node.from_net(&dp, NetHook::Xdp, &syn)?;
    ensure!(out.verdict == NetHook::Xdp.pass() && out.frame == syn, "XDP passes the untouched frame");
    ensure!(dp.stat(Stat::XdpDeferred)? == 1);
    // XDP chose the backend and the SNAT port and set the flow up, so tc does not choose again
    // (a second draw would favour local backends).
    let fwd = dp
        .ct_get(&ct_key(client(40003), node_port(), PROTO_TCP, CT_FORWARD))?
        .context("XDP set the flow up")?;
    ensure!(fwd.flags & CT_F_SNAT != 0 && dp.stat(Stat::NewFlow)? == 1);
    let out = node.from_net(&dp, NetHook::Tc, &syn)?;
    ensure!(out.verdict == NetHook::Tc.sent(node.eth0, node.eth0), "tc forwards it: {}", out.verdict);
    let (src, dst) = tcp_ports(&out.frame)?;
    ensure!(dst == pod(REMOTE_POD) && src == SocketAddrV4::new(NODE_IP, u16::from_be(fwd.snat_port)));
    ensure!(dp.stat(Stat::NewFlow)? == 1 && dp.stat(Stat::Established)? == 1, "tc continued the flow");
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn a_nodeport_without_endpoints_is_refused_by_tc_and_xdp_defers_the_refusal() -> Result<()> {
    let node = Node::new("empty")?;
    let mut svc = nodeport(LOCAL_POD, 0);
    svc.backends.clear();
    let mut dp = datapath(&node, &LoadOptions::default(), &svc, true)?;
    let syn = from_client(client(40004), node_port(), TcpFlags::SYN);
    let out = node.from_net(&dp, NetHook::Xdp, &syn)?;
    ensure!(out.verdict == NetHook::Xdp.pass() && out.frame == syn);
    let out = node.from_net(&dp, NetHook::Tc, &syn)?;
    ensure!(out.verdict == 7, "bounced out of the device: {}", out.verdict);
    let d = decode_checked(&out.frame)?;
    let tcp = d.tcp()?;
    ensure!(tcp.rst && tcp.ack, "a RST|ACK");
    ensure!(
        (Ipv4Addr::from(d.ip.source), tcp.source_port) == (NODE_IP, NODE_PORT)
            && Ipv4Addr::from(d.ip.destination) == CLIENT_IP
    );
    ensure!(dp.stat(Stat::RefusedTcp)? == 1 && dp.stat(Stat::XdpDeferred)? == 1);
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn etp_local_without_a_local_endpoint_drops_instead_of_refusing() -> Result<()> {
    let node = Node::new("nolocal")?;
    let mut svc = nodeport(LOCAL_POD, SVC_FLAG_EXT_LOCAL | SVC_FLAG_DROP_NO_LOCAL);
    svc.backends.clear();
    for hook in NetHook::ALL {
        let mut dp = datapath(&node, &LoadOptions::default(), &svc, true)?;
        let syn = from_client(client(40005), node_port(), TcpFlags::SYN);
        let out = node.from_net(&dp, hook, &syn)?;
        ensure!(out.verdict == hook.drop(), "{hook:?}: verdict {}", out.verdict);
        ensure!(dp.stat(Stat::DropNoLocalEndpoint)? == 1 && dp.stat(Stat::RefusedTcp)? == 0);
    }
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn snat_ports_are_checked_for_collisions_and_a_full_range_is_counted() -> Result<()> {
    let node = Node::new("ports")?;
    // Two ports: two flows get one each, the third finds none.
    let opts = LoadOptions {
        snat_ports: PortRange { min: 61_000, max: 61_001 },
        ..LoadOptions::default()
    };
    for hook in NetHook::ALL {
        let mut dp = datapath(&node, &opts, &nodeport(REMOTE_POD, 0), true)?;
        let mut ports = Vec::new();
        for cport in [41001, 41002] {
            let out = node.from_net(&dp, hook, &from_client(client(cport), node_port(), TcpFlags::SYN))?;
            ensure!(out.verdict == hook.sent(node.eth0, node.eth0), "{hook:?}: flow {cport}");
            ports.push(tcp_ports(&out.frame)?.0.port());
        }
        ports.sort_unstable();
        ensure!(ports == [61_000, 61_001], "{hook:?}: distinct ports, got {ports:?}");
        let out = node.from_net(&dp, hook, &from_client(client(41003), node_port(), TcpFlags::SYN))?;
        ensure!(out.verdict == hook.drop(), "{hook:?}: third flow verdict {}", out.verdict);
        ensure!(dp.stat(Stat::DropSnatPortsExhausted)? == 1);
        ensure!(dp.conntrack()?.len() == 4, "two flows, two entries each");
    }
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn a_reused_client_tuple_after_a_reset_gets_a_new_snat_flow() -> Result<()> {
    let node = Node::new("reuse")?;
    for hook in NetHook::ALL {
        let mut dp = datapath(&node, &LoadOptions::default(), &nodeport(REMOTE_POD, 0), true)?;
        let syn = from_client(client(42000), node_port(), TcpFlags::SYN);
        node.from_net(&dp, hook, &syn)?;
        let rst = from_client(client(42000), node_port(), TcpFlags::RST);
        let out = node.from_net(&dp, hook, &rst)?;
        ensure!(out.verdict == hook.sent(node.eth0, node.eth0), "the RST is forwarded");
        let fwd = dp
            .ct_get(&ct_key(client(42000), node_port(), PROTO_TCP, CT_FORWARD))?
            .context("forward entry")?;
        ensure!(fwd.state == ct_state::TCP_CLOSED);
        // Many connections one after the other on the same tuple: each one is a new flow.
        for i in 0..5 {
            let out = node.from_net(&dp, hook, &syn)?;
            ensure!(out.verdict == hook.sent(node.eth0, node.eth0), "{hook:?}: SYN {i}");
            let fwd: CtValue = dp
                .ct_get(&ct_key(client(42000), node_port(), PROTO_TCP, CT_FORWARD))?
                .context("forward entry")?;
            ensure!(fwd.state == ct_state::TCP_SYN_SENT, "{hook:?}: SYN {i} starts over");
            node.from_net(&dp, hook, &rst)?;
        }
        ensure!(dp.stat(Stat::CtTupleReused)? == 5, "{hook:?}: {:?}", dp.nonzero_stats()?);
        ensure!(dp.conntrack()?.len() == 2, "{hook:?}: the old pairs are gone: {:?}", dp.conntrack()?);
    }
    Ok(())
}

/// A client port re-used after a closed flow takes the old flow's entries over when a new flow
/// starts on it (`a_reused_client_tuple_after_a_reset_gets_a_new_snat_flow`); when none starts
/// (the Service lost its endpoints), the closed flow's pair is removed all the same, so no
/// answer on its tuples is restored to the frontend any more.
#[test]
#[ignore = "needs root"]
fn a_reused_tuple_that_starts_no_flow_leaves_no_entry_of_the_old_one() -> Result<()> {
    let node = Node::new("forget")?;
    for (backend, tag) in [(LOCAL_POD, "local"), (REMOTE_POD, "remote")] {
        for hook in NetHook::ALL {
            let svc = nodeport(backend, 0);
            let mut dp = datapath(&node, &LoadOptions::default(), &svc, true)?;
            let syn = from_client(client(42100), node_port(), TcpFlags::SYN);
            node.from_net(&dp, hook, &syn)?;
            node.from_net(&dp, hook, &from_client(client(42100), node_port(), TcpFlags::RST))?;
            let ct = dp.conntrack()?;
            ensure!(
                ct.len() == 2 && ct.iter().all(|(_, v)| v.state == ct_state::TCP_CLOSED),
                "{tag} {hook:?}: a closed pair: {ct:?}"
            );
            let mut empty = svc.clone();
            empty.backends.clear();
            dp.set_service(&empty)?;
            let out = node.from_net(&dp, hook, &syn)?;
            // Refused: tc bounces a RST|ACK back out, XDP hands the SYN to tc untouched.
            let refused = match hook {
                NetHook::Xdp => out.verdict == hook.pass() && out.frame == syn,
                NetHook::Tc => decode_checked(&out.frame)?.tcp()?.rst,
            };
            ensure!(refused, "{tag} {hook:?}: the SYN was not refused");
            ensure!(
                dp.conntrack()?.is_empty(),
                "{tag} {hook:?}: the closed flow's entries stayed: {:?}",
                dp.conntrack()?
            );
        }
    }
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn a_load_balancer_ip_is_snated_to_the_device_address() -> Result<()> {
    let node = Node::new("lbip")?;
    let svc = ServiceSpec {
        frontend: SocketAddrV4::new(LB_IP, 80),
        proto: PROTO_UDP,
        rev_nat_id: REV_NAT_ID,
        flags: SVC_FLAG_LOAD_BALANCER,
        affinity_timeout: 0,
        backends: vec![BackendSpec { id: 1, addr: pod(REMOTE_POD) }],
    };
    for hook in NetHook::ALL {
        let mut dp = datapath(&node, &LoadOptions::default(), &svc, true)?;
        let mut udp = Udp::new(client(43000), SocketAddrV4::new(LB_IP, 80), b"hello");
        udp.macs = (CLIENT_MAC, NODE_MAC);
        let out = node.from_net(&dp, hook, &udp.frame())?;
        ensure!(out.verdict == hook.sent(node.eth0, node.eth0), "{hook:?}: verdict {}", out.verdict);
        let d = decode_checked(&out.frame)?;
        let u = d.udp()?;
        ensure!(Ipv4Addr::from(d.ip.source) == NODE_IP, "{hook:?}: SNAT source {:?}", d.ip.source);
        ensure!((Ipv4Addr::from(d.ip.destination), u.destination_port) == (REMOTE_POD, POD_PORT));
        ensure!(d.payload == b"hello");
        ensure!(dp.stat(Stat::Snat)? == 1);
    }
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn packets_that_are_not_ours_pass_untouched() -> Result<()> {
    let node = Node::new("notours")?;
    for hook in NetHook::ALL {
        let mut dp = datapath(&node, &LoadOptions::default(), &nodeport(REMOTE_POD, 0), true)?;
        let frames = [
            from_client(client(44000), SocketAddrV4::new(NODE_IP, 22), TcpFlags::SYN),
            from_client(client(44000), SocketAddrV4::new(NODE_IP, 30081), TcpFlags::SYN),
            // An answer to the node's own connection, in the SNAT range but no flow of ours.
            from_client(SocketAddrV4::new(OTHER_NODE_IP, 443), SocketAddrV4::new(NODE_IP, 61_500), TcpFlags::SYN_ACK),
        ];
        for f in frames {
            let out = node.from_net(&dp, hook, &f)?;
            ensure!(out.verdict == hook.pass() && out.frame == f, "{hook:?}: untouched");
        }
        ensure!(dp.conntrack()?.is_empty());
        ensure!(dp.nonzero_stats()?.is_empty(), "{hook:?}: {:?}", dp.nonzero_stats()?);
    }
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn load_balancer_source_ranges_let_listed_clients_in_and_drop_the_rest() -> Result<()> {
    let node = Node::new("ranges")?;
    let lb = SocketAddrV4::new(LB_IP, 80);
    let svc = ServiceSpec {
        frontend: lb,
        proto: PROTO_TCP,
        rev_nat_id: REV_NAT_ID,
        flags: SVC_FLAG_LOAD_BALANCER | SVC_FLAG_SOURCE_RANGES,
        affinity_timeout: 0,
        backends: vec![BackendSpec { id: 1, addr: pod(LOCAL_POD) }],
    };
    let extras = Extras {
        src_ranges: vec![(Ipv4Addr::new(172, 31, 0, 192), 26), (Ipv4Addr::new(198, 51, 100, 7), 32)],
        ..Extras::default()
    };
    for hook in NetHook::ALL {
        let mut dp = datapath_with(&node, &LoadOptions::default(), &svc, &extras, true)?;
        // 172.31.0.200 is in 172.31.0.192/26; 198.51.100.7/32 exactly; the others are not.
        for (src, allowed) in [
            (client(45000), true),
            (SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 7), 45001), true),
            (SocketAddrV4::new(Ipv4Addr::new(172, 31, 0, 191), 45002), false),
            (SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 8), 45003), false),
        ] {
            let out = node.from_net(&dp, hook, &from_client(src, lb, TcpFlags::SYN))?;
            if allowed {
                ensure!(out.verdict == hook.pass(), "{hook:?}: {src} is allowed: {}", out.verdict);
                ensure!(tcp_ports(&out.frame)?.1 == pod(LOCAL_POD));
            } else {
                ensure!(out.verdict == hook.drop(), "{hook:?}: {src} is dropped: {}", out.verdict);
            }
        }
        ensure!(dp.stat(Stat::DropSourceRange)? == 2, "{hook:?}: {:?}", dp.nonzero_stats()?);
        // Pods are held to the ranges too.
        let out = dp.from_pod(&Tcp::new(SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 5), 45004), lb, TcpFlags::SYN).frame())?;
        ensure!(out.verdict == 2, "a pod outside the ranges is dropped: {}", out.verdict);
    }
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn a_direct_connection_on_the_tuple_of_an_old_nodeport_flow_is_not_rewritten() -> Result<()> {
    let node = Node::new("direct")?;
    for hook in NetHook::ALL {
        let mut dp = datapath(&node, &LoadOptions::default(), &nodeport(LOCAL_POD, 0), true)?;
        // A NodePort flow to the local pod, closed by the client (FIN): its entries live on.
        node.from_net(&dp, hook, &from_client(client(46000), node_port(), TcpFlags::SYN))?;
        node.from_net(&dp, hook, &from_client(client(46000), node_port(), TcpFlags::FIN_ACK))?;
        let answer_key = ct_key(pod(LOCAL_POD), client(46000), PROTO_TCP, CT_REPLY);
        ensure!(dp.ct_get(&answer_key)?.is_some(), "{hook:?}: the old reply entry is there");
        // The same client port now connects to the pod directly (routed to the pod network).
        let syn = from_client(client(46000), pod(LOCAL_POD), TcpFlags::SYN);
        let out = node.from_net(&dp, hook, &syn)?;
        ensure!(out.verdict == hook.pass() && out.frame == syn, "{hook:?}: untouched");
        // The pod's answer leaves as it is, and the closed flow's entries go.
        let mut answer = Tcp::new(pod(LOCAL_POD), client(46000), TcpFlags::SYN_ACK);
        answer.macs = (NODE_MAC, CLIENT_MAC);
        let out = node.to_net(&dp, &answer.frame())?;
        ensure!(out.frame == answer.frame(), "{hook:?}: the direct answer is not rewritten");
        ensure!(dp.ct_get(&answer_key)?.is_none(), "{hook:?}: the stale reply entry is gone");
        ensure!(dp.stat(Stat::CtStaleReplyRemoved)? == 1);
    }
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn icmp_errors_about_snated_flows_reach_the_client_and_the_backend() -> Result<()> {
    let node = Node::new("icmp")?;
    let mut dp = datapath(&node, &LoadOptions::default(), &nodeport(REMOTE_POD, 0), true)?;
    let cl = client(47000);
    let out = node.from_net(&dp, NetHook::Tc, &from_client(cl, node_port(), TcpFlags::SYN))?;
    let (snat, _) = tcp_ports(&out.frame)?;
    let data = |src, dst| {
        let mut t = Tcp::new(src, dst, TcpFlags::PSH_ACK);
        t.payload = b"0123456789".to_vec();
        t
    };
    let frag_needed = IcmpErrorKind::FragNeeded { mtu: 1_200 };

    // A router on the way to the backend (the other node) cannot forward what the node sent:
    // the client gets the error, about what it sent (client -> NodePort).
    for (sender, want_src) in [(OTHER_NODE_IP, OTHER_NODE_IP), (REMOTE_POD, NODE_IP)] {
        let mut err = IcmpError::new(sender, NODE_IP, frag_needed, &ip_packet(&data(snat, pod(REMOTE_POD)).frame()));
        err.macs = (OTHER_NODE_MAC, NODE_MAC);
        let out = node.from_net(&dp, NetHook::Tc, &err.frame())?;
        ensure!(out.verdict == NetHook::Tc.sent(node.eth0, node.eth0), "sent on: {}", out.verdict);
        let want = IcmpError {
            src: want_src,
            dst: CLIENT_IP,
            quote: ip_packet(&data(cl, node_port()).frame()),
            macs: (NODE_MAC, CLIENT_MAC),
            ..err.clone()
        };
        decode_checked(&out.frame)?;
        ensure!(out.frame == want.frame(), "error from {sender} to the client:\n got  {:02x?}\n want {:02x?}", out.frame, want.frame());
    }
    // The client cannot take the answer: the backend gets the error, about what it sent
    // (backend -> node:port), from the node.
    let mut err = IcmpError::new(CLIENT_IP, NODE_IP, IcmpErrorKind::PortUnreachable, &ip_packet(&data(node_port(), cl).frame()));
    err.macs = (CLIENT_MAC, NODE_MAC);
    let out = node.from_net(&dp, NetHook::Tc, &err.frame())?;
    ensure!(out.verdict == NetHook::Tc.sent(node.eth0, node.eth0), "sent on: {}", out.verdict);
    let want = IcmpError {
        src: NODE_IP,
        dst: REMOTE_POD,
        quote: ip_packet(&data(pod(REMOTE_POD), snat).frame()),
        macs: (NODE_MAC, OTHER_NODE_MAC),
        ..err.clone()
    };
    ensure!(out.frame == want.frame(), "error from the client to the backend:\n got  {:02x?}\n want {:02x?}", out.frame, want.frame());
    ensure!(dp.stat(Stat::IcmpErrorTranslated)? == 3);
    // XDP hands ICMP errors to tc.
    let out = node.from_net(&dp, NetHook::Xdp, &err.frame())?;
    ensure!(out.verdict == NetHook::Xdp.pass() && out.frame == err.frame());
    Ok(())
}

/// Busy external clients over time, as a NodePort meets them: four client ports each run
/// connection after connection (SYN, the backend's SYN-ACK, data, RST), each port re-used at
/// once, while the Service's endpoints change (the local pod only, both, the remote pod only,
/// both again). Every connection must reach a current endpoint with the translation that
/// endpoint needs (SNAT to the node only for the remote one), its answer must come back from the
/// NodePort, and conntrack must hold exactly one pair per port: the last connection's. An answer
/// the remote pod sends late to a SNAT port whose flow is over is not translated.
#[test]
#[ignore = "needs root"]
fn busy_clients_reuse_their_ports_through_endpoint_changes_with_one_pair_per_port() -> Result<()> {
    let node = Node::new("busy")?;
    let local = BackendSpec { id: 1, addr: pod(LOCAL_POD) };
    let remote = BackendSpec { id: 2, addr: pod(REMOTE_POD) };
    let phases: [Vec<BackendSpec>; 4] = [
        vec![local],
        vec![local, remote],
        vec![remote],
        vec![local, remote],
    ];
    let ports = [43_001u16, 43_002, 43_003, 43_004];
    let extras = Extras {
        local: vec![pod(LOCAL_POD)],
        ..Extras::default()
    };
    for hook in NetHook::ALL {
        let mut svc = nodeport(LOCAL_POD, 0);
        let mut dp = datapath(&node, &LoadOptions::default(), &svc, true)?;
        // The SNAT port each client port's last connection to the remote pod used, while no
        // later connection on that client port holds it.
        let mut old_snat: Vec<Option<SocketAddrV4>> = vec![None; ports.len()];
        // Connections of the phases with both endpoints, by where they went.
        let (mut to_local, mut to_remote) = (0, 0);
        for (phase, members) in phases.iter().enumerate() {
            svc.backends = members.clone();
            dp.set_service_with(&svc, &extras)?;
            for round in 0..6 {
                for (i, &p) in ports.iter().enumerate() {
                    let cl = client(p);
                    let at = format!("{hook:?}, phase {phase}, round {round}, port {p}");
                    let out = node.from_net(&dp, hook, &from_client(cl, node_port(), TcpFlags::SYN))?;
                    let (src, dst) = tcp_ports(&out.frame)?;
                    ensure!(
                        members.iter().any(|m| m.addr == dst),
                        "{at}: SYN went to {dst}, members {members:?}"
                    );
                    let remote_flow = dst == pod(REMOTE_POD);
                    if remote_flow {
                        ensure!(out.verdict == hook.sent(node.eth0, node.eth0), "{at}: SYN verdict {}", out.verdict);
                        ensure!(*src.ip() == NODE_IP, "{at}: SNAT to the node, got {src}");
                    } else {
                        ensure!(out.verdict == hook.pass(), "{at}: SYN verdict {}", out.verdict);
                        ensure!(src == cl, "{at}: no SNAT to a local pod, got {src}");
                    }
                    if members.len() == 2 {
                        *(if remote_flow { &mut to_remote } else { &mut to_local }) += 1;
                    }
                    // A late answer of the remote pod to the SNAT port of this port's previous
                    // flow: that flow is over, so it is not translated (unless the new flow
                    // holds the same SNAT port, when it is the new flow's answer).
                    if let Some(old) = old_snat[i].take() {
                        if !(remote_flow && src == old) {
                            let mut late = Tcp::new(pod(REMOTE_POD), old, TcpFlags::ACK);
                            late.macs = (OTHER_NODE_MAC, NODE_MAC);
                            let late = late.frame();
                            let out = node.from_net(&dp, hook, &late)?;
                            ensure!(
                                out.verdict == hook.pass() && out.frame == late,
                                "{at}: a late answer to {old} was translated (verdict {})",
                                out.verdict
                            );
                        }
                    }
                    // The answer comes back as from the NodePort.
                    let answer = if remote_flow {
                        let mut a = Tcp::new(pod(REMOTE_POD), src, TcpFlags::SYN_ACK);
                        a.macs = (OTHER_NODE_MAC, NODE_MAC);
                        let out = node.from_net(&dp, hook, &a.frame())?;
                        ensure!(out.verdict == hook.sent(node.eth0, node.eth0), "{at}: answer verdict {}", out.verdict);
                        out
                    } else {
                        let mut a = Tcp::new(pod(LOCAL_POD), cl, TcpFlags::SYN_ACK);
                        a.macs = (NODE_MAC, CLIENT_MAC);
                        let out = node.to_net(&dp, &a.frame())?;
                        ensure!(out.verdict == 0, "{at}: to_net verdict {}", out.verdict);
                        out
                    };
                    ensure!(tcp_ports(&answer.frame)? == (node_port(), cl), "{at}: answer not restored");
                    // The rest of the connection keeps its translation, then ends with a RST.
                    for flags in [TcpFlags::PSH_ACK, TcpFlags::RST] {
                        let out = node.from_net(&dp, hook, &from_client(cl, node_port(), flags))?;
                        ensure!(tcp_ports(&out.frame)? == (src, dst), "{at}: {flags:?} translated otherwise");
                    }
                    if remote_flow {
                        old_snat[i] = Some(src);
                    }
                    let ct = dp.conntrack()?;
                    let used = if phase == 0 && round == 0 { i + 1 } else { ports.len() };
                    ensure!(ct.len() == 2 * used, "{at}: {} entries for {used} ports: {ct:?}", ct.len());
                    let fwd = dp
                        .ct_get(&ct_key(cl, node_port(), PROTO_TCP, CT_FORWARD))?
                        .with_context(|| format!("{at}: forward entry"))?;
                    ensure!(fwd.state == ct_state::TCP_CLOSED, "{at}: state {}", fwd.state);
                    ensure!((fwd.nat_addr, fwd.nat_port) == (ip4(dst.ip().octets()), port(dst.port())));
                }
            }
        }
        // Random selection spread the 48 connections of those phases over both (fewer than 8
        // on one side has a probability of about 1e-6).
        ensure!(to_local >= 8 && to_remote >= 8, "{hook:?}: {to_local} local, {to_remote} remote");
    }
    Ok(())
}
