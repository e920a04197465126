//! Plan quotas (requests per UTC day and per UTC month) counted from the replicated usage
//! counters, so that a restart does not reset them and every node of a cluster sees the
//! others' traffic.
//!
//! A consumer's use of an API in a window is `stored + local`:
//! - `stored`: what the replicated state's usage counters hold for the window (every node's
//!   flushed batches). Read once when the gateway starts (and again after a snapshot replaced
//!   the state), then kept up to date from every batch the state applies
//!   (`StateMachine::on_usage`).
//! - `local`: the requests this node admitted that no applied batch of its own holds yet. A
//!   batch of this node's, once applied, moves its counts from `local` to `stored`.
//!
//! So a node sees its own requests at once and the other nodes' within their flush interval
//! (`gateway.usage_flush_seconds`); a crash loses what the node had not flushed.

use crate::state::{StoreError, UsageEntry};
use std::collections::HashMap;
use std::sync::Mutex;

/// Requests in the current UTC day and month (windows as indexes: days since the epoch,
/// `year * 12 + month - 1`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Windows {
    day: i64,
    day_n: u64,
    month: i64,
    month_n: u64,
}

impl Windows {
    /// Adds `n` requests of `day` and `month`: a later window starts from zero, an earlier
    /// one is past and ignored.
    fn add(&mut self, (day, month): (i64, i64), n: u64) {
        if day > self.day {
            (self.day, self.day_n) = (day, 0);
        }
        if day == self.day {
            self.day_n = self.day_n.saturating_add(n);
        }
        if month > self.month {
            (self.month, self.month_n) = (month, 0);
        }
        if month == self.month {
            self.month_n = self.month_n.saturating_add(n);
        }
    }

    /// Takes back `n` requests of `day` and `month` (never below zero).
    fn sub(&mut self, (day, month): (i64, i64), n: u64) {
        if day == self.day {
            self.day_n = self.day_n.saturating_sub(n);
        }
        if month == self.month {
            self.month_n = self.month_n.saturating_sub(n);
        }
    }

    /// Requests in `day` and in `month`.
    fn used(&self, (day, month): (i64, i64)) -> (u64, u64) {
        (
            if self.day == day { self.day_n } else { 0 },
            if self.month == month { self.month_n } else { 0 },
        )
    }
}

/// The day and month indexes of an hour (hours since the Unix epoch).
fn windows_of_hour(hour: i64) -> (i64, i64) {
    let day = hour.div_euclid(24);
    let month = time::OffsetDateTime::from_unix_timestamp(hour.saturating_mul(3600))
        .map(|t| i64::from(t.year()) * 12 + i64::from(u8::from(t.month())) - 1)
        .unwrap_or(0);
    (day, month)
}

/// A quota's key: tenant, API and consumer joined by NUL (which no name can hold).
fn key_into(out: &mut String, tenant: &str, api: &str, consumer: &str) {
    out.clear();
    for (i, part) in [tenant, api, consumer].into_iter().enumerate() {
        if i > 0 {
            out.push('\0');
        }
        out.push_str(part);
    }
}

#[derive(Default)]
struct Book {
    /// Whether `stored` holds what was read from the state: batches applied before that are
    /// kept in `early`.
    loaded: bool,
    early: Vec<(u64, u64, Vec<UsageEntry>)>,
    /// The last batch per node that `stored` holds.
    seen: HashMap<u64, u64>,
    stored: HashMap<String, Windows>,
    local: HashMap<String, Windows>,
}

impl Book {
    fn applied(&mut self, own: (u64, u64), node: u64, batch: u64, entries: &[UsageEntry]) {
        if batch != 0 {
            let last = self.seen.entry(node).or_insert(0);
            if batch <= *last {
                return; // the counters read from the state hold it
            }
            *last = batch;
        }
        // a batch this node wrote since it started: its requests were counted locally
        let mine = node == own.0 && batch > own.1;
        let mut key = String::new();
        for e in entries {
            key_into(&mut key, &e.tenant, &e.api, &e.consumer);
            let windows = windows_of_hour(e.hour);
            let n = e.counts.requests;
            match self.stored.get_mut(key.as_str()) {
                Some(w) => w.add(windows, n),
                None => self.stored.entry(key.clone()).or_default().add(windows, n),
            }
            if mine {
                if let Some(w) = self.local.get_mut(key.as_str()) {
                    w.sub(windows, n);
                }
            }
        }
    }
}

