//! The gateway workers' timers, run without tokio's timer driver.
//!
//! A worker's event loop is a single-threaded tokio runtime with the I/O driver only. tokio's
//! timer driver, when a runtime has one, works at every wait of the loop whether or not a timer
//! is due: it locks its wheel twice, reads the clock twice and walks the wheel, about 965
//! instructions, 4 clock readings and 8 locked instructions per proxied request at one
//! connection (callgrind, e19f5f3). Here a worker's timers sit in a queue of its own thread,
//! changed only when a timer is made, moved earlier, dropped or due (a poll, or a move later,
//! looks its entry up and leaves the queue alone), and nothing runs at a wait of the loop; a
//! `timerfd` in the loop's epoll set wakes the loop when the earliest queued time comes.
//!
//! - A timer moved later costs a field write: its entry stays queued at the earlier time, and
//!   is queued again at its deadline when that time comes. A connection's timers move later at
//!   every request, and wake the loop about once per timeout period, not once per request.
//! - The `timerfd` is armed for the earliest queued time, and set again (a system call) only
//!   when a timer is queued before it, or when it fires.
//! - Off a worker (the node's multi-threaded runtime: the active health checks and the
//!   connections they open; tests), a [`Sleep`] is tokio's.
//! - A worker's timer is polled, moved and dropped on that worker: tasks on its event loop
//!   never move. One dropped or polled on another thread anyway is given back to its worker
//!   through a locked list, which the worker empties when its timer next fires; a timer polled
//!   elsewhere is queued again where it is polled. (One given back to a worker that has ended
//!   stays in the list, a few entries at a shutdown at most.)

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use rustix::time::{Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec};

thread_local! {
    static WHEEL: RefCell<Option<Wheel>> = const { RefCell::new(None) };
    /// Timers given back for [`reuse`].
    static SPARE: RefCell<Vec<Sleep>> = const { RefCell::new(Vec::new()) };
}

/// The most timers a thread keeps for [`reuse`] (about as many as upstream attempts it had in
/// flight at once, up to this).
const SPARE_MAX: usize = 1024;

/// Tells the worker timers apart (an entry's key is only unique within its worker).
static NEXT_WHEEL: AtomicU64 = AtomicU64::new(1);
/// Timers dropped or polled off their worker: (worker, key), removed by that worker.
static ORPHANS: Mutex<Vec<(u64, usize)>> = Mutex::new(Vec::new());
/// Whether `ORPHANS` may hold any (read without the lock when a worker's timer fires).
static ORPHANED: AtomicBool = AtomicBool::new(false);

/// A deadline further than any timeout, for durations too long to add to `Instant::now()`.
fn far_future() -> Instant {
    let now = Instant::now();
    now.checked_add(Duration::from_secs(86_400 * 365 * 30))
        .unwrap_or(now)
}

/// `now + after`, or the far future when that does not fit.
fn deadline_after(after: Duration) -> Instant {
    Instant::now().checked_add(after).unwrap_or_else(far_future)
}

/// One worker's timers.
struct Wheel {
    id: u64,
    entries: slab::Slab<Entry>,
    /// (when, key): each live entry once, at or before its deadline; fired ones not at all.
    queue: BTreeSet<(Instant, usize)>,
    /// The time the `timerfd` is set for, if it is set.
    armed: Option<Instant>,
    fd: OwnedFd,
}

struct Entry {
    deadline: Instant,
    /// Where it is queued: at or before its deadline; `None` once it has fired.
    queued: Option<Instant>,
    waker: Option<Waker>,
}

impl Wheel {
    fn insert(&mut self, deadline: Instant, waker: &Waker) -> usize {
        let key = self.entries.insert(Entry {
            deadline,
            queued: Some(deadline),
            waker: Some(waker.clone()),
        });
        self.queue.insert((deadline, key));
        self.arm_by(deadline);
        key
    }

    fn reset(&mut self, key: usize, deadline: Instant) {
        let Some(e) = self.entries.get_mut(key) else {
            return;
        };
        e.deadline = deadline;
        match e.queued {
            // found later than queued: queued again at its deadline then
            Some(at) if at <= deadline => return,
            Some(at) => {
                self.queue.remove(&(at, key));
            }
            None => {}
        }
        e.queued = Some(deadline);
        self.queue.insert((deadline, key));
        self.arm_by(deadline);
    }

