//! Manifests for the agent's `--manifests` directory: generating Service + EndpointSlice YAML for
//! tests, reading the examples (which pods to create for them), and rewriting an endpoint's
//! readiness the way the endpoint controller would.
//!
//! Files are replaced atomically (write a dot-file, rename): the agent ignores dot-files and never
//! sees a half-written manifest.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde_yaml::Value;

use crate::error::{io_err, Error, Result};

/// The repository's examples/ directory.
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Write `text` to `path` atomically (temp dot-file in the same directory, then rename).
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("manifest");
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).map_err(io_err(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io_err(format!("renaming to {}", path.display())))
}

/// Copy every regular file of `src` into `dst` (created if missing).
pub fn copy_dir(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst).map_err(io_err(format!("creating {}", dst.display())))?;
    let rd = std::fs::read_dir(src).map_err(io_err(format!("reading {}", src.display())))?;
    for entry in rd {
        let entry = entry.map_err(io_err(format!("reading {}", src.display())))?;
        if entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
            std::fs::copy(entry.path(), dst.join(entry.file_name()))
                .map_err(io_err(format!("copying {}", entry.path().display())))?;
        }
    }
    Ok(())
}

/// One port of a generated Service.
#[derive(Clone, Debug)]
pub struct SvcPort {
    pub name: String,
    /// "TCP" or "UDP".
    pub proto: String,
    pub port: u16,
    pub target_port: u16,
    /// `nodePort` (written for NodePort and LoadBalancer Services only, see [`SvcOptions`]).
    pub node_port: Option<u16>,
}

impl SvcPort {
    pub fn tcp(name: &str, port: u16, target_port: u16) -> Self {
        SvcPort {
            name: name.into(),
            proto: "TCP".into(),
            port,
            target_port,
            node_port: None,
        }
    }
    pub fn udp(name: &str, port: u16, target_port: u16) -> Self {
        SvcPort {
            name: name.into(),
            proto: "UDP".into(),
            port,
            target_port,
            node_port: None,
        }
    }
    /// With `nodePort: port`.
    pub fn node_port(mut self, port: u16) -> Self {
        self.node_port = Some(port);
        self
    }
}

/// `spec.type` of a generated Service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SvcType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl SvcType {
    pub fn as_str(self) -> &'static str {
        match self {
            SvcType::ClusterIP => "ClusterIP",
            SvcType::NodePort => "NodePort",
            SvcType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// What a Service exposes besides its ClusterIP: its type (NodePort / LoadBalancer, whose ports'
/// `nodePort`s are written), the LoadBalancer's `status.loadBalancer.ingress` IPs (written by the
/// cloud controller in a real cluster), externalIPs, the traffic policies, the
/// healthCheckNodePort and loadBalancerSourceRanges. `Default`: a plain ClusterIP Service.
#[derive(Clone, Debug, Default)]
pub struct SvcOptions {
    pub type_: SvcType,
    pub ingress_ips: Vec<Ipv4Addr>,
    pub external_ips: Vec<Ipv4Addr>,
    /// `externalTrafficPolicy: Local` (else Cluster, the default, not written).
    pub external_local: bool,
    /// `internalTrafficPolicy: Local` (else Cluster, the default, not written).
    pub internal_local: bool,
    pub health_check_node_port: Option<u16>,
    /// `loadBalancerSourceRanges`, CIDRs as written.
    pub source_ranges: Vec<String>,
}

impl SvcOptions {
    /// `type: NodePort`.
    pub fn node_port() -> Self {
        SvcOptions {
            type_: SvcType::NodePort,
            ..Self::default()
        }
    }
    /// `type: LoadBalancer` with these ingress IPs in its status.
    pub fn load_balancer(ingress: &[Ipv4Addr]) -> Self {
        SvcOptions {
            type_: SvcType::LoadBalancer,
            ingress_ips: ingress.to_vec(),
            ..Self::default()
        }
    }
    pub fn external_ips(mut self, ips: &[Ipv4Addr]) -> Self {
        self.external_ips = ips.to_vec();
        self
    }
    /// `externalTrafficPolicy: Local`, with `healthCheckNodePort: hc` when given.
    pub fn external_local(mut self, hc: Option<u16>) -> Self {
        self.external_local = true;
        self.health_check_node_port = hc;
        self
    }
    /// `internalTrafficPolicy: Local`.
    pub fn internal_local(mut self) -> Self {
        self.internal_local = true;
        self
    }
    pub fn source_ranges(mut self, cidrs: &[&str]) -> Self {
        self.source_ranges = cidrs.iter().map(|c| c.to_string()).collect();
        self
    }
}

/// A Service with [`SvcOptions`] (NodePort, LoadBalancer, externalIPs, policies) and its
/// EndpointSlice.
#[derive(Clone, Debug)]
pub struct ExtSvcManifest {
    pub svc: SvcManifest,
    pub opts: SvcOptions,
}

impl ExtSvcManifest {
    pub fn new(svc: SvcManifest, opts: SvcOptions) -> Self {
        ExtSvcManifest { svc, opts }
    }
    pub fn to_yaml(&self) -> String {
        self.svc.yaml(&self.opts)
    }
    /// Write it as `dir/<name>.yaml` (atomically).
    pub fn write_to(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join(format!("{}.yaml", self.svc.name));
        write_atomic(&path, &self.to_yaml())?;
        Ok(path)
    }
}

/// One endpoint (pod) of a generated EndpointSlice.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub node: String,
    pub pod: String,
    pub ready: bool,
}

