//! What the relay does with each message, in both directions.
//!
//! Client → backend: count requests, spot Terminate and pinning state, map named prepared
//! statements to backend-wide names (injecting a Parse where the backend lacks one, and
//! answering Parse/Close itself where the backend already has or shares it).
//! Backend → client: follow ReadyForQuery, errors and COPY, hide the answers to injected
//! messages and put pgwarden's own answers in their place in the stream.
//!
//! Bytes are copied from the read buffer into the outgoing buffer message by message;
//! DataRow, CopyData and other bodies the proxy never looks at are copied as they arrive,
//! even when a message spans many reads.

use std::ops::ControlFlow;
use std::sync::Arc;

use bytes::BytesMut;
use pgwarden_protocol::backend::{self, ErrorFields};
use pgwarden_protocol::frame::{FrameWalker, Walk, HEADER_LEN};
use pgwarden_protocol::{frontend, ProtocolError};
use tracing::debug;

use super::plan::{Event, Expect, Reply};
use super::settings::{self, Change, SettingSql, Signature};
use super::statements::{BackendStatements, Prepared, Readiness};
use super::Session;
use crate::config::PoolMode;
use crate::pinning::{classify_sql, contains_ignore_ascii_case, is_pin_word, sql_words, PinReason};

/// What the backend is doing for the client, derived from the messages seen.
#[derive(Debug, Clone, Copy)]
pub struct TxState {
    /// Query/Sync/FunctionCall messages forwarded and not yet answered by ReadyForQuery.
    pub pending: usize,
    /// Extended-protocol messages forwarded since the last Sync.
    pub unsynced: bool,
    /// Transaction status of the last ReadyForQuery.
    pub status: u8,
    /// The backend is in COPY FROM STDIN, waiting for client data.
    pub copy_in: bool,
    /// An ErrorResponse arrived since the last ReadyForQuery.
    pub error_since_ready: bool,
    /// The backend sent a FATAL error: it is about to close, so nothing more is sent to it.
    pub backend_fatal: bool,
    /// The last CommandComplete was COMMIT (a transaction block ending in ReadyForQuery 'I'
    /// committed).
    pub last_was_commit: bool,
    /// When the oldest request still waiting for its ReadyForQuery was relayed.
    pub request_started: Option<std::time::Instant>,
}

impl Default for TxState {
    fn default() -> Self {
        Self {
            pending: 0,
            unsynced: false,
            status: backend::IDLE,
            copy_in: false,
            error_since_ready: false,
            backend_fatal: false,
            last_was_commit: false,
            request_started: None,
        }
    }
}

/// Where a message starts in a read buffer, and whether its whole body is there.
#[derive(Debug, Clone, Copy)]
pub struct Boundary {
    at: usize,
    tag: u8,
    /// Length field value (body plus the four length bytes).
    len: usize,
    whole: bool,
}

impl Boundary {
    fn end(&self) -> usize {
        self.at + 1 + self.len
    }

    fn body<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.at + HEADER_LEN..self.end()]
    }
}

/// The backend side of a relay round, borrowed from the connection.
pub struct BackendSide<'a> {
    pub statements: &'a mut BackendStatements,
    pub settings: &'a mut Signature,
    pub to_backend: &'a mut BytesMut,
    pub to_client: &'a mut BytesMut,
    /// Message boundaries found in the current read: scratch kept with the backend
    /// connection, so no round allocates it.
    pub scan: &'a mut Vec<Boundary>,
}

/// Walks `input` into `scan` (cleared first); stops before a whole message tagged `stop`.
fn find_boundaries(
    walker: &mut FrameWalker,
    input: &[u8],
    inspect: fn(u8) -> bool,
    stop: u8,
    scan: &mut Vec<Boundary>,
) -> Result<(usize, bool), ProtocolError> {
    scan.clear();
    walker.walk_at(input, inspect, |at, w| {
        let (tag, len, whole) = match w {
            Walk::Inspect(m) if m.tag == stop => return ControlFlow::Break(()),
            Walk::Inspect(m) => (m.tag, m.body.len() + 4, true),
            Walk::Pass { tag, len } => (tag, len, false),
        };
        scan.push(Boundary {
            at,
            tag,
            len,
            whole,
        });
        ControlFlow::Continue(())
    })
}

