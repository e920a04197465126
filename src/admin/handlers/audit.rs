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
    if q.limit.is_some_and(|l| !(1..=1000).contains(&l)) {
        return Err(
            Problem::bad_request("limit must be an integer from 1 to 1000")
                .field("limit", "out of range"),
        );
    }
    if p.role != Role::PlatformAdmin {
        let own = p.tenant.clone().unwrap_or_default();
        match &q.tenant {
            Some(t) if *t != own => {
                return Err(Problem::not_found(format!("tenant {t:?} not found")))
            }
            _ => q.tenant = Some(own.clone()),
        }
        // A tenant name can be reused after the tenant is deleted: its users see only the
        // records of the current tenant, from its creation on.
        let tenant = read_object(st, Kind::Tenant, None, &own)?;
        let created = tenant.meta.created_at;
        if q.since.as_ref().is_none_or(|s| *s < created) {
            q.since = Some(created);
        }
    }
    // Decoding up to the scan budget is CPU work: keep it off the async workers.
    let reader = st.reader.clone();
    let page = tokio::task::spawn_blocking(move || reader.audit(&q))
        .await
        .map_err(Problem::internal)??;
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