impl Endpoint {
    pub fn ready(ip: Ipv4Addr, node: &str, pod: &str) -> Self {
        Endpoint {
            ip,
            node: node.into(),
            pod: pod.into(),
            ready: true,
        }
    }
}

/// A ClusterIP Service and the EndpointSlice the endpoint controller would write for it.
#[derive(Clone, Debug)]
pub struct SvcManifest {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<SvcPort>,
    pub endpoints: Vec<Endpoint>,
}

impl SvcManifest {
    /// Multi-document YAML: Service, then its EndpointSlice (omitted without endpoints, as the
    /// controller writes none for a selector matching no pod).
    pub fn to_yaml(&self) -> String {
        self.yaml(&SvcOptions::default())
    }

    fn yaml(&self, o: &SvcOptions) -> String {
        let mut y = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: {ty}\n  \
             clusterIP: {ip}\n  selector:\n    app: {name}\n",
            name = self.name,
            ty = o.type_.as_str(),
            ip = self.cluster_ip
        );
        let list = |v: &[String]| {
            v.iter()
                .map(|s| format!("\"{s}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !o.external_ips.is_empty() {
            let ips: Vec<String> = o.external_ips.iter().map(|i| i.to_string()).collect();
            y += &format!("  externalIPs: [{}]\n", list(&ips));
        }
        if o.external_local {
            y += "  externalTrafficPolicy: Local\n";
        }
        if o.internal_local {
            y += "  internalTrafficPolicy: Local\n";
        }
        if let Some(hc) = o.health_check_node_port {
            y += &format!("  healthCheckNodePort: {hc}\n");
        }
        if !o.source_ranges.is_empty() {
            y += &format!("  loadBalancerSourceRanges: [{}]\n", list(&o.source_ranges));
        }
        y += "  ports:\n";
        for p in &self.ports {
            y += &format!(
                "  - name: \"{}\"\n    protocol: {}\n    port: {}\n    targetPort: {}\n",
                p.name, p.proto, p.port, p.target_port
            );
            if let (Some(np), SvcType::NodePort | SvcType::LoadBalancer) = (p.node_port, o.type_) {
                y += &format!("    nodePort: {np}\n");
            }
        }
        if o.type_ == SvcType::LoadBalancer && !o.ingress_ips.is_empty() {
            y += "status:\n  loadBalancer:\n    ingress:\n";
            for ip in &o.ingress_ips {
                y += &format!("    - ip: {ip}\n");
            }
        }
        if self.endpoints.is_empty() {
            return y;
        }
        y += &format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-xlbts\n  \
             namespace: default\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n",
            name = self.name
        );
        for p in &self.ports {
            y += &format!(
                "  - name: \"{}\"\n    protocol: {}\n    port: {}\n",
                p.name, p.proto, p.target_port
            );
        }
        y += "endpoints:\n";
        for e in &self.endpoints {
            y += &format!(
                "  - addresses: [\"{}\"]\n    conditions: {{ready: {r}, serving: {r}, terminating: false}}\n    \
                 nodeName: {}\n    targetRef: {{kind: Pod, namespace: default, name: {}}}\n",
                e.ip,
                e.node,
                e.pod,
                r = e.ready
            );
        }
        y
    }

