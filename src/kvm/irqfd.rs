//! [`Binding`]: one `KVM_IRQFD` assignment, the kernel half of every irqfd kind.
//!
//! An edge irqfd injects its GSI once per wake-up of its eventfd (writes made before the injection
//! coalesce). A level irqfd asserts an irqchip pin and keeps it asserted; when the guest EOIs the
//! pin KVM de-asserts it and adds 1 to the resample eventfd.
//!
//! Every binding goes through the VM's [`GsiRouter`], which refuses a GSI that has no route: KVM
//! itself would accept it and then drop every interrupt.

use std::fmt;

use crate::error::{Capability, Error};
use crate::kvm::routing::{Gsi, GsiRouter};
use crate::notifier::Notifier;
use crate::sys;

/// One `KVM_IRQFD` assignment. It has no `Drop` of its own: its owners (the irqfd guards, the
/// MSI-X vectors) call [`release`](Self::release) or [`detach`](Self::detach) exactly once.
pub(crate) struct Binding {
    router: GsiRouter,
    gsi: Gsi,
    trigger: Notifier,
}

impl Binding {
    /// Assigns `trigger` to inject `gsi` (with `resample`, as a level line), taking ownership of
    /// it; on failure the notifier comes back with the error.
    pub(crate) fn assign(
        router: &GsiRouter,
        gsi: Gsi,
        trigger: Notifier,
        resample: Option<&Notifier>,
    ) -> std::result::Result<Binding, (Error, Notifier)> {
        let needed = resample.map(|_| Capability::IrqFdResample);
        let bound = router
            .capabilities()
            .require(std::iter::once(Capability::IrqFd).chain(needed))
            .and_then(|()| {
                router.bind(gsi, resample.is_some(), |vm| {
                    sys::assign_irqfd(vm, &trigger, resample, gsi)
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

    /// The GSI it injects.
    pub(crate) fn gsi(&self) -> Gsi {
        self.gsi
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
    pub(crate) fn release(&self) {
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
