//! The gateway's HTTP/1.1 client for plain-HTTP upstream targets.
//!
//! A request is written and its answer read in the request's own task, on a keep-alive
//! connection taken from a pool kept per thread (each gateway worker thread runs its own
//! runtime, so a pooled connection never changes threads and never needs a lock; the health
//! checks, on the main runtime, use its threads' pools). hyper's
//! pooled client hands every request through a channel to a connection task instead, which cost
//! about a third of the gateway's CPU per request (measured with `perf`, see the README).
//!
//! Framing follows RFC 9112 strictly, since an upstream's answer is relayed to clients:
//! `Transfer-Encoding` wins over `Content-Length` (and the connection is then not reused),
//! several `Content-Length` values must agree, chunk sizes are bounded hexadecimal, lines end
//! in CRLF, heads and chunk lines are size-limited. A connection is reused only after an answer
//! read to its exact end with nothing behind it.

use super::head::{Answer, Fields, Known, Places, Switched};
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, SizeHint};
use hyper::http::uri::Authority;
use hyper::{Method, StatusCode};
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Largest response head (status line and headers) accepted from an upstream.
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in an upstream's response head.
const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (with extensions) and trailer section.
const MAX_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;
/// Read size for answer bodies.
const READ_CHUNK: usize = 32 * 1024;
/// Idle connections kept per upstream origin and thread.
const MAX_IDLE_PER_ORIGIN: usize = 256;
/// An idle connection older than this is closed rather than reused (upstream servers close
/// theirs after 60 to 75 s by default; reusing one they are closing fails the request).
const IDLE_TIMEOUT: Duration = Duration::from_secs(50);

/// Why an upstream exchange failed.
#[derive(Debug)]
pub enum Error {
    /// No connection could be opened (refused, unreachable, timed out): the request never left.
    Connect(io::Error),
    /// A kept-alive connection turned out closed before any byte of an answer: the upstream
    /// never processed the request (it had closed the idle connection).
    Stale,
    /// The connection failed during the exchange.
    Io(io::Error),
    /// The upstream broke the protocol.
    Protocol(&'static str),
    /// The request body failed: the client's side broke off, or stopped sending (the
    /// gateway's idle bound).
    Body(BoxError),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Connect(e) => write!(f, "cannot connect to the upstream: {e}"),
            Error::Stale => f.write_str("the upstream closed a kept-alive connection"),
            Error::Io(e) => write!(f, "upstream connection failed: {e}"),
            Error::Protocol(what) => write!(f, "upstream protocol error: {what}"),
            Error::Body(e) => write!(f, "request body failed: {e}"),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    pub fn is_connect(&self) -> bool {
        matches!(self, Error::Connect(_))
    }

    /// The upstream is not to blame: the client's body failed, or a kept-alive connection
    /// was closed under the request.
    pub fn is_blameless(&self) -> bool {
        matches!(self, Error::Stale | Error::Body(_))
    }
}

/// The upstream side of a protocol switch (101): the connection and the bytes the upstream
/// sent after its head. Taken once, by the code that splices it to the client.
#[derive(Clone, Default)]
pub struct Upgraded(Arc<Mutex<Option<(TcpStream, Bytes)>>>);

impl Upgraded {
    pub fn take(&self) -> Option<(TcpStream, Bytes)> {
        super::lock(&self.0).take()
    }
}

struct Idle {
    stream: TcpStream,
    since: Instant,
    /// The last exchange's buffer, empty: the next exchange reads into it (no allocation per
    /// exchange once the last answer's bytes are gone).
    buf: BytesMut,
}

/// The most room an idle connection's buffer keeps (a larger one, grown for a long body, is
/// let go).
const KEPT_BUFFER: usize = 8 * 1024;

thread_local! {
    // keyed by configured origins (not by anything a client sends): a fast hash, not a
    // flood-resistant one, of the origin's text as configured (`Authority`'s own hash and
    // comparison fold the case byte by byte)
    static IDLE: RefCell<HashMap<Box<str>, VecDeque<Idle>, rustc_hash::FxBuildHasher>> =
        RefCell::new(HashMap::default());
}

/// A pooled connection to `origin`, the most recently used first. A connection on which
/// anything arrived while it idled (the upstream closed it, or sent bytes nobody asked for) is
/// closed instead. Reads leave the socket's readiness clear once drained (a short read, or
/// would-block), so a clean idle connection is known without a system call; only one that
/// became readable is read.
fn checkout(origin: &Authority, now: Instant) -> Option<(TcpStream, BytesMut)> {
    IDLE.with(|pool| {
        let mut pool = pool.borrow_mut();
        let list = pool.get_mut(origin.as_str())?;
        while let Some(idle) = list.pop_back() {
            if now.saturating_duration_since(idle.since) >= IDLE_TIMEOUT {
                // the rest are older still
                list.clear();
                return None;
            }
            // no system call unless the socket became readable (tokio's try_read)
            let mut byte = [0u8; 1];
            match idle.stream.try_read(&mut byte) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Some((idle.stream, idle.buf))
                }
                // closed by the upstream, or bytes nobody asked for
                _ => continue,
            }
        }
        None
    })
}

