//! Admin API handlers. Every handler authenticates, authorises, validates, then either reads the
//! applied state or proposes one `Command` through Raft.

use super::auth::{authorize, secret_prefix, Op, Principal, TOKEN_PREFIX};
use super::problem::{InvalidParam, Problem};
use super::{AppState, ReqCtx};
use crate::model::{
    self, ApiSpec, ConsumerSpec, KeySpec, Kind, Object, PlanSpec, Role, Spec, SubscriptionSpec,
    TenantDocument, TenantSpec, TokenSpec, UserSpec,
};
use crate::state::{self, Change, Command, Context, RejectCode, Response as SmResponse};
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

type St = State<Arc<AppState>>;
type Result<T, E = Problem> = std::result::Result<T, E>;

/// Turns a handler result into a response, stamping problems with the request id and path.
fn respond(ctx: &ReqCtx, r: Result<Response>) -> Response {
    match r {
        Ok(r) => r,
        Err(mut p) => {
            if p.status >= 500 {
                tracing::error!(
                    request_id = %ctx.request_id,
                    status = p.status,
                    detail = %p.detail,
                    cause = p.cause.as_deref().unwrap_or(""),
                    "request failed"
                );
            }
            p.request_id = Some(ctx.request_id.clone());
            p.instance = Some(ctx.path.clone());
            p.into_response()
        }
    }
}

/// Authenticates the caller; a failure is answered 401 and counted as a security event.
fn authn(st: &AppState, ctx: &ReqCtx, headers: &HeaderMap) -> Result<Principal> {
    match st.auth.authenticate(headers, &ctx.time) {
        Ok(p) => Ok(p),
        Err(f) => {
            tracing::info!(source = %ctx.source, claimed = %f.claimed, reason = f.reason, request_id = %ctx.request_id, "authentication refused");
            st.denials.record(
                &ctx.source,
                &f.claimed,
                401,
                f.reason,
                None,
                &ctx.path,
                &ctx.time,
            );
            Err(Problem::unauthorized("a valid bearer token is required"))
        }
    }
}

/// Authorises; a 403 is counted as a security event (a 404 for a foreign tenant is not a
/// refusal the caller may learn about, but it is counted too).
fn authz(
    st: &AppState,
    ctx: &ReqCtx,
    p: &Principal,
    tenant: Option<&str>,
    kind: Kind,
    op: Op,
    own_token: bool,
) -> Result<()> {
    authorize(p, tenant, kind, op, own_token).inspect_err(|e| {
        tracing::info!(source = %ctx.source, user = %p.user, status = e.status, request_id = %ctx.request_id, "authorization refused");
        st.denials.record(&ctx.source, &p.user, e.status, &e.detail, p.tenant.as_deref(), &ctx.path, &ctx.time);
    })
}

fn command_ctx(ctx: &ReqCtx, p: &Principal) -> Context {
    Context {
        time: ctx.time.clone(),
        actor: p.user.clone(),
        role: p.role.as_str().to_string(),
        request_id: ctx.request_id.clone(),
        source: ctx.source.clone(),
    }
}

/// Proposes changes through Raft and maps the outcome.
async fn commit(
    st: &AppState,
    ctx: &ReqCtx,
    p: &Principal,
    tenant: Option<&str>,
    action: &str,
    changes: Vec<Change>,
) -> Result<(Vec<Object>, u64)> {
    let cmd = Command::Mutate {
        ctx: command_ctx(ctx, p),
        tenant: tenant.map(str::to_string),
        action: action.to_string(),
        changes,
    };
    match st.cluster.write(cmd).await {
        Ok(SmResponse::Done {
            objects, revision, ..
        }) => Ok((objects, revision)),
        Ok(SmResponse::Rejected(r)) => Err(match r.code {
            RejectCode::NotFound => Problem::not_found(r.message),
            RejectCode::Conflict => Problem::conflict(r.message),
            RejectCode::PreconditionFailed => Problem::precondition_failed(r.message),
            RejectCode::Invalid => match r.field {
                Some(f) => Problem::invalid(&f, &r.message),
                None => Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "validation-failed",
                    "Validation failed",
                    r.message,
                ),
            },
        }),
        Ok(SmResponse::Noop) => Err(Problem::internal("state machine returned no response")),
        Err(e) => Err(Problem::unavailable(e.to_string())),
    }
}

// ---------------------------------------------------------------------------------------------
// Bodies

