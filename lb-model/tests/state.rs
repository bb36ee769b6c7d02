//! ClusterState change tracking and DesiredState ownership rules.

mod common;

use std::collections::BTreeSet;

use common::*;
use lb_common::*;
use lb_model::state::Changes;
use lb_model::{ClusterState, DesiredState, Proto, SourceEvent};
use serde_json::json;

fn changed(c: &Changes) -> Vec<String> {
    c.services.iter().map(|k| k.to_string()).collect()
}

fn state_with(events: Vec<SourceEvent>) -> ClusterState {
    let mut st = ClusterState {
        node: node(),
        ..Default::default()
    };
    for e in events {
        st.apply(e);
    }
    st
}

#[test]
fn service_key_defaults_the_namespace() {
    let mut st = ClusterState::default();
    let s = svc_full(
        json!({"name": "web"}),
        json!({"clusterIP": "10.96.0.1"}),
        json!({}),
    );
    let c = st.apply(SourceEvent::ServiceUpsert(s));
    assert_eq!(changed(&c), vec!["default/web"]);
    let c = st.apply(SourceEvent::ServiceDelete {
        namespace: "default".into(),
        name: "web".into(),
    });
    assert_eq!(changed(&c), vec!["default/web"]);
    assert!(st.services.is_empty());
}

#[test]
fn an_object_equal_to_the_held_one_changes_nothing() {
    let mut st = ClusterState::default();
    assert!(!st
        .apply(SourceEvent::ServiceUpsert(cluster_svc("web", "10.96.0.1")))
        .services
        .is_empty());
    assert_eq!(
        st.apply(SourceEvent::ServiceUpsert(cluster_svc("web", "10.96.0.1"))),
        Changes::default()
    );
    assert_eq!(
        changed(&st.apply(SourceEvent::ServiceUpsert(cluster_svc("web", "10.96.0.2")))),
        vec!["default/web"]
    );
    let sl = simple_slice("web-1", "web", &["10.244.0.1"]);
    assert_eq!(
        changed(&st.apply(SourceEvent::SliceUpsert(sl.clone()))),
        vec!["default/web"]
    );
    assert_eq!(st.apply(SourceEvent::SliceUpsert(sl)), Changes::default());
    // Deleting what is not there changes nothing either.
    let none = st.apply(SourceEvent::SliceDelete {
        namespace: "default".into(),
        name: "nope".into(),
    });
    assert_eq!(none, Changes::default());
}

#[test]
fn slice_without_service_label_is_a_problem_and_skipped() {
    let mut st = ClusterState::default();
    let mut sl = simple_slice("orphan", "web", &["10.244.0.1"]);
    sl.metadata.labels = None;
    let c = st.apply(SourceEvent::SliceUpsert(sl.clone()));
    assert!(c.services.is_empty());
    assert_eq!(c.problems.len(), 1);
    assert_eq!(c.problems[0].kind, "invalid_slice");
    assert_eq!(c.problems[0].object, "default/orphan");
    assert!(st.slices.is_empty());
    // A slice that loses its label leaves its Service.
    st.apply(SourceEvent::SliceUpsert(simple_slice(
        "orphan",
        "web",
        &["10.244.0.1"],
    )));
    let c = st.apply(SourceEvent::SliceUpsert(sl));
    assert_eq!(changed(&c), vec!["default/web"]);
    assert_eq!(st.slices_of(&key("default", "web")).count(), 0);
}

#[test]
fn slice_moving_to_another_service_changes_both() {
    let mut st = ClusterState::default();
    st.apply(SourceEvent::SliceUpsert(simple_slice(
        "s",
        "a",
        &["10.244.0.1"],
    )));
    let c = st.apply(SourceEvent::SliceUpsert(simple_slice(
        "s",
        "b",
        &["10.244.0.1"],
    )));
    assert_eq!(changed(&c), vec!["default/a", "default/b"]);
    assert_eq!(st.slices_of(&key("default", "a")).count(), 0);
    assert_eq!(st.slices_of(&key("default", "b")).count(), 1);
    let c = st.apply(SourceEvent::SliceDelete {
        namespace: "default".into(),
        name: "s".into(),
    });
    assert_eq!(changed(&c), vec!["default/b"]);
    assert!(st.slices.is_empty() && st.slice_owner.is_empty());
}

