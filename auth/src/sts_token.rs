//! IAM tokens for the `sts` verifier: a presigned STS `GetCallerIdentity` request, which a
//! third party can verify for any principal (Lambda execution roles included) by executing
//! it — the approach of aws-iam-authenticator and Vault's IAM auth.
//!
//! Token: `pgwarden-sts:` + base64url(presigned URL). The request signs two extra headers,
//! `x-pgwarden-server-id` and `x-pgwarden-db-user`, whose values the client does not send:
//! pgwarden supplies its own server id and the startup user when it executes the request, so
//! a token only verifies at the deployment and for the database user it was made for.
//!
//! This module checks a token strictly *before* any network call (allow-listed STS
//! endpoint, scheme, action, version, signed headers, expiry, skew) and makes tokens for
//! clients. Executing the request is the proxy's job.

use std::time::{Duration, SystemTime};

use base64::Engine;

use crate::rds_token::{validity, QueryParams, TokenError, MAX_EXPIRES};

pub const TOKEN_PREFIX: &str = "pgwarden-sts:";
pub const SERVER_ID_HEADER: &str = "x-pgwarden-server-id";
pub const DB_USER_HEADER: &str = "x-pgwarden-db-user";
const SIGNED_HEADERS: &str = "host;x-pgwarden-db-user;x-pgwarden-server-id";
const MAX_TOKEN_LEN: usize = 8192;

/// An STS endpoint tokens may point at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub https: bool,
    /// Lower-case host name or IP address.
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    /// The global and regional AWS endpoints for `regions`.
    pub fn aws(regions: &[String]) -> Vec<Endpoint> {
        let mut endpoints = vec![Endpoint {
            https: true,
            host: "sts.amazonaws.com".into(),
            port: 443,
        }];
        for region in regions {
            endpoints.push(Endpoint {
                https: true,
                host: format!("sts.{}.amazonaws.com", region.to_ascii_lowercase()),
                port: 443,
            });
        }
        endpoints
    }

    /// Parses `scheme://host[:port]` of a configured endpoint (for a local emulator).
    /// Plain http is allowed only for a loopback IP address.
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!(
                "{url:?}: endpoint must start with https:// or http://"
            ));
        };
        let authority = rest.trim_end_matches('/');
        let (host, port) = split_authority(authority, https)
            .ok_or_else(|| format!("{url:?}: bad host or port"))?;
        if !https
            && !host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
        {
            return Err(format!(
                "{url:?}: plain http is allowed only on a loopback address"
            ));
        }
        Ok(Endpoint { https, host, port })
    }

    /// The base URL.
    pub fn url(&self) -> String {
        format!(
            "{}://{}:{}",
            if self.https { "https" } else { "http" },
            self.host,
            self.port
        )
    }
}

fn split_authority(authority: &str, https: bool) -> Option<(String, u16)> {
    if authority.is_empty()
        || authority.contains(['@', '\\', '%', '/', '?', '#', ' '])
        || !authority.is_ascii()
    {
        return None;
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().ok()?),
        None => (authority, if https { 443 } else { 80 }),
    };
    if host.is_empty() {
        return None;
    }
    Some((host.to_ascii_lowercase(), port))
}

/// A token that passed every check that needs no network call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StsRequest {
    /// The presigned URL to execute (GET), as the client signed it.
    pub url: String,
    /// `host[:port]` exactly as in the URL: the signed Host header.
    pub authority: String,
    /// `/?query`, the request target.
    pub path_and_query: String,
    pub endpoint: Endpoint,
    pub expires_at: SystemTime,
}

