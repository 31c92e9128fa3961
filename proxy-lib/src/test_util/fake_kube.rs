//! An in-process fake Kubernetes API server (feature `fake-kube`), for tests that run the
//! unmodified `kube` client against it over plain HTTP on 127.0.0.1.
//!
//! It is a generic in-memory object store keyed by (resource, namespace, name), where a
//! resource is `group/version/plural` (`v1/secrets`, `coordination.k8s.io/v1/leases`). It
//! speaks real Kubernetes JSON for:
//! - get, list (with `labelSelector` and `fieldSelector` on `metadata.name` /
//!   `metadata.namespace`), create, update (optimistic concurrency on `resourceVersion`),
//!   JSON merge patch (`application/merge-patch+json`, RFC 7386: a `resourceVersion` in the
//!   patch is a precondition, name, namespace and uid stay, the resourceVersion is bumped and
//!   watchers see MODIFIED; other patch types get 415, as for a custom resource) and delete,
//!   namespaced and cluster-scoped;
//! - watch (`?watch=true|1&resourceVersion=N`): newline-delimited `WatchEvent`s, replayed from
//!   history after `N`, then live; `timeoutSeconds` ends the stream. A `resourceVersion` older
//!   than the retained history (see [`FakeKube::compact`]) gets an `ERROR` event with a 410
//!   `Status`, as a real API server sends.
//!
//! Every request is recorded ([`FakeKube::calls`], with bodies [`FakeKube::requests`]) so a
//! test asserts what the client asked and sent.
//! [`FakeKube::set_down`] cuts every open connection and refuses new ones until it is brought
//! back, to test clients that must survive the API server going away.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::StreamExt;

type Body = BoxBody<Bytes, Infallible>;

/// The content type of a JSON merge patch (RFC 7386), the only patch the fake applies.
pub const MERGE_PATCH: &str = "application/merge-patch+json";

/// One request as the fake saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// `get`, `list`, `watch`, `create`, `update`, `patch` or `delete` (as in RBAC).
    pub verb: &'static str,
    /// `group/version/plural` (`v1/secrets`).
    pub resource: String,
    /// The namespace in the path, if any.
    pub namespace: Option<String>,
    /// The object name in the path, if any.
    pub name: Option<String>,
    /// The query parameters.
    pub query: BTreeMap<String, String>,
    /// The request's `content-type` (a PATCH's says which kind of patch it is).
    pub content_type: Option<String>,
}

impl Call {
    /// The plural alone (`secrets`), as RBAC rules name resources.
    pub fn plural(&self) -> &str {
        self.resource.rsplit('/').next().unwrap_or_default()
    }
}

#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    kind: &'static str,
    resource: String,
    object: Value,
}

type Key = (String, String, String);

#[derive(Debug)]
struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Event>,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest: u64,
    kinds: HashMap<String, String>,
    calls: Vec<Call>,
    /// The request body of each call, by the same index.
    bodies: Vec<Bytes>,
}

struct Inner {
    store: Mutex<Store>,
    events: broadcast::Sender<Event>,
    down: watch::Sender<Down>,
    /// Bumped on every recorded call (for [`FakeKube::wait_for_call`]).
    called: watch::Sender<usize>,
    /// Resources whose create is answered by a function instead of being stored.
    hooks: Mutex<HashMap<String, CreateHook>>,
}

/// Answers a create (the request body) with the object to return, or `Err((code, reason,
/// message))` for a `Status` error. For review-style resources (`TokenReview`,
/// `SubjectAccessReview`) whose answer the API server computes and never stores.
pub type CreateHook = Arc<dyn Fn(&Value) -> Result<Value, (u16, String, String)> + Send + Sync>;

/// Whether the server is down, and how many times it went down (so a connection notices a
/// down-and-up even when both happened before it looked).
#[derive(Debug, Clone, Copy, Default)]
struct Down {
    down: bool,
    cuts: u64,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner").field("store", &self.store).finish()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The fake API server. Dropping it (or [`FakeKube::stop`]) stops it.
#[derive(Debug)]
pub struct FakeKube {
    inner: Arc<Inner>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.task.abort();
        self.inner.down.send_modify(|d| {
            d.down = true;
            d.cuts += 1;
        });
    }
}

