//! The state every session shares, passed explicitly (never through globals).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;

use pgwarden_auth::rds_token::{RdsTokenVerifier, VerificationKey};
use pgwarden_auth::Secret;

use tokio_util::sync::CancellationToken;

use crate::cancel::CancelRegistry;
use crate::config::{Config, IamConfig, IamVerifier};
use crate::credentials::{CredentialStore, SecretSettings, StoreError};
use crate::metrics::Metrics;
use crate::parking::{ParkingLot, ParkingMetrics};
use crate::pool::Target;
use crate::tls::{self, ServerTls, TlsError};
use pgwarden_auth::sts_token::Endpoint;

/// Why the shared state could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Credentials(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("iam.sts_endpoints: {0}")]
    StsEndpoint(String),
    #[error("IAM key {access_key_id}: environment variable {variable} is not set")]
    IamKey {
        access_key_id: String,
        variable: String,
    },
    #[error("cannot start the thread that watches parked clients: {0}")]
    Parking(std::io::Error),
}

/// How tokens are verified.
pub enum TokenVerifier {
    RdsToken(RdsTokenVerifier),
    Sts(crate::sts::StsVerifier),
}

impl TokenVerifier {
    /// The principal ARN a valid token for `db_user` stands for.
    pub async fn verify(
        &self,
        token: &str,
        db_user: &str,
    ) -> Result<String, pgwarden_auth::rds_token::TokenError> {
        let now = std::time::SystemTime::now();
        match self {
            TokenVerifier::RdsToken(v) => v.verify(token, db_user, now).map(|v| v.principal),
            TokenVerifier::Sts(v) => v.verify(token, db_user, now).await,
        }
    }
}

/// IAM authentication as configured: the token verifier and the authorization rules.
pub struct Iam {
    pub verifier: TokenVerifier,
    pub rules: Vec<pgwarden_auth::rules::Rule>,
    pub allow_plaintext_on_loopback: bool,
}

impl Iam {
    fn new(config: &IamConfig, metrics: &Metrics) -> Result<Self, AppError> {
        let verifier = match config.verifier {
            IamVerifier::RdsToken => TokenVerifier::RdsToken(Self::rds_verifier(config)?),
            IamVerifier::Sts => {
                let mut allowed = Endpoint::aws(&config.sts_regions);
                for endpoint in &config.sts_endpoints {
                    allowed.push(Endpoint::parse(endpoint).map_err(AppError::StsEndpoint)?);
                }
                TokenVerifier::Sts(crate::sts::StsVerifier::new(
                    allowed,
                    config.server_id.clone().unwrap_or_default(),
                    config.sts_timeout,
                    config.max_clock_skew,
                    metrics.sts_requests.clone(),
                ))
            }
        };
        Ok(Self {
            verifier,
            rules: config.rules.clone(),
            allow_plaintext_on_loopback: config.allow_plaintext_on_loopback,
        })
    }

    fn rds_verifier(config: &IamConfig) -> Result<RdsTokenVerifier, AppError> {
        let mut keys = HashMap::new();
        for key in &config.keys {
            let secret =
                std::env::var(&key.secret_access_key_env).map_err(|_| AppError::IamKey {
                    access_key_id: key.access_key_id.clone(),
                    variable: key.secret_access_key_env.clone(),
                })?;
            keys.insert(
                key.access_key_id.clone(),
                VerificationKey {
                    secret: Secret::new(secret),
                    principal: key.principal.clone(),
                },
            );
        }
        Ok(RdsTokenVerifier::new(
            keys,
            &config.advertised_hosts,
            config.max_clock_skew,
        ))
    }
}

/// What a reload replaces: the configuration and everything built from it.
pub struct Live {
    pub config: Config,
    pub targets: Vec<Arc<Target>>,
    /// IAM authentication, if configured.
    pub iam: Option<Arc<Iam>>,
}

impl Live {
    /// The target serving client database `database`.
    pub fn target_for(&self, database: &str) -> Option<&Arc<Target>> {
        self.config.target_for(database).map(|i| &self.targets[i])
    }
}

