//! Audit queries, filtered and paged, scoped to the caller's tenant.

use super::*;

// Audit ------------------------------------------------------------------------------------------

async fn audit_list(
    st: &AppState,
    ctx: &ReqCtx,
    headers: &HeaderMap,
    raw: Option<&str>,
    path_tenant: Option<&str>,
) -> Result<Response> {
    let p = authn(st, ctx, headers)?;
    let mut q: crate::store::AuditQuery = serde_urlencoded::from_str(raw.unwrap_or_default())
        .map_err(|e| Problem::bad_request(format!("invalid audit query: {e}")))?;
    if let Some(t) = path_tenant {
        q.tenant = Some(t.to_string());
    }
    for (field, value) in [("since", &mut q.since), ("until", &mut q.until)] {
        if let Some(v) = value.as_mut() {
            *v = model::normalize_time(field, v)
                .map_err(|e| Problem::invalid(&e.field, &e.reason))?;
        }
    }
    if p.role != Role::PlatformAdmin {
        let own = p.tenant.clone().unwrap_or_default();
        match &q.tenant {
            Some(t) if *t != own => {
                return Err(Problem::not_found(format!("tenant {t:?} not found")))
            }
            _ => q.tenant = Some(own),
        }
    }
    let page = st.reader.audit(&q)?;
    Ok(axum::Json(page).into_response())
}

pub async fn audit(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    respond(
        &ctx,
        audit_list(&st, &ctx, &headers, q.as_deref(), None).await,
    )
}

pub async fn tenant_audit(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(t): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    respond(
        &ctx,
        audit_list(&st, &ctx, &headers, q.as_deref(), Some(&t)).await,
    )
}
