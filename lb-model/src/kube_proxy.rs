//! kube-proxy's rules turning one Service and its EndpointSlices into frontends and backends.
//!
//! Kept apart from [`crate::desired::DesiredState`] (which only files the results by frontend and
//! owner) so every rule here is a pure function of (Service, slices, node, config).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_common::{
    SCOPE_EXT, SVC_FLAG_AFFINITY, SVC_FLAG_CLUSTER_IP, SVC_FLAG_EXTERNAL_IP, SVC_FLAG_EXT_LOCAL,
    SVC_FLAG_INT_LOCAL, SVC_FLAG_LOAD_BALANCER, SVC_FLAG_NODE_PORT, SVC_FLAG_TERMINATING_FALLBACK,
};

use crate::desired::FrontendState;
use crate::state::{object_key, Config, NodeInfo, ServiceKey};
use crate::{BackendAddr, Frontend, Problem, Proto};

/// Present on Services that must not get a virtual IP (kube-proxy skips them).
const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Delegates a Service to another proxy (kube-proxy skips it unless the name is its own).
const LABEL_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// sessionAffinityConfig.clientIP.timeoutSeconds default (3 hours), as the API server defaults it.
const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// The frontends of one Service (pure kube-proxy semantics), sorted, plus the problems met.
/// Skipped Services (ExternalName, headless, another proxy's, IPv6-only) give no frontends and no
/// problem; an invalid port is a problem for that port only.
pub fn service_frontends<'a>(
    svc: &Service,
    slices: impl Iterator<Item = &'a EndpointSlice>,
    node: &NodeInfo,
    cfg: &Config,
) -> (Vec<(Frontend, FrontendState)>, Vec<Problem>) {
    let mut problems = Vec::new();
    let Some(key) = object_key(&svc.metadata) else {
        problems.push(problem(
            "Service",
            "invalid_service",
            "metadata.name is missing".into(),
        ));
        return (Vec::new(), problems);
    };
    let Some(spec) = svc.spec.as_ref() else {
        problems.push(problem(&key, "invalid_service", "spec is missing".into()));
        return (Vec::new(), problems);
    };
    if skipped(svc, spec, cfg) {
        return (Vec::new(), problems);
    }
    let object = key.to_string();
    let cluster_ips = match cluster_ipv4s(spec) {
        ClusterIps::V4(ips) => ips,
        ClusterIps::OtherFamily => return (Vec::new(), problems),
        ClusterIps::Unset => {
            problems.push(problem(
                &object,
                "invalid_service",
                "spec.clusterIP is not set".into(),
            ));
            return (Vec::new(), problems);
        }
    };
    let mut ctx = Ctx {
        key: &key,
        object: &object,
        spec,
        cluster_ips,
        external_ips: parse_v4_list(
            spec.external_ips.iter().flatten(),
            &object,
            "externalIP",
            &mut problems,
        ),
        lb_ips: load_balancer_ips(svc, &object, &mut problems),
        node,
        affinity: affinity(spec),
        slices: slices.filter(|s| s.address_type == "IPv4").collect(),
        out: BTreeMap::new(),
    };
    for port in spec.ports.iter().flatten() {
        if let Err(p) = ctx.add_port(port, &mut problems) {
            problems.push(p);
        }
    }
    (ctx.out.into_iter().collect(), problems)
}

fn problem(object: &(impl ToString + ?Sized), kind: &'static str, reason: String) -> Problem {
    Problem {
        object: object.to_string(),
        kind,
        reason,
    }
}

/// Services kube-proxy does not program at all.
fn skipped(svc: &Service, spec: &ServiceSpec, cfg: &Config) -> bool {
    if spec.type_.as_deref() == Some("ExternalName") {
        return true;
    }
    let labels = svc.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS)) {
        return true;
    }
    if let Some(proxy) = labels.and_then(|l| l.get(LABEL_PROXY_NAME)) {
        if cfg.service_proxy_name.as_deref() != Some(proxy.as_str()) {
            return true;
        }
    }
    let headless = |ip: &str| ip == "None";
    spec.cluster_ip.as_deref().is_some_and(headless)
        || spec.cluster_ips.iter().flatten().any(|ip| headless(ip))
}

enum ClusterIps {
    V4(Vec<Ipv4Addr>),
    /// Only IPv6 (or unparsable) cluster IPs: not ours to serve (IPv4 datapath).
    OtherFamily,
    Unset,
}