/// Checks `token` against the allow-list and the request shape pgwarden accepts.
pub fn check(
    token: &str,
    allowed: &[Endpoint],
    now: SystemTime,
    max_skew: Duration,
) -> Result<StsRequest, TokenError> {
    let encoded = token
        .strip_prefix(TOKEN_PREFIX)
        .ok_or(TokenError::Malformed("not an sts token"))?;
    if encoded.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed("too long"));
    }
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded.trim_end_matches('='))
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or(TokenError::Malformed("not base64url text"))?;
    let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(TokenError::Malformed("not an http(s) URL"));
    };
    let (authority, path_query) =
        rest.split_at(rest.find('/').ok_or(TokenError::Malformed("no path"))?);
    let query = path_query
        .strip_prefix("/?")
        .ok_or(TokenError::Malformed("path must be / with a query"))?;
    if query.contains('#') {
        return Err(TokenError::Malformed("fragment in URL"));
    }
    let (host, port) =
        split_authority(authority, https).ok_or(TokenError::Malformed("bad host"))?;
    let endpoint = Endpoint { https, host, port };
    if !allowed.contains(&endpoint) {
        return Err(TokenError::WrongHost(format!(
            "{}:{}",
            endpoint.host, endpoint.port
        )));
    }
    let params = QueryParams::parse(query, &["Action", "Version"])?;
    let get = |name: &str| params.required(name);
    if get("Action")? != "GetCallerIdentity" || get("Version")? != "2011-06-15" {
        return Err(TokenError::Malformed("not GetCallerIdentity 2011-06-15"));
    }
    if get("X-Amz-Algorithm")? != "AWS4-HMAC-SHA256" {
        return Err(TokenError::Malformed("unsupported signing"));
    }
    if get("X-Amz-SignedHeaders")? != SIGNED_HEADERS {
        return Err(TokenError::Malformed(
            "token is not bound to a pgwarden server and user",
        ));
    }
    let credential = get("X-Amz-Credential")?;
    if credential.split('/').nth(3) != Some("sts") {
        return Err(TokenError::Malformed("credential scope is not sts"));
    }
    get("X-Amz-Signature")?;
    let (_, expires_at) = validity(get("X-Amz-Date")?, get("X-Amz-Expires")?, now, max_skew)?;
    Ok(StsRequest {
        authority: authority.to_owned(),
        path_and_query: path_query.to_owned(),
        url: url.clone(),
        endpoint,
        expires_at,
    })
}

/// What a client needs to make an `sts` token.
pub struct StsTokenRequest<'a> {
    /// Base URL of the STS endpoint, e.g. `https://sts.us-east-1.amazonaws.com`.
    pub endpoint: &'a str,
    pub region: &'a str,
    pub server_id: &'a str,
    pub db_user: &'a str,
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    pub session_token: Option<&'a str>,
    pub time: SystemTime,
}

