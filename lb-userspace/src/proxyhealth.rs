//! kube-proxy's health port (`--healthz-addr`, default `0.0.0.0:10256`): `/healthz` and
//! `/livez` with kube-proxy's semantics, so cloud load balancers and whatever else probes
//! kube-proxy keep working when xlb replaces it.
//!
//! kube-proxy (`pkg/proxy/healthcheck/proxy_health.go`) is healthy unless a change has been
//! waiting longer than the health timeout (kube-proxy: twice its sync period, 60 s by default)
//! to reach the dataplane. The agent reports the same two moments:
//!
//! - [`ProxyHealth::queued`]: a change of the cluster arrived, or a frontend failed to apply and
//!   waits for its retry (e.g. a full map). Only the oldest pending change counts.
//! - [`ProxyHealth::updated`]: everything the agent knows is in the maps.
//!
//! A control loop that stopped turning is stale too ([`ProxyHealth::beat`], every tick): in
//! kube-proxy the informers queue changes on their own goroutines, so a stuck sync loop shows as
//! a late change; in xlb the loop itself takes the events in, so its heartbeat stands in for
//! that. An API server outage makes nothing stale (no change arrives), as in kube-proxy.
//!
//! Both paths answer with kube-proxy's JSON: `lastUpdated` and `currentTime` (RFC 3339 here;
//! when healthy `lastUpdated` is the current time, as kube-proxy reports it "for
//! compatibility"), on `/healthz` also `nodeEligible` (false while the Node is being deleted or
//! tainted `ToBeDeletedByClusterAutoscaler`, which turns `/healthz`, not `/livez`, to 503 so a
//! load balancer drains the node first). xlb adds `lastSynced` (when the maps last held
//! everything), `pendingSince` (the oldest change not yet in the maps, or null) and `synced`
//! (the first full sync is done): `xlb status` reads them.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use k8s_openapi::jiff::Timestamp;

/// `--healthz-addr`'s default: kube-proxy's.
pub const DEFAULT_ADDR: &str = "0.0.0.0:10256";
/// `--healthz-timeout`'s default: kube-proxy's (2 x its 30 s sync period).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The health state, shared by the agent (writer) and the HTTP server (reader). Cloning shares it.
#[derive(Clone, Debug)]
pub struct ProxyHealth {
    inner: Arc<Mutex<Inner>>,
    timeout: Duration,
}

#[derive(Debug)]
struct Inner {
    /// When the maps last held everything the agent knew.
    last_updated: SystemTime,
    /// The oldest change not in the maps yet (monotonic, for the age; wall clock, for the body).
    pending: Option<(Instant, SystemTime)>,
    /// The control loop's last turn.
    last_beat: Instant,
    /// False while this node is being deleted or drained by the cluster autoscaler.
    node_eligible: bool,
    /// The first full sync is in the maps.
    synced: bool,
}

/// One answer of the health port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// No change has waited longer than the timeout, and the control loop turns.
    pub healthy: bool,
    pub node_eligible: bool,
    pub synced: bool,
    pub last_updated: SystemTime,
    pub pending_since: Option<SystemTime>,
    pub now: SystemTime,
}

impl ProxyHealth {
    /// Healthy, as kube-proxy is at the start of its sync loop: nothing is pending yet.
    pub fn new(timeout: Duration) -> Self {
        let inner = Inner {
            last_updated: SystemTime::now(),
            pending: None,
            last_beat: Instant::now(),
            node_eligible: true,
            synced: false,
        };
        ProxyHealth { inner: Arc::new(Mutex::new(inner)), timeout }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves plain data behind; keep serving it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A change waits for the maps (kube-proxy's `QueuedUpdate`): the oldest one counts.
    pub fn queued(&self) {
        let mut i = self.lock();
        if i.pending.is_none() {
            i.pending = Some((Instant::now(), SystemTime::now()));
        }
    }

    /// The maps hold everything the agent knows (kube-proxy's `Updated`).
    pub fn updated(&self) {
        let mut i = self.lock();
        i.pending = None;
        i.last_updated = SystemTime::now();
    }

    /// The first full sync is in the maps.
    pub fn set_synced(&self) {
        self.lock().synced = true;
    }

    /// The control loop turned.
    pub fn beat(&self) {
        self.lock().last_beat = Instant::now();
    }

    /// Whether this node may take load-balancer traffic (not being deleted or drained).
    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    /// The state now.
    pub fn report(&self) -> Report {
        self.report_at(Instant::now(), SystemTime::now())
    }

    /// The state at `now` (monotonic) / `wall` (tests move the clock).
    pub fn report_at(&self, now: Instant, wall: SystemTime) -> Report {
        let i = self.lock();
        let late = |since: Instant| now.saturating_duration_since(since) >= self.timeout;
        let pending_late = i.pending.is_some_and(|(since, _)| late(since));
        Report {
            healthy: !pending_late && !late(i.last_beat),
            node_eligible: i.node_eligible,
            synced: i.synced,
            last_updated: i.last_updated,
            pending_since: i.pending.map(|(_, w)| w),
            now: wall,
        }
    }
}

fn rfc3339(t: SystemTime) -> String {
    Timestamp::try_from(t).map(|t| t.to_string()).unwrap_or_default()
}

impl Report {
    /// The JSON body: kube-proxy's fields (`nodeEligible` only on /healthz), then xlb's.
    pub fn body(&self, with_node: bool) -> serde_json::Value {
        // kube-proxy reports the current time as lastUpdated while healthy.
        let last_updated = if self.healthy { self.now } else { self.last_updated };
        let mut v = serde_json::json!({
            "lastUpdated": rfc3339(last_updated),
            "currentTime": rfc3339(self.now),
        });
        if with_node {
            v["nodeEligible"] = self.node_eligible.into();
        }
        v["lastSynced"] = rfc3339(self.last_updated).into();
        v["pendingSince"] = self.pending_since.map(rfc3339).into();
        v["synced"] = self.synced.into();
        v
    }
}

/// Serve /healthz and /livez on `addr` until the process exits.
pub async fn serve(addr: SocketAddr, health: ProxyHealth) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("listening on {addr}: {e} (is kube-proxy still running on this node?)"))?;
    serve_on(listener, health).await
}

