//! `pgwarden token`: prints an IAM token for the current AWS credentials, found by the AWS
//! SDK's default chain (environment, shared config, container or instance role), for a
//! client to send as its password.

use std::time::SystemTime;

use anyhow::Context;
use aws_config::BehaviorVersion;
use aws_credential_types::provider::ProvideCredentials;

/// Which token to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TokenMode {
    /// A presigned STS GetCallerIdentity request bound to a pgwarden deployment and user.
    Sts,
    /// An RDS IAM auth token (`aws rds generate-db-auth-token` format) for pgwarden's host.
    RdsToken,
}

/// What `pgwarden token` needs (also the bench's `--iam` options).
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// `sts` (any IAM principal, Lambda roles included) or `rds-token`.
    #[arg(long, value_enum, default_value = "sts")]
    pub mode: TokenMode,
    /// Host name clients use for pgwarden (rds-token).
    #[arg(long, default_value = "localhost")]
    pub host: String,
    /// Port clients use for pgwarden (rds-token).
    #[arg(long, default_value_t = 6432)]
    pub port: u16,
    /// Database user the token is for.
    #[arg(long)]
    pub user: String,
    /// AWS region (default: from the AWS configuration).
    #[arg(long)]
    pub region: Option<String>,
    /// pgwarden's iam.server_id (sts).
    #[arg(long)]
    pub server_id: Option<String>,
    /// STS endpoint (sts; default https://sts.REGION.amazonaws.com).
    #[arg(long)]
    pub sts_endpoint: Option<String>,
}

/// Makes the token.
pub async fn token(args: &TokenArgs) -> anyhow::Result<String> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(region) = &args.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    let config = loader.load().await;
    let region = config
        .region()
        .map(|r| r.as_ref().to_owned())
        .context("no AWS region: pass --region or set AWS_REGION")?;
    let credentials = config
        .credentials_provider()
        .context("no AWS credentials provider")?
        .provide_credentials()
        .await
        .context("no AWS credentials found")?;
    let now = SystemTime::now();
    match args.mode {
        TokenMode::RdsToken => Ok(pgwarden_auth::rds_token::generate(
            &pgwarden_auth::rds_token::TokenRequest {
                host: &args.host,
                port: args.port,
                db_user: &args.user,
                region: &region,
                access_key_id: credentials.access_key_id(),
                secret_access_key: credentials.secret_access_key(),
                session_token: credentials.session_token(),
                time: now,
            },
        )),
        TokenMode::Sts => {
            let server_id = args
                .server_id
                .as_deref()
                .context("--server-id is required for sts tokens (pgwarden's iam.server_id)")?;
            let endpoint = args
                .sts_endpoint
                .clone()
                .unwrap_or_else(|| format!("https://sts.{region}.amazonaws.com"));
            pgwarden_auth::sts_token::generate(&pgwarden_auth::sts_token::StsTokenRequest {
                endpoint: &endpoint,
                region: &region,
                server_id,
                db_user: &args.user,
                access_key_id: credentials.access_key_id(),
                secret_access_key: credentials.secret_access_key(),
                session_token: credentials.session_token(),
                time: now,
            })
            .map_err(|e| anyhow::anyhow!("signing the STS request: {e}"))
        }
    }
}