#[test]
fn slices_are_per_namespace() {
    let mut st = ClusterState::default();
    let mut other = simple_slice("s", "web", &["10.244.0.1"]);
    other.metadata.namespace = Some("prod".into());
    st.apply(SourceEvent::SliceUpsert(simple_slice(
        "s",
        "web",
        &["10.244.0.2"],
    )));
    let c = st.apply(SourceEvent::SliceUpsert(other));
    assert_eq!(changed(&c), vec!["prod/web"]);
    assert_eq!(st.slices_of(&key("default", "web")).count(), 1);
    assert_eq!(st.slices_of(&key("prod", "web")).count(), 1);
}

#[test]
fn resync_reports_exactly_the_services_whose_objects_differ() {
    let mut st = state_with(vec![
        SourceEvent::ServiceUpsert(cluster_svc("same", "10.96.0.1")),
        SourceEvent::ServiceUpsert(cluster_svc("changed", "10.96.0.2")),
        SourceEvent::ServiceUpsert(cluster_svc("removed", "10.96.0.3")),
        SourceEvent::SliceUpsert(simple_slice("same-1", "same", &["10.244.0.1"])),
        SourceEvent::SliceUpsert(simple_slice("gone-1", "slicegone", &["10.244.0.2"])),
    ]);
    let c = st.apply(SourceEvent::Resync {
        services: Some(vec![
            cluster_svc("same", "10.96.0.1"),
            cluster_svc("changed", "10.96.0.22"),
            cluster_svc("added", "10.96.0.4"),
        ]),
        slices: None,
    });
    assert_eq!(
        changed(&c),
        vec!["default/added", "default/changed", "default/removed"]
    );
    assert_eq!(
        st.slices.len(),
        2,
        "slices untouched by a services-only resync"
    );
    let c = st.apply(SourceEvent::Resync {
        services: None,
        slices: Some(vec![
            simple_slice("same-1", "same", &["10.244.0.1"]),
            simple_slice("new-1", "added", &["10.244.0.3"]),
        ]),
    });
    assert_eq!(changed(&c), vec!["default/added", "default/slicegone"]);
    assert_eq!(st.slice_owner.len(), 2);
    let again = st.apply(SourceEvent::Resync {
        services: Some(st.services.values().map(|s| (**s).clone()).collect()),
        // The slices the state holds (it keeps them in its compact form, not as objects).
        slices: Some(vec![
            simple_slice("same-1", "same", &["10.244.0.1"]),
            simple_slice("new-1", "added", &["10.244.0.3"]),
        ]),
    });
    assert_eq!(
        again,
        Changes::default(),
        "a resync that changes nothing costs nothing"
    );
}

/// A list long enough to be freed on a helper thread (the agent's cold start at scale) is
/// taken in whole, and a second resync of it, freed the same way, changes nothing.
#[test]
fn a_large_resync_is_absorbed_whole() {
    const N: usize = 2_500;
    let services = || -> Vec<_> {
        (0..N)
            .map(|i| cluster_svc(&format!("s{i}"), &format!("10.96.{}.{}", i / 250, 1 + i % 250)))
            .collect()
    };
    let slices = || -> Vec<_> {
        (0..N)
            .map(|i| {
                let ip = format!("10.244.{}.{}", i / 250, 1 + i % 250);
                simple_slice(&format!("s{i}-1"), &format!("s{i}"), &[ip.as_str()])
            })
            .collect()
    };
    let mut st = ClusterState::default();
    let c = st.apply(SourceEvent::Resync {
        services: Some(services()),
        slices: Some(slices()),
    });
    assert_eq!(c.services.len(), N);
    assert_eq!((st.services.len(), st.slices.len(), st.slice_owner.len()), (N, N, N));
    let again = st.apply(SourceEvent::Resync {
        services: Some(services()),
        slices: Some(slices()),
    });
    assert_eq!(again, Changes::default());
}

#[test]
fn node_changes_recompute_everything_and_first_sync_too() {
    let mut st = ClusterState::default();
    assert!(st.apply(SourceEvent::Node(node())).all);
    assert!(!st.apply(SourceEvent::Node(node())).all);
    let mut moved = node();
    moved.addresses.push("10.0.0.1".parse().unwrap());
    assert!(st.apply(SourceEvent::Node(moved)).all);
    assert!(st.apply(SourceEvent::Synced).all);
    assert!(st.synced);
    assert!(!st.apply(SourceEvent::Synced).all);
}

