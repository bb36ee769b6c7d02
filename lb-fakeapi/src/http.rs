//! Request handling: the URL scheme of the real apiserver for the kinds the store holds, list
//! responses (with `limit` / `continue` paging) and watch streams (newline-delimited JSON events,
//! bookmarks, `timeoutSeconds`, 410 Gone as an ERROR event).
//!
//! What kube-rs 5.0's `runtime::watcher` sends (read from kube-runtime's watcher.rs and
//! kube-core's params.rs), and so what this serves:
//! - initial list: `GET /api/v1/services?limit=500` (no resourceVersion: "most recent"), then
//!   `&continue=TOKEN` while the response carries `metadata.continue`;
//! - watch: `GET ...?watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion=RV`,
//!   plus `fieldSelector=metadata.name=NODE` for the Node watch;
//! - with the (not default) streaming-list strategy: `resourceVersion=0&sendInitialEvents=true
//!   &resourceVersionMatch=NotOlderThan`, ended by a BOOKMARK annotated `k8s.io/initial-events-end`.
//!
//! A watch from a compacted resourceVersion gets HTTP 200 and one ERROR event carrying a Status
//! with code 410, as the real apiserver's watch cache does (kube-rs then relists). A list
//! `continue` token whose snapshot was compacted gets HTTP 410 with a Status body.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{header, Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::store::{Event, Filter, Gone, Kind};
use crate::Shared;

pub(crate) type Body = BoxBody<Bytes, Infallible>;

/// What a path names.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Collection {
        kind: Kind,
        namespace: Option<String>,
    },
    Object {
        kind: Kind,
        namespace: Option<String>,
        name: String,
    },
}

fn route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("/api/v1", rest),
        ["apis", "discovery.k8s.io", "v1", rest @ ..] => ("/apis/discovery.k8s.io/v1", rest),
        _ => return None,
    };
    let kind_of = |plural: &str, namespaced: bool| {
        Kind::ALL.into_iter().find(|k| {
            k.group_path() == group && k.plural() == plural && (k.namespaced() || !namespaced)
        })
    };
    match rest {
        [plural] => Some(Route::Collection {
            kind: kind_of(plural, false)?,
            namespace: None,
        }),
        [plural, name] => Some(Route::Object {
            kind: kind_of(plural, false)?,
            namespace: None,
            name: name.to_string(),
        }),
        ["namespaces", ns, plural] => Some(Route::Collection {
            kind: kind_of(plural, true)?,
            namespace: Some(ns.to_string()),
        }),
        ["namespaces", ns, plural, name] => Some(Route::Object {
            kind: kind_of(plural, true)?,
            namespace: Some(ns.to_string()),
            name: name.to_string(),
        }),
        _ => None,
    }
}

/// Serve one request.
pub(crate) async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    shared
        .requests
        .lock()
        .unwrap()
        .push(match req.uri().query() {
            Some(q) => format!("{} {path}?{q}", req.method()),
            None => format!("{} {path}", req.method()),
        });
    let delay = *shared.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if req.method() != Method::GET {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the fake API server is read-only",
        );
    }
    let Some(route) = route(&path) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find {path}"),
        );
    };
    match route {
        Route::Object {
            kind,
            namespace,
            name,
        } => {
            let obj =
                shared
                    .store
                    .lock()
                    .unwrap()
                    .get(kind, namespace.as_deref().unwrap_or(""), &name);
            match obj {
                Some(o) => json_response(StatusCode::OK, &o),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{} \"{name}\" not found", kind.plural()),
                ),
            }
        }
        Route::Collection { kind, namespace } => {
            if query.get("labelSelector").is_some_and(|s| !s.is_empty()) {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "the fake API server has no label selectors",
                );
            }
            let filter = Filter {
                namespace,
                name: None,
            };
            let filter = match query.get("fieldSelector") {
                Some(sel) => match filter.with_field_selector(sel) {
                    Ok(f) => f,
                    Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e),
                },
                None => filter,
            };
            if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
                watch(shared, kind, filter, &query)
            } else {
                list(&shared, kind, &filter, &query)
            }
        }
    }
}

