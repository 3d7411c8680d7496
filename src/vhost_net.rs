//! Kernel vhost-net hand-off (cargo feature `vhost-net`): a virtio-net device whose queues the
//! host kernel's vhost-net worker serves, moving packets between the guest's rings and a tap,
//! with no VMM thread in the data path or in the notifications.
//!
//! The hand-off is [`vhost_user`](crate::vhost_user)'s with the kernel as the backend: the
//! queue's kick notifier (a registered ioeventfd) goes to the kernel with `VHOST_SET_VRING_KICK`
//! and the queue's interrupt eventfd (an edge [`IrqFd`](crate::IrqFd) or an MSI-X
//! [`MsixVector`](crate::msix::MsixVector)) with `VHOST_SET_VRING_CALL`. A guest kick then wakes
//! the vhost worker from inside KVM's ioeventfd, and the worker's call is injected by KVM's
//! irqfd: packets and notifications never reach the VMM. The worker reads guest memory through
//! the memory table [`VhostNetFrontend::open`] gives it (the VMM's own mapping: nothing needs to
//! be shared with another process). An interrupt with no eventfd of its own (a virtio-mmio
//! [`StatusLine`](crate::virtio::StatusLine)) gets a [`CallRelay`], as for vhost-user.
//!
//! The tap is the VMM's: it opens it with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and sets its
//! vnet header size (`TUNSETVNETHDRSZ`) to the header the driver uses — 12 bytes with
//! `VIRTIO_F_VERSION_1` or `VIRTIO_NET_F_MRG_RXBUF`, 10 without. The frontend never asks
//! vhost-net to add or strip that header itself (`VHOST_NET_F_VIRTIO_NET_HDR`): the tap carries
//! it, as QEMU's vhost-net does.
//!
//! Ownership: the frontend owns the vhost-net device, the tap, and each started queue's kick
//! registration and call binding. Dropping it closes the device first (which stops the worker),
//! then unregisters the kicks and calls.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::sync::Arc;

use vhost::net::VhostNet as _;
use vhost::vhost_kern::net::Net;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::device::{GuestInterrupt, QueueKicks};
use crate::error::{Error, Result};
use crate::vhost_user::{call_eventfd, call_target, hand_vring, CallRelay, Handed, VringRequests};
use crate::virtio::VringLayout;

/// `VHOST_NET_F_VIRTIO_NET_HDR`: vhost-net adds and strips the virtio-net header itself (never
/// asked for: the tap carries the header).
const VHOST_NET_F_VIRTIO_NET_HDR: u64 = 1 << 27;

/// The frontend side of one kernel vhost-net device (see the module docs).
pub struct VhostNetFrontend {
    // Dropped first: closing the device stops the worker before the kicks and calls go.
    net: Net<Arc<GuestMemoryMmap>>,
    tap: File,
    /// What the kernel offered (`VHOST_GET_FEATURES`).
    offered: u64,
    features: u64,
    queues: BTreeMap<u16, Handed>,
}

impl fmt::Debug for VhostNetFrontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VhostNetFrontend")
            .field("offered", &format_args!("{:#x}", self.offered))
            .field("features", &format_args!("{:#x}", self.features))
            .field("tap", &self.tap)
            .field("queues", &self.queues)
            .finish()
    }
}

fn refused(reason: String) -> Error {
    Error::VhostNet {
        op: "VHOST_SET_VRING_CALL",
        reason,
    }
}

fn net_err(op: &'static str) -> impl FnOnce(vhost::Error) -> Error {
    move |e| Error::VhostNet {
        op,
        reason: e.to_string(),
    }
}

impl VhostNetFrontend {
    /// Opens `/dev/vhost-net`, takes ownership of the device (`VHOST_SET_OWNER`), negotiates the
    /// features the kernel offers among `wanted` (`VHOST_NET_F_VIRTIO_NET_HDR` never: see the
    /// module docs), gives it `memory`'s regions as this process maps them, and keeps `tap`,
    /// which [`start_queue`](Self::start_queue) attaches to each queue.
    ///
    /// # Errors
    ///
    /// [`Error::VhostNet`] naming the step that failed: opening the device first (no
    /// `/dev/vhost-net`: the `vhost_net` module is not loaded, or the process may not open it).
    pub fn open(memory: &GuestMemoryMmap, tap: File, wanted: u64) -> Result<VhostNetFrontend> {
        let net = Net::new(Arc::new(memory.clone())).map_err(net_err(
            "open /dev/vhost-net (is the vhost_net module loaded?)",
        ))?;
        net.set_owner().map_err(net_err("VHOST_SET_OWNER"))?;
        let offered = net.get_features().map_err(net_err("VHOST_GET_FEATURES"))?;
        let features = offered & wanted & !VHOST_NET_F_VIRTIO_NET_HDR;
        net.set_features(features)
            .map_err(net_err("VHOST_SET_FEATURES"))?;
        let regions: Vec<_> = memory
            .iter()
            .map(|region| VhostUserMemoryRegionInfo {
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                mmap_offset: 0,
                mmap_handle: -1,
            })
            .collect();
        net.set_mem_table(&regions)
            .map_err(net_err("VHOST_SET_MEM_TABLE"))?;
        Ok(VhostNetFrontend {
            net,
            tap,
            offered,
            features,
            queues: BTreeMap::new(),
        })
    }

