//! virtio-mmio: queue notifications on `QueueNotify`, one level line behind `InterruptStatus`.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{notified_queue, Queues, VirtQueueNotify, INT_CONFIG, INT_VRING};
use super::{MMIO_INTERRUPT_ACK, MMIO_INTERRUPT_STATUS, MMIO_QUEUE_NOTIFY};
use crate::bus::Width;
use crate::device::GuestInterrupt;
use crate::error::Result;
use crate::fallback::{Backend, Placement};
use crate::kvm::{Gsi, GsiRouter, WriteMatch};
use crate::notifier::{Mode, Notifier};

/// Where a virtio-mmio device sits and what it has: the arguments of
/// [`Vm::virtio_mmio`](crate::Vm::virtio_mmio).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MmioLayout {
    /// The guest-physical base of the device's register window.
    pub base: u64,
    /// How many queues it has.
    pub queues: u16,
    /// The GSI of its interrupt line: an irqchip pin the guest programs level-triggered.
    pub gsi: Gsi,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A virtio-mmio device's interrupt: `InterruptStatus` and the level line it drives. As a
/// [`GuestInterrupt`] it is the queues' used-buffer interrupt (`VIRTIO_MMIO_INT_VRING`).
pub struct MmioInterrupt {
    line: Arc<dyn GuestInterrupt>,
    status: Mutex<u32>,
}

impl fmt::Debug for MmioInterrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmioInterrupt")
            .field("line", &self.line)
            .field("status", &self.status())
            .finish()
    }
}

impl MmioInterrupt {
    /// `InterruptStatus` over `line`, a level interrupt (a [`LevelIrqFd`](crate::LevelIrqFd),
    /// or a [`RecordingInterrupt::level`](crate::device::RecordingInterrupt::level) in a test).
    pub(crate) fn new(line: Arc<dyn GuestInterrupt>) -> Self {
        MmioInterrupt {
            line,
            status: Mutex::new(0),
        }
    }

    /// Sets `bits` in `InterruptStatus`, asserting the line if no bit was set before; returns
    /// whether a bit was newly set.
    ///
    /// While any bit is set the line is already asserted, an assertion is on its way, or a
    /// resample is (and `on_resample` re-asserts): another assertion would add nothing the guest
    /// needs, and on the kernel path, where KVM raises the line from a work queue after the
    /// write, it could land after the guest acknowledged everything — an interrupt with status 0.
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

    /// Interrupts the guest for a configuration change (`VIRTIO_MMIO_INT_CONFIG`); returns whether the
    /// bit was newly set (as [`VirtQueueNotify::trigger`]).
    ///
    /// # Errors
    ///
    /// Those of the line's [`trigger`](GuestInterrupt::trigger).
    pub fn trigger_config(&self) -> Result<bool> {
        self.trigger_status(INT_CONFIG)
    }

    /// `InterruptStatus` now.
    pub fn status(&self) -> u32 {
        *lock(&self.status)
    }

    /// The guest's write of `bits` to `InterruptACK`: clears them; with none left, the line drops.
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

/// Triggering sets `VIRTIO_MMIO_INT_VRING`. It has
/// no eventfd: a write to the line's eventfd would raise the line without setting
/// `InterruptStatus`, and the guest's driver would find nothing to do. Its line is lowered by the
/// guest's acknowledge ([`ack`](MmioInterrupt::ack)), not by the device, so it has no
/// [`level`](GuestInterrupt::level) capability of its own.
impl GuestInterrupt for MmioInterrupt {
    fn trigger(&self) -> Result<bool> {
        self.trigger_status(INT_VRING)
    }
}

/// The notification half of a virtio-mmio device: queue notifications as ioeventfds and the
/// interrupt registers. Dropping it unregisters everything.
#[derive(Debug)]
pub struct MmioNotify {
    base: u64,
    queues: Queues,
    irq: Arc<MmioInterrupt>,
    line_placement: Option<Placement>,
}

impl MmioNotify {
    /// Registers `device.queues` queue notifications at `base + 0x050` (4-byte writes, datamatch
    /// = queue index) with `backend`, and a level interrupt on `device.gsi` through `router`,
    /// where the backend's policy places it.
    ///
    /// # Errors
    ///
    /// Those of [`Backend::register`] and [`Backend::level_irqfd`].
    pub(crate) fn new(
        backend: &Backend,
        router: &GsiRouter,
        device: &MmioLayout,
    ) -> Result<MmioNotify> {
        let line = backend.level_irqfd(
            router,
            device.gsi,
            &Notifier::new(Mode::Counter)?,
            &Notifier::new(Mode::Counter)?,
        )?;
        let placement = line.placement().clone();
        let mut notify = MmioNotify::with_line(backend, device, Arc::new(line))?;
        notify.line_placement = Some(placement);
        Ok(notify)
    }