/// Pools a connection idle since `now`.
fn checkin(origin: &Authority, stream: TcpStream, buf: BytesMut, now: Instant) {
    thread_local! {
        static CHECKINS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }
    IDLE.with(|pool| {
        let mut pool = pool.borrow_mut();
        // now and then, expired connections of every origin are closed (an origin no longer
        // used would keep its idle connections otherwise)
        let n = CHECKINS.with(|c| {
            c.set(c.get().wrapping_add(1));
            c.get()
        });
        let expired = |i: &Idle| now.saturating_duration_since(i.since) >= IDLE_TIMEOUT;
        if n.is_multiple_of(1024) {
            pool.retain(|_, list| {
                list.retain(|i| !expired(i));
                !list.is_empty()
            });
        }
        // the origin is cloned only the first time it is pooled
        let list = match pool.get_mut(origin.as_str()) {
            Some(list) => list,
            None => pool.entry(origin.as_str().into()).or_default(),
        };
        while list.front().is_some_and(expired) {
            list.pop_front();
        }
        if list.len() >= MAX_IDLE_PER_ORIGIN {
            list.pop_front();
        }
        let buf = match buf.capacity() <= KEPT_BUFFER {
            true => buf,
            false => BytesMut::new(),
        };
        list.push_back(Idle {
            stream,
            since: now,
            buf,
        });
    })
}

