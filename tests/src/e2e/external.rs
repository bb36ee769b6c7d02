//! Scaffolding of the tests of traffic from outside the cluster (tests/tests/e2e_external.rs):
//! agents started as on a real node (`--node-name`, `--devices eth0`, a chosen `--xdp-mode`),
//! waits on one node's frontends (NodePort frontends exist only on the node holding the
//! address, and an externalTrafficPolicy Local frontend has different backends on each node),
//! tallies from an external client, and what a backend saw as the client's address.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use lb_testkit::agent::inspect_services;
use lb_testkit::cluster::{node_ip, EXTERNAL_IP};
use lb_testkit::{client, inspect_stats, wait_until, ClientError, NetNs, Pod, XdpMode};

use super::{Env, CLIENT_EPHEMERAL_PORTS, CONVERGE};

const POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// The datapath's default SNAT port range (`--snat-port-range`, `lb_common::DEFAULT_SNAT_PORTS`).
pub const SNAT_PORTS: std::ops::RangeInclusive<u16> = 61000..=65535;

/// Start one agent per node as a node of a real cluster runs it: `--node-name nodeK` (so the
/// EndpointSlices' nodeName says which endpoints are local), `--devices eth0` (the uplink to
/// the fabric, where the external client's traffic arrives), `--xdp-mode mode`. The external
/// client's ephemeral ports are moved to [`CLIENT_EPHEMERAL_PORTS`], clear of the source ports
/// tests bind explicitly and of the SNAT range.
pub fn start_node_agents(env: &mut Env, mode: XdpMode) {
    env.cluster
        .external
        .set_ephemeral_ports(CLIENT_EPHEMERAL_PORTS)
        .expect("ephemeral ports of the external client");
    env.start_agents_per_node(|node, spec| {
        spec.node_name = Some(node.name.clone());
        spec.devices = Some("eth0".into());
        spec.xdp_mode = Some(mode);
    });
}

/// "addr:port/PROTO" of an inspected frontend, whatever its scope (`xlb inspect` marks the
/// `SCOPE_INT` entry's name with "[int]").
fn plain_frontend(f: &lb_testkit::InspectService) -> String {
    format!("{}:{}/{}", f.addr, f.port, f.proto)
}

/// Wait until node `k` has frontend `frontend` ("addr:port/PROTO") in `scope`
/// (`lb_common::SCOPE_EXT` 0 / `SCOPE_INT` 1) with exactly the backends `want` ("addr:port";
/// empty: present without backends). Panics with the node's inspect output otherwise.
pub fn wait_frontend_on(env: &Env, k: u8, frontend: &str, scope: u8, want: &[&str]) {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    let pin = env.pin(k);
    let ok = wait_until(CONVERGE, POLL, || {
        inspect_services(&pin).is_ok_and(|s| {
            s.iter().any(|f| {
                plain_frontend(f) == frontend && f.scope == scope && f.backend_addrs() == want
            })
        })
    });
    assert!(
        ok,
        "node{k}: {frontend} (scope {scope}) never had backends {want:?}; node{k}: {:#?}",
        inspect_services(&pin)
    );
}

/// Wait until node `k` has no frontend `frontend` (any scope).
pub fn wait_no_frontend_on(env: &Env, k: u8, frontend: &str) {
    let pin = env.pin(k);
    let ok = wait_until(CONVERGE, POLL, || {
        inspect_services(&pin).is_ok_and(|s| s.iter().all(|f| plain_frontend(f) != frontend))
    });
    assert!(ok, "node{k}: {frontend} never went away");
}

/// Assert node `k`'s eth0 runs the XDP program as `mode` says: `ip link` prints "xdp"
/// (native) or "xdpgeneric" (generic) after the MTU, and no XDP attach mode at all for `off`.
pub fn assert_xdp_mode(env: &Env, k: u8, mode: XdpMode) {
    let out = env
        .cluster
        .node(k)
        .ns
        .ip(&["link", "show", "dev", "eth0"])
        .expect("ip link show eth0");
    let words: Vec<&str> = out.split_whitespace().collect();
    let xdp_words: Vec<&str> = words
        .iter()
        .copied()
        .filter(|w| {
            matches!(
                *w,
                "xdp" | "xdpgeneric" | "xdpdrv" | "xdpoffload" | "xdpmulti"
            )
        })
        .collect();
    match mode.ip_link_word() {
        Some(w) => assert_eq!(xdp_words, [w], "node{k} --xdp-mode {mode}: {out}"),
        None => assert!(xdp_words.is_empty(), "node{k} --xdp-mode off: {out}"),
    }
}

