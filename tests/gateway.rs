//! The gateway data plane end to end: a real upstream on loopback, published APIs routed by
//! host and path, API keys, subscriptions, rate limits, quotas, IP filters, upstream failures,
//! routing table swaps after a committed change, and policies not yet enforced failing closed.

mod common;
use common::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;

struct Gw {
    http: reqwest::Client,
    base: String,
}

impl Gw {
    fn new(n: &Node) -> Gw {
        Gw {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("client"),
            base: format!("http://127.0.0.1:{}", n.gateway_port),
        }
    }

    async fn get(
        &self,
        host: &str,
        path: &str,
        key: Option<&str>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut r = self
            .http
            .get(format!("{}{path}", self.base))
            .header("host", host);
        if let Some(k) = key {
            r = r.header("x-api-key", k);
        }
        let resp = r.send().await.expect("gateway answered");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.json::<Value>().await.unwrap_or(Value::Null);
        (status, headers, body)
    }

    /// Polls until the gateway's routing table reflects a change (swaps follow commits).
    async fn until(
        &self,
        host: &str,
        path: &str,
        key: Option<&str>,
        status: u16,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut last = self.get(host, path, key).await;
        for _ in 0..100 {
            if last.0 == status {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
            last = self.get(host, path, key).await;
        }
        last
    }
}

async fn publish(n: &Node, tenant: &str, mut api: Value) {
    let name = api["name"].as_str().expect("name").to_string();
    api["lifecycle"] = json!("published");
    let r = n
        .admin(
            Method::POST,
            &format!("/admin/v1/tenants/{tenant}/apis"),
            Some(api),
        )
        .await;
    assert_eq!(r.status, 201, "publish {name}: {:?}", r.body);
}

async fn key_for(n: &Node, tenant: &str, consumer: &str) -> (String, String) {
    let r = n
        .admin(
            Method::POST,
            &format!("/admin/v1/tenants/{tenant}/consumers/{consumer}/keys"),
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    (
        r.body["key"].as_str().expect("key").to_string(),
        r.body["name"].as_str().expect("id").to_string(),
    )
}

/// One request on a kept connection and the status of its answer (whose body, of the length
/// its `Content-Length` gives, is read off the connection).
async fn kept_exchange(c: &mut tokio::net::TcpStream, host: &str, key: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head = format!("GET /payments/kept HTTP/1.1\r\nHost: {host}\r\nx-api-key: {key}\r\n\r\n");
    c.write_all(head.as_bytes()).await.expect("request sent");
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        let n = c.read(&mut byte).await.expect("answer read");
        assert_eq!(
            n,
            1,
            "the connection closed after {:?}",
            String::from_utf8_lossy(&got)
        );
        got.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no content-length in {head}"));
    let mut body = vec![0u8; length];
    c.read_exact(&mut body).await.expect("body read");
    head[9..12].parse().expect("status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_subscriptions_and_proxy_semantics() {
    let up = echo_upstream().await;
    let n = Node::start().await;
    seed_tenant(&n, "acme").await; // API payments (draft, api-key), consumer app, plan gold, active subscription
    let api = json!({
        "name": "payments", "version": "v1", "hosts": ["api.bank.example"], "base_path": "/payments",
        "upstream": {"targets": [{"url": format!("http://{up}/backend")}]},
        "policies": [{"type": "api-key", "header": "x-api-key"}],
    });
    let gw = Gw::new(&n);
    let (key, key_id) = key_for(&n, "acme", "app").await;
    // a draft API is not served
    assert_eq!(
        gw.get("api.bank.example", "/payments/accounts", Some(&key))
            .await
            .0,
        404
    );
    let cur = n
        .admin(Method::GET, "/admin/v1/tenants/acme/apis/payments", None)
        .await;
    let mut body = api.clone();
    body["lifecycle"] = json!("published");
    let r = n
        .req(
            Method::PUT,
            "/admin/v1/tenants/acme/apis/payments",
            Some(&n.token),
            Some(body),
            &[("if-match", &cur.etag())],
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    // routed once the table is swapped; the upstream sees the forwarded request
    let (status, headers, echo) = gw
        .until(
            "api.bank.example",
            "/payments/accounts?iban=FR76",
            Some(&key),
            200,
        )
        .await;
    assert_eq!(status, 200, "{echo:?}");
    assert_eq!(echo["uri"], "/backend/accounts?iban=FR76");
    let h = &echo["headers"];
    assert!(
        h.get("x-api-key").is_none(),
        "the API key is not forwarded: {h}"
    );
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-host"], "api.bank.example");
    assert_eq!(h["via"], "1.1 apim");
    let rid = h["x-request-id"].as_str().expect("request id").to_string();
    assert_eq!(
        headers.get("x-request-id").and_then(|v| v.to_str().ok()),
        Some(rid.as_str())
    );
    assert!(
        headers.get("connection").is_none(),
        "hop-by-hop headers are dropped"
    );

    // refusals: problem+json with a stable type, never saying which part was wrong
    let (s, hd, b) = gw.get("api.bank.example", "/payments/accounts", None).await;
    assert_eq!(
        (s, b["type"].as_str()),
        (401, Some("urn:apim:problem:gateway:missing-credential"))
    );
    assert_eq!(
        hd.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    let (s, _, b) = gw
        .get("api.bank.example", "/payments/accounts", Some("apik_wrong"))
        .await;
    assert_eq!(
        (s, b["type"].as_str()),
        (401, Some("urn:apim:problem:gateway:invalid-credential"))
    );
    let (s, _, _) = gw.get("api.bank.example", "/other", Some(&key)).await;
    assert_eq!(s, 404);
    let (s, _, _) = gw.get("api.unknown.example", "/payments", Some(&key)).await;
    assert_eq!(s, 404);

    // a consumer without an active subscription is refused
    let r = n
        .admin(
            Method::POST,
            "/admin/v1/tenants/acme/consumers",
            Some(json!({"name": "other"})),
        )
        .await;
    assert_eq!(r.status, 201);
    let (other_key, _) = key_for(&n, "acme", "other").await;
    let (s, _, b) = gw
        .until("api.bank.example", "/payments/x", Some(&other_key), 403)
        .await;
    assert_eq!(
        (s, b["type"].as_str()),
        (403, Some("urn:apim:problem:gateway:not-subscribed"))
    );

    // a key past its expiry is refused like an unknown one
    let soon = (time::OffsetDateTime::now_utc() + time::Duration::seconds(3))
        .replace_nanosecond(0)
        .expect("whole seconds")
        .format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339");
    let r = n
        .admin(
            Method::POST,
            "/admin/v1/tenants/acme/consumers/app/keys",
            Some(json!({"expires_at": soon})),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let short = r.body["key"].as_str().expect("key").to_string();
    let (s, _, _) = gw
        .until("api.bank.example", "/payments/x", Some(&short), 200)
        .await;
    assert_eq!(s, 200, "the key works until it expires");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (s, _, b) = gw
        .get("api.bank.example", "/payments/x", Some(&short))
        .await;
    assert_eq!(
        (s, b["type"].as_str()),
        (401, Some("urn:apim:problem:gateway:invalid-credential"))
    );

    // every request has a JSON access-log line, without the key
    let log = n
        .log_with(|l| l.contains("apim::gateway::access") && l.contains("\"status\":403"))
        .await;
    let lines: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["target"] == "apim::gateway::access")
        .collect();
    let served = lines
        .iter()
        .find(|l| l["status"] == 200)
        .expect("an access line for a 200");
    assert_eq!(served["api"], "payments");
    assert_eq!(served["consumer"], "app");
    assert_eq!(served["path"], "/payments/accounts");
    assert!(served["upstream_us"].as_u64().is_some(), "{served}");
    assert!(lines.iter().any(|l| l["status"] == 401));
    assert!(!log.contains(&key), "the API key is never logged");

    // Prometheus metrics on the admin listener
    let m = n
        .client
        .get(format!("{}/metrics", n.url))
        .send()
        .await
        .expect("metrics");
    assert_eq!(m.status(), 200);
    let text = m.text().await.expect("text");
    for needle in [
        "apim_gateway_requests_total{tenant=\"acme\",api=\"payments\",class=\"2xx\"}",
        "apim_gateway_refusals_total{cause=\"missing-credential\"} 1",
        "apim_gateway_added_seconds_bucket",
        "apim_gateway_upstream_seconds_count",
        "apim_gateway_routes 1",
        "apim_gateway_open_connections",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }

    // A connection keeps the digest of the last key it presented (the key is hashed once):
    // another key, even one that differs in its last letter only, is still refused on it,
    // and the kept key is refused once revoked (below).
    let mut kept = tokio::net::TcpStream::connect(("127.0.0.1", n.gateway_port))
        .await
        .expect("gateway connection");
    let mut near = key.clone();
    let last = if near.ends_with('A') { "B" } else { "A" };
    near.replace_range(near.len() - 1.., last);
    for (k, want) in [(&key, 200), (&near, 401), (&key, 200), (&key, 200)] {
        assert_eq!(kept_exchange(&mut kept, "api.bank.example", k).await, want);
    }

    // a revoked key stops working as soon as the change is committed
    let r = n
        .req(
            Method::PUT,
            &format!("/admin/v1/tenants/acme/consumers/app/keys/{key_id}"),
            Some(&n.token),
            Some(json!({"revoked": true})),
            &[("if-match", "*")],
        )
        .await;
    assert_eq!(r.status, 200);
    let (s, _, b) = gw
        .until("api.bank.example", "/payments/accounts", Some(&key), 401)
        .await;
    assert_eq!(
        (s, b["type"].as_str()),
        (401, Some("urn:apim:problem:gateway:invalid-credential"))
    );
    // also on the connection that presented it before
    assert_eq!(
        kept_exchange(&mut kept, "api.bank.example", &key).await,
        401
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_filters_specificity_and_upstream_failures() {
    let up = echo_upstream().await;
    let n = Node::start_with("[gateway]\nupstream_response_timeout_seconds = 1\n").await;
    let r = n
        .admin(
            Method::POST,
            "/admin/v1/tenants",
            Some(json!({"name": "acme"})),
        )
        .await;
    assert_eq!(r.status, 201);
    let t = "/admin/v1/tenants/acme";
    let target = json!({"targets": [{"url": format!("http://{up}")}]});
    publish(&n, "acme", json!({"name": "limited", "version": "v1", "hosts": ["api.bank.example"], "base_path": "/limited",
        "upstream": target, "policies": [{"type": "rate-limit", "requests": 2, "per_seconds": 60}]})).await;
    publish(&n, "acme", json!({"name": "limited-v2", "version": "v2", "hosts": ["api.bank.example"], "base_path": "/limited/v2",
        "upstream": target, "policies": []})).await;
    publish(
        &n,
        "acme",
        json!({"name": "wild", "version": "v1", "hosts": ["*.bank.example"], "base_path": "/",
        "upstream": target, "policies": []}),
    )
    .await;
    publish(
        &n,
        "acme",
        json!({"name": "fenced", "version": "v1", "hosts": ["fenced.example"], "base_path": "/",
        "upstream": target, "policies": [{"type": "ip-filter", "deny": ["127.0.0.0/8"]}]}),
    )
    .await;
    publish(
        &n,
        "acme",
        json!({"name": "jwt", "version": "v1", "hosts": ["jwt.example"], "base_path": "/",
        "upstream": target, "policies": [{"type": "jwt", "issuer": "i", "audience": "a", "jwks_url": "https://127.0.0.1:1/jwks",
            "jwks_ca_bundle": std::fs::read_to_string(n.dir.join("pki/ca.crt")).expect("CA")}]}),
    )
    .await;
    publish(
        &n,
        "acme",
        json!({"name": "down", "version": "v1", "hosts": ["down.example"], "base_path": "/",
        "upstream": {"targets": [{"url": "http://127.0.0.1:1"}]}, "policies": []}),
    )
    .await;
    // quotas come from the plan of the subscription
    created(
        &n,
        &format!("{t}/plans"),
        json!({"name": "tiny", "quota": {"per_day": 3}}),
    )
    .await;
    publish(
        &n,
        "acme",
        json!({"name": "metered", "version": "v1", "hosts": ["metered.example"], "base_path": "/",
        "upstream": target, "policies": [{"type": "api-key"}]}),
    )
    .await;
    created(&n, &format!("{t}/consumers"), json!({"name": "app"})).await;
    created(
        &n,
        &format!("{t}/subscriptions"),
        json!({"consumer": "app", "api": "metered", "plan": "tiny", "status": "active"}),
    )
    .await;
    let (key, _) = key_for(&n, "acme", "app").await;
    let gw = Gw::new(&n);

    // the most specific route wins: longer base path, then exact host over wildcard
    let (s, _, e) = gw
        .until("api.bank.example", "/limited/v2/x", None, 200)
        .await;
    assert_eq!((s, e["uri"].as_str()), (200, Some("/x")));
    let (s, _, e) = gw.get("www.bank.example", "/anything", None).await;
    assert_eq!((s, e["uri"].as_str()), (200, Some("/anything")));
    // `/limited` does not match `/limitedx` (whole segments): the wildcard API serves it
    let (s, h, e) = gw.get("api.bank.example", "/limitedx", None).await;
    assert_eq!((s, e["uri"].as_str()), (200, Some("/limitedx")));
    assert!(
        h.get("ratelimit").is_none(),
        "not the rate-limited API: {h:?}"
    );

    // rate limit: 2 per minute, then 429 with Retry-After and RateLimit headers
    let (s, h, _) = gw.get("api.bank.example", "/limited/a", None).await;
    assert_eq!(s, 200);
    assert!(
        h.get("ratelimit-policy").is_some() && h.get("ratelimit").is_some(),
        "{h:?}"
    );
    assert_eq!(gw.get("api.bank.example", "/limited/b", None).await.0, 200);
    let (s, h, b) = gw.get("api.bank.example", "/limited/c", None).await;
    assert_eq!(
        (s, b["type"].as_str()),
        (429, Some("urn:apim:problem:gateway:rate-limited"))
    );
    let retry: u64 = h
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("retry-after");
    assert!((1..=60).contains(&retry), "{retry}");

    // plan quota: 3 per day
    for _ in 0..3 {
        assert_eq!(
            gw.until("metered.example", "/", Some(&key), 200).await.0,
            200
        );
    }
    let (s, _, b) = gw.get("metered.example", "/", Some(&key)).await;
    assert_eq!(
        (s, b["type"].as_str()),
        (429, Some("urn:apim:problem:gateway:quota-exceeded"))
    );

    // IP filter, fail-closed policies, upstream failures
    assert_eq!(gw.get("fenced.example", "/", None).await.0, 403);
    let (s, _, b) = gw.get("jwt.example", "/", None).await;
    assert_eq!(
        (s, b["type"].as_str()),
        (503, Some("urn:apim:problem:gateway:policy-unavailable"))
    );
    let (s, _, b) = gw.get("down.example", "/", None).await;
    assert_eq!(
        (s, b["type"].as_str()),
        (502, Some("urn:apim:problem:gateway:upstream-unavailable"))
    );
    let (s, _, b) = gw.get("www.bank.example", "/slow", None).await;
    assert_eq!(
        (s, b["type"].as_str()),
        (504, Some("urn:apim:problem:gateway:upstream-timeout"))
    );
    // the admin side is unaffected
    assert_eq!(
        n.admin(Method::GET, "/admin/v1/health", None).await.status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_query_keys_and_host_claims() {
    /// Sends `request` as raw bytes on a new connection (an HTTP client library would
    /// normalise its path) and reads the whole answer.
    async fn raw_exchange(port: u16, request: String) -> String {
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
            c.write_all(request.as_bytes()).expect("write");
            let mut out = Vec::new();
            let _ = c.read_to_end(&mut out);
            String::from_utf8_lossy(&out).into_owned()
        })
        .await
        .expect("raw client")
    }

    let up = echo_upstream().await;
    let n = Node::start().await;
    for t in ["acme", "globex"] {
        let r = n
            .admin(Method::POST, "/admin/v1/tenants", Some(json!({"name": t})))
            .await;
        assert_eq!(r.status, 201);
    }
    let target = json!({"targets": [{"url": format!("http://{up}")}]});
    publish(&n, "acme", json!({"name": "open", "version": "v1", "hosts": ["api.acme.example"], "base_path": "/open",
        "upstream": target, "policies": [{"type": "api-key", "header": "x-api-key", "query_param": "apikey"}]})).await;
    let t = "/admin/v1/tenants/acme";
    created(&n, &format!("{t}/plans"), json!({"name": "p"})).await;
    created(&n, &format!("{t}/consumers"), json!({"name": "c"})).await;
    created(
        &n,
        &format!("{t}/subscriptions"),
        json!({"consumer": "c", "api": "open", "plan": "p", "status": "active"}),
    )
    .await;
    let (key, _) = key_for(&n, "acme", "c").await;
    let gw = Gw::new(&n);

    // a key in the query string is accepted and not forwarded
    let (s, _, e) = gw
        .until(
            "api.acme.example",
            &format!("/open/a?apikey={key}&x=1"),
            None,
            200,
        )
        .await;
    assert_eq!(s, 200, "{e:?}");
    assert_eq!(e["uri"], "/a?x=1");
    // X-Forwarded-Host keeps the port the client named, in Host or in an absolute-form target
    // (which wins over Host), though the key's removal rewrites the URI
    let (s, _, e) = gw
        .get(
            "api.acme.example:8081",
            &format!("/open/a?apikey={key}"),
            None,
        )
        .await;
    assert_eq!(
        (s, e["headers"]["x-forwarded-host"].as_str()),
        (200, Some("api.acme.example:8081")),
        "{e}"
    );
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", n.gateway_port))
            .await
            .unwrap();
        let head = format!(
            "GET http://api.acme.example:8082/open/b?apikey={key}&y=2 HTTP/1.1\r\n\
             Host: api.acme.example\r\nConnection: close\r\n\r\n"
        );
        c.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        c.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer);
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        let e: Value = serde_json::from_str(body).unwrap_or(Value::Null);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!(e["uri"], "/b?y=2", "{answer}");
        assert_eq!(
            e["headers"]["x-forwarded-host"], "api.acme.example:8082",
            "{answer}"
        );
    }

    // path tricks are refused before routing
    for path in [
        "/open/%2e%2e/admin",
        "/open//a",
        "/open/a;jsessionid=1",
        "/open/%2F..%2Fetc",
        "/open/./a",
        "/open/a\\b",
    ] {
        let port = n.gateway_port;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: api.acme.example\r\nx-api-key: {key}\r\nConnection: close\r\n\r\n"
        );
        let answer = raw_exchange(port, request).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
    }
    // a path in UTF-8 (not percent-encoded) is no trick: it is forwarded as it came
    let port = n.gateway_port;
    let request = format!(
        "GET /open/caf\u{e9} HTTP/1.1\r\nHost: api.acme.example\r\nx-api-key: {key}\r\nConnection: close\r\n\r\n"
    );
    let answer = raw_exchange(port, request).await;
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let e: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(e["uri"], "/caf\u{e9}", "{answer}");

    // another tenant cannot claim the same host and base path
    let r = n
        .admin(Method::POST, "/admin/v1/tenants/globex/apis", Some(json!({"name": "steal", "version": "v1",
            "hosts": ["API.acme.example"], "base_path": "/open/", "upstream": target, "lifecycle": "published"})))
        .await;
    assert_eq!(r.status, 409, "{:?}", r.body);
    assert_eq!(r.body["invalid-params"][0]["name"], "hosts", "{:?}", r.body);
    // as a draft it is stored, and publishing it is refused the same way
    let r = n
        .admin(
            Method::POST,
            "/admin/v1/tenants/globex/apis",
            Some(json!({"name": "steal", "version": "v1",
            "hosts": ["api.acme.example"], "base_path": "/open", "upstream": target})),
        )
        .await;
    assert_eq!(r.status, 201);
    let mut body = r.body.clone();
    body["lifecycle"] = json!("published");
    let r = n
        .req(
            Method::PUT,
            "/admin/v1/tenants/globex/apis/steal",
            Some(&n.token),
            Some(body),
            &[("if-match", "*")],
        )
        .await;
    assert_eq!(r.status, 409, "{:?}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_believed_only_from_trusted_proxies() {
    let up = echo_upstream().await;
    let target = json!({"targets": [{"url": format!("http://{up}")}]});
    let api = json!({"name": "fenced", "version": "v1", "hosts": ["api.example"], "base_path": "/",
        "upstream": target, "policies": [{"type": "ip-filter", "deny": ["203.0.113.0/24"]}]});
    let send = |gw: &Gw, xff: &'static str| {
        let r = gw
            .http
            .get(format!("{}/x", gw.base))
            .header("host", "api.example")
            .header("x-forwarded-for", xff)
            .header("x-forwarded-host", "evil.example")
            .header("forwarded", "for=198.51.100.1;proto=https")
            .send();
        async move {
            let r = r.await.expect("answer");
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };

    // untrusted peer: its headers are replaced, the filter sees the peer; with
    // `forwarded_header`, the RFC 7239 header names this hop only
    let n = Node::start_with("[gateway]\nforwarded_header = true\n").await;
    created(&n, "/admin/v1/tenants", json!({"name": "t"})).await;
    publish(&n, "t", api.clone()).await;
    let gw = Gw::new(&n);
    gw.until("api.example", "/x", None, 200).await;
    let (s, e) = send(&gw, "203.0.113.5").await;
    assert_eq!(s, 200, "a spoofed address does not reach the filter: {e}");
    assert_eq!(e["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(e["headers"]["x-forwarded-host"], "api.example");
    assert_eq!(
        e["headers"]["forwarded"],
        "for=127.0.0.1;host=api.example;proto=http"
    );

    // trusted proxy: the client named in its header is the one filtered and forwarded
    let n = Node::start_with("[gateway]\ntrusted_proxies = [\"127.0.0.0/8\"]\n").await;
    created(&n, "/admin/v1/tenants", json!({"name": "t"})).await;
    publish(&n, "t", api.clone()).await;
    let gw = Gw::new(&n);
    gw.until("api.example", "/x", None, 200).await;
    let (s, _) = send(&gw, "203.0.113.5").await;
    assert_eq!(s, 403);
    let (s, e) = send(&gw, "198.51.100.1").await;
    assert_eq!(s, 200);
    assert_eq!(e["headers"]["x-forwarded-for"], "198.51.100.1, 127.0.0.1");
    assert_eq!(e["headers"]["x-forwarded-host"], "evil.example");
    // without `forwarded_header`, a trusted proxy's `Forwarded` passes unchanged
    assert_eq!(e["headers"]["forwarded"], "for=198.51.100.1;proto=https");

    // trusted proxy and `forwarded_header`: this hop's element follows the proxy's; a host
    // with a port is a quoted string
    let n = Node::start_with(
        "[gateway]\ntrusted_proxies = [\"127.0.0.0/8\"]\nforwarded_header = true\n",
    )
    .await;
    created(&n, "/admin/v1/tenants", json!({"name": "t"})).await;
    publish(&n, "t", api).await;
    let gw = Gw::new(&n);
    gw.until("api.example", "/x", None, 200).await;
    let (s, e) = send(&gw, "198.51.100.1").await;
    assert_eq!(s, 200);
    assert_eq!(
        e["headers"]["forwarded"],
        "for=198.51.100.1;proto=https, for=127.0.0.1;host=api.example;proto=http"
    );
    let e: Value = gw
        .http
        .get(format!("{}/x", gw.base))
        .header("host", "api.example:8080")
        .send()
        .await
        .expect("answer")
        .json()
        .await
        .expect("echo");
    assert_eq!(
        e["headers"]["forwarded"],
        "for=127.0.0.1;host=\"api.example:8080\";proto=http"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflights_and_answers() {
    let up = echo_upstream().await;
    let n = Node::start().await;
    created(&n, "/admin/v1/tenants", json!({"name": "t"})).await;
    publish(&n, "t", json!({"name": "portal", "version": "v1", "hosts": ["api.example"], "base_path": "/",
        "upstream": {"targets": [{"url": format!("http://{up}")}]},
        "policies": [
            {"type": "cors", "allow_origins": ["https://portal.bank.example"], "allow_methods": ["GET", "POST"],
             "allow_headers": ["x-api-key", "content-type"], "max_age_seconds": 600},
            {"type": "ip-filter", "allow": ["127.0.0.0/8"]}
        ]})).await;
    let gw = Gw::new(&n);
    gw.until("api.example", "/x", None, 200).await;
    let preflight = |origin: &'static str, method: &'static str| {
        let r = gw
            .http
            .request(reqwest::Method::OPTIONS, format!("{}/x", gw.base))
            .header("host", "api.example")
            .header("origin", origin)
            .header("access-control-request-method", method)
            .send();
        async move { r.await.expect("answer") }
    };
    let r = preflight("https://portal.bank.example", "POST").await;
    assert_eq!(r.status().as_u16(), 204);
    let h = r.headers();
    assert_eq!(
        h.get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some("https://portal.bank.example")
    );
    assert_eq!(
        h.get("access-control-allow-methods")
            .and_then(|v| v.to_str().ok()),
        Some("GET, POST")
    );
    assert_eq!(
        h.get("access-control-allow-headers")
            .and_then(|v| v.to_str().ok()),
        Some("x-api-key, content-type")
    );
    assert_eq!(
        h.get("access-control-max-age")
            .and_then(|v| v.to_str().ok()),
        Some("600")
    );
    assert_eq!(
        preflight("https://evil.example", "POST")
            .await
            .status()
            .as_u16(),
        403
    );
    assert_eq!(
        preflight("https://portal.bank.example", "DELETE")
            .await
            .status()
            .as_u16(),
        403
    );

    let get = |origin: &'static str| {
        let r = gw
            .http
            .get(format!("{}/x", gw.base))
            .header("host", "api.example")
            .header("origin", origin)
            .send();
        async move { r.await.expect("answer") }
    };
    let r = get("https://portal.bank.example").await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some("https://portal.bank.example")
    );
    assert!(r
        .headers()
        .get_all("vary")
        .iter()
        .any(|v| v.to_str().unwrap_or("").contains("origin")));
    let r = get("https://evil.example").await;
    assert_eq!(
        r.status().as_u16(),
        200,
        "CORS is the browser's check: the request passes"
    );
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_shared_by_an_api_or_a_whole_tenant() {
    let up = echo_upstream().await;
    let n = Node::start().await;
    created(&n, "/admin/v1/tenants", json!({"name": "acme"})).await;
    let target = json!({"targets": [{"url": format!("http://{up}")}]});
    for name in ["ta", "tb"] {
        publish(&n, "acme", json!({"name": name, "version": "v1", "hosts": [format!("{name}.example")], "base_path": "/",
            "upstream": target, "policies": [{"type": "rate-limit", "requests": 3, "per_seconds": 60, "per": "tenant"}]})).await;
    }
    publish(&n, "acme", json!({"name": "one", "version": "v1", "hosts": ["one.example"], "base_path": "/",
        "upstream": target, "policies": [{"type": "rate-limit", "requests": 2, "per_seconds": 60, "per": "api"}]})).await;
    let gw = Gw::new(&n);
    gw.until("tb.example", "/", None, 200).await;
    gw.until("one.example", "/", None, 200).await;
    // tenant-wide: tb has used one of the three; ta takes two more, then both APIs are limited
    assert_eq!(gw.get("ta.example", "/", None).await.0, 200);
    assert_eq!(gw.get("ta.example", "/", None).await.0, 200);
    let (s, h, b) = gw.get("tb.example", "/", None).await;
    assert_eq!(
        (s, b["type"].as_str()),
        (429, Some("urn:apim:problem:gateway:rate-limited"))
    );
    assert!(h.get("retry-after").is_some());
    assert_eq!(gw.get("ta.example", "/", None).await.0, 429);
    // API-wide: two in all
    assert_eq!(gw.get("one.example", "/", None).await.0, 200);
    assert_eq!(gw.get("one.example", "/", None).await.0, 429);
    let r = n
        .admin(
            Method::POST,
            "/admin/v1/tenants/acme/apis",
            Some(json!({"name": "bad", "version": "v1", "hosts": ["bad.example"], "base_path": "/",
                "upstream": target, "policies": [{"type": "rate-limit", "requests": 1, "per_seconds": 1, "per": "planet"}]})),
        )
        .await;
    assert_eq!(r.status, 422, "{:?}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_metered_per_consumer_api_and_hour() {
    let up = echo_upstream().await;
    let n = Node::start_with("[gateway]\nusage_flush_seconds = 1\n").await;
    seed_tenant(&n, "acme").await; // API payments (api-key), consumer app, plan gold, subscription
    let t = "/admin/v1/tenants/acme";
    let r = n
        .admin(Method::GET, &format!("{t}/apis/payments"), None)
        .await;
    let mut api = r.body.clone();
    api["lifecycle"] = json!("published");
    api["upstream"] = json!({"targets": [{"url": format!("http://{up}")}]});
    let r = n
        .req(
            Method::PUT,
            &format!("{t}/apis/payments"),
            Some(&n.token),
            Some(api),
            &[("if-match", &r.etag())],
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let (key, _) = key_for(&n, "acme", "app").await;
    let gw = Gw::new(&n);
    gw.until("api.bank.example", "/payments/a", Some(&key), 200)
        .await;
    assert_eq!(
        gw.get("api.bank.example", "/payments/b", None).await.0,
        401,
        "refused: not metered"
    );
    let r = gw
        .http
        .post(format!("{}/payments/c", gw.base))
        .header("host", "api.bank.example")
        .header("x-api-key", &key)
        .body("12345")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let echoed = r.bytes().await.unwrap().len() as u64;
    // a client that gives up while the upstream works on its admitted request still used the
    // API: it is metered
    let gone = gw
        .http
        .get(format!("{}/payments/slow", gw.base))
        .header("host", "api.bank.example")
        .header("x-api-key", &key)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(gone.as_ref().is_err_and(|e| e.is_timeout()), "{gone:?}");
    let mut page = Value::Null;
    for _ in 0..100 {
        page = n
            .admin(Method::GET, &format!("{t}/usage?consumer=app"), None)
            .await
            .body;
        if page["totals"]["requests"] == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(page["totals"]["requests"], 3, "{page}");
    assert_eq!(page["totals"]["bytes_in"], 5, "{page}");
    assert!(
        page["totals"]["bytes_out"].as_u64().unwrap() >= echoed,
        "{page}"
    );
    assert_eq!(page["items"][0]["consumer"], "app");
    assert_eq!(page["items"][0]["api"], "payments");
    assert!(
        page["items"][0]["hour"]
            .as_str()
            .unwrap()
            .ends_with(":00:00.000Z"),
        "{page}"
    );
    let r = n
        .admin(Method::GET, &format!("{t}/usage?from=yesterday"), None)
        .await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    let out = n.cli(&["usage", "--tenant", "acme"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("total: 3 requests, 5 bytes in"),
        "{}",
        stdout(&out)
    );
}

/// Waits until the replicated usage counters hold `want` requests of consumer `app`.
async fn metered(n: &Node, tenant: &str, want: u64) {
    let mut used = Value::Null;
    for _ in 0..100 {
        used = n
            .admin(
                Method::GET,
                &format!("/admin/v1/tenants/{tenant}/usage?consumer=app"),
                None,
            )
            .await
            .body;
        if used["totals"]["requests"] == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(used["totals"]["requests"], want, "{used}");
}

/// A plan's quota counts from the replicated usage counters: a node killed and started again
/// still knows what the consumer used today, and this month.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_count_from_the_replicated_usage_and_survive_a_crash() {
    let up = echo_upstream().await;
    let mut n = Node::start_with("[gateway]\nusage_flush_seconds = 1\n").await;
    let t = "/admin/v1/tenants/acme";
    created(&n, "/admin/v1/tenants", json!({"name": "acme"})).await;
    created(
        &n,
        &format!("{t}/plans"),
        json!({"name": "daily", "quota": {"per_day": 4}}),
    )
    .await;
    created(
        &n,
        &format!("{t}/plans"),
        json!({"name": "monthly", "quota": {"per_day": 100, "per_month": 2}}),
    )
    .await;
    for (api, host) in [("pay", "pay.example"), ("info", "info.example")] {
        publish(
            &n,
            "acme",
            json!({"name": api, "version": "v1", "hosts": [host], "base_path": "/",
            "upstream": {"targets": [{"url": format!("http://{up}")}]},
            "policies": [{"type": "api-key"}]}),
        )
        .await;
    }
    created(&n, &format!("{t}/consumers"), json!({"name": "app"})).await;
    for (api, plan) in [("pay", "daily"), ("info", "monthly")] {
        created(
            &n,
            &format!("{t}/subscriptions"),
            json!({"consumer": "app", "api": api, "plan": plan, "status": "active"}),
        )
        .await;
    }
    let (key, _) = key_for(&n, "acme", "app").await;
    let gw = Gw::new(&n);
    assert_eq!(gw.until("pay.example", "/", Some(&key), 200).await.0, 200);
    for _ in 0..2 {
        assert_eq!(gw.get("pay.example", "/", Some(&key)).await.0, 200);
    }
    assert_eq!(gw.until("info.example", "/", Some(&key), 200).await.0, 200);
    // flushed into the replicated state: 3 requests on `pay`, 1 on `info`
    metered(&n, "acme", 4).await;
    // the node's own flushed batch is not counted twice (1 of 2 this month used on `info`)
    assert_eq!(gw.get("info.example", "/", Some(&key)).await.0, 200);
    metered(&n, "acme", 5).await;

    // SIGKILL: nothing more is flushed, and the gateway's memory is gone
    n.kill();
    n.boot().await;
    let gw = Gw::new(&n);
    // one request of the four a day is left on `pay`; `info`'s two a month are used. The
    // answers say so in the IETF RateLimit headers (policies "day" and "month")
    let lines = |h: &reqwest::header::HeaderMap, name: &str| -> Vec<String> {
        h.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or_default().to_string())
            .collect()
    };
    let (s, h, _) = gw.until("pay.example", "/", Some(&key), 200).await;
    assert_eq!(s, 200);
    assert_eq!(lines(&h, "ratelimit-policy"), ["\"day\";q=4;w=86400"]);
    let state = lines(&h, "ratelimit");
    assert!(
        state.len() == 1 && state[0].starts_with("\"day\";r=0;t="),
        "{state:?}"
    );
    for (host, bound) in [("pay.example", 86_400), ("info.example", 31 * 86_400)] {
        let (s, h, b) = gw.get(host, "/", Some(&key)).await;
        assert_eq!(
            (s, b["type"].as_str()),
            (429, Some("urn:apim:problem:gateway:quota-exceeded")),
            "{host}: {b}"
        );
        // the policy of the window used up (a month is its days in seconds), nothing left
        let (policy, window) = if host == "pay.example" {
            ("\"day\";q=4;w=86400", "day")
        } else {
            ("\"month\";q=2;w=", "month")
        };
        let policies = lines(&h, "ratelimit-policy");
        assert!(
            policies.len() == 1 && policies[0].starts_with(policy),
            "{host}: {policies:?}"
        );
        assert!(
            lines(&h, "ratelimit")
                .concat()
                .starts_with(&format!("\"{window}\";r=0;t=")),
            "{host}: {h:?}"
        );
        let retry: u64 = h
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("retry-after");
        assert!((1..=bound).contains(&retry), "{host}: {retry}");
    }
    // refused requests are neither counted nor metered
    metered(&n, "acme", 6).await;
}

/// Header policies (remove, rename, add, both ways), the request size limit, expired keys and
/// another tenant's key, each allowed and refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_size_and_key_policies_allow_and_refuse() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = echo_upstream().await;
    let n = Node::start().await;
    let t = "/admin/v1/tenants/acme";
    for tenant in ["acme", "other"] {
        created(&n, "/admin/v1/tenants", json!({"name": tenant})).await;
        created(
            &n,
            &format!("/admin/v1/tenants/{tenant}/consumers"),
            json!({"name": "app"}),
        )
        .await;
    }
    created(&n, &format!("{t}/plans"), json!({"name": "p"})).await;
    let target = json!({"targets": [{"url": format!("http://{up}")}]});
    publish(
        &n,
        "acme",
        json!({"name": "shaped", "version": "v1", "hosts": ["shaped.example"], "base_path": "/",
        "upstream": target, "policies": [
            {"type": "api-key"},
            {"type": "request-size-limit", "max_bytes": 10},
            {"type": "request-headers", "remove": ["x-drop"],
             "rename": [{"from": "x-client-id", "to": "x-partner-id"}],
             "add": [{"name": "x-gateway", "value": "apim"}]},
            {"type": "response-headers", "remove": ["content-type"],
             "rename": [{"from": "date", "to": "x-upstream-date"}],
             "add": [{"name": "x-api", "value": "shaped"}]}
        ]}),
    )
    .await;
    created(
        &n,
        &format!("{t}/subscriptions"),
        json!({"consumer": "app", "api": "shaped", "plan": "p", "status": "active"}),
    )
    .await;
    // policies may not set the message's framing, connection or host
    for (policy, field) in [
        (
            json!({"type": "request-headers", "add": [{"name": "Content-Length", "value": "1"}]}),
            "policies[0].add[0].name",
        ),
        (
            json!({"type": "response-headers", "rename": [{"from": "x-a", "to": "transfer-encoding"}]}),
            "policies[0].rename[0].to",
        ),
        (
            json!({"type": "request-headers", "rename": [{"from": "x-a", "to": "X-A"}]}),
            "policies[0].rename[0].to",
        ),
    ] {
        let r = n
            .admin(
                Method::POST,
                &format!("{t}/apis"),
                Some(
                    json!({"name": "bad", "version": "v1", "hosts": ["bad.example"],
                    "base_path": "/", "upstream": target, "policies": [policy]}),
                ),
            )
            .await;
        assert_eq!(r.status, 422, "{:?}", r.body);
        assert_eq!(r.body["invalid-params"][0]["name"], field, "{:?}", r.body);
    }
    let (key, _) = key_for(&n, "acme", "app").await;
    let (other_key, _) = key_for(&n, "other", "app").await;
    // (whole seconds: 5 s from now, at least 4 from the next second)
    let soon = (time::OffsetDateTime::now_utc() + time::Duration::seconds(5))
        .replace_nanosecond(0)
        .unwrap();
    let expiry = soon
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let r = n
        .admin(
            Method::POST,
            &format!("{t}/consumers/app/keys"),
            Some(json!({"expires_at": expiry})),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let expiring = r.body["key"].as_str().unwrap().to_string();
    let gw = Gw::new(&n);
    gw.until("shaped.example", "/", Some(&key), 200).await;
    // the expiring key works while it is valid (once the table holds it)
    let (s, _, _) = gw.until("shaped.example", "/", Some(&expiring), 200).await;
    assert_eq!(s, 200, "the expiring key works before its expiry");

    let send = |key: &str, body: &'static str| {
        gw.http
            .post(format!("{}/x", gw.base))
            .header("host", "shaped.example")
            .header("x-api-key", key)
            .header("x-drop", "1")
            .header("x-client-id", "partner-42")
            .body(body)
            .send()
    };
    let r = send(&key, "hello").await.unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    assert!(h.get("content-type").is_none(), "removed: {h:?}");
    assert!(h.get("x-upstream-date").is_some(), "renamed: {h:?}");
    assert_eq!(h.get("x-api").and_then(|v| v.to_str().ok()), Some("shaped"));
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["body"], "hello");
    assert!(e["headers"].get("x-drop").is_none(), "{e}");
    assert!(e["headers"].get("x-client-id").is_none(), "{e}");
    assert_eq!(e["headers"]["x-partner-id"], "partner-42", "{e}");
    assert_eq!(e["headers"]["x-gateway"], "apim", "{e}");
    // over the limit: 413; no declared length: 411
    let r = send(&key, "01234567890").await.unwrap();
    assert_eq!(r.status(), 413);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["type"], "urn:apim:problem:gateway:body-too-large");
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", n.gateway_port))
        .await
        .unwrap();
    let head = format!(
        "POST /x HTTP/1.1\r\nHost: shaped.example\r\nx-api-key: {key}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    c.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    c.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 411"), "{answer}");
    assert!(answer.contains("length-required"), "{answer}");

    // another tenant's key, and a key past its expiry: the same 401 as a wrong key
    let r = send(&other_key, "x").await.unwrap();
    assert_eq!(r.status(), 401);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["type"], "urn:apim:problem:gateway:invalid-credential");
    let wait = soon - time::OffsetDateTime::now_utc() + time::Duration::milliseconds(500);
    tokio::time::sleep(Duration::try_from(wait).unwrap_or_default()).await;
    let r = send(&expiring, "x").await.unwrap();
    assert_eq!(r.status(), 401);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["type"], "urn:apim:problem:gateway:invalid-credential");
}

/// `gateway.max_connections` caps the connections open at once: one more is closed as soon as
/// accepted, and a freed slot serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_closes_connections_beyond_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let n = Node::start_with("[gateway]\nmax_connections = 2\n").await;
    let open = || tokio::net::TcpStream::connect(("127.0.0.1", n.gateway_port));
    // both are served (no route: 404), so both hold their slots
    let mut buf = [0u8; 1024];
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = open().await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: none.example\r\n\r\n")
            .await
            .unwrap();
        let k = c.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..k]).starts_with("HTTP/1.1 404"));
        held.push(c);
    }
    let mut third = open().await.unwrap();
    let _ = third
        .write_all(b"GET / HTTP/1.1\r\nHost: none.example\r\n\r\n")
        .await;
    let got = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("closed, not left waiting");
    assert!(
        matches!(got, Ok(0) | Err(_)),
        "the third connection is closed without an answer: {got:?}"
    );
    // a slot freed serves again
    drop(held.pop());
    let mut answered = false;
    for _ in 0..50 {
        let mut c = open().await.unwrap();
        let _ = c
            .write_all(b"GET / HTTP/1.1\r\nHost: none.example\r\n\r\n")
            .await;
        if let Ok(Ok(k)) = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf)).await {
            if k > 0 && buf.starts_with(b"HTTP/1.1 404") {
                answered = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(answered, "a freed slot serves a new connection");
}

/// On SIGTERM a request in flight is answered in full (its connection then closed) before the
/// node exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_finish_when_the_node_stops() {
    let up = echo_upstream().await;
    let mut n = Node::start().await;
    created(&n, "/admin/v1/tenants", json!({"name": "acme"})).await;
    publish(
        &n,
        "acme",
        json!({"name": "slow", "version": "v1", "hosts": ["slow.example"], "base_path": "/",
        "upstream": {"targets": [{"url": format!("http://{up}")}]}, "policies": []}),
    )
    .await;
    let gw = Gw::new(&n);
    gw.until("slow.example", "/", None, 200).await;
    // the echo upstream answers `/slow` after 3 s
    let url = format!("{}/slow", gw.base);
    let http = gw.http.clone();
    let in_flight = tokio::spawn(async move {
        let r = http
            .get(url)
            .header("host", "slow.example")
            .send()
            .await
            .expect("answered");
        let close = r
            .headers()
            .get("connection")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        (r.status().as_u16(), close, r.json::<Value>().await.ok())
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let started = std::time::Instant::now();
    let (code, n) = tokio::task::spawn_blocking(move || {
        let code = n.terminate();
        (code, n)
    })
    .await
    .unwrap();
    let (status, close, body) = in_flight.await.unwrap();
    assert_eq!(status, 200, "the request in flight is answered");
    assert_eq!(body.map(|b| b["uri"].clone()), Some(json!("/slow")));
    assert_eq!(close.as_deref(), Some("close"), "and its connection closed");
    assert_eq!(code, Some(0), "a clean exit; log:\n{}", n.log());
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "the node waited for the answer ({:?})",
        started.elapsed()
    );
}

/// A request body that stops coming, or breaks, is the client's fault: 408 after the idle
/// timeout (before the response timeout), 400 for a broken one; no answer blames the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_that_stop_or_break_are_the_clients_fault() {
    let up = echo_upstream().await;
    let n = Node::start_with(
        "[gateway]\nidle_timeout_seconds = 2\nupstream_response_timeout_seconds = 6\n",
    )
    .await;
    created(&n, "/admin/v1/tenants", json!({"name": "acme"})).await;
    publish(
        &n,
        "acme",
        json!({"name": "echo", "version": "v1", "hosts": ["echo.example"], "base_path": "/",
        "upstream": {"targets": [{"url": format!("http://{up}")}]}, "policies": []}),
    )
    .await;
    let gw = Gw::new(&n);
    gw.until("echo.example", "/", None, 200).await;
    for (request, status) in [
        (
            &b"POST /up HTTP/1.1\r\nHost: echo.example\r\nContent-Length: 1000\r\n\r\n0123456789"[..],
            "HTTP/1.1 408",
        ),
        (
            &b"POST /up HTTP/1.1\r\nHost: echo.example\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"[..],
            "HTTP/1.1 400",
        ),
    ] {
        let started = std::time::Instant::now();
        let text = raw_head(n.gateway_port, request).await;
        assert!(text.starts_with(status), "{status}: {text}");
        if status.ends_with("408") {
            let took = started.elapsed();
            assert!(
                took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
                "{took:?}"
            );
        }
    }
    // the response timeout shorter than the idle timeout (as by default): the deadline finds
    // the gateway waiting for the client's body, still 408
    publish(
        &n,
        "acme",
        json!({"name": "brisk", "version": "v1", "hosts": ["brisk.example"], "base_path": "/",
        "upstream": {"targets": [{"url": format!("http://{up}")}], "timeouts": {"response_seconds": 1}},
        "policies": []}),
    )
    .await;
    gw.until("brisk.example", "/", None, 200).await;
    let text = raw_head(
        n.gateway_port,
        b"POST /up HTTP/1.1\r\nHost: brisk.example\r\nContent-Length: 1000\r\n\r\n01234",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let m = metrics(&n).await;
    for cause in ["request-timeout", "bad-request-body"] {
        assert!(
            m.lines().any(
                |l| l.starts_with(&format!("apim_gateway_refusals_total{{cause=\"{cause}\"}}"))
            ),
            "{cause}: {m}"
        );
    }
}
