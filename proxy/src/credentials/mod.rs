//! The database logins a target uses, and the SCRAM secrets clients authenticate against.
//!
//! In native password mode a client proves it knows the same password pgwarden uses to log
//! in to the database (like a managed proxy's native auth). Each client-facing user has up
//! to three versions of its login, as Secrets Manager stages them during a rotation:
//! current, pending and previous. The SCRAM secret of each version is derived once, when the
//! version is first seen (PBKDF2 is deliberately slow), and all versions of one user share
//! its salt so one exchange can accept any of them.

mod refresh;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pgwarden_auth::{FileCredentials, ScramSecret, Secret};

use crate::config::SecretRef;
use crate::metrics::Metrics;
use crate::secrets::{SecretsError, SecretsManager, AWSCURRENT};

pub use refresh::{keep_fresh, Refresh};

/// Iterations for the SCRAM secrets pgwarden derives; Postgres's default.
const SCRAM_ITERATIONS: u32 = 4096;

/// One version of a login: the database user and password pgwarden logs in with.
pub struct Login {
    /// The database user (with the alternating-users strategy it differs between versions).
    pub username: String,
    pub password: Secret,
    scram: ScramSecret,
    /// Secrets Manager's version id; `None` for the `file` provider.
    version_id: Option<String>,
}

impl Login {
    fn new(
        salt: &[u8],
        username: String,
        password: Secret,
        version_id: Option<String>,
    ) -> Result<Self, StoreError> {
        let scram =
            ScramSecret::from_password(password.expose(), salt, SCRAM_ITERATIONS).map_err(|e| {
                StoreError::Scram {
                    user: username.clone(),
                    reason: e.to_string(),
                }
            })?;
        Ok(Self {
            username,
            password,
            scram,
            version_id,
        })
    }

    /// Same database user and password (whatever the version says).
    pub fn same_login(&self, other: &Login) -> bool {
        self.username == other.username && self.password == other.password
    }
}

/// The versions pgwarden knows of one client-facing user's login.
#[derive(Default)]
struct Versions {
    current: Option<Arc<Login>>,
    /// Staged by a rotation in progress (`AWSPENDING` on a version that is not current).
    pending: Option<Arc<Login>>,
    /// The version current before the last rotation.
    previous: Option<Arc<Login>>,
    /// Until when clients may still authenticate with `previous`.
    previous_accepted_until: Option<Instant>,
    /// The login Postgres last refused (28P01): skipped while another is known, so a
    /// rotation window does not cost every new backend connection a refused attempt.
    refused: Option<Arc<Login>>,
    /// When Secrets Manager was last asked, and how many refreshes in a row failed.
    last_attempt: Option<Instant>,
    failures: u32,
}

/// One client-facing user: where its login comes from and the versions known.
pub struct UserLogins {
    /// The secret (name or ARN) holding the login; `None` for the `file` provider.
    secret_id: Option<String>,
    /// The salt every version's SCRAM secret uses.
    salt: [u8; 16],
    versions: Mutex<Versions>,
    /// Held while Secrets Manager is asked for this secret: concurrent refreshes wait for
    /// the one in flight instead of making their own call (single flight).
    fetching: tokio::sync::Mutex<()>,
    /// Counts finished refresh attempts; a waiter that sees it move knows its refresh
    /// was done by someone else.
    generation: AtomicU64,
}

impl UserLogins {
    fn new(secret_id: Option<String>, salt: [u8; 16], current: Option<Login>) -> Self {
        Self {
            secret_id,
            salt,
            versions: Mutex::new(Versions {
                current: current.map(Arc::new),
                ..Versions::default()
            }),
            fetching: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
        }
    }

    fn versions(&self) -> MutexGuard<'_, Versions> {
        self.versions.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The current version.
    pub fn current(&self) -> Option<Arc<Login>> {
        self.versions().current.clone()
    }

    /// The login to try first: current, unless Postgres refused it and a pending or
    /// previous version is known.
    pub fn preferred(&self) -> Option<Arc<Login>> {
        let v = self.versions();
        let refused = |l: &&Arc<Login>| v.refused.as_ref().is_some_and(|r| r.same_login(l));
        let preferred = [&v.current, &v.pending, &v.previous]
            .into_iter()
            .flatten()
            .find(|l| !refused(l))
            .or(v.current.as_ref())
            .cloned();
        preferred
    }

    /// Remembers that Postgres refused `login`'s password.
    pub fn mark_refused(&self, login: &Arc<Login>) {
        self.versions().refused = Some(login.clone());
    }

