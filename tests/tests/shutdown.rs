//! SIGTERM: pgwarden stops accepting, lets transactions in flight finish, closes clients
//! between transactions with 57P01 (pinned and session-mode ones included) and exits 0
//! well before its drain timeout.

use std::time::Duration;

use pgwarden_tests::{PgCluster, Pgwarden, PgwardenOptions};
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
        let err = client.simple_query("select 1").await.expect_err("closed");
        let closed_with_57p01 = err.code() == Some(&SqlState::ADMIN_SHUTDOWN);
        assert!(closed_with_57p01 || err.is_closed(), "{err:?}");
    }
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
