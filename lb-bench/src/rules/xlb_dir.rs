//! The [`ServiceSet`] as xlb's `--manifests` directory: one file per Service (Service +
//! EndpointSlice), so an endpoint change rewrites exactly one file.

use std::path::{Path, PathBuf};

use lb_testkit::service_yaml::{Endpoint, SvcManifest, SvcPort};

use super::{ServiceSet, Svc};

/// Node name the endpoints claim (only matters for traffic policy Local, unused here).
const NODE: &str = "node1";

/// The manifest of one Service with `endpoints` (all ready).
pub fn manifest(svc: &Svc, endpoints: &[std::net::Ipv4Addr]) -> SvcManifest {
    SvcManifest {
        name: svc.name.clone(),
        cluster_ip: svc.cluster_ip,
        ports: svc
            .ports
            .iter()
            .map(|(name, port, target)| SvcPort::tcp(name, *port, *target))
            .collect(),
        endpoints: endpoints
            .iter()
            .map(|ip| {
                Endpoint::ready(
                    *ip,
                    NODE,
                    &format!("pod-{}", ip.to_string().replace('.', "-")),
                )
            })
            .collect(),
    }
}

/// Write every Service of `set` into `dir` (created if missing); returns the probe's file.
pub fn write_all(set: &ServiceSet, dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let mut last = None;
    for svc in &set.services {
        last = Some(manifest(svc, &svc.endpoints).write_to(dir)?);
    }
    last.ok_or_else(|| anyhow::anyhow!("empty Service set"))
}

#[cfg(test)]
mod tests {
    use super::super::tests::spec;
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
    }
}
