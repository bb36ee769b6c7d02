//! End to end: backend selection algorithms on the 2-node netns cluster, with real TCP clients
//! and serve-hostname backends (one agent per node, manifests directory).
//!
//! - `--lb-algorithm round-robin`: 300 connections from one client pod are spread exactly
//!   evenly over 3 pods.
//! - Maglev (annotation `xlb.io/lb-algorithm: maglev`): connections spread over every pod, and
//!   an external client's source port reaches the same pod through both nodes' NodePorts, the
//!   pod `lb_model::maglev` computes for it.
//! - Switching the algorithm live (the annotation) keeps established connections on their pods.
//!
//! Root only: `#[ignore = "needs root"]`, run by `cargo xtask test`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use lb_common::{SCOPE_EXT, SVC_FLAG_ALG_MAGLEV, SVC_FLAG_ALG_RR};
use lb_model::{maglev, BackendAddr, Frontend, Proto};
use lb_testkit::cluster::{node_ip, EXTERNAL_IP};
use lb_testkit::service_yaml::{
    write_atomic, Endpoint, ExtSvcManifest, SvcManifest, SvcOptions, SvcPort,
};
use lb_testkit::{client, wait_until, Close, Dial, XdpMode};
use lb_userspace::datapath::PinnedMaps;
use xlb_tests::e2e::external::{frontend, start_node_agents, wait_frontend_on};
use xlb_tests::e2e::{hostport, Env, BURST_MAX_ERRORS, BURST_TIMEOUT, CONVERGE};

const SVC: &str = "algo";
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 70);
const NODE_PORT: u16 = 30070;
const TARGET_PORT: u16 = 8080;
/// The backend pods: name, node, address.
const PODS: [(&str, u8, Ipv4Addr); 3] = [
    ("algo-a", 1, Ipv4Addr::new(10, 244, 1, 21)),
    ("algo-b", 2, Ipv4Addr::new(10, 244, 2, 22)),
    ("algo-c", 1, Ipv4Addr::new(10, 244, 1, 23)),
];
const CLIENT: &str = "algo-client";
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 100);
const POLL: Duration = Duration::from_millis(50);

/// The cluster with the backend pods serving and a client pod on node1 (no agents yet).
fn env_with_pods() -> Env {
    let mut env = Env::new();
    for (name, node, ip) in PODS {
        env.add_pod(node, name, ip, &[TARGET_PORT], &[]);
    }
    env.add_client(1, CLIENT, CLIENT_IP);
    env
}

fn backends() -> Vec<String> {
    PODS.iter()
        .map(|(_, _, ip)| hostport(*ip, TARGET_PORT))
        .collect()
}

fn backend_refs(b: &[String]) -> Vec<&str> {
    b.iter().map(String::as_str).collect()
}

/// The Service (NodePort `NODE_PORT` when `node_port`) with the annotation `alg` (None: none).
fn write_service(env: &Env, node_port: bool, alg: Option<&str>) {
    let mut port = SvcPort::tcp("web", 80, TARGET_PORT);
    if node_port {
        port = port.node_port(NODE_PORT);
    }
    let svc = SvcManifest {
        name: SVC.into(),
        cluster_ip: VIP,
        ports: vec![port],
        endpoints: PODS
            .iter()
            .map(|(name, node, ip)| Endpoint::ready(*ip, &format!("node{node}"), name))
            .collect(),
    };
    let yaml = if node_port {
        ExtSvcManifest::new(svc, SvcOptions::node_port()).to_yaml()
    } else {
        svc.to_yaml()
    };
    let meta = format!("metadata:\n  name: {SVC}\n  namespace: default\n");
    assert!(
        yaml.starts_with(&format!("apiVersion: v1\nkind: Service\n{meta}")),
        "{yaml}"
    );
    let yaml = match alg {
        Some(a) => yaml.replacen(
            &meta,
            &format!("{meta}  annotations:\n    xlb.io/lb-algorithm: {a}\n"),
            1,
        ),
        None => yaml,
    };
    write_atomic(&env.manifests.join(format!("{SVC}.yaml")), &yaml).expect("writing the manifest");
}

fn cluster_ip_frontend() -> Frontend {
    Frontend {
        addr: VIP,
        port: 80,
        proto: Proto::Tcp,
        scope: SCOPE_EXT,
    }
}