/// `n` requests from namespace `ns` to `target` (TCP: a new connection each; UDP: a new socket,
/// so a new flow, each): answers per pod name, errors as "<error: ...>".
pub fn tally_from(ns: &NetNs, target: SocketAddr, n: usize, udp: bool) -> BTreeMap<String, usize> {
    let mut hits = BTreeMap::new();
    for _ in 0..n {
        let r = if udp {
            client::udp_request(ns, target)
        } else {
            client::tcp_request(ns, target)
        };
        *hits
            .entry(r.unwrap_or_else(|e| format!("<error: {e}>")))
            .or_default() += 1;
    }
    hits
}

/// Assert that every one of `n` answers of `hits` came from a pod of `pods`, and each of
/// `must` answered at least once.
pub fn assert_answered_by(
    what: &str,
    hits: &BTreeMap<String, usize>,
    n: usize,
    pods: &[&str],
    must: &[&str],
) {
    assert_eq!(hits.values().sum::<usize>(), n, "{what}: {hits:?}");
    assert!(
        hits.keys().all(|who| pods.contains(&who.as_str())),
        "{what}: answered by others than {pods:?}: {hits:?}"
    );
    for p in must {
        assert!(
            hits.contains_key(*p),
            "{what}: {p} never answered: {hits:?}"
        );
    }
}

/// How many connections / datagrams each of `pods` has seen so far (to look at the new ones).
pub fn peer_marks(pods: &[&Pod]) -> Vec<usize> {
    pods.iter().map(|p| p.peers().len()).collect()
}

/// The source addresses `pod` saw after `mark` (a [`peer_marks`] value).
pub fn peers_since(pod: &Pod, mark: usize) -> Vec<SocketAddr> {
    pod.peers().into_iter().skip(mark).collect()
}

/// Assert what the backends saw as the client of the requests sent since `marks`: the pod on
/// the node the requests entered (`via`) saw the external client itself (no SNAT), the others
/// saw `via`'s address with a port of the SNAT range. `pods` and `marks` are parallel.
pub fn assert_snat_only_to_remote(what: &str, pods: &[&Pod], marks: &[usize], via: u8) {
    for (pod, &mark) in pods.iter().zip(marks) {
        let seen = peers_since(pod, mark);
        if pod.node == via {
            assert!(
                seen.iter().all(|a| a.ip() == IpAddr::V4(EXTERNAL_IP)),
                "{what}: {} is on node{via}, where the requests entered: it must see the client \
                 {EXTERNAL_IP} itself, saw {seen:?}",
                pod.name
            );
        } else {
            assert!(
                seen.iter()
                    .all(|a| a.ip() == IpAddr::V4(node_ip(via)) && SNAT_PORTS.contains(&a.port())),
                "{what}: {} is on node{}, the requests entered node{via}: it must see node{via}'s \
                 address {} with a SNAT port, saw {seen:?}",
                pod.name,
                pod.node,
                node_ip(via)
            );
        }
    }
}

/// Assert `r` failed by timing out: nothing answered, not even a refusal.
pub fn assert_silent<T: std::fmt::Debug>(what: &str, r: Result<T, ClientError>) {
    match r {
        Err(ClientError::Timeout) => {}
        other => panic!("{what}: expected no answer at all (a drop), got {other:?}"),
    }
}

/// Assert `r` was refused (TCP RST / ICMP port unreachable), not silent and not answered.
pub fn assert_refused<T: std::fmt::Debug>(what: &str, r: Result<T, ClientError>) {
    match r {
        Err(ClientError::Refused) => {}
        other => panic!("{what}: expected a refusal, got {other:?}"),
    }
}

/// Datapath counter `name` of node `k` (`xlb inspect stats`); 0 when absent.
pub fn stat(env: &Env, k: u8, name: &str) -> u64 {
    inspect_stats(&env.pin(k))
        .unwrap_or_else(|e| panic!("inspect stats on node{k}: {e}"))
        .get(name)
        .copied()
        .unwrap_or(0)
}

/// "a.b.c.d:port/PROTO".
pub fn frontend(ip: Ipv4Addr, port: u16, proto: &str) -> String {
    format!("{ip}:{port}/{proto}")
}
