//! Plan quotas (requests per UTC day and per UTC month) counted from the replicated usage
//! counters, so that a restart does not reset them and, in a cluster, every node counts the
//! others' flushed traffic.
//!
//! A consumer's use of an API in a window is `stored + local`:
//! - `stored`: what the replicated state's usage counters hold for the window (every node's
//!   flushed batches). Read when the gateway starts (and again after a snapshot replaced the
//!   state), then kept up to date from every batch the state applies
//!   (`StateMachine::on_usage`).
//! - `local`: the requests this node admitted that the state does not hold yet. A batch this
//!   process wrote, once the state holds it (applied here, or in a snapshot read), moves its
//!   counts from `local` to `stored`.
//!
//! So a node sees its own requests at once and the other nodes' within their flush interval
//! (`gateway.usage_flush_seconds`); a crash loses what the node had not flushed.

use crate::state::{StoreError, UsageEntry};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// Requests by UTC day and month (windows as indexes: days since the epoch,
/// `year * 12 + month - 1`), the two latest of each: a node whose clock runs a little ahead
/// (its batch already in tomorrow) does not hide today's count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Windows {
    days: [(i64, u64); 2],
    months: [(i64, u64); 2],
}

fn slot_add(slots: &mut [(i64, u64); 2], window: i64, n: u64) {
    if let Some(s) = slots.iter_mut().find(|s| s.0 == window) {
        s.1 = s.1.saturating_add(n);
        return;
    }
    // a newer window takes the older slot; one older than both is past and ignored
    let older = usize::from(slots[1].0 < slots[0].0);
    if window > slots[older].0 {
        slots[older] = (window, n);
    }
}

fn slot_sub(slots: &mut [(i64, u64); 2], window: i64, n: u64) {
    if let Some(s) = slots.iter_mut().find(|s| s.0 == window) {
        s.1 = s.1.saturating_sub(n);
    }
}

fn slot_used(slots: &[(i64, u64); 2], window: i64) -> u64 {
    slots.iter().find(|s| s.0 == window).map_or(0, |s| s.1)
}

impl Windows {
    /// Adds `n` requests of `day` and `month`.
    fn add(&mut self, (day, month): (i64, i64), n: u64) {
        slot_add(&mut self.days, day, n);
        slot_add(&mut self.months, month, n);
    }

    /// Takes back `n` requests of `day` and `month` (never below zero).
    fn sub(&mut self, (day, month): (i64, i64), n: u64) {
        slot_sub(&mut self.days, day, n);
        slot_sub(&mut self.months, month, n);
    }

    /// Requests in `day` and in `month`.
    fn used(&self, (day, month): (i64, i64)) -> (u64, u64) {
        (slot_used(&self.days, day), slot_used(&self.months, month))
    }

    /// Whether it counts something in `month` or later.
    fn current(&self, month: i64) -> bool {
        self.months.iter().any(|s| s.0 >= month && s.1 > 0)
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

/// Requests of one batch, by key and windows.
type Counts = Vec<(String, (i64, i64), u64)>;

fn counts_of(entries: &[UsageEntry]) -> Counts {
    let mut key = String::new();
    entries
        .iter()
        .map(|e| {
            key_into(&mut key, &e.tenant, &e.api, &e.consumer);
            (key.clone(), windows_of_hour(e.hour), e.counts.requests)
        })
        .collect()
}

/// Keys kept before the maps are pruned of past windows.
const PRUNE_AT: usize = 100_000;

struct Book {
    /// Whether `stored` holds what was read from the state: batches applied before that are
    /// kept in `early`.
    loaded: bool,
    early: Vec<(u64, u64, Vec<UsageEntry>)>,
    /// The last batch per node that `stored` holds.
    seen: HashMap<u64, u64>,
    stored: HashMap<String, Windows>,
    local: HashMap<String, Windows>,
    /// This process's batches being written, by number: once the state holds one, its
    /// requests leave `local` (when it is applied, or found in a snapshot read at a reload).
    writing: BTreeMap<u64, Counts>,
    /// Size of the maps that makes the next check prune them.
    prune_at: usize,
}

impl Default for Book {
    fn default() -> Self {
        Book {
            loaded: false,
            early: Vec::new(),
            seen: HashMap::new(),
            stored: HashMap::new(),
            local: HashMap::new(),
            writing: BTreeMap::new(),
            prune_at: PRUNE_AT,
        }
    }
}

fn add_to(map: &mut HashMap<String, Windows>, key: &str, windows: (i64, i64), n: u64) {
    match map.get_mut(key) {
        Some(w) => w.add(windows, n),
        None => map.entry(key.to_string()).or_default().add(windows, n),
    }
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
        if mine {
            self.writing.remove(&batch);
        }
        for (key, windows, n) in counts_of(entries) {
            add_to(&mut self.stored, &key, windows, n);
            if mine {
                if let Some(w) = self.local.get_mut(key.as_str()) {
                    w.sub(windows, n);
                }
            }
        }
    }

    /// Drops the keys that count nothing in `month` or later, when the maps have grown past
    /// `prune_at` (then set to twice what is left, so a month with many active keys does not
    /// prune at every check).
    fn prune(&mut self, month: i64) {
        if self.stored.len() + self.local.len() <= self.prune_at {
            return;
        }
        self.stored.retain(|_, w| w.current(month));
        self.local.retain(|_, w| w.current(month));
        self.prune_at = PRUNE_AT.max(2 * (self.stored.len() + self.local.len()));
    }
}

/// A quota window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Day,
    Month,
}

