//! The routing table: published APIs compiled into an immutable structure that the request path
//! reads without locks, and the credentials and subscriptions the policies need.
//!
//! Architecture invariant: building a table is a pure function of the applied state; matching
//! is a pure function of (table, host, path). Neither does IO.

use crate::model::{ApiSpec, Kind, Lifecycle, PlanSpec, Policy, Spec, SubscriptionStatus};
use crate::state::{self, KvRead, StoreError};
use rustc_hash::FxBuildHasher;
use std::collections::HashMap;

/// The maps a request looks up: FxHash, as their keys are set by the configuration (hosts,
/// base paths, consumers) or are SHA-256 digests, never chosen by a client; a client's
/// lookup costs a hash of its bytes, several times cheaper than SipHash's.
pub type FxMap<K, V> = HashMap<K, V, FxBuildHasher>;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// One upstream target and its weight.
#[derive(Debug, Clone)]
pub struct Target {
    /// `http://host:port` (scheme and authority) of the target.
    pub origin: String,
    /// Path prefix of the target URL, without a trailing `/` (may be empty).
    pub path: String,
    /// `origin`, parsed once (no request re-parses it).
    pub scheme: Option<hyper::http::uri::Scheme>,
    pub authority: Option<hyper::http::uri::Authority>,
    pub weight: u32,
    /// Lasting state (in flight, ejection, health), bound when the table is installed.
    pub state: std::sync::OnceLock<Arc<super::upstream::TargetState>>,
}

impl Target {
    /// The target as the `target` label of its metrics: origin and path.
    pub fn label(&self) -> String {
        format!("{}{}", self.origin, self.path)
    }

    pub fn state(&self) -> &Arc<super::upstream::TargetState> {
        self.state.get_or_init(Default::default)
    }
}

/// A published API as the gateway serves it.
#[derive(Debug)]
pub struct Route {
    pub tenant: String,
    pub api: String,
    /// Path prefix, without a trailing `/` (`/` for the root).
    pub base_path: String,
    pub policies: Vec<Policy>,
    pub targets: Vec<Target>,
    /// Balancing, retries, ejection and health-check settings of the API's upstream.
    pub upstream: crate::model::Upstream,
    /// The client for `https://` targets, bound when the table is installed (an error names
    /// why the upstream's TLS cannot be used; such targets then fail closed).
    pub tls_client: std::sync::OnceLock<Result<super::HttpsClient, &'static str>>,
    /// The client for `http://` targets with `protocol: http2`, bound the same way.
    pub h2c_client: std::sync::OnceLock<super::H2cClient>,
    /// Weighted round-robin over `targets`: each index appears `weight` times.
    schedule: Vec<usize>,
    cursor: AtomicUsize,
    /// Subscriptions to this API: consumer → (status, plan).
    pub subscriptions: FxMap<String, (SubscriptionStatus, Option<PlanSpec>)>,
    /// Decoding keys of each JWT policy with a static JWKS, by the policy's position.
    pub jwt_keys: HashMap<usize, Vec<JwtKey>>,
    /// The API's metric series, resolved on first use.
    pub series: std::sync::OnceLock<crate::telemetry::ApiSeries>,
    /// The API's operations, most specific first (empty: every request under the base path).
    pub operations: Vec<Operation>,
    /// Cache key of each JWT policy's `jwks_url` key set, by the policy's position.
    pub jwks_sources: HashMap<usize, String>,
    /// Chain verifier of each `mutual-tls` policy (its CA bundle), by the policy's position.
    /// A bundle that cannot be used has no verifier, and the policy then fails closed.
    pub mtls: HashMap<usize, Arc<dyn rustls::server::danger::ClientCertVerifier>>,
}

/// A verifier of client chains against a PEM CA bundle.
fn mtls_verifier(ca_bundle: &str) -> Option<Arc<dyn rustls::server::danger::ClientCertVerifier>> {
    let roots = crate::pki::root_store(ca_bundle).ok()?;
    rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(super::tls::provider()),
    )
    .build()
    .ok()
}

