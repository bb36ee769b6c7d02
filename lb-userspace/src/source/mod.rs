//! Where the cluster comes from: a directory of manifests ([`watch_dir`]) or the Kubernetes API
//! (lb-kube). [`start`] starts the one the CLI asked for and hands back its channel.
//!
//! A source is a plain producer: it only sends [`AgentEvent`]s. Everything it has to say travels
//! on that one channel, in order: cluster changes, objects it skipped and failed API calls. It
//! holds no handle on the agent or its metrics; the agent logs and counts what arrives.

pub mod watch_dir;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use lb_model::{Problem, SourceEvent};
use tokio::sync::mpsc;

/// How long the source's first full read took, in microseconds (0 until it finished, and for a
/// source without such a read): the `parse_micros` of the agent's `startup phases` line. A
/// process-wide value rather than an event field, so the event contract stays as it is.
static FIRST_READ_MICROS: AtomicU64 = AtomicU64::new(0);

/// See [`FIRST_READ_MICROS`].
pub fn first_read_micros() -> u64 {
    FIRST_READ_MICROS.load(Ordering::Relaxed)
}

/// Record the duration of the source's first full read (see [`first_read_micros`]).
pub(crate) fn set_first_read(took: std::time::Duration) {
    FIRST_READ_MICROS.store(took.as_micros() as u64, Ordering::Relaxed);
}

/// Queued events of the manifests source (a scan is a few events, a burst of file writes more).
const DIR_QUEUE: usize = 1024;
/// Queued events of the Kubernetes source (watch bursts, e.g. a rollout of many slices).
const KUBE_QUEUE: usize = 4096;

/// What a source sends the agent.
#[derive(Debug)]
// `SourceEvent` is this large already; boxing it would cost an allocation per event for nothing.
#[allow(clippy::large_enum_variant)]
pub enum AgentEvent {
    /// A change of the cluster.
    Source(SourceEvent),
    /// An object or file the source skipped (it is treated as absent); the agent logs it and
    /// counts it in `xlb_invalid_objects{kind}`.
    Problem(Problem),
    /// A Kubernetes list or watch call of `kind` failed (logged by the source, which retries with
    /// backoff); the agent counts it in `xlb_api_errors{kind}`.
    ApiError { kind: &'static str },
    /// This node's Node object says whether it may take load-balancer traffic (not being
    /// deleted or drained by the cluster autoscaler): kube-proxy's `/healthz` reports it.
    NodeEligible(bool),
}

impl From<lb_kube::Event> for AgentEvent {
    fn from(ev: lb_kube::Event) -> Self {
        match ev {
            lb_kube::Event::Cluster(ev) => AgentEvent::Source(ev),
            lb_kube::Event::Problem(p) => AgentEvent::Problem(p),
            lb_kube::Event::ApiError { kind, .. } => AgentEvent::ApiError { kind },
            lb_kube::Event::NodeEligible(e) => AgentEvent::NodeEligible(e),
        }
    }
}

/// The source the CLI asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceConfig {
    /// A directory of Service / EndpointSlice manifests, watched for changes (`--manifests`).
    Manifests(PathBuf),
    /// The Kubernetes API.
    Kubernetes(KubeSource),
}

/// The Kubernetes source's flags.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeSource {
    /// Where the API server is (`--kubeconfig`, `--api-server`; else KUBERNETES_SERVICE_HOST/PORT
    /// with the pod's service account, else `$KUBECONFIG` as kubectl infers it; see
    /// [`lb_kube::client_config`]).
    pub client: lb_kube::ClientOptions,
    /// Selects this node's Node object and local endpoints; required.
    pub node_name: Option<String>,
    /// `--service-cidr`: an API server address inside it is a Service's ClusterIP, reachable
    /// only through a running Service proxy; the agent warns about it.
    pub service_cidr: Option<(Ipv4Addr, u8)>,
}

impl SourceConfig {
    /// The source of the `xlb agent` flags: `--manifests` if given, else the Kubernetes API.
    pub fn from_flags(manifests: Option<PathBuf>, kube: KubeSource) -> Self {
        match manifests {
            Some(dir) => SourceConfig::Manifests(dir),
            None => SourceConfig::Kubernetes(kube),
        }
    }
}

/// The warning for an API server address inside the Service CIDR (None: no reason to warn).
fn cluster_ip_warning(url: &str, host: &str, cidr: Option<(Ipv4Addr, u8)>) -> Option<String> {
    let (net, len) = cidr?;
    let addr: Ipv4Addr = host.trim_matches(['[', ']']).parse().ok()?;
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    (u32::from(addr) & mask == u32::from(net) & mask).then(|| {
        format!(
            "the API server address {url} is inside --service-cidr {net}/{len}: it is a Service's ClusterIP, \
             which a host-network agent reaches only through a running Service proxy, so on a node without \
             kube-proxy the agent cannot start; pass --api-server with the API server's own address"
        )
    })
}