async fn connect(origin: &Authority, timeout: Duration) -> Result<TcpStream, Error> {
    let addr = match origin.port_u16() {
        Some(_) => super::timer::timeout(timeout, TcpStream::connect(origin.as_str())).await,
        // the host keeps an IPv6 literal's brackets: "[::1]:80" parses as an address
        None => {
            let addr = format!("{}:80", origin.host());
            super::timer::timeout(timeout, TcpStream::connect(addr.as_str())).await
        }
    };
    let stream = addr
        .map_err(|_| Error::Connect(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")))?
        .map_err(Error::Connect)?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// How a request body is framed on the wire.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// Whether a method is idempotent (RFC 9110 §9.2.2): such a request may be sent again.
pub(crate) fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// A request's head as the gateway sends it: method, target (a path in pieces, joined on the
/// wire, and a query) and fields.
pub struct Outgoing<'a> {
    pub method: &'a Method,
    pub path: [&'a str; 2],
    pub query: Option<&'a str>,
    pub fields: &'a Fields,
}

fn encode_head(head: &Outgoing<'_>, origin: &Authority, framing: Framing) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + head.fields.len() * 48);
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    if head.path.iter().all(|p| p.is_empty()) {
        out.push(b'/');
    }
    for p in head.path {
        out.extend_from_slice(p.as_bytes());
    }
    if let Some(q) = head.query {
        out.push(b'?');
        out.extend_from_slice(q.as_bytes());
    }
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(origin.as_str().as_bytes());
    out.extend_from_slice(b"\r\n");
    for (known, name, value) in head.fields.iter_known() {
        if matches!(
            known,
            Known::Host | Known::ContentLength | Known::TransferEncoding
        ) {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::None => {}
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(super::access::digits(n, &mut itoa::Buffer::new()).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Sends a request (`head` and `body`, `None` for none) to the plain-HTTP upstream `origin`
/// and returns its answer once the head is read; the body streams from the connection, which
/// returns to the pool at its end.
///
/// `now` is the clock as the caller last read it, before the call: the pool's clock for this
/// exchange (no reading of its own). A connection whose answer comes whole with its head is
/// pooled as idle since then, a little before it was: its idle time is never undercounted.
pub async fn send(
    origin: &Authority,
    head: Outgoing<'_>,
    mut body: Option<Body>,
    connect_timeout: Duration,
    body_idle_timeout: Duration,
    now: Instant,
) -> Result<Answer<UpBody>, Error> {
    let bodyless = body.as_ref().is_none_or(|b| b.is_end_stream());
    let framing = if bodyless {
        if head.fields.contains(Known::ContentLength)
            || matches!(*head.method, Method::POST | Method::PUT | Method::PATCH)
        {
            Framing::Length(0)
        } else {
            Framing::None
        }
    } else {
        match body.as_ref().and_then(|b| b.size_hint().exact()) {
            Some(n) => Framing::Length(n),
            None => Framing::Chunked,
        }
    };
    let encoded = encode_head(&head, origin, framing);
    let head_request = *head.method == Method::HEAD;
    // A request that may be sent again if a kept-alive connection turns out closed under it
    // (nothing of it can have been processed).
    let replayable = bodyless && idempotent(head.method);
    let mut pooled = checkout(origin, now);
    loop {
        let reused = pooled.is_some();
        let (stream, buf) = match pooled.take() {
            Some(pooled) => pooled,
            None => (connect(origin, connect_timeout).await?, BytesMut::new()),
        };
        let body = body.as_mut().filter(|_| !bodyless);
        let sent = exchange(
            stream,
            buf,
            &encoded,
            body,
            framing,
            head_request,
            reused,
            origin,
            now,
        );
        match sent.await.map(|mut r| {
            r.body.idle_timeout = body_idle_timeout;
            r
        }) {
            // once, on a fresh connection (which cannot be stale)
            Err(Error::Stale) if replayable => continue,
            other => return other,
        }
    }
}

#[cold]
fn io_error(e: io::Error, reused: bool, answered: bool) -> Error {
    let closed = matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof
    );
    if reused && !answered && closed {
        Error::Stale
    } else {
        Error::Io(e)
    }
}

#[allow(clippy::too_many_arguments)]
async fn exchange(
    mut stream: TcpStream,
    mut buf: BytesMut,
    head: &[u8],
    body: Option<&mut Body>,
    framing: Framing,
    head_request: bool,
    reused: bool,
    origin: &Authority,
    now: Instant,
) -> Result<Answer<UpBody>, Error> {
    let mut answered = false;
    let mut grew = false;
    let mut early = false;
    let mut failed_write = None;
    let parsed = {
        let (mut rd, mut wr) = stream.split();
        wr.write_all(head)
            .await
            .map_err(|e| io_error(e, reused, false))?;
        let reading = read_head(
            &mut rd,
            &mut buf,
            &mut answered,
            &mut grew,
            reused,
            head_request,
        );
        match body {
            None => reading.await,
            Some(body) => {
                let writing = write_body(&mut wr, body, framing);
                tokio::pin!(reading, writing);
                let mut written = false;
                let mut write_failed = None;
                let parsed = loop {
                    tokio::select! {
                        biased;
                        r = &mut reading => break r,
                        w = &mut writing, if !written && write_failed.is_none() => match w {
                            Ok(()) => written = true,
                            // the client's body failed: nothing more to wait for
                            Err(e @ Error::Body(_)) => return Err(e),
                            // the upstream may have answered and closed (a 413 before the
                            // whole body): its answer, if it comes, is what the client gets
                            Err(e) => write_failed = Some(e),
                        },
                    }
                };
                failed_write = write_failed;
                // an answer before the whole body: the rest is not sent, and the connection
                // cannot carry another request
                early = !written;
                parsed
            }
        }
    };
    let parsed = match (parsed, failed_write) {
        (Err(_), Some(Error::Io(e))) => Err(io_error(e, reused, answered)),
        (Err(_), Some(other)) => Err(other),
        (parsed, _) => parsed,
    }?;
    let (status, fields, kind) = parsed;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        let leftover = buf.split().freeze();
        let mut answer = Answer::new(status, fields, UpBody::done());
        answer.switched = Some(Switched::Plain(Upgraded(Arc::new(Mutex::new(Some((
            stream, leftover,
        )))))));
        return Ok(answer);
    }
    let (kind, keep) = kind;
    let mut body = UpBody {
        stream: Some(stream),
        buf,
        kind,
        keep: keep && !early,
        origin: origin.clone(),
        idle_timeout: Duration::from_secs(30),
        idle: None,
        progress: false,
        whole: None,
        keep_buf: false,
    };
    // (the buffer goes back to the pool with the connection when the answer came whole in it)
    body.keep_buf = !grew;
    match body.kind {
        // nothing to read: the connection is free now (hyper never polls an empty body)
        Kind::Length(0) => body.finish_at(now),
        // the whole body came with the head (a small answer): taken at once, and the connection
        // is free before the client has the answer
        Kind::Length(n) if body.buf.len() as u64 >= n => {
            body.whole = Some(body.buf.split_to(n as usize).freeze());
            body.finish_at(now);
        }
        _ => body.keep_buf = false,
    }
    Ok(Answer::new(status, fields, body))
}

async fn write_body(
    wr: &mut tokio::net::tcp::WriteHalf<'_>,
    body: &mut Body,
    framing: Framing,
) -> Result<(), Error> {
    let mut sent: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Error::Body)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers are not forwarded
        };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        match framing {
            Framing::Chunked => {
                let mut chunk = Vec::with_capacity(data.len() + 20);
                chunk.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                chunk.extend_from_slice(&data);
                chunk.extend_from_slice(b"\r\n");
                wr.write_all(&chunk).await.map_err(Error::Io)?;
            }
            Framing::Length(n) if sent > n => {
                return Err(Error::Body(
                    "the request body is longer than announced".into(),
                ))
            }
            _ => wr.write_all(&data).await.map_err(Error::Io)?,
        }
    }
    match framing {
        Framing::Chunked => wr.write_all(b"0\r\n\r\n").await.map_err(Error::Io)?,
        Framing::Length(n) if sent != n => {
            return Err(Error::Body(
                "the request body is shorter than announced".into(),
            ))
        }
        _ => {}
    }
    Ok(())
}

type Head = (StatusCode, Fields, (Kind, bool));

async fn read_head(
    rd: &mut tokio::net::tcp::ReadHalf<'_>,
    buf: &mut BytesMut,
    answered: &mut bool,
    grew: &mut bool,
    reused: bool,
    head_request: bool,
) -> Result<Head, Error> {
    loop {
        if !buf.is_empty() {
            if let Some(head) = parse_head(buf, head_request)? {
                return Ok(head);
            }
            if buf.len() >= MAX_HEAD {
                return Err(Error::Protocol("response head too large"));
            }
        }
        // (room made only when little is left: a pooled buffer keeps its size, unless a
        // head outgrows it)
        if buf.capacity() - buf.len() < 1024 {
            *grew |= !buf.is_empty();
            buf.reserve(8 * 1024);
        }
        let n = rd
            .read_buf(buf)
            .await
            .map_err(|e| io_error(e, reused, *answered))?;
        if n == 0 {
            return Err(if reused && !*answered {
                Error::Stale
            } else {
                Error::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the upstream closed the connection before answering",
                ))
            });
        }
        *answered = true;
    }
}

