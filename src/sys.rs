//! The kernel calls: every KVM ioctl the library issues for a registration goes through here, so
//! the rest of the crate speaks in its own types.

use std::io;
use std::os::fd::AsRawFd;

use kvm_bindings::{
    kvm_ioeventfd, kvm_ioeventfd_flag_nr_datamatch, kvm_ioeventfd_flag_nr_deassign,
    kvm_ioeventfd_flag_nr_pio, kvm_irqchip, KvmIrqRouting, KVM_CAP_IOEVENTFD_ANY_LENGTH,
};
use kvm_ioctls::{Cap, VmFd};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use crate::error::Capability;
use crate::notifier::Notifier;

const KVMIO: u32 = 0xAE;
// kvm-ioctls infers an ioeventfd's length from its datamatch type, so a fixed width without a
// datamatch cannot be said through it; the ioctl itself can say it.
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);

/// One `KVM_IOEVENTFD` request, as the kernel sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IoEventRequest {
    pub addr: u64,
    pub len: u32,
    pub datamatch: Option<u64>,
    pub pio: bool,
}

fn ioeventfd(vm: &VmFd, fd: &Notifier, req: &IoEventRequest, deassign: bool) -> io::Result<()> {
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

pub(crate) fn assign_ioevent(vm: &VmFd, fd: &Notifier, req: &IoEventRequest) -> io::Result<()> {
    ioeventfd(vm, fd, req, false)
}

pub(crate) fn deassign_ioevent(vm: &VmFd, fd: &Notifier, req: &IoEventRequest) -> io::Result<()> {
    ioeventfd(vm, fd, req, true)
}

pub(crate) fn check(vm: &VmFd, cap: Capability) -> bool {
    let kvm_cap = match cap {
        Capability::IoEventFd => Cap::Ioeventfd,
        Capability::IoEventFdAnyLength => {
            return vm.check_extension_raw(u64::from(KVM_CAP_IOEVENTFD_ANY_LENGTH) as _) > 0
        }
        Capability::IrqFd => Cap::Irqfd,
        Capability::IrqFdResample => Cap::IrqfdResample,
        Capability::IrqRouting => Cap::IrqRouting,
        Capability::Irqchip => return has_irqchip(vm),
    };
    vm.check_extension(kvm_cap)
}

/// Whether `KVM_CREATE_IRQCHIP` was done on this VM: `KVM_GET_IRQCHIP` fails without one.
fn has_irqchip(vm: &VmFd) -> bool {
    let mut chip = kvm_irqchip {
        chip_id: kvm_bindings::KVM_IRQCHIP_PIC_MASTER,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).is_ok()
}

pub(crate) fn assign_irqfd(
    vm: &VmFd,
    fd: &Notifier,
    resample: Option<&Notifier>,
    gsi: u32,
) -> io::Result<()> {
    let ret = match resample {
        None => vm.register_irqfd(fd.as_event_fd(), gsi),
        Some(r) => vm.register_irqfd_with_resample(fd.as_event_fd(), r.as_event_fd(), gsi),
    };
    ret.map_err(|e| io::Error::from_raw_os_error(e.errno()))
}

pub(crate) fn deassign_irqfd(vm: &VmFd, fd: &Notifier, gsi: u32) -> io::Result<()> {
    vm.unregister_irqfd(fd.as_event_fd(), gsi)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
}

pub(crate) fn set_gsi_routing(vm: &VmFd, table: &KvmIrqRouting) -> io::Result<()> {
    vm.set_gsi_routing(table)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
}