/// `spec.clusterIPs` (or `spec.clusterIP` when the list is absent), IPv4 only.
fn cluster_ipv4s(spec: &ServiceSpec) -> ClusterIps {
    let list: Vec<&str> = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    let list: Vec<&str> = list.into_iter().filter(|s| !s.is_empty()).collect();
    if list.is_empty() {
        return ClusterIps::Unset;
    }
    let v4: Vec<Ipv4Addr> = list.iter().filter_map(|s| s.parse().ok()).collect();
    if v4.is_empty() {
        ClusterIps::OtherFamily
    } else {
        ClusterIps::V4(v4)
    }
}

/// IPv4 addresses of a list; IPv6 ones are ignored, unparsable ones are problems.
fn parse_v4_list<'a>(
    list: impl Iterator<Item = &'a String>,
    object: &str,
    what: &str,
    problems: &mut Vec<Problem>,
) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for s in list {
        match s.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => out.push(ip),
            Ok(IpAddr::V6(_)) => {}
            Err(_) => problems.push(problem(
                object,
                "invalid_service",
                format!("{what} {s:?} is not an IP"),
            )),
        }
    }
    out
}

/// `status.loadBalancer.ingress[].ip` of a LoadBalancer Service. Ingress points with
/// `ipMode: Proxy` are skipped, as kube-proxy does: the load balancer proxies to the nodes itself,
/// so capturing its IP locally would bypass it.
fn load_balancer_ips(svc: &Service, object: &str, problems: &mut Vec<Problem>) -> Vec<Ipv4Addr> {
    if svc.spec.as_ref().and_then(|s| s.type_.as_deref()) != Some("LoadBalancer") {
        return Vec::new();
    }
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref());
    let ips = ingress
        .into_iter()
        .flatten()
        .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|i| i.ip.as_ref());
    parse_v4_list(ips, object, "loadBalancer ingress IP", problems)
}

/// Affinity flag and timeout of every frontend of the Service.
fn affinity(spec: &ServiceSpec) -> (u32, u32) {
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return (0, 0);
    }
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
        .and_then(|t| u32::try_from(t).ok())
        .unwrap_or(DEFAULT_AFFINITY_TIMEOUT);
    (SVC_FLAG_AFFINITY, timeout)
}

/// Conditions of one endpoint, merged over the slices that list it.
#[derive(Clone, Copy, Debug, Default)]
struct Conditions {
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
}

impl Conditions {
    /// Preference when slices disagree about one address (transiently, while slices are
    /// rewritten): the more usable one wins, and "local" wins like in kube-proxy's slice cache.
    fn merge(self, other: Conditions) -> Conditions {
        let rank = |c: &Conditions| (c.ready, c.serving, !c.terminating);
        let mut best = if rank(&other) > rank(&self) {
            other
        } else {
            self
        };
        best.local = self.local || other.local;
        best
    }
}

/// The endpoints for a Service port: every IPv4 slice's port with the same name (unset == "") and
/// protocol; the slice port number is the backend port (how named targetPorts resolve).
fn endpoints(
    slices: &[&EndpointSlice],
    name: &str,
    proto: Proto,
    node: &str,
) -> BTreeMap<BackendAddr, Conditions> {
    let mut out: BTreeMap<BackendAddr, Conditions> = BTreeMap::new();
    for slice in slices {
        let matching = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == name
                && Proto::from_k8s(p.protocol.as_deref()) == Some(proto)
        });
        let Some(port) = matching
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            continue;
        };
        for ep in slice.endpoints.iter().flatten() {
            // The API calls the addresses fungible; kube-proxy uses the first one.
            let Some(addr) = ep
                .addresses
                .first()
                .and_then(|a| a.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let c = ep.conditions.as_ref();
            // nil ready means "unknown": interpret as ready (API docs); nil serving follows ready.
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let cond = Conditions {
                ready,
                serving: c.and_then(|c| c.serving).unwrap_or(ready),
                terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                local: !node.is_empty() && ep.node_name.as_deref() == Some(node),
            };
            let b = BackendAddr { addr, port, proto };
            out.entry(b)
                .and_modify(|held| *held = held.merge(cond))
                .or_insert(cond);
        }
    }
    out
}

/// kube-proxy's endpoint choice: the ready ones; when none is ready, the serving+terminating ones
/// (so connections drain gracefully instead of failing). Returns (sorted backends, fallback used).
fn select(eps: &BTreeMap<BackendAddr, Conditions>, local_only: bool) -> (Vec<BackendAddr>, bool) {
    let pool = || eps.iter().filter(move |(_, c)| !local_only || c.local);
    let ready: Vec<BackendAddr> = pool().filter(|(_, c)| c.ready).map(|(b, _)| *b).collect();
    if !ready.is_empty() {
        return (ready, false);
    }
    let draining: Vec<BackendAddr> = pool()
        .filter(|(_, c)| c.serving && c.terminating)
        .map(|(b, _)| *b)
        .collect();
    let fallback = !draining.is_empty();
    (draining, fallback)
}

