//! [`IoRegion`]: every part of vm-notify that a guest reads or writes, as a rust-vmm `vm-device`
//! device, so a VMM routes every exit through its one `IoManager`.
//!
//! | region | what the guest reaches there | make it with |
//! |---|---|---|
//! | an MSI-X table and PBA (in a BAR) | vector entries, mask bits, pending bits | [`IoRegion::msix`] |
//! | the split irqchip's IOAPIC window | `IOREGSEL`, `IOWIN`, the redirection table | [`IoRegion::ioapic`] |
//! | a virtio-pci device's notify region | queue notifications that exit (a shared address with `VIRTIO_F_NOTIFICATION_DATA`, a userspace placement) | [`IoRegion::pci_notify`] |
//! | a virtio-mmio device's `QueueNotify` to `InterruptACK` registers (offsets `0x050`–`0x067`) | notifications that exit, `InterruptStatus`, `InterruptACK` | [`IoRegion::mmio_notify`] |
//! | the ranges of userspace ioeventfds | guest writes that match a registration of the [`ExitDispatcher`] | [`IoRegion::dispatcher`] |
//!
//! `vm-device`'s `DeviceMmio`/`DevicePio` return nothing, so a region keeps what went wrong: an
//! access it refuses (a malformed MSI-X access) or that failed (a routing commit KVM refused)
//! is counted and the last one kept, for the VMM to read with
//! [`take_error`](IoRegion::take_error) — the place a VMM logs from. A refused read returns zeros.
//!
//! ```
//! # if !vm_notify_testkit::kvm_or_skip("doc example") { return Ok(()); }
//! use std::sync::Arc;
//! use vm_device::bus::{MmioAddress, MmioRange};
//! use vm_device::device_manager::{IoManager, MmioManager};
//! use vm_notify::fallback::Policy;
//! use vm_notify::io::IoRegion;
//! use vm_notify::Vm;
//!
//! let kvm = kvm_ioctls::Kvm::new()?;
//! let fd = Arc::new(kvm.create_vm()?);
//! fd.create_irq_chip()?;
//! let vm = Vm::new(fd, Policy::Kernel)?;
//! let msix = vm.msix(4)?;
//! // The function's MSI-X BAR at 0xe000_0000: the table at offset 0, the PBA at 0x800.
//! let bar = Arc::new(IoRegion::msix(&msix, 0, 0x800));
//! let mut io = IoManager::new();
//! io.register_mmio(MmioRange::new(MmioAddress(0xe000_0000), 0x1000)?, bar.clone())?;
//! // The vCPU loop, on the guest's write of vector 1's control word (unmask):
//! io.mmio_write(MmioAddress(0xe000_0000 + 16 + 12), &0u32.to_le_bytes())?;
//! assert!(!msix.vector(1)?.masked);
//! assert!(bar.take_error().is_none());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vm_device::bus::{MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset};
use vm_device::{DeviceMmio, DevicePio};

use crate::error::{Error, Result};
use crate::fallback::ExitDispatcher;
use crate::irqchip::Ioapic;
use crate::msix::MsixVectors;
use crate::virtio::{MmioNotify, PciNotify};

/// What an [`IoRegion`] serves.
enum Target {
    Msix {
        vectors: MsixVectors,
        table: u64,
        pba: u64,
    },
    Ioapic(Ioapic),
    PciNotify(Arc<PciNotify>),
    MmioNotify(Arc<MmioNotify>),
    Dispatcher(ExitDispatcher),
}

/// A guest-visible region of vm-notify as a `vm-device` `DeviceMmio` (and, for the dispatcher,
/// `DevicePio`): register it in the VMM's `IoManager` over the range it covers (see the
/// [module docs](self)).
pub struct IoRegion {
    target: Target,
    errors: AtomicU64,
    last_error: Mutex<Option<Error>>,
}

impl fmt::Debug for IoRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match &self.target {
            Target::Msix { table, pba, .. } => {
                format!("MSI-X table at {table:#x}, PBA at {pba:#x}")
            }
            Target::Ioapic(_) => "IOAPIC window".into(),
            Target::PciNotify(_) => "virtio-pci notify region".into(),
            Target::MmioNotify(_) => "virtio-mmio notify and interrupt registers".into(),
            Target::Dispatcher(_) => "exit dispatcher".into(),
        };
        f.debug_struct("IoRegion")
            .field("serves", &what)
            .field("errors", &self.error_count())
            .finish()
    }
}

