//! Issuers' keys fetched from `jwks_url`: a cache the request path reads without locks, and a
//! background task that fills and refreshes it.
//!
//! Architecture invariant: the request path never fetches. It reads the last good key set of a
//! URL; a URL with no good fetch yet fails closed (503). A token whose `kid` is unknown asks the
//! task for an early refresh (at most one per URL every 5 seconds), so a key rotation at the
//! issuer is picked up without waiting for the refresh interval. A failed refresh keeps the
//! last good keys (and is retried every 30 seconds).

use super::routes::{JwtKey, RouteTable};
use crate::model::Policy;
use arc_swap::ArcSwap;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Largest JWKS document accepted.
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// Least time between two fetches of one URL (retries after a failure, and the refresh
/// interval's floor).
const MIN_INTERVAL: Duration = Duration::from_secs(30);
/// Least time between an early refresh (asked by an unknown `kid`) and the previous fetch.
const EARLY_GAP: Duration = Duration::from_secs(5);

/// Key sets by source (URL and CA bundle, see [`source_key`]).
#[derive(Default)]
pub struct JwksCache {
    keys: ArcSwap<HashMap<String, Arc<Vec<JwtKey>>>>,
    /// URLs a request found lacking (unknown `kid`).
    wanted: Mutex<HashSet<String>>,
}

impl JwksCache {
    /// The last good keys of a source, if any fetch succeeded.
    pub fn get(&self, url: &str) -> Option<Arc<Vec<JwtKey>>> {
        self.keys.load().get(url).cloned()
    }

    /// Asks for an early refresh of a source (a token named a key it does not have).
    pub fn want(&self, url: &str) {
        let mut w = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
        if w.len() < 1000 {
            w.insert(url.to_string());
        }
    }

    fn take_wanted(&self) -> HashSet<String> {
        std::mem::take(&mut *self.wanted.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn store(&self, url: &str, keys: Vec<JwtKey>) {
        let mut map = HashMap::clone(&self.keys.load());
        map.insert(url.to_string(), Arc::new(keys));
        self.keys.store(Arc::new(map));
    }

    /// Forgets URLs no policy names any more.
    fn retain(&self, urls: &HashMap<String, Source>) {
        let current = self.keys.load();
        if current.keys().any(|u| !urls.contains_key(u)) {
            let map = current
                .iter()
                .filter(|(u, _)| urls.contains_key(*u))
                .map(|(u, k)| (u.clone(), k.clone()))
                .collect();
            self.keys.store(Arc::new(map));
        }
    }
}

/// Where and how often to fetch one key set.
#[derive(Clone, PartialEq)]
struct Source {
    url: String,
    ca_bundle: String,
    refresh: Duration,
}

/// The cache key of a key set: its URL and the CA bundle it is trusted with, so that two
/// policies (two tenants) naming one URL with different CAs never share keys.
pub fn source_key(url: &str, ca_bundle: &str) -> String {
    format!("{url}#{}", crate::pki::secret_hash(ca_bundle))
}

/// Most key sets fetched at once.
const PARALLEL_FETCHES: usize = 8;

/// The `jwks_url` sources of every JWT policy of the table (the shortest refresh wins when
/// several policies name one URL).
fn sources(table: &RouteTable) -> HashMap<String, Source> {
    let mut out: HashMap<String, Source> = HashMap::new();
    for route in table.all() {
        for p in &route.policies {
            if let Policy::Jwt {
                jwks_url: Some(url),
                jwks_ca_bundle: Some(ca),
                jwks_refresh_seconds,
                ..
            } = p
            {
                let refresh = Duration::from_secs(u64::from(*jwks_refresh_seconds));
                out.entry(source_key(url, ca))
                    .and_modify(|s| s.refresh = s.refresh.min(refresh))
                    .or_insert(Source {
                        url: url.clone(),
                        ca_bundle: ca.clone(),
                        refresh,
                    });
            }
        }
    }
    out
}

async fn fetch(url: &str, ca_bundle: &str) -> anyhow::Result<Vec<JwtKey>> {
    let roots = crate::pki::root_store(ca_bundle)?;
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(super::tls::provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .https_only(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()?;
    let mut resp = client.get(url).send().await?.error_for_status()?;
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        body.extend_from_slice(&chunk);
        anyhow::ensure!(
            body.len() <= MAX_DOCUMENT_BYTES,
            "the JWKS document exceeds 1 MiB"
        );
    }
    let text = std::str::from_utf8(&body)?;
    let keys = super::routes::jwks_keys(text);
    anyhow::ensure!(!keys.is_empty(), "the document holds no usable public key");
    Ok(keys)
}

/// Keeps the cache filled for the current table's `jwks_url`s until `stop`.
pub async fn run(
    cache: &JwksCache,
    table: &ArcSwap<RouteTable>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    // URL -> (settings it was fetched with, when it is next due, when it was last fetched)
    let mut due: HashMap<String, (Source, Instant, Option<Instant>)> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let wanted = sources(&table.load());
        due.retain(|u, _| wanted.contains_key(u));
        cache.retain(&wanted);
        let early = cache.take_wanted();
        let now = Instant::now();
        let mut todo: Vec<(String, Source)> = Vec::new();
        for (key, src) in &wanted {
            let next = match due.get(key) {
                Some((old, _, _)) if old != src => now,
                Some((_, at, Some(last)))
                    if early.contains(key) && now.duration_since(*last) >= EARLY_GAP =>
                {
                    (*at).min(now)
                }
                Some((_, at, _)) => *at,
                None => now,
            };
            if next <= now && todo.len() < PARALLEL_FETCHES {
                todo.push((key.clone(), src.clone()));
            }
        }
        // fetched side by side: one slow or unreachable issuer does not hold the others up
        let mut fetches = tokio::task::JoinSet::new();
        for (key, src) in todo {
            fetches.spawn(async move {
                let result = fetch(&src.url, &src.ca_bundle).await;
                (key, src, result)
            });
        }
        while let Some(done) = fetches.join_next().await {
            let Ok((key, src, fetched)) = done else {
                continue;
            };
            let now = Instant::now();
            let next = match fetched {
                Ok(keys) => {
                    tracing::info!(url = %src.url, keys = keys.len(), "JWKS fetched");
                    cache.store(&key, keys);
                    now + src.refresh.max(MIN_INTERVAL)
                }
                Err(e) => {
                    tracing::warn!(url = %src.url, error = %e, "JWKS fetch failed; keeping the last good keys");
                    now + MIN_INTERVAL
                }
            };
            due.insert(key, (src, next, Some(now)));
        }
    }
}
