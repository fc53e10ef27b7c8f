//! The hot path: relaying a client's messages to a backend and the answers back.
//!
//! Bytes are forwarded in bulk, in the buffers they were read into; only message headers
//! are walked, plus the bodies the state machine needs (client: Query, Parse, Terminate;
//! backend: ReadyForQuery, ErrorResponse, CopyInResponse). Each buffer is either being
//! filled or being drained, never both, which gives backpressure in both directions without
//! a proxy-made deadlock: the backend side is always read while the client side waits.

use std::future::{poll_fn, Future};
use std::ops::ControlFlow;
use std::pin::Pin;
use std::task::Poll;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use pgwarden_protocol::backend::{self, ErrorFields, ErrorReport};
use pgwarden_protocol::frame::{FrameWalker, Walk};
use pgwarden_protocol::frontend;
use pgwarden_protocol::{sqlstate, ProtocolError};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::io::poll_read_buf;
use tracing::debug;

use super::{cleanup, Failure, Session};
use crate::backend::BackendConn;
use crate::pinning::{classify_parse, classify_sql, PinReason};

/// Reads are made in pieces of at least this much spare room.
const READ_CHUNK: usize = 16 * 1024;
/// A client buffer above this size stops being read while waiting for a backend.
const MAX_WAITING_BUFFER: usize = 1 << 20;

/// What the backend is doing for the client, derived from the messages seen.
#[derive(Debug, Clone, Copy)]
pub struct TxState {
    /// Query/Sync/FunctionCall messages forwarded and not yet answered by ReadyForQuery.
    pub pending: usize,
    /// Extended-protocol messages forwarded since the last Sync.
    pub unsynced: bool,
    /// Transaction status of the last ReadyForQuery.
    pub status: u8,
    /// The backend is in COPY FROM STDIN, waiting for client data.
    pub copy_in: bool,
    /// An ErrorResponse arrived since the last ReadyForQuery.
    pub error_since_ready: bool,
    /// The backend sent a FATAL error: it is about to close, so nothing more is sent to it.
    pub backend_fatal: bool,
}

impl Default for TxState {
    fn default() -> Self {
        Self {
            pending: 0,
            unsynced: false,
            status: backend::IDLE,
            copy_in: false,
            error_since_ready: false,
            backend_fatal: false,
        }
    }
}

/// Why a relay round ended.
enum End {
    /// The transaction is over and nothing is in flight: the backend may be released.
    Idle,
    /// The client sent Terminate.
    ClientTerminated,
    /// pgwarden is shutting down and the client is between transactions.
    Shutdown,
    /// The client's socket closed or failed.
    ClientGone,
    /// The client sent bytes that are not protocol.
    ClientProtocol(ProtocolError),
    /// The backend's socket closed or failed, it sent a FATAL error, or it sent invalid
    /// protocol. `unsent` leading bytes of the client buffer were walked (and counted as
    /// requests) but never reached it.
    BackendGone { unsent: usize },
}

/// Serves the client until it leaves. `held` is a backend the session already has (session
/// mode); otherwise one is borrowed at the first message of each transaction.
pub async fn serve(
    stream: &mut TcpStream,
    mut cbuf: BytesMut,
    s: &mut Session,
    mut held: Option<BackendConn>,
) {
    loop {
        let mut backend = match held.take() {
            Some(backend) => backend,
            None => {
                if !wait_for_client(stream, &mut cbuf, s).await {
                    return;
                }
                if starts_with_terminate(&cbuf) {
                    return;
                }
                match borrow_watching_client(stream, &mut cbuf, s).await {
                    Some(Ok(backend)) => backend,
                    Some(Err(failure)) => {
                        let mut out = BytesMut::new();
                        failure.encode(&mut out);
                        let _ = stream.write_all(&out).await;
                        return;
                    }
                    None => return,
                }
            }
        };
        s.cancel.attach(backend.addr, backend.key);
        let mut tx = TxState::default();
        let end = relay(stream, &mut cbuf, &mut backend, s, &mut tx).await;
        s.cancel.detach();
        match end {
            End::Idle => s.pool.checkin(backend),
            End::Shutdown => {
                let mut out = BytesMut::new();
                ErrorReport::fatal(
                    sqlstate::ADMIN_SHUTDOWN,
                    "terminating connection because pgwarden is shutting down",
                )
                .encode(&mut out);
                let _ = stream.write_all(&out).await;
                cleanup::release_after_client(s, backend, tx).await;
                return;
            }
            End::ClientTerminated | End::ClientGone => {
                cleanup::release_after_client(s, backend, tx).await;
                return;
            }
            End::ClientProtocol(e) => {
                let mut out = BytesMut::new();
                ErrorReport::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()).encode(&mut out);
                let _ = stream.write_all(&out).await;
                cleanup::release_after_client(s, backend, tx).await;
                return;
            }
            End::BackendGone { unsent } => {
                s.pool.discard(backend, "lost");
                // Requests that never reached the backend are answered with errors below;
                // bytes not yet walked go to the next backend. Postgres ignores stray COPY
                // data, so a COPY the client was feeding fails cleanly.
                cbuf.advance(unsent);
                if report_lost_backend(stream, &tx).await.is_err() {
                    return;
                }
                if !s.client_walker.at_boundary() {
                    // A large message was half relayed: the stream cannot be resumed.
                    let mut out = BytesMut::new();
                    ErrorReport::fatal(
                        sqlstate::CONNECTION_FAILURE,
                        "the database connection was lost in the middle of a message",
                    )
                    .encode(&mut out);
                    let _ = stream.write_all(&out).await;
                    return;
                }
            }
        }
    }
}

