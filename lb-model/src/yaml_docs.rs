//! Parsing of manifest files (the source used without Kubernetes): multi-document YAML holding real
//! Kubernetes `v1/Service` and `discovery.k8s.io/v1/EndpointSlice` objects, parsed with k8s-openapi.
//! Other kinds (Deployments in the tutorials' files, ...) are ignored silently; invalid documents
//! are reported as [`Problem`]s and skipped, never failing the whole file.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::Metadata;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_yaml::Value;

use crate::Problem;

/// Objects found in one file.
#[derive(Clone, Debug, Default)]
pub struct Parsed {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub problems: Vec<Problem>,
}

/// Parse one file's text. `origin` names the file in problems.
pub fn parse(origin: &str, text: &str) -> Parsed {
    let mut out = Parsed::default();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        match serde_yaml::Value::deserialize(doc) {
            Ok(value) => out.add(origin, &format!("document {n}"), value),
            Err(e) => {
                // A syntax error ends the stream: serde_yaml would repeat it for every further
                // document, and nothing after it can be trusted to be split right.
                out.problem(
                    origin,
                    &format!("document {n}"),
                    None,
                    format!("not valid YAML: {e}"),
                );
                break;
            }
        }
    }
    out
}

impl Parsed {
    /// File one document (`at` says where it is, for problems).
    fn add(&mut self, origin: &str, at: &str, value: Value) {
        if value.is_null() {
            return; // empty document ("---" twice, trailing separator)
        }
        if !value.is_mapping() {
            self.problem(
                origin,
                at,
                None,
                "not a Kubernetes object (not a mapping)".to_string(),
            );
            return;
        }
        let field = |name: &str| value.get(name).and_then(Value::as_str).map(str::to_owned);
        let (Some(api_version), Some(kind)) = (field("apiVersion"), field("kind")) else {
            self.problem(
                origin,
                at,
                None,
                "not a Kubernetes object (apiVersion or kind missing)".to_string(),
            );
            return;
        };
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let what = format!("{kind}/{}", name.as_deref().unwrap_or("?"));
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "Service") => {
                if let Some(svc) = self.object::<Service>(origin, at, &what, value) {
                    self.services.push(svc);
                }
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                if let Some(slice) = self.object::<EndpointSlice>(origin, at, &what, value) {
                    self.slices.push(slice);
                }
            }
            // `kubectl get -o yaml` output: the objects are in `items`.
            ("v1", "List") => {
                let items = value
                    .get("items")
                    .and_then(Value::as_sequence)
                    .cloned()
                    .unwrap_or_default();
                for (j, item) in items.into_iter().enumerate() {
                    self.add(origin, &format!("{at} item {}", j + 1), item);
                }
            }
            _ => {} // Deployments and the like: not ours
        }
    }

    /// Deserialize one object; it must have a name to be addressable.
    fn object<T: DeserializeOwned + Metadata<Ty = ObjectMeta>>(
        &mut self,
        origin: &str,
        at: &str,
        what: &str,
        value: Value,
    ) -> Option<T> {
        match serde_yaml::from_value::<T>(value) {
            Ok(obj)
                if obj
                    .metadata()
                    .name
                    .as_deref()
                    .is_some_and(|n| !n.is_empty()) =>
            {
                Some(obj)
            }
            Ok(_) => {
                self.problem(
                    origin,
                    at,
                    Some(what),
                    "metadata.name is missing".to_string(),
                );
                None
            }
            Err(e) => {
                self.problem(origin, at, Some(what), e.to_string());
                None
            }
        }
    }

    fn problem(&mut self, origin: &str, at: &str, what: Option<&str>, reason: String) {
        let reason = match what {
            Some(what) => format!("{at} ({what}): {reason}"),
            None => format!("{at}: {reason}"),
        };
        self.problems.push(Problem {
            object: origin.to_string(),
            kind: "parse",
            reason,
        });
    }
}
