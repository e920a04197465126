//! redb storage: the Raft log and vote (`raft-log.redb`), and the applied state, audit index
//! and snapshots (`state.redb`); plus the audit segment files fed from the applied state.
//!
//! Architecture invariant: this module knows nothing of HTTP. It implements openraft's storage
//! traits and exposes read-only views of the applied state. Durability rules:
//! - log appends and votes are fsynced before openraft is told they are persisted;
//! - the state machine commits without fsync; [`StateMachine::flush`] (periodic, on snapshot and
//!   on shutdown) makes state and audit segments durable together. After a crash the state rolls
//!   back to its last durable commit and Raft re-applies the log from there, which reproduces the
//!   same state and the same audit records (apply is deterministic).

use crate::audit::{self, Sealed, SegmentWriter, Signer};
use crate::cluster::{NodeId, TypeConfig};
use crate::state::{self, KvRead, Response, StoreError};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// Version of the on-disk format of both redb files and of snapshots. Bump it (and write an
/// upgrade note) whenever a persisted structure changes.
pub const FORMAT_VERSION: u32 = 1;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const LOG_META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("state");
const SM_META: TableDefinition<&str, &[u8]> = TableDefinition::new("state_meta");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
const AUDIT_BY_TENANT: TableDefinition<(&str, u64), ()> = TableDefinition::new("audit_by_tenant");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

type SResult<T> = Result<T, StorageError<NodeId>>;
/// Snapshot metadata and every state key with its JSON value.
type SnapshotDump = (SnapshotMeta<NodeId, BasicNode>, Vec<(String, String)>);

fn any(e: impl std::fmt::Display) -> AnyError {
    AnyError::error(e.to_string())
}

fn read_logs_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::read_logs(any(e)).into()
}
fn write_logs_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_logs(any(e)).into()
}
fn read_sm_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::read_state_machine(any(e)).into()
}
fn write_sm_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(any(e)).into()
}

