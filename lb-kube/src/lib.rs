//! The Kubernetes source of the xlb agent: kube-rs watchers for Services and EndpointSlices (all
//! namespaces) and this node's Node, turned into [`lb_model::SourceEvent`]s.
//!
//! ```text
//! watcher(Service) ─┐
//! watcher(Slice)  ──┼─ select ─ watch_events::Sources ─ mpsc::Sender<E: From<Event>> ─ agent
//! watcher(Node)   ──┘  (each with kube-runtime's default backoff)
//! ```
//!
//! The source is a plain producer: everything it has to say, cluster changes, skipped objects and
//! failed API calls alike, is an [`Event`] on its one channel, in the order it happened.
//!
//! - Each kind's initial list (and every relist: after a 410 Gone, kube-runtime starts over)
//!   becomes one `Resync` of that kind; watch events become upserts and deletes; `Synced` follows
//!   once every kind has been listed.
//! - API errors (server down, 410, 5xx, RBAC) are logged, sent as [`Event::ApiError`] and retried
//!   with kube-runtime's `default_backoff` (0.8 s doubling to 30 s, jittered); [`run`] never gives
//!   up on them. While the API is away no cluster event is sent, so the datapath stays as it is.
//! - kube-runtime resumes a broken watch from the last resourceVersion it saw (no relist, no lost
//!   update); only a 410 Gone makes it relist.
//! - Objects that do not decode are sent as [`Event::Problem`] and treated as absent (see
//!   [`lenient`] for why kube-rs alone would let one bad object block a whole kind).
//! - The API server address is chosen by [`client_config`]: `--api-server` (the API server's own
//!   address, so a node without kube-proxy never depends on the `kubernetes` Service's ClusterIP),
//!   else KUBERNETES_SERVICE_HOST/PORT, with the pod's service account either way.

pub mod lenient;
mod watch_events;

use std::path::{Path, PathBuf};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::config::{InferConfigError, KubeConfigOptions, Kubeconfig, KubeconfigError};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use lb_model::{Problem, SourceEvent};
use tokio::sync::mpsc;

pub use lenient::Lenient;
pub use watch_events::node_info;

use watch_events::{Sources, Update};

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: KubeconfigError,
    },
    #[error("no usable Kubernetes configuration (in-cluster service account or KUBECONFIG): {0}")]
    Infer(#[from] InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
    #[error("the node name is empty (pass --node-name or set NODE_NAME)")]
    NoNodeName,
    #[error("invalid --api-server {url:?}: {why}")]
    ApiServer { url: String, why: String },
    #[error("the in-cluster API server address: {0}")]
    Environment(String),
}

/// What the source sends.
#[derive(Debug)]
// `SourceEvent` is this large already; boxing it would cost an allocation per event for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Event {
    /// A change of the cluster.
    Cluster(SourceEvent),
    /// An object was skipped (it did not decode) and is treated as absent. Not logged here: the
    /// receiver reports it, as it does the problems of other sources.
    Problem(Problem),
    /// A list or watch call of `kind` failed; the watcher retries after its backoff. Already
    /// logged (with the detail a 410 Gone relist deserves).
    ApiError { kind: &'static str, error: String },
    /// Whether this node may take load-balancer traffic, after each change of its Node object
    /// (see [`node_eligible`]): kube-proxy's health port answers 503 on `/healthz` otherwise.
    NodeEligible(bool),
}

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// kube-proxy's node eligibility: not being deleted and not tainted
/// [`TO_BE_DELETED_TAINT`], so load balancers drain the node before it goes.
pub fn node_eligible(node: &Node) -> bool {
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    node.metadata.deletion_timestamp.is_none() && !tainted
}

/// The eligibility an update of this node's Node object says (None: not about the Node, or an
/// object that did not decode). A deleted Node is not eligible.
fn node_eligibility(update: &Update) -> Option<bool> {
    match update {
        Update::Node(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => {
            n.parsed.as_ref().ok().map(node_eligible)
        }
        Update::Node(watcher::Event::Delete(_)) => Some(false),
        _ => None,
    }
}

/// Where the agent's service-account credentials are mounted in a pod (token, ca.crt,
/// namespace), as client-go and kube-rs read them.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// How to reach the API server (`--kubeconfig`, `--api-server`, the environment).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientOptions {
    /// `--kubeconfig`: this file's current context.
    pub kubeconfig: Option<PathBuf>,
    /// `--api-server URL`: this address, whatever the kubeconfig or `KUBERNETES_SERVICE_HOST`
    /// say. On a node without kube-proxy the in-cluster address (the `kubernetes` Service's
    /// ClusterIP) only works once xlb itself runs, so the agent must be told the API server's
    /// own address (Cilium's k8sServiceHost / k8sServicePort).
    pub api_server: Option<String>,
}

