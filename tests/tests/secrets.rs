//! Database logins from AWS Secrets Manager (the local emulator): read at start or on first
//! use (one call for a burst of logins), rotated the way a rotation function does it
//! (stage AWSPENDING, ALTER ROLE, move AWSCURRENT) under load without a failed transaction,
//! including the alternating-users strategy, and served from cache while the emulator is
//! down. No password ever shows in pgwarden's log or metrics.

use std::process::Output;
use std::time::{Duration, Instant};

use pgwarden_tests::{
    assert_pgbench_clean, http_get, http_status, metric_sum, AwsEmulator, PgCluster, Pgwarden,
    PgwardenOptions, ISOLATED_AWS_ENV,
};
use tokio_postgres::error::SqlState;

/// Environment that points the AWS SDK's default chain at static test keys only.
fn aws_env() -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = ISOLATED_AWS_ENV
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    env.push(("AWS_ACCESS_KEY_ID".into(), "test".into()));
    env.push(("AWS_SECRET_ACCESS_KEY".into(), "test".into()));
    // Debug logging for pgwarden's own code: more lines for the password grep to check.
    env.push(("RUST_LOG".into(), "info,pgwarden=debug".into()));
    env
}

/// A `secretsmanager` credentials table for `secrets` (TOML array items) plus `extra`.
fn secretsmanager(emulator: &AwsEmulator, secrets: &str, extra: &str) -> String {
    format!(
        "{{ provider = \"secretsmanager\", secrets = [{secrets}], region = \"us-east-1\", endpoint = \"{}\"{extra} }}",
        emulator.endpoint()
    )
}

/// A secret name no other test (or earlier run against the shared emulator) uses.
fn secret_name(test: &str) -> String {
    format!("rds/{test}-{}", std::process::id())
}

/// How a test's pgwarden reads its secret.
struct SecretSetup<'a> {
    emulator: &'a AwsEmulator,
    /// Names the secret (see `secret_name`).
    test: &'a str,
    /// `app`'s first password: the role's and the secret's.
    password: &'a str,
    /// List the secret as `{ id, user = "app" }` (read on first use) instead of by name.
    keyed_by_user: bool,
    /// More keys of the credentials table, e.g. `, refresh_interval = "1s"`.
    credentials: &'a str,
    options: PgwardenOptions,
}

/// A cluster with role and database `app`, a secret holding `app`'s login, and pgwarden
/// reading it from the emulator; returns the secret's name too.
async fn start_with_secret(setup: SecretSetup<'_>) -> (PgCluster, Pgwarden, String) {
    let cluster = PgCluster::start();
    let name = secret_name(setup.test);
    setup.emulator.create_secret(&name, "app", setup.password);
    let entry = if setup.keyed_by_user {
        format!("{{ id = {name:?}, user = \"app\" }}")
    } else {
        format!("{name:?}")
    };
    let pgwarden = Pgwarden::start(
        &cluster,
        PgwardenOptions {
            // The users list only creates the role; the login comes from the secret.
            users: vec![("app".into(), setup.password.into())],
            credentials_toml: Some(secretsmanager(setup.emulator, &entry, setup.credentials)),
            env: aws_env(),
            ..setup.options
        },
    )
    .await;
    (cluster, pgwarden, name)
}

/// Asserts that no password appears in anything pgwarden logged or exports.
async fn assert_no_password_leaked(pgwarden: &Pgwarden, passwords: &[&str]) {
    let log = pgwarden.log();
    let metrics = pgwarden.metrics().await;
    assert!(
        log.contains("client authenticated"),
        "no log to check:\n{log}"
    );
    for password in passwords {
        for (what, text) in [("log", &log), ("metrics", &metrics)] {
            if let Some(line) = text.lines().find(|line| line.contains(password)) {
                panic!("a password appears in pgwarden's {what}: {line}");
            }
        }
    }
}

/// Runs pgbench (simple-update transactions) as `app` through pgwarden for `seconds`.
fn pgbench_load(
    pgwarden: &Pgwarden,
    password: &str,
    seconds: u32,
) -> tokio::task::JoinHandle<Output> {
    let port = pgwarden.port().to_string();
    let password = password.to_owned();
    let seconds = seconds.to_string();
    tokio::task::spawn_blocking(move || {
        pgwarden_tests::pgbench(
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "app",
                "-c",
                "50",
                "-j",
                "2",
                "-T",
                &seconds,
                "-N",
                "-n",
                "app",
            ],
            &[("PGPASSWORD", &password), ("PGSSLMODE", "disable")],
        )
    })
}

