//! Per-consumer usage for billing: requests and body bytes by tenant, consumer, API and UTC
//! hour. The request path adds to an in-memory table; the node flushes it into the replicated
//! state (`Command::RecordUsage`) every minute and at shutdown, so every node of a cluster meters
//! what it served and the counters add up.

use super::routes::Route;
use crate::state::{UsageCounts, UsageEntry};
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use rustc_hash::FxBuildHasher;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

/// Counts by UTC hour, then by `tenant`, `consumer` and `api` joined by NUL (which no name can
/// hold): a request already counted in its hour adds without allocating.
// (keyed by hours, and by tenant, consumer and API names from the configuration, not by
// anything a request sends: a fast hash, not a flood-resistant one)
type Pending = HashMap<i64, HashMap<String, UsageCounts, FxBuildHasher>, FxBuildHasher>;

/// The UTC hour of `t`, as hours since the Unix epoch (the meter's unit).
pub fn hour_of(t: SystemTime) -> i64 {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    i64::try_from(secs / 3600).unwrap_or(i64::MAX)
}

/// Usage counted since the last flush, and the batch a failed flush left to retry.
#[derive(Debug, Default)]
pub struct Meter {
    pending: Mutex<Pending>,
    /// (batch number, entries) of a write that failed: retried as is, with the same number, so
    /// that it counts once whether or not the failed write was in fact committed.
    unsent: Mutex<Option<(u64, Vec<UsageEntry>)>>,
    /// The last batch number given out.
    batch: Mutex<u64>,
}

impl Meter {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `counts` of `consumer` on `tenant/api`, in the current hour.
    pub fn add(&self, tenant: &str, consumer: &str, api: &str, counts: UsageCounts) {
        self.add_in(hour_of(SystemTime::now()), tenant, consumer, api, counts);
    }

    /// Adds `counts` of `consumer` on `tenant/api`, in `hour` (see [`hour_of`]).
    pub fn add_in(&self, hour: i64, tenant: &str, consumer: &str, api: &str, counts: UsageCounts) {
        thread_local! {
            static KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        KEY.with(|key| {
            let mut key = key.borrow_mut();
            key.clear();
            for (i, part) in [tenant, consumer, api].into_iter().enumerate() {
                if i > 0 {
                    key.push('\0');
                }
                key.push_str(part);
            }
            let mut pending = self.lock();
            let by_key = pending.entry(hour).or_default();
            match by_key.get_mut(key.as_str()) {
                Some(c) => c.add(&counts),
                None => {
                    by_key.insert(key.clone(), counts);
                }
            }
        });
    }

    /// Takes everything counted so far.
    pub fn take(&self) -> Vec<UsageEntry> {
        let mut out = Vec::new();
        for (hour, by_key) in std::mem::take(&mut *self.lock()) {
            for (key, counts) in by_key {
                let mut parts = key.splitn(3, '\0').map(str::to_string);
                let (Some(tenant), Some(consumer), Some(api)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                out.push(UsageEntry {
                    tenant,
                    consumer,
                    api,
                    hour,
                    counts,
                });
            }
        }
        out
    }

    /// Numbers batches after `last` (the last batch of this node the state has applied, and
    /// never below the current time in milliseconds, so numbers grow across restarts).
    /// Returns the number after which batches are this process's.
    pub fn start_batches_after(&self, last: u64) -> u64 {
        let now = u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
            .unwrap_or(0);
        let first = last.max(now);
        *self.batch.lock().unwrap_or_else(|p| p.into_inner()) = first;
        first
    }

    /// The next batch to write: the one a failed flush left, or a new one of everything counted
    /// since (None when there is nothing to write).
    pub fn next_batch(&self) -> Option<(u64, Vec<UsageEntry>)> {
        if let Some(b) = self.unsent.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Some(b);
        }
        let entries = self.take();
        if entries.is_empty() {
            return None;
        }
        let mut n = self.batch.lock().unwrap_or_else(|p| p.into_inner());
        *n += 1;
        Some((*n, entries))
    }

    /// Keeps a batch whose write failed, to be retried unchanged.
    pub fn keep_unsent(&self, batch: u64, entries: Vec<UsageEntry>) {
        *self.unsent.lock().unwrap_or_else(|p| p.into_inner()) = Some((batch, entries));
    }
}

/// A body that counts the bytes of its data frames into a shared counter and, for a metered
/// answer, records the request's usage when it is done (sent or abandoned).
pub struct Counted<B> {
    inner: B,
    counter: Counter,
}

/// Where a [`Counted`] body's bytes go.
enum Counter {
    /// A counter shared with the request's ticket (a request body's bytes in).
    Shared(Arc<AtomicU64>),
    /// The ticket's own bytes out (an answer's body, which owns the ticket).
    Ticket(Ticket),
}

impl<B> Counted<B> {
    pub fn new(inner: B, bytes: Arc<AtomicU64>) -> Self {
        Counted {
            inner,
            counter: Counter::Shared(bytes),
        }
    }

    /// An answer's body whose end records `ticket` (its bytes are the ticket's bytes out).
    pub fn metered(inner: B, ticket: Ticket) -> Self {
        Counted {
            inner,
            counter: Counter::Ticket(ticket),
        }
    }
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(d) = frame.data_ref() {
                let n = d.len() as u64;
                match &mut self.counter {
                    Counter::Shared(bytes) => {
                        bytes.fetch_add(n, Ordering::Relaxed);
                    }
                    Counter::Ticket(t) => t.bytes_out += n,
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// One forwarded request of an identified consumer: recorded in the meter when dropped, in
/// the hour its answer began (the hour of its access-log line).
pub struct Ticket {
    pub meter: Arc<Meter>,
    /// See [`hour_of`].
    pub hour: i64,
    pub route: Arc<Route>,
    pub consumer: Arc<str>,
    /// The request body's bytes (none without a body).
    pub bytes_in: Option<Arc<AtomicU64>>,
    pub bytes_out: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.meter.add_in(
            self.hour,
            &self.route.tenant,
            &self.consumer,
            &self.route.api,
            UsageCounts {
                requests: 1,
                bytes_in: self
                    .bytes_in
                    .as_ref()
                    .map_or(0, |b| b.load(Ordering::Relaxed)),
                bytes_out: self.bytes_out,
            },
        );
    }
}
