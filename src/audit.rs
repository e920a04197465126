//! Tamper-evident, hash-chained, append-only audit log.
//!
//! Every accepted state change produces one [`Record`]. Records are sealed into a SHA-256 hash chain
//! ([`seal`]), written to segment files by a [`SegmentWriter`] and periodically covered by checkpoints
//! signed with the node's Ed25519 key ([`Signer`]). [`verify`] re-checks everything and names the
//! first bad place (segment file, byte offset, record seq).
//!
//! The on-disk format is specified in `docs/audit-format.md`; keep the two in sync.
//!
//! Nothing in this module panics on corrupted input: every length read from a file is bounded and
//! every parse is checked.

use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aws_lc_rs::digest;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

/// `prev_hash` of the first record (seq 1).
pub const GENESIS_HASH: [u8; 32] = [0; 32];
/// Segment format version written in every segment header.
pub const FORMAT_VERSION: u16 = 1;
/// First 8 bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"APIMAUDL";
/// Size of the fixed segment header.
pub const SEGMENT_HEADER_LEN: usize = 24;
/// Frame kind byte of a record frame.
pub const KIND_RECORD: u8 = 0x01;
/// Frame kind byte of a checkpoint frame.
pub const KIND_CHECKPOINT: u8 = 0x02;
/// Bytes a frame adds around its body: kind (1) + body length (4) + CRC32C (4).
pub const FRAME_OVERHEAD: usize = 9;
/// Largest accepted frame body (16 MiB). Larger lengths are rejected before allocating.
pub const MAX_FRAME_BODY: u32 = 16 * 1024 * 1024;
/// Fixed part of a record body: seq (8) + prev_hash (32) + hash (32).
pub const RECORD_FIXED_LEN: usize = 72;
/// Domain-separation prefix of the byte string signed by a checkpoint.
pub const CHECKPOINT_DOMAIN: &[u8] = b"apim-audit-checkpoint-v1";
/// Default rotation threshold of a [`SegmentWriter`].
pub const DEFAULT_MAX_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Longest accepted checkpoint time string, in bytes.
pub const MAX_CHECKPOINT_TIME_LEN: usize = 256;
/// Name of the lock file a [`SegmentWriter`] holds in the segment directory.
pub const LOCK_FILE_NAME: &str = ".audit.lock";

const FRAME_HEAD_LEN: usize = 5;
const CHECKPOINT_FIXED_LEN: usize = 8 + 32 + 8 + 2;
const SIGNATURE_LEN: usize = 64;
const WRITE_BUFFER: usize = 256 * 1024;
const READ_BUFFER: usize = 256 * 1024;

// ---------------------------------------------------------------------------------------------
// Records and sealing
// ---------------------------------------------------------------------------------------------

/// Result of the audited operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Denied,
}

/// One audit record. Serialised with `serde_json` into the record payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// 1-based, contiguous.
    pub seq: u64,
    /// RFC 3339 UTC, supplied by the caller.
    pub time: String,
    pub actor: String,
    /// Id of the credential (API token) the actor used, when there was one. Absent from records
    /// written before it existed, and from system records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    pub role: String,
    pub tenant: Option<String>,
    /// e.g. "api.create".
    pub action: String,
    pub resource_type: String,
    pub resource_id: String,
    pub outcome: Outcome,
    pub request_id: String,
    /// Client address.
    pub source: String,
    /// Hex SHA-256 of the change, computed by the caller.
    pub digest: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// A record bound into the hash chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Sealed {
    pub record: Record,
    /// The exact bytes that are hashed and stored (`serde_json::to_vec(&record)` when sealed here).
    pub payload: Vec<u8>,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    digest_to_array(&digest::digest(&digest::SHA256, data))
}

/// Chain hash of a record: SHA-256(prev_hash || payload).
pub fn chain_hash(prev_hash: &[u8; 32], payload: &[u8]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(prev_hash);
    ctx.update(payload);
    digest_to_array(&ctx.finish())
}

fn digest_to_array(d: &digest::Digest) -> [u8; 32] {
    let mut out = [0u8; 32];
    // SHA-256 digests are always 32 bytes.
    out.copy_from_slice(d.as_ref());
    out
}

/// Seal `record` onto the chain ending in `prev_hash`.
///
/// payload = `serde_json::to_vec(&record)`; hash = SHA-256(prev_hash || payload). Deterministic.
pub fn seal(prev_hash: [u8; 32], record: Record) -> Sealed {
    // Serialising this struct cannot fail: all map keys are strings and `Value` holds no NaN.
    let payload = serde_json::to_vec(&record).expect("serialising an audit Record cannot fail");
    let hash = chain_hash(&prev_hash, &payload);
    Sealed {
        record,
        payload,
        prev_hash,
        hash,
    }
}

impl Sealed {
    /// Encode as one record frame (see `docs/audit-format.md`).
    pub fn encode(&self) -> Vec<u8> {
        let body_len = RECORD_FIXED_LEN + self.payload.len();
        let mut out = Vec::with_capacity(FRAME_OVERHEAD + body_len);
        out.push(KIND_RECORD);
        // Oversized payloads are refused by `SegmentWriter::append`; `decode` rejects them too.
        out.extend_from_slice(&u32::try_from(body_len).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(&self.record.seq.to_le_bytes());
        out.extend_from_slice(&self.prev_hash);
        out.extend_from_slice(&self.hash);
        out.extend_from_slice(&self.payload);
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decode exactly one whole record frame (the inverse of [`Sealed::encode`]). Checks the CRC,
    /// the length bound, `hash == SHA-256(prev_hash || payload)` and that the payload's `seq`
    /// equals the frame's seq.
    pub fn decode(frame: &[u8]) -> Result<Sealed, FormatError> {
        let (kind, body) = split_frame(frame)?;
        if kind != KIND_RECORD {
            return Err(FormatError::WrongKind {
                expected: KIND_RECORD,
                found: kind,
            });
        }
        decode_record_body(body)
    }
}

/// Validate a whole in-memory frame and return its kind and body.
fn split_frame(frame: &[u8]) -> Result<(u8, &[u8]), FormatError> {
    let mut cur = Cursor(frame);
    let truncated = || FormatError::Truncated {
        needed: FRAME_OVERHEAD as u64,
        available: frame.len() as u64,
    };
    let [kind] = cur.take::<1>().ok_or_else(truncated)?;
    let len = u32::from_le_bytes(cur.take::<4>().ok_or_else(truncated)?);
    if kind != KIND_RECORD && kind != KIND_CHECKPOINT {
        return Err(FormatError::UnknownKind(kind));
    }
    if len > MAX_FRAME_BODY {
        return Err(FormatError::TooLarge(u64::from(len)));
    }
    let total = FRAME_OVERHEAD as u64 + u64::from(len);
    let available = frame.len() as u64;
    if available < total {
        return Err(FormatError::Truncated {
            needed: total,
            available,
        });
    }
    if available > total {
        return Err(FormatError::TrailingBytes(available - total));
    }
    let body = cur.take_slice(len as usize).ok_or_else(truncated)?;
    let stored = u32::from_le_bytes(cur.take::<4>().ok_or_else(truncated)?);
    let computed = crc32c::crc32c(&frame[..frame.len() - 4]);
    if stored != computed {
        return Err(FormatError::Crc { stored, computed });
    }
    Ok((kind, body))
}

/// Parse and self-check a record body (everything between the length field and the CRC).
fn decode_record_body(body: &[u8]) -> Result<Sealed, FormatError> {
    let mut cur = Cursor(body);
    let short = || {
        FormatError::Malformed(format!(
            "record body is {} bytes, the minimum is {RECORD_FIXED_LEN}",
            body.len()
        ))
    };
    let seq = u64::from_le_bytes(cur.take::<8>().ok_or_else(short)?);
    let prev_hash = cur.take::<32>().ok_or_else(short)?;
    let hash = cur.take::<32>().ok_or_else(short)?;
    let payload = cur.0;
    let computed = chain_hash(&prev_hash, payload);
    if computed != hash {
        return Err(FormatError::HashMismatch {
            stored: hash,
            computed,
        });
    }
    let record: Record =
        serde_json::from_slice(payload).map_err(|e| FormatError::Payload(e.to_string()))?;
    if record.seq != seq {
        return Err(FormatError::SeqMismatch {
            frame: seq,
            payload: record.seq,
        });
    }
    Ok(Sealed {
        record,
        payload: payload.to_vec(),
        prev_hash,
        hash,
    })
}

/// Panic-free little-endian reader over a byte slice.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }

    fn take_slice(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// A violation of the byte format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("truncated: {needed} bytes needed, {available} available")]
    Truncated { needed: u64, available: u64 },
    #[error("bad magic (not an apim audit segment)")]
    BadMagic,
    #[error("segment header CRC mismatch (stored {stored:08x}, computed {computed:08x})")]
    HeaderCrc { stored: u32, computed: u32 },
    #[error("unsupported format version {0}")]
    UnsupportedVersion(u16),
    #[error("reserved header field is {0:#06x}, expected 0")]
    Reserved(u16),
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    #[error("unexpected frame kind {found:#04x} (expected {expected:#04x})")]
    WrongKind { expected: u8, found: u8 },
    #[error("frame body length {0} exceeds the limit of {MAX_FRAME_BODY} bytes")]
    TooLarge(u64),
    #[error("frame CRC32C mismatch (stored {stored:08x}, computed {computed:08x})")]
    Crc { stored: u32, computed: u32 },
    #[error("{0} trailing bytes after the frame")]
    TrailingBytes(u64),
    #[error(
        "hash mismatch: stored {}, SHA-256(prev_hash || payload) is {}",
        hex::encode(.stored),
        hex::encode(.computed)
    )]
    HashMismatch {
        stored: [u8; 32],
        computed: [u8; 32],
    },
    #[error("payload is not a valid audit record: {0}")]
    Payload(String),
    #[error("payload seq {payload} differs from frame seq {frame}")]
    SeqMismatch { frame: u64, payload: u64 },
    #[error("checkpoint time is {0} bytes long (at most {MAX_CHECKPOINT_TIME_LEN} allowed)")]
    TimeTooLong(usize),
    #[error("malformed: {0}")]
    Malformed(String),
}

/// Errors of the audit writer and key handling.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit I/O error on {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("audit format error at {at}: {source}")]
    Format {
        /// Where: "<segment file> offset <n>", or the operation.
        at: String,
        #[source]
        source: FormatError,
    },
    #[error("audit chain violation at seq {seq}: {reason}")]
    Chain { seq: u64, reason: String },
    #[error(
        "audit segments diverge from the durable store at seq {seq}: durable hash {}, segment hash {}",
        hex::encode(.durable),
        hex::encode(.segment)
    )]
    Diverged {
        seq: u64,
        durable: [u8; 32],
        segment: [u8; 32],
    },
    #[error("audit signing key error: {0}")]
    Key(String),
    #[error("audit directory {} is locked by another writer", .0.display())]
    Locked(PathBuf),
    #[error("audit writer is unusable after an earlier I/O error; reopen it")]
    Poisoned,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

// ---------------------------------------------------------------------------------------------
// Segment header and frame reading
// ---------------------------------------------------------------------------------------------

/// File name of the segment whose first record has seq `first_seq`.
pub fn segment_file_name(first_seq: u64) -> String {
    format!("audit-{first_seq:020}.seg")
}

/// Inverse of [`segment_file_name`]; `None` for any other name.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("audit-")?.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn encode_header(first_seq: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    // h[10..12]: reserved, zero.
    h[12..20].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..20]);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Check a segment header and return its first seq.