fn metric(metrics: &str, name: &str) -> f64 {
    metric_sum(metrics, name).unwrap_or(0.0)
}

/// Polls pgwarden's metrics until `done` holds, for at most `within`.
async fn wait_for_metrics(
    pgwarden: &Pgwarden,
    within: Duration,
    what: &str,
    done: impl Fn(&str) -> bool,
) {
    let deadline = Instant::now() + within;
    loop {
        let metrics = pgwarden.metrics().await;
        if done(&metrics) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {within:?}:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn sleep_secs(seconds: u64) {
    tokio::time::sleep(Duration::from_secs(seconds)).await;
}

#[tokio::test]
async fn pgwarden_logs_in_with_the_login_read_from_secrets_manager() {
    let password = "sm-secret-password-42";
    let (_cluster, pgwarden, _) = start_with_secret(SecretSetup {
        emulator: AwsEmulator::shared(),
        test: "read-at-start",
        password,
        keyed_by_user: false,
        credentials: "",
        options: PgwardenOptions::default(),
    })
    .await;
    let client = pgwarden.connect("app", password, "app").await;
    let row = client
        .query_one("select current_user::text", &[])
        .await
        .expect("query");
    assert_eq!(row.get::<_, String>(0), "app");
    let metrics = pgwarden.metrics().await;
    assert!(
        metrics.contains(
            "pgwarden_secret_fetches_total{outcome=\"succeeded\",stage=\"AWSCURRENT\"} 1"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("pgwarden_secret_version{"), "{metrics}");
    assert_eq!(http_get(pgwarden.admin_port(), "/readyz").await, "ready\n");
    assert_no_password_leaked(&pgwarden, &[password]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_cold_logins_read_the_secret_once() {
    let password = "cold-burst-password-7";
    // With a client-facing `user`, the secret is read on first use, not at start.
    let (_cluster, pgwarden, _) = start_with_secret(SecretSetup {
        emulator: AwsEmulator::shared(),
        test: "cold-burst",
        password,
        keyed_by_user: true,
        credentials: "",
        options: PgwardenOptions {
            // 200 clients derive their SCRAM keys at once (slow in a debug build).
            extra_server_toml: "startup_timeout = \"60s\"".into(),
            ..PgwardenOptions::default()
        },
    })
    .await;
    let before = pgwarden.metrics().await;
    assert_eq!(
        metric_sum(&before, "pgwarden_secret_fetches_total"),
        None,
        "nothing is read before the first login:\n{before}"
    );

    let mut logins = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let dsn = pgwarden.dsn("app", password, "app");
        logins.spawn(async move {
            let (client, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
                .await
                .map_err(|e| format!("{e:?}"))?;
            tokio::spawn(connection);
            client
                .simple_query("select 1")
                .await
                .map_err(|e| format!("{e:?}"))?;
            Ok::<_, String>(client)
        });
    }
    let mut clients = Vec::new();
    while let Some(result) = logins.join_next().await {
        clients.push(result.expect("login task").expect("login through pgwarden"));
    }
    assert_eq!(clients.len(), 200);
    let metrics = pgwarden.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "pgwarden_secret_fetches_total"),
        Some(1.0),
        "200 concurrent cold logins make exactly one GetSecretValue call:\n{metrics}"
    );
    assert_no_password_leaked(&pgwarden, &[password]).await;
}

#[tokio::test]
async fn a_secret_that_cannot_be_read_makes_pgwarden_not_ready() {
    let emulator = AwsEmulator::shared();
    let cluster = PgCluster::start();
    let missing = secret_name("never-created");
    let pgwarden = Pgwarden::start(
        &cluster,
        PgwardenOptions {
            users: vec![("app".into(), "unused-password".into())],
            credentials_toml: Some(secretsmanager(
                emulator,
                &format!("{{ id = {missing:?}, user = \"app\" }}"),
                "",
            )),
            env: aws_env(),
            ..PgwardenOptions::default()
        },
    )
    .await;
    // Read on first use: nothing tried yet, so nothing is wrong yet.
    assert_eq!(http_get(pgwarden.admin_port(), "/readyz").await, "ready\n");
    // Without a login the client is refused like a wrong password (no user is revealed).
    pgwarden
        .assert_login_refused(
            "a user whose secret cannot be read",
            "app",
            "unused-password",
            &SqlState::INVALID_PASSWORD,
            "password authentication failed",
        )
        .await;
    let (status, body) = http_status(pgwarden.admin_port(), "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no database login could be read"), "{body}");
    assert!(
        pgwarden
            .log()
            .contains("no login for this user could be read"),
        "the log says why"
    );
}

/// Three rotations under a load of 50 clients, the last one to another database user
/// (alternating users): no transaction fails, clients may use the pending password during
/// the rotation window and not the old one after it, and new backend logins use the new
/// login (the old password no longer works in Postgres, and the new user shows up).
#[tokio::test]
async fn rotations_under_load_fail_no_transaction() {
    let emulator = AwsEmulator::shared();
    let passwords = [
        "rotation-pw-zero-0",
        "rotation-pw-one-1",
        "rotation-pw-two-2",
        "rotation-pw-clone-3",
    ];
    let logins = [
        ("app", passwords[1]),
        ("app", passwords[2]),
        ("app_clone", passwords[3]),
    ];
    let (cluster, pgwarden, name) = start_with_secret(SecretSetup {
        emulator,
        test: "rotation",
        password: passwords[0],
        keyed_by_user: true,
        credentials: ", refresh_interval = \"1s\"",
        options: PgwardenOptions {
            // Short lifetimes: backend connections are replaced throughout the rotations.
            extra_target_toml: "max_lifetime = \"3s\"".into(),
            ..PgwardenOptions::default()
        },
    })
    .await;
    cluster.init_pgbench(passwords[0]);
    // The alternating user: a clone with app's privileges, as the rotation template makes.
    cluster.create_user("app_clone", "not-yet-rotated");
    cluster.psql("GRANT app TO app_clone");

    let load = pgbench_load(&pgwarden, passwords[0], 42);
    sleep_secs(4).await;
    let mut client_password = passwords[0];
    for (round, (user, password)) in logins.into_iter().enumerate() {
        let version = emulator.stage_pending_version(&name, user, password);
        sleep_secs(1).await;
        cluster.create_user(user, password); // setSecret: ALTER ROLE ... PASSWORD
        sleep_secs(3).await;
        if round == 0 {
            // The rotation window: the current and the pending password both work.
            for pw in [client_password, password] {
                let client = pgwarden.connect("app", pw, "app").await;
                client.simple_query("select 1").await.expect("query");
            }
        }
        let setups_before = logins_succeeded(&pgwarden.metrics().await);
        emulator.finish_rotation(&name, &version);
        wait_for_metrics(
            &pgwarden,
            Duration::from_secs(10),
            "rotation noticed",
            |m| metric(m, "pgwarden_secret_rotations_detected_total") >= (round + 1) as f64,
        )
        .await;
        sleep_secs(4).await;
        let metrics = pgwarden.metrics().await;
        assert!(
            logins_succeeded(&metrics) > setups_before,
            "backend logins happened after rotation {round}:\n{metrics}"
        );
        if round == 0 {
            // No grace period by default: the replaced password stops working.
            pgwarden
                .assert_login_refused(
                    "old password after the rotation",
                    "app",
                    client_password,
                    &SqlState::INVALID_PASSWORD,
                    "password authentication failed",
                )
                .await;
        }
        client_password = password;
    }
    let superuser = cluster.superuser().await;
    let clones: i64 = superuser
        .query_one(
            "select count(*) from pg_stat_activity where usename = 'app_clone' and datname = 'app'",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .get(0);
    assert!(
        clones > 0,
        "new backend logins use the alternating user's login"
    );
    let client = pgwarden.connect("app", passwords[3], "app").await;
    let row = client
        .query_one("select current_user::text", &[])
        .await
        .expect("query");
    assert_eq!(row.get::<_, String>(0), "app_clone");

    let run = load.await.expect("pgbench task");
    assert_pgbench_clean(&run);
    let metrics = pgwarden.metrics().await;
    assert_eq!(
        metric(&metrics, "pgwarden_secret_rotations_detected_total"),
        3.0,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "pgwarden_backend_login_recoveries_total") > 0.0,
        "backend logins refused with the stale password recovered with the pending one:\n{metrics}"
    );
    assert_no_password_leaked(&pgwarden, &passwords).await;
}

#[tokio::test]
async fn the_previous_password_works_during_a_configured_grace_period() {
    let emulator = AwsEmulator::shared();
    let (old, new) = ("grace-old-password-1", "grace-new-password-2");
    let (cluster, pgwarden, name) = start_with_secret(SecretSetup {
        emulator,
        test: "grace",
        password: old,
        keyed_by_user: false,
        credentials: ", refresh_interval = \"1s\", previous_password_grace = \"1h\"",
        options: PgwardenOptions::default(),
    })
    .await;
    let version = emulator.stage_pending_version(&name, "app", new);
    cluster.create_user("app", new);
    emulator.finish_rotation(&name, &version);
    wait_for_metrics(
        &pgwarden,
        Duration::from_secs(10),
        "rotation noticed",
        |m| metric(m, "pgwarden_secret_rotations_detected_total") == 1.0,
    )
    .await;
    for password in [new, old] {
        let client = pgwarden.connect("app", password, "app").await;
        let row = client
            .query_one("select current_user::text", &[])
            .await
            .expect("a backend login with the new password");
        assert_eq!(row.get::<_, String>(0), "app");
    }
    pgwarden
        .assert_login_refused(
            "a password that was never the secret's",
            "app",
            "never-the-password",
            &SqlState::INVALID_PASSWORD,
            "password authentication failed",
        )
        .await;
    assert_no_password_leaked(&pgwarden, &[old, new]).await;
}

/// The emulator stopped for 60 s under load: pools keep logging in with the cached login,
/// readiness says degraded, and refreshing resumes when the emulator is back.
#[tokio::test]
async fn an_emulator_outage_under_load_fails_no_transaction() {
    let emulator = AwsEmulator::dedicated();
    let password = "outage-password-5";
    let (cluster, pgwarden, name) = start_with_secret(SecretSetup {
        emulator: &emulator,
        test: "outage",
        password,
        keyed_by_user: false,
        credentials: ", refresh_interval = \"1s\"",
        options: PgwardenOptions {
            extra_target_toml: "max_lifetime = \"3s\"".into(),
            ..PgwardenOptions::default()
        },
    })
    .await;
    cluster.init_pgbench(password);
    let load = pgbench_load(&pgwarden, password, 75);
    sleep_secs(4).await;

    emulator.stop();
    let stopped = Instant::now();
    wait_for_metrics(
        &pgwarden,
        Duration::from_secs(15),
        "stale credentials",
        |m| metric(m, "pgwarden_credentials_stale") == 1.0,
    )
    .await;
    let readiness = http_get(pgwarden.admin_port(), "/readyz").await;
    assert!(readiness.starts_with("ready, degraded\n"), "{readiness}");
    let setups_during = logins_succeeded(&pgwarden.metrics().await);
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(stopped.elapsed())).await;
    let metrics = pgwarden.metrics().await;
    assert!(
        logins_succeeded(&metrics) > setups_during,
        "backend logins went on with the cached login during the outage:\n{metrics}"
    );
    let failed_before = metric_with(
        &metrics,
        "pgwarden_secret_fetches_total",
        "outcome=\"failed\"",
    );

    emulator.restart();
    emulator.create_secret(&name, "app", password);
    wait_for_metrics(&pgwarden, Duration::from_secs(20), "refresh resumed", |m| {
        metric(m, "pgwarden_credentials_stale") == 0.0
    })
    .await;
    assert_eq!(http_get(pgwarden.admin_port(), "/readyz").await, "ready\n");
    let metrics = pgwarden.metrics().await;
    assert!(
        failed_before > 0.0,
        "failed refreshes were counted:\n{metrics}"
    );

    let run = load.await.expect("pgbench task");
    assert_pgbench_clean(&run);
    assert_no_password_leaked(&pgwarden, &[password]).await;
}

/// Sum of the samples of metric `name` whose labels contain `label`.
fn metric_with(metrics: &str, name: &str, label: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn logins_succeeded(metrics: &str) -> f64 {
    metric_with(
        metrics,
        "pgwarden_backend_connection_setups_total",
        "outcome=\"succeeded\"",
    )
}
