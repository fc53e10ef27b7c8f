//! The admin console: database `pgwarden`, for the users in `server.admin_users`. It speaks
//! the simple query protocol (what `psql` uses) and answers PgBouncer's commands with
//! PgBouncer's column names where the concept is the same, so dashboards and habits carry
//! over: `SHOW POOLS | CLIENTS | SERVERS | STATS | CONFIG | HELP`, `PAUSE`, `RESUME`,
//! `RELOAD`, `SHUTDOWN`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use pgwarden_protocol::backend::{self, ErrorReport};
use pgwarden_protocol::frame::take_message;
use pgwarden_protocol::frontend;
use pgwarden_protocol::limits::MAX_INSPECTED_MESSAGE;
use pgwarden_protocol::sqlstate;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::info;

use crate::app::App;
use crate::cancel::pool_id;
use crate::stream::ClientStream;

/// The database name that selects the console.
pub const DATABASE: &str = "pgwarden";

/// How long PAUSE waits for borrowed backends to come back.
const PAUSE_WAIT: Duration = Duration::from_secs(30);

/// A command's answer: rows (possibly none) and the CommandComplete tag.
struct Reply {
    columns: Vec<&'static str>,
    rows: Vec<Vec<String>>,
    tag: String,
}

impl Reply {
    fn done(tag: &str) -> Self {
        Reply {
            columns: Vec::new(),
            rows: Vec::new(),
            tag: tag.to_owned(),
        }
    }

    fn table(columns: Vec<&'static str>, rows: Vec<Vec<String>>) -> Self {
        Reply {
            columns,
            rows,
            tag: "SHOW".to_owned(),
        }
    }

    fn encode(&self, out: &mut BytesMut) {
        if !self.columns.is_empty() {
            backend::row_description(out, &self.columns);
            for row in &self.rows {
                let values: Vec<Option<&str>> = row.iter().map(|v| Some(v.as_str())).collect();
                backend::data_row(out, &values);
            }
        }
        backend::command_complete(out, &self.tag);
    }
}

