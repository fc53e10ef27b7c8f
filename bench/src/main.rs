//! pgwarden-bench: load that behaves like a fleet of Lambda functions, run against any
//! number of named targets (pgwarden, PgBouncer, Postgres itself) interleaved round by round
//! so machine drift affects all alike, with a report (JSON, Markdown, PNG charts) of medians,
//! ranges and ratios to a baseline. `scripts/bench` starts the targets and runs the standard
//! suite.

mod charts;
mod client;
mod measure;
mod report;
mod workloads;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::client::Connector;
use crate::measure::{cpu_seconds, rss_kib, sample_backends};
use crate::report::{Report, Sample};
use crate::workloads::{Bursts, Measured, Statements};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "pgwarden-bench",
    about = "Lambda-fleet load against pgwarden, PgBouncer and Postgres, with a side-by-side report",
    args_override_self = true
)]
struct Args {
    /// A target as NAME=DSN (tokio-postgres key=value or URL); repeat for each.
    #[arg(long = "target", value_parser = named::<String>, required = true)]
    targets: Vec<(String, String)>,
    /// Target the ratios are computed against (default: the first).
    #[arg(long)]
    baseline: Option<String>,
    /// Target whose goals the report judges (default: `pgwarden` if there is one).
    #[arg(long)]
    candidate: Option<String>,
    /// Target that is Postgres itself (for "added latency" and the churn goal).
    #[arg(long)]
    direct: Option<String>,
    /// Process to measure for a target (CPU per transaction, memory), as NAME=PID.
    #[arg(long = "pid", value_parser = named::<u32>)]
    pids: Vec<(String, u32)>,
    /// DSN straight to Postgres, connected to the database the targets use, to sample its
    /// client backends (pg_stat_activity; a superuser sees every row).
    #[arg(long)]
    monitor: Option<String>,
    /// Workloads to run, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "steady,churn,churn-tls,burst,idle-fleet,scale"
    )]
    workloads: Vec<Workload>,
    /// Rounds: each workload runs on every target once per round.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Length of a steady, churn or idle-fleet run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Persistent clients in `steady`; workers in `churn`.
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// Invocations per burst.
    #[arg(long, default_value_t = 200)]
    burst_size: usize,
    /// Time between bursts.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    burst_interval: Duration,
    /// Bursts per run.
    #[arg(long, default_value_t = 5)]
    bursts: usize,
    /// Idle connections in `idle-fleet`.
    #[arg(long, default_value_t = 10_000)]
    idle: usize,
    /// Active clients running transactions beside the idle fleet.
    #[arg(long, default_value_t = 10)]
    active: usize,
    /// Client counts of `scale`.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000,10000")]
    scale: Vec<usize>,
    /// Length of each `scale` step.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    scale_duration: Duration,
    /// Most concurrent clients given to the direct target (its max_connections); larger
    /// steps skip it.
    #[arg(long, default_value_t = 90)]
    direct_max_clients: usize,
    /// Rows of pgbench_accounts (pgbench -i -s N makes N × 100000).
    #[arg(long, default_value_t = 100_000)]
    accounts: u32,
    /// A statement to run instead of the point select on pgbench_accounts (e.g. `select 1`
    /// against a database without pgbench's tables).
    #[arg(long)]
    select: Option<String>,
    /// TLS for every workload but `churn` (always plain) and `churn-tls` (always TLS).
    #[arg(long)]
    tls: bool,
    /// Directory the report is written to.
    #[arg(long, default_value = "bench-report")]
    out: PathBuf,
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

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    Steady,
    Churn,
    ChurnTls,
    Burst,
    IdleFleet,
    Scale,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Steady => "steady",
            Workload::Churn => "churn",
            Workload::ChurnTls => "churn-tls",
            Workload::Burst => "burst",
            Workload::IdleFleet => "idle-fleet",
            Workload::Scale => "scale",
        }
    }
}

fn named<T: std::str::FromStr>(s: &str) -> Result<(String, T), String> {
    let (name, value) = s.split_once('=').ok_or("expected NAME=VALUE")?;
    let value = value
        .parse()
        .map_err(|_| format!("invalid value for {name}"))?;
    Ok((name.to_owned(), value))
}

/// A target ready to connect to, plain and TLS.
struct Target {
    name: String,
    plain: Connector,
    tls: Connector,
    pid: Option<u32>,
}

/// One unit of the plan.
struct Step {
    workload: Workload,
    clients: usize,
    round: usize,
    target: usize,
}

