//! Bad input to the admin API, end to end against the real binary: every refusal is a precise
//! problem+json (status, type, the field or document line at fault) and changes nothing, neither
//! the state nor the audit log.

mod common;
use common::*;
use reqwest::Method;
use serde_json::{json, Value};

const JSON: &str = "application/json";
const YAML: &str = "application/yaml";

/// What a refusal must point at.
#[derive(Clone, Copy, Debug)]
enum At<'a> {
    /// No `invalid-params` requirement.
    Nothing,
    /// `invalid-params[0].name` is exactly this.
    Field(&'a str),
    /// `invalid-params[0].name` starts with this.
    FieldPrefix(&'a str),
    /// `invalid-params[0].line` is this 1-based line.
    Line(usize),
}

type Headers<'a> = &'a [(&'a str, &'a str)];
/// (label, path, If-Match headers for a PUT or None for a POST, body, what is at fault)
type Case<'a> = (&'a str, &'a str, Option<Headers<'a>>, Value, At<'a>);

/// Everything a refused request must leave untouched.
#[derive(Debug, PartialEq)]
struct Snapshot {
    audit_records: u64,
    /// The tenant's whole configuration, with its revision.
    export: Value,
    /// Full bodies (spec, resource_version, updated_at) of the objects bad input aims at.
    objects: Vec<(String, Value)>,
    tenants: Value,
    keys: Value,
}

/// Objects the refused requests target.
const WATCHED: &[&str] = &[
    "/admin/v1/tenants/acme",
    "/admin/v1/tenants/acme/apis/payments",
    "/admin/v1/tenants/acme/consumers/app",
    "/admin/v1/tenants/acme/plans/gold",
    "/admin/v1/tenants/acme/subscriptions/app.payments",
];

impl Snapshot {
    async fn take(n: &Node) -> Snapshot {
        let get = |path: &'static str| async move {
            let r = n.admin(Method::GET, path, None).await;
            assert_eq!(r.status, 200, "GET {path}: {:?}", r.body);
            r.body
        };
        let mut objects = Vec::new();
        for p in WATCHED {
            objects.push((p.to_string(), get(p).await));
        }
        Snapshot {
            audit_records: n.audit_seq().await,
            export: get("/admin/v1/tenants/acme/export").await,
            objects,
            tenants: get("/admin/v1/tenants").await,
            keys: get("/admin/v1/tenants/acme/consumers/app/keys").await,
        }
    }

    async fn unchanged(&self, n: &Node, label: &str) {
        let now = Snapshot::take(n).await;
        assert_eq!(
            self.audit_records, now.audit_records,
            "{label}: the audit log grew"
        );
        assert_eq!(*self, now, "{label}: the state changed");
    }
}

/// Asserts that `r` is the problem+json refusal described, and returns its body.
fn refused(label: &str, r: &Resp, status: u16, slug: &str, at: At) -> Value {
    assert_eq!(r.status, status, "{label}: {:?}", r.body);
    let ct = r
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert_eq!(ct, "application/problem+json", "{label}");
    let b = &r.body;
    assert_eq!(
        b["type"],
        format!("urn:apim:problem:{slug}"),
        "{label}: {b}"
    );
    assert_eq!(b["status"], status, "{label}: {b}");
    assert!(
        b["title"].is_string() && b["detail"].is_string(),
        "{label}: {b}"
    );
    assert!(
        b["request_id"].as_str().is_some_and(|s| !s.is_empty()),
        "{label}: {b}"
    );
    let p0 = &b["invalid-params"][0];
    match at {
        At::Nothing => {}
        At::Field(f) => assert_eq!(p0["name"], f, "{label}: {b}"),
        At::FieldPrefix(f) => assert!(
            p0["name"].as_str().is_some_and(|n| n.starts_with(f)),
            "{label}: expected a field under {f:?}: {b}"
        ),
        At::Line(l) => assert_eq!(p0["line"], l, "{label}: {b}"),
    }
    if !matches!(at, At::Nothing) {
        assert!(p0["reason"].is_string(), "{label}: {b}");
    }
    b.clone()
}

/// A raw request with the admin token.
async fn raw(
    n: &Node,
    m: Method,
    path: &str,
    body: impl Into<Vec<u8>>,
    ct: &str,
    h: &[(&str, &str)],
) -> Resp {
    n.raw(m, path, Some(&n.token), body.into(), ct, h).await
}

