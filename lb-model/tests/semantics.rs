//! kube-proxy semantics of `service_frontends`: one test per rule.

mod common;

use std::collections::BTreeSet;

use common::*;
use lb_common::*;
use lb_model::desired::{service_frontends, FrontendState};
use lb_model::{Config, Frontend, Problem, Proto};
use serde_json::json;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

fn run(svc: &Service, slices: &[EndpointSlice]) -> (Vec<(Frontend, FrontendState)>, Vec<Problem>) {
    service_frontends(svc, slices.iter(), &node(), &cfg())
}

fn frontends(svc: &Service, slices: &[EndpointSlice]) -> Vec<(Frontend, FrontendState)> {
    let (f, p) = run(svc, slices);
    assert!(p.is_empty(), "unexpected problems: {p:?}");
    f
}

fn only(svc: &Service, slices: &[EndpointSlice]) -> FrontendState {
    let f = frontends(svc, slices);
    assert_eq!(f.len(), 1, "{f:?}");
    f.into_iter().next().unwrap().1
}

#[test]
fn cluster_ip_port_gets_the_merged_sorted_deduplicated_endpoints_of_all_slices() {
    let s = cluster_svc("web", "10.96.0.80");
    let a = simple_slice("web-a", "web", &["10.244.1.3", "10.244.1.1"]);
    let b = simple_slice("web-b", "web", &["10.244.1.2", "10.244.1.1"]);
    let f = frontends(&s, &[a, b]);
    assert_eq!(f.len(), 1);
    let (front, st) = &f[0];
    assert_eq!(*front, fe("10.96.0.80", 80, Proto::Tcp));
    assert_eq!(st.flags, SVC_FLAG_CLUSTER_IP);
    assert_eq!(st.service, key("default", "web"));
    assert_eq!(
        st.backends,
        vec![
            be("10.244.1.1", 9376),
            be("10.244.1.2", 9376),
            be("10.244.1.3", 9376)
        ]
    );
}

