//! The userspace fallback and the policy that chooses it: where each registration lives, in the
//! kernel or in userspace, and why.
//!
//! A [`Vm`](crate::Vm) makes the registrations — guest-write notifications ([`IoEvent`]), edge
//! and level interrupts ([`IrqFd`], [`LevelIrqFd`]) — either in the kernel (`KVM_IOEVENTFD`,
//! `KVM_IRQFD`) or in userspace: its [`ExitDispatcher`] takes the guest writes that exit, and its
//! [`Injector`] reads trigger notifiers and calls `KVM_IRQ_LINE` / `KVM_SIGNAL_MSI` on a thread
//! the VMM runs ([`Injector::spawn`]): the library starts none. Its [`Policy`] says which: with
//! [`Policy::Auto`] it chooses per registration: the kernel where it has
//! the capability and accepts the registration, userspace otherwise, with the reason kept in the
//! registration's [`Placement`]. The device gets the same notifier counts either way.
//!
//! The injector's contract is the irqfd one:
//!
//! * **edge, irqchip route**: each wake-up of the trigger notifier (however many writes it
//!   coalesced) pulses the line: `KVM_IRQ_LINE` high, then low — one edge, as one irqfd injection.
//! * **edge, MSI route**: each wake-up sends the route's message with `KVM_SIGNAL_MSI`.
//! * **level, irqchip route**: a wake-up asserts the line and the line *stays* high: the irqchip
//!   re-delivers at each EOI while it is. With an in-kernel irqchip userspace sees no EOI, so the
//!   line is lowered when the device says its condition cleared
//!   ([`LevelIrqFd::deassert`](crate::LevelIrqFd::deassert)); that lowering also drains a
//!   trigger not yet taken and adds 1 to the resample notifier, so a device written for KVM's
//!   resampler (re-assert on resample while the condition holds) runs unchanged.

mod dispatch;
mod inject;
mod ioevent;
mod irqfd;
mod placement;

use std::fmt;
use std::sync::{Arc, OnceLock};

use kvm_ioctls::VmFd;

pub use dispatch::ExitDispatcher;
pub use inject::{Injector, InjectorStats, InjectorThread};
pub use ioevent::IoEvent;
pub use irqfd::{IrqFd, LevelIrqFd, LevelLineState};
pub use placement::{Fallback, Placement};

#[cfg(feature = "fuzzing")]
pub(crate) use dispatch::Key;
pub(crate) use dispatch::Registered;

use crate::error::{Capability, Error, Result};
use crate::irqchip::Ioapic;
use crate::kvm::{Gsi, GsiRouter, IoEventFd, WriteMatch};
use crate::notifier::Notifier;
use crate::sys::Capabilities;

/// Where a [`Vm`](crate::Vm) puts registrations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Policy {
    /// Only in the kernel; a registration the kernel cannot take is an error. (The pins of the
    /// split irqchip's IOAPIC have no kernel path: every policy serves them through the VM's
    /// [`Ioapic`].)
    Kernel,
    /// Only in userspace, through the backend's [`ExitDispatcher`] and [`Injector`].
    Userspace,
    /// In the kernel where it can be, else in userspace, per registration.
    Auto,
}

/// Registers guest-write notifications and interrupts in the kernel, in userspace, or either per
/// registration: what [`Vm`](crate::Vm) does its registrations with. Cheap to clone: clones share
/// the dispatcher and the injector, so overlaps are checked across every registration of a VM.
#[derive(Clone)]
pub(crate) struct Backend {
    policy: Policy,
    vm: Arc<VmFd>,
    caps: Capabilities,
    dispatcher: ExitDispatcher,
    disabled: Vec<Capability>,
    injector: Arc<OnceLock<Injector>>,
    /// The split irqchip's IOAPIC, which serves interrupts on GSIs below 24.
    ioapic: Option<Ioapic>,
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("policy", &self.policy)
            .field("disabled", &self.disabled)
            .field("dispatcher", &self.dispatcher)
            .field("ioapic", &self.ioapic.is_some())
            .finish()
    }
}

impl Backend {
    /// A backend with `policy` for `vm`. Asks KVM which capabilities it has, once.
    pub(crate) fn new(vm: Arc<VmFd>, policy: Policy) -> Self {
        Backend {
            policy,
            caps: Capabilities::probe(&vm),
            vm,
            dispatcher: ExitDispatcher::new(),
            disabled: Vec::new(),
            injector: Arc::default(),
            ioapic: None,
        }
    }

    /// Serves interrupts on the pins of `ioapic` (GSIs below 24 on the split irqchip) through
    /// it. [`Vm::with_split_irqchip`](crate::Vm::with_split_irqchip) does this.
    pub(crate) fn with_ioapic(mut self, ioapic: Ioapic) -> Self {
        self.ioapic = Some(ioapic);
        self
    }

