//! The admin CLI's client side: argument definitions, the HTTPS client of the admin API, and
//! output as tables (for people) or JSON (for scripts).
//!
//! Architecture invariant: the CLI holds no business rule; it sends requests and renders answers.
//! Only `audit verify` works offline, on the segment files themselves.

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::path::{Path, PathBuf};

pub const EXIT_HELP: &str = "\
Exit codes:
  0  success
  1  other error (I/O, unexpected answer)
  2  bad command line or configuration
  3  not found (404)
  4  conflict or stale version (409, 412, 428)
  5  invalid input (400, 413, 415, 422)
  6  not authenticated or not allowed (401, 403)
  7  node unreachable or unavailable (connection refused, TLS failure, 5xx)
  8  audit verification failed

Connection: the CLI talks to --url (default https://127.0.0.1:9443) with --token, or, on the
node itself, reads the token and CA certificate from the data directory.";

#[derive(Parser, Debug)]
#[command(name = "apim", version, about = "apim: sovereign API management appliance (gateway, control plane, audit) in one binary", after_help = EXIT_HELP)]
pub struct Cli {
    /// Data directory of the local node (token, CA certificate, audit segments) [default:
    /// ./apim-data; for `serve`, the config file's `data_dir`].
    #[arg(
        long,
        global = true,
        env = "APIM_DATA_DIR",
        value_parser = clap::builder::TypedValueParser::map(
            clap::builder::NonEmptyStringValueParser::new(),
            PathBuf::from
        )
    )]
    pub data_dir: Option<PathBuf>,
    /// Admin API URL.
    #[arg(long, global = true, env = "APIM_URL")]
    pub url: Option<String>,
    /// Bearer token (default: <data-dir>/admin.token).
    #[arg(long, global = true, env = "APIM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate of the admin API (default: <data-dir>/pki/ca.crt).
    #[arg(long, global = true, env = "APIM_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value = "table")]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a node (embedded defaults when no --config is given).
    Serve {
        /// TOML configuration file (see docs/configuration.md).
        #[arg(long, short = 'c', env = "APIM_CONFIG")]
        config: Option<PathBuf>,
        /// Break-glass: issue a new platform-admin token into <data-dir>/admin.token at start-up
        /// (when every admin token is lost or expired). Audited as `token.create` by `break-glass`.
        #[arg(long)]
        issue_admin_token: bool,
    },
    /// Health of the node, its Raft state and its audit log.
    Status,
    /// Tenants (platform-admin creates and deletes them).
    Tenant(Scoped<NoScope>),
    /// APIs of a tenant.
    Api(Scoped<TenantScope>),
    /// Consumers (partner applications) of a tenant.
    Consumer(Scoped<TenantScope>),
    /// Plans (rate limits, quotas) of a tenant.
    Plan(Scoped<TenantScope>),
    /// Subscriptions (consumer × API × plan) of a tenant; named <consumer>.<api>.
    Subscription(Scoped<TenantScope>),
    /// TLS certificates the gateway serves by SNI; keys are sealed before they are stored.
    /// e.g. `apim certificate --tenant t create www --set certificate=@www.pem --set private_key=@www.key`
    Certificate(Scoped<TenantScope>),
    /// Users: platform admins (no --tenant) or users of a tenant.
    User(Scoped<OptionalTenant>),
    /// API keys of a consumer.
    Key(CredentialCmd<KeyParent>),
    /// API tokens of a user.
    Token(CredentialCmd<TokenParent>),
    /// Usage of a tenant's consumers (requests and body bytes) by API and UTC hour, with totals.
    Usage {
        #[arg(long, env = "APIM_TENANT")]
        tenant: String,
        #[arg(long)]
        consumer: Option<String>,
        /// RFC 3339 (default: the start of the current UTC month).
        #[arg(long)]
        from: Option<String>,
        /// RFC 3339 (default: now).
        #[arg(long)]
        to: Option<String>,
    },
    /// Audit log: verify the hash chain, list records.
    Audit {
        #[command(subcommand)]
        command: AuditCmd,
    },
    /// Print a tenant's whole configuration as one YAML document.
    Export {
        #[arg(long, env = "APIM_TENANT")]
        tenant: String,
        /// Write to this file instead of standard output.
        #[arg(long, short = 'f')]
        file: Option<PathBuf>,
    },
    /// Show what applying a document would create, change and delete.
    Diff {
        #[arg(long, short = 'f')]
        file: PathBuf,
    },
    /// Converge a tenant to a document, atomically.
    Apply {
        #[arg(long, short = 'f')]
        file: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct NoScope {}

#[derive(Args, Debug)]
pub struct TenantScope {
    /// Tenant the objects belong to (required).
    #[arg(long, env = "APIM_TENANT", global = true)]
    pub tenant: Option<String>,
}

#[derive(Args, Debug)]
pub struct OptionalTenant {
    /// Tenant of the users; none for platform admins.
    #[arg(long, global = true)]
    pub tenant: Option<String>,
}

pub trait Scope {
    fn tenant(&self) -> Option<&str>;
}
impl Scope for NoScope {
    fn tenant(&self) -> Option<&str> {
        None
    }
}
impl Scope for TenantScope {
    fn tenant(&self) -> Option<&str> {
        self.tenant.as_deref()
    }
}
impl Scope for OptionalTenant {
    fn tenant(&self) -> Option<&str> {
        self.tenant.as_deref()
    }
}

#[derive(Args, Debug)]
pub struct Scoped<S: Args> {
    #[command(flatten)]
    pub scope: S,
    #[command(subcommand)]
    pub action: ObjectCmd,
}

#[derive(Subcommand, Debug)]
pub enum ObjectCmd {
    /// List objects.
    List {
        /// Exact-match filter `field=value` (repeatable), e.g. lifecycle=published.
        #[arg(long = "filter")]
        filters: Vec<String>,
        /// Sort by name, created_at or updated_at ('-' prefix for descending).
        #[arg(long)]
        sort: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long, default_value_t = 0)]
        offset: usize,
    },
    /// Show one object.
    Get { name: String },
    /// Create an object from a file (YAML or JSON) and/or `--set field=value`.
    Create {
        /// Name of the object (sets the `name` field).
        name: Option<String>,
        #[arg(long, short = 'f')]
        file: Option<PathBuf>,
        /// `field=value` (value parsed as JSON when it is valid JSON; `field=@file` reads a
        /// file's text); repeatable.
        #[arg(long = "set")]
        sets: Vec<String>,
    },
    /// Change an object: the current one (or --file) with `--set` applied, guarded by its version.
    Update {
        name: String,
        #[arg(long, short = 'f')]
        file: Option<PathBuf>,
        #[arg(long = "set")]
        sets: Vec<String>,
        /// Refuse unless the object is at this version (default: the version just read).
        #[arg(long)]
        if_version: Option<u64>,
    },
    /// Delete an object.
    Delete {
        name: String,
        #[arg(long)]
        if_version: Option<u64>,
    },
}

