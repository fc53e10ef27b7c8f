//! TLS on both sides: clients verify pgwarden's certificate (and reach it only over TLS when
//! it is required), the certificate reloads on SIGHUP, and pgwarden speaks TLS to a
//! Postgres that offers it, verifying its certificate.

use std::process::Command;

use pgwarden_tests::{
    assert_pgbench_clean, pg_bindir, pgbench, PgCluster, Pgwarden, PgwardenOptions,
};

fn tls_options() -> PgwardenOptions {
    PgwardenOptions {
        tls: true,
        ..PgwardenOptions::default()
    }
}

/// libpq connection string for `psql` through pgwarden, with `extra` (sslmode, ...).
fn libpq_dsn(pgwarden: &Pgwarden, extra: &str) -> String {
    format!(
        "host=localhost port={} user=app password=app-pw dbname=app {extra}",
        pgwarden.port()
    )
}

fn psql(dsn: &str, sql: &str) -> std::process::Output {
    Command::new(pg_bindir().join("psql"))
        .args(["-XAtq", dsn, "-c", sql])
        .output()
        .expect("run psql")
}

#[tokio::test]
async fn verify_full_clients_connect_and_plaintext_clients_are_refused_with_28000() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, tls_options()).await;
    let ca = pgwarden.ca_path().display().to_string();
    let out = psql(
        &libpq_dsn(&pgwarden, &format!("sslmode=verify-full sslrootcert={ca}")),
        "select 40 + 2",
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        pgwarden.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");

    let Err(err) = pgwarden.try_connect("app", "app-pw", "app").await else {
        panic!("a plaintext client must be refused");
    };
    let db = err
        .as_db_error()
        .expect("an ErrorResponse, not a dropped connection");
    assert_eq!(
        db.code(),
        &tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION
    );
    assert!(db.message().contains("requires TLS"), "{}", db.message());
}

#[tokio::test]
async fn pgbench_over_tls_with_and_without_reconnects_has_no_failures() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, tls_options()).await;
    let port = pgwarden.port().to_string();
    let env = [("PGPASSWORD", "app-pw"), ("PGSSLMODE", "require")];
    let conn = ["-h", "localhost", "-p", &port, "-U", "app"];
    let init = pgbench(&[&conn[..], &["-i", "-s", "1", "app"]].concat(), &env);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    for extra in [
        &["-c", "20", "-j", "2", "-T", "5"][..],
        &["-C", "-S", "-c", "5", "-j", "1", "-T", "5"][..],
    ] {
        let run = pgbench(&[&conn[..], extra, &["app"]].concat(), &env);
        assert_pgbench_clean(&run);
    }
}

#[tokio::test]
async fn the_certificate_is_reloaded_on_sighup() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, tls_options()).await;
    let dir = pgwarden.ca_path().parent().expect("dir").to_path_buf();
    let renewed = pgwarden::tls::generate_certificates(&["localhost"]).expect("generate");
    std::fs::write(dir.join("server.crt"), renewed.cert_pem).expect("write");
    std::fs::write(dir.join("server.key"), renewed.key_pem).expect("write");
    let new_ca = dir.join("new-ca.crt");
    std::fs::write(&new_ca, renewed.ca_pem).expect("write");
    let with_new_ca = libpq_dsn(
        &pgwarden,
        &format!("sslmode=verify-full sslrootcert={}", new_ca.display()),
    );
    assert!(
        !psql(&with_new_ca, "select 1").status.success(),
        "old certificate still served before SIGHUP"
    );
    Command::new("kill")
        .args(["-HUP", &pgwarden.pid().to_string()])
        .status()
        .expect("kill -HUP");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if psql(&with_new_ca, "select 1").status.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "certificate not reloaded:\n{}",
            pgwarden.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_backend_connection_uses_verified_tls_when_the_target_asks() {
    let cluster = PgCluster::start();
    let certs = pgwarden::tls::generate_certificates(&["127.0.0.1"]).expect("generate");
    cluster.enable_ssl(&certs.cert_pem, &certs.key_pem);
    let ca = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(ca.path(), &certs.ca_pem).expect("write CA");
    let pgwarden = Pgwarden::start(
        &cluster,
        PgwardenOptions {
            extra_target_toml: format!(
                "tls = \"verify-full\"\nca_path = {:?}",
                ca.path().display().to_string()
            ),
            ..PgwardenOptions::default()
        },
    )
    .await;
    let client = pgwarden.connect("app", "app-pw", "app").await;
    let row = client
        .query_one(
            "select ssl::text from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("query");
    assert_eq!(
        row.get::<_, String>(0),
        "true",
        "pgwarden's backend connection is encrypted"
    );
}

#[tokio::test]
async fn a_target_requiring_tls_refuses_a_database_without_it() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(
        &cluster,
        PgwardenOptions {
            extra_target_toml: "tls = \"require\"".into(),
            ..PgwardenOptions::default()
        },
    )
    .await;
    let Err(err) = pgwarden.try_connect("app", "app-pw", "app").await else {
        panic!("the database does not offer TLS");
    };
    let message = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(message.contains("does not accept TLS"), "{err:?}");
}
