//! Upstream resilience end to end, with real upstreams on loopback: refused, reset and slow
//! upstreams mapped to 502 / 504, retries only when safe, passive ejection (circuit breaker)
//! and the 503 once every target is out, active health checks, least-requests balancing.

mod common;
use common::*;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// An upstream that echoes its own address; `/health` answers 200 or 503 as `healthy` says;
/// `/slow` waits two seconds.
async fn upstream(healthy: Arc<AtomicBool>) -> SocketAddr {
    // the address is known once bound: the handler reads it from here
    let me = Arc::new(std::sync::OnceLock::<SocketAddr>::new());
    let mine = me.clone();
    let addr = http_upstream(move |req: hyper::Request<hyper::body::Incoming>| {
        let (healthy, me) = (healthy.clone(), mine.clone());
        async move {
            let status = match req.uri().path() {
                "/health" if !healthy.load(Ordering::SeqCst) => 503,
                "/slow" => {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    200
                }
                _ => 200,
            };
            let served_by = me.get().map(|a| a.to_string()).unwrap_or_default();
            let body = json!({"served_by": served_by, "method": req.method().as_str()});
            hyper::Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(
                    body.to_string(),
                )))
                .unwrap()
        }
    })
    .await;
    me.set(addr).expect("set once");
    addr
}

/// An upstream that reads the request head, writes `reply` (if any), and resets the connection.
async fn raw_upstream(reply: &'static [u8]) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 4096];
                let _ = tcp.read(&mut buf).await;
                if !reply.is_empty() {
                    let _ = tcp.write_all(reply).await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let _ = tcp.set_zero_linger(); // close with a TCP reset
                drop(tcp);
            });
        }
    });
    addr
}

/// An upstream that reads the request head and closes the connection without answering.
async fn resetting_upstream() -> SocketAddr {
    raw_upstream(b"").await
}

/// An upstream that answers a good head, sends part of the body it announced, and resets the
/// connection.
async fn breaking_upstream() -> SocketAddr {
    raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{\"served_by\"").await
}

/// A loopback address nothing listens on.
fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

async fn publish(n: &Node, name: &str, upstream: Value) {
    created(
        n,
        "/admin/v1/tenants/acme/apis",
        json!({
            "name": name, "version": "v1", "hosts": [format!("{name}.example")],
            "base_path": "/", "lifecycle": "published", "upstream": upstream,
        }),
    )
    .await;
}

fn targets(addrs: &[SocketAddr]) -> Value {
    Value::Array(
        addrs
            .iter()
            .map(|a| json!({"url": format!("http://{a}")}))
            .collect(),
    )
}

struct Gw {
    http: reqwest::Client,
    base: String,
}

impl Gw {
    async fn call(
        &self,
        method: reqwest::Method,
        host: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, Value) {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("host", host);
        if let Some(b) = body {
            r = r.body(b.to_string());
        }
        let resp = r.send().await.expect("gateway answered");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, host: &str, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, host, path, None).await
    }

    /// Waits until the routing table serves `host` (tables swap after the commit).
    async fn ready(&self, host: &str) {
        for _ in 0..200 {
            let (s, b) = self.get(host, "/").await;
            if s != 404 || b["type"] != "urn:apim:problem:gateway:no-route" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{host} never routed");
    }
}

async fn node() -> (Node, Gw) {
    node_with("[gateway]\nupstream_response_timeout_seconds = 1\n").await
}

