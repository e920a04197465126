//! Tenants, tenant collections (APIs, consumers, plans, subscriptions, users) and platform
//! users: generic create / read / list / replace / delete with ETags.

use super::*;
use std::collections::HashMap;

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
        "certificates" => Some(Kind::Certificate),
        _ => None,
    }
}

fn parse_spec(
    st: &AppState,
    ctx: &ReqCtx,
    kind: Kind,
    body: &[u8],
    tenant: Option<&str>,
) -> Result<Spec> {
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
        Kind::Certificate => {
            let mut c = parse_json::<CertificateSpec>(body)?;
            seal_certificate(st, ctx, tenant.unwrap_or_default(), &mut c)?;
            Spec::Certificate(c)
        }
        Kind::Key | Kind::Token => {
            return Err(Problem::not_found(
                "credentials are created under their consumer or user",
            ))
        }
    };
    checked(spec.check(tenant))?;
    Ok(spec)
}

/// Reads the certificate's facts from the certificate itself, checks that the private key is
/// the leaf's, and seals the key with the cluster's identity (a key already sealed for this
/// cluster is kept as it is): nothing after this point sees the key in clear.
fn seal_certificate(
    st: &AppState,
    ctx: &ReqCtx,
    tenant: &str,
    c: &mut CertificateSpec,
) -> Result<()> {
    checked(c.describe())?;
    if c.not_after <= crate::model::format_time(ctx.now) {
        return Err(Problem::invalid(
            "certificate",
            &format!("the certificate expired at {}", c.not_after),
        ));
    }
    let sealed = c
        .private_key
        .trim_start()
        .starts_with(crate::secrets::ARMOR_BEGIN);
    let plain = if sealed {
        st.sealer
            .open_for(tenant, &c.private_key)
            .map_err(|e| match e {
                crate::secrets::OpenError::Unreadable => Problem::invalid(
                    "private_key",
                    "is age ciphertext this cluster's identity cannot open",
                ),
                crate::secrets::OpenError::OtherTenant => {
                    Problem::invalid("private_key", "was sealed for another tenant")
                }
            })?
    } else {
        c.private_key.as_bytes().to_vec()
    };
    crate::pki::certified_key(&c.certificate, &plain)
        .map_err(|e| Problem::invalid("private_key", &e))?;
    if !sealed {
        c.private_key = st
            .sealer
            .seal_for(tenant, &plain)
            .map_err(Problem::internal)?;
    }
    Ok(())
}

pub(super) fn scope_path(tenant: Option<&str>) -> String {
    match tenant {
        Some(t) => format!("/admin/v1/tenants/{t}"),
        None => "/admin/v1".to_string(),
    }
}

pub(super) fn kind_segment(kind: Kind) -> &'static str {
    match kind {
        Kind::Tenant => "tenants",
        Kind::Api => "apis",
        Kind::Consumer => "consumers",
        Kind::Key => "keys",
        Kind::Plan => "plans",
        Kind::Subscription => "subscriptions",
        Kind::User => "users",
        Kind::Token => "tokens",
        Kind::Certificate => "certificates",
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
    let spec = parse_spec(st, ctx, kind, body, tenant)?;
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
    let spec = parse_spec(st, ctx, kind, body, tenant)?;
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

pub(super) async fn delete_in(
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

// Single objects: one set of handlers for tenants, tenant collections and platform users ----------

/// Which objects an item route serves (the const parameter of the item handlers).
pub const TENANTS: u8 = 0;
pub const COLLECTION: u8 = 1;
pub const PLATFORM_USERS: u8 = 2;

/// An object named by a route: its scope, kind and name.
struct Target<'a> {
    scope: Option<&'a str>,
    kind: Kind,
    name: &'a str,
}

fn target<const C: u8>(p: &HashMap<String, String>) -> Result<Target<'_>> {
    let get = |k: &str| p.get(k).map(String::as_str).unwrap_or_default();
    Ok(match C {
        TENANTS => Target {
            scope: None,
            kind: Kind::Tenant,
            name: get("tenant"),
        },
        PLATFORM_USERS => Target {
            scope: None,
            kind: Kind::User,
            name: get("user"),
        },
        _ => Target {
            scope: Some(get("tenant")),
            kind: kind_of(get("collection"))?,
            name: get("name"),
        },
    })
}

pub async fn get_object<const C: u8>(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(p): Path<HashMap<String, String>>,
) -> Response {
    let r = async {
        let t = target::<C>(&p)?;
        get_in(&st, &ctx, &headers, t.scope, t.kind, t.name).await
    }
    .await;
    respond(&ctx, r)
}

pub async fn put_object<const C: u8>(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(p): Path<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let r = async {
        let t = target::<C>(&p)?;
        put_in(&st, &ctx, &headers, t.scope, t.kind, t.name, &body).await
    }
    .await;
    respond(&ctx, r)
}

pub async fn delete_object<const C: u8>(
    State(st): St,
    Extension(ctx): Extension<ReqCtx>,
    headers: HeaderMap,
    Path(p): Path<HashMap<String, String>>,
) -> Response {
    let r = async {
        let t = target::<C>(&p)?;
        delete_in(&st, &ctx, &headers, t.scope, t.kind, t.name, false).await
    }
    .await;
    respond(&ctx, r)
}
