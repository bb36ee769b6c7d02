//! Pure xlb control-plane logic: no I/O, no BPF, unit-tested without root.
//!
//! ```text
//! source events --> ClusterState::apply --> changed Service keys
//! desired::service_frontends(svc, slices, node, cfg) -> frontends of one Service   (pure, kube_proxy)
//! DesiredState (all frontends) --planner::plan(&Applied, &DesiredState, touched)--> Plan (ordered MapOps)
//! store::execute(&mut impl MapStore, &Plan, &mut Applied): each op encoded as map entries, written,
//!     and recorded in Applied when it succeeded (prepare -> frontends -> gc)
//! ReadBack::read(&impl MapStore) -> Applied (at start, so a restart reconciles, never flushes)
//! health::health_checks(&ClusterState) -> healthCheckNodePort answers (kube-proxy's JSON, pure)
//! maglev::table(backends, M) -> the Maglev lookup table of a frontend (pure, the same on every node)
//! ```
//!
//! [`store::MapStore`] is the one contract with the maps: the agent's aya maps, the packet tests'
//! and the bench's unpinned maps, `xlb inspect`'s pinned maps and the in-memory
//! [`store::MemStore`] of the property tests all implement it, and all go through the same
//! encoding, executor and read-back.
//!
//! The split mirrors kube-proxy's `ServiceChangeTracker` / `EndpointsChangeTracker`: a change to one
//! Service or EndpointSlice recomputes and rewrites that Service only, so one endpoint change is a
//! few map writes however many Services exist.

pub mod applied;
pub mod cidr;
pub mod desired;
pub mod fefilter;
pub mod health;
mod ids;
mod kube_proxy;
pub mod maglev;
pub mod planner;
pub mod readback;
pub mod slice;
mod slots;
pub mod state;
pub mod store;
pub mod svcport;
pub mod yaml_docs;

use std::fmt;
use std::net::Ipv4Addr;

pub use applied::{Applied, AppliedFrontend};
pub use cidr::Cidr;
pub use desired::{DesiredState, FrontendState};
pub use planner::{MapOp, Plan};
pub use readback::ReadBack;
pub use svcport::SvcPortName;
pub use state::{
    Algorithm, Changes, ClusterState, Config, NodeInfo, ServiceKey as SvcKey, SourceEvent,
    ALGORITHM_ANNOTATION,
};

/// L4 protocol of a frontend / backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    /// IP protocol number, as used in map keys.
    pub const fn number(self) -> u8 {
        match self {
            Proto::Tcp => lb_common::PROTO_TCP,
            Proto::Udp => lb_common::PROTO_UDP,
            Proto::Sctp => lb_common::PROTO_SCTP,
        }
    }
    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            lb_common::PROTO_TCP => Some(Proto::Tcp),
            lb_common::PROTO_UDP => Some(Proto::Udp),
            lb_common::PROTO_SCTP => Some(Proto::Sctp),
            _ => None,
        }
    }
    /// Parse a Kubernetes protocol string ("TCP", "UDP", "SCTP"); `None` means the default TCP.
    pub fn from_k8s(s: Option<&str>) -> Option<Self> {
        match s.unwrap_or("TCP") {
            "TCP" => Some(Proto::Tcp),
            "UDP" => Some(Proto::Udp),
            "SCTP" => Some(Proto::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Sctp => "SCTP",
        })
    }
}

/// A Service frontend: the (address, port, protocol, scope) a client addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
    /// `lb_common::SCOPE_EXT` or `SCOPE_INT`.
    pub scope: u8,
}

