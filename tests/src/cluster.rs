//! A throwaway Postgres cluster in a temp dir on a free port, so each test owns its server.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

use crate::{dsn_value, free_port, log_tail, pg_bindir};

/// Password of the `postgres` superuser in every harness cluster.
const SUPERUSER_PASSWORD: &str = "postgres-pw";
/// initdb and the server refuse to run as root; as root the harness runs them as this OS user.
const SERVER_OS_USER: &str = "postgres";
/// How often `start` tries another port when the one it picked was taken meanwhile.
const START_ATTEMPTS: usize = 5;

/// A private Postgres server: `initdb` in a temp dir, listening on 127.0.0.1 (SCRAM) and on a
/// unix socket in that dir (trust). Stopped and deleted on drop.
pub struct PgCluster {
    dir: TempDir,
    port: u16,
    /// `Some(user)` when the harness runs as root and must start the server as `user`.
    run_as: Option<&'static str>,
}

impl PgCluster {
    /// Creates and starts a new cluster; panics with the reason (and server log) on failure.
    pub fn start() -> PgCluster {
        let dir = tempfile::Builder::new()
            .prefix("pgwarden-pg-")
            .tempdir()
            .expect("create temp dir for the cluster");
        let run_as = running_as_root().then_some(SERVER_OS_USER);
        if let Some(user) = run_as {
            let (uid, gid) = os_user_ids(user);
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .expect("give the cluster temp dir to the postgres OS user");
        }
        let mut cluster = PgCluster {
            dir,
            port: 0,
            run_as,
        };
        cluster.initdb();
        cluster.start_on_free_port();
        cluster
    }

    /// TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// TCP host the server listens on.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// The cluster's temp dir (data dir, unix socket, log), e.g. to check it is cleaned up.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server log, to show in assertions about what the backend saw.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// tokio-postgres connection string for the superuser over TCP with SCRAM.
    pub fn superuser_dsn(&self) -> String {
        format!(
            "host={} port={} user=postgres password={} dbname=postgres sslmode=disable",
            self.host(),
            self.port,
            dsn_value(SUPERUSER_PASSWORD)
        )
    }

