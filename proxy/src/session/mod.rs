//! One client connection, from accept to close. Reading this file top to bottom tells a
//! client's life:
//!
//! 1. handshake: decline encryption (TLS comes with client auth), startup or cancel;
//! 2. authenticate against the target's credentials (SCRAM-SHA-256);
//! 3. setup: ParameterStatus from the pool's cache (a backend is borrowed only when the
//!    cache is empty, which also surfaces Postgres's own login errors at once), pgwarden's
//!    BackendKeyData, ReadyForQuery;
//! 4. serve: the relay loop in [`relay`], borrowing a backend per transaction (or once per
//!    session in session mode or when pinned); a client idle between transactions is
//!    parked ([`crate::parking`]) and taken up again by a new task ([`resume`]);
//! 5. close: a backend still held is cleaned ([`cleanup`]) or discarded.

mod authenticate;
mod cleanup;
mod handshake;
mod log_span;
mod messages;
pub mod plan;
mod relay;
pub mod settings;
pub mod statements;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use pgwarden_protocol::backend::{self, ErrorReport};
use pgwarden_protocol::frame::FrameWalker;
use pgwarden_protocol::sqlstate;
use pgwarden_protocol::startup::StartupMessage;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::{debug, info, Instrument};

use crate::app::{App, Live};
use crate::backend::{BackendConn, ConnectError};
use crate::cancel::{CancelHandle, CancelOutcome, ClientInfo};
use crate::config::{ClientAuth, PoolMode};
use crate::metrics::GaugeGuard;
use crate::pinning::PinReason;
use crate::pool::{BorrowError, Pool, PoolKey, Target};
use crate::quotas::QuotaGuard;
use pgwarden_protocol::startup::CancelKey;

use crate::stream::ClientStream;
use handshake::{handshake, Handshake, HandshakeError, Negotiated};
use log_span::{client_span, Serving};
pub use messages::Boundary;

/// A client that finished setup and is being served.
pub struct Session {
    pub app: Arc<App>,
    pub pool: Arc<Pool>,
    pub cancel: CancelHandle,
    pub mode: PoolMode,
    /// Set when the client created backend state that cannot move (transaction mode).
    pub pinned: Option<PinReason>,
    /// Client-side message boundaries, kept across transactions.
    pub client_walker: FrameWalker,
    /// The client's named prepared statements (transaction mode).
    pub statements: statements::ClientStatements,
    /// Answers owed to the client for messages in flight.
    pub plan: plan::Plan,
    /// The client's session settings (transaction mode), replayed on each backend.
    pub settings: settings::Settings,
}

impl Session {
    pub fn target(&self) -> &Arc<Target> {
        self.pool.target()
    }

    /// Frees the per-transaction scratch space before the client parks: it is idle, and a
    /// parked client should cost only its state.
    pub fn release_scratch(&mut self) {
        self.plan.release_memory();
    }

    /// Whether the backend goes back to the pool at the end of each transaction.
    pub fn releases_per_transaction(&self) -> bool {
        self.mode == PoolMode::Transaction && self.pinned.is_none()
    }

