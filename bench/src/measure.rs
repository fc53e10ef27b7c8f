//! What a run measures: latency histograms (HDR), errors by SQLSTATE, a process's CPU time
//! and resident memory, and the database backends in use over time.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// Latencies in microseconds.
#[derive(Clone)]
pub struct Latency(Histogram<u64>);

impl Latency {
    pub fn new() -> Self {
        Self(Histogram::new(3).expect("3 significant digits is a valid precision"))
    }

    pub fn record(&mut self, elapsed: Duration) {
        let _ = self.0.record(elapsed.as_micros().max(1) as u64);
    }

    pub fn add(&mut self, other: &Latency) {
        self.0
            .add(&other.0)
            .expect("histograms of the same precision merge");
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    pub fn summary(&self) -> Percentiles {
        let q = |q: f64| self.0.value_at_quantile(q);
        Percentiles {
            count: self.0.len(),
            mean: self.0.mean(),
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: self.0.max(),
        }
    }

    /// (quantile, µs) points for a latency distribution chart, denser in the tail.
    pub fn curve(&self) -> Vec<(f64, u64)> {
        if self.0.is_empty() {
            return Vec::new();
        }
        let mut points = Vec::new();
        // 0 .. 0.999 on a "nines" scale: x = -log10(1 - q).
        for step in 0..=60 {
            let nines = f64::from(step) * 0.05;
            let q = 1.0 - 10f64.powf(-nines);
            points.push((q, self.0.value_at_quantile(q)));
        }
        points
    }
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

/// Percentiles of a latency histogram, in microseconds.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

/// Errors by SQLSTATE (or `connection`).
#[derive(Clone, Debug, Default)]
pub struct Errors(pub BTreeMap<String, u64>);

impl Errors {
    pub fn count(&mut self, key: String) {
        *self.0.entry(key).or_default() += 1;
    }

    pub fn add(&mut self, other: &Errors) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_default() += v;
        }
    }
}

/// CPU time (user + system) of `pid` in seconds, from /proc.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0) // USER_HZ on Linux
}

/// Resident memory of `pid` in KiB, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Samples the number of client backends of the monitor's database that are not idle (the
/// targets share one database, so open-but-idle pool connections of the other proxies are
/// left out), not counting the monitor, every 250 ms until cancelled; returns (seconds
/// since start, backends in use).
pub async fn sample_backends(
    monitor: tokio_postgres::Client,
    stop: CancellationToken,
) -> Vec<(f64, u32)> {
    let started = Instant::now();
    let mut points = Vec::new();
    let sql = "select count(*)::int4 from pg_stat_activity where backend_type = 'client backend' \
               and datname = current_database() and state <> 'idle' and pid <> pg_backend_pid()";
    loop {
        if let Ok(row) = monitor.query_one(sql, &[]).await {
            let n: i32 = row.get(0);
            points.push((started.elapsed().as_secs_f64(), n.max(0) as u32));
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
            () = stop.cancelled() => return points,
        }
    }
}
