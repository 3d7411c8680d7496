//! [`Vm`]: the one root a VMM wires every notification from.

use std::fmt;
use std::sync::Arc;

use kvm_ioctls::VmFd;

use crate::error::{Capability, Result};
use crate::fallback::{Backend, ExitDispatcher, IoEvent, IrqFd, LevelIrqFd, Policy};
use crate::irqchip::Ioapic;
use crate::kvm::{Gsi, GsiRouter, MsiMessage, WriteMatch};
use crate::msix::MsixVectors;
use crate::notifier::{Mode, Notifier};
use crate::virtio::{MmioDevice, MmioNotify, PciLayout, PciNotify};

/// A VM's notifications, in one place: the VM descriptor, its GSI routing table and the
/// placement policy (with its exit dispatcher and injector thread). Every registration is made
/// from here and holds what it needs, so the order of drops does not matter. Cheap to clone.
///
/// ```
/// # if !vm_notify_testkit::kvm_or_skip("doc example") { return Ok(()); }
/// use std::sync::Arc;
/// use vm_notify::fallback::Policy;
/// use vm_notify::kvm::MsiMessage;
/// use vm_notify::{Mode, Notifier, Vm, Width, WriteMatch};
///
/// let kvm = kvm_ioctls::Kvm::new()?;
/// let fd = Arc::new(kvm.create_vm()?);
/// fd.create_irq_chip()?;
/// let vm = Vm::new(fd, Policy::Auto)?;
/// let kicks = Notifier::new(Mode::Counter)?;
/// let _notify = vm.ioevent(WriteMatch::mmio(0xd000_0050).width(Width::W4), &kicks)?;
/// let irq = vm.irqfd(vm.route_msi(MsiMessage::x86(0, 0x40))?)?;
/// irq.trigger()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Vm {
    router: GsiRouter,
    backend: Backend,
}

impl fmt::Debug for Vm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm")
            .field("router", &self.router)
            .field("backend", &self.backend)
            .finish()
    }
}

impl Vm {
    /// Takes charge of `fd`'s notifications, placing them by `policy`. The VM must have its
    /// in-kernel irqchip (`KVM_CREATE_IRQCHIP`) already.
    ///
    /// # Errors
    ///
    /// Those of [`GsiRouter::new`].
    pub fn new(fd: Arc<VmFd>, policy: Policy) -> Result<Vm> {
        Ok(Vm {
            router: GsiRouter::new(fd.clone())?,
            backend: Backend::new(fd, policy),
        })
    }

    /// Turns on the split irqchip for `fd` (`KVM_CAP_SPLIT_IRQCHIP`, 24 routes reserved for a
    /// userspace IOAPIC's pins) and takes charge of its notifications with `policy`. Call it on a
    /// fresh VM: before any vCPU is created and instead of `KVM_CREATE_IRQCHIP`. MSI routes,
    /// irqfds and MSI-X vectors work as with the in-kernel irqchip. The legacy pins (GSIs 0–23)
    /// are the [`ioapic`](Self::ioapic)'s: irqfds and level irqfds made on them from this root
    /// are served through it, with the same device contract and counts (there is no PIC).
    ///
    /// # Errors
    ///
    /// [`Error::SplitIrqchip`](crate::Error::SplitIrqchip) when KVM refuses the mode, and
    /// those of [`GsiRouter::split`].
    pub fn with_split_irqchip(fd: Arc<VmFd>, policy: Policy) -> Result<Vm> {
        crate::sys::enable_split_irqchip(&fd, crate::kvm::IRQCHIP_GSIS)?;
        let router = GsiRouter::split(fd.clone())?;
        let ioapic = Ioapic::new(&router);
        Ok(Vm {
            router,
            backend: Backend::new(fd, policy).with_ioapic(ioapic),
        })
    }

    /// The split irqchip's IOAPIC (`None` on the in-kernel irqchip): the vCPU loop gives it the
    /// guest's accesses to [`IOAPIC_BASE`](crate::irqchip::IOAPIC_BASE) and each
    /// `KVM_EXIT_IOAPIC_EOI`.
    pub fn ioapic(&self) -> Option<&Ioapic> {
        self.backend.ioapic()
    }