fn status(code: u16, reason: &str, message: impl Into<String>) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message.into(),
        "reason": reason,
        "code": code,
    })
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn error(code: u16, reason: &str, message: impl Into<String>) -> Response<Body> {
    json_response(code, &status(code, reason, message))
}

/// A parsed resource path.
struct Target {
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (plural, name) = match rest {
        [plural] => (*plural, None),
        [plural, name] => (*plural, Some(name.to_string())),
        _ => return None,
    };
    Some(Target {
        resource: format!("{gv}/{plural}"),
        namespace,
        name,
    })
}

/// `k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-separated (all must hold).
fn labels_match(selector: &str, labels: &Value) -> bool {
    let get = |k: &str| labels.get(k).and_then(Value::as_str);
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                get(k.trim()) != Some(v.trim())
            } else if let Some((k, v)) = term.split_once('=') {
                get(k.trim()) == Some(v.trim_start_matches('=').trim())
            } else if let Some(k) = term.strip_prefix('!') {
                get(k.trim()).is_none()
            } else {
                get(term).is_some()
            }
        })
}

fn fields_match(selector: &str, obj: &Value) -> bool {
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .all(|term| {
            let (k, v, neg) = match term.split_once("!=") {
                Some((k, v)) => (k, v, true),
                None => match term.split_once('=') {
                    Some((k, v)) => (k, v.trim_start_matches('='), false),
                    None => return false,
                },
            };
            let mut cur = obj;
            for part in k.trim().split('.') {
                cur = cur.get(part).unwrap_or(&Value::Null);
            }
            (cur.as_str() == Some(v.trim())) != neg
        })
}

fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

impl Store {
    fn kind_of(&self, resource: &str) -> Option<String> {
        self.kinds.get(resource).cloned()
    }

    fn api_version(resource: &str) -> String {
        resource
            .rsplit_once('/')
            .map(|(gv, _)| gv)
            .unwrap_or("v1")
            .to_string()
    }

    /// Stores `obj` (stamping apiVersion, kind, namespace, uid, resourceVersion) and records
    /// the event. `kind` is `ADDED`, `MODIFIED` or `DELETED`.
    fn commit(&mut self, resource: &str, mut obj: Value, kind: &'static str) -> Event {
        self.rv += 1;
        let rv = self.rv;
        if let Some(k) = self.kind_of(resource) {
            obj["kind"] = json!(k);
        }
        obj["apiVersion"] = json!(Self::api_version(resource));
        let meta = &mut obj["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        if meta.get("uid").is_none() {
            meta["uid"] = json!(format!("uid-{rv}"));
        }
        if meta.get("creationTimestamp").is_none() {
            meta["creationTimestamp"] = json!("2024-01-01T00:00:00Z");
        }
        let key = key_of(resource, &obj);
        if kind == "DELETED" {
            self.objects.remove(&key);
        } else {
            self.objects.insert(key, obj.clone());
        }
        let ev = Event {
            rv,
            kind,
            resource: resource.to_string(),
            object: obj,
        };
        self.history.push(ev.clone());
        ev
    }
}

fn key_of(resource: &str, obj: &Value) -> Key {
    let m = &obj["metadata"];
    (
        resource.to_string(),
        m["namespace"].as_str().unwrap_or_default().to_string(),
        m["name"].as_str().unwrap_or_default().to_string(),
    )
}

