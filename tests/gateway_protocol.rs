//! The gateway's HTTP handling under hostile and unusual input, spoken over raw TCP: request
//! smuggling shapes, oversize heads, slowloris, bad Host, path tricks; and the protocol
//! features a proxy must get right: a WebSocket echo through the gateway, `Expect:
//! 100-continue`, 1 GiB bodies streamed both ways with the gateway's memory bounded.

mod common;
use common::*;
use reqwest::Method;
use serde_json::json;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` on a new connection and reads until the server closes it or goes quiet.
async fn exchange(port: u16, request: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(request).await.unwrap();
    read_some(&mut s, Duration::from_millis(1500)).await
}

async fn read_some(s: &mut TcpStream, quiet: Duration) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(quiet, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One HTTP/1.1 answer with a `Content-Length`, read from a kept-alive connection.
async fn one_answer(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("a content-length");
            if out.len() >= end + 4 + len {
                return String::from_utf8_lossy(&out).into_owned();
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(
            n > 0,
            "closed before the answer: {}",
            String::from_utf8_lossy(&out)
        );
        out.extend_from_slice(&buf[..n]);
    }
}

fn status_of(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

async fn publish(n: &Node, name: &str, up: SocketAddr, policies: serde_json::Value) {
    created(
        n,
        "/admin/v1/tenants/acme/apis",
        json!({
            "name": name, "version": "v1", "hosts": [format!("{name}.example")], "base_path": "/",
            "lifecycle": "published", "upstream": {"targets": [{"url": format!("http://{up}")}]},
            "policies": policies,
        }),
    )
    .await;
}

async fn wait_routed(port: u16, host: &str) {
    for _ in 0..200 {
        let a = exchange(
            port,
            format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        if status_of(&a) != 404 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{host} never routed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_refused_and_the_gateway_stays_up() {
    let n = Node::start_with("[gateway]\nheader_timeout_seconds = 1\n").await;
    created(&n, "/admin/v1/tenants", json!({"name": "acme"})).await;
    let up = echo_upstream().await;
    publish(&n, "h", up, json!([])).await;
    let port = n.gateway_port;
    wait_routed(port, "h.example").await;

    let cases: Vec<(&str, String, &[u16])> = vec![
        (
            // RFC 9112 §6.3: chunked wins, Content-Length is dropped, and the connection is
            // closed after the answer, so the bytes after the chunked body are never a request
            "Content-Length with Transfer-Encoding",
            "POST / HTTP/1.1\r\nHost: h.example\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h.example\r\n\r\n".into(),
            &[200, 400],
        ),
        (
            "two different Content-Length",
            "POST / HTTP/1.1\r\nHost: h.example\r\nContent-Length: 3\r\nContent-Length: 30\r\n\r\nabc".into(),
            &[400],
        ),
        (
            "obs-fold",
            "GET / HTTP/1.1\r\nHost: h.example\r\nX-A: a\r\n folded\r\n\r\n".into(),
            &[400],
        ),
        (
            "bad chunk size",
            "POST / HTTP/1.1\r\nHost: h.example\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n".into(),
            // the head is fine; the body then fails: either a 400 (the client's fault, not the
            // upstream's) or the connection dropped, never an upstream answer
            &[400, 0],
        ),
        (
            "Transfer-Encoding other than chunked",
            "POST / HTTP/1.1\r\nHost: h.example\r\nTransfer-Encoding: gzip\r\n\r\nabc".into(),
            &[400, 501],
        ),
        (
            "oversize header",
            format!("GET / HTTP/1.1\r\nHost: h.example\r\nX-Big: {}\r\n\r\n", "a".repeat(40_000)),
            &[431],
        ),
        (
            "too many headers",
            format!(
                "GET / HTTP/1.1\r\nHost: h.example\r\n{}\r\n",
                (0..150).map(|i| format!("X-H{i}: v\r\n")).collect::<String>()
            ),
            &[431],
        ),
        ("no Host", "GET / HTTP/1.1\r\n\r\n".into(), &[400]),
        ("Host with a space", "GET / HTTP/1.1\r\nHost: h .example\r\n\r\n".into(), &[400]),
        ("Host with empty label", "GET / HTTP/1.1\r\nHost: h..example\r\n\r\n".into(), &[400]),
        (
            "two Host headers",
            "GET / HTTP/1.1\r\nHost: h.example\r\nHost: evil.example\r\n\r\n".into(),
            &[400],
        ),
        ("encoded dot-dot", "GET /a/%2e%2e/admin HTTP/1.1\r\nHost: h.example\r\n\r\n".into(), &[400]),
        ("mixed-case encoded dot", "GET /a/%2E./admin HTTP/1.1\r\nHost: h.example\r\n\r\n".into(), &[400]),
        ("double slash", "GET //admin HTTP/1.1\r\nHost: h.example\r\n\r\n".into(), &[400]),
        ("path parameter", "GET /a;jsessionid=1/b HTTP/1.1\r\nHost: h.example\r\n\r\n".into(), &[400]),
        ("encoded slash", "GET /a%2Fb HTTP/1.1\r\nHost: h.example\r\n\r\n".into(), &[400]),
        ("NUL byte", "GET /a%00b HTTP/1.1\r\nHost: h.example\r\n\r\n".into(), &[400]),
        ("bad request line", "GET\r\n\r\n".into(), &[400]),
    ];
    for (what, request, expected) in &cases {
        let answer = exchange(port, request.as_bytes()).await;
        let status = status_of(&answer);
        assert!(expected.contains(&status), "{what}: got {status}: {answer}");
        assert_eq!(
            answer.matches("HTTP/1.1 ").count(),
            1,
            "{what}: exactly one answer, nothing smuggled behind it: {answer}"
        );
        assert!(
            !answer.contains("/smuggled"),
            "{what}: a second request was smuggled: {answer}"
        );
    }

    // slowloris: a head that never completes is cut off after the header timeout
    let mut slow = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: h.exa")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let answer = read_some(&mut slow, Duration::from_secs(10)).await;
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "the slow connection was closed by the gateway, not by the test's patience"
    );
    assert!(answer.is_empty() || status_of(&answer) == 408, "{answer}");

    // still serving, same process
    let answer = exchange(
        port,
        b"GET /ok HTTP/1.1\r\nHost: h.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert!(std::path::Path::new(&format!("/proc/{}", n.pid())).exists());
    let log = n.log();
    assert!(!log.contains("panicked"), "{log}");
}

/// An upstream that accepts WebSocket handshakes (RFC 6455) and echoes every frame it receives.
async fn websocket_echo() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let key = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .starts_with("sec-websocket-key:")
                            .then(|| l[18..].trim().to_string())
                    })
                    .unwrap_or_default();
                let digest = aws_lc_rs::digest::digest(
                    &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
                    format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
                );
                use base64::Engine;
                let accept = base64::engine::general_purpose::STANDARD.encode(digest.as_ref());
                let answer = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n");
                if s.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                // frames: FIN|opcode, MASK|len (< 126), mask, payload
                loop {
                    let mut h = [0u8; 2];
                    if s.read_exact(&mut h).await.is_err() {
                        return;
                    }
                    let len = (h[1] & 0x7f) as usize;
                    let mut mask = [0u8; 4];
                    let mut payload = vec![0u8; len];
                    if s.read_exact(&mut mask).await.is_err()
                        || s.read_exact(&mut payload).await.is_err()
                    {
                        return;
                    }
                    for (i, byte) in payload.iter_mut().enumerate() {
                        *byte ^= mask[i % 4];
                    }
                    let mut frame = vec![h[0], len as u8];
                    frame.extend_from_slice(&payload);
                    if s.write_all(&frame).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Publishes `name` (host `{name}.example`, to `up`) behind an API key, subscribes consumer `c`
/// (created once per node) and returns a key of `c`.
async fn keyed_api(n: &Node, name: &str, up: SocketAddr) -> String {
    publish(
        n,
        name,
        up,
        json!([{"type": "api-key", "header": "x-api-key"}]),
    )
    .await;
    let t = "/admin/v1/tenants/acme";
    if n.admin(Method::GET, &format!("{t}/consumers/c"), None)
        .await
        .status
        == 404
    {
        created(n, &format!("{t}/plans"), json!({"name": "p"})).await;
        created(n, &format!("{t}/consumers"), json!({"name": "c"})).await;
    }
    created(
        n,
        &format!("{t}/subscriptions"),
        json!({"consumer": "c", "api": name, "plan": "p", "status": "active"}),
    )
    .await;
    n.admin(
        Method::POST,
        &format!("{t}/consumers/c/keys"),
        Some(json!({})),
    )
    .await
    .body["key"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Opens a WebSocket to `host` through `n`'s gateway (with `x-api-key: key` when given) and
/// returns the connection after the `101`. A failure shows the node's log.
async fn websocket_open(n: &Node, host: &str, key: Option<&str>) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", n.gateway_port))
        .await
        .unwrap();
    let key = key
        .map(|k| format!("x-api-key: {k}\r\n"))
        .unwrap_or_default();
    s.write_all(format!("GET /chat HTTP/1.1\r\nHost: {host}\r\n{key}Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let read = s.read(&mut b).await;
        assert!(
            matches!(read, Ok(1)),
            "{read:?} with the head so far {:?}; the node's log:\n{}",
            String::from_utf8_lossy(&head),
            n.log()
        );
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    assert!(head.contains("upgrade: websocket"), "{head}");
    s
}

/// Sends `text` in a masked WebSocket text frame and checks the echo; returns the bytes sent
/// and received.
async fn websocket_round(s: &mut TcpStream, text: &str) -> (u64, u64) {
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | text.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(text.bytes().enumerate().map(|(i, c)| c ^ mask[i % 4]));
    s.write_all(&frame).await.unwrap();
    let mut back = vec![0u8; 2 + text.len()];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(back[0], 0x81);
    assert_eq!(&back[2..], text.as_bytes());
    (frame.len() as u64, back.len() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_and_expect_continue_through_the_gateway() {
    let n = Node::start().await;
    created(&n, "/admin/v1/tenants", json!({"name": "acme"})).await;
    let ws = websocket_echo().await;
    let up = echo_upstream().await;
    publish(&n, "ws", ws, json!([])).await;
    let key = keyed_api(&n, "keyed", up).await;
    let port = n.gateway_port;
    wait_routed(port, "keyed.example").await;

    // WebSocket: handshake through the gateway, then frames both ways
    let mut s = websocket_open(&n, "ws.example", None).await;
    for text in ["hello", "through apim"] {
        websocket_round(&mut s, text).await;
    }

    // another protocol (h2c) is never switched to: the Upgrade is not forwarded, and a 101 the
    // client did not get to ask for is not relayed
    let answer = exchange(
        port,
        b"GET /chat HTTP/1.1\r\nHost: ws.example\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 502, "{answer}");

    // Expect: 100-continue: a refused request is answered before the body is sent...
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"POST /up HTTP/1.1\r\nHost: keyed.example\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n").await.unwrap();
    let answer = read_some(&mut s, Duration::from_millis(800)).await;
    assert_eq!(status_of(&answer), 401, "{answer}");
    assert!(!answer.contains("100 Continue"), "{answer}");
    // ...an admitted one gets 100 Continue, then the upstream's answer to the body
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(format!("POST /up HTTP/1.1\r\nHost: keyed.example\r\nx-api-key: {key}\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut first = [0u8; 25];
    s.read_exact(&mut first).await.unwrap();
    assert!(
        String::from_utf8_lossy(&first).starts_with("HTTP/1.1 100 Continue"),
        "{first:?}"
    );
    s.write_all(b"hello").await.unwrap();
    let answer = read_some(&mut s, Duration::from_secs(5)).await;
    assert!(answer.contains(" 200 "), "{answer}");
    assert!(answer.contains("\"body\":\"hello\""), "{answer}");
}

/// The log once it has the access line of the request sent with `user_agent`, and that line.
async fn access_line(n: &Node, user_agent: &str) -> (String, serde_json::Value) {
    let log = n
        .log_with(|l| l.contains("apim::gateway::access") && l.contains(user_agent))
        .await;
    let line = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["user_agent"] == user_agent)
        .unwrap_or_else(|| panic!("no access line for {user_agent}"));
    (log, line)
}

/// The access log carries the fields the configuration names, in its order, and no others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_fields_follow_the_configuration() {
    let n = Node::start_with(
        "[gateway]\naccess_log_fields = [\"status\", \"user_agent\", \"protocol\", \"host\", \"refusal\"]\n",
    )
    .await;
    created(&n, "/admin/v1/tenants", json!({"name": "acme"})).await;
    let up = echo_upstream().await;
    publish(&n, "logged", up, json!([])).await;
    let port = n.gateway_port;
    wait_routed(port, "logged.example").await;
    let answer = exchange(
        port,
        b"GET /x?api_key=secret-in-query HTTP/1.1\r\nHost: logged.example\r\nUser-Agent: partner-sdk/2.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    let (log, line) = access_line(&n, "partner-sdk/2.1").await;
    assert_eq!(line["target"], "apim::gateway::access");
    assert_eq!(line["status"], 200);
    assert_eq!(line["protocol"], "HTTP/1.1");
    assert_eq!(line["host"], "logged.example");
    assert_eq!(line["refusal"], "");
    assert!(line["timestamp"].is_string(), "{line}");
    for absent in ["path", "client", "method", "api", "consumer"] {
        assert!(
            line.get(absent).is_none(),
            "{absent} is not configured: {line}"
        );
    }
    assert!(
        !log.contains("secret-in-query"),
        "the query string is never logged"
    );

    // HTTP/2 with prior knowledge on the plain listener (the client opens with the preface)
    let h2c = h2c_client("logged.example", port);
    let r = h2c
        .get(format!("http://logged.example:{port}/h2"))
        .header("user-agent", "h2c-client/1")
        .send()
        .await
        .expect("an HTTP/2 answer");
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let (_, line) = access_line(&n, "h2c-client/1").await;
    assert_eq!(line["protocol"], "HTTP/2");

    // the buffered lines are written at shutdown: a request answered just before SIGTERM
    // has its line once the node has exited
    let mut n = n;
    let answer = exchange(
        port,
        b"GET /last HTTP/1.1\r\nHost: logged.example\r\nUser-Agent: last-before-stop/1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert_eq!(n.terminate(), Some(0), "a clean exit");
    assert!(
        n.log()
            .lines()
            .any(|l| l.contains("apim::gateway::access") && l.contains("last-before-stop/1")),
        "the last access line was flushed at shutdown"
    );
}

/// Frames an HTTP/2 peer received: (time since the request was sent, type, flags, stream).
type Frames = Vec<(Duration, u8, u8, u32)>;

const H2_HEADERS: u8 = 0x1;
const H2_GOAWAY: u8 = 0x7;
const H2_END_STREAM: u8 = 0x1;

/// An HTTP/2 frame.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A HEADERS frame that asks `GET path` of `host` on `stream` (and ends it).
fn h2_get(stream: u32, host: &str, path: &str) -> Vec<u8> {
    // HPACK: :method GET, :scheme http (static indices), :path and :authority as literals
    let mut block = vec![0x82, 0x86, 0x44, path.len() as u8];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x41, host.len() as u8]);
    block.extend_from_slice(host.as_bytes());
    h2_frame(H2_HEADERS, 0x4 | H2_END_STREAM, stream, &block)
}

/// A WINDOW_UPDATE frame granting `bytes` on `stream` (0: the connection).
fn h2_window(stream: u32, bytes: u32) -> Vec<u8> {
    h2_frame(0x8, 0, stream, &bytes.to_be_bytes())
}

/// Speaks HTTP/2 by prior knowledge on the gateway's plain port: the preface and a SETTINGS
/// frame of `settings`, then each frame of `script` at its time from the start; records the
/// frames that come back (time from the start, type, flags, stream) until the gateway closes
/// the connection or `limit` passes. SETTINGS and PING are acknowledged, as a client must; no
/// WINDOW_UPDATE is sent but the script's.
async fn h2_session(
    port: u16,
    settings: &[u8],
    script: Vec<(Duration, Vec<u8>)>,
    limit: Duration,
) -> Frames {
    let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let start = tokio::time::Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(h2_frame(0x4, 0, 0, settings));
    tx.send(hello).unwrap();
    tokio::spawn(async move {
        while let Some(bytes) = rx.recv().await {
            if wr.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });
    let scripted = tx.clone();
    tokio::spawn(async move {
        for (at, frame) in script {
            tokio::time::sleep_until(start + at).await;
            if scripted.send(frame).is_err() {
                return;
            }
        }
    });
    let mut frames = Vec::new();
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 16384];
        let n = match tokio::time::timeout_at(start + limit, rd.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return frames, // closed, failed, or the limit
        };
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            let payload = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            frames.push((start.elapsed(), kind, flags, stream));
            let ack = match (kind, flags & 0x1) {
                (0x4, 0) => Some(h2_frame(0x4, 0x1, 0, &[])),
                (0x6, 0) => Some(h2_frame(0x6, 0x1, 0, &payload)),
                _ => None,
            };
            if let Some(ack) = ack {
                let _ = tx.send(ack);
            }
        }
    }
}

/// [`h2_session`] that asks `GET path` of `host` on stream 1 at once.
async fn h2_frames(port: u16, host: &str, path: &str, settings: &[u8], limit: Duration) -> Frames {
    let ask = vec![(Duration::ZERO, h2_get(1, host, path))];
    h2_session(port, settings, ask, limit).await
}

/// When stream 1's answer ended (a HEADERS or DATA frame with END_STREAM), and when the first
/// GOAWAY came.
fn h2_times(frames: &Frames) -> (Option<Duration>, Option<Duration>) {
    let ended = frames
        .iter()
        .find(|f| f.3 == 1 && f.2 & H2_END_STREAM != 0 && f.1 <= H2_HEADERS)
        .map(|f| f.0);
    let goaway = frames.iter().find(|f| f.1 == H2_GOAWAY).map(|f| f.0);
    (ended, goaway)
}

/// An HTTP/2 client that gives its streams no flow-control window (SETTINGS_INITIAL_WINDOW_SIZE
/// 0) and never opens one gets the answers' heads and no byte of their bodies; each answer is
/// dropped once it has waited for the idle timeout, and with it the upstream connection that
/// streams it, and the connection gets a GOAWAY and is closed, instead of holding both for as
/// long as the client likes. A stream asked for later than the first is dropped in its turn
/// (the connection is not held by it). A client that opens its window slowly but steadily
/// keeps its answer, however large the upstream's chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_answers_given_no_window_are_dropped_after_the_idle_timeout() {
    use std::sync::{Arc, Mutex};
    use std::time::Instant;
    let idle = Duration::from_secs(2);
    let n =
        Node::start_with("[gateway]\nidle_timeout_seconds = 2\nheader_timeout_seconds = 1\n").await;
    created(&n, "/admin/v1/tenants", json!({"name": "acme"})).await;
    // an endless answer at /endless, which notes when the upstream's server lets go of it
    // (a short one elsewhere)
    let released = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let mark = released.clone();
    let endless = http_upstream(move |req: hyper::Request<hyper::body::Incoming>| {
        struct Released(Arc<Mutex<Vec<Instant>>>);
        impl Drop for Released {
            fn drop(&mut self) {
                self.0.lock().unwrap().push(Instant::now());
            }
        }
        let mark = (req.uri().path() == "/endless").then(|| Released(mark.clone()));
        async move {
            let chunks = futures::stream::unfold((mark, false), |(mark, done)| async move {
                // (the short answer is one chunk)
                if done {
                    return None;
                }
                let frame = hyper::body::Frame::data(bytes::Bytes::from(vec![b'x'; 65536]));
                let done = mark.is_none();
                Some((Ok::<_, std::convert::Infallible>(frame), (mark, done)))
            });
            hyper::Response::new(http_body_util::StreamBody::new(chunks))
        }
    })
    .await;
    publish(&n, "endless", endless, json!([])).await;
    let port = n.gateway_port;
    wait_routed(port, "endless.example").await;
    const NO_WINDOW: [u8; 6] = [0, 4, 0, 0, 0, 0]; // SETTINGS_INITIAL_WINDOW_SIZE = 0
    let host = "endless.example";

    // two streams, asked for 1 s apart, never given a window
    let sent = Instant::now();
    let ask = vec![
        (Duration::ZERO, h2_get(1, host, "/endless")),
        (Duration::from_secs(1), h2_get(3, host, "/endless")),
    ];
    let frames = h2_session(port, &NO_WINDOW, ask, Duration::from_secs(20)).await;
    let closed = sent.elapsed();
    for stream in [1, 3] {
        assert!(
            frames.iter().any(|f| f.3 == stream && f.1 == H2_HEADERS),
            "no answer head on stream {stream}: {frames:?}"
        );
    }
    assert!(
        !frames.iter().any(|f| f.1 == 0x0),
        "data sent beyond the window: {frames:?}"
    );
    let (_, goaway) = h2_times(&frames);
    let goaway = goaway.unwrap_or_else(|| panic!("no GOAWAY, closed after {closed:?}: {frames:?}"));
    assert!(
        goaway >= idle,
        "GOAWAY after {goaway:?}, before the idle timeout"
    );
    assert!(
        closed < Duration::from_secs(10),
        "the connection was held for {closed:?}"
    );
    // both upstream answers are let go of (their connections closed by the gateway), the
    // second no sooner than the idle timeout after it was asked for
    let deadline = Instant::now() + Duration::from_secs(10);
    while released.lock().unwrap().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "an upstream answer is still held: {:?}",
            released.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last = released.lock().unwrap()[1].duration_since(sent);
    assert!(
        last >= Duration::from_secs(1) + idle,
        "the second answer was let go of after {last:?}"
    );

    // a slow reader: 8 KiB of window every 500 ms, less than the upstream's chunks in each
    // idle timeout; it is still taking DATA after 5 s, with no GOAWAY nor reset
    let mut ask = vec![(Duration::ZERO, h2_get(1, host, "/endless"))];
    for i in 1..=12 {
        let mut grant = h2_window(1, 8192);
        grant.extend(h2_window(0, 8192));
        ask.push((Duration::from_millis(500 * i), grant));
    }
    let frames = h2_session(port, &NO_WINDOW, ask, Duration::from_millis(6500)).await;
    let last_data = frames
        .iter()
        .filter(|f| f.3 == 1 && f.1 == 0x0)
        .map(|f| f.0)
        .max();
    assert!(
        last_data.is_some_and(|t| t > Duration::from_secs(5)),
        "the slow reader's answer stopped at {last_data:?}: {frames:?}"
    );
    assert!(
        !frames.iter().any(|f| f.1 == H2_GOAWAY || f.1 == 0x3),
        "the slow reader was cut: {frames:?}"
    );
}

/// Idle connections end, each by its own timer (`idle_timeout_seconds = 3`,
/// `header_timeout_seconds = 1`): a spliced WebSocket 3 s after its last traffic (its bytes
/// metered to the consumer); an HTTP/2 connection that sends no request within the header
/// timeout (a stalled handshake); an HTTP/2 connection whose request is done, with a GOAWAY,
/// 3 s later; and not one whose answer is still streaming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_websockets_and_http2_connections_are_closed() {
    let idle = Duration::from_secs(3);
    let header = Duration::from_secs(1);
    let n = Node::start_with(
        "[gateway]\nidle_timeout_seconds = 3\nheader_timeout_seconds = 1\nusage_flush_seconds = 1\n",
    )
    .await;
    created(&n, "/admin/v1/tenants", json!({"name": "acme"})).await;
    let key = keyed_api(&n, "ws", websocket_echo().await).await;
    publish(&n, "plain", echo_upstream().await, json!([])).await;
    // an answer that streams for 4.5 s: nine chunks 500 ms apart
    let streaming = http_upstream(|_req: hyper::Request<hyper::body::Incoming>| async move {
        let chunks = futures::stream::unfold(0u32, |i| async move {
            if i == 9 {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let frame = hyper::body::Frame::data(bytes::Bytes::from_static(b"tick\n"));
            Some((Ok::<_, std::convert::Infallible>(frame), i + 1))
        });
        hyper::Response::new(http_body_util::StreamBody::new(chunks))
    })
    .await;
    publish(&n, "stream", streaming, json!([])).await;
    // a 64 MiB answer, more than the sockets between client and gateway hold
    const BIG: usize = 64 << 20;
    publish(&n, "big", big_upstream(BIG).await, json!([])).await;
    let port = n.gateway_port;
    wait_routed(port, "plain.example").await;
    wait_routed(port, "stream.example").await;
    wait_routed(port, "big.example").await;

    // a client that stops taking its answer is cut off after the idle timeout (slow read):
    // it finds the end of the stream before the whole answer
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: big.example\r\n\r\n")
        .await
        .unwrap();
    let mut chunk = vec![0u8; 65536];
    let mut got = s.read(&mut chunk).await.unwrap();
    tokio::time::sleep(idle * 2).await;
    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the stalled answer was never cut off");
    assert!(got < BIG, "the whole answer came: {got} bytes");
    // a client that pauses for less than the idle timeout between reads, for longer than the
    // idle timeout in all, gets the whole answer: any progress restarts the stall clock
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: big.example\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut got = 0;
    let started = std::time::Instant::now();
    for _ in 0..4 {
        let mut burst = 0;
        while burst < (4 << 20) {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "cut off after {got} bytes, {:?}", started.elapsed());
            burst += n;
        }
        got += burst;
        tokio::time::sleep(idle * 2 / 3).await;
    }
    loop {
        match s.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => panic!("cut off after {got} bytes: {e}"),
        }
    }
    assert!(started.elapsed() > idle * 2, "{:?}", started.elapsed());
    assert!(got > BIG, "the whole answer and its head: {got} bytes");

    // the WebSocket: traffic, then silence until the gateway closes both sides
    let mut s = websocket_open(&n, "ws.example", Some(&key)).await;
    let before_last_traffic = std::time::Instant::now();
    let (sent, received) = websocket_round(&mut s, "hello").await;
    let mut buf = [0u8; 64];
    let end = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await;
    assert!(
        matches!(end, Ok(Ok(0)) | Ok(Err(_))),
        "the idle WebSocket was not closed: {end:?}"
    );
    assert!(
        before_last_traffic.elapsed() >= idle,
        "closed {:?} after the last traffic",
        before_last_traffic.elapsed()
    );
    // its bytes count in the consumer's usage, beside its one request
    let mut page = serde_json::Value::Null;
    for _ in 0..100 {
        page = n
            .admin(Method::GET, "/admin/v1/tenants/acme/usage?consumer=c", None)
            .await
            .body;
        if page["totals"]["bytes_in"] == sent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(page["totals"]["requests"], 1, "{page}");
    assert_eq!(page["totals"]["bytes_in"], sent, "{page}");
    assert_eq!(page["totals"]["bytes_out"], received, "{page}");

    // HTTP/1.1 keep-alive: quiet for longer than the header timeout, the connection still
    // serves; a head that then stalls is cut after the header timeout from its first byte;
    // a connection left quiet is closed after the idle timeout, not the header timeout
    let get = b"GET /k HTTP/1.1\r\nHost: plain.example\r\n\r\n";
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(get).await.unwrap();
    assert_eq!(status_of(&one_answer(&mut s).await), 200);
    tokio::time::sleep(header * 2).await;
    s.write_all(get).await.unwrap();
    assert_eq!(
        status_of(&one_answer(&mut s).await),
        200,
        "a keep-alive connection quiet for twice the header timeout was closed"
    );
    s.write_all(b"GET /k HTTP/1.1\r\nHost: pla").await.unwrap();
    let stalled = std::time::Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await;
    assert!(matches!(end, Ok(Ok(0)) | Ok(Err(_))), "{end:?}");
    let took = stalled.elapsed();
    assert!(
        took >= header - Duration::from_millis(50) && took < idle,
        "a stalled head was cut after {took:?}"
    );
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(get).await.unwrap();
    let before_answer = std::time::Instant::now();
    assert_eq!(status_of(&one_answer(&mut s).await), 200);
    let end = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await;
    assert!(matches!(end, Ok(Ok(0)) | Ok(Err(_))), "{end:?}");
    let took = before_answer.elapsed();
    assert!(
        took >= idle,
        "an idle keep-alive connection was closed after {took:?}"
    );

    // HTTP/2 by prior knowledge that stops after the preface: closed after the header
    // timeout, well before the idle timeout
    let opened = std::time::Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {} // the server's SETTINGS
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "a stalled HTTP/2 handshake was never closed");
    let took = opened.elapsed();
    assert!(took >= header && took < idle, "closed after {took:?}");

    // HTTP/2 with a request: answered, then a GOAWAY once idle for the idle timeout
    let frames = h2_frames(port, "plain.example", "/h2", &[], Duration::from_secs(20)).await;
    let (answered, goaway) = h2_times(&frames);
    let answered = answered.unwrap_or_else(|| panic!("no answer: {frames:?}"));
    let goaway = goaway.unwrap_or_else(|| panic!("no GOAWAY: {frames:?}"));
    assert!(
        goaway >= idle && goaway > answered,
        "GOAWAY at {goaway:?}, answered at {answered:?}"
    );
    let closed = frames.last().map(|f| f.0);
    assert!(
        closed.is_some_and(|c| c < Duration::from_secs(20)),
        "not closed: {frames:?}"
    );

    // an answer that streams for longer than the idle timeout is not cut: it ends whole,
    // before any GOAWAY
    let frames = h2_frames(port, "stream.example", "/s", &[], Duration::from_secs(6)).await;
    let (ended, goaway) = h2_times(&frames);
    let ended = ended.unwrap_or_else(|| panic!("the stream was cut: {frames:?}"));
    assert!(ended >= Duration::from_secs(4), "ended at {ended:?}");
    assert!(goaway.is_none_or(|g| g > ended), "{frames:?}");
}

/// At shutdown a spliced WebSocket is closed at once, in order (the client reads the end, and
/// the node exits long before its 20 s grace time), and its bytes reach the consumer's usage
/// in the node's last flush (the periodic one is a minute away). An HTTP/2 connection stalled
/// after its preface (the header timeout is 30 s here) does not hold the drain either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_close_at_shutdown_and_their_usage_is_kept() {
    let mut n = Node::start_with("[gateway]\nheader_timeout_seconds = 30\n").await;
    created(&n, "/admin/v1/tenants", json!({"name": "acme"})).await;
    let key = keyed_api(&n, "ws", websocket_echo().await).await;
    let port = n.gateway_port;
    wait_routed(port, "ws.example").await;
    let mut s = websocket_open(&n, "ws.example", Some(&key)).await;
    let mut sent = 0;
    let mut received = 0;
    for text in ["one", "two"] {
        let (a, b) = websocket_round(&mut s, text).await;
        sent += a;
        received += b;
    }
    let mut stalled = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stalled
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // the server's SETTINGS: the connection is accepted and in its HTTP/2 handshake
    let mut settings = [0u8; 9];
    stalled.read_exact(&mut settings).await.unwrap();
    assert_eq!(settings[3], 0x4, "a SETTINGS frame first: {settings:?}");
    let asked = std::time::Instant::now();
    let stopping = tokio::task::spawn_blocking(move || {
        let code = n.terminate();
        (n, code)
    });
    let mut buf = [0u8; 16];
    let end = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await;
    assert!(
        matches!(end, Ok(Ok(0)) | Ok(Err(_))),
        "the WebSocket was not closed at shutdown: {end:?}"
    );
    let (mut n, code) = stopping.await.unwrap();
    assert_eq!(code, Some(0), "{}", n.log());
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "the shutdown waited {took:?}: the splice or the stalled HTTP/2 connection held the drain"
    );
    drop(stalled);
    n.boot().await;
    let page = n
        .admin(Method::GET, "/admin/v1/tenants/acme/usage?consumer=c", None)
        .await
        .body;
    assert_eq!(page["totals"]["requests"], 1, "{page}");
    assert_eq!(page["totals"]["bytes_in"], sent, "{page}");
    assert_eq!(page["totals"]["bytes_out"], received, "{page}");
}

/// Splits what a connection received into answers: (head, body). `bodiless[i]` says the i-th
/// answer has no body whatever its head says (a `HEAD`'s). Panics on framing that does not add
/// up: an answer cut short, or bytes left over.
fn split_answers(mut bytes: &[u8], bodiless: &[bool]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let end = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("a head: {}", String::from_utf8_lossy(bytes)))
            + 4;
        let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
        bytes = &bytes[end..];
        let field = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}:")))
                .map(|v| v.trim().to_string())
        };
        let status = status_of(&head);
        let mut body = Vec::new();
        if bodiless.get(out.len()) == Some(&true) || status == 204 || status == 304 {
            // nothing
        } else if field("transfer-encoding").as_deref() == Some("chunked") {
            loop {
                let line_end = bytes.windows(2).position(|w| w == b"\r\n").expect("a size");
                let size = usize::from_str_radix(
                    std::str::from_utf8(&bytes[..line_end]).unwrap().trim(),
                    16,
                )
                .expect("a hex size");
                bytes = &bytes[line_end + 2..];
                if size == 0 {
                    assert!(bytes.starts_with(b"\r\n"), "no trailers expected");
                    bytes = &bytes[2..];
                    break;
                }
                body.extend_from_slice(&bytes[..size]);
                assert_eq!(&bytes[size..size + 2], b"\r\n");
                bytes = &bytes[size + 2..];
            }
        } else {
            let len: usize = field("content-length")
                .unwrap_or_else(|| panic!("a framed answer: {head}"))
                .parse()
                .unwrap();
            assert!(bytes.len() >= len, "an answer cut short: {head}");
            body.extend_from_slice(&bytes[..len]);
            bytes = &bytes[len..];
        }
        out.push((head, body));
    }
    out
}

/// The JSON echo of `echo_upstream`, from an answer's body.
fn echoed(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(body)))
}

/// A connection to the gateway's `port` in the middle of a 100-byte upload to `path` of host
/// `e.example`: the head, then, 200 ms later, 10 bytes of the body.
async fn start_upload(port: u16, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let head = format!("PUT {path} HTTP/1.1\r\nHost: e.example\r\nContent-Length: 100\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.write_all(b"0123456789").await.unwrap();
    s
}

/// A client speaking HTTP/2 with prior knowledge (no TLS) to `host` at the gateway's `port`.
fn h2c_client(host: &str, port: u16) -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .resolve(host, ([127, 0, 0, 1], port).into())
        .build()
        .unwrap()
}

/// The status of the access-log line of the request for `path` (once the log has it).
async fn access_status(n: &Node, path: &str) -> u64 {
    let field = format!("\"path\":\"{path}\"");
    let log = n.log_with(|l| l.contains(&field)).await;
    let line = log
        .lines()
        .find(|l| l.contains(&field))
        .unwrap_or_else(|| panic!("no access line for {path}"));
    let line: serde_json::Value = serde_json::from_str(line).expect("a JSON access line");
    line["status"].as_u64().unwrap_or_else(|| panic!("{line}"))
}

/// Waits until the gateway has no open connection, within 2 s (the upstreams of the test
/// below answer after 3 s): `why` otherwise.
async fn connections_close(n: &Node, why: &str) {
    let left = std::time::Instant::now();
    while metric(n, "apim_gateway_open_connections").await > 0.0 {
        assert!(left.elapsed() < Duration::from_secs(2), "{why}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_answers_are_framed_pipelined_and_handed_over() {
    let n = Node::start_with("[gateway]\nheader_timeout_seconds = 1\n").await;
    created(&n, "/admin/v1/tenants", json!({"name": "acme"})).await;
    publish(&n, "e", echo_upstream().await, json!([])).await;
    // answers of every framing: streamed without a length, 204, 304
    let shapes = http_upstream(|req: hyper::Request<hyper::body::Incoming>| async move {
        let frames = |parts: &'static [&'static str]| {
            let it = parts.iter().map(|p| {
                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                    bytes::Bytes::from_static(p.as_bytes()),
                ))
            });
            http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(futures::stream::iter(
                it,
            )))
        };
        let (status, body) = match req.uri().path() {
            "/chunked" => (200, frames(&["abc", "", "defg", "h"])),
            "/nocontent" => (204, frames(&[])),
            // a first chunk, then nothing for 3 s
            "/drip" => {
                let drip = futures::stream::unfold(0u32, |i| async move {
                    if i == 2 {
                        return None;
                    }
                    if i == 1 {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                    }
                    let frame = hyper::body::Frame::data(bytes::Bytes::from_static(b"drip"));
                    Some((Ok::<_, std::convert::Infallible>(frame), i + 1))
                });
                (
                    200,
                    http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(drip)),
                )
            }
            _ => (304, frames(&[])),
        };
        hyper::Response::builder()
            .status(status)
            .header("etag", "\"v1\"")
            .body(body)
            .unwrap()
    })
    .await;
    publish(&n, "s", shapes, json!([])).await;
    let port = n.gateway_port;
    wait_routed(port, "e.example").await;
    wait_routed(port, "s.example").await;
    let handovers = "apim_gateway_http1_handovers_total";

    // pipelined in one write: a GET, a POST whose body came with its head, every framing, a
    // HEAD, and a last request that closes (the gateway closes at once: the test's patience
    // is 1.5 s of quiet)
    let started = std::time::Instant::now();
    let answer = exchange(
        port,
        b"GET /one HTTP/1.1\r\nHost: e.example\r\n\r\n\
          POST /two HTTP/1.1\r\nHost: e.example\r\nContent-Length: 5\r\n\r\nhello\
          GET /chunked HTTP/1.1\r\nHost: s.example\r\n\r\n\
          GET /nocontent HTTP/1.1\r\nHost: s.example\r\n\r\n\
          GET /notmodified HTTP/1.1\r\nHost: s.example\r\nIf-None-Match: \"v1\"\r\n\r\n\
          HEAD /head HTTP/1.1\r\nHost: e.example\r\n\r\n\
          GET /three HTTP/1.1\r\nHost: e.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_millis(1200),
        "the connection was not closed after the last answer"
    );
    let answers = split_answers(
        answer.as_bytes(),
        &[false, false, false, false, false, true],
    );
    assert_eq!(answers.len(), 7, "{answer}");
    for (i, (head, _)) in answers.iter().enumerate() {
        assert!(head.starts_with("http/1.1 "), "{head}");
        assert!(head.contains("\r\ndate: "), "{head}");
        assert!(head.contains("\r\nx-request-id: req-"), "{head}");
        assert_eq!(
            head.contains("\r\nconnection: close"),
            i == 6,
            "only the last closes: {head}"
        );
    }
    let (one, two, three) = (
        echoed(&answers[0].1),
        echoed(&answers[1].1),
        echoed(&answers[6].1),
    );
    // the HEAD: the length a GET would get, no body (the framing of what follows adds up)
    let (head, body) = &answers[5];
    assert_eq!(status_of(head), 200, "{head}");
    assert!(head.contains("content-length: "), "{head}");
    assert!(body.is_empty());
    assert_eq!(
        (status_of(&answers[0].0), &one["uri"]),
        (200, &json!("/one"))
    );
    assert_eq!(
        (&two["method"], &two["uri"], &two["body"]),
        (&json!("POST"), &json!("/two"), &json!("hello"))
    );
    assert_eq!(two["headers"]["content-length"], "5", "{two}");
    assert_eq!(three["uri"], "/three");
    let (chunked, body) = &answers[2];
    assert!(chunked.contains("transfer-encoding: chunked"), "{chunked}");
    assert!(!chunked.contains("content-length"), "{chunked}");
    assert_eq!(body, b"abcdefgh");
    for (head, _) in &answers[3..5] {
        assert!(
            !head.contains("content-length") && !head.contains("transfer-encoding"),
            "{head}"
        );
    }
    assert_eq!(status_of(&answers[3].0), 204);
    assert_eq!(status_of(&answers[4].0), 304);
    assert!(answers[4].0.contains("etag: \"v1\""), "{}", answers[4].0);

    // a head with more fields than the server's first try holds (still within the limit)
    let many: String = (0..60).map(|i| format!("X-F{i}: v{i}\r\n")).collect();
    let answer = exchange(
        port,
        format!("GET /many HTTP/1.1\r\nHost: e.example\r\n{many}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    let answers = split_answers(answer.as_bytes(), &[]);
    let many = echoed(&answers[0].1);
    assert_eq!(
        (&many["headers"]["x-f0"], &many["headers"]["x-f59"]),
        (&json!("v0"), &json!("v59"))
    );
    // all of the above by the gateway's own server
    assert_eq!(metric(&n, handovers).await, 0.0);

    // a body that comes after its head goes to hyper's server, which streams it, and keeps
    // the connection: the requests after it are served, HEAD included
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"GET /before HTTP/1.1\r\nHost: e.example\r\n\r\n")
        .await
        .unwrap();
    let before = one_answer(&mut s).await;
    assert_eq!(status_of(&before), 200, "{before}");
    s.write_all(b"PUT /late HTTP/1.1\r\nHost: e.example\r\nContent-Length: 11\r\n\r\nhello")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.write_all(b" world").await.unwrap();
    let late = one_answer(&mut s).await;
    let (head, body) = late.split_once("\r\n\r\n").unwrap();
    assert_eq!(status_of(head), 200, "{late}");
    let late = echoed(body.as_bytes());
    assert_eq!(
        (&late["uri"], &late["body"]),
        (&json!("/late"), &json!("hello world"))
    );
    s.write_all(
        b"HEAD /head HTTP/1.1\r\nHost: e.example\r\n\r\n\
          GET /after HTTP/1.1\r\nHost: e.example\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let rest = read_some(&mut s, Duration::from_millis(1500)).await;
    let answers = split_answers(rest.as_bytes(), &[true, false]);
    assert_eq!(answers.len(), 2, "{rest}");
    assert_eq!(status_of(&answers[0].0), 200);
    assert_eq!(echoed(&answers[1].1)["uri"], "/after");
    assert_eq!(metric(&n, handovers).await, 1.0);
    // handed over with several requests read: the first answered here, the rest (from a
    // chunked upload on) by hyper's
    let answer = exchange(
        port,
        b"GET /first HTTP/1.1\r\nHost: e.example\r\n\r\n\
          POST /second HTTP/1.1\r\nHost: e.example\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
          GET /third HTTP/1.1\r\nHost: e.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    let answers = split_answers(answer.as_bytes(), &[]);
    assert_eq!(answers.len(), 3, "{answer}");
    assert_eq!(echoed(&answers[0].1)["uri"], "/first");
    let second = echoed(&answers[1].1);
    assert_eq!(
        (&second["uri"], &second["body"]),
        (&json!("/second"), &json!("abc"))
    );
    assert_eq!(echoed(&answers[2].1)["uri"], "/third");
    let old = exchange(port, b"GET /old HTTP/1.0\r\nHost: e.example\r\n\r\n").await;
    assert_eq!(status_of(&old), 200, "{old}");
    assert!(old.contains("\"/old\""), "{old}");
    assert_eq!(metric(&n, handovers).await, 3.0);

    // a head that comes pipelined behind a request, and stops, is cut after the header
    // timeout (1 s), not the idle timeout (60 s)
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"GET /p HTTP/1.1\r\nHost: e.example\r\n\r\nGET /q HTTP/1.1\r\nHost: e.ex")
        .await
        .unwrap();
    assert_eq!(status_of(&one_answer(&mut s).await), 200);
    let mut byte = [0u8; 1];
    let end = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte)).await;
    assert!(
        matches!(end, Ok(Ok(0)) | Ok(Err(_))),
        "the stalled pipelined head was not cut: {end:?}"
    );

    // a client that leaves while its request waits for the upstream ends the request: its
    // connection closes at once, not when the upstream answers (3 s)
    let open = "apim_gateway_open_connections";
    connections_close(&n, "the earlier connections stayed open").await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: e.example\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(metric(&n, open).await, 1.0);
    drop(s);
    connections_close(&n, "the request outlived its client").await;
    // it is still logged, as 499 (the client closed the request), with the id it was sent
    // upstream with
    let log = n
        .log_with(|l| l.contains("apim::gateway::access") && l.contains("\"status\":499"))
        .await;
    let line: serde_json::Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["status"] == 499)
        .expect("a 499 access line");
    assert_eq!(line["path"], "/slow", "{line}");
    assert_eq!(line["api"], "e", "{line}");
    assert!(
        line["request_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("req-")),
        "{line}"
    );
    assert!(line["duration_us"].is_u64(), "{line}");
    // (its wait was the upstream's: it has an upstream time)
    assert!(line["upstream_us"].is_u64(), "{line}");
    // and so is an HTTP/2 request whose stream the client resets
    let h2c = h2c_client("e.example", port);
    let gone = h2c
        .get(format!("http://e.example:{port}/h2/slow"))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(gone.as_ref().is_err_and(|e| e.is_timeout()), "{gone:?}");
    drop(h2c);
    assert_eq!(access_status(&n, "/h2/slow").await, 499, "the reset stream");
    // and so is one whose client closes its connection in the middle of its upload (over
    // hyper's server, which streams bodies that come after their head)
    let s = start_upload(port, "/upload-left").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(s);
    assert_eq!(
        access_status(&n, "/upload-left").await,
        499,
        "the upload left"
    );
    // one that only half-closes is still reading: it gets a 400 (no 499 on the wire)
    let mut s = start_upload(port, "/upload-half").await;
    s.shutdown().await.unwrap();
    let answer = read_some(&mut s, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("client-closed"), "{answer}");
    assert_eq!(
        access_status(&n, "/upload-half").await,
        499,
        "the half-closed upload"
    );
    // and one whose HTTP/2 stream the client cancels in the middle of its upload
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut send, h2) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let h2 = tokio::spawn(h2);
    let (mut part, parts) = futures::channel::mpsc::channel::<
        Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
    >(1);
    let upload = hyper::Request::put("http://e.example/h2/upload-cancelled")
        .body(http_body_util::StreamBody::new(parts))
        .unwrap();
    futures::SinkExt::send(
        &mut part,
        Ok(hyper::body::Frame::data(bytes::Bytes::from_static(b"part"))),
    )
    .await
    .unwrap();
    // (the answer's wait given up: hyper's client cancels the stream, the body still open)
    let waited = tokio::time::timeout(Duration::from_millis(300), send.send_request(upload)).await;
    assert!(
        waited.is_err(),
        "no answer before the body's end: {waited:?}"
    );
    assert_eq!(
        access_status(&n, "/h2/upload-cancelled").await,
        499,
        "the cancelled upload"
    );
    drop((part, send));
    h2.abort();
    // and so does one that leaves while its answer's body keeps it waiting
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"GET /drip HTTP/1.1\r\nHost: s.example\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("drip") {
        let mut chunk = [0u8; 1024];
        let k = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("the first chunk in time")
            .unwrap();
        assert!(k > 0, "closed early");
        got.extend_from_slice(&chunk[..k]);
    }
    drop(s);
    connections_close(&n, "the answer outlived its client").await;
}
