//! The map contract: the encoding of each operation, the executor's order and report, the
//! fault-injecting store, and the read-back, on the in-memory store.

mod common;

use std::collections::BTreeSet;

use common::*;
use lb_common::*;
use lb_model::planner::{all_frontends, plan};
use lb_model::store::{execute, FaultStore, MapStore, MapWrite, MemStore};
use lb_model::{
    Applied, ClusterState, DesiredState, Frontend, MapOp, Proto, ReadBack, SourceEvent,
};

fn web() -> Frontend {
    fe("10.96.0.80", 80, Proto::Tcp)
}

/// The desired state of Services `names[i]` at 10.96.0.(i+1) with `endpoints` ready pods each.
fn desired(names: &[&str], endpoints: &[&[&str]]) -> DesiredState {
    let mut state = ClusterState {
        node: node(),
        ..Default::default()
    };
    for (i, (name, ips)) in names.iter().zip(endpoints).enumerate() {
        state.apply(SourceEvent::ServiceUpsert(cluster_svc(
            name,
            &format!("10.96.0.{}", i + 1),
        )));
        state.apply(SourceEvent::SliceUpsert(simple_slice(
            &format!("{name}-1"),
            name,
            ips,
        )));
    }
    DesiredState::rebuild(&state, &cfg()).0
}

#[test]
fn each_op_is_encoded_as_one_entry_of_its_map() {
    let b = be("10.244.0.1", 9376);
    let cases = [
        (
            MapOp::PutBackend {
                id: 3,
                backend: b,
                state: BACKEND_TERMINATING,
            },
            MapWrite::PutBackend(3, b.to_map(BACKEND_TERMINATING)),
        ),
        (MapOp::DeleteBackend { id: 3 }, MapWrite::DeleteBackend(3)),
        (
            MapOp::PutMember {
                frontend: web(),
                backend_id: 3,
                backend: b,
            },
            MapWrite::PutMember(web().member_key(3), b.to_member()),
        ),
        (
            MapOp::DeleteMember {
                frontend: web(),
                backend_id: 3,
            },
            MapWrite::DeleteMember(web().member_key(3)),
        ),
        (
            MapOp::PutSlot {
                frontend: web(),
                slot: 2,
                backend_id: 3,
            },
            MapWrite::PutService(
                web().key(2),
                ServiceValue {
                    backend_id: 3,
                    ..Default::default()
                },
            ),
        ),
        (
            MapOp::DeleteSlot {
                frontend: web(),
                slot: 2,
            },
            MapWrite::DeleteService(web().key(2)),
        ),
        (
            MapOp::PutMaster {
                frontend: web(),
                count: 2,
                rev_nat_id: 9,
                flags: SVC_FLAG_CLUSTER_IP | SVC_FLAG_AFFINITY,
                affinity_timeout: 60,
                table: 0,
                svc_port_id: 4,
            },
            MapWrite::PutService(
                web().key(0),
                ServiceValue {
                    backend_id: 0,
                    count: 2,
                    rev_nat_id: 9,
                    flags: SVC_FLAG_CLUSTER_IP | SVC_FLAG_AFFINITY,
                    affinity_timeout: 60,
                    svc_port_id: 4,
                },
            ),
        ),
        (
            MapOp::DeleteMaster { frontend: web() },
            MapWrite::DeleteService(web().key(0)),
        ),
        (
            // A Maglev master names its table in `backend_id`.
            MapOp::PutMaster {
                frontend: web(),
                count: 2,
                rev_nat_id: 9,
                flags: SVC_FLAG_CLUSTER_IP | SVC_FLAG_ALG_MAGLEV,
                affinity_timeout: 0,
                table: 5,
                svc_port_id: 0,
            },
            MapWrite::PutService(
                web().key(0),
                ServiceValue {
                    backend_id: 5,
                    count: 2,
                    rev_nat_id: 9,
                    flags: SVC_FLAG_CLUSTER_IP | SVC_FLAG_ALG_MAGLEV,
                    affinity_timeout: 0,
                    svc_port_id: 0,
                },
            ),
        ),
        (
            MapOp::PutMaglevTable {
                table: 5,
                backends: vec![3, 4],
                entries: vec![3, 4, 4, 3, 3].into(),
            },
            MapWrite::PutMaglevTable(5, vec![3, 4, 4, 3, 3].into()),
        ),
        (
            MapOp::PutSvcName {
                id: 4,
                name: lb_model::SvcPortName::new("default", "web", "http"),
            },
            MapWrite::PutSvcName(
                4,
                lb_model::SvcPortName::new("default", "web", "http").to_map(),
            ),
        ),
        (MapOp::DeleteSvcName { id: 4 }, MapWrite::DeleteSvcName(4)),
    ];
    for (op, want) in cases {
        assert_eq!(MapWrite::of(&op), want, "{op:?}");
    }
    // Network byte order, as in packets.
    assert_eq!(web().key(0).addr.to_ne_bytes(), [10, 96, 0, 80]);
    assert_eq!(web().key(0).port, 80u16.to_be());
    assert_eq!(MapWrite::DeleteBackend(1).map_name(), map_names::BACKENDS);
    assert!(!MapWrite::DeleteBackend(1).is_put());
    assert_eq!(
        MapWrite::PutMaglevTable(0, vec![1].into()).map_name(),
        map_names::MAGLEV
    );
    assert_eq!(MapWrite::DeleteSvcName(1).map_name(), map_names::SVCNAME);
}

