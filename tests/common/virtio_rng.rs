//! A virtio entropy device (virtio-rng, one request queue per `VirtQueueNotify`) served with the
//! rust-vmm `virtio-queue` crate, notified through vm-notify. Shared by `tests/virtio.rs` and
//! `examples/virtio_backend.rs`.

use std::fs::File;
use std::io::Read;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vm_notify::virtio::{StatusLine, VirtQueueNotify};
use vm_notify::wait::{EventLoop, StopHandle};
use vm_notify_testkit::SplitQueue;

/// What the device did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RngStats {
    /// Descriptor chains completed, per queue.
    pub requests: Vec<u64>,
    /// Bytes written into guest buffers.
    pub bytes: u64,
    /// Guest notifications read from the kick notifiers (after coalescing).
    pub kicks: u64,
    /// Kick wake-ups: how many times a kick notifier was found written.
    pub wakeups: u64,
    /// `trigger` calls, and how many asked for a new interrupt.
    pub signals: u64,
    /// Of `signals`, those that asked for a new interrupt (see `VirtQueueNotify::trigger`).
    pub new_interrupts: u64,
    /// Resample wake-ups, and those that re-asserted the line.
    pub resamples: u64,
    /// Re-assertions after a resample.
    pub reasserts: u64,
}

impl RngStats {
    /// Checks the guest's interrupts against the device's signals, given how many the guest took
    /// (`guest_irqs`), how many of those read InterruptStatus 0 (`zero_reads`), whether INT_VRING
    /// was still set when the guest exited (`untaken`: due, not waited for), and whether the
    /// line's assertions can land late (`late_assertions`: a kernel irqfd). Returns what
    /// disagrees.
    ///
    /// Interrupts that found a bit set: exactly one per signal that set INT_VRING anew (a signal
    /// while it was still set is coalesced into the interrupt not yet acknowledged, as the virtio
    /// spec allows), but for the one left untaken. Interrupts that found 0: none where the ACK
    /// lowers the line and takes back an assertion not yet made, under the status lock (the
    /// injector). KVM raises a pin from a work queue after the irqfd write, so there a
    /// re-assertion decided at a resample while a bit was set can land after the guest
    /// acknowledged that bit: each such interrupt needs one, so there are at most as many as
    /// re-assertions (plus the untaken one). A driver reads 0 and returns (Linux's virtio-mmio
    /// handler returns `IRQ_NONE`).
    pub fn check_interrupts(
        &self,
        guest_irqs: u64,
        zero_reads: u64,
        untaken: bool,
        late_assertions: bool,
    ) -> Result<(), String> {
        let untaken = u64::from(untaken);
        let allowed = if late_assertions {
            self.reasserts + untaken
        } else {
            0
        };
        if zero_reads > allowed.min(guest_irqs) {
            return Err(format!(
                "{zero_reads} interrupts found InterruptStatus 0; at most {allowed} can"
            ));
        }
        if guest_irqs - zero_reads + untaken != self.new_interrupts {
            return Err(format!(
                "{guest_irqs} interrupts ({zero_reads} with status 0, {untaken} untaken) for {} signals that set INT_VRING anew",
                self.new_interrupts
            ));
        }
        if self.new_interrupts > self.signals {
            return Err(format!(
                "{} new interrupts from {} signals",
                self.new_interrupts, self.signals
            ));
        }
        Ok(())
    }
}

/// The device's view of a queue the guest laid out with `SplitQueue`: its size and ring
/// addresses, EVENT_IDX as the driver negotiated it, ready.
pub fn device_queue(layout: &SplitQueue, event_idx: bool) -> Queue {
    let mut q = Queue::new(layout.size()).unwrap();
    q.set_size(layout.size());
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(layout.desc_table());
    q.set_desc_table_address(lo, hi);
    let (lo, hi) = split(layout.avail_ring());
    q.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(layout.used_ring());
    q.set_used_ring_address(lo, hi);
    q.set_event_idx(event_idx);
    q.set_ready(true);
    q
}

/// Token of the interrupt's resample notifier in the device's event loop.
const RESAMPLE: u64 = u64::MAX - 1;

/// A virtio-rng device over `queues` (each with its guest-side layout).
pub struct RngDevice {
    mem: GuestMemoryMmap,
    queues: Vec<(VirtQueueNotify, Queue)>,
    irq: Option<Arc<StatusLine>>,
    random: File,
    stats: RngStats,
}

impl RngDevice {
    /// A device serving `queues`, as a driver that laid them out with `SplitQueue` configured them.
    pub fn new(
        mem: GuestMemoryMmap,
        queues: &[(VirtQueueNotify, SplitQueue)],
        irq: Option<Arc<StatusLine>>,
    ) -> RngDevice {
        let queues: Vec<_> = queues
            .iter()
            .map(|(notify, layout)| (notify.clone(), device_queue(layout, false)))
            .collect();
        let n = queues.len();
        RngDevice {
            mem,
            queues,
            irq,
            random: File::open("/dev/urandom").unwrap(),
            stats: RngStats {
                requests: vec![0; n],
                ..RngStats::default()
            },
        }
    }

    /// Serves on a thread of its own until the returned handle stops it; joining the thread gives
    /// what it did.
    pub fn spawn(self) -> (StopHandle, JoinHandle<RngStats>) {
        let events = EventLoop::new().unwrap();
        let stop = events.stop_handle();
        (stop, thread::spawn(move || self.run(&events)))
    }

    /// Serves until `events` is stopped; returns what it did.
    fn run(mut self, events: &EventLoop) -> RngStats {
        for (i, (notify, _)) in self.queues.iter().enumerate() {
            events.add(i as u64, notify.kicks()).unwrap();
        }
        if let Some(irq) = &self.irq {
            events.add(RESAMPLE, irq.resample().unwrap()).unwrap();
        }
        events
            .run(|token, count| {
                if token == RESAMPLE {
                    self.stats.resamples += count;
                    if self.irq.as_ref().unwrap().on_resample()? {
                        self.stats.reasserts += 1;
                    }
                } else {
                    self.stats.kicks += count;
                    self.stats.wakeups += 1;
                    self.serve(token as usize);
                }
                Ok(())
            })
            .unwrap();
        self.stats
    }

    /// Fills every available chain of queue `i`, then signals once if any was used.
    fn serve(&mut self, i: usize) {
        let mut used = 0;
        let mut buf = [0u8; 4096];
        let (notify, queue) = &mut self.queues[i];
        while let Some(chain) = queue.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            let mut len = 0u32;
            for desc in chain.writable() {
                let n = desc.len() as usize;
                self.random.read_exact(&mut buf[..n]).unwrap();
                self.mem.write_slice(&buf[..n], desc.addr()).unwrap();
                len += desc.len();
            }
            queue.add_used(&self.mem, head, len).unwrap();
            self.stats.requests[i] += 1;
            self.stats.bytes += u64::from(len);
            used += 1;
        }
        if used > 0 {
            self.stats.signals += 1;
            if notify.trigger().unwrap() {
                self.stats.new_interrupts += 1;
            }
        }
    }
}
