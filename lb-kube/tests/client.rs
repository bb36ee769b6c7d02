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
