//! The route matcher on arbitrary hosts, paths, methods and headers: never a panic, and a match
//! always honours the rule (the route's base path covers the path on whole segments). The hosts
//! `idx.bank.example` (indexed by base path: enough APIs, one base path twice) and
//! `deep.bank.example` (too deep to be indexed: scanned) must also give the most specific match
//! (no longer base path of the host covers the path; between equal ones, the first API by name).
#![no_main]

use apim::gateway::routes::{OperationMatch, RouteTable};
use apim::model::ApiSpec;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

/// Base paths of the indexed host (`/a/b` twice: APIs `x2` and `x12`).
const INDEXED: [&str; 13] = [
    "/", "/a", "/a/b", "/a/b/c", "/ab", "/b", "/b/a", "/v1", "/v1/x", "/v1/x/y", "/v2/x", "/z",
    "/a/b",
];

/// Base paths of the host too deep to be indexed (the first has 33 segments).
fn deep() -> &'static [String] {
    static DEEP: OnceLock<Vec<String>> = OnceLock::new();
    DEEP.get_or_init(|| {
        let mut v = vec!["/d".repeat(33)];
        v.extend(["/", "/d", "/d/d", "/d/e", "/e", "/e/d", "/f", "/f/g"].map(String::from));
        v
    })
}

fn covers(base: &str, path: &str) -> bool {
    base == "/" || path == base || path.starts_with(&format!("{base}/"))
}

fn table() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let apis: Vec<ApiSpec> = [
            r#"{"name":"root","version":"v1","hosts":["api.bank.example"],"base_path":"/","upstream":{"targets":[{"url":"http://127.0.0.1:1"}]}}"#,
            r#"{"name":"pay","version":"v1","hosts":["api.bank.example"],"base_path":"/payments","upstream":{"targets":[{"url":"http://127.0.0.1:1"}]},
                "routes":[{"path":"/orders","methods":["GET"]},{"path":"/orders/export","path_match":"exact","headers":[{"name":"x-export","value":"csv"}]}]}"#,
            r#"{"name":"wild","version":"v1","hosts":["*.bank.example"],"base_path":"/v2","upstream":{"targets":[{"url":"http://127.0.0.1:1"}]}}"#,
            r#"{"name":"deep","version":"v1","hosts":["*.eu.bank.example","127.0.0.1"],"base_path":"/a/b/c","upstream":{"targets":[{"url":"http://127.0.0.1:1"}]}}"#,
        ]
        .iter()
        .map(|j| serde_json::from_str(j).expect("valid API"))
        .chain(
            INDEXED
                .iter()
                .map(|b| ("idx.bank.example", "x", *b))
                .chain(deep().iter().map(|b| ("deep.bank.example", "y", b.as_str())))
                .enumerate()
                .map(|(i, (host, prefix, base))| {
                    serde_json::from_value(serde_json::json!({
                        "name": format!("{prefix}{i}"), "version": "v1", "hosts": [host],
                        "base_path": base,
                        "upstream": {"targets": [{"url": "http://127.0.0.1:1"}]},
                    }))
                    .expect("valid API")
                }),
        )
        .collect();
        RouteTable::from_apis("t", &apis)
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(4, '\n');
    let host = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or_default();
    let method = parts.next().unwrap_or("GET");
    let header = parts.next().unwrap_or_default();
    let Some(route) = table().lookup(host, path) else {
        return;
    };
    let base = route.base_path.as_str();
    assert!(covers(base, path), "{path:?} routed to base path {base:?}");
    let (bases, prefix): (Vec<&str>, char) = match route.api.chars().next() {
        Some('x') => (INDEXED.to_vec(), 'x'),
        Some('y') => (deep().iter().map(String::as_str).collect(), 'y'),
        _ => return,
    };
    assert!(
        !bases.iter().any(|b| b.len() > base.len() && covers(b, path)),
        "{path:?} routed to {base:?}, not to a longer base path that covers it"
    );
    // between equal base paths, the first API by name (names are the prefix and the position
    // among all the fuzz APIs: the indexed host's come first)
    let offset = if prefix == 'x' { 0 } else { INDEXED.len() };
    let first = bases
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == base)
        .map(|(i, _)| format!("{prefix}{}", i + offset))
        .min()
        .expect("the route's base path is one of its host's");
    assert_eq!(route.api, first, "{path:?}: ties go to the first API by name");
    let mut headers = apim::gateway::head::Fields::default();
    headers.insert("x-export", header.as_bytes());
    if let OperationMatch::Matched(op) = route.operation(method, path, &headers) {
        assert!(op.methods.is_empty() || op.methods.iter().any(|m| m == method));
    }
});
