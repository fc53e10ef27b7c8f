//! The metrics endpoint: it lists exactly the families docs/metrics.md documents, and during
//! a load its values match what Postgres (pg_stat_activity) and the test's own client
//! counts say.

use std::collections::BTreeSet;

use pgwarden_tests::{assert_pgbench_clean, metric_sum, PgCluster, Pgwarden, PgwardenOptions};

/// Metric names in the tables of docs/metrics.md (first column, backticked).
fn documented() -> BTreeSet<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md");
    let text = std::fs::read_to_string(path).expect("read docs/metrics.md");
    text.lines()
        .filter_map(|line| line.strip_prefix("| `pgwarden_"))
        .filter_map(|rest| rest.split('`').next())
        .map(|name| format!("pgwarden_{name}"))
        .collect()
}

/// Families listed by `# TYPE` lines.
fn exposed(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split(' ').next())
        .map(str::to_owned)
        .collect()
}

fn value(metrics: &str, series: &str) -> f64 {
    metric_sum(metrics, series).unwrap_or_else(|| panic!("no sample of {series}:\n{metrics}"))
}

fn count(cluster: &PgCluster, condition: &str) -> f64 {
    cluster
        .psql(&format!(
            "select count(*) from pg_stat_activity where usename = 'app' and {condition}"
        ))
        .parse()
        .expect("a count")
}

#[tokio::test]
async fn metrics_match_the_docs_and_the_load() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, PgwardenOptions::default()).await;
    cluster.init_pgbench("app-pw");

    let docs = documented();
    let before = pgwarden.metrics().await;
    let endpoint = exposed(&before);
    assert_eq!(
        docs, endpoint,
        "docs/metrics.md and /metrics list different families"
    );

    // A pgbench load first, so the counters have something to count.
    let run = pgwarden
        .pgbench(&["-n", "-S", "-c", "8", "-j", "2", "-t", "200"])
        .await;
    assert_pgbench_clean(&run);
    let transactions = 8.0 * 200.0;

    // Then a standing load: 4 clients inside a transaction, 2 pinned by a temp table, 6
    // idle between transactions, and one wrong password.
    let mut clients = Vec::new();
    for _ in 0..4 {
        let c = pgwarden.connect("app", "app-pw", "app").await;
        c.batch_execute("begin; select 1").await.expect("begin");
        clients.push(c);
    }
    for _ in 0..2 {
        let c = pgwarden.connect("app", "app-pw", "app").await;
        c.batch_execute("create temp table t (n int)")
            .await
            .expect("pins");
        clients.push(c);
    }
    for _ in 0..6 {
        let c = pgwarden.connect("app", "app-pw", "app").await;
        c.simple_query("select 1").await.expect("query");
        clients.push(c);
    }
    assert!(pgwarden.try_connect("app", "wrong", "app").await.is_err());

    let m = pgwarden.metrics().await;
    let on_server = count(&cluster, "true");
    assert_eq!(value(&m, "pgwarden_client_connections"), 12.0);
    assert_eq!(value(&m, "pgwarden_client_connections_no_tls"), 12.0);
    // Counters as increments over the start (the harness connects once to see it ready).
    // pgbench opens one connection of its own before its 8 clients.
    let delta = |series: &str| value(&m, series) - metric_sum(&before, series).unwrap_or(0.0);
    assert_eq!(
        delta("pgwarden_client_connections_received_total"),
        12.0 + 9.0 + 1.0
    );
    assert_eq!(
        delta("pgwarden_client_connection_setups_total{outcome=\"succeeded\"}"),
        12.0 + 9.0
    );
    assert_eq!(
        delta("pgwarden_client_connection_setups_total{outcome=\"failed\"}"),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "pgwarden_client_auth_failures_total{reason=\"wrong_password\"}"
        ),
        1.0
    );
    assert_eq!(
        value(&m, "pgwarden_backend_connections"),
        on_server,
        "every backend pgwarden counts is on the server, and no other"
    );
    assert_eq!(
        value(
            &m,
            "pgwarden_backend_connections{state=\"borrowed\",target=\"main\"}"
        ),
        6.0
    );
    assert_eq!(
        value(&m, "pgwarden_backend_connections_in_transaction"),
        count(&cluster, "state = 'idle in transaction'")
    );
    assert_eq!(
        value(&m, "pgwarden_backend_connections_in_transaction"),
        4.0
    );
    assert_eq!(value(&m, "pgwarden_backend_connections_pinned"), 2.0);
    assert_eq!(
        value(
            &m,
            "pgwarden_pins_total{reason=\"temp_table\",target=\"main\"}"
        ),
        2.0
    );
    assert_eq!(value(&m, "pgwarden_backend_connections_max"), 50.0);
    let pool = |name: &str, extra: &str| {
        value(
            &m,
            &format!("{name}{{database=\"app\",{extra}target=\"main\",user=\"app\"}}"),
        )
    };
    assert_eq!(pool("pgwarden_pool_clients", ""), 12.0);
    assert_eq!(pool("pgwarden_pool_clients_waiting", ""), 0.0);
    assert_eq!(
        pool("pgwarden_pool_backend_connections", "state=\"busy\","),
        6.0
    );
    assert_eq!(
        pool("pgwarden_pool_backend_connections", "state=\"idle\",")
            + pool("pgwarden_pool_backend_connections", "state=\"busy\","),
        on_server
    );
    assert_eq!(value(&m, "pgwarden_target_available"), 1.0);
    assert!(value(&m, "pgwarden_query_requests_total") >= transactions);
    assert!(value(&m, "pgwarden_query_response_duration_seconds_count") >= transactions);
    // One borrow per request at most (a client whose next request is already there keeps
    // its backend), plus one per client setup that applies startup settings on a backend.
    let borrows = value(&m, "pgwarden_borrow_duration_seconds_count");
    let requests = value(&m, "pgwarden_query_requests_total");
    let setups = value(
        &m,
        "pgwarden_client_connection_setups_total{outcome=\"succeeded\"}",
    );
    assert!(
        borrows >= 12.0 && borrows <= requests + setups,
        "{borrows} borrows, {requests} requests, {setups} setups"
    );
    assert_eq!(
        value(
            &m,
            "pgwarden_backend_connection_setups_total{outcome=\"succeeded\",target=\"main\"}"
        ),
        on_server + metric_sum(&m, "pgwarden_backend_connections_closed_total").unwrap_or(0.0)
    );

    // When the clients leave, the gauges come back to what the server shows.
    drop(clients);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let m = pgwarden.metrics().await;
        let settled = value(&m, "pgwarden_client_connections") == 0.0
            && value(&m, "pgwarden_backend_connections_in_transaction") == 0.0
            && value(&m, "pgwarden_backend_connections_pinned") == 0.0
            && value(
                &m,
                "pgwarden_backend_connections{state=\"borrowed\",target=\"main\"}",
            ) == 0.0;
        if settled {
            assert_eq!(
                value(&m, "pgwarden_backend_connections"),
                count(&cluster, "true")
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "gauges did not settle:\n{m}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