#[test]
fn executed_plan_reads_back_as_what_was_applied() {
    let d = desired(
        &["a", "b"],
        &[&["10.244.0.1", "10.244.0.2"], &["10.244.0.2"]],
    );
    let mut applied = Applied::default();
    let mut maps = MemStore::default();
    let p = plan(&applied, &d, &all_frontends(&applied, &d));
    let report = execute(&mut maps, &p, &mut applied);
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.ops_ok, p.op_count());
    // 2 masters + 3 slots, 2 backends, 3 members.
    assert_eq!(
        (maps.services.len(), maps.backends.len(), maps.members.len()),
        (5, 2, 3)
    );
    let read = ReadBack::read(&maps).unwrap();
    assert_eq!(read, applied);
    assert_eq!(
        read.rev_nat.len(),
        2,
        "frontend ids come back from the masters"
    );
    assert!(plan(&read, &d, &all_frontends(&read, &d)).is_empty());
}

#[test]
fn fault_store_fails_the_chosen_writes_only() {
    let mut s = FaultStore::fail_nth(MemStore::default(), 1);
    let b = be("10.244.0.1", 9376).to_map(BACKEND_ACTIVE);
    assert!(s.put_backend(1, &b).is_ok());
    let e = s.put_backend(2, &b).unwrap_err();
    assert_eq!(e.to_string(), "injected failure of a write to XLB_BE_V1");
    assert!(s.put_backend(3, &b).is_ok());
    assert_eq!(s.writes(), 3);
    assert_eq!(s.injected(), &[MapWrite::PutBackend(2, b)]);
    assert_eq!(
        s.inner().backends.keys().copied().collect::<Vec<_>>(),
        [1, 3]
    );

    let mut s = FaultStore::fail_matching(
        MemStore::default(),
        |w| matches!(w, MapWrite::PutService(k, _) if k.slot == 0),
    );
    assert!(s
        .put_service(&web().key(1), &ServiceValue::default())
        .is_ok());
    assert!(s
        .put_service(&web().key(0), &ServiceValue::default())
        .is_err());
    assert!(s.delete_service(&web().key(0)).is_ok());
    assert_eq!(s.into_inner().services.len(), 1);
}

#[test]
fn failed_backend_write_skips_the_frontends_that_use_it_and_the_retry_completes_them() {
    let d = desired(
        &["a", "b"],
        &[&["10.244.0.1", "10.244.0.2"], &["10.244.0.3"]],
    );
    let mut applied = Applied::default();
    let p = plan(&applied, &d, &all_frontends(&applied, &d));
    // BACKENDS refuses 10.244.0.2: Service a is skipped whole, b is written.
    let two = be("10.244.0.2", 9376).to_map(BACKEND_ACTIVE);
    let mut store = FaultStore::fail_matching(
        MemStore::default(),
        move |w| matches!(w, MapWrite::PutBackend(_, b) if *b == two),
    );
    let report = execute(&mut store, &p, &mut applied);
    let a = fe("10.96.0.1", 80, Proto::Tcp);
    let b = fe("10.96.0.2", 80, Proto::Tcp);
    assert_eq!(report.prepare_failed.len(), 1, "{report:?}");
    assert_eq!(
        report.failed,
        vec![(a, "skipped: a backend it uses could not be written".into())]
    );
    let maps = store.into_inner();
    assert!(!maps.services.contains_key(&a.key(0)));
    assert_eq!(maps.services[&b.key(0)].count, 1);
    // The backend written for a is unused: gc deleted it again.
    assert_eq!(maps.backends.len(), 1);
    assert_eq!(ReadBack::read(&maps).unwrap(), applied);

    let mut maps = maps;
    let retry = plan(&applied, &d, &BTreeSet::from([a]));
    assert!(execute(&mut maps, &retry, &mut applied).is_clean());
    assert_eq!(maps.services[&a.key(0)].count, 2);
    assert!(plan(&applied, &d, &all_frontends(&applied, &d)).is_empty());
}