/// The master flags and Maglev table of `fe` in node `k`'s pinned maps.
fn master(env: &Env, k: u8, fe: &Frontend) -> Option<(u32, Option<u32>)> {
    let applied = PinnedMaps::open(&env.pin(k)).ok()?.applied().ok()?;
    applied
        .frontends
        .get(fe)
        .filter(|af| af.rev_nat_id != 0)
        .map(|af| (af.flags, af.table))
}

/// Wait until every node's master of `fe` selects with `alg` (`SVC_FLAG_ALG_*` bits; 0:
/// random), with a Maglev table when Maglev.
fn wait_algorithm(env: &Env, fe: &Frontend, alg: u32) {
    let ok = wait_until(CONVERGE, POLL, || {
        [1, 2].iter().all(|k| {
            master(env, *k, fe).is_some_and(|(flags, table)| {
                flags & (SVC_FLAG_ALG_RR | SVC_FLAG_ALG_MAGLEV) == alg
                    && table.is_some() == (alg == SVC_FLAG_ALG_MAGLEV)
            })
        })
    });
    assert!(
        ok,
        "{fe} never got algorithm flags {alg:#x}: node1 {:?}",
        master(env, 1, fe)
    );
}

/// Pin the calling thread to the CPU it runs on.
fn pin_to_this_cpu() -> usize {
    // SAFETY: plain libc calls on the calling thread with a zeroed, then filled, cpu set.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(cpu >= 0, "sched_getcpu");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
        cpu as usize
    }
}

/// Round-robin: 300 new connections from one client pod, one after the other, are spread over
/// the 3 pods exactly evenly. The client's thread is pinned to one CPU: a pod's packets are
/// handled by `from_pod` on the CPU that sends them (the veth hands them to its peer on the same
/// CPU, no RPS), so every SYN meets the same per-CPU counter, which visits the 3 slots in turn:
/// 100 rounds, 100 connections each. (Unpinned, each CPU the client ran on would add at most
/// one connection of imbalance per pod.)
#[test]
#[ignore = "needs root"]
fn round_robin_spreads_300_connections_from_one_pod_evenly_over_3_pods() {
    let mut env = env_with_pods();
    env.start_agents_with(|spec| {
        spec.extra_args
            .extend(["--lb-algorithm".into(), "round-robin".into()])
    });
    write_service(&env, false, None);
    let b = backends();
    env.wait_backends(&format!("{VIP}:80/TCP"), &backend_refs(&b));
    wait_algorithm(&env, &cluster_ip_frontend(), SVC_FLAG_ALG_RR);
    env.wait_programs_attached(CLIENT);
    let dst: SocketAddr = (VIP, 80).into();
    let (cpu, answers) = env
        .pod(CLIENT)
        .ns
        .run(|| {
            let cpu = pin_to_this_cpu();
            let answers: Vec<String> = (0..300)
                .map(|_| {
                    let d = Dial {
                        src_port: None,
                        dst,
                        close: Close::Rst,
                    };
                    client::dial(&d, BURST_TIMEOUT).unwrap_or_else(|e| format!("<error: {e}>"))
                })
                .collect();
            (cpu, answers)
        })
        .expect("running the client");
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for a in &answers {
        *tally.entry(a.clone()).or_default() += 1;
    }
    println!("round-robin, 300 connections from {CLIENT} (pinned to CPU {cpu}): {tally:?}");
    let want: BTreeMap<String, usize> = PODS.iter().map(|(n, _, _)| (n.to_string(), 100)).collect();
    assert_eq!(tally, want, "not exactly 100 per pod");
    // In turn: every 3 consecutive connections reach the 3 pods.
    for w in answers.windows(3) {
        assert!(
            w[0] != w[1] && w[1] != w[2] && w[0] != w[2],
            "not a cycle: {answers:?}"
        );
    }
}

/// The pod name `lb_model::maglev` picks for a client (address, TCP port) among [`PODS`].
fn maglev_pod(client: Ipv4Addr, port: u16) -> &'static str {
    maglev_pod_m(client, port, lb_common::DEFAULT_MAGLEV_M)
}

