//! Benchmark of one node's control plane: admin writes per second and commit latency (p50 / p99)
//! with 1 and 32 concurrent clients, time from start to ready, idle RSS.
//!
//! Run: `cargo bench --bench admin_writes` (release build; starts the real binary on loopback,
//! in a temporary data directory, and stops it at the end). Every write is a full admin request:
//! TLS, bearer-token authentication, RBAC, validation, Raft commit with the log fsynced, apply,
//! audit record. Set `APIM_BENCH_WRITES` to change the number of writes per run (default 4000),
//! and `APIM_BENCH_CONFIG` to append TOML sections to the node's configuration.

use serde_json::json;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_apim");

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU time of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // after the command name: state is field 0, utime field 11, stime field 12
    (ticks(11) + ticks(12)) / 100.0
}

fn client(ca: &[u8]) -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca).expect("CA"))
        .build()
        .expect("client")
}

async fn run(
    clients: usize,
    writes: usize,
    url: &str,
    token: &str,
    ca: &[u8],
    tag: &str,
) -> (f64, Duration, Duration) {
    let per = writes / clients;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let http = client(ca);
        let url = url.to_string();
        let token = token.to_string();
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per);
            for i in 0..per {
                let t = Instant::now();
                let r = http
                    .post(format!("{url}/admin/v1/tenants/bench/consumers"))
                    .bearer_auth(&token)
                    .json(&json!({"name": format!("{tag}-{c}-{i}")}))
                    .send()
                    .await
                    .expect("request");
                assert_eq!(r.status(), 201);
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    let elapsed = started.elapsed();
    all.sort();
    (
        all.len() as f64 / elapsed.as_secs_f64(),
        percentile(&all, 0.5),
        percentile(&all, 0.99),
    )
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: run only when benching.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    apim::pki::install_crypto_provider();
    let writes: usize = std::env::var("APIM_BENCH_WRITES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let cfg = tmp.path().join("apim.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n[admin]\nlisten = \"127.0.0.1:{port}\"\n[gateway]\nhttp_listen = \"127.0.0.1:0\"\nhttps_listen = \"127.0.0.1:0\"\n[log]\nlevel = \"warn\"\n{}",
            dir.display().to_string(),
            std::env::var("APIM_BENCH_CONFIG").unwrap_or_default()
        ),
    )
    .expect("config");
    let start = Instant::now();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn apim");
    let url = format!("https://127.0.0.1:{port}");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (ca, token) = loop {
            if let (Ok(ca), Ok(t)) = (
                std::fs::read(dir.join("pki/ca.crt")),
                std::fs::read_to_string(dir.join("admin.token")),
            ) {
                if let Ok(r) = client(&ca)
                    .get(format!("{url}/admin/v1/health"))
                    .send()
                    .await
                {
                    if r.status().is_success() {
                        break (ca, t.trim().to_string());
                    }
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "node did not start"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let ready = start.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle_rss = rss_kib(child.id());
        let r = client(&ca)
            .post(format!("{url}/admin/v1/tenants"))
            .bearer_auth(&token)
            .json(&json!({"name": "bench"}))
            .send()
            .await
            .expect("create tenant");
        assert_eq!(r.status(), 201);
        // warm-up
        run(4, 200, &url, &token, &ca, "warm").await;
        let cpu0 = cpu_seconds(child.id());
        let one = run(1, writes / 4, &url, &token, &ca, "one").await;
        let cpu1 = cpu_seconds(child.id());
        let many = run(32, writes, &url, &token, &ca, "many").await;
        let cpu2 = cpu_seconds(child.id());
        let loaded_rss = rss_kib(child.id());
        println!("| measure | value |");
        println!("|---|---|");
        println!(
            "| start to ready (first start: CA, keys, Raft init, bootstrap) | {} ms |",
            ready.as_millis()
        );
        println!(
            "| idle RSS after start | {:.1} MiB |",
            idle_rss as f64 / 1024.0
        );
        println!("| 1 client: writes/s | {:.0} |", one.0);
        println!(
            "| 1 client: p50 / p99 commit latency | {:.2} ms / {:.2} ms |",
            one.1.as_secs_f64() * 1e3,
            one.2.as_secs_f64() * 1e3
        );
        println!("| 32 clients: writes/s | {:.0} |", many.0);
        println!(
            "| 32 clients: p50 / p99 commit latency | {:.2} ms / {:.2} ms |",
            many.1.as_secs_f64() * 1e3,
            many.2.as_secs_f64() * 1e3
        );
        println!(
            "| node CPU per write, 1 / 32 clients | {:.0} µs / {:.0} µs |",
            (cpu1 - cpu0) * 1e6 / (writes / 4) as f64,
            (cpu2 - cpu1) * 1e6 / writes as f64
        );
        println!(
            "| RSS after {} writes | {:.1} MiB |",
            writes + writes / 4 + 200,
            loaded_rss as f64 / 1024.0
        );
    });
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
}
