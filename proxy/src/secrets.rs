//! Database logins read from AWS Secrets Manager (standard RDS secret JSON), always asking
//! for an explicit version stage. Secret values never reach a log, an error or a metric.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_secretsmanager::error::ProvideErrorMetadata;
use pgwarden_auth::rds_secret::RdsSecret;
use prometheus::IntCounterVec;

/// The three staging labels a rotation moves between versions.
pub const AWSCURRENT: &str = "AWSCURRENT";
pub const AWSPENDING: &str = "AWSPENDING";
pub const AWSPREVIOUS: &str = "AWSPREVIOUS";

/// Longest wait for one GetSecretValue call, retries included: a login waiting for a
/// secret must not hang on an unreachable endpoint.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a secret could not be read. Messages name the secret, never its value.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// No version carries the stage (or the secret does not exist).
    #[error("secret {id:?} has no version labelled {stage}")]
    NotFound { id: String, stage: String },
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

/// One version of a secret.
pub struct FetchedSecret {
    pub login: RdsSecret,
    /// The version id (a rotation changes the one labelled `AWSCURRENT`).
    pub version_id: Option<String>,
}

/// A Secrets Manager client for one target.
pub struct SecretsManager {
    client: aws_sdk_secretsmanager::Client,
    /// `pgwarden_secret_fetches_total{stage, outcome}`.
    fetches: IntCounterVec,
}

impl SecretsManager {
    pub async fn new(region: Option<&str>, endpoint: Option<&str>, fetches: IntCounterVec) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .operation_timeout(OPERATION_TIMEOUT)
                .build(),
        );
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
    pub async fn fetch(&self, id: &str, stage: &str) -> Result<FetchedSecret, SecretsError> {
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
                let service = e.into_service_error();
                if service.is_resource_not_found_exception() {
                    self.count(stage, "not_found");
                    return Err(SecretsError::NotFound {
                        id: id.to_owned(),
                        stage: stage.to_owned(),
                    });
                }
                self.count(stage, "failed");
                return Err(SecretsError::Fetch {
                    id: id.to_owned(),
                    stage: stage.to_owned(),
                    reason: service
                        .code()
                        .map_or_else(|| "no answer".to_owned(), str::to_owned),
                });
            }
        };
        match RdsSecret::parse(output.secret_string().unwrap_or_default()) {
            Ok(login) => {
                self.count(stage, "succeeded");
                Ok(FetchedSecret {
                    login,
                    version_id: output.version_id().map(str::to_owned),
                })
            }
            Err(reason) => {
                self.count(stage, "invalid");
                Err(SecretsError::Format {
                    id: id.to_owned(),
                    stage: stage.to_owned(),
                    reason,
                })
            }
        }
    }

    fn count(&self, stage: &str, outcome: &str) {
        self.fetches.with_label_values(&[stage, outcome]).inc();
    }
}
