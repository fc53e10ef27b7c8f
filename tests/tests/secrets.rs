//! Database logins from AWS Secrets Manager (the local emulator): pgwarden reads the RDS
//! secret at start, clients authenticate with the secret's password, pgwarden logs in to
//! Postgres with it, and the value never shows in pgwarden's log or metrics.

use pgwarden_tests::{AwsEmulator, PgCluster, Pgwarden, PgwardenOptions, ISOLATED_AWS_ENV};

#[tokio::test]
async fn pgwarden_logs_in_with_the_login_read_from_secrets_manager() {
    let emulator = AwsEmulator::shared();
    let cluster = PgCluster::start();
    let password = "sm-secret-password-42";
    cluster.create_user("app", password);
    cluster.create_database("app", "app");
    let name = format!("rds/app-{}", std::process::id());
    emulator.create_secret(&name, "app", password);
    let mut env: Vec<(String, String)> = ISOLATED_AWS_ENV
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    env.push(("AWS_ACCESS_KEY_ID".into(), "test".into()));
    env.push(("AWS_SECRET_ACCESS_KEY".into(), "test".into()));
    let pgwarden = Pgwarden::start(
        &cluster,
        PgwardenOptions {
            // The users list only creates the role; the login comes from the secret.
            users: vec![("app".into(), password.into())],
            credentials_toml: Some(format!(
                "{{ provider = \"secretsmanager\", secrets = [\"{name}\"], region = \"us-east-1\", endpoint = \"{}\" }}",
                emulator.endpoint()
            )),
            env,
            ..PgwardenOptions::default()
        },
    )
    .await;
    let client = pgwarden.connect("app", password, "app").await;
    let row = client
        .query_one("select current_user::text", &[])
        .await
        .expect("query");
    assert_eq!(row.get::<_, String>(0), "app");
    let metrics = pgwarden.metrics().await;
    assert!(
        metrics.contains("pgwarden_secret_fetches_total{outcome=\"succeeded\"} 1"),
        "{metrics}"
    );
    assert!(
        !pgwarden.log().contains(password),
        "the secret never appears in the log"
    );
    assert!(!metrics.contains(password));
}
