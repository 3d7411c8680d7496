//! The only code in the crate that issues KVM ioctls: ioeventfd and irqfd assignment, the GSI
//! routing table, `KVM_IRQ_LINE`, `KVM_SIGNAL_MSI`, and capability checks. No policy lives here:
//! each function does one ioctl and maps its errno to the crate's [`Error`].

use std::io;
use std::os::fd::AsRawFd;

use kvm_bindings::{
    kvm_ioeventfd, kvm_ioeventfd_flag_nr_datamatch, kvm_ioeventfd_flag_nr_deassign,
    kvm_ioeventfd_flag_nr_pio, kvm_irqchip, kvm_msi, KvmIrqRouting, KVM_CAP_IOEVENTFD_ANY_LENGTH,
    KVM_CAP_SPLIT_IRQCHIP,
};
use kvm_ioctls::{Cap, VmFd};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use crate::bus::IoEventAddress;
use crate::error::{Capability, Error, Result};
use crate::fault::{hit, Syscall};
use crate::notifier::Notifier;

const KVMIO: u32 = 0xAE;
// kvm-ioctls infers an ioeventfd's length from its datamatch type, so a fixed width without a
// datamatch cannot be said through it; the ioctl itself can say it.
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);

/// One `KVM_IOEVENTFD` request, as the kernel sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IoEventRequest {
    pub addr: u64,
    pub len: u32,
    pub datamatch: Option<u64>,
    pub pio: bool,
}

impl IoEventRequest {
    fn address(&self) -> IoEventAddress {
        if self.pio {
            IoEventAddress::Pio(self.addr)
        } else {
            IoEventAddress::Mmio(self.addr)
        }
    }
}

