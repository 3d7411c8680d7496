//! The backend seam: where a registration lives, in the kernel or in userspace.
//!
//! A [`Backend`] registers guest-write notifications either in the kernel (`KVM_IOEVENTFD`, no
//! exit) or in its [`ExitDispatcher`] (the write exits and the VMM hands it over), or chooses per
//! registration ([`BackendKind::Auto`]): the kernel where it has the capability and accepts the
//! registration, userspace otherwise, with the reason kept in the registration's [`Path`]. The
//! device gets the same [`Notifier`] counts either way.
//!
//! This module is also the only one that issues KVM ioctls for registrations.

use std::io;
use std::os::fd::AsRawFd;

use kvm_bindings::{
    kvm_ioeventfd, kvm_ioeventfd_flag_nr_datamatch, kvm_ioeventfd_flag_nr_deassign,
    kvm_ioeventfd_flag_nr_pio, kvm_irqchip, KvmIrqRouting, KVM_CAP_IOEVENTFD_ANY_LENGTH,
};
use kvm_ioctls::{Cap, VmFd};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use std::fmt;
use std::sync::{Arc, OnceLock};

use crate::dispatch::ExitDispatcher;
use crate::error::{Capability, Error, Result};
use crate::inject::Injector;
use crate::ioevent::IoEventAddress;
use crate::ioevent::{IoEvent, Width, WriteMatch};
use crate::irq::{IrqFd, LevelIrqFd};
use crate::notifier::Notifier;
use crate::routing::{Gsi, GsiRouter};

/// Which path registrations take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// Only in the kernel; a registration the kernel cannot take is an error.
    Kernel,
    /// Only in userspace, through the backend's [`ExitDispatcher`].
    Userspace,
    /// In the kernel where it can be, else in userspace, per registration.
    Auto,
}

/// Why a registration is served in userspace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Fallback {
    /// The backend is [`BackendKind::Userspace`].
    Requested,
    /// The capability was disabled on the backend ([`Backend::disable`]).
    Disabled(Capability),
    /// KVM lacks the capability.
    MissingCapability(Capability),
    /// KVM refused the registration; the text is the error.
    KernelRefused(String),
    /// In the kernel it would sit next to another of this backend's registrations in the
    /// pattern KVM's I/O bus mishandles (an any-width registration at an address a sized one
    /// reaches from below), where the kernel can miss its writes.
    KernelWouldMiss,
}

/// Where a registration lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Path {
    /// In the kernel: matching writes never leave it.
    Kernel,
    /// In userspace: matching writes exit and the dispatcher signals the notifier.
    Userspace(Fallback),
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Kernel => f.write_str("kernel"),
            Path::Userspace(Fallback::Requested) => f.write_str("userspace (requested)"),
            Path::Userspace(Fallback::Disabled(c)) => write!(f, "userspace ({c} disabled)"),
            Path::Userspace(Fallback::MissingCapability(c)) => {
                write!(f, "userspace (KVM lacks {c})")
            }
            Path::Userspace(Fallback::KernelRefused(why)) => {
                write!(f, "userspace (the kernel refused: {why})")
            }
            Path::Userspace(Fallback::KernelWouldMiss) => f.write_str(
                "userspace (next to a sized registration reaching its address, the kernel can miss its writes)",
            ),
        }
    }
}

/// Registers guest-write notifications in the kernel, in userspace, or either per registration.
/// Cheap to clone: clones share the dispatcher. Use one backend per VM, so overlaps are checked
/// across every registration it made.
///
/// ```
/// # if !vm_notify::testkit::kvm_or_skip("doc example") { return Ok(()); }
/// use std::sync::Arc;
/// use vm_notify::{Backend, BackendKind, Capability, Mode, Notifier, Path, WriteMatch};
///
/// let kvm = kvm_ioctls::Kvm::new()?;
/// let vm = Arc::new(kvm.create_vm()?);
/// // As on a host without KVM_CAP_IOEVENTFD:
/// let backend = Backend::new(vm, BackendKind::Auto).disable(Capability::IoEventFd);
/// let kicks = Notifier::new(Mode::Counter)?;
/// let reg = backend.register(WriteMatch::mmio(0xd000_0050), &kicks)?;
/// assert!(matches!(reg.path(), Path::Userspace(_)));
/// // The vCPU loop, on KVM_EXIT_MMIO:
/// assert!(backend.dispatcher().mmio_write(0xd000_0050, &0u32.to_le_bytes())?);
/// assert_eq!(kicks.read()?, 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Backend {
    kind: BackendKind,
    vm: Arc<VmFd>,
    dispatcher: ExitDispatcher,
    disabled: Vec<Capability>,
    injector: Arc<OnceLock<Injector>>,
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("kind", &self.kind)
            .field("disabled", &self.disabled)
            .field("dispatcher", &self.dispatcher)
            .finish()
    }
}

