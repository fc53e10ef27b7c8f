//! Relay correctness through pgwarden with a real driver (tokio-postgres) against a real
//! Postgres: simple and extended protocol, pipelining, COPY both ways, errors inside
//! transactions, cancel, backends that die, clients that vanish, bounded memory.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use pgwarden_tests::{PgCluster, Pgwarden, PgwardenOptions};
use tokio_postgres::error::SqlState;
use tokio_postgres::SimpleQueryMessage;

async fn start(options: PgwardenOptions) -> (PgCluster, Pgwarden) {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, options).await;
    (cluster, pgwarden)
}

fn first_value(messages: &[SimpleQueryMessage]) -> Option<String> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
        _ => None,
    })
}

#[tokio::test]
async fn simple_extended_and_pipelined_queries_return_what_postgres_returns() {
    let (_cluster, pgwarden) = start(PgwardenOptions::default()).await;
    let client = pgwarden.connect("app", "app-pw", "app").await;

    let rows = client
        .simple_query("select 1; select 'two'")
        .await
        .expect("simple");
    let values: Vec<_> = rows
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect();
    assert_eq!(values, ["1", "two"]);

    // Extended protocol with parameters (tokio-postgres prepares a named statement).
    let row = client
        .query_one("select $1::int + $2::int", &[&40i32, &2i32])
        .await
        .expect("extended");
    assert_eq!(row.get::<_, i32>(0), 42);

    // Pipelining: several requests in flight before the first answer is read.
    let (a, b, c) = tokio::join!(
        client.simple_query("select pg_sleep(0.05), 'a'"),
        client.simple_query("select 'b'"),
        client.query_one("select $1::text", &[&"c"]),
    );
    assert_eq!(a.expect("a").len(), 3);
    assert_eq!(first_value(&b.expect("b")).as_deref(), Some("b"));
    assert_eq!(c.expect("c").get::<_, &str>(0), "c");

    // Empty query.
    let empty = client.simple_query("").await.expect("empty query");
    assert!(empty
        .iter()
        .all(|m| !matches!(m, SimpleQueryMessage::Row(_))));
}

#[tokio::test]
async fn an_error_inside_a_transaction_fails_it_until_rollback_and_the_session_goes_on() {
    let (_cluster, pgwarden) = start(PgwardenOptions::default()).await;
    let client = pgwarden.connect("app", "app-pw", "app").await;
    client.batch_execute("begin").await.expect("begin");
    let err = client
        .simple_query("select 1/0")
        .await
        .expect_err("division by zero");
    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO));
    let err = client.simple_query("select 1").await.expect_err("aborted");
    assert_eq!(err.code(), Some(&SqlState::IN_FAILED_SQL_TRANSACTION));
    client.batch_execute("rollback").await.expect("rollback");
    let rows = client
        .simple_query("select 7")
        .await
        .expect("after rollback");
    assert_eq!(first_value(&rows).as_deref(), Some("7"));
}

#[tokio::test]
async fn copy_from_stdin_and_to_stdout_round_trip() {
    let (_cluster, pgwarden) = start(PgwardenOptions::default()).await;
    let client = pgwarden.connect("app", "app-pw", "app").await;
    client
        .batch_execute("create table copied (id int, name text)")
        .await
        .expect("create");
    let sink = client
        .copy_in("copy copied from stdin")
        .await
        .expect("copy in");
    futures_util::pin_mut!(sink);
    let mut expected = String::new();
    for i in 0..5000 {
        expected.push_str(&format!("{i}\tname {i}\n"));
    }
    for chunk in expected.as_bytes().chunks(7000) {
        sink.send(Bytes::copy_from_slice(chunk))
            .await
            .expect("send");
    }
    assert_eq!(sink.finish().await.expect("finish"), 5000);

    let stream = client
        .copy_out("copy (select * from copied order by id) to stdout")
        .await
        .expect("copy out");
    futures_util::pin_mut!(stream);
    let mut got = Vec::new();
    while let Some(chunk) = stream.next().await {
        got.extend_from_slice(&chunk.expect("chunk"));
    }
    assert_eq!(String::from_utf8(got).expect("utf8"), expected);
}