    /// Whether the entry has fired; if not, it wakes `cx`'s task when it does. (The waker it
    /// replaces is returned, to be dropped once the wheel is let go.)
    fn poll(&mut self, key: usize, cx: &Context<'_>) -> (Poll<()>, Option<Waker>) {
        let Some(e) = self.entries.get_mut(key) else {
            return (Poll::Ready(()), None);
        };
        if e.queued.is_none() {
            return (Poll::Ready(()), None);
        }
        if e.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return (Poll::Pending, None);
        }
        (Poll::Pending, e.waker.replace(cx.waker().clone()))
    }

    /// Takes the entry out (returned, to be dropped after the thread's wheel is let go).
    fn remove(&mut self, key: usize) -> Option<Entry> {
        let e = self.entries.try_remove(key)?;
        if let Some(at) = e.queued {
            self.queue.remove(&(at, key));
        }
        Some(e)
    }

    /// Fires the entries due by `now` (their wakers go to `wake`), queues again those moved
    /// later, and sets the `timerfd` for the next.
    fn fire(&mut self, now: Instant, wake: &mut Vec<Waker>, gone: &mut Vec<Entry>) {
        if ORPHANED.load(Relaxed) {
            self.adopt_orphans(gone);
        }
        while let Some(&(at, key)) = self.queue.first() {
            if at > now {
                break;
            }
            self.queue.pop_first();
            let Some(e) = self.entries.get_mut(key) else {
                continue;
            };
            if e.deadline <= now {
                e.queued = None;
                wake.extend(e.waker.take());
            } else {
                e.queued = Some(e.deadline);
                self.queue.insert((e.deadline, key));
            }
        }
        self.armed = None;
        if let Some(&(at, _)) = self.queue.first() {
            self.arm(at, now);
        }
    }

    fn adopt_orphans(&mut self, gone: &mut Vec<Entry>) {
        let mut orphans = ORPHANS.lock().unwrap_or_else(|p| p.into_inner());
        orphans.retain(|&(wheel, key)| {
            if wheel != self.id {
                return true;
            }
            gone.extend(self.remove(key));
            false
        });
        if orphans.is_empty() {
            ORPHANED.store(false, Relaxed);
        }
    }

    /// Makes sure the `timerfd` goes off by `at`.
    fn arm_by(&mut self, at: Instant) {
        if self.armed.is_some_and(|armed| armed <= at) {
            return;
        }
        self.arm(at, Instant::now());
    }

    fn arm(&mut self, at: Instant, now: Instant) {
        // (never zero, which would disarm it: a time already past goes off at once)
        let wait = at
            .saturating_duration_since(now)
            .max(Duration::from_nanos(1));
        let spec = Itimerspec {
            it_interval: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: Timespec {
                tv_sec: i64::try_from(wait.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: wait.subsec_nanos().into(),
            },
        };
        match rustix::time::timerfd_settime(&self.fd, TimerfdTimerFlags::empty(), &spec) {
            Ok(_) => self.armed = Some(at),
            // (not expected of a valid timerfd: timers wait for the next one to be set)
            Err(e) => tracing::error!(error = %e, "gateway worker timer could not be set"),
        }
    }
}

/// Runs `f` on this thread's wheel if it is worker `id`'s (and not already in use).
fn on_wheel<R>(id: u64, f: impl FnOnce(&mut Wheel) -> R) -> Option<R> {
    WHEEL
        .try_with(|w| {
            let mut w = w.try_borrow_mut().ok()?;
            let w = w.as_mut().filter(|w| w.id == id)?;
            Some(f(w))
        })
        .ok()
        .flatten()
}

fn orphan(wheel: u64, key: usize) {
    ORPHANS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((wheel, key));
    ORPHANED.store(true, Relaxed);
}

/// A worker's timers, made with its event loop (in the runtime's context, where the
/// `timerfd` joins the loop's epoll set), then run on its thread.
pub struct Timers {
    fd: OwnedFd,
    watched: Watched,
}

/// The `timerfd`, read by the event loop. (tokio's pipe reader is its safe way to watch an
/// owned file descriptor for reading, where `AsyncFd`'s constructors are unsafe or
/// deprecated; "unchecked" waives the check that it is a pipe. A `timerfd` is read as one is:
/// `read(2)`, `EAGAIN` when there is nothing.)
type Watched = tokio::net::unix::pipe::Receiver;