impl Backend {
    /// A backend of `kind` for `vm`.
    pub fn new(vm: Arc<VmFd>, kind: BackendKind) -> Self {
        Backend {
            kind,
            vm,
            dispatcher: ExitDispatcher::new(),
            disabled: Vec::new(),
            injector: Arc::default(),
        }
    }

    /// Treats `cap` as missing from KVM: for hosts where a capability exists but must not be
    /// used, and for testing the fallback.
    pub fn disable(mut self, cap: Capability) -> Self {
        self.disabled.push(cap);
        self
    }

    /// The backend's kind.
    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// The dispatcher the VMM hands `KVM_EXIT_MMIO` / `KVM_EXIT_IO` writes to.
    pub fn dispatcher(&self) -> &ExitDispatcher {
        &self.dispatcher
    }

    /// Why the kernel cannot take `write`, if it cannot for a capability reason.
    fn capability_gap(&self, write: &WriteMatch) -> Option<Fallback> {
        let any_length = write.write_width() == Width::Any;
        let needed = std::iter::once(Capability::IoEventFd)
            .chain(any_length.then_some(Capability::IoEventFdAnyLength));
        self.first_gap(needed, |cap| check(&self.vm, cap))
    }

    /// The first of `needed` that is disabled on this backend or that `has` says KVM lacks.
    fn first_gap(
        &self,
        needed: impl IntoIterator<Item = Capability>,
        has: impl Fn(Capability) -> bool,
    ) -> Option<Fallback> {
        needed.into_iter().find_map(|cap| {
            if self.disabled.contains(&cap) {
                Some(Fallback::Disabled(cap))
            } else if !has(cap) {
                Some(Fallback::MissingCapability(cap))
            } else {
                None
            }
        })
    }

    /// Registers `notifier` for the guest writes `write` describes, on this backend's path.
    ///
    /// # Errors
    ///
    /// The validation errors of [`WriteMatch::validate`]; [`Error::IoEventExists`] for an
    /// overlap with a registration of this backend; for [`BackendKind::Kernel`], the errors of
    /// [`IoEvent::register`].
    pub fn register(&self, write: WriteMatch, notifier: &Notifier) -> Result<IoEvent> {
        let req = write.request()?;
        let notifier = Arc::new(notifier.try_clone()?);
        match self.kind {
            BackendKind::Userspace => self.userspace(write, notifier, Fallback::Requested),
            BackendKind::Kernel => {
                if let Some(Fallback::Disabled(cap) | Fallback::MissingCapability(cap)) =
                    self.capability_gap(&write)
                {
                    return Err(Error::MissingCapability(cap));
                }
                IoEvent::assign(&self.vm, write, req, notifier, None)
            }
            BackendKind::Auto => {
                if let Some(reason) = self.capability_gap(&write) {
                    return self.userspace(write, notifier, reason);
                }
                if self.dispatcher.kernel_would_shadow(&write) {
                    return self.userspace(write, notifier, Fallback::KernelWouldMiss);
                }
                let key = self.dispatcher.insert(&write, notifier.clone(), true)?;
                let shadow = Some((self.dispatcher.clone(), key));
                match IoEvent::assign(&self.vm, write, req, notifier.clone(), shadow) {
                    Ok(reg) => Ok(reg),
                    Err(e) => {
                        // The shadow entry went with the failed registration.
                        let reason = Fallback::KernelRefused(e.to_string());
                        self.userspace(write, notifier, reason)
                    }
                }
            }
        }
    }

    /// The injector thread of this backend, started on first use.
    fn injector(&self, router: &GsiRouter) -> Result<&Injector> {
        if let Some(i) = self.injector.get() {
            return Ok(i);
        }
        let made = Injector::new(self.vm.clone(), router.clone())?;
        Ok(self.injector.get_or_init(|| made))
    }

    /// Why the kernel cannot take an irqfd (with resample if `level`), if a capability is the
    /// reason.
    fn irqfd_gap(&self, router: &GsiRouter, level: bool) -> Option<Fallback> {
        let needed =
            std::iter::once(Capability::IrqFd).chain(level.then_some(Capability::IrqFdResample));
        self.first_gap(needed, |cap| router.has(cap))
    }

    /// Whether an irqfd error is the kernel's refusal (fall back) rather than the caller's
    /// mistake (report it).
    fn kernel_refused(e: &Error) -> bool {
        matches!(e, Error::IrqFd { .. } | Error::MissingCapability(_))
    }

    /// An edge interrupt on `gsi` that `notifier` triggers: a kernel irqfd, or on the userspace
    /// path the injector thread (`KVM_IRQ_LINE` pulse for irqchip routes, `KVM_SIGNAL_MSI` for MSI
    /// routes). One injection per wake-up of the notifier either way.
    ///
    /// # Errors
    ///
    /// Those of [`IrqFd::new`]; on the userspace path the same route checks.
    pub fn irqfd(&self, router: &GsiRouter, gsi: Gsi, notifier: &Notifier) -> Result<IrqFd> {
        self.choose_irq_path(
            router,
            false,
            || IrqFd::new(router, gsi, notifier),
            |injector, why| IrqFd::injected(injector, router, gsi, notifier, why),
        )
    }

