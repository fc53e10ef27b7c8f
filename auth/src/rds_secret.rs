//! The standard RDS secret a Secrets Manager secret holds for a database login:
//! `{"username", "password", "host", "port", "dbname", "engine"}` (the port as a number or a
//! string, as different rotation templates write it).

use serde::Deserialize;

use crate::Secret;

/// A database login read from a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdsSecret {
    pub username: String,
    pub password: Secret,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub dbname: Option<String>,
}

#[derive(Deserialize)]
struct Raw {
    username: String,
    password: Secret,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    port: Option<serde_json::Value>,
    #[serde(default)]
    dbname: Option<String>,
}

/// Why a secret's value is not a usable login. Never quotes the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretFormatError {
    #[error("the secret is not JSON with string fields username and password")]
    NotRdsJson,
    #[error("the secret's port is neither a number nor a numeric string")]
    BadPort,
    #[error("the secret's username or password is empty")]
    Empty,
}

impl RdsSecret {
    pub fn parse(text: &str) -> Result<Self, SecretFormatError> {
        let raw: Raw = serde_json::from_str(text).map_err(|_| SecretFormatError::NotRdsJson)?;
        let port = match raw.port {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Number(n)) => Some(
                n.as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .ok_or(SecretFormatError::BadPort)?,
            ),
            Some(serde_json::Value::String(s)) => {
                Some(s.trim().parse().map_err(|_| SecretFormatError::BadPort)?)
            }
            Some(_) => return Err(SecretFormatError::BadPort),
        };
        if raw.username.is_empty() || raw.password.expose().is_empty() {
            return Err(SecretFormatError::Empty);
        }
        Ok(Self {
            username: raw.username,
            password: raw.password,
            host: raw.host,
            port,
            dbname: raw.dbname,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_rds_secret_with_a_numeric_or_string_port() {
        let s = RdsSecret::parse(
            r#"{"username":"app","password":"pw","host":"db","port":5432,"dbname":"app","engine":"postgres"}"#,
        )
        .expect("valid");
        assert_eq!(
            (s.username.as_str(), s.password.expose(), s.port),
            ("app", "pw", Some(5432))
        );
        let s =
            RdsSecret::parse(r#"{"username":"app","password":"pw","port":"6432"}"#).expect("valid");
        assert_eq!(s.port, Some(6432));
    }

    #[test]
    fn refuses_unusable_secrets_without_quoting_them() {
        for (text, err) in [
            ("not json at all s3cret", SecretFormatError::NotRdsJson),
            (r#"{"username":"app"}"#, SecretFormatError::NotRdsJson),
            (
                r#"{"username":"app","password":"s3cret","port":"x"}"#,
                SecretFormatError::BadPort,
            ),
            (
                r#"{"username":"app","password":"s3cret","port":70000}"#,
                SecretFormatError::BadPort,
            ),
            (
                r#"{"username":"","password":"s3cret"}"#,
                SecretFormatError::Empty,
            ),
        ] {
            let got = RdsSecret::parse(text).expect_err(text);
            assert_eq!(got, err);
            assert!(!got.to_string().contains("s3cret"));
        }
    }
}
