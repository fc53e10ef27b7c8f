//! The response plan: what the client is owed, in order, for the messages relayed to (or
//! answered for) the backend. It lets pgwarden answer a Parse or Close itself (the backend
//! already has the statement, or shares it with other clients), and hide the answers to
//! messages it injected (a Parse re-preparing a statement on a new backend), without the
//! client seeing anything out of order.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::BytesMut;
use pgwarden_protocol::backend;

use super::settings::Change;

/// Who answers a Parse or Close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// The backend answers and the client sees it.
    Forward,
    /// pgwarden answers (the message never went to the backend).
    Synthesize,
    /// The backend answers a message pgwarden injected; the client must not see it.
    Swallow,
}

/// One expected answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    Parse {
        /// Backend statement name ("" for the unnamed statement).
        name: Arc<str>,
        /// The client's name for it, if the client sent this Parse.
        client_name: Option<String>,
        reply: Reply,
    },
    Bind {
        /// Backend statement name, when it is a mapped named statement.
        statement: Option<Arc<str>>,
    },
    Describe,
    Execute,
    Close {
        reply: Reply,
    },
    Sync,
    /// A simple Query or FunctionCall: answered up to its ReadyForQuery. `change` is the
    /// session setting it makes, kept if it succeeds.
    Query {
        change: Option<Change>,
        failed: bool,
    },
    /// pgwarden's own query replaying the client's settings: every answer is hidden.
    Hidden {
        failed: bool,
    },
    /// CopyDone or CopyFail: no answer of its own; marks where a COPY IN ends.
    CopyEnd,
}

/// What the relay must do about statement bookkeeping after a backend message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A named statement was prepared successfully on the backend.
    Prepared { name: Arc<str> },
    /// A Parse failed or was skipped after an earlier error: the backend does not have
    /// `name`, and the client's `client_name` does not exist either.
    NotPrepared {
        name: Arc<str>,
        client_name: Option<String>,
    },
    /// A Bind of `name` failed with "cached plan must not change result type".
    PlanChanged { name: Arc<str> },
    /// A simple query making a setting change ended (its ReadyForQuery was just read).
    SettingDone { change: Change, failed: bool },
    /// The settings replay ended.
    ReplayDone { failed: bool },
}

/// The ordered answers owed to the client.
#[derive(Debug, Default)]
pub struct Plan {
    queue: VecDeque<Expect>,
}

fn synthesize(expect: &Expect, out: &mut BytesMut) {
    match expect {
        Expect::Parse { .. } => backend::parse_complete(out),
        Expect::Close { .. } => backend::close_complete(out),
        _ => {}
    }
}

fn is_synthetic(expect: &Expect) -> bool {
    matches!(
        expect,
        Expect::CopyEnd
            | Expect::Parse {
                reply: Reply::Synthesize,
                ..
            }
            | Expect::Close {
                reply: Reply::Synthesize
            }
    )
}

