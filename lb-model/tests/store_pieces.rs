//! The executor over a store that takes its batches in pieces ([`MapStore::write_pieces`], as
//! lb-userspace's pipelined store does): the same writes in the same order, the same report,
//! the same maps and the same `applied` as with whole batches, whichever write fails.

mod common;

use std::collections::BTreeSet;

use common::*;
use lb_model::planner::{all_frontends, plan};
use lb_model::store::{execute, ExecReport, FaultStore, MapWrite, MemStore};
use lb_model::{Applied, ClusterState, DesiredState, ReadBack, SourceEvent};

/// Services `s0..s{n}` with `eps` ready pods each.
fn desired(n: usize, eps: usize) -> DesiredState {
    let mut state = ClusterState {
        node: node(),
        ..Default::default()
    };
    for i in 0..n {
        let name = format!("s{i}");
        state.apply(SourceEvent::ServiceUpsert(cluster_svc(
            &name,
            &format!("10.96.0.{}", i + 1),
        )));
        let ips: Vec<String> = (0..eps).map(|k| format!("10.244.{i}.{}", k + 1)).collect();
        let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
        state.apply(SourceEvent::SliceUpsert(simple_slice(
            &format!("{name}-1"),
            &name,
            &ips,
        )));
    }
    DesiredState::rebuild(&state, &cfg()).0
}

type Outcome = (Vec<MapWrite>, ExecReport, MemStore, Applied);

/// Execute the plan of `d` from empty maps, write number `fail` failing, in pieces of
/// `piece` writes (0: whole batches); the writes offered, in order.
fn run(d: &DesiredState, fail: usize, piece: usize) -> Outcome {
    use std::cell::RefCell;
    use std::rc::Rc;
    let seen = Rc::new(RefCell::new(Vec::new()));
    let log = seen.clone();
    let mut applied = Applied::default();
    let mut maps = MemStore::default();
    let p = plan(&applied, d, &all_frontends(&applied, d));
    let mut store = FaultStore::new(&mut maps, move |n, w| {
        log.borrow_mut().push(w.clone());
        n == fail
    })
    .in_pieces(piece);
    let report = execute(&mut store, &p, &mut applied);
    let seen = seen.borrow().clone();
    (seen, report, maps, applied)
}

#[test]
fn pieces_change_nothing_whichever_write_fails() {
    let d = desired(6, 3);
    let (all, report, maps, applied) = run(&d, usize::MAX, 0);
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(ReadBack::read(&maps).unwrap(), applied);
    for fail in 0..all.len() + 1 {
        let whole = run(&d, fail, 0);
        for piece in [1, 2, 5] {
            let pieces = run(&d, fail, piece);
            assert_eq!(
                pieces.0, whole.0,
                "writes offered, write {fail} failing, pieces of {piece}"
            );
            assert_eq!(
                pieces.1, whole.1,
                "report, write {fail} failing, pieces of {piece}"
            );
            assert_eq!(
                pieces.2, whole.2,
                "maps, write {fail} failing, pieces of {piece}"
            );
            assert_eq!(
                pieces.3, whole.3,
                "applied, write {fail} failing, pieces of {piece}"
            );
            assert_eq!(ReadBack::read(&pieces.2).unwrap(), pieces.3);
        }
    }
    // And a retry of whatever failed completes the maps, in pieces too.
    let (_, report, mut maps, mut applied) = run(&d, 7, 2);
    assert!(!report.is_clean());
    let retry: BTreeSet<_> = report.failed.iter().map(|(fe, _)| *fe).collect();
    let p = plan(&applied, &d, &retry);
    let mut store = FaultStore::new(&mut maps, |_, _| false).in_pieces(2);
    assert!(execute(&mut store, &p, &mut applied).is_clean());
    assert_eq!(ReadBack::read(&maps).unwrap(), applied);
}
