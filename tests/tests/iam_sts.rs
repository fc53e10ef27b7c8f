//! IAM authentication with `sts` tokens against the local AWS emulator, which checks
//! signatures like STS: tokens from pgwarden's own code and from boto3 get in; expired,
//! misdirected, tampered, unknown and off-allow-list tokens and roles without a rule are
//! refused (off-allow-list ones without any request); a burst of 500 TLS logins with one
//! token costs one STS call.

use std::io::Write;
use std::process::Command;
use std::time::{Duration, SystemTime};

use pgwarden_auth::sts_token::{generate, StsTokenRequest};
use pgwarden_tests::{
    assert_pgbench_clean, metric_sum, pg_bindir, pgbench, AwsEmulator, PgCluster, Pgwarden,
    PgwardenOptions,
};
use tokio_postgres::error::SqlState;

const SERVER_ID: &str = "pgwarden-test";

fn iam_toml(emulator: &AwsEmulator, allow_plaintext: bool) -> String {
    format!(
        r#"[iam]
verifier = "sts"
server_id = "{SERVER_ID}"
sts_endpoints = ["{}"]
allow_plaintext_on_loopback = {allow_plaintext}

[[iam.rules]]
principal = "arn:aws:iam::123456789012:role/orders-*"
database_users = ["app"]
"#,
        emulator.endpoint()
    )
}

async fn start(tls: bool, allow_plaintext: bool) -> (PgCluster, Pgwarden, &'static AwsEmulator) {
    let emulator = AwsEmulator::shared();
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(
        &cluster,
        PgwardenOptions {
            tls,
            extra_target_toml: "client_auth = \"iam\"".into(),
            extra_toml: iam_toml(emulator, allow_plaintext),
            ..PgwardenOptions::default()
        },
    )
    .await;
    (cluster, pgwarden, emulator)
}

/// `token` with its last character changed (another signature, or an undecodable token:
/// either way it must be refused).
fn tampered(token: &str) -> String {
    let (head, last) = token.split_at(token.len() - 1);
    format!("{head}{}", if last == "A" { "B" } else { "A" })
}

struct Signer<'a> {
    endpoint: &'a str,
    key_id: &'a str,
    secret: &'a str,
    session: Option<&'a str>,
}

impl Signer<'_> {
    fn token(&self, server_id: &str, db_user: &str, time: SystemTime) -> String {
        generate(&StsTokenRequest {
            endpoint: self.endpoint,
            region: "us-east-1",
            server_id,
            db_user,
            access_key_id: self.key_id,
            secret_access_key: self.secret,
            session_token: self.session,
            time,
        })
        .expect("generate")
    }
}

fn psql_over_tls(pgwarden: &Pgwarden, token: &str) -> std::process::Output {
    Command::new(pg_bindir().join("psql"))
        .args([
            "-XAtq",
            &format!(
                "host=localhost port={} user=app dbname=app sslmode=verify-full sslrootcert={}",
                pgwarden.port(),
                pgwarden.ca_path().display()
            ),
            "-c",
            "select current_user",
        ])
        .env("PGPASSWORD", token)
        .output()
        .expect("psql")
}

#[tokio::test]
async fn tokens_from_pgwarden_and_from_boto3_for_an_allowed_role_connect_over_tls() {
    let (_cluster, pgwarden, emulator) = start(true, false).await;
    let ids = emulator.identities("orders-fn");
    let signer = Signer {
        endpoint: emulator.endpoint(),
        key_id: &ids.role_key_id,
        secret: &ids.role_secret,
        session: Some(&ids.role_session_token),
    };
    let ours = signer.token(SERVER_ID, "app", SystemTime::now());
    let boto3 = emulator.boto3_token(
        &ids.role_key_id,
        &ids.role_secret,
        Some(&ids.role_session_token),
        SERVER_ID,
        "app",
    );
    for (who, token) in [("pgwarden", ours), ("boto3", boto3)] {
        let out = psql_over_tls(&pgwarden, &token);
        assert!(
            out.status.success(),
            "{who}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            pgwarden.log()
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "app", "{who}");
        assert!(
            !pgwarden.log().contains(&token),
            "the token is never logged"
        );
    }
    assert!(pgwarden
        .log()
        .contains("arn:aws:iam::123456789012:role/orders-fn"));
}

