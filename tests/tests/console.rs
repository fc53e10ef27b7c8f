//! The admin console, driven with psql on database `pgwarden`: an admin sees pools,
//! clients, servers and stats that match the load (checked against pg_stat_activity), the
//! configuration, and can PAUSE, RESUME and RELOAD; a user not on the admin list is
//! refused.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use pgwarden_tests::{pg_bindir, PgCluster, Pgwarden, PgwardenOptions};

type Rows = Vec<HashMap<String, String>>;

/// Runs `command` on the console as `user`; the rows by column name, or psql's stderr.
async fn console(
    pgwarden: &Pgwarden,
    user: &str,
    password: &str,
    command: &str,
) -> Result<Rows, String> {
    let dsn = format!(
        "host=127.0.0.1 port={} user={user} dbname=pgwarden sslmode=disable",
        pgwarden.port()
    );
    let (password, command) = (password.to_owned(), command.to_owned());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(pg_bindir().join("psql"))
            .args([
                "-XA",
                "-F",
                "|",
                "--pset",
                "footer=off",
                &dsn,
                "-c",
                &command,
            ])
            .env("PGPASSWORD", password)
            .output()
            .expect("run psql")
    })
    .await
    .expect("psql task");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let Some(header) = lines.next() else {
        return Ok(Vec::new());
    };
    let columns: Vec<&str> = header.split('|').collect();
    Ok(lines
        .map(|line| {
            columns
                .iter()
                .zip(line.split('|'))
                .map(|(c, v)| ((*c).to_owned(), v.to_owned()))
                .collect()
        })
        .collect())
}

fn options() -> PgwardenOptions {
    PgwardenOptions {
        users: vec![
            ("app".to_owned(), "app-pw".to_owned()),
            ("other".to_owned(), "other-pw".to_owned()),
        ],
        pool_size: 8,
        extra_server_toml: "admin_users = [\"app\"]".to_owned(),
        ..PgwardenOptions::default()
    }
}

#[tokio::test]
async fn an_admin_sees_pools_clients_servers_and_stats_that_match_the_load() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, options()).await;

    // Five clients inside a transaction (each holds a backend), three idle ones.
    let mut busy = Vec::new();
    for _ in 0..5 {
        let c = pgwarden.connect("app", "app-pw", "app").await;
        c.batch_execute("begin; select 1").await.expect("begin");
        busy.push(c);
    }
    let mut idle = Vec::new();
    for _ in 0..3 {
        let c = pgwarden.connect("app", "app-pw", "app").await;
        c.simple_query("select 1").await.expect("query");
        idle.push(c);
    }
    let in_transaction: Vec<String> = cluster
        .psql("select pid from pg_stat_activity where usename = 'app' and state = 'idle in transaction' order by pid")
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(in_transaction.len(), 5);

    let pools = console(&pgwarden, "app", "app-pw", "SHOW POOLS")
        .await
        .expect("SHOW POOLS");
    let pool = pools
        .iter()
        .find(|p| p["database"] == "app" && p["user"] == "app")
        .unwrap_or_else(|| panic!("the app pool is listed: {pools:?}"));
    assert_eq!(pool["cl_active"], "8", "{pool:?}");
    assert_eq!(pool["cl_waiting"], "0", "{pool:?}");
    assert_eq!(pool["sv_active"], "5", "{pool:?}");
    assert_eq!(pool["pool_mode"], "transaction", "{pool:?}");
    assert_eq!(pool["pool_size"], "8", "{pool:?}");
    let server_idle: usize = pool["sv_idle"].parse().expect("a number");
    let on_server: usize = cluster
        .psql("select count(*) from pg_stat_activity where usename = 'app'")
        .parse()
        .expect("a count");
    assert_eq!(5 + server_idle, on_server, "{pool:?}");

    let clients = console(&pgwarden, "app", "app-pw", "SHOW CLIENTS")
        .await
        .expect("SHOW CLIENTS");
    assert_eq!(clients.len(), 8, "{clients:?}");
    assert_eq!(clients.iter().filter(|c| c["state"] == "active").count(), 5);
    assert!(clients
        .iter()
        .all(|c| c["addr"] == "127.0.0.1" && c["user"] == "app"));

    let servers = console(&pgwarden, "app", "app-pw", "SHOW SERVERS")
        .await
        .expect("SHOW SERVERS");
    let mut active: Vec<String> = servers
        .iter()
        .filter(|s| s["state"] == "active")
        .map(|s| s["remote_pid"].clone())
        .collect();
    active.sort_by_key(|pid| pid.parse::<i64>().unwrap_or_default());
    assert_eq!(
        active, in_transaction,
        "active servers are the backends in a transaction"
    );
    assert_eq!(
        servers.iter().filter(|s| s["state"] == "idle").count(),
        server_idle
    );

    let stats = console(&pgwarden, "app", "app-pw", "SHOW STATS")
        .await
        .expect("SHOW STATS");
    let main = stats
        .iter()
        .find(|s| s["database"] == "main")
        .expect("target main");
    let xacts: u64 = main["total_xact_count"].parse().expect("a number");
    let queries: u64 = main["total_query_count"].parse().expect("a number");
    assert!(xacts >= 8, "{main:?}");
    assert!(queries >= 8, "{main:?}");

    let config = console(&pgwarden, "app", "app-pw", "SHOW CONFIG")
        .await
        .expect("SHOW CONFIG");
    let value = |key: &str| {
        config
            .iter()
            .find(|r| r["key"] == key)
            .map(|r| (r["value"].clone(), r["changeable"].clone()))
    };
    assert_eq!(
        value("targets.main.pool_size"),
        Some(("8".into(), "yes".into()))
    );
    assert_eq!(value("server.listen").map(|v| v.1), Some("no".into()));

    let refused = console(&pgwarden, "other", "other-pw", "SHOW POOLS")
        .await
        .expect_err("a user not on the admin list is refused");
    assert!(
        refused.contains("may not use the admin console"),
        "{refused}"
    );
    let refused = console(&pgwarden, "app", "wrong", "SHOW POOLS")
        .await
        .expect_err("a wrong password is refused");
    assert!(
        refused.contains("password authentication failed"),
        "{refused}"
    );
    let unknown = console(&pgwarden, "app", "app-pw", "SHOW NONSENSE")
        .await
        .expect_err("unknown command");
    assert!(
        unknown.contains("unknown admin console command"),
        "{unknown}"
    );
}

