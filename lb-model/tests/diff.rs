//! The planner's map operations, executed by the shipped executor on the simulated maps: ids,
//! stable slots, update order, garbage collection, read-back.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use common::sim::{Sim, World};
use common::*;
use lb_common::*;
use lb_model::planner::{all_frontends, plan};
use lb_model::{
    Applied, AppliedFrontend, Cidr, ClusterState, DesiredState, Frontend, MapOp, Plan, Proto,
    SourceEvent, SvcPortName,
};
use serde_json::json;

impl World {
    /// Apply an event, plan the touched frontends, execute; returns the plan.
    fn event(&mut self, e: SourceEvent) -> Plan {
        let changes = self.state.apply(e);
        let mut touched = BTreeSet::new();
        for k in &changes.services {
            touched.extend(self.desired.update_service(&self.state, k, &cfg()).0);
        }
        let p = plan(&self.applied, &self.desired, &touched);
        self.execute(&p);
        p
    }

    fn execute(&mut self, p: &Plan) {
        self.sim.expect(&self.desired);
        self.sim.run(p, &mut self.applied);
        self.sim.check_equals(&self.desired).unwrap();
        assert_eq!(self.applied, self.sim.to_applied());
    }

    /// A world with the Service "web" (ClusterIP [`WEB`]) and its endpoints `ips`.
    fn web(ips: &[&str]) -> World {
        let mut w = World::new();
        w.event(SourceEvent::ServiceUpsert(cluster_svc("web", WEB)));
        w.slice("web", ips);
        w
    }

    fn slice(&mut self, svc: &str, ips: &[&str]) -> Plan {
        self.event(SourceEvent::SliceUpsert(simple_slice(
            &format!("{svc}-1"),
            svc,
            ips,
        )))
    }
}

const WEB: &str = "10.96.0.80";

fn web() -> Frontend {
    fe(WEB, 80, Proto::Tcp)
}

fn slots_of(w: &World, f: &Frontend) -> Vec<u32> {
    w.applied.frontends[f].slots.clone()
}

/// The PutMember of backend `id` at `ip`:9376 in web().
fn member(id: u32, ip: &str) -> MapOp {
    MapOp::PutMember {
        frontend: web(),
        backend_id: id,
        backend: be(ip, 9376),
    }
}

/// Index of the first op in `ops` matching `f`.
fn pos(ops: &[MapOp], f: impl Fn(&MapOp) -> bool) -> usize {
    ops.iter().position(f).expect("op in the plan")
}

#[test]
fn new_frontend_writes_backends_first_then_members_then_slots_then_master() {
    let mut w = World::new();
    w.event(SourceEvent::ServiceUpsert(cluster_svc("web", WEB)));
    let p = w.slice("web", &["10.244.0.2", "10.244.0.1"]);
    assert_eq!(
        p.prepare,
        vec![
            MapOp::PutBackend {
                id: 1,
                backend: be("10.244.0.1", 9376),
                state: BACKEND_ACTIVE
            },
            MapOp::PutBackend {
                id: 2,
                backend: be("10.244.0.2", 9376),
                state: BACKEND_ACTIVE
            },
        ]
    );
    assert_eq!(
        p.frontends,
        vec![(
            web(),
            vec![
                member(1, "10.244.0.1"),
                member(2, "10.244.0.2"),
                MapOp::PutSlot {
                    frontend: web(),
                    slot: 1,
                    backend_id: 1
                },
                MapOp::PutSlot {
                    frontend: web(),
                    slot: 2,
                    backend_id: 2
                },
                MapOp::PutMaster {
                    frontend: web(),
                    count: 2,
                    rev_nat_id: 1,
                    flags: SVC_FLAG_CLUSTER_IP,
                    affinity_timeout: 0,
                    table: 0,
                    svc_port_id: 1
                },
            ]
        )]
    );
}

#[test]
fn service_without_endpoints_gets_a_master_with_count_zero() {
    let mut w = World::new();
    let p = w.event(SourceEvent::ServiceUpsert(cluster_svc("web", WEB)));
    assert_eq!(
        p.prepare,
        vec![MapOp::PutSvcName {
            id: 1,
            name: SvcPortName::new("default", "web", "")
        }],
        "the frontend id has no entry of its own; the Service port's name is written first"
    );
    assert_eq!(
        p.frontends[0].1,
        vec![MapOp::PutMaster {
            frontend: web(),
            count: 0,
            rev_nat_id: 1,
            flags: SVC_FLAG_CLUSTER_IP,
            affinity_timeout: 0,
            table: 0,
            svc_port_id: 1
        }]
    );
}

#[test]
fn unchanged_input_plans_nothing() {
    let w = World::web(&["10.244.0.1"]);
    let all = all_frontends(&w.applied, &w.desired);
    assert!(plan(&w.applied, &w.desired, &all).is_empty());
    assert!(w.applied.gc().is_empty());
}

