//! The device contract: what a device depends on, and nothing of KVM.
//!
//! * [`GuestInterrupt`]: "interrupt the guest", one method ([`trigger`](GuestInterrupt::trigger))
//!   and three capabilities a delivery kind may have: an eventfd another writer can add to
//!   ([`eventfd`](GuestInterrupt::eventfd)), a level line with its resample
//!   ([`level`](GuestInterrupt::level) → [`LevelInterrupt`]) and a mask
//!   ([`mask`](GuestInterrupt::mask) → [`MaskableInterrupt`]). A capability a kind lacks is
//!   `None` by default, so a VMM's own interrupt source implements `trigger` and nothing else.
//! * [`QueueKicks`]: "the notifier a device waits on for the guest's kicks".
//!
//! Both live at the bottom of the crate with [`Notifier`]: a device crate depends on
//! `vm-notify` with `default-features = false` and gets them without kvm-ioctls, kvm-bindings
//! or vm-memory in its tree. The KVM deliveries (feature `kvm`, on by default) implement them:
//! `IrqFd` (edge, a GSI or an MSI route), `LevelIrqFd` (a level pin with resample),
//! `MsixVector` (one vector of a function's MSI-X table, maskable), and the virtio transports'
//! queue interrupts. The edge kinds implement [`vm_superio::Trigger`] too, so a vm-superio
//! device (a serial port, an i8042) takes them as they are.
//!
//! With the feature `test-utils`, [`RecordingInterrupt`] records what a device asked for, for
//! unit tests without `/dev/kvm`:
//!
//! ```
//! # #[cfg(feature = "test-utils")] {
//! use std::sync::Arc;
//! use vm_notify::device::RecordingInterrupt;
//! use vm_notify::virtio::VirtQueueNotify;
//! use vm_notify::{Mode, Notifier, QueueKicks};
//!
//! /// The device under test: serves every kick, then interrupts once per wake-up.
//! fn serve(queue: &VirtQueueNotify) -> vm_notify::Result<u64> {
//!     let kicks = queue.kicks().read()?;
//!     queue.trigger()?;
//!     Ok(kicks)
//! }
//!
//! let irq = Arc::new(RecordingInterrupt::edge()?);
//! let queue = VirtQueueNotify::new(0, Notifier::new(Mode::Counter)?, irq.clone());
//! // What the guest's three queue notifications would have done through an ioeventfd:
//! queue.kicks().add(3)?;
//! assert_eq!(serve(&queue)?, 3);
//! assert_eq!(irq.triggers(), 1, "one interrupt for three coalesced kicks");
//! # }
//! # Ok::<(), vm_notify::Error>(())
//! ```

use std::fmt;

use crate::error::Result;
use crate::notifier::Notifier;

