//! Quotas that keep a runaway fleet from crowding out everyone else: per IAM principal and
//! per database user, a maximum of open client connections and a rate of new ones (a token
//! bucket). Rules come from `[[quotas]]` in the configuration; the counters live here and
//! survive a reload.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgwarden_auth::rules::{glob, principal_of};

use crate::config::QuotaRule;

/// Whose quota: one IAM principal (a role, for assumed-role sessions) or one database user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Principal,
    User,
}

impl Scope {
    pub fn label(self) -> &'static str {
        match self {
            Scope::Principal => "principal",
            Scope::User => "user",
        }
    }
}

/// The limit a refused client hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Connections,
    Rate,
}

impl Limit {
    pub fn label(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::Rate => "rate",
        }
    }
}

/// A client refused by a quota; `message` names the limit and its value.
#[derive(Debug)]
pub struct Refused {
    pub scope: Scope,
    pub limit: Limit,
    pub message: String,
}

type Key = (Scope, String);

struct Counter {
    open: usize,
    tokens: f64,
    refilled: Instant,
}

/// Open connections and rate buckets per principal and per user.
#[derive(Default)]
pub struct Quotas {
    counters: Mutex<HashMap<Key, Counter>>,
}

/// Held by an admitted client; gives its connections back when dropped.
pub struct QuotaGuard {
    quotas: Arc<Quotas>,
    keys: Box<[Key]>,
}

