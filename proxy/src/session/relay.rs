//! The hot path: a client's life between transactions (waiting without a backend, borrowing
//! one, answering what needs none) and the I/O loop that moves bytes both ways while a
//! backend is held.
//!
//! What happens to each message is `messages.rs`'s job; this loop only reads into the read
//! buffers, writes out the outgoing ones, and decides when a round ends. A side is not read
//! while its outgoing buffer is over a high-water mark (backpressure both ways), and the
//! backend is always read while the client writes, so neither side can deadlock the other.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Sleep;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::stream::ClientStream;
use bytes::{Buf, BytesMut};
use pgwarden_protocol::backend::{self, ErrorReport};
use pgwarden_protocol::frame::FrameWalker;
use pgwarden_protocol::frontend;
use pgwarden_protocol::{sqlstate, ProtocolError};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::io::poll_read_buf;
use tracing::{debug, info};

pub use super::messages::TxState;
use super::messages::{answer_without_backend, process_backend, process_client, BackendSide};
use super::plan::Expect;
use super::{cleanup, Client, Failure, Session};
use crate::backend::BackendConn;
use crate::pinning::PinReason;

/// When a buffer has less spare room than `MIN_SPARE`, it grows by this much.
const READ_CHUNK: usize = 16 * 1024;
/// Reads are made with at least this much spare room.
const MIN_SPARE: usize = 256;
/// The buffer an idle client gets back when it speaks again: small enough for the
/// allocator's per-thread cache (one allocation per transaction, kept cheap), large enough
/// for a typical query; it grows when a message needs more.
const FIRST_READ: usize = 1000;
/// A client buffer above this size stops being read while waiting for a backend.
const MAX_WAITING_BUFFER: usize = 1 << 20;

/// Why a relay round ended.
#[derive(Debug)]
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
    /// protocol. Requests it never answered are reported to the client as failed.
    BackendGone,
}

/// Serves the client until it leaves or parks. `held` is a backend the session already has
/// (session mode); otherwise one is borrowed at the first message of each transaction.
///
/// This future is what a client between transactions costs, so it stays small: the
/// transaction's state is boxed and freed when the transaction ends.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would hold its arguments twice; see the comment inside"
)]
pub fn serve(
    mut client: Box<Client>,
    mut cbuf: BytesMut,
    held: Option<Box<BackendConn>>,
) -> impl Future<Output = Option<Departure>> {
    // An `async` block, not an `async fn`: the arguments are its captures, held once.
    // An `async fn` keeps a copy of each argument it moved into a local, for its whole life.
    async move {
        if held.is_some() && Box::pin(transaction(&mut client, &mut cbuf, held)).await == Next::Stop
        {
            return Some(Departure::of(&client));
        }
        let mut may_park = true;
        // One timer for every wait: pushing its deadline later is a store, not a trip to the
        // timer wheel (it fires at the old deadline at most once and re-arms itself).
        let park_timer = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(park_timer);
        // Likewise one watch for shutdown, made at the first wait.
        let mut shutdown = None;
        loop {
            let timer = may_park.then_some(park_timer.as_mut());
            match wait_for_client(&mut client, &mut cbuf, timer, &mut shutdown).await {
                Wait::Ready => {}
                Wait::Closed => break,
                Wait::Park => {
                    client.session.release_scratch();
                    let app = client.session.app.clone();
                    match app.parking.park(client) {
                        Ok(()) => return None,
                        Err(back) => {
                            // Shutting down, or the socket would not move: wait here instead.
                            client = back;
                            may_park = false;
                            continue;
                        }
                    }
                }
            }
            if Box::pin(transaction(&mut client, &mut cbuf, None)).await == Next::Stop {
                break;
            }
            if cbuf.is_empty() {
                match move_off_busy_thread(client) {
                    Ok(()) => return None,
                    Err(stays) => client = stays,
                }
            }
        }
        Some(Departure::of(&client))
    }
}

