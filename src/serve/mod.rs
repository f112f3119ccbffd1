//! `evax serve`: an HTTP inference server (axum on tokio) for one or more models.
//!
//! Requests pass admission (a bounded number in flight; beyond it `503` with `Retry-After`),
//! have their body read under a size cap, are decoded by content (PNG, JPEG or DICOM) on a
//! bounded pool of blocking threads, and wait for their model's compute thread, which gathers
//! concurrent requests into batches ([`batcher`]). Every error is JSON with a stable code
//! ([`ApiError`]). No request can name a file: inputs are request bodies only.

pub mod batcher;
pub mod metrics;
mod openapi;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::BodyExt;
use tokio::sync::{Semaphore, oneshot};

use self::batcher::{BatchPolicy, Batcher, Job, Output, Work};
use self::metrics::Metrics;
use crate::dicom::DicomFile;
use crate::error::{Error, Result};
use crate::predict::{Predictor, PredictorOptions};
use crate::preprocess::Image;

/// One model to serve: its name in URLs and how to load it.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// The name in `/v1/models/{name}/...`.
    pub name: String,
    /// Checkpoint and loading options.
    pub options: PredictorOptions,
}

impl ModelSpec {
    /// Parse `NAME=CKPT` or `CKPT` (named after the file's stem); names are letters, digits,
    /// `-`, `_` and `.`.
    pub fn parse(spec: &str, options: PredictorOptions) -> Result<Self> {
        let (name, path) = match spec.split_once('=') {
            Some((n, p)) => (n.to_string(), PathBuf::from(p)),
            None => (
                crate::io::file_stem(std::path::Path::new(spec)),
                spec.into(),
            ),
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(Error::Invalid(format!(
                "model name '{name}' (from '{spec}'): use letters, digits, '-', '_' and '.'"
            )));
        }
        Ok(ModelSpec {
            name,
            options: PredictorOptions {
                weights: path,
                ..options
            },
        })
    }
}

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The models.
    pub models: Vec<ModelSpec>,
    /// Address to listen on (port 0: any free port).
    pub addr: SocketAddr,
    /// Bearer token required on `/v1/*` and `/metrics` (none: no authentication).
    pub token: Option<String>,
    /// Largest batch the compute thread gathers.
    pub max_batch: usize,
    /// Longest wait for more requests once one is waiting.
    pub max_wait: Duration,
    /// Requests admitted at once (decoding, queued or computing); beyond it: 503.
    pub queue: usize,
    /// Largest request body in bytes.
    pub body_limit: usize,
    /// Time limit of one request, from admission to the answer.
    pub timeout: Duration,
    /// Threads decoding and preprocessing images at once.
    pub decode_threads: usize,
    /// Probability at or above which a class is a finding (a request may override it).
    pub threshold: f32,
    /// Shut down gracefully on SIGTERM and SIGINT.
    pub handle_signals: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            models: Vec::new(),
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token: None,
            max_batch: 16,
            max_wait: Duration::from_millis(5),
            queue: 256,
            body_limit: 64 << 20,
            timeout: Duration::from_secs(120),
            decode_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            threshold: 0.5,
            handle_signals: false,
        }
    }
}

/// A model as the server holds it.
struct ServedModel {
    name: String,
    predictor: Arc<Predictor>,
    batcher: Batcher,
    checkpoint: String,
    sha256: String,
}

/// What every handler shares.
struct AppState {
    models: BTreeMap<String, ServedModel>,
    token: Option<Vec<u8>>,
    metrics: Arc<Metrics>,
    decode: Arc<Semaphore>,
    queue: i64,
    body_limit: usize,
    timeout: Duration,
    threshold: f32,
    shutting_down: AtomicBool,
}

impl AppState {
    /// A place on the bounded pool of blocking work (decoding, drawing overlays).
    async fn pool_slot(&self) -> ApiResult<tokio::sync::OwnedSemaphorePermit> {
        self.decode.clone().acquire_owned().await.map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the server is shutting down",
            )
        })
    }
}