    pub fn pin(&mut self, reason: PinReason) {
        if self
            .target()
            .config()
            .pin_filters
            .iter()
            .any(|f| f == reason.as_str())
        {
            self.app
                .metrics
                .pins_filtered
                .with_label_values(&[self.target().name(), reason.as_str()])
                .inc();
            return;
        }
        if self.pinned.is_none() && self.mode == PoolMode::Transaction {
            self.pinned = Some(reason);
            self.app
                .metrics
                .backend_pinned
                .with_label_values(&[self.target().name()])
                .inc();
            self.app
                .metrics
                .pins
                .with_label_values(&[self.target().name(), reason.as_str()])
                .inc();
            debug!(reason = reason.as_str(), "client pinned to its backend");
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.pinned.is_some() {
            self.app
                .metrics
                .backend_pinned
                .with_label_values(&[self.target().name()])
                .dec();
        }
    }
}

/// What the listener gives every accepted client, kept until it disconnects.
pub struct Admission {
    /// Its place under `max_client_connections`.
    pub slot: OwnedSemaphorePermit,
    /// Counts it in the drain at shutdown, also while it is parked.
    pub tracked: TaskTrackerToken,
}

/// A client after setup: everything it keeps between transactions, whether a task serves
/// it or it is parked (`parking.rs`).
pub struct Client {
    pub stream: ClientStream,
    pub session: Session,
    _held: Held,
}

/// Held for as long as the client is connected; released by dropping.
struct Held {
    _admission: Admission,
    _open: GaugeGuard,
    _no_tls: Option<GaugeGuard>,
    _quota: Option<QuotaGuard>,
}

/// Serves one accepted client connection until it closes (or parks: then a new task takes
/// it up, see [`resume`]).
///
/// The setup future is boxed inside the task, so that it comes from the allocator of the
/// thread that runs it: the accept loop's thread, with an arena of its own, only allocates
/// the task.
pub async fn run(app: Arc<App>, tcp: TcpStream, peer: SocketAddr, admission: Admission) {
    let span = client_span(peer);
    // Boxed, like every large step: a task's allocation is the size of its whole future,
    // and a client between transactions should not pay for the handshake's state.
    let setup = Box::pin(setup(app, tcp, peer, admission).instrument(span.clone()));
    if let Some((client, buf, held)) = setup.await {
        Serving::new(relay::serve(client, buf, held), span).await;
    }
}

/// Serves a client woken from parking, in a new task.
pub async fn resume(mut client: Box<Client>) {
    let span = log_span::span_again(&client);
    if let Err(e) = client.stream.socket_mut().unpark() {
        debug!(parent: &span, error = %e, "could not take up a parked client");
        return;
    }
    Serving::new(relay::serve(client, BytesMut::new(), None), span).await;
}

/// Handshake, authentication and the first ReadyForQuery; serves console clients whole.
/// Returns a client ready for its first query, with its read buffer and (session mode)
/// its backend.
async fn setup(
    app: Arc<App>,
    tcp: TcpStream,
    peer: SocketAddr,
    admission: Admission,
) -> Option<(Box<Client>, BytesMut, Option<Box<BackendConn>>)> {
    let open = GaugeGuard::new(app.metrics.client_connections.clone());
    app.metrics.client_connections_received.inc();
    // Small messages must not wait for Nagle.
    let _ = tcp.set_nodelay(true);
    let live = app.live();
    let mut buf = BytesMut::with_capacity(512);
    let deadline = Instant::now() + live.config.server.startup_timeout;
    let negotiated = Box::pin(handshake(tcp, &mut buf, app.tls.as_ref(), deadline.into())).await;
    let (mut stream, message) = match negotiated {
        Ok(Negotiated {
            handshake: Handshake::Cancel(key),
            ..
        }) => {
            Box::pin(handle_cancel(&app, &live, key, false)).await;
            return None;
        }
        Ok(Negotiated {
            handshake: Handshake::ForwardedCancel(key),
            ..
        }) => {
            Box::pin(handle_cancel(&app, &live, key, true)).await;
            return None;
        }
        Ok(Negotiated {
            stream,
            handshake: Handshake::Startup(message),
        }) => (stream, message),
        Err((Some(mut stream), e @ (HandshakeError::Protocol(_) | HandshakeError::Timeout))) => {
            let report = ErrorReport::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string());
            Box::pin(fail(&app, &mut stream, &report.into())).await;
            return None;
        }
        Err(_) => {
            app.metrics
                .client_setups
                .with_label_values(&["failed"])
                .inc();
            return None;
        }
    };
    tracing::Span::current().record("tls", stream.is_tls());
    let no_tls =
        (!stream.is_tls()).then(|| GaugeGuard::new(app.metrics.client_connections_no_tls.clone()));
    if live.config.server.require_tls && !stream.is_tls() {
        let report = ErrorReport::fatal(
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            "pgwarden requires TLS: connect with sslmode=require or stronger",
        );
        Box::pin(fail(&app, &mut stream, &report.into())).await;
        return None;
    }
    let setup = tokio::time::timeout_at(
        deadline.into(),
        Box::pin(establish(
            &app,
            &live,
            &mut stream,
            &mut buf,
            &message,
            peer,
        )),
    )
    .await;
    let startup_timeout = live.config.server.startup_timeout;
    drop(live);
    let mut quota = None;
    let setup = match setup {
        Ok(Ok(Admitted::Console { user })) => {
            app.metrics
                .client_setups
                .with_label_values(&["succeeded"])
                .inc();
            Box::pin(crate::console::serve(&app, &mut stream, buf, &user)).await;
            return None;
        }
        Ok(Ok(Admitted::Client {
            pool,
            quota: admitted,
            principal,
        })) => {
            quota = Some(admitted);
            let info = ClientInfo {
                peer,
                pool: pool.clone(),
                principal,
                tls: stream.is_tls(),
                connected: std::time::SystemTime::now(),
            };
            Box::pin(start_session(&app, &mut stream, pool, &message, info)).await
        }
        Ok(Err(failure)) => Err(failure),
        Err(_) => Err(ErrorReport::fatal(
            sqlstate::CONNECTION_FAILURE,
            format!("startup and authentication did not finish within {startup_timeout:?}"),
        )
        .into()),
    };
    let (session, held) = match setup {
        Ok(ready) => ready,
        Err(failure) => {
            Box::pin(fail(&app, &mut stream, &failure)).await;
            return None;
        }
    };
    app.metrics
        .client_setups
        .with_label_values(&["succeeded"])
        .inc();
    // At `debug`: at `info` the audit line "client authenticated" already records each
    // login, with the same span fields (a line costs about 6 µs of CPU, and PgBouncer too
    // logs two lines per connection by default).
    debug!("client connected");
    let client = Box::new(Client {
        stream,
        session,
        _held: Held {
            _admission: admission,
            _open: open,
            _no_tls: no_tls,
            _quota: quota,
        },
    });
    Some((client, buf, held))
}

