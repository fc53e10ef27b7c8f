//! The container image, built from the locally built release binary and run with podman as
//! an operator would run it: as a non-root user, on a read-only root filesystem, with the
//! config mounted read-only, against the test Postgres. It serves clients and answers
//! `/readyz`; on `podman stop` it lets the open transaction finish, closes idle clients and
//! exits 0 long before podman's stop timeout would kill it.
//!
//! The image is `docker/Containerfile.test`: `FROM scratch` plus the binary, the shared
//! libraries `ldd` lists and a passwd entry, so nothing is pulled. Podman runs it with
//! `--runtime runc`, host networking (the test Postgres listens on 127.0.0.1 only) and a
//! `containers.conf` of the test's own holding `default_ulimits = []`: some sandboxes refuse
//! the open-files limit podman sets by default ("error setting rlimit type 7: operation not
//! permitted").
//!
//! The binary is `$PGWARDEN_RELEASE_BIN` when set. Otherwise the test runs `cargo build
//! --release -p pgwarden` itself, so it never tests a stale binary; that is a quick no-op
//! when `scripts/test` built it already (`cargo test` holds no build lock while tests run).
//! Without `podman` on PATH the test is skipped, unless `$PGWARDEN_REQUIRE_CONTAINER_TEST`
//! is set (`scripts/test` sets it), which turns a missing podman into a failure.
//!
//! By hand, with ROOT filled as `prepare_image_root` does and CONFIG holding pgwarden.toml
//! and users.toml (readable by uid 10001):
//!
//! ```sh
//! printf '[containers]\ndefault_ulimits = []\n' > containers.conf
//! export CONTAINERS_CONF=$PWD/containers.conf
//! podman build -f docker/Containerfile.test -t pgwarden-test ROOT
//! podman run -d --name pgwarden-test --runtime runc --network host --read-only \
//!   --cap-drop all --security-opt no-new-privileges -v CONFIG:/etc/pgwarden:ro pgwarden-test
//! podman stop --time 20 pgwarden-test
//! ```

use std::fs;
use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use pgwarden_tests::{assert_closed_by_shutdown, free_port, http_status, PgCluster};

/// uid and gid of the image's user (`USER` in `docker/Containerfile.test`).
const IMAGE_UID: u32 = 10001;
/// `podman stop --time`: seconds before podman gives up on SIGTERM and sends SIGKILL.
const STOP_TIME_SECS: u64 = 20;
/// How soon after `podman stop` the container must have exited: the drain waits only for
/// the one open transaction, which the test commits at once.
const DRAINED_WITHIN: Duration = Duration::from_secs(10);
/// How long pgwarden in the container may take to answer `/readyz` with 200.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often to start the container on new ports when it exits at startup (a port taken).
const START_ATTEMPTS: usize = 3;

