//! The listener: accepts clients under `max_client_connections` and gives each to a serving
//! thread (`placement.rs`) as a session task; pool maintenance; the drain on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use pgwarden_protocol::backend::ErrorReport;
use pgwarden_protocol::sqlstate;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::admin;
use crate::app::App;
use crate::config::Config;
use crate::placement::{Arrival, ServingThread, Threads};
use crate::runtime;
use crate::session;

/// How often pools close idle or old connections and top up `min_idle`.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(1);

/// A started pgwarden: its bound addresses and the shared state.
pub struct Server {
    pub app: Arc<App>,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    listener: TcpListener,
}

impl Server {
    /// Builds the shared state and binds both listeners (so port 0 works and errors surface
    /// before anything is served).
    pub async fn bind(config: Config) -> anyhow::Result<Self> {
        Self::bind_with_file(config, None).await
    }

    /// Like [`Server::bind`], remembering the file SIGHUP and RELOAD read again.
    pub async fn bind_with_file(
        config: Config,
        path: Option<std::path::PathBuf>,
    ) -> anyhow::Result<Self> {
        raise_fd_limit(&config);
        let listen_addr = config.server.listen;
        let admin_addr = config.server.admin_listen;
        let app = match path {
            Some(path) => App::from_file(config, path).await?,
            None => App::new(config).await?,
        };
        let listener = listen(listen_addr, app.live().config.server.listen_backlog)
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen_addr}: {e}"))?;
        let admin_listener = TcpListener::bind(admin_addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {admin_addr} (admin): {e}"))?;
        let admin = admin_listener.local_addr()?;
        tokio::spawn(admin::serve(app.clone(), admin_listener));
        Ok(Self {
            listen: listener.local_addr()?,
            admin,
            app,
            listener,
        })
    }

    /// Serves until `app.shutdown` is cancelled, then waits up to `shutdown_timeout` for
    /// sessions to finish. New clients arriving meanwhile get SQLSTATE 57P03.
    pub async fn run(self) {
        let app = self.app;
        tokio::spawn(maintain(app.clone()));
        for target in &app.live().targets {
            crate::app::spawn_credential_refresh(target);
        }
        tokio::spawn(reload_on_sighup(app.clone()));
        // Told to the worker threads once the drain is over: they then end.
        let stop = tokio_util::sync::CancellationToken::new();
        let (workers, threads) = start_serving_threads(&app, &stop);
        info!(listen = %self.listen, admin = %self.admin, worker_threads = workers.len() + 1, "pgwarden is serving");
        let sessions = TaskTracker::new();
        loop {
            let (stream, peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Usually EMFILE: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = app.shutdown.cancelled() => break,
            };
            let Ok(slot) = app.client_slots.clone().try_acquire_owned() else {
                app.metrics
                    .client_setups
                    .with_label_values(&["refused"])
                    .inc();
                tokio::spawn(refuse(
                    stream,
                    ErrorReport::fatal(
                        sqlstate::TOO_MANY_CONNECTIONS,
                        "sorry, too many clients already",
                    )
                    .with_hint("pgwarden's max_client_connections is reached"),
                ));
                continue;
            };
            let admission = session::Admission {
                slot,
                tracked: sessions.token(),
            };
            let thread = threads.choose(Arrival::New);
            if thread == 0 {
                tokio::spawn(session::run(app.clone(), stream, peer, admission));
                continue;
            }
            // The socket leaves this thread's reactor for its worker's. The task is made
            // here, so its memory comes from this thread's heap: freed when the client
            // parks, it leaves no holes between the parked clients' state, which the
            // worker allocates (single-round idle-fleet, 10,000 parked clients with a
            // 424-byte `Client`: 1.15 KiB each, against 1.35 when the worker made the task).
            match stream.into_std() {
                Ok(socket) => {
                    threads
                        .handle(thread)
                        .spawn(serve_moved(app.clone(), socket, peer, admission));
                }
                Err(e) => client_lost_in_hand_off(&app, &e),
            }
        }
        sessions.close();
        // Parked clients wake, find pgwarden shutting down, and are told so.
        app.parking.close();
        info!(
            sessions = sessions.len(),
            "shutting down: waiting for sessions to finish"
        );
        // Until the process exits, a client that still reaches this instance (the load
        // balancer has not noticed yet) learns why instead of hanging or being reset.
        let refusing = tokio::spawn(refuse_while_draining(app.clone(), self.listener));
        let drain_timeout = app.live().config.server.shutdown_timeout;
        if tokio::time::timeout(drain_timeout, sessions.wait())
            .await
            .is_err()
        {
            warn!(
                sessions = sessions.len(),
                "shutdown timeout: closing remaining sessions"
            );
        }
        refusing.abort();
        stop.cancel();
        let threads: Vec<_> = workers.into_iter().map(|w| w.thread).collect();
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

/// The threads clients are served on: this one and `worker_threads - 1` more. Woken
/// parked clients are placed by the same rule as new ones.
fn start_serving_threads(
    app: &Arc<App>,
    stop: &tokio_util::sync::CancellationToken,
) -> (Vec<runtime::Worker>, Arc<Threads>) {
    let config = &app.live().config.server;
    let count = runtime::worker_count(config.worker_threads);
    let mut workers = Vec::new();
    for _ in 1..count {
        let stop = stop.clone();
        // Numbered by position, so a thread that failed to start leaves no gap between the
        // serving threads' indices and the placement's.
        let index = workers.len() + 1;
        match runtime::start_worker(index, async move { stop.cancelled().await }) {
            Ok(worker) => workers.push(worker),
            Err(e) => error!(error = %e, "a worker thread could not start"),
        }
    }
    let this_thread = ServingThread {
        handle: tokio::runtime::Handle::current(),
        cpu_clock: runtime::CpuClock::of_this_thread(),
    };
    let serving = std::iter::once(this_thread)
        .chain(workers.iter().map(|w| ServingThread {
            handle: w.handle.clone(),
            cpu_clock: w.cpu_clock.clone(),
        }))
        .collect();
    let threads = Arc::new(Threads::new(
        serving,
        config.thread_busy_limit,
        &app.metrics,
    ));
    tokio::spawn(threads.clone().measure(stop.clone()));
    app.parking.resume_on(threads.clone());
    (workers, threads)
}

/// A client's session on the worker thread it was handed to.
async fn serve_moved(
    app: Arc<App>,
    socket: std::net::TcpStream,
    peer: SocketAddr,
    admission: session::Admission,
) {
    match TcpStream::from_std(socket) {
        Ok(stream) => session::run(app, stream, peer, admission).await,
        Err(e) => client_lost_in_hand_off(&app, &e),
    }
}

/// A new client whose socket could not move to its worker's reactor: it is closed.
fn client_lost_in_hand_off(app: &App, error: &std::io::Error) {
    app.metrics
        .client_setups
        .with_label_values(&["failed"])
        .inc();
    warn!(error = %error, "a new client could not be handed to a worker thread: closed");
}

/// Pool and quota upkeep, every [`MAINTENANCE_INTERVAL`], over the targets in force.
async fn maintain(app: Arc<App>) {
    let mut tick = tokio::time::interval(MAINTENANCE_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = app.shutdown.cancelled() => return,
        }
        app.maintain();
        for target in &app.live().targets {
            target.maintain();
        }
    }
}

/// Answers every new connection with FATAL 57P03 during the drain.
async fn refuse_while_draining(app: Arc<App>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        app.metrics
            .client_setups
            .with_label_values(&["refused"])
            .inc();
        let app = app.clone();
        tokio::spawn(async move {
            let report =
                ErrorReport::fatal(sqlstate::CANNOT_CONNECT_NOW, "pgwarden is shutting down")
                    .with_hint("connect again: another instance will serve you");
            session::refuse_after_startup(&app, stream, report).await;
        });
    }
}

