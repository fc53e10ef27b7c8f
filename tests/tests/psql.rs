//! Real clients' everyday paths through pgwarden: psql scripts with notices, errors, an
//! aborted transaction and empty queries; `\copy` both ways; and login failures that get
//! Postgres's own SQLSTATEs at once without disturbing clients already connected.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use pgwarden_tests::{metric_sum, pg_bindir, PgCluster, Pgwarden, PgwardenOptions};
use tokio_postgres::error::SqlState;

async fn start(options: PgwardenOptions) -> (PgCluster, Pgwarden) {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, options).await;
    (cluster, pgwarden)
}

/// Longest a psql run may take; a proxy that loses a message must fail the test, not hang it.
const PSQL_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs psql as user `app` on database `app` through pgwarden, unaligned and tuples-only,
/// without psqlrc and continuing after errors.
async fn psql_through(pgwarden: &Pgwarden, args: &[&str]) -> Output {
    let run = tokio::process::Command::new(pg_bindir().join("psql"))
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=0"])
        .args(["-h", "127.0.0.1", "-p", &pgwarden.port().to_string()])
        .args(["-U", "app", "-d", "app"])
        .args(args)
        .env("PGPASSWORD", "app-pw")
        .env("PGSSLMODE", "disable")
        .env_remove("PGOPTIONS")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(PSQL_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "psql {args:?} did not finish within {PSQL_TIMEOUT:?}\n--- pgwarden log ---\n{}",
                pgwarden.log()
            )
        })
        .expect("run psql")
}

fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn write_file(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write file for psql");
    path.display().to_string()
}

#[tokio::test]
async fn psql_runs_scripts_with_errors_notices_and_empty_queries() {
    let (cluster, pgwarden) = start(PgwardenOptions::default()).await;
    // The server log shows which statements reached Postgres.
    cluster.psql("alter system set log_statement = 'all'");
    cluster.psql("select pg_reload_conf()");
    let dir = tempfile::tempdir().expect("temp dir");
    let script = write_file(
        dir.path(),
        "script.sql",
        ";\n\
         DO $$ begin raise notice 'hello'; end $$;\n\
         select 'a' \\; \\; select 'b';\n\
         \\set VERBOSITY verbose\n\
         BEGIN;\n\
         select 1/0;\n\
         select 1;\n\
         ROLLBACK;\n\
         select 42;\n",
    );
    let out = psql_through(&pgwarden, &["-f", &script]).await;
    let (stdout, stderr) = (stdout_of(&out), stderr_of(&out));
    eprintln!("--- stdout ---\n{stdout}--- stderr ---\n{stderr}");
    assert!(out.status.success(), "psql failed: {}", out.status);

    let results: Vec<&str> = stdout.lines().collect();
    assert_eq!(results, ["DO", "a", "b", "BEGIN", "ROLLBACK", "42"]);
    // Each message belongs to the statement on its script line.
    let messages: Vec<&str> = stderr
        .lines()
        .filter_map(|line| line.split_once("script.sql:").map(|(_, rest)| rest))
        .collect();
    assert_eq!(
        messages,
        [
            "2: NOTICE:  hello",
            "6: ERROR:  22012: division by zero",
            "7: ERROR:  25P02: current transaction is aborted, commands ignored until end of \
             transaction block",
        ]
    );
    // The lone `;` went to Postgres, which answered it with EmptyQueryResponse.
    let log = std::fs::read_to_string(cluster.log_path()).expect("read postgres.log");
    assert!(
        log.contains("LOG:  statement: ;\n"),
        "the empty query never reached Postgres:\n{log}"
    );
}

