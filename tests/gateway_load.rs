//! Volume through the gateway: 1 GiB request and response bodies streamed with the gateway's
//! memory bounded, and configuration changes committed during a load run losing no request.

mod common;
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use reqwest::Method;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const GIB: u64 = 1 << 30;
const CHUNK: usize = 64 * 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `total` bytes in 64 KiB chunks, generated as they are polled.
fn generated(
    total: u64,
) -> StreamBody<impl futures::Stream<Item = Result<Frame<Bytes>, BoxError>>> {
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    StreamBody::new(futures::stream::unfold(0u64, move |sent| {
        let chunk = chunk.clone();
        async move {
            (sent < total).then(|| {
                let n = (total - sent).min(CHUNK as u64) as usize;
                (Ok(Frame::data(chunk.slice(..n))), sent + n as u64)
            })
        }
    }))
}

/// An upstream with `POST /sink` (counts the body, answers the count) and `GET /source`
/// (answers 1 GiB).
async fn bulk_upstream() -> SocketAddr {
    http_upstream(|req: hyper::Request<hyper::body::Incoming>| async move {
        if req.uri().path() == "/source" {
            return hyper::Response::new(generated(GIB).boxed());
        }
        let mut body = req.into_body();
        let mut n = 0u64;
        while let Some(Ok(f)) = body.frame().await {
            if let Some(d) = f.data_ref() {
                n += d.len() as u64;
            }
        }
        let answer = http_body_util::Full::new(Bytes::from(n.to_string()))
            .map_err(|e| match e {})
            .boxed();
        hyper::Response::new(answer)
    })
    .await
}

/// Peak resident memory of a process (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

async fn publish(n: &Node, name: &str, up: SocketAddr) -> reqwest::header::HeaderMap {
    let r = n
        .admin(
            Method::POST,
            "/admin/v1/tenants/acme/apis",
            Some(json!({
                "name": name, "version": "v1", "hosts": [format!("{name}.example")],
                "base_path": "/", "lifecycle": "published",
                "upstream": {"targets": [{"url": format!("http://{up}")}]},
            })),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    r.headers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_streams_both_ways_in_bounded_memory() {
    let n = Node::start().await;
    created(&n, "/admin/v1/tenants", json!({"name": "acme"})).await;
    let up = bulk_upstream().await;
    publish(&n, "bulk", up).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::combinators::BoxBody<Bytes, BoxError>>();
    let url: hyper::Uri = format!("http://127.0.0.1:{}/sink", n.gateway_port)
        .parse()
        .unwrap();
    // wait for the route
    for _ in 0..200 {
        let req = hyper::Request::get(url.clone())
            .header("host", "bulk.example")
            .body(http_body_util::Empty::new().map_err(|e| match e {}).boxed())
            .unwrap();
        if client
            .request(req)
            .await
            .is_ok_and(|r| r.status() == hyper::StatusCode::OK)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let before = peak_rss_kib(n.pid());

    // 1 GiB up: the upstream counts every byte
    let req = hyper::Request::post(url.clone())
        .header("host", "bulk.example")
        .body(generated(GIB).boxed())
        .unwrap();
    let resp = client.request(req).await.expect("upload answered");
    assert_eq!(resp.status(), 200);
    let counted = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&counted), GIB.to_string());

    // 1 GiB down
    let req = hyper::Request::get(format!("http://127.0.0.1:{}/source", n.gateway_port))
        .header("host", "bulk.example")
        .body(http_body_util::Empty::new().map_err(|e| match e {}).boxed())
        .unwrap();
    let resp = client.request(req).await.expect("download answered");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut received = 0u64;
    while let Some(f) = body.frame().await {
        if let Some(d) = f.expect("frame").data_ref() {
            received += d.len() as u64;
        }
    }
    assert_eq!(received, GIB);

    let after = peak_rss_kib(n.pid());
    println!("gateway peak RSS: {before} KiB before, {after} KiB after 2 GiB streamed");
    assert!(
        after <= before + 48 * 1024,
        "the gateway's peak RSS grew by {} KiB while streaming",
        after - before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_changes_during_load_lose_no_request() {
    let n = Node::start().await;
    created(&n, "/admin/v1/tenants", json!({"name": "acme"})).await;
    let up = echo_upstream().await;
    let mut etag = publish(&n, "busy", up)
        .await
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .unwrap()
        .to_string();
    let base = format!("http://127.0.0.1:{}", n.gateway_port);
    let http = reqwest::Client::new();
    for _ in 0..200 {
        let r = http
            .get(format!("{base}/"))
            .header("host", "busy.example")
            .send()
            .await;
        if r.map(|r| r.status() == 200).unwrap_or(false) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let ok = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..4 {
        let http = http.clone();
        let base = base.clone();
        let ok = ok.clone();
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            for i in 0..250 {
                match http
                    .get(format!("{base}/w{w}/{i}"))
                    .header("host", "busy.example")
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures.push(format!("{w}/{i}: {}", r.status())),
                    Err(e) => failures.push(format!("{w}/{i}: {e}")),
                }
            }
            failures
        }));
    }
    // meanwhile: new APIs, and the busy API itself changed, committed one after another
    for i in 0..15 {
        publish(&n, &format!("other{i}"), up).await;
        let r = n
            .req(
                Method::PUT,
                "/admin/v1/tenants/acme/apis/busy",
                Some(&n.token),
                Some(json!({
                    "name": "busy", "version": "v1", "hosts": ["busy.example"], "base_path": "/",
                    "lifecycle": "published",
                    "upstream": {"targets": [{"url": format!("http://{up}")}]},
                    "policies": [{"type": "response-headers", "add": [{"name": "x-generation", "value": i.to_string()}]}],
                })),
                &[("if-match", &etag)],
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        etag = r.etag();
    }
    let mut failures = Vec::new();
    for w in workers {
        failures.extend(w.await.unwrap());
    }
    assert!(failures.is_empty(), "lost requests: {failures:?}");
    assert_eq!(ok.load(Ordering::Relaxed), 1000);
    // and the last change is what is served now
    let mut generation = String::new();
    for _ in 0..100 {
        let r = http
            .get(format!("{base}/"))
            .header("host", "busy.example")
            .send()
            .await
            .unwrap();
        generation = r
            .headers()
            .get("x-generation")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        if generation == "14" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(generation, "14");
}
