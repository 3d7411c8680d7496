//! The notification half of the virtio transports: queue notifications in, used-buffer and
//! configuration-change interrupts out, for virtio-mmio and virtio-pci.
//!
//! The device side is the same for both: per queue a [`VirtQueueNotify`] with the notifier the
//! guest's queue notifications add to ([`kicks`](VirtQueueNotify::kicks)) and
//! [`trigger`](VirtQueueNotify::trigger), which signals the queue's
//! [`GuestInterrupt`]. Neither transport's device side names a concrete
//! delivery type, so a device can be unit-tested against
//! [`RecordingInterrupt`](crate::device::RecordingInterrupt) and a VMM can put its own interrupt
//! source behind a queue.
//!
//! * **virtio-mmio** ([`MmioNotify`]): one ioeventfd per queue on `QueueNotify` (offset `0x050`,
//!   4-byte writes, the queue index as datamatch), and one level interrupt line tied to
//!   `InterruptStatus` / `InterruptACK` (offsets `0x060` / `0x064`). The line is asserted while any
//!   status bit is set: `trigger` sets bit 0 (`VIRTIO_MMIO_INT_VRING`) and asserts, an ACK clears the
//!   bits it names and, when none is left, the line drops; an ACK that leaves a bit set keeps it
//!   asserted, so the guest takes another interrupt. The VMM routes the guest's accesses to
//!   `QueueNotify`..`InterruptACK` to an [`IoRegion::mmio_notify`](crate::io::IoRegion::mmio_notify)
//!   in its `IoManager`; the device's
//!   loop passes resample wake-ups to [`StatusLine::on_resample`].
//! * **virtio-pci** ([`PciNotify`]): each queue's notify address is `notify_base +
//!   queue_notify_off * notify_off_multiplier`, and each queue's interrupt is the MSI-X vector
//!   the guest picked in `queue_msix_vector` (`0xFFFF`, [`NO_VECTOR`], raises nothing), raised on
//!   the function's [`MsixVectors`](crate::msix::MsixVectors); the configuration-change vector
//!   likewise. A queue with an address of its own takes any write there, of any width and value
//!   ([`Width::Any`](crate::Width::Any), no datamatch: KVM's fastest MMIO ioeventfd, and the
//!   only one that catches `VIRTIO_F_NOTIFICATION_DATA` writes); queues that share an address
//!   (multiplier 0) are told apart by a 2-byte datamatch on the index. A function given an INTx
//!   GSI ([`PciLayout::intx`]) interrupts there while the driver leaves MSI-X disabled: the ISR
//!   status is a [`StatusLine`] like virtio-mmio's, set by `trigger` and read (and cleared) by
//!   the guest through [`PciNotify::read_isr`].
//!
//! **`VIRTIO_F_NOTIFICATION_DATA`** (feature bit 38): the driver's notify write
//! becomes 32 bits, the queue index in the low 16 and the next available position above, so a
//! datamatch on the index misses it and the write exits to the VMM. Both transports take such a
//! write where it lands — their [`IoRegion`](crate::io::IoRegion)s read the queue from its low 16
//! bits and add the kick — so no kick is lost whichever features the driver negotiates:
//! on virtio-pci with an address per queue it never exits; on virtio-mmio, and at a shared
//! virtio-pci address, each such kick costs an exit.
//!
//! Coalescing, as the virtio spec allows it: used-buffer notifications are not counted. On
//! virtio-mmio a `trigger` while bit 0 is still set (not yet acknowledged) adds no interrupt;
//! on virtio-pci the vector's irqfd coalesces writes made before its injection. A driver must
//! therefore process every used buffer per interrupt, which virtio drivers do.

#[cfg(feature = "kvm")]
mod mmio;
#[cfg(feature = "kvm")]
mod pci;
mod queue;
#[cfg(feature = "virtio-queue")]
mod serve;
#[cfg(feature = "kvm")]
mod status;

#[cfg(feature = "kvm")]
use std::sync::Arc;

#[cfg(feature = "kvm")]
use crate::device::GuestInterrupt;
#[cfg(feature = "kvm")]
use crate::error::Result;
#[cfg(feature = "kvm")]
use crate::fallback::{Backend, IoEvent, Placement};
#[cfg(feature = "kvm")]
use crate::kvm::WriteMatch;
#[cfg(feature = "kvm")]
use crate::notifier::{Mode, Notifier};