/// Serves an authenticated admin until it leaves (or pgwarden shuts down).
pub async fn serve(app: &Arc<App>, stream: &mut ClientStream, mut buf: BytesMut, user: &str) {
    let mut out = BytesMut::with_capacity(1024);
    for (name, value) in [
        ("server_version", "15.0 (pgwarden console)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        backend::parameter_status(&mut out, name, value);
    }
    backend::ready_for_query(&mut out, backend::IDLE);
    info!(target: "pgwarden::audit", event = "console", user, "admin console opened");
    loop {
        if stream.write_all(&out).await.is_err() || stream.flush().await.is_err() {
            return;
        }
        out.clear();
        let message = loop {
            match take_message(&mut buf, MAX_INSPECTED_MESSAGE) {
                Ok(Some(message)) => break message,
                Ok(None) => {}
                Err(_) => return,
            }
            tokio::select! {
                read = stream.read_buf(&mut buf) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
                () = app.shutdown.cancelled() => return,
            }
        };
        match message {
            (frontend::QUERY, body) => {
                let Ok(sql) = frontend::parse_query(&body) else {
                    return;
                };
                for command in sql.split(';').map(str::trim).filter(|c| !c.is_empty()) {
                    info!(target: "pgwarden::audit", event = "console", user, command, "admin command");
                    match execute(app, command).await {
                        Ok(reply) => reply.encode(&mut out),
                        Err(report) => {
                            report.encode(&mut out);
                            break;
                        }
                    }
                }
                if sql.trim().trim_matches(';').is_empty() {
                    out.extend_from_slice(&[b'I', 0, 0, 0, 4]); // EmptyQueryResponse
                }
                backend::ready_for_query(&mut out, backend::IDLE);
            }
            (frontend::TERMINATE, _) => return,
            _ => {
                ErrorReport::fatal(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "the admin console speaks the simple query protocol only",
                )
                .encode(&mut out);
                let _ = stream.write_all(&out).await;
                return;
            }
        }
    }
}

async fn execute(app: &Arc<App>, command: &str) -> Result<Reply, ErrorReport> {
    let words: Vec<String> = command
        .split_whitespace()
        .map(str::to_ascii_uppercase)
        .collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    match words[..] {
        ["SHOW", "POOLS"] => Ok(show_pools(app)),
        ["SHOW", "CLIENTS"] => Ok(show_clients(app)),
        ["SHOW", "SERVERS"] => Ok(show_servers(app)),
        ["SHOW", "STATS"] => Ok(show_stats(app)),
        ["SHOW", "CONFIG"] => Ok(show_config(app)),
        ["SHOW", "HELP"] | ["HELP"] => Ok(Reply::table(
            vec!["command"],
            [
                "SHOW HELP",
                "SHOW POOLS",
                "SHOW CLIENTS",
                "SHOW SERVERS",
                "SHOW STATS",
                "SHOW CONFIG",
                "PAUSE",
                "RESUME",
                "RELOAD",
                "SHUTDOWN",
            ]
            .iter()
            .map(|c| vec![(*c).to_owned()])
            .collect(),
        )),
        ["PAUSE"] => pause(app).await,
        ["RESUME"] => {
            app.resume();
            info!("console: RESUME");
            Ok(Reply::done("RESUME"))
        }
        ["RELOAD"] => match app.reload_file().await {
            Ok(notes) => {
                crate::server::report_reload(Ok(notes));
                Ok(Reply::done("RELOAD"))
            }
            Err(e) => {
                let message = format!("reload refused, the configuration in force stays: {e}");
                crate::server::report_reload(Err(e));
                Err(ErrorReport::error(sqlstate::CONFIG_FILE_ERROR, message))
            }
        },
        ["SHUTDOWN"] => {
            info!("console: SHUTDOWN");
            app.shutdown.cancel();
            Ok(Reply::done("SHUTDOWN"))
        }
        _ => Err(ErrorReport::error(
            sqlstate::SYNTAX_ERROR,
            format!("unknown admin console command: {command}"),
        )
        .with_hint("SHOW HELP lists the commands")),
    }
}

/// Stops new transactions from starting and waits for borrowed backends to come back.
async fn pause(app: &Arc<App>) -> Result<Reply, ErrorReport> {
    app.pause();
    info!("console: PAUSE");
    let deadline = Instant::now() + PAUSE_WAIT;
    loop {
        let borrowed: i64 = app
            .live()
            .targets
            .iter()
            .map(|t| {
                app.metrics
                    .backend_connections
                    .with_label_values(&[t.name(), "borrowed"])
                    .get()
            })
            .sum();
        if borrowed == 0 {
            return Ok(Reply::done("PAUSE"));
        }
        if Instant::now() >= deadline {
            return Err(ErrorReport::error(
                sqlstate::LOCK_NOT_AVAILABLE,
                format!(
                    "{borrowed} backend connections still in use after {PAUSE_WAIT:?}; new transactions stay paused until RESUME"
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn show_pools(app: &App) -> Reply {
    let clients = app.cancels.clients_by_pool();
    let mut rows = Vec::new();
    for target in &app.live().targets {
        let mode = format!("{:?}", target.config().pool_mode).to_lowercase();
        for pool in target.pools() {
            let stats = pool.stats();
            let mine = clients.get(&pool_id(&pool)).copied().unwrap_or_default();
            let active = mine.active;
            rows.push(vec![
                pool.key.database.clone(),
                pool.key.user.clone(),
                mine.connected.saturating_sub(stats.waiting).to_string(),
                stats.waiting.to_string(),
                active.to_string(),
                stats.idle.to_string(),
                stats.open.saturating_sub(stats.idle + active).to_string(),
                mode.clone(),
                target.name().to_owned(),
                target.config().pool_size.to_string(),
            ]);
        }
    }
    Reply::table(
        vec![
            "database",
            "user",
            "cl_active",
            "cl_waiting",
            "sv_active",
            "sv_idle",
            "sv_login",
            "pool_mode",
            "target",
            "pool_size",
        ],
        rows,
    )
}

fn show_clients(app: &App) -> Reply {
    let rows = app
        .cancels
        .snapshot()
        .into_iter()
        .map(|c| {
            let pool = &c.info().pool;
            vec![
                "C".to_owned(),
                pool.key.user.clone(),
                pool.key.database.clone(),
                if c.attached.is_some() {
                    "active"
                } else {
                    "idle"
                }
                .to_owned(),
                c.info().peer.ip().to_string(),
                c.info().peer.port().to_string(),
                time(c.info().connected),
                c.attached.map_or_else(String::new, |a| time(a.since)),
                c.key.pid.to_string(),
                c.attached
                    .map_or_else(String::new, |a| a.key.pid.to_string()),
                if c.info().tls { "yes" } else { "no" }.to_owned(),
                c.info().principal.clone().unwrap_or_default(),
                pool.target().name().to_owned(),
            ]
        })
        .collect();
    Reply::table(
        vec![
            "type",
            "user",
            "database",
            "state",
            "addr",
            "port",
            "connect_time",
            "request_time",
            "remote_pid",
            "link",
            "tls",
            "principal",
            "target",
        ],
        rows,
    )
}

fn show_servers(app: &App) -> Reply {
    let mut rows = Vec::new();
    for c in app.cancels.snapshot() {
        if let Some(a) = c.attached {
            let pool = &c.info().pool;
            rows.push(vec![
                "S".to_owned(),
                pool.key.user.clone(),
                pool.key.database.clone(),
                "active".to_owned(),
                a.addr.ip().to_string(),
                a.addr.port().to_string(),
                time(a.since),
                a.key.pid.to_string(),
                c.key.pid.to_string(),
                pool.target().name().to_owned(),
            ]);
        }
    }
    let now = Instant::now();
    for target in &app.live().targets {
        for pool in target.pools() {
            for server in pool.idle_servers() {
                let since = SystemTime::now() - now.saturating_duration_since(server.idle_since);
                rows.push(vec![
                    "S".to_owned(),
                    pool.key.user.clone(),
                    pool.key.database.clone(),
                    "idle".to_owned(),
                    server.addr.ip().to_string(),
                    server.addr.port().to_string(),
                    time(since),
                    server.pid.to_string(),
                    String::new(),
                    target.name().to_owned(),
                ]);
            }
        }
    }
    Reply::table(
        vec![
            "type",
            "user",
            "database",
            "state",
            "addr",
            "port",
            "request_time",
            "remote_pid",
            "link",
            "target",
        ],
        rows,
    )
}

fn show_stats(app: &App) -> Reply {
    let rows = app
        .live()
        .targets
        .iter()
        .map(|t| {
            let borrows = app.metrics.borrow_seconds.with_label_values(&[t.name()]);
            let xacts = borrows.get_sample_count();
            let wait_us = (borrows.get_sample_sum() * 1e6) as u64;
            let queries = app.metrics.queries.with_label_values(&[t.name()]).get();
            vec![
                t.name().to_owned(),
                xacts.to_string(),
                queries.to_string(),
                wait_us.to_string(),
                wait_us.checked_div(xacts).unwrap_or(0).to_string(),
            ]
        })
        .collect();
    Reply::table(
        vec![
            "database",
            "total_xact_count",
            "total_query_count",
            "total_wait_time",
            "avg_wait_time",
        ],
        rows,
    )
}

/// Keys a reload cannot change (see `App::reload`); everything else can.
const RESTART_ONLY: &[&str] = &[
    "server.listen",
    "server.admin_listen",
    "server.listen_backlog",
    "server.worker_threads",
    "server.thread_busy_limit",
    "server.max_auth_failures",
    "server.auth_failure_window",
    "cluster.instance_id",
];

fn show_config(app: &App) -> Reply {
    let live = app.live();
    let value = toml::Value::try_from(&live.config).unwrap_or(toml::Value::Boolean(false));
    let mut rows = Vec::new();
    flatten("", &value, &mut rows);
    let rows = rows
        .into_iter()
        .map(|(key, value)| {
            let changeable = if RESTART_ONLY.contains(&key.as_str()) {
                "no"
            } else {
                "yes"
            };
            vec![key, value, changeable.to_owned()]
        })
        .collect();
    Reply::table(vec!["key", "value", "changeable"], rows)
}

/// `a.b.c = value` lines; targets are keyed by name. Nothing secret is in the
/// configuration (passwords come from providers), but a key that names one is masked
/// all the same.
fn flatten(prefix: &str, value: &toml::Value, rows: &mut Vec<(String, String)>) {
    let join = |key: &str| {
        if prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{prefix}.{key}")
        }
    };
    match value {
        toml::Value::Table(table) => {
            for (key, value) in table {
                flatten(&join(key), value, rows);
            }
        }
        toml::Value::Array(items) if prefix == "targets" => {
            for item in items {
                let name = item
                    .get("name")
                    .and_then(toml::Value::as_str)
                    .unwrap_or("?");
                flatten(&join(name), item, rows);
            }
        }
        other => {
            let last = prefix
                .rsplit('.')
                .next()
                .unwrap_or(prefix)
                .to_ascii_lowercase();
            let secret =
                last == "password" || last.ends_with("_password") || last.ends_with("token");
            let shown = if secret {
                "********".to_owned()
            } else {
                match other {
                    toml::Value::String(s) => s.clone(),
                    v => v.to_string(),
                }
            };
            rows.push((prefix.to_owned(), shown));
        }
    }
}