#[test]
fn slice_ports_match_by_name_and_protocol_and_give_the_backend_port() {
    // Named targetPorts: the Service says nothing about 8080 / 5353, the slice does.
    let s = svc(
        "dns",
        json!({"clusterIP": "10.96.0.10", "ports": [
            {"name": "http", "port": 80, "targetPort": "web"},
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": "dns"}]}),
    );
    let sl = slice(
        "dns-1",
        "dns",
        json!([{"name": "http", "port": 8080},
               {"name": "dns", "port": 5353, "protocol": "UDP"},
               {"name": "dns-tcp", "port": 5354, "protocol": "TCP"},
               {"name": "dns", "port": 9999, "protocol": "TCP"}]),
        json!([ep("10.244.0.5")]),
    );
    let f = frontends(&s, &[sl]);
    let get = |port, proto| {
        f.iter()
            .find(|(fr, _)| *fr == fe("10.96.0.10", port, proto))
            .unwrap()
            .1
            .clone()
    };
    assert_eq!(get(80, Proto::Tcp).backends[0].port, 8080);
    assert_eq!(get(53, Proto::Udp).backends[0].port, 5353);
    assert_eq!(get(53, Proto::Udp).backends[0].proto, Proto::Udp);
    assert_eq!(get(53, Proto::Tcp).backends[0].port, 5354);
    assert_eq!(get(53, Proto::Udp).port_name, "dns");
}

#[test]
fn unnamed_service_port_matches_a_slice_port_without_name_or_with_empty_name() {
    let s = cluster_svc("web", "10.96.0.80");
    let a = slice(
        "a",
        "web",
        json!([{"port": 9376}]),
        json!([ep("10.244.0.1")]),
    );
    let b = slice(
        "b",
        "web",
        json!([{"name": "", "port": 9377}]),
        json!([ep("10.244.0.2")]),
    );
    let c = slice(
        "c",
        "web",
        json!([{"name": "other", "port": 9378}]),
        json!([ep("10.244.0.3")]),
    );
    let d = slice(
        "d",
        "web",
        json!([{"name": null}]),
        json!([ep("10.244.0.4")]),
    ); // no port number
    let st = only(&s, &[a, b, c, d]);
    assert_eq!(
        st.backends,
        vec![be("10.244.0.1", 9376), be("10.244.0.2", 9377)]
    );
}

#[test]
fn non_ipv4_slices_and_addresses_are_ignored() {
    let s = cluster_svc("web", "10.96.0.80");
    let mut v6 = simple_slice("v6", "web", &["fd00::1"]);
    v6.address_type = "IPv6".into();
    let mut fqdn = simple_slice("fqdn", "web", &["10.244.0.9"]);
    fqdn.address_type = "FQDN".into();
    let v4 = simple_slice("v4", "web", &["10.244.0.1", "not-an-ip"]);
    assert_eq!(
        only(&s, &[v6, fqdn, v4]).backends,
        vec![be("10.244.0.1", 9376)]
    );
}

#[test]
fn external_name_and_headless_services_are_skipped_without_problem() {
    let ext = svc(
        "ext",
        json!({"type": "ExternalName", "externalName": "example.com", "ports": [{"port": 80}]}),
    );
    assert_eq!(run(&ext, &[]), (vec![], vec![]));
    let headless = svc("hl", json!({"clusterIP": "None", "ports": [{"port": 80}]}));
    assert_eq!(
        run(&headless, &[simple_slice("hl", "hl", &["10.244.0.1"])]),
        (vec![], vec![])
    );
    let labelled = svc_full(
        json!({"name": "l", "labels": {"service.kubernetes.io/headless": ""}}),
        json!({"clusterIP": "10.96.0.9", "ports": [{"port": 80}]}),
        json!({}),
    );
    assert_eq!(run(&labelled, &[]), (vec![], vec![]));
}

#[test]
fn service_proxy_name_label_delegates_to_the_named_proxy() {
    let labelled = |proxy: &str| {
        svc_full(
            json!({"name": "p", "labels": {"service.kubernetes.io/service-proxy-name": proxy}}),
            json!({"clusterIP": "10.96.0.9", "ports": [{"port": 80}]}),
            json!({}),
        )
    };
    let n = node();
    let count = |s: &Service, c: &Config| service_frontends(s, [].iter(), &n, c).0.len();
    assert_eq!(count(&labelled("other-proxy"), &cfg()), 0);
    assert_eq!(count(&labelled("xlb"), &cfg()), 1, "our own name is served");
    let none = Config {
        service_proxy_name: None,
        ..Config::default()
    };
    assert_eq!(
        count(&labelled("xlb"), &none),
        0,
        "None skips every labelled Service"
    );
    assert_eq!(
        count(&cluster_svc("x", "10.96.0.1"), &none),
        1,
        "unlabelled ones are served"
    );
}

#[test]
fn ipv6_cluster_ips_are_ignored_and_ipv6_only_services_skipped() {
    let dual = svc(
        "d",
        json!({"clusterIP": "fd00::10", "clusterIPs": ["fd00::10", "10.96.0.10"], "ports": [{"port": 80}]}),
    );
    let f = frontends(&dual, &[]);
    assert_eq!(
        f.iter().map(|(fr, _)| *fr).collect::<Vec<_>>(),
        vec![fe("10.96.0.10", 80, Proto::Tcp)]
    );
    let v6 = svc(
        "v6",
        json!({"clusterIP": "fd00::10", "type": "NodePort", "ports": [{"port": 80, "nodePort": 30001}]}),
    );
    assert_eq!(run(&v6, &[]), (vec![], vec![]));
}

#[test]
fn service_without_cluster_ip_is_a_problem() {
    let s = svc("noip", json!({"ports": [{"port": 80}]}));
    let (f, p) = run(&s, &[]);
    assert!(f.is_empty());
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].kind, "invalid_service");
    assert_eq!(p[0].object, "default/noip");
}

#[test]
fn unknown_protocol_is_a_problem_for_that_port_only() {
    let s = svc(
        "mixed",
        json!({"clusterIP": "10.96.0.7", "ports": [
            {"name": "a", "port": 80, "protocol": "ICMP"},
            {"name": "b", "port": 81, "protocol": "SCTP"},
            {"name": "c", "port": 70000}]}),
    );
    let (f, p) = run(&s, &[]);
    assert_eq!(
        f.iter().map(|(fr, _)| *fr).collect::<Vec<_>>(),
        vec![fe("10.96.0.7", 81, Proto::Sctp)]
    );
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(p.iter().all(|p| p.kind == "invalid_service"));
    assert!(p[0].reason.contains("ICMP"), "{}", p[0]);
}

#[test]
fn node_port_services_get_a_frontend_per_node_address() {
    let s = svc(
        "np",
        json!({"type": "NodePort", "clusterIP": "10.96.0.30", "ports": [{"port": 80, "nodePort": 30080}]}),
    );
    let n = lb_model::NodeInfo {
        name: NODE.into(),
        addresses: vec![NODE_IP, "10.0.0.10".parse().unwrap()],
    };
    let (f, p) = service_frontends(
        &s,
        [simple_slice("np", "np", &["10.244.0.1"])].iter(),
        &n,
        &cfg(),
    );
    assert!(p.is_empty());
    let got: Vec<(Frontend, u32)> = f.iter().map(|(fr, st)| (*fr, st.flags)).collect();
    assert_eq!(
        got,
        vec![
            (fe("10.0.0.10", 30080, Proto::Tcp), SVC_FLAG_NODE_PORT),
            (fe("10.96.0.30", 80, Proto::Tcp), SVC_FLAG_CLUSTER_IP),
            (fe("192.168.1.10", 30080, Proto::Tcp), SVC_FLAG_NODE_PORT),
        ]
    );
    assert!(f
        .iter()
        .all(|(_, st)| st.backends == vec![be("10.244.0.1", 9376)]));
    // A ClusterIP Service carrying a stale nodePort gets no NodePort frontend.
    let c = svc(
        "c",
        json!({"clusterIP": "10.96.0.31", "ports": [{"port": 80, "nodePort": 30081}]}),
    );
    assert_eq!(frontends(&c, &[]).len(), 1);
}

#[test]
fn load_balancer_ingress_ips_and_external_ips_are_frontends() {
    let s = svc_full(
        json!({"name": "lb"}),
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.40", "externalIPs": ["203.0.113.9", "2001:db8::1"],
               "ports": [{"port": 443, "nodePort": 30443}]}),
        json!({"loadBalancer": {"ingress": [
            {"ip": "198.51.100.1"}, {"hostname": "lb.example.com"},
            {"ip": "198.51.100.2", "ipMode": "Proxy"}]}}),
    );
    let f = frontends(&s, &[]);
    let flags = |a: &str, p: u16| {
        f.iter()
            .find(|(fr, _)| *fr == fe(a, p, Proto::Tcp))
            .map(|(_, st)| st.flags)
    };
    assert_eq!(flags("10.96.0.40", 443), Some(SVC_FLAG_CLUSTER_IP));
    assert_eq!(flags("192.168.1.10", 30443), Some(SVC_FLAG_NODE_PORT));
    assert_eq!(flags("198.51.100.1", 443), Some(SVC_FLAG_LOAD_BALANCER));
    assert_eq!(
        flags("198.51.100.2", 443),
        None,
        "ipMode Proxy: the LB proxies, do not short-cut it"
    );
    assert_eq!(flags("203.0.113.9", 443), Some(SVC_FLAG_EXTERNAL_IP));
    assert_eq!(f.len(), 4);
    // Ingress IPs of a Service that is not (or no longer) a LoadBalancer are ignored.
    let mut np = s.clone();
    np.spec.as_mut().unwrap().type_ = Some("NodePort".into());
    assert!(frontends(&np, &[])
        .iter()
        .all(|(_, st)| st.flags != SVC_FLAG_LOAD_BALANCER));
}

