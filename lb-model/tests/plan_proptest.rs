//! Property tests of the whole pipeline: random event sequences go through ClusterState,
//! DesiredState and plan, and every plan is run by the shipped executor
//! (`lb_model::store::execute`) on the shipped in-memory store, wrapped in the simulator, which
//! checks after every single write that no Service is half-written: every slot 1..=count of
//! every master names an existing backend that is a member (MEMBERS entry with its address) of
//! the frontend. The simulator also fails when a new backend or master takes an id used before
//! (id quarantine). After each step the maps must equal the desired state exactly (members
//! included), and `Applied` (kept up to date by the executor) must equal what the maps hold,
//! read back by the shipped read-back.
//!
//! The universe has LoadBalancer Services with and without loadBalancerSourceRanges and
//! externalTrafficPolicy Local (two scopes per external frontend, locality of backends, drop
//! without local endpoints), and node renames (an empty name: nothing is local). The
//! simulator also checks after every write that a TWO_SCOPES master has its SCOPE_INT entry,
//! and that a master is flagged SOURCE_RANGES only once its desired ranges are in the trie.
//! Services pick their algorithm by annotation (random, round-robin, Maglev, an invalid value):
//! a Maglev master always names a whole table of members, and no table is written while a
//! master names it.
//!
//! Faults: a fault-injecting store (`FaultStore`) fails writes, either at random or exactly one
//! at a random position of a plan; after each failure every Service is whole, and the agent's
//! next plan (the frontends the executor reported failed) repairs everything.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::sim::World;
use common::*;
use lb_common::{SCOPE_EXT, SCOPE_INT};
use lb_model::desired::service_frontends_of;
use lb_model::planner::{all_frontends, plan};
use lb_model::store::{execute, ExecReport, FaultStore, MapWrite};
use lb_model::{Applied, ClusterState, DesiredState, Frontend, NodeInfo, Plan, SourceEvent};
use proptest::prelude::*;
use serde_json::{json, Value};

const SERVICES: usize = 3;
const SLICES: usize = 4;
const PODS: usize = 6;

/// A compact description of a Service of the small universe the test plays in.
#[derive(Clone, Debug)]
struct SvcSpec {
    node_port: bool,
    /// Index into three cluster IPs: two Services may claim the same one (frontend conflict).
    ip: usize,
    port_a: bool,
    port_b: bool,
    node_port_no: u16,
    affinity: bool,
    itp_local: bool,
    etp_local: bool,
    /// Type LoadBalancer, ingress IP 198.51.100.(ip + 1) (a conflict when two share `ip`).
    lb: bool,
    /// loadBalancerSourceRanges: none, one, two, only invalid / IPv6 ones (fail closed).
    ranges: u8,
    /// `xlb.io/lb-algorithm`: none, round-robin, maglev, an invalid value.
    alg: u8,
}

/// One endpoint: pod index, readiness variant, on this node or not.
#[derive(Clone, Debug)]
struct EpSpec {
    pod: usize,
    cond: u8,
    local: bool,
}

#[derive(Clone, Debug)]
struct SliceSpec {
    owner: usize,
    endpoints: Vec<EpSpec>,
}

#[derive(Clone, Debug)]
enum Ev {
    Svc(usize, SvcSpec),
    SvcDel(usize),
    Slice(usize, SliceSpec),
    SliceDel(usize),
    Resync(Vec<Option<SvcSpec>>, Vec<Option<SliceSpec>>),
    /// A second node address; the node's name (false: empty, nothing is local).
    Node(bool, bool),
}

fn svc_spec() -> impl Strategy<Value = SvcSpec> {
    (
        any::<bool>(),
        0..3usize,
        any::<bool>(),
        any::<bool>(),
        0..2u16,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        0..4u8,
        0..4u8,
    )
        .prop_map(
            |(
                node_port,
                ip,
                port_a,
                port_b,
                np,
                affinity,
                itp_local,
                etp_local,
                lb,
                ranges,
                alg,
            )| {
                SvcSpec {
                    alg,
                    node_port,
                    ip,
                    port_a,
                    port_b,
                    node_port_no: 30080 + np,
                    affinity,
                    itp_local,
                    etp_local,
                    lb,
                    ranges,
                }
            },
        )
}