#[cfg(feature = "kvm")]
#[cfg_attr(docsrs, doc(cfg(feature = "kvm")))]
pub use mmio::{MmioLayout, MmioNotify};
#[cfg(feature = "kvm")]
#[cfg_attr(docsrs, doc(cfg(feature = "kvm")))]
pub use pci::{PciLayout, PciNotify, PciNotifyState, PciQueueState};
pub use queue::{VirtQueueNotify, VringLayout};
#[cfg(feature = "virtio-queue")]
pub use serve::{Moderation, QueueServer, ServeStats};
#[cfg(feature = "kvm")]
#[cfg_attr(docsrs, doc(cfg(feature = "kvm")))]
pub use status::StatusLine;

// The virtio constants this crate's transports use, from virtio-bindings (devices and VMMs take
// them from there too).
#[cfg(feature = "kvm")]
pub(crate) const MMIO_QUEUE_NOTIFY: u64 = virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
#[cfg(feature = "kvm")]
pub(crate) const MMIO_INTERRUPT_STATUS: u64 = virtio_mmio::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
#[cfg(feature = "kvm")]
pub(crate) const MMIO_INTERRUPT_ACK: u64 = virtio_mmio::VIRTIO_MMIO_INTERRUPT_ACK as u64;
#[cfg(feature = "kvm")]
pub(crate) const INT_VRING: u32 = virtio_mmio::VIRTIO_MMIO_INT_VRING;
#[cfg(feature = "kvm")]
pub(crate) const INT_CONFIG: u32 = virtio_mmio::VIRTIO_MMIO_INT_CONFIG;
#[cfg(feature = "kvm")]
use virtio_bindings::virtio_mmio;

/// virtio-pci `queue_msix_vector` / `config_msix_vector` value for "no vector"
/// (`VIRTIO_MSI_NO_VECTOR`, which virtio-bindings does not carry).
pub const NO_VECTOR: u16 = 0xffff;

#[cfg(feature = "kvm")]
/// The queue a notify write names: its low 16 bits, with `VIRTIO_F_NOTIFICATION_DATA` or without
/// (without it the write is the index alone). `None` for a write of another size than 2 or 4
/// bytes.
fn notified_queue(data: &[u8]) -> Option<u16> {
    match *data {
        [a, b] | [a, b, _, _] => Some(u16::from_le_bytes([a, b])),
        _ => None,
    }
}

#[cfg(feature = "kvm")]
/// A device's queues: the device-side handles and their notify registrations, index for index.
#[derive(Debug, Default)]
struct Queues {
    handles: Vec<VirtQueueNotify>,
    registrations: Vec<IoEvent>,
}

#[cfg(feature = "kvm")]
impl Queues {
    /// Registers the next queue's notifications, the guest writes `at` describes, with
    /// `backend`; its used buffers go to `interrupt`.
    fn add(
        &mut self,
        backend: &Backend,
        at: WriteMatch,
        interrupt: Arc<dyn GuestInterrupt>,
    ) -> Result<()> {
        let index = self.handles.len() as u16;
        let kicks = Notifier::new(Mode::Counter)?;
        self.registrations.push(backend.register(at, &kicks)?);
        self.handles
            .push(VirtQueueNotify::new(index, kicks, interrupt));
        Ok(())
    }

    /// A queue notification no registration took, for queue `index`: adds 1 to its kicks, as
    /// an ioeventfd would have. Returns `false` for a queue that does not exist.
    fn kick(&self, index: u16) -> Result<bool> {
        let Some(queue) = self.handles.get(usize::from(index)) else {
            return Ok(false);
        };
        queue.kicks().notify()?;
        Ok(true)
    }

    fn write_match(&self, index: u16) -> Option<WriteMatch> {
        self.registrations
            .get(usize::from(index))
            .map(IoEvent::write_match)
    }

    fn len(&self) -> u16 {
        self.handles.len() as u16
    }

    fn get(&self, index: u16) -> Option<VirtQueueNotify> {
        self.handles.get(usize::from(index)).cloned()
    }

    fn placement(&self, index: u16) -> Option<&Placement> {
        self.registrations
            .get(usize::from(index))
            .map(IoEvent::placement)
    }
}
