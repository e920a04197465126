//! The gateway's own HTTP/1.1 server, for the requests most traffic is made of: HTTP/1.1
//! requests, on plain or TLS connections, with no body or a `Content-Length` body that came
//! whole with the head (a small JSON `POST`).
//!
//! It reads a head, hands the request to [`Gateway::handle`] (the same handling as every other
//! request) and writes the answer itself, on the connection's own task, without hyper's
//! server machinery (which cost about 1 µs of CPU per proxied request; see the README's
//! benchmark figures).
//!
//! Anything else is hyper's. The first request that is not of that kind (a body still coming
//! or chunked, `CONNECT`, `Expect`, `Upgrade`, `TE`, `Transfer-Encoding`, HTTP/1.0, an
//! absolute-form or `*` target, and every head that does not parse or is too large) hands the
//! connection, with the bytes read so far and nothing answered, to hyper's HTTP/1.1 server for
//! the rest of its life. The refusals of malformed or hostile heads (400, 431, smuggling
//! attempts) are therefore hyper's, as before: this server never answers a head it has not
//! fully understood.
//!
//! Timeouts are those of hyper's server: the header timeout is the connection stream's
//! ([`Watched`](super::Watched)), the idle timeout bounds the wait for the next head, a stalled
//! write is cut by [`Stall`](super::Stall), and the gateway's shutdown closes an idle connection
//! and makes the answer in progress the last (`Connection: close`).

use super::head::{Answer, Fields, Known, Places, Req};
use super::{Body, Conn, Gateway, ListenerLimits, ReqBody};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Body as _;
use hyper::{Method, StatusCode, Uri};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

/// How a connection served here ends.
pub(super) enum Ended {
    /// Closed (by either side, a timeout or the shutdown).
    Closed,
    /// Given to hyper's server, with the bytes read and not yet answered.
    HandOver(Bytes),
}

/// Answer bytes gathered before a write (larger body chunks are written directly).
const GATHER: usize = 16 * 1024;

/// Serves `io`'s requests until the connection ends or a request must go to hyper.
pub(super) async fn serve<S>(
    io: &mut S,
    gateway: &Arc<Gateway>,
    conn: &Arc<Conn>,
    limits: &ListenerLimits,
    stop: watch::Receiver<bool>,
) -> io::Result<Ended>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(4096);
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    // the idle timer: set once, moved on only when it fires early (not at every request)
    let mut idle: Option<super::timer::Sleep> = None;
    // the shutdown, awaited between requests (made once: it stays registered)
    let mut stopping = stop.clone();
    let stopped = async move {
        let _ = stopping.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped);
    loop {
        // a whole head
        let head = loop {
            if !buf.is_empty() {
                match next(&mut buf, limits.max_headers, limits.max_header_bytes) {
                    Next::Take(head) => break head,
                    Next::Wait => {}
                    Next::HandOver => return Ok(Ended::HandOver(buf.freeze())),
                }
            }
            // (room to read into: the space of heads already answered is taken back)
            buf.reserve(4096);
            let read = if buf.is_empty() {
                // between requests: bounded by the idle timeout, and ended by the shutdown
                let until = Instant::now() + limits.idle_timeout;
                if shutting_down(&stop) {
                    return Ok(Ended::Closed);
                }
                match wait_readable(io, &mut buf, &mut idle, until, stopped.as_mut()).await {
                    Some(r) => r,
                    None => return Ok(Ended::Closed),
                }
            } else {
                // within a head: bounded by the header timeout (the stream's), ended by the
                // shutdown
                tokio::select! {
                    biased;
                    r = io.read_buf(&mut buf) => r,
                    // (once done, it is not polled again: the connection closes)
                    () = stopped.as_mut() => return Ok(Ended::Closed),
                }
            };
            if read? == 0 {
                return Ok(Ended::Closed);
            }
        };
        let close = head.close;
        let head_request = head.request.method == Method::HEAD;
        // The client is watched while its request is handled: one that closes the connection
        // (or breaks it) ends the request, its upstream call included, as hyper's server did
        // (a half-close too, as hyper's default).
        // (pinned where it is made: the future is a few KiB, and moving it costs copies; in a
        // block of its own, so the connection's task keeps its room for the answer's writing)
        let answer = {
            let handling = std::pin::pin!(gateway.clone().handle(head.request, conn.clone()));
            unless_client_leaves(io, &mut buf, handling).await
        };
        let Some(answer) = answer else {
            tracing::debug!(peer = %conn.peer, "gateway client left before its answer");
            return Ok(Ended::Closed);
        };
        let last = close || shutting_down(&stop);
        if !write_answer(io, answer, last, head_request, &mut out, &mut buf).await? {
            let _ = io.shutdown().await;
            return Ok(Ended::Closed);
        }
        if !buf.is_empty() {
            // a head that came behind the request: its header timeout runs from now (the
            // stream counts only bytes read while a head is awaited)
            conn.activity.bytes_read();
        }
    }
}

