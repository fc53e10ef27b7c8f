//! Reading secret-backed logins again: on first use, on an interval in the background,
//! when a client's password matches no known version, and when the database refuses the
//! current one (28P01). One call per secret at a time (single flight); when Secrets Manager
//! fails, the last good versions keep serving (fail-static) and the background retries
//! with backoff.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{CredentialStore, Login, SecretSource, UserLogins};
use crate::secrets::{FetchedSecret, SecretsError, AWSCURRENT, AWSPENDING, AWSPREVIOUS};

/// Refreshes a client can trigger (its password matched no known version) happen at most
/// this often per secret, so guessing passwords cannot turn into Secrets Manager calls.
const CLIENT_REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(5);

/// Refreshes after a backend 28P01 happen at most this often per secret (later ones wait
/// for the rest of the interval), so a password that is simply wrong cannot turn every
/// backend login into Secrets Manager calls.
const BACKEND_REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(1);

/// First retry delay after a failed refresh; doubles up to the refresh interval.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// Why a secret is read again, which decides the stages asked for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Refresh {
    /// First use: the current version only.
    Load,
    /// The background interval: current and pending (a rotation in progress).
    Periodic,
    /// A client's SCRAM proof matched no known version: current and pending.
    ClientRefused,
    /// The database refused the current login (28P01): current, pending and previous.
    BackendRefused,
}

impl Refresh {
    fn stages(self) -> &'static [&'static str] {
        match self {
            Refresh::Load => &[AWSCURRENT],
            Refresh::Periodic | Refresh::ClientRefused => &[AWSCURRENT, AWSPENDING],
            Refresh::BackendRefused => &[AWSCURRENT, AWSPENDING, AWSPREVIOUS],
        }
    }
}

impl CredentialStore {
    /// Reads `user`'s secret again unless a refresh finished since the caller saw
    /// generation `seen` (then that one's result stands). Returns whether the versions may
    /// have changed since `seen`.
    pub async fn refresh(&self, user: &UserLogins, seen: u64, why: Refresh) -> bool {
        let (Some(source), Some(id)) = (&self.source, &user.secret_id) else {
            return false;
        };
        let _flight = user.fetching.lock().await;
        if user.generation() != seen {
            return true;
        }
        let since_last = user.versions().last_attempt.map(|t| t.elapsed());
        match why {
            Refresh::ClientRefused
                if since_last.is_some_and(|d| d < CLIENT_REFRESH_MIN_INTERVAL) =>
            {
                return false;
            }
            Refresh::BackendRefused => {
                if let Some(d) = since_last {
                    tokio::time::sleep(BACKEND_REFRESH_MIN_INTERVAL.saturating_sub(d)).await;
                }
            }
            _ => {}
        }
        let mut fetched = Vec::new();
        for &stage in why.stages() {
            let result = source.client.fetch(id, stage).await;
            // Unreachable or refusing: asking for the other stages would fail the same way.
            let give_up = matches!(result, Err(SecretsError::Fetch { .. }));
            fetched.push((stage, result));
            if give_up {
                break;
            }
        }
        self.apply(source, user, id, fetched);
        user.generation.fetch_add(1, Ordering::SeqCst);
        true
    }

