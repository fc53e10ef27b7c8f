//! IAM tokens in the format of `aws rds generate-db-auth-token`: a SigV4-presigned
//! `GET https://HOST:PORT/?Action=connect&DBUser=USER` without its scheme.
//!
//! pgwarden verifies them by recomputing the signature with secret keys it is configured
//! with (a third party never has an IAM principal's secret key, so this mode is for
//! development, tests and non-AWS environments; Lambda roles use the STS mode). The same
//! module generates tokens, byte-identical to boto3's, for `pgwarden token` and the tests.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::Secret;

/// Longest token accepted.
pub const MAX_TOKEN_LEN: usize = 4096;
/// Longest validity a token may claim, as AWS allows.
pub const MAX_EXPIRES: u64 = 900;
const SERVICE: &str = "rds-db";
const ALGORITHM: &str = "AWS4-HMAC-SHA256";
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// RFC 3986 unreserved characters stay; everything else is %XX (upper case).
pub(crate) const RFC3986: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Why a token was refused; each maps to an authentication failure reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    #[error("token is for database user {0:?}, not the user connecting")]
    WrongUser(String),
    #[error("token was made for another host ({0})")]
    WrongHost(String),
    #[error("token is signed with an unknown access key")]
    UnknownKey,
    #[error("token has expired")]
    Expired,
    #[error("token is dated in the future")]
    NotYetValid,
    #[error("token signature does not match")]
    BadSignature,
    #[error("the token could not be verified with STS: {0}")]
    Unverifiable(String),
}

impl TokenError {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Malformed(_) => "token_malformed",
            TokenError::WrongUser(_) => "token_wrong_user",
            TokenError::WrongHost(_) => "token_wrong_host",
            TokenError::UnknownKey => "token_unknown_key",
            TokenError::Expired => "token_expired",
            TokenError::NotYetValid => "token_not_yet_valid",
            TokenError::BadSignature => "token_bad_signature",
            TokenError::Unverifiable(_) => "sts_unavailable",
        }
    }
}

/// A key pgwarden may verify tokens with, and the principal it stands for.
#[derive(Debug, Clone)]
pub struct VerificationKey {
    pub secret: Secret,
    pub principal: String,
}

/// Verifies RDS tokens against configured keys and advertised host names.
#[derive(Debug, Clone)]
pub struct RdsTokenVerifier {
    keys: HashMap<String, VerificationKey>,
    /// `host:port` (lowercase) clients may sign tokens for.
    hosts: Vec<String>,
    max_skew: Duration,
}

/// A verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub principal: String,
    pub access_key_id: String,
    pub expires_at: SystemTime,
}

fn encode(s: &str) -> String {
    utf8_percent_encode(s, RFC3986).to_string()
}

/// The SigV4 parameters every presigned token carries (with its own action parameters).
const SIGV4_PARAMS: [&str; 7] = [
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Security-Token",
    "X-Amz-Signature",
];

/// A presigned URL's query: percent-decoded pairs, each name once, at most 12, none but
/// the SigV4 parameters and the given action parameters.
pub(crate) struct QueryParams(Vec<(String, String)>);

impl QueryParams {
    pub(crate) fn parse(query: &str, action_params: &[&str]) -> Result<Self, TokenError> {
        let decode = |s: &str| {
            percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| TokenError::Malformed("bad percent-encoding"))
        };
        let mut params: Vec<(String, String)> = Vec::new();
        for pair in query.split('&') {
            let (k, v) = pair
                .split_once('=')
                .ok_or(TokenError::Malformed("parameter without value"))?;
            let (k, v) = (decode(k)?, decode(v)?);
            if !SIGV4_PARAMS.contains(&k.as_str()) && !action_params.contains(&k.as_str()) {
                return Err(TokenError::Malformed("unexpected parameter"));
            }
            if params.iter().any(|(seen, _)| *seen == k) {
                return Err(TokenError::Malformed("repeated parameter"));
            }
            if params.len() >= 12 {
                return Err(TokenError::Malformed("too many parameters"));
            }
            params.push((k, v));
        }
        Ok(Self(params))
    }

    /// The value of `name`, which must be present.
    pub(crate) fn required(&self, name: &str) -> Result<&str, TokenError> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .ok_or(TokenError::Malformed("missing parameter"))
    }

    /// Every pair but the signature, for recomputing it.
    fn signed(&self) -> Vec<(&str, &str)> {
        self.0
            .iter()
            .filter(|(k, _)| k != "X-Amz-Signature")
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }
}

