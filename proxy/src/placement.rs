//! Which thread serves a client. pgwarden serves on `worker_threads` threads (the
//! listener's own is the first) but fills them in order: a new or woken client goes to the
//! first thread that was busy for less than `thread_busy_limit` of the last sampling
//! interval, and only when every thread is over it do clients go to each in turn. At light
//! load one thread serves everything, which costs the least (no thread wakes another, and
//! one wake finds several sockets ready); the others take clients as the load grows. See
//! docs/architecture.md, "Threads".

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use prometheus::{Gauge, IntCounter};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How often the threads' busy shares are measured. Short enough that a burst of new
/// clients spreads within its first tens of milliseconds; long enough that the measurement
/// costs nothing (one timer wake of the first thread).
const SAMPLE_INTERVAL: Duration = Duration::from_millis(50);

/// Why a client is being placed (a label of `pgwarden_thread_clients_placed_total`).
#[derive(Clone, Copy)]
pub enum Arrival {
    /// A client that just connected.
    New,
    /// A parked client that sent something.
    Woken,
}

/// The serving threads' runtimes, their last measured busy shares, and the rule that picks
/// one for a client.
pub struct Threads {
    /// Index 0 is the listener's thread.
    handles: Vec<Handle>,
    busy_limit: f64,
    /// Per thread, its busy share of the last interval, as `f32` bits (precise enough, and
    /// read with one relaxed load).
    shares: Vec<AtomicU32>,
    /// The next thread in turn when every thread is over the limit.
    next: AtomicUsize,
    busy_gauges: Vec<Gauge>,
    /// Per thread, new then woken placements.
    placed: Vec<[IntCounter; 2]>,
}

impl Threads {
    /// `handles[0]` must be the runtime of the thread that accepts clients. Each runtime is
    /// a current-thread one: its only worker (index 0 in its metrics) is its thread.
    pub fn new(handles: Vec<Handle>, busy_limit: f64, metrics: &Metrics) -> Self {
        assert!(!handles.is_empty(), "at least one serving thread");
        let label = |i: usize| i.to_string();
        let busy_gauges = (0..handles.len())
            .map(|i| metrics.thread_busy.with_label_values(&[&label(i)]))
            .collect();
        let placed = (0..handles.len())
            .map(|i| {
                let placed = &metrics.thread_clients_placed;
                [
                    placed.with_label_values(&[&label(i), "new"]),
                    placed.with_label_values(&[&label(i), "woken"]),
                ]
            })
            .collect();
        Self {
            shares: handles.iter().map(|_| AtomicU32::new(0)).collect(),
            handles,
            busy_limit,
            next: AtomicUsize::new(0),
            busy_gauges,
            placed,
        }
    }

    /// The thread a client arriving now should be served on (an index into [`Self::handle`]).
    pub fn choose(&self, arrival: Arrival) -> usize {
        let chosen = if self.handles.len() == 1 {
            0
        } else {
            let shares = self.shares.iter().map(share_of);
            first_under_limit(shares, self.busy_limit, || {
                self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len()
            })
        };
        self.placed[chosen][arrival as usize].inc();
        chosen
    }

    /// The runtime of serving thread `index`.
    pub fn handle(&self, index: usize) -> &Handle {
        &self.handles[index]
    }

    /// Measures the threads' busy shares every [`SAMPLE_INTERVAL`] until `stop`. With one
    /// thread there is no choice to make and nothing is measured.
    pub async fn measure(self: std::sync::Arc<Self>, stop: CancellationToken) {
        if self.handles.len() == 1 {
            return;
        }
        let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = (Instant::now(), self.busy_times());
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            last = self.record_shares(last);
        }
    }

    fn busy_times(&self) -> Vec<Duration> {
        self.handles.iter().map(busy_time).collect()
    }

    /// Stores each thread's busy share since `since` and returns the new starting point.
    fn record_shares(&self, since: (Instant, Vec<Duration>)) -> (Instant, Vec<Duration>) {
        let (then, busy_then) = since;
        let now = Instant::now();
        let busy_now = self.busy_times();
        let elapsed = now.duration_since(then).as_secs_f64().max(f64::EPSILON);
        for i in 0..self.handles.len() {
            let spent = busy_now[i].saturating_sub(busy_then[i]).as_secs_f64();
            let share = (spent / elapsed).min(1.0);
            self.shares[i].store((share as f32).to_bits(), Ordering::Relaxed);
            self.busy_gauges[i].set(share);
        }
        (now, busy_now)
    }
}

