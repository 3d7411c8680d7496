//! [`VirtQueueNotify`]: one queue's notifications as a device sees them, whatever the transport.

use std::fmt;
use std::sync::Arc;

use crate::device::{GuestInterrupt, QueueKicks};
use crate::error::Result;
use crate::notifier::Notifier;

/// A split virtqueue's layout in guest memory, as the driver configured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VringLayout {
    /// The queue's index.
    pub index: u16,
    /// Its size (descriptors).
    pub size: u16,
    /// Guest-physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest-physical address of the available ring.
    pub avail_ring: u64,
    /// Guest-physical address of the used ring.
    pub used_ring: u64,
}

/// One queue's notifications, device side: the kick notifier to wait on and the interrupt that
/// tells the guest of used buffers. Cheap to clone; hand clones to device threads.
#[derive(Clone)]
pub struct VirtQueueNotify {
    inner: Arc<QueueInner>,
}

struct QueueInner {
    index: u16,
    kicks: Notifier,
    interrupt: Arc<dyn GuestInterrupt>,
}

impl fmt::Debug for VirtQueueNotify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtQueueNotify")
            .field("index", &self.inner.index)
            .field("kicks", &self.inner.kicks)
            .field("interrupt", &self.inner.interrupt)
            .finish()
    }
}

impl VirtQueueNotify {
    /// Queue `index`'s notifications from their parts: the notifier the guest's kicks add to and
    /// the interrupt for used buffers. The transports make these; a device's unit test makes
    /// one with a [`RecordingInterrupt`](crate::device::RecordingInterrupt).
    pub fn new(index: u16, kicks: Notifier, interrupt: Arc<dyn GuestInterrupt>) -> Self {
        VirtQueueNotify {
            inner: Arc::new(QueueInner {
                index,
                kicks,
                interrupt,
            }),
        }
    }

    /// The queue's index.
    pub fn index(&self) -> u16 {
        self.inner.index
    }

    /// The notifier the guest's queue notifications add to (through a kernel ioeventfd, or the
    /// userspace path of the placement that registered it).
    pub fn kicks(&self) -> &Notifier {
        &self.inner.kicks
    }

    /// The queue's interrupt.
    pub fn interrupt(&self) -> &Arc<dyn GuestInterrupt> {
        &self.inner.interrupt
    }

    /// Interrupts the guest for used buffers: on virtio-mmio sets
    /// `VIRTIO_MMIO_INT_VRING` and asserts the line; on virtio-pci triggers the queue's
    /// MSI-X vector. Returns whether this asked for a new interrupt: `false` on virtio-pci for a
    /// queue with [`NO_VECTOR`](super::NO_VECTOR), and on virtio-mmio when `VIRTIO_MMIO_INT_VRING` was still
    /// set (the guest finds these buffers with the interrupt it has yet to
    /// acknowledge).
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`](crate::Error::Notifier) if the notifier write fails.
    pub fn trigger(&self) -> Result<bool> {
        self.inner.interrupt.trigger()
    }
}

impl QueueKicks for VirtQueueNotify {
    fn kicks(&self) -> &Notifier {
        &self.inner.kicks
    }
}