#[test]
fn deleted_service_keeps_its_slices_for_when_it_comes_back() {
    let k = key("default", "web");
    let mut st = state_with(vec![
        SourceEvent::ServiceUpsert(cluster_svc("web", "10.96.0.80")),
        SourceEvent::SliceUpsert(simple_slice("web-1", "web", &["10.244.0.1"])),
    ]);
    let (mut d, p) = DesiredState::rebuild(&st, &cfg());
    assert!(p.is_empty());
    assert_eq!(d.frontends.len(), 1);
    st.apply(SourceEvent::ServiceDelete {
        namespace: "default".into(),
        name: "web".into(),
    });
    let (touched, _) = d.update_service(&st, &k, &cfg());
    assert_eq!(touched, vec![fe("10.96.0.80", 80, Proto::Tcp)]);
    assert!(d.frontends.is_empty() && d.by_service.is_empty());
    assert_eq!(st.slices_of(&k).count(), 1);
    st.apply(SourceEvent::ServiceUpsert(cluster_svc("web", "10.96.0.80")));
    d.update_service(&st, &k, &cfg());
    assert_eq!(
        d.frontends[&fe("10.96.0.80", 80, Proto::Tcp)].backends,
        vec![be("10.244.0.1", 9376)]
    );
}

#[test]
fn type_change_touches_old_and_new_frontends() {
    let k = key("default", "t");
    let np = svc(
        "t",
        json!({"type": "NodePort", "clusterIP": "10.96.0.5", "ports": [{"port": 80, "nodePort": 30005}]}),
    );
    let mut st = state_with(vec![SourceEvent::ServiceUpsert(cluster_svc(
        "t",
        "10.96.0.5",
    ))]);
    let (mut d, _) = DesiredState::rebuild(&st, &cfg());
    st.apply(SourceEvent::ServiceUpsert(np));
    let (touched, _) = d.update_service(&st, &k, &cfg());
    let nodeport = fe("192.168.1.10", 30005, Proto::Tcp);
    assert_eq!(touched, vec![fe("10.96.0.5", 80, Proto::Tcp), nodeport]);
    assert_eq!(d.frontends.len(), 2);
    // NodePort -> ExternalName: both frontends go.
    st.apply(SourceEvent::ServiceUpsert(svc(
        "t",
        json!({"type": "ExternalName", "externalName": "x.example"}),
    )));
    let (touched, _) = d.update_service(&st, &k, &cfg());
    assert_eq!(touched.len(), 2);
    assert!(d.frontends.is_empty());
}

#[test]
fn removed_port_is_touched_so_the_plan_removes_it() {
    let k = key("default", "p");
    let two = svc(
        "p",
        json!({"clusterIP": "10.96.0.6", "ports": [{"name": "a", "port": 80}, {"name": "b", "port": 81}]}),
    );
    let one = svc(
        "p",
        json!({"clusterIP": "10.96.0.6", "ports": [{"name": "a", "port": 80}]}),
    );
    let mut st = state_with(vec![SourceEvent::ServiceUpsert(two)]);
    let (mut d, _) = DesiredState::rebuild(&st, &cfg());
    st.apply(SourceEvent::ServiceUpsert(one));
    let (touched, _) = d.update_service(&st, &k, &cfg());
    assert!(touched.contains(&fe("10.96.0.6", 81, Proto::Tcp)));
    assert_eq!(d.by_service[&k], vec![fe("10.96.0.6", 80, Proto::Tcp)]);
}