fn client_inspects(tag: u8) -> bool {
    matches!(
        tag,
        frontend::TERMINATE
            | frontend::QUERY
            | frontend::PARSE
            | frontend::BIND
            | frontend::DESCRIBE
            | frontend::CLOSE
    )
}

fn backend_inspects(tag: u8) -> bool {
    matches!(
        tag,
        backend::READY_FOR_QUERY
            | backend::ERROR_RESPONSE
            | backend::PARSE_COMPLETE
            | backend::CLOSE_COMPLETE
            | backend::COMMAND_COMPLETE
            | backend::PARAMETER_STATUS
            | backend::NOTICE_RESPONSE
    )
}

/// Processes newly read client bytes into `side.to_backend`. Returns how many bytes were
/// consumed and whether the client sent Terminate (which stays unconsumed).
pub fn process_client(
    s: &mut Session,
    tx: &mut TxState,
    side: &mut BackendSide<'_>,
    input: &[u8],
) -> Result<(usize, bool), ProtocolError> {
    let mut scan = std::mem::take(side.scan);
    let (consumed, stopped) = find_boundaries(
        &mut s.client_walker,
        input,
        client_inspects,
        frontend::TERMINATE,
        &mut scan,
    )?;
    let mut copied = 0;
    for b in &scan {
        side.to_backend.extend_from_slice(&input[copied..b.at]);
        copied = b.at;
        if b.tag == frontend::SYNC && tx.copy_in {
            // Postgres ignores Sync during COPY FROM STDIN: no answer will come for it.
            continue;
        }
        count_request(s, tx, b.tag);
        tracing::trace!(tag = %(b.tag as char), "client message");
        let body = b.whole.then(|| b.body(input));
        if on_client_message(s, side, b.tag, body)? {
            copied = b.end();
        }
    }
    side.to_backend.extend_from_slice(&input[copied..consumed]);
    *side.scan = scan;
    s.plan.flush_synthetic(side.to_client);
    Ok((consumed, stopped))
}

fn count_request(s: &mut Session, tx: &mut TxState, tag: u8) {
    match tag {
        frontend::SYNC => {
            tx.unsynced = false;
            request_sent(s, tx);
        }
        frontend::QUERY | frontend::FUNCTION_CALL => request_sent(s, tx),
        frontend::COPY_DATA => {}
        frontend::COPY_DONE | frontend::COPY_FAIL => tx.copy_in = false,
        _ => tx.unsynced = true,
    }
}

fn request_sent(s: &mut Session, tx: &mut TxState) {
    if tx.pending == 0 {
        tx.request_started = Some(std::time::Instant::now());
    }
    tx.pending += 1;
    s.pool.queries.inc();
}