#[test]
fn endpoint_conditions_default_like_the_api_says() {
    let s = cluster_svc("c", "10.96.0.50");
    let sl = slice(
        "c",
        "c",
        json!([{"port": 9376}]),
        json!([
            ep_cond("10.244.0.1", None, None, None, "n"), // nil: ready
            ep_cond("10.244.0.2", Some(false), None, None, "n"), // not ready
            ep_cond("10.244.0.3", Some(false), Some(true), Some(true), "n"), // draining
            ep_cond("10.244.0.4", Some(true), Some(true), Some(false), "n"), // ready
        ]),
    );
    let st = only(&s, &[sl]);
    assert_eq!(
        st.backends,
        vec![be("10.244.0.1", 9376), be("10.244.0.4", 9376)]
    );
    assert_eq!(st.flags & SVC_FLAG_TERMINATING_FALLBACK, 0);
}

#[test]
fn without_ready_endpoints_serving_terminating_ones_are_used() {
    let s = cluster_svc("c", "10.96.0.50");
    let sl = slice(
        "c",
        "c",
        json!([{"port": 9376}]),
        json!([
            ep_cond("10.244.0.2", Some(false), Some(false), Some(true), "n"), // terminating, not serving
            ep_cond("10.244.0.3", Some(false), Some(true), Some(true), "n"), // serving + terminating
            ep_cond("10.244.0.4", Some(false), Some(true), None, "n"), // serving, not terminating
        ]),
    );
    let st = only(&s, &[sl]);
    assert_eq!(st.backends, vec![be("10.244.0.3", 9376)]);
    assert_eq!(
        st.flags,
        SVC_FLAG_CLUSTER_IP | SVC_FLAG_TERMINATING_FALLBACK
    );
}

