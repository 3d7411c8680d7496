//! Waiting on notifiers: what a device thread (and the injector) blocks or polls on.
//!
//! * [`EventLoop`]: one epoll over many notifiers, each under a token, with a [`StopHandle`] that
//!   wakes and ends the wait from another thread.
//! * [`AdaptivePoll`] (opt-in): polls a busy notifier for a self-tuning time before blocking.
//! * `NotifierSubscriber` (cargo feature `event-manager`): the same notifiers in a rust-vmm
//!   `event-manager` loop.
//!
//! This layer sits right above the notifier itself, below the registrations: the fallback's
//! injector is a waiter too.

mod event_loop;
mod poll;
#[cfg(feature = "event-manager")]
mod subscriber;

pub use event_loop::{EventLoop, StopHandle, Wake};
#[cfg(feature = "virtio-queue")]
pub(crate) use poll::SpinClock;
pub use poll::{AdaptivePoll, PollStats};
#[cfg(feature = "event-manager")]
#[cfg_attr(docsrs, doc(cfg(feature = "event-manager")))]
pub use subscriber::NotifierSubscriber;
