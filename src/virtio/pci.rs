//! virtio-pci (modern): per-queue notify addresses, per-queue MSI-X vectors.

use std::fmt;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use std::collections::HashMap;

use super::{
    notified_queue, Queues, StatusLine, VirtQueueNotify, INT_CONFIG, INT_VRING, NO_VECTOR,
};
use crate::bus::{IoEventAddress, Width};
use crate::device::GuestInterrupt;
use crate::error::{Capability, Error, Result};
use crate::fallback::{Backend, Placement};
use crate::kvm::{Gsi, GsiRouter, WriteMatch};
use crate::msix::{MsixState, MsixVectors, WeakVectors, MSIX_ENABLE};
use crate::notifier::{Mode, Notifier};

/// Where a virtio-pci function's queues are notified: the arguments of
/// [`Vm::virtio_pci`](crate::Vm::virtio_pci), as the notify capability
/// and the common configuration state them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PciLayout {
    /// The guest-physical address of the notify region (`cap.offset` within its BAR, plus the
    /// BAR's address).
    pub notify_base: u64,
    /// The capability's `notify_off_multiplier`.
    pub notify_off_multiplier: u32,
    /// Each queue's `queue_notify_off`, queue 0 first.
    pub queue_notify_off: Vec<u16>,
    /// The GSI the function's INTx pin is routed to (its ACPI `_PRT` entry), for a driver that
    /// leaves MSI-X disabled (Linux booted with `pci=nomsi`, a guest without MSI-X support):
    /// while MSI-X is disabled, a queue's or the configuration's interrupt sets the ISR status
    /// and asserts this level line, which the guest's ISR read lowers ([`PciNotify::read_isr`]).
    /// `None`: MSI-X only; with MSI-X disabled an interrupt then sets its vector's pending bit.
    pub intx: Option<Gsi>,
}

impl PciLayout {
    /// The address queue `off`'s notifications land at.
    fn address(&self, off: u16) -> Result<u64> {
        u64::from(off)
            .checked_mul(self.notify_off_multiplier.into())
            .and_then(|o| self.notify_base.checked_add(o))
            .ok_or(Error::AddressWraps {
                addr: IoEventAddress::Mmio(self.notify_base),
                width: 2,
            })
    }
}

/// A virtio-pci queue's interrupt: the MSI-X vector the guest chose in `queue_msix_vector`
/// (or `config_msix_vector`), triggered on the function's vectors; while MSI-X is disabled, the
/// ISR bit `isr_bit` on the INTx line, if the function has one. It does not keep the vectors:
/// a device thread's queue handle outliving the device does not keep its irqfds and routes.
pub(crate) struct QueueVector {
    vectors: WeakVectors,
    vector: AtomicU16,
    intx: Option<Arc<StatusLine>>,
    isr_bit: u32,
}

impl fmt::Debug for QueueVector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueVector")
            .field("vector", &self.vector())
            .finish()
    }
}

impl QueueVector {
    fn new(vectors: &MsixVectors, intx: Option<&Arc<StatusLine>>, isr_bit: u32) -> Self {
        QueueVector {
            vectors: vectors.downgrade(),
            vector: AtomicU16::new(NO_VECTOR),
            intx: intx.cloned(),
            isr_bit,
        }
    }

    /// The INTx line, while it is the function's interrupt (it has one and MSI-X is disabled).
    fn intx_now(&self) -> Result<Option<&StatusLine>> {
        let Some(intx) = &self.intx else {
            return Ok(None);
        };
        let msix = self.vectors()?.message_control() & MSIX_ENABLE != 0;
        Ok((!msix).then_some(intx.as_ref()))
    }

    /// The function's vectors, or [`Error::Unplugged`] once their owners dropped them.
    fn vectors(&self) -> Result<MsixVectors> {
        self.vectors.upgrade().ok_or(Error::Unplugged {
            what: "the virtio-pci function's MSI-X vectors",
        })
    }

    /// The vector now ([`NO_VECTOR`] for none).
    pub(crate) fn vector(&self) -> u16 {
        self.vector.load(Ordering::Acquire)
    }

    /// The guest's write of the vector register; returns what it reads back: `vector` when the
    /// function has it, otherwise [`NO_VECTOR`] (the spec's way of refusing a mapping).
    fn set(&self, vector: u16) -> u16 {
        let value = if usize::from(vector) < self.vectors.len() {
            vector
        } else {
            NO_VECTOR
        };
        self.vector.store(value, Ordering::Release);
        value
    }
}

