//! Desired datapath state, computed from the cluster state with kube-proxy's semantics.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::state::{ClusterState, Config, NodeInfo, ServiceKey};
use crate::{BackendAddr, Frontend, Problem};

/// What one frontend should look like in the maps.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FrontendState {
    /// The Service this frontend belongs to.
    pub service: ServiceKey,
    /// The Service port's name ("" when unnamed).
    pub port_name: String,
    /// Backends to use, in a stable order (sorted). Empty: refuse new flows (RST / ICMP unreachable).
    pub backends: Vec<BackendAddr>,
    /// `lb_common::SVC_FLAG_*`.
    pub flags: u32,
    /// sessionAffinity ClientIP timeout in seconds (0 when affinity is off).
    pub affinity_timeout: u32,
}

/// Every frontend the datapath should serve, and which Service produced which frontends.
#[derive(Clone, Debug, Default)]
pub struct DesiredState {
    pub frontends: BTreeMap<Frontend, FrontendState>,
    /// Frontends of each Service (to remove a Service's old frontends on change).
    pub by_service: BTreeMap<ServiceKey, Vec<Frontend>>,
}

impl DesiredState {
    /// Recompute the frontends of one Service from `state` (removing it when it is gone or skipped).
    /// Returns the frontends touched (old and new), for [`crate::diff::plan`], and any problems.
    pub fn update_service(
        &mut self,
        state: &ClusterState,
        key: &ServiceKey,
        cfg: &Config,
    ) -> (Vec<Frontend>, Vec<Problem>) {
        let _ = (state, key, cfg);
        todo!("lb-model: DesiredState::update_service")
    }

    /// Recompute everything.
    pub fn rebuild(state: &ClusterState, cfg: &Config) -> (Self, Vec<Problem>) {
        let _ = (state, cfg);
        todo!("lb-model: DesiredState::rebuild")
    }
}

/// The frontends of one Service (pure kube-proxy semantics): skipped kinds give an empty list.
pub fn service_frontends<'a>(
    svc: &Service,
    slices: impl Iterator<Item = &'a EndpointSlice>,
    node: &NodeInfo,
    cfg: &Config,
) -> Result<Vec<(Frontend, FrontendState)>, Problem> {
    let _ = (svc, slices.count(), node, cfg);
    todo!("lb-model: service_frontends")
}