/// An error that ends a client's connection: one of ours, or Postgres's own, relayed as is.
pub enum Failure {
    Report(ErrorReport),
    Raw(Bytes),
}

impl From<ErrorReport> for Failure {
    fn from(report: ErrorReport) -> Self {
        Failure::Report(report)
    }
}

impl Failure {
    fn encode(&self, out: &mut BytesMut) {
        match self {
            Failure::Report(r) => r.encode(out),
            Failure::Raw(raw) => out.extend_from_slice(raw),
        }
    }

    /// The error a client gets when no backend could be had for it.
    pub fn from_borrow(e: BorrowError) -> Self {
        match e {
            BorrowError::Connect(ConnectError::Server { raw, .. }) => Failure::Raw(raw),
            BorrowError::Connect(e) => Failure::Report(ErrorReport::fatal(
                sqlstate::CONNECTION_FAILURE,
                format!("pgwarden could not connect to the database: {e}"),
            )),
            e @ (BorrowError::Timeout { .. } | BorrowError::TargetFull(..)) => Failure::Report(
                ErrorReport::fatal(sqlstate::TOO_MANY_CONNECTIONS, e.to_string())
                    .with_hint("raise pool_size or borrow_timeout, or lower the client load"),
            ),
            e @ BorrowError::QueueFull { .. } => Failure::Report(
                ErrorReport::fatal(sqlstate::TOO_MANY_CONNECTIONS, e.to_string())
                    .with_hint("the target's max_waiting_clients is reached; retry later"),
            ),
            e @ (BorrowError::CredentialsUnavailable(_) | BorrowError::Move(_)) => Failure::Report(
                ErrorReport::fatal(sqlstate::CONNECTION_FAILURE, e.to_string()),
            ),
            e @ BorrowError::UnknownUser(_) => Failure::Report(ErrorReport::fatal(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                e.to_string(),
            )),
        }
    }
}

