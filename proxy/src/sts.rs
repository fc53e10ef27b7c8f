//! The `sts` IAM verifier: executes a client's presigned GetCallerIdentity request against
//! the allow-listed STS endpoint it names, with pgwarden's own server id and the startup
//! user as the two bound headers, and reads the caller's ARN from the answer. Verified
//! identities are cached until their token expires (bounded).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use pgwarden_auth::rds_token::TokenError;
use pgwarden_auth::sts_token::{self, Endpoint, StsRequest, DB_USER_HEADER, SERVER_ID_HEADER};
use prometheus::IntCounterVec;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Most verified identities cached at once.
const CACHE_LIMIT: usize = 10_000;
/// Largest STS answer read.
const MAX_RESPONSE: usize = 64 * 1024;

pub struct StsVerifier {
    allowed: Vec<Endpoint>,
    server_id: String,
    timeout: Duration,
    max_skew: Duration,
    tls: TlsConnector,
    cache: Mutex<HashMap<[u8; 32], (String, SystemTime)>>,
    /// `pgwarden_sts_requests_total{outcome}`.
    requests: IntCounterVec,
}

impl StsVerifier {
    pub fn new(
        allowed: Vec<Endpoint>,
        server_id: String,
        timeout: Duration,
        max_skew: Duration,
        requests: IntCounterVec,
    ) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports rustls's default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        Self {
            allowed,
            server_id,
            timeout,
            max_skew,
            tls: TlsConnector::from(Arc::new(config)),
            cache: Mutex::new(HashMap::new()),
            requests,
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], (String, SystemTime)>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The caller ARN of a valid token for `db_user`.
    pub async fn verify(
        &self,
        token: &str,
        db_user: &str,
        now: SystemTime,
    ) -> Result<String, TokenError> {
        let request = sts_token::check(token, &self.allowed, now, self.max_skew)?;
        let key: [u8; 32] = Sha256::new()
            .chain_update(token.as_bytes())
            .chain_update([0])
            .chain_update(db_user.as_bytes())
            .finalize()
            .into();
        if let Some((arn, expires)) = self.cache().get(&key) {
            if *expires > now {
                self.requests.with_label_values(&["cached"]).inc();
                return Ok(arn.clone());
            }
        }
        let answer = tokio::time::timeout(self.timeout, self.execute(&request, db_user)).await;
        let (status, body) = match answer {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                self.requests.with_label_values(&["unreachable"]).inc();
                return Err(TokenError::Unverifiable(e));
            }
            Err(_) => {
                self.requests.with_label_values(&["timeout"]).inc();
                return Err(TokenError::Unverifiable(format!(
                    "no answer within {:?}",
                    self.timeout
                )));
            }
        };
        let result = interpret(status, &body);
        self.requests
            .with_label_values(&[if result.is_ok() {
                "verified"
            } else {
                "refused"
            }])
            .inc();
        let arn = result?;
        let mut cache = self.cache();
        if cache.len() >= CACHE_LIMIT {
            cache.retain(|_, (_, expires)| *expires > now);
        }
        if cache.len() < CACHE_LIMIT {
            cache.insert(key, (arn.clone(), request.expires_at));
        }
        Ok(arn)
    }

    async fn execute(&self, request: &StsRequest, db_user: &str) -> Result<(u16, String), String> {
        let endpoint = &request.endpoint;
        let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|e| format!("connecting to {}: {e}", endpoint.url()))?;
        if endpoint.https {
            let name = crate::tls::server_name(&endpoint.host).map_err(|e| e.to_string())?;
            let tls = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with STS: {e}"))?;
            self.send(tls, request, db_user).await
        } else {
            self.send(tcp, request, db_user).await
        }
    }

    async fn send<T>(
        &self,
        io: T,
        request: &StsRequest,
        db_user: &str,
    ) -> Result<(u16, String), String>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let http_request = hyper::Request::get(request.path_and_query.as_str())
            .header(hyper::header::HOST, request.authority.as_str())
            .header(SERVER_ID_HEADER, self.server_id.as_str())
            .header(DB_USER_HEADER, db_user)
            .header(hyper::header::ACCEPT, "text/xml")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(http_request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

fn element<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{name}>"))? + start;
    Some(&xml[start..end])
}

/// Maps STS's answer to the caller's ARN or the reason it refused.
fn interpret(status: u16, body: &str) -> Result<String, TokenError> {
    if status == 200 {
        return element(body, "Arn")
            .filter(|arn| arn.starts_with("arn:"))
            .map(str::to_owned)
            .ok_or_else(|| TokenError::Unverifiable("STS answered without an ARN".into()));
    }
    match element(body, "Code") {
        Some("SignatureDoesNotMatch") => Err(TokenError::BadSignature),
        Some("InvalidClientTokenId") => Err(TokenError::UnknownKey),
        Some("ExpiredToken" | "RequestExpired") => Err(TokenError::Expired),
        Some(code) if status < 500 => Err(TokenError::Unverifiable(format!("STS refused: {code}"))),
        _ => Err(TokenError::Unverifiable(format!(
            "STS answered HTTP {status}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sts_answers_map_to_identities_and_reasons() {
        let ok = "<GetCallerIdentityResponse><GetCallerIdentityResult><Arn>arn:aws:sts::1:assumed-role/r/s</Arn></GetCallerIdentityResult></GetCallerIdentityResponse>";
        assert_eq!(
            interpret(200, ok),
            Ok("arn:aws:sts::1:assumed-role/r/s".into())
        );
        let err = |code: &str| {
            format!("<ErrorResponse><Error><Code>{code}</Code></Error></ErrorResponse>")
        };
        assert_eq!(
            interpret(403, &err("SignatureDoesNotMatch")),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            interpret(403, &err("InvalidClientTokenId")),
            Err(TokenError::UnknownKey)
        );
        assert_eq!(
            interpret(403, &err("ExpiredToken")),
            Err(TokenError::Expired)
        );
        assert!(matches!(
            interpret(500, "oops"),
            Err(TokenError::Unverifiable(_))
        ));
        assert!(matches!(
            interpret(200, "<Arn>not-an-arn</Arn>"),
            Err(TokenError::Unverifiable(_))
        ));
    }
}