/// JSON → `Value`, refusing a member repeated in one object (which `Value` would silently
/// resolve as last-one-wins, letting an ambiguous body through).
fn strict_json(body: &[u8]) -> Result<serde_json::Value, serde_json::Error> {
    use serde::de::{Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
    struct Strict(serde_json::Value);
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = serde_json::Value;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON value")
        }
        fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
            Ok(v.into())
        }
        fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
            Ok(v.into())
        }
        fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
            Ok(v.into())
        }
        fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
            Ok(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into))
        }
        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok(v.into())
        }
        fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
            Ok(v.into())
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(serde_json::Value::Null)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(Strict(v)) = seq.next_element()? {
                out.push(v);
            }
            Ok(out.into())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = serde_json::Map::new();
            while let Some(k) = map.next_key::<String>()? {
                let Strict(v) = map.next_value()?;
                if out.contains_key(&k) {
                    return Err(A::Error::custom(format!("duplicate field `{k}`")));
                }
                out.insert(k, v);
            }
            Ok(out.into())
        }
    }
    impl<'de> Deserialize<'de> for Strict {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(V).map(Strict)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let Strict(v) = Strict::deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

/// Parses a JSON body into `T`: 400 for malformed JSON, 422 naming the field for unknown fields
/// and wrong types. Server-maintained fields (version, times) sent back by a client are ignored.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    if body.is_empty() {
        return Err(Problem::malformed(
            "the request body is empty; a JSON object is expected",
        ));
    }
    let mut value: serde_json::Value = strict_json(body).map_err(|e| {
        let mut p = Problem::malformed(format!("the body is not valid JSON: {e}"));
        p.invalid_params.push(InvalidParam {
            name: "body".into(),
            reason: e.to_string(),
            line: Some(e.line()),
            column: Some(e.column()),
        });
        p
    })?;
    if let Some(map) = value.as_object_mut() {
        for f in model::READ_ONLY_FIELDS {
            map.remove(f);
        }
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "body".to_string()
        } else {
            path
        };
        Problem::invalid(&field, &e.inner().to_string())
    })
}

fn checked(r: model::Checked) -> Result<()> {
    r.map_err(|e| Problem::invalid(&e.field, &e.reason))
}

fn require_json(headers: &HeaderMap) -> Result<()> {
    match headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        None => Ok(()),
        Some(ct) if ct.starts_with("application/json") || ct.contains("+json") => Ok(()),
        Some(ct) => Err(Problem::unsupported_media(format!(
            "Content-Type {ct:?} is not supported; send application/json"
        ))),
    }
}

/// The version named by `If-Match` (`"3"` or `W/"3"`); `*` means any.
fn if_match(headers: &HeaderMap) -> Result<Option<u64>> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let s = v.to_str().unwrap_or_default().trim();
    if s == "*" {
        return Ok(None);
    }
    let s = s.strip_prefix("W/").unwrap_or(s);
    s.trim_matches('"').parse::<u64>().map(Some).map_err(|_| {
        Problem::bad_request(format!("If-Match {s:?} is not an ETag of this API"))
            .field("If-Match", "not an ETag")
    })
}

fn required_if_match(headers: &HeaderMap, current: &Object) -> Result<u64> {
    if headers.get(header::IF_MATCH).is_none() {
        return Err(Problem::precondition_required());
    }
    Ok(if_match(headers)?.unwrap_or(current.meta.version))
}

fn object_response(status: StatusCode, obj: &Object, location: Option<String>) -> Response {
    let mut resp = (status, axum::Json(obj.to_json())).into_response();
    if let Ok(v) = HeaderValue::from_str(&obj.etag()) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    if let Some(l) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        resp.headers_mut().insert(header::LOCATION, l);
    }
    resp
}

/// A created credential: its metadata plus the secret, shown this once.
fn secret_response(obj: &Object, field: &str, secret: &str, location: String) -> Response {
    let mut json = obj.to_json();
    if let Some(m) = json.as_object_mut() {
        m.insert(field.to_string(), secret.into());
    }
    let mut resp = (StatusCode::CREATED, axum::Json(json)).into_response();
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&obj.etag()) {
        h.insert(header::ETAG, v);
    }
    if let Ok(l) = HeaderValue::from_str(&location) {
        h.insert(header::LOCATION, l);
    }
    resp
}

fn read_object(st: &AppState, kind: Kind, tenant: Option<&str>, name: &str) -> Result<Object> {
    st.reader
        .read(|kv| state::get_object(kv, kind, tenant, name))?
        .ok_or_else(|| Problem::not_found(format!("{kind} {name:?} not found")))
}

// ---------------------------------------------------------------------------------------------
// Lists

fn parse_query(raw: Option<&str>) -> Result<BTreeMap<String, String>> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or_default())
        .map_err(|e| Problem::bad_request(format!("malformed query string: {e}")))?;
    let mut map = BTreeMap::new();
    for (k, v) in pairs {
        if map.insert(k.clone(), v).is_some() {
            return Err(
                Problem::bad_request(format!("query parameter {k:?} is given twice"))
                    .field(k, "repeated"),
            );
        }
    }
    Ok(map)
}

fn param_usize(
    q: &BTreeMap<String, String>,
    name: &str,
    default: usize,
    max: usize,
) -> Result<usize> {
    match q.get(name) {
        None => Ok(default),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n <= max => Ok(n),
            _ => Err(
                Problem::bad_request(format!("{name} must be an integer from 0 to {max}"))
                    .field(name, "out of range"),
            ),
        },
    }
}

#[derive(Serialize)]
struct Page {
    items: Vec<serde_json::Value>,
    total: usize,
    offset: usize,
    limit: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_offset: Option<usize>,
}

