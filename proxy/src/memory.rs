//! Giving memory back to the system once a wave of clients has gone idle.
//!
//! A burst of Lambda invocations connects thousands of clients at once; for their first
//! second each has a task and a socket registration, then it parks and keeps only its
//! session state. The allocator keeps the freed memory for reuse, so the process stays at
//! the burst's peak, and a container's memory limit counts that. After a wave of parking
//! has settled, the parking thread asks the allocator to return whole free pages.

use std::time::{Duration, Instant};

/// Parks since the last trim that make a trim worth its cost (it walks the heap).
const AFTER_PARKS: usize = 1000;
/// How long parking must have been quiet: a trim in the middle of a burst would only be
/// undone by the clients still arriving.
const QUIET: Duration = Duration::from_millis(250);

/// When the parking thread trims: after [`AFTER_PARKS`] parks, once none has come for
/// [`QUIET`].
#[derive(Debug, Default)]
pub struct TrimPolicy {
    parks: usize,
    last_park: Option<Instant>,
}

impl TrimPolicy {
    /// Counts a park. `true` when this one makes a trim pending: the parking thread, which
    /// may be asleep with no timeout, must be woken to start watching the clock.
    pub fn parked(&mut self, now: Instant) -> bool {
        self.parks += 1;
        self.last_park = Some(now);
        self.parks == AFTER_PARKS
    }

    /// How long the parking thread may wait for events before it must look again; `None`
    /// when no trim is pending.
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        let last = self.last_park.filter(|_| self.parks >= AFTER_PARKS)?;
        Some((last + QUIET).saturating_duration_since(now))
    }

    /// Whether to trim now; if so, counting starts again.
    pub fn due(&mut self, now: Instant) -> bool {
        if self.wait(now) != Some(Duration::ZERO) {
            return false;
        }
        *self = Self::default();
        true
    }
}

/// Returns the allocator's free pages to the system: `malloc_trim`, which, unlike the
/// automatic trim, also releases free pages below the top of the heap. A no-op where the
/// allocator is not glibc's.
#[allow(
    unsafe_code,
    reason = "malloc_trim has no safe wrapper; the one FFI call in pgwarden"
)]
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers and no caller-side invariants; glibc locks each
    // arena while it walks it, so any thread may call it at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_only_after_enough_parks_and_a_quiet_spell() {
        let start = Instant::now();
        let mut policy = TrimPolicy::default();
        assert_eq!(
            policy.wait(start),
            None,
            "nothing parked: no reason to wake"
        );
        for _ in 0..AFTER_PARKS - 1 {
            assert!(!policy.parked(start));
        }
        assert_eq!(policy.wait(start), None, "too few parks");
        assert!(!policy.due(start + QUIET * 10));

        assert!(
            policy.parked(start),
            "the park that makes a trim pending says so"
        );
        assert_eq!(policy.wait(start), Some(QUIET));
        assert!(!policy.due(start + QUIET / 2), "parking is not quiet yet");
        let later = start + QUIET / 2;
        assert!(!policy.parked(later), "already pending");
        assert!(
            !policy.due(start + QUIET),
            "a new park restarts the quiet spell"
        );
        assert_eq!(policy.wait(later + QUIET * 2), Some(Duration::ZERO));
        assert!(policy.due(later + QUIET));

        assert_eq!(policy.wait(later + QUIET), None, "counting starts again");
        assert!(!policy.due(later + QUIET * 10));
    }
}