    /// The negotiated features: what the device may offer the guest's driver for its rings.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Tells the kernel the features the guest's driver accepted (`VHOST_SET_FEATURES`): call
    /// once they are final and before [`start_queue`](Self::start_queue); features the kernel
    /// did not offer (the device's own, such as `VIRTIO_NET_F_MAC`) are dropped. Returns the
    /// features the kernel now has.
    ///
    /// # Errors
    ///
    /// [`Error::VhostNet`] for a failed `VHOST_SET_FEATURES`.
    pub fn set_acked_features(&mut self, acked: u64) -> Result<u64> {
        let features = acked & self.offered & !VHOST_NET_F_VIRTIO_NET_HDR;
        self.net
            .set_features(features)
            .map_err(net_err("VHOST_SET_FEATURES"))?;
        self.features = features;
        Ok(features)
    }

    /// Hands queue `layout.index` (0 receive, 1 transmit, for one queue pair) to the kernel: its
    /// size and ring addresses, `kick`'s notifier and `call`'s eventfd, then attaches the tap
    /// to it (`VHOST_NET_SET_BACKEND`), after which the worker serves it. The frontend owns
    /// `kick` and `call` from now on, and this returns `None`; where `call` has no eventfd (a
    /// virtio-mmio [`StatusLine`](crate::virtio::StatusLine)) the kernel calls a fresh eventfd
    /// and this returns the [`CallRelay`] the VMM's event loop must wait on.
    ///
    /// # Errors
    ///
    /// [`Error::VhostNet`] naming the ioctl that failed (a ring outside guest memory or a size
    /// that is not a power of two among them), a level `call`, or a queue already started;
    /// those of `call`'s [`eventfd`](GuestInterrupt::eventfd) and of
    /// [`Notifier::new`](crate::Notifier::new).
    pub fn start_queue(
        &mut self,
        layout: VringLayout,
        kick: impl QueueKicks + 'static,
        call: impl GuestInterrupt + 'static,
    ) -> Result<Option<CallRelay>> {
        if self.queues.contains_key(&layout.index) {
            return Err(Error::VhostNet {
                op: "start a queue",
                reason: format!("queue {} was started already", layout.index),
            });
        }
        let (call_fd, relayed) = call_target(&call, refused)?;
        const NAMES: VringRequests = [
            "VHOST_SET_VRING_NUM",
            "VHOST_SET_VRING_ADDR",
            "VHOST_SET_VRING_BASE",
            "VHOST_SET_VRING_CALL",
            "VHOST_SET_VRING_KICK",
        ];
        // The kernel's vhost takes guest-physical ring addresses and translates them itself.
        let (call_to, kicks) = (call_fd.as_event_fd(), kick.kicks().as_event_fd());
        hand_vring(&self.net, &layout, Ok, call_to, kicks, NAMES, net_err)?;
        let (net, index) = (&self.net, usize::from(layout.index));
        net.set_backend(index, Some(&self.tap))
            .map_err(net_err("VHOST_NET_SET_BACKEND"))?;
        // Every one of these is a synchronous ioctl: the worker serves the queue from here on.
        let (handed, relay) = Handed::new(kick, call, call_fd, relayed);
        self.queues.insert(layout.index, handed);
        Ok(relay)
    }

    /// Moves queue `index`'s calls to `call` (the guest picked another vector). The ioctl is
    /// synchronous: every call after it goes to the new eventfd, and the old binding is dropped
    /// then.
    ///
    /// # Errors
    ///
    /// [`Error::VhostNet`] for a queue not started, a level `call` or a failed
    /// `VHOST_SET_VRING_CALL`; [`Error::NoEventFd`] for a `call` with no eventfd.
    pub fn set_call(&mut self, index: u16, call: impl GuestInterrupt + 'static) -> Result<()> {
        let call_fd = call_eventfd(&call, refused)?.ok_or(Error::NoEventFd {
            what: "this interrupt (a queue's calls move to an edge irqfd or an MSI-X vector)",
        })?;
        let Some(queue) = self.queues.get_mut(&index) else {
            return Err(Error::VhostNet {
                op: "VHOST_SET_VRING_CALL",
                reason: format!("queue {index} was not started"),
            });
        };
        self.net
            .set_vring_call(index.into(), call_fd.as_event_fd())
            .map_err(net_err("VHOST_SET_VRING_CALL"))?;
        queue._call = Some(Box::new(call));
        Ok(())
    }
}
