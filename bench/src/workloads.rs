//! The workloads, each against one target: `steady` (persistent clients, pgbench-style),
//! `churn` (a new connection per transaction), `burst` (Lambda-like invocations arriving in
//! bursts) and `idle-fleet` (frozen functions holding idle connections while a few work).
//! `scale` is `steady` at growing client counts, driven by the runner.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::Semaphore;
use tokio_postgres::Client;

use crate::client::{error_key, Connector};
use crate::measure::{cpu_seconds, rss_kib, Errors, Latency};

/// Connections opened at once while building a large fleet: enough to be fast, few enough
/// not to overflow the listener's accept backlog.
const CONNECT_CONCURRENCY: usize = 200;

/// What one workload run measured.
#[derive(Default)]
pub struct Measured {
    pub seconds: f64,
    /// Transactions (steady, churn) or invocations (burst) completed.
    pub completed: u64,
    /// Latency of each statement round trip.
    pub statement: Latency,
    /// Time to the first ReadyForQuery of each new connection.
    pub connect: Latency,
    /// Connect + statements + disconnect (churn, burst).
    pub invocation: Latency,
    pub errors: Errors,
    /// Idle-fleet: resident memory the target process gained per idle connection.
    pub idle_kib_per_connection: Option<f64>,
    /// Clients connected at the peak.
    pub connected: usize,
    /// The target's CPU seconds over the part of the run that `completed` counts, when that
    /// is not the whole run (idle-fleet: the active set's transactions, not the fleet's
    /// connects); `None` to take the whole run's.
    pub cpu_seconds: Option<f64>,
}

/// The statements: a point select and a small update in a transaction, on pgbench's
/// `pgbench_accounts` (created by `pgbench -i`), unless `select` replaces the select.
#[derive(Clone)]
pub struct Statements {
    pub accounts: u32,
    pub select: Option<Arc<str>>,
}

impl Statements {
    fn point_select(&self) -> String {
        if let Some(sql) = &self.select {
            return sql.to_string();
        }
        let aid = rand::thread_rng().gen_range(1..=self.accounts);
        format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid}")
    }

    fn update(&self) -> String {
        let aid = rand::thread_rng().gen_range(1..=self.accounts);
        format!("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = {aid}")
    }
}

/// Runs `sql`, recording its latency or its error.
async fn timed(client: &Client, sql: &str, m: &mut Measured) -> Result<(), tokio_postgres::Error> {
    let started = Instant::now();
    match client.simple_query(sql).await {
        Ok(_) => {
            m.statement.record(started.elapsed());
            Ok(())
        }
        Err(e) => {
            m.errors.count(error_key(&e));
            Err(e)
        }
    }
}

/// Opens `n` connections (at most `CONNECT_CONCURRENCY` at a time).
pub async fn open_fleet(target: &Connector, n: usize) -> (Vec<Client>, Measured) {
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (target, gate) = (target.clone(), gate.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire().await.expect("the gate is never closed");
            let started = Instant::now();
            target.connect().await.map(|c| (c, started.elapsed()))
        });
    }
    let mut clients = Vec::with_capacity(n);
    let mut m = Measured::default();
    while let Some(joined) = tasks.join_next().await {
        match joined.expect("connect task") {
            Ok((client, took)) => {
                m.connect.record(took);
                clients.push(client);
            }
            Err(e) => m.errors.count(error_key(&e)),
        }
    }
    m.connected = clients.len();
    (clients, m)
}

/// `clients` persistent connections running point selects until `duration` has passed
/// (timed from when all are connected).
pub async fn steady(
    target: &Connector,
    clients: usize,
    duration: Duration,
    sql: Statements,
) -> Measured {
    let (fleet, mut total) = open_fleet(target, clients).await;
    let started = Instant::now();
    let until = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for client in fleet {
        let (target, sql) = (target.clone(), sql.clone());
        tasks.spawn(async move {
            let mut m = Measured::default();
            let mut client = Some(client);
            while Instant::now() < until {
                let Some(c) = client.as_ref() else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    client = target.connect().await.ok();
                    continue;
                };
                match timed(c, &sql.point_select(), &mut m).await {
                    Ok(()) => m.completed += 1,
                    Err(_) => client = None,
                }
            }
            m
        });
    }
    while let Some(joined) = tasks.join_next().await {
        total.merge(&joined.expect("client task"));
    }
    total.seconds = started.elapsed().as_secs_f64();
    total
}

