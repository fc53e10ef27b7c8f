//! The configuration file: one TOML document, every field documented with its default.
//!
//! `docs/configuration.md` is the reference for operators; keep it in step with this file.
//! Validation lives in [`Config::validate`], which reports every problem at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    /// Database endpoints. A client's startup `database` selects the first target whose
    /// `databases` list contains it (or `"*"`).
    #[serde(default)]
    pub targets: Vec<TargetConfig>,
    /// IAM authentication of clients, for targets with `client_auth = "iam"`.
    pub iam: Option<IamConfig>,
    /// Limits per IAM principal and per database user. Default: none.
    #[serde(default)]
    pub quotas: Vec<QuotaRule>,
    /// Other pgwarden instances behind the same load balancer (cancel forwarding).
    #[serde(default)]
    pub cluster: ClusterConfig,
}

/// A limit on the clients of one IAM principal or one database user: each distinct
/// principal (or user) the pattern matches gets the limits for itself, like a function's
/// reserved concurrency. The first rule that matches a client's principal applies, and
/// so does the first that matches its user.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaRule {
    /// Principal ARN pattern (`*` matches any run of characters; assumed-role sessions
    /// count as their role). Exactly one of `principal` and `user` is required.
    pub principal: Option<String>,
    /// Client-facing database user name pattern.
    pub user: Option<String>,
    /// Most client connections open at once. Default: no limit.
    pub max_connections: Option<usize>,
    /// New client connections per second, sustained. Default: no limit.
    pub connections_per_second: Option<f64>,
    /// New connections allowed at once above the rate (the token bucket's size). Default:
    /// `connections_per_second` rounded up, at least 1.
    pub burst: Option<u32>,
}

/// How this instance finds its peers, so a cancel request that the load balancer sends
/// to the wrong instance reaches the right one.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This instance's number, 0–255, unique among its peers; carried in every cancel key
    /// it issues. Default 0.
    #[serde(default)]
    pub instance_id: u8,
    /// The other instances' client listeners, `host:port`; a name that resolves to several
    /// addresses (a headless Service) stands for all of them. Default `[]` (cancel
    /// requests for another instance's keys are dropped).
    #[serde(default)]
    pub peers: Vec<String>,
}

/// How client IAM tokens are verified and what each principal may do.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct IamConfig {
    /// `sts`: presigned STS GetCallerIdentity requests, executed against an allow-listed
    /// STS endpoint (any IAM principal, Lambda roles included). `rds-token`: tokens as
    /// `aws rds generate-db-auth-token` makes them, verified locally with the keys below
    /// (development and non-AWS environments).
    pub verifier: IamVerifier,
    /// `rds-token`: the `host:port` names clients reach pgwarden by and sign tokens for.
    #[serde(default)]
    pub advertised_hosts: Vec<String>,
    /// `sts`: this deployment's id, bound into every token (a token made for another
    /// deployment does not verify here). Required for `sts`.
    pub server_id: Option<String>,
    /// `sts`: AWS regions whose STS endpoints tokens may use (the global endpoint is always
    /// allowed). Default `[]`.
    #[serde(default)]
    pub sts_regions: Vec<String>,
    /// `sts`: further endpoints, e.g. a local emulator (`http://` only on loopback).
    #[serde(default)]
    pub sts_endpoints: Vec<String>,
    /// `sts`: time limit for one STS call. Default `5s`.
    #[serde(default = "defaults::sts_timeout", with = "humantime_serde")]
    pub sts_timeout: Duration,
    /// How far in the future a token's date may be. Default `60s`.
    #[serde(default = "defaults::max_clock_skew", with = "humantime_serde")]
    pub max_clock_skew: Duration,
    /// Accept tokens on plaintext connections from loopback addresses (local development
    /// only). Default `false`: tokens are refused without TLS, before they are sent.
    #[serde(default)]
    pub allow_plaintext_on_loopback: bool,
    /// Keys `rds-token` tokens may be signed with.
    #[serde(default)]
    pub keys: Vec<IamKeyConfig>,
    /// Principal ARN patterns → database users. Nothing is allowed unless a rule allows it.
    #[serde(default)]
    pub rules: Vec<pgwarden_auth::rules::Rule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IamVerifier {
    RdsToken,
    Sts,
}