/// Waits, holding no backend and (when idle) no buffer memory, until the client sends
/// something. Returns false if the client closed or the proxy is shutting down.
async fn wait_for_client(stream: &mut TcpStream, cbuf: &mut BytesMut, s: &Session) -> bool {
    if !cbuf.is_empty() {
        return true;
    }
    // An idle client keeps no buffer: a frozen Lambda may sit here for minutes.
    *cbuf = BytesMut::new();
    loop {
        tokio::select! {
            ready = stream.readable() => {
                if ready.is_err() {
                    return false;
                }
            }
            () = s.app.shutdown.cancelled() => {
                let mut out = BytesMut::new();
                ErrorReport::fatal(sqlstate::ADMIN_SHUTDOWN, "terminating connection because pgwarden is shutting down")
                    .encode(&mut out);
                let _ = stream.write_all(&out).await;
                return false;
            }
        }
        cbuf.reserve(READ_CHUNK);
        match stream.try_read_buf(cbuf) {
            Ok(0) => return false,
            Ok(_) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return false,
        }
    }
}

fn starts_with_terminate(cbuf: &[u8]) -> bool {
    cbuf.len() >= 5 && cbuf[0] == frontend::TERMINATE
}

/// Borrows a backend while watching the client: a client that disconnects while queued
/// leaves the queue at once. Returns `None` if the client left.
async fn borrow_watching_client(
    stream: &mut TcpStream,
    cbuf: &mut BytesMut,
    s: &Session,
) -> Option<Result<BackendConn, Failure>> {
    let deadline = Instant::now() + s.target.config.borrow_timeout;
    let borrow = s.pool.borrow(deadline);
    tokio::pin!(borrow);
    loop {
        tokio::select! {
            result = &mut borrow => return Some(result.map_err(Failure::from_borrow)),
            ready = stream.readable(), if cbuf.len() < MAX_WAITING_BUFFER => {
                if ready.is_err() {
                    return None;
                }
                cbuf.reserve(READ_CHUNK);
                match stream.try_read_buf(cbuf) {
                    Ok(0) => return None,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return None,
                }
            }
        }
    }
}

/// I/O completed by one poll of the relay.
enum Event {
    FromClient(std::io::Result<usize>),
    ToBackend(std::io::Result<usize>),
    FromBackend(std::io::Result<usize>),
    /// Shutdown began; noticed once.
    Shutdown,
    ToClient(std::io::Result<usize>),
}

