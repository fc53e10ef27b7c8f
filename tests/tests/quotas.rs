//! Quotas: an IAM principal over its connection quota or its connection rate is refused
//! with 53300 naming the limit, while another principal's clients run without an error.

use std::time::SystemTime;

use pgwarden_auth::rds_token::{generate, TokenRequest};
use pgwarden_tests::{metric_sum, PgCluster, Pgwarden, PgwardenOptions};
use tokio_postgres::error::SqlState;

const SECRET: &str = "quota-test-secret-access-key";
const SECRET_ENV: &str = "PGWARDEN_QUOTA_TEST_SECRET";

/// Three Lambda roles, each with its own signing key; all may connect as `app`. The
/// `orders` role may hold 3 connections, the `batch` role may open 2 at once and then one
/// every 100 seconds; `reports` has no quota.
fn iam_toml() -> String {
    let key = |id: &str, role: &str| {
        format!(
            "[[iam.keys]]\naccess_key_id = \"{id}\"\nsecret_access_key_env = \"{SECRET_ENV}\"\nprincipal = \"arn:aws:sts::123456789012:assumed-role/{role}/session\"\n"
        )
    };
    format!(
        r#"[iam]
verifier = "rds-token"
advertised_hosts = ["localhost:__PORT__"]
allow_plaintext_on_loopback = true

{}
{}
{}
[[iam.rules]]
principal = "arn:aws:iam::123456789012:role/*"
database_users = ["app"]

[[quotas]]
principal = "arn:aws:iam::123456789012:role/orders-*"
max_connections = 3

[[quotas]]
principal = "arn:aws:iam::123456789012:role/batch-*"
connections_per_second = 0.01
burst = 2
"#,
        key("AKIDORDERS", "orders-fn"),
        key("AKIDREPORTS", "reports-fn"),
        key("AKIDBATCH", "batch-fn"),
    )
}

fn token(pgwarden: &Pgwarden, key_id: &str) -> String {
    let token = generate(&TokenRequest {
        host: "localhost",
        port: pgwarden.port(),
        db_user: "app",
        region: "us-east-1",
        access_key_id: key_id,
        secret_access_key: SECRET,
        session_token: None,
        time: SystemTime::now(),
    });
    pgwarden.forbid_in_log(&token);
    token
}

async fn refused(pgwarden: &Pgwarden, key_id: &str) -> String {
    let err = pgwarden
        .try_connect("app", &token(pgwarden, key_id), "app")
        .await
        .expect_err("refused by the quota");
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err:?}");
    err.as_db_error()
        .expect("a server error")
        .message()
        .to_owned()
}

#[tokio::test]
async fn a_principal_over_its_quota_is_refused_while_others_run_without_errors() {
    std::env::set_var(SECRET_ENV, SECRET);
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(
        &cluster,
        PgwardenOptions {
            extra_target_toml: "client_auth = \"iam\"".into(),
            extra_toml: iam_toml(),
            ..PgwardenOptions::default()
        },
    )
    .await;

    let mut orders = Vec::new();
    for _ in 0..3 {
        orders.push(
            pgwarden
                .connect("app", &token(&pgwarden, "AKIDORDERS"), "app")
                .await,
        );
    }
    let message = refused(&pgwarden, "AKIDORDERS").await;
    assert!(
        message.contains("role/orders-fn") && message.contains("max_connections"),
        "{message}"
    );

    // Meanwhile another role runs ten clients at once, more than the orders quota.
    let mut reports = Vec::new();
    for _ in 0..10 {
        reports.push(
            pgwarden
                .connect("app", &token(&pgwarden, "AKIDREPORTS"), "app")
                .await,
        );
    }
    let work = reports.iter().map(|c| async move {
        for _ in 0..20 {
            c.simple_query("select 1").await?;
        }
        Ok::<_, tokio_postgres::Error>(())
    });
    for result in futures_util::future::join_all(work).await {
        result.expect("the reports role is not limited by the orders quota");
    }
    for c in &orders {
        c.simple_query("select 1")
            .await
            .expect("admitted clients keep working");
    }

    // A disconnect gives the connection back (once pgwarden has seen it).
    let open = |m: &str| metric_sum(m, "pgwarden_client_connections").unwrap_or_default();
    let before = open(&pgwarden.metrics().await);
    drop(orders.pop());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while open(&pgwarden.metrics().await) >= before {
        assert!(
            std::time::Instant::now() < deadline,
            "the disconnect was not noticed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    orders.push(
        pgwarden
            .connect("app", &token(&pgwarden, "AKIDORDERS"), "app")
            .await,
    );

    // The batch role's bucket holds two connections; the third comes too fast.
    let _batch: Vec<_> = vec![
        pgwarden
            .connect("app", &token(&pgwarden, "AKIDBATCH"), "app")
            .await,
        pgwarden
            .connect("app", &token(&pgwarden, "AKIDBATCH"), "app")
            .await,
    ];
    let message = refused(&pgwarden, "AKIDBATCH").await;
    assert!(
        message.contains("role/batch-fn") && message.contains("connections_per_second"),
        "{message}"
    );

    let metrics = pgwarden.metrics().await;
    let rejections = |limit: &str| {
        metric_sum(
            &metrics,
            &format!("pgwarden_quota_rejections_total{{limit=\"{limit}\",scope=\"principal\"}}"),
        )
    };
    assert_eq!(rejections("connections"), Some(1.0), "{metrics}");
    assert_eq!(rejections("rate"), Some(1.0), "{metrics}");

    // A reload raises the orders quota; the counters of connected clients carry over.
    pgwarden.edit_config(|toml| toml.replace("max_connections = 3\n", "max_connections = 4\n"));
    assert!(pgwarden.reload().await, "the raised quota is applied");
    orders.push(
        pgwarden
            .connect("app", &token(&pgwarden, "AKIDORDERS"), "app")
            .await,
    );
    let message = refused(&pgwarden, "AKIDORDERS").await;
    assert!(message.contains("4 connections open"), "{message}");
}

#[tokio::test]
async fn a_pool_with_max_waiting_clients_refuses_one_more_waiter_at_once() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(
        &cluster,
        PgwardenOptions {
            pool_size: 1,
            extra_target_toml: "max_waiting_clients = 2".into(),
            ..PgwardenOptions::default()
        },
    )
    .await;
    let holder = pgwarden.connect("app", "app-pw", "app").await;
    holder
        .batch_execute("begin; select 1")
        .await
        .expect("hold the only backend");
    let mut waiters = Vec::new();
    for _ in 0..3 {
        waiters.push(pgwarden.connect("app", "app-pw", "app").await);
    }
    // Two wait for the backend; the third finds the queue full.
    let first_two =
        futures_util::future::join_all(waiters[..2].iter().map(|c| c.simple_query("select 1")));
    let third = async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let err = waiters[2]
            .simple_query("select 1")
            .await
            .expect_err("the queue is full");
        holder
            .batch_execute("commit")
            .await
            .expect("release the backend");
        err
    };
    let (served, err) = tokio::join!(first_two, third);
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err:?}");
    let message = err.as_db_error().expect("a server error").message();
    assert!(message.contains("max_waiting_clients"), "{message}");
    for result in served {
        result.expect("the two waiters are served once the backend is free");
    }
    let metrics = pgwarden.metrics().await;
    assert_eq!(
        metric_sum(
            &metrics,
            "pgwarden_quota_rejections_total{limit=\"waiting\",scope=\"pool\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}
