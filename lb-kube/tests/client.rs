//! Client construction: kubeconfig errors, and https servers (a rustls crypto provider is
//! compiled in; without one kube-rs panics on the first https client).

#[tokio::test]
async fn https_kubeconfig_builds_a_client() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:6443\n    \
         insecure-skip-tls-verify: true\nusers:\n- name: u\n  user:\n    token: abc\ncontexts:\n- name: x\n  context:\n    \
         cluster: c\n    user: u\ncurrent-context: x\n",
    )
    .unwrap();
    let client = lb_kube::client_from_kubeconfig(Some(&path)).await;
    assert!(client.is_ok(), "{:?}", client.err());
}

#[tokio::test]
async fn unreadable_kubeconfig_is_an_error_naming_the_file() {
    let Err(err) =
        lb_kube::client_from_kubeconfig(Some(std::path::Path::new("/nonexistent/kubeconfig")))
            .await
    else {
        panic!("a missing kubeconfig must fail");
    };
    assert!(matches!(err, lb_kube::Error::Kubeconfig { .. }));
    assert!(err.to_string().contains("/nonexistent/kubeconfig"), "{err}");
}

#[tokio::test]
async fn empty_node_name_is_rejected() {
    let api = lb_fakeapi::FakeApi::bind_local().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    api.write_kubeconfig(&path).unwrap();
    let client = lb_kube::client_from_kubeconfig(Some(&path)).await.unwrap();
    let (tx, _rx) = tokio::sync::mpsc::channel::<lb_kube::Event>(1);
    let r = lb_kube::run(client, String::new(), tx).await;
    assert!(matches!(r, Err(lb_kube::Error::NoNodeName)));
}

/// The environment of a pod, as `client_config_with` reads it.
fn env_of(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
    move |k| {
        vars.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.to_string())
    }
}

/// A service-account directory as the kubelet mounts it (the CA only has to be PEM here; TLS
/// is not reached).
fn service_account_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "sa-token\n").unwrap();
    std::fs::write(dir.path().join("namespace"), "kube-system\n").unwrap();
    std::fs::write(
        dir.path().join("ca.crt"),
        "-----BEGIN CERTIFICATE-----\nAAECAw==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    dir
}

fn opts(kubeconfig: Option<&std::path::Path>, api_server: Option<&str>) -> lb_kube::ClientOptions {
    lb_kube::ClientOptions {
        kubeconfig: kubeconfig.map(|p| p.to_path_buf()),
        api_server: api_server.map(String::from),
    }
}

/// On a node without kube-proxy the pod's KUBERNETES_SERVICE_HOST (the `kubernetes` Service's
/// ClusterIP) is unreachable until xlb runs: `--api-server` must win over it.
#[tokio::test]
async fn api_server_flag_wins_over_the_pods_environment() {
    let sa = service_account_dir();
    let env = env_of(&[
        ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
        ("KUBERNETES_SERVICE_PORT", "443"),
    ]);
    let r = lb_kube::client_config_with(
        &opts(None, Some("https://192.0.2.10:6443")),
        &env,
        sa.path(),
    )
    .await
    .unwrap();
    assert_eq!(r.config.cluster_url.to_string(), "https://192.0.2.10:6443/");
    assert_eq!(r.origin, lb_kube::Origin::Flag);
    // The mounted service account authenticates it, as in-cluster.
    assert_eq!(r.credentials, "service account");
    let token = sa.path().join("token").display().to_string();
    assert_eq!(
        r.config.auth_info.token_file.as_deref(),
        Some(token.as_str())
    );
    assert_eq!(r.config.root_cert.as_ref().map(Vec::len), Some(1));
    assert_eq!(r.config.default_namespace, "kube-system");
}

