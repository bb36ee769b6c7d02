//! BPF_PROG_TEST_RUN tests of backend selection in the real `from_pod` program: round-robin
//! (`SVC_FLAG_ALG_RR`: a per-CPU counter per frontend) and Maglev (`SVC_FLAG_ALG_MAGLEV`: the
//! frontend's table, indexed by a hash of the client address, port and protocol). Services are
//! programmed by the shipped planner and executor (see the harness), so the Maglev tables in
//! the map are the ones the control plane builds; every choice is checked against
//! `lb_model::maglev` computed independently here. Needs root.
//!
//! Run: `cargo test -p xlb-tests --test packet_algorithms -- --include-ignored --nocapture`

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{ensure, Context as _, Result};
use lb_common::{
    ip4, AffinityKey, AffinityValue, PROTO_TCP, PROTO_UDP, SVC_FLAG_AFFINITY, SVC_FLAG_ALG_MAGLEV,
    SVC_FLAG_ALG_RR, SVC_FLAG_CLUSTER_IP,
};
use lb_model::maglev;
use lb_userspace::datapath::{LoadOptions, MapSizes};
use xlb_tests::packet::{
    build::{Tcp, TcpFlags, Udp},
    harness::{now_coarse_ns, BackendSpec, ServiceSpec, TestDatapath, TC_ACT_OK, TC_ACT_REDIRECT},
    verify::{decode_checked, L4},
};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKEND_PORT: u16 = 9376;
const REV_NAT_ID: u32 = 7;
/// Client ports of the Maglev tests.
const PORTS: std::ops::Range<u16> = 40_000..40_300;

fn client(sport: u16) -> SocketAddrV4 {
    SocketAddrV4::new(CLIENT_IP, sport)
}

fn frontend(proto: u8) -> SocketAddrV4 {
    SocketAddrV4::new(VIP, if proto == PROTO_TCP { 80 } else { 53 })
}

/// `n` backends 10.244.1.(10 + i):9376 with ids `first_id + i`.
fn backends(n: usize, first_id: u32) -> Vec<BackendSpec> {
    (0..n)
        .map(|i| BackendSpec {
            id: first_id + i as u32,
            addr: SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 10 + i as u8), BACKEND_PORT),
        })
        .collect()
}

fn service(proto: u8, flags: u32, backends: Vec<BackendSpec>) -> ServiceSpec {
    ServiceSpec {
        frontend: frontend(proto),
        proto,
        rev_nat_id: REV_NAT_ID,
        flags: SVC_FLAG_CLUSTER_IP | flags,
        affinity_timeout: if flags & SVC_FLAG_AFFINITY != 0 {
            600
        } else {
            0
        },
        backends,
    }
}

/// The destination of a translated frame (checksums verified on the way).
fn destination(frame: &[u8]) -> Result<SocketAddrV4> {
    let d = decode_checked(frame)?;
    let dport = match &d.l4 {
        L4::Tcp(t) => t.destination_port,
        L4::Udp(u) => u.destination_port,
        other => anyhow::bail!("unexpected L4 {other:?}"),
    };
    Ok(SocketAddrV4::new(Ipv4Addr::from(d.ip.destination), dport))
}

/// A new flow from `client(sport)` to the Service: a SYN (TCP) or a datagram (UDP) through
/// `from_pod`. Returns the backend it was sent to.
fn new_flow(dp: &TestDatapath, proto: u8, sport: u16) -> Result<SocketAddrV4> {
    let frame = if proto == PROTO_TCP {
        Tcp::new(client(sport), frontend(proto), TcpFlags::SYN).frame()
    } else {
        Udp::new(client(sport), frontend(proto), b"q").frame()
    };
    let out = dp.from_pod(&frame)?;
    ensure!(
        out.verdict == TC_ACT_OK,
        "port {sport}: verdict {}",
        out.verdict
    );
    destination(&out.frame)
}

