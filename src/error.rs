//! The crate's one error type.
//!
//! Every variant says what the caller asked for (the address, GSI or value at fault) and, where
//! the kernel refused, which errno came back. `docs/ERRORS.md` lists each with its cause and remedy.

use std::io;

use crate::bus::IoEventAddress;

/// Result type of every fallible operation in this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// A KVM capability the library needs for an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Capability {
    /// `KVM_CAP_IOEVENTFD`: guest writes can signal an eventfd in the kernel.
    IoEventFd,
    /// `KVM_CAP_IOEVENTFD_ANY_LENGTH`: an ioeventfd of length 0 (any write width).
    IoEventFdAnyLength,
    /// `KVM_CAP_IRQFD`: an eventfd can inject a GSI.
    IrqFd,
    /// `KVM_CAP_IRQFD_RESAMPLE`: level irqfds with a resample eventfd.
    IrqFdResample,
    /// `KVM_CAP_IRQ_ROUTING`: the GSI routing table can be set.
    IrqRouting,
    /// An in-kernel irqchip (`KVM_CREATE_IRQCHIP`) on this VM.
    Irqchip,
    /// `KVM_CAP_SPLIT_IRQCHIP`: the local APICs in the kernel, the IOAPIC and PIC in userspace.
    SplitIrqchip,
}

impl Capability {
    #[cfg(feature = "kvm")]
    /// Every capability, in declaration order (so `cap as usize` indexes it).
    pub(crate) const ALL: [Capability; 7] = [
        Capability::IoEventFd,
        Capability::IoEventFdAnyLength,
        Capability::IrqFd,
        Capability::IrqFdResample,
        Capability::IrqRouting,
        Capability::Irqchip,
        Capability::SplitIrqchip,
    ];
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Capability::IoEventFd => "KVM_CAP_IOEVENTFD",
            Capability::IoEventFdAnyLength => "KVM_CAP_IOEVENTFD_ANY_LENGTH",
            Capability::IrqFd => "KVM_CAP_IRQFD",
            Capability::IrqFdResample => "KVM_CAP_IRQFD_RESAMPLE",
            Capability::IrqRouting => "KVM_CAP_IRQ_ROUTING",
            Capability::Irqchip => "an in-kernel irqchip (KVM_CREATE_IRQCHIP)",
            Capability::SplitIrqchip => "KVM_CAP_SPLIT_IRQCHIP",
        })
    }
}

