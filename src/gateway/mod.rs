//! The gateway data plane: an HTTP listener that routes requests of published APIs to their
//! upstreams through the APIs' policy chains.
//!
//! Architecture invariant: the request path reads only the compiled [`RouteTable`] (swapped
//! atomically after each committed change) and in-memory limiter state; it never touches the
//! store or Raft, and it never panics on client input. Policies it does not enforce yet make the
//! API answer 503 (fail closed), never pass traffic unchecked.

pub mod access;
pub mod front;
pub mod h1;
pub mod head;
pub mod jwks;
pub mod policy;
pub mod quota;
pub mod routes;
pub mod splice;
pub mod timer;
pub mod tls;
pub mod upstream;
pub mod usage;

use crate::model::{Policy, SubscriptionStatus};
use arc_swap::ArcSwap;
use bytes::Bytes;
use head::{Answer, Fields, Known, Req, Valid};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use policy::{Decision, Gcra};
use routes::{Route, RouteTable};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

/// A request's body: hyper's (requests hyper's server read), or one the gateway's own
/// HTTP/1.1 server ([`front`]) read whole with the head (`None` once taken, or when there is
/// none).
pub enum ReqBody {
    Hyper(Incoming),
    Whole(Option<Bytes>),
}

impl hyper::body::Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ReqBody::Hyper(b) => std::pin::Pin::new(b).poll_frame(cx),
            ReqBody::Whole(b) => {
                std::task::Poll::Ready(b.take().map(|b| Ok(hyper::body::Frame::data(b))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Hyper(b) => b.is_end_stream(),
            ReqBody::Whole(b) => b.as_ref().is_none_or(Bytes::is_empty),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            ReqBody::Hyper(b) => b.size_hint(),
            ReqBody::Whole(b) => {
                hyper::body::SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

/// A pooled client for `https://` targets (HTTP/2 or HTTP/1.1 by ALPN).
pub type HttpsClient = Client<hyper_rustls::HttpsConnector<timer::Connector>, Body>;
/// hyper's client with HTTP/2 prior knowledge, for `http://` targets of `protocol: http2`.
pub type H2cClient = Client<timer::Connector, Body>;

/// Limits of the gateway's upstream calls.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamTimeouts {
    pub connect: Duration,
    /// Time until the upstream's response headers.
    pub response: Duration,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

type Verifier = Arc<dyn rustls::server::danger::ClientCertVerifier>;

/// What a request knows of the connection it came on.
#[derive(Debug)]
pub struct Conn {
    pub peer: SocketAddr,
    /// `None` on the plain-HTTP listener.
    pub tls: Option<tls::TlsConn>,
    /// Outcomes of `mutual-tls` chain checks on this connection, by verifier: a keep-alive
    /// connection checks its chain once per CA bundle, not once per request.
    /// (The verifier is held, so its address cannot be reused by another while cached.)
    mtls_checked: Mutex<Vec<(Verifier, bool)>>,
    /// The last API key presented on this connection, as its fingerprint and its SHA-256
    /// digest: see [`key_digest`].
    key_digest: Mutex<KeyMemo>,
    /// The peer's address as a header value, made once per connection.
    peer_value: Option<HeaderValue>,
    /// The connection's place under `max_connections` and in the open-connections gauge, held
    /// as long as the connection lives, a WebSocket spliced from it included.
    hold: Option<Arc<Hold>>,
    /// Its requests, for the idle timeout of HTTP/2 connections.
    pub activity: Activity,
    /// HTTP/2: the answers being sent, for the client's flow-control stalls.
    answers: Mutex<Vec<std::sync::Weak<Answering>>>,
    /// The gateway's shutdown signal and idle timeout, for a WebSocket spliced from it.
    stop: Option<watch::Receiver<bool>>,
    idle: Duration,
    /// Held by the listener's drain (which waits until it is the last holder): by the
    /// connection, and by a WebSocket spliced from it.
    live: Option<Arc<()>>,
}

/// The requests of a connection.
///
/// HTTP/2 (`kept`): how many are being handled, how many there were, and when the last one
/// ended (milliseconds from the connection's opening), for [`drive_h2`]'s idle timeout.
///
/// HTTP/1.1: when the head being received began to arrive, for [`Watched`]'s header timeout
/// (hyper's own header-read timer, which also runs while a keep-alive connection waits for its
/// next request, is set to the idle timeout). The first byte read while a head is awaited
/// starts the clock; the head's arrival at the handler stops it; the handler's end awaits the
/// next head. A connection's first head is timed from its opening.
#[derive(Debug)]
pub struct Activity {
    kept: bool,
    opened: Instant,
    in_flight: std::sync::atomic::AtomicU32,
    requests: std::sync::atomic::AtomicU64,
    last_ms: std::sync::atomic::AtomicU64,
    /// HTTP/1.1: a head is awaited (no request is being handled).
    awaiting_head: std::sync::atomic::AtomicBool,
    /// HTTP/1.1: milliseconds from the opening, plus one, at which the awaited head began to
    /// arrive; 0 while none has.
    head_from_ms: std::sync::atomic::AtomicU64,
}

/// A request being handled, until its answer's body is sent (see [`Conn::begin`]).
pub struct InFlight(Arc<Conn>);

impl Drop for InFlight {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        let a = &self.0.activity;
        // rounded up: the idle time is never counted from before the request's end
        a.last_ms.store(a.ms_now(), Relaxed);
        a.in_flight.fetch_sub(1, Relaxed);
    }
}

/// An HTTP/2 answer's body and its place in flight (see [`Conn::begin`]), which the
/// connection's watch ([`Conn::stalled_answers`]) takes and drops when the client gives the
/// stream no flow-control credit for the idle timeout: hyper then holds a frame it cannot send
/// and stops pulling the body, so no timer of the body itself would run, and the upstream
/// connection behind it would be held for as long as the client likes.
struct Answering {
    /// Milliseconds from the connection's opening, plus one, since which hyper has held the
    /// answer's head or a frame of its body without pulling the next one (it waits for the
    /// client's window); 0 while it pulls, or while the body waits for the upstream.
    waiting_ms: std::sync::atomic::AtomicU64,
    held: Mutex<Option<Held>>,
}

/// What an [`Answering`] holds until the answer is sent or dropped.
struct Held {
    body: Body,
    guard: InFlight,
    /// The rest of the body's last data frame: hyper is given at most `PULL` bytes at a time,
    /// so it pulls again each time the client has taken that much (a client that reads slowly
    /// but steadily keeps its answer, however large the upstream's chunks).
    rest: Bytes,
}

/// The most bytes of an HTTP/2 answer handed to hyper at once (one default-sized frame).
const PULL: usize = 16 * 1024;

/// The body hyper sends of an [`Answering`].
struct Streamed(Arc<Answering>);

impl hyper::body::Body for Streamed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        use std::sync::atomic::Ordering::Relaxed;
        let a = &*self.0;
        a.waiting_ms.store(0, Relaxed);
        let mut held = lock(&a.held);
        let Some(h) = held.as_mut() else {
            return std::task::Poll::Ready(Some(Err(
                "the client took none of the answer within the idle timeout".into(),
            )));
        };
        let mut data = if h.rest.is_empty() {
            match std::pin::Pin::new(&mut h.body).poll_frame(cx) {
                std::task::Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => data,
                    Err(frame) => return std::task::Poll::Ready(Some(Ok(frame))),
                },
                other => return other,
            }
        } else {
            std::mem::take(&mut h.rest)
        };
        if data.len() > PULL {
            h.rest = data.split_off(PULL);
        }
        // hyper pulls the next frame once the client has taken this one
        a.waiting_ms.store(h.guard.0.activity.ms_now(), Relaxed);
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        // (a dropped answer is not ended, so it is never taken for a whole one)
        lock(&self.0.held)
            .as_ref()
            .is_some_and(|h| h.rest.is_empty() && h.body.is_end_stream())
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        lock(&self.0.held)
            .as_ref()
            .map(|h| {
                let mut hint = h.body.size_hint();
                let rest = h.rest.len() as u64;
                // (the upper bound first: a lower bound above it would panic)
                if let Some(upper) = hint.upper() {
                    hint.set_upper(upper.saturating_add(rest));
                }
                hint.set_lower(hint.lower().saturating_add(rest));
                hint
            })
            .unwrap_or_default()
    }
}

impl Activity {
    /// Milliseconds from the connection's opening, plus one (never 0).
    fn ms_now(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis().saturating_add(1)).unwrap_or(u64::MAX)
    }

    fn new(kept: bool) -> Activity {
        Activity {
            kept,
            opened: Instant::now(),
            in_flight: Default::default(),
            requests: Default::default(),
            last_ms: Default::default(),
            awaiting_head: std::sync::atomic::AtomicBool::new(true),
            // the first head is timed from the opening
            head_from_ms: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// HTTP/1.1: bytes came from the client. While a head is awaited, the first of them starts
    /// the header timeout.
    fn bytes_read(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.awaiting_head.load(Relaxed) && self.head_from_ms.load(Relaxed) == 0 {
            self.head_from_ms.store(self.ms_now(), Relaxed);
        }
    }

    /// HTTP/1.1: an answer is being written: bytes read before it (the rest of a request
    /// body, drained or still uploading) began no head. A head that came pipelined behind the
    /// request is bounded by hyper's idle timer alone on hyper's server; `front` starts its
    /// header clock once the answer is written.
    fn wrote(&self) {
        self.head_from_ms
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// HTTP/1.1: the head reached the handler; until it ends, bytes read are its body's.
    fn head_received(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.awaiting_head.store(false, Relaxed);
        self.head_from_ms.store(0, Relaxed);
    }

    /// HTTP/1.1: the handler ended; the next bytes begin the next head.
    fn await_head(&self) {
        self.awaiting_head
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// HTTP/1.1: when the head being received must have reached the handler, `limit` after its
    /// first byte; `None` when none is being received.
    fn head_deadline(&self, limit: Duration) -> Option<Instant> {
        match self.head_from_ms.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            from => Some(self.opened + Duration::from_millis(from - 1) + limit),
        }
    }

    /// Whether the connection has made no request yet.
    fn made_none(&self) -> bool {
        self.requests.load(std::sync::atomic::Ordering::Relaxed) == 0
    }

    /// Whether a request is being handled.
    fn busy(&self) -> bool {
        self.in_flight.load(std::sync::atomic::Ordering::Relaxed) > 0
    }

    /// When the connection is idle for too long: `first` after its opening while it has made
    /// no request, `idle` after its last request ended; never while a request is handled.
    /// `Err(true)` when it made no request (a handshake never finished, or no request came),
    /// `Err(false)` after an idle time, `Ok(instant)` of the next check.
    fn deadline(&self, first: Duration, idle: Duration) -> Result<Instant, bool> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = Instant::now();
        if self.busy() {
            return Ok(now + idle);
        }
        let (since, limit) = match self.requests.load(Relaxed) {
            0 => (self.opened, first),
            _ => (
                self.opened + Duration::from_millis(self.last_ms.load(Relaxed)),
                idle,
            ),
        };
        match since.checked_add(limit).filter(|d| *d > now) {
            Some(d) => Ok(d),
            None => Err(self.requests.load(Relaxed) == 0),
        }
    }
}

/// An upstream's answer body: from the plain HTTP/1.1 client, or hyper's (HTTPS targets, and
/// HTTP/2 to `http://` targets).
enum AnswerBody {
    Plain(h1::UpBody),
    Hyper(Idle<Incoming>),
}

impl hyper::body::Body for AnswerBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        fn boxed<E: std::error::Error + Send + Sync + 'static>(
            polled: std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, E>>>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
            polled.map(|f| f.map(|r| r.map_err(|e| Box::new(e) as BoxError)))
        }
        match self.get_mut() {
            AnswerBody::Plain(b) => boxed(std::pin::Pin::new(b).poll_frame(cx)),
            AnswerBody::Hyper(b) => std::pin::Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            AnswerBody::Plain(b) => b.is_end_stream(),
            AnswerBody::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            AnswerBody::Plain(b) => b.size_hint(),
            AnswerBody::Hyper(b) => b.size_hint(),
        }
    }
}

/// A body that fails when none of it comes for `idle`: every request body sent upstream
/// (hyper's client pulls it in its own connection task, past the answer: without this bound a
/// client that stops sending would hold the upstream connection for as long as it kept its
/// own open), and the answer's body from hyper's client (an upstream that stops sending would
/// hold the client's request). `what` names the body in the error.
struct Idle<B> {
    inner: B,
    idle: Duration,
    what: &'static str,
    /// Made at the first wait, by the task that polls the body (hyper's client polls a
    /// request body in its connection task, which may run on another worker's event loop).
    timer: Option<timer::Sleep>,
    /// Whether the timer runs (since the first wait after a frame).
    armed: bool,
    /// A request body's fate, read by the attempt (the errors of hyper's HTTP/2 client do not
    /// carry the body's).
    watch: Option<Arc<BodyWatch>>,
}

/// What became of a request body on its way upstream.
#[derive(Default)]
struct BodyWatch {
    /// The client sent all of it.
    done: std::sync::atomic::AtomicBool,
    /// The last look found nothing from the client (as opposed to the upstream not taking
    /// the body, when it is not looked at).
    waiting: std::sync::atomic::AtomicBool,
    /// 0, or how it failed (a [`BodyFailure`]'s value).
    failed: std::sync::atomic::AtomicU8,
}

/// How a client's request body failed on its way upstream.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(u8)]
enum BodyFailure {
    /// It stopped coming for the idle timeout (408).
    Stalled = 1,
    /// It could not be read: malformed framing, or an HTTP/2 stream error (400).
    Broke = 2,
    /// The client left before sending all of it (recorded as 499).
    Left = 3,
}

impl BodyWatch {
    fn fail(&self, how: BodyFailure) {
        self.failed
            .store(how as u8, std::sync::atomic::Ordering::Relaxed);
    }

    fn failure(&self) -> Option<BodyFailure> {
        match self.failed.load(std::sync::atomic::Ordering::Relaxed) {
            1 => Some(BodyFailure::Stalled),
            2 => Some(BodyFailure::Broke),
            3 => Some(BodyFailure::Left),
            _ => None,
        }
    }

    /// Whether the client is behind: its body is not all sent and the gateway waits for it.
    fn client_behind(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        !self.done.load(Relaxed) && self.waiting.load(Relaxed)
    }
}

impl<B> Idle<B> {
    fn new(inner: B, idle: Duration, what: &'static str) -> Idle<B> {
        Idle {
            inner,
            idle,
            what,
            timer: None,
            armed: false,
            watch: None,
        }
    }

    /// A request body, its fate told to `watch`.
    fn watched(inner: B, idle: Duration, watch: Arc<BodyWatch>) -> Idle<B> {
        Idle {
            watch: Some(watch),
            ..Idle::new(inner, idle, "request body")
        }
    }
}

impl<B> hyper::body::Body for Idle<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        use std::sync::atomic::Ordering::Relaxed;
        use std::task::Poll;
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.armed = false;
                let frame = frame.map(|f| f.map_err(Into::into));
                if let Some(w) = &this.watch {
                    w.waiting.store(false, Relaxed);
                    match &frame {
                        None => w.done.store(true, Relaxed),
                        Some(Err(e)) if client_left(e.as_ref()) => w.fail(BodyFailure::Left),
                        Some(Err(_)) => w.fail(BodyFailure::Broke),
                        Some(Ok(_)) if this.inner.is_end_stream() => w.done.store(true, Relaxed),
                        Some(Ok(_)) => {}
                    }
                }
                Poll::Ready(frame)
            }
            Poll::Pending => {
                if let Some(w) = &this.watch {
                    w.waiting.store(true, Relaxed);
                }
                if !this.armed {
                    this.armed = true;
                    let deadline = Instant::now() + this.idle;
                    match this.timer.as_mut() {
                        Some(t) => t.reset(deadline),
                        None => this.timer = Some(timer::sleep_until(deadline)),
                    }
                }
                let Some(timer) = this.timer.as_mut() else {
                    return Poll::Pending; // (armed above)
                };
                match std::future::Future::poll(std::pin::Pin::new(timer), cx) {
                    Poll::Ready(()) => {
                        if let Some(w) = &this.watch {
                            w.fail(BodyFailure::Stalled);
                        }
                        Poll::Ready(Some(Err(format!(
                            "no {} came for {} s",
                            this.what,
                            this.idle.as_secs()
                        )
                        .into())))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Why an upstream attempt failed.
enum Failed {
    /// No connection could be opened: the request never left.
    Connect,
    /// The exchange failed; `blamed` when the upstream may be the cause.
    Upstream { blamed: bool },
    /// The client's request body failed.
    ClientBody(BodyFailure),
}

/// Whether a request body's error says the client left before the body's end: its connection
/// ended or was reset where body bytes were due (HTTP/1.1, or the HTTP/2 connection), or it
/// cancelled its HTTP/2 stream.
fn client_left(e: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    let gone = |k: std::io::ErrorKind| {
        matches!(
            k,
            UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
        )
    };
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| gone(io.kind()))
        {
            return true;
        }
        // (h2's error gives no source: its reason or its I/O error is asked)
        if let Some(h2) = c.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::CANCEL)
                || h2.get_io().is_some_and(|io| gone(io.kind()));
        }
        cause = c.source();
    }
    false
}

