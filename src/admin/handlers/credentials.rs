//! API keys of consumers and API tokens of users: created by the server, shown once, stored
//! as hashes, revocable, bounded in lifetime. Every user may manage its own tokens.

use super::objects::{delete_in, kind_segment, scope_path};
use super::*;
use std::collections::HashMap;

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

/// Authenticates and authorises an action on credentials (every user may manage its own tokens).
fn cred_principal(
    st: &AppState,
    ctx: &ReqCtx,
    headers: &HeaderMap,
    at: CredAt<'_>,
    op: Op,
) -> Result<Principal> {
    let p = authn(st, ctx, headers)?;
    let own = own_token(&p, at.ck, at.tenant, at.parent);
    authz(st, ctx, &p, at.tenant, at.ck.kind(), op, own)?;
    Ok(p)
}

async fn cred_list(
    st: &AppState,
    ctx: &ReqCtx,
    headers: &HeaderMap,
    at: CredAt<'_>,
    raw: Option<&str>,
) -> Result<Response> {
    let CredAt { ck, tenant, parent } = at;
    cred_principal(st, ctx, headers, at, Op::Read)?;
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
    let p = cred_principal(st, ctx, headers, at, Op::Write)?;
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
    let (secret_kind, id_kind) = match ck {
        CredKind::Key => ("apik_", "key-"),
        CredKind::Token => (TOKEN_PREFIX, "tok-"),
    };
    let secret = crate::pki::random_secret(secret_kind).map_err(Problem::internal)?;
    let id = crate::pki::random_id(id_kind).map_err(Problem::internal)?;
    let (prefix, hash) = (secret_prefix(&secret), crate::pki::secret_hash(&secret));
    let spec = match ck {
        CredKind::Key => Spec::Key(KeySpec {
            name: id.clone(),
            consumer: parent.to_string(),
            prefix,
            key_hash: hash,
            expires_at,
            revoked: false,
            description: req.description,
        }),
        CredKind::Token => Spec::Token(TokenSpec {
            name: id.clone(),
            user: parent.to_string(),
            prefix,
            token_hash: hash,
            expires_at,
            revoked: false,
            description: req.description,
        }),
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
    cred_principal(st, ctx, headers, at, Op::Read)?;
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
    let CredAt { ck, tenant, .. } = at;
    let p = cred_principal(st, ctx, headers, at, Op::Write)?;
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
        // Owners may shorten their own token's life, not extend it (nor revive one an
        // administrator expired): extending takes the right to manage the tenant's tokens.
        let may_extend = authorize(&p, tenant, ck.kind(), Op::Write, false).is_ok();
        if e > *expires_at && !may_extend {
            return Err(Problem::forbidden(
                "you may shorten your own token's lifetime, not extend it; ask an administrator",
            ));
        }
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

/// Path parameters of the credential routes: `tenant` (absent for platform users), `consumer`
/// (keys) or `user` (tokens), and `id`.
type CredParams = Path<HashMap<String, String>>;

/// The credential a route names: API keys when `TOKEN` is false, API tokens when true.
fn cred_at<const TOKEN: bool>(p: &HashMap<String, String>) -> CredAt<'_> {
    let ck = if TOKEN {
        CredKind::Token
    } else {
        CredKind::Key
    };
    CredAt {
        ck,
        tenant: p.get("tenant").map(String::as_str),
        parent: p
            .get(ck.parent_field())
            .map(String::as_str)
            .unwrap_or_default(),
    }
}

fn cred_id(p: &HashMap<String, String>) -> &str {
    p.get("id").map(String::as_str).unwrap_or_default()
}

pub async fn list_credentials<const TOKEN: bool>(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(p): CredParams,
    RawQuery(q): RawQuery,
) -> Response {
    let r = cred_list(&st, &ctx, &headers, cred_at::<TOKEN>(&p), q.as_deref()).await;
    respond(&ctx, r)
}

pub async fn create_credential<const TOKEN: bool>(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(p): CredParams,
    body: Bytes,
) -> Response {
    let r = cred_create(&st, &ctx, &headers, cred_at::<TOKEN>(&p), &body).await;
    respond(&ctx, r)
}

pub async fn get_credential<const TOKEN: bool>(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(p): CredParams,
) -> Response {
    let r = cred_get(&st, &ctx, &headers, cred_at::<TOKEN>(&p), cred_id(&p)).await;
    respond(&ctx, r)
}

pub async fn put_credential<const TOKEN: bool>(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(p): CredParams,
    body: Bytes,
) -> Response {
    let r = cred_put(
        &st,
        &ctx,
        &headers,
        cred_at::<TOKEN>(&p),
        cred_id(&p),
        &body,
    )
    .await;
    respond(&ctx, r)
}

pub async fn delete_credential<const TOKEN: bool>(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(p): CredParams,
) -> Response {
    let r = cred_delete(&st, &ctx, &headers, cred_at::<TOKEN>(&p), cred_id(&p)).await;
    respond(&ctx, r)
}
