//! The split irqchip's userspace half: an IOAPIC whose pins are served from userspace while the
//! local APICs stay in KVM.
//!
//! With `KVM_CAP_SPLIT_IRQCHIP` (the mode Cloud Hypervisor runs on x86, and the one TDX needs)
//! KVM keeps the local APICs and leaves the PIC and IOAPIC to the VMM: a kernel irqfd can no
//! longer assert a legacy pin, and the EOI a level line's resample waits for reaches userspace as
//! `KVM_EXIT_IOAPIC_EOI`. [`Ioapic`] is that IOAPIC, written as far as the notification contract
//! needs:
//!
//! * the register window (IOREGSEL/IOWIN), the ID and version registers and 24 redirection
//!   entries (vector, delivery mode, destination and its mode, polarity, trigger mode, mask);
//! * edge pins: each edge delivered once, an edge seen while masked latched and delivered at
//!   unmask;
//! * level pins: delivered while asserted and not awaiting an EOI (remote IRR); at the EOI the
//!   line is lowered and every level source on the pin gets a resample, as KVM's resampler does
//!   for a kernel resample irqfd — so [`LevelIrqFd`](crate::LevelIrqFd)'s device code and its
//!   exact counts are the same on both irqchips (also on a pin the guest programmed
//!   edge-triggered, which KVM acknowledges at its vector's EOI too);
//! * each delivery is the MSI the entry makes (destination in the address, vector, delivery
//!   mode and trigger mode in the data), sent with `KVM_SIGNAL_MSI`.
//!
//! Its state saves and restores whole ([`IoapicState`]: the entries with their remote IRR, the
//! latched edges, the asserted lines), so a split-irqchip machine can be snapshotted.
//!
//! Polarity is kept and read back but lines are logical (asserted or not), as devices signal
//! them. There is no 8259 PIC: on the split irqchip a guest uses the IOAPIC (or MSIs).
//!
//! The register file and the pin logic (the private `registers` module) are pure, unit-tested
//! without KVM.

mod ioapic;
mod registers;

pub use ioapic::{Ioapic, IoapicStats};
pub use registers::{IoapicState, Redirection, IOAPIC_BASE, IOAPIC_SIZE};
