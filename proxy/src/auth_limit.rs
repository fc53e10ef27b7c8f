//! Rate limits on failed authentications, per source address and per database user, so
//! password or token guessing is slow and one bad actor cannot exhaust the proxy. A key
//! over its limit is refused before any exchange until its window ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most keys tracked at once; beyond that the oldest windows are dropped.
const MAX_KEYS: usize = 100_000;

/// What is limited: a source address or a database user.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    Address(IpAddr),
    User(String),
}

impl Scope {
    pub fn label(&self) -> &'static str {
        match self {
            Scope::Address(_) => "address",
            Scope::User(_) => "user",
        }
    }
}

/// Failed authentications per key in fixed windows.
pub struct AuthLimiter {
    max_failures: u32,
    window: Duration,
    failures: Mutex<HashMap<Scope, (Instant, u32)>>,
}

impl AuthLimiter {
    /// At most `max_failures` failed authentications per key per `window`; 0 disables.
    pub fn new(max_failures: u32, window: Duration) -> Self {
        Self {
            max_failures,
            window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Scope, (Instant, u32)>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The first of `scopes` that is over its limit now, if any.
    pub fn blocked(&self, scopes: &[Scope], now: Instant) -> Option<Scope> {
        if self.max_failures == 0 {
            return None;
        }
        let failures = self.lock();
        scopes
            .iter()
            .find(|s| {
                failures.get(*s).is_some_and(|(start, count)| {
                    now < *start + self.window && *count >= self.max_failures
                })
            })
            .cloned()
    }

    /// Counts a failed authentication against every scope.
    pub fn record_failure(&self, scopes: &[Scope], now: Instant) {
        if self.max_failures == 0 {
            return;
        }
        let mut failures = self.lock();
        if failures.len() >= MAX_KEYS {
            let window = self.window;
            failures.retain(|_, (start, _)| now < *start + window);
        }
        for scope in scopes {
            let entry = failures.entry(scope.clone()).or_insert((now, 0));
            if now >= entry.0 + self.window {
                *entry = (now, 0);
            }
            entry.1 = entry.1.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_the_limit_until_the_window_ends() {
        let limiter = AuthLimiter::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        let ip = Scope::Address("10.0.0.1".parse().expect("ip"));
        let user = Scope::User("app".into());
        let scopes = [ip.clone(), user.clone()];
        assert_eq!(limiter.blocked(&scopes, t0), None);
        limiter.record_failure(&scopes, t0);
        limiter.record_failure(&scopes, t0);
        assert_eq!(limiter.blocked(&scopes, t0), Some(ip.clone()));
        let other_ip = Scope::Address("10.0.0.2".parse().expect("ip"));
        assert_eq!(
            limiter.blocked(&[other_ip.clone(), Scope::User("b".into())], t0),
            None
        );
        assert_eq!(limiter.blocked(&[other_ip, user.clone()], t0), Some(user));
        assert_eq!(limiter.blocked(&scopes, t0 + Duration::from_secs(61)), None);
        assert_eq!(
            AuthLimiter::new(0, Duration::from_secs(1)).blocked(&scopes, t0),
            None
        );
    }
}
