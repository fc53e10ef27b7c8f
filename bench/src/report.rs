//! The report: every raw sample as JSON, and a Markdown summary of medians, min–max and
//! ratios to the baseline, per workload, plus the goals pgwarden is held to.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::measure::Percentiles;

/// One workload run against one target in one round.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    pub workload: String,
    pub target: String,
    pub round: usize,
    /// Concurrent clients (steady, scale), workers (churn), invocations per burst (burst)
    /// or idle connections (idle-fleet).
    pub clients: usize,
    pub seconds: f64,
    /// Transactions or invocations completed.
    pub completed: u64,
    /// `completed` per second.
    pub throughput: f64,
    pub statement: Percentiles,
    pub connect: Option<Percentiles>,
    pub invocation: Option<Percentiles>,
    pub errors: BTreeMap<String, u64>,
    pub connected: usize,
    /// CPU time of the target's process per completed unit (idle-fleet: over the active
    /// set's transactions only, not the fleet's connects).
    pub cpu_us_per_unit: Option<f64>,
    /// Resident memory of the target's process at the end.
    pub rss_kib: Option<u64>,
    pub idle_kib_per_connection: Option<f64>,
    /// (seconds, database client backends) during the run.
    pub backends: Vec<(f64, u32)>,
    /// (quantile, µs) of statement latency.
    pub latency_curve: Vec<(f64, u64)>,
}

/// Medians over rounds for one workload, client count and target.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub workload: String,
    pub clients: usize,
    pub target: String,
    pub rounds: usize,
    pub throughput: f64,
    pub throughput_min: f64,
    pub throughput_max: f64,
    /// Median throughput divided by the baseline's.
    pub ratio_to_baseline: Option<f64>,
    pub p50_us: f64,
    pub p99_us: f64,
    pub connect_p99_us: Option<f64>,
    pub invocation_p99_us: Option<f64>,
    pub errors: u64,
    pub cpu_us_per_unit: Option<f64>,
    pub rss_kib: Option<f64>,
    pub idle_kib_per_connection: Option<f64>,
}

/// A goal from issue 6, met or not, measured in this run.
#[derive(Clone, Debug, Serialize)]
pub struct Goal {
    pub goal: String,
    pub measured: String,
    /// `None` when the run lacks what the goal needs.
    pub met: Option<bool>,
}

/// The whole report.
#[derive(Serialize)]
pub struct Report {
    pub command: String,
    pub machine: String,
    pub started: String,
    pub baseline: String,
    pub candidate: Option<String>,
    pub direct: Option<String>,
    pub summaries: Vec<Summary>,
    pub goals: Vec<Goal>,
    pub samples: Vec<Sample>,
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 0 {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}

/// Medians per (workload, clients, target), in the order the samples came.
pub fn summarize(samples: &[Sample], baseline: &str) -> Vec<Summary> {
    let mut keys: Vec<(String, usize, String)> = Vec::new();
    for s in samples {
        let key = (s.workload.clone(), s.clients, s.target.clone());
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    let mut out: Vec<Summary> = keys
        .into_iter()
        .map(|(workload, clients, target)| {
            let runs: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.workload == workload && s.clients == clients && s.target == target)
                .collect();
            let of = |f: &dyn Fn(&Sample) -> Option<f64>| {
                median(runs.iter().filter_map(|s| f(s)).collect())
            };
            let throughputs: Vec<f64> = runs.iter().map(|s| s.throughput).collect();
            Summary {
                rounds: runs.len(),
                throughput: median(throughputs.clone()).unwrap_or(0.0),
                throughput_min: throughputs.iter().copied().fold(f64::INFINITY, f64::min),
                throughput_max: throughputs.iter().copied().fold(0.0, f64::max),
                ratio_to_baseline: None,
                p50_us: of(&|s| (s.statement.count > 0).then_some(s.statement.p50 as f64))
                    .unwrap_or(0.0),
                p99_us: of(&|s| (s.statement.count > 0).then_some(s.statement.p99 as f64))
                    .unwrap_or(0.0),
                connect_p99_us: of(&|s| {
                    s.connect
                        .as_ref()
                        .filter(|p| p.count > 0)
                        .map(|p| p.p99 as f64)
                }),
                invocation_p99_us: of(&|s| {
                    s.invocation
                        .as_ref()
                        .filter(|p| p.count > 0)
                        .map(|p| p.p99 as f64)
                }),
                errors: runs.iter().map(|s| s.errors.values().sum::<u64>()).sum(),
                cpu_us_per_unit: of(&|s| s.cpu_us_per_unit),
                rss_kib: of(&|s| s.rss_kib.map(|k| k as f64)),
                // The largest growth: later rounds reuse memory the allocator kept.
                idle_kib_per_connection: runs
                    .iter()
                    .filter_map(|s| s.idle_kib_per_connection)
                    .reduce(f64::max),
                workload,
                clients,
                target,
            }
        })
        .collect();
    for i in 0..out.len() {
        let base = out
            .iter()
            .find(|b| {
                b.workload == out[i].workload && b.clients == out[i].clients && b.target == baseline
            })
            .map(|b| b.throughput);
        out[i].ratio_to_baseline = base.filter(|b| *b > 0.0).map(|b| out[i].throughput / b);
    }
    out
}

fn find<'a>(s: &'a [Summary], workload: &str, target: &str) -> Option<&'a Summary> {
    s.iter()
        .filter(|x| x.workload == workload && x.target == target)
        .max_by_key(|x| x.clients)
}