impl FakeKube {
    /// Starts the fake on an ephemeral port of 127.0.0.1, knowing Secrets and ConfigMaps
    /// (more kinds with [`FakeKube::register`]).
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API server");
        let addr = listener.local_addr().expect("fake API server address");
        let (events, _) = broadcast::channel(1024);
        let (down, _) = watch::channel(Down::default());
        let (called, _) = watch::channel(0);
        let mut kinds = HashMap::new();
        kinds.insert("v1/secrets".to_string(), "Secret".to_string());
        kinds.insert("v1/configmaps".to_string(), "ConfigMap".to_string());
        let inner = Arc::new(Inner {
            store: Mutex::new(Store {
                rv: 100,
                objects: BTreeMap::new(),
                history: Vec::new(),
                oldest: 0,
                kinds,
                calls: Vec::new(),
                bodies: Vec::new(),
            }),
            events,
            down,
            called,
            hooks: Mutex::new(HashMap::new()),
        });
        let task = tokio::spawn(accept_loop(listener, inner.clone()));
        Self { inner, addr, task }
    }

    /// Teaches the fake a resource (`group/version/plural`) and its kind.
    pub fn register(&self, resource: &str, kind: &str) {
        self.inner
            .lock()
            .kinds
            .insert(resource.to_string(), kind.to_string());
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig whose current context points at this server, in `namespace`.
    pub fn kubeconfig(&self, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    \
             cluster: fake\n    user: fake\n    namespace: {namespace}\ncurrent-context: fake\n",
            self.url()
        )
    }

    /// Writes [`FakeKube::kubeconfig`] to `path`.
    pub fn write_kubeconfig(&self, path: &Path, namespace: &str) {
        std::fs::write(path, self.kubeconfig(namespace)).expect("write the kubeconfig");
    }

    /// Creates or replaces an object (its `metadata.namespace` and `metadata.name` say
    /// where), as a client's create or update would; watchers see ADDED or MODIFIED.
    /// Returns the stored object.
    pub fn put(&self, resource: &str, obj: Value) -> Value {
        let mut s = self.inner.lock();
        let kind = if s.objects.contains_key(&key_of(resource, &obj)) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let ev = s.commit(resource, obj, kind);
        let _ = self.inner.events.send(ev.clone());
        ev.object
    }

    /// Deletes an object; watchers see DELETED. False if there was none.
    pub fn delete(&self, resource: &str, namespace: &str, name: &str) -> bool {
        let mut s = self.inner.lock();
        let key = (
            resource.to_string(),
            namespace.to_string(),
            name.to_string(),
        );
        let Some(obj) = s.objects.get(&key).cloned() else {
            return false;
        };
        let ev = s.commit(resource, obj, "DELETED");
        let _ = self.inner.events.send(ev);
        true
    }

    /// One object, if present.
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = (
            resource.to_string(),
            namespace.to_string(),
            name.to_string(),
        );
        self.inner.lock().objects.get(&key).cloned()
    }

    /// Every object of `resource` in `namespace`.
    pub fn list(&self, resource: &str, namespace: &str) -> Vec<Value> {
        self.inner
            .lock()
            .objects
            .iter()
            .filter(|((r, ns, _), _)| r == resource && ns == namespace)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Forgets the event history: a watch resumed from any resourceVersion older than now
    /// gets 410 Gone (and a well-behaved client relists).
    pub fn compact(&self) {
        let mut s = self.inner.lock();
        s.oldest = s.rv + 1;
        s.history.clear();
    }

    /// `true`: every open connection (watches included) is cut and new ones are closed as
    /// soon as they are accepted. `false`: serving again.
    pub fn set_down(&self, down: bool) {
        self.inner.down.send_modify(|d| {
            if down && !d.down {
                d.cuts += 1;
            }
            d.down = down;
        });
    }

    /// Every request seen so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.inner.lock().calls.clone()
    }

    /// Every request seen so far with its body (as text, lossily), in order: what a test
    /// searches for anything that must never be sent (a token outside a TokenReview).
    pub fn requests(&self) -> Vec<(Call, String)> {
        let s = self.inner.lock();
        s.calls
            .iter()
            .cloned()
            .zip(
                s.bodies
                    .iter()
                    .map(|b| String::from_utf8_lossy(b).into_owned()),
            )
            .collect()
    }

    /// Waits (up to `timeout`) until a recorded call satisfies `f`; true if one did. Lets a
    /// test wait on "the client has asked X" (e.g. its watch is open) instead of sleeping.
    pub async fn wait_for_call(&self, timeout: Duration, f: impl Fn(&Call) -> bool) -> bool {
        let mut called = self.inner.called.subscribe();
        let seen = |_: &usize| self.inner.lock().calls.iter().any(&f);
        tokio::time::timeout(timeout, called.wait_for(seen))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Answers every create of `resource` with `hook` (nothing is stored, no event is sent),
    /// as the API server does for review resources such as
    /// `authentication.k8s.io/v1/tokenreviews`. Registers `kind` for it too.
    pub fn on_create(&self, resource: &str, kind: &str, hook: CreateHook) {
        self.register(resource, kind);
        self.inner
            .hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(resource.to_string(), hook);
    }

    /// Stops the server and cuts its connections.
    pub async fn stop(self) {
        self.set_down(true);
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let mut down = inner.down.subscribe();
        let Down {
            down: is_down,
            cuts,
        } = *down.borrow_and_update();
        if is_down {
            drop(tcp);
            continue;
        }
        let inner = inner.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let inner = inner.clone();
                async move { Ok::<_, Infallible>(handle(&inner, req).await) }
            });
            let conn =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
            tokio::select! {
                _ = conn => {}
                _ = down.wait_for(|d| d.cuts != cuts) => {}
            }
        });
    }
}