/// A signing key pgwarden trusts for `rds-token`, and the principal it stands for.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct IamKeyConfig {
    pub access_key_id: String,
    /// Environment variable holding the secret access key (never the file itself).
    pub secret_access_key_env: String,
    /// The principal ARN tokens signed with this key authenticate as.
    pub principal: String,
}

/// How clients of a target prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAuth {
    /// SCRAM-SHA-256 with the password from the target's credentials (the default).
    Scram,
    /// An IAM token as the password, verified per `[iam]` (TLS required).
    Iam,
}

/// The most `server.worker_threads` a configuration may ask for.
const MAX_WORKER_THREADS: usize = 1024;

/// Listener, admin endpoint and client-facing limits.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address clients connect to. Default `127.0.0.1:6432`.
    #[serde(default = "defaults::listen")]
    pub listen: SocketAddr,
    /// Address of the HTTP admin endpoint (`/metrics`, `/healthz`, `/readyz`). Default
    /// `127.0.0.1:9930`.
    #[serde(default = "defaults::admin_listen")]
    pub admin_listen: SocketAddr,
    /// Most client connections served at once; one more is refused with SQLSTATE 53300.
    /// Default 10000.
    #[serde(default = "defaults::max_client_connections")]
    pub max_client_connections: usize,
    /// Connections the kernel queues before pgwarden accepts them (the `listen` backlog,
    /// capped by `net.core.somaxconn`). A burst of new clients beyond it sees dropped SYNs
    /// and a one-second retransmit. Default `4096`.
    #[serde(default = "defaults::listen_backlog")]
    pub listen_backlog: u32,
    /// Threads serving clients, each with an event loop of its own (the listener's thread is
    /// the first). `0`: one per CPU available to pgwarden. With one, the listener, every
    /// client and the reactor share one thread, as in PgBouncer. Default `0`.
    #[serde(default)]
    pub worker_threads: usize,
    /// New and woken clients go to the first serving thread that used less than this share
    /// of a CPU over the last sampling interval; when every thread is over it, to each in
    /// turn; clients on a thread over it move between transactions to one under it. Light
    /// load is then served by one thread (the cheapest) and the others join as it grows.
    /// `0` spreads every client over all threads in turn. Default `0.75`.
    #[serde(default = "defaults::thread_busy_limit")]
    pub thread_busy_limit: f64,
    /// Time a new client has to finish the startup and authentication phase. Default `10s`.
    #[serde(default = "defaults::startup_timeout", with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// A client idle this long between transactions is parked: it leaves its task and
    /// tokio's reactor until it sends again, keeping only its session state (about half a
    /// KiB). `0s` never parks. Default `1s`.
    #[serde(
        default = "defaults::park_idle_clients_after",
        with = "humantime_serde"
    )]
    pub park_idle_clients_after: Duration,
    /// Time to wait for in-flight transactions on shutdown before closing. Default `30s`.
    #[serde(default = "defaults::shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Failed authentications allowed per source address and per database user within
    /// `auth_failure_window`; over it, attempts are refused (28000) until the window ends.
    /// Default 20; 0 disables.
    #[serde(default = "defaults::max_auth_failures")]
    pub max_auth_failures: u32,
    /// The window of `max_auth_failures`. Default `1m`.
    #[serde(default = "defaults::auth_failure_window", with = "humantime_serde")]
    pub auth_failure_window: Duration,
    /// Refuse clients that do not use TLS (SQLSTATE 28000). Default `true`; needs
    /// `[server.tls]`. Set to `false` only on a trusted network or loopback.
    #[serde(default = "defaults::require_tls")]
    pub require_tls: bool,
    /// Certificate and key clients are served with. Default: none (no TLS offered).
    pub tls: Option<ServerTlsConfig>,
    /// Database users (client-facing names) who may use the admin console, database
    /// `pgwarden`. They authenticate as clients of the first target that knows them.
    /// Default `[]`: the console is closed.
    #[serde(default)]
    pub admin_users: Vec<String>,
}

/// The certificate pgwarden presents to clients (PEM files; reloaded on SIGHUP).
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// Certificate chain, leaf first. Required.
    pub cert_path: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1). Required.
    pub key_path: PathBuf,
}

/// How a target shares backend connections among clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A backend serves one transaction, then goes back to the pool (the default).
    Transaction,
    /// A backend serves one client for its whole session.
    Session,
}