#[tokio::test]
async fn bad_tokens_are_refused_and_off_allow_list_ones_cause_no_request() {
    let (_cluster, pgwarden, emulator) = start(false, true).await;
    let ids = emulator.identities("orders-fn");
    let role = Signer {
        endpoint: emulator.endpoint(),
        key_id: &ids.role_key_id,
        secret: &ids.role_secret,
        session: Some(&ids.role_session_token),
    };
    let now = SystemTime::now();
    let good = role.token(SERVER_ID, "app", now);
    // A server that would see any request made to a host off the allow-list.
    let decoy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind decoy");
    decoy.set_nonblocking(true).expect("nonblocking");
    let decoy_url = format!(
        "http://127.0.0.1:{}",
        decoy.local_addr().expect("addr").port()
    );
    let off_list = Signer {
        endpoint: &decoy_url,
        ..role
    }
    .token(SERVER_ID, "app", now);
    let lookalike = Signer {
        endpoint: "https://sts.us-east-1.amazonaws.com.evil.example",
        ..role
    }
    .token(SERVER_ID, "app", now);
    let unknown = Signer {
        key_id: "AKIANEVERISSUED00000",
        ..role
    }
    .token(SERVER_ID, "app", now);
    let user_key = Signer {
        endpoint: emulator.endpoint(),
        key_id: &ids.user_key_id,
        secret: &ids.user_secret,
        session: None,
    };
    let cases = [
        (
            "expired",
            role.token(SERVER_ID, "app", now - Duration::from_secs(1000)),
            SqlState::INVALID_PASSWORD,
            "expired",
        ),
        (
            "another deployment",
            role.token("other-proxy", "app", now),
            SqlState::INVALID_PASSWORD,
            "signature",
        ),
        (
            "another database user",
            role.token(SERVER_ID, "postgres", now),
            SqlState::INVALID_PASSWORD,
            "signature",
        ),
        ("tampered", tampered(&good), SqlState::INVALID_PASSWORD, ""),
        (
            "unknown key",
            unknown,
            SqlState::INVALID_PASSWORD,
            "unknown access key",
        ),
        (
            "off the allow-list",
            off_list,
            SqlState::INVALID_PASSWORD,
            "another host",
        ),
        (
            "look-alike host",
            lookalike,
            SqlState::INVALID_PASSWORD,
            "another host",
        ),
        (
            "role with no rule",
            user_key.token(SERVER_ID, "app", now),
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            "no rule allows",
        ),
        (
            "not a token",
            "hunter2".to_owned(),
            SqlState::INVALID_PASSWORD,
            "malformed",
        ),
    ];
    for (name, token, code, words) in cases {
        pgwarden
            .assert_login_refused(name, "app", &token, &code, words)
            .await;
    }
    assert!(
        decoy.accept().is_err(),
        "no request reached a host off the allow-list"
    );
    let client = pgwarden
        .try_connect("app", &good, "app")
        .await
        .expect("the good token");
    client.simple_query("select 1").await.expect("query");
}