impl Timers {
    pub fn new() -> std::io::Result<Timers> {
        let fd = rustix::time::timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        let watched = Watched::from_owned_fd_unchecked(fd.try_clone()?)?;
        Ok(Timers { fd, watched })
    }

    /// Gives the calling thread these timers, and returns what fires them: the thread's event
    /// loop polls it for as long as it runs. It never ends.
    pub fn run(self) -> impl Future<Output = ()> {
        let id = NEXT_WHEEL.fetch_add(1, Relaxed);
        let Timers { fd, watched } = self;
        WHEEL.with(|w| {
            *w.borrow_mut() = Some(Wheel {
                id,
                entries: slab::Slab::new(),
                queue: BTreeSet::new(),
                armed: None,
                fd,
            })
        });
        fire(id, watched)
    }
}

async fn fire(id: u64, watched: Watched) {
    let (mut wake, mut gone) = (Vec::new(), Vec::new());
    loop {
        if let Err(e) = watched.readable().await {
            // (not expected: the fd stays registered for the loop's life)
            tracing::error!(error = %e, "gateway worker timers stopped");
            return std::future::pending().await;
        }
        let mut expirations = [0u8; 8];
        match watched.try_read(&mut expirations) {
            Ok(_) => {}
            // (readiness cleared: the next expiration wakes it)
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            // (not expected: a timerfd's read fails only for a short buffer, or for a clock
            // change it was not asked to report; the due timers fire anyway)
            Err(e) => tracing::error!(error = %e, "gateway worker timer read failed"),
        }
        let now = Instant::now();
        on_wheel(id, |w| w.fire(now, &mut wake, &mut gone));
        gone.clear();
        for w in wake.drain(..) {
            w.wake();
        }
    }
}

/// A future that completes at its deadline (tokio's `Sleep`, on the workers' own timers).
pub struct Sleep {
    deadline: Instant,
    state: State,
}

enum State {
    /// Not queued yet: it is, where it is first polled.
    Unpolled,
    Own {
        wheel: u64,
        key: usize,
    },
    Tokio(Pin<Box<tokio::time::Sleep>>),
}