/// The refusal of a quota check: the window used up, and the seconds until it ends.
pub type Exceeded = (Window, u64);

/// What an admitted request leaves of each quota the plan sets: the window, the requests
/// left in it, the seconds until it ends.
pub type Left = Vec<(Window, u64, u64)>;

/// The quotas of a gateway.
pub struct Quotas {
    /// This node's id, and the batch number after which its batches are this process's.
    own: Mutex<(u64, u64)>,
    book: Mutex<Book>,
    /// Held by a reload from its start to its end: two never interleave.
    reloading: Mutex<()>,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            own: Mutex::new((0, u64::MAX)),
            book: Mutex::new(Book::default()),
            reloading: Mutex::new(()),
        }
    }
}

fn month_now() -> i64 {
    super::month_window(time::OffsetDateTime::now_utc()).0
}

impl Quotas {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn own(&self) -> (u64, u64) {
        *self.own.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This node's id, and the number after which the batches it writes are this process's.
    pub fn set_own(&self, node: u64, batches_after: u64) {
        *self.own.lock().unwrap_or_else(|p| p.into_inner()) = (node, batches_after);
    }

    /// A batch of this node's about to be written (again, after a failure: the same number).
    pub fn writing(&self, batch: u64, entries: &[UsageEntry]) {
        let mut book = self.book();
        book.writing
            .entry(batch)
            .or_insert_with(|| counts_of(entries));
    }

    /// Marks the stored counters as about to be read: batches applied from now until
    /// [`Quotas::load`] are held back, then counted if the read did not hold them.
    fn unload(&self) {
        self.book().loaded = false;
    }

    /// Takes the counters read from the state (`entries`, of the current month at least) and
    /// the last batch it applied from each node, then the batches applied meanwhile.
    fn load(&self, entries: &[UsageEntry], seen: HashMap<u64, u64>) {
        let own = self.own();
        let mut book = self.book();
        book.stored.clear();
        for (key, windows, n) in counts_of(entries) {
            add_to(&mut book.stored, &key, windows, n);
        }
        // this process's batches the read holds (a snapshot can bring them without their
        // being applied here) leave `local`
        let held = seen.get(&own.0).copied().unwrap_or(0);
        let in_state: Vec<u64> = book.writing.range(..=held).map(|(b, _)| *b).collect();
        for batch in in_state {
            for (key, windows, n) in book.writing.remove(&batch).unwrap_or_default() {
                if let Some(w) = book.local.get_mut(key.as_str()) {
                    w.sub(windows, n);
                }
            }
        }
        book.seen = seen;
        book.resume(own);
    }