/// Pin the calling thread to the CPU it runs on: the round-robin counters are per CPU, and a
/// test run executes on the caller's CPU.
fn pin_to_this_cpu() -> Result<usize> {
    // SAFETY: plain libc calls on the calling thread with a zeroed, then filled, cpu set.
    unsafe {
        let cpu = libc::sched_getcpu();
        ensure!(cpu >= 0, "sched_getcpu failed");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        ensure!(
            rc == 0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
        Ok(cpu as usize)
    }
}

/// The Maglev table the model builds for `svc`'s backends (their addresses and ids).
fn model_table(svc: &ServiceSpec, m: u32) -> Result<Vec<u32>> {
    let pairs = svc
        .backends
        .iter()
        .map(|b| Ok((svc.model_backend(b)?, b.id)))
        .collect::<Result<Vec<_>>>()?;
    Ok(maglev::table(&pairs, m))
}

/// The backend address of id `id` in `svc`.
fn addr_of(svc: &ServiceSpec, id: u32) -> Result<SocketAddrV4> {
    svc.backends
        .iter()
        .find(|b| b.id == id)
        .map(|b| b.addr)
        .with_context(|| format!("no backend {id}"))
}

/// The Maglev table index the frontend's master names, per the control plane.
fn table_index(dp: &TestDatapath, svc: &ServiceSpec) -> Result<u32> {
    dp.applied()
        .frontends
        .get(&svc.model_frontend()?)
        .and_then(|af| af.table)
        .context("the frontend names no Maglev table")
}

/// What the model says client port `sport` gets: the backend at its entry of `table`.
fn model_choice(
    svc: &ServiceSpec,
    table: &[u32],
    proto: u8,
    sport: u16,
    m: u32,
) -> Result<SocketAddrV4> {
    let entry = maglev::flow_entry(CLIENT_IP, sport, proto, m) as usize;
    addr_of(svc, table[entry])
}

#[test]
#[ignore = "needs root"]
fn round_robin_cycles_through_every_slot_on_one_cpu() -> Result<()> {
    let cpu = pin_to_this_cpu()?;
    let mut dp = TestDatapath::load()?;
    let svc = service(PROTO_TCP, SVC_FLAG_ALG_RR, backends(4, 100));
    dp.set_service(&svc)?;
    let picks: Vec<SocketAddrV4> = (0..40)
        .map(|i| new_flow(&dp, PROTO_TCP, 30_000 + i))
        .collect::<Result<_>>()?;
    let mut counts: BTreeMap<SocketAddrV4, usize> = BTreeMap::new();
    for p in &picks {
        *counts.entry(*p).or_default() += 1;
    }
    println!("round-robin on CPU {cpu}, 40 new flows over 4 backends: {counts:?}");
    // A cycle: every 4 consecutive flows hit the 4 backends, in the same order each round.
    for w in picks.windows(4) {
        let distinct: std::collections::BTreeSet<_> = w.iter().collect();
        ensure!(distinct.len() == 4, "a round missed a backend: {picks:?}");
    }
    ensure!(
        picks.iter().zip(&picks[4..]).all(|(a, b)| a == b),
        "{picks:?}"
    );
    ensure!(
        counts.len() == 4 && counts.values().all(|n| *n == 10),
        "{counts:?}"
    );
    // The counter of this CPU moved by one per flow.
    let counters = dp.rr_counters(REV_NAT_ID)?.context("no RR entry")?;
    println!("RR counters per CPU: {counters:?}");
    ensure!(
        counters.len() > cpu
            && counters
                .iter()
                .enumerate()
                .all(|(i, c)| i == cpu || *c == 0),
        "only CPU {cpu}'s counter was used: {counters:?}"
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn round_robin_keeps_cycling_evenly_after_a_backend_leaves() -> Result<()> {
    pin_to_this_cpu()?;
    let mut dp = TestDatapath::load()?;
    let svc = service(PROTO_UDP, SVC_FLAG_ALG_RR, backends(4, 100));
    dp.set_service(&svc)?;
    for i in 0..7 {
        new_flow(&dp, PROTO_UDP, 30_000 + i)?;
    }
    let svc = dp.remove_from_service(&svc, 101)?;
    let mut counts: BTreeMap<SocketAddrV4, usize> = BTreeMap::new();
    for i in 0..30 {
        *counts
            .entry(new_flow(&dp, PROTO_UDP, 31_000 + i)?)
            .or_default() += 1;
    }
    println!("round-robin after a backend left, 30 flows over 3: {counts:?}");
    let want: Vec<SocketAddrV4> = svc.backends.iter().map(|b| b.addr).collect();
    ensure!(
        counts.keys().copied().collect::<Vec<_>>() == want,
        "{counts:?}"
    );
    ensure!(counts.values().all(|n| *n == 10), "{counts:?}");
    Ok(())
}

/// Every client port gets exactly the backend the model's table names for it, the table in the
/// map is the model's, and the ports spread over every backend.
fn maglev_matches_the_model(
    dp: &mut TestDatapath,
    svc: &ServiceSpec,
    proto: u8,
) -> Result<BTreeMap<u16, SocketAddrV4>> {
    let m = dp.applied().maglev.geometry.m;
    let t = table_index(dp, svc)?;
    let want = model_table(svc, m)?;
    let got = dp.maglev_table(t)?;
    ensure!(
        got == want,
        "table {t} in the map is not the model's table of these backends"
    );
    let mut choices = BTreeMap::new();
    let mut counts: BTreeMap<SocketAddrV4, usize> = BTreeMap::new();
    for sport in PORTS {
        let b = new_flow(dp, proto, sport)?;
        let expect = model_choice(svc, &want, proto, sport, m)?;
        ensure!(
            b == expect,
            "port {sport}: sent to {b}, the model's table says {expect}"
        );
        choices.insert(sport, b);
        *counts.entry(b).or_default() += 1;
    }
    println!(
        "Maglev (M={m}, table {t}, proto {proto}): {} client ports over {} backends: {counts:?}",
        PORTS.len(),
        svc.backends.len()
    );
    let fair = PORTS.len() / svc.backends.len();
    ensure!(
        counts.len() == svc.backends.len(),
        "not every backend chosen: {counts:?}"
    );
    // A binomial(300, 1/3) count is below 60 with probability ~1e-7.
    ensure!(counts.values().all(|n| *n >= fair * 3 / 5), "{counts:?}");
    Ok(choices)
}

#[test]
#[ignore = "needs root"]
fn maglev_sends_each_client_port_to_the_backend_of_the_models_table() -> Result<()> {
    for proto in [PROTO_TCP, PROTO_UDP] {
        let mut dp = TestDatapath::load()?;
        let svc = service(proto, SVC_FLAG_ALG_MAGLEV, backends(3, 100));
        dp.set_service(&svc)?;
        let first = maglev_matches_the_model(&mut dp, &svc, proto)?;
        // Another node: its own maps and other backend ids, the same choice for every client
        // port (the table is built from the backends' addresses, the hash from the client's).
        let mut other = TestDatapath::load()?;
        let svc2 = service(proto, SVC_FLAG_ALG_MAGLEV, backends(3, 500));
        other.set_service(&svc2)?;
        let second = maglev_matches_the_model(&mut other, &svc2, proto)?;
        ensure!(first == second, "two nodes disagree");
        // The same client ports once more, on a third datapath with the first one's ids.
        let mut third = TestDatapath::load()?;
        third.set_service(&svc)?;
        for (sport, b) in first.iter().take(20) {
            ensure!(new_flow(&third, proto, *sport)? == *b, "port {sport}");
        }
    }
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn maglev_uses_the_loaded_table_size() -> Result<()> {
    // A small prime M and 4 tables: the datapath indexes with the load-time M.
    let opts = LoadOptions {
        maglev_m: 251,
        sizes: MapSizes {
            maglev_tables: 4,
            ..MapSizes::default()
        },
        ..LoadOptions::default()
    };
    let mut dp = TestDatapath::load_options(&opts)?;
    ensure!(dp.applied().maglev.geometry == maglev::Geometry { m: 251, tables: 4 });
    let svc = service(PROTO_TCP, SVC_FLAG_ALG_MAGLEV, backends(5, 100));
    dp.set_service(&svc)?;
    maglev_matches_the_model(&mut dp, &svc, PROTO_TCP)?;
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn maglev_moves_only_the_clients_of_a_backend_that_leaves() -> Result<()> {
    let mut dp = TestDatapath::load()?;
    let svc = service(PROTO_UDP, SVC_FLAG_ALG_MAGLEV, backends(4, 100));
    dp.set_service(&svc)?;
    let before = maglev_matches_the_model(&mut dp, &svc, PROTO_UDP)?;
    let t_before = table_index(&dp, &svc)?;
    let gone = svc.backends[1];
    // Fresh flows: the old UDP flows' conntrack entries would keep their backends.
    let mut dp2 = TestDatapath::load()?;
    dp2.set_service(&svc)?;
    let svc = dp2.remove_from_service(&svc, gone.id)?;
    let t_after = table_index(&dp2, &svc)?;
    ensure!(t_after != t_before, "the new table went into another index");
    let after = maglev_matches_the_model(&mut dp2, &svc, PROTO_UDP)?;
    let moved = before
        .iter()
        .filter(|(p, b)| **b != gone.addr && after[*p] != **b)
        .count();
    let stayed = before.values().filter(|b| **b != gone.addr).count();
    println!("a backend of 4 left: {moved} of the {stayed} clients of the other backends moved");
    ensure!(
        moved * 20 <= stayed,
        "more than 5% of unaffected clients moved"
    );
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn affinity_comes_before_maglev() -> Result<()> {
    let mut dp = TestDatapath::load()?;
    let svc = service(
        PROTO_TCP,
        SVC_FLAG_ALG_MAGLEV | SVC_FLAG_AFFINITY,
        backends(3, 100),
    );
    dp.set_service(&svc)?;
    let m = dp.applied().maglev.geometry.m;
    let table = model_table(&svc, m)?;
    // A port whose table entry is not backend 102; the client's affinity says 102.
    let sport = PORTS
        .clone()
        .find(|p| {
            model_choice(&svc, &table, PROTO_TCP, *p, m).is_ok_and(|b| b != svc.backends[2].addr)
        })
        .context("every port maps to backend 102")?;
    dp.affinity_set(
        &AffinityKey {
            client: ip4(CLIENT_IP.octets()),
            rev_nat_id: REV_NAT_ID,
        },
        AffinityValue {
            backend_id: 102,
            _pad: 0,
            last_used_ns: now_coarse_ns(),
        },
    )?;
    let b = new_flow(&dp, PROTO_TCP, sport)?;
    ensure!(b == svc.backends[2].addr, "affinity ignored: {b}");
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn switching_the_algorithm_keeps_an_established_flow_on_its_backend() -> Result<()> {
    let mut dp = TestDatapath::load()?;
    let random = service(PROTO_TCP, 0, backends(3, 100));
    dp.set_service(&random)?;
    // Flows on every backend (random choice): find one per backend.
    let mut flows: BTreeMap<SocketAddrV4, u16> = BTreeMap::new();
    for sport in 50_000..50_200 {
        flows
            .entry(new_flow(&dp, PROTO_TCP, sport)?)
            .or_insert(sport);
        if flows.len() == 3 {
            break;
        }
    }
    ensure!(flows.len() == 3, "{flows:?}");
    for flags in [SVC_FLAG_ALG_MAGLEV, SVC_FLAG_ALG_RR, SVC_FLAG_ALG_MAGLEV] {
        dp.set_service(&service(PROTO_TCP, flags, backends(3, 100)))?;
        for (b, sport) in &flows {
            let seg = Tcp::new(client(*sport), frontend(PROTO_TCP), TcpFlags::ACK);
            let out = dp.from_pod(&seg.frame())?;
            ensure!(out.verdict == TC_ACT_OK);
            ensure!(
                destination(&out.frame)? == *b,
                "flags {flags:#x}: port {sport} moved"
            );
        }
    }
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn a_maglev_frontend_without_endpoints_refuses() -> Result<()> {
    let mut dp = TestDatapath::load()?;
    let svc = service(PROTO_TCP, SVC_FLAG_ALG_MAGLEV, backends(2, 100));
    dp.set_service(&svc)?;
    let empty = ServiceSpec {
        backends: Vec::new(),
        ..svc.clone()
    };
    dp.set_service(&empty)?;
    ensure!(dp.applied().frontends[&svc.model_frontend()?]
        .table
        .is_none());
    let out = dp.from_pod(&Tcp::new(client(40_000), frontend(PROTO_TCP), TcpFlags::SYN).frame())?;
    ensure!(
        out.verdict == TC_ACT_REDIRECT,
        "a RST bounced back, got verdict {}",
        out.verdict
    );
    Ok(())
}