/// Plans the answer to one client message and, when it must be rewritten or answered by
/// pgwarden, writes its replacement. Returns true when the original bytes must not be
/// copied to the backend.
fn on_client_message(
    s: &mut Session,
    side: &mut BackendSide<'_>,
    tag: u8,
    body: Option<&[u8]>,
) -> Result<bool, ProtocolError> {
    let map = s.mode == PoolMode::Transaction;
    let watch_pins = s.releases_per_transaction();
    match (tag, body) {
        (frontend::QUERY, Some(body)) => {
            let sql = frontend::parse_query(body)?;
            if !needs_inspection(sql) {
                s.plan.push(Expect::Query {
                    change: None,
                    failed: false,
                });
                return Ok(false);
            }
            let change = if !map {
                None
            } else if is_discard_all(sql) {
                Some(Change::ResetAll)
            } else {
                match settings::classify(sql) {
                    SettingSql::Track(change) => Some(change),
                    SettingSql::None => None,
                }
            };
            if watch_pins && change.is_none() {
                if let Some(reason) = classify_sql(sql) {
                    s.pin(reason);
                }
            }
            s.plan.push(Expect::Query {
                change,
                failed: false,
            });
            let rewritten = map && rewrite_deallocation(s, side, sql);
            forget_statements_dropped_by(sql, side.statements);
            Ok(rewritten)
        }
        (frontend::PARSE, Some(body)) => {
            let name = frontend::parse_statement_name(body)?;
            let rest = &body[name.len() + 1..];
            if watch_pins {
                let query = frontend::parse_query(rest).unwrap_or_default();
                if let Some(reason) = classify_sql(query) {
                    s.pin(reason);
                }
            }
            if !map || name.is_empty() {
                s.plan.push(Expect::Parse {
                    name: Arc::from(""),
                    client_name: None,
                    reply: Reply::Forward,
                });
                return Ok(false);
            }
            let prepared = Arc::new(Prepared::from_parse_rest(rest));
            if !s.statements.insert(name, prepared.clone()) {
                return Err(ProtocolError::Malformed(
                    "too many prepared statements for one client",
                ));
            }
            if side.statements.readiness(&prepared.name) == Readiness::Ready {
                side.statements.touch(&prepared.name);
                s.plan.push(Expect::Parse {
                    name: prepared.name.clone(),
                    client_name: Some(name.to_owned()),
                    reply: Reply::Synthesize,
                });
            } else {
                prepare_on_backend(s, side, &prepared, Some(name), Reply::Forward);
            }
            Ok(true)
        }
        (frontend::BIND, Some(body)) => {
            let (portal, statement, rest) = frontend::parse_bind_names(body)?;
            match mapped(s, map, statement) {
                Some(prepared) => {
                    ensure_prepared(s, side, &prepared);
                    frontend::bind(side.to_backend, portal, &prepared.name, &body[rest..]);
                    s.plan.push(Expect::Bind {
                        statement: Some(prepared.name.clone()),
                    });
                    Ok(true)
                }
                None => {
                    s.plan.push(Expect::Bind { statement: None });
                    Ok(false)
                }
            }
        }
        (frontend::DESCRIBE, Some(body)) => {
            let (kind, name) = frontend::parse_target(body)?;
            let prepared = mapped(s, map && kind == b'S', name);
            if let Some(prepared) = &prepared {
                ensure_prepared(s, side, prepared);
                frontend::target_message(side.to_backend, frontend::DESCRIBE, b'S', &prepared.name);
            }
            s.plan.push(Expect::Describe);
            Ok(prepared.is_some())
        }
        (frontend::CLOSE, Some(body)) => {
            let (kind, name) = frontend::parse_target(body)?;
            if map && kind == b'S' && !name.is_empty() && s.statements.remove(name).is_some() {
                // Other clients may share the backend statement: only the mapping goes.
                s.plan.push(Expect::Close {
                    reply: Reply::Synthesize,
                });
                return Ok(true);
            }
            s.plan.push(Expect::Close {
                reply: Reply::Forward,
            });
            Ok(false)
        }
        // Too large to look inside: relayed as is.
        (frontend::QUERY | frontend::PARSE, None) => {
            if watch_pins {
                s.pin(PinReason::Uninspected);
            }
            s.plan.push(if tag == frontend::QUERY {
                Expect::Query {
                    change: None,
                    failed: false,
                }
            } else {
                Expect::Parse {
                    name: Arc::from(""),
                    client_name: None,
                    reply: Reply::Forward,
                }
            });
            Ok(false)
        }
        (frontend::BIND, None) => {
            s.plan.push(Expect::Bind { statement: None });
            Ok(false)
        }
        (frontend::DESCRIBE, None) => {
            s.plan.push(Expect::Describe);
            Ok(false)
        }
        (frontend::CLOSE, None) => {
            s.plan.push(Expect::Close {
                reply: Reply::Forward,
            });
            Ok(false)
        }
        (frontend::EXECUTE, _) => {
            s.plan.push(Expect::Execute);
            Ok(false)
        }
        (frontend::SYNC, _) => {
            s.plan.push(Expect::Sync);
            Ok(false)
        }
        (frontend::FUNCTION_CALL, _) => {
            s.plan.push(Expect::Query {
                change: None,
                failed: false,
            });
            Ok(false)
        }
        (frontend::COPY_DONE | frontend::COPY_FAIL, _) => {
            s.plan.push(Expect::CopyEnd);
            Ok(false)
        }
        _ => Ok(false),
    }
}

/// The client's mapped statement `name`, if mapping applies.
fn mapped(s: &Session, map: bool, name: &str) -> Option<Arc<Prepared>> {
    if !map || name.is_empty() {
        return None;
    }
    s.statements.get(name).cloned()
}

/// Makes sure the backend has `prepared` before the message about to be written uses it.
fn ensure_prepared(s: &mut Session, side: &mut BackendSide<'_>, prepared: &Arc<Prepared>) {
    if side.statements.readiness(&prepared.name) == Readiness::Ready {
        side.statements.touch(&prepared.name);
    } else {
        prepare_on_backend(s, side, prepared, None, Reply::Swallow);
    }
}

