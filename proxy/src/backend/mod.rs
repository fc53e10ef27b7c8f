//! Backend connections: a logged-in socket to Postgres and what pgwarden knows about it.

pub mod connect;

use std::net::SocketAddr;
use std::time::Instant;

use crate::stream::BackendStream;
use bytes::BytesMut;
use pgwarden_protocol::startup::CancelKey;
use prometheus::IntGauge;
use tokio::sync::OwnedSemaphorePermit;

use crate::pool::Slot;

pub use connect::{connect, ConnectError, LoggedIn};

/// A logged-in backend connection, owned by exactly one pool slot.
pub struct BackendConn {
    pub stream: BackendStream,
    /// The backend's own cancel key, used to forward a client's CancelRequest.
    pub key: CancelKey,
    /// The address the key is valid for.
    pub addr: SocketAddr,
    /// Process id, for logs.
    pub pid: i32,
    /// When this connection must be closed at its next release (lifetime, jittered).
    pub expires_at: Instant,
    /// When it last went back to the pool, for `idle_timeout`.
    pub idle_since: Instant,
    /// Read buffer kept with the connection so a busy backend does not allocate per borrow.
    pub read_buf: BytesMut,
    /// Bytes on their way to this backend, and from it to the client it serves; kept with
    /// the backend (not the client) so idle clients hold no buffers.
    pub to_backend: BytesMut,
    pub to_client: BytesMut,
    /// Signature of the session settings applied on this backend.
    pub settings: crate::session::settings::Signature,
    /// Named statements prepared on this backend (transaction mode).
    pub statements: crate::session::statements::BackendStatements,
    /// The relay's scratch for message boundaries, kept here so no transaction allocates it.
    pub scan: Vec<crate::session::Boundary>,
    /// The worker thread whose reactor the socket is registered with.
    pub worker: usize,
    /// The pool slot; dropping the connection frees it.
    _slot: Slot,
    /// A share of the target's `max_backend_connections`.
    _capacity: OwnedSemaphorePermit,
    /// Whether the connection sits in its pool's idle list (for the state gauges).
    idle: bool,
    idle_gauge: IntGauge,
    borrowed_gauge: IntGauge,
}

impl Drop for BackendConn {
    fn drop(&mut self) {
        self.state_gauge().dec();
    }
}

impl BackendConn {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        stream: BackendStream,
        key: CancelKey,
        addr: SocketAddr,
        expires_at: Instant,
        read_buf: BytesMut,
        slot: Slot,
        capacity: OwnedSemaphorePermit,
        idle_gauge: IntGauge,
        borrowed_gauge: IntGauge,
    ) -> Self {
        borrowed_gauge.inc();
        Self {
            stream,
            pid: key.pid,
            key,
            addr,
            expires_at,
            idle_since: Instant::now(),
            read_buf,
            to_backend: BytesMut::new(),
            to_client: BytesMut::new(),
            statements: Default::default(),
            scan: Vec::new(),
            settings: crate::session::settings::defaults(),
            worker: crate::runtime::current_worker(),
            _slot: slot,
            _capacity: capacity,
            idle: false,
            idle_gauge,
            borrowed_gauge,
        }
    }

    fn state_gauge(&self) -> &IntGauge {
        if self.idle {
            &self.idle_gauge
        } else {
            &self.borrowed_gauge
        }
    }

    /// Registers the socket with the calling worker thread's reactor, if it is with another
    /// one's: its readiness then wakes this thread directly. Returns whether it moved.
    pub fn move_to_this_worker(&mut self) -> std::io::Result<bool> {
        let here = crate::runtime::current_worker();
        if self.worker == here {
            return Ok(false);
        }
        self.stream.socket_mut().move_here()?;
        self.worker = here;
        Ok(true)
    }

    /// Moves the connection between the idle and borrowed gauges.
    pub(crate) fn set_idle(&mut self, idle: bool) {
        if self.idle != idle {
            self.state_gauge().dec();
            self.idle = idle;
            self.state_gauge().inc();
        }
    }

    /// True when the server has closed the socket or sent something unprompted (such as the
    /// FATAL error of `pg_terminate_backend`) while the connection sat idle. Such a
    /// connection is discarded instead of being handed to a client.
    pub fn is_broken(&mut self) -> bool {
        // Checked on every checkout, under the pool's lock: the probe's system call is only
        // paid when the reactor saw something arrive.
        if !self.stream.may_be_readable() {
            return false;
        }
        let mut probe = BytesMut::with_capacity(1);
        // Pending: nothing to read, the connection is healthy. Anything else (data, EOF,
        // an error) means it cannot be handed out.
        self.stream.read_now(&mut probe).is_some()
    }

    /// Drops bytes left over from the last client (never meant for the next one) and
    /// gives back buffer memory a large result made grow.
    pub fn forget_traffic(&mut self) {
        for buf in [
            &mut self.to_backend,
            &mut self.to_client,
            &mut self.read_buf,
        ] {
            buf.clear();
            if buf.capacity() > 1 << 20 {
                *buf = BytesMut::new();
            }
        }
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        now >= self.expires_at
    }
}

impl std::fmt::Debug for BackendConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendConn")
            .field("addr", &self.addr)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}
