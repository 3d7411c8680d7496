//! virtio-mmio: queue notifications on `QueueNotify`, one level line behind `InterruptStatus`.

use std::sync::Arc;

use super::{notified_queue, Queues, StatusLine, VirtQueueNotify};
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

/// The notification half of a virtio-mmio device: queue notifications as ioeventfds and the
/// interrupt registers. Dropping it unregisters everything.
#[derive(Debug)]
pub struct MmioNotify {
    base: u64,
    queues: Queues,
    irq: Arc<StatusLine>,
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
        let irq = Arc::new(StatusLine::new(line));
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
    pub fn interrupt(&self) -> &Arc<StatusLine> {
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
    /// Those of [`StatusLine::ack`], and [`Error::Notifier`](crate::Error::Notifier) when the
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
