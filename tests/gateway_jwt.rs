//! The JWT bearer policy against forged tokens: a real signing key, a static JWKS (air-gapped
//! sites), and every way a token can be wrong answered with the same 401.

mod common;
use base64::Engine as _;
use common::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

struct Issuer {
    key: jsonwebtoken::EncodingKey,
    jwks: String,
    x: Vec<u8>,
}

fn issuer() -> Issuer {
    apim::pki::install_crypto_provider();
    let pair = rcgen::KeyPair::generate().expect("P-256 key");
    let point = pair.public_key_raw(); // 0x04 || X || Y
    let (x, y) = (&point[1..33], &point[33..65]);
    let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "x": b64(x), "y": b64(y), "kid": "k1", "alg": "ES256", "use": "sig"}]});
    Issuer {
        key: jsonwebtoken::EncodingKey::from_ec_der(&pair.serialize_der()),
        jwks: jwks.to_string(),
        x: x.to_vec(),
    }
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn token(iss: &Issuer, kid: &str, claims: Value) -> String {
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some(kid.to_string());
    jsonwebtoken::encode(&h, &claims, &iss.key).expect("sign")
}

fn claims(sub: &str, aud: &str, exp_in: i64, scope: &str) -> Value {
    json!({"iss": "https://idp.bank.example", "aud": aud, "sub": sub, "exp": now() + exp_in, "nbf": now() - 10, "scope": scope})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_policy_accepts_good_tokens_and_refuses_forged_ones() {
    let idp = issuer();
    let n = Node::start().await;
    let t = "/admin/v1/tenants/acme";
    created(&n, "/admin/v1/tenants", json!({"name": "acme"})).await;
    let up = echo_upstream().await;
    let api = json!({"name": "accounts", "version": "v1", "hosts": ["psd2.bank.example"], "base_path": "/",
        "upstream": {"targets": [{"url": format!("http://{up}")}]}, "lifecycle": "published",
        "policies": [{"type": "jwt", "issuer": "https://idp.bank.example", "audience": "accounts",
            "jwks": idp.jwks, "algorithms": ["ES256"], "required_scopes": ["accounts:read"], "consumer_claim": "sub"}]});
    let r = n.admin(Method::POST, &format!("{t}/apis"), Some(api)).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    created(&n, &format!("{t}/plans"), json!({"name": "p"})).await;
    created(&n, &format!("{t}/consumers"), json!({"name": "tpp-1"})).await;
    created(
        &n,
        &format!("{t}/subscriptions"),
        json!({"consumer": "tpp-1", "api": "accounts", "plan": "p", "status": "active"}),
    )
    .await;

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let gw = format!("http://127.0.0.1:{}/accounts", n.gateway_port);
    let call = |auth: Option<String>| {
        let mut r = http.get(&gw).header("host", "psd2.bank.example");
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        async move {
            let r = r.send().await.expect("answer");
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let good = token(
        &idp,
        "k1",
        claims("tpp-1", "accounts", 300, "accounts:read payments:write"),
    );
    let mut ok = (0, Value::Null);
    for _ in 0..100 {
        ok = call(Some(format!("Bearer {good}"))).await;
        if ok.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(ok.0, 200, "{:?}", ok.1);

    // header and payload of the good token, for forgeries
    let parts: Vec<&str> = good.split('.').collect();
    // change one character in the middle of the signature (the last one may only carry padding
    // bits, which decode to the same bytes)
    let tampered = {
        let mut sig: Vec<u8> = parts[2].as_bytes().to_vec();
        let mid = sig.len() / 2;
        sig[mid] = if sig[mid] == b'A' { b'B' } else { b'A' };
        format!(
            "{}.{}.{}",
            parts[0],
            parts[1],
            String::from_utf8(sig).expect("base64url")
        )
    };
    let none = format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), parts[1]);
    let hs256 = {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        h.kid = Some("k1".into());
        jsonwebtoken::encode(
            &h,
            &claims("tpp-1", "accounts", 300, "accounts:read"),
            &jsonwebtoken::EncodingKey::from_secret(&idp.x).expect("hmac key"),
        )
        .expect("hs256")
    };
    let other_idp = issuer();
    let cases: Vec<(&str, String)> = vec![
        (
            "expired",
            token(
                &idp,
                "k1",
                claims("tpp-1", "accounts", -3600, "accounts:read"),
            ),
        ),
        (
            "wrong audience",
            token(
                &idp,
                "k1",
                claims("tpp-1", "payments", 300, "accounts:read"),
            ),
        ),
        ("tampered signature", tampered),
        (
            "unknown kid",
            token(
                &idp,
                "k9",
                claims("tpp-1", "accounts", 300, "accounts:read"),
            ),
        ),
        ("alg none", none),
        ("HMAC with the public key", hs256),
        (
            "other issuer's key",
            token(
                &other_idp,
                "k1",
                claims("tpp-1", "accounts", 300, "accounts:read"),
            ),
        ),
        ("garbage", "not.a.jwt".into()),
    ];
    for (what, tok) in cases {
        let (s, b) = call(Some(format!("Bearer {tok}"))).await;
        assert_eq!(
            (s, b["type"].as_str()),
            (401, Some("urn:apim:problem:gateway:invalid-credential")),
            "{what}"
        );
        assert_eq!(
            b["detail"], "the token is not valid for this API",
            "{what}: no hint of which check failed"
        );
    }
    let (s, b) = call(None).await;
    assert_eq!(
        (s, b["type"].as_str()),
        (401, Some("urn:apim:problem:gateway:missing-credential"))
    );
    let (s, b) = call(Some(format!(
        "Bearer {}",
        token(
            &idp,
            "k1",
            claims("tpp-1", "accounts", 300, "payments:write")
        )
    )))
    .await;
    assert_eq!(
        (s, b["type"].as_str()),
        (403, Some("urn:apim:problem:gateway:insufficient-scope"))
    );
    let (s, b) = call(Some(format!(
        "Bearer {}",
        token(
            &idp,
            "k1",
            claims("tpp-2", "accounts", 300, "accounts:read")
        )
    )))
    .await;
    assert_eq!(
        (s, b["type"].as_str()),
        (403, Some("urn:apim:problem:gateway:not-subscribed"))
    );

    // a JWKS with a symmetric key is refused at configuration time
    let bad = json!({"name": "sym", "version": "v1", "hosts": ["x.example"], "base_path": "/",
        "upstream": {"targets": [{"url": "http://127.0.0.1:1"}]},
        "policies": [{"type": "jwt", "issuer": "i", "audience": "a", "jwks": json!({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "s"}]}).to_string()}]});
    let r = n.admin(Method::POST, &format!("{t}/apis"), Some(bad)).await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert!(
        r.body["invalid-params"][0]["name"]
            .as_str()
            .unwrap_or("")
            .starts_with("policies[0].jwks"),
        "{:?}",
        r.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_match_by_path_method_and_header_with_scopes_per_route() {
    let idp = issuer();
    let n = Node::start().await;
    let t = "/admin/v1/tenants/acme";
    created(&n, "/admin/v1/tenants", json!({"name": "acme"})).await;
    let up = echo_upstream().await;
    let api = json!({"name": "pay", "version": "v1", "hosts": ["pay.example"], "base_path": "/pay",
    "upstream": {"targets": [{"url": format!("http://{up}")}]}, "lifecycle": "published",
    "policies": [{"type": "jwt", "issuer": "https://idp.bank.example", "audience": "pay", "jwks": idp.jwks}],
    "routes": [
        {"path": "/orders", "methods": ["GET"], "required_scopes": ["orders:read"]},
        {"path": "/orders", "methods": ["POST"], "required_scopes": ["orders:write"]},
        {"path": "/orders/export", "path_match": "exact", "methods": ["GET"],
         "headers": [{"name": "X-Export", "value": "csv"}], "required_scopes": ["orders:export"]},
    ]});
    created(&n, &format!("{t}/apis"), api).await;
    let http = reqwest::Client::new();
    let call = |method: Method, path: &str, scope: &str, export: bool| {
        let tok = token(&idp, "k1", claims("app", "pay", 300, scope));
        let mut r = http
            .request(method, format!("http://127.0.0.1:{}{path}", n.gateway_port))
            .header("host", "pay.example")
            .header("authorization", format!("Bearer {tok}"));
        if export {
            r = r.header("x-export", "csv");
        }
        async move {
            let r = r.send().await.expect("answer");
            let allow = r
                .headers()
                .get("allow")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let s = r.status().as_u16();
            (s, allow, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let mut first = (0, String::new(), Value::Null);
    for _ in 0..100 {
        first = call(Method::GET, "/pay/orders/1", "orders:read", false).await;
        if first.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(first.0, 200, "{:?}", first.2);
    // the scope belongs to the operation
    let (s, _, b) = call(Method::POST, "/pay/orders", "orders:read", false).await;
    assert_eq!(
        (s, b["type"].as_str()),
        (403, Some("urn:apim:problem:gateway:insufficient-scope"))
    );
    assert_eq!(
        call(Method::POST, "/pay/orders", "orders:write", false)
            .await
            .0,
        200
    );
    // the exact route with its header is more specific than the /orders prefix
    let (s, _, _) = call(Method::GET, "/pay/orders/export", "orders:read", true).await;
    assert_eq!(s, 403, "needs orders:export");
    assert_eq!(
        call(Method::GET, "/pay/orders/export", "orders:export", true)
            .await
            .0,
        200
    );
    // without the header the /orders prefix route applies
    assert_eq!(
        call(Method::GET, "/pay/orders/export", "orders:read", false)
            .await
            .0,
        200
    );
    // a path no operation has, and a method none allows
    let (s, _, b) = call(Method::GET, "/pay/refunds", "orders:read", false).await;
    assert_eq!(
        (s, b["type"].as_str()),
        (404, Some("urn:apim:problem:gateway:no-route"))
    );
    let (s, allow, b) = call(Method::DELETE, "/pay/orders/1", "orders:read", false).await;
    assert_eq!(
        (s, b["type"].as_str()),
        (405, Some("urn:apim:problem:gateway:method-not-allowed"))
    );
    assert_eq!(allow, "GET, POST");
    // bad operations are refused with their field
    let bad = json!({"name": "bad", "version": "v1", "hosts": ["b.example"], "base_path": "/",
        "upstream": {"targets": [{"url": "http://127.0.0.1:1"}]},
        "routes": [{"path": "/x", "methods": ["FETCH"]}]});
    let r = n.admin(Method::POST, &format!("{t}/apis"), Some(bad)).await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(r.body["invalid-params"][0]["name"], "routes[0].methods[0]");
    // scopes on an operation need a jwt policy to read them from
    let bad = json!({"name": "bad", "version": "v1", "hosts": ["b.example"], "base_path": "/",
        "upstream": {"targets": [{"url": "http://127.0.0.1:1"}]},
        "routes": [{"path": "/x", "required_scopes": ["x:read"]}]});
    let r = n.admin(Method::POST, &format!("{t}/apis"), Some(bad)).await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(
        r.body["invalid-params"][0]["name"],
        "routes[0].required_scopes"
    );
}

/// An HTTPS key server on loopback answering `GET /jwks` with the current document; returns
/// its address and the PEM of the CA that issued its certificate.
async fn key_server(
    doc: std::sync::Arc<std::sync::Mutex<String>>,
) -> (std::net::SocketAddr, String) {
    use std::sync::Arc;
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca_pem = ca_cert.pem();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, doc) = (acceptor.clone(), doc.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |_req| {
                    let body = doc.lock().unwrap().clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(body)),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, ca_pem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_url_keys_are_fetched_cached_and_follow_a_rotation() {
    let first = issuer();
    let second = issuer();
    let second_jwks = second.jwks.replace("\"k1\"", "\"k2\"");
    let doc = std::sync::Arc::new(std::sync::Mutex::new(first.jwks.clone()));
    let (idp, idp_ca) = key_server(doc.clone()).await;
    let n = Node::start().await;
    let t = "/admin/v1/tenants/acme";
    created(&n, "/admin/v1/tenants", json!({"name": "acme"})).await;
    let up = echo_upstream().await;
    let policy = |url: String, ca: Option<&str>| {
        json!([{"type": "jwt", "issuer": "https://idp.bank.example", "audience": "accounts",
                "jwks_url": url, "jwks_ca_bundle": ca}])
    };
    let api = |policies: Value| {
        json!({"name": "remote", "version": "v1", "hosts": ["remote.example"], "base_path": "/",
            "upstream": {"targets": [{"url": format!("http://{up}")}]}, "lifecycle": "published",
            "policies": policies})
    };
    // the key server's CA is required, and only https is accepted
    for (policies, field) in [
        (
            policy(format!("https://{idp}/jwks"), None),
            "policies[0].jwks_ca_bundle",
        ),
        (
            policy(format!("http://{idp}/jwks"), Some(&idp_ca)),
            "policies[0].jwks_url",
        ),
    ] {
        let r = n
            .admin(Method::POST, &format!("{t}/apis"), Some(api(policies)))
            .await;
        assert_eq!(r.status, 422, "{:?}", r.body);
        assert_eq!(r.body["invalid-params"][0]["name"], field);
    }
    created(
        &n,
        &format!("{t}/apis"),
        api(policy(format!("https://{idp}/jwks"), Some(&idp_ca))),
    )
    .await;

    let http = reqwest::Client::new();
    let call = |tok: String| {
        let r = http
            .get(format!("http://127.0.0.1:{}/x", n.gateway_port))
            .header("host", "remote.example")
            .header("authorization", format!("Bearer {tok}"));
        async move { r.send().await.expect("answer").status().as_u16() }
    };
    let t1 = token(&first, "k1", claims("app", "accounts", 300, ""));
    let mut s = 0;
    for _ in 0..200 {
        s = call(t1.clone()).await;
        if s == 200 {
            break;
        }
        assert!(
            s == 503 || s == 404,
            "before the first fetch the policy fails closed, got {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(s, 200, "keys fetched from the URL");

    // the issuer rotates to k2: a token with the unknown kid asks for an early refresh
    *doc.lock().unwrap() = second_jwks;
    let t2 = token(&second, "k2", claims("app", "accounts", 300, ""));
    assert_eq!(call(t2.clone()).await, 401);
    let mut s = 0;
    for _ in 0..100 {
        s = call(t2.clone()).await;
        if s == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s, 200, "the rotated key was fetched early");
    assert_eq!(call(t1).await, 401, "the retired key is gone");
}
