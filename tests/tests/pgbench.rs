//! pgbench, the stock Postgres load generator, through pgwarden in transaction mode: many
//! clients share a small pool without a failed transaction, the pool bound holds on the
//! server, TPC-B leaves the balances consistent, and neither a new connection per
//! transaction nor the extended protocol causes errors (or, for unnamed statements, pins).

use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgwarden_tests::{metric_sum, PgCluster, Pgwarden, PgwardenOptions};

async fn start(options: PgwardenOptions) -> (PgCluster, Pgwarden) {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, options).await;
    (cluster, pgwarden)
}

/// stdout and stderr of a finished pgbench, for assertions and failure messages.
fn text(out: &Output) -> String {
    format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Panics with pgbench's output and pgwarden's log unless pgbench succeeded.
fn assert_success(out: &Output, pgwarden: &Pgwarden, what: &str) -> String {
    let text = text(out);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}\n--- pgwarden log ---\n{}",
        out.status,
        pgwarden.log()
    );
    text
}

/// A count pgbench reports on a line `label: N` (e.g. `number of failed transactions: 0 (0.000%)`).
fn reported(text: &str, label: &str) -> u64 {
    text.lines()
        .find_map(|line| line.trim().strip_prefix(label))
        .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("pgbench output has no {label:?} count:\n{text}"))
}