async fn fail(app: &App, stream: &mut ClientStream, failure: &Failure) {
    app.metrics
        .client_setups
        .with_label_values(&["failed"])
        .inc();
    let mut out = BytesMut::new();
    failure.encode(&mut out);
    let _ = stream.write_all(&out).await;
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
}

/// Handles a CancelRequest: for one of this instance's keys, cancels the query; for
/// another instance's, passes it to the peers (unless a peer sent it: never twice).
async fn handle_cancel(app: &App, live: &Live, key: CancelKey, from_peer: bool) {
    let outcome = if app.cancels.owns(key) {
        app.cancels.cancel(key).await
    } else if from_peer {
        CancelOutcome::Unknown
    } else {
        crate::cancel::forward_to_peers(&live.config.cluster.peers, key).await
    };
    app.metrics
        .cancels
        .with_label_values(&[outcome.as_str()])
        .inc();
    debug!(outcome = outcome.as_str(), from_peer, "cancel request");
}

/// An authenticated client: of a pool, or of the admin console.
enum Admitted {
    Client {
        pool: Arc<Pool>,
        quota: QuotaGuard,
        principal: Option<String>,
    },
    Console {
        user: String,
    },
}

/// Picks the target for the client's database and authenticates the client; returns the
/// pool that will serve it (or the admin console). Bounded by the startup timeout.
async fn establish(
    app: &Arc<App>,
    live: &Live,
    stream: &mut ClientStream,
    buf: &mut BytesMut,
    message: &StartupMessage,
    peer: SocketAddr,
) -> Result<Admitted, Failure> {
    let user = message.user().ok_or_else(|| {
        ErrorReport::fatal(
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            "no PostgreSQL user name specified in startup packet",
        )
    })?;
    let database = message.database().unwrap_or(user);
    let span = tracing::Span::current();
    span.record("user", user);
    span.record("database", database);
    let console = database == crate::console::DATABASE;
    // The console's users authenticate as clients of the first target that knows them.
    let console_target = || {
        live.targets
            .iter()
            .find(|t| t.credentials.knows(user))
            .or(live.targets.first())
    };
    let chosen = if console {
        console_target()
    } else {
        live.target_for(database)
    };
    let target = chosen
        .ok_or_else(|| {
            ErrorReport::fatal(
                sqlstate::INVALID_CATALOG_NAME,
                format!("database \"{database}\" does not exist"),
            )
        })?
        .clone();
    span.record("target", target.name());

    let mut out = BytesMut::with_capacity(512);
    if message.minor_version > 0 || !message.protocol_options.is_empty() {
        backend::negotiate_protocol_version(&mut out, &message.protocol_options);
        stream.write_all(&out).await.map_err(|_| closed())?;
        stream.flush().await.map_err(|_| closed())?;
        out.clear();
    }
    let scopes = [
        crate::auth_limit::Scope::Address(peer.ip()),
        crate::auth_limit::Scope::User(user.to_owned()),
    ];
    if let Some(scope) = app.auth_limiter.blocked(&scopes, Instant::now()) {
        app.metrics
            .auth_rate_limited
            .with_label_values(&[scope.label()])
            .inc();
        info!(
            target: "pgwarden::audit",
            event = "authentication",
            outcome = "denied",
            reason = "rate_limited",
            scope = scope.label(),
            "authentication refused: too many recent failures"
        );
        return Err(ErrorReport::fatal(
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            "too many failed authentication attempts; retry later",
        )
        .into());
    }
    let mut principal = None;
    let outcome = match (target.config().client_auth, &live.iam) {
        (ClientAuth::Iam, Some(iam)) => {
            authenticate::authenticate_iam(stream, buf, iam, user, peer)
                .await
                .map(|id| {
                    span.record("principal", id.principal.as_str());
                    info!(target: "pgwarden::audit", event = "authorization", outcome = "allowed", principal = %id.principal, rule = %id.rule, "IAM principal allowed by a rule");
                    principal = Some(id.principal);
                    "iam"
                })
        }
        (ClientAuth::Iam, None) => Err(authenticate::AuthFailure {
            report: ErrorReport::fatal(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                "IAM authentication is not configured",
            ),
            reason: "iam_not_configured",
        }),
        (ClientAuth::Scram, _) => {
            authenticate::authenticate(stream, buf, &target.credentials, user)
                .await
                .map(|()| "scram")
        }
    };
    match outcome {
        Ok(method) => {
            app.metrics
                .auth_successes
                .with_label_values(&[method])
                .inc();
            info!(target: "pgwarden::audit", event = "authentication", outcome = "allowed", method, "client authenticated");
        }
        Err(failure) => {
            if failure.reason != "client_disconnected" {
                app.auth_limiter.record_failure(&scopes, Instant::now());
            }
            app.metrics
                .auth_failures
                .with_label_values(&[failure.reason])
                .inc();
            info!(target: "pgwarden::audit", event = "authentication", outcome = "denied", reason = failure.reason, "client authentication failed");
            return Err(failure.report.into());
        }
    }

    if console {
        if !live.config.server.admin_users.iter().any(|u| u == user) {
            app.metrics
                .auth_failures
                .with_label_values(&["not_admin"])
                .inc();
            info!(target: "pgwarden::audit", event = "authorization", outcome = "denied", reason = "not_admin", "admin console refused");
            return Err(ErrorReport::fatal(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                format!("user \"{user}\" may not use the admin console"),
            )
            .with_hint("admins are listed in server.admin_users")
            .into());
        }
        info!(target: "pgwarden::audit", event = "authorization", outcome = "allowed", scope = "console", "admin console allowed");
        return Ok(Admitted::Console {
            user: user.to_owned(),
        });
    }
    let quota = app
        .quotas
        .admit(
            &live.config.quotas,
            principal.as_deref(),
            user,
            Instant::now(),
        )
        .map_err(|refused| {
            app.metrics
                .quota_rejections
                .with_label_values(&[refused.scope.label(), refused.limit.label()])
                .inc();
            info!(
                target: "pgwarden::audit",
                event = "authorization",
                outcome = "denied",
                reason = "quota",
                scope = refused.scope.label(),
                limit = refused.limit.label(),
                "client refused by a quota"
            );
            ErrorReport::fatal(sqlstate::TOO_MANY_CONNECTIONS, refused.message)
                .with_hint("the [[quotas]] of pgwarden's configuration set this limit")
        })?;
    let pool = target.pool(PoolKey {
        database: database.to_owned(),
        user: user.to_owned(),
    });
    Ok(Admitted::Client {
        pool,
        quota,
        principal,
    })
}

