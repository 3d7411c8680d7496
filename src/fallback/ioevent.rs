//! [`IoEvent`]: a guest-write notification, in the kernel or through an [`ExitDispatcher`].

use std::fmt;

use crate::device::QueueKicks;
use crate::error::Result;
use crate::fallback::dispatch::{ExitDispatcher, Registered};
use crate::fallback::placement::Placement;
use crate::kvm::{IoEventFd, WriteMatch};
use crate::notifier::Notifier;

/// A registered guest-write notification. Guest writes matching its [`WriteMatch`] add 1 to its
/// notifier — in the kernel ([`Placement::Kernel`]: a kernel ioeventfd, no exit to userspace), or
/// through the VM's [`ExitDispatcher`] when the registration lives in userspace.
/// [`Vm::ioevent`](crate::Vm::ioevent) makes one. Dropping it unregisters (`KVM_IOEVENTFD` with
/// the exact eventfd, address, length and datamatch it was assigned with).
///
/// ```
/// # if !vm_notify_testkit::kvm_or_skip("doc example") { return Ok(()); }
/// use std::sync::Arc;
/// use vm_notify::fallback::{Placement, Policy};
/// use vm_notify::{Mode, Notifier, Vm, Width, WriteMatch};
///
/// let kvm = kvm_ioctls::Kvm::new()?;
/// let fd = Arc::new(kvm.create_vm()?);
/// fd.create_irq_chip()?;
/// let vm = Vm::new(fd, Policy::Kernel)?;
/// let kicks = Notifier::new(Mode::Counter)?;
/// let reg = vm.ioevent(WriteMatch::mmio(0xd000_0050).width(Width::W4), &kicks)?;
/// assert_eq!(reg.placement(), &Placement::Kernel);
/// // ... the guest runs; `kicks.read()` returns the writes since the last read ...
/// drop(reg); // the same writes now exit to userspace
/// let again = vm.ioevent(WriteMatch::mmio(0xd000_0050).width(Width::W4), &kicks)?;
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
