//! Policy arithmetic as plain functions over data, with time passed in: GCRA rate limiting,
//! quota windows, client address filters.
//!
//! Architecture invariant: no clock, no IO, no lock; the proxy owns the state and the time.

use std::net::IpAddr;

/// GCRA (generic cell rate algorithm) for "`requests` per `per_seconds`", allowing a burst of
/// `requests`. The state of one key is its theoretical arrival time (TAT), in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    interval_ns: u64,
    tolerance_ns: u64,
    pub requests: u32,
    pub per_seconds: u32,
}

/// The outcome of a rate-limit check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Allowed; `remaining` requests are left in the window, which refills in `reset_secs`.
    Allow { remaining: u32, reset_secs: u64 },
    /// Refused; retry after this many seconds (at least 1).
    Deny { retry_after_secs: u64 },
}

impl Gcra {
    pub fn new(requests: u32, per_seconds: u32) -> Gcra {
        let period = u64::from(per_seconds.max(1)) * 1_000_000_000;
        let interval = period / u64::from(requests.max(1));
        Gcra {
            interval_ns: interval.max(1),
            tolerance_ns: period.saturating_sub(interval),
            requests: requests.max(1),
            per_seconds: per_seconds.max(1),
        }
    }

    /// Checks one request at `now_ns` against the key's state `tat`, updating it when allowed.
    pub fn check(&self, tat: &mut u64, now_ns: u64) -> Decision {
        let start = (*tat).max(now_ns);
        if start - now_ns > self.tolerance_ns {
            let wait = start - now_ns - self.tolerance_ns;
            return Decision::Deny {
                retry_after_secs: wait.div_ceil(1_000_000_000).max(1),
            };
        }
        let new_tat = start + self.interval_ns;
        *tat = new_tat;
        let used = new_tat - now_ns; // time "owed", at most tolerance + interval
        let free = (self.tolerance_ns + self.interval_ns).saturating_sub(used);
        Decision::Allow {
            remaining: u32::try_from(free / self.interval_ns).unwrap_or(u32::MAX),
            reset_secs: used.div_ceil(1_000_000_000),
        }
    }
}

/// Whether `ip` is inside `cidr` (`10.0.0.0/8`, `2001:db8::/32` or a single address).
pub fn cidr_contains(cidr: &str, ip: IpAddr) -> bool {
    let (addr, len) = match cidr.split_once('/') {
        Some((a, l)) => (a, l.parse::<u32>().ok()),
        None => (cidr, None),
    };
    let Ok(net) = addr.parse::<IpAddr>() else {
        return false;
    };
    let ip = match (net, ip) {
        (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        _ => ip,
    };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let len = len.unwrap_or(32).min(32);
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let len = len.unwrap_or(128).min(128);
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

/// The IP filter decision: denied if in `deny`, else allowed if `allow` is empty or holds it.
pub fn ip_allowed(allow: &[String], deny: &[String], ip: IpAddr) -> bool {
    if deny.iter().any(|c| cidr_contains(c, ip)) {
        return false;
    }
    allow.is_empty() || allow.iter().any(|c| cidr_contains(c, ip))
}

/// The client's address: the TCP peer, unless the peer is a trusted proxy, in which case the
/// right-most address of `X-Forwarded-For` that is not itself a trusted proxy. A header that
/// does not parse is ignored (the peer is then the client).
pub fn client_address(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[String]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| cidr_contains(c, ip));
    if !is_trusted(peer) {
        return peer;
    }
    let Some(header) = forwarded_for else {
        return peer;
    };
    let chain: Option<Vec<IpAddr>> = header.split(',').map(|a| a.trim().parse().ok()).collect();
    let Some(chain) = chain else {
        return peer;
    };
    chain
        .iter()
        .rev()
        .find(|ip| !is_trusted(**ip))
        .or(chain.first())
        .copied()
        .unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn gcra_allows_the_burst_then_refuses_until_refilled() {
        let g = Gcra::new(3, 1);
        let mut tat = 0;
        let now = 100 * S;
        for left in [2, 1, 0] {
            assert!(
                matches!(g.check(&mut tat, now), Decision::Allow { remaining, .. } if remaining == left)
            );
        }
        assert_eq!(
            g.check(&mut tat, now),
            Decision::Deny {
                retry_after_secs: 1
            }
        );
        // one interval later, one more request fits
        assert!(matches!(
            g.check(&mut tat, now + S / 3 + 1),
            Decision::Allow { .. }
        ));
        assert!(matches!(
            g.check(&mut tat, now + S / 3 + 2),
            Decision::Deny { .. }
        ));
        // a full period later, the whole burst again
        let mut fresh = tat;
        assert!(matches!(
            g.check(&mut fresh, now + 3 * S),
            Decision::Allow { remaining: 2, .. }
        ));
    }

    #[test]
    fn gcra_retry_after_covers_the_wait() {
        let g = Gcra::new(1, 60);
        let mut tat = 0;
        assert!(matches!(
            g.check(&mut tat, 10 * S),
            Decision::Allow { remaining: 0, .. }
        ));
        assert_eq!(
            g.check(&mut tat, 10 * S),
            Decision::Deny {
                retry_after_secs: 60
            }
        );
        assert_eq!(
            g.check(&mut tat, 40 * S),
            Decision::Deny {
                retry_after_secs: 30
            }
        );
    }

    #[test]
    fn client_address_trusts_only_configured_proxies() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let trusted = vec!["10.0.0.0/8".to_string()];
        // an untrusted peer's header is ignored
        assert_eq!(
            client_address(ip("203.0.113.9"), Some("1.2.3.4"), &trusted),
            ip("203.0.113.9")
        );
        // a trusted proxy's header names the client; proxies in the chain are skipped
        assert_eq!(
            client_address(ip("10.0.0.1"), Some("198.51.100.7, 10.0.0.2"), &trusted),
            ip("198.51.100.7")
        );
        // a client cannot pass itself off by prepending an address: the right-most untrusted wins
        assert_eq!(
            client_address(ip("10.0.0.1"), Some("1.1.1.1, 198.51.100.7"), &trusted),
            ip("198.51.100.7")
        );
        assert_eq!(
            client_address(ip("10.0.0.1"), Some("garbage"), &trusted),
            ip("10.0.0.1")
        );
        assert_eq!(
            client_address(ip("10.0.0.1"), None, &trusted),
            ip("10.0.0.1")
        );
        assert_eq!(
            client_address(ip("10.0.0.1"), Some("10.0.0.3"), &trusted),
            ip("10.0.0.3")
        );
    }

    #[test]
    fn cidrs_v4_v6_and_mapped() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(cidr_contains("10.0.0.0/8", ip("10.1.2.3")));
        assert!(!cidr_contains("10.0.0.0/8", ip("11.0.0.1")));
        assert!(cidr_contains("10.0.0.0/8", ip("::ffff:10.9.9.9")));
        assert!(cidr_contains("2001:db8::/32", ip("2001:db8:1::1")));
        assert!(!cidr_contains("2001:db8::/32", ip("2001:db9::1")));
        assert!(cidr_contains("0.0.0.0/0", ip("8.8.8.8")));
        assert!(cidr_contains("127.0.0.1", ip("127.0.0.1")));
        assert!(ip_allowed(&[], &["10.0.0.0/8".into()], ip("127.0.0.1")));
        assert!(!ip_allowed(&["10.0.0.0/8".into()], &[], ip("127.0.0.1")));
        assert!(!ip_allowed(
            &["0.0.0.0/0".into()],
            &["127.0.0.0/8".into()],
            ip("127.0.0.1")
        ));
    }
}