/// A database endpoint, the credentials pgwarden logs in with, and its pool limits.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// Name used in metrics and logs. Required, unique.
    pub name: String,
    /// Database host name or address. Required.
    pub host: String,
    /// Database port. Default 5432.
    #[serde(default = "defaults::pg_port")]
    pub port: u16,
    /// Client database names this target serves; `"*"` serves any. Default `["*"]`.
    #[serde(default = "defaults::databases")]
    pub databases: Vec<String>,
    /// `transaction` (default) or `session`.
    #[serde(default = "defaults::pool_mode")]
    pub pool_mode: PoolMode,
    /// Most backend connections per (database, user) pool. Default 20.
    #[serde(default = "defaults::pool_size")]
    pub pool_size: usize,
    /// Hard cap on backend connections across all pools of this target. Default 100.
    #[serde(default = "defaults::max_backend_connections")]
    pub max_backend_connections: usize,
    /// Backend connections (idle or borrowed) each pool keeps open once it exists, opened
    /// ahead of demand. Default 0.
    #[serde(default)]
    pub min_idle: usize,
    /// An idle backend connection is closed after this long (above `min_idle`). Default `10m`.
    #[serde(default = "defaults::idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A backend connection is closed at its first release after this age, jittered by up
    /// to 10% so connections opened together do not all close together. Default `1h`.
    #[serde(default = "defaults::max_lifetime", with = "humantime_serde")]
    pub max_lifetime: Duration,
    /// Longest a client waits for a backend before it gets SQLSTATE 53300. Default `30s`.
    #[serde(default = "defaults::borrow_timeout", with = "humantime_serde")]
    pub borrow_timeout: Duration,
    /// Most clients waiting for a backend in one pool; one more gets SQLSTATE 53300 at
    /// once instead of queueing. Default 0: no limit (beyond max_client_connections).
    #[serde(default)]
    pub max_waiting_clients: usize,
    /// Time limit for one backend TCP connect plus login. Default `10s`.
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Most backend logins in progress at once, so a burst of clients does not stampede
    /// the database. Default 8.
    #[serde(default = "defaults::max_logins_in_flight")]
    pub max_logins_in_flight: usize,
    /// Sent to a backend before it goes back to the pool after a session-mode or pinned
    /// client. Default `DISCARD ALL`.
    #[serde(default = "defaults::reset_query")]
    pub reset_query: String,
    /// Pin reasons that do NOT pin in transaction mode (like a managed proxy's pinning
    /// filters): the client keeps sharing backends although the state it created may then
    /// be seen by, or lost to, other clients. Values: `sql_prepare`, `temp_table`,
    /// `advisory_lock`, `listen`, `hold_cursor`, `load`, `session_setting`, `uninspected`.
    /// Default `[]` (every reason pins).
    #[serde(default)]
    pub pin_filters: Vec<String>,
    /// TLS towards the database: `disable`, `prefer` (TLS if the server offers it, the
    /// default), `require` (TLS without checking the certificate) or `verify-full` (TLS,
    /// certificate checked against `ca_path` and `host`).
    #[serde(default = "defaults::backend_tls")]
    pub tls: crate::tls::BackendTlsMode,
    /// CA bundle (PEM) for `tls = "verify-full"`, e.g. the RDS CA bundle. Default: none.
    pub ca_path: Option<PathBuf>,
    /// How clients authenticate: `scram` (default) or `iam`.
    #[serde(default = "defaults::client_auth")]
    pub client_auth: ClientAuth,
    /// Where pgwarden's database logins come from.
    pub credentials: CredentialsConfig,
}

/// A credential provider.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, tag = "provider", rename_all = "lowercase")]
pub enum CredentialsConfig {
    /// A local TOML file of `[[users]] name, password` (development, the demo).
    File {
        /// Path of the file; relative paths are relative to the config file.
        path: PathBuf,
    },
    /// AWS Secrets Manager: each secret holds one login as the standard RDS secret JSON.
    /// Region, endpoint and AWS credentials come from the SDK's default chain; `region` and
    /// `endpoint` here win. Every request names a version stage explicitly.
    #[serde(rename = "secretsmanager")]
    SecretsManager {
        secrets: Vec<SecretRef>,
        #[serde(default)]
        region: Option<String>,
        #[serde(default)]
        endpoint: Option<String>,
        /// How often each secret is read again in the background. Default `60s`.
        #[serde(
            default = "defaults::secret_refresh_interval",
            with = "humantime_serde"
        )]
        refresh_interval: Duration,
        /// After a rotation, how long clients may still authenticate with the previous
        /// password. Default `0s` (off): only the current and the pending password work.
        #[serde(default, with = "humantime_serde")]
        previous_password_grace: Duration,
    },
}

