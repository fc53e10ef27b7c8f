//! A client's log span: the fields every line about the client carries (peer, user,
//! database, target, principal, TLS), and when the span is entered.
//!
//! Setup runs inside the span. Serving enters it only while debug or trace lines can be
//! written: entering a span costs the log subscriber about 270 instructions on every poll,
//! three polls a transaction, which was a twelfth of pgwarden's own work per transaction
//! (callgrind, `pgbench -S`). At `info` and above the serving code writes its lines with
//! the span named as their parent, or with the fields they need. The log filter is fixed
//! at start, so both ways give the same lines.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tracing::Span;

use super::relay::Departure;
use super::Client;

/// The span of a client's log lines. Setup records the other fields as it learns them;
/// a client woken from parking gets them all at once ([`span_again`]).
pub fn client_span(peer: SocketAddr) -> Span {
    tracing::info_span!(
        "client",
        %peer,
        user = tracing::field::Empty,
        database = tracing::field::Empty,
        target = tracing::field::Empty,
        principal = tracing::field::Empty,
        tls = tracing::field::Empty
    )
}

/// A span with the fields of the one `client` was set up in, for a client woken from
/// parking. A parked client keeps no span: at the `info` level the subscriber keeps a
/// span's fields in memory for as long as the span lives, about 0.4 KiB a client (10,000
/// parked clients: 1.40 KiB each with the span, 1.01 without), more than half the rest of a
/// parked client's state.
pub fn span_again(client: &Client) -> Span {
    let info = client.session.cancel.info();
    let key = &client.session.pool.key;
    let span = client_span(info.peer);
    span.record("user", key.user.as_str());
    span.record("database", key.database.as_str());
    span.record("target", client.session.target().name());
    if let Some(principal) = &info.principal {
        span.record("principal", principal.as_str());
    }
    span.record("tls", info.tls);
    span
}

pin_project_lite::pin_project! {
    /// Serving a client (`relay::serve`) in its span: entered on each poll only while
    /// debug lines can be written; the client's last line, when it leaves, names it. As
    /// large as `tracing::Instrumented`, which it replaces: a client task's size is what an
    /// idle client costs until it parks.
    pub struct Serving<F> {
        #[pin]
        serve: F,
        span: Span,
    }
}

impl<F> Serving<F> {
    pub fn new(serve: F, span: Span) -> Self {
        Self { serve, span }
    }
}

impl<F: Future<Output = Option<Departure>>> Future for Serving<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let served = if tracing::level_enabled!(tracing::Level::DEBUG) {
            let _entered = this.span.enter();
            this.serve.poll(cx)
        } else {
            this.serve.poll(cx)
        };
        match served {
            Poll::Ready(departure) => {
                if let Some(departure) = departure {
                    departure.log(this.span);
                }
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
