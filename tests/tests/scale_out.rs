//! Two pgwarden instances behind one (imaginary) load balancer: a cancel request that lands
//! on instance B for a query running through instance A cancels it, because B passes keys
//! it did not issue to its peers; without peers B drops it and counts it.

use std::time::{Duration, Instant};

use pgwarden_tests::{metric_sum, PgCluster, Pgwarden, PgwardenOptions};
use tokio_postgres::error::SqlState;

fn instance(id: u8) -> PgwardenOptions {
    PgwardenOptions {
        extra_toml: format!("[cluster]\ninstance_id = {id}\n"),
        ..PgwardenOptions::default()
    }
}

/// Sends the client's cancel request to `port` (not to the instance it is connected to).
async fn cancel_via(token: &tokio_postgres::CancelToken, port: u16) {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect for the cancel");
    token
        .cancel_query_raw(stream, tokio_postgres::NoTls)
        .await
        .expect("send the cancel request");
}

#[tokio::test]
async fn a_cancel_sent_to_another_instance_reaches_the_query() {
    let cluster = PgCluster::start();
    let a = Pgwarden::start(&cluster, instance(1)).await;
    let b = Pgwarden::start(&cluster, instance(2)).await;
    let client = a.connect("app", "app-pw", "app").await;
    let token = client.cancel_token();

    // Without peers, B cannot know where the key came from.
    let sleeping = client.simple_query("select pg_sleep(2)");
    let cancel = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel_via(&token, b.port()).await;
    };
    let (result, ()) = tokio::join!(sleeping, cancel);
    result.expect("B without peers drops the cancel: the query completes");
    let dropped = metric_sum(
        &b.metrics().await,
        "pgwarden_cancel_requests_total{outcome=\"no_peer\"}",
    );
    assert_eq!(dropped, Some(1.0));

    // B learns its peer by a reload, as an operator would add it.
    b.edit_config(|toml| {
        toml.replace(
            "instance_id = 2\n",
            &format!("instance_id = 2\npeers = [\"127.0.0.1:{}\"]\n", a.port()),
        )
    });
    assert!(b.reload().await, "B takes its peer");

    let started = Instant::now();
    let sleeping = client.simple_query("select pg_sleep(30)");
    let cancel = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel_via(&token, b.port()).await;
    };
    let (result, ()) = tokio::join!(sleeping, cancel);
    let err = result.expect_err("the query is cancelled");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        metric_sum(
            &b.metrics().await,
            "pgwarden_cancel_requests_total{outcome=\"to_peers\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_sum(
            &a.metrics().await,
            "pgwarden_cancel_requests_total{outcome=\"forwarded\"}"
        ),
        Some(1.0)
    );
    client
        .simple_query("select 1")
        .await
        .expect("the session goes on after the cancel");
}
