//! The admin API: JSON over HTTPS under `/admin/v1/`, problem+json errors, bearer-token
//! authentication, four RBAC levels, OpenAPI document generated from the code.
//!
//! Architecture invariant: handlers never write the store; every change is a `state::Command`
//! proposed through [`crate::cluster::Cluster::write`]. Reads go to the applied state.

pub mod auth;
pub mod handlers;
pub mod openapi;
pub mod problem;

use crate::cluster::Cluster;
use crate::store::StateReader;
use auth::{Authenticator, Denials};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use handlers as h;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use problem::Problem;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Shared state of the admin API.
pub struct AppState {
    pub cluster: Cluster,
    pub reader: StateReader,
    pub auth: Arc<dyn Authenticator>,
    pub denials: Arc<Denials>,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub default_ttl_days: u32,
    pub started: Instant,
    pub openapi: String,
    pub metrics: Arc<crate::telemetry::Metrics>,
    /// Seals secrets (certificate keys) before their change is proposed.
    pub sealer: Arc<crate::secrets::Sealer>,
}

/// Per-request facts set by the outer middleware.
#[derive(Clone, Debug)]
pub struct ReqCtx {
    pub request_id: String,
    /// Client IP address.
    pub source: String,
    pub path: String,
    /// Receive time, in the control plane's time format.
    pub time: String,
    pub now: time::OffsetDateTime,
}

/// The peer address of a connection, put in each request's extensions by the server loop.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

/// The current time in the control plane's format.
pub fn now() -> String {
    crate::model::format_time(time::OffsetDateTime::now_utc())
}

fn valid_request_id(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    ok.then(|| s.to_string())
}

/// Outer middleware: request id, client address, body size limit, time limit, access log.
async fn request_context(
    State(st): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let now_t = time::OffsetDateTime::now_utc();
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(valid_request_id)
        .unwrap_or_else(|| crate::pki::random_id("req-").unwrap_or_else(|_| "req-unknown".into()));
    let source = req
        .extensions()
        .get::<Peer>()
        .map(|p| p.0.ip().to_string())
        .unwrap_or_else(|| "unknown".into());
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let ctx = ReqCtx {
        request_id: request_id.clone(),
        source: source.clone(),
        path: path.clone(),
        time: crate::model::format_time(now_t),
        now: now_t,
    };
    let with_ids = |mut p: Problem| {
        p.request_id = Some(ctx.request_id.clone());
        p.instance = Some(ctx.path.clone());
        p.into_response()
    };
    // The time limit covers reading the body too, so a client trickling a body cannot hold a
    // connection and its buffer for ever.
    let handled = async {
        let declared = req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > st.max_body_bytes) {
            return with_ids(Problem::too_large(st.max_body_bytes));
        }
        if matches!(method, Method::POST | Method::PUT | Method::PATCH) {
            let (parts, body) = req.into_parts();
            match h::limited_body(body, st.max_body_bytes).await {
                Ok(bytes) => req = Request::from_parts(parts, axum::body::Body::from(bytes)),
                Err(p) => return with_ids(p),
            }
        }
        req.extensions_mut().insert(ctx.clone());
        next.run(req).await
    };
    let mut resp = match tokio::time::timeout(st.request_timeout, handled).await {
        Ok(r) => r,
        Err(_) => with_ids(Problem::unavailable(
            "the request took too long and was abandoned",
        )),
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    tracing::info!(
        target: "apim::access",
        method = %method,
        path = %path,
        status = resp.status().as_u16(),
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        source = %source,
        request_id = %request_id,
        "admin request"
    );
    resp
}

