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
///
/// Most files are plain block-style YAML whose documents each say `apiVersion: ...` and
/// `kind: ...` on a line of their own: those documents are deserialized straight into their
/// type ([`parse_direct`]), which skips building a `serde_yaml::Value` tree first and takes
/// about a third less time (a cold start parses ~40 MB at 10k Services). Any file the direct
/// path is not sure about, or that has any problem, is parsed the general way
/// ([`parse_general`]), so problems and odd files are handled exactly as before.
pub fn parse(origin: &str, text: &str) -> Parsed {
    parse_direct(text).unwrap_or_else(|| parse_general(origin, text))
}

/// The documents of `text` when it uses nothing but `---` lines between documents (no
/// directives, no `...` ends, nothing after a `---`), with blank documents left out; None
/// otherwise. A `---` at the start of a line always separates documents in YAML (it may not
/// appear in content), so the split is the parser's.
fn split_documents(text: &str) -> Option<Vec<&str>> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        if bare.starts_with('%') || bare.starts_with("...") {
            return None;
        }
        if let Some(rest) = bare.strip_prefix("---") {
            if rest.trim().is_empty() {
                docs.push(&text[start..pos]);
                start = pos + line.len();
            } else if rest.starts_with([' ', '\t']) {
                return None; // content or a tag after the marker
            }
        }
        pos += line.len();
    }
    docs.push(&text[start..]);
    let blank = |d: &&str| {
        d.lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    };
    Some(docs.into_iter().filter(|d| !blank(d)).collect())
}

/// The value of the top-level key `key` when exactly one line of `doc` is `key: value` with a
/// plain value of letters, digits, `.`, `/` or `-`; None otherwise.
fn top_level_plain<'a>(doc: &'a str, key: &str) -> Option<&'a str> {
    let mut found = None;
    for line in doc.lines() {
        let Some(rest) = line.strip_prefix(key).and_then(|r| r.strip_prefix(':')) else {
            continue;
        };
        let v = rest.trim();
        let plain = !v.is_empty()
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '/' | '-'));
        if found.is_some() || !plain {
            return None;
        }
        found = Some(v);
    }
    found
}

/// The direct path of [`parse`]: every document a Service or an EndpointSlice that
/// deserializes cleanly and has a name. None as soon as anything else shows up (another kind,
/// a `List`, an error, a document whose kind cannot be read off its lines).
fn parse_direct(text: &str) -> Option<Parsed> {
    let mut out = Parsed::default();
    for doc in split_documents(text)? {
        let named = |m: &ObjectMeta| m.name.as_deref().is_some_and(|n| !n.is_empty());
        match (
            top_level_plain(doc, "apiVersion")?,
            top_level_plain(doc, "kind")?,
        ) {
            ("v1", "Service") => {
                let svc: Service = serde_yaml::from_str(doc).ok()?;
                named(&svc.metadata).then_some(())?;
                out.services.push(svc);
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                let slice: EndpointSlice = serde_yaml::from_str(doc).ok()?;
                named(&slice.metadata).then_some(())?;
                out.slices.push(slice);
            }
            _ => return None,
        }
    }
    Some(out)
}

/// Parse one file's text through `serde_yaml::Value`: every document, whatever it holds.
pub fn parse_general(origin: &str, text: &str) -> Parsed {
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

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n  namespace: default\nspec:\n  \
        clusterIP: 10.96.0.1\n  ports:\n  - name: \"http\"\n    protocol: TCP\n    port: 80\n    targetPort: 8080\n\
        ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: a-x\n  namespace: default\n  \
        labels:\n    kubernetes.io/service-name: a\naddressType: IPv4\nports:\n  - name: \"http\"\n    protocol: TCP\n    \
        port: 8080\nendpoints:\n  - addresses: [\"10.128.0.10\"]\n    conditions: {ready: true, serving: true, terminating: false}\n    \
        nodeName: node1\n    targetRef: {kind: Pod, namespace: default, name: pod-1}\n";

    #[test]
    fn the_direct_path_gives_what_the_general_path_gives() {
        let direct = parse_direct(PLAIN).expect("a plain file takes the direct path");
        let general = parse_general("f", PLAIN);
        assert!(general.problems.is_empty(), "{:?}", general.problems);
        assert_eq!(direct.services, general.services);
        assert_eq!(direct.slices, general.slices);
        assert_eq!((direct.services.len(), direct.slices.len()), (1, 1));
        // Leading and doubled separators, comments and blank documents change nothing.
        let framed = format!(
            "# c\n---\n{}\n---\n\n---\n",
            PLAIN.replace("---\n", "---\n---\n")
        );
        let d = parse_direct(&framed).expect("direct");
        assert_eq!((d.services, d.slices), (general.services, general.slices));
    }

    #[test]
    fn anything_unusual_takes_the_general_path() {
        for text in [
            // another kind, a List, a quoted kind, a directive, a document end, a tagged marker
            PLAIN.replace("kind: Service", "kind: Deployment"),
            PLAIN.replace("kind: Service", "kind: List"),
            PLAIN.replace("kind: Service", "kind: \"Service\""),
            format!("%YAML 1.2\n---\n{PLAIN}"),
            PLAIN.replace("---\n", "...\n---\n"),
            PLAIN.replace("---\n", "--- !x\n"),
            // invalid content and a missing name: the general path reports them
            PLAIN.replace("port: 80\n", "port: eighty\n"),
            PLAIN.replace("  name: a\n", ""),
            // JSON
            "{\"apiVersion\": \"v1\", \"kind\": \"Service\", \"metadata\": {\"name\": \"a\"}}"
                .to_string(),
        ] {
            assert!(parse_direct(&text).is_none(), "{text}");
        }
        // ... and parse() still reads them the general way.
        let p = parse("f", &PLAIN.replace("port: 80\n", "port: eighty\n"));
        assert_eq!(
            (p.services.len(), p.slices.len(), p.problems.len()),
            (0, 1, 1)
        );
        let p = parse("f", &PLAIN.replace("kind: Service", "kind: \"Service\""));
        assert_eq!((p.services.len(), p.slices.len()), (1, 1));
    }
}