/// An answer body cut at the API's total timeout (`upstream.timeouts.total_seconds`): past
/// its deadline it fails, so the client's connection is cut (HTTP/1.1) or its stream reset.
/// It wraps the answer outside its verdict: a long answer cut short is not the target's
/// failure.
struct Until {
    inner: Body,
    deadline: Instant,
    /// Made at the first poll, by the task that sends the answer.
    timer: Option<timer::Sleep>,
}

impl hyper::body::Body for Until {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let deadline = this.deadline;
        let timer = this
            .timer
            .get_or_insert_with(|| timer::sleep_until(deadline));
        if std::future::Future::poll(std::pin::Pin::new(timer), cx).is_ready() {
            return std::task::Poll::Ready(Some(Err(
                "the API's total upstream timeout passed before the answer's end".into(),
            )));
        }
        std::pin::Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The pending verdict on the target that gave a good answer head.
struct Judge {
    gateway: Arc<Gateway>,
    route: Arc<Route>,
    target: usize,
    attempt: upstream::Attempt,
    /// Whether a failure of the body counts against the target (not when the client's own
    /// request body may still have been streaming to it).
    blame_errors: bool,
}

/// An upstream answer's body that judges its target when it ends: a success once delivered
/// whole (its end, or as many bytes as its length announced), a failure when it fails on the
/// way (reset, stall, broken framing). Dropped before its end (the client went away), it
/// gives no verdict.
struct Judged {
    inner: AnswerBody,
    /// Taken by the verdict.
    judge: Option<Judge>,
    /// Bytes still to deliver, when the answer announced its length.
    left: Option<u64>,
}

impl Judged {
    fn new(inner: AnswerBody, judge: Judge) -> Judged {
        let left = hyper::body::Body::size_hint(&inner).exact();
        Judged {
            inner,
            judge: Some(judge),
            left,
        }
    }

    fn verdict(&mut self, failed: bool) {
        if let Some(j) = self.judge.take() {
            if failed && !j.blame_errors {
                return; // dropped unjudged
            }
            j.gateway.judge(&j.route, j.target, j.attempt, failed);
        }
    }
}

impl hyper::body::Body for Judged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            None => this.verdict(false),
            Some(Err(_)) => this.verdict(true),
            Some(Ok(f)) => {
                // the server stops polling once the body says it is complete, or once the
                // announced length is written (an HTTP/2 target's end of stream may come later)
                let delivered = match (&mut this.left, f.data_ref()) {
                    (Some(left), Some(d)) => {
                        *left = left.saturating_sub(d.len() as u64);
                        *left == 0
                    }
                    _ => false,
                };
                if delivered || this.inner.is_end_stream() {
                    this.verdict(false);
                }
            }
        }
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A connection slot: released (and the gauge decremented) when the last holder drops it.
pub struct Hold {
    _slot: tokio::sync::OwnedSemaphorePermit,
    open: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hold")
    }
}

impl Conn {
    pub fn new(peer: SocketAddr, tls: Option<tls::TlsConn>, hold: Option<Arc<Hold>>) -> Conn {
        Conn {
            hold,
            peer,
            tls,
            mtls_checked: Mutex::new(Vec::new()),
            key_digest: Mutex::new(KeyMemo(None)),
            peer_value: HeaderValue::from_str(&peer.ip().to_string()).ok(),
            activity: Activity::new(false),
            answers: Mutex::new(Vec::new()),
            stop: None,
            idle: Duration::from_secs(60),
            live: None,
        }
    }

    /// Counts a request of an HTTP/2 connection until the guard is dropped (with its answer's
    /// body); `None` on HTTP/1.1, whose header timer it stops (until [`Conn::end`]).
    pub fn begin(self: &Arc<Conn>) -> Option<InFlight> {
        use std::sync::atomic::Ordering::Relaxed;
        let a = &self.activity;
        if !a.kept {
            a.head_received();
            return None;
        }
        a.in_flight.fetch_add(1, Relaxed);
        a.requests.fetch_add(1, Relaxed);
        Some(InFlight(self.clone()))
    }

    /// HTTP/2: watches an answer being sent (the list is pruned as it grows, so it holds
    /// about as many entries as answers in flight).
    fn watch_answer(&self, answer: &Arc<Answering>) {
        let mut answers = lock(&self.answers);
        if answers.len() == answers.capacity() && answers.len() >= 8 {
            answers.retain(|w| w.strong_count() > 0);
        }
        answers.push(Arc::downgrade(answer));
    }

    /// HTTP/2: drops the answers (their bodies, the upstream connections behind them, their
    /// places in flight) that the client has left without flow-control credit for `idle`.
    /// Returns how many, and when the next one would be due.
    fn stalled_answers(&self, idle: Duration) -> (usize, Option<Instant>) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = Instant::now();
        let mut due = None::<Instant>;
        let mut dropped = Vec::new();
        lock(&self.answers).retain(|w| {
            let Some(a) = w.upgrade() else { return false };
            let since = a.waiting_ms.load(Relaxed);
            if since == 0 {
                return true;
            }
            let deadline = self.activity.opened + Duration::from_millis(since - 1) + idle;
            if deadline > now {
                due = Some(due.map_or(deadline, |d| d.min(deadline)));
                return true;
            }
            let mut held = lock(&a.held);
            // (unless hyper pulled again meanwhile)
            if a.waiting_ms.load(Relaxed) != since {
                return true;
            }
            if let Some(taken) = held.take() {
                dropped.push(taken);
            }
            false
        });
        // (the bodies are dropped outside the list's lock: a body's drop may do some work)
        (dropped.len(), due)
    }

    /// The handler of an HTTP/1.1 request ended: the next bytes read begin the next head.
    pub fn end(&self) {
        if !self.activity.kept {
            self.activity.await_head();
        }
    }

    /// A connection accepted by a gateway listener, with the listener's shutdown signal and
    /// idle timeout; `h2` when it speaks HTTP/2 (its requests are then tracked).
    fn on(
        peer: SocketAddr,
        tls: Option<tls::TlsConn>,
        (hold, live): (Arc<Hold>, &Arc<()>),
        (stop, idle): (&watch::Receiver<bool>, Duration),
        h2: bool,
    ) -> Conn {
        Conn {
            stop: Some(stop.clone()),
            idle,
            activity: Activity::new(h2),
            live: Some(live.clone()),
            ..Conn::new(peer, tls, Some(hold))
        }
    }
}

/// The shared state of the data plane.
pub struct Gateway {
    table: ArcSwap<RouteTable>,
    /// GCRA state per (tenant, API, consumer, limit).
    // (a flood-resistant hash: an unidentified client's address can be part of the key)
    rate: Mutex<HashMap<String, u64>>,
    /// Quota counters per (tenant, API, consumer, window): (window index, count).
    /// Plan quotas, counted from the replicated usage counters (`quota`).
    pub quotas: quota::Quotas,
    /// Clients with HTTP/2 prior knowledge (h2c), by connect timeout in milliseconds: one
    /// pool per timeout, shared by the APIs with `protocol: http2` and `http://` targets.
    h2c_clients: Mutex<HashMap<u64, H2cClient>>,
    timeouts: UpstreamTimeouts,
    started: Instant,
    metrics: Arc<crate::telemetry::Metrics>,
    /// CIDRs of proxies in front of the gateway whose `X-Forwarded-*` headers are believed.
    trusted_proxies: Vec<String>,
    /// Send an RFC 7239 `Forwarded` header (`gateway.forwarded_header`).
    rfc7239: bool,
    /// Request ids: a random per-process prefix and a counter (unique, cheap; not secret).
    id_prefix: u32,
    id_counter: std::sync::atomic::AtomicU64,
    /// The HTTPS listener's configurations and certificate table.
    pub tls: tls::TlsConfigs,
    /// Lasting state of upstream targets across table swaps.
    targets: upstream::Registry,
    /// Clients for HTTPS upstreams by TLS settings, kept across table swaps (and their pools).
    https_clients: Mutex<HashMap<String, HttpsClient>>,
    /// Keys fetched from the JWT policies' `jwks_url`s.
    jwks: jwks::JwksCache,
    /// Per-consumer usage counted since the last flush.
    pub usage: Arc<usage::Meter>,
    /// The access log (buffered; flushed by the node).
    pub access: access::AccessLog,
}

/// A request's id: a client's (visible ASCII, at most 128 bytes) or one the gateway made, kept
/// on the stack (it goes upstream, into the answer, and into problem documents and the log).
#[derive(Clone)]
struct RequestId {
    len: u8,
    bytes: [u8; 128],
}

impl RequestId {
    /// `id` when it may be one: 1 to 128 visible ASCII characters.
    fn new(id: &[u8]) -> Option<RequestId> {
        if id.is_empty() || id.len() > 128 || !id.iter().all(u8::is_ascii_graphic) {
            return None;
        }
        let mut bytes = [0; 128];
        bytes[..id.len()].copy_from_slice(id);
        Some(RequestId {
            len: id.len() as u8,
            bytes,
        })
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// The id as a field value (visible ASCII, checked when made).
    fn value(&self) -> Valid<'_> {
        Valid::composed(self.as_bytes())
    }

    fn as_str(&self) -> &str {
        // (visible ASCII: checked when made)
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

/// What the gateway writes in `Via` (RFC 9110 §7.6.3), on requests and answers.
const VIA: Valid = Valid::constant(b"1.1 apim");

/// A refusal's answer: an RFC 9457 problem document.
// (cold: the branches that refuse are then laid out away from the ones that serve, which keeps
// the serving path's code dense in the instruction cache)
#[cold]
#[inline(never)]
fn problem(status: StatusCode, slug: &str, detail: &str, request_id: &str) -> Answer<Body> {
    let body = serde_json::json!({
        "type": format!("urn:apim:problem:gateway:{slug}"),
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "detail": detail,
        "request_id": request_id,
    });
    let mut fields = Fields::with_capacity(8);
    fields.append(Known::ContentType, b"application/problem+json");
    fields.append(Known::XRequestId, request_id.as_bytes());
    Answer::new(
        status,
        fields,
        Full::new(Bytes::from(body.to_string()))
            .map_err(|e| match e {})
            .boxed(),
    )
}

/// A header policy's edits: `remove`, then `rename` (every value of `from` moves to `to`, in
/// place of any `to`), then `add` (in place of any value of the name).
fn edit_headers(
    h: &mut Fields,
    add: &[crate::model::HeaderValue],
    remove: &[String],
    rename: &[crate::model::HeaderRename],
) {
    for name in remove {
        h.remove(name);
    }
    for r in rename {
        if !head::is_name(r.to.as_bytes()) {
            continue;
        }
        let values: Vec<Vec<u8>> = h.get_all(&r.from).map(<[u8]>::to_vec).collect();
        if values.is_empty() {
            continue;
        }
        h.remove(&r.from);
        h.remove(&r.to);
        for v in values {
            h.append(&r.to, &v);
        }
    }
    for a in add {
        h.insert(&a.name, a.value.as_bytes());
    }
}

/// Whether a host name from `Host` or the request target is plausible: DNS characters (letters,
/// digits, `-`, `_`, `.`) or a bracketed IPv6 literal, at most 253 characters.
fn host_is_valid(host: &str) -> bool {
    let b = host.as_bytes();
    if let [b'[', inner @ .., b']'] = b {
        return !inner.is_empty()
            && inner
                .iter()
                .all(|&c| c.is_ascii_hexdigit() || c == b':' || c == b'.');
    }
    if b.is_empty() || b.len() > 253 || b[0] == b'.' {
        return false;
    }
    // (one pass: letters, digits, `-`, `_` and `.`, never two dots in a row)
    let mut prev = 0u8;
    b.iter().all(|&c| {
        let ok = (c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.')
            && !(c == b'.' && prev == b'.');
        prev = c;
        ok
    })
}

/// A `Host` value split into host and port (`[v6]:port` keeps its brackets on the host).
fn split_host_port(h: &str) -> (&str, Option<&str>) {
    if h.starts_with('[') {
        return match h.find(']') {
            Some(end) => (&h[..=end], h[end + 1..].strip_prefix(':')),
            None => (h, None),
        };
    }
    match h.bytes().rposition(|b| b == b':') {
        Some(at) => (&h[..at], Some(&h[at + 1..])),
        None => (h, None),
    }
}

/// The `Upgrade` of an HTTP/1.1 request that asks to switch to WebSocket (`Connection: upgrade`,
/// `Upgrade: websocket`); other protocols are not switched to.
fn upgrade_token(req: &Req<ReqBody>) -> Option<Vec<u8>> {
    if req.version != hyper::Version::HTTP_11 {
        return None;
    }
    let token = req.fields.get(Known::Upgrade)?;
    let asks = req.fields.lists(Known::Connection, "upgrade");
    // WebSocket only: another protocol (h2c above all) would carry requests the gateway never
    // sees through the spliced connection
    let websocket = token.trim_ascii().eq_ignore_ascii_case(b"websocket");
    (asks && websocket).then(|| token.to_vec())
}

/// Whether a request path is safe to route and forward as is: no empty, `.` or `..` segment,
/// no backslash, no `;` parameters, and no percent-encoded dot, slash or backslash (which
/// upstreams may decode differently than the router matched).
fn path_is_plain(path: &str) -> bool {
    // (one pass: this runs for every request)
    let p = path.as_bytes();
    if p.first() != Some(&b'/') {
        return false;
    }
    // where the current segment began (after its slash)
    let mut segment = 1;
    for (i, &b) in p.iter().enumerate().skip(1) {
        match b {
            b'/' => {
                // an empty, `.` or `..` segment before this slash
                if matches!(&p[segment..i], b"" | b"." | b"..") {
                    return false;
                }
                segment = i + 1;
            }
            b'\\' | b';' => return false,
            b'%' => {
                let next = (p.get(i + 1), p.get(i + 2).map(u8::to_ascii_lowercase));
                if matches!(
                    next,
                    (Some(b'2'), Some(b'e' | b'f'))
                        | (Some(b'5'), Some(b'c'))
                        | (Some(b'0'), Some(b'0'))
                ) {
                    return false;
                }
            }
            _ => {}
        }
    }
    // the last segment may be empty (a trailing slash), not `.` or `..`
    !matches!(&p[segment..], b"." | b"..")
}

/// Removes a query parameter (the API key) from the request's URI.
fn strip_query_param(uri: &mut hyper::Uri, name: &str) {
    let Some(query) = uri.query() else {
        return;
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| pair.split('=').next() != Some(name))
        .collect();
    let path = uri.path();
    let new = if kept.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", kept.join("&"))
    };
    if let Ok(new) = new.parse::<hyper::Uri>() {
        *uri = new;
    }
}

/// Whether a CORS policy admits `origin` (`*` admits every origin).
fn cors_allows(allow_origins: &[String], origin: &str) -> bool {
    allow_origins.iter().any(|o| o == "*" || o == origin)
}

/// `Access-Control-Allow-Origin` (the origin itself, or `*`) and `Vary: Origin`.
fn cors_origin_headers(allow_origins: &[String], origin: &str, out: &mut Fields) {
    out.append(Known::Vary, b"origin");
    let value = match allow_origins.iter().any(|o| o == origin) {
        true => origin.as_bytes(),
        false => b"*",
    };
    out.append("access-control-allow-origin", value);
}

/// Answers a CORS preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) of
/// an API with a CORS policy, before any credential check (browsers send none): 204 with the
/// allowed methods and headers, or 403 when the origin or the method is not allowed.
fn cors_preflight(
    route: &Route,
    req: &Req<ReqBody>,
    request_id: &RequestId,
) -> Option<Answer<Body>> {
    if req.method != hyper::Method::OPTIONS {
        return None;
    }
    let origin = req.fields.get_str(Known::Origin)?;
    let wanted = req.fields.get_str("access-control-request-method")?;
    let (allow_origins, allow_methods, allow_headers, max_age) =
        route.policies.iter().find_map(|p| match p {
            Policy::Cors {
                allow_origins,
                allow_methods,
                allow_headers,
                max_age_seconds,
            } => Some((
                allow_origins,
                allow_methods,
                allow_headers,
                *max_age_seconds,
            )),
            _ => None,
        })?;
    let methods: Vec<String> = if allow_methods.is_empty() {
        vec!["GET".into(), "HEAD".into(), "POST".into()]
    } else {
        allow_methods
            .iter()
            .map(|m| m.to_ascii_uppercase())
            .collect()
    };
    if !cors_allows(allow_origins, origin) || !methods.iter().any(|m| m == wanted) {
        return Some(problem(
            StatusCode::FORBIDDEN,
            "cors-refused",
            "this origin or method is not allowed for this API",
            request_id.as_str(),
        ));
    }
    let mut h = Fields::with_capacity(8);
    cors_origin_headers(allow_origins, origin, &mut h);
    h.append(
        "access-control-allow-methods",
        methods.join(", ").as_bytes(),
    );
    if !allow_headers.is_empty() {
        h.append(
            "access-control-allow-headers",
            allow_headers.join(", ").as_bytes(),
        );
    }
    if max_age > 0 {
        h.append("access-control-max-age", max_age.to_string().as_bytes());
    }
    h.append(Known::XRequestId, request_id.as_bytes());
    Some(Answer::new(
        StatusCode::NO_CONTENT,
        h,
        Full::new(Bytes::new()).map_err(|e| match e {}).boxed(),
    ))
}

/// Whether `headers` carry a bearer JWT that passes the JWT policy's checks against `keys`
/// (the check the policy runs; for fuzzing and tests).
pub fn bearer_token_valid(
    headers: &HeaderMap,
    keys: &[routes::JwtKey],
    issuer: &str,
    audience: &str,
    algorithms: &[String],
    clock_skew_seconds: u32,
) -> bool {
    verify_jwt(
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
        keys,
        &JwtRules {
            issuer,
            audience,
            algorithms,
            clock_skew_seconds,
        },
    )
    .is_ok()
}

/// The checks of a JWT policy besides the signature.
struct JwtRules<'a> {
    issuer: &'a str,
    audience: &'a str,
    algorithms: &'a [String],
    clock_skew_seconds: u32,
}

/// Verifies the bearer JWT of a request: an allowed asymmetric algorithm (never `none` or HMAC),
/// a key of the issuer (by `kid`, or the only key), the signature, `iss`, `aud`, `exp` and `nbf`
/// with the clock skew. Every failure is the same 401: the answer never says which check failed.
fn verify_jwt(
    authorization: Option<&str>,
    keys: &[routes::JwtKey],
    rules: &JwtRules<'_>,
) -> Result<serde_json::Value, Refusal> {
    use jsonwebtoken::Algorithm;
    let invalid = || {
        refuse(
            StatusCode::UNAUTHORIZED,
            "invalid-credential",
            "the token is not valid for this API",
        )
    };
    let Some(token) = authorization
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
    else {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "missing-credential",
            "this API requires a bearer token",
        ));
    };
    if token.len() > 16 * 1024 {
        return Err(invalid());
    }
    let header = jsonwebtoken::decode_header(token).map_err(|_| invalid())?;
    let name = match header.alg {
        Algorithm::RS256 => "RS256",
        Algorithm::PS256 => "PS256",
        Algorithm::ES256 => "ES256",
        Algorithm::EdDSA => "EdDSA",
        _ => return Err(invalid()),
    };
    if !rules.algorithms.is_empty() && !rules.algorithms.iter().any(|a| a == name) {
        return Err(invalid());
    }
    let key = match &header.kid {
        Some(kid) => keys.iter().find(|k| k.kid.as_deref() == Some(kid.as_str())),
        None if keys.len() == 1 => keys.first(),
        None => None,
    }
    .ok_or_else(invalid)?;
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.set_issuer(&[rules.issuer]);
    validation.set_audience(&[rules.audience]);
    validation.leeway = u64::from(rules.clock_skew_seconds);
    validation.validate_nbf = true;
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    jsonwebtoken::decode::<serde_json::Value>(token, &key.key, &validation)
        .map(|d| d.claims)
        .map_err(|_| invalid())
}

