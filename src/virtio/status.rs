//! A virtio interrupt status register and the level line it holds asserted: virtio-mmio's
//! `InterruptStatus` / `InterruptACK`, and virtio-pci's ISR status behind the function's INTx pin.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{INT_CONFIG, INT_VRING};
use crate::device::GuestInterrupt;
use crate::error::Result;
use crate::notifier::Notifier;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A virtio device's interrupt status and the level line asserted while any of its bits is set:
/// bit 0 for used buffers (`VIRTIO_MMIO_INT_VRING`, `VIRTIO_PCI_ISR_QUEUE`), bit 1 for a
/// configuration change (`VIRTIO_MMIO_INT_CONFIG`, `VIRTIO_PCI_ISR_CONFIG`). The same register on
/// both transports; only the guest's way of clearing it differs: virtio-mmio writes the bits to
/// `InterruptACK` ([`ack`](Self::ack)), virtio-pci reads the ISR, which clears it
/// ([`take`](Self::take)).
///
/// As a [`GuestInterrupt`] it is the queues' used-buffer interrupt (it sets bit 0). The device's
/// loop waits on [`resample`](Self::resample) and calls [`on_resample`](Self::on_resample), which
/// asserts the line again while a bit is still set.
pub struct StatusLine {
    line: Arc<dyn GuestInterrupt>,
    status: Mutex<u32>,
}

impl fmt::Debug for StatusLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatusLine")
            .field("line", &self.line)
            .field("status", &self.status())
            .finish()
    }
}

impl StatusLine {
    /// The status register over `line`, a level interrupt (a [`LevelIrqFd`](crate::LevelIrqFd),
    /// or a [`RecordingInterrupt::level`](crate::device::RecordingInterrupt::level) in a test).
    pub(crate) fn new(line: Arc<dyn GuestInterrupt>) -> Self {
        StatusLine {
            line,
            status: Mutex::new(0),
        }
    }

    /// Sets `bits`, asserting the line if no bit was set before; returns whether a bit was newly
    /// set.
    ///
    /// While any bit is set the line is already asserted, an assertion is on its way, or a
    /// resample is (and `on_resample` re-asserts): another assertion would add nothing the guest
    /// needs, and on the kernel path, where KVM raises the line from a work queue after the
    /// write, it could land after the guest cleared everything — an interrupt with status 0.
    ///
    /// # Errors
    ///
    /// Those of the line's [`trigger`](GuestInterrupt::trigger).
    pub(crate) fn trigger_status(&self, bits: u32) -> Result<bool> {
        let mut status = lock(&self.status);
        let new = *status & bits != bits;
        let was_clear = *status == 0;
        *status |= bits;
        if was_clear {
            self.line.trigger()?;
        }
        Ok(new)
    }

    /// Interrupts the guest for a configuration change (bit 1); returns whether the bit was newly
    /// set (as [`VirtQueueNotify::trigger`](super::VirtQueueNotify::trigger)).
    ///
    /// # Errors
    ///
    /// Those of the line's [`trigger`](GuestInterrupt::trigger).
    pub fn trigger_config(&self) -> Result<bool> {
        self.trigger_status(INT_CONFIG)
    }

    /// The status bits now.
    pub fn status(&self) -> u32 {
        *lock(&self.status)
    }

    /// The guest's write of `bits` to virtio-mmio's `InterruptACK`: clears them; with none left,
    /// the line drops.
    ///
    /// # Errors
    ///
    /// Those of the line's [`deassert`](crate::device::LevelInterrupt::deassert).
    pub fn ack(&self, bits: u32) -> Result<()> {
        let mut status = lock(&self.status);
        *status &= !bits;
        if let (0, Some(line)) = (*status, self.line.level()) {
            line.deassert()?;
        }
        Ok(())
    }

