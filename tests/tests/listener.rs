//! The client listener queues a burst of new connections instead of dropping SYNs: its
//! accept backlog is `server.listen_backlog` (capped by the kernel's somaxconn), not the
//! 128 a plain bind gives.

use std::process::Command;

use pgwarden_tests::{PgCluster, Pgwarden, PgwardenOptions};

/// The accept backlog of the socket listening on `port` (`ss` shows it as Send-Q).
fn backlog(port: u16) -> u32 {
    let out = Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .expect("run ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(2)
        .and_then(|q| q.parse().ok())
        .unwrap_or_else(|| panic!("no listening socket on port {port} in {text:?}"))
}

fn somaxconn() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(4096)
}

#[tokio::test]
async fn the_listen_backlog_is_the_configured_one() {
    let cluster = PgCluster::start();
    let default = Pgwarden::start(&cluster, PgwardenOptions::default()).await;
    assert_eq!(
        backlog(default.port()),
        4096.min(somaxconn()),
        "default 4096"
    );
    let configured = Pgwarden::start(
        &cluster,
        PgwardenOptions {
            extra_server_toml: "listen_backlog = 700".into(),
            ..PgwardenOptions::default()
        },
    )
    .await;
    assert_eq!(backlog(configured.port()), 700.min(somaxconn()));
}
