//! Serving a split virtqueue with notifications suppressed both ways (feature `virtio-queue`).
//!
//! [`QueueServer`] joins a queue's [`VirtQueueNotify`] to a rust-vmm `virtio-queue` queue (any
//! [`QueueT`]: `Queue`, `QueueSync`), and
//! adds what that crate leaves to the device:
//!
//! * **Interrupts only when the driver wants them** ([`QueueServer::used_added`]): with
//!   `VIRTIO_RING_F_EVENT_IDX`, when the used index has crossed the driver's `used_event`
//!   (virtio-queue's own `needs_notification`); without it, unless the driver set
//!   `VRING_AVAIL_F_NO_INTERRUPT` in the available ring's flags, which virtio-queue does not
//!   read.
//! * **No kicks while the device works, and no lost wake-up** ([`QueueServer::serve`]): kicks
//!   are turned off while chains are served (`avail_event` left behind with EVENT_IDX,
//!   `VRING_USED_F_NO_NOTIFY` without), and before the device goes back to waiting they are
//!   turned on again and the ring checked once more, behind a full fence: a buffer the driver
//!   made available after the last pop but before it could see kicks re-enabled — so it did not
//!   kick — is served now instead of stranded until some later kick (the classic lost
//!   wake-up). [`ServeStats::rechecks`] counts the times that caught one.
//!
//! * **Adaptive interrupt moderation**, opt-in per queue ([`QueueServer::moderate`]): while the
//!   device keeps finding more work in the ring, an interrupt the driver wants is held — until
//!   `K` are held, or the oldest has waited the budget, or the ring runs dry, whichever comes
//!   first — and the held ones go as one. `K` adapts, net-DIM style: it doubles each time it is
//!   reached (completions are streaming) and halves each time the budget runs out first (they
//!   are not), between 1 and [`Moderation::max_held`]. A completion that leaves the ring empty
//!   always interrupts at once, so a lone request after idle waits for nothing, and
//!   [`serve`](QueueServer::serve) never returns holding one: nothing held outlives the call
//!   that held it, an error included. What is held also goes before a chain that would end past
//!   the budget, its time guessed from the last chain's; there is no timer, so a chain slower
//!   than the one before can still overrun the budget by the difference.
//!
//! * **Devices that complete later** (asynchronous I/O: io_uring, a thread pool):
//!   [`QueueServer::take_at_most`] hands out every available chain with the same kick
//!   suppression and re-check as `serve`, and [`QueueServer::complete`] later puts a batch of
//!   finished ones on the used ring — in any order — and decides once, for the batch, whether
//!   the driver wants an interrupt.
//!
//! The server does not wait: the device's thread waits however it likes — a blocking read of
//! [`VirtQueueNotify::kicks`], [`AdaptivePoll::wait`](crate::wait::AdaptivePoll::wait), or an
//! [`EventLoop`](crate::wait::EventLoop) with many queues — and calls
//! [`serve`](QueueServer::serve) on each wake-up; [`QueueServer::run`] is that loop with a
//! blocking read.
//!
//! ```
//! use std::sync::Arc;
//! use virtio_queue::{Queue, QueueT};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//! use vm_notify::device::RecordingInterrupt;
//! use vm_notify::virtio::{QueueServer, VirtQueueNotify};
//! use vm_notify::{Mode, Notifier};
//!
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
//! let interrupt = Arc::new(RecordingInterrupt::edge()?);
//! let notify = VirtQueueNotify::new(0, Notifier::new(Mode::Counter)?, interrupt.clone());
//! let mut queue = Queue::new(16).unwrap();
//! queue.set_desc_table_address(Some(0x1000), Some(0));
//! queue.set_avail_ring_address(Some(0x2000), Some(0));
//! queue.set_used_ring_address(Some(0x3000), Some(0));
//! queue.set_ready(true);
//! let mut server = QueueServer::new(notify, queue);
//! // A wake-up with nothing available serves nothing and raises nothing.
//! assert_eq!(server.serve(&mem, |_chain| 0)?, 0);
//! assert_eq!(interrupt.triggers(), 0);
//! # Ok::<(), vm_notify::Error>(())
//! ```

use std::fmt;
use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use super::VirtQueueNotify;
use crate::error::{Error, Result};
use crate::wait::{AdaptivePoll, SpinClock};

/// `VRING_AVAIL_F_NO_INTERRUPT`: without EVENT_IDX, the driver asks for no used-buffer
/// interrupts.
const VRING_AVAIL_F_NO_INTERRUPT: u16 =
    virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT as u16;

/// Interrupt moderation for one queue (see the module docs): at most `max_held` used-buffer
/// interrupts held back, none for longer than `budget`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moderation {
    /// The most interrupts held back before they go as one (`K`'s ceiling; at least 1).
    pub max_held: u32,
    /// The longest an interrupt is held back.
    pub budget: std::time::Duration,
}

impl Default for Moderation {
    /// Up to 32 held, for at most 100 µs.
    fn default() -> Self {
        Moderation {
            max_held: 32,
            budget: std::time::Duration::from_micros(100),
        }
    }
}

/// Moderation's running state.
#[derive(Debug, Clone, Copy)]
struct Held {
    config: Moderation,
    /// The current `K`.
    target: u32,
    /// Interrupts held back now.
    count: u32,
    /// When the oldest of them was held.
    since: Option<std::time::Instant>,
    /// How long the last chain took to complete: the guess for the next.
    last_chain: std::time::Duration,
}

/// What a [`QueueServer`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ServeStats {
    /// [`serve`](QueueServer::serve) calls.
    pub wakeups: u64,
    /// Descriptor chains completed (added to the used ring).
    pub chains: u64,
    /// Used-buffer interrupts signalled: the driver wanted them.
    pub interrupts: u64,
    /// Used buffers added with no interrupt, because the driver did not want one then.
    pub suppressed: u64,
    /// Times the check after kicks were turned back on found buffers made available meanwhile
    /// (each a lost wake-up averted).
    pub rechecks: u64,
    /// With moderation: interrupts held back and sent later as part of one.
    pub held: u64,
    /// With moderation: held interrupts sent because `K` were held.
    pub flushed_full: u64,
    /// With moderation: held interrupts sent because the oldest reached the budget.
    pub flushed_late: u64,
    /// With moderation: held interrupts sent because the ring ran dry (or serving stopped).
    pub flushed_dry: u64,
    /// With ring polling: times buffers came while the server watched the ring with kicks off
    /// (each a kick the driver did not have to make).
    pub polled: u64,
    /// With ring polling: windows that ran out, after which kicks were turned back on.
    pub poll_ran_out: u64,
    /// With ring polling: windows the device cut short (`take_at_most`'s `idle`).
    pub poll_cut: u64,
    /// With ring polling: windows cut short because the device thread lost its CPU meanwhile
    /// (each starts or lengthens a back-off, see [`QueueServer::poll`]).
    pub poll_preempted: u64,
    /// With ring polling: wake-ups that did not watch the ring because polling was backed off.
    pub poll_backed_off: u64,
}

/// One split virtqueue served with event suppression both ways (see the module docs). Generic
/// over virtio-queue's [`QueueT`]: a [`Queue`] (the default) for a device that owns its queue, a
/// `QueueSync` for one that shares it between threads.
pub struct QueueServer<Q: QueueT = Queue> {
    notify: VirtQueueNotify,
    queue: Q,
    stats: ServeStats,
    held: Option<Held>,
    poll: Option<RingPoll>,
}

/// Ring polling's running state.
#[derive(Debug, Clone)]
struct RingPoll {
    /// The window and its tuning, as [`AdaptivePoll`] does it for a notifier.
    window: AdaptivePoll,
    /// When the last window that ran out began: the next wake-up tunes the window by how long
    /// after it came.
    ran_out: Option<std::time::Instant>,
    /// How often lately a non-zero window caught buffers, in `CATCH_ONE`ths: a moving average
    /// over about the last `CATCH_OVER` windows.
    catches: u32,
}

