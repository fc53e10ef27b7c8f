//! The listener: accepts clients under `max_client_connections`, spawns one session task
//! each, runs pool maintenance, and drains on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use pgwarden_protocol::backend::ErrorReport;
use pgwarden_protocol::sqlstate;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin;
use crate::app::App;
use crate::config::Config;
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
        raise_fd_limit(&config);
        let listen_addr = config.server.listen;
        let admin_addr = config.server.admin_listen;
        let app = App::new(config).await?;
        let listener = listen(listen_addr, app.config.server.listen_backlog)
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
    /// sessions to finish.
    pub async fn run(self) {
        let app = self.app;
        for target in &app.targets {
            let target = target.clone();
            let shutdown = app.shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(MAINTENANCE_INTERVAL);
                loop {
                    tokio::select! {
                        _ = tick.tick() => target.maintain(),
                        () = shutdown.cancelled() => return,
                    }
                }
            });
        }
        for target in &app.targets {
            let target = target.clone();
            let shutdown = app.shutdown.clone();
            tokio::spawn(async move {
                crate::credentials::keep_fresh(&target.credentials, shutdown).await;
            });
        }
        if app.tls.is_some() {
            tokio::spawn(reload_tls_on_sighup(app.clone()));
        }
        info!(listen = %self.listen, admin = %self.admin, "pgwarden is serving");
        let sessions = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(app.config.server.max_client_connections));
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
            match slots.clone().try_acquire_owned() {
                Ok(permit) => {
                    let app = app.clone();
                    sessions.spawn(async move {
                        session::run(app, stream, peer).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    app.metrics
                        .client_setups
                        .with_label_values(&["refused"])
                        .inc();
                    tokio::spawn(refuse(stream));
                }
            }
        }
        drop(self.listener);
        sessions.close();
        info!(
            sessions = sessions.len(),
            "shutting down: waiting for sessions to finish"
        );
        if tokio::time::timeout(app.config.server.shutdown_timeout, sessions.wait())
            .await
            .is_err()
        {
            warn!(
                sessions = sessions.len(),
                "shutdown timeout: closing remaining sessions"
            );
        }
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

async fn refuse(mut stream: TcpStream) {
    let mut out = BytesMut::new();
    ErrorReport::fatal(
        sqlstate::TOO_MANY_CONNECTIONS,
        "sorry, too many clients already",
    )
    .with_hint("pgwarden's max_client_connections is reached")
    .encode(&mut out);
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

/// Reloads the client TLS certificate and key on SIGHUP; a bad file keeps the old ones.
async fn reload_tls_on_sighup(app: Arc<App>) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        warn!("cannot listen for SIGHUP: TLS certificates will not be reloaded");
        return;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {}
            () = app.shutdown.cancelled() => return,
        }
        if let Some(tls) = &app.tls {
            match tls.reload() {
                Ok(()) => info!("TLS certificate reloaded"),
                Err(e) => {
                    warn!(error = %e, "TLS certificate reload failed; keeping the previous one")
                }
            }
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