/// When a presigned request was signed and when it expires, checked against `now`: at most
/// 900 s of validity, not expired, not dated beyond `max_skew` in the future.
pub(crate) fn validity(
    date: &str,
    expires: &str,
    now: SystemTime,
    max_skew: Duration,
) -> Result<(SystemTime, SystemTime), TokenError> {
    let signed_at = parse_amz_date(date).ok_or(TokenError::Malformed("bad X-Amz-Date"))?;
    let expires: u64 = expires
        .parse()
        .map_err(|_| TokenError::Malformed("bad X-Amz-Expires"))?;
    if expires == 0 || expires > MAX_EXPIRES {
        return Err(TokenError::Malformed("X-Amz-Expires out of range"));
    }
    let expires_at = signed_at + Duration::from_secs(expires);
    if now > expires_at {
        return Err(TokenError::Expired);
    }
    if signed_at > now + max_skew {
        return Err(TokenError::NotYetValid);
    }
    Ok((signed_at, expires_at))
}

/// Parses `YYYYMMDDTHHMMSSZ`.
pub(crate) fn parse_amz_date(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hh, mm, ss) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y2, m2) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// Formats a time as `YYYYMMDDTHHMMSSZ`.
fn format_amz_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The signed `host` header value: lower-cased, port dropped when it is 443.
fn signed_host(authority: &str) -> String {
    let lower = authority.to_ascii_lowercase();
    match lower.strip_suffix(":443") {
        Some(host) => host.to_owned(),
        None => lower,
    }
}