/// Where the API server address in use came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `--api-server`.
    Flag,
    /// `KUBERNETES_SERVICE_HOST` / `KUBERNETES_SERVICE_PORT`.
    Environment,
    /// The `--kubeconfig` file.
    Kubeconfig,
    /// Inferred as kubectl does (`$KUBECONFIG`, `~/.kube/config`).
    Inferred,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Origin::Flag => "--api-server",
            Origin::Environment => "KUBERNETES_SERVICE_HOST/PORT",
            Origin::Kubeconfig => "--kubeconfig",
            Origin::Inferred => "KUBECONFIG or ~/.kube/config",
        })
    }
}

/// The client configuration [`client_config`] chose, and why.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub config: kube::Config,
    pub origin: Origin,
    /// Which credentials it carries: "service account", "kubeconfig" or "none".
    pub credentials: &'static str,
}

/// The host of deploy/daemonset.yaml's `--api-server` placeholder: an agent started with it
/// refuses to run and says what to fill in, rather than retrying a name that never resolves.
pub const PLACEHOLDER_HOST: &str = "replace-with-the-api-server-address";

/// `--api-server`'s value: an `http://` or `https://` URL with a host (e.g.
/// `https://10.0.0.10:6443`). A bare `HOST:PORT` is refused: the scheme says whether TLS is used.
pub fn parse_api_server(s: &str) -> Result<http::Uri, Error> {
    let bad = |why: &str| Error::ApiServer {
        url: s.to_string(),
        why: why.to_string(),
    };
    let uri: http::Uri = s
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            return Err(bad(
                "expected a URL with http:// or https://, e.g. https://10.0.0.10:6443",
            ))
        }
    }
    match uri.host() {
        None | Some("") => return Err(bad("no host")),
        Some(h) if h.eq_ignore_ascii_case(PLACEHOLDER_HOST) => return Err(bad(
            "this is deploy/daemonset.yaml's placeholder: put the API server's own address there \
                 (not the `kubernetes` Service's ClusterIP; see docs/replacing-kube-proxy.md)",
        )),
        Some(_) => {}
    }
    Ok(uri)
}

/// The API server address of the in-cluster environment: `https://HOST:PORT` from
/// `KUBERNETES_SERVICE_HOST` / `KUBERNETES_SERVICE_PORT` (both required, as client-go requires;
/// None when neither is set). `env` reads a variable (the process environment in [`client_config`]).
pub fn env_api_server(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<http::Uri>, Error> {
    let get = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    let (host, port) = match (
        get("KUBERNETES_SERVICE_HOST"),
        get("KUBERNETES_SERVICE_PORT"),
    ) {
        (None, None) => return Ok(None),
        (Some(h), Some(p)) => (h.trim().to_string(), p.trim().to_string()),
        (h, _) => {
            let (set, unset) = if h.is_some() {
                ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")
            } else {
                ("KUBERNETES_SERVICE_PORT", "KUBERNETES_SERVICE_HOST")
            };
            return Err(Error::Environment(format!(
                "{set} is set but {unset} is not: set both"
            )));
        }
    };
    let port: u16 = port
        .parse()
        .map_err(|e| Error::Environment(format!("KUBERNETES_SERVICE_PORT={port:?}: {e}")))?;
    // An IPv6 literal needs brackets in a URL.
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host
    };
    let url = format!("https://{host}:{port}");
    parse_api_server(&url)
        .map(Some)
        .map_err(|e| Error::Environment(format!("KUBERNETES_SERVICE_HOST/PORT give {url}: {e}")))
}

/// The client configuration of `opts`, in this order:
///
/// 1. `--kubeconfig`: that file (its server replaced by `--api-server` when given);
/// 2. `--api-server URL`;
/// 3. `KUBERNETES_SERVICE_HOST` / `KUBERNETES_SERVICE_PORT` (a pod's environment; a DaemonSet
///    that replaces kube-proxy sets them to the API server's own address);
/// 4. else inferred as kubectl does (`$KUBECONFIG`, `~/.kube/config`).
///
/// In cases 2 and 3 the service account mounted in the pod ([`SERVICE_ACCOUNT_DIR`]) supplies
/// the token (re-read as the kubelet rotates it), the CA and the namespace; without a token the
/// client is unauthenticated (a test's plain-HTTP server, or a local proxy).
pub async fn client_config(opts: &ClientOptions) -> Result<Resolved, Error> {
    let env = |k: &str| std::env::var(k).ok();
    client_config_with(opts, &env, Path::new(SERVICE_ACCOUNT_DIR)).await
}