#[test]
fn added_endpoint_costs_one_backend_one_slot_and_the_master() {
    let mut w = World::web(&["10.244.0.1", "10.244.0.3"]);
    let p = w.slice("web", &["10.244.0.1", "10.244.0.2", "10.244.0.3"]);
    assert_eq!(
        p.prepare,
        vec![MapOp::PutBackend {
            id: 3,
            backend: be("10.244.0.2", 9376),
            state: BACKEND_ACTIVE
        }]
    );
    assert_eq!(
        p.frontends[0].1,
        vec![
            member(3, "10.244.0.2"),
            MapOp::PutSlot {
                frontend: web(),
                slot: 3,
                backend_id: 3
            },
            MapOp::PutMaster {
                frontend: web(),
                count: 3,
                rev_nat_id: 1,
                flags: SVC_FLAG_CLUSTER_IP,
                affinity_timeout: 0,
                table: 0,
                svc_port_id: 1
            },
        ]
    );
    assert_eq!(
        slots_of(&w, &web()),
        vec![1, 2, 3],
        "ids 1 and 2 kept their slots"
    );
}

#[test]
fn removed_endpoint_hole_is_filled_from_the_last_slot_and_its_backend_collected() {
    let mut w = World::web(&["10.244.0.1", "10.244.0.2", "10.244.0.3", "10.244.0.4"]);
    assert_eq!(w.applied.gc(), vec![]);
    let before = w.applied.clone();
    let p = w.slice("web", &["10.244.0.1", "10.244.0.3", "10.244.0.4"]);
    assert!(p.prepare.is_empty());
    assert_eq!(
        p.frontends[0].1,
        vec![
            MapOp::PutSlot {
                frontend: web(),
                slot: 2,
                backend_id: 4
            },
            MapOp::PutMaster {
                frontend: web(),
                count: 3,
                rev_nat_id: 1,
                flags: SVC_FLAG_CLUSTER_IP,
                affinity_timeout: 0,
                table: 0,
                svc_port_id: 1
            },
            MapOp::DeleteSlot {
                frontend: web(),
                slot: 4
            },
            MapOp::DeleteMember {
                frontend: web(),
                backend_id: 2
            },
        ]
    );
    assert_eq!(
        before.gc(),
        vec![],
        "gc of the state before the plan deletes nothing"
    );
    assert!(
        !w.applied.backends.contains_key(&2),
        "backend 2 was garbage-collected"
    );
    assert_eq!(slots_of(&w, &web()), vec![1, 4, 3]);
}

