//! [`IrqFd`] and [`LevelIrqFd`]: a device adds to a [`Notifier`] and the guest is interrupted —
//! by KVM (a kernel irqfd) or by the backend's [`Injector`](super::Injector) (`KVM_IRQ_LINE` / `KVM_SIGNAL_MSI`).
//!
//! An edge irqfd injects its GSI once per write (writes made before the injection coalesce). A
//! level irqfd asserts an irqchip pin and keeps it asserted; when the guest EOIs the pin KVM
//! de-asserts it and adds 1 to the resample notifier. The device then checks its own condition
//! (for example its interrupt status register) and asserts again if an interrupt is still due.
//!
//! Both paths bind through the VM's [`GsiRouter`], which refuses a GSI that has no route: KVM
//! itself would accept it and then drop every interrupt.

use std::fmt;

use crate::device::{GuestInterrupt, LevelInterrupt};
use crate::error::{Error, Result};
use crate::fallback::inject::Injector;
use crate::fallback::placement::{Fallback, Placement};
use crate::irqchip::Ioapic;
use crate::kvm::irqfd::Binding;
use crate::kvm::{Gsi, GsiRouter};
use crate::notifier::Notifier;

/// How an irqfd's trigger reaches KVM.
enum Delivery {
    /// Assigned with `KVM_IRQFD`.
    Kernel(Binding),
    /// Read by the injector, which calls `KVM_IRQ_LINE` / `KVM_SIGNAL_MSI`.
    Injected {
        injector: Injector,
        /// The router the binding is counted on; `None` for a pin of the split irqchip's
        /// IOAPIC, which counts its own sources.
        router: Option<GsiRouter>,
        token: u64,
        trigger: Notifier,
        gsi: Gsi,
    },
}

impl Delivery {
    /// A kernel irqfd: `trigger` (a handle to it) assigned with `KVM_IRQFD`.
    fn kernel(
        router: &GsiRouter,
        gsi: Gsi,
        trigger: &Notifier,
        resample: Option<&Notifier>,
    ) -> Result<Delivery> {
        Binding::assign(router, gsi, trigger.clone(), resample)
            .map(Delivery::Kernel)
            .map_err(|(e, _)| e)
    }

    /// Registers `trigger` with `injector` for `gsi`, bound through the router like a kernel
    /// irqfd (the same GSI checks, the same count); with `resample`, as a level line. With
    /// `ioapic`, `gsi` is a pin of the split irqchip's IOAPIC and becomes one of its sources.
    fn injected(
        injector: &Injector,
        router: &GsiRouter,
        gsi: Gsi,
        trigger: &Notifier,
        resample: Option<&Notifier>,
        ioapic: Option<&Ioapic>,
    ) -> Result<Delivery> {
        let trigger = trigger.clone();
        // Counted on the router first, then added to the injector outside the router's lock:
        // the injector takes its own lock and then the router's, never the other way.
        let router = match ioapic {
            Some(_) => None,
            None => {
                router.bind(gsi, resample.is_some(), |_| Ok(()))?;
                Some(router.clone())
            }
        };
        let token = match injector.add(gsi, &trigger, resample, ioapic) {
            Ok(token) => token,
            Err(e) => {
                if let Some(r) = &router {
                    r.unbind(gsi, |_| {});
                }
                return Err(e);
            }
        };
        Ok(Delivery::Injected {
            injector: injector.clone(),
            router,
            token,
            trigger,
            gsi,
        })
    }

    fn trigger(&self) -> &Notifier {
        match self {
            Delivery::Kernel(b) => b.trigger(),
            Delivery::Injected { trigger, .. } => trigger,
        }
    }

    fn gsi(&self) -> Gsi {
        match self {
            Delivery::Kernel(b) => b.gsi(),
            Delivery::Injected { gsi, .. } => *gsi,
        }
    }
}

/// Deassigns the irqfd (or stops the injector serving it): dropping an [`IrqFd`] or a
/// [`LevelIrqFd`] does this first, before their notifiers close.
impl Drop for Delivery {
    fn drop(&mut self) {
        match self {
            Delivery::Kernel(b) => b.release(),
            Delivery::Injected {
                injector,
                router,
                token,
                gsi,
                ..
            } => {
                injector.remove(*token);
                if let Some(r) = router {
                    r.unbind(*gsi, |_| {});
                }
            }
        }
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Delivery::Kernel(b) => b.fmt(f),
            Delivery::Injected { gsi, trigger, .. } => f
                .debug_struct("Injected")
                .field("gsi", gsi)
                .field("trigger", trigger)
                .finish(),
        }
    }
}

