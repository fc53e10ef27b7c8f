//! `pgwarden demo`: a throwaway local Postgres cluster with pgwarden in front of it, for
//! trying pgwarden with no AWS account and no database of one's own. Everything lives in a
//! temporary directory that is removed at exit.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use rand::distributions::{Alphanumeric, DistString};

use crate::config::Config;
use crate::server::{termination_signal, Server};

/// The database user and database the demo creates.
const DEMO_USER: &str = "demo";
/// A second database, served to IAM-token logins.
const DEMO_IAM_DATABASE: &str = "demo_iam";
const DEMO_IAM_SECRET_ENV: &str = "PGWARDEN_DEMO_IAM_SECRET";
const DEMO_IAM_PRINCIPAL: &str = "arn:aws:iam::000000000000:user/demo";

/// Runs the demo until SIGINT/SIGTERM.
pub async fn run(listen: SocketAddr, admin_listen: SocketAddr) -> anyhow::Result<()> {
    let cluster = Cluster::start().context("starting the demo Postgres cluster")?;
    let password = Alphanumeric.sample_string(&mut rand::thread_rng(), 24);
    // SQL goes through standard input so the password never shows in a process listing.
    cluster.psql(&format!(
        "CREATE ROLE {DEMO_USER} LOGIN PASSWORD '{password}';"
    ))?;
    cluster.psql(&format!("CREATE DATABASE {DEMO_USER} OWNER {DEMO_USER};"))?;
    cluster.psql(&format!(
        "CREATE DATABASE {DEMO_IAM_DATABASE} OWNER {DEMO_USER};"
    ))?;
    // A throwaway IAM key for trying `rds-token` logins; pgwarden reads secrets from the
    // environment, so the demo puts it there before anything else runs.
    let iam_key_id = format!(
        "AKIADEMO{}",
        Alphanumeric
            .sample_string(&mut rand::thread_rng(), 12)
            .to_uppercase()
    );
    let iam_secret = Alphanumeric.sample_string(&mut rand::thread_rng(), 40);
    std::env::set_var(DEMO_IAM_SECRET_ENV, &iam_secret);
    // TLS as in production: an ECDSA P-256 certificate for localhost, made for this run.
    let certs = crate::tls::generate_certificates(&["localhost", "127.0.0.1"])?;
    let cert_path = cluster.dir.path().join("pgwarden.crt");
    let key_path = cluster.dir.path().join("pgwarden.key");
    std::fs::write(&cert_path, &certs.cert_pem)?;
    write_private(&key_path, &certs.key_pem)?;
    std::fs::write(cluster.dir.path().join("ca.crt"), &certs.ca_pem)?;
    let users = cluster.dir.path().join("users.toml");
    write_private(
        &users,
        &format!("[[users]]\nname = \"{DEMO_USER}\"\npassword = \"{password}\"\n"),
    )?;
    let config = Config::from_toml(&format!(
        r#"
[server]
listen = "{listen}"
admin_listen = "{admin_listen}"
require_tls = true
admin_users = ["{DEMO_USER}"]

[server.tls]
cert_path = {cert_path:?}
key_path = {key_path:?}

[[targets]]
name = "demo"
host = "127.0.0.1"
port = {port}
databases = ["{DEMO_USER}"]
pool_size = 10
credentials = {{ provider = "file", path = {users:?} }}

[[targets]]
name = "demo-iam"
host = "127.0.0.1"
port = {port}
databases = ["{DEMO_IAM_DATABASE}"]
pool_size = 5
client_auth = "iam"
credentials = {{ provider = "file", path = {users:?} }}

[iam]
verifier = "rds-token"
advertised_hosts = ["localhost:{listen_port}", "{listen_ip}:{listen_port}"]

[[iam.keys]]
access_key_id = "{iam_key_id}"
secret_access_key_env = "{DEMO_IAM_SECRET_ENV}"
principal = "{DEMO_IAM_PRINCIPAL}"

[[iam.rules]]
principal = "{DEMO_IAM_PRINCIPAL}"
database_users = ["{DEMO_USER}"]
"#,
        port = cluster.port,
        listen_port = listen.port(),
        listen_ip = listen.ip(),
    ))?;
    let server = Server::bind(config).await?;
    tracing::info!(dir = %cluster.dir.path().display(), port = cluster.port, "demo Postgres cluster started");
    println!(
        "postgresql://{DEMO_USER}:{password}@{}:{}/{DEMO_USER}?sslmode=require",
        server.listen.ip(),
        server.listen.port()
    );
    println!("http://{}/metrics", server.admin);
    println!(
        "AWS_ACCESS_KEY_ID={iam_key_id} AWS_SECRET_ACCESS_KEY={iam_secret} AWS_REGION=us-east-1"
    );
    let shutdown = server.app.shutdown.clone();
    tokio::spawn(async move {
        termination_signal().await;
        shutdown.cancel();
    });
    server.run().await;
    drop(cluster);
    Ok(())
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// The Postgres server binaries: `$PG_BINDIR`, `pg_config --bindir`, or Debian's path.
pub fn pg_bindir() -> anyhow::Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("PG_BINDIR") {
        candidates.push(PathBuf::from(dir));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        candidates.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    candidates.push(PathBuf::from("/usr/lib/postgresql/15/bin"));
    candidates
        .into_iter()
        .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
        .context("PostgreSQL server binaries not found (set PG_BINDIR, or run scripts/setup)")
}

/// A throwaway cluster; stopped and deleted on drop.
struct Cluster {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    port: u16,
    /// Postgres refuses to run as root: then it runs as the `postgres` OS user.
    run_as: Option<&'static str>,
}

impl Cluster {
    fn start() -> anyhow::Result<Self> {
        let bindir = pg_bindir()?;
        let dir = tempfile::Builder::new()
            .prefix("pgwarden-demo-")
            .tempdir()?;
        let run_as = is_root().then_some("postgres");
        if let Some(user) = run_as {
            run_command(Command::new("chown").arg(user).arg(dir.path()), None)?;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut cluster = Self {
            dir,
            bindir,
            port,
            run_as,
        };
        let data = cluster.data_dir();
        cluster.pg(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ],
        )?;
        let sock = cluster.dir.path().display().to_string();
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{sock}'\nmax_connections = 100\n"
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(Path::new(&data).join("postgresql.conf"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, conf.as_bytes()))?;
        let log = cluster
            .dir
            .path()
            .join("postgres.log")
            .display()
            .to_string();
        cluster.pg("pg_ctl", &["-D", &data, "-l", &log, "-w", "start"])?;
        cluster.port = port;
        Ok(cluster)
    }

    fn data_dir(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn pg(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        self.pg_with_input(program, args, None)
    }

    fn pg_with_input(
        &self,
        program: &str,
        args: &[&str],
        input: Option<&str>,
    ) -> anyhow::Result<String> {
        let bin = self.bindir.join(program);
        let mut cmd = match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.args(args);
        run_command(&mut cmd, input)
    }

    fn psql(&self, sql: &str) -> anyhow::Result<String> {
        let host = self.dir.path().display().to_string();
        let port = self.port.to_string();
        self.pg_with_input(
            "psql",
            &[
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                &host,
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                "postgres",
            ],
            Some(sql),
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.data_dir();
        let _ = self.pg("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"]);
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Runs a command to completion; errors name the program and its stderr, never its
/// arguments or input (which may hold a password).
fn run_command(cmd: &mut Command, input: Option<&str>) -> anyhow::Result<String> {
    use std::io::Write;
    use std::process::Stdio;
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("running {program}"))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