/// An answer with an error: HTTP status, a stable machine-readable code and a message.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code (`bad_image`, `queue_full`, ...), also the `kind` of the failure metric.
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        let mut r = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"evax\""),
            );
        }
        r
    }
}

type ApiResult<T> = std::result::Result<T, ApiError>;

/// A running server.
pub struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    serving: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    compute: Vec<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Load every model, bind the address and start serving in the background.
    pub fn start(o: ServeOptions) -> Result<Server> {
        if o.models.is_empty() {
            return Err(Error::Invalid("no model to serve (give --weights)".into()));
        }
        let metrics = Arc::new(Metrics::default());
        let policy = BatchPolicy {
            max_batch: o.max_batch.max(1),
            max_wait: o.max_wait,
            capacity: o.queue.max(1),
        };
        let mut models = BTreeMap::new();
        let mut compute = Vec::new();
        for spec in &o.models {
            if models.contains_key(&spec.name) {
                return Err(Error::Invalid(format!(
                    "two models are named '{}' (name them: --weights NAME=CKPT)",
                    spec.name
                )));
            }
            let weights = &spec.options.weights;
            let predictor = Arc::new(Predictor::load(&spec.options)?);
            let sha256 = crate::io::sha256_file(weights).map_err(|e| Error::io(weights, e))?;
            let (batcher, handle) =
                Batcher::start(&spec.name, predictor.clone(), policy, metrics.clone())
                    .map_err(|e| Error::Invalid(format!("cannot start a compute thread: {e}")))?;
            compute.push(handle);
            models.insert(
                spec.name.clone(),
                ServedModel {
                    name: spec.name.clone(),
                    predictor,
                    batcher,
                    checkpoint: weights
                        .file_name()
                        .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
                    sha256,
                },
            );
        }
        let state = Arc::new(AppState {
            models,
            token: o.token.map(|t| t.into_bytes()),
            metrics,
            decode: Arc::new(Semaphore::new(o.decode_threads.max(1))),
            queue: o.queue.max(1) as i64,
            body_limit: o.body_limit,
            timeout: o.timeout,
            threshold: o.threshold,
            shutting_down: AtomicBool::new(false),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("evax-http")
            .enable_all()
            .build()
            .map_err(|e| Error::Invalid(format!("cannot start the async runtime: {e}")))?;
        let listen_error =
            |e: std::io::Error| Error::Invalid(format!("cannot listen on {}: {e}", o.addr));
        let std_listener = std::net::TcpListener::bind(o.addr).map_err(listen_error)?;
        std_listener.set_nonblocking(true).map_err(listen_error)?;
        let addr = std_listener.local_addr().map_err(listen_error)?;
        let listener = {
            let _inside = runtime.enter();
            tokio::net::TcpListener::from_std(std_listener).map_err(listen_error)?
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let app = router(state.clone());
        let signals = o.handle_signals;
        let serving = std::thread::Builder::new()
            .name("evax-serve".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let shutdown = async move {
                        wait_for_stop(stopped, signals).await;
                        state.shutting_down.store(true, Ordering::SeqCst);
                    };
                    axum::serve(listener, app)
                        .with_graceful_shutdown(shutdown)
                        .await
                })
            })
            .map_err(|e| Error::Invalid(format!("cannot start the server thread: {e}")))?;
        Ok(Server {
            addr,
            stop: Some(stop),
            serving: Some(serving),
            compute,
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting connections, answer every request already accepted, then return.
    pub fn shutdown(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.wait()
    }

    /// Serve until stopped (by a signal when `handle_signals` was set), then return once every
    /// accepted request is answered.
    pub fn wait(mut self) -> Result<()> {
        let result = match self.serving.take().map(|h| h.join()) {
            Some(Ok(r)) => r.map_err(|e| Error::Invalid(format!("server: {e}"))),
            Some(Err(_)) => Err(Error::Invalid(
                "the server thread stopped unexpectedly".into(),
            )),
            None => Ok(()),
        };
        // The router (and with it every batcher) is gone: the compute threads finish their
        // queues and end.
        for h in self.compute.drain(..) {
            let _ = h.join();
        }
        result
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn wait_for_stop(stopped: oneshot::Receiver<()>, signals: bool) {
    if !signals {
        let _ = stopped.await;
        return;
    }
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = stopped.await;
                return;
            }
        };
        tokio::select! {
            _ = stopped => {}
            _ = term.recv() => eprintln!("SIGTERM: finishing the accepted requests"),
            _ = tokio::signal::ctrl_c() => eprintln!("interrupted: finishing the accepted requests"),
        }
    }
    #[cfg(not(unix))]
    tokio::select! {
        _ = stopped => {}
        _ = tokio::signal::ctrl_c() => eprintln!("interrupted: finishing the accepted requests"),
    }
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi_json))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{name}/{action}", post(compute))
        .fallback(|| async { not_found() })
        .with_state(state)
}