pub struct App {
    live: ArcSwap<Live>,
    /// The file the configuration came from, read again by a reload.
    pub config_path: Option<PathBuf>,
    pub metrics: Arc<Metrics>,
    pub cancels: Arc<CancelRegistry>,
    /// The TLS offered to clients, if configured.
    pub tls: Option<ServerTls>,
    /// Failed-authentication limits per address and user.
    pub auth_limiter: crate::auth_limit::AuthLimiter,
    /// Connections and connection rates per principal and user.
    pub quotas: Arc<crate::quotas::Quotas>,
    /// Idle clients waiting without a task.
    pub parking: ParkingLot,
    /// Permits for `max_client_connections`, held by every client.
    pub client_slots: Arc<Semaphore>,
    client_slots_debt: AtomicUsize,
    /// While true (the console's PAUSE), transactions do not start.
    paused: tokio::sync::watch::Sender<bool>,
    /// The same, read on every transaction's start without a lock.
    paused_now: std::sync::atomic::AtomicBool,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
    /// Cancelled when pgwarden begins shutting down: idle sessions close at once.
    pub shutdown: CancellationToken,
    /// Children of `shutdown` that clients between transactions wait on, a shard each:
    /// waiting registers with the token's lock, and one lock taken by every client on
    /// every transaction bounced between the worker threads.
    shutdown_shards: Box<[CancellationToken]>,
}

/// How many [`App::shutdown_shard`]s there are.
const SHUTDOWN_SHARDS: usize = 64;

/// Why a reload was refused; the configuration in force stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("pgwarden was not started from a configuration file")]
    NoFile,
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    App(#[from] AppError),
    #[error("require_tls = true needs TLS, which pgwarden was started without: a reload cannot add [server.tls]; restart to enable it")]
    TlsNeedsRestart,
}

impl App {
    /// Builds the shared state: loads every target's credentials and the TLS material.
    pub async fn new(config: Config) -> Result<Arc<Self>, AppError> {
        Self::build(config, None).await
    }

    /// Like [`App::new`], remembering the file so that SIGHUP and RELOAD can read it again.
    pub async fn from_file(config: Config, path: PathBuf) -> Result<Arc<Self>, AppError> {
        Self::build(config, Some(path)).await
    }

    async fn build(config: Config, config_path: Option<PathBuf>) -> Result<Arc<Self>, AppError> {
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let mut targets = Vec::new();
        for t in &config.targets {
            targets.push(build_target(t, &metrics, &shutdown).await?);
        }
        let iam = config
            .iam
            .as_ref()
            .map(|c| Iam::new(c, &metrics).map(Arc::new))
            .transpose()?;
        let auth_limiter = crate::auth_limit::AuthLimiter::new(
            config.server.max_auth_failures,
            config.server.auth_failure_window,
        );
        let tls = match &config.server.tls {
            Some(t) => Some(ServerTls::load(&t.cert_path, &t.key_path)?),
            None => None,
        };
        let cancels = Arc::new(CancelRegistry::new(config.cluster.instance_id));
        let parking = ParkingLot::start(ParkingMetrics {
            parked: metrics.client_connections_parked.clone(),
            parks: metrics.client_parks.clone(),
            trims: metrics.memory_trims.clone(),
        })
        .map_err(AppError::Parking)?;
        Ok(Arc::new(Self {
            client_slots: Arc::new(Semaphore::new(config.server.max_client_connections)),
            client_slots_debt: AtomicUsize::new(0),
            live: ArcSwap::from_pointee(Live {
                config,
                targets,
                iam,
            }),
            config_path,
            metrics,
            cancels,
            auth_limiter,
            quotas: Default::default(),
            tls,
            parking,
            paused: tokio::sync::watch::Sender::new(false),
            paused_now: std::sync::atomic::AtomicBool::new(false),
            reloading: tokio::sync::Mutex::new(()),
            shutdown_shards: (0..SHUTDOWN_SHARDS)
                .map(|_| shutdown.child_token())
                .collect(),
            shutdown,
        }))
    }

