//! The state every session shares, passed explicitly (never through globals).

use std::collections::HashMap;
use std::sync::Arc;

use pgwarden_auth::rds_token::{RdsTokenVerifier, VerificationKey};
use pgwarden_auth::Secret;

use tokio_util::sync::CancellationToken;

use crate::cancel::CancelRegistry;
use crate::config::{Config, IamConfig};
use crate::credentials::{CredentialStore, StoreError};
use crate::metrics::Metrics;
use crate::pool::Target;
use crate::tls::{self, ServerTls, TlsError};

/// Why the shared state could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Credentials(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("IAM key {access_key_id}: environment variable {variable} is not set")]
    IamKey {
        access_key_id: String,
        variable: String,
    },
}

/// IAM authentication as configured: the token verifier and the authorization rules.
pub struct Iam {
    pub verifier: RdsTokenVerifier,
    pub rules: Vec<pgwarden_auth::rules::Rule>,
    pub allow_plaintext_on_loopback: bool,
}

impl Iam {
    fn new(config: &IamConfig) -> Result<Self, AppError> {
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
        Ok(Self {
            verifier: RdsTokenVerifier::new(keys, &config.advertised_hosts, config.max_clock_skew),
            rules: config.rules.clone(),
            allow_plaintext_on_loopback: config.allow_plaintext_on_loopback,
        })
    }
}

pub struct App {
    pub config: Config,
    pub targets: Vec<Arc<Target>>,
    pub metrics: Arc<Metrics>,
    pub cancels: Arc<CancelRegistry>,
    /// The TLS offered to clients, if configured.
    pub tls: Option<ServerTls>,
    /// IAM authentication, if configured.
    pub iam: Option<Iam>,
    /// Failed-authentication limits per address and user.
    pub auth_limiter: crate::auth_limit::AuthLimiter,
    /// Cancelled when pgwarden begins shutting down: idle sessions close at once.
    pub shutdown: CancellationToken,
}

impl App {
    /// Builds the shared state: loads every target's credentials and the TLS material.
    pub fn new(config: Config) -> Result<Arc<Self>, AppError> {
        let metrics = Arc::new(Metrics::new());
        let mut targets = Vec::new();
        for t in &config.targets {
            let crate::config::CredentialsConfig::File { path } = &t.credentials;
            let credentials = CredentialStore::from_file(path)?;
            let connector = tls::backend_connector(t.tls, t.ca_path.as_deref())?;
            targets.push(Target::new(
                t.clone(),
                credentials,
                connector,
                metrics.clone(),
            ));
        }
        let iam = config.iam.as_ref().map(Iam::new).transpose()?;
        let auth_limiter = crate::auth_limit::AuthLimiter::new(
            config.server.max_auth_failures,
            config.server.auth_failure_window,
        );
        let tls = match &config.server.tls {
            Some(t) => Some(ServerTls::load(&t.cert_path, &t.key_path)?),
            None => None,
        };
        Ok(Arc::new(Self {
            config,
            targets,
            metrics,
            cancels: Arc::new(CancelRegistry::default()),
            auth_limiter,
            tls,
            iam,
            shutdown: CancellationToken::new(),
        }))
    }

    /// The target serving client database `database`.
    pub fn target_for(&self, database: &str) -> Option<&Arc<Target>> {
        self.config.target_for(database).map(|i| &self.targets[i])
    }
}
