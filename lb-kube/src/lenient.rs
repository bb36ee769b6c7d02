//! [`Lenient<K>`]: a Kubernetes object that deserializes even when the object itself is invalid.
//!
//! Why: kube-rs decodes a whole list response at once (`ObjectList<K>`), so with a plain typed
//! watcher one object that does not fit its k8s-openapi struct (a Service whose `spec.ports` is a
//! string) fails the *entire* list: kube-runtime's watcher reports `InitialListFailed`, backs off
//! and relists forever, and that kind never syncs. In a watch stream the same object only fails
//! its own line (`WatchFailed`), but the event is lost without a trace of which object it was.
//!
//! Watching `Lenient<K>` instead moves decoding of each object out of kube-rs: the list and the
//! events always decode, each object carries `Ok(K)` or the decode error, and the source reports
//! the bad object as a [`lb_model::Problem`] and treats it as absent (as the manifests source
//! does with an invalid file). Only an object whose `metadata` itself is malformed beyond
//! name/namespace/resourceVersion strings loses more than its own fields (see [`fallback_meta`]).
//!
//! Each object is taken from the response as its raw JSON text (serde_json's `RawValue`: checked
//! and copied, not built into a tree) and decoded from that text into `K` once; only an object
//! that does not decode is parsed again, as a `serde_json::Value`, for its metadata. Building a
//! `Value` of every object first and decoding `K` from it took about twice the CPU time (10k
//! EndpointSlices with 100k endpoints: ~0.28 s against ~0.15 s on the 2-core bench VM), on the
//! agent's cold start, where the list competes with loading the programs for the cores.
//!
//! A `RawValue` can only be taken from serde_json's own deserializers, not from the buffer serde
//! decodes through when a watch event's `object` comes before its `type` field (kube-core's
//! `WatchEvent` is an adjacently tagged enum). The apiserver always writes `type` first
//! (metav1.WatchEvent's field order), and list items are never buffered.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::Value;

/// An object of kind `K` as the API server sent it: its metadata, and the typed object or why it
/// did not decode.
#[derive(Clone, Debug)]
pub struct Lenient<K> {
    /// The metadata of an object that did not decode (empty when it did: then the typed
    /// object's own metadata is the object's, without a copy).
    meta: ObjectMeta,
    pub parsed: Result<K, String>,
}

impl<K: Resource<DynamicType = ()>> Lenient<K> {
    /// "namespace/name" (or "name" for cluster-scoped objects), for problem reports.
    pub fn display_name(&self) -> String {
        let meta = self.object_meta();
        let name = meta.name.as_deref().unwrap_or("<unnamed>");
        match meta.namespace.as_deref() {
            Some(ns) => format!("{ns}/{name}"),
            None => name.to_string(),
        }
    }

    fn object_meta(&self) -> &ObjectMeta {
        match &self.parsed {
            Ok(k) => k.meta(),
            Err(_) => &self.meta,
        }
    }
}

impl<'de, K> Deserialize<'de> for Lenient<K>
where
    K: DeserializeOwned + Resource,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = <Box<RawValue>>::deserialize(d)?;
        Ok(match serde_json::from_str::<K>(raw.get()) {
            Ok(k) => Lenient {
                meta: ObjectMeta::default(),
                parsed: Ok(k),
            },
            Err(e) => Lenient {
                // The text is JSON (RawValue checked it), so this parse does not fail.
                meta: fallback_meta(&serde_json::from_str(raw.get()).unwrap_or(Value::Null)),
                parsed: Err(error_text(&e)),
            },
        })
    }
}

/// Why an object did not decode, without serde_json's " at line 1 column N": the position is in
/// the object's text, which the report does not show (the same text as decoding a `Value` gave).
fn error_text(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let position = format!(" at line {} column {}", e.line(), e.column());
    match text.strip_suffix(&position) {
        Some(t) if e.line() != 0 => t.to_string(),
        _ => text,
    }
}

/// The metadata of an object that did not decode: the full `ObjectMeta` if that part is valid,
/// else just the string fields the watcher and the problem report need.
fn fallback_meta(v: &Value) -> ObjectMeta {
    let m = &v["metadata"];
    ObjectMeta::deserialize(m).unwrap_or_else(|_| {
        let s = |f: &str| m.get(f).and_then(Value::as_str).map(str::to_string);
        ObjectMeta {
            name: s("name"),
            namespace: s("namespace"),
            resource_version: s("resourceVersion"),
            uid: s("uid"),
            ..ObjectMeta::default()
        }
    })
}

