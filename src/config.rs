//! The node's own configuration: a TOML file, every field documented and defaulted, checked
//! before anything starts. See docs/configuration.md.
//!
//! Architecture invariant: this module never reads the replicated state; it describes only how
//! this one node runs.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Top-level configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the node keeps its state: Raft log, state, audit segments, PKI, bootstrap token.
    /// Overridden by `--data-dir` or `APIM_DATA_DIR`.
    pub data_dir: PathBuf,
    /// This node's Raft id (1 for a single node).
    pub node_id: u64,
    pub admin: AdminConfig,
    pub gateway: GatewayConfig,
    pub log: LogConfig,
    pub raft: RaftConfig,
    pub audit: AuditConfig,
    pub secrets: SecretsConfig,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsConfig {
    /// The cluster's age identity (`AGE-SECRET-KEY-1...`), which seals certificate keys in the
    /// replicated state. Every node of a cluster needs the same file. When unset, the node uses
    /// `<data_dir>/secrets.age` and creates it on first start; a file named here must exist.
    pub identity_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin API (HTTPS).
    pub listen: String,
    /// DNS names and IP addresses put on the admin certificate issued by the internal CA.
    pub tls_names: Vec<String>,
    /// Largest request body accepted, in bytes (larger answers 413).
    pub max_body_bytes: usize,
    /// Time allowed to handle one request, body included, in seconds.
    pub request_timeout_seconds: u64,
    /// Time allowed for a connection's TLS handshake and for each request's headers, in seconds
    /// (slow clients are cut off).
    pub header_timeout_seconds: u64,
    /// Most admin connections open at once; more are closed as soon as accepted.
    pub max_connections: usize,
    /// Lifetime of the bootstrap token written to `<data_dir>/admin.token`, in days.
    pub bootstrap_token_ttl_days: u32,
    /// Default lifetime of tokens and API keys created without an expiry, in days.
    pub default_credential_ttl_days: u32,
    /// Time allowed for in-flight requests to finish on shutdown, in seconds.
    pub shutdown_grace_seconds: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Whether this node runs the gateway data plane.
    pub enabled: bool,
    /// Address of the gateway's plain-HTTP listener (port 0: any free port).
    pub http_listen: String,
    /// Address of the gateway's HTTPS listener (certificates chosen by SNI among the
    /// certificate resources); empty to serve no HTTPS.
    pub https_listen: String,
    /// Time allowed for a client's TLS handshake, in seconds.
    pub tls_handshake_timeout_seconds: u64,
    /// Largest request head (HTTP/1.1 request line and headers) or HTTP/2 header list, in
    /// bytes; a larger one answers 431.
    pub max_header_bytes: usize,
    /// Most header fields in an HTTP/1.1 request; more answers 431.
    pub max_headers: usize,
    /// How often the per-consumer usage counted by this node is written to the replicated
    /// state, in seconds (and once more at shutdown).
    pub usage_flush_seconds: u64,
    /// Time allowed to connect to an upstream target, in milliseconds.
    pub upstream_connect_timeout_ms: u64,
    /// Time allowed for an upstream's response headers, in seconds.
    pub upstream_response_timeout_seconds: u64,
    /// Time allowed for each request's headers, in seconds (slow clients are cut off).
    pub header_timeout_seconds: u64,
    /// How long an HTTP/2 connection with no request in flight, or a WebSocket spliced
    /// through the gateway, may stay without traffic before it is closed, in seconds.
    pub idle_timeout_seconds: u64,
    /// Most client connections open at once; more are closed as soon as accepted.
    pub max_connections: usize,
    /// CIDRs of the proxies or load balancers in front of the gateway: only their
    /// `X-Forwarded-For`, `X-Forwarded-Proto` and `X-Forwarded-Host` are believed.
    pub trusted_proxies: Vec<String>,
    /// Also send the upstream an RFC 7239 `Forwarded` header (`for`, `host`, `proto` of this
    /// hop, appended to a trusted proxy's); a client's is removed either way unless trusted.
    pub forwarded_header: bool,
    /// Fields of the gateway's access-log lines, in order (see `gateway::access::Field`).
    pub access_log_fields: Vec<String>,
    /// Gateway worker threads, each with its own event loop, listening sockets
    /// (`SO_REUSEPORT`) and upstream connections; 0: one per CPU the process may run on.
    pub workers: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            enabled: true,
            http_listen: "127.0.0.1:8080".into(),
            https_listen: "127.0.0.1:8443".into(),
            tls_handshake_timeout_seconds: 10,
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            usage_flush_seconds: 60,
            upstream_connect_timeout_ms: 2000,
            upstream_response_timeout_seconds: 30,
            header_timeout_seconds: 10,
            idle_timeout_seconds: 60,
            max_connections: 10_000,
            trusted_proxies: Vec::new(),
            forwarded_header: false,
            workers: 0,
            access_log_fields: crate::gateway::access::Field::DEFAULT
                .iter()
                .map(|f| f.to_string())
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: `info`, `debug`, or per module (`info,apim::store=debug`). `RUST_LOG`
    /// overrides it.
    pub level: String,
    /// `json` (one JSON object per line, for journald and log shippers) or `text`.
    pub format: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// Build a snapshot and compact the log every this many entries.
    pub snapshot_every: u64,
    /// Entries kept in the log behind the last snapshot.
    pub keep_logs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// How often the applied state and audit segments are made durable, in milliseconds.
    /// Acknowledged writes are durable in the Raft log regardless.
    pub flush_interval_ms: u64,
    /// How often a signed checkpoint is written (when records were added), in seconds.
    pub checkpoint_interval_seconds: u64,
    /// Refused requests (401/403/404 on authorisation) are aggregated per source, principal,
    /// status and tenant over this window, then audited as one security event per group.
    pub security_event_window_seconds: u64,
    /// Most distinct (source, principal, status, tenant) groups held per window; extra refusals
    /// are counted in one overflow group per status.
    pub security_event_max_groups: usize,
}