/// [`maglev_pod`] with tables of `m` entries.
fn maglev_pod_m(client: Ipv4Addr, port: u16, m: u32) -> &'static str {
    let backends: Vec<(BackendAddr, u32)> = PODS
        .iter()
        .enumerate()
        .map(|(i, (_, _, ip))| {
            let b = BackendAddr {
                addr: *ip,
                port: TARGET_PORT,
                proto: Proto::Tcp,
            };
            (b, i as u32)
        })
        .collect();
    let table = maglev::table(&backends, m);
    let i = table[maglev::flow_entry(client, port, lb_common::PROTO_TCP, m) as usize];
    PODS[i as usize].0
}

/// Maglev: an external client's connection from source port p reaches the same pod through
/// node1's and node2's NodePort (the same table on both nodes, a hash of the client only), the
/// pod the model computes; the ports spread over every pod, and so do a pod's connections to
/// the ClusterIP.
#[test]
#[ignore = "needs root"]
fn maglev_spreads_over_all_pods_and_a_client_port_reaches_the_same_pod_through_both_nodes() {
    let mut env = env_with_pods();
    start_node_agents(&mut env, XdpMode::Native);
    write_service(&env, true, Some("maglev"));
    let b = backends();
    for k in [1, 2] {
        wait_frontend_on(
            &env,
            k,
            &frontend(node_ip(k), NODE_PORT, "TCP"),
            SCOPE_EXT,
            &backend_refs(&b),
        );
        let np = Frontend {
            addr: node_ip(k),
            port: NODE_PORT,
            proto: Proto::Tcp,
            scope: SCOPE_EXT,
        };
        let ok = wait_until(CONVERGE, POLL, || {
            master(&env, k, &np).is_some_and(|(f, t)| f & SVC_FLAG_ALG_MAGLEV != 0 && t.is_some())
        });
        assert!(ok, "node{k}: the NodePort never got its Maglev table");
    }
    wait_algorithm(&env, &cluster_ip_frontend(), SVC_FLAG_ALG_MAGLEV);

    // 100 source ports, each through both nodes (a new connection each, RST-closed).
    let ports: Vec<u16> = (40_000..40_100).collect();
    let dials: Vec<Dial> = ports
        .iter()
        .flat_map(|p| {
            [1u8, 2].map(|k| Dial {
                src_port: Some(*p),
                dst: (node_ip(k), NODE_PORT).into(),
                close: Close::Rst,
            })
        })
        .collect();
    let results = client::tcp_burst(
        &env.cluster.external,
        &dials,
        BURST_TIMEOUT,
        BURST_MAX_ERRORS,
    )
    .expect("external client burst");
    assert_eq!(
        results.len(),
        dials.len(),
        "the burst stopped early: {results:?}"
    );
    let mut tally: BTreeMap<&str, usize> = BTreeMap::new();
    let mut wrong = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let want = maglev_pod(EXTERNAL_IP, *p);
        let (via1, via2) = (&results[2 * i], &results[2 * i + 1]);
        match (via1, via2) {
            (Ok(a), Ok(b)) if a == want && b == want => *tally.entry(want).or_default() += 1,
            other => wrong.push(format!("port {p}: {other:?}, the model says {want}")),
        }
    }
    println!("Maglev via both NodePorts, 100 client ports: {tally:?}");
    assert!(wrong.is_empty(), "{} of 100 ports: {wrong:#?}", wrong.len());
    assert_eq!(tally.len(), 3, "every pod gets client ports: {tally:?}");

    // A pod's connections to the ClusterIP (ephemeral ports) reach every pod too.
    let hits = xlb_tests::e2e::tally_tcp(env.pod(CLIENT), (VIP, 80).into(), 60);
    println!("Maglev, 60 connections from {CLIENT} to the ClusterIP: {hits:?}");
    assert_eq!(hits.values().sum::<usize>(), 60);
    for (name, _, _) in PODS {
        assert!(
            hits.get(name).is_some_and(|n| *n > 0),
            "{name} never answered: {hits:?}"
        );
    }
}

