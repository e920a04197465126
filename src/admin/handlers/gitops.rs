//! Declarative tenant configuration: export, diff, apply (one atomic Raft entry).

use super::*;

// Declarative configuration ---------------------------------------------------------------------

fn wants_yaml(headers: &HeaderMap, q: &BTreeMap<String, String>) -> bool {
    q.get("format").map(String::as_str) == Some("yaml")
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("yaml"))
}

async fn export(
    st: &AppState,
    ctx: &ReqCtx,
    headers: &HeaderMap,
    tenant: &str,
    raw: Option<&str>,
) -> Result<Response> {
    let p = authn(st, ctx, headers)?;
    for kind in [Kind::Api, Kind::Plan, Kind::Consumer, Kind::Subscription] {
        authz(st, ctx, &p, Some(tenant), kind, Op::Read, false)?;
    }
    let q = parse_query(raw)?;
    if let Some(k) = q.keys().find(|k| k.as_str() != "format") {
        return Err(Problem::bad_request(format!(
            "unknown query parameter {k:?}; use format=yaml|json"
        ))
        .field(k.clone(), "unknown parameter"));
    }
    read_object(st, Kind::Tenant, None, tenant)?;
    let doc = st.reader.read(|kv| state::export_document(kv, tenant))?;
    if wants_yaml(headers, &q) {
        let text = serde_norway::to_string(&doc).map_err(Problem::internal)?;
        Ok(([(header::CONTENT_TYPE, "application/yaml")], text).into_response())
    } else {
        Ok(axum::Json(doc).into_response())
    }
}

/// Parses a tenant document (YAML, of which JSON is a subset); errors carry line and column.
pub fn parse_document(body: &[u8], tenant: &str) -> Result<TenantDocument> {
    let doc: TenantDocument = serde_norway::from_slice(body).map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (Some(l.line()), Some(l.column())))
            .unwrap_or((None, None));
        let mut p = Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-document",
            "Invalid document",
            format!("the document is invalid: {e}"),
        );
        p.invalid_params.push(InvalidParam {
            name: "document".into(),
            reason: e.to_string(),
            line,
            column,
        });
        p
    })?;
    checked(doc.check())?;
    if doc.tenant != tenant {
        return Err(Problem::invalid(
            "tenant",
            &format!(
                "the document is for tenant {:?}, the URL names {tenant:?}",
                doc.tenant
            ),
        ));
    }
    Ok(doc)
}

#[derive(Serialize)]
struct ApplyResult {
    tenant: String,
    revision: u64,
    applied: bool,
    #[serde(flatten)]
    diff: state::DocumentDiff,
}

async fn diff_or_apply(
    st: &AppState,
    ctx: &ReqCtx,
    headers: &HeaderMap,
    tenant: &str,
    body: &[u8],
    apply: bool,
) -> Result<Response> {
    let p = authn(st, ctx, headers)?;
    let op = if apply { Op::Write } else { Op::Read };
    for kind in [Kind::Api, Kind::Plan, Kind::Consumer, Kind::Subscription] {
        authz(st, ctx, &p, Some(tenant), kind, op, false)?;
    }
    let doc = parse_document(body, tenant)?;
    let exists = st
        .reader
        .read(|kv| state::get_object(kv, Kind::Tenant, None, tenant))?
        .is_some();
    let may_create = apply && p.role == Role::PlatformAdmin;
    if !exists && !may_create {
        return Err(Problem::not_found(format!("tenant {tenant:?} not found")));
    }
    let diff = st
        .reader
        .read(|kv| state::diff_document(kv, &doc, exists))?;
    let mut revision = st
        .reader
        .read(|kv| state::tenant_revision(kv, Some(tenant)))?;
    let applied = apply && !diff.is_empty();
    if applied {
        let (_, rev) = commit(st, ctx, &p, Some(tenant), "apply", diff.changes.clone()).await.map_err(|mut e| {
            if e.status == 412 {
                e.detail = format!("{}; the tenant changed while the document was being applied, run apply again", e.detail);
            }
            e
        })?;
        revision = rev;
    }
    Ok(axum::Json(ApplyResult {
        tenant: tenant.to_string(),
        revision,
        applied,
        diff,
    })
    .into_response())
}

pub async fn export_tenant(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(t): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    respond(&ctx, export(&st, &ctx, &headers, &t, q.as_deref()).await)
}

pub async fn diff_tenant(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(t): Path<String>,
    body: Bytes,
) -> Response {
    respond(
        &ctx,
        diff_or_apply(&st, &ctx, &headers, &t, &body, false).await,
    )
}

pub async fn apply_tenant(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(t): Path<String>,
    body: Bytes,
) -> Response {
    respond(
        &ctx,
        diff_or_apply(&st, &ctx, &headers, &t, &body, true).await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_errors_carry_the_line() {
        let doc = b"apiVersion: apim/v1\nkind: TenantConfig\ntenant: acme\napis:\n  - name: x\n    hostz: []\n";
        let p = parse_document(doc, "acme").unwrap_err();
        assert_eq!(p.invalid_params[0].line, Some(6), "{:?}", p);
        assert!(p.detail.contains("hostz"));
    }
}
