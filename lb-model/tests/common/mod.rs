//! Builders for the k8s objects the tests feed the model, from compact JSON.
#![allow(dead_code)]

pub mod sim;

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_model::{BackendAddr, Config, Frontend, NodeInfo, Proto, SvcKey};
use serde_json::{json, Value};

pub const NODE: &str = "node-a";
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);

pub fn node() -> NodeInfo {
    NodeInfo {
        name: NODE.to_string(),
        addresses: vec![NODE_IP],
    }
}

pub fn cfg() -> Config {
    Config::default()
}

pub fn key(ns: &str, name: &str) -> SvcKey {
    SvcKey {
        namespace: ns.to_string(),
        name: name.to_string(),
    }
}

/// A Service `name` in namespace "default" with the given spec.
pub fn svc(name: &str, spec: Value) -> Service {
    svc_full(
        json!({"name": name, "namespace": "default"}),
        spec,
        json!({}),
    )
}

pub fn svc_full(metadata: Value, spec: Value, status: Value) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": spec, "status": status,
    }))
    .expect("test Service")
}

/// A ClusterIP Service with one TCP port 80 -> targetPort 9376.
pub fn cluster_svc(name: &str, ip: &str) -> Service {
    svc(
        name,
        json!({"clusterIP": ip, "ports": [{"port": 80, "targetPort": 9376}]}),
    )
}

/// An IPv4 EndpointSlice of Service `service` in namespace "default".
pub fn slice(name: &str, service: &str, ports: Value, endpoints: Value) -> EndpointSlice {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "ports": ports, "endpoints": endpoints,
    }))
    .expect("test EndpointSlice")
}

/// An endpoint that is ready (conditions left to their nil defaults).
pub fn ep(ip: &str) -> Value {
    json!({"addresses": [ip]})
}

/// An endpoint with explicit conditions and node.
pub fn ep_cond(
    ip: &str,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
    node: &str,
) -> Value {
    json!({"addresses": [ip], "nodeName": node,
           "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
}

/// A slice with the unnamed TCP port 9376 and ready endpoints `ips`.
pub fn simple_slice(name: &str, service: &str, ips: &[&str]) -> EndpointSlice {
    let eps: Vec<Value> = ips.iter().map(|ip| ep(ip)).collect();
    slice(
        name,
        service,
        json!([{"port": 9376, "protocol": "TCP"}]),
        json!(eps),
    )
}

pub fn fe(addr: &str, port: u16, proto: Proto) -> Frontend {
    Frontend {
        addr: addr.parse().unwrap(),
        port,
        proto,
        scope: lb_common::SCOPE_EXT,
    }
}

pub fn be(addr: &str, port: u16) -> BackendAddr {
    BackendAddr {
        addr: addr.parse().unwrap(),
        port,
        proto: Proto::Tcp,
    }
}
