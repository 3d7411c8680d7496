//! [`IoEvent`]: a guest-write notification, in the kernel or through an [`ExitDispatcher`].

use std::fmt;
use std::sync::Arc;

use kvm_ioctls::VmFd;

use crate::device::QueueKicks;
use crate::error::Result;
use crate::fallback::dispatch::{ExitDispatcher, Registered};
use crate::fallback::placement::Placement;
use crate::kvm::{IoEventFd, WriteMatch};
use crate::notifier::Notifier;

/// A registered guest-write notification. Guest writes matching its [`WriteMatch`] add 1 to its
/// notifier — in the kernel ([`Placement::Kernel`]), or through a [`Backend`](super::Backend)'s
/// dispatcher when the registration lives in userspace. Dropping it unregisters.
///
/// ```
/// # if !vm_notify_testkit::kvm_or_skip("doc example") { return Ok(()); }
/// use std::sync::Arc;
/// use vm_notify::fallback::Placement;
/// use vm_notify::{IoEvent, Mode, Notifier, Width, WriteMatch};
///
/// let kvm = kvm_ioctls::Kvm::new()?;
/// let vm = Arc::new(kvm.create_vm()?);
/// let kicks = Notifier::new(Mode::Counter)?;
/// let reg = IoEvent::register(&vm, WriteMatch::mmio(0xd000_0050).width(Width::W4), &kicks)?;
/// assert_eq!(reg.placement(), &Placement::Kernel);
/// // ... the guest runs; `kicks.read()` returns the writes since the last read ...
/// drop(reg); // the same writes now exit to userspace
/// let again = IoEvent::register(&vm, WriteMatch::mmio(0xd000_0050).width(Width::W4), &kicks)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[must_use = "dropping an IoEvent unregisters it at once"]
pub struct IoEvent {
    write: WriteMatch,
    placement: Placement,
    notifier: Notifier,
    _place: Place,
}

/// Fields drop in order: the kernel registration goes before its shadow entry.
enum Place {
    Kernel {
        _reg: IoEventFd,
        /// The entry that makes a backend's dispatcher see this registration's overlaps.
        _shadow: Option<Registered>,
    },
    Userspace {
        _entry: Registered,
    },
}

impl fmt::Debug for IoEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoEvent")
            .field("write", &self.write)
            .field("placement", &self.placement)
            .field("notifier", &self.notifier)
            .finish()
    }
}

impl IoEvent {
    /// Registers `notifier` in the kernel for the guest writes `write` describes, with no
    /// userspace fallback: a kernel ioeventfd, whose matching writes add 1 to the notifier without
    /// the vCPU leaving the kernel. Dropping it deassigns it (`KVM_IOEVENTFD` with the exact
    /// eventfd, address, length and datamatch it was assigned with). The registration keeps a
    /// clone of the notifier (the same descriptor, none opened).
    /// [`Vm::ioevent`](crate::Vm::ioevent) is where a VMM usually makes one, placed by its policy.
    ///
    /// ```
    /// # if !vm_notify_testkit::kvm_or_skip("doc example") { return Ok(()); }
    /// use std::sync::Arc;
    /// use vm_notify::{IoEvent, Mode, Notifier, Width, WriteMatch};
    ///
    /// let kvm = kvm_ioctls::Kvm::new()?;
    /// let vm = Arc::new(kvm.create_vm()?);
    /// let kicks = Notifier::new(Mode::Counter)?;
    /// let reg = IoEvent::register(&vm, WriteMatch::mmio(0xd000_0050).width(Width::W4), &kicks)?;
    /// // ... the guest runs; `kicks.read()` returns the writes since the last read ...
    /// drop(reg); // the same writes now exit to userspace
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// The validation errors of [`WriteMatch::validate`]; [`Error::MissingCapability`] without
    /// `KVM_CAP_IOEVENTFD` (or `KVM_CAP_IOEVENTFD_ANY_LENGTH` for
    /// [`Width::Any`](crate::Width::Any)); [`Error::IoEventExists`] when an overlapping
    /// registration exists; [`Error::IoBusFull`] when the kernel bus is full;
    /// [`Error::FdExhausted`] when no descriptor is left; [`Error::IoEvent`] for other errnos.
    ///
    /// [`Error::MissingCapability`]: crate::Error::MissingCapability
    /// [`Error::IoEventExists`]: crate::Error::IoEventExists
    /// [`Error::IoBusFull`]: crate::Error::IoBusFull
    /// [`Error::FdExhausted`]: crate::Error::FdExhausted
    /// [`Error::IoEvent`]: crate::Error::IoEvent
    pub fn register(vm: &Arc<VmFd>, write: WriteMatch, notifier: &Notifier) -> Result<IoEvent> {
        Ok(IoEvent::kernel(
            IoEventFd::register(vm, write, notifier)?,
            None,
        ))
    }

    /// Wraps a kernel registration, with the backend's shadow entry if it has one.
    pub(crate) fn kernel(reg: IoEventFd, shadow: Option<Registered>) -> IoEvent {
        IoEvent {
            write: reg.write_match(),
            placement: Placement::Kernel,
            notifier: reg.notifier().clone(),
            _place: Place::Kernel {
                _reg: reg,
                _shadow: shadow,
            },
        }
    }

    /// A registration served by a dispatcher.
    pub(crate) fn dispatched(
        dispatcher: &ExitDispatcher,
        write: WriteMatch,
        notifier: Notifier,
        placement: Placement,
    ) -> Result<IoEvent> {
        let entry = Registered::insert(dispatcher, &write, notifier.clone(), false)?;
        Ok(IoEvent {
            write,
            placement,
            notifier,
            _place: Place::Userspace { _entry: entry },
        })
    }

    /// What this registration matches.
    pub fn write_match(&self) -> WriteMatch {
        self.write
    }

    /// Where it lives, and why in userspace if it does.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// The registration's handle to the notifier.
    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }
}

impl QueueKicks for IoEvent {
    fn kicks(&self) -> &Notifier {
        self.notifier()
    }
}