/// `404 not_found`, closing the connection (the request's body is not read).
fn not_found() -> Response {
    closing(ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint").into_response())
}

/// An answer given before the request's body was read ends the connection: the unread body must
/// not be taken for the next request, and the client must not reuse the connection.
fn closing(mut r: Response) -> Response {
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

async fn healthz() -> Response {
    axum::Json(serde_json::json!({"status": "ok"})).into_response()
}

async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    if s.shutting_down.load(Ordering::SeqCst) {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        )
        .into_response();
    }
    let names: Vec<&String> = s.models.keys().collect();
    axum::Json(serde_json::json!({"status": "ready", "models": names})).into_response()
}

async fn openapi_json(State(s): State<Arc<AppState>>) -> Response {
    axum::Json(openapi::document(s.token.is_some())).into_response()
}

async fn metrics_text(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = check_token(&s, &headers) {
        s.metrics.failure(e.code);
        return e.into_response();
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

async fn list_models(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = check_token(&s, &headers) {
        s.metrics.failure(e.code);
        return e.into_response();
    }
    let models: Vec<serde_json::Value> = s.models.values().map(model_json).collect();
    axum::Json(serde_json::json!({"models": models})).into_response()
}

fn model_json(m: &ServedModel) -> serde_json::Value {
    let p = &m.predictor;
    let labels = p.labels.as_ref();
    serde_json::json!({
        "name": m.name,
        "architecture": p.model.name(),
        "checkpoint": m.checkpoint,
        "checkpoint_sha256": m.sha256,
        "labels": labels.map(|l| l.classes.clone()),
        "activation": labels.map(|l| format!("{:?}", l.activation).to_lowercase()),
        "input_size": [p.preprocess.size.0, p.preprocess.size.1],
        "device": crate::compute::device_name(p.model.device()),
    })
}

/// The bearer token check (constant time in the token's content).
fn check_token(s: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let Some(expected) = &s.token else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or(b"");
    if constant_time_eq(given, expected) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required (Authorization: Bearer TOKEN)",
        ))
    }
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The request parameters every computing endpoint takes.
#[derive(Debug, Default, serde::Deserialize)]
struct Params {
    /// `FINDING` (class name or index) or `top`: Grad-CAM of that class.
    cam: Option<String>,
    /// Findings threshold.
    threshold: Option<f32>,
    /// `json` or `npy` (embed).
    format: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Predict,
    Cam,
    Embed,
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::Predict => "predict",
            Endpoint::Cam => "cam",
            Endpoint::Embed => "embed",
        }
    }
}

/// `POST /v1/models/{name}/{action}`: predict, cam or embed.
async fn compute(
    State(s): State<Arc<AppState>>,
    UrlPath((name, action)): UrlPath<(String, String)>,
    q: std::result::Result<Query<Params>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let endpoint = match action.as_str() {
        "predict" => Endpoint::Predict,
        "cam" => Endpoint::Cam,
        "embed" => Endpoint::Embed,
        _ => return not_found(),
    };
    handle(s, endpoint, name, q, headers, body).await
}

