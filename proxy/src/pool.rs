//! Backend pools: one per (target, database, user), with the target-wide limits above them.
//!
//! Why not deadpool-postgres: it pools typed `tokio_postgres::Client`s, and a proxy relays raw
//! protocol bytes over the socket itself. The pool also needs things deadpool's generic
//! manager lacks: a hard cap across all pools of a target, a cap on logins in flight,
//! `min_idle`, direct hand-off of a returned connection to the longest waiter, and the
//! parameter-status cache. See docs/architecture.md.
//!
//! Invariants: `open` counts idle, borrowed and being-created connections of a pool; every
//! one of them owns a [`Slot`] whose drop gives the slot to the first waiter or shrinks
//! `open`. Locks are never held across `.await`, and no connection is dropped while a pool
//! lock is held (its slot's drop takes that lock).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rand::Rng;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use crate::backend::{self, BackendConn, ConnectError, LoggedIn};
use crate::config::TargetConfig;
use crate::credentials::{CredentialStore, Login, Refresh};
use crate::metrics::Metrics;
use crate::session::settings::Signature;

/// ParameterStatus values (name, value) in the order the server sent them.
pub type ServerParams = Arc<Vec<(String, String)>>;

/// Identifies a pool within its target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub database: String,
    pub user: String,
}

/// Why a client could not get a backend.
#[derive(Debug, thiserror::Error)]
pub enum BorrowError {
    #[error(
        "borrow timeout after {waited:?}: pool {target}/{database}/{user} has {open} of {size} connections busy"
    )]
    Timeout {
        waited: Duration,
        target: String,
        database: String,
        user: String,
        open: usize,
        size: usize,
    },
    #[error(
        "borrow timeout after {0:?}: target {1} is at max_backend_connections and no idle connection could be closed"
    )]
    TargetFull(Duration, String),
    #[error(
        "too many clients waiting: pool {target}/{database}/{user} already has {waiting} clients waiting for a connection (max_waiting_clients)"
    )]
    QueueFull {
        target: String,
        database: String,
        user: String,
        waiting: usize,
    },
    #[error("no credentials for database user {0:?}")]
    UnknownUser(String),
    #[error("the database login for user {0:?} could not be read from Secrets Manager")]
    CredentialsUnavailable(String),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("a backend connection could not move to this worker thread: {0}")]
    Move(std::io::Error),
}

/// A database endpoint: its config, credentials, target-wide limits and pools.
pub struct Target {
    name: String,
    /// The limits in force; replaced by a reload (see [`Target::apply`]).
    config: ArcSwap<TargetConfig>,
    /// Permits to take away from `capacity` and `logins` after a reload lowered their
    /// limits; paid as permits come back, by [`Target::maintain`].
    capacity_debt: AtomicUsize,
    logins_debt: AtomicUsize,
    /// Cancelled when a reload removes or replaces this target: its background work
    /// stops (see [`Target::retire`]).
    pub retired: tokio_util::sync::CancellationToken,
    pub credentials: CredentialStore,
    /// TLS towards the database, when the target's `tls` mode is not `disable`.
    pub connector: Option<tokio_rustls::TlsConnector>,
    /// Permits for `max_backend_connections`, held by every open connection.
    capacity: Arc<Semaphore>,
    /// Pools waiting for a share of `max_backend_connections`. While any wait, a connection
    /// returned to a pool with no waiters of its own is closed instead of kept idle, so one
    /// pool's idle connections cannot starve another pool of the same target.
    capacity_waiters: AtomicUsize,
    /// Permits for `max_logins_in_flight`.
    logins: Semaphore,
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    pub metrics: Arc<Metrics>,
    /// Whether the last backend login succeeded; while not, maintenance retries one (for
    /// the pool that failed) so readiness recovers without waiting for a client.
    available: std::sync::atomic::AtomicBool,
    unavailable_pool: Mutex<Option<PoolKey>>,
    last_probe: Mutex<Option<Instant>>,
}

/// How often an unavailable target's login is retried by maintenance.
const PROBE_INTERVAL: Duration = Duration::from_secs(3);

