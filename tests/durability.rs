//! Durability and tamper evidence: SIGKILL in the middle of a stream of writes loses no
//! acknowledged write and leaves a verifiable audit chain; any edit of the segments is caught
//! and located by `apim audit verify`; snapshots compact the log and survive restarts.

mod common;
use common::*;
use reqwest::Method;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

async fn all_consumers(n: &Node, tenant: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut offset = 0;
    loop {
        let r = n
            .admin(
                Method::GET,
                &format!("/admin/v1/tenants/{tenant}/consumers?limit=1000&offset={offset}"),
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let items = r.body["items"].as_array().cloned().unwrap_or_default();
        for it in &items {
            names.insert(it["name"].as_str().unwrap_or_default().to_string());
        }
        match r.body["next_offset"].as_u64() {
            Some(o) => offset = o as usize,
            None => return names,
        }
    }
}

fn verify_cli(dir: &std::path::Path, audit_dir: &std::path::Path) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(["audit", "verify", "--dir"])
        .arg(audit_dir)
        .arg("--public-key")
        .arg(dir.join("pki").join("audit-signing.pub"))
        .output()
        .expect("run apim audit verify")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_no_acknowledged_write() {
    let mut n = Node::start().await;
    let r = n
        .admin(
            Method::POST,
            "/admin/v1/tenants",
            Some(json!({"name": "acme"})),
        )
        .await;
    assert_eq!(r.status, 201);

    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    for w in 0..16 {
        let client = n.client.clone();
        let url = n.url.clone();
        let token = n.token.clone();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10_000 {
                let name = format!("c-{w}-{i}");
                let res = client
                    .post(format!("{url}/admin/v1/tenants/acme/consumers"))
                    .bearer_auth(&token)
                    .json(&json!({"name": name}))
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status() == 201 => acked.lock().expect("lock").push(name),
                    Ok(r) => panic!("unexpected status {} before the kill", r.status()),
                    Err(_) => return, // the node was killed
                }
            }
        }));
    }
    // Kill once a good number of writes are acknowledged, while the others are in flight.
    let started = std::time::Instant::now();
    while acked.lock().expect("lock").len() < 300 {
        assert!(started.elapsed().as_secs() < 120, "writes too slow");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    n.kill();
    for t in tasks {
        t.await.expect("writer task");
    }
    let acked: Vec<String> = acked.lock().expect("lock").clone();
    assert!(acked.len() >= 300);

    n.boot().await;
    let present = all_consumers(&n, "acme").await;
    let missing: Vec<&String> = acked.iter().filter(|a| !present.contains(*a)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged writes lost after SIGKILL: {missing:?}"
    );

    // Every change has its audit record, and the chain verifies after the restart.
    let seq = n.audit_seq().await;
    assert!(
        seq as usize >= acked.len() + 3,
        "audit records {seq} < writes"
    );
    // Give the node a flush interval so the segment files catch up, then verify offline.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let out = n.cli(&["audit", "verify", "--against-node"]);
    assert!(
        out.status.success(),
        "verify failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains("audit log OK"), "{}", stdout(&out));
    let records: u64 = stdout(&out)
        .split_whitespace()
        .nth(3)
        .and_then(|s| s.parse().ok())
        .expect("record count in verify output");
    assert!(
        records >= present.len() as u64,
        "segments hold {records} records"
    );
}

/// Byte ranges of the record frames in the first segment (no checkpoint before the last one).
fn frames(dir: &std::path::Path) -> (std::path::PathBuf, Vec<(usize, usize, u64)>) {
    let records = apim::audit::read_all(dir).expect("read segments");
    let seg = dir.join(apim::audit::segment_file_name(1));
    let mut off = apim::audit::SEGMENT_HEADER_LEN;
    let mut out = Vec::new();
    for r in records {
        let len = r.encode().len();
        out.push((off, len, r.record.seq));
        off += len;
    }
    (seg, out)
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        let name = e.file_name();
        if name.to_string_lossy().ends_with(".seg") {
            std::fs::copy(e.path(), to.join(name)).expect("copy segment");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_detects_and_locates_tampering() {
    let mut n = Node::start().await;
    seed_tenant(&n, "acme").await;
    for i in 0..20 {
        let r = n
            .admin(
                Method::POST,
                "/admin/v1/tenants/acme/consumers",
                Some(json!({"name": format!("x{i}")})),
            )
            .await;
        assert_eq!(r.status, 201);
    }
    assert_eq!(n.terminate(), Some(0), "clean stop; log:\n{}", n.log());
    let audit = n.dir.join("audit");
    let ok = verify_cli(&n.dir, &audit);
    assert!(ok.status.success(), "{}{}", stdout(&ok), stderr(&ok));
    assert!(
        stdout(&ok).contains("1 signed checkpoints") || stdout(&ok).contains("signed checkpoints")
    );

    let (seg, fr) = frames(&audit);
    let seg_name = seg.file_name().expect("name").to_string_lossy().to_string();
    let original = std::fs::read(&seg).expect("segment");
    let k = 10; // a record in the middle
    let (off, len, seq) = fr[k];
    let (off2, len2, _) = fr[k + 1];

    let flip = {
        let mut b = original.clone();
        b[off + len / 2] ^= 0x01;
        b
    };
    let delete = {
        let mut b = original[..off].to_vec();
        b.extend_from_slice(&original[off + len..]);
        b
    };
    let swap = {
        let mut b = original[..off].to_vec();
        b.extend_from_slice(&original[off2..off2 + len2]);
        b.extend_from_slice(&original[off..off + len]);
        b.extend_from_slice(&original[off2 + len2..]);
        b
    };
    let truncate = original[..off + len / 2].to_vec();
    let cases = [
        ("flip", flip),
        ("delete", delete),
        ("swap", swap),
        ("truncate", truncate),
    ];
    for (what, bytes) in cases {
        let copy = n.dir.with_file_name(format!("tampered-{what}"));
        copy_dir(&audit, &copy);
        std::fs::write(copy.join(&seg_name), &bytes).expect("write tampered");
        let out = verify_cli(&n.dir, &copy);
        let err = stderr(&out);
        assert_eq!(
            out.status.code(),
            Some(8),
            "{what}: verify must fail: {}{err}",
            stdout(&out)
        );
        assert!(err.contains(&seg_name), "{what}: names the segment: {err}");
        assert!(
            err.contains(&format!("offset {off}")),
            "{what}: names the offset {off}: {err}"
        );
        assert!(
            err.contains(&format!("seq {seq}")) || err.contains(&format!("seq {}", seq + 1)),
            "{what}: names the record: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_compact_the_log_and_survive_restart() {
    let mut n = Node::start_with("[raft]\nsnapshot_every = 20\nkeep_logs = 5\n").await;
    let r = n
        .admin(
            Method::POST,
            "/admin/v1/tenants",
            Some(json!({"name": "acme"})),
        )
        .await;
    assert_eq!(r.status, 201);
    for i in 0..120 {
        let r = n
            .admin(
                Method::POST,
                "/admin/v1/tenants/acme/consumers",
                Some(json!({"name": format!("s{i}")})),
            )
            .await;
        assert_eq!(r.status, 201);
    }
    let mut status = n.admin(Method::GET, "/admin/v1/status", None).await;
    for _ in 0..100 {
        // snapshots are built in the background: wait for one past entry 100 and a compaction
        if status.body["raft"]["purged"].as_u64().unwrap_or(0) > 0
            && status.body["raft"]["snapshot"].as_u64().unwrap_or(0) >= 100
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        status = n.admin(Method::GET, "/admin/v1/status", None).await;
    }
    let snap = status.body["raft"]["snapshot"].as_u64().unwrap_or(0);
    let purged = status.body["raft"]["purged"].as_u64().unwrap_or(0);
    assert!(snap >= 100, "snapshot taken: {:?}", status.body);
    assert!(purged > 0, "log compacted: {:?}", status.body);

    n.kill();
    n.boot().await;
    assert_eq!(all_consumers(&n, "acme").await.len(), 120);
    let r = n
        .admin(
            Method::POST,
            "/admin/v1/tenants/acme/consumers",
            Some(json!({"name": "after"})),
        )
        .await;
    assert_eq!(r.status, 201, "writes continue after restart: {:?}", r.body);
    assert_eq!(n.terminate(), Some(0));
    let out = verify_cli(&n.dir, &n.dir.join("audit"));
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_cut_from_the_tail_are_caught_against_the_node() {
    let n = Node::start().await;
    seed_tenant(&n, "acme").await;
    let audit = n.dir.join("audit");
    let (seg, fr) = frames(&audit);
    let seg_name = seg.file_name().expect("name").to_string_lossy().to_string();
    let (off, _, last_seq) = *fr.last().expect("records");
    let copy = n.dir.with_file_name("tail-cut");
    copy_dir(&audit, &copy);
    let original = std::fs::read(&seg).expect("segment");
    // cut the newest record at a frame boundary: the file alone still looks complete
    std::fs::write(copy.join(&seg_name), &original[..off]).expect("write");
    let dir = copy.to_str().expect("utf-8");
    let alone = n.cli(&["audit", "verify", "--dir", dir]);
    assert!(
        alone.status.success(),
        "offline the cut is invisible: {}",
        stderr(&alone)
    );
    let against = n.cli(&["audit", "verify", "--against-node", "--dir", dir]);
    assert_eq!(
        against.status.code(),
        Some(8),
        "{}{}",
        stdout(&against),
        stderr(&against)
    );
    assert!(
        stderr(&against).contains(&format!("{last_seq}")),
        "{}",
        stderr(&against)
    );
}

/// Every regular file under `dir`, with its length and modification time.
fn file_states(
    dir: &std::path::Path,
) -> BTreeMap<std::path::PathBuf, (u64, std::time::SystemTime)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read data dir").flatten() {
            let md = e.metadata().expect("metadata");
            if md.is_dir() {
                todo.push(e.path());
            } else if md.is_file() {
                out.insert(e.path(), (md.len(), md.modified().expect("mtime")));
            }
        }
    }
    out
}

/// An idle node writes nothing: the flusher, which runs every 50 ms here, and the checkpoints,
/// asked every second, find nothing new and touch no file (before, every flush committed and
/// fsynced the state and the audit segment). A write still reaches both at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_node_touches_no_file() {
    let mut n =
        Node::start_with("[audit]\nflush_interval_ms = 50\ncheckpoint_interval_seconds = 1\n")
            .await;
    created(&n, "/admin/v1/tenants", json!({"name": "acme"})).await;
    // the start and the write settle: flushed, then checkpointed within about a second
    let mut before = file_states(&n.dir);
    let mut settled = false;
    for _ in 0..10 {
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        let now = file_states(&n.dir);
        if now == before {
            settled = true;
            break;
        }
        before = now;
    }
    assert!(settled, "the data directory never stopped changing");
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let after = file_states(&n.dir);
    let changed: Vec<_> = after
        .iter()
        .filter(|(p, s)| before.get(*p) != Some(s))
        .map(|(p, _)| p.strip_prefix(&n.dir).unwrap_or(p).to_path_buf())
        .collect();
    assert!(changed.is_empty(), "an idle node wrote to {changed:?}");

    // a write still reaches the state file and the audit segment
    created(
        &n,
        "/admin/v1/tenants/acme/consumers",
        json!({"name": "late"}),
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let later = file_states(&n.dir);
    let state = n.dir.join("state.redb");
    assert_ne!(
        later.get(&state),
        after.get(&state),
        "the write reached the state file"
    );
    let grew = later.iter().any(|(p, (len, _))| {
        p.starts_with(n.dir.join("audit")) && after.get(p).is_none_or(|(l, _)| len > l)
    });
    assert!(grew, "the write's record reached the audit segments");
    assert_eq!(n.terminate(), Some(0));
    let out = verify_cli(&n.dir, &n.dir.join("audit"));
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
}
