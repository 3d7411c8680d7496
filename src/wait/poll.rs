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
//!
//! Polling pays only where that core is free. A spinning thread that is preempted — by another
//! thread on its CPU, or, in a VM, by the host descheduling its virtual CPU — sees its clock jump
//! between two iterations of a loop that takes microseconds; such a spin stops at once, and
//! polling backs off: no spinning for 1 ms, doubling with each preempted spin up to a second,
//! halving only after 32 spins in a row that kept their CPU. On a contended host polling then
//! runs rarely, and the thread leaves the CPU to whoever needs it (the vCPU, the host's I/O).

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
    /// Spins cut short because the thread lost its CPU meanwhile (each starts or lengthens a
    /// back-off).
    pub preempted: u64,
    /// Waits that did not spin because polling was backed off.
    pub backed_off: u64,
}

/// A gap this long between two iterations of a spin (each a memory or non-blocking read; an
/// interrupt handler takes microseconds) means the thread lost its CPU meanwhile.
pub(crate) const PREEMPTED: Duration = Duration::from_micros(250);

/// The first back-off after a preempted spin; each further one doubles it, up to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(1), Duration::from_secs(1));

/// Spins in a row that kept their CPU, after which the back-off halves.
const RECOVER_AFTER: u32 = 32;

/// One spin's clock: how long it has run, and whether its thread lost the CPU between two of
/// its iterations.
#[derive(Debug)]
pub(crate) struct SpinClock {
    started: Instant,
    last: Instant,
}

impl SpinClock {
    /// A spin that started at `started`.
    pub(crate) fn since(started: Instant) -> SpinClock {
        SpinClock {
            started,
            last: started,
        }
    }

    /// Called once an iteration: whether the time since the last call (or [`skip`](Self::skip))
    /// is a gap only a preemption explains.
    pub(crate) fn lost_cpu(&mut self) -> bool {
        let now = Instant::now();
        let gap = now - self.last;
        self.last = now;
        gap >= PREEMPTED
    }

    #[cfg(feature = "virtio-queue")]
    /// Restarts the gap after work that is not the spin's own (a device's hook), whose time
    /// says nothing about the CPU.
    pub(crate) fn skip(&mut self) {
        self.last = Instant::now();
    }

    /// How long the spin has run, as of the last iteration.
    pub(crate) fn elapsed(&self) -> Duration {
        self.last - self.started
    }
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
    /// The current back-off: zero while spins keep their CPU.
    backoff: Duration,
    /// No spinning before this.
    backed_off_until: Option<Instant>,
    /// Spins in a row that kept their CPU.
    clean: u32,
}

impl fmt::Debug for AdaptivePoll {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptivePoll")
            .field("window", &self.window)
            .field("max", &self.max)
            .field("stats", &self.stats)
            .field("backoff", &self.backoff)
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
            backoff: Duration::ZERO,
            backed_off_until: None,
            clean: 0,
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

    #[cfg(test)]
    /// The current back-off (see the module docs): zero while spins keep their CPU.
    pub(crate) fn backoff(&self) -> Duration {
        self.backoff
    }

    /// How long to spin now: the window, or `None` while polling is backed off (counted).
    pub(crate) fn spin_window(&mut self) -> Option<Duration> {
        match self.backed_off_until {
            Some(until) if !self.window.is_zero() && Instant::now() < until => {
                self.stats.backed_off += 1;
                None
            }
            _ => {
                self.backed_off_until = None;
                Some(self.window)
            }
        }
    }

    /// Records how a spin ended: preempted (back off, or back off longer) or not.
    pub(crate) fn spun(&mut self, preempted: bool) {
        if preempted {
            self.stats.preempted += 1;
            self.clean = 0;
            self.backoff = (self.backoff * 2).clamp(BACKOFF.0, BACKOFF.1);
            self.backed_off_until = Some(Instant::now() + self.backoff);
        } else if !self.backoff.is_zero() {
            self.clean += 1;
            if self.clean >= RECOVER_AFTER {
                self.clean = 0;
                self.backoff /= 2;
                if self.backoff < BACKOFF.0 {
                    self.backoff = Duration::ZERO;
                }
            }
        }
    }