async fn node_with(config: &str) -> (Node, Gw) {
    let n = Node::start_with(config).await;
    created(&n, "/admin/v1/tenants", json!({"name": "acme"})).await;
    let gw = Gw {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap(),
        base: format!("http://127.0.0.1:{}", n.gateway_port),
    };
    (n, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_map_to_502_504_and_safe_retries_hide_a_dead_target() {
    let (n, gw) = node().await;
    let up = Arc::new(AtomicBool::new(true));
    let live = upstream(up.clone()).await;
    let dead = closed_port();
    let reset = resetting_upstream().await;

    // refused, reset and slow upstreams, no retries
    publish(
        &n,
        "refused",
        json!({"targets": targets(&[dead]), "retries": 0}),
    )
    .await;
    publish(
        &n,
        "reset",
        json!({"targets": targets(&[reset]), "retries": 0}),
    )
    .await;
    publish(&n, "slow", json!({"targets": targets(&[live])})).await;
    gw.ready("slow.example").await;
    let (s, b) = gw.get("refused.example", "/").await;
    assert_eq!(
        (s, b["type"].as_str()),
        (502, Some("urn:apim:problem:gateway:upstream-unavailable"))
    );
    let (s, b) = gw.get("reset.example", "/").await;
    assert_eq!(
        (s, b["type"].as_str()),
        (502, Some("urn:apim:problem:gateway:upstream-failed"))
    );
    let (s, b) = gw.get("slow.example", "/slow").await;
    assert_eq!(
        (s, b["type"].as_str()),
        (504, Some("urn:apim:problem:gateway:upstream-timeout"))
    );
    assert!(
        !b.to_string().contains("127.0.0.1"),
        "no upstream internals: {b}"
    );

    // [dead, reset, live] with two retries: every bodyless GET is answered by the live target
    publish(
        &n,
        "retry",
        json!({"targets": targets(&[dead, reset, live]), "retries": 2,
               "ejection": {"consecutive_failures": 1000, "ejection_seconds": 1}}),
    )
    .await;
    gw.ready("retry.example").await;
    for _ in 0..9 {
        let (s, b) = gw.get("retry.example", "/x").await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["served_by"], live.to_string());
    }
    // a POST with a body is never replayed: it fails where it lands
    let mut outcomes = Vec::new();
    for _ in 0..6 {
        outcomes.push(
            gw.call(
                reqwest::Method::POST,
                "retry.example",
                "/x",
                Some("payload"),
            )
            .await
            .0,
        );
    }
    assert!(
        outcomes.contains(&200) && outcomes.contains(&502),
        "{outcomes:?}"
    );
    // a bodyless POST is retried only past a target it never reached (the dead one), not past
    // the one that reset it
    let mut outcomes = Vec::new();
    for _ in 0..6 {
        outcomes.push(
            gw.call(reqwest::Method::POST, "retry.example", "/x", None)
                .await
                .0,
        );
    }
    assert!(
        outcomes.contains(&200) && outcomes.contains(&502),
        "{outcomes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejection_opens_the_circuit_and_a_trial_closes_it() {
    let (n, gw) = node().await;
    let live = upstream(Arc::new(AtomicBool::new(true))).await;
    let dead = closed_port();
    publish(
        &n,
        "eject",
        json!({"targets": targets(&[dead, live]), "retries": 0,
               "ejection": {"consecutive_failures": 2, "ejection_seconds": 2}}),
    )
    .await;
    gw.ready("eject.example").await;
    // round-robin sends every other POST to the dead target until it is ejected
    let mut failures = 0;
    for _ in 0..8 {
        if gw
            .call(reqwest::Method::POST, "eject.example", "/", Some("x"))
            .await
            .0
            == 502
        {
            failures += 1;
        }
    }
    assert!(
        (1..=2).contains(&failures),
        "ejected after 2 failures, saw {failures}"
    );
    for _ in 0..6 {
        let (s, b) = gw
            .call(reqwest::Method::POST, "eject.example", "/", Some("x"))
            .await;
        assert_eq!(s, 200, "{b}");
    }
    // once the ejection time is up, the next request is the ejected target's trial, even though
    // the other target serves; it fails, and the target is out again
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut outcomes = Vec::new();
    for _ in 0..4 {
        outcomes.push(
            gw.call(reqwest::Method::POST, "eject.example", "/", Some("x"))
                .await
                .0,
        );
    }
    assert_eq!(outcomes, [502, 200, 200, 200], "one trial, then out again");
    let m = metrics(&n).await;
    let line = format!("apim_gateway_upstream_target_up{{tenant=\"acme\",api=\"eject\",target=\"http://{dead}\"}} 0");
    assert!(m.contains(&line), "{line} in {m}");

    // with every target out the circuit is open: 503 at once, without trying
    publish(
        &n,
        "alldead",
        json!({"targets": targets(&[dead]), "retries": 0,
               "ejection": {"consecutive_failures": 1, "ejection_seconds": 2}}),
    )
    .await;
    gw.ready("alldead.example").await;
    let (s, _) = gw.get("alldead.example", "/").await;
    assert_eq!(s, 503, "the readiness probe already ejected it");
    let (s, b) = gw.get("alldead.example", "/").await;
    assert_eq!(
        (s, b["type"].as_str()),
        (503, Some("urn:apim:problem:gateway:upstream-unavailable"))
    );
    // after the ejection time one trial goes through; it fails, and the circuit opens again
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        gw.get("alldead.example", "/").await.0,
        502,
        "the trial reached the target"
    );
    assert_eq!(gw.get("alldead.example", "/").await.0, 503, "open again");

    // a deleted API's series (requests, latencies, target health) are no longer exported
    let r = n
        .admin(
            reqwest::Method::DELETE,
            "/admin/v1/tenants/acme/apis/eject",
            None,
        )
        .await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    let mut m = String::new();
    for _ in 0..100 {
        m = metrics(&n).await;
        if !m.contains("api=\"eject\"") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!m.contains("api=\"eject\""), "{m}");
    let kept = format!("apim_gateway_upstream_target_up{{tenant=\"acme\",api=\"alldead\",target=\"http://{dead}\"}} 0");
    assert!(m.contains(&kept), "{kept} in {m}");
    assert!(
        m.contains("apim_gateway_requests_total{tenant=\"acme\",api=\"alldead\",class=\"5xx\"}"),
        "{m}"
    );
}

/// A target whose answers break off after a good head is ejected like one that fails before
/// it: the verdict on a good answer waits for its body (before, the good head reset the count
/// of failures, so such a target was never ejected and failed every other request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_breaks_answers_mid_body_is_ejected() {
    let (n, gw) = node().await;
    let live = upstream(Arc::new(AtomicBool::new(true))).await;
    let broken = breaking_upstream().await;
    publish(
        &n,
        "midbody",
        json!({"targets": targets(&[broken, live]), "retries": 0,
               "ejection": {"consecutive_failures": 2, "ejection_seconds": 60}}),
    )
    .await;
    let mut outcomes = Vec::new();
    while outcomes.len() < 12 {
        let resp = gw
            .http
            .get(format!("{}/", gw.base))
            .header("host", "midbody.example")
            .send()
            .await
            .expect("a head");
        let status = resp.status().as_u16();
        let whole = resp.bytes().await.is_ok();
        // (until the table routes the API)
        if status == 404 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        } else {
            outcomes.push((status, whole));
        }
    }
    let broken_answers = outcomes.iter().filter(|(_, whole)| !whole).count();
    assert_eq!(
        broken_answers, 2,
        "ejected after 2 broken answers: {outcomes:?}"
    );
    assert!(
        outcomes[outcomes.len() - 6..]
            .iter()
            .all(|o| *o == (200, true)),
        "only the good target serves once the other is out: {outcomes:?}"
    );
    let m = metrics(&n).await;
    let line = format!("apim_gateway_upstream_target_up{{tenant=\"acme\",api=\"midbody\",target=\"http://{broken}\"}} 0");
    assert!(m.contains(&line), "{line} in {m}");
    let log = n.log_with(|l| l.contains("upstream target ejected")).await;
    assert!(log.contains(&broken.to_string()), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_take_targets_out_and_bring_them_back() {
    let (n, gw) = node().await;
    let a_ok = Arc::new(AtomicBool::new(true));
    let a = upstream(a_ok.clone()).await;
    let b = upstream(Arc::new(AtomicBool::new(true))).await;
    publish(
        &n,
        "hc",
        json!({"targets": targets(&[a, b]),
               "health_check": {"path": "/health", "interval_seconds": 1, "timeout_ms": 500,
                                "healthy_threshold": 1, "unhealthy_threshold": 1}}),
    )
    .await;
    gw.ready("hc.example").await;
    let served = |b: &Value| b["served_by"].as_str().unwrap_or_default().to_string();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        seen.insert(served(&gw.get("hc.example", "/").await.1));
    }
    assert_eq!(seen.len(), 2, "both targets serve: {seen:?}");

    a_ok.store(false, Ordering::SeqCst);
    let mut only_b = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let picks: Vec<String> = {
            let mut v = Vec::new();
            for _ in 0..4 {
                v.push(served(&gw.get("hc.example", "/").await.1));
            }
            v
        };
        if picks.iter().all(|p| *p == b.to_string()) {
            only_b = true;
            break;
        }
    }
    assert!(only_b, "the failing target was taken out");
    a_ok.store(true, Ordering::SeqCst);
    let mut back = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if served(&gw.get("hc.example", "/").await.1) == a.to_string() {
            back = true;
            break;
        }
    }
    assert!(back, "the target came back after passing its check");

    // a bad health-check setting is refused with its field
    let r = n
        .admin(
            reqwest::Method::POST,
            "/admin/v1/tenants/acme/apis",
            Some(json!({"name": "badhc", "version": "v1", "hosts": ["x.example"], "base_path": "/",
                        "upstream": {"targets": targets(&[a]), "health_check": {"path": "health"}}})),
        )
        .await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(
        r.body["invalid-params"][0]["name"],
        "upstream.health_check.path"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_requests_avoids_the_busy_target() {
    let (n, gw) = node().await;
    let a = upstream(Arc::new(AtomicBool::new(true))).await;
    let b = upstream(Arc::new(AtomicBool::new(true))).await;
    publish(
        &n,
        "lr",
        json!({"targets": targets(&[a, b]), "balance": "least-requests"}),
    )
    .await;
    gw.ready("lr.example").await;
    let gw = Arc::new(gw);
    // hold one request on one target (the upstream is slower than the gateway's 1 s timeout,
    // so it ends in a 504 after a second)
    let busy = {
        let gw = gw.clone();
        tokio::spawn(async move { gw.get("lr.example", "/slow").await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut picks = std::collections::HashSet::new();
    for _ in 0..6 {
        let (s, b) = gw.get("lr.example", "/").await;
        assert_eq!(s, 200);
        picks.insert(b["served_by"].as_str().unwrap().to_string());
    }
    assert_eq!(
        picks.len(),
        1,
        "every request went to the idle target: {picks:?}"
    );
    assert_eq!(busy.await.unwrap().0, 504);
}

/// An upstream that answers each request on a connection with its connection number and, after
/// the first answer on a connection, sends an answer nobody asked for (a desynchronised or
/// hostile upstream). `/stall` sends half of its body and then nothing.
async fn poisoning_upstream() -> SocketAddr {
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let id = conns.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let stall = head.starts_with(b"GET /stall ");
                    head.clear();
                    if stall {
                        let _ = tcp
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf.")
                            .await;
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        return;
                    }
                    let body = json!({"conn": id}).to_string();
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if tcp.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let poison = r#"{"poisoned":true}"#;
                    let stray = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{poison}",
                        poison.len()
                    );
                    if tcp.write_all(stray.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_alive_upstream_connections_never_relay_stray_bytes_and_stalls_end() {
    // one worker: every request goes through the one connection pool
    let (n, gw) =
        node_with("[gateway]\nworkers = 1\nupstream_response_timeout_seconds = 1\n").await;
    let up = poisoning_upstream().await;
    publish(&n, "poison", json!({"targets": targets(&[up])})).await;
    gw.ready("poison.example").await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        // the stray answer reaches the pooled connection meanwhile
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (s, b) = gw.get("poison.example", "/").await;
        assert_eq!(s, 200, "{b}");
        assert!(
            b.get("poisoned").is_none(),
            "a stray answer was relayed: {b}"
        );
        let conn = b["conn"].as_u64().expect("a connection number");
        assert!(
            seen.insert(conn),
            "connection {conn} was reused after it sent bytes nobody asked for"
        );
    }
    // an answer whose body stops coming ends (the client sees it cut), it does not hang
    // (after the last stray answer has arrived: bytes that come after a request is sent are
    // indistinguishable from its answer, for any HTTP/1.1 client)
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let cut = gw
        .http
        .get(format!("{}/stall", gw.base))
        .header("host", "poison.example")
        .send()
        .await
        .expect("the head arrives");
    assert_eq!(cut.status(), 200);
    let body = cut.bytes().await;
    assert!(body.is_err(), "the body cannot be complete: {body:?}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the stalled body was cut by the upstream timeout"
    );
}

/// An HTTP/2-only upstream without TLS (h2c, prior knowledge), shaped like a gRPC service: it
/// answers every request with what it saw (version, `te`, path, body length) and the trailers
/// `grpc-status: 0` and `grpc-message: done`.
async fn h2c_upstream() -> SocketAddr {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let (parts, body) = req.into_parts();
                        let got = body.collect().await.map_or(0, |b| b.to_bytes().len());
                        let seen = json!({
                            "version": format!("{:?}", parts.version),
                            "te": parts.headers.get("te").and_then(|v| v.to_str().ok()),
                            "path": parts.uri.path(),
                            "body": got,
                        });
                        let mut trailers = hyper::HeaderMap::new();
                        trailers
                            .insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
                        trailers.insert(
                            "grpc-message",
                            hyper::header::HeaderValue::from_static("done"),
                        );
                        let frames: Vec<Result<_, std::convert::Infallible>> = vec![
                            Ok(hyper::body::Frame::data(bytes::Bytes::from(
                                seen.to_string(),
                            ))),
                            Ok(hyper::body::Frame::trailers(trailers)),
                        ];
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(http_body_util::StreamBody::new(futures::stream::iter(
                                    frames,
                                )))
                                .unwrap(),
                        )
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
            });
        }
    });
    addr
}

