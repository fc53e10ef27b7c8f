//! Named prepared statements in transaction mode: shared, re-prepared on any backend,
//! never pinning, and exactly as correct as on Postgres itself (errors, Close, DDL).

use std::time::Duration;

use pgwarden_tests::{
    assert_pgbench_clean, metric_sum, pgbench, PgCluster, Pgwarden, PgwardenOptions,
};
use tokio_postgres::error::SqlState;

fn small_pool() -> PgwardenOptions {
    PgwardenOptions {
        pool_size: 5,
        max_backend_connections: 5,
        ..PgwardenOptions::default()
    }
}

#[tokio::test]
async fn a_hundred_clients_preparing_and_executing_named_statements_share_five_backends_without_pins(
) {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, small_pool()).await;
    let mut tasks = Vec::new();
    for client_no in 0..100i32 {
        let client = pgwarden.connect("app", "app-pw", "app").await;
        tasks.push(tokio::spawn(async move {
            for i in 0..20i32 {
                // Each client prepares its own statements (some shared by text with other
                // clients, some its own) and uses them across transactions.
                let shared = client.prepare("select $1::int + 1").await?;
                let own = client
                    .prepare(&format!("select $1::int * {client_no}"))
                    .await?;
                let a: i32 = client.query_one(&shared, &[&i]).await?.get(0);
                let b: i32 = client.query_one(&own, &[&i]).await?.get(0);
                assert_eq!((a, b), (i + 1, i * client_no));
                tokio::task::yield_now().await;
            }
            Ok::<_, tokio_postgres::Error>(())
        }));
    }
    for task in tasks {
        task.await
            .expect("client task")
            .expect("no client sees an error");
    }
    let metrics = pgwarden.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "pgwarden_pins_total"),
        None,
        "no pins:\n{metrics}"
    );
    let backends = cluster.psql("select count(*) from pg_stat_activity where usename = 'app'");
    assert!(
        backends.parse::<i32>().expect("count") <= 5,
        "{backends} backends"
    );
}

#[tokio::test]
async fn pgbench_prepared_with_fifty_clients_through_a_pool_of_five_has_no_failures() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, small_pool()).await;
    let port = pgwarden.port().to_string();
    let env = [("PGPASSWORD", "app-pw")];
    let conn = ["-h", "127.0.0.1", "-p", &port, "-U", "app"];
    let init = pgbench(&[&conn[..], &["-i", "-s", "1", "app"]].concat(), &env);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let run = pgbench(
        &[
            &conn[..],
            &["-M", "prepared", "-c", "50", "-j", "2", "-T", "20", "app"],
        ]
        .concat(),
        &env,
    );
    assert_pgbench_clean(&run);
    let metrics = pgwarden.metrics().await;
    assert_eq!(metric_sum(&metrics, "pgwarden_pins_total"), None, "no pins");
}

#[tokio::test]
async fn a_failed_parse_is_not_recorded_and_the_name_can_be_prepared_again() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, small_pool()).await;
    let client = pgwarden.connect("app", "app-pw", "app").await;
    let err = client
        .prepare("select from nowhere_at_all")
        .await
        .expect_err("bad SQL");
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_TABLE));
    // tokio-postgres names statements s0, s1, ...: the next one must work.
    let ok = client
        .prepare("select 1::int")
        .await
        .expect("prepare after a failed parse");
    let v: i32 = client.query_one(&ok, &[]).await.expect("execute").get(0);
    assert_eq!(v, 1);
}

#[tokio::test]
async fn after_ddl_the_client_sees_postgres_error_once_and_the_statement_is_prepared_again() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, small_pool()).await;
    let client = pgwarden.connect("app", "app-pw", "app").await;
    client
        .batch_execute("create table evolving (a int); insert into evolving values (1)")
        .await
        .expect("setup");
    let select_all = client
        .prepare("select * from evolving")
        .await
        .expect("prepare");
    client
        .query(&select_all, &[])
        .await
        .expect("first execution");
    client
        .batch_execute("alter table evolving add column b int")
        .await
        .expect("ddl");
    // Postgres's own answer for a statement whose result shape changed.
    let err = client
        .query(&select_all, &[])
        .await
        .expect_err("result type changed");
    assert_eq!(
        err.code(),
        Some(&SqlState::FEATURE_NOT_SUPPORTED),
        "{err:?}"
    );
    let message = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(
        message.contains("cached plan must not change result type"),
        "{message}"
    );
    // A new prepare of the same text gets a fresh backend statement and works.
    let again = client
        .prepare("select * from evolving")
        .await
        .expect("prepare again");
    let rows = client
        .query(&again, &[])
        .await
        .expect("works after re-prepare");
    assert_eq!(rows[0].len(), 2);
}

#[tokio::test]
async fn close_and_client_discard_act_on_the_clients_own_statements_only() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(
        &cluster,
        PgwardenOptions {
            pool_size: 1,
            max_backend_connections: 1,
            ..PgwardenOptions::default()
        },
    )
    .await;
    let a = pgwarden.connect("app", "app-pw", "app").await;
    let b = pgwarden.connect("app", "app-pw", "app").await;
    let a_stmt = a
        .prepare("select 'shared'::text")
        .await
        .expect("a prepares");
    let b_stmt = b
        .prepare("select 'shared'::text")
        .await
        .expect("b prepares the same text");
    drop(a_stmt); // tokio-postgres sends Close for a dropped statement
    a.batch_execute("discard all").await.expect("a discards");
    a.batch_execute("deallocate all")
        .await
        .expect("a deallocates");
    let v: String = b
        .query_one(&b_stmt, &[])
        .await
        .expect("b's statement survives a's Close, DISCARD ALL and DEALLOCATE ALL")
        .get(0);
    assert_eq!(v, "shared");
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// The virtualenv Python with psycopg that `scripts/setup` installs.
fn python() -> std::path::PathBuf {
    let path = std::env::var_os("PGWARDEN_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/venv/bin/python")
        });
    assert!(
        path.exists(),
        "no Python with psycopg at {}: run scripts/setup",
        path.display()
    );
    path
}

#[tokio::test]
async fn psycopg_preparing_every_query_and_jdbc_style_names_run_without_errors_or_pins() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, small_pool()).await;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/prepared_statements.py");
    let dsn = format!(
        "host=127.0.0.1 port={} user=app password=app-pw dbname=app sslmode=disable",
        pgwarden.port()
    );
    let out = tokio::process::Command::new(python())
        .arg(&script)
        .args([&dsn, "20", "30"])
        .output()
        .await
        .expect("run the psycopg client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        pgwarden.log()
    );
    assert!(
        stdout.contains("psycopg: 600 iterations, 0 errors"),
        "{stdout}"
    );
    let metrics = pgwarden.metrics().await;
    assert_eq!(metric_sum(&metrics, "pgwarden_pins_total"), None, "no pins");
}
