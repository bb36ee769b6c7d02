//! Test harness: a fake apiserver, a real kube::Client pointed at it through a kubeconfig file,
//! and `lb_kube::run` in a task whose events the test reads with bounded waits.

#![allow(dead_code)]

use std::time::Duration;

use lb_fakeapi::FakeApi;
use lb_model::{Problem, SourceEvent};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub const NODE: &str = "node-1";
/// Upper bound for any single expected event (kube-runtime's backoff starts at 0.8 s and doubles).
pub const WAIT: Duration = Duration::from_secs(20);

pub struct Harness {
    pub api: FakeApi,
    rx: mpsc::Receiver<lb_kube::Event>,
    /// The skipped objects the source sent so far (as far as the test has read).
    pub problems: Vec<Problem>,
    /// The failed API calls the source sent so far: (kind, error).
    pub api_errors: Vec<(String, String)>,
    task: JoinHandle<Result<(), lb_kube::Error>>,
    _dir: tempfile::TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_test_writer()
        .try_init();
}

impl Harness {
    /// Start the source against `api` (already populated as the test wants).
    pub async fn start(api: FakeApi) -> Harness {
        init_tracing();
        api.set_bookmark_interval(Duration::from_millis(300));
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).unwrap();
        let client = lb_kube::client_from_kubeconfig(Some(&kubeconfig))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(lb_kube::run(client, NODE.to_string(), tx));
        Harness {
            api,
            rx,
            problems: Vec::new(),
            api_errors: Vec::new(),
            task,
            _dir: dir,
        }
    }

    /// A cluster event, or None for a problem or an API error (recorded).
    fn sort(&mut self, ev: lb_kube::Event) -> Option<SourceEvent> {
        match ev {
            lb_kube::Event::Cluster(ev) => return Some(ev),
            lb_kube::Event::Problem(p) => self.problems.push(p),
            lb_kube::Event::ApiError { kind, error } => self.api_errors.push((kind.into(), error)),
            lb_kube::Event::NodeEligible(_) => {}
        }
        None
    }

    /// The next cluster event (problems and API errors on the way are recorded).
    pub async fn next(&mut self) -> SourceEvent {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .expect("no source event in time")
                .expect("source stopped");
            if let Some(ev) = self.sort(ev) {
                return ev;
            }
        }
    }

    /// The cluster events already queued, without waiting (problems and API errors recorded).
    pub fn drain_now(&mut self) -> Vec<SourceEvent> {
        let mut got = Vec::new();
        while let Ok(ev) = self.rx.try_recv() {
            got.extend(self.sort(ev));
        }
        got
    }

    /// Read events until one matches; return it and the ones before it.
    pub async fn until(
        &mut self,
        what: &str,
        pred: impl Fn(&SourceEvent) -> bool,
    ) -> (SourceEvent, Vec<SourceEvent>) {
        let mut before = Vec::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "timed out waiting for {what}; got {}",
                        describe_all(&before)
                    )
                });
            if pred(&ev) {
                return (ev, before);
            }
            before.push(ev);
        }
    }

    /// Wait for the initial sync; return everything up to and including `Synced`.
    pub async fn synced(&mut self) -> Vec<SourceEvent> {
        let (ev, mut before) = self
            .until("Synced", |e| matches!(e, SourceEvent::Synced))
            .await;
        before.push(ev);
        before
    }

    /// Nothing arrives for `d` (used after checking that something did arrive, so not vacuous).
    pub async fn quiet_for(&mut self, d: Duration) -> Vec<SourceEvent> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + d;
        while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            got.extend(self.sort(ev));
        }
        got
    }
}

pub fn describe(ev: &SourceEvent) -> String {
    fn n(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
        format!(
            "{}/{}",
            m.namespace.as_deref().unwrap_or(""),
            m.name.as_deref().unwrap_or("")
        )
    }
    match ev {
        SourceEvent::ServiceUpsert(s) => format!("svc+ {}", n(&s.metadata)),
        SourceEvent::ServiceDelete { namespace, name } => format!("svc- {namespace}/{name}"),
        SourceEvent::SliceUpsert(s) => format!("slice+ {}", n(&s.metadata)),
        SourceEvent::SliceDelete { namespace, name } => format!("slice- {namespace}/{name}"),
        SourceEvent::Resync { services, slices } => format!(
            "resync svc={:?} slices={:?}",
            services
                .as_ref()
                .map(|v| v.iter().map(|s| n(&s.metadata)).collect::<Vec<_>>()),
            slices
                .as_ref()
                .map(|v| v.iter().map(|s| n(&s.metadata)).collect::<Vec<_>>()),
        ),
        SourceEvent::Node(i) => format!("node {} {:?}", i.name, i.addresses),
        SourceEvent::Synced => "synced".into(),
    }
}

pub fn describe_all(evs: &[SourceEvent]) -> String {
    format!("{:?}", evs.iter().map(describe).collect::<Vec<_>>())
}

/// Names ("ns/name") of a Services resync, sorted.
pub fn resync_services(ev: &SourceEvent) -> Option<Vec<String>> {
    match ev {
        SourceEvent::Resync {
            services: Some(s),
            slices: None,
        } => {
            let mut v: Vec<String> = s
                .iter()
                .map(|s| {
                    format!(
                        "{}/{}",
                        s.metadata.namespace.as_deref().unwrap_or(""),
                        s.metadata.name.as_deref().unwrap_or("")
                    )
                })
                .collect();
            v.sort();
            Some(v)
        }
        _ => None,
    }
}

pub fn resync_slices(ev: &SourceEvent) -> Option<Vec<String>> {
    match ev {
        SourceEvent::Resync {
            services: None,
            slices: Some(s),
        } => {
            let mut v: Vec<String> = s
                .iter()
                .map(|s| {
                    format!(
                        "{}/{}",
                        s.metadata.namespace.as_deref().unwrap_or(""),
                        s.metadata.name.as_deref().unwrap_or("")
                    )
                })
                .collect();
            v.sort();
            Some(v)
        }
        _ => None,
    }
}

pub fn service(ns: &str, name: &str, cluster_ip: &str, port: u16) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                 "ports": [{"name": "http", "protocol": "TCP", "port": port, "targetPort": 9376}]},
    })
}

pub fn slice(ns: &str, name: &str, service: &str, ips: &[&str]) -> Value {
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": NODE}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "protocol": "TCP", "port": 9376}],
    })
}

pub fn node(name: &str, internal_ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name},
        "status": {"addresses": [{"type": "InternalIP", "address": internal_ip}, {"type": "Hostname", "address": name}]},
    })
}