/// Filters, sorts and pages objects: `limit` (1–1000, default 100), `offset`, `sort` (`name`,
/// `created_at`, `updated_at`, `-` for descending), `name_prefix`, and exact-match filters on the
/// kind's filterable fields.
fn page(
    objects: Vec<Object>,
    kind: Kind,
    q: &BTreeMap<String, String>,
    fixed: &[&str],
) -> Result<Response> {
    let limit = param_usize(q, "limit", 100, 1000)?;
    if limit == 0 {
        return Err(
            Problem::bad_request("limit must be an integer from 1 to 1000")
                .field("limit", "out of range"),
        );
    }
    let offset = param_usize(q, "offset", 0, usize::MAX)?;
    let mut filters = Vec::new();
    for (k, v) in q {
        match k.as_str() {
            "limit" | "offset" | "sort" | "name_prefix" => {}
            f if kind.filterable().contains(&f) && !fixed.contains(&f) => {
                filters.push((f, v.as_str()))
            }
            other => {
                return Err(Problem::bad_request(format!(
                    "unknown query parameter {other:?}; use limit, offset, sort, name_prefix{}{}",
                    if kind.filterable().is_empty() {
                        ""
                    } else {
                        ", "
                    },
                    kind.filterable().join(", ")
                ))
                .field(other, "unknown parameter"))
            }
        }
    }
    let prefix = q.get("name_prefix").map(String::as_str).unwrap_or("");
    let mut items: Vec<(Object, serde_json::Value)> = objects
        .into_iter()
        .map(|o| {
            let j = o.to_json();
            (o, j)
        })
        .filter(|(o, j)| {
            o.spec.name().starts_with(prefix)
                && filters.iter().all(|(f, v)| match &j[*f] {
                    serde_json::Value::String(s) => s == v,
                    other => {
                        serde_json::from_str::<serde_json::Value>(v).ok().as_ref() == Some(other)
                    }
                })
        })
        .collect();
    let sort = q.get("sort").map(String::as_str).unwrap_or("name");
    let (desc, field) = match sort.strip_prefix('-') {
        Some(f) => (true, f),
        None => (false, sort),
    };
    match field {
        "name" => items.sort_by_key(|(o, _)| o.spec.name()),
        "created_at" => items.sort_by(|a, b| (&a.0.meta.created_at, a.0.spec.name()).cmp(&(&b.0.meta.created_at, b.0.spec.name()))),
        "updated_at" => items.sort_by(|a, b| (&a.0.meta.updated_at, a.0.spec.name()).cmp(&(&b.0.meta.updated_at, b.0.spec.name()))),
        _ => {
            return Err(Problem::bad_request(format!(
                "sort {sort:?} is not supported; use name, created_at or updated_at, with '-' for descending"
            ))
            .field("sort", "unsupported"))
        }
    }
    if desc {
        items.reverse();
    }
    let total = items.len();
    let items: Vec<serde_json::Value> = items
        .into_iter()
        .skip(offset)
        .take(limit)
        .map(|(_, j)| j)
        .collect();
    let next_offset = (offset + items.len() < total).then_some(offset + items.len());
    Ok(axum::Json(Page {
        items,
        total,
        offset,
        limit,
        next_offset,
    })
    .into_response())
}

// ---------------------------------------------------------------------------------------------
// Collections

/// The URL segment of each tenant-scoped collection.
pub fn collection_kind(collection: &str) -> Option<Kind> {
    match collection {
        "apis" => Some(Kind::Api),
        "consumers" => Some(Kind::Consumer),
        "plans" => Some(Kind::Plan),
        "subscriptions" => Some(Kind::Subscription),
        "users" => Some(Kind::User),
        _ => None,
    }
}

fn parse_spec(kind: Kind, body: &[u8], tenant: Option<&str>) -> Result<Spec> {
    let spec = match kind {
        Kind::Tenant => Spec::Tenant(parse_json::<TenantSpec>(body)?),
        Kind::Api => Spec::Api(parse_json::<ApiSpec>(body)?),
        Kind::Consumer => Spec::Consumer(parse_json::<ConsumerSpec>(body)?),
        Kind::Plan => Spec::Plan(parse_json::<PlanSpec>(body)?),
        Kind::Subscription => {
            let mut v: serde_json::Value = parse_json(body)?;
            if let Some(m) = v.as_object_mut() {
                m.remove("name");
            }
            Spec::Subscription(parse_json::<SubscriptionSpec>(
                &serde_json::to_vec(&v).unwrap_or_default(),
            )?)
        }
        Kind::User => Spec::User(parse_json::<UserSpec>(body)?),
        Kind::Key | Kind::Token => {
            return Err(Problem::not_found(
                "credentials are created under their consumer or user",
            ))
        }
    };
    checked(spec.check(tenant))?;
    Ok(spec)
}

fn scope_path(tenant: Option<&str>) -> String {
    match tenant {
        Some(t) => format!("/admin/v1/tenants/{t}"),
        None => "/admin/v1".to_string(),
    }
}

fn kind_segment(kind: Kind) -> &'static str {
    match kind {
        Kind::Tenant => "tenants",
        Kind::Api => "apis",
        Kind::Consumer => "consumers",
        Kind::Key => "keys",
        Kind::Plan => "plans",
        Kind::Subscription => "subscriptions",
        Kind::User => "users",
        Kind::Token => "tokens",
    }
}