/// One operation of an API as the gateway matches it.
#[derive(Debug)]
pub struct Operation {
    /// Base path and route path joined, without a trailing `/` (`/` for the root).
    pub path: String,
    pub exact: bool,
    /// Upper-case methods (empty: all).
    pub methods: Vec<String>,
    /// Lower-case header names and the exact values they must have.
    pub headers: Vec<(String, String)>,
    pub required_scopes: Vec<String>,
}

/// What the operations of an API say of a request.
#[derive(Debug)]
pub enum OperationMatch<'a> {
    /// The API declares no operations: every request under the base path.
    Any,
    Matched(&'a Operation),
    /// Some operation has the path but none the method: the methods it allows.
    MethodNotAllowed(Vec<String>),
    NoMatch,
}

impl Route {
    /// The most specific operation for a request (the first of the sorted list that matches).
    pub fn operation(
        &self,
        method: &str,
        path: &str,
        headers: &super::head::Fields,
    ) -> OperationMatch<'_> {
        if self.operations.is_empty() {
            return OperationMatch::Any;
        }
        let mut allowed: Vec<String> = Vec::new();
        for op in &self.operations {
            let path_ok = if op.exact {
                path == op.path || (op.path == "/" && path.is_empty())
            } else {
                path_matches(&op.path, path)
            };
            let headers_ok = op
                .headers
                .iter()
                .all(|(n, v)| headers.get_all(n).any(|h| h == v.as_bytes()));
            if !(path_ok && headers_ok) {
                continue;
            }
            if op.methods.is_empty() || op.methods.iter().any(|m| m == method) {
                return OperationMatch::Matched(op);
            }
            for m in &op.methods {
                if !allowed.contains(m) {
                    allowed.push(m.clone());
                }
            }
        }
        if allowed.is_empty() {
            OperationMatch::NoMatch
        } else {
            OperationMatch::MethodNotAllowed(allowed)
        }
    }
}

impl OperationMatch<'_> {
    /// Header conditions of the matched operation (0 when none matched).
    #[cfg(test)]
    pub fn matched_headers(&self) -> usize {
        match self {
            OperationMatch::Matched(op) => op.headers.len(),
            _ => 0,
        }
    }
}

/// An API's operations, most specific first: exact before prefix, longer path first, with
/// methods before without, more header conditions first, then declaration order.
fn operations(base_path: &str, routes: &[crate::model::ApiRoute]) -> Vec<Operation> {
    let mut ops: Vec<Operation> = routes
        .iter()
        .map(|r| {
            let joined = format!("{}{}", base_path.trim_end_matches('/'), r.path);
            let path = match joined.trim_end_matches('/') {
                "" => "/".to_string(),
                p => p.to_string(),
            };
            Operation {
                path,
                exact: r.path_match == crate::model::PathMatch::Exact,
                methods: r.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
                headers: r
                    .headers
                    .iter()
                    .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
                    .collect(),
                required_scopes: r.required_scopes.clone(),
            }
        })
        .collect();
    ops.sort_by(|a, b| {
        b.exact
            .cmp(&a.exact)
            .then(b.path.len().cmp(&a.path.len()))
            .then((!b.methods.is_empty()).cmp(&!a.methods.is_empty()))
            .then(b.headers.len().cmp(&a.headers.len()))
    });
    ops
}

/// A public key of a JWT issuer.
pub struct JwtKey {
    pub kid: Option<String>,
    pub key: jsonwebtoken::DecodingKey,
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKey").field("kid", &self.kid).finish()
    }
}

/// The keys of a static JWKS document (keys that do not decode are skipped; the model refuses
/// such documents anyway).
pub fn jwks_keys(doc: &str) -> Vec<JwtKey> {
    let Ok(set) = serde_json::from_str::<jsonwebtoken::jwk::JwkSet>(doc) else {
        return Vec::new();
    };
    set.keys
        .iter()
        .filter(|k| {
            !matches!(
                k.algorithm,
                jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)
            )
        })
        .filter_map(|k| {
            Some(JwtKey {
                kid: k.common.key_id.clone(),
                key: jsonwebtoken::DecodingKey::from_jwk(k).ok()?,
            })
        })
        .collect()
}