#[test]
fn failing_op_stops_its_frontend_only_and_keeps_the_master_it_had() {
    let d1 = desired(&["a"], &[&["10.244.0.1"]]);
    let mut applied = Applied::default();
    let mut maps = MemStore::default();
    execute(
        &mut maps,
        &plan(&applied, &d1, &all_frontends(&applied, &d1)),
        &mut applied,
    );
    // Scale up; the new slot's write fails: the master still says one backend.
    let d2 = desired(&["a"], &[&["10.244.0.1", "10.244.0.2"]]);
    let p = plan(&applied, &d2, &all_frontends(&applied, &d2));
    let mut store = FaultStore::fail_matching(
        &mut maps,
        |w| matches!(w, MapWrite::PutService(k, _) if k.slot == 2),
    );
    let report = execute(&mut store, &p, &mut applied);
    let a = fe("10.96.0.1", 80, Proto::Tcp);
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].0, a);
    assert!(report.failed[0].1.starts_with("PutSlot"), "{report:?}");
    assert_eq!(maps.services[&a.key(0)].count, 1);
    assert_eq!(ReadBack::read(&maps).unwrap(), applied);
}

#[test]
fn read_back_skips_unknown_protocols_and_keeps_leftovers() {
    let mut maps = MemStore::default();
    let odd = ServiceKey::new(ip4([10, 96, 0, 9]), port(80), 99, SCOPE_EXT, 0);
    maps.put_service(&odd, &ServiceValue::default()).unwrap();
    // A slot above a master's count (an interrupted scale-down).
    maps.put_service(
        &web().key(0),
        &ServiceValue {
            count: 1,
            rev_nat_id: 4,
            ..Default::default()
        },
    )
    .unwrap();
    for slot in 1..=2 {
        maps.put_service(
            &web().key(slot),
            &ServiceValue {
                backend_id: u32::from(slot),
                ..Default::default()
            },
        )
        .unwrap();
    }
    let read = ReadBack::read(&maps).unwrap();
    assert_eq!(read.frontends.len(), 1);
    assert_eq!(read.frontends[&web()].slots, vec![1, 2]);
    assert_eq!(read.frontends[&web()].count, 1);
}

#[test]
fn source_range_ops_are_encoded_as_lpm_trie_keys_of_the_frontend_and_network_address() {
    let lb = fe("198.51.100.1", 443, Proto::Tcp);
    let key = |client: [u8; 4]| SrcRangeKey {
        addr: ip4([198, 51, 100, 1]),
        port: port(443),
        proto: PROTO_TCP,
        _pad: 0,
        client: ip4(client),
    };
    let put = MapOp::PutSrcRange {
        frontend: lb,
        range: ("10.0.0.0".parse().unwrap(), 8),
    };
    assert_eq!(
        MapWrite::of(&put),
        MapWrite::PutSrcRange(72, key([10, 0, 0, 0]))
    );
    // Host bits are cleared: one range, one key (the trie ignores them anyway).
    let del = MapOp::DeleteSrcRange {
        frontend: lb,
        range: ("10.1.2.3".parse().unwrap(), 8),
    };
    assert_eq!(
        MapWrite::of(&del),
        MapWrite::DeleteSrcRange(72, key([10, 0, 0, 0]))
    );
    // The scope is not part of the key.
    let int = MapOp::PutSrcRange {
        frontend: lb.with_scope(SCOPE_INT),
        range: ("192.0.2.7".parse().unwrap(), 32),
    };
    assert_eq!(
        MapWrite::of(&int),
        MapWrite::PutSrcRange(96, key([192, 0, 2, 7]))
    );
    assert_eq!(MapWrite::of(&put).map_name(), map_names::SRC_RANGES);
    assert!(MapWrite::of(&put).is_put());
    assert!(!MapWrite::of(&del).is_put());
    assert_eq!(
        Frontend::from_src_range_key(72, &key([10, 0, 0, 0])),
        Some((lb, ("10.0.0.0".parse().unwrap(), 8)))
    );
}