    /// The guest's read of virtio-pci's ISR status: returns the bits and clears them, and the
    /// line drops (virtio 1.2, 4.1.4.5: the read resets the status and de-asserts INTx).
    ///
    /// # Errors
    ///
    /// Those of the line's [`deassert`](crate::device::LevelInterrupt::deassert); the bits are
    /// cleared even then (the guest has read them).
    pub fn take(&self) -> Result<u32> {
        let mut status = lock(&self.status);
        let bits = std::mem::take(&mut *status);
        if let (true, Some(line)) = (bits != 0, self.line.level()) {
            line.deassert()?;
        }
        Ok(bits)
    }

    /// The notifier signalled when the line was lowered (at the guest's EOI on a kernel irqfd);
    /// the device's loop waits on it and calls [`on_resample`](Self::on_resample). `None` only
    /// for a line that is not level-triggered.
    pub fn resample(&self) -> Option<&Notifier> {
        self.line.level().map(|l| l.resample())
    }

    /// After a resample: asserts the line again if a status bit is still set. Returns whether it
    /// did. Reads nothing from the resample notifier; the caller's wait did.
    ///
    /// # Errors
    ///
    /// Those of the line's [`trigger`](GuestInterrupt::trigger).
    pub fn on_resample(&self) -> Result<bool> {
        let status = lock(&self.status);
        if *status == 0 {
            return Ok(false);
        }
        self.line.trigger()
    }
}

/// Triggering sets bit 0 (used buffers). It has no eventfd: a write to the line's eventfd would
/// raise the line without setting the status, and the guest's driver would find nothing to do.
/// Its line is lowered by the guest's acknowledge or ISR read, not by the device, so it has no
/// [`level`](GuestInterrupt::level) capability of its own.
impl GuestInterrupt for StatusLine {
    fn trigger(&self) -> Result<bool> {
        self.trigger_status(INT_VRING)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::RecordingInterrupt;

    /// The status rules, against a recording line: an assertion only when the status leaves 0,
    /// the line lowered only when the ACK clears the last bit, a resample re-asserting only while
    /// a bit is set.
    #[test]
    fn status_drives_the_line() {
        let line = Arc::new(RecordingInterrupt::level().unwrap());
        let irq = StatusLine::new(line.clone());
        assert!(irq.trigger_status(INT_VRING).unwrap());
        assert!(!irq.trigger_status(INT_VRING).unwrap(), "already set");
        assert!(irq.trigger_config().unwrap());
        assert_eq!(line.triggers(), 1, "one assertion while any bit is set");
        irq.ack(INT_VRING).unwrap();
        assert_eq!(line.deasserts(), 0, "INT_CONFIG still set");
        assert!(irq.on_resample().unwrap());
        assert_eq!(line.triggers(), 2);
        irq.ack(INT_CONFIG).unwrap();
        assert_eq!(line.deasserts(), 1);
        assert!(!irq.on_resample().unwrap());
        assert_eq!(line.triggers(), 2);
        assert!(irq.resample().is_some());
        assert!(irq.eventfd().unwrap().is_none(), "the status is the VMM's");
    }

    /// virtio-pci's ISR read: it returns every bit set and clears them all, lowering the line
    /// once; a read of 0 lowers nothing; the next trigger asserts again.
    #[test]
    fn an_isr_read_takes_every_bit() {
        let line = Arc::new(RecordingInterrupt::level().unwrap());
        let irq = StatusLine::new(line.clone());
        assert_eq!(irq.take().unwrap(), 0);
        assert_eq!(line.deasserts(), 0, "nothing to lower");
        irq.trigger().unwrap();
        irq.trigger_config().unwrap();
        assert_eq!(irq.take().unwrap(), INT_VRING | INT_CONFIG);
        assert_eq!((irq.status(), line.deasserts()), (0, 1));
        assert!(!irq.on_resample().unwrap(), "nothing left to re-assert");
        assert!(irq.trigger().unwrap());
        assert_eq!(line.triggers(), 2);
    }
}