async fn handle(inner: &Inner, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query: BTreeMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let Some(t) = parse_path(&path) else {
        return error(404, "NotFound", format!("the server could not find {path}"));
    };
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = match (&method, t.name.is_some()) {
        (&Method::GET, true) => "get",
        (&Method::GET, false) if watching => "watch",
        (&Method::GET, false) => "list",
        (&Method::POST, false) => "create",
        (&Method::PUT, true) => "update",
        (&Method::PATCH, true) => "patch",
        (&Method::DELETE, true) => "delete",
        _ => return error(405, "MethodNotAllowed", format!("{method} {path}")),
    };
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(400, "BadRequest", e.to_string()),
    };
    {
        let mut s = inner.lock();
        s.calls.push(Call {
            verb,
            resource: t.resource.clone(),
            namespace: t.namespace.clone(),
            name: t.name.clone(),
            query: query.clone(),
            content_type: content_type.clone(),
        });
        s.bodies.push(body.clone());
    }
    inner.called.send_modify(|n| *n += 1);
    let Some(kind) = inner.lock().kind_of(&t.resource) else {
        return error(
            404,
            "NotFound",
            format!("the server doesn't have a resource type {:?}", t.resource),
        );
    };
    let ns = t.namespace.clone().unwrap_or_default();
    match verb {
        "get" => {
            let key = (t.resource.clone(), ns, t.name.clone().unwrap_or_default());
            match inner.lock().objects.get(&key) {
                Some(o) => json_response(200, o),
                None => not_found(&t),
            }
        }
        "list" => {
            let s = inner.lock();
            let items: Vec<Value> = s
                .objects
                .iter()
                .filter(|((r, _, _), o)| r == &t.resource && selected(&t, &query, o))
                .map(|(_, o)| o.clone())
                .collect();
            json_response(
                200,
                &json!({
                    "kind": format!("{kind}List"),
                    "apiVersion": Store::api_version(&t.resource),
                    "metadata": {"resourceVersion": s.rv.to_string()},
                    "items": items,
                }),
            )
        }
        "watch" => watch_response(inner, t, query),
        "patch"
            if content_type
                .as_deref()
                .and_then(|c| c.split(';').next())
                .map(str::trim)
                != Some(MERGE_PATCH) =>
        {
            error(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types \
                     include: {MERGE_PATCH} (got {content_type:?})"
                ),
            )
        }
        "create" | "update" | "patch" => write(inner, verb, &t, &body),
        "delete" => {
            let mut s = inner.lock();
            let key = (t.resource.clone(), ns, t.name.clone().unwrap_or_default());
            let Some(obj) = s.objects.get(&key).cloned() else {
                return not_found(&t);
            };
            let ev = s.commit(&t.resource, obj, "DELETED");
            let _ = inner.events.send(ev.clone());
            json_response(200, &ev.object)
        }
        _ => error(405, "MethodNotAllowed", verb),
    }
}