#[test]
fn serving_defaults_to_ready() {
    // ready=false, serving=nil, terminating=true: serving follows ready (false), so not usable.
    let s = cluster_svc("c", "10.96.0.50");
    let sl = slice(
        "c",
        "c",
        json!([{"port": 9376}]),
        json!([ep_cond("10.244.0.3", Some(false), None, Some(true), "n")]),
    );
    let st = only(&s, &[sl]);
    assert!(st.backends.is_empty());
    assert_eq!(st.flags, SVC_FLAG_CLUSTER_IP);
}

#[test]
fn an_address_listed_by_two_slices_keeps_its_best_conditions() {
    let s = cluster_svc("c", "10.96.0.50");
    let old = slice(
        "old",
        "c",
        json!([{"port": 9376}]),
        json!([ep_cond("10.244.0.1", Some(false), Some(false), None, "n")]),
    );
    let new = slice(
        "new",
        "c",
        json!([{"port": 9376}]),
        json!([ep("10.244.0.1")]),
    );
    assert_eq!(
        only(&s, &[old.clone(), new.clone()]).backends,
        vec![be("10.244.0.1", 9376)]
    );
    assert_eq!(only(&s, &[new, old]).backends, vec![be("10.244.0.1", 9376)]);
}

fn local_mix() -> EndpointSlice {
    slice(
        "m",
        "m",
        json!([{"port": 9376}]),
        json!([
            ep_cond("10.244.1.1", None, None, None, NODE),
            ep_cond("10.244.2.1", None, None, None, "node-b"),
            ep_cond("10.244.1.2", Some(false), Some(true), Some(true), NODE),
        ]),
    )
}

#[test]
fn internal_traffic_policy_local_uses_this_nodes_endpoints_for_cluster_ips_only() {
    let s = svc(
        "m",
        json!({"type": "NodePort", "clusterIP": "10.96.0.60", "internalTrafficPolicy": "Local",
               "ports": [{"port": 80, "nodePort": 30060}]}),
    );
    let f = frontends(&s, &[local_mix()]);
    let (_, cip) = f.iter().find(|(fr, _)| fr.port == 80).unwrap();
    assert_eq!(cip.flags, SVC_FLAG_CLUSTER_IP | SVC_FLAG_INT_LOCAL);
    assert_eq!(cip.backends, vec![be("10.244.1.1", 9376)]);
    let (_, np) = f.iter().find(|(fr, _)| fr.port == 30060).unwrap();
    assert_eq!(np.flags, SVC_FLAG_NODE_PORT);
    assert_eq!(
        np.backends,
        vec![be("10.244.1.1", 9376), be("10.244.2.1", 9376)]
    );
}