async fn relay(
    stream: &mut TcpStream,
    cbuf: &mut BytesMut,
    backend: &mut BackendConn,
    s: &mut Session,
    tx: &mut TxState,
) -> End {
    let (mut client_rd, mut client_wr) = stream.split();
    let (mut backend_rd, mut backend_wr) = backend.stream.split();
    let bbuf = &mut backend.read_buf;
    let mut backend_walker = FrameWalker::new();
    // Leading bytes of each buffer that are walked and ready to be written out.
    let mut c_ready = 0;
    let mut b_ready = 0;
    let mut terminating = false;
    // Session-mode and pinned clients wait here between transactions, so shutdown must be
    // noticed here too, not only while waiting without a backend.
    let shutdown = s.app.shutdown.clone();
    let shutdown_signal = shutdown.cancelled();
    tokio::pin!(shutdown_signal);
    let mut shutdown_seen = false;
    loop {
        if !terminating && !tx.backend_fatal {
            match walk_client(s, tx, &cbuf[c_ready..]) {
                Ok((n, stopped)) => {
                    c_ready += n;
                    terminating = stopped;
                }
                Err(e) => return End::ClientProtocol(e),
            }
        }
        match walk_backend(&mut backend_walker, tx, &bbuf[b_ready..]) {
            Ok(n) => b_ready += n,
            Err(e) => {
                debug!(error = %e, "backend sent invalid protocol");
                return End::BackendGone { unsent: c_ready };
            }
        }
        if tx.backend_fatal && b_ready == 0 {
            // The FATAL error has reached the client; whatever the client sends next goes
            // to another backend instead of this dying one.
            return End::BackendGone { unsent: c_ready };
        }
        let quiet =
            bbuf.is_empty() && backend_walker.at_boundary() && s.client_walker.at_boundary();
        if terminating && c_ready == 0 && quiet {
            return End::ClientTerminated;
        }
        // Session mode and pinned clients keep their backend: for them the relay only ends
        // when one side goes away.
        if s.releases_per_transaction()
            && cbuf.is_empty()
            && quiet
            && tx.pending == 0
            && !tx.unsynced
            && tx.status == backend::IDLE
        {
            return End::Idle;
        }

        if shutdown_seen
            && cbuf.is_empty()
            && quiet
            && tx.pending == 0
            && !tx.unsynced
            && tx.status == backend::IDLE
        {
            return End::Shutdown;
        }

        let backend_fatal = tx.backend_fatal;
        let event = poll_fn(|cx| {
            if backend_fatal {
                // Neither read from the client nor write to the dying backend.
            } else if c_ready > 0 {
                if let Poll::Ready(r) = Pin::new(&mut backend_wr).poll_write(cx, &cbuf[..c_ready]) {
                    return Poll::Ready(Event::ToBackend(r));
                }
            } else if !terminating {
                if cbuf.capacity() - cbuf.len() < READ_CHUNK / 4 {
                    cbuf.reserve(READ_CHUNK);
                }
                if let Poll::Ready(r) = poll_read_buf(Pin::new(&mut client_rd), cx, cbuf) {
                    return Poll::Ready(Event::FromClient(r));
                }
            }
            if b_ready > 0 {
                if let Poll::Ready(r) = Pin::new(&mut client_wr).poll_write(cx, &bbuf[..b_ready]) {
                    return Poll::Ready(Event::ToClient(r));
                }
            } else {
                if bbuf.capacity() - bbuf.len() < READ_CHUNK / 4 {
                    bbuf.reserve(READ_CHUNK);
                }
                if let Poll::Ready(r) = poll_read_buf(Pin::new(&mut backend_rd), cx, bbuf) {
                    return Poll::Ready(Event::FromBackend(r));
                }
            }
            if !shutdown_seen && shutdown_signal.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Shutdown);
            }
            Poll::Pending
        })
        .await;

        match event {
            Event::FromClient(Ok(0) | Err(_)) | Event::ToClient(Ok(0) | Err(_)) => {
                return End::ClientGone
            }
            Event::FromBackend(Ok(0) | Err(_)) | Event::ToBackend(Ok(0) | Err(_)) => {
                return End::BackendGone { unsent: c_ready }
            }
            Event::FromClient(Ok(_)) | Event::FromBackend(Ok(_)) => {}
            Event::Shutdown => shutdown_seen = true,
            Event::ToBackend(Ok(n)) => {
                cbuf.advance(n);
                c_ready -= n;
            }
            Event::ToClient(Ok(n)) => {
                bbuf.advance(n);
                b_ready -= n;
            }
        }
    }
}