fn not_found(t: &Target) -> Response<Body> {
    let plural = t.resource.rsplit('/').next().unwrap_or_default();
    let name = t.name.as_deref().unwrap_or_default();
    error(404, "NotFound", format!("{plural} {name:?} not found"))
}

fn selected(t: &Target, query: &BTreeMap<String, String>, o: &Value) -> bool {
    let m = &o["metadata"];
    if let Some(ns) = &t.namespace
        && m["namespace"].as_str() != Some(ns)
    {
        return false;
    }
    query
        .get("labelSelector")
        .is_none_or(|s| labels_match(s, &m["labels"]))
        && query
            .get("fieldSelector")
            .is_none_or(|s| fields_match(s, o))
}

fn write(inner: &Inner, verb: &str, t: &Target, body: &[u8]) -> Response<Body> {
    let incoming: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return error(400, "BadRequest", format!("request body: {e}")),
    };
    let hook = inner
        .hooks
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&t.resource)
        .cloned();
    if let Some(hook) = hook.filter(|_| verb == "create") {
        return match hook(&incoming) {
            Ok(mut answer) => {
                if let Some(k) = inner.lock().kind_of(&t.resource) {
                    answer["kind"] = json!(k);
                }
                answer["apiVersion"] = json!(Store::api_version(&t.resource));
                json_response(201, &answer)
            }
            Err((code, reason, message)) => error(code, &reason, message),
        };
    }
    let mut s = inner.lock();
    let ns = t.namespace.clone().unwrap_or_default();
    let (obj, kind) = match verb {
        "create" => {
            let mut obj = incoming;
            if let Some(prefix) = obj["metadata"]["generateName"].as_str()
                && obj["metadata"]["name"].is_null()
            {
                obj["metadata"]["name"] = json!(format!("{prefix}{}", s.rv + 1));
            }
            if t.namespace.is_some() {
                obj["metadata"]["namespace"] = json!(ns);
            }
            if s.objects.contains_key(&key_of(&t.resource, &obj)) {
                let name = obj["metadata"]["name"].as_str().unwrap_or_default();
                return error(409, "AlreadyExists", format!("{name:?} already exists"));
            }
            (obj, "ADDED")
        }
        _ => {
            let key = (
                t.resource.clone(),
                ns.clone(),
                t.name.clone().unwrap_or_default(),
            );
            let Some(current) = s.objects.get(&key).cloned() else {
                return not_found(t);
            };
            // A resourceVersion in an update or a patch is a precondition.
            if stale(&incoming, &current) {
                return error(
                    409,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version and try again",
                );
            }
            let obj = if verb == "update" {
                let mut obj = incoming;
                obj["metadata"]["namespace"] = current["metadata"]["namespace"].clone();
                obj["metadata"]["uid"] = current["metadata"]["uid"].clone();
                obj
            } else {
                if !incoming.is_object() {
                    return error(400, "BadRequest", "a merge patch must be a JSON object");
                }
                let mut obj = current.clone();
                merge_patch(&mut obj, &incoming);
                // What identifies the object is not the patch's to change.
                for k in ["name", "namespace", "uid", "creationTimestamp"] {
                    match current["metadata"].get(k) {
                        Some(v) => obj["metadata"][k] = v.clone(),
                        None => {
                            if let Some(m) = obj["metadata"].as_object_mut() {
                                m.remove(k);
                            }
                        }
                    }
                }
                obj
            };
            (obj, "MODIFIED")
        }
    };
    let ev = s.commit(&t.resource, obj, kind);
    let _ = inner.events.send(ev.clone());
    json_response(if kind == "ADDED" { 201 } else { 200 }, &ev.object)
}

