//! kube-proxy's per-Service health check (`spec.healthCheckNodePort`): which ports to serve and
//! what to answer. Pure: the agent's HTTP server only listens, and answers with [`body`].
//!
//! A LoadBalancer Service with externalTrafficPolicy Local has a healthCheckNodePort; every
//! node answers on it with its number of local endpoints, 200 when there is one and 503 when
//! there is none, so the cloud load balancer sends traffic only to nodes that serve it (a node
//! without local endpoints drops the Service's external traffic: `SVC_FLAG_DROP_NO_LOCAL`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use crate::kube_proxy::{cluster_ipv4s, skipped, ClusterIps};
use crate::state::{object_key, ClusterState, Config};

/// One health check port's Service and its local endpoint count.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints of the Service on this node, each address counted once.
    pub local_endpoints: usize,
}

/// The health checks this node serves, by port, for the default [`Config`] (the
/// `service.kubernetes.io/service-proxy-name` label must be absent or "xlb"). An agent with
/// another proxy name calls [`health_checks_for`] with its config.
pub fn health_checks(state: &ClusterState) -> BTreeMap<u16, HealthCheck> {
    health_checks_for(state, &Config::default())
}

/// The health checks this node serves, by port: one per Service of type LoadBalancer with
/// externalTrafficPolicy Local and a healthCheckNodePort (1..=65535), among the Services the
/// datapath programs (not skipped as headless, another proxy's or IPv6-only, as in
/// [`crate::desired::service_frontends`]).
///
/// `local_endpoints` counts as kube-proxy does (`EndpointsMap.LocalReadyEndpoints`): ready
/// endpoints (a missing `ready` condition means ready) whose `nodeName` is this node's name
/// (an empty node name has none), over all the Service's IPv4 slices and ports, each address
/// (the endpoint's first) once. Two Services claiming one port (the API server allocates them
/// uniquely; a manifests directory might not): the first in (namespace, name) order keeps it.
pub fn health_checks_for(state: &ClusterState, cfg: &Config) -> BTreeMap<u16, HealthCheck> {
    let mut out = BTreeMap::new();
    for (key, svc) in &state.services {
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        if spec.type_.as_deref() != Some("LoadBalancer")
            || spec.external_traffic_policy.as_deref() != Some("Local")
            || skipped(svc, spec, cfg)
            || !matches!(cluster_ipv4s(spec), ClusterIps::V4(_))
        {
            continue;
        }
        let Some(port) = spec
            .health_check_node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            continue;
        };
        debug_assert!(object_key(&svc.metadata).as_ref() == Some(key));
        out.entry(port).or_insert_with(|| HealthCheck {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            local_endpoints: local_ready(state, key),
        });
    }
    out
}

/// Ready endpoints of the Service on this node, by address.
fn local_ready(state: &ClusterState, key: &crate::SvcKey) -> usize {
    let node = state.node.name.as_str();
    if node.is_empty() {
        return 0;
    }
    // The state's slices hold IPv4 endpoints only, by first address, with `ready` defaulted.
    let addrs: BTreeSet<Ipv4Addr> = state
        .slices_of(key)
        .flat_map(|s| s.endpoints.iter())
        .filter(|ep| ep.ready && ep.on_node(node))
        .map(|ep| ep.addr)
        .collect();
    addrs.len()
}

