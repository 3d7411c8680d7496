//! vhost-user hand-off (cargo feature `vhost-user`): a virtio queue whose work an external
//! vhost-user backend does, with no VMM thread in the notification path.
//!
//! The queue's kick notifier is registered as an ioeventfd on the queue-notify address and its
//! call notifier is the queue's [`GuestInterrupt`]'s eventfd (an [`IrqFd`](crate::IrqFd), or an
//! MSI-X vector's [`MsixVector`](crate::msix::MsixVector)); [`VhostUserFrontend::start_queue`]
//! hands the very same eventfds to the backend with `SET_VRING_KICK` / `SET_VRING_CALL`. A guest kick then goes from KVM straight to the
//! backend, and the backend's call straight into KVM as an interrupt.
//!
//! Ownership: the frontend owns each started queue's kick registration and its call binding;
//! dropping the frontend unregisters both (and closes the connection).
//!
//! MSI-X with an external writer: the backend holds the vector's own eventfd
//! ([`MsixVector::notifier`](crate::msix::MsixVector::notifier)), and masking detaches the irqfd but keeps that eventfd, so a call
//! made while masked stays in its counter — the pending bit the guest reads in the PBA — and is
//! delivered on unmask. When the guest moves the queue to another vector,
//! [`VhostUserFrontend::set_call`] hands the backend the new vector's eventfd.
//!
//! An interrupt with no eventfd of its own — a virtio-mmio device's [`StatusLine`], whose
//! `InterruptStatus` must say "used buffers" before the guest's handler reads it — cannot take
//! the backend's calls directly: an eventfd write would raise the line with the status still 0,
//! and Linux's `vm_interrupt` would answer `IRQ_NONE` until the kernel disabled the line.
//! [`VhostUserFrontend::start_queue`] then hands the backend a fresh eventfd and returns a
//! [`CallRelay`]: the VMM waits on its [`calls`](CallRelay::calls) in its own event loop and
//! [`deliver`](CallRelay::deliver)s each wake-up as the queue's interrupt, which sets the status
//! bit and asserts the line. The library starts no thread for it.
//!
//! [`StatusLine`]: crate::virtio::StatusLine
//!
//! A backend that stops is seen: [`VhostUserFrontend::wait_disconnect`] polls the connection and
//! returns [`Error::VhostUserDisconnected`] when the peer has gone.

use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend as _};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::device::{GuestInterrupt, QueueKicks};
use crate::error::{Error, Result};
use crate::notifier::{Mode, Notifier};
use crate::virtio::VringLayout;

/// A started queue: what the frontend owns for it (a relayed call's interrupt is the relay's).
#[derive(Debug)]
pub(crate) struct Handed {
    _kick: Box<dyn QueueKicks>,
    pub(crate) _call: Option<Box<dyn GuestInterrupt>>,
}

impl Handed {
    /// What a queue whose calls go to `call_fd` keeps: `call` itself, or, where `relayed` (the
    /// backend was given `call_fd` because `call` has no eventfd), a [`CallRelay`] that owns it.
    pub(crate) fn new(
        kick: impl QueueKicks + 'static,
        call: impl GuestInterrupt + 'static,
        call_fd: Notifier,
        relayed: bool,
    ) -> (Handed, Option<CallRelay>) {
        let (owned, relay) = if relayed {
            let relay = CallRelay {
                calls: call_fd,
                to: Box::new(call),
            };
            (None, Some(relay))
        } else {
            (Some(Box::new(call) as Box<dyn GuestInterrupt>), None)
        };
        let handed = Handed {
            _kick: Box::new(kick),
            _call: owned,
        };
        (handed, relay)
    }
}

/// A backend's calls for a queue whose interrupt has no eventfd of its own (see the module
/// docs): the backend writes [`calls`](Self::calls); the VMM waits on it and, for each wake-up,
/// [`deliver`](Self::deliver)s the queue's interrupt. Keep it, and keep waiting on it, while
/// the queue runs: calls that arrive while nobody waits stay in the notifier's count and go to
/// the guest at the next wake-up, as one interrupt.
#[must_use = "the backend's calls reach the guest only through a relay that is waited on"]
#[derive(Debug)]
pub struct CallRelay {
    calls: Notifier,
    to: Box<dyn GuestInterrupt>,
}

impl CallRelay {
    /// The notifier the backend's calls add to (the eventfd it was given with `SET_VRING_CALL`).
    pub fn calls(&self) -> &Notifier {
        &self.calls
    }