fn ioeventfd(vm: &VmFd, fd: &Notifier, req: &IoEventRequest, deassign: bool) -> io::Result<()> {
    hit(Syscall::IoEventFd)?;
    let mut flags = 0;
    if req.datamatch.is_some() {
        flags |= 1 << kvm_ioeventfd_flag_nr_datamatch;
    }
    if req.pio {
        flags |= 1 << kvm_ioeventfd_flag_nr_pio;
    }
    if deassign {
        flags |= 1 << kvm_ioeventfd_flag_nr_deassign;
    }
    let arg = kvm_ioeventfd {
        datamatch: req.datamatch.unwrap_or(0),
        addr: req.addr,
        len: req.len,
        fd: fd.as_raw_fd(),
        flags,
        ..Default::default()
    };
    // SAFETY: `vm` is a KVM VM descriptor, `arg` is a fully initialised kvm_ioeventfd that the
    // kernel only reads, and the return value is checked.
    let ret = unsafe { ioctl_with_ref(vm, KVM_IOEVENTFD(), &arg) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `KVM_IOEVENTFD` assign. EEXIST is an overlap, ENOSPC a full bus.
pub(crate) fn assign_ioevent(vm: &VmFd, fd: &Notifier, req: &IoEventRequest) -> Result<()> {
    let addr = req.address();
    ioeventfd(vm, fd, req, false).map_err(|source| match source.raw_os_error() {
        Some(libc::EEXIST) => Error::IoEventExists { addr },
        Some(libc::ENOSPC) => Error::IoBusFull { addr },
        _ => Error::IoEvent { addr, source },
    })
}

/// `KVM_IOEVENTFD` deassign. KVM answers ENOENT when no registration has exactly this eventfd,
/// address, length and datamatch: that is [`Error::IoEventNotRegistered`]. (Guards cannot get
/// there: each deassigns exactly what it assigned, once.)
pub(crate) fn deassign_ioevent(vm: &VmFd, fd: &Notifier, req: &IoEventRequest) -> Result<()> {
    let addr = req.address();
    let done = retried(|| ioeventfd(vm, fd, req, true), Some(libc::ENOENT));
    done.map_err(|source| match source.raw_os_error() {
        Some(libc::ENOENT) => Error::IoEventNotRegistered { addr },
        _ => Error::IoEvent { addr, source },
    })
}

/// The capabilities of one VM, asked once: every registration needs some of the answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Capabilities {
    present: [bool; Capability::ALL.len()],
}

impl Capabilities {
    /// Asks KVM about every [`Capability`] on `vm`.
    pub(crate) fn probe(vm: &VmFd) -> Capabilities {
        let mut present = [false; Capability::ALL.len()];
        for (slot, cap) in present.iter_mut().zip(Capability::ALL) {
            *slot = check(vm, cap);
        }
        Capabilities { present }
    }

    /// Whether KVM offers `cap` on this VM.
    pub(crate) fn has(&self, cap: Capability) -> bool {
        self.present[cap as usize]
    }

    /// [`Error::MissingCapability`] unless KVM offers every one of `caps`.
    pub(crate) fn require(&self, caps: impl IntoIterator<Item = Capability>) -> Result<()> {
        match caps.into_iter().find(|&c| !self.has(c)) {
            Some(cap) => Err(Error::MissingCapability(cap)),
            None => Ok(()),
        }
    }
}

fn check(vm: &VmFd, cap: Capability) -> bool {
    let kvm_cap = match cap {
        Capability::IoEventFd => Cap::Ioeventfd,
        Capability::IoEventFdAnyLength => {
            return vm.check_extension_raw(u64::from(KVM_CAP_IOEVENTFD_ANY_LENGTH) as _) > 0
        }
        Capability::IrqFd => Cap::Irqfd,
        Capability::IrqFdResample => Cap::IrqfdResample,
        Capability::IrqRouting => Cap::IrqRouting,
        Capability::Irqchip => return has_irqchip(vm),
        Capability::SplitIrqchip => {
            return vm.check_extension_raw(u64::from(KVM_CAP_SPLIT_IRQCHIP) as _) > 0
        }
    };
    vm.check_extension(kvm_cap)
}

/// `KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)` with `pins` routes reserved for the userspace
/// IOAPIC's pins. KVM takes it only before any vCPU exists and without an in-kernel irqchip.
pub(crate) fn enable_split_irqchip(vm: &VmFd, pins: u32) -> Result<()> {
    let mut cap = kvm_bindings::kvm_enable_cap {
        cap: KVM_CAP_SPLIT_IRQCHIP,
        ..Default::default()
    };
    cap.args[0] = u64::from(pins);
    vm.enable_cap(&cap).map_err(|e| Error::SplitIrqchip {
        source: io::Error::from_raw_os_error(e.errno()),
    })
}

/// Whether `KVM_CREATE_IRQCHIP` was done on this VM: `KVM_GET_IRQCHIP` fails without one.
fn has_irqchip(vm: &VmFd) -> bool {
    let mut chip = kvm_irqchip {
        chip_id: kvm_bindings::KVM_IRQCHIP_PIC_MASTER,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).is_ok()
}

/// `KVM_IRQFD` assign, with a resample eventfd for a level line. EBUSY: the eventfd is already
/// an irqfd.
pub(crate) fn assign_irqfd(
    vm: &VmFd,
    fd: &Notifier,
    resample: Option<&Notifier>,
    gsi: u32,
) -> Result<()> {
    let ret = match (hit(Syscall::IrqFd), resample) {
        (Err(e), _) => Err(kvm_ioctls::Error::new(
            e.raw_os_error().unwrap_or(libc::EIO),
        )),
        (Ok(()), None) => vm.register_irqfd(fd.as_event_fd(), gsi),
        (Ok(()), Some(r)) => {
            vm.register_irqfd_with_resample(fd.as_event_fd(), r.as_event_fd(), gsi)
        }
    };
    ret.map_err(|e| match e.errno() {
        libc::EBUSY => Error::IrqFdBusy { gsi },
        errno => Error::IrqFd {
            gsi,
            source: io::Error::from_raw_os_error(errno),
        },
    })
}

/// `KVM_IRQFD` deassign. KVM deassigns by (eventfd, GSI) and returns 0 even when nothing matched,
/// so the only errors are malformed requests.
pub(crate) fn deassign_irqfd(vm: &VmFd, fd: &Notifier, gsi: u32) -> io::Result<()> {
    let deassign = || {
        hit(Syscall::IrqFd)?;
        vm.unregister_irqfd(fd.as_event_fd(), gsi)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    };
    retried(deassign, None)
}

/// Attempts at an undo (a deassign, a route removal) before its error is returned: an undo runs
/// where nobody can act on an error (a drop, the unwinding of a failed registration), and what it
/// fails to undo stays in the kernel, so a transient failure (EINTR, ENOMEM, EAGAIN) is tried
/// again at once.
pub(crate) const UNDO_ATTEMPTS: usize = 3;

/// Runs `undo` up to [`UNDO_ATTEMPTS`] times until it succeeds or fails with `definitive`.
pub(crate) fn retried<T>(
    mut undo: impl FnMut() -> io::Result<T>,
    definitive: Option<i32>,
) -> io::Result<T> {
    let mut attempt = 1;
    loop {
        match undo() {
            Err(e) if attempt < UNDO_ATTEMPTS && e.raw_os_error() != definitive => attempt += 1,
            done => return done,
        }
    }
}

/// `KVM_SET_GSI_ROUTING` with the whole table.
pub(crate) fn set_gsi_routing(vm: &VmFd, table: &KvmIrqRouting, entries: usize) -> Result<()> {
    hit(Syscall::SetGsiRouting)
        .and_then(|()| {
            vm.set_gsi_routing(table)
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))
        })
        .map_err(|source| Error::SetRouting { entries, source })
}