    /// Write it as `dir/<name>.yaml` (atomically).
    pub fn write_to(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join(format!("{}.yaml", self.name));
        write_atomic(&path, &self.to_yaml())?;
        Ok(path)
    }
}

fn read_docs(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).map_err(io_err(format!("reading {}", path.display())))?;
    parse_docs(&text).map_err(|reason| Error::Manifest {
        path: path.display().to_string(),
        reason,
    })
}

fn parse_docs(text: &str) -> std::result::Result<Vec<Value>, String> {
    use serde::Deserialize as _;
    let mut docs = Vec::new();
    for d in serde_yaml::Deserializer::from_str(text) {
        let v = Value::deserialize(d).map_err(|e| e.to_string())?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

fn kind(v: &Value) -> &str {
    v.get("kind").and_then(Value::as_str).unwrap_or("")
}

/// Set `conditions.ready` (and `serving`) of the endpoint with address `ip` in every
/// EndpointSlice of the file at `path`. Errors if no endpoint has that address.
pub fn set_endpoint_ready(path: &Path, ip: Ipv4Addr, ready: bool) -> Result<()> {
    let mut docs = read_docs(path)?;
    let ip_s = ip.to_string();
    let mut found = false;
    for doc in docs.iter_mut().filter(|d| kind(d) == "EndpointSlice") {
        let Some(Value::Sequence(eps)) = doc.get_mut("endpoints") else {
            continue;
        };
        for ep in eps.iter_mut() {
            let has = ep
                .get("addresses")
                .and_then(Value::as_sequence)
                .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(ip_s.as_str())));
            if !has {
                continue;
            }
            found = true;
            let Value::Mapping(m) = ep else { continue };
            let conds = m
                .entry(Value::from("conditions"))
                .or_insert_with(|| Value::Mapping(Default::default()));
            if let Value::Mapping(c) = conds {
                c.insert(Value::from("ready"), Value::from(ready));
                c.insert(Value::from("serving"), Value::from(ready));
            }
        }
    }
    if !found {
        return Err(Error::Manifest {
            path: path.display().to_string(),
            reason: format!("no endpoint {ip}"),
        });
    }
    let text: Vec<String> = docs
        .iter()
        .map(|d| {
            serde_yaml::to_string(d).map_err(|e| Error::Manifest {
                path: path.display().to_string(),
                reason: e.to_string(),
            })
        })
        .collect::<Result<_>>()?;
    write_atomic(path, &text.join("---\n"))
}

/// A pod backing an example Service, as its EndpointSlice describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExamplePod {
    pub name: String,
    pub ip: Ipv4Addr,
    /// Node index parsed from `nodeName: nodeK`.
    pub node: u8,
    pub ready: bool,
    pub tcp_ports: Vec<u16>,
    pub udp_ports: Vec<u16>,
}

/// A Service port of an example: (port, protocol).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExampleService {
    pub name: String,
    pub file: PathBuf,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<(u16, String)>,
    pub node_ports: Vec<u16>,
    pub pods: Vec<ExamplePod>,
}

