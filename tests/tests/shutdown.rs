//! SIGTERM: pgwarden stops accepting, lets transactions in flight finish, closes clients
//! between transactions with 57P01 (pinned and session-mode ones included) and exits 0
//! well before its drain timeout.

use std::time::Duration;

use pgwarden_tests::{assert_closed_by_shutdown, PgCluster, Pgwarden, PgwardenOptions};
use tokio_postgres::error::SqlState;

#[tokio::test]
async fn sigterm_finishes_the_open_transaction_then_closes_every_client_and_exits() {
    let cluster = PgCluster::start();
    let mut pgwarden = Pgwarden::start(&cluster, PgwardenOptions::default()).await;
    let in_transaction = pgwarden.connect("app", "app-pw", "app").await;
    in_transaction
        .batch_execute("create table drained (n int); begin; insert into drained values (1)")
        .await
        .expect("open a transaction");
    let pinned = pgwarden.connect("app", "app-pw", "app").await;
    pinned
        .batch_execute("set search_path = public")
        .await
        .expect("pins the client");
    let idle = pgwarden.connect("app", "app-pw", "app").await;
    idle.simple_query("select 1").await.expect("query");

    pgwarden.send_sigterm();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        pgwarden.wait_exit(Duration::ZERO).await.is_none(),
        "a transaction is still open: pgwarden waits for it"
    );
    in_transaction
        .batch_execute("insert into drained values (2); commit")
        .await
        .expect("the transaction in flight finishes during the drain");
    let status = pgwarden
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("pgwarden exits once no transaction is in flight, long before shutdown_timeout");
    assert!(status.success(), "exit status {status}");

    let committed = cluster.psql_in("app", "select count(*) from drained");
    assert_eq!(
        committed, "2",
        "both inserts of the drained transaction committed"
    );
    for client in [&pinned, &idle] {
        assert_closed_by_shutdown(client).await;
    }
}

/// A serving task joins the shutdown token's waiters at its first wait and later waits only
/// read the token: a client between its third and fourth transaction, which never parks
/// here, must still be woken by SIGTERM and told, and pgwarden must not wait for it.
#[tokio::test]
async fn sigterm_wakes_a_client_waiting_between_transactions_that_never_parks() {
    let cluster = PgCluster::start();
    let mut pgwarden = Pgwarden::start(
        &cluster,
        PgwardenOptions {
            extra_server_toml: "park_idle_clients_after = \"0s\"".to_owned(),
            ..PgwardenOptions::default()
        },
    )
    .await;
    let client = pgwarden.connect("app", "app-pw", "app").await;
    for _ in 0..3 {
        client.simple_query("select 1").await.expect("query");
    }
    pgwarden.send_sigterm();
    let status = pgwarden
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("pgwarden exits at once, not after shutdown_timeout (30s)");
    assert!(status.success(), "exit status {status}");
    assert_closed_by_shutdown(&client).await;
}

#[tokio::test]
async fn sigterm_closes_session_mode_clients_between_transactions() {
    let cluster = PgCluster::start();
    let mut pgwarden = Pgwarden::start(
        &cluster,
        PgwardenOptions {
            pool_mode: "session",
            ..PgwardenOptions::default()
        },
    )
    .await;
    let client = pgwarden.connect("app", "app-pw", "app").await;
    client.simple_query("select 1").await.expect("query");
    pgwarden.send_sigterm();
    let status = pgwarden
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("pgwarden exits without waiting for the idle session-mode client");
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn sigterm_under_load_reports_only_real_commits_refuses_newcomers_with_57p03_and_exits_0() {
    let cluster = PgCluster::start();
    let mut pgwarden = Pgwarden::start(&cluster, PgwardenOptions::default()).await;
    cluster.psql_in("app", "create table ledger (client int, seq int, primary key (client, seq)); grant all on ledger to app");
    // A long transaction keeps the drain going while a newcomer knocks.
    let long = pgwarden.connect("app", "app-pw", "app").await;
    long.batch_execute("begin; insert into ledger values (-1, 0)")
        .await
        .expect("open the long transaction");

    let mut writers = Vec::new();
    for client in 0..16 {
        let conn = pgwarden.connect("app", "app-pw", "app").await;
        writers.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for seq in 0.. {
                let tx = format!(
                    "begin; insert into ledger values ({client}, {seq}); select pg_sleep(0.01); commit"
                );
                match conn.batch_execute(&tx).await {
                    Ok(()) => acknowledged.push((client, seq)),
                    Err(_) => break,
                }
            }
            acknowledged
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    pgwarden.send_sigterm();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let newcomer = pgwarden
        .try_connect("app", "app-pw", "app")
        .await
        .expect_err("no new client during the drain");
    assert_eq!(
        newcomer.code(),
        Some(&SqlState::CANNOT_CONNECT_NOW),
        "{newcomer:?}"
    );
    long.batch_execute("commit")
        .await
        .expect("the long transaction commits during the drain");

    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.expect("writer task"));
    }
    let status = pgwarden
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("pgwarden exits within its drain timeout");
    assert!(status.success(), "exit status {status}");

    let stored = cluster.psql_in(
        "app",
        "select client || ':' || seq from ledger where client >= 0",
    );
    let stored: std::collections::HashSet<&str> = stored.lines().collect();
    assert!(
        acknowledged.len() > 16,
        "the load ran: {} commits",
        acknowledged.len()
    );
    for (client, seq) in &acknowledged {
        assert!(
            stored.contains(format!("{client}:{seq}").as_str()),
            "commit of {client}:{seq} was acknowledged but is not in the table"
        );
    }
    // A transaction cut short is rolled back by Postgres, never left half-done: at most the
    // one in flight per client can be stored without its acknowledgement having arrived.
    assert!(
        stored.len() <= acknowledged.len() + 16,
        "{} stored, {} acknowledged",
        stored.len(),
        acknowledged.len()
    );
    assert_eq!(
        cluster.psql_in("app", "select count(*) from ledger where client = -1"),
        "1"
    );
}
