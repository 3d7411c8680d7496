//! Fault injection at the system-call layer, for tests that prove no error path loses an event or
//! leaks a descriptor, a kernel registration or a route.
//!
//! Every system call the crate makes on a notification's way passes one point here first: the
//! KVM ioctls in `sys`, and the eventfd and epoll calls of [`Notifier`](crate::Notifier) and
//! [`EventLoop`](crate::wait::EventLoop). With the cargo feature `fault-injection` a test can
//! make one of those calls fail with an errno of its choosing instead of reaching the kernel,
//! and can trace which calls an operation makes. Without the feature the points compile to
//! nothing.
//!
//! A [`Gate`] holds the first thread to make a chosen call at the point, before the call, until
//! the test opens it: what other threads can do meanwhile shows what waits for that call (a lock
//! held across it) without timing anything.
//!
//! One fault is armed and one gate closed at a time, for the whole process: a test binary that
//! injects faults runs its cases one after another.
//!
//! ```
//! # #[cfg(feature = "fault-injection")] {
//! use vm_notify::fault::{self, Fault, Syscall};
//! use vm_notify::{Error, Mode, Notifier};
//!
//! // Which calls does making a notifier and writing to it take?
//! let (made, calls) = fault::trace(|| {
//!     let n = Notifier::new(Mode::Counter)?;
//!     n.notify()?;
//!     Ok::<_, Error>(n)
//! });
//! assert_eq!(calls, [Syscall::EventFdCreate, Syscall::EventFdWrite]);
//! let n = made.unwrap();
//!
//! // The next eventfd write on this thread fails with ENOSPC.
//! let fault = Fault::on_this_thread(0, libc::ENOSPC);
//! assert!(matches!(n.notify(), Err(Error::Notifier { .. })));
//! assert!(fault.fired());
//! # }
//! ```

use std::io;

/// A system call the crate makes, as fault injection names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
// The contract alone (no feature `kvm`) makes no KVM ioctl.
#[cfg_attr(not(feature = "kvm"), allow(dead_code))]
pub enum Syscall {
    /// `KVM_IOEVENTFD`, assign or deassign.
    IoEventFd,
    /// `KVM_IRQFD`, assign or deassign.
    IrqFd,
    /// `KVM_SET_GSI_ROUTING`.
    SetGsiRouting,
    /// `KVM_IRQ_LINE`.
    IrqLine,
    /// `KVM_SIGNAL_MSI`.
    SignalMsi,
    /// `eventfd(2)`.
    EventFdCreate,
    /// A `write(2)` to an eventfd.
    EventFdWrite,
    /// A `read(2)` of an eventfd.
    EventFdRead,
    /// `dup(2)` of an eventfd.
    Dup,
    /// `epoll_ctl(2)`.
    EpollCtl,
    /// `epoll_wait(2)`.
    EpollWait,
}

/// The point every system call passes: `Err` with the armed errno when the armed fault matches
/// this call; records the call when the current thread is tracing.
#[cfg(feature = "fault-injection")]
pub(crate) fn hit(call: Syscall) -> io::Result<()> {
    control::hit(call)
}

/// The point every system call passes (nothing without the feature `fault-injection`).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub(crate) fn hit(_call: Syscall) -> io::Result<()> {
    Ok(())
}

#[cfg(feature = "fault-injection")]
pub use control::{trace, Fault, Gate};