/// Same API type, group, version and URL as `K`: `Api<Lenient<Service>>` requests exactly what
/// `Api<Service>` would.
impl<K> Resource for Lenient<K>
where
    K: Resource<DynamicType = ()>,
{
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }
    fn api_version(dt: &()) -> Cow<'_, str> {
        K::api_version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        self.object_meta()
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        match &mut self.parsed {
            Ok(k) => k.meta_mut(),
            Err(_) => &mut self.meta,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use kube::core::ObjectList;
    use serde_json::json;

    #[test]
    fn one_bad_item_does_not_fail_the_list() {
        let list = json!({
            "kind": "ServiceList", "apiVersion": "v1", "metadata": {"resourceVersion": "7"},
            "items": [
                {"metadata": {"name": "good", "namespace": "a", "resourceVersion": "5"},
                 "spec": {"ports": [{"port": 80}]}},
                {"metadata": {"name": "bad", "namespace": "a", "resourceVersion": "6"},
                 "spec": {"ports": "eighty"}},
            ]
        });
        // The plain typed list fails as a whole...
        assert!(serde_json::from_value::<ObjectList<Service>>(list.clone()).is_err());
        // ...the lenient one keeps both, and says which one is bad.
        let l: ObjectList<Lenient<Service>> = serde_json::from_value(list).unwrap();
        assert_eq!(l.items.len(), 2);
        assert!(l.items[0].parsed.is_ok());
        assert!(l.items[1].parsed.is_err());
        assert_eq!(l.items[1].display_name(), "a/bad");
        assert_eq!(l.items[1].meta().resource_version.as_deref(), Some("6"));
    }

    #[test]
    fn a_list_response_decodes_each_object_once_and_skips_only_the_bad_one() {
        // As kube-client decodes a list: from the response text.
        let text = r#"{"kind":"ServiceList","apiVersion":"v1","metadata":{"resourceVersion":"7"},
            "items":[
              {"metadata":{"name":"good","namespace":"a","resourceVersion":"5","labels":{"x":"y"}},
               "spec":{"ports":[{"port":80}]}},
              {"metadata":{"name":"bad","namespace":"a","resourceVersion":"6"},
               "spec":{"ports":"eighty"}}]}"#;
        let l: ObjectList<Lenient<Service>> = serde_json::from_str(text).unwrap();
        assert_eq!(l.items.len(), 2);
        let good = l.items[0].parsed.as_ref().unwrap();
        assert_eq!(l.items[0].meta(), &good.metadata);
        assert_eq!(l.items[0].display_name(), "a/good");
        assert_eq!(l.items[1].display_name(), "a/bad");
        assert_eq!(l.items[1].meta().resource_version.as_deref(), Some("6"));
        // The reason reads as it did when objects were decoded from a `Value`: no position.
        let via_value = Service::deserialize(
            &json!({"metadata": {"name": "bad"}, "spec": {"ports": "eighty"}}),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(l.items[1].parsed.as_ref().unwrap_err(), &via_value);
        assert!(!via_value.contains("line"), "{via_value}");
    }

    #[test]
    fn watch_events_in_apiserver_field_order_decode_leniently() {
        use kube::core::WatchEvent;
        let ok = r#"{"type":"ADDED","object":{"kind":"Service","apiVersion":"v1",
            "metadata":{"name":"s","namespace":"a","resourceVersion":"9"},"spec":{"ports":[{"port":80}]}}}"#;
        let bad = r#"{"type":"MODIFIED","object":{"kind":"Service","apiVersion":"v1",
            "metadata":{"name":"s","namespace":"a","resourceVersion":"10"},"spec":{"ports":7}}}"#;
        match serde_json::from_str::<WatchEvent<Lenient<Service>>>(ok).unwrap() {
            WatchEvent::Added(s) => assert!(s.parsed.is_ok()),
            e => panic!("{e:?}"),
        }
        match serde_json::from_str::<WatchEvent<Lenient<Service>>>(bad).unwrap() {
            WatchEvent::Modified(s) => {
                assert!(s.parsed.is_err());
                assert_eq!(s.meta().resource_version.as_deref(), Some("10"));
            }
            e => panic!("{e:?}"),
        }
    }

    /// The limit the module doc names: with `object` before `type`, serde buffers the object and
    /// no `RawValue` can be taken from the buffer. The apiserver never writes that order, and
    /// lb-fakeapi writes the apiserver's.
    #[test]
    fn a_watch_event_with_its_object_before_its_type_does_not_decode() {
        use kube::core::WatchEvent;
        let reordered = r#"{"object":{"metadata":{"name":"s","namespace":"a"}},"type":"ADDED"}"#;
        assert!(serde_json::from_str::<WatchEvent<Lenient<Service>>>(reordered).is_err());
    }

    #[test]
    fn error_text_drops_only_the_position() {
        let e = serde_json::from_str::<Service>(r#"{"spec":{"ports":"x"}}"#).unwrap_err();
        assert!(e.to_string().ends_with(&format!("column {}", e.column())));
        assert_eq!(
            format!(
                "{} at line {} column {}",
                error_text(&e),
                e.line(),
                e.column()
            ),
            e.to_string()
        );
        let no_position = Service::deserialize(&json!({"spec": {"ports": "x"}})).unwrap_err();
        assert_eq!(error_text(&no_position), no_position.to_string());
    }

    #[test]
    fn malformed_metadata_keeps_the_identity_strings() {
        let v = json!({"metadata": {"name": "x", "namespace": "n", "resourceVersion": "9", "labels": "oops"}});
        let l: Lenient<Service> = serde_json::from_value(v).unwrap();
        assert!(l.parsed.is_err());
        assert_eq!(l.meta().name.as_deref(), Some("x"));
        assert_eq!(l.meta().resource_version.as_deref(), Some("9"));
    }

    #[test]
    fn requests_the_same_urls_as_the_typed_api() {
        assert_eq!(
            Lenient::<Service>::url_path(&(), None),
            Service::url_path(&(), None)
        );
        assert_eq!(
            Lenient::<Service>::url_path(&(), Some("ns")),
            "/api/v1/namespaces/ns/services"
        );
    }
}