fn slice_spec() -> impl Strategy<Value = SliceSpec> {
    let ep =
        (0..PODS, 0..4u8, any::<bool>()).prop_map(|(pod, cond, local)| EpSpec { pod, cond, local });
    (0..SERVICES, prop::collection::vec(ep, 0..5))
        .prop_map(|(owner, endpoints)| SliceSpec { owner, endpoints })
}

fn event() -> impl Strategy<Value = Ev> {
    prop_oneof![
        4 => (0..SERVICES, svc_spec()).prop_map(|(i, s)| Ev::Svc(i, s)),
        1 => (0..SERVICES).prop_map(Ev::SvcDel),
        6 => (0..SLICES, slice_spec()).prop_map(|(i, s)| Ev::Slice(i, s)),
        1 => (0..SLICES).prop_map(Ev::SliceDel),
        1 => (
            prop::collection::vec(prop::option::of(svc_spec()), SERVICES),
            prop::collection::vec(prop::option::of(slice_spec()), SLICES)
        )
            .prop_map(|(a, b)| Ev::Resync(a, b)),
        1 => (any::<bool>(), prop::bool::weighted(0.8)).prop_map(|(two, named)| Ev::Node(two, named)),
    ]
}

fn service(i: usize, s: &SvcSpec) -> k8s_openapi::api::core::v1::Service {
    let mut ports = Vec::new();
    if s.port_a {
        ports.push(json!({"name": "a", "port": 80, "nodePort": s.node_port_no}));
    }
    if s.port_b {
        ports.push(
            json!({"name": "b", "port": 53, "protocol": "UDP", "nodePort": s.node_port_no + 10}),
        );
    }
    let ty = if s.lb {
        "LoadBalancer"
    } else if s.node_port {
        "NodePort"
    } else {
        "ClusterIP"
    };
    let mut spec = json!({
        "type": ty,
        "clusterIP": format!("10.96.0.{}", s.ip + 1),
        "ports": ports,
        "internalTrafficPolicy": if s.itp_local { "Local" } else { "Cluster" },
    });
    if (s.node_port || s.lb) && s.etp_local {
        spec["externalTrafficPolicy"] = json!("Local");
    }
    if s.affinity {
        spec["sessionAffinity"] = json!("ClientIP");
    }
    let ranges = match s.ranges {
        0 => json!(null),
        1 => json!(["10.0.0.0/8"]),
        2 => json!(["10.0.0.0/8", "192.0.2.0/24"]),
        _ => json!(["not-a-cidr", "fd00::/8"]),
    };
    spec["loadBalancerSourceRanges"] = ranges;
    let status = if s.lb {
        json!({"loadBalancer": {"ingress": [{"ip": format!("198.51.100.{}", s.ip + 1)}]}})
    } else {
        json!({})
    };
    let mut metadata = json!({"name": format!("s{i}"), "namespace": "default"});
    let alg = ["", "round-robin", "maglev", "weighted"][usize::from(s.alg)];
    if !alg.is_empty() {
        metadata["annotations"] = json!({ "xlb.io/lb-algorithm": alg });
    }
    svc_full(metadata, spec, status)
}

fn endpoint_slice(j: usize, s: &SliceSpec) -> k8s_openapi::api::discovery::v1::EndpointSlice {
    let eps: Vec<Value> = s
        .endpoints
        .iter()
        .map(|e| {
            let (ready, serving, terminating) = match e.cond {
                0 => (None, None, None),
                1 => (Some(true), Some(true), Some(false)),
                2 => (Some(false), Some(true), Some(true)),
                _ => (Some(false), Some(false), Some(false)),
            };
            ep_cond(
                &format!("10.244.0.{}", e.pod + 1),
                ready,
                serving,
                terminating,
                if e.local { NODE } else { "node-b" },
            )
        })
        .collect();
    slice(
        &format!("slice-{j}"),
        &format!("s{}", s.owner),
        json!([{"name": "a", "port": 9376}, {"name": "b", "port": 5353, "protocol": "UDP"}]),
        json!(eps),
    )
}