fn signature(
    secret: &str,
    time: SystemTime,
    region: &str,
    canonical_query: &str,
    host: &str,
    date: &str,
) -> String {
    let canonical_request =
        format!("GET\n/\n{canonical_query}\nhost:{host}\n\nhost\n{EMPTY_SHA256}");
    let scope = format!("{}/{region}/{SERVICE}/aws4_request", &date[..8]);
    let string_to_sign = format!(
        "{ALGORITHM}\n{date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    );
    let key = aws_sigv4::sign::v4::generate_signing_key(secret, time, region, SERVICE);
    aws_sigv4::sign::v4::calculate_signature(key, string_to_sign.as_bytes())
}

fn canonical_query(params: &[(&str, &str)]) -> String {
    let mut encoded: Vec<(String, String)> =
        params.iter().map(|(k, v)| (encode(k), encode(v))).collect();
    encoded.sort();
    encoded
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// What a client needs to make a token.
pub struct TokenRequest<'a> {
    /// Host name and port as the client connects to them (case kept in the token).
    pub host: &'a str,
    pub port: u16,
    pub db_user: &'a str,
    pub region: &'a str,
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    pub session_token: Option<&'a str>,
    pub time: SystemTime,
}

/// Makes a token exactly as boto3's `generate_db_auth_token` does.
pub fn generate(req: &TokenRequest<'_>) -> String {
    let date = format_amz_date(req.time);
    let credential = format!(
        "{}/{}/{}/{SERVICE}/aws4_request",
        req.access_key_id,
        &date[..8],
        req.region
    );
    let mut params = vec![
        ("Action", "connect"),
        ("DBUser", req.db_user),
        ("X-Amz-Algorithm", ALGORITHM),
        ("X-Amz-Credential", credential.as_str()),
        ("X-Amz-Date", date.as_str()),
        ("X-Amz-Expires", "900"),
        ("X-Amz-SignedHeaders", "host"),
    ];
    if let Some(token) = req.session_token {
        params.push(("X-Amz-Security-Token", token));
    }
    let authority = format!("{}:{}", req.host, req.port);
    let sig = signature(
        req.secret_access_key,
        req.time,
        req.region,
        &canonical_query(&params),
        &signed_host(&authority),
        &date,
    );
    let query: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{k}={}", encode(v)))
        .collect();
    format!("{authority}/?{}&X-Amz-Signature={sig}", query.join("&"))
}

impl RdsTokenVerifier {
    /// `hosts` are the `host:port` names pgwarden is reached by.
    pub fn new(
        keys: HashMap<String, VerificationKey>,
        hosts: &[String],
        max_skew: Duration,
    ) -> Self {
        Self {
            keys,
            hosts: hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
            max_skew,
        }
    }

    /// Verifies `token` for a client connecting as `db_user` at time `now`.
    pub fn verify(
        &self,
        token: &str,
        db_user: &str,
        now: SystemTime,
    ) -> Result<Verified, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed("too long"));
        }
        let (authority, query) = token
            .split_once("/?")
            .ok_or(TokenError::Malformed("no query"))?;
        let params = QueryParams::parse(query, &["Action", "DBUser"])?;
        let required = |name: &str| params.required(name);
        if required("Action")? != "connect" {
            return Err(TokenError::Malformed("action is not connect"));
        }
        if required("X-Amz-Algorithm")? != ALGORITHM || required("X-Amz-SignedHeaders")? != "host" {
            return Err(TokenError::Malformed("unsupported signing"));
        }
        let user = required("DBUser")?;
        if user != db_user {
            return Err(TokenError::WrongUser(user.to_owned()));
        }
        let host = authority.to_ascii_lowercase();
        if !self.hosts.contains(&host) {
            return Err(TokenError::WrongHost(authority.to_owned()));
        }
        let date = required("X-Amz-Date")?;
        let (signed_at, expires_at) =
            validity(date, required("X-Amz-Expires")?, now, self.max_skew)?;
        let credential = required("X-Amz-Credential")?;
        let parts: Vec<&str> = credential.split('/').collect();
        let [akid, scope_date, region, service, terminator] = parts[..] else {
            return Err(TokenError::Malformed("bad credential scope"));
        };
        if service != SERVICE || terminator != "aws4_request" || scope_date != &date[..8] {
            return Err(TokenError::Malformed("bad credential scope"));
        }
        let key = self.keys.get(akid).ok_or(TokenError::UnknownKey)?;
        let signed = params.signed();
        let expected = signature(
            key.secret.expose(),
            signed_at,
            region,
            &canonical_query(&signed),
            &signed_host(authority),
            date,
        );
        let given = required("X-Amz-Signature")?;
        if !bool::from(expected.as_bytes().ct_eq(given.as_bytes())) {
            return Err(TokenError::BadSignature);
        }
        Ok(Verified {
            principal: key.principal.clone(),
            access_key_id: akid.to_owned(),
            expires_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vectors() -> serde_json::Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/data/rds-token-vector.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).expect("vector file")).expect("json")
    }

    fn verifier(v: &serde_json::Value, host: &str) -> RdsTokenVerifier {
        let mut keys = HashMap::new();
        keys.insert(
            v["credentials"]["access_key_id"]
                .as_str()
                .expect("akid")
                .to_owned(),
            VerificationKey {
                secret: Secret::new(
                    v["credentials"]["secret_access_key"]
                        .as_str()
                        .expect("secret"),
                ),
                principal: "arn:aws:iam::123456789012:user/dev".into(),
            },
        );
        RdsTokenVerifier::new(keys, &[host.to_owned()], Duration::from_secs(60))
    }

    #[test]
    fn generates_and_verifies_every_known_answer_vector() {
        let v = vectors();
        let time = UNIX_EPOCH + Duration::from_secs(v["time_unix"].as_u64().expect("time"));
        for case in v["cases"].as_array().expect("cases") {
            let host = case["hostname"].as_str().expect("host");
            let port = case["port"].as_u64().expect("port") as u16;
            let user = case["db_user"].as_str().expect("user");
            let expected = case["expected_token"].as_str().expect("token");
            let token = generate(&TokenRequest {
                host,
                port,
                db_user: user,
                region: case["region"].as_str().expect("region"),
                access_key_id: v["credentials"]["access_key_id"].as_str().expect("akid"),
                secret_access_key: v["credentials"]["secret_access_key"]
                    .as_str()
                    .expect("secret"),
                session_token: case["session_token"].as_str(),
                time,
            });
            assert_eq!(token, expected, "{}", case["name"]);
            let verified = verifier(&v, &format!("{host}:{port}"))
                .verify(expected, user, time + Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("{}: {e}", case["name"]));
            assert_eq!(verified.access_key_id, "AKIDEXAMPLE");
        }
    }

    #[test]
    fn refuses_tampered_misdirected_expired_and_malformed_tokens() {
        let v = vectors();
        let time = UNIX_EPOCH + Duration::from_secs(v["time_unix"].as_u64().expect("time"));
        let case = &v["cases"][0];
        let token = case["expected_token"].as_str().expect("token");
        let host = format!("{}:{}", case["hostname"].as_str().expect("h"), case["port"]);
        let ok = verifier(&v, &host);
        let at = time + Duration::from_secs(1);
        assert_eq!(
            ok.verify(token, "other_user", at),
            Err(TokenError::WrongUser("app_user".into()))
        );
        let tampered_user = token.replace("DBUser=app_user", "DBUser=admin");
        assert_eq!(
            ok.verify(&tampered_user, "admin", at),
            Err(TokenError::BadSignature)
        );
        let tampered_sig = format!("{}0", &token[..token.len() - 1]);
        assert_eq!(
            ok.verify(&tampered_sig, "app_user", at),
            Err(TokenError::BadSignature)
        );
        assert!(matches!(
            verifier(&v, "other:5432").verify(token, "app_user", at),
            Err(TokenError::WrongHost(_))
        ));
        assert_eq!(
            ok.verify(token, "app_user", time + Duration::from_secs(901)),
            Err(TokenError::Expired)
        );
        assert_eq!(
            ok.verify(token, "app_user", time - Duration::from_secs(120)),
            Err(TokenError::NotYetValid)
        );
        let mut wrong_key = ok.clone();
        wrong_key
            .keys
            .values_mut()
            .for_each(|k| k.secret = Secret::new("not the secret"));
        assert_eq!(
            wrong_key.verify(token, "app_user", at),
            Err(TokenError::BadSignature)
        );
        let unknown = token.replace("AKIDEXAMPLE", "AKIDUNKNOWN");
        assert_eq!(
            ok.verify(&unknown, "app_user", at),
            Err(TokenError::UnknownKey)
        );
        for bad in [
            "no-query-at-all",
            &token.replace("Action=connect", "Action=connect&Action=connect"),
            &token.replace("X-Amz-Expires=900", "X-Amz-Expires=3600"),
            &token.replace("Action=connect", "Action=other"),
            &format!("{token}&Extra=1"),
            &"x".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert!(
                matches!(
                    ok.verify(bad, "app_user", at),
                    Err(TokenError::Malformed(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn amz_dates_round_trip() {
        let t = UNIX_EPOCH + Duration::from_secs(1_705_322_096);
        assert_eq!(format_amz_date(t), "20240115T123456Z");
        assert_eq!(parse_amz_date("20240115T123456Z"), Some(t));
        assert_eq!(parse_amz_date("20241315T123456Z"), None);
        assert_eq!(parse_amz_date("2024-01-15T12:3"), None);
    }
}