#[test]
fn read_back_files_source_ranges_under_the_ext_frontend_and_skips_foreign_keys() {
    let lb = fe("198.51.100.1", 443, Proto::Tcp);
    let (len, key) = lb.src_range_key(("10.0.0.0".parse().unwrap(), 8));
    let mut maps = MemStore::default();
    maps.put_src_range(len, &key).unwrap();
    // Host bits after the prefix (never written by xlb; the trie ignores them).
    let mut hosty = key;
    hosty.client = ip4([192, 0, 2, 77]);
    maps.put_src_range(SrcRangeKey::FRONTEND_BITS + 24, &hosty)
        .unwrap();
    // Keys xlb never writes: shorter than the frontend, longer than an address, padding set,
    // an unknown protocol.
    maps.put_src_range(32, &key).unwrap();
    maps.put_src_range(97, &key).unwrap();
    maps.put_src_range(len, &SrcRangeKey { _pad: 1, ..key })
        .unwrap();
    maps.put_src_range(len, &SrcRangeKey { proto: 99, ..key })
        .unwrap();
    let read = ReadBack::read(&maps).unwrap();
    assert_eq!(read.frontends.len(), 1);
    let af = &read.frontends[&lb];
    assert_eq!(
        af.src_ranges,
        BTreeSet::from([
            ("10.0.0.0".parse().unwrap(), 8),
            ("192.0.2.0".parse().unwrap(), 24)
        ])
    );
    assert_eq!(af.rev_nat_id, 0, "ranges without a master");
    // Nothing desired there: the next plan deletes what it knows of.
    let p = plan(
        &read,
        &DesiredState::default(),
        &all_frontends(&read, &DesiredState::default()),
    );
    assert_eq!(p.frontends.len(), 1);
    assert!(p.frontends[0]
        .1
        .iter()
        .all(|op| matches!(op, MapOp::DeleteSrcRange { .. })));
}

/// The desired state of a LoadBalancer Service, externalTrafficPolicy Local, with source
/// ranges, one endpoint here and one on another node.
fn local_lb() -> DesiredState {
    let mut state = ClusterState {
        node: node(),
        ..Default::default()
    };
    state.apply(SourceEvent::ServiceUpsert(svc_full(
        serde_json::json!({"name": "lb", "namespace": "default"}),
        serde_json::json!({"type": "LoadBalancer", "clusterIP": "10.96.0.40",
            "externalTrafficPolicy": "Local", "loadBalancerSourceRanges": ["10.0.0.0/8", "192.0.2.0/24"],
            "ports": [{"port": 443, "nodePort": 30443}]}),
        serde_json::json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}),
    )));
    state.apply(SourceEvent::SliceUpsert(slice(
        "lb-1",
        "lb",
        serde_json::json!([{"port": 9376}]),
        serde_json::json!([
            ep_cond("10.244.1.1", None, None, None, NODE),
            ep_cond("10.244.2.1", None, None, None, "node-b")
        ]),
    )));
    DesiredState::rebuild(&state, &cfg()).0
}

#[test]
fn two_scopes_source_ranges_and_locality_read_back_as_applied() {
    let d = local_lb();
    let mut applied = Applied::default();
    let mut maps = MemStore::default();
    let report = execute(
        &mut maps,
        &plan(&applied, &d, &all_frontends(&applied, &d)),
        &mut applied,
    );
    assert!(report.is_clean(), "{report:?}");
    // ClusterIP; NodePort and LB ingress IP in both scopes: 5 masters.
    assert_eq!(maps.services.keys().filter(|k| k.slot == 0).count(), 5);
    assert_eq!(maps.src_ranges.len(), 2);
    let local: Vec<u8> = maps.backends.values().map(|b| b.state).collect();
    assert_eq!(local, [BACKEND_F_LOCAL, BACKEND_ACTIVE]);
    let read = ReadBack::read(&maps).unwrap();
    assert_eq!(read, applied);
    assert!(plan(&read, &d, &all_frontends(&read, &d)).is_empty());
}

