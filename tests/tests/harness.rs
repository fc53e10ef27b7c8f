//! The harness itself: a throwaway cluster answers over TCP (SCRAM) and the unix socket,
//! its users can log in with SCRAM, and it leaves nothing behind.

use pgwarden_tests::PgCluster;

#[tokio::test]
async fn cluster_answers_over_tcp_with_scram_and_over_the_unix_socket() {
    let cluster = PgCluster::start();

    let client = cluster.superuser().await;
    let row = client
        .query_one("select 1", &[])
        .await
        .expect("select 1 over TCP");
    assert_eq!(row.get::<_, i32>(0), 1);

    assert_eq!(cluster.psql("select 1"), "1");
}

#[tokio::test]
async fn created_user_logs_in_with_scram_to_its_database() {
    let cluster = PgCluster::start();
    cluster.create_user("app", "app-pw");
    cluster.create_database("app", "app");
    // Both are idempotent, so Pgwarden::start can call them on a prepared cluster.
    cluster.create_user("app", "app-pw");
    cluster.create_database("app", "app");

    let stored = cluster.psql("select rolpassword from pg_authid where rolname = 'app'");
    assert!(
        stored.starts_with("SCRAM-SHA-256$"),
        "stored password: {stored}"
    );

    let dsn = format!(
        "host={} port={} user=app password=app-pw dbname=app sslmode=disable",
        cluster.host(),
        cluster.port()
    );
    let (client, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
        .await
        .expect("app logs in with SCRAM");
    tokio::spawn(connection);
    let row = client
        .query_one("select current_user::text, current_database()::text", &[])
        .await
        .expect("query as app");
    assert_eq!(row.get::<_, String>(0), "app");
    assert_eq!(row.get::<_, String>(1), "app");

    let wrong = dsn.replace("app-pw", "wrong");
    let err = tokio_postgres::connect(&wrong, tokio_postgres::NoTls)
        .await
        .err()
        .expect("a wrong password is refused");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD)
    );
}

#[test]
fn cluster_is_stopped_and_its_directory_removed_after_drop() {
    let cluster = PgCluster::start();
    let dir = cluster.dir().to_path_buf();
    let pid_file =
        std::fs::read_to_string(dir.join("data/postmaster.pid")).expect("postmaster.pid");
    let pid = pid_file.lines().next().expect("pid line").trim().to_owned();
    assert!(is_running(&pid), "postmaster {pid} is not running");

    drop(cluster);

    assert!(!dir.exists(), "{} still exists", dir.display());
    assert!(!is_running(&pid), "postmaster {pid} still running");
}

/// Whether a process exists and is not a zombie (PID 1 of a container may not reap it).
fn is_running(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            !stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}