/// The `kid` of a request's bearer JWT, if it has one (nothing is verified here).
fn token_kid(authorization: Option<&str>) -> Option<String> {
    let token = authorization?.split_once(' ')?.1.trim();
    if token.len() > 16 * 1024 {
        return None;
    }
    jsonwebtoken::decode_header(token).ok()?.kid
}

/// What the access log says of a request beyond its line and status.
#[derive(Default)]
struct Served {
    /// The API the request was routed to.
    route: Option<Arc<Route>>,
    /// (shared with the key's entry in the table, or made for the request)
    consumer: Option<Arc<str>>,
    upstream_us: Option<u64>,
    /// The client's address (the peer, or what a trusted proxy says).
    client: Option<IpAddr>,
    /// Cause of a refusal by the gateway itself (not an upstream answer).
    refusal: Option<&'static str>,
    /// The host the request was routed by (lower case, no port), once validated, when
    /// `want_host` (the access log names it).
    host: Option<String>,
    want_host: bool,
    /// The request's id, kept when `want_request_id` (for the access-log line of a request
    /// that ends before its answer is made, which has no answer to read it from).
    request_id: Option<RequestId>,
    want_request_id: bool,
    /// When the upstream call began (a request dropped while it waits has its upstream time
    /// from it).
    upstream_started: Option<Instant>,
    /// The client left in the middle of its request body: recorded as 499, whatever the
    /// answer's status.
    client_closed: bool,
    /// Request body bytes forwarded, counted when the consumer is known (usage metering).
    bytes_in: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// The policies admitted an identified consumer: the request is metered.
    admitted: bool,
}

/// What the access log needs of a request (kept only when the line is written).
struct Logged {
    method: hyper::Method,
    uri: hyper::Uri,
    version: hyper::Version,
    user_agent: Option<HeaderValue>,
}

/// The last API key of a connection, as its fingerprint and its SHA-256 digest (never shown:
/// the admin API does not show stored key hashes either).
struct KeyMemo(Option<(u128, [u8; 32])>);

impl std::fmt::Debug for KeyMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyMemo")
    }
}

/// The SHA-256 digest of an API key presented on `conn` (the table finds keys by it),
/// computed once for as long as the connection presents the same key.
///
/// The connection keeps the digest with a fingerprint of the key: SipHash under a random key
/// of the process, of the key marked 0 and of the key marked 1, 128 bits in all. Neither the key nor anything that finds it is kept: the
/// digest is what the table holds already, and the fingerprint is a keyed function of a
/// 256-bit random secret. Another key passes for the last one only when its fingerprint is the
/// same, a chance of 2^-128 per request for a client that knows neither the last key nor the
/// process's keys (a connection a proxy shares among clients included). The key's entry
/// (revocation, expiry, subscription) is still read from the current table on every request.
fn key_digest(conn: &Conn, key: &str) -> [u8; 32] {
    use std::hash::BuildHasher;
    static FINGERPRINT: std::sync::LazyLock<std::hash::RandomState> =
        std::sync::LazyLock::new(std::hash::RandomState::new);
    let half = |mark: u8| u128::from(FINGERPRINT.hash_one((mark, key.as_bytes())));
    let print = half(0) << 64 | half(1);
    if let Some((p, digest)) = lock(&conn.key_digest).0 {
        if p == print {
            return digest;
        }
    }
    let digest = crate::pki::secret_digest(key);
    lock(&conn.key_digest).0 = Some((print, digest));
    digest
}

/// The status recorded for a request that ended before its answer was made, or whose client
/// left in the middle of its body (nginx's "client closed request").
fn client_closed() -> StatusCode {
    StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
}

/// A request in [`Gateway::handle`], until its answer is made.
///
/// Dropped before that, because its connection's server dropped the request (the client closed
/// the connection or reset its stream, or the node stopped past its grace time), it is still
/// recorded: in the metrics and the access log with status 499, and in the consumer's usage
/// when the policies had admitted it (it may have reached the upstream).
struct Handling<'g> {
    gateway: &'g Gateway,
    conn: &'g Conn,
    started: Instant,
    served: Served,
    logged: Option<Logged>,
    answered: bool,
}

impl Handling<'_> {
    /// Records the request with `status`: the metrics and the access-log line (with
    /// `request_id`). Returns the consumer's usage ticket when the policies admitted it for an
    /// identified consumer (its usage is recorded when the ticket is dropped).
    fn record(&self, status: StatusCode, request_id: &str) -> Option<usage::Ticket> {
        let (gateway, served, conn) = (self.gateway, &self.served, self.conn);
        let total = self.started.elapsed();
        gateway.record(served, status, total);
        // one reading of the wall clock: the access line's time and the usage's hour agree
        let wall = (self.logged.is_some() || served.admitted).then(std::time::SystemTime::now);
        if let (Some(logged), Some(wall)) = (&self.logged, wall) {
            let route = served.route.as_deref();
            gateway.access.write(
                &access::Entry {
                    method: logged.method.as_str(),
                    path: logged.uri.path(),
                    host: served.host.as_deref().unwrap_or(""),
                    protocol: match logged.version {
                        hyper::Version::HTTP_2 => "HTTP/2",
                        hyper::Version::HTTP_10 => "HTTP/1.0",
                        _ => "HTTP/1.1",
                    },
                    status: status.as_u16(),
                    duration_us: total.as_micros() as u64,
                    upstream_us: served.upstream_us,
                    tenant: route.map_or("", |r| r.tenant.as_str()),
                    api: route.map_or("", |r| r.api.as_str()),
                    consumer: served.consumer.as_deref().unwrap_or(""),
                    client: Some(served.client.unwrap_or(conn.peer.ip())),
                    request_id,
                    refusal: served.refusal.unwrap_or(""),
                    user_agent: logged
                        .user_agent
                        .as_ref()
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or(""),
                    sni: conn
                        .tls
                        .as_ref()
                        .and_then(|t| t.sni.as_deref())
                        .unwrap_or(""),
                },
                wall,
            );
        }
        let (Some(route), Some(consumer), Some(wall)) = (&served.route, &served.consumer, wall)
        else {
            return None;
        };
        served.admitted.then(|| usage::Ticket {
            meter: gateway.usage.clone(),
            hour: usage::hour_of(wall),
            route: route.clone(),
            consumer: consumer.clone(),
            bytes_in: served.bytes_in.clone(),
            bytes_out: 0,
        })
    }
}

impl Drop for Handling<'_> {
    fn drop(&mut self) {
        // (a panic unwinding through the handler is no client's leaving)
        if self.answered || std::thread::panicking() {
            return;
        }
        if self.served.upstream_us.is_none() {
            // dropped while the upstream worked: that time is the upstream's, not the gateway's
            self.served.upstream_us = self
                .served
                .upstream_started
                .map(|at| at.elapsed().as_micros() as u64);
        }
        let id = self.served.request_id.clone();
        // (the consumer's usage recorded at once)
        drop(self.record(client_closed(), id.as_ref().map_or("", RequestId::as_str)));
    }
}