/// Makes an `sts` token (aws-sigv4 presigning).
pub fn generate(req: &StsTokenRequest<'_>) -> Result<String, String> {
    use aws_sigv4::http_request::{
        sign, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
    };
    let credentials = aws_credential_types::Credentials::new(
        req.access_key_id,
        req.secret_access_key,
        req.session_token.map(str::to_owned),
        None,
        "pgwarden",
    );
    let identity = credentials.into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(Duration::from_secs(MAX_EXPIRES));
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(req.region)
        .name("sts")
        .time(req.time)
        .settings(settings)
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let base = format!(
        "{}/?Action=GetCallerIdentity&Version=2011-06-15",
        req.endpoint.trim_end_matches('/')
    );
    let headers = [
        (SERVER_ID_HEADER, req.server_id),
        (DB_USER_HEADER, req.db_user),
    ];
    let signable =
        SignableRequest::new("GET", &base, headers.into_iter(), SignableBody::Bytes(&[]))
            .map_err(|e| e.to_string())?;
    let (instructions, _) = sign(signable, &params)
        .map_err(|e| e.to_string())?
        .into_parts();
    let mut url = base;
    for (name, value) in instructions.params() {
        url.push('&');
        url.push_str(name);
        url.push('=');
        url.push_str(
            &percent_encoding::utf8_percent_encode(value, crate::rds_token::RFC3986).to_string(),
        );
    }
    Ok(format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(url)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints() -> Vec<Endpoint> {
        let mut e = Endpoint::aws(&["us-east-1".into()]);
        e.push(Endpoint::parse("http://127.0.0.1:5000").expect("loopback"));
        e
    }

    fn token_for(endpoint: &str, time: SystemTime) -> String {
        generate(&StsTokenRequest {
            endpoint,
            region: "us-east-1",
            server_id: "prod-proxy",
            db_user: "app",
            access_key_id: "AKIDEXAMPLE",
            secret_access_key: "secret",
            session_token: Some("session"),
            time,
        })
        .expect("generate")
    }

    fn url_of(token: &str) -> String {
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.strip_prefix(TOKEN_PREFIX).expect("prefix"))
            .expect("b64");
        String::from_utf8(b).expect("utf8")
    }

    fn with_url(url: &str) -> String {
        format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(url)
        )
    }

    #[test]
    fn a_generated_token_passes_the_checks_for_its_endpoint() {
        let now = SystemTime::now();
        for endpoint in [
            "https://sts.us-east-1.amazonaws.com",
            "https://sts.amazonaws.com",
            "http://127.0.0.1:5000",
        ] {
            let token = token_for(endpoint, now);
            let checked =
                check(&token, &endpoints(), now, Duration::from_secs(60)).expect(endpoint);
            assert!(
                checked.url.contains(
                    "X-Amz-SignedHeaders=host%3Bx-pgwarden-db-user%3Bx-pgwarden-server-id"
                ),
                "{}",
                checked.url
            );
            assert!(checked.expires_at > now);
        }
    }

    #[test]
    fn hosts_off_the_allow_list_and_tricks_are_refused_before_any_request() {
        let now = SystemTime::now();
        let url = url_of(&token_for("https://sts.us-east-1.amazonaws.com", now));
        let query = &url[url.find("/?").expect("query")..];
        for bad in [
            "https://sts.us-east-1.amazonaws.com.evil.example",
            "https://evil.example",
            "https://sts.amazonaws.com@evil.example",
            "https://evil.example#@sts.amazonaws.com",
            "http://sts.us-east-1.amazonaws.com",
            "https://sts.us-east-1.amazonaws.com:444",
            "http://127.0.0.2:5000",
            "https://sts.us-west-2.amazonaws.com",
            "https://STS.US-EAST-1.AMAZONAWS.COM%2e",
        ] {
            let token = with_url(&format!("{bad}{query}"));
            let err = check(&token, &endpoints(), now, Duration::from_secs(60)).expect_err(bad);
            assert!(
                matches!(err, TokenError::WrongHost(_) | TokenError::Malformed(_)),
                "{bad}: {err:?}"
            );
        }
        assert!(
            Endpoint::parse("http://10.0.0.5:5000").is_err(),
            "plain http only on loopback"
        );
        assert!(Endpoint::parse("https://user@sts.example").is_err());
    }

    #[test]
    fn the_request_shape_is_checked_strictly() {
        let now = SystemTime::now();
        let url = url_of(&token_for("https://sts.us-east-1.amazonaws.com", now));
        let skew = Duration::from_secs(60);
        for (bad, why) in [
            (url.replace("GetCallerIdentity", "AssumeRole"), "action"),
            (url.replace("2011-06-15", "2012-01-01"), "version"),
            (
                url.replace("X-Amz-Expires=900", "X-Amz-Expires=3600"),
                "expires",
            ),
            (url.replace("x-pgwarden-db-user%3B", ""), "unbound"),
            (format!("{url}&Extra=1"), "extra parameter"),
            (
                url.replace(
                    "Action=GetCallerIdentity",
                    "Action=GetCallerIdentity&Action=GetCallerIdentity",
                ),
                "repeated",
            ),
        ] {
            assert!(
                check(&with_url(&bad), &endpoints(), now, skew).is_err(),
                "{why}"
            );
        }
        let token = with_url(&url);
        assert_eq!(
            check(&token, &endpoints(), now + Duration::from_secs(901), skew),
            Err(TokenError::Expired)
        );
        assert_eq!(
            check(&token, &endpoints(), now - Duration::from_secs(120), skew),
            Err(TokenError::NotYetValid)
        );
        assert!(check("pgwarden-sts:!!!", &endpoints(), now, skew).is_err());
        assert!(check("plain-password", &endpoints(), now, skew).is_err());
    }
}