#[tokio::test]
async fn a_failed_copy_from_stdin_reports_the_error_and_the_session_goes_on() {
    let (_cluster, pgwarden) = start(PgwardenOptions::default()).await;
    let client = pgwarden.connect("app", "app-pw", "app").await;
    client
        .batch_execute("create table nums (n int)")
        .await
        .expect("create");
    let sink = client
        .copy_in("copy nums from stdin")
        .await
        .expect("copy in");
    futures_util::pin_mut!(sink);
    sink.send(Bytes::from_static(b"1\nnot a number\n"))
        .await
        .expect("send");
    let err = sink.finish().await.expect_err("bad input");
    assert_eq!(err.code(), Some(&SqlState::INVALID_TEXT_REPRESENTATION));
    let rows = client
        .simple_query("select count(*) from nums")
        .await
        .expect("count");
    assert_eq!(first_value(&rows).as_deref(), Some("0"));
}

#[tokio::test]
async fn cancel_stops_the_running_query_on_the_backend_serving_the_client() {
    let (_cluster, pgwarden) = start(PgwardenOptions::default()).await;
    let client = pgwarden.connect("app", "app-pw", "app").await;
    // Another client's query must not be hit by the cancel.
    let other = pgwarden.connect("app", "app-pw", "app").await;
    let other_query = tokio::spawn(async move { other.simple_query("select pg_sleep(1.5)").await });
    let token = client.cancel_token();
    let started = Instant::now();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token
            .cancel_query(tokio_postgres::NoTls)
            .await
            .expect("send cancel");
    });
    let err = client
        .simple_query("select pg_sleep(30)")
        .await
        .expect_err("cancelled");
    let elapsed = started.elapsed();
    canceller.await.expect("canceller");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED));
    assert!(elapsed < Duration::from_secs(5), "cancel took {elapsed:?}");
    eprintln!("cancel of pg_sleep(30) returned after {elapsed:?}");
    other_query
        .await
        .expect("join")
        .expect("the other client's query is not cancelled");
    // The session is usable afterwards.
    let rows = client.simple_query("select 1").await.expect("after cancel");
    assert_eq!(first_value(&rows).as_deref(), Some("1"));
}