/// A policy refusal: status, stable cause, and a detail that never says which part of a
/// credential was wrong.
struct Refusal(StatusCode, &'static str, String, Fields);

fn push_num(out: &mut String, n: u64) {
    out.push_str(access::digits(n, &mut itoa::Buffer::new()));
}

fn refuse(status: StatusCode, slug: &'static str, detail: impl Into<String>) -> Refusal {
    Refusal(status, slug, detail.into(), Fields::default())
}

/// A rate limit's or a quota's IETF RateLimit fields: `RateLimit-Policy:
/// "<name>";q=<limit>;w=<seconds>` and `RateLimit: "<name>";r=<remaining>;t=<seconds left>`
/// (each one more item of its list).
fn push_ratelimit_fields(out: &mut Fields, name: &str, item: RateItem) {
    for (field, first, second) in [
        (
            Known::RateLimitPolicy,
            (b";q=", item.limit),
            (b";w=", item.width),
        ),
        (
            Known::RateLimit,
            (b";r=", item.remaining),
            (b";t=", item.left),
        ),
    ] {
        let (mut a, mut b) = (itoa::Buffer::new(), itoa::Buffer::new());
        out.append_parts(
            field,
            &[
                b"\"",
                name.as_bytes(),
                b"\"",
                first.0,
                access::digits(first.1, &mut a).as_bytes(),
                second.0,
                access::digits(second.1, &mut b).as_bytes(),
            ],
        );
    }
}

/// What a request's policies add to its answer: the state of its rate limits and quotas,
/// written as the IETF RateLimit fields when the answer is, and other fields (CORS).
#[derive(Default)]
struct PolicyAnswer {
    /// By [`RATE_ITEMS`]: the last rate limit checked, and the plan's quotas.
    rates: [Option<RateItem>; 3],
    fields: Fields,
}

/// The names of [`PolicyAnswer::rates`]' items in the RateLimit fields.
const RATE_ITEMS: [&str; 3] = ["default", "day", "month"];

/// A rate limit's or a quota's state: its limit per window of `width` seconds, what is left,
/// and the seconds until the window ends.
#[derive(Clone, Copy, Debug, PartialEq)]
struct RateItem {
    limit: u64,
    width: u64,
    remaining: u64,
    left: u64,
}

/// Adds the policies' answer fields to an answer's: the RateLimit fields replace any the
/// upstream reported (an item each for the rate limit and the quotas); `Vary` is a list;
/// another field replaces the answer's own.
fn add_policy_headers(fields: &mut Fields, policies: &PolicyAnswer) {
    if policies.rates.iter().any(Option::is_some) {
        fields.retain(|known, _, _| !matches!(known, Known::RateLimit | Known::RateLimitPolicy));
        for (name, item) in RATE_ITEMS.into_iter().zip(&policies.rates) {
            if let Some(item) = item {
                push_ratelimit_fields(fields, name, *item);
            }
        }
    }
    if !policies.fields.is_empty() {
        fields.merge(&policies.fields, |known| known == Known::Vary);
    }
}

/// Seconds until the end of the current UTC day, and the day's index.
fn day_window(now: time::OffsetDateTime) -> (i64, u64) {
    let secs = now.unix_timestamp();
    (
        secs.div_euclid(86_400),
        (86_400 - secs.rem_euclid(86_400)) as u64,
    )
}

/// Seconds until the end of the current UTC month, and the month's index.
fn month_window(now: time::OffsetDateTime) -> (i64, u64) {
    let idx = i64::from(now.year()) * 12 + i64::from(u8::from(now.month())) - 1;
    let next = if now.month() == time::Month::December {
        time::Date::from_calendar_date(now.year() + 1, time::Month::January, 1)
    } else {
        time::Date::from_calendar_date(now.year(), now.month().next(), 1)
    };
    let left = next
        .map(|d| (d.midnight().assume_utc() - now).whole_seconds().max(1) as u64)
        .unwrap_or(86_400);
    (idx, left)
}

/// The forwarding headers the gateway believes and sends.
pub struct Forwarding {
    /// CIDRs of the proxies whose forwarding headers are believed.
    pub trusted_proxies: Vec<String>,
    /// Whether to send an RFC 7239 `Forwarded` header besides the `X-Forwarded-*` ones.
    pub rfc7239: bool,
}

/// This hop's RFC 7239 `Forwarded` element: the peer it came from, the host it was routed by
/// (with the client's port), the scheme of the connection.
fn forwarded_element(peer: std::net::IpAddr, host: &[u8], https: bool) -> String {
    let mut e = String::with_capacity(48 + host.len());
    match peer {
        std::net::IpAddr::V4(a) => {
            e.push_str("for=");
            e.push_str(&a.to_string());
        }
        std::net::IpAddr::V6(a) => {
            e.push_str("for=\"[");
            e.push_str(&a.to_string());
            e.push_str("]\"");
        }
    }
    if let Ok(host) = std::str::from_utf8(host) {
        // a token, or a quoted string (a port's colon, an IPv6 literal's brackets)
        let token = host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
        e.push_str(if token { ";host=" } else { ";host=\"" });
        e.push_str(host);
        if !token {
            e.push('"');
        }
    }
    e.push_str(if https { ";proto=https" } else { ";proto=http" });
    e
}

impl Gateway {
    pub fn new(
        timeouts: UpstreamTimeouts,
        metrics: Arc<crate::telemetry::Metrics>,
        forwarding: Forwarding,
        access: access::AccessLog,
    ) -> anyhow::Result<Gateway> {
        Ok(Gateway {
            table: ArcSwap::from_pointee(RouteTable::default()),
            rate: Mutex::new(HashMap::new()),
            quotas: quota::Quotas::default(),
            h2c_clients: Mutex::new(HashMap::new()),
            timeouts,
            started: Instant::now(),
            metrics,
            trusted_proxies: forwarding.trusted_proxies,
            rfc7239: forwarding.rfc7239,
            id_prefix: crate::pki::random_bytes::<4>()
                .map(u32::from_le_bytes)
                .unwrap_or_default(),
            id_counter: std::sync::atomic::AtomicU64::new(0),
            tls: tls::TlsConfigs::new()?,
            targets: upstream::Registry::default(),
            https_clients: Mutex::new(HashMap::new()),
            jwks: jwks::JwksCache::default(),
            usage: Arc::default(),
            access,
        })
    }

    /// Keeps the keys of `jwks_url`s fetched and fresh, until `stop`.
    pub async fn run_jwks_refresh(self: Arc<Self>, stop: watch::Receiver<bool>) {
        jwks::run(&self.jwks, &self.table, stop).await;
    }

    /// The API's upstream timeouts: connect, response head (and each next part of the body),
    /// and the total if it has one; its own, or the node's.
    fn route_timeouts(&self, route: &Route) -> (Duration, Duration, Option<Duration>) {
        let t = &route.upstream.timeouts;
        (
            t.connect_ms
                .map_or(self.timeouts.connect, |ms| Duration::from_millis(ms.into())),
            t.response_seconds
                .map_or(self.timeouts.response, |s| Duration::from_secs(s.into())),
            t.total_seconds.map(|s| Duration::from_secs(s.into())),
        )
    }

    /// Gives each route that speaks HTTP/2 to `http://` targets its h2c client, one per
    /// connect timeout, reused across swaps.
    fn bind_h2c(&self, table: &RouteTable) {
        let mut cache = lock(&self.h2c_clients);
        let mut kept: HashMap<u64, H2cClient> = HashMap::new();
        for route in table.all() {
            if route.upstream.protocol != crate::model::UpstreamProtocol::Http2 {
                continue;
            }
            let connect = self.route_timeouts(route).0;
            let ms = connect.as_millis() as u64;
            let client = cache.remove(&ms).or_else(|| kept.get(&ms).cloned());
            let client = client.unwrap_or_else(|| {
                Client::builder(TokioExecutor::new())
                    .http2_only(true)
                    .timer(timer::Timer)
                    .http2_keep_alive_interval(Some(Duration::from_secs(30)))
                    .pool_idle_timeout(Duration::from_secs(60))
                    .pool_timer(timer::Timer)
                    .build(timer::Connector::new(connect))
            });
            let _ = route.h2c_client.set(client.clone());
            kept.insert(ms, client);
        }
        *cache = kept;
    }

    /// Gives each route with HTTPS settings its client: one per distinct CA bundle, client
    /// certificate, server name, protocol and connect timeout, reused across swaps.
    fn bind_https(&self, table: &RouteTable) {
        let certs = self.tls.resolver.table.load();
        let mut cache = lock(&self.https_clients);
        let mut kept: HashMap<String, HttpsClient> = HashMap::new();
        for route in table.all() {
            let Some(tls) = &route.upstream.tls else {
                continue;
            };
            let connect = self.route_timeouts(route).0;
            let key = match &tls.client_certificate {
                Some(name) => match certs.by_name.get(&format!("{}/{name}", route.tenant)) {
                    Some(k) => Some(k.clone()),
                    None => {
                        tracing::error!(tenant = %route.tenant, api = %route.api, certificate = %name, "upstream client certificate not available; HTTPS targets fail closed");
                        let _ = route.tls_client.set(Err("client-certificate-unavailable"));
                        continue;
                    }
                },
                None => None,
            };
            let http2 = route.upstream.protocol == crate::model::UpstreamProtocol::Http2;
            let id = format!(
                "{}|{}|{}|{http2}|{}",
                crate::pki::secret_hash(&tls.ca_bundle),
                key.as_ref()
                    .and_then(|k| k.cert.first())
                    .map(|c| crate::pki::fingerprint(c))
                    .unwrap_or_default(),
                tls.server_name.as_deref().unwrap_or_default(),
                connect.as_millis()
            );
            let client = match cache.remove(&id).or_else(|| kept.get(&id).cloned()) {
                Some(c) => Ok(c),
                None => self.https_client(tls, key, http2, connect),
            };
            match client {
                Ok(c) => {
                    let _ = route.tls_client.set(Ok(c.clone()));
                    kept.insert(id, c);
                }
                Err(e) => {
                    tracing::error!(tenant = %route.tenant, api = %route.api, error = %e, "upstream TLS settings unusable; HTTPS targets fail closed");
                    let _ = route.tls_client.set(Err("tls-settings-unusable"));
                }
            }
        }
        *cache = kept;
    }

    fn https_client(
        &self,
        tls: &crate::model::UpstreamTls,
        key: Option<Arc<rustls::sign::CertifiedKey>>,
        http2_only: bool,
        connect: Duration,
    ) -> anyhow::Result<HttpsClient> {
        let roots = crate::pki::root_store(&tls.ca_bundle)?;
        let b = rustls::ClientConfig::builder_with_provider(Arc::new(tls::provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_root_certificates(roots);
        let cfg = match key {
            Some(k) => b.with_client_cert_resolver(Arc::new(tls::FixedClientCert(k))),
            None => b.with_no_client_auth(),
        };
        let http = timer::Connector::new(connect);
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(cfg)
            .https_only();
        let builder = match &tls.server_name {
            Some(n) => {
                builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(
                    rustls_pki_types::ServerName::try_from(n.clone())?,
                ))
            }
            None => builder,
        };
        // ALPN offers h2 and http/1.1, or h2 alone (`protocol: http2`)
        let connector = if http2_only {
            builder.enable_http2().wrap_connector(http)
        } else {
            builder.enable_all_versions().wrap_connector(http)
        };
        Ok(Client::builder(TokioExecutor::new())
            .http2_only(http2_only)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(timer::Timer)
            .build(connector))
    }

    /// Runs the active health checks of every API that configures them, until `stop`: each
    /// target is probed every interval; `unhealthy_threshold` failures in a row take it out,
    /// `healthy_threshold` passes in a row bring it back.
    pub async fn run_health_checks(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let table = self.table.load_full();
            let now = self.now_ns();
            for route in table.all() {
                let Some(hc) = route.upstream.health_check.clone() else {
                    continue;
                };
                for (i, target) in route.targets.iter().enumerate() {
                    let state = target.state();
                    if state.next_check.load(Relaxed) > now {
                        continue;
                    }
                    state.next_check.store(
                        now + u64::from(hc.interval_seconds) * 1_000_000_000,
                        Relaxed,
                    );
                    let gw = self.clone();
                    let route = route.clone();
                    let hc = hc.clone();
                    tokio::spawn(async move {
                        let target = &route.targets[i];
                        let ok = gw.probe(&route, target, &hc).await;
                        let state = target.state();
                        let was = state.healthy.load(Relaxed);
                        if ok {
                            state.hc_failures.store(0, Relaxed);
                            let n = state.hc_passes.fetch_add(1, Relaxed) + 1;
                            if !was && n >= hc.healthy_threshold {
                                state.healthy.store(true, Relaxed);
                                tracing::info!(tenant = %route.tenant, api = %route.api, target = %target.origin, "upstream target passes its health checks");
                                gw.target_health(&route, target, true);
                            }
                        } else {
                            state.hc_passes.store(0, Relaxed);
                            let n = state.hc_failures.fetch_add(1, Relaxed) + 1;
                            if was && n >= hc.unhealthy_threshold {
                                state.healthy.store(false, Relaxed);
                                tracing::warn!(tenant = %route.tenant, api = %route.api, target = %target.origin, "upstream target fails its health checks");
                                gw.target_health(&route, target, false);
                            }
                        }
                    });
                }
            }
        }
    }

    /// One health-check request: GET `<target><path>`, healthy on 2xx or 3xx within the timeout
    /// (over the route's TLS settings for an `https://` target).
    async fn probe(
        &self,
        route: &Route,
        target: &routes::Target,
        hc: &crate::model::HealthCheck,
    ) -> bool {
        let Ok(uri) = format!("{}{}{}", target.origin, target.path, hc.path).parse::<hyper::Uri>()
        else {
            return false;
        };
        let empty = || http_body_util::Empty::new().map_err(|e| match e {}).boxed();
        let timeout = Duration::from_millis(u64::from(hc.timeout_ms));
        let passed = |s: StatusCode| s.is_success() || s.is_redirection();
        let via_hyper = target.origin.starts_with("https://")
            || route.upstream.protocol == crate::model::UpstreamProtocol::Http2;
        if !via_hyper {
            // the gateway's own HTTP/1.1 client, with the API's connect timeout; the probe's
            // connection is not kept (its answer is not read)
            let Some(origin) = &target.authority else {
                return false;
            };
            let mut fields = Fields::with_capacity(2);
            fields.append(Known::UserAgent, b"apim-health-check");
            fields.append(Known::Connection, b"close");
            let head = h1::Outgoing {
                method: &hyper::Method::GET,
                path: [uri.path(), ""],
                query: uri.query(),
                fields: &fields,
            };
            let connect = self.route_timeouts(route).0;
            let sent = h1::send(origin, head, None, connect, timeout, Instant::now());
            return matches!(
                timer::timeout(timeout, sent).await,
                Ok(Ok(r)) if passed(r.status)
            );
        }
        let mut req = Request::new(empty());
        *req.uri_mut() = uri;
        req.headers_mut().insert(
            header::USER_AGENT,
            HeaderValue::from_static("apim-health-check"),
        );
        let sent = if target.origin.starts_with("https://") {
            match route.tls_client.get() {
                Some(Ok(c)) => c.request(req),
                _ => return false,
            }
        } else {
            match route.h2c_client.get() {
                Some(c) => c.request(req),
                None => return false,
            }
        };
        match timer::timeout(timeout, sent).await {
            Ok(Ok(r)) => passed(r.status()),
            _ => false,
        }
    }

    /// The verdict on an attempt on `route.targets[idx]`: a failure may eject the target, a
    /// success closes its ejection (both logged, and shown in `apim_gateway_target_up`).
    fn judge(&self, route: &Route, idx: usize, attempt: upstream::Attempt, failed: bool) {
        let target = &route.targets[idx];
        if failed {
            let now_ns = self.ns_at(Instant::now());
            if attempt.failure(now_ns, &route.upstream.ejection) {
                tracing::warn!(tenant = %route.tenant, api = %route.api, target = %target.origin, seconds = route.upstream.ejection.ejection_seconds, "upstream target ejected");
                self.target_health(route, target, false);
            }
        } else if attempt.success() {
            tracing::info!(tenant = %route.tenant, api = %route.api, target = %target.origin, "upstream target back in service");
            self.target_health(route, target, true);
        }
    }

    /// Publishes whether a target takes traffic (a target the current table still has: a
    /// verdict reached on a table swapped out since does not bring a removed target's series
    /// back; the target's state itself is kept across swaps, see `upstream::Registry`).
    fn target_health(&self, route: &Route, target: &routes::Target, up: bool) {
        let current = self.table.load().all().iter().any(|r| {
            r.tenant == route.tenant
                && r.api == route.api
                && r.targets
                    .iter()
                    .any(|t| t.origin == target.origin && t.path == target.path)
        });
        if !current {
            return;
        }
        self.metrics
            .gateway_target_up
            .get_or_create(&crate::telemetry::TargetLabels {
                tenant: route.tenant.clone(),
                api: route.api.clone(),
                target: target.label(),
            })
            .set(i64::from(up));
    }

    fn tls_failure(&self, cause: &'static str, peer: SocketAddr) {
        tracing::debug!(peer = %peer, cause, "gateway TLS handshake failed");
        self.metrics
            .gateway_tls_failures
            .get_or_create(&crate::telemetry::CauseLabels {
                cause: cause.to_string(),
            })
            .inc();
    }

    /// Installs a new certificate table; handshakes in progress keep the one they started with.
    pub fn swap_certificates(&self, table: tls::CertTable) {
        self.metrics
            .gateway_certificates
            .set(i64::try_from(table.certificates).unwrap_or(i64::MAX));
        self.metrics.certificate_expiries(&table.expiries);
        self.tls.resolver.table.store(Arc::new(table));
    }

    fn next_request_id(&self) -> RequestId {
        let n = self
            .id_counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // "req-" + 8 hex digits of the prefix + 12 of the counter, without the formatter
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut id = [0u8; 24];
        id[..4].copy_from_slice(b"req-");
        let value = (u128::from(self.id_prefix) << 48) | u128::from(n & 0xffff_ffff_ffff);
        for (i, digit) in id[4..].iter_mut().rev().enumerate() {
            *digit = HEX[((value >> (i * 4)) & 0xf) as usize];
        }
        let mut bytes = [0; 128];
        bytes[..id.len()].copy_from_slice(&id);
        RequestId {
            len: id.len() as u8,
            bytes,
        }
    }

    /// Installs a new routing table; requests in flight finish on the one they started with.
    pub fn swap(&self, table: RouteTable) {
        self.metrics
            .gateway_routes
            .set(i64::try_from(table.routes).unwrap_or(i64::MAX));
        self.targets.bind(&table);
        self.bind_https(&table);
        self.bind_h2c(&table);
        // Every API's series exist before the table serves (a request still on the old table
        // then never brings a removed API's series back): an API the old table had keeps its
        // handles, a new one gets its series.
        let old = self.table.load_full();
        self.metrics.carry_series(&old, &table);
        self.table.store(Arc::new(table));
        self.metrics.forget_gone(&old, &self.table.load());
    }

    pub fn routes(&self) -> usize {
        self.table.load().routes
    }

    fn now_ns(&self) -> u64 {
        self.ns_at(Instant::now())
    }

    /// Nanoseconds from the gateway's start to `at` (the clock of targets' state).
    fn ns_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.started).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Runs the route's policy chain. Returns the consumer (if identified) and headers to add
    /// to the answer (rate-limit state). `started` is the request's start: the time its rate
    /// limits count it at (no clock reading of their own).
    #[allow(clippy::too_many_arguments)]
    fn enforce(
        &self,
        table: &RouteTable,
        route: &Route,
        op_scopes: &[String],
        req: &mut Req<ReqBody>,
        conn: &Conn,
        served: &mut Served,
        started: Instant,
    ) -> Result<PolicyAnswer, Refusal> {
        let mut answer = PolicyAnswer::default();
        if route.policies.is_empty() {
            return Ok(answer);
        }
        let client = served.client.unwrap_or(conn.peer.ip());
        for (i, p) in route.policies.iter().enumerate() {
            match p {
                Policy::ApiKey {
                    header: name,
                    query_param,
                } => {
                    // the key is only ever hashed (never copied, never logged)
                    let name = head::Name::from(name.as_str());
                    let from_header = req.fields.get_str(name).map(|k| key_digest(conn, k.trim()));
                    let from_query = || {
                        let q = query_param.as_ref()?;
                        let qs = req.uri.query()?;
                        serde_urlencoded::from_str::<Vec<(String, String)>>(qs)
                            .ok()?
                            .into_iter()
                            .find(|(k, _)| k == q)
                            .map(|(_, v)| key_digest(conn, v.trim()))
                    };
                    let Some(digest) = from_header.or_else(from_query) else {
                        return Err(refuse(
                            StatusCode::UNAUTHORIZED,
                            "missing-credential",
                            "this API requires an API key",
                        ));
                    };
                    // never forward the credential upstream, in a header or in the query
                    req.fields.remove(name);
                    if let Some(q) = query_param {
                        strip_query_param(&mut req.uri, q);
                    }
                    let now_unix = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
                    let entry = table.keys.get(&digest).filter(|k| {
                        k.tenant == route.tenant && !k.revoked && k.expires_unix > now_unix
                    });
                    let Some(entry) = entry else {
                        return Err(refuse(
                            StatusCode::UNAUTHORIZED,
                            "invalid-credential",
                            "the API key is not valid for this API",
                        ));
                    };
                    // (a consumer two policies identify is admitted, and counted, once)
                    if served.consumer.as_deref() != Some(&*entry.consumer) {
                        self.admit(route, &entry.consumer, started, &mut answer)?;
                    }
                    served.consumer = Some(entry.consumer.clone());
                }
                Policy::RateLimit {
                    requests,
                    per_seconds,
                    per,
                } => {
                    // a tenant-wide limit is one bucket per (requests, window), whichever API;
                    // the key is built in a buffer of the thread's (copied only when new)
                    thread_local! {
                        static KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
                    }
                    KEY.with(|key| {
                        let mut key = key.borrow_mut();
                        key.clear();
                        key.push_str(&route.tenant);
                        key.push('/');
                        let index = u64::try_from(i).unwrap_or(u64::MAX);
                        match per {
                            crate::model::RateScope::Consumer => {
                                key.push_str(&route.api);
                                key.push('/');
                                match &served.consumer {
                                    Some(who) => key.push_str(who),
                                    None => key.push_str(&client.to_string()),
                                }
                                key.push('/');
                                push_num(&mut key, index);
                            }
                            crate::model::RateScope::Api => {
                                key.push_str(&route.api);
                                key.push_str("//");
                                push_num(&mut key, index);
                            }
                            crate::model::RateScope::Tenant => {
                                key.push_str("//");
                                push_num(&mut key, u64::from(*requests));
                                key.push('/');
                                push_num(&mut key, u64::from(*per_seconds));
                            }
                        }
                        let gcra = Gcra::new(*requests, *per_seconds);
                        self.rate_limit(&key, gcra, started, &mut answer)
                    })?;
                }
                Policy::IpFilter { allow, deny } => {
                    if !policy::ip_allowed(allow, deny, client) {
                        return Err(refuse(
                            StatusCode::FORBIDDEN,
                            "address-refused",
                            "requests from this address are not allowed",
                        ));
                    }
                }
                Policy::RequestSizeLimit { max_bytes } => {
                    let declared = req
                        .fields
                        .get_str(Known::ContentLength)
                        .and_then(|v| v.parse::<u64>().ok());
                    if declared.is_some_and(|n| n > *max_bytes) {
                        return Err(refuse(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "body-too-large",
                            format!("the request body exceeds {max_bytes} bytes"),
                        ));
                    }
                    if declared.is_none() && !hyper::body::Body::is_end_stream(&req.body) {
                        return Err(refuse(
                            StatusCode::LENGTH_REQUIRED,
                            "length-required",
                            "this API needs a Content-Length",
                        ));
                    }
                }
                Policy::RequestHeaders {
                    add,
                    remove,
                    rename,
                } => edit_headers(&mut req.fields, add, remove, rename),
                Policy::ResponseHeaders { .. } => {}
                Policy::Jwt {
                    issuer,
                    audience,
                    algorithms,
                    required_scopes,
                    consumer_claim,
                    clock_skew_seconds,
                    ..
                } => {
                    let fetched;
                    let source = route.jwks_sources.get(&i);
                    let keys: &[routes::JwtKey] = match (route.jwt_keys.get(&i), source) {
                        (Some(k), _) => k,
                        (None, Some(source)) => match self.jwks.get(source) {
                            Some(k) => {
                                fetched = k;
                                &fetched
                            }
                            None => {
                                // no good fetch yet: fail closed
                                return Err(refuse(
                                    StatusCode::SERVICE_UNAVAILABLE,
                                    "policy-unavailable",
                                    "the issuer's keys are not available yet",
                                ));
                            }
                        },
                        (None, None) => {
                            return Err(refuse(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "policy-unavailable",
                                "the issuer's keys are not available",
                            ))
                        }
                    };
                    let authorization = req.fields.get_str(Known::Authorization);
                    if let (Some(source), Some(kid)) = (source, token_kid(authorization)) {
                        if !route.jwt_keys.contains_key(&i)
                            && !keys.iter().any(|k| k.kid.as_deref() == Some(kid.as_str()))
                        {
                            // maybe a rotation at the issuer: ask for an early refresh
                            self.jwks.want(source);
                        }
                    }
                    let claims = verify_jwt(
                        authorization,
                        keys,
                        &JwtRules {
                            issuer,
                            audience,
                            algorithms,
                            clock_skew_seconds: *clock_skew_seconds,
                        },
                    )?;
                    let scopes: Vec<&str> = match (&claims["scope"], &claims["scp"]) {
                        (serde_json::Value::String(s), _) => s.split_whitespace().collect(),
                        (_, serde_json::Value::Array(a)) => {
                            a.iter().filter_map(|v| v.as_str()).collect()
                        }
                        _ => Vec::new(),
                    };
                    if let Some(missing) = required_scopes
                        .iter()
                        .chain(op_scopes)
                        .find(|r| !scopes.contains(&r.as_str()))
                    {
                        return Err(refuse(
                            StatusCode::FORBIDDEN,
                            "insufficient-scope",
                            format!("the token lacks the scope {missing:?}"),
                        ));
                    }
                    if let Some(claim) = consumer_claim {
                        let Some(name) = claims[claim.as_str()].as_str() else {
                            return Err(refuse(
                                StatusCode::UNAUTHORIZED,
                                "invalid-credential",
                                "the token is not valid for this API",
                            ));
                        };
                        if served.consumer.as_deref() != Some(name) {
                            self.admit(route, name, started, &mut answer)?;
                        }
                        served.consumer = Some(name.into());
                    }
                }
                Policy::Cors { allow_origins, .. } => {
                    // Preflights are answered before the chain (see `serve_one`); on a real
                    // request an allowed origin gets the CORS answer headers.
                    let origin = req.fields.get_str(Known::Origin);
                    if let Some(origin) = origin.filter(|o| cors_allows(allow_origins, o)) {
                        cors_origin_headers(allow_origins, origin, &mut answer.fields);
                    }
                }
                Policy::MutualTls { map_by, .. } => {
                    let who = self.client_certificate(table, route, i, *map_by, conn)?;
                    if served.consumer.as_deref() != Some(who.as_str()) {
                        self.admit(route, &who, started, &mut answer)?;
                    }
                    served.consumer = Some(who.into());
                }
            }
        }
        Ok(answer)
    }

    /// Checks the connection's client chain against the CA bundle of the route's `mutual-tls`
    /// policy at `index`, and names the consumer the leaf maps to. Every failure gives the same
    /// answer: which check failed is logged, not told.
    fn client_certificate(
        &self,
        table: &RouteTable,
        route: &Route,
        index: usize,
        map_by: crate::model::CertMapping,
        conn: &Conn,
    ) -> Result<String, Refusal> {
        let denied = || {
            refuse(
                StatusCode::UNAUTHORIZED,
                "invalid-client-certificate",
                "this API requires a valid client certificate",
            )
        };
        let Some(verifier) = route.mtls.get(&index) else {
            return Err(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "policy-unavailable",
                "the API's client-certificate policy cannot be enforced",
            ));
        };
        if conn.tls.as_ref().is_some_and(|t| !t.client_auth_requested) {
            // the handshake (for another SNI host) did not ask for a certificate: the client
            // must open a connection for this host
            return Err(refuse(
                StatusCode::MISDIRECTED_REQUEST,
                "misdirected-request",
                "open a connection for this host to present a client certificate",
            ));
        }
        let Some((leaf, intermediates)) =
            conn.tls.as_ref().and_then(|t| t.client_chain.split_first())
        else {
            return Err(denied());
        };
        let known = lock(&conn.mtls_checked)
            .iter()
            .find(|(v, _)| Arc::ptr_eq(v, verifier))
            .map(|(_, ok)| *ok);
        let ok = known.unwrap_or_else(|| {
            let r = verifier.verify_client_cert(
                leaf,
                intermediates,
                rustls_pki_types::UnixTime::now(),
            );
            if let Err(e) = &r {
                tracing::info!(tenant = %route.tenant, api = %route.api, error = %e, "client certificate refused");
            }
            let mut checked = lock(&conn.mtls_checked);
            if checked.len() >= 16 {
                checked.remove(0);
            }
            checked.push((verifier.clone(), r.is_ok()));
            r.is_ok()
        });
        if !ok {
            return Err(denied());
        }
        let identity = match map_by {
            crate::model::CertMapping::Fingerprint => {
                format!("sha256:{}", crate::pki::fingerprint(leaf))
            }
            crate::model::CertMapping::Subject => crate::model::normalize_cert_identity(
                &crate::pki::subject_of(leaf).unwrap_or_default(),
            ),
        };
        table
            .cert_consumers
            .get(&route.tenant)
            .and_then(|m| m.get(&identity))
            .cloned()
            .ok_or_else(|| {
                tracing::info!(tenant = %route.tenant, api = %route.api, "client certificate maps to no consumer");
                denied()
            })
    }

    /// The consumer must hold an active subscription to the route's API; its plan's rate limit
    /// and quotas then apply.
    fn admit(
        &self,
        route: &Route,
        consumer: &str,
        started: Instant,
        answer: &mut PolicyAnswer,
    ) -> Result<(), Refusal> {
        let Some((SubscriptionStatus::Active, plan)) = route.subscriptions.get(consumer) else {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "not-subscribed",
                "the application has no active subscription to this API",
            ));
        };
        let Some(plan) = plan else {
            return Ok(());
        };
        if let Some(rl) = &plan.rate_limit {
            let mut key =
                String::with_capacity(route.tenant.len() + route.api.len() + consumer.len() + 8);
            for part in [
                route.tenant.as_str(),
                "/",
                route.api.as_str(),
                "/",
                consumer,
                "/plan",
            ] {
                key.push_str(part);
            }
            self.rate_limit(
                &key,
                Gcra::new(rl.requests, rl.per_seconds),
                started,
                answer,
            )?;
        }
        if let Some(q) = &plan.quota {
            let now = time::OffsetDateTime::now_utc();
            let who = (route.tenant.as_str(), route.api.as_str(), consumer);
            // the quotas as RateLimit policies named "day" and "month" (windows in seconds)
            let month_secs = 86_400 * u64::from(now.month().length(now.year()));
            // (the item of each: see RATE_ITEMS)
            let named = |exceeded: &quota::Window| match exceeded {
                quota::Window::Day => (1, q.per_day, 86_400),
                quota::Window::Month => (2, q.per_month, month_secs),
            };
            match self.quotas.admit(who, q.per_day, q.per_month, now) {
                Ok(left) => {
                    for (window, remaining, secs) in left {
                        let (item, limit, width) = named(&window);
                        answer.rates[item] = limit.map(|limit| RateItem {
                            limit,
                            width,
                            remaining,
                            left: secs,
                        });
                    }
                }
                Err((window, secs)) => {
                    let mut r = refuse(
                        StatusCode::TOO_MANY_REQUESTS,
                        "quota-exceeded",
                        "the plan's quota for this period is used up",
                    );
                    r.3.append(
                        Known::RetryAfter,
                        access::digits(secs, &mut itoa::Buffer::new()).as_bytes(),
                    );
                    let (item, limit, width) = named(&window);
                    if let Some(limit) = limit {
                        let used_up = RateItem {
                            limit,
                            width,
                            remaining: 0,
                            left: secs,
                        };
                        push_ratelimit_fields(&mut r.3, RATE_ITEMS[item], used_up);
                    }
                    return Err(r);
                }
            }
        }
        Ok(())
    }

    /// Counts a request at `at` against the limit `gcra` of `key`.
    fn rate_limit(
        &self,
        key: &str,
        gcra: Gcra,
        at: Instant,
        answer: &mut PolicyAnswer,
    ) -> Result<(), Refusal> {
        let now = self.ns_at(at);
        let decision = {
            let mut m = self.rate.lock().unwrap_or_else(|p| p.into_inner());
            if m.len() > 100_000 {
                m.retain(|_, tat| *tat > now); // expired states equal a fresh one
            }
            // the key is copied only the first time it is seen
            match m.get_mut(key) {
                Some(tat) => gcra.check(tat, now),
                None => gcra.check(m.entry(key.to_string()).or_insert(0), now),
            }
        };
        let limit = u64::from(gcra.requests);
        let width = u64::from(gcra.per_seconds);
        match decision {
            Decision::Allow {
                remaining,
                reset_secs,
            } => {
                // one "default" item: the last rate limit checked is the one reported
                answer.rates[0] = Some(RateItem {
                    limit,
                    width,
                    remaining: u64::from(remaining),
                    left: reset_secs,
                });
                Ok(())
            }
            Decision::Deny { retry_after_secs } => {
                let mut r = refuse(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate-limited",
                    "the rate limit is exceeded; retry later",
                );
                r.3.append(
                    Known::RetryAfter,
                    access::digits(retry_after_secs, &mut itoa::Buffer::new()).as_bytes(),
                );
                let used_up = RateItem {
                    limit,
                    width,
                    remaining: 0,
                    left: retry_after_secs,
                };
                push_ratelimit_fields(&mut r.3, RATE_ITEMS[0], used_up);
                Err(r)
            }
        }
    }

    /// Handles one request end to end and writes its access-log line (target
    /// `apim::gateway::access`: never a credential, an `Authorization` header or a query string).
    pub async fn handle(self: Arc<Self>, req: Req<ReqBody>, conn: Arc<Conn>) -> Answer<Body> {
        let in_flight = conn.begin();
        // what the access-log line needs of the request, kept only when it is written
        // (cheap clones: the method is an enum, the URI shares its bytes)
        let logged = access::AccessLog::enabled().then(|| Logged {
            method: req.method.clone(),
            uri: req.uri.clone(),
            version: req.version,
            user_agent: self
                .access
                .wants(access::Field::UserAgent)
                .then(|| req.fields.get(Known::UserAgent))
                .flatten()
                .and_then(|v| HeaderValue::from_bytes(v).ok()),
        });
        let mut handling = Handling {
            gateway: &self,
            conn: &conn,
            started: Instant::now(),
            served: Served {
                want_host: logged.is_some() && self.access.wants(access::Field::Host),
                want_request_id: logged.is_some() && self.access.wants(access::Field::RequestId),
                ..Served::default()
            },
            logged,
            answered: false,
        };
        let mut resp = self
            .serve_one(req, &conn, &mut handling.served, handling.started)
            .await;
        handling.answered = true;
        // what is recorded: the answer's status, or 499 for a client that left mid-upload
        let status = match handling.served.client_closed {
            true => client_closed(),
            false => resp.status,
        };
        // (read only for the access line)
        let request_id = handling
            .logged
            .as_ref()
            .and_then(|_| resp.fields.get_str(Known::XRequestId))
            .unwrap_or("");
        if let Some(ticket) = handling.record(status, request_id) {
            // the consumer's usage is recorded once the answer's body is sent
            resp = resp.map(|b| usage::Counted::metered(b, ticket).boxed());
        }
        if let Some(guard) = in_flight {
            // an HTTP/2 request stays in flight while its answer streams, and the connection
            // watches that the client takes it
            resp = resp.map(|inner| {
                let answering = Arc::new(Answering {
                    waiting_ms: std::sync::atomic::AtomicU64::new(conn.activity.ms_now()),
                    held: Mutex::new(Some(Held {
                        body: inner,
                        guard,
                        rest: Bytes::new(),
                    })),
                });
                conn.watch_answer(&answering);
                Streamed(answering).boxed()
            });
        }
        // (after a switch of protocols, the bytes that follow are no head)
        if resp.status != StatusCode::SWITCHING_PROTOCOLS {
            conn.end();
        }
        resp
    }

    fn record(&self, served: &Served, status: StatusCode, total: Duration) {
        use crate::telemetry::CauseLabels;
        if let Some(cause) = served.refusal {
            self.metrics
                .gateway_refusals
                .get_or_create(&CauseLabels {
                    cause: cause.to_string(),
                })
                .inc();
        }
        let Some(route) = &served.route else {
            return;
        };
        let series = route.series.get_or_init(|| {
            crate::telemetry::ApiSeries::new(&self.metrics, &route.tenant, &route.api)
        });
        let class = match status.as_u16() {
            200..=299 => 0,
            300..=399 => 1,
            400..=499 => 2,
            _ => 3,
        };
        series.requests[class].inc();
        let upstream = Duration::from_micros(served.upstream_us.unwrap_or(0));
        series.added.observe(total.saturating_sub(upstream));
        if served.upstream_us.is_some() {
            series.upstream.observe(upstream);
        }
    }

    async fn serve_one(
        self: &Arc<Self>,
        mut req: Req<ReqBody>,
        conn: &Conn,
        served: &mut Served,
        started: Instant,
    ) -> Answer<Body> {
        let peer = conn.peer;
        let peer_trusted = self
            .trusted_proxies
            .iter()
            .any(|c| policy::cidr_contains(c, peer.ip()));
        // Every X-Forwarded-For line, joined: a proxy may add its own line rather than append.
        let lines: Vec<&str> = req
            .fields
            .get_all(Known::XForwardedFor)
            .filter_map(head::as_str)
            .collect();
        let incoming_xff = (!lines.is_empty()).then(|| lines.join(", "));
        let client =
            policy::client_address(peer.ip(), incoming_xff.as_deref(), &self.trusted_proxies);
        served.client = Some(client);
        // one value for the upstream request, the answer and problem documents: a client's
        // (copied, so it pins none of the connection's buffers), or a new one
        let request_id_value = req
            .fields
            .get(Known::XRequestId)
            .and_then(RequestId::new)
            .unwrap_or_else(|| self.next_request_id());
        // (as text for the problem answers only)
        let request_id = || request_id_value.as_str();
        if served.want_request_id {
            served.request_id = Some(request_id_value.clone());
        }
        let table = self.table.load_full();
        // the Host field, read once (and whether another follows it)
        let (host_field, more_hosts) = {
            let mut all = req.fields.get_all(Known::Host);
            (all.next(), all.next().is_some())
        };
        let host_field = host_field.and_then(head::as_str).map(split_host_port);
        let host = req
            .uri
            .host()
            .or(host_field.map(|(h, _)| h))
            .unwrap_or_default();
        // (copied only when it has capitals)
        let host: std::borrow::Cow<'_, str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            host.to_ascii_lowercase().into()
        } else {
            host.into()
        };
        if more_hosts || !host_is_valid(&host) {
            served.refusal = Some("bad-host");
            return problem(
                StatusCode::BAD_REQUEST,
                "bad-host",
                "the request has no valid Host",
                request_id(),
            );
        }
        if let Some(t) = &conn.tls {
            // The request must be for a host the presented certificate names (no fronting
            // one TLS name to reach another host's APIs).
            if !tls::covers(&t.served_hosts, &host) {
                served.refusal = Some("misdirected");
                return problem(
                    StatusCode::MISDIRECTED_REQUEST,
                    "misdirected-request",
                    "this connection's certificate does not cover the requested host",
                    request_id(),
                );
            }
        }
        if served.want_host {
            served.host = Some(host.to_string());
        }
        // the URI shares its bytes: no copy of the path
        let uri = req.uri.clone();
        let path = uri.path();
        if !path_is_plain(path) {
            served.refusal = Some("bad-path");
            return problem(
                StatusCode::BAD_REQUEST,
                "bad-path",
                "the request path is not normalised",
                request_id(),
            );
        }
        let Some(route) = table.lookup(&host, path).cloned() else {
            served.refusal = Some("no-route");
            return problem(
                StatusCode::NOT_FOUND,
                "no-route",
                "no API matches this host and path",
                request_id(),
            );
        };
        served.route = Some(route.clone());
        if let Some(preflight) = cors_preflight(&route, &req, &request_id_value) {
            return preflight;
        }
        let op_scopes: &[String] = match route.operation(req.method.as_str(), path, &req.fields) {
            routes::OperationMatch::Any => &[],
            routes::OperationMatch::Matched(op) => &op.required_scopes,
            routes::OperationMatch::NoMatch => {
                served.refusal = Some("no-route");
                return problem(
                    StatusCode::NOT_FOUND,
                    "no-route",
                    "no operation of this API matches the request",
                    request_id(),
                );
            }
            routes::OperationMatch::MethodNotAllowed(allowed) => {
                served.refusal = Some("method-not-allowed");
                let mut r = problem(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method-not-allowed",
                    "this operation does not accept the request's method",
                    request_id(),
                );
                r.fields.insert("allow", allowed.join(", ").as_bytes());
                return r;
            }
        };
        // X-Forwarded-Host (made before the policies, which may change the request): the host
        // the request was routed by (validated), with the port the client named, never a raw
        // client header
        // (on the stack: a DNS name is at most 253 bytes, a port 5 digits)
        let valid =
            |p: &&str| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
        let port = req
            .uri
            .authority()
            .and_then(|a| split_host_port(a.as_str()).1)
            .filter(valid)
            .or_else(|| host_field.and_then(|(_, p)| p).filter(valid));
        let mut host_port = [0u8; 272];
        let mut long_host_port = Vec::new();
        let original_host: &[u8] = {
            let parts = [
                host.as_bytes(),
                port.map_or(&b""[..], |_| b":"),
                port.unwrap_or("").as_bytes(),
            ];
            let n: usize = parts.iter().map(|p| p.len()).sum();
            let out = if n <= host_port.len() {
                &mut host_port[..n]
            } else {
                // (a long IPv6 literal)
                long_host_port.resize(n, 0);
                &mut long_host_port[..]
            };
            let mut at = 0;
            for p in parts {
                out[at..at + p.len()].copy_from_slice(p);
                at += p.len();
            }
            out
        };
        let extra = match self.enforce(&table, &route, op_scopes, &mut req, conn, served, started) {
            Ok(h) if served.consumer.is_some() => {
                served.admitted = true;
                // (a request body's bytes are counted as it goes upstream)
                if !hyper::body::Body::is_end_stream(&req.body) {
                    served.bytes_in = Some(Arc::new(std::sync::atomic::AtomicU64::new(0)));
                }
                h
            }
            Ok(h) => h,
            Err(Refusal(status, slug, detail, headers)) => {
                served.refusal = Some(slug);
                let mut r = problem(status, slug, &detail, request_id());
                // (Retry-After and the RateLimit fields of the limit that refused it)
                r.fields.merge(&headers, |_| true);
                return r;
            }
        };
        let rest = &path[if route.base_path == "/" {
            0
        } else {
            route.base_path.len()
        }..];
        let rest = if rest.is_empty() { "/" } else { rest };
        // A protocol switch (WebSocket): the upstream's 101 splices the two connections
        // (hyper's server's side: `front` hands such requests over to it).
        let upgrade = upgrade_token(&req);
        let client_upgrade = upgrade.as_ref().and_then(|_| req.upgrade.take());
        // whether the client takes trailers (`TE: trailers`, a hop-by-hop header), for the
        // routes hyper's client may carry (HTTPS targets, HTTP/2)
        let hyper_route = route.upstream.tls.is_some()
            || route.upstream.protocol == crate::model::UpstreamProtocol::Http2;
        let wants_trailers = hyper_route && req.fields.lists(Known::Te, "trailers");
        let Req {
            method,
            uri: forwarded_uri,
            fields: mut h,
            body,
            ..
        } = req;
        // (the query as the policies left it: an API key taken out)
        let query = forwarded_uri.query();
        h.strip_hop_by_hop();
        h.remove(Known::Host);
        if let Some(token) = &upgrade {
            h.insert(Known::Connection, b"upgrade");
            h.insert(Known::Upgrade, token);
        }
        // Client-supplied forwarding headers are believed only from trusted proxies.
        let xff = match (&incoming_xff, peer_trusted) {
            (Some(chain), true) => HeaderValue::from_str(&format!("{chain}, {}", peer.ip())).ok(),
            _ => conn.peer_value.clone(),
        };
        if !peer_trusted {
            h.remove(Known::XForwardedProto);
            h.remove(Known::XForwardedHost);
            h.remove(Known::Forwarded);
        }
        if let Some(v) = &xff {
            h.insert_valid(Known::XForwardedFor, v.into());
        }
        if !h.contains(Known::XForwardedProto) {
            const HTTPS: Valid = Valid::constant(b"https");
            const HTTP: Valid = Valid::constant(b"http");
            let proto = if conn.tls.is_some() { HTTPS } else { HTTP };
            h.append_valid(Known::XForwardedProto, proto);
        }
        if self.rfc7239 {
            let https = conn.tls.is_some();
            let mine = forwarded_element(peer.ip(), original_host, https);
            // a trusted proxy's elements (every line, as received) come first
            let mut chain: Vec<u8> = Vec::new();
            if peer_trusted {
                for line in h.get_all(Known::Forwarded) {
                    chain.extend_from_slice(line);
                    chain.extend_from_slice(b", ");
                }
            }
            chain.extend_from_slice(mine.as_bytes());
            h.insert(Known::Forwarded, &chain);
        }
        if !h.contains(Known::XForwardedHost) {
            // (a host found valid, a colon and digits)
            h.append_valid(Known::XForwardedHost, Valid::composed(original_host));
        }
        h.insert_valid(Known::XRequestId, request_id_value.value());
        h.append_valid(Known::Via, VIA);

        // Attempts: a retry goes to another target, and only when it is safe: the request has
        // no body, and its method is idempotent or it never reached the upstream.
        let bodyless = hyper::body::Body::is_end_stream(&body);
        let idempotent = h1::idempotent(&method);
        // a retry goes to another target: never more attempts than targets
        let max_attempts = if bodyless {
            (1 + route.upstream.retries as usize).min(route.targets.len())
        } else {
            1
        };
        // (a request without a body sends none: nothing is boxed for it)
        let mut body = (!bodyless).then_some(body);
        // targets tried so far (at most 6 attempts: retries are capped at 5)
        let mut tried = [0usize; 6];
        let mut n_tried = 0;
        let upstream_started = Instant::now();
        served.upstream_started = Some(upstream_started);
        let (connect_timeout, response_timeout, total) = self.route_timeouts(&route);
        // the answer's head within the response timeout, and within the total if there is one
        let total_deadline = total.map(|t| upstream_started + t);
        let deadline = total_deadline.map_or(upstream_started + response_timeout, |t| {
            t.min(upstream_started + response_timeout)
        });
        // a head late for the total only (not for the response timeout) is not the target's
        // failure
        let total_binds = total_deadline.is_some_and(|t| t < upstream_started + response_timeout);
        let mut now = upstream_started;
        let mut last_error = None;
        let resp = loop {
            let Some((idx, trial)) = upstream::pick(&route, &tried[..n_tried], self.ns_at(now))
            else {
                if let Some((status, slug, detail)) = last_error {
                    // every target was tried: the last failure is the answer
                    served.upstream_us = Some((now - upstream_started).as_micros() as u64);
                    return problem(status, slug, detail, request_id());
                }
                served.refusal = Some("no-healthy-target");
                return problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream-unavailable",
                    "no upstream target is available",
                    request_id(),
                );
            };
            tried[n_tried] = idx;
            n_tried += 1;
            let target = &route.targets[idx];
            // in flight from here; dropped without a verdict, it releases a trial it held
            let attempt_state = target.state().begin(trial);
            let https = target.origin.starts_with("https://");
            let tls_client = match (https, route.tls_client.get()) {
                (false, _) => None,
                (true, Some(Ok(c))) => Some(c),
                (true, _) => {
                    return problem(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "policy-unavailable",
                        "the upstream's TLS settings cannot be used",
                        request_id(),
                    )
                }
            };
            // hyper's client, for HTTPS targets and HTTP/2 to http:// ones
            let h2c = tls_client.is_none()
                && route.upstream.protocol == crate::model::UpstreamProtocol::Http2;
            let via_hyper = tls_client.is_some() || h2c;
            // hyper's client takes a URI; the HTTP/1.1 client writes the target as it is, which
            // must not split its request line (no space or control character: the path was
            // routed from a parsed target, which may hold UTF-8, the target's own path checked
            // when published)
            let uri = match (&target.scheme, &target.authority) {
                (Some(scheme), Some(authority)) if via_hyper => {
                    let mut path_and_query = String::with_capacity(
                        target.path.len() + rest.len() + query.map_or(0, |q| q.len() + 1),
                    );
                    path_and_query.push_str(&target.path);
                    path_and_query.push_str(rest);
                    if let Some(q) = query {
                        path_and_query.push('?');
                        path_and_query.push_str(q);
                    }
                    hyper::Uri::builder()
                        .scheme(scheme.clone())
                        .authority(authority.clone())
                        .path_and_query(path_and_query)
                        .build()
                        .ok()
                        .map(Some)
                }
                (Some(_), Some(_)) => [target.path.as_str(), rest, query.unwrap_or("")]
                    .iter()
                    .all(|p| p.bytes().all(|b| b > b' ' && b != 0x7f))
                    .then_some(None),
                _ => None,
            };
            let Some(uri) = uri else {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "bad-path",
                    "the request path cannot be forwarded",
                    request_id(),
                );
            };
            let last = n_tried >= max_attempts;
            // (a body is sent once: a request with one makes one attempt)
            // a request body that stops coming fails after the idle timeout (hyper's client
            // pulls it in its own task, past the answer; the HTTP/1.1 client in this one), and
            // the attempt learns what became of it
            let watch = (!bodyless).then(|| Arc::new(BodyWatch::default()));
            let sent = body.take().map(|b| {
                let b = match &served.bytes_in {
                    Some(counter) => usage::Counted::new(b, counter.clone())
                        .map_err(|e| Box::new(e) as BoxError)
                        .boxed(),
                    None => b.map_err(|e| Box::new(e) as BoxError).boxed(),
                };
                match &watch {
                    Some(w) => Idle::watched(b, conn.idle, w.clone()).boxed(),
                    None => b,
                }
            });
            let body_failure = || watch.as_ref().and_then(|w| w.failure());
            // (hyper's request: the fields copied into its map)
            let hyper_request = |sent: Option<Body>, uri: hyper::Uri| {
                let empty = || http_body_util::Empty::new().map_err(|e| match e {}).boxed();
                let mut r = Request::new(sent.unwrap_or_else(empty));
                *r.method_mut() = method.clone();
                *r.uri_mut() = uri;
                *r.headers_mut() = h.to_map();
                if wants_trailers {
                    // trailers are relayed: an HTTP/2 service (gRPC) may ask the client for this
                    r.headers_mut()
                        .insert(header::TE, HeaderValue::from_static("trailers"));
                }
                r
            };
            let idle = response_timeout;
            let hyper_answer =
                |r: Result<Response<Incoming>, hyper_util::client::legacy::Error>| {
                    r.map(|r| {
                        Answer::from_response(r)
                            .map(|b| AnswerBody::Hyper(Idle::new(b, idle, "answer body")))
                    })
                    .map_err(|e| match body_failure() {
                        _ if e.is_connect() => Failed::Connect,
                        Some(how) => Failed::ClientBody(how),
                        None => Failed::Upstream { blamed: true },
                    })
                };
            // (the attempt is pinned where it is made, and polled in place: an HTTP/1.1
            // exchange's future is about a KiB, too much to move into the timeout's)
            let result = match (tls_client, &target.authority, uri) {
                (Some(c), _, Some(uri)) => timer::timeout_at(
                    deadline,
                    std::pin::pin!(c.request(hyper_request(sent, uri))),
                )
                .await
                .map(hyper_answer),
                (None, Some(_), Some(uri)) => match route.h2c_client.get() {
                    Some(c) => timer::timeout_at(
                        deadline,
                        std::pin::pin!(c.request(hyper_request(sent, uri))),
                    )
                    .await
                    .map(hyper_answer),
                    None => {
                        return problem(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "policy-unavailable",
                            "the upstream's HTTP/2 client is not available",
                            request_id(),
                        )
                    }
                },
                (None, Some(origin), None) => timer::timeout_at(
                    deadline,
                    std::pin::pin!(h1::send(
                        origin,
                        h1::Outgoing {
                            method: &method,
                            path: [&target.path, rest],
                            query,
                            fields: &h,
                        },
                        sent,
                        connect_timeout,
                        response_timeout,
                        now,
                    )),
                )
                .await
                .map(|r| {
                    r.map(|r| r.map(AnswerBody::Plain)).map_err(|e| match e {
                        h1::Error::Body(_) => {
                            Failed::ClientBody(body_failure().unwrap_or(BodyFailure::Broke))
                        }
                        e if e.is_connect() => Failed::Connect,
                        e => Failed::Upstream {
                            blamed: !e.is_blameless(),
                        },
                    })
                }),
                _ => Ok(Err(Failed::Connect)),
            };
            now = Instant::now();
            // The verdict on the target: Some(true) failed, Some(false) answered, None when the
            // client may be the cause (a request body that broke off or was slow to come): such
            // attempts never eject a target.
            // A good answer is judged when its body is delivered (a failure on the way, a
            // reset or a stall, counts against the target); one with nothing to deliver, a bad
            // one, and a half-open trial's (its head is what the trial tests), at once.
            let (verdict, retryable, answer) = match result {
                Ok(Ok(r)) => {
                    let bad = matches!(r.status.as_u16(), 502..=504);
                    // (a body that came whole with the head has nothing left to fail)
                    let whole = match &r.body {
                        AnswerBody::Plain(b) => b.is_whole(),
                        AnswerBody::Hyper(b) => hyper::body::Body::is_end_stream(b),
                    };
                    if bad || attempt_state.is_trial() || whole {
                        (Some(bad), false, Ok(r.map(|b| b.boxed())))
                    } else {
                        let judge = Judge {
                            gateway: self.clone(),
                            route: route.clone(),
                            target: idx,
                            attempt: attempt_state,
                            // hyper's client (HTTPS targets) may still be streaming the
                            // client's body when the answer breaks: the client may be the cause
                            blame_errors: bodyless || !via_hyper,
                        };
                        let r = r.map(|b| Judged::new(b, judge).boxed());
                        break r;
                    }
                }
                // the gateway was waiting for the rest of the request body: the client was too
                // slow, not the upstream
                Err(_) if watch.as_ref().is_some_and(|w| w.client_behind()) => (
                    None,
                    false,
                    Err((
                        StatusCode::REQUEST_TIMEOUT,
                        "request-timeout",
                        "the request body did not come in time",
                    )),
                ),
                Err(_) => (
                    (bodyless && !total_binds).then_some(true),
                    false,
                    Err((
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream-timeout",
                        "the upstream did not answer in time",
                    )),
                ),
                Ok(Err(Failed::Connect)) => (
                    Some(true),
                    true,
                    Err((
                        StatusCode::BAD_GATEWAY,
                        "upstream-unavailable",
                        "the upstream could not be reached",
                    )),
                ),
                Ok(Err(Failed::Upstream { blamed })) => (
                    (bodyless && blamed).then_some(true),
                    idempotent,
                    Err((
                        StatusCode::BAD_GATEWAY,
                        "upstream-failed",
                        "the upstream connection failed",
                    )),
                ),
                // the client's fault: no verdict on the target, no retry
                Ok(Err(Failed::ClientBody(BodyFailure::Stalled))) => (
                    None,
                    false,
                    Err((
                        StatusCode::REQUEST_TIMEOUT,
                        "request-timeout",
                        "the request body stopped coming",
                    )),
                ),
                Ok(Err(Failed::ClientBody(BodyFailure::Broke))) => (
                    None,
                    false,
                    Err((
                        StatusCode::BAD_REQUEST,
                        "bad-request-body",
                        "the request body could not be read",
                    )),
                ),
                // (an answer hardly anyone reads, a client that only half-closed aside: a 400 on
                // the wire, recorded as 499)
                Ok(Err(Failed::ClientBody(BodyFailure::Left))) => (
                    None,
                    false,
                    Err((
                        StatusCode::BAD_REQUEST,
                        "client-closed",
                        "the client closed its connection before sending the whole request body",
                    )),
                ),
            };
            match verdict {
                Some(failed) => self.judge(&route, idx, attempt_state, failed),
                None => drop(attempt_state),
            }
            match answer {
                Ok(r) => break r,
                Err(e) if retryable && !last && now < deadline => {
                    last_error = Some(e);
                    continue;
                }
                Err((status, slug, detail)) => {
                    served.upstream_us = Some((now - upstream_started).as_micros() as u64);
                    if matches!(slug, "request-timeout" | "bad-request-body") {
                        served.refusal = Some(slug);
                    }
                    served.client_closed = slug == "client-closed";
                    return problem(status, slug, detail, request_id());
                }
            }
        };
        served.upstream_us = Some((now - upstream_started).as_micros() as u64);
        let mut resp = resp;
        let switching = resp.status == StatusCode::SWITCHING_PROTOCOLS;
        let spliced = match (switching, client_upgrade) {
            (true, Some(client)) => {
                let switched = resp.switched.take();
                self.splice(
                    conn,
                    client,
                    switched,
                    served.consumer.clone(),
                    route.clone(),
                );
                true
            }
            _ => false,
        };
        let fields = &mut resp.fields;
        let upgrade_answer = fields.get(Known::Upgrade).map(<[u8]>::to_vec);
        fields.strip_hop_by_hop();
        if spliced {
            fields.insert(Known::Connection, b"upgrade");
            let token = upgrade_answer.as_deref().or(upgrade.as_deref());
            if let Some(token) = token {
                fields.insert(Known::Upgrade, token);
            }
        } else if switching {
            // a 101 the client did not ask for cannot be relayed
            return problem(
                StatusCode::BAD_GATEWAY,
                "upstream-failed",
                "the upstream switched protocols unasked",
                request_id(),
            );
        }
        for p in &route.policies {
            if let Policy::ResponseHeaders {
                add,
                remove,
                rename,
            } = p
            {
                edit_headers(fields, add, remove, rename);
            }
        }
        fields.append_valid(Known::Via, VIA);
        fields.insert_valid(Known::XRequestId, request_id_value.value());
        add_policy_headers(fields, &extra);
        match total_deadline {
            // (a spliced connection's bytes are bounded by the idle timeout instead)
            Some(at) if !spliced && !hyper::body::Body::is_end_stream(&resp.body) => {
                resp.map(|body| {
                    Until {
                        inner: body,
                        deadline: at,
                        timer: None,
                    }
                    .boxed()
                })
            }
            _ => resp,
        }
    }

    /// Splices a switched connection (a WebSocket's) to its upstream in a task of its own.
    /// The spliced connection keeps its slot under max_connections, and the drain waits for
    /// it; its bytes count in the consumer's usage (the request itself is counted once, with
    /// its 101 answer).
    // (cold: kept out of the request path's code)
    #[cold]
    #[inline(never)]
    fn splice(
        &self,
        conn: &Conn,
        client: hyper::upgrade::OnUpgrade,
        switched: Option<head::Switched>,
        consumer: Option<Arc<str>>,
        route: Arc<Route>,
    ) {
        let (hold, live) = (conn.hold.clone(), conn.live.clone());
        let (idle, stop) = (conn.idle, conn.stop.clone());
        let metered = consumer.map(|consumer| (self.usage.clone(), consumer));
        tokio::spawn(async move {
            let _held = (hold, live);
            // the upstream side: a plain connection from the HTTP/1.1 client, or hyper's
            // (HTTPS upstreams)
            let spliced = async {
                let c = TokioIo::new(client.await?);
                Ok::<_, BoxError>(match switched {
                    Some(head::Switched::Plain(u)) => match u.take() {
                        Some((u, early)) => splice::run(c, u, &early, idle, stop).await,
                        None => splice::Spliced::default(),
                    },
                    Some(head::Switched::Hyper(upstream)) => {
                        let u = TokioIo::new(upstream.await?);
                        splice::run(c, u, &[], idle, stop).await
                    }
                    None => splice::Spliced::default(),
                })
            };
            match spliced.await {
                Ok(done) => {
                    let error = done.error.as_ref().map(|e| e.to_string());
                    tracing::debug!(tenant = %route.tenant, api = %route.api, from_client = done.from_client, to_client = done.to_client, end = done.end, error, "upgraded connection closed");
                    if let Some((meter, consumer)) = metered {
                        meter.add(
                            &route.tenant,
                            &consumer,
                            &route.api,
                            crate::state::UsageCounts {
                                requests: 0,
                                bytes_in: done.from_client,
                                bytes_out: done.to_client,
                            },
                        );
                    }
                }
                Err(e) => {
                    tracing::debug!(tenant = %route.tenant, api = %route.api, error = %e, "upgraded connection ended with an error")
                }
            }
        });
    }
}

