//! lb_kube::run with a real kube::Client against the fake apiserver over real HTTP.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::*;
use lb_fakeapi::{FakeApi, Kind};
use lb_model::SourceEvent;

fn populated() -> FakeApi {
    let api = FakeApi::bind_local().unwrap();
    api.upsert(&service("default", "web", "10.96.0.10", 80))
        .unwrap();
    api.upsert(&service("shop", "cart", "10.96.0.11", 8080))
        .unwrap();
    api.upsert(&slice(
        "default",
        "web-abc",
        "web",
        &["10.244.1.10", "10.244.1.11"],
    ))
    .unwrap();
    api.upsert(&node(NODE, "192.168.1.10")).unwrap();
    api.upsert(&node("node-2", "192.168.1.11")).unwrap();
    api
}

fn is_svc_upsert(ev: &SourceEvent, name: &str) -> bool {
    matches!(ev, SourceEvent::ServiceUpsert(s) if s.metadata.name.as_deref() == Some(name))
}

#[tokio::test]
async fn initial_sync_sends_one_resync_per_kind_then_synced() {
    let mut h = Harness::start(populated()).await;
    let evs = h.synced().await;
    let svc: Vec<_> = evs.iter().filter_map(resync_services).collect();
    let sl: Vec<_> = evs.iter().filter_map(resync_slices).collect();
    assert_eq!(
        svc,
        [vec!["default/web".to_string(), "shop/cart".into()]],
        "{}",
        describe_all(&evs)
    );
    assert_eq!(sl, [vec!["default/web-abc".to_string()]]);
    let nodes: Vec<_> = evs
        .iter()
        .filter_map(|e| {
            if let SourceEvent::Node(n) = e {
                Some(n.clone())
            } else {
                None
            }
        })
        .collect();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].name, NODE);
    assert_eq!(nodes[0].addresses, [Ipv4Addr::new(192, 168, 1, 10)]);
    assert!(matches!(evs.last(), Some(SourceEvent::Synced)));
    assert_eq!(evs.len(), 4, "{}", describe_all(&evs));

    // What kube-runtime asked for: paged lists of everything, and only this node.
    let reqs = h.api.requests();
    assert!(
        reqs.iter()
            .any(|r| r.starts_with("GET /api/v1/services?") && r.contains("limit=500")),
        "{reqs:?}"
    );
    assert!(reqs
        .iter()
        .any(|r| r.starts_with("GET /apis/discovery.k8s.io/v1/endpointslices?")));
    assert!(reqs.iter().any(|r| r.starts_with("GET /api/v1/nodes?")
        && r.contains("fieldSelector=metadata.name%3Dnode-1")));
    // Nothing more without changes (bookmarks flow every 300 ms but produce no events).
    let extra = h.quiet_for(Duration::from_millis(1000)).await;
    assert!(extra.is_empty(), "{}", describe_all(&extra));
    // The watches start after the lists, from the lists' resourceVersion.
    let reqs = h.api.requests();
    let watches: Vec<_> = reqs.iter().filter(|r| r.contains("watch=true")).collect();
    assert_eq!(watches.len(), 3, "{reqs:?}");
    assert!(watches
        .iter()
        .all(|r| r.contains("allowWatchBookmarks=true") && r.contains("resourceVersion=")));
}

#[tokio::test]
async fn paged_initial_list_is_one_resync() {
    let api = FakeApi::bind_local().unwrap();
    for i in 0..1100 {
        api.upsert(&service("bulk", &format!("s{i:04}"), "10.96.1.1", 80))
            .unwrap();
    }
    let mut h = Harness::start(api).await;
    let evs = h.synced().await;
    let svc: Vec<_> = evs.iter().filter_map(resync_services).collect();
    assert_eq!(svc.len(), 1);
    assert_eq!(svc[0].len(), 1100);
    let pages = h
        .api
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/services?") && !r.contains("watch=true"))
        .count();
    assert_eq!(pages, 3, "limit=500 -> three pages");
}