async fn list_in(
    st: &AppState,
    ctx: &ReqCtx,
    headers: &HeaderMap,
    tenant: Option<&str>,
    kind: Kind,
    raw: Option<&str>,
) -> Result<Response> {
    let p = authn(st, ctx, headers)?;
    let q = parse_query(raw)?;
    if kind == Kind::Tenant && p.role != Role::PlatformAdmin {
        // tenant roles see their own tenant only
        let own: Vec<Object> = match &p.tenant {
            Some(t) => st
                .reader
                .read(|kv| state::get_object(kv, Kind::Tenant, None, t))?
                .into_iter()
                .collect(),
            None => Vec::new(),
        };
        return page(own, kind, &q, &[]);
    }
    authz(st, ctx, &p, tenant, kind, Op::Read, false)?;
    if let Some(t) = tenant {
        read_object(st, Kind::Tenant, None, t)?;
    }
    let objects = st.reader.read(|kv| state::list_objects(kv, kind, tenant))?;
    page(objects, kind, &q, &[])
}

async fn create_in(
    st: &AppState,
    ctx: &ReqCtx,
    headers: &HeaderMap,
    tenant: Option<&str>,
    kind: Kind,
    body: &[u8],
) -> Result<Response> {
    let p = authn(st, ctx, headers)?;
    authz(st, ctx, &p, tenant, kind, Op::Write, false)?;
    require_json(headers)?;
    let spec = parse_spec(kind, body, tenant)?;
    let name = spec.name();
    let (objs, _) = commit(
        st,
        ctx,
        &p,
        tenant,
        &format!("{kind}.create"),
        vec![Change::Create(spec)],
    )
    .await?;
    let obj = objs
        .into_iter()
        .next()
        .ok_or_else(|| Problem::internal("no object created"))?;
    let location = format!("{}/{}/{name}", scope_path(tenant), kind_segment(kind));
    Ok(object_response(StatusCode::CREATED, &obj, Some(location)))
}

async fn get_in(
    st: &AppState,
    ctx: &ReqCtx,
    headers: &HeaderMap,
    tenant: Option<&str>,
    kind: Kind,
    name: &str,
) -> Result<Response> {
    let p = authn(st, ctx, headers)?;
    if kind == Kind::Tenant && p.role != Role::PlatformAdmin {
        if p.tenant.as_deref() != Some(name) {
            return Err(Problem::not_found(format!("tenant {name:?} not found")));
        }
    } else {
        authz(st, ctx, &p, tenant, kind, Op::Read, false)?;
    }
    let obj = read_object(st, kind, tenant, name)?;
    Ok(object_response(StatusCode::OK, &obj, None))
}

async fn put_in(
    st: &AppState,
    ctx: &ReqCtx,
    headers: &HeaderMap,
    tenant: Option<&str>,
    kind: Kind,
    name: &str,
    body: &[u8],
) -> Result<Response> {
    let p = authn(st, ctx, headers)?;
    authz(
        st,
        ctx,
        &p,
        authz_scope(kind, tenant, name),
        kind,
        Op::Write,
        false,
    )?;
    require_json(headers)?;
    let current = read_object(st, kind, tenant, name)?;
    let version = required_if_match(headers, &current)?;
    let spec = parse_spec(kind, body, tenant)?;
    if spec.name() != name {
        let field = if kind == Kind::Subscription {
            "consumer"
        } else {
            "name"
        };
        return Err(Problem::invalid(
            field,
            &format!(
                "the body names {:?} but the URL names {name:?}; renaming is not supported",
                spec.name()
            ),
        ));
    }
    let (objs, _) = commit(
        st,
        ctx,
        &p,
        tenant,
        &format!("{kind}.update"),
        vec![Change::Update {
            spec,
            if_version: version,
        }],
    )
    .await?;
    let obj = objs
        .into_iter()
        .next()
        .ok_or_else(|| Problem::internal("no object updated"))?;
    Ok(object_response(StatusCode::OK, &obj, None))
}

