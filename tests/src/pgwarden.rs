//! pgwarden run as its real binary against a [`PgCluster`], so tests see what an operator sees
//! (and can measure its memory).

use std::fs::{self, File, OpenOptions};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use tempfile::TempDir;

use crate::{dsn_value, http, log_tail, PgCluster};

/// How long pgwarden may take to answer `/healthz` and accept on its listen port.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long pgwarden may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often `start` tries new ports when pgwarden exits early (e.g. a port was taken).
const START_ATTEMPTS: usize = 3;

/// The knobs tests vary; everything else in the generated config is fixed.
#[derive(Clone, Debug)]
pub struct PgwardenOptions {
    /// `"transaction"` or `"session"`.
    pub pool_mode: &'static str,
    /// Backend connections per pool.
    pub pool_size: u32,
    /// Backend connections of the whole target.
    pub max_backend_connections: u32,
    /// How long a client waits for a backend connection, e.g. `"30s"`.
    pub borrow_timeout: &'static str,
    /// `(name, password)` of the database users pgwarden serves (its credentials file).
    /// `Pgwarden::start` creates each as a login role with a database of the same name.
    pub users: Vec<(String, String)>,
    /// Raw TOML lines appended to the `[[targets]]` table.
    pub extra_target_toml: String,
    /// Raw TOML lines appended to the `[server]` table.
    pub extra_server_toml: String,
    /// Serve TLS with a generated certificate (for `localhost` and `127.0.0.1`) and require
    /// it; its CA is at [`Pgwarden::ca_path`]. Without it, plaintext is allowed.
    pub tls: bool,
    /// Raw TOML appended after the targets (e.g. an `[iam]` section); `__PORT__` in it
    /// becomes pgwarden's listen port.
    pub extra_toml: String,
    /// The target's `credentials` inline table, instead of the generated users file.
    pub credentials_toml: Option<String>,
    /// Extra environment for the pgwarden process (e.g. AWS credentials).
    pub env: Vec<(String, String)>,
}

impl Default for PgwardenOptions {
    fn default() -> Self {
        PgwardenOptions {
            pool_mode: "transaction",
            pool_size: 10,
            max_backend_connections: 50,
            borrow_timeout: "30s",
            users: vec![("app".to_owned(), "app-pw".to_owned())],
            extra_target_toml: String::new(),
            extra_server_toml: String::new(),
            tls: false,
            extra_toml: String::new(),
            credentials_toml: None,
            env: Vec::new(),
        }
    }
}

/// A running `pgwarden run` process with its own temp dir (config, credentials, log).
/// Sent SIGTERM on drop.
pub struct Pgwarden {
    dir: TempDir,
    child: Child,
    port: u16,
    admin_port: u16,
    /// Passwords and tokens the log must never contain (checked on drop).
    secrets: std::sync::Mutex<Vec<String>>,
}

/// The credentials file pgwarden's `file` provider reads.
#[derive(Serialize)]
struct CredentialsFile<'a> {
    users: Vec<UserEntry<'a>>,
}

#[derive(Serialize)]
struct UserEntry<'a> {
    name: &'a str,
    password: &'a str,
}

impl Pgwarden {
    /// Prepares `cluster` (a login role and an own database for every user in `options`),
    /// starts pgwarden in front of it and waits until it is ready; panics with its log if not.
    pub async fn start(cluster: &PgCluster, options: PgwardenOptions) -> Pgwarden {
        for (name, password) in &options.users {
            cluster.create_user(name, password);
            cluster.create_database(name, name);
        }
        let binary = binary_path();
        let dir = tempfile::Builder::new()
            .prefix("pgwarden-proxy-")
            .tempdir()
            .expect("create temp dir for pgwarden");
        let credentials = dir.path().join("users.toml");
        let users = options
            .users
            .iter()
            .map(|(name, password)| UserEntry { name, password })
            .collect();
        let credentials_toml =
            toml::to_string(&CredentialsFile { users }).expect("serialize credentials file");
        fs::write(&credentials, credentials_toml).expect("write credentials file");
        if options.tls {
            let generated = pgwarden::tls::generate_certificates(&["localhost", "127.0.0.1"])
                .expect("generate test certificates");
            fs::write(dir.path().join("server.crt"), generated.cert_pem).expect("write cert");
            fs::write(dir.path().join("server.key"), generated.key_pem).expect("write key");
            fs::write(dir.path().join("ca.crt"), generated.ca_pem).expect("write CA");
        }

        let config = dir.path().join("pgwarden.toml");
        let log = dir.path().join("pgwarden.log");
        let launch = |port: u16, admin_port: u16| {
            let toml = config_toml(cluster, &options, port, admin_port, &credentials);
            fs::write(&config, toml).expect("write pgwarden config");
            spawn(&binary, &config, &log, &options.env)
        };

        let (port, admin_port) = two_free_ports();
        let mut proxy = Pgwarden {
            child: launch(port, admin_port),
            dir,
            port,
            admin_port,
            secrets: std::sync::Mutex::new(
                options
                    .users
                    .iter()
                    .map(|(_, password)| password.clone())
                    .collect(),
            ),
        };
        let mut exits = Vec::new();
        loop {
            match proxy.wait_ready().await {
                Ok(()) => return proxy,
                Err(status) => exits.push(format!(
                    "ports {}/{}: {status}",
                    proxy.port, proxy.admin_port
                )),
            }
            // Drop prints the log when this fails.
            assert!(
                exits.len() < START_ATTEMPTS,
                "pgwarden exited during startup {START_ATTEMPTS} times ({})",
                exits.join("; ")
            );
            (proxy.port, proxy.admin_port) = two_free_ports();
            proxy.child = launch(proxy.port, proxy.admin_port);
        }
    }

