//! The OpenAPI document and the router agree: every documented operation is routed (it never
//! falls to the "no such endpoint" 404 or to 405).

mod common;
use common::*;
use reqwest::Method;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_routed() {
    let n = Node::start().await;
    seed_tenant(&n, "acme").await;
    let doc = n
        .req(Method::GET, "/admin/v1/openapi.json", None, None, &[])
        .await
        .body;
    let paths = doc["paths"].as_object().expect("paths");
    let mut checked = 0;
    for (path, item) in paths {
        let concrete = path
            .replace("{tenant}", "acme")
            .replace("{consumer}", "app")
            .replace("{user}", "nobody")
            .replace("{name}", "nothing-here")
            .replace("{id}", "nothing-here");
        for (method, _) in item.as_object().expect("path item") {
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            let body = matches!(m, Method::POST | Method::PUT).then(|| serde_json::json!({}));
            let r = n
                .req(
                    m.clone(),
                    &concrete,
                    Some(&n.token),
                    body,
                    &[("if-match", "*")],
                )
                .await;
            assert_ne!(
                r.status, 405,
                "{method} {path} is documented but not routed"
            );
            let detail = r.body["detail"].as_str().unwrap_or_default();
            assert!(
                !detail.contains("no such endpoint"),
                "{method} {path} is documented but not routed"
            );
            checked += 1;
        }
    }
    assert!(checked >= 50, "only {checked} operations documented");
}
