//! Client authentication: SCRAM-SHA-256 against the target's credentials (native password
//! mode). An unknown user goes through the same exchange and fails the same way as a wrong
//! password, so probing cannot tell which users exist.

use crate::stream::ClientStream;
use bytes::BytesMut;
use pgwarden_auth::{ScramError, ScramExchange};
use pgwarden_protocol::backend::{self, ErrorReport};
use pgwarden_protocol::frame::take_message;
use pgwarden_protocol::frontend;
use pgwarden_protocol::limits::MAX_AUTH_MESSAGE;
use pgwarden_protocol::sqlstate;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use std::time::Instant;

use tracing::warn;

use crate::credentials::{CredentialStore, Refresh};

/// Why authentication failed: the error for the client and the metric label.
pub struct AuthFailure {
    pub report: ErrorReport,
    pub reason: &'static str,
}

impl AuthFailure {
    fn new(reason: &'static str, code: &'static str, message: String) -> Self {
        Self {
            report: ErrorReport::fatal(code, message),
            reason,
        }
    }
}

/// Runs the SCRAM exchange for `user`. On success the client has been sent
/// AuthenticationSASLFinal and AuthenticationOk.
pub async fn authenticate(
    stream: &mut ClientStream,
    buf: &mut BytesMut,
    credentials: &CredentialStore,
    user: &str,
) -> Result<(), AuthFailure> {
    let logins = credentials.user(user).await;
    let secrets = logins
        .as_ref()
        .map(|l| l.scram_secrets(Instant::now()))
        .unwrap_or_default();
    let mut exchange = if secrets.is_empty() {
        if logins.is_some() {
            // Known user whose secret could not be read: fail like a wrong password so
            // the answer does not tell which users exist; the log says why.
            warn!(
                user,
                "no login for this user could be read from Secrets Manager"
            );
        }
        ScramExchange::doomed(user, credentials.mock_key())
    } else {
        ScramExchange::new(secrets).map_err(|e| {
            AuthFailure::new(
                "internal",
                sqlstate::INTERNAL_ERROR,
                format!("authentication setup failed: {e}"),
            )
        })?
    };
    let seen = logins.as_ref().map(|l| l.generation());
    let mut out = BytesMut::with_capacity(128);
    backend::authentication_sasl(&mut out, &[pgwarden_auth::scram::SCRAM_SHA_256]);
    send(stream, &out).await?;

    let first = read_password_message(stream, buf).await?;
    let (mechanism, data) = frontend::parse_sasl_initial_response(&first).map_err(protocol)?;
    let server_first = exchange
        .client_first(mechanism, data)
        .map_err(|e| scram(e, user))?;
    out.clear();
    backend::authentication_sasl_continue(&mut out, &server_first);
    send(stream, &out).await?;

    let last = read_password_message(stream, buf).await?;
    let server_final = match (exchange.client_final(&last), &logins, seen) {
        (Err(ScramError::InvalidProof), Some(logins), Some(seen)) if logins.has_secret() => {
            // The client may know a password rotated since pgwarden last read the secret.
            if credentials
                .refresh(logins, seen, Refresh::ClientRefused)
                .await
            {
                exchange
                    .replace_secrets(logins.scram_secrets(Instant::now()))
                    .and_then(|()| exchange.client_final(&last))
            } else {
                Err(ScramError::InvalidProof)
            }
        }
        (result, _, _) => result,
    }
    .map_err(|e| scram(e, user))?;
    out.clear();
    backend::authentication_sasl_final(&mut out, &server_final);
    backend::authentication_ok(&mut out);
    send(stream, &out).await
}

async fn send(stream: &mut ClientStream, bytes: &[u8]) -> Result<(), AuthFailure> {
    stream.write_all(bytes).await.map_err(|_| disconnected())?;
    stream.flush().await.map_err(|_| disconnected())
}

fn disconnected() -> AuthFailure {
    AuthFailure::new(
        "client_disconnected",
        sqlstate::CONNECTION_FAILURE,
        "client disconnected during authentication".to_owned(),
    )
}