#[derive(Args, Debug)]
pub struct KeyParent {
    /// Tenant of the consumer (required).
    #[arg(long, env = "APIM_TENANT", global = true)]
    pub tenant: Option<String>,
    /// Consumer owning the keys (required).
    #[arg(long, global = true)]
    pub consumer: Option<String>,
}

#[derive(Args, Debug)]
pub struct TokenParent {
    /// Tenant of the user; none for platform users.
    #[arg(long, global = true)]
    pub tenant: Option<String>,
    /// User owning the tokens (required).
    #[arg(long, global = true)]
    pub user: Option<String>,
}

fn required<'a>(v: &'a Option<String>, flag: &str) -> Result<&'a str, CliError> {
    v.as_deref()
        .ok_or_else(|| CliError::Usage(format!("{flag} is required")))
}

pub trait Parent {
    fn base(&self) -> Result<String, CliError>;
    fn secret_field(&self) -> &'static str;
}
impl Parent for KeyParent {
    fn base(&self) -> Result<String, CliError> {
        Ok(format!(
            "/admin/v1/tenants/{}/consumers/{}/keys",
            required(&self.tenant, "--tenant")?,
            required(&self.consumer, "--consumer")?
        ))
    }
    fn secret_field(&self) -> &'static str {
        "key"
    }
}
impl Parent for TokenParent {
    fn base(&self) -> Result<String, CliError> {
        let user = required(&self.user, "--user")?;
        Ok(match &self.tenant {
            Some(t) => format!("/admin/v1/tenants/{t}/users/{user}/tokens"),
            None => format!("/admin/v1/users/{user}/tokens"),
        })
    }
    fn secret_field(&self) -> &'static str {
        "token"
    }
}

#[derive(Args, Debug)]
pub struct CredentialCmd<P: Args> {
    #[command(flatten)]
    pub parent: P,
    #[command(subcommand)]
    pub action: CredAction,
}