/// The DSN with an IAM token as the password, when `--iam` asks for one.
async fn with_iam_token(args: &Args, dsn: &str) -> anyhow::Result<String> {
    let Some(mode) = args.iam else {
        return Ok(dsn.to_owned());
    };
    let config: tokio_postgres::Config = dsn.parse().context("parsing a target DSN")?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "localhost".to_owned(),
    };
    let token = pgwarden::token_cli::token(&pgwarden::token_cli::TokenArgs {
        mode,
        host,
        port: config.get_ports().first().copied().unwrap_or(5432),
        user: config
            .get_user()
            .context("a target DSN names no user")?
            .to_owned(),
        region: None,
        server_id: args.iam_server_id.clone(),
        sts_endpoint: args.iam_sts_endpoint.clone(),
    })
    .await?;
    // key=value form accepts a later password that overrides the first.
    Ok(format!("{dsn} password='{token}'"))
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kib: u64 = m.lines().next()?.split_whitespace().nth(1)?.parse().ok()?;
            Some(format!("{:.1} GiB RAM", kib as f64 / 1024.0 / 1024.0))
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} CPUs ({model}), {memory}, Linux {}", kernel.trim())
}

/// How many clients a step of `workload` uses.
fn step_clients(args: &Args, workload: Workload) -> Vec<usize> {
    match workload {
        Workload::Steady | Workload::Churn | Workload::ChurnTls => vec![args.clients],
        Workload::Burst => vec![args.burst_size],
        Workload::IdleFleet => vec![args.idle],
        Workload::Scale => args.scale.clone(),
    }
}

async fn run_step(
    args: &Args,
    target: &Target,
    step: &Step,
    monitor: Option<&str>,
) -> anyhow::Result<Sample> {
    let sql = Statements {
        accounts: args.accounts,
        select: args.select.as_deref().map(Arc::from),
    };
    let connector = match step.workload {
        Workload::Churn => &target.plain,
        Workload::ChurnTls => &target.tls,
        _ if args.tls => &target.tls,
        _ => &target.plain,
    };
    let stop = CancellationToken::new();
    let sampler = match monitor {
        Some(dsn) => {
            let (client, connection) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
                .await
                .context("connecting --monitor")?;
            tokio::spawn(connection);
            Some(tokio::spawn(sample_backends(client, stop.clone())))
        }
        None => None,
    };
    let cpu_before = target.pid.and_then(cpu_seconds);
    let m: Measured = match step.workload {
        Workload::Steady => workloads::steady(connector, step.clients, args.duration, sql).await,
        Workload::Scale => {
            workloads::steady(connector, step.clients, args.scale_duration, sql).await
        }
        Workload::Churn | Workload::ChurnTls => {
            workloads::churn(connector, step.clients, args.duration, sql).await
        }
        Workload::Burst => {
            let bursts = Bursts {
                size: step.clients,
                interval: args.burst_interval,
                count: args.bursts,
            };
            workloads::burst(connector, bursts, sql).await
        }
        Workload::IdleFleet => {
            workloads::idle_fleet(
                connector,
                step.clients,
                args.active,
                args.duration,
                target.pid,
                sql,
            )
            .await
        }
    };
    let cpu = m.cpu_seconds.or_else(|| {
        target
            .pid
            .and_then(cpu_seconds)
            .zip(cpu_before)
            .map(|(a, b)| a - b)
    });
    let rss = target.pid.and_then(rss_kib);
    stop.cancel();
    let backends = match sampler {
        Some(task) => task.await.unwrap_or_default(),
        None => Vec::new(),
    };
    let optional = |p: &measure::Latency| (p.count() > 0).then(|| p.summary());
    Ok(Sample {
        workload: step.workload.name().to_owned(),
        target: target.name.clone(),
        round: step.round,
        clients: step.clients,
        seconds: m.seconds,
        completed: m.completed,
        throughput: if m.seconds > 0.0 {
            m.completed as f64 / m.seconds
        } else {
            0.0
        },
        statement: m.statement.summary(),
        connect: optional(&m.connect),
        invocation: optional(&m.invocation),
        errors: m.errors.0.clone(),
        connected: m.connected,
        cpu_us_per_unit: cpu
            .filter(|_| m.completed > 0)
            .map(|c| c * 1e6 / m.completed as f64),
        rss_kib: rss,
        idle_kib_per_connection: m.idle_kib_per_connection,
        backends,
        latency_curve: m.statement.curve(),
    })
}

/// `arg` with the values of `password=` and of a URL's `user:password@` masked, so the
/// report can be shared.
fn redact(arg: &str) -> String {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(at) = rest.find("password=") {
        let value = at + "password=".len();
        out.push_str(&rest[..value]);
        out.push_str("***");
        rest = &rest[value..];
        rest = &rest[rest.find(' ').unwrap_or(rest.len())..];
    }
    out.push_str(rest);
    if let Some(scheme) = out.find("://") {
        let authority = scheme + 3;
        if let Some(at) = out[authority..].find('@').map(|a| a + authority) {
            if let Some(colon) = out[authority..at].find(':').map(|c| c + authority) {
                out.replace_range(colon + 1..at, "***");
            }
        }
    }
    out
}

fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // 10,000 clients need 10,000 sockets.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let mut targets = Vec::new();
    for (name, dsn) in &args.targets {
        let dsn = with_iam_token(&args, dsn).await?;
        targets.push(Target {
            name: name.clone(),
            plain: Connector::new(&dsn, false).with_context(|| format!("target {name}"))?,
            tls: Connector::new(&dsn, true).with_context(|| format!("target {name}"))?,
            pid: args.pids.iter().find(|(n, _)| n == name).map(|(_, p)| *p),
        });
    }
    let names: Vec<String> = targets.iter().map(|t| t.name.clone()).collect();
    let baseline = args.baseline.clone().unwrap_or_else(|| names[0].clone());
    let candidate = args
        .candidate
        .clone()
        .or_else(|| names.iter().find(|n| *n == "pgwarden").cloned());
    for name in [Some(&baseline), candidate.as_ref(), args.direct.as_ref()]
        .into_iter()
        .flatten()
    {
        anyhow::ensure!(names.contains(name), "{name} is not a --target");
    }

    let mut plan = Vec::new();
    for &workload in &args.workloads {
        for clients in step_clients(&args, workload) {
            for round in 0..args.rounds {
                for (target, t) in targets.iter().enumerate() {
                    let direct = args.direct.as_deref() == Some(t.name.as_str());
                    let total = if workload == Workload::IdleFleet {
                        clients + args.active
                    } else {
                        clients
                    };
                    if direct
                        && total > args.direct_max_clients
                        && workload != Workload::Churn
                        && workload != Workload::ChurnTls
                    {
                        continue;
                    }
                    plan.push(Step {
                        workload,
                        clients,
                        round,
                        target,
                    });
                }
            }
        }
    }
    let started_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let started = Instant::now();
    let mut samples = Vec::new();
    for (i, step) in plan.iter().enumerate() {
        let target = &targets[step.target];
        let elapsed = started.elapsed();
        let left = if i == 0 {
            "?".to_owned()
        } else {
            format_duration(elapsed / i as u32 * (plan.len() - i) as u32)
        };
        eprintln!(
            "[{}/{}] {} ({} clients) · {} · round {}/{} · elapsed {} · ~{} left",
            i + 1,
            plan.len(),
            step.workload.name(),
            step.clients,
            target.name,
            step.round + 1,
            args.rounds,
            format_duration(elapsed),
            left
        );
        let sample = run_step(&args, target, step, args.monitor.as_deref()).await?;
        eprintln!(
            "        {:.0}/s, p99 {} µs, {} errors",
            sample.throughput,
            sample.statement.p99,
            sample.errors.values().sum::<u64>()
        );
        samples.push(sample);
        // Let the target close what the step left open before the next one measures.
        tokio::time::sleep(Duration::from_millis(if step.clients > 1000 {
            3000
        } else {
            500
        }))
        .await;
    }

    let summaries = report::summarize(&samples, &baseline);
    let goals = candidate
        .as_deref()
        .map(|c| report::goals(&summaries, c, &baseline, args.direct.as_deref()))
        .unwrap_or_default();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let charts = if charts::load_font() {
        charts::write_all(&args.out, &samples, &summaries, &names)
    } else {
        eprintln!("no TTF font found (install fonts-dejavu-core): charts skipped");
        Vec::new()
    };
    let report = Report {
        command: std::env::args()
            .map(|a| redact(&a))
            .collect::<Vec<_>>()
            .join(" "),
        machine: machine(),
        started: started_at,
        baseline,
        candidate,
        direct: args.direct.clone(),
        summaries,
        goals,
        samples,
    };
    std::fs::write(
        args.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let md = report::markdown(&report, &charts);
    std::fs::write(args.out.join("report.md"), &md)?;
    println!("{md}");
    eprintln!(
        "report written to {} in {}",
        args.out.display(),
        format_duration(started.elapsed())
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn reports_never_show_passwords() {
        assert_eq!(
            redact("pgwarden=host=h password=s3cret dbname=b"),
            "pgwarden=host=h password=*** dbname=b"
        );
        assert_eq!(redact("password=a password=b"), "password=*** password=***");
        assert_eq!(
            redact("x=postgresql://app:s3cret@h:5432/db"),
            "x=postgresql://app:***@h:5432/db"
        );
        assert_eq!(redact("--rounds"), "--rounds");
    }
}