fn to_event(ev: &Ev) -> SourceEvent {
    let del = |name: String| ("default".to_string(), name);
    match ev {
        Ev::Svc(i, s) => SourceEvent::ServiceUpsert(service(*i, s)),
        Ev::SvcDel(i) => {
            let (namespace, name) = del(format!("s{i}"));
            SourceEvent::ServiceDelete { namespace, name }
        }
        Ev::Slice(j, s) => SourceEvent::SliceUpsert(endpoint_slice(*j, s)),
        Ev::SliceDel(j) => {
            let (namespace, name) = del(format!("slice-{j}"));
            SourceEvent::SliceDelete { namespace, name }
        }
        Ev::Resync(svcs, slices) => SourceEvent::Resync {
            services: Some(
                svcs.iter()
                    .enumerate()
                    .filter_map(|(i, s)| s.as_ref().map(|s| service(i, s)))
                    .collect(),
            ),
            slices: Some(
                slices
                    .iter()
                    .enumerate()
                    .filter_map(|(j, s)| s.as_ref().map(|s| endpoint_slice(j, s)))
                    .collect(),
            ),
        },
        Ev::Node(two, named) => {
            let mut addresses = vec![NODE_IP];
            if *two {
                addresses.push("10.0.0.10".parse().unwrap());
            }
            SourceEvent::Node(NodeInfo {
                name: if *named { NODE.into() } else { String::new() },
                addresses,
            })
        }
    }
}

/// Each owned frontend is exactly what its Service produces now, and every frontend a Service
/// produces is filed (under it, or under another Service that claimed it first).
fn check_ownership(state: &ClusterState, desired: &DesiredState) -> Result<(), TestCaseError> {
    let mut filed = 0;
    for (key, svc) in &state.services {
        let (fresh, _) = service_frontends_of(svc, state.slices_of(key), &state.node, &cfg());
        let fresh: BTreeMap<Frontend, _> = fresh.into_iter().collect();
        let owned = desired.by_service.get(key).cloned().unwrap_or_default();
        for fe in &owned {
            prop_assert_eq!(
                Some(&desired.frontends[fe]),
                fresh.get(fe),
                "{} {}",
                key,
                fe
            );
        }
        filed += owned.len();
        // A Service claims both scopes of an (address, port, protocol) or none: a frontend
        // it produces is filed, or another Service holds a scope of it.
        for fe in fresh.keys() {
            let other = [fe.with_scope(SCOPE_EXT), fe.with_scope(SCOPE_INT)]
                .iter()
                .any(|f| {
                    desired
                        .frontends
                        .get(f)
                        .is_some_and(|st| st.service != *key)
                });
            prop_assert!(
                desired.frontends.contains_key(fe) || other,
                "{} lost {}",
                key,
                fe
            );
        }
    }
    prop_assert_eq!(filed, desired.frontends.len());
    // The SCOPE_INT entry a TWO_SCOPES master points pods at is the same Service's.
    for (fe, st) in &desired.frontends {
        if fe.scope == SCOPE_EXT && st.flags & lb_common::SVC_FLAG_TWO_SCOPES != 0 {
            let int = desired.frontends.get(&fe.with_scope(SCOPE_INT));
            prop_assert_eq!(int.map(|i| &i.service), Some(&st.service), "{}", fe);
        }
    }
    Ok(())
}