/// Data directory when neither the config file nor `--data-dir` names one.
pub const DEFAULT_DATA_DIR: &str = "./apim-data";

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            node_id: 1,
            admin: AdminConfig::default(),
            gateway: GatewayConfig::default(),
            log: LogConfig::default(),
            raft: RaftConfig::default(),
            audit: AuditConfig::default(),
            secrets: SecretsConfig::default(),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9443".into(),
            tls_names: vec!["localhost".into(), "127.0.0.1".into()],
            max_body_bytes: 1024 * 1024,
            request_timeout_seconds: 30,
            header_timeout_seconds: 10,
            max_connections: 1024,
            bootstrap_token_ttl_days: 30,
            default_credential_ttl_days: 365,
            shutdown_grace_seconds: 20,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info,openraft=warn".into(),
            format: "json".into(),
        }
    }
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            snapshot_every: 10_000,
            keep_logs: 1_000,
        }
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            flush_interval_ms: 1000,
            checkpoint_interval_seconds: 60,
            security_event_window_seconds: 60,
            security_event_max_groups: 10_000,
        }
    }
}

/// A configuration error naming the file, the field and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("config file {path}: {reason}")]
    Parse { path: String, reason: String },
    #[error("config {source_name}: field `{field}`: {reason}")]
    Invalid {
        source_name: String,
        field: String,
        reason: String,
    },
}