    /// The shutdown token for the client with `key` to wait on: cancelled with `shutdown`.
    pub fn shutdown_shard(&self, key: pgwarden_protocol::startup::CancelKey) -> &CancellationToken {
        &self.shutdown_shards[key.secret as u32 as usize % SHUTDOWN_SHARDS]
    }

    /// The configuration in force and what was built from it. A session keeps the
    /// snapshot it started with for its startup; limits it reads later come from its
    /// target, which a reload updates in place.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// `server.park_idle_clients_after` in force; read between every two transactions,
    /// so without taking a reference count on the configuration.
    pub fn park_idle_clients_after(&self) -> std::time::Duration {
        self.live.load().config.server.park_idle_clients_after
    }

    /// Reads the configuration file again and applies it (see [`App::reload`]).
    pub async fn reload_file(self: &Arc<Self>) -> Result<Vec<String>, ReloadError> {
        let path = self.config_path.as_ref().ok_or(ReloadError::NoFile)?;
        let config = Config::load(path)?;
        self.reload(config).await
    }

    /// Applies a new configuration without dropping a client: pool limits, quotas,
    /// authorization rules, the TLS certificate, targets added, changed or removed.
    /// Everything is built before anything changes, so a failure leaves the old
    /// configuration in force. Returns notes on what could not change without a restart.
    pub async fn reload(self: &Arc<Self>, new: Config) -> Result<Vec<String>, ReloadError> {
        let _one_at_a_time = self.reloading.lock().await;
        let old = self.live();
        if self.tls.is_none() && new.server.require_tls {
            // A reload cannot start offering TLS, so requiring it would refuse everyone.
            return Err(ReloadError::TlsNeedsRestart);
        }
        let notes = restart_only_changes(&old.config, &new, self.tls.is_some());
        let acceptor = match (&self.tls, &new.server.tls) {
            (Some(_), Some(t)) => {
                Some(ServerTls::prepare(&t.cert_path, &t.key_path).map_err(AppError::from)?)
            }
            _ => None,
        };
        let mut targets = Vec::new();
        let mut updates = Vec::new();
        for t in &new.targets {
            let users_file_changed = |target: &Target| match &t.credentials {
                crate::config::CredentialsConfig::File { path } => {
                    target.credentials.file_changed(path)
                }
                crate::config::CredentialsConfig::SecretsManager { .. } => false,
            };
            match old.targets.iter().find(|o| o.name() == t.name) {
                Some(existing) if existing.can_apply(t) && !users_file_changed(existing) => {
                    updates.push((existing.clone(), t.clone()));
                    targets.push(existing.clone());
                }
                _ => targets.push(build_target(t, &self.metrics, &self.shutdown).await?),
            }
        }
        // Rebuilt only when changed: the STS verifier's cache of identities survives.
        let iam = if new.iam == old.config.iam {
            old.iam.clone()
        } else {
            new.iam
                .as_ref()
                .map(|c| Iam::new(c, &self.metrics).map(Arc::new))
                .transpose()?
        };

        // Nothing below fails.
        if let (Some(tls), Some(acceptor)) = (&self.tls, acceptor) {
            tls.install(acceptor);
        }
        for (target, config) in updates {
            target.apply(config);
        }
        for target in &old.targets {
            if !targets.iter().any(|t| Arc::ptr_eq(t, target)) {
                target.retire();
            }
        }
        for target in &targets {
            if !old.targets.iter().any(|t| Arc::ptr_eq(t, target)) {
                spawn_credential_refresh(target);
            }
        }
        self.resize_client_slots(
            old.config.server.max_client_connections,
            new.server.max_client_connections,
        );
        self.live.store(Arc::new(Live {
            config: new,
            targets,
            iam,
        }));
        Ok(notes)
    }

    /// PAUSE: transactions that have not started wait until [`App::resume`].
    pub fn pause(&self) {
        self.paused_now
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.paused.send_replace(true);
    }

    pub fn resume(&self) {
        self.paused_now
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.paused.send_replace(false);
    }