/// [`client_config`] with the environment and the service-account directory given (tests).
pub async fn client_config_with(
    opts: &ClientOptions,
    env: &dyn Fn(&str) -> Option<String>,
    service_account: &Path,
) -> Result<Resolved, Error> {
    let flag = opts
        .api_server
        .as_deref()
        .map(parse_api_server)
        .transpose()?;
    if let Some(path) = &opts.kubeconfig {
        let err = |source| Error::Kubeconfig {
            path: path.to_path_buf(),
            source,
        };
        let kc = Kubeconfig::read_from(path).map_err(err)?;
        let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(err)?;
        let origin = match flag {
            Some(url) => {
                config.cluster_url = url;
                Origin::Flag
            }
            None => Origin::Kubeconfig,
        };
        return Ok(Resolved {
            config,
            origin,
            credentials: "kubeconfig",
        });
    }
    let url = match flag {
        Some(url) => Some((url, Origin::Flag)),
        None => env_api_server(env)?.map(|u| (u, Origin::Environment)),
    };
    let Some((url, origin)) = url else {
        let config = kube::Config::infer().await?;
        return Ok(Resolved {
            config,
            origin: Origin::Inferred,
            credentials: "kubeconfig",
        });
    };
    let token = service_account.join("token");
    if !token.is_file() {
        return Ok(Resolved {
            config: kube::Config::new(url),
            origin,
            credentials: "none",
        });
    }
    // The service account's files as a kubeconfig: kube-rs then loads the CA and keeps
    // re-reading the token file (bound tokens are rotated), exactly as for its in-cluster config.
    let ca = service_account.join("ca.crt");
    let namespace = std::fs::read_to_string(service_account.join("namespace"))
        .ok()
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty());
    let mut cluster = serde_json::json!({ "server": url.to_string() });
    if ca.is_file() {
        cluster["certificate-authority"] = ca.display().to_string().into();
    }
    let kc: Kubeconfig = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "xlb", "cluster": cluster }],
        "users": [{ "name": "xlb", "user": { "tokenFile": token.display().to_string() } }],
        "contexts": [{ "name": "xlb", "context": { "cluster": "xlb", "user": "xlb", "namespace": namespace } }],
        "current-context": "xlb",
    }))
    .map_err(|e| Error::Environment(format!("service account kubeconfig: {e}")))?;
    let err = |source| Error::Kubeconfig {
        path: service_account.to_path_buf(),
        source,
    };
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(err)?;
    Ok(Resolved {
        config,
        origin,
        credentials: "service account",
    })
}

/// A client from the kubeconfig at `path`, or (None) inferred as kubectl does: the in-cluster
/// service account when running in a pod, else `$KUBECONFIG` / `~/.kube/config`.
pub async fn client_from_kubeconfig(path: Option<&Path>) -> Result<Client, Error> {
    let config = match path {
        Some(path) => {
            let err = |source| Error::Kubeconfig {
                path: path.to_path_buf(),
                source,
            };
            let kc = Kubeconfig::read_from(path).map_err(err)?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(err)?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// Watch the API and send what happens on `tx` until `tx` is closed (then `Ok`). API errors are
/// retried forever; the only error is a configuration one. `E` is the receiver's event type (any
/// type an [`Event`] converts into; `Event` itself will do).
pub async fn run<E>(client: Client, node_name: String, tx: mpsc::Sender<E>) -> Result<(), Error>
where
    E: From<Event> + Send,
{
    if node_name.is_empty() {
        return Err(Error::NoNodeName);
    }
    let all = watcher::Config::default();
    let this_node = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    let services = watcher(Api::<Lenient<Service>>::all(client.clone()), all.clone())
        .default_backoff()
        .map(|r| r.map(Update::Service).map_err(|e| ("Service", e)))
        .boxed();
    let slices = watcher(Api::<Lenient<EndpointSlice>>::all(client.clone()), all)
        .default_backoff()
        .map(|r| r.map(Update::Slice).map_err(|e| ("EndpointSlice", e)))
        .boxed();
    let nodes = watcher(Api::<Lenient<Node>>::all(client), this_node)
        .default_backoff()
        .map(|r| r.map(Update::Node).map_err(|e| ("Node", e)))
        .boxed();
    let mut updates = futures::stream::select_all([services, slices, nodes]);
    let mut sources = Sources::new(node_name);
    tracing::info!("watching Services, EndpointSlices and this Node");

    while let Some(update) = updates.next().await {
        let events = match update {
            Ok(update) => {
                let eligible = node_eligibility(&update);
                let (events, problems) = sources.on_update(update);
                let problems = problems.into_iter().map(Event::Problem);
                problems
                    .chain(events.into_iter().map(Event::Cluster))
                    .chain(eligible.map(Event::NodeEligible))
                    .collect()
            }
            Err((kind, e)) => {
                log_watch_error(kind, &e);
                vec![Event::ApiError {
                    kind,
                    error: e.to_string(),
                }]
            }
        };
        for ev in events {
            if matches!(ev, Event::Cluster(SourceEvent::Synced)) {
                tracing::info!("Services, EndpointSlices and Node listed");
            }
            if tx.send(ev.into()).await.is_err() {
                return Ok(());
            }
        }
    }
    // The watchers retry forever, so the merged stream does not end.
    Ok(())
}

fn log_watch_error(kind: &'static str, e: &watcher::Error) {
    match e {
        watcher::Error::WatchError(s) if s.code == 410 => {
            tracing::info!(kind, message = %s.message, "resourceVersion expired; relisting");
        }
        e => tracing::warn!(kind, error = %e, "Kubernetes API call failed; retrying with backoff"),
    }
}
