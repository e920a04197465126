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

// Usage ------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    consumer: Option<String>,
    /// RFC 3339; the hour that holds it is the first one listed (default: the start of the
    /// current UTC month).
    from: Option<String>,
    /// RFC 3339; the hour that holds it is the last one listed (default: now).
    to: Option<String>,
}

#[derive(Serialize)]
struct UsageRow {
    consumer: String,
    api: String,
    /// Start of the hour (RFC 3339).
    hour: String,
    #[serde(flatten)]
    counts: crate::state::UsageCounts,
}

#[derive(Serialize)]
struct UsagePage {
    tenant: String,
    from: String,
    to: String,
    items: Vec<UsageRow>,
    totals: crate::state::UsageCounts,
}

fn hour_of(field: &str, value: &str) -> Result<i64> {
    let t = time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
        .map_err(|_| Problem::invalid(field, &format!("{value:?} is not an RFC 3339 time")))?;
    Ok(t.unix_timestamp().div_euclid(3600))
}

async fn usage_list(
    st: &AppState,
    ctx: &ReqCtx,
    headers: &HeaderMap,
    tenant: &str,
    raw: Option<&str>,
) -> Result<Response> {
    let p = authn(st, ctx, headers)?;
    authz(st, ctx, &p, Some(tenant), Kind::Consumer, Op::Read, false)?;
    // a tenant name can be reused: the counters of an earlier tenant of that name are not shown
    let created = read_object(st, Kind::Tenant, None, tenant)?.meta.created_at;
    let created_hour = hour_of("created_at", &created).unwrap_or(0);
    let q: UsageQuery = serde_urlencoded::from_str(raw.unwrap_or_default())
        .map_err(|e| Problem::bad_request(format!("invalid usage query: {e}")))?;
    if let Some(c) = &q.consumer {
        model::check_name("consumer", c).map_err(|e| Problem::invalid(&e.field, &e.reason))?;
    }
    let now = ctx.now;
    let month_start = now
        .replace_day(1)
        .map(|d| d.replace_time(time::Time::MIDNIGHT))
        .unwrap_or(now);
    let from = match &q.from {
        Some(v) => hour_of("from", v)?,
        None => month_start.unix_timestamp().div_euclid(3600),
    };
    let to = match &q.to {
        Some(v) => hour_of("to", v)?,
        None => now.unix_timestamp().div_euclid(3600),
    };
    if to < from {
        return Err(Problem::invalid("to", "is before from"));
    }
    let listed_from = from.max(created_hour);
    let entries = st
        .reader
        .read(|kv| crate::state::usage(kv, tenant, q.consumer.as_deref(), (listed_from, to)))?;
    let hour_text = |h: i64| {
        time::OffsetDateTime::from_unix_timestamp(h * 3600)
            .map(model::format_time)
            .unwrap_or_default()
    };
    let mut totals = crate::state::UsageCounts::default();
    let items = entries
        .into_iter()
        .map(|e| {
            totals.add(&e.counts);
            UsageRow {
                consumer: e.consumer,
                api: e.api,
                hour: hour_text(e.hour),
                counts: e.counts,
            }
        })
        .collect();
    Ok(axum::Json(UsagePage {
        tenant: tenant.to_string(),
        from: hour_text(from),
        to: hour_text(to),
        items,
        totals,
    })
    .into_response())
}

pub async fn tenant_usage(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(t): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    respond(
        &ctx,
        usage_list(&st, &ctx, &headers, &t, q.as_deref()).await,
    )
}