#[test]
fn backend_ids_are_stable_and_freed_ids_are_not_handed_out_again() {
    let mut w = World::web(&["10.244.0.1", "10.244.0.2", "10.244.0.3"]);
    w.slice("web", &["10.244.0.1", "10.244.0.3"]); // frees id 2
    let p = w.slice(
        "web",
        &["10.244.0.1", "10.244.0.3", "10.244.0.7", "10.244.0.8"],
    );
    let new: Vec<(u32, String)> = p
        .prepare
        .iter()
        .map(|op| match op {
            MapOp::PutBackend { id, backend, .. } => (*id, backend.to_string()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        new,
        vec![
            (4, "10.244.0.7:9376/TCP".into()),
            (5, "10.244.0.8:9376/TCP".into())
        ]
    );
    assert_eq!(w.applied.backends[&1].0, be("10.244.0.1", 9376));
    assert_eq!(w.applied.backends[&3].0, be("10.244.0.3", 9376));
}

#[test]
fn backend_id_reserves_ids_handed_out_in_the_same_plan() {
    let mut a = Applied::default();
    a.apply(&MapOp::PutBackend {
        id: 1,
        backend: be("10.0.0.1", 80),
        state: BACKEND_ACTIVE,
    });
    a.apply(&MapOp::PutBackend {
        id: 3,
        backend: be("10.0.0.3", 80),
        state: BACKEND_ACTIVE,
    });
    assert_eq!(a.backend_id(&be("10.0.0.3", 80), &BTreeSet::new()), 3);
    assert_eq!(
        a.backend_id(&be("10.0.0.9", 80), &BTreeSet::new()),
        4,
        "past the largest id seen, not the free 2"
    );
    assert_eq!(a.backend_id(&be("10.0.0.9", 80), &BTreeSet::from([4])), 5);
    assert_eq!(
        a.backend_id(&be("10.0.0.9", 80), &BTreeSet::from([4, 5, 6])),
        7
    );
}

#[test]
fn shared_backends_get_one_id_and_one_write() {
    let mut w = World::new();
    w.event(SourceEvent::ServiceUpsert(svc(
        "two",
        json!({"clusterIP": WEB, "ports": [{"name": "a", "port": 80}, {"name": "b", "port": 81}]}),
    )));
    let p = w.event(SourceEvent::SliceUpsert(slice(
        "two-1",
        "two",
        json!([{"name": "a", "port": 9376}, {"name": "b", "port": 9376}]),
        json!([ep("10.244.0.1")]),
    )));
    assert_eq!(p.prepare.len(), 1);
    assert_eq!(w.applied.backends.len(), 1);
}

#[test]
fn backend_state_change_is_written_in_prepare() {
    let mut w = World::web(&["10.244.0.1"]);
    let draining = slice(
        "web-1",
        "web",
        json!([{"port": 9376}]),
        json!([ep_cond(
            "10.244.0.1",
            Some(false),
            Some(true),
            Some(true),
            "node-b"
        )]),
    );
    let p = w.event(SourceEvent::SliceUpsert(draining));
    assert_eq!(
        p.prepare,
        vec![MapOp::PutBackend {
            id: 1,
            backend: be("10.244.0.1", 9376),
            state: BACKEND_TERMINATING
        }]
    );
    assert_eq!(
        p.frontends[0].1,
        vec![MapOp::PutMaster {
            frontend: web(),
            count: 1,
            rev_nat_id: 1,
            flags: SVC_FLAG_CLUSTER_IP | SVC_FLAG_TERMINATING_FALLBACK,
            affinity_timeout: 0,
            table: 0,
            svc_port_id: 1
        }]
    );
}

#[test]
fn removed_frontend_goes_master_first_then_slots_then_members_then_gc() {
    let mut w = World::web(&["10.244.0.1", "10.244.0.2"]);
    let before = w.applied.clone();
    let p = w.event(SourceEvent::ServiceDelete {
        namespace: "default".into(),
        name: "web".into(),
    });
    assert_eq!(
        p.frontends[0].1,
        vec![
            MapOp::DeleteMaster { frontend: web() },
            MapOp::DeleteSlot {
                frontend: web(),
                slot: 1
            },
            MapOp::DeleteSlot {
                frontend: web(),
                slot: 2
            },
            MapOp::DeleteMember {
                frontend: web(),
                backend_id: 1
            },
            MapOp::DeleteMember {
                frontend: web(),
                backend_id: 2
            },
        ]
    );
    // What gc deletes once the frontend ops ran:
    let mut after = before;
    for (_, ops) in &p.frontends {
        ops.iter().for_each(|op| after.apply(op));
    }
    assert_eq!(
        after.gc(),
        vec![
            MapOp::DeleteBackend { id: 1 },
            MapOp::DeleteBackend { id: 2 },
            // The Service port's name: no master names its id any more.
            MapOp::DeleteSvcName { id: 1 },
        ]
    );
    assert_eq!(w.applied, common::sim::empty_applied());
}

#[test]
fn rev_nat_ids_are_stable_per_frontend_and_freed_ids_not_handed_out_again() {
    let mut w = World::new();
    w.event(SourceEvent::ServiceUpsert(cluster_svc("a", "10.96.0.1")));
    w.event(SourceEvent::ServiceUpsert(cluster_svc("b", "10.96.0.2")));
    w.event(SourceEvent::ServiceUpsert(cluster_svc("c", "10.96.0.3")));
    let rev = |w: &World, ip: &str| w.applied.frontends[&fe(ip, 80, Proto::Tcp)].rev_nat_id;
    assert_eq!(
        (
            rev(&w, "10.96.0.1"),
            rev(&w, "10.96.0.2"),
            rev(&w, "10.96.0.3")
        ),
        (1, 2, 3)
    );
    w.event(SourceEvent::ServiceDelete {
        namespace: "default".into(),
        name: "b".into(),
    });
    w.slice("c", &["10.244.0.1"]);
    assert_eq!(
        rev(&w, "10.96.0.3"),
        3,
        "an endpoint change keeps the rev-NAT id"
    );
    w.event(SourceEvent::ServiceUpsert(cluster_svc("d", "10.96.0.4")));
    assert_eq!(rev(&w, "10.96.0.4"), 4, "b's freed id 2 is not re-used");
}

#[test]
fn type_change_removes_the_old_frontends_completely() {
    let mut w = World::new();
    let np = svc(
        "t",
        json!({"type": "NodePort", "clusterIP": WEB, "ports": [{"port": 80, "nodePort": 30080}]}),
    );
    w.event(SourceEvent::ServiceUpsert(np));
    w.slice("t", &["10.244.0.1"]);
    assert_eq!(w.applied.frontends.len(), 2);
    w.event(SourceEvent::ServiceUpsert(cluster_svc("t", WEB)));
    assert_eq!(
        w.applied.frontends.keys().copied().collect::<Vec<_>>(),
        vec![web()]
    );
    w.event(SourceEvent::ServiceUpsert(svc(
        "t",
        json!({"type": "ExternalName", "externalName": "a.example"}),
    )));
    assert_eq!(w.sim.to_applied(), common::sim::empty_applied());
}

#[test]
fn failed_prepare_blocks_only_the_frontends_that_need_it() {
    let mut w = World::new();
    w.event(SourceEvent::ServiceUpsert(cluster_svc("a", "10.96.0.1")));
    w.event(SourceEvent::ServiceUpsert(cluster_svc("b", "10.96.0.2")));
    w.state.apply(SourceEvent::SliceUpsert(simple_slice(
        "a-1",
        "a",
        &["10.244.0.1"],
    )));
    w.state.apply(SourceEvent::SliceUpsert(simple_slice(
        "b-1",
        "b",
        &["10.244.0.2"],
    )));
    let mut touched = BTreeSet::new();
    for k in [key("default", "a"), key("default", "b")] {
        touched.extend(w.desired.update_service(&w.state, &k, &cfg()).0);
    }
    let p = plan(&w.applied, &w.desired, &touched);
    let failed: Vec<MapOp> = p
        .prepare
        .iter()
        .filter(|op| matches!(op, MapOp::PutBackend { id: 1, .. }))
        .cloned()
        .collect();
    assert_eq!(
        p.blocked_by(&failed, &w.applied),
        BTreeSet::from([fe("10.96.0.1", 80, Proto::Tcp)])
    );
}

#[test]
fn read_back_state_with_holes_leftovers_and_orphans_is_repaired() {
    let f = web();
    let b = |i: u32| be(&format!("10.244.0.{i}"), 9376);
    let mut a = Applied::default();
    // As a read-back after a crash: master count unknown (0), a hole in slot 2, a slot above the
    // count, an orphan backend, a missing member (2) and a leftover member (9) whose backend is
    // gone.
    a.frontends.insert(
        f,
        AppliedFrontend {
            rev_nat_id: 1,
            flags: SVC_FLAG_CLUSTER_IP,
            affinity_timeout: 0,
            slots: vec![1, 0, 3, 2],
            count: 0,
            members: BTreeSet::from([1, 3, 4, 9]),
            svc_port_id: 1,
            ..Default::default()
        },
    );
    for i in 1..=4 {
        a.backends.insert(i, (b(i), BACKEND_ACTIVE));
    }
    a.rev_nat.insert(1, f);
    a.svc_names.insert(1, SvcPortName::new("default", "web", ""));
    // What the maps should hold (built through a fresh world).
    let desired = World::web(&["10.244.0.1", "10.244.0.2", "10.244.0.3"]).desired;
    let p = plan(&a, &desired, &all_frontends(&a, &desired));
    assert!(p.prepare.is_empty());
    assert_eq!(
        p.frontends[0].1,
        vec![
            MapOp::PutMember {
                frontend: f,
                backend_id: 2,
                backend: b(2)
            },
            MapOp::PutSlot {
                frontend: f,
                slot: 2,
                backend_id: 2
            },
            MapOp::PutMaster {
                frontend: f,
                count: 3,
                rev_nat_id: 1,
                flags: SVC_FLAG_CLUSTER_IP,
                affinity_timeout: 0,
                table: 0,
                svc_port_id: 1
            },
            MapOp::DeleteSlot {
                frontend: f,
                slot: 4
            },
            MapOp::DeleteMember {
                frontend: f,
                backend_id: 4
            },
            MapOp::DeleteMember {
                frontend: f,
                backend_id: 9
            },
        ]
    );
    for op in &p.frontends[0].1 {
        a.apply(op);
    }
    assert_eq!(a.gc(), vec![MapOp::DeleteBackend { id: 4 }]);
}

/// Services `svc-i` with ClusterIP 10.96.x.y and `per` endpoints each.
fn big_world(services: usize, per: usize) -> ClusterState {
    let mut st = ClusterState {
        node: node(),
        ..Default::default()
    };
    for i in 0..services {
        let name = format!("svc-{i}");
        let ip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
        st.apply(SourceEvent::ServiceUpsert(cluster_svc(&name, &ip)));
        let ips: Vec<String> = (0..per)
            .map(|j| {
                format!(
                    "10.{}.{}.{}",
                    100 + i / 2500,
                    (i / 10) % 250,
                    (i % 10) * 20 + j
                )
            })
            .collect();
        let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
        st.apply(SourceEvent::SliceUpsert(simple_slice(
            &format!("{name}-1"),
            &name,
            &refs,
        )));
    }
    st
}

#[test]
fn one_endpoint_change_among_1000_services_is_a_handful_of_ops() {
    let state = big_world(1000, 5);
    let (mut desired, problems) = DesiredState::rebuild(&state, &cfg());
    assert!(problems.is_empty());
    let mut applied = Applied::default();
    let mut sim = Sim::default();
    let full = plan(&applied, &desired, &all_frontends(&applied, &desired));
    // name, master, 5 slots, 5 members, 5 backends
    assert_eq!(full.op_count(), 1000 * (1 + 1 + 5 + 5 + 5));
    sim.run(&full, &mut applied);

    let mut state = state;
    let k = key("default", "svc-500");
    let old: Vec<String> = state
        .slices_of(&k)
        .next()
        .unwrap()
        .endpoints
        .iter()
        .map(|e| e.addr.to_string())
        .collect();
    let mut ips: Vec<&str> = old.iter().map(String::as_str).collect();
    ips[2] = "10.200.0.1"; // one endpoint replaced by a new pod
    let changes = state.apply(SourceEvent::SliceUpsert(simple_slice(
        "svc-500-1",
        "svc-500",
        &ips,
    )));
    assert_eq!(changes.services.len(), 1);
    let (touched, _) = desired.update_service(&state, &k, &cfg());
    let p = plan(&applied, &desired, &touched.into_iter().collect());
    // PutBackend, PutMember, PutSlot, DeleteMember; the count did not change.
    assert_eq!(p.op_count(), 4, "{p:?}");
    sim.run(&p, &mut applied);
    sim.check_equals(&desired).unwrap();
    assert_eq!(applied, sim.to_applied());
}

#[test]
fn rebuild_and_full_plan_of_10k_services_is_fast() {
    let state = big_world(10_000, 10);
    let t = Instant::now();
    let (desired, problems) = DesiredState::rebuild(&state, &cfg());
    let rebuild = t.elapsed();
    assert!(problems.is_empty());
    assert_eq!(desired.frontends.len(), 10_000);
    let applied = Applied::default();
    let t = Instant::now();
    let p = plan(&applied, &desired, &all_frontends(&applied, &desired));
    let planning = t.elapsed();
    assert_eq!(p.op_count(), 10_000 * (1 + 1 + 10 + 10 + 10));
    eprintln!("10k Services / 100k endpoints: rebuild {rebuild:?}, full plan {planning:?}");
    // Generous bounds: debug builds on a shared 2-core machine; release is far faster.
    assert!(rebuild.as_secs_f64() < 10.0 && planning.as_secs_f64() < 10.0);
}

#[test]
fn shared_backend_state_follows_when_the_frontend_using_it_as_ready_goes() {
    // Found by the property test: x drains the pod, y still calls it ready; y's port goes away,
    // so the backend becomes terminating although only y's frontend was touched.
    let mut w = World::new();
    w.event(SourceEvent::ServiceUpsert(cluster_svc("x", "10.96.0.1")));
    w.event(SourceEvent::ServiceUpsert(cluster_svc("y", "10.96.0.2")));
    let draining = slice(
        "x-1",
        "x",
        json!([{"port": 9376}]),
        json!([ep_cond(
            "10.244.0.6",
            Some(false),
            Some(true),
            Some(true),
            "node-b"
        )]),
    );
    w.event(SourceEvent::SliceUpsert(draining));
    w.slice("y", &["10.244.0.6"]);
    assert_eq!(w.applied.backends[&1].1, BACKEND_ACTIVE);
    let p = w.event(SourceEvent::ServiceUpsert(svc(
        "y",
        json!({"clusterIP": "10.96.0.2", "ports": []}),
    )));
    assert_eq!(
        p.prepare,
        vec![MapOp::PutBackend {
            id: 1,
            backend: be("10.244.0.6", 9376),
            state: BACKEND_TERMINATING
        }]
    );
}

#[test]
fn replaced_endpoint_member_is_written_before_its_slot_and_the_old_one_deleted_after() {
    let mut w = World::web(&["10.244.0.1", "10.244.0.2", "10.244.0.3"]);
    let p = w.slice("web", &["10.244.0.1", "10.244.0.2", "10.244.0.4"]);
    assert_eq!(
        p.frontends[0].1,
        vec![
            member(4, "10.244.0.4"),
            MapOp::PutSlot {
                frontend: web(),
                slot: 3,
                backend_id: 4
            },
            MapOp::DeleteMember {
                frontend: web(),
                backend_id: 3
            },
        ]
    );
    assert_eq!(
        w.applied.frontends[&web()].members,
        BTreeSet::from([1, 2, 4])
    );
    assert!(
        !w.applied.backends.contains_key(&3),
        "gc ran after the member went"
    );
}

#[test]
fn scale_down_deletes_the_members_after_the_master_and_the_slots() {
    let mut w = World::web(&["10.244.0.1", "10.244.0.2", "10.244.0.3", "10.244.0.4"]);
    let p = w.slice("web", &["10.244.0.1"]);
    let ops = &p.frontends[0].1;
    let master = pos(ops, |op| matches!(op, MapOp::PutMaster { count: 1, .. }));
    let last_slot = ops
        .iter()
        .rposition(|op| matches!(op, MapOp::DeleteSlot { .. }))
        .unwrap();
    let first_member = pos(ops, |op| matches!(op, MapOp::DeleteMember { .. }));
    assert!(master < last_slot && last_slot < first_member, "{ops:?}");
    let gone: Vec<u32> = ops
        .iter()
        .filter_map(|op| match op {
            MapOp::DeleteMember { backend_id, .. } => Some(*backend_id),
            _ => None,
        })
        .collect();
    assert_eq!(gone, vec![2, 3, 4]);
    assert_eq!(w.applied.frontends[&web()].members, BTreeSet::from([1]));
    assert_eq!(w.sim.maps.members.len(), 1);
}

#[test]
fn missing_member_of_a_staying_slot_is_rewritten() {
    let w = World::web(&["10.244.0.1", "10.244.0.2"]);
    let mut a = w.applied.clone();
    a.frontends.get_mut(&web()).unwrap().members.remove(&2);
    a.reindex();
    let p = plan(&a, &w.desired, &all_frontends(&a, &w.desired));
    assert_eq!(p.prepare, vec![]);
    assert_eq!(p.frontends, vec![(web(), vec![member(2, "10.244.0.2")])]);
}

#[test]
fn recreated_frontend_gets_a_new_rev_nat_id() {
    let mut w = World::web(&["10.244.0.1"]);
    assert_eq!(w.applied.frontends[&web()].rev_nat_id, 1);
    w.event(SourceEvent::ServiceDelete {
        namespace: "default".into(),
        name: "web".into(),
    });
    assert!(w.applied.rev_nat.is_empty());
    let p = w.event(SourceEvent::ServiceUpsert(cluster_svc("web", WEB)));
    // The slice is still there: the backend comes back too, under a new id as well, and so
    // does the Service port (its counters start over).
    assert_eq!(
        p.prepare,
        vec![
            MapOp::PutSvcName {
                id: 2,
                name: SvcPortName::new("default", "web", "")
            },
            MapOp::PutBackend {
                id: 2,
                backend: be("10.244.0.1", 9376),
                state: BACKEND_ACTIVE
            }
        ]
    );
    assert_eq!(w.applied.frontends[&web()].rev_nat_id, 2);
    assert_eq!(w.applied.rev_nat.get(&2), Some(&web()));
}

#[test]
fn frontend_whose_master_is_gone_gets_a_new_id() {
    // The master was deleted (an interrupted removal) but the frontend is wanted again.
    let mut w = World::new();
    w.event(SourceEvent::ServiceUpsert(cluster_svc("web", WEB)));
    let mut a = w.applied.clone();
    a.apply(&MapOp::DeleteMaster { frontend: web() });
    assert!(a.rev_nat.is_empty());
    let p = plan(&a, &w.desired, &BTreeSet::from([web()]));
    assert_eq!(
        p.frontends,
        vec![(
            web(),
            vec![MapOp::PutMaster {
                frontend: web(),
                count: 0,
                rev_nat_id: 2,
                flags: SVC_FLAG_CLUSTER_IP,
                affinity_timeout: 0,
                table: 0,
                svc_port_id: 1
            }]
        )]
    );
}

#[test]
fn read_back_masters_sharing_an_id_are_given_distinct_ids() {
    // Never written so by xlb: two masters with id 5. The first keeps it, the other gets a new
    // one past every id present.
    let a_fe = fe("10.96.0.1", 80, Proto::Tcp);
    let b_fe = fe("10.96.0.2", 80, Proto::Tcp);
    let master = ServiceValue {
        rev_nat_id: 5,
        flags: SVC_FLAG_CLUSTER_IP,
        ..Default::default()
    };
    let mut r = lb_model::ReadBack::new();
    r.service(&a_fe.key(0), &master);
    r.service(&b_fe.key(0), &master);
    let read = r.finish();
    assert_eq!(read.rev_nat, BTreeMap::from([(5, a_fe)]));
    let mut w = World::new();
    w.event(SourceEvent::ServiceUpsert(cluster_svc("a", "10.96.0.1")));
    w.event(SourceEvent::ServiceUpsert(cluster_svc("b", "10.96.0.2")));
    let p = plan(&read, &w.desired, &all_frontends(&read, &w.desired));
    // Both masters of the read-back lack a Service port (written by a build without names):
    // both get one; the first keeps its frontend id.
    assert_eq!(
        p.frontends,
        vec![
            (
                a_fe,
                vec![MapOp::PutMaster {
                    frontend: a_fe,
                    count: 0,
                    rev_nat_id: 5,
                    flags: SVC_FLAG_CLUSTER_IP,
                    affinity_timeout: 0,
                    table: 0,
                    svc_port_id: 1
                }]
            ),
            (
                b_fe,
                vec![MapOp::PutMaster {
                    frontend: b_fe,
                    count: 0,
                    rev_nat_id: 6,
                    flags: SVC_FLAG_CLUSTER_IP,
                    affinity_timeout: 0,
                    table: 0,
                    svc_port_id: 2
                }]
            )
        ]
    );
}

#[test]
fn freed_backend_id_is_not_reused_by_the_next_new_backend() {
    let mut w = World::web(&["10.244.0.1", "10.244.0.2"]);
    w.slice("web", &["10.244.0.1"]); // frees id 2
    assert_eq!(w.applied.backends.keys().copied().collect::<Vec<_>>(), [1]);
    w.slice("web", &["10.244.0.1", "10.244.0.3"]);
    assert_eq!(w.applied.backends[&3].0, be("10.244.0.3", 9376));
    // The same address coming back is a new backend too.
    w.slice("web", &["10.244.0.1"]);
    w.slice("web", &["10.244.0.1", "10.244.0.3"]);
    assert_eq!(w.applied.backends[&4].0, be("10.244.0.3", 9376));
    // The cursor is history, not content: it survives a re-index.
    w.applied.reindex();
    assert_eq!(
        w.applied.backend_id(&be("10.0.0.1", 1), &BTreeSet::new()),
        5
    );
}

#[test]
fn read_back_cursor_starts_past_the_largest_id_present() {
    let mut w = World::web(&["10.244.0.1", "10.244.0.2", "10.244.0.3"]);
    w.slice("web", &["10.244.0.1", "10.244.0.3"]); // frees id 2; 3 stays
    let read = w.sim.to_applied();
    assert_eq!(read, w.applied);
    assert_eq!(read.backend_id(&be("10.0.0.1", 1), &BTreeSet::new()), 4);
    // A slot or member naming an id without its entry counts as well.
    let mut a = Applied::default();
    a.frontends.insert(
        web(),
        AppliedFrontend {
            members: BTreeSet::from([9]),
            ..Default::default()
        },
    );
    assert_eq!(a.backend_id(&be("10.0.0.1", 1), &BTreeSet::new()), 10);
}

#[test]
fn read_back_keeps_orphans_for_gc_and_repairs_wrong_members() {
    let f = web();
    let b1 = be("10.244.0.1", 9376);
    let b2 = be("10.244.0.2", 9376);
    let mut r = lb_model::ReadBack::new();
    r.service(
        &f.key(0),
        &ServiceValue {
            count: 1,
            rev_nat_id: 3,
            flags: SVC_FLAG_CLUSTER_IP,
            svc_port_id: 1,
            ..Default::default()
        },
    );
    r.svc_name(1, &SvcPortName::new("default", "web", "").to_map());
    r.service(
        &f.key(1),
        &ServiceValue {
            backend_id: 1,
            ..Default::default()
        },
    );
    r.backend(1, &b1.to_map(BACKEND_ACTIVE));
    r.backend(2, &b2.to_map(BACKEND_ACTIVE));
    // Members 1 (in a slot) and 2 (not) both hold the wrong address.
    r.member(&f.member_key(1), &b2.to_member());
    r.member(&f.member_key(2), &b1.to_member());
    let a = r.finish();
    assert_eq!(
        a.rev_nat,
        BTreeMap::from([(3, f)]),
        "the frontend id comes from the master"
    );
    assert_eq!(a.frontends[&f].members, BTreeSet::from([2]));
    // What the maps should hold (built through a fresh world).
    let desired = World::web(&["10.244.0.1"]).desired;
    let p = plan(&a, &desired, &all_frontends(&a, &desired));
    assert_eq!(
        p.frontends,
        vec![(
            f,
            vec![
                MapOp::PutMember {
                    frontend: f,
                    backend_id: 1,
                    backend: b1
                },
                MapOp::DeleteMember {
                    frontend: f,
                    backend_id: 2
                },
            ]
        )]
    );
    let mut a = a;
    p.frontends[0].1.iter().for_each(|op| a.apply(op));
    assert_eq!(a.gc(), vec![MapOp::DeleteBackend { id: 2 }]);
}

#[test]
fn failed_backend_write_blocks_the_frontend_that_would_make_it_a_member() {
    let mut w = World::new();
    w.event(SourceEvent::ServiceUpsert(cluster_svc("web", WEB)));
    w.state.apply(SourceEvent::SliceUpsert(simple_slice(
        "web-1",
        "web",
        &["10.244.0.1"],
    )));
    let (touched, _) = w
        .desired
        .update_service(&w.state, &key("default", "web"), &cfg());
    let p = plan(&w.applied, &w.desired, &touched.into_iter().collect());
    let only_member = Plan {
        prepare: p.prepare.clone(),
        frontends: vec![(web(), vec![member(1, "10.244.0.1")])],
        unplanned: Vec::new(),
        svc_ids_exhausted: Vec::new(),
    };
    assert_eq!(
        only_member.blocked_by(&p.prepare, &w.applied),
        BTreeSet::from([web()])
    );
}

/// A NodePort Service "np" (ClusterIP 10.96.0.30, nodePort 30080), Local or not.
fn np_svc(local: bool) -> SourceEvent {
    SourceEvent::ServiceUpsert(svc(
        "np",
        json!({"type": "NodePort", "clusterIP": "10.96.0.30",
               "externalTrafficPolicy": if local { "Local" } else { "Cluster" },
               "ports": [{"port": 80, "nodePort": 30080}]}),
    ))
}

/// The ops of the plan entry named `f` (empty when there is none).
fn entry(p: &Plan, f: Frontend) -> Vec<MapOp> {
    p.frontends
        .iter()
        .find(|(x, _)| *x == f)
        .map(|(_, ops)| ops.clone())
        .unwrap_or_default()
}

#[test]
fn scope_int_entry_is_written_before_the_master_that_points_pods_at_it_and_removed_after() {
    let ext = fe("192.168.1.10", 30080, Proto::Tcp);
    let int = ext.with_scope(SCOPE_INT);
    let mut w = World::new();
    w.event(np_svc(false));
    w.event(SourceEvent::SliceUpsert(slice(
        "np-1",
        "np",
        json!([{"port": 9376}]),
        json!([
            ep_cond("10.244.1.1", None, None, None, NODE),
            ep_cond("10.244.2.1", None, None, None, "node-b"),
        ]),
    )));
    let is_master = |f: Frontend| move |op: &MapOp| matches!(op, MapOp::PutMaster { frontend, .. } if *frontend == f);
    let frontend_of = |op: &MapOp| *op.frontend().unwrap();

    // Cluster -> Local: one plan entry for both scopes, named by SCOPE_EXT; SCOPE_INT whole
    // (members, slots, master) before the SCOPE_EXT master gets TWO_SCOPES.
    let p = w.event(np_svc(true));
    assert!(entry(&p, int).is_empty(), "no entry of its own: {p:?}");
    let ops = entry(&p, ext);
    let last_int = ops.iter().rposition(|op| frontend_of(op) == int).unwrap();
    let first_ext = pos(&ops, |op| frontend_of(op) == ext);
    assert!(last_int < first_ext, "{ops:?}");
    assert!(matches!(ops[last_int], MapOp::PutMaster { count: 2, .. }));
    let m = pos(&ops, is_master(ext));
    assert!(
        matches!(ops[m], MapOp::PutMaster { flags, count: 1, .. } if flags & SVC_FLAG_TWO_SCOPES != 0)
    );

    // Local -> Cluster: the SCOPE_EXT master loses the flag before SCOPE_INT goes.
    let p = w.event(np_svc(false));
    let ops = entry(&p, ext);
    let m = pos(&ops, is_master(ext));
    assert!(
        matches!(ops[m], MapOp::PutMaster { flags, count: 2, .. } if flags & SVC_FLAG_TWO_SCOPES == 0)
    );
    let gone = pos(&ops, |op| *op == MapOp::DeleteMaster { frontend: int });
    assert!(m < gone, "{ops:?}");
    assert!(ops[..m].iter().all(|op| frontend_of(op) == ext));

    // A Local Service deleted: the SCOPE_EXT master first, then the rest.
    w.event(np_svc(true));
    let p = w.event(SourceEvent::ServiceDelete {
        namespace: "default".into(),
        name: "np".into(),
    });
    let ops = entry(&p, ext);
    assert_eq!(ops[0], MapOp::DeleteMaster { frontend: ext });
    assert!(pos(&ops, |op| *op == MapOp::DeleteMaster { frontend: int }) > 0);
}

#[test]
fn planning_one_scope_plans_the_other_too() {
    // The agent retries the frontends a report names (SCOPE_EXT for a two-scope entry).
    let ext = fe("192.168.1.10", 30080, Proto::Tcp);
    let int = ext.with_scope(SCOPE_INT);
    let mut w = World::new();
    w.event(np_svc(true));
    w.slice("np", &["10.244.0.1"]);
    let empty = Applied::default();
    for one in [ext, int] {
        let p = plan(&empty, &w.desired, &BTreeSet::from([one]));
        assert_eq!(p.frontends.len(), 1);
        assert_eq!(p.frontends[0].0, ext, "named by SCOPE_EXT");
        let written: BTreeSet<Frontend> = p.frontends[0]
            .1
            .iter()
            .map(|op| *op.frontend().unwrap())
            .collect();
        assert_eq!(written, BTreeSet::from([ext, int]));
    }
}

/// A LoadBalancer Service "lb" (ingress 198.51.100.1:443) with these source ranges.
fn lb_svc(ranges: serde_json::Value) -> SourceEvent {
    SourceEvent::ServiceUpsert(svc_full(
        json!({"name": "lb", "namespace": "default"}),
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.40", "loadBalancerSourceRanges": ranges,
               "ports": [{"port": 443, "nodePort": 30443}]}),
        json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}),
    ))
}

