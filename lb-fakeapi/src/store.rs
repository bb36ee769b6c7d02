//! The object store behind the fake API server: objects as JSON, one global resourceVersion
//! counter, the event history watches replay from, compaction, and list snapshots for paging.
//!
//! Objects are kept as `serde_json::Value` rather than typed structs so a test can store an object
//! the real apiserver would never accept (a Service whose `spec.ports` is a string) and see what
//! the client does with it.
//!
//! Each object is also kept serialized, as a list item, from the moment it is stored: a list is
//! then the concatenation of its items' bytes. The real apiserver serves lists from its watch
//! cache on another machine; this fake runs in the process (and on the cores) of the benchmark
//! that times the agent's cold start, where serializing 10k EndpointSlices per list (and deep
//! copying them for a paged list's snapshot) was about half a second of the measured time.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use serde::ser::{Serialize, Serializer};
use serde_json::{json, Map, Value};

/// The resource kinds the fake serves (what the xlb Kubernetes source watches).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    pub fn kind(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }
    /// The path prefix of the kind's group/version: `/api/v1` or `/apis/discovery.k8s.io/v1`.
    pub fn group_path(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "/api/v1",
            Kind::EndpointSlice => "/apis/discovery.k8s.io/v1",
        }
    }
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
        }
    }
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node)
    }
    /// The kind named by an object's `kind` field.
    pub fn from_kind(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.kind() == s)
    }
}

/// Where an object lives: (kind, namespace, name). Cluster-scoped objects have an empty namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

/// Watch event types as they appear on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as watches replay it.
#[derive(Clone, Debug)]
pub struct Event {
    pub rv: u64,
    pub key: ObjKey,
    pub ty: EventType,
    /// The object with `kind`, `apiVersion` and `metadata.resourceVersion` set.
    pub object: Value,
}

/// Which objects a list or watch selects: the kind, the namespace of the path (if any) and the
/// `metadata.name` / `metadata.namespace` field selectors (the only ones the fake understands).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl Filter {
    /// Parse a fieldSelector such as `metadata.name=node-1`. Unknown fields are an error, as on
    /// the real apiserver ("field label not supported").
    pub fn with_field_selector(mut self, sel: &str) -> Result<Self, String> {
        for term in sel.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, value) = term
                .split_once("==")
                .or_else(|| term.split_once('='))
                .ok_or_else(|| format!("invalid field selector term {term:?}"))?;
            match field.trim() {
                "metadata.name" => self.name = Some(value.trim().to_string()),
                "metadata.namespace" => self.namespace = Some(value.trim().to_string()),
                f => return Err(format!("field label not supported: {f}")),
            }
        }
        Ok(self)
    }

    pub fn matches(&self, key: &ObjKey) -> bool {
        self.namespace
            .as_ref()
            .is_none_or(|ns| *ns == key.namespace)
            && self.name.as_ref().is_none_or(|n| *n == key.name)
    }
}

/// Why a list or watch cannot be served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gone {
    /// A watch asked for a resourceVersion older than the compaction point.
    TooOldResourceVersion { requested: u64, oldest: u64 },
    /// A list continue token refers to a snapshot that was compacted away.
    ContinueExpired,
}

/// One page of a list.
#[derive(Clone, Debug)]
pub struct ListPage {
    pub resource_version: u64,
    /// Each item serialized as JSON, without `kind` / `apiVersion` (see [`list_item_json`]).
    pub items: Vec<Bytes>,
    pub continue_token: Option<String>,
    pub remaining: Option<usize>,
}

/// A stored object: its JSON value (for watch events, GET and the next upsert's uid) and, made
/// once at upsert, its serialized list item (for lists, which copy only a reference to it).
#[derive(Clone, Debug)]
struct Stored {
    value: Value,
    item: Bytes,
}

/// The objects of one kind at one resourceVersion (their list items), keyed by (kind,
/// resourceVersion).
type Snapshot = ((Kind, u64), Arc<Vec<(ObjKey, Bytes)>>);