/// A superuser client connected straight to database `app` of the cluster.
async fn direct_to_app_db(cluster: &PgCluster) -> tokio_postgres::Client {
    let dsn = cluster
        .superuser_dsn()
        .replace("dbname=postgres", "dbname=app");
    let (client, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
        .await
        .expect("connect to database app of the cluster as postgres");
    tokio::spawn(connection);
    client
}

/// The first column of the single row `sql` returns, as text.
async fn scalar(client: &tokio_postgres::Client, sql: &str) -> String {
    let rows = client.simple_query(sql).await.expect(sql);
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql} returned no value"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_tpcb_100_clients_through_pool_of_10_is_consistent_and_bounded() {
    let (cluster, pgwarden) = start(PgwardenOptions {
        pool_size: 10,
        max_backend_connections: 10,
        ..PgwardenOptions::default()
    })
    .await;

    let init = pgwarden.pgbench(&["-i", "-s", "2"]).await;
    assert_success(&init, &pgwarden, "pgbench -i -s 2 through pgwarden");
    let direct = direct_to_app_db(&cluster).await;
    assert_eq!(
        scalar(&direct, "select count(*) from pgbench_accounts").await,
        "200000"
    );

    // Watch how many backends the app user has on the server while the load runs.
    let watcher = cluster.superuser().await;
    let stop = Arc::new(AtomicBool::new(false));
    let poll = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut max, mut samples) = (0i64, 0u32);
            while !stop.load(Ordering::Relaxed) {
                let row = watcher
                    .query_one(
                        "select count(*) from pg_stat_activity where usename = 'app'",
                        &[],
                    )
                    .await
                    .expect("count app backends");
                max = max.max(row.get(0));
                samples += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (max, samples)
        })
    };

    let run = pgwarden
        .pgbench(&["-c", "100", "-j", "2", "-T", "20"])
        .await;
    stop.store(true, Ordering::Relaxed);
    let (max_backends, samples) = poll.await.expect("poll task");
    let text = assert_success(&run, &pgwarden, "pgbench -c 100 -j 2 -T 20");
    eprintln!("{text}\nmost app backends seen on the server: {max_backends} ({samples} samples)");

    assert_eq!(reported(&text, "number of failed transactions"), 0);
    assert!(reported(&text, "number of transactions actually processed") > 0);
    assert!(
        samples >= 50,
        "only {samples} samples of pg_stat_activity in 20 s"
    );
    assert!(
        (1..=10).contains(&max_backends),
        "the app user had up to {max_backends} backends on the server with pool_size 10"
    );

    let history = scalar(
        &direct,
        "select count(*) || ' ' || coalesce(sum(delta), 0) from pgbench_history",
    )
    .await;
    let (count, delta) = history.split_once(' ').expect("count and sum");
    assert_eq!(
        count,
        reported(&text, "number of transactions actually processed").to_string(),
        "one history row per committed transaction"
    );
    for (table, column) in [
        ("pgbench_accounts", "abalance"),
        ("pgbench_tellers", "tbalance"),
        ("pgbench_branches", "bbalance"),
    ] {
        let sum = scalar(&direct, &format!("select sum({column}) from {table}")).await;
        assert_eq!(
            sum, delta,
            "sum({column}) of {table} vs sum(delta) of history"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_new_connection_per_transaction_select_only_has_no_errors() {
    let (_cluster, pgwarden) = start(PgwardenOptions::default()).await;
    let init = pgwarden.pgbench(&["-i", "-s", "1"]).await;
    assert_success(&init, &pgwarden, "pgbench -i -s 1 through pgwarden");

    let run = pgwarden
        .pgbench(&["-C", "-S", "-c", "10", "-j", "2", "-T", "10"])
        .await;
    let text = assert_success(&run, &pgwarden, "pgbench -C -S -c 10 -j 2 -T 10");
    eprintln!("{text}");

    assert_eq!(reported(&text, "number of failed transactions"), 0);
    let transactions = reported(&text, "number of transactions actually processed");
    assert!(transactions > 0, "no transactions:\n{text}");
    let received = metric_sum(
        &pgwarden.metrics().await,
        "pgwarden_client_connections_received_total",
    )
    .expect("pgwarden_client_connections_received_total has a sample");
    assert!(
        received >= transactions as f64,
        "pgwarden received {received} client connections for {transactions} transactions \
         with a new connection each"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_extended_protocol_has_no_errors() {
    let (_cluster, pgwarden) = start(PgwardenOptions {
        pool_size: 5,
        ..PgwardenOptions::default()
    })
    .await;
    let init = pgwarden.pgbench(&["-i", "-s", "1"]).await;
    assert_success(&init, &pgwarden, "pgbench -i -s 1 through pgwarden");

    let run = pgwarden
        .pgbench(&["-M", "extended", "-c", "20", "-j", "2", "-T", "10"])
        .await;
    let text = assert_success(&run, &pgwarden, "pgbench -M extended -c 20 -j 2 -T 10");
    eprintln!("{text}");

    assert_eq!(reported(&text, "number of failed transactions"), 0);
    assert!(reported(&text, "number of transactions actually processed") > 0);
    let metrics = pgwarden.metrics().await;
    assert!(
        metric_sum(&metrics, "pgwarden_query_requests_total").is_some_and(|n| n > 0.0),
        "no query requests counted:\n{metrics}"
    );
    assert_eq!(
        metric_sum(&metrics, "pgwarden_pins_total"),
        None,
        "unnamed statements of the extended protocol pinned a client:\n{metrics}"
    );
}

/// CPU ticks (user + system) of each thread of process `pid` named `name` (as `comm`
/// shows it: cut to 15 bytes).
fn thread_ticks(pid: u32, name: &str) -> Vec<u64> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("list the process's threads")
        .filter_map(|task| {
            let path = task.ok()?.path();
            let comm = std::fs::read_to_string(path.join("comm")).ok()?;
            (comm.trim() == name).then_some(())?;
            let stat = std::fs::read_to_string(path.join("stat")).ok()?;
            // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
            let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split(' ').collect();
            Some(fields[11].parse::<u64>().ok()? + fields[12].parse::<u64>().ok()?)
        })
        .collect()
}

const WORKER_THREAD: &str = "pgwarden-worker";

/// Clients of `kind` (`new`, `moved`) placed on serving thread `thread` (0 is the
/// listener's), as `/metrics` says.
fn placed_on(metrics: &str, kind: &str, thread: usize) -> f64 {
    let name =
        format!("pgwarden_thread_clients_placed_total{{kind=\"{kind}\",thread=\"{thread}\"}}");
    metric_sum(metrics, &name).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_threads_fill_in_order_or_take_turns_share_the_pool_and_one_serves_alone() {
    let cluster = PgCluster::start();
    let single = |user: &str| PgwardenOptions {
        users: vec![(user.to_owned(), format!("{user}-pw"))],
        ..PgwardenOptions::default()
    };
    // Two serving threads, with `limit` as thread_busy_limit (`None`: the default).
    let two_threads = |limit: Option<f64>| PgwardenOptions {
        extra_server_toml: match limit {
            Some(limit) => format!("worker_threads = 2\nthread_busy_limit = {limit}\n"),
            None => "worker_threads = 2\n".to_owned(),
        },
        ..single("app")
    };
    // Two serving threads that take clients in turn (a busy limit of 0), one backend
    // connection: clients of both must borrow it, so it moves between the threads' reactors.
    let two = Pgwarden::start(
        &cluster,
        PgwardenOptions {
            pool_size: 1,
            ..two_threads(Some(0.0))
        },
    )
    .await;
    let init = two.pgbench(&["-i", "-s", "1"]).await;
    assert_success(&init, &two, "pgbench -i -s 1 through pgwarden");
    let run = two.pgbench(&["-S", "-c", "8", "-j", "2", "-T", "3"]).await;
    let text = assert_success(&run, &two, "pgbench -S -c 8 through two serving threads");
    assert_eq!(reported(&text, "number of failed transactions"), 0);
    assert!(reported(&text, "number of transactions actually processed") > 0);
    let ticks = thread_ticks(two.pid(), WORKER_THREAD);
    assert_eq!(
        ticks.len(),
        1,
        "worker_threads = 2: the listener's and one more: {ticks:?}"
    );
    assert!(
        ticks[0] > 0,
        "the worker thread served clients: CPU ticks {ticks:?}"
    );
    let metrics = two.metrics().await;
    assert!(
        placed_on(&metrics, "new", 0) >= 4.0 && placed_on(&metrics, "new", 1) >= 4.0,
        "clients were not given to both threads in turn:\n{metrics}"
    );
    assert!(
        metric_sum(&metrics, "pgwarden_backend_moves_total").is_some_and(|n| n > 0.0),
        "the one backend connection never moved between worker threads:\n{metrics}"
    );
    drop(two);

    // The default busy limit: eight clients are light load, and the first thread serves
    // them all while the second waits for more. The first run opens the pool's backend
    // connections (their SCRAM key derivation keeps a thread busy in a debug build, and
    // rightly sends clients elsewhere); the second, after a pause, only borrows them.
    let fill = Pgwarden::start(&cluster, two_threads(None)).await;
    let mut before = (0.0, 0.0);
    let mut busy_while_serving = None;
    for round in ["opens the pool", "borrows from it"] {
        let metrics = fill.metrics().await;
        before = (placed_on(&metrics, "new", 0), placed_on(&metrics, "new", 1));
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The busy share is measured on its own every 50 ms: mid-run, the first thread's is
        // above zero.
        let (run, busy) = tokio::join!(
            fill.pgbench(&["-S", "-c", "8", "-j", "2", "-T", "1"]),
            async {
                tokio::time::sleep(Duration::from_millis(600)).await;
                let metrics = fill.metrics().await;
                metric_sum(&metrics, "pgwarden_thread_busy_ratio{thread=\"0\"}")
            }
        );
        busy_while_serving = busy;
        let text = assert_success(&run, &fill, &format!("pgbench -S -c 8 that {round}"));
        assert!(reported(&text, "number of transactions actually processed") > 0);
    }
    assert!(
        busy_while_serving.is_some_and(|share| share > 0.0),
        "the first thread's busy share was not measured while it served: {busy_while_serving:?}"
    );
    let metrics = fill.metrics().await;
    let placed = (
        placed_on(&metrics, "new", 0) - before.0,
        placed_on(&metrics, "new", 1) - before.1,
    );
    assert!(
        placed.0 >= 8.0 && placed.1 == 0.0,
        "light load was spread instead of served by the first thread (new clients per thread: {placed:?}):\n{metrics}"
    );
    drop(fill);

    // A limit so low that a thread serving one client is over it while the other, idle,
    // is under: the client moves between transactions (back and forth, a few times per
    // 50 ms), keeping its prepared statements, and no transaction fails.
    let moving = Pgwarden::start(&cluster, two_threads(Some(0.02))).await;
    let run = moving
        .pgbench(&["-S", "-M", "prepared", "-c", "1", "-T", "2"])
        .await;
    let text = assert_success(&run, &moving, "pgbench -S -M prepared while a client moves");
    assert_eq!(reported(&text, "number of failed transactions"), 0);
    assert!(reported(&text, "number of transactions actually processed") > 0);
    let metrics = moving.metrics().await;
    assert!(
        placed_on(&metrics, "moved", 0) + placed_on(&metrics, "moved", 1) > 0.0,
        "the client never moved off its busy thread:\n{metrics}"
    );
    drop(moving);

    let mut pgwarden = Pgwarden::start(
        &cluster,
        PgwardenOptions {
            extra_server_toml: "worker_threads = 1\n".to_owned(),
            ..single("app")
        },
    )
    .await;
    assert_eq!(
        thread_ticks(pgwarden.pid(), WORKER_THREAD).len(),
        0,
        "worker_threads = 1 runs the listener, clients and reactor on the main thread"
    );
    let init = pgwarden.pgbench(&["-i", "-s", "1"]).await;
    assert_success(&init, &pgwarden, "pgbench -i -s 1 through pgwarden");
    for args in [
        &["-S", "-c", "20", "-j", "2", "-T", "5"][..],
        &["-C", "-S", "-c", "10", "-j", "2", "-T", "3"][..],
    ] {
        let run = pgwarden.pgbench(args).await;
        let text = assert_success(&run, &pgwarden, &format!("pgbench {args:?}"));
        assert_eq!(reported(&text, "number of failed transactions"), 0);
        assert!(reported(&text, "number of transactions actually processed") > 0);
    }
    pgwarden.send_sigterm();
    let status = pgwarden
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("pgwarden exits on SIGTERM");
    assert!(status.success(), "exit status {status}");
}
