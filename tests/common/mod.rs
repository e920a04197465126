//! Test harness: starts the real `apim` binary on a free loopback port with its own data
//! directory, and talks to it over real TLS with the CA the node created.
#![allow(dead_code)]

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_apim");

pub struct Node {
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub port: u16,
    /// Port of the gateway's HTTP listener.
    pub gateway_port: u16,
    /// Port of the gateway's HTTPS listener.
    pub gateway_tls_port: u16,
    pub url: String,
    pub token: String,
    pub client: reqwest::Client,
    child: Option<Child>,
    pub extra_config: String,
    /// Extra arguments of `apim serve` at the next boot.
    pub serve_args: Vec<String>,
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Resp {
    pub fn etag(&self) -> String {
        self.headers
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

impl Node {
    /// A fresh node in a new temporary directory.
    pub async fn start() -> Node {
        Self::start_with("").await
    }

    /// A fresh node with extra TOML appended to its config.
    pub async fn start_with(extra: &str) -> Node {
        Self::start_named("data", extra).await
    }

    /// A fresh node whose data directory is `<tmp>/<dir_name>`.
    pub async fn start_named(dir_name: &str, extra: &str) -> Node {
        apim::pki::install_crypto_provider();
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join(dir_name);
        let mut n = Node {
            dir,
            _tmp: Some(tmp),
            port: 0,
            gateway_port: 0,
            gateway_tls_port: 0,
            url: String::new(),
            token: String::new(),
            client: reqwest::Client::new(),
            child: None,
            extra_config: extra.to_string(),
            serve_args: Vec::new(),
        };
        n.boot().await;
        n
    }

    fn config_path(&self) -> PathBuf {
        self.dir.with_file_name("apim.toml")
    }

    /// Starts (or restarts) the process on the same data directory.
    pub async fn boot(&mut self) {
        apim::pki::install_crypto_provider();
        for attempt in 0..5 {
            if self.port == 0 || attempt > 0 {
                self.port = free_port();
            }
            let listen = format!("listen = \"127.0.0.1:{}\"\n", self.port);
            let mut sections = self.extra_config_sections();
            let own_admin = if sections.contains("[admin]\n") {
                sections = sections.replacen("[admin]\n", &format!("[admin]\n{listen}"), 1);
                String::new()
            } else {
                format!("[admin]\n{listen}")
            };
            self.gateway_port = free_port();
            self.gateway_tls_port = free_port();
            let gateway_listen = format!(
                "http_listen = \"127.0.0.1:{}\"\nhttps_listen = \"127.0.0.1:{}\"\n",
                self.gateway_port, self.gateway_tls_port
            );
            let own_gateway = if sections.contains("[gateway]\n") {
                sections =
                    sections.replacen("[gateway]\n", &format!("[gateway]\n{gateway_listen}"), 1);
                String::new()
            } else {
                format!("[gateway]\n{gateway_listen}")
            };
            let cfg = format!(
                "data_dir = {:?}\n{}\n{own_admin}{own_gateway}[log]\nformat = \"json\"\nlevel = \"warn,apim::gateway::access=info\"\n{sections}",
                self.dir.display().to_string(),
                self.extra_config_top(),
            );
            std::fs::write(self.config_path(), cfg).expect("write config");
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.with_file_name("node.log"))
                .expect("log file");
            let child = Command::new(BIN)
                .args(["serve", "--config"])
                .arg(self.config_path())
                .args(&self.serve_args)
                .env_remove("APIM_DATA_DIR")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn apim");
            self.child = Some(child);
            self.url = format!("https://127.0.0.1:{}", self.port);
            if self.wait_ready(Duration::from_secs(30)).await {
                return;
            }
            self.kill();
        }
        panic!("apim did not become ready; log:\n{}", self.log());
    }

    fn extra_config_top(&self) -> String {
        // top-level keys must come before the first table
        self.extra_config
            .lines()
            .take_while(|l| !l.trim_start().starts_with('['))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn extra_config_sections(&self) -> String {
        let mut out = String::new();
        let mut on = false;
        for l in self.extra_config.lines() {
            if l.trim_start().starts_with('[') {
                on = true;
            }
            if on {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_file_name("node.log")).unwrap_or_default()
    }

    /// The log once it holds a line `found` accepts (the access log is written in batches,
    /// at least every 100 ms); what it holds after 5 s otherwise.
    pub async fn log_with(&self, found: impl Fn(&str) -> bool) -> String {
        let started = Instant::now();
        loop {
            let log = self.log();
            if log.lines().any(&found) || started.elapsed() > Duration::from_secs(5) {
                return log;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_ready(&mut self, timeout: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    return false;
                }
            }
            let ca = self.dir.join("pki").join("ca.crt");
            if let (Ok(pem), Ok(token)) = (
                std::fs::read(&ca),
                std::fs::read_to_string(self.dir.join("admin.token")),
            ) {
                let cert = reqwest::Certificate::from_pem(&pem).expect("CA PEM");
                self.client = reqwest::Client::builder()
                    .use_rustls_tls()
                    .tls_built_in_root_certs(false)
                    .add_root_certificate(cert)
                    .timeout(Duration::from_secs(30))
                    .build()
                    .expect("client");
                self.token = token.trim().to_string();
                if let Ok(r) = self
                    .client
                    .get(format!("{}/admin/v1/health", self.url))
                    .send()
                    .await
                {
                    if r.status().is_success() {
                        // the token as it is once the node serves (a health check may wait in
                        // the listen backlog while the node still writes a new token)
                        if let Ok(t) = std::fs::read_to_string(self.dir.join("admin.token")) {
                            self.token = t.trim().to_string();
                        }
                        return true;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// A request with the bootstrap admin token.
    pub async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> Resp {
        self.req(method, path, Some(&self.token), body, &[]).await
    }

    pub async fn req(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let mut r = self.client.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        Self::finish(r).await
    }

    /// A request with a raw body and content type.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Vec<u8>,
        content_type: &str,
        headers: &[(&str, &str)],
    ) -> Resp {
        let mut r = self
            .client
            .request(method, format!("{}{path}", self.url))
            .header("content-type", content_type)
            .body(body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        Self::finish(r).await
    }

    async fn finish(r: reqwest::RequestBuilder) -> Resp {
        let resp = r.send().await.expect("request sent");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).to_string()))
        };
        Resp {
            status,
            headers,
            body,
        }
    }

    /// Runs the CLI against this node.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--url")
            .arg(&self.url)
            .args(args)
            .env_remove("APIM_TOKEN")
            .env_remove("APIM_URL")
            .output()
            .expect("run apim CLI")
    }

    /// Audit head (records, hash) as the node reports it.
    pub async fn audit_seq(&self) -> u64 {
        let r = self.admin(Method::GET, "/admin/v1/status", None).await;
        r.body["audit"]["records"].as_u64().expect("audit records")
    }

    /// Creates a user with `role` in `tenant` (None: platform) and returns a token for it.
    pub async fn user_token(&self, tenant: Option<&str>, name: &str, role: &str) -> String {
        let base = match tenant {
            Some(t) => format!("/admin/v1/tenants/{t}/users"),
            None => "/admin/v1/users".to_string(),
        };
        let r = self
            .admin(
                Method::POST,
                &base,
                Some(serde_json::json!({"name": name, "role": role})),
            )
            .await;
        assert_eq!(r.status, 201, "create user {name}: {:?}", r.body);
        let r = self
            .admin(
                Method::POST,
                &format!("{base}/{name}/tokens"),
                Some(serde_json::json!({"ttl_days": 1})),
            )
            .await;
        assert_eq!(r.status, 201, "create token for {name}: {:?}", r.body);
        r.body["token"].as_str().expect("token").to_string()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn data_path(n: &Node, rel: &str) -> PathBuf {
    n.dir.join(rel)
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}

/// A tenant with a plan, an API, a consumer and a subscription.
pub async fn seed_tenant(n: &Node, t: &str) {
    let r = n
        .admin(Method::POST, "/admin/v1/tenants", Some(json!({"name": t})))
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let r = n
        .admin(
            Method::POST,
            &format!("/admin/v1/tenants/{t}/plans"),
            Some(json!({"name": "gold", "rate_limit": {"requests": 100, "per_seconds": 60}})),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let r = n
        .admin(
            Method::POST,
            &format!("/admin/v1/tenants/{t}/apis"),
            Some(api_json("payments")),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let r = n
        .admin(
            Method::POST,
            &format!("/admin/v1/tenants/{t}/consumers"),
            Some(json!({"name": "app"})),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let r = n
        .admin(
            Method::POST,
            &format!("/admin/v1/tenants/{t}/subscriptions"),
            Some(json!({"consumer": "app", "api": "payments", "plan": "gold", "status": "active"})),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
}

pub fn api_json(name: &str) -> Value {
    serde_json::json!({
        "name": name,
        "version": "v1",
        "hosts": ["api.bank.example"],
        "base_path": format!("/{name}"),
        "upstream": {"targets": [{"url": "http://127.0.0.1:9000"}]},
        "policies": [{"type": "api-key", "header": "x-api-key"}],
    })
}

/// POSTs `body` with the admin token and expects 201; returns the created object.
pub async fn created(n: &Node, path: &str, body: Value) -> Value {
    let r = n.admin(Method::POST, path, Some(body)).await;
    assert_eq!(r.status, 201, "POST {path}: {:?}", r.body);
    r.body
}

/// An HTTP/1.1 server on a loopback port that answers every request with `handler`.
pub async fn http_upstream<F, Fut, B>(handler: F) -> std::net::SocketAddr
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = hyper::Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let answer = handler(req);
                    async move { Ok::<_, std::convert::Infallible>(answer.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// An upstream that answers every request with `bytes` of `x`, streamed in 64 KiB frames
/// (more than the sockets between a client and the gateway hold, for a large `bytes`).
pub async fn big_upstream(bytes: usize) -> std::net::SocketAddr {
    http_upstream(
        move |_req: hyper::Request<hyper::body::Incoming>| async move {
            let chunks = futures::stream::iter((0..bytes / 65536).map(|_| {
                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from(
                    vec![b'x'; 65536],
                )))
            }));
            hyper::Response::new(http_body_util::StreamBody::new(chunks))
        },
    )
    .await
}

/// An upstream that answers every request with a JSON echo of what it received; `/slow` waits
/// three seconds first.
pub async fn echo_upstream() -> std::net::SocketAddr {
    http_upstream(|req: hyper::Request<hyper::body::Incoming>| async move {
        use http_body_util::BodyExt;
        if req.uri().path().ends_with("/slow") {
            tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        }
        let headers: serde_json::Map<String, Value> = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Value::String(v.to_str().unwrap_or("").to_string()),
                )
            })
            .collect();
        let method = req.method().to_string();
        let uri = req.uri().to_string();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let echo = json!({
            "method": method,
            "uri": uri,
            "headers": headers,
            "body": String::from_utf8_lossy(&body),
        });
        hyper::Response::builder()
            .header("content-type", "application/json")
            .header("connection", "keep-alive")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                echo.to_string(),
            )))
            .expect("response")
    })
    .await
}

/// The node's Prometheus text exposition.
pub async fn metrics(n: &Node) -> String {
    n.client
        .get(format!("{}/metrics", n.url))
        .bearer_auth(&n.token)
        .send()
        .await
        .expect("metrics answered")
        .text()
        .await
        .expect("metrics text")
}

/// The value of the unlabelled series `name` in the node's exposition (0 when absent).
pub async fn metric(n: &Node, name: &str) -> f64 {
    metrics(n)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Sends `request` on a new connection to the gateway's `port` and returns what comes back
/// until the answer's head is complete or the connection closes (panics after 10 s: the
/// gateway must answer or close).
pub async fn raw_head(port: u16, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connected");
    c.write_all(request).await.expect("request sent");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let k = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
            .await
            .expect("an answer, or the connection closed, within 10 s")
            .unwrap_or(0);
        if k == 0 {
            break;
        }
        got.extend_from_slice(&buf[..k]);
    }
    String::from_utf8_lossy(&got).into_owned()
}