    /// After a wait on [`calls`](Self::calls) read a non-zero count: interrupts the guest as the
    /// queue's interrupt does (for a [`StatusLine`](crate::virtio::StatusLine): sets
    /// "used buffers" in the status, then asserts the line if it was clear). Returns whether
    /// that asked for a new interrupt. Reads nothing from `calls`; the caller's wait did.
    ///
    /// # Errors
    ///
    /// Those of the interrupt's [`trigger`](GuestInterrupt::trigger).
    pub fn deliver(&self) -> Result<bool> {
        self.to.trigger()
    }
}

/// The frontend side of one vhost-user connection (see the module docs).
pub struct VhostUserFrontend {
    frontend: Frontend,
    memory: GuestMemoryMmap,
    /// What the backend offered (`GET_FEATURES`).
    offered: u64,
    features: u64,
    protocol: Option<VhostUserProtocolFeatures>,
    queues: BTreeMap<u16, Handed>,
}

impl fmt::Debug for VhostUserFrontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VhostUserFrontend")
            .field("offered", &format_args!("{:#x}", self.offered))
            .field("features", &format_args!("{:#x}", self.features))
            .field("protocol", &self.protocol)
            .field("queues", &self.queues)
            .finish()
    }
}

/// Why a level interrupt cannot take a backend's calls.
const LEVEL_REFUSED: &str = "a level interrupt cannot take a backend's calls \
    (nothing would deassert it); use an edge irqfd, an MSI-X vector, or the device's status line";

/// The eventfd a backend's calls go to: the interrupt's own, or `None` where it has none (a
/// relay must take them). A level line cannot take them (`refused` makes that error): one the
/// backend asserted would stay high, as nothing in the VMM sees the backend's condition clear
/// to deassert it.
pub(crate) fn call_eventfd(
    call: &dyn GuestInterrupt,
    refused: fn(String) -> Error,
) -> Result<Option<Notifier>> {
    if call.level().is_some() {
        return Err(refused(LEVEL_REFUSED.into()));
    }
    call.eventfd()
}

/// Where a queue's calls go when it starts: the interrupt's own eventfd, or a fresh one and
/// `true` (relayed) where it has none.
pub(crate) fn call_target(
    call: &dyn GuestInterrupt,
    refused: fn(String) -> Error,
) -> Result<(Notifier, bool)> {
    Ok(match call_eventfd(call, refused)? {
        Some(fd) => (fd, false),
        None => (Notifier::new(Mode::Counter)?, true),
    })
}

fn refused(reason: String) -> Error {
    Error::VhostUser {
        op: "SET_VRING_CALL",
        reason,
    }
}