fn decode_header(h: &[u8; SEGMENT_HEADER_LEN]) -> Result<u64, FormatError> {
    let mut cur = Cursor(h);
    let short = || FormatError::Malformed("short header".into());
    let magic = cur.take::<8>().ok_or_else(short)?;
    let version = u16::from_le_bytes(cur.take::<2>().ok_or_else(short)?);
    let reserved = u16::from_le_bytes(cur.take::<2>().ok_or_else(short)?);
    let first_seq = u64::from_le_bytes(cur.take::<8>().ok_or_else(short)?);
    let stored = u32::from_le_bytes(cur.take::<4>().ok_or_else(short)?);
    if magic != SEGMENT_MAGIC {
        return Err(FormatError::BadMagic);
    }
    let computed = crc32c::crc32c(&h[0..20]);
    if stored != computed {
        return Err(FormatError::HeaderCrc { stored, computed });
    }
    if version != FORMAT_VERSION {
        return Err(FormatError::UnsupportedVersion(version));
    }
    if reserved != 0 {
        return Err(FormatError::Reserved(reserved));
    }
    Ok(first_seq)
}

/// Outcome of reading one frame from a segment file.
enum FrameRead {
    /// Clean end of file at a frame boundary.
    Eof,
    /// A CRC-valid frame of a known kind; `len` is the whole frame length.
    Frame { kind: u8, body: Vec<u8>, len: u64 },
    /// The frame runs past the end of the file.
    Incomplete {
        needed: u64,
        available: u64,
        kind: Option<u8>,
    },
    /// The frame is complete (or its length is invalid) but damaged. `frame_end` is known when the
    /// declared length was usable.
    Corrupt {
        err: FormatError,
        kind: u8,
        frame_end: Option<u64>,
    },
}

/// Read the frame at `offset` (the reader must be positioned there); `file_len` bounds all reads.
fn read_frame<R: Read>(r: &mut R, offset: u64, file_len: u64) -> io::Result<FrameRead> {
    let remaining = file_len.saturating_sub(offset);
    if remaining == 0 {
        return Ok(FrameRead::Eof);
    }
    if remaining < FRAME_HEAD_LEN as u64 {
        return Ok(FrameRead::Incomplete {
            needed: FRAME_OVERHEAD as u64,
            available: remaining,
            kind: None,
        });
    }
    let mut head = [0u8; FRAME_HEAD_LEN];
    if let Some(short) = read_exact_or_eof(r, &mut head, remaining, None)? {
        return Ok(short);
    }
    let kind = head[0];
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
    if kind != KIND_RECORD && kind != KIND_CHECKPOINT {
        return Ok(FrameRead::Corrupt {
            err: FormatError::UnknownKind(kind),
            kind,
            frame_end: None,
        });
    }
    if len > MAX_FRAME_BODY {
        return Ok(FrameRead::Corrupt {
            err: FormatError::TooLarge(u64::from(len)),
            kind,
            frame_end: None,
        });
    }
    let total = FRAME_OVERHEAD as u64 + u64::from(len);
    if total > remaining {
        return Ok(FrameRead::Incomplete {
            needed: total,
            available: remaining,
            kind: Some(kind),
        });
    }
    // Bounded by MAX_FRAME_BODY and by the bytes actually present in the file.
    let mut body = vec![0u8; len as usize];
    if let Some(short) = read_exact_or_eof(r, &mut body, remaining, Some(kind))? {
        return Ok(short);
    }
    let mut crc = [0u8; 4];
    if let Some(short) = read_exact_or_eof(r, &mut crc, remaining, Some(kind))? {
        return Ok(short);
    }
    let stored = u32::from_le_bytes(crc);
    let computed = crc32c::crc32c_append(crc32c::crc32c(&head), &body);
    if stored != computed {
        return Ok(FrameRead::Corrupt {
            err: FormatError::Crc { stored, computed },
            kind,
            frame_end: Some(offset + total),
        });
    }
    Ok(FrameRead::Frame {
        kind,
        body,
        len: total,
    })
}

/// `read_exact`, mapping an early EOF (the file shrank under us) to `FrameRead::Incomplete`.
fn read_exact_or_eof<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    remaining: u64,
    kind: Option<u8>,
) -> io::Result<Option<FrameRead>> {
    match r.read_exact(buf) {
        Ok(()) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(Some(FrameRead::Incomplete {
            needed: remaining.saturating_add(1),
            available: remaining,
            kind,
        })),
        Err(e) => Err(e),
    }
}

/// Segment files in `dir`, sorted by first seq. Other files are ignored.
fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(first_seq) = name.to_str().and_then(parse_segment_file_name) else {
            continue;
        };
        if entry.file_type()?.is_file() {
            out.push((first_seq, entry.path()));
        }
    }
    out.sort_by_key(|(first_seq, _)| *first_seq);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Checkpoints and signing
// ---------------------------------------------------------------------------------------------

/// A signed checkpoint: the node's statement that the chain reached `(seq, hash)` at `time`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: [u8; 32],
    /// First 8 bytes of SHA-256(public key). A selector only; the signature is what counts.
    pub key_id: [u8; 8],
    pub time: String,
    pub signature: [u8; 64],
}

impl Checkpoint {
    fn unsigned_body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(CHECKPOINT_FIXED_LEN + self.time.len());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.hash);
        out.extend_from_slice(&self.key_id);
        // The writer limits `time` to MAX_CHECKPOINT_TIME_LEN, far below u16::MAX.
        out.extend_from_slice(
            &u16::try_from(self.time.len())
                .unwrap_or(u16::MAX)
                .to_le_bytes(),
        );
        out.extend_from_slice(self.time.as_bytes());
        out
    }

    /// The byte string the Ed25519 signature covers:
    /// `CHECKPOINT_DOMAIN || seq || hash || key_id || time_len || time`.
    pub fn signed_message(&self) -> Vec<u8> {
        let mut msg = CHECKPOINT_DOMAIN.to_vec();
        msg.extend_from_slice(&self.unsigned_body());
        msg
    }

    /// Checkpoint frame body (unsigned part followed by the signature).
    pub fn encode_body(&self) -> Vec<u8> {
        let mut out = self.unsigned_body();
        out.extend_from_slice(&self.signature);
        out
    }

    /// Parse a checkpoint frame body.
    pub fn decode_body(body: &[u8]) -> Result<Checkpoint, FormatError> {
        let mut cur = Cursor(body);
        let short =
            || FormatError::Malformed(format!("checkpoint body too short ({} bytes)", body.len()));
        let seq = u64::from_le_bytes(cur.take::<8>().ok_or_else(short)?);
        let hash = cur.take::<32>().ok_or_else(short)?;
        let key_id = cur.take::<8>().ok_or_else(short)?;
        let time_len = u16::from_le_bytes(cur.take::<2>().ok_or_else(short)?);
        let time = cur.take_slice(usize::from(time_len)).ok_or_else(short)?;
        let signature = cur.take::<SIGNATURE_LEN>().ok_or_else(short)?;
        if !cur.0.is_empty() {
            return Err(FormatError::Malformed(format!(
                "{} unexpected bytes after the checkpoint signature",
                cur.0.len()
            )));
        }
        let time = std::str::from_utf8(time)
            .map_err(|_| FormatError::Malformed("checkpoint time is not UTF-8".into()))?
            .to_owned();
        Ok(Checkpoint {
            seq,
            hash,
            key_id,
            time,
            signature,
        })
    }

    /// Whether the signature is a valid Ed25519 signature by `public_key` (raw 32 bytes).
    pub fn verify_signature(&self, public_key: &[u8]) -> bool {
        UnparsedPublicKey::new(&signature::ED25519, public_key)
            .verify(&self.signed_message(), &self.signature)
            .is_ok()
    }
}

/// Raw key id: first 8 bytes of SHA-256(public key).
pub fn key_id_bytes(public_key: &[u8]) -> [u8; 8] {
    let h = sha256(public_key);
    let mut id = [0u8; 8];
    id.copy_from_slice(&h[..8]);
    id
}

/// Hex key id: hex of the first 8 bytes of SHA-256(public key).
pub fn key_id(public_key: &[u8]) -> String {
    hex::encode(key_id_bytes(public_key))
}

/// Read a public-key file as written by [`Signer::load_or_create`]: 64 hex characters (surrounding
/// whitespace ignored), or exactly 32 raw bytes.
pub fn read_public_key(path: &Path) -> Result<Vec<u8>, AuditError> {
    let data = fs::read(path).map_err(io_err(path))?;
    parse_public_key(&data)
        .ok_or_else(|| AuditError::Key(format!("{} is not an Ed25519 public key", path.display())))
}

fn parse_public_key(data: &[u8]) -> Option<Vec<u8>> {
    let text = data.trim_ascii();
    if text.len() == 64 {
        if let Ok(key) = hex::decode(text) {
            return Some(key);
        }
    }
    (data.len() == 32).then(|| data.to_vec())
}

/// Ed25519 node signing key.
pub struct Signer {
    key_pair: Ed25519KeyPair,
    public_key: [u8; 32],
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id())
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Load the PKCS#8 private key at `private_key_path`, or create it (mode 0600) if it does not
    /// exist. The public key is kept at `public_key_path` as 64 hex characters and a newline; it is
    /// written if missing and must match the private key if present. An existing private key that is
    /// accessible by group or others is refused, and so is a missing private key whose public-key
    /// file exists (the key was lost: old checkpoints could no longer be verified with a new one).
    pub fn load_or_create(
        private_key_path: &Path,
        public_key_path: &Path,
    ) -> Result<Signer, AuditError> {
        let signer = match fs::read(private_key_path) {
            Ok(der) => {
                let meta = fs::metadata(private_key_path).map_err(io_err(private_key_path))?;
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(AuditError::Key(format!(
                        "{} has mode {mode:04o}; it must not be accessible by group or others \
                         (chmod 600)",
                        private_key_path.display()
                    )));
                }
                Signer::from_pkcs8(&der).map_err(|e| match e {
                    AuditError::Key(msg) => {
                        AuditError::Key(format!("{}: {msg}", private_key_path.display()))
                    }
                    other => other,
                })?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if fs::symlink_metadata(public_key_path).is_ok() {
                    return Err(AuditError::Key(format!(
                        "private key {} is missing but public key {} exists; restore the private \
                         key or remove the public key file deliberately",
                        private_key_path.display(),
                        public_key_path.display()
                    )));
                }
                let der = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                    .map_err(|_| AuditError::Key("Ed25519 key generation failed".into()))?;
                write_file_atomic(private_key_path, der.as_ref(), 0o600)?;
                Signer::from_pkcs8(der.as_ref())?
            }
            Err(e) => return Err(io_err(private_key_path)(e)),
        };
        match fs::read(public_key_path) {
            Ok(data) => {
                if parse_public_key(&data).as_deref() != Some(&signer.public_key[..]) {
                    return Err(AuditError::Key(format!(
                        "public key file {} does not match private key {} (key id {})",
                        public_key_path.display(),
                        private_key_path.display(),
                        signer.key_id()
                    )));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let text = format!("{}\n", hex::encode(signer.public_key));
                write_file_atomic(public_key_path, text.as_bytes(), 0o644)?;
            }
            Err(e) => return Err(io_err(public_key_path)(e)),
        }
        Ok(signer)
    }

    /// Build a signer from an unencrypted PKCS#8 (v1 or v2) Ed25519 private key.
    pub fn from_pkcs8(der: &[u8]) -> Result<Signer, AuditError> {
        let key_pair = Ed25519KeyPair::from_pkcs8(der)
            .map_err(|e| AuditError::Key(format!("invalid PKCS#8 Ed25519 private key: {e}")))?;
        let public_key = <[u8; 32]>::try_from(key_pair.public_key().as_ref())
            .map_err(|_| AuditError::Key("Ed25519 public key is not 32 bytes".into()))?;
        Ok(Signer {
            key_pair,
            public_key,
        })
    }

    /// A fresh in-memory key (not persisted).
    pub fn generate() -> Result<Signer, AuditError> {
        let der = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| AuditError::Key("Ed25519 key generation failed".into()))?;
        Signer::from_pkcs8(der.as_ref())
    }

    /// Raw 32-byte Ed25519 public key.
    pub fn public_key(&self) -> &[u8] {
        &self.public_key
    }

    /// Hex of the first 8 bytes of SHA-256(public key).
    pub fn key_id(&self) -> String {
        key_id(&self.public_key)
    }

    /// Produce a signed checkpoint over `(seq, hash, time)`.
    pub fn sign_checkpoint(&self, seq: u64, hash: [u8; 32], time: &str) -> Checkpoint {
        let mut ckpt = Checkpoint {
            seq,
            hash,
            key_id: key_id_bytes(&self.public_key),
            time: time.to_owned(),
            signature: [0u8; 64],
        };
        let sig = self.key_pair.sign(&ckpt.signed_message());
        // Ed25519 signatures are always 64 bytes.
        ckpt.signature.copy_from_slice(sig.as_ref());
        ckpt
    }
}

