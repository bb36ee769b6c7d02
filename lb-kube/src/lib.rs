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
                let (events, problems) = sources.on_update(update);
                let problems = problems.into_iter().map(Event::Problem);
                problems
                    .chain(events.into_iter().map(Event::Cluster))
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