/// Whether the gateway is shutting down. The value is looked at only once one was sent: the
/// look takes the channel's read lock (two locked instructions), where the check of its version
/// is a plain load. Nothing sends `false`, and `stop` is a clone of the listener's receiver,
/// taken before that receiver saw the shutdown (it stops accepting when it does), so a sent
/// shutdown always shows as a change here.
fn shutting_down(stop: &watch::Receiver<bool>) -> bool {
    match stop.has_changed() {
        Ok(false) => false,
        _ => *stop.borrow(),
    }
}

/// Runs `work` (the answer being made, or its body's next frame) while reading what the
/// client sends: `None` when the client leaves first (the end of its stream, or an error).
/// Reading stops at the first bytes (a pipelined head), which wait in `buf` (hyper's rule).
async fn unless_client_leaves<S, F>(
    io: &mut S,
    buf: &mut BytesMut,
    mut work: Pin<&mut F>,
) -> Option<F::Output>
where
    S: AsyncRead + Unpin,
    F: Future,
{
    loop {
        tokio::select! {
            biased;
            done = work.as_mut() => return Some(done),
            r = io.read_buf(buf), if buf.is_empty() => if !matches!(r, Ok(n) if n > 0) {
                return None;
            },
        }
    }
}

/// What the bytes at the start of the buffer are to this server.
// (a request is moved once, from here to the handler: boxing it would cost an allocation per
// request)
#[allow(clippy::large_enum_variant)]
enum Next {
    /// A request it takes, taken off the buffer with its body.
    Take(Head),
    /// An incomplete head: it reads more.
    Wait,
    /// A request for hyper's server (malformed, too many fields, too large, or not one this
    /// server takes): the buffer is left as it was.
    HandOver,
}

/// The decision on the bytes at the start of `buf` (the fuzz target's too, through
/// [`take_head`]): the head is parsed once, and a request taken keeps its bytes.
fn next(buf: &mut BytesMut, max_fields: usize, max_bytes: usize) -> Next {
    let parsed = match quick_request(buf, max_fields) {
        Some((line, places)) if line.len <= max_bytes => Ok(Some(Parsed::of(
            &line,
            places,
            &buf[..line.len],
            buf.len() - line.len,
        ))),
        // (too large: hyper's to refuse)
        Some(_) => Ok(Some(None)),
        None => full_request(buf, max_fields, max_bytes),
    };
    match parsed {
        Ok(Some(Some(parsed))) => match Head::take(buf, parsed) {
            Some(head) => Next::Take(head),
            None => Next::HandOver,
        },
        Ok(None) => Next::Wait,
        Ok(Some(None)) | Err(_) => Next::HandOver,
    }
}

/// The head at the start of `buf` as httparse reads it (a head not in its plain form, or
/// incomplete): `Ok(None)` while it is incomplete, `Ok(Some(None))` for hyper's server.
// (cold: the quick reader takes nearly every head; kept out of the hot path's code)
#[cold]
#[inline(never)]
fn full_request(
    buf: &[u8],
    max_fields: usize,
    max_bytes: usize,
) -> Result<Option<Option<Parsed>>, httparse::Error> {
    with_fields(max_fields, |fields| {
        let mut req = httparse::Request::new(fields);
        Ok(match req.parse(buf)? {
            httparse::Status::Complete(len) if len <= max_bytes => {
                Some(Line::of(&req, buf, len).and_then(|line| {
                    let places = Places::of(&buf[..len], req.headers, ROOM)?;
                    Parsed::of(&line, places, &buf[..len], buf.len() - len)
                }))
            }
            httparse::Status::Partial if buf.len() <= max_bytes => None,
            // (too large: hyper's to refuse)
            httparse::Status::Complete(_) | httparse::Status::Partial => Some(None),
        })
    })
}

