//! End-to-end test harness for pgwarden.
//!
//! Owns the throwaway infrastructure every end-to-end test needs: a private Postgres cluster
//! (`initdb` + `pg_ctl` in a temp dir on a free port), the `pgwarden` binary started with a
//! generated config, and helpers for real clients (tokio-postgres, psql, pgbench).
//! It knows pgwarden only from the outside — its binary, config format and admin HTTP port —
//! so the tests prove what an operator would see, not how the proxy is built.

mod aws;
mod cluster;
mod http;
mod pgwarden;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use self::pgwarden::workspace_root;
pub use aws::{python, AwsEmulator, Identities, ISOLATED_AWS_ENV};
pub use cluster::PgCluster;
pub use pgwarden::{binary_path as pgwarden_binary, Pgwarden, PgwardenOptions};

/// Debian's Postgres 15 server binaries, used when nothing better is known.
const DEFAULT_PG_BINDIR: &str = "/usr/lib/postgresql/15/bin";

/// Directory holding `initdb`, `pg_ctl`, `psql` and `pgbench`, so tests never depend on PATH.
///
/// `$PG_BINDIR` if set, else `pg_config --bindir` if that directory has `initdb`, else
/// Debian's `/usr/lib/postgresql/15/bin`.
pub fn pg_bindir() -> PathBuf {
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR
        .get_or_init(|| {
            if let Some(dir) = std::env::var_os("PG_BINDIR") {
                return PathBuf::from(dir);
            }
            let from_pg_config = Command::new("pg_config")
                .arg("--bindir")
                .output()
                .ok()
                .filter(|out| out.status.success())
                .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
            match from_pg_config {
                Some(dir) if dir.join("initdb").is_file() => dir,
                _ => PathBuf::from(DEFAULT_PG_BINDIR),
            }
        })
        .clone()
}

/// A TCP port on 127.0.0.1 that was free a moment ago, for servers the harness starts.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind 127.0.0.1:0 to find a free port")
        .port()
}

/// Runs `<bindir>/pgbench` with `args` and extra environment (e.g. `PGPASSWORD`), for load
/// tests through the proxy with the stock Postgres benchmark client.
pub fn pgbench(args: &[&str], env: &[(&str, &str)]) -> Output {
    let program = pg_bindir().join("pgbench");
    Command::new(&program)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()))
}

/// Quotes a value for a libpq / tokio-postgres `key=value` connection string.
fn dsn_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The last `lines` lines of a log file, printed when a test fails so its cause is visible.
fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Body of `GET http://127.0.0.1:{port}{path}`; panics unless the answer is 200.
pub async fn http_get(port: u16, path: &str) -> String {
    match http::get(port, path).await {
        Ok((200, body)) => body,
        other => panic!("GET {path} on port {port} failed: {other:?}"),
    }
}

/// Status and body of `GET http://127.0.0.1:{port}{path}`, whatever the status.
pub async fn http_status(port: u16, path: &str) -> (u16, String) {
    http::get(port, path)
        .await
        .unwrap_or_else(|e| panic!("GET {path} on port {port} failed: {e}"))
}

/// Sum of every sample of metric `name` (any labels) in a Prometheus text exposition, or
/// `None` when the metric has no sample at all (e.g. a counter vector never incremented).
pub fn metric_sum(metrics: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in metrics.lines().filter(|line| !line.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // `name` must be the whole metric name, not a prefix of a longer one.
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let value = rest
            .rsplit(' ')
            .next()
            .and_then(|value| value.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("unparsable metric sample: {line:?}"));
        *sum.get_or_insert(0.0) += value;
    }
    sum
}

/// Asserts that a pgbench run exited successfully and reported no failed transaction;
/// returns its standard output for further checks.
pub fn assert_pgbench_clean(run: &Output) -> String {
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("number of failed transactions: 0 "),
        "{stdout}"
    );
    stdout
}

/// Asserts that pgwarden's shutdown closed `client`: its next query fails with 57P01
/// (pgwarden told it) or finds the connection already closed.
pub async fn assert_closed_by_shutdown(client: &tokio_postgres::Client) {
    let err = client
        .simple_query("select 1")
        .await
        .expect_err("the client was closed by the shutdown");
    let told = err.code() == Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN);
    assert!(told || err.is_closed(), "{err:?}");
}