    /// Reads the stored counters again (at start, and after a snapshot replaced the state):
    /// those of the current UTC month, and the last batch applied from each node. A read that
    /// fails leaves the counters as they were, and counts the batches applied meanwhile.
    pub fn reload(&self, reader: &crate::store::StateReader) -> Result<usize, StoreError> {
        let _one = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let now = time::OffsetDateTime::now_utc();
        let month_start = now
            .replace_day(1)
            .map(|d| d.date().midnight().assume_utc().unix_timestamp() / 3600)
            .unwrap_or(0);
        self.unload();
        let read = reader.read(|kv| {
            Ok((
                crate::state::usage_since(kv, month_start)?,
                crate::state::usage_batches(kv)?,
            ))
        });
        match read {
            Ok((entries, seen)) => {
                self.load(&entries, seen);
                Ok(entries.len())
            }
            Err(e) => {
                let own = self.own();
                self.book().resume(own);
                Err(e)
            }
        }
    }

    /// A usage batch the state applied.
    pub fn applied(&self, node: u64, batch: u64, entries: &[UsageEntry]) {
        let own = self.own();
        let mut book = self.book();
        if !book.loaded {
            book.early.push((node, batch, entries.to_vec()));
            return;
        }
        book.applied(own, node, batch, entries);
        book.prune(month_now());
    }

    /// Admits one request of `consumer` on `tenant/api` under the plan's limits per day and
    /// per month, at `now`: counted when admitted, not when refused.
    pub fn admit(
        &self,
        (tenant, api, consumer): (&str, &str, &str),
        per_day: Option<u64>,
        per_month: Option<u64>,
        now: time::OffsetDateTime,
    ) -> Result<Left, Exceeded> {
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
            book.prune(month);
            let stored = book
                .stored
                .get(key.as_str())
                .map_or((0, 0), |w| w.used(windows));
            let local = book
                .local
                .get(key.as_str())
                .map_or((0, 0), |w| w.used(windows));
            let used = (
                stored.0.saturating_add(local.0),
                stored.1.saturating_add(local.1),
            );
            if per_day.is_some_and(|limit| used.0 >= limit) {
                return Err((Window::Day, day_left));
            }
            if per_month.is_some_and(|limit| used.1 >= limit) {
                return Err((Window::Month, month_left));
            }
            add_to(&mut book.local, &key, windows, 1);
            let mut left = Left::new();
            if let Some(limit) = per_day {
                left.push((Window::Day, limit - used.0 - 1, day_left));
            }
            if let Some(limit) = per_month {
                left.push((Window::Month, limit - used.1 - 1, month_left));
            }
            Ok(left)
        })
    }
}

impl Book {
    /// Counts the batches held back while the counters were read, and counts from now on.
    fn resume(&mut self, own: (u64, u64)) {
        self.loaded = true;
        for (node, batch, entries) in std::mem::take(&mut self.early) {
            self.applied(own, node, batch, &entries);
        }
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
        // 2026-11-29T10:00Z: hour 498_874
        let hour = 1_795_946_400 / 3600;
        let q = Quotas::default();
        q.set_own(1, 100);
        // two requests earlier today and three earlier this month, from the state
        q.load(
            &[entry("app", hour - 2, 2), entry("app", hour - 48, 3)],
            HashMap::new(),
        );
        let now = at(hour);
        assert!(q.admit(WHO, Some(3), Some(10), now).is_ok());
        let Err((Window::Day, left)) = q.admit(WHO, Some(3), Some(10), now) else {
            panic!("the day's three requests are used");
        };
        assert_eq!(left, 13 * 3600 + 1800);
        // the month: 6 of 7 used (5 stored, 1 local), one more, then refused
        assert!(q.admit(WHO, None, Some(7), now).is_ok());
        assert!(matches!(
            q.admit(WHO, None, Some(7), now),
            Err((Window::Month, _))
        ));
        // another consumer has its own count
        assert_eq!(
            q.admit(("acme", "pay", "other"), Some(1), None, now),
            Ok(vec![(Window::Day, 0, 13 * 3600 + 1800)])
        );
        // the next day starts from zero; the month goes on (5 stored + 2 local): what is left
        // of each after this request
        let tomorrow = at(hour + 24);
        let Ok(left) = q.admit(WHO, Some(1), Some(8), tomorrow) else {
            panic!("admitted");
        };
        assert_eq!(
            left.iter().map(|l| (l.0, l.1)).collect::<Vec<_>>(),
            [(Window::Day, 0), (Window::Month, 0)]
        );
        assert!(matches!(
            q.admit(WHO, Some(5), Some(8), tomorrow),
            Err((Window::Month, _))
        ));
        // a refused request counts nothing
        assert!(q.admit(WHO, Some(2), None, tomorrow).is_ok());
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
        assert!(q.admit(WHO, Some(6), None, now).is_ok());
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
        assert!(q2.admit(WHO, Some(2), None, now).is_ok());
        q2.applied(1, 999, &[entry("app", hour, 1)]);
        assert!(
            q2.admit(WHO, Some(2), None, now).is_err(),
            "1 stored + 1 local"
        );
    }