    /// Every login worth trying after the current one was refused: current, pending,
    /// previous.
    pub fn candidates(&self) -> Vec<(&'static str, Arc<Login>)> {
        let v = self.versions();
        [
            ("refetched", &v.current),
            ("pending", &v.pending),
            ("previous", &v.previous),
        ]
        .into_iter()
        .filter_map(|(via, login)| login.clone().map(|l| (via, l)))
        .collect()
    }

    /// The SCRAM secrets a client may prove: current, pending, and previous during its
    /// grace period. Empty when no version is known.
    pub fn scram_secrets(&self, now: Instant) -> Vec<ScramSecret> {
        let v = self.versions();
        let previous = v
            .previous
            .as_ref()
            .filter(|_| v.previous_accepted_until.is_some_and(|until| now < until));
        [v.current.as_ref(), v.pending.as_ref(), previous]
            .into_iter()
            .flatten()
            .map(|l| l.scram.clone())
            .collect()
    }

    pub fn has_secret(&self) -> bool {
        self.secret_id.is_some()
    }
}

/// Every login a target knows, by client-facing user name.
pub struct CredentialStore {
    target: String,
    users: HashMap<String, Arc<UserLogins>>,
    /// Keys the per-user SCRAM salts, including those of the fake exchange run for unknown
    /// users, so a probe cannot tell a missing user from a wrong password.
    mock_key: [u8; 32],
    /// Where secret-backed logins are refreshed from.
    source: Option<SecretSource>,
    /// SHA-256 of the users file a `file` provider was loaded from, to tell whether a
    /// reload must read it again.
    file_digest: Option<[u8; 32]>,
}

/// The `secretsmanager` provider's client and settings.
struct SecretSource {
    client: SecretsManager,
    refresh_interval: Duration,
    previous_password_grace: Duration,
    metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    File(#[from] pgwarden_auth::CredentialsError),
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    #[error("cannot derive the SCRAM secret of user {user:?}: {reason}")]
    Scram { user: String, reason: String },
    #[error("two secrets give clients the same user name {0:?}")]
    DuplicateUser(String),
}

/// Settings of the `secretsmanager` provider.
pub struct SecretSettings<'a> {
    pub secrets: &'a [SecretRef],
    pub refresh_interval: Duration,
    pub previous_password_grace: Duration,
}

impl CredentialStore {
    /// Loads a `file` provider.
    pub fn from_file(target: &str, path: &Path) -> Result<Self, StoreError> {
        let digest = file_digest(path);
        let mut store = Self::from_users(target, &FileCredentials::load(path)?)?;
        store.file_digest = digest;
        Ok(store)
    }

    /// Whether the users file at `path` differs from the one this store was loaded from.
    pub fn file_changed(&self, path: &Path) -> bool {
        self.file_digest.is_some() && file_digest(path) != self.file_digest
    }

    pub fn from_users(target: &str, file: &FileCredentials) -> Result<Self, StoreError> {
        let mut store = Self::empty(target);
        for user in file.users() {
            let salt = store.salt(&user.name);
            let login = Login::new(&salt, user.name.clone(), user.password.clone(), None)?;
            store.insert(user.name.clone(), UserLogins::new(None, salt, Some(login)))?;
        }
        Ok(store)
    }