/// `workers` loops of connect, point select, disconnect for `duration`.
pub async fn churn(
    target: &Connector,
    workers: usize,
    duration: Duration,
    sql: Statements,
) -> Measured {
    let started = Instant::now();
    let until = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (target, sql) = (target.clone(), sql.clone());
        tasks.spawn(async move {
            let mut m = Measured::default();
            while Instant::now() < until {
                let Some((client, started)) = connect_timed(&target, &mut m).await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                if timed(&client, &sql.point_select(), &mut m).await.is_ok() {
                    drop(client);
                    m.finish_invocation(started);
                }
            }
            m
        });
    }
    let mut total = Measured::default();
    while let Some(joined) = tasks.join_next().await {
        total.merge(&joined.expect("worker task"));
    }
    total.seconds = started.elapsed().as_secs_f64();
    total
}

/// How Lambda-like invocations arrive.
#[derive(Clone, Copy, Debug)]
pub struct Bursts {
    pub size: usize,
    pub interval: Duration,
    pub count: usize,
}

/// `bursts.count` bursts of `bursts.size` invocations, `bursts.interval` apart. Each
/// invocation connects, runs a point select and an update in a transaction, disconnects.
pub async fn burst(target: &Connector, bursts: Bursts, sql: Statements) -> Measured {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for b in 0..bursts.count {
        tokio::time::sleep_until((started + bursts.interval * b as u32).into()).await;
        for _ in 0..bursts.size {
            let (target, sql) = (target.clone(), sql.clone());
            tasks.spawn(async move {
                let mut m = Measured::default();
                if let Some((client, started)) = connect_timed(&target, &mut m).await {
                    let ran = async {
                        timed(&client, &sql.point_select(), &mut m).await?;
                        timed(&client, "BEGIN", &mut m).await?;
                        timed(&client, &sql.update(), &mut m).await?;
                        timed(&client, "COMMIT", &mut m).await
                    }
                    .await;
                    drop(client);
                    if ran.is_ok() {
                        m.finish_invocation(started);
                    }
                }
                m
            });
        }
    }
    let mut total = Measured::default();
    while let Some(joined) = tasks.join_next().await {
        total.merge(&joined.expect("invocation task"));
    }
    total.seconds = started.elapsed().as_secs_f64();
    total
}

/// `idle` connections opened and left idle while `active` clients run `steady` for
/// `duration`; measures the memory `pid` gained per idle connection.
pub async fn idle_fleet(
    target: &Connector,
    idle: usize,
    active: usize,
    duration: Duration,
    pid: Option<u32>,
    sql: Statements,
) -> Measured {
    let before = pid.and_then(rss_kib);
    let (fleet, opened) = open_fleet(target, idle).await;
    // Let the target settle (freed handshake buffers, allocator) before reading memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = pid.and_then(rss_kib);
    let cpu_before = pid.and_then(cpu_seconds);
    let mut m = steady(target, active, duration, sql).await;
    m.cpu_seconds = pid
        .and_then(cpu_seconds)
        .zip(cpu_before)
        .map(|(a, b)| a - b);
    m.connect = opened.connect;
    m.errors.add(&opened.errors);
    m.connected = fleet.len() + active;
    m.idle_kib_per_connection = match (before, after) {
        (Some(b), Some(a)) if !fleet.is_empty() => Some((a as f64 - b as f64) / fleet.len() as f64),
        _ => None,
    };
    drop(fleet);
    m
}

/// A new connection with its connect latency recorded; the invocation's start time.
async fn connect_timed(target: &Connector, m: &mut Measured) -> Option<(Client, Instant)> {
    let started = Instant::now();
    match target.connect().await {
        Ok(client) => {
            m.connect.record(started.elapsed());
            Some((client, started))
        }
        Err(e) => {
            m.errors.count(error_key(&e));
            None
        }
    }
}

impl Measured {
    fn finish_invocation(&mut self, started: Instant) {
        self.invocation.record(started.elapsed());
        self.completed += 1;
    }

    fn merge(&mut self, other: &Measured) {
        self.completed += other.completed;
        self.statement.add(&other.statement);
        self.connect.add(&other.connect);
        self.invocation.add(&other.invocation);
        self.errors.add(&other.errors);
        self.connected += other.connected;
    }
}