async fn delete_in(
    st: &AppState,
    ctx: &ReqCtx,
    headers: &HeaderMap,
    tenant: Option<&str>,
    kind: Kind,
    name: &str,
    own_token: bool,
) -> Result<Response> {
    let p = authn(st, ctx, headers)?;
    authz(
        st,
        ctx,
        &p,
        authz_scope(kind, tenant, name),
        kind,
        Op::Write,
        own_token,
    )?;
    let if_version = if_match(headers)?;
    commit(
        st,
        ctx,
        &p,
        tenant,
        &format!("{kind}.delete"),
        vec![Change::Delete {
            kind,
            name: name.to_string(),
            if_version,
        }],
    )
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The tenant a change is authorised against: a tenant object is its own scope, so that a
/// tenant role touching another tenant gets 404 like for any of that tenant's objects.
fn authz_scope<'a>(kind: Kind, tenant: Option<&'a str>, name: &'a str) -> Option<&'a str> {
    if kind == Kind::Tenant {
        Some(name)
    } else {
        tenant
    }
}

fn kind_of(collection: &str) -> Result<Kind> {
    collection_kind(collection)
        .ok_or_else(|| Problem::not_found(format!("no collection {collection:?}")))
}

// Tenants ---------------------------------------------------------------------------------------

pub async fn list_tenants(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    respond(
        &ctx,
        list_in(&st, &ctx, &headers, None, Kind::Tenant, q.as_deref()).await,
    )
}

pub async fn create_tenant(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    respond(
        &ctx,
        create_in(&st, &ctx, &headers, None, Kind::Tenant, &body).await,
    )
}

pub async fn get_tenant(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(t): Path<String>,
) -> Response {
    respond(
        &ctx,
        get_in(&st, &ctx, &headers, None, Kind::Tenant, &t).await,
    )
}

pub async fn put_tenant(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(t): Path<String>,
    body: Bytes,
) -> Response {
    respond(
        &ctx,
        put_in(&st, &ctx, &headers, None, Kind::Tenant, &t, &body).await,
    )
}

pub async fn delete_tenant(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(t): Path<String>,
) -> Response {
    respond(
        &ctx,
        delete_in(&st, &ctx, &headers, None, Kind::Tenant, &t, false).await,
    )
}

// Tenant collections -----------------------------------------------------------------------------

pub async fn list_collection(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path((t, c)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Response {
    let r =
        async { list_in(&st, &ctx, &headers, Some(&t), kind_of(&c)?, q.as_deref()).await }.await;
    respond(&ctx, r)
}

pub async fn create_in_collection(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path((t, c)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let r = async { create_in(&st, &ctx, &headers, Some(&t), kind_of(&c)?, &body).await }.await;
    respond(&ctx, r)
}

pub async fn get_in_collection(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path((t, c, n)): Path<(String, String, String)>,
) -> Response {
    let r = async { get_in(&st, &ctx, &headers, Some(&t), kind_of(&c)?, &n).await }.await;
    respond(&ctx, r)
}

pub async fn put_in_collection(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path((t, c, n)): Path<(String, String, String)>,
    body: Bytes,
) -> Response {
    let r = async { put_in(&st, &ctx, &headers, Some(&t), kind_of(&c)?, &n, &body).await }.await;
    respond(&ctx, r)
}

pub async fn delete_in_collection(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path((t, c, n)): Path<(String, String, String)>,
) -> Response {
    let r = async { delete_in(&st, &ctx, &headers, Some(&t), kind_of(&c)?, &n, false).await }.await;
    respond(&ctx, r)
}

// Platform users ---------------------------------------------------------------------------------

pub async fn list_platform_users(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    respond(
        &ctx,
        list_in(&st, &ctx, &headers, None, Kind::User, q.as_deref()).await,
    )
}

pub async fn create_platform_user(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    respond(
        &ctx,
        create_in(&st, &ctx, &headers, None, Kind::User, &body).await,
    )
}

pub async fn get_platform_user(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(n): Path<String>,
) -> Response {
    respond(
        &ctx,
        get_in(&st, &ctx, &headers, None, Kind::User, &n).await,
    )
}

pub async fn put_platform_user(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(n): Path<String>,
    body: Bytes,
) -> Response {
    respond(
        &ctx,
        put_in(&st, &ctx, &headers, None, Kind::User, &n, &body).await,
    )
}

pub async fn delete_platform_user(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(n): Path<String>,
) -> Response {
    respond(
        &ctx,
        delete_in(&st, &ctx, &headers, None, Kind::User, &n, false).await,
    )
}

// Credentials: API keys of consumers, API tokens of users ---------------------------------------

/// Body of `POST …/keys` and `POST …/tokens`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCredential {
    /// RFC 3339 expiry; default: now + the node's `default_credential_ttl_days`.
    #[serde(default)]
    pub expires_at: Option<String>,
    /// Lifetime in days, instead of `expires_at`.
    #[serde(default)]
    pub ttl_days: Option<u32>,
    #[serde(default)]
    pub description: Option<String>,
}

/// Body of `PUT …/keys/{id}` and `PUT …/tokens/{id}`: what may change on a credential.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CredentialUpdate {
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub revoked: Option<bool>,
    #[serde(default)]
    pub description: Option<String>,
}

/// Where a credential lives: its kind, tenant and owner (consumer or user).
#[derive(Clone, Copy)]
struct CredAt<'a> {
    ck: CredKind,
    tenant: Option<&'a str>,
    parent: &'a str,
}

#[derive(Clone, Copy, PartialEq)]
enum CredKind {
    Key,
    Token,
}

impl CredKind {
    fn kind(self) -> Kind {
        match self {
            CredKind::Key => Kind::Key,
            CredKind::Token => Kind::Token,
        }
    }
    fn parent_kind(self) -> Kind {
        match self {
            CredKind::Key => Kind::Consumer,
            CredKind::Token => Kind::User,
        }
    }
    fn parent_field(self) -> &'static str {
        match self {
            CredKind::Key => "consumer",
            CredKind::Token => "user",
        }
    }
}

fn cred_parent(o: &Object) -> Option<&str> {
    match &o.spec {
        Spec::Key(k) => Some(&k.consumer),
        Spec::Token(t) => Some(&t.user),
        _ => None,
    }
}

