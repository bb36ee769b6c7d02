//! kube-proxy semantics of `service_frontends`: one test per rule.

mod common;

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
fn external_traffic_policy_local_uses_this_nodes_endpoints_for_external_frontends() {
    let s = svc_full(
        json!({"name": "m"}),
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.60", "externalTrafficPolicy": "Local",
               "externalIPs": ["203.0.113.1"], "ports": [{"port": 80, "nodePort": 30060}]}),
        json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}),
    );
    let f = frontends(&s, &[local_mix()]);
    for (fr, st) in &f {
        if fr.addr == "10.96.0.60".parse::<std::net::Ipv4Addr>().unwrap() {
            assert_eq!(st.flags, SVC_FLAG_CLUSTER_IP);
            assert_eq!(st.backends.len(), 2);
        } else {
            assert_eq!(st.flags & SVC_FLAG_EXT_LOCAL, SVC_FLAG_EXT_LOCAL, "{fr}");
            assert_eq!(st.backends, vec![be("10.244.1.1", 9376)], "{fr}");
        }
    }
    assert_eq!(f.len(), 4);
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
