//! Manifest parsing: multi-document YAML of real Kubernetes objects, invalid documents skipped.

mod common;

use lb_model::yaml_docs::parse;
use lb_model::{ClusterState, DesiredState, SourceEvent};

const GOOD: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec: {replicas: 3}
---
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.80
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: ["10.244.1.5"]
  conditions: {ready: true}
  nodeName: node-a
"#;

#[test]
fn services_and_slices_are_parsed_other_kinds_and_empty_docs_ignored() {
    let p = parse("web.yaml", GOOD);
    assert!(p.problems.is_empty(), "{:?}", p.problems);
    assert_eq!(p.services.len(), 1);
    assert_eq!(p.slices.len(), 1);
    assert_eq!(p.services[0].metadata.namespace.as_deref(), Some("shop"));
    assert_eq!(p.slices[0].ports.as_ref().unwrap()[0].port, Some(8080));
}

#[test]
fn an_invalid_document_is_a_problem_and_the_rest_of_the_file_counts() {
    let text = r#"
apiVersion: v1
kind: Service
metadata: {name: broken}
spec:
  ports: "not a list"
---
apiVersion: v1
kind: Service
metadata: {namespace: default}
spec: {clusterIP: 10.96.0.2}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s, labels: {kubernetes.io/service-name: ok}}
addressType: IPv4
endpoints: [{addresses: "10.0.0.1"}]
---
just a string
---
apiVersion: v1
kind: Service
metadata: {name: ok}
spec: {clusterIP: 10.96.0.3, ports: [{port: 80}]}
"#;
    let p = parse("mixed.yaml", text);
    assert_eq!(p.services.len(), 1);
    assert_eq!(p.services[0].metadata.name.as_deref(), Some("ok"));
    assert!(p.slices.is_empty());
    let reasons: Vec<String> = p.problems.iter().map(|p| p.reason.clone()).collect();
    assert_eq!(p.problems.len(), 4, "{reasons:#?}");
    assert!(p
        .problems
        .iter()
        .all(|p| p.object == "mixed.yaml" && p.kind == "parse"));
    assert!(
        reasons[0].starts_with("document 1 (Service/broken)"),
        "{}",
        reasons[0]
    );
    assert!(
        reasons[1].starts_with("document 2 (Service/?)") && reasons[1].contains("metadata.name"),
        "{}",
        reasons[1]
    );
    assert!(
        reasons[2].starts_with("document 3 (EndpointSlice/s)"),
        "{}",
        reasons[2]
    );
    assert!(reasons[3].starts_with("document 4"), "{}", reasons[3]);
}

#[test]
fn a_file_that_is_not_yaml_is_one_problem() {
    let p = parse("notes.txt", "key: [unclosed\n  - {\n: :\n");
    assert_eq!(p.problems.len(), 1, "{:?}", p.problems);
    assert!(p.problems[0].reason.contains("not valid YAML"));
    assert!(p.services.is_empty() && p.slices.is_empty());
}

#[test]
fn documents_before_a_syntax_error_still_count() {
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1}\n---\nfoo: [\n";
    let p = parse("f.yaml", text);
    assert_eq!(p.services.len(), 1);
    assert_eq!(p.problems.len(), 1);
    assert!(p.problems[0].reason.starts_with("document 2"));
}

#[test]
fn a_mapping_without_kind_is_a_problem_and_lists_are_unpacked() {
    let text = r#"
name: values
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: a}
  spec: {clusterIP: 10.96.0.1}
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: c}
"#;
    let p = parse("l.yaml", text);
    assert_eq!(p.services.len(), 1);
    assert_eq!(p.problems.len(), 1);
    assert!(p.problems[0].reason.contains("apiVersion or kind missing"));
}

#[test]
fn empty_file_is_fine() {
    let p = parse("empty.yaml", "");
    assert!(p.problems.is_empty() && p.services.is_empty() && p.slices.is_empty());
    let p = parse("comments.yaml", "# nothing here\n---\n");
    assert!(p.problems.is_empty(), "{:?}", p.problems);
}

/// The repository's example manifests parse cleanly and every Service in them gets frontends.
#[test]
fn repository_examples_parse_and_produce_frontends() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    let mut state = ClusterState {
        node: common::node(),
        ..Default::default()
    };
    let mut files = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            continue;
        }
        files += 1;
        let p = parse(
            &path.display().to_string(),
            &std::fs::read_to_string(&path).unwrap(),
        );
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        for s in p.services {
            state.apply(SourceEvent::ServiceUpsert(s));
        }
        for s in p.slices {
            state.apply(SourceEvent::SliceUpsert(s));
        }
    }
    let (desired, problems) = DesiredState::rebuild(&state, &common::cfg());
    assert!(problems.is_empty(), "{problems:?}");
    for key in state.services.keys() {
        assert!(
            desired.by_service.contains_key(key),
            "{key} has no frontends"
        );
    }
    assert!(files == 0 || !desired.frontends.is_empty());
}