    /// Reads `notifier` like [`Notifier::read`] (the count, or 1 in semaphore mode), polling it for
    /// up to the window before blocking (unless polling is backed off), then tunes the window.
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
        let window = self.spin_window().unwrap_or_default();
        let mut preempted = false;
        if !window.is_zero() {
            let mut clock = SpinClock::since(start);
            loop {
                std::hint::spin_loop();
                let read = notifier.try_read()?;
                preempted = clock.lost_cpu();
                if let Attempt::Done(v) = read {
                    self.spun(preempted);
                    self.stats.polled += 1;
                    return Ok(v);
                }
                if preempted || clock.elapsed() >= window {
                    break;
                }
            }
            self.spun(preempted);
        }
        let v = notifier.read()?;
        self.stats.blocked += 1;
        // A spin cut short by a preemption says nothing about the window's length.
        if !preempted {
            self.tune(start.elapsed());
        }
        Ok(v)
    }

    /// Sets the window, for tests that need a long one without growing it.
    #[cfg(all(test, feature = "virtio-queue"))]
    pub(crate) fn set_window(&mut self, window: Duration) {
        self.window = window.min(self.max);
    }

    /// Halves the window (below `GROW_FROM`, to zero).
    pub(crate) fn shrink(&mut self) {
        self.window /= 2;
        if self.window < Self::GROW_FROM {
            self.window = Duration::ZERO;
        }
        self.stats.shrunk += 1;
    }

    /// Adjusts the window after a wait that blocked and took `waited` in all.
    pub(crate) fn tune(&mut self, waited: Duration) {
        if waited > self.max {
            self.shrink();
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

    /// Notifies `n` from another thread `after` this long.
    fn notify_later(n: &Notifier, after: Duration) -> thread::JoinHandle<()> {
        let n = n.dup().unwrap();
        thread::spawn(move || {
            thread::sleep(after);
            n.notify().unwrap();
        })
    }

    #[test]
    fn window_grows_when_kicks_come_soon_and_decays_when_idle() {
        let n = Notifier::new(Mode::Counter).unwrap();
        let mut poll = AdaptivePoll::new(Duration::from_millis(50));
        // Kicks 1 ms after each wait starts: each blocking wait is under `max`, so it grows.
        for _ in 0..6 {
            let writer = notify_later(&n, Duration::from_millis(1));
            assert_eq!(poll.wait(&n).unwrap(), 1);
            writer.join().unwrap();
        }
        assert!(poll.window() > AdaptivePoll::GROW_FROM, "{poll:?}");
        assert!(poll.stats().grown >= 1, "{poll:?}");
        // Idle: every wait outlasts `max`, so the window halves each time, down to zero.
        for _ in 0..20 {
            let writer = notify_later(&n, Duration::from_millis(60));
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
    fn preempted_spins_back_polling_off_until_spins_keep_their_cpu() {
        // To a spin, time away from its CPU is a gap between two iterations; a sleep makes one.
        let mut clock = SpinClock::since(Instant::now());
        assert!(!clock.lost_cpu());
        thread::sleep(PREEMPTED * 2);
        assert!(clock.lost_cpu());
        assert!(!clock.lost_cpu());

        let window = Duration::from_micros(500);
        let mut poll = AdaptivePoll::new(window);
        poll.window = window;
        assert_eq!(poll.spin_window(), Some(window));
        poll.spun(true);
        assert_eq!(poll.backoff(), BACKOFF.0);
        poll.spun(true);
        assert_eq!(poll.backoff(), BACKOFF.0 * 2);
        assert_eq!(poll.spin_window(), None);
        // Backed off, a written notifier is still read at once, and a wait blocks unspun.
        let n = Notifier::new(Mode::Counter).unwrap();
        n.add(1).unwrap();
        assert_eq!(poll.wait(&n).unwrap(), 1);
        let writer = notify_later(&n, Duration::from_millis(1));
        assert_eq!(poll.wait(&n).unwrap(), 1);
        writer.join().unwrap();
        assert_eq!(poll.stats().backed_off, 2, "{poll:?}");
        assert_eq!(poll.stats().blocked, 1, "{poll:?}");
        // Once the back-off has passed, spins run again; it halves after enough clean ones.
        thread::sleep(poll.backoff());
        assert_eq!(poll.spin_window(), Some(poll.window()));
        for _ in 0..RECOVER_AFTER - 1 {
            poll.spun(false);
        }
        assert_eq!(poll.backoff(), BACKOFF.0 * 2);
        poll.spun(false);
        assert_eq!(poll.backoff(), BACKOFF.0);
        for _ in 0..RECOVER_AFTER {
            poll.spun(false);
        }
        assert_eq!(poll.backoff(), Duration::ZERO);
        // Preemptions that go on lengthen it up to the cap.
        for _ in 0..40 {
            poll.spun(true);
        }
        assert_eq!(poll.backoff(), BACKOFF.1);
        assert_eq!(poll.stats().preempted, 42);
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
