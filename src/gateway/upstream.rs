//! Upstream target state and choice: requests in flight (least-requests), passive ejection (a
//! per-target circuit breaker: closed, open for a while, then one half-open trial), and the
//! verdict of active health checks.
//!
//! Architecture invariant: the state of a target outlives routing-table swaps. It lives in a
//! registry keyed by tenant, API and target URL, and each new table's targets are bound to it
//! when the table is installed, so a configuration change neither forgets an ejection nor
//! resets a health verdict.

use super::routes::{Route, RouteTable, Target};
use crate::model::{Balance, Ejection};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What the gateway knows of one target of one API.
#[derive(Debug)]
pub struct TargetState {
    pub in_flight: AtomicU32,
    failures: AtomicU32,
    /// Gateway clock (ns) until which the target is ejected; 0 when it is not.
    open_until: AtomicU64,
    /// A half-open trial request is in flight.
    trial: AtomicBool,
    /// Ejections so far: an attempt begun before the last one is not judged (its late verdict
    /// neither closes nor extends an ejection it did not test).
    epoch: AtomicU32,
    /// Verdict of the active health checks (true when none are configured).
    pub healthy: AtomicBool,
    pub hc_passes: AtomicU32,
    pub hc_failures: AtomicU32,
    /// Gateway clock (ns) of the next active health check.
    pub next_check: AtomicU64,
}

impl Default for TargetState {
    fn default() -> Self {
        TargetState {
            in_flight: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            trial: AtomicBool::new(false),
            epoch: AtomicU32::new(0),
            healthy: AtomicBool::new(true),
            hc_passes: AtomicU32::new(0),
            hc_failures: AtomicU32::new(0),
            next_check: AtomicU64::new(0),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Availability {
    Yes,
    /// Ejected, and the ejection has run out: one trial request may go.
    Trial,
    No,
}

impl TargetState {
    fn availability(&self, now: u64) -> Availability {
        if !self.healthy.load(Ordering::Relaxed) {
            return Availability::No;
        }
        match self.open_until.load(Ordering::Relaxed) {
            0 => Availability::Yes,
            until if now < until => Availability::No,
            _ => Availability::Trial,
        }
    }

    /// Whether the target takes traffic now (healthy and not ejected).
    pub fn serving(&self, now: u64) -> bool {
        self.availability(now) == Availability::Yes
    }

    /// Records a good answer (`trial`: the half-open trial's); returns true when this closes
    /// an ejection.
    fn success(&self, trial: bool) -> bool {
        self.failures.store(0, Ordering::Relaxed);
        if trial {
            self.trial.store(false, Ordering::Relaxed);
        }
        self.open_until.swap(0, Ordering::Relaxed) != 0
    }

    /// Records a failed attempt (`trial`: the half-open trial's); returns true when this
    /// ejects the target.
    fn failure(&self, now: u64, rule: &Ejection, trial: bool) -> bool {
        if trial {
            self.trial.store(false, Ordering::Relaxed);
        }
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if trial || n >= rule.consecutive_failures {
            self.failures.store(0, Ordering::Relaxed);
            let until = now.saturating_add(u64::from(rule.ejection_seconds) * 1_000_000_000);
            // the ejection, then its count: an attempt that reads the count first and then
            // sees no ejection began before it (see `begin`)
            self.open_until.store(until.max(1), Ordering::SeqCst);
            self.epoch.fetch_add(1, Ordering::SeqCst);
            return true;
        }
        false
    }
}

/// One attempt on a target: counted in flight while it lives (for a good answer, until its
/// body is delivered). If it ends without a verdict (the request was cancelled, never sent, or
/// its client went away), a half-open trial it held is released so that another request can
/// make it.
pub struct Attempt {
    state: Arc<TargetState>,
    judged: bool,
    /// It is the target's half-open trial.
    trial: bool,
    /// The target's ejection count when it began.
    epoch: u32,
}

impl std::fmt::Debug for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Attempt")
    }
}

impl TargetState {
    /// Starts an attempt on this target as [`pick`] chose it (`trial`: as its half-open
    /// trial).
    pub fn begin(self: &Arc<Self>, trial: bool) -> Attempt {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut epoch = self.epoch.load(Ordering::SeqCst);
        // ejected between `pick` and here: the attempt did not test the ejected target, its
        // verdict must not count (as if begun before the ejection)
        if !trial && self.open_until.load(Ordering::SeqCst) != 0 {
            epoch = epoch.wrapping_sub(1);
        }
        Attempt {
            state: self.clone(),
            judged: false,
            trial,
            epoch,
        }
    }
}

impl Attempt {
    /// Whether this attempt is the target's half-open trial.
    pub fn is_trial(&self) -> bool {
        self.trial
    }

    /// Whether the target was ejected since this attempt began (then its verdict is not
    /// counted: it did not test the ejected target, a trial does).
    fn stale(&self) -> bool {
        !self.trial && self.state.epoch.load(Ordering::SeqCst) != self.epoch
    }

    /// A good answer; true when this closes an ejection.
    pub fn success(mut self) -> bool {
        self.judged = true;
        !self.stale() && self.state.success(self.trial)
    }

