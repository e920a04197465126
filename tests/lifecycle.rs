//! Process lifecycle: systemd notifications (READY, WATCHDOG, STOPPING) on a real notify
//! socket, graceful stop on SIGTERM, refusal of bad configurations and of a second process on
//! the same data directory.

mod common;
use common::*;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port()
}

fn write_config(dir: &std::path::Path, port: u16) -> std::path::PathBuf {
    let cfg = dir.join("apim.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n[admin]\nlisten = \"127.0.0.1:{port}\"\n[gateway]\nhttp_listen = \"127.0.0.1:0\"\nhttps_listen = \"127.0.0.1:0\"\n[log]\nlevel = \"warn\"\n",
            dir.join("data").display().to_string()
        ),
    )
    .expect("config");
    cfg
}

#[test]
fn systemd_notifications_and_graceful_stop() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let sock_path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let cfg = write_config(tmp.path(), free_port());
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut seen: Vec<String> = Vec::new();
    let mut buf = [0u8; 512];
    let started = Instant::now();
    let mut stop_sent = false;
    while started.elapsed() < Duration::from_secs(30) {
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
        let ready = seen.iter().any(|m| m.contains("READY=1"));
        let pinged = seen.iter().any(|m| m.contains("WATCHDOG=1"));
        if ready && pinged && !stop_sent {
            Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status()
                .expect("kill");
            stop_sent = true;
        }
        if seen.iter().any(|m| m.contains("STOPPING=1")) {
            break;
        }
    }
    assert!(
        seen.iter().any(|m| m.contains("READY=1")),
        "READY sent: {seen:?}"
    );
    assert!(
        seen.iter().any(|m| m.contains("WATCHDOG=1")),
        "WATCHDOG sent: {seen:?}"
    );
    assert!(
        seen.iter().any(|m| m.contains("STOPPING=1")),
        "STOPPING sent: {seen:?}"
    );
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "clean exit after SIGTERM");
    // the final flush wrote a signed checkpoint: the audit log verifies with it
    let out = Command::new(BIN)
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .args(["audit", "verify"])
        .output()
        .expect("verify");
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("1 signed checkpoints"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn bad_configuration_is_refused_with_field_and_reason() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("[admin]\nlisten = \"not-an-address\"\n", "admin.listen"),
        ("[admin]\nlistn = \"127.0.0.1:1\"\n", "listn"),
        ("[log]\nformat = \"xml\"\n", "log.format"),
        ("node_id = 0\n", "node_id"),
        ("[raft]\nsnapshot_every = \"often\"\n", "snapshot_every"),
    ];
    for (toml, field) in cases {
        let cfg = tmp.path().join("bad.toml");
        std::fs::write(&cfg, toml).expect("write");
        let out = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&cfg)
            .current_dir(tmp.path())
            .output()
            .expect("run");
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{toml}: {err}");
        assert!(
            err.contains(field) && err.contains("bad.toml"),
            "{toml}: {err}"
        );
        assert!(
            !tmp.path().join("apim-data").exists(),
            "nothing created for a bad config"
        );
    }
    let out = Command::new(BIN)
        .args(["serve", "--config", "/nonexistent/apim.toml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("/nonexistent/apim.toml"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_the_same_data_dir_is_refused() {
    let n = Node::start().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = tmp.path().join("apim.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n[admin]\nlisten = \"127.0.0.1:{}\"\n[gateway]\nhttp_listen = \"127.0.0.1:0\"\nhttps_listen = \"127.0.0.1:0\"\n",
            n.dir.display().to_string(),
            free_port()
        ),
    )
    .expect("config");
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("error:") && err.contains(&n.dir.display().to_string()),
        "{err}"
    );
    // the running node is unaffected
    let r = n
        .admin(reqwest::Method::GET, "/admin/v1/status", None)
        .await;
    assert_eq!(r.status, 200);
}

#[test]
fn cli_errors_are_one_line_with_documented_exit_codes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // no node: unreachable (7); usage error (2); missing token (6)
    std::fs::create_dir_all(tmp.path().join("pki")).expect("mkdir");
    let out = Command::new(BIN)
        .arg("--data-dir")
        .arg(tmp.path())
        .args(["--url", "http://127.0.0.1:1", "--token", "apim_x", "status"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert_eq!(stderr(&out).trim().lines().count(), 1, "{}", stderr(&out));
    let out = Command::new(BIN)
        .args(["tenant", "frobnicate"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN)
        .arg("--data-dir")
        .arg(tmp.path())
        .args(["tenant", "list"])
        .env_remove("APIM_TOKEN")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).contains("no token"), "{}", stderr(&out));
    let help = Command::new(BIN).arg("--help").output().expect("run");
    assert!(stdout(&help).contains("Exit codes:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_glass_issues_a_new_admin_token_and_audits_it() {
    let mut n = Node::start().await;
    let old = n.token.clone();
    // the only admin token is revoked: nobody can administer the node any more
    let toks = n
        .admin(reqwest::Method::GET, "/admin/v1/users/admin/tokens", None)
        .await;
    let id = toks.body["items"][0]["name"]
        .as_str()
        .expect("token id")
        .to_string();
    let r = n
        .req(
            reqwest::Method::PUT,
            &format!("/admin/v1/users/admin/tokens/{id}"),
            Some(&old),
            Some(serde_json::json!({"revoked": true})),
            &[("if-match", "*")],
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        n.admin(reqwest::Method::GET, "/admin/v1/status", None)
            .await
            .status,
        401
    );
    assert_eq!(n.terminate(), Some(0));

    // a restart without the flag changes nothing
    n.boot().await;
    assert_eq!(n.token, old);
    assert_eq!(
        n.admin(reqwest::Method::GET, "/admin/v1/status", None)
            .await
            .status,
        401
    );
    n.terminate();

    // break-glass: local access to the data directory gets a new token, audited
    n.serve_args = vec!["--issue-admin-token".into()];
    n.boot().await;
    assert_ne!(n.token, old, "a new token was written");
    let r = n
        .admin(
            reqwest::Method::GET,
            "/admin/v1/audit?actor=break-glass",
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let items = r.body["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0]["action"], "token.create");
    assert_eq!(items[0]["detail"]["request"], "token.issue-local");
    assert!(!n.dir.join("admin.token.new").exists());
}