/// Parses one response head at the start of `buf` (skipping interim 1xx answers other than
/// 101), consuming it. `None`: more bytes are needed.
fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, Error> {
    loop {
        let read = match quick_response(buf) {
            Some(quick) => quick,
            None => match full_response(buf)? {
                Some(full) => full,
                None => return Ok(None),
            },
        };
        let (len, code, http11, places) = read;
        let status =
            StatusCode::from_u16(code).map_err(|_| Error::Protocol("invalid response status"))?;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            buf.advance(len);
            if buf.is_empty() {
                return Ok(None);
            }
            continue;
        }
        // The fields stay where they came: the head is split off the exchange's buffer
        // (made for this exchange, so it pins nothing else) and the fields point into it.
        let mut headers = Fields::parsed(buf.split_to(len).freeze(), places)
            .map_err(|_| Error::Protocol("malformed response head"))?;
        let seen = seen(&headers);
        let mut keep = http11 && !seen.close;
        let kind = if head_request
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || status == StatusCode::SWITCHING_PROTOCOLS
        {
            Kind::Length(0)
        } else if seen.coded {
            // Transfer-Encoding wins; with Content-Length beside it, the message is suspect
            // and the connection is not reused (RFC 9112 §6.3)
            if headers.remove(Known::ContentLength) {
                keep = false;
            }
            // only plain `chunked` is relayed: another coding would reach the client
            // undeclared once Transfer-Encoding (hop-by-hop) is dropped
            if !http11 || !only_chunked(&headers) {
                return Err(Error::Protocol("unsupported Transfer-Encoding"));
            }
            Kind::Chunked(Chunk::Size)
        } else if let Some(n) = seen.plain {
            // (the usual case: one field of digits, kept as it is)
            Kind::Length(n)
        } else if seen.lengths > 0 {
            // repeated fields or a list, all of one value: that value on to the client
            let n = content_length(&headers)?;
            headers.insert(
                Known::ContentLength,
                crate::gateway::access::digits(n, &mut itoa::Buffer::new()).as_bytes(),
            );
            Kind::Length(n)
        } else {
            keep = false;
            Kind::Close
        };
        return Ok(Some((status, headers, (kind, keep))));
    }
}

fn only_chunked(headers: &Fields) -> bool {
    let mut codings = headers
        .get_all(Known::TransferEncoding)
        .flat_map(|v| v.split(|b| *b == b','))
        .map(<[u8]>::trim_ascii);
    codings
        .next()
        .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
        && codings.next().is_none()
}

/// The length a head's one `Content-Length` field gives when it is plain: one to 19 digits
/// (what [`content_length`] accepts of a single value, without its list syntax), and no other
/// field of that name; `None` otherwise.
/// A response head read: its length, status code, whether it is HTTP/1.1 (or 1.0), and where
/// its fields are.
type Read = (usize, u16, bool, Places);

/// The head at the start of `buf` when it is complete and in its plain form (the usual
/// answer), read in one pass: `HTTP/1.1` or `HTTP/1.0`, a space, three digits, a space, a
/// reason without control characters, CRLF, then the fields as [`Places::quick`] reads them.
/// httparse reads such a head the same; `None` leaves any other to it ([`full_response`]).
fn quick_response(buf: &[u8]) -> Option<Read> {
    let line = buf.get(..13)?;
    let http11 = match &line[..9] {
        b"HTTP/1.1 " => true,
        b"HTTP/1.0 " => false,
        _ => return None,
    };
    let mut code = 0u16;
    for &d in &line[9..12] {
        if !d.is_ascii_digit() {
            return None;
        }
        code = code * 10 + u16::from(d - b'0');
    }
    if line[12] != b' ' {
        return None;
    }
    // the reason runs to its first control character, which must start the CRLF
    let eol = 13 + super::head::first_marked(&buf[13..], super::head::controls)?;
    if buf.get(eol..eol + 2)? != b"\r\n" {
        return None;
    }
    let (places, len) = Places::quick(buf, eol + 2, MAX_HEADERS, 6)?;
    Some((len, code, http11, places))
}

