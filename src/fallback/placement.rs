//! [`Placement`]: where a registration lives, and [`Fallback`]: why in userspace.

use std::fmt;

use crate::error::Capability;

/// Why a registration is served in userspace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Fallback {
    /// The backend's policy is [`Policy::Userspace`](super::Policy::Userspace).
    Requested,
    /// The capability was disabled on the VM ([`Vm::disable`](crate::Vm::disable)).
    Disabled(Capability),
    /// KVM lacks the capability.
    MissingCapability(Capability),
    /// KVM refused the registration; the text is the error.
    KernelRefused(String),
    /// In the kernel it would sit next to another of this backend's registrations in the
    /// pattern KVM's I/O bus mishandles (an any-width registration at an address a sized one
    /// reaches from below), where the kernel can miss its writes.
    KernelWouldMiss,
    /// The GSI is a pin of the split irqchip's IOAPIC, which is in userspace
    /// ([`Ioapic`](crate::irqchip::Ioapic)): no kernel irqfd can assert it.
    SplitIrqchip,
}

/// Where a registration lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Placement {
    /// In the kernel: matching writes never leave it, triggers are injected by KVM.
    Kernel,
    /// In userspace: matching writes exit and the dispatcher signals the notifier; triggers are
    /// read and injected by the backend's injector (run by the VMM).
    Userspace(Fallback),
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Placement::Kernel => f.write_str("kernel"),
            Placement::Userspace(Fallback::Requested) => f.write_str("userspace (requested)"),
            Placement::Userspace(Fallback::Disabled(c)) => write!(f, "userspace ({c} disabled)"),
            Placement::Userspace(Fallback::MissingCapability(c)) => {
                write!(f, "userspace (KVM lacks {c})")
            }
            Placement::Userspace(Fallback::KernelRefused(why)) => {
                write!(f, "userspace (the kernel refused: {why})")
            }
            Placement::Userspace(Fallback::SplitIrqchip) => {
                f.write_str("userspace (a pin of the split irqchip's IOAPIC)")
            }
            Placement::Userspace(Fallback::KernelWouldMiss) => f.write_str(
                "userspace (next to a sized registration reaching its address, the kernel can miss its writes)",
            ),
        }
    }
}
