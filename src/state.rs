//! The replicated state machine: the `Command`s that travel through Raft, the deterministic
//! `apply()` that turns one into state changes plus audit records, and read-side queries.
//!
//! Architecture invariant: no clock, no randomness, no IO of its own. Time, ids and generated
//! secrets' hashes arrive inside the command; state is read and written through [`KvRead`] and
//! the returned write set, so the same log gives the same state and the same audit chain on
//! every node. A rejected command (stale version, missing reference) changes nothing and
//! produces no audit record.

use crate::audit::{self, Outcome as AuditOutcome, Record, Sealed};
use crate::model::{Kind, Object, ObjectMeta, Role, Spec};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// Error of the underlying store (IO, corruption). Not a business outcome.
#[derive(Debug, thiserror::Error)]
#[error("state store: {0}")]
pub struct StoreError(pub String);

impl StoreError {
    pub fn msg(m: impl std::fmt::Display) -> Self {
        StoreError(m.to_string())
    }
}

/// Read access to the state key space.
pub trait KvRead {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// The first `limit` entries with `from <= key < to`, in key order.
    fn scan_range(
        &self,
        from: &str,
        to: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// All entries whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.scan_range(prefix, &prefix_end(prefix), usize::MAX)
    }
}

/// The first key past every key that starts with `prefix`: its last character incremented
/// (`u/acme/` gives `u/acme0`). Exact for the state's keys, which are ASCII; an empty prefix
/// gives U+10FFFF, past every key that does not start with that character.
pub fn prefix_end(prefix: &str) -> String {
    let mut end = prefix.to_string();
    while let Some(last) = end.pop() {
        let next = match last {
            '\u{D7FF}' => Some('\u{E000}'),
            c => char::from_u32(u32::from(c) + 1),
        };
        if let Some(next) = next {
            end.push(next);
            return end;
        }
    }
    char::MAX.to_string()
}

/// Who asked for a change, when, and from where. Filled by the admin API, replicated as is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Context {
    /// RFC 3339 UTC time the leader received the request.
    pub time: String,
    pub actor: String,
    /// Id of the credential the actor authenticated with (absent for system commands).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    pub role: String,
    pub request_id: String,
    pub source: String,
}

/// One change to one object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Create(Spec),
    /// Replace the spec; refused unless the stored version is `if_version`.
    Update {
        spec: Spec,
        if_version: u64,
    },
    /// Refused unless the stored version is `if_version` (when given).
    Delete {
        kind: Kind,
        name: String,
        if_version: Option<u64>,
    },
}

/// A refused access, aggregated per (source, principal, status, tenant) over a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecurityEvent {
    pub source: String,
    pub principal: String,
    pub status: u16,
    pub reason: String,
    pub tenant: Option<String>,
    pub count: u64,
    pub first_seen: String,
    pub last_seen: String,
    pub sample_path: String,
}

/// Everything that goes through the Raft log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// First start of a node: the bootstrap platform admin and its token. Refused if any
    /// platform user exists.
    Bootstrap {
        ctx: Context,
        user: Box<Spec>,
        token: Box<Spec>,
    },
    /// Changes to one scope (a tenant, or the platform scope when `tenant` is `None`), applied
    /// all or nothing. `action` names the request (`api.create`, `apply`, …).
    Mutate {
        ctx: Context,
        tenant: Option<String>,
        action: String,
        changes: Vec<Change>,
    },
    /// Aggregated refusals (401, 403, 404 outside the caller's tenant), audited as security events.
    SecurityEvents {
        ctx: Context,
        events: Vec<SecurityEvent>,
    },
    /// Usage metered by a gateway, added to the stored hourly counters (metering, not a change
    /// of configuration: not audited).
    /// A batch carries its node and a sequence number that grows per node: a batch retried
    /// after an ambiguous failure (it may have been committed) is applied once.
    RecordUsage {
        /// 0 (and `batch` 0) in entries written before batches were numbered: applied as is.
        #[serde(default)]
        node: u64,
        #[serde(default)]
        batch: u64,
        entries: Vec<UsageEntry>,
    },
}

/// Requests and bytes of one consumer on one API during one UTC hour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UsageEntry {
    pub tenant: String,
    pub consumer: String,
    pub api: String,
    /// Start of the hour, in hours since the Unix epoch.
    pub hour: i64,
    #[serde(flatten)]
    pub counts: UsageCounts,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UsageCounts {
    pub requests: u64,
    /// Request body bytes received from the consumer.
    pub bytes_in: u64,
    /// Response body bytes sent to the consumer.
    pub bytes_out: u64,
}

impl UsageCounts {
    pub fn add(&mut self, other: &UsageCounts) {
        self.requests = self.requests.saturating_add(other.requests);
        self.bytes_in = self.bytes_in.saturating_add(other.bytes_in);
        self.bytes_out = self.bytes_out.saturating_add(other.bytes_out);
    }
}

/// Key of the last usage batch applied from a node.
pub fn usage_batch_key(node: u64) -> String {
    format!("m/usage_batch/{node}")
}

/// The last usage batch applied from `node` (0 when none).
pub fn last_usage_batch(kv: &dyn KvRead, node: u64) -> Result<u64, StoreError> {
    Ok(match kv.get(&usage_batch_key(node))? {
        Some(v) => serde_json::from_slice(&v).unwrap_or(0),
        None => 0,
    })
}

/// The last usage batch applied from every node that wrote one.
pub fn usage_batches(kv: &dyn KvRead) -> Result<HashMap<u64, u64>, StoreError> {
    let prefix = "m/usage_batch/";
    let mut out = HashMap::new();
    for (key, value) in kv.scan_prefix(prefix)? {
        if let Ok(node) = key[prefix.len()..].parse::<u64>() {
            out.insert(node, serde_json::from_slice(&value).unwrap_or(0));
        }
    }
    Ok(out)
}

/// The usage counters of every tenant from hour `from` on (the tenants found by skipping from
/// one to the next, each read as [`usage`] reads it).
pub fn usage_since(kv: &dyn KvRead, from: i64) -> Result<Vec<UsageEntry>, StoreError> {
    let (prefix, end) = ("u/", prefix_end("u/"));
    let mut out = Vec::new();
    let mut cursor = prefix.to_string();
    while let Some((key, _)) = kv.scan_range(&cursor, &end, 1)?.pop() {
        let Some(tenant) = key[prefix.len()..].split('/').next() else {
            break;
        };
        out.extend(usage(kv, tenant, None, (from, i64::MAX))?);
        cursor = prefix_end(&format!("{prefix}{tenant}/"));
    }
    Ok(out)
}

/// Key of a usage counter: `u/{tenant}/{consumer}/{hour, 10 digits}/{api}` (a consumer's hours
/// sort in time order).
pub fn usage_key(tenant: &str, consumer: &str, hour: i64, api: &str) -> String {
    format!("u/{tenant}/{consumer}/{:010}/{api}", hour.max(0))
}

