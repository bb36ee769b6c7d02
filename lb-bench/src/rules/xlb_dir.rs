//! The [`ServiceSet`] as xlb's `--manifests` directory: one file per Service (Service +
//! EndpointSlice), so an endpoint change rewrites exactly one file.

use std::path::{Path, PathBuf};

use lb_testkit::service_yaml::{Endpoint, ExtSvcManifest, SvcManifest, SvcOptions, SvcPort};

use super::{ServiceSet, Svc};

/// The YAML of one Service with `endpoints` (all ready, on the Service's `endpoint_node`): a
/// ClusterIP Service, or a NodePort Service (externalTrafficPolicy Cluster, the default) with
/// the nodePort on its first port when the Service has one.
pub fn manifest(svc: &Svc, endpoints: &[std::net::Ipv4Addr]) -> String {
    let m = SvcManifest {
        name: svc.name.clone(),
        cluster_ip: svc.cluster_ip,
        ports: svc
            .ports
            .iter()
            .enumerate()
            .map(|(i, (name, port, target))| {
                let p = SvcPort::tcp(name, *port, *target);
                match svc.node_port {
                    Some(np) if i == 0 => p.node_port(np),
                    _ => p,
                }
            })
            .collect(),
        endpoints: endpoints
            .iter()
            .map(|ip| {
                Endpoint::ready(
                    *ip,
                    svc.endpoint_node,
                    &format!("pod-{}", ip.to_string().replace('.', "-")),
                )
            })
            .collect(),
    };
    match svc.node_port {
        Some(_) => ExtSvcManifest::new(m, SvcOptions::node_port()).to_yaml(),
        None => m.to_yaml(),
    }
}

/// Write one Service's manifest into `dir` (atomically); returns its path.
pub fn write(svc: &Svc, endpoints: &[std::net::Ipv4Addr], dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("{}.yaml", svc.name));
    lb_testkit::service_yaml::write_atomic(&path, &manifest(svc, endpoints))?;
    Ok(path)
}

/// Write every Service of `set` into `dir` (created if missing); returns the probe's file.
pub fn write_all(set: &ServiceSet, dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let mut last = None;
    for svc in &set.services {
        last = Some(write(svc, &svc.endpoints, dir)?);
    }
    last.ok_or_else(|| anyhow::anyhow!("empty Service set"))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{spec, spec_ext};
    use super::*;

    #[test]
    fn one_file_per_service_with_its_endpoints() {
        let set = ServiceSet::generate(&spec(5));
        let dir = tempfile::tempdir().unwrap();
        let probe = write_all(&set, dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 5);
        let text = std::fs::read_to_string(&probe).unwrap();
        assert!(text.contains("clusterIP: 10.96.0.14"), "{text}");
        assert!(text.contains("10.244.1.11"));
        assert!(text.contains("port: 5001"));
        assert!(text.contains("kind: EndpointSlice"));
        assert!(text.contains("type: ClusterIP") && !text.contains("nodePort"));
        assert!(text.contains("nodeName: node1"));
    }

    #[test]
    fn nodeport_services_carry_their_node_port_and_endpoint_node() {
        let set = ServiceSet::generate(&spec_ext(5));
        let dir = tempfile::tempdir().unwrap();
        write_all(&set, dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 7);
        let remote = std::fs::read_to_string(dir.path().join("nodeport-remote.yaml")).unwrap();
        assert!(remote.contains("  type: NodePort\n"), "{remote}");
        assert!(!remote.contains("externalTrafficPolicy: Local"), "{remote}");
        assert!(
            remote.contains("    port: 80\n    targetPort: 8080\n    nodePort: 30081\n"),
            "{remote}"
        );
        assert_eq!(remote.matches("nodePort").count(), 1);
        assert!(remote.contains("nodeName: node2") && !remote.contains("nodeName: node1"));
        // The agent's model reads it as kube-proxy would: a NodePort frontend on every node
        // address, the remote pods not local to node1.
        let parsed = lb_model::yaml_docs::parse("nodeport-remote.yaml", &remote);
        assert!(parsed.problems.is_empty(), "{:?}", parsed.problems);
        assert_eq!((parsed.services.len(), parsed.slices.len()), (1, 1));
        let node = lb_model::state::NodeInfo {
            name: "node1".into(),
            addresses: vec![std::net::Ipv4Addr::new(172, 31, 0, 11)],
        };
        let (fronts, problems) = lb_model::desired::service_frontends(
            &parsed.services[0],
            parsed.slices.iter(),
            &node,
            &lb_model::state::Config::default(),
        );
        assert!(problems.is_empty(), "{problems:?}");
        let np = fronts
            .iter()
            .find(|(fe, _)| fe.port == 30081)
            .expect("a NodePort frontend");
        assert_eq!(np.0.addr, std::net::Ipv4Addr::new(172, 31, 0, 11));
        assert_eq!(
            np.1.flags & lb_common::SVC_FLAG_NODE_PORT,
            lb_common::SVC_FLAG_NODE_PORT
        );
        assert_eq!(np.1.backends.len(), 2);
        assert!(np.1.local.is_empty());
        let local = std::fs::read_to_string(dir.path().join("nodeport-local.yaml")).unwrap();
        assert!(local.contains("nodePort: 30080") && local.contains("nodeName: node1"));
        // node1's pods are local to node1: xlb does not SNAT flows from outside to them.
        let parsed = lb_model::yaml_docs::parse("nodeport-local.yaml", &local);
        let (fronts, _) = lb_model::desired::service_frontends(
            &parsed.services[0],
            parsed.slices.iter(),
            &node,
            &lb_model::state::Config::default(),
        );
        let np = fronts.iter().find(|(fe, _)| fe.port == 30080).unwrap();
        assert_eq!(np.1.local.len(), 1);
        assert_eq!(
            np.1.local.iter().collect::<Vec<_>>(),
            np.1.backends.iter().collect::<Vec<_>>()
        );
    }
}
