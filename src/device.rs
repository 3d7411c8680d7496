//! What a device sees: two traits, implemented by every delivery kind, and recording
//! implementations for tests that run without `/dev/kvm`.
//!
//! * [`GuestInterrupt`]: "interrupt the guest". Implemented by [`IrqFd`] (edge, a GSI or MSI
//!   route), [`LevelIrqFd`] (a level pin with resample), [`MsixVector`] (one vector of a function's
//!   MSI-X table, with mask and pending bits) and [`MmioInterrupt`](crate::virtio::MmioInterrupt)
//!   (a virtio-mmio device's `InterruptStatus` and its line), each on the kernel or the userspace
//!   path. A VMM can put its own interrupt source behind it.
//! * [`QueueKicks`]: "the notifier a device waits on for the guest's kicks". Implemented by
//!   [`Notifier`] itself, [`IoEvent`], [`IoEventFd`] and
//!   [`VirtQueueNotify`](crate::virtio::VirtQueueNotify).
//!
//! The virtio transports hold their interrupts as `Arc<dyn GuestInterrupt>`, so a device crate's
//! notification logic can run against a [`RecordingInterrupt`] in a plain unit test:
//!
//! ```
//! use std::sync::Arc;
//! use vm_notify::device::RecordingInterrupt;
//! use vm_notify::virtio::VirtQueueNotify;
//! use vm_notify::{Mode, Notifier, QueueKicks};
//!
//! /// The device under test: serves every kick, then signals used buffers once per wake-up.
//! fn serve(queue: &VirtQueueNotify) -> vm_notify::Result<u64> {
//!     let kicks = queue.kicks().read()?;
//!     queue.signal_used()?;
//!     Ok(kicks)
//! }
//!
//! let irq = Arc::new(RecordingInterrupt::edge()?);
//! let queue = VirtQueueNotify::new(0, Notifier::new(Mode::Counter)?, irq.clone());
//! // What the guest's three queue notifications would have done through an ioeventfd:
//! queue.kicks().add(3)?;
//! assert_eq!(serve(&queue)?, 3);
//! assert_eq!(irq.signals(), 1, "one interrupt for three coalesced kicks");
//! # Ok::<(), vm_notify::Error>(())
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::Result;
use crate::fallback::{IoEvent, IrqFd, LevelIrqFd};
use crate::kvm::IoEventFd;
use crate::msix::MsixVector;
use crate::notifier::{Attempt, Mode, Notifier};