/// Writes Close + Parse for `prepared` (the Close makes a stale or unknown copy harmless and
/// is never shown to the client), and first closes the least recently used statement if
/// the backend is at capacity.
fn prepare_on_backend(
    s: &mut Session,
    side: &mut BackendSide<'_>,
    prepared: &Arc<Prepared>,
    client_name: Option<&str>,
    reply: Reply,
) {
    let mut close = |name: &str, s: &mut Session| {
        frontend::target_message(side.to_backend, frontend::CLOSE, b'S', name);
        s.plan.push(Expect::Close {
            reply: Reply::Swallow,
        });
    };
    if let Some(evicted) = side.statements.insert(prepared.name.clone()) {
        close(&evicted, s);
    }
    close(&prepared.name, s);
    side.to_backend.extend_from_slice(&prepared.parse);
    s.plan.push(Expect::Parse {
        name: prepared.name.clone(),
        client_name: client_name.map(str::to_owned),
        reply,
    });
}

/// Handles a client's `DEALLOCATE`/`DISCARD ALL` of its mapped statements; returns true if
/// the query was rewritten (written to the backend) rather than relayed as is.
fn rewrite_deallocation(s: &mut Session, side: &mut BackendSide<'_>, sql: &str) -> bool {
    match deallocation(sql) {
        Some(Deallocate::All) => {
            s.statements.clear();
            false
        }
        Some(Deallocate::One(name)) => match s.statements.remove(&name) {
            // The backend knows the statement by its shared name. If this backend
            // never prepared it, DEALLOCATE ALL answers the same way without an error
            // (only the command tag differs); the backend's statements are prepared
            // again on next use.
            Some(prepared) => {
                let sql = if side.statements.readiness(&prepared.name) == Readiness::Missing {
                    "DEALLOCATE ALL".to_owned()
                } else {
                    format!("DEALLOCATE {}", prepared.name)
                };
                frontend::query(side.to_backend, &sql);
                true
            }
            None => false,
        },
        None => false,
    }
}

fn is_discard_all(sql: &str) -> bool {
    let mut words = sql.trim().trim_end_matches(';').split_whitespace();
    matches!(
        (words.next(), words.next(), words.next()),
        (Some(discard), Some(all), None)
            if discard.eq_ignore_ascii_case("discard") && all.eq_ignore_ascii_case("all")
    )
}

/// A client's SQL that deallocates its protocol-level statements.
#[derive(Debug, PartialEq, Eq)]
enum Deallocate {
    /// `DEALLOCATE ALL` or `DISCARD ALL`.
    All,
    /// `DEALLOCATE [PREPARE] name`, with the name as Postgres would read it.
    One(String),
}

fn deallocation(sql: &str) -> Option<Deallocate> {
    let statement = sql.trim().trim_end_matches(';').trim();
    let lower = statement.to_ascii_lowercase();
    let words: Vec<&str> = lower.split_whitespace().collect();
    match words.as_slice() {
        ["discard", "all"] | ["deallocate", "all"] | ["deallocate", "prepare", "all"] => {
            Some(Deallocate::All)
        }
        ["deallocate", "prepare", _] | ["deallocate", _] => {
            let original = statement.split_whitespace().last()?;
            let name = match original.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
                Some(quoted) => quoted.replace("\"\"", "\""),
                None => original.to_ascii_lowercase(),
            };
            Some(Deallocate::One(name))
        }
        _ => None,
    }
}

/// Whether the checks on a Query's text (settings, pins, deallocation) could act on `sql`:
/// one scan of its words. Most queries hold none of those words and skip every check.
fn needs_inspection(sql: &str) -> bool {
    sql_words(sql).any(|word| is_pin_word(word) || is_deallocation_word(word))
}

/// The words that start the statements [`deallocation`] and
/// [`forget_statements_dropped_by`] act on.
fn is_deallocation_word(word: &[u8]) -> bool {
    word.eq_ignore_ascii_case(b"deallocate") || word.eq_ignore_ascii_case(b"discard")
}

/// SQL that deallocates prepared statements on the backend (`DEALLOCATE`, `DISCARD ALL`,
/// `DISCARD PLANS`) makes pgwarden forget what it knew was prepared there; statements are
/// prepared again on next use.
fn forget_statements_dropped_by(sql: &str, statements: &mut BackendStatements) {
    let sql = sql.as_bytes();
    if contains_ignore_ascii_case(sql, b"deallocate") || contains_ignore_ascii_case(sql, b"discard")
    {
        statements.clear();
    }
}