/// Longest lifetime of an API key or token.
const MAX_CREDENTIAL_DAYS: i64 = 3650;

/// An RFC 3339 expiry, normalised, no further than [`MAX_CREDENTIAL_DAYS`] from now.
fn bounded_time(ctx: &ReqCtx, value: &str) -> Result<String> {
    let e = model::normalize_time("expires_at", value)
        .map_err(|e| Problem::invalid(&e.field, &e.reason))?;
    if e > model::format_time(ctx.now + time::Duration::days(MAX_CREDENTIAL_DAYS)) {
        return Err(Problem::invalid(
            "expires_at",
            &format!("must be within {MAX_CREDENTIAL_DAYS} days"),
        ));
    }
    Ok(e)
}

fn expiry(
    st: &AppState,
    ctx: &ReqCtx,
    expires_at: Option<&str>,
    ttl_days: Option<u32>,
) -> Result<String> {
    match (expires_at, ttl_days) {
        (Some(_), Some(_)) => Err(Problem::invalid(
            "ttl_days",
            "give expires_at or ttl_days, not both",
        )),
        (Some(e), None) => {
            let e = bounded_time(ctx, e)?;
            if e <= ctx.time {
                return Err(Problem::invalid("expires_at", "must be in the future"));
            }
            Ok(e)
        }
        (None, ttl) => {
            let days = ttl.unwrap_or(st.default_ttl_days);
            if !(1..=MAX_CREDENTIAL_DAYS as u32).contains(&days) {
                return Err(Problem::invalid(
                    "ttl_days",
                    &format!("must be between 1 and {MAX_CREDENTIAL_DAYS}"),
                ));
            }
            Ok(model::format_time(
                ctx.now + time::Duration::days(i64::from(days)),
            ))
        }
    }
}

fn own_token(p: &Principal, ck: CredKind, tenant: Option<&str>, parent: &str) -> bool {
    ck == CredKind::Token && p.user == parent && p.tenant.as_deref() == tenant
}

async fn cred_list(
    st: &AppState,
    ctx: &ReqCtx,
    headers: &HeaderMap,
    at: CredAt<'_>,
    raw: Option<&str>,
) -> Result<Response> {
    let CredAt { ck, tenant, parent } = at;
    let p = authn(st, ctx, headers)?;
    authz(
        st,
        ctx,
        &p,
        tenant,
        ck.kind(),
        Op::Read,
        own_token(&p, ck, tenant, parent),
    )?;
    read_object(st, ck.parent_kind(), tenant, parent)?;
    let q = parse_query(raw)?;
    let objects: Vec<Object> = st
        .reader
        .read(|kv| state::list_objects(kv, ck.kind(), tenant))?
        .into_iter()
        .filter(|o| cred_parent(o) == Some(parent))
        .collect();
    page(objects, ck.kind(), &q, &[ck.parent_field()])
}

async fn cred_create(
    st: &AppState,
    ctx: &ReqCtx,
    headers: &HeaderMap,
    at: CredAt<'_>,
    body: &[u8],
) -> Result<Response> {
    let CredAt { ck, tenant, parent } = at;
    let p = authn(st, ctx, headers)?;
    authz(
        st,
        ctx,
        &p,
        tenant,
        ck.kind(),
        Op::Write,
        own_token(&p, ck, tenant, parent),
    )?;
    require_json(headers)?;
    let req: NewCredential = if body.is_empty() {
        NewCredential {
            expires_at: None,
            ttl_days: None,
            description: None,
        }
    } else {
        parse_json(body)?
    };
    let expires_at = expiry(st, ctx, req.expires_at.as_deref(), req.ttl_days)?;
    read_object(st, ck.parent_kind(), tenant, parent)?;
    let (secret, spec, id) = match ck {
        CredKind::Key => {
            let secret = crate::pki::random_secret("apik_").map_err(Problem::internal)?;
            let id = crate::pki::random_id("key-").map_err(Problem::internal)?;
            let spec = Spec::Key(KeySpec {
                name: id.clone(),
                consumer: parent.to_string(),
                prefix: secret_prefix(&secret),
                key_hash: crate::pki::secret_hash(&secret),
                expires_at,
                revoked: false,
                description: req.description,
            });
            (secret, spec, id)
        }
        CredKind::Token => {
            let secret = crate::pki::random_secret(TOKEN_PREFIX).map_err(Problem::internal)?;
            let id = crate::pki::random_id("tok-").map_err(Problem::internal)?;
            let spec = Spec::Token(TokenSpec {
                name: id.clone(),
                user: parent.to_string(),
                prefix: secret_prefix(&secret),
                token_hash: crate::pki::secret_hash(&secret),
                expires_at,
                revoked: false,
                description: req.description,
            });
            (secret, spec, id)
        }
    };
    checked(spec.check(tenant))?;
    let (objs, _) = commit(
        st,
        ctx,
        &p,
        tenant,
        &format!("{}.create", ck.kind()),
        vec![Change::Create(spec)],
    )
    .await?;
    let obj = objs
        .into_iter()
        .next()
        .ok_or_else(|| Problem::internal("no credential created"))?;
    let location = format!(
        "{}/{}/{parent}/{}/{id}",
        scope_path(tenant),
        kind_segment(ck.parent_kind()),
        kind_segment(ck.kind())
    );
    let field = if ck == CredKind::Key { "key" } else { "token" };
    Ok(secret_response(&obj, field, &secret, location))
}

