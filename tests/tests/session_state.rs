//! Session state in transaction mode: settings follow their client from backend to
//! backend and never leak to another client; state that cannot move pins the client, is
//! counted by reason, and is gone when the client leaves.

use std::time::Duration;

use futures_util::StreamExt;
use pgwarden_tests::{metric_sum, PgCluster, Pgwarden, PgwardenOptions};
use tokio_postgres::{AsyncMessage, Client, SimpleQueryMessage};

fn options(pool_size: u32) -> PgwardenOptions {
    PgwardenOptions {
        pool_size,
        max_backend_connections: pool_size,
        ..PgwardenOptions::default()
    }
}

async fn value(client: &Client, sql: &str) -> String {
    let rows = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

fn pins(metrics: &str, reason: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("pgwarden_pins_total{") && l.contains(&format!("reason=\"{reason}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_clients_settings_follow_it_to_other_backends_and_never_reach_another_client() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, options(3)).await;
    let a = pgwarden.connect("app", "app-pw", "app").await;
    let b = pgwarden.connect("app", "app-pw", "app").await;
    a.batch_execute("create schema a_schema")
        .await
        .expect("schema");
    a.batch_execute("set search_path = a_schema, public")
        .await
        .expect("set");
    a.batch_execute("SET statement_timeout TO '4s'")
        .await
        .expect("set");
    let default_path = value(&b, "show search_path").await;
    assert_eq!(default_path, "\"$user\", public");

    let c = pgwarden.connect("app", "app-pw", "app").await;
    let mut a_pids = std::collections::HashSet::new();
    for round in 0..6 {
        // Other clients hold backends inside transactions (the most recently used ones), so
        // A runs on a different backend from round to round.
        let holders: Vec<&Client> = [&b, &c].into_iter().take(round % 3).collect();
        for h in &holders {
            h.batch_execute("begin").await.expect("begin");
            assert_eq!(
                value(h, "show search_path").await,
                default_path,
                "round {round}: nobody else sees A's search_path"
            );
            assert_eq!(
                value(h, "show statement_timeout").await,
                "0",
                "round {round}"
            );
        }
        assert_eq!(
            value(&a, "show search_path").await,
            "a_schema, public",
            "round {round}: A keeps its setting"
        );
        assert_eq!(
            value(&a, "show statement_timeout").await,
            "4s",
            "round {round}"
        );
        a_pids.insert(value(&a, "select pg_backend_pid()").await);
        for h in &holders {
            h.batch_execute("commit").await.expect("commit");
        }
    }
    assert!(
        a_pids.len() >= 2,
        "A was served by several backends: {a_pids:?}"
    );
    // RESET brings A back to the default everywhere.
    a.batch_execute("reset search_path").await.expect("reset");
    assert_eq!(value(&a, "show search_path").await, default_path);
    let metrics = pgwarden.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "pgwarden_pins_total"),
        None,
        "settings do not pin"
    );
}

#[tokio::test]
async fn startup_parameters_apply_on_every_backend_and_settings_in_a_rolled_back_transaction_do_not_stick(
) {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, options(2)).await;
    let mut config: tokio_postgres::Config =
        pgwarden.dsn("app", "app-pw", "app").parse().expect("dsn");
    config
        .application_name("lambda-fn")
        .options("-c statement_timeout=1234 -c search_path=public");
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    let other = pgwarden.connect("app", "app-pw", "app").await;
    for _ in 0..3 {
        other.batch_execute("begin").await.expect("begin");
        assert_eq!(value(&client, "show application_name").await, "lambda-fn");
        assert_eq!(value(&client, "show statement_timeout").await, "1234ms");
        assert_eq!(value(&other, "show statement_timeout").await, "0");
        assert_eq!(value(&other, "show application_name").await, "");
        other.batch_execute("commit").await.expect("commit");
    }
    // A SET inside a transaction that rolls back is not kept; one that commits is.
    client.batch_execute("begin").await.expect("begin");
    client
        .batch_execute("set work_mem = '7MB'")
        .await
        .expect("set");
    client.batch_execute("rollback").await.expect("rollback");
    client.batch_execute("begin").await.expect("begin");
    client
        .batch_execute("set maintenance_work_mem = '9MB'")
        .await
        .expect("set");
    client.batch_execute("commit").await.expect("commit");
    for _ in 0..3 {
        other.batch_execute("begin").await.expect("begin");
        assert_eq!(value(&client, "show work_mem").await, "4MB");
        assert_eq!(value(&client, "show maintenance_work_mem").await, "9MB");
        assert_eq!(value(&other, "show maintenance_work_mem").await, "64MB");
        other.batch_execute("commit").await.expect("commit");
    }
}