#[tokio::test]
async fn psql_copy_in_and_out_round_trips() {
    let (_cluster, pgwarden) = start(PgwardenOptions::default()).await;
    let client = pgwarden.connect("app", "app-pw", "app").await;
    client
        .batch_execute("create table copied (id int primary key, name text, n int)")
        .await
        .expect("create table");

    // COPY's canonical text format, so what comes out must equal what went in byte for byte:
    // escaped backslashes and tabs, non-ASCII text, NULLs.
    let mut rows = String::new();
    for i in 0..5000 {
        let n = if i % 7 == 0 {
            "\\N".to_owned()
        } else {
            (i * 3).to_string()
        };
        rows.push_str(&format!(
            "{i}\trow {i} \u{fc}\u{f1}\u{ee} \\\\ \\t 'q'\t{n}\n"
        ));
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let input = write_file(dir.path(), "in.tsv", &rows);
    let output = dir.path().join("out.tsv").display().to_string();

    let copy_in = psql_through(&pgwarden, &["-c", &format!("\\copy copied from '{input}'")]).await;
    assert!(
        copy_in.status.success(),
        "\\copy from failed: {}",
        stderr_of(&copy_in)
    );
    assert_eq!(stdout_of(&copy_in).trim(), "COPY 5000");

    let copy_out = psql_through(
        &pgwarden,
        &[
            "-c",
            &format!("\\copy (select * from copied order by id) to '{output}'"),
        ],
    )
    .await;
    assert!(
        copy_out.status.success(),
        "\\copy to failed: {}",
        stderr_of(&copy_out)
    );
    assert_eq!(stdout_of(&copy_out).trim(), "COPY 5000");
    let got = std::fs::read_to_string(&output).expect("read copied-out file");
    assert!(
        got == rows,
        "the rows copied out differ from those copied in"
    );

    let counts = client
        .simple_query("select count(*) || ' ' || count(n) from copied")
        .await
        .expect("count");
    let counts = counts.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(counts.as_deref(), Some("5000 4285"), "rows and non-NULL n");
}

#[tokio::test]
async fn wrong_password_is_28p01_and_other_clients_keep_working() {
    let (_cluster, pgwarden) = start(PgwardenOptions::default()).await;
    let established = pgwarden.connect("app", "app-pw", "app").await;

    // An established client keeps running queries while others fail to log in.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let busy = tokio::spawn(async move {
        let (mut ok, mut errors) = (0u32, Vec::new());
        while !*stop_rx.borrow() {
            match established.simple_query("select 1").await {
                Ok(_) => ok += 1,
                Err(e) => errors.push(e.to_string()),
            }
            tokio::select! {
                _ = stop_rx.changed() => {}
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
        (ok, errors, established)
    });

    let login_error = |result: Result<tokio_postgres::Client, tokio_postgres::Error>, what| {
        let Err(err) = result else {
            panic!("{what} was let in");
        };
        err.as_db_error()
            .unwrap_or_else(|| panic!("{what}: not a server error: {err:?}"))
            .clone()
    };

    let wrong_password = login_error(
        pgwarden.try_connect("app", "wrong-pw", "app").await,
        "a wrong password",
    );
    assert_eq!(wrong_password.code(), &SqlState::INVALID_PASSWORD);

    let unknown_user = login_error(
        pgwarden.try_connect("nobody", "app-pw", "app").await,
        "an unknown user",
    );
    assert_eq!(
        unknown_user.code(),
        &SqlState::INVALID_PASSWORD,
        "an unknown user must look like a wrong password: {unknown_user}"
    );

    let started = Instant::now();
    let attempt = tokio::time::timeout(
        Duration::from_secs(10),
        pgwarden.try_connect("app", "app-pw", "nosuchdb"),
    )
    .await
    .expect("a login to a database that does not exist hangs");
    let elapsed = started.elapsed();
    let no_db = login_error(attempt, "a database that does not exist");
    assert_eq!(no_db.code(), &SqlState::INVALID_CATALOG_NAME, "{no_db}");
    assert_eq!(no_db.message(), "database \"nosuchdb\" does not exist");
    assert!(
        elapsed < Duration::from_secs(2),
        "the 3D000 took {elapsed:?} to arrive"
    );

    stop_tx.send(true).expect("stop the busy client");
    let (ok, errors, established) = busy.await.expect("busy client task");
    assert!(
        errors.is_empty(),
        "the established client failed: {errors:?}"
    );
    assert!(ok > 0, "the established client ran no query");
    established
        .simple_query("select 1")
        .await
        .expect("the established client still works");
    pgwarden.connect("app", "app-pw", "app").await;

    let failures = metric_sum(
        &pgwarden.metrics().await,
        "pgwarden_client_auth_failures_total",
    );
    assert!(
        failures.is_some_and(|n| n >= 2.0),
        "auth failures counted: {failures:?}"
    );
}

#[tokio::test]
async fn repeated_failed_logins_are_rate_limited_per_address_without_affecting_others() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(
        &cluster,
        PgwardenOptions {
            extra_server_toml: "max_auth_failures = 3\nauth_failure_window = \"1m\"".into(),
            ..PgwardenOptions::default()
        },
    )
    .await;
    let established = pgwarden.connect("app", "app-pw", "app").await;
    for attempt in 0..3 {
        pgwarden
            .assert_login_refused(
                &format!("wrong password {attempt}"),
                "app",
                "wrong",
                &tokio_postgres::error::SqlState::INVALID_PASSWORD,
                "password authentication failed",
            )
            .await;
    }
    // Over the limit: refused before any password exchange, even with the right one.
    pgwarden
        .assert_login_refused(
            "right password over the limit",
            "app",
            "app-pw",
            &tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            "too many failed authentication attempts",
        )
        .await;
    established
        .simple_query("select 1")
        .await
        .expect("connected clients are unaffected");
    let metrics = pgwarden.metrics().await;
    assert!(
        metrics.contains("pgwarden_client_auth_rate_limited_total{scope=\"address\"} 1"),
        "{metrics}"
    );
}
