//! Backend selection algorithms in the control plane: `--lb-algorithm` and the per-Service
//! annotation `xlb.io/lb-algorithm` (flags on every master), and the Maglev tables: written
//! whole into a free table before a master names them, shared by frontends with the same
//! backends, rebuilt only when a frontend's backends change, freed when no master names them,
//! recovered by the read-back, and a frontend that finds no free table fails whole (reported,
//! retried) without a write.
//!
//! Every plan runs on the simulator (tests/common/sim.rs), which checks after every single write
//! that a master never names a table that is not whole or holds a non-member, and that no table
//! is written while a master names it.

mod common;

use std::collections::BTreeSet;

use common::sim::{Sim, World, SIM_GEOMETRY};
use common::*;
use lb_common::*;
use lb_model::desired::service_frontends;
use lb_model::maglev::{self, Geometry};
use lb_model::planner::{all_frontends, plan};
use lb_model::store::{execute, FaultStore, MapWrite};
use lb_model::{
    Algorithm, Applied, Config, Frontend, MapOp, Plan, Proto, SourceEvent, ALGORITHM_ANNOTATION,
};
use serde_json::{json, Value};

const WEB: &str = "10.96.0.80";

fn web() -> Frontend {
    fe(WEB, 80, Proto::Tcp)
}

/// A ClusterIP Service `name` at `ip` (port 80 -> 9376) with the annotation `alg` (None: none).
fn svc_alg(name: &str, ip: &str, alg: Option<&str>) -> k8s_openapi::api::core::v1::Service {
    let mut meta = json!({"name": name, "namespace": "default"});
    if let Some(a) = alg {
        meta["annotations"] = json!({ ALGORITHM_ANNOTATION: a });
    }
    svc_full(
        meta,
        json!({"clusterIP": ip, "ports": [{"port": 80, "targetPort": 9376}]}),
        json!({}),
    )
}

fn ips(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("10.244.0.{i}")).collect()
}

impl World {
    /// Apply an event, plan the touched frontends and execute the plan; every write must
    /// succeed. Returns the plan.
    fn event(&mut self, e: SourceEvent) -> Plan {
        let changes = self.state.apply(e);
        let mut touched = BTreeSet::new();
        for k in &changes.services {
            touched.extend(self.desired.update_service(&self.state, k, &cfg()).0);
        }
        let p = plan(&self.applied, &self.desired, &touched);
        self.sim.expect(&self.desired);
        let report = self.sim.run_allowing_unplanned(&p, &mut self.applied);
        assert_eq!(report, p.unplanned, "only unplanned entries fail");
        assert_eq!(self.applied, self.sim.to_applied(), "applied == read back");
        p
    }

    fn endpoints(&mut self, svc: &str, ips: &[String]) -> Plan {
        let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
        self.event(SourceEvent::SliceUpsert(simple_slice(
            &format!("{svc}-1"),
            svc,
            &ips,
        )))
    }

    fn table_of(&self, f: &Frontend) -> Option<u32> {
        self.applied.frontends.get(f).and_then(|af| af.table)
    }

    /// Plan every frontend again (the agent's retry / resync), execute.
    fn replan_all(&mut self) -> Plan {
        let all = all_frontends(&self.applied, &self.desired);
        let p = plan(&self.applied, &self.desired, &all);
        self.sim.run_allowing_unplanned(&p, &mut self.applied);
        p
    }
}

trait RunAllowingUnplanned {
    fn run_allowing_unplanned(
        &mut self,
        p: &Plan,
        applied: &mut Applied,
    ) -> Vec<(Frontend, String)>;
}

impl RunAllowingUnplanned for Sim {
    /// Run `p`; every write succeeds. Returns the failures the executor reported (the
    /// unplanned entries only).
    fn run_allowing_unplanned(
        &mut self,
        p: &Plan,
        applied: &mut Applied,
    ) -> Vec<(Frontend, String)> {
        let report = execute(self, p, applied);
        assert!(report.prepare_failed.is_empty(), "{report:?}");
        report.failed
    }
}

