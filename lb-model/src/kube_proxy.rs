//! kube-proxy's rules turning one Service and its EndpointSlices into frontends and backends.
//!
//! Kept apart from [`crate::desired::DesiredState`] (which only files the results by frontend and
//! owner) so every rule here is a pure function of (Service, slices, node, config).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_common::{
    SCOPE_EXT, SCOPE_INT, SVC_FLAG_AFFINITY, SVC_FLAG_CLUSTER_IP, SVC_FLAG_DROP_NO_LOCAL,
    SVC_FLAG_EXTERNAL_IP, SVC_FLAG_EXT_LOCAL, SVC_FLAG_INT_LOCAL, SVC_FLAG_LOAD_BALANCER,
    SVC_FLAG_NODE_PORT, SVC_FLAG_SOURCE_RANGES, SVC_FLAG_TERMINATING_FALLBACK, SVC_FLAG_TWO_SCOPES,
};

use crate::cidr::{self, Cidr};
use crate::desired::FrontendState;
use crate::slice::{NodeNames, Slice};
use crate::state::{object_key, Algorithm, Config, NodeInfo, ServiceKey, ALGORITHM_ANNOTATION};
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
///
/// Every frontend is a `SCOPE_EXT` entry, except that each external frontend (NodePort on a
/// node address, LoadBalancer ingress IP, externalIP) of an externalTrafficPolicy Local Service
/// comes twice: `SCOPE_EXT` with this node's endpoints only and `SVC_FLAG_TWO_SCOPES` (clients
/// from outside), and `SCOPE_INT` with every endpoint (pods on this node: kube-proxy sends pod
/// traffic to an external address of such a Service through its "cluster" chain, subject to
/// neither traffic policy, as if it had gone out to the load balancer and come back in). The
/// two are adjacent in the sorted output (the scope is the last field of [`Frontend`]).
///
/// The slices as k8s-openapi objects; [`service_frontends_of`] takes them in the state's form.
pub fn service_frontends<'a>(
    svc: &Service,
    slices: impl Iterator<Item = &'a EndpointSlice>,
    node: &NodeInfo,
    cfg: &Config,
) -> (Vec<(Frontend, FrontendState)>, Vec<Problem>) {
    let mut names = NodeNames::default();
    let slices: Vec<Slice> = slices.map(|s| Slice::from_k8s(s, &mut names)).collect();
    service_frontends_of(svc, slices.iter(), node, cfg)
}

