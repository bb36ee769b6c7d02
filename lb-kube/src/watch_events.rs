//! Watcher events -> [`SourceEvent`]s, without I/O.
//!
//! Each kind has its own small state machine: `Init` opens a buffer, `InitApply` fills it,
//! `InitDone` turns it into one `Resync` of that kind (the initial list, and every relist after a
//! 410 Gone), `Apply` / `Delete` become upserts / deletes. Once every kind has finished its first
//! list, [`Sources`] emits `Synced` exactly once: before that, pruning map entries the API does not
//! know would delete Services whose kind just had not been listed yet.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::Event;
use kube::ResourceExt;
use lb_model::{NodeInfo, Problem, SourceEvent};

use crate::lenient::Lenient;

/// One item of the merged watcher streams.
// Each value is moved once from the stream into the state machine: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Update {
    Service(Event<Lenient<Service>>),
    Slice(Event<Lenient<EndpointSlice>>),
    Node(Event<Lenient<Node>>),
}

/// A namespaced kind the agent keeps a full set of.
pub(crate) trait Watched: Sized {
    fn upsert(self) -> SourceEvent;
    fn delete(namespace: String, name: String) -> SourceEvent;
    fn resync(all: Vec<Self>) -> SourceEvent;
}

impl Watched for Service {
    fn upsert(self) -> SourceEvent {
        SourceEvent::ServiceUpsert(self)
    }
    fn delete(namespace: String, name: String) -> SourceEvent {
        SourceEvent::ServiceDelete { namespace, name }
    }
    fn resync(all: Vec<Self>) -> SourceEvent {
        SourceEvent::Resync {
            services: Some(all),
            slices: None,
        }
    }
}

impl Watched for EndpointSlice {
    fn upsert(self) -> SourceEvent {
        SourceEvent::SliceUpsert(self)
    }
    fn delete(namespace: String, name: String) -> SourceEvent {
        SourceEvent::SliceDelete { namespace, name }
    }
    fn resync(all: Vec<Self>) -> SourceEvent {
        SourceEvent::Resync {
            services: None,
            slices: Some(all),
        }
    }
}

/// An object that did not decode: reported, and treated as absent.
fn parse_problem<K: kube::Resource<DynamicType = ()>>(obj: &Lenient<K>, err: &str) -> Problem {
    Problem {
        object: obj.display_name(),
        kind: "parse",
        reason: err.to_string(),
    }
}

fn namespace_name<K>(obj: &Lenient<K>) -> (String, String)
where
    Lenient<K>: kube::Resource,
{
    (
        obj.namespace().unwrap_or_else(|| "default".to_string()),
        obj.name_any(),
    )
}

/// The list/watch state of one namespaced kind.
pub(crate) struct ListSync<K> {
    /// Objects of a list in progress (between `Init` and `InitDone`).
    buffer: Option<Vec<K>>,
    /// A first list has completed.
    pub(crate) listed: bool,
}

impl<K> Default for ListSync<K> {
    fn default() -> Self {
        ListSync {
            buffer: None,
            listed: false,
        }
    }
}

impl<K: Watched + kube::Resource<DynamicType = ()>> ListSync<K> {
    pub(crate) fn on_event(
        &mut self,
        ev: Event<Lenient<K>>,
        problems: &mut Vec<Problem>,
    ) -> Option<SourceEvent> {
        match ev {
            // A list (re)starts: whatever a broken earlier attempt buffered is stale.
            Event::Init => {
                self.buffer = Some(Vec::new());
                None
            }
            Event::InitApply(obj) => {
                match obj.parsed {
                    Ok(k) => self.buffer.get_or_insert_with(Vec::new).push(k),
                    Err(ref e) => problems.push(parse_problem(&obj, e)),
                }
                None
            }
            Event::InitDone => {
                self.listed = true;
                Some(K::resync(self.buffer.take().unwrap_or_default()))
            }
            Event::Apply(obj) => match obj.parsed {
                Ok(k) => Some(k.upsert()),
                // The object changed into something unusable: drop what we held of it, as a
                // relist (which would omit it) would.
                Err(ref e) => {
                    problems.push(parse_problem(&obj, e));
                    let (ns, name) = namespace_name(&obj);
                    Some(K::delete(ns, name))
                }
            },
            Event::Delete(obj) => {
                let (ns, name) = namespace_name(&obj);
                Some(K::delete(ns, name))
            }
        }
    }
}

/// The addresses of a Node that NodePort frontends listen on: its InternalIP and ExternalIP
/// IPv4 addresses, in the order the Node lists them, without duplicates.
pub fn node_info(name: &str, node: &Node) -> NodeInfo {
    let mut addresses = Vec::new();
    let listed = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    for a in listed.into_iter().flatten() {
        if !matches!(a.type_.as_str(), "InternalIP" | "ExternalIP") {
            continue;
        }
        if let Ok(ip) = a.address.parse::<Ipv4Addr>() {
            if !addresses.contains(&ip) {
                addresses.push(ip);
            }
        }
    }
    NodeInfo {
        name: name.to_string(),
        addresses,
    }
}

