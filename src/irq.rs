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
use crate::error::{Capability, Error, Result};
use crate::notifier::Notifier;
use crate::routing::{Gsi, GsiRouter, Route};

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

/// An edge-triggered irqfd: each [`trigger`](Self::trigger) injects the GSI.
/// Dropping it deassigns the irqfd.
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
    binding: Binding,
}

impl Drop for IrqFd {
    fn drop(&mut self) {
        self.binding.release();
    }
}

impl IrqFd {
    /// Binds `notifier` to inject `gsi`. The irqfd keeps its own descriptor of the notifier.
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
            binding: Binding::new(router, gsi, notifier, None)?,
        })
    }

    /// Injects the GSI once (adds 1 to the notifier).
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`] if the eventfd write fails.
    pub fn trigger(&self) -> Result<()> {
        self.binding.trigger().notify()
    }

    /// The GSI this irqfd injects.
    pub fn gsi(&self) -> Gsi {
        self.binding.gsi
    }

    /// The irqfd's own descriptor of the notifier (clone it for another thread).
    pub fn notifier(&self) -> &Notifier {
        self.binding.trigger()
    }
}

/// A level-triggered irqfd with a resample notifier. Dropping it deassigns the irqfd.
///
/// [`trigger`](Self::trigger) asserts the pin, which stays asserted until the guest EOIs it.
/// At the EOI KVM de-asserts the pin and adds 1 to [`resample`](Self::resample); the device then
/// calls `trigger` again if its interrupt condition still holds. The GSI must be routed to an
/// irqchip pin (PIC or IOAPIC), programmed level-triggered by the guest.
#[derive(Debug)]
#[must_use = "dropping a LevelIrqFd deassigns it at once"]
pub struct LevelIrqFd {
    binding: Binding,
    resample: Notifier,
}

impl Drop for LevelIrqFd {
    fn drop(&mut self) {
        self.binding.release();
    }
}

impl LevelIrqFd {
    /// Binds `trigger` to assert `gsi` and `resample` to be signalled at its EOI.
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
            binding: Binding::new(router, gsi, trigger, Some(&resample))?,
            resample,
        })
    }

    /// Asserts the line (adds 1 to the trigger notifier).
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`] if the eventfd write fails.
    pub fn trigger(&self) -> Result<()> {
        self.binding.trigger().notify()
    }

    /// The notifier KVM signals when the guest EOIs the line.
    pub fn resample(&self) -> &Notifier {
        &self.resample
    }

    /// The GSI this irqfd asserts.
    pub fn gsi(&self) -> Gsi {
        self.binding.gsi
    }

    /// The irqfd's own descriptor of the trigger notifier.
    pub fn notifier(&self) -> &Notifier {
        self.binding.trigger()
    }
}
