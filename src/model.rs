//! Domain types of the control plane, their validation, and the declarative tenant document.
//!
//! Architecture invariant: this module does no IO and reads no clock. Everything here is plain
//! data plus checks that name the offending field.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A validation failure that names the field (`policies[1].header`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

pub type Checked = Result<(), FieldError>;

/// The one time format of the control plane: RFC 3339, UTC, milliseconds, `Z`. Fixed width,
/// so times compare correctly as strings.
pub fn format_time(t: time::OffsetDateTime) -> String {
    // In UTC, within years 0 to 9999 (the format's four digits), formatting cannot fail; a time
    // outside that range (only reachable through a bug, as `normalize_time` refuses them) is
    // clamped rather than rendered as an empty string that would compare before every time.
    let utc = t
        .checked_to_offset(time::UtcOffset::UTC)
        .unwrap_or(if t.year() < 0 {
            time::OffsetDateTime::UNIX_EPOCH
        } else {
            MAX_TIME
        });
    let utc = if utc.year() > 9999 { MAX_TIME } else { utc };
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    utc.format(&fmt)
        .unwrap_or_else(|_| "9999-12-31T23:59:59.999Z".to_string())
}

/// The latest time the control plane represents.
const MAX_TIME: time::OffsetDateTime = time::macros::datetime!(9999-12-31 23:59:59.999 UTC);

/// Parses any RFC 3339 time and normalises it to [`format_time`]'s form. Times that do not fall
/// in years 1970 to 9999 once in UTC are refused.
pub fn normalize_time(field: &str, s: &str) -> Result<String, FieldError> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|_| {
            FieldError::new(
                field,
                format!("{s:?} is not an RFC 3339 time like 2027-01-31T00:00:00Z"),
            )
        })?;
    match t.checked_to_offset(time::UtcOffset::UTC) {
        Some(utc) if (1970..=9999).contains(&utc.year()) => Ok(format_time(utc)),
        _ => Err(FieldError::new(
            field,
            format!("{s:?} is outside the years 1970 to 9999 (UTC)"),
        )),
    }
}

/// Names (tenants, APIs, consumers, plans, users) are DNS-label-like so they are safe in URLs,
/// file names and metric labels: 1 to 63 characters of `a-z`, `0-9` and `-`, starting with a
/// letter or digit and not ending with `-`.
pub fn check_name(field: &str, value: &str) -> Checked {
    let ok_chars = value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if value.is_empty() || value.len() > 63 {
        return Err(FieldError::new(field, "must be 1 to 63 characters long"));
    }
    if !ok_chars || value.starts_with('-') || value.ends_with('-') {
        return Err(FieldError::new(
            field,
            format!(
                "{value:?} is not a valid name: use lowercase letters, digits and '-', \
                 not starting or ending with '-'"
            ),
        ));
    }
    Ok(())
}