/// A window's catch rate that counts as 1 (windows that always catch).
const CATCH_ONE: u32 = 1 << 12;
/// The moving average's span: each window weighs 1/`CATCH_OVER`.
const CATCH_OVER: u32 = 16;
/// Below this catch rate (1 window in 10) polling does not pay: the window shrinks whenever the
/// next wake-up comes. A wake-up soon after a window ran out would say a longer window pays; but a
/// device that holds its completions while the server watches (`take_at_most`) makes the driver
/// wait for the window's end, so the driver's next buffers come just after it, whatever its
/// length. Only buffers caught while watching show that polling pays.
const CATCH_MIN: u32 = CATCH_ONE / 10;
/// The rate a new window starts from, and a window that shrank to zero for catching too little
/// starts again from: a little above `CATCH_MIN`, so a few windows that catch nothing end the
/// trial, and a few that catch keep it going.
const CATCH_START: u32 = CATCH_ONE * 3 / 20;

impl RingPoll {
    /// Tunes polling by how a watch of `window`, begun at `started`, ended.
    fn watched(&mut self, end: WatchEnd, window: std::time::Duration, started: std::time::Instant) {
        // A zero window did not spin: it says nothing of the CPU, nor of what windows catch.
        if !window.is_zero() {
            self.window.spun(end.preempted());
            match end {
                WatchEnd::Caught { .. } => self.caught(true),
                WatchEnd::RanOut => self.caught(false),
                WatchEnd::Cut | WatchEnd::Preempted => {}
            }
        }
        if end == WatchEnd::RanOut {
            self.ran_out = Some(started);
        }
    }

    /// Counts a non-zero window into the catch rate: it caught buffers, or ran out.
    fn caught(&mut self, caught: bool) {
        self.catches -= self.catches / CATCH_OVER;
        if caught {
            self.catches += CATCH_ONE / CATCH_OVER;
        }
    }
}

impl<Q: QueueT> fmt::Debug for QueueServer<Q> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueServer")
            .field("index", &self.notify.index())
            .field("event_idx", &self.queue.event_idx_enabled())
            .field("next_avail", &self.queue.next_avail())
            .field("next_used", &self.queue.next_used())
            .field("stats", &self.stats)
            .field("held", &self.held)
            .field("poll", &self.poll)
            .finish()
    }
}

fn queue_error(op: &'static str) -> impl Fn(virtio_queue::Error) -> Error {
    move |e| Error::Virtqueue {
        op,
        reason: e.to_string(),
    }
}

impl<Q: QueueT> QueueServer<Q> {
    /// Serves `queue` (configured and ready, EVENT_IDX set as the driver negotiated it), with
    /// `notify`'s kicks and interrupt.
    pub fn new(notify: VirtQueueNotify, queue: Q) -> Self {
        QueueServer {
            notify,
            queue,
            stats: ServeStats::default(),
            held: None,
            poll: None,
        }
    }

    /// Turns adaptive interrupt moderation on (`Some`) or off (`None`) for this queue; `K`
    /// starts at 1. Turning it off sends what is held.
    ///
    /// # Errors
    ///
    /// Those of [`VirtQueueNotify::trigger`], sending what was held.
    pub fn moderate(&mut self, moderation: Option<Moderation>) -> Result<()> {
        self.flush(Flush::Dry)?;
        self.held = moderation.map(|config| Held {
            config: Moderation {
                max_held: config.max_held.max(1),
                ..config
            },
            target: 1,
            count: 0,
            since: None,
            last_chain: std::time::Duration::ZERO,
        });
        Ok(())
    }

    /// Turns ring polling on (`Some(max)`) or off (`None`) for this queue: when the ring runs
    /// dry, the server keeps kicks off and watches the available index for a while before it
    /// turns them back on and returns, serving what comes meanwhile — buffers the driver makes
    /// available then need no kick, which in a VM is an exit (virtio's event suppression lets a
    /// device do this: the driver kicks only when the device asks). The window tunes itself
    /// between zero and `max` as [`AdaptivePoll`]'s does, by when the next wake-up came after a
    /// window ran out, except that while fewer than 1 window in 10 catches buffers (a moving
    /// average over about 16) it shrinks whatever the wake-ups say, down to zero, and starts
    /// over from there. The price is the device thread's CPU while it watches: a VMM turns it on
    /// where a core is free for it, and where that core turns out to be contended (the thread
    /// is preempted while it watches — by another thread, or by the host descheduling its
    /// virtual CPU), polling backs off as [`AdaptivePoll`]'s does: it stops for a time that
    /// grows while preemptions go on.
    pub fn poll(&mut self, max: Option<std::time::Duration>) {
        self.poll = max.map(|max| RingPoll {
            window: AdaptivePoll::new(max),
            ran_out: None,
            catches: CATCH_START,
        });
    }

    /// With ring polling, the current window. `None` without.
    pub fn poll_window(&self) -> Option<std::time::Duration> {
        self.poll.as_ref().map(|p| p.window.window())
    }

    /// With moderation, the current `K`: how many interrupts the server holds back before they
    /// go as one. `None` without moderation.
    pub fn moderation_target(&self) -> Option<u32> {
        self.held.map(|h| h.target)
    }

    /// The queue's notifications.
    pub fn notify(&self) -> &VirtQueueNotify {
        &self.notify
    }

    /// The queue.
    pub fn queue(&self) -> &Q {
        &self.queue
    }

    /// The queue, to change (for example after a device reset).
    pub fn queue_mut(&mut self) -> &mut Q {
        &mut self.queue
    }

    /// What the server did so far.
    pub fn stats(&self) -> ServeStats {
        self.stats
    }

    /// "I added used buffers; interrupt if the driver wants it." Call after one or more
    /// `add_used` on [`queue_mut`](Self::queue_mut) ([`serve`](Self::serve) does, after each
    /// chain). With EVENT_IDX the driver wants one when the used index crossed `used_event` since
    /// the last call; without, when `VRING_AVAIL_F_NO_INTERRUPT` is clear. Returns whether it
    /// signalled.
    ///
    /// # Errors
    ///
    /// [`Error::Virtqueue`] when the rings cannot be read, and those of
    /// [`VirtQueueNotify::trigger`].
    pub fn used_added<M: GuestMemory>(&mut self, mem: &M) -> Result<bool> {
        // Also the full fence between the used ring's writes and the reads of the driver's wish.
        let crossed = self
            .queue
            .needs_notification(mem)
            .map_err(queue_error("needs_notification"))?;
        let wanted = if self.queue.event_idx_enabled() {
            crossed
        } else {
            avail_flags(mem, self.queue.avail_ring())? & VRING_AVAIL_F_NO_INTERRUPT == 0
        };
        // What is held goes once the oldest is due, wanted or not this time.
        if let Some(held) = &self.held {
            if held
                .since
                .is_some_and(|since| since.elapsed() >= held.config.budget)
            {
                self.flush(Flush::Late)?;
            }
        }
        if !wanted {
            self.stats.suppressed += 1;
            return Ok(false);
        }
        if self.held.is_none() {
            self.interrupt()?;
            return Ok(true);
        }
        // Hold it while more work waits in the ring (the next completion comes without the
        // driver's help); send at once when this one leaves the ring dry.
        let more = self.has_work(mem)?;
        let Some(held) = &mut self.held else {
            return Ok(false);
        };
        held.count += 1;
        // (One held past the budget went out at the top of this call.)
        held.since.get_or_insert_with(std::time::Instant::now);
        let why = if !more {
            Flush::Dry
        } else if held.count >= held.target {
            Flush::Full
        } else {
            self.stats.held += 1;
            return Ok(false);
        };
        self.flush(why)?;
        Ok(true)
    }