#[tokio::test]
async fn container_serves_as_non_root_on_a_read_only_root_and_drains_on_podman_stop() {
    if !podman_installed() {
        assert!(
            std::env::var_os("PGWARDEN_REQUIRE_CONTAINER_TEST").is_none(),
            "podman is not on PATH but PGWARDEN_REQUIRE_CONTAINER_TEST is set: run scripts/setup"
        );
        eprintln!(
            "SKIPPED: podman is not on PATH, so the container image is not tested \
             (set PGWARDEN_REQUIRE_CONTAINER_TEST=1 to make this a failure)"
        );
        return;
    }
    let cluster = PgCluster::start();
    cluster.create_user("app", "app-pw");
    cluster.create_database("app", "app");

    let work = tempfile::Builder::new()
        .prefix("pgwarden-container-")
        .tempdir()
        .expect("create temp dir for the container test");
    let podman = Podman::new(work.path());
    let unique = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos()
    );
    let guard = Cleanup {
        podman: &podman,
        image: format!("localhost/pgwarden-container-test:{unique}"),
        container: format!("pgwarden-container-test-{unique}"),
    };

    let root = work.path().join("root");
    prepare_image_root(&root, &release_binary());
    let built = Instant::now();
    podman.ok(&[
        "build",
        "--quiet",
        "--file",
        &workspace_root()
            .join("docker/Containerfile.test")
            .display()
            .to_string(),
        "--tag",
        &guard.image,
        &root.display().to_string(),
    ]);
    eprintln!("image built in {:?}", built.elapsed());

    let config_dir = work.path().join("config");
    let (port, admin_port) = start_container(&guard, &cluster, &config_dir).await;

    // Serves a client, through to the test Postgres.
    let dsn =
        format!("host=127.0.0.1 port={port} user=app password=app-pw dbname=app sslmode=disable");
    let client = connect(&dsn).await;
    let rows = client
        .simple_query("select current_user, inet_server_port()")
        .await
        .expect("query through the container");
    let row = rows
        .iter()
        .find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .expect("a row");
    assert_eq!(row.get(0), Some("app"));
    assert_eq!(
        row.get(1),
        Some(cluster.port().to_string().as_str()),
        "the query ran on the test Postgres"
    );

    // The image's health check command works inside it (no shell, read-only root).
    let health = podman.ok(&[
        "exec",
        &guard.container,
        "/usr/local/bin/pgwarden",
        "healthcheck",
        "--address",
        &format!("127.0.0.1:{admin_port}"),
    ]);
    assert_eq!(health, "ready", "pgwarden healthcheck inside the container");

    // The process is pgwarden itself (PID 1 of the container, no init wrapper), as uid and
    // gid 10001 without capabilities, and its root filesystem is mounted read-only.
    let pid = podman.inspect(&guard.container, "{{.State.Pid}}");
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let comm = fs::read_to_string(proc_dir.join("comm")).expect("read comm of the container");
    assert_eq!(comm.trim(), "pgwarden", "PID 1 of the container");
    let status = fs::read_to_string(proc_dir.join("status")).expect("read the process status");
    for (field, map) in [("Uid:", "uid_map"), ("Gid:", "gid_map")] {
        let ids = status_field(&status, field);
        let map = fs::read_to_string(proc_dir.join(map)).expect("read the id map");
        for id in ids.split_whitespace() {
            let host_id: u32 = id.parse().expect("numeric id");
            assert_eq!(
                container_id(&map, host_id),
                IMAGE_UID,
                "real, effective, saved and fs {field} {ids} (host ids; map {map:?})"
            );
        }
    }
    assert_eq!(
        u64::from_str_radix(status_field(&status, "CapEff:"), 16),
        Ok(0),
        "no effective capability"
    );
    let mountinfo = fs::read_to_string(proc_dir.join("mountinfo")).expect("read mountinfo");
    assert!(
        mount_options(&mountinfo, "/").contains(&"ro"),
        "root filesystem read-only:\n{mountinfo}"
    );
    assert!(
        mount_options(&mountinfo, "/etc/pgwarden").contains(&"ro"),
        "config mounted read-only:\n{mountinfo}"
    );
    assert_eq!(
        podman.inspect(
            &guard.container,
            "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}}"
        ),
        format!("{IMAGE_UID}:{IMAGE_UID} true")
    );

    // podman stop while a transaction is open: pgwarden (PID 1) gets SIGTERM and drains.
    client
        .batch_execute("create table drained (n int); begin; insert into drained values (1)")
        .await
        .expect("open a transaction");
    let idle = connect(&dsn).await;
    idle.simple_query("select 1").await.expect("query");
    let stop_started = Instant::now();
    let mut stop = podman.spawn(&[
        "stop",
        "--time",
        &STOP_TIME_SECS.to_string(),
        &guard.container,
    ]);
    // Readiness is withdrawn at SIGTERM: /readyz answers 503 (docs/configuration.md), or
    // the admin endpoint is gone (what pgwarden does now: it stops with the listener).
    let readiness = wait_until_not_ready(admin_port).await;
    assert!(
        readiness
            .as_ref()
            .is_none_or(|answer| *answer == (503, "not ready: shutting down\n".to_owned())),
        "/readyz during the drain: {readiness:?}"
    );
    // (podman itself says "stopping" by now, so ask the kernel.)
    assert_eq!(
        fs::read_to_string(proc_dir.join("comm")).ok().as_deref(),
        Some("pgwarden\n"),
        "the open transaction holds pgwarden up"
    );
    client
        .batch_execute("insert into drained values (2); commit")
        .await
        .expect("the transaction in flight finishes during the drain");
    let stopped = wait_child(&mut stop, Duration::from_secs(STOP_TIME_SECS + 10)).await;
    let stop_took = stop_started.elapsed();
    assert!(
        stopped.status.success(),
        "podman stop: {}",
        String::from_utf8_lossy(&stopped.stderr)
    );
    eprintln!("podman stop took {stop_took:?}");
    assert!(
        stop_took < DRAINED_WITHIN,
        "pgwarden exits once no transaction is in flight, not at podman's SIGKILL after \
         {STOP_TIME_SECS} s: podman stop took {stop_took:?}"
    );
    assert_eq!(
        podman.inspect(&guard.container, "{{.State.Status}} {{.State.ExitCode}}"),
        "exited 0"
    );
    assert_eq!(
        cluster.psql_in("app", "select count(*) from drained"),
        "2",
        "both inserts of the drained transaction committed"
    );
    assert_closed_by_shutdown(&idle).await;
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "nothing listens on the client port once the container exited"
    );
    drop(guard);
}