/// Slot writes of a plan are bounded by the real change: new backends plus slots that moved
/// down because the count shrank (never a rewrite of every slot).
fn check_slot_writes(
    before: &Applied,
    desired: &DesiredState,
    p: &Plan,
) -> Result<(), TestCaseError> {
    // One plan entry holds both scopes of an (address, port, protocol): count per frontend.
    let frontends: BTreeSet<Frontend> = p
        .frontends
        .iter()
        .flat_map(|(_, ops)| ops.iter().filter_map(|op| op.frontend().copied()))
        .collect();
    for fe in &frontends {
        let puts = p
            .frontends
            .iter()
            .flat_map(|(_, ops)| ops)
            .filter(|op| matches!(op, lb_model::MapOp::PutSlot { frontend, .. } if frontend == fe))
            .count();
        let old: BTreeSet<_> = before
            .frontends
            .get(fe)
            .map(|a| {
                a.slots
                    .iter()
                    .filter_map(|id| before.backends.get(id).map(|b| b.0))
                    .collect()
            })
            .unwrap_or_default();
        let want = desired
            .frontends
            .get(fe)
            .map(|s| s.backends.clone())
            .unwrap_or_default();
        let added = want.iter().filter(|b| !old.contains(b)).count();
        let old_len = before.frontends.get(fe).map_or(0, |a| a.slots.len());
        let bound = added + old_len.saturating_sub(want.len());
        prop_assert!(
            puts <= bound,
            "{}: {} slot writes for {} added, {} -> {}",
            fe,
            puts,
            added,
            old_len,
            want.len()
        );
    }
    Ok(())
}

impl World {
    /// Apply one event to the model; the plan for the frontends it touched (all of them on a
    /// resync), and those frontends.
    fn step(&mut self, ev: &Ev) -> (Plan, BTreeSet<Frontend>) {
        let changes = self.state.apply(to_event(ev));
        let touched = if changes.all {
            let keys: BTreeSet<_> = self
                .state
                .services
                .keys()
                .chain(self.desired.by_service.keys())
                .cloned()
                .collect();
            for k in &keys {
                self.desired.update_service(&self.state, k, &cfg());
            }
            all_frontends(&self.applied, &self.desired)
        } else {
            let mut t = BTreeSet::new();
            for k in &changes.services {
                t.extend(self.desired.update_service(&self.state, k, &cfg()).0);
            }
            t
        };
        self.sim.expect(&self.desired);
        (plan(&self.applied, &self.desired, &touched), touched)
    }

    /// After a plan with failures: every Service is whole, `applied` holds exactly what was
    /// written, and the agent's next plan (the frontends the report names; its gc also deletes
    /// what a failed gc left) repairs everything.
    fn recover(&mut self, report: &ExecReport) -> Result<(), TestCaseError> {
        self.sim.check_no_blackhole().map_err(TestCaseError::fail)?;
        prop_assert_eq!(
            &self.applied,
            &self.sim.to_applied(),
            "applied records exactly what was written"
        );
        let failed: BTreeSet<Frontend> = report.failed.iter().map(|(fe, _)| *fe).collect();
        let again = plan(&self.applied, &self.desired, &failed);
        self.sim.run(&again, &mut self.applied);
        Ok(())
    }

    /// The maps equal the desired state, `applied` equals them read back, and nothing is left
    /// to do.
    fn check_converged(&self, ev: &Ev) -> Result<(), TestCaseError> {
        if let Err(e) = self.sim.check_equals(&self.desired) {
            return Err(TestCaseError::fail(format!("after {ev:?}: {e}")));
        }
        prop_assert_eq!(&self.applied, &self.sim.to_applied());
        let all = all_frontends(&self.applied, &self.desired);
        prop_assert!(
            plan(&self.applied, &self.desired, &all).is_empty(),
            "converged state plans nothing"
        );
        prop_assert!(self.applied.gc().is_empty());
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn every_op_keeps_the_datapath_consistent(
        steps in prop::collection::vec((event(), prop::option::weighted(0.2, any::<u64>())), 1..25)
    ) {
        let mut c = World::new();
        for (ev, failure_seed) in steps {
            let before = c.applied.clone();
            let ids_before: BTreeMap<_, _> = c.applied.backends.iter().map(|(id, (b, _))| (*b, *id)).collect();
            let (p, _) = c.step(&ev);
            // Failures: a small xorshift stream decides which writes fail (about one in eight).
            let mut x = failure_seed.unwrap_or(0) | 1;
            let failing = failure_seed.is_some();
            let (report, failures) = c.sim.execute(&p, &mut c.applied, move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                failing && x % 8 == 0
            });
            if failures > 0 {
                c.recover(&report)?;
            } else {
                prop_assert!(report.is_clean());
                check_slot_writes(&before, &c.desired, &p)?;
                for (id, (b, _)) in &c.applied.backends {
                    if let Some(old) = ids_before.get(b) {
                        prop_assert_eq!(old, id, "backend {} changed id", b);
                    }
                }
            }
            c.check_converged(&ev)?;
            check_ownership(&c.state, &c.desired)?;
        }
    }