#[derive(Subcommand, Debug)]
pub enum CredAction {
    List,
    /// Create a credential; its secret is printed once.
    Create {
        #[arg(long)]
        ttl_days: Option<u32>,
        /// RFC 3339 expiry instead of --ttl-days.
        #[arg(long)]
        expires_at: Option<String>,
        #[arg(long)]
        description: Option<String>,
    },
    Get {
        id: String,
    },
    /// Revoke a credential (it stays listed, refused from now on).
    Revoke {
        id: String,
    },
    Delete {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// Verify the whole hash chain and checkpoint signatures of the local segment files.
    Verify {
        /// Segment directory (default: <data-dir>/audit).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Trusted Ed25519 public key of the node (default: <data-dir>/pki/audit-signing.pub).
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// Also require the chain to reach the head the running node reports (`/status`), which
        /// detects records cut from the end of the newest segment.
        #[arg(long)]
        against_node: bool,
        /// Accept a directory without any record (a node that never recorded anything).
        #[arg(long)]
        allow_empty: bool,
    },
    /// List audit records, newest first.
    List {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        actor: Option<String>,
        #[arg(long)]
        action: Option<String>,
        #[arg(long)]
        resource_type: Option<String>,
        #[arg(long)]
        resource_id: Option<String>,
        /// RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        #[arg(long)]
        before: Option<u64>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

impl Cli {
    /// The data directory the CLI works with.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_DATA_DIR))
    }
}

// ---------------------------------------------------------------------------------------------
// Errors and exit codes

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{message}")]
    Api { status: u16, message: String },
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    AuditBroken(String),
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Api { status, .. } => match status {
                404 => 3,
                409 | 412 | 428 => 4,
                400 | 413 | 415 | 422 => 5,
                401 | 403 => 6,
                s if *s >= 500 => 7,
                _ => 1,
            },
            CliError::Unreachable(_) => 7,
            CliError::AuditBroken(_) => 8,
            CliError::Other(_) => 1,
        }
    }
}

type CResult<T> = Result<T, CliError>;

/// One line saying what the API refused and why, with the field or file position.
fn problem_message(status: StatusCode, body: &[u8], file: Option<&Path>) -> String {
    let Ok(p) = serde_json::from_slice::<Value>(body) else {
        return format!("{status}: {}", String::from_utf8_lossy(body).trim());
    };
    let title = p["title"].as_str().unwrap_or("error");
    let detail = p["detail"].as_str().unwrap_or("");
    let mut msg = format!("{} {title}: {detail}", status.as_u16());
    if let Some(first) = p["invalid-params"].as_array().and_then(|a| a.first()) {
        if let (Some(line), Some(f)) = (first["line"].as_u64(), file) {
            let col = first["column"].as_u64().unwrap_or(0);
            msg = format!(
                "{}:{line}:{col}: {}",
                f.display(),
                first["reason"].as_str().unwrap_or(detail)
            );
        }
    }
    if let Some(rid) = p["request_id"].as_str() {
        msg.push_str(&format!(" (request {rid})"));
    }
    msg
}

// ---------------------------------------------------------------------------------------------
// Client

pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

