//! Admin API handlers. Every handler authenticates, authorises, validates, then either reads the
//! applied state or proposes one `Command` through Raft. This module holds what they share:
//! authentication and authorisation with security-event accounting, the Raft commit and the
//! mapping of its outcome, strict body parsing, ETags, and list paging.

use super::auth::{authorize, secret_prefix, Op, Principal, TOKEN_PREFIX};
use super::problem::{InvalidParam, Problem};
use super::{AppState, ReqCtx};
use crate::model::{
    self, ApiSpec, CertificateSpec, ConsumerSpec, KeySpec, Kind, Object, PlanSpec, Role, Spec,
    SubscriptionSpec, TenantDocument, TenantSpec, TokenSpec, UserSpec,
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

mod audit;
mod credentials;
mod gitops;
mod objects;
mod status;

pub use audit::*;
pub use credentials::*;
pub use gitops::*;
pub use objects::*;
pub use status::*;

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
        credential: Some(p.credential.clone()),
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
            RejectCode::Conflict => match r.field {
                Some(f) => Problem::conflict(r.message.clone()).field(f, r.message),
                None => Problem::conflict(r.message),
            },
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
        Err(e) => {
            let mut p = Problem::unavailable("the change could not be committed; retry later");
            p.cause = Some(e.to_string());
            Err(p)
        }
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
}
