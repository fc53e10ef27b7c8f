//! Which thread serves a client. pgwarden serves on `worker_threads` threads (the
//! listener's own is the first) but fills them in order: a new or woken client goes to the
//! first thread that used less than `thread_busy_limit` of a CPU over the last sampling
//! interval (its busy share), and only when every thread is over it do clients go to each
//! in turn. At light load one thread serves everything, which costs the least (no thread
//! wakes another, and one wake finds several sockets ready); the others take clients as the
//! load grows, new ones and, between transactions, ones leaving a thread over the limit.
//! See docs/architecture.md, "Threads".

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use prometheus::{Gauge, IntCounter};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::runtime::CpuClock;

/// How often the threads' busy shares are measured. Short enough that a burst of new
/// clients spreads within its first tens of milliseconds; long enough that the measurement
/// costs nothing (one timer wake of the first thread).
const SAMPLE_INTERVAL: Duration = Duration::from_millis(50);

/// Most clients that leave busy threads per sampling interval (80 a second): a busy
/// thread's clients do not all jump at once, which would only make the next thread busy.
const MOVES_PER_INTERVAL: usize = 4;

/// Why a client is being placed (a label of `pgwarden_thread_clients_placed_total`).
#[derive(Clone, Copy)]
pub enum Arrival {
    /// A client that just connected.
    New,
    /// A parked client that sent something.
    Woken,
    /// A client between transactions leaving a thread over the limit.
    Moved,
}

/// The serving threads, their last measured busy shares, and the rule that picks one for a
/// client.
pub struct Threads {
    /// Index 0 is the listener's thread.
    threads: Vec<Placed>,
    busy_limit: f64,
    /// The next thread in turn when every thread is over the limit.
    next: AtomicUsize,
    /// Moves left in this sampling interval.
    moves_left: AtomicUsize,
}

/// A serving thread with what placement measures and counts of it.
struct Placed {
    thread: ServingThread,
    /// Its busy share of the last interval, as `f32` bits (precise enough, and read with
    /// one relaxed load).
    share: AtomicU32,
    busy_gauge: Gauge,
    /// Placements by [`Arrival`].
    placed: [IntCounter; 3],
}

impl Placed {
    fn share(&self) -> f64 {
        f64::from(f32::from_bits(self.share.load(Ordering::Relaxed)))
    }
}

impl Threads {
    /// `threads[0]` must be the thread that accepts clients.
    pub fn new(threads: Vec<ServingThread>, busy_limit: f64, metrics: &Metrics) -> Self {
        assert!(!threads.is_empty(), "at least one serving thread");
        let threads = threads
            .into_iter()
            .enumerate()
            .map(|(i, thread)| {
                let label = i.to_string();
                let placed = |kind: &str| {
                    metrics
                        .thread_clients_placed
                        .with_label_values(&[label.as_str(), kind])
                };
                Placed {
                    thread,
                    share: AtomicU32::new(0),
                    busy_gauge: metrics.thread_busy.with_label_values(&[&label]),
                    placed: [placed("new"), placed("woken"), placed("moved")],
                }
            })
            .collect();
        Self {
            threads,
            busy_limit,
            next: AtomicUsize::new(0),
            moves_left: AtomicUsize::new(0),
        }
    }

    /// The thread a client arriving now should be served on (an index into [`Self::handle`]).
    pub fn choose(&self, arrival: Arrival) -> usize {
        let chosen = if self.threads.len() == 1 {
            0
        } else {
            let shares = self.threads.iter().map(Placed::share);
            first_under_limit(shares, self.busy_limit, || {
                self.next.fetch_add(1, Ordering::Relaxed) % self.threads.len()
            })
        };
        self.threads[chosen].placed[arrival as usize].inc();
        chosen
    }

    /// Where a client between transactions on thread `here` should move, if anywhere: to
    /// the first other thread under the limit when its own is over it, at most
    /// [`MOVES_PER_INTERVAL`] clients per interval. This is how clients that connected at
    /// light load spread when it grows.
    pub fn move_from(&self, here: usize) -> Option<usize> {
        if self.threads.len() == 1 {
            return None;
        }
        let shares = self.threads.iter().map(Placed::share);
        let to = move_target(shares, here, self.busy_limit)?;
        self.moves_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .ok()?;
        self.threads[to].placed[Arrival::Moved as usize].inc();
        Some(to)
    }

    /// The runtime of serving thread `index`.
    pub fn handle(&self, index: usize) -> &Handle {
        &self.threads[index].thread.handle
    }