fn table_writes(p: &Plan) -> Vec<u32> {
    p.prepare
        .iter()
        .filter_map(|op| match op {
            MapOp::PutMaglevTable { table, .. } => Some(*table),
            _ => None,
        })
        .collect()
}

fn flags_of(svc: &k8s_openapi::api::core::v1::Service, c: &Config) -> (Vec<u32>, Vec<String>) {
    let (f, p) = service_frontends(svc, [].iter(), &node(), c);
    (
        f.iter()
            .map(|(_, st)| st.flags & (SVC_FLAG_ALG_RR | SVC_FLAG_ALG_MAGLEV))
            .collect(),
        p.iter().map(|p| p.reason.clone()).collect(),
    )
}

#[test]
fn the_annotation_overrides_the_flag_and_an_invalid_one_falls_back_to_it_with_a_problem() {
    let random = Config::default();
    let maglev = Config {
        lb_algorithm: Algorithm::Maglev,
        ..Config::default()
    };
    assert_eq!(
        random.lb_algorithm,
        Algorithm::Random,
        "the default is random"
    );
    let cases: [(Option<&str>, &Config, u32); 8] = [
        (None, &random, 0),
        (None, &maglev, SVC_FLAG_ALG_MAGLEV),
        (Some("round-robin"), &random, SVC_FLAG_ALG_RR),
        (Some("round-robin"), &maglev, SVC_FLAG_ALG_RR),
        (Some("maglev"), &random, SVC_FLAG_ALG_MAGLEV),
        (Some("random"), &maglev, 0),
        (Some("Maglev"), &random, 0),
        (Some("weighted"), &maglev, SVC_FLAG_ALG_MAGLEV),
    ];
    for (alg, c, want) in cases {
        let (flags, problems) = flags_of(&svc_alg("web", WEB, alg), c);
        assert_eq!(
            flags,
            [want],
            "{alg:?} with --lb-algorithm {}",
            c.lb_algorithm
        );
        let valid = alg.is_none_or(|a| Algorithm::parse(a).is_ok());
        assert_eq!(problems.is_empty(), valid, "{alg:?}: {problems:?}");
        if !valid {
            assert!(
                problems[0].contains(ALGORITHM_ANNOTATION)
                    && problems[0].contains(&format!("using the default {}", c.lb_algorithm)),
                "{problems:?}"
            );
        }
    }
    assert_eq!(ALGORITHM_ANNOTATION, "xlb.io/lb-algorithm");
    for a in Algorithm::ALL {
        assert_eq!(Algorithm::parse(a.name()), Ok(a));
        assert_eq!(a.to_string().parse::<Algorithm>(), Ok(a));
    }
}

#[test]
fn every_frontend_of_the_service_carries_the_algorithm_flag() {
    // ClusterIP, NodePort on the node's address, and an eTP Local externalIP (two scopes).
    let s = svc_full(
        json!({"name": "np", "namespace": "default",
               "annotations": {"xlb.io/lb-algorithm": "maglev"}}),
        json!({"type": "NodePort", "clusterIP": "10.96.0.9", "externalIPs": ["192.0.2.7"],
               "externalTrafficPolicy": "Local", "sessionAffinity": "ClientIP",
               "ports": [{"port": 80, "nodePort": 30080}]}),
        json!({}),
    );
    let (f, p) = service_frontends(&s, [].iter(), &node(), &cfg());
    assert!(p.is_empty(), "{p:?}");
    assert_eq!(f.len(), 5, "{f:?}");
    for (fr, st) in &f {
        assert_ne!(st.flags & SVC_FLAG_ALG_MAGLEV, 0, "{fr}");
        assert_eq!(st.flags & SVC_FLAG_ALG_RR, 0, "{fr}");
        assert_ne!(
            st.flags & SVC_FLAG_AFFINITY,
            0,
            "affinity stays, before the algorithm"
        );
    }
}

