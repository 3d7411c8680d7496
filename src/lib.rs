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
//! The crate is layered, each layer using only those below it (`docs/ARCHITECTURE.md` has the
//! table, and CI checks it):
//!
//! * the ground: [`Notifier`] (eventfd semantics, over vmm-sys-util's `EventFd`) and [`Error`];
//! * [`wait`]: [`EventLoop`](wait::EventLoop), [`AdaptivePoll`](wait::AdaptivePoll) and the
//!   event-manager adapter, what device threads block or poll on;
//! * [`kvm`]: the registrations the kernel holds — kernel ioeventfds ([`WriteMatch`]), the GSI
//!   routing table ([`GsiRouter`](kvm::GsiRouter)) and the
//!   irqfd bindings;
//! * [`msix`]: a function's MSI-X vectors with mask and pending bits that lose and double nothing,
//!   whose table and PBA a VMM emulates through [`io::IoRegion`];
//! * [`fallback`]: the placement policy ([`Policy`](fallback::Policy)): the same registrations
//!   in the kernel or in userspace (an exit dispatcher, an injector the VMM runs), chosen per
//!   registration, behind [`IoEvent`], [`IrqFd`] and [`LevelIrqFd`];
//! * [`device`]: what devices see — [`GuestInterrupt`] and [`QueueKicks`], implemented by every
//!   delivery kind, with [`RecordingInterrupt`](device::RecordingInterrupt) for tests without KVM;
//! * [`virtio`] (virtio-mmio and virtio-pci), `vhost_user` and `vhost_net` (cargo features
//!   `vhost-user`, `vhost-net`): the transports and the hand-off to backends outside the VMM,
//!   built on the traits;
//! * [`Vm`]: the root a VMM makes every registration from.
//!
//! Every registration is a value: creating it registers, dropping it unregisters, and it holds an
//! `Arc` of the VM so the VM outlives it. Every error is an [`Error`] variant naming the address
//! or GSI at fault and the errno KVM returned. The tiny-guest test kit that proves all of this end
//! to end is its own crate, `vm-notify-testkit`.
//!
//! ## Example
//!
//! A virtio-style device: the guest kicks queue 0 with a 4-byte write of 0 to its notify
//! register; the device answers with an MSI.
//!
//! ```
//! # if !vm_notify_testkit::kvm_or_skip("crate example") { return Ok(()); }
//! use std::sync::Arc;
//! use vm_notify::fallback::Policy;
//! use vm_notify::kvm::MsiMessage;
//! use vm_notify::{Attempt, Mode, Notifier, Vm, Width, WriteMatch};
//!
//! let kvm = kvm_ioctls::Kvm::new()?;
//! let fd = Arc::new(kvm.create_vm()?);
//! fd.create_irq_chip()?;
//! let vm = Vm::new(fd, Policy::Kernel)?;
//!
//! // guest -> device
//! let kicks = Notifier::new(Mode::Counter)?;
//! let _notify = vm.ioevent(WriteMatch::mmio(0xd000_0050).width(Width::W4).datamatch(0), &kicks)?;
//!
//! // device -> guest
//! let irq = vm.irqfd(vm.router().route_msi(MsiMessage::x86(0, 0x40))?)?;
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

mod bus;
mod error;
mod notifier;

#[cfg(not(feature = "fault-injection"))]
mod fault;
#[cfg(feature = "fault-injection")]
#[cfg_attr(docsrs, doc(cfg(feature = "fault-injection")))]
pub mod fault;
#[cfg(feature = "kvm")]
mod sys;
#[cfg(feature = "kvm")]
mod vm;

pub mod device;
pub mod virtio;
pub mod wait;

#[cfg(feature = "kvm")]
#[cfg_attr(docsrs, doc(cfg(feature = "kvm")))]
pub mod fallback;
#[cfg(feature = "kvm")]
#[cfg_attr(docsrs, doc(cfg(feature = "kvm")))]
pub mod io;
#[cfg(feature = "kvm")]
#[cfg_attr(docsrs, doc(cfg(feature = "kvm")))]
pub mod irqchip;
#[cfg(feature = "kvm")]
#[cfg_attr(docsrs, doc(cfg(feature = "kvm")))]
pub mod kvm;
#[cfg(feature = "kvm")]
#[cfg_attr(docsrs, doc(cfg(feature = "kvm")))]
pub mod msix;

#[cfg(feature = "vhost-user")]
#[cfg_attr(docsrs, doc(cfg(feature = "vhost-user")))]
pub mod vhost_user;

#[cfg(feature = "vhost-net")]
#[cfg_attr(docsrs, doc(cfg(feature = "vhost-net")))]
pub mod vhost_net;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz;

pub use bus::Width;
pub use device::{GuestInterrupt, QueueKicks};
pub use error::{Capability, Error, Result};
pub use notifier::{Attempt, Mode, Notifier, COUNTER_MAX};

#[cfg(feature = "kvm")]
pub use fallback::{IoEvent, IrqFd, LevelIrqFd};
#[cfg(feature = "kvm")]
pub use kvm::WriteMatch;
#[cfg(feature = "kvm")]
pub use vm::{Batch, Vm};

/// The README's code, compiled as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
#[allow(dead_code)]
struct ReadmeDoctests;

#[cfg(all(test, feature = "kvm"))]
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
        send_sync::<kvm::GsiRouter>();
        send_sync::<wait::AdaptivePoll>();
        send_sync::<msix::MsixVectors>();
        send_sync::<virtio::VirtQueueNotify>();
        send_sync::<fallback::Backend>();
        send_sync::<Vm>();
        send_sync::<Error>();
    }
}
