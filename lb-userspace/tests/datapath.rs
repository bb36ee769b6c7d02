//! The datapath driver against real, pinned BPF maps (root, bpffs at /sys/fs/bpf).
//!
//! What it proves: a restarted agent reads the maps back exactly as the previous one left them,
//! so its first plan writes nothing (no flush, no disturbance); `xlb inspect` reads the same
//! through the same read-back; and a full map is reported per frontend while the frontend keeps
//! its previous, consistent state, and the next plan completes it once there is room.
//!
//! Run: `cargo test -p lb-userspace --test datapath -- --include-ignored` (as root).

mod common;
use common::Pins;

use std::collections::BTreeSet;

use lb_model::planner::{all_frontends, plan};
use lb_model::{yaml_docs, ClusterState, Config, DesiredState, SourceEvent};
use lb_userspace::datapath::{Datapath, MapSizes, PinnedMaps};

fn manifests(n: usize, endpoints: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        s += &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec:\n  clusterIP: 10.96.{}.{}\n  \
             sessionAffinity: {}\n  ports: [{{name: http, port: 80, targetPort: web}}, {{name: dns, protocol: UDP, port: 53}}]\n---\n",
            i / 250,
            i % 250 + 1,
            if i % 2 == 0 { "ClientIP" } else { "None" },
        );
        s += &format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s{i}-x\n  labels: {{kubernetes.io/service-name: s{i}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}, {{name: dns, protocol: UDP, port: 5353}}]\nendpoints:\n"
        );
        for e in 0..endpoints {
            s += &format!("- addresses: [10.244.{}.{}]\n  conditions: {{ready: {}}}\n", e / 200, e % 200 + 1, e != 1);
        }
        s += "---\n";
    }
    s
}

fn desired_from(text: &str) -> DesiredState {
    let parsed = yaml_docs::parse("test", text);
    assert!(parsed.problems.is_empty(), "{:?}", parsed.problems);
    let mut state = ClusterState::default();
    state.apply(SourceEvent::Resync { services: Some(parsed.services), slices: Some(parsed.slices) });
    state.apply(SourceEvent::Synced);
    let (d, problems) = DesiredState::rebuild(&state, &Config::default());
    assert!(problems.is_empty(), "{problems:?}");
    d
}

#[test]
#[ignore = "needs root"]
fn restart_reads_back_exactly_and_plans_nothing() {
    let pins = Pins::new("dp", "restart");
    let desired = desired_from(&manifests(20, 4));
    let mut applied = {
        let mut dp = Datapath::open(&pins.0, &MapSizes::default()).expect("open datapath");
        let mut applied = dp.read_applied().unwrap();
        assert!(applied.frontends.is_empty(), "fresh pins must start empty");
        let p = plan(&applied, &desired, &all_frontends(&applied, &desired));
        let report = dp.execute(&p, &mut applied);
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(applied.frontends.len(), 40);
        applied
    }; // the first "agent" is gone; the maps stay pinned

    let mut dp = Datapath::open(&pins.0, &MapSizes::default()).expect("reopen datapath");
    let mut read = dp.read_applied().unwrap();
    assert_eq!(read.frontends, applied.frontends);
    assert_eq!(read.backends, applied.backends);
    assert_eq!(read.rev_nat, applied.rev_nat, "frontend ids come back from the masters");
    let p = plan(&read, &desired, &all_frontends(&read, &desired));
    assert!(p.is_empty(), "a restart must not rewrite anything: {p:?}");

    // And what inspect reads from the pins agrees (one not-ready endpoint of 4 per port).
    let mut maps = PinnedMaps::open(&pins.0).unwrap();
    assert_eq!(maps.applied().unwrap(), applied);
    let rows = lb_userspace::inspect::services(&mut maps).unwrap();
    assert_eq!(rows.len(), 40);
    assert!(rows.iter().all(|r| r.count == 3 && r.backends.iter().all(|b| b.state == "active")));
    assert!(rows.iter().any(|r| r.port == 53 && r.backends.iter().all(|b| b.port == Some(5353))));

    // Removing everything leaves empty maps.
    let empty = DesiredState::default();
    let p = plan(&read, &empty, &all_frontends(&read, &empty));
    let report = dp.execute(&p, &mut read);
    assert!(report.is_clean(), "{report:?}");
    assert!(read.frontends.is_empty() && read.backends.is_empty() && read.rev_nat.is_empty(), "{read:?}");
    assert_eq!(maps.services.keys().count(), 0);
    assert_eq!(maps.backends.keys().count(), 0);
    applied = read;
    let _ = applied;
}

#[test]
#[ignore = "needs root"]
fn full_services_map_is_reported_and_leaves_frontends_consistent() {
    let pins = Pins::new("dp", "full");
    // 10 Services x 2 ports x (1 master + 3 slots) = 80 entries; the map holds 50.
    let sizes = MapSizes { services: 50, ..MapSizes::default() };
    let mut dp = Datapath::open(&pins.0, &sizes).expect("open datapath");
    let desired = desired_from(&manifests(10, 4));
    let mut applied = dp.read_applied().unwrap();
    let p = plan(&applied, &desired, &all_frontends(&applied, &desired));
    let report = dp.execute(&p, &mut applied);
    assert!(!report.failed.is_empty(), "a full map must be reported");
    let failed: BTreeSet<_> = report.failed.iter().map(|(fe, _)| *fe).collect();
    // No half-written Service: every master in the map has all its slots and backends.
    let mut maps = PinnedMaps::open(&pins.0).unwrap();
    let rows = lb_userspace::inspect::services(&mut maps).unwrap();
    assert!(!rows.is_empty());
    for r in &rows {
        assert_eq!(r.backends.len() as u32, r.count);
        assert!(r.backends.iter().all(|b| b.state == "active"), "{r:?}");
    }
    // Failed frontends have no master (they were new), and applied is exactly what the maps hold.
    for fe in &failed {
        assert!(!rows.iter().any(|r| r.addr == fe.addr && r.port == fe.port && r.proto == fe.proto.to_string()));
    }
    assert_eq!(dp.read_applied().unwrap(), applied);

    // Half the Services go: now everything fits. The plan removes and adds in frontend order,
    // so a frontend may still meet a full map before the removals; the agent's retry of the
    // failed frontends completes it.
    let desired = desired_from(&manifests(5, 4));
    let p = plan(&applied, &desired, &all_frontends(&applied, &desired));
    let mut report = dp.execute(&p, &mut applied);
    if !report.failed.is_empty() {
        let retry: BTreeSet<_> = report.failed.iter().map(|(fe, _)| *fe).collect();
        report = dp.execute(&plan(&applied, &desired, &retry), &mut applied);
    }
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(applied.frontends.len(), 10);
    assert_eq!(dp.read_applied().unwrap(), applied);
    assert!(plan(&applied, &desired, &all_frontends(&applied, &desired)).is_empty());
}