#[tokio::test]
async fn a_burst_of_500_tls_logins_with_one_token_makes_one_sts_call() {
    let (_cluster, pgwarden, emulator) = start(true, false).await;
    let ids = emulator.identities("orders-api");
    let token = Signer {
        endpoint: emulator.endpoint(),
        key_id: &ids.role_key_id,
        secret: &ids.role_secret,
        session: Some(&ids.role_session_token),
    }
    .token(SERVER_ID, "app", SystemTime::now());
    let mut script = tempfile::NamedTempFile::new().expect("script");
    writeln!(script, "select 1;").expect("write");
    let port = pgwarden.port().to_string();
    let run = pgbench(
        &[
            "-h",
            "localhost",
            "-p",
            &port,
            "-U",
            "app",
            "-n",
            "-C",
            "-c",
            "10",
            "-j",
            "2",
            "-t",
            "50",
            "-f",
            &script.path().display().to_string(),
            "app",
        ],
        &[("PGPASSWORD", &token), ("PGSSLMODE", "require")],
    );
    let stdout = assert_pgbench_clean(&run);
    assert!(
        stdout.contains("number of transactions actually processed: 500/500"),
        "{stdout}"
    );
    let metrics = pgwarden.metrics().await;
    let verified = metric_sum(
        &metrics,
        "pgwarden_sts_requests_total{outcome=\"verified\"}",
    );
    assert_eq!(
        verified,
        Some(1.0),
        "one STS call for one token:\n{metrics}"
    );
    let logins = metric_sum(&metrics, "pgwarden_client_auth_successes_total").unwrap_or(0.0);
    assert!(logins >= 500.0, "{logins} logins");
}

#[tokio::test]
async fn pgwarden_token_signs_with_the_default_credential_chain() {
    let (_cluster, pgwarden, emulator) = start(false, true).await;
    let ids = emulator.identities("orders-cli");
    let out = Command::new(pgwarden_tests::pgwarden_binary())
        .args([
            "token",
            "--mode",
            "sts",
            "--user",
            "app",
            "--server-id",
            SERVER_ID,
        ])
        .args([
            "--sts-endpoint",
            emulator.endpoint(),
            "--region",
            "us-east-1",
        ])
        // The environment link of the chain; nothing else may answer.
        .env("AWS_ACCESS_KEY_ID", &ids.role_key_id)
        .env("AWS_SECRET_ACCESS_KEY", &ids.role_secret)
        .env("AWS_SESSION_TOKEN", &ids.role_session_token)
        .envs(pgwarden_tests::ISOLATED_AWS_ENV)
        .output()
        .expect("pgwarden token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(token.starts_with("pgwarden-sts:"), "{token}");
    let client = pgwarden
        .try_connect("app", &token, "app")
        .await
        .expect("the CLI's token works");
    client.simple_query("select 1").await.expect("query");
}

#[tokio::test]
async fn the_bench_logs_in_with_tokens_from_the_same_code() {
    let (_cluster, pgwarden, emulator) = start(false, true).await;
    let ids = emulator.identities("orders-bench");
    let bench = pgwarden_tests::pgwarden_binary().with_file_name("pgwarden-bench");
    let out_dir = tempfile::tempdir().expect("temp dir");
    let out = tokio::process::Command::new(bench)
        .args([
            "--target",
            &format!(
                "pgwarden=host=127.0.0.1 port={} user=app dbname=app",
                pgwarden.port()
            ),
            "--workloads",
            "steady",
            "--rounds",
            "1",
            "--clients",
            "4",
            "--duration",
            "2s",
            "--select",
            "select 1",
            "--out",
            &out_dir.path().display().to_string(),
            "--iam",
            "sts",
            "--iam-server-id",
            SERVER_ID,
            "--iam-sts-endpoint",
            emulator.endpoint(),
        ])
        .env("AWS_ACCESS_KEY_ID", &ids.role_key_id)
        .env("AWS_SECRET_ACCESS_KEY", &ids.role_secret)
        .env("AWS_SESSION_TOKEN", &ids.role_session_token)
        .env("AWS_REGION", "us-east-1")
        .envs(pgwarden_tests::ISOLATED_AWS_ENV)
        .output()
        .await
        .expect("run pgwarden-bench");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out_dir.path().join("report.json")).expect("report.json"),
    )
    .expect("report.json is JSON");
    let sample = &report["samples"][0];
    assert_eq!(sample["errors"], serde_json::json!({}), "{sample}");
    assert!(sample["completed"].as_u64().unwrap_or(0) > 0, "{sample}");
}