/// Write `data` to `path` via a temporary file, fsync, rename and fsync the directory.
fn write_file_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), AuditError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = parent.join(tmp_name);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err(&tmp))?;
    f.write_all(data).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err(path))?;
    sync_dir(&parent)
}

fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

// ---------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------

struct Current {
    path: PathBuf,
    file: BufWriter<File>,
    /// Bytes in the file including buffered ones.
    size: u64,
    /// Records in this segment.
    records: u64,
}

/// Appends sealed records to segment files in one directory. Holds an exclusive lock on the
/// directory (`.audit.lock`) for its lifetime.
pub struct SegmentWriter {
    dir: PathBuf,
    signer: Signer,
    head: (u64, [u8; 32]),
    current: Option<Current>,
    max_segment_bytes: u64,
    last_checkpoint_seq: Option<u64>,
    dir_dirty: bool,
    poisoned: bool,
    _lock: File,
}

impl fmt::Debug for SegmentWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SegmentWriter")
            .field("dir", &self.dir)
            .field("head_seq", &self.head.0)
            .field("head_hash", &hex::encode(self.head.1))
            .field("max_segment_bytes", &self.max_segment_bytes)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

/// What `open` found in the last usable segment.
struct TailScan {
    head: (u64, [u8; 32]),
    keep_len: u64,
    file_len: u64,
    records: u64,
    last_checkpoint_seq: Option<u64>,
}

enum ScanOutcome {
    /// No complete record (torn header or torn first frame): the whole file is discarded.
    Empty,
    Usable(TailScan),
}

impl SegmentWriter {
    /// Open (create) the segment directory and reconcile it with the durable head `durable`
    /// (`(0, GENESIS_HASH)` when empty):
    ///
    /// * segments whose first seq is beyond `durable.0` are discarded (renamed to
    ///   `<name>.discarded.<n>`, never deleted);
    /// * the last remaining segment is scanned: a torn trailing frame is cut, records with
    ///   seq > `durable.0` (and everything after them) are cut and kept in a `.discarded.<n>` file;
    /// * if the segments hold seq `durable.0` with a different hash, `AuditError::Diverged` is
    ///   returned and nothing is changed;
    /// * if the segments end before `durable.0`, the writer is returned with the shorter head and
    ///   the caller appends the missing records.
    ///
    /// Corruption that is not a torn tail and lies at or before the durable head is an error
    /// (`AuditError::Format` / `AuditError::Chain`); run [`verify`] to locate it.
    pub fn open(
        dir: &Path,
        signer: Signer,
        durable: (u64, [u8; 32]),
    ) -> Result<SegmentWriter, AuditError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock_path = dir.join(LOCK_FILE_NAME);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(AuditError::Locked(dir.to_path_buf())),
            Err(TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
        }

        // Plan first, then change the directory, so that an error leaves everything untouched.
        let mut segs = list_segments(dir).map_err(io_err(dir))?;
        let mut discard = Vec::new();
        while segs.last().is_some_and(|(first, _)| *first > durable.0) {
            if let Some((_, path)) = segs.pop() {
                discard.push(path);
            }
        }
        let mut keep: Option<(PathBuf, TailScan)> = None;
        while let Some((first_seq, path)) = segs.pop() {
            match scan_segment_for_open(&path, first_seq, durable)? {
                ScanOutcome::Empty => discard.push(path),
                ScanOutcome::Usable(scan) => {
                    keep = Some((path, scan));
                    break;
                }
            }
        }
        let head = keep.as_ref().map_or((0, GENESIS_HASH), |(_, s)| s.head);
        if head.0 == durable.0 && head.1 != durable.1 {
            return Err(AuditError::Diverged {
                seq: head.0,
                durable: durable.1,
                segment: head.1,
            });
        }

        let mut dir_changed = false;
        for path in &discard {
            let target = discard_path(path)?;
            fs::rename(path, &target).map_err(io_err(path))?;
            dir_changed = true;
        }
        let mut current = None;
        let mut last_checkpoint_seq = None;
        if let Some((path, scan)) = keep {
            if scan.keep_len < scan.file_len {
                dir_changed |= cut_tail(&path, scan.keep_len)?;
            }
            let file = OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(io_err(&path))?;
            current = Some(Current {
                path,
                file: BufWriter::with_capacity(WRITE_BUFFER, file),
                size: scan.keep_len,
                records: scan.records,
            });
            last_checkpoint_seq = scan.last_checkpoint_seq;
        }
        if dir_changed {
            sync_dir(dir)?;
        }
        Ok(SegmentWriter {
            dir: dir.to_path_buf(),
            signer,
            head,
            current,
            max_segment_bytes: DEFAULT_MAX_SEGMENT_BYTES,
            last_checkpoint_seq,
            dir_dirty: false,
            poisoned: false,
            _lock: lock,
        })
    }

    /// Last seq and hash in the segments (`(0, GENESIS_HASH)` when there are none).
    pub fn head(&self) -> (u64, [u8; 32]) {
        self.head
    }

    /// Whether a checkpoint would add anything: records exist past the last signed one.
    pub fn checkpoint_due(&self) -> bool {
        self.head.0 != 0 && self.last_checkpoint_seq != Some(self.head.0)
    }

    /// The segment directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The node signing key used for checkpoints.
    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// Rotation threshold (default 64 MiB). A segment is closed before a record would take it past
    /// this size; every segment holds at least one record.
    pub fn set_max_segment_bytes(&mut self, bytes: u64) {
        self.max_segment_bytes = bytes;
    }

    pub fn max_segment_bytes(&self) -> u64 {
        self.max_segment_bytes
    }

    /// Append already-sealed records; they must continue the chain (seq = head + 1, prev_hash =
    /// head hash, hash = SHA-256(prev_hash || payload), payload seq = record seq), else
    /// `AuditError::Chain` and nothing is written. Written to the OS at the end of the call, no fsync (except that a segment is
    /// fsynced when it is rotated out, so only the newest segment can ever have a torn tail).
    pub fn append(&mut self, records: &[Sealed]) -> Result<(), AuditError> {
        self.check_poisoned()?;
        let (mut seq, mut hash) = self.head;
        for s in records {
            let expected = seq.checked_add(1).ok_or_else(|| AuditError::Chain {
                seq,
                reason: "sequence number overflow".into(),
            })?;
            validate_for_append(s, expected, &hash)?;
            seq = expected;
            hash = s.hash;
        }
        for s in records {
            let frame = s.encode();
            if let Err(e) = self.write_record_frame(s.record.seq, &frame) {
                self.poisoned = true;
                return Err(e);
            }
            self.head = (s.record.seq, s.hash);
        }
        // Hand whole frames to the OS (no fsync), so a reader of a running node's segments
        // never sees a frame cut by our own buffer.
        if let Some(cur) = self.current.as_mut() {
            if let Err(e) = cur.file.flush() {
                self.poisoned = true;
                return Err(io_err(&cur.path)(e));
            }
        }
        Ok(())
    }

    /// Flush buffered frames and fsync the current segment (and the directory after a rotation).
    pub fn sync(&mut self) -> Result<(), AuditError> {
        self.check_poisoned()?;
        let result = self.sync_inner();
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }

    /// Write a checkpoint frame signing (head seq, head hash, time, key id) and fsync. No-op if no
    /// record was appended since the last checkpoint (or there is no record at all).
    pub fn checkpoint(&mut self, time: &str) -> Result<(), AuditError> {
        self.check_poisoned()?;
        if !self.checkpoint_due() {
            return Ok(());
        }
        if time.len() > MAX_CHECKPOINT_TIME_LEN {
            return Err(AuditError::Format {
                at: "checkpoint".into(),
                source: FormatError::TimeTooLong(time.len()),
            });
        }
        let ckpt = self.signer.sign_checkpoint(self.head.0, self.head.1, time);
        let frame = encode_frame(KIND_CHECKPOINT, &ckpt.encode_body());
        // head > 0 implies an open segment (open() keeps the segment holding the head).
        let Some(cur) = self.current.as_mut() else {
            return Ok(());
        };
        if let Err(e) = cur.file.write_all(&frame) {
            self.poisoned = true;
            return Err(io_err(&cur.path)(e));
        }
        cur.size += frame.len() as u64;
        self.sync()?;
        self.last_checkpoint_seq = Some(self.head.0);
        Ok(())
    }

    fn check_poisoned(&self) -> Result<(), AuditError> {
        if self.poisoned {
            Err(AuditError::Poisoned)
        } else {
            Ok(())
        }
    }

    fn sync_inner(&mut self) -> Result<(), AuditError> {
        if let Some(cur) = self.current.as_mut() {
            cur.file.flush().map_err(io_err(&cur.path))?;
            cur.file.get_ref().sync_data().map_err(io_err(&cur.path))?;
        }
        if self.dir_dirty {
            sync_dir(&self.dir)?;
            self.dir_dirty = false;
        }
        Ok(())
    }

    fn write_record_frame(&mut self, seq: u64, frame: &[u8]) -> Result<(), AuditError> {
        let frame_len = frame.len() as u64;
        let rotate = match &self.current {
            None => true,
            Some(cur) => {
                cur.records > 0 && cur.size.saturating_add(frame_len) > self.max_segment_bytes
            }
        };
        if rotate {
            self.rotate(seq)?;
        }
        let Some(cur) = self.current.as_mut() else {
            return Err(AuditError::Chain {
                seq,
                reason: "no segment open".into(),
            });
        };
        cur.file.write_all(frame).map_err(io_err(&cur.path))?;
        cur.size += frame_len;
        cur.records += 1;
        Ok(())
    }

    /// Close the current segment durably and start `audit-{first_seq}.seg`.
    fn rotate(&mut self, first_seq: u64) -> Result<(), AuditError> {
        if let Some(mut old) = self.current.take() {
            old.file.flush().map_err(io_err(&old.path))?;
            old.file.get_ref().sync_data().map_err(io_err(&old.path))?;
        }
        // The closed segment's directory entry must be durable before a later one can be.
        if self.dir_dirty {
            sync_dir(&self.dir)?;
            self.dir_dirty = false;
        }
        let path = self.dir.join(segment_file_name(first_seq));
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        self.dir_dirty = true;
        let mut file = BufWriter::with_capacity(WRITE_BUFFER, file);
        file.write_all(&encode_header(first_seq))
            .map_err(io_err(&path))?;
        self.current = Some(Current {
            path,
            file,
            size: SEGMENT_HEADER_LEN as u64,
            records: 0,
        });
        Ok(())
    }
}