impl Target {
    pub fn new(
        config: TargetConfig,
        credentials: CredentialStore,
        connector: Option<tokio_rustls::TlsConnector>,
        metrics: Arc<Metrics>,
        retired: tokio_util::sync::CancellationToken,
    ) -> Arc<Self> {
        metrics
            .backend_max
            .with_label_values(&[&config.name])
            .set(config.max_backend_connections as i64);
        metrics
            .target_available
            .with_label_values(&[&config.name])
            .set(1);
        // Series a dashboard reads exist from the start, at zero.
        let name = config.name.as_str();
        for state in ["idle", "borrowed"] {
            metrics
                .backend_connections
                .with_label_values(&[name, state]);
        }
        for outcome in ["succeeded", "failed"] {
            metrics.backend_setups.with_label_values(&[name, outcome]);
        }
        metrics.backend_in_transaction.with_label_values(&[name]);
        metrics.backend_pinned.with_label_values(&[name]);
        metrics.borrow_timeouts.with_label_values(&[name]);
        metrics.queries.with_label_values(&[name]);
        Arc::new(Self {
            capacity: Arc::new(Semaphore::new(config.max_backend_connections)),
            capacity_waiters: AtomicUsize::new(0),
            logins: Semaphore::new(config.max_logins_in_flight),
            pools: Mutex::new(HashMap::new()),
            name: config.name.clone(),
            config: ArcSwap::from_pointee(config),
            capacity_debt: AtomicUsize::new(0),
            logins_debt: AtomicUsize::new(0),
            retired,
            available: std::sync::atomic::AtomicBool::new(true),
            unavailable_pool: Mutex::new(None),
            last_probe: Mutex::new(None),
            credentials,
            connector,
            metrics,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The limits in force now.
    pub fn config(&self) -> arc_swap::Guard<Arc<TargetConfig>> {
        self.config.load()
    }

    /// Whether `new` can be applied to this target in place: it names the same endpoint,
    /// credentials, authentication and pool mode. Otherwise a reload builds a new target.
    pub fn can_apply(&self, new: &TargetConfig) -> bool {
        let old = self.config();
        old.name == new.name
            && old.host == new.host
            && old.port == new.port
            && old.credentials == new.credentials
            && old.tls == new.tls
            && old.ca_path == new.ca_path
            && old.client_auth == new.client_auth
            && old.pool_mode == new.pool_mode
    }

    /// Applies new limits (see [`Target::can_apply`]): semaphores grow at once and shrink
    /// as permits come back; waiters get the slots a larger `pool_size` opens.
    pub fn apply(&self, new: TargetConfig) {
        let old = self.config.swap(Arc::new(new));
        let new = self.config();
        self.metrics
            .backend_max
            .with_label_values(&[self.name()])
            .set(new.max_backend_connections as i64);
        resize(
            &self.capacity,
            &self.capacity_debt,
            old.max_backend_connections,
            new.max_backend_connections,
        );
        resize(
            &self.logins,
            &self.logins_debt,
            old.max_logins_in_flight,
            new.max_logins_in_flight,
        );
        if new.pool_size > old.pool_size {
            for pool in self.pools() {
                pool.grant_new_slots();
            }
        }
    }

    /// Takes a removed target out of service: its idle connections close now, and no new
    /// client finds its pools. Clients still on it keep their pool, which goes away with
    /// the last of them.
    pub fn retire(&self) {
        self.retired.cancel();
        let pools: Vec<_> = lock(&self.pools).drain().map(|(_, p)| p).collect();
        for pool in pools {
            let idle = std::mem::take(&mut lock(&pool.state).idle);
            for _ in &idle {
                self.count_closed("target_removed");
            }
        }
    }

    /// The pool for `key`, created on first use.
    pub fn pool(self: &Arc<Self>, key: PoolKey) -> Arc<Pool> {
        let mut pools = lock(&self.pools);
        pools
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Pool {
                    borrow_seconds: self
                        .metrics
                        .borrow_seconds
                        .with_label_values(&[self.name()]),
                    moves: self.metrics.backend_moves.with_label_values(&[self.name()]),
                    queries: self.metrics.queries.with_label_values(&[self.name()]),
                    response_seconds: self
                        .metrics
                        .query_response_seconds
                        .with_label_values(&[self.name()]),
                    in_transaction: self
                        .metrics
                        .backend_in_transaction
                        .with_label_values(&[self.name()]),
                    target: self.clone(),
                    key,
                    state: Mutex::new(PoolState::default()),
                    params: Mutex::new(None),
                    valid_statements: Mutex::new(HashSet::new()),
                    reported: Mutex::new(HashMap::new()),
                })
            })
            .clone()
    }

    pub fn pools(&self) -> Vec<Arc<Pool>> {
        lock(&self.pools).values().cloned().collect()
    }

