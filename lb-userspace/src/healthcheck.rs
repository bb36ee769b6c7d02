//! healthCheckNodePort servers: for every LoadBalancer Service with externalTrafficPolicy Local
//! ([`lb_model::health::health_checks`]), an HTTP server on the host's `0.0.0.0:PORT` that tells a
//! cloud load balancer whether this node has endpoints of the Service, as kube-proxy does: any
//! path, any method, `Content-Type: application/json`, `X-Content-Type-Options: nosniff`, body
//! `{"service":{"namespace":NS,"name":NAME},"localEndpoints":N,"serviceProxyHealthy":true}`,
//! status 200 when N > 0, else 503 ([`lb_model::health::body`]).
//!
//! The agent calls [`HealthServers::update`] after every change of the cluster and on its tick:
//! new ports get a listener, removed ports lose theirs, and the others only get the new endpoint
//! count (the answer is built from it per request, no restart). A port that cannot be bound (in
//! use by another process, or by our own listener of a Service deleted a moment ago that is still
//! closing) is reported to the caller once (it logs and counts it) and retried on every update
//! until it binds; it is never fatal.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use lb_model::health::HealthCheck;
use tokio::sync::oneshot;

/// What one listener answers with; shared with its request handlers.
type Shared = Arc<RwLock<HealthCheck>>;

struct Server {
    state: Shared,
    /// Dropping (or sending) stops accepting and closes the listener; open connections finish
    /// their request and close (hyper's graceful shutdown).
    stop: Option<oneshot::Sender<()>>,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        // A kept-alive connection still open answers "no endpoints here" from now on.
        if let Ok(mut s) = self.state.write() {
            s.local_endpoints = 0;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A port that could not be bound: (port, error), reported once per failure streak.
pub type BindFailure = (u16, io::Error);

/// The healthCheckNodePort listeners, by port.
pub struct HealthServers {
    bind: IpAddr,
    servers: BTreeMap<u16, Server>,
    /// Wanted ports that failed to bind, with the error last reported (reported again only when
    /// it changes).
    failing: BTreeMap<u16, String>,
}

impl HealthServers {
    /// Listeners on `bind` (the agent: 0.0.0.0, the host's every IPv4 address).
    pub fn new(bind: IpAddr) -> Self {
        HealthServers { bind, servers: BTreeMap::new(), failing: BTreeMap::new() }
    }

    /// Ports with a listener, and where each listens.
    pub fn listening(&self) -> impl Iterator<Item = (u16, SocketAddr)> + '_ {
        self.servers.iter().map(|(p, s)| (*p, s.addr))
    }

    /// Ports wanted but not bound (yet).
    pub fn failing(&self) -> impl Iterator<Item = u16> + '_ {
        self.failing.keys().copied()
    }

    /// Make the listeners match `want` (port -> what to answer). Needs a Tokio runtime (the
    /// listeners are tasks on it). Returns the bind failures that are new since the last call.
    pub fn update(&mut self, want: &BTreeMap<u16, HealthCheck>) -> Vec<BindFailure> {
        self.servers.retain(|port, _| want.contains_key(port));
        self.failing.retain(|port, _| want.contains_key(port));
        let mut new_failures = Vec::new();
        for (&port, check) in want {
            if let Some(s) = self.servers.get(&port) {
                *s.state.write().unwrap_or_else(|e| e.into_inner()) = check.clone();
                continue;
            }
            match self.start(port, check.clone()) {
                Ok(server) => {
                    if self.failing.remove(&port).is_some() {
                        let service = format!("{}/{}", check.namespace, check.name);
                        tracing::info!(port, %service, "health check port bound after all");
                    }
                    self.servers.insert(port, server);
                }
                Err(e) => {
                    let msg = e.to_string();
                    if self.failing.get(&port) != Some(&msg) {
                        self.failing.insert(port, msg);
                        new_failures.push((port, e));
                    }
                }
            }
        }
        new_failures
    }

    fn start(&self, port: u16, check: HealthCheck) -> io::Result<Server> {
        let rt = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let addr = SocketAddr::new(self.bind, port);
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let listener = {
            let _guard = rt.enter();
            tokio::net::TcpListener::from_std(std_listener)?
        };
        let state: Shared = Arc::new(RwLock::new(check));
        let (stop, stopped) = oneshot::channel::<()>();
        let app = Router::new().fallback(answer).with_state(state.clone());
        rt.spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
                tracing::warn!(%addr, error = %e, "health check server failed");
            }
        });
        Ok(Server { state, stop: Some(stop), addr })
    }
}

