//! Parked clients (`server.park_idle_clients_after`): a client idle between transactions
//! leaves its task; it keeps its session (prepared statements, settings, TLS session) and
//! wakes on its next message, its close, or pgwarden's shutdown.

use std::process::Command;
use std::time::{Duration, Instant};

use pgwarden_tests::{
    assert_closed_by_shutdown, metric_sum, pg_bindir, PgCluster, Pgwarden, PgwardenOptions,
};

/// Parks after 200 ms, so the tests wait little.
fn parking_options(tls: bool) -> PgwardenOptions {
    PgwardenOptions {
        tls,
        extra_server_toml: "park_idle_clients_after = \"200ms\"".into(),
        ..PgwardenOptions::default()
    }
}

async fn metric(pgwarden: &Pgwarden, name: &str) -> f64 {
    metric_sum(&pgwarden.metrics().await, name).unwrap_or_else(|| panic!("{name} is exported"))
}

/// Waits until `name` reads `value`; panics with the last reading after 10 s.
async fn wait_for_metric(pgwarden: &Pgwarden, name: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = metric(pgwarden, name).await;
        if now == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} is {now}, expected {value}\n{}",
            pgwarden.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_idle_client_parks_and_wakes_with_its_prepared_statements_and_settings() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, parking_options(false)).await;
    let client = pgwarden.connect("app", "app-pw", "app").await;
    client
        .batch_execute("set application_name = 'parked-client'")
        .await
        .expect("set");
    let add_one = client.prepare("select $1::int + 1").await.expect("prepare");

    wait_for_metric(&pgwarden, "pgwarden_client_connections_parked", 1.0).await;
    let parks_before = metric(&pgwarden, "pgwarden_client_parks_total").await;
    assert!(parks_before >= 1.0);

    let row = client.query_one(&add_one, &[&41]).await.expect("execute");
    assert_eq!(row.get::<_, i32>(0), 42, "the prepared statement survived");
    let row = client
        .query_one("select current_setting('application_name')", &[])
        .await
        .expect("show");
    assert_eq!(
        row.get::<_, String>(0),
        "parked-client",
        "the setting survived"
    );

    // Served again, then parked again once idle.
    wait_for_metric(&pgwarden, "pgwarden_client_connections_parked", 1.0).await;
    assert!(metric(&pgwarden, "pgwarden_client_parks_total").await > parks_before);

    // A parked client that goes away is noticed at once and cleaned up.
    drop(client);
    wait_for_metric(&pgwarden, "pgwarden_client_connections_parked", 0.0).await;
    wait_for_metric(&pgwarden, "pgwarden_client_connections", 0.0).await;

    // Its log span is dropped while it is parked and made again when it wakes: the lines
    // of a woken client still say who it is.
    let log = pgwarden.log();
    let disconnected: serde_json::Value = log
        .lines()
        .find(|line| line.contains("client disconnected"))
        .and_then(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| panic!("no disconnect line in\n{log}"));
    let span = &disconnected["span"];
    assert_eq!(span["name"], "client", "{disconnected}");
    assert_eq!(span["user"], "app", "{disconnected}");
    assert_eq!(span["database"], "app", "{disconnected}");
    assert_eq!(span["target"], "main", "{disconnected}");
    assert_eq!(span["tls"], false, "{disconnected}");
    assert!(
        span["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{disconnected}"
    );
}

#[tokio::test]
async fn a_parked_tls_client_keeps_its_tls_session() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, parking_options(true)).await;
    let dsn = format!(
        "host=localhost port={} user=app password=app-pw dbname=app sslmode=verify-full sslrootcert={}",
        pgwarden.port(),
        pgwarden.ca_path().display()
    );
    // psql idles (and parks) during each `\! sleep`, then carries on over the same session.
    let script = "set application_name = 'parked-tls';\n\\! sleep 1\nselect current_setting('application_name');\n\\! sleep 1\nselect 40 + 2;\n";
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), script).expect("write script");
    let out = Command::new(pg_bindir().join("psql"))
        .args(["-XAtq", "-v", "ON_ERROR_STOP=1", &dsn, "-f"])
        .arg(file.path())
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        pgwarden.log()
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "parked-tls\n42"
    );
    assert!(
        metric(&pgwarden, "pgwarden_client_parks_total").await >= 2.0,
        "psql was parked during both sleeps"
    );
}

#[tokio::test]
async fn shutdown_wakes_parked_clients_and_tells_them() {
    let cluster = PgCluster::start();
    let mut pgwarden = Pgwarden::start(&cluster, parking_options(false)).await;
    let clients = [
        pgwarden.connect("app", "app-pw", "app").await,
        pgwarden.connect("app", "app-pw", "app").await,
    ];
    for client in &clients {
        client.simple_query("select 1").await.expect("query");
    }
    wait_for_metric(&pgwarden, "pgwarden_client_connections_parked", 2.0).await;

    pgwarden.send_sigterm();
    // The drain waits for every client, parked ones included (shutdown_timeout is 30 s):
    // they must be woken and closed at once.
    let status = pgwarden
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("pgwarden exits without waiting out its drain timeout");
    assert!(status.success(), "exit status {status}");
    for client in &clients {
        assert_closed_by_shutdown(client).await;
    }
}

/// A wave of parking ends with free memory given back to the system (`memory.rs`): not
/// after a few parks, but once 1,000 have come and parking has been quiet for a moment.
#[tokio::test]
async fn a_wave_of_parking_gives_memory_back_once_it_settles() {
    const CLIENTS: usize = 100;
    const TRIMS: &str = "pgwarden_memory_trims_total";
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, parking_options(false)).await;
    let clients = futures_util::future::join_all(
        (0..CLIENTS).map(|_| pgwarden.connect("app", "app-pw", "app")),
    )
    .await;
    // Each client parks once after connecting, then once after each round of queries.
    let wait_all_parked = || {
        wait_for_metric(
            &pgwarden,
            "pgwarden_client_connections_parked",
            CLIENTS as f64,
        )
    };
    wait_all_parked().await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        metric(&pgwarden, TRIMS).await,
        0.0,
        "{CLIENTS} parks are too few to trim for"
    );

    let mut parks = metric(&pgwarden, "pgwarden_client_parks_total").await;
    while parks < 1000.0 {
        let queries = clients.iter().map(|client| client.simple_query("select 1"));
        for result in futures_util::future::join_all(queries).await {
            result.expect("query");
        }
        wait_all_parked().await;
        parks = metric(&pgwarden, "pgwarden_client_parks_total").await;
    }
    wait_for_metric(&pgwarden, TRIMS, 1.0).await;
}