/// The usage counters of a tenant, optionally of one consumer, between two hours (inclusive).
/// Reads only the counters of those hours: one range per consumer (a consumer's hours sort in
/// time order), the consumers found by skipping from one to the next, so a query costs the
/// consumers and the counters it returns, not the tenant's history.
pub fn usage(
    kv: &dyn KvRead,
    tenant: &str,
    consumer: Option<&str>,
    hours: (i64, i64),
) -> Result<Vec<UsageEntry>, StoreError> {
    let mut out = Vec::new();
    if hours.1 < hours.0 || hours.1 < 0 {
        return Ok(out);
    }
    let prefix = format!("u/{tenant}/");
    let end = prefix_end(&prefix);
    let next_consumer = |cursor: &str| -> Result<Option<String>, StoreError> {
        if let Some(c) = consumer {
            return Ok((cursor == prefix).then(|| c.to_string()));
        }
        Ok(kv.scan_range(cursor, &end, 1)?.first().and_then(|(k, _)| {
            k.strip_prefix(&prefix)
                .and_then(|rest| rest.split('/').next())
                .map(str::to_string)
        }))
    };
    let mut cursor = prefix.clone();
    while let Some(c) = next_consumer(&cursor)? {
        let from = format!("{prefix}{c}/{:010}", hours.0.max(0));
        let to = format!("{prefix}{c}/{:010}", hours.1.saturating_add(1));
        for (key, value) in kv.scan_range(&from, &to, usize::MAX)? {
            let mut parts = key.splitn(5, '/').skip(3);
            let (Some(h), Some(api)) = (parts.next(), parts.next()) else {
                continue;
            };
            let Ok(hour) = h.parse::<i64>() else { continue };
            let counts: UsageCounts = serde_json::from_slice(&value).unwrap_or_default();
            out.push(UsageEntry {
                tenant: tenant.to_string(),
                consumer: c.clone(),
                api: api.to_string(),
                hour,
                counts,
            });
        }
        // past every key of this consumer
        cursor = prefix_end(&format!("{prefix}{c}/"));
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    NotFound,
    Conflict,
    PreconditionFailed,
    Invalid,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rejection {
    pub code: RejectCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

fn reject(code: RejectCode, message: impl Into<String>) -> Rejection {
    Rejection {
        code,
        message: message.into(),
        field: None,
    }
}

/// The result of a command, returned to the client that proposed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Done {
        /// The objects as they are after the change (deleted ones omitted).
        objects: Vec<Object>,
        /// The scope's revision after the change.
        revision: u64,
        audit_seqs: Vec<u64>,
    },
    Rejected(Rejection),
    /// Entries without a command (Raft blank and membership entries).
    Noop,
}

/// What applying one command produced: the response, the key writes (`None` = delete) and the
/// sealed audit records. The caller persists writes and records in one transaction.
#[derive(Debug, Default)]
pub struct Applied {
    pub response: Option<Response>,
    pub writes: BTreeMap<String, Option<Vec<u8>>>,
    pub audit: Vec<Sealed>,
}

// ---------------------------------------------------------------------------------------------
// Key layout.

pub const AUDIT_HEAD_KEY: &str = "m/audit_head";
const PLATFORM: &str = "_";

pub fn object_key(kind: Kind, tenant: Option<&str>, name: &str) -> String {
    format!(
        "o/{}/{}/{}",
        kind.as_str(),
        tenant.unwrap_or(PLATFORM),
        name
    )
}

pub fn object_prefix(kind: Kind, tenant: Option<&str>) -> String {
    format!("o/{}/{}/", kind.as_str(), tenant.unwrap_or(PLATFORM))
}

fn revision_key(tenant: Option<&str>) -> String {
    format!("r/{}", tenant.unwrap_or(PLATFORM))
}

fn key_hash_index(hash: &str) -> String {
    format!("i/key/{hash}")
}

fn token_hash_index(hash: &str) -> String {
    format!("i/token/{hash}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHead {
    pub seq: u64,
    #[serde(with = "hex32")]
    pub hash: [u8; 32],
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let v = hex::decode(s).map_err(serde::de::Error::custom)?;
        v.try_into()
            .map_err(|_| serde::de::Error::custom("expected 32 bytes"))
    }
}

pub fn audit_head(kv: &dyn KvRead) -> Result<AuditHead, StoreError> {
    match kv.get(AUDIT_HEAD_KEY)? {
        Some(b) => serde_json::from_slice(&b).map_err(StoreError::msg),
        None => Ok(AuditHead {
            seq: 0,
            hash: audit::GENESIS_HASH,
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Staged view: reads see the command's own writes; nothing reaches the store unless the whole
// command succeeds.

struct Staged<'a> {
    base: &'a dyn KvRead,
    writes: BTreeMap<String, Option<Vec<u8>>>,
}

impl Staged<'_> {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self.writes.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.base.get(key),
        }
    }

    fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut merged: BTreeMap<String, Vec<u8>> =
            self.base.scan_prefix(prefix)?.into_iter().collect();
        for (k, v) in self.writes.range(prefix.to_string()..) {
            if !k.starts_with(prefix) {
                break;
            }
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        Ok(merged.into_iter().collect())
    }

    fn put_json<T: Serialize>(&mut self, key: String, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(StoreError::msg)?;
        self.writes.insert(key, Some(bytes));
        Ok(())
    }

    fn delete(&mut self, key: String) {
        self.writes.insert(key, None);
    }

    fn object(
        &self,
        kind: Kind,
        tenant: Option<&str>,
        name: &str,
    ) -> Result<Option<Object>, StoreError> {
        decode_object(self.get(&object_key(kind, tenant, name))?)
    }

    fn objects(&self, kind: Kind, tenant: Option<&str>) -> Result<Vec<Object>, StoreError> {
        self.scan_prefix(&object_prefix(kind, tenant))?
            .into_iter()
            .map(|(_, v)| serde_json::from_slice(&v).map_err(StoreError::msg))
            .collect()
    }
}

fn decode_object(bytes: Option<Vec<u8>>) -> Result<Option<Object>, StoreError> {
    bytes
        .map(|b| serde_json::from_slice(&b).map_err(StoreError::msg))
        .transpose()
}

// ---------------------------------------------------------------------------------------------
// apply

/// An audit record before it gets its place in the chain.
struct PendingRecord {
    ctx: Context,
    tenant: Option<String>,
    actor: String,
    role: String,
    action: String,
    resource_type: String,
    resource_id: String,
    outcome: AuditOutcome,
    source: String,
    digest: String,
    detail: Option<serde_json::Value>,
}

impl PendingRecord {
    fn for_change(
        ctx: &Context,
        tenant: Option<&str>,
        action: String,
        kind: Kind,
        name: &str,
        digest: String,
    ) -> Self {
        PendingRecord {
            ctx: ctx.clone(),
            tenant: tenant.map(str::to_string),
            actor: ctx.actor.clone(),
            role: ctx.role.clone(),
            action,
            resource_type: kind.as_str().to_string(),
            resource_id: name.to_string(),
            outcome: AuditOutcome::Success,
            source: ctx.source.clone(),
            digest,
            detail: None,
        }
    }

    fn into_record(self, seq: u64) -> Record {
        Record {
            seq,
            time: self.ctx.time,
            actor: self.actor,
            credential: self.ctx.credential.clone(),
            role: self.role,
            tenant: self.tenant,
            action: self.action,
            resource_type: self.resource_type,
            resource_id: self.resource_id,
            outcome: self.outcome,
            request_id: self.ctx.request_id,
            source: self.source,
            digest: self.digest,
            detail: self.detail,
        }
    }
}

/// Hex SHA-256 of a JSON value's serialisation: the audit digest of a change. Secrets never reach
/// it: specs go through [`Spec::public_json`] first.
pub fn digest_json(v: &serde_json::Value) -> String {
    hex::encode(audit::sha256(&serde_json::to_vec(v).unwrap_or_default()))
}

fn change_digest(
    action: &str,
    kind: Kind,
    tenant: Option<&str>,
    name: &str,
    spec: Option<&Spec>,
    version: u64,
) -> String {
    digest_json(&serde_json::json!({
        "action": action,
        "kind": kind.as_str(),
        "tenant": tenant,
        "name": name,
        "version": version,
        "spec": spec.map(Spec::public_json),
    }))
}

type Outcome = Result<(Vec<Object>, u64), Rejection>;

/// Applies one command at log index `log_index` on top of `base`.
pub fn apply(base: &dyn KvRead, log_index: u64, cmd: &Command) -> Result<Applied, StoreError> {
    let mut st = Staged {
        base,
        writes: BTreeMap::new(),
    };
    let mut pending = Vec::new();
    if let Command::RecordUsage {
        node,
        batch,
        entries,
    } = cmd
    {
        let seen = usage_batch_key(*node);
        let last: u64 = match st.base.get(&seen)? {
            Some(v) => serde_json::from_slice(&v).unwrap_or(0),
            None => 0,
        };
        if *batch != 0 && *batch <= last {
            return Ok(Applied {
                response: Some(Response::Noop),
                writes: BTreeMap::new(),
                audit: Vec::new(),
            });
        }
        if *batch != 0 {
            st.put_json(seen, batch)?;
        }
        for e in entries {
            let key = usage_key(&e.tenant, &e.consumer, e.hour, &e.api);
            let mut counts: UsageCounts = match st.base.get(&key)? {
                Some(v) => serde_json::from_slice(&v).unwrap_or_default(),
                None => UsageCounts::default(),
            };
            if let Some(Some(staged)) = st.writes.get(&key) {
                counts = serde_json::from_slice(staged).unwrap_or_default();
            }
            counts.add(&e.counts);
            st.put_json(key, &counts)?;
        }
        return Ok(Applied {
            response: Some(Response::Noop),
            writes: st.writes,
            audit: Vec::new(),
        });
    }
    let outcome = match cmd {
        Command::Bootstrap { ctx, user, token } => {
            bootstrap(&mut st, log_index, ctx, user, token, &mut pending)?
        }
        Command::Mutate {
            ctx,
            tenant,
            action,
            changes,
        } => mutate(
            &mut st,
            log_index,
            ctx,
            tenant.as_deref(),
            action,
            changes,
            &mut pending,
        )?,
        Command::RecordUsage { .. } => Ok((Vec::new(), 0)),
        Command::SecurityEvents { ctx, events } => {
            for ev in events {
                pending.push(PendingRecord {
                    ctx: ctx.clone(),
                    tenant: ev.tenant.clone(),
                    actor: ev.principal.clone(),
                    role: String::new(),
                    action: if ev.status == 401 {
                        "auth.denied"
                    } else {
                        "authz.denied"
                    }
                    .into(),
                    resource_type: "request".into(),
                    resource_id: ev.sample_path.clone(),
                    outcome: AuditOutcome::Denied,
                    source: ev.source.clone(),
                    digest: digest_json(&serde_json::to_value(ev).unwrap_or_default()),
                    detail: Some(serde_json::json!({
                        "status": ev.status,
                        "reason": ev.reason,
                        "count": ev.count,
                        "first_seen": ev.first_seen,
                        "last_seen": ev.last_seen,
                    })),
                });
            }
            Ok((Vec::new(), 0))
        }
    };
    match outcome {
        Ok((objects, revision)) => {
            let mut head = audit_head(base)?;
            let mut sealed = Vec::with_capacity(pending.len());
            for p in pending {
                let s = audit::seal(head.hash, p.into_record(head.seq + 1));
                head = AuditHead {
                    seq: s.record.seq,
                    hash: s.hash,
                };
                sealed.push(s);
            }
            st.put_json(AUDIT_HEAD_KEY.to_string(), &head)?;
            Ok(Applied {
                response: Some(Response::Done {
                    objects,
                    revision,
                    audit_seqs: sealed.iter().map(|s| s.record.seq).collect(),
                }),
                writes: st.writes,
                audit: sealed,
            })
        }
        Err(rejection) => Ok(Applied {
            response: Some(Response::Rejected(rejection)),
            writes: BTreeMap::new(),
            audit: Vec::new(),
        }),
    }
}

fn bootstrap(
    st: &mut Staged,
    log_index: u64,
    ctx: &Context,
    user: &Spec,
    token: &Spec,
    pending: &mut Vec<PendingRecord>,
) -> Result<Outcome, StoreError> {
    let admins = st.objects(Kind::User, None)?;
    if !admins.is_empty() {
        return Ok(Err(reject(
            RejectCode::Conflict,
            "the platform is already bootstrapped",
        )));
    }
    let changes = vec![Change::Create(user.clone()), Change::Create(token.clone())];
    mutate(st, log_index, ctx, None, "bootstrap", &changes, pending)
}

/// Where objects of `kind` are stored when a command runs in scope `tenant`: tenants always live
/// in the platform scope (a tenant scope may create its own tenant, see `apply`).
fn storage_scope(kind: Kind, tenant: Option<&str>) -> Option<&str> {
    if kind == Kind::Tenant {
        None
    } else {
        tenant
    }
}

fn scope_ok(kind: Kind, tenant: Option<&str>, name: &str) -> Result<(), Rejection> {
    let needs_tenant = !matches!(kind, Kind::Tenant | Kind::User | Kind::Token);
    match (kind, tenant) {
        (Kind::Tenant, Some(t)) if t != name => Err(reject(
            RejectCode::Invalid,
            "tenants are not created inside another tenant",
        )),
        (_, None) if needs_tenant => Err(reject(
            RejectCode::Invalid,
            format!("a {kind} belongs to a tenant"),
        )),
        _ => Ok(()),
    }
}

fn mutate(
    st: &mut Staged,
    log_index: u64,
    ctx: &Context,
    tenant: Option<&str>,
    action: &str,
    changes: &[Change],
    pending: &mut Vec<PendingRecord>,
) -> Result<Outcome, StoreError> {
    let creates_scope = matches!(
        (changes.first(), tenant),
        (Some(Change::Create(Spec::Tenant(ts))), Some(t)) if ts.name == t
    );
    if let (Some(t), false) = (tenant, creates_scope) {
        if st.object(Kind::Tenant, None, t)?.is_none() {
            return Ok(Err(reject(
                RejectCode::NotFound,
                format!("tenant {t:?} not found"),
            )));
        }
    }
    let mut out = Vec::new();
    let first_record = pending.len();
    for change in changes {
        let result = match change {
            Change::Create(spec) => create(st, log_index, ctx, tenant, spec, pending)?,
            Change::Update { spec, if_version } => {
                update(st, log_index, ctx, tenant, spec, *if_version, pending)?
            }
            Change::Delete {
                kind,
                name,
                if_version,
            } => delete(st, ctx, tenant, *kind, name, *if_version, pending)?,
        };
        match result {
            Ok(Some(obj)) => out.push(obj),
            Ok(None) => {}
            Err(mut r) => {
                if changes.len() > 1 {
                    r.message = format!("{}: {}", describe(change), r.message);
                }
                return Ok(Err(r));
            }
        }
    }
    // Records of a composite request (apply, bootstrap, cascades) name the request they came from.
    for rec in pending.iter_mut().skip(first_record) {
        if rec.action != action {
            let mut detail = match rec.detail.take() {
                Some(serde_json::Value::Object(m)) => m,
                _ => serde_json::Map::new(),
            };
            detail.insert("request".into(), action.into());
            rec.detail = Some(detail.into());
        }
    }
    let revision = if changes.is_empty() {
        revision(st, tenant)?
    } else {
        let next = revision(st, tenant)? + 1;
        st.put_json(revision_key(tenant), &next)?;
        next
    };
    Ok(Ok((out, revision)))
}

fn describe(change: &Change) -> String {
    match change {
        Change::Create(s) => format!("create {} {:?}", s.kind(), s.name()),
        Change::Update { spec, .. } => format!("update {} {:?}", spec.kind(), spec.name()),
        Change::Delete { kind, name, .. } => format!("delete {kind} {name:?}"),
    }
}

fn revision(st: &Staged, tenant: Option<&str>) -> Result<u64, StoreError> {
    match st.get(&revision_key(tenant))? {
        Some(b) => serde_json::from_slice(&b).map_err(StoreError::msg),
        None => Ok(0),
    }
}

type ChangeResult = Result<Option<Object>, Rejection>;

fn references(
    st: &Staged,
    tenant: Option<&str>,
    spec: &Spec,
) -> Result<Result<(), Rejection>, StoreError> {
    let mut need: Vec<(Kind, &str, &str)> = Vec::new();
    match spec {
        Spec::Subscription(s) => {
            need.push((Kind::Consumer, &s.consumer, "consumer"));
            need.push((Kind::Api, &s.api, "api"));
            need.push((Kind::Plan, &s.plan, "plan"));
        }
        Spec::Key(k) => need.push((Kind::Consumer, &k.consumer, "consumer")),
        Spec::Token(t) => need.push((Kind::User, &t.user, "user")),
        Spec::Api(a) => {
            if let Some(c) = a
                .upstream
                .tls
                .as_ref()
                .and_then(|t| t.client_certificate.as_deref())
            {
                need.push((Kind::Certificate, c, "upstream.tls.client_certificate"));
            }
        }
        _ => {}
    }
    for (kind, name, field) in need {
        if st.object(kind, tenant, name)?.is_none() {
            return Ok(Err(Rejection {
                code: RejectCode::Invalid,
                message: format!("{kind} {name:?} does not exist"),
                field: Some(field.to_string()),
            }));
        }
    }
    Ok(Ok(()))
}

/// The claim index keys of an object: for a served API, one per host (lower case) and base
/// path (`i/route/`); for a consumer, one per client-certificate identity, normalised, within
/// its tenant (`i/clientcert/`).
fn claim_keys(tenant: Option<&str>, spec: &Spec) -> Vec<String> {
    if let Spec::Consumer(c) = spec {
        let tenant = tenant.unwrap_or(PLATFORM);
        return c
            .client_certificates
            .iter()
            .map(|id| {
                format!(
                    "i/clientcert/{tenant}|{}",
                    crate::model::normalize_cert_identity(id)
                )
            })
            .collect();
    }
    let Spec::Api(api) = spec else {
        return Vec::new();
    };
    if !matches!(
        api.lifecycle,
        crate::model::Lifecycle::Published | crate::model::Lifecycle::Deprecated
    ) {
        return Vec::new();
    }
    let base = match api.base_path.trim_end_matches('/') {
        "" => "/",
        b => b,
    };
    api.hosts
        .iter()
        .map(|h| format!("i/route/{}|{base}", h.to_ascii_lowercase()))
        .collect()
}

/// The client-certificate identities claimed in `tenant` (normalised) and the consumer that
/// lists each, from the `i/clientcert/` index.
pub fn client_cert_claims(
    kv: &dyn KvRead,
    tenant: &str,
) -> Result<Vec<(String, String)>, StoreError> {
    let prefix = format!("i/clientcert/{tenant}|");
    let mut out = Vec::new();
    for (key, value) in kv.scan_prefix(&prefix)? {
        let holder: String = serde_json::from_slice(&value).map_err(StoreError::msg)?;
        let consumer = holder.split_once('/').map_or(holder.as_str(), |(_, c)| c);
        out.push((key[prefix.len()..].to_string(), consumer.to_string()));
    }
    Ok(out)
}

/// Consumers whose client-certificate identities have no claim of theirs in the index (written
/// by a build before the index, or a claim another consumer took first): `(tenant, consumer,
/// identity)`. The gateway maps certificates through the index only, so these identities map
/// to no consumer, or to the claim's holder, until the consumer is written again.
pub fn unclaimed_client_certs(
    kv: &dyn KvRead,
) -> Result<Vec<(String, String, String)>, StoreError> {
    let mut out = Vec::new();
    for tenant in list_objects(kv, Kind::Tenant, None)? {
        let t = tenant.spec.name();
        for o in list_objects(kv, Kind::Consumer, Some(&t))? {
            let Spec::Consumer(c) = &o.spec else {
                continue;
            };
            for id in &c.client_certificates {
                let key = format!(
                    "i/clientcert/{t}|{}",
                    crate::model::normalize_cert_identity(id)
                );
                let held = match kv.get(&key)? {
                    Some(v) => {
                        serde_json::from_slice::<String>(&v).map_err(StoreError::msg)?
                            == format!("{t}/{}", c.name)
                    }
                    None => false,
                };
                if !held {
                    out.push((t.clone(), c.name.clone(), id.clone()));
                }
            }
        }
    }
    Ok(out)
}

/// A served API must not claim a host and base path another served API already answers on (in
/// any tenant): the gateway would route one tenant's traffic to the other. Nor may a consumer
/// list a client-certificate identity another consumer of its tenant lists: the certificate
/// would map to either. The index (see [`claim_keys`]) makes the check cost one read per
/// claim. On success the claims of `old` are released and those of `new` recorded.
fn claim_routes(
    st: &mut Staged,
    tenant: Option<&str>,
    old: Option<&Spec>,
    new: Option<&Spec>,
) -> Result<Result<(), Rejection>, StoreError> {
    let owner = format!(
        "{}/{}",
        tenant.unwrap_or(PLATFORM),
        new.or(old).map(Spec::name).unwrap_or_default()
    );
    let wanted = new.map(|s| claim_keys(tenant, s)).unwrap_or_default();
    for key in &wanted {
        if let Some(holder) = st.get(key)? {
            let holder: String = serde_json::from_slice(&holder).map_err(StoreError::msg)?;
            if holder != owner {
                if let Some(id) = key.strip_prefix("i/clientcert/") {
                    let id = id.split_once('|').map_or(id, |(_, id)| id);
                    let other = holder.split_once('/').map_or(holder.as_str(), |(_, n)| n);
                    return Ok(Err(Rejection {
                        code: RejectCode::Conflict,
                        message: format!(
                            "client certificate {id:?} already maps to consumer {other:?}"
                        ),
                        field: Some("client_certificates".into()),
                    }));
                }
                let (host, base) = key
                    .trim_start_matches("i/route/")
                    .split_once('|')
                    .unwrap_or_default();
                return Ok(Err(Rejection {
                    code: RejectCode::Conflict,
                    message: format!(
                        "host {host:?} with base path {base:?} is already served by another API"
                    ),
                    field: Some("hosts".into()),
                }));
            }
        }
    }
    for key in old.map(|s| claim_keys(tenant, s)).unwrap_or_default() {
        if wanted.contains(&key) {
            continue;
        }
        // released only by its holder (a claim written by another object stays)
        let held = match st.get(&key)? {
            Some(v) => serde_json::from_slice::<String>(&v).map_err(StoreError::msg)? == owner,
            None => false,
        };
        if held {
            st.delete(key);
        }
    }
    for key in wanted {
        st.put_json(key, &owner)?;
    }
    Ok(Ok(()))
}

fn index_key(spec: &Spec) -> Option<String> {
    match spec {
        Spec::Key(k) if !k.key_hash.is_empty() => Some(key_hash_index(&k.key_hash)),
        Spec::Token(t) if !t.token_hash.is_empty() => Some(token_hash_index(&t.token_hash)),
        _ => None,
    }
}

fn create(
    st: &mut Staged,
    log_index: u64,
    ctx: &Context,
    tenant: Option<&str>,
    spec: &Spec,
    pending: &mut Vec<PendingRecord>,
) -> Result<ChangeResult, StoreError> {
    let kind = spec.kind();
    let name = spec.name();
    if let Err(r) = scope_ok(kind, tenant, &name) {
        return Ok(Err(r));
    }
    if let Err(e) = spec.check(tenant) {
        return Ok(Err(Rejection {
            code: RejectCode::Invalid,
            message: e.reason,
            field: Some(e.field),
        }));
    }
    let key = object_key(kind, storage_scope(kind, tenant), &name);
    if st.get(&key)?.is_some() {
        return Ok(Err(reject(
            RejectCode::Conflict,
            format!("{kind} {name:?} already exists"),
        )));
    }
    if let Err(r) = references(st, tenant, spec)? {
        return Ok(Err(r));
    }
    if let Err(r) = claim_routes(st, tenant, None, Some(spec))? {
        return Ok(Err(r));
    }
    let obj = Object {
        meta: ObjectMeta {
            tenant: storage_scope(kind, tenant).map(str::to_string),
            version: 1,
            created_at: ctx.time.clone(),
            updated_at: ctx.time.clone(),
            log_index,
        },
        spec: spec.clone(),
    };
    if let Some(ix) = index_key(spec) {
        st.put_json(ix, &key)?;
    }
    st.put_json(key, &obj)?;
    let action = format!("{kind}.create");
    let digest = change_digest(&action, kind, tenant, &name, Some(spec), 1);
    pending.push(PendingRecord::for_change(
        ctx, tenant, action, kind, &name, digest,
    ));
    Ok(Ok(Some(obj)))
}

fn enabled_platform_admins(st: &Staged) -> Result<Vec<String>, StoreError> {
    Ok(st
        .objects(Kind::User, None)?
        .into_iter()
        .filter_map(|o| match o.spec {
            Spec::User(u) if u.role == Role::PlatformAdmin && !u.disabled => Some(u.name),
            _ => None,
        })
        .collect())
}

fn update(
    st: &mut Staged,
    log_index: u64,
    ctx: &Context,
    tenant: Option<&str>,
    spec: &Spec,
    if_version: u64,
    pending: &mut Vec<PendingRecord>,
) -> Result<ChangeResult, StoreError> {
    let kind = spec.kind();
    let name = spec.name();
    if kind == Kind::Tenant && tenant.is_some() {
        return Ok(Err(reject(
            RejectCode::Invalid,
            "tenants are changed in the platform scope",
        )));
    }
    if let Err(r) = scope_ok(kind, tenant, &name) {
        return Ok(Err(r));
    }
    if let Err(e) = spec.check(tenant) {
        return Ok(Err(Rejection {
            code: RejectCode::Invalid,
            message: e.reason,
            field: Some(e.field),
        }));
    }
    let key = object_key(kind, tenant, &name);
    let Some(current) = decode_object(st.get(&key)?)? else {
        return Ok(Err(reject(
            RejectCode::NotFound,
            format!("{kind} {name:?} not found"),
        )));
    };
    if current.meta.version != if_version {
        return Ok(Err(reject(
            RejectCode::PreconditionFailed,
            format!(
                "{kind} {name:?} is at version {}, the request expected version {if_version}; \
                 read it again and retry",
                current.meta.version
            ),
        )));
    }
    let immutable = |field: &str| {
        Err(Rejection {
            code: RejectCode::Invalid,
            message: format!("{field} cannot be changed"),
            field: Some(field.to_string()),
        })
    };
    match (&current.spec, spec) {
        (Spec::Key(old), Spec::Key(new)) => {
            if old.consumer != new.consumer {
                return Ok(immutable("consumer"));
            }
            if old.key_hash != new.key_hash || old.prefix != new.prefix {
                return Ok(immutable("key"));
            }
        }
        (Spec::Token(old), Spec::Token(new)) => {
            if old.user != new.user {
                return Ok(immutable("user"));
            }
            if old.token_hash != new.token_hash || old.prefix != new.prefix {
                return Ok(immutable("token"));
            }
        }
        (Spec::Api(old), Spec::Api(new)) if !old.lifecycle.can_move_to(new.lifecycle) => {
            return Ok(Err(Rejection {
                code: RejectCode::Invalid,
                message: format!(
                    "an API cannot move from {} to {}",
                    old.lifecycle.as_str(),
                    new.lifecycle.as_str()
                ),
                field: Some("lifecycle".into()),
            }));
        }
        (Spec::User(old), Spec::User(new)) => {
            if old.role != new.role && tenant.is_none() {
                return Ok(immutable("role"));
            }
            let admins = enabled_platform_admins(st)?;
            if tenant.is_none() && new.disabled && admins == [name.clone()] {
                return Ok(Err(reject(
                    RejectCode::Conflict,
                    "this is the last enabled platform-admin; create another one first",
                )));
            }
        }
        _ => {}
    }
    if let Err(r) = references(st, tenant, spec)? {
        return Ok(Err(r));
    }
    if let Err(r) = claim_routes(st, tenant, Some(&current.spec), Some(spec))? {
        return Ok(Err(r));
    }
    let version = current.meta.version + 1;
    let obj = Object {
        meta: ObjectMeta {
            version,
            updated_at: ctx.time.clone(),
            log_index,
            ..current.meta
        },
        spec: spec.clone(),
    };
    st.put_json(key, &obj)?;
    let action = format!("{kind}.update");
    let digest = change_digest(&action, kind, tenant, &name, Some(spec), version);
    pending.push(PendingRecord::for_change(
        ctx, tenant, action, kind, &name, digest,
    ));
    Ok(Ok(Some(obj)))
}

fn delete(
    st: &mut Staged,
    ctx: &Context,
    tenant: Option<&str>,
    kind: Kind,
    name: &str,
    if_version: Option<u64>,
    pending: &mut Vec<PendingRecord>,
) -> Result<ChangeResult, StoreError> {
    if kind == Kind::Tenant && tenant.is_some() {
        return Ok(Err(reject(
            RejectCode::Invalid,
            "tenants are deleted in the platform scope",
        )));
    }
    if let Err(r) = scope_ok(kind, tenant, name) {
        return Ok(Err(r));
    }
    let key = object_key(kind, tenant, name);
    let Some(current) = decode_object(st.get(&key)?)? else {
        return Ok(Err(reject(
            RejectCode::NotFound,
            format!("{kind} {name:?} not found"),
        )));
    };
    if let Some(v) = if_version {
        if current.meta.version != v {
            return Ok(Err(reject(
                RejectCode::PreconditionFailed,
                format!(
                    "{kind} {name:?} is at version {}, the request expected version {v}",
                    current.meta.version
                ),
            )));
        }
    }
    let subscriptions = |st: &Staged,
                         field: fn(&crate::model::SubscriptionSpec) -> &str|
     -> Result<Vec<String>, StoreError> {
        Ok(st
            .objects(Kind::Subscription, tenant)?
            .into_iter()
            .filter_map(|o| match &o.spec {
                Spec::Subscription(s) if field(s) == name => Some(s.name()),
                _ => None,
            })
            .collect())
    };
    let blockers: Vec<String> = match kind {
        Kind::Tenant => {
            let mut held = Vec::new();
            for k in Kind::ALL {
                let n = st.scan_prefix(&object_prefix(k, Some(name)))?.len();
                if n > 0 {
                    held.push(format!("{n} {k}"));
                }
            }
            held
        }
        Kind::Consumer => subscriptions(st, |s| &s.consumer)?,
        Kind::Api => subscriptions(st, |s| &s.api)?,
        Kind::Plan => subscriptions(st, |s| &s.plan)?,
        Kind::Certificate => st
            .objects(Kind::Api, tenant)?
            .into_iter()
            .filter_map(|o| match &o.spec {
                Spec::Api(a)
                    if a.upstream
                        .tls
                        .as_ref()
                        .and_then(|t| t.client_certificate.as_deref())
                        == Some(name) =>
                {
                    Some(format!("api {}", a.name))
                }
                _ => None,
            })
            .collect(),
        Kind::User if tenant.is_none() => {
            if enabled_platform_admins(st)? == [name.to_string()] {
                return Ok(Err(reject(
                    RejectCode::Conflict,
                    "this is the last enabled platform-admin; create another one first",
                )));
            }
            Vec::new()
        }
        _ => Vec::new(),
    };
    if !blockers.is_empty() {
        let what = match kind {
            Kind::Tenant => "objects",
            Kind::Certificate => "APIs (upstream.tls.client_certificate)",
            _ => "subscriptions",
        };
        return Ok(Err(reject(
            RejectCode::Conflict,
            format!(
                "{kind} {name:?} is still referenced by {what}: {}; delete them first",
                blockers.join(", ")
            ),
        )));
    }
    // Children go with their parent: a consumer's keys, a user's tokens.
    let children: Vec<Object> = match kind {
        Kind::Consumer => st
            .objects(Kind::Key, tenant)?
            .into_iter()
            .filter(|o| matches!(&o.spec, Spec::Key(k) if k.consumer == name))
            .collect(),
        Kind::User => st
            .objects(Kind::Token, tenant)?
            .into_iter()
            .filter(|o| matches!(&o.spec, Spec::Token(t) if t.user == name))
            .collect(),
        _ => Vec::new(),
    };
    for child in children.iter().chain(std::iter::once(&current)) {
        let ckind = child.spec.kind();
        let cname = child.spec.name();
        if let Some(ix) = index_key(&child.spec) {
            st.delete(ix);
        }
        if let Err(r) = claim_routes(st, tenant, Some(&child.spec), None)? {
            return Ok(Err(r));
        }
        st.delete(object_key(ckind, tenant, &cname));
        let action = format!("{ckind}.delete");
        let digest = change_digest(&action, ckind, tenant, &cname, None, child.meta.version);
        let mut rec = PendingRecord::for_change(ctx, tenant, action, ckind, &cname, digest);
        if ckind != kind {
            rec.detail = Some(serde_json::json!({ "cascade_from": format!("{kind}/{name}") }));
        }
        pending.push(rec);
    }
    Ok(Ok(None))
}

// ---------------------------------------------------------------------------------------------
// Declarative documents.

/// What applying a tenant document would do.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DocumentDiff {
    /// `kind/name` of objects to create, change and delete.
    pub create: Vec<String>,
    pub update: Vec<String>,
    pub delete: Vec<String>,
    pub unchanged: usize,
    /// The changes, in an order that respects references, each guarded by the version read.
    #[serde(skip)]
    pub changes: Vec<Change>,
}

