//! [`IrqFd`] and [`LevelIrqFd`]: a device adds to a [`Notifier`] and KVM injects a GSI.
//!
//! An edge irqfd injects its GSI once per write (writes made before the injection coalesce). A
//! level irqfd asserts an irqchip pin and keeps it asserted; when the guest EOIs the pin KVM
//! de-asserts it and adds 1 to the resample notifier. The device then checks its own condition
//! (for example its interrupt status register) and asserts again if an interrupt is still due.
//!
//! Both go through the VM's [`GsiRouter`], which refuses a GSI that has no route: KVM itself would
//! accept it and then drop every interrupt.

use std::fmt;

use crate::backend as sys;
use crate::backend::{Fallback, Path};
use crate::error::{Capability, Error, Result};
use crate::inject::Injector;
use crate::notifier::Notifier;
use crate::routing::{Gsi, GsiRouter, Route, GSI_LIMIT};

/// One `KVM_IRQFD` assignment. It has no `Drop` of its own: its owners ([`IrqFd`],
/// [`LevelIrqFd`], the MSI-X vectors) call [`release`](Self::release) or
/// [`detach`](Self::detach) exactly once.
pub(crate) struct Binding {
    router: GsiRouter,
    gsi: Gsi,
    trigger: Notifier,
}

impl Binding {
    fn new(
        router: &GsiRouter,
        gsi: Gsi,
        trigger: &Notifier,
        resample: Option<&Notifier>,
    ) -> Result<Binding> {
        Binding::assign(router, gsi, trigger.try_clone()?, resample).map_err(|(e, _)| e)
    }

    /// Assigns `trigger` to inject `gsi`, taking ownership of it; on failure the notifier comes
    /// back with the error.
    pub(crate) fn assign(
        router: &GsiRouter,
        gsi: Gsi,
        trigger: Notifier,
        resample: Option<&Notifier>,
    ) -> std::result::Result<Binding, (Error, Notifier)> {
        let resample_cap = resample.map(|_| Capability::IrqFdResample);
        for cap in std::iter::once(Capability::IrqFd).chain(resample_cap) {
            if !router.has(cap) {
                return Err((Error::MissingCapability(cap), trigger));
            }
        }
        let bound = router.bind(gsi, |vm, routes| {
            if resample.is_some() && routes.iter().any(|r| matches!(r, Route::Msi(_))) {
                return Err(Error::ResampleNeedsIrqchip { gsi });
            }
            sys::assign_irqfd(vm, &trigger, resample, gsi).map_err(|source| {
                match source.raw_os_error() {
                    Some(libc::EBUSY) => Error::IrqFdBusy { gsi },
                    _ => Error::IrqFd { gsi, source },
                }
            })
        });
        match bound {
            Ok(()) => Ok(Binding {
                router: router.clone(),
                gsi,
                trigger,
            }),
            Err(e) => Err((e, trigger)),
        }
    }

    /// The notifier that injects the GSI.
    pub(crate) fn trigger(&self) -> &Notifier {
        &self.trigger
    }

    /// Deassigns the irqfd and gives back its notifier. Once this returns, writes to the
    /// notifier stay in its counter.
    pub(crate) fn detach(self) -> Notifier {
        self.release();
        self.trigger
    }

    /// Deassigns the irqfd. KVM deassigns by (eventfd, GSI) and returns 0 even when nothing
    /// matched, so there is no error worth reporting; the router's count is what the library
    /// relies on.
    fn release(&self) {
        let (gsi, trigger) = (self.gsi, &self.trigger);
        self.router.unbind(gsi, |vm| {
            let _ = sys::deassign_irqfd(vm, trigger, gsi);
        });
    }
}

impl fmt::Debug for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Binding")
            .field("gsi", &self.gsi)
            .field("trigger", &self.trigger)
            .finish()
    }
}