/// Without the flag, KUBERNETES_SERVICE_HOST/PORT set in the manifest are the address.
#[tokio::test]
async fn the_environment_names_the_api_server_without_the_flag() {
    let sa = service_account_dir();
    let env = env_of(&[
        ("KUBERNETES_SERVICE_HOST", "192.0.2.10"),
        ("KUBERNETES_SERVICE_PORT", "6443"),
    ]);
    let r = lb_kube::client_config_with(&opts(None, None), &env, sa.path())
        .await
        .unwrap();
    assert_eq!(r.config.cluster_url.to_string(), "https://192.0.2.10:6443/");
    assert_eq!(r.origin, lb_kube::Origin::Environment);
    let env = env_of(&[
        ("KUBERNETES_SERVICE_HOST", "fd00::1"),
        ("KUBERNETES_SERVICE_PORT", "6443"),
    ]);
    let r = lb_kube::client_config_with(&opts(None, None), &env, sa.path())
        .await
        .unwrap();
    assert_eq!(r.config.cluster_url.to_string(), "https://[fd00::1]:6443/");
    // Half of the pair is a mistake worth saying (the kubelet's PORT would be the Service's).
    let env = env_of(&[("KUBERNETES_SERVICE_HOST", "192.0.2.10")]);
    let err = lb_kube::client_config_with(&opts(None, None), &env, sa.path())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("KUBERNETES_SERVICE_PORT is not"),
        "{err}"
    );
}

/// No service account (a test's plain-HTTP server): the flag's address, unauthenticated.
#[tokio::test]
async fn without_a_service_account_the_client_is_unauthenticated() {
    let empty = tempfile::tempdir().unwrap();
    let r = lb_kube::client_config_with(
        &opts(None, Some("http://127.0.0.1:8080")),
        &|_| None,
        empty.path(),
    )
    .await
    .unwrap();
    assert_eq!(r.config.cluster_url.to_string(), "http://127.0.0.1:8080/");
    assert_eq!(r.credentials, "none");
    assert!(r.config.auth_info.token_file.is_none());
}

/// `--kubeconfig` keeps its credentials; `--api-server` replaces only its server.
#[tokio::test]
async fn api_server_flag_overrides_the_kubeconfigs_server() {
    let api = lb_fakeapi::FakeApi::bind_local().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    api.write_kubeconfig(&path).unwrap();
    let r = lb_kube::client_config_with(&opts(Some(&path), None), &|_| None, dir.path())
        .await
        .unwrap();
    assert_eq!(r.config.cluster_url.to_string(), format!("{}/", api.url()));
    assert_eq!(r.origin, lb_kube::Origin::Kubeconfig);
    let r = lb_kube::client_config_with(
        &opts(Some(&path), Some("https://192.0.2.10:6443")),
        &|_| None,
        dir.path(),
    )
    .await
    .unwrap();
    assert_eq!(r.config.cluster_url.to_string(), "https://192.0.2.10:6443/");
    assert_eq!(r.origin, lb_kube::Origin::Flag);
}

#[test]
fn api_server_must_be_a_url_and_not_the_placeholder() {
    for bad in ["10.0.0.10:6443", "ftp://10.0.0.10", "https://", "not a url"] {
        let err = lb_kube::parse_api_server(bad).expect_err(bad);
        assert!(err.to_string().contains("--api-server"), "{bad}: {err}");
    }
    let placeholder = format!("https://{}:6443", lb_kube::PLACEHOLDER_HOST);
    let err = lb_kube::parse_api_server(&placeholder).unwrap_err();
    assert!(err.to_string().contains("placeholder"), "{err}");
    assert!(lb_kube::parse_api_server("https://10.0.0.10:6443").is_ok());
    assert!(lb_kube::parse_api_server("https://api.example.com").is_ok());
}

/// kube-proxy's node eligibility: a Node being deleted, or tainted by the cluster autoscaler
/// for deletion, makes `/healthz` answer 503 so load balancers drain it first.
#[test]
fn a_node_being_deleted_or_drained_is_not_eligible() {
    use k8s_openapi::api::core::v1::{Node, NodeSpec, Taint};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    let mut node = Node::default();
    assert!(lb_kube::node_eligible(&node));
    node.spec = Some(NodeSpec {
        taints: Some(vec![Taint {
            key: "node.kubernetes.io/unschedulable".into(),
            effect: "NoSchedule".into(),
            ..Taint::default()
        }]),
        ..NodeSpec::default()
    });
    assert!(lb_kube::node_eligible(&node), "other taints do not matter");
    node.spec
        .as_mut()
        .unwrap()
        .taints
        .as_mut()
        .unwrap()
        .push(Taint {
            key: lb_kube::TO_BE_DELETED_TAINT.into(),
            effect: "NoSchedule".into(),
            ..Taint::default()
        });
    assert!(!lb_kube::node_eligible(&node));
    let mut deleting = Node::default();
    deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    assert!(!lb_kube::node_eligible(&deleting));
}
