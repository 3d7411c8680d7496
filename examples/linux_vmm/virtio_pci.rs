//! A modern virtio-pci function with the queues of any [`VirtioDevice`]: its config space (the
//! virtio capabilities and MSI-X), and its BAR 0 as three vm-device regions — the registers
//! (common configuration, ISR, device configuration), the notify region and the MSI-X table and
//! PBA, the last two vm-notify's own `IoRegion`s.
//!
//! What vm-notify does here: each queue's notify address is an ioeventfd (`PciNotify`), its
//! interrupt and the configuration interrupt are MSI-X vectors (`MsixVectors`, one per queue
//! and one for the configuration) — or, for a driver that leaves MSI-X disabled (`pci=nomsi`),
//! the ISR status on the function's INTx line, a level IOAPIC pin (`StatusLine`) — and a device
//! thread per queue — started when the driver readies the queue, stopped and joined at the end —
//! serves the ring with `QueueServer`, which suppresses kicks and interrupts as the driver asks.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
#[cfg(feature = "vhost-user")]
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::DeviceMmio;
use vm_memory::GuestMemoryMmap;
use vm_notify::io::IoRegion;
use vm_notify::msix::{MsixStats, MsixVectors};
use vm_notify::virtio::{
    PciLayout, PciNotify, QueueServer, ServeStats, StatusLine, VirtQueueNotify, NO_VECTOR,
};
use vm_notify::wait::{EventLoop, StopHandle, Wake};
use vm_notify::{Notifier, Vm};

use crate::lock;
use crate::pci::PciFunction;

/// Each function's BAR 0 (the first at `BAR0_BASE`, the next `BAR0_SIZE` above).
pub const BAR0_BASE: u64 = 0xe000_0000;
pub const BAR0_SIZE: u64 = 0x4000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x1400;
const DEVICE_CFG_LEN: u64 = 0x100;
const NOTIFY: u64 = 0x2000;
const NOTIFY_LEN: u64 = 0x1000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x3000;
const MSIX_PBA: u64 = 0x3800;
const MSIX_LEN: u64 = 0x1000;
pub const QUEUE_MAX: u16 = 256;
/// The most queues a function has (its notify addresses fit the notify region).
pub const QUEUES_MAX: u16 = 16;
/// Where the MSI-X capability sits in config space (message control at +2).
const MSIX_CAP: usize = 0x84;
/// The virtio PCI capability types (virtio 1.x, 4.1.4).
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;

/// VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX and VIRTIO_RING_F_INDIRECT_DESC as feature bits.
pub const F_VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
pub const F_EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
#[cfg(feature = "vhost-user")]
pub const F_INDIRECT_DESC: u64 = 1 << VIRTIO_RING_F_INDIRECT_DESC;

/// What a device did, counted by its thread.
#[derive(Debug, Default)]
pub struct DeviceStats {
    /// Guest notifications read from the kick notifier (after coalescing).
    pub kicks: AtomicU64,
    /// Descriptor chains completed.
    pub requests: AtomicU64,
    /// Bytes moved between the device and guest buffers.
    pub bytes: AtomicU64,
    /// Chains the device could not complete (malformed), returned with nothing written.
    pub malformed: AtomicU64,
    /// Time the device thread spent completing chains, in nanoseconds.
    pub busy_ns: AtomicU64,
    /// Page faults the device thread took meanwhile (touching guest memory for the first time).
    pub faults: AtomicU64,
    /// Used-buffer interrupts signalled (the driver wanted them), over the device's queues.
    pub interrupts: AtomicU64,
    /// Resamples of a level line (the guest's EOI lowered it: virtio-mmio, virtio-pci's INTx),
    /// as counted by its notifier.
    pub resamples: AtomicU64,
    /// A level line asserted again at a resample, its status still set.
    pub reasserts: AtomicU64,
    /// Times ring polling found buffers the driver had not kicked for.
    pub polled: AtomicU64,
    /// Ring polling's watches cut short because the device thread lost its CPU.
    pub poll_preempted: AtomicU64,
    /// Wake-ups that did not watch the ring because polling was backed off.
    pub poll_backed_off: AtomicU64,
    /// Ring polling's windows that ran out.
    pub poll_ran_out: AtomicU64,
    /// Ring polling's windows the device ended (a lone request finished).
    pub poll_cut: AtomicU64,
    /// A vhost-user backend's calls relayed to a status line (virtio-mmio): the relay's
    /// wake-ups, each one interrupt decision.
    pub relayed_calls: AtomicU64,
    /// A block device's read requests.
    pub reads: AtomicU64,
    /// A block device's write requests.
    pub writes: AtomicU64,
    /// A block device's flush requests.
    pub flushes: AtomicU64,
    /// Chains that were in flight when the device thread was stopped, finished and returned to
    /// the guest before it ended (counted in `requests` too).
    pub drained: AtomicU64,
}

/// The calling thread's page faults so far (minor and major).
fn thread_faults() -> u64 {
    // SAFETY: an all-zero rusage is a valid value; getrusage fills it or fails and leaves it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage for the call.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    (usage.ru_minflt + usage.ru_majflt) as u64
}

