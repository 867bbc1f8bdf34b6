//! Adaptive polling: how long a loop with nothing ready watches its
//! completion queue before it sleeps in the kernel.
//!
//! A sleep costs a scheduler wake-up when the next completion or client
//! message arrives, and at queue depth 1 that wake-up is a large part of
//! each request's latency. Watching the queue for a while avoids it, at
//! the cost of CPU. The window adapts the way QEMU's `aio_poll` does: it
//! doubles while the loop keeps sleeping for less than the maximum
//! (polling a little longer would have caught the event) and halves after
//! a sleep longer than the maximum (QEMU's `poll-shrink=2`). Halving
//! rather than closing keeps the window open across a disk's occasional
//! slow request, which at queue depth 1 would otherwise cost the next six
//! requests their polling; an idle loop still closes it after a few
//! sleeps, so it does not spin.

use std::time::Duration;

/// First non-zero window (QEMU starts its growth at 4 µs too).
const INITIAL_NS: u64 = 4_000;

/// The current polling window of one loop and its upper bound.
#[derive(Debug, Clone, Copy)]
pub struct PollWindow {
    max_ns: u64,
    ns: u64,
}

impl PollWindow {
    /// A window that may grow up to `max_ns` (0: never poll). It starts
    /// closed and opens once the loop shows short sleeps.
    pub fn new(max_ns: u64) -> Self {
        PollWindow { max_ns, ns: 0 }
    }

    /// The upper bound (QEMU's `poll-max-ns`).
    pub fn max_ns(&self) -> u64 {
        self.max_ns
    }

    /// Changes the upper bound; the current window shrinks to fit it.
    pub fn set_max_ns(&mut self, max_ns: u64) {
        self.max_ns = max_ns;
        self.ns = self.ns.min(max_ns);
    }

    /// How long to poll before the next sleep.
    pub fn current(&self) -> Duration {
        Duration::from_nanos(self.ns)
    }

    /// Records a wait that polling did not cover: `waited` runs from the
    /// start of polling to the end of the sleep.
    pub fn after_sleep(&mut self, waited: Duration) {
        let waited = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        if waited <= self.ns {
            return;
        }
        if waited > self.max_ns {
            self.ns /= 2;
            if self.ns < INITIAL_NS {
                self.ns = 0;
            }
        } else if self.ns < self.max_ns {
            self.ns = if self.ns == 0 {
                INITIAL_NS
            } else {
                self.ns.saturating_mul(2)
            }
            .min(self.max_ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_sleeps_open_the_window_up_to_the_maximum() {
        let mut w = PollWindow::new(100_000);
        assert_eq!(w.current(), Duration::ZERO, "starts closed");
        let mut seen = Vec::new();
        for _ in 0..10 {
            w.after_sleep(Duration::from_micros(90));
            seen.push(w.current().as_nanos() as u64);
        }
        assert_eq!(
            &seen[..6],
            &[4_000, 8_000, 16_000, 32_000, 64_000, 100_000],
            "doubles, then stops at the maximum"
        );
        assert!(seen[6..].iter().all(|&n| n == 100_000));
    }

    #[test]
    fn long_sleeps_halve_the_window_until_it_closes() {
        let mut w = PollWindow::new(50_000);
        for _ in 0..8 {
            w.after_sleep(Duration::from_micros(20));
        }
        assert_eq!(w.current(), Duration::from_micros(32));
        w.after_sleep(Duration::from_millis(5));
        assert_eq!(w.current(), Duration::from_micros(16), "one slow request");
        for _ in 0..3 {
            w.after_sleep(Duration::from_millis(5));
        }
        assert_eq!(w.current(), Duration::ZERO, "an idle loop does not spin");
    }

    #[test]
    fn a_sleep_inside_the_window_changes_nothing() {
        let mut w = PollWindow::new(50_000);
        w.after_sleep(Duration::from_micros(20));
        w.after_sleep(Duration::from_micros(20));
        assert_eq!(w.current(), Duration::from_micros(8));
        w.after_sleep(Duration::from_micros(5));
        assert_eq!(w.current(), Duration::from_micros(8));
    }

    #[test]
    fn zero_maximum_never_polls_and_lowering_it_shrinks_the_window() {
        let mut w = PollWindow::new(0);
        for _ in 0..5 {
            w.after_sleep(Duration::from_nanos(1));
        }
        assert_eq!(w.current(), Duration::ZERO);
        let mut w = PollWindow::new(1_000_000);
        for _ in 0..10 {
            w.after_sleep(Duration::from_micros(500));
        }
        assert_eq!(w.current(), Duration::from_micros(512));
        w.set_max_ns(100_000);
        assert_eq!(w.current(), Duration::from_micros(100));
        assert_eq!(w.max_ns(), 100_000);
    }
}