/// A listener with an explicit backlog (`TcpListener::bind` uses 128, which a burst of
/// Lambda invocations overflows).
fn listen(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

async fn refuse(mut stream: TcpStream, report: ErrorReport) {
    let mut out = BytesMut::new();
    report.encode(&mut out);
    let _ = stream.write_all(&out).await;
}

/// Every client is a file descriptor: raise the soft limit to the hard one and warn when
/// the configuration cannot fit under it.
fn raise_fd_limit(config: &Config) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            let backends: usize = config
                .targets
                .iter()
                .map(|t| t.max_backend_connections)
                .sum();
            let needed = (config.server.max_client_connections + backends + 64) as u64;
            if needed > limit {
                warn!(
                    limit,
                    needed,
                    "open-file limit is below max_client_connections plus backend connections"
                );
            } else {
                info!(limit, "open-file limit");
            }
        }
        Err(e) => warn!(error = %e, "could not raise the open-file limit"),
    }
}

/// Reloads the configuration file on SIGHUP; a file that does not validate changes nothing.
async fn reload_on_sighup(app: Arc<App>) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        warn!("cannot listen for SIGHUP: the configuration will not be reloaded");
        return;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {}
            () = app.shutdown.cancelled() => return,
        }
        info!("SIGHUP: reloading the configuration");
        report_reload(app.reload_file().await);
    }
}

/// Logs the outcome of a reload, one line per note.
pub fn report_reload(outcome: Result<Vec<String>, crate::app::ReloadError>) {
    match outcome {
        Ok(notes) => {
            for note in notes {
                warn!(note = %note, "reload: setting kept");
            }
            info!("configuration reloaded");
        }
        Err(e) => {
            warn!(error = %e, "configuration reload refused; the previous configuration stays in force")
        }
    }
}

/// Resolves when the process gets SIGINT or SIGTERM.
pub async fn termination_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