#[test]
fn source_ranges_go_in_before_the_flagged_master_and_out_after_it() {
    let lb = fe("198.51.100.1", 443, Proto::Tcp);
    let a: Cidr = ("10.0.0.0".parse().unwrap(), 8);
    let b: Cidr = ("192.0.2.0".parse().unwrap(), 24);
    let put = |range| MapOp::PutSrcRange {
        frontend: lb,
        range,
    };
    let del = |range| MapOp::DeleteSrcRange {
        frontend: lb,
        range,
    };
    let mut w = World::new();
    w.slice("lb", &["10.244.0.1"]);

    // New: the ranges first, the flagged master after them.
    let p = w.event(lb_svc(json!(["10.0.0.0/8"])));
    let ops = entry(&p, lb);
    assert_eq!(ops[0], put(a));
    assert!(
        matches!(ops.last(), Some(MapOp::PutMaster { flags, .. }) if flags & SVC_FLAG_SOURCE_RANGES != 0)
    );
    assert_eq!(w.sim.maps.src_ranges.len(), 1);

    // Another range: the new one in before the old one out; the master stays.
    let p = w.event(lb_svc(json!(["192.0.2.0/24"])));
    assert_eq!(entry(&p, lb), vec![put(b), del(a)]);

    // No ranges: the master loses the flag, then the range goes.
    let p = w.event(lb_svc(json!(null)));
    let ops = entry(&p, lb);
    assert_eq!(ops.len(), 2);
    assert!(
        matches!(ops[0], MapOp::PutMaster { flags, .. } if flags & SVC_FLAG_SOURCE_RANGES == 0)
    );
    assert_eq!(ops[1], del(b));
    assert!(w.sim.maps.src_ranges.is_empty());

    // A Service removed: master, slots, members, then its ranges.
    w.event(lb_svc(json!(["10.0.0.0/8", "192.0.2.0/24"])));
    let p = w.event(SourceEvent::ServiceDelete {
        namespace: "default".into(),
        name: "lb".into(),
    });
    let ops = entry(&p, lb);
    assert_eq!(ops[0], MapOp::DeleteMaster { frontend: lb });
    assert_eq!(ops[ops.len() - 2..], [del(a), del(b)]);
    assert!(w.sim.maps.src_ranges.is_empty() && w.applied.frontends.is_empty());
}