impl Client {
    pub fn new(cli: &Cli) -> CResult<Client> {
        crate::pki::install_crypto_provider();
        let base = cli
            .url
            .clone()
            .unwrap_or_else(|| "https://127.0.0.1:9443".into());
        let base = base.trim_end_matches('/').to_string();
        let token = match &cli.token {
            Some(t) => t.clone(),
            None => {
                let p = cli.data_dir().join(crate::node::TOKEN_FILE);
                read_trimmed(&p).ok_or_else(|| CliError::Api {
                    status: 401,
                    message: format!(
                        "no token: pass --token or set APIM_TOKEN, or run where {} is readable",
                        p.display()
                    ),
                })?
            }
        };
        let ca_path = cli.ca_cert.clone().unwrap_or_else(|| {
            cli.data_dir()
                .join(crate::node::PKI_DIR)
                .join(crate::node::CA_FILE)
        });
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(std::time::Duration::from_secs(60));
        if base.starts_with("https://") {
            let pem = std::fs::read(&ca_path).map_err(|e| {
                CliError::Usage(format!(
                    "cannot read the admin CA certificate {}: {e}; pass --ca-cert",
                    ca_path.display()
                ))
            })?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                CliError::Usage(format!(
                    "{} is not a PEM certificate: {e}",
                    ca_path.display()
                ))
            })?;
            builder = builder
                .tls_built_in_root_certs(false)
                .add_root_certificate(cert);
        }
        let http = builder.build().map_err(|e| CliError::Other(e.into()))?;
        Ok(Client { base, token, http })
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(Vec<u8>, &str)>,
        if_match: Option<u64>,
        file: Option<&Path>,
    ) -> CResult<(Value, reqwest::header::HeaderMap)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some((b, ct)) = body {
            req = req.header(reqwest::header::CONTENT_TYPE, ct).body(b);
        }
        if let Some(v) = if_match {
            req = req.header(reqwest::header::IF_MATCH, format!("\"{v}\""));
        }
        let resp = req.send().await.map_err(|e| {
            let mut src: Option<&dyn std::error::Error> = Some(&e);
            let mut chain = Vec::new();
            while let Some(s) = src {
                chain.push(s.to_string());
                src = s.source();
            }
            CliError::Unreachable(format!("cannot reach {}: {}", self.base, chain.join(": ")))
        })?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| CliError::Unreachable(format!("reading the answer failed: {e}")))?;
        if !status.is_success() {
            return Err(CliError::Api {
                status: status.as_u16(),
                message: problem_message(status, &bytes, file),
            });
        }
        let ct = headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let value = if bytes.is_empty() {
            Value::Null
        } else if ct.contains("json") {
            serde_json::from_slice(&bytes)
                .map_err(|e| CliError::Other(anyhow::anyhow!("invalid JSON answer: {e}")))?
        } else {
            Value::String(String::from_utf8_lossy(&bytes).to_string())
        };
        Ok((value, headers))
    }

    async fn get(&self, path: &str) -> CResult<Value> {
        Ok(self.call(Method::GET, path, None, None, None).await?.0)
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn columns(kind: &str) -> &'static [(&'static str, &'static str)] {
    match kind {
        "tenant" => &[
            ("NAME", "/name"),
            ("DISPLAY NAME", "/display_name"),
            ("VERSION", "/resource_version"),
            ("UPDATED", "/updated_at"),
        ],
        "api" => &[
            ("NAME", "/name"),
            ("API VERSION", "/version"),
            ("LIFECYCLE", "/lifecycle"),
            ("HOSTS", "/hosts"),
            ("BASE PATH", "/base_path"),
        ],
        "consumer" => &[
            ("NAME", "/name"),
            ("EMAIL", "/contact_email"),
            ("VERSION", "/resource_version"),
            ("UPDATED", "/updated_at"),
        ],
        "plan" => &[
            ("NAME", "/name"),
            ("REQUESTS", "/rate_limit/requests"),
            ("PER SECONDS", "/rate_limit/per_seconds"),
            ("QUOTA/DAY", "/quota/per_day"),
            ("QUOTA/MONTH", "/quota/per_month"),
        ],
        "subscription" => &[
            ("NAME", "/name"),
            ("CONSUMER", "/consumer"),
            ("API", "/api"),
            ("PLAN", "/plan"),
            ("STATUS", "/status"),
        ],
        "certificate" => &[
            ("NAME", "/name"),
            ("HOSTS", "/hosts"),
            ("NOT AFTER", "/not_after"),
            ("FINGERPRINT", "/fingerprint"),
        ],
        "user" => &[
            ("NAME", "/name"),
            ("ROLE", "/role"),
            ("TENANT", "/tenant"),
            ("DISABLED", "/disabled"),
        ],
        "key" => &[
            ("ID", "/name"),
            ("CONSUMER", "/consumer"),
            ("PREFIX", "/prefix"),
            ("EXPIRES", "/expires_at"),
            ("REVOKED", "/revoked"),
        ],
        "token" => &[
            ("ID", "/name"),
            ("USER", "/user"),
            ("PREFIX", "/prefix"),
            ("EXPIRES", "/expires_at"),
            ("REVOKED", "/revoked"),
        ],
        "usage" => &[
            ("CONSUMER", "/consumer"),
            ("API", "/api"),
            ("HOUR", "/hour"),
            ("REQUESTS", "/requests"),
            ("BYTES IN", "/bytes_in"),
            ("BYTES OUT", "/bytes_out"),
        ],
        "audit" => &[
            ("SEQ", "/seq"),
            ("TIME", "/time"),
            ("ACTOR", "/actor"),
            ("TENANT", "/tenant"),
            ("ACTION", "/action"),
            ("RESOURCE", "/resource_id"),
            ("OUTCOME", "/outcome"),
        ],
        _ => &[("NAME", "/name")],
    }
}