impl Route {
    /// The next position of the round-robin cursor (always 0 for a single target: the cursor,
    /// shared by every worker, is not touched, an atomic addition per request saved).
    pub fn next_slot(&self) -> usize {
        if self.targets.len() <= 1 {
            return 0;
        }
        self.cursor.fetch_add(1, Ordering::Relaxed)
    }

    /// Target indexes in weighted round-robin order (each appears `weight` times).
    pub fn schedule(&self) -> &[usize] {
        &self.schedule
    }
}

/// An API key as the gateway checks it.
#[derive(Debug, Clone)]
pub struct KeyEntry {
    pub tenant: String,
    /// (shared with each request the key identifies)
    pub consumer: Arc<str>,
    /// Expiry, in Unix seconds (parsed once per table; unparsable: already expired).
    pub expires_unix: i64,
    pub revoked: bool,
}

/// What the table reads of a stored API key (`o/key/…`: `{"meta": …, "kind": "key", "spec":
/// {…}}`); the other fields are skipped.
#[derive(serde::Deserialize)]
struct StoredKey {
    spec: StoredKeyFields,
}

#[derive(serde::Deserialize)]
struct StoredKeyFields {
    consumer: String,
    #[serde(default)]
    key_hash: String,
    expires_at: String,
    #[serde(default)]
    revoked: bool,
}

/// Routes of one host, most specific (longest base path) first, and, for a host with many,
/// an index by base path.
#[derive(Debug, Default)]
struct HostRoutes {
    list: Vec<Arc<Route>>,
    index: Option<BaseIndex>,
}

/// A host's routes by base path (the first of `list` for each), for a lookup in a few hash
/// probes instead of a scan: one per segment of the request path, up to the deepest base path.
#[derive(Debug)]
struct BaseIndex {
    by_base: FxMap<Box<str>, usize>,
    /// Segments of the deepest base path.
    depth: usize,
    /// Length of the longest base path: no longer prefix of a path is probed.
    longest: usize,
}

/// Hosts with more routes than this are indexed (a scan of a few is as fast as the probes).
const INDEX_FROM: usize = 8;
/// Base paths nested deeper than this leave their host unindexed (scanned).
const MAX_INDEXED_DEPTH: usize = 32;

impl std::ops::Deref for HostRoutes {
    type Target = [Arc<Route>];

    fn deref(&self) -> &[Arc<Route>] {
        &self.list
    }
}

impl HostRoutes {
    /// Sorts the routes, most specific first (ties by API name, for determinism), and indexes
    /// a host with many.
    fn finish(&mut self) {
        self.list.sort_by(|a, b| {
            b.base_path
                .len()
                .cmp(&a.base_path.len())
                .then_with(|| a.api.cmp(&b.api))
        });
        let depth = self
            .list
            .iter()
            .map(|r| r.base_path.bytes().filter(|b| *b == b'/').count())
            .max()
            .unwrap_or(0);
        self.index = (self.list.len() > INDEX_FROM && depth <= MAX_INDEXED_DEPTH).then(|| {
            let mut by_base = FxMap::with_capacity_and_hasher(self.list.len(), FxBuildHasher);
            for (i, r) in self.list.iter().enumerate() {
                by_base.entry(r.base_path.as_str().into()).or_insert(i);
            }
            let longest = self.list.first().map_or(0, |r| r.base_path.len());
            BaseIndex {
                by_base,
                depth,
                longest,
            }
        });
    }