#[tokio::test]
async fn temp_tables_and_advisory_locks_pin_and_vanish_with_their_client() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, options(2)).await;
    let owner = pgwarden.connect("app", "app-pw", "app").await;
    owner
        .batch_execute("create temp table mine (v int); insert into mine values (1)")
        .await
        .expect("temp");
    owner
        .batch_execute("select pg_advisory_lock(42)")
        .await
        .expect("lock");
    assert_eq!(
        value(&owner, "select count(*) from mine").await,
        "1",
        "pinned: the temp table stays visible"
    );
    let other = pgwarden.connect("app", "app-pw", "app").await;
    for _ in 0..3 {
        let err = other
            .simple_query("select * from mine")
            .await
            .expect_err("not visible to others");
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
        );
        assert_eq!(
            value(&other, "select pg_try_advisory_lock(42)::text").await,
            "false"
        );
    }
    let metrics = pgwarden.metrics().await;
    assert!(pins(&metrics, "temp_table") >= 1.0, "{metrics}");
    drop(owner);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The owner's backend was reset before anyone else got it: lock released, table gone.
    assert_eq!(
        value(&other, "select pg_try_advisory_lock(42)::text").await,
        "true"
    );
    let third = pgwarden.connect("app", "app-pw", "app").await;
    for _ in 0..3 {
        assert!(third.simple_query("select * from mine").await.is_err());
    }
}

#[tokio::test]
async fn listen_notify_works_through_pgwarden_and_pins_the_listener() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, options(2)).await;
    let (listener, mut connection) =
        tokio_postgres::connect(&pgwarden.dsn("app", "app-pw", "app"), tokio_postgres::NoTls)
            .await
            .expect("connect");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                let _ = tx.send((n.channel().to_owned(), n.payload().to_owned()));
            }
        }
    });
    listener
        .batch_execute("listen events")
        .await
        .expect("listen");
    let notifier = pgwarden.connect("app", "app-pw", "app").await;
    notifier
        .batch_execute("notify events, 'hello'")
        .await
        .expect("notify");
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("notification arrives")
        .expect("channel open");
    assert_eq!(got, ("events".to_owned(), "hello".to_owned()));
    let metrics = pgwarden.metrics().await;
    assert!(pins(&metrics, "listen") >= 1.0, "{metrics}");
}

#[tokio::test]
async fn a_pin_filter_keeps_a_client_sharing_backends_and_counts_it() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(
        &cluster,
        PgwardenOptions {
            extra_target_toml: "pin_filters = [\"sql_prepare\"]".into(),
            ..options(2)
        },
    )
    .await;
    let client = pgwarden.connect("app", "app-pw", "app").await;
    client
        .batch_execute("prepare q as select 1")
        .await
        .expect("prepare");
    let metrics = pgwarden.metrics().await;
    assert_eq!(pins(&metrics, "sql_prepare"), 0.0, "{metrics}");
    assert!(
        metrics.contains("pgwarden_pins_filtered_total{reason=\"sql_prepare\",target=\"main\"} 1"),
        "{metrics}"
    );
}

/// At `debug`, lines written while a client is served (here: its pin) carry the client's
/// span; at `info` serving does not enter it (`session/log_span.rs`), so this fails if the
/// span is not entered at `debug` either.
#[tokio::test]
async fn at_debug_a_pin_is_logged_with_the_clients_span() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(
        &cluster,
        PgwardenOptions {
            env: vec![("RUST_LOG".to_owned(), "debug".to_owned())],
            ..options(2)
        },
    )
    .await;
    let client = pgwarden.connect("app", "app-pw", "app").await;
    client
        .batch_execute("prepare p as select 1")
        .await
        .expect("SQL PREPARE pins");
    let log = pgwarden.log();
    let pinned: serde_json::Value = log
        .lines()
        .find(|line| line.contains("client pinned to its backend"))
        .and_then(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| panic!("no pin line in\n{log}"));
    let span = &pinned["span"];
    assert_eq!(span["name"], "client", "{pinned}");
    assert_eq!(span["user"], "app", "{pinned}");
    assert_eq!(span["database"], "app", "{pinned}");
}