    /// Whether PAUSE is in force (one atomic load).
    pub fn is_paused(&self) -> bool {
        self.paused_now.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits while paused, until `deadline`; false if still paused then.
    pub async fn wait_resumed(&self, deadline: std::time::Instant) -> bool {
        let mut rx = self.paused.subscribe();
        let resumed = tokio::time::timeout_at(deadline.into(), rx.wait_for(|paused| !paused))
            .await
            .is_ok();
        resumed
    }

    fn resize_client_slots(&self, old: usize, new: usize) {
        crate::pool::resize(&self.client_slots, &self.client_slots_debt, old, new);
    }

    /// Periodic upkeep: pays client-slot debt left by a reload that lowered the limit and
    /// forgets quota counters of principals and users gone quiet.
    pub fn maintain(&self) {
        crate::pool::pay_debt(&self.client_slots, &self.client_slots_debt);
        self.quotas.prune(
            std::time::Instant::now(),
            std::time::Duration::from_secs(600),
        );
    }
}

/// Starts the background refresh of a target's secrets; it stops when the target is
/// retired or pgwarden shuts down.
pub fn spawn_credential_refresh(target: &Arc<Target>) {
    let target = target.clone();
    tokio::spawn(async move {
        let stop = target.retired.clone();
        crate::credentials::keep_fresh(&target.credentials, stop).await;
    });
}

/// Settings a running pgwarden cannot change; a reload keeps the old value and says so.
fn restart_only_changes(old: &Config, new: &Config, has_tls: bool) -> Vec<String> {
    let mut notes = Vec::new();
    let (o, n) = (&old.server, &new.server);
    if o.listen != n.listen {
        notes.push("server.listen changed: takes effect after a restart".to_owned());
    }
    if o.admin_listen != n.admin_listen {
        notes.push("server.admin_listen changed: takes effect after a restart".to_owned());
    }
    if o.listen_backlog != n.listen_backlog {
        notes.push("server.listen_backlog changed: takes effect after a restart".to_owned());
    }
    if o.worker_threads != n.worker_threads {
        notes.push("server.worker_threads changed: takes effect after a restart".to_owned());
    }
    if o.thread_busy_limit != n.thread_busy_limit {
        notes.push("server.thread_busy_limit changed: takes effect after a restart".to_owned());
    }
    if has_tls != n.tls.is_some() {
        notes.push(
            "[server.tls] was added or removed: takes effect after a restart (a changed certificate is reloaded)"
                .to_owned(),
        );
    }
    if o.max_auth_failures != n.max_auth_failures || o.auth_failure_window != n.auth_failure_window
    {
        notes.push(
            "server.max_auth_failures / auth_failure_window changed: take effect after a restart"
                .to_owned(),
        );
    }
    if old.cluster.instance_id != new.cluster.instance_id {
        notes.push("cluster.instance_id changed: takes effect after a restart".to_owned());
    }
    notes
}

async fn build_target(
    t: &crate::config::TargetConfig,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> Result<Arc<Target>, AppError> {
    let credentials = match &t.credentials {
        crate::config::CredentialsConfig::File { path } => {
            CredentialStore::from_file(&t.name, path)?
        }
        crate::config::CredentialsConfig::SecretsManager {
            secrets,
            region,
            endpoint,
            refresh_interval,
            previous_password_grace,
        } => {
            let client = crate::secrets::SecretsManager::new(
                region.as_deref(),
                endpoint.as_deref(),
                metrics.secret_fetches.clone(),
            )
            .await;
            let settings = SecretSettings {
                secrets,
                refresh_interval: *refresh_interval,
                previous_password_grace: *previous_password_grace,
            };
            CredentialStore::from_secrets(&t.name, client, settings, metrics.clone()).await?
        }
    };
    let connector = tls::backend_connector(t.tls, t.ca_path.as_deref())?;
    Ok(Target::new(
        t.clone(),
        credentials,
        connector,
        metrics.clone(),
        shutdown.child_token(),
    ))
}