/// The admin API's routes.
pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/health", get(h::health))
        .route("/openapi.json", get(h::openapi))
        .route("/status", get(h::status))
        .route("/audit", get(h::audit))
        .route("/tenants", get(h::list_tenants).post(h::create_tenant))
        .route(
            "/tenants/{tenant}",
            get(h::get_object::<{ h::TENANTS }>)
                .put(h::put_object::<{ h::TENANTS }>)
                .delete(h::delete_object::<{ h::TENANTS }>),
        )
        .route("/tenants/{tenant}/export", get(h::export_tenant))
        .route(
            "/tenants/{tenant}/diff",
            axum::routing::post(h::diff_tenant),
        )
        .route(
            "/tenants/{tenant}/apply",
            axum::routing::post(h::apply_tenant),
        )
        .route("/tenants/{tenant}/audit", get(h::tenant_audit))
        .route("/tenants/{tenant}/usage", get(h::tenant_usage))
        .route(
            "/tenants/{tenant}/{collection}",
            get(h::list_collection).post(h::create_in_collection),
        )
        .route(
            "/tenants/{tenant}/{collection}/{name}",
            get(h::get_object::<{ h::COLLECTION }>)
                .put(h::put_object::<{ h::COLLECTION }>)
                .delete(h::delete_object::<{ h::COLLECTION }>),
        )
        .route(
            "/tenants/{tenant}/consumers/{consumer}/keys",
            get(h::list_credentials::<false>).post(h::create_credential::<false>),
        )
        .route(
            "/tenants/{tenant}/consumers/{consumer}/keys/{id}",
            get(h::get_credential::<false>)
                .put(h::put_credential::<false>)
                .delete(h::delete_credential::<false>),
        )
        .route(
            "/tenants/{tenant}/users/{user}/tokens",
            get(h::list_credentials::<true>).post(h::create_credential::<true>),
        )
        .route(
            "/tenants/{tenant}/users/{user}/tokens/{id}",
            get(h::get_credential::<true>)
                .put(h::put_credential::<true>)
                .delete(h::delete_credential::<true>),
        )
        .route(
            "/users",
            get(h::list_platform_users).post(h::create_platform_user),
        )
        .route(
            "/users/{user}",
            get(h::get_object::<{ h::PLATFORM_USERS }>)
                .put(h::put_object::<{ h::PLATFORM_USERS }>)
                .delete(h::delete_object::<{ h::PLATFORM_USERS }>),
        )
        .route(
            "/users/{user}/tokens",
            get(h::list_credentials::<true>).post(h::create_credential::<true>),
        )
        .route(
            "/users/{user}/tokens/{id}",
            get(h::get_credential::<true>)
                .put(h::put_credential::<true>)
                .delete(h::delete_credential::<true>),
        );
    Router::new()
        .route("/metrics", get(h::metrics))
        .nest("/admin/v1", v1)
        .fallback(h::not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            request_context,
        ))
        .with_state(state)
}

async fn method_not_allowed(axum::Extension(ctx): axum::Extension<ReqCtx>) -> Response {
    let mut p = Problem::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        "this endpoint does not support this method; see /admin/v1/openapi.json",
    );
    p.request_id = Some(ctx.request_id);
    p.instance = Some(ctx.path);
    p.into_response()
}

/// Serves `app` over TLS on `listener` until `shutdown` turns true, then lets in-flight
/// requests finish for up to `grace`.
/// Connection limits of the admin listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Most connections open at once; more are closed as soon as accepted.
    pub max_connections: usize,
    /// Time allowed for the TLS handshake and for each request's headers.
    pub header_timeout: Duration,
    /// Connections idle this long are closed.
    pub idle_timeout: Duration,
}

pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
    limits: ConnLimits,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper enforces its header read timeout only with a timer: without one a client sending
    // half a header holds the connection for ever.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.idle_timeout))
        .keep_alive_timeout(limits.header_timeout);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(peer = %peer, max = limits.max_connections, "admin connection refused: too many open connections");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            let tls = match tokio::time::timeout(limits.header_timeout, acceptor.accept(tcp)).await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %peer, error = %e, "admin TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %peer, "admin TLS handshake timed out");
                    return;
                }
            };
            let svc = tower::ServiceExt::map_request(
                app,
                move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(Peer(peer));
                    req
                },
            );
            let svc = hyper_util::service::TowerToHyperService::new(svc);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(peer = %peer, error = %e, "admin connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("admin API drained"),
        _ = tokio::time::sleep(grace) => tracing::warn!("admin API drain timed out; closing remaining connections"),
    }
}
