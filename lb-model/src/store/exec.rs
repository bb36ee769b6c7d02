//! The executor: a [`Plan`] written into a [`MapStore`] in the planner's order.

use std::collections::BTreeSet;

use super::{MapStore, MapWrite};
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
pub fn execute<S: MapStore + ?Sized>(
    store: &mut S,
    plan: &Plan,
    applied: &mut Applied,
) -> ExecReport {
    let mut report = ExecReport::default();
    // Entries the planner left out (no free Maglev table): nothing of them is written.
    report.failed.extend(plan.unplanned.iter().cloned());
    let mut write = |op: &MapOp, applied: &mut Applied| -> Result<(), String> {
        tracing::debug!(?op, "map op");
        if let MapOp::PutMaglevTable { table, .. } = op {
            // Half-written if the write fails: its old content is no longer known.
            applied.forget_table(*table);
        }
        MapWrite::of(op)
            .apply_to(store)
            .map_err(|e| format!("{op:?}: {e}"))?;
        applied.apply(op);
        Ok(())
    };
    let mut failed_prepare = Vec::new();
    for op in &plan.prepare {
        match write(op, applied) {
            Ok(()) => report.ops_ok += 1,
            Err(e) => {
                report.prepare_failed.push(e);
                failed_prepare.push(op.clone());
            }
        }
    }
    // A slot or member must never name a backend that was not written: skip those frontends.
    let blocked: BTreeSet<Frontend> = plan.blocked_by(&failed_prepare, applied);
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
    for (fe, ops) in &plan.frontends {
        if blocked.contains(fe) {
            report.failed.push((
                *fe,
                "skipped: a backend it uses could not be written".into(),
            ));
            continue;
        }
        for op in ops {
            match write(op, applied) {
                Ok(()) => report.ops_ok += 1,
                Err(e) => {
                    report.failed.push((*fe, e));
                    break;
                }
            }
        }
    }
    for op in applied.gc() {
        match write(&op, applied) {
            Ok(()) => report.ops_ok += 1,
            Err(e) => tracing::debug!(error = %e, "gc delete failed; the next plan retries it"),
        }
    }
    report
}
