//! MSI-X: a device's vectors, with the PCI table and PBA semantics, delivered through irqfds on
//! MSI routes.
//!
//! The device raises a vector by index and never sees a GSI. Each vector has a message
//! (address/data), a mask bit and a pending bit; the function has an enable bit and a function
//! mask. A vector *delivers* when MSI-X is enabled, the function is unmasked and the vector is
//! unmasked: then its irqfd is assigned on an MSI route carrying its message.
//!
//! # Masking without loss
//!
//! Masking a vector (or the function) **detaches** its irqfd: the irqfd is deassigned and the
//! eventfd is kept. Every state change of a vector — trigger, mask, unmask, message change — runs
//! under that vector's lock, so they happen in one order:
//!
//! * **trigger** while delivering writes the eventfd; KVM injects at once (the write's wakeup runs
//!   the injection before the write returns, or queues work that deassignment flushes). While not
//!   delivering, a trigger sets the pending bit instead.
//! * **mask** deassigns the irqfd. When `KVM_IRQFD` returns, everything written before is
//!   injected and nothing written after can be. The counter is then read, and anything in it
//!   (written by a holder of [`MsixVector::notifier`], such as a vhost-user backend) becomes the
//!   pending bit.
//! * **unmask** first drains the counter into the pending bit, then assigns the irqfd on an
//!   empty counter (so KVM's assign-time injection, which does not consume the counter, never
//!   fires), then — if the pending bit was set — clears it and writes the eventfd once: exactly one
//!   interrupt, injected by the same path as any trigger.
//!
//! Hence no interrupt reaches the guest from a masked vector after the mask returns, no trigger is
//! lost (it is injected, or pending and injected at unmask), and none is doubled (the pending bit
//! is consumed under the same lock that set it). An external writer that writes the eventfd
//! without the lock gets the same guarantees except in one window: a write landing between the
//! drain and the assignment in an unmask is injected by KVM's assign-time poll as well as counted
//! in the counter, so its next delivery may come one event early.
//!
//! # Guest-visible table
//!
//! An [`IoRegion::msix`](crate::io::IoRegion::msix) in the VMM's `IoManager` emulates the MSI-X
//! table and the PBA, and [`write_message_control`](MsixVectors::write_message_control) the
//! capability's message control, for a VMM that traps them.
//!
//! The table, PBA and message-control encoding is a pure codec (no KVM), tested on its own; the
//! vector state machine in [`MsixVectors`] applies what it decodes.

mod table;
mod vectors;

pub use table::{MSIX_ENABLE, MSIX_ENTRY_SIZE, MSIX_FUNCTION_MASK};
pub(crate) use vectors::WeakVectors;
pub use vectors::{MsixState, MsixStats, MsixVector, MsixVectors, VectorState};