/// Completes a client's handshake (so a TLS client reads the error over TLS and a cancel
/// request still reaches its query), then refuses it with `report`. Used during the drain.
pub async fn refuse_after_startup(app: &Arc<App>, tcp: TcpStream, report: ErrorReport) {
    let mut buf = BytesMut::with_capacity(512);
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    match Box::pin(handshake(tcp, &mut buf, app.tls.as_ref(), deadline.into())).await {
        Ok(Negotiated {
            handshake: Handshake::Cancel(key),
            ..
        }) => handle_cancel(app, &app.live(), key, false).await,
        Ok(Negotiated {
            handshake: Handshake::ForwardedCancel(key),
            ..
        }) => handle_cancel(app, &app.live(), key, true).await,
        Ok(Negotiated { mut stream, .. }) => {
            let mut out = BytesMut::new();
            report.encode(&mut out);
            let _ = stream.write_all(&out).await;
            let _ = stream.flush().await;
            let _ = stream.shutdown().await;
        }
        Err(_) => {}
    }
}

/// Sends an authenticated client its ParameterStatus messages, BackendKeyData and first
/// ReadyForQuery. Bounded by `borrow_timeout`, not the startup timeout: a backend is
/// borrowed when the pool's parameters are not cached yet, and kept in session mode.
async fn start_session(
    app: &Arc<App>,
    stream: &mut ClientStream,
    pool: Arc<Pool>,
    message: &StartupMessage,
    info: ClientInfo,
) -> Result<(Session, Option<Box<BackendConn>>), Failure> {
    let (mode, borrow_timeout) = {
        let config = pool.target().config();
        (config.pool_mode, config.borrow_timeout)
    };
    let mut out = BytesMut::with_capacity(512);
    let mut held = None;
    if mode == PoolMode::Session || pool.params().is_none() {
        held = Some(borrow_unless_paused(app, &pool, borrow_timeout).await?);
    }
    // Startup parameters equal to what every backend logs in with need no replay.
    let login_params = pool.params().unwrap_or_default();
    let wanted: Vec<(String, String)> = message
        .params
        .iter()
        .filter(|(name, value)| !login_params.iter().any(|(n, v)| n == name && v == value))
        .cloned()
        .collect();
    let settings = settings::Settings::from_startup(&wanted).map_err(|e| {
        ErrorReport::fatal(
            sqlstate::INVALID_PARAMETER_VALUE,
            format!("invalid startup packet: {e}"),
        )
    })?;
    let mut reported = Vec::new();
    if !settings.is_empty() {
        // Apply the startup settings as Postgres would at login, once per distinct set of
        // settings in this pool, to learn the values as the server reports them.
        match pool.reported_for(&settings.signature()) {
            Some(values) if held.is_none() => reported = values,
            _ => {
                let mut conn = match held.take() {
                    Some(conn) => conn,
                    None => borrow_unless_paused(app, &pool, borrow_timeout).await?,
                };
                match apply_settings(&mut conn, &settings.replay_sql()).await {
                    Ok(values) => {
                        conn.settings = settings.signature();
                        pool.remember_reported(settings.signature(), values.clone());
                        reported = values;
                        held = Some(conn);
                    }
                    Err(failure) => {
                        pool.discard(conn, "startup_settings_failed");
                        return Err(failure);
                    }
                }
            }
        }
    }
    if mode == PoolMode::Transaction {
        if let Some(conn) = held.take() {
            pool.checkin(conn);
        }
    }
    let params = pool.params().ok_or_else(|| {
        ErrorReport::fatal(
            sqlstate::INTERNAL_ERROR,
            "no backend parameters cached after a login",
        )
    })?;
    for (name, value) in params.iter() {
        let value = reported
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map_or(value.as_str(), |(_, v)| v.as_str());
        backend::parameter_status(&mut out, name, value);
    }
    let cancel = app.cancels.register(info);
    backend::backend_key_data(&mut out, cancel.key());
    backend::ready_for_query(&mut out, backend::IDLE);
    stream.write_all(&out).await.map_err(|_| closed())?;
    stream.flush().await.map_err(|_| closed())?;

    Ok((
        Session {
            app: app.clone(),
            pool,
            cancel,
            mode,
            pinned: None,
            client_walker: FrameWalker::new(),
            statements: Default::default(),
            plan: Default::default(),
            settings,
        },
        held,
    ))
}