/// Whether `incoming` names a resourceVersion other than `current`'s.
fn stale(incoming: &Value, current: &Value) -> bool {
    let want = incoming["metadata"]["resourceVersion"].as_str();
    want.is_some_and(|w| Some(w) != current["metadata"]["resourceVersion"].as_str())
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn watch_response(inner: &Inner, t: Target, query: BTreeMap<String, String>) -> Response<Body> {
    let from: Option<u64> = query
        .get("resourceVersion")
        .filter(|v| !v.is_empty() && *v != "0")
        .and_then(|v| v.parse().ok());
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let mut down = inner.down.subscribe();
    let cuts = down.borrow_and_update().cuts;
    // Subscribe before reading the history so no event falls between the two.
    let mut live = inner.events.subscribe();
    let (initial, mut last, gone) = {
        let s = inner.lock();
        let mut initial = Vec::new();
        match from {
            Some(rv) if rv < s.oldest => {
                let gone = status(
                    410,
                    "Expired",
                    format!("too old resource version: {rv} ({})", s.oldest),
                );
                initial.push(event_line("ERROR", &gone));
            }
            Some(rv) => {
                for ev in s.history.iter().filter(|e| e.rv > rv) {
                    if ev.resource == t.resource && selected(&t, &query, &ev.object) {
                        initial.push(event_line(ev.kind, &ev.object));
                    }
                }
            }
            None => {
                for ((r, _, _), o) in &s.objects {
                    if r == &t.resource && selected(&t, &query, o) {
                        initial.push(event_line("ADDED", o));
                    }
                }
            }
        }
        let gone = from.is_some_and(|rv| rv < s.oldest);
        (initial, s.rv, gone)
    };
    tokio::spawn(async move {
        for line in initial {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        if gone {
            return;
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            let ev = tokio::select! {
                _ = &mut deadline => return,
                _ = tx.closed() => return,
                _ = down.wait_for(|d| d.cuts != cuts) => return,
                ev = live.recv() => ev,
            };
            // Nothing reaches a client once the server is down, even an event already queued.
            if down.borrow().cuts != cuts {
                return;
            }
            match ev {
                Ok(ev) if ev.rv > last => {
                    last = ev.rv;
                    if ev.resource == t.resource
                        && selected(&t, &query, &ev.object)
                        && tx.send(event_line(ev.kind, &ev.object)).await.is_err()
                    {
                        return;
                    }
                }
                Ok(_) => {}
                // A watcher too slow to keep up is cut off, as a real API server does.
                Err(_) => return,
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(|b| Ok::<_, Infallible>(Frame::data(b)));
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        let labels = json!({"a": "1", "b": "2"});
        assert!(labels_match("a=1,b", &labels));
        assert!(labels_match("a==1,c!=3,!c", &labels));
        assert!(!labels_match("a=2", &labels));
        let obj = json!({"metadata": {"name": "x", "namespace": "n"}});
        assert!(fields_match("metadata.name=x,metadata.namespace=n", &obj));
        assert!(!fields_match("metadata.name=y", &obj));
    }

    #[test]
    fn paths() {
        let t = parse_path("/api/v1/namespaces/linkerd/secrets/s").unwrap();
        assert_eq!(
            (
                t.resource.as_str(),
                t.namespace.as_deref(),
                t.name.as_deref()
            ),
            ("v1/secrets", Some("linkerd"), Some("s"))
        );
        let t = parse_path("/apis/workload.linkerd.io/v1beta1/externalworkloads").unwrap();
        assert_eq!(t.resource, "workload.linkerd.io/v1beta1/externalworkloads");
        assert!(t.namespace.is_none() && t.name.is_none());
        assert!(parse_path("/healthz").is_none());
    }

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut v = json!({"a": {"b": 1, "c": 2}, "d": 3});
        merge_patch(&mut v, &json!({"a": {"b": null, "e": 4}, "d": [1]}));
        assert_eq!(v, json!({"a": {"c": 2, "e": 4}, "d": [1]}));
    }
}
