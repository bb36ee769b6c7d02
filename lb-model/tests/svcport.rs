//! Service port ids and names (`XLB_SVCNAME_V1`): one id per (namespace, name, port name)
//! shared by all its frontends, the name written before any master names the id (the
//! simulator panics otherwise), ids from a forward-only cursor, a full id space reported and
//! not fatal, names restored by the read-back.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::sim::Sim;
use common::*;
use lb_model::planner::{all_frontends, plan};
use lb_model::store::{execute, MemStore};
use lb_model::{
    Applied, ClusterState, DesiredState, MapOp, Proto, ReadBack, SourceEvent, SvcPortName,
};
use serde_json::json;

fn desired_of(events: Vec<SourceEvent>) -> DesiredState {
    let mut state = ClusterState {
        node: node(),
        ..Default::default()
    };
    for e in events {
        state.apply(e);
    }
    DesiredState::rebuild(&state, &cfg()).0
}

/// A NodePort Service "np" with two named ports.
fn two_port_nodeport() -> SourceEvent {
    SourceEvent::ServiceUpsert(svc(
        "np",
        json!({"type": "NodePort", "clusterIP": "10.96.0.30",
               "ports": [{"name": "http", "port": 80, "nodePort": 30080},
                         {"name": "metrics", "port": 9090, "nodePort": 30090}]}),
    ))
}

#[test]
fn every_frontend_of_a_service_port_shares_one_named_id() {
    let d = desired_of(vec![two_port_nodeport()]);
    let mut applied = Applied::default();
    let mut sim = Sim::default();
    sim.expect(&d);
    let p = plan(&applied, &d, &all_frontends(&applied, &d));
    sim.run(&p, &mut applied);
    sim.check_equals(&d).unwrap();
    let id_of = |addr: &str, port: u16| applied.frontends[&fe(addr, port, Proto::Tcp)].svc_port_id;
    let http = id_of("10.96.0.30", 80);
    let metrics = id_of("10.96.0.30", 9090);
    assert!(http != 0 && metrics != 0 && http != metrics);
    assert_eq!(
        id_of(&NODE_IP.to_string(), 30080),
        http,
        "the NodePort shares the ClusterIP's id"
    );
    assert_eq!(id_of(&NODE_IP.to_string(), 30090), metrics);
    assert_eq!(
        applied.svc_names,
        BTreeMap::from([
            (http, SvcPortName::new("default", "np", "http")),
            (metrics, SvcPortName::new("default", "np", "metrics")),
        ])
    );
    // One name write per Service port, in the prepare phase.
    let names: Vec<&MapOp> = p
        .prepare
        .iter()
        .filter(|op| matches!(op, MapOp::PutSvcName { .. }))
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    // Read back: the same ids and names; nothing to write.
    let read = sim.to_applied();
    assert_eq!(read, applied);
    assert!(plan(&read, &d, &all_frontends(&read, &d)).is_empty());
}

#[test]
fn a_recreated_service_gets_a_new_id_and_the_old_name_is_collected() {
    let svc_a = || SourceEvent::ServiceUpsert(cluster_svc("a", "10.96.0.1"));
    let d = desired_of(vec![svc_a()]);
    let mut applied = Applied::default();
    let mut maps = MemStore::default();
    let p = plan(&applied, &d, &all_frontends(&applied, &d));
    assert!(execute(&mut maps, &p, &mut applied).is_clean());
    let first = applied.frontends[&fe("10.96.0.1", 80, Proto::Tcp)].svc_port_id;

    let gone = DesiredState::default();
    let p = plan(&applied, &gone, &all_frontends(&applied, &gone));
    assert!(execute(&mut maps, &p, &mut applied).is_clean());
    assert!(maps.svc_names.is_empty(), "gc deleted the name");
    assert!(applied.svc_names.is_empty());

    let p = plan(&applied, &d, &all_frontends(&applied, &d));
    assert!(execute(&mut maps, &p, &mut applied).is_clean());
    let second = applied.frontends[&fe("10.96.0.1", 80, Proto::Tcp)].svc_port_id;
    assert_eq!(
        second,
        first + 1,
        "the cursor moved on: a freed id is not handed out at once"
    );
    assert_eq!(
        maps.svc_stats_resets.get(&second),
        Some(&1),
        "a new id's counters start at 0"
    );
}

#[test]
fn a_full_id_space_gives_id_zero_and_says_so_then_wraps_to_freed_ids() {
    let a = || SourceEvent::ServiceUpsert(cluster_svc("a", "10.96.0.1"));
    let b = || SourceEvent::ServiceUpsert(cluster_svc("b", "10.96.0.2"));
    let mut maps = MemStore {
        svc_ports_max: 1,
        ..MemStore::default()
    };
    let mut applied = ReadBack::read(&maps).unwrap();
    assert_eq!(applied.svc_ports_max, 1);
    let d = desired_of(vec![a(), b()]);
    let p = plan(&applied, &d, &all_frontends(&applied, &d));
    assert_eq!(
        p.svc_ids_exhausted,
        vec![SvcPortName::new("default", "b", "")]
    );
    let report = execute(&mut maps, &p, &mut applied);
    assert!(report.is_clean(), "not fatal: {report:?}");
    let id = |applied: &Applied, ip: &str| applied.frontends[&fe(ip, 80, Proto::Tcp)].svc_port_id;
    assert_eq!(
        (id(&applied, "10.96.0.1"), id(&applied, "10.96.0.2")),
        (1, 0)
    );
    assert!(
        applied.frontends[&fe("10.96.0.2", 80, Proto::Tcp)].rev_nat_id != 0,
        "b is served"
    );

    // a goes; b, planned again, gets the freed id (the cursor wrapped).
    let d = desired_of(vec![b()]);
    let touched: BTreeSet<_> = all_frontends(&applied, &d);
    let p = plan(&applied, &d, &touched);
    assert!(execute(&mut maps, &p, &mut applied).is_clean());
    let p = plan(&applied, &d, &touched);
    assert!(p.svc_ids_exhausted.is_empty());
    assert!(execute(&mut maps, &p, &mut applied).is_clean());
    assert_eq!(id(&applied, "10.96.0.2"), 1);
    assert_eq!(
        applied.svc_names,
        BTreeMap::from([(1, SvcPortName::new("default", "b", ""))])
    );
    assert_eq!(ReadBack::read(&maps).unwrap(), applied);
}

#[test]
fn a_failed_name_write_blocks_the_frontends_that_need_it() {
    use lb_model::store::{FaultStore, MapWrite};
    let d = desired_of(vec![SourceEvent::ServiceUpsert(cluster_svc(
        "a",
        "10.96.0.1",
    ))]);
    let mut applied = Applied::default();
    let mut maps = FaultStore::fail_matching(MemStore::default(), |w| {
        matches!(w, MapWrite::PutSvcName(..))
    });
    let p = plan(&applied, &d, &all_frontends(&applied, &d));
    let report = execute(&mut maps, &p, &mut applied);
    assert_eq!(report.prepare_failed.len(), 1, "{report:?}");
    assert_eq!(
        report.failed.len(),
        1,
        "the frontend is reported for a retry: {report:?}"
    );
    assert!(
        maps.inner().services.is_empty(),
        "no master names an id without a name"
    );
}