    /// A level interrupt on `gsi` with resample: a kernel irqfd with `KVM_IRQFD_FLAG_RESAMPLE`, or
    /// on the userspace path the injector thread, which holds the line high with `KVM_IRQ_LINE`
    /// until [`LevelIrqFd::deassert`] (see [`LevelIrqFd`] for the device's side, the same on both).
    ///
    /// # Errors
    ///
    /// Those of [`LevelIrqFd::new`] (on the userspace path, the same GSI checks).
    pub fn level_irqfd(
        &self,
        router: &GsiRouter,
        gsi: Gsi,
        trigger: &Notifier,
        resample: &Notifier,
    ) -> Result<LevelIrqFd> {
        self.choose_irq_path(
            router,
            true,
            || LevelIrqFd::new(router, gsi, trigger, resample),
            |injector, why| LevelIrqFd::injected(injector, router, gsi, trigger, resample, why),
        )
    }

    /// The choice every interrupt registration makes: the kernel (`kernel`) unless the kind says
    /// userspace, a capability is missing (with resample if `level`), or, on `Auto`, the kernel
    /// refuses; otherwise the injector thread (`injected`, with the reason).
    fn choose_irq_path<T>(
        &self,
        router: &GsiRouter,
        level: bool,
        kernel: impl FnOnce() -> Result<T>,
        injected: impl FnOnce(&Injector, Fallback) -> Result<T>,
    ) -> Result<T> {
        let why = match (self.kind, self.irqfd_gap(router, level)) {
            (BackendKind::Userspace, _) => Fallback::Requested,
            (BackendKind::Kernel, Some(Fallback::Disabled(c) | Fallback::MissingCapability(c))) => {
                return Err(Error::MissingCapability(c))
            }
            (BackendKind::Auto, Some(why)) => why,
            _ => match kernel() {
                Err(e) if self.kind == BackendKind::Auto && Self::kernel_refused(&e) => {
                    Fallback::KernelRefused(e.to_string())
                }
                other => return other,
            },
        };
        injected(self.injector(router)?, why)
    }

    fn userspace(
        &self,
        write: WriteMatch,
        notifier: Arc<Notifier>,
        reason: Fallback,
    ) -> Result<IoEvent> {
        let key = self.dispatcher.insert(&write, notifier.clone(), false)?;
        Ok(IoEvent::dispatched(
            write,
            notifier,
            self.dispatcher.clone(),
            key,
            Path::Userspace(reason),
        ))
    }
}

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

/// Deassigns an ioeventfd. KVM answers ENOENT when no registration has exactly this eventfd,
/// address, length and datamatch: that is [`Error::IoEventNotRegistered`]. (Guards cannot get
/// there: each deassigns exactly what it assigned, once.)
pub(crate) fn deassign_ioevent(vm: &VmFd, fd: &Notifier, req: &IoEventRequest) -> Result<()> {
    let addr = if req.pio {
        IoEventAddress::Pio(req.addr)
    } else {
        IoEventAddress::Mmio(req.addr)
    };
    ioeventfd(vm, fd, req, true).map_err(|source| match source.raw_os_error() {
        Some(libc::ENOENT) => Error::IoEventNotRegistered { addr },
        _ => Error::IoEvent { addr, source },
    })
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

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use super::*;
    use crate::notifier::Mode;
    use crate::testkit::{kvm_or_skip, TinyVm};

    /// The removal guards cannot make: KVM answers ENOENT for an ioeventfd it does not have, and
    /// the seam maps it. An irqfd deassign, by contrast, returns 0 even when nothing matched,
    /// which is why the router keeps its own count of bound irqfds.
    #[test]
    fn removing_what_is_not_registered() {
        if !kvm_or_skip("removing_what_is_not_registered") {
            return;
        }
        let vm = TinyVm::new().unwrap();
        let n = Notifier::new(Mode::Counter).unwrap();
        let req = IoEventRequest {
            addr: 0xd000_0000,
            len: 4,
            datamatch: None,
            pio: false,
        };
        let e = deassign_ioevent(vm.vm(), &n, &req).unwrap_err();
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
        assign_ioevent(vm.vm(), &n, &req).unwrap();
        deassign_ioevent(vm.vm(), &n, &req).unwrap();
        assert!(matches!(
            deassign_ioevent(vm.vm(), &n, &req),
            Err(Error::IoEventNotRegistered { .. })
        ));
        assert!(deassign_irqfd(vm.vm(), &n, 4).is_ok());
    }
}
