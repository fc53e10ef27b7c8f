//! The state every session shares, passed explicitly (never through globals).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::cancel::CancelRegistry;
use crate::config::Config;
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
}

pub struct App {
    pub config: Config,
    pub targets: Vec<Arc<Target>>,
    pub metrics: Arc<Metrics>,
    pub cancels: Arc<CancelRegistry>,
    /// The TLS offered to clients, if configured.
    pub tls: Option<ServerTls>,
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
        let tls = match &config.server.tls {
            Some(t) => Some(ServerTls::load(&t.cert_path, &t.key_path)?),
            None => None,
        };
        Ok(Arc::new(Self {
            config,
            targets,
            metrics,
            cancels: Arc::new(CancelRegistry::default()),
            tls,
            shutdown: CancellationToken::new(),
        }))
    }

    /// The target serving client database `database`.
    pub fn target_for(&self, database: &str) -> Option<&Arc<Target>> {
        self.config.target_for(database).map(|i| &self.targets[i])
    }
}
