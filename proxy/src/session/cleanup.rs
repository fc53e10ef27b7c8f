//! Giving a backend back after its client left. The backend must be clean before another
//! client gets it: transaction rolled back (its locks released), and after a pinned or
//! session-mode client the reset query run. A backend still busy with the departed
//! client's query is cancelled and closed: reusing it would race with that cancel.

use std::time::Duration;

use bytes::BytesMut;
use pgwarden_protocol::backend::{self, READY_FOR_QUERY};
use pgwarden_protocol::frame::take_message;
use pgwarden_protocol::frontend;
use pgwarden_protocol::limits::MAX_INSPECTED_MESSAGE;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;

use super::relay::TxState;
use super::Session;
use crate::backend::BackendConn;
use crate::config::PoolMode;

/// Longest a reset may take before the backend is closed instead.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn release_after_client(s: &Session, mut backend: Box<BackendConn>, tx: TxState) {
    if tx.pending > 0 || tx.copy_in {
        if tx.pending > 0 {
            crate::cancel::forward_with_timeout(backend.addr, backend.key).await;
        }
        s.pool.discard(backend, "client_gone_busy");
        return;
    }
    let rollback = tx.status != backend::IDLE || tx.unsynced;
    let reset_query = s.target().config().reset_query.clone();
    let reset = (s.pinned.is_some() || s.mode == PoolMode::Session)
        .then_some(reset_query.as_str())
        .filter(|q| !q.is_empty());
    if !rollback && reset.is_none() {
        s.pool.checkin(backend);
        return;
    }
    match tokio::time::timeout(
        RESET_TIMEOUT,
        run_reset(&mut backend, tx.unsynced, rollback, reset),
    )
    .await
    {
        Ok(Ok(())) => {
            if reset.is_some() {
                // DISCARD ALL (the default reset) deallocated every statement and reset
                // every setting.
                backend.statements.clear();
                backend.settings = super::settings::defaults();
            }
            s.pool.checkin(backend)
        }
        Ok(Err(e)) => {
            debug!(error = %e, "backend reset failed");
            s.pool.discard(backend, "reset_failed");
        }
        Err(_) => s.pool.discard(backend, "reset_timeout"),
    }
}

/// Sends Sync / ROLLBACK / the reset query as needed and waits until the backend is idle
/// with no error.
async fn run_reset(
    backend: &mut BackendConn,
    unsynced: bool,
    rollback: bool,
    reset: Option<&str>,
) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    let mut expected = 0;
    if unsynced {
        frontend::sync(&mut out);
        expected += 1;
    }
    if rollback {
        frontend::query(&mut out, "ROLLBACK");
        expected += 1;
    }
    if let Some(sql) = reset {
        frontend::query(&mut out, sql);
        expected += 1;
    }
    backend.stream.write_all(&out).await?;
    let buf = &mut backend.read_buf;
    let mut status = backend::IDLE;
    let mut failed = false;
    // An error answering the client's own unsynced messages is expected; ours are not.
    let mut skip_errors = unsynced;
    while expected > 0 {
        match take_message(buf, MAX_INSPECTED_MESSAGE) {
            Ok(Some((READY_FOR_QUERY, body))) => {
                expected -= 1;
                status = body.first().copied().unwrap_or(0);
                skip_errors = false;
            }
            Ok(Some((backend::ERROR_RESPONSE, _))) if !skip_errors => failed = true,
            Ok(Some(_)) => {}
            Ok(None) => {
                if backend.stream.read_buf(buf).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
            Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        }
    }
    if failed || status != backend::IDLE {
        return Err(std::io::Error::other("backend not idle after reset"));
    }
    Ok(())
}