/// Writes the config, runs the container and waits until it is ready, on new ports if it
/// exits at startup; returns the client and admin ports.
async fn start_container(guard: &Cleanup<'_>, cluster: &PgCluster, dir: &Path) -> (u16, u16) {
    fs::create_dir(dir).expect("create the config dir");
    // The container's user must read both files; the password is a throwaway one.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).expect("chmod config dir");
    let users = dir.join("users.toml");
    fs::write(&users, "[[users]]\nname = \"app\"\npassword = \"app-pw\"\n")
        .expect("write users.toml");
    fs::set_permissions(&users, fs::Permissions::from_mode(0o644)).expect("chmod users.toml");
    let mut failures = Vec::new();
    for _ in 0..START_ATTEMPTS {
        let (port, admin_port) = two_ports();
        let config = dir.join("pgwarden.toml");
        fs::write(&config, config_toml(cluster, port, admin_port)).expect("write the config");
        fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).expect("chmod config");
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
        guard.podman.ok(&[
            "run",
            "--detach",
            "--name",
            &guard.container,
            "--runtime",
            "runc",
            "--network",
            "host",
            "--read-only",
            "--cap-drop",
            "all",
            "--security-opt",
            "no-new-privileges",
            "--pull",
            "never",
            "--env",
            &format!("RUST_LOG={rust_log}"),
            "--env",
            "NO_COLOR=1",
            "--volume",
            &format!("{}:/etc/pgwarden:ro", dir.display()),
            &guard.image,
        ]);
        match wait_ready(guard, port, admin_port).await {
            Ok(()) => return (port, admin_port),
            Err(exit) => {
                failures.push(format!("ports {port}/{admin_port}: {exit}"));
                guard.podman.ok(&["rm", "--force", &guard.container]);
            }
        }
    }
    panic!(
        "the container exited during startup {START_ATTEMPTS} times:\n{}",
        failures.join("\n")
    );
}

/// The generated config: plaintext clients on loopback, the users file next to it.
fn config_toml(cluster: &PgCluster, port: u16, admin_port: u16) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
require_tls = false
# Longer than podman stop's --time: exiting 0 before that proves the drain ended by itself.
shutdown_timeout = "60s"

[[targets]]
name = "main"
host = "{host}"
port = {pg_port}
credentials = {{ provider = "file", path = "users.toml" }}
"#,
        host = cluster.host(),
        pg_port = cluster.port(),
    )
}