/// Counts a request as in flight while it lives.
struct Admission(Arc<AppState>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(
    s: Arc<AppState>,
    endpoint: Endpoint,
    name: String,
    q: std::result::Result<Query<Params>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let start = Instant::now();
    let known = s.models.contains_key(&name);
    let mut body_read = false;
    let response = match admit_and_run(&s, endpoint, &name, q, &headers, body, &mut body_read).await
    {
        Ok(r) => r,
        Err(e) => {
            s.metrics.failure(e.code);
            if body_read {
                e.into_response()
            } else {
                closing(e.into_response())
            }
        }
    };
    // Unknown names share one label so that clients cannot grow the metrics without bound.
    let model = if known { name.as_str() } else { "(unknown)" };
    s.metrics.request(
        endpoint.name(),
        model,
        response.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    response
}

async fn admit_and_run(
    s: &Arc<AppState>,
    endpoint: Endpoint,
    name: &str,
    q: std::result::Result<Query<Params>, axum::extract::rejection::QueryRejection>,
    headers: &HeaderMap,
    body: Body,
    body_read: &mut bool,
) -> ApiResult<Response> {
    check_token(s, headers)?;
    let m = s.models.get(name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_model",
            format!(
                "no model named '{name}' (served: {})",
                s.models.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        )
    })?;
    let Query(params) =
        q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_parameter", e.body_text()))?;
    if s.shutting_down.load(Ordering::SeqCst) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        ));
    }
    if s.metrics.in_flight.fetch_add(1, Ordering::SeqCst) >= s.queue {
        s.metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "queue_full",
            format!("{} requests are in flight; retry later", s.queue),
        ));
    }
    let _admitted = Admission(s.clone());
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > s.body_limit as u64) {
        return Err(too_large(s.body_limit));
    }
    let plan = plan(s, m, endpoint, &params, headers)?;
    match tokio::time::timeout(s.timeout, run(s, m, plan, body, body_read)).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!("no answer within {:.1} s", s.timeout.as_secs_f64()),
        )),
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("the request body is larger than {limit} bytes"),
    )
}

/// What the request's content was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InputKind {
    Png,
    Jpeg,
    Dicom,
}

impl InputKind {
    fn sniff(bytes: &[u8]) -> Option<Self> {
        if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(InputKind::Png)
        } else if bytes.starts_with(&[0xff, 0xd8]) {
            Some(InputKind::Jpeg)
        } else if crate::dicom::looks_like_dicom(bytes) {
            Some(InputKind::Dicom)
        } else {
            None
        }
    }

    fn name(self) -> &'static str {
        match self {
            InputKind::Png => "png",
            InputKind::Jpeg => "jpeg",
            InputKind::Dicom => "dicom",
        }
    }
}

/// A decoded request.
struct Decoded {
    kind: InputKind,
    input: Vec<f32>,
    original: Option<Image>,
    dicom: Option<DicomFile>,
    steps: Vec<String>,
}

fn wants(headers: &HeaderMap, mime: &str) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|m| m.trim().starts_with(mime)))
}

/// What a request asks for, checked before its body is read.
struct Plan {
    endpoint: Endpoint,
    labels: crate::labels::LabelSet,
    threshold: f32,
    /// `Some(None)`: Grad-CAM of the top class; `Some(Some(c))`: of class c.
    cam: Option<Option<usize>>,
    npy: bool,
    dicom_out: bool,
}

