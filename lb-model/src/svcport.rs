//! Service ports: the (namespace, name, port name) a frontend belongs to, as operators name
//! it. Every master carries the id of its Service port (`ServiceValue::svc_port_id`); the id's
//! name is in `XLB_SVCNAME_V1` (pinned, so `xlb inspect` names frontends, backends and flows
//! while the agent is down) and its per-CPU counters are at that index of `XLB_SVCSTATS_V1`.
//!
//! All frontends of one Service port (its ClusterIP, NodePorts, LoadBalancer IPs, both scopes)
//! share one id. Ids are `1..=max` (`--service-ports-max`, the maps' size), handed out from a
//! forward-only cursor like the other ids (`ids.rs`): conntrack entries keep the id of their
//! flow, so an id freed by a deleted Service comes back only after every other free id was
//! used. When none is free the frontend gets 0 (no name, not counted) and the plan says so.

use std::fmt;

use lb_common::{SvcName, SVC_NAME_LEN, SVC_PORT_NAME_LEN};

use crate::desired::FrontendState;

/// The name of a Service port, as stored in `XLB_SVCNAME_V1`: each part at most the bytes
/// its field holds minus a NUL (longer strings, which Kubernetes does not allow, are cut at a
/// character boundary), so `from_map(to_map(n)) == n` for every name built by [`Self::new`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct SvcPortName {
    pub namespace: String,
    pub name: String,
    /// "" for a Service's only, unnamed port.
    pub port_name: String,
}

impl SvcPortName {
    pub fn new(namespace: &str, name: &str, port_name: &str) -> Self {
        SvcPortName {
            namespace: cut(namespace, SVC_NAME_LEN - 1).to_owned(),
            name: cut(name, SVC_NAME_LEN - 1).to_owned(),
            port_name: cut(port_name, SVC_PORT_NAME_LEN - 1).to_owned(),
        }
    }

    /// The Service port of a desired frontend; `None` for a frontend programmed without a
    /// Service (packet tests, benchmarks), which gets no id.
    pub fn of(st: &FrontendState) -> Option<Self> {
        if st.service.name.is_empty() {
            return None;
        }
        Some(Self::new(
            &st.service.namespace,
            &st.service.name,
            &st.port_name,
        ))
    }

    /// The map value: NUL-padded.
    pub fn to_map(&self) -> SvcName {
        let mut v = SvcName::default();
        put(&mut v.namespace, &self.namespace);
        put(&mut v.name, &self.name);
        put(&mut v.port_name, &self.port_name);
        v
    }

    /// Inverse of [`Self::to_map`] (bytes up to the first NUL; invalid UTF-8 replaced).
    pub fn from_map(v: &SvcName) -> Self {
        SvcPortName {
            namespace: get(&v.namespace),
            name: get(&v.name),
            port_name: get(&v.port_name),
        }
    }

    /// `namespace/name`.
    pub fn service(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// `namespace/name:port` (or `namespace/name` for an unnamed port), kube-proxy's
/// `ServicePortName` notation.
impl fmt::Display for SvcPortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        Ok(())
    }
}

fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put(dst: &mut [u8], s: &str) {
    let n = s.len().min(dst.len() - 1);
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
}

fn get(src: &[u8]) -> String {
    let end = src.iter().position(|&b| b == 0).unwrap_or(src.len());
    String::from_utf8_lossy(&src[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_the_map_value() {
        let n = SvcPortName::new("kube-system", "kube-dns", "dns-tcp");
        assert_eq!(SvcPortName::from_map(&n.to_map()), n);
        assert_eq!(n.to_string(), "kube-system/kube-dns:dns-tcp");
        let unnamed = SvcPortName::new("default", "web", "");
        assert_eq!(unnamed.to_string(), "default/web");
        assert_eq!(SvcPortName::from_map(&unnamed.to_map()), unnamed);
    }

    #[test]
    fn over_long_names_are_cut_so_they_still_round_trip() {
        let long = "é".repeat(40); // 80 bytes
        let n = SvcPortName::new(&long, &"x".repeat(100), &"p".repeat(40));
        assert_eq!(
            n.namespace.len(),
            62,
            "cut at a character boundary below 63 bytes"
        );
        assert_eq!(n.name.len(), 63);
        assert_eq!(n.port_name.len(), 31);
        assert_eq!(SvcPortName::from_map(&n.to_map()), n);
    }
}
