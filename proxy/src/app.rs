//! The state every session shares, passed explicitly (never through globals).

use std::collections::HashMap;
use std::sync::Arc;

use pgwarden_auth::rds_token::{RdsTokenVerifier, VerificationKey};
use pgwarden_auth::Secret;

use tokio_util::sync::CancellationToken;

use crate::cancel::CancelRegistry;
use crate::config::{Config, IamConfig, IamVerifier};
use crate::credentials::{CredentialStore, SecretSettings, StoreError};
use crate::metrics::Metrics;
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
    pub async fn new(config: Config) -> Result<Arc<Self>, AppError> {
        let metrics = Arc::new(Metrics::new());
        let mut targets = Vec::new();
        for t in &config.targets {
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
                    CredentialStore::from_secrets(&t.name, client, settings, metrics.clone())
                        .await?
                }
            };
            let connector = tls::backend_connector(t.tls, t.ca_path.as_deref())?;
            targets.push(Target::new(
                t.clone(),
                credentials,
                connector,
                metrics.clone(),
            ));
        }
        let iam = config
            .iam
            .as_ref()
            .map(|c| Iam::new(c, &metrics))
            .transpose()?;
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