#[tokio::test]
async fn changes_become_upserts_and_deletes() {
    let mut h = Harness::start(populated()).await;
    h.synced().await;

    h.api
        .upsert(&service("default", "new", "10.96.0.12", 443))
        .unwrap();
    let (ev, _) = h.until("new Service", |e| is_svc_upsert(e, "new")).await;
    let SourceEvent::ServiceUpsert(s) = ev else {
        unreachable!()
    };
    assert_eq!(s.spec.unwrap().ports.unwrap()[0].port, 443);

    h.api
        .upsert(&service("default", "new", "10.96.0.12", 8443))
        .unwrap();
    let (ev, _) = h
        .until("modified Service", |e| is_svc_upsert(e, "new"))
        .await;
    let SourceEvent::ServiceUpsert(s) = ev else {
        unreachable!()
    };
    assert_eq!(s.spec.unwrap().ports.unwrap()[0].port, 8443);

    h.api.delete(Kind::Service, "default", "new").unwrap();
    h.until("Service delete", |e| matches!(e, SourceEvent::ServiceDelete { namespace, name } if namespace == "default" && name == "new")).await;

    h.api
        .upsert(&slice("default", "web-abc", "web", &["10.244.1.10"]))
        .unwrap();
    let (ev, _) = h
        .until("slice update", |e| matches!(e, SourceEvent::SliceUpsert(_)))
        .await;
    let SourceEvent::SliceUpsert(s) = ev else {
        unreachable!()
    };
    assert_eq!(s.endpoints.map(|e| e.len()), Some(1));

    h.api
        .delete(Kind::EndpointSlice, "default", "web-abc")
        .unwrap();
    h.until(
        "slice delete",
        |e| matches!(e, SourceEvent::SliceDelete { name, .. } if name == "web-abc"),
    )
    .await;

    // Another node changing is not our business; ours is.
    h.api.upsert(&node("node-2", "192.168.1.99")).unwrap();
    h.api.upsert(&node(NODE, "192.168.1.20")).unwrap();
    let (ev, before) = h
        .until("node update", |e| matches!(e, SourceEvent::Node(_)))
        .await;
    assert!(before.is_empty(), "{}", describe_all(&before));
    let SourceEvent::Node(n) = ev else {
        unreachable!()
    };
    assert_eq!(n.addresses, [Ipv4Addr::new(192, 168, 1, 20)]);
}

#[tokio::test]
async fn gone_after_compaction_relists_each_kind() {
    let mut h = Harness::start(populated()).await;
    h.synced().await;
    // Every version the client holds expires; watches end and resume from an expired version.
    h.api.compact();
    h.api.drop_watches();
    // Both kinds relist, in whichever order their watches notice.
    let (mut services, mut slices) = (None, None);
    while services.is_none() || slices.is_none() {
        let ev = h.next().await;
        services = services.or(resync_services(&ev));
        slices = slices.or(resync_slices(&ev));
    }
    assert_eq!(services.unwrap(), ["default/web", "shop/cart"]);
    assert_eq!(slices.unwrap(), ["default/web-abc"]);
    let errors = &h.api_errors;
    assert!(
        errors
            .iter()
            .any(|(k, e)| k == "Service" && e.contains("too old resource version")),
        "{errors:?}"
    );

    // Changes made while the client could not watch show up in the relist.
    h.api.stop().await;
    h.api.compact();
    h.api.delete(Kind::Service, "shop", "cart").unwrap();
    h.api
        .upsert(&service("shop", "checkout", "10.96.0.13", 80))
        .unwrap();
    h.api.start().unwrap();
    let (ev, _) = h
        .until("Services resync after restart", |e| {
            resync_services(e).is_some()
        })
        .await;
    assert_eq!(
        resync_services(&ev).unwrap(),
        ["default/web", "shop/checkout"]
    );
    // No second Synced: the agent is synced already.
    let extra = h.quiet_for(Duration::from_millis(2500)).await;
    assert!(
        !extra.iter().any(|e| matches!(e, SourceEvent::Synced)),
        "{}",
        describe_all(&extra)
    );
}

#[tokio::test]
async fn dropped_watches_resume_without_losing_updates_or_relisting() {
    let mut h = Harness::start(populated()).await;
    h.synced().await;
    for i in 0..5 {
        h.api.drop_watches();
        let name = format!("after-drop-{i}");
        h.api
            .upsert(&service("default", &name, "10.96.0.20", 80))
            .unwrap();
        let (_, before) = h
            .until("update after dropped watch", |e| is_svc_upsert(e, &name))
            .await;
        assert!(before.is_empty(), "{}", describe_all(&before));
    }
    let lists = h
        .api
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/services?") && !r.contains("watch=true"))
        .count();
    assert_eq!(lists, 1, "a resumed watch does not relist");
}