/// The head at the start of `buf` as httparse reads it, `None` while it is incomplete.
// (cold: the quick reader takes nearly every head; kept out of the hot path's code)
#[cold]
#[inline(never)]
fn full_response(buf: &[u8]) -> Result<Option<Read>, Error> {
    // (left uninitialised: 128 slots are 4 KiB to clear per answer otherwise)
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let config = httparse::ParserConfig::default();
    let len = match config.parse_response_with_uninit_headers(&mut parsed, buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Error::Protocol("too many response headers"))
        }
        Err(_) => return Err(Error::Protocol("malformed response head")),
    };
    let places = Places::of(&buf[..len], parsed.headers, 6)
        .ok_or(Error::Protocol("malformed response head"))?;
    Ok(Some((
        len,
        parsed.code.unwrap_or(0),
        parsed.version == Some(1),
        places,
    )))
}

/// A response head as a reader reads it: its length, status code, whether it is HTTP/1.1, and
/// its fields (name, value).
#[doc(hidden)]
pub type Reading = (usize, u16, bool, Vec<(Vec<u8>, Vec<u8>)>);

/// The response head at the start of `bytes` as each reader reads it: the quick one
/// ([`quick_response`], `None` when it leaves the head to httparse), then httparse (`None` when
/// incomplete or refused). For the `http1_response` fuzz target and the tests, which hold the
/// first to the second wherever it gives a reading.
#[doc(hidden)]
pub fn response_readings(bytes: &[u8]) -> (Option<Reading>, Option<Reading>) {
    let reading = |(len, code, http11, places): Read| {
        let fields = Fields::parsed(Bytes::copy_from_slice(&bytes[..len]), places).ok()?;
        let fields = fields
            .iter()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect();
        Some((len, code, http11, fields))
    };
    (
        quick_response(bytes).and_then(reading),
        full_response(bytes).ok().flatten().and_then(reading),
    )
}

/// What an answer's fields say of its body's framing and of its connection.
struct Seen {
    /// `Connection` lists `close`.
    close: bool,
    /// There is a `Transfer-Encoding`.
    coded: bool,
    /// How many `Content-Length` fields there are.
    lengths: usize,
    /// The length when it is one field of 1 to 19 digits (the usual case, read at once; any
    /// other is [`content_length`]'s).
    plain: Option<u64>,
}

/// [`Seen`], in one pass over the fields.
fn seen(headers: &Fields) -> Seen {
    let mut seen = Seen {
        close: false,
        coded: false,
        lengths: 0,
        plain: None,
    };
    for (known, _, value) in headers.iter_known() {
        match known {
            Known::Connection => seen.close |= super::head::lists(value, "close"),
            Known::TransferEncoding => seen.coded = true,
            Known::ContentLength => {
                seen.lengths += 1;
                seen.plain = (!value.is_empty() && value.len() <= 19)
                    .then(|| {
                        value.iter().try_fold(0u64, |n, &b| {
                            b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
                        })
                    })
                    .flatten();
            }
            _ => {}
        }
    }
    if seen.lengths != 1 {
        seen.plain = None;
    }
    seen
}

/// The `Content-Length` of an answer: every value (and every comma-separated item) the same
/// decimal number.
fn content_length(headers: &Fields) -> Result<u64, Error> {
    let bad = || Error::Protocol("invalid Content-Length");
    let mut found: Option<u64> = None;
    for v in headers.get_all(Known::ContentLength) {
        for item in std::str::from_utf8(v).map_err(|_| bad())?.split(',') {
            let item = item.trim();
            if item.is_empty() || item.len() > 19 || !item.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let n: u64 = item.parse().map_err(|_| bad())?;
            if found.is_some_and(|f| f != n) {
                return Err(bad());
            }
            found = Some(n);
        }
    }
    found.ok_or_else(bad)
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data: bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// In the trailer section: bytes seen so far.
    Trailers(usize),
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Length(u64),
    Chunked(Chunk),
    /// Delimited by the connection's end.
    Close,
    Done,
}

/// An upstream answer's body, read from its connection as the client takes it.
pub struct UpBody {
    stream: Option<TcpStream>,
    buf: BytesMut,
    kind: Kind,
    keep: bool,
    origin: Authority,
    /// Longest wait for the next bytes of the body; the answer fails after it.
    idle_timeout: Duration,
    /// Armed while waiting for bytes; `progress`: bytes came since it was armed.
    idle: Option<super::timer::Sleep>,
    progress: bool,
    /// The whole body, when it came with the head (the connection is then back in the pool).
    whole: Option<Bytes>,
    /// Whether the buffer goes back to the pool with the connection: only when the answer
    /// came whole in the room it had (a buffer grown for a large head or a streamed body is
    /// let go, so an idle connection keeps at most `KEPT_BUFFER`).
    keep_buf: bool,
}