/// Judges issue 6's goals for `candidate` against `baseline` and `direct`.
pub fn goals(s: &[Summary], candidate: &str, baseline: &str, direct: Option<&str>) -> Vec<Goal> {
    let mut goals = Vec::new();
    let ratio = |workload: &str, other: &str| -> Option<f64> {
        let c = find(s, workload, candidate)?;
        let o = find(s, workload, other)?;
        (o.throughput > 0.0).then(|| c.throughput / o.throughput)
    };
    let at_least = |goal: String, r: Option<f64>, min: f64| Goal {
        measured: r.map_or_else(|| "not measured".to_owned(), |r| format!("{r:.2}×")),
        met: r.map(|r| r >= min),
        goal,
    };
    goals.push(at_least(
        format!("steady select-only: {candidate} throughput ≥ 1.0× {baseline}"),
        ratio("steady", baseline),
        1.0,
    ));
    for workload in ["churn", "churn-tls"] {
        goals.push(at_least(
            format!("{workload} (new connection per transaction): ≥ 1.0× {baseline}"),
            ratio(workload, baseline),
            1.0,
        ));
        if let Some(direct) = direct {
            goals.push(at_least(
                format!("{workload}: ≥ 3× direct Postgres ({direct})"),
                ratio(workload, direct),
                3.0,
            ));
        }
    }
    if let Some(direct) = direct {
        let added = |t: &str| -> Option<f64> {
            Some(find(s, "steady", t)?.p99_us - find(s, "steady", direct)?.p99_us)
        };
        let (c, b) = (added(candidate), added(baseline));
        goals.push(Goal {
            goal: format!("steady: p99 latency added over direct Postgres ≤ {baseline}'s"),
            measured: match (c, b) {
                (Some(c), Some(b)) => format!("{candidate} {c:+.0} µs, {baseline} {b:+.0} µs"),
                _ => "not measured".to_owned(),
            },
            met: c.zip(b).map(|(c, b)| c <= b),
        });
    }
    let idle = |t: &str| {
        find(s, "idle-fleet", t).and_then(|x| x.idle_kib_per_connection.map(|k| (k, x.clients)))
    };
    let (c, b) = (idle(candidate), idle(baseline));
    goals.push(Goal {
        goal: format!("memory per idle client connection ≤ {baseline}'s"),
        measured: match (c, b) {
            (Some((c, n)), Some((b, _))) => {
                // In bytes: the goal is judged on the unrounded figures, which at 0.1 KiB
                // often read the same.
                let (c, b) = (c * 1024.0, b * 1024.0);
                format!("{candidate} {c:.0} B, {baseline} {b:.0} B (at {n} idle clients)")
            }
            _ => "not measured".to_owned(),
        },
        met: c.zip(b).map(|(c, b)| c.0 <= b.0),
    });
    let top = find(s, "scale", candidate);
    goals.push(Goal {
        goal: format!("scale: {candidate} at its largest client count: zero errors"),
        measured: top.map_or_else(
            || "not measured".to_owned(),
            |t| format!("{} clients, {} errors", t.clients, t.errors),
        ),
        met: top.map(|t| t.errors == 0),
    });
    goals
}

fn us(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} ms", v / 1000.0)
    } else {
        format!("{v:.0} µs")
    }
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "–".to_owned(), f)
}

/// What each workload's throughput counts.
fn unit(workload: &str) -> &'static str {
    match workload {
        "churn" | "churn-tls" => "connections/s",
        "burst" => "invocations/s",
        _ => "transactions/s",
    }
}

