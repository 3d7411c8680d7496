//! [`GuestExit`]: what reaches userspace from the guest, and the [`ExitHandler`] that serves it.

use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_notify::fallback::ExitDispatcher;
use vm_notify::irqchip::{IOAPIC_BASE, IOAPIC_SIZE};

/// An exit the kernel did not absorb: the guest touched a port or an MMIO address that nothing
/// in the kernel handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    /// An `out` to `port` of `len` bytes carrying `data`.
    PioWrite {
        /// The port.
        port: u16,
        /// The value written (little-endian, zero-extended).
        data: u64,
        /// The write's width in bytes.
        len: u8,
    },
    /// An `in` from `port` of `len` bytes.
    PioRead {
        /// The port.
        port: u16,
        /// The read's width in bytes.
        len: u8,
    },
    /// A write to `addr` of `len` bytes carrying `data`.
    MmioWrite {
        /// The guest-physical address.
        addr: u64,
        /// The value written (little-endian, zero-extended).
        data: u64,
        /// The write's width in bytes.
        len: u8,
    },
    /// A read from `addr` of `len` bytes.
    MmioRead {
        /// The guest-physical address.
        addr: u64,
        /// The read's width in bytes.
        len: u8,
    },
    /// With the split irqchip: the guest's local APIC took an EOI for `vector`, one KVM was told
    /// to report (a level-triggered IOAPIC route's, `KVM_EXIT_IOAPIC_EOI`). The kit gives it to
    /// the VM's [`Ioapic`](vm_notify::irqchip::Ioapic) and records it in the report; exit
    /// handlers do not see it (nor the guest's accesses to the IOAPIC's registers).
    IoapicEoi {
        /// The vector.
        vector: u8,
    },
}

impl GuestExit {
    /// Whether this is an exit the kit serves for the split irqchip's IOAPIC: an access to its
    /// registers or an EOI KVM reported for it.
    pub fn is_ioapic(&self) -> bool {
        match *self {
            GuestExit::IoapicEoi { .. } => true,
            GuestExit::MmioWrite { addr, .. } | GuestExit::MmioRead { addr, .. } => {
                (IOAPIC_BASE..IOAPIC_BASE + IOAPIC_SIZE).contains(&addr)
            }
            _ => false,
        }
    }

    /// Hands a write exit to `dispatcher` (the userspace path of a [`Vm`](vm_notify::Vm));
    /// returns whether a registration took it. Reads are never taken.
    ///
    /// # Errors
    ///
    /// [`vm_notify::Error::Notifier`] if the eventfd write fails.
    pub fn dispatch(&self, dispatcher: &ExitDispatcher) -> vm_notify::Result<bool> {
        match *self {
            GuestExit::MmioWrite { addr, data, len } => {
                dispatcher.mmio_write(addr, &data.to_le_bytes()[..usize::from(len).min(8)])
            }
            GuestExit::PioWrite { port, data, len } => {
                dispatcher.pio_write(port, &data.to_le_bytes()[..usize::from(len).min(8)])
            }
            _ => Ok(false),
        }
    }

    /// Routes this exit through `io`, as a rust-vmm VMM routes every exit: an MMIO or port read
    /// fills `data` from the device at its address, a write goes to it. Returns whether a device
    /// took it (`false` where no device is registered at the address, or for an exit that is
    /// not an access).
    pub fn route(&self, io: &IoManager, data: &mut [u8]) -> bool {
        match *self {
            GuestExit::MmioRead { addr, .. } => io.mmio_read(MmioAddress(addr), data).is_ok(),
            GuestExit::MmioWrite {
                addr,
                data: value,
                len,
            } => {
                let bytes = &value.to_le_bytes()[..usize::from(len).min(8)];
                io.mmio_write(MmioAddress(addr), bytes).is_ok()
            }
            GuestExit::PioRead { port, .. } => io.pio_read(PioAddress(port), data).is_ok(),
            GuestExit::PioWrite {
                port,
                data: value,
                len,
            } => {
                let bytes = &value.to_le_bytes()[..usize::from(len).min(4)];
                io.pio_write(PioAddress(port), bytes).is_ok()
            }
            _ => false,
        }
    }
}

/// Called on the vCPU thread for every [`GuestExit`], before the guest resumes. For reads,
/// `reply` is the buffer the guest will read (zeroed unless the handler fills it).
pub trait ExitHandler: Send + 'static {
    /// Handles one exit.
    fn handle(&mut self, exit: &GuestExit, reply: &mut [u8]);
}

impl<F: FnMut(&GuestExit, &mut [u8]) + Send + 'static> ExitHandler for F {
    fn handle(&mut self, exit: &GuestExit, reply: &mut [u8]) {
        self(exit, reply)
    }
}