impl DocumentDiff {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

/// The tenant's current configuration as a document (no secrets: consumers without keys).
pub fn export_document(
    kv: &dyn KvRead,
    tenant: &str,
) -> Result<crate::model::TenantDocument, StoreError> {
    let mut doc = crate::model::TenantDocument {
        api_version: crate::model::DOCUMENT_API_VERSION.into(),
        kind: crate::model::DOCUMENT_KIND.into(),
        tenant: tenant.into(),
        revision: Some(tenant_revision(kv, Some(tenant))?),
        apis: Vec::new(),
        plans: Vec::new(),
        consumers: Vec::new(),
        subscriptions: Vec::new(),
    };
    for kind in [Kind::Api, Kind::Plan, Kind::Consumer, Kind::Subscription] {
        for o in list_objects(kv, kind, Some(tenant))? {
            match o.spec {
                Spec::Api(s) => doc.apis.push(s),
                Spec::Plan(s) => doc.plans.push(s),
                Spec::Consumer(s) => doc.consumers.push(s),
                Spec::Subscription(s) => doc.subscriptions.push(s),
                _ => {}
            }
        }
    }
    Ok(doc)
}

/// Compares a (checked) document with the tenant's state. Deletions of subscriptions come
/// first, then deletions of what they referenced, then creations and changes in dependency order.
pub fn diff_document(
    kv: &dyn KvRead,
    doc: &crate::model::TenantDocument,
    tenant_exists: bool,
) -> Result<DocumentDiff, StoreError> {
    let tenant = doc.tenant.as_str();
    let mut diff = DocumentDiff::default();
    if !tenant_exists {
        let spec = Spec::Tenant(crate::model::TenantSpec {
            name: tenant.to_string(),
            display_name: None,
            description: None,
        });
        diff.create.push(format!("tenant/{tenant}"));
        diff.changes.push(Change::Create(spec));
    }
    let desired = doc.specs();
    let wanted: std::collections::BTreeSet<(Kind, String)> =
        desired.iter().map(|d| (d.kind(), d.name())).collect();
    let mut deletes_first = Vec::new();
    let mut deletes_then = Vec::new();
    for kind in [Kind::Subscription, Kind::Consumer, Kind::Api, Kind::Plan] {
        for o in list_objects(kv, kind, Some(tenant))? {
            let name = o.spec.name();
            if !wanted.contains(&(kind, name.clone())) {
                diff.delete.push(format!("{kind}/{name}"));
                let c = Change::Delete {
                    kind,
                    name,
                    if_version: Some(o.meta.version),
                };
                if kind == Kind::Subscription {
                    deletes_first.push(c);
                } else {
                    deletes_then.push(c);
                }
            }
        }
    }
    diff.changes.extend(deletes_first);
    diff.changes.extend(deletes_then);
    for spec in desired {
        let kind = spec.kind();
        let name = spec.name();
        match get_object(kv, kind, Some(tenant), &name)? {
            None => {
                diff.create.push(format!("{kind}/{name}"));
                diff.changes.push(Change::Create(spec));
            }
            Some(current) if current.spec != spec => {
                diff.update.push(format!("{kind}/{name}"));
                diff.changes.push(Change::Update {
                    spec,
                    if_version: current.meta.version,
                });
            }
            Some(_) => diff.unchanged += 1,
        }
    }
    Ok(diff)
}

// ---------------------------------------------------------------------------------------------
// Queries (read side).

pub fn get_object(
    kv: &dyn KvRead,
    kind: Kind,
    tenant: Option<&str>,
    name: &str,
) -> Result<Option<Object>, StoreError> {
    decode_object(kv.get(&object_key(kind, tenant, name))?)
}

pub fn list_objects(
    kv: &dyn KvRead,
    kind: Kind,
    tenant: Option<&str>,
) -> Result<Vec<Object>, StoreError> {
    kv.scan_prefix(&object_prefix(kind, tenant))?
        .into_iter()
        .map(|(_, v)| serde_json::from_slice(&v).map_err(StoreError::msg))
        .collect()
}

pub fn tenant_revision(kv: &dyn KvRead, tenant: Option<&str>) -> Result<u64, StoreError> {
    match kv.get(&revision_key(tenant))? {
        Some(b) => serde_json::from_slice(&b).map_err(StoreError::msg),
        None => Ok(0),
    }
}

/// The token object (and its owner) whose hash is `hash`.
pub fn find_token(kv: &dyn KvRead, hash: &str) -> Result<Option<(Object, Object)>, StoreError> {
    let Some(key) = kv.get(&token_hash_index(hash))? else {
        return Ok(None);
    };
    let key: String = serde_json::from_slice(&key).map_err(StoreError::msg)?;
    let Some(token) = decode_object(kv.get(&key)?)? else {
        return Ok(None);
    };
    let Spec::Token(t) = &token.spec else {
        return Ok(None);
    };
    let Some(user) = get_object(kv, Kind::User, token.meta.tenant.as_deref(), &t.user)? else {
        return Ok(None);
    };
    Ok(Some((token, user)))
}

/// The state in memory, for tests and benchmarks of the state machine (the node keeps it in
/// redb, [`crate::store`]).
#[derive(Debug, Default)]
pub struct MemKv(pub BTreeMap<String, Vec<u8>>);

impl KvRead for MemKv {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.0.get(key).cloned())
    }

    fn scan_range(
        &self,
        from: &str,
        to: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        if from >= to {
            return Ok(Vec::new());
        }
        Ok(self
            .0
            .range(from.to_string()..to.to_string())
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;

    type Mem = MemKv;

    impl Mem {
        fn run(&mut self, index: u64, cmd: &Command) -> Applied {
            let applied = apply(self, index, cmd).unwrap();
            for (k, v) in &applied.writes {
                match v {
                    Some(v) => self.0.insert(k.clone(), v.clone()),
                    None => self.0.remove(k),
                };
            }
            applied
        }
    }

    fn ctx() -> Context {
        Context {
            time: "2026-01-01T00:00:00Z".into(),
            actor: "alice".into(),
            credential: Some("tok-1".into()),
            role: "platform-admin".into(),
            request_id: "r1".into(),
            source: "127.0.0.1".into(),
        }
    }

    fn mutate(tenant: Option<&str>, changes: Vec<Change>) -> Command {
        Command::Mutate {
            ctx: ctx(),
            tenant: tenant.map(str::to_string),
            action: "test".into(),
            changes,
        }
    }

    fn tenant(name: &str) -> Spec {
        Spec::Tenant(TenantSpec {
            name: name.into(),
            display_name: None,
            description: None,
        })
    }

    fn consumer(name: &str) -> Spec {
        Spec::Consumer(ConsumerSpec {
            name: name.into(),
            display_name: None,
            contact_email: None,
            description: None,
            client_certificates: Vec::new(),
        })
    }

    #[test]
    fn client_certificate_claims_map_identities_and_show_what_is_unclaimed() {
        let mut kv = Mem::default();
        kv.run(1, &mutate(None, vec![Change::Create(tenant("acme"))]));
        let with = |name: &str, ids: &[&str]| {
            let Spec::Consumer(mut c) = consumer(name) else {
                unreachable!()
            };
            c.client_certificates = ids.iter().map(|s| s.to_string()).collect();
            Spec::Consumer(c)
        };
        let a = kv.run(
            2,
            &mutate(
                Some("acme"),
                vec![
                    Change::Create(with("tpp", &["C=FR, O=Fintech, CN=tpp"])),
                    Change::Create(with("plain", &[])),
                ],
            ),
        );
        assert!(
            matches!(a.response, Some(Response::Done { .. })),
            "{:?}",
            a.response
        );
        assert_eq!(
            client_cert_claims(&kv, "acme").unwrap(),
            [("C=FR,O=Fintech,CN=tpp".to_string(), "tpp".to_string())]
        );
        assert!(client_cert_claims(&kv, "other").unwrap().is_empty());
        assert!(unclaimed_client_certs(&kv).unwrap().is_empty());
        // a consumer written before the index existed: its identity maps to nobody, and says so
        kv.0.remove("i/clientcert/acme|C=FR,O=Fintech,CN=tpp");
        assert!(client_cert_claims(&kv, "acme").unwrap().is_empty());
        assert_eq!(
            unclaimed_client_certs(&kv).unwrap(),
            [(
                "acme".to_string(),
                "tpp".to_string(),
                "C=FR, O=Fintech, CN=tpp".to_string()
            )]
        );
    }

    #[test]
    fn usage_batches_count_once_and_add_up() {
        let mut kv = Mem::default();
        let entry = |requests| UsageEntry {
            tenant: "acme".into(),
            consumer: "app".into(),
            api: "pay".into(),
            hour: 493_000,
            counts: UsageCounts {
                requests,
                bytes_in: 10 * requests,
                bytes_out: 100 * requests,
            },
        };
        let batch = |batch, requests| Command::RecordUsage {
            node: 1,
            batch,
            entries: vec![entry(requests)],
        };
        let a = kv.run(1, &batch(5, 2));
        assert!(a.audit.is_empty(), "metering is not audited");
        kv.run(2, &batch(5, 2)); // the same batch again (a retry after an ambiguous failure)
        kv.run(3, &batch(4, 9)); // an older batch
        kv.run(4, &batch(6, 3));
        let rows = usage(&kv, "acme", Some("app"), (0, i64::MAX)).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            rows[0].counts,
            UsageCounts {
                requests: 5,
                bytes_in: 50,
                bytes_out: 500
            }
        );
        assert_eq!(last_usage_batch(&kv, 1).unwrap(), 6);
        // an entry written before batches were numbered still reads, and applies
        let old: Command = serde_json::from_value(serde_json::json!({"record_usage": {
            "entries": [{"tenant": "acme", "consumer": "app", "api": "pay", "hour": 493_000,
                         "requests": 1, "bytes_in": 0, "bytes_out": 0}]}}))
        .unwrap();
        kv.run(5, &old);
        let rows = usage(&kv, "acme", Some("app"), (0, i64::MAX)).unwrap();
        assert_eq!(rows[0].counts.requests, 6);
        assert!(usage(&kv, "acme", None, (0, 492_999)).unwrap().is_empty());
        // every tenant's counters from an hour on, and every node's last batch (the quotas')
        let other = |tenant: &str, hour| UsageEntry {
            tenant: tenant.into(),
            hour,
            ..entry(1)
        };
        kv.run(
            6,
            &Command::RecordUsage {
                node: 2,
                batch: 40,
                entries: vec![
                    other("beta", 493_001),
                    other("beta", 492_000),
                    other("zed", 493_005),
                ],
            },
        );
        let mut since: Vec<(String, i64)> = usage_since(&kv, 493_000)
            .unwrap()
            .into_iter()
            .map(|e| (e.tenant, e.hour))
            .collect();
        since.sort();
        assert_eq!(
            since,
            [("acme", 493_000), ("beta", 493_001), ("zed", 493_005)]
                .map(|(t, h)| (t.to_string(), h))
        );
        assert_eq!(
            usage_batches(&kv).unwrap(),
            HashMap::from([(1, 6), (2, 40)])
        );
    }

    /// A store that counts the entries its scans return.
    struct Counting<'a>(&'a Mem, std::cell::Cell<usize>);
    impl KvRead for Counting<'_> {
        fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.0.get(key)
        }
        fn scan_range(
            &self,
            from: &str,
            to: &str,
            limit: usize,
        ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            let out = self.0.scan_range(from, to, limit)?;
            self.1.set(self.1.get() + out.len());
            Ok(out)
        }
    }

    #[test]
    fn prefix_ends_bound_every_key_of_their_prefix() {
        let kv = MemKv(
            [
                "u/acme-2/a",
                "u/acme/",
                "u/acme/c-x/1",
                "u/acme/c/1",
                "u/acme0",
                "u/acmf",
            ]
            .into_iter()
            .map(|k| (k.to_string(), Vec::new()))
            .collect(),
        );
        assert_eq!(prefix_end("u/acme/"), "u/acme0");
        let keys: Vec<String> = kv
            .scan_prefix("u/acme/")
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["u/acme/", "u/acme/c-x/1", "u/acme/c/1"]);
        assert_eq!(prefix_end("a\u{D7FF}"), "a\u{E000}");
        assert_eq!(prefix_end("a\u{10FFFF}"), "b");
        assert_eq!(kv.scan_prefix("").unwrap().len(), 6);
    }

    #[test]
    fn usage_reads_only_the_hours_asked_for() {
        let mut kv = Mem::default();
        // consumers whose names sort around each other ('-' < '/' < '0'), a year of hours each
        let consumers = ["c", "c-x", "c0", "cb", "d"];
        let mut entries = Vec::new();
        for c in consumers {
            for hour in 0..24 * 365 {
                entries.push(UsageEntry {
                    tenant: "acme".into(),
                    consumer: c.into(),
                    api: if hour % 2 == 0 { "pay" } else { "fx" }.into(),
                    hour: 500_000 + hour,
                    counts: UsageCounts {
                        requests: 1,
                        bytes_in: 0,
                        bytes_out: 0,
                    },
                });
            }
        }
        // another tenant whose name extends this one's
        entries.push(UsageEntry {
            tenant: "acme-2".into(),
            ..entries[0].clone()
        });
        kv.run(
            1,
            &Command::RecordUsage {
                node: 1,
                batch: 1,
                entries,
            },
        );
        let counting = Counting(&kv, std::cell::Cell::new(0));
        // one day of the tenant: 24 counters per consumer, and one probe per consumer
        let rows = usage(&counting, "acme", None, (500_100, 500_123)).unwrap();
        assert_eq!(rows.len(), 24 * consumers.len());
        let mut seen: Vec<&str> = rows.iter().map(|r| r.consumer.as_str()).collect();
        seen.dedup();
        // in key order: "c-x/" sorts before "c/"
        assert_eq!(seen, ["c-x", "c", "c0", "cb", "d"]);
        assert!(rows.iter().all(|r| (500_100..=500_123).contains(&r.hour)));
        assert!(rows
            .iter()
            .all(|r| r.api == if r.hour % 2 == 0 { "pay" } else { "fx" }));
        assert!(
            counting.1.get() <= rows.len() + consumers.len(),
            "read {} entries for {} rows",
            counting.1.get(),
            rows.len()
        );
        // one consumer, edges included
        let rows = usage(&kv, "acme", Some("c0"), (500_000, 500_001)).unwrap();
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|r| r.consumer == "c0"));
        assert!(usage(&kv, "acme", Some("nobody"), (0, i64::MAX))
            .unwrap()
            .is_empty());
        assert!(usage(&kv, "acme", None, (500_010, 500_009))
            .unwrap()
            .is_empty());
        assert_eq!(
            usage(&kv, "acme", None, (0, i64::MAX)).unwrap().len(),
            24 * 365 * consumers.len()
        );
        assert_eq!(usage(&kv, "acme-2", None, (0, i64::MAX)).unwrap().len(), 1);
    }

    #[test]
    fn create_update_delete_with_versions_and_audit() {
        let mut kv = Mem::default();
        let a = kv.run(1, &mutate(None, vec![Change::Create(tenant("acme"))]));
        assert!(matches!(
            a.response,
            Some(Response::Done { revision: 1, .. })
        ));
        assert_eq!(a.audit.len(), 1);
        assert_eq!(a.audit[0].record.action, "tenant.create");

        kv.run(
            2,
            &mutate(Some("acme"), vec![Change::Create(consumer("c1"))]),
        );
        // stale version: rejected, nothing written, no audit
        let stale = kv.run(
            3,
            &mutate(
                Some("acme"),
                vec![Change::Update {
                    spec: consumer("c1"),
                    if_version: 7,
                }],
            ),
        );
        assert!(matches!(
            stale.response,
            Some(Response::Rejected(Rejection {
                code: RejectCode::PreconditionFailed,
                ..
            }))
        ));
        assert!(stale.writes.is_empty() && stale.audit.is_empty());
        let ok = kv.run(
            4,
            &mutate(
                Some("acme"),
                vec![Change::Update {
                    spec: consumer("c1"),
                    if_version: 1,
                }],
            ),
        );
        let Some(Response::Done {
            objects,
            revision,
            audit_seqs,
        }) = ok.response
        else {
            panic!("update refused")
        };
        assert_eq!(objects[0].meta.version, 2);
        assert_eq!(revision, 2);
        assert_eq!(audit_seqs, vec![3]);
        // the chain continues
        assert_eq!(
            ok.audit[0].prev_hash,
            audit_head(&kv).map(|_| ok.audit[0].prev_hash).unwrap()
        );
        let head = audit_head(&kv).unwrap();
        assert_eq!(head.seq, 3);
        assert_eq!(head.hash, ok.audit[0].hash);
    }

    #[test]
    fn batch_is_all_or_nothing() {
        let mut kv = Mem::default();
        kv.run(1, &mutate(None, vec![Change::Create(tenant("acme"))]));
        let before = kv.0.clone();
        let bad = kv.run(
            2,
            &mutate(
                Some("acme"),
                vec![
                    Change::Create(consumer("c1")),
                    Change::Create(Spec::Subscription(SubscriptionSpec {
                        consumer: "c1".into(),
                        api: "missing".into(),
                        plan: "gold".into(),
                        status: SubscriptionStatus::Active,
                    })),
                ],
            ),
        );
        let Some(Response::Rejected(r)) = bad.response else {
            panic!("accepted")
        };
        assert!(
            r.message.contains("api \"missing\" does not exist"),
            "{}",
            r.message
        );
        assert_eq!(kv.0, before);
    }

    #[test]
    fn tenant_delete_refused_while_not_empty_and_consumer_cascades_keys() {
        let mut kv = Mem::default();
        kv.run(1, &mutate(None, vec![Change::Create(tenant("acme"))]));
        kv.run(
            2,
            &mutate(Some("acme"), vec![Change::Create(consumer("c1"))]),
        );
        let key = Spec::Key(KeySpec {
            name: "key-1".into(),
            consumer: "c1".into(),
            prefix: "apik_x".into(),
            key_hash: "ab".repeat(32),
            expires_at: "2030-01-01T00:00:00Z".into(),
            revoked: false,
            description: None,
        });
        kv.run(3, &mutate(Some("acme"), vec![Change::Create(key)]));
        assert!(kv.0.contains_key(&format!("i/key/{}", "ab".repeat(32))));
        let del_tenant = Change::Delete {
            kind: Kind::Tenant,
            name: "acme".into(),
            if_version: None,
        };
        let r = kv.run(4, &mutate(None, vec![del_tenant.clone()]));
        assert!(matches!(
            r.response,
            Some(Response::Rejected(Rejection {
                code: RejectCode::Conflict,
                ..
            }))
        ));
        let r = kv.run(
            5,
            &mutate(
                Some("acme"),
                vec![Change::Delete {
                    kind: Kind::Consumer,
                    name: "c1".into(),
                    if_version: Some(1),
                }],
            ),
        );
        assert_eq!(
            r.audit.len(),
            2,
            "key and consumer deletions are both audited"
        );
        assert!(!kv.0.keys().any(|k| k.starts_with("i/key/")));
        let r = kv.run(6, &mutate(None, vec![del_tenant]));
        assert!(matches!(r.response, Some(Response::Done { .. })));
    }

    #[test]
    fn route_claims_are_exclusive_and_released() {
        let api = |name: &str, lifecycle: Lifecycle| {
            Spec::Api(ApiSpec {
                name: name.into(),
                version: "v1".into(),
                display_name: None,
                hosts: vec!["API.bank.example".into()],
                base_path: "/pay/".into(),
                upstream: Upstream {
                    targets: vec![UpstreamTarget {
                        url: "http://127.0.0.1:1".into(),
                        weight: 1,
                    }],
                    ..Default::default()
                },
                policies: vec![],
                routes: vec![],
                lifecycle,
            })
        };
        let mut kv = Mem::default();
        kv.run(1, &mutate(None, vec![Change::Create(tenant("a"))]));
        kv.run(2, &mutate(None, vec![Change::Create(tenant("b"))]));
        let r = kv.run(
            3,
            &mutate(
                Some("a"),
                vec![Change::Create(api("pay", Lifecycle::Published))],
            ),
        );
        assert!(matches!(r.response, Some(Response::Done { .. })));
        assert!(kv.0.contains_key("i/route/api.bank.example|/pay"));
        // another tenant cannot claim it, a draft can exist
        let r = kv.run(
            4,
            &mutate(
                Some("b"),
                vec![Change::Create(api("steal", Lifecycle::Published))],
            ),
        );
        assert!(matches!(
            r.response,
            Some(Response::Rejected(Rejection {
                code: RejectCode::Conflict,
                ..
            }))
        ));
        kv.run(
            5,
            &mutate(
                Some("b"),
                vec![Change::Create(api("steal", Lifecycle::Draft))],
            ),
        );
        // the owner may update its API without conflicting with itself
        let r = kv.run(
            6,
            &mutate(
                Some("a"),
                vec![Change::Update {
                    spec: api("pay", Lifecycle::Deprecated),
                    if_version: 1,
                }],
            ),
        );
        assert!(
            matches!(r.response, Some(Response::Done { .. })),
            "{:?}",
            r.response
        );
        // retiring releases the claim; the other tenant may now publish
        kv.run(
            7,
            &mutate(
                Some("a"),
                vec![Change::Update {
                    spec: api("pay", Lifecycle::Retired),
                    if_version: 2,
                }],
            ),
        );
        assert!(!kv.0.contains_key("i/route/api.bank.example|/pay"));
        let r = kv.run(
            8,
            &mutate(
                Some("b"),
                vec![Change::Update {
                    spec: api("steal", Lifecycle::Published),
                    if_version: 1,
                }],
            ),
        );
        assert!(
            matches!(r.response, Some(Response::Done { .. })),
            "{:?}",
            r.response
        );
        // deleting releases it too
        kv.run(
            9,
            &mutate(
                Some("b"),
                vec![Change::Delete {
                    kind: Kind::Api,
                    name: "steal".into(),
                    if_version: None,
                }],
            ),
        );
        assert!(!kv.0.keys().any(|k| k.starts_with("i/route/")));
    }

    #[test]
    fn same_log_same_state() {
        let cmds = [
            mutate(None, vec![Change::Create(tenant("a"))]),
            mutate(Some("a"), vec![Change::Create(consumer("x"))]),
            mutate(Some("a"), vec![Change::Create(consumer("x"))]),
        ];
        let mut one = Mem::default();
        let mut two = Mem::default();
        for (i, c) in cmds.iter().enumerate() {
            one.run(i as u64 + 1, c);
            two.run(i as u64 + 1, c);
        }
        assert_eq!(one.0, two.0);
    }
}
