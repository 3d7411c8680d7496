//! A virtio entropy device (virtio-rng, one request queue) written against vm-notify's device
//! contract alone, the way a device crate would be: it depends on `vm-notify` with
//! `default-features = false`, so kvm-ioctls, kvm-bindings and every KVM registration stay out
//! of its tree. The VMM hands it a [`VirtQueueNotify`] (its kicks and its interrupt: an edge
//! irqfd or an MSI-X vector, or the VMM's own source) and it serves the queue with
//! [`QueueServer`], which suppresses kicks and interrupts as the driver asks. (A virtio-mmio
//! device on a level line also waits on the line's resample notifier and re-asserts while
//! `InterruptStatus` is set, `StatusLine::on_resample`; that loop is the transport's, outside
//! the contract this crate uses.)
//!
//! Its tests run without `/dev/kvm`: virtio-queue's mock rings stand in for the driver and
//! vm-notify's `RecordingInterrupt` (feature `test-utils`) for the interrupt.

#![deny(missing_docs, missing_debug_implementations)]

use std::fmt;
use std::io::Read;

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestMemory};
use vm_notify::virtio::{QueueServer, ServeStats, VirtQueueNotify};
use vm_notify::wait::{EventLoop, Wake};
use vm_notify::Result;

/// The virtio device ID of an entropy source.
pub const VIRTIO_ID_RNG: u32 = 4;

/// What the device did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RngStats {
    /// Bytes written into the driver's buffers.
    pub bytes: u64,
    /// What the queue server did: wake-ups, chains, interrupts, suppressed interrupts.
    pub queue: ServeStats,
}

/// A virtio-rng device: fills every writable buffer the driver makes available from `source`.
pub struct RngDevice<R> {
    server: QueueServer,
    source: R,
    bytes: u64,
}