/// Everything that can go wrong in vm-notify.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The process (EMFILE) or the system (ENFILE) has no file descriptor left for a new eventfd
    /// or a clone of one.
    #[error(
        "no file descriptor left for {what} ({source}); raise RLIMIT_NOFILE or drop registrations"
    )]
    FdExhausted {
        /// What needed the descriptor.
        what: &'static str,
        /// The errno.
        source: io::Error,
    },
    /// An eventfd system call failed for a reason other than fd exhaustion.
    #[error("eventfd {op} failed: {source}")]
    Notifier {
        /// The operation: "create", "read", "write", "clone" or "poll".
        op: &'static str,
        /// The errno.
        source: io::Error,
    },
    /// `u64::MAX` cannot be added to an eventfd counter (the kernel returns EINVAL); the counter's
    /// maximum is `u64::MAX - 1`.
    #[error(
        "cannot add {value:#x} to a notifier: an eventfd counter holds at most 0xfffffffffffffffe"
    )]
    NotifierValue {
        /// The value that was refused.
        value: u64,
    },

    /// A datamatch was given with [`Width::Any`](crate::Width::Any): KVM compares the value only
    /// for a fixed write width.
    #[error("{addr}: a datamatch needs a fixed width (1, 2, 4 or 8 bytes), not Width::Any")]
    DatamatchWithoutWidth {
        /// The address of the registration.
        addr: IoEventAddress,
    },
    /// The datamatch value has bits above the registration's width, so no write could match it.
    #[error("{addr}: datamatch {value:#x} does not fit in a {width}-byte write")]
    DatamatchTooWide {
        /// The address of the registration.
        addr: IoEventAddress,
        /// The value given.
        value: u64,
        /// The width in bytes.
        width: u32,
    },
    /// A port I/O address above 0xffff.
    #[error("{addr}: port I/O addresses are 16 bits (0..=0xffff)")]
    PortOutOfRange {
        /// The address given.
        addr: IoEventAddress,
    },
    /// An 8-byte port I/O registration: x86 has no 8-byte `out`.
    #[error("{addr}: port I/O has no 8-byte writes; use 1, 2 or 4 bytes")]
    PioWidth {
        /// The address given.
        addr: IoEventAddress,
    },
    /// The registered range would run past the end of the address space.
    #[error(
        "{addr}: a {width}-byte range at this address wraps past the end of the address space"
    )]
    AddressWraps {
        /// The address given.
        addr: IoEventAddress,
        /// The width in bytes.
        width: u32,
    },
    /// KVM already has an overlapping registration (EEXIST): same address and either side any-width,
    /// or the same width with either side without datamatch or with the same datamatch.
    #[error("{addr}: an overlapping ioeventfd is already registered (EEXIST)")]
    IoEventExists {
        /// The address of the refused registration.
        addr: IoEventAddress,
    },
    /// The kernel's I/O bus has no room for another device (ENOSPC).
    #[error("{addr}: the kernel's I/O bus is full (ENOSPC)")]
    IoBusFull {
        /// The address of the refused registration.
        addr: IoEventAddress,
    },
    /// Any other errno from `KVM_IOEVENTFD`.
    #[error("{addr}: KVM_IOEVENTFD failed: {source}")]
    IoEvent {
        /// The address of the registration.
        addr: IoEventAddress,
        /// The errno.
        source: io::Error,
    },

    /// Unregistering an ioeventfd KVM does not have (ENOENT): no registration with exactly this
    /// eventfd, address, width and datamatch.
    #[error("{addr}: no such ioeventfd registration to remove (ENOENT)")]
    IoEventNotRegistered {
        /// The address of the removal.
        addr: IoEventAddress,
    },
    /// The VM lacks a capability the operation needs.
    #[error("KVM lacks {0}")]
    MissingCapability(Capability),
    /// A GSI at or above the routing table's limit (4096 on x86).
    #[error("GSI {gsi} is out of range: KVM accepts GSIs below {limit}")]
    GsiOutOfRange {
        /// The GSI given.
        gsi: u32,
        /// The first GSI KVM refuses.
        limit: u32,
    },
    /// An irqfd on a GSI the routing table does not route. KVM would accept it and drop every
    /// interrupt, so the library refuses it.
    #[error("GSI {gsi} has no committed route: an irqfd there would inject nothing")]
    UnroutedGsi {
        /// The GSI given.
        gsi: u32,
    },
    /// Every GSI below the limit is in use.
    #[error("no free GSI: all {limit} GSIs are routed or reserved")]
    GsiExhausted {
        /// The number of GSIs KVM supports.
        limit: u32,
    },
    /// The routing table would exceed KVM's entry limit.
    #[error("the GSI routing table is full: {entries} entries, KVM takes at most {limit}")]
    RouteTableFull {
        /// Entries the table would hold with the change.
        entries: usize,
        /// KVM's limit (`KVM_MAX_IRQ_ROUTES`).
        limit: usize,
    },
    /// A route change on a GSI that has irqfds bound to it; drop them first (KVM must see the
    /// irqfd deassigned before its route goes).
    #[error("GSI {gsi} has {irqfds} irqfd(s) bound; drop them before changing its route")]
    GsiBusy {
        /// The GSI.
        gsi: u32,
        /// How many irqfds are bound.
        irqfds: usize,
    },
    /// A message for a GSI that is not an MSI route of this router.
    #[error("GSI {gsi} is not an MSI route allocated by this router")]
    NotMsiRoute {
        /// The GSI given.
        gsi: u32,
    },
    /// `KVM_SET_GSI_ROUTING` failed.
    #[error("KVM_SET_GSI_ROUTING with {entries} entries failed: {source}")]
    SetRouting {
        /// Entries sent.
        entries: usize,
        /// The errno.
        source: io::Error,
    },
    /// The notifier is already bound as an irqfd (EBUSY): one eventfd injects one GSI.
    #[error("GSI {gsi}: this notifier is already bound as an irqfd (EBUSY)")]
    IrqFdBusy {
        /// The GSI of the refused binding.
        gsi: u32,
    },
    /// A level irqfd on a GSI whose route is not an irqchip pin: only a level-triggered pin has
    /// an EOI to resample on.
    #[error(
        "GSI {gsi}: a resample irqfd needs an irqchip (PIC/IOAPIC pin) route, not an MSI route"
    )]
    ResampleNeedsIrqchip {
        /// The GSI given.
        gsi: u32,
    },
    /// An MSI-X table of 0 or more than 2048 vectors.
    #[error("an MSI-X table has 1 to 2048 vectors, not {count}")]
    MsixVectorCount {
        /// The count given.
        count: usize,
    },
    /// A vector index past the table.
    #[error("MSI-X vector {index} does not exist: the table has {count} vectors")]
    MsixVectorIndex {
        /// The index given.
        index: usize,
        /// The table's size.
        count: usize,
    },
    /// A guest access to the MSI-X table or PBA that is not 4 or 8 bytes, not naturally
    /// aligned, or past the end.
    #[error("MSI-X table/PBA access of {len} bytes at offset {offset:#x} refused: accesses are 4 or 8 bytes, naturally aligned, within {size:#x} bytes")]
    MsixAccess {
        /// The offset in the table or PBA.
        offset: u64,
        /// The access size in bytes.
        len: usize,
        /// The size of the table or PBA.
        size: u64,
    },
    /// An epoll call of an [`EventLoop`](crate::wait::EventLoop) failed.
    #[error("event loop: epoll {op} failed: {source}")]
    EventLoop {
        /// The operation: "create", "add", "delete", "wait", "spawn the injector thread" or "join the injector thread".
        op: &'static str,
        /// The errno.
        source: io::Error,
    },
    /// A token already watched by the event loop, not watched, or the reserved `u64::MAX`.
    #[error("event loop token {token} is in use, not watched, or reserved (u64::MAX)")]
    EventLoopToken {
        /// The token given.
        token: u64,
    },
    /// `Notifier::from_fd` was given a descriptor that is not an eventfd.
    #[error("descriptor {fd} is not an eventfd")]
    NotAnEventFd {
        /// The descriptor.
        fd: i32,
    },
    /// A vhost-user request failed: the step, and what the vhost crate or the backend said.
    #[error("vhost-user {op} failed: {reason}")]
    VhostUser {
        /// The step (a message name, or the connection).
        op: &'static str,
        /// The error.
        reason: String,
    },
    /// The vhost-user backend closed its connection.
    #[error("the vhost-user backend disconnected")]
    VhostUserDisconnected,
    /// A step of the kernel vhost-net hand-off failed: the step (opening `/dev/vhost-net`, or
    /// an ioctl) and what the vhost crate or the kernel said.
    #[error("vhost-net {op} failed: {reason}")]
    VhostNet {
        /// The step (opening the device, or the ioctl's name).
        op: &'static str,
        /// The error.
        reason: String,
    },
    /// A split virtqueue's rings could not be read or written (feature `virtio-queue`): the
    /// step, and what virtio-queue or guest memory said.
    #[error("virtqueue {op} failed: {reason}")]
    Virtqueue {
        /// The step.
        op: &'static str,
        /// The error.
        reason: String,
    },
    /// `KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)` failed: EEXIST with an in-kernel irqchip already
    /// made, EINVAL once a vCPU exists or for too many reserved pins.
    #[error("KVM_CAP_SPLIT_IRQCHIP failed: {source} (enable it before creating vCPUs, on a VM without KVM_CREATE_IRQCHIP)")]
    SplitIrqchip {
        /// The errno.
        source: io::Error,
    },
    /// More queues than a virtio device can have.
    #[error("a virtio device has at most 65535 queues, not {count}")]
    VirtioQueueCount {
        /// The count given.
        count: usize,
    },
    /// `KVM_IRQ_LINE` failed while the injector changed a line's level.
    #[error("GSI {gsi}: KVM_IRQ_LINE failed: {source}")]
    IrqLine {
        /// The GSI of the line.
        gsi: u32,
        /// The errno.
        source: io::Error,
    },
    /// A device's interrupt triggered after the VMM tore the device down (dropped its
    /// notification half and its MSI-X vectors): its routes and irqfds are gone, and a device
    /// thread still holding a queue handle learns it here.
    #[error("{what} are gone: the device was torn down")]
    Unplugged {
        /// What is gone.
        what: &'static str,
    },
    /// The injector could not inject an interrupt it took from a trigger notifier
    /// (`KVM_IRQ_LINE` or `KVM_SIGNAL_MSI` failed on every attempt). Counted in
    /// [`InjectorStats::failed`](crate::fallback::InjectorStats::failed) and kept for
    /// [`Injector::take_error`](crate::fallback::Injector::take_error).
    #[error("GSI {gsi}: the injector could not inject the interrupt: {op} failed: {source}")]
    Inject {
        /// The GSI of the line.
        gsi: u32,
        /// The call that failed: `KVM_IRQ_LINE`, `KVM_SIGNAL_MSI`, or the IOAPIC's delivery.
        op: &'static str,
        /// The last attempt's errno.
        source: io::Error,
    },
    /// The injector's loop ended on an epoll error: interrupts placed in userspace wait in their
    /// notifiers until the VMM runs it again. Returned by the loop, and by each registration on
    /// the userspace path until the injector runs again.
    #[error("the injector's loop ended ({source}); run it again")]
    InjectorEnded {
        /// The epoll errno.
        source: io::Error,
    },
    /// An interrupt that has no eventfd with the effect of signalling it, asked for one (to hand
    /// to a writer outside the VMM, such as a vhost-user backend).
    #[error("{what} has no eventfd that interrupts the guest as signalling it does")]
    NoEventFd {
        /// Which interrupt, and why.
        what: &'static str,
    },
    /// A GSI below 24 on the split irqchip: a pin of the userspace IOAPIC. Its route follows
    /// the guest's redirection entry, so only the VM's [`Ioapic`](crate::irqchip::Ioapic)
    /// changes it.
    #[error("GSI {gsi} is a pin of the split irqchip's userspace IOAPIC: only the VM's Ioapic routes it")]
    IoapicPin {
        /// The pin.
        gsi: u32,
    },
    /// `KVM_SIGNAL_MSI` failed while the userspace IOAPIC delivered a pin's interrupt.
    #[error(
        "IOAPIC pin {pin}: KVM_SIGNAL_MSI (address {address:#x}, data {data:#x}) failed: {source}"
    )]
    SignalMsi {
        /// The pin delivered.
        pin: u32,
        /// The message address.
        address: u64,
        /// The message data.
        data: u32,
        /// The errno.
        source: io::Error,
    },
    /// A saved state that does not fit itself (restored before anything is made).
    #[error("saved state refused: {what}")]
    SavedState {
        /// What does not fit.
        what: String,
    },
    /// Any other errno from `KVM_IRQFD`.
    #[error("GSI {gsi}: KVM_IRQFD failed: {source}")]
    IrqFd {
        /// The GSI of the binding.
        gsi: u32,
        /// The errno.
        source: io::Error,
    },
}

impl Error {
    /// Maps an eventfd errno to [`Error::FdExhausted`] or [`Error::Notifier`].
    pub(crate) fn eventfd(op: &'static str, source: io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::EMFILE) | Some(libc::ENFILE) => Error::FdExhausted {
                what: if op == "clone" {
                    "a clone of an eventfd"
                } else {
                    "a new eventfd"
                },
                source,
            },
            _ => Error::Notifier { op, source },
        }
    }
}

#[cfg(all(test, feature = "kvm"))]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_listed_in_declaration_order() {
        for (i, cap) in Capability::ALL.into_iter().enumerate() {
            assert_eq!(cap as usize, i, "{cap}");
        }
    }
}