    /// A failure of the target; true when this ejects it.
    pub fn failure(mut self, now: u64, rule: &Ejection) -> bool {
        self.judged = true;
        !self.stale() && self.state.failure(now, rule, self.trial)
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
        // a trial that ends without a verdict is released: the next request makes it
        if !self.judged && self.trial {
            self.state.trial.store(false, Ordering::Relaxed);
        }
    }
}

/// Target states by `tenant/api/url`.
#[derive(Debug, Default)]
pub struct Registry {
    states: Mutex<HashMap<String, Arc<TargetState>>>,
}

impl Registry {
    /// Binds every target of `table` to its lasting state, and forgets the states of targets
    /// the table no longer has.
    pub fn bind(&self, table: &RouteTable) {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let mut kept = HashMap::with_capacity(states.len());
        for route in table.all() {
            for t in &route.targets {
                let key = format!("{}/{}/{}{}", route.tenant, route.api, t.origin, t.path);
                let state = states
                    .remove(&key)
                    .or_else(|| kept.get(&key).cloned())
                    .unwrap_or_default();
                if route.upstream.health_check.is_none() {
                    // checks removed: their last verdict no longer holds
                    state.healthy.store(true, Ordering::Relaxed);
                    state.hc_passes.store(0, Ordering::Relaxed);
                    state.hc_failures.store(0, Ordering::Relaxed);
                }
                let _ = t.state.set(state.clone());
                kept.insert(key, state);
            }
        }
        *states = kept;
    }
}

/// Chooses a target among those not yet `tried`: healthy and not ejected, or due for a
/// half-open trial (then `true`: the attempt holds the trial). `None` when every target is
/// out (the circuit is open).
pub fn pick(route: &Route, tried: &[usize], now: u64) -> Option<(usize, bool)> {
    let targets = &route.targets;
    let candidates = |want: Availability| {
        (0..targets.len())
            .filter(move |i| !tried.contains(i) && targets[*i].state().availability(now) == want)
    };
    // An ejected target whose time is up gets one trial request first, even while others
    // serve: its answer decides whether it comes back.
    if let Some(i) = candidates(Availability::Trial)
        .find(|i| !targets[*i].state().trial.swap(true, Ordering::Relaxed))
    {
        return Some((i, true));
    }
    let chosen = match route.upstream.balance {
        Balance::RoundRobin => {
            let start = route.next_slot();
            let schedule = route.schedule();
            (0..schedule.len())
                .map(|k| schedule[(start + k) % schedule.len()])
                .find(|i| !tried.contains(i) && targets[*i].state().serving(now))
        }
        Balance::LeastRequests => {
            let load = |t: &Target| {
                u64::from(t.state().in_flight.load(Ordering::Relaxed)) * 1000
                    / u64::from(t.weight.max(1))
            };
            let offset = route.next_slot();
            candidates(Availability::Yes)
                .map(|i| {
                    (
                        i,
                        (i + targets.len() - offset % targets.len()) % targets.len(),
                    )
                })
                .min_by_key(|(i, rot)| (load(&targets[*i]), *rot))
                .map(|(i, _)| i)
        }
    };
    chosen.map(|i| (i, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejection_opens_then_allows_one_trial() {
        let s = Arc::new(TargetState::default());
        let rule = Ejection {
            consecutive_failures: 2,
            ejection_seconds: 1,
        };
        // an answer still streaming when the target is ejected
        let streaming = s.begin(false);
        assert!(!s.begin(false).failure(0, &rule));
        assert!(s.begin(false).failure(0, &rule), "second failure ejects");
        assert_eq!(s.availability(500_000_000), Availability::No);
        assert_eq!(s.availability(1_000_000_001), Availability::Trial);
        // its late verdict neither closes the ejection nor holds the trial
        assert!(
            !streaming.success(),
            "a verdict from before the ejection is not counted"
        );
        // nor does one of an attempt picked just before the ejection and begun after it
        assert!(
            !s.begin(false).success(),
            "begun on an ejected target: not counted"
        );
        assert_eq!(s.availability(1_000_000_001), Availability::Trial);
        // a failed trial ejects again at once
        s.trial.store(true, Ordering::Relaxed);
        assert!(s.begin(true).failure(1_000_000_001, &rule));
        assert_eq!(s.availability(1_500_000_000), Availability::No);
        // another attempt dropped without a verdict does not release a trial it does not hold
        s.trial.store(true, Ordering::Relaxed);
        drop(s.begin(false));
        assert!(s.trial.load(Ordering::Relaxed));
        // the trial dropped without a verdict is released
        drop(s.begin(true));
        assert!(!s.trial.load(Ordering::Relaxed));
        s.trial.store(true, Ordering::Relaxed);
        assert!(s.begin(true).success(), "a good trial closes the circuit");
        assert_eq!(s.availability(1_500_000_000), Availability::Yes);
        assert!(!s.trial.load(Ordering::Relaxed));
        s.healthy.store(false, Ordering::Relaxed);
        assert_eq!(s.availability(0), Availability::No);
    }
}