impl std::fmt::Debug for Sleep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sleep")
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl Sleep {
    fn until(deadline: Instant) -> Sleep {
        Sleep {
            deadline,
            state: State::Unpolled,
        }
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Moves the deadline (later or earlier; a timer that fired may be set again).
    pub fn reset(&mut self, deadline: Instant) {
        self.deadline = deadline;
        match &mut self.state {
            State::Unpolled => {}
            State::Own { wheel, key } => {
                let (wheel, key) = (*wheel, *key);
                if on_wheel(wheel, |w| w.reset(key, deadline)).is_none() {
                    self.disown();
                }
            }
            State::Tokio(s) => s.as_mut().reset(deadline.into()),
        }
    }

    fn disown(&mut self) {
        if let State::Own { wheel, key } = std::mem::replace(&mut self.state, State::Unpolled) {
            orphan(wheel, key);
        }
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let State::Own { wheel, key } = this.state {
            match on_wheel(wheel, |w| w.poll(key, cx)) {
                Some((p, _replaced)) => return p,
                None => this.disown(),
            }
        }
        if let State::Tokio(s) = &mut this.state {
            return poll_tokio(s, cx);
        }
        let deadline = this.deadline;
        // queued on this thread's wheel: `None` if it has none, `Some(None)` if it is in use
        let queued = WHEEL
            .try_with(|w| match w.try_borrow_mut() {
                Ok(mut w) => w
                    .as_mut()
                    .map(|w| Some((w.id, w.insert(deadline, cx.waker())))),
                Err(_) => Some(None),
            })
            .ok()
            .flatten();
        match queued {
            Some(Some((wheel, key))) => {
                this.state = State::Own { wheel, key };
                return Poll::Pending;
            }
            // (not expected: the wheel is only borrowed inside this module's calls, none of
            // which polls; tried again at once)
            Some(None) => {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            // off a worker: tokio's
            None => {}
        }
        let mut s = Box::pin(tokio::time::sleep_until(deadline.into()));
        let p = poll_tokio(&mut s, cx);
        this.state = State::Tokio(s);
        p
    }
}

/// tokio's timer, polled outside the task's budget (as `tokio::time::timeout` polls it): a
/// future that uses the budget up on every poll still ends at its deadline. (A worker's own
/// timers take nothing of the budget.)
fn poll_tokio(s: &mut Pin<Box<tokio::time::Sleep>>, cx: &mut Context<'_>) -> Poll<()> {
    Pin::new(&mut tokio::task::unconstrained(s.as_mut())).poll(cx)
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let State::Own { wheel, key } = self.state {
            // (the entry, with its waker, is dropped once the wheel is let go)
            match on_wheel(wheel, |w| w.remove(key)) {
                Some(entry) => drop(entry),
                // (a thread that is ending drops its own timers after its wheel: nothing to do)
                None if WHEEL.try_with(|_| ()).is_err() => {}
                None => orphan(wheel, key),
            }
        }
    }
}

impl hyper::rt::Sleep for Sleep {}

/// A timer for `deadline`: one this thread was given back ([`put_back`]) if it has one. A
/// queued timer moved to a later deadline costs a field write, where a new one is queued and
/// taken out again; so [`timeout_at`] (an upstream attempt's deadline, at every request) sets
/// its deadline on the timer of an earlier timeout. (Taken from a thread's own list: no lock.)
fn reuse(deadline: Instant) -> Sleep {
    match SPARE.try_with(|s| s.borrow_mut().pop()).ok().flatten() {
        Some(mut timer) => {
            timer.reset(deadline);
            timer
        }
        None => Sleep::until(deadline),
    }
}

/// Gives `timer` back for [`reuse`]. A worker's timer lets its waker go: kept, it wakes nobody
/// when its queued time comes.
fn put_back(timer: Sleep) {
    // (tokio's are not kept: their waker stays, and they belong to a runtime that may end)
    if matches!(timer.state, State::Tokio(_)) {
        return;
    }
    if let State::Own { wheel, key } = timer.state {
        // (the waker is dropped once the wheel is let go)
        let waker = on_wheel(wheel, |w| {
            w.entries.get_mut(key).and_then(|e| e.waker.take())
        });
        drop(waker);
    }
    let _ = SPARE.try_with(move |spare| {
        let mut spare = spare.borrow_mut();
        if spare.len() < SPARE_MAX {
            spare.push(timer);
        }
    });
}

/// A timer completing after `after`.
pub fn sleep(after: Duration) -> Sleep {
    Sleep::until(deadline_after(after))
}

/// A timer completing at `deadline`.
pub fn sleep_until(deadline: Instant) -> Sleep {
    Sleep::until(deadline)
}

/// The error of a [`timeout`] that ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

impl std::fmt::Display for Elapsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("deadline has elapsed")
    }
}

impl std::error::Error for Elapsed {}

/// `fut`, or [`Elapsed`] if it has not completed within `after` (counted from this call).
pub fn timeout<F: Future>(
    after: Duration,
    fut: F,
) -> impl Future<Output = Result<F::Output, Elapsed>> {
    timeout_at(deadline_after(after), fut)
}

/// `fut`, or [`Elapsed`] if it has not completed by `deadline`. `fut` is polled first: one
/// ready at its deadline is not lost. The timer is one of the thread's spare ones ([`reuse`]),
/// given back when the timeout completes (an upstream attempt's, at every request).
pub async fn timeout_at<F: Future>(deadline: Instant, fut: F) -> Result<F::Output, Elapsed> {
    let mut fut = std::pin::pin!(fut);
    let mut timer = reuse(deadline);
    let out = std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        Pin::new(&mut timer).poll(cx).map(|()| Err(Elapsed))
    })
    .await;
    put_back(timer);
    out
}

/// hyper's timer (server header-read timeout, HTTP/2 keep-alive, client pool), on these timers.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timer;

impl hyper::rt::Timer for Timer {
    fn sleep(&self, after: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(sleep(after))
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Sleep::until(deadline))
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<Sleep>() {
            Some(s) => s.get_mut().reset(deadline),
            None => *sleep = self.sleep_until(deadline),
        }
    }
}

/// The TCP connector of hyper-util's clients (the `https://` and h2c upstreams), on these
/// timers: hyper-util's own `HttpConnector` times its connects, and its "happy eyeballs"
/// fallback, with tokio's timer driver, which a worker's event loop has not. As hyper-util's
/// does, it resolves the host (outside the connect timeout), then tries the addresses in the
/// resolver's order, each within its share of the connect timeout, so an address that drops
/// the connection attempt gives way to the next; the first connection made is used (no
/// parallel race between address families).
#[derive(Clone, Debug)]
pub struct Connector {
    connect_timeout: Duration,
}