#[test]
fn external_traffic_policy_local_gives_external_frontends_a_local_and_a_cluster_scope() {
    let s = svc_full(
        json!({"name": "m"}),
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.60", "externalTrafficPolicy": "Local",
               "externalIPs": ["203.0.113.1"], "ports": [{"port": 80, "nodePort": 30060}]}),
        json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}),
    );
    let f = frontends(&s, &[local_mix()]);
    let both = vec![be("10.244.1.1", 9376), be("10.244.2.1", 9376)];
    let local = vec![be("10.244.1.1", 9376)];
    let got = |addr: &str, port: u16, scope: u8| {
        let want = Frontend {
            scope,
            ..fe(addr, port, Proto::Tcp)
        };
        f.iter()
            .find(|(fr, _)| *fr == want)
            .map(|(_, st)| st.clone())
    };
    // ClusterIP: one SCOPE_EXT entry, every endpoint (iTP Cluster).
    let cip = got("10.96.0.60", 80, SCOPE_EXT).unwrap();
    assert_eq!((cip.flags, &cip.backends), (SVC_FLAG_CLUSTER_IP, &both));
    assert!(got("10.96.0.60", 80, SCOPE_INT).is_none());
    for (addr, port, kind) in [
        ("192.168.1.10", 30060, SVC_FLAG_NODE_PORT),
        ("198.51.100.1", 80, SVC_FLAG_LOAD_BALANCER),
        ("203.0.113.1", 80, SVC_FLAG_EXTERNAL_IP),
    ] {
        // Clients from outside: this node's endpoints only.
        let ext = got(addr, port, SCOPE_EXT).unwrap();
        assert_eq!(
            ext.flags,
            kind | SVC_FLAG_EXT_LOCAL | SVC_FLAG_TWO_SCOPES,
            "{addr}"
        );
        assert_eq!(ext.backends, local, "{addr}");
        // Pods: every endpoint, kube-proxy's cluster chain.
        let int = got(addr, port, SCOPE_INT).unwrap();
        assert_eq!(int.flags, kind, "{addr}");
        assert_eq!(int.backends, both, "{addr}");
    }
    assert_eq!(f.len(), 7);
    // The two scopes are adjacent, SCOPE_EXT first (the planner and the conflict rule rely on it).
    let i = f
        .iter()
        .position(|(fr, _)| *fr == fe("198.51.100.1", 80, Proto::Tcp))
        .unwrap();
    assert_eq!(f[i + 1].0.scope, SCOPE_INT);
    // Cluster policy: one SCOPE_EXT entry per external frontend, every endpoint.
    let mut cluster = s.clone();
    cluster.spec.as_mut().unwrap().external_traffic_policy = Some("Cluster".into());
    let f = frontends(&cluster, &[local_mix()]);
    assert_eq!(f.len(), 4);
    assert!(f
        .iter()
        .all(|(fr, st)| fr.scope == SCOPE_EXT && st.backends == both));
}