fn plan(
    s: &AppState,
    m: &ServedModel,
    endpoint: Endpoint,
    params: &Params,
    headers: &HeaderMap,
) -> ApiResult<Plan> {
    let labels = match (&m.predictor.labels, endpoint) {
        (Some(l), _) => l.clone(),
        // Weights without a head (MIM pre-training) still embed.
        (None, Endpoint::Embed) => crate::labels::LabelSet {
            name: "none".into(),
            classes: Vec::new(),
            activation: crate::labels::Activation::Sigmoid,
        },
        (None, _) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "no_head",
                "this model has no classification head: use /embed",
            ));
        }
    };
    let threshold = params.threshold.unwrap_or(s.threshold);
    if !threshold.is_finite() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_parameter",
            "threshold must be a number",
        ));
    }
    let cam = match (endpoint, params.cam.as_deref()) {
        (Endpoint::Embed, Some(_)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_parameter",
                "cam is not a parameter of embed",
            ));
        }
        (Endpoint::Embed, None) | (Endpoint::Predict, None) => None,
        (Endpoint::Cam, None) => Some(None),
        (_, Some(c)) => Some(class_choice(c, &labels.classes)?),
    };
    let npy = match params.format.as_deref() {
        None => endpoint == Endpoint::Embed && wants(headers, "application/x-npy"),
        Some("json") => false,
        Some("npy") if endpoint == Endpoint::Embed => true,
        Some(f) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_parameter",
                format!("format '{f}': json, or npy for embed"),
            ));
        }
    };
    Ok(Plan {
        endpoint,
        labels,
        threshold,
        cam,
        npy,
        dicom_out: endpoint != Endpoint::Embed && wants(headers, "application/dicom"),
    })
}

async fn run(
    s: &Arc<AppState>,
    m: &ServedModel,
    plan: Plan,
    body: Body,
    body_read: &mut bool,
) -> ApiResult<Response> {
    let Plan {
        endpoint,
        labels,
        threshold,
        cam: cam_choice,
        npy,
        dicom_out,
    } = plan;
    // The body, under the size cap.
    let bytes = http_body_util::Limited::new(body, s.body_limit)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                too_large(s.body_limit)
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    format!("the request body could not be read: {e}"),
                )
            }
        })?
        .to_bytes();
    *body_read = true;
    if bytes.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "empty_body",
            "the request body is empty: send a PNG, JPEG or DICOM image",
        ));
    }
    let kind = InputKind::sniff(&bytes).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_type",
            "the body is not a PNG, JPEG or DICOM image (recognised by content)",
        )
    })?;
    if dicom_out && kind != InputKind::Dicom {
        return Err(ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            "not_acceptable",
            "DICOM results (Accept: application/dicom) need a DICOM input",
        ));
    }

    // Decode and preprocess on the bounded pool.
    let permit = s.pool_slot().await?;
    let pre = m.predictor.preprocess;
    let keep_original = endpoint == Endpoint::Cam;
    let mut decoded = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        crate::guard::guarded("the image decoder failed", || {
            decode(&bytes, kind, &pre, keep_original, dicom_out)
        })
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
    .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_image", e))?;

    // The model.
    let work = match (endpoint, cam_choice) {
        (Endpoint::Embed, _) => Work::Embed,
        (_, Some(c)) => Work::Cam(c),
        (_, None) => Work::Predict,
    };
    let (tx, rx) = oneshot::channel();
    let job = Job {
        input: std::mem::take(&mut decoded.input),
        work,
        reply: tx,
    };
    m.batcher.submit(job).map_err(|code| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code,
            "the model's queue is full; retry later",
        )
    })?;
    let output = rx
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the model stopped before answering",
            )
        })?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "model_failed", e))?;

    let answer = Answer {
        m,
        labels: &labels,
        threshold,
        decoded,
    };
    match (endpoint, output) {
        (Endpoint::Embed, Output::Pooled(v)) => Ok(answer.embedding(v, npy)),
        (Endpoint::Predict, Output::Logits(l)) => answer.prediction(l, None, dicom_out),
        (Endpoint::Predict, Output::Cam { logits, class, map }) => {
            answer.prediction(logits, Some((class, map)), dicom_out)
        }
        (Endpoint::Cam, Output::Cam { logits, class, map }) => {
            let permit = s.pool_slot().await?;
            let Answer {
                m, labels, decoded, ..
            } = answer;
            let probs = labels.activation.apply(&logits);
            let caption = format!("{} {:.2}", labels.classes[class], probs[class]);
            let what = format!(
                "Grad-CAM of {} (probability {:.3}) by {}",
                labels.classes[class],
                probs[class],
                m.predictor.model.name()
            );
            let pre = m.predictor.preprocess;
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                overlay_response(&decoded, &pre, &map, &caption, &what, dicom_out)
            })
            .await
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })?
        }
        _ => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the model answered another kind of request",
        )),
    }
}