/// Borrows a backend once pgwarden is not paused (console PAUSE), both before `deadline`.
pub async fn borrow_unless_paused(
    app: &App,
    pool: &Arc<Pool>,
    timeout: std::time::Duration,
) -> Result<Box<BackendConn>, Failure> {
    // One clock read serves the deadline, the pool's expiry checks and the wait's start.
    let mut started = Instant::now();
    let deadline = started + timeout;
    if app.is_paused() {
        if !app.wait_resumed(deadline).await {
            return Err(Failure::Report(ErrorReport::fatal(
                sqlstate::TOO_MANY_CONNECTIONS,
                "pgwarden is paused (PAUSE on the admin console) and was not resumed within borrow_timeout",
            )));
        }
        // Time paused is not time spent waiting for a backend.
        started = Instant::now();
    }
    pool.borrow(started, deadline)
        .await
        .map_err(Failure::from_borrow)
}

/// Runs `sql` on a backend outside any client's view; returns the ParameterStatus values it
/// reported, or Postgres's error (relayed to the client as Postgres sent it).
async fn apply_settings(
    conn: &mut BackendConn,
    sql: &str,
) -> Result<Vec<(String, String)>, Failure> {
    use tokio::io::AsyncReadExt;
    let lost = || -> Failure {
        ErrorReport::fatal(
            sqlstate::CONNECTION_FAILURE,
            "lost the database connection while applying startup settings",
        )
        .into()
    };
    let mut request = BytesMut::new();
    pgwarden_protocol::frontend::query(&mut request, sql);
    conn.stream.write_all(&request).await.map_err(|_| lost())?;
    let mut reported = Vec::new();
    let mut error = None;
    loop {
        match pgwarden_protocol::frame::take_message(
            &mut conn.read_buf,
            pgwarden_protocol::limits::MAX_INSPECTED_MESSAGE,
        ) {
            Ok(Some((backend::PARAMETER_STATUS, body))) => {
                if let Ok((name, value)) = backend::parse_parameter_status(&body) {
                    reported.push((name.to_owned(), value.to_owned()));
                }
            }
            Ok(Some((backend::ERROR_RESPONSE, body))) => {
                let mut raw = BytesMut::new();
                pgwarden_protocol::frame::write_message(&mut raw, backend::ERROR_RESPONSE, |b| {
                    b.extend_from_slice(&body)
                });
                error = Some(raw.freeze());
            }
            Ok(Some((backend::READY_FOR_QUERY, _))) => break,
            Ok(Some(_)) => {}
            Ok(None) => {
                conn.read_buf.reserve(4096);
                if conn
                    .stream
                    .read_buf(&mut conn.read_buf)
                    .await
                    .map_err(|_| lost())?
                    == 0
                {
                    return Err(lost());
                }
            }
            Err(_) => return Err(lost()),
        }
    }
    match error {
        Some(raw) => Err(Failure::Raw(raw)),
        None => Ok(reported),
    }
}

