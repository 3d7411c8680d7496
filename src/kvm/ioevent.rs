//! [`WriteMatch`], and the kernel ioeventfd behind [`IoEvent`](crate::IoEvent): guest writes to
//! an address signal a [`Notifier`] inside the kernel.
//!
//! A registration names a bus and address ([`IoEventAddress`]), a write width ([`Width`]) and
//! optionally a value the write must carry (datamatch). KVM then adds 1 to the notifier for every
//! matching guest write, without the vCPU leaving the kernel. Writes that match nothing exit to
//! userspace as `KVM_EXIT_MMIO` / `KVM_EXIT_IO` as before.
//!
//! KVM refuses a registration that overlaps another (EEXIST) when both are at the same address
//! and either is any-width, or both have the same width and either has no datamatch or both have
//! the same datamatch. At most one registration can therefore match any write.

use std::fmt;
use std::sync::Arc;

use kvm_ioctls::VmFd;

use crate::bus::{IoEventAddress, Width};
use crate::error::{Capability, Error, Result};
use crate::notifier::Notifier;
use crate::sys::{self, IoEventRequest};

/// Which guest writes a registration matches: address, width and optional datamatch.
///
/// ```
/// use vm_notify::kvm::{IoEventAddress, WriteMatch};
/// use vm_notify::Width;
///
/// // virtio-mmio QueueNotify of queue 1: a 4-byte write of the value 1 at base + 0x50.
/// let notify = WriteMatch::mmio(0xd000_0050).width(Width::W4).datamatch(1);
/// assert!(notify.validate().is_ok());
/// assert_eq!(notify.address(), IoEventAddress::Mmio(0xd000_0050));
///
/// // Ports have no 8-byte writes.
/// assert!(WriteMatch::pio(0x510).width(Width::W8).validate().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct WriteMatch {
    addr: IoEventAddress,
    width: Width,
    datamatch: Option<u64>,
}

impl WriteMatch {
    /// Any-width writes to the MMIO address `addr`.
    pub fn mmio(addr: u64) -> Self {
        Self::at(IoEventAddress::Mmio(addr))
    }

    /// Any-width writes to the I/O port `port`.
    pub fn pio(port: u64) -> Self {
        Self::at(IoEventAddress::Pio(port))
    }

    /// Any-width writes to `addr`.
    pub fn at(addr: IoEventAddress) -> Self {
        WriteMatch {
            addr,
            width: Width::Any,
            datamatch: None,
        }
    }

    /// Only writes of this width.
    pub fn width(mut self, width: Width) -> Self {
        self.width = width;
        self
    }

    /// Only writes carrying this value (needs a fixed width).
    pub fn datamatch(mut self, value: u64) -> Self {
        self.datamatch = Some(value);
        self
    }

    /// The address.
    pub fn address(&self) -> IoEventAddress {
        self.addr
    }

    /// The width.
    pub fn write_width(&self) -> Width {
        self.width
    }

    /// The datamatch value, if any.
    pub fn data(&self) -> Option<u64> {
        self.datamatch
    }

    /// Checks the match as KVM would, without asking KVM: a datamatch needs a width and must fit
    /// in it, ports are 16 bits and have no 8-byte writes, and the range's end
    /// (`addr + width`, as KVM computes it) must not overflow. One rule is stricter than KVM's:
    /// a port range must end by 0x10000 (KVM would take a 4-byte match at port 0xfffd, which no
    /// port write can reach).
    ///
    /// # Errors
    ///
    /// [`Error::DatamatchWithoutWidth`], [`Error::DatamatchTooWide`], [`Error::PortOutOfRange`],
    /// [`Error::PioWidth`] or [`Error::AddressWraps`].
    pub fn validate(&self) -> Result<()> {
        self.request().map(|_| ())
    }

    /// The capabilities KVM needs to take this registration in the kernel.
    pub(crate) fn capabilities(&self) -> impl Iterator<Item = Capability> {
        let any_length = self.width == Width::Any;
        std::iter::once(Capability::IoEventFd)
            .chain(any_length.then_some(Capability::IoEventFdAnyLength))
    }

    pub(crate) fn request(&self) -> Result<IoEventRequest> {
        let addr = self.addr;
        let len = self.width.bytes();
        if let Some(value) = self.datamatch {
            if self.width == Width::Any {
                return Err(Error::DatamatchWithoutWidth { addr });
            }
            if len < 8 && value >> (8 * len) != 0 {
                return Err(Error::DatamatchTooWide {
                    addr,
                    value,
                    width: len,
                });
            }
        }
        let pio = matches!(addr, IoEventAddress::Pio(_));
        if pio {
            if addr.raw() > 0xffff {
                return Err(Error::PortOutOfRange { addr });
            }
            if self.width == Width::W8 {
                return Err(Error::PioWidth { addr });
            }
        }
        // KVM's own rule: the exclusive end `addr + len` must not overflow (so a 1-byte MMIO
        // registration at u64::MAX is refused with EINVAL); ports end at 0x10000.
        let limit = if pio { Some(0x1_0000) } else { None };
        match (addr.raw().checked_add(u64::from(len)), limit) {
            (Some(end), Some(limit)) if end <= limit => {}
            (Some(_), None) => {}
            _ => return Err(Error::AddressWraps { addr, width: len }),
        }
        Ok(IoEventRequest {
            addr: addr.raw(),
            len,
            datamatch: self.datamatch,
            pio,
        })
    }
}

