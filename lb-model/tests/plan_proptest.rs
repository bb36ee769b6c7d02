//! Property test of the whole pipeline: random event sequences go through ClusterState,
//! DesiredState and plan, and every single map op is executed on a simulated datapath that checks
//! it never exposes a blackhole: every slot 1..=count of every master names an existing backend
//! that is a member (MEMBERS entry with its address) of the frontend. The simulator also fails
//! when a new backend or rev-NAT entry takes an id used before (id quarantine). After each step
//! the maps must equal the desired state exactly (members included), and `Applied` (kept up to
//! date with `Applied::apply`) must equal what the maps hold, read back.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::sim::Sim;
use common::*;
use lb_model::desired::service_frontends;
use lb_model::diff::{all_frontends, plan};
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
    Node(bool),
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
    )
        .prop_map(
            |(node_port, ip, port_a, port_b, np, affinity, itp_local, etp_local)| SvcSpec {
                node_port,
                ip,
                port_a,
                port_b,
                node_port_no: 30080 + np,
                affinity,
                itp_local,
                etp_local,
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
        1 => any::<bool>().prop_map(Ev::Node),
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
    let mut spec = json!({
        "type": if s.node_port { "NodePort" } else { "ClusterIP" },
        "clusterIP": format!("10.96.0.{}", s.ip + 1),
        "ports": ports,
        "internalTrafficPolicy": if s.itp_local { "Local" } else { "Cluster" },
    });
    if s.node_port && s.etp_local {
        spec["externalTrafficPolicy"] = json!("Local");
    }
    if s.affinity {
        spec["sessionAffinity"] = json!("ClientIP");
    }
    svc(&format!("s{i}"), spec)
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
        Ev::Node(two) => {
            let mut addresses = vec![NODE_IP];
            if *two {
                addresses.push("10.0.0.10".parse().unwrap());
            }
            SourceEvent::Node(NodeInfo {
                name: NODE.into(),
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
        let (fresh, _) = service_frontends(svc, state.slices_of(key), &state.node, &cfg());
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
        for fe in fresh.keys() {
            prop_assert!(desired.frontends.contains_key(fe), "{} lost {}", key, fe);
        }
    }
    prop_assert_eq!(filed, desired.frontends.len());
    Ok(())
}

/// Slot writes of a plan are bounded by the real change: new backends plus slots that moved
/// down because the count shrank (never a rewrite of every slot).
fn check_slot_writes(
    before: &Applied,
    desired: &DesiredState,
    p: &Plan,
) -> Result<(), TestCaseError> {
    for (fe, ops) in &p.frontends {
        let puts = ops
            .iter()
            .filter(|op| matches!(op, lb_model::MapOp::PutSlot { .. }))
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn every_op_keeps_the_datapath_consistent(
        steps in prop::collection::vec((event(), prop::option::weighted(0.2, any::<u64>())), 1..25)
    ) {
        let mut state = ClusterState { node: node(), ..Default::default() };
        let mut desired = DesiredState::default();
        let mut applied = Applied::default();
        let mut sim = Sim::default();
        for (ev, failure_seed) in steps {
            let changes = state.apply(to_event(&ev));
            let touched: BTreeSet<Frontend> = if changes.all {
                let keys: BTreeSet<_> = state.services.keys().chain(desired.by_service.keys()).cloned().collect();
                for k in &keys {
                    desired.update_service(&state, k, &cfg());
                }
                all_frontends(&applied, &desired)
            } else {
                let mut t = BTreeSet::new();
                for k in &changes.services {
                    t.extend(desired.update_service(&state, k, &cfg()).0);
                }
                t
            };
            let before = applied.clone();
            let ids_before: BTreeMap<_, _> = applied.backends.iter().map(|(id, (b, _))| (*b, *id)).collect();
            let p = plan(&applied, &desired, &touched);
            // Failures: a small xorshift stream decides which ops fail (about one in eight).
            let mut x = failure_seed.unwrap_or(0) | 1;
            let failing = failure_seed.is_some();
            let failures = sim.execute(&p, &mut applied, || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                failing && x % 8 == 0
            });
            if failures > 0 {
                // The agent retries with a full reconcile; that one must repair everything.
                let all = all_frontends(&applied, &desired);
                let repair = plan(&applied, &desired, &all);
                sim.execute(&repair, &mut applied, || false);
            } else {
                check_slot_writes(&before, &desired, &p)?;
                for (id, (b, _)) in &applied.backends {
                    if let Some(old) = ids_before.get(b) {
                        prop_assert_eq!(old, id, "backend {} changed id", b);
                    }
                }
            }
            if let Err(e) = sim.check_equals(&desired) {
                return Err(TestCaseError::fail(format!("after {ev:?}: {e}")));
            }
            prop_assert_eq!(&applied, &sim.to_applied());
            let all = all_frontends(&applied, &desired);
            prop_assert!(plan(&applied, &desired, &all).is_empty(), "converged state plans nothing");
            prop_assert!(applied.gc().is_empty());
            check_ownership(&state, &desired)?;
        }
    }
}