fn closed() -> Failure {
    ErrorReport::fatal(sqlstate::CONNECTION_FAILURE, "client closed the connection").into()
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use super::*;

    fn future_size_4<A, B, C, D, F: Future>(_: fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    fn future_size_1<A, F: Future>(_: fn(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Until it parks, a client between transactions costs its task: the future `run` (or,
    /// after parking, `resume`) returns, in a cell tokio rounds up to 128 bytes. `run` was
    /// 888 bytes (a 1,024-byte cell) while the relay held its arguments twice, a `select!` of
    /// three futures and the shutdown write; 624 now, in a 768-byte cell, which fits 632.
    #[test]
    fn an_idle_client_task_stays_small() {
        let budget = 632;
        assert!(
            future_size_4(run) <= budget,
            "run: {} bytes",
            future_size_4(run)
        );
        assert!(
            future_size_1(resume) <= budget,
            "resume: {} bytes",
            future_size_1(resume)
        );
    }

    /// Every parked client keeps a `Client` (and a cancel-registry entry): 10,000 idle
    /// Lambda connections cost 10,000 of them. Settings and named statements are boxed on
    /// first use, per-transaction scratch lives with the transaction and metric handles
    /// with the pool, so a client that uses none of them pays little: 424 bytes before
    /// that, 208 now.
    #[test]
    fn a_client_between_transactions_keeps_little_state() {
        let size = std::mem::size_of::<Client>();
        assert!(size <= 208, "Client is {size} bytes");
    }
}