fn list(
    shared: &Shared,
    kind: Kind,
    filter: &Filter,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let limit = match query.get("limit").map(|l| l.parse::<usize>()) {
        None => None,
        Some(Ok(l)) => Some(l),
        Some(Err(_)) => return status(StatusCode::BAD_REQUEST, "BadRequest", "invalid limit"),
    };
    let cont = query.get("continue").filter(|c| !c.is_empty());
    let page = shared
        .store
        .lock()
        .unwrap()
        .list(kind, filter, limit, cont.map(String::as_str));
    match page {
        Ok(page) => {
            let mut meta = json!({ "resourceVersion": page.resource_version.to_string() });
            if let Some(c) = page.continue_token {
                meta["continue"] = json!(c);
                meta["remainingItemCount"] = json!(page.remaining.unwrap_or(0));
            }
            let head = json!({
                "kind": format!("{}List", kind.kind()),
                "apiVersion": kind.api_version(),
                "metadata": meta,
            });
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(list_body(&head, &page.items)).boxed())
                .expect("static response parts")
        }
        Err(gone) => status(StatusCode::GONE, "Expired", &gone_message(&gone)),
    }
}

/// A list response: the fields of `head` and `"items"`, the items' JSON (serialized when they were
/// stored) joined as they are.
fn list_body(head: &Value, items: &[Bytes]) -> Bytes {
    let head = serde_json::to_vec(head).expect("JSON values serialize");
    let len = head.len() + items.iter().map(|i| i.len() + 1).sum::<usize>() + 16;
    let mut body = Vec::with_capacity(len);
    // `head` is a non-empty object: reopen it after its last field.
    body.extend_from_slice(&head[..head.len() - 1]);
    body.extend_from_slice(b",\"items\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(item);
    }
    body.extend_from_slice(b"]}");
    Bytes::from(body)
}

fn gone_message(g: &Gone) -> String {
    match g {
        Gone::TooOldResourceVersion { requested, oldest } => {
            format!("too old resource version: {requested} ({oldest})")
        }
        Gone::ContinueExpired => {
            "The provided continue parameter is too old to display a consistent list \
             result. You can start a new list without the continue parameter."
                .to_string()
        }
    }
}

/// State of one watch response body.
struct WatchStream {
    shared: Arc<Shared>,
    kind: Kind,
    filter: Filter,
    /// Every matching event with rv <= cursor has been queued.
    cursor: u64,
    pending: VecDeque<Bytes>,
    /// End the stream once `pending` is drained.
    done: bool,
    deadline: Instant,
    bookmarks: bool,
    next_bookmark: Instant,
    changed: tokio::sync::watch::Receiver<u64>,
    dropped: tokio::sync::watch::Receiver<u64>,
}

fn watch(
    shared: Arc<Shared>,
    kind: Kind,
    filter: Filter,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let timeout = match query.get("timeoutSeconds").map(|t| t.parse::<u64>()) {
        None => Duration::from_secs(1800),
        Some(Ok(t)) => Duration::from_secs(t),
        Some(Err(_)) => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "invalid timeoutSeconds",
            )
        }
    };
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let send_initial = query.get("sendInitialEvents").is_some_and(|v| v == "true");
    let rv = query
        .get("resourceVersion")
        .map(String::as_str)
        .unwrap_or("");
    let mut pending = VecDeque::new();
    let mut done = false;
    // Subscribe before reading the store so no change between the two is missed.
    let mut changed = shared.changed.subscribe();
    changed.borrow_and_update();
    let dropped = {
        let mut d = shared.dropped.subscribe();
        d.borrow_and_update();
        d
    };
    let cursor = {
        let store = shared.store.lock().unwrap();
        if rv.is_empty() || rv == "0" {
            let (events, now) = store.initial_events(kind, &filter);
            pending.extend(events.iter().map(event_line));
            if send_initial {
                pending.push_back(bookmark_line(kind, now, true));
            }
            now
        } else {
            let Ok(rv) = rv.parse::<u64>() else {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("invalid resourceVersion {rv:?}"),
                );
            };
            if let Err(g) = store.check_watch_from(rv) {
                pending.push_back(error_line(&g));
                done = true;
            }
            rv
        }
    };
    let every = *shared.bookmark_every.lock().unwrap();
    let st = WatchStream {
        shared,
        kind,
        filter,
        cursor,
        pending,
        done,
        deadline: Instant::now() + timeout,
        bookmarks,
        next_bookmark: Instant::now() + every,
        changed,
        dropped,
    };
    let body = futures::stream::unfold(st, next_frame);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(StreamBody::new(body).boxed())
        .expect("static response parts")
}