/// A kernel ioeventfd: `notifier` assigned for the guest writes a [`WriteMatch`] describes,
/// deassigned on drop. [`IoEvent`](crate::IoEvent) is its public face.
#[must_use = "dropping an IoEventFd deassigns it at once"]
pub(crate) struct IoEventFd {
    vm: Arc<VmFd>,
    write: WriteMatch,
    req: IoEventRequest,
    notifier: Notifier,
}

impl fmt::Debug for IoEventFd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoEventFd")
            .field("write", &self.write)
            .field("notifier", &self.notifier)
            .finish()
    }
}

impl IoEventFd {
    /// `KVM_IOEVENTFD` for a validated `write` whose capabilities the caller checked.
    pub(crate) fn assign(
        vm: &Arc<VmFd>,
        write: WriteMatch,
        req: IoEventRequest,
        notifier: Notifier,
    ) -> Result<IoEventFd> {
        sys::assign_ioevent(vm, &notifier, &req)?;
        Ok(IoEventFd {
            vm: vm.clone(),
            write,
            req,
            notifier,
        })
    }

    /// What this registration matches.
    pub(crate) fn write_match(&self) -> WriteMatch {
        self.write
    }

    /// The registration's handle to the notifier.
    pub(crate) fn notifier(&self) -> &Notifier {
        &self.notifier
    }
}

impl Drop for IoEventFd {
    fn drop(&mut self) {
        // The exact (fd, address, length, datamatch) of the assignment; with them KVM finds the
        // registration. Nothing useful can be done with an error in drop: the kernel drops the
        // registration anyway when the VM closes.
        let _ = sys::deassign_ioevent(&self.vm, &self.notifier, &self.req);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_and_lengths() {
        for (w, l) in [
            (Width::Any, 0),
            (Width::W1, 1),
            (Width::W2, 2),
            (Width::W4, 4),
            (Width::W8, 8),
        ] {
            assert_eq!(w.bytes(), l);
        }
    }

    #[test]
    fn datamatch_needs_a_width() {
        let m = WriteMatch::mmio(0x1000).datamatch(1);
        assert!(matches!(
            m.validate(),
            Err(Error::DatamatchWithoutWidth {
                addr: IoEventAddress::Mmio(0x1000)
            })
        ));
    }

    #[test]
    fn datamatch_must_fit_the_width() {
        let m = WriteMatch::mmio(0x1000).width(Width::W1).datamatch(0x100);
        match m.validate() {
            Err(Error::DatamatchTooWide {
                value: 0x100,
                width: 1,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        assert!(WriteMatch::mmio(0x1000)
            .width(Width::W2)
            .datamatch(0xffff)
            .validate()
            .is_ok());
        assert!(WriteMatch::mmio(0x1000)
            .width(Width::W4)
            .datamatch(0x1_0000_0000)
            .validate()
            .is_err());
        assert!(WriteMatch::mmio(0x1000)
            .width(Width::W8)
            .datamatch(u64::MAX)
            .validate()
            .is_ok());
    }

    #[test]
    fn ports_are_16_bits_without_8_byte_writes() {
        assert!(matches!(
            WriteMatch::pio(0x1_0000).validate(),
            Err(Error::PortOutOfRange { .. })
        ));
        assert!(matches!(
            WriteMatch::pio(0x60).width(Width::W8).validate(),
            Err(Error::PioWidth { .. })
        ));
        assert!(WriteMatch::pio(0xffff).width(Width::W1).validate().is_ok());
    }

    #[test]
    fn ranges_must_not_wrap() {
        assert!(matches!(
            WriteMatch::mmio(u64::MAX - 2).width(Width::W4).validate(),
            Err(Error::AddressWraps { width: 4, .. })
        ));
        assert!(matches!(
            WriteMatch::mmio(u64::MAX).width(Width::W1).validate(),
            Err(Error::AddressWraps { width: 1, .. })
        ));
        assert!(WriteMatch::mmio(u64::MAX - 4)
            .width(Width::W4)
            .validate()
            .is_ok());
        assert!(WriteMatch::mmio(u64::MAX).validate().is_ok());
        assert!(WriteMatch::pio(0xfffc).width(Width::W4).validate().is_ok());
        assert!(matches!(
            WriteMatch::pio(0xfffe).width(Width::W4).validate(),
            Err(Error::AddressWraps { .. })
        ));
    }

    #[test]
    fn errors_name_the_address() {
        let e = WriteMatch::pio(0x12345).validate().unwrap_err();
        assert!(e.to_string().contains("PIO port 0x12345"), "{e}");
        let e = WriteMatch::mmio(0xd000_0000)
            .datamatch(1)
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("MMIO 0xd0000000"), "{e}");
    }
}