    /// The split irqchip's IOAPIC this backend serves pins through, if it has one.
    pub(crate) fn ioapic(&self) -> Option<&Ioapic> {
        self.ioapic.as_ref()
    }

    /// The IOAPIC to serve `gsi` through: `Some` for a pin of the split irqchip, `None` for any
    /// other GSI. [`Error::IoapicPin`] for a pin when this backend has no IOAPIC.
    fn pin_of(&self, router: &GsiRouter, gsi: Gsi) -> Result<Option<&Ioapic>> {
        if !router.is_pin(gsi) {
            return Ok(None);
        }
        self.ioapic
            .as_ref()
            .map(Some)
            .ok_or(Error::IoapicPin { gsi })
    }

    /// This backend with `policy`, sharing its dispatcher, its injector and its IOAPIC
    /// ([`Vm::with_policy`](crate::Vm::with_policy)).
    pub(crate) fn with_policy(&self, policy: Policy) -> Self {
        Backend {
            policy,
            ..self.clone()
        }
    }

    /// Treats `cap` as missing from KVM: for hosts where a capability exists but must not be
    /// used, and for testing the fallback.
    pub(crate) fn disable(mut self, cap: Capability) -> Self {
        self.disabled.push(cap);
        self
    }

    /// The VM.
    pub(crate) fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// The dispatcher the VMM hands `KVM_EXIT_MMIO` / `KVM_EXIT_IO` writes to.
    pub(crate) fn dispatcher(&self) -> &ExitDispatcher {
        &self.dispatcher
    }

    /// Whether `cap` is there to use: KVM has it and this backend has not disabled it.
    pub(crate) fn has(&self, cap: Capability) -> bool {
        self.gap([cap]).is_none()
    }

    /// The first of `needed` that is disabled on this backend or that KVM lacks.
    fn gap(&self, needed: impl IntoIterator<Item = Capability>) -> Option<Fallback> {
        needed.into_iter().find_map(|cap| {
            if self.disabled.contains(&cap) {
                Some(Fallback::Disabled(cap))
            } else if !self.caps.has(cap) {
                Some(Fallback::MissingCapability(cap))
            } else {
                None
            }
        })
    }

    /// Registers `notifier` for the guest writes `write` describes, where the policy says.
    ///
    /// # Errors
    ///
    /// The validation errors of [`WriteMatch::validate`]; [`Error::IoEventExists`] for an
    /// overlap with a registration of this backend; for [`Policy::Kernel`], the errors of
    /// [`IoEvent::register`].
    pub(crate) fn register(&self, write: WriteMatch, notifier: &Notifier) -> Result<IoEvent> {
        let req = write.request()?;
        let notifier = notifier.clone();
        let why = match (self.policy, self.gap(write.capabilities())) {
            (Policy::Userspace, _) => Fallback::Requested,
            (Policy::Kernel, Some(Fallback::Disabled(c) | Fallback::MissingCapability(c))) => {
                return Err(Error::MissingCapability(c))
            }
            (Policy::Kernel, _) => {
                let reg = IoEventFd::assign(&self.vm, write, req, notifier)?;
                return Ok(IoEvent::kernel(reg, None));
            }
            (Policy::Auto, Some(why)) => why,
            (Policy::Auto, None) => {
                // Recorded first, so an overlap is refused the same way on both paths, and in
                // the step that checks the kernel would not mishandle it.
                match Registered::insert_in_kernel(&self.dispatcher, &write, notifier.clone())? {
                    None => Fallback::KernelWouldMiss,
                    Some(shadow) => match IoEventFd::assign(&self.vm, write, req, notifier.clone())
                    {
                        Ok(reg) => return Ok(IoEvent::kernel(reg, Some(shadow))),
                        Err(e) => {
                            drop(shadow);
                            Fallback::KernelRefused(e.to_string())
                        }
                    },
                }
            }
        };
        IoEvent::dispatched(&self.dispatcher, write, notifier, Placement::Userspace(why))
    }

    /// The injector of this backend's userspace interrupts, made on first use (its epoll
    /// descriptor; no thread). The VMM runs it ([`Injector::spawn`]) when it places any
    /// interrupt in userspace: on [`Policy::Userspace`], on [`Policy::Auto`] where the kernel
    /// cannot take one, and for the split irqchip's pins on every policy. Until it runs, those
    /// interrupts wait in their notifiers.
    ///
    /// # Errors
    ///
    /// Those of [`EventLoop::new`](crate::wait::EventLoop::new), the first time.
    pub(crate) fn injector(&self, router: &GsiRouter) -> Result<Injector> {
        self.injector_ref(router).cloned()
    }

    fn injector_ref(&self, router: &GsiRouter) -> Result<&Injector> {
        if let Some(i) = self.injector.get() {
            return Ok(i);
        }
        let made = Injector::new(self.vm.clone(), router.clone())?;
        Ok(self.injector.get_or_init(|| made))
    }

