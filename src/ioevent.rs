//! [`IoEvent`]: guest writes to an address signal a [`Notifier`] inside the kernel.
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

use crate::backend::{self as sys, Backend, BackendKind, IoEventRequest, Path};
use crate::dispatch::{ExitDispatcher, Key};
use crate::error::{Error, Result};
use crate::notifier::Notifier;

/// Where a guest write lands: the MMIO bus or the port I/O bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    /// The kernel's length for this width: 0 for [`Width::Any`], else the byte count.
    pub fn len(&self) -> u32 {
        match self {
            Width::Any => 0,
            Width::W1 => 1,
            Width::W2 => 2,
            Width::W4 => 4,
            Width::W8 => 8,
        }
    }

    /// Whether this is [`Width::Any`] (kernel length 0).
    pub fn is_empty(&self) -> bool {
        *self == Width::Any
    }

    /// The width of a write of `bytes` bytes, if it is one KVM can match.
    pub fn from_len(bytes: usize) -> Option<Width> {
        match bytes {
            1 => Some(Width::W1),
            2 => Some(Width::W2),
            4 => Some(Width::W4),
            8 => Some(Width::W8),
            _ => None,
        }
    }
}

/// Which guest writes a registration matches: address, width and optional datamatch.
///
/// ```
/// use vm_notify::{IoEventAddress, Width, WriteMatch};
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
    /// in it, ports are 16 bits and have no 8-byte writes, and and the range's end
    /// (`addr + width`, as KVM computes it) must not overflow.
    ///
    /// # Errors
    ///
    /// [`Error::DatamatchWithoutWidth`], [`Error::DatamatchTooWide`], [`Error::PortOutOfRange`],
    /// [`Error::PioWidth`] or [`Error::AddressWraps`].
    pub fn validate(&self) -> Result<()> {
        self.request().map(|_| ())
    }

    pub(crate) fn request(&self) -> Result<IoEventRequest> {
        let addr = self.addr;
        let len = self.width.len();
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

/// A registered guest-write notification. Guest writes matching its [`WriteMatch`] add 1 to its
/// notifier — in the kernel ([`Path::Kernel`]), or through a [`Backend`]'s dispatcher when the
/// registration lives in userspace. Dropping it unregisters.
///
/// ```
/// # if !vm_notify::testkit::kvm_or_skip("doc example") { return Ok(()); }
/// use std::sync::Arc;
/// use vm_notify::{IoEvent, Mode, Notifier, Path, Width, WriteMatch};
///
/// let kvm = kvm_ioctls::Kvm::new()?;
/// let vm = Arc::new(kvm.create_vm()?);
/// let kicks = Notifier::new(Mode::Counter)?;
/// let reg = IoEvent::register(&vm, WriteMatch::mmio(0xd000_0050).width(Width::W4), &kicks)?;
/// assert_eq!(reg.path(), &Path::Kernel);
/// // ... the guest runs; `kicks.read()` returns the writes since the last read ...
/// drop(reg); // the same writes now exit to userspace
/// let again = IoEvent::register(&vm, WriteMatch::mmio(0xd000_0050).width(Width::W4), &kicks)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[must_use = "dropping an IoEvent unregisters it at once"]
pub struct IoEvent {
    write: WriteMatch,
    path: Path,
    notifier: Arc<Notifier>,
    place: Place,
}

enum Place {
    Kernel {
        vm: Arc<VmFd>,
        req: IoEventRequest,
        /// The entry that makes a backend's dispatcher see this registration's overlaps.
        shadow: Option<(ExitDispatcher, Key)>,
    },
    Userspace {
        dispatcher: ExitDispatcher,
        key: Key,
    },
}

impl fmt::Debug for IoEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoEvent")
            .field("write", &self.write)
            .field("path", &self.path)
            .field("notifier", &self.notifier)
            .finish()
    }
}

impl IoEvent {
    /// Registers `notifier` in the kernel for the guest writes `write` describes: a
    /// [`BackendKind::Kernel`] registration.
    ///
    /// The registration keeps its own descriptor of the notifier; the caller keeps theirs.
    ///
    /// # Errors
    ///
    /// The validation errors of [`WriteMatch::validate`];
    /// [`Error::MissingCapability`] without `KVM_CAP_IOEVENTFD` (or
    /// `KVM_CAP_IOEVENTFD_ANY_LENGTH` for [`Width::Any`]); [`Error::IoEventExists`] when an
    /// overlapping registration exists; [`Error::IoBusFull`] when the kernel bus is full;
    /// [`Error::FdExhausted`] when no descriptor is left; [`Error::IoEvent`] for other errnos.
    pub fn register(vm: &Arc<VmFd>, write: WriteMatch, notifier: &Notifier) -> Result<IoEvent> {
        Backend::new(vm.clone(), BackendKind::Kernel).register(write, notifier)
    }

    /// `KVM_IOEVENTFD` for a validated `write`. On failure the shadow entry is removed.
    pub(crate) fn assign(
        vm: &Arc<VmFd>,
        write: WriteMatch,
        req: IoEventRequest,
        notifier: Arc<Notifier>,
        shadow: Option<(ExitDispatcher, Key)>,
    ) -> Result<IoEvent> {
        let addr = write.addr;
        if let Err(source) = sys::assign_ioevent(vm, &notifier, &req) {
            if let Some((dispatcher, key)) = &shadow {
                dispatcher.remove(key);
            }
            return Err(match source.raw_os_error() {
                Some(libc::EEXIST) => Error::IoEventExists { addr },
                Some(libc::ENOSPC) => Error::IoBusFull { addr },
                _ => Error::IoEvent { addr, source },
            });
        }
        Ok(IoEvent {
            write,
            path: Path::Kernel,
            notifier,
            place: Place::Kernel {
                vm: vm.clone(),
                req,
                shadow,
            },
        })
    }

    /// A registration served by `dispatcher` under `key`.
    pub(crate) fn dispatched(
        write: WriteMatch,
        notifier: Arc<Notifier>,
        dispatcher: ExitDispatcher,
        key: Key,
        path: Path,
    ) -> IoEvent {
        IoEvent {
            write,
            path,
            notifier,
            place: Place::Userspace { dispatcher, key },
        }
    }

    /// What this registration matches.
    pub fn write_match(&self) -> WriteMatch {
        self.write
    }

    /// Where it lives, and why in userspace if it does.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The registration's own descriptor of the notifier.
    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }
}

impl Drop for IoEvent {
    fn drop(&mut self) {
        match &self.place {
            Place::Kernel { vm, req, shadow } => {
                // The exact (fd, address, length, datamatch) of the assignment; with them KVM
                // finds the registration. Nothing useful can be done with an error in drop: the
                // kernel drops the registration anyway when the VM closes.
                let _ = sys::deassign_ioevent(vm, &self.notifier, req);
                if let Some((dispatcher, key)) = shadow {
                    dispatcher.remove(key);
                }
            }
            Place::Userspace { dispatcher, key } => dispatcher.remove(key),
        }
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
            assert_eq!(w.len(), l);
            if l > 0 {
                assert_eq!(Width::from_len(l as usize), Some(w));
            }
        }
        assert_eq!(Width::from_len(3), None);
        assert!(Width::Any.is_empty());
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