    /// The most specific route whose base path matches `path` on whole segments: the first of
    /// the sorted list that matches, found by the index when there is one.
    fn first_match(&self, path: &str) -> Option<&Arc<Route>> {
        let Some(ix) = &self.index else {
            return self.list.iter().find(|r| path_matches(&r.base_path, path));
        };
        // where the path's first `depth` segments end: the candidate base paths, each matching
        // on whole segments (the path goes on with '/', or ends there)
        let bytes = path.as_bytes();
        let mut ends = [0usize; MAX_INDEXED_DEPTH];
        let mut n = 0;
        let mut from = 1;
        while n < ix.depth && from <= bytes.len() {
            let end = match bytes[from..].iter().position(|b| *b == b'/') {
                Some(p) => from + p,
                None => bytes.len(),
            };
            if end > ix.longest {
                break; // longer than any base path: not probed (hashed) at all
            }
            ends[n] = end;
            from = end + 1;
            n += 1;
        }
        // the longest first; "/" matches every path
        ends[..n]
            .iter()
            .rev()
            .find_map(|end| ix.by_base.get(&path[..*end]))
            .or_else(|| ix.by_base.get("/"))
            .map(|i| &self.list[*i])
    }
}

/// The compiled table, swapped as a whole after every committed change.
#[derive(Debug, Default)]
pub struct RouteTable {
    exact: FxMap<String, HostRoutes>,
    /// Wildcard hosts (`*.bank.example`) by their suffix (`bank.example`).
    wildcard: FxMap<String, HostRoutes>,
    /// Every route once (a route is listed under each of its hosts above).
    all: Vec<Arc<Route>>,
    /// API keys by the SHA-256 digest of the key ([`crate::pki::secret_digest`]).
    pub keys: FxMap<[u8; 32], KeyEntry>,
    /// Consumers by tenant and client-certificate identity (see
    /// [`crate::model::normalize_cert_identity`]).
    pub cert_consumers: HashMap<String, HashMap<String, String>>,
    pub routes: usize,
}

fn path_matches(base: &str, path: &str) -> bool {
    base == "/"
        || path == base
        || (path.starts_with(base) && path.as_bytes().get(base.len()) == Some(&b'/'))
}

fn first_match<'a>(routes: Option<&'a HostRoutes>, path: &str) -> Option<&'a Arc<Route>> {
    routes?.first_match(path)
}

impl RouteTable {
    /// The route for a request. The most specific match wins: an exact host before a wildcard
    /// host, a longer wildcard suffix before a shorter one, then the longest base path (matched
    /// on whole path segments).
    pub fn lookup(&self, host: &str, path: &str) -> Option<&Arc<Route>> {
        let host = host.trim_end_matches('.');
        if let Some(r) = first_match(self.exact.get(host), path) {
            return Some(r);
        }
        let mut rest = host;
        while let Some((_, suffix)) = rest.split_once('.') {
            if let Some(r) = first_match(self.wildcard.get(suffix), path) {
                return Some(r);
            }
            rest = suffix;
        }
        None
    }

    /// The hosts each tenant's served APIs claim (wildcards as `*.suffix`), lower case.
    pub fn claimed_hosts(&self) -> HashMap<String, Vec<String>> {
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        let exact = self.exact.iter().map(|(h, r)| (h.clone(), r));
        let wild = self.wildcard.iter().map(|(s, r)| (format!("*.{s}"), r));
        for (host, routes) in exact.chain(wild) {
            for r in routes.iter() {
                let hosts = out.entry(r.tenant.clone()).or_default();
                if !hosts.contains(&host) {
                    hosts.push(host.clone());
                }
            }
        }
        out
    }

    /// Every route of the table, once each.
    pub fn all(&self) -> &[Arc<Route>] {
        &self.all
    }

    /// Whether a connection for this SNI host may reach an API with a `mutual-tls` policy (then
    /// the handshake asks for a client certificate).
    pub fn requires_client_cert(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let has = |routes: Option<&HostRoutes>| {
            routes.is_some_and(|rs| {
                rs.iter().any(|r| {
                    r.policies
                        .iter()
                        .any(|p| matches!(p, Policy::MutualTls { .. }))
                })
            })
        };
        if has(self.exact.get(&host)) {
            return true;
        }
        let mut rest = host.as_str();
        while let Some((_, suffix)) = rest.split_once('.') {
            if has(self.wildcard.get(suffix)) {
                return true;
            }
            rest = suffix;
        }
        false
    }