fn share_of(share: &AtomicU32) -> f64 {
    f64::from(f32::from_bits(share.load(Ordering::Relaxed)))
}

/// Time the runtime's thread has spent running tasks since it started (tokio updates it
/// each time the thread goes to sleep or checks for I/O).
fn busy_time(handle: &Handle) -> Duration {
    handle.metrics().worker_total_busy_duration(0)
}

/// The first thread whose busy share is under `limit`; when none is, `in_turn()`.
fn first_under_limit(
    shares: impl IntoIterator<Item = f64>,
    limit: f64,
    in_turn: impl FnOnce() -> usize,
) -> usize {
    shares
        .into_iter()
        .position(|share| share < limit)
        .unwrap_or_else(in_turn)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{first_under_limit, Arrival, Threads};

    #[test]
    fn clients_fill_the_first_thread_under_the_limit_then_go_round() {
        let no_turn = || panic!("a thread is under the limit: no turn is taken");
        assert_eq!(
            first_under_limit([0.3, 0.1], 0.75, no_turn),
            0,
            "a thread under the limit takes the client even when a later one is idler"
        );
        assert_eq!(
            first_under_limit([0.9, 0.2, 0.0], 0.75, no_turn),
            1,
            "a busy first thread passes clients to the next one under the limit"
        );
        assert_eq!(
            first_under_limit([0.9, 0.8], 0.75, || 1),
            1,
            "every thread busy: the one in turn"
        );
        assert_eq!(
            first_under_limit([0.0, 0.0], 0.0, || 1),
            1,
            "a limit of 0: always the one in turn"
        );
    }

    #[test]
    fn a_busy_thread_is_passed_over_and_threads_over_the_limit_take_turns() {
        let busy = crate::runtime::build().expect("runtime");
        let idle = crate::runtime::build().expect("runtime");
        let metrics = crate::metrics::Metrics::new();
        let threads = Threads::new(
            vec![busy.handle().clone(), idle.handle().clone()],
            0.75,
            &metrics,
        );
        assert_eq!(threads.choose(Arrival::New), 0, "nothing measured yet");
        let start = (Instant::now(), threads.busy_times());
        // The first runtime's thread works without a break.
        busy.block_on(async {
            let until = Instant::now() + Duration::from_millis(60);
            while Instant::now() < until {
                std::hint::spin_loop();
            }
            tokio::task::yield_now().await;
        });
        let since = threads.record_shares(start);
        assert_eq!(
            threads.choose(Arrival::New),
            1,
            "the busy thread is passed over"
        );
        let text = metrics.render();
        assert!(
            text.contains("pgwarden_thread_clients_placed_total{kind=\"new\",thread=\"1\"} 1"),
            "{text}"
        );
        let busy_share = text
            .lines()
            .find_map(|line| line.strip_prefix("pgwarden_thread_busy_ratio{thread=\"0\"} "))
            .and_then(|value| value.parse::<f64>().ok());
        assert!(busy_share.is_some_and(|share| share > 0.75), "{text}");

        // Both over a limit of 0: in turn, from where the turn stands.
        let threads = Threads::new(
            vec![busy.handle().clone(), idle.handle().clone()],
            0.0,
            &metrics,
        );
        threads.record_shares(since);
        let turns: Vec<usize> = (0..3).map(|_| threads.choose(Arrival::Woken)).collect();
        assert_eq!(turns, [0, 1, 0]);
    }
}