/// Interrupts the guest. Every delivery kind implements it; devices and transports hold it as
/// `Arc<dyn GuestInterrupt>`.
///
/// The contract, the same for every implementation:
///
/// * [`signal`](Self::signal) asks for an interrupt: an edge injection, a level line asserted, an
///   MSI-X vector raised (or held pending while masked).
/// * [`eventfd`](Self::eventfd) gives a descriptor that another writer (a vhost-user backend's
///   call fd, a VFIO interrupt) adds to with the same effect as `signal`.
/// * Level lines only: [`deassert`](Self::deassert) when the device's condition clears, and
///   [`resample_notifier`](Self::resample_notifier), signalled when the line is lowered, on which
///   the device signals again if its condition still holds.
pub trait GuestInterrupt: Send + Sync + fmt::Debug {
    /// Interrupts the guest. Returns whether this asked for a new interrupt: `false` where the
    /// request folded into one still outstanding (a virtio-mmio status bit not yet acknowledged)
    /// or there is nothing to raise (a virtio-pci queue without a vector).
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`](crate::Error::Notifier) if the eventfd write fails.
    fn signal(&self) -> Result<bool>;

    /// A descriptor of the eventfd that delivers this interrupt, for a writer outside this
    /// process's signal path: a write to it interrupts the guest as [`signal`](Self::signal) does.
    ///
    /// # Errors
    ///
    /// [`Error::FdExhausted`](crate::Error::FdExhausted) when no descriptor is left;
    /// [`Error::NoEventFd`](crate::Error::NoEventFd) where no such eventfd exists (a virtio-mmio
    /// interrupt, whose status the VMM keeps; a virtio-pci queue without a vector).
    fn eventfd(&self) -> Result<Notifier>;

    /// Level lines: the device's condition cleared. Returns whether a line was lowered here
    /// (edge interrupts and kernel level irqfds have nothing to lower).
    ///
    /// # Errors
    ///
    /// Those of [`LevelIrqFd::deassert`].
    fn deassert(&self) -> Result<bool> {
        Ok(false)
    }

    /// Level lines: the notifier signalled when the line is lowered. `None` for edge interrupts.
    fn resample_notifier(&self) -> Option<&Notifier> {
        None
    }
}

/// The notifier a device waits on for the guest's queue notifications.
pub trait QueueKicks: Send + Sync + fmt::Debug {
    /// The notifier the guest's kicks add to.
    fn kicks(&self) -> &Notifier;
}

impl GuestInterrupt for IrqFd {
    fn signal(&self) -> Result<bool> {
        self.trigger().map(|()| true)
    }

    fn eventfd(&self) -> Result<Notifier> {
        Ok(self.notifier().share())
    }
}

impl GuestInterrupt for LevelIrqFd {
    fn signal(&self) -> Result<bool> {
        self.trigger().map(|()| true)
    }

    fn eventfd(&self) -> Result<Notifier> {
        Ok(self.notifier().share())
    }

    fn deassert(&self) -> Result<bool> {
        LevelIrqFd::deassert(self)
    }

    fn resample_notifier(&self) -> Option<&Notifier> {
        Some(self.resample())
    }
}

impl GuestInterrupt for MsixVector {
    fn signal(&self) -> Result<bool> {
        self.raise().map(|()| true)
    }

    fn eventfd(&self) -> Result<Notifier> {
        self.notifier()
    }
}

impl QueueKicks for Notifier {
    fn kicks(&self) -> &Notifier {
        self
    }
}

impl QueueKicks for IoEvent {
    fn kicks(&self) -> &Notifier {
        self.notifier()
    }
}

impl QueueKicks for IoEventFd {
    fn kicks(&self) -> &Notifier {
        self.notifier()
    }
}

/// A [`GuestInterrupt`] that records what the device asked for, for unit tests without
/// `/dev/kvm`. Its eventfd is a real one: writes to it by another party are counted by
/// [`eventfd_writes`](Self::eventfd_writes).
#[derive(Debug)]
pub struct RecordingInterrupt {
    signals: AtomicU64,
    deasserts: AtomicU64,
    eventfd: Notifier,
    resample: Option<Notifier>,
}

impl RecordingInterrupt {
    /// An edge interrupt.
    ///
    /// # Errors
    ///
    /// Those of [`Notifier::new`].
    pub fn edge() -> Result<Self> {
        Ok(RecordingInterrupt {
            signals: AtomicU64::new(0),
            deasserts: AtomicU64::new(0),
            eventfd: Notifier::new(Mode::Counter)?,
            resample: None,
        })
    }

    /// A level line with a resample notifier ([`eoi`](Self::eoi) signals it).
    ///
    /// # Errors
    ///
    /// Those of [`Notifier::new`].
    pub fn level() -> Result<Self> {
        Ok(RecordingInterrupt {
            resample: Some(Notifier::new(Mode::Counter)?),
            ..RecordingInterrupt::edge()?
        })
    }

    /// How many times the device called [`signal`](GuestInterrupt::signal).
    pub fn signals(&self) -> u64 {
        self.signals.load(Ordering::Relaxed)
    }

    /// How many times the device called [`deassert`](GuestInterrupt::deassert).
    pub fn deasserts(&self) -> u64 {
        self.deasserts.load(Ordering::Relaxed)
    }

    /// What other writers added to the eventfd since the last call (read and cleared).
    ///
    /// # Errors
    ///
    /// Those of [`Notifier::try_read`].
    pub fn eventfd_writes(&self) -> Result<u64> {
        Ok(match self.eventfd.try_read()? {
            Attempt::Done(n) => n,
            Attempt::WouldBlock => 0,
        })
    }

    /// What the guest's EOI of a level line does: adds 1 to the resample notifier. Does nothing
    /// on an edge interrupt.
    ///
    /// # Errors
    ///
    /// Those of [`Notifier::notify`].
    pub fn eoi(&self) -> Result<()> {
        match &self.resample {
            Some(r) => r.notify(),
            None => Ok(()),
        }
    }
}

impl GuestInterrupt for RecordingInterrupt {
    fn signal(&self) -> Result<bool> {
        self.signals.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    fn eventfd(&self) -> Result<Notifier> {
        Ok(self.eventfd.share())
    }

    fn deassert(&self) -> Result<bool> {
        self.deasserts.fetch_add(1, Ordering::Relaxed);
        Ok(self.resample.is_some())
    }

    fn resample_notifier(&self) -> Option<&Notifier> {
        self.resample.as_ref()
    }
}