/// A virtio device behind a [`VirtioPci`] function: a new device is one file implementing this.
pub trait VirtioDevice: Send + 'static {
    /// The virtio device ID (`virtio_bindings::virtio_ids`).
    const TYPE: u32;
    /// Its name in reports.
    const NAME: &'static str;
    /// The features it offers beyond VERSION_1 and EVENT_IDX.
    fn features(&self) -> u64;
    /// Its device configuration space.
    fn config(&self) -> Vec<u8>;
    /// Its queues (one unless it says otherwise).
    fn queues(&self) -> u16 {
        1
    }
    /// The device for another of its queues, served by a thread of its own (asked for each
    /// queue after the first).
    fn for_queue(&self) -> std::io::Result<Self>
    where
        Self: Sized,
    {
        Err(std::io::ErrorKind::Unsupported.into())
    }
    /// Sets up a queue's server: interrupt moderation, ring polling (neither unless it says
    /// otherwise).
    fn configure(&self, _server: &mut QueueServer) -> vm_notify::Result<()> {
        Ok(())
    }
    /// Completes one descriptor chain: returns the bytes written into the chain's writable
    /// buffers (the used length), or `None` for a chain it cannot serve (returned empty). A
    /// device whose queues a backend outside the VMM serves (`External`) keeps the default:
    /// no chain reaches it.
    fn complete(
        &mut self,
        _mem: &GuestMemoryMmap,
        _chain: DescriptorChain<&GuestMemoryMmap>,
        _stats: &DeviceStats,
    ) -> Option<u32> {
        None
    }

    /// An asynchronous device's completion notifier: the device thread takes chains with
    /// `begin`, hands what it began to the kernel with `submit`, and when this notifier fires
    /// collects what finished with `reap`. `None` (the default): every chain completes in
    /// `complete`.
    fn completions(&self) -> Option<&Notifier> {
        None
    }
    /// Begins one chain: done at once (as `complete`), or pending until `reap` returns it.
    fn begin(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        stats: &DeviceStats,
    ) -> Begun {
        Begun::Done(self.complete(mem, chain, stats))
    }
    /// Hands the chains begun since the last call to whatever completes them.
    fn submit(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// Called while the queue's server polls the ring and finds it dry: starts what was begun,
    /// and says whether finished work waits that the driver may be waiting for (then the
    /// server stops polling, so it goes back at once).
    fn idle(&mut self) -> bool {
        false
    }
    /// Adds the chains that finished since the last call to `done`: each its head index and
    /// used length.
    fn reap(&mut self, _mem: &GuestMemoryMmap, _stats: &DeviceStats, _done: &mut Vec<(u16, u32)>) {}
    /// Waits for every chain begun and not yet reaped, and adds them all to `done` (the device
    /// thread's last act before it stops: nothing is left in flight to lose).
    fn drain(&mut self, _mem: &GuestMemoryMmap, _stats: &DeviceStats, _done: &mut Vec<(u16, u32)>) {
    }
}

/// What became of a chain an asynchronous device began.
pub enum Begun {
    /// Completed now: the used length, or `None` for a chain it cannot serve.
    Done(Option<u32>),
    /// In flight; `reap` returns it.
    Pending,
}

/// A queue's configuration, as the driver writes it (on either transport).
#[derive(Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct QueueConfig {
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            size: QUEUE_MAX,
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

/// The common configuration of the device and its queues.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Common {
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_vector: u16,
    queue_select: u16,
    queues: Vec<QueueConfig>,
}

impl Common {
    fn new(queues: u16) -> Self {
        Common {
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_vector: NO_VECTOR,
            queue_select: 0,
            queues: vec![QueueConfig::default(); queues.into()],
        }
    }

    /// The queue `queue_select` names, if there is one.
    fn selected(&self) -> Option<(u16, &QueueConfig)> {
        let q = self.queue_select;
        self.queues.get(usize::from(q)).map(|c| (q, c))
    }
}

/// Where a queue's device stands in its ring: the next available entry it will take and the
/// next used entry it will write (virtio-queue's `next_avail`, `next_used`).
pub type RingPosition = (u16, u16);

/// The device thread, once the driver readied the queue.
pub struct Worker {
    stop: StopHandle,
    /// Ends with the ring's position (`None`: a thread that serves no ring, a call relay).
    thread: JoinHandle<Result<Option<RingPosition>, String>>,
}

impl Worker {
    /// Starts queue `q`'s device thread (either transport): `device` — taken only once the ring
    /// and the loop are made — serves the ring the driver configured, from `at` (a restored
    /// queue's position; the ring's start without), with kicks from `queue`; with `resample`, a
    /// level line's resamples too (see [`serve`]). Says why it could not.
    #[allow(clippy::too_many_arguments)]
    pub fn start<D: VirtioDevice>(
        q: u16,
        device: &mut Option<D>,
        queue: VirtQueueNotify,
        config: &QueueConfig,
        driver_features: u64,
        at: Option<RingPosition>,
        mem: &GuestMemoryMmap,
        stats: &Arc<DeviceStats>,
        resample: Option<Arc<StatusLine>>,
    ) -> Result<Worker, String> {
        let mut ring = ring(config, driver_features).map_err(|e| format!("queue: {e}"))?;
        if let Some((next_avail, next_used)) = at {
            ring.set_next_avail(next_avail);
            ring.set_next_used(next_used);
        }
        let events = EventLoop::new().map_err(|e| format!("event loop: {e}"))?;
        let device = device.take().ok_or("the device is serving already")?;
        let stop = events.stop_handle();
        let server = QueueServer::new(queue, ring);
        let (mem, stats) = (mem.clone(), stats.clone());
        let thread = thread::Builder::new()
            .name(format!("{}.{q}", D::NAME))
            .spawn(move || {
                serve(device, server, &mem, &events, &stats, resample.as_deref())
                    .map(Some)
                    .map_err(|e| e.to_string())
            })
            .map_err(|e| format!("spawn: {e}"))?;
        Ok(Worker { stop, thread })
    }

    /// Stops the thread and joins it: where its ring stands (`None` for a call relay), or how it
    /// failed.
    pub fn finish(self, name: &str) -> Result<Option<RingPosition>, String> {
        self.stop.stop().map_err(|e| e.to_string())?;
        self.thread
            .join()
            .map_err(|_| format!("the {name} thread panicked"))?
    }
}