impl Drop for QuotaGuard {
    fn drop(&mut self) {
        let mut counters = lock(&self.quotas.counters);
        for key in &self.keys {
            if let Some(c) = counters.get_mut(key) {
                c.open = c.open.saturating_sub(1);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A rule's bucket size.
fn burst(rule: &QuotaRule) -> f64 {
    match (rule.burst, rule.connections_per_second) {
        (Some(b), _) => f64::from(b),
        (None, Some(rate)) => rate.ceil().max(1.0),
        (None, None) => 0.0,
    }
}

impl Quotas {
    /// Admits a new client of `user` (and `principal`, for IAM clients) under `rules`, or
    /// says which limit it is over. A refused client changes no counter.
    pub fn admit(
        self: &Arc<Self>,
        rules: &[QuotaRule],
        principal: Option<&str>,
        user: &str,
        now: Instant,
    ) -> Result<QuotaGuard, Refused> {
        let principal = principal.map(principal_of);
        let mut applicable = Vec::new();
        if let Some(principal) = &principal {
            if let Some(rule) = rules
                .iter()
                .find(|r| r.principal.as_deref().is_some_and(|p| glob(p, principal)))
            {
                applicable.push(((Scope::Principal, principal.clone()), rule));
            }
        }
        if let Some(rule) = rules
            .iter()
            .find(|r| r.user.as_deref().is_some_and(|u| glob(u, user)))
        {
            applicable.push(((Scope::User, user.to_owned()), rule));
        }
        if applicable.is_empty() {
            return Ok(QuotaGuard {
                quotas: self.clone(),
                keys: Box::default(),
            });
        }
        let mut counters = lock(&self.counters);
        for (key, rule) in &applicable {
            let counter = counters.entry(key.clone()).or_insert_with(|| Counter {
                open: 0,
                tokens: burst(rule),
                refilled: now,
            });
            if let Some(rate) = rule.connections_per_second {
                let elapsed = now
                    .saturating_duration_since(counter.refilled)
                    .as_secs_f64();
                counter.tokens = (counter.tokens + elapsed * rate).min(burst(rule));
                counter.refilled = now;
            }
            if let Some(max) = rule.max_connections {
                if counter.open >= max {
                    return Err(Refused {
                        scope: key.0,
                        limit: Limit::Connections,
                        message: format!(
                            "quota exceeded: {} {} already has {} connections open, its max_connections",
                            key.0.label(),
                            key.1,
                            max
                        ),
                    });
                }
            }
            if let Some(rate) = rule.connections_per_second {
                if counter.tokens < 1.0 {
                    return Err(Refused {
                        scope: key.0,
                        limit: Limit::Rate,
                        message: format!(
                            "quota exceeded: {} {} opens connections faster than its connections_per_second ({rate}, burst {})",
                            key.0.label(),
                            key.1,
                            burst(rule)
                        ),
                    });
                }
            }
        }
        for (key, rule) in &applicable {
            if let Some(c) = counters.get_mut(key) {
                c.open += 1;
                if rule.connections_per_second.is_some() {
                    c.tokens -= 1.0;
                }
            }
        }
        Ok(QuotaGuard {
            quotas: self.clone(),
            keys: applicable.into_iter().map(|(key, _)| key).collect(),
        })
    }

    /// Forgets counters with no open connection whose bucket has refilled, so the map
    /// holds only principals and users active lately.
    pub fn prune(&self, now: Instant, idle_for: Duration) {
        lock(&self.counters)
            .retain(|_, c| c.open > 0 || now.saturating_duration_since(c.refilled) < idle_for);
    }

    /// Open connections counted for `scope` / `name` (for the console and tests).
    pub fn open(&self, scope: Scope, name: &str) -> usize {
        lock(&self.counters)
            .get(&(scope, name.to_owned()))
            .map_or(0, |c| c.open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(principal: Option<&str>, user: Option<&str>) -> QuotaRule {
        QuotaRule {
            principal: principal.map(str::to_owned),
            user: user.map(str::to_owned),
            max_connections: None,
            connections_per_second: None,
            burst: None,
        }
    }

    const ROLE_SESSION: &str = "arn:aws:sts::111122223333:assumed-role/orders/fn-1";

    #[test]
    fn each_principal_gets_its_own_connection_limit_and_a_refusal_changes_nothing() {
        let quotas = Arc::new(Quotas::default());
        let rules = vec![QuotaRule {
            max_connections: Some(2),
            ..rule(Some("arn:aws:iam::111122223333:role/*"), None)
        }];
        let now = Instant::now();
        let a = quotas
            .admit(&rules, Some(ROLE_SESSION), "app", now)
            .expect("1st");
        let other_session = "arn:aws:sts::111122223333:assumed-role/orders/fn-2";
        let b = quotas
            .admit(&rules, Some(other_session), "app", now)
            .expect("2nd");
        let refused = quotas
            .admit(&rules, Some(ROLE_SESSION), "app", now)
            .err()
            .expect("the role's third connection is refused");
        assert_eq!(
            (refused.scope, refused.limit),
            (Scope::Principal, Limit::Connections)
        );
        assert!(
            refused.message.contains("role/orders"),
            "{}",
            refused.message
        );
        let other_role = "arn:aws:sts::111122223333:assumed-role/reports/fn-1";
        let _c = quotas
            .admit(&rules, Some(other_role), "app", now)
            .expect("another role has its own quota");
        assert_eq!(
            quotas.open(Scope::Principal, "arn:aws:iam::111122223333:role/orders"),
            2
        );
        drop(a);
        drop(b);
        assert_eq!(
            quotas.open(Scope::Principal, "arn:aws:iam::111122223333:role/orders"),
            0
        );
        quotas
            .admit(&rules, Some(ROLE_SESSION), "app", now)
            .expect("room again after disconnects");
    }

    #[test]
    fn the_rate_is_a_token_bucket_per_user() {
        let quotas = Arc::new(Quotas::default());
        let rules = vec![QuotaRule {
            connections_per_second: Some(2.0),
            burst: Some(3),
            ..rule(None, Some("app*"))
        }];
        let t0 = Instant::now();
        let guards: Vec<_> = (0..3)
            .map(|_| quotas.admit(&rules, None, "app", t0).expect("within burst"))
            .collect();
        let refused = quotas
            .admit(&rules, None, "app", t0)
            .err()
            .expect("over the burst");
        assert_eq!((refused.scope, refused.limit), (Scope::User, Limit::Rate));
        quotas
            .admit(&rules, None, "other", t0)
            .expect("a user no rule matches is not limited");
        quotas
            .admit(&rules, None, "app", t0 + Duration::from_millis(500))
            .expect("one token back after half a second");
        assert!(quotas
            .admit(&rules, None, "app", t0 + Duration::from_millis(500))
            .is_err());
        drop(guards);
    }

    #[test]
    fn prune_forgets_only_quiet_counters() {
        let quotas = Arc::new(Quotas::default());
        let rules = vec![QuotaRule {
            max_connections: Some(5),
            ..rule(None, Some("*"))
        }];
        let now = Instant::now();
        let held = quotas.admit(&rules, None, "a", now).expect("a");
        drop(quotas.admit(&rules, None, "b", now).expect("b"));
        quotas.prune(now + Duration::from_secs(120), Duration::from_secs(60));
        assert_eq!(
            lock(&quotas.counters).len(),
            1,
            "only the user with an open connection stays"
        );
        drop(held);
    }
}