#[tokio::test]
async fn a_client_killed_inside_a_transaction_does_not_leave_its_row_lock_behind() {
    let (_cluster, pgwarden) = start(PgwardenOptions {
        pool_size: 1,
        max_backend_connections: 1,
        ..PgwardenOptions::default()
    })
    .await;
    let setup = pgwarden.connect("app", "app-pw", "app").await;
    setup
        .batch_execute(
            "create table locked (id int primary key, v int); insert into locked values (1, 0)",
        )
        .await
        .expect("setup");
    drop(setup);

    // A raw client that locks the row and then vanishes without a word.
    let dsn = pgwarden.dsn("app", "app-pw", "app");
    let (victim, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
        .await
        .expect("victim connects");
    let connection_task = tokio::spawn(connection);
    victim
        .batch_execute("begin; update locked set v = 1 where id = 1")
        .await
        .expect("lock row");
    connection_task.abort();
    drop(victim);

    let next = pgwarden.connect("app", "app-pw", "app").await;
    next.batch_execute("set lock_timeout = '5s'")
        .await
        .expect("lock timeout");
    next.batch_execute("update locked set v = 2 where id = 1")
        .await
        .expect("the row lock was released with the vanished client's transaction");
    let rows = next
        .simple_query("select v from locked")
        .await
        .expect("select");
    assert_eq!(
        first_value(&rows).as_deref(),
        Some("2"),
        "the vanished client's update was rolled back, ours committed"
    );
}

#[tokio::test]
async fn a_terminated_backend_fails_the_running_query_and_the_session_goes_on() {
    let (cluster, pgwarden) = start(PgwardenOptions::default()).await;
    let client = pgwarden.connect("app", "app-pw", "app").await;
    let query = tokio::spawn(async move {
        let result = client.simple_query("select pg_sleep(20)").await;
        (client, result)
    });
    let admin = cluster.superuser().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = admin
            .query(
                "select pg_terminate_backend(pid) from pg_stat_activity where query = 'select pg_sleep(20)' and pid <> pg_backend_pid()",
                &[],
            )
            .await
            .expect("terminate");
        if !rows.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the query never showed up in pg_stat_activity"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (client, result) = query.await.expect("join");
    let err = result.expect_err("the query fails with the server's error");
    assert_eq!(err.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{err:?}");
    let rows = client
        .simple_query("select 3")
        .await
        .expect("next transaction succeeds");
    assert_eq!(first_value(&rows).as_deref(), Some("3"));
}

#[tokio::test]
async fn an_idle_client_is_not_affected_when_pooled_backends_are_terminated() {
    let (cluster, pgwarden) = start(PgwardenOptions::default()).await;
    let client = pgwarden.connect("app", "app-pw", "app").await;
    client.simple_query("select 1").await.expect("warm up");
    let admin = cluster.superuser().await;
    let terminated = admin
        .query(
            "select pg_terminate_backend(pid) from pg_stat_activity where usename = 'app'",
            &[],
        )
        .await
        .expect("terminate");
    assert!(!terminated.is_empty(), "a pooled backend existed");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rows = client
        .simple_query("select 5")
        .await
        .expect("served by a fresh backend");
    assert_eq!(first_value(&rows).as_deref(), Some("5"));
}

#[tokio::test]
async fn a_200_mb_copy_to_stdout_streams_through_in_bounded_memory() {
    let (_cluster, pgwarden) = start(PgwardenOptions::default()).await;
    let client = pgwarden.connect("app", "app-pw", "app").await;
    let baseline = pgwarden.rss_kib();
    // 2,000,000 rows of 100 bytes (plus a newline): just over 200 MB.
    let stream = client
        .copy_out("copy (select repeat('x', 100) from generate_series(1, 2000000)) to stdout")
        .await
        .expect("copy out");
    futures_util::pin_mut!(stream);
    let mut bytes = 0usize;
    let mut max_rss = baseline;
    let mut chunks = 0u64;
    while let Some(chunk) = stream.next().await {
        bytes += chunk.expect("chunk").len();
        chunks += 1;
        if chunks % 20_000 == 0 {
            max_rss = max_rss.max(pgwarden.rss_kib());
            // Read slowly now and then, so backpressure is exercised too.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    max_rss = max_rss.max(pgwarden.rss_kib());
    assert_eq!(bytes, 2_000_000 * 101);
    eprintln!("pgwarden RSS: {baseline} KiB before, {max_rss} KiB at most during the copy");
    assert!(
        max_rss < 64 * 1024,
        "pgwarden used {max_rss} KiB relaying 200 MB"
    );
}

#[tokio::test]
async fn a_client_waiting_longer_than_borrow_timeout_gets_53300() {
    let (_cluster, pgwarden) = start(PgwardenOptions {
        pool_size: 1,
        max_backend_connections: 1,
        borrow_timeout: "1s",
        ..PgwardenOptions::default()
    })
    .await;
    let holder = pgwarden.connect("app", "app-pw", "app").await;
    holder
        .batch_execute("begin")
        .await
        .expect("hold the only backend");
    let waiter = pgwarden.connect("app", "app-pw", "app").await;
    let started = Instant::now();
    let err = waiter
        .simple_query("select 1")
        .await
        .expect_err("borrow timeout");
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let message = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(message.contains("borrow timeout"), "{message}");
    holder
        .batch_execute("commit")
        .await
        .expect("holder unaffected");
}

#[tokio::test]
async fn a_client_that_disconnects_while_queued_leaves_the_queue() {
    let (_cluster, pgwarden) = start(PgwardenOptions {
        pool_size: 1,
        max_backend_connections: 1,
        ..PgwardenOptions::default()
    })
    .await;
    let holder = pgwarden.connect("app", "app-pw", "app").await;
    holder
        .batch_execute("begin")
        .await
        .expect("hold the only backend");
    // A queued client that gives up.
    let dsn = pgwarden.dsn("app", "app-pw", "app");
    let (queued, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let connection_task = tokio::spawn(connection);
    let queued_query = tokio::spawn(async move { queued.simple_query("select 1").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    queued_query.abort();
    connection_task.abort();
    tokio::time::sleep(Duration::from_millis(300)).await;

    holder.batch_execute("commit").await.expect("commit");
    let next = pgwarden.connect("app", "app-pw", "app").await;
    let rows = tokio::time::timeout(Duration::from_secs(5), next.simple_query("select 9"))
        .await
        .expect("the backend went to a live client, not the one that left")
        .expect("query");
    assert_eq!(first_value(&rows).as_deref(), Some("9"));
}

#[tokio::test]
async fn session_mode_keeps_one_backend_per_client_and_resets_it_after() {
    let (_cluster, pgwarden) = start(PgwardenOptions {
        pool_mode: "session",
        pool_size: 1,
        max_backend_connections: 1,
        ..PgwardenOptions::default()
    })
    .await;
    let first = pgwarden.connect("app", "app-pw", "app").await;
    first
        .batch_execute("set application_name = 'first'")
        .await
        .expect("set");
    let pid = first_value(
        &first
            .simple_query("select pg_backend_pid()")
            .await
            .expect("pid"),
    );
    let again = first_value(
        &first
            .simple_query("select pg_backend_pid()")
            .await
            .expect("pid"),
    );
    assert_eq!(pid, again, "session mode keeps the backend");
    drop(first);
    let second = pgwarden.connect("app", "app-pw", "app").await;
    let name = first_value(
        &second
            .simple_query("show application_name")
            .await
            .expect("show"),
    );
    assert_eq!(
        name.as_deref(),
        Some(""),
        "the previous client's setting was reset"
    );
}

#[tokio::test]
async fn named_statements_work_in_transaction_mode() {
    let (_cluster, pgwarden) = start(PgwardenOptions {
        pool_size: 2,
        ..PgwardenOptions::default()
    })
    .await;
    let client = pgwarden.connect("app", "app-pw", "app").await;
    let statement = client.prepare("select $1::int * 2").await.expect("prepare");
    for i in 0..20i32 {
        let row = client.query_one(&statement, &[&i]).await.expect("execute");
        assert_eq!(row.get::<_, i32>(0), i * 2);
    }
}

#[tokio::test]
async fn pipelined_requests_lost_with_a_terminated_backend_all_get_errors_never_empty_success() {
    let (cluster, pgwarden) = start(PgwardenOptions::default()).await;
    let client = pgwarden.connect("app", "app-pw", "app").await;
    let admin = cluster.superuser().await;
    let terminate = async {
        loop {
            let rows = admin
                .query(
                    "select pg_terminate_backend(pid) from pg_stat_activity where query like 'select pg_sleep(20)%' and pid <> pg_backend_pid()",
                    &[],
                )
                .await
                .expect("terminate");
            if !rows.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (first, second, ()) = tokio::join!(
        client.simple_query("select pg_sleep(20)"),
        client.simple_query("select 2"),
        terminate
    );
    assert_eq!(
        first.expect_err("first fails").code(),
        Some(&SqlState::ADMIN_SHUTDOWN)
    );
    assert!(
        second.is_err(),
        "a request the dead backend never answered is reported as failed: {second:?}"
    );
    let rows = client
        .simple_query("select 4")
        .await
        .expect("session goes on");
    assert_eq!(first_value(&rows).as_deref(), Some("4"));
}