fn validate_for_append(s: &Sealed, expected: u64, prev: &[u8; 32]) -> Result<(), AuditError> {
    let seq = s.record.seq;
    let chain = |reason: String| AuditError::Chain { seq, reason };
    if seq != expected {
        return Err(chain(format!("expected seq {expected}")));
    }
    if &s.prev_hash != prev {
        return Err(chain(format!(
            "prev_hash {} is not the head hash {}",
            hex::encode(s.prev_hash),
            hex::encode(prev)
        )));
    }
    if chain_hash(&s.prev_hash, &s.payload) != s.hash {
        return Err(chain("hash is not SHA-256(prev_hash || payload)".into()));
    }
    #[derive(Deserialize)]
    struct SeqOnly {
        seq: u64,
    }
    match serde_json::from_slice::<SeqOnly>(&s.payload) {
        Ok(p) if p.seq == seq => {}
        Ok(p) => {
            return Err(chain(format!(
                "payload seq {} differs from record seq",
                p.seq
            )))
        }
        Err(e) => return Err(chain(format!("payload is not a JSON record: {e}"))),
    }
    if RECORD_FIXED_LEN + s.payload.len() > MAX_FRAME_BODY as usize {
        return Err(AuditError::Format {
            at: format!("append seq {seq}"),
            source: FormatError::TooLarge((RECORD_FIXED_LEN + s.payload.len()) as u64),
        });
    }
    Ok(())
}

fn encode_frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_OVERHEAD + body.len());
    out.push(kind);
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(body);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// A free `<segment name>.discarded.<n>` path next to `path`.
fn discard_path(path: &Path) -> Result<PathBuf, AuditError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for n in 1..=u32::MAX {
        let candidate = path.with_file_name(format!("{name}.discarded.{n}"));
        if fs::symlink_metadata(&candidate).is_err() {
            return Ok(candidate);
        }
    }
    Err(AuditError::Io {
        path: path.to_path_buf(),
        source: io::Error::other("no free .discarded name"),
    })
}

/// Truncate `path` to `keep_len`. Unless the cut bytes are all zero, they are first copied to a
/// `<name>.discarded.<n>` file (never silently destroy audit data). Returns whether a file was
/// created.
fn cut_tail(path: &Path, keep_len: u64) -> Result<bool, AuditError> {
    let save = !rest_is_zero(path, keep_len)?;
    if save {
        let target = discard_path(path)?;
        let mut src = File::open(path).map_err(io_err(path))?;
        src.seek(SeekFrom::Start(keep_len)).map_err(io_err(path))?;
        let mut dst = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)
            .map_err(io_err(&target))?;
        io::copy(&mut src, &mut dst).map_err(io_err(&target))?;
        dst.sync_all().map_err(io_err(&target))?;
    }
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    f.set_len(keep_len).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    Ok(save)
}

/// Whether every byte of `path` from `offset` on is zero (a preallocated or zero-filled torn tail).
fn rest_is_zero(path: &Path, offset: u64) -> Result<bool, AuditError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    f.seek(SeekFrom::Start(offset)).map_err(io_err(path))?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            return Ok(true);
        }
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
    }
}

/// Scan one segment for `open`: validate its frames and chain, find the head (capped at the
/// durable seq) and the length to keep.
fn scan_segment_for_open(
    path: &Path,
    first_seq: u64,
    durable: (u64, [u8; 32]),
) -> Result<ScanOutcome, AuditError> {
    let name = segment_file_name(first_seq);
    let at = |offset: u64| format!("{name} offset {offset}");
    let file = File::open(path).map_err(io_err(path))?;
    let file_len = file.metadata().map_err(io_err(path))?.len();
    if file_len < SEGMENT_HEADER_LEN as u64 {
        return Ok(ScanOutcome::Empty); // torn while being created
    }
    let mut r = BufReader::with_capacity(READ_BUFFER, file);
    let mut header = [0u8; SEGMENT_HEADER_LEN];
    r.read_exact(&mut header).map_err(io_err(path))?;
    match decode_header(&header) {
        Ok(seq) if seq == first_seq => {}
        Ok(seq) => {
            return Err(AuditError::Format {
                at: at(0),
                source: FormatError::Malformed(format!(
                    "header first seq {seq} does not match the file name"
                )),
            })
        }
        Err(_) if rest_is_zero(path, 0)? => return Ok(ScanOutcome::Empty),
        Err(e) => {
            return Err(AuditError::Format {
                at: at(0),
                source: e,
            })
        }
    }

    let mut offset = SEGMENT_HEADER_LEN as u64;
    let mut expected = first_seq;
    // The first record's prev_hash is only known here for the very first segment.
    let mut prev: Option<[u8; 32]> = (first_seq == 1).then_some(GENESIS_HASH);
    let mut head: Option<(u64, [u8; 32])> = None;
    let mut records = 0u64;
    let mut last_checkpoint_seq = None;
    let mut cut: Option<u64> = None;
    // Whether everything from the current position on lies beyond the durable head (may be cut).
    let beyond_durable = |expected: u64| expected.saturating_sub(1) >= durable.0;
    loop {
        match read_frame(&mut r, offset, file_len).map_err(io_err(path))? {
            FrameRead::Eof => break,
            FrameRead::Incomplete { .. } => {
                cut = Some(offset); // torn last frame
                break;
            }
            FrameRead::Corrupt { err, frame_end, .. } => {
                // A damaged frame that ends the file, or a zero-filled tail, is a torn write.
                let torn = frame_end == Some(file_len) || rest_is_zero(path, offset)?;
                if torn || beyond_durable(expected) {
                    cut = Some(offset);
                } else {
                    return Err(AuditError::Format {
                        at: at(offset),
                        source: err,
                    });
                }
                break;
            }
            FrameRead::Frame { kind, body, len } if kind == KIND_RECORD => {
                let sealed = match decode_record_body(&body) {
                    Ok(s) => s,
                    Err(_) if beyond_durable(expected) => {
                        cut = Some(offset);
                        break;
                    }
                    Err(e) => {
                        return Err(AuditError::Format {
                            at: at(offset),
                            source: e,
                        })
                    }
                };
                let seq = sealed.record.seq;
                if seq > durable.0 {
                    cut = Some(offset);
                    break;
                }
                if seq != expected {
                    return Err(AuditError::Chain {
                        seq,
                        reason: format!("{}: expected seq {expected}", at(offset)),
                    });
                }
                if prev.is_some_and(|p| p != sealed.prev_hash) {
                    return Err(AuditError::Chain {
                        seq,
                        reason: format!(
                            "{}: prev_hash does not match the previous record",
                            at(offset)
                        ),
                    });
                }
                if seq == durable.0 && sealed.hash != durable.1 {
                    return Err(AuditError::Diverged {
                        seq,
                        durable: durable.1,
                        segment: sealed.hash,
                    });
                }
                head = Some((seq, sealed.hash));
                prev = Some(sealed.hash);
                expected = expected.saturating_add(1);
                records += 1;
                offset += len;
            }
            FrameRead::Frame { body, len, .. } => {
                match Checkpoint::decode_body(&body) {
                    Ok(c) => last_checkpoint_seq = Some(c.seq),
                    Err(_) if beyond_durable(expected) => {
                        cut = Some(offset);
                        break;
                    }
                    Err(e) => {
                        return Err(AuditError::Format {
                            at: at(offset),
                            source: e,
                        })
                    }
                }
                offset += len;
            }
        }
    }
    let Some(head) = head else {
        return Ok(ScanOutcome::Empty);
    };
    let keep_len = cut.unwrap_or(file_len);
    Ok(ScanOutcome::Usable(TailScan {
        head,
        keep_len,
        file_len,
        records,
        last_checkpoint_seq,
    }))
}

// ---------------------------------------------------------------------------------------------
// Verification
// ---------------------------------------------------------------------------------------------

/// Summary of a successful verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub segments: usize,
    pub records: u64,
    pub checkpoints: u64,
    pub head_seq: u64,
    pub head_hash: [u8; 32],
    /// Seq covered by the last valid checkpoint; records after it are protected by the hash chain
    /// only.
    pub last_checkpoint_seq: Option<u64>,
}

/// The first problem found by [`verify`] or [`read_all`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyFailure {
    /// Segment file name ("" when the problem is not in a segment, e.g. unreadable directory).
    pub segment: String,
    /// Byte offset of the bad header (0) or frame in that segment, or the segment's end when
    /// records are missing after it.
    pub offset: u64,
    /// Seq of the first bad or missing record, when the problem concerns a record.
    pub seq: Option<u64>,
    pub reason: String,
}

impl fmt::Display for VerifyFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.segment.is_empty() {
            write!(f, "{} offset {}", self.segment, self.offset)?;
            if let Some(seq) = self.seq {
                write!(f, " (record seq {seq})")?;
            }
            f.write_str(": ")?;
        } else if let Some(seq) = self.seq {
            write!(f, "record seq {seq}: ")?;
        }
        f.write_str(&self.reason)
    }
}

impl std::error::Error for VerifyFailure {}

fn failure(
    segment: &str,
    offset: u64,
    seq: Option<u64>,
    reason: impl Into<String>,
) -> VerifyFailure {
    VerifyFailure {
        segment: segment.to_owned(),
        offset,
        seq,
        reason: reason.into(),
    }
}

/// Verify the whole chain across all segments in order, and every checkpoint against the trusted
/// Ed25519 `public_key` (raw 32 bytes). Returns the first failure.
pub fn verify(dir: &Path, public_key: &[u8]) -> Result<VerifyReport, VerifyFailure> {
    verify_with(dir, &[public_key], None)
}

/// [`verify`] with several trusted keys (e.g. across a key rotation; each checkpoint's key id
/// selects the key) and an optional expected head `(seq, hash)` from an independent source, such as
/// the durable store or a published checkpoint: the chain must reach that seq with that hash, which
/// also detects a truncated newest segment.
pub fn verify_with(
    dir: &Path,
    public_keys: &[&[u8]],
    expected_head: Option<(u64, [u8; 32])>,
) -> Result<VerifyReport, VerifyFailure> {
    if public_keys.is_empty() {
        return Err(failure("", 0, None, "no trusted public key given"));
    }
    let mut keys = Vec::with_capacity(public_keys.len());
    for key in public_keys {
        if key.len() != 32 {
            return Err(failure(
                "",
                0,
                None,
                format!("trusted public key is {} bytes, expected 32", key.len()),
            ));
        }
        keys.push((key_id_bytes(key), *key));
    }
    walk(dir, Some(&keys), expected_head, None)
}

/// All records in chain order, after the same structural and chain checks as [`verify`] (checkpoint
/// signatures are not checked, their seq and hash are).
pub fn read_all(dir: &Path) -> Result<Vec<Sealed>, VerifyFailure> {
    let mut out = Vec::new();
    walk(dir, None, None, Some(&mut out))?;
    Ok(out)
}

type TrustedKeys<'a> = [([u8; 8], &'a [u8])];

struct Walk<'a, 'k> {
    keys: Option<&'a TrustedKeys<'k>>,
    expected_head: Option<(u64, [u8; 32])>,
    sink: Option<&'a mut Vec<Sealed>>,
    report: VerifyReport,
}