/// Processes newly read backend bytes into `side.to_client`; returns how many bytes were
/// consumed.
pub fn process_backend(
    s: &mut Session,
    tx: &mut TxState,
    walker: &mut FrameWalker,
    side: &mut BackendSide<'_>,
    input: &[u8],
) -> Result<usize, ProtocolError> {
    let mut scan = std::mem::take(side.scan);
    // No backend message stops the walk (0 is not a message type).
    let (consumed, _) = find_boundaries(walker, input, backend_inspects, 0, &mut scan)?;
    let mut events = Vec::new();
    let mut copied = 0;
    let mut result = Ok(());
    for b in &scan {
        side.to_client.extend_from_slice(&input[copied..b.at]);
        copied = b.at;
        if s.plan.replaying() {
            // The answer to pgwarden's settings replay: hidden, and not the client's state.
            s.plan.on_replay_message(b.tag, &mut events);
            if b.whole {
                copied = b.end();
            }
            apply_events(s, side, &mut events);
            continue;
        }
        let mut error = None;
        match b.tag {
            backend::READY_FOR_QUERY if b.whole => {
                let was_in_block = tx.status != backend::IDLE;
                let committed = tx.status == backend::IN_TRANSACTION && tx.last_was_commit;
                match backend::parse_ready_for_query(b.body(input)) {
                    Ok(status) => tx.status = status,
                    Err(e) => result = Err(e),
                }
                let in_block = tx.status != backend::IDLE;
                if in_block != was_in_block {
                    if in_block {
                        s.pool.in_transaction.inc();
                    } else {
                        s.pool.in_transaction.dec();
                    }
                }
                if was_in_block && tx.status == backend::IDLE && s.settings.has_deferred() {
                    s.settings.end_transaction(committed);
                    *side.settings = s.settings.signature();
                }
                tx.pending = tx.pending.saturating_sub(1);
                if tx.pending == 0 {
                    if let Some(started) = tx.request_started.take() {
                        s.pool
                            .response_seconds
                            .observe(started.elapsed().as_secs_f64());
                    }
                }
                tx.copy_in = false;
                tx.error_since_ready = false;
            }
            backend::COMMAND_COMPLETE if b.whole => {
                tx.last_was_commit = b.body(input).starts_with(b"COMMIT");
            }
            backend::ERROR_RESPONSE => {
                tx.error_since_ready = true;
                tx.copy_in = false;
                if let Some(fields) = b
                    .whole
                    .then(|| ErrorFields::parse(b.body(input)).ok())
                    .flatten()
                {
                    if fields.is_fatal() {
                        tx.backend_fatal = true;
                        debug!(code = %fields.code, "backend reported a fatal error");
                    }
                    error = Some(fields);
                }
            }
            // CopyInResponse / CopyBothResponse: the backend now waits for client data.
            b'G' | b'W' => {
                tx.copy_in = true;
                tx.pending = tx.pending.saturating_sub(s.plan.on_copy_in());
            }
            _ => {}
        }
        let error_ref = error
            .as_ref()
            .map(|f| (f.code.as_str(), f.message.as_str()));
        if !s
            .plan
            .on_backend(b.tag, error_ref, side.to_client, &mut events)
            && b.whole
        {
            copied = b.end();
        }
        if !events.is_empty() {
            let status = tx.status;
            apply_settings_events(s, side, &mut events, status);
            apply_events(s, side, &mut events);
        }
    }
    side.to_client.extend_from_slice(&input[copied..consumed]);
    if walker.at_boundary() {
        s.plan.flush_synthetic(side.to_client);
    }
    *side.scan = scan;
    result.map(|()| consumed)
}

/// Setting changes that completed: kept (now, or when their transaction commits), and the
/// backend's signature follows the client's settings it now carries.
fn apply_settings_events(
    s: &mut Session,
    side: &mut BackendSide<'_>,
    events: &mut Vec<Event>,
    status: u8,
) {
    events.retain(|event| {
        let Event::SettingDone { change, failed } = event else {
            return true;
        };
        if !*failed {
            if status == backend::IDLE {
                if s.settings.apply(change.clone()).is_err() {
                    *side.settings = settings::UNKNOWN;
                    return false;
                }
            } else {
                s.settings.defer(change.clone());
            }
            *side.settings = s.settings.signature();
        }
        false
    });
}

