//! The retrieval service behind `gca-hng serve`: HTTP on tokio and axum, embedding on a
//! bounded worker pool, retrieval through a [`Gallery`].
//!
//! What it promises under load and bad input:
//! - embedding runs on a fixed pool of threads behind a bounded queue; a request that finds
//!   the queue full gets 503 at once, so memory does not grow with the number of clients;
//! - bodies are capped ([`ServeConfig::max_body_bytes`], 413 beyond), every request has a
//!   deadline (408 past it, which also ends slow uploads), headers must arrive within
//!   [`ServeConfig::header_timeout`], and connections are capped;
//! - a body that is not an image is a 400 that says why;
//! - on shutdown the listener closes, requests in flight are finished and idle connections
//!   closed, up to [`ServeConfig::drain_timeout`];
//! - `/images/` serves gallery images only (see [`images`]).

pub mod images;
pub mod metrics;
pub mod model;
pub mod pool;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::data::loader::ImageStore;
use crate::index::{Gallery, IndexError, SearchMode};
use crate::io::embedding_files::source_line;

use images::{GalleryImages, ImageRefusal};
use metrics::{Gauges, Metrics};
use pool::{JobError, Refused, WorkerPool};

/// Limits and sizes of the service.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Largest request body (an image file or a JSON embedding).
    pub max_body_bytes: usize,
    /// Deadline of a whole request, reading its body included.
    pub request_timeout: Duration,
    /// Time a connection has to send a request's headers.
    pub header_timeout: Duration,
    /// Open connections at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Images waiting for a worker before requests are refused.
    pub queue: usize,
    /// Most images one worker embeds in one forward pass.
    pub batch: usize,
    /// Results when a request does not say.
    pub default_top: usize,
    /// Most results a request may ask for.
    pub max_top: usize,
    /// Longest wait for requests in flight at shutdown.
    pub drain_timeout: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 16 << 20,
            request_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(10),
            max_connections: 256,
            queue: 32,
            batch: 8,
            default_top: 12,
            max_top: 100,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Everything a request handler reads.
pub struct Service {
    gallery: Box<dyn Gallery>,
    images: GalleryImages,
    store: ImageStore,
    pool: WorkerPool,
    metrics: Metrics,
    config: ServeConfig,
    /// Bounds the blocking work besides embedding (searches, thumbnails).
    blocking: Semaphore,
}

impl Service {
    /// `store` must read every gallery source (emoji included when the gallery has them).
    pub fn new(
        gallery: Box<dyn Gallery>,
        store: ImageStore,
        pool: WorkerPool,
        config: ServeConfig,
    ) -> Self {
        let sources: Vec<_> = (0..gallery.rows()).map(|i| gallery.source(i)).collect();
        let images = GalleryImages::new(&sources);
        let blocking = Semaphore::new(4 * pool.threads().max(1));
        Self {
            gallery,
            images,
            store,
            pool,
            metrics: Metrics::default(),
            config,
            blocking,
        }
    }

    pub fn gallery(&self) -> &dyn Gallery {
        self.gallery.as_ref()
    }
}

/// An answer other than 200: a status and a message, sent as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            axum::Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

fn busy() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the server is at capacity; retry shortly",
    )
}

impl From<IndexError> for ApiError {
    fn from(e: IndexError) -> Self {
        let status = match e {
            IndexError::QueryDim { .. }
            | IndexError::NotFinite { .. }
            | IndexError::QueryNotFinite { .. }
            | IndexError::NoRow { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

/// The routes, with limits and metrics around them.
pub fn router(service: Arc<Service>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(prometheus))
        .route("/embed", post(embed))
        .route("/search", post(search))
        .route("/images/{*path}", get(image))
        .layer(middleware::from_fn_with_state(service.clone(), track))
        .layer(DefaultBodyLimit::max(service.config.max_body_bytes))
        .with_state(service)
}

/// Counts and times every request and holds it to the deadline.
async fn track(State(s): State<Arc<Service>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_string();
    let started = Instant::now();
    // A declared length over the limit is refused before any of the body is read (the body
    // limit alone would only stop reading once the limit is reached).
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > s.config.max_body_bytes as u64) {
        let response = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the body is larger than the limit of {} bytes",
                s.config.max_body_bytes
            ),
        )
        .into_response();
        s.metrics
            .request_done(&route, response.status().as_u16(), started.elapsed());
        return response;
    }
    s.metrics.in_flight.fetch_add(1, Ordering::SeqCst);
    let response = match tokio::time::timeout(s.config.request_timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request was not completed within {} s",
                s.config.request_timeout.as_secs_f64()
            ),
        )
        .into_response(),
    };
    let response = as_json_error(response).await;
    s.metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
    s.metrics
        .request_done(&route, response.status().as_u16(), started.elapsed());
    response
}

/// axum's own refusals (a malformed query string, a chunked body past the limit, an unknown
/// route or method) are plain text; a client of this service reads every error as
/// `{"error": "..."}`. Their headers (`Allow` on a 405, for one) are kept.
async fn as_json_error(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    // axum's messages are a line or two; a longer body is not one of them.
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let mut json = ApiError::new(status, message).into_response();
    for (name, value) in &parts.headers {
        if !json.headers().contains_key(name) {
            json.headers_mut().append(name, value.clone());
        }
    }
    json
}

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

async fn health(State(s): State<Arc<Service>>) -> impl IntoResponse {
    axum::Json(serde_json::json!({
        "status": "ok",
        "gallery": s.gallery.describe(),
        "rows": s.gallery.rows(),
        "dim": s.gallery.dim(),
        "workers": s.pool.threads(),
        "queue_capacity": s.pool.capacity(),
        "queued": s.pool.queued(),
    }))
}

