//! The README's five-minute walkthrough, run word for word against a real node. Only the admin
//! address (the test node listens on a free port, not 9443) and the binary's directory (the
//! test build, not target/release) are substituted.

mod common;
use common::*;

fn walkthrough_script() -> String {
    let readme = include_str!("../README.md");
    let section = readme
        .split("## Five-minute walkthrough")
        .nth(1)
        .expect("README has the walkthrough section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("walkthrough code block");
    block.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_walkthrough_works_as_written() {
    let n = Node::start_named("apim-data", "").await;
    let bin_dir = std::path::Path::new(BIN)
        .parent()
        .expect("bin dir")
        .display()
        .to_string();
    let script = walkthrough_script()
        .replace("$PWD/target/release", &bin_dir)
        .replace("https://127.0.0.1:9443", &n.url);
    let cwd = n.dir.parent().expect("tmp dir");
    let out = std::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(cwd)
        .env("APIM_URL", &n.url)
        .env_remove("APIM_DATA_DIR")
        .env_remove("APIM_TOKEN")
        .output()
        .expect("run bash");
    let so = stdout(&out);
    let se = stderr(&out);
    assert!(out.status.success(), "walkthrough failed:\n{so}\n{se}");
    for expected in [
        "status:      healthy",
        "tenant acme created",
        "api payments updated",
        "subscription fintech-app.payments created",
        "key: apik_",
        "token: apim_",
        "~ plan/gold",
        "applied to tenant acme: revision",
        "plan.update",
        "audit log OK",
        "\"status\":412",
        "urn:apim:problem:stale-version",
    ] {
        assert!(
            so.contains(expected),
            "missing {expected:?} in:\n{so}\n{se}"
        );
    }
}