    /// The CA that signed pgwarden's certificate (when started with `tls: true`).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// Port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Port of the admin HTTP server (`/healthz`, `/metrics`).
    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    /// OS process id, e.g. to read its CPU time or send it signals.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// tokio-postgres connection string for a client of pgwarden (plaintext).
    pub fn dsn(&self, user: &str, password: &str, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={} password={} dbname={} sslmode=disable",
            self.port,
            dsn_value(user),
            dsn_value(password),
            dsn_value(database)
        )
    }

    /// Connects a client through pgwarden, or returns the error it got (for failure tests).
    pub async fn try_connect(
        &self,
        user: &str,
        password: &str,
        database: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let dsn = self.dsn(user, password, database);
        let (client, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("client connection through pgwarden ended: {e}");
            }
        });
        Ok(client)
    }

    /// Connects a client through pgwarden; panics if it cannot.
    pub async fn connect(
        &self,
        user: &str,
        password: &str,
        database: &str,
    ) -> tokio_postgres::Client {
        self.try_connect(user, password, database)
            .await
            .unwrap_or_else(|e| panic!("connect through pgwarden as {user} to {database}: {e}"))
    }

    /// Body of `GET /metrics` (Prometheus text format).
    pub async fn metrics(&self) -> String {
        match http::get(self.admin_port, "/metrics").await {
            Ok((200, body)) => body,
            other => panic!("GET /metrics failed: {other:?}"),
        }
    }

    /// Resident memory of the pgwarden process in KiB (VmRSS from /proc/PID/status).
    pub fn rss_kib(&self) -> u64 {
        let path = format!("/proc/{}/status", self.pid());
        let status = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in {path}"))
    }

    /// Everything pgwarden logged so far (stdout and stderr).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("pgwarden.log")
    }

    /// Waits until `/healthz` answers 200 and the listen port accepts; `Err` if pgwarden exited.
    async fn wait_ready(&mut self) -> Result<(), ExitStatus> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll pgwarden process") {
                return Err(status);
            }
            let healthy = matches!(http::get(self.admin_port, "/healthz").await, Ok((200, _)));
            if healthy
                && tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "pgwarden not ready after {READY_TIMEOUT:?} (healthz on {}, listen on {})",
                self.admin_port,
                self.port,
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM, as an orchestrator stopping the process would.
    pub fn send_sigterm(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Runs pgbench as user `app` (password `app-pw`) on database `app` through pgwarden,
    /// off the async runtime so the test can watch the server meanwhile.
    pub async fn pgbench(&self, args: &[&str]) -> std::process::Output {
        let port = self.port().to_string();
        let mut all: Vec<String> = ["-h", "127.0.0.1", "-p", &port, "-U", "app"]
            .iter()
            .chain(args)
            .map(|s| (*s).to_owned())
            .collect();
        all.push("app".to_owned());
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = all.iter().map(String::as_str).collect();
            crate::pgbench(&args, &[("PGPASSWORD", "app-pw"), ("PGSSLMODE", "disable")])
        })
        .await
        .expect("pgbench task")
    }

    /// Adds a password or token to those the log must never contain.
    pub fn forbid_in_log(&self, secret: &str) {
        self.secrets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(secret.to_owned());
    }

    /// Every log line is one JSON object (pgwarden runs with `PGWARDEN_LOG_FORMAT=json`
    /// here) and none contains a password or token of the test.
    pub fn assert_log_clean(&self) {
        let log = self.log();
        let secrets = self.secrets.lock().unwrap_or_else(|p| p.into_inner());
        for line in log.lines().filter(|line| !line.trim().is_empty()) {
            if let Err(e) = serde_json::from_str::<serde_json::Value>(line) {
                panic!("a log line is not JSON ({e}): {line}");
            }
            if let Some(secret) = secrets.iter().find(|s| line.contains(s.as_str())) {
                panic!(
                    "a secret ({} characters) appears in the log: {line}",
                    secret.len()
                );
            }
        }
    }

    /// Sends SIGHUP (reload the configuration file).
    pub fn send_sighup(&self) {
        let _ = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status();
    }

    /// Sends SIGHUP and waits for the reload's outcome in the log: true if the file was
    /// applied, false if it was refused. Panics with the log after 10 s without either.
    pub async fn reload(&self) -> bool {
        const APPLIED: &str = "configuration reloaded";
        const REFUSED: &str = "configuration reload refused";
        let count = |log: &str| (log.matches(APPLIED).count(), log.matches(REFUSED).count());
        let before = count(&self.log());
        self.send_sighup();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            let now = count(&log);
            if now.0 > before.0 {
                return true;
            }
            if now.1 > before.1 {
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "no reload outcome logged:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The configuration file pgwarden was started with (and reloads).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("pgwarden.toml")
    }

    /// Rewrites the configuration file with `edit` (which must change it); a reload reads it.
    pub fn edit_config(&self, edit: impl FnOnce(&str) -> String) {
        let path = self.config_path();
        let old = fs::read_to_string(&path).expect("read pgwarden.toml");
        let new = edit(&old);
        assert_ne!(old, new, "the edit changed nothing");
        fs::write(&path, new).expect("write pgwarden.toml");
    }

    /// The exit status, once pgwarden has exited within `within`; `None` if still running.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then SIGKILL if pgwarden has not exited within `STOP_TIMEOUT`.
    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("pgwarden did not exit {STOP_TIMEOUT:?} after SIGTERM; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Pgwarden {
    fn drop(&mut self) {
        self.stop();
        if !std::thread::panicking() {
            self.assert_log_clean();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- pgwarden.log (last 60 lines) ---\n{}",
                log_tail(&self.log_path(), 60)
            );
        }
    }
}