/// A class named by the request: `top`, a class name (any case) or its index.
fn class_choice(c: &str, classes: &[String]) -> ApiResult<Option<usize>> {
    if c.eq_ignore_ascii_case("top") {
        return Ok(None);
    }
    if let Some(i) = classes.iter().position(|n| n.eq_ignore_ascii_case(c)) {
        return Ok(Some(i));
    }
    match c.parse::<usize>() {
        Ok(i) if i < classes.len() => Ok(Some(i)),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "unknown_finding",
            format!(
                "cam '{c}': 'top', a class index below {} or one of {}",
                classes.len(),
                classes.join(", ")
            ),
        )),
    }
}

fn decode(
    bytes: &[u8],
    kind: InputKind,
    pre: &crate::preprocess::Preprocess,
    keep_original: bool,
    keep_dicom: bool,
) -> std::result::Result<Decoded, String> {
    let (img, dicom, steps) = if kind == InputKind::Dicom {
        let f =
            DicomFile::from_bytes(bytes, std::path::Path::new("request")).map_err(|e| e.what)?;
        let (img, steps) = f
            .to_image(0, &crate::dicom::voi::VoiChoice::First)
            .map_err(|e| e.what)?;
        (img, keep_dicom.then_some(f), steps)
    } else {
        (
            Image::decode(bytes).map_err(|e| e.to_string())?,
            None,
            Vec::new(),
        )
    };
    Ok(Decoded {
        kind,
        input: pre.apply(&img),
        original: keep_original.then_some(img),
        dicom,
        steps,
    })
}

/// The pieces of an answer.
struct Answer<'a> {
    m: &'a ServedModel,
    labels: &'a crate::labels::LabelSet,
    threshold: f32,
    decoded: Decoded,
}

impl Answer<'_> {
    fn preprocessing(&self) -> serde_json::Value {
        let p = &self.m.predictor.preprocess;
        serde_json::json!({
            "decoded_as": self.decoded.kind.name(),
            "dicom_steps": self.decoded.steps,
            "resize_shorter_side_to": p.resize_short,
            "interpolation": "bicubic (PIL)",
            "center_crop": [p.size.0, p.size.1],
            "mean": p.norm.mean,
            "std": p.norm.std,
        })
    }

    fn model_fields(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut o = serde_json::Map::new();
        o.insert("model".into(), self.m.name.clone().into());
        o.insert("architecture".into(), self.m.predictor.model.name().into());
        o.insert("checkpoint".into(), self.m.checkpoint.clone().into());
        o.insert("checkpoint_sha256".into(), self.m.sha256.clone().into());
        o.insert("preprocessing".into(), self.preprocessing());
        o
    }

    fn prediction(
        &self,
        logits: Vec<f32>,
        cam: Option<(usize, Vec<f32>)>,
        dicom_out: bool,
    ) -> ApiResult<Response> {
        let probabilities = self.labels.activation.apply(&logits);
        let findings: Vec<&String> = self
            .labels
            .classes
            .iter()
            .zip(&probabilities)
            .filter(|(_, p)| **p >= self.threshold)
            .map(|(c, _)| c)
            .collect();
        if dicom_out {
            let src = self.decoded.dicom.as_ref().ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_ACCEPTABLE,
                    "not_acceptable",
                    "not a DICOM input",
                )
            })?;
            let producer = crate::dicom::results::Producer {
                model: self.m.predictor.model.name(),
                checkpoint: format!("{} (sha256 {})", self.m.checkpoint, self.m.sha256),
                threshold: self.threshold,
            };
            let classes = crate::dicom::results::ClassResult::list(
                &self.labels.classes,
                &probabilities,
                self.threshold,
            );
            let bytes =
                crate::dicom::results::report_bytes(src, &producer, &classes).map_err(|e| {
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                })?;
            return Ok(([(header::CONTENT_TYPE, "application/dicom")], bytes).into_response());
        }
        let mut o = self.model_fields();
        o.insert("labels".into(), serde_json::json!(self.labels.classes));
        o.insert("logits".into(), serde_json::json!(logits));
        o.insert("probabilities".into(), serde_json::json!(probabilities));
        o.insert("threshold".into(), serde_json::json!(self.threshold));
        o.insert("findings".into(), serde_json::json!(findings));
        if let Some((class, map)) = cam {
            let (h, w) = self.m.predictor.preprocess.size;
            let rows: Vec<&[f32]> = map.chunks(w.max(1)).collect();
            o.insert(
                "cam".into(),
                serde_json::json!({
                    "class": self.labels.classes[class],
                    "class_index": class,
                    "probability": probabilities[class],
                    "size": [h, w],
                    "map": rows,
                }),
            );
        }
        Ok(axum::Json(serde_json::Value::Object(o)).into_response())
    }

    fn embedding(&self, pooled: Vec<f32>, npy: bool) -> Response {
        if npy {
            let bytes = crate::io::npy_f32(&[1, pooled.len()], &pooled);
            return ([(header::CONTENT_TYPE, "application/x-npy")], bytes).into_response();
        }
        let mut o = self.model_fields();
        o.insert("dim".into(), pooled.len().into());
        o.insert("pooled".into(), serde_json::json!(pooled));
        axum::Json(serde_json::Value::Object(o)).into_response()
    }
}