/// Waits until `/readyz` answers 200 and the client port accepts; `Err` with the exit code
/// and log if the container exited first.
async fn wait_ready(guard: &Cleanup<'_>, port: u16, admin_port: u16) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let state = guard
            .podman
            .inspect(&guard.container, "{{.State.Status}} {{.State.ExitCode}}");
        if !state.starts_with("running") {
            return Err(format!("{state}\n{}", guard.logs()));
        }
        if accepts(admin_port).await {
            let (status, body) = http_status(admin_port, "/readyz").await;
            if status == 200 && accepts(port).await {
                assert_eq!(body, "ready\n");
                return Ok(());
            }
        }
        assert!(
            Instant::now() < deadline,
            "the container was not ready within {READY_TIMEOUT:?}:\n{}",
            guard.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The first `/readyz` answer other than 200 (`None`: the admin port refused the
/// connection); panics if it still answers 200 after 10 s.
async fn wait_until_not_ready(admin_port: u16) -> Option<(u16, String)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if !accepts(admin_port).await {
            return None;
        }
        let answer = http_status(admin_port, "/readyz").await;
        if answer.0 != 200 {
            return Some(answer);
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still answers {answer:?} 10 s after podman stop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn accepts(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

async fn connect(dsn: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect through the container: {e}"));
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("client connection through the container ended: {e}");
        }
    });
    client
}

/// Two distinct ports that were free a moment ago.
fn two_ports() -> (u16, u16) {
    loop {
        let (a, b) = (free_port(), free_port());
        if a != b {
            return (a, b);
        }
    }
}

/// Fills the image's build context: the binary, the libraries it loads, a passwd entry for
/// the image's user, and the host's CA bundle (as the shipped image has one).
fn prepare_image_root(root: &Path, binary: &Path) {
    let put = |path: &str, from: &Path| {
        let to = root.join(path.trim_start_matches('/'));
        fs::create_dir_all(to.parent().expect("a file path has a parent"))
            .expect("create a dir in the image root");
        fs::copy(from, &to)
            .unwrap_or_else(|e| panic!("copy {} into the image root: {e}", from.display()));
    };
    put("/usr/local/bin/pgwarden", binary);
    for library in shared_libraries(binary) {
        put(&library, Path::new(&library));
    }
    let ca_bundle = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if ca_bundle.is_file() {
        put("/etc/ssl/certs/ca-certificates.crt", ca_bundle);
    }
    let etc = root.join("etc");
    fs::create_dir_all(&etc).expect("create etc in the image root");
    let files = [
        (
            "passwd",
            format!("pgwarden:x:{IMAGE_UID}:{IMAGE_UID}:pgwarden:/nonexistent:/sbin/nologin\n"),
        ),
        ("group", format!("pgwarden:x:{IMAGE_UID}:\n")),
        (
            "nsswitch.conf",
            "passwd: files\ngroup: files\nhosts: files dns\n".to_owned(),
        ),
    ];
    for (name, text) in files {
        fs::write(etc.join(name), text).expect("write a file in the image's etc");
    }
    fs::set_permissions(root, fs::Permissions::from_mode(0o755)).expect("chmod the image root");
}

/// Absolute paths of the shared libraries `ldd` says `binary` loads, the dynamic loader
/// included; none for a static binary.
fn shared_libraries(binary: &Path) -> Vec<String> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .expect("run ldd (libc-bin)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Vec::new();
    }
    assert!(out.status.success(), "ldd {}: {text}", binary.display());
    assert!(!text.contains("not found"), "missing libraries: {text}");
    // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`, `/lib64/ld-linux-x86-64.so.2
    // (0x...)`, or `linux-vdso.so.1 (0x...)` (in the kernel, nothing to copy).
    let libraries: Vec<String> = text
        .lines()
        .filter_map(|line| {
            let path = line.split_once("=>").map_or(line, |(_, path)| path);
            path.split_whitespace()
                .next()
                .filter(|path| path.starts_with('/'))
                .map(str::to_owned)
        })
        .collect();
    assert!(
        libraries.iter().any(|path| path.contains("ld-linux")),
        "no dynamic loader in ldd's output: {text}"
    );
    libraries
}

/// `$PGWARDEN_RELEASE_BIN`, else the binary `cargo build --release -p pgwarden` makes (run
/// now, so it is never stale).
fn release_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("PGWARDEN_RELEASE_BIN") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "PGWARDEN_RELEASE_BIN={} is not a file",
            path.display()
        );
        return path;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let started = Instant::now();
    let out = Command::new(cargo)
        .current_dir(workspace_root())
        .args([
            "build",
            "--release",
            "-p",
            "pgwarden",
            "--message-format=json-render-diagnostics",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run cargo build --release");
    assert!(
        out.status.success(),
        "cargo build --release -p pgwarden failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("cargo build --release took {:?}", started.elapsed());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| {
            message["reason"] == "compiler-artifact" && message["target"]["name"] == "pgwarden"
        })
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .expect("cargo reported the pgwarden executable")
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_path_buf()
}