/// `KVM_IRQ_LINE`: sets the level of `gsi`'s irqchip pins.
pub(crate) fn set_irq_line(vm: &VmFd, gsi: u32, high: bool) -> Result<()> {
    hit(Syscall::IrqLine)
        .and_then(|()| vm.set_irq_line(gsi, high).map_err(io::Error::from))
        .map_err(|source| Error::IrqLine { gsi, source })
}

/// `KVM_SIGNAL_MSI`: delivers one MSI with this address and data, without a route. Returns
/// whether a local APIC took it (KVM answers 0 when none did: no such destination, or its LAPIC
/// is software-disabled).
pub(crate) fn signal_msi(vm: &VmFd, address: u64, data: u32) -> io::Result<bool> {
    let msg = kvm_msi {
        address_lo: address as u32,
        address_hi: (address >> 32) as u32,
        data,
        ..Default::default()
    };
    hit(Syscall::SignalMsi)?;
    vm.signal_msi(msg)
        .map(|taken| taken > 0)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notifier::Mode;

    /// The removal guards cannot make: KVM answers ENOENT for an ioeventfd it does not have, and
    /// the mapping names it. An irqfd deassign, by contrast, returns 0 even when nothing matched,
    /// which is why the router keeps its own count of bound irqfds.
    #[test]
    fn removing_what_is_not_registered() {
        vm_notify_testkit::kvm_test!();
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let n = Notifier::new(Mode::Counter).unwrap();
        let req = IoEventRequest {
            addr: 0xd000_0000,
            len: 4,
            datamatch: None,
            pio: false,
        };
        let e = deassign_ioevent(&vm, &n, &req).unwrap_err();
        assert!(
            matches!(
                e,
                Error::IoEventNotRegistered {
                    addr: IoEventAddress::Mmio(0xd000_0000)
                }
            ),
            "{e:?}"
        );
        // Registered, then removed twice: the second removal is the same error.
        assign_ioevent(&vm, &n, &req).unwrap();
        deassign_ioevent(&vm, &n, &req).unwrap();
        assert!(matches!(
            deassign_ioevent(&vm, &n, &req),
            Err(Error::IoEventNotRegistered { .. })
        ));
        assert!(deassign_irqfd(&vm, &n, 4).is_ok());
    }

    #[test]
    fn capabilities_answer_what_kvm_says() {
        vm_notify_testkit::kvm_test!();
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        assert!(!Capabilities::probe(&vm).has(Capability::Irqchip));
        vm.create_irq_chip().unwrap();
        let caps = Capabilities::probe(&vm);
        assert!(caps.has(Capability::Irqchip));
        assert_eq!(caps.has(Capability::IrqFd), vm.check_extension(Cap::Irqfd));
        assert!(matches!(
            Capabilities {
                present: [false; Capability::ALL.len()]
            }
            .require([Capability::IrqFd]),
            Err(Error::MissingCapability(Capability::IrqFd))
        ));
    }
}
