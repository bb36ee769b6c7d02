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

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// An object of kind `K` as the API server sent it: its metadata, and the typed object or why it
/// did not decode.
#[derive(Clone, Debug)]
pub struct Lenient<K> {
    meta: ObjectMeta,
    pub parsed: Result<K, String>,
}

impl<K> Lenient<K> {
    /// "namespace/name" (or "name" for cluster-scoped objects), for problem reports.
    pub fn display_name(&self) -> String {
        let name = self.meta.name.as_deref().unwrap_or("<unnamed>");
        match self.meta.namespace.as_deref() {
            Some(ns) => format!("{ns}/{name}"),
            None => name.to_string(),
        }
    }
}

impl<'de, K> Deserialize<'de> for Lenient<K>
where
    K: DeserializeOwned + Resource,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Ok(match K::deserialize(&v) {
            Ok(k) => Lenient {
                meta: k.meta().clone(),
                parsed: Ok(k),
            },
            Err(e) => Lenient {
                meta: fallback_meta(&v),
                parsed: Err(e.to_string()),
            },
        })
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
        &self.meta
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.meta
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