    #[test]
    fn a_snapshot_read_takes_this_process_batches_out_of_local() {
        let hour = 1_795_946_400 / 3600;
        let now = at(hour);
        let q = Quotas::default();
        q.set_own(1, 1000);
        q.load(&[], HashMap::new());
        for _ in 0..3 {
            assert!(q.admit(WHO, Some(10), None, now).is_ok());
        }
        // batch 1001 (the three requests) is written; the state took it, but this node
        // learns of it only from a snapshot (it was never applied here)
        q.writing(1001, &[entry("app", hour, 3)]);
        q.unload();
        q.load(&[entry("app", hour, 3)], HashMap::from([(1, 1001)]));
        // 3, not 6: counted once
        for _ in 0..7 {
            assert!(q.admit(WHO, Some(10), None, now).is_ok());
        }
        assert!(q.admit(WHO, Some(10), None, now).is_err());
        // a batch being written that the snapshot does not hold stays local
        q.writing(1002, &[entry("app", hour, 7)]);
        q.unload();
        q.load(&[entry("app", hour, 3)], HashMap::from([(1, 1001)]));
        assert!(
            q.admit(WHO, Some(10), None, now).is_err(),
            "3 stored + 7 local"
        );
        // applied later, it moves from local to stored
        q.applied(1, 1002, &[entry("app", hour, 7)]);
        assert!(q.admit(WHO, Some(11), None, now).is_ok(), "10 stored");
    }

    #[test]
    fn a_batch_dated_tomorrow_does_not_hide_today() {
        let hour = 1_795_946_400 / 3600 + 13; // 23:00 UTC
        let now = at(hour);
        let q = Quotas::default();
        q.load(&[entry("app", hour, 4)], HashMap::new());
        // another node, its clock ahead, already in tomorrow
        q.applied(2, 5, &[entry("app", hour + 1, 1)]);
        assert!(
            q.admit(WHO, Some(4), None, now).is_err(),
            "today's 4 still count"
        );
        assert!(
            q.admit(WHO, Some(5), None, at(hour + 1)).is_ok(),
            "tomorrow: 1 + 1"
        );
        assert!(q.admit(WHO, Some(3), None, at(hour + 1)).is_ok());
        assert!(q.admit(WHO, Some(3), None, at(hour + 1)).is_err());
    }

    #[test]
    fn batches_held_back_by_a_failed_read_are_still_counted() {
        let hour = 1_795_946_400 / 3600;
        let q = Quotas::default();
        q.load(&[entry("app", hour, 1)], HashMap::new());
        q.unload();
        q.applied(2, 9, &[entry("app", hour, 2)]);
        // the read failed: what was counted stays, and the batch held back counts
        let own = q.own();
        q.book().resume(own);
        assert!(q.admit(WHO, Some(4), None, at(hour)).is_ok(), "1 + 2 + 1");
        assert!(q.admit(WHO, Some(4), None, at(hour)).is_err());
    }

    #[test]
    fn maps_drop_past_windows_when_they_grow() {
        let hour = 1_795_946_400 / 3600;
        let q = Quotas::default();
        let last_month = hour - 24 * 40;
        let old: Vec<UsageEntry> = (0..50)
            .map(|i| entry(&format!("c{i}"), last_month, 1))
            .collect();
        q.load(&old, HashMap::new());
        q.book().prune_at = 10;
        assert!(q.admit(WHO, Some(5), None, at(hour)).is_ok());
        let book = q.book();
        assert!(book.stored.is_empty(), "last month's keys are gone");
        assert_eq!(book.local.len(), 1);
        assert_eq!(book.prune_at, PRUNE_AT);
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