impl GuestInterrupt for QueueVector {
    /// Triggers the vector; `false` without one ([`NO_VECTOR`]). While MSI-X is disabled on a
    /// function with INTx, sets the ISR bit instead (`false` when it was set already).
    /// [`Error::Unplugged`] once the device's vectors are gone.
    fn trigger(&self) -> Result<bool> {
        if let Some(intx) = self.intx_now()? {
            return intx.trigger_status(self.isr_bit);
        }
        match self.vector() {
            NO_VECTOR => Ok(false),
            v => self.vectors()?.trigger(v.into()).map(|()| true),
        }
    }

    /// The current vector's eventfd; `None` for [`NO_VECTOR`], and on INTx (a write to the
    /// line's eventfd would raise it without the ISR bit the guest's handler looks for).
    fn eventfd(&self) -> Result<Option<Notifier>> {
        if self.intx_now()?.is_some() {
            return Ok(None);
        }
        match self.vector() {
            NO_VECTOR => Ok(None),
            v => self.vectors()?.notifier(v.into()).map(Some),
        }
    }
}

/// One queue's part of a [`PciNotifyState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PciQueueState {
    /// The guest writes its registration took. For the record: a restore registers from the
    /// layout again, which gives the same match unless the new host lacks
    /// `KVM_CAP_IOEVENTFD_ANY_LENGTH`.
    pub write: WriteMatch,
    /// Its `queue_msix_vector`.
    pub vector: u16,
    /// Guest notifications in its kick counter that the device had not read when it was saved.
    pub unread_kicks: u64,
}

/// A virtio-pci device's notification state, saved by [`PciNotify::save`] and restored by
/// [`Vm::restore_virtio_pci`](crate::Vm::restore_virtio_pci) (on a fresh VM after migration, or
/// on the same one).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PciNotifyState {
    /// Where the queues are notified.
    pub layout: PciLayout,
    /// Every queue, in order.
    pub queues: Vec<PciQueueState>,
    /// The configuration's `config_msix_vector`.
    pub config_vector: u16,
    /// The function's MSI-X vectors, pending bits included.
    pub msix: MsixState,
    /// The ISR status bits set and not yet read by the guest (INTx; 0 without it).
    #[cfg_attr(feature = "serde", serde(default))]
    pub isr: u32,
}

/// The notification half of a virtio-pci device: per-queue notify addresses and MSI-X vectors.
/// Dropping it unregisters the notify addresses.
#[derive(Debug)]
pub struct PciNotify {
    layout: PciLayout,
    /// Each queue's notify address, queue 0 first.
    addresses: Vec<u64>,
    queues: Queues,
    queue_vectors: Vec<Arc<QueueVector>>,
    config_vector: QueueVector,
    vectors: MsixVectors,
    /// The INTx line and the ISR status behind it, with where the line lives.
    intx: Option<(Arc<StatusLine>, Placement)>,
}

impl PciNotify {
    /// Registers one notify address per queue with `backend`: queue `i` at `notify_base +
    /// queue_notify_off[i] * notify_off_multiplier`. A queue whose address is its own takes any
    /// write there ([`Width::Any`], no datamatch: the fastest MMIO ioeventfd KVM has, and one
    /// that `VIRTIO_F_NOTIFICATION_DATA` writes match too); queues sharing an address take 2-byte
    /// writes of their index (datamatch), as does every queue where KVM lacks
    /// `KVM_CAP_IOEVENTFD_ANY_LENGTH`. Every queue and the configuration start with
    /// [`NO_VECTOR`]; their interrupts are raised on `vectors`, or with `layout.intx` on that
    /// GSI's level line (through `router`, placed by the backend's policy) while MSI-X is
    /// disabled.
    ///
    /// # Errors
    ///
    /// [`Error::VirtioQueueCount`] for more than 65535 queues, [`Error::AddressWraps`] when an
    /// address overflows, and those of [`Backend::register`] and [`Backend::level_irqfd`].
    pub(crate) fn new(
        backend: &Backend,
        router: &GsiRouter,
        layout: &PciLayout,
        vectors: &MsixVectors,
    ) -> Result<PciNotify> {
        let count = layout.queue_notify_off.len();
        if count > usize::from(u16::MAX) {
            return Err(Error::VirtioQueueCount { count });
        }
        let addresses = layout
            .queue_notify_off
            .iter()
            .map(|&off| layout.address(off))
            .collect::<Result<Vec<u64>>>()?;
        let mut sharing: HashMap<u64, usize> = HashMap::new();
        for &addr in &addresses {
            *sharing.entry(addr).or_default() += 1;
        }
        let intx = match layout.intx {
            None => None,
            Some(gsi) => {
                let line = backend.level_irqfd(
                    router,
                    gsi,
                    &Notifier::new(Mode::Counter)?,
                    &Notifier::new(Mode::Counter)?,
                )?;
                let placement = line.placement().clone();
                Some((Arc::new(StatusLine::new(Arc::new(line))), placement))
            }
        };
        let status = intx.as_ref().map(|(s, _)| s);
        let any_width = backend.has(Capability::IoEventFdAnyLength);
        let mut queues = Queues::default();
        let mut queue_vectors = Vec::with_capacity(count);
        for (index, &addr) in addresses.iter().enumerate() {
            let at = if any_width && sharing[&addr] == 1 {
                WriteMatch::mmio(addr)
            } else {
                WriteMatch::mmio(addr)
                    .width(Width::W2)
                    .datamatch(index as u64)
            };
            let vector = Arc::new(QueueVector::new(vectors, status, INT_VRING));
            queues.add(backend, at, vector.clone())?;
            queue_vectors.push(vector);
        }
        Ok(PciNotify {
            layout: layout.clone(),
            addresses,
            queues,
            queue_vectors,
            config_vector: QueueVector::new(vectors, status, INT_CONFIG),
            vectors: vectors.clone(),
            intx,
        })
    }