/// Limits of a gateway listener.
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    /// Time allowed for each request's headers (and for the TLS handshake, on HTTPS).
    pub header_timeout: Duration,
    pub handshake_timeout: Duration,
    pub max_connections: usize,
    /// Largest request head (HTTP/1.1) or header list (HTTP/2), in bytes; more answers 431.
    pub max_header_bytes: usize,
    /// Most header fields in an HTTP/1.1 request; more answers 431.
    pub max_headers: usize,
    /// How long an HTTP/2 connection (after its first request) or a spliced WebSocket may stay
    /// without traffic.
    pub idle_timeout: Duration,
    pub grace: Duration,
}

/// Completes the TLS handshake of an HTTPS connection: the certificate by SNI, a client
/// certificate requested only for hosts that serve `mutual-tls` APIs. A failure is counted
/// here, by cause, while the connection is still held where it can be (so a client that sees
/// the refusal can read the count); `None` then.
async fn handshake(
    gateway: &Gateway,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    idle: Duration,
) -> Option<(
    tokio_rustls::server::TlsStream<Stall<tokio::net::TcpStream>>,
    tls::TlsConn,
)> {
    let fail = |cause| {
        gateway.tls_failure(cause, peer);
        None
    };
    // A client that sends no SNI (or an IP address, which SNI cannot carry) gets the
    // certificate naming the address it connected to.
    let Ok(local) = tcp.local_addr() else {
        return fail("no-sni");
    };
    let local = local.ip().to_string();
    let tcp = Stall::new(tcp, idle, peer);
    let acceptor = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
    let Ok(start) = acceptor.await else {
        return fail("bad-client-hello");
    };
    let named = start
        .client_hello()
        .server_name()
        .map(|s| s.to_ascii_lowercase());
    let by_address = named.is_none();
    let sni = named.unwrap_or(local);
    let served = match gateway.tls.resolver.table.load().lookup(&sni) {
        Some(c) => c.clone(),
        None => return fail("unknown-sni"),
    };
    let client_auth_requested = gateway.table.load().requires_client_cert(&sni);
    let mut config = if client_auth_requested {
        gateway.tls.client_auth.clone()
    } else {
        gateway.tls.plain.clone()
    };
    if by_address {
        // the shared resolver selects by SNI: this connection gets its own
        let mut own = (*config).clone();
        own.cert_resolver = Arc::new(tls::Fixed(served.key.clone()));
        config = Arc::new(own);
    }
    let served_hosts = served.hosts.clone();
    let Ok(stream) = start.into_stream(config).await else {
        return fail("handshake-failed");
    };
    let client_chain = stream
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|d| d.clone().into_owned()).collect())
        .unwrap_or_default();
    Some((
        stream,
        tls::TlsConn {
            sni: Some(sni),
            served_hosts,
            client_chain,
            client_auth_requested,
        },
    ))
}