    /// Closes the longest-idle connection of any pool other than `except`, to make room
    /// under `max_backend_connections`. Returns whether one was closed.
    fn evict_idle_elsewhere(&self, except: &PoolKey) -> bool {
        let pools = self.pools();
        let victim = pools
            .iter()
            .filter(|p| &p.key != except)
            .filter_map(|p| {
                let mut st = lock(&p.state);
                let oldest = (0..st.idle.len()).min_by_key(|&i| st.idle[i].idle_since)?;
                Some(st.idle.swap_remove(oldest))
            })
            .next();
        if let Some(conn) = victim {
            self.count_closed("evicted");
            drop(conn);
            true
        } else {
            false
        }
    }

    fn count_closed(&self, reason: &str) {
        self.metrics
            .backend_closed
            .with_label_values(&[self.name(), reason])
            .inc();
    }

    /// One maintenance pass: close idle connections past `idle_timeout` (above `min_idle`)
    /// or past their lifetime, open connections up to `min_idle`, and forget pools nobody
    /// uses (so made-up database names cannot grow the pool map without bound).
    pub fn maintain(self: &Arc<Self>) {
        pay_debt(&self.capacity, &self.capacity_debt);
        pay_debt(&self.logins, &self.logins_debt);
        self.maintain_pools();
        self.probe_if_unavailable();
        lock(&self.pools)
            .retain(|_, pool| Arc::strong_count(pool) > 1 || lock(&pool.state).open > 0);
    }

    /// Whether a backend login is possible, as far as the last attempt tells.
    pub fn is_available(&self) -> bool {
        self.available.load(Ordering::Relaxed)
    }

    fn record_login(&self, pool: &PoolKey, ok: bool) {
        if self.available.swap(ok, Ordering::Relaxed) != ok {
            self.metrics
                .target_available
                .with_label_values(&[self.name()])
                .set(i64::from(ok));
            if ok {
                info!(target_name = %self.name(), "backend logins work again");
            } else {
                warn!(target_name = %self.name(), "backend login failed: target unavailable until one succeeds");
            }
        }
        if !ok {
            *lock(&self.unavailable_pool) = Some(pool.clone());
        }
    }

    /// While unavailable, opens one connection for the pool whose login failed, every
    /// [`PROBE_INTERVAL`].
    fn probe_if_unavailable(self: &Arc<Self>) {
        if self.is_available() {
            return;
        }
        let now = Instant::now();
        {
            let mut last = lock(&self.last_probe);
            if last.is_some_and(|t| now.duration_since(t) < PROBE_INTERVAL) {
                return;
            }
            *last = Some(now);
        }
        let Some(key) = lock(&self.unavailable_pool).clone() else {
            return;
        };
        let pool = self.pool(key);
        let Some(slot) = pool.reserve_below(self.config().pool_size) else {
            return;
        };
        tokio::spawn(async move {
            let deadline = Instant::now() + pool.target.config().connect_timeout;
            if let Ok(conn) = pool.create(slot, Instant::now(), deadline).await {
                pool.checkin(conn);
            }
        });
    }

    fn maintain_pools(self: &Arc<Self>) {
        let now = Instant::now();
        for pool in self.pools() {
            let mut closing = Vec::new();
            {
                let config = self.config();
                let mut st = lock(&pool.state);
                let min_idle = config.min_idle;
                let mut i = 0;
                while i < st.idle.len() {
                    let above_min = st.open - closing.len() > min_idle;
                    let c = &mut st.idle[i];
                    let idle_too_long =
                        now.duration_since(c.idle_since) >= config.idle_timeout && above_min;
                    if c.is_expired(now) || idle_too_long || c.is_broken() {
                        closing.push(st.idle.swap_remove(i));
                    } else {
                        i += 1;
                    }
                }
            }
            for _ in &closing {
                self.count_closed("idle");
            }
            drop(closing);
            while let Some(slot) = pool.reserve_for_min_idle() {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let deadline = Instant::now() + pool.target.config().connect_timeout;
                    match pool.create(slot, Instant::now(), deadline).await {
                        Ok(conn) => pool.checkin(conn),
                        Err(e) => {
                            warn!(target_name = %pool.target.name(), error = %e, "min_idle connection failed")
                        }
                    }
                });
            }
        }
    }
}

/// Changes a semaphore's size from `old` to `new` permits. Permits in use cannot be taken
/// back, so a shrink is recorded as debt and paid by [`pay_debt`] as they return.
pub fn resize(semaphore: &Semaphore, debt: &AtomicUsize, old: usize, new: usize) {
    if new > old {
        let mut grow = new - old;
        // Growing first cancels debt not paid yet.
        let owed = debt.load(Ordering::SeqCst);
        let cancelled = owed.min(grow);
        debt.fetch_sub(cancelled, Ordering::SeqCst);
        grow -= cancelled;
        semaphore.add_permits(grow);
    } else if old > new {
        debt.fetch_add(old - new, Ordering::SeqCst);
        pay_debt(semaphore, debt);
    }
}