fn read_cred(st: &AppState, at: CredAt<'_>, id: &str) -> Result<Object> {
    let CredAt { ck, tenant, parent } = at;
    let obj = read_object(st, ck.kind(), tenant, id)?;
    if cred_parent(&obj) != Some(parent) {
        return Err(Problem::not_found(format!(
            "{} {id:?} not found",
            ck.kind()
        )));
    }
    Ok(obj)
}

async fn cred_get(
    st: &AppState,
    ctx: &ReqCtx,
    headers: &HeaderMap,
    at: CredAt<'_>,
    id: &str,
) -> Result<Response> {
    let CredAt { ck, tenant, parent } = at;
    let p = authn(st, ctx, headers)?;
    authz(
        st,
        ctx,
        &p,
        tenant,
        ck.kind(),
        Op::Read,
        own_token(&p, ck, tenant, parent),
    )?;
    let obj = read_cred(st, at, id)?;
    Ok(object_response(StatusCode::OK, &obj, None))
}

async fn cred_put(
    st: &AppState,
    ctx: &ReqCtx,
    headers: &HeaderMap,
    at: CredAt<'_>,
    id: &str,
    body: &[u8],
) -> Result<Response> {
    let CredAt { ck, tenant, parent } = at;
    let p = authn(st, ctx, headers)?;
    authz(
        st,
        ctx,
        &p,
        tenant,
        ck.kind(),
        Op::Write,
        own_token(&p, ck, tenant, parent),
    )?;
    require_json(headers)?;
    let current = read_cred(st, at, id)?;
    let version = required_if_match(headers, &current)?;
    let upd: CredentialUpdate = parse_json(body)?;
    let expires = match &upd.expires_at {
        // a time in the past is allowed here: it expires the credential now
        Some(e) => Some(bounded_time(ctx, e)?),
        None => None,
    };
    let mut spec = current.spec.clone();
    let (expires_at, revoked, description) = match &mut spec {
        Spec::Key(k) => (&mut k.expires_at, &mut k.revoked, &mut k.description),
        Spec::Token(t) => (&mut t.expires_at, &mut t.revoked, &mut t.description),
        _ => return Err(Problem::internal("credential of unexpected kind")),
    };
    if *revoked && upd.revoked == Some(false) {
        return Err(Problem::invalid(
            "revoked",
            "a revoked credential cannot be re-enabled; create a new one",
        ));
    }
    if let Some(e) = expires {
        *expires_at = e;
    }
    if let Some(r) = upd.revoked {
        *revoked = r;
    }
    if upd.description.is_some() {
        *description = upd.description;
    }
    let (objs, _) = commit(
        st,
        ctx,
        &p,
        tenant,
        &format!("{}.update", ck.kind()),
        vec![Change::Update {
            spec,
            if_version: version,
        }],
    )
    .await?;
    let obj = objs
        .into_iter()
        .next()
        .ok_or_else(|| Problem::internal("no credential updated"))?;
    Ok(object_response(StatusCode::OK, &obj, None))
}

async fn cred_delete(
    st: &AppState,
    ctx: &ReqCtx,
    headers: &HeaderMap,
    at: CredAt<'_>,
    id: &str,
) -> Result<Response> {
    let CredAt { ck, tenant, parent } = at;
    let p = authn(st, ctx, headers)?;
    let own = own_token(&p, ck, tenant, parent);
    authz(st, ctx, &p, tenant, ck.kind(), Op::Write, own)?;
    read_cred(st, at, id)?;
    drop(p);
    delete_in(st, ctx, headers, tenant, ck.kind(), id, own).await
}