fn check_text(field: &str, value: &str, max: usize) -> Checked {
    if value.chars().count() > max {
        return Err(FieldError::new(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if value.chars().any(|c| c.is_control()) {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

fn check_opt_text(field: &str, value: &Option<String>, max: usize) -> Checked {
    match value {
        Some(v) => check_text(field, v, max),
        None => Ok(()),
    }
}

/// The four RBAC levels.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Everything, on every tenant, and cluster operations.
    PlatformAdmin,
    /// One tenant: its users, APIs, consumers, plans, subscriptions, audit.
    TenantAdmin,
    /// One tenant: APIs, consumers, keys, subscriptions; reads plans; no users.
    ApiPublisher,
    /// One tenant, read-only (no users), including its audit records.
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::PlatformAdmin => "platform-admin",
            Role::TenantAdmin => "tenant-admin",
            Role::ApiPublisher => "api-publisher",
            Role::Viewer => "viewer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every kind of stored object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Tenant,
    Api,
    Consumer,
    Key,
    Plan,
    Subscription,
    User,
    Token,
    Certificate,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Tenant,
        Kind::Api,
        Kind::Consumer,
        Kind::Key,
        Kind::Plan,
        Kind::Subscription,
        Kind::User,
        Kind::Token,
        Kind::Certificate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Tenant => "tenant",
            Kind::Api => "api",
            Kind::Consumer => "consumer",
            Kind::Key => "key",
            Kind::Plan => "plan",
            Kind::Subscription => "subscription",
            Kind::User => "user",
            Kind::Token => "token",
            Kind::Certificate => "certificate",
        }
    }

    /// Spec fields that list endpoints accept as exact-match filters.
    pub fn filterable(self) -> &'static [&'static str] {
        match self {
            Kind::Tenant => &[],
            Kind::Api => &["lifecycle", "version"],
            Kind::Consumer => &[],
            Kind::Key => &["consumer"],
            Kind::Plan => &[],
            Kind::Subscription => &["consumer", "api", "plan", "status"],
            Kind::User => &["role"],
            Kind::Token => &["user"],
            Kind::Certificate => &[],
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Metadata the server maintains on every object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectMeta {
    /// Tenant owning the object; `None` for tenants themselves and platform users.
    pub tenant: Option<String>,
    /// Incremented on every change; the ETag is derived from it.
    pub version: u64,
    pub created_at: String,
    pub updated_at: String,
    /// Raft log index of the last change.
    pub log_index: u64,
}

// ---------------------------------------------------------------------------------------------
// Specs: the user-writable part of each object. `deny_unknown_fields` everywhere, so a typo is an
// error rather than a silently ignored setting.

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl TenantSpec {
    pub fn check(&self) -> Checked {
        check_name("name", &self.name)?;
        check_opt_text("display_name", &self.display_name, 200)?;
        check_opt_text("description", &self.description, 2000)
    }
}

/// API lifecycle: draft → published → deprecated → retired. A draft may also be retired directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    #[default]
    Draft,
    Published,
    Deprecated,
    Retired,
}

impl Lifecycle {
    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Draft => "draft",
            Lifecycle::Published => "published",
            Lifecycle::Deprecated => "deprecated",
            Lifecycle::Retired => "retired",
        }
    }

    /// Whether a change from `self` to `next` is allowed (staying put is always allowed).
    pub fn can_move_to(self, next: Lifecycle) -> bool {
        use Lifecycle::*;
        self == next
            || matches!(
                (self, next),
                (Draft, Published)
                    | (Draft, Retired)
                    | (Published, Deprecated)
                    | (Deprecated, Published)
                    | (Deprecated, Retired)
            )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTarget {
    /// `http://host:port` or `https://host:port`, optionally with a path prefix.
    pub url: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub targets: Vec<UpstreamTarget>,
    /// How a target is chosen among the available ones.
    #[serde(default)]
    pub balance: Balance,
    /// Further attempts on another target, made only when safe: the request has no body and
    /// either its method is idempotent or it never reached the upstream (connect failure).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Passive ejection (a per-target circuit breaker): after `consecutive_failures` failed
    /// attempts (connect failure, reset, timeout, 502/503/504) the target is left out for
    /// `ejection_seconds`, then one trial request decides whether it comes back.
    #[serde(default)]
    pub ejection: Ejection,
    /// Active health checks; a target failing them is left out until it passes again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// TLS to `https://` targets: required when any target is `https://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
    /// The HTTP version spoken to the targets.
    #[serde(default, skip_serializing_if = "UpstreamProtocol::is_auto")]
    pub protocol: UpstreamProtocol,
    /// This API's upstream timeouts, each in place of the node's default.
    #[serde(default, skip_serializing_if = "ApiTimeouts::is_empty")]
    pub timeouts: ApiTimeouts,
}

/// Timeouts of an API's upstream exchanges; an absent one is the node's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiTimeouts {
    /// Time to open a connection to a target, in milliseconds (1 to 60000; default
    /// `gateway.upstream_connect_timeout_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_ms: Option<u32>,
    /// Time from the first attempt until the answer's head, retries included, and the longest
    /// wait for each next part of the answer's body, in seconds (1 to 3600; default
    /// `gateway.upstream_response_timeout_seconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_seconds: Option<u32>,
    /// Time from the first attempt until the answer's last byte, in seconds (1 to 86400;
    /// default: none). Past it an answer not begun is 504 `upstream-timeout`, and one being
    /// sent is cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_seconds: Option<u32>,
}

impl ApiTimeouts {
    pub fn is_empty(&self) -> bool {
        *self == ApiTimeouts::default()
    }
}

/// The HTTP version the gateway speaks to an API's targets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 to `http://` targets; HTTP/2 or HTTP/1.1 by ALPN to `https://` targets.
    #[default]
    Auto,
    /// HTTP/2 only, for gRPC and other HTTP/2 services: with prior knowledge (h2c) to
    /// `http://` targets, by ALPN to `https://` targets (one that does not offer `h2` fails).
    Http2,
}

impl UpstreamProtocol {
    pub fn is_auto(&self) -> bool {
        *self == UpstreamProtocol::Auto
    }
}

/// How the gateway verifies and authenticates to HTTPS targets (HTTP/2 or HTTP/1.1 by ALPN).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// PEM CA certificates that issue the targets' certificates (no system roots are used).
    pub ca_bundle: String,
    /// Name of a certificate resource of the tenant presented as the gateway's client
    /// certificate (mutual TLS to the upstream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<String>,
    /// Name verified in the targets' certificates (and sent as SNI) instead of the URL's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

fn default_jwks_refresh() -> u32 {
    300
}

fn default_retries() -> u32 {
    1
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            targets: Vec::new(),
            balance: Balance::default(),
            retries: default_retries(),
            ejection: Ejection::default(),
            health_check: None,
            tls: None,
            protocol: UpstreamProtocol::Auto,
            timeouts: ApiTimeouts::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RateScope {
    #[default]
    Consumer,
    Api,
    Tenant,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// Weighted round-robin.
    #[default]
    RoundRobin,
    /// The target with the fewest requests in flight (relative to its weight).
    LeastRequests,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Ejection {
    pub consecutive_failures: u32,
    pub ejection_seconds: u32,
}

impl Default for Ejection {
    fn default() -> Self {
        Ejection {
            consecutive_failures: 5,
            ejection_seconds: 30,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Path requested with GET on each target; a 2xx or 3xx answer is healthy.
    pub path: String,
    #[serde(default = "default_hc_interval")]
    pub interval_seconds: u32,
    #[serde(default = "default_hc_timeout")]
    pub timeout_ms: u32,
    /// Consecutive passes that bring a target back.
    #[serde(default = "default_hc_threshold")]
    pub healthy_threshold: u32,
    /// Consecutive failures that take a target out.
    #[serde(default = "default_hc_threshold")]
    pub unhealthy_threshold: u32,
}

fn default_hc_interval() -> u32 {
    10
}
fn default_hc_timeout() -> u32 {
    2000
}
fn default_hc_threshold() -> u32 {
    2
}

impl Upstream {
    fn check(&self) -> Checked {
        if self.targets.is_empty() {
            return Err(FieldError::new(
                "upstream.targets",
                "must list at least one target",
            ));
        }
        if self.targets.len() > 64 {
            return Err(FieldError::new(
                "upstream.targets",
                "must list at most 64 targets",
            ));
        }
        for (i, t) in self.targets.iter().enumerate() {
            check_url(
                &format!("upstream.targets[{i}].url"),
                &t.url,
                &["http", "https"],
            )?;
            if t.weight == 0 || t.weight > 1000 {
                return Err(FieldError::new(
                    format!("upstream.targets[{i}].weight"),
                    "must be between 1 and 1000",
                ));
            }
        }
        let https = self.targets.iter().any(|t| t.url.starts_with("https://"));
        match &self.tls {
            None if https => {
                return Err(FieldError::new(
                    "upstream.tls",
                    "is required for https:// targets (ca_bundle: the PEM CAs that issue their certificates)",
                ))
            }
            None => {}
            Some(tls) => {
                crate::pki::root_store(&tls.ca_bundle).map_err(|e| {
                    FieldError::new(
                        "upstream.tls.ca_bundle",
                        format!("must hold PEM CA certificates: {e}"),
                    )
                })?;
                if !tls.ca_bundle.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(FieldError::new(
                        "upstream.tls.ca_bundle",
                        "must hold at least one PEM certificate",
                    ));
                }
                if let Some(c) = &tls.client_certificate {
                    check_name("upstream.tls.client_certificate", c)?;
                }
                if let Some(n) = &tls.server_name {
                    if rustls_pki_types::ServerName::try_from(n.as_str()).is_err() {
                        return Err(FieldError::new(
                            "upstream.tls.server_name",
                            format!("{n:?} is not a DNS name or IP address"),
                        ));
                    }
                }
            }
        }
        if self.retries > 5 {
            return Err(FieldError::new("upstream.retries", "must be at most 5"));
        }
        for (field, value, range) in [
            ("connect_ms", self.timeouts.connect_ms, 1..=60_000),
            ("response_seconds", self.timeouts.response_seconds, 1..=3600),
            ("total_seconds", self.timeouts.total_seconds, 1..=86_400),
        ] {
            if value.is_some_and(|v| !range.contains(&v)) {
                return Err(FieldError::new(
                    format!("upstream.timeouts.{field}"),
                    format!("must be between {} and {}", range.start(), range.end()),
                ));
            }
        }
        if !(1..=1000).contains(&self.ejection.consecutive_failures) {
            return Err(FieldError::new(
                "upstream.ejection.consecutive_failures",
                "must be between 1 and 1000",
            ));
        }
        if !(1..=3600).contains(&self.ejection.ejection_seconds) {
            return Err(FieldError::new(
                "upstream.ejection.ejection_seconds",
                "must be between 1 and 3600",
            ));
        }
        if let Some(hc) = &self.health_check {
            let p = &hc.path;
            if !p.starts_with('/') || p.len() > 512 || p.bytes().any(|b| b <= b' ' || b == 0x7f) {
                return Err(FieldError::new(
                    "upstream.health_check.path",
                    format!("{p:?} must be a path starting with '/' (no spaces)"),
                ));
            }
            if !(1..=3600).contains(&hc.interval_seconds) {
                return Err(FieldError::new(
                    "upstream.health_check.interval_seconds",
                    "must be between 1 and 3600",
                ));
            }
            if !(10..=60_000).contains(&hc.timeout_ms) {
                return Err(FieldError::new(
                    "upstream.health_check.timeout_ms",
                    "must be between 10 and 60000",
                ));
            }
            for (f, v) in [
                ("healthy_threshold", hc.healthy_threshold),
                ("unhealthy_threshold", hc.unhealthy_threshold),
            ] {
                if !(1..=100).contains(&v) {
                    return Err(FieldError::new(
                        format!("upstream.health_check.{f}"),
                        "must be between 1 and 100",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Policies are typed data here; the gateway gives them behaviour. Order matters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Policy {
    /// Require an API key, read from a header or a query parameter.
    ApiKey {
        #[serde(default = "default_key_header")]
        header: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        query_param: Option<String>,
    },
    /// Require a JWT bearer token.
    Jwt {
        issuer: String,
        audience: String,
        /// Where to fetch the issuer's keys (`https://`; refreshed and cached). A static
        /// `jwks`, when also given, is used instead.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        jwks_url: Option<String>,
        /// PEM CA certificates that issue the `jwks_url` server's certificate (required with
        /// `jwks_url`; no system roots are used).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        jwks_ca_bundle: Option<String>,
        /// How often the keys at `jwks_url` are fetched again, in seconds (30 to 86400).
        #[serde(default = "default_jwks_refresh")]
        jwks_refresh_seconds: u32,
        /// The issuer's keys as a JWKS document, for sites that cannot reach the issuer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        jwks: Option<String>,
        /// Allowed algorithms among RS256, PS256, ES256, EdDSA (empty: all four).
        #[serde(default)]
        algorithms: Vec<String>,
        #[serde(default)]
        required_scopes: Vec<String>,
        /// Claim whose value names the consumer (subscription and plan then apply).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        consumer_claim: Option<String>,
        /// Tolerated clock difference for `exp` and `nbf`, in seconds.
        #[serde(default = "default_clock_skew")]
        clock_skew_seconds: u32,
    },
    /// Require a client certificate from the given CA bundle (PEM), mapped to a consumer.
    MutualTls {
        ca_bundle: String,
        #[serde(default)]
        map_by: CertMapping,
    },
    /// Allow or deny client addresses (CIDR, v4 and v6).
    IpFilter {
        #[serde(default)]
        allow: Vec<String>,
        #[serde(default)]
        deny: Vec<String>,
    },
    /// Rate limit (GCRA) on top of the plan's: per consumer (the client address when no
    /// consumer is identified), or shared by the whole API, or by every API of the tenant.
    RateLimit {
        requests: u32,
        per_seconds: u32,
        #[serde(default)]
        per: RateScope,
    },
    Cors {
        allow_origins: Vec<String>,
        #[serde(default)]
        allow_methods: Vec<String>,
        #[serde(default)]
        allow_headers: Vec<String>,
        #[serde(default)]
        max_age_seconds: u32,
    },
    /// Headers of the request sent upstream: `remove` first, then `rename`, then `add`.
    RequestHeaders {
        #[serde(default)]
        add: Vec<HeaderValue>,
        #[serde(default)]
        remove: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        rename: Vec<HeaderRename>,
    },
    /// Headers of the answer sent to the client: `remove` first, then `rename`, then `add`.
    ResponseHeaders {
        #[serde(default)]
        add: Vec<HeaderValue>,
        #[serde(default)]
        remove: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        rename: Vec<HeaderRename>,
    },
    RequestSizeLimit {
        max_bytes: u64,
    },
}

fn default_clock_skew() -> u32 {
    60
}

fn default_key_header() -> String {
    "x-api-key".to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CertMapping {
    #[default]
    Subject,
    Fingerprint,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HeaderValue {
    pub name: String,
    pub value: String,
}

/// A header renamed: the values of `from`, if any, are sent as `to` (in place of any `to`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HeaderRename {
    pub from: String,
    pub to: String,
}

/// Headers a policy may not set (`add`, or the target of a `rename`): the message's framing,
/// its connection and its host are the gateway's to write.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

fn check_settable_header(field: &str, name: &str) -> Checked {
    check_header_name(field, name)?;
    if RESERVED_HEADERS
        .iter()
        .any(|r| r.eq_ignore_ascii_case(name))
    {
        return Err(FieldError::new(
            field,
            format!("{name:?} is set by the gateway itself (framing, connection, host)"),
        ));
    }
    Ok(())
}

fn check_header_name(field: &str, name: &str) -> Checked {
    let valid = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("{name:?} is not a valid HTTP header name"),
        ))
    }
}

/// Checks an IPv4 or IPv6 address or CIDR.
pub fn check_cidr(field: &str, cidr: &str) -> Checked {
    let (addr, len) = match cidr.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (cidr, None),
    };
    let ip: std::net::IpAddr = addr
        .parse()
        .map_err(|_| FieldError::new(field, format!("{cidr:?} is not an IP address or CIDR")))?;
    if let Some(len) = len {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        match len.parse::<u8>() {
            Ok(l) if l <= max => {}
            _ => {
                return Err(FieldError::new(
                    field,
                    format!("{cidr:?} has an invalid prefix length (0 to {max})"),
                ))
            }
        }
    }
    Ok(())
}

fn check_url(field: &str, url: &str, schemes: &[&str]) -> Checked {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(FieldError::new(
            field,
            format!("{url:?} is not an absolute URL"),
        ));
    };
    if !schemes.contains(&scheme) {
        return Err(FieldError::new(
            field,
            format!(
                "scheme {scheme:?} is not allowed (use {})",
                schemes.join(" or ")
            ),
        ));
    }
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(FieldError::new(field, format!("{url:?} has no valid host")));
    }
    if host.contains('@') {
        // credentials would end up in logs and metric labels; upstream auth is a policy matter
        return Err(FieldError::new(
            field,
            "must not carry credentials (user:password@)",
        ));
    }
    if rest.contains(['?', '#']) {
        return Err(FieldError::new(
            field,
            "must not carry a query or a fragment",
        ));
    }
    Ok(())
}

impl Policy {
    fn check(&self, at: &str) -> Checked {
        match self {
            Policy::ApiKey {
                header,
                query_param,
            } => {
                check_header_name(&format!("{at}.header"), header)?;
                if let Some(q) = query_param {
                    if q.is_empty() || q.len() > 64 || !q.bytes().all(|b| b.is_ascii_graphic()) {
                        return Err(FieldError::new(
                            format!("{at}.query_param"),
                            "must be 1 to 64 printable characters",
                        ));
                    }
                }
            }
            Policy::Jwt {
                issuer,
                audience,
                jwks_url,
                jwks,
                jwks_ca_bundle,
                jwks_refresh_seconds,
                algorithms,
                required_scopes,
                consumer_claim,
                clock_skew_seconds,
            } => {
                match (jwks_url, jwks) {
                    (None, None) => {
                        return Err(FieldError::new(
                            format!("{at}.jwks"),
                            "give the issuer's keys: jwks (a JWKS document) or jwks_url",
                        ))
                    }
                    (_, Some(doc)) => {
                        let set: jsonwebtoken::jwk::JwkSet =
                            serde_json::from_str(doc).map_err(|e| {
                                FieldError::new(
                                    format!("{at}.jwks"),
                                    format!("not a JWKS document: {e}"),
                                )
                            })?;
                        if set.keys.is_empty() {
                            return Err(FieldError::new(format!("{at}.jwks"), "holds no key"));
                        }
                        for (i, k) in set.keys.iter().enumerate() {
                            let symmetric = matches!(
                                k.algorithm,
                                jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)
                            );
                            if symmetric || jsonwebtoken::DecodingKey::from_jwk(k).is_err() {
                                return Err(FieldError::new(
                                    format!("{at}.jwks.keys[{i}]"),
                                    "is not a usable public key (symmetric keys are refused)",
                                ));
                            }
                        }
                    }
                    _ => {}
                }
                if *clock_skew_seconds > 600 {
                    return Err(FieldError::new(
                        format!("{at}.clock_skew_seconds"),
                        "must be at most 600",
                    ));
                }
                if let Some(c) = consumer_claim {
                    check_text(&format!("{at}.consumer_claim"), c, 100)?;
                }
                if issuer.is_empty() {
                    return Err(FieldError::new(format!("{at}.issuer"), "must not be empty"));
                }
                if audience.is_empty() {
                    return Err(FieldError::new(
                        format!("{at}.audience"),
                        "must not be empty",
                    ));
                }
                const ALLOWED: [&str; 4] = ["RS256", "PS256", "ES256", "EdDSA"];
                for (i, alg) in algorithms.iter().enumerate() {
                    if !ALLOWED.contains(&alg.as_str()) {
                        return Err(FieldError::new(
                            format!("{at}.algorithms[{i}]"),
                            format!("{alg:?} is not allowed (use one of {})", ALLOWED.join(", ")),
                        ));
                    }
                }
                for (i, s) in required_scopes.iter().enumerate() {
                    check_text(&format!("{at}.required_scopes[{i}]"), s, 200)?;
                }
                if let Some(url) = jwks_url {
                    check_url(&format!("{at}.jwks_url"), url, &["https"])?;
                    let Some(ca) = jwks_ca_bundle else {
                        return Err(FieldError::new(
                            format!("{at}.jwks_ca_bundle"),
                            "is required with jwks_url (the PEM CAs that issue the key server's certificate)",
                        ));
                    };
                    crate::pki::root_store(ca).map_err(|e| {
                        FieldError::new(
                            format!("{at}.jwks_ca_bundle"),
                            format!("must hold PEM CA certificates: {e}"),
                        )
                    })?;
                    if !ca.contains("-----BEGIN CERTIFICATE-----") {
                        return Err(FieldError::new(
                            format!("{at}.jwks_ca_bundle"),
                            "must hold at least one PEM certificate",
                        ));
                    }
                }
                if !(30..=86_400).contains(jwks_refresh_seconds) {
                    return Err(FieldError::new(
                        format!("{at}.jwks_refresh_seconds"),
                        "must be between 30 and 86400",
                    ));
                }
            }
            Policy::MutualTls { ca_bundle, .. } => {
                crate::pki::root_store(ca_bundle).map_err(|e| {
                    FieldError::new(
                        format!("{at}.ca_bundle"),
                        format!("must hold PEM CA certificates: {e}"),
                    )
                })?;
                if !ca_bundle.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(FieldError::new(
                        format!("{at}.ca_bundle"),
                        "must hold at least one PEM certificate",
                    ));
                }
            }
            Policy::IpFilter { allow, deny } => {
                for (i, c) in allow.iter().enumerate() {
                    check_cidr(&format!("{at}.allow[{i}]"), c)?;
                }
                for (i, c) in deny.iter().enumerate() {
                    check_cidr(&format!("{at}.deny[{i}]"), c)?;
                }
            }
            Policy::RateLimit {
                requests,
                per_seconds,
                ..
            } => {
                if *requests == 0 {
                    return Err(FieldError::new(
                        format!("{at}.requests"),
                        "must be at least 1",
                    ));
                }
                if *per_seconds == 0 || *per_seconds > 86_400 {
                    return Err(FieldError::new(
                        format!("{at}.per_seconds"),
                        "must be between 1 and 86400",
                    ));
                }
            }
            Policy::Cors {
                allow_origins,
                allow_headers,
                ..
            } => {
                if allow_origins.is_empty() {
                    return Err(FieldError::new(
                        format!("{at}.allow_origins"),
                        "must list at least one origin (or \"*\")",
                    ));
                }
                for (i, h) in allow_headers.iter().enumerate() {
                    check_header_name(&format!("{at}.allow_headers[{i}]"), h)?;
                }
            }
            Policy::RequestHeaders {
                add,
                remove,
                rename,
            }
            | Policy::ResponseHeaders {
                add,
                remove,
                rename,
            } => {
                for (i, r) in rename.iter().enumerate() {
                    check_header_name(&format!("{at}.rename[{i}].from"), &r.from)?;
                    check_settable_header(&format!("{at}.rename[{i}].to"), &r.to)?;
                    if r.from.eq_ignore_ascii_case(&r.to) {
                        return Err(FieldError::new(
                            format!("{at}.rename[{i}].to"),
                            "must differ from `from`",
                        ));
                    }
                }
                for (i, h) in add.iter().enumerate() {
                    check_settable_header(&format!("{at}.add[{i}].name"), &h.name)?;
                    if h.value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                        return Err(FieldError::new(
                            format!("{at}.add[{i}].value"),
                            "must not contain CR, LF or NUL",
                        ));
                    }
                }
                for (i, h) in remove.iter().enumerate() {
                    check_header_name(&format!("{at}.remove[{i}]"), h)?;
                }
            }
            Policy::RequestSizeLimit { max_bytes } => {
                if *max_bytes == 0 {
                    return Err(FieldError::new(
                        format!("{at}.max_bytes"),
                        "must be at least 1",
                    ));
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiSpec {
    pub name: String,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Host names the API answers on (`api.example.com` or `*.example.com`).
    pub hosts: Vec<String>,
    /// Path prefix, starting with `/`.
    pub base_path: String,
    pub upstream: Upstream,
    #[serde(default)]
    pub policies: Vec<Policy>,
    /// Operations under the base path (empty: every request under it). When set, a request
    /// must match one of them; the most specific match wins (see [`ApiRoute`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<ApiRoute>,
    #[serde(default)]
    pub lifecycle: Lifecycle,
}

/// One operation of an API: a path under the base path (exact or prefix), optionally methods
/// and header values. Among the routes a request matches, the most specific wins: an exact path
/// before a prefix, a longer path before a shorter one, a route naming methods before one that
/// does not, more header conditions before fewer, then the first declared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiRoute {
    /// Path under the API's base path, starting with `/` (`/` is the base path itself).
    pub path: String,
    #[serde(default)]
    pub path_match: PathMatch,
    /// Methods this route answers (empty: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Request headers that must have exactly these values (names case-insensitive).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderValue>,
    /// Scopes a JWT must carry for this route, on top of the JWT policy's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required_scopes: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PathMatch {
    /// The path and everything under it (whole segments).
    #[default]
    Prefix,
    /// The path only.
    Exact,
}

impl ApiRoute {
    fn check(&self, at: &str) -> Checked {
        let p = &self.path;
        if !p.starts_with('/')
            || p.len() > 512
            || p.contains("//")
            || p.split('/').any(|s| s == ".." || s == ".")
            || !p
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/-._~".contains(&b))
        {
            return Err(FieldError::new(
                format!("{at}.path"),
                format!("{p:?} must start with '/' and use only letters, digits and -._~"),
            ));
        }
        const METHODS: [&str; 8] = [
            "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE",
        ];
        for (i, m) in self.methods.iter().enumerate() {
            if !METHODS.contains(&m.as_str()) {
                return Err(FieldError::new(
                    format!("{at}.methods[{i}]"),
                    format!("{m:?} is not one of {}", METHODS.join(", ")),
                ));
            }
        }
        for (i, h) in self.headers.iter().enumerate() {
            check_header_name(&format!("{at}.headers[{i}].name"), &h.name)?;
            check_text(&format!("{at}.headers[{i}].value"), &h.value, 1024)?;
        }
        for (i, s) in self.required_scopes.iter().enumerate() {
            check_text(&format!("{at}.required_scopes[{i}]"), s, 200)?;
        }
        Ok(())
    }
}

impl ApiSpec {
    pub fn check(&self) -> Checked {
        check_name("name", &self.name)?;
        if self.version.is_empty()
            || self.version.len() > 32
            || !self
                .version
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        {
            return Err(FieldError::new(
                "version",
                "must be 1 to 32 characters of letters, digits, '.' and '-'",
            ));
        }
        check_opt_text("display_name", &self.display_name, 200)?;
        if self.hosts.is_empty() {
            return Err(FieldError::new("hosts", "must list at least one host"));
        }
        for (i, h) in self.hosts.iter().enumerate() {
            let bare = h.strip_prefix("*.").unwrap_or(h);
            let ok = !bare.is_empty()
                && h.len() <= 253
                && bare.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if !ok {
                return Err(FieldError::new(
                    format!("hosts[{i}]"),
                    format!("{h:?} is not a host name (a wildcard is allowed only as \"*.\")"),
                ));
            }
        }
        let bp = &self.base_path;
        if !bp.starts_with('/')
            || bp.len() > 512
            || bp.contains("//")
            || bp.split('/').any(|s| s == ".." || s == ".")
            || !bp
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/-._~".contains(&b))
        {
            return Err(FieldError::new(
                "base_path",
                format!(
                    "{bp:?} must start with '/' and use only letters, digits and -._~ \
                     (no '//', '.' or '..' segments)"
                ),
            ));
        }
        self.upstream.check()?;
        for (i, p) in self.policies.iter().enumerate() {
            p.check(&format!("policies[{i}]"))?;
        }
        if self.routes.len() > 200 {
            return Err(FieldError::new("routes", "must list at most 200 routes"));
        }
        let has_jwt = self
            .policies
            .iter()
            .any(|p| matches!(p, Policy::Jwt { .. }));
        for (i, r) in self.routes.iter().enumerate() {
            r.check(&format!("routes[{i}]"))?;
            if !r.required_scopes.is_empty() && !has_jwt {
                return Err(FieldError::new(
                    format!("routes[{i}].required_scopes"),
                    "needs a jwt policy on the API (scopes are read from its tokens)",
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsumerSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact_email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Client certificates that identify this consumer to `mutual-tls` policies: the leaf's
    /// subject (`C=FR, O=Fintech, CN=tpp-one`, in certificate order) or `sha256:<hex>` of the
    /// leaf. Each must be unique within the tenant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_certificates: Vec<String>,
}

/// A certificate identity in the form consumers and the gateway compare: `sha256:` followed by
/// lowercase hex, or a subject whose components are separated by `,` without spaces.
pub fn normalize_cert_identity(s: &str) -> String {
    if let Some(hex) = s.strip_prefix("sha256:") {
        return format!("sha256:{}", hex.to_ascii_lowercase());
    }
    split_dn(s)
        .iter()
        .map(|p| {
            let p = p.trim_start();
            // a trailing space that is escaped belongs to the value
            if p.ends_with("\\ ") {
                p.to_string()
            } else {
                p.trim_end().to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The components of a subject, split on the commas that are not escaped (`\\,` stays inside
/// its value, RFC 4514).
fn split_dn(s: &str) -> Vec<String> {
    let mut parts: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            current.push(c);
            escaped = false;
        } else if c == '\\' {
            current.push(c);
            escaped = true;
        } else if c == ',' {
            parts.push(std::mem::take(&mut current));
        } else {
            current.push(c);
        }
    }
    parts.push(current);
    parts
}

impl ConsumerSpec {
    pub fn check(&self) -> Checked {
        check_name("name", &self.name)?;
        check_opt_text("display_name", &self.display_name, 200)?;
        check_opt_text("description", &self.description, 2000)?;
        if self.client_certificates.len() > 100 {
            return Err(FieldError::new(
                "client_certificates",
                "must list at most 100 certificates",
            ));
        }
        for (i, c) in self.client_certificates.iter().enumerate() {
            let field = format!("client_certificates[{i}]");
            match c.strip_prefix("sha256:") {
                Some(hex) => {
                    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(FieldError::new(
                            field,
                            "a fingerprint is sha256: followed by 64 hex digits",
                        ));
                    }
                }
                None => {
                    let ok = c.len() <= 1024
                        && !c.chars().any(char::is_control)
                        && split_dn(c).iter().all(|part| {
                            matches!(part.split_once('='), Some((k, v)) if !k.trim().is_empty() && !v.is_empty())
                        });
                    if !ok {
                        return Err(FieldError::new(
                            field,
                            format!("{c:?} is neither a subject like \"C=FR, O=Fintech, CN=tpp-one\" nor sha256:<hex>"),
                        ));
                    }
                }
            }
        }
        if let Some(mail) = &self.contact_email {
            let ok = mail.len() <= 254
                && matches!(mail.split_once('@'), Some((l, d)) if !l.is_empty() && d.contains('.'))
                && !mail.chars().any(|c| c.is_whitespace() || c.is_control());
            if !ok {
                return Err(FieldError::new(
                    "contact_email",
                    format!("{mail:?} is not an e-mail address"),
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub requests: u32,
    pub per_seconds: u32,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_day: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_month: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<Quota>,
}

impl PlanSpec {
    pub fn check(&self) -> Checked {
        check_name("name", &self.name)?;
        check_opt_text("description", &self.description, 2000)?;
        if let Some(rl) = &self.rate_limit {
            if rl.requests == 0 {
                return Err(FieldError::new("rate_limit.requests", "must be at least 1"));
            }
            if rl.per_seconds == 0 || rl.per_seconds > 86_400 {
                return Err(FieldError::new(
                    "rate_limit.per_seconds",
                    "must be between 1 and 86400",
                ));
            }
        }
        if let Some(q) = &self.quota {
            if q.per_day == Some(0) {
                return Err(FieldError::new(
                    "quota.per_day",
                    "must be at least 1 when set",
                ));
            }
            if q.per_month == Some(0) {
                return Err(FieldError::new(
                    "quota.per_month",
                    "must be at least 1 when set",
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionStatus {
    #[default]
    Pending,
    Active,
    Suspended,
}

/// A consumer's subscription to an API under a plan. Its name is `<consumer>.<api>`: one
/// subscription per consumer and API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionSpec {
    pub consumer: String,
    pub api: String,
    pub plan: String,
    #[serde(default)]
    pub status: SubscriptionStatus,
}

impl SubscriptionSpec {
    pub fn check(&self) -> Checked {
        check_name("consumer", &self.consumer)?;
        check_name("api", &self.api)?;
        check_name("plan", &self.plan)
    }

    pub fn name(&self) -> String {
        format!("{}.{}", self.consumer, self.api)
    }
}

/// An API key of a consumer. The key itself is shown once at creation; only its SHA-256 is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KeySpec {
    /// Server-generated id (`key-…`).
    pub name: String,
    pub consumer: String,
    /// First characters of the key, to recognise it in lists.
    pub prefix: String,
    /// Hex SHA-256 of the key. Never returned by the API.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key_hash: String,
    pub expires_at: String,
    #[serde(default)]
    pub revoked: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    pub name: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default)]
    pub disabled: bool,
}

impl UserSpec {
    /// `tenant` is `None` for platform users, who must be platform admins (and only they).
    pub fn check(&self, tenant: Option<&str>) -> Checked {
        check_name("name", &self.name)?;
        check_opt_text("display_name", &self.display_name, 200)?;
        match (tenant, self.role) {
            (None, Role::PlatformAdmin) => Ok(()),
            (None, r) => Err(FieldError::new(
                "role",
                format!(
                    "platform users must be platform-admin, not {r}; create {r} users in a tenant"
                ),
            )),
            (Some(_), Role::PlatformAdmin) => Err(FieldError::new(
                "role",
                "platform-admin users are created at /admin/v1/users, not in a tenant",
            )),
            (Some(_), _) => Ok(()),
        }
    }
}

/// An API token of a user (bearer credential for the admin API). Only its hash is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenSpec {
    pub name: String,
    pub user: String,
    pub prefix: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token_hash: String,
    pub expires_at: String,
    #[serde(default)]
    pub revoked: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A TLS certificate the gateway serves for the host names of its leaf (SNI). The private key
/// is sealed with the cluster's age identity before the change is proposed: the store, the Raft
/// log, exports and API answers only ever hold its age ciphertext.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CertificateSpec {
    pub name: String,
    /// PEM chain, leaf first, then intermediates.
    pub certificate: String,
    /// On input, the leaf's private key in PEM (PKCS#8, SEC1 or PKCS#1), or that key already
    /// sealed with `age -r <recipient> -a`. Stored and shown only as age ciphertext.
    pub private_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Read-only: DNS names of the leaf (subjectAltName), which SNI selects on.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Read-only: subject and issuer of the leaf.
    #[serde(default)]
    pub subject: String,
    #[serde(default)]
    pub issuer: String,
    /// Read-only: validity of the leaf (RFC 3339).
    #[serde(default)]
    pub not_before: String,
    #[serde(default)]
    pub not_after: String,
    /// Read-only: lowercase hex SHA-256 of the leaf.
    #[serde(default)]
    pub fingerprint: String,
}

impl CertificateSpec {
    /// Fills the read-only fields from the certificate itself (whatever the client sent).
    pub fn describe(&mut self) -> Checked {
        let info = crate::pki::describe_certificate(&self.certificate)
            .map_err(|e| FieldError::new("certificate", e))?;
        self.hosts = info.hosts;
        self.subject = info.subject;
        self.issuer = info.issuer;
        self.not_before = format_time(info.not_before);
        self.not_after = format_time(info.not_after);
        self.fingerprint = info.fingerprint;
        Ok(())
    }

    pub fn check(&self) -> Checked {
        check_name("name", &self.name)?;
        check_opt_text("description", &self.description, 500)?;
        if self.certificate.len() > 64 * 1024 {
            return Err(FieldError::new(
                "certificate",
                "must be at most 64 KiB of PEM",
            ));
        }
        let mut described = self.clone();
        described.describe()?;
        if described != *self {
            return Err(FieldError::new(
                "certificate",
                "hosts, subject, issuer, validity and fingerprint are read from the certificate",
            ));
        }
        if !self
            .private_key
            .trim_start()
            .starts_with(crate::secrets::ARMOR_BEGIN)
        {
            return Err(FieldError::new(
                "private_key",
                "must be sealed with the cluster's age identity",
            ));
        }
        Ok(())
    }
}

/// Any object, as stored and as replicated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "spec", rename_all = "snake_case")]
pub enum Spec {
    Tenant(TenantSpec),
    Api(ApiSpec),
    Consumer(ConsumerSpec),
    Key(KeySpec),
    Plan(PlanSpec),
    Subscription(SubscriptionSpec),
    User(UserSpec),
    Token(TokenSpec),
    Certificate(CertificateSpec),
}

impl Spec {
    pub fn kind(&self) -> Kind {
        match self {
            Spec::Tenant(_) => Kind::Tenant,
            Spec::Api(_) => Kind::Api,
            Spec::Consumer(_) => Kind::Consumer,
            Spec::Key(_) => Kind::Key,
            Spec::Plan(_) => Kind::Plan,
            Spec::Subscription(_) => Kind::Subscription,
            Spec::User(_) => Kind::User,
            Spec::Token(_) => Kind::Token,
            Spec::Certificate(_) => Kind::Certificate,
        }
    }

    pub fn name(&self) -> String {
        match self {
            Spec::Tenant(s) => s.name.clone(),
            Spec::Api(s) => s.name.clone(),
            Spec::Consumer(s) => s.name.clone(),
            Spec::Key(s) => s.name.clone(),
            Spec::Plan(s) => s.name.clone(),
            Spec::Subscription(s) => s.name(),
            Spec::User(s) => s.name.clone(),
            Spec::Token(s) => s.name.clone(),
            Spec::Certificate(s) => s.name.clone(),
        }
    }

    /// Checks the spec on its own (references to other objects are checked by `state`).
    pub fn check(&self, tenant: Option<&str>) -> Checked {
        match self {
            Spec::Tenant(s) => s.check(),
            Spec::Api(s) => s.check(),
            Spec::Consumer(s) => s.check(),
            Spec::Key(k) => {
                check_name("name", &k.name)?;
                check_name("consumer", &k.consumer)?;
                check_opt_text("description", &k.description, 500)
            }
            Spec::Plan(s) => s.check(),
            Spec::Subscription(s) => s.check(),
            Spec::User(s) => s.check(tenant),
            Spec::Token(t) => {
                check_name("name", &t.name)?;
                check_name("user", &t.user)?;
                check_opt_text("description", &t.description, 500)
            }
            Spec::Certificate(c) => c.check(),
        }
    }

    /// The spec as JSON with secret material (hashes of keys and tokens) removed: what the API
    /// returns, what export prints, and what the audit digest covers.
    pub fn public_json(&self) -> serde_json::Value {
        let mut v = match self {
            Spec::Tenant(s) => serde_json::to_value(s),
            Spec::Api(s) => serde_json::to_value(s),
            Spec::Consumer(s) => serde_json::to_value(s),
            Spec::Key(s) => serde_json::to_value(s),
            Spec::Plan(s) => serde_json::to_value(s),
            Spec::Subscription(s) => serde_json::to_value(s),
            Spec::User(s) => serde_json::to_value(s),
            Spec::Token(s) => serde_json::to_value(s),
            Spec::Certificate(s) => serde_json::to_value(s),
        }
        .unwrap_or(serde_json::Value::Null);
        if let Some(map) = v.as_object_mut() {
            map.remove("key_hash");
            map.remove("token_hash");
        }
        if let Spec::Subscription(s) = self {
            if let Some(map) = v.as_object_mut() {
                map.insert("name".into(), serde_json::Value::String(s.name()));
            }
        }
        v
    }
}

/// A stored object: its spec and the metadata the server keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub meta: ObjectMeta,
    #[serde(flatten)]
    pub spec: Spec,
}

impl Object {
    /// The API representation: the public spec fields plus the metadata.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = self.spec.public_json();
        if let Some(map) = v.as_object_mut() {
            if let Some(t) = &self.meta.tenant {
                map.insert("tenant".into(), t.clone().into());
            }
            map.insert("resource_version".into(), self.meta.version.into());
            map.insert("created_at".into(), self.meta.created_at.clone().into());
            map.insert("updated_at".into(), self.meta.updated_at.clone().into());
        }
        v
    }

    pub fn etag(&self) -> String {
        format!("\"{}\"", self.meta.version)
    }
}

/// Fields the server sets; a client may send them back (GET, edit, PUT) and they are ignored.
/// (`resource_version` is the object's change counter, distinct from an API's own `version`.)
pub const READ_ONLY_FIELDS: [&str; 4] = ["tenant", "resource_version", "created_at", "updated_at"];

// ---------------------------------------------------------------------------------------------
// The declarative tenant document (`apim export` / `apim apply`).

pub const DOCUMENT_API_VERSION: &str = "apim/v1";
pub const DOCUMENT_KIND: &str = "TenantConfig";

/// One tenant's whole configuration. Consumers are exported without their keys: keys are
/// secrets the server generates and cannot be reproduced from a file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TenantDocument {
    pub api_version: String,
    pub kind: String,
    pub tenant: String,
    /// The tenant revision the document was exported at (informational on apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    #[serde(default)]
    pub apis: Vec<ApiSpec>,
    #[serde(default)]
    pub plans: Vec<PlanSpec>,
    #[serde(default)]
    pub consumers: Vec<ConsumerSpec>,
    #[serde(default)]
    pub subscriptions: Vec<SubscriptionSpec>,
}

impl TenantDocument {
    /// Checks the document on its own: header, every object, and duplicate names.
    pub fn check(&self) -> Checked {
        if self.api_version != DOCUMENT_API_VERSION {
            return Err(FieldError::new(
                "apiVersion",
                format!(
                    "must be {DOCUMENT_API_VERSION:?}, not {:?}",
                    self.api_version
                ),
            ));
        }
        if self.kind != DOCUMENT_KIND {
            return Err(FieldError::new(
                "kind",
                format!("must be {DOCUMENT_KIND:?}, not {:?}", self.kind),
            ));
        }
        check_name("tenant", &self.tenant)?;
        fn prefixed(list: &str, i: usize, e: FieldError) -> FieldError {
            FieldError::new(format!("{list}[{i}].{}", e.field), e.reason)
        }
        fn no_dupes<'a>(list: &str, names: impl Iterator<Item = String> + 'a) -> Checked {
            let mut seen = std::collections::BTreeSet::new();
            for (i, n) in names.enumerate() {
                if !seen.insert(n.clone()) {
                    return Err(FieldError::new(
                        format!("{list}[{i}].name"),
                        format!("{n:?} appears twice"),
                    ));
                }
            }
            Ok(())
        }
        for (i, a) in self.apis.iter().enumerate() {
            a.check().map_err(|e| prefixed("apis", i, e))?;
        }
        for (i, p) in self.plans.iter().enumerate() {
            p.check().map_err(|e| prefixed("plans", i, e))?;
        }
        for (i, c) in self.consumers.iter().enumerate() {
            c.check().map_err(|e| prefixed("consumers", i, e))?;
        }
        for (i, s) in self.subscriptions.iter().enumerate() {
            s.check().map_err(|e| prefixed("subscriptions", i, e))?;
        }
        no_dupes("apis", self.apis.iter().map(|a| a.name.clone()))?;
        no_dupes("plans", self.plans.iter().map(|a| a.name.clone()))?;
        no_dupes("consumers", self.consumers.iter().map(|a| a.name.clone()))?;
        no_dupes("subscriptions", self.subscriptions.iter().map(|s| s.name()))?;
        Ok(())
    }

    /// The document's objects in dependency order (plans, APIs and consumers before the
    /// subscriptions that name them).
    pub fn specs(&self) -> Vec<Spec> {
        let mut out = Vec::new();
        out.extend(self.plans.iter().cloned().map(Spec::Plan));
        out.extend(self.apis.iter().cloned().map(Spec::Api));
        out.extend(self.consumers.iter().cloned().map(Spec::Consumer));
        out.extend(self.subscriptions.iter().cloned().map(Spec::Subscription));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "acme", "acme-bank-2", "0x"] {
            assert!(check_name("name", ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "Acme", "a_b", "a.b", &"x".repeat(64)] {
            let e = check_name("name", bad).unwrap_err();
            assert_eq!(e.field, "name");
        }
    }

    #[test]
    fn times_normalise_and_never_panic() {
        assert_eq!(
            normalize_time("t", "2027-01-31T01:00:00+01:00").unwrap(),
            "2027-01-31T00:00:00.000Z"
        );
        for bad in [
            "9999-12-31T23:59:59-01:00",
            "0000-01-01T00:00:00+01:00",
            "1969-12-31T23:59:59Z",
            "soon",
        ] {
            assert_eq!(normalize_time("t", bad).unwrap_err().field, "t", "{bad}");
        }
        let far = time::macros::datetime!(9999-12-31 23:00 -05:00);
        assert_eq!(format_time(far), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn lifecycle_transitions() {
        use Lifecycle::*;
        assert!(Draft.can_move_to(Published));
        assert!(Published.can_move_to(Deprecated));
        assert!(Deprecated.can_move_to(Retired));
        assert!(!Retired.can_move_to(Published));
        assert!(!Published.can_move_to(Draft));
        assert!(!Draft.can_move_to(Deprecated));
    }

    fn api() -> ApiSpec {
        ApiSpec {
            name: "payments".into(),
            version: "v1".into(),
            display_name: None,
            hosts: vec!["api.bank.example".into()],
            base_path: "/payments".into(),
            upstream: Upstream {
                targets: vec![UpstreamTarget {
                    url: "http://127.0.0.1:9000".into(),
                    weight: 1,
                }],
                ..Default::default()
            },
            policies: vec![],
            routes: vec![],
            lifecycle: Lifecycle::Draft,
        }
    }

    #[test]
    fn api_checks_name_the_field() {
        assert!(api().check().is_ok());
        type Mutator = Box<dyn Fn(&mut ApiSpec)>;
        let cases: Vec<(Mutator, &str)> = vec![
            (Box::new(|a| a.base_path = "/a/../b".into()), "base_path"),
            (Box::new(|a| a.hosts = vec!["bad host".into()]), "hosts[0]"),
            (
                Box::new(|a| a.upstream.targets[0].url = "ftp://x".into()),
                "upstream.targets[0].url",
            ),
            (
                Box::new(|a| a.upstream.targets[0].url = "http://user:pw@h:1".into()),
                "upstream.targets[0].url",
            ),
            (
                Box::new(|a| a.upstream.targets[0].url = "https://h:1".into()),
                "upstream.tls",
            ),
            (Box::new(|a| a.upstream.retries = 6), "upstream.retries"),
            (
                Box::new(|a| a.upstream.timeouts.connect_ms = Some(0)),
                "upstream.timeouts.connect_ms",
            ),
            (
                Box::new(|a| a.upstream.timeouts.response_seconds = Some(3601)),
                "upstream.timeouts.response_seconds",
            ),
            (
                Box::new(|a| a.upstream.timeouts.total_seconds = Some(86_401)),
                "upstream.timeouts.total_seconds",
            ),
            (
                Box::new(|a| {
                    a.policies = vec![Policy::IpFilter {
                        allow: vec!["10.0.0.0/33".into()],
                        deny: vec![],
                    }]
                }),
                "policies[0].allow[0]",
            ),
            (
                Box::new(|a| {
                    a.policies = vec![Policy::Jwt {
                        issuer: "i".into(),
                        audience: "a".into(),
                        jwks_url: Some("https://idp.example/jwks".into()),
                        jwks: None,
                        jwks_ca_bundle: None,
                        jwks_refresh_seconds: 300,
                        algorithms: vec!["HS256".into()],
                        required_scopes: vec![],
                        consumer_claim: None,
                        clock_skew_seconds: 60,
                    }]
                }),
                "policies[0].algorithms[0]",
            ),
        ];
        for (mutate, field) in cases {
            let mut a = api();
            mutate(&mut a);
            assert_eq!(a.check().unwrap_err().field, field);
        }
    }

    #[test]
    fn policy_json_is_tagged_and_strict() {
        let p: Policy = serde_json::from_str(r#"{"type":"api-key","header":"x-key"}"#).unwrap();
        assert_eq!(
            p,
            Policy::ApiKey {
                header: "x-key".into(),
                query_param: None
            }
        );
        assert!(serde_json::from_str::<Policy>(r#"{"type":"api-key","hedaer":"x"}"#).is_err());
        assert!(serde_json::from_str::<Policy>(r#"{"type":"nope"}"#).is_err());
    }

    #[test]
    fn public_json_drops_hashes() {
        let k = Spec::Key(KeySpec {
            name: "key-1".into(),
            consumer: "c".into(),
            prefix: "apik_ab".into(),
            key_hash: "deadbeef".into(),
            expires_at: "2030-01-01T00:00:00Z".into(),
            revoked: false,
            description: None,
        });
        let j = k.public_json();
        assert!(j.get("key_hash").is_none());
        assert_eq!(j["prefix"], "apik_ab");
    }
}
