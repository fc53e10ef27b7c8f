//! Untrusted bytes on pgwarden's client port, sent raw over TCP: malformed startup packets,
//! an oversized message after a real SCRAM login, and clients that stall during startup each
//! get a FATAL ErrorResponse (08P01, or the code Postgres itself uses) or a closed socket, in
//! bounded time, while clients already connected and new ones keep being served.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use pgwarden_tests::{PgCluster, Pgwarden, PgwardenOptions};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest any single read may wait; a proxy that neither answers nor closes fails the test.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Protocol 3.0, as sent in a StartupMessage.
const PROTOCOL_3_0: u32 = 3 << 16;
/// SQLSTATE protocol_violation.
const PROTOCOL_VIOLATION: &str = "08P01";

async fn start(options: PgwardenOptions) -> (PgCluster, Pgwarden) {
    let cluster = PgCluster::start();
    let pgwarden = Pgwarden::start(&cluster, options).await;
    (cluster, pgwarden)
}

/// What came back from the server.
#[derive(Debug, PartialEq)]
enum Received {
    /// A message: its tag and body.
    Message(u8, Bytes),
    /// EOF, or the connection was reset.
    Closed,
}

/// A raw protocol connection.
struct Raw {
    stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    async fn connect(port: u16) -> Raw {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect to the client port");
        Raw {
            stream,
            buf: BytesMut::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send raw bytes");
    }

    /// The next message, or `Closed`; panics if nothing happens within `READ_TIMEOUT`.
    async fn recv(&mut self) -> Received {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
                let len = len as usize;
                assert!(
                    (4..=1 << 20).contains(&len),
                    "server sent a message with length {len}"
                );
                if self.buf.len() > len {
                    let tag = self.buf.get_u8();
                    self.buf.advance(4);
                    return Received::Message(tag, self.buf.split_to(len - 4).freeze());
                }
            }
            let read = tokio::time::timeout(READ_TIMEOUT, self.stream.read_buf(&mut self.buf))
                .await
                .unwrap_or_else(|_| panic!("no answer and no close within {READ_TIMEOUT:?}"));
            match read {
                Ok(0) | Err(_) => {
                    assert!(
                        self.buf.is_empty(),
                        "connection closed inside a message: {:?}",
                        self.buf
                    );
                    return Received::Closed;
                }
                Ok(_) => {}
            }
        }
    }

    /// Receives until a message with `tag`, panicking on an ErrorResponse or a close.
    async fn recv_until(&mut self, tag: u8) -> Bytes {
        loop {
            match self.recv().await {
                Received::Message(t, body) if t == tag => return body,
                Received::Message(b'E', body) => panic!("server error: {:?}", fields(&body)),
                Received::Message(..) => {}
                Received::Closed => panic!("closed while waiting for {:?}", tag as char),
            }
        }
    }

    /// How the server ends this connection: one FATAL ErrorResponse and then a close, or a
    /// close without a word. Panics on anything else.
    async fn outcome(&mut self) -> Outcome {
        match self.recv().await {
            Received::Closed => Outcome::Closed,
            Received::Message(b'E', body) => {
                let fields = fields(&body);
                let after = self.recv().await;
                assert_eq!(
                    after,
                    Received::Closed,
                    "not closed after the error {fields:?}"
                );
                Outcome::Error {
                    severity: fields.get(&b'V').cloned().unwrap_or_default(),
                    code: fields.get(&b'C').cloned().unwrap_or_default(),
                    message: fields.get(&b'M').cloned().unwrap_or_default(),
                }
            }
            Received::Message(tag, body) => {
                panic!("unexpected message {:?}: {body:?}", tag as char)
            }
        }
    }
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Error {
        severity: String,
        code: String,
        message: String,
    },
    Closed,
}

impl Outcome {
    fn code(&self) -> Option<&str> {
        match self {
            Outcome::Error { code, .. } => Some(code),
            Outcome::Closed => None,
        }
    }
}