/// Interrupts the guest. Every delivery kind implements it; devices and transports hold it as
/// `Arc<dyn GuestInterrupt>`, so a VMM can put its own interrupt source behind a device.
///
/// Only [`trigger`](Self::trigger) is required. The other methods are capabilities, `None`
/// where the delivery kind does not have them:
///
/// * [`eventfd`](Self::eventfd): a notifier another writer (a vhost-user backend's call fd, a
///   VFIO interrupt) adds to with the same effect as `trigger`;
/// * [`level`](Self::level): a level line, which the device lowers when its condition clears
///   and re-asserts on the resample notifier;
/// * [`mask`](Self::mask): the interrupt can be masked, holding what is triggered meanwhile
///   pending until unmasked.
pub trait GuestInterrupt: Send + Sync + fmt::Debug {
    /// Interrupts the guest: an edge injection, a level line asserted, an MSI-X vector raised
    /// (or held pending while masked). Returns whether this asked for a new interrupt: `false`
    /// where the request folded into one still outstanding (a virtio-mmio status bit not yet
    /// acknowledged) or there is nothing to interrupt with (a virtio-pci queue without a
    /// vector).
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`](crate::Error::Notifier) if the eventfd write fails; an
    /// implementation's own errors otherwise.
    fn trigger(&self) -> Result<bool>;

    /// Capability: a handle to the eventfd that delivers this interrupt. A write to it
    /// interrupts the guest as [`trigger`](Self::trigger) does. `Ok(None)` where no such eventfd
    /// exists (a virtio-mmio interrupt, whose status the VMM keeps; a virtio-pci queue without a
    /// vector).
    ///
    /// # Errors
    ///
    /// [`Error::FdExhausted`](crate::Error::FdExhausted) where the eventfd is opened on demand
    /// (an MSI-X vector that has none yet) and no descriptor is left.
    fn eventfd(&self) -> Result<Option<Notifier>> {
        Ok(None)
    }

    /// Capability: the level line behind this interrupt. `None` for edge interrupts.
    fn level(&self) -> Option<&dyn LevelInterrupt> {
        None
    }

    /// Capability: the mask of this interrupt. `None` where it cannot be masked from the
    /// device's side.
    fn mask(&self) -> Option<&dyn MaskableInterrupt> {
        None
    }
}

/// A shared interrupt is the interrupt (a virtio-mmio device's [`StatusLine`], which its queues
/// and a vhost-user [`CallRelay`] hold together).
///
/// [`StatusLine`]: crate::virtio::StatusLine
/// [`CallRelay`]: crate::vhost_user::CallRelay
impl<T: GuestInterrupt + ?Sized> GuestInterrupt for std::sync::Arc<T> {
    fn trigger(&self) -> Result<bool> {
        (**self).trigger()
    }

    fn eventfd(&self) -> Result<Option<Notifier>> {
        (**self).eventfd()
    }

    fn level(&self) -> Option<&dyn LevelInterrupt> {
        (**self).level()
    }

    fn mask(&self) -> Option<&dyn MaskableInterrupt> {
        (**self).mask()
    }
}

/// A level-triggered line: asserted by [`GuestInterrupt::trigger`], lowered by the device when
/// its condition clears, and resampled at the guest's end of interrupt.
pub trait LevelInterrupt: Send + Sync + fmt::Debug {
    /// The device's condition cleared. Returns whether a line was lowered here (a kernel level
    /// irqfd is lowered by KVM at the EOI, not here).
    ///
    /// # Errors
    ///
    /// An implementation's own (an ioctl that lowers the line).
    fn deassert(&self) -> Result<bool>;

    /// The notifier signalled when the line is lowered at the guest's EOI; on it the device
    /// triggers again if its condition still holds.
    fn resample(&self) -> &Notifier;
}

/// An interrupt the device side can mask. While masked, a trigger is held pending and delivered
/// once at unmask, as an MSI-X vector's pending bit does.
pub trait MaskableInterrupt: Send + Sync + fmt::Debug {
    /// Masks (`true`) or unmasks (`false`) the interrupt; unmasking delivers what is pending.
    ///
    /// # Errors
    ///
    /// An implementation's own (a routing change, a delivery at unmask).
    fn set_masked(&self, masked: bool) -> Result<()>;

    /// Whether the interrupt is masked.
    fn is_masked(&self) -> bool;

    /// Whether a trigger is held pending while masked.
    fn is_pending(&self) -> bool;
}

/// The notifier a device waits on for the guest's queue notifications.
pub trait QueueKicks: Send + Sync + fmt::Debug {
    /// The notifier the guest's kicks add to.
    fn kicks(&self) -> &Notifier;
}

impl QueueKicks for Notifier {
    fn kicks(&self) -> &Notifier {
        self
    }
}

#[cfg(any(test, feature = "test-utils"))]
mod recording;
#[cfg(any(test, feature = "test-utils"))]
#[cfg_attr(docsrs, doc(cfg(feature = "test-utils")))]
pub use recording::RecordingInterrupt;