fn print_table(kind: &str, items: &[Value]) {
    let cols = columns(kind);
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|it| {
            cols.iter()
                .map(|(_, p)| cell(it.pointer(p).unwrap_or(&Value::Null)))
                .collect()
        })
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, (h, _))| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
                .max(h.len())
        })
        .collect();
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(cols.iter().map(|(h, _)| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn print_value(output: Output, v: &Value) {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Table => print!("{}", serde_norway::to_string(v).unwrap_or_default()),
    }
}

fn print_list(output: Output, kind: &str, page: &Value) {
    match output {
        Output::Json => print_value(output, page),
        Output::Table => {
            let items = page["items"].as_array().cloned().unwrap_or_default();
            print_table(kind, &items);
            if let Some(next) = page["next_offset"].as_u64() {
                eprintln!(
                    "({} of {}; more with --offset {next})",
                    items.len(),
                    page["total"]
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Commands

fn read_structured(path: &Path) -> CResult<Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
    serde_norway::from_str::<Value>(&text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!(":{}:{}", l.line(), l.column()))
            .unwrap_or_default();
        CliError::Api {
            status: 422,
            message: format!("{}{at}: {e}", path.display()),
        }
    })
}

fn apply_sets(target: &mut Value, sets: &[String]) -> CResult<()> {
    if !target.is_object() {
        return Err(CliError::Usage(
            "the object must be a mapping of fields".into(),
        ));
    }
    for s in sets {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| CliError::Usage(format!("--set {s:?}: expected field=value")))?;
        let value = match v.strip_prefix('@') {
            // `field=@path`: the file's text (PEM certificates, keys, JWKS documents)
            Some(path) => Value::String(std::fs::read_to_string(path).map_err(|e| {
                CliError::Usage(format!("--set {k}=@{path}: cannot read the file: {e}"))
            })?),
            None => {
                serde_json::from_str::<Value>(v).unwrap_or_else(|_| Value::String(v.to_string()))
            }
        };
        let mut cur = &mut *target;
        let parts: Vec<&str> = k.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let Some(map) = cur.as_object_mut() else {
                return Err(CliError::Usage(format!(
                    "--set {k}: {part} is not inside an object"
                )));
            };
            if i + 1 == parts.len() {
                map.insert(part.to_string(), value.clone());
                break;
            }
            cur = map
                .entry(part.to_string())
                .or_insert_with(|| Value::Object(Default::default()));
        }
    }
    Ok(())
}

fn collection_path(kind: &str, tenant: Option<&str>) -> CResult<String> {
    let seg = match kind {
        "tenant" => return Ok("/admin/v1/tenants".into()),
        "api" => "apis",
        "consumer" => "consumers",
        "plan" => "plans",
        "subscription" => "subscriptions",
        "certificate" => "certificates",
        "user" => match tenant {
            None => return Ok("/admin/v1/users".into()),
            Some(_) => "users",
        },
        other => return Err(CliError::Usage(format!("unknown kind {other}"))),
    };
    let t = tenant.ok_or_else(|| CliError::Usage("--tenant is required".into()))?;
    Ok(format!("/admin/v1/tenants/{t}/{seg}"))
}

fn query(pairs: &[(&str, String)]) -> String {
    let s = serde_urlencoded::to_string(pairs).unwrap_or_default();
    if s.is_empty() {
        s
    } else {
        format!("?{s}")
    }
}

async fn object_cmd(
    client: &Client,
    out: Output,
    kind: &str,
    tenant: Option<&str>,
    action: &ObjectCmd,
) -> CResult<()> {
    let base = collection_path(kind, tenant)?;
    match action {
        ObjectCmd::List {
            filters,
            sort,
            limit,
            offset,
        } => {
            let mut q: Vec<(&str, String)> =
                vec![("limit", limit.to_string()), ("offset", offset.to_string())];
            if let Some(s) = sort {
                q.push(("sort", s.clone()));
            }
            let mut owned = Vec::new();
            for f in filters {
                let (k, v) = f.split_once('=').ok_or_else(|| {
                    CliError::Usage(format!("--filter {f:?}: expected field=value"))
                })?;
                owned.push((k.to_string(), v.to_string()));
            }
            let mut q2: Vec<(&str, String)> =
                owned.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            q.append(&mut q2);
            let page = client.get(&format!("{base}{}", query(&q))).await?;
            print_list(out, kind, &page);
        }
        ObjectCmd::Get { name } => {
            let v = client.get(&format!("{base}/{name}")).await?;
            print_value(out, &v);
        }
        ObjectCmd::Create { name, file, sets } => {
            let mut body = match file {
                Some(f) => read_structured(f)?,
                None => Value::Object(Default::default()),
            };
            if let Some(n) = name {
                apply_sets(
                    &mut body,
                    &[format!(
                        "name={}",
                        serde_json::to_string(n).unwrap_or_default()
                    )],
                )?;
            }
            apply_sets(&mut body, sets)?;
            let bytes = serde_json::to_vec(&body).map_err(|e| CliError::Other(e.into()))?;
            let (v, _) = client
                .call(
                    Method::POST,
                    &base,
                    Some((bytes, "application/json")),
                    None,
                    file.as_deref(),
                )
                .await?;
            match out {
                Output::Json => print_value(out, &v),
                Output::Table => println!(
                    "{kind} {} created (version {})",
                    cell(&v["name"]),
                    cell(&v["resource_version"])
                ),
            }
        }
        ObjectCmd::Update {
            name,
            file,
            sets,
            if_version,
        } => {
            let path = format!("{base}/{name}");
            let (mut body, version) = match file {
                Some(f) => {
                    let b = read_structured(f)?;
                    let v = b["resource_version"].as_u64();
                    (b, v)
                }
                None => {
                    let cur = client.get(&path).await?;
                    let v = cur["resource_version"].as_u64();
                    (cur, v)
                }
            };
            let version = match (*if_version, version) {
                (Some(v), _) | (None, Some(v)) => v,
                (None, None) => client.get(&path).await?["resource_version"]
                    .as_u64()
                    .unwrap_or(0),
            };
            apply_sets(&mut body, sets)?;
            let bytes = serde_json::to_vec(&body).map_err(|e| CliError::Other(e.into()))?;
            let (v, _) = client
                .call(
                    Method::PUT,
                    &path,
                    Some((bytes, "application/json")),
                    Some(version),
                    file.as_deref(),
                )
                .await?;
            match out {
                Output::Json => print_value(out, &v),
                Output::Table => {
                    println!(
                        "{kind} {name} updated (version {})",
                        cell(&v["resource_version"])
                    )
                }
            }
        }
        ObjectCmd::Delete { name, if_version } => {
            client
                .call(
                    Method::DELETE,
                    &format!("{base}/{name}"),
                    None,
                    *if_version,
                    None,
                )
                .await?;
            if out == Output::Table {
                println!("{kind} {name} deleted");
            }
        }
    }
    Ok(())
}

async fn credential_cmd(
    client: &Client,
    out: Output,
    kind: &str,
    parent: &dyn Parent,
    action: &CredAction,
) -> CResult<()> {
    let base = parent.base()?;
    match action {
        CredAction::List => {
            let page = client.get(&base).await?;
            print_list(out, kind, &page);
        }
        CredAction::Create {
            ttl_days,
            expires_at,
            description,
        } => {
            let body = serde_json::json!({ "ttl_days": ttl_days, "expires_at": expires_at, "description": description });
            let mut body = body;
            if let Some(m) = body.as_object_mut() {
                m.retain(|_, v| !v.is_null());
            }
            let bytes = serde_json::to_vec(&body).map_err(|e| CliError::Other(e.into()))?;
            let (v, _) = client
                .call(
                    Method::POST,
                    &base,
                    Some((bytes, "application/json")),
                    None,
                    None,
                )
                .await?;
            match out {
                Output::Json => print_value(out, &v),
                Output::Table => {
                    println!(
                        "{kind} {} created, expires {}",
                        cell(&v["name"]),
                        cell(&v["expires_at"])
                    );
                    println!(
                        "{}: {}",
                        parent.secret_field(),
                        cell(&v[parent.secret_field()])
                    );
                    eprintln!("(this secret is shown once; store it now)");
                }
            }
        }
        CredAction::Get { id } => {
            let v = client.get(&format!("{base}/{id}")).await?;
            print_value(out, &v);
        }
        CredAction::Revoke { id } => {
            let path = format!("{base}/{id}");
            let cur = client.get(&path).await?;
            let version = cur["resource_version"].as_u64();
            let bytes = br#"{"revoked": true}"#.to_vec();
            let (v, _) = client
                .call(
                    Method::PUT,
                    &path,
                    Some((bytes, "application/json")),
                    version,
                    None,
                )
                .await?;
            match out {
                Output::Json => print_value(out, &v),
                Output::Table => println!("{kind} {id} revoked"),
            }
        }
        CredAction::Delete { id } => {
            client
                .call(Method::DELETE, &format!("{base}/{id}"), None, None, None)
                .await?;
            if out == Output::Table {
                println!("{kind} {id} deleted");
            }
        }
    }
    Ok(())
}

fn document_tenant(file: &Path) -> CResult<(Vec<u8>, String)> {
    let bytes = std::fs::read(file)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", file.display())))?;
    let v: Value = serde_norway::from_slice(&bytes).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!(":{}:{}", l.line(), l.column()))
            .unwrap_or_default();
        CliError::Api {
            status: 422,
            message: format!("{}{at}: {e}", file.display()),
        }
    })?;
    let tenant = v["tenant"].as_str().ok_or_else(|| CliError::Api {
        status: 422,
        message: format!("{}: the document has no `tenant` field", file.display()),
    })?;
    Ok((bytes, tenant.to_string()))
}

