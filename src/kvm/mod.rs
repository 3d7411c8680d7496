//! Registrations the kernel holds: kernel ioeventfds, the GSI routing table, and the irqfd
//! bindings every interrupt kind is built on.
//!
//! This is the layer right above the ioctls: each type here makes one kind of kernel
//! registration, checks it as KVM would before asking, and undoes it on drop. Nothing here
//! chooses between the kernel and userspace; [`fallback`](crate::fallback) does, on top of this.
//!
//! * [`WriteMatch`] and [`IoEventAddress`]: which guest writes an ioeventfd matches (with a
//!   [`Width`](crate::Width)); [`Vm::ioevent`](crate::Vm::ioevent) registers one.
//! * [`GsiRouter`] and [`Transaction`]: the VM's routing table, owned in one place (see the
//!   `routing` section below).
//!
//! # Routing
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, and KVM cannot read it back. After
//! `KVM_CREATE_IRQCHIP` on x86 the kernel installs default routes (GSI 0–15 to the PIC pin and the
//! IOAPIC pin of the same number, GSI 16–23 to the IOAPIC only); the first `KVM_SET_GSI_ROUTING`
//! that leaves them out removes them. The router therefore keeps a shadow of the whole table,
//! seeded with those defaults, and sends all of it on every commit. It also knows which GSIs
//! have irqfds bound, so it refuses an irqfd on a GSI with no route (KVM would accept it and drop
//! every interrupt) and refuses to remove a route that still has an irqfd.
//!
//! # Ioeventfd overlaps
//!
//! KVM refuses a registration that overlaps another (EEXIST) when both are at the same address
//! and either is any-width, or both have the same width and either has no datamatch or both have
//! the same datamatch. At most one registration can therefore match any write.

mod ioevent;
pub(crate) mod irqfd;
mod routing;

pub use crate::bus::IoEventAddress;
pub(crate) use ioevent::IoEventFd;
pub use ioevent::WriteMatch;
pub(crate) use routing::IRQCHIP_GSIS;
pub use routing::{Gsi, GsiRouter, IrqChip, MsiMessage, Route, Transaction, GSI_LIMIT};