/// Binds `workers` listening sockets on `addr`, all with `SO_REUSEPORT`: the kernel spreads
/// new connections across them, one per worker (and a new process can bind the address beside
/// a draining one, the restart design in docs/ARCHITECTURE.md). Port 0: the first socket picks
/// a free port and the others join it.
pub fn bind(addr: SocketAddr, workers: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut addr = addr;
    let mut out = Vec::with_capacity(workers.max(1));
    for _ in 0..workers.max(1) {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        out.push(listener);
    }
    Ok(out)
}

/// The gateway's listening sockets, one of each kind per worker.
pub struct Listeners {
    pub http: Vec<std::net::TcpListener>,
    pub https: Vec<std::net::TcpListener>,
}

/// Starts the gateway's workers: one thread each, running its own single-threaded event loop
/// over its own listening sockets, so a request is read, proxied and answered on one thread
/// (no hand-off between threads, no lock on the upstream connection pool). The returned
/// receivers complete when each worker has drained after `shutdown`.
pub fn start_workers(
    gateway: Arc<Gateway>,
    listeners: Listeners,
    shutdown: watch::Receiver<bool>,
    limits: ListenerLimits,
) -> std::io::Result<Vec<tokio::sync::oneshot::Receiver<()>>> {
    let http_slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let https_slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    // Every worker's event loop and sockets are made here, so a worker that cannot start
    // stops the node's start instead of leaving it "ready" with fewer (or no) listeners.
    let mut https = listeners.https.into_iter();
    let mut workers = Vec::new();
    for http in listeners.http {
        // (no timer driver: the worker's timers are its own, see `timer`)
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        let (plain, tls, timers) = {
            let _in = runtime.enter();
            let tls = https.next().map(TcpListener::from_std).transpose()?;
            (TcpListener::from_std(http)?, tls, timer::Timers::new()?)
        };
        workers.push((runtime, plain, tls, timers));
    }
    // Workers that have drained wait for the others before their event loops stop: a
    // connection one worker opened (an HTTPS upstream's, in a shared pool) may still serve
    // another worker's request.
    let drained = Arc::new((Mutex::new(0usize), std::sync::Condvar::new()));
    let total = workers.len();
    let mut done = Vec::new();
    for (i, (runtime, plain, tls, timers)) in workers.into_iter().enumerate() {
        let (gw, stop) = (gateway.clone(), shutdown.clone());
        let (http_slots, https_slots) = (http_slots.clone(), https_slots.clone());
        let drained = drained.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("apim-gw-{i}"))
            .spawn(move || {
                let timers = timers.run();
                runtime.block_on(async move {
                    let plain = serve(plain, gw.clone(), stop.clone(), false, limits, http_slots);
                    let secure = async {
                        if let Some(l) = tls {
                            serve(l, gw.clone(), stop.clone(), true, limits, https_slots).await
                        }
                    };
                    tokio::select! {
                        _ = async { tokio::join!(plain, secure) } => {}
                        // (never ends)
                        _ = timers => {}
                    }
                });
                {
                    let (count, all) = &*drained;
                    let mut n = lock(count);
                    *n += 1;
                    all.notify_all();
                    let deadline = Instant::now() + limits.grace + Duration::from_secs(1);
                    while *n < total && Instant::now() < deadline {
                        let left = deadline.saturating_duration_since(Instant::now());
                        n = all
                            .wait_timeout(n, left)
                            .map(|(g, _)| g)
                            .unwrap_or_else(|p| p.into_inner().0);
                    }
                }
                // what is left (connections past the grace time) ends now, not in the
                // background of the node's last usage flush
                runtime.shutdown_timeout(Duration::from_millis(500));
                let _ = tx.send(());
            })?;
        done.push(rx);
    }
    Ok(done)
}