#[test]
fn conflicting_frontend_stays_with_its_owner_and_passes_on_when_released() {
    let shared = fe("10.96.0.7", 80, Proto::Tcp);
    let mut st = state_with(vec![
        SourceEvent::ServiceUpsert(cluster_svc("b-owner", "10.96.0.7")),
        SourceEvent::SliceUpsert(simple_slice("a-1", "a-late", &["10.244.0.2"])),
    ]);
    let (mut d, p) = DesiredState::rebuild(&st, &cfg());
    assert!(p.is_empty());
    // "a-late" sorts first but arrives later: the existing owner keeps the frontend.
    st.apply(SourceEvent::ServiceUpsert(cluster_svc(
        "a-late",
        "10.96.0.7",
    )));
    let (touched, p) = d.update_service(&st, &key("default", "a-late"), &cfg());
    assert!(touched.is_empty());
    assert_eq!(p.len(), 1);
    assert_eq!(
        (p[0].kind, p[0].object.as_str()),
        ("frontend_conflict", "default/a-late")
    );
    assert_eq!(d.frontends[&shared].service, key("default", "b-owner"));
    // The owner goes: the waiting Service gets the frontend, with its own endpoints.
    st.apply(SourceEvent::ServiceDelete {
        namespace: "default".into(),
        name: "b-owner".into(),
    });
    let (touched, p) = d.update_service(&st, &key("default", "b-owner"), &cfg());
    assert!(p.is_empty(), "{p:?}");
    assert_eq!(touched, vec![shared]);
    assert_eq!(d.frontends[&shared].service, key("default", "a-late"));
    assert_eq!(d.frontends[&shared].backends, vec![be("10.244.0.2", 9376)]);
    assert_eq!(
        d.by_service.keys().cloned().collect::<Vec<_>>(),
        vec![key("default", "a-late")]
    );
}

#[test]
fn shared_backend_is_active_if_any_frontend_uses_it_as_ready() {
    let draining = |name: &str, svc: &str| {
        slice(
            name,
            svc,
            json!([{"port": 9376}]),
            json!([ep_cond(
                "10.244.0.1",
                Some(false),
                Some(true),
                Some(true),
                "node-b"
            )]),
        )
    };
    let mut st = state_with(vec![
        SourceEvent::ServiceUpsert(cluster_svc("x", "10.96.0.8")),
        SourceEvent::ServiceUpsert(cluster_svc("y", "10.96.0.9")),
        SourceEvent::SliceUpsert(draining("x-1", "x")),
        SourceEvent::SliceUpsert(draining("y-1", "y")),
    ]);
    let (mut d, _) = DesiredState::rebuild(&st, &cfg());
    let b = be("10.244.0.1", 9376);
    assert_eq!(d.backend_state(&b), Some(BACKEND_TERMINATING));
    // publishNotReadyAddresses on y: its slice calls the same pod ready.
    st.apply(SourceEvent::SliceUpsert(simple_slice(
        "y-1",
        "y",
        &["10.244.0.1"],
    )));
    d.update_service(&st, &key("default", "y"), &cfg());
    assert_eq!(d.backend_state(&b), Some(BACKEND_ACTIVE));
    st.apply(SourceEvent::ServiceDelete {
        namespace: "default".into(),
        name: "y".into(),
    });
    d.update_service(&st, &key("default", "y"), &cfg());
    assert_eq!(d.backend_state(&b), Some(BACKEND_TERMINATING));
    st.apply(SourceEvent::ServiceDelete {
        namespace: "default".into(),
        name: "x".into(),
    });
    d.update_service(&st, &key("default", "x"), &cfg());
    assert_eq!(d.backend_state(&b), None);
}

#[test]
fn rebuild_matches_incremental_updates() {
    let events = vec![
        SourceEvent::ServiceUpsert(cluster_svc("a", "10.96.0.1")),
        SourceEvent::ServiceUpsert(svc(
            "b",
            json!({"type": "NodePort", "clusterIP": "10.96.0.2",
            "ports": [{"port": 80, "nodePort": 30002}, {"name": "u", "port": 53, "protocol": "UDP"}]}),
        )),
        SourceEvent::SliceUpsert(simple_slice("a-1", "a", &["10.244.0.1", "10.244.0.2"])),
        SourceEvent::SliceUpsert(simple_slice("b-1", "b", &["10.244.0.3"])),
    ];
    let mut st = ClusterState {
        node: node(),
        ..Default::default()
    };
    let mut d = DesiredState::default();
    for e in events {
        let c = st.apply(e);
        for k in &c.services {
            d.update_service(&st, k, &cfg());
        }
    }
    let (fresh, _) = DesiredState::rebuild(&st, &cfg());
    assert_eq!(d.frontends, fresh.frontends);
    assert_eq!(d.by_service, fresh.by_service);
    let flags: BTreeSet<u32> = d.frontends.values().map(|f| f.flags).collect();
    assert_eq!(
        flags,
        BTreeSet::from([SVC_FLAG_CLUSTER_IP, SVC_FLAG_NODE_PORT])
    );
}