/// Read every `*.yaml` of `dir`: Services with a clusterIP, and the pods their EndpointSlices name.
pub fn load_examples(dir: &Path) -> Result<Vec<ExampleService>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(format!("reading {}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml")
                && !p.file_name().unwrap().to_string_lossy().starts_with('.')
        })
        .collect();
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let docs = read_docs(&file)?;
        let slices: Vec<&Value> = docs.iter().filter(|d| kind(d) == "EndpointSlice").collect();
        for svc in docs.iter().filter(|d| kind(d) == "Service") {
            out.push(example_service(&file, svc, &slices)?);
        }
    }
    Ok(out)
}

fn example_service(file: &Path, svc: &Value, slices: &[&Value]) -> Result<ExampleService> {
    let bad = |reason: &str| Error::Manifest {
        path: file.display().to_string(),
        reason: reason.to_string(),
    };
    let name = svc["metadata"]["name"]
        .as_str()
        .ok_or_else(|| bad("Service without name"))?
        .to_string();
    let cluster_ip = svc["spec"]["clusterIP"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("Service without a fixed spec.clusterIP"))?;
    let mut ports = Vec::new();
    let mut node_ports = Vec::new();
    for p in svc["spec"]["ports"].as_sequence().into_iter().flatten() {
        let port = p["port"]
            .as_u64()
            .ok_or_else(|| bad("port without number"))? as u16;
        ports.push((port, p["protocol"].as_str().unwrap_or("TCP").to_string()));
        if let Some(np) = p["nodePort"].as_u64() {
            node_ports.push(np as u16);
        }
    }
    let mut pods: Vec<ExamplePod> = Vec::new();
    for slice in slices
        .iter()
        .filter(|s| s["metadata"]["labels"]["kubernetes.io/service-name"].as_str() == Some(&name))
    {
        let mut tcp_ports = Vec::new();
        let mut udp_ports = Vec::new();
        for p in slice["ports"].as_sequence().into_iter().flatten() {
            let port = p["port"]
                .as_u64()
                .ok_or_else(|| bad("slice port without number"))? as u16;
            match p["protocol"].as_str().unwrap_or("TCP") {
                "UDP" => udp_ports.push(port),
                _ => tcp_ports.push(port),
            }
        }
        for ep in slice["endpoints"].as_sequence().into_iter().flatten() {
            let ip = ep["addresses"][0]
                .as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("endpoint without IPv4 address"))?;
            let node = ep["nodeName"]
                .as_str()
                .and_then(|n| n.strip_prefix("node"))
                .and_then(|k| k.parse().ok())
                .ok_or_else(|| bad("endpoint nodeName must be nodeK"))?;
            let pod = ep["targetRef"]["name"]
                .as_str()
                .ok_or_else(|| bad("endpoint without targetRef.name"))?;
            pods.push(ExamplePod {
                name: pod.to_string(),
                ip,
                node,
                ready: ep["conditions"]["ready"].as_bool().unwrap_or(true),
                tcp_ports: tcp_ports.clone(),
                udp_ports: udp_ports.clone(),
            });
        }
    }
    Ok(ExampleService {
        name,
        file: file.to_path_buf(),
        cluster_ip,
        ports,
        node_ports,
        pods,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc() -> SvcManifest {
        SvcManifest {
            name: "echo".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 1, 1),
            ports: vec![SvcPort::tcp("tcp", 80, 9376), SvcPort::udp("udp", 53, 9376)],
            endpoints: vec![
                Endpoint::ready(Ipv4Addr::new(10, 244, 1, 5), "node1", "echo-a"),
                Endpoint::ready(Ipv4Addr::new(10, 244, 2, 5), "node2", "echo-b"),
            ],
        }
    }

    #[test]
    fn generated_manifest_round_trips_through_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        svc().write_to(dir.path()).unwrap();
        let ex = load_examples(dir.path()).unwrap();
        assert_eq!(ex.len(), 1);
        assert_eq!(ex[0].cluster_ip, Ipv4Addr::new(10, 96, 1, 1));
        assert_eq!(
            ex[0].ports,
            vec![(80, "TCP".to_string()), (53, "UDP".to_string())]
        );
        assert_eq!(ex[0].pods.len(), 2);
        assert_eq!(ex[0].pods[1].node, 2);
        assert_eq!(ex[0].pods[0].tcp_ports, vec![9376]);
        assert_eq!(ex[0].pods[0].udp_ports, vec![9376]);
    }

    #[test]
    fn external_options_are_written_as_kubernetes_fields() {
        let mut s = svc();
        s.ports = vec![
            SvcPort::tcp("dns-tcp", 53, 5353).node_port(30053),
            SvcPort::udp("dns-udp", 53, 5353).node_port(30053),
        ];
        let lb = ExtSvcManifest::new(
            s.clone(),
            SvcOptions::load_balancer(&[Ipv4Addr::new(192, 168, 100, 1)])
                .external_ips(&[Ipv4Addr::new(192, 168, 200, 1)])
                .external_local(Some(31000))
                .internal_local()
                .source_ranges(&["172.31.0.200/32"]),
        );
        let docs = parse_docs(&lb.to_yaml()).unwrap();
        let spec = &docs[0]["spec"];
        assert_eq!(spec["type"].as_str(), Some("LoadBalancer"));
        assert_eq!(spec["externalIPs"][0].as_str(), Some("192.168.200.1"));
        assert_eq!(spec["externalTrafficPolicy"].as_str(), Some("Local"));
        assert_eq!(spec["internalTrafficPolicy"].as_str(), Some("Local"));
        assert_eq!(spec["healthCheckNodePort"].as_u64(), Some(31000));
        assert_eq!(
            spec["loadBalancerSourceRanges"][0].as_str(),
            Some("172.31.0.200/32")
        );
        assert_eq!(spec["ports"][1]["nodePort"].as_u64(), Some(30053));
        assert_eq!(spec["ports"][1]["protocol"].as_str(), Some("UDP"));
        assert_eq!(
            docs[0]["status"]["loadBalancer"]["ingress"][0]["ip"].as_str(),
            Some("192.168.100.1")
        );
        assert_eq!(docs[1]["endpoints"][1]["nodeName"].as_str(), Some("node2"));
        // The reader sees the node ports.
        let dir = tempfile::tempdir().unwrap();
        lb.write_to(dir.path()).unwrap();
        assert_eq!(
            load_examples(dir.path()).unwrap()[0].node_ports,
            vec![30053, 30053]
        );
        // A ClusterIP Service never gets node ports or a status.
        let plain = parse_docs(&s.to_yaml()).unwrap();
        assert_eq!(plain[0]["spec"]["type"].as_str(), Some("ClusterIP"));
        assert!(plain[0]["spec"]["ports"][0].get("nodePort").is_none());
        assert!(plain[0].get("status").is_none());
    }

    #[test]
    fn set_endpoint_ready_flips_only_that_endpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = svc().write_to(dir.path()).unwrap();
        set_endpoint_ready(&path, Ipv4Addr::new(10, 244, 2, 5), false).unwrap();
        let ex = load_examples(dir.path()).unwrap();
        let ready: Vec<bool> = ex[0].pods.iter().map(|p| p.ready).collect();
        assert_eq!(ready, vec![true, false]);
        assert!(set_endpoint_ready(&path, Ipv4Addr::new(10, 244, 9, 9), false).is_err());
        // No temp file left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn the_repository_examples_are_complete() {
        let ex = load_examples(&examples_dir()).unwrap();
        let names: Vec<&str> = ex.iter().map(|e| e.name.as_str()).collect();
        for want in ["hostnames", "httpd-svc", "service-hellok8s-clusterip"] {
            assert!(names.contains(&want), "{names:?}");
        }
        for e in &ex {
            assert!(e.pods.len() >= 2, "{} has {} pods", e.name, e.pods.len());
            assert!(
                e.pods.iter().any(|p| p.node == 2),
                "{} has no remote pod",
                e.name
            );
        }
    }
}
