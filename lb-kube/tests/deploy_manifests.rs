//! Every YAML document under deploy/ parses into its k8s-openapi type without losing a field
//! (a misspelled or misplaced field would be dropped by the typed round trip and fail here), and
//! carries what the agent relies on.

use std::collections::BTreeSet;
use std::path::PathBuf;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Default)]
struct Deploy {
    daemonsets: Vec<DaemonSet>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
}

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Parse into `T` and check nothing was dropped: the typed object serialized back must equal
/// the document (compared as JSON, so YAML formatting does not matter).
fn typed<T: DeserializeOwned + Serialize>(doc: serde_yaml::Value, origin: &str) -> T {
    let want: serde_json::Value = serde_json::to_value(&doc).unwrap();
    let t: T = serde_json::from_value(want.clone()).unwrap_or_else(|e| panic!("{origin}: {e}"));
    let got = serde_json::to_value(&t).unwrap();
    assert_eq!(
        got, want,
        "{origin}: fields lost in the typed round trip (misspelled or misplaced?)"
    );
    t
}

fn load() -> Deploy {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    let mut d = Deploy::default();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let origin = format!("{} document {i}", f.display());
            let v = serde_yaml::Value::deserialize(doc).unwrap_or_else(|e| panic!("{origin}: {e}"));
            if v.is_null() {
                continue;
            }
            match v.get("kind").and_then(|k| k.as_str()) {
                Some("DaemonSet") => d.daemonsets.push(typed(v, &origin)),
                Some("ServiceAccount") => d.service_accounts.push(typed(v, &origin)),
                Some("ClusterRole") => d.cluster_roles.push(typed(v, &origin)),
                Some("ClusterRoleBinding") => d.bindings.push(typed(v, &origin)),
                other => panic!("{origin}: unexpected kind {other:?}"),
            }
        }
    }
    d
}

use serde::Deserialize as _;

fn agent(ds: &DaemonSet) -> &Container {
    let spec = ds.spec.template.spec.as_ref().unwrap();
    spec.containers
        .iter()
        .find(|c| c.name == "xlb")
        .expect("an xlb container")
}

#[test]
fn one_of_each_kind() {
    let d = load();
    assert_eq!(
        (
            d.daemonsets.len(),
            d.service_accounts.len(),
            d.cluster_roles.len(),
            d.bindings.len()
        ),
        (1, 1, 1, 1)
    );
}

#[test]
fn daemonset_runs_the_agent_on_every_node_in_the_host_network() {
    let d = load();
    let ds = &d.daemonsets[0];
    assert_eq!(ds.metadata.namespace.as_deref(), Some("kube-system"));
    let spec = &ds.spec;
    let labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    for (k, v) in spec.selector.match_labels.as_ref().unwrap() {
        assert_eq!(
            labels.get(k),
            Some(v),
            "selector must match the pod template"
        );
    }
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = pod.tolerations.as_ref().unwrap();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "must tolerate every taint"
    );
    assert_eq!(
        pod.service_account_name.as_deref(),
        d.service_accounts[0].metadata.name.as_deref()
    );

    let c = agent(ds);
    assert!(c.image.as_deref().is_some_and(|i| !i.is_empty()));
    let args = c.args.as_ref().unwrap();
    assert_eq!(args[0], "agent");
    let node_arg = args
        .iter()
        .position(|a| a == "--node-name")
        .expect("--node-name");
    assert_eq!(args[node_arg + 1], "$(NODE_NAME)");
    assert!(
        args.iter().any(|a| a == "--in-cluster"),
        "in-cluster config"
    );
    let env = c.env.as_ref().unwrap();
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME env");
    let field = node_name
        .value_from
        .as_ref()
        .unwrap()
        .field_ref
        .as_ref()
        .unwrap();
    assert_eq!(field.field_path, "spec.nodeName");
    let requests = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
}

#[test]
fn daemonset_is_unprivileged_with_the_capabilities_ebpf_needs() {
    let d = load();
    let c = agent(&d.daemonsets[0]);
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(false));
    let caps = sc.capabilities.as_ref().unwrap();
    let add: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    let want: BTreeSet<&str> = ["NET_ADMIN", "SYS_ADMIN", "BPF", "PERFMON", "SYS_RESOURCE"].into();
    assert_eq!(add, want);
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
}