impl UpBody {
    fn done() -> UpBody {
        UpBody {
            stream: None,
            buf: BytesMut::new(),
            kind: Kind::Done,
            keep: false,
            origin: Authority::from_static("upgraded"),
            idle_timeout: Duration::ZERO,
            idle: None,
            progress: false,
            whole: None,
            keep_buf: false,
        }
    }

    /// Whether the whole body is at hand: the upstream's part of the answer is over.
    pub fn is_whole(&self) -> bool {
        self.whole.is_some() || self.kind == Kind::Done
    }

    /// The answer is complete: the connection goes back to the pool if it can carry another
    /// request (kept alive, nothing unread behind the answer).
    fn finish(&mut self) {
        self.finish_at(Instant::now());
    }

    /// [`finish`](UpBody::finish), the connection idle since `now`.
    fn finish_at(&mut self, now: Instant) {
        self.kind = Kind::Done;
        if let Some(stream) = self.stream.take() {
            if self.keep && self.buf.is_empty() {
                let buf = match self.keep_buf {
                    true => std::mem::take(&mut self.buf),
                    false => BytesMut::new(),
                };
                checkin(&self.origin, stream, buf, now);
            }
        }
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some(stream) = &mut self.stream else {
            return Poll::Ready(Ok(0));
        };
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_CHUNK);
        }
        // poll_read (not try_read): a short read clears the socket's readiness, which the
        // pool's check of an idle connection relies on
        match tokio_util::io::poll_read_buf(Pin::new(stream), cx, &mut self.buf) {
            Poll::Ready(r) => {
                self.progress = true;
                Poll::Ready(r)
            }
            Poll::Pending => {
                // the wait for the next bytes is bounded; the timer is armed only when waiting
                let deadline = Instant::now() + self.idle_timeout;
                let idle = self
                    .idle
                    .get_or_insert_with(|| super::timer::sleep_until(deadline));
                if std::mem::take(&mut self.progress) {
                    idle.reset(deadline);
                }
                match Pin::new(idle).poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the upstream stopped sending its answer",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    /// Fills the buffer, an early end being an error.
    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(self.poll_fill(cx))? {
            0 => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the upstream closed the connection before the end of its answer",
            ))),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn take_data(&mut self, left: u64) -> (Bytes, u64) {
        let n = (self.buf.len() as u64).min(left) as usize;
        (self.buf.split_to(n).freeze(), left - n as u64)
    }
}

#[cold]
fn protocol(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Parses a chunk-size line (`1*HEXDIG [ BWS ";" ext ]`, no CRLF), the size.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return None;
    }
    let rest = &line[digits..];
    let rest_ok = rest.is_empty() || {
        let mut ext = rest.iter().skip_while(|b| **b == b' ' || **b == b'\t');
        ext.clone().next() == Some(&b';') && ext.all(|b| *b == b'\t' || (0x20..0x7f).contains(b))
    };
    if !rest_ok {
        return None;
    }
    let hex = std::str::from_utf8(&line[..digits]).ok()?;
    u64::from_str_radix(hex, 16).ok()
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

