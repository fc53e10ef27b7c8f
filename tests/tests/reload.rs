//! Reload on SIGHUP: a changed pool size applies under load without a failed transaction,
//! in both directions; a configuration that does not validate changes nothing.

use std::time::{Duration, Instant};

use pgwarden_tests::{assert_pgbench_clean, PgCluster, Pgwarden, PgwardenOptions};

/// Backend connections of user `app` on the server now.
fn app_backends(cluster: &PgCluster) -> usize {
    cluster
        .psql("select count(*) from pg_stat_activity where usename = 'app'")
        .parse()
        .expect("a count")
}

/// Waits until `check` holds for the number of `app` backends; returns the last count.
async fn wait_for_backends(
    cluster: &PgCluster,
    pgwarden: &Pgwarden,
    what: &str,
    check: impl Fn(usize) -> bool,
) -> usize {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let n = app_backends(cluster);
        if check(n) {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {n} backends\n{}",
            pgwarden.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn set_pool_size(pgwarden: &Pgwarden, from: u32, to: u32) {
    pgwarden.edit_config(|toml| {
        toml.replace(
            &format!("pool_size = {from}\n"),
            &format!("pool_size = {to}\n"),
        )
    });
    pgwarden.send_sighup();
}

#[tokio::test]
async fn sighup_resizes_the_pool_under_load_without_failing_a_transaction() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(
        &cluster,
        PgwardenOptions {
            pool_size: 3,
            ..PgwardenOptions::default()
        },
    )
    .await;
    cluster.init_pgbench("app-pw");
    // Each transaction holds its backend for a while, so 24 clients keep every backend
    // the pool allows busy.
    let script = pgwarden.config_path().with_file_name("sleep.sql");
    std::fs::write(&script, "select pg_sleep(0.02);\n").expect("write script");
    let script = script.display().to_string();
    let args = ["-n", "-f", &script, "-c", "24", "-j", "2", "-T", "14"];
    let load = pgwarden.pgbench(&args);
    let watch = async {
        let before = wait_for_backends(&cluster, &pgwarden, "pool of 3 filled", |n| n == 3).await;
        set_pool_size(&pgwarden, 3, 10);
        let grown = wait_for_backends(&cluster, &pgwarden, "pool grown to 10", |n| n == 10).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let still = app_backends(&cluster);
        set_pool_size(&pgwarden, 10, 2);
        let shrunk = wait_for_backends(&cluster, &pgwarden, "pool shrunk to 2", |n| n == 2).await;
        (before, grown, still, shrunk)
    };
    let (run, (before, grown, still, shrunk)) = tokio::join!(load, watch);
    let stdout = assert_pgbench_clean(&run);
    assert_eq!((before, grown, shrunk), (3, 10, 2), "{stdout}");
    assert!(still <= 10, "the new size is a bound too: {still} backends");
    let log = pgwarden.log();
    assert_eq!(log.matches("configuration reloaded").count(), 2, "{log}");
}

#[tokio::test]
async fn an_invalid_configuration_on_sighup_changes_nothing() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(
        &cluster,
        PgwardenOptions {
            pool_size: 2,
            ..PgwardenOptions::default()
        },
    )
    .await;
    // A larger pool, but with min_idle above it: the file does not validate.
    pgwarden.edit_config(|toml| toml.replace("pool_size = 2\n", "pool_size = 8\nmin_idle = 9\n"));
    assert!(!pgwarden.reload().await, "the file is refused");
    let log = pgwarden.log();
    assert!(
        log.contains("min_idle (9) is above pool_size (8)"),
        "the log line says why: {log}"
    );
    // Six clients each hold a backend for a second; the pool of 2 still bounds them.
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(pgwarden.connect("app", "app-pw", "app").await);
    }
    let sleeps = clients.iter().map(|c| c.simple_query("select pg_sleep(1)"));
    let watch = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        app_backends(&cluster)
    };
    let (results, during) = tokio::join!(futures_util::future::join_all(sleeps), watch);
    for r in results {
        r.expect("clients are served by the old configuration");
    }
    assert_eq!(during, 2, "pool_size is still 2");
}

/// `pgwarden_query_requests_total` of `target`.
async fn queries_of(pgwarden: &Pgwarden, target: &str) -> f64 {
    pgwarden_tests::metric_sum(
        &pgwarden.metrics().await,
        &format!("pgwarden_query_requests_total{{target=\"{target}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn a_reload_adds_and_removes_targets_without_dropping_their_clients() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, PgwardenOptions::default()).await;
    cluster.create_database("reports", "app");
    let on_main = pgwarden.connect("app", "app-pw", "app").await;

    // A new target for database reports, ahead of main (which serves every database).
    let original = std::fs::read_to_string(pgwarden.config_path()).expect("read config");
    let start = original.find("[[targets]]").expect("a target");
    let reports_target = original[start..]
        .replace("name = \"main\"", "name = \"reports\"")
        .replace("databases = [\"*\"]", "databases = [\"reports\"]");
    pgwarden
        .edit_config(|toml| format!("{}{}\n{}", &toml[..start], reports_target, &toml[start..]));
    assert!(pgwarden.reload().await, "the new target is applied");
    let on_reports = pgwarden.connect("app", "app-pw", "reports").await;
    on_reports.simple_query("select 1").await.expect("query");
    assert_eq!(
        queries_of(&pgwarden, "reports").await,
        1.0,
        "served by the new target"
    );
    on_main
        .simple_query("select 1")
        .await
        .expect("the client on main was not dropped by the reload");

    // Remove it again: its client keeps its session; newcomers go to main.
    std::fs::write(pgwarden.config_path(), &original).expect("restore config");
    assert!(pgwarden.reload().await, "the removal is applied");
    on_reports
        .simple_query("select 1")
        .await
        .expect("a client of a removed target keeps its session");
    assert_eq!(queries_of(&pgwarden, "reports").await, 2.0);
    let main_before = queries_of(&pgwarden, "main").await;
    let newcomer = pgwarden.connect("app", "app-pw", "reports").await;
    newcomer.simple_query("select 1").await.expect("query");
    assert_eq!(
        queries_of(&pgwarden, "reports").await,
        2.0,
        "the removed target takes no one new"
    );
    assert_eq!(queries_of(&pgwarden, "main").await, main_before + 1.0);
    on_main
        .simple_query("select 1")
        .await
        .expect("main still serves");
}

#[tokio::test]
async fn a_reload_reads_a_changed_users_file() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, PgwardenOptions::default()).await;
    let existing = pgwarden.connect("app", "app-pw", "app").await;
    cluster.create_user("newcomer", "newcomer-pw");
    cluster.create_database("newcomer", "newcomer");
    pgwarden.forbid_in_log("newcomer-pw");
    assert!(pgwarden
        .try_connect("newcomer", "newcomer-pw", "newcomer")
        .await
        .is_err());

    let users = pgwarden.config_path().with_file_name("users.toml");
    let mut text = std::fs::read_to_string(&users).expect("read users file");
    text.push_str("\n[[users]]\nname = \"newcomer\"\npassword = \"newcomer-pw\"\n");
    std::fs::write(&users, text).expect("write users file");
    assert!(pgwarden.reload().await, "the changed users file is applied");
    let newcomer = pgwarden
        .connect("newcomer", "newcomer-pw", "newcomer")
        .await;
    newcomer
        .simple_query("select 1")
        .await
        .expect("the new user is served");
    existing
        .simple_query("select 1")
        .await
        .expect("a connected client keeps its session");
}
