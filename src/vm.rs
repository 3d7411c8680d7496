//! [`Vm`]: the one root a VMM wires every notification from.

use std::fmt;
use std::sync::Arc;

use kvm_ioctls::VmFd;

use crate::error::{Capability, Result};
use crate::fallback::{
    Backend, ExitDispatcher, Injector, IoEvent, IrqFd, LevelIrqFd, LevelLineState, Policy,
};
use crate::irqchip::Ioapic;
use crate::kvm::{Gsi, GsiRouter, MsiMessage, WriteMatch};
use crate::msix::{MsixState, MsixVectors};
use crate::notifier::{Mode, Notifier};
use crate::virtio::{MmioLayout, MmioNotify, PciLayout, PciNotify, PciNotifyState};

/// A VM's notifications, in one place: the VM descriptor, its GSI routing table and the
/// placement policy (with its exit dispatcher and the injector the VMM runs). Every registration is made
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
/// // Interrupts `Auto` places in userspace are injected by the VMM's injector thread.
/// let _injector = vm.injector()?.spawn()?;
/// let kicks = Notifier::new(Mode::Counter)?;
/// let _notify = vm.ioevent(WriteMatch::mmio(0xd000_0050).width(Width::W4), &kicks)?;
/// let irq = vm.irqfd(vm.router().route_msi(MsiMessage::x86(0, 0x40))?)?;
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
    /// [`Error::MissingCapability`](crate::Error::MissingCapability) when the VM has no
    /// in-kernel irqchip or KVM lacks `KVM_CAP_IRQ_ROUTING`.
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
    /// [`Error::MissingCapability`](crate::Error::MissingCapability) when KVM lacks
    /// `KVM_CAP_IRQ_ROUTING` or `KVM_CAP_SPLIT_IRQCHIP`.
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

    /// A root for the same VM with another placement policy, for a VMM that places some devices
    /// differently (and tests that run one device on each path). It shares everything else with
    /// this root: the routing table, the exit dispatcher (so overlaps are refused across both
    /// roots, and the vCPU loop consults one dispatcher), the injector (one for the VM, which the
    /// VMM runs once) and the split irqchip's IOAPIC.
    pub fn with_policy(&self, policy: Policy) -> Vm {
        Vm {
            router: self.router.clone(),
            backend: self.backend.with_policy(policy),
        }
    }

    /// Treats `cap` as missing from KVM: for hosts where a capability exists but must not be
    /// used, and for testing the fallback. Registrations this root makes afterwards fall back (or,
    /// on [`Policy::Kernel`], fail with [`Error::MissingCapability`](crate::Error::MissingCapability))
    /// as they would on a host without it.
    pub fn disable(mut self, cap: Capability) -> Vm {
        self.backend = self.backend.disable(cap);
        self
    }

    /// The injector of the interrupts this VM places in userspace, made on first use (its epoll
    /// descriptor; no thread). The VMM runs it, as with `vm.injector()?.spawn()?`, when it places
    /// any interrupt in userspace: on [`Policy::Userspace`], on [`Policy::Auto`] where the kernel
    /// cannot take one, and for the split irqchip's pins on every policy. Until it runs, those
    /// interrupts wait in their notifiers. Every root of one VM ([`with_policy`](Self::with_policy))
    /// shares it.
    ///
    /// # Errors
    ///
    /// Those of [`EventLoop::new`](crate::wait::EventLoop::new), the first time.
    pub fn injector(&self) -> Result<Injector> {
        self.backend.injector(&self.router)
    }

    /// The VM descriptor.
    pub fn fd(&self) -> &Arc<VmFd> {
        self.backend.vm()
    }

    /// The routing table.
    pub fn router(&self) -> &GsiRouter {
        &self.router
    }

    /// The dispatcher the vCPU loop hands `KVM_EXIT_MMIO` / `KVM_EXIT_IO` writes to.
    pub fn dispatcher(&self) -> &ExitDispatcher {
        self.backend.dispatcher()
    }

    /// Guest writes matching `write` add 1 to `notifier`: a kernel ioeventfd, or on the userspace
    /// path an entry in the [`dispatcher`](Self::dispatcher), as the policy places it. The
    /// registration keeps a clone of the notifier (the same descriptor, none opened).
    ///
    /// # Errors
    ///
    /// The validation errors of [`WriteMatch::validate`]; [`Error::IoEventExists`] for an
    /// overlap with a registration of this VM (on either path) or one the kernel holds;
    /// on the kernel path [`Error::MissingCapability`] without `KVM_CAP_IOEVENTFD` (or
    /// `KVM_CAP_IOEVENTFD_ANY_LENGTH` for [`Width::Any`](crate::Width::Any)) on
    /// [`Policy::Kernel`], [`Error::IoBusFull`] when the kernel bus is full,
    /// [`Error::FdExhausted`] when no descriptor is left and [`Error::IoEvent`] for other errnos
    /// (on [`Policy::Auto`] the kernel's refusals fall back to userspace instead).
    ///
    /// [`Error::IoEventExists`]: crate::Error::IoEventExists
    /// [`Error::MissingCapability`]: crate::Error::MissingCapability
    /// [`Error::IoBusFull`]: crate::Error::IoBusFull
    /// [`Error::FdExhausted`]: crate::Error::FdExhausted
    /// [`Error::IoEvent`]: crate::Error::IoEvent
    pub fn ioevent(&self, write: WriteMatch, notifier: &Notifier) -> Result<IoEvent> {
        self.backend.register(write, notifier)
    }

    /// An edge interrupt on `gsi` with a notifier of its own ([`IrqFd::notifier`] gives it to
    /// whoever triggers). See [`irqfd_with`](Self::irqfd_with).
    ///
    /// # Errors
    ///
    /// Those of [`irqfd_with`](Self::irqfd_with).
    pub fn irqfd(&self, gsi: Gsi) -> Result<IrqFd> {
        self.irqfd_with(gsi, &Notifier::new(Mode::Counter)?)
    }

    /// An edge interrupt on `gsi` that `notifier` triggers: a kernel irqfd (`KVM_IRQFD`), or on
    /// the userspace path the [`injector`](Self::injector) (`KVM_IRQ_LINE` pulse for irqchip
    /// routes, `KVM_SIGNAL_MSI` for MSI routes). One injection per wake-up of the notifier either
    /// way; a count already in the notifier is injected at once. The irqfd keeps a handle to the
    /// notifier (the same descriptor).
    ///
    /// On the split irqchip a GSI below 24 is a pin of the userspace IOAPIC, whatever the
    /// policy: the injector pulses it on the [`ioapic`](Self::ioapic), which delivers as the guest
    /// programmed the pin ([`Fallback::SplitIrqchip`](crate::fallback::Fallback::SplitIrqchip)).
    ///
    /// # Errors
    ///
    /// [`Error::GsiOutOfRange`](crate::Error::GsiOutOfRange),
    /// [`Error::UnroutedGsi`](crate::Error::UnroutedGsi) when `gsi` has no committed route,
    /// [`Error::IrqFdBusy`](crate::Error::IrqFdBusy) when the notifier is already an irqfd,
    /// [`Error::FdExhausted`](crate::Error::FdExhausted); on the kernel path
    /// [`Error::MissingCapability`](crate::Error::MissingCapability) without `KVM_CAP_IRQFD` on
    /// [`Policy::Kernel`] and [`Error::IrqFd`](crate::Error::IrqFd) for the kernel's refusal (on
    /// [`Policy::Auto`] these fall back to userspace).
    pub fn irqfd_with(&self, gsi: Gsi, notifier: &Notifier) -> Result<IrqFd> {
        self.backend.irqfd(&self.router, gsi, notifier)
    }

    /// A level interrupt on `gsi` with trigger and resample notifiers of its own. See
    /// [`level_irqfd_with`](Self::level_irqfd_with).
    ///
    /// # Errors
    ///
    /// Those of [`level_irqfd_with`](Self::level_irqfd_with).
    pub fn level_irqfd(&self, gsi: Gsi) -> Result<LevelIrqFd> {
        let (trigger, resample) = (Notifier::new(Mode::Counter)?, Notifier::new(Mode::Counter)?);
        self.level_irqfd_with(gsi, &trigger, &resample)
    }

    /// A level interrupt on `gsi` that `trigger` asserts, with `resample` signalled at its EOI:
    /// a kernel irqfd with `KVM_IRQFD_FLAG_RESAMPLE`, or on the userspace path the
    /// [`injector`](Self::injector), which holds the line high with `KVM_IRQ_LINE` until
    /// [`LevelIrqFd::deassert`] (see [`LevelIrqFd`] for the device's side, the same on both).
    /// For eventfds made elsewhere (a vhost-user backend's call fd, say).
    ///
    /// On the split irqchip a GSI below 24 is a pin of the userspace IOAPIC, whatever the
    /// policy: the injector asserts it on the [`ioapic`](Self::ioapic), which lowers it and
    /// signals `resample` at the guest's EOI, as a kernel resample irqfd does.
    ///
    /// # Errors
    ///
    /// Those of [`irqfd_with`](Self::irqfd_with), plus
    /// [`Error::ResampleNeedsIrqchip`](crate::Error::ResampleNeedsIrqchip) when `gsi` is routed
    /// as an MSI and, on [`Policy::Kernel`],
    /// [`Error::MissingCapability`](crate::Error::MissingCapability) without
    /// `KVM_CAP_IRQFD_RESAMPLE`.
    pub fn level_irqfd_with(
        &self,
        gsi: Gsi,
        trigger: &Notifier,
        resample: &Notifier,
    ) -> Result<LevelIrqFd> {
        self.backend
            .level_irqfd(&self.router, gsi, trigger, resample)
    }

    /// A function's `count` MSI-X vectors, in their reset state (see [`MsixVectors`]).
    ///
    /// # Errors
    ///
    /// [`Error::MsixVectorCount`](crate::Error::MsixVectorCount) unless `1 <= count <= 2048`.
    pub fn msix(&self, count: usize) -> Result<MsixVectors> {
        MsixVectors::new(&self.router, count)
    }

    /// The MSI-X vectors of a saved state ([`MsixVectors::save`]) on this VM (a new VM after
    /// migration): every delivering vector re-registered; a pending bit on a delivering vector is
    /// delivered now, on a masked one when the guest unmasks it. Restore the vCPUs' local APICs
    /// first: a pending interrupt this delivers lands in them.
    ///
    /// # Errors
    ///
    /// [`Error::MsixVectorCount`](crate::Error::MsixVectorCount), and the routing and irqfd
    /// errors of registering.
    pub fn restore_msix(&self, state: &MsixState) -> Result<MsixVectors> {
        MsixVectors::restore(&self.router, state)
    }

    /// The notification half of a virtio-mmio device: `device.queues` queue notifications at
    /// `base + 0x050` (4-byte writes, datamatch = queue index) and a level interrupt on
    /// `device.gsi`, each placed by this root's policy.
    ///
    /// # Errors
    ///
    /// Those of [`ioevent`](Self::ioevent) and [`level_irqfd`](Self::level_irqfd).
    pub fn virtio_mmio(&self, device: &MmioLayout) -> Result<MmioNotify> {
        MmioNotify::new(&self.backend, &self.router, device)
    }

    /// The device of a saved virtio-pci state ([`PciNotify::save`]), on this VM: the MSI-X
    /// vectors restored first (every delivering vector routed in one commit, a pending bit on a
    /// delivering vector delivered once, now; on a masked one when it is unmasked), then the
    /// notify addresses registered, the vectors set, and each queue that had unread kicks kicked
    /// that many times, so its device sees the work it had not read and a device that had read
    /// everything sees nothing extra. Restore the vCPUs' local APICs first: a pending interrupt
    /// this delivers lands in them.
    ///
    /// # Errors
    ///
    /// [`Error::SavedState`](crate::Error::SavedState) when the state does not fit itself (a
    /// queue count other than the layout's, a vector past the table), before anything is made;
    /// those of [`restore_msix`](Self::restore_msix) and [`virtio_pci`](Self::virtio_pci), and
    /// [`Error::Notifier`](crate::Error::Notifier).
    pub fn restore_virtio_pci(&self, state: &PciNotifyState) -> Result<PciNotify> {
        PciNotify::restore(&self.backend, &self.router, state)
    }

    /// A level line of a saved state, on this VM: a new [`LevelIrqFd`] on the same GSI (placed
    /// by this root's policy) with the unread triggers written to it and the unread resamples to
    /// its resample notifier, so the device reads what it had not read yet.
    ///
    /// # Errors
    ///
    /// Those of [`level_irqfd`](Self::level_irqfd), and [`Error::Notifier`](crate::Error::Notifier).
    pub fn restore_level_irqfd(&self, state: &LevelLineState) -> Result<LevelIrqFd> {
        let line = self.level_irqfd(state.gsi)?;
        if state.unread_resamples > 0 {
            line.resample().add(state.unread_resamples)?;
        }
        if state.unread_triggers > 0 {
            line.notifier().add(state.unread_triggers)?;
        }
        Ok(line)
    }

    /// Makes many registrations in one call: each kick in `kicks` (guest writes adding to a
    /// notifier) registered back to back, and each interrupt in `interrupts` an MSI route — all
    /// of them in **one** routing commit — with an irqfd on its notifier. All or nothing: on an
    /// error what was made is undone and the error returned. The [`Batch`] tears everything down
    /// together when dropped (or at [`Batch::teardown`]): the ioeventfds back to back, the
    /// irqfds back to back, then every route in one commit.
    ///
    /// # Errors
    ///
    /// Those of [`ioevent`](Self::ioevent), [`Transaction::add_msi`](crate::kvm::Transaction::add_msi),
    /// [`Transaction::commit`](crate::kvm::Transaction::commit) and
    /// [`irqfd_with`](Self::irqfd_with).
    pub fn batch(
        &self,
        kicks: &[(WriteMatch, &Notifier)],
        interrupts: &[(MsiMessage, &Notifier)],
    ) -> Result<Batch> {
        let mut batch = Batch {
            ioevents: Vec::with_capacity(kicks.len()),
            irqfds: Vec::with_capacity(interrupts.len()),
            gsis: Vec::new(),
            router: self.router.clone(),
        };
        for &(write, notifier) in kicks {
            batch.ioevents.push(self.ioevent(write, notifier)?);
        }
        if !interrupts.is_empty() {
            let mut tx = self.router.transaction();
            let gsis = interrupts
                .iter()
                .map(|&(msg, _)| tx.add_msi(msg))
                .collect::<Result<Vec<Gsi>>>()?;
            tx.commit()?;
            batch.gsis = gsis;
        }
        for (&gsi, &(_, notifier)) in batch.gsis.iter().zip(interrupts) {
            batch.irqfds.push(self.irqfd_with(gsi, notifier)?);
        }
        Ok(batch)
    }

    /// The notification half of a virtio-pci device whose queues interrupt on `vectors`: one
    /// notify address per queue, queue `i` at `notify_base + queue_notify_off[i] *
    /// notify_off_multiplier`. A queue whose address is its own takes any write there
    /// ([`Width::Any`](crate::Width::Any), no datamatch: the fastest MMIO ioeventfd KVM has, and
    /// one that `VIRTIO_F_NOTIFICATION_DATA` writes match too); queues sharing an address take
    /// 2-byte writes of their index (datamatch), as does every queue where KVM lacks
    /// `KVM_CAP_IOEVENTFD_ANY_LENGTH`. Every queue and the configuration start with
    /// [`NO_VECTOR`](crate::virtio::NO_VECTOR). With `layout.intx`, a level line on that GSI
    /// (placed by this root's policy) is the function's interrupt while the guest leaves MSI-X
    /// disabled: interrupts set the ISR status, the guest's read of it
    /// ([`PciNotify::read_isr`](crate::virtio::PciNotify::read_isr)) lowers the line.
    ///
    /// # Errors
    ///
    /// [`Error::VirtioQueueCount`](crate::Error::VirtioQueueCount) for more than 65535 queues,
    /// [`Error::AddressWraps`](crate::Error::AddressWraps) when an address overflows, and those
    /// of [`ioevent`](Self::ioevent) and [`level_irqfd`](Self::level_irqfd).
    pub fn virtio_pci(&self, layout: &PciLayout, vectors: &MsixVectors) -> Result<PciNotify> {
        PciNotify::new(&self.backend, &self.router, layout, vectors)
    }
}