impl IoRegion {
    fn new(target: Target) -> Self {
        IoRegion {
            target,
            errors: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    /// A function's MSI-X table and PBA in a BAR: the table at offset `table`, the PBA at offset
    /// `pba` from the range's base (as the capability's Table and PBA Offset fields say).
    /// Accesses elsewhere in the range read zeros and write nothing.
    pub fn msix(vectors: &MsixVectors, table: u64, pba: u64) -> Self {
        IoRegion::new(Target::Msix {
            vectors: vectors.clone(),
            table,
            pba,
        })
    }

    /// The split irqchip's IOAPIC window: register it at
    /// [`IOAPIC_BASE`](crate::irqchip::IOAPIC_BASE) over
    /// [`IOAPIC_SIZE`](crate::irqchip::IOAPIC_SIZE) bytes.
    pub fn ioapic(ioapic: &Ioapic) -> Self {
        IoRegion::new(Target::Ioapic(ioapic.clone()))
    }

    /// A virtio-pci device's notify region (its `notify_base` and the queues' addresses above
    /// it): the queue notifications that exit reach their queues' kicks.
    pub fn pci_notify(notify: Arc<PciNotify>) -> Self {
        IoRegion::new(Target::PciNotify(notify))
    }

    /// A virtio-mmio device's notification registers: register it at the device's base plus
    /// `VIRTIO_MMIO_QUEUE_NOTIFY` (0x50) over 0x18 bytes (through
    /// `InterruptACK`), and the rest of the device's window as the VMM's own device. Reads of
    /// `InterruptStatus` and writes of `InterruptACK` and `QueueNotify` go to the [`MmioNotify`].
    pub fn mmio_notify(notify: Arc<MmioNotify>) -> Self {
        IoRegion::new(Target::MmioNotify(notify))
    }

    /// The exit dispatcher of a [`Vm`](crate::Vm) ([`Vm::dispatcher`](crate::Vm::dispatcher)): register it over the
    /// ranges of the ioeventfds placed in userspace (an [`IoEvent`](crate::IoEvent)'s
    /// [`write_match`](crate::IoEvent::write_match) says where). Addresses are absolute: the
    /// range's base plus the offset.
    pub fn dispatcher(dispatcher: &ExitDispatcher) -> Self {
        IoRegion::new(Target::Dispatcher(dispatcher.clone()))
    }

    /// The last access that was refused or failed since the last call, if any.
    pub fn take_error(&self) -> Option<Error> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// How many accesses were refused or failed in all.
    pub fn error_count(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    fn keep(&self, result: Result<()>) {
        if let Err(e) = result {
            self.errors.fetch_add(1, Ordering::Relaxed);
            *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
        }
    }

    fn read(&self, addr: u64, offset: u64, data: &mut [u8]) -> Result<()> {
        data.fill(0);
        match &self.target {
            Target::Msix {
                vectors,
                table,
                pba,
            } => match msix_part(vectors, *table, *pba, offset) {
                Some((Part::Table, at)) => vectors.table_read(at, data),
                Some((Part::Pba, at)) => vectors.pba_read(at, data),
                None => Ok(()),
            },
            Target::Ioapic(ioapic) => {
                ioapic.mmio_read(offset, data);
                Ok(())
            }
            Target::MmioNotify(notify) => {
                notify.read(addr, data);
                Ok(())
            }
            // Notify registers read as zero; nothing of the dispatcher is readable.
            Target::PciNotify(_) | Target::Dispatcher(_) => Ok(()),
        }
    }

    fn write(&self, addr: u64, offset: u64, data: &[u8]) -> Result<()> {
        match &self.target {
            Target::Msix {
                vectors,
                table,
                pba,
            } => match msix_part(vectors, *table, *pba, offset) {
                Some((Part::Table, at)) => vectors.table_write(at, data),
                Some((Part::Pba, at)) => vectors.pba_write(at, data),
                None => Ok(()),
            },
            Target::Ioapic(ioapic) => ioapic.mmio_write(offset, data),
            Target::PciNotify(notify) => notify.write(addr, data).map(drop),
            Target::MmioNotify(notify) => notify.write(addr, data).map(drop),
            Target::Dispatcher(d) => d.mmio_write(addr, data).map(drop),
        }
    }
}

/// The two parts of an MSI-X BAR.
enum Part {
    Table,
    Pba,
}

/// Which part of the BAR `offset` falls in, and the offset within it.
fn msix_part(vectors: &MsixVectors, table: u64, pba: u64, offset: u64) -> Option<(Part, u64)> {
    let within = |start: u64, len: u64| offset.checked_sub(start).filter(|at| *at < len);
    if let Some(at) = within(table, vectors.table_len()) {
        return Some((Part::Table, at));
    }
    within(pba, vectors.pba_len()).map(|at| (Part::Pba, at))
}

impl DeviceMmio for IoRegion {
    fn mmio_read(&self, base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.keep(self.read(base.0.wrapping_add(offset), offset, data));
    }

    fn mmio_write(&self, base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.keep(self.write(base.0.wrapping_add(offset), offset, data));
    }
}

/// Port I/O: only the dispatcher takes it (its userspace port ioeventfds); other regions are
/// MMIO and ignore port accesses (reads give zeros).
impl DevicePio for IoRegion {
    fn pio_read(&self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let Target::Dispatcher(d) = &self.target {
            let port = base.0.wrapping_add(offset);
            self.keep(d.pio_write(port, data).map(drop));
        }
    }
}