fn podman_installed() -> bool {
    Command::new("podman")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success())
}

/// The value of `field` in a /proc/PID/status text.
fn status_field<'a>(status: &'a str, field: &str) -> &'a str {
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in the process status"))
        .trim()
}

/// The id inside the process's user namespace of `host_id`, per its /proc uid_map or
/// gid_map (`inside outside count` lines; `0 0 4294967295` without a user namespace).
fn container_id(map: &str, host_id: u32) -> u32 {
    map.lines()
        .find_map(|line| {
            let numbers: Vec<u64> = line
                .split_whitespace()
                .map(|n| n.parse().expect("numeric id map"))
                .collect();
            let [inside, outside, count] = numbers[..] else {
                panic!("bad id map line {line:?}");
            };
            let host = u64::from(host_id);
            (outside..outside + count)
                .contains(&host)
                .then(|| u32::try_from(inside + host - outside).expect("ids are 32 bits"))
        })
        .unwrap_or_else(|| panic!("host id {host_id} is not mapped: {map:?}"))
}

/// The per-mount options of the mount that is visible at `mount_point` (the last one
/// listed there) in a /proc/PID/mountinfo text.
fn mount_options<'a>(mountinfo: &'a str, mount_point: &str) -> Vec<&'a str> {
    mountinfo
        .lines()
        .rev()
        .map(|line| line.split(' ').collect::<Vec<&str>>())
        .find(|fields| fields.get(4) == Some(&mount_point))
        .and_then(|fields| fields.get(5).copied())
        .unwrap_or_else(|| panic!("nothing mounted at {mount_point}:\n{mountinfo}"))
        .split(',')
        .collect()
}

/// Waits for a child process (podman stop) without blocking the runtime; kills it after
/// `within`.
async fn wait_child(child: &mut Child, within: Duration) -> Output {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("poll the child process") {
            let mut stderr = Vec::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = pipe.read_to_end(&mut stderr);
            }
            return Output {
                status,
                stdout: Vec::new(),
                stderr,
            };
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the child process did not exit within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// podman with the test's own containers.conf.
struct Podman {
    containers_conf: PathBuf,
}

impl Podman {
    fn new(dir: &Path) -> Podman {
        let containers_conf = dir.join("containers.conf");
        fs::write(&containers_conf, "[containers]\ndefault_ulimits = []\n")
            .expect("write containers.conf");
        Podman { containers_conf }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("podman");
        command
            .env("CONTAINERS_CONF", &self.containers_conf)
            .args(args)
            .stdin(Stdio::null());
        command
    }

    fn output(&self, args: &[&str]) -> Output {
        self.command(args)
            .output()
            .unwrap_or_else(|e| panic!("run podman {args:?}: {e}"))
    }

    /// Runs podman; panics with its stderr unless it succeeds; returns its trimmed stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "podman {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run podman {args:?}: {e}"))
    }

    fn inspect(&self, container: &str, format: &str) -> String {
        self.ok(&["inspect", "--format", format, container])
    }
}

/// Removes the container and the image however the test ends; prints the container's log
/// when it fails.
struct Cleanup<'a> {
    podman: &'a Podman,
    image: String,
    container: String,
}

impl Cleanup<'_> {
    fn logs(&self) -> String {
        let out = self
            .podman
            .output(&["logs", "--tail", "60", &self.container]);
        format!(
            "--- container log (last 60 lines) ---\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        let container = ["rm", "--force", "--ignore", "--time", "0", &self.container];
        let image = ["rmi", "--force", "--ignore", &self.image];
        for args in [&container[..], &image[..]] {
            let out = self.podman.output(args);
            if !out.status.success() {
                eprintln!(
                    "cleanup: podman {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}
