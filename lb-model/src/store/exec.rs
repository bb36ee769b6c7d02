//! The executor: a [`Plan`] written into a [`MapStore`] in the planner's order.

use std::collections::{BTreeMap, BTreeSet};

use super::{BatchClass, MapStore, MapWrite};
use crate::applied::Applied;
use crate::planner::{MapOp, Plan};
use crate::Frontend;
use lb_common::SCOPE_EXT;

/// What executing a plan did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecReport {
    /// Operations written (gc included).
    pub ops_ok: usize,
    /// Frontends whose ops stopped at an error, or were skipped because a backend they need
    /// could not be written; their entries keep their previous, consistent state. Also the
    /// frontends that use a backend whose state change (e.g. its locality) could not be
    /// written although the frontend itself had nothing to write: planning them again queues
    /// the backend write again. An entry names a plan entry, i.e. both scopes of an (address,
    /// port, protocol) by their `SCOPE_EXT` frontend ([`Plan::frontends`]).
    pub failed: Vec<(Frontend, String)>,
    /// Failed prepare ops (backend writes); the frontends using them are in `failed`.
    pub prepare_failed: Vec<String>,
}

impl ExecReport {
    /// Everything was written.
    pub fn is_clean(&self) -> bool {
        self.failed.is_empty() && self.prepare_failed.is_empty()
    }
}

/// Execute `plan` on `store`, strictly in order, recording every op that succeeded in `applied`:
///
/// 0. the plan entries the planner could not plan ([`Plan::unplanned`]) are reported failed;
/// 1. `prepare` (backends, then Maglev tables); a failed one is reported, and the frontends that use it
///    ([`Plan::blocked_by`]) are skipped whole and reported failed, so retrying them writes it
///    again;
/// 2. each frontend's ops; the first failing op stops that frontend only (its master still
///    describes a consistent, older state), and the next plan repairs it;
/// 3. gc ([`Applied::gc`]): backends nothing refers to any more; a failed delete is left for the
///    next plan's gc.
///
/// The planner's order guarantees that after every single write each master's slots
/// `1..=count` name existing backends that are members of the frontend, whichever write fails.
///
/// Batching ([`MapStore::write_batch`], one syscall for thousands of entries): consecutive ops of
/// one [`BatchClass`] go out together. The frontends advance in stages: a frontend's ops are cut
/// into runs of one class (e.g. its MEMBERS puts, then its slots and master, which are all
/// SERVICES puts), and stage `i` writes the `i`-th run of every frontend still going, one batch
/// per class, in plan order. So each frontend's ops are still written strictly in its order (a
/// master after everything it names, within one batch too: the kernel processes keys in
/// order), only interleaved with other frontends', whose entries are independent. A failing
/// write stops its frontend; the writes after it in the batch that belong to other frontends
/// are sent again without it. Each batch goes to [`MapStore::write_pieces`], which may write
/// it piece by piece while the next piece is encoded and the last recorded in `applied`
/// (strictly in order all the same).
pub fn execute<S: MapStore + ?Sized>(
    store: &mut S,
    plan: &Plan,
    applied: &mut Applied,
) -> ExecReport {
    let mut report = ExecReport::default();
    // Entries the planner left out (no free Maglev table): nothing of them is written.
    report.failed.extend(plan.unplanned.iter().cloned());
    // The pre-filter bits of the plan's masters and backends before anything of the plan.
    let filter_blocked =
        crate::fefilter::write_before(store, plan, &mut applied.filter, &mut applied.port_filter);
    let mut failed_prepare = Vec::new();
    write_independent(
        store,
        &plan.prepare,
        applied,
        |op, e| {
            report.prepare_failed.push(e);
            failed_prepare.push(op.clone());
        },
        &mut report.ops_ok,
    );
    // A slot or member must never name a backend that was not written: skip those frontends.
    let mut blocked: BTreeSet<Frontend> = plan.blocked_by(&failed_prepare, applied);
    // Nor may a master be written whose frontend pre-filter bit could not be set.
    blocked.extend(filter_blocked);
    // Frontends without ops that keep a backend whose rewrite failed: report them, so the
    // retry of the failed frontends writes the backend again (nothing else would).
    if !failed_prepare.is_empty() {
        let planned: BTreeSet<Frontend> = plan.frontends.iter().map(|(fe, _)| *fe).collect();
        // Named as a plan entry would be: by the SCOPE_EXT frontend of the two scopes.
        let entries: BTreeSet<Frontend> = applied
            .frontends_using(&failed_prepare)
            .into_iter()
            .map(|fe| {
                let ext = fe.with_scope(SCOPE_EXT);
                if applied.frontends.contains_key(&ext) {
                    ext
                } else {
                    fe
                }
            })
            .filter(|fe| !planned.contains(fe))
            .collect();
        for fe in entries {
            report
                .failed
                .push((fe, "a backend it uses could not be updated".into()));
        }
    }
    // Plan index -> why that frontend stopped (reported in plan order).
    let mut fe_failed: BTreeMap<usize, String> = BTreeMap::new();
    // (plan index, position of its next op) of the frontends still going.
    let mut going: Vec<(usize, usize)> = Vec::new();
    for (i, (fe, ops)) in plan.frontends.iter().enumerate() {
        if blocked.contains(fe) {
            fe_failed.insert(i, "skipped: a backend it uses could not be written".into());
        } else if !ops.is_empty() {
            going.push((i, 0));
        }
    }
    while !going.is_empty() {
        // This stage: the next run of each frontend still going, grouped by class in plan order.
        let mut stage: BTreeMap<BatchClass, Vec<(usize, &MapOp)>> = BTreeMap::new();
        for (i, pos) in &mut going {
            let ops = &plan.frontends[*i].1;
            let class = class_of(&ops[*pos]);
            let mut end = *pos + 1;
            if class != BatchClass::Single {
                while end < ops.len() && class_of(&ops[end]) == class {
                    end += 1;
                }
            }
            let batch = stage.entry(class).or_default();
            batch.extend(ops[*pos..end].iter().map(|op| (*i, op)));
            *pos = end;
        }
        for (_, mut batch) in stage {
            while !batch.is_empty() {
                let (n, err) = write_run(store, batch.len(), |k| batch[k].1, applied);
                report.ops_ok += n;
                let Some(e) = err else { break };
                let dead = batch[n].0;
                fe_failed.insert(dead, e);
                batch = batch.split_off(n + 1);
                batch.retain(|(i, _)| *i != dead);
                going.retain(|(i, _)| *i != dead);
            }
        }
        going.retain(|(i, pos)| *pos < plan.frontends[*i].1.len());
    }
    report
        .failed
        .extend(fe_failed.into_iter().map(|(i, e)| (plan.frontends[i].0, e)));
    let gc = applied.gc();
    write_independent(
        store,
        &gc,
        applied,
        |_, e| tracing::debug!(error = %e, "gc delete failed; the next plan retries it"),
        &mut report.ops_ok,
    );
    report
}

