//! Hostile and edge inputs found in review: out-of-range times, slow clients, connection floods,
//! token self-extension, tenant-name reuse, empty audit directories, and the credential of the
//! actor in audit records.

mod common;
use common::*;
use reqwest::Method;
use serde_json::json;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_times_are_refused_not_crashing() {
    let n = Node::start().await;
    seed_tenant(&n, "acme").await;
    let before = n.audit_seq().await;
    let r = n
        .admin(
            Method::GET,
            "/admin/v1/audit?since=9999-12-31T23:59:59-01:00",
            None,
        )
        .await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(r.body["invalid-params"][0]["name"], "since");
    let r = n
        .admin(
            Method::POST,
            "/admin/v1/tenants/acme/consumers/app/keys",
            Some(json!({"expires_at": "9999-12-31T23:59:59-01:00"})),
        )
        .await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(r.body["invalid-params"][0]["name"], "expires_at");
    let r = n.admin(Method::GET, "/admin/v1/audit?limit=0", None).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(n.audit_seq().await, before, "nothing changed");
    assert_eq!(
        n.admin(Method::GET, "/admin/v1/health", None).await.status,
        200
    );
}

fn raw_tls(
    port: u16,
    ca: &std::path::Path,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    apim::pki::install_crypto_provider();
    let pem = std::fs::read_to_string(ca).expect("ca");
    let roots = apim::pki::root_store(&pem).expect("roots");
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn = rustls::ClientConnection::new(
        std::sync::Arc::new(cfg),
        "127.0.0.1".try_into().expect("server name"),
    )
    .expect("client");
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    rustls::StreamOwned::new(conn, tcp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_connections_are_capped() {
    let n = Node::start_with("[admin]\nheader_timeout_seconds = 1\nmax_connections = 3\n").await;
    let ca = n.dir.join("pki").join("ca.crt");
    let port = n.port;
    let (closed_after, refused) = tokio::task::spawn_blocking(move || {
        // half a request header, then silence: the node closes the connection
        let mut s = raw_tls(port, &ca);
        s.write_all(b"GET /admin/v1/health HTTP/1.1\r\nHost: x\r\n")
            .expect("write");
        s.flush().expect("flush");
        let started = Instant::now();
        let mut buf = [0u8; 512];
        let _ = s.read(&mut buf);
        let closed_after = started.elapsed();
        // connections beyond the cap (3, counting any the test client keeps open) are closed
        let mut held = Vec::new();
        let mut refused = false;
        for _ in 0..5 {
            let mut c = raw_tls(port, &ca);
            let mut b = [0u8; 64];
            let answered = c
                .write_all(b"GET /admin/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
                .and_then(|_| c.read(&mut b))
                .map(|n| n > 0)
                .unwrap_or(false);
            if !answered {
                refused = true;
                break;
            }
            held.push(c);
        }
        assert!(
            held.len() <= 3,
            "{} connections held over a cap of 3",
            held.len()
        );
        drop(held);
        (closed_after, refused)
    })
    .await
    .expect("client thread");
    assert!(
        closed_after < Duration::from_secs(15),
        "slow header cut off after {closed_after:?}"
    );
    assert!(refused, "a connection over max_connections is closed");
    // once the held connections are gone the node serves again
    let mut ok = false;
    for _ in 0..50 {
        if n.admin(Method::GET, "/admin/v1/health", None).await.status == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_may_shorten_but_not_extend_their_tokens() {
    let n = Node::start().await;
    seed_tenant(&n, "acme").await;
    let tok = n.user_token(Some("acme"), "vic", "viewer").await; // 1 day
    let list = n
        .admin(Method::GET, "/admin/v1/tenants/acme/users/vic/tokens", None)
        .await;
    let id = list.body["items"][0]["name"]
        .as_str()
        .expect("id")
        .to_string();
    let path = format!("/admin/v1/tenants/acme/users/vic/tokens/{id}");
    let later = "2030-01-01T00:00:00Z";
    let r = n
        .req(
            Method::PUT,
            &path,
            Some(&tok),
            Some(json!({"expires_at": later})),
            &[("if-match", "*")],
        )
        .await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    let sooner =
        apim::model::format_time(time::OffsetDateTime::now_utc() + time::Duration::hours(1));
    let r = n
        .req(
            Method::PUT,
            &path,
            Some(&tok),
            Some(json!({"expires_at": sooner})),
            &[("if-match", "*")],
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    // an administrator may extend it
    let r = n
        .req(
            Method::PUT,
            &path,
            Some(&n.token),
            Some(json!({"expires_at": later})),
            &[("if-match", "*")],
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    // the audit record names the credential used
    let a = n
        .admin(
            Method::GET,
            "/admin/v1/audit?actor=vic&action=token.update",
            None,
        )
        .await;
    assert_eq!(
        a.body["items"][0]["credential"],
        id.as_str(),
        "{:?}",
        a.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_tenant_name_does_not_inherit_the_old_audit_trail() {
    let n = Node::start().await;
    let r = n
        .admin(
            Method::POST,
            "/admin/v1/tenants",
            Some(json!({"name": "acme"})),
        )
        .await;
    assert_eq!(r.status, 201);
    let r = n
        .admin(
            Method::POST,
            "/admin/v1/tenants/acme/consumers",
            Some(json!({"name": "secret-partner"})),
        )
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(
        n.admin(
            Method::DELETE,
            "/admin/v1/tenants/acme/consumers/secret-partner",
            None
        )
        .await
        .status,
        204
    );
    assert_eq!(
        n.admin(Method::DELETE, "/admin/v1/tenants/acme", None)
            .await
            .status,
        204
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
    let r = n
        .admin(
            Method::POST,
            "/admin/v1/tenants",
            Some(json!({"name": "acme"})),
        )
        .await;
    assert_eq!(r.status, 201);
    let tok = n.user_token(Some("acme"), "newcomer", "tenant-admin").await;
    let mine = n
        .req(
            Method::GET,
            "/admin/v1/tenants/acme/audit?limit=1000",
            Some(&tok),
            None,
            &[],
        )
        .await;
    assert_eq!(mine.status, 200);
    let text = mine.body.to_string();
    assert!(
        !text.contains("secret-partner"),
        "old tenant's records leaked: {text}"
    );
    assert!(
        text.contains("newcomer"),
        "the new tenant's own records are there: {text}"
    );
    // the platform admin still sees the whole history
    let all = n
        .admin(Method::GET, "/admin/v1/audit?tenant=acme&limit=1000", None)
        .await;
    assert!(all.body.to_string().contains("secret-partner"));
}

#[test]
fn verifying_an_empty_audit_directory_fails() {
    let tmp = tempfile::tempdir().expect("tmp");
    let key = tmp.path().join("k");
    let pubkey = tmp.path().join("k.pub");
    apim::audit::Signer::load_or_create(&key, &pubkey).expect("key");
    std::fs::create_dir_all(tmp.path().join("audit")).expect("dir");
    let run = |extra: &[&str]| {
        std::process::Command::new(BIN)
            .args(["audit", "verify", "--dir"])
            .arg(tmp.path().join("audit"))
            .arg("--public-key")
            .arg(&pubkey)
            .args(extra)
            .output()
            .expect("run")
    };
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(8), "{}", stderr(&out));
    assert!(stderr(&out).contains("no audit record"), "{}", stderr(&out));
    assert!(run(&["--allow-empty"]).status.success());
}
