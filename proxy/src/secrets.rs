//! Database logins read from AWS Secrets Manager (standard RDS secret JSON), always asking
//! for an explicit version stage. Secret values never reach a log, an error or a metric.

use aws_config::BehaviorVersion;
use pgwarden_auth::rds_secret::RdsSecret;
use prometheus::IntCounterVec;

/// Why a secret could not be read. Messages name the secret, never its value.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("Secrets Manager refused or failed to return secret {id:?} ({stage}): {reason}")]
    Fetch {
        id: String,
        stage: String,
        reason: String,
    },
    #[error("secret {id:?} ({stage}) is not a usable database login: {reason}")]
    Format {
        id: String,
        stage: String,
        reason: pgwarden_auth::rds_secret::SecretFormatError,
    },
}

/// A Secrets Manager client for one target.
pub struct SecretsManager {
    client: aws_sdk_secretsmanager::Client,
    /// `pgwarden_secret_fetches_total{outcome}`.
    fetches: IntCounterVec,
}

impl SecretsManager {
    pub async fn new(region: Option<&str>, endpoint: Option<&str>, fetches: IntCounterVec) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = region {
            loader = loader.region(aws_config::Region::new(region.to_owned()));
        }
        if let Some(endpoint) = endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let config = loader.load().await;
        Self {
            client: aws_sdk_secretsmanager::Client::new(&config),
            fetches,
        }
    }

    /// The login in version `stage` (`AWSCURRENT`, `AWSPENDING`, `AWSPREVIOUS`) of `id`.
    pub async fn fetch(&self, id: &str, stage: &str) -> Result<RdsSecret, SecretsError> {
        let answer = self
            .client
            .get_secret_value()
            .secret_id(id)
            .version_stage(stage)
            .send()
            .await;
        let output = match answer {
            Ok(output) => output,
            Err(e) => {
                self.fetches.with_label_values(&["failed"]).inc();
                let service = e.into_service_error();
                let reason = aws_sdk_secretsmanager::error::ProvideErrorMetadata::code(&service)
                    .map_or_else(|| "no answer".to_owned(), str::to_owned);
                return Err(SecretsError::Fetch {
                    id: id.to_owned(),
                    stage: stage.to_owned(),
                    reason,
                });
            }
        };
        let parsed =
            RdsSecret::parse(output.secret_string().unwrap_or_default()).map_err(|reason| {
                SecretsError::Format {
                    id: id.to_owned(),
                    stage: stage.to_owned(),
                    reason,
                }
            });
        self.fetches
            .with_label_values(&[if parsed.is_ok() {
                "succeeded"
            } else {
                "invalid"
            }])
            .inc();
        parsed
    }
}