pub async fn list_keys(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path((t, c)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Response {
    respond(
        &ctx,
        cred_list(
            &st,
            &ctx,
            &headers,
            CredAt {
                ck: CredKind::Key,
                tenant: Some(&t),
                parent: &c,
            },
            q.as_deref(),
        )
        .await,
    )
}
pub async fn create_key(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path((t, c)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    respond(
        &ctx,
        cred_create(
            &st,
            &ctx,
            &headers,
            CredAt {
                ck: CredKind::Key,
                tenant: Some(&t),
                parent: &c,
            },
            &body,
        )
        .await,
    )
}
pub async fn get_key(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path((t, c, id)): Path<(String, String, String)>,
) -> Response {
    respond(
        &ctx,
        cred_get(
            &st,
            &ctx,
            &headers,
            CredAt {
                ck: CredKind::Key,
                tenant: Some(&t),
                parent: &c,
            },
            &id,
        )
        .await,
    )
}
pub async fn put_key(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path((t, c, id)): Path<(String, String, String)>,
    body: Bytes,
) -> Response {
    respond(
        &ctx,
        cred_put(
            &st,
            &ctx,
            &headers,
            CredAt {
                ck: CredKind::Key,
                tenant: Some(&t),
                parent: &c,
            },
            &id,
            &body,
        )
        .await,
    )
}
pub async fn delete_key(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path((t, c, id)): Path<(String, String, String)>,
) -> Response {
    respond(
        &ctx,
        cred_delete(
            &st,
            &ctx,
            &headers,
            CredAt {
                ck: CredKind::Key,
                tenant: Some(&t),
                parent: &c,
            },
            &id,
        )
        .await,
    )
}
pub async fn list_tokens(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path((t, u)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Response {
    respond(
        &ctx,
        cred_list(
            &st,
            &ctx,
            &headers,
            CredAt {
                ck: CredKind::Token,
                tenant: Some(&t),
                parent: &u,
            },
            q.as_deref(),
        )
        .await,
    )
}
pub async fn create_token(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path((t, u)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    respond(
        &ctx,
        cred_create(
            &st,
            &ctx,
            &headers,
            CredAt {
                ck: CredKind::Token,
                tenant: Some(&t),
                parent: &u,
            },
            &body,
        )
        .await,
    )
}
pub async fn get_token(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path((t, u, id)): Path<(String, String, String)>,
) -> Response {
    respond(
        &ctx,
        cred_get(
            &st,
            &ctx,
            &headers,
            CredAt {
                ck: CredKind::Token,
                tenant: Some(&t),
                parent: &u,
            },
            &id,
        )
        .await,
    )
}
pub async fn put_token(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path((t, u, id)): Path<(String, String, String)>,
    body: Bytes,
) -> Response {
    respond(
        &ctx,
        cred_put(
            &st,
            &ctx,
            &headers,
            CredAt {
                ck: CredKind::Token,
                tenant: Some(&t),
                parent: &u,
            },
            &id,
            &body,
        )
        .await,
    )
}
pub async fn delete_token(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path((t, u, id)): Path<(String, String, String)>,
) -> Response {
    respond(
        &ctx,
        cred_delete(
            &st,
            &ctx,
            &headers,
            CredAt {
                ck: CredKind::Token,
                tenant: Some(&t),
                parent: &u,
            },
            &id,
        )
        .await,
    )
}
pub async fn list_platform_tokens(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(u): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    respond(
        &ctx,
        cred_list(
            &st,
            &ctx,
            &headers,
            CredAt {
                ck: CredKind::Token,
                tenant: None,
                parent: &u,
            },
            q.as_deref(),
        )
        .await,
    )
}
pub async fn create_platform_token(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(u): Path<String>,
    body: Bytes,
) -> Response {
    respond(
        &ctx,
        cred_create(
            &st,
            &ctx,
            &headers,
            CredAt {
                ck: CredKind::Token,
                tenant: None,
                parent: &u,
            },
            &body,
        )
        .await,
    )
}
pub async fn get_platform_token(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path((u, id)): Path<(String, String)>,
) -> Response {
    respond(
        &ctx,
        cred_get(
            &st,
            &ctx,
            &headers,
            CredAt {
                ck: CredKind::Token,
                tenant: None,
                parent: &u,
            },
            &id,
        )
        .await,
    )
}
pub async fn put_platform_token(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path((u, id)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    respond(
        &ctx,
        cred_put(
            &st,
            &ctx,
            &headers,
            CredAt {
                ck: CredKind::Token,
                tenant: None,
                parent: &u,
            },
            &id,
            &body,
        )
        .await,
    )
}
pub async fn delete_platform_token(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path((u, id)): Path<(String, String)>,
) -> Response {
    respond(
        &ctx,
        cred_delete(
            &st,
            &ctx,
            &headers,
            CredAt {
                ck: CredKind::Token,
                tenant: None,
                parent: &u,
            },
            &id,
        )
        .await,
    )
}

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

/// Reads a body with a size limit: 413 problem when over.
pub async fn limited_body(body: Body, limit: usize) -> Result<Bytes> {
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(Problem::too_large(limit))
        }
        Err(e) => Err(Problem::bad_request(format!(
            "could not read the request body: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_errors_name_the_field() {
        let p = parse_json::<ApiSpec>(b"{\"name\": 1}").unwrap_err();
        assert_eq!(p.status, 422);
        assert_eq!(p.invalid_params[0].name, "name");
        let p = parse_json::<ConsumerSpec>(b"{\"name\": \"a\", \"nmae\": 1}").unwrap_err();
        assert_eq!(p.status, 422);
        assert!(p.detail.contains("nmae"), "{}", p.detail);
        let p = parse_json::<ConsumerSpec>(b"{\"name\": ").unwrap_err();
        assert_eq!(p.status, 400);
        // server fields sent back are ignored
        let c: ConsumerSpec =
            parse_json(b"{\"name\": \"a\", \"resource_version\": 3, \"created_at\": \"x\"}")
                .unwrap();
        assert_eq!(c.name, "a");
    }

    #[test]
    fn yaml_errors_carry_the_line() {
        let doc = b"apiVersion: apim/v1\nkind: TenantConfig\ntenant: acme\napis:\n  - name: x\n    hostz: []\n";
        let p = parse_document(doc, "acme").unwrap_err();
        assert_eq!(p.invalid_params[0].line, Some(6), "{:?}", p);
        assert!(p.detail.contains("hostz"));
    }
}