/// The fields of an ErrorResponse or NoticeResponse body by their type byte.
fn fields(body: &[u8]) -> HashMap<u8, String> {
    let mut out = HashMap::new();
    let mut rest = body;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let end = tail
            .iter()
            .position(|&b| b == 0)
            .expect("error field is NUL-terminated");
        out.insert(kind, String::from_utf8_lossy(&tail[..end]).into_owned());
        rest = &tail[end + 1..];
    }
    out
}

/// A startup packet: length, protocol `version`, NUL-terminated key/value pairs, final NUL.
fn startup_packet(version: u32, params: &[(String, String)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.put_u32(version);
    for (key, value) in params {
        body.extend_from_slice(key.as_bytes());
        body.put_u8(0);
        body.extend_from_slice(value.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut packet = Vec::new();
    packet.put_u32(body.len() as u32 + 4);
    packet.extend_from_slice(&body);
    packet
}

fn app_params() -> Vec<(String, String)> {
    vec![
        ("user".to_owned(), "app".to_owned()),
        ("database".to_owned(), "app".to_owned()),
    ]
}

/// A regular message: tag, length, body.
fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.put_u32(body.len() as u32 + 4);
    out.extend_from_slice(body);
    out
}

/// Logs in as `app` with SCRAM-SHA-256 over a raw connection and waits for ReadyForQuery.
async fn raw_login(port: u16) -> Raw {
    let mut raw = Raw::connect(port).await;
    raw.send(&startup_packet(PROTOCOL_3_0, &app_params())).await;
    let sasl = raw.recv_until(b'R').await;
    assert_eq!(&sasl[..4], &10u32.to_be_bytes(), "AuthenticationSASL");
    assert!(
        sasl.windows(SCRAM_SHA_256.len())
            .any(|w| w == SCRAM_SHA_256.as_bytes()),
        "SCRAM-SHA-256 offered"
    );
    let mut scram = ScramSha256::new(b"app-pw", ChannelBinding::unsupported());
    let mut initial = Vec::new();
    initial.extend_from_slice(SCRAM_SHA_256.as_bytes());
    initial.put_u8(0);
    initial.put_i32(scram.message().len() as i32);
    initial.extend_from_slice(scram.message());
    raw.send(&message(b'p', &initial)).await;

    let server_first = raw.recv_until(b'R').await;
    assert_eq!(&server_first[..4], &11u32.to_be_bytes(), "SASLContinue");
    scram.update(&server_first[4..]).expect("server-first");
    raw.send(&message(b'p', scram.message())).await;

    let server_final = raw.recv_until(b'R').await;
    assert_eq!(&server_final[..4], &12u32.to_be_bytes(), "SASLFinal");
    scram.finish(&server_final[4..]).expect("server signature");
    let ok = raw.recv_until(b'R').await;
    assert_eq!(&ok[..], &0u32.to_be_bytes(), "AuthenticationOk");
    let ready = raw.recv_until(b'Z').await;
    assert_eq!(&ready[..], b"I");
    raw
}

/// Runs a simple query on a raw session; returns the first column of the first row.
async fn raw_query(raw: &mut Raw, sql: &str) -> Option<String> {
    let mut body = sql.as_bytes().to_vec();
    body.put_u8(0);
    raw.send(&message(b'Q', &body)).await;
    let mut value = None;
    loop {
        match raw.recv().await {
            Received::Message(b'D', mut row) if value.is_none() => {
                row.advance(2);
                let len = row.get_i32();
                if len >= 0 {
                    value = Some(String::from_utf8_lossy(&row[..len as usize]).into_owned());
                }
            }
            Received::Message(b'E', body) => panic!("{sql}: {:?}", fields(&body)),
            Received::Message(b'Z', _) => return value,
            Received::Message(..) => {}
            Received::Closed => panic!("closed during {sql}"),
        }
    }
}

/// A healthy client answers `select 1` and a new one can log in.
async fn assert_still_serving(pgwarden: &Pgwarden, healthy: &tokio_postgres::Client) {
    let answer = simple_value(healthy, "select 1")
        .await
        .unwrap_or_else(|e| panic!("the healthy client failed: {e}\n{}", pgwarden.log()));
    assert_eq!(answer, "1");
    let fresh = pgwarden.connect("app", "app-pw", "app").await;
    let answer = simple_value(&fresh, "select 2").await.expect("new client");
    assert_eq!(answer, "2");
}

/// The first column of the first row of `sql`, run with the simple protocol (which, unlike
/// tokio-postgres' named statements, does not pin the client to a backend).
async fn simple_value(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Result<String, tokio_postgres::Error> {
    let messages = client.simple_query(sql).await?;
    Ok(messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_default())
}

#[tokio::test]
async fn malformed_startup_packets_get_a_fatal_error_and_others_keep_being_served() {
    let (_cluster, pgwarden) = start(PgwardenOptions::default()).await;
    let healthy = pgwarden.connect("app", "app-pw", "app").await;
    healthy.simple_query("select 1").await.expect("healthy");

    let hundred: Vec<(String, String)> = (0..100)
        .map(|i| (format!("application_name{i}"), "x".to_owned()))
        .collect();
    let mut huge = Vec::new();
    huge.put_u32(1_000_000);
    huge.put_u32(PROTOCOL_3_0);
    // A packet whose length ends it in the middle of a parameter value.
    let mut unterminated = startup_packet(PROTOCOL_3_0, &app_params());
    unterminated.truncate(20);
    unterminated[..4].copy_from_slice(&20u32.to_be_bytes());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("length 4", 4u32.to_be_bytes().to_vec()),
        ("length 1000000", huge),
        (
            "an HTTP request",
            b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
        ),
        ("100 parameters", startup_packet(PROTOCOL_3_0, &hundred)),
        ("unterminated parameters", unterminated),
    ];
    let mut wrong = Vec::new();
    for (name, bytes) in &cases {
        let mut raw = Raw::connect(pgwarden.port()).await;
        raw.send(bytes).await;
        let outcome = raw.outcome().await;
        eprintln!("{name}: {outcome:?}");
        if outcome.code() != Some(PROTOCOL_VIOLATION) {
            wrong.push(format!("{name}: {outcome:?}"));
        }
    }

    // A startup packet cut short by EOF: closed (with or without an error), never hung.
    let mut raw = Raw::connect(pgwarden.port()).await;
    raw.send(&startup_packet(PROTOCOL_3_0, &app_params())[..15])
        .await;
    raw.stream.shutdown().await.expect("half-close");
    let truncated = raw.outcome().await;
    eprintln!("truncated then EOF: {truncated:?}");
    if !matches!(truncated.code(), None | Some(PROTOCOL_VIOLATION)) {
        wrong.push(format!("truncated then EOF: {truncated:?}"));
    }

    // Postgres answers protocol 2.0 in the old format, without a SQLSTATE; in protocol 3
    // terms its error is 0A000 (feature_not_supported), and 08P01 is as clear.
    let mut raw = Raw::connect(pgwarden.port()).await;
    raw.send(&startup_packet(2 << 16, &app_params())).await;
    let v2 = raw.outcome().await;
    eprintln!("protocol 2.0: {v2:?}");
    let mentions_version = matches!(&v2, Outcome::Error { message, .. } if message.contains("2.0"));
    if !matches!(v2.code(), Some(PROTOCOL_VIOLATION | "0A000")) || !mentions_version {
        wrong.push(format!("protocol 2.0: {v2:?}"));
    }

    assert_still_serving(&pgwarden, &healthy).await;
    assert!(
        wrong.is_empty(),
        "wrong answers:\n{}\n--- pgwarden log ---\n{}",
        wrong.join("\n"),
        pgwarden.log()
    );
}

#[tokio::test]
async fn a_malformed_message_after_login_gets_08p01_and_its_backend_comes_back_clean() {
    // One backend for everyone: a leaked or dirty backend would show at once.
    let (cluster, pgwarden) = start(PgwardenOptions {
        pool_size: 1,
        max_backend_connections: 1,
        borrow_timeout: "5s",
        ..PgwardenOptions::default()
    })
    .await;
    let healthy = pgwarden.connect("app", "app-pw", "app").await;
    assert_eq!(
        simple_value(&healthy, "select 1").await.expect("healthy"),
        "1"
    );
    // A Query header claiming 2 GiB, sent after a real SCRAM login.
    let oversized = [b'Q', 0x7f, 0xff, 0xff, 0xff];

    // Between transactions, holding no backend.
    let mut raw = raw_login(pgwarden.port()).await;
    assert_eq!(
        raw_query(&mut raw, "select 'raw'").await.as_deref(),
        Some("raw")
    );
    raw.send(&oversized).await;
    let idle = raw.outcome().await;
    eprintln!("idle: {idle:?}");

    // A length shorter than the length field itself.
    let mut raw = raw_login(pgwarden.port()).await;
    raw.send(&[b'Q', 0, 0, 0, 3]).await;
    let too_short = raw.outcome().await;
    eprintln!("length 3: {too_short:?}");

    // Inside a transaction, holding the pool's only backend with uncommitted work.
    let mut raw = raw_login(pgwarden.port()).await;
    raw_query(&mut raw, "begin").await;
    raw_query(&mut raw, "create table uncommitted (x int)").await;
    raw.send(&oversized).await;
    let in_transaction = raw.outcome().await;
    eprintln!("in a transaction: {in_transaction:?}");

    for (when, outcome) in [
        ("oversized, idle", &idle),
        ("length 3, idle", &too_short),
        ("oversized, in a transaction", &in_transaction),
    ] {
        assert_eq!(
            outcome.code(),
            Some(PROTOCOL_VIOLATION),
            "{when}: {outcome:?}\n--- pgwarden log ---\n{}",
            pgwarden.log()
        );
    }
    // The backend was rolled back (or replaced), not handed on inside that transaction.
    let leftover = simple_value(
        &healthy,
        "select count(*) from pg_class where relname = 'uncommitted'",
    )
    .await
    .unwrap_or_else(|e| panic!("the healthy client failed: {e}\n{}", pgwarden.log()));
    assert_eq!(
        leftover, "0",
        "the aborted client's transaction was not rolled back"
    );
    let open = cluster.psql(
        "select count(*) from pg_stat_activity \
         where usename = 'app' and state like 'idle in transaction%'",
    );
    assert_eq!(open, "0", "a backend was left inside a transaction");
    assert_still_serving(&pgwarden, &healthy).await;
}

#[tokio::test]
async fn a_client_that_stalls_during_startup_is_closed_after_startup_timeout() {
    let (_cluster, pgwarden) = start(PgwardenOptions {
        extra_server_toml: "startup_timeout = \"1s\"".to_owned(),
        ..PgwardenOptions::default()
    })
    .await;
    let healthy = pgwarden.connect("app", "app-pw", "app").await;
    let port = pgwarden.port();

    // Connects and sends nothing at all.
    let silent = async {
        let mut raw = Raw::connect(port).await;
        let started = Instant::now();
        let outcome = raw.outcome().await;
        (outcome, started.elapsed())
    };
    // Sends a StartupMessage and never answers the SCRAM challenge.
    let mid_scram = async {
        let mut raw = Raw::connect(port).await;
        let started = Instant::now();
        raw.send(&startup_packet(PROTOCOL_3_0, &app_params())).await;
        raw.recv_until(b'R').await;
        let outcome = raw.outcome().await;
        (outcome, started.elapsed())
    };
    let (silent, mid_scram) = tokio::join!(silent, mid_scram);

    for (who, (outcome, elapsed)) in [("silent", silent), ("mid-SCRAM", mid_scram)] {
        eprintln!("{who}: {outcome:?} after {elapsed:?}");
        assert!(
            elapsed >= Duration::from_millis(900) && elapsed <= Duration::from_secs(3),
            "{who} client closed after {elapsed:?} with startup_timeout 1s"
        );
        if let Outcome::Error { severity, .. } = &outcome {
            assert_eq!(severity, "FATAL", "{who}: {outcome:?}");
        }
    }
    assert_still_serving(&pgwarden, &healthy).await;
}