#[test]
fn external_traffic_policy_local_without_local_endpoints_drops_unless_there_are_none_at_all() {
    let s = svc(
        "m",
        json!({"type": "NodePort", "clusterIP": "10.96.0.60", "externalTrafficPolicy": "Local",
               "ports": [{"port": 80, "nodePort": 30060}]}),
    );
    let np = fe("192.168.1.10", 30060, Proto::Tcp);
    let ext_int = |slices: &[EndpointSlice]| {
        let f = frontends(&s, slices);
        let get = |fr: Frontend| f.iter().find(|(x, _)| *x == fr).unwrap().1.clone();
        (get(np), get(np.with_scope(SCOPE_INT)))
    };
    // Endpoints only elsewhere: drop (SVC_FLAG_DROP_NO_LOCAL), pods still use them.
    let remote = slice(
        "m",
        "m",
        json!([{"port": 9376}]),
        json!([ep_cond("10.244.2.1", None, None, None, "node-b")]),
    );
    let (ext, int) = ext_int(&[remote]);
    assert!(ext.backends.is_empty());
    assert_eq!(
        ext.flags,
        SVC_FLAG_NODE_PORT | SVC_FLAG_EXT_LOCAL | SVC_FLAG_TWO_SCOPES | SVC_FLAG_DROP_NO_LOCAL
    );
    assert_eq!(int.backends, vec![be("10.244.2.1", 9376)]);
    // Only a draining endpoint elsewhere is still an endpoint (kube-proxy's hasEndpoints).
    let draining = slice(
        "m",
        "m",
        json!([{"port": 9376}]),
        json!([ep_cond(
            "10.244.2.1",
            Some(false),
            Some(true),
            Some(true),
            "node-b"
        )]),
    );
    let (ext, int) = ext_int(&[draining]);
    assert_ne!(ext.flags & SVC_FLAG_DROP_NO_LOCAL, 0);
    assert_eq!(
        int.flags,
        SVC_FLAG_NODE_PORT | SVC_FLAG_TERMINATING_FALLBACK
    );
    // No endpoint anywhere: refuse as any Service without endpoints.
    let (ext, int) = ext_int(&[]);
    assert_eq!(ext.flags & SVC_FLAG_DROP_NO_LOCAL, 0);
    assert!(ext.backends.is_empty() && int.backends.is_empty());
    // A local endpoint: served, no drop flag.
    let (ext, _) = ext_int(&[local_mix()]);
    assert_eq!(ext.flags & SVC_FLAG_DROP_NO_LOCAL, 0);
    assert_eq!(ext.backends, vec![be("10.244.1.1", 9376)]);
}

#[test]
fn backends_on_this_node_are_marked_local_by_node_name() {
    let s = svc(
        "m",
        json!({"type": "NodePort", "clusterIP": "10.96.0.60", "ports": [{"port": 80, "nodePort": 30060}]}),
    );
    let f = frontends(&s, &[local_mix()]);
    for (_, st) in &f {
        assert_eq!(st.backends.len(), 2);
        assert_eq!(st.local, BTreeSet::from([be("10.244.1.1", 9376)]));
    }
    // A node without a name: nothing is local (not even endpoints without nodeName).
    let nameless = lb_model::NodeInfo {
        name: String::new(),
        addresses: vec![NODE_IP],
    };
    let mut no_node = local_mix();
    no_node
        .endpoints
        .get_or_insert_with(Vec::new)
        .push(serde_json::from_value(ep("10.244.3.1")).unwrap());
    let (f, _) = service_frontends(&s, [no_node].iter(), &nameless, &cfg());
    assert!(f.iter().all(|(_, st)| st.local.is_empty()));
}

#[test]
fn load_balancer_source_ranges_restrict_the_ingress_ip_frontends_only() {
    let s = svc_full(
        json!({"name": "lb"}),
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.40", "externalIPs": ["203.0.113.9"],
               "loadBalancerSourceRanges": ["10.0.0.0/8", " 192.0.2.7/24 ", "fd00::/64"],
               "ports": [{"port": 443, "nodePort": 30443}]}),
        json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}),
    );
    let f = frontends(&s, &[]);
    let ranges = BTreeSet::from([
        ("10.0.0.0".parse().unwrap(), 8),
        ("192.0.2.0".parse().unwrap(), 24),
    ]);
    for (fr, st) in &f {
        if *fr == fe("198.51.100.1", 443, Proto::Tcp) {
            assert_eq!(st.flags, SVC_FLAG_LOAD_BALANCER | SVC_FLAG_SOURCE_RANGES);
            assert_eq!(st.src_ranges, ranges);
        } else {
            assert_eq!(st.flags & SVC_FLAG_SOURCE_RANGES, 0, "{fr}");
            assert!(st.src_ranges.is_empty(), "{fr}");
        }
    }
    assert_eq!(f.len(), 4);
    // eTP Local: the SCOPE_EXT entry carries flag and ranges (the datapath checks that master;
    // the trie key has no scope), the SCOPE_INT entry neither.
    let mut local = s.clone();
    local.spec.as_mut().unwrap().external_traffic_policy = Some("Local".into());
    let f = frontends(&local, &[]);
    let lb = fe("198.51.100.1", 443, Proto::Tcp);
    let get = |fr: Frontend| f.iter().find(|(x, _)| *x == fr).unwrap().1.clone();
    assert_ne!(get(lb).flags & SVC_FLAG_SOURCE_RANGES, 0);
    assert_eq!(get(lb).src_ranges, ranges);
    let int = get(lb.with_scope(SCOPE_INT));
    assert_eq!(int.flags & SVC_FLAG_SOURCE_RANGES, 0);
    assert!(int.src_ranges.is_empty());
    // Not a LoadBalancer: the field means nothing.
    let mut np = s.clone();
    np.spec.as_mut().unwrap().type_ = Some("NodePort".into());
    assert!(frontends(&np, &[])
        .iter()
        .all(|(_, st)| st.flags & SVC_FLAG_SOURCE_RANGES == 0));
}