pub fn pay_debt(semaphore: &Semaphore, debt: &AtomicUsize) {
    let owed = debt.load(Ordering::SeqCst);
    if owed > 0 {
        let paid = semaphore.forget_permits(owed);
        debt.fetch_sub(paid, Ordering::SeqCst);
    }
}

/// The outcome of looking at a pool under its lock.
enum Step {
    Ready(Box<BackendConn>),
    Create(Slot),
    Wait(oneshot::Receiver<Grant>),
    /// `max_waiting_clients` clients wait already.
    QueueFull,
}

/// A connection, or the right to open one, handed to a waiting client.
enum Grant {
    Conn(Box<BackendConn>),
    Slot(Slot),
}

#[derive(Default)]
struct PoolState {
    /// Idle connections; the most recently returned is at the end and is reused first, so
    /// surplus connections age out through `idle_timeout`.
    // Boxed on purpose: a connection moves by pointer from here into a borrow future.
    #[allow(clippy::vec_box)]
    idle: Vec<Box<BackendConn>>,
    open: usize,
    /// Clients waiting for a connection, in arrival order (served so, with the bounded
    /// preference of [`next_waiter`]). Waiters that left stay until `hand_off` skips them
    /// or a prune removes them.
    waiters: VecDeque<Waiter>,
    /// Queue length at which the next enqueue prunes waiters that left. Doubling it after
    /// each prune keeps enqueueing O(1) amortized: scanning the queue on every enqueue cost
    /// O(clients) per transaction, which halved throughput at 10,000 clients.
    prune_at: usize,
}

/// A client waiting for a connection.
struct Waiter {
    grant: oneshot::Sender<Grant>,
    /// The worker thread it runs on.
    worker: usize,
    since: Instant,
}

impl Waiter {
    fn left(&self) -> bool {
        self.grant.is_closed()
    }
}

/// A returned connection goes to the longest waiter on the returning client's worker thread
/// rather than to the longest waiter of all if it queued less than this after that one: the
/// connection then stays on its thread's reactor and wakes no other thread, and nobody is
/// overtaken by a client that queued more than this later.
const SAME_THREAD_FIRST_FOR: Duration = Duration::from_millis(2);

/// How far into the queue a waiter on the same thread is looked for.
const SAME_THREAD_SEARCH: usize = 64;

/// Smallest queue length worth pruning.
const MIN_PRUNE_AT: usize = 64;

/// Backend connections for one (database, user) of a target.
pub struct Pool {
    target: Arc<Target>,
    /// `pgwarden_borrow_duration_seconds{target}`, looked up once (it is hit per transaction).
    borrow_seconds: prometheus::Histogram,
    /// `pgwarden_backend_moves_total{target}`, looked up once.
    moves: prometheus::IntCounter,
    /// `pgwarden_query_requests_total{target}`, looked up once: its clients count their
    /// queries here (kept on the pool, not in each client's state).
    pub queries: prometheus::IntCounter,
    /// `pgwarden_query_response_duration_seconds{target}`, looked up once.
    pub response_seconds: prometheus::Histogram,
    /// `pgwarden_backend_connections_in_transaction{target}`, looked up once.
    pub in_transaction: prometheus::IntGauge,
    pub key: PoolKey,
    state: Mutex<PoolState>,
    /// ParameterStatus values of the first login, sent to clients at startup.
    params: Mutex<Option<ServerParams>>,
    /// Backend statement names some backend of this pool prepared successfully: a client
    /// Parse of one of them can be answered without borrowing a backend.
    valid_statements: Mutex<HashSet<Arc<str>>>,
    /// ParameterStatus values reported after applying a set of startup settings, by the
    /// settings' signature: clients with the same startup parameters need no backend.
    reported: Mutex<HashMap<Signature, Vec<(String, String)>>>,
}

/// Most distinct startup-settings sets a pool remembers.
const REPORTED_LIMIT: usize = 256;

/// Most statement names a pool remembers as valid.
const VALID_STATEMENTS_LIMIT: usize = 10_000;

/// Counts one connection (or creation in progress) against its pool's `open`.
pub struct Slot {
    pool: Arc<Pool>,
    armed: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.armed {
            self.pool.slot_freed();
        }
    }
}

/// An idle backend connection, as the admin console shows it.
pub struct IdleServer {
    pub addr: std::net::SocketAddr,
    pub pid: i32,
    pub idle_since: Instant,
}