fn print_diff(v: &Value) {
    for (sign, key) in [("+", "create"), ("~", "update"), ("-", "delete")] {
        for item in v[key].as_array().cloned().unwrap_or_default() {
            println!("{sign} {}", cell(&item));
        }
    }
}

async fn audit_verify(
    cli: &Cli,
    dir: &Option<PathBuf>,
    public_key: &Option<PathBuf>,
    against_node: bool,
    allow_empty: bool,
    out: Output,
) -> CResult<()> {
    let expected = if against_node {
        let status = Client::new(cli)?.get("/admin/v1/status").await?;
        let seq = status["audit"]["records"].as_u64();
        let hash = status["audit"]["head"]
            .as_str()
            .and_then(|h| hex::decode(h).ok())
            .and_then(|h| <[u8; 32]>::try_from(h).ok());
        match (seq, hash) {
            (Some(0), _) => None,
            (Some(s), Some(h)) => Some((s, h)),
            _ => {
                return Err(CliError::Other(anyhow::anyhow!(
                    "the node's status carries no audit head"
                )))
            }
        }
    } else {
        None
    };
    let dir = dir
        .clone()
        .unwrap_or_else(|| cli.data_dir().join(crate::node::AUDIT_DIR));
    let key_path = public_key.clone().unwrap_or_else(|| {
        cli.data_dir()
            .join(crate::node::PKI_DIR)
            .join(crate::node::AUDIT_PUB_FILE)
    });
    let key = crate::audit::read_public_key(&key_path).map_err(|e| {
        CliError::Usage(format!(
            "cannot read the audit public key {}: {e}",
            key_path.display()
        ))
    })?;
    match crate::audit::verify_with(&dir, &[key.as_slice()], expected) {
        Ok(r) if r.records == 0 && !allow_empty => Err(CliError::AuditBroken(format!(
            "audit log verification FAILED: no audit record in {} (every segment is missing, or \
             the directory is wrong; --allow-empty accepts a node that never recorded anything)",
            dir.display()
        ))),
        Ok(r) => {
            match out {
                Output::Json => print_value(out, &serde_json::json!({
                    "ok": true, "segments": r.segments, "records": r.records,
                    "checkpoints": r.checkpoints, "head_seq": r.head_seq, "head_hash": hex::encode(r.head_hash),
                })),
                Output::Table => println!(
                    "audit log OK: {} records in {} segments, {} signed checkpoints; head seq {} hash {}",
                    r.records, r.segments, r.checkpoints, r.head_seq, hex::encode(r.head_hash)
                ),
            }
            Ok(())
        }
        Err(f) => Err(CliError::AuditBroken(format!(
            "audit log verification FAILED: {f}"
        ))),
    }
}