#[tokio::test]
async fn pause_holds_new_transactions_until_resume_and_reload_applies_the_file() {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, options()).await;
    let client = pgwarden.connect("app", "app-pw", "app").await;
    client
        .batch_execute("begin; select 1")
        .await
        .expect("begin");

    // PAUSE waits for the transaction in flight; commit it meanwhile.
    let pause = console(&pgwarden, "app", "app-pw", "PAUSE");
    let commit = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        client
            .batch_execute("commit")
            .await
            .expect("commit during PAUSE");
    };
    let (paused, ()) = tokio::join!(pause, commit);
    paused.expect("PAUSE returns once no backend is in use");

    let held = client.simple_query("select 42");
    let resume = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        console(&pgwarden, "app", "app-pw", "RESUME").await
    };
    let started = std::time::Instant::now();
    let (result, resumed) = tokio::join!(held, resume);
    resumed.expect("RESUME");
    result.expect("the held transaction runs after RESUME");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "the query waited for RESUME"
    );

    pgwarden.edit_config(|toml| toml.replace("pool_size = 8\n", "pool_size = 3\n"));
    console(&pgwarden, "app", "app-pw", "RELOAD")
        .await
        .expect("RELOAD");
    let pools = console(&pgwarden, "app", "app-pw", "SHOW POOLS")
        .await
        .expect("SHOW POOLS");
    assert!(pools.iter().all(|p| p["pool_size"] == "3"), "{pools:?}");

    pgwarden.edit_config(|toml| toml.replace("pool_size = 3\n", "pool_size = 0\n"));
    let refused = console(&pgwarden, "app", "app-pw", "RELOAD")
        .await
        .expect_err("an invalid file is refused");
    assert!(
        refused.contains("pool_size must be at least 1"),
        "{refused}"
    );
    let pools = console(&pgwarden, "app", "app-pw", "SHOW POOLS")
        .await
        .expect("SHOW POOLS");
    assert!(pools.iter().all(|p| p["pool_size"] == "3"), "{pools:?}");
}
