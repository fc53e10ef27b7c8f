//! pgwarden logs in to Postgres with whatever method the server asks for: SCRAM-SHA-256
//! (the harness default), md5 and cleartext password.

use pgwarden_tests::{PgCluster, Pgwarden, PgwardenOptions};

/// Makes the cluster ask user `app` for `method`, storing the password as `encryption`.
fn require_method(cluster: &PgCluster, method: &str, encryption: &str) {
    let hba = cluster.dir().join("data").join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
    std::fs::write(&hba, format!("host all app 127.0.0.1/32 {method}\n{rules}"))
        .expect("write pg_hba.conf");
    cluster.psql(&format!(
        "set password_encryption = '{encryption}'; alter role app password 'app-pw'"
    ));
    cluster.psql("select pg_reload_conf()");
    let stored = cluster.psql("select left(rolpassword, 5) from pg_authid where rolname = 'app'");
    let expected = if encryption == "md5" { "md5" } else { "SCRAM" };
    assert!(stored.starts_with(expected), "password stored as {stored}");
}

async fn logs_in_with(method: &str, encryption: &str) {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, PgwardenOptions::default()).await;
    require_method(&cluster, method, encryption);
    let client = pgwarden.connect("app", "app-pw", "app").await;
    let row = client
        .query_one("select current_user::text", &[])
        .await
        .unwrap_or_else(|e| {
            panic!(
                "query through a {method} backend login: {e}\n{}",
                pgwarden.log()
            )
        });
    assert_eq!(row.get::<_, String>(0), "app");
}

#[tokio::test]
async fn backend_login_with_md5() {
    logs_in_with("md5", "md5").await;
}

#[tokio::test]
async fn backend_login_with_cleartext_password() {
    logs_in_with("password", "scram-sha-256").await;
}

#[tokio::test]
async fn a_backend_login_refused_by_postgres_reaches_the_client_as_postgres_sent_it() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, PgwardenOptions::default()).await;
    // pgwarden's stored password no longer matches the database's.
    cluster.psql("alter role app password 'changed-elsewhere'");
    let Err(err) = pgwarden.try_connect("app", "app-pw", "app").await else {
        panic!("the backend login should fail");
    };
    let db = err.as_db_error().expect("a server error");
    assert_eq!(
        db.code(),
        &tokio_postgres::error::SqlState::INVALID_PASSWORD
    );
    assert!(
        db.message().contains("password authentication failed"),
        "{}",
        db.message()
    );
}

#[tokio::test]
async fn readiness_follows_backend_logins_but_not_a_clients_unknown_database() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, PgwardenOptions::default()).await;
    let readiness = || pgwarden_tests::http_status(pgwarden.admin_port(), "/readyz");

    // A database that does not exist is the client's problem: still ready.
    let Err(err) = pgwarden.try_connect("app", "app-pw", "no_such_db").await else {
        panic!("the database does not exist");
    };
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME)
    );
    assert_eq!(readiness().await, (200, "ready\n".to_owned()));

    // pgwarden's own login refused: not ready, and the metric says so.
    cluster.psql("alter role app password 'changed-elsewhere'");
    assert!(pgwarden.try_connect("app", "app-pw", "app").await.is_err());
    let (status, body) = readiness().await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("the last backend login failed"), "{body}");
    assert_eq!(
        pgwarden_tests::metric_sum(&pgwarden.metrics().await, "pgwarden_target_available"),
        Some(0.0)
    );

    // Fixed on the server: maintenance retries the login, ready again without a client.
    cluster.psql("alter role app password 'app-pw'");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while readiness().await.0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "not ready again:\n{}",
            pgwarden.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(
        pgwarden_tests::metric_sum(&pgwarden.metrics().await, "pgwarden_target_available"),
        Some(1.0)
    );
}