    /// A superuser client connected straight to the cluster, bypassing pgwarden.
    pub async fn superuser(&self) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.superuser_dsn(), tokio_postgres::NoTls)
                .await
                .expect("connect to the test cluster as postgres");
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("superuser connection to the test cluster ended: {e}");
            }
        });
        client
    }

    /// Runs `sql` with `psql -XAtq` as superuser over the unix socket; returns stdout without
    /// its trailing newline. Panics with psql's stderr if the statement fails.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_in("postgres", sql)
    }

    /// Like [`PgCluster::psql`], in database `database`.
    pub fn psql_in(&self, database: &str, sql: &str) -> String {
        let out = Command::new(pg_bindir().join("psql"))
            .args([
                "-X",
                "-A",
                "-t",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                "postgres",
            ])
            .args(["-d", database, "-h"])
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-c", sql])
            .output()
            .expect("run psql");
        let stdout = String::from_utf8_lossy(&out.stdout).trim_end().to_owned();
        assert!(
            out.status.success(),
            "psql failed on {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Creates login role `name` with a SCRAM-SHA-256 `password`, or resets an existing one's.
    pub fn create_user(&self, name: &str, password: &str) {
        let (ident, pw) = (quote_ident(name), quote_literal(password));
        self.psql(&format!(
            "SET password_encryption = 'scram-sha-256'; \
             DO $harness$ BEGIN \
               IF EXISTS (SELECT FROM pg_roles WHERE rolname = {name}) THEN \
                 ALTER ROLE {ident} LOGIN PASSWORD {pw}; \
               ELSE CREATE ROLE {ident} LOGIN PASSWORD {pw}; END IF; \
             END $harness$",
            name = quote_literal(name),
        ));
    }

    /// Creates pgbench's tables (scale 1) in database `app` as user `app`, whose password
    /// is `password`, straight on the cluster.
    pub fn init_pgbench(&self, password: &str) {
        let port = self.port.to_string();
        let args = [
            "-i",
            "-q",
            "-s",
            "1",
            "-h",
            self.host(),
            "-p",
            &port,
            "-U",
            "app",
            "app",
        ];
        let init = crate::pgbench(&args, &[("PGPASSWORD", password), ("PGSSLMODE", "disable")]);
        assert!(
            init.status.success(),
            "pgbench -i: {}",
            String::from_utf8_lossy(&init.stderr)
        );
    }

    /// Creates database `name` owned by `owner` unless it already exists.
    pub fn create_database(&self, name: &str, owner: &str) {
        let exists = self.psql(&format!(
            "SELECT 1 FROM pg_database WHERE datname = {}",
            quote_literal(name)
        ));
        if exists.is_empty() {
            self.psql(&format!(
                "CREATE DATABASE {} OWNER {}",
                quote_ident(name),
                quote_ident(owner)
            ));
        }
    }

    /// Turns on TLS with the given certificate and key (PEM) and reloads the server.
    pub fn enable_ssl(&self, cert_pem: &str, key_pem: &str) {
        use std::os::unix::fs::PermissionsExt;
        let cert = self.data_dir().join("server.crt");
        let key = self.data_dir().join("server.key");
        fs::write(&cert, cert_pem).expect("write server.crt");
        fs::write(&key, key_pem).expect("write server.key");
        // Postgres refuses a key readable by others, and must own it.
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod server.key");
        if let Some(user) = self.run_as {
            let (uid, gid) = os_user_ids(user);
            for path in [&cert, &key] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown TLS files");
            }
        }
        self.psql("alter system set ssl = on");
        self.psql("select pg_reload_conf()");
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert_eq!(self.psql("show ssl"), "on", "ssl enabled");
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A command for a server binary, run as the server's OS user when we are root.
    fn server_command(&self, program: &str) -> Command {
        let path = pg_bindir().join(program);
        match self.run_as {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", user, "--"]).arg(path);
                command
            }
            None => Command::new(path),
        }
    }

    fn initdb(&self) {
        let pwfile = self.dir.path().join("superuser-password");
        fs::write(&pwfile, format!("{SUPERUSER_PASSWORD}\n")).expect("write the password file");
        let out = self
            .server_command("initdb")
            .arg("-D")
            .arg(self.data_dir())
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb failed: {}", output_text(&out));

        let hba = "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n";
        fs::write(self.data_dir().join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        let mut conf = String::from("\n# pgwarden test harness\n");
        conf.push_str("listen_addresses = '127.0.0.1'\n");
        let _ = writeln!(
            conf,
            "unix_socket_directories = '{}'",
            self.dir.path().display()
        );
        conf.push_str(
            "max_connections = 300\nfsync = off\nsynchronous_commit = off\n\
             full_page_writes = off\nshared_buffers = 64MB\n",
        );
        self.append_conf(&conf);
    }

    /// Starts the server, trying a new port when the one picked was taken in the meantime.
    fn start_on_free_port(&mut self) {
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            self.port = free_port();
            // The last `port` line in postgresql.conf wins.
            self.append_conf(&format!("port = {}\n", self.port));
            let out = self
                .server_command("pg_ctl")
                .arg("-D")
                .arg(self.data_dir())
                .arg("-l")
                .arg(self.log_path())
                .args(["-w", "start"])
                .output()
                .expect("run pg_ctl start");
            if out.status.success() {
                return;
            }
            failures.push(format!("port {}: {}", self.port, output_text(&out)));
            self.stop();
        }
        panic!(
            "postgres did not start after {START_ATTEMPTS} attempts:\n{}\n--- postgres.log ---\n{}",
            failures.join("\n"),
            log_tail(&self.log_path(), 40)
        );
    }

    fn append_conf(&self, text: &str) {
        use std::io::Write as _;
        let path = self.data_dir().join("postgresql.conf");
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut file| file.write_all(text.as_bytes()))
            .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
    }

    /// Stops the server at once; a failure (e.g. it never started) is ignored.
    fn stop(&self) {
        let _ = self
            .server_command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- postgres.log of the cluster on port {} (last 40 lines) ---\n{}",
                self.port,
                log_tail(&self.log_path(), 40)
            );
        }
    }
}

/// Whether this process's effective uid is 0 (read from /proc; no libc needed).
fn running_as_root() -> bool {
    let status = fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .is_some_and(|euid| euid == "0")
}

/// uid and gid of an OS user, via `id`.
fn os_user_ids(user: &str) -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, user])
            .output()
            .expect("run id");
        assert!(
            out.status.success(),
            "OS user {user:?} is needed to run postgres as root (run scripts/setup): {}",
            output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("id prints a number")
    };
    (id("-u"), id("-g"))
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// SQL identifier quoting, like Postgres' `quote_ident`.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// SQL string literal quoting (standard_conforming_strings is on).
fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}
