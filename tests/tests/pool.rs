//! Pool limits and lifecycle against a real Postgres: the target-wide cap across pools,
//! min_idle, idle_timeout, max_lifetime, and startup without a borrow once parameters are
//! cached.

use std::time::{Duration, Instant};

use pgwarden_tests::{PgCluster, Pgwarden, PgwardenOptions};

/// Backends pgwarden holds in the cluster for `user`.
async fn backends(admin: &tokio_postgres::Client, user: &str) -> i64 {
    admin
        .query_one(
            "select count(*) from pg_stat_activity where usename = $1",
            &[&user],
        )
        .await
        .expect("count backends")
        .get(0)
}

/// Polls `check` until it holds or `within` passes.
async fn eventually(within: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn max_backend_connections_caps_all_pools_of_a_target_together() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(
        &cluster,
        PgwardenOptions {
            pool_size: 4,
            max_backend_connections: 5,
            users: vec![
                ("app".into(), "app-pw".into()),
                ("other".into(), "other-pw".into()),
            ],
            ..PgwardenOptions::default()
        },
    )
    .await;
    let admin = cluster.superuser().await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (user, pw) = if i % 2 == 0 {
            ("app", "app-pw")
        } else {
            ("other", "other-pw")
        };
        let client = pgwarden.connect(user, pw, user).await;
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                client
                    .simple_query("select pg_sleep(0.02)")
                    .await
                    .expect("query");
            }
        }));
    }
    let mut max_seen = 0;
    while tasks.iter().any(|t| !t.is_finished()) {
        let total = backends(&admin, "app").await + backends(&admin, "other").await;
        max_seen = max_seen.max(total);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in tasks {
        t.await.expect("client task");
    }
    assert!(
        max_seen <= 5,
        "saw {max_seen} backends with max_backend_connections = 5"
    );
    assert!(max_seen >= 2, "both pools were used ({max_seen})");
}

#[tokio::test]
async fn min_idle_opens_connections_and_idle_timeout_closes_the_rest() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(
        &cluster,
        PgwardenOptions {
            pool_size: 6,
            extra_target_toml: "min_idle = 2\nidle_timeout = \"1s\"".into(),
            ..PgwardenOptions::default()
        },
    )
    .await;
    let admin = cluster.superuser().await;
    // Six concurrent transactions open six backends.
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(pgwarden.connect("app", "app-pw", "app").await);
    }
    let queries: Vec<_> = clients
        .iter()
        .map(|c| c.simple_query("select pg_sleep(0.3)"))
        .collect();
    for q in futures_util::future::join_all(queries).await {
        q.expect("query");
    }
    assert_eq!(backends(&admin, "app").await, 6);
    // After idle_timeout, only min_idle stay open.
    assert!(
        eventually(Duration::from_secs(10), async || backends(&admin, "app")
            .await
            == 2)
        .await,
        "idle connections above min_idle were closed (now {})",
        backends(&admin, "app").await
    );
}

#[tokio::test]
async fn max_lifetime_replaces_old_backend_connections() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(
        &cluster,
        PgwardenOptions {
            pool_size: 1,
            extra_target_toml: "max_lifetime = \"1s\"".into(),
            ..PgwardenOptions::default()
        },
    )
    .await;
    let client = pgwarden.connect("app", "app-pw", "app").await;
    let pid = |rows: Vec<tokio_postgres::SimpleQueryMessage>| {
        rows.into_iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
    };
    let first = pid(client
        .simple_query("select pg_backend_pid()")
        .await
        .expect("pid"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = pid(client
        .simple_query("select pg_backend_pid()")
        .await
        .expect("pid"));
    assert_ne!(first, later, "a connection past max_lifetime is not reused");
}

#[tokio::test]
async fn clients_get_cached_parameters_without_a_backend_login() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, PgwardenOptions::default()).await;
    let first = pgwarden.connect("app", "app-pw", "app").await;
    first.simple_query("select 1").await.expect("query");
    let logins = |m: &str| {
        metric(
            m,
            "pgwarden_backend_connection_setups_total{outcome=\"succeeded\"",
        )
    };
    let before = logins(&pgwarden.metrics().await);
    assert!(before >= 1.0);
    let mut others = Vec::new();
    for _ in 0..20 {
        others.push(pgwarden.connect("app", "app-pw", "app").await);
    }
    let after = logins(&pgwarden.metrics().await);
    assert_eq!(
        before, after,
        "connecting clients did not log in new backends"
    );
}