    /// Sends what moderation holds, if anything, and adapts `K` to why.
    fn flush(&mut self, why: Flush) -> Result<()> {
        let Some(held) = &mut self.held else {
            return Ok(());
        };
        if held.count == 0 {
            return Ok(());
        }
        match why {
            Flush::Full => {
                held.target = (held.target * 2).min(held.config.max_held);
                self.stats.flushed_full += 1;
            }
            Flush::Late => {
                held.target = (held.target / 2).max(1);
                self.stats.flushed_late += 1;
            }
            Flush::Dry => self.stats.flushed_dry += 1,
        }
        held.count = 0;
        held.since = None;
        self.interrupt()
    }

    fn interrupt(&mut self) -> Result<()> {
        self.notify.trigger()?;
        self.stats.interrupts += 1;
        Ok(())
    }

    /// One wake-up's work: turns kicks off, completes every available chain — `complete` fills
    /// it and returns the bytes it wrote into it, the used length — adding each to the used ring
    /// and interrupting where the driver wants ([`used_added`](Self::used_added)); then turns
    /// kicks back on and checks the ring again, serving what came meanwhile, until a check finds
    /// it empty. Returns the chains completed.
    ///
    /// # Errors
    ///
    /// [`Error::Virtqueue`] when the rings cannot be read or written, and those of
    /// [`VirtQueueNotify::trigger`].
    pub fn serve<M: GuestMemory>(
        &mut self,
        mem: &M,
        complete: impl FnMut(DescriptorChain<&M>) -> u32,
    ) -> Result<u64> {
        self.serve_at_most(mem, u64::MAX, complete)
            .map(|(served, _)| served)
    }

    /// As [`serve`](Self::serve), but stops after `max` chains — a device sharing its thread
    /// among queues bounds each one's turn. Returns the chains completed and whether it stopped
    /// with work left in the ring; then kicks stay off (the driver need not kick for what the
    /// device already knows about), what moderation held is sent, and the caller calls again
    /// without waiting for a kick.
    ///
    /// # Errors
    ///
    /// As [`serve`](Self::serve).
    pub fn serve_at_most<M: GuestMemory>(
        &mut self,
        mem: &M,
        max: u64,
        mut complete: impl FnMut(DescriptorChain<&M>) -> u32,
    ) -> Result<(u64, bool)> {
        self.each_available(
            mem,
            max,
            |server, chain| {
                // What is held goes now if it would be due before this chain is done (its time
                // guessed from the last one's).
                if let Some(held) = &server.held {
                    let due = held.since.is_some_and(|since| {
                        since.elapsed() + held.last_chain >= held.config.budget
                    });
                    if due {
                        server.flush(Flush::Late)?;
                    }
                }
                let head = chain.head_index();
                let started = std::time::Instant::now();
                let len = complete(chain);
                if let Some(held) = &mut server.held {
                    held.last_chain = started.elapsed();
                }
                server.add_used(mem, head, len)?;
                server.used_added(mem).map(drop)
            },
            || false,
        )
    }

    /// For a device that completes chains later — asynchronous I/O, such as io_uring — the
    /// first half of [`serve_at_most`](Self::serve_at_most): with kicks off, hands `take` every
    /// available chain (at most `max`), adding nothing to the used ring; then turns kicks back
    /// on and checks the ring again, as `serve` does, so no wake-up is lost. The device keeps
    /// each chain's [`head_index`](DescriptorChain::head_index) and, once its work is done, hands
    /// it to [`complete`](Self::complete). Returns the chains taken and whether it stopped with
    /// work left in the ring (then kicks stay off and the caller calls again without waiting).
    ///
    /// With ring polling ([`poll`](Self::poll)), after the ring runs dry the server watches it
    /// with kicks off, and calls `idle` each time it finds it still dry (the first time at
    /// once): the device's moment to start what it took (one submission for all of it), and
    /// to say whether to stop watching — `true` when finished work waits that the driver may be
    /// waiting for. Meanwhile the device's completions wait; those of many requests then go
    /// back together, with one interrupt. Without polling `idle` is not called: the device
    /// starts what it took after this returns.
    ///
    /// # Errors
    ///
    /// [`Error::Virtqueue`] when the rings cannot be read or written, and those of
    /// [`VirtQueueNotify::trigger`] (sending what moderation held).
    pub fn take_at_most<M: GuestMemory>(
        &mut self,
        mem: &M,
        max: u64,
        mut take: impl FnMut(DescriptorChain<&M>),
        idle: impl FnMut() -> bool,
    ) -> Result<(u64, bool)> {
        self.each_available(
            mem,
            max,
            |_, chain| {
                take(chain);
                Ok(())
            },
            idle,
        )
    }

    /// The second half, for chains [`take_at_most`](Self::take_at_most) handed out: adds each
    /// of `done` — a chain's head index and the bytes written into its buffers — to the used
    /// ring, in the order given (virtio lets a device complete out of order), then decides
    /// once, for all of them, whether the driver wants an interrupt
    /// ([`used_added`](Self::used_added)), and sends it. A batch of completions costs at most
    /// one interrupt. Returns the chains completed.
    ///
    /// # Errors
    ///
    /// [`Error::Virtqueue`] when the used ring cannot be written (the chains before the failing
    /// one are on it, and the interrupt decision is still made for them), and those of
    /// [`VirtQueueNotify::trigger`].
    pub fn complete<M: GuestMemory>(
        &mut self,
        mem: &M,
        done: impl IntoIterator<Item = (u16, u32)>,
    ) -> Result<u64> {
        let mut added = 0;
        let mut failed = Ok(());
        for (head, len) in done {
            if let Err(e) = self.add_used(mem, head, len) {
                failed = Err(e);
                break;
            }
            added += 1;
        }
        if added > 0 {
            self.used_added(mem)?;
            // The batch is the unit here: nothing is held past it.
            self.flush(Flush::Dry)?;
        }
        failed.map(|()| added)
    }

    fn add_used<M: GuestMemory>(&mut self, mem: &M, head: u16, len: u32) -> Result<()> {
        self.queue
            .add_used(mem, head, len)
            .map_err(queue_error("add_used"))?;
        self.stats.chains += 1;
        Ok(())
    }