/// Walks new client bytes: counts requests, spots Terminate and state that pins.
fn walk_client(
    s: &mut Session,
    tx: &mut TxState,
    bytes: &[u8],
) -> Result<(usize, bool), ProtocolError> {
    let watch_pins = s.releases_per_transaction();
    let mut pin = None;
    let mut walker = std::mem::take(&mut s.client_walker);
    let result = walker.walk(
        bytes,
        |tag| {
            tag == frontend::TERMINATE
                || (watch_pins && (tag == frontend::QUERY || tag == frontend::PARSE))
        },
        |w| {
            let tag = match w {
                Walk::Inspect(m) => m.tag,
                Walk::Pass { tag, .. } => tag,
            };
            match tag {
                frontend::TERMINATE => return ControlFlow::Break(()),
                frontend::SYNC => {
                    tx.pending += 1;
                    tx.unsynced = false;
                    s.queries.inc();
                }
                frontend::QUERY | frontend::FUNCTION_CALL => {
                    tx.pending += 1;
                    s.queries.inc();
                }
                frontend::COPY_DATA => {}
                frontend::COPY_DONE | frontend::COPY_FAIL => tx.copy_in = false,
                _ => tx.unsynced = true,
            }
            if watch_pins && pin.is_none() {
                pin = match w {
                    Walk::Inspect(m) if m.tag == frontend::QUERY => frontend::parse_query(m.body)
                        .map_or(Some(PinReason::Uninspected), classify_sql),
                    Walk::Inspect(m) if m.tag == frontend::PARSE => parse_pin(m.body),
                    Walk::Pass {
                        tag: frontend::QUERY | frontend::PARSE,
                        ..
                    } => Some(PinReason::Uninspected),
                    _ => None,
                };
            }
            ControlFlow::Continue(())
        },
    );
    s.client_walker = walker;
    if let Some(reason) = pin {
        s.pin(reason);
    }
    result
}

fn parse_pin(mut body: &[u8]) -> Option<PinReason> {
    let Ok(name) = pgwarden_protocol::frame::read_cstr(&mut body) else {
        return Some(PinReason::Uninspected);
    };
    classify_parse(name).or_else(|| {
        pgwarden_protocol::frame::read_cstr(&mut body)
            .map_or(Some(PinReason::Uninspected), classify_sql)
    })
}

/// Walks new backend bytes: ReadyForQuery ends requests, errors and COPY change the state.
fn walk_backend(
    walker: &mut FrameWalker,
    tx: &mut TxState,
    bytes: &[u8],
) -> Result<usize, ProtocolError> {
    let mut bad = None;
    let (n, _) = walker.walk(
        bytes,
        |tag| matches!(tag, backend::READY_FOR_QUERY | backend::ERROR_RESPONSE),
        |w| {
            match w {
                Walk::Inspect(m) if m.tag == backend::READY_FOR_QUERY => {
                    match backend::parse_ready_for_query(m.body) {
                        Ok(status) => tx.status = status,
                        Err(e) => bad = Some(e),
                    }
                    tx.pending = tx.pending.saturating_sub(1);
                    tx.copy_in = false;
                    tx.error_since_ready = false;
                }
                Walk::Inspect(m) => {
                    tx.error_since_ready = true;
                    tx.copy_in = false;
                    if let Ok(fields) = ErrorFields::parse(m.body) {
                        if fields.is_fatal() {
                            tx.backend_fatal = true;
                            debug!(code = %fields.code, "backend reported a fatal error");
                        }
                    }
                }
                // CopyInResponse / CopyBothResponse: the backend now waits for client data.
                Walk::Pass {
                    tag: b'G' | b'W', ..
                } => tx.copy_in = true,
                Walk::Pass { .. } => {}
            }
            ControlFlow::Continue(())
        },
    )?;
    match bad {
        Some(e) => Err(e),
        None => Ok(n),
    }
}

/// Tells a client whose backend vanished what Postgres would have: an error for each
/// request still unanswered (the first one may already have the server's own error, such
/// as 57P01 from `pg_terminate_backend`) and a ReadyForQuery for each, so its session can go
/// on. No request is ever answered with a success it did not have.
async fn report_lost_backend<W: AsyncWrite + Unpin>(
    client: &mut W,
    tx: &TxState,
) -> std::io::Result<()> {
    if tx.pending == 0 {
        return Ok(());
    }
    let mut out = BytesMut::new();
    for i in 0..tx.pending {
        if i > 0 || !tx.error_since_ready {
            ErrorReport::error(
                sqlstate::CONNECTION_FAILURE,
                "the database connection serving this transaction was lost; the transaction was rolled back",
            )
            .encode(&mut out);
        }
        backend::ready_for_query(&mut out, backend::IDLE);
    }
    client.write_all(&out).await
}