/// Which batch `op` may share.
fn class_of(op: &MapOp) -> BatchClass {
    match op {
        MapOp::PutBackend { .. } => BatchClass::PutBackend,
        MapOp::DeleteBackend { .. } => BatchClass::DeleteBackend,
        MapOp::PutMember { .. } => BatchClass::PutMember,
        MapOp::DeleteMember { .. } => BatchClass::DeleteMember,
        MapOp::PutSlot { .. } | MapOp::PutMaster { .. } => BatchClass::PutService,
        MapOp::DeleteSlot { .. } | MapOp::DeleteMaster { .. } => BatchClass::DeleteService,
        MapOp::PutSvcName { .. } => BatchClass::PutSvcName,
        MapOp::DeleteSvcName { .. } => BatchClass::DeleteSvcName,
        #[allow(unreachable_patterns)]
        _ => BatchClass::Single,
    }
}

/// Write the `len` ops `op(0..len)` (one class, or one `Single` op) as one batch and record
/// the performed ones in `applied`. Returns how many were performed and, when not all, the
/// error of the next one.
///
/// The ops are encoded and recorded piece by piece ([`MapStore::write_pieces`]), so that a
/// store may write one piece while the next is encoded and the last one recorded; the ops
/// are taken by index, so no list of them is collected per batch.
fn write_run<'p, S: MapStore + ?Sized>(
    store: &mut S,
    len: usize,
    op: impl Fn(usize) -> &'p MapOp,
    applied: &mut Applied,
) -> (usize, Option<String>) {
    for i in 0..len {
        let op = op(i);
        tracing::debug!(?op, "map op");
        if let MapOp::PutMaglevTable { table, .. } = op {
            // Half-written if the write fails: its old content is no longer known.
            applied.forget_table(*table);
        }
    }
    let (n, err) = store.write_pieces(
        len,
        &mut |r| r.map(|i| MapWrite::of(op(i))).collect(),
        &mut |r| r.for_each(|i| applied.apply(op(i))),
    );
    let n = n.min(len);
    let err = match err {
        Some(e) if n < len => Some(format!("{:?}: {e}", op(n))),
        _ => None,
    };
    (n, err)
}

/// Write ops that do not depend on each other's success (prepare, gc) in order, consecutive
/// ops of one class in one batch; a failed op is handed to `failed` and the rest go on.
fn write_independent<S: MapStore + ?Sized>(
    store: &mut S,
    ops: &[MapOp],
    applied: &mut Applied,
    mut failed: impl FnMut(&MapOp, String),
    ops_ok: &mut usize,
) {
    let mut start = 0;
    while start < ops.len() {
        let class = class_of(&ops[start]);
        let mut end = start + 1;
        if class != BatchClass::Single {
            while end < ops.len() && class_of(&ops[end]) == class {
                end += 1;
            }
        }
        let run = &ops[start..end];
        let (n, err) = write_run(store, run.len(), |k| &run[k], applied);
        *ops_ok += n;
        match err {
            Some(e) => {
                failed(&ops[start + n], e);
                start += n + 1;
            }
            None => start = end,
        }
    }
}
