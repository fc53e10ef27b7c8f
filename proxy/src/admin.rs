//! The admin HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (process alive),
//! `/readyz` (ready to serve clients; degraded states are named in the body).

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;

use crate::app::App;

/// Serves until the process exits: during the drain `/readyz` answers 503 and `/metrics`
/// shows the drain.
pub async fn serve(app: Arc<App>, listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let app = app.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(route(&app, &req)) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %e, "admin connection failed");
            }
        });
    }
}

fn route(app: &App, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match req.uri().path() {
        "/metrics" => {
            refresh_pool_gauges(app);
            (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                app.metrics.render(),
            )
        }
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/readyz" => {
            let (ready, body) = readiness(app);
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, "text/plain", body)
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// Sets the per-pool gauges from the pools as they are now. Only pools that logged in at
/// least once are shown (a made-up database name never becomes a series), and pools that
/// are gone drop out, so the series stay as many as the pools in use.
fn refresh_pool_gauges(app: &App) {
    let m = &app.metrics;
    m.pool_backends.reset();
    m.pool_clients.reset();
    m.pool_clients_waiting.reset();
    let clients = app.cancels.clients_by_pool();
    for target in &app.live().targets {
        for pool in target.pools() {
            if pool.params().is_none() {
                continue;
            }
            let stats = pool.stats();
            let (t, d, u) = (
                target.name(),
                pool.key.database.as_str(),
                pool.key.user.as_str(),
            );
            m.pool_backends
                .with_label_values(&[t, d, u, "idle"])
                .set(stats.idle as i64);
            m.pool_backends
                .with_label_values(&[t, d, u, "busy"])
                .set((stats.open - stats.idle) as i64);
            let connected = clients
                .get(&crate::cancel::pool_id(&pool))
                .map_or(0, |c| c.connected);
            m.pool_clients
                .with_label_values(&[t, d, u])
                .set(connected as i64);
            m.pool_clients_waiting
                .with_label_values(&[t, d, u])
                .set(stats.waiting as i64);
        }
    }
}

/// Ready unless shutting down or a target has no database login at all. Serving with
/// cached credentials while Secrets Manager fails (fail-static) is ready but degraded: a
/// probe that pulled the instance would turn an AWS outage into a database outage.
fn readiness(app: &App) -> (bool, String) {
    if app.shutdown.is_cancelled() {
        return (false, "not ready: shutting down\n".to_owned());
    }
    let mut problems = Vec::new();
    let mut degraded = Vec::new();
    for target in &app.live().targets {
        if !target.credentials.usable() {
            problems.push(format!(
                "target {:?}: no database login could be read from Secrets Manager",
                target.name()
            ));
        } else if !target.is_available() {
            problems.push(format!(
                "target {:?}: the last backend login failed; retrying",
                target.name()
            ));
        } else if target.credentials.stale() {
            degraded.push(format!(
                "target {:?}: refreshing credentials fails; serving with the last good ones",
                target.name()
            ));
        }
    }
    let mut body = String::new();
    let ready = problems.is_empty();
    body.push_str(match (ready, degraded.is_empty()) {
        (false, _) => "not ready\n",
        (true, true) => "ready\n",
        (true, false) => "ready, degraded\n",
    });
    for line in problems.iter().chain(&degraded) {
        body.push_str(line);
        body.push('\n');
    }
    (ready, body)
}

/// Time limit of one health check, connection included.
const HEALTHCHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// `GET path` on the admin endpoint at `address`; Ok on 200, else an error with the status
/// line and body (what `pgwarden healthcheck` prints).
pub async fn healthcheck(address: std::net::SocketAddr, path: &str) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        // Bounded: the admin endpoint's answers are a few lines.
        (&mut stream)
            .take(64 * 1024)
            .read_to_end(&mut response)
            .await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(HEALTHCHECK_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("{address}{path}: no answer within {HEALTHCHECK_TIMEOUT:?}"))?
        .map_err(|e| anyhow::anyhow!("{address}{path}: {e}"))?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) == Some("200") {
        print!("{body}");
        Ok(())
    } else {
        anyhow::bail!("{address}{path}: {status}: {}", body.trim())
    }
}