#[cfg(feature = "fault-injection")]
mod control {
    use std::io;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Condvar, Mutex, MutexGuard};
    use std::thread::{self, ThreadId};
    use std::time::{Duration, Instant};

    use crate::fault::Syscall;

    struct Armed {
        /// Only calls made on this thread count, or calls of `call` on any thread.
        thread: Option<ThreadId>,
        call: Option<Syscall>,
        /// Matching calls to let through before the one that fails.
        skip: usize,
        errno: i32,
        /// Matching calls still to fail once the skipped ones have passed.
        failures: usize,
        fired: bool,
    }

    #[derive(Default)]
    struct State {
        armed: Option<Armed>,
        tracing: Vec<(ThreadId, Vec<Syscall>)>,
        gate: Option<Gated>,
    }

    /// A closed gate: the first call of `call` waits in it until it opens (the gate is
    /// dropped).
    struct Gated {
        call: Syscall,
        reached: bool,
    }

    /// Woken when a gate is reached or opened.
    static GATE: Condvar = Condvar::new();

    static STATE: Mutex<State> = Mutex::new(State {
        armed: None,
        tracing: Vec::new(),
        gate: None,
    });

    /// Whether a fault is armed or a thread traces: without either, a call passes without
    /// taking the lock (the test suite runs with the feature on).
    static ACTIVE: AtomicBool = AtomicBool::new(false);

    fn refresh(s: &State) {
        let active = s.armed.is_some() || !s.tracing.is_empty() || s.gate.is_some();
        ACTIVE.store(active, Ordering::SeqCst);
    }

    fn state() -> MutexGuard<'static, State> {
        // A test that panicked with a fault armed leaves the state whole.
        STATE.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn hit(call: Syscall) -> io::Result<()> {
        if !ACTIVE.load(Ordering::SeqCst) {
            return Ok(());
        }
        let me = thread::current().id();
        let mut s = state();
        if let Some((_, calls)) = s.tracing.iter_mut().find(|(t, _)| *t == me) {
            calls.push(call);
        }
        if let Some(gate) = s.gate.as_mut().filter(|g| g.call == call && !g.reached) {
            gate.reached = true;
            GATE.notify_all();
            while s.gate.is_some() {
                s = GATE.wait(s).unwrap_or_else(|e| e.into_inner());
            }
        }
        let Some(armed) = s.armed.as_mut() else {
            return Ok(());
        };
        let matches = armed.failures > 0
            && armed.thread.map_or(true, |t| t == me)
            && armed.call.map_or(true, |c| c == call);
        if !matches {
            return Ok(());
        }
        if armed.skip > 0 {
            armed.skip -= 1;
            return Ok(());
        }
        armed.fired = true;
        armed.failures -= 1;
        Err(io::Error::from_raw_os_error(armed.errno))
    }

    /// Runs `f` and returns what it returned with the system calls it made on this thread, in
    /// order (calls other threads made meanwhile are not in it).
    pub fn trace<T>(f: impl FnOnce() -> T) -> (T, Vec<Syscall>) {
        let me = thread::current().id();
        {
            let mut s = state();
            s.tracing.push((me, Vec::new()));
            refresh(&s);
        }
        let out = f();
        let mut s = state();
        let at = s.tracing.iter().rposition(|(t, _)| *t == me);
        let calls = at.map(|i| s.tracing.remove(i).1).unwrap_or_default();
        refresh(&s);
        (out, calls)
    }

    /// An armed fault: one system call fails with an errno instead of reaching the kernel.
    /// Dropping it disarms it. Only one is armed at a time: arming a second while the first
    /// lives panics.
    #[derive(Debug)]
    #[must_use = "dropping a Fault disarms it at once"]
    pub struct Fault {
        _private: (),
    }

    impl Fault {
        /// The call after the first `skip` this thread makes (of any kind) fails with `errno`.
        pub fn on_this_thread(skip: usize, errno: i32) -> Fault {
            Fault::arm(Armed {
                thread: Some(thread::current().id()),
                call: None,
                skip,
                errno,
                failures: 1,
                fired: false,
            })
        }

        /// The call of kind `call` after the first `skip` of that kind, on whichever thread
        /// makes it (the injector's, say), fails with `errno`.
        pub fn on_any_thread(call: Syscall, skip: usize, errno: i32) -> Fault {
            Fault::arm(Armed {
                thread: None,
                call: Some(call),
                skip,
                errno,
                failures: 1,
                fired: false,
            })
        }

        /// Fails `count` matching calls in a row instead of one (a failure that persists).
        pub fn times(self, count: usize) -> Fault {
            if let Some(armed) = state().armed.as_mut() {
                armed.failures = count;
            }
            self
        }

        fn arm(armed: Armed) -> Fault {
            let mut s = state();
            assert!(s.armed.is_none(), "a fault is already armed");
            s.armed = Some(armed);
            refresh(&s);
            Fault { _private: () }
        }

        /// Whether the fault has fired.
        pub fn fired(&self) -> bool {
            state().armed.as_ref().is_some_and(|a| a.fired)
        }
    }

    /// A closed gate on one kind of system call: the first thread to make that call waits at the
    /// point, before the call, until the gate opens (or is dropped). For tests that prove what
    /// does not wait while a call is in flight, without timing anything.
    #[derive(Debug)]
    #[must_use = "dropping a Gate opens it at once"]
    pub struct Gate {
        _private: (),
    }

    impl Gate {
        /// Closes a gate on `call`. Only one gate is closed at a time: closing a second while
        /// the first lives panics.
        pub fn close(call: Syscall) -> Gate {
            let mut s = state();
            assert!(s.gate.is_none(), "a gate is already closed");
            s.gate = Some(Gated {
                call,
                reached: false,
            });
            refresh(&s);
            Gate { _private: () }
        }

        /// Waits until a thread waits at the gate; `false` if none did within `timeout`.
        pub fn reached(&self, timeout: Duration) -> bool {
            let deadline = Instant::now() + timeout;
            let mut s = state();
            loop {
                if s.gate.as_ref().is_some_and(|g| g.reached) {
                    return true;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                s = GATE
                    .wait_timeout(s, left)
                    .map(|(s, _)| s)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
        }
    }

    impl Drop for Gate {
        fn drop(&mut self) {
            let mut s = state();
            s.gate = None;
            refresh(&s);
            GATE.notify_all();
        }
    }

    impl Drop for Fault {
        fn drop(&mut self) {
            let mut s = state();
            s.armed = None;
            refresh(&s);
        }
    }
}