/// Serve an already bound listener with the answer of `check` (tests, and tools that pick the
/// port themselves); returns the handle that updates the answer. Runs until the runtime stops.
pub fn serve_listener(listener: tokio::net::TcpListener, check: HealthCheck) -> Arc<RwLock<HealthCheck>> {
    let state: Shared = Arc::new(RwLock::new(check));
    let app = Router::new().fallback(answer).with_state(state.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    state
}

async fn answer(State(state): State<Shared>) -> Response {
    let check = state.read().unwrap_or_else(|e| e.into_inner()).clone();
    let (status, body) = lb_model::health::body(&check);
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn check(name: &str, n: usize) -> HealthCheck {
        HealthCheck { namespace: "default".into(), name: name.into(), local_endpoints: n }
    }

    /// One HTTP/1.1 request on a fresh connection: (status, headers lowercased, body).
    async fn get(addr: SocketAddr, method: &str, path: &str) -> io::Result<(u16, String, String)> {
        let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await??;
        s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await?;
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        Ok((status, head.to_ascii_lowercase(), body.to_string()))
    }

    fn json(body: &str) -> serde_json::Value {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{body:?}: {e}"))
    }

    #[tokio::test]
    async fn answers_like_kube_proxy_and_follows_the_endpoint_count() {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = serve_listener(listener, check("web", 2));

        let (status, head, body) = get(addr, "GET", "/healthz").await.unwrap();
        assert_eq!(status, 200, "{head}");
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(head.contains("x-content-type-options: nosniff"), "{head}");
        let v = json(&body);
        assert_eq!(v["service"]["namespace"], "default");
        assert_eq!(v["service"]["name"], "web");
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(v["serviceProxyHealthy"], true);

        // Any path; the answer follows the count without a restart.
        handle.write().unwrap().local_endpoints = 0;
        let (status, _, body) = get(addr, "GET", "/some/other/path?x=1").await.unwrap();
        assert_eq!(status, 503);
        assert_eq!(json(&body)["localEndpoints"], 0);
    }

    #[tokio::test]
    async fn listeners_follow_the_wanted_ports() {
        let mut servers = HealthServers::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
        // Two distinct ports the kernel picks free for us (both held, then released).
        let held: Vec<_> = (0..2).map(|_| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap()).collect();
        let (p1, p2) = (held[0].local_addr().unwrap().port(), held[1].local_addr().unwrap().port());
        drop(held);
        let mut want = BTreeMap::from([(p1, check("a", 1)), (p2, check("b", 0))]);
        assert!(servers.update(&want).is_empty());
        let addr1 = SocketAddr::from((Ipv4Addr::LOCALHOST, p1));
        let addr2 = SocketAddr::from((Ipv4Addr::LOCALHOST, p2));
        assert_eq!(get(addr1, "GET", "/").await.unwrap().0, 200);
        assert_eq!(get(addr2, "GET", "/").await.unwrap().0, 503);

        // b gains a local endpoint, a goes away: its port is closed.
        want.remove(&p1);
        want.insert(p2, check("b", 3));
        assert!(servers.update(&want).is_empty());
        let (status, _, body) = get(addr2, "GET", "/").await.unwrap();
        assert_eq!((status, json(&body)["localEndpoints"].as_u64()), (200, Some(3)));
        let mut closed = false;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr1).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(closed, "the port of a removed Service must be closed");
        assert_eq!(servers.listening().map(|(p, _)| p).collect::<Vec<_>>(), [p2]);
    }

    #[tokio::test]
    async fn a_port_in_use_is_reported_once_and_retried() {
        let mut servers = HealthServers::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let squatter = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = squatter.local_addr().unwrap().port();
        let want = BTreeMap::from([(port, check("a", 1))]);
        let failures = servers.update(&want);
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].0, port);
        assert_eq!(failures[0].1.kind(), io::ErrorKind::AddrInUse);
        assert!(servers.update(&want).is_empty(), "the same failure is reported once");
        assert_eq!(servers.failing().collect::<Vec<_>>(), [port]);

        drop(squatter);
        assert!(servers.update(&want).is_empty());
        assert_eq!(servers.failing().count(), 0);
        assert_eq!(get(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), "GET", "/").await.unwrap().0, 200);
    }

    #[test]
    fn without_a_runtime_binding_fails_cleanly() {
        let mut servers = HealthServers::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let failures = servers.update(&BTreeMap::from([(1, check("a", 1))]));
        assert_eq!(failures.len(), 1);
    }
}