/// Serves `listener` (plain HTTP, or HTTPS when `https`) until `shutdown`, then drains for up
/// to the grace time. `slots` bounds the connections open at once on this kind of listener,
/// across workers.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    mut shutdown: watch::Receiver<bool>,
    https: bool,
    limits: ListenerLimits,
    slots: Arc<tokio::sync::Semaphore>,
) {
    // held by every connection task: the drain waits until only this one is left
    let live = Arc::new(());
    let mut h1 = hyper::server::conn::http1::Builder::new();
    // hyper's header-read timer also runs while a keep-alive connection waits for its next
    // request: it is the idle timeout; the header timeout proper is Watched's
    h1.timer(timer::Timer)
        .header_read_timeout(limits.idle_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_header_size(limits.max_header_bytes)
        .max_headers(limits.max_headers);
    let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    h2.timer(timer::Timer)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // a silent HTTP/2 peer is found out and its connection (and slot) released
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let builders = Arc::new((h1, h2));
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "gateway accept failed");
                    timer::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(peer = %peer, max = limits.max_connections, "gateway connection refused: too many open connections");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let gw = gateway.clone();
        let builders = builders.clone();
        let (live, stop) = (live.clone(), shutdown.clone());
        let open = gateway.metrics.gateway_connections.clone();
        open.inc();
        let task = async move {
            let hold = Arc::new(Hold { _slot: slot, open });
            let svc = |conn: Arc<Conn>| {
                let gw = gw.clone();
                hyper::service::service_fn(move |req| {
                    let gw = gw.clone();
                    let conn = conn.clone();
                    async move {
                        let req = req.map(ReqBody::Hyper);
                        Ok::<_, std::convert::Infallible>(
                            gw.handle(Req::from_request(req), conn)
                                .await
                                .into_response(),
                        )
                    }
                })
            };
            // HTTP/2 when TLS negotiated it by ALPN, or a plain client opens with the HTTP/2
            // preface (prior knowledge); HTTP/1.1 otherwise (hyper's version-sniffing server
            // is not used: it costs on every request)
            let result = if https {
                // boxed, like the HTTP/2 state below: a task serving HTTP/1.1 holds neither
                match timer::timeout(
                    limits.handshake_timeout,
                    Box::pin(handshake(&gw, tcp, peer, limits.idle_timeout)),
                )
                .await
                {
                    Ok(Some((stream, info))) => {
                        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                        let conn = Arc::new(Conn::on(
                            peer,
                            Some(info),
                            (hold, &live),
                            (&stop, limits.idle_timeout),
                            h2,
                        ));
                        if h2 {
                            let io = TokioIo::new(stream);
                            let c = builders.1.serve_connection(io, svc(conn.clone()));
                            Box::pin(drive_h2(c, stop, &conn, &limits)).await
                        } else {
                            let io = Watched::new(stream, conn.clone(), limits.header_timeout);
                            Box::pin(serve_h1(io, (&gw, conn), &limits, stop, |io, conn| {
                                builders
                                    .0
                                    .serve_connection(TokioIo::new(io), svc(conn))
                                    .with_upgrades()
                            }))
                            .await
                        }
                    }
                    // counted by the handshake
                    Ok(None) => Ok(()),
                    Err(_) => {
                        gw.tls_failure("timeout", peer);
                        Ok(())
                    }
                }
            } else {
                let mut first = [0u8; 3];
                let mut stop_peek = stop.clone();
                let peeked = tokio::select! {
                    r = timer::timeout(limits.header_timeout, tcp.peek(&mut first)) => r,
                    // a connection that has sent nothing is not waited for at shutdown
                    _ = stop_peek.wait_for(|stopping| *stopping) => return,
                };
                match peeked {
                    Ok(Ok(n)) if n > 0 => {
                        let h2 = first[..n] == b"PRI"[..n] && n == 3;
                        let tcp = Stall::new(tcp, limits.idle_timeout, peer);
                        let conn = Arc::new(Conn::on(
                            peer,
                            None,
                            (hold, &live),
                            (&stop, limits.idle_timeout),
                            h2,
                        ));
                        if h2 {
                            let io = TokioIo::new(tcp);
                            let c = builders.1.serve_connection(io, svc(conn.clone()));
                            Box::pin(drive_h2(c, stop, &conn, &limits)).await
                        } else {
                            let io = Watched::new(tcp, conn.clone(), limits.header_timeout);
                            serve_h1(io, (&gw, conn), &limits, stop, |io, conn| {
                                builders
                                    .0
                                    .serve_connection(TokioIo::new(io), svc(conn))
                                    .with_upgrades()
                            })
                            .await
                        }
                    }
                    // closed, failed, or silent for the header timeout
                    _ => Ok(()),
                }
            };
            if let Err(e) = result {
                tracing::debug!(peer = %peer, error = %e, "gateway connection ended with an error");
            }
        };
        tokio::spawn(task);
    }
    drop(listener);
    let drained = async {
        while Arc::strong_count(&live) > 1 {
            timer::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        _ = drained => tracing::info!("gateway drained"),
        _ = timer::sleep(limits.grace) => tracing::warn!("gateway drain timed out"),
    }
}

