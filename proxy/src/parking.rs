//! Parked clients. A client idle between transactions for `server.park_idle_clients_after`
//! leaves its task and tokio's reactor and waits here, a plain descriptor in an epoll set of
//! its own watched by one thread. A frozen Lambda's connection then costs its session state
//! and nothing else: no task, no future, no buffer, no reactor slot. The first byte it
//! sends (or its close) wakes it, and a new task takes it up where it stopped.
//!
//! Parking costs two epoll_ctl calls and waking a task, so only clients idle for a while
//! are parked; a busy client never is.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use prometheus::{IntCounter, IntGauge};
use tracing::{debug, error};

use crate::memory::{self, TrimPolicy};
use crate::placement::{Arrival, Threads};
use crate::session::Client;

/// The token of the waker that tells the thread to release every client.
const WAKER: Token = Token(usize::MAX);

/// Where idle clients wait without a task.
pub struct ParkingLot {
    shared: Arc<Shared>,
}

struct Shared {
    registry: mio::Registry,
    waker: Waker,
    state: Mutex<State>,
    /// Where woken clients get their new task: the serving threads, once the server has
    /// started them ...
    threads: OnceLock<Arc<Threads>>,
    /// ... and until then, the runtime the lot was started in.
    home: tokio::runtime::Handle,
    metrics: ParkingMetrics,
}

/// What the lot counts.
pub struct ParkingMetrics {
    /// Clients parked now.
    pub parked: IntGauge,
    /// Parks since start.
    pub parks: IntCounter,
    /// Memory trims after a wave of parking.
    pub trims: IntCounter,
}

#[derive(Default)]
struct State {
    clients: HashMap<usize, Box<Client>>,
    next_token: usize,
    /// Set at shutdown: every parked client is released and none is taken any more.
    closed: bool,
    /// When to give the memory of clients that parked back to the system.
    trim: TrimPolicy,
}

impl ParkingLot {
    /// Starts the thread that watches parked clients. Must be called inside a runtime:
    /// woken clients are served there until [`ParkingLot::resume_on`] names the threads.
    pub fn start(metrics: ParkingMetrics) -> io::Result<Self> {
        let poll = Poll::new()?;
        let shared = Arc::new(Shared {
            registry: poll.registry().try_clone()?,
            waker: Waker::new(poll.registry(), WAKER)?,
            state: Mutex::default(),
            threads: OnceLock::new(),
            home: tokio::runtime::Handle::current(),
            metrics,
        });
        let watcher = shared.clone();
        std::thread::Builder::new()
            .name("pgwarden-parking".into())
            .spawn(move || watch(poll, &watcher))?;
        Ok(Self { shared })
    }

    /// Parks `client`, or gives it back for its task to go on serving: when the lot is
    /// closed, or when its socket could not leave tokio (if that failure lost the socket,
    /// the task's next read fails and the client is closed). A socket that left tokio but
    /// could not be registered here is returned to tokio first; if even that fails, the
    /// client is dropped, which closes it.
    pub fn park(&self, mut client: Box<Client>) -> Result<(), Box<Client>> {
        let mut state = self.shared.lock();
        if state.closed {
            return Err(client);
        }
        let fd = match client.stream.socket_mut().park() {
            Ok(fd) => fd,
            Err(e) => {
                debug!(error = %e, "could not park an idle client");
                return Err(client);
            }
        };
        let token = state.next_token;
        // WAKER is usize::MAX: tokens stay below it.
        state.next_token = (token + 1) % WAKER.0;
        if let Err(e) =
            self.shared
                .registry
                .register(&mut SourceFd(&fd), Token(token), Interest::READABLE)
        {
            debug!(error = %e, "could not park an idle client");
            return match client.stream.socket_mut().unpark() {
                Ok(()) => Err(client),
                Err(_) => Ok(()),
            };
        }
        state.clients.insert(token, client);
        self.shared.metrics.parked.inc();
        self.shared.metrics.parks.inc();
        let trim_pending = state.trim.parked(Instant::now());
        drop(state);
        if trim_pending {
            if let Err(e) = self.shared.waker.wake() {
                debug!(error = %e, "could not wake the parking thread");
            }
        }
        Ok(())
    }

    /// Places woken clients on these threads by their rule (`placement.rs`): a client
    /// parked by one thread may wake on another. Set once; a later call changes nothing.
    pub fn resume_on(&self, threads: Arc<Threads>) {
        let _ = self.shared.threads.set(threads);
    }

    /// The serving threads, once the server has started them.
    pub fn threads(&self) -> Option<&Arc<Threads>> {
        self.shared.threads.get()
    }

    /// Releases every parked client (they find pgwarden shutting down) and parks no more.
    pub fn close(&self) {
        self.shared.lock().closed = true;
        if let Err(e) = self.shared.waker.wake() {
            error!(error = %e, "could not wake the parking thread");
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands a woken client to a new task.
    fn release(&self, mut client: Box<Client>) {
        if let Some(fd) = client.stream.socket_mut().parked_fd() {
            let _ = self.registry.deregister(&mut SourceFd(&fd));
        }
        self.metrics.parked.dec();
        let runtime = match self.threads.get() {
            Some(threads) => threads.handle(threads.choose(Arrival::Woken)),
            None => &self.home,
        };
        runtime.spawn(crate::session::resume(client));
    }
}

/// The parking thread: waits for parked sockets to become readable (data or close) and
/// releases their clients; gives memory back after a wave of parking (`memory.rs`); at
/// shutdown releases all and ends.
fn watch(mut poll: Poll, shared: &Shared) {
    let mut events = Events::with_capacity(256);
    loop {
        let (trim_now, timeout) = {
            let mut state = shared.lock();
            let now = Instant::now();
            (state.trim.due(now), state.trim.wait(now))
        };
        if trim_now {
            let started = Instant::now();
            memory::release_free_memory();
            shared.metrics.trims.inc();
            debug!(
                took_us = started.elapsed().as_micros() as u64,
                "gave free memory back after clients parked"
            );
        }
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            error!(error = %e, "parking thread failed: releasing every parked client");
            shared.lock().closed = true;
        }
        let (woken, closed) = {
            let mut state = shared.lock();
            let mut woken: Vec<Box<Client>> = events
                .iter()
                .filter(|event| event.token() != WAKER)
                .filter_map(|event| state.clients.remove(&event.token().0))
                .collect();
            if state.closed {
                woken.extend(state.clients.drain().map(|(_, client)| client));
            }
            (woken, state.closed)
        };
        for client in woken {
            shared.release(client);
        }
        if closed {
            return;
        }
    }
}