/// The thread that relays a vhost-user backend's calls for queue `q` to `line`, a device's
/// status line (virtio-mmio): on each wake-up of the relay it sets the used-buffer bit and
/// asserts the line if it was clear; on each resample it asserts the line again while a bit is
/// still set. The backend serves the ring; this thread only carries its calls.
#[cfg(feature = "vhost-user")]
pub fn relay_calls(
    name: &str,
    q: u16,
    relay: vm_notify::vhost_user::CallRelay,
    line: Arc<StatusLine>,
    stats: &Arc<DeviceStats>,
) -> Result<Worker, String> {
    const CALLS: u64 = 0;
    const RESAMPLE: u64 = 1;
    let events = EventLoop::new().map_err(|e| format!("event loop: {e}"))?;
    events
        .add(CALLS, relay.calls())
        .map_err(|e| format!("the relay's calls: {e}"))?;
    if let Some(resample) = line.resample() {
        events
            .add(RESAMPLE, resample)
            .map_err(|e| format!("the line's resamples: {e}"))?;
    }
    let stop = events.stop_handle();
    let stats = stats.clone();
    let thread = thread::Builder::new()
        .name(format!("{name}.{q}.calls"))
        .spawn(move || {
            let mut ready = Vec::new();
            let mut relayed = || -> vm_notify::Result<()> {
                loop {
                    if events.wait(None, &mut ready)? == Wake::Stopped {
                        return Ok(());
                    }
                    for &(token, count) in &ready {
                        if token == CALLS {
                            stats.relayed_calls.fetch_add(1, Ordering::Relaxed);
                            if relay.deliver()? {
                                stats.interrupts.fetch_add(1, Ordering::Relaxed);
                            }
                        } else {
                            stats.resamples.fetch_add(count, Ordering::Relaxed);
                            if line.on_resample()? {
                                stats.reasserts.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            };
            relayed().map(|()| None).map_err(|e| e.to_string())
        })
        .map_err(|e| format!("spawn: {e}"))?;
    Ok(Worker { stop, thread })
}

/// Stops every queue's thread of device `name` and joins it: how they ended (the first error;
/// an error too for a queue whose thread never started).
pub fn stop_workers(workers: Vec<Option<Worker>>, name: &str) -> Result<(), String> {
    let mut ended = Ok(());
    for (q, worker) in workers.into_iter().enumerate() {
        let outcome = match worker {
            None => Err(format!("queue {q}: the device thread never started")),
            Some(worker) => worker.finish(name).map(drop),
        };
        ended = ended.and(outcome);
    }
    ended
}

/// What the guest changes.
struct State<D> {
    /// Per queue, the device until the queue's thread takes it.
    devices: Vec<Option<D>>,
    /// The device's features, kept when its thread takes it.
    offered_at_start: u64,
    bar0: u64,
    /// Which BAR 0 dword was last written all-ones (the size probe).
    bar0_probe: [bool; 2],
    common: Common,
    /// Per queue, its thread once it runs.
    workers: Vec<Option<Worker>>,
    /// The Interrupt Line register (0x3c): the IRQ the guest noted for INTx.
    interrupt_line: u8,
    /// When set, a backend outside the VMM serves the queues instead of the device threads.
    #[cfg(feature = "vhost-user")]
    vhost: Option<External>,
    /// Per queue, whether the external backend serves it.
    vhost_started: Vec<bool>,
}

/// A backend outside the VMM that serves a function's queues: a vhost-user process, or the host
/// kernel's vhost-net worker. Either takes each queue's kick ioeventfd and its MSI-X vector's
/// eventfd as they are.
#[cfg(feature = "vhost-user")]
pub enum External {
    User(vm_notify::vhost_user::VhostUserFrontend),
    #[cfg(feature = "vhost-net")]
    Net(vm_notify::vhost_net::VhostNetFrontend),
}

#[cfg(feature = "vhost-user")]
impl External {
    /// The backend's name in reports.
    pub fn kind(&self) -> &'static str {
        match self {
            External::User(_) => "vhost-user",
            #[cfg(feature = "vhost-net")]
            External::Net(_) => "vhost-net",
        }
    }

    fn features(&self) -> u64 {
        match self {
            External::User(f) => f.features(),
            #[cfg(feature = "vhost-net")]
            External::Net(f) => f.features(),
        }
    }

    fn set_acked_features(&mut self, acked: u64) -> vm_notify::Result<u64> {
        match self {
            External::User(f) => f.set_acked_features(acked),
            #[cfg(feature = "vhost-net")]
            External::Net(f) => f.set_acked_features(acked),
        }
    }

    fn start_queue(
        &mut self,
        layout: vm_notify::virtio::VringLayout,
        kick: impl vm_notify::QueueKicks + 'static,
        call: impl vm_notify::GuestInterrupt + 'static,
    ) -> vm_notify::Result<Option<vm_notify::vhost_user::CallRelay>> {
        match self {
            External::User(f) => f.start_queue(layout, kick, call),
            #[cfg(feature = "vhost-net")]
            External::Net(f) => f.start_queue(layout, kick, call),
        }
    }
}

/// A virtio-pci function's saved state (`VirtioPci::save`): what the driver configured,
/// vm-notify's notification state (the queues' unread kicks, their vectors, the MSI-X table with
/// its pending bits), and where each running queue's device stood in its ring.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Saved {
    /// The device's name (`VirtioDevice::NAME`): a restore checks it.
    pub name: String,
    common: Common,
    interrupt_line: u8,
    notify: vm_notify::virtio::PciNotifyState,
    /// Per queue, its device's ring position (`None`: the queue was not running).
    rings: Vec<Option<RingPosition>>,
}

impl Saved {
    /// Guest notifications its queues' kick counters held unread when it was saved.
    pub fn unread_kicks(&self) -> u64 {
        self.notify.queues.iter().map(|q| q.unread_kicks).sum()
    }

    /// Each running queue as the save left it: the device's ring position, what the driver
    /// had published (avail idx) and asked for (used_event), the used idx in guest memory, and
    /// the MSI-X entry of its vector (the x86 vector and destination APIC ID, masked, pending).
    pub fn rings_at_save(&self, mem: &GuestMemoryMmap) -> Vec<serde_json::Value> {
        use vm_memory::{Bytes, GuestAddress};
        let read = |at: u64| mem.read_obj::<u16>(GuestAddress(at)).ok();
        let mut rings = Vec::new();
        for (q, at) in self.rings.iter().enumerate() {
            let (Some((next_avail, next_used)), Some(config)) = (at, self.common.queues.get(q))
            else {
                continue;
            };
            let used_event = config.driver + 4 + 2 * u64::from(config.size);
            let vector = self.notify.queues.get(q).map_or(NO_VECTOR, |s| s.vector);
            let entry = self.notify.msix.vectors.get(usize::from(vector));
            rings.push(serde_json::json!({
                "queue": q,
                "next_avail": next_avail,
                "next_used": next_used,
                "avail_idx": read(config.driver + 2),
                "used_event": read(used_event),
                "used_idx": read(config.device + 2),
                "msix": entry.map(|e| serde_json::json!({
                    "vector": e.message.data & 0xff,
                    "apic_id": (e.message.address >> 12) & 0xff,
                    "masked": e.masked,
                    "pending": e.pending,
                })),
            }));
        }
        rings
    }
}

/// A modern virtio-pci function serving the queues of device `D`.
pub struct VirtioPci<D: VirtioDevice> {
    state: Mutex<State<D>>,
    config: [u8; 256],
    device_config: Vec<u8>,
    /// Whether VIRTIO_RING_F_EVENT_IDX is offered.
    event_idx: bool,
    msix: MsixVectors,
    notify: Arc<PciNotify>,
    mem: GuestMemoryMmap,
    stats: Arc<DeviceStats>,
    /// Queue notifications that exited to the VMM (the kernel's ioeventfd takes every one, so
    /// this stays 0 unless a kick took the slow path).
    notify_exits: Arc<AtomicU64>,
}

fn put16(c: &mut [u8], at: usize, v: u16) {
    c[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(c: &mut [u8], at: usize, v: u32) {
    c[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// A virtio PCI capability at `at`: `cfg_type` in BAR 0 at `offset`, `length` bytes.
fn virtio_cap(
    c: &mut [u8],
    at: usize,
    next: usize,
    len: u8,
    cfg_type: u8,
    offset: u64,
    length: u64,
) {
    c[at] = 0x09; // vendor-specific
    c[at + 1] = next as u8;
    c[at + 2] = len;
    c[at + 3] = cfg_type;
    c[at + 4] = 0; // BAR 0
    put32(c, at + 8, offset as u32);
    put32(c, at + 12, length as u32);
}

impl<D: VirtioDevice> VirtioPci<D> {
    /// The function with its BAR 0 at `bar0`, its notify address registered and its vectors
    /// made on `vm`, its INTx pin (INTA#) on IOAPIC pin `intx_gsi` (the DSDT's `_PRT` says so);
    /// `event_idx` says whether VIRTIO_RING_F_EVENT_IDX is offered. With `saved`, the function
    /// it describes, on a `vm` whose memory, vCPUs and irqchip are restored: its notification
    /// state restored by vm-notify (`Vm::restore_virtio_pci`), the driver's configuration as it
    /// was, and a device thread serving each queue that ran, from where it stood.
    pub fn new(
        vm: &Vm,
        mem: GuestMemoryMmap,
        bar0: u64,
        intx_gsi: u32,
        device: D,
        event_idx: bool,
        saved: Option<&Saved>,
    ) -> Result<Self, crate::Error> {
        if let Some(saved) =
            saved.filter(|s| s.name != D::NAME || s.notify.layout.notify_base != bar0 + NOTIFY)
        {
            return Err(format!(
                "--restore: the saved function {} at {:#x} is not {} at {bar0:#x}",
                saved.name,
                saved.notify.layout.notify_base.wrapping_sub(NOTIFY),
                D::NAME
            )
            .into());
        }
        let queues = device.queues();
        if !(1..=QUEUES_MAX).contains(&queues) {
            return Err(format!("{}: {queues} queues (1 to {QUEUES_MAX})", D::NAME).into());
        }
        if saved.is_some_and(|s| s.rings.len() != usize::from(queues)) {
            return Err(format!("--restore: {} saved with other queues", D::NAME).into());
        }
        let (msix, notify) = match saved {
            Some(saved) => {
                let notify = vm.restore_virtio_pci(&saved.notify)?;
                (notify.vectors().clone(), notify)
            }
            None => {
                // A vector per queue, and one for the configuration interrupt.
                let msix = vm.msix(usize::from(queues) + 1)?;
                // Each queue its own notify address.
                let layout = PciLayout {
                    notify_base: bar0 + NOTIFY,
                    notify_off_multiplier: NOTIFY_MULTIPLIER,
                    queue_notify_off: (0..queues).collect(),
                    intx: Some(intx_gsi),
                };
                let notify = vm.virtio_pci(&layout, &msix)?;
                (msix, notify)
            }
        };
        let notify = Arc::new(notify);
        let mut c = [0u8; 256];
        let kind = D::TYPE as u16;
        put16(&mut c, 0x00, 0x1af4); // virtio
        put16(&mut c, 0x02, 0x1040 + kind); // modern virtio, the device type
        put16(&mut c, 0x06, 1 << 4); // status: capabilities list
        c[0x08] = 1; // revision
        c[0x0a] = 0x80; // class: other
        c[0x0b] = 0xff; // (unassigned base class)
        put16(&mut c, 0x2c, 0x1af4);
        put16(&mut c, 0x2e, kind);
        c[0x34] = 0x40;
        c[0x3d] = 1; // interrupt pin: INTA#
        virtio_cap(&mut c, 0x40, 0x50, 16, CAP_COMMON, COMMON, COMMON_LEN);
        virtio_cap(&mut c, 0x50, 0x64, 20, CAP_NOTIFY, NOTIFY, NOTIFY_LEN);
        put32(&mut c, 0x50 + 16, NOTIFY_MULTIPLIER);
        virtio_cap(&mut c, 0x64, 0x74, 16, CAP_ISR, ISR, 4);
        virtio_cap(
            &mut c,
            0x74,
            MSIX_CAP,
            16,
            CAP_DEVICE,
            DEVICE_CFG,
            DEVICE_CFG_LEN,
        );
        c[MSIX_CAP] = 0x11; // MSI-X, last in the list
        put32(&mut c, MSIX_CAP + 4, MSIX_TABLE as u32); // table, BIR 0
        put32(&mut c, MSIX_CAP + 8, MSIX_PBA as u32); // PBA, BIR 0
        let device_config = device.config();
        let offered_at_start = device.features();
        let mut devices = Vec::with_capacity(queues.into());
        for _ in 1..queues {
            devices.push(Some(device.for_queue()?));
        }
        devices.insert(0, Some(device));
        let function = VirtioPci {
            state: Mutex::new(State {
                offered_at_start,
                devices,
                bar0,
                bar0_probe: [false; 2],
                common: saved.map_or_else(|| Common::new(queues), |s| s.common.clone()),
                workers: (0..queues).map(|_| None).collect(),
                interrupt_line: saved.map_or(0xff, |s| s.interrupt_line),
                #[cfg(feature = "vhost-user")]
                vhost: None,
                vhost_started: vec![false; queues.into()],
            }),
            device_config,
            config: c,
            event_idx,
            msix,
            notify,
            mem,
            stats: Arc::default(),
            notify_exits: Arc::default(),
        };
        let mut state = lock(&function.state);
        for (q, at) in saved.iter().flat_map(|s| s.rings.iter()).enumerate() {
            if let Some(at) = at {
                function.start(&mut state, q as u16, Some(*at));
            }
        }
        drop(state);
        Ok(function)
    }

    /// Hands each queue to `backend` when the driver enables it: the queue's own kick ioeventfd
    /// and its MSI-X vector's eventfd go to the backend, and no VMM thread is in the path. The
    /// guest is offered the ring features the backend negotiated, and the device's own.
    #[cfg(feature = "vhost-user")]
    pub fn with_vhost(self, backend: External) -> Self {
        lock(&self.state).vhost = Some(backend);
        self
    }

    /// The backend outside the VMM that serves the queues (`vhost-user`, `vhost-net`), if one
    /// does.
    pub fn vhost(&self) -> Option<&'static str> {
        #[cfg(feature = "vhost-user")]
        return lock(&self.state).vhost.as_ref().map(External::kind);
        #[cfg(not(feature = "vhost-user"))]
        None
    }

    /// BAR 0's base now.
    pub fn bar0(&self) -> u64 {
        lock(&self.state).bar0
    }

    /// The features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        lock(&self.state).common.driver_features
    }

    /// The queue's MSI-X vector, the configuration vector, and what the vectors did.
    pub fn vectors(&self) -> (u16, u16, MsixStats) {
        let queue = self.notify.queue_vector(0).unwrap_or(NO_VECTOR);
        let config = lock(&self.state).common.config_vector;
        (queue, config, self.msix.stats())
    }

    /// What the device thread did.
    pub fn stats(&self) -> &DeviceStats {
        &self.stats
    }

    /// Queue notifications that exited to the VMM.
    pub fn notify_exits(&self) -> u64 {
        self.notify_exits.load(Ordering::Relaxed)
    }

    /// BAR 0's parts as vm-device regions: (offset in BAR 0, length, device). The VMM registers
    /// each at BAR 0's base plus its offset in its `IoManager`.
    pub fn regions(self: &Arc<Self>) -> Vec<(u64, u64, Arc<dyn DeviceMmio + Send + Sync>)> {
        let notify = NotifyRegion {
            region: IoRegion::pci_notify(self.notify.clone()),
            exits: self.notify_exits.clone(),
            notify_at: None,
        };
        let msix = IoRegion::msix(&self.msix, 0, MSIX_PBA - MSIX_TABLE);
        vec![
            (0, NOTIFY, Arc::new(Registers(self.clone())) as _),
            (NOTIFY, NOTIFY_LEN, Arc::new(notify) as _),
            (MSIX_TABLE, MSIX_LEN, Arc::new(msix) as _),
        ]
    }

    /// How many queues the function has.
    pub fn queues(&self) -> u16 {
        lock(&self.state).common.queues.len() as u16
    }

    /// Stops every queue's thread and joins it: how they ended (the first error; an error too
    /// when a queue's thread never started, unless a vhost-user backend served the queue).
    pub fn stop(&self) -> Result<(), String> {
        let mut state = lock(&self.state);
        if state.vhost_started.iter().any(|&started| started) {
            return Ok(());
        }
        let workers: Vec<_> = state.workers.iter_mut().map(Option::take).collect();
        drop(state);
        stop_workers(workers, D::NAME)
    }

    /// Saves the function of a paused guest (its vCPUs stopped): each queue's device thread
    /// finishes what it began and stops, telling where its ring stands, then vm-notify saves
    /// the notifications. A function an external backend serves is refused (its rings are the
    /// backend's).
    pub fn save(&self) -> Result<Saved, String> {
        let mut state = lock(&self.state);
        if state.vhost_started.iter().any(|&started| started) {
            return Err(format!(
                "{}: its backend holds its rings; not saved",
                D::NAME
            ));
        }
        let mut rings = Vec::with_capacity(state.workers.len());
        for worker in state.workers.iter_mut() {
            rings.push(match worker.take() {
                Some(worker) => worker.finish(D::NAME)?,
                None => None,
            });
        }
        let notify = self.notify.save().map_err(|e| e.to_string())?;
        Ok(Saved {
            name: D::NAME.into(),
            common: state.common.clone(),
            interrupt_line: state.interrupt_line,
            notify,
            rings,
        })
    }

    /// Every feature offered.
    fn offered(&self, state: &State<D>) -> u64 {
        let event_idx = if self.event_idx { F_EVENT_IDX } else { 0 };
        #[cfg(feature = "vhost-user")]
        if let Some(backend) = &state.vhost {
            let ring = F_VERSION_1 | event_idx | F_INDIRECT_DESC;
            return (backend.features() & ring) | state.offered_at_start;
        }
        F_VERSION_1 | event_idx | state.offered_at_start
    }

    fn registers_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset < COMMON_LEN {
            let n = data.len().min(8);
            let value = self.common_read(&lock(&self.state), offset);
            data[..n].copy_from_slice(&value.to_le_bytes()[..n]);
        } else if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&offset) {
            let at = (offset - DEVICE_CFG) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.device_config.get(at + i).copied().unwrap_or(0);
            }
        } else if offset == ISR && !data.is_empty() {
            // Reading the ISR clears it and lowers the INTx line (0 while MSI-X is on).
            match self.notify.read_isr() {
                Ok(isr) => data[0] = isr,
                Err(e) => eprintln!("linux_vmm: {}: ISR read: {e}", D::NAME),
            }
        }
    }

    /// Whether the driver enabled MSI-X (else the function interrupts on INTx).
    pub fn msix_enabled(&self) -> bool {
        self.msix.message_control() & vm_notify::msix::MSIX_ENABLE != 0
    }

    /// The interrupts the guest has taken from the function so far, as the function counts
    /// them: its MSI-X deliveries, or on INTx the EOIs that resampled its line (one per
    /// interrupt taken).
    pub fn delivered(self: Arc<Self>) -> crate::console::Delivered {
        Box::new(move || match self.msix_enabled() {
            true => self.msix.stats().delivered,
            false => self.stats.resamples.load(Ordering::Relaxed),
        })
    }

    fn registers_write(&self, offset: u64, data: &[u8]) {
        if offset >= COMMON_LEN {
            return;
        }
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let value = u64::from_le_bytes(b);
        let mut state = lock(&self.state);
        self.common_write(&mut state, offset, value);
    }

    fn common_read(&self, state: &State<D>, offset: u64) -> u64 {
        let c = &state.common;
        let Some((q, queue)) = c.selected() else {
            // No such queue: its size reads 0, which tells the driver so.
            return match offset {
                0x16 => c.queue_select.into(),
                0x18..0x38 => 0,
                _ => self.device_read(state, offset),
            };
        };
        match offset {
            0x18 => queue.size.into(),
            0x1a => self.notify.queue_vector(q).unwrap_or(NO_VECTOR).into(),
            0x1c => queue.ready.into(),
            0x1e => q.into(), // queue_notify_off: each queue its own address
            0x20 => queue.desc & 0xffff_ffff,
            0x24 => queue.desc >> 32,
            0x28 => queue.driver & 0xffff_ffff,
            0x2c => queue.driver >> 32,
            0x30 => queue.device & 0xffff_ffff,
            0x34 => queue.device >> 32,
            _ => self.device_read(state, offset),
        }
    }

    /// The common configuration's device-wide registers.
    fn device_read(&self, state: &State<D>, offset: u64) -> u64 {
        let c = &state.common;
        match offset {
            0x00 => c.device_feature_select.into(),
            0x04 => match c.device_feature_select {
                0 => self.offered(state) & 0xffff_ffff,
                1 => self.offered(state) >> 32,
                _ => 0,
            },
            0x08 => c.driver_feature_select.into(),
            0x0c => {
                (c.driver_features >> (32 * u64::from(c.driver_feature_select.min(1))))
                    & 0xffff_ffff
            }
            0x10 => c.config_vector.into(),
            0x12 => c.queues.len() as u64, // num_queues
            0x14 => c.status.into(),
            0x15 => 0, // config_generation
            0x16 => c.queue_select.into(),
            _ => 0,
        }
    }

    fn common_write(&self, state: &mut State<D>, offset: u64, value: u64) {
        let lo = |old: u64| (old & !0xffff_ffff) | (value & 0xffff_ffff);
        let hi = |old: u64| (old & 0xffff_ffff) | (value << 32);
        let selected = state.common.selected().map(|(q, _)| q);
        let running = state.workers.iter().any(Option::is_some)
            || state.vhost_started.iter().any(|&started| started);
        match (offset, selected) {
            (0x10, _) => state.common.config_vector = self.notify.set_config_vector(value as u16),
            (0x1a, Some(q)) => {
                let _ = self.notify.set_queue_vector(q, value as u16);
            }
            (0x1c, Some(q)) if value == 1 => {
                state.common.queues[usize::from(q)].ready = true;
                self.start(state, q, None);
            }
            (0x14, _) if value == 0 && !running => {
                // A reset before the queues ran: back to the initial configuration. (A reset of
                // running queues is not supported; Linux resets at probe time, before.)
                let queues = state.common.queues.len() as u16;
                state.common = Common::new(queues);
                for q in 0..queues {
                    let _ = self.notify.set_queue_vector(q, NO_VECTOR);
                }
            }
            _ => {
                let offered = self.offered(state);
                let c = &mut state.common;
                if let Some(q) = selected {
                    let queue = &mut c.queues[usize::from(q)];
                    match offset {
                        0x18 => queue.size = (value as u16).clamp(1, QUEUE_MAX),
                        0x20 => queue.desc = lo(queue.desc),
                        0x24 => queue.desc = hi(queue.desc),
                        0x28 => queue.driver = lo(queue.driver),
                        0x2c => queue.driver = hi(queue.driver),
                        0x30 => queue.device = lo(queue.device),
                        0x34 => queue.device = hi(queue.device),
                        _ => {}
                    }
                }
                match offset {
                    0x00 => c.device_feature_select = value as u32,
                    0x08 => c.driver_feature_select = value as u32,
                    0x0c if c.driver_feature_select == 0 => {
                        c.driver_features = lo(c.driver_features) & offered
                    }
                    0x0c if c.driver_feature_select == 1 => {
                        c.driver_features = hi(c.driver_features) & offered
                    }
                    0x14 => c.status = value as u8,
                    0x16 => c.queue_select = value as u16,
                    _ => {}
                }
            }
        }
    }

    /// Queue `q` is ready: the external backend or the queue's device thread starts serving it
    /// (a restored queue's thread from `at`).
    fn start(&self, state: &mut State<D>, q: u16, at: Option<RingPosition>) {
        let i = usize::from(q);
        if state.workers[i].is_some() || state.vhost_started[i] {
            return;
        }
        let Some(queue) = self.notify.queue(q) else {
            return;
        };
        let config = state.common.queues[i];
        #[cfg(feature = "vhost-user")]
        if let Some(backend) = state.vhost.as_mut() {
            let kind = backend.kind();
            let vector = self.notify.queue_vector(q).unwrap_or(NO_VECTOR);
            let Ok(call) = self.msix.handle(vector.into()) else {
                eprintln!("linux_vmm: {kind}: queue {q} has no MSI-X vector (INTx is not served)");
                return;
            };
            let layout = vm_notify::virtio::VringLayout {
                index: q,
                size: config.size,
                desc_table: config.desc,
                avail_ring: config.driver,
                used_ring: config.device,
            };
            // The backend learns what the driver accepted (EVENT_IDX among it) before the first
            // queue, and only then: a vhost-user backend disables every ring at SET_FEATURES
            // when protocol features were negotiated (rust-vmm's vhost-user-backend does).
            let first = !state.vhost_started.iter().any(|&started| started);
            if first {
                if let Err(e) = backend.set_acked_features(state.common.driver_features) {
                    eprintln!("linux_vmm: {kind}: {e}");
                    return;
                }
            }
            match backend.start_queue(layout, queue, call) {
                Ok(None) => state.vhost_started[i] = true,
                // An MSI-X vector has its eventfd: the backend's calls go straight to KVM.
                Ok(Some(_)) => eprintln!("linux_vmm: {kind}: the vector has no eventfd"),
                Err(e) => eprintln!("linux_vmm: {kind}: queue {q}: {e}"),
            }
            return;
        }
        let features = state.common.driver_features;
        let (mem, stats) = (&self.mem, &self.stats);
        // Queue 0's thread also takes the INTx line's resamples (the line is the function's).
        let resample = self.notify.intx().filter(|_| q == 0).cloned();
        match Worker::start(
            q,
            &mut state.devices[i],
            queue,
            &config,
            features,
            at,
            mem,
            stats,
            resample,
        ) {
            Ok(worker) => state.workers[i] = Some(worker),
            Err(e) => eprintln!("linux_vmm: {}: {e}", D::NAME),
        }
    }
}

/// The device's view of a queue the driver configured.
fn ring(c: &QueueConfig, driver_features: u64) -> Result<Queue, virtio_queue::Error> {
    let mut ring = Queue::new(QUEUE_MAX)?;
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    ring.set_size(c.size);
    let (lo, hi) = split(c.desc);
    ring.set_desc_table_address(lo, hi);
    let (lo, hi) = split(c.driver);
    ring.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(c.device);
    ring.set_used_ring_address(lo, hi);
    ring.set_event_idx(driver_features & F_EVENT_IDX != 0);
    ring.set_ready(true);
    Ok(ring)
}

impl<D: VirtioDevice> PciFunction for VirtioPci<D> {
    fn config_read(&self, reg: usize) -> u32 {
        let state = lock(&self.state);
        let plain = u32::from_le_bytes([
            self.config[reg],
            self.config[reg + 1],
            self.config[reg + 2],
            self.config[reg + 3],
        ]);
        match reg {
            0x10 if state.bar0_probe[0] => !(BAR0_SIZE as u32 - 1) | 0b100,
            0x10 => (state.bar0 as u32 & !0xf) | 0b100,
            0x14 if state.bar0_probe[1] => 0xffff_ffff,
            0x14 => (state.bar0 >> 32) as u32,
            MSIX_CAP => (plain & 0xffff) | u32::from(self.msix.message_control()) << 16,
            0x3c => (plain & !0xff) | u32::from(state.interrupt_line),
            _ => plain,
        }
    }

    /// BAR 0 stays where the VMM put it: the queue's notify ioeventfd is registered at its
    /// address. The size probe (all ones) is answered; an address written back is ignored (Linux
    /// writes back the one it read, as the BAR lies in the host bridge's window).
    fn config_write(&self, reg: usize, value: u32, mask: u32) {
        let merged = (self.config_read(reg) & !mask) | (value & mask);
        let mut state = lock(&self.state);
        match reg {
            0x10 | 0x14 => {
                let half = (reg - 0x10) / 4;
                // The size probe writes all ones; anything else is an address.
                state.bar0_probe[half] = if half == 0 {
                    merged | 0xf == 0xffff_ffff
                } else {
                    merged == 0xffff_ffff
                };
            }
            MSIX_CAP if mask & 0xffff_0000 != 0 => {
                if let Err(e) = self.msix.write_message_control((merged >> 16) as u16) {
                    eprintln!("linux_vmm: {}: MSI-X message control: {e}", D::NAME);
                }
            }
            0x3c if mask & 0xff != 0 => state.interrupt_line = merged as u8,
            // The command register (decoding is always on) and everything else is read-only.
            _ => {}
        }
    }
}

/// BAR 0's registers: common configuration, ISR and device configuration.
struct Registers<D: VirtioDevice>(Arc<VirtioPci<D>>);

impl<D: VirtioDevice> DeviceMmio for Registers<D> {
    fn mmio_read(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.0.registers_read(offset, data);
    }

    fn mmio_write(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.0.registers_write(offset, data);
    }
}

/// vm-notify's notification registers (an `IoRegion`: the writes that exit reach their queue),
/// with the queue notifications that exited counted: every write, or with `notify_at` only those
/// at that offset (virtio-mmio, whose region also holds `InterruptACK`).
pub struct NotifyRegion {
    pub region: IoRegion,
    pub exits: Arc<AtomicU64>,
    pub notify_at: Option<u64>,
}

impl DeviceMmio for NotifyRegion {
    fn mmio_read(&self, base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.region.mmio_read(base, offset, data);
    }

    fn mmio_write(&self, base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if self.notify_at.unwrap_or(offset) == offset {
            self.exits.fetch_add(1, Ordering::Relaxed);
        }
        self.region.mmio_write(base, offset, data);
        if let Some(e) = self.region.take_error() {
            eprintln!("linux_vmm: notification registers: {e}");
        }
    }
}

/// The device thread: on each wake-up of the kick notifier, `QueueServer` completes every
/// available chain with kicks suppressed meanwhile and interrupts as the driver asks; it ends
/// when the VMM stops the loop. With `resample` (a level line: virtio-mmio's, or virtio-pci's
/// INTx), each resample — the guest's EOI lowered the line — asserts it again if a status bit
/// is still set.
fn serve<D: VirtioDevice>(
    mut device: D,
    mut server: QueueServer,
    mem: &GuestMemoryMmap,
    events: &EventLoop,
    stats: &DeviceStats,
    resample: Option<&StatusLine>,
) -> vm_notify::Result<RingPosition> {
    const KICK: u64 = 0;
    const RESAMPLE: u64 = 1;
    const COMPLETED: u64 = 2;
    device.configure(&mut server)?;
    events.add(KICK, server.notify().kicks())?;
    if let Some(notifier) = resample.and_then(|irq| irq.resample()) {
        events.add(RESAMPLE, notifier)?;
    }
    let asynchronous = match device.completions() {
        Some(done) => events.add(COMPLETED, done).map(|()| true)?,
        None => false,
    };
    let (mut ready, mut seen) = (Vec::new(), ServeStats::default());
    let mut done: Vec<(u16, u32)> = Vec::new();
    loop {
        if events.wait(None, &mut ready)? == Wake::Stopped {
            // What was begun finishes and goes back to the guest (its interrupt raised as the
            // driver asks): the ring's position is then all a restored device needs.
            device.drain(mem, stats, &mut done);
            let served = server.complete(mem, done.drain(..))?;
            stats.requests.fetch_add(served, Ordering::Relaxed);
            stats.drained.fetch_add(served, Ordering::Relaxed);
            stats.interrupts.fetch_add(
                server.stats().interrupts - seen.interrupts,
                Ordering::Relaxed,
            );
            let queue = server.queue();
            return Ok((queue.next_avail(), queue.next_used()));
        }
        let (mut kicked, mut completed) = (false, false);
        for &(token, count) in &ready {
            match token {
                KICK => {
                    stats.kicks.fetch_add(count, Ordering::Relaxed);
                    kicked = true;
                }
                COMPLETED => completed = true,
                _ => {
                    stats.resamples.fetch_add(count, Ordering::Relaxed);
                    if let Some(irq) = resample {
                        if irq.on_resample()? {
                            stats.reasserts.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
        let served = if asynchronous {
            if kicked {
                // Every available chain begun, and handed to the kernel together once the ring
                // is dry (while the server polls it, or after).
                let shared = RefCell::new(&mut device);
                server.take_at_most(
                    mem,
                    u64::MAX,
                    |chain| {
                        let head = chain.head_index();
                        let started = std::time::Instant::now();
                        let begun = shared.borrow_mut().begin(mem, chain, stats);
                        let busy = started.elapsed().as_nanos() as u64;
                        stats.busy_ns.fetch_add(busy, Ordering::Relaxed);
                        if let Begun::Done(len) = begun {
                            done.push((head, used_length(len, stats)));
                        }
                    },
                    || shared.borrow_mut().idle(),
                )?;
                device.submit().map_err(|e| vm_notify::Error::Virtqueue {
                    op: "submit the requests",
                    reason: e.to_string(),
                })?;
            }
            if completed {
                device.reap(mem, stats, &mut done);
            }
            // What finished goes back to the guest together: at most one interrupt.
            server.complete(mem, done.drain(..))?
        } else if kicked {
            server.serve(mem, |chain| {
                let (started, faults) = (std::time::Instant::now(), thread_faults());
                let len = device.complete(mem, chain, stats);
                let busy = started.elapsed().as_nanos() as u64;
                stats.busy_ns.fetch_add(busy, Ordering::Relaxed);
                stats
                    .faults
                    .fetch_add(thread_faults() - faults, Ordering::Relaxed);
                used_length(len, stats)
            })?
        } else {
            continue;
        };
        stats.requests.fetch_add(served, Ordering::Relaxed);
        let now = server.stats();
        // The server's counts since the last wake-up, added to the device's.
        let add = |total: &AtomicU64, now: u64, then: u64| {
            total.fetch_add(now - then, Ordering::Relaxed);
        };
        add(&stats.interrupts, now.interrupts, seen.interrupts);
        add(&stats.polled, now.polled, seen.polled);
        add(
            &stats.poll_preempted,
            now.poll_preempted,
            seen.poll_preempted,
        );
        add(
            &stats.poll_backed_off,
            now.poll_backed_off,
            seen.poll_backed_off,
        );
        add(&stats.poll_ran_out, now.poll_ran_out, seen.poll_ran_out);
        add(&stats.poll_cut, now.poll_cut, seen.poll_cut);
        seen = now;
    }
}

/// A chain's used length: what the device wrote, or 0 (counted as malformed) for one it could
/// not serve.
fn used_length(len: Option<u32>, stats: &DeviceStats) -> u32 {
    len.unwrap_or_else(|| {
        stats.malformed.fetch_add(1, Ordering::Relaxed);
        0
    })
}
