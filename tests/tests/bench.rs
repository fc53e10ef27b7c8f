//! The bench harness end to end, in miniature: every workload against Postgres itself and
//! pgwarden, interleaved, producing the JSON report, the Markdown summary with ratios and
//! goals, and the PNG charts, without a password in any of them. (Speed is measured by
//! `scripts/bench`, never asserted here.)

use pgwarden_tests::{PgCluster, Pgwarden, PgwardenOptions};

const PASSWORD: &str = "bench-harness-pw";

#[tokio::test]
async fn the_bench_runs_every_workload_and_writes_the_report() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(
        &cluster,
        PgwardenOptions {
            users: vec![("app".into(), PASSWORD.into())],
            ..PgwardenOptions::default()
        },
    )
    .await;
    cluster.init_pgbench(PASSWORD);

    let dsn =
        |port: u16| format!("host=127.0.0.1 port={port} user=app password={PASSWORD} dbname=app");
    let out_dir = tempfile::tempdir().expect("temp dir");
    let bench = pgwarden_tests::pgwarden_binary().with_file_name("pgwarden-bench");
    let monitor = cluster
        .superuser_dsn()
        .replace("dbname=postgres", "dbname=app");
    let out = tokio::process::Command::new(bench)
        .args(["--target", &format!("postgres={}", dsn(cluster.port()))])
        .args(["--target", &format!("pgwarden={}", dsn(pgwarden.port()))])
        .args(["--baseline", "postgres", "--direct", "postgres"])
        .args(["--pid", &format!("pgwarden={}", pgwarden.pid())])
        .args(["--monitor", &monitor])
        .args(["--workloads", "steady,churn,burst,idle-fleet,scale"])
        .args(["--rounds", "1", "--duration", "1s", "--clients", "5"])
        .args([
            "--bursts",
            "2",
            "--burst-size",
            "10",
            "--burst-interval",
            "200ms",
        ])
        .args([
            "--idle",
            "50",
            "--active",
            "2",
            "--scale",
            "5,40",
            "--scale-duration",
            "1s",
        ])
        .args(["--direct-max-clients", "30"])
        .args(["--out", &out_dir.path().display().to_string()])
        .output()
        .await
        .expect("run pgwarden-bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("[1/") && stderr.contains("left"),
        "progress is shown: {stderr}"
    );

    let read = |name: &str| {
        std::fs::read(out_dir.path().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let json = String::from_utf8(read("report.json")).expect("UTF-8");
    let report: serde_json::Value = serde_json::from_str(&json).expect("report.json is JSON");
    let samples = report["samples"].as_array().expect("samples");
    let runs: Vec<(String, String, u64)> = samples
        .iter()
        .map(|s| {
            (
                s["workload"].as_str().unwrap_or_default().to_owned(),
                s["target"].as_str().unwrap_or_default().to_owned(),
                s["clients"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    let expected = [
        ("steady", "postgres", 5),
        ("steady", "pgwarden", 5),
        ("churn", "postgres", 5),
        ("churn", "pgwarden", 5),
        ("burst", "postgres", 10),
        ("burst", "pgwarden", 10),
        // 52 clients are more than --direct-max-clients: Postgres itself is skipped.
        ("idle-fleet", "pgwarden", 50),
        ("scale", "postgres", 5),
        ("scale", "pgwarden", 5),
        ("scale", "pgwarden", 40),
    ];
    let expected: Vec<(String, String, u64)> = expected
        .iter()
        .map(|(w, t, c)| ((*w).to_owned(), (*t).to_owned(), *c))
        .collect();
    assert_eq!(runs, expected, "interleaved order, skips as configured");
    for s in samples {
        assert_eq!(s["errors"], serde_json::json!({}), "{s}");
        assert!(s["completed"].as_u64().unwrap_or(0) > 0, "{s}");
        assert!(s["statement"]["p99"].as_u64().unwrap_or(0) > 0, "{s}");
        assert!(
            !s["backends"]
                .as_array()
                .expect("backend samples")
                .is_empty(),
            "{s}"
        );
    }
    let idle = samples
        .iter()
        .find(|s| s["workload"] == "idle-fleet")
        .expect("idle-fleet");
    assert!(idle["idle_kib_per_connection"].is_number(), "{idle}");
    let churn = samples
        .iter()
        .find(|s| s["workload"] == "churn")
        .expect("churn");
    assert!(
        churn["connect"]["count"].as_u64().unwrap_or(0) > 0,
        "{churn}"
    );

    let md = String::from_utf8(read("report.md")).expect("UTF-8");
    for section in [
        "## Goals",
        "## steady",
        "## churn",
        "## burst",
        "## idle-fleet",
        "## scale",
        "| pgwarden | 5 |",
    ] {
        assert!(md.contains(section), "{section} missing from:\n{md}");
    }
    assert!(
        md.contains("1.00×"),
        "the baseline's own ratio is shown:\n{md}"
    );
    for chart in [
        "latency-steady.png",
        "throughput-scale.png",
        "backends-burst.png",
    ] {
        assert!(
            read(chart).starts_with(b"\x89PNG\r\n\x1a\n"),
            "{chart} is a PNG"
        );
        assert!(md.contains(chart), "{chart} is linked from the summary");
    }
    assert!(
        !json.contains(PASSWORD) && !md.contains(PASSWORD),
        "the report masks passwords"
    );
}