    /// The guest writes queue `index`'s registration takes (see [`Vm::virtio_pci`](crate::Vm::virtio_pci)).
    pub fn queue_match(&self, index: u16) -> Option<WriteMatch> {
        self.queues.write_match(index)
    }

    /// A guest write at `addr` that no registration took. A 2- or 4-byte write at a queue's
    /// notify address naming that queue in its low 16 bits is its notification — with
    /// `VIRTIO_F_NOTIFICATION_DATA` at an address queues share, the 4-byte value matches no
    /// datamatch and comes here — and adds the kick. Returns `true` for a write at any queue's
    /// notify address (one naming another queue is taken and dropped, as the spec lets a device
    /// do); `false` for any other address, for the VMM.
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`] when the kick's notifier write fails.
    pub(crate) fn write(&self, addr: u64, data: &[u8]) -> Result<bool> {
        if !self.addresses.contains(&addr) {
            return Ok(false);
        }
        if let Some(index) = notified_queue(data) {
            if self.addresses.get(usize::from(index)) == Some(&addr) {
                self.queues.kick(index)?;
            }
        }
        Ok(true)
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

    /// The guest-physical address queue `index` is notified at.
    pub fn notify_address(&self, index: u16) -> Option<u64> {
        self.addresses.get(usize::from(index)).copied()
    }

    /// The guest's write of `queue_msix_vector` for queue `index`. Returns what the register reads
    /// back: `vector` when the function has it, otherwise [`NO_VECTOR`] (the spec's way of
    /// refusing a mapping). `None` for a queue that does not exist.
    pub fn set_queue_vector(&self, index: u16, vector: u16) -> Option<u16> {
        Some(self.queue_vectors.get(usize::from(index))?.set(vector))
    }

    /// Queue `index`'s `queue_msix_vector`.
    pub fn queue_vector(&self, index: u16) -> Option<u16> {
        Some(self.queue_vectors.get(usize::from(index))?.vector())
    }

    /// The guest's write of `config_msix_vector`; returns what it reads back (as
    /// [`set_queue_vector`](Self::set_queue_vector)).
    pub fn set_config_vector(&self, vector: u16) -> u16 {
        self.config_vector.set(vector)
    }

    /// Notifies the guest of a configuration change on the configuration vector (on INTx, while
    /// MSI-X is disabled: the ISR's configuration bit). Returns `false` when the vector is
    /// [`NO_VECTOR`] (on INTx: when the bit was set already).
    ///
    /// # Errors
    ///
    /// Those of [`MsixVectors::trigger`], and of the INTx line's trigger.
    pub fn trigger_config(&self) -> Result<bool> {
        self.config_vector.trigger()
    }

    /// The guest's read of the ISR status (the ISR capability's byte): returns the bits and
    /// clears them, lowering the INTx line. Reads 0 on a function without INTx, and while MSI-X
    /// is enabled nothing sets them, as the spec has it.
    ///
    /// # Errors
    ///
    /// Those of lowering the line ([`StatusLine::take`]).
    pub fn read_isr(&self) -> Result<u8> {
        match &self.intx {
            None => Ok(0),
            Some((status, _)) => status.take().map(|bits| bits as u8),
        }
    }

    /// The ISR status and its INTx line, on a function with `layout.intx`: the device's loop
    /// waits on its [`resample`](StatusLine::resample) and calls
    /// [`on_resample`](StatusLine::on_resample), which asserts the line again while a bit is set.
    pub fn intx(&self) -> Option<&Arc<StatusLine>> {
        self.intx.as_ref().map(|(s, _)| s)
    }

    /// Where the INTx line lives (kernel resample irqfd, or the userspace injector, and why).
    pub fn intx_placement(&self) -> Option<&Placement> {
        self.intx.as_ref().map(|(_, p)| p)
    }

    /// The function's MSI-X vectors.
    pub fn vectors(&self) -> &MsixVectors {
        &self.vectors
    }

    /// The device's notification state, for a snapshot: each queue's registration, vector and
    /// unread kicks, the configuration vector, and the MSI-X state with its pending bits.
    ///
    /// Nothing is lost to a notification that arrives while it is taken: a kick counter is read
    /// from `/proc/self/fdinfo` (the kernel's count, read atomically and never written back, so a
    /// kick arriving meanwhile stays in the counter for the device), and MSI-X events sitting in a
    /// masked vector's eventfd move into its pending bit under the vector's lock (see
    /// [`MsixVectors::save`]). For a state that later events cannot outdate, pause the vCPUs and
    /// the device first, as a VMM does before migrating.
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`] if a counter cannot be read.
    pub fn save(&self) -> Result<PciNotifyState> {
        let queues = self
            .queues
            .handles
            .iter()
            .zip(&self.queues.registrations)
            .zip(&self.queue_vectors)
            .map(|((queue, registration), vector)| {
                Ok(PciQueueState {
                    write: registration.write_match(),
                    vector: vector.vector(),
                    unread_kicks: queue.kicks().peek()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PciNotifyState {
            layout: self.layout.clone(),
            queues,
            config_vector: self.config_vector.vector(),
            msix: self.vectors.save()?,
            isr: self.intx().map_or(0, |s| s.status()),
        })
    }

    /// The device of a saved `state`, registered with `backend` on `router`'s VM: the MSI-X
    /// vectors restored first (every delivering vector routed in one commit, a pending bit on a
    /// delivering vector delivered once, now; on a masked one when it is unmasked), then the
    /// notify addresses registered, the vectors set, and each queue that had unread kicks kicked
    /// that many times, so its device sees the work it had not read and a device that had read
    /// everything sees nothing extra.
    ///
    /// # Errors
    ///
    /// [`Error::SavedState`] when the state does not fit itself (a queue count other than the
    /// layout's, a vector past the table), before anything is made; those of
    /// [`MsixVectors::restore`] and [`new`](Self::new), and [`Error::Notifier`].
    pub(crate) fn restore(
        backend: &Backend,
        router: &GsiRouter,
        state: &PciNotifyState,
    ) -> Result<PciNotify> {
        let (queues, table) = (
            state.layout.queue_notify_off.len(),
            state.msix.vectors.len(),
        );
        if state.queues.len() != queues {
            return Err(Error::SavedState {
                what: format!(
                    "{} queue states for a layout of {queues} queues",
                    state.queues.len()
                ),
            });
        }
        let vectors = state.queues.iter().map(|q| q.vector);
        if let Some(v) = vectors
            .chain([state.config_vector])
            .find(|&v| v != NO_VECTOR && usize::from(v) >= table)
        {
            return Err(Error::SavedState {
                what: format!("vector {v} in a table of {table}"),
            });
        }
        if state.isr != 0 && state.layout.intx.is_none() {
            return Err(Error::SavedState {
                what: format!("ISR status {:#x} on a function without INTx", state.isr),
            });
        }
        let vectors = MsixVectors::restore(router, &state.msix)?;
        let pci = PciNotify::new(backend, router, &state.layout, &vectors)?;
        if let (Some(status), true) = (pci.intx(), state.isr != 0) {
            // The interrupt the saved state still owed the guest: the line is asserted again.
            status.trigger_status(state.isr)?;
        }
        for (i, q) in state.queues.iter().enumerate() {
            pci.set_queue_vector(i as u16, q.vector);
            if q.unread_kicks > 0 {
                if let Some(queue) = pci.queue(i as u16) {
                    queue.kicks().add(q.unread_kicks)?;
                }
            }
        }
        pci.set_config_vector(state.config_vector);
        Ok(pci)
    }
}