impl Config {
    /// Reads and checks a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, source_name: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: source_name.to_string(),
            reason: e.to_string().trim_end().to_string(),
        })?;
        cfg.check(source_name)?;
        Ok(cfg)
    }

    /// Semantic checks, each naming the field.
    pub fn check(&self, source_name: &str) -> Result<(), ConfigError> {
        let bad = |field: &str, reason: String| ConfigError::Invalid {
            source_name: source_name.to_string(),
            field: field.to_string(),
            reason,
        };
        if self.data_dir.as_os_str().is_empty() {
            return Err(bad("data_dir", "must not be empty".into()));
        }
        if self.node_id == 0 {
            return Err(bad("node_id", "must be at least 1".into()));
        }
        self.admin_addr().map_err(|r| bad("admin.listen", r))?;
        if self.admin.tls_names.is_empty() {
            return Err(bad("admin.tls_names", "must list at least one name".into()));
        }
        for (i, n) in self.admin.tls_names.iter().enumerate() {
            if n.is_empty() || n.contains(char::is_whitespace) {
                return Err(bad(
                    &format!("admin.tls_names[{i}]"),
                    format!("{n:?} is not a host name or IP address"),
                ));
            }
        }
        if !(1024..=64 * 1024 * 1024).contains(&self.admin.max_body_bytes) {
            return Err(bad(
                "admin.max_body_bytes",
                "must be between 1024 and 67108864".into(),
            ));
        }
        if self.admin.request_timeout_seconds == 0 {
            return Err(bad(
                "admin.request_timeout_seconds",
                "must be at least 1".into(),
            ));
        }
        if !(1..=300).contains(&self.admin.header_timeout_seconds) {
            return Err(bad(
                "admin.header_timeout_seconds",
                "must be between 1 and 300".into(),
            ));
        }
        if !(1..=1_000_000).contains(&self.admin.max_connections) {
            return Err(bad(
                "admin.max_connections",
                "must be between 1 and 1000000".into(),
            ));
        }
        if !(1..=3650).contains(&self.admin.bootstrap_token_ttl_days) {
            return Err(bad(
                "admin.bootstrap_token_ttl_days",
                "must be between 1 and 3650".into(),
            ));
        }
        if !(1..=3650).contains(&self.admin.default_credential_ttl_days) {
            return Err(bad(
                "admin.default_credential_ttl_days",
                "must be between 1 and 3650".into(),
            ));
        }
        if self.gateway.enabled {
            self.gateway_addr()
                .map_err(|r| bad("gateway.http_listen", r))?;
            self.gateway_tls_addr()
                .map_err(|r| bad("gateway.https_listen", r))?;
        }
        if !(1..=300).contains(&self.gateway.tls_handshake_timeout_seconds) {
            return Err(bad(
                "gateway.tls_handshake_timeout_seconds",
                "must be between 1 and 300".into(),
            ));
        }
        if !(8192..=1024 * 1024).contains(&self.gateway.max_header_bytes) {
            return Err(bad(
                "gateway.max_header_bytes",
                "must be between 8192 and 1048576".into(),
            ));
        }
        if !(1..=3600).contains(&self.gateway.usage_flush_seconds) {
            return Err(bad(
                "gateway.usage_flush_seconds",
                "must be between 1 and 3600".into(),
            ));
        }
        if !(16..=1000).contains(&self.gateway.max_headers) {
            return Err(bad(
                "gateway.max_headers",
                "must be between 16 and 1000".into(),
            ));
        }
        if let Some(p) = &self.secrets.identity_file {
            if p.as_os_str().is_empty() {
                return Err(bad("secrets.identity_file", "must not be empty".into()));
            }
        }
        if !(1..=60_000).contains(&self.gateway.upstream_connect_timeout_ms) {
            return Err(bad(
                "gateway.upstream_connect_timeout_ms",
                "must be between 1 and 60000".into(),
            ));
        }
        if !(1..=3600).contains(&self.gateway.upstream_response_timeout_seconds) {
            return Err(bad(
                "gateway.upstream_response_timeout_seconds",
                "must be between 1 and 3600".into(),
            ));
        }
        for (i, c) in self.gateway.trusted_proxies.iter().enumerate() {
            crate::model::check_cidr(&format!("gateway.trusted_proxies[{i}]"), c)
                .map_err(|e| bad(&e.field, e.reason))?;
        }
        for (i, f) in self.gateway.access_log_fields.iter().enumerate() {
            let field = format!("gateway.access_log_fields[{i}]");
            if crate::gateway::access::Field::parse(f).is_none() {
                let known: Vec<&str> = crate::gateway::access::Field::ALL
                    .iter()
                    .map(|(n, _)| *n)
                    .collect();
                return Err(bad(
                    &field,
                    format!("unknown field {f:?}; the fields are {}", known.join(", ")),
                ));
            }
            if self.gateway.access_log_fields[..i].contains(f) {
                return Err(bad(&field, format!("{f:?} is listed twice")));
            }
        }
        if self.gateway.workers > 256 {
            return Err(bad(
                "gateway.workers",
                "must be between 0 (one per CPU) and 256".into(),
            ));
        }
        if !(1..=1_000_000).contains(&self.gateway.max_connections) {
            return Err(bad(
                "gateway.max_connections",
                "must be between 1 and 1000000".into(),
            ));
        }
        if !(1..=300).contains(&self.gateway.header_timeout_seconds) {
            return Err(bad(
                "gateway.header_timeout_seconds",
                "must be between 1 and 300".into(),
            ));
        }
        if !(1..=86_400).contains(&self.gateway.idle_timeout_seconds) {
            return Err(bad(
                "gateway.idle_timeout_seconds",
                "must be between 1 and 86400".into(),
            ));
        }
        if !matches!(self.log.format.as_str(), "json" | "text") {
            return Err(bad(
                "log.format",
                format!("{:?} is not one of \"json\", \"text\"", self.log.format),
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(bad(
                "log.level",
                format!("{:?} is not a valid log filter", self.log.level),
            ));
        }
        if self.raft.snapshot_every < 10 {
            return Err(bad("raft.snapshot_every", "must be at least 10".into()));
        }
        if self.raft.keep_logs > 1_000_000 {
            return Err(bad("raft.keep_logs", "must be at most 1000000".into()));
        }
        if !(1..=600).contains(&self.admin.shutdown_grace_seconds) {
            return Err(bad(
                "admin.shutdown_grace_seconds",
                "must be between 1 and 600".into(),
            ));
        }
        if !(10..=60_000).contains(&self.audit.flush_interval_ms) {
            return Err(bad(
                "audit.flush_interval_ms",
                "must be between 10 and 60000".into(),
            ));
        }
        if self.audit.checkpoint_interval_seconds == 0 {
            return Err(bad(
                "audit.checkpoint_interval_seconds",
                "must be at least 1".into(),
            ));
        }
        if self.audit.security_event_window_seconds == 0 {
            return Err(bad(
                "audit.security_event_window_seconds",
                "must be at least 1".into(),
            ));
        }
        if self.audit.security_event_max_groups == 0 {
            return Err(bad(
                "audit.security_event_max_groups",
                "must be at least 1".into(),
            ));
        }
        Ok(())
    }

    pub fn gateway_addr(&self) -> Result<SocketAddr, String> {
        self.gateway.http_listen.parse().map_err(|_| {
            format!(
                "{:?} is not an address like 127.0.0.1:8080",
                self.gateway.http_listen
            )
        })
    }

    /// The HTTPS listener's address, or `None` when HTTPS is off.
    pub fn gateway_tls_addr(&self) -> Result<Option<SocketAddr>, String> {
        if self.gateway.https_listen.is_empty() {
            return Ok(None);
        }
        self.gateway.https_listen.parse().map(Some).map_err(|_| {
            format!(
                "{:?} is not an address like 127.0.0.1:8443 (or \"\" for no HTTPS)",
                self.gateway.https_listen
            )
        })
    }

    /// The age identity file, and whether the node may create it.
    pub fn secrets_identity(&self) -> (PathBuf, bool) {
        match &self.secrets.identity_file {
            Some(p) => (p.clone(), false),
            None => (self.data_dir.join("secrets.age"), true),
        }
    }

    pub fn admin_addr(&self) -> Result<SocketAddr, String> {
        self.admin.listen.parse().map_err(|_| {
            format!(
                "{:?} is not an address like 127.0.0.1:9443",
                self.admin.listen
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        let c = Config::parse("", "test").unwrap();
        assert_eq!(c.admin.listen, "127.0.0.1:9443");
        assert_eq!(c.data_dir, PathBuf::from("./apim-data"));
    }

    #[test]
    fn errors_name_the_field() {
        let e = Config::parse("[admin]\nlisten = \"nowhere\"\n", "apim.toml").unwrap_err();
        assert!(e.to_string().contains("admin.listen"), "{e}");
        let e = Config::parse("[admin]\nlistn = \"x\"\n", "apim.toml").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("listn") && msg.contains("line 2"), "{msg}");
        let e = Config::parse("[log]\nformat = \"xml\"\n", "apim.toml").unwrap_err();
        assert!(e.to_string().contains("log.format"), "{e}");
        let e = Config::parse("node_id = \"one\"\n", "apim.toml").unwrap_err();
        assert!(e.to_string().contains("node_id"), "{e}");
        let e = Config::parse(
            "[gateway]\naccess_log_fields = [\"status\", \"authorization\"]\n",
            "apim.toml",
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("gateway.access_log_fields[1]") && msg.contains("user_agent"),
            "{msg}"
        );
        let e = Config::parse(
            "[gateway]\naccess_log_fields = [\"status\", \"status\"]\n",
            "apim.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("listed twice"), "{e}");
        let e = Config::parse("[gateway]\nworkers = 1000\n", "apim.toml").unwrap_err();
        assert!(e.to_string().contains("gateway.workers"), "{e}");
        let ok = Config::parse(
            "[gateway]\nworkers = 2\naccess_log_fields = [\"method\", \"user_agent\"]\n",
            "apim.toml",
        )
        .expect("valid");
        assert_eq!(ok.gateway.workers, 2);
    }
}