fn overlay_response(
    decoded: &Decoded,
    pre: &crate::preprocess::Preprocess,
    map: &[f32],
    caption: &str,
    what: &str,
    dicom_out: bool,
) -> ApiResult<Response> {
    let internal = |e: String| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e);
    let original = decoded
        .original
        .as_ref()
        .ok_or_else(|| internal("the decoded image was not kept".into()))?;
    let geometry = pre.crop_geometry((original.width, original.height));
    let mut pic = crate::explain::overlay::cam_on_original(original, map, geometry);
    pic.caption(caption, (pic.width / 140).clamp(1, 8));
    if dicom_out {
        let src = decoded
            .dicom
            .as_ref()
            .ok_or_else(|| internal("the DICOM source was not kept".into()))?;
        let bytes = crate::dicom::results::secondary_capture_bytes(src, &pic, what)
            .map_err(|e| internal(e.to_string()))?;
        return Ok(([(header::CONTENT_TYPE, "application/dicom")], bytes).into_response());
    }
    let png = pic.png_bytes().map_err(|e| internal(e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_specs_name_their_models() {
        let o = PredictorOptions::default();
        let a = ModelSpec::parse("s=/x/y.pth", o.clone()).unwrap();
        assert_eq!(
            (a.name.as_str(), a.options.weights.as_path()),
            ("s", std::path::Path::new("/x/y.pth"))
        );
        let b = ModelSpec::parse("/x/eva_x_s.pth", o.clone()).unwrap();
        assert_eq!(b.name, "eva_x_s");
        assert!(ModelSpec::parse("a b=/x.pth", o).is_err());
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn findings_are_chosen_by_name_index_or_top() {
        let classes = vec!["Atelectasis".to_string(), "Effusion".to_string()];
        assert_eq!(class_choice("top", &classes).unwrap(), None);
        assert_eq!(class_choice("effusion", &classes).unwrap(), Some(1));
        assert_eq!(class_choice("0", &classes).unwrap(), Some(0));
        let e = class_choice("2", &classes).unwrap_err();
        assert_eq!(e.code, "unknown_finding");
    }

    #[test]
    fn content_is_recognised_by_its_bytes() {
        assert_eq!(
            InputKind::sniff(b"\x89PNG\r\n\x1a\n...."),
            Some(InputKind::Png)
        );
        assert_eq!(InputKind::sniff(&[0xff, 0xd8, 0xff]), Some(InputKind::Jpeg));
        assert_eq!(InputKind::sniff(b"GIF89a"), None);
    }
}