impl Frontend {
    /// The SERVICES map key of this frontend at `slot` (0 = master).
    pub fn key(&self, slot: u16) -> lb_common::ServiceKey {
        lb_common::ServiceKey::new(
            lb_common::ip4(self.addr.octets()),
            lb_common::port(self.port),
            self.proto.number(),
            self.scope,
            slot,
        )
    }
    /// The same (address, port, protocol) in another scope: the other entry of an external
    /// frontend of an externalTrafficPolicy Local Service.
    pub const fn with_scope(self, scope: u8) -> Self {
        Frontend { scope, ..self }
    }
    /// The SRC_RANGES key of client range `range` for this frontend (the scope is not part of
    /// it: the ranges belong to the (address, port, protocol), and only the `SCOPE_EXT` master
    /// carries `SVC_FLAG_SOURCE_RANGES`). The client is the range's network address, so one
    /// range always has one key, whatever host bits it was written with. Returns the trie key's
    /// prefix length (`SrcRangeKey::FRONTEND_BITS` + the range's) and its data.
    pub fn src_range_key(&self, range: Cidr) -> (u32, lb_common::SrcRangeKey) {
        let (net, len) = cidr::normalize(range);
        (
            lb_common::SrcRangeKey::FRONTEND_BITS + u32::from(len),
            lb_common::SrcRangeKey {
                addr: lb_common::ip4(self.addr.octets()),
                port: lb_common::port(self.port),
                proto: self.proto.number(),
                _pad: 0,
                client: lb_common::ip4(net.octets()),
            },
        )
    }
    /// Inverse of [`Frontend::src_range_key`]: the `SCOPE_EXT` frontend and the range. `None`
    /// for a key xlb never writes (prefix outside the frontend's 64 bits + 0..=32, padding set,
    /// unknown protocol).
    pub fn from_src_range_key(prefix_len: u32, k: &lb_common::SrcRangeKey) -> Option<(Self, Cidr)> {
        let len = prefix_len.checked_sub(lb_common::SrcRangeKey::FRONTEND_BITS)?;
        if len > 32 || k._pad != 0 {
            return None;
        }
        let fe = Frontend {
            addr: Ipv4Addr::from(lb_common::ip4_from(k.addr)),
            port: lb_common::port_from(k.port),
            proto: Proto::from_number(k.proto)?,
            scope: lb_common::SCOPE_EXT,
        };
        let client = Ipv4Addr::from(lb_common::ip4_from(k.client));
        Some((fe, cidr::normalize((client, len as u8))))
    }
    /// Inverse of [`Frontend::key`] (ignores the slot). `None` for an unknown protocol number.
    pub fn from_key(k: &lb_common::ServiceKey) -> Option<Self> {
        Some(Frontend {
            addr: Ipv4Addr::from(lb_common::ip4_from(k.addr)),
            port: lb_common::port_from(k.port),
            proto: Proto::from_number(k.proto)?,
            scope: k.scope,
        })
    }
    /// The MEMBERS map key of backend `backend_id` in this frontend.
    pub fn member_key(&self, backend_id: u32) -> lb_common::MemberKey {
        lb_common::MemberKey::of(&self.key(0), backend_id)
    }
    /// Inverse of [`Frontend::member_key`]: the frontend and the backend id.
    pub fn from_member_key(k: &lb_common::MemberKey) -> Option<(Self, u32)> {
        let fe = lb_common::ServiceKey::new(k.addr, k.port, k.proto, k.scope, 0);
        Some((Frontend::from_key(&fe)?, k.backend_id))
    }
}

/// `addr:port/PROTO`, and `[int]` after a `SCOPE_INT` frontend (the pods' entry of an
/// externalTrafficPolicy Local frontend), so the two scopes can be told apart in logs.
impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)?;
        match self.scope {
            lb_common::SCOPE_EXT => Ok(()),
            lb_common::SCOPE_INT => f.write_str("[int]"),
            s => write!(f, "[scope {s}]"),
        }
    }
}

/// A backend endpoint: where a frontend's traffic goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct BackendAddr {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
}

impl BackendAddr {
    pub fn to_map(&self, state: u8) -> lb_common::Backend {
        lb_common::Backend {
            addr: lb_common::ip4(self.addr.octets()),
            port: lb_common::port(self.port),
            proto: self.proto.number(),
            state,
        }
    }
    /// The MEMBERS map value naming this backend.
    pub fn to_member(&self) -> lb_common::MemberValue {
        let b = self.to_map(0);
        lb_common::MemberValue {
            addr: b.addr,
            port: b.port,
            _pad: 0,
        }
    }
    pub fn from_map(b: &lb_common::Backend) -> Option<Self> {
        Some(BackendAddr {
            addr: Ipv4Addr::from(lb_common::ip4_from(b.addr)),
            port: lb_common::port_from(b.port),
            proto: Proto::from_number(b.proto)?,
        })
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

/// Something in the input that was skipped, with the reason. Reported as a log line and a metric
/// (`kind` is the metric label); never fatal, never affects other objects.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// Where: a file path (manifests source), or "namespace/name" of the object.
    pub object: String,
    /// Short machine-friendly class: "parse", "invalid_service", "invalid_slice", "frontend_conflict", ...
    pub kind: &'static str,
    /// Human-readable reason.
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} ({})", self.object, self.reason, self.kind)
    }
}