/// The Markdown summary.
pub fn markdown(report: &Report, charts: &[String]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# pgwarden benchmark report\n");
    let _ = writeln!(md, "- Command: `{}`", report.command);
    let _ = writeln!(md, "- Machine: {}", report.machine);
    let _ = writeln!(md, "- Started: {}", report.started);
    let _ = writeln!(
        md,
        "- Figures are medians over interleaved rounds (min–max in brackets); ratios are to `{}`. \
         Idle KiB/conn is the largest resident-memory growth per idle connection over the rounds \
         (a process reuses memory its allocator kept from an earlier round).\n",
        report.baseline
    );
    if !report.goals.is_empty() {
        let _ = writeln!(
            md,
            "## Goals\n\n| goal | measured | result |\n|---|---|---|"
        );
        for g in &report.goals {
            let result = match g.met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "not measured",
            };
            let _ = writeln!(md, "| {} | {} | {} |", g.goal, g.measured, result);
        }
        md.push('\n');
    }
    let mut workloads: Vec<&str> = Vec::new();
    for s in &report.summaries {
        if !workloads.contains(&s.workload.as_str()) {
            workloads.push(&s.workload);
        }
    }
    for workload in workloads {
        let _ = writeln!(md, "## {workload}\n");
        if workload == "idle-fleet" {
            let _ = writeln!(
                md,
                "Throughput, latency and CPU/unit are the active set's, measured while the idle \
                 fleet stays connected (the fleet's connects are not counted); idle KiB/conn is \
                 the resident memory the target gained per idle client.\n"
            );
        }
        let _ = writeln!(
            md,
            "| target | clients | {} | ratio | p50 | p99 | connect p99 | invocation p99 | errors | CPU/unit | RSS | idle KiB/conn |",
            unit(workload)
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|");
        for s in report.summaries.iter().filter(|s| s.workload == workload) {
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} ({:.0}–{:.0}) | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                s.target,
                s.clients,
                s.throughput,
                s.throughput_min,
                s.throughput_max,
                opt(s.ratio_to_baseline, |r| format!("{r:.2}×")),
                us(s.p50_us),
                us(s.p99_us),
                opt(s.connect_p99_us, us),
                opt(s.invocation_p99_us, us),
                s.errors,
                opt(s.cpu_us_per_unit, |c| format!("{c:.0} µs")),
                opt(s.rss_kib, |k| format!("{:.1} MiB", k / 1024.0)),
                opt(s.idle_kib_per_connection, |k| format!("{k:.1}")),
            );
        }
        md.push('\n');
    }
    if !charts.is_empty() {
        let _ = writeln!(md, "## Charts\n");
        for chart in charts {
            let _ = writeln!(md, "![{chart}]({chart})\n");
        }
    }
    let _ = writeln!(
        md,
        "Errors by SQLSTATE, every percentile and the backend connection samples of every run are in `report.json`."
    );
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(target: &str, round: usize, throughput: f64, idle: Option<f64>) -> Sample {
        Sample {
            workload: "idle-fleet".into(),
            target: target.into(),
            round,
            clients: 100,
            seconds: 1.0,
            completed: throughput as u64,
            throughput,
            statement: Percentiles::default(),
            connect: None,
            invocation: None,
            errors: BTreeMap::new(),
            connected: 100,
            cpu_us_per_unit: None,
            rss_kib: None,
            idle_kib_per_connection: idle,
            backends: Vec::new(),
            latency_curve: Vec::new(),
        }
    }

    #[test]
    fn summaries_are_medians_with_ratios_and_the_largest_idle_growth() {
        let samples = [
            sample("base", 0, 100.0, Some(1.0)),
            sample("cand", 0, 90.0, Some(4.0)),
            sample("base", 1, 120.0, Some(0.0)),
            sample("cand", 1, 150.0, Some(2.0)),
            sample("base", 2, 110.0, Some(0.0)),
            sample("cand", 2, 99.0, Some(2.0)),
        ];
        let s = summarize(&samples, "base");
        let cand = s.iter().find(|x| x.target == "cand").expect("cand");
        assert_eq!(cand.throughput, 99.0);
        assert_eq!((cand.throughput_min, cand.throughput_max), (90.0, 150.0));
        assert_eq!(cand.ratio_to_baseline, Some(0.9));
        assert_eq!(cand.idle_kib_per_connection, Some(4.0));
        let goals = goals(&s, "cand", "base", None);
        let idle = goals
            .iter()
            .find(|g| g.goal.contains("idle"))
            .expect("idle goal");
        assert_eq!(idle.met, Some(false), "4.0 KiB > 1.0 KiB");
        assert_eq!(
            idle.measured,
            "cand 4096 B, base 1024 B (at 100 idle clients)"
        );
    }
}