impl Plan {
    pub fn push(&mut self, expect: Expect) {
        self.queue.push_back(expect);
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// True while the backend is answering pgwarden's settings replay.
    pub fn replaying(&self) -> bool {
        matches!(self.queue.front(), Some(Expect::Hidden { .. }))
    }

    /// Accounts for one message of the replay's answer (all hidden from the client).
    pub fn on_replay_message(&mut self, tag: u8, events: &mut Vec<Event>) {
        match (tag, self.queue.front_mut()) {
            (backend::ERROR_RESPONSE, Some(Expect::Hidden { failed })) => *failed = true,
            (backend::READY_FOR_QUERY, Some(Expect::Hidden { failed })) => {
                events.push(Event::ReplayDone { failed: *failed });
                self.queue.pop_front();
            }
            _ => {}
        }
    }

    /// The backend entered COPY FROM STDIN for the request at the head: it ignores Sync
    /// until the copy ends, so Syncs the client sent before its CopyDone/CopyFail get no
    /// answer. Returns how many were dropped from the plan.
    pub fn on_copy_in(&mut self) -> usize {
        let end = self
            .queue
            .iter()
            .position(|e| matches!(e, Expect::CopyEnd))
            .unwrap_or(self.queue.len());
        let mut dropped = 0;
        let mut i = 1;
        while i < end - dropped {
            if matches!(self.queue[i], Expect::Sync) {
                self.queue.remove(i);
                dropped += 1;
            } else {
                i += 1;
            }
        }
        dropped
    }

    pub fn clear(&mut self) {
        self.queue.clear();
    }

    /// Gives back the queue's memory (an empty plan holds none).
    pub fn release_memory(&mut self) {
        debug_assert!(self.queue.is_empty());
        self.queue = VecDeque::new();
    }

    /// Writes pgwarden's own answers that are due now: those at the head of the queue,
    /// with nothing owed by the backend before them. Called for every inspected message
    /// and almost always with none due, so that check is inlined and the loop is not.
    #[inline]
    pub fn flush_synthetic(&mut self, out: &mut BytesMut) {
        if self.queue.front().is_some_and(is_synthetic) {
            self.write_synthetic(out);
        }
    }

    #[inline(never)]
    fn write_synthetic(&mut self, out: &mut BytesMut) {
        while self.queue.front().is_some_and(is_synthetic) {
            if let Some(expect) = self.queue.pop_front() {
                synthesize(&expect, out);
            }
        }
    }

    /// Accounts for one backend message. Returns whether it goes to the client; writes any
    /// of pgwarden's own answers due before it into `out`, and bookkeeping into `events`.
    /// Answers due after it are written by the next call or by [`Plan::flush_synthetic`]
    /// once the message itself has been copied out.
    /// `error_code` is the SQLSTATE and message of an ErrorResponse.
    pub fn on_backend(
        &mut self,
        tag: u8,
        error: Option<(&str, &str)>,
        out: &mut BytesMut,
        events: &mut Vec<Event>,
    ) -> bool {
        // Asynchronous messages belong to no request.
        if matches!(tag, b'N' | b'S' | b'A') {
            return true;
        }
        self.flush_synthetic(out);
        let Some(head) = self.queue.front() else {
            return true;
        };
        match (tag, head) {
            (backend::PARSE_COMPLETE, Expect::Parse { reply, name, .. }) => {
                let forward = *reply != Reply::Swallow;
                if !name.is_empty() {
                    events.push(Event::Prepared { name: name.clone() });
                }
                self.queue.pop_front();
                forward
            }
            (backend::CLOSE_COMPLETE, Expect::Close { reply }) => {
                let forward = *reply != Reply::Swallow;
                self.queue.pop_front();
                forward
            }
            (backend::READY_FOR_QUERY, Expect::Query { .. }) => {
                if let Some(Expect::Query {
                    change: Some(change),
                    failed,
                }) = self.queue.pop_front()
                {
                    events.push(Event::SettingDone { change, failed });
                }
                true
            }
            (backend::BIND_COMPLETE, Expect::Bind { .. })
            | (b'T' | b'n', Expect::Describe)
            | (b'C' | b'I' | b's', Expect::Execute)
            | (backend::READY_FOR_QUERY, Expect::Sync) => {
                self.queue.pop_front();
                true
            }
            (backend::ERROR_RESPONSE, Expect::Query { .. }) => {
                if let Some(Expect::Query { failed, .. }) = self.queue.front_mut() {
                    *failed = true;
                }
                true
            }
            (backend::ERROR_RESPONSE, _) => {
                self.fail_until_sync(error, events);
                true
            }
            (backend::READY_FOR_QUERY, _) => {
                // Out of step (should not happen): resynchronise at this ReadyForQuery.
                while let Some(e) = self.queue.pop_front() {
                    if matches!(e, Expect::Sync | Expect::Query { .. }) {
                        break;
                    }
                }
                true
            }
            _ => true,
        }
    }

    /// An error answers the head request; the backend then skips everything up to Sync.
    fn fail_until_sync(&mut self, error: Option<(&str, &str)>, events: &mut Vec<Event>) {
        let mut first = true;
        while let Some(front) = self.queue.front() {
            if matches!(front, Expect::Sync) {
                break;
            }
            let Some(expect) = self.queue.pop_front() else {
                break;
            };
            match expect {
                Expect::Parse {
                    name, client_name, ..
                } if !name.is_empty() => events.push(Event::NotPrepared { name, client_name }),
                Expect::Bind {
                    statement: Some(name),
                } if first => {
                    if let Some(("0A000", message)) = error {
                        if message.contains("cached plan must not change result type") {
                            events.push(Event::PlanChanged { name });
                        }
                    }
                }
                _ => {}
            }
            first = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(reply: Reply) -> Expect {
        Expect::Parse {
            name: Arc::from("pgw_x"),
            client_name: Some("s1".into()),
            reply,
        }
    }

    #[test]
    fn a_synthetic_parse_complete_comes_before_the_bind_complete() {
        let mut plan = Plan::default();
        plan.push(parse(Reply::Synthesize));
        plan.push(Expect::Bind { statement: None });
        plan.push(Expect::Execute);
        plan.push(Expect::Sync);
        let mut out = BytesMut::new();
        plan.flush_synthetic(&mut out);
        assert_eq!(
            &out[..],
            b"1\0\0\0\x04",
            "due at once: nothing is owed before it"
        );
        out.clear();
        let mut events = Vec::new();
        for tag in [b'2', b'D', b'C', b'Z'] {
            assert!(plan.on_backend(tag, None, &mut out, &mut events));
        }
        assert!(plan.is_empty());
        assert!(out.is_empty());
    }

    #[test]
    fn an_injected_parse_is_hidden_and_a_synthetic_close_waits_its_turn() {
        let mut plan = Plan::default();
        plan.push(parse(Reply::Swallow));
        plan.push(Expect::Bind { statement: None });
        plan.push(Expect::Close {
            reply: Reply::Synthesize,
        });
        plan.push(Expect::Sync);
        let mut out = BytesMut::new();
        let mut events = Vec::new();
        plan.flush_synthetic(&mut out);
        assert!(out.is_empty(), "the close is owed after the bind");
        assert!(
            !plan.on_backend(b'1', None, &mut out, &mut events),
            "injected parse hidden"
        );
        assert!(plan.on_backend(b'2', None, &mut out, &mut events));
        assert!(
            out.is_empty(),
            "not before the bind complete itself is copied out"
        );
        plan.flush_synthetic(&mut out);
        assert_eq!(
            &out[..],
            b"3\0\0\0\x04",
            "close complete right after bind complete"
        );
        out.clear();
        assert!(plan.on_backend(b'Z', None, &mut out, &mut events));
        assert!(out.is_empty());
        assert!(plan.is_empty());
    }

    #[test]
    fn an_error_skips_to_sync_and_reports_statements_never_prepared() {
        let mut plan = Plan::default();
        plan.push(Expect::Bind {
            statement: Some(Arc::from("pgw_old")),
        });
        plan.push(parse(Reply::Forward));
        plan.push(parse(Reply::Synthesize));
        plan.push(Expect::Execute);
        plan.push(Expect::Sync);
        let mut out = BytesMut::new();
        let mut events = Vec::new();
        let error = Some(("0A000", "cached plan must not change result type"));
        assert!(plan.on_backend(b'E', error, &mut out, &mut events));
        assert!(out.is_empty(), "no answer for messages the backend skipped");
        assert_eq!(events.len(), 3);
        assert_eq!(
            events[0],
            Event::PlanChanged {
                name: Arc::from("pgw_old")
            }
        );
        assert!(plan.on_backend(b'Z', None, &mut out, &mut events));
        assert!(plan.is_empty());
    }

    #[test]
    fn syncs_sent_during_copy_in_are_not_owed_an_answer() {
        let mut plan = Plan::default();
        for e in [Expect::Execute, Expect::Sync, Expect::CopyEnd, Expect::Sync] {
            plan.push(e);
        }
        assert_eq!(plan.on_copy_in(), 1);
        let mut out = BytesMut::new();
        let mut events = Vec::new();
        assert!(plan.on_backend(b'C', None, &mut out, &mut events));
        assert!(plan.on_backend(b'Z', None, &mut out, &mut events));
        assert!(plan.is_empty());
        assert!(out.is_empty());
    }

    #[test]
    fn a_simple_query_with_an_error_ends_at_its_ready_for_query() {
        let mut plan = Plan::default();
        plan.push(Expect::Query {
            change: None,
            failed: false,
        });
        plan.push(parse(Reply::Synthesize));
        let mut out = BytesMut::new();
        let mut events = Vec::new();
        assert!(plan.on_backend(
            b'E',
            Some(("22012", "division by zero")),
            &mut out,
            &mut events
        ));
        assert!(events.is_empty());
        assert!(out.is_empty());
        assert!(plan.on_backend(b'Z', None, &mut out, &mut events));
        plan.flush_synthetic(&mut out);
        assert_eq!(&out[..], b"1\0\0\0\x04");
    }
}