fn protocol(e: pgwarden_protocol::ProtocolError) -> AuthFailure {
    AuthFailure::new(
        "protocol",
        sqlstate::PROTOCOL_VIOLATION,
        format!("invalid authentication message: {e}"),
    )
}

fn scram(e: ScramError, user: &str) -> AuthFailure {
    match e {
        ScramError::InvalidProof => AuthFailure::new(
            "wrong_password",
            sqlstate::INVALID_PASSWORD,
            format!("password authentication failed for user \"{user}\""),
        ),
        ScramError::UnsupportedMechanism | ScramError::ChannelBindingUnsupported => {
            AuthFailure::new(
                "unsupported_mechanism",
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!("{e}; pgwarden supports SCRAM-SHA-256 without channel binding"),
            )
        }
        other => AuthFailure::new(
            "protocol",
            sqlstate::PROTOCOL_VIOLATION,
            format!("invalid SCRAM exchange: {other}"),
        ),
    }
}

/// Reads the next message, which must be a PasswordMessage ('p') of bounded size.
async fn read_password_message(
    stream: &mut ClientStream,
    buf: &mut BytesMut,
) -> Result<bytes::Bytes, AuthFailure> {
    loop {
        match take_message(buf, MAX_AUTH_MESSAGE) {
            Ok(Some((frontend::PASSWORD, body))) => return Ok(body),
            Ok(Some((frontend::TERMINATE, _))) => return Err(disconnected()),
            Ok(Some((tag, _))) => {
                return Err(AuthFailure::new(
                    "protocol",
                    sqlstate::PROTOCOL_VIOLATION,
                    format!(
                        "expected a password message, got message type {:?}",
                        tag as char
                    ),
                ))
            }
            Ok(None) => {}
            Err(e) => return Err(protocol(e)),
        }
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(disconnected()),
            Ok(_) => {}
        }
    }
}

/// Who an IAM-authenticated client is.
pub struct IamIdentity {
    pub principal: String,
    pub rule: String,
}

/// IAM authentication: the client sends its token as a cleartext password, which is only
/// asked for over TLS (or plaintext loopback when explicitly allowed), then verified and
/// checked against the rules. Every decision is logged without the token.
pub async fn authenticate_iam(
    stream: &mut ClientStream,
    buf: &mut BytesMut,
    iam: &crate::app::Iam,
    user: &str,
    peer: std::net::SocketAddr,
) -> Result<IamIdentity, AuthFailure> {
    let transport_ok =
        stream.is_tls() || (iam.allow_plaintext_on_loopback && peer.ip().is_loopback());
    if !transport_ok {
        return Err(AuthFailure::new(
            "token_without_tls",
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            "IAM tokens are accepted only over TLS: connect with sslmode=require or stronger"
                .to_owned(),
        ));
    }
    let mut out = BytesMut::with_capacity(16);
    backend::authentication_cleartext(&mut out);
    send(stream, &out).await?;
    let body = read_password_message(stream, buf).await?;
    let token = frontend::parse_password(&body).map_err(protocol)?;
    let principal = iam.verifier.verify(token, user).await.map_err(|e| {
        let code = match e {
            pgwarden_auth::rds_token::TokenError::Unverifiable(_) => {
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION
            }
            _ => sqlstate::INVALID_PASSWORD,
        };
        AuthFailure::new(
            e.reason(),
            code,
            format!("IAM authentication failed for user \"{user}\": {e}"),
        )
    })?;
    let rule = pgwarden_auth::rules::authorize(&iam.rules, &principal, user).map_err(|e| {
        AuthFailure::new(
            "not_authorized",
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            format!("IAM authorization failed: {e}"),
        )
    })?;
    let identity = IamIdentity {
        principal: pgwarden_auth::rules::principal_of(&principal),
        rule: rule.to_owned(),
    };
    out.clear();
    backend::authentication_ok(&mut out);
    send(stream, &out).await?;
    Ok(identity)
}