/// Start the source `cfg` names in a task of its own and return its events. A configuration error
/// (no node name, an unreadable kubeconfig) fails here; an error that stops a running source is
/// logged and closes the channel.
pub async fn start(cfg: SourceConfig) -> anyhow::Result<mpsc::Receiver<AgentEvent>> {
    match cfg {
        SourceConfig::Manifests(dir) => {
            let (tx, rx) = mpsc::channel(DIR_QUEUE);
            tokio::spawn(async move {
                if let Err(e) = watch_dir::run(dir, tx).await {
                    tracing::error!(error = %format!("{e:#}"), "manifests source stopped");
                }
            });
            Ok(rx)
        }
        SourceConfig::Kubernetes(kube) => {
            let node_name = kube
                .node_name
                .filter(|n| !n.is_empty())
                .context("the Kubernetes source needs this node's name: pass --node-name or set NODE_NAME")?;
            let resolved = lb_kube::client_config(&kube.client).await?;
            let url = resolved.config.cluster_url.to_string();
            tracing::info!(
                api_server = %url,
                from = %resolved.origin,
                credentials = resolved.credentials,
                "Kubernetes API server"
            );
            if let Some(w) = cluster_ip_warning(&url, resolved.config.cluster_url.host().unwrap_or(""), kube.service_cidr)
            {
                tracing::warn!("{w}");
            }
            let client = kube::Client::try_from(resolved.config).map_err(lb_kube::Error::from)?;
            let (tx, rx) = mpsc::channel(KUBE_QUEUE);
            tokio::spawn(async move {
                if let Err(e) = lb_kube::run::<AgentEvent>(client, node_name, tx).await {
                    tracing::error!(error = %e, "Kubernetes source stopped");
                }
            });
            Ok(rx)
        }
    }
}

/// A manifest of one Service `a` with ClusterIP 10.96.0.1, for tests.
#[cfg(test)]
pub(crate) const TEST_SERVICE: &str =
    "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\nspec:\n  clusterIP: 10.96.0.1\n  ports:\n  - port: 80\n";

/// A fresh directory under the system's temp dir, for tests.
#[cfg(test)]
pub(crate) fn test_dir(what: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "xlb-{what}-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn next(rx: &mut mpsc::Receiver<AgentEvent>) -> AgentEvent {
        tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("no source event in time")
            .expect("the source stopped")
    }

    /// A Kubernetes source with this kubeconfig and node name.
    fn kube(kubeconfig: Option<PathBuf>, node_name: Option<String>) -> KubeSource {
        KubeSource {
            client: lb_kube::ClientOptions { kubeconfig, api_server: None },
            node_name,
            service_cidr: None,
        }
    }

    #[test]
    fn flags_pick_the_source() {
        let dir = PathBuf::from("/m");
        let kc = Some(PathBuf::from("/kc"));
        let node = Some("n1".to_string());
        let k = kube(kc, node);
        assert_eq!(SourceConfig::from_flags(Some(dir.clone()), k.clone()), SourceConfig::Manifests(dir));
        assert_eq!(SourceConfig::from_flags(None, k.clone()), SourceConfig::Kubernetes(k));
    }

    #[test]
    fn an_api_server_inside_the_service_cidr_is_warned_about() {
        let cidr = Some((Ipv4Addr::new(10, 96, 0, 0), 12));
        let w = cluster_ip_warning("https://10.96.0.1/", "10.96.0.1", cidr).expect("a ClusterIP");
        assert!(w.contains("--api-server") && w.contains("10.96.0.0/12"), "{w}");
        assert_eq!(cluster_ip_warning("https://10.0.0.10:6443/", "10.0.0.10", cidr), None);
        assert_eq!(cluster_ip_warning("https://api.example.com/", "api.example.com", cidr), None);
        assert_eq!(cluster_ip_warning("https://10.96.0.1/", "10.96.0.1", None), None);
    }

    #[tokio::test]
    async fn the_manifests_source_sends_problems_and_events_on_one_channel() {
        let dir = test_dir("source");
        std::fs::write(dir.join("a.yaml"), TEST_SERVICE).unwrap();
        std::fs::write(dir.join("b.yaml"), "kind: Service\napiVersion: v1\nspec: [").unwrap();
        let mut rx = start(SourceConfig::Manifests(dir.clone())).await.unwrap();
        match next(&mut rx).await {
            AgentEvent::Problem(p) => assert!(p.object.ends_with("b.yaml"), "{p:?}"),
            other => panic!("expected the bad file's problem first, got {other:?}"),
        }
        match next(&mut rx).await {
            AgentEvent::Source(SourceEvent::Resync { services: Some(s), slices: Some(_) }) => {
                assert_eq!(s.len(), 1)
            }
            other => panic!("expected the resync, got {other:?}"),
        }
        assert!(matches!(next(&mut rx).await, AgentEvent::Source(SourceEvent::Synced)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_missing_directory_closes_the_channel() {
        let mut rx = start(SourceConfig::Manifests(PathBuf::from("/nonexistent/xlb-manifests"))).await.unwrap();
        let end = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.unwrap();
        assert!(end.is_none(), "{end:?}");
    }

    #[tokio::test]
    async fn the_kubernetes_source_needs_a_node_name() {
        for node_name in [None, Some(String::new())] {
            let err = start(SourceConfig::Kubernetes(kube(Some("/nonexistent".into()), node_name)))
                .await
                .unwrap_err();
            assert!(err.to_string().contains("--node-name"), "{err:#}");
        }
    }

    #[tokio::test]
    async fn the_kubernetes_source_sends_api_errors_on_its_channel() {
        // A kubeconfig naming a port nothing listens on: every list fails, and says so.
        let dir = test_dir("kube-source");
        let kubeconfig = dir.join("kubeconfig");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:{port}\n\
                 users:\n- name: u\n  user: {{}}\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\n\
                 current-context: x\n"
            ),
        )
        .unwrap();
        let cfg = SourceConfig::Kubernetes(kube(Some(kubeconfig), Some("n1".into())));
        let mut rx = start(cfg).await.unwrap();
        match next(&mut rx).await {
            AgentEvent::ApiError { kind } => assert!(["Service", "EndpointSlice", "Node"].contains(&kind)),
            other => panic!("expected an API error, got {other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
