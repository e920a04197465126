//! Node endpoints: health, status, the OpenAPI document, and the 404 fallback.

use super::*;

// Node -------------------------------------------------------------------------------------------

pub async fn health(State(st): St) -> Response {
    if st.cluster.is_healthy() {
        axum::Json(serde_json::json!({"status": "ok"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"status": "no-leader"})),
        )
            .into_response()
    }
}

pub async fn status(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
) -> Response {
    let r = async {
        let p = authn(&st, &ctx, &headers)?;
        let head = st.reader.audit_head()?;
        Ok(axum::Json(serde_json::json!({
            "status": if st.cluster.is_healthy() && st.reader.audit_in_sync() { "healthy" } else { "degraded" },
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": st.started.elapsed().as_secs(),
            "you": {"user": p.user, "role": p.role, "tenant": p.tenant},
            "raft": st.cluster.health(),
            "audit": {"records": head.seq, "head": hex::encode(head.hash), "segments_in_sync": st.reader.audit_in_sync()},
        }))
        .into_response())
    }
    .await;
    respond(&ctx, r)
}

pub async fn openapi(State(st): St) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        st.openapi.clone(),
    )
        .into_response()
}

pub async fn not_found(Extension(ctx): Extension<ReqCtx>) -> Response {
    respond(
        &ctx,
        Err(Problem::not_found(
            "no such endpoint; see /admin/v1/openapi.json",
        )),
    )
}

/// OpenMetrics text exposition of the node's metrics (Prometheus scrapes it) (no authentication: it carries tenant and
/// API names and counts, no secret; the admin listener is on a management address).
pub async fn metrics(State(st): St) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.encode(),
    )
        .into_response()
}
