//! CRUD on every resource with ETag / If-Match, paging, filtering and sorting; credentials shown
//! once and working; declarative export / diff / apply; OpenAPI document.

mod common;
use common::*;
use reqwest::Method;
use serde_json::{json, Value};

/// Create → get → list → update (If-Match) → stale update → delete → gone, for one collection.
async fn crud(n: &Node, base: &str, create: Value, name: &str, change: (&str, Value)) {
    let r = n.admin(Method::POST, base, Some(create.clone())).await;
    assert_eq!(r.status, 201, "create {base}: {:?}", r.body);
    let location = r
        .headers
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert_eq!(location, format!("{base}/{name}"));
    assert_eq!(r.body["resource_version"], 1);

    let item = format!("{base}/{name}");
    let got = n.admin(Method::GET, &item, None).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.etag(), "\"1\"");

    let list = n.admin(Method::GET, base, None).await;
    assert_eq!(list.status, 200);
    assert!(list.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .any(|i| i["name"] == name));

    let mut body = got.body.clone();
    body[change.0] = change.1.clone();
    let upd = n
        .req(
            Method::PUT,
            &item,
            Some(&n.token),
            Some(body.clone()),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(upd.status, 200, "update {item}: {:?}", upd.body);
    assert_eq!(upd.body[change.0], change.1);
    assert_eq!(upd.etag(), "\"2\"");

    let stale = n
        .req(
            Method::PUT,
            &item,
            Some(&n.token),
            Some(body),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(stale.status, 412, "stale write: {:?}", stale.body);

    let del = n
        .req(
            Method::DELETE,
            &item,
            Some(&n.token),
            None,
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(del.status, 412, "stale delete refused");
    let del = n
        .req(
            Method::DELETE,
            &item,
            Some(&n.token),
            None,
            &[("if-match", "\"2\"")],
        )
        .await;
    assert_eq!(del.status, 204);
    assert_eq!(n.admin(Method::GET, &item, None).await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crud_on_every_resource() {
    let n = Node::start().await;
    crud(
        &n,
        "/admin/v1/tenants",
        json!({"name": "t1"}),
        "t1",
        ("display_name", json!("T One")),
    )
    .await;
    seed_tenant(&n, "acme").await;
    let t = "/admin/v1/tenants/acme";
    crud(
        &n,
        &format!("{t}/apis"),
        api_json("loans"),
        "loans",
        ("lifecycle", json!("published")),
    )
    .await;
    crud(
        &n,
        &format!("{t}/consumers"),
        json!({"name": "c2"}),
        "c2",
        ("contact_email", json!("ops@c2.example")),
    )
    .await;
    crud(
        &n,
        &format!("{t}/plans"),
        json!({"name": "silver"}),
        "silver",
        ("quota", json!({"per_day": 5})),
    )
    .await;
    let r = n
        .admin(
            Method::POST,
            &format!("{t}/consumers"),
            Some(json!({"name": "c3"})),
        )
        .await;
    assert_eq!(r.status, 201);
    crud(
        &n,
        &format!("{t}/subscriptions"),
        json!({"consumer": "c3", "api": "payments", "plan": "gold"}),
        "c3.payments",
        ("status", json!("suspended")),
    )
    .await;
    crud(
        &n,
        &format!("{t}/users"),
        json!({"name": "bob", "role": "viewer"}),
        "bob",
        ("role", json!("api-publisher")),
    )
    .await;
    crud(
        &n,
        "/admin/v1/users",
        json!({"name": "root2", "role": "platform-admin"}),
        "root2",
        ("display_name", json!("Second admin")),
    )
    .await;

    // Keys: several active per consumer, shown once, stored hashed, rotate without downtime.
    let keys = format!("{t}/consumers/app/keys");
    let k1 = n
        .admin(Method::POST, &keys, Some(json!({"ttl_days": 30})))
        .await;
    assert_eq!(k1.status, 201, "{:?}", k1.body);
    assert_eq!(
        k1.headers
            .get("cache-control")
            .and_then(|v| v.to_str().ok()),
        Some("no-store")
    );
    let secret = k1.body["key"].as_str().expect("key shown once").to_string();
    assert!(secret.starts_with("apik_") && secret.len() > 40);
    let id1 = k1.body["name"].as_str().expect("id").to_string();
    let k2 = n
        .admin(
            Method::POST,
            &keys,
            Some(json!({"expires_at": "2030-01-01T00:00:00+01:00"})),
        )
        .await;
    assert_eq!(k2.status, 201, "{:?}", k2.body);
    assert_eq!(k2.body["expires_at"], "2029-12-31T23:00:00.000Z");
    let got = n.admin(Method::GET, &format!("{keys}/{id1}"), None).await;
    assert_eq!(got.status, 200);
    assert!(
        got.body.get("key").is_none() && got.body.get("key_hash").is_none(),
        "secret never returned again: {:?}",
        got.body
    );
    let list = n.admin(Method::GET, &keys, None).await;
    assert_eq!(list.body["total"], 2);
    // the secret is in no API answer and not on disk in clear
    let on_disk = std::fs::read(n.dir.join("state.redb")).expect("state file");
    assert!(
        !on_disk
            .windows(secret.len())
            .any(|w| w == secret.as_bytes()),
        "key stored in clear"
    );
    // revoke (If-Match required)
    let rv = n
        .req(
            Method::PUT,
            &format!("{keys}/{id1}"),
            Some(&n.token),
            Some(json!({"revoked": true})),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(rv.status, 200, "{:?}", rv.body);
    assert_eq!(rv.body["revoked"], true);
    let del = n
        .admin(Method::DELETE, &format!("{keys}/{id1}"), None)
        .await;
    assert_eq!(del.status, 204);
    // a key id under another consumer is not found
    let r = n
        .admin(
            Method::POST,
            &format!("{t}/consumers"),
            Some(json!({"name": "other"})),
        )
        .await;
    assert_eq!(r.status, 201);
    let id2 = k2.body["name"].as_str().expect("id");
    assert_eq!(
        n.admin(
            Method::GET,
            &format!("{t}/consumers/other/keys/{id2}"),
            None
        )
        .await
        .status,
        404
    );

    // Tokens: a new token works, a revoked one stops working at once.
    let tok = n.user_token(Some("acme"), "carol", "tenant-admin").await;
    let me = n
        .req(Method::GET, "/admin/v1/status", Some(&tok), None, &[])
        .await;
    assert_eq!(me.status, 200);
    assert_eq!(me.body["you"]["user"], "carol");
    let toks = n
        .admin(Method::GET, &format!("{t}/users/carol/tokens"), None)
        .await;
    let tid = toks.body["items"][0]["name"]
        .as_str()
        .expect("token id")
        .to_string();
    let rv = n
        .req(
            Method::PUT,
            &format!("{t}/users/carol/tokens/{tid}"),
            Some(&n.token),
            Some(json!({"revoked": true})),
            &[("if-match", "*")],
        )
        .await;
    assert_eq!(rv.status, 200, "{:?}", rv.body);
    assert_eq!(
        n.req(Method::GET, "/admin/v1/status", Some(&tok), None, &[])
            .await
            .status,
        401
    );
    // deleting a user deletes its tokens
    assert_eq!(
        n.admin(Method::DELETE, &format!("{t}/users/carol"), None)
            .await
            .status,
        204
    );
    assert_eq!(
        n.admin(Method::GET, &format!("{t}/users/carol/tokens/{tid}"), None)
            .await
            .status,
        404
    );

    // The last platform admin cannot be removed.
    let r = n.admin(Method::DELETE, "/admin/v1/users/admin", None).await;
    assert_eq!(r.status, 409, "{:?}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_page_filter_and_sort() {
    let n = Node::start().await;
    seed_tenant(&n, "acme").await;
    let t = "/admin/v1/tenants/acme";
    for i in 0..25 {
        let mut api = api_json(&format!("api-{i:02}"));
        if i % 5 == 0 {
            api["lifecycle"] = json!("published");
        }
        assert_eq!(
            n.admin(Method::POST, &format!("{t}/apis"), Some(api))
                .await
                .status,
            201
        );
    }
    let p1 = n
        .admin(
            Method::GET,
            &format!("{t}/apis?limit=10&name_prefix=api-"),
            None,
        )
        .await;
    assert_eq!(p1.body["total"], 25);
    assert_eq!(p1.body["items"].as_array().map(Vec::len), Some(10));
    assert_eq!(p1.body["items"][0]["name"], "api-00");
    assert_eq!(p1.body["next_offset"], 10);
    let p3 = n
        .admin(
            Method::GET,
            &format!("{t}/apis?limit=10&offset=20&name_prefix=api-"),
            None,
        )
        .await;
    assert_eq!(p3.body["items"].as_array().map(Vec::len), Some(5));
    assert!(p3.body.get("next_offset").is_none());
    let desc = n
        .admin(Method::GET, &format!("{t}/apis?sort=-name&limit=1"), None)
        .await;
    assert_eq!(desc.body["items"][0]["name"], "payments");
    let published = n
        .admin(Method::GET, &format!("{t}/apis?lifecycle=published"), None)
        .await;
    assert_eq!(published.body["total"], 5);
    let by_time = n
        .admin(
            Method::GET,
            &format!("{t}/apis?sort=-created_at&limit=1"),
            None,
        )
        .await;
    assert_eq!(by_time.body["items"][0]["name"], "api-24");
    let subs = n
        .admin(
            Method::GET,
            &format!("{t}/subscriptions?consumer=app&status=active"),
            None,
        )
        .await;
    assert_eq!(subs.body["total"], 1);
}

fn strip_revision(mut v: Value) -> Value {
    if let Some(m) = v.as_object_mut() {
        m.remove("revision");
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_diff_apply_reproduces_a_tenant() {
    let a = Node::start().await;
    seed_tenant(&a, "acme").await;
    let mut api = api_json("loans");
    api["policies"] = json!([
        {"type": "ip-filter", "allow": ["10.0.0.0/8", "2001:db8::/32"]},
        {"type": "rate-limit", "requests": 5, "per_seconds": 1},
        {"type": "cors", "allow_origins": ["https://portal.bank.example"]}
    ]);
    assert_eq!(
        a.admin(Method::POST, "/admin/v1/tenants/acme/apis", Some(api))
            .await
            .status,
        201
    );
    let key = a
        .admin(
            Method::POST,
            "/admin/v1/tenants/acme/consumers/app/keys",
            Some(json!({})),
        )
        .await;
    assert_eq!(key.status, 201);
    let secret = key.body["key"].as_str().expect("key").to_string();

    let yaml = a
        .req(
            Method::GET,
            "/admin/v1/tenants/acme/export?format=yaml",
            Some(&a.token),
            None,
            &[],
        )
        .await;
    assert_eq!(yaml.status, 200);
    let text = yaml.body.as_str().expect("yaml text").to_string();
    assert!(text.contains("kind: TenantConfig") && text.contains("loans"));
    assert!(
        !text.contains(&secret) && !text.contains("key_hash"),
        "no secret in the export"
    );

    // On an empty node, apply creates the tenant and everything in it, in one revision.
    let b = Node::start().await;
    let before = b.audit_seq().await;
    let diff = b
        .raw(
            Method::POST,
            "/admin/v1/tenants/acme/diff",
            Some(&b.token),
            text.clone().into_bytes(),
            "application/yaml",
            &[],
        )
        .await;
    assert_eq!(
        diff.status, 404,
        "diff of an unknown tenant: {:?}",
        diff.body
    );
    let applied = b
        .raw(
            Method::POST,
            "/admin/v1/tenants/acme/apply",
            Some(&b.token),
            text.clone().into_bytes(),
            "application/yaml",
            &[],
        )
        .await;
    assert_eq!(applied.status, 200, "{:?}", applied.body);
    assert_eq!(applied.body["applied"], true);
    assert_eq!(applied.body["revision"], 1);
    let created = applied.body["create"].as_array().expect("create").len();
    assert_eq!(
        created,
        1 + 2 + 1 + 1 + 1,
        "tenant, 2 apis, plan, consumer, subscription"
    );
    assert_eq!(
        b.audit_seq().await,
        before + created as u64,
        "one audit record per object"
    );
    let ea = a
        .admin(Method::GET, "/admin/v1/tenants/acme/export", None)
        .await;
    let eb = b
        .admin(Method::GET, "/admin/v1/tenants/acme/export", None)
        .await;
    assert_eq!(
        strip_revision(ea.body.clone()),
        strip_revision(eb.body.clone())
    );

    // Re-applying the same document changes nothing.
    let again = b
        .raw(
            Method::POST,
            "/admin/v1/tenants/acme/apply",
            Some(&b.token),
            text.clone().into_bytes(),
            "application/yaml",
            &[],
        )
        .await;
    assert_eq!(again.body["applied"], false);
    assert_eq!(again.body["revision"], 1);
    assert_eq!(b.audit_seq().await, before + created as u64);

    // Edit: change one API, drop the other with its subscription, add a plan.
    let mut doc: Value = serde_norway::from_str(&text).expect("yaml");
    let apis = doc["apis"].as_array_mut().expect("apis");
    apis.retain(|a| a["name"] != "payments");
    apis[0]["lifecycle"] = json!("published");
    doc["subscriptions"] = json!([]);
    doc["plans"]
        .as_array_mut()
        .expect("plans")
        .push(json!({"name": "bronze"}));
    let edited = serde_norway::to_string(&doc).expect("yaml");
    let diff = b
        .raw(
            Method::POST,
            "/admin/v1/tenants/acme/diff",
            Some(&b.token),
            edited.clone().into_bytes(),
            "application/yaml",
            &[],
        )
        .await;
    assert_eq!(diff.status, 200, "{:?}", diff.body);
    assert_eq!(diff.body["create"], json!(["plan/bronze"]));
    assert_eq!(diff.body["update"], json!(["api/loans"]));
    assert_eq!(
        diff.body["delete"],
        json!(["subscription/app.payments", "api/payments"])
    );
    let applied = b
        .raw(
            Method::POST,
            "/admin/v1/tenants/acme/apply",
            Some(&b.token),
            edited.into_bytes(),
            "application/yaml",
            &[],
        )
        .await;
    assert_eq!(applied.status, 200, "{:?}", applied.body);
    assert_eq!(applied.body["revision"], 2);
    let loans = b
        .admin(Method::GET, "/admin/v1/tenants/acme/apis/loans", None)
        .await;
    assert_eq!(loans.body["lifecycle"], "published");
    assert_eq!(
        b.admin(Method::GET, "/admin/v1/tenants/acme/apis/payments", None)
            .await
            .status,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_is_served_and_complete() {
    let n = Node::start().await;
    let r = n
        .req(Method::GET, "/admin/v1/openapi.json", None, None, &[])
        .await;
    assert_eq!(r.status, 200);
    assert!(r.body["openapi"]
        .as_str()
        .expect("version")
        .starts_with("3."));
    for path in [
        "/admin/v1/tenants",
        "/admin/v1/tenants/{tenant}/apis/{name}",
        "/admin/v1/tenants/{tenant}/apply",
        "/admin/v1/audit",
    ] {
        assert!(r.body["paths"][path].is_object(), "{path} documented");
    }
    assert!(r.body["components"]["schemas"]["ApiSpec"]["properties"]["policies"].is_object());
    // an undocumented path is a problem+json 404
    let r = n.admin(Method::GET, "/admin/v1/nope", None).await;
    assert_eq!(r.status, 404);
    assert_eq!(
        r.headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
}