/// Per-Service inputs shared by its ports, and the frontends collected so far.
struct Ctx<'a> {
    key: &'a ServiceKey,
    object: &'a str,
    spec: &'a ServiceSpec,
    cluster_ips: Vec<Ipv4Addr>,
    external_ips: Vec<Ipv4Addr>,
    lb_ips: Vec<Ipv4Addr>,
    node: &'a NodeInfo,
    affinity: (u32, u32),
    slices: Vec<&'a EndpointSlice>,
    out: BTreeMap<Frontend, FrontendState>,
}

impl Ctx<'_> {
    fn add_port(&mut self, sp: &ServicePort, problems: &mut Vec<Problem>) -> Result<(), Problem> {
        let port_name = sp.name.clone().unwrap_or_default();
        let what = if port_name.is_empty() {
            format!("port {}", sp.port)
        } else {
            format!("port {port_name:?}")
        };
        let proto = Proto::from_k8s(sp.protocol.as_deref()).ok_or_else(|| {
            problem(
                self.object,
                "invalid_service",
                format!("{what}: unsupported protocol {:?}", sp.protocol),
            )
        })?;
        let port = valid_port(sp.port).ok_or_else(|| {
            problem(
                self.object,
                "invalid_service",
                format!("{what}: invalid port number"),
            )
        })?;
        let eps = endpoints(&self.slices, &port_name, proto, &self.node.name);
        let int_local = self.spec.internal_traffic_policy.as_deref() == Some("Local");
        let ext_local = self.spec.external_traffic_policy.as_deref() == Some("Local");
        let internal = (
            select(&eps, int_local),
            if int_local { SVC_FLAG_INT_LOCAL } else { 0 },
        );
        let external = (
            select(&eps, ext_local),
            if ext_local { SVC_FLAG_EXT_LOCAL } else { 0 },
        );

        let mut fronts: Vec<(Ipv4Addr, u16, u32, bool)> = Vec::new();
        fronts.extend(
            self.cluster_ips
                .iter()
                .map(|ip| (*ip, port, SVC_FLAG_CLUSTER_IP, false)),
        );
        let ty = self.spec.type_.as_deref().unwrap_or("ClusterIP");
        if matches!(ty, "NodePort" | "LoadBalancer") {
            match sp.node_port.map(valid_port) {
                Some(Some(np)) => fronts.extend(
                    self.node
                        .addresses
                        .iter()
                        .map(|ip| (*ip, np, SVC_FLAG_NODE_PORT, true)),
                ),
                Some(None) => problems.push(problem(
                    self.object,
                    "invalid_service",
                    format!("{what}: invalid nodePort"),
                )),
                None => {}
            }
        }
        fronts.extend(
            self.lb_ips
                .iter()
                .map(|ip| (*ip, port, SVC_FLAG_LOAD_BALANCER, true)),
        );
        fronts.extend(
            self.external_ips
                .iter()
                .map(|ip| (*ip, port, SVC_FLAG_EXTERNAL_IP, true)),
        );

        for (addr, fport, kind, is_external) in fronts {
            let ((backends, fallback), policy) = if is_external { &external } else { &internal };
            let fe = Frontend {
                addr,
                port: fport,
                proto,
                scope: SCOPE_EXT,
            };
            let flags = kind
                | policy
                | self.affinity.0
                | if *fallback {
                    SVC_FLAG_TERMINATING_FALLBACK
                } else {
                    0
                };
            // The same address may come twice (an externalIP equal to the LB ingress IP): the
            // first kind listed wins; two ports claiming one frontend are a problem.
            if let Some(held) = self.out.get(&fe) {
                if held.port_name != port_name {
                    problems.push(problem(
                        self.object,
                        "frontend_conflict",
                        format!(
                            "{what}: frontend {fe} is already used by port {:?}",
                            held.port_name
                        ),
                    ));
                }
                continue;
            }
            self.out.insert(
                fe,
                FrontendState {
                    service: self.key.clone(),
                    port_name: port_name.clone(),
                    backends: backends.clone(),
                    flags,
                    affinity_timeout: self.affinity.1,
                },
            );
        }
        Ok(())
    }
}

fn valid_port(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}