/// Produce the next chunk of a watch body (one event line), or end it.
async fn next_frame(
    mut st: WatchStream,
) -> Option<(Result<Frame<Bytes>, Infallible>, WatchStream)> {
    loop {
        if let Some(line) = st.pending.pop_front() {
            return Some((Ok(Frame::data(line)), st));
        }
        if st.done {
            return None;
        }
        st.changed.borrow_and_update();
        let drained = st
            .shared
            .store
            .lock()
            .unwrap()
            .events_after(st.kind, &st.filter, st.cursor);
        match drained {
            Ok((events, now)) => {
                st.pending.extend(events.iter().map(event_line));
                st.cursor = now;
            }
            Err(g) => {
                st.pending.push_back(error_line(&g));
                st.done = true;
            }
        }
        if !st.pending.is_empty() {
            continue;
        }
        tokio::select! {
            r = st.changed.changed() => st.done |= r.is_err(),
            _ = st.dropped.changed() => st.done = true,
            _ = tokio::time::sleep_until(st.deadline) => st.done = true,
            _ = tokio::time::sleep_until(st.next_bookmark), if st.bookmarks => {
                st.pending.push_back(bookmark_line(st.kind, st.cursor, false));
                st.next_bookmark = Instant::now() + *st.shared.bookmark_every.lock().unwrap();
            }
        }
    }
}

/// One line of a watch body: `{"type":...,"object":...}` with `type` first, as the real apiserver
/// writes it (Go's encoder keeps metav1.WatchEvent's field order). A client may depend on that
/// order: serde decodes an object that precedes its tag through a buffer, where lb-kube's
/// `Lenient` objects (serde_json's RawValue) cannot be decoded.
#[derive(serde::Serialize)]
struct WatchLine<'a> {
    #[serde(rename = "type")]
    ty: &'a str,
    object: &'a Value,
}

fn watch_line(ty: &str, object: &Value) -> Bytes {
    let mut b = serde_json::to_vec(&WatchLine { ty, object }).expect("JSON values serialize");
    b.push(b'\n');
    Bytes::from(b)
}

fn event_line(e: &Event) -> Bytes {
    watch_line(e.ty.as_str(), &e.object)
}

fn bookmark_line(kind: Kind, rv: u64, initial_end: bool) -> Bytes {
    let mut meta = json!({ "resourceVersion": rv.to_string() });
    if initial_end {
        meta["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
    }
    watch_line(
        "BOOKMARK",
        &json!({ "kind": kind.kind(), "apiVersion": kind.api_version(), "metadata": meta }),
    )
}

fn status_object(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

fn error_line(g: &Gone) -> Bytes {
    watch_line(
        "ERROR",
        &status_object(StatusCode::GONE, "Expired", &gone_message(g)),
    )
}

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(
            Full::new(Bytes::from(
                serde_json::to_vec(v).expect("JSON values serialize"),
            ))
            .boxed(),
        )
        .expect("static response parts")
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status_object(code, reason, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_lines_put_the_type_first() {
        let l = watch_line("ADDED", &json!({"a": 1}));
        assert_eq!(&l[..], b"{\"type\":\"ADDED\",\"object\":{\"a\":1}}\n");
    }

    #[test]
    fn list_body_is_the_head_with_the_items() {
        let head = json!({"kind": "ServiceList", "metadata": {"resourceVersion": "7"}});
        let items = [Bytes::from_static(b"{\"a\":1}"), Bytes::from_static(b"{}")];
        let body: Value = serde_json::from_slice(&list_body(&head, &items)).unwrap();
        assert_eq!(
            body,
            json!({"kind": "ServiceList", "metadata": {"resourceVersion": "7"}, "items": [{"a": 1}, {}]})
        );
        let empty: Value = serde_json::from_slice(&list_body(&head, &[])).unwrap();
        assert_eq!(empty["items"], json!([]));
    }

    #[test]
    fn routes_follow_the_apiserver_url_scheme() {
        assert_eq!(
            route("/api/v1/services"),
            Some(Route::Collection {
                kind: Kind::Service,
                namespace: None
            })
        );
        assert_eq!(
            route("/api/v1/namespaces/kube-system/services"),
            Some(Route::Collection {
                kind: Kind::Service,
                namespace: Some("kube-system".into())
            })
        );
        assert_eq!(
            route("/apis/discovery.k8s.io/v1/namespaces/a/endpointslices/s1"),
            Some(Route::Object {
                kind: Kind::EndpointSlice,
                namespace: Some("a".into()),
                name: "s1".into()
            })
        );
        assert_eq!(
            route("/api/v1/nodes"),
            Some(Route::Collection {
                kind: Kind::Node,
                namespace: None
            })
        );
        // Nodes are cluster-scoped, slices are not in the core group.
        assert_eq!(route("/api/v1/namespaces/a/nodes"), None);
        assert_eq!(route("/api/v1/endpointslices"), None);
        assert_eq!(route("/apis/apps/v1/daemonsets"), None);
    }
}