    /// One wake-up's loop, for `serve_at_most` and `take_at_most`: turns kicks off, gives
    /// `per_chain` each available chain (at most `max`), turns kicks back on and checks again,
    /// until a check finds the ring empty or `max` are done; what moderation held is sent
    /// before it returns.
    fn each_available<M: GuestMemory>(
        &mut self,
        mem: &M,
        max: u64,
        mut per_chain: impl FnMut(&mut Self, DescriptorChain<&M>) -> Result<()>,
        mut idle: impl FnMut() -> bool,
    ) -> Result<(u64, bool)> {
        self.stats.wakeups += 1;
        if let Some(poll) = &mut self.poll {
            // The wake-up came this long after the last window ran out.
            if let Some(since) = poll.ran_out.take() {
                if poll.catches >= CATCH_MIN {
                    poll.window.tune(since.elapsed());
                } else {
                    poll.window.shrink();
                    if poll.window.window().is_zero() {
                        // From zero it grows again as wake-ups come soon: a fresh trial.
                        poll.catches = CATCH_START;
                    }
                }
            }
        }
        let mut served = 0;
        let result = loop {
            match self.drain(mem, &mut per_chain, max - served) {
                Ok(n) => served += n,
                Err(e) => break Err(e),
            }
            if served == max {
                break self.has_work(mem).map(|more| (served, more));
            }
            match self.watch(mem, &mut idle) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => break Err(e),
            }
            match self.rearm(mem) {
                Ok(true) => self.stats.rechecks += 1,
                Ok(false) => break Ok((served, false)),
                Err(e) => break Err(e),
            }
        };
        // Nothing held outlives the call: the ring is dry, or serving stopped.
        let flushed = self.flush(Flush::Dry);
        result.and_then(|r| flushed.map(|()| r))
    }

    /// Whether the ring holds buffers not yet taken.
    fn has_work<M: GuestMemory>(&self, mem: &M) -> Result<bool> {
        let avail = self
            .queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(queue_error("avail_idx"))?;
        Ok(avail.0 != self.queue.next_avail())
    }

    /// Turns kicks off and gives `per_chain` available chains, at most `max`; returns how many.
    fn drain<M: GuestMemory>(
        &mut self,
        mem: &M,
        per_chain: &mut impl FnMut(&mut Self, DescriptorChain<&M>) -> Result<()>,
        max: u64,
    ) -> Result<u64> {
        self.queue
            .disable_notification(mem)
            .map_err(queue_error("disable_notification"))?;
        let mut served = 0;
        while served < max {
            let Some(chain) = self.queue.pop_descriptor_chain(mem) else {
                break;
            };
            per_chain(self, chain)?;
            served += 1;
        }
        Ok(served)
    }

    /// With ring polling, watches the ring (kicks still off) for up to the window, or until
    /// `idle` says so: `true` when buffers came. How the watch ended tunes the window and
    /// polling's back-off, in one place.
    fn watch<M: GuestMemory>(&mut self, mem: &M, idle: &mut impl FnMut() -> bool) -> Result<bool> {
        let Some(poll) = &mut self.poll else {
            return Ok(false);
        };
        let Some(window) = poll.window.spin_window() else {
            self.stats.poll_backed_off += 1;
            return Ok(false);
        };
        let started = std::time::Instant::now();
        let end = self.spin(mem, window, started, idle)?;
        match end {
            WatchEnd::Caught { .. } => self.stats.polled += 1,
            // Cut short: the next wake-up says nothing about the window's length.
            WatchEnd::Cut => self.stats.poll_cut += 1,
            // Kicks go back on at once; the window stays as it was.
            WatchEnd::Preempted => {}
            WatchEnd::RanOut => self.stats.poll_ran_out += 1,
        }
        if end.preempted() {
            self.stats.poll_preempted += 1;
        }
        if let Some(poll) = &mut self.poll {
            poll.watched(end, window, started);
        }
        Ok(matches!(end, WatchEnd::Caught { .. }))
    }

    /// The watch itself: reads the available index until buffers come, the window runs out, the
    /// thread loses its CPU or `idle` cuts it short.
    fn spin<M: GuestMemory>(
        &self,
        mem: &M,
        window: std::time::Duration,
        started: std::time::Instant,
        idle: &mut impl FnMut() -> bool,
    ) -> Result<WatchEnd> {
        let mut clock = SpinClock::since(started);
        while !window.is_zero() {
            let work = self.has_work(mem)?;
            let preempted = clock.lost_cpu();
            if work {
                return Ok(WatchEnd::Caught { preempted });
            }
            if preempted {
                return Ok(WatchEnd::Preempted);
            }
            if idle() {
                return Ok(WatchEnd::Cut);
            }
            clock.skip();
            if clock.elapsed() >= window {
                break;
            }
            std::hint::spin_loop();
        }
        Ok(WatchEnd::RanOut)
    }

    /// Turns kicks back on, then (after a full fence) checks the ring once more: `true` when
    /// buffers came since the last pop, which the driver may not have kicked for.
    fn rearm<M: GuestMemory>(&mut self, mem: &M) -> Result<bool> {
        self.queue
            .enable_notification(mem)
            .map_err(queue_error("enable_notification"))
    }

    /// Serves on each wake-up of the queue's kicks (a blocking read) until `stop` says so after
    /// one; returns the chains completed. A device thread's whole loop, for a queue of its own.
    ///
    /// # Errors
    ///
    /// Those of [`serve`](Self::serve), and [`Error::Notifier`] when the read of the kicks fails.
    pub fn run<M: GuestMemory>(
        &mut self,
        mem: &M,
        mut complete: impl FnMut(DescriptorChain<&M>) -> u32,
        mut stop: impl FnMut(&ServeStats) -> bool,
    ) -> Result<u64> {
        let mut served = 0;
        while !stop(&self.stats) {
            self.notify.kicks().read()?;
            served += self.serve(mem, &mut complete)?;
        }
        Ok(served)
    }
}

/// How a watch of the ring ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WatchEnd {
    /// Buffers came; `preempted` when the thread had lost its CPU just before.
    Caught {
        /// The read that found them came after a gap (see `SpinClock`).
        preempted: bool,
    },
    /// The thread lost its CPU while watching.
    Preempted,
    /// The device's `idle` said stop (finished work waits).
    Cut,
    /// The window ran out (or was zero).
    RanOut,
}

impl WatchEnd {
    /// Whether the thread lost its CPU during the watch.
    fn preempted(self) -> bool {
        matches!(
            self,
            WatchEnd::Preempted | WatchEnd::Caught { preempted: true }
        )
    }
}

/// Why held interrupts are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flush {
    /// `K` were held.
    Full,
    /// The oldest reached the budget.
    Late,
    /// The ring ran dry, or serving stopped.
    Dry,
}

