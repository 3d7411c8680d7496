//! [`AdaptivePoll`]: an opt-in wait that spins on a notifier for a bounded, self-tuning time before
//! blocking, so a busy device answers a kick without a thread wake-up.
//!
//! A blocking read costs a sleep and a wake-up (futex, scheduler, often another CPU); when kicks
//! arrive back to back that is most of a round trip. Polling for a while first catches a kick that
//! is about to come. The window tunes itself after every blocking wait, an idea QEMU uses for its
//! virtqueue ioeventfds:
//!
//! * the kick came while polling: the window stays;
//! * the window ran out but the kick came within `max` of the start of the wait: a longer window
//!   would have caught it, so the window doubles (from 4 µs), up to `max`;
//! * the wait was longer than `max` (an idle device): polling could not have caught it, so the
//!   window halves, and below 4 µs it becomes zero.
//!
//! An idle device therefore spins for one window and then blocks, and its window decays to zero
//! within a few waits; a busy one keeps a window that covers the time between its kicks. The
//! price is CPU: while polling, the thread burns its core. `docs/PERFORMANCE.md` reports both.

use std::fmt;
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::notifier::{Attempt, Notifier};

/// Counts of how [`AdaptivePoll::wait`] ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PollStats {
    /// Waits that found the notifier written while polling.
    pub polled: u64,
    /// Waits that blocked after the window ran out.
    pub blocked: u64,
    /// Blocking waits after which the window grew.
    pub grown: u64,
    /// Blocking waits after which the window shrank.
    pub shrunk: u64,
}

/// Reads a [`Notifier`] after polling it for up to a self-tuning window (see the module docs).
///
/// ```
/// use std::time::Duration;
/// use vm_notify::wait::AdaptivePoll;
/// use vm_notify::{Mode, Notifier};
///
/// let kicks = Notifier::new(Mode::Counter)?;
/// let mut poll = AdaptivePoll::new(Duration::from_micros(100));
/// kicks.add(3)?;
/// assert_eq!(poll.wait(&kicks)?, 3);
/// assert_eq!(poll.stats().polled, 1);
/// # Ok::<(), vm_notify::Error>(())
/// ```
#[derive(Clone)]
pub struct AdaptivePoll {
    window: Duration,
    max: Duration,
    stats: PollStats,
}

impl fmt::Debug for AdaptivePoll {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptivePoll")
            .field("window", &self.window)
            .field("max", &self.max)
            .field("stats", &self.stats)
            .finish()
    }
}

impl AdaptivePoll {
    /// The first non-zero window, and the size below which a shrinking window becomes zero.
    pub(crate) const GROW_FROM: Duration = Duration::from_micros(4);

    /// A waiter whose window starts at zero and never exceeds `max` (a zero `max` never polls:
    /// every wait blocks at once, like [`Notifier::read`]).
    pub fn new(max: Duration) -> AdaptivePoll {
        AdaptivePoll {
            window: Duration::ZERO,
            max,
            stats: PollStats::default(),
        }
    }

    /// The current polling window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The largest window.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// How the waits so far ended.
    pub fn stats(&self) -> PollStats {
        self.stats
    }

    /// Reads `notifier` like [`Notifier::read`] (the count, or 1 in semaphore mode), polling it for
    /// up to the window before blocking, then tunes the window.
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`](crate::Error::Notifier) if a read or the wait fails.
    pub fn wait(&mut self, notifier: &Notifier) -> Result<u64> {
        let start = Instant::now();
        if let Attempt::Done(v) = notifier.try_read()? {
            self.stats.polled += 1;
            return Ok(v);
        }
        if !self.window.is_zero() {
            loop {
                std::hint::spin_loop();
                if let Attempt::Done(v) = notifier.try_read()? {
                    self.stats.polled += 1;
                    return Ok(v);
                }
                if start.elapsed() >= self.window {
                    break;
                }
            }
        }
        let v = notifier.read()?;
        self.stats.blocked += 1;
        self.tune(start.elapsed());
        Ok(v)
    }

    /// Adjusts the window after a wait that blocked and took `waited` in all.
    pub(crate) fn tune(&mut self, waited: Duration) {
        if waited > self.max {
            self.window /= 2;
            if self.window < Self::GROW_FROM {
                self.window = Duration::ZERO;
            }
            self.stats.shrunk += 1;
        } else if self.window < self.max {
            self.window = (self.window * 2).max(Self::GROW_FROM).min(self.max);
            self.stats.grown += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notifier::Mode;
    use std::thread;

    #[test]
    fn window_grows_when_kicks_come_soon_and_decays_when_idle() {
        let n = Notifier::new(Mode::Counter).unwrap();
        let mut poll = AdaptivePoll::new(Duration::from_millis(50));
        // Kicks 1 ms after each wait starts: each blocking wait is under `max`, so it grows.
        for _ in 0..6 {
            let writer = {
                let n = n.dup().unwrap();
                thread::spawn(move || {
                    thread::sleep(Duration::from_millis(1));
                    n.notify().unwrap();
                })
            };
            assert_eq!(poll.wait(&n).unwrap(), 1);
            writer.join().unwrap();
        }
        assert!(poll.window() > AdaptivePoll::GROW_FROM, "{poll:?}");
        assert!(poll.stats().grown >= 1, "{poll:?}");
        // Idle: every wait outlasts `max`, so the window halves each time, down to zero.
        for _ in 0..20 {
            let writer = {
                let n = n.dup().unwrap();
                thread::spawn(move || {
                    thread::sleep(Duration::from_millis(60));
                    n.notify().unwrap();
                })
            };
            assert_eq!(poll.wait(&n).unwrap(), 1);
            writer.join().unwrap();
            if poll.window().is_zero() {
                break;
            }
        }
        assert_eq!(poll.window(), Duration::ZERO, "{poll:?}");
        assert!(poll.stats().shrunk >= 1);
    }

    #[test]
    fn a_written_notifier_is_read_without_blocking_and_keeps_semaphore_mode() {
        let n = Notifier::new(Mode::Semaphore).unwrap();
        n.add(2).unwrap();
        let mut poll = AdaptivePoll::new(Duration::ZERO);
        assert_eq!(poll.wait(&n).unwrap(), 1);
        assert_eq!(poll.wait(&n).unwrap(), 1);
        assert_eq!(
            poll.stats(),
            PollStats {
                polled: 2,
                ..PollStats::default()
            }
        );
        assert!(n.try_read().unwrap().done().is_none());
    }
}
