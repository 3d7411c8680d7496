//! # vm-notify
//!
//! Device notifications for KVM virtual machines, both directions made of one thing: an eventfd
//! counter ([`Notifier`]).
//!
//! ```text
//! guest vCPU                    kernel (KVM)                      device thread (userspace)
//! ----------                    ------------                      -------------------------
//! mov [notify], eax  ──►  ioeventfd matches addr/len/data ──►  Notifier counter += 1
//!                         (no exit to userspace)               read() -> n kicks
//! guest ISR runs     ◄──  irqfd: inject GSI / MSI route   ◄──  IrqFd::trigger()
//! EOI (level only)   ──►  resample counter += 1           ──►  device re-asserts if still due
//! ```
//!
//! * [`IoEvent`]: guest writes matching a [`WriteMatch`] (address, [`Width`], datamatch) add 1 to
//!   a notifier inside the kernel. Dropping it unregisters.
//! * [`IrqFd`] / [`LevelIrqFd`]: a device triggers a notifier and KVM injects a GSI; the level
//!   kind has a resample notifier signalled at the guest's EOI.
//! * [`GsiRouter`]: the VM's routing table (default irqchip routes kept, MSI routes allocated,
//!   changes committed in one ioctl); irqfds on unrouted GSIs are refused.
//! * [`MsixVectors`]: MSI-X vectors raised by index, with mask and pending bits that lose and
//!   double nothing, the table and PBA for a VMM to emulate, batched routing, save/restore.
//! * [`Backend`]: the same registrations in the kernel or in userspace ([`ExitDispatcher`] for
//!   guest writes that exit, an injector thread for edge, MSI and level interrupts), chosen per
//!   registration.
//! * [`EventLoop`]: a device thread waits on many notifiers; `NotifierSubscriber` (feature
//!   `event-manager`) does it inside an `event-manager` loop. [`AdaptivePoll`] (opt-in) polls a
//!   busy notifier for a self-tuning time before blocking.
//! * `testkit` (cargo feature `testkit`): a tiny x86-64 guest on `/dev/kvm`, for proving all of
//!   the above end to end.
//!
//! Every registration is a value: creating it registers, dropping it unregisters, and it holds an
//! `Arc` of the VM so the VM outlives it. Every error is an [`Error`] variant naming the address
//! or GSI at fault and the errno KVM returned.
//!
//! ## Example
//!
//! A virtio-style device: the guest kicks queue 0 with a 4-byte write of 0 to its notify
//! register; the device answers with an MSI.
//!
//! ```
//! # if !vm_notify::testkit::kvm_or_skip("crate example") { return Ok(()); }
//! use std::sync::Arc;
//! use vm_notify::{
//!     Attempt, GsiRouter, IoEvent, IrqFd, Mode, MsiMessage, Notifier, Width, WriteMatch,
//! };
//!
//! let kvm = kvm_ioctls::Kvm::new()?;
//! let vm = Arc::new(kvm.create_vm()?);
//! vm.create_irq_chip()?;
//!
//! // guest -> device
//! let kicks = Notifier::new(Mode::Counter)?;
//! let _notify = IoEvent::register(
//!     &vm,
//!     WriteMatch::mmio(0xd000_0050).width(Width::W4).datamatch(0),
//!     &kicks,
//! )?;
//!
//! // device -> guest
//! let router = GsiRouter::new(vm.clone())?;
//! let gsi = router.route_msi(MsiMessage::x86(0, 0x40))?;
//! let irq = IrqFd::new(&router, gsi, &Notifier::new(Mode::Counter)?)?;
//!
//! // The device thread (here no guest runs, so nothing has kicked yet):
//! match kicks.try_read()? {
//!     Attempt::Done(n) => { /* process the queue: n kicks since the last read */ }
//!     Attempt::WouldBlock => { /* wait on the fd (epoll) or call kicks.read() */ }
//! }
//! irq.trigger()?; // the guest's vector 0x40 handler runs
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(
    missing_docs,
    missing_debug_implementations,
    clippy::undocumented_unsafe_blocks
)]

mod backend;
mod dispatch;
mod error;
mod event_loop;
mod inject;
mod ioevent;
mod irq;
mod msi;
mod notifier;
mod poll;
mod routing;
mod virtio;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz;
#[cfg(feature = "event-manager")]
mod subscriber;
#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;
#[cfg(feature = "vhost-user")]
#[cfg_attr(docsrs, doc(cfg(feature = "vhost-user")))]
pub mod vhost;

#[cfg(feature = "event-manager")]
#[cfg_attr(docsrs, doc(cfg(feature = "event-manager")))]
pub use subscriber::NotifierSubscriber;

pub use backend::{Backend, BackendKind, Fallback, Path};
pub use dispatch::ExitDispatcher;
pub use error::{Capability, Error, Result};
pub use event_loop::{EventLoop, StopHandle, Wake};
pub use ioevent::{IoEvent, IoEventAddress, Width, WriteMatch};
pub use irq::{IrqFd, LevelIrqFd};
pub use msi::{
    MsixState, MsixStats, MsixVectors, VectorState, MSIX_ENABLE, MSIX_ENTRY_SIZE,
    MSIX_FUNCTION_MASK, MSIX_MAX_VECTORS, MSIX_VECTOR_MASKED,
};
pub use notifier::{Attempt, Mode, Notifier, COUNTER_MAX};
pub use poll::{AdaptivePoll, PollStats};
pub use routing::{
    Gsi, GsiRouter, IrqChip, MsiMessage, Route, Transaction, GSI_LIMIT, IRQCHIP_GSIS,
    ROUTE_TABLE_LIMIT,
};
pub use virtio::{
    MmioInterrupt, MmioNotify, PciNotify, VirtQueueNotify, INT_CONFIG, INT_VRING,
    MMIO_INTERRUPT_ACK, MMIO_INTERRUPT_STATUS, MMIO_QUEUE_NOTIFY, NO_VECTOR,
};

/// The README's code, compiled as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

#[cfg(test)]
mod tests {
    use super::*;

    fn send_sync<T: Send + Sync>() {}

    #[test]
    fn handles_are_send_and_sync() {
        // Device threads, vCPU threads and the VMM thread each hold what they use.
        send_sync::<Notifier>();
        send_sync::<IoEvent>();
        send_sync::<IrqFd>();
        send_sync::<LevelIrqFd>();
        send_sync::<GsiRouter>();
        send_sync::<AdaptivePoll>();
        send_sync::<Error>();
    }
}