fn walk(
    dir: &Path,
    keys: Option<&TrustedKeys<'_>>,
    expected_head: Option<(u64, [u8; 32])>,
    sink: Option<&mut Vec<Sealed>>,
) -> Result<VerifyReport, VerifyFailure> {
    let segs = list_segments(dir).map_err(|e| {
        failure(
            "",
            0,
            None,
            format!("cannot list audit directory {}: {e}", dir.display()),
        )
    })?;
    let mut w = Walk {
        keys,
        expected_head,
        sink,
        report: VerifyReport {
            segments: 0,
            records: 0,
            checkpoints: 0,
            head_seq: 0,
            head_hash: GENESIS_HASH,
            last_checkpoint_seq: None,
        },
    };
    // (name, end offset) of the previous segment.
    let mut previous: Option<(String, u64)> = None;
    for (first_seq, path) in &segs {
        let name = segment_file_name(*first_seq);
        let expected = w.report.head_seq + 1;
        if *first_seq != expected {
            return Err(match &previous {
                _ if *first_seq < expected => failure(
                    &name,
                    0,
                    Some(*first_seq),
                    format!(
                        "segment starts at seq {first_seq} but earlier segments already hold \
                         records up to seq {} (overlapping segments)",
                        expected - 1
                    ),
                ),
                Some((prev_name, prev_end)) => failure(
                    prev_name,
                    *prev_end,
                    Some(expected),
                    format!(
                        "records {expected}..={} are missing: the segment ends at seq {} and the \
                         next segment {name} starts at seq {first_seq} (missing segment file or \
                         truncated segment)",
                        first_seq - 1,
                        expected - 1
                    ),
                ),
                None => failure(
                    &name,
                    0,
                    Some(expected),
                    format!(
                        "the first segment starts at seq {first_seq}: records 1..={} are missing",
                        first_seq - 1
                    ),
                ),
            });
        }
        let end = w.segment(path, &name, *first_seq)?;
        w.report.segments += 1;
        previous = Some((name, end));
    }
    if let Some((eseq, _)) = w.expected_head {
        if w.report.head_seq < eseq {
            let (name, end) = previous.unwrap_or_default();
            return Err(failure(
                &name,
                end,
                Some(w.report.head_seq + 1),
                format!(
                    "the log ends at seq {} but the expected head is seq {eseq}: records {}..={eseq} \
                     are missing (truncated or deleted)",
                    w.report.head_seq,
                    w.report.head_seq + 1
                ),
            ));
        }
    }
    Ok(w.report)
}

impl Walk<'_, '_> {
    /// Verify one segment; returns its length.
    fn segment(&mut self, path: &Path, name: &str, first_seq: u64) -> Result<u64, VerifyFailure> {
        let first_expected = self.report.head_seq + 1;
        let io_fail = |offset: u64, e: io::Error| {
            failure(
                name,
                offset,
                Some(first_expected),
                format!("I/O error: {e}"),
            )
        };
        let file = File::open(path).map_err(|e| io_fail(0, e))?;
        let file_len = file.metadata().map_err(|e| io_fail(0, e))?.len();
        if file_len < SEGMENT_HEADER_LEN as u64 {
            return Err(failure(
                name,
                0,
                Some(first_expected),
                format!(
                    "segment header truncated: the file has {file_len} bytes, the header needs \
                     {SEGMENT_HEADER_LEN}"
                ),
            ));
        }
        let mut r = BufReader::with_capacity(READ_BUFFER, file);
        let mut header = [0u8; SEGMENT_HEADER_LEN];
        r.read_exact(&mut header).map_err(|e| io_fail(0, e))?;
        let header_seq = decode_header(&header).map_err(|e| {
            failure(
                name,
                0,
                Some(first_expected),
                format!("bad segment header: {e}"),
            )
        })?;
        if header_seq != first_seq {
            return Err(failure(
                name,
                0,
                Some(first_expected),
                format!(
                    "segment header says first seq {header_seq} but the file name says {first_seq}"
                ),
            ));
        }
        let mut offset = SEGMENT_HEADER_LEN as u64;
        loop {
            let expected = self.report.head_seq + 1;
            let seq_of = |kind: Option<u8>| (kind != Some(KIND_CHECKPOINT)).then_some(expected);
            let frame = read_frame(&mut r, offset, file_len)
                .map_err(|e| failure(name, offset, Some(expected), format!("I/O error: {e}")))?;
            match frame {
                FrameRead::Eof => return Ok(offset),
                FrameRead::Incomplete {
                    needed,
                    available,
                    kind,
                } => {
                    return Err(failure(
                        name,
                        offset,
                        seq_of(kind),
                        format!(
                            "truncated frame: it needs {needed} bytes but only {available} remain \
                             in the file (segment truncated, torn write, or corrupted length field)"
                        ),
                    ))
                }
                FrameRead::Corrupt { err, kind, .. } => {
                    return Err(failure(
                        name,
                        offset,
                        seq_of(Some(kind)),
                        format!("corrupt frame: {err}"),
                    ))
                }
                FrameRead::Frame { kind, body, len } if kind == KIND_RECORD => {
                    self.record(name, offset, &body)?;
                    offset += len;
                }
                FrameRead::Frame { body, len, .. } => {
                    self.checkpoint(name, offset, &body)?;
                    offset += len;
                }
            }
        }
    }

    fn record(&mut self, name: &str, offset: u64, body: &[u8]) -> Result<(), VerifyFailure> {
        let expected = self.report.head_seq + 1;
        let fail = |reason: String| failure(name, offset, Some(expected), reason);
        let sealed = decode_record_body(body).map_err(|e| fail(format!("bad record: {e}")))?;
        let seq = sealed.record.seq;
        if seq > expected {
            return Err(fail(format!(
                "expected record seq {expected} but found seq {seq}: records {expected}..={} are \
                 missing",
                seq - 1
            )));
        }
        if seq < expected {
            return Err(fail(format!(
                "expected record seq {expected} but found seq {seq} (duplicated, reordered or \
                 replayed record)"
            )));
        }
        if sealed.prev_hash != self.report.head_hash {
            return Err(fail(format!(
                "prev_hash {} does not match the hash {} of record seq {}",
                hex::encode(sealed.prev_hash),
                hex::encode(self.report.head_hash),
                self.report.head_seq
            )));
        }
        if let Some((eseq, ehash)) = self.expected_head {
            if eseq == seq && ehash != sealed.hash {
                return Err(fail(format!(
                    "hash {} differs from the expected head hash {}",
                    hex::encode(sealed.hash),
                    hex::encode(ehash)
                )));
            }
        }
        self.report.records += 1;
        self.report.head_seq = seq;
        self.report.head_hash = sealed.hash;
        if let Some(sink) = self.sink.as_deref_mut() {
            sink.push(sealed);
        }
        Ok(())
    }