    /// A `secretsmanager` provider. Secrets named by id alone are read now (their
    /// `username` is the client-facing name); those with a `user` are read on first use.
    pub async fn from_secrets(
        target: &str,
        client: SecretsManager,
        settings: SecretSettings<'_>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let source = SecretSource {
            client,
            refresh_interval: settings.refresh_interval,
            previous_password_grace: settings.previous_password_grace,
            metrics,
        };
        let mut store = Self::empty(target);
        for secret in settings.secrets {
            let (user, current) = match secret {
                SecretRef::Id(id) => {
                    let fetched = source.client.fetch(id, AWSCURRENT).await?;
                    let user = fetched.login.username.clone();
                    let salt = store.salt(&user);
                    let login = Login::new(
                        &salt,
                        fetched.login.username,
                        fetched.login.password,
                        fetched.version_id,
                    )?;
                    (user, Some(login))
                }
                SecretRef::Named { user, .. } => (user.clone(), None),
            };
            let salt = store.salt(&user);
            let loaded = current.is_some();
            let logins = UserLogins::new(Some(secret.id().to_owned()), salt, current);
            if loaded {
                let mut v = logins.versions();
                v.last_attempt = Some(Instant::now());
                drop(v);
                source.show_version(target, secret.id(), None, logins.current().as_deref());
            }
            store.insert(user, logins)?;
        }
        store.source = Some(source);
        Ok(store)
    }

    fn empty(target: &str) -> Self {
        let mut mock_key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut mock_key);
        Self {
            target: target.to_owned(),
            users: HashMap::new(),
            mock_key,
            source: None,
            file_digest: None,
        }
    }

    fn salt(&self, user: &str) -> [u8; 16] {
        pgwarden_auth::scram::user_salt(&self.mock_key, user)
    }

    fn insert(&mut self, user: String, logins: UserLogins) -> Result<(), StoreError> {
        if self.users.contains_key(&user) {
            return Err(StoreError::DuplicateUser(user));
        }
        self.users.insert(user, Arc::new(logins));
        Ok(())
    }

    /// The logins of client-facing `user`, read from Secrets Manager first if they were
    /// never loaded (one call however many logins wait for it). `None` for an unknown
    /// user; an empty current version if the secret cannot be read.
    pub async fn user(&self, user: &str) -> Option<Arc<UserLogins>> {
        let logins = self.users.get(user)?.clone();
        if logins.current().is_none() {
            self.refresh(&logins, logins.generation(), Refresh::Load)
                .await;
        }
        Some(logins)
    }

    /// Reads every secret not read yet (for `check-config`); names those that could not be
    /// read (the log says why).
    pub async fn load_all(&self) -> Result<(), String> {
        let mut missing = Vec::new();
        for (name, logins) in &self.users {
            if self.user(name).await.is_some() && logins.current().is_none() {
                missing.push(format!(
                    "user {name:?}: secret {:?} could not be read",
                    logins.secret_id.as_deref().unwrap_or_default()
                ));
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing.join("; "))
        }
    }

    pub fn mock_key(&self) -> &[u8] {
        &self.mock_key
    }

    /// Whether `user` is one of this provider's client-facing user names.
    pub fn knows(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Whether every secret-backed user has a login: false when one could never be read.
    pub fn usable(&self) -> bool {
        self.users.values().all(|u| {
            let v = u.versions();
            v.current.is_some() || v.last_attempt.is_none()
        })
    }

    /// Whether some login is being served from cache because refreshing it fails.
    pub fn stale(&self) -> bool {
        self.users.values().any(|u| u.versions().failures > 0)
    }
}

fn file_digest(path: &Path) -> Option<[u8; 32]> {
    use sha2::Digest;
    std::fs::read(path)
        .ok()
        .map(|bytes| sha2::Sha256::digest(bytes).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login(user: &str, password: &str, version: &str) -> Arc<Login> {
        let login = Login::new(&[7; 16], user.into(), password.into(), Some(version.into()));
        Arc::new(login.expect("derive"))
    }

    #[test]
    fn a_refused_current_login_gives_way_to_the_pending_one() {
        let user = UserLogins::new(Some("s".into()), [7; 16], None);
        let (old, new) = (login("app", "old", "v1"), login("app", "new", "v2"));
        {
            let mut v = user.versions();
            v.current = Some(old.clone());
            v.pending = Some(new.clone());
        }
        assert!(Arc::ptr_eq(&user.preferred().expect("some"), &old));
        user.mark_refused(&old);
        assert!(Arc::ptr_eq(&user.preferred().expect("some"), &new));
        user.mark_refused(&new);
        assert!(
            Arc::ptr_eq(&user.preferred().expect("some"), &old),
            "with every login refused, the current one is tried again"
        );
    }

    #[test]
    fn the_previous_password_counts_only_during_its_grace_period() {
        let user = UserLogins::new(Some("s".into()), [7; 16], None);
        let now = Instant::now();
        {
            let mut v = user.versions();
            v.current = Some(login("app", "new", "v2"));
            v.previous = Some(login("app", "old", "v1"));
        }
        assert_eq!(user.scram_secrets(now).len(), 1, "grace off by default");
        user.versions().previous_accepted_until = Some(now + Duration::from_secs(60));
        assert_eq!(user.scram_secrets(now).len(), 2);
        assert_eq!(user.scram_secrets(now + Duration::from_secs(61)).len(), 1);
    }

    #[test]
    fn every_user_gets_its_own_salt_derived_like_an_unknown_users() {
        let file = FileCredentials::from_toml_str(
            "[[users]]\nname = \"alice\"\npassword = \"a\"\n[[users]]\nname = \"bob\"\npassword = \"b\"\n",
        )
        .expect("valid");
        let store = CredentialStore::from_users("t", &file).expect("store");
        let salt = |user: &str| {
            store.users[user]
                .current()
                .expect("loaded")
                .scram
                .salt()
                .to_vec()
        };
        let (alice, bob) = (salt("alice"), salt("bob"));
        assert_ne!(
            alice, bob,
            "a shared salt would tell real users from unknown ones"
        );
        let derived = pgwarden_auth::scram::user_salt(store.mock_key(), "alice");
        assert_eq!(alice, derived.to_vec());
    }
}