/// What this server makes of the bytes at the start of a connection ([`take_head`]).
#[doc(hidden)]
pub enum Taken {
    /// A request it takes, and how many bytes that is (head and body).
    Request(Box<Req<ReqBody>>, usize),
    /// The head is incomplete: it reads more.
    Wait,
    /// The connection goes to hyper's server with the bytes.
    HandOver,
}

/// What this server makes of `bytes` received on a new connection, and the bytes it leaves in
/// its buffer. For the fuzz target (`fuzz/fuzz_targets/http1_head.rs`).
#[doc(hidden)]
pub fn take_head(bytes: &[u8], max_fields: usize, max_bytes: usize) -> (Taken, Bytes) {
    let mut buf = BytesMut::from(bytes);
    let taken = match next(&mut buf, max_fields, max_bytes) {
        Next::Take(head) => Taken::Request(Box::new(head.request), bytes.len() - buf.len()),
        Next::Wait => Taken::Wait,
        Next::HandOver => Taken::HandOver,
    };
    (taken, buf.freeze())
}

/// Waits for the next head's first bytes: `None` when the idle timeout or the shutdown comes
/// first.
async fn wait_readable<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    idle: &mut Option<super::timer::Sleep>,
    until: Instant,
    mut stopped: Pin<&mut impl Future<Output = ()>>,
) -> Option<io::Result<usize>> {
    let timer = idle.get_or_insert_with(|| super::timer::sleep_until(until));
    loop {
        tokio::select! {
            biased;
            r = io.read_buf(buf) => return Some(r),
            // (once done, it is not polled again: the connection closes)
            () = stopped.as_mut() => return None,
            () = &mut *timer => {
                if timer.deadline() >= until {
                    tracing::debug!("gateway connection closed: idle timeout");
                    return None;
                }
                // set for an earlier wait: moved to this one's end
                timer.reset(until);
            }
        }
    }
}

/// A request head this server takes.
struct Head {
    request: Req<ReqBody>,
    /// The client asked to close after the answer (`Connection: close`).
    close: bool,
}

/// What a parsed head says, before its bytes are taken off the buffer.
struct Parsed {
    len: usize,
    method: Method,
    /// Where the target is in the head.
    target: std::ops::Range<usize>,
    close: bool,
    /// The body's length (`Content-Length`).
    length: u64,
    places: Places,
}

/// Room for the forwarding fields the gateway adds, in a request's list of fields.
const ROOM: usize = 8;

/// A parsed head's request line, as places in the head: its length, method and target, and
/// whether it is HTTP/1.1 (or 1.0).
struct Line {
    len: usize,
    method: std::ops::Range<usize>,
    target: std::ops::Range<usize>,
    http11: bool,
}

impl Line {
    /// The request line httparse parsed (`req`, from the `len` bytes of a head in `buf`).
    fn of(req: &httparse::Request<'_, '_>, buf: &[u8], len: usize) -> Option<Line> {
        let at = |s: &str| {
            let start = (s.as_ptr() as usize).checked_sub(buf.as_ptr() as usize)?;
            (start + s.len() <= len).then_some(start..start + s.len())
        };
        Some(Line {
            len,
            method: at(req.method?)?,
            target: at(req.path?)?,
            http11: req.version? == 1,
        })
    }
}

/// The head at the start of `buf` when it is complete and in its plain form (the usual
/// request), read in one pass without httparse: a method (a token), a space, a target of
/// visible ASCII, a space, `HTTP/1.1`, CRLF, then at most `max_fields` fields as
/// [`Places::quick`] reads them. httparse reads such a head the same (the `http1_head` fuzz
/// target holds every request taken to its reading); `None` leaves any other to it.
fn quick_request(buf: &[u8], max_fields: usize) -> Option<(Line, Places)> {
    let method_len = buf.iter().position(|&b| !super::head::is_token_byte(b))?;
    if method_len == 0 || buf[method_len] != b' ' {
        return None;
    }
    let target_at = method_len + 1;
    let target_len = super::head::first_marked(&buf[target_at..], |w| {
        use super::head::{below_space, equal, HIGH};
        below_space(w) | equal(w, b' ') | equal(w, 0x7f) | (w & HIGH)
    })?;
    let version_at = target_at + target_len;
    if target_len == 0 || buf.get(version_at..version_at + 11)? != b" HTTP/1.1\r\n" {
        return None;
    }
    let (places, len) = Places::quick(buf, version_at + 11, max_fields, ROOM)?;
    let line = Line {
        len,
        method: 0..method_len,
        target: target_at..version_at,
        http11: true,
    };
    Some((line, places))
}