/// Runs every command but `serve`.
pub async fn run(cli: Cli) -> CResult<()> {
    let out = cli.output;
    if let Command::Audit {
        command:
            AuditCmd::Verify {
                dir,
                public_key,
                against_node,
                allow_empty,
            },
    } = &cli.command
    {
        return audit_verify(&cli, dir, public_key, *against_node, *allow_empty, out).await;
    }
    let client = Client::new(&cli)?;
    match &cli.command {
        Command::Serve { .. }
        | Command::Audit {
            command: AuditCmd::Verify { .. },
        } => Ok(()),
        Command::Status => {
            let v = client.get("/admin/v1/status").await?;
            match out {
                Output::Json => print_value(out, &v),
                Output::Table => {
                    println!("status:      {}", cell(&v["status"]));
                    println!("version:     {}", cell(&v["version"]));
                    println!(
                        "node:        {} ({}), leader {}",
                        cell(&v["raft"]["node_id"]),
                        cell(&v["raft"]["state"]),
                        cell(&v["raft"]["leader"])
                    );
                    println!(
                        "raft:        term {}, last log {}, applied {}, snapshot {}",
                        cell(&v["raft"]["term"]),
                        cell(&v["raft"]["last_log_index"]),
                        cell(&v["raft"]["last_applied"]),
                        cell(&v["raft"]["snapshot"])
                    );
                    println!(
                        "audit:       {} records, head {}",
                        cell(&v["audit"]["records"]),
                        cell(&v["audit"]["head"])
                    );
                    println!("uptime:      {} s", cell(&v["uptime_seconds"]));
                    println!(
                        "you:         {} ({})",
                        cell(&v["you"]["user"]),
                        cell(&v["you"]["role"])
                    );
                }
            }
            if v["status"] != "healthy" {
                return Err(CliError::Unreachable(format!(
                    "node is {}",
                    cell(&v["status"])
                )));
            }
            Ok(())
        }
        Command::Tenant(s) => object_cmd(&client, out, "tenant", s.scope.tenant(), &s.action).await,
        Command::Api(s) => object_cmd(&client, out, "api", s.scope.tenant(), &s.action).await,
        Command::Consumer(s) => {
            object_cmd(&client, out, "consumer", s.scope.tenant(), &s.action).await
        }
        Command::Plan(s) => object_cmd(&client, out, "plan", s.scope.tenant(), &s.action).await,
        Command::Usage {
            tenant,
            consumer,
            from,
            to,
        } => {
            let mut q: Vec<(&str, String)> = Vec::new();
            for (k, v) in [("consumer", consumer), ("from", from), ("to", to)] {
                if let Some(v) = v {
                    q.push((k, v.clone()));
                }
            }
            let page = client
                .get(&format!("/admin/v1/tenants/{tenant}/usage{}", query(&q)))
                .await?;
            match out {
                Output::Json => print_value(out, &page),
                Output::Table => {
                    print_table(
                        "usage",
                        page["items"].as_array().map(Vec::as_slice).unwrap_or(&[]),
                    );
                    let t = &page["totals"];
                    println!(
                        "total: {} requests, {} bytes in, {} bytes out",
                        t["requests"], t["bytes_in"], t["bytes_out"]
                    );
                }
            }
            Ok(())
        }
        Command::Certificate(s) => {
            object_cmd(&client, out, "certificate", s.scope.tenant(), &s.action).await
        }
        Command::Subscription(s) => {
            object_cmd(&client, out, "subscription", s.scope.tenant(), &s.action).await
        }
        Command::User(s) => object_cmd(&client, out, "user", s.scope.tenant(), &s.action).await,
        Command::Key(c) => credential_cmd(&client, out, "key", &c.parent, &c.action).await,
        Command::Token(c) => credential_cmd(&client, out, "token", &c.parent, &c.action).await,
        Command::Audit {
            command:
                AuditCmd::List {
                    tenant,
                    actor,
                    action,
                    resource_type,
                    resource_id,
                    since,
                    until,
                    before,
                    limit,
                },
        } => {
            let mut q: Vec<(&str, String)> = vec![("limit", limit.to_string())];
            for (k, v) in [
                ("tenant", tenant),
                ("actor", actor),
                ("action", action),
                ("resource_type", resource_type),
                ("resource_id", resource_id),
                ("since", since),
                ("until", until),
            ] {
                if let Some(v) = v {
                    q.push((k, v.clone()));
                }
            }
            if let Some(b) = before {
                q.push(("before", b.to_string()));
            }
            let page = client.get(&format!("/admin/v1/audit{}", query(&q))).await?;
            match out {
                Output::Json => print_value(out, &page),
                Output::Table => {
                    print_table(
                        "audit",
                        page["items"].as_array().map(Vec::as_slice).unwrap_or(&[]),
                    );
                    if let Some(n) = page["next_before"].as_u64() {
                        eprintln!("(more with --before {n})");
                    }
                }
            }
            Ok(())
        }
        Command::Export { tenant, file } => {
            let (v, _) = client
                .call(
                    Method::GET,
                    &format!("/admin/v1/tenants/{tenant}/export?format=yaml"),
                    None,
                    None,
                    None,
                )
                .await?;
            let mut text = match &v {
                Value::String(s) => s.clone(),
                other => serde_norway::to_string(other).unwrap_or_default(),
            };
            if !text.ends_with('\n') {
                text.push('\n');
            }
            match file {
                Some(f) => std::fs::write(f, text)
                    .with_context(|| format!("cannot write {}", f.display()))?,
                None => print!("{text}"),
            }
            Ok(())
        }
        Command::Diff { file } | Command::Apply { file } => {
            let apply = matches!(cli.command, Command::Apply { .. });
            let (bytes, tenant) = document_tenant(file)?;
            let verb = if apply { "apply" } else { "diff" };
            let (v, _) = client
                .call(
                    Method::POST,
                    &format!("/admin/v1/tenants/{tenant}/{verb}"),
                    Some((bytes, "application/yaml")),
                    None,
                    Some(file),
                )
                .await?;
            match out {
                Output::Json => print_value(out, &v),
                Output::Table => {
                    print_diff(&v);
                    let n = |k: &str| v[k].as_array().map(Vec::len).unwrap_or(0);
                    let summary = format!(
                        "{} to create, {} to change, {} to delete, {} unchanged",
                        n("create"),
                        n("update"),
                        n("delete"),
                        cell(&v["unchanged"])
                    );
                    if apply && v["applied"] == true {
                        println!(
                            "applied to tenant {tenant}: revision {} ({summary})",
                            cell(&v["revision"])
                        );
                    } else if apply {
                        println!(
                            "tenant {tenant} already matches the document (revision {})",
                            cell(&v["revision"])
                        );
                    } else {
                        println!("{summary}");
                    }
                }
            }
            Ok(())
        }
    }
}