/// The names of the five requests that hand a vring over, in the order [`hand_vring`] makes
/// them: size, addresses, base, call, kick.
pub(crate) type VringRequests = [&'static str; 5];

/// Hands queue `layout.index` to a vhost backend, another process's or the kernel's: its size,
/// its rings (each address through `translate`: a vhost-user backend takes this process's
/// virtual addresses, the kernel guest-physical ones), base 0, then `call` and `kick`. `err`
/// makes the frontend's error from the name (in `names`) of the request that failed.
pub(crate) fn hand_vring<B, E, F>(
    backend: &B,
    layout: &VringLayout,
    translate: impl Fn(u64) -> Result<u64>,
    call: &vmm_sys_util::eventfd::EventFd,
    kick: &vmm_sys_util::eventfd::EventFd,
    names: VringRequests,
    err: E,
) -> Result<()>
where
    B: VhostBackend,
    E: Fn(&'static str) -> F,
    F: FnOnce(vhost::Error) -> Error,
{
    let index = usize::from(layout.index);
    let config = VringConfigData {
        queue_max_size: layout.size,
        queue_size: layout.size,
        flags: 0,
        desc_table_addr: translate(layout.desc_table)?,
        used_ring_addr: translate(layout.used_ring)?,
        avail_ring_addr: translate(layout.avail_ring)?,
        log_addr: None,
    };
    let [size, addresses, base, call_name, kick_name] = names;
    backend
        .set_vring_num(index, layout.size)
        .map_err(err(size))?;
    backend
        .set_vring_addr(index, &config)
        .map_err(err(addresses))?;
    backend.set_vring_base(index, 0).map_err(err(base))?;
    backend
        .set_vring_call(index, call)
        .map_err(err(call_name))?;
    backend.set_vring_kick(index, kick).map_err(err(kick_name))
}

fn vhost_err(op: &'static str) -> impl FnOnce(vhost::Error) -> Error {
    move |e| Error::VhostUser {
        op,
        reason: e.to_string(),
    }
}

impl VhostUserFrontend {
    /// Connects to the backend listening at `socket`, for up to `queues` queues; takes ownership
    /// of the device (`SET_OWNER`); negotiates the features the backend offers among `wanted`
    /// (plus `VHOST_USER_F_PROTOCOL_FEATURES` when offered, and then the `MQ` protocol feature if
    /// offered); and shares `memory`, which must be file-backed
    /// (the test kit's `TinyVm::with_shared_memory` is).
    ///
    /// # Errors
    ///
    /// [`Error::VhostUser`] naming the step that failed (the connection first among them), or
    /// when a memory region has no file.
    pub fn connect(
        socket: impl AsRef<Path>,
        queues: u16,
        memory: &GuestMemoryMmap,
        wanted: u64,
    ) -> Result<VhostUserFrontend> {
        let mut frontend =
            Frontend::connect(socket, queues.into()).map_err(vhost_err("connect"))?;
        frontend.set_owner().map_err(vhost_err("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(vhost_err("GET_FEATURES"))?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let features = offered & (wanted | protocol_bit);
        frontend
            .set_features(features)
            .map_err(vhost_err("SET_FEATURES"))?;
        let protocol = if features & protocol_bit != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(vhost_err("GET_PROTOCOL_FEATURES"))?;
            let chosen = offered & VhostUserProtocolFeatures::MQ;
            frontend
                .set_protocol_features(chosen)
                .map_err(vhost_err("SET_PROTOCOL_FEATURES"))?;
            Some(chosen)
        } else {
            None
        };
        let regions = memory
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(vhost_err("describe guest memory (is it file-backed?)"))?;
        frontend
            .set_mem_table(&regions)
            .map_err(vhost_err("SET_MEM_TABLE"))?;
        Ok(VhostUserFrontend {
            frontend,
            memory: memory.clone(),
            offered,
            features,
            protocol,
            queues: BTreeMap::new(),
        })
    }

    /// The negotiated virtio features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Tells the backend the features the guest's driver accepted (`SET_FEATURES` again): call
    /// once they are final and before the first [`start_queue`](Self::start_queue), and not
    /// again while queues run — rust-vmm's vhost-user-backend disables every ring at
    /// `SET_FEATURES` when protocol features were negotiated. This is how a backend
    /// learns whether `VIRTIO_RING_F_EVENT_IDX` is in use, and so whether to read and publish
    /// the rings' event indexes; features the backend did not offer are dropped, and
    /// `VHOST_USER_F_PROTOCOL_FEATURES` stays as negotiated at [`connect`](Self::connect).
    /// Returns the features the backend now has.
    ///
    /// # Errors
    ///
    /// [`Error::VhostUser`] for a failed `SET_FEATURES`.
    pub fn set_acked_features(&mut self, acked: u64) -> Result<u64> {
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let features = (acked & self.offered & !protocol_bit) | (self.features & protocol_bit);
        self.frontend
            .set_features(features)
            .map_err(vhost_err("SET_FEATURES"))?;
        self.features = features;
        Ok(features)
    }

    /// Hands queue `layout.index` to the backend: its size and ring addresses, then `kick`'s
    /// notifier (a registered ioeventfd) and `call`'s eventfd, then enables it, and returns once
    /// the backend has taken all of it (so a kick right after this is served). The frontend owns
    /// both from now on; the backend's calls go straight into KVM and this returns `None`.
    ///
    /// Where `call` has no eventfd (a virtio-mmio [`StatusLine`](crate::virtio::StatusLine)),
    /// the backend gets a fresh eventfd instead and this returns the [`CallRelay`] that owns
    /// `call`: the VMM's event loop must wait on it (see the module docs).
    ///
    /// # Errors
    ///
    /// [`Error::VhostUser`] naming the message that failed, a ring address outside guest memory,
    /// or a level `call` whose line the backend would raise (an edge interrupt, an MSI-X
    /// vector, or an interrupt with no eventfd can take a backend's calls); those of `call`'s
    /// [`eventfd`](GuestInterrupt::eventfd) and of [`Notifier::new`].
    pub fn start_queue(
        &mut self,
        layout: VringLayout,
        kick: impl QueueKicks + 'static,
        call: impl GuestInterrupt + 'static,
    ) -> Result<Option<CallRelay>> {
        let (call_fd, relayed) = call_target(&call, refused)?;
        let host = |gpa: u64| {
            self.memory
                .get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .map_err(|e| Error::VhostUser {
                    op: "translate a ring address",
                    reason: e.to_string(),
                })
        };
        const NAMES: VringRequests = [
            "SET_VRING_NUM",
            "SET_VRING_ADDR",
            "SET_VRING_BASE",
            "SET_VRING_CALL",
            "SET_VRING_KICK",
        ];
        let (call_to, kicks) = (call_fd.as_event_fd(), kick.kicks().as_event_fd());
        hand_vring(
            &self.frontend,
            &layout,
            host,
            call_to,
            kicks,
            NAMES,
            vhost_err,
        )?;
        let (f, index) = (&mut self.frontend, usize::from(layout.index));
        if self.protocol.is_some() {
            f.set_vring_enable(index, true)
                .map_err(vhost_err("SET_VRING_ENABLE"))?;
        }
        // None of these messages has a reply without REPLY_ACK, so the backend may still be
        // reading them when this returns. A kick that reaches the backend before its
        // SET_VRING_ENABLE is consumed and dropped, and the driver, which kicked once, waits for
        // ever (seen with Linux's virtio-rng driver, whose first kick follows the enable at
        // once). A request with a reply behind them returns only once the backend handled
        // everything before it.
        f.get_features()
            .map_err(vhost_err("GET_FEATURES (barrier after starting the queue)"))?;
        let (handed, relay) = Handed::new(kick, call, call_fd, relayed);
        self.queues.insert(layout.index, handed);
        Ok(relay)
    }

    /// Moves queue `index`'s calls to `call` (the guest picked another vector): hands the backend
    /// the new eventfd and returns once the backend has taken it (a request with a reply follows
    /// it on the connection); the old binding is dropped then. Calls made before that go to the
    /// old vector, as an MSI in flight before a vector change would.
    ///
    /// # Errors
    ///
    /// [`Error::VhostUser`] for a queue not started, a level `call` or a failed `SET_VRING_CALL`;
    /// [`Error::NoEventFd`] for a `call` with no eventfd (a relayed queue keeps its relay).
    pub fn set_call(&mut self, index: u16, call: impl GuestInterrupt + 'static) -> Result<()> {
        let call_fd = call_eventfd(&call, refused)?.ok_or(Error::NoEventFd {
            what: "this interrupt (a queue's calls move to an edge irqfd or an MSI-X vector)",
        })?;
        if !self.queues.contains_key(&index) {
            return Err(Error::VhostUser {
                op: "SET_VRING_CALL",
                reason: format!("queue {index} was not started"),
            });
        }
        self.frontend
            .set_vring_call(index.into(), call_fd.as_event_fd())
            .map_err(vhost_err("SET_VRING_CALL"))?;
        // SET_VRING_CALL has no reply unless REPLY_ACK is negotiated, and a backend may call the
        // old eventfd until it has read it. A request with a reply behind it on the same
        // connection returns only once the backend has handled everything before it: after
        // this, every call goes to the new eventfd.
        self.frontend
            .get_features()
            .map_err(vhost_err("GET_FEATURES (barrier after SET_VRING_CALL)"))?;
        if let Some(q) = self.queues.get_mut(&index) {
            q._call = Some(Box::new(call));
        }
        Ok(())
    }

    /// Waits up to `timeout` for the backend to go away. Returns `Ok(())` if it is still
    /// connected then, and [`Error::VhostUserDisconnected`] as soon as the connection hangs up.
    ///
    /// # Errors
    ///
    /// [`Error::VhostUserDisconnected`]; [`Error::VhostUser`] if polling fails.
    pub fn wait_disconnect(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.frontend.as_raw_fd(),
                events: libc::POLLRDHUP,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: `pfd` is one valid pollfd on the connection's socket, which `self` keeps
            // open; poll reads and writes only it.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::VhostUser {
                    op: "poll the connection",
                    reason: e.to_string(),
                });
            }
            if pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                return Err(Error::VhostUserDisconnected);
            }
            if left.is_zero() {
                return Ok(());
            }
        }
    }
}