/// Serves an HTTP/1.1 connection: by the gateway's own server ([`front`]) until a request it
/// does not take, then by hyper's (`hyper_h1`) for the rest of the connection.
async fn serve_h1<S, C>(
    mut io: S,
    (gw, conn): (&Arc<Gateway>, Arc<Conn>),
    limits: &ListenerLimits,
    stop: watch::Receiver<bool>,
    hyper_h1: impl FnOnce(front::Replay<S>, Arc<Conn>) -> C,
) -> hyper::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    C: std::future::Future<Output = hyper::Result<()>> + Graceful,
{
    match front::serve(&mut io, gw, &conn, limits, stop.clone()).await {
        Ok(front::Ended::HandOver(early)) => {
            gw.metrics.gateway_http1_handovers.inc();
            drive(hyper_h1(front::Replay::new(early, io), conn), stop).await
        }
        Ok(front::Ended::Closed) => Ok(()),
        Err(e) => {
            tracing::debug!(peer = %conn.peer, error = %e, "gateway connection ended with an error");
            Ok(())
        }
    }
}

/// A served connection that can be asked to finish its in-flight requests and close.
trait Graceful {
    fn start_shutdown(self: std::pin::Pin<&mut Self>);
}

impl<I, S> Graceful for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S::ResBody: hyper::body::Body + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<BoxError>,
{
    fn start_shutdown(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, E> Graceful for hyper::server::conn::http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S::ResBody: hyper::body::Body + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<BoxError>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn start_shutdown(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Serves a connection until it ends; on shutdown, lets it finish what is in flight and close.
async fn drive<C>(conn: C, mut stop: watch::Receiver<bool>) -> hyper::Result<()>
where
    C: std::future::Future<Output = hyper::Result<()>> + Graceful,
{
    tokio::pin!(conn);
    tokio::select! {
        // the connection first: one accepted as the shutdown begins serves what it was sent
        biased;
        r = conn.as_mut() => return r,
        _ = stop.wait_for(|stopping| *stopping) => {}
    }
    conn.as_mut().start_shutdown();
    conn.await
}

/// An HTTP/1.1 connection's stream, which enforces the header timeout hyper does not: a head
/// must reach the handler within `limit` of its first byte (a connection's first head, of its
/// opening), or the read fails with `TimedOut` and hyper closes the connection (slowloris).
/// The timer is set and polled only while a head is awaited and the client has nothing more to
/// read: a head that comes whole in one read costs one clock read and no timer.
struct Watched<S> {
    io: S,
    conn: Arc<Conn>,
    limit: Duration,
    /// The header timer, made when a head first stalls, and kept for the connection's later
    /// heads.
    timer: Option<timer::Sleep>,
}

impl<S> Watched<S> {
    fn new(io: S, conn: Arc<Conn>, limit: Duration) -> Watched<S> {
        Watched {
            io,
            conn,
            limit,
            timer: None,
        }
    }

    fn wrote(
        &self,
        r: std::task::Poll<std::io::Result<usize>>,
    ) -> std::task::Poll<std::io::Result<usize>> {
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.conn.activity.wrote();
        }
        r
    }
}

/// A client connection's socket, which bounds how long a write may find it full: an answer
/// the client does not take (its receive window stays closed) for the idle timeout fails the
/// write with `TimedOut`, so a slow-read client cannot hold the connection for ever (nginx's
/// `send_timeout`). It sits on the TCP socket, under TLS, so that any byte the socket takes
/// counts as progress (TLS buffers whole records above it). Only a write that finds the socket
/// full reads the clock.
struct Stall<S> {
    io: S,
    idle: Duration,
    peer: SocketAddr,
    /// When the write that is stalled must have progressed.
    until: Option<Instant>,
    timer: Option<timer::Sleep>,
}

impl<S> Stall<S> {
    fn new(io: S, idle: Duration, peer: SocketAddr) -> Stall<S> {
        Stall {
            io,
            idle,
            peer,
            until: None,
            timer: None,
        }
    }

    /// A write, flush or shutdown outcome: a write the socket took ends a stall (a flush or
    /// shutdown that completes proves nothing: on a TCP socket they do not wait for the
    /// client); a full socket starts one, or fails once it has lasted the idle timeout.
    fn judge<T>(
        &mut self,
        r: std::task::Poll<std::io::Result<T>>,
        took: impl FnOnce(&T) -> bool,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<T>> {
        if let std::task::Poll::Ready(done) = &r {
            if done.as_ref().is_ok_and(took) {
                self.until = None;
            }
            return r;
        }
        let idle = self.idle;
        let deadline = *self.until.get_or_insert_with(|| Instant::now() + idle);
        if !expired(&mut self.timer, deadline, cx) {
            return std::task::Poll::Pending;
        }
        std::task::Poll::Ready(Err(timed_out(
            self.peer,
            "the client took no bytes within the idle timeout",
        )))
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Stall<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Stall<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        self.judge(r, |n| *n > 0, cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.judge(r, |n| *n > 0, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.io).poll_flush(cx);
        self.judge(r, |_| false, cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.io).poll_shutdown(cx);
        self.judge(r, |_| false, cx)
    }
}

/// The error that ends a client connection whose timeout ran out (logged at debug).
fn timed_out(peer: SocketAddr, why: &'static str) -> std::io::Error {
    tracing::debug!(peer = %peer, why, "gateway connection closed");
    std::io::Error::new(std::io::ErrorKind::TimedOut, why)
}

/// Whether `deadline` has passed, by `timer` (made on first use, moved to `deadline`), which
/// wakes the task when it does.
fn expired(
    timer: &mut Option<timer::Sleep>,
    deadline: Instant,
    cx: &mut std::task::Context<'_>,
) -> bool {
    let timer = timer.get_or_insert_with(|| timer::sleep_until(deadline));
    if timer.deadline() != deadline {
        timer.reset(deadline);
    }
    std::future::Future::poll(std::pin::Pin::new(timer), cx).is_ready()
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let me = &mut *self;
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut me.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            me.conn.activity.bytes_read();
        } else if r.is_pending() {
            if let Some(deadline) = me.conn.activity.head_deadline(me.limit) {
                if expired(&mut me.timer, deadline, cx) {
                    return std::task::Poll::Ready(Err(timed_out(
                        me.conn.peer,
                        "request head not received within the header timeout",
                    )));
                }
            }
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        self.wrote(r)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.wrote(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves an HTTP/2 connection like [`drive`], and closes it when it is idle: with no request
/// `header_timeout` after it opened (a client that stops in the handshake, or sends nothing),
/// or with none in flight `idle_timeout` after the last one ended (an answer still streaming
/// counts as in flight). Either way it gets a GOAWAY first; it is then dropped when it has not
/// closed `header_timeout` later (one second for a connection that made no request) with no
/// request in flight. At shutdown its requests have the drain's grace time, and one that
/// made none is dropped after a second.
async fn drive_h2<C>(
    conn: C,
    mut stop: watch::Receiver<bool>,
    c: &Conn,
    limits: &ListenerLimits,
) -> hyper::Result<()>
where
    C: std::future::Future<Output = hyper::Result<()>> + Graceful,
{
    tokio::pin!(conn);
    let mut check = Instant::now() + limits.header_timeout;
    let linger = loop {
        tokio::select! {
            biased;
            r = conn.as_mut() => return r,
            // at shutdown, what is in flight has the drain's grace time; a connection that
            // never made a request (one stalled in its handshake) has nothing to finish
            _ = stop.wait_for(|stopping| *stopping) => {
                break c.activity.made_none().then_some(Duration::from_secs(1));
            }
            _ = timer::sleep_until(check) => {
                // a client that leaves an answer without flow-control credit for the idle
                // timeout loses it and the connection (nginx's send_timeout)
                let (stalled, due) = c.stalled_answers(limits.idle_timeout);
                if stalled > 0 {
                    tracing::debug!(peer = %c.peer, stalled, "HTTP/2 connection closed: the client took no bytes of an answer within the idle timeout");
                    break Some(limits.header_timeout);
                }
                match c.activity.deadline(limits.header_timeout, limits.idle_timeout) {
                    Ok(next) => check = due.map_or(next, |d| d.min(next)),
                    Err(true) => {
                        tracing::debug!(peer = %c.peer, "HTTP/2 connection closed: no request in time");
                        break Some(Duration::from_secs(1));
                    }
                    Err(false) => {
                        tracing::debug!(peer = %c.peer, "HTTP/2 connection closed: idle");
                        break Some(limits.header_timeout);
                    }
                }
            }
        }
    };
    conn.as_mut().start_shutdown();
    let Some(linger) = linger else {
        return conn.await;
    };
    let mut lingered = Instant::now() + linger;
    loop {
        // answers still in flight stay watched: another stalled one is dropped when due
        let (_, due) = c.stalled_answers(limits.idle_timeout);
        let wake = due.map_or(lingered, |d| d.min(lingered));
        tokio::select! {
            r = conn.as_mut() => return r,
            _ = timer::sleep_until(wake) => {
                if Instant::now() >= lingered {
                    // a request that came as the GOAWAY went out finishes first
                    if !c.activity.busy() {
                        return Ok(());
                    }
                    lingered = Instant::now() + linger;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{add_policy_headers, Fields, Known, PolicyAnswer, RateItem};
    use super::{forwarded_element, host_is_valid, path_is_plain, split_host_port};

    #[test]
    fn policy_fields_replace_the_upstreams_rate_limits_and_set_the_others() {
        let mut answer = Fields::default();
        for (name, value) in [
            ("RateLimit", "\"up\";r=1;t=1"),
            ("content-type", "text/plain"),
            ("ratelimit-policy", "\"up\";q=9;w=1"),
            ("Vary", "Accept"),
            ("Access-Control-Allow-Origin", "https://upstream.example"),
        ] {
            assert!(answer.append(name, value.as_bytes()));
        }
        let mut policies = PolicyAnswer::default();
        let item = |limit, width, remaining, left| {
            Some(RateItem {
                limit,
                width,
                remaining,
                left,
            })
        };
        policies.rates[0] = item(100, 60, 99, 1);
        policies.rates[2] = item(5000, 2_678_400, 4321, 86_400);
        policies
            .fields
            .append("access-control-allow-origin", b"https://app.example");
        policies.fields.append(Known::Vary, b"Origin");
        add_policy_headers(&mut answer, &policies);
        let got: Vec<(String, String)> = answer
            .iter()
            .map(|(n, v)| {
                let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                (text(n).to_ascii_lowercase(), text(v))
            })
            .collect();
        let want = [
            ("content-type", "text/plain"),
            ("vary", "Accept"),
            ("access-control-allow-origin", "https://app.example"),
            ("ratelimit-policy", "\"default\";q=100;w=60"),
            ("ratelimit", "\"default\";r=99;t=1"),
            ("ratelimit-policy", "\"month\";q=5000;w=2678400"),
            ("ratelimit", "\"month\";r=4321;t=86400"),
            ("vary", "Origin"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        assert_eq!(got, want);

        // no rate limit checked: the upstream's fields stay
        let mut answer = Fields::default();
        answer.append("RateLimit", b"\"up\";r=1;t=1");
        add_policy_headers(&mut answer, &PolicyAnswer::default());
        assert_eq!(answer.get_str(Known::RateLimit), Some("\"up\";r=1;t=1"));
    }

    #[test]
    fn hosts_are_checked_and_split_from_ports() {
        for good in [
            "api.example",
            "a",
            "a-b_c.example.",
            "127.0.0.1",
            "[::1]",
            "[2001:db8::1]",
        ] {
            assert!(host_is_valid(good), "{good}");
        }
        let long = "a".repeat(254);
        for bad in [
            "",
            ".api.example",
            "api..example",
            "a..",
            "bad host",
            "api.example:",
            "[]",
            "[",
            "[::1",
            "[::g]",
            "caf\u{e9}.example",
            long.as_str(),
        ] {
            assert!(!host_is_valid(bad), "{bad:?}");
        }
        assert_eq!(
            split_host_port("api.example:8443"),
            ("api.example", Some("8443"))
        );
        assert_eq!(split_host_port("api.example"), ("api.example", None));
        assert_eq!(split_host_port("[::1]:80"), ("[::1]", Some("80")));
        assert_eq!(split_host_port("[::1]"), ("[::1]", None));
        assert_eq!(split_host_port("a:b:c"), ("a:b", Some("c")));
    }

    #[test]
    fn plain_paths_are_told_from_tricks() {
        for plain in [
            "/", "/a", "/a/", "/a/b.c", "/a/.b", "/a..b/c", "/%41", "/a%2", "/v1/x?",
        ] {
            assert!(path_is_plain(plain), "{plain}");
        }
        for trick in [
            "",
            "a",
            "//",
            "/a//b",
            "/.",
            "/..",
            "/a/.",
            "/a/..",
            "/./a",
            "/a/../b",
            "/a\\b",
            "/a;b",
            "/%2e",
            "/%2E%2e/x",
            "/a%2fb",
            "/a%2Fb",
            "/a%5cb",
            "/a%5Cb",
            "/a%00",
        ] {
            assert!(!path_is_plain(trick), "{trick}");
        }
    }

    #[test]
    fn forwarded_elements_quote_what_is_not_a_token() {
        let v4: std::net::IpAddr = "192.0.2.10".parse().unwrap();
        let v6: std::net::IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(
            forwarded_element(v4, b"api.bank.example", true),
            "for=192.0.2.10;host=api.bank.example;proto=https"
        );
        assert_eq!(
            forwarded_element(v6, b"api.bank.example:8443", false),
            "for=\"[2001:db8::1]\";host=\"api.bank.example:8443\";proto=http"
        );
        assert_eq!(
            forwarded_element(v4, b"[2001:db8::2]", false),
            "for=192.0.2.10;host=\"[2001:db8::2]\";proto=http"
        );
    }
}