/// Between transactions, with nothing buffered: moves the client to another serving
/// thread if its own is over `thread_busy_limit` (`placement.rs`), the way a woken parked
/// client is taken up. Gives it back when it stays (or when its socket could not leave this
/// thread's reactor: if that lost the socket, the next read fails and the client is closed).
fn move_off_busy_thread(mut client: Box<Client>) -> Result<(), Box<Client>> {
    let here = crate::runtime::current_worker();
    let Some(runtime) = client.session.app.parking.threads().and_then(|threads| {
        let to = threads.move_from(here)?;
        Some(threads.handle(to).clone())
    }) else {
        return Err(client);
    };
    if let Err(e) = client.stream.socket_mut().park() {
        debug!(error = %e, "could not move a client to another thread");
        return Err(client);
    }
    runtime.spawn(super::resume(client));
    Ok(())
}

/// A client that left (not one that parked or moved: another task serves those), for its
/// last log line.
pub struct Departure {
    connected_for: Duration,
    pinned: Option<PinReason>,
}

impl Departure {
    fn of(client: &Client) -> Self {
        Self {
            connected_for: client
                .session
                .cancel
                .info()
                .connected
                .elapsed()
                .unwrap_or_default(),
            pinned: client.session.pinned,
        }
    }

    /// Written under the client's span, which serving may not have entered.
    pub fn log(&self, span: &tracing::Span) {
        info!(
            parent: span,
            duration_ms = self.connected_for.as_millis() as u64,
            pinned = self.pinned.map(|p| p.as_str()),
            "client disconnected"
        );
    }
}

/// Whether the client goes on after a transaction.
#[derive(PartialEq, Eq)]
enum Next {
    Continue,
    Stop,
}

/// One transaction (or, in session mode and when pinned, the rest of the session): borrows
/// a backend unless `held` is one, relays until the backend can be released, releases it.
async fn transaction(
    client: &mut Client,
    cbuf: &mut BytesMut,
    held: Option<Box<BackendConn>>,
) -> Next {
    let Client {
        stream, session: s, ..
    } = client;
    let mut backend = match held {
        Some(backend) => backend,
        None => {
            if starts_with_terminate(cbuf) {
                return Next::Stop;
            }
            if let Some(answer) = answer_without_backend(s, cbuf) {
                return match send(stream, &answer).await {
                    Ok(()) => Next::Continue,
                    Err(_) => Next::Stop,
                };
            }
            match borrow_watching_client(stream, cbuf, s).await {
                Some(Ok(backend)) => backend,
                Some(Err(failure)) => {
                    send_failure(stream, &failure).await;
                    return Next::Stop;
                }
                None => return Next::Stop,
            }
        }
    };
    s.cancel.attach(backend.addr, backend.key);
    let mut tx = TxState::default();
    let end = relay(stream, cbuf, &mut backend, s, &mut tx).await;
    s.cancel.detach();
    if tx.status != backend::IDLE {
        // Counted in by the ReadyForQuery that opened the block; the round ends inside
        // it (the client left or the backend was lost), so the cleanup ends it.
        s.pool.in_transaction.dec();
    }
    if !matches!(end, End::Idle) {
        debug!(end = ?end, tx = ?tx, "relay round ended");
    }
    match end {
        End::Idle => {
            s.pool.checkin(backend);
            Next::Continue
        }
        End::Shutdown => {
            send_failure(stream, &shutting_down()).await;
            Box::pin(cleanup::release_after_client(s, backend, tx)).await;
            Next::Stop
        }
        End::ClientTerminated | End::ClientGone => {
            Box::pin(cleanup::release_after_client(s, backend, tx)).await;
            Next::Stop
        }
        End::ClientProtocol(e) => {
            let report = ErrorReport::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string());
            send_failure(stream, &report.into()).await;
            Box::pin(cleanup::release_after_client(s, backend, tx)).await;
            Next::Stop
        }
        End::BackendGone => {
            s.plan.clear();
            s.pool.discard(backend, "lost");
            // Requests that never got an answer are answered with errors below; bytes
            // not yet processed go to the next backend. Postgres ignores stray COPY data,
            // so a COPY the client was feeding fails cleanly.
            if report_lost_backend(stream, &tx).await.is_err() {
                return Next::Stop;
            }
            if !s.client_walker.at_boundary() {
                // A large message was half relayed: the stream cannot be resumed.
                let report = ErrorReport::fatal(
                    sqlstate::CONNECTION_FAILURE,
                    "the database connection was lost in the middle of a message",
                );
                send_failure(stream, &report.into()).await;
                return Next::Stop;
            }
            Next::Continue
        }
    }
}