#[test]
fn a_locality_change_rewrites_the_backend_in_prepare() {
    let on = |node: &str| {
        SourceEvent::SliceUpsert(slice(
            "web-1",
            "web",
            json!([{"port": 9376}]),
            json!([ep_cond("10.244.0.1", None, None, None, node)]),
        ))
    };
    let mut w = World::new();
    w.event(SourceEvent::ServiceUpsert(cluster_svc("web", WEB)));
    w.event(on("node-b"));
    assert_eq!(w.sim.maps.backends[&1].state, BACKEND_ACTIVE);
    // The pod is this node's now (re-created with the same address): only BACKENDS changes.
    let p = w.event(on(NODE));
    assert_eq!(
        p.prepare,
        vec![MapOp::PutBackend {
            id: 1,
            backend: be("10.244.0.1", 9376),
            state: BACKEND_ACTIVE | BACKEND_F_LOCAL
        }]
    );
    assert!(p.frontends.is_empty(), "{p:?}");
    assert_eq!(w.sim.maps.backends[&1].state, BACKEND_F_LOCAL);
    // Read back, the bit is there (World::event checked applied == read-back too).
    assert_eq!(w.sim.to_applied().backends[&1].1, BACKEND_F_LOCAL);
    // The node loses its name: nothing is local, every frontend is re-planned.
    let c = w.state.apply(SourceEvent::Node(lb_model::NodeInfo {
        name: String::new(),
        addresses: vec![NODE_IP],
    }));
    assert!(c.all);
    let (d, _) = DesiredState::rebuild(&w.state, &cfg());
    w.desired = d;
    let p = plan(
        &w.applied,
        &w.desired,
        &all_frontends(&w.applied, &w.desired),
    );
    assert_eq!(
        p.prepare,
        vec![MapOp::PutBackend {
            id: 1,
            backend: be("10.244.0.1", 9376),
            state: BACKEND_ACTIVE
        }]
    );
    w.execute(&p);
}
