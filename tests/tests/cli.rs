//! The `pgwarden` command line as an operator uses it: `check-config` and `demo`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pgwarden_tests::{free_port, pgwarden_binary};

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write file");
    path.display().to_string()
}

#[test]
fn check_config_accepts_a_valid_file_and_never_prints_a_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        dir.path(),
        "users.toml",
        "[[users]]\nname = \"app\"\npassword = \"s3cret-pw\"\n",
    );
    let config = write(
        dir.path(),
        "pgwarden.toml",
        "[server]\nrequire_tls = false\n[[targets]]\nname = \"main\"\nhost = \"db\"\ncredentials = { provider = \"file\", path = \"users.toml\" }\n",
    );
    let out = Command::new(pgwarden_binary())
        .args(["check-config", &config])
        .output()
        .expect("run check-config");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("valid"), "{stdout}");
    assert!(stdout.contains("target \"main\""), "{stdout}");
    assert!(!stdout.contains("s3cret-pw"));
}

#[test]
fn check_config_reports_every_problem_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write(
        dir.path(),
        "pgwarden.toml",
        "[server]\n[[targets]]\nname = \"main\"\nhost = \"\"\npool_size = 0\ncredentials = { provider = \"file\", path = \"users.toml\" }\n",
    );
    let out = Command::new(pgwarden_binary())
        .args(["check-config", &config])
        .output()
        .expect("run check-config");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("host is empty"), "{stderr}");
    assert!(stderr.contains("pool_size must be at least 1"), "{stderr}");
    assert!(
        stderr.contains("require_tls is true but [server.tls] is missing"),
        "TLS is required by default: {stderr}"
    );
}

#[tokio::test]
async fn demo_serves_the_connection_string_it_prints_and_cleans_up_on_sigterm() {
    let port = free_port();
    let mut child = Command::new(pgwarden_binary())
        .args(["demo", "--listen", &format!("127.0.0.1:{port}")])
        .env("PGWARDEN_LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn demo");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut dsn = String::new();
    stdout.read_line(&mut dsn).expect("first line");
    let mut metrics_url = String::new();
    stdout.read_line(&mut metrics_url).expect("second line");
    let mut iam_line = String::new();
    stdout.read_line(&mut iam_line).expect("third line");
    let dsn = dsn.trim().to_owned();
    assert!(
        dsn.starts_with("postgresql://"),
        "first line is a connection string: {dsn:?}"
    );
    assert!(dsn.contains(&format!(":{port}/")), "{dsn}");

    assert!(
        dsn.ends_with("sslmode=require"),
        "the demo asks for TLS: {dsn}"
    );

    // libpq with the printed string, as a user would run it.
    let psql = |dsn: &str| {
        Command::new(pgwarden_tests::pg_bindir().join("psql"))
            .args(["-XAtq", dsn, "-c", "select current_user"])
            .output()
            .expect("run psql")
    };
    let out = psql(&dsn);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "demo");
    // Plaintext is refused: TLS is required.
    // An IAM token login to the IAM database, as the README shows it.
    let iam_env: Vec<(String, String)> = iam_line
        .split_whitespace()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect();
    assert_eq!(
        iam_env.len(),
        3,
        "third line holds the demo's IAM key: {iam_line:?}"
    );
    let token = Command::new(pgwarden_binary())
        .args([
            "token",
            "--mode",
            "rds-token",
            "--host",
            "localhost",
            "--port",
            &port.to_string(),
            "--user",
            "demo",
        ])
        .envs(iam_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .envs(pgwarden_tests::ISOLATED_AWS_ENV)
        .output()
        .expect("pgwarden token");
    assert!(
        token.status.success(),
        "{}",
        String::from_utf8_lossy(&token.stderr)
    );
    let iam_login = Command::new(pgwarden_tests::pg_bindir().join("psql"))
        .args([
            "-XAtq",
            &format!("host=localhost port={port} dbname=demo_iam user=demo sslmode=require"),
            "-c",
            "select current_database()",
        ])
        .env("PGPASSWORD", String::from_utf8_lossy(&token.stdout).trim())
        .output()
        .expect("psql with a token");
    assert!(
        iam_login.status.success(),
        "{}",
        String::from_utf8_lossy(&iam_login.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&iam_login.stdout).trim(),
        "demo_iam"
    );
    let refused = psql(&dsn.replace("sslmode=require", "sslmode=disable"));
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("pgwarden requires TLS"), "{stderr}");

    let metrics_port: u16 = metrics_url
        .trim()
        .strip_prefix("http://127.0.0.1:")
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("second line is the metrics URL: {metrics_url:?}"));
    let body = pgwarden_tests::http_get(metrics_port, "/metrics").await;
    assert!(
        body.contains("pgwarden_client_connections_received_total 3"),
        "{body}"
    );

    // The demo's user is an admin: the console answers on database pgwarden.
    let console = Command::new(pgwarden_tests::pg_bindir().join("psql"))
        .args([
            "-XAt",
            &dsn.replace("/demo?", "/pgwarden?"),
            "-c",
            "SHOW POOLS",
        ])
        .output()
        .expect("run psql");
    assert!(
        console.status.success(),
        "{}",
        String::from_utf8_lossy(&console.stderr)
    );
    let pools = String::from_utf8_lossy(&console.stdout);
    assert!(
        pools.lines().any(|l| l.starts_with("demo|demo|")),
        "{pools}"
    );

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "demo did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "demo exit status {status}");
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut log)
        .expect("log");
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "a demo log line is not JSON: {line}"
        );
    }
    let dir = log
        .lines()
        .find(|l| l.contains("demo Postgres cluster started"))
        .and_then(|l| l.split("\"dir\":\"").nth(1))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("the log names the cluster dir: {log}"));
    assert!(!Path::new(dir).exists(), "the demo removed {dir}");
    assert!(
        !log.contains(
            dsn.split(':')
                .nth(2)
                .unwrap_or("-")
                .split('@')
                .next()
                .unwrap_or("-")
        ),
        "the password is not logged"
    );
}

#[tokio::test]
async fn healthcheck_exits_0_while_ready_and_1_otherwise() {
    let cluster = pgwarden_tests::PgCluster::start();
    let pgwarden =
        pgwarden_tests::Pgwarden::start(&cluster, pgwarden_tests::PgwardenOptions::default()).await;
    let check = |address: String, path: &str| {
        Command::new(pgwarden_binary())
            .args(["healthcheck", "--address", &address, "--path", path])
            .output()
            .expect("run pgwarden healthcheck")
    };
    let admin = format!("127.0.0.1:{}", pgwarden.admin_port());
    let ready = check(admin.clone(), "/readyz");
    assert!(
        ready.status.success(),
        "{}",
        String::from_utf8_lossy(&ready.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ready.stdout), "ready\n");
    let missing = check(admin, "/nothing");
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("404"));
    let nobody = check(format!("127.0.0.1:{}", free_port()), "/readyz");
    assert_eq!(nobody.status.code(), Some(1), "nothing listens there");
}