/// `protocol: http2` speaks HTTP/2 with prior knowledge to an `http://` target (a gRPC-like
/// service): requests, `TE: trailers` and the answer's trailers go through, and the health
/// checks use HTTP/2 too. Without it, the same target is not reachable over HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_to_plain_targets_relays_trailers_for_grpc() {
    use http_body_util::BodyExt;
    let (n, gw) = node_with("[gateway]\nidle_timeout_seconds = 2\n").await;
    let up = h2c_upstream().await;
    let r = n
        .admin(
            reqwest::Method::POST,
            "/admin/v1/tenants/acme/apis",
            Some(json!({
                "name": "bad", "version": "v1", "hosts": ["bad.example"], "base_path": "/",
                "upstream": {"targets": targets(&[up]), "protocol": "http3"},
            })),
        )
        .await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert!(r.body.to_string().contains("protocol"), "{:?}", r.body);
    publish(
        &n,
        "grpc",
        json!({"targets": targets(&[up]), "protocol": "http2",
               "health_check": {"path": "/grpc.health.v1.Health/Check", "interval_seconds": 1,
                                "unhealthy_threshold": 1, "healthy_threshold": 1}}),
    )
    .await;
    publish(&n, "plain", json!({"targets": targets(&[up])})).await;
    gw.ready("grpc.example").await;
    gw.ready("plain.example").await;

    // a client over HTTP/2 (prior knowledge on the plain listener), as gRPC clients are
    let call = || async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", n.gateway_port))
            .await
            .unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::post("http://grpc.example/pkg.Service/Method")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"\0\0\0\0\x05hello",
            )))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let seen: Value = serde_json::from_slice(&collected.to_bytes()).unwrap_or(Value::Null);
        (status, seen, trailers)
    };
    let (status, seen, trailers) = call().await;
    assert_eq!(status, 200, "{seen}");
    assert_eq!(seen["version"], "HTTP/2.0", "{seen}");
    assert_eq!(seen["te"], "trailers", "{seen}");
    assert_eq!(seen["path"], "/pkg.Service/Method", "{seen}");
    assert_eq!(seen["body"], 10, "{seen}");
    assert_eq!(
        trailers.get("grpc-status").and_then(|v| v.to_str().ok()),
        Some("0"),
        "{trailers:?}"
    );
    assert_eq!(
        trailers.get("grpc-message").and_then(|v| v.to_str().ok()),
        Some("done")
    );
    // the health checks (over HTTP/2 as well) keep the target in
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, seen, _) = call().await;
    assert_eq!(status, 200, "the target stays healthy: {seen}");
    // the same target as an HTTP/1.1 one fails (it speaks only HTTP/2)
    let (s, b) = gw.get("plain.example", "/").await;
    assert_eq!(s, 502, "{b}");
    // a request body that stops coming (the service waits for all of it): 408 after the idle
    // timeout, the client's fault, though hyper's HTTP/2 client only says the stream broke
    let text = raw_head(
        n.gateway_port,
        b"POST /pkg.Service/Method HTTP/1.1\r\nHost: grpc.example\r\nContent-Length: 100\r\n\r\n01234",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
}