/// The refusal of a quota check: which window is used up, and the seconds until it ends.
#[derive(Debug, PartialEq, Eq)]
pub enum Exceeded {
    Day(u64),
    Month(u64),
}

/// The quotas of a gateway.
pub struct Quotas {
    /// This node's id, and the batch number after which its batches are this process's.
    own: Mutex<(u64, u64)>,
    book: Mutex<Book>,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            own: Mutex::new((0, u64::MAX)),
            book: Mutex::new(Book::default()),
        }
    }
}

impl Quotas {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This node's id, and the number after which the batches it writes are this process's.
    pub fn set_own(&self, node: u64, batches_after: u64) {
        *self.own.lock().unwrap_or_else(|p| p.into_inner()) = (node, batches_after);
    }

    /// Marks the stored counters as about to be read: batches applied from now until
    /// [`Quotas::load`] are held back, then counted if the read did not hold them.
    pub fn unload(&self) {
        self.book().loaded = false;
    }

    /// Takes the counters read from the state (`entries`, of the current month at least) and
    /// the last batch it applied from each node, then the batches applied meanwhile.
    pub fn load(&self, entries: &[UsageEntry], seen: HashMap<u64, u64>) {
        let own = *self.own.lock().unwrap_or_else(|p| p.into_inner());
        let mut book = self.book();
        book.stored.clear();
        book.seen = seen;
        let mut key = String::new();
        for e in entries {
            key_into(&mut key, &e.tenant, &e.api, &e.consumer);
            book.stored
                .entry(key.clone())
                .or_default()
                .add(windows_of_hour(e.hour), e.counts.requests);
        }
        book.loaded = true;
        for (node, batch, entries) in std::mem::take(&mut book.early) {
            book.applied(own, node, batch, &entries);
        }
    }

    /// Reads the stored counters again (at start, and after a snapshot replaced the state):
    /// those of the current UTC month, and the last batch applied from each node.
    pub fn reload(&self, reader: &crate::store::StateReader) -> Result<usize, StoreError> {
        let now = time::OffsetDateTime::now_utc();
        let month_start = now
            .replace_day(1)
            .map(|d| d.date().midnight().assume_utc().unix_timestamp() / 3600)
            .unwrap_or(0);
        self.unload();
        let (entries, seen) = reader.read(|kv| {
            Ok((
                crate::state::usage_since(kv, month_start)?,
                crate::state::usage_batches(kv)?,
            ))
        })?;
        self.load(&entries, seen);
        Ok(entries.len())
    }

    /// A usage batch the state applied.
    pub fn applied(&self, node: u64, batch: u64, entries: &[UsageEntry]) {
        let own = *self.own.lock().unwrap_or_else(|p| p.into_inner());
        let mut book = self.book();
        if !book.loaded {
            book.early.push((node, batch, entries.to_vec()));
            return;
        }
        book.applied(own, node, batch, entries);
    }