/// What waiting for a client between transactions came to.
enum Wait {
    /// Its next message (or part of it) is in the buffer.
    Ready,
    /// It closed, or pgwarden is shutting down (and the client was told).
    Closed,
    /// It stayed idle for `park_idle_clients_after`; its buffer was released.
    Park,
}

/// Waits, holding no backend, until the client sends something; parks it after
/// `park_idle_clients_after` if given a `park_timer`. `shutdown` is the serving task's watch
/// for shutdown, made here on first use: kept from wait to wait, it joins the token's list
/// of waiters (under a lock) once per task instead of at every transaction.
async fn wait_for_client(
    client: &mut Client,
    cbuf: &mut BytesMut,
    park_timer: Option<Pin<&mut Sleep>>,
    shutdown: &mut Option<Pin<Box<WaitForCancellationFutureOwned>>>,
) -> Wait {
    if !cbuf.is_empty() {
        return Wait::Ready;
    }
    let Client {
        stream, session: s, ..
    } = client;
    if stream.is_tls() {
        // TLS may hold decrypted bytes the last read had no room for: the socket would
        // not wake us for them.
        cbuf.reserve(FIRST_READ);
        if let Some(read) = stream.read_now(cbuf) {
            return if matches!(read, Ok(n) if n > 0) {
                Wait::Ready
            } else {
                Wait::Closed
            };
        }
    }
    // An idle client keeps no buffer: a frozen Lambda may sit here for minutes.
    *cbuf = BytesMut::new();
    let park_after = s.app.park_idle_clients_after();
    let mut park_timer = park_timer.filter(|_| !park_after.is_zero());
    if let Some(timer) = park_timer.as_mut() {
        timer
            .as_mut()
            .reset(tokio::time::Instant::now() + park_after);
    }
    let token = s.app.shutdown_shard(s.cancel.key());
    // The watch joins the token's waiters at its first poll, leaving the task's waker there,
    // which is the same at every poll of the task: later waits only read the token.
    let mut join = shutdown.is_none();
    let watch = shutdown.get_or_insert_with(|| Box::pin(token.clone().cancelled_owned()));
    loop {
        // A poll of three sources rather than `select!` on three futures: this future is
        // what an idle client costs until it parks (see `serve`).
        let woke = poll_fn(|cx| {
            let stopping = if join {
                join = false;
                watch.as_mut().poll(cx).is_ready()
            } else {
                token.is_cancelled()
            };
            if stopping {
                return Poll::Ready(Woke::Shutdown);
            }
            if let Poll::Ready(ready) = stream.poll_readable(cx) {
                return Poll::Ready(Woke::Readable(ready.is_ok()));
            }
            match park_timer.as_mut().map(|timer| timer.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => Poll::Ready(Woke::ParkTimer),
                _ => Poll::Pending,
            }
        })
        .await;
        match woke {
            Woke::Readable(true) => {}
            Woke::Readable(false) => return Wait::Closed,
            Woke::Shutdown => {
                // Boxed: the failure and its write are not kept in every idle client's future.
                Box::pin(async { send_failure(stream, &shutting_down()).await }).await;
                return Wait::Closed;
            }
            Woke::ParkTimer => return Wait::Park,
        }
        cbuf.reserve(FIRST_READ);
        match stream.read_now(cbuf) {
            Some(Ok(0) | Err(_)) => return Wait::Closed,
            Some(Ok(_)) => return Wait::Ready,
            // Readable but no whole TLS record yet.
            None => continue,
        }
    }
}

/// What woke a client waiting between transactions.
enum Woke {
    /// Its socket is readable (`true`) or failed (`false`).
    Readable(bool),
    Shutdown,
    ParkTimer,
}

/// The FATAL error a client between transactions gets when pgwarden shuts down.
fn shutting_down() -> Failure {
    ErrorReport::fatal(
        sqlstate::ADMIN_SHUTDOWN,
        "terminating connection because pgwarden is shutting down",
    )
    .into()
}

/// Tells the client why its connection ends (it may be gone already: errors are moot).
async fn send_failure(stream: &mut ClientStream, failure: &Failure) {
    let mut out = BytesMut::new();
    failure.encode(&mut out);
    let _ = send(stream, &out).await;
}