#[test]
fn backend_is_local_if_a_frontend_using_it_says_it_runs_on_this_node() {
    let on = |node: &str| {
        slice(
            "x-1",
            "x",
            json!([{"port": 9376}]),
            json!([ep_cond("10.244.0.1", None, None, None, node)]),
        )
    };
    let mut st = state_with(vec![
        SourceEvent::ServiceUpsert(cluster_svc("x", "10.96.0.8")),
        SourceEvent::ServiceUpsert(cluster_svc("y", "10.96.0.9")),
        SourceEvent::SliceUpsert(on(NODE)),
        SourceEvent::SliceUpsert(simple_slice("y-1", "y", &["10.244.0.1"])),
    ]);
    let (mut d, _) = DesiredState::rebuild(&st, &cfg());
    let b = be("10.244.0.1", 9376);
    // y's slice names no node; x's says this one: local wins (slices being rewritten).
    assert_eq!(d.backend_state(&b), Some(BACKEND_ACTIVE | BACKEND_F_LOCAL));
    st.apply(SourceEvent::SliceUpsert(on("node-b")));
    d.update_service(&st, &key("default", "x"), &cfg());
    assert_eq!(d.backend_state(&b), Some(BACKEND_ACTIVE));
    st.apply(SourceEvent::SliceUpsert(on(NODE)));
    d.update_service(&st, &key("default", "x"), &cfg());
    assert_eq!(d.backend_state(&b), Some(BACKEND_ACTIVE | BACKEND_F_LOCAL));
    // The node loses its name: nothing is local any more.
    let c = st.apply(SourceEvent::Node(lb_model::NodeInfo {
        name: String::new(),
        addresses: vec![NODE_IP],
    }));
    assert!(c.all);
    let (d, _) = DesiredState::rebuild(&st, &cfg());
    assert_eq!(d.backend_state(&b), Some(BACKEND_ACTIVE));
}

/// A NodePort Service "name" with ClusterIP `ip` on nodePort 30080, Local or not.
fn node_port_svc(name: &str, ip: &str, local: bool) -> SourceEvent {
    SourceEvent::ServiceUpsert(svc(
        name,
        json!({"type": "NodePort", "clusterIP": ip,
               "externalTrafficPolicy": if local { "Local" } else { "Cluster" },
               "ports": [{"port": 80, "nodePort": 30080}]}),
    ))
}

#[test]
fn both_scopes_of_a_frontend_belong_to_one_service() {
    let ext = fe("192.168.1.10", 30080, Proto::Tcp);
    let int = ext.with_scope(SCOPE_INT);
    // "a" (Cluster) holds the NodePort; "b" (Local) wants both scopes of it and gets neither,
    // not the SCOPE_INT entry alone.
    let mut st = state_with(vec![
        node_port_svc("a", "10.96.0.1", false),
        node_port_svc("b", "10.96.0.2", true),
        SourceEvent::SliceUpsert(simple_slice("a-1", "a", &["10.244.0.1"])),
        SourceEvent::SliceUpsert(simple_slice("b-1", "b", &["10.244.0.2"])),
    ]);
    let (mut d, p) = DesiredState::rebuild(&st, &cfg());
    assert_eq!(
        p.len(),
        1,
        "one problem per (address, port, protocol): {p:?}"
    );
    assert_eq!(p[0].kind, "frontend_conflict");
    assert_eq!(d.frontends[&ext].service, key("default", "a"));
    assert!(!d.frontends.contains_key(&int));
    // "a" turns Local: it takes both scopes (the SCOPE_INT entry its master points pods at is
    // its own, never b's).
    st.apply(node_port_svc("a", "10.96.0.1", true));
    let (touched, _) = d.update_service(&st, &key("default", "a"), &cfg());
    assert!(touched.contains(&ext) && touched.contains(&int));
    assert_eq!(d.frontends[&ext].service, key("default", "a"));
    assert_eq!(d.frontends[&int].service, key("default", "a"));
    assert_eq!(d.frontends[&int].backends, vec![be("10.244.0.1", 9376)]);
    // "a" goes: "b" gets both scopes, with its endpoints.
    st.apply(SourceEvent::ServiceDelete {
        namespace: "default".into(),
        name: "a".into(),
    });
    let (touched, p) = d.update_service(&st, &key("default", "a"), &cfg());
    assert!(p.is_empty(), "{p:?}");
    assert!(touched.contains(&ext) && touched.contains(&int));
    for f in [ext, int] {
        assert_eq!(d.frontends[&f].service, key("default", "b"));
    }
    assert_eq!(d.frontends[&int].backends, vec![be("10.244.0.2", 9376)]);
    // "b" turns Cluster: the SCOPE_INT entry goes with the policy.
    st.apply(node_port_svc("b", "10.96.0.2", false));
    let (touched, _) = d.update_service(&st, &key("default", "b"), &cfg());
    assert!(touched.contains(&int));
    assert!(!d.frontends.contains_key(&int));
    let (fresh, _) = DesiredState::rebuild(&st, &cfg());
    assert_eq!(d.frontends, fresh.frontends);
}