    /// One write fails, at a random position of the plan (prepare, any frontend op, gc). The
    /// simulator checks every Service is whole after every write that was made; the failed
    /// write is reported (unless it is a gc delete, left for the next plan), and the agent's
    /// next plan repairs everything.
    #[test]
    fn a_write_failing_anywhere_in_a_plan_leaves_every_service_whole(
        steps in prop::collection::vec((event(), any::<prop::sample::Index>()), 1..20)
    ) {
        let mut c = World::new();
        for (ev, at) in steps {
            let (p, _) = c.step(&ev);
            // How many writes the plan makes (the executor is deterministic): run it on copies.
            let writes = {
                let mut dry = FaultStore::new(c.sim.maps.clone(), |_, _| false);
                execute(&mut dry, &p, &mut c.applied.clone());
                dry.writes()
            };
            if writes > 0 {
                let n = at.index(writes);
                let mut store = FaultStore::fail_nth(&mut c.sim, n);
                let report = execute(&mut store, &p, &mut c.applied);
                prop_assert_eq!(store.injected().len(), 1);
                let failed = store.injected()[0].clone();
                let gc_delete = matches!(failed, MapWrite::DeleteBackend(_) | MapWrite::DeleteSvcName(_))
                    && n >= p.op_count();
                prop_assert_eq!(
                    report.is_clean(),
                    gc_delete,
                    "only a failed gc delete goes unreported: {:?} {:?}",
                    failed,
                    report
                );
                c.recover(&report)?;
            }
            c.check_converged(&ev)?;
        }
    }

    /// A map that refuses every new entry of one kind (full): the frontends that need one are
    /// reported and stay consistent, every other touched frontend is written in full, and none
    /// is ever half-written (a refused Maglev table write: a MAGLEV array that fails). Once the
    /// map has room, the agent's next plan repairs everything.
    #[test]
    fn a_full_map_fails_only_the_frontends_that_need_room(
        steps in prop::collection::vec(event(), 1..15),
        full in 0..5usize,
    ) {
        let mut c = World::new();
        for ev in steps {
            let (p, touched) = c.step(&ev);
            let before = c.sim.maps.clone();
            let refuse = move |w: &MapWrite| match (full, w) {
                (0, MapWrite::PutService(k, _)) => !before.services.contains_key(k),
                (1, MapWrite::PutBackend(id, _)) => !before.backends.contains_key(id),
                (2, MapWrite::PutMember(k, _)) => !before.members.contains_key(k),
                (3, MapWrite::PutSrcRange(len, k)) => !before.src_ranges.contains(&(*len, *k)),
                (4, MapWrite::PutMaglevTable(..)) => true,
                _ => false,
            };
            let mut store = FaultStore::fail_matching(&mut c.sim, refuse);
            let report = execute(&mut store, &p, &mut c.applied);
            prop_assert_eq!(!store.injected().is_empty(), !report.is_clean(), "{:?}", report);
            // A failed plan entry is both scopes of an (address, port, protocol).
            let failed: BTreeSet<Frontend> = report
                .failed
                .iter()
                .flat_map(|(fe, _)| [fe.with_scope(SCOPE_EXT), fe.with_scope(SCOPE_INT)])
                .collect();
            for fe in touched.iter().filter(|fe| !failed.contains(fe)) {
                let want = c.desired.frontends.get(fe).map(|st| st.backends.len() as u32);
                let got = c.applied.frontends.get(fe).map(|af| af.count);
                prop_assert_eq!(want, got, "{}", fe);
            }
            c.recover(&report)?;
            c.check_converged(&ev)?;
        }
    }
}