impl Connector {
    pub fn new(connect_timeout: Duration) -> Connector {
        Connector { connect_timeout }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<hyper::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        let timeout = self.connect_timeout;
        Box::pin(async move {
            let stream = connect(&uri, timeout).await?;
            let _ = stream.set_nodelay(true);
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

async fn connect(uri: &hyper::Uri, timeout: Duration) -> std::io::Result<tokio::net::TcpStream> {
    use std::io::{Error, ErrorKind};
    let host = uri
        .host()
        .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "the upstream URI has no host"))?;
    // (an IPv6 literal keeps its brackets in a URI)
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    });
    let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    let share = u32::try_from(addrs.len())
        .ok()
        .and_then(|n| timeout.checked_div(n))
        .unwrap_or(timeout);
    let mut failed = Error::new(ErrorKind::NotFound, "the upstream host has no address");
    for addr in addrs {
        match self::timeout(share, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => failed = e,
            Err(Elapsed) => failed = Error::new(ErrorKind::TimedOut, "connect timed out"),
        }
    }
    Err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `fut` as a worker does: an event loop with the I/O driver only (a tokio timer would
    /// panic there), and this thread's own timers.
    fn on_worker<F: Future>(fut: F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let timers = {
            let _in = rt.enter();
            Timers::new().unwrap()
        };
        let fire = timers.run();
        rt.block_on(async {
            tokio::select! {
                out = fut => out,
                _ = fire => unreachable!("the timers never end"),
            }
        })
    }

    /// (entries, queued) of this thread's timers.
    fn load() -> (usize, usize) {
        WHEEL.with(|w| {
            let w = w.borrow();
            let w = w.as_ref().unwrap();
            (w.entries.len(), w.queue.len())
        })
    }

    #[test]
    fn timers_fire_in_order_and_never_early() {
        let order = on_worker(async {
            let start = Instant::now();
            let fired = RefCell::new(Vec::new());
            let wait = |ms: u64| {
                let fired = &fired;
                async move {
                    let at = start + Duration::from_millis(ms);
                    sleep_until(at).await;
                    assert!(Instant::now() >= at, "fired before its deadline");
                    fired.borrow_mut().push(ms);
                }
            };
            tokio::join!(wait(60), wait(20), wait(40), wait(0));
            assert_eq!(load(), (0, 0), "done timers leave nothing queued");
            fired.into_inner()
        });
        assert_eq!(order, [0, 20, 40, 60]);
    }

    #[test]
    fn a_timer_moved_later_fires_at_its_new_deadline_and_one_moved_earlier_at_its_own() {
        on_worker(async {
            let start = Instant::now();
            let mut later = sleep_until(start + Duration::from_millis(20));
            // queued at 20 ms
            assert!(futures_poll(&mut later).is_pending());
            later.reset(start + Duration::from_millis(80));
            let mut earlier = sleep_until(start + Duration::from_secs(3600));
            assert!(futures_poll(&mut earlier).is_pending());
            earlier.reset(start + Duration::from_millis(40));
            (&mut earlier).await;
            let at = Instant::now();
            assert!(at >= start + Duration::from_millis(40));
            assert!(
                futures_poll(&mut later).is_pending(),
                "the timer moved later fired at its first deadline"
            );
            (&mut later).await;
            assert!(Instant::now() >= start + Duration::from_millis(80));
            // a fired timer set again waits again
            later.reset(Instant::now() + Duration::from_millis(10));
            assert!(futures_poll(&mut later).is_pending());
            (&mut later).await;
        });
    }

    #[test]
    fn a_dropped_timer_leaves_the_queue_and_wakes_nobody() {
        on_worker(async {
            let mut gone = sleep(Duration::from_millis(10));
            assert!(futures_poll(&mut gone).is_pending());
            let mut kept = sleep(Duration::from_millis(30));
            assert!(futures_poll(&mut kept).is_pending());
            assert_eq!(load(), (2, 2));
            drop(gone);
            assert_eq!(load(), (1, 1));
            kept.await;
            assert_eq!(load(), (0, 0));
        });
    }

    #[test]
    fn timeout_gives_the_output_or_elapsed() {
        on_worker(async {
            assert_eq!(timeout(Duration::from_secs(5), async { 7 }).await, Ok(7));
            let never = std::future::pending::<()>();
            assert_eq!(
                timeout(Duration::from_millis(20), never).await,
                Err(Elapsed)
            );
            // ready at its deadline: the output wins
            assert_eq!(timeout(Duration::ZERO, async { 1 }).await, Ok(1));
        });
    }

    #[test]
    fn hyper_moves_its_timer_in_place() {
        use hyper::rt::Timer as _;
        on_worker(async {
            let t = Timer;
            let start = Instant::now();
            let mut s = t.sleep_until(start + Duration::from_secs(3600));
            assert!(futures_poll(&mut s).is_pending());
            t.reset(&mut s, start + Duration::from_millis(20));
            assert!(s.as_mut().downcast_mut_pin::<Sleep>().is_some());
            s.await;
            assert!(Instant::now() >= start + Duration::from_millis(20));
        });
    }

    #[test]
    fn off_a_worker_a_timer_is_tokios() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let start = Instant::now();
            let mut s = sleep(Duration::from_millis(20));
            assert!(futures_poll(&mut s).is_pending());
            assert!(matches!(s.state, State::Tokio(_)));
            s.reset(start + Duration::from_millis(30));
            s.await;
            assert!(Instant::now() >= start + Duration::from_millis(30));
        });
    }

    #[test]
    fn a_timer_dropped_on_another_thread_is_taken_out_by_its_worker() {
        on_worker(async {
            let mut stray = sleep(Duration::from_secs(3600));
            assert!(futures_poll(&mut stray).is_pending());
            assert_eq!(load(), (1, 1));
            std::thread::spawn(move || drop(stray)).join().unwrap();
            // still there until the worker's timer next fires
            assert_eq!(load(), (1, 1));
            sleep(Duration::from_millis(5)).await;
            assert_eq!(load(), (0, 0));
        });
    }

    #[test]
    fn a_timer_given_back_wakes_nobody_and_serves_again() {
        use std::sync::atomic::AtomicUsize;
        use std::sync::Arc;
        struct Count(AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Relaxed);
            }
        }
        on_worker(async {
            let woken = Arc::new(Count(AtomicUsize::new(0)));
            let waker = Waker::from(woken.clone());
            let mut first = reuse(Instant::now() + Duration::from_millis(10));
            let polled = Pin::new(&mut first).poll(&mut Context::from_waker(&waker));
            assert!(polled.is_pending());
            put_back(first);
            sleep(Duration::from_millis(30)).await;
            assert_eq!(woken.0.load(Relaxed), 0, "a kept timer woke its last task");
            assert_eq!(load(), (1, 0), "kept, fired, not queued");
            let start = Instant::now();
            let again = reuse(start + Duration::from_millis(10));
            assert_eq!(load(), (1, 1), "the kept entry serves again");
            again.await;
            assert!(Instant::now() >= start + Duration::from_millis(10));
        });
    }

    #[test]
    fn the_connector_resolves_and_tries_each_address_on_a_worker() {
        use tower::Service as _;
        on_worker(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let accepted = tokio::spawn(async move { listener.accept().await.map(|_| ()) });
            let mut c = Connector::new(Duration::from_secs(2));
            // "localhost" may resolve to ::1 first, where nothing listens: the next is tried
            let uri: hyper::Uri = format!("http://localhost:{port}/").parse().unwrap();
            let io = c.call(uri).await.expect("connected");
            assert_eq!(io.inner().peer_addr().unwrap().port(), port);
            accepted.await.unwrap().unwrap();
            // an IPv6 literal keeps its brackets in the URI; a refusal is the error
            let closed = tokio::net::TcpListener::bind("[::1]:0").await;
            if let Ok(l) = closed {
                let port = l.local_addr().unwrap().port();
                drop(l);
                let uri: hyper::Uri = format!("https://[::1]:{port}/").parse().unwrap();
                let e = c.call(uri).await.expect_err("nothing listens");
                let e = e.downcast_ref::<std::io::Error>().expect("an I/O error");
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
            }
        });
    }

    /// One poll, with a no-op waker (the timers' own tests wait with `.await`).
    fn futures_poll<F: Future + Unpin + ?Sized>(f: &mut F) -> Poll<F::Output> {
        Pin::new(f).poll(&mut Context::from_waker(Waker::noop()))
    }
}