/// How many paged-list snapshots are kept (oldest dropped first), bounding memory.
const MAX_SNAPSHOTS: usize = 64;

/// The state of the fake cluster.
#[derive(Debug)]
pub struct Store {
    /// The last resourceVersion handed out.
    rv: u64,
    /// Every resourceVersion `<= compacted` is too old to watch from or continue a list at.
    compacted: u64,
    objects: BTreeMap<ObjKey, Stored>,
    /// Events with `rv > compacted`, in rv order.
    history: Vec<Event>,
    /// Objects of one kind at one resourceVersion, for continuing a paged list consistently.
    snapshots: VecDeque<Snapshot>,
    next_uid: u64,
}

impl Default for Store {
    fn default() -> Self {
        // Start at a non-trivial resourceVersion, as a real cluster would.
        Store {
            rv: 100,
            compacted: 0,
            objects: BTreeMap::new(),
            history: Vec::new(),
            snapshots: VecDeque::new(),
            next_uid: 1,
        }
    }
}

impl Store {
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Create or replace an object. Its kind comes from its `kind` field; namespaced kinds default
    /// to namespace "default". Returns the new resourceVersion.
    pub fn upsert(&mut self, mut obj: Value) -> Result<u64, String> {
        let kind = obj
            .get("kind")
            .and_then(Value::as_str)
            .and_then(Kind::from_kind)
            .ok_or_else(|| format!("object has no supported kind: {:?}", obj.get("kind")))?;
        let meta = obj
            .as_object_mut()
            .ok_or("object is not a JSON object")?
            .entry("metadata")
            .or_insert_with(|| json!({}));
        let meta = meta
            .as_object_mut()
            .ok_or("metadata is not a JSON object")?;
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or("metadata.name is missing")?
            .to_string();
        let namespace = if kind.namespaced() {
            let ns = meta
                .get("namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_string();
            meta.insert("namespace".into(), json!(ns));
            ns
        } else {
            meta.remove("namespace");
            String::new()
        };
        let key = ObjKey {
            kind,
            namespace,
            name,
        };
        let old_uid = self
            .objects
            .get(&key)
            .and_then(|o| o.value["metadata"]["uid"].as_str().map(str::to_string));
        let ty = if old_uid.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        let uid = old_uid.unwrap_or_else(|| {
            self.next_uid += 1;
            format!("00000000-0000-4000-8000-{:012x}", self.next_uid)
        });
        self.rv += 1;
        meta.insert("uid".into(), json!(uid));
        meta.insert("resourceVersion".into(), json!(self.rv.to_string()));
        obj["apiVersion"] = json!(kind.api_version());
        let item = list_item_json(&obj);
        self.objects.insert(
            key.clone(),
            Stored {
                value: obj.clone(),
                item,
            },
        );
        self.history.push(Event {
            rv: self.rv,
            key,
            ty,
            object: obj,
        });
        Ok(self.rv)
    }

    /// Delete an object; the DELETED event carries its last state at the new resourceVersion.
    /// Returns the new resourceVersion, or `None` if there was no such object.
    pub fn delete(&mut self, kind: Kind, namespace: &str, name: &str) -> Option<u64> {
        let ns = if kind.namespaced() { namespace } else { "" };
        let key = ObjKey {
            kind,
            namespace: ns.to_string(),
            name: name.to_string(),
        };
        let mut obj = self.objects.remove(&key)?.value;
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.history.push(Event {
            rv: self.rv,
            key,
            ty: EventType::Deleted,
            object: obj,
        });
        Some(self.rv)
    }

    /// Make every resourceVersion handed out so far too old (as etcd compaction does): watches
    /// from them get 410 Gone, as do list continue tokens taken before. The counter advances by
    /// one so a list made after compaction returns a resourceVersion that can be watched.
    pub fn compact(&mut self) {
        self.compacted = self.rv;
        self.rv += 1;
        self.history.clear();
        self.snapshots.clear();
    }

    /// The stored objects of `kind`, in key order (keys sort by kind first).
    fn of_kind(&self, kind: Kind) -> impl Iterator<Item = (&ObjKey, &Stored)> {
        let first = ObjKey {
            kind,
            namespace: String::new(),
            name: String::new(),
        };
        self.objects
            .range(first..)
            .take_while(move |(k, _)| k.kind == kind)
    }

    /// The current objects matching `kind` and `filter`, in key order.
    fn current(&self, kind: Kind, filter: &Filter) -> Vec<(ObjKey, Value)> {
        self.of_kind(kind)
            .filter(|(k, _)| filter.matches(k))
            .map(|(k, o)| (k.clone(), o.value.clone()))
            .collect()
    }

    /// A list request: `limit` pages (0 or `None` = everything), `continue_token` resumes a
    /// paged list at the resourceVersion of its first page.
    pub fn list(
        &mut self,
        kind: Kind,
        filter: &Filter,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> Result<ListPage, Gone> {
        // The matching objects are walked by reference and the page takes references to their
        // list items, serialized at upsert.
        let limit = limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
        let page_of = |matching: Vec<&Bytes>, offset: usize| {
            let end = offset.saturating_add(limit).min(matching.len());
            let page: Vec<Bytes> = matching[offset.min(end)..end]
                .iter()
                .map(|b| (*b).clone())
                .collect();
            (page, matching.len() - end, end)
        };
        let (rv, (page, remaining, end)) = match continue_token {
            Some(tok) => {
                let (rv, offset) = parse_continue(tok).ok_or(Gone::ContinueExpired)?;
                let snap = self
                    .snapshots
                    .iter()
                    .find(|(k, _)| *k == (kind, rv))
                    .map(|(_, s)| s.clone())
                    .ok_or(Gone::ContinueExpired)?;
                let matching = snap
                    .iter()
                    .filter(|(k, _)| filter.matches(k))
                    .map(|(_, v)| v)
                    .collect();
                (rv, page_of(matching, offset))
            }
            None => {
                let matching = self
                    .of_kind(kind)
                    .filter(|(k, _)| filter.matches(k))
                    .map(|(_, o)| &o.item)
                    .collect();
                (self.rv, page_of(matching, 0))
            }
        };
        let continue_token = if remaining > 0 {
            if continue_token.is_none() {
                self.keep_snapshot(kind, rv);
            }
            Some(format!("{rv}/{end}"))
        } else {
            None
        };
        Ok(ListPage {
            resource_version: rv,
            items: page,
            remaining: continue_token.as_ref().map(|_| remaining),
            continue_token,
        })
    }

    fn keep_snapshot(&mut self, kind: Kind, rv: u64) {
        if self.snapshots.iter().any(|(k, _)| *k == (kind, rv)) {
            return;
        }
        let all = self
            .of_kind(kind)
            .map(|(k, o)| (k.clone(), o.item.clone()))
            .collect();
        self.snapshots.push_back(((kind, rv), Arc::new(all)));
        while self.snapshots.len() > MAX_SNAPSHOTS {
            self.snapshots.pop_front();
        }
    }

    /// Where a watch from `rv` starts, or 410 Gone if `rv` was compacted away.
    pub fn check_watch_from(&self, rv: u64) -> Result<(), Gone> {
        if rv <= self.compacted {
            Err(Gone::TooOldResourceVersion {
                requested: rv,
                oldest: self.compacted + 1,
            })
        } else {
            Ok(())
        }
    }

    /// Events after `cursor` that match, and the resourceVersion the caller has now seen up to.
    /// For a live watch: one that had seen everything when compaction happened (`cursor ==
    /// compacted`) keeps going, as an etcd watch does; one that lagged behind gets 410 Gone.
    pub fn events_after(
        &self,
        kind: Kind,
        filter: &Filter,
        cursor: u64,
    ) -> Result<(Vec<Event>, u64), Gone> {
        if cursor < self.compacted {
            return Err(Gone::TooOldResourceVersion {
                requested: cursor,
                oldest: self.compacted + 1,
            });
        }
        let start = self.history.partition_point(|e| e.rv <= cursor);
        let events = self.history[start..]
            .iter()
            .filter(|e| e.key.kind == kind && filter.matches(&e.key))
            .cloned()
            .collect();
        Ok((events, self.rv))
    }

    /// Synthetic ADDED events for the current state (a watch from resourceVersion "0" or unset).
    pub fn initial_events(&self, kind: Kind, filter: &Filter) -> (Vec<Event>, u64) {
        let events = self
            .current(kind, filter)
            .into_iter()
            .map(|(key, object)| Event {
                rv: self.rv,
                key,
                ty: EventType::Added,
                object,
            })
            .collect();
        (events, self.rv)
    }

    /// One object, for GET of a single name.
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let ns = if kind.namespaced() { namespace } else { "" };
        self.objects
            .get(&ObjKey {
                kind,
                namespace: ns.to_string(),
                name: name.to_string(),
            })
            .map(|o| o.value.clone())
    }
}

fn parse_continue(tok: &str) -> Option<(u64, usize)> {
    let (rv, off) = tok.split_once('/')?;
    Some((rv.parse().ok()?, off.parse().ok()?))
}

/// `v` serialized as a list item: list items carry no `kind` / `apiVersion` on the real
/// apiserver (the list's own kind says it).
pub fn list_item_json(v: &Value) -> Bytes {
    /// An object's fields other than `kind` and `apiVersion`, serialized as a JSON object.
    struct Untyped<'a>(&'a Map<String, Value>);
    impl Serialize for Untyped<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_map(
                self.0
                    .iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "kind" | "apiVersion")),
            )
        }
    }
    let json = match v.as_object() {
        Some(m) => serde_json::to_vec(&Untyped(m)),
        None => serde_json::to_vec(v),
    };
    Bytes::from(json.expect("JSON values serialize"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ns: &str, name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": ns, "name": name}})
    }

    /// A list item as the client decodes it.
    fn item(b: &Bytes) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn list_items_are_the_stored_objects_without_their_type() {
        let mut s = Store::default();
        s.upsert(json!({"kind": "Service", "apiVersion": "v1",
            "metadata": {"name": "a", "labels": {"x": "y"}}, "spec": {"ports": "eighty"}}))
            .unwrap();
        let page = s
            .list(Kind::Service, &Filter::default(), None, None)
            .unwrap();
        let mut want = s.get(Kind::Service, "default", "a").unwrap();
        want.as_object_mut().unwrap().remove("kind");
        want.as_object_mut().unwrap().remove("apiVersion");
        assert_eq!(item(&page.items[0]), want);
        // A later upsert is what the next list serves.
        s.upsert(svc("default", "a")).unwrap();
        let page = s
            .list(Kind::Service, &Filter::default(), None, None)
            .unwrap();
        assert!(item(&page.items[0]).get("spec").is_none());
    }

    #[test]
    fn upsert_assigns_increasing_versions_and_event_types() {
        let mut s = Store::default();
        let a = s.upsert(svc("default", "a")).unwrap();
        let b = s.upsert(svc("default", "a")).unwrap();
        assert!(b > a);
        let (evs, now) = s
            .events_after(Kind::Service, &Filter::default(), a - 1)
            .unwrap();
        assert_eq!(now, b);
        let types: Vec<_> = evs.iter().map(|e| e.ty).collect();
        assert_eq!(types, [EventType::Added, EventType::Modified]);
        assert_eq!(
            evs[1].object["metadata"]["resourceVersion"],
            json!(b.to_string())
        );
        assert_eq!(
            evs[0].object["metadata"]["uid"],
            evs[1].object["metadata"]["uid"]
        );
    }

    #[test]
    fn a_list_holds_exactly_its_kind_in_key_order() {
        let mut s = Store::default();
        s.upsert(json!({"kind": "Node", "metadata": {"name": "a"}}))
            .unwrap();
        for (ns, n) in [("b", "x"), ("a", "z"), ("a", "y")] {
            s.upsert(svc(ns, n)).unwrap();
        }
        s.upsert(json!({"kind": "EndpointSlice", "metadata": {"namespace": "a", "name": "s"}}))
            .unwrap();
        let mut names = |kind| {
            let page = s.list(kind, &Filter::default(), None, None).unwrap();
            page.items
                .iter()
                .map(|i| item(i)["metadata"]["name"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(Kind::Service), ["y", "z", "x"]);
        assert_eq!(names(Kind::Node), ["a"]);
        assert_eq!(names(Kind::EndpointSlice), ["s"]);
    }

    #[test]
    fn paged_list_is_consistent_and_expires_on_compaction() {
        let mut s = Store::default();
        for n in ["a", "b", "c"] {
            s.upsert(svc("default", n)).unwrap();
        }
        let p1 = s
            .list(Kind::Service, &Filter::default(), Some(2), None)
            .unwrap();
        assert_eq!(p1.items.len(), 2);
        assert!(
            item(&p1.items[0]).get("kind").is_none(),
            "list items carry no kind"
        );
        assert_eq!(p1.remaining, Some(1));
        // A change after the first page does not show in the second one.
        s.upsert(svc("default", "d")).unwrap();
        let tok = p1.continue_token.clone().unwrap();
        let p2 = s
            .list(Kind::Service, &Filter::default(), Some(2), Some(&tok))
            .unwrap();
        assert_eq!(p2.items.len(), 1);
        assert_eq!(item(&p2.items[0])["metadata"]["name"], json!("c"));
        assert_eq!(p2.resource_version, p1.resource_version);
        assert!(p2.continue_token.is_none());
        s.compact();
        assert_eq!(
            s.list(Kind::Service, &Filter::default(), Some(2), Some(&tok))
                .unwrap_err(),
            Gone::ContinueExpired
        );
    }

    #[test]
    fn compaction_makes_old_versions_gone_but_fresh_lists_watchable() {
        let mut s = Store::default();
        let rv = s.upsert(svc("default", "a")).unwrap();
        s.compact();
        assert!(matches!(
            s.check_watch_from(rv),
            Err(Gone::TooOldResourceVersion { .. })
        ));
        assert!(matches!(
            s.events_after(Kind::Service, &Filter::default(), rv - 1),
            Err(Gone::TooOldResourceVersion { .. })
        ));
        // A live watch that had seen everything at compaction time keeps going.
        assert!(s
            .events_after(Kind::Service, &Filter::default(), rv)
            .is_ok());
        let list = s
            .list(Kind::Service, &Filter::default(), None, None)
            .unwrap();
        assert!(s
            .events_after(Kind::Service, &Filter::default(), list.resource_version)
            .is_ok());
    }

    #[test]
    fn field_selectors_filter_and_unknown_fields_fail() {
        let mut s = Store::default();
        for n in ["n1", "n2"] {
            s.upsert(json!({"kind": "Node", "metadata": {"name": n}}))
                .unwrap();
        }
        let f = Filter::default()
            .with_field_selector("metadata.name=n2")
            .unwrap();
        let page = s.list(Kind::Node, &f, None, None).unwrap();
        assert_eq!(page.items.len(), 1);
        assert_eq!(item(&page.items[0])["metadata"]["name"], json!("n2"));
        assert!(Filter::default()
            .with_field_selector("spec.unschedulable=true")
            .is_err());
    }

    #[test]
    fn delete_emits_last_state_at_new_version() {
        let mut s = Store::default();
        let rv = s.upsert(svc("ns1", "a")).unwrap();
        let del = s.delete(Kind::Service, "ns1", "a").unwrap();
        assert!(s.delete(Kind::Service, "ns1", "a").is_none());
        let (evs, _) = s
            .events_after(Kind::Service, &Filter::default(), rv)
            .unwrap();
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].ty, EventType::Deleted);
        assert_eq!(
            evs[0].object["metadata"]["resourceVersion"],
            json!(del.to_string())
        );
    }
}
