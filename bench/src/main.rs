//! pgwarden-bench: load that behaves like a fleet of short-lived clients.
//!
//! Today it runs one workload against one target per invocation: `steady` (persistent
//! clients running a statement in a loop) or, with `--connect-per-transaction`, the Lambda
//! pattern of a new connection per transaction. It reports throughput, latency percentiles
//! from HDR histograms, errors by SQLSTATE, and the CPU time a process (the proxy) spent.
//! Side-by-side runs and the report come with the bench harness work.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use hdrhistogram::Histogram;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "pgwarden-bench",
    about = "Load generator for pgwarden, PgBouncer or Postgres"
)]
struct Args {
    /// tokio-postgres connection string (key=value or postgresql:// URL).
    #[arg(long)]
    dsn: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// How long to run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Statement each transaction runs.
    #[arg(long, default_value = "select 1")]
    query: String,
    /// Open a new connection for every transaction (the Lambda pattern).
    #[arg(long)]
    connect_per_transaction: bool,
    /// Process whose CPU time (utime + stime) is reported per transaction, e.g. the proxy.
    #[arg(long)]
    pid: Option<u32>,
    /// Log in with an IAM token instead of the DSN's password, made by the same code as
    /// `pgwarden token` from the AWS SDK's default credential chain.
    #[arg(long, value_enum)]
    iam: Option<pgwarden::token_cli::TokenMode>,
    /// pgwarden's iam.server_id (with `--iam sts`).
    #[arg(long)]
    iam_server_id: Option<String>,
    /// STS endpoint (with `--iam sts`; default https://sts.REGION.amazonaws.com).
    #[arg(long)]
    iam_sts_endpoint: Option<String>,
}

/// The DSN with an IAM token as the password, when `--iam` asks for one.
async fn with_iam_token(args: &Args) -> anyhow::Result<String> {
    let Some(mode) = args.iam else {
        return Ok(args.dsn.clone());
    };
    let config: tokio_postgres::Config = args.dsn.parse().context("parsing --dsn")?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "localhost".to_owned(),
    };
    let token = pgwarden::token_cli::token(&pgwarden::token_cli::TokenArgs {
        mode,
        host,
        port: config.get_ports().first().copied().unwrap_or(5432),
        user: config.get_user().context("--dsn names no user")?.to_owned(),
        region: None,
        server_id: args.iam_server_id.clone(),
        sts_endpoint: args.iam_sts_endpoint.clone(),
    })
    .await?;
    // key=value form accepts a later password that overrides the first.
    Ok(format!("{} password='{}'", args.dsn, token))
}

/// What one client saw.
struct ClientResult {
    latency_us: Histogram<u64>,
    errors: BTreeMap<String, u64>,
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

async fn connect(dsn: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

fn error_key(e: &tokio_postgres::Error) -> String {
    e.code()
        .map_or_else(|| "connection".to_owned(), |c| c.code().to_owned())
}

async fn run_client(args: Args, until: Instant) -> ClientResult {
    let mut result = ClientResult {
        latency_us: Histogram::new(3).expect("3 significant digits is a valid precision"),
        errors: BTreeMap::new(),
    };
    let mut persistent = None;
    while Instant::now() < until {
        let started = Instant::now();
        let outcome = async {
            if args.connect_per_transaction || persistent.is_none() {
                persistent = Some(connect(&args.dsn).await?);
            }
            let client = persistent.as_ref().expect("connected just above");
            client.simple_query(&args.query).await?;
            if args.connect_per_transaction {
                persistent = None;
            }
            Ok::<_, tokio_postgres::Error>(())
        }
        .await;
        match outcome {
            Ok(()) => {
                let _ = result
                    .latency_us
                    .record(started.elapsed().as_micros() as u64);
            }
            Err(e) => {
                *result.errors.entry(error_key(&e)).or_default() += 1;
                persistent = None;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    result
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    args.dsn = with_iam_token(&args).await?;
    let ticks_per_second = 100.0; // USER_HZ on Linux
    let cpu_before = args.pid.and_then(cpu_ticks);
    let started = Instant::now();
    let until = started + args.duration;
    let tasks: Vec<_> = (0..args.clients)
        .map(|_| tokio::spawn(run_client(args.clone(), until)))
        .collect();
    let mut latency = Histogram::<u64>::new(3).expect("valid precision");
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for task in tasks {
        let r = task.await.context("client task")?;
        latency.add(&r.latency_us).context("merging histograms")?;
        for (k, v) in r.errors {
            *errors.entry(k).or_default() += v;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let count = latency.len();
    println!(
        "transactions {count}  tps {:.0}  latency p50 {} us  p99 {} us  p99.9 {} us",
        count as f64 / elapsed,
        latency.value_at_quantile(0.5),
        latency.value_at_quantile(0.99),
        latency.value_at_quantile(0.999)
    );
    if let (Some(pid), Some(before)) = (args.pid, cpu_before) {
        if let Some(after) = cpu_ticks(pid) {
            let cpu_s = (after - before) as f64 / ticks_per_second;
            println!(
                "process {pid}: {:.1} s CPU, {:.1} us per transaction",
                cpu_s,
                cpu_s * 1e6 / count.max(1) as f64
            );
        }
    }
    let failed: u64 = errors.values().sum();
    println!("errors {failed} {errors:?}");
    Ok(())
}