impl<R> fmt::Debug for RngDevice<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RngDevice")
            .field("server", &self.server)
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl<R: Read> RngDevice<R> {
    /// A device serving `queue` (configured and ready, as the driver set it up) with `notify`'s
    /// kicks and interrupt, reading entropy from `source`.
    pub fn new(notify: VirtQueueNotify, queue: Queue, source: R) -> Self {
        RngDevice {
            server: QueueServer::new(notify, queue),
            source,
            bytes: 0,
        }
    }

    /// One wake-up: serves every available request, interrupting where the driver wants it.
    /// Returns the requests completed. A buffer the source cannot fill is returned with the
    /// bytes written so far, as the virtio spec lets an entropy device do.
    ///
    /// # Errors
    ///
    /// Those of [`QueueServer::serve`]: rings that cannot be read or written, an interrupt that
    /// cannot be triggered.
    pub fn serve<M: GuestMemory>(&mut self, mem: &M) -> Result<u64> {
        let (source, bytes) = (&mut self.source, &mut self.bytes);
        self.server.serve(mem, |chain| {
            let mut written = 0u32;
            let mut buf = [0u8; 256];
            for desc in chain.writable() {
                let mut left = desc.len();
                let mut addr = desc.addr();
                while left > 0 {
                    let n = left.min(buf.len() as u32) as usize;
                    // A chain's used length is a u32: buffers past it (aliased, from a driver
                    // that lists one buffer many times) are not filled.
                    let Some(total) = written.checked_add(n as u32) else {
                        *bytes += u64::from(written);
                        return written;
                    };
                    if source.read_exact(&mut buf[..n]).is_err()
                        || mem.write_slice(&buf[..n], addr).is_err()
                    {
                        *bytes += u64::from(written);
                        return written;
                    }
                    written = total;
                    left -= n as u32;
                    addr = vm_memory::GuestAddress(addr.0 + n as u64);
                }
            }
            *bytes += u64::from(written);
            written
        })
    }

    /// Serves until `events` is stopped, waking on the queue's kicks: the device thread's whole
    /// loop. The VMM owns the thread and the loop; [`EventLoop::stop_handle`] stops it.
    ///
    /// # Errors
    ///
    /// Those of [`serve`](Self::serve) and of the event loop.
    pub fn run<M: GuestMemory>(&mut self, mem: &M, events: &EventLoop) -> Result<RngStats> {
        const KICK: u64 = 0;
        events.add(KICK, self.server.notify().kicks())?;
        let mut ready = Vec::new();
        loop {
            if let Wake::Stopped = events.wait(None, &mut ready)? {
                return Ok(self.stats());
            }
            if !ready.is_empty() {
                self.serve(mem)?;
            }
        }
    }

    /// What the device did so far.
    pub fn stats(&self) -> RngStats {
        RngStats {
            bytes: self.bytes,
            queue: self.server.stats(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};
    use vm_notify::device::RecordingInterrupt;
    use vm_notify::{Mode, Notifier, QueueKicks};

    use super::*;

    const VRING_DESC_F_WRITE: u16 = 2;

    /// A driver's side: guest memory, a 16-entry queue at 0 and `buffers` writable buffers of
    /// `len` bytes each at 1 MiB and up, made available.
    fn driver(
        buffers: u16,
        len: u32,
    ) -> (GuestMemoryMmap, MockSplitQueue<'static, GuestMemoryMmap>) {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap(),
        ));
        let queue = MockSplitQueue::new(mem, 16);
        let descs: Vec<RawDescriptor> = (0..buffers)
            .map(|i| {
                let addr = 0x10_0000 + u64::from(i) * 0x1000;
                RawDescriptor::from(Descriptor::new(addr, len, VRING_DESC_F_WRITE, 0))
            })
            .collect();
        queue.add_desc_chains(&descs, 0).unwrap();
        (mem.clone(), queue)
    }

    fn device(
        queue: &MockSplitQueue<'static, GuestMemoryMmap>,
        irq: Arc<RecordingInterrupt>,
    ) -> RngDevice<std::io::Repeat> {
        let notify = VirtQueueNotify::new(0, Notifier::new(Mode::Counter).unwrap(), irq);
        let queue: Queue = queue.create_queue().unwrap();
        RngDevice::new(notify, queue, std::io::repeat(0xa5))
    }

    #[test]
    fn fills_every_buffer_and_interrupts_once_per_wake_up() {
        let (mem, driver) = driver(3, 512);
        let irq = Arc::new(RecordingInterrupt::edge().unwrap());
        let mut rng = device(&driver, irq.clone());
        // The guest's kick, as its ioeventfd would have added it:
        rng.server.notify().kicks().notify().unwrap();
        assert_eq!(rng.server.notify().kicks().read().unwrap(), 1);
        assert_eq!(rng.serve(&mem).unwrap(), 3);
        let mut page = [0u8; 512];
        mem.read_slice(&mut page, GuestAddress(0x10_2000)).unwrap();
        assert!(
            page.iter().all(|&b| b == 0xa5),
            "the third buffer is filled"
        );
        assert_eq!(driver.used().idx().load(), 3);
        let stats = rng.stats();
        assert_eq!((stats.bytes, stats.queue.chains), (3 * 512, 3));
        // Without EVENT_IDX and with interrupts wanted, each used buffer interrupts.
        assert_eq!(irq.triggers(), stats.queue.interrupts);
        assert_eq!(irq.triggers(), 3);
    }

    #[test]
    fn a_driver_that_wants_no_interrupt_gets_none() {
        let (mem, driver) = driver(2, 64);
        // The available ring's flags are its first 16 bits.
        mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, driver.avail_addr())
            .unwrap();
        let irq = Arc::new(RecordingInterrupt::edge().unwrap());
        let mut rng = device(&driver, irq.clone());
        assert_eq!(rng.serve(&mem).unwrap(), 2);
        assert_eq!((irq.triggers(), rng.stats().queue.suppressed), (0, 2));
    }

    #[test]
    fn a_wake_up_with_nothing_available_interrupts_nothing() {
        let (mem, driver) = driver(0, 0);
        let irq = Arc::new(RecordingInterrupt::edge().unwrap());
        let mut rng = device(&driver, irq.clone());
        assert_eq!(rng.serve(&mem).unwrap(), 0);
        assert_eq!(irq.triggers(), 0);
    }

    #[test]
    fn the_device_loop_serves_kicks_until_stopped() {
        let (mem, driver) = driver(4, 32);
        let irq = Arc::new(RecordingInterrupt::edge().unwrap());
        let mut rng = device(&driver, irq.clone());
        let kicks = rng.server.notify().kicks().clone();
        let events = EventLoop::new().unwrap();
        let stop = events.stop_handle();
        let stats = std::thread::scope(|s| {
            let served = s.spawn(|| rng.run(&mem, &events).unwrap());
            kicks.notify().unwrap();
            // Stop once the device has served the kick (its interrupts are the sign); a device
            // that never does fails here rather than hanging the test.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while irq.triggers() < 4 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the device served no kick"
                );
                std::thread::yield_now();
            }
            stop.stop().unwrap();
            served.join().unwrap()
        });
        assert_eq!((stats.queue.chains, stats.bytes), (4, 4 * 32));
        assert_eq!(
            kicks.kicks().try_read().unwrap(),
            vm_notify::Attempt::WouldBlock
        );
    }
}