#[test]
fn a_maglev_table_is_written_whole_before_the_master_that_names_it() {
    let mut w = World::new();
    w.event(SourceEvent::ServiceUpsert(svc_alg(
        "web",
        WEB,
        Some("maglev"),
    )));
    let p = w.endpoints("web", &ips(3));
    // prepare: the backends, then the table.
    let kinds: Vec<&str> = p
        .prepare
        .iter()
        .map(|op| match op {
            MapOp::PutBackend { .. } => "backend",
            MapOp::PutMaglevTable { .. } => "table",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["backend", "backend", "backend", "table"]);
    let MapOp::PutMaglevTable {
        table,
        backends,
        entries,
    } = &p.prepare[3]
    else {
        unreachable!()
    };
    assert_eq!(backends, &[1, 2, 3]);
    let pairs: Vec<_> = (1..=3u32)
        .map(|i| (be(&format!("10.244.0.{i}"), 9376), i))
        .collect();
    assert_eq!(entries.as_slice(), maglev::table(&pairs, SIM_GEOMETRY.m));
    // The master, last of the frontend's writes, names it.
    let (_, ops) = &p.frontends[0];
    match ops.last() {
        Some(MapOp::PutMaster {
            table: t,
            count: 3,
            flags,
            ..
        }) => {
            assert_eq!(t, table);
            assert_ne!(flags & SVC_FLAG_ALG_MAGLEV, 0);
        }
        other => panic!("last op {other:?}"),
    }
    assert_eq!(w.table_of(&web()), Some(*table));
    assert_eq!(w.sim.maps.services[&web().key(0)].backend_id, *table);
}

#[test]
fn frontends_with_the_same_backends_share_one_table() {
    let mut w = World::new();
    // ClusterIP and NodePort: two frontends, one backend set.
    let np = svc_full(
        json!({"name": "web", "namespace": "default",
               "annotations": {"xlb.io/lb-algorithm": "maglev"}}),
        json!({"type": "NodePort", "clusterIP": WEB,
               "ports": [{"port": 80, "targetPort": 9376, "nodePort": 30080}]}),
        json!({}),
    );
    w.event(SourceEvent::ServiceUpsert(np));
    let p = w.endpoints("web", &ips(3));
    assert_eq!(table_writes(&p).len(), 1, "one table for both frontends");
    let node_port = fe(&NODE_IP.to_string(), 30080, Proto::Tcp);
    assert_eq!(w.table_of(&web()), w.table_of(&node_port));
    assert!(w.table_of(&web()).is_some());
    // A second Service with the same endpoints uses it too.
    w.event(SourceEvent::ServiceUpsert(svc_alg(
        "other",
        "10.96.0.81",
        Some("maglev"),
    )));
    let p = w.endpoints("other", &ips(3));
    assert!(table_writes(&p).is_empty(), "{p:?}");
    assert_eq!(
        w.table_of(&fe("10.96.0.81", 80, Proto::Tcp)),
        w.table_of(&web())
    );
    assert_eq!(w.applied.table_users(w.table_of(&web()).unwrap()), 3);
}

#[test]
fn only_frontends_whose_backends_changed_get_a_new_table_and_the_old_one_is_freed() {
    let mut w = World::new();
    for (name, ip) in [("web", WEB), ("api", "10.96.0.81")] {
        w.event(SourceEvent::ServiceUpsert(svc_alg(
            name,
            ip,
            Some("maglev"),
        )));
    }
    w.endpoints("web", &ips(3));
    w.endpoints("api", &ips(6)[3..]);
    let api = fe("10.96.0.81", 80, Proto::Tcp);
    let (t_web, t_api) = (w.table_of(&web()).unwrap(), w.table_of(&api).unwrap());
    assert_ne!(t_web, t_api);
    // web loses a backend: one new table, written into a free index, web switches to it.
    let p = w.endpoints("web", &ips(2));
    let written = table_writes(&p);
    assert_eq!(written.len(), 1);
    let t_new = written[0];
    assert!(t_new != t_web && t_new != t_api);
    assert_eq!(w.table_of(&web()), Some(t_new));
    assert_eq!(w.table_of(&api), Some(t_api), "api untouched");
    assert_eq!(w.applied.table_users(t_web), 0, "the old table is free");
    // A Service update that keeps the backends (affinity on) rewrites the master only.
    let mut s = svc_alg("web", WEB, Some("maglev"));
    s.spec.as_mut().unwrap().session_affinity = Some("ClientIP".into());
    let p = w.event(SourceEvent::ServiceUpsert(s));
    assert!(table_writes(&p).is_empty());
    assert_eq!(w.table_of(&web()), Some(t_new));
    // Freed tables come back last: the next new table is not the one just freed.
    let p = w.endpoints("web", &ips(1));
    assert_ne!(
        table_writes(&p),
        [t_web],
        "a freed table is re-used after the others"
    );
}

#[test]
fn switching_the_algorithm_frees_the_table_and_switching_back_reuses_it_unwritten() {
    let mut w = World::new();
    w.event(SourceEvent::ServiceUpsert(svc_alg(
        "web",
        WEB,
        Some("maglev"),
    )));
    w.endpoints("web", &ips(3));
    let t = w.table_of(&web()).unwrap();
    let p = w.event(SourceEvent::ServiceUpsert(svc_alg(
        "web",
        WEB,
        Some("round-robin"),
    )));
    assert!(p.prepare.is_empty());
    assert_eq!(w.table_of(&web()), None);
    let master = w.sim.maps.services[&web().key(0)];
    assert_eq!(
        master.flags & (SVC_FLAG_ALG_RR | SVC_FLAG_ALG_MAGLEV),
        SVC_FLAG_ALG_RR
    );
    assert_eq!(master.backend_id, 0);
    assert_eq!(w.applied.table_users(t), 0);
    // Back to Maglev: the free table still holds these backends, so no write.
    let p = w.event(SourceEvent::ServiceUpsert(svc_alg(
        "web",
        WEB,
        Some("maglev"),
    )));
    assert!(table_writes(&p).is_empty(), "{p:?}");
    assert_eq!(w.table_of(&web()), Some(t));
    // Without endpoints a Maglev master names no table (it refuses before selecting).
    w.endpoints("web", &[]);
    assert_eq!(w.table_of(&web()), None);
    assert_eq!(w.sim.maps.services[&web().key(0)].count, 0);
}

#[test]
fn without_a_free_table_the_frontend_fails_whole_and_the_retry_succeeds_once_one_is_free() {
    let mut w = World::with_geometry(Geometry::check(13, 2).unwrap());
    for (name, ip, eps) in [("a", "10.96.0.1", 1), ("b", "10.96.0.2", 2)] {
        w.event(SourceEvent::ServiceUpsert(svc_alg(
            name,
            ip,
            Some("maglev"),
        )));
        w.endpoints(name, &ips(eps));
    }
    let (a, b, c) = (
        fe("10.96.0.1", 80, Proto::Tcp),
        fe("10.96.0.2", 80, Proto::Tcp),
        fe("10.96.0.3", 80, Proto::Tcp),
    );
    assert_eq!(w.applied.table_users(0) + w.applied.table_users(1), 2);
    // A third backend set: both tables are in use.
    w.event(SourceEvent::ServiceUpsert(svc_alg(
        "c",
        "10.96.0.3",
        Some("maglev"),
    )));
    let maps_before = w.sim.maps.clone();
    let p = w.endpoints("c", &ips(3));
    assert_eq!(p.unplanned.len(), 1, "{p:?}");
    assert_eq!(p.unplanned[0].0, c);
    assert!(
        p.unplanned[0].1.contains("no free Maglev table"),
        "{:?}",
        p.unplanned
    );
    assert!(
        p.frontends.iter().all(|(f, _)| *f != c),
        "nothing of c is planned"
    );
    assert!(table_writes(&p).is_empty());
    // c keeps what it had (a master without backends), a and b are untouched.
    assert_eq!(
        w.sim.maps.services[&c.key(0)],
        maps_before.services[&c.key(0)]
    );
    assert_eq!(w.sim.maps.maglev, maps_before.maglev);
    // An endpoint change of b needs a second table for b: fails too, b keeps its table.
    let t_b = w.table_of(&b).unwrap();
    let p = w.endpoints("b", &ips(3)[1..]);
    assert_eq!(p.unplanned.iter().map(|(f, _)| *f).collect::<Vec<_>>(), [b]);
    assert_eq!(w.table_of(&b), Some(t_b));
    assert_eq!(w.sim.maps.services[&b.key(0)].count, 2);
    // a goes away: its table is free, and the retry of c (the agent's next tick) succeeds.
    w.event(SourceEvent::ServiceDelete {
        namespace: "default".into(),
        name: "a".into(),
    });
    assert!(!w.applied.frontends.contains_key(&a));
    let retry = plan(&w.applied, &w.desired, &BTreeSet::from([c]));
    assert!(retry.unplanned.is_empty(), "{retry:?}");
    w.sim.run(&retry, &mut w.applied);
    assert!(w.table_of(&c).is_some());
    // b goes back to its first backends: its table holds them, so it needs no other.
    let p = w.endpoints("b", &ips(2));
    assert!(
        p.unplanned.is_empty() && table_writes(&p).is_empty(),
        "{p:?}"
    );
    assert_eq!(w.table_of(&b), Some(t_b));
    assert!(w.replan_all().is_empty());
    w.sim.expect(&w.desired);
    w.sim.check_equals(&w.desired).unwrap();
}

#[test]
fn read_back_recovers_each_frontends_table_and_plans_nothing() {
    let mut w = World::new();
    w.event(SourceEvent::ServiceUpsert(svc_alg(
        "web",
        WEB,
        Some("maglev"),
    )));
    w.event(SourceEvent::ServiceUpsert(svc_alg(
        "api",
        "10.96.0.81",
        Some("maglev"),
    )));
    w.endpoints("web", &ips(3));
    w.endpoints("api", &ips(5));
    w.endpoints("web", &ips(4));
    // A restarted agent reads the maps back.
    let back = w.sim.to_applied();
    assert_eq!(back, w.applied);
    for f in [web(), fe("10.96.0.81", 80, Proto::Tcp)] {
        let t = back.frontends[&f].table.expect("a table");
        assert!(
            back.maglev.content.contains_key(&t),
            "{f}: content verified"
        );
    }
    let all = all_frontends(&back, &w.desired);
    assert!(
        plan(&back, &w.desired, &all).is_empty(),
        "a restart writes nothing"
    );
    // The next change allocates around the tables in use (none is overwritten: the simulator
    // panics on a write to a named table).
    let mut w2 = World { applied: back, ..w };
    let p = w2.endpoints("api", &ips(2));
    assert_eq!(table_writes(&p).len(), 1);
}

#[test]
fn a_table_that_reads_back_wrong_is_rebuilt_into_another_table_before_the_master_moves() {
    let mut w = World::new();
    w.event(SourceEvent::ServiceUpsert(svc_alg(
        "web",
        WEB,
        Some("maglev"),
    )));
    w.endpoints("web", &ips(3));
    let t = w.table_of(&web()).unwrap();
    // An interrupted write of an earlier agent (or another table size) left it wrong.
    let mut entries = w.sim.maps.maglev[&t].clone();
    entries.swap(0, 1);
    if entries == w.sim.maps.maglev[&t] {
        entries[0] = if entries[0] == 1 { 2 } else { 1 };
    }
    w.sim.maps.maglev.insert(t, entries);
    let back = w.sim.to_applied();
    assert_eq!(
        back.frontends[&web()].table,
        Some(t),
        "the master says which table"
    );
    assert!(
        !back.maglev.content.contains_key(&t),
        "its content is not trusted"
    );
    w.applied = back;
    let p = w.replan_all();
    let written = table_writes(&p);
    assert_eq!(written.len(), 1);
    assert_ne!(written[0], t, "never written while the master names it");
    assert_eq!(w.table_of(&web()), Some(written[0]));
    w.sim.expect(&w.desired);
    w.sim.check_equals(&w.desired).unwrap();
}

#[test]
fn a_failed_table_write_blocks_only_the_frontends_that_would_name_it_and_forgets_the_table() {
    let mut w = World::new();
    w.event(SourceEvent::ServiceUpsert(svc_alg(
        "web",
        WEB,
        Some("maglev"),
    )));
    w.event(SourceEvent::ServiceUpsert(svc_alg(
        "rr",
        "10.96.0.81",
        Some("round-robin"),
    )));
    w.endpoints("web", &ips(2));
    let t_old = w.table_of(&web()).unwrap();
    // Both Services change; the table write fails.
    let mut touched = BTreeSet::new();
    for svc in ["web", "rr"] {
        let refs: Vec<String> = ips(3);
        let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
        let c = w.state.apply(SourceEvent::SliceUpsert(simple_slice(
            &format!("{svc}-1"),
            svc,
            &refs,
        )));
        for k in &c.services {
            touched.extend(w.desired.update_service(&w.state, k, &cfg()).0);
        }
    }
    let p = plan(&w.applied, &w.desired, &touched);
    let t_new = table_writes(&p)[0];
    let mut store =
        FaultStore::fail_matching(&mut w.sim, |wr| matches!(wr, MapWrite::PutMaglevTable(..)));
    let report = execute(&mut store, &p, &mut w.applied);
    let failed: Vec<Frontend> = report.failed.iter().map(|(f, _)| *f).collect();
    assert_eq!(failed, [web()], "{report:?}");
    assert_eq!(report.prepare_failed.len(), 1);
    assert_eq!(w.table_of(&web()), Some(t_old), "web keeps its table");
    assert_eq!(
        w.applied.frontends[&fe("10.96.0.81", 80, Proto::Tcp)].count,
        3
    );
    assert!(
        !w.applied.maglev.content.contains_key(&t_new),
        "a table whose write failed may be half-written: its content is forgotten"
    );
    // The retry completes web.
    let retry = plan(&w.applied, &w.desired, &BTreeSet::from([web()]));
    w.sim.run(&retry, &mut w.applied);
    w.sim.check_equals(&w.desired).unwrap();
    assert_eq!(w.applied, w.sim.to_applied());
}

#[test]
fn a_table_freed_and_overwritten_is_not_reused_for_its_old_backends() {
    // Two tables: web {1,2} in t0; web {1,2,3} in t1 (t0 free, known to hold {1,2}).
    let mut w = World::with_geometry(Geometry::check(13, 2).unwrap());
    w.event(SourceEvent::ServiceUpsert(svc_alg(
        "web",
        WEB,
        Some("maglev"),
    )));
    w.endpoints("web", &ips(2));
    let t0 = w.table_of(&web()).unwrap();
    w.endpoints("web", &ips(3));
    assert_ne!(w.table_of(&web()), Some(t0));
    // Back to {1,2}: t0 still holds them, re-used without a write.
    let p = w.endpoints("web", &ips(2));
    assert!(table_writes(&p).is_empty());
    assert_eq!(w.table_of(&web()), Some(t0));
    // {1,2,3,4} goes into the free table t1 (overwriting {1,2,3}); then {1,2,3} again must be
    // written, not taken from t1's history.
    let p = w.endpoints("web", &ips(4));
    assert_eq!(table_writes(&p).len(), 1);
    let p = w.endpoints("web", &ips(3));
    assert_eq!(table_writes(&p).len(), 1, "{p:?}");
    w.sim.check_equals(&w.desired).unwrap();
}

#[test]
fn two_scopes_get_their_own_tables_when_their_backends_differ() {
    let mut w = World::new();
    let s = svc_full(
        json!({"name": "web", "namespace": "default",
               "annotations": {"xlb.io/lb-algorithm": "maglev"}}),
        json!({"type": "NodePort", "clusterIP": WEB, "externalTrafficPolicy": "Local",
               "ports": [{"port": 80, "targetPort": 9376, "nodePort": 30080}]}),
        json!({}),
    );
    w.event(SourceEvent::ServiceUpsert(s));
    let eps: Vec<Value> = vec![
        ep_cond("10.244.0.1", Some(true), None, None, NODE),
        ep_cond("10.244.0.2", Some(true), None, None, "node-b"),
    ];
    w.event(SourceEvent::SliceUpsert(slice(
        "web-1",
        "web",
        json!([{"port": 9376, "protocol": "TCP"}]),
        json!(eps),
    )));
    let ext = fe(&NODE_IP.to_string(), 30080, Proto::Tcp);
    let int = ext.with_scope(SCOPE_INT);
    let (te, ti) = (w.table_of(&ext).unwrap(), w.table_of(&int).unwrap());
    assert_ne!(te, ti, "local endpoints only vs all");
    assert_eq!(
        w.table_of(&web()),
        Some(ti),
        "ClusterIP shares the all-endpoints table"
    );
    let local_only: BTreeSet<u32> = w.sim.maps.maglev[&te].iter().copied().collect();
    assert_eq!(local_only.len(), 1);
}

#[test]
fn a_new_array_gets_the_tables_in_use_restored_in_place() {
    let mut w = World::new();
    w.event(SourceEvent::ServiceUpsert(svc_alg(
        "web",
        WEB,
        Some("maglev"),
    )));
    w.event(SourceEvent::ServiceUpsert(svc_alg(
        "api",
        "10.96.0.81",
        Some("maglev"),
    )));
    w.endpoints("web", &ips(3));
    w.endpoints("api", &ips(5));
    let named: BTreeSet<u32> = w
        .applied
        .frontends
        .values()
        .filter_map(|af| af.table)
        .collect();
    assert_eq!(named.len(), 2);
    // The agent restarts with another table size: a fresh, empty array (no program reads it).
    let mut maps = w.sim.maps.clone();
    maps.maglev.clear();
    maps.maglev_geometry = Geometry::check(31, 8).unwrap();
    let mut applied = lb_model::ReadBack::read(&maps).unwrap_or_else(|e| match e {});
    assert!(
        applied.maglev.content.is_empty(),
        "nothing known of the new array"
    );
    let p = lb_model::planner::restore_tables(&applied);
    assert_eq!(
        table_writes(&p).into_iter().collect::<BTreeSet<_>>(),
        named,
        "in place"
    );
    let report = execute(&mut maps, &p, &mut applied);
    assert!(report.is_clean(), "{report:?}");
    // Whole and right: the read-back trusts them, and the next plan writes nothing.
    let back = lb_model::ReadBack::read(&maps).unwrap_or_else(|e| match e {});
    assert_eq!(back, applied);
    assert_eq!(back.maglev.content.len(), 2);
    let all = all_frontends(&back, &w.desired);
    assert!(plan(&back, &w.desired, &all).is_empty());
    // A table outside a smaller array is left to the next plan, which moves its master.
    let mut small = w.sim.maps.clone();
    small.maglev.clear();
    small.maglev_geometry = Geometry::check(31, 1).unwrap();
    let applied = lb_model::ReadBack::read(&small).unwrap_or_else(|e| match e {});
    let p = lb_model::planner::restore_tables(&applied);
    assert!(table_writes(&p).iter().all(|t| *t < 1));
}
