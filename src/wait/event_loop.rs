//! [`EventLoop`]: a device thread waits on many notifiers at once.
//!
//! The loop watches notifiers with epoll (level-triggered), and each wake-up reports which fired
//! and their counts (the value read: the kicks since the last read in counter mode, 1 in
//! semaphore mode — a semaphore notifier with more pending fires again at the next wait). A
//! [`StopHandle`] stops the loop from any thread: the wait in progress returns
//! [`Wake::Stopped`], and so does every later one. A stopped wait reads nothing: a notification
//! that arrived with the stop stays in its notifier, for whoever serves the queue next (a device
//! quiesced for a snapshot loses no kick).
//!
//! ```
//! use std::time::Duration;
//! use vm_notify::wait::{EventLoop, Wake};
//! use vm_notify::{Mode, Notifier};
//!
//! let queue0 = Notifier::new(Mode::Counter)?;
//! let queue1 = Notifier::new(Mode::Counter)?;
//! let events = EventLoop::new()?;
//! events.add(0, &queue0)?;
//! events.add(1, &queue1)?;
//! queue1.add(3)?;
//! let mut ready = Vec::new();
//! assert_eq!(events.wait(Some(Duration::from_secs(1)), &mut ready)?, Wake::Ready);
//! assert_eq!(ready, [(1, 3)]);
//! events.stop_handle().stop()?;
//! assert_eq!(events.wait(None, &mut ready)?, Wake::Stopped);
//! # Ok::<(), vm_notify::Error>(())
//! ```

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::error::{Error, Result};
use crate::fault::{hit, Syscall};
use crate::notifier::{Attempt, Mode, Notifier};

/// The epoll data of the stop notifier; no caller token may use it.
const STOP_TOKEN: u64 = u64::MAX;

/// Why [`EventLoop::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Wake {
    /// At least one notifier fired; the ready list holds them.
    Ready,
    /// The loop was stopped. Nothing was read: the notifiers keep their counts.
    Stopped,
    /// The timeout passed with nothing ready.
    TimedOut,
}

/// Stops an [`EventLoop`] from another thread. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StopHandle {
    stop: Arc<Notifier>,
}