/// How an irqfd's trigger reaches KVM.
enum Delivery {
    /// Assigned with `KVM_IRQFD`.
    Kernel(Binding),
    /// Read by the injector thread, which calls `KVM_IRQ_LINE` / `KVM_SIGNAL_MSI`.
    Injected {
        injector: Injector,
        token: u64,
        trigger: Notifier,
        gsi: Gsi,
    },
}

impl Delivery {
    /// Registers `trigger` with `injector` for `gsi` after the checks `KVM_IRQFD` would make;
    /// with `resample`, as a level line.
    fn injected(
        injector: &Injector,
        router: &GsiRouter,
        gsi: Gsi,
        trigger: &Notifier,
        resample: Option<&Notifier>,
    ) -> Result<Delivery> {
        if gsi >= GSI_LIMIT {
            return Err(Error::GsiOutOfRange {
                gsi,
                limit: GSI_LIMIT,
            });
        }
        let routes = router.routes(gsi);
        if routes.is_empty() {
            return Err(Error::UnroutedGsi { gsi });
        }
        if resample.is_some() && routes.iter().any(|r| matches!(r, Route::Msi(_))) {
            return Err(Error::ResampleNeedsIrqchip { gsi });
        }
        let trigger = trigger.try_clone()?;
        let token = injector.add(gsi, &trigger, resample)?;
        Ok(Delivery::Injected {
            injector: injector.clone(),
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
            Delivery::Kernel(b) => b.gsi,
            Delivery::Injected { gsi, .. } => *gsi,
        }
    }

    fn release(&self) {
        match self {
            Delivery::Kernel(b) => b.release(),
            Delivery::Injected {
                injector, token, ..
            } => injector.remove(*token),
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
/// Made by [`IrqFd::new`] it is a kernel irqfd; a [`Backend`](crate::Backend) can make one that
/// an injector thread serves instead ([`path`](Self::path) says which). The device's side is the
/// same.
///
/// ```
/// # if !vm_notify::testkit::kvm_or_skip("doc example") { return Ok(()); }
/// # use std::sync::Arc;
/// use vm_notify::{GsiRouter, IrqFd, Mode, Notifier};
/// # let kvm = kvm_ioctls::Kvm::new()?;
/// # let vm = Arc::new(kvm.create_vm()?);
/// # vm.create_irq_chip()?;
/// let router = GsiRouter::new(vm.clone())?;
/// // GSI 4: the default route to PIC pin 4 and IOAPIC pin 4 (a serial port's line).
/// let irq = IrqFd::new(&router, 4, &Notifier::new(Mode::Counter)?)?;
/// irq.trigger()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
#[must_use = "dropping an IrqFd deassigns it at once"]
pub struct IrqFd {
    delivery: Delivery,
    path: Path,
}

impl Drop for IrqFd {
    fn drop(&mut self) {
        self.delivery.release();
    }
}

impl IrqFd {
    /// Binds `notifier` to inject `gsi` with `KVM_IRQFD`. The irqfd keeps its own descriptor
    /// of the notifier.
    ///
    /// A count already in the notifier is injected at once.
    ///
    /// # Errors
    ///
    /// [`Error::GsiOutOfRange`], [`Error::UnroutedGsi`] when `gsi` has no committed route,
    /// [`Error::MissingCapability`] without `KVM_CAP_IRQFD`, [`Error::IrqFdBusy`] when the
    /// notifier is already an irqfd, [`Error::FdExhausted`], or [`Error::IrqFd`].
    pub fn new(router: &GsiRouter, gsi: Gsi, notifier: &Notifier) -> Result<IrqFd> {
        Ok(IrqFd {
            delivery: Delivery::Kernel(Binding::new(router, gsi, notifier, None)?),
            path: Path::Kernel,
        })
    }

    pub(crate) fn injected(
        injector: &Injector,
        router: &GsiRouter,
        gsi: Gsi,
        notifier: &Notifier,
        why: Fallback,
    ) -> Result<IrqFd> {
        Ok(IrqFd {
            delivery: Delivery::injected(injector, router, gsi, notifier, None)?,
            path: Path::Userspace(why),
        })
    }

    /// Injects the GSI once (adds 1 to the notifier).
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`] if the eventfd write fails.
    pub fn trigger(&self) -> Result<()> {
        self.delivery.trigger().notify()
    }

    /// The GSI this irqfd injects.
    pub fn gsi(&self) -> Gsi {
        self.delivery.gsi()
    }

    /// The irqfd's own descriptor of the notifier (clone it for another thread).
    pub fn notifier(&self) -> &Notifier {
        self.delivery.trigger()
    }

    /// Whether KVM injects (an irqfd) or the injector thread does, and why.
    pub fn path(&self) -> &Path {
        &self.path
    }
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
/// Made by [`LevelIrqFd::new`] it is a kernel irqfd with `KVM_IRQFD_FLAG_RESAMPLE`: the pin stays
/// asserted until the guest EOIs it, then KVM lowers it and adds 1 to `resample`, and `deassert`
/// has nothing to do. A [`Backend`](crate::Backend) can make one that its injector thread serves
/// instead ([`path`](Self::path) says which): the injector raises the pin with `KVM_IRQ_LINE` and
/// holds it high — the irqchip re-delivers at each EOI while it is — until `deassert` lowers it and
/// adds 1 to `resample`. There userspace sees no EOI, so `deassert` is what lowers the line; called
/// on the vCPU thread before the guest's EOI, it leaves no extra delivery.
///
/// The GSI must be routed to an irqchip pin (PIC or IOAPIC), programmed level-triggered by the
/// guest.
#[derive(Debug)]
#[must_use = "dropping a LevelIrqFd deassigns it at once"]
pub struct LevelIrqFd {
    delivery: Delivery,
    resample: Notifier,
    path: Path,
}

impl Drop for LevelIrqFd {
    fn drop(&mut self) {
        self.delivery.release();
    }
}

impl LevelIrqFd {
    /// Binds `trigger` to assert `gsi` and `resample` to be signalled at its EOI, with
    /// `KVM_IRQFD`.
    ///
    /// # Errors
    ///
    /// Those of [`IrqFd::new`], plus [`Error::ResampleNeedsIrqchip`] when `gsi` is routed as an
    /// MSI and [`Error::MissingCapability`] without `KVM_CAP_IRQFD_RESAMPLE`.
    pub fn new(
        router: &GsiRouter,
        gsi: Gsi,
        trigger: &Notifier,
        resample: &Notifier,
    ) -> Result<LevelIrqFd> {
        let resample = resample.try_clone()?;
        Ok(LevelIrqFd {
            delivery: Delivery::Kernel(Binding::new(router, gsi, trigger, Some(&resample))?),
            resample,
            path: Path::Kernel,
        })
    }

    pub(crate) fn injected(
        injector: &Injector,
        router: &GsiRouter,
        gsi: Gsi,
        trigger: &Notifier,
        resample: &Notifier,
        why: Fallback,
    ) -> Result<LevelIrqFd> {
        let resample = resample.try_clone()?;
        Ok(LevelIrqFd {
            delivery: Delivery::injected(injector, router, gsi, trigger, Some(&resample))?,
            resample,
            path: Path::Userspace(why),
        })
    }

    /// Asserts the line (adds 1 to the trigger notifier).
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`] if the eventfd write fails.
    pub fn trigger(&self) -> Result<()> {
        self.delivery.trigger().notify()
    }

    /// The device's interrupt condition cleared. On the injector path this takes back a trigger
    /// not yet served and lowers the line if it is held high (then adds 1 to
    /// [`resample`](Self::resample)); returns whether it lowered the line. On the kernel path
    /// KVM lowers the line at the EOI itself, and this returns `Ok(false)`.
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`] if the trigger read or the resample write fails, [`Error::IrqLine`] if
    /// `KVM_IRQ_LINE` does.
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

    /// The irqfd's own descriptor of the trigger notifier.
    pub fn notifier(&self) -> &Notifier {
        self.delivery.trigger()
    }

    /// Whether KVM asserts the line (an irqfd) or the injector thread does, and why.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