/// [`serve`] on a bound listener.
pub async fn serve_on(listener: tokio::net::TcpListener, health: ProxyHealth) -> anyhow::Result<()> {
    let app = Router::new().route("/healthz", get(healthz)).route("/livez", get(livez)).with_state(health);
    tracing::info!(addr = %listener.local_addr()?, "serving kube-proxy's /healthz and /livez");
    axum::serve(listener, app).await?;
    Ok(())
}

fn answer(report: &Report, ok: bool, with_node: bool) -> impl IntoResponse {
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (
        status,
        [(header::CONTENT_TYPE, "application/json"), (header::X_CONTENT_TYPE_OPTIONS, "nosniff")],
        report.body(with_node).to_string(),
    )
}

async fn healthz(State(h): State<ProxyHealth>) -> impl IntoResponse {
    let r = h.report();
    answer(&r, r.healthy && r.node_eligible, true)
}

async fn livez(State(h): State<ProxyHealth>) -> impl IntoResponse {
    let r = h.report();
    answer(&r, r.healthy, false)
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    const T: Duration = Duration::from_secs(60);

    #[test]
    fn a_change_is_late_after_the_timeout_and_only_the_oldest_counts() {
        let h = ProxyHealth::new(T);
        let wall = SystemTime::now();
        let t0 = Instant::now();
        assert!(h.report_at(t0, wall).healthy, "healthy at start, as kube-proxy");
        h.queued();
        let queued_at = h.lock().pending.unwrap().0;
        assert!(h.report_at(queued_at + T - Duration::from_millis(1), wall).healthy);
        // A later change does not move the oldest one.
        h.queued();
        assert_eq!(h.lock().pending.unwrap().0, queued_at);
        let r = h.report_at(queued_at + T, wall);
        assert!(!r.healthy);
        assert!(r.pending_since.is_some());
        h.updated();
        let r = h.report_at(queued_at + 2 * T, wall);
        assert!(!r.healthy, "the loop did not beat for 2 x T");
        h.beat();
        let r = h.report_at(Instant::now(), wall);
        assert!(r.healthy && r.pending_since.is_none(), "{r:?}");
    }

    #[test]
    fn the_body_has_kube_proxys_fields() {
        let h = ProxyHealth::new(T);
        let r = h.report();
        let b = r.body(true);
        assert_eq!(b["lastUpdated"], b["currentTime"], "healthy: lastUpdated is now, as kube-proxy says");
        assert_eq!(b["nodeEligible"], true);
        assert_eq!(b["synced"], false);
        assert!(b["pendingSince"].is_null());
        let t: Timestamp = b["currentTime"].as_str().unwrap().parse().expect("RFC 3339");
        assert!(t.as_second() > 1_700_000_000);
        assert!(r.body(false).get("nodeEligible").is_none(), "/livez has no nodeEligible");
        // Stale: lastUpdated is the last sync, not now.
        h.queued();
        let stale = h.report_at(Instant::now() + T, SystemTime::now() + T);
        let b = stale.body(true);
        assert_ne!(b["lastUpdated"], b["currentTime"]);
        assert!(b["pendingSince"].is_string());
    }

    /// GET `path` (HTTP/1.0) from a server on `addr`: status and body.
    fn get(addr: SocketAddr, path: &str) -> (u16, serde_json::Value) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(head.to_ascii_lowercase().contains("content-type: application/json"), "{head}");
        (status, serde_json::from_str(body).unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_server_answers_200_or_503_with_json() {
        let h = ProxyHealth::new(Duration::from_millis(1));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_on(listener, h.clone()));
        let (h2, addr2) = (h.clone(), addr);
        tokio::task::spawn_blocking(move || {
            h2.beat();
            // With a 1 ms timeout the last beat is late by the time the request lands: 503.
            std::thread::sleep(Duration::from_millis(5));
            let (status, body) = get(addr2, "/livez");
            assert_eq!(status, 503, "{body}");
            assert!(body.get("nodeEligible").is_none());
            // An ineligible node fails /healthz only.
            h2.set_node_eligible(false);
            let (status, body) = get(addr2, "/healthz");
            assert_eq!((status, &body["nodeEligible"]), (503, &serde_json::Value::Bool(false)));
        })
        .await
        .unwrap();
        let fresh = ProxyHealth::new(T);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_on(listener, fresh));
        tokio::task::spawn_blocking(move || {
            for path in ["/healthz", "/livez"] {
                let (status, body) = get(addr, path);
                assert_eq!(status, 200, "{path}: {body}");
                assert!(body["lastUpdated"].is_string() && body["currentTime"].is_string());
            }
        })
        .await
        .unwrap();
    }
}