    fn checkpoint(&mut self, name: &str, offset: u64, body: &[u8]) -> Result<(), VerifyFailure> {
        let ckpt = Checkpoint::decode_body(body)
            .map_err(|e| failure(name, offset, None, format!("bad checkpoint: {e}")))?;
        if let Some(keys) = self.keys {
            let Some((_, key)) = keys.iter().find(|(id, _)| *id == ckpt.key_id) else {
                let trusted: Vec<String> = keys.iter().map(|(id, _)| hex::encode(id)).collect();
                return Err(failure(
                    name,
                    offset,
                    None,
                    format!(
                        "checkpoint (seq {}) is signed by key id {}, which is not a trusted key \
                         (trusted: {})",
                        ckpt.seq,
                        hex::encode(ckpt.key_id),
                        trusted.join(", ")
                    ),
                ));
            };
            if !ckpt.verify_signature(key) {
                return Err(failure(
                    name,
                    offset,
                    None,
                    format!("checkpoint (seq {}): invalid Ed25519 signature", ckpt.seq),
                ));
            }
        }
        let head = self.report.head_seq;
        if ckpt.seq > head {
            return Err(failure(
                name,
                offset,
                Some(head + 1),
                format!(
                    "checkpoint covers records up to seq {} but the chain before it ends at seq \
                     {head}: records {}..={} are missing",
                    ckpt.seq,
                    head + 1,
                    ckpt.seq
                ),
            ));
        }
        if ckpt.seq < head {
            return Err(failure(
                name,
                offset,
                Some(ckpt.seq + 1),
                format!(
                    "checkpoint covers records up to seq {} but records up to seq {head} precede \
                     it (inserted records)",
                    ckpt.seq
                ),
            ));
        }
        if ckpt.hash != self.report.head_hash {
            let from = self.report.last_checkpoint_seq.map_or(1, |s| s + 1);
            return Err(failure(
                name,
                offset,
                Some(from),
                format!(
                    "checkpoint hash {} for seq {} differs from the chain hash {}: records \
                     {from}..={} were altered and re-chained after the checkpoint was signed",
                    hex::encode(ckpt.hash),
                    ckpt.seq,
                    hex::encode(self.report.head_hash),
                    ckpt.seq
                ),
            ));
        }
        self.report.checkpoints += 1;
        self.report.last_checkpoint_seq = Some(ckpt.seq);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempfile::TempDir;

    fn record(seq: u64) -> Record {
        Record {
            seq,
            time: format!("2025-03-01T12:00:{:02}Z", seq % 60),
            actor: "alice@example.com".into(),
            credential: None,
            role: "admin".into(),
            tenant: seq.is_multiple_of(2).then(|| "acme".to_string()),
            action: "api.create".into(),
            resource_type: "api".into(),
            resource_id: format!("api-{seq}"),
            outcome: if seq.is_multiple_of(5) {
                Outcome::Denied
            } else {
                Outcome::Success
            },
            request_id: format!("req-{seq:04}"),
            source: "192.0.2.10".into(),
            digest: hex::encode(sha256(&seq.to_le_bytes())),
            detail: seq
                .is_multiple_of(3)
                .then(|| serde_json::json!({"name": format!("n{seq}")})),
        }
    }

    /// Records `from..=to` continuing the chain after `prev`.
    fn chain(prev: [u8; 32], from: u64, to: u64) -> Vec<Sealed> {
        let mut out = Vec::new();
        let mut prev = prev;
        for seq in from..=to {
            let s = seal(prev, record(seq));
            prev = s.hash;
            out.push(s);
        }
        out
    }

    struct Log {
        _tmp: TempDir,
        dir: PathBuf,
        keys: PathBuf,
        pk: Vec<u8>,
        sealed: Vec<Sealed>,
    }

    impl Log {
        fn signer(&self) -> Signer {
            Signer::load_or_create(&self.keys.join("node.pk8"), &self.keys.join("node.pub"))
                .unwrap()
        }

        fn open(&self, durable: (u64, [u8; 32])) -> Result<SegmentWriter, AuditError> {
            SegmentWriter::open(&self.dir, self.signer(), durable)
        }

        fn durable(&self, seq: u64) -> (u64, [u8; 32]) {
            if seq == 0 {
                (0, GENESIS_HASH)
            } else {
                (seq, self.sealed[seq as usize - 1].hash)
            }
        }

        fn segments(&self) -> Vec<PathBuf> {
            list_segments(&self.dir)
                .unwrap()
                .into_iter()
                .map(|(_, p)| p)
                .collect()
        }
    }

    /// `n` records, rotation at `max_bytes`, a checkpoint after every `ckpt_every` records.
    fn build(n: u64, max_bytes: u64, ckpt_every: u64) -> Log {
        let tmp = TempDir::new().unwrap();
        let dir = tmp.path().join("log");
        let keys = tmp.path().join("keys");
        let sealed = chain(GENESIS_HASH, 1, n);
        let mut log = Log {
            _tmp: tmp,
            dir,
            keys,
            pk: Vec::new(),
            sealed,
        };
        let mut w = log.open((0, GENESIS_HASH)).unwrap();
        log.pk = w.signer().public_key().to_vec();
        w.set_max_segment_bytes(max_bytes);
        for s in &log.sealed {
            w.append(std::slice::from_ref(s)).unwrap();
            if ckpt_every > 0 && s.record.seq.is_multiple_of(ckpt_every) {
                w.checkpoint(&s.record.time).unwrap();
            }
        }
        w.sync().unwrap();
        log
    }

    #[derive(Debug, Clone)]
    struct TFrame {
        offset: u64,
        kind: u8,
        body: Vec<u8>,
    }

    impl TFrame {
        fn seq(&self) -> u64 {
            u64::from_le_bytes(self.body[..8].try_into().unwrap())
        }
    }

    fn frames(path: &Path) -> Vec<TFrame> {
        let data = fs::read(path).unwrap();
        let mut r = &data[SEGMENT_HEADER_LEN..];
        let mut offset = SEGMENT_HEADER_LEN as u64;
        let mut out = Vec::new();
        loop {
            match read_frame(&mut r, offset, data.len() as u64).unwrap() {
                FrameRead::Frame { kind, body, len } => {
                    out.push(TFrame { offset, kind, body });
                    offset += len;
                }
                FrameRead::Eof => return out,
                _ => panic!("test log is corrupt"),
            }
        }
    }

    fn first_seq_of(path: &Path) -> u64 {
        parse_segment_file_name(path.file_name().unwrap().to_str().unwrap()).unwrap()
    }

    /// Rewrite a segment from frames, with valid CRCs.
    fn write_frames(path: &Path, frames: &[TFrame]) {
        let mut data = encode_header(first_seq_of(path)).to_vec();
        for f in frames {
            data.extend_from_slice(&encode_frame(f.kind, &f.body));
        }
        fs::write(path, data).unwrap();
    }

    fn name(path: &Path) -> String {
        path.file_name().unwrap().to_string_lossy().into_owned()
    }

    fn assert_fail(err: VerifyFailure, segment: &Path, offset: u64, seq: Option<u64>, what: &str) {
        assert_eq!(
            (err.segment.as_str(), err.offset, err.seq),
            (name(segment).as_str(), offset, seq),
            "unexpected failure: {err}"
        );
        assert!(
            err.reason.contains(what),
            "reason {:?} lacks {what:?}",
            err.reason
        );
    }

    #[test]
    fn seal_is_deterministic_and_chained() {
        let a = seal(GENESIS_HASH, record(1));
        let b = seal(GENESIS_HASH, record(1));
        assert_eq!(a, b);
        assert_eq!(a.payload, serde_json::to_vec(&record(1)).unwrap());
        let mut input = GENESIS_HASH.to_vec();
        input.extend_from_slice(&a.payload);
        assert_eq!(a.hash, sha256(&input));
        let c = seal(a.hash, record(2));
        assert_eq!(c.prev_hash, a.hash);
    }

    #[test]
    fn encode_decode_round_trip() {
        for s in chain(GENESIS_HASH, 1, 6) {
            let frame = s.encode();
            assert_eq!(
                frame.len(),
                FRAME_OVERHEAD + RECORD_FIXED_LEN + s.payload.len()
            );
            assert_eq!(Sealed::decode(&frame).unwrap(), s);
        }
    }

    #[test]
    fn decode_rejects_damaged_frames() {
        let frame = seal(GENESIS_HASH, record(3)).encode();
        let mut long = frame.clone();
        long.push(0);
        assert_eq!(Sealed::decode(&long), Err(FormatError::TrailingBytes(1)));
        assert!(matches!(
            Sealed::decode(&frame[..frame.len() - 1]),
            Err(FormatError::Truncated { .. })
        ));
        assert!(matches!(
            Sealed::decode(&frame[..3]),
            Err(FormatError::Truncated { .. })
        ));
        assert!(matches!(
            Sealed::decode(&[]),
            Err(FormatError::Truncated { .. })
        ));
        for i in 0..frame.len() {
            let mut bad = frame.clone();
            bad[i] ^= 0x40;
            assert!(Sealed::decode(&bad).is_err(), "flip at {i} not detected");
        }
        // A huge declared length is refused from the 5-byte header alone.
        let huge = [KIND_RECORD, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(
            Sealed::decode(&huge),
            Err(FormatError::TooLarge(u64::from(u32::MAX)))
        );
        // Consistent CRC but a payload that does not match the hash.
        let s = seal(GENESIS_HASH, record(3));
        let mut body = frame[5..frame.len() - 4].to_vec();
        body[RECORD_FIXED_LEN + 10] ^= 1;
        assert!(matches!(
            Sealed::decode(&encode_frame(KIND_RECORD, &body)),
            Err(FormatError::HashMismatch { .. })
        ));
        // A checkpoint frame is not a record.
        let ckpt = Signer::generate().unwrap().sign_checkpoint(3, s.hash, "t");
        assert!(matches!(
            Sealed::decode(&encode_frame(KIND_CHECKPOINT, &ckpt.encode_body())),
            Err(FormatError::WrongKind { .. })
        ));
    }

    #[test]
    fn append_across_rotations_then_verify() {
        let log = build(40, 1000, 7);
        let segs = log.segments();
        assert!(segs.len() >= 10, "only {} segments", segs.len());
        for p in &segs {
            let len = fs::metadata(p).unwrap().len();
            let f = frames(p);
            let records = f.iter().filter(|f| f.kind == KIND_RECORD).count();
            assert!(records >= 1);
            assert!(len <= 1000 || records == 1, "{} is {len} bytes", name(p));
            assert_eq!(f[0].seq(), first_seq_of(p));
        }
        let report = verify(&log.dir, &log.pk).unwrap();
        assert_eq!(report.segments, segs.len());
        assert_eq!(report.records, 40);
        assert_eq!(report.checkpoints, 5);
        assert_eq!(report.last_checkpoint_seq, Some(35));
        assert_eq!((report.head_seq, report.head_hash), log.durable(40));
        assert_eq!(read_all(&log.dir).unwrap(), log.sealed);
        // Reopen at the head and continue.
        let mut w = log.open(log.durable(40)).unwrap();
        assert_eq!(w.head(), log.durable(40));
        w.append(&chain(log.sealed[39].hash, 41, 45)).unwrap();
        w.checkpoint("2025-03-02T00:00:00Z").unwrap();
        drop(w);
        let report = verify(&log.dir, &log.pk).unwrap();
        assert_eq!(
            (report.records, report.checkpoints, report.head_seq),
            (45, 6, 45)
        );
    }

    #[test]
    fn every_flipped_byte_is_located() {
        let log = build(9, 800, 3);
        let segs = log.segments();
        assert!(segs.len() >= 3);
        for seg in &segs {
            let original = fs::read(seg).unwrap();
            let fr = frames(seg);
            let mut checked = 0;
            for pos in 0..original.len() {
                let mut data = original.clone();
                data[pos] ^= 0x01;
                fs::write(seg, &data).unwrap();
                let err = verify(&log.dir, &log.pk).expect_err("flip not detected");
                let (offset, seq) = if pos < SEGMENT_HEADER_LEN {
                    (0, Some(first_seq_of(seg)))
                } else {
                    let i = fr.iter().rposition(|f| f.offset <= pos as u64).unwrap();
                    let f = &fr[i];
                    let next_seq = fr[..i]
                        .iter()
                        .rev()
                        .find(|f| f.kind == KIND_RECORD)
                        .map_or(first_seq_of(seg), |r| r.seq() + 1);
                    match f.kind {
                        KIND_RECORD => (f.offset, Some(f.seq())),
                        // A flipped kind byte makes the frame "unknown", i.e. a bad record slot.
                        _ if pos as u64 == f.offset => (f.offset, Some(next_seq)),
                        _ => (f.offset, None),
                    }
                };
                assert_eq!(
                    (err.segment.as_str(), err.offset, err.seq),
                    (name(seg).as_str(), offset, seq),
                    "byte {pos} of {}: {err}",
                    name(seg)
                );
                checked += 1;
            }
            fs::write(seg, &original).unwrap();
            assert_eq!(checked, original.len());
        }
        verify(&log.dir, &log.pk).unwrap();
    }

    #[test]
    fn deleted_record_is_located() {
        let log = build(12, 100_000, 0);
        let seg = &log.segments()[0];
        let mut fr = frames(seg);
        let removed = fr.remove(4); // seq 5
        write_frames(seg, &fr);
        let err = verify(&log.dir, &log.pk).unwrap_err();
        assert_fail(
            err,
            seg,
            removed.offset,
            Some(5),
            "records 5..=5 are missing",
        );
    }

    #[test]
    fn deleted_record_before_checkpoint_is_located() {
        let log = build(6, 100_000, 3);
        let seg = &log.segments()[0];
        let mut fr = frames(seg);
        // Frames: r1 r2 r3 c3 r4 r5 r6 c6. Remove r6: only the checkpoint proves it existed.
        assert_eq!(fr[6].seq(), 6);
        fr.remove(6);
        write_frames(seg, &fr);
        let ckpt = &frames(seg)[6];
        assert_eq!(ckpt.kind, KIND_CHECKPOINT);
        let err = verify(&log.dir, &log.pk).unwrap_err();
        assert_fail(err, seg, ckpt.offset, Some(6), "records 6..=6 are missing");
    }

    #[test]
    fn swapped_records_are_located() {
        let log = build(10, 100_000, 0);
        let seg = &log.segments()[0];
        let mut fr = frames(seg);
        fr.swap(6, 7); // seq 7 and 8
        write_frames(seg, &fr);
        let err = verify(&log.dir, &log.pk).unwrap_err();
        assert_fail(err, seg, frames(seg)[6].offset, Some(7), "found seq 8");
    }

    #[test]
    fn segment_truncated_mid_frame_is_located() {
        let log = build(20, 1500, 0);
        let segs = log.segments();
        let seg = &segs[1];
        let fr = frames(seg);
        let f = &fr[1];
        fs::OpenOptions::new()
            .write(true)
            .open(seg)
            .unwrap()
            .set_len(f.offset + 30)
            .unwrap();
        let err = verify(&log.dir, &log.pk).unwrap_err();
        assert_fail(err, seg, f.offset, Some(f.seq()), "truncated frame");
    }

    #[test]
    fn segment_truncated_at_boundary_is_located_by_next_segment() {
        let log = build(20, 1500, 0);
        let segs = log.segments();
        let seg = &segs[0];
        let fr = frames(seg);
        let cut = &fr[fr.len() - 2];
        fs::OpenOptions::new()
            .write(true)
            .open(seg)
            .unwrap()
            .set_len(cut.offset)
            .unwrap();
        let err = verify(&log.dir, &log.pk).unwrap_err();
        assert_fail(err, seg, cut.offset, Some(cut.seq()), "are missing");
        assert!(err_reason_mentions(&log, &segs[1]));
    }

    fn err_reason_mentions(log: &Log, next: &Path) -> bool {
        verify(&log.dir, &log.pk)
            .unwrap_err()
            .reason
            .contains(&name(next))
    }

    #[test]
    fn truncated_newest_segment_is_located_with_expected_head() {
        let log = build(10, 1500, 0);
        let segs = log.segments();
        let last = segs.last().unwrap();
        let fr = frames(last);
        let cut = fr.last().unwrap();
        fs::OpenOptions::new()
            .write(true)
            .open(last)
            .unwrap()
            .set_len(cut.offset)
            .unwrap();
        // Without an independent head this is indistinguishable from a shorter log...
        assert_eq!(verify(&log.dir, &log.pk).unwrap().head_seq, 9);
        // ...with one (durable store, published checkpoint) it is located.
        let err = verify_with(&log.dir, &[&log.pk], Some(log.durable(10))).unwrap_err();
        assert_fail(
            err,
            last,
            cut.offset,
            Some(10),
            "records 10..=10 are missing",
        );
        // A matching head passes; a different hash at that seq fails at the record.
        verify_with(&log.dir, &[&log.pk], Some(log.durable(9))).unwrap();
        let err = verify_with(&log.dir, &[&log.pk], Some((9, [7; 32]))).unwrap_err();
        assert_eq!(err.seq, Some(9));
    }

    #[test]
    fn missing_segment_is_located() {
        let log = build(20, 1000, 0);
        let segs = log.segments();
        fs::remove_file(&segs[2]).unwrap();
        let err = verify(&log.dir, &log.pk).unwrap_err();
        let end = fs::metadata(&segs[1]).unwrap().len();
        assert_fail(
            err,
            &segs[1],
            end,
            Some(first_seq_of(&segs[2])),
            &name(&segs[3]),
        );
        // Missing first segment.
        let log = build(20, 1000, 0);
        let segs = log.segments();
        fs::remove_file(&segs[0]).unwrap();
        let err = verify(&log.dir, &log.pk).unwrap_err();
        assert_fail(err, &segs[1], 0, Some(1), "records 1..=");
    }

    #[test]
    fn seq_gap_is_located() {
        let tmp = TempDir::new().unwrap();
        let dir = tmp.path();
        let signer = Signer::generate().unwrap();
        // A chain whose hashes link correctly but whose seq skips 4.
        let mut sealed = Vec::new();
        let mut prev = GENESIS_HASH;
        for seq in [1, 2, 3, 5, 6] {
            let s = seal(prev, record(seq));
            prev = s.hash;
            sealed.push(s);
        }
        let path = dir.join(segment_file_name(1));
        let mut data = encode_header(1).to_vec();
        let mut offsets = Vec::new();
        for s in &sealed {
            offsets.push(data.len() as u64);
            data.extend_from_slice(&s.encode());
        }
        fs::write(&path, data).unwrap();
        let err = verify(dir, signer.public_key()).unwrap_err();
        assert_fail(err, &path, offsets[3], Some(4), "records 4..=4 are missing");
    }

    #[test]
    fn rewritten_record_with_fixed_crc_is_located() {
        let log = build(8, 100_000, 4);
        let seg = &log.segments()[0];
        let mut fr = frames(seg);
        // Frames: r1..r4 c4 r5..r8 c8. Edit r6's payload and fix the CRC only.
        let payload = &mut fr[6].body[RECORD_FIXED_LEN..];
        let pos = payload.windows(5).position(|w| w == b"alice").unwrap();
        payload[pos] = b'm';
        write_frames(seg, &fr);
        let err = verify(&log.dir, &log.pk).unwrap_err();
        assert_fail(err, seg, fr[6].offset, Some(6), "hash mismatch");
    }

    #[test]
    fn rechained_tail_is_caught_by_checkpoint() {
        let log = build(8, 100_000, 4);
        let seg = &log.segments()[0];
        let fr = frames(seg);
        // Rewrite record 6 and re-chain 6..8 consistently: only checkpoint 8 can tell.
        let mut forged = log.sealed[..5].to_vec();
        let mut prev = forged[4].hash;
        for seq in 6..=8 {
            let mut r = record(seq);
            if seq == 6 {
                r.actor = "mallory".into();
            }
            let s = seal(prev, r);
            prev = s.hash;
            forged.push(s);
        }
        let mut out = Vec::new();
        for f in &fr {
            if f.kind == KIND_RECORD {
                let s = &forged[f.seq() as usize - 1];
                let e = s.encode();
                out.push(TFrame {
                    offset: 0,
                    kind: KIND_RECORD,
                    body: e[5..e.len() - 4].to_vec(),
                });
            } else {
                out.push(f.clone());
            }
        }
        write_frames(seg, &out);
        let ckpt8 = &frames(seg)[9];
        assert_eq!(ckpt8.kind, KIND_CHECKPOINT);
        let err = verify(&log.dir, &log.pk).unwrap_err();
        assert_fail(
            err,
            seg,
            ckpt8.offset,
            Some(5),
            "records 5..=8 were altered",
        );
    }

    #[test]
    fn checkpoint_signature_tamper_is_detected() {
        let log = build(6, 100_000, 3);
        let seg = &log.segments()[0];
        let original = frames(seg);
        let ckpt_idx = 3;
        assert_eq!(original[ckpt_idx].kind, KIND_CHECKPOINT);
        let body_len = original[ckpt_idx].body.len();
        // Flip a signature byte, a seq byte and a time byte, each with a recomputed CRC.
        for pos in [body_len - 1, body_len - 64, 0, CHECKPOINT_FIXED_LEN] {
            let mut fr = original.clone();
            fr[ckpt_idx].body[pos] ^= 0x01;
            write_frames(seg, &fr);
            let err = verify(&log.dir, &log.pk).unwrap_err();
            assert_fail(
                err,
                seg,
                original[ckpt_idx].offset,
                None,
                "invalid Ed25519 signature",
            );
        }
        // Without fixing the CRC it is a corrupt frame at the same place.
        write_frames(seg, &original);
        let mut data = fs::read(seg).unwrap();
        data[original[ckpt_idx].offset as usize + 20] ^= 0x80;
        fs::write(seg, &data).unwrap();
        let err = verify(&log.dir, &log.pk).unwrap_err();
        assert_fail(err, seg, original[ckpt_idx].offset, None, "CRC32C mismatch");
    }

    #[test]
    fn wrong_public_key_is_detected() {
        let log = build(6, 100_000, 3);
        let other = Signer::generate().unwrap();
        let seg = &log.segments()[0];
        let err = verify(&log.dir, other.public_key()).unwrap_err();
        assert_fail(err, seg, frames(seg)[3].offset, None, "not a trusted key");
        // A checkpoint re-signed by another key with the right key id still fails.
        let mut fr = frames(seg);
        let mut ckpt = Checkpoint::decode_body(&fr[3].body).unwrap();
        ckpt.signature = other
            .sign_checkpoint(ckpt.seq, ckpt.hash, &ckpt.time)
            .signature;
        fr[3].body = ckpt.encode_body();
        write_frames(seg, &fr);
        let err = verify(&log.dir, &log.pk).unwrap_err();
        assert_fail(err, seg, fr[3].offset, None, "invalid Ed25519 signature");
        // Several trusted keys: the key id selects the right one.
        let log = build(6, 100_000, 3);
        verify_with(&log.dir, &[other.public_key(), &log.pk], None).unwrap();
        assert!(verify(&log.dir, &[0u8; 31]).is_err());
    }

    #[test]
    fn reopen_with_lower_durable_head_truncates() {
        let log = build(30, 1000, 5);
        let dir_bytes = |log: &Log| -> u64 {
            fs::read_dir(&log.dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| name(p).starts_with("audit-"))
                .map(|p| fs::metadata(p).unwrap().len())
                .sum()
        };
        let bytes_before = dir_bytes(&log);
        // Durable head in the middle of an earlier segment.
        let target = 12;
        let w = log.open(log.durable(target)).unwrap();
        assert_eq!(w.head(), log.durable(target));
        drop(w);
        let report = verify(&log.dir, &log.pk).unwrap();
        assert_eq!((report.head_seq, report.head_hash), log.durable(target));
        assert_eq!(
            read_all(&log.dir).unwrap(),
            log.sealed[..target as usize].to_vec()
        );
        // Nothing was deleted: the cut data was kept aside in .discarded files.
        assert_eq!(dir_bytes(&log), bytes_before);
        assert!(fs::read_dir(&log.dir)
            .unwrap()
            .any(|e| name(&e.unwrap().path()).contains(".discarded.")));
        // The caller re-produces the records and the log continues.
        let mut w = log.open(log.durable(target)).unwrap();
        w.set_max_segment_bytes(1000);
        w.append(&log.sealed[target as usize..]).unwrap();
        w.checkpoint("2025-03-02T00:00:00Z").unwrap();
        drop(w);
        assert_eq!(read_all(&log.dir).unwrap(), log.sealed);
        assert_eq!(verify(&log.dir, &log.pk).unwrap().head_seq, 30);
        // Durable head 0: everything goes aside, the log restarts empty.
        let w = log.open((0, GENESIS_HASH)).unwrap();
        assert_eq!(w.head(), (0, GENESIS_HASH));
        drop(w);
        assert!(log.segments().is_empty());
    }

    #[test]
    fn torn_tail_is_cut_at_open() {
        let log = build(10, 100_000, 0);
        let seg = log.segments()[0].clone();
        let good_len = fs::metadata(&seg).unwrap().len();
        // A partial frame (a torn write of record 11).
        let next = chain(log.sealed[9].hash, 11, 11);
        let mut data = fs::read(&seg).unwrap();
        data.extend_from_slice(&next[0].encode()[..50]);
        fs::write(&seg, &data).unwrap();
        assert!(verify(&log.dir, &log.pk)
            .unwrap_err()
            .reason
            .contains("truncated frame"));
        let mut w = log.open(log.durable(10)).unwrap();
        assert_eq!(w.head(), log.durable(10));
        assert_eq!(fs::metadata(&seg).unwrap().len(), good_len);
        w.append(&next).unwrap();
        let durable11 = (11, next[0].hash);
        drop(w);
        assert_eq!(verify(&log.dir, &log.pk).unwrap().head_seq, 11);
        // A zero-filled tail, and a complete last frame whose CRC is wrong, are torn too.
        let good_len = fs::metadata(&seg).unwrap().len();
        for tail in [vec![0u8; 300], {
            let mut f = chain(log.sealed[9].hash, 11, 12)[1].encode();
            let n = f.len();
            f[n - 1] ^= 0xff;
            f
        }] {
            let mut data = fs::read(&seg).unwrap();
            data.extend_from_slice(&tail);
            fs::write(&seg, &data).unwrap();
            let w = log.open(durable11).unwrap();
            assert_eq!(w.head().0, 11);
            drop(w);
            assert_eq!(fs::metadata(&seg).unwrap().len(), good_len);
        }
        // A segment torn while being created is discarded.
        let torn = log.dir.join(segment_file_name(12));
        fs::write(&torn, &encode_header(12)[..10]).unwrap();
        let w = log.open(durable11).unwrap();
        assert_eq!(w.head().0, 11);
        drop(w);
        assert!(!torn.exists());
        verify(&log.dir, &log.pk).unwrap();
    }

    #[test]
    fn open_behind_durable_head_lets_caller_fill_in() {
        let log = build(10, 100_000, 0);
        let seg = log.segments()[0].clone();
        let fr = frames(&seg);
        fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(fr[7].offset)
            .unwrap();
        let mut w = log.open(log.durable(10)).unwrap();
        assert_eq!(w.head(), log.durable(7));
        w.append(&log.sealed[7..]).unwrap();
        drop(w);
        assert_eq!(read_all(&log.dir).unwrap(), log.sealed);
        // Empty directory with a non-zero durable head.
        let tmp = TempDir::new().unwrap();
        let w =
            SegmentWriter::open(tmp.path(), Signer::generate().unwrap(), log.durable(10)).unwrap();
        assert_eq!(w.head(), (0, GENESIS_HASH));
    }

    #[test]
    fn open_with_diverging_hash_errors_and_changes_nothing() {
        let log = build(20, 1000, 0);
        let before: Vec<(PathBuf, Vec<u8>)> = log
            .segments()
            .into_iter()
            .map(|p| (p.clone(), fs::read(&p).unwrap()))
            .collect();
        let err = log.open((10, [9; 32])).unwrap_err();
        assert!(matches!(err, AuditError::Diverged { seq: 10, .. }), "{err}");
        let after: Vec<(PathBuf, Vec<u8>)> = log
            .segments()
            .into_iter()
            .map(|p| (p.clone(), fs::read(&p).unwrap()))
            .collect();
        assert_eq!(before, after);
        let err = log.open((20, [9; 32])).unwrap_err();
        assert!(matches!(err, AuditError::Diverged { seq: 20, .. }), "{err}");
        let err = log.open((0, [9; 32])).unwrap_err();
        assert!(matches!(err, AuditError::Diverged { seq: 0, .. }), "{err}");
    }

    #[test]
    fn open_refuses_corruption_before_durable_head() {
        let log = build(10, 100_000, 0);
        let seg = log.segments()[0].clone();
        let fr = frames(&seg);
        let mut data = fs::read(&seg).unwrap();
        data[fr[3].offset as usize + 40] ^= 1;
        fs::write(&seg, &data).unwrap();
        assert!(matches!(
            log.open(log.durable(10)),
            Err(AuditError::Format { .. })
        ));
        // Beyond the durable head the damaged part is simply cut.
        let w = log.open(log.durable(3)).unwrap();
        assert_eq!(w.head(), log.durable(3));
    }

    #[test]
    fn append_rejects_broken_chain() {
        let log = build(3, 100_000, 0);
        let mut w = log.open(log.durable(3)).unwrap();
        let good = chain(log.sealed[2].hash, 4, 5);
        let is_chain = |r: Result<(), AuditError>| matches!(r, Err(AuditError::Chain { .. }));
        assert!(is_chain(w.append(&good[1..])));
        assert!(is_chain(w.append(&chain([1; 32], 4, 4))));
        let mut bad = good[0].clone();
        bad.payload.push(b' ');
        assert!(is_chain(w.append(&[bad])));
        let mut bad = good.clone();
        bad[1].prev_hash = [3; 32];
        assert!(is_chain(w.append(&bad)));
        assert_eq!(w.head(), log.durable(3));
        w.append(&good).unwrap();
        assert_eq!(w.head(), (5, good[1].hash));
    }

    #[test]
    fn checkpoint_is_noop_without_new_records() {
        let log = build(3, 100_000, 3);
        let seg = log.segments()[0].clone();
        let len = fs::metadata(&seg).unwrap().len();
        let mut w = log.open(log.durable(3)).unwrap();
        w.checkpoint("2025-03-02T00:00:00Z").unwrap();
        assert_eq!(fs::metadata(&seg).unwrap().len(), len);
        w.append(&chain(log.sealed[2].hash, 4, 4)).unwrap();
        w.checkpoint("2025-03-02T00:00:00Z").unwrap();
        w.checkpoint("2025-03-02T00:00:01Z").unwrap();
        drop(w);
        let f = frames(&seg);
        assert_eq!(f.iter().filter(|f| f.kind == KIND_CHECKPOINT).count(), 2);
        assert_eq!(verify(&log.dir, &log.pk).unwrap().checkpoints, 2);
        // Empty log: nothing to checkpoint.
        let tmp = TempDir::new().unwrap();
        let mut w = SegmentWriter::open(tmp.path(), Signer::generate().unwrap(), (0, GENESIS_HASH))
            .unwrap();
        w.checkpoint("t").unwrap();
        assert!(list_segments(tmp.path()).unwrap().is_empty());
    }

    #[test]
    fn signer_key_files() {
        let tmp = TempDir::new().unwrap();
        let sk = tmp.path().join("k/node.pk8");
        let pk = tmp.path().join("k/node.pub");
        let a = Signer::load_or_create(&sk, &pk).unwrap();
        assert_eq!(
            fs::metadata(&sk).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(a.public_key().len(), 32);
        assert_eq!(a.key_id().len(), 16);
        assert_eq!(a.key_id(), hex::encode(&sha256(a.public_key())[..8]));
        assert_eq!(read_public_key(&pk).unwrap(), a.public_key());
        let b = Signer::load_or_create(&sk, &pk).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        // Public key file of another key.
        let other = Signer::generate().unwrap();
        fs::write(&pk, hex::encode(other.public_key())).unwrap();
        assert!(matches!(
            Signer::load_or_create(&sk, &pk),
            Err(AuditError::Key(_))
        ));
        fs::write(&pk, a.public_key()).unwrap(); // raw form is accepted
        Signer::load_or_create(&sk, &pk).unwrap();
        // Lax permissions.
        fs::set_permissions(&sk, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Signer::load_or_create(&sk, &pk),
            Err(AuditError::Key(_))
        ));
        // Lost private key next to an existing public key.
        fs::remove_file(&sk).unwrap();
        assert!(matches!(
            Signer::load_or_create(&sk, &pk),
            Err(AuditError::Key(_))
        ));
        // Garbage private key.
        fs::write(&sk, b"not a key").unwrap();
        fs::set_permissions(&sk, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            Signer::load_or_create(&sk, &pk),
            Err(AuditError::Key(_))
        ));
    }

    #[test]
    fn second_writer_is_locked_out() {
        let log = build(2, 100_000, 0);
        let w = log.open(log.durable(2)).unwrap();
        assert!(matches!(
            log.open(log.durable(2)),
            Err(AuditError::Locked(_))
        ));
        drop(w);
        log.open(log.durable(2)).unwrap();
    }

    #[test]
    fn oversized_frame_length_is_rejected() {
        let log = build(3, 100_000, 0);
        let seg = log.segments()[0].clone();
        let fr = frames(&seg);
        let mut data = fs::read(&seg).unwrap();
        let at = fr[1].offset as usize;
        data[at + 1..at + 5].copy_from_slice(&(MAX_FRAME_BODY + 1).to_le_bytes());
        fs::write(&seg, &data).unwrap();
        let err = verify(&log.dir, &log.pk).unwrap_err();
        assert_fail(err, &seg, fr[1].offset, Some(2), "exceeds the limit");
    }

    #[test]
    fn failure_display_names_the_place() {
        let f = failure(
            "audit-00000000000000000001.seg",
            1234,
            Some(17),
            "hash mismatch: x",
        );
        assert_eq!(
            f.to_string(),
            "audit-00000000000000000001.seg offset 1234 (record seq 17): hash mismatch: x"
        );
        assert_eq!(
            failure("s.seg", 5, None, "r").to_string(),
            "s.seg offset 5: r"
        );
        assert_eq!(segment_file_name(1), "audit-00000000000000000001.seg");
        assert_eq!(
            parse_segment_file_name("audit-00000000000000000042.seg"),
            Some(42)
        );
        assert_eq!(parse_segment_file_name("audit-42.seg"), None);
        assert_eq!(
            parse_segment_file_name("audit-00000000000000000042.seg.discarded.1"),
            None
        );
    }

    #[test]
    fn arbitrary_damage_never_panics() {
        let log = build(4, 100_000, 2);
        let seg = log.segments()[0].clone();
        let original = fs::read(&seg).unwrap();
        let restore = || {
            for e in fs::read_dir(&log.dir).unwrap() {
                let p = e.unwrap().path();
                if name(&p).contains(".discarded.") {
                    fs::remove_file(p).unwrap();
                }
            }
            fs::write(&seg, &original).unwrap();
        };
        let boundaries: Vec<u64> = std::iter::once(SEGMENT_HEADER_LEN as u64)
            .chain(
                frames(&seg)
                    .iter()
                    .map(|f| f.offset + (FRAME_OVERHEAD + f.body.len()) as u64),
            )
            .collect();
        for len in 0..original.len() {
            fs::write(&seg, &original[..len]).unwrap();
            let v = verify(&log.dir, &log.pk);
            assert_eq!(
                v.is_ok(),
                boundaries.contains(&(len as u64)),
                "length {len}: {v:?}"
            );
            let _ = read_all(&log.dir);
            if let Ok(w) = log.open(log.durable(4)) {
                assert!(w.head().0 <= 4);
            }
            restore();
        }
        for pos in 0..original.len() {
            let mut data = original.clone();
            data[pos] ^= 0xa5;
            fs::write(&seg, &data).unwrap();
            assert!(verify(&log.dir, &log.pk).is_err());
            assert!(read_all(&log.dir).is_err(), "flip at {pos} passed read_all");
            if let Ok(w) = log.open(log.durable(4)) {
                assert!(w.head().0 <= 4);
            }
            restore();
        }
        // Pseudo-random garbage through the decoders.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..2000 {
            let mut buf = vec![0u8; round % 300];
            for b in &mut buf {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            if let Some(b) = buf.first_mut() {
                *b = if round % 2 == 0 {
                    KIND_RECORD
                } else {
                    KIND_CHECKPOINT
                };
            }
            let _ = Sealed::decode(&buf);
            let _ = Checkpoint::decode_body(&buf);
            let _ = decode_record_body(&buf);
            let mut r = &buf[..];
            let _ = read_frame(&mut r, 0, buf.len() as u64);
        }
    }

    /// The worked example in docs/audit-format.md; keep both in sync.
    fn example_record() -> Record {
        Record {
            seq: 1,
            time: "2025-01-01T00:00:00Z".into(),
            actor: "alice".into(),
            credential: None,
            role: "admin".into(),
            tenant: None,
            action: "api.create".into(),
            resource_type: "api".into(),
            resource_id: "a1".into(),
            outcome: Outcome::Success,
            request_id: "r1".into(),
            source: "192.0.2.1".into(),
            digest: hex::encode(sha256(b"")),
            detail: None,
        }
    }

    fn example_signer() -> Signer {
        let key_pair = Ed25519KeyPair::from_seed_unchecked(&[0x01; 32]).unwrap();
        let public_key = key_pair.public_key().as_ref().try_into().unwrap();
        Signer {
            key_pair,
            public_key,
        }
    }

    #[test]
    fn worked_example() {
        let s = seal(GENESIS_HASH, example_record());
        let header = encode_header(1);
        let ckpt = example_signer().sign_checkpoint(1, s.hash, "2025-01-01T00:00:01Z");
        let ckpt_frame = encode_frame(KIND_CHECKPOINT, &ckpt.encode_body());
        if std::env::var_os("AUDIT_PRINT_EXAMPLE").is_some() {
            println!("payload: {}", String::from_utf8_lossy(&s.payload));
            println!("payload_len: {}", s.payload.len());
            println!("hash: {}", hex::encode(s.hash));
            println!("header: {}", hex::encode(header));
            println!("frame: {}", hex::encode(s.encode()));
            println!("public_key: {}", hex::encode(example_signer().public_key()));
            println!("key_id: {}", example_signer().key_id());
            println!("signed: {}", hex::encode(ckpt.signed_message()));
            println!("ckpt_frame: {}", hex::encode(&ckpt_frame));
        }
        assert_eq!(hex::encode(s.hash), EXAMPLE_HASH);
        assert_eq!(hex::encode(header), EXAMPLE_HEADER);
        assert_eq!(hex::encode(s.encode()), EXAMPLE_FRAME);
        assert_eq!(hex::encode(&ckpt_frame), EXAMPLE_CHECKPOINT_FRAME);
        assert!(ckpt.verify_signature(example_signer().public_key()));
    }

    const EXAMPLE_HASH: &str = "32a89331d11d8ca09a511b7adede73258eca8ad57aceb4386996fb69eb9b91e1";
    const EXAMPLE_HEADER: &str = "4150494d4155444c01000000010000000000000047de9252";
    const EXAMPLE_FRAME: &str = concat!(
        "01620100000100000000000000000000000000000000000000000000000000000000000000000000",
        "000000000032a89331d11d8ca09a511b7adede73258eca8ad57aceb4386996fb69eb9b91e17b2273",
        "6571223a312c2274696d65223a22323032352d30312d30315430303a30303a30305a222c22616374",
        "6f72223a22616c696365222c22726f6c65223a2261646d696e222c2274656e616e74223a6e756c6c",
        "2c22616374696f6e223a226170692e637265617465222c227265736f757263655f74797065223a22",
        "617069222c227265736f757263655f6964223a226131222c226f7574636f6d65223a227375636365",
        "7373222c22726571756573745f6964223a227231222c22736f75726365223a223139322e302e322e",
        "31222c22646967657374223a22653362306334343239386663316331343961666266346338393936",
        "66623932343237616534316534363439623933346361343935393931623738353262383535227dac",
        "242ff2",
    );
    const EXAMPLE_CHECKPOINT_FRAME: &str = concat!(
        "0286000000010000000000000032a89331d11d8ca09a511b7adede73258eca8ad57aceb4386996fb",
        "69eb9b91e134750f98bd59fcfc1400323032352d30312d30315430303a30303a30315a361f28f2d0",
        "7f99da205fd761ffdcba53d13f5099580d7d9ab0bce6e869cc8396c3c4e7c8b244a50af85008aac8",
        "a7918fc33c306465be50259a7ff99a824863059fb0dbd0",
    );
}