/// Switching the algorithm with the annotation (random -> Maglev -> round-robin -> random)
/// keeps every established connection on its pod (conntrack is untouched); new connections
/// keep being answered.
#[test]
#[ignore = "needs root"]
fn switching_the_algorithm_live_keeps_established_connections_on_their_backends() {
    let mut env = env_with_pods();
    env.start_agents();
    write_service(&env, false, None);
    let b = backends();
    env.wait_backends(&format!("{VIP}:80/TCP"), &backend_refs(&b));
    env.wait_programs_attached(CLIENT);
    let fe = cluster_ip_frontend();
    wait_algorithm(&env, &fe, 0);
    let dst: SocketAddr = (VIP, 80).into();
    let mut conns: Vec<lb_testkit::TcpConn> = (0..9)
        .map(|i| {
            env.pod(CLIENT)
                .tcp_connect(dst)
                .unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect();
    let pods: Vec<String> = conns.iter().map(|c| c.greeting().to_string()).collect();
    println!("established connections on {pods:?}");
    for (alg, flag) in [
        (Some("maglev"), SVC_FLAG_ALG_MAGLEV),
        (Some("round-robin"), SVC_FLAG_ALG_RR),
        (Some("maglev"), SVC_FLAG_ALG_MAGLEV),
        (None, 0),
    ] {
        write_service(&env, false, alg);
        wait_algorithm(&env, &fe, flag);
        for (i, c) in conns.iter_mut().enumerate() {
            let answer = c
                .request(&format!("after {alg:?}"))
                .unwrap_or_else(|e| panic!("{alg:?}: connection {i} broke: {e}"));
            assert!(
                answer.starts_with(&format!("{} ", pods[i])),
                "{alg:?}: connection {i} of {} answered by {answer:?}",
                pods[i]
            );
        }
        let hits = xlb_tests::e2e::tally_tcp(env.pod(CLIENT), dst, 12);
        assert_eq!(
            hits.keys()
                .filter(|k| PODS.iter().any(|(n, _, _)| n == *k))
                .map(|k| hits[k])
                .sum::<usize>(),
            12,
            "{alg:?}: new connections: {hits:?}"
        );
    }
}

/// An agent restarted with another `--maglev-table-size` / `--maglev-tables` cannot reuse the
/// pinned Maglev array (its programs index with the new M): it creates a new one and writes the
/// tables in use into it before its programs replace the old ones. Established connections stay
/// on their pods, and new ones follow the table of the new size.
#[test]
#[ignore = "needs root"]
fn an_agent_restarted_with_another_maglev_table_size_rebuilds_the_tables() {
    let mut env = env_with_pods();
    env.start_agents();
    write_service(&env, false, Some("maglev"));
    let b = backends();
    env.wait_backends(&format!("{VIP}:80/TCP"), &backend_refs(&b));
    env.wait_programs_attached(CLIENT);
    let fe = cluster_ip_frontend();
    wait_algorithm(&env, &fe, SVC_FLAG_ALG_MAGLEV);
    let dst: SocketAddr = (VIP, 80).into();
    let mut conns: Vec<lb_testkit::TcpConn> = (0..6)
        .map(|_| env.pod(CLIENT).tcp_connect(dst).expect("connecting"))
        .collect();

    let agent = &mut env.agents[0];
    agent
        .spec_mut()
        .extra_args
        .extend(["--maglev-table-size", "251", "--maglev-tables", "8"].map(String::from));
    agent.restart().expect("restarting node1's agent");
    let log = agent.log_since_start();
    let line = log
        .lines()
        .find(|l| l.contains("the Maglev tables had another shape"))
        .unwrap_or_else(|| panic!("no rebuild logged:\n{log}"));
    assert!(line.contains("restored=1"), "{line}");
    let maps = PinnedMaps::open(&env.pin(1)).expect("pinned maps");
    assert_eq!(maps.maglev_geometry, maglev::Geometry { m: 251, tables: 8 });

    for (i, c) in conns.iter_mut().enumerate() {
        let greeting = c.greeting().to_string();
        let answer = c
            .request("still there")
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert!(
            answer.starts_with(&format!("{greeting} ")),
            "connection {i}: {answer}"
        );
    }
    // New connections from chosen ports get the pods of the M = 251 table.
    let dials: Vec<Dial> = (41_000..41_030)
        .map(|p| Dial {
            src_port: Some(p),
            dst,
            close: Close::Rst,
        })
        .collect();
    let results = client::tcp_burst(&env.pod(CLIENT).ns, &dials, BURST_TIMEOUT, BURST_MAX_ERRORS)
        .expect("client burst");
    for (d, r) in dials.iter().zip(&results) {
        let port = d.src_port.unwrap();
        let want = maglev_pod_m(CLIENT_IP, port, 251);
        assert_eq!(r.as_deref().ok(), Some(want), "port {port}: {r:?}");
    }
}