/// The list/watch state of this node's Node object.
pub(crate) struct NodeSync {
    name: String,
    /// The node seen in a list in progress (`Some(None)`: listing, not seen yet).
    buffer: Option<Option<NodeInfo>>,
    pub(crate) listed: bool,
    /// A Node event was sent at least once.
    sent: bool,
}

impl NodeSync {
    pub(crate) fn new(name: String) -> Self {
        NodeSync {
            name,
            buffer: None,
            listed: false,
            sent: false,
        }
    }

    fn parse(&self, obj: &Lenient<Node>, problems: &mut Vec<Problem>) -> Option<NodeInfo> {
        match &obj.parsed {
            Ok(n) if n.metadata.name.as_deref() == Some(self.name.as_str()) => {
                Some(node_info(&self.name, n))
            }
            Ok(_) => None,
            Err(e) => {
                problems.push(parse_problem(obj, e));
                None
            }
        }
    }

    fn send(&mut self, info: NodeInfo) -> Option<SourceEvent> {
        self.sent = true;
        Some(SourceEvent::Node(info))
    }

    pub(crate) fn on_event(
        &mut self,
        ev: Event<Lenient<Node>>,
        problems: &mut Vec<Problem>,
    ) -> Option<SourceEvent> {
        match ev {
            Event::Init => {
                self.buffer = Some(None);
                None
            }
            Event::InitApply(obj) => {
                if let Some(info) = self.parse(&obj, problems) {
                    self.buffer = Some(Some(info));
                }
                None
            }
            Event::InitDone => {
                self.listed = true;
                match self.buffer.take().flatten() {
                    Some(info) => self.send(info),
                    None => {
                        tracing::warn!(node = %self.name, "this node's Node object does not exist; NodePorts get no node addresses");
                        if self.sent {
                            // Keep the addresses we had (see the Delete arm).
                            None
                        } else {
                            // The model still needs the node name (traffic policy Local).
                            let name = self.name.clone();
                            self.send(NodeInfo {
                                name,
                                addresses: Vec::new(),
                            })
                        }
                    }
                }
            }
            Event::Apply(obj) => {
                let info = self.parse(&obj, problems)?;
                self.send(info)
            }
            // A Node is deleted when the node leaves the cluster; its traffic keeps flowing on the
            // addresses it had until the agent is stopped (never flush on API changes we cannot act on).
            Event::Delete(_) => {
                tracing::warn!(node = %self.name, "this node's Node object was deleted; keeping its addresses");
                None
            }
        }
    }
}

/// All three kinds, and the one-time `Synced`.
pub(crate) struct Sources {
    services: ListSync<Service>,
    slices: ListSync<EndpointSlice>,
    node: NodeSync,
    synced: bool,
}

impl Sources {
    pub(crate) fn new(node_name: String) -> Self {
        Sources {
            services: ListSync::default(),
            slices: ListSync::default(),
            node: NodeSync::new(node_name),
            synced: false,
        }
    }