/// An edge-triggered irqfd: each [`trigger`](Self::trigger) injects the GSI.
/// Dropping it deassigns the irqfd.
///
/// [`Vm::irqfd`](crate::Vm::irqfd) makes one: a kernel irqfd, or one the VM's injector serves
/// ([`placement`](Self::placement) says which). The device's side is the same.
///
/// ```
/// # if !vm_notify_testkit::kvm_or_skip("doc example") { return Ok(()); }
/// # use std::sync::Arc;
/// use vm_notify::fallback::Policy;
/// use vm_notify::Vm;
/// # let kvm = kvm_ioctls::Kvm::new()?;
/// # let fd = Arc::new(kvm.create_vm()?);
/// # fd.create_irq_chip()?;
/// let vm = Vm::new(fd, Policy::Kernel)?;
/// // GSI 4: the default route to PIC pin 4 and IOAPIC pin 4 (a serial port's line).
/// let irq = vm.irqfd(4)?;
/// irq.trigger()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
#[must_use = "dropping an IrqFd deassigns it at once"]
pub struct IrqFd {
    delivery: Delivery,
    placement: Placement,
}

impl IrqFd {
    /// Binds `notifier` to inject `gsi` with `KVM_IRQFD`. The irqfd keeps a handle to the
    /// notifier (the same descriptor). A count already in the notifier is injected at once.
    ///
    /// # Errors
    ///
    /// [`Error::GsiOutOfRange`](crate::Error::GsiOutOfRange),
    /// [`Error::UnroutedGsi`](crate::Error::UnroutedGsi) when `gsi` has no committed route,
    /// [`Error::MissingCapability`](crate::Error::MissingCapability) without `KVM_CAP_IRQFD`,
    /// [`Error::IrqFdBusy`](crate::Error::IrqFdBusy) when the notifier is already an irqfd,
    /// [`Error::FdExhausted`](crate::Error::FdExhausted), or
    /// [`Error::IrqFd`](crate::Error::IrqFd).
    pub(crate) fn with_notifier(
        router: &GsiRouter,
        gsi: Gsi,
        notifier: &Notifier,
    ) -> Result<IrqFd> {
        Ok(IrqFd {
            delivery: Delivery::kernel(router, gsi, notifier, None)?,
            placement: Placement::Kernel,
        })
    }

    pub(crate) fn injected(
        injector: &Injector,
        router: &GsiRouter,
        gsi: Gsi,
        notifier: &Notifier,
        ioapic: Option<&Ioapic>,
        why: Fallback,
    ) -> Result<IrqFd> {
        Ok(IrqFd {
            delivery: Delivery::injected(injector, router, gsi, notifier, None, ioapic)?,
            placement: Placement::Userspace(why),
        })
    }