/// kube-proxy's answer on a healthCheckNodePort, for any path: the HTTP status (200 with local
/// endpoints, 503 without) and the JSON body
/// `{"service":{"namespace":"NS","name":"NAME"},"localEndpoints":N,"serviceProxyHealthy":true}`.
/// The server adds `Content-Type: application/json` and `X-Content-Type-Options: nosniff`.
pub fn body(hc: &HealthCheck) -> (u16, String) {
    let status = if hc.local_endpoints > 0 { 200 } else { 503 };
    // Field order as kube-proxy writes it (serde_json's map would sort the keys).
    let quoted = |s: &str| serde_json::Value::from(s).to_string();
    let json = format!(
        r#"{{"service":{{"namespace":{},"name":{}}},"localEndpoints":{},"serviceProxyHealthy":true}}"#,
        quoted(&hc.namespace),
        quoted(&hc.name),
        hc.local_endpoints
    );
    (status, json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{NodeInfo, SourceEvent};
    use serde_json::{json, Value};

    fn svc(name: &str, spec: Value) -> SourceEvent {
        SourceEvent::ServiceUpsert(
            serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": "shop"}, "spec": spec,
            }))
            .unwrap(),
        )
    }

    fn lb(hc: i32) -> Value {
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.5", "externalTrafficPolicy": "Local",
               "healthCheckNodePort": hc, "ports": [{"port": 80, "nodePort": 30080}]})
    }

    fn slice(name: &str, service: &str, family: &str, eps: Value) -> SourceEvent {
        SourceEvent::SliceUpsert(
            serde_json::from_value(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": name, "namespace": "shop",
                             "labels": {"kubernetes.io/service-name": service}},
                "addressType": family, "ports": [{"port": 8080}], "endpoints": eps,
            }))
            .unwrap(),
        )
    }

    fn ep(ip: &str, node: &str, ready: Option<bool>) -> Value {
        json!({"addresses": [ip], "nodeName": node, "conditions": {"ready": ready}})
    }

    fn state(node: &str, events: Vec<SourceEvent>) -> ClusterState {
        let mut s = ClusterState::default();
        s.apply(SourceEvent::Node(NodeInfo {
            name: node.into(),
            addresses: vec![],
        }));
        for e in events {
            s.apply(e);
        }
        s
    }

    #[test]
    fn one_check_per_local_load_balancer_with_a_health_port() {
        let mut cluster = lb(31000);
        cluster["externalTrafficPolicy"] = json!("Cluster");
        let mut node_port = lb(31001);
        node_port["type"] = json!("NodePort");
        let mut other_proxy = lb(31003);
        other_proxy["clusterIP"] = json!("10.96.0.6");
        let s = state(
            "a",
            vec![
                svc("web", lb(31002)),
                svc("cluster", cluster),
                svc("np", node_port),
                svc("none", {
                    let mut v = lb(0);
                    v.as_object_mut().unwrap().remove("healthCheckNodePort");
                    v
                }),
                svc("zero", lb(0)),
                svc("big", lb(70000)),
                SourceEvent::ServiceUpsert(
                    serde_json::from_value(json!({
                        "apiVersion": "v1", "kind": "Service",
                        "metadata": {"name": "other", "namespace": "shop",
                                     "labels": {"service.kubernetes.io/service-proxy-name": "cilium"}},
                        "spec": other_proxy,
                    }))
                    .unwrap(),
                ),
            ],
        );
        let hc = health_checks(&s);
        assert_eq!(hc.keys().copied().collect::<Vec<_>>(), vec![31002]);
        assert_eq!(
            hc[&31002],
            HealthCheck {
                namespace: "shop".into(),
                name: "web".into(),
                local_endpoints: 0
            }
        );
        let cilium = Config {
            service_proxy_name: Some("cilium".into()),
            ..Config::default()
        };
        assert_eq!(
            health_checks_for(&s, &cilium)
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            vec![31002, 31003]
        );
    }

    #[test]
    fn local_endpoints_are_ready_ones_on_this_node_counted_once_per_address() {
        let events = vec![
            svc("web", lb(31002)),
            slice(
                "web-1",
                "web",
                "IPv4",
                json!([
                    ep("10.244.1.1", "a", None),        // nil ready: ready
                    ep("10.244.1.2", "a", Some(true)),
                    ep("10.244.1.3", "a", Some(false)), // not ready
                    ep("10.244.2.1", "b", Some(true)),  // other node
                    {"addresses": ["10.244.1.9"], "conditions": {"ready": true}}, // no node
                ]),
            ),
            // The same address in a second slice (rewrite in progress): once.
            slice(
                "web-2",
                "web",
                "IPv4",
                json!([ep("10.244.1.1", "a", Some(true))]),
            ),
            slice(
                "web-6",
                "web",
                "IPv6",
                json!([ep("fd00::1", "a", Some(true))]),
            ),
        ];
        let s = state("a", events.clone());
        assert_eq!(health_checks(&s)[&31002].local_endpoints, 2);
        assert_eq!(
            health_checks(&state("b", events.clone()))[&31002].local_endpoints,
            1
        );
        assert_eq!(
            health_checks(&state("", events))[&31002].local_endpoints,
            0,
            "no node name: nothing is local"
        );
    }

    #[test]
    fn two_services_on_one_port_the_first_keeps_it() {
        let s = state("a", vec![svc("b", lb(31002)), svc("a", lb(31002))]);
        assert_eq!(health_checks(&s)[&31002].name, "a");
    }

    #[test]
    fn body_is_kube_proxys_json_with_200_or_503() {
        let mut hc = HealthCheck {
            namespace: "shop".into(),
            name: "web".into(),
            local_endpoints: 2,
        };
        let (status, body) = body(&hc);
        assert_eq!(status, 200);
        assert_eq!(
            body,
            r#"{"service":{"namespace":"shop","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}"#
        );
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["localEndpoints"], 2);
        hc.local_endpoints = 0;
        hc.name = "we\"b".into();
        let (status, body) = super::body(&hc);
        assert_eq!(status, 503);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["service"]["name"], "we\"b");
        assert_eq!(v["localEndpoints"], 0);
        assert_eq!(v["serviceProxyHealthy"], true);
    }
}