    /// The events to send for one watcher event, and the objects skipped on the way.
    pub(crate) fn on_update(&mut self, u: Update) -> (Vec<SourceEvent>, Vec<Problem>) {
        let mut problems = Vec::new();
        let ev = match u {
            Update::Service(e) => self.services.on_event(e, &mut problems),
            Update::Slice(e) => self.slices.on_event(e, &mut problems),
            Update::Node(e) => self.node.on_event(e, &mut problems),
        };
        let mut out: Vec<SourceEvent> = ev.into_iter().collect();
        if !self.synced && self.services.listed && self.slices.listed && self.node.listed {
            self.synced = true;
            out.push(SourceEvent::Synced);
        }
        (out, problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lenient<K: serde::de::DeserializeOwned + kube::Resource>(
        v: serde_json::Value,
    ) -> Lenient<K> {
        serde_json::from_value(v).unwrap()
    }
    fn svc(name: &str) -> Lenient<Service> {
        lenient(
            json!({"metadata": {"name": name, "namespace": "ns", "resourceVersion": "1"}, "spec": {"ports": [{"port": 80}]}}),
        )
    }
    fn bad_svc(name: &str) -> Lenient<Service> {
        lenient(
            json!({"metadata": {"name": name, "namespace": "ns", "resourceVersion": "1"}, "spec": {"ports": "80"}}),
        )
    }
    fn node(name: &str, addrs: &[(&str, &str)]) -> Lenient<Node> {
        let addrs: Vec<_> = addrs
            .iter()
            .map(|(t, a)| json!({"type": t, "address": a}))
            .collect();
        lenient(
            json!({"metadata": {"name": name, "resourceVersion": "1"}, "status": {"addresses": addrs}}),
        )
    }
    fn names(ev: &SourceEvent) -> Vec<String> {
        match ev {
            SourceEvent::Resync {
                services: Some(s),
                slices: None,
            } => s.iter().map(|s| s.metadata.name.clone().unwrap()).collect(),
            other => panic!("not a Services resync: {other:?}"),
        }
    }

    #[test]
    fn synced_once_after_every_kind_listed() {
        let mut s = Sources::new("n1".into());
        let mut all = Vec::new();
        for u in [
            Update::Service(Event::Init),
            Update::Service(Event::InitApply(svc("a"))),
            Update::Service(Event::InitDone),
            Update::Slice(Event::Init),
            Update::Slice(Event::InitDone),
            Update::Node(Event::Init),
            Update::Node(Event::InitApply(node("n1", &[("InternalIP", "10.0.0.1")]))),
            Update::Node(Event::InitDone),
            // A relist later: a Resync again, no second Synced.
            Update::Service(Event::Init),
            Update::Service(Event::InitDone),
        ] {
            all.extend(s.on_update(u).0);
        }
        let kinds: Vec<&str> = all
            .iter()
            .map(|e| match e {
                SourceEvent::Resync {
                    services: Some(_), ..
                } => "svc-resync",
                SourceEvent::Resync {
                    slices: Some(_), ..
                } => "slice-resync",
                SourceEvent::Node(_) => "node",
                SourceEvent::Synced => "synced",
                _ => "other",
            })
            .collect();
        assert_eq!(
            kinds,
            ["svc-resync", "slice-resync", "node", "synced", "svc-resync"]
        );
    }

    #[test]
    fn restarted_list_drops_the_partial_buffer_and_bad_objects() {
        let mut l = ListSync::<Service>::default();
        let mut p = Vec::new();
        assert!(l.on_event(Event::Init, &mut p).is_none());
        l.on_event(Event::InitApply(svc("stale")), &mut p);
        // The list failed mid-way; kube-runtime starts over with Init.
        l.on_event(Event::Init, &mut p);
        l.on_event(Event::InitApply(svc("a")), &mut p);
        l.on_event(Event::InitApply(bad_svc("bad")), &mut p);
        let ev = l.on_event(Event::InitDone, &mut p).unwrap();
        assert_eq!(names(&ev), ["a"]);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].object, "ns/bad");
        assert_eq!(p[0].kind, "parse");
    }

    #[test]
    fn applied_bad_object_becomes_a_delete() {
        let mut l = ListSync::<Service>::default();
        let mut p = Vec::new();
        match l.on_event(Event::Apply(bad_svc("x")), &mut p) {
            Some(SourceEvent::ServiceDelete { namespace, name }) => {
                assert_eq!((namespace.as_str(), name.as_str()), ("ns", "x"))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(p.len(), 1);
        assert!(matches!(
            l.on_event(Event::Apply(svc("x")), &mut p),
            Some(SourceEvent::ServiceUpsert(_))
        ));
    }

    #[test]
    fn node_addresses_are_internal_and_external_ipv4_deduplicated() {
        let n = node(
            "n1",
            &[
                ("Hostname", "n1"),
                ("InternalIP", "10.0.0.1"),
                ("InternalIP", "fd00::1"),
                ("ExternalIP", "1.2.3.4"),
                ("ExternalIP", "10.0.0.1"),
            ],
        );
        let info = node_info("n1", n.parsed.as_ref().unwrap());
        assert_eq!(
            info.addresses,
            [
                "10.0.0.1".parse::<Ipv4Addr>().unwrap(),
                "1.2.3.4".parse().unwrap()
            ]
        );
    }

    #[test]
    fn missing_node_sends_the_name_once_and_deletion_keeps_addresses() {
        let mut n = NodeSync::new("n1".into());
        let mut p = Vec::new();
        n.on_event(Event::Init, &mut p);
        assert_eq!(
            n.on_event(Event::InitDone, &mut p)
                .map(|e| format!("{e:?}")),
            Some(format!(
                "{:?}",
                SourceEvent::Node(NodeInfo {
                    name: "n1".into(),
                    addresses: vec![]
                })
            ))
        );
        assert!(matches!(
            n.on_event(
                Event::Apply(node("n1", &[("InternalIP", "10.0.0.1")])),
                &mut p
            ),
            Some(SourceEvent::Node(_))
        ));
        assert!(n.on_event(Event::Delete(node("n1", &[])), &mut p).is_none());
        n.on_event(Event::Init, &mut p);
        assert!(
            n.on_event(Event::InitDone, &mut p).is_none(),
            "a known node is not wiped by a relist that misses it"
        );
    }
}