/// Counts of a pool, for errors and metrics.
#[derive(Debug, Clone, Copy)]
pub struct PoolStats {
    pub open: usize,
    pub idle: usize,
    pub waiting: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a pool lock leaves counts that are still consistent (every
    // update is a single statement), so poisoning is not a reason to stop serving.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Offers `grant` to the waiters (see [`next_waiter`]); returns it if nobody is waiting any
/// more.
fn hand_off(state: &mut PoolState, mut grant: Grant) -> Option<Grant> {
    let here = crate::runtime::current_worker();
    loop {
        while state.waiters.front().is_some_and(Waiter::left) {
            state.waiters.pop_front();
        }
        if state.waiters.is_empty() {
            return Some(grant);
        }
        let next = next_waiter(&state.waiters, here);
        let waiter = state
            .waiters
            .remove(next)
            .expect("next_waiter is in the queue");
        match waiter.grant.send(grant) {
            Ok(()) => return None,
            Err(returned) => grant = returned,
        }
    }
}

/// Which waiter a connection returned on worker thread `here` goes to: the longest waiter
/// on the same thread, if it queued less than [`SAME_THREAD_FIRST_FOR`] after the longest
/// waiter of all (the front, still there); otherwise the front.
fn next_waiter(waiters: &VecDeque<Waiter>, here: usize) -> usize {
    let Some(front) = waiters.front() else {
        return 0;
    };
    waiters
        .iter()
        .take(SAME_THREAD_SEARCH)
        .position(|w| w.worker == here && !w.left())
        .filter(|&i| waiters[i].since.duration_since(front.since) < SAME_THREAD_FIRST_FOR)
        .unwrap_or(0)
}

impl Pool {
    pub fn target(&self) -> &Arc<Target> {
        &self.target
    }

    pub fn stats(&self) -> PoolStats {
        let st = lock(&self.state);
        PoolStats {
            open: st.open,
            idle: st.idle.len(),
            waiting: st.waiters.iter().filter(|w| !w.left()).count(),
        }
    }

    pub fn idle_servers(&self) -> Vec<IdleServer> {
        lock(&self.state)
            .idle
            .iter()
            .map(|c| IdleServer {
                addr: c.addr,
                pid: c.pid,
                idle_since: c.idle_since,
            })
            .collect()
    }

    pub fn reported_for(&self, settings: &Signature) -> Option<Vec<(String, String)>> {
        lock(&self.reported).get(settings).cloned()
    }

    pub fn remember_reported(&self, settings: Signature, values: Vec<(String, String)>) {
        let mut reported = lock(&self.reported);
        if reported.len() < REPORTED_LIMIT {
            reported.insert(settings, values);
        }
    }

    pub fn statement_is_valid(&self, name: Arc<str>) {
        let mut valid = lock(&self.valid_statements);
        if valid.len() < VALID_STATEMENTS_LIMIT {
            valid.insert(name);
        }
    }

    pub fn statement_is_invalid(&self, name: &str) {
        lock(&self.valid_statements).remove(name);
    }

    pub fn is_valid_statement(&self, name: &str) -> bool {
        lock(&self.valid_statements).contains(name)
    }

    /// The cached ParameterStatus values, if a backend of this pool has logged in.
    pub fn params(&self) -> Option<ServerParams> {
        lock(&self.params).clone()
    }

    fn slot_freed(self: &Arc<Self>) {
        let mut st = lock(&self.state);
        if st.open > self.target.config().pool_size {
            // The pool was shrunk by a reload: this slot goes away.
            st.open -= 1;
            return;
        }
        self.offer_slot(&mut st);
    }

    /// Gives a slot already counted in `open` to the first waiter; without one, uncounts
    /// it. Returns whether a waiter took it.
    fn offer_slot(self: &Arc<Self>, st: &mut PoolState) -> bool {
        let slot = Slot {
            pool: self.clone(),
            armed: true,
        };
        match hand_off(st, Grant::Slot(slot)) {
            Some(Grant::Slot(mut unused)) => {
                unused.armed = false;
                st.open -= 1;
                false
            }
            _ => true,
        }
    }

    /// After `pool_size` grew: hands the new slots to clients already waiting (newcomers
    /// would otherwise take them first).
    fn grant_new_slots(self: &Arc<Self>) {
        let size = self.target.config().pool_size;
        let mut st = lock(&self.state);
        while st.open < size && !st.waiters.is_empty() {
            st.open += 1;
            if !self.offer_slot(&mut st) {
                break;
            }
        }
    }

    fn reserve_for_min_idle(self: &Arc<Self>) -> Option<Slot> {
        self.reserve_below(self.target.config().min_idle)
    }

    /// A slot, if the pool has fewer than `limit` connections.
    fn reserve_below(self: &Arc<Self>, limit: usize) -> Option<Slot> {
        let mut st = lock(&self.state);
        (st.open < limit).then(|| {
            st.open += 1;
            Slot {
                pool: self.clone(),
                armed: true,
            }
        })
    }

    /// Borrows a backend: an idle one, a new one if the pool has room, or the next one
    /// returned, waiting in FIFO order until `deadline`. Dropping the future leaves the queue.
    /// `started` is the caller's clock reading at the start of the wait.
    pub async fn borrow(
        self: &Arc<Self>,
        started: Instant,
        deadline: Instant,
    ) -> Result<Box<BackendConn>, BorrowError> {
        let (step, discard) = self.take_or_queue(started);
        for _ in &discard {
            self.target.count_closed("broken_or_expired");
        }
        drop(discard);
        let mut conn = match step {
            Step::Ready(conn) => conn,
            Step::Create(slot) => Box::pin(self.create(slot, started, deadline)).await?,
            Step::Wait(rx) => self.wait(rx, started, deadline).await?,
            Step::QueueFull => return Err(self.queue_full_error()),
        };
        match conn.move_to_this_worker() {
            Ok(false) => {}
            Ok(true) => self.moves.inc(),
            Err(e) => {
                // The socket left its reactor and could not join this one: it is lost.
                self.target.count_closed("move_failed");
                return Err(BorrowError::Move(e));
            }
        }
        conn.set_idle(false);
        self.observe_borrow(started);
        Ok(conn)
    }

    /// Under the lock: an idle connection, a slot to open one, or a place in the queue.
    /// Also returns idle connections found dead or expired, to be closed after unlocking.
    #[allow(clippy::vec_box)]
    fn take_or_queue(self: &Arc<Self>, now: Instant) -> (Step, Vec<Box<BackendConn>>) {
        let mut discard = Vec::new();
        let mut st = lock(&self.state);
        let here = crate::runtime::current_worker();
        while !st.idle.is_empty() {
            // The most recently returned connection of this worker thread, if it has one:
            // it needs no move to another thread's reactor.
            let newest = st.idle.len() - 1;
            let pick = st.idle.iter().rposition(|c| c.worker == here);
            let mut conn = st.idle.remove(pick.unwrap_or(newest));
            if conn.is_expired(now) || conn.is_broken() {
                discard.push(conn);
            } else {
                return (Step::Ready(conn), discard);
            }
        }
        let config = self.target.config();
        if st.open < config.pool_size {
            st.open += 1;
            let slot = Slot {
                pool: self.clone(),
                armed: true,
            };
            return (Step::Create(slot), discard);
        }
        let max_waiting = config.max_waiting_clients;
        if max_waiting > 0 && st.waiters.len() >= max_waiting {
            st.waiters.retain(|w| !w.left());
            if st.waiters.len() >= max_waiting {
                return (Step::QueueFull, discard);
            }
        }
        let (tx, rx) = oneshot::channel();
        if st.waiters.len() >= st.prune_at {
            st.waiters.retain(|w| !w.left());
            st.prune_at = (2 * st.waiters.len()).max(MIN_PRUNE_AT);
        }
        st.waiters.push_back(Waiter {
            grant: tx,
            worker: crate::runtime::current_worker(),
            since: now,
        });
        (Step::Wait(rx), discard)
    }

    async fn wait(
        self: &Arc<Self>,
        mut rx: oneshot::Receiver<Grant>,
        started: Instant,
        deadline: Instant,
    ) -> Result<Box<BackendConn>, BorrowError> {
        let grant = match tokio::time::timeout_at(deadline.into(), &mut rx).await {
            Ok(Ok(grant)) => grant,
            Ok(Err(_)) | Err(_) => {
                // Close first so no grant can arrive after we give up, then take one that
                // raced with the timeout rather than losing it.
                rx.close();
                match rx.try_recv() {
                    Ok(grant) => grant,
                    Err(_) => return Err(self.timeout_error(started)),
                }
            }
        };
        match grant {
            Grant::Conn(conn) => Ok(conn),
            Grant::Slot(slot) => Box::pin(self.create(slot, started, deadline)).await,
        }
    }

    fn observe_borrow(&self, started: Instant) {
        self.borrow_seconds.observe(started.elapsed().as_secs_f64());
    }

    fn queue_full_error(&self) -> BorrowError {
        self.target
            .metrics
            .quota_rejections
            .with_label_values(&["pool", "waiting"])
            .inc();
        BorrowError::QueueFull {
            target: self.target.name().to_owned(),
            database: self.key.database.clone(),
            user: self.key.user.clone(),
            waiting: self.target.config().max_waiting_clients,
        }
    }

    fn timeout_error(&self, started: Instant) -> BorrowError {
        self.target
            .metrics
            .borrow_timeouts
            .with_label_values(&[self.target.name()])
            .inc();
        BorrowError::Timeout {
            waited: started.elapsed(),
            target: self.target.name().to_owned(),
            database: self.key.database.clone(),
            user: self.key.user.clone(),
            open: self.stats().open,
            size: self.target.config().pool_size,
        }
    }

    /// Opens a connection for `slot`: target capacity, a login permit, then the login,
    /// retried with backoff while the failure looks transient.
    /// Boxed by its callers: a login's state is large and rare, and inlined it would make
    /// every borrow's future (moved into a box once per transaction) that large too.
    async fn create(
        self: &Arc<Self>,
        slot: Slot,
        started: Instant,
        deadline: Instant,
    ) -> Result<Box<BackendConn>, BorrowError> {
        let target = &self.target;
        let capacity = self.target_capacity(started, deadline).await?;
        let _login = tokio::time::timeout_at(deadline.into(), target.logins.acquire())
            .await
            .map_err(|_| self.timeout_error(started))?
            .expect("the login semaphore is never closed");
        let logged_in = self.log_in(deadline).await;
        match &logged_in {
            Ok(_) => target.record_login(&self.key, true),
            Err(BorrowError::Connect(e)) if e.says_target_down() => {
                target.record_login(&self.key, false)
            }
            Err(_) => {}
        }
        let logged_in = logged_in?;
        target
            .metrics
            .backend_setups
            .with_label_values(&[target.name(), "succeeded"])
            .inc();
        {
            let mut params = lock(&self.params);
            if params.is_none() {
                *params = Some(Arc::new(logged_in.params));
            }
        }
        let now = Instant::now();
        let lifetime = target.config().max_lifetime;
        let jitter = lifetime.mul_f64(rand::thread_rng().gen_range(0.0..0.1));
        let mut read_buf = logged_in.leftover;
        read_buf.reserve(8192);
        // Boxed: pools, grants and borrows move it by pointer.
        Ok(Box::new(BackendConn::new(
            logged_in.stream,
            logged_in.key,
            logged_in.addr,
            now + lifetime - jitter,
            read_buf,
            slot,
            capacity,
            target
                .metrics
                .backend_connections
                .with_label_values(&[target.name(), "idle"]),
            target
                .metrics
                .backend_connections
                .with_label_values(&[target.name(), "borrowed"]),
        )))
    }

    /// Logs in with the current login; when the database refuses its password (28P01),
    /// reads the secret again (one call for every login refused at once) and tries the
    /// new current, the pending and the previous login in turn.
    async fn log_in(&self, deadline: Instant) -> Result<LoggedIn, BorrowError> {
        let target = &self.target;
        let user = target
            .credentials
            .user(&self.key.user)
            .await
            .ok_or_else(|| BorrowError::UnknownUser(self.key.user.clone()))?;
        let seen = user.generation();
        let first = user
            .preferred()
            .ok_or_else(|| BorrowError::CredentialsUnavailable(self.key.user.clone()))?;
        let refused = match self.connect_as(&first, deadline).await {
            Err(e) if e.is_password_refused() => e,
            other => return other.map_err(BorrowError::from),
        };
        user.mark_refused(&first);
        target
            .credentials
            .refresh(&user, seen, Refresh::BackendRefused)
            .await;
        let mut tried = vec![first];
        let mut last_error = refused;
        for (via, login) in user.candidates() {
            if tried.iter().any(|t| t.same_login(&login)) {
                continue;
            }
            match self.connect_as(&login, deadline).await {
                Ok(logged_in) => {
                    info!(target_name = %target.name(), via, "backend login succeeded with a rotated login");
                    target
                        .metrics
                        .backend_login_recoveries
                        .with_label_values(&[target.name(), via])
                        .inc();
                    return Ok(logged_in);
                }
                Err(e) if e.is_password_refused() => {
                    user.mark_refused(&login);
                    last_error = e;
                }
                Err(e) => return Err(e.into()),
            }
            tried.push(login);
        }
        Err(last_error.into())
    }

    /// One login, retried with backoff while the failure looks transient.
    async fn connect_as(&self, login: &Login, deadline: Instant) -> Result<LoggedIn, ConnectError> {
        let target = &self.target;
        let mut backoff = Duration::from_millis(50);
        loop {
            let started = Instant::now();
            let budget = deadline
                .saturating_duration_since(started)
                .min(target.config().connect_timeout)
                .max(Duration::from_millis(1));
            let attempt = backend::connect(
                &target.config(),
                target.connector.as_ref(),
                &self.key.database,
                &login.username,
                &login.password,
                budget,
            )
            .await;
            target
                .metrics
                .backend_login_seconds
                .observe(started.elapsed().as_secs_f64());
            match attempt {
                Ok(logged_in) => return Ok(logged_in),
                Err(e) => {
                    target
                        .metrics
                        .backend_setups
                        .with_label_values(&[target.name(), "failed"])
                        .inc();
                    if !e.is_transient() || Instant::now() + backoff >= deadline {
                        return Err(e);
                    }
                    debug!(target_name = %target.name(), error = %e, "backend login failed, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    async fn target_capacity(
        &self,
        started: Instant,
        deadline: Instant,
    ) -> Result<OwnedSemaphorePermit, BorrowError> {
        let target = &self.target;
        if let Ok(permit) = target.capacity.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if target.evict_idle_elsewhere(&self.key) {
            if let Ok(permit) = target.capacity.clone().try_acquire_owned() {
                return Ok(permit);
            }
        }
        target.capacity_waiters.fetch_add(1, Ordering::SeqCst);
        let acquired =
            tokio::time::timeout_at(deadline.into(), target.capacity.clone().acquire_owned()).await;
        target.capacity_waiters.fetch_sub(1, Ordering::SeqCst);
        acquired
            .map_err(|_| {
                target
                    .metrics
                    .borrow_timeouts
                    .with_label_values(&[target.name()])
                    .inc();
                BorrowError::TargetFull(started.elapsed(), target.name().to_owned())
            })
            .map(|p| p.expect("the capacity semaphore is never closed"))
    }

    /// Returns a clean, idle connection: to the longest waiter, else to the idle list.
    pub fn checkin(self: &Arc<Self>, mut conn: Box<BackendConn>) {
        let now = Instant::now();
        if conn.is_expired(now) {
            self.target.count_closed("lifetime");
            return;
        }
        conn.idle_since = now;
        conn.forget_traffic();
        let mut st = lock(&self.state);
        if st.open > self.target.config().pool_size {
            drop(st);
            self.target.count_closed("pool_resized");
            return;
        }
        let Some(Grant::Conn(mut conn)) = hand_off(&mut st, Grant::Conn(conn)) else {
            return;
        };
        if self.target.capacity_waiters.load(Ordering::SeqCst) > 0 {
            drop(st);
            self.target.count_closed("rebalanced");
            drop(conn);
            return;
        }
        conn.set_idle(true);
        st.idle.push(conn);
    }

    /// Closes a connection that must not be reused (broken, or dirty after a failed reset).
    pub fn discard(&self, conn: Box<BackendConn>, reason: &str) {
        self.target.count_closed(reason);
        drop(conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter(worker: usize, since: Instant) -> (Waiter, oneshot::Receiver<Grant>) {
        let (grant, rx) = oneshot::channel();
        (
            Waiter {
                grant,
                worker,
                since,
            },
            rx,
        )
    }

    #[test]
    fn a_returned_connection_prefers_a_waiter_on_its_own_thread_that_queued_about_as_early() {
        let now = Instant::now();
        let (a, _a) = waiter(1, now);
        let (b, b_rx) = waiter(2, now + SAME_THREAD_FIRST_FOR / 2);
        let (c, _c) = waiter(2, now + SAME_THREAD_FIRST_FOR / 2);
        let (d, _d) = waiter(3, now + SAME_THREAD_FIRST_FOR);
        let mut waiters = VecDeque::from([a, b, c, d]);
        assert_eq!(next_waiter(&waiters, 1), 0, "the front is on thread 1");
        assert_eq!(next_waiter(&waiters, 2), 1, "the first on thread 2");
        assert_eq!(next_waiter(&waiters, 4), 0, "none on thread 4: the front");
        assert_eq!(
            next_waiter(&waiters, 3),
            0,
            "thread 3's waiter queued too long after the front: strict order"
        );
        drop(b_rx);
        assert_eq!(next_waiter(&waiters, 2), 2, "a waiter that left is skipped");
        waiters.clear();
        assert_eq!(next_waiter(&waiters, 2), 0);
    }
}