/// One secret of the `secretsmanager` provider.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum SecretRef {
    /// A name or ARN: read at start; clients log in as the secret's `username`.
    Id(String),
    /// A secret behind a stable client-facing user name (needed when the rotation
    /// alternates between two database users). Read on first use, not at start.
    Named {
        /// Name or ARN of the secret.
        id: String,
        /// The user name clients log in as.
        user: String,
    },
}

impl SecretRef {
    pub fn id(&self) -> &str {
        match self {
            SecretRef::Id(id) | SecretRef::Named { id, .. } => id,
        }
    }
}

mod defaults {
    use super::PoolMode;
    use std::net::SocketAddr;
    use std::time::Duration;

    pub fn listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 6432))
    }
    pub fn admin_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9930))
    }
    pub fn listen_backlog() -> u32 {
        4096
    }
    pub fn max_client_connections() -> usize {
        10_000
    }
    pub fn startup_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn park_idle_clients_after() -> Duration {
        Duration::from_secs(1)
    }
    pub fn thread_busy_limit() -> f64 {
        0.75
    }
    pub fn secret_refresh_interval() -> Duration {
        Duration::from_secs(60)
    }
    pub fn shutdown_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn require_tls() -> bool {
        true
    }
    pub fn max_auth_failures() -> u32 {
        20
    }
    pub fn auth_failure_window() -> Duration {
        Duration::from_secs(60)
    }
    pub fn sts_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn max_clock_skew() -> Duration {
        Duration::from_secs(60)
    }
    pub fn client_auth() -> super::ClientAuth {
        super::ClientAuth::Scram
    }
    pub fn backend_tls() -> crate::tls::BackendTlsMode {
        crate::tls::BackendTlsMode::Prefer
    }
    pub fn pg_port() -> u16 {
        5432
    }
    pub fn databases() -> Vec<String> {
        vec!["*".to_owned()]
    }
    pub fn pool_mode() -> PoolMode {
        PoolMode::Transaction
    }
    pub fn pool_size() -> usize {
        20
    }
    pub fn max_backend_connections() -> usize {
        100
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(600)
    }
    pub fn max_lifetime() -> Duration {
        Duration::from_secs(3600)
    }
    pub fn borrow_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn max_logins_in_flight() -> usize {
        8
    }
    pub fn reset_query() -> String {
        "DISCARD ALL".to_owned()
    }
}

/// A configuration that could not be loaded; lists every problem found.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