    /// Admits one request of `consumer` on `tenant/api` under the plan's limits per day and
    /// per month, at `now`: counted when admitted, not when refused.
    pub fn admit(
        &self,
        (tenant, api, consumer): (&str, &str, &str),
        per_day: Option<u64>,
        per_month: Option<u64>,
        now: time::OffsetDateTime,
    ) -> Result<(), Exceeded> {
        thread_local! {
            static KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        let (day, day_left) = super::day_window(now);
        let (month, month_left) = super::month_window(now);
        let windows = (day, month);
        KEY.with(|key| {
            let mut key = key.borrow_mut();
            key_into(&mut key, tenant, api, consumer);
            let mut book = self.book();
            if book.local.len() > 100_000 {
                // keys whose windows are past count nothing
                book.local.retain(|_, w| w.month >= month);
            }
            let stored = book
                .stored
                .get(key.as_str())
                .map_or((0, 0), |w| w.used(windows));
            let local = book
                .local
                .get(key.as_str())
                .map_or((0, 0), |w| w.used(windows));
            if per_day.is_some_and(|limit| stored.0.saturating_add(local.0) >= limit) {
                return Err(Exceeded::Day(day_left));
            }
            if per_month.is_some_and(|limit| stored.1.saturating_add(local.1) >= limit) {
                return Err(Exceeded::Month(month_left));
            }
            match book.local.get_mut(key.as_str()) {
                Some(w) => w.add(windows, 1),
                None => book.local.entry(key.clone()).or_default().add(windows, 1),
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::UsageCounts;

    fn entry(consumer: &str, hour: i64, requests: u64) -> UsageEntry {
        UsageEntry {
            tenant: "acme".into(),
            consumer: consumer.into(),
            api: "pay".into(),
            hour,
            counts: UsageCounts {
                requests,
                ..UsageCounts::default()
            },
        }
    }

    fn at(hour: i64) -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp(hour * 3600 + 1800).unwrap()
    }

    const WHO: (&str, &str, &str) = ("acme", "pay", "app");

    #[test]
    fn stored_and_local_requests_add_up_and_windows_roll() {
        // 2026-11-29T10:00Z: hour 498_394
        let hour = 1_795_946_400 / 3600;
        let q = Quotas::default();
        q.set_own(1, 100);
        // two requests earlier today and three earlier this month, from the state
        q.load(
            &[entry("app", hour - 2, 2), entry("app", hour - 48, 3)],
            HashMap::new(),
        );
        let now = at(hour);
        assert_eq!(q.admit(WHO, Some(3), Some(10), now), Ok(()));
        let Err(Exceeded::Day(left)) = q.admit(WHO, Some(3), Some(10), now) else {
            panic!("the day's three requests are used");
        };
        assert_eq!(left, 13 * 3600 + 1800);
        // the month: 6 of 7 used (5 stored, 1 local), one more, then refused
        assert_eq!(q.admit(WHO, None, Some(7), now), Ok(()));
        assert!(matches!(
            q.admit(WHO, None, Some(7), now),
            Err(Exceeded::Month(_))
        ));
        // another consumer has its own count
        assert_eq!(
            q.admit(("acme", "pay", "other"), Some(1), None, now),
            Ok(())
        );
        // the next day starts from zero; the month goes on (5 stored + 2 local)
        let tomorrow = at(hour + 24);
        assert_eq!(q.admit(WHO, Some(1), Some(8), tomorrow), Ok(()));
        assert!(matches!(
            q.admit(WHO, Some(5), Some(8), tomorrow),
            Err(Exceeded::Month(_))
        ));
        // a refused request counts nothing
        assert_eq!(q.admit(WHO, Some(2), None, tomorrow), Ok(()));
    }

    #[test]
    fn applied_batches_count_once_and_own_batches_move_from_local_to_stored() {
        let hour = 1_795_946_400 / 3600;
        let now = at(hour);
        let q = Quotas::default();
        q.set_own(1, 1000);
        // a batch of node 2 applied while the counters were being read, and held back
        q.unload();
        q.applied(2, 7, &[entry("app", hour, 4)]);
        q.applied(2, 8, &[entry("app", hour, 1)]);
        // the read held node 2's batch 7, not 8
        q.load(&[entry("app", hour, 4)], HashMap::from([(2, 7)]));
        assert_eq!(q.admit(WHO, Some(6), None, now), Ok(()));
        assert!(q.admit(WHO, Some(6), None, now).is_err(), "4 + 1 + 1");
        // a batch applied again is not counted again
        q.applied(2, 8, &[entry("app", hour, 1)]);
        assert!(q.admit(WHO, Some(7), None, now).is_ok(), "4 + 1 + 1 + 1");
        // this node's own batch (after 1000) holds its two requests: they move, the sum stays
        q.applied(1, 1001, &[entry("app", hour, 2)]);
        assert!(q.admit(WHO, Some(8), None, now).is_ok(), "7 + 1");
        assert!(q.admit(WHO, Some(8), None, now).is_err());
        // one of an earlier process (at or before 1000) had not been counted locally
        let q2 = Quotas::default();
        q2.set_own(1, 1000);
        q2.load(&[], HashMap::new());
        assert_eq!(q2.admit(WHO, Some(2), None, now), Ok(()));
        q2.applied(1, 999, &[entry("app", hour, 1)]);
        assert!(
            q2.admit(WHO, Some(2), None, now).is_err(),
            "1 stored + 1 local"
        );
    }

    #[test]
    fn hours_map_to_utc_days_and_months() {
        // 2026-01-31T23:00Z and 2026-02-01T00:00Z
        let jan31 = 1_769_900_400 / 3600;
        let (d1, m1) = windows_of_hour(jan31);
        let (d2, m2) = windows_of_hour(jan31 + 1);
        assert_eq!((d2 - d1, m2 - m1), (1, 1));
        assert_eq!(m1, 2026 * 12);
        assert_eq!(super::super::month_window(at(jan31)).0, m1);
        assert_eq!(super::super::day_window(at(jan31)).0, d1);
    }
}