    /// A root for the same VM and routing table with another placement policy (its own exit
    /// dispatcher and injector thread): for a VMM that places some devices differently, and for
    /// tests that run one device on each path.
    pub fn with_policy(&self, policy: Policy) -> Vm {
        let mut backend = Backend::new(self.fd().clone(), policy);
        if let Some(io) = self.ioapic() {
            backend = backend.with_ioapic(io.clone());
        }
        Vm {
            router: self.router.clone(),
            backend,
        }
    }

    /// Treats `cap` as missing from KVM (see [`Backend::disable`]).
    pub fn disable(mut self, cap: Capability) -> Vm {
        self.backend = self.backend.disable(cap);
        self
    }

    /// The VM descriptor.
    pub fn fd(&self) -> &Arc<VmFd> {
        self.backend.vm()
    }

    /// The routing table.
    pub fn router(&self) -> &GsiRouter {
        &self.router
    }

    /// The placement policy's backend.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The dispatcher the vCPU loop hands `KVM_EXIT_MMIO` / `KVM_EXIT_IO` writes to.
    pub fn dispatcher(&self) -> &ExitDispatcher {
        self.backend.dispatcher()
    }

    /// Guest writes matching `write` add 1 to `notifier` (see [`Backend::register`]).
    ///
    /// # Errors
    ///
    /// Those of [`Backend::register`].
    pub fn ioevent(&self, write: WriteMatch, notifier: &Notifier) -> Result<IoEvent> {
        self.backend.register(write, notifier)
    }

    /// An edge interrupt on `gsi` with a notifier of its own (see [`Backend::irqfd`]).
    ///
    /// # Errors
    ///
    /// Those of [`Backend::irqfd`].
    pub fn irqfd(&self, gsi: Gsi) -> Result<IrqFd> {
        self.irqfd_with(gsi, &Notifier::new(Mode::Counter)?)
    }

    /// An edge interrupt on `gsi` that `notifier` triggers (see [`Backend::irqfd`]).
    ///
    /// # Errors
    ///
    /// Those of [`Backend::irqfd`].
    pub fn irqfd_with(&self, gsi: Gsi, notifier: &Notifier) -> Result<IrqFd> {
        self.backend.irqfd(&self.router, gsi, notifier)
    }

    /// A level interrupt on `gsi` with trigger and resample notifiers of its own (see
    /// [`Backend::level_irqfd`]).
    ///
    /// # Errors
    ///
    /// Those of [`Backend::level_irqfd`].
    pub fn level_irqfd(&self, gsi: Gsi) -> Result<LevelIrqFd> {
        let (trigger, resample) = (Notifier::new(Mode::Counter)?, Notifier::new(Mode::Counter)?);
        self.backend
            .level_irqfd(&self.router, gsi, &trigger, &resample)
    }

    /// Routes a new GSI to `msg` (see [`GsiRouter::route_msi`]).
    ///
    /// # Errors
    ///
    /// Those of [`GsiRouter::route_msi`].
    pub fn route_msi(&self, msg: MsiMessage) -> Result<Gsi> {
        self.router.route_msi(msg)
    }

    /// A function's `count` MSI-X vectors, in their reset state (see [`MsixVectors::new`]).
    ///
    /// # Errors
    ///
    /// Those of [`MsixVectors::new`].
    pub fn msix(&self, count: usize) -> Result<MsixVectors> {
        MsixVectors::new(&self.router, count)
    }

    /// The notification half of a virtio-mmio device (see [`MmioNotify::new`]).
    ///
    /// # Errors
    ///
    /// Those of [`MmioNotify::new`].
    pub fn virtio_mmio(&self, device: &MmioDevice) -> Result<MmioNotify> {
        MmioNotify::new(&self.backend, &self.router, device)
    }

    /// The notification half of a virtio-pci device whose queues interrupt on `vectors` (see
    /// [`PciNotify::new`]).
    ///
    /// # Errors
    ///
    /// Those of [`PciNotify::new`].
    pub fn virtio_pci(&self, layout: &PciLayout, vectors: &MsixVectors) -> Result<PciNotify> {
        PciNotify::new(&self.backend, layout, vectors)
    }
}