#[test]
fn config_defaults_to_every_node_address_and_the_api_servers_node_port_range() {
    let c = lb_model::Config::default();
    assert_eq!(c.service_proxy_name.as_deref(), Some("xlb"));
    assert!(c.nodeport_addresses.is_empty());
    assert_eq!(c.nodeport_range, (30000, 32767));
    assert_eq!(c.nodeport_range, lb_model::state::DEFAULT_NODEPORT_RANGE);
    assert!(c.is_nodeport_address(NODE_IP));
    assert!(c.is_nodeport_in_range(30000) && c.is_nodeport_in_range(32767));
    assert!(!c.is_nodeport_in_range(29999) && !c.is_nodeport_in_range(32768));
    let only = lb_model::Config {
        nodeport_addresses: vec![lb_model::cidr::parse_v4("192.168.1.0/24").unwrap()],
        nodeport_range: (80, 80),
        ..c
    };
    assert!(only.is_nodeport_address(NODE_IP));
    assert!(!only.is_nodeport_address("10.0.0.10".parse().unwrap()));
    assert!(only.is_nodeport_in_range(80) && !only.is_nodeport_in_range(81));
}

/// Compaction drops only what no rule reads: the desired state is the same, an upsert of the
/// full object after the compact one is no change, and the dropped parts are gone.
#[test]
fn compacted_objects_give_the_same_frontends_and_compare_equal() {
    use k8s_openapi::api::core::v1::ObjectReference;
    let mut full = simple_slice("web-1", "web", &["10.244.1.5", "10.244.2.7"]);
    for ep in full.endpoints.iter_mut().flatten() {
        ep.target_ref = Some(ObjectReference {
            kind: Some("Pod".into()),
            name: Some("pod-x".into()),
            namespace: Some("default".into()),
            ..Default::default()
        });
        ep.hostname = Some("pod-x".into());
    }
    let svc = cluster_svc("web", "10.96.0.10");
    let plain = state_with(vec![
        SourceEvent::ServiceUpsert(svc.clone()),
        SourceEvent::SliceUpsert(simple_slice("web-1", "web", &["10.244.1.5", "10.244.2.7"])),
    ]);
    let mut st = state_with(vec![
        SourceEvent::ServiceUpsert(svc),
        SourceEvent::SliceUpsert(full.clone()),
    ]);
    let kept = st
        .slices_of(&plain.services.keys().next().unwrap().clone())
        .next()
        .unwrap()
        .clone();
    // The state keeps what the rules read: addresses, conditions, node names.
    assert_eq!(
        kept.endpoints
            .iter()
            .map(|e| e.addr.to_string())
            .collect::<Vec<_>>(),
        ["10.244.1.5", "10.244.2.7"]
    );
    assert_eq!(
        DesiredState::rebuild(&st, &cfg()).0.frontends,
        DesiredState::rebuild(&plain, &cfg()).0.frontends
    );
    // The same full object again changes nothing.
    assert!(st.apply(SourceEvent::SliceUpsert(full)).services.is_empty());
}