#[test]
fn a_failing_source_range_write_stops_its_frontend_before_the_flagged_master() {
    let d = local_lb();
    let lb = fe("198.51.100.1", 443, Proto::Tcp);
    let mut applied = Applied::default();
    let p = plan(&applied, &d, &all_frontends(&applied, &d));
    // The trie is full after one entry.
    let mut puts = 0;
    let mut store = FaultStore::new(MemStore::default(), move |_, w| {
        matches!(w, MapWrite::PutSrcRange(..)) && {
            puts += 1;
            puts > 1
        }
    });
    let report = execute(&mut store, &p, &mut applied);
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(
        report.failed[0].0, lb,
        "both scopes' entry, named by SCOPE_EXT"
    );
    let mut maps = store.into_inner();
    // The SCOPE_INT entry went first and is whole (unused: no SCOPE_EXT master points pods at
    // it); the SCOPE_EXT frontend stopped at its second range, before its flagged master.
    assert!(!maps.services.contains_key(&lb.key(0)));
    assert!(maps.services.contains_key(&lb.with_scope(SCOPE_INT).key(0)));
    assert_eq!(maps.services.keys().filter(|k| k.slot == 0).count(), 4);
    assert_eq!(maps.src_ranges.len(), 1);
    assert_eq!(ReadBack::read(&maps).unwrap(), applied);
    // Room again: the retry of the reported frontend completes both scopes.
    let failed: BTreeSet<Frontend> = report.failed.iter().map(|(f, _)| *f).collect();
    assert!(execute(&mut maps, &plan(&applied, &d, &failed), &mut applied).is_clean());
    assert_eq!(maps.src_ranges.len(), 2);
    assert!(maps.services[&lb.key(0)].flags & SVC_FLAG_SOURCE_RANGES != 0);
    assert!(plan(&applied, &d, &all_frontends(&applied, &d)).is_empty());
}

#[test]
fn a_failed_locality_rewrite_reports_the_frontends_keeping_that_backend() {
    let mut state = ClusterState {
        node: node(),
        ..Default::default()
    };
    state.apply(SourceEvent::ServiceUpsert(cluster_svc("a", "10.96.0.1")));
    let on = |node: &str| {
        SourceEvent::SliceUpsert(slice(
            "a-1",
            "a",
            serde_json::json!([{"port": 9376}]),
            serde_json::json!([ep_cond("10.244.0.1", None, None, None, node)]),
        ))
    };
    state.apply(on("node-b"));
    let (d, _) = DesiredState::rebuild(&state, &cfg());
    let mut applied = Applied::default();
    let mut maps = MemStore::default();
    execute(
        &mut maps,
        &plan(&applied, &d, &all_frontends(&applied, &d)),
        &mut applied,
    );
    // The pod moves here: only its BACKENDS entry changes, and that write fails.
    state.apply(on(NODE));
    let (d, _) = DesiredState::rebuild(&state, &cfg());
    let p = plan(&applied, &d, &all_frontends(&applied, &d));
    assert!(p.frontends.is_empty() && p.prepare.len() == 1, "{p:?}");
    let mut store = FaultStore::fail_matching(&mut maps, |w| matches!(w, MapWrite::PutBackend(..)));
    let report = execute(&mut store, &p, &mut applied);
    let a = fe("10.96.0.1", 80, Proto::Tcp);
    assert_eq!(report.prepare_failed.len(), 1);
    assert_eq!(
        report.failed.iter().map(|(f, _)| *f).collect::<Vec<_>>(),
        [a]
    );
    // Retrying that frontend writes the backend again.
    let retry = plan(&applied, &d, &BTreeSet::from([a]));
    assert!(execute(&mut maps, &retry, &mut applied).is_clean());
    assert_eq!(maps.backends[&1].state, BACKEND_F_LOCAL);
}

