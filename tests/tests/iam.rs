//! IAM authentication with `rds-token` tokens: a valid token for an allowed principal gets
//! in (over TLS, with psql), and every kind of bad token, a principal with no rule and a
//! token on a plaintext connection are refused with 28P01 or 28000 and a clear message.

use std::process::Command;
use std::time::{Duration, SystemTime};

use pgwarden_auth::rds_token::{generate, TokenRequest};
use pgwarden_tests::{pg_bindir, PgCluster, Pgwarden, PgwardenOptions};
use tokio_postgres::error::SqlState;

const KEY_ID: &str = "AKIDPGWARDENTEST";
const SECRET: &str = "test-secret-access-key";
const SECRET_ENV: &str = "PGWARDEN_TEST_IAM_SECRET";

fn iam_toml(advertised: &str, allow_plaintext: bool) -> String {
    format!(
        r#"[iam]
verifier = "rds-token"
advertised_hosts = ["{advertised}"]
allow_plaintext_on_loopback = {allow_plaintext}

[[iam.keys]]
access_key_id = "{KEY_ID}"
secret_access_key_env = "{SECRET_ENV}"
principal = "arn:aws:sts::123456789012:assumed-role/orders-fn/lambda-session"

[[iam.keys]]
access_key_id = "AKIDNORULE"
secret_access_key_env = "{SECRET_ENV}"
principal = "arn:aws:iam::123456789012:user/stranger"

[[iam.rules]]
principal = "arn:aws:iam::123456789012:role/orders-*"
database_users = ["app"]
"#
    )
}

async fn start(tls: bool, allow_plaintext: bool) -> (PgCluster, Pgwarden) {
    // The secret reaches pgwarden through its environment, as in production.
    std::env::set_var(SECRET_ENV, SECRET);
    let cluster = PgCluster::start();
    // The harness puts the listen port in place of __PORT__.
    let pgwarden = Pgwarden::start(
        &cluster,
        PgwardenOptions {
            tls,
            extra_target_toml: "client_auth = \"iam\"".into(),
            extra_toml: iam_toml("localhost:__PORT__", allow_plaintext),
            ..PgwardenOptions::default()
        },
    )
    .await;
    (cluster, pgwarden)
}

fn token(pgwarden: &Pgwarden, user: &str, key_id: &str, secret: &str, time: SystemTime) -> String {
    generate(&TokenRequest {
        host: "localhost",
        port: pgwarden.port(),
        db_user: user,
        region: "us-east-1",
        access_key_id: key_id,
        secret_access_key: secret,
        session_token: None,
        time,
    })
}

#[tokio::test]
async fn a_valid_token_for_an_allowed_role_connects_over_tls_and_queries() {
    let (_cluster, pgwarden) = start(true, false).await;
    let ca = pgwarden.ca_path().display().to_string();
    let token = token(&pgwarden, "app", KEY_ID, SECRET, SystemTime::now());
    let out = Command::new(pg_bindir().join("psql"))
        .args([
            "-XAtq",
            &format!(
                "host=localhost port={} user=app dbname=app sslmode=verify-full sslrootcert={ca}",
                pgwarden.port()
            ),
            "-c",
            "select current_user",
        ])
        .env("PGPASSWORD", &token)
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        pgwarden.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "app");
    assert!(
        !pgwarden.log().contains(&token),
        "the token is never logged"
    );
    assert!(
        pgwarden
            .log()
            .contains("arn:aws:iam::123456789012:role/orders-fn"),
        "the decision is logged with the role"
    );
}

/// `token` with its last character (part of the signature) changed.
fn tampered(token: &str) -> String {
    let (head, last) = token.split_at(token.len() - 1);
    format!("{head}{}", if last == "0" { "1" } else { "0" })
}

#[tokio::test]
async fn bad_tokens_and_principals_without_a_rule_are_refused_with_clear_errors() {
    let (_cluster, pgwarden) = start(false, true).await;
    let now = SystemTime::now();
    let good = token(&pgwarden, "app", KEY_ID, SECRET, now);
    let cases = [
        (
            "expired",
            token(
                &pgwarden,
                "app",
                KEY_ID,
                SECRET,
                now - Duration::from_secs(1000),
            ),
            SqlState::INVALID_PASSWORD,
            "expired",
        ),
        (
            "for another user",
            token(&pgwarden, "other", KEY_ID, SECRET, now),
            SqlState::INVALID_PASSWORD,
            "database user",
        ),
        (
            "tampered",
            tampered(&good),
            SqlState::INVALID_PASSWORD,
            "signature",
        ),
        (
            "unknown key",
            token(&pgwarden, "app", "AKIDUNKNOWN", SECRET, now),
            SqlState::INVALID_PASSWORD,
            "unknown access key",
        ),
        (
            "wrong secret",
            token(&pgwarden, "app", KEY_ID, "other-secret", now),
            SqlState::INVALID_PASSWORD,
            "signature",
        ),
        (
            "another deployment",
            good.replacen("localhost", "elsewhere", 1),
            SqlState::INVALID_PASSWORD,
            "another host",
        ),
        (
            "no rule",
            token(&pgwarden, "app", "AKIDNORULE", SECRET, now),
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            "no rule allows",
        ),
    ];
    for (name, token, code, words) in cases {
        pgwarden
            .assert_login_refused(name, "app", &token, &code, words)
            .await;
    }
    // The good token works on this loopback-plaintext development setup.
    let client = pgwarden
        .try_connect("app", &good, "app")
        .await
        .expect("good token");
    client.simple_query("select 1").await.expect("query");
    let metrics = pgwarden.metrics().await;
    assert!(
        metrics.contains("pgwarden_client_auth_failures_total{reason=\"token_expired\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pgwarden_client_auth_failures_total{reason=\"not_authorized\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_token_is_never_asked_for_on_a_plaintext_connection() {
    let (_cluster, pgwarden) = start(false, false).await;
    let good = token(&pgwarden, "app", KEY_ID, SECRET, SystemTime::now());
    pgwarden
        .assert_login_refused(
            "token over plaintext",
            "app",
            &good,
            &SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            "only over TLS",
        )
        .await;
}