/// Writes and flushes (TLS keeps written bytes until flushed).
async fn send<W: AsyncWrite + Unpin>(stream: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

fn starts_with_terminate(cbuf: &[u8]) -> bool {
    cbuf.len() >= 5 && cbuf[0] == frontend::TERMINATE
}

/// Borrows a backend while watching the client: a client that disconnects while queued
/// leaves the queue at once. Returns `None` if the client left.
async fn borrow_watching_client(
    stream: &mut ClientStream,
    cbuf: &mut BytesMut,
    s: &Session,
) -> Option<Result<Box<BackendConn>, Failure>> {
    let borrow = super::borrow_unless_paused(&s.app, &s.pool, s.target().config().borrow_timeout);
    tokio::pin!(borrow);
    loop {
        tokio::select! {
            result = &mut borrow => return Some(result),
            ready = stream.readable(), if cbuf.len() < MAX_WAITING_BUFFER => {
                if ready.is_err() {
                    return None;
                }
                cbuf.reserve(READ_CHUNK);
                if let Some(Ok(0) | Err(_)) = stream.read_now(cbuf) {
                    return None;
                }
            }
        }
    }
}

/// I/O completed by one poll of the relay.
enum Event {
    FromClient(std::io::Result<usize>),
    /// Bytes went out to the backend (and were flushed once all were written).
    ToBackend(std::io::Result<()>),
    FromBackend(std::io::Result<usize>),
    /// Bytes went out to the client (and were flushed once all were written).
    ToClient(std::io::Result<()>),
    /// Shutdown began; noticed once.
    Shutdown,
}

/// Writes what it can of `out` to `stream`, then flushes (TLS buffers written bytes) once
/// `out` is drained: writing and flushing are one step of the relay, not two. Ready when
/// something was written or flushed, Pending (waker registered) when nothing could be.
fn poll_send<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut BytesMut,
    unflushed: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<()>> {
    let mut progressed = false;
    while !out.is_empty() {
        match Pin::new(&mut *stream).poll_write(cx, out) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => {
                out.advance(n);
                *unflushed = true;
                progressed = true;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending if progressed => return Poll::Ready(Ok(())),
            Poll::Pending => return Poll::Pending,
        }
    }
    if *unflushed {
        match Pin::new(&mut *stream).poll_flush(cx) {
            Poll::Ready(Ok(())) => {
                *unflushed = false;
                progressed = true;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
    }
    if progressed {
        Poll::Ready(Ok(()))
    } else {
        Poll::Pending
    }
}

/// Outgoing bytes above this stop reading from the other side (backpressure).
const HIGH_WATER: usize = 128 * 1024;

fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < MIN_SPARE {
        buf.reserve(READ_CHUNK);
    }
}

async fn relay(
    stream: &mut ClientStream,
    cbuf: &mut BytesMut,
    backend: &mut BackendConn,
    s: &mut Session,
    tx: &mut TxState,
) -> End {
    let backend_stream = &mut backend.stream;
    let bbuf = &mut backend.read_buf;
    // TLS buffers written bytes until flushed: flush once an outgoing buffer drains.
    let mut client_unflushed = false;
    let mut backend_unflushed = false;
    let mut side = BackendSide {
        statements: &mut backend.statements,
        settings: &mut backend.settings,
        to_backend: &mut backend.to_backend,
        to_client: &mut backend.to_client,
        scan: &mut backend.scan,
    };
    if s.releases_per_transaction() && *side.settings != s.settings.signature() {
        // The backend carries someone else's settings: make them the client's own first.
        frontend::query(side.to_backend, &s.settings.replay_sql());
        s.plan.push(Expect::Hidden { failed: false });
        *side.settings = s.settings.signature();
    }
    let mut backend_walker = FrameWalker::new();
    let mut terminating = false;
    // Session-mode and pinned clients wait here between transactions, so shutdown must be
    // noticed here too, not only while waiting without a backend. A client that releases
    // its backend at the end of the transaction notices it in that wait instead: the
    // signal is only made (a token clone, a registration) once a round needs to watch.
    let mut shutdown_signal = None;
    let mut shutdown_seen = false;
    loop {
        // Only new input needs looking at: most rounds of this loop only wrote something.
        if !cbuf.is_empty()
            && !terminating
            && !tx.backend_fatal
            && side.to_backend.len() < HIGH_WATER
        {
            match process_client(s, tx, &mut side, cbuf) {
                Ok((n, stopped)) => {
                    cbuf.advance(n);
                    terminating = stopped;
                }
                Err(e) => return End::ClientProtocol(e),
            }
        }
        if !bbuf.is_empty() && side.to_client.len() < HIGH_WATER {
            match process_backend(s, tx, &mut backend_walker, &mut side, bbuf) {
                Ok(n) => bbuf.advance(n),
                Err(e) => {
                    debug!(error = %e, "backend sent invalid protocol");
                    return End::BackendGone;
                }
            }
        }
        if tx.backend_fatal && side.to_client.is_empty() && !client_unflushed {
            // The FATAL error has reached the client; whatever the client sends next goes
            // to another backend instead of this dying one.
            return End::BackendGone;
        }
        let quiet = bbuf.is_empty()
            && side.to_client.is_empty()
            && side.to_backend.is_empty()
            && !client_unflushed
            && !backend_unflushed
            && backend_walker.at_boundary()
            && s.client_walker.at_boundary();
        if terminating && quiet {
            return End::ClientTerminated;
        }
        let between_transactions = cbuf.is_empty()
            && quiet
            && tx.pending == 0
            && !tx.unsynced
            && tx.status == backend::IDLE
            && s.plan.is_empty();
        // Session mode and pinned clients keep their backend: for them the relay only ends
        // when one side goes away (or at shutdown).
        if between_transactions && (s.releases_per_transaction() || shutdown_seen) {
            return if shutdown_seen {
                End::Shutdown
            } else {
                End::Idle
            };
        }

        let read_client = !terminating
            && !tx.backend_fatal
            && side.to_backend.len() < HIGH_WATER
            && cbuf.len() < MAX_WAITING_BUFFER;
        let read_backend = side.to_client.len() < HIGH_WATER && bbuf.len() < MAX_WAITING_BUFFER;
        // Checked on every poll: a client pinned during the round keeps its backend after it.
        let watch_shutdown = !s.releases_per_transaction() && !shutdown_seen;
        if watch_shutdown && shutdown_signal.is_none() {
            let token = s.app.shutdown_shard(s.cancel.key()).clone();
            shutdown_signal = Some(Box::pin(token.cancelled_owned()));
        }
        // Writes first, then the backend's answer, then the client: in a round trip the
        // client's socket, quiet while its request runs, is then polled once (while the
        // backend works) instead of after every step. Each poll of a socket that is not
        // ready registers with the reactor again, under a lock. Nothing starves: a side is
        // read only while its outgoing buffer is under HIGH_WATER.
        let event = poll_fn(|cx| {
            if !tx.backend_fatal {
                if let Poll::Ready(r) =
                    poll_send(backend_stream, side.to_backend, &mut backend_unflushed, cx)
                {
                    return Poll::Ready(Event::ToBackend(r));
                }
            }
            if let Poll::Ready(r) = poll_send(stream, side.to_client, &mut client_unflushed, cx) {
                return Poll::Ready(Event::ToClient(r));
            }
            if read_backend {
                reserve(bbuf);
                if let Poll::Ready(r) = poll_read_buf(Pin::new(&mut *backend_stream), cx, bbuf) {
                    return Poll::Ready(Event::FromBackend(r));
                }
            }
            if read_client {
                reserve(cbuf);
                if let Poll::Ready(r) = poll_read_buf(Pin::new(&mut *stream), cx, cbuf) {
                    return Poll::Ready(Event::FromClient(r));
                }
            }
            if let Some(signal) = shutdown_signal.as_mut().filter(|_| watch_shutdown) {
                if signal.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Shutdown);
                }
            }
            Poll::Pending
        })
        .await;

        match event {
            Event::FromClient(Ok(0) | Err(_)) | Event::ToClient(Err(_)) => return End::ClientGone,
            Event::FromBackend(Ok(0) | Err(_)) | Event::ToBackend(Err(_)) => {
                return End::BackendGone
            }
            Event::FromClient(Ok(_))
            | Event::FromBackend(Ok(_))
            | Event::ToBackend(Ok(()))
            | Event::ToClient(Ok(())) => {}
            Event::Shutdown => shutdown_seen = true,
        }
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
    send(client, &out).await
}