    /// As [`new`](Self::new), on `line` (`device.gsi` is not used).
    fn with_line(
        backend: &Backend,
        device: &MmioLayout,
        line: Arc<dyn GuestInterrupt>,
    ) -> Result<MmioNotify> {
        let irq = Arc::new(MmioInterrupt::new(line));
        let mut queues = Queues::default();
        for _ in 0..device.queues {
            let index = queues.len();
            let at = WriteMatch::mmio(device.base + MMIO_QUEUE_NOTIFY)
                .width(Width::W4)
                .datamatch(index.into());
            queues.add(backend, at, irq.clone())?;
        }
        Ok(MmioNotify {
            base: device.base,
            queues,
            irq,
            line_placement: None,
        })
    }

    /// Queue `index`'s notifications, if it exists.
    pub fn queue(&self, index: u16) -> Option<VirtQueueNotify> {
        self.queues.get(index)
    }

    /// Where queue `index`'s notifications are taken (kernel ioeventfd, or the backend's
    /// dispatcher, and why).
    pub fn queue_placement(&self, index: u16) -> Option<&Placement> {
        self.queues.placement(index)
    }

    /// Where the interrupt line lives.
    pub fn line_placement(&self) -> Option<&Placement> {
        self.line_placement.as_ref()
    }

    /// The device's interrupt.
    pub fn interrupt(&self) -> &Arc<MmioInterrupt> {
        &self.irq
    }

    /// A guest read at `addr`: fills `data` with `InterruptStatus` (little-endian) and returns
    /// `true` for a 4-byte read of it; returns `false` for any other address, for the VMM.
    pub(crate) fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        if addr != self.base + MMIO_INTERRUPT_STATUS || data.len() != 4 {
            return false;
        }
        data.copy_from_slice(&self.irq.status().to_le_bytes());
        true
    }

    /// A guest write at `addr` that no registration took. A 4-byte write to `InterruptACK`
    /// acknowledges the written bits; a 4-byte write to `QueueNotify` is a queue notification
    /// whose value no datamatch matched — with `VIRTIO_F_NOTIFICATION_DATA` the queue index is
    /// only its low 16 bits — and adds the kick to that queue. Returns `true` for either (a
    /// notification for a queue the device lacks is taken and dropped, as the spec lets a device
    /// do); `false` for any other address, for the VMM.
    ///
    /// # Errors
    ///
    /// Those of [`MmioInterrupt::ack`], and [`Error::Notifier`](crate::Error::Notifier) when the
    /// kick's notifier write fails.
    pub(crate) fn write(&self, addr: u64, data: &[u8]) -> Result<bool> {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return Ok(false);
        };
        if addr == self.base + MMIO_QUEUE_NOTIFY {
            if let Some(index) = notified_queue(data) {
                self.queues.kick(index)?;
            }
            return Ok(true);
        }
        if addr != self.base + MMIO_INTERRUPT_ACK {
            return Ok(false);
        }
        self.irq.ack(u32::from_le_bytes(bytes))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::RecordingInterrupt;

    /// The InterruptStatus rules, against a recording line: an assertion only when the status
    /// leaves 0, the line lowered only when the ACK clears the last bit, a resample re-asserting
    /// only while a bit is set.
    #[test]
    fn status_drives_the_line() {
        let line = Arc::new(RecordingInterrupt::level().unwrap());
        let irq = MmioInterrupt::new(line.clone());
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
        assert!(
            irq.eventfd().unwrap().is_none(),
            "InterruptStatus is the VMM's"
        );
    }
}