#[tokio::test]
async fn server_restart_mid_stream_recovers_and_replays_missed_changes() {
    let mut h = Harness::start(populated()).await;
    h.synced().await;
    h.api.stop().await;
    // Changes while the server is down (the store survives, as etcd would).
    h.api
        .upsert(&service("default", "while-down", "10.96.0.30", 80))
        .unwrap();
    h.api.delete(Kind::Service, "shop", "cart").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = h.drain_now();
    assert!(
        during.is_empty(),
        "no cluster events while the API is away: {}",
        describe_all(&during)
    );
    h.api.start().unwrap();
    h.until("replayed upsert", |e| is_svc_upsert(e, "while-down"))
        .await;
    h.until(
        "replayed delete",
        |e| matches!(e, SourceEvent::ServiceDelete { name, .. } if name == "cart"),
    )
    .await;
    assert!(
        !h.api_errors.is_empty(),
        "the outage was sent as API errors"
    );
    // And the stream keeps working afterwards.
    h.api
        .upsert(&service("default", "after", "10.96.0.31", 80))
        .unwrap();
    h.until("update after restart", |e| is_svc_upsert(e, "after"))
        .await;
}

#[tokio::test]
async fn slow_responses_still_sync_and_stream() {
    let api = populated();
    api.set_delay(Duration::from_millis(1500));
    let mut h = Harness::start(api).await;
    let started = tokio::time::Instant::now();
    let evs = h.synced().await;
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(evs.iter().filter_map(resync_services).count(), 1);
    h.api
        .upsert(&service("default", "slow", "10.96.0.40", 80))
        .unwrap();
    h.until("update with slow server", |e| is_svc_upsert(e, "slow"))
        .await;
}

#[tokio::test]
async fn bad_object_is_reported_and_others_keep_flowing() {
    let api = populated();
    let mut bad = service("default", "bad", "10.96.0.50", 80);
    bad["spec"]["ports"] = serde_json::json!("eighty");
    api.upsert(&bad).unwrap();
    let mut h = Harness::start(api).await;
    let evs = h.synced().await;
    let svc: Vec<_> = evs.iter().filter_map(resync_services).collect();
    assert_eq!(
        svc,
        [vec!["default/web".to_string(), "shop/cart".into()]],
        "the bad one is left out, the rest listed"
    );
    assert_eq!(h.problems.len(), 1, "{:?}", h.problems);
    assert_eq!(h.problems[0].object, "default/bad");
    assert_eq!(h.problems[0].kind, "parse");

    // Fixing it makes it appear; breaking a good one removes it; others keep flowing.
    h.api
        .upsert(&service("default", "bad", "10.96.0.50", 80))
        .unwrap();
    h.until("fixed object", |e| is_svc_upsert(e, "bad")).await;
    let mut broken = service("default", "web", "10.96.0.10", 80);
    broken["spec"]["ports"] = serde_json::json!(42);
    h.api.upsert(&broken).unwrap();
    h.until(
        "broken object removed",
        |e| matches!(e, SourceEvent::ServiceDelete { name, .. } if name == "web"),
    )
    .await;
    h.api
        .upsert(&service("default", "later", "10.96.0.51", 80))
        .unwrap();
    h.until("later object", |e| is_svc_upsert(e, "later")).await;
    assert_eq!(h.problems.len(), 2, "{:?}", h.problems);
}

#[tokio::test]
async fn missing_node_still_syncs_with_the_node_name() {
    let api = FakeApi::bind_local().unwrap();
    api.upsert(&service("default", "web", "10.96.0.10", 80))
        .unwrap();
    let mut h = Harness::start(api).await;
    let evs = h.synced().await;
    assert!(evs
        .iter()
        .any(|e| matches!(e, SourceEvent::Node(n) if n.name == NODE && n.addresses.is_empty())));
    h.api.upsert(&node(NODE, "192.168.1.10")).unwrap();
    h.until(
        "node appears",
        |e| matches!(e, SourceEvent::Node(n) if n.addresses == [Ipv4Addr::new(192, 168, 1, 10)]),
    )
    .await;
}

#[tokio::test]
async fn closing_the_channel_ends_run() {
    let api = populated();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    api.write_kubeconfig(&path).unwrap();
    let client = lb_kube::client_from_kubeconfig(Some(&path)).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<lb_kube::Event>(1);
    drop(rx);
    let r = tokio::time::timeout(WAIT, lb_kube::run(client, NODE.into(), tx)).await;
    assert!(matches!(r, Ok(Ok(()))));
}