async fn prometheus(State(s): State<Arc<Service>>) -> impl IntoResponse {
    let text = s.metrics.render(&Gauges {
        queued: s.pool.queued(),
        queue_capacity: s.pool.capacity(),
        workers: s.pool.threads(),
        gallery_rows: s.gallery.rows(),
    });
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}

/// Embeds an image file's bytes on the pool.
async fn embed_image(s: &Service, body: Bytes) -> Result<Vec<f32>, ApiError> {
    let started = Instant::now();
    let rx = s.pool.submit(body).map_err(|r| match r {
        Refused::Full => {
            s.metrics.rejected.fetch_add(1, Ordering::Relaxed);
            busy()
        }
        Refused::Stopped => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
    })?;
    let result = rx.await.map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the embedding worker stopped",
        )
    })?;
    s.metrics.embed_done(started.elapsed());
    result.map_err(|e| match e {
        JobError::BadImage(d) => ApiError::new(StatusCode::BAD_REQUEST, d.to_string()),
        JobError::Model(m) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m),
        JobError::Stopped => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
    })
}

async fn embed(State(s): State<Arc<Service>>, body: Bytes) -> Result<impl IntoResponse, ApiError> {
    let embedding = embed_image(&s, body).await?;
    Ok(axum::Json(serde_json::json!({
        "dim": embedding.len(),
        "embedding": embedding,
    })))
}

#[derive(Deserialize)]
struct SearchParams {
    k: Option<usize>,
}

/// A JSON search: a query embedding, or a gallery row to search with.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchBody {
    embedding: Option<Vec<f32>>,
    gallery_row: Option<usize>,
    k: Option<usize>,
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"))
}

/// Runs blocking work off the async threads, within the service's bound.
async fn blocking<T: Send + 'static>(
    s: &Arc<Service>,
    work: impl FnOnce(&Service) -> T + Send + 'static,
) -> Result<T, ApiError> {
    let permit = s.blocking.try_acquire().map_err(|_| {
        s.metrics.rejected.fetch_add(1, Ordering::Relaxed);
        busy()
    })?;
    let svc = s.clone();
    let out = tokio::task::spawn_blocking(move || work(&svc))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "a worker task failed"));
    drop(permit);
    out
}

async fn search(
    State(s): State<Arc<Service>>,
    Query(params): Query<SearchParams>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let started = Instant::now();
    let (query, k, kind) = if is_json(&headers) {
        let b: SearchBody = serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "the JSON body must be {{\"embedding\": [numbers]}} or {{\"gallery_row\": n}}, optionally with \"k\": {e}"
                ),
            )
        })?;
        let k = b.k.or(params.k);
        match (b.embedding, b.gallery_row) {
            (Some(e), None) => (e, k, "embedding"),
            (None, Some(row)) => {
                let v = blocking(&s, move |s| s.gallery.vector(row)).await??;
                (v, k, "gallery_row")
            }
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "give exactly one of \"embedding\" and \"gallery_row\"",
                ));
            }
        }
    } else {
        (embed_image(&s, body).await?, params.k, "image")
    };
    let k = k.unwrap_or(s.config.default_top);
    if k == 0 || k > s.config.max_top {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("k must be between 1 and {}", s.config.max_top),
        ));
    }
    let hits = blocking(&s, move |s| s.gallery.search(&query, k, SearchMode::Auto)).await??;
    let results: Vec<serde_json::Value> = hits
        .iter()
        .enumerate()
        .map(|(rank, h)| {
            serde_json::json!({
                "rank": rank + 1,
                "row": h.row,
                "path": source_line(s.gallery.source(h.row)),
                "label": s.gallery.label(h.row),
                "score": h.score,
                "image": s.images.url(h.row),
            })
        })
        .collect();
    Ok(axum::Json(serde_json::json!({
        "query": kind,
        "results": results,
        "took_ms": started.elapsed().as_secs_f64() * 1000.0,
    })))
}

async fn image(
    State(s): State<Arc<Service>>,
    Path(path): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let refusal = |e: ImageRefusal| {
        let status = match e {
            ImageRefusal::Outside => StatusCode::FORBIDDEN,
            ImageRefusal::NotInGallery => StatusCode::NOT_FOUND,
            ImageRefusal::Unreadable(_) => StatusCode::NOT_FOUND,
        };
        ApiError::new(status, e.to_string())
    };
    let row = s.images.row(&path).map_err(refusal)?;
    let png = blocking(&s, move |s| {
        s.images.thumbnail(&s.store, s.gallery.source(row))
    })
    .await?
    .map_err(refusal)?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/png"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        png,
    ))
}

/// Answers HTTP on `listener` until `shutdown` completes, then finishes the requests in flight
/// (up to the drain timeout) and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: Arc<Service>,
    shutdown: impl Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tokio::io::AsyncWriteExt;

    let config = service.config.clone();
    let app = router(service);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = Arc::new(Semaphore::new(config.max_connections));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((mut stream, _)) = accepted else {
                    // Out of file descriptors and the like: pause rather than spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let Ok(permit) = connections.clone().try_acquire_owned() else {
                    tokio::spawn(async move {
                        let _ = stream
                            .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nretry-after: 1\r\nconnection: close\r\n\r\n")
                            .await;
                    });
                    continue;
                };
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(config.header_timeout)
                    .keep_alive(true);
                let svc = hyper_util::service::TowerToHyperService::new(app.clone());
                let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc));
                tokio::spawn(async move {
                    let _ = conn.await;
                    drop(permit);
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(config.drain_timeout, graceful.shutdown()).await;
}