#[test]
fn invalid_source_ranges_are_problems_and_never_open_the_service_to_everyone() {
    let with = |ranges: serde_json::Value| {
        let s = svc_full(
            json!({"name": "lb"}),
            json!({"type": "LoadBalancer", "clusterIP": "10.96.0.40",
                   "loadBalancerSourceRanges": ranges, "ports": [{"port": 443, "nodePort": 30443}]}),
            json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}),
        );
        let (f, p) = run(&s, &[]);
        let st = f
            .into_iter()
            .find(|(x, _)| *x == fe("198.51.100.1", 443, Proto::Tcp))
            .unwrap()
            .1;
        (st, p)
    };
    // An invalid entry is skipped (kube-proxy does too), the valid ones apply.
    let (st, p) = with(json!(["10.0.0.0/8", "10.0.0.0/33", "nope"]));
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(p.iter().all(|p| p.kind == "invalid_service"));
    assert_eq!(st.src_ranges.len(), 1);
    assert_ne!(st.flags & SVC_FLAG_SOURCE_RANGES, 0);
    // Nothing valid left: the flag with no range drops every client (fail closed).
    let (st, p) = with(json!(["nope"]));
    assert_eq!(p.len(), 1);
    assert_ne!(st.flags & SVC_FLAG_SOURCE_RANGES, 0);
    assert!(st.src_ranges.is_empty());
    // Only IPv6 ranges: no IPv4 client is allowed in, and that is no problem.
    let (st, p) = with(json!(["fd00::/8"]));
    assert!(p.is_empty());
    assert_ne!(st.flags & SVC_FLAG_SOURCE_RANGES, 0);
    assert!(st.src_ranges.is_empty());
    // An empty list restricts nothing.
    let (st, p) = with(json!([]));
    assert!(p.is_empty());
    assert_eq!(st.flags, SVC_FLAG_LOAD_BALANCER);
}

#[test]
fn nodeport_addresses_limit_the_node_addresses_that_serve_node_ports() {
    let s = svc(
        "np",
        json!({"type": "NodePort", "clusterIP": "10.96.0.30", "ports": [{"port": 80, "nodePort": 30080}]}),
    );
    let n = lb_model::NodeInfo {
        name: NODE.into(),
        addresses: vec![NODE_IP, "10.0.0.10".parse().unwrap()],
    };
    let node_ports = |cfg: &Config| {
        let (f, p) = service_frontends(&s, [].iter(), &n, cfg);
        assert!(p.is_empty());
        f.into_iter()
            .filter(|(_, st)| st.flags & SVC_FLAG_NODE_PORT != 0)
            .map(|(fr, _)| fr.addr.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(node_ports(&cfg()), ["10.0.0.10", "192.168.1.10"]);
    let only = Config {
        nodeport_addresses: vec![("192.168.1.0".parse().unwrap(), 24)],
        ..cfg()
    };
    assert_eq!(node_ports(&only), ["192.168.1.10"]);
    let two = Config {
        nodeport_addresses: vec![
            ("192.168.1.0".parse().unwrap(), 24),
            ("10.0.0.10".parse().unwrap(), 32),
        ],
        ..cfg()
    };
    assert_eq!(node_ports(&two), ["10.0.0.10", "192.168.1.10"]);
    let none = Config {
        nodeport_addresses: vec![("172.16.0.0".parse().unwrap(), 12)],
        ..cfg()
    };
    assert!(node_ports(&none).is_empty());
}

#[test]
fn node_port_outside_the_range_is_a_problem_for_that_port_only() {
    let s = svc(
        "np",
        json!({"type": "NodePort", "clusterIP": "10.96.0.30", "ports": [
            {"name": "a", "port": 80, "nodePort": 8080},
            {"name": "b", "port": 81, "nodePort": 30081}]}),
    );
    let (f, p) = run(&s, &[]);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].reason
            .contains("outside the NodePort range 30000-32767"),
        "{}",
        p[0]
    );
    let got: Vec<Frontend> = f.iter().map(|(fr, _)| *fr).collect();
    assert_eq!(
        got,
        vec![
            fe("10.96.0.30", 80, Proto::Tcp),
            fe("10.96.0.30", 81, Proto::Tcp),
            fe("192.168.1.10", 30081, Proto::Tcp),
        ],
        "the ClusterIP of port a stays, its NodePort goes"
    );
    let wide = Config {
        nodeport_range: (8000, 32767),
        ..cfg()
    };
    let (f, p) = service_frontends(&s, [].iter(), &node(), &wide);
    assert!(p.is_empty());
    assert!(f
        .iter()
        .any(|(fr, _)| *fr == fe("192.168.1.10", 8080, Proto::Tcp)));
}