/// [`service_frontends`] of slices in the form [`crate::ClusterState`] keeps them.
pub fn service_frontends_of<'a>(
    svc: &Service,
    slices: impl Iterator<Item = &'a Slice>,
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
    let src_ranges = source_ranges(spec, &object, &mut problems);
    let mut ctx = Ctx {
        key: &key,
        object: &object,
        spec,
        cfg,
        cluster_ips,
        external_ips: parse_v4_list(
            spec.external_ips.iter().flatten(),
            &object,
            "externalIP",
            &mut problems,
        ),
        lb_ips: load_balancer_ips(svc, &object, &mut problems),
        src_ranges,
        node,
        affinity: affinity(spec),
        algorithm: algorithm(svc, cfg, &object, &mut problems).flag(),
        // A slice of another family is empty in this form.
        slices: slices.collect(),
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
pub(crate) fn skipped(svc: &Service, spec: &ServiceSpec, cfg: &Config) -> bool {
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

pub(crate) enum ClusterIps {
    V4(Vec<Ipv4Addr>),
    /// Only IPv6 (or unparsable) cluster IPs: not ours to serve (IPv4 datapath).
    OtherFamily,
    Unset,
}

/// `spec.clusterIPs` (or `spec.clusterIP` when the list is absent), IPv4 only.
pub(crate) fn cluster_ipv4s(spec: &ServiceSpec) -> ClusterIps {
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

/// `spec.loadBalancerSourceRanges` of a LoadBalancer Service: `None` when it lists none (every
/// client may use the LoadBalancer IPs), else the IPv4 ranges allowed in.
///
/// An invalid entry is a problem and is skipped, as kube-proxy skips it; the valid ones still
/// apply. But the list is never widened to "everyone" by a bad or foreign entry: when it lists
/// ranges and none is a valid IPv4 CIDR (all invalid, or all IPv6), the result is `Some` of an
/// empty set, so the frontends get `SVC_FLAG_SOURCE_RANGES` with no range and drop every IPv4
/// client. kube-proxy would leave such a Service open to all; the Service's owner asked for a
/// restriction, and failing closed keeps it (a fixed list opens it again at once).
fn source_ranges(
    spec: &ServiceSpec,
    object: &str,
    problems: &mut Vec<Problem>,
) -> Option<BTreeSet<Cidr>> {
    if spec.type_.as_deref() != Some("LoadBalancer") {
        return None;
    }
    let list = spec
        .load_balancer_source_ranges
        .as_deref()
        .unwrap_or_default();
    if list.is_empty() {
        return None;
    }
    let mut out = BTreeSet::new();
    for s in list {
        match cidr::parse(s) {
            Ok(cidr::Parsed::V4(c)) => {
                out.insert(c);
            }
            Ok(cidr::Parsed::V6) => {}
            Err(e) => problems.push(problem(
                object,
                "invalid_service",
                format!("loadBalancerSourceRanges: {e}; skipped"),
            )),
        }
    }
    Some(out)
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

/// How the Service's new flows pick a backend: its [`ALGORITHM_ANNOTATION`], else
/// `--lb-algorithm`. An unknown value is a problem, and the Service uses the default.
fn algorithm(svc: &Service, cfg: &Config, object: &str, problems: &mut Vec<Problem>) -> Algorithm {
    let value = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ALGORITHM_ANNOTATION));
    match value.map(|v| Algorithm::parse(v.trim())) {
        None => cfg.lb_algorithm,
        Some(Ok(a)) => a,
        Some(Err(e)) => {
            problems.push(problem(
                object,
                "invalid_service",
                format!(
                    "annotation {ALGORITHM_ANNOTATION}: {e}; using the default {}",
                    cfg.lb_algorithm
                ),
            ));
            cfg.lb_algorithm
        }
    }
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
/// (The conversion to [`Slice`] resolved the API's defaults: a missing `ready` means ready,
/// a missing `serving` follows `ready`; the address is the endpoint's first.)
fn endpoints(
    slices: &[&Slice],
    name: &str,
    proto: Proto,
    node: &str,
) -> BTreeMap<BackendAddr, Conditions> {
    let mut out: BTreeMap<BackendAddr, Conditions> = BTreeMap::new();
    for slice in slices {
        let Some(port) = slice.port(name, proto) else {
            continue;
        };
        for ep in slice.endpoints.iter() {
            let cond = Conditions {
                ready: ep.ready,
                serving: ep.serving,
                terminating: ep.terminating,
                local: ep.on_node(node),
            };
            let b = BackendAddr {
                addr: ep.addr,
                port,
                proto,
            };
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
    cfg: &'a Config,
    cluster_ips: Vec<Ipv4Addr>,
    external_ips: Vec<Ipv4Addr>,
    lb_ips: Vec<Ipv4Addr>,
    /// [`source_ranges`]: applied to the LoadBalancer ingress IP frontends only.
    src_ranges: Option<BTreeSet<Cidr>>,
    node: &'a NodeInfo,
    affinity: (u32, u32),
    /// `SVC_FLAG_ALG_*` of every frontend of the Service ([`algorithm`]).
    algorithm: u32,
    slices: Vec<&'a Slice>,
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
        // kube-proxy's "cluster" endpoints (every node) and, for a Local policy, this node's.
        let cluster = select(&eps, false);
        let local = select(&eps, true);
        let internal = if int_local { &local } else { &cluster };

        let mut fronts: Vec<(Ipv4Addr, u16, u32)> = Vec::new();
        fronts.extend(
            self.cluster_ips
                .iter()
                .map(|ip| (*ip, port, SVC_FLAG_CLUSTER_IP)),
        );
        let ty = self.spec.type_.as_deref().unwrap_or("ClusterIP");
        if matches!(ty, "NodePort" | "LoadBalancer") {
            match sp.node_port.map(valid_port) {
                Some(Some(np)) if !self.cfg.is_nodeport_in_range(np) => problems.push(problem(
                    self.object,
                    "invalid_service",
                    format!(
                        "{what}: nodePort {np} is outside the NodePort range {}-{}",
                        self.cfg.nodeport_range.0, self.cfg.nodeport_range.1
                    ),
                )),
                Some(Some(np)) => fronts.extend(
                    self.node
                        .addresses
                        .iter()
                        .filter(|ip| self.cfg.is_nodeport_address(**ip))
                        .map(|ip| (*ip, np, SVC_FLAG_NODE_PORT)),
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
                .map(|ip| (*ip, port, SVC_FLAG_LOAD_BALANCER)),
        );
        fronts.extend(
            self.external_ips
                .iter()
                .map(|ip| (*ip, port, SVC_FLAG_EXTERNAL_IP)),
        );

        for (addr, fport, kind) in fronts {
            let fe = Frontend {
                addr,
                port: fport,
                proto,
                scope: SCOPE_EXT,
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
            let ranges = match &self.src_ranges {
                Some(r) if kind == SVC_FLAG_LOAD_BALANCER => Some(r),
                _ => None,
            };
            if kind == SVC_FLAG_CLUSTER_IP {
                let policy = if int_local { SVC_FLAG_INT_LOCAL } else { 0 };
                let st = self.state(&port_name, internal, kind | policy, &eps);
                self.out.insert(fe, st);
            } else if !ext_local {
                let mut st = self.state(&port_name, &cluster, kind, &eps);
                if let Some(r) = ranges {
                    st.flags |= SVC_FLAG_SOURCE_RANGES;
                    st.src_ranges = r.clone();
                }
                self.out.insert(fe, st);
            } else {
                // Clients from outside: this node's endpoints only. None here while the
                // Service has endpoints elsewhere: drop (kube-proxy's "has no local endpoints"
                // DROP, so a load balancer's health check moves the traffic away), not refuse.
                let mut flags = kind | SVC_FLAG_EXT_LOCAL | SVC_FLAG_TWO_SCOPES;
                if local.0.is_empty() && !cluster.0.is_empty() {
                    flags |= SVC_FLAG_DROP_NO_LOCAL;
                }
                let mut ext = self.state(&port_name, &local, flags, &eps);
                if let Some(r) = ranges {
                    ext.flags |= SVC_FLAG_SOURCE_RANGES;
                    ext.src_ranges = r.clone();
                }
                // Pods: every endpoint. Only read through the SCOPE_EXT master's
                // SVC_FLAG_TWO_SCOPES, so the source-range flag (checked on that master) and
                // the ranges (keyed without scope) stay with SCOPE_EXT.
                let int = self.state(&port_name, &cluster, kind, &eps);
                self.out.insert(fe, ext);
                self.out.insert(fe.with_scope(SCOPE_INT), int);
            }
        }
        Ok(())
    }

    /// A frontend of this Service port with the selected backends `(backends, fallback)` and
    /// `flags` (plus the Service's affinity, and the fallback flag when the backends are the
    /// serving+terminating ones).
    fn state(
        &self,
        port_name: &str,
        (backends, fallback): &(Vec<BackendAddr>, bool),
        flags: u32,
        eps: &BTreeMap<BackendAddr, Conditions>,
    ) -> FrontendState {
        let fallback = if *fallback {
            SVC_FLAG_TERMINATING_FALLBACK
        } else {
            0
        };
        FrontendState {
            service: self.key.clone(),
            port_name: port_name.to_string(),
            backends: backends.clone(),
            flags: flags | self.affinity.0 | self.algorithm | fallback,
            affinity_timeout: self.affinity.1,
            local: backends
                .iter()
                .filter(|b| eps.get(b).is_some_and(|c| c.local))
                .copied()
                .collect(),
            src_ranges: BTreeSet::new(),
        }
    }
}

fn valid_port(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}