impl Parsed {
    /// What the parsed head `bytes` (its `line` and field `places`) is, with `after` bytes
    /// behind it in the buffer; `None` when it is not a request this server takes.
    fn of(line: &Line, places: Places, bytes: &[u8], after: usize) -> Option<Parsed> {
        if !line.http11 {
            return None;
        }
        let method = match &bytes[line.method.clone()] {
            b"GET" => Method::GET,
            b"HEAD" => Method::HEAD,
            b"CONNECT" => return None,
            m => Method::from_bytes(m).ok()?,
        };
        let target = &bytes[line.target.clone()];
        // (a target longer than hyper takes is hyper's to refuse: 414)
        if !target.starts_with(b"/") || target.len() >= usize::from(u16::MAX) {
            return None;
        }
        let mut close = false;
        let mut length = None;
        for (known, value) in places.values(bytes) {
            match known {
                Known::TransferEncoding | Known::Expect | Known::Upgrade | Known::Te => {
                    return None
                }
                Known::ContentLength => {
                    // one length, in digits (anything else is hyper's to refuse)
                    if length.is_some() || value.is_empty() || !value.iter().all(u8::is_ascii_digit)
                    {
                        return None;
                    }
                    length = Some(std::str::from_utf8(value).ok()?.parse::<u64>().ok()?);
                }
                Known::Connection => {
                    for token in value.split(|b| *b == b',') {
                        let token = token.trim_ascii();
                        if token.eq_ignore_ascii_case(b"upgrade") {
                            return None;
                        }
                        close |= token.eq_ignore_ascii_case(b"close");
                    }
                }
                _ => {}
            }
        }
        let length = length.unwrap_or(0);
        // a body must have come whole with its head (one that is still coming is hyper's, which
        // streams it)
        if length > after as u64 {
            return None;
        }
        Some(Parsed {
            len: bytes.len(),
            method,
            target: line.target.clone(),
            close,
            length,
            places,
        })
    }
}

impl Head {
    /// Takes the parsed head's bytes (and its body) off `buf` and makes the request, or `None`
    /// (and `buf` untouched) when its target is not one hyper's URI takes.
    fn take(buf: &mut BytesMut, parsed: Parsed) -> Option<Head> {
        let whole = buf.split_to(parsed.len).freeze();
        // the target and the fields share the head's bytes (both made before the body is
        // taken: a head this server cannot take is given back whole, for hyper)
        let made = match Uri::from_maybe_shared(whole.slice(parsed.target)) {
            Ok(uri) => Fields::parsed(whole, parsed.places).map(|fields| (uri, fields)),
            Err(_) => Err(whole),
        };
        let (uri, fields) = match made {
            Ok(made) => made,
            Err(whole) => {
                let mut back = BytesMut::with_capacity(whole.len() + buf.len());
                back.extend_from_slice(&whole);
                back.extend_from_slice(buf);
                *buf = back;
                return None;
            }
        };
        let body = match parsed.length {
            0 => None,
            n => Some(buf.split_to(n as usize).freeze()),
        };
        Some(Head {
            request: Req {
                method: parsed.method,
                uri,
                version: hyper::Version::HTTP_11,
                fields,
                body: ReqBody::Whole(body),
                upgrade: None,
            },
            close: parsed.close,
        })
    }
}