#[test]
fn local_policy_falls_back_to_local_terminating_endpoints_and_never_to_remote_ones() {
    let s = svc(
        "m",
        json!({"clusterIP": "10.96.0.60", "internalTrafficPolicy": "Local", "ports": [{"port": 80}]}),
    );
    let sl = slice(
        "m",
        "m",
        json!([{"port": 9376}]),
        json!([
            ep_cond("10.244.2.1", None, None, None, "node-b"),
            ep_cond("10.244.1.2", Some(false), Some(true), Some(true), NODE),
        ]),
    );
    let st = only(&s, &[sl]);
    assert_eq!(st.backends, vec![be("10.244.1.2", 9376)]);
    assert_eq!(
        st.flags,
        SVC_FLAG_CLUSTER_IP | SVC_FLAG_INT_LOCAL | SVC_FLAG_TERMINATING_FALLBACK
    );
    let remote_only = slice(
        "m",
        "m",
        json!([{"port": 9376}]),
        json!([ep_cond("10.244.2.1", None, None, None, "node-b")]),
    );
    assert!(
        only(&s, &[remote_only]).backends.is_empty(),
        "no local endpoint: refuse, do not go remote"
    );
}

#[test]
fn session_affinity_client_ip_sets_flag_and_timeout() {
    let a = svc(
        "a",
        json!({"clusterIP": "10.96.0.70", "sessionAffinity": "ClientIP", "ports": [{"port": 80}]}),
    );
    let st = only(&a, &[]);
    assert_eq!(st.flags, SVC_FLAG_CLUSTER_IP | SVC_FLAG_AFFINITY);
    assert_eq!(st.affinity_timeout, 10_800);
    let b = svc(
        "b",
        json!({"clusterIP": "10.96.0.71", "sessionAffinity": "ClientIP",
               "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}, "ports": [{"port": 80}]}),
    );
    assert_eq!(only(&b, &[]).affinity_timeout, 60);
    let none = svc(
        "c",
        json!({"clusterIP": "10.96.0.72", "sessionAffinity": "None", "ports": [{"port": 80}]}),
    );
    assert_eq!(
        (only(&none, &[]).flags, only(&none, &[]).affinity_timeout),
        (SVC_FLAG_CLUSTER_IP, 0)
    );
}

#[test]
fn service_without_endpoints_still_has_its_frontends_with_no_backends() {
    let st = only(&cluster_svc("empty", "10.96.0.90"), &[]);
    assert!(st.backends.is_empty());
    assert_eq!(st.flags, SVC_FLAG_CLUSTER_IP);
}

#[test]
fn two_ports_claiming_one_frontend_keep_the_first() {
    let s = svc(
        "dup",
        json!({"clusterIP": "10.96.0.91", "ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80}]}),
    );
    let (f, p) = run(&s, &[]);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].1.port_name, "a");
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].kind, "frontend_conflict");
}