    /// Stores what a refresh read. Runs under the user's single-flight lock.
    fn apply(
        &self,
        source: &SecretSource,
        user: &UserLogins,
        id: &str,
        fetched: Vec<(&'static str, Result<FetchedSecret, SecretsError>)>,
    ) {
        let known: Vec<Arc<Login>> = {
            let v = user.versions();
            [&v.current, &v.pending, &v.previous]
                .into_iter()
                .flatten()
                .cloned()
                .collect()
        };
        // Derive new SCRAM secrets before taking the versions lock (PBKDF2 is slow).
        let mut logins = Vec::new();
        let mut failed = false;
        for (stage, result) in fetched {
            match result {
                Ok(secret) => match login_for(&known, &user.salt, secret) {
                    Ok(login) => logins.push((stage, Some(login))),
                    Err(e) => {
                        failed = true;
                        warn!(target_name = %self.target, secret = id, stage, error = %e, "cannot use a secret version");
                    }
                },
                Err(SecretsError::NotFound { .. }) if stage != AWSCURRENT => {
                    logins.push((stage, None));
                }
                Err(e) => {
                    failed = true;
                    warn!(target_name = %self.target, secret = id, stage, error = %e, "cannot read a secret; the last good login keeps serving");
                }
            }
        }

        let now = Instant::now();
        let mut v = user.versions();
        v.last_attempt = Some(now);
        v.failures = if failed { v.failures + 1 } else { 0 };
        for (stage, login) in logins {
            match (stage, login) {
                (AWSCURRENT, Some(new)) => {
                    let old = v.current.replace(new.clone());
                    match old {
                        Some(old) if !same_version(&old, &new) => {
                            info!(
                                target_name = %self.target,
                                secret = id,
                                from = %version_hash(&old),
                                to = %version_hash(&new),
                                user_changed = old.username != new.username,
                                "secret rotation detected"
                            );
                            source
                                .metrics
                                .secret_rotations
                                .with_label_values(&[&self.target])
                                .inc();
                            source.show_version(&self.target, id, Some(&old), Some(&new));
                            v.previous_accepted_until = (!source.previous_password_grace.is_zero())
                                .then(|| now + source.previous_password_grace);
                            v.previous = Some(old);
                        }
                        Some(_) => {}
                        None => source.show_version(&self.target, id, None, Some(&new)),
                    }
                }
                (AWSPENDING, pending) => {
                    v.pending =
                        pending.filter(|p| v.current.as_ref().is_none_or(|c| !same_version(c, p)));
                }
                (AWSPREVIOUS, Some(previous))
                    if v.current
                        .as_ref()
                        .is_none_or(|c| !same_version(c, &previous)) =>
                {
                    v.previous = Some(previous);
                }
                _ => {}
            }
        }
        drop(v);
        source
            .metrics
            .credentials_stale
            .with_label_values(&[&self.target])
            .set(i64::from(self.stale()));
    }

    /// Whether the background should refresh `user` now.
    fn due(&self, user: &UserLogins, interval: Duration, now: Instant) -> bool {
        let v = user.versions();
        let Some(last) = v.last_attempt else {
            // Never loaded: read on first use, not before.
            return false;
        };
        let wait = if v.failures == 0 {
            interval
        } else {
            FIRST_RETRY
                .saturating_mul(1 << v.failures.saturating_sub(1).min(16))
                .min(interval)
        };
        now >= last + wait
    }
}

/// Refreshes `store`'s secrets every `refresh_interval` (sooner after a failure, with
/// backoff) until `shutdown`.
pub async fn keep_fresh(store: &CredentialStore, shutdown: CancellationToken) {
    let Some(source) = &store.source else {
        return;
    };
    let interval = source.refresh_interval;
    let tick = interval.min(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = tokio::time::sleep(tick) => {}
            () = shutdown.cancelled() => return,
        }
        for user in store.users.values() {
            if user.has_secret() && store.due(user, interval, Instant::now()) {
                store
                    .refresh(user, user.generation(), Refresh::Periodic)
                    .await;
            }
        }
    }
}

impl SecretSource {
    /// Moves `pgwarden_secret_version{target, secret}` from `old`'s version to `new`'s.
    pub(super) fn show_version(
        &self,
        target: &str,
        secret: &str,
        old: Option<&Login>,
        new: Option<&Login>,
    ) {
        let gauge = &self.metrics.secret_version;
        if let Some(old) = old {
            let _ = gauge.remove_label_values(&[target, secret, &version_hash(old)]);
        }
        if let Some(new) = new {
            gauge
                .with_label_values(&[target, secret, &version_hash(new)])
                .set(1);
        }
    }
}

/// The known login for `secret` if its version was seen before, else a new one.
fn login_for(
    known: &[Arc<Login>],
    salt: &[u8],
    secret: FetchedSecret,
) -> Result<Arc<Login>, super::StoreError> {
    let login = secret.login;
    if let Some(same) = known.iter().find(|k| {
        k.version_id == secret.version_id
            && k.username == login.username
            && k.password == login.password
    }) {
        return Ok(same.clone());
    }
    Login::new(salt, login.username, login.password, secret.version_id).map(Arc::new)
}

/// Same version id and the same login.
fn same_version(a: &Login, b: &Login) -> bool {
    a.version_id == b.version_id && a.same_login(b)
}

/// A short hash of a version id for metrics and logs (the id itself says nothing secret,
/// but a hash keeps labels short and uniform).
fn version_hash(login: &Login) -> String {
    let digest = Sha256::digest(login.version_id.as_deref().unwrap_or("").as_bytes());
    digest[..6].iter().map(|b| format!("{b:02x}")).collect()
}
