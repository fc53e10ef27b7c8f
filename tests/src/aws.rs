//! The local AWS API emulator (moto plus pgwarden's launcher shim, which checks presigned
//! STS signatures), one per test binary, and the Python helpers that make IAM identities
//! and SDK-made tokens in it.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The virtualenv Python that `scripts/setup` installs (psycopg, moto, boto3).
pub fn python() -> PathBuf {
    let path = std::env::var_os("PGWARDEN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join(".cache/venv/bin/python"));
    assert!(
        path.exists(),
        "no Python with the test clients at {}: run scripts/setup",
        path.display()
    );
    path
}

fn script(name: &str) -> PathBuf {
    crate::workspace_root().join("tests").join(name)
}

/// A running emulator. The child's stdin stays open for the life of the test process; the
/// launcher exits when it closes, however the process ends (statics are never dropped).
pub struct AwsEmulator {
    endpoint: String,
    _child: Mutex<Child>,
}

impl AwsEmulator {
    /// The emulator shared by every test of this binary, started on first use.
    pub fn shared() -> &'static AwsEmulator {
        static EMULATOR: OnceLock<AwsEmulator> = OnceLock::new();
        EMULATOR.get_or_init(AwsEmulator::start)
    }

    /// An emulator of the calling test's own, which it may stop and start again (on the
    /// same port, with its state wiped, as after a restart).
    pub fn dedicated() -> AwsEmulator {
        AwsEmulator::start_on(crate::free_port())
    }

    /// Kills the emulator: calls fail with "connection refused" until `restart`.
    pub fn stop(&self) {
        let mut child = self._child.lock().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the emulator again on the same port, with no secrets.
    pub fn restart(&self) {
        let port: u16 = self
            .endpoint
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("the endpoint ends with the port");
        let fresh = AwsEmulator::start_on(port);
        assert_eq!(fresh.endpoint, self.endpoint);
        let child = fresh._child.into_inner().unwrap_or_else(|e| e.into_inner());
        *self._child.lock().unwrap_or_else(|e| e.into_inner()) = child;
    }

    fn start() -> AwsEmulator {
        AwsEmulator::start_on(0)
    }

    fn start_on(port: u16) -> AwsEmulator {
        let mut child = Command::new(python())
            .arg(script("aws-emulator/moto_launcher.py"))
            .args([
                "--port",
                &port.to_string(),
                "--verify-sts",
                "--exit-on-stdin-eof",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the AWS emulator");
        let stdout = child.stdout.take().expect("emulator stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the AWS emulator printed READY within 30 s");
        let endpoint = line
            .trim()
            .strip_prefix("READY ")
            .unwrap_or_else(|| panic!("unexpected emulator output {line:?}"))
            .to_owned();
        AwsEmulator {
            endpoint,
            _child: Mutex::new(child),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A new IAM user key and an assumed-role session of `role` (JSON from the helper).
    pub fn identities(&self, role: &str) -> Identities {
        let out = Command::new(python())
            .arg(script("python/sts_identity.py"))
            .args([&self.endpoint, role])
            .output()
            .expect("run sts_identity.py");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |object: &str, name: &str| -> String {
            let start = text.find(&format!("\"{object}\"")).expect("object");
            let rest = &text[start..];
            let key = format!("\"{name}\": \"");
            let at = rest.find(&key).expect("field") + key.len();
            rest[at..rest[at..].find('"').expect("end") + at].to_owned()
        };
        Identities {
            user_key_id: field("user", "id"),
            user_secret: field("user", "secret"),
            role_key_id: field("role", "id"),
            role_secret: field("role", "secret"),
            role_session_token: field("role", "token"),
        }
    }

    /// A token made with boto3 (the README's Lambda recipe).
    pub fn boto3_token(
        &self,
        key_id: &str,
        secret: &str,
        session: Option<&str>,
        server_id: &str,
        db_user: &str,
    ) -> String {
        let out = Command::new(python())
            .arg(script("python/sts_token.py"))
            .args([
                &self.endpoint,
                key_id,
                secret,
                session.unwrap_or("-"),
                server_id,
                db_user,
            ])
            .output()
            .expect("run sts_token.py");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// Environment that keeps the AWS SDK's default chain to the environment variables given
/// with it: no instance metadata service, no shared config or credentials files.
pub const ISOLATED_AWS_ENV: [(&str, &str); 3] = [
    ("AWS_EC2_METADATA_DISABLED", "true"),
    ("AWS_CONFIG_FILE", "/dev/null"),
    ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
];

impl AwsEmulator {
    /// Creates an RDS-format secret holding `username`/`password`; returns its ARN.
    pub fn create_secret(&self, name: &str, username: &str, password: &str) -> String {
        self.secret_step(&["create", name, username, password])
    }
}

impl AwsEmulator {
    /// A rotation function's createSecret step: stages `username`/`password` as a new
    /// version labelled `AWSPENDING`; returns its version id.
    pub fn stage_pending_version(&self, name: &str, username: &str, password: &str) -> String {
        self.secret_step(&["pending", name, username, password])
    }

    /// A rotation function's finishSecret step: moves `AWSCURRENT` to `version`.
    pub fn finish_rotation(&self, name: &str, version: &str) {
        self.secret_step(&["finish", name, version]);
    }

    /// Runs one step of `tests/python/secret.py` against this emulator; returns its output.
    fn secret_step(&self, args: &[&str]) -> String {
        let out = Command::new(python())
            .arg(script("python/secret.py"))
            .arg(&self.endpoint)
            .args(args)
            .output()
            .expect("run secret.py");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// Credentials the emulator issued.
pub struct Identities {
    pub user_key_id: String,
    pub user_secret: String,
    pub role_key_id: String,
    pub role_secret: String,
    pub role_session_token: String,
}