fn with(mut v: Value, key: &str, val: Value) -> Value {
    v[key] = val;
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_headers_and_queries_change_nothing() {
    let n = Node::start().await;
    seed_tenant(&n, "acme").await;
    let r = n
        .admin(
            Method::POST,
            "/admin/v1/tenants/acme/consumers/app/keys",
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status, 201);
    let consumers = "/admin/v1/tenants/acme/consumers";
    let app = "/admin/v1/tenants/acme/consumers/app";
    let apis = "/admin/v1/tenants/acme/apis";
    let payments = "/admin/v1/tenants/acme/apis/payments";
    let v1: &[(&str, &str)] = &[("if-match", "\"1\"")];
    let before = Snapshot::take(&n).await;
    assert!(before.audit_records >= 6);

    // --- malformed JSON: 400, the position in the body
    for (method, path, body, h) in [
        (Method::POST, consumers, &b"{\"name\": \"x\","[..], &[][..]),
        (Method::POST, consumers, b"{\"name\" \"x\"}", &[]),
        (Method::PUT, app, b"{\"name\": \"app\"", v1),
        (Method::POST, apis, b"not json at all", &[]),
    ] {
        let label = format!("malformed {method} {path}");
        let r = raw(&n, method, path, body, JSON, h).await;
        let b = refused(&label, &r, 400, "malformed-body", At::Field("body"));
        assert!(
            b["invalid-params"][0]["line"].as_u64().is_some(),
            "{label}: {b}"
        );
        before.unchanged(&n, &label).await;
    }
    let r = raw(&n, Method::POST, consumers, "", JSON, &[]).await;
    refused("empty body", &r, 400, "malformed-body", At::Nothing);
    before.unchanged(&n, "empty body").await;

    // --- unknown fields, wrong types, invalid values: 422 naming the field
    let api = api_json("orders");
    let policy = |p: Value| with(api_json("orders"), "policies", json!([p]));
    let cases: Vec<Case> = vec![
        // unknown fields, top level and nested
        (
            "unknown field",
            consumers,
            None,
            json!({"name": "c1", "nmae": "x"}),
            At::Field("nmae"),
        ),
        (
            "unknown field on PUT",
            app,
            Some(v1),
            json!({"name": "app", "colour": "red"}),
            At::Field("colour"),
        ),
        (
            "unknown nested field",
            apis,
            None,
            with(
                api.clone(),
                "upstream",
                json!({"targets": [{"url": "http://10.0.0.1:80", "wieght": 2}]}),
            ),
            At::Field("upstream.targets[0].wieght"),
        ),
        (
            "unknown policy field",
            apis,
            None,
            policy(json!({"type": "api-key", "hedaer": "x"})),
            At::FieldPrefix("policies[0]"),
        ),
        (
            "unknown policy type",
            apis,
            None,
            policy(json!({"type": "magic"})),
            At::FieldPrefix("policies[0]"),
        ),
        // wrong types
        (
            "wrong type",
            consumers,
            None,
            json!({"name": 42}),
            At::Field("name"),
        ),
        (
            "wrong type on PUT",
            payments,
            Some(v1),
            with(api_json("payments"), "hosts", json!("api.bank.example")),
            At::Field("hosts"),
        ),
        (
            "nested wrong type",
            "/admin/v1/tenants/acme/plans",
            None,
            json!({"name": "p1", "rate_limit": {"requests": "many", "per_seconds": 1}}),
            At::Field("rate_limit.requests"),
        ),
        (
            "wrong type in a policy",
            apis,
            None,
            policy(json!({"type": "rate-limit", "requests": "many", "per_seconds": 60})),
            At::FieldPrefix("policies[0]"),
        ),
        (
            "wrong type in a policy on PUT",
            payments,
            Some(v1),
            with(
                api_json("payments"),
                "policies",
                json!([{"type": "api-key", "header": "x-api-key"}, {"type": "cors", "allow_origins": "*"}]),
            ),
            At::FieldPrefix("policies[1]"),
        ),
        // semantic checks of policies
        (
            "bad CIDR in a policy",
            apis,
            None,
            policy(json!({"type": "ip-filter", "allow": ["10.0.0.0/33"]})),
            At::Field("policies[0].allow[0]"),
        ),
        (
            "forbidden JWT algorithm",
            apis,
            None,
            policy(
                json!({"type": "jwt", "issuer": "i", "audience": "a", "jwks_url": "https://idp.example/jwks", "algorithms": ["HS256"]}),
            ),
            At::Field("policies[0].algorithms[0]"),
        ),
        (
            "header injection in a policy",
            apis,
            None,
            policy(
                json!({"type": "request-headers", "add": [{"name": "x-a", "value": "1\r\nx-b: 2"}]}),
            ),
            At::Field("policies[0].add[0].value"),
        ),
        // names
        (
            "invalid name",
            consumers,
            None,
            json!({"name": "Bad_Name"}),
            At::Field("name"),
        ),
        (
            "invalid API name",
            apis,
            None,
            api_json("Bad_Name"),
            At::Field("name"),
        ),
        (
            "invalid tenant name",
            "/admin/v1/tenants",
            None,
            json!({"name": "Acme Corp"}),
            At::Field("name"),
        ),
        (
            "name too long",
            consumers,
            None,
            json!({"name": "x".repeat(64)}),
            At::Field("name"),
        ),
        (
            "renaming on PUT",
            app,
            Some(v1),
            json!({"name": "app2"}),
            At::Field("name"),
        ),
        // API routing and upstream
        (
            "base_path without /",
            apis,
            None,
            with(api.clone(), "base_path", json!("orders")),
            At::Field("base_path"),
        ),
        (
            "base_path with ..",
            apis,
            None,
            with(api.clone(), "base_path", json!("/a/../b")),
            At::Field("base_path"),
        ),
        (
            "base_path on PUT",
            payments,
            Some(v1),
            with(api_json("payments"), "base_path", json!("/pay ments")),
            At::Field("base_path"),
        ),
        (
            "host with a space",
            apis,
            None,
            with(api.clone(), "hosts", json!(["ok.example", "bad host"])),
            At::Field("hosts[1]"),
        ),
        (
            "host wildcard",
            apis,
            None,
            with(api.clone(), "hosts", json!(["a.*.example"])),
            At::Field("hosts[0]"),
        ),
        (
            "no hosts",
            apis,
            None,
            with(api.clone(), "hosts", json!([])),
            At::Field("hosts"),
        ),
        (
            "upstream scheme",
            apis,
            None,
            with(
                api.clone(),
                "upstream",
                json!({"targets": [{"url": "ftp://10.0.0.1"}]}),
            ),
            At::Field("upstream.targets[0].url"),
        ),
        (
            "upstream not a URL",
            payments,
            Some(v1),
            with(
                api_json("payments"),
                "upstream",
                json!({"targets": [{"url": "http://x"}, {"url": "localhost:9000"}]}),
            ),
            At::Field("upstream.targets[1].url"),
        ),
        (
            "upstream weight",
            apis,
            None,
            with(
                api.clone(),
                "upstream",
                json!({"targets": [{"url": "http://10.0.0.1", "weight": 0}]}),
            ),
            At::Field("upstream.targets[0].weight"),
        ),
        (
            "control characters",
            consumers,
            None,
            json!({"name": "c3", "display_name": "a\u{0}b"}),
            At::Field("display_name"),
        ),
        (
            "number out of range",
            "/admin/v1/tenants/acme/plans",
            None,
            json!({"name": "p2", "rate_limit": {"requests": 100_000_000_000_u64, "per_seconds": 1}}),
            At::Field("rate_limit.requests"),
        ),
        (
            "renaming a subscription on PUT",
            "/admin/v1/tenants/acme/subscriptions/app.payments",
            Some(v1),
            json!({"consumer": "other", "api": "payments", "plan": "gold"}),
            At::Field("consumer"),
        ),
        (
            "key with both expiries",
            "/admin/v1/tenants/acme/consumers/app/keys",
            None,
            json!({"ttl_days": 3, "expires_at": "2099-01-01T00:00:00Z"}),
            At::Field("ttl_days"),
        ),
        (
            "key with an unknown field",
            "/admin/v1/tenants/acme/consumers/app/keys",
            None,
            json!({"ttl_days": 3, "scope": "all"}),
            At::Field("scope"),
        ),
        (
            "contact e-mail",
            consumers,
            None,
            json!({"name": "c2", "contact_email": "nobody"}),
            At::Field("contact_email"),
        ),
        (
            "subscription to a missing API",
            "/admin/v1/tenants/acme/subscriptions",
            None,
            json!({"consumer": "app", "api": "ghost", "plan": "gold"}),
            At::Field("api"),
        ),
        (
            "key expiry in the past",
            "/admin/v1/tenants/acme/consumers/app/keys",
            None,
            json!({"expires_at": "2001-01-01T00:00:00Z"}),
            At::Field("expires_at"),
        ),
        (
            "key ttl out of range",
            "/admin/v1/tenants/acme/consumers/app/keys",
            None,
            json!({"ttl_days": 0}),
            At::Field("ttl_days"),
        ),
        (
            "platform user with a tenant role",
            "/admin/v1/users",
            None,
            json!({"name": "ops", "role": "viewer"}),
            At::Field("role"),
        ),
    ];
    for (label, path, if_match, body, at) in cases {
        let (method, h) = match if_match {
            Some(h) => (Method::PUT, h),
            None => (Method::POST, &[][..]),
        };
        let r = n.req(method, path, Some(&n.token), Some(body), h).await;
        refused(label, &r, 422, "validation-failed", at);
        before.unchanged(&n, label).await;
    }

    // --- credentials: a bad update of a key names the field and leaves the key alone
    let keys = "/admin/v1/tenants/acme/consumers/app/keys";
    let key = n.admin(Method::GET, keys, None).await.body["items"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let key_path = format!("{keys}/{key}");
    for (label, body, field) in [
        (
            "key update, unknown field",
            json!({"revokd": true}),
            "revokd",
        ),
        (
            "key update, wrong type",
            json!({"revoked": "yes"}),
            "revoked",
        ),
        (
            "key update, bad time",
            json!({"expires_at": "2030-13-45"}),
            "expires_at",
        ),
    ] {
        let r = n
            .req(Method::PUT, &key_path, Some(&n.token), Some(body), v1)
            .await;
        refused(label, &r, 422, "validation-failed", At::Field(field));
        before.unchanged(&n, label).await;
    }

    // --- bodies that are not JSON text
    let deep = format!("{}{}", "[".repeat(500), "]".repeat(500));
    for (label, body) in [
        ("invalid UTF-8", b"{\"name\": \"\xff\xfe\"}".to_vec()),
        ("nesting too deep", deep.into_bytes()),
    ] {
        let r = raw(&n, Method::POST, consumers, body, JSON, &[]).await;
        refused(label, &r, 400, "malformed-body", At::Field("body"));
        before.unchanged(&n, label).await;
    }

    // --- wrong method, unknown collection, malformed query string
    let r = raw(&n, Method::PATCH, app, r#"{"name":"app"}"#, JSON, &[]).await;
    refused("PATCH", &r, 405, "method-not-allowed", At::Nothing);
    let r = n
        .admin(
            Method::POST,
            "/admin/v1/tenants/acme/widgets",
            Some(json!({"name": "w"})),
        )
        .await;
    refused("unknown collection", &r, 404, "not-found", At::Nothing);
    let r = n
        .admin(Method::GET, &format!("{apis}?limit=%ZZ"), None)
        .await;
    refused("malformed query", &r, 400, "bad-request", At::Nothing);
    before.unchanged(&n, "method, collection, query").await;

    // --- body size: over the 1 MiB limit is 413 before anything else; just under it is parsed
    let big = |size: usize| {
        let pad = size - r#"{"name":"big","description":""}"#.len();
        format!(r#"{{"name":"big","description":"{}"}}"#, "a".repeat(pad)).into_bytes()
    };
    let mib = 1024 * 1024;
    assert_eq!(big(mib + 1).len(), mib + 1);
    for (method, path, h) in [(Method::POST, consumers, &[][..]), (Method::PUT, app, v1)] {
        let label = format!("oversize {method}");
        let r = raw(&n, method, path, big(mib + 1), JSON, h).await;
        refused(&label, &r, 413, "body-too-large", At::Nothing);
        before.unchanged(&n, &label).await;
    }
    let r = raw(&n, Method::POST, consumers, big(mib - 16), JSON, &[]).await;
    refused(
        "large but allowed",
        &r,
        422,
        "validation-failed",
        At::Field("description"),
    );
    before.unchanged(&n, "large but allowed").await;

    // --- preconditions
    let body = with(api_json("payments"), "display_name", json!("Payments"));
    let r = n
        .req(
            Method::PUT,
            payments,
            Some(&n.token),
            Some(body.clone()),
            &[],
        )
        .await;
    refused(
        "missing If-Match",
        &r,
        428,
        "if-match-required",
        At::Field("If-Match"),
    );
    before.unchanged(&n, "missing If-Match").await;
    for (label, etag) in [
        ("stale If-Match", "\"7\""),
        ("stale weak If-Match", "W/\"0\""),
    ] {
        let r = n
            .req(
                Method::PUT,
                payments,
                Some(&n.token),
                Some(body.clone()),
                &[("if-match", etag)],
            )
            .await;
        refused(label, &r, 412, "stale-version", At::Nothing);
        before.unchanged(&n, label).await;
    }
    for etag in ["garbage", "\"one\"", "\"-1\""] {
        let label = format!("If-Match {etag}");
        let r = n
            .req(
                Method::PUT,
                payments,
                Some(&n.token),
                Some(body.clone()),
                &[("if-match", etag)],
            )
            .await;
        refused(&label, &r, 400, "bad-request", At::Field("If-Match"));
        before.unchanged(&n, &label).await;
    }
    // DELETE honours If-Match when given (the subscription has no dependants)
    let sub = "/admin/v1/tenants/acme/subscriptions/app.payments";
    let r = n
        .req(
            Method::DELETE,
            sub,
            Some(&n.token),
            None,
            &[("if-match", "\"9\"")],
        )
        .await;
    refused(
        "stale If-Match on DELETE",
        &r,
        412,
        "stale-version",
        At::Nothing,
    );
    before.unchanged(&n, "stale If-Match on DELETE").await;
    let r = n
        .req(
            Method::DELETE,
            sub,
            Some(&n.token),
            None,
            &[("if-match", "nope")],
        )
        .await;
    refused(
        "garbage If-Match on DELETE",
        &r,
        400,
        "bad-request",
        At::Field("If-Match"),
    );
    before.unchanged(&n, "garbage If-Match on DELETE").await;

    // --- content type
    for (method, path, ct, h) in [
        (Method::POST, consumers, "text/plain", &[][..]),
        (
            Method::POST,
            consumers,
            "application/x-www-form-urlencoded",
            &[],
        ),
        (Method::PUT, app, "application/xml", v1),
        (
            Method::POST,
            "/admin/v1/tenants/acme/consumers/app/keys",
            "text/plain",
            &[],
        ),
    ] {
        let label = format!("{ct} to {method} {path}");
        let r = raw(&n, method, path, r#"{"name":"ct"}"#, ct, h).await;
        refused(&label, &r, 415, "unsupported-media-type", At::Nothing);
        before.unchanged(&n, &label).await;
    }

    // --- query parameters of lists
    for (query, field) in [
        ("colour=red", "colour"),
        ("consumer=app", "consumer"),
        ("limit=1001", "limit"),
        ("limit=-1", "limit"),
        ("limit=ten", "limit"),
        ("offset=-5", "offset"),
        ("sort=colour", "sort"),
        ("limit=5&limit=6", "limit"),
    ] {
        let label = format!("list apis?{query}");
        let r = n.admin(Method::GET, &format!("{apis}?{query}"), None).await;
        refused(&label, &r, 400, "bad-request", At::Field(field));
        before.unchanged(&n, &label).await;
    }
    let r = n
        .admin(Method::GET, "/admin/v1/audit?colour=red", None)
        .await;
    refused("audit?colour", &r, 400, "bad-request", At::Nothing);
    let r = n
        .admin(Method::GET, "/admin/v1/audit?since=yesterday", None)
        .await;
    refused(
        "audit?since",
        &r,
        422,
        "validation-failed",
        At::Field("since"),
    );
    let r = n
        .admin(
            Method::GET,
            "/admin/v1/tenants/acme/export?colour=red",
            None,
        )
        .await;
    refused("export?colour", &r, 400, "bad-request", At::Field("colour"));
    // the limits themselves are accepted
    let r = n
        .admin(
            Method::GET,
            &format!("{apis}?limit=1000&lifecycle=draft"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["total"], 1);
    before.unchanged(&n, "queries").await;

    // --- lifecycle: published → draft is not a transition
    let r = n
        .req(
            Method::PUT,
            payments,
            Some(&n.token),
            Some(with(api_json("payments"), "lifecycle", json!("published"))),
            v1,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.etag(), "\"2\"");
    let before = Snapshot::take(&n).await;
    for (lifecycle, etag) in [("draft", "\"2\""), ("retired", "\"2\"")] {
        let label = format!("published → {lifecycle}");
        let r = n
            .req(
                Method::PUT,
                payments,
                Some(&n.token),
                Some(with(api_json("payments"), "lifecycle", json!(lifecycle))),
                &[("if-match", etag)],
            )
            .await;
        refused(&label, &r, 422, "validation-failed", At::Field("lifecycle"));
        before.unchanged(&n, &label).await;
    }
    let r = n
        .admin(
            Method::POST,
            apis,
            Some(with(api_json("orders"), "lifecycle", json!("bogus"))),
        )
        .await;
    refused(
        "unknown lifecycle",
        &r,
        422,
        "validation-failed",
        At::Field("lifecycle"),
    );
    before.unchanged(&n, "unknown lifecycle").await;

    // --- conflicts: deleting what is still referenced, creating what exists
    for (label, path) in [
        ("delete a subscribed consumer", app),
        ("delete a subscribed API", payments),
        ("delete a plan in use", "/admin/v1/tenants/acme/plans/gold"),
        ("delete a non-empty tenant", "/admin/v1/tenants/acme"),
    ] {
        let r = n.admin(Method::DELETE, path, None).await;
        refused(label, &r, 409, "conflict", At::Nothing);
        before.unchanged(&n, label).await;
    }
    for (label, path, body) in [
        ("duplicate consumer", consumers, json!({"name": "app"})),
        ("duplicate API", apis, api_json("payments")),
        (
            "duplicate plan",
            "/admin/v1/tenants/acme/plans",
            json!({"name": "gold"}),
        ),
        (
            "duplicate subscription",
            "/admin/v1/tenants/acme/subscriptions",
            json!({"consumer": "app", "api": "payments", "plan": "gold"}),
        ),
        (
            "duplicate tenant",
            "/admin/v1/tenants",
            json!({"name": "acme"}),
        ),
    ] {
        let r = n.admin(Method::POST, path, Some(body)).await;
        refused(label, &r, 409, "conflict", At::Nothing);
        before.unchanged(&n, label).await;
    }

    // --- the node is still well: healthy, and a valid write is applied and audited
    let r = n
        .req(Method::GET, "/admin/v1/health", None, None, &[])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["status"], "ok");
    let r = n
        .admin(Method::POST, consumers, Some(json!({"name": "fine"})))
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(n.audit_seq().await, before.audit_records + 1);
    assert!(!n.log().contains("panicked"), "{}", n.log());
}

/// A tenant document for acme with the given YAML appended.
fn doc(rest: &str) -> String {
    format!("apiVersion: apim/v1\nkind: TenantConfig\ntenant: acme\n{rest}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_documents_change_nothing() {
    let n = Node::start().await;
    seed_tenant(&n, "acme").await;
    let r = n
        .admin(
            Method::POST,
            "/admin/v1/tenants/acme/consumers",
            Some(json!({"name": "old"})),
        )
        .await;
    assert_eq!(r.status, 201);
    let before = Snapshot::take(&n).await;

    // --- errors in the document text: 422 with the 1-based line (and column)
    let bad: Vec<(&str, String, usize)> = vec![
        (
            "unknown field",
            doc("consumers:\n  - name: c1\n  - name: c2\n    nmae: x\n"),
            7,
        ),
        (
            "wrong type",
            doc("plans:\n  - name: gold\n    rate_limit:\n      requests: many\n      per_seconds: 60\n"),
            7,
        ),
        (
            "bad indentation",
            doc("consumers:\n  - name: c1\n   - name: c2\n"),
            6,
        ),
        (
            "unknown section",
            doc("apis: []\nwidgets:\n  - name: w\n"),
            5,
        ),
        (
            "wrong type in a policy",
            doc(concat!(
                "apis:\n",
                "  - name: orders\n",
                "    version: v1\n",
                "    hosts: [api.bank.example]\n",
                "    base_path: /orders\n",
                "    upstream:\n",
                "      targets:\n",
                "        - url: http://127.0.0.1:9000\n",
                "    policies:\n",
                "      - type: rate-limit\n",
                "        requests: lots\n",
                "        per_seconds: 1\n",
            )),
            13,
        ),
        (
            "JSON syntax error",
            "{\"apiVersion\": \"apim/v1\",\n \"kind\": \"TenantConfig\",\n \"tenant\": \"acme\"\n \"apis\": []\n}\n"
                .to_string(),
            4,
        ),
    ];
    for (what, text, line) in &bad {
        for verb in ["diff", "apply"] {
            let label = format!("{verb}: {what}");
            let r = raw(
                &n,
                Method::POST,
                &format!("/admin/v1/tenants/acme/{verb}"),
                text.clone(),
                YAML,
                &[],
            )
            .await;
            let b = refused(&label, &r, 422, "invalid-document", At::Line(*line));
            assert_eq!(b["invalid-params"][0]["name"], "document", "{label}");
            assert!(
                b["invalid-params"][0]["column"].as_u64().is_some(),
                "{label}: {b}"
            );
            before.unchanged(&n, &label).await;
        }
    }

    // --- well-formed documents that fail their checks: 422 naming the field
    let checked: Vec<(&str, String, &str)> = vec![
        (
            "api version",
            "apiVersion: apim/v2\nkind: TenantConfig\ntenant: acme\n".to_string(),
            "apiVersion",
        ),
        (
            "kind",
            "apiVersion: apim/v1\nkind: Tenant\ntenant: acme\n".to_string(),
            "kind",
        ),
        (
            "another tenant",
            "apiVersion: apim/v1\nkind: TenantConfig\ntenant: globex\n".to_string(),
            "tenant",
        ),
        (
            "invalid name",
            doc("consumers:\n  - name: old\n  - name: Bad_Name\n"),
            "consumers[1].name",
        ),
        (
            "duplicate",
            doc("consumers:\n  - name: old\n  - name: old\n"),
            "consumers[1].name",
        ),
        (
            "invalid base_path",
            doc(concat!(
                "apis:\n",
                "  - name: orders\n",
                "    version: v1\n",
                "    hosts: [api.bank.example]\n",
                "    base_path: orders\n",
                "    upstream: {targets: [{url: 'http://127.0.0.1:9000'}]}\n",
            )),
            "apis[0].base_path",
        ),
    ];
    for (what, text, field) in &checked {
        for verb in ["diff", "apply"] {
            let label = format!("{verb}: {what}");
            let r = raw(
                &n,
                Method::POST,
                &format!("/admin/v1/tenants/acme/{verb}"),
                text.clone(),
                YAML,
                &[],
            )
            .await;
            refused(&label, &r, 422, "validation-failed", At::Field(field));
            before.unchanged(&n, &label).await;
        }
    }

    // --- a repeated member in the document is refused too (unlike in JSON bodies, see
    // duplicate_json_members_are_refused)
    for verb in ["diff", "apply"] {
        let label = format!("duplicate member to {verb}");
        let text = doc("consumers:\n  - name: one\n    name: two\n");
        let r = raw(
            &n,
            Method::POST,
            &format!("/admin/v1/tenants/acme/{verb}"),
            text,
            YAML,
            &[],
        )
        .await;
        let b = refused(&label, &r, 422, "invalid-document", At::Field("document"));
        assert!(
            b["detail"].as_str().unwrap().contains("duplicate field"),
            "{label}: {b}"
        );
        before.unchanged(&n, &label).await;
    }

    // --- an alias bomb (a few hundred bytes expanding to 9^9 strings) is refused, fast
    let mut bomb = doc(concat!(
        "apis:\n",
        "  - name: orders\n",
        "    version: v1\n",
        "    hosts: [api.bank.example]\n",
        "    base_path: /orders\n",
        "    upstream: {targets: [{url: 'http://127.0.0.1:9000'}]}\n",
        "    policies:\n",
        "      - type: ip-filter\n",
        "        x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n",
    ));
    for i in 1..9 {
        let prev = format!("*a{}", i - 1);
        bomb.push_str(&format!(
            "        x{i}: &a{i} [{}]\n",
            vec![prev; 9].join(", ")
        ));
    }
    assert!(bomb.len() < 2048);
    for verb in ["diff", "apply"] {
        let label = format!("alias bomb to {verb}");
        let started = std::time::Instant::now();
        let r = raw(
            &n,
            Method::POST,
            &format!("/admin/v1/tenants/acme/{verb}"),
            bomb.clone(),
            YAML,
            &[],
        )
        .await;
        let b = refused(&label, &r, 422, "invalid-document", At::Field("document"));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{label}: took {:?}",
            started.elapsed()
        );
        assert!(
            b["detail"].as_str().unwrap().contains("limit"),
            "{label}: {b}"
        );
        before.unchanged(&n, &label).await;
    }

    // --- all or nothing: a document that drops consumer `old` and adds plan `silver`, consumer
    // `newc` and a subscription to an API that does not exist is refused as a whole
    let mut d = n
        .admin(Method::GET, "/admin/v1/tenants/acme/export", None)
        .await
        .body;
    d["plans"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "silver"}));
    let consumers = d["consumers"].as_array_mut().unwrap();
    consumers.retain(|c| c["name"] != "old");
    consumers.push(json!({"name": "newc"}));
    d["subscriptions"]
        .as_array_mut()
        .unwrap()
        .push(json!({"consumer": "newc", "api": "ghost", "plan": "silver", "status": "active"}));
    let text = serde_json::to_string_pretty(&d).unwrap();
    for ct in [JSON, YAML] {
        let label = format!("apply with a dangling reference ({ct})");
        let r = raw(
            &n,
            Method::POST,
            "/admin/v1/tenants/acme/apply",
            text.clone(),
            ct,
            &[],
        )
        .await;
        let b = refused(&label, &r, 422, "validation-failed", At::FieldPrefix(""));
        assert!(
            b["invalid-params"][0]["name"]
                .as_str()
                .unwrap()
                .ends_with("api"),
            "{label}: {b}"
        );
        assert!(
            b["detail"].as_str().unwrap().contains("ghost"),
            "{label}: {b}"
        );
        before.unchanged(&n, &label).await;
    }
    for path in [
        "/admin/v1/tenants/acme/plans/silver",
        "/admin/v1/tenants/acme/consumers/newc",
        "/admin/v1/tenants/acme/subscriptions/newc.ghost",
    ] {
        let r = n.admin(Method::GET, path, None).await;
        assert_eq!(r.status, 404, "{path} was applied: {:?}", r.body);
    }
    let r = n
        .admin(Method::GET, "/admin/v1/tenants/acme/consumers/old", None)
        .await;
    assert_eq!(r.status, 200, "consumer old was deleted by a refused apply");

    // --- oversize document
    let mut big = doc("consumers:\n");
    while big.len() <= 1024 * 1024 {
        big.push_str(&format!("  - name: c{}\n", big.len()));
    }
    for verb in ["diff", "apply"] {
        let label = format!("oversize {verb}");
        let r = raw(
            &n,
            Method::POST,
            &format!("/admin/v1/tenants/acme/{verb}"),
            big.clone(),
            YAML,
            &[],
        )
        .await;
        refused(&label, &r, 413, "body-too-large", At::Nothing);
        before.unchanged(&n, &label).await;
    }

    // --- the same document with the reference fixed applies, in one revision
    let fixed = text.replace("\"ghost\"", "\"payments\"");
    let r = raw(
        &n,
        Method::POST,
        "/admin/v1/tenants/acme/apply",
        fixed,
        JSON,
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["applied"], true);
    assert_eq!(r.body["delete"], json!(["consumer/old"]));
    assert_eq!(
        r.body["revision"].as_u64().unwrap(),
        before.export["revision"].as_u64().unwrap() + 1
    );
    let r = n
        .admin(
            Method::GET,
            "/admin/v1/tenants/acme/subscriptions/newc.payments",
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(n.audit_seq().await > before.audit_records);
    let r = n
        .req(Method::GET, "/admin/v1/health", None, None, &[])
        .await;
    assert_eq!(r.status, 200);
}

/// JSON with a repeated member is ambiguous (which `name` is meant?); like an unknown field, it
/// must be refused rather than resolved silently, and nothing may change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_json_members_are_refused() {
    let n = Node::start().await;
    seed_tenant(&n, "acme").await;
    let before = Snapshot::take(&n).await;
    let consumers = "/admin/v1/tenants/acme/consumers";
    let mut fails = Vec::new();
    for (label, method, path, body, h) in [
        (
            "duplicate name on POST",
            Method::POST,
            consumers,
            r#"{"name": "first", "name": "second"}"#,
            &[][..],
        ),
        (
            "duplicate display_name on PUT",
            Method::PUT,
            "/admin/v1/tenants/acme/consumers/app",
            r#"{"name": "app", "display_name": "A", "display_name": "B"}"#,
            &[("if-match", "\"1\"")][..],
        ),
    ] {
        let r = raw(&n, method, path, body, JSON, h).await;
        let problem = r.headers.get("content-type").and_then(|v| v.to_str().ok())
            == Some("application/problem+json");
        if !(r.status == 400 || r.status == 422) || !problem {
            fails.push(format!("{label}: {} {}", r.status, r.body));
        }
    }
    for name in ["first", "second"] {
        let r = n
            .admin(Method::GET, &format!("{consumers}/{name}"), None)
            .await;
        if r.status != 404 {
            fails.push(format!(
                "consumer {name} was created from an ambiguous body"
            ));
        }
    }
    if fails.is_empty() {
        before.unchanged(&n, "duplicate members").await;
    }
    assert!(fails.is_empty(), "{}", fails.join("\n"));
}
