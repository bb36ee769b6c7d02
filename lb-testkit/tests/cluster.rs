//! The netns cluster itself, without xlb: routed pods reach each other on the same node and across
//! nodes, serve-hostname answers TCP and UDP, clients tell refusal from success, and everything is
//! removed on drop. Needs root (`#[ignore = "needs root"]`; `cargo xtask test` runs it).

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::time::{Duration, Instant};

use lb_testkit::{cluster, netns, unique_prefix, Cluster};

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

#[test]
#[ignore = "needs root"]
fn pods_talk_across_nodes_and_everything_is_removed() {
    let prefix = unique_prefix();
    {
        let c = Cluster::new(&prefix, 2).unwrap();
        let a = c.add_pod(1, "a", Ipv4Addr::new(10, 244, 1, 5)).unwrap();
        let b = c.add_pod(1, "b", Ipv4Addr::new(10, 244, 1, 6)).unwrap();
        let r = c.add_pod(2, "r", Ipv4Addr::new(10, 244, 2, 5)).unwrap();
        b.serve(&[9376], &[9376]).unwrap();
        r.serve(&[9376], &[9376]).unwrap();

        // Same node and remote node, TCP and UDP.
        assert_eq!(a.tcp_request(addr(b.ip, 9376)).unwrap(), "b");
        assert_eq!(a.tcp_request(addr(r.ip, 9376)).unwrap(), "r");
        assert_eq!(a.udp_request(addr(r.ip, 9376)).unwrap(), "r");
        // The server saw the client pod's own address (routed, no NAT).
        assert!(
            r.peers()
                .iter()
                .all(|p| p.ip() == std::net::IpAddr::V4(a.ip)),
            "{:?}",
            r.peers()
        );
        assert_eq!(r.peers().len(), 2);

        // The echo protocol of a long-lived connection.
        let mut conn = a.tcp_connect(addr(r.ip, 9376)).unwrap();
        assert_eq!(conn.greeting(), "r");
        assert_eq!(conn.request("one").unwrap(), "r one");
        assert_eq!(conn.request("two").unwrap(), "r two");

        // A closed port is refused at once, TCP and UDP.
        let t = Instant::now();
        assert!(a.tcp_request(addr(r.ip, 9999)).unwrap_err().is_refused());
        assert!(a.udp_request(addr(r.ip, 9999)).unwrap_err().is_refused());
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());

        // The external client reaches a node over the fabric.
        let node2 = c.node(2);
        let l = node2
            .ns
            .run(|| TcpListener::bind((node2.ip, 0)))
            .unwrap()
            .unwrap();
        let port = l.local_addr().unwrap().port();
        let ok = c
            .external
            .run(|| {
                std::net::TcpStream::connect_timeout(
                    &(node2.ip, port).into(),
                    Duration::from_secs(2),
                )
            })
            .unwrap();
        assert!(ok.is_ok(), "{ok:?}");
        assert_eq!(cluster::EXTERNAL_IP, Ipv4Addr::new(172, 31, 0, 200));

        // Removing a pod removes its veth from the node.
        let veth = r.host_veth.clone();
        c.remove_pod(r);
        assert!(node2.ns.ip(&["link", "show", &veth]).is_err());
        drop(conn);
    }
    assert!(netns::list_with_prefix(&prefix).is_empty());
}