/// The available ring's flags.
fn avail_flags<M: GuestMemory>(mem: &M, avail_ring: u64) -> Result<u16> {
    mem.load::<u16>(GuestAddress(avail_ring), Ordering::Acquire)
        .map(u16::from_le)
        .map_err(|e| Error::Virtqueue {
            op: "read the available ring's flags",
            reason: format!("{e} at {:#x}", GuestAddress(avail_ring).raw_value()),
        })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{fence, AtomicBool};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::device::RecordingInterrupt;
    use crate::notifier::{Mode, Notifier};

    const SIZE: u16 = 16;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const BUFFERS: u64 = 0x4000;
    /// `VRING_USED_F_NO_NOTIFY`.
    const NO_NOTIFY: u16 = 1;

    /// A driver's side of a `SIZE` ring in plain guest memory: descriptor `i` is a 64-byte
    /// device-writable buffer, reused in ring order.
    struct Driver {
        mem: GuestMemoryMmap,
        event_idx: bool,
        submitted: u16,
    }

    impl Driver {
        fn new(event_idx: bool) -> Driver {
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
            for i in 0..u64::from(SIZE) {
                mem.write_obj(BUFFERS + i * 64, GuestAddress(DESC + 16 * i))
                    .unwrap();
                // len 64, flags VIRTQ_DESC_F_WRITE, next 0.
                mem.write_obj(64u32 | (2 << 16) as u32, GuestAddress(DESC + 16 * i + 8))
                    .unwrap();
            }
            Driver {
                mem,
                event_idx,
                submitted: 0,
            }
        }

        fn queue<Q: QueueT>(&self) -> Q {
            let mut q = Q::new(SIZE).unwrap();
            q.set_desc_table_address(Some(DESC as u32), Some(0));
            q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
            q.set_used_ring_address(Some(USED as u32), Some(0));
            q.set_event_idx(self.event_idx);
            q.set_ready(true);
            q
        }

        fn u16_at(&self, addr: u64) -> u16 {
            self.mem
                .load::<u16>(GuestAddress(addr), Ordering::Acquire)
                .unwrap()
        }

        fn set_u16(&self, addr: u64, value: u16) {
            self.mem
                .store(value, GuestAddress(addr), Ordering::Release)
                .unwrap();
        }

        /// Makes `n` more buffers available; returns whether the device asked for a kick
        /// (`vring_need_event` with EVENT_IDX, `VRING_USED_F_NO_NOTIFY` clear without).
        fn submit(&mut self, n: u16) -> bool {
            let old = self.submitted;
            for _ in 0..n {
                let slot = self.submitted % SIZE;
                self.set_u16(AVAIL + 4 + 2 * u64::from(slot), slot);
                self.submitted = self.submitted.wrapping_add(1);
            }
            self.set_u16(AVAIL + 2, self.submitted);
            fence(Ordering::SeqCst);
            if self.event_idx {
                let event = self.u16_at(USED + 4 + 8 * u64::from(SIZE));
                self.submitted.wrapping_sub(event).wrapping_sub(1)
                    < self.submitted.wrapping_sub(old)
            } else {
                self.u16_at(USED) & NO_NOTIFY == 0
            }
        }

        fn used_idx(&self) -> u16 {
            self.u16_at(USED + 2)
        }

        fn set_used_event(&self, value: u16) {
            self.set_u16(AVAIL + 4 + 2 * u64::from(SIZE), value);
        }

        fn set_avail_flags(&self, value: u16) {
            self.set_u16(AVAIL, value);
        }
    }

    fn server(driver: &Driver) -> (QueueServer, Arc<RecordingInterrupt>) {
        let irq = Arc::new(RecordingInterrupt::edge().unwrap());
        let notify = VirtQueueNotify::new(0, Notifier::new(Mode::Counter).unwrap(), irq.clone());
        (QueueServer::new(notify, driver.queue()), irq)
    }

    /// The server is generic over virtio-queue's `QueueT`: a `QueueSync` (a queue shared between
    /// threads) is served with the same suppression.
    #[test]
    fn a_queue_sync_is_served_the_same_way() {
        let mut driver = Driver::new(false);
        let irq = Arc::new(RecordingInterrupt::edge().unwrap());
        let notify = VirtQueueNotify::new(0, Notifier::new(Mode::Counter).unwrap(), irq.clone());
        let mut server = QueueServer::new(notify, driver.queue::<virtio_queue::QueueSync>());
        driver.submit(3);
        assert_eq!(server.serve(&driver.mem, |_| 64).unwrap(), 3);
        driver.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT);
        driver.submit(2);
        assert_eq!(server.serve(&driver.mem, |_| 64).unwrap(), 2);
        assert_eq!((driver.used_idx(), irq.triggers()), (5, 3));
        assert_eq!(server.stats().suppressed, 2);
    }

    /// Without EVENT_IDX: an interrupt per used buffer while `VRING_AVAIL_F_NO_INTERRUPT` is
    /// clear, none while it is set; kicks are off (`VRING_USED_F_NO_NOTIFY`) while chains are
    /// served and on again after.
    #[test]
    fn flags_suppress_interrupts_and_kicks() {
        let mut driver = Driver::new(false);
        let (mut server, irq) = server(&driver);
        assert!(driver.submit(3), "kicks start enabled");
        let mut flags_seen = Vec::new();
        let served = server
            .serve(&driver.mem, |_| {
                flags_seen.push(driver.u16_at(USED) & NO_NOTIFY);
                64
            })
            .unwrap();
        assert_eq!(served, 3);
        assert_eq!(flags_seen, [NO_NOTIFY; 3], "no kicks wanted while serving");
        assert_eq!(driver.u16_at(USED) & NO_NOTIFY, 0, "kicks wanted again");
        assert_eq!(irq.triggers(), 3);
        driver.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT);
        driver.submit(2);
        assert_eq!(server.serve(&driver.mem, |_| 64).unwrap(), 2);
        assert_eq!(irq.triggers(), 3, "the driver asked for none");
        let stats = server.stats();
        assert_eq!(
            (stats.chains, stats.interrupts, stats.suppressed),
            (5, 3, 2)
        );
        assert_eq!(driver.used_idx(), 5);
    }

    /// With EVENT_IDX: one interrupt, when the used index passes `used_event`, whichever chain
    /// of the batch that is; `avail_event` left at the next index to serve, so the driver's next
    /// buffer kicks.
    #[test]
    fn event_idx_interrupts_where_used_event_says() {
        let mut driver = Driver::new(true);
        let (mut server, irq) = server(&driver);
        driver.set_used_event(2); // interrupt when the third buffer is used
        assert!(driver.submit(5));
        let mut signals_at = Vec::new();
        server
            .serve(&driver.mem, |_| {
                signals_at.push(irq.triggers());
                64
            })
            .unwrap();
        // Signals seen before completing each of the five chains: the third's raised one.
        assert_eq!(signals_at, [0, 0, 0, 1, 1]);
        assert_eq!(irq.triggers(), 1);
        assert_eq!(driver.u16_at(USED + 4 + 8 * u64::from(SIZE)), 5);
        driver.set_used_event(driver.used_idx().wrapping_sub(1));
        assert!(driver.submit(1), "avail_event asks for the next kick");
        server.serve(&driver.mem, |_| 64).unwrap();
        assert_eq!(irq.triggers(), 1, "used_event 4 was crossed already");
        // Interrupt when the next buffer is used (the used index moves past 6).
        driver.set_used_event(driver.used_idx());
        driver.submit(1);
        server.serve(&driver.mem, |_| 64).unwrap();
        assert_eq!(irq.triggers(), 2);
        assert_eq!(server.stats().interrupts, 2);
        assert_eq!(server.stats().suppressed, 5);
    }

    /// Chains taken now and completed later, out of order, as asynchronous I/O does: nothing
    /// reaches the used ring or interrupts at take; kicks are wanted again after it; the batch
    /// completed later is on the used ring in the order given and costs one interrupt.
    #[test]
    fn chains_taken_then_completed_later_cost_one_interrupt_a_batch() {
        let mut driver = Driver::new(true);
        let (mut server, irq) = server(&driver);
        driver.set_used_event(0); // interrupt at the first buffer used
        assert!(driver.submit(5));
        let mut heads = Vec::new();
        let taken = server.take_at_most(
            &driver.mem,
            u64::MAX,
            |chain| heads.push(chain.head_index()),
            || false,
        );
        assert_eq!(taken.unwrap(), (5, false));
        assert_eq!(heads, [0, 1, 2, 3, 4]);
        assert_eq!((driver.used_idx(), irq.triggers()), (0, 0));
        assert_eq!(
            driver.u16_at(USED + 4 + 8 * u64::from(SIZE)),
            5,
            "kicks wanted again"
        );
        let done: Vec<(u16, u32)> = heads.iter().rev().map(|&h| (h, 64)).collect();
        assert_eq!(server.complete(&driver.mem, done).unwrap(), 5);
        assert_eq!((driver.used_idx(), irq.triggers()), (5, 1));
        // The used ring's first element is the first completion given: head 4.
        assert_eq!(driver.u16_at(USED + 4), 4);
        // The driver wants none until the used index passes 7: a batch of 2 raises nothing.
        driver.set_used_event(7);
        driver.submit(2);
        let mut heads = Vec::new();
        server
            .take_at_most(
                &driver.mem,
                u64::MAX,
                |chain| heads.push(chain.head_index()),
                || false,
            )
            .unwrap();
        server
            .complete(&driver.mem, heads.iter().map(|&h| (h, 0)))
            .unwrap();
        assert_eq!((driver.used_idx(), irq.triggers()), (7, 1));
        let stats = server.stats();
        assert_eq!(
            (stats.chains, stats.interrupts, stats.suppressed),
            (7, 1, 1)
        );
        // An empty batch adds nothing and decides nothing.
        assert_eq!(server.complete(&driver.mem, []).unwrap(), 0);
        assert_eq!(server.stats().suppressed, 1);
    }

    /// `take_at_most` stops at `max` with kicks left off and says work is left; the next call
    /// takes the rest and turns them back on.
    #[test]
    fn take_at_most_leaves_kicks_off_while_work_is_left() {
        let mut driver = Driver::new(false);
        let (mut server, _irq) = server(&driver);
        driver.submit(3);
        let mut taken = 0;
        let first = server
            .take_at_most(&driver.mem, 2, |_| taken += 1, || false)
            .unwrap();
        assert_eq!((first, taken), ((2, true), 2));
        assert_eq!(
            driver.u16_at(USED) & NO_NOTIFY,
            NO_NOTIFY,
            "no kick needed yet"
        );
        let rest = server
            .take_at_most(&driver.mem, 2, |_| taken += 1, || false)
            .unwrap();
        assert_eq!((rest, taken), ((1, false), 3));
        assert_eq!(driver.u16_at(USED) & NO_NOTIFY, 0, "kicks wanted again");
    }

    /// Whether a test's watches all kept their CPU. The tests below time a watch against a
    /// thread's sleep; on a machine whose CPUs are busy (tests run in parallel) a watch can be
    /// preempted, which ends it early and backs polling off, as it should. Such a run says
    /// nothing about what the test pins down, so the test runs again.
    fn kept_cpu(server: &QueueServer) -> bool {
        let s = server.stats();
        s.poll_preempted == 0 && s.poll_backed_off == 0
    }

    /// Wake-ups back to back on a dry ring: the window grows from zero, doubling at each, to
    /// 128 µs (five non-zero windows that caught nothing: the catch rate still at `CATCH_MIN` or
    /// above). `false` if a watch
    /// lost its CPU meanwhile (then polling backed off, and the window may not have grown).
    fn grow(
        server: &mut QueueServer,
        mut wake: impl FnMut(&mut QueueServer) -> Result<()>,
    ) -> bool {
        assert_eq!(server.poll_window(), Some(Duration::ZERO));
        for _ in 0..8 {
            if server.poll_window() >= Some(Duration::from_micros(128)) {
                return true;
            }
            wake(server).unwrap();
        }
        assert!(!kept_cpu(server), "the window did not grow: {server:?}");
        false
    }

    fn set_window(server: &mut QueueServer, window: Duration) {
        server.poll.as_mut().unwrap().window.set_window(window);
    }

    /// Windows that keep running out with nothing caught shrink though wake-ups come at once
    /// after them (as they do when the device holds completions until the window ends), down to
    /// zero; from there the window grows again, and windows that catch raise the catch rate.
    #[test]
    fn a_window_that_catches_nothing_shrinks_though_wake_ups_come_soon() {
        let windows = uncontended(|| {
            let driver = Driver::new(true);
            let (mut server, _irq) = server(&driver);
            server.poll(Some(Duration::from_millis(1)));
            let mut windows: Vec<u128> = Vec::new();
            for _ in 0..20 {
                server.serve(&driver.mem, |_| 64).unwrap();
                windows.push(server.poll_window().unwrap().as_micros());
            }
            kept_cpu(&server).then_some(windows)
        });
        // Zero until the first window ran out; doubled from 4 µs at each wake-up while it ran
        // out, to 256 µs (the seventh non-zero window to catch nothing takes the catch rate from
        // `CATCH_START` below `CATCH_MIN`); then halved at each, though every wake-up came at
        // once; from zero, a fresh trial.
        assert_eq!(
            windows,
            [0, 4, 8, 16, 32, 64, 128, 256, 128, 64, 32, 16, 8, 4, 0, 4, 8, 16, 32, 64]
        );
        // A window that catches a buffer raises the rate.
        let (served, polled, catches) = uncontended(|| {
            let mut driver = Driver::new(true);
            let (mut server, _irq) = server(&driver);
            server.poll(Some(Duration::from_secs(1)));
            set_window(&mut server, Duration::from_millis(500));
            let mem = driver.mem.clone();
            let served = std::thread::scope(|s| {
                let maker = s.spawn(|| {
                    std::thread::sleep(Duration::from_millis(20));
                    driver.submit(1)
                });
                let served = server.serve(&mem, |_| 64).unwrap();
                maker.join().unwrap();
                served
            });
            let catches = server.poll.as_ref().unwrap().catches;
            kept_cpu(&server).then(|| (served, server.stats().polled, catches))
        });
        // Caught, then one window that ran out after it: in 4096ths, 614 (15%) less a 16th
        // plus 256 is 832, less a 16th is 780 (19%).
        assert_eq!((served, polled, catches), (1, 1, 780));
    }

    /// A watch that loses its CPU ends there, and the next wake-up does not watch (polling backed
    /// off). The watching thread is pinned beside a thread that wakes every millisecond, and made
    /// `SCHED_IDLE`, so that thread takes the CPU as soon as it wakes: a preemption for real.
    #[test]
    fn a_watch_that_loses_its_cpu_backs_polling_off() {
        /// Pins the calling thread to `cpu`.
        fn pin_to(cpu: usize) {
            // SAFETY: an all-zero cpu_set_t is an empty set, CPU_SET sets a bit within it (a
            // CPU number the kernel gave), and sched_setaffinity reads the set for the size
            // passed.
            let rc = unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
            };
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        }
        let driver = Driver::new(true);
        let (mut server, _irq) = server(&driver);
        server.poll(Some(Duration::from_secs(1)));
        set_window(&mut server, Duration::from_millis(200));
        let stop = Arc::new(AtomicBool::new(false));
        let watched = std::thread::scope(|s| {
            // SAFETY: sched_getcpu takes nothing and returns a number.
            let cpu = unsafe { libc::sched_getcpu() };
            assert!(cpu >= 0, "{}", std::io::Error::last_os_error());
            pin_to(cpu as usize);
            let flag = stop.clone();
            let waker = s.spawn(move || {
                pin_to(cpu as usize);
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(1));
                    let started = Instant::now();
                    while started.elapsed() < Duration::from_micros(500) {
                        std::hint::spin_loop();
                    }
                }
            });
            // SAFETY: sched_setscheduler reads the parameter block given (priority 0, as
            // SCHED_IDLE requires) and changes only this thread's policy; no privilege needed.
            let rc = unsafe {
                let param = libc::sched_param { sched_priority: 0 };
                libc::sched_setscheduler(0, libc::SCHED_IDLE, &param)
            };
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            let started = Instant::now();
            server.serve(&driver.mem, |_| 64).unwrap();
            let watched = started.elapsed();
            server.serve(&driver.mem, |_| 64).unwrap();
            stop.store(true, Ordering::Relaxed);
            waker.join().unwrap();
            watched
        });
        let stats = server.stats();
        assert_eq!(
            (
                stats.poll_preempted,
                stats.poll_backed_off,
                stats.poll_ran_out
            ),
            (1, 1, 0),
            "{server:?}"
        );
        assert!(
            watched < Duration::from_millis(100),
            "the watch ran on: {watched:?}"
        );
        assert!(server.poll.as_ref().unwrap().window.backoff() > Duration::ZERO);
    }

    /// Runs `attempt` until a run's watches kept their CPU (it returns `Some`), for up to two
    /// minutes (other tests running beside it can keep both CPUs busy for a while).
    fn uncontended<T>(mut attempt: impl FnMut() -> Option<T>) -> T {
        let started = Instant::now();
        loop {
            if let Some(result) = attempt() {
                return result;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "every attempt for two minutes had a watch preempted: the machine is too busy"
            );
        }
    }

    /// Ring polling: the window grows from zero while wake-ups come soon after it ran out; then
    /// a buffer made available while the server watches (after serving a kicked one) is served
    /// in the same call, and the driver saw no kick wanted for it. Wake-ups long after a window
    /// shrink it again.
    #[test]
    fn ring_polling_serves_a_buffer_that_needed_no_kick() {
        for event_idx in [true, false] {
            let max = Duration::from_millis(500);
            let (stats, ran_out, kick_wanted, used, window) = uncontended(|| {
                let mut driver = Driver::new(event_idx);
                let (mut server, _irq) = server(&driver);
                server.poll(Some(max));
                assert_eq!(server.poll_window(), Some(Duration::ZERO));
                // Wake-ups back to back: each finds the window ran out just before, and grows
                // it; then, for the timing below, a long one.
                if !grow(&mut server, |s| s.serve(&driver.mem, |_| 64).map(drop)) {
                    return None;
                }
                set_window(&mut server, Duration::from_millis(200));
                let ran_out = server.stats().poll_ran_out;
                // A kicked buffer wakes the server; the next one comes while it watches.
                assert!(driver.submit(1));
                let mem = driver.mem.clone();
                let kick_wanted = std::thread::scope(|s| {
                    let late = s.spawn(|| {
                        std::thread::sleep(Duration::from_millis(20));
                        driver.submit(1)
                    });
                    let served = server.serve(&mem, |_| 64).unwrap();
                    let kick_wanted = late.join().unwrap();
                    // Preempted, the watch may have ended before the late buffer came.
                    if served == 1 {
                        server.serve(&mem, |_| 64).unwrap();
                    }
                    kick_wanted
                });
                // An idle spell longer than `max`: the window halves.
                let window = server.poll_window().unwrap();
                std::thread::sleep(max + Duration::from_millis(10));
                server.serve(&driver.mem, |_| 64).unwrap();
                let after = server.poll_window().unwrap();
                kept_cpu(&server).then(|| {
                    let used = driver.used_idx();
                    (server.stats(), ran_out, kick_wanted, used, (window, after))
                })
            });
            assert!(!kick_wanted, "EVENT_IDX {event_idx}: kicks stayed off");
            assert_eq!((stats.polled, stats.poll_ran_out), (1, ran_out + 2));
            assert_eq!(used, 2);
            assert_eq!(window.1, window.0 / 2);
        }
    }

    /// `take_at_most` with ring polling: the device's `idle` is called as soon as the ring is
    /// dry and while the server watches; when it says finished work waits, the watch ends there
    /// (long before the window would) and kicks are wanted again.
    #[test]
    fn a_device_ends_the_watch_when_finished_work_waits() {
        let (result, elapsed, taken, idle_calls, cut, kick_wanted) = uncontended(|| {
            let mut driver = Driver::new(true);
            let (mut server, _irq) = server(&driver);
            server.poll(Some(Duration::from_secs(5)));
            let grown = grow(&mut server, |s| {
                s.take_at_most(&driver.mem, u64::MAX, |_| (), || false)
                    .map(drop)
            });
            if !grown {
                return None;
            }
            set_window(&mut server, Duration::from_secs(1));
            assert!(driver.submit(1));
            let (mut taken, mut idle_calls) = (0, 0);
            let started = Instant::now();
            let result = server.take_at_most(
                &driver.mem,
                u64::MAX,
                |_| taken += 1,
                || {
                    idle_calls += 1;
                    // "Submitted" at the first call; "finished" by the third.
                    idle_calls == 3
                },
            );
            let elapsed = started.elapsed();
            let kick_wanted = driver.submit(1);
            kept_cpu(&server).then(|| {
                let cut = server.stats().poll_cut;
                (
                    result.unwrap(),
                    elapsed,
                    taken,
                    idle_calls,
                    cut,
                    kick_wanted,
                )
            })
        });
        assert_eq!(result, (1, false));
        assert!(elapsed < Duration::from_millis(500), "the watch ran on");
        assert_eq!((taken, idle_calls), (1, 3));
        assert_eq!(cut, 1);
        assert!(kick_wanted, "kicks wanted again");
    }

    /// The lost wake-up, step by step: the device has drained the ring but not yet turned
    /// kicks back on; the driver makes a buffer available then, sees no kick wanted and does not
    /// kick. Turning kicks back on must find that buffer (and `serve` then serves it), or it
    /// would wait for a kick that never comes.
    #[test]
    fn the_check_after_rearming_finds_a_buffer_that_was_not_kicked() {
        for event_idx in [true, false] {
            let mut driver = Driver::new(event_idx);
            let (mut server, _irq) = server(&driver);
            let mem = &driver.mem.clone();
            let mut complete = |s: &mut QueueServer, c: DescriptorChain<&GuestMemoryMmap>| {
                s.add_used(mem, c.head_index(), 64)
            };
            driver.submit(2);
            assert_eq!(server.drain(mem, &mut complete, u64::MAX).unwrap(), 2);
            assert!(
                !driver.submit(1),
                "EVENT_IDX {event_idx}: kicks are still off"
            );
            assert!(server.rearm(&driver.mem).unwrap(), "EVENT_IDX {event_idx}");
            assert_eq!(server.drain(mem, &mut complete, u64::MAX).unwrap(), 1);
            assert!(!server.rearm(&driver.mem).unwrap());
            assert!(
                driver.submit(1),
                "EVENT_IDX {event_idx}: kicks are on again"
            );
        }
    }

    /// Moderation, a lone request: the ring is dry after it, so it interrupts at once.
    #[test]
    fn a_lone_request_interrupts_at_once_under_moderation() {
        let mut driver = Driver::new(false);
        let (mut server, irq) = server(&driver);
        server.moderate(Some(Moderation::default())).unwrap();
        for round in 1..=3 {
            driver.submit(1);
            server.serve(&driver.mem, |_| 64).unwrap();
            assert_eq!(irq.triggers(), round);
        }
        assert_eq!(server.stats().held, 0);
        assert_eq!(server.stats().flushed_dry, 3);
        assert_eq!(server.moderation_target(), Some(1));
    }

    /// Moderation under a stream: 40 chains in one wake-up, each wanted by the driver. `K`
    /// doubles every time it is reached (1, 2, 4, then the ceiling 8: full after chains 1, 3, 7,
    /// 15, 23, 31 and 39), and the last chain, leaving the ring dry, goes at once: 8 interrupts
    /// instead of 40, the first after the first chain.
    #[test]
    fn moderation_holds_while_work_streams_and_flushes_when_dry() {
        let mut driver = Driver::new(false);
        let (mut server, irq) = server(&driver);
        let moderation = Moderation {
            max_held: 8,
            budget: Duration::from_secs(60),
        };
        server.moderate(Some(moderation)).unwrap();
        // Forty buffers, more than the ring holds at once: the ring is refilled as it drains.
        let mut signals_before = Vec::new();
        driver.submit(SIZE);
        let mut left = 40 - SIZE;
        let mem = driver.mem.clone(); // the same mapping; the closure borrows the driver
        server
            .serve(&mem, |_| {
                signals_before.push(irq.triggers());
                if left > 0 {
                    left -= 1;
                    driver.submit(1);
                }
                64
            })
            .unwrap();
        assert_eq!(signals_before.len(), 40);
        let stats = server.stats();
        assert_eq!(irq.triggers(), 8, "{stats:?}");
        assert_eq!((stats.flushed_full, stats.flushed_dry), (7, 1), "{stats:?}");
        assert_eq!(
            signals_before[1], 1,
            "the first chain's interrupt went at once"
        );
        assert_eq!(server.moderation_target(), Some(8));
        // Off again: every wanted buffer interrupts.
        server.moderate(None).unwrap();
        driver.submit(3);
        server.serve(&driver.mem, |_| 64).unwrap();
        assert_eq!(irq.triggers(), 11);
    }

    /// Moderation when completions are slow: what is held goes when the oldest reaches the
    /// budget, and `K` halves, so slow completions are not held waiting for company.
    #[test]
    fn moderation_sends_late_and_backs_off() {
        let mut driver = Driver::new(false);
        let (mut server, irq) = server(&driver);
        let moderation = Moderation {
            max_held: 8,
            budget: Duration::from_millis(2),
        };
        server.moderate(Some(moderation)).unwrap();
        driver.submit(6);
        server
            .serve(&driver.mem, |_| {
                std::thread::sleep(Duration::from_millis(3));
                64
            })
            .unwrap();
        let stats = server.stats();
        assert!(stats.flushed_late >= 1, "{stats:?}");
        assert!(server.moderation_target().unwrap() <= 2, "{stats:?}");
        // Nothing is left held: every chain's interrupt went out, at most one per chain.
        assert!(irq.triggers() >= 3 && irq.triggers() <= 6, "{stats:?}");
    }

    /// An interrupt that stamps when it is signalled.
    #[derive(Debug, Default)]
    struct Stamped(std::sync::Mutex<Vec<Instant>>);

    impl crate::device::GuestInterrupt for Stamped {
        fn trigger(&self) -> Result<bool> {
            self.0.lock().unwrap().push(Instant::now());
            Ok(true)
        }
    }

    /// Under moderation with slow completions (60 ms each, budget 50 ms), no completed
    /// request's interrupt waits past the budget: what is held goes before a chain that would
    /// end past it. Generous numbers, so only a stall of the test thread could break it.
    #[test]
    fn moderation_holds_no_interrupt_past_the_budget() {
        let mut driver = Driver::new(false);
        let stamped = Arc::new(Stamped::default());
        let notify =
            VirtQueueNotify::new(0, Notifier::new(Mode::Counter).unwrap(), stamped.clone());
        let mut server = QueueServer::new(notify, driver.queue::<Queue>());
        let budget = Duration::from_millis(50);
        server
            .moderate(Some(Moderation {
                max_held: 8,
                budget,
            }))
            .unwrap();
        driver.submit(5);
        let mut completed = Vec::new();
        server
            .serve(&driver.mem, |_| {
                std::thread::sleep(Duration::from_millis(60));
                completed.push(Instant::now());
                64
            })
            .unwrap();
        let signals = stamped.0.lock().unwrap().clone();
        for done in &completed {
            let first = signals.iter().find(|&&t| t >= *done);
            let waited = first.map(|&t| t - *done);
            assert!(
                waited.is_some_and(|w| w < budget),
                "a completion waited {waited:?} for its interrupt (budget {budget:?})"
            );
        }
    }

    /// Stopped mid-batch (`serve_at_most`): what moderation held is sent, the call says work is
    /// left, kicks stay off, and the next call serves the rest.
    #[test]
    fn stopping_mid_batch_sends_what_is_held() {
        let mut driver = Driver::new(false);
        let (mut server, irq) = server(&driver);
        server
            .moderate(Some(Moderation {
                max_held: 64,
                budget: Duration::from_secs(60),
            }))
            .unwrap();
        driver.submit(12);
        // K goes 1, 2, 4: full after chains 1 and 3; chains 4 and 5 are held until the stop.
        let (served, more) = server.serve_at_most(&driver.mem, 5, |_| 64).unwrap();
        assert_eq!((served, more), (5, true));
        assert_eq!(irq.triggers(), 3, "{:?}", server.stats());
        assert_eq!(
            (server.stats().flushed_full, server.stats().flushed_dry),
            (2, 1)
        );
        assert!(!driver.submit(0), "kicks stay off while work is left");
        let (served, more) = server.serve_at_most(&driver.mem, 100, |_| 64).unwrap();
        assert_eq!((served, more), (7, false));
        assert_eq!(driver.used_idx(), 12);
        assert!(driver.submit(0) || driver.u16_at(USED) & NO_NOTIFY == 0);
    }

    /// The device's EVENT_IDX decision (virtio-queue's `needs_notification`, through
    /// `used_added`) against the spec's `vring_need_event`, stated plainly here, over every
    /// position of the 16-bit indexes: for `used_event` anywhere, the used index starting
    /// anywhere (across the wrap) and batches of 1 to 4 used buffers before the decision.
    #[test]
    fn event_idx_decisions_match_vring_need_event_across_the_wrap() {
        let need_event = |event: u16, new: u16, old: u16| {
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        };
        let driver = Driver::new(true);
        let (mut server, irq) = server(&driver);
        let mut decisions = 0u64;
        for start in (0..=u16::MAX)
            .step_by(251)
            .chain([u16::MAX - 2, u16::MAX, 0])
        {
            for event in [
                start.wrapping_sub(1),
                start,
                start.wrapping_add(1),
                start.wrapping_add(3),
                start.wrapping_add(0x8000),
            ] {
                for batch in 1..=4u16 {
                    server.queue_mut().set_next_used(start);
                    driver.set_used_event(event);
                    for i in 0..batch {
                        server.queue_mut().add_used(&driver.mem, i, 64).unwrap();
                    }
                    let before = irq.triggers();
                    // A decision covers the buffers used since the last one.
                    server.used_added(&driver.mem).unwrap();
                    let signalled = irq.triggers() > before;
                    let new = start.wrapping_add(batch);
                    assert_eq!(
                        signalled,
                        need_event(event, new, start),
                        "used_event {event}, used index {start} -> {new}"
                    );
                    decisions += 1;
                }
            }
        }
        assert!(decisions > 5000);
    }

    /// A ring outside guest memory is a typed error naming the step, not a panic.
    #[test]
    fn a_ring_outside_memory_is_a_typed_error() {
        let driver = Driver::new(false);
        let (mut server, irq) = server(&driver);
        server
            .queue_mut()
            .set_used_ring_address(Some(0x10_0000), Some(0));
        let e = server.serve(&driver.mem, |_| 64).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Virtqueue {
                    op: "disable_notification",
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(irq.triggers(), 0);
    }

    /// A driver thread submits 20000 buffers a few at a time and kicks only when the device asks
    /// (EVENT_IDX and flags, each); the device serves on kicks alone. Every buffer is served and
    /// nothing hangs (the timeout would catch a lost wake-up), and suppression saves kicks. A
    /// stress of the whole loop; the step-by-step case above is what pins the re-check down.
    #[test]
    fn no_wake_up_is_lost_under_a_racing_driver() {
        for (event_idx, poll) in [(true, false), (false, false), (true, true), (false, true)] {
            const TOTAL: u64 = 20_000;
            let mut driver = Driver::new(event_idx);
            let (mut server, _irq) = server(&driver);
            if poll {
                server.poll(Some(Duration::from_micros(200)));
            }
            let kicks = server.notify().kicks().dup().unwrap();
            let mem = driver.mem.clone();
            let done = Arc::new(AtomicBool::new(false));
            let stop = done.clone();
            let device = std::thread::spawn(move || {
                let mut served = 0;
                while !stop.load(Ordering::Acquire) {
                    if let Ok(crate::notifier::Attempt::Done(_)) = server
                        .notify()
                        .kicks()
                        .read_timeout(Duration::from_millis(50))
                    {
                        served += server.serve(&mem, |_| 64).unwrap();
                    }
                }
                (served, server.stats())
            });
            let (mut submitted, mut kicked) = (0u64, 0u64);
            let started = Instant::now();
            while submitted < TOTAL {
                // Keep at most SIZE in flight; every other thousand requests, one at a time.
                let in_flight = driver.submitted.wrapping_sub(driver.used_idx());
                let depth = if (submitted / 1000) % 2 == 1 { 1 } else { SIZE };
                let n = depth
                    .saturating_sub(in_flight)
                    .min(3)
                    .min((TOTAL - submitted) as u16);
                if n == 0 {
                    assert!(
                        started.elapsed() < Duration::from_secs(60),
                        "a wake-up was lost"
                    );
                    std::hint::spin_loop();
                    continue;
                }
                if driver.submit(n) {
                    kicks.add(1).unwrap();
                    kicked += 1;
                }
                submitted += u64::from(n);
            }
            while driver.used_idx() != driver.submitted {
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "a wake-up was lost"
                );
                std::hint::spin_loop();
            }
            done.store(true, Ordering::Release);
            let (served, stats) = device.join().unwrap();
            eprintln!(
                "EVENT_IDX {event_idx}, polling {poll}: {served} served, {kicked} kicks, {} wake-ups, \
                 {} rechecks, {} polled",
                stats.wakeups, stats.rechecks, stats.polled
            );
            assert_eq!(served, TOTAL);
            assert!(kicked < TOTAL, "suppression saved no kick");
        }
    }
}