impl StopHandle {
    /// Stops the loop: its current and every later wait return [`Wake::Stopped`].
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`] if the eventfd write fails.
    pub fn stop(&self) -> Result<()> {
        self.stop.notify()
    }
}

/// Waits on many notifiers with epoll. Methods take `&self`: one thread waits while others add
/// or remove notifiers.
pub struct EventLoop {
    epoll: Epoll,
    stop: Arc<Notifier>,
    watched: Mutex<HashMap<u64, Notifier>>,
}

impl fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventLoop")
            .field("watched", &self.lock().len())
            .finish()
    }
}

/// `epoll_ctl(2)`, through the fault-injection point.
fn ctl(epoll: &Epoll, op: ControlOperation, fd: RawFd, event: EpollEvent) -> io::Result<()> {
    hit(Syscall::EpollCtl)?;
    epoll.ctl(op, fd, event)
}

fn epoll_error(op: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::EventLoop { op, source }
}

impl EventLoop {
    /// An empty loop.
    ///
    /// # Errors
    ///
    /// [`Error::EventLoop`] if epoll cannot be created, [`Error::FdExhausted`].
    pub fn new() -> Result<Self> {
        let epoll = Epoll::new().map_err(epoll_error("create"))?;
        let stop = Arc::new(Notifier::new(Mode::Counter)?);
        ctl(
            &epoll,
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )
        .map_err(epoll_error("add"))?;
        Ok(EventLoop {
            epoll,
            stop,
            watched: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Notifier>> {
        self.watched.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes back a stop, so the loop can be waited on again (for the injector, which a VMM
    /// may stop and run again).
    #[cfg(feature = "kvm")]
    pub(crate) fn rearm(&self) -> Result<()> {
        self.stop.try_read().map(drop)
    }

    /// A handle that stops this loop.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            stop: self.stop.clone(),
        }
    }

    /// Watches `notifier` (the loop keeps a handle to it) under `token`. The same notifier may
    /// be watched under several tokens: epoll takes a descriptor once, so a second watch of one
    /// costs a descriptor of its own (a `dup`); the first costs none.
    ///
    /// # Errors
    ///
    /// [`Error::EventLoopToken`] for a token in use or `u64::MAX` (reserved);
    /// [`Error::EventLoop`] if epoll refuses; [`Error::FdExhausted`].
    pub fn add(&self, token: u64, notifier: &Notifier) -> Result<()> {
        let mut w = self.lock();
        if token == STOP_TOKEN || w.contains_key(&token) {
            return Err(Error::EventLoopToken { token });
        }
        let event = EpollEvent::new(EventSet::IN, token);
        let mut n = notifier.clone();
        if let Err(e) = ctl(&self.epoll, ControlOperation::Add, n.as_raw_fd(), event) {
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(epoll_error("add")(e));
            }
            // Already watched under another token: watch a descriptor of its own.
            n = notifier.dup()?;
            ctl(&self.epoll, ControlOperation::Add, n.as_raw_fd(), event)
                .map_err(epoll_error("add"))?;
        }
        w.insert(token, n);
        Ok(())
    }

    /// Stops watching `token`.
    ///
    /// # Errors
    ///
    /// [`Error::EventLoopToken`] if nothing is watched under it.
    pub fn remove(&self, token: u64) -> Result<()> {
        let n = self
            .lock()
            .remove(&token)
            .ok_or(Error::EventLoopToken { token })?;
        ctl(
            &self.epoll,
            ControlOperation::Delete,
            n.as_raw_fd(),
            EpollEvent::default(),
        )
        .map_err(epoll_error("delete"))
    }

    /// The number of watched notifiers.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is watched.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until a notifier fires, the loop is stopped, or `timeout` passes (`None`: no
    /// timeout). `ready` is cleared and filled with `(token, count)` for each notifier read. A
    /// stop wins over notifiers that fired in the same wake-up: the result is
    /// [`Wake::Stopped`], `ready` stays empty and their counts stay in them, so a caller that
    /// leaves its loop on `Stopped` drops no notification.
    ///
    /// # Errors
    ///
    /// [`Error::EventLoop`] if `epoll_wait` fails, [`Error::Notifier`] if a read fails.
    pub fn wait(&self, timeout: Option<Duration>, ready: &mut Vec<(u64, u64)>) -> Result<Wake> {
        ready.clear();
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut tokens = Vec::new();
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let wake = self.wait_tokens(left, &mut tokens)?;
            if wake != Wake::Ready {
                return Ok(wake);
            }
            let w = self.lock();
            for &token in &tokens {
                if let Some(notifier) = w.get(&token) {
                    if let Attempt::Done(count) = notifier.try_read()? {
                        ready.push((token, count));
                    }
                }
            }
            // Every notifier that fired was read by another reader first: wait again (until the
            // deadline, if there is one), so `TimedOut` only ever means the timeout passed.
            if !ready.is_empty() {
                return Ok(Wake::Ready);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(Wake::TimedOut);
            }
        }
    }

    /// Like [`wait`](Self::wait), but only reports which tokens are readable, without reading
    /// them: for a caller that reads under its own lock.
    pub(crate) fn wait_tokens(
        &self,
        timeout: Option<Duration>,
        tokens: &mut Vec<u64>,
    ) -> Result<Wake> {
        tokens.clear();
        // Rounded up: a remaining time under a millisecond still waits, so a timeout never ends
        // before its deadline.
        let ms = timeout.map_or(-1, |t| {
            let ms = t.as_nanos().div_ceil(1_000_000);
            ms.min(i32::MAX as u128) as i32
        });
        let mut events = [EpollEvent::default(); 64];
        let n = loop {
            match hit(Syscall::EpollWait).and_then(|()| self.epoll.wait(ms, &mut events)) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Error::EventLoop {
                        op: "wait",
                        source: e,
                    })
                }
            }
        };
        let mut stopped = false;
        for e in &events[..n] {
            match e.data() {
                STOP_TOKEN => stopped = true,
                token => tokens.push(token),
            }
        }
        Ok(if stopped {
            Wake::Stopped
        } else if tokens.is_empty() {
            Wake::TimedOut
        } else {
            Wake::Ready
        })
    }

    /// Calls `on_ready(token, count)` for every notifier that fires, until the loop is stopped
    /// (what fired with the stop is left in the notifiers, unread).
    ///
    /// # Errors
    ///
    /// Those of [`wait`](Self::wait), and the first error `on_ready` returns.
    pub fn run(&self, mut on_ready: impl FnMut(u64, u64) -> Result<()>) -> Result<()> {
        let mut ready = Vec::new();
        loop {
            let wake = self.wait(None, &mut ready)?;
            for &(token, count) in &ready {
                on_ready(token, count)?;
            }
            if wake == Wake::Stopped {
                return Ok(());
            }
        }
    }
}

/// The loop's epoll descriptor: readable while any watched notifier is (or the loop is
/// stopped), so a VMM can nest the loop in an epoll of its own (an event-manager loop) and call
/// [`wait`](EventLoop::wait) with a zero timeout when it fires.
impl AsRawFd for EventLoop {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.epoll.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;
    use std::time::Instant;

    /// One notifier under two tokens: both watches are taken (the second on a descriptor of its
    /// own), and a write is read once, under one of them.
    #[test]
    fn one_notifier_under_two_tokens() {
        let l = EventLoop::new().unwrap();
        let n = Notifier::new(Mode::Counter).unwrap();
        l.add(1, &n).unwrap();
        l.add(2, &n).unwrap();
        n.add(3).unwrap();
        let mut ready = Vec::new();
        assert_eq!(l.wait(None, &mut ready).unwrap(), Wake::Ready);
        assert!(ready == [(1, 3)] || ready == [(2, 3)], "{ready:?}");
        l.remove(1).unwrap();
        l.remove(2).unwrap();
        assert!(l.is_empty());
    }

    /// A stop that comes with notifications reads none of them: they stay for the next reader.
    #[test]
    fn a_stopped_wait_reads_nothing() {
        let l = EventLoop::new().unwrap();
        let kick = Notifier::new(Mode::Counter).unwrap();
        l.add(7, &kick).unwrap();
        kick.add(2).unwrap();
        l.stop_handle().stop().unwrap();
        let mut ready = vec![(1, 1)];
        assert_eq!(l.wait(None, &mut ready).unwrap(), Wake::Stopped);
        assert!(ready.is_empty());
        assert_eq!(kick.peek().unwrap(), 2, "the kicks are still there");
        let mut calls = 0;
        l.run(|_, _| {
            calls += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!((calls, kick.read().unwrap()), (0, 2));
    }

    #[test]
    fn reports_which_fired_and_counts() {
        let l = EventLoop::new().unwrap();
        let ns: Vec<Notifier> = (0..4)
            .map(|_| Notifier::new(Mode::Counter).unwrap())
            .collect();
        for (i, n) in ns.iter().enumerate() {
            l.add(i as u64 * 10, n).unwrap();
        }
        ns[1].add(5).unwrap();
        ns[3].notify().unwrap();
        let mut ready = Vec::new();
        assert_eq!(
            l.wait(Some(Duration::from_secs(1)), &mut ready).unwrap(),
            Wake::Ready
        );
        ready.sort();
        assert_eq!(ready, [(10, 5), (30, 1)]);
        assert_eq!(
            l.wait(Some(Duration::from_millis(10)), &mut ready).unwrap(),
            Wake::TimedOut
        );
    }

    #[test]
    fn semaphore_notifiers_fire_once_per_count() {
        let l = EventLoop::new().unwrap();
        let n = Notifier::new(Mode::Semaphore).unwrap();
        l.add(7, &n).unwrap();
        n.add(3).unwrap();
        let mut ready = Vec::new();
        for _ in 0..3 {
            assert_eq!(
                l.wait(Some(Duration::from_secs(1)), &mut ready).unwrap(),
                Wake::Ready
            );
            assert_eq!(ready, [(7, 1)]);
        }
        assert_eq!(
            l.wait(Some(Duration::from_millis(10)), &mut ready).unwrap(),
            Wake::TimedOut
        );
    }

    /// A notifier another reader empties between the wake-up and the read: a wait without a
    /// timeout waits on (here until it is stopped), and never says it timed out.
    #[test]
    fn a_wait_without_timeout_never_times_out_when_another_reader_wins() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let n = Notifier::new(Mode::Counter).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let thief = {
            let (n, done) = (n.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    let _ = n.try_read();
                }
            })
        };
        let mut ready = Vec::new();
        for _ in 0..100 {
            let l = EventLoop::new().unwrap();
            l.add(1, &n).unwrap();
            let stop = l.stop_handle();
            let stopper = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(2));
                stop.stop().unwrap();
            });
            n.notify().unwrap();
            let wake = l.wait(None, &mut ready).unwrap();
            assert_ne!(wake, Wake::TimedOut, "no timeout was given");
            assert_eq!(wake == Wake::Ready, !ready.is_empty());
            stopper.join().unwrap();
        }
        done.store(true, Ordering::Relaxed);
        thief.join().unwrap();
    }

    #[test]
    fn tokens_are_checked() {
        let l = EventLoop::new().unwrap();
        let n = Notifier::new(Mode::Counter).unwrap();
        l.add(1, &n).unwrap();
        assert!(matches!(
            l.add(1, &n),
            Err(Error::EventLoopToken { token: 1 })
        ));
        assert!(matches!(
            l.add(u64::MAX, &n),
            Err(Error::EventLoopToken { .. })
        ));
        l.remove(1).unwrap();
        assert!(matches!(
            l.remove(1),
            Err(Error::EventLoopToken { token: 1 })
        ));
        assert!(l.is_empty());
    }

    #[test]
    fn stop_from_another_thread_returns_promptly() {
        let l = Arc::new(EventLoop::new().unwrap());
        let stop = l.stop_handle();
        let waiter = {
            let l = l.clone();
            thread::spawn(move || {
                let start = Instant::now();
                let r = l.run(|_, _| Ok(()));
                (r.is_ok(), start.elapsed())
            })
        };
        thread::sleep(Duration::from_millis(20));
        stop.stop().unwrap();
        let (ok, _) = waiter.join().unwrap();
        assert!(ok);
        let mut ready = Vec::new();
        assert_eq!(
            l.wait(None, &mut ready).unwrap(),
            Wake::Stopped,
            "stop is sticky"
        );
    }
}