    /// Adds a route under each of its hosts.
    fn insert(&mut self, route: Route, hosts: &[String]) {
        let route = Arc::new(route);
        self.routes += 1;
        self.all.push(route.clone());
        for host in hosts {
            let host = host.to_ascii_lowercase();
            match host.strip_prefix("*.") {
                Some(suffix) => self.wildcard.entry(suffix.to_string()).or_default(),
                None => self.exact.entry(host).or_default(),
            }
            .list
            .push(route.clone());
        }
    }

    /// Orders each host's routes, most specific first, and indexes the hosts with many.
    fn finish(&mut self) {
        for routes in self.exact.values_mut().chain(self.wildcard.values_mut()) {
            routes.finish();
        }
    }

    /// A table of the given APIs of one tenant, without subscriptions or keys (route matching
    /// only: benchmarks, fuzzing and tests).
    pub fn from_apis(tenant: &str, apis: &[ApiSpec]) -> RouteTable {
        let mut t = RouteTable::default();
        for a in apis {
            t.insert(compile(tenant, a, FxMap::default()), &a.hosts);
        }
        t.finish();
        t
    }

    /// Compiles the table from the applied state: published and deprecated APIs of every
    /// tenant, their subscriptions with plans, and every API key.
    pub fn build(kv: &dyn KvRead) -> Result<RouteTable, StoreError> {
        let mut table = RouteTable::default();
        for tenant in state::list_objects(kv, Kind::Tenant, None)? {
            let t = tenant.spec.name();
            let plans: HashMap<String, PlanSpec> = state::list_objects(kv, Kind::Plan, Some(&t))?
                .into_iter()
                .filter_map(|o| match o.spec {
                    Spec::Plan(p) => Some((p.name.clone(), p)),
                    _ => None,
                })
                .collect();
            let mut subs: HashMap<String, FxMap<String, (SubscriptionStatus, Option<PlanSpec>)>> =
                HashMap::new();
            for o in state::list_objects(kv, Kind::Subscription, Some(&t))? {
                if let Spec::Subscription(s) = o.spec {
                    let plan = plans.get(&s.plan).cloned();
                    subs.entry(s.api.clone())
                        .or_default()
                        .insert(s.consumer.clone(), (s.status, plan));
                }
            }
            for o in state::list_objects(kv, Kind::Api, Some(&t))? {
                if let Spec::Api(api) = &o.spec {
                    if matches!(api.lifecycle, Lifecycle::Published | Lifecycle::Deprecated) {
                        let subs = subs.remove(&api.name).unwrap_or_default();
                        table.insert(compile(&t, api, subs), &api.hosts);
                    }
                }
            }
            // client-certificate identities from their claim index (one entry per identity,
            // normalised, held by one consumer): the table costs the identities, not the
            // tenant's consumers
            for (identity, holder) in state::client_cert_claims(kv, &t)? {
                table
                    .cert_consumers
                    .entry(t.clone())
                    .or_default()
                    .insert(identity, holder);
            }
            // Keys are the most numerous objects: only the fields the table needs are read
            // (the stored object's `meta` and the key's other fields are skipped unparsed).
            for (_, v) in kv.scan_prefix(&state::object_prefix(Kind::Key, Some(&t)))? {
                let stored: StoredKey = serde_json::from_slice(&v).map_err(StoreError::msg)?;
                let k = stored.spec;
                // (a hash that is not one `secret_hash` writes matches no key)
                let Some(digest) = crate::pki::secret_hash_digest(&k.key_hash) else {
                    continue;
                };
                table.keys.insert(
                    digest,
                    KeyEntry {
                        tenant: t.clone(),
                        consumer: k.consumer.into(),
                        expires_unix: time::OffsetDateTime::parse(
                            &k.expires_at,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .map_or(i64::MIN, |t| t.unix_timestamp()),
                        revoked: k.revoked,
                    },
                );
            }
        }
        table.finish();
        Ok(table)
    }
}

fn compile(
    tenant: &str,
    api: &ApiSpec,
    subscriptions: FxMap<String, (SubscriptionStatus, Option<PlanSpec>)>,
) -> Route {
    let targets: Vec<Target> = api
        .upstream
        .targets
        .iter()
        .map(|t| {
            let (scheme, rest) = t.url.split_once("://").unwrap_or(("http", &t.url));
            let (authority, path) = match rest.find('/') {
                Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
                None => (rest, ""),
            };
            Target {
                scheme: scheme.parse().ok(),
                authority: authority.parse().ok(),
                origin: format!("{scheme}://{authority}"),
                path: path.to_string(),
                weight: t.weight.max(1),
                state: Default::default(),
            }
        })
        .collect();
    let schedule = targets
        .iter()
        .enumerate()
        .flat_map(|(i, t)| std::iter::repeat_n(i, t.weight as usize))
        .collect();
    let jwt_keys = api
        .policies
        .iter()
        .enumerate()
        .filter_map(|(i, p)| match p {
            Policy::Jwt {
                jwks: Some(doc), ..
            } => Some((i, jwks_keys(doc))),
            _ => None,
        })
        .collect();
    let mtls = api
        .policies
        .iter()
        .enumerate()
        .filter_map(|(i, p)| match p {
            Policy::MutualTls { ca_bundle, .. } => Some((i, mtls_verifier(ca_bundle)?)),
            _ => None,
        })
        .collect();
    let jwks_sources = api
        .policies
        .iter()
        .enumerate()
        .filter_map(|(i, p)| match p {
            Policy::Jwt {
                jwks_url: Some(url),
                jwks_ca_bundle: Some(ca),
                ..
            } => Some((i, super::jwks::source_key(url, ca))),
            _ => None,
        })
        .collect();
    Route {
        jwt_keys,
        jwks_sources,
        mtls,
        operations: operations(&api.base_path, &api.routes),
        series: Default::default(),
        tenant: tenant.to_string(),
        api: api.name.clone(),
        base_path: match api.base_path.trim_end_matches('/') {
            "" => "/".to_string(),
            bp => bp.to_string(),
        },
        policies: api.policies.clone(),
        targets,
        upstream: api.upstream.clone(),
        tls_client: Default::default(),
        h2c_client: Default::default(),
        schedule,
        cursor: AtomicUsize::new(0),
        subscriptions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Upstream, UpstreamTarget};

    fn api(name: &str, hosts: &[&str], base_path: &str, targets: &[(&str, u32)]) -> ApiSpec {
        ApiSpec {
            name: name.into(),
            version: "v1".into(),
            display_name: None,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            base_path: base_path.into(),
            upstream: Upstream {
                targets: targets
                    .iter()
                    .map(|(u, w)| UpstreamTarget {
                        url: u.to_string(),
                        weight: *w,
                    })
                    .collect(),
                ..Default::default()
            },
            policies: vec![],
            routes: vec![],
            lifecycle: Lifecycle::Published,
        }
    }

    fn table(apis: &[ApiSpec]) -> RouteTable {
        RouteTable::from_apis("t", apis)
    }

    fn check(t: &RouteTable, host: &str, path: &str, expect: Option<&str>) {
        assert_eq!(
            t.lookup(host, path).map(|r| r.api.as_str()),
            expect,
            "{host}{path}"
        );
    }

    /// The index of a host with many routes finds what a scan of its sorted list finds, for
    /// base paths and request paths built from a few segments (so that many nest and tie).
    #[test]
    fn the_base_path_index_agrees_with_the_scan() {
        let segs = ["a", "b", "ab", "v1", "x-y"];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let path = |depth: usize, next: &mut dyn FnMut(usize) -> usize| {
            let mut p = String::new();
            for _ in 0..depth {
                p.push('/');
                p.push_str(segs[next(segs.len())]);
            }
            if p.is_empty() {
                p.push('/');
            }
            p
        };
        for round in 0..20 {
            let apis: Vec<ApiSpec> = (0..40)
                .map(|i| {
                    let d = next(4);
                    api(
                        &format!("api{i}"),
                        &["h.example"],
                        &path(d, &mut next),
                        &[("http://u:1", 1)],
                    )
                })
                .collect();
            let t = table(&apis);
            let host = t.exact.get("h.example").expect("host");
            assert!(host.index.is_some(), "round {round}: indexed");
            for _ in 0..500 {
                let d = next(6);
                let mut p = path(d, &mut next);
                match next(4) {
                    0 => p.push('/'),
                    1 => p.push_str("?q=/a"),
                    _ => {}
                }
                let scanned = host.list.iter().find(|r| path_matches(&r.base_path, &p));
                assert_eq!(
                    host.first_match(&p).map(|r| r.api.as_str()),
                    scanned.map(|r| r.api.as_str()),
                    "round {round}: {p}"
                );
            }
            for p in ["", "/", "abc", "//", "/a//b"] {
                let scanned = host.list.iter().find(|r| path_matches(&r.base_path, p));
                assert_eq!(
                    host.first_match(p).map(|r| r.api.as_str()),
                    scanned.map(|r| r.api.as_str()),
                    "round {round}: {p:?}"
                );
            }
        }
    }

    #[test]
    fn most_specific_route_wins() {
        let up = [("http://127.0.0.1:1", 1)];
        let t = table(&[
            api("root", &["api.bank.example"], "/", &up),
            api("pay", &["api.bank.example"], "/payments", &up),
            api("pay2", &["api.bank.example"], "/payments/v2", &up),
            api("wild", &["*.bank.example"], "/", &up),
            api("deep-wild", &["*.eu.bank.example"], "/", &up),
        ]);
        check(&t, "api.bank.example", "/payments", Some("pay"));
        check(&t, "api.bank.example", "/payments/x", Some("pay"));
        check(&t, "api.bank.example", "/payments/v2/x", Some("pay2"));
        check(&t, "api.bank.example", "/paymentsx", Some("root"));
        check(&t, "other.bank.example", "/payments", Some("wild"));
        check(&t, "x.eu.bank.example", "/", Some("deep-wild"));
        check(&t, "bank.example", "/", None);
        check(&t, "api.bank.example.", "/payments", Some("pay"));
        check(&t, "evil.example", "/", None);
    }

    #[test]
    fn the_most_specific_operation_wins() {
        use crate::model::{ApiRoute, HeaderValue, PathMatch};
        let route =
            |path: &str, exact: bool, methods: &[&str], headers: &[(&str, &str)]| ApiRoute {
                path: path.into(),
                path_match: if exact {
                    PathMatch::Exact
                } else {
                    PathMatch::Prefix
                },
                methods: methods.iter().map(|m| m.to_string()).collect(),
                headers: headers
                    .iter()
                    .map(|(n, v)| HeaderValue {
                        name: n.to_string(),
                        value: v.to_string(),
                    })
                    .collect(),
                required_scopes: vec![path.to_string()],
            };
        let mut a = api("a", &["h"], "/pay", &[("http://a:1", 1)]);
        a.routes = vec![
            route("/", false, &[], &[]),
            route("/orders", false, &["GET"], &[]),
            route("/orders", false, &["GET"], &[("x-beta", "1")]),
            route("/orders/export", true, &["POST"], &[]),
        ];
        let r = compile("t", &a, FxMap::default());
        let mut h = crate::gateway::head::Fields::default();
        let scope = |m: OperationMatch<'_>| match m {
            OperationMatch::Matched(op) => op.required_scopes[0].clone(),
            other => format!("{other:?}"),
        };
        assert_eq!(scope(r.operation("GET", "/pay/orders/1", &h)), "/orders");
        assert_eq!(
            scope(r.operation("POST", "/pay/orders/1", &h)),
            "/",
            "prefix / catches it"
        );
        assert_eq!(
            scope(r.operation("POST", "/pay/orders/export", &h)),
            "/orders/export"
        );
        assert_eq!(
            scope(r.operation("GET", "/pay/orders/export/x", &h)),
            "/orders"
        );
        h.insert("X-Beta", b"1");
        assert_eq!(r.operation("GET", "/pay/orders", &h).matched_headers(), 1);
        let mut b = api("b", &["h"], "/", &[("http://a:1", 1)]);
        b.routes = vec![route("/items", true, &["GET", "HEAD"], &[])];
        let r = compile("t", &b, FxMap::default());
        assert!(matches!(
            r.operation("GET", "/items", &h),
            OperationMatch::Matched(_)
        ));
        assert!(matches!(
            r.operation("GET", "/items/1", &h),
            OperationMatch::NoMatch
        ));
        match r.operation("DELETE", "/items", &h) {
            OperationMatch::MethodNotAllowed(m) => assert_eq!(m, ["GET", "HEAD"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn weighted_round_robin_follows_weights() {
        let r = compile(
            "t",
            &api("a", &["h"], "/", &[("http://a:1/x/", 3), ("http://b:2", 1)]),
            FxMap::default(),
        );
        assert_eq!(r.targets[0].origin, "http://a:1");
        assert_eq!(r.targets[0].path, "/x");
        let picks: Vec<&str> = (0..8)
            .map(|_| {
                let i = super::super::upstream::pick(&r, &[], 0)
                    .expect("a target")
                    .0;
                r.targets[i].origin.as_str()
            })
            .collect();
        assert_eq!(picks.iter().filter(|o| **o == "http://a:1").count(), 6);
        assert_eq!(picks.iter().filter(|o| **o == "http://b:2").count(), 2);
    }

    #[test]
    fn installing_a_table_carries_series_over_and_drops_those_of_gone_apis() {
        let m = crate::telemetry::Metrics::new();
        fn t1(u: &str) -> Vec<(&str, u32)> {
            vec![(u, 1)]
        }
        let first = table(&[
            api("x", &["x.example"], "/", &t1("http://10.0.0.1:80")),
            api("y", &["y.example"], "/", &t1("http://10.0.0.2:80")),
            api("z", &["z.example"], "/", &t1("http://10.0.0.3:80")),
        ]);
        m.carry_series(&RouteTable::default(), &first);
        // the same APIs (side by side), then y gone, w new and z's target changed
        let same = table(&[
            api("x", &["x.example"], "/", &t1("http://10.0.0.1:80")),
            api("y", &["y.example"], "/", &t1("http://10.0.0.2:80")),
            api("z", &["z.example"], "/", &t1("http://10.0.0.3:80")),
        ]);
        m.carry_series(&first, &same);
        m.forget_gone(&first, &same);
        let changed = table(&[
            api("w", &["w.example"], "/", &t1("http://10.0.0.4:80")),
            api("x", &["x.example"], "/", &t1("http://10.0.0.1:80")),
            api("z", &["z.example"], "/", &t1("http://10.0.0.9:80")),
        ]);
        m.carry_series(&same, &changed);
        let series = |t: &RouteTable, api: &str| {
            t.all()
                .iter()
                .find(|r| r.api == api)
                .and_then(|r| r.series.get().cloned())
                .unwrap()
        };
        // carried: a count through the first table's handle shows through the last one's
        series(&first, "x").requests[0].inc();
        series(&first, "z").requests[0].inc();
        assert_eq!(series(&changed, "x").requests[0].get(), 1);
        assert_eq!(series(&changed, "z").requests[0].get(), 1);
        assert_eq!(series(&changed, "w").requests[0].get(), 0);
        for r in same.all() {
            m.gateway_target_up
                .get_or_create(&crate::telemetry::TargetLabels {
                    tenant: r.tenant.clone(),
                    api: r.api.clone(),
                    target: r.targets[0].label(),
                })
                .set(1);
        }
        m.forget_gone(&same, &changed);
        let text = m.encode();
        assert!(!text.contains("api=\"y\""), "{text}");
        assert!(!text.contains("10.0.0.3"), "{text}");
        assert!(
            text.contains("api=\"x\",target=\"http://10.0.0.1:80\"} 1"),
            "{text}"
        );
        assert!(text.contains("api=\"w\",class=\"2xx\"} 0"), "{text}");
        assert!(text.contains("api=\"x\",class=\"2xx\"} 1"), "{text}");
    }
}