/// Registrations made together by [`Vm::batch`] and torn down together: dropping it unregisters
/// the ioeventfds back to back, deassigns the irqfds back to back and removes their routes in one
/// routing commit.
#[must_use = "dropping a Batch unregisters everything in it at once"]
pub struct Batch {
    ioevents: Vec<IoEvent>,
    irqfds: Vec<IrqFd>,
    gsis: Vec<Gsi>,
    router: GsiRouter,
}

impl fmt::Debug for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch")
            .field("ioevents", &self.ioevents.len())
            .field("irqfds", &self.irqfds.len())
            .finish()
    }
}

impl Batch {
    /// The kicks' registrations, in the order given.
    pub fn ioevents(&self) -> &[IoEvent] {
        &self.ioevents
    }

    /// The interrupts' irqfds, in the order given (each knows its GSI).
    pub fn irqfds(&self) -> &[IrqFd] {
        &self.irqfds
    }

    /// Tears the batch down now (as dropping it does) and reports the routing commit's error,
    /// which a drop can only ignore.
    ///
    /// # Errors
    ///
    /// Those of [`Transaction::commit`](crate::kvm::Transaction::commit) for the route removal.
    pub fn teardown(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        // Vec::clear drops in order: the ioeventfds back to back, then the irqfds, each
        // deassigned before its route goes.
        self.ioevents.clear();
        self.irqfds.clear();
        if self.gsis.is_empty() {
            return Ok(());
        }
        // A route that cannot go (another irqfd bound to it meanwhile) is kept; the others go
        // in one commit, and the first refusal is reported.
        self.router.remove_all(&std::mem::take(&mut self.gsis))
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        let _ = self.release();
    }
}