/// `$PGWARDEN_BIN`, else `target/debug/pgwarden` of this workspace (or of `$CARGO_TARGET_DIR`).
pub fn binary_path() -> PathBuf {
    let path = match std::env::var_os("PGWARDEN_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .filter(|dir| dir.is_absolute())
                .unwrap_or_else(|| workspace_root().join("target"));
            target.join("debug").join("pgwarden")
        }
    };
    assert!(
        path.is_file(),
        "no pgwarden binary at {}: build it first: cargo build --bins",
        path.display()
    );
    path
}

pub(crate) fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_path_buf()
}

fn credentials_dir(credentials: &Path) -> PathBuf {
    credentials
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn config_toml(
    cluster: &PgCluster,
    options: &PgwardenOptions,
    port: u16,
    admin_port: u16,
    credentials: &Path,
) -> String {
    let credentials_path = credentials;
    let credentials = toml_str(&credentials.display().to_string());
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
max_client_connections = 10000
require_tls = {tls}
{extra_server}
{tls_table}

[[targets]]
name = "main"
host = "{host}"
port = {pg_port}
databases = ["*"]
pool_mode = {pool_mode}
pool_size = {pool_size}
max_backend_connections = {max_backend}
borrow_timeout = {borrow_timeout}
credentials = {credentials_table}
{extra_target}

{extra_toml}
"#,
        extra_server = options.extra_server_toml,
        extra_toml = options.extra_toml.replace("__PORT__", &port.to_string()),
        credentials_table = options
            .credentials_toml
            .clone()
            .unwrap_or_else(|| format!("{{ provider = \"file\", path = {credentials} }}")),
        tls = options.tls,
        tls_table = if options.tls {
            let dir = credentials_dir(credentials_path);
            format!(
                "[server.tls]\ncert_path = {}\nkey_path = {}\n",
                toml_str(&dir.join("server.crt").display().to_string()),
                toml_str(&dir.join("server.key").display().to_string())
            )
        } else {
            String::new()
        },
        host = cluster.host(),
        pg_port = cluster.port(),
        pool_mode = toml_str(options.pool_mode),
        pool_size = options.pool_size,
        max_backend = options.max_backend_connections,
        borrow_timeout = toml_str(options.borrow_timeout),
        extra_target = options.extra_target_toml,
    )
}

/// Two distinct ports that were free a moment ago (both held at once so they differ).
fn two_free_ports() -> (u16, u16) {
    let bind = || TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    let (a, b) = (bind(), bind());
    let port = |l: &TcpListener| l.local_addr().expect("local addr of a bound socket").port();
    (port(&a), port(&b))
}

/// A TOML string literal with escaping.
fn toml_str(value: &str) -> String {
    toml::Value::String(value.to_owned()).to_string()
}

fn spawn(binary: &Path, config: &Path, log: &Path, env: &[(String, String)]) -> Child {
    let stdout: File = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open pgwarden.log");
    let stderr = stdout.try_clone().expect("clone pgwarden.log handle");
    let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    Command::new(binary)
        .arg("run")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", rust_log)
        .env("PGWARDEN_LOG_FORMAT", "json")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()))
}

impl Pgwarden {
    /// Asserts that logging in is refused with SQLSTATE `code` and a message containing
    /// `words`; `case` names the attempt in failure messages.
    pub async fn assert_login_refused(
        &self,
        case: &str,
        user: &str,
        password: &str,
        code: &tokio_postgres::error::SqlState,
        words: &str,
    ) {
        let Err(err) = self.try_connect(user, password, user).await else {
            panic!("{case}: accepted");
        };
        let db = err
            .as_db_error()
            .unwrap_or_else(|| panic!("{case}: no ErrorResponse: {err:?}"));
        assert_eq!(db.code(), code, "{case}: {}", db.message());
        assert!(db.message().contains(words), "{case}: {}", db.message());
    }
}