    /// Injects the GSI once (adds 1 to the notifier).
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`](crate::Error::Notifier) if the eventfd write fails.
    pub fn trigger(&self) -> Result<()> {
        self.delivery.trigger().notify()
    }

    /// The GSI this irqfd injects.
    pub fn gsi(&self) -> Gsi {
        self.delivery.gsi()
    }

    /// The irqfd's handle to the notifier (clone it for another thread: a clone is the same descriptor).
    pub fn notifier(&self) -> &Notifier {
        self.delivery.trigger()
    }

    /// Whether KVM injects (an irqfd) or the injector does, and why.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }
}

/// A level line's notification state, saved by [`LevelIrqFd::save`] and restored by
/// [`Vm::restore_level_irqfd`](crate::Vm::restore_level_irqfd).
///
/// Whether the line is asserted belongs to the device (its interrupt condition, which it
/// re-asserts after a restore while it holds) and to the irqchip (the VM's state); what the
/// notification layer holds in between are the two counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct LevelLineState {
    /// The GSI the line asserts.
    pub gsi: Gsi,
    /// Triggers written and not yet taken by the kernel or the injector.
    pub unread_triggers: u64,
    /// Resamples signalled and not yet read by the device.
    pub unread_resamples: u64,
}

/// A level-triggered irqfd with a resample notifier. Dropping it deassigns the irqfd (and
/// lowers the line).
///
/// The device's side, the same on both paths:
///
/// * [`trigger`](Self::trigger) when the interrupt condition becomes true: the pin goes high.
/// * On [`resample`](Self::resample), assert again if the condition still holds.
/// * [`deassert`](Self::deassert) where the condition clears (typically while handling the
///   guest's write to the device's acknowledge register).
///
/// [`Vm::level_irqfd`](crate::Vm::level_irqfd) makes one. In the kernel it is an irqfd with
/// `KVM_IRQFD_FLAG_RESAMPLE`: the pin stays asserted until the guest EOIs it, then KVM lowers it
/// and adds 1 to `resample`, and `deassert` has nothing to do. The VM's injector can serve one
/// instead ([`placement`](Self::placement) says which): the injector raises the pin with
/// `KVM_IRQ_LINE` and holds it high — the irqchip re-delivers at each EOI while it is — until
/// `deassert` lowers it and adds 1 to `resample`. There userspace sees no EOI, so `deassert` is
/// what lowers the line; called on the vCPU thread before the guest's EOI, it leaves no extra
/// delivery.
///
/// On the split irqchip a level line on a pin (GSI below 24) is a source of the VM's userspace
/// [`Ioapic`](crate::irqchip::Ioapic), served by the injector whatever the policy: the
/// pin is asserted at `trigger` and lowered at the guest's EOI (`KVM_EXIT_IOAPIC_EOI`), which adds
/// 1 to `resample` — the kernel path's contract, with the same counts. `deassert` there stops this
/// source holding the pin (so a masked pin does not fire at unmask for a cleared condition) and
/// signals nothing: the resample comes at the EOI.
///
/// The GSI must be routed to an irqchip pin (PIC or IOAPIC), programmed level-triggered by the
/// guest.
#[derive(Debug)]
#[must_use = "dropping a LevelIrqFd deassigns it at once"]
pub struct LevelIrqFd {
    delivery: Delivery,
    resample: Notifier,
    placement: Placement,
}

impl LevelIrqFd {
    /// Binds `trigger` to assert `gsi` and `resample` to be signalled at its EOI, with
    /// `KVM_IRQFD`.
    ///
    /// # Errors
    ///
    /// Those of [`IrqFd::with_notifier`], plus
    /// [`Error::ResampleNeedsIrqchip`](crate::Error::ResampleNeedsIrqchip) when `gsi` is routed
    /// as an MSI and [`Error::MissingCapability`](crate::Error::MissingCapability) without
    /// `KVM_CAP_IRQFD_RESAMPLE`.
    pub(crate) fn with_notifiers(
        router: &GsiRouter,
        gsi: Gsi,
        trigger: &Notifier,
        resample: &Notifier,
    ) -> Result<LevelIrqFd> {
        let resample = resample.clone();
        Ok(LevelIrqFd {
            delivery: Delivery::kernel(router, gsi, trigger, Some(&resample))?,
            resample,
            placement: Placement::Kernel,
        })
    }

    pub(crate) fn injected(
        injector: &Injector,
        router: &GsiRouter,
        gsi: Gsi,
        trigger: &Notifier,
        resample: &Notifier,
        ioapic: Option<&Ioapic>,
        why: Fallback,
    ) -> Result<LevelIrqFd> {
        let resample = resample.clone();
        Ok(LevelIrqFd {
            delivery: Delivery::injected(injector, router, gsi, trigger, Some(&resample), ioapic)?,
            resample,
            placement: Placement::Userspace(why),
        })
    }

    /// Asserts the line (adds 1 to the trigger notifier).
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`](crate::Error::Notifier) if the eventfd write fails.
    pub fn trigger(&self) -> Result<()> {
        self.delivery.trigger().notify()
    }

    /// The device's interrupt condition cleared. On the injector path this takes back a trigger
    /// not yet served and lowers the line if it is held high (then adds 1 to
    /// [`resample`](Self::resample)); returns whether it lowered the line. On the kernel path
    /// KVM lowers the line at the EOI itself, and this returns `Ok(false)`. On a pin of the split
    /// irqchip's IOAPIC it takes back a trigger not yet served and stops holding the pin,
    /// returning whether it held it; the resample comes at the EOI.
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`](crate::Error::Notifier) if the trigger read or the resample write
    /// fails, [`Error::IrqLine`](crate::Error::IrqLine) if `KVM_IRQ_LINE` does.
    pub fn deassert(&self) -> Result<bool> {
        match &self.delivery {
            Delivery::Kernel(_) => Ok(false),
            Delivery::Injected {
                injector, token, ..
            } => injector.deassert(*token),
        }
    }

    /// The notifier signalled when the line is lowered: at the guest's EOI on the kernel path,
    /// at [`deassert`](Self::deassert) on the injector path.
    pub fn resample(&self) -> &Notifier {
        &self.resample
    }

    /// The GSI this irqfd asserts.
    pub fn gsi(&self) -> Gsi {
        self.delivery.gsi()
    }

    /// The irqfd's handle to the trigger notifier.
    pub fn notifier(&self) -> &Notifier {
        self.delivery.trigger()
    }

    /// Whether KVM asserts the line (an irqfd) or the injector does, and why.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// The line's counters, read without consuming them (from `/proc/self/fdinfo`), for a snapshot.
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`](crate::Error::Notifier) if a counter cannot be read.
    pub fn save(&self) -> Result<LevelLineState> {
        Ok(LevelLineState {
            gsi: self.gsi(),
            unread_triggers: self.notifier().peek()?,
            unread_resamples: self.resample.peek()?,
        })
    }
}

impl GuestInterrupt for IrqFd {
    fn trigger(&self) -> Result<bool> {
        IrqFd::trigger(self).map(|()| true)
    }

    fn eventfd(&self) -> Result<Option<Notifier>> {
        Ok(Some(self.notifier().clone()))
    }
}

impl vm_superio::Trigger for IrqFd {
    type E = Error;

    fn trigger(&self) -> Result<()> {
        IrqFd::trigger(self)
    }
}

impl GuestInterrupt for LevelIrqFd {
    fn trigger(&self) -> Result<bool> {
        LevelIrqFd::trigger(self).map(|()| true)
    }

    fn eventfd(&self) -> Result<Option<Notifier>> {
        Ok(Some(self.notifier().clone()))
    }

    fn level(&self) -> Option<&dyn LevelInterrupt> {
        Some(self)
    }
}

impl LevelInterrupt for LevelIrqFd {
    fn deassert(&self) -> Result<bool> {
        LevelIrqFd::deassert(self)
    }

    fn resample(&self) -> &Notifier {
        &self.resample
    }
}
