//! An in-process fake kube-apiserver for tests: Services, EndpointSlices and Nodes served over
//! real HTTP/1 with the list/watch protocol kube-rs speaks (resourceVersions, paged lists,
//! watch streams with bookmarks, 410 Gone after compaction).
//!
//! Tests drive it through [`FakeApi`]: change objects (watchers see ADDED / MODIFIED / DELETED),
//! [`FakeApi::compact`] to expire old resourceVersions, [`FakeApi::drop_watches`] to end every
//! open watch, [`FakeApi::set_delay`] to make responses slow, [`FakeApi::stop`] /
//! [`FakeApi::start`] to restart the server on the same port, and
//! [`FakeApi::write_kubeconfig`] to point a client at it.
//!
//! It is read-only over HTTP (GET only) and understands only `metadata.name` /
//! `metadata.namespace` field selectors; other requests get the Status errors the real server
//! would send (404, 400, 405).

mod http;
mod server;
pub mod store;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinHandle;

pub use store::{Kind, Store};

/// Why an object could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("object does not serialize: {0}")]
    Json(#[source] serde_json::Error),
    /// The object has no supported `kind`, no `metadata.name`, or is not a JSON object.
    #[error("invalid object: {0}")]
    Invalid(String),
}

/// State shared by the handle and every connection.
pub(crate) struct Shared {
    pub(crate) store: Mutex<Store>,
    /// Bumped on every store change; watch streams wait on it.
    pub(crate) changed: tokio::sync::watch::Sender<u64>,
    /// Bumped by `drop_watches`; every open watch stream ends.
    pub(crate) dropped: tokio::sync::watch::Sender<u64>,
    pub(crate) delay: Mutex<Duration>,
    pub(crate) bookmark_every: Mutex<Duration>,
    pub(crate) requests: Mutex<Vec<String>>,
}

/// A running (or stopped) fake apiserver. Dropping it stops the server.
pub struct FakeApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl FakeApi {
    /// Serve on `listener` (bound by the caller, e.g. inside a network namespace). Must be called
    /// from within a tokio runtime.
    pub fn new(listener: std::net::TcpListener) -> std::io::Result<FakeApi> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changed: tokio::sync::watch::Sender::new(0),
            dropped: tokio::sync::watch::Sender::new(0),
            delay: Mutex::new(Duration::ZERO),
            bookmark_every: Mutex::new(Duration::from_secs(5)),
            requests: Mutex::new(Vec::new()),
        });
        let task = tokio::spawn(server::serve(listener, shared.clone()));
        Ok(FakeApi {
            shared,
            addr,
            server: Mutex::new(Some(task)),
        })
    }

    /// Serve on 127.0.0.1 at a free port.
    pub fn bind_local() -> std::io::Result<FakeApi> {
        FakeApi::new(std::net::TcpListener::bind("127.0.0.1:0")?)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, the server URL for a kubeconfig.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Create or replace an object given as any serializable value (a k8s-openapi struct, or a
    /// `serde_json::Value` for objects no typed struct can express). Returns its resourceVersion.
    pub fn upsert<T: Serialize>(&self, obj: &T) -> Result<u64, Error> {
        let v = serde_json::to_value(obj).map_err(Error::Json)?;
        let rv = self
            .shared
            .store
            .lock()
            .unwrap()
            .upsert(v)
            .map_err(Error::Invalid)?;
        self.shared.changed.send_replace(rv);
        Ok(rv)
    }

    /// Delete an object (namespace ignored for Nodes). Returns the resourceVersion of the
    /// deletion, or `None` if there was no such object.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Option<u64> {
        let rv = self
            .shared
            .store
            .lock()
            .unwrap()
            .delete(kind, namespace, name)?;
        self.shared.changed.send_replace(rv);
        Some(rv)
    }

    /// Expire every resourceVersion handed out so far (see [`Store::compact`]). Open watches that
    /// are up to date keep going; a client that reconnects from an older version gets 410 Gone.
    pub fn compact(&self) {
        self.shared.store.lock().unwrap().compact();
    }

    /// End every open watch stream (cleanly, as on a server-side watch timeout).
    pub fn drop_watches(&self) {
        self.shared.dropped.send_modify(|g| *g += 1);
    }

    /// Delay every response (list, get and the start of a watch) by `d`.
    pub fn set_delay(&self, d: Duration) {
        *self.shared.delay.lock().unwrap() = d;
    }

    /// How often watches that asked for bookmarks get one (default 5 s).
    pub fn set_bookmark_interval(&self, d: Duration) {
        *self.shared.bookmark_every.lock().unwrap() = d;
    }

    /// The current (last handed out) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().unwrap().resource_version()
    }

    /// Every request served so far, as "GET /path?query".
    pub fn requests(&self) -> Vec<String> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Stop serving: close the listening socket and every connection (open watches break
    /// mid-stream). The store is kept, so a [`FakeApi::start`] continues where this left off.
    pub async fn stop(&self) {
        let task = self.server.lock().unwrap().take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    pub fn is_running(&self) -> bool {
        self.server.lock().unwrap().is_some()
    }

    /// Serve again on the same address (bound in the calling thread's network namespace).
    pub fn start(&self) -> std::io::Result<()> {
        let mut server = self.server.lock().unwrap();
        if server.is_none() {
            let listener = server::rebind(self.addr)?;
            *server = Some(tokio::spawn(server::serve(listener, self.shared.clone())));
        }
        Ok(())
    }

    /// Write a kubeconfig whose current context points at this server (plain HTTP, no auth).
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        let text = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fake\n  cluster:\n    server: {url}\n\
             users:\n\
             - name: fake\n  user: {{}}\n\
             contexts:\n\
             - name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\n",
            url = self.url()
        );
        std::fs::write(path, text)
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(task) = self.server.get_mut().unwrap().take() {
            task.abort();
        }
    }
}