impl hyper::body::Body for UpBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if let Some(data) = this.whole.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        loop {
            match this.kind {
                Kind::Done => return Poll::Ready(None),
                Kind::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Kind::Length(left) => {
                    if this.buf.is_empty() {
                        ready!(this.poll_more(cx))?;
                        continue;
                    }
                    let (data, left) = this.take_data(left);
                    this.kind = Kind::Length(left);
                    if left == 0 {
                        // hyper stops polling once the body says it is complete
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Kind::Close => {
                    if !this.buf.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(this.buf.split().freeze()))));
                    }
                    if ready!(this.poll_fill(cx))? == 0 {
                        this.keep = false;
                        this.finish();
                        return Poll::Ready(None);
                    }
                }
                Kind::Chunked(Chunk::Size) => {
                    let Some(end) = find_crlf(&this.buf) else {
                        if this.buf.len() > MAX_LINE {
                            return Poll::Ready(Some(Err(protocol("chunk-size line too long"))));
                        }
                        ready!(this.poll_more(cx))?;
                        continue;
                    };
                    if end > MAX_LINE {
                        return Poll::Ready(Some(Err(protocol("chunk-size line too long"))));
                    }
                    let size = chunk_size(&this.buf[..end])
                        .ok_or_else(|| protocol("invalid chunk size"))?;
                    this.buf.advance(end + 2);
                    this.kind = Kind::Chunked(if size == 0 {
                        Chunk::Trailers(0)
                    } else {
                        Chunk::Data(size)
                    });
                }
                Kind::Chunked(Chunk::Data(left)) => {
                    if this.buf.is_empty() {
                        ready!(this.poll_more(cx))?;
                        continue;
                    }
                    let (data, left) = this.take_data(left);
                    this.kind = Kind::Chunked(if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    });
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Kind::Chunked(Chunk::DataEnd) => {
                    if this.buf.len() < 2 {
                        ready!(this.poll_more(cx))?;
                        continue;
                    }
                    if &this.buf[..2] != b"\r\n" {
                        return Poll::Ready(Some(Err(protocol("chunk data not followed by CRLF"))));
                    }
                    this.buf.advance(2);
                    this.kind = Kind::Chunked(Chunk::Size);
                }
                Kind::Chunked(Chunk::Trailers(seen)) => {
                    let Some(end) = find_crlf(&this.buf) else {
                        if seen + this.buf.len() > MAX_TRAILERS {
                            return Poll::Ready(Some(Err(protocol("trailer section too long"))));
                        }
                        ready!(this.poll_more(cx))?;
                        continue;
                    };
                    this.buf.advance(end + 2);
                    if end == 0 {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    // trailer fields are not relayed
                    this.kind = Kind::Chunked(Chunk::Trailers(seen + end + 2));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.whole.is_none() && matches!(self.kind, Kind::Done | Kind::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.whole, self.kind) {
            (Some(data), _) => SizeHint::with_exact(data.len() as u64),
            (None, Kind::Length(n)) => SizeHint::with_exact(n),
            (None, Kind::Done) => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer whose body came whole with its head frees its connection at once (back in
    /// the pool before the body is read), and the body is still all there; a longer one keeps
    /// its connection until its end.
    #[tokio::test(flavor = "current_thread")]
    async fn whole_answers_free_their_connection_at_once() {
        let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin: Authority = upstream.local_addr().unwrap().to_string().parse().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = upstream.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut answers: [&[u8]; 2] = [
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello",
            ];
            for answer in &mut answers {
                // one request per read (the client writes each head whole)
                assert!(s.read(&mut buf).await.unwrap() > 0);
                s.write_all(answer).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            s.write_all(b"world").await.unwrap();
            // held open: the client closes it
            let _ = s.read(&mut buf).await;
        });
        let fields = Fields::default();
        let get = || Outgoing {
            method: &Method::GET,
            path: ["/", ""],
            query: None,
            fields: &fields,
        };
        let t = Duration::from_secs(5);
        let resp = send(&origin, get(), None, t, t, Instant::now())
            .await
            .unwrap();
        assert!(resp.body.is_whole());
        assert_eq!(resp.body.size_hint().exact(), Some(2));
        let (pooled, buf) =
            checkout(&origin, Instant::now()).expect("back in the pool before the body is read");
        assert!(
            buf.is_empty() && buf.capacity() > 0 && buf.capacity() <= KEPT_BUFFER,
            "a whole answer's buffer goes back with its connection, emptied"
        );
        checkin(&origin, pooled, buf, Instant::now());
        let body = resp.body.collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");

        // the second request reuses it; its body comes in two parts
        let resp = send(&origin, get(), Some(Body::default()), t, t, Instant::now())
            .await
            .unwrap();
        assert!(!resp.body.is_whole());
        assert!(
            checkout(&origin, Instant::now()).is_none(),
            "in use until the body's end"
        );
        let body = resp.body.collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"helloworld");
        let (_, buf) =
            checkout(&origin, Instant::now()).expect("back in the pool at the body's end");
        assert_eq!(buf.capacity(), 0, "a streamed answer's buffer is let go");
    }

    #[test]
    fn chunk_sizes_are_strict() {
        assert_eq!(chunk_size(b"1a"), Some(26));
        assert_eq!(chunk_size(b"0"), Some(0));
        assert_eq!(chunk_size(b"10;name=value"), Some(16));
        assert_eq!(chunk_size(b"10 ; ext"), Some(16));
        assert_eq!(chunk_size(b""), None);
        assert_eq!(chunk_size(b"-1"), None);
        assert_eq!(chunk_size(b"0x10"), None);
        assert_eq!(chunk_size(b"10 junk"), None);
        assert_eq!(chunk_size(b"11111111111111111"), None, "more than 64 bits");
        assert_eq!(chunk_size(b"ffffffffffffffff"), Some(u64::MAX));
    }

    #[test]
    fn plain_response_heads_are_read_quickly_and_as_httparse_reads_them() {
        // the usual forms: read without httparse, and the same
        for head in [
            &b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 2\r\n\r\nok"[..],
            b"HTTP/1.0 404 Not Found\r\nX-A:b\r\nx-c: \t d e\r\n\r\n",
            b"HTTP/1.1 204 \r\n\r\n",
            b"HTTP/1.1 200 caf\xc3\xa9\r\nX-Obs: caf\xe9\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
        ] {
            let (quick, full) = response_readings(head);
            assert!(quick.is_some(), "{:?}", String::from_utf8_lossy(head));
            assert_eq!(quick, full, "{:?}", String::from_utf8_lossy(head));
        }
        let (quick, _) = response_readings(b"HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\n\r\nbody");
        let (len, code, http11, fields) = quick.expect("read");
        assert_eq!((len, code, http11), (31, 200, true));
        assert_eq!(
            fields,
            [
                (b"A".to_vec(), b"1".to_vec()),
                (b"B".to_vec(), b"2".to_vec())
            ]
        );
        // anything else is left to httparse, which reads it or refuses it
        for head in [
            &b"HTTP/1.1 200 OK\r\nServer: nginx\r\n"[..],
            b"HTTP/1.1 200 OK\r\nServer: nginx\r\n\r",
            b"HTTP/1.1 200 OK\nServer: nginx\n\n",
            b"\r\nHTTP/1.1 200 OK\r\n\r\n",
            b"HTTP/1.1 200\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nEmpty:\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTrailing: space \r\n\r\n",
            b"HTTP/1.1 200 OK\r\nName : value\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n folded\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nA: b\r\n c\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad\x01: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nA: b\x7fc\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nA: b\rc\r\n\r\n",
            b"HTTP/1.1 200 O\x00K\r\n\r\n",
            b"HTTP/2.0 200 OK\r\n\r\n",
            b"HTTP/1.1 2x0 OK\r\n\r\n",
        ] {
            // (what httparse makes of it is its own)
            let (quick, _) = response_readings(head);
            assert_eq!(quick, None, "{:?}", String::from_utf8_lossy(head));
        }
        // more fields than a head may have: httparse's to refuse
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(response_readings(&many), (None, None));
    }

    #[test]
    fn plain_lengths_are_read_as_content_length_reads_them() {
        let fields = |values: &[&str]| {
            let mut h = Fields::default();
            for v in values {
                h.append(Known::ContentLength, v.as_bytes());
            }
            h
        };
        assert_eq!(seen(&fields(&["0"])).plain, Some(0));
        assert_eq!(seen(&fields(&["1234567"])).plain, Some(1_234_567));
        let max = "9".repeat(19);
        assert_eq!(
            seen(&fields(&[&max])).plain,
            Some(9_999_999_999_999_999_999)
        );
        // what is not one plain value is left to content_length
        for values in [
            &[][..],
            &[""],
            &["5, 5"],
            &["5", "5"],
            &["+5"],
            &[" 5"],
            &["12a"],
            &["12345678901234567890"],
        ] {
            assert_eq!(seen(&fields(values)).plain, None, "{values:?}");
        }
        // and agrees with it where both read a value
        for v in ["0", "7", "0042", &max] {
            let h = fields(&[v]);
            assert_eq!(seen(&h).plain, content_length(&h).ok(), "{v}");
        }
    }

    #[test]
    fn content_lengths_must_agree() {
        let mut h = Fields::default();
        h.append(Known::ContentLength, b"5");
        assert_eq!(content_length(&h).unwrap(), 5);
        h.append("Content-Length", b"5, 5");
        assert_eq!(content_length(&h).unwrap(), 5);
        h.append(Known::ContentLength, b"6");
        assert!(content_length(&h).is_err());
        let mut h = Fields::default();
        h.append(Known::ContentLength, b"+5");
        assert!(content_length(&h).is_err());
    }

    #[test]
    fn heads_skip_interim_answers_and_frame_bodies() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"[..],
        );
        let (status, _, (kind, keep)) = parse_head(&mut buf, false).unwrap().unwrap();
        assert_eq!(status, 200);
        assert_eq!(kind, Kind::Length(2));
        assert!(keep);
        assert_eq!(&buf[..], b"ok");

        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 9\r\n\r\n"[..],
        );
        let (_, fields, (kind, keep)) = parse_head(&mut buf, false).unwrap().unwrap();
        assert_eq!(kind, Kind::Chunked(Chunk::Size));
        assert!(!keep, "TE with CL: not reused");
        assert!(fields.get(Known::ContentLength).is_none());

        let mut buf =
            BytesMut::from(&b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"[..]);
        assert!(
            parse_head(&mut buf, false).is_err(),
            "codings other than chunked"
        );
        let mut buf = BytesMut::from(&b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"[..]);
        assert!(parse_head(&mut buf, false).is_err(), "chunked in HTTP/1.0");
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\n\r\nok"[..]);
        let (_, fields, _) = parse_head(&mut buf, false).unwrap().unwrap();
        assert_eq!(
            fields.get_all(Known::ContentLength).collect::<Vec<_>>(),
            [b"2"],
            "one value relayed"
        );

        let mut buf = BytesMut::from(&b"HTTP/1.0 200 OK\r\n\r\nbody"[..]);
        let (_, _, (kind, keep)) = parse_head(&mut buf, false).unwrap().unwrap();
        assert_eq!(kind, Kind::Close);
        assert!(!keep);

        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"[..]);
        let (_, _, (kind, _)) = parse_head(&mut buf, true).unwrap().unwrap();
        assert_eq!(kind, Kind::Length(0), "HEAD answers have no body");

        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n"[..]);
        assert!(parse_head(&mut buf, false).is_err());
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nx: a\r\n b\r\n\r\n"[..]);
        assert!(parse_head(&mut buf, false).is_err(), "obs-fold");
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent"[..]);
        assert!(parse_head(&mut buf, false).unwrap().is_none());
    }
}