#[test]
fn daemonset_mounts_bpffs_and_cgroup2_from_the_host() {
    let d = load();
    let ds = &d.daemonsets[0];
    let pod = ds.spec.template.spec.as_ref().unwrap();
    let volumes = pod.volumes.as_ref().unwrap();
    let host_path = |name: &str| {
        volumes
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| h.path.clone())
    };
    let mounts = agent(ds).volume_mounts.as_ref().unwrap();
    let bpf = mounts
        .iter()
        .find(|m| host_path(&m.name).as_deref() == Some("/sys/fs/bpf"))
        .expect("bpffs mount");
    assert_eq!(
        bpf.mount_path, "/sys/fs/bpf",
        "pins land where the default --pin-path points"
    );
    // Bidirectional is refused by the API server for unprivileged containers.
    assert_eq!(bpf.mount_propagation.as_deref(), Some("HostToContainer"));
    assert!(
        mounts
            .iter()
            .any(|m| host_path(&m.name).as_deref() == Some("/sys/fs/cgroup")),
        "cgroup2 root mount"
    );
}

#[test]
fn probes_use_the_metrics_port() {
    let d = load();
    let c = agent(&d.daemonsets[0]);
    let get = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let h = p.as_ref().unwrap().http_get.as_ref().unwrap();
        (h.path.clone().unwrap(), h.port.clone())
    };
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert_eq!(
        get(&c.liveness_probe),
        ("/healthz".to_string(), IntOrString::Int(9477))
    );
    assert_eq!(
        get(&c.readiness_probe),
        ("/readyz".to_string(), IntOrString::Int(9477))
    );
    let args = c.args.as_ref().unwrap();
    let addr = args
        .iter()
        .position(|a| a == "--metrics-addr")
        .map(|i| args[i + 1].as_str());
    assert!(
        addr.is_none_or(|a| a.ends_with(":9477")),
        "metrics served on the probed port: {addr:?}"
    );
}

#[test]
fn rbac_is_read_only_and_covers_what_is_watched() {
    let d = load();
    let role = &d.cluster_roles[0];
    let mut covered = BTreeSet::new();
    for rule in role.rules.as_ref().unwrap() {
        let verbs: Vec<&str> = rule.verbs.iter().map(String::as_str).collect();
        assert_eq!(
            verbs,
            ["get", "list", "watch"],
            "verbs are exactly get/list/watch"
        );
        for g in rule.api_groups.iter().flatten() {
            for r in rule.resources.iter().flatten() {
                assert_ne!(r, "*");
                covered.insert((g.clone(), r.clone()));
            }
        }
    }
    let want: BTreeSet<(String, String)> = [
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
    ]
    .into_iter()
    .map(|(g, r)| (g.to_string(), r.to_string()))
    .collect();
    assert_eq!(covered, want);

    let b = &d.bindings[0];
    assert_eq!(b.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&b.role_ref.name), role.metadata.name.as_ref());
    let sa = &d.service_accounts[0];
    let subjects = b.subjects.as_ref().unwrap();
    assert!(subjects.iter().any(|s| s.kind == "ServiceAccount"
        && Some(&s.name) == sa.metadata.name.as_ref()
        && s.namespace == sa.metadata.namespace));
}

/// The DaemonSet names the API server by `--api-server`, not by the `kubernetes` Service's
/// ClusterIP (which works only once xlb runs), and ships a placeholder the agent refuses, so an
/// unedited manifest fails loudly instead of retrying a name that never resolves.
#[test]
fn daemonset_names_the_api_server_with_a_placeholder_to_fill_in() {
    let d = load();
    let c = agent(&d.daemonsets[0]);
    let args = c.args.as_ref().unwrap();
    let i = args
        .iter()
        .position(|a| a == "--api-server")
        .expect("--api-server");
    let url = &args[i + 1];
    let err = lb_kube::parse_api_server(url).expect_err("the placeholder must be refused");
    assert!(err.to_string().contains("placeholder"), "{url}: {err}");
    let filled = url.replace(lb_kube::PLACEHOLDER_HOST, "10.0.0.10");
    assert!(lb_kube::parse_api_server(&filled).is_ok(), "{filled}");
}

/// kube-proxy's health port is served and declared (load balancers probe it).
#[test]
fn daemonset_serves_kube_proxys_health_port() {
    let d = load();
    let c = agent(&d.daemonsets[0]);
    let args = c.args.as_ref().unwrap();
    let addr = args
        .iter()
        .position(|a| a == "--healthz-addr")
        .map(|i| args[i + 1].as_str());
    assert!(
        addr.is_none_or(|a| a.ends_with(":10256")),
        "kube-proxy's port: {addr:?}"
    );
    let ports = c.ports.as_ref().unwrap();
    assert!(ports.iter().any(|p| p.container_port == 10256), "{ports:?}");
}