/// Writes an answer: its head (with its framing and, when `last` or when the answer says so,
/// `Connection: close`), then its body as it comes (none for a `head_request`). `true` when the connection carries the
/// next request: not the last, and the body whole and as long as announced.
async fn write_answer<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    answer: Answer<Body>,
    last: bool,
    head_request: bool,
    out: &mut Vec<u8>,
    buf: &mut BytesMut,
) -> io::Result<bool> {
    let Answer {
        status,
        reason,
        fields,
        mut body,
        ..
    } = answer;
    if status.is_informational() {
        // (never made: the upstream clients pass interim answers by, and a 101 is spliced
        // through hyper's server) a final answer must not be 1xx: a 500 instead, the last
        tracing::warn!(
            status = status.as_u16(),
            "gateway answer with an interim status"
        );
        io.write_all(
            b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await?;
        io.flush().await?;
        return Ok(false);
    }
    // (`Connection: close` in the answer, seen as its fields are written, makes it the last)
    let mut last = last;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    // (the upstream's own reason phrase, when hyper's client kept one)
    match reason {
        Some(reason) => out.extend_from_slice(reason.as_bytes()),
        None => out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
    // framing: none for answers without a body, the length given by the upstream or known,
    // or chunks
    // no body after the head: 204, 304, and any answer to HEAD, whose length (as a 304's)
    // describes what a GET would get
    let bodiless =
        head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let keeps_length = !bodiless
        || (status != StatusCode::NO_CONTENT
            && (head_request || status == StatusCode::NOT_MODIFIED));
    let mut length = None;
    let mut length_written = false;
    let mut dated = false;
    for (known, name, value) in fields.iter_known() {
        match known {
            Known::ContentLength => {
                if !keeps_length {
                    continue;
                }
                let v = value;
                let n = (!v.is_empty() && v.iter().all(u8::is_ascii_digit))
                    .then(|| std::str::from_utf8(v).ok()?.parse::<u64>().ok())
                    .flatten();
                // the first readable one is written, and frames the body (both upstream
                // clients refuse answers whose lengths disagree)
                match n {
                    Some(n) if !length_written => {
                        length_written = true;
                        if !bodiless {
                            length = Some(n);
                        }
                    }
                    _ => continue,
                }
            }
            Known::Connection => {
                last |= super::head::lists(value, "close");
                continue;
            }
            Known::TransferEncoding => continue,
            Known::Date => dated = true,
            _ => {}
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if !dated {
        out.extend_from_slice(b"date: ");
        push_date(out);
        out.extend_from_slice(b"\r\n");
    }
    let chunked = if bodiless || length.is_some() {
        false
    } else if let Some(n) = body.size_hint().exact() {
        length = Some(n);
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(super::access::digits(n, &mut itoa::Buffer::new()).as_bytes());
        out.extend_from_slice(b"\r\n");
        false
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        true
    };
    if last {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if bodiless {
        io.write_all(out).await?;
        io.flush().await?;
        return Ok(!last);
    }
    let mut sent: u64 = 0;
    loop {
        // what the body has ready joins the head (or the chunks before it) in one write
        let frame = match now_or_later(&mut body).await {
            Ready::Now(f) => f,
            Ready::Later => {
                io.write_all(out).await?;
                io.flush().await?;
                out.clear();
                // while the body keeps the client waiting, a client that leaves ends it
                let Some(frame) = unless_client_leaves(io, buf, std::pin::pin!(body.frame())).await
                else {
                    tracing::debug!("gateway client left during its answer");
                    return Ok(false);
                };
                frame
            }
        };
        let data = match frame {
            None => break,
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => d,
                // (trailers are not relayed to HTTP/1.1 clients)
                Err(_) => continue,
            },
            Some(Err(e)) => {
                tracing::debug!(error = %e, "gateway answer body failed");
                if sent > 0 || !out.is_empty() {
                    io.write_all(out).await?;
                }
                return Ok(false);
            }
        };
        if data.is_empty() {
            continue;
        }
        let mut data = data;
        if let Some(l) = length.filter(|l| sent + data.len() as u64 > *l) {
            // the announced length is what the client reads: the rest is not sent, and the
            // connection cannot carry another answer
            tracing::debug!("gateway answer body longer than its announced length");
            data.truncate((l - sent) as usize);
            out.extend_from_slice(&data);
            io.write_all(out).await?;
            io.flush().await?;
            return Ok(false);
        }
        sent += data.len() as u64;
        if chunked {
            out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        }
        if data.len() >= GATHER {
            io.write_all(out).await?;
            out.clear();
            io.write_all(&data).await?;
        } else {
            out.extend_from_slice(&data);
        }
        if chunked {
            out.extend_from_slice(b"\r\n");
        }
        if out.len() >= GATHER {
            io.write_all(out).await?;
            out.clear();
        }
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    io.write_all(out).await?;
    io.flush().await?;
    Ok(!last && length.is_none_or(|l| l == sent))
}

enum Ready {
    Now(Option<Result<hyper::body::Frame<Bytes>, super::BoxError>>),
    Later,
}

/// The body's next frame if it is ready, without waiting.
fn now_or_later(body: &mut Body) -> impl Future<Output = Ready> + '_ {
    std::future::poll_fn(move |cx: &mut Context<'_>| {
        Poll::Ready(match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Ready(f) => Ready::Now(f),
            Poll::Pending => Ready::Later,
        })
    })
}

/// Runs `f` with room for header fields: a few on the stack, then, if the head has more,
/// `max` of them.
fn with_fields<'b, R>(
    max: usize,
    mut f: impl FnMut(&mut [httparse::Header<'b>]) -> Result<R, httparse::Error>,
) -> Result<R, httparse::Error> {
    const FEW: usize = 24;
    let mut few = [httparse::EMPTY_HEADER; FEW];
    match f(&mut few[..max.clamp(1, FEW)]) {
        Err(httparse::Error::TooManyHeaders) if max > FEW => {
            f(&mut vec![httparse::EMPTY_HEADER; max])
        }
        done => done,
    }
}

/// Appends the current date in the HTTP format (made once per second per thread).
fn push_date(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs || d.1.is_empty() {
            *d = (secs, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(d.1.as_bytes());
    });
}

/// A connection's stream with bytes already read from it in front: hyper's server reads them
/// first.
pub(super) struct Replay<S> {
    early: Bytes,
    io: S,
}

impl<S> Replay<S> {
    pub(super) fn new(early: Bytes, io: S) -> Replay<S> {
        Replay { early, io }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.early.is_empty() {
            let n = self.early.len().min(buf.remaining());
            let early = self.early.split_to(n);
            buf.put_slice(&early);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A head as httparse reads it: length, method, target, fields.
    type Reading = (usize, Vec<u8>, Vec<u8>, Vec<(Known, Vec<u8>)>);

    fn httparse_reading(head: &[u8]) -> Option<Reading> {
        let mut fields = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut fields);
        let httparse::Status::Complete(len) = req.parse(head).ok()? else {
            return None;
        };
        let line = Line::of(&req, head, len)?;
        let places = Places::of(&head[..len], req.headers, ROOM)?;
        Some(reading(head, &line, &places))
    }

    fn reading(head: &[u8], line: &Line, places: &Places) -> Reading {
        (
            line.len,
            head[line.method.clone()].to_vec(),
            head[line.target.clone()].to_vec(),
            places.values(head).map(|(k, v)| (k, v.to_vec())).collect(),
        )
    }

    #[test]
    fn plain_request_heads_are_read_quickly_and_as_httparse_reads_them() {
        for head in [
            &b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"[..],
            b"POST /v1/payments?x=1&y=%2F HTTP/1.1\r\nhost: api.bank.example\r\nContent-Length: 2\r\nX-Api-Key: k\r\n\r\n{}",
            b"get /a HTTP/1.1\r\nUser-Agent: wrk\t/4 \xc3\xa9t\xe9\r\n\r\n",
            b"OPTIONS /b HTTP/1.1\r\n\r\n",
        ] {
            let (line, places) = quick_request(head, 100).expect("read quickly");
            assert!(line.http11);
            assert_eq!(
                Some(reading(head, &line, &places)),
                httparse_reading(head),
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
        // anything else is left to httparse
        for head in [
            &b"GET / HTTP/1.1\r\nHost: a\r\n"[..],
            b"\r\nGET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET /caf\xc3\xa9 HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\nHost: a\n\n",
            b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a \r\n\r\n",
            b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n b\r\n\r\n",
            b"G(T / HTTP/1.1\r\n\r\n",
            b"GET /\x7f HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                quick_request(head, 100).is_none(),
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
        // a field more than allowed: httparse's to refuse
        assert!(quick_request(b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\n\r\n", 1).is_none());
        assert!(quick_request(b"GET / HTTP/1.1\r\nA: 1\r\n\r\n", 1).is_some());
    }
}