    /// Measures the threads' busy shares every [`SAMPLE_INTERVAL`] until `stop`. With one
    /// thread there is no choice to make and nothing is measured.
    pub async fn measure(self: std::sync::Arc<Self>, stop: CancellationToken) {
        if self.threads.len() == 1 {
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

    /// Each thread's busy time; `None` for one whose CPU time could not be read just now.
    fn busy_times(&self) -> Vec<Option<Duration>> {
        self.threads.iter().map(|p| p.thread.busy_time()).collect()
    }

    /// Stores each thread's busy share since `since` and returns the new starting point. A
    /// thread whose busy time could not be read keeps its last reading (and reads idle).
    fn record_shares(
        &self,
        since: (Instant, Vec<Option<Duration>>),
    ) -> (Instant, Vec<Option<Duration>>) {
        let (then, busy_then) = since;
        let now = Instant::now();
        let elapsed = now.duration_since(then).as_secs_f64().max(f64::EPSILON);
        let busy_now = self
            .threads
            .iter()
            .zip(busy_then)
            .map(|(p, before)| {
                let now = p.thread.busy_time().or(before);
                let spent = match (now, before) {
                    (Some(now), Some(before)) => now.saturating_sub(before).as_secs_f64(),
                    _ => 0.0,
                };
                let share = (spent / elapsed).min(1.0);
                p.share.store((share as f32).to_bits(), Ordering::Relaxed);
                p.busy_gauge.set(share);
                now
            })
            .collect();
        self.moves_left.store(MOVES_PER_INTERVAL, Ordering::Relaxed);
        (now, busy_now)
    }
}

/// A thread clients are served on: its runtime (a current-thread one) and, where the system
/// shows it, its CPU time.
pub struct ServingThread {
    pub handle: Handle,
    pub cpu_clock: Option<CpuClock>,
}

impl ServingThread {
    /// CPU time the thread has used (`None` if its clock could not be read just now);
    /// without a CPU clock, the time its runtime has spent running tasks (tokio's count,
    /// which also counts time the thread was preempted: on a machine shared with the
    /// database it reads busier than the thread is). One source per thread, so that a
    /// share never subtracts one from the other.
    fn busy_time(&self) -> Option<Duration> {
        match &self.cpu_clock {
            Some(clock) => clock.read(),
            None => Some(self.handle.metrics().worker_total_busy_duration(0)),
        }
    }
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

/// The first thread other than `here` under `limit`, when `here` is not under it.
fn move_target(
    shares: impl Iterator<Item = f64> + Clone,
    here: usize,
    limit: f64,
) -> Option<usize> {
    if shares.clone().nth(here).is_none_or(|share| share < limit) {
        return None;
    }
    shares
        .enumerate()
        .find(|&(i, share)| i != here && share < limit)
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{
        first_under_limit, move_target, Arrival, CpuClock, ServingThread, Threads,
        MOVES_PER_INTERVAL,
    };

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
    fn clients_leave_a_thread_over_the_limit_for_the_first_one_under_it() {
        assert_eq!(move_target([0.9, 0.8, 0.1].into_iter(), 0, 0.75), Some(2));
        assert_eq!(move_target([0.1, 0.9].into_iter(), 1, 0.75), Some(0));
        assert_eq!(
            move_target([0.5, 0.0].into_iter(), 0, 0.75),
            None,
            "under the limit: stay"
        );
        assert_eq!(
            move_target([0.9, 0.8].into_iter(), 0, 0.75),
            None,
            "nowhere better to go"
        );
        assert_eq!(
            move_target([0.9, 0.0].into_iter(), 0, 0.0),
            None,
            "a limit of 0 never moves"
        );
    }

    #[test]
    fn a_busy_thread_is_passed_over_and_threads_over_the_limit_take_turns() {
        let busy = crate::runtime::build().expect("runtime");
        let idle = crate::runtime::build().expect("runtime");
        let metrics = crate::metrics::Metrics::new();
        let serving = |runtime: &tokio::runtime::Runtime, cpu_clock| ServingThread {
            handle: runtime.handle().clone(),
            cpu_clock,
        };
        // The busy runtime runs on this thread (`block_on` below); the idle one never runs.
        // A low limit: the test threads share the CPUs, so the spinning one may not get a
        // whole CPU.
        let threads = Threads::new(
            vec![
                serving(&busy, CpuClock::of_this_thread()),
                serving(&idle, None),
            ],
            0.1,
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
        let moves: Vec<Option<usize>> = (0..=MOVES_PER_INTERVAL)
            .map(|_| threads.move_from(0))
            .collect();
        assert_eq!(moves[..MOVES_PER_INTERVAL], [Some(1); MOVES_PER_INTERVAL]);
        assert_eq!(
            moves[MOVES_PER_INTERVAL], None,
            "the interval's moves are used up"
        );
        assert_eq!(threads.move_from(1), None, "the idle thread's clients stay");
        let text = metrics.render();
        assert!(
            text.contains("pgwarden_thread_clients_placed_total{kind=\"new\",thread=\"1\"} 1"),
            "{text}"
        );
        let busy_share = text
            .lines()
            .find_map(|line| line.strip_prefix("pgwarden_thread_busy_ratio{thread=\"0\"} "))
            .and_then(|value| value.parse::<f64>().ok());
        assert!(busy_share.is_some_and(|share| share > 0.1), "{text}");

        // Both over a limit of 0: in turn, from where the turn stands.
        let threads = Threads::new(
            vec![serving(&busy, None), serving(&idle, None)],
            0.0,
            &metrics,
        );
        threads.record_shares(since);
        let turns: Vec<usize> = (0..3).map(|_| threads.choose(Arrival::Woken)).collect();
        assert_eq!(turns, [0, 1, 0]);
    }
}