/// Opens (or creates) a redb file, checks its integrity and its format version.
fn open_db(path: &Path, meta: TableDefinition<&str, &[u8]>) -> anyhow::Result<Database> {
    let mut db = Database::create(path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    let clean = db
        .check_integrity()
        .map_err(|e| anyhow::anyhow!("integrity check of {} failed: {e}", path.display()))?;
    if !clean {
        tracing::warn!(file = %path.display(), "store was repaired at open (unclean shutdown)");
    }
    let tx = db.begin_write()?;
    {
        let mut t = tx.open_table(meta)?;
        let found = t.get("format_version")?.map(|v| v.value().to_vec());
        match found {
            None => {
                t.insert("format_version", FORMAT_VERSION.to_string().as_bytes())?;
            }
            Some(v) => {
                let v = String::from_utf8_lossy(&v).to_string();
                if v != FORMAT_VERSION.to_string() {
                    anyhow::bail!(
                        "{} has data format version {v}; this apim binary reads version \
                         {FORMAT_VERSION}. Use the apim release that wrote it, or restore a backup",
                        path.display()
                    );
                }
            }
        }
    }
    tx.commit()?;
    Ok(db)
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(v)
}

// ---------------------------------------------------------------------------------------------
// Raft log

/// The Raft log and vote, in `raft-log.redb`. Every write is fsynced.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    pub fn open(dir: &Path) -> anyhow::Result<LogStore> {
        let db = open_db(&dir.join("raft-log.redb"), LOG_META)?;
        let tx = db.begin_write()?;
        tx.open_table(LOG)?;
        tx.commit()?;
        Ok(LogStore { db: Arc::new(db) })
    }

    fn meta_get<T: for<'de> Deserialize<'de>>(&self, key: &str) -> SResult<Option<T>> {
        let tx = self.db.begin_read().map_err(read_logs_err)?;
        let t = tx.open_table(LOG_META).map_err(read_logs_err)?;
        match t.get(key).map_err(read_logs_err)? {
            Some(v) => serde_json::from_slice(v.value())
                .map(Some)
                .map_err(read_logs_err),
            None => Ok(None),
        }
    }

    async fn write<F>(&self, f: F) -> SResult<()>
    where
        F: FnOnce(&redb::WriteTransaction) -> Result<(), anyhow::Error> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let mut tx = db.begin_write()?;
            tx.set_durability(Durability::Immediate)?;
            f(&tx)?;
            tx.commit()?;
            Ok(())
        })
        .await
        .map_err(write_logs_err)?
        .map_err(write_logs_err)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> SResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(e) => Some(*e),
            Bound::Excluded(0) => return Ok(Vec::new()),
            Bound::Excluded(e) => Some(*e - 1),
            Bound::Unbounded => None,
        };
        let tx = self.db.begin_read().map_err(read_logs_err)?;
        let t = tx.open_table(LOG).map_err(read_logs_err)?;
        let mut out = Vec::new();
        let iter = match end {
            Some(e) if e < start => return Ok(out),
            Some(e) => t.range(start..=e),
            None => t.range(start..),
        }
        .map_err(read_logs_err)?;
        for item in iter {
            let (_, v) = item.map_err(read_logs_err)?;
            out.push(serde_json::from_slice(v.value()).map_err(read_logs_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> SResult<LogState<TypeConfig>> {
        let last_purged: Option<LogId<NodeId>> = self.meta_get("last_purged")?;
        let tx = self.db.begin_read().map_err(read_logs_err)?;
        let t = tx.open_table(LOG).map_err(read_logs_err)?;
        let last = match t.last().map_err(read_logs_err)? {
            Some((_, v)) => {
                let e: Entry<TypeConfig> =
                    serde_json::from_slice(v.value()).map_err(read_logs_err)?;
                Some(e.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> SResult<()> {
        let bytes = to_json(vote).map_err(|e| StorageIOError::write_vote(any(e)))?;
        self.write(move |tx| {
            tx.open_table(LOG_META)?.insert("vote", bytes.as_slice())?;
            Ok(())
        })
        .await
    }

    async fn read_vote(&mut self) -> SResult<Option<Vote<NodeId>>> {
        self.meta_get("vote")
    }

    // `save_committed` / `read_committed` keep openraft's defaults (not persisted): the state
    // machine records its last applied id in the same transaction as the state, so after a
    // restart it resumes from there; persisting the commit index would cost one more fsync per
    // write for no gain.

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> SResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        for e in entries {
            rows.push((e.log_id.index, to_json(&e).map_err(write_logs_err)?));
        }
        let res = self
            .write(move |tx| {
                let mut t = tx.open_table(LOG)?;
                for (i, b) in &rows {
                    t.insert(*i, b.as_slice())?;
                }
                Ok(())
            })
            .await;
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> SResult<()> {
        self.write(move |tx| {
            let mut t = tx.open_table(LOG)?;
            t.retain_in(log_id.index.., |_, _| false)?;
            Ok(())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> SResult<()> {
        let bytes = to_json(&Some(log_id)).map_err(write_logs_err)?;
        self.write(move |tx| {
            tx.open_table(LOG_META)?
                .insert("last_purged", bytes.as_slice())?;
            let mut t = tx.open_table(LOG)?;
            t.retain_in(..=log_id.index, |_, _| false)?;
            Ok(())
        })
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// State machine

/// A [`KvRead`] over a redb table of the state (read or write transaction).
pub struct TableKv<'a, T>(pub &'a T);

impl<T: ReadableTable<&'static str, &'static [u8]>> KvRead for TableKv<'_, T> {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .0
            .get(key)
            .map_err(StoreError::msg)?
            .map(|v| v.value().to_vec()))
    }

    fn scan_range(
        &self,
        from: &str,
        to: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        if from >= to || limit == 0 {
            return Ok(out);
        }
        for item in self.0.range(from..to).map_err(StoreError::msg)? {
            let (k, v) = item.map_err(StoreError::msg)?;
            out.push((k.value().to_string(), v.value().to_vec()));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }
}

/// Paths of the node's audit signing key (Ed25519, PKCS#8) and of its public key.
#[derive(Debug, Clone)]
pub struct AuditKeyPaths {
    pub private: PathBuf,
    pub public: PathBuf,
}

impl AuditKeyPaths {
    fn load(&self) -> anyhow::Result<Signer> {
        Ok(Signer::load_or_create(&self.private, &self.public)?)
    }
}

struct AuditSink {
    /// `None` until opened, or after a failure until reopened.
    writer: Option<SegmentWriter>,
    since_checkpoint: u64,
    /// Set when the segments may miss records the store has (at open, after a failed append);
    /// the next flush reopens the writer and catches up from the store.
    lagging: bool,
}

/// Usage the applied state took in, told to the gateway's quotas (`StateMachine::on_usage`).
pub enum UsageApplied<'a> {
    /// A `RecordUsage` batch, applied (one already applied is not told again).
    Batch {
        node: u64,
        batch: u64,
        entries: &'a [state::UsageEntry],
    },
    /// A snapshot replaced the whole state: counters are to be read again, from this reader.
    Replaced(&'a StateReader),
}

/// Told, after the commit, of every usage batch applied and every snapshot installed.
pub type UsageSink = Arc<dyn Fn(UsageApplied<'_>) + Send + Sync>;

struct SmInner {
    /// Bumped after each applied batch that changed what the gateway serves.
    gateway_changes: tokio::sync::watch::Sender<u64>,
    usage_sink: Mutex<Option<UsageSink>>,
    db: Database,
    audit: Mutex<AuditSink>,
    audit_dir: PathBuf,
    key: AuditKeyPaths,
    /// Set after every applied batch (state committed without fsync, audit records appended
    /// unsynced), cleared by the flush that makes them durable: an idle node's flusher then
    /// neither commits nor fsyncs.
    unflushed: std::sync::atomic::AtomicBool,
}

/// The applied state in `state.redb`, and the audit segments it feeds.
#[derive(Clone)]
pub struct StateMachine {
    inner: Arc<SmInner>,
}

/// Read-only access to the applied state for the admin API.
#[derive(Clone)]
pub struct StateReader {
    inner: Arc<SmInner>,
}

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    format_version: u32,
    meta: SnapshotMeta<NodeId, BasicNode>,
    /// Every state key and its JSON value.
    state: Vec<(String, String)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl StateMachine {
    /// Opens `state.redb` in `dir` and the audit segments in `dir/audit`, reconciling the
    /// segments with the durable state (see module docs).
    pub fn open(dir: &Path, key: AuditKeyPaths) -> anyhow::Result<StateMachine> {
        let db = open_db(&dir.join("state.redb"), SM_META)?;
        let tx = db.begin_write()?;
        {
            // create every table so read transactions never meet a missing one
            tx.open_table(KV)?;
            tx.open_table(AUDIT)?;
            tx.open_table(AUDIT_BY_TENANT)?;
            tx.open_table(SNAPSHOT)?;
        }
        tx.commit()?;
        let audit_dir = dir.join("audit");
        std::fs::create_dir_all(&audit_dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", audit_dir.display()))?;
        let inner = SmInner {
            gateway_changes: tokio::sync::watch::Sender::new(0),
            usage_sink: Mutex::new(None),
            db,
            audit: Mutex::new(AuditSink {
                writer: None,
                since_checkpoint: 0,
                lagging: true,
            }),
            audit_dir,
            key,
            unflushed: std::sync::atomic::AtomicBool::new(true),
        };
        let head = {
            let tx = inner.db.begin_read()?;
            state::audit_head(&TableKv(&tx.open_table(KV)?))?
        };
        inner.catch_up_locked(&mut lock(&inner.audit), head)?;
        Ok(StateMachine {
            inner: Arc::new(inner),
        })
    }

    pub fn reader(&self) -> StateReader {
        StateReader {
            inner: self.inner.clone(),
        }
    }

    /// Makes the applied state and the audit segments durable; writes a signed checkpoint when
    /// `checkpoint_time` is given and records were added since the last one. With nothing to
    /// do, it touches no file.
    pub fn flush(&self, checkpoint_time: Option<&str>) -> anyhow::Result<()> {
        self.inner.flush(checkpoint_time)
    }

    pub fn audit_dir(&self) -> &Path {
        &self.inner.audit_dir
    }

    /// Changes whenever an applied change touches what the gateway serves (tenants, APIs, consumers, certificates,
    /// plans, subscriptions, keys).
    pub fn gateway_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.gateway_changes.subscribe()
    }

    /// Tells `sink` of every usage batch applied from now on, and of every snapshot installed
    /// (replacing the sink set before).
    pub fn on_usage(&self, sink: UsageSink) {
        *lock(&self.inner.usage_sink) = Some(sink);
    }
}

impl SmInner {
    /// Holds the segment lock across the durable commit, the segment fsync and the checkpoint,
    /// so a checkpoint never covers a record that is not yet durable in the store.
    /// With nothing applied since the last flush, the segments not lagging and no checkpoint
    /// due (none asked, or none that would sign a record the last one does not), it touches no
    /// file.
    fn flush(&self, checkpoint_time: Option<&str>) -> anyhow::Result<()> {
        let mut sink = lock(&self.audit);
        // An apply sets the flag after its segment append: one that is still between its commit
        // and its append when this swap reads `false` sets it for the next flush.
        let pending = self.unflushed.swap(false, Ordering::SeqCst);
        let checkpoint_due =
            checkpoint_time.is_some() && sink.writer.as_ref().is_some_and(|w| w.checkpoint_due());
        if !pending && !sink.lagging && !checkpoint_due {
            return Ok(());
        }
        let flushed = self.flush_locked(&mut sink, checkpoint_time);
        if flushed.is_err() {
            self.unflushed.store(true, Ordering::SeqCst);
        }
        flushed
    }

    fn flush_locked(
        &self,
        sink: &mut AuditSink,
        checkpoint_time: Option<&str>,
    ) -> anyhow::Result<()> {
        // Read the head inside the transaction that makes the state durable: exactly what is
        // durable is what the segments are brought to and what the checkpoint may sign. Applies
        // that commit afterwards wait for the segment lock to append theirs.
        let mut tx = self.db.begin_write()?;
        let head = state::audit_head(&TableKv(&tx.open_table(KV)?))?;
        tx.set_durability(Durability::Immediate)?;
        tx.commit()?;
        self.catch_up_locked(sink, head)?;
        let Some(writer) = sink.writer.as_mut() else {
            anyhow::bail!("audit segment writer is not open");
        };
        let synced = writer.sync().and_then(|()| match checkpoint_time {
            Some(t) => writer.checkpoint(t),
            None => Ok(()),
        });
        if let Err(e) = synced {
            sink.lagging = true;
            return Err(e.into());
        }
        if checkpoint_time.is_some() {
            sink.since_checkpoint = 0;
        }
        Ok(())
    }

    /// When the segments may lag the store: reopens the writer at the durable `head` (which cuts
    /// a torn tail and any record beyond it) and appends the records up to `head` that the store
    /// has and the segments lack. Called with the segment lock held.
    fn catch_up_locked(&self, sink: &mut AuditSink, head: state::AuditHead) -> anyhow::Result<()> {
        if !sink.lagging {
            return Ok(());
        }
        sink.writer = None; // release the directory lock before reopening
        let tx = self.db.begin_read()?;
        let mut writer =
            SegmentWriter::open(&self.audit_dir, self.key.load()?, (head.seq, head.hash))?;
        let from = writer.head().0 + 1;
        let t = tx.open_table(AUDIT)?;
        let mut missing = Vec::new();
        for item in t.range(from..=head.seq)? {
            let (_, v) = item?;
            missing.push(Sealed::decode(v.value())?);
        }
        if !missing.is_empty() {
            tracing::info!(
                records = missing.len(),
                from,
                "audit segments caught up from the store"
            );
            sink.since_checkpoint += missing.len() as u64;
            writer.append(&missing)?;
        }
        writer.sync()?;
        sink.writer = Some(writer);
        sink.lagging = false;
        Ok(())
    }

    fn meta_get<T: for<'de> Deserialize<'de>>(&self, key: &str) -> SResult<Option<T>> {
        let tx = self.db.begin_read().map_err(read_sm_err)?;
        let t = tx.open_table(SM_META).map_err(read_sm_err)?;
        match t.get(key).map_err(read_sm_err)? {
            Some(v) => serde_json::from_slice(v.value())
                .map(Some)
                .map_err(read_sm_err),
            None => Ok(None),
        }
    }

    fn apply_blocking(&self, entries: Vec<Entry<TypeConfig>>) -> SResult<Vec<Response>> {
        let mut tx = self.db.begin_write().map_err(write_sm_err)?;
        tx.set_durability(Durability::None).map_err(write_sm_err)?;
        let mut responses = Vec::with_capacity(entries.len());
        let mut sealed_all: Vec<Sealed> = Vec::new();
        let mut gateway_dirty = false;
        // (node, batch, entries) of the usage batches applied, told once committed
        let mut usage_applied = Vec::new();
        {
            let mut kv = tx.open_table(KV).map_err(write_sm_err)?;
            let mut meta = tx.open_table(SM_META).map_err(write_sm_err)?;
            let mut audit_t = tx.open_table(AUDIT).map_err(write_sm_err)?;
            let mut by_tenant = tx.open_table(AUDIT_BY_TENANT).map_err(write_sm_err)?;
            for entry in entries {
                let id = to_json(&entry.log_id).map_err(write_sm_err)?;
                meta.insert("last_applied", id.as_slice())
                    .map_err(write_sm_err)?;
                match entry.payload {
                    EntryPayload::Blank => responses.push(Response::Noop),
                    EntryPayload::Membership(m) => {
                        let sm = StoredMembership::new(Some(entry.log_id), m);
                        let b = to_json(&sm).map_err(write_sm_err)?;
                        meta.insert("membership", b.as_slice())
                            .map_err(write_sm_err)?;
                        responses.push(Response::Noop);
                    }
                    EntryPayload::Normal(cmd) => {
                        let applied = state::apply(&TableKv(&kv), entry.log_id.index, &cmd)
                            .map_err(|e| StorageIOError::apply(entry.log_id, any(e)))?;
                        gateway_dirty |= applied.writes.keys().any(|k| {
                            [
                                "o/tenant/",
                                "o/api/",
                                "o/plan/",
                                "o/subscription/",
                                "o/key/",
                                "o/consumer/",
                                "o/certificate/",
                            ]
                            .iter()
                            .any(|p| k.starts_with(p))
                        });
                        for (k, v) in &applied.writes {
                            match v {
                                Some(v) => kv.insert(k.as_str(), v.as_slice()),
                                None => kv.remove(k.as_str()),
                            }
                            .map_err(write_sm_err)?;
                        }
                        for s in applied.audit {
                            let frame = s.encode();
                            audit_t
                                .insert(s.record.seq, frame.as_slice())
                                .map_err(write_sm_err)?;
                            let tenant = s.record.tenant.as_deref().unwrap_or("_");
                            by_tenant
                                .insert((tenant, s.record.seq), ())
                                .map_err(write_sm_err)?;
                            sealed_all.push(s);
                        }
                        responses.push(applied.response.unwrap_or(Response::Noop));
                        if let state::Command::RecordUsage {
                            node,
                            batch,
                            entries,
                        } = cmd
                        {
                            // (a batch applied before writes nothing, not even its number)
                            if !applied.writes.is_empty() {
                                usage_applied.push((node, batch, entries));
                            }
                        }
                    }
                }
            }
        }
        tx.commit().map_err(write_sm_err)?;
        if gateway_dirty {
            self.gateway_changes.send_modify(|n| *n += 1);
        }
        if !usage_applied.is_empty() {
            if let Some(sink) = lock(&self.usage_sink).clone() {
                for (node, batch, entries) in &usage_applied {
                    sink(UsageApplied::Batch {
                        node: *node,
                        batch: *batch,
                        entries,
                    });
                }
            }
        }
        if !sealed_all.is_empty() {
            let mut sink = lock(&self.audit);
            sink.since_checkpoint += sealed_all.len() as u64;
            if !sink.lagging {
                let appended = match sink.writer.as_mut() {
                    // A flush that ran between this commit and now may have caught these
                    // records up from the store already: append only what the segments lack.
                    Some(w) => {
                        let have = w.head().0;
                        let missing: Vec<Sealed> = sealed_all
                            .into_iter()
                            .filter(|r| r.record.seq > have)
                            .collect();
                        w.append(&missing).map_err(anyhow::Error::from)
                    }
                    None => Err(anyhow::anyhow!("audit segment writer is not open")),
                };
                if let Err(e) = appended {
                    tracing::error!(error = %e, "audit segment append failed; the next flush catches up from the store");
                    sink.lagging = true;
                }
            }
        }
        self.unflushed.store(true, Ordering::SeqCst);
        Ok(responses)
    }

    fn dump(&self) -> SResult<SnapshotDump> {
        let tx = self.db.begin_read().map_err(read_sm_err)?;
        let meta_t = tx.open_table(SM_META).map_err(read_sm_err)?;
        let get = |k: &str| -> SResult<Option<Vec<u8>>> {
            Ok(meta_t
                .get(k)
                .map_err(read_sm_err)?
                .map(|v| v.value().to_vec()))
        };
        let last_applied: Option<LogId<NodeId>> = match get("last_applied")? {
            Some(b) => serde_json::from_slice(&b).map_err(read_sm_err)?,
            None => None,
        };
        let membership: StoredMembership<NodeId, BasicNode> = match get("membership")? {
            Some(b) => serde_json::from_slice(&b).map_err(read_sm_err)?,
            None => StoredMembership::default(),
        };
        let kv = tx.open_table(KV).map_err(read_sm_err)?;
        let mut state = Vec::new();
        for item in kv.iter().map_err(read_sm_err)? {
            let (k, v) = item.map_err(read_sm_err)?;
            let v = String::from_utf8(v.value().to_vec()).map_err(read_sm_err)?;
            state.push((k.value().to_string(), v));
        }
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, state.len()),
            None => format!("0-0-{}", state.len()),
        };
        Ok((
            SnapshotMeta {
                last_log_id: last_applied,
                last_membership: membership,
                snapshot_id,
            },
            state,
        ))
    }

    fn save_snapshot(&self, bytes: &[u8]) -> SResult<()> {
        let mut tx = self.db.begin_write().map_err(write_sm_err)?;
        tx.set_durability(Durability::Immediate)
            .map_err(write_sm_err)?;
        tx.open_table(SNAPSHOT)
            .map_err(write_sm_err)?
            .insert("current", bytes)
            .map_err(write_sm_err)?;
        tx.commit().map_err(write_sm_err)
    }
}

pub struct SnapshotBuilder {
    inner: Arc<SmInner>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> SResult<Snapshot<TypeConfig>> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let (meta, state) = inner.dump()?;
            let file = SnapshotFile {
                format_version: FORMAT_VERSION,
                meta: meta.clone(),
                state,
            };
            let bytes = to_json(&file).map_err(write_sm_err)?;
            // Storing the snapshot with an fsync also makes every earlier state commit durable.
            inner.save_snapshot(&bytes)?;
            if let Err(e) = inner.flush(None) {
                tracing::error!(error = %e, "audit segment sync at snapshot failed");
            }
            tracing::info!(last_log = ?meta.last_log_id, bytes = bytes.len(), "snapshot built");
            Ok(Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(bytes)),
            })
        })
        .await
        .map_err(write_sm_err)?
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> SResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>)> {
        let last = self.inner.meta_get::<LogId<NodeId>>("last_applied")?;
        let membership = self.inner.meta_get("membership")?.unwrap_or_default();
        Ok((last, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> SResult<Vec<Response>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Applying commits without fsync and takes tens of microseconds: it runs inline on the
        // state machine task rather than paying two thread hand-offs per batch.
        let entries: Vec<_> = entries.into_iter().collect();
        self.inner.apply_blocking(entries)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder {
            inner: self.inner.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> SResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> SResult<()> {
        let bytes = snapshot.into_inner();
        let file: SnapshotFile = serde_json::from_slice(&bytes)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), any(e)))?;
        if file.format_version != FORMAT_VERSION {
            return Err(StorageIOError::read_snapshot(
                Some(meta.signature()),
                any(format!(
                    "snapshot format version {} is not supported",
                    file.format_version
                )),
            )
            .into());
        }
        let inner = self.inner.clone();
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || -> SResult<()> {
            let mut tx = inner.db.begin_write().map_err(write_sm_err)?;
            tx.set_durability(Durability::Immediate)
                .map_err(write_sm_err)?;
            {
                let mut kv = tx.open_table(KV).map_err(write_sm_err)?;
                kv.retain(|_, _| false).map_err(write_sm_err)?;
                for (k, v) in &file.state {
                    kv.insert(k.as_str(), v.as_bytes()).map_err(write_sm_err)?;
                }
                let mut m = tx.open_table(SM_META).map_err(write_sm_err)?;
                let la = to_json(&meta.last_log_id).map_err(write_sm_err)?;
                let mem = to_json(&meta.last_membership).map_err(write_sm_err)?;
                m.insert("last_applied", la.as_slice())
                    .map_err(write_sm_err)?;
                m.insert("membership", mem.as_slice())
                    .map_err(write_sm_err)?;
                tx.open_table(SNAPSHOT)
                    .map_err(write_sm_err)?
                    .insert("current", bytes.as_slice())
                    .map_err(write_sm_err)?;
            }
            tx.commit().map_err(write_sm_err)?;
            inner.gateway_changes.send_modify(|n| *n += 1);
            if let Some(sink) = lock(&inner.usage_sink).clone() {
                sink(UsageApplied::Replaced(&StateReader {
                    inner: inner.clone(),
                }));
            }
            Ok(())
        })
        .await
        .map_err(write_sm_err)?
    }

    async fn get_current_snapshot(&mut self) -> SResult<Option<Snapshot<TypeConfig>>> {
        let tx = self.inner.db.begin_read().map_err(read_sm_err)?;
        let t = tx.open_table(SNAPSHOT).map_err(read_sm_err)?;
        let Some(v) = t.get("current").map_err(read_sm_err)? else {
            return Ok(None);
        };
        let bytes = v.value().to_vec();
        let file: SnapshotFile = serde_json::from_slice(&bytes).map_err(read_sm_err)?;
        Ok(Some(Snapshot {
            meta: file.meta,
            snapshot: Box::new(Cursor::new(bytes)),
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// Read side

/// Filters of an audit query. Times are RFC 3339 strings compared in UTC.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only records of this tenant (`_` for platform-level records).
    pub tenant: Option<String>,
    pub actor: Option<String>,
    pub action: Option<String>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    /// Records at or after this time.
    pub since: Option<String>,
    /// Records before this time.
    pub until: Option<String>,
    /// Records with a sequence number below this one (the `next_before` of the previous page).
    pub before: Option<u64>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize)]
pub struct AuditPage {
    pub items: Vec<audit::Record>,
    /// Pass as `before` to get the next (older) page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_before: Option<u64>,
}

impl AuditQuery {
    fn matches(&self, r: &audit::Record) -> bool {
        fn eq(f: &Option<String>, v: &str) -> bool {
            f.as_deref().is_none_or(|f| f == v)
        }
        let tenant = r.tenant.as_deref().unwrap_or("_");
        eq(&self.tenant, tenant)
            && eq(&self.actor, &r.actor)
            && eq(&self.action, &r.action)
            && eq(&self.resource_type, &r.resource_type)
            && eq(&self.resource_id, &r.resource_id)
            && self.since.as_deref().is_none_or(|s| r.time.as_str() >= s)
            && self.until.as_deref().is_none_or(|u| r.time.as_str() < u)
    }
}

/// Most records one audit query examines, so a rare filter cannot scan seven years at once.
const AUDIT_SCAN_BUDGET: usize = 200_000;

impl StateReader {
    /// Runs `f` over a consistent read view of the applied state.
    pub fn read<T>(
        &self,
        f: impl FnOnce(&dyn KvRead) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let tx = self.inner.db.begin_read().map_err(StoreError::msg)?;
        let t = tx.open_table(KV).map_err(StoreError::msg)?;
        f(&TableKv(&t))
    }

    /// Newest records first.
    pub fn audit(&self, q: &AuditQuery) -> Result<AuditPage, StoreError> {
        let limit = q.limit.unwrap_or(100).clamp(1, 1000);
        let before = q.before.unwrap_or(u64::MAX);
        let tx = self.inner.db.begin_read().map_err(StoreError::msg)?;
        let audit_t = tx.open_table(AUDIT).map_err(StoreError::msg)?;
        let decode = |seq: u64| -> Result<Option<audit::Record>, StoreError> {
            match audit_t.get(seq).map_err(StoreError::msg)? {
                Some(v) => Ok(Some(
                    Sealed::decode(v.value()).map_err(StoreError::msg)?.record,
                )),
                None => Ok(None),
            }
        };
        let seqs: Box<dyn Iterator<Item = Result<u64, StoreError>>> = match &q.tenant {
            Some(t) => {
                let idx = tx.open_table(AUDIT_BY_TENANT).map_err(StoreError::msg)?;
                let range = idx
                    .range((t.as_str(), 0)..(t.as_str(), before))
                    .map_err(StoreError::msg)?;
                Box::new(
                    range
                        .rev()
                        .map(|i| i.map(|(k, _)| k.value().1).map_err(StoreError::msg)),
                )
            }
            None => {
                let range = audit_t.range(..before).map_err(StoreError::msg)?;
                Box::new(
                    range
                        .rev()
                        .map(|i| i.map(|(k, _)| k.value()).map_err(StoreError::msg)),
                )
            }
        };
        let mut items = Vec::new();
        let mut last_seen = None;
        let mut exhausted = true;
        for (n, seq) in seqs.enumerate() {
            let seq = seq?;
            if items.len() == limit || n >= AUDIT_SCAN_BUDGET {
                exhausted = false;
                break;
            }
            last_seen = Some(seq);
            if let Some(r) = decode(seq)? {
                if q.matches(&r) {
                    items.push(r);
                }
            }
        }
        Ok(AuditPage {
            items,
            next_before: if exhausted { None } else { last_seen },
        })
    }

    /// Whether the audit segments hold every record of the store (false after a failed append,
    /// until the next flush catches up).
    pub fn audit_in_sync(&self) -> bool {
        !lock(&self.inner.audit).lagging
    }

    /// The number of audit records and the chain head, from the store.
    pub fn audit_head(&self) -> Result<state::AuditHead, StoreError> {
        self.read(state::audit_head)
    }

    pub fn audit_len(&self) -> Result<u64, StoreError> {
        let tx = self.inner.db.begin_read().map_err(StoreError::msg)?;
        let t = tx.open_table(AUDIT).map_err(StoreError::msg)?;
        t.len().map_err(StoreError::msg)
    }
}