/// The writes of executing `p` from empty maps, in the order the store saw them, with `fail`
/// choosing writes that fail.
fn write_order(
    d: &DesiredState,
    fail: impl Fn(&MapWrite) -> bool + 'static,
) -> (
    Vec<MapWrite>,
    lb_model::store::ExecReport,
    MemStore,
    Applied,
) {
    use std::cell::RefCell;
    use std::rc::Rc;
    let seen = Rc::new(RefCell::new(Vec::new()));
    let log = seen.clone();
    let mut applied = Applied::default();
    let mut maps = MemStore::default();
    let p = plan(&applied, d, &all_frontends(&applied, d));
    let mut store = FaultStore::new(&mut maps, move |_, w| {
        log.borrow_mut().push(w.clone());
        fail(w)
    });
    let report = execute(&mut store, &p, &mut applied);
    let seen = seen.borrow().clone();
    (seen, report, maps, applied)
}

#[test]
fn frontends_are_written_in_stages_of_one_class_each_in_their_own_order() {
    let names: Vec<String> = (0..40).map(|i| format!("s{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let eps: Vec<Vec<String>> = (0..40)
        .map(|i| (0..3).map(|k| format!("10.244.{i}.{}", k + 1)).collect())
        .collect();
    let eps: Vec<Vec<&str>> = eps
        .iter()
        .map(|v| v.iter().map(String::as_str).collect())
        .collect();
    let eps: Vec<&[&str]> = eps.iter().map(Vec::as_slice).collect();
    let d = desired(&names, &eps);
    let (order, report, maps, applied) = write_order(&d, |_| false);
    assert!(report.is_clean(), "{report:?}");
    // A cold plan is four batches: every Service port name, every backend, every member,
    // then every frontend's slots and master (one SERVICES batch): not 40 alternations of
    // MEMBERS and SERVICES.
    let classes: Vec<_> = order.iter().map(MapWrite::batch_class).collect();
    let mut runs = classes.clone();
    runs.dedup();
    assert_eq!(runs.len(), 4, "{runs:?}");
    assert_eq!(runs[0], lb_model::store::BatchClass::PutSvcName);
    // Each master comes after its slots and members.
    for (i, w) in order.iter().enumerate() {
        let MapWrite::PutService(k, _) = w else {
            continue;
        };
        if k.slot != 0 {
            continue;
        }
        let fe = Frontend::from_key(k).unwrap();
        let before = &order[..i];
        for id in applied.frontends[&fe].members.iter() {
            assert!(before.contains(&MapWrite::PutMember(
                fe.member_key(*id),
                maps.members[&fe.member_key(*id)]
            )));
        }
        for s in 1..=applied.frontends[&fe].count as u16 {
            assert!(before
                .iter()
                .any(|b| matches!(b, MapWrite::PutService(bk, _) if *bk == fe.key(s))));
        }
    }
    assert_eq!(ReadBack::read(&maps).unwrap(), applied);
}

#[test]
fn a_write_failing_inside_a_batch_stops_its_frontend_and_the_others_complete() {
    let d = desired(
        &["a", "b", "c"],
        &[
            &["10.244.0.1", "10.244.0.2"],
            &["10.244.0.3", "10.244.0.4"],
            &["10.244.0.5"],
        ],
    );
    let b = fe("10.96.0.2", 80, Proto::Tcp);
    // b's second slot fails: in the middle of the one SERVICES batch of the three frontends.
    let (order, report, maps, applied) = write_order(
        &d,
        move |w| matches!(w, MapWrite::PutService(k, _) if *k == b.key(2)),
    );
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(report.failed[0].0, b);
    assert!(
        !maps.services.contains_key(&b.key(0)),
        "no master for a half-written frontend"
    );
    for a in [
        fe("10.96.0.1", 80, Proto::Tcp),
        fe("10.96.0.3", 80, Proto::Tcp),
    ] {
        assert!(maps.services.contains_key(&a.key(0)), "{order:?}");
    }
    // Nothing of b after the failure was attempted.
    let at = order
        .iter()
        .position(|w| matches!(w, MapWrite::PutService(k, _) if *k == b.key(2)))
        .unwrap();
    assert!(!order[at + 1..]
        .iter()
        .any(|w| matches!(w, MapWrite::PutService(k, _) if Frontend::from_key(k) == Some(b))));
    assert_eq!(ReadBack::read(&maps).unwrap(), applied);
    // The retry completes it.
    let mut applied = applied;
    let mut maps = maps;
    let p = plan(&applied, &d, &BTreeSet::from([b]));
    assert!(execute(&mut maps, &p, &mut applied).is_clean());
    assert!(maps.services.contains_key(&b.key(0)));
}