impl Config {
    /// Reads, parses and validates a config file. Relative credential paths are resolved
    /// against the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(tls) = &mut config.server.tls {
            resolve(&mut tls.cert_path);
            resolve(&mut tls.key_path);
        }
        for target in &mut config.targets {
            if let Some(ca) = &mut target.ca_path {
                resolve(ca);
            }
            if let CredentialsConfig::File { path } = &mut target.credentials {
                if path.is_relative() {
                    *path = base.join(&*path);
                }
            }
        }
        Ok(config)
    }

    /// Parses and validates config text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every cross-field rule and returns all problems at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.targets.is_empty() {
            problems.push("at least one [[targets]] entry is required".to_owned());
        }
        if self.server.require_tls && self.server.tls.is_none() {
            problems.push(
                "server.require_tls is true but [server.tls] is missing (or set require_tls = false on a trusted network)"
                    .to_owned(),
            );
        }
        if self.server.startup_timeout.is_zero() {
            problems.push("server.startup_timeout must be above zero".to_owned());
        }
        if self.server.max_client_connections == 0 {
            problems.push("server.max_client_connections must be at least 1".to_owned());
        }
        if self.server.worker_threads > MAX_WORKER_THREADS {
            problems.push(format!(
                "server.worker_threads must be at most {MAX_WORKER_THREADS} (0 is one per CPU)"
            ));
        }
        if !(0.0..=1.0).contains(&self.server.thread_busy_limit) {
            problems.push("server.thread_busy_limit must be between 0 and 1".to_owned());
        }
        if self.server.listen == self.server.admin_listen && self.server.listen.port() != 0 {
            problems.push("server.listen and server.admin_listen must differ".to_owned());
        }
        let mut names = std::collections::HashSet::new();
        for t in &self.targets {
            let n = &t.name;
            if n.is_empty() {
                problems.push("a target has an empty name".to_owned());
            }
            if !names.insert(n.as_str()) {
                problems.push(format!("target name {n:?} is used twice"));
            }
            if t.host.is_empty() {
                problems.push(format!("target {n:?}: host is empty"));
            }
            if t.pool_size == 0 {
                problems.push(format!("target {n:?}: pool_size must be at least 1"));
            }
            if t.max_backend_connections < t.pool_size {
                problems.push(format!(
                    "target {n:?}: max_backend_connections ({}) is below pool_size ({})",
                    t.max_backend_connections, t.pool_size
                ));
            }
            if t.min_idle > t.pool_size {
                problems.push(format!(
                    "target {n:?}: min_idle ({}) is above pool_size ({})",
                    t.min_idle, t.pool_size
                ));
            }
            if t.max_logins_in_flight == 0 {
                problems.push(format!(
                    "target {n:?}: max_logins_in_flight must be at least 1"
                ));
            }
            if t.client_auth == ClientAuth::Iam && self.iam.is_none() {
                problems.push(format!(
                    "target {n:?}: client_auth = \"iam\" needs an [iam] section"
                ));
            }
            if t.tls == crate::tls::BackendTlsMode::VerifyFull && t.ca_path.is_none() {
                problems.push(format!("target {n:?}: tls = \"verify-full\" needs ca_path"));
            }
            if let CredentialsConfig::SecretsManager {
                secrets,
                refresh_interval,
                ..
            } = &t.credentials
            {
                if secrets.is_empty() {
                    problems.push(format!(
                        "target {n:?}: the secretsmanager provider names no secrets"
                    ));
                }
                if refresh_interval.is_zero() {
                    problems.push(format!(
                        "target {n:?}: credentials.refresh_interval must be more than 0s"
                    ));
                }
            }
            for filter in &t.pin_filters {
                if crate::pinning::PinReason::from_name(filter).is_none() {
                    problems.push(format!("target {n:?}: unknown pin filter {filter:?}"));
                }
            }
            if t.databases.is_empty() {
                problems.push(format!(
                    "target {n:?}: databases is empty (use [\"*\"] for any)"
                ));
            }
            for (field, d) in [
                ("borrow_timeout", t.borrow_timeout),
                ("connect_timeout", t.connect_timeout),
                ("max_lifetime", t.max_lifetime),
                ("idle_timeout", t.idle_timeout),
            ] {
                if d.is_zero() {
                    problems.push(format!("target {n:?}: {field} must be above zero"));
                }
            }
        }
        for (i, q) in self.quotas.iter().enumerate() {
            let n = i + 1;
            if q.principal.is_some() == q.user.is_some() {
                problems.push(format!(
                    "quotas[{n}]: set exactly one of principal and user"
                ));
            }
            if q.max_connections.is_none() && q.connections_per_second.is_none() {
                problems.push(format!(
                    "quotas[{n}]: sets no limit (max_connections or connections_per_second)"
                ));
            }
            if q.connections_per_second
                .is_some_and(|r| !(r > 0.0 && r.is_finite()))
            {
                problems.push(format!(
                    "quotas[{n}]: connections_per_second must be above zero"
                ));
            }
            if q.burst == Some(0) {
                problems.push(format!("quotas[{n}]: burst must be at least 1"));
            }
            if q.burst.is_some() && q.connections_per_second.is_none() {
                problems.push(format!("quotas[{n}]: burst needs connections_per_second"));
            }
        }
        for peer in &self.cluster.peers {
            let port_ok = peer.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !port_ok {
                problems.push(format!(
                    "cluster.peers: {peer:?} is not host:port (a name that resolves to every peer, or an address)"
                ));
            }
        }
        if let Some(iam) = &self.iam {
            match iam.verifier {
                IamVerifier::RdsToken => {
                    if iam.advertised_hosts.is_empty() {
                        problems.push(
                            "iam.advertised_hosts is empty: tokens could match no host".to_owned(),
                        );
                    }
                    if iam.keys.is_empty() {
                        problems.push(
                            "iam.verifier = \"rds-token\" needs at least one [[iam.keys]]"
                                .to_owned(),
                        );
                    }
                }
                IamVerifier::Sts => {
                    if iam.server_id.as_deref().unwrap_or("").is_empty() {
                        problems.push("iam.verifier = \"sts\" needs iam.server_id".to_owned());
                    }
                    for endpoint in &iam.sts_endpoints {
                        if let Err(e) = pgwarden_auth::sts_token::Endpoint::parse(endpoint) {
                            problems.push(format!("iam.sts_endpoints: {e}"));
                        }
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The target that serves client database `database`, if any.
    pub fn target_for(&self, database: &str) -> Option<usize> {
        self.targets
            .iter()
            .position(|t| t.databases.iter().any(|d| d == "*" || d == database))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [server]
        require_tls = false
        [[targets]]
        name = "main"
        host = "db.internal"
        credentials = { provider = "file", path = "users.toml" }
    "#;

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = Config::from_toml(MINIMAL).expect("valid");
        assert_eq!(c.server.listen, "127.0.0.1:6432".parse().expect("addr"));
        assert_eq!(c.server.max_client_connections, 10_000);
        let t = &c.targets[0];
        assert_eq!(t.port, 5432);
        assert_eq!(t.pool_mode, PoolMode::Transaction);
        assert_eq!(t.pool_size, 20);
        assert_eq!(t.max_backend_connections, 100);
        assert_eq!(t.borrow_timeout, Duration::from_secs(30));
        assert_eq!(t.databases, vec!["*"]);
        assert_eq!(t.reset_query, "DISCARD ALL");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let text = MINIMAL.replace("[server]", "[server]\nlisten_port = 1");
        assert!(matches!(
            Config::from_toml(&text),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn validation_reports_every_problem_at_once() {
        let text = MINIMAL.replace(
            "name = \"main\"",
            "name = \"main\"\npool_size = 0\nmin_idle = 3\nborrow_timeout = \"0s\"",
        );
        let Err(ConfigError::Invalid(problems)) = Config::from_toml(&text) else {
            panic!("invalid expected")
        };
        assert_eq!(problems.len(), 3, "{problems:?}");
    }

    #[test]
    fn worker_threads_default_to_one_per_cpu_and_are_bounded() {
        let c = Config::from_toml(MINIMAL).expect("valid");
        assert_eq!(c.server.worker_threads, 0);
        let text = MINIMAL.replace("[server]", "[server]\nworker_threads = 100000");
        let Err(ConfigError::Invalid(problems)) = Config::from_toml(&text) else {
            panic!("invalid expected")
        };
        assert!(
            problems[0].contains("server.worker_threads"),
            "{problems:?}"
        );
    }

    #[test]
    fn thread_busy_limit_defaults_to_three_quarters_and_is_a_share() {
        let c = Config::from_toml(MINIMAL).expect("valid");
        assert_eq!(c.server.thread_busy_limit, 0.75);
        for bad in ["1.5", "-0.1", "nan"] {
            let text = MINIMAL.replace("[server]", &format!("[server]\nthread_busy_limit = {bad}"));
            let Err(ConfigError::Invalid(problems)) = Config::from_toml(&text) else {
                panic!("thread_busy_limit = {bad}: invalid expected")
            };
            assert!(
                problems[0].contains("server.thread_busy_limit"),
                "{problems:?}"
            );
        }
    }

    #[test]
    fn peers_must_be_host_and_port() {
        let text = format!(
            "{MINIMAL}\n[cluster]\ninstance_id = 3\npeers = [\"pgwarden-peers.ns.svc:6432\", \"10.0.0.7\", \":6432\"]\n"
        );
        let Err(ConfigError::Invalid(problems)) = Config::from_toml(&text) else {
            panic!("invalid expected")
        };
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().all(|p| p.contains("cluster.peers")));
    }

    #[test]
    fn targets_are_chosen_by_database() {
        let text = format!(
            "{MINIMAL}\n[[targets]]\nname = \"other\"\nhost = \"h\"\ndatabases = [\"x\"]\ncredentials = {{ provider = \"file\", path = \"u\" }}"
        )
        .replace("host = \"db.internal\"", "host = \"db.internal\"\ndatabases = [\"app\"]");
        let c = Config::from_toml(&text).expect("valid");
        assert_eq!(c.target_for("app"), Some(0));
        assert_eq!(c.target_for("x"), Some(1));
        assert_eq!(c.target_for("y"), None);
    }
}