    /// Where an interrupt goes: the kernel (`kernel` made it) unless the policy says userspace,
    /// a capability is missing (with resample if `level`), or, on `Auto`, the kernel refuses.
    fn place_irq<T>(&self, level: bool, kernel: impl FnOnce() -> Result<T>) -> Result<Chosen<T>> {
        let needed =
            std::iter::once(Capability::IrqFd).chain(level.then_some(Capability::IrqFdResample));
        let why = match (self.policy, self.gap(needed)) {
            (Policy::Userspace, _) => Fallback::Requested,
            (Policy::Kernel, Some(Fallback::Disabled(c) | Fallback::MissingCapability(c))) => {
                return Err(Error::MissingCapability(c))
            }
            (Policy::Auto, Some(why)) => why,
            _ => match kernel() {
                // The kernel's refusal falls back; the caller's mistake (an unrouted GSI, a
                // resample on an MSI route) is reported.
                Err(e @ (Error::IrqFd { .. } | Error::MissingCapability(_)))
                    if self.policy == Policy::Auto =>
                {
                    Fallback::KernelRefused(e.to_string())
                }
                other => return other.map(Chosen::Kernel),
            },
        };
        Ok(Chosen::Userspace(why))
    }

    /// An edge interrupt on `gsi` that `notifier` triggers: a kernel irqfd, or on the userspace
    /// path the injector (`KVM_IRQ_LINE` pulse for irqchip routes, `KVM_SIGNAL_MSI` for MSI
    /// routes). One injection per wake-up of the notifier either way.
    ///
    /// On the split irqchip a GSI below 24 is a pin of the userspace IOAPIC, whatever the
    /// policy: the injector pulses it on the backend's [`Ioapic`], which delivers as the
    /// guest programmed the pin ([`Fallback::SplitIrqchip`]).
    ///
    /// # Errors
    ///
    /// Those of [`IrqFd::with_notifier`]; on the userspace path the same route checks;
    /// [`Error::IoapicPin`] for a pin of the split irqchip on a backend without its IOAPIC.
    pub(crate) fn irqfd(&self, router: &GsiRouter, gsi: Gsi, notifier: &Notifier) -> Result<IrqFd> {
        if let Some(io) = self.pin_of(router, gsi)? {
            let injector = self.injector_ref(router)?;
            return IrqFd::injected(
                injector,
                router,
                gsi,
                notifier,
                Some(io),
                Fallback::SplitIrqchip,
            );
        }
        match self.place_irq(false, || IrqFd::with_notifier(router, gsi, notifier))? {
            Chosen::Kernel(irq) => Ok(irq),
            Chosen::Userspace(why) => {
                IrqFd::injected(self.injector_ref(router)?, router, gsi, notifier, None, why)
            }
        }
    }

    /// A level interrupt on `gsi` with resample: a kernel irqfd with `KVM_IRQFD_FLAG_RESAMPLE`, or
    /// on the userspace path the injector, which holds the line high with `KVM_IRQ_LINE`
    /// until [`LevelIrqFd::deassert`] (see [`LevelIrqFd`] for the device's side, the same on both).
    ///
    /// On the split irqchip a GSI below 24 is a pin of the userspace IOAPIC, whatever the
    /// policy: the injector asserts it on the backend's [`Ioapic`], which lowers it and
    /// signals `resample` at the guest's EOI, as a kernel resample irqfd does
    /// ([`Fallback::SplitIrqchip`]).
    ///
    /// # Errors
    ///
    /// Those of [`LevelIrqFd::with_notifiers`] (on the userspace path, the same GSI checks);
    /// [`Error::IoapicPin`] for a pin of the split irqchip on a backend without its IOAPIC.
    pub(crate) fn level_irqfd(
        &self,
        router: &GsiRouter,
        gsi: Gsi,
        trigger: &Notifier,
        resample: &Notifier,
    ) -> Result<LevelIrqFd> {
        if let Some(io) = self.pin_of(router, gsi)? {
            let injector = self.injector_ref(router)?;
            let why = Fallback::SplitIrqchip;
            return LevelIrqFd::injected(injector, router, gsi, trigger, resample, Some(io), why);
        }
        let kernel = || LevelIrqFd::with_notifiers(router, gsi, trigger, resample);
        match self.place_irq(true, kernel)? {
            Chosen::Kernel(irq) => Ok(irq),
            Chosen::Userspace(why) => {
                let injector = self.injector_ref(router)?;
                LevelIrqFd::injected(injector, router, gsi, trigger, resample, None, why)
            }
        }
    }
}

/// What [`Backend::place_irq`] chose.
enum Chosen<T> {
    Kernel(T),
    Userspace(Fallback),
}
