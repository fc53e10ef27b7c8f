//! The state every session shares, passed explicitly (never through globals).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::cancel::CancelRegistry;
use crate::config::Config;
use crate::credentials::{CredentialStore, StoreError};
use crate::metrics::Metrics;
use crate::pool::Target;

pub struct App {
    pub config: Config,
    pub targets: Vec<Arc<Target>>,
    pub metrics: Arc<Metrics>,
    pub cancels: Arc<CancelRegistry>,
    /// Cancelled when pgwarden begins shutting down: idle sessions close at once.
    pub shutdown: CancellationToken,
}

impl App {
    /// Builds the shared state: loads every target's credentials.
    pub fn new(config: Config) -> Result<Arc<Self>, StoreError> {
        let metrics = Arc::new(Metrics::new());
        let mut targets = Vec::new();
        for t in &config.targets {
            let crate::config::CredentialsConfig::File { path } = &t.credentials;
            let credentials = CredentialStore::from_file(path)?;
            targets.push(Target::new(t.clone(), credentials, metrics.clone()));
        }
        Ok(Arc::new(Self {
            config,
            targets,
            metrics,
            cancels: Arc::new(CancelRegistry::default()),
            shutdown: CancellationToken::new(),
        }))
    }

    /// The target serving client database `database`.
    pub fn target_for(&self, database: &str) -> Option<&Arc<Target>> {
        self.config.target_for(database).map(|i| &self.targets[i])
    }
}
