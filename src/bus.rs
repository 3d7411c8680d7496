//! Where a guest write lands and how wide it is: the plain values every layer names.

use std::fmt;

/// Where a guest write lands: the MMIO bus or the port I/O bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum IoEventAddress {
    /// A guest-physical MMIO address.
    Mmio(u64),
    /// An x86 I/O port (0..=0xffff; larger values are refused with a typed error).
    Pio(u64),
}

impl IoEventAddress {
    /// The address on its bus.
    pub fn raw(&self) -> u64 {
        match *self {
            IoEventAddress::Mmio(a) | IoEventAddress::Pio(a) => a,
        }
    }
}

impl fmt::Display for IoEventAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoEventAddress::Mmio(a) => write!(f, "MMIO {a:#x}"),
            IoEventAddress::Pio(a) => write!(f, "PIO port {a:#x}"),
        }
    }
}

/// The width of the guest writes a registration matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Width {
    /// Any write width (kernel length 0); cannot carry a datamatch. On Intel EPT hosts an
    /// any-width MMIO registration takes KVM's fast MMIO path.
    Any,
    /// 1-byte writes.
    W1,
    /// 2-byte writes.
    W2,
    /// 4-byte writes.
    W4,
    /// 8-byte writes (MMIO only).
    W8,
}

impl Width {
    /// The kernel's length for this width: 0 for [`Width::Any`] (any width), else the byte
    /// count.
    pub fn bytes(&self) -> u32 {
        match self {
            Width::Any => 0,
            Width::W1 => 1,
            Width::W2 => 2,
            Width::W4 => 4,
            Width::W8 => 8,
        }
    }
}