/// Statement bookkeeping after backend answers.
fn apply_events(s: &mut Session, side: &mut BackendSide<'_>, events: &mut Vec<Event>) {
    for event in events.drain(..) {
        match event {
            Event::Prepared { name } => s.pool.statement_is_valid(name),
            Event::NotPrepared { name, client_name } => {
                s.pool.statement_is_invalid(&name);
                side.statements.remove(&name);
                if let Some(client_name) = client_name {
                    s.statements.forget_if(&client_name, &name);
                }
            }
            Event::PlanChanged { name } => side.statements.mark_stale(&name),
            Event::ReplayDone { failed } => {
                if failed {
                    // Named: at `info` serving does not enter the client's span.
                    tracing::warn!(
                        target_name = %s.target().name(),
                        database = %s.pool.key.database,
                        user = %s.pool.key.user,
                        "replaying a client's settings failed; the backend's settings are reset on next use"
                    );
                    *side.settings = settings::UNKNOWN;
                }
            }
            Event::SettingDone { .. } => {}
        }
    }
}

/// Answers, with no backend, a client's Parse of statements already known valid in its
/// pool followed by Sync (what libpq's `PQprepare` sends). A new client preparing its
/// statements then costs no borrow, and a client that prepares synchronously while its
/// other connections hold every backend (pgbench `-M prepared`) is not stuck behind them.
/// Returns the answer, having consumed the messages, or `None` if they need a backend.
pub fn answer_without_backend(s: &mut Session, cbuf: &mut BytesMut) -> Option<BytesMut> {
    if !s.releases_per_transaction() {
        return None;
    }
    let mut pos = 0;
    let mut parses = Vec::new();
    let end = loop {
        let header = cbuf.get(pos..pos + HEADER_LEN)?;
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len < 4 {
            return None;
        }
        let body = cbuf.get(pos + HEADER_LEN..pos + 1 + len)?;
        match header[0] {
            frontend::PARSE => {
                let name = frontend::parse_statement_name(body).ok()?;
                if name.is_empty() {
                    return None;
                }
                let prepared = Prepared::from_parse_rest(&body[name.len() + 1..]);
                if !s.pool.is_valid_statement(&prepared.name) {
                    return None;
                }
                parses.push((name.to_owned(), Arc::new(prepared)));
            }
            frontend::SYNC if !parses.is_empty() => break pos + 1 + len,
            _ => return None,
        }
        pos += 1 + len;
    };
    if s.statements.len() + parses.len() > super::statements::CLIENT_STATEMENT_LIMIT {
        return None;
    }
    let mut answer = BytesMut::with_capacity(5 * parses.len() + 6);
    for (name, prepared) in parses {
        s.statements.insert(&name, prepared);
        backend::parse_complete(&mut answer);
    }
    backend::ready_for_query(&mut answer, backend::IDLE);
    bytes::Buf::advance(cbuf, end);
    s.pool.queries.inc();
    Some(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_the_checks_act_on_are_inspected_and_others_are_not() {
        for sql in [
            "SET search_path = app",
            "reset all",
            "DISCARD ALL",
            "deallocate prepare s1",
            "select pg_advisory_lock(1)",
            "create TEMP table t (a int)",
        ] {
            assert!(needs_inspection(sql), "{sql}");
        }
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 7",
            "update t set_x = 1",
            "BEGIN",
        ] {
            assert!(!needs_inspection(sql), "{sql}");
        }
    }

    #[test]
    fn recognises_a_clients_deallocation() {
        assert_eq!(deallocation("DISCARD ALL;"), Some(Deallocate::All));
        assert_eq!(
            deallocation(" deallocate prepare all "),
            Some(Deallocate::All)
        );
        assert_eq!(
            deallocation("DEALLOCATE _pg3_0"),
            Some(Deallocate::One("_pg3_0".into()))
        );
        assert_eq!(
            deallocation("deallocate prepare S_1"),
            Some(Deallocate::One("s_1".into()))
        );
        assert_eq!(
            deallocation("DEALLOCATE \"S_1\""),
            Some(Deallocate::One("S_1".into()))
        );
        assert_eq!(deallocation("select 1"), None);
        assert_eq!(deallocation("discard plans"), None);
    }
}