/// An upstream whose answer comes in 10 parts of 100 bytes, 300 ms apart (3 s in all).
async fn dripping_upstream() -> SocketAddr {
    http_upstream(|_req: hyper::Request<hyper::body::Incoming>| async {
        let parts = futures::stream::unfold(0u32, |i| async move {
            if i == 10 {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let part = hyper::body::Frame::data(bytes::Bytes::from(vec![b'x'; 100]));
            Some((Ok::<_, std::convert::Infallible>(part), i + 1))
        });
        hyper::Response::builder()
            .header("content-length", "1000")
            .body(http_body_util::StreamBody::new(parts))
            .unwrap()
    })
    .await
}

/// A loopback port that takes no connection: its accept queue is full, so a new connection's
/// SYN goes unanswered and connecting waits until its timeout. The listener and the
/// connection filling its queue live as long as the returned values.
fn unanswering_port() -> (SocketAddr, socket2::Socket, std::net::TcpStream) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    s.listen(0).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    let filler = std::net::TcpStream::connect(addr).unwrap();
    (addr, s, filler)
}

/// An API's own timeouts take the place of the node's: a longer response timeout lets a slow
/// answer through, a total timeout cuts a long answer (and answers 504 when the head is late),
/// a shorter connect timeout gives up sooner on a target that does not answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_timeouts_take_the_place_of_the_node_defaults() {
    // node defaults: response 1 s, connect 2 s
    let (n, gw) = node().await;
    let live = upstream(Arc::new(AtomicBool::new(true))).await;
    let drip = dripping_upstream().await;
    let (silent, _listener, _filler) = unanswering_port();
    publish(
        &n,
        "patient",
        json!({"targets": targets(&[live]), "timeouts": {"response_seconds": 3}}),
    )
    .await;
    publish(
        &n,
        "bounded",
        json!({"targets": targets(&[drip]), "timeouts": {"total_seconds": 1}}),
    )
    .await;
    publish(
        &n,
        "late",
        json!({"targets": targets(&[live]),
               "timeouts": {"response_seconds": 5, "total_seconds": 1}}),
    )
    .await;
    publish(&n, "whole", json!({"targets": targets(&[drip])})).await;
    publish(
        &n,
        "hasty",
        json!({"targets": targets(&[silent]), "retries": 0, "timeouts": {"connect_ms": 200}}),
    )
    .await;
    publish(
        &n,
        "waiting",
        json!({"targets": targets(&[silent]), "retries": 0, "timeouts": {"response_seconds": 5}}),
    )
    .await;
    for host in ["patient", "bounded", "late", "whole", "hasty", "waiting"] {
        gw.ready(&format!("{host}.example")).await;
    }
    let r = n
        .admin(
            reqwest::Method::POST,
            "/admin/v1/tenants/acme/apis",
            Some(json!({
                "name": "bad", "version": "v1", "hosts": ["bad.example"], "base_path": "/",
                "upstream": {"targets": targets(&[live]), "timeouts": {"total_seconds": 0}},
            })),
        )
        .await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(
        r.body["invalid-params"][0]["name"], "upstream.timeouts.total_seconds",
        "{:?}",
        r.body
    );

    // the slow answer (2 s) passes the API's 3 s, not the node's 1 s
    assert_eq!(gw.get("patient.example", "/slow").await.0, 200);
    // its head is late for the total (1 s), though within the response timeout (5 s)
    let (s, b) = gw.get("late.example", "/slow").await;
    assert_eq!(
        (s, b["type"].as_str()),
        (504, Some("urn:apim:problem:gateway:upstream-timeout"))
    );
    // a 3 s answer: whole without a total (each part within the 1 s response timeout), cut
    // after 1 s with one
    let whole = gw
        .http
        .get(format!("{}/", gw.base))
        .header("host", "whole.example")
        .send()
        .await
        .unwrap();
    assert_eq!(whole.bytes().await.map(|b| b.len()).ok(), Some(1000));
    let started = std::time::Instant::now();
    let cut = gw
        .http
        .get(format!("{}/", gw.base))
        .header("host", "bounded.example")
        .send()
        .await
        .unwrap();
    assert_eq!(cut.status(), 200, "the head came in time");
    assert!(cut.bytes().await.is_err(), "the answer is cut short");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "cut after {took:?}"
    );
    // a target that does not answer: the API's 200 ms, not the node's 2 s (with a response
    // timeout above it: the head's deadline bounds the connection too)
    for (host, within) in [("hasty.example", 1500), ("waiting.example", 5000)] {
        let started = std::time::Instant::now();
        let (s, b) = gw.get(host, "/").await;
        let took = started.elapsed();
        assert_eq!(
            (s, b["type"].as_str()),
            (502, Some("urn:apim:problem:gateway:upstream-unavailable")),
            "{host}"
        );
        assert!(took < Duration::from_millis(within), "{host}: {took:?}");
        if host == "waiting.example" {
            assert!(took >= Duration::from_millis(1800), "{host}: {took:?}");
        }
    }
}
