//! [`NotifierSubscriber`]: notifiers in an rust-vmm `event-manager` loop (cargo feature
//! `event-manager`).
//!
//! For VMMs built on `event_manager::EventManager`: the subscriber watches notifiers under
//! tokens and calls back with `(token, count)` when one fires, as [`EventLoop`](crate::wait::EventLoop)
//! does on its own.
//!
//! ```
//! use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
//! use std::sync::{Arc, Mutex};
//! use vm_notify::wait::NotifierSubscriber;
//! use vm_notify::{Mode, Notifier};
//!
//! let queue = Notifier::new(Mode::Counter)?;
//! let seen = Arc::new(Mutex::new(Vec::new()));
//! let mut device = {
//!     let seen = seen.clone();
//!     NotifierSubscriber::new(move |token, count| seen.lock().unwrap().push((token, count)))
//! };
//! device.watch(3, &queue)?;
//! let mut manager = EventManager::<NotifierSubscriber<_>>::new().unwrap();
//! manager.add_subscriber(device);
//! queue.add(2)?;
//! manager.run_with_timeout(1000).unwrap();
//! assert_eq!(*seen.lock().unwrap(), [(3, 2)]);
//! # Ok::<(), vm_notify::Error>(())
//! ```

use std::fmt;
use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use crate::error::{Error, Result};
use crate::notifier::{Attempt, Notifier};

/// Watches notifiers for an `event-manager` loop and reports `(token, count)` to a callback.
pub struct NotifierSubscriber<F: FnMut(u32, u64)> {
    watched: Vec<(u32, Notifier)>,
    on_ready: F,
    failed_reads: u64,
}

impl<F: FnMut(u32, u64)> fmt::Debug for NotifierSubscriber<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NotifierSubscriber")
            .field("watched", &self.watched.len())
            .field("failed_reads", &self.failed_reads)
            .finish()
    }
}

impl<F: FnMut(u32, u64)> NotifierSubscriber<F> {
    /// A subscriber that calls `on_ready(token, count)` for each notifier that fires.
    pub fn new(on_ready: F) -> Self {
        NotifierSubscriber {
            watched: Vec::new(),
            on_ready,
            failed_reads: 0,
        }
    }

    /// Watches `notifier` (a handle to it is kept) under `token`. Call before the
    /// subscriber is added to the event manager, which registers everything watched then. A
    /// notifier watched a second time gets a descriptor of its own (epoll takes one once).
    ///
    /// # Errors
    ///
    /// [`Error::EventLoopToken`] for a token in use; [`Error::FdExhausted`].
    pub fn watch(&mut self, token: u32, notifier: &Notifier) -> Result<()> {
        if self.watched.iter().any(|(t, _)| *t == token) {
            return Err(Error::EventLoopToken {
                token: token.into(),
            });
        }
        let seen = self
            .watched
            .iter()
            .any(|(_, n)| n.as_raw_fd() == notifier.as_raw_fd());
        let n = if seen {
            notifier.dup()?
        } else {
            notifier.clone()
        };
        self.watched.push((token, n));
        Ok(())
    }

    /// Reads that failed (an eventfd error), which `process` cannot return.
    pub fn failed_reads(&self) -> u64 {
        self.failed_reads
    }
}

impl<F: FnMut(u32, u64)> MutEventSubscriber for NotifierSubscriber<F> {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let token = events.data();
        let Some((_, notifier)) = self.watched.iter().find(|(t, _)| *t == token) else {
            return;
        };
        match notifier.try_read() {
            Ok(Attempt::Done(count)) => (self.on_ready)(token, count),
            Ok(Attempt::WouldBlock) => {}
            Err(_) => self.failed_reads += 1,
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (token, notifier) in &self.watched {
            if ops
                .add(Events::with_data(notifier, *token, EventSet::IN))
                .is_err()
            {
                self.failed_reads += 1;
            }
        }
    }
}
