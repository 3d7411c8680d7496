//! PCI for the Linux VMM: configuration mechanism #1 (ports 0xcf8/0xcfc) over bus 0, with a host
//! bridge at 00:00.0 and modern virtio-pci functions after it: an entropy device (virtio-rng) and
//! a file-backed block device (virtio-blk).
//!
//! The config space and common-configuration glue is written here: no crate provides it. The
//! notifications are vm-notify's: the queue's notify address is an ioeventfd (`PciNotify`), its
//! interrupt and the configuration interrupt are MSI-X vectors (`MsixVectors`), and the device
//! thread waits on the kick notifier and signals used buffers through the queue's
//! `VirtQueueNotify`. The ring is served with virtio-queue.

use std::fs::File;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vm_notify::msix::{MsixStats, MsixVectors};
use vm_notify::virtio::{PciLayout, PciNotify, VirtQueueNotify, NO_VECTOR};
use vm_notify::Vm;

/// The config address port and the data ports after it.
pub const CONFIG_ADDRESS: u16 = 0xcf8;
pub const CONFIG_DATA: u16 = 0xcfc;

/// Each function's BAR 0 (the first at `BAR0_BASE`, the next `BAR0_SIZE` above): common
/// configuration, ISR, device configuration, notify region, MSI-X table, PBA.
pub const BAR0_BASE: u64 = 0xe000_0000;
pub const BAR0_SIZE: u64 = 0x4000;
/// The MMIO window the host bridge declares (ACPI `_CRS`), holding BAR 0.
pub const MMIO_WINDOW: (u32, u32) = (0xe000_0000, 0xfebf_ffff);
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x1400;
const DEVICE_CFG_LEN: u64 = 0x100;
const NOTIFY: u64 = 0x2000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x3000;
const MSIX_PBA: u64 = 0x3800;
/// Two vectors: Linux puts the configuration interrupt on one and the queue on the other.
const VECTORS: usize = 2;
pub const QUEUE_MAX: u16 = 256;
/// VIRTIO_F_VERSION_1, offered by every function.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_RING_F_EVENT_IDX, offered by every function: the driver says when it wants an
/// interrupt (`used_event`), the device when it wants a kick (`avail_event`).
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// Where the MSI-X capability sits in config space (message control at +2).
const MSIX_CAP: usize = 0x84;

/// What a device did, counted by its thread.
#[derive(Debug, Default)]
pub struct DeviceStats {
    /// Guest notifications read from the kick notifier (after coalescing).
    pub kicks: AtomicU64,
    /// Descriptor chains completed.
    pub requests: AtomicU64,
    /// Bytes moved between the device and guest buffers.
    pub bytes: AtomicU64,
    /// `trigger` calls (one per used buffer the driver asked to hear of).
    pub signals: AtomicU64,
    /// Time the device thread spent completing chains, in nanoseconds.
    pub busy_ns: AtomicU64,
    /// Page faults the device thread took meanwhile (touching guest memory for the first time).
    pub faults: AtomicU64,
}

/// The calling thread's page faults so far (minor and major).
fn thread_faults() -> u64 {
    // SAFETY: an all-zero rusage is a valid value; getrusage fills it or fails and leaves it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage for the call.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    (usage.ru_minflt + usage.ru_majflt) as u64
}

/// What a virtio device behind a [`VirtioPci`] function is.
pub trait VirtioDevice: Send + 'static {
    /// The virtio device type (4 entropy, 2 block).
    const TYPE: u16;
    /// Its name in reports.
    const NAME: &'static str;
    /// The features it offers beyond VERSION_1.
    fn features(&self) -> u64;
    /// Its device configuration space.
    fn config(&self) -> Vec<u8>;
    /// Completes one descriptor chain: returns the bytes written into the chain's writable
    /// buffers (the used length), or `None` to stop.
    fn complete(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        stats: &DeviceStats,
    ) -> Option<u32>;
}

/// The common configuration of the one queue and the device.
struct Common {
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_vector: u16,
    queue_select: u16,
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl Default for Common {
    fn default() -> Self {
        Common {
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_vector: NO_VECTOR,
            queue_select: 0,
            size: QUEUE_MAX,
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

/// A modern virtio-pci function serving one queue of device `D`.
pub struct VirtioPci<D: VirtioDevice> {
    device: Option<D>,
    device_config: Vec<u8>,
    config: [u8; 256],
    bar0: u64,
    /// Which BAR 0 dword was last written all-ones (the size probe).
    bar0_probe: [bool; 2],
    msix: MsixVectors,
    notify: PciNotify,
    common: Common,
    mem: GuestMemoryMmap,
    stats: Arc<DeviceStats>,
    started: bool,
    /// The device's features, kept when its thread takes it.
    offered_at_start: u64,
    /// Whether VIRTIO_RING_F_EVENT_IDX is offered.
    event_idx: bool,
    /// When set, an external vhost-user backend serves the queue instead of the device thread.
    #[cfg(feature = "vhost-user")]
    vhost: Option<vm_notify::vhost_user::VhostUserFrontend>,
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
    /// made on `vm`.
    pub fn new(vm: &Vm, mem: GuestMemoryMmap, bar0: u64, device: D) -> vm_notify::Result<Self> {
        let msix = vm.msix(VECTORS)?;
        let layout = PciLayout {
            notify_base: bar0 + NOTIFY,
            notify_off_multiplier: NOTIFY_MULTIPLIER,
            queue_notify_off: vec![0],
        };
        let notify = vm.virtio_pci(&layout, &msix)?;
        let mut c = [0u8; 256];
        put16(&mut c, 0x00, 0x1af4); // virtio
        put16(&mut c, 0x02, 0x1040 + D::TYPE); // modern virtio, the device type
        put16(&mut c, 0x06, 1 << 4); // status: capabilities list
        c[0x08] = 1; // revision
        c[0x0a] = 0x80; // class: other
        c[0x0b] = 0xff; // (unassigned base class)
        put16(&mut c, 0x2c, 0x1af4);
        put16(&mut c, 0x2e, D::TYPE);
        c[0x34] = 0x40;
        virtio_cap(&mut c, 0x40, 0x50, 16, 1, COMMON, COMMON_LEN);
        virtio_cap(&mut c, 0x50, 0x64, 20, 2, NOTIFY, 0x1000);
        put32(&mut c, 0x50 + 16, NOTIFY_MULTIPLIER);
        virtio_cap(&mut c, 0x64, 0x74, 16, 3, ISR, 4);
        virtio_cap(&mut c, 0x74, MSIX_CAP, 16, 4, DEVICE_CFG, DEVICE_CFG_LEN);
        c[MSIX_CAP] = 0x11; // MSI-X, last in the list
        put32(&mut c, MSIX_CAP + 4, MSIX_TABLE as u32); // table, BIR 0
        put32(&mut c, MSIX_CAP + 8, MSIX_PBA as u32); // PBA, BIR 0
        Ok(VirtioPci {
            device_config: device.config(),
            device: Some(device),
            config: c,
            bar0,
            bar0_probe: [false; 2],
            msix,
            notify,
            common: Common::default(),
            mem,
            stats: Arc::default(),
            started: false,
            offered_at_start: 0,
            event_idx: true,
            #[cfg(feature = "vhost-user")]
            vhost: None,
        })
    }

    /// Offers no VIRTIO_RING_F_EVENT_IDX: the driver kicks and takes interrupts without event
    /// indexes.
    pub fn without_event_idx(mut self) -> Self {
        self.event_idx = false;
        self
    }

    /// Hands the queue to the vhost-user backend behind `frontend` when the driver enables it:
    /// the queue's own kick ioeventfd and its MSI-X vector's eventfd go to the backend, and no
    /// VMM thread is in the path. The guest is offered what the frontend negotiated.
    #[cfg(feature = "vhost-user")]
    pub fn with_vhost(mut self, frontend: vm_notify::vhost_user::VhostUserFrontend) -> Self {
        self.vhost = Some(frontend);
        self
    }

    /// Whether a vhost-user backend serves the queue.
    pub fn is_vhost(&self) -> bool {
        #[cfg(feature = "vhost-user")]
        return self.vhost.is_some();
        #[cfg(not(feature = "vhost-user"))]
        false
    }

    /// BAR 0's base now.
    pub fn bar0(&self) -> u64 {
        self.bar0
    }

    /// The features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.common.driver_features
    }

    /// The queue's MSI-X vector, the configuration vector, and what the vectors did.
    pub fn vectors(&self) -> (u16, u16, MsixStats) {
        let queue = self.notify.queue_vector(0).unwrap_or(NO_VECTOR);
        (queue, self.common.config_vector, self.msix.stats())
    }

    /// The function's MSI-X vectors.
    pub fn msix(&self) -> &MsixVectors {
        &self.msix
    }

    /// What the device thread did.
    pub fn stats(&self) -> &DeviceStats {
        &self.stats
    }

    /// Config space dword `reg` (4-aligned) as the guest reads it.
    pub fn config_read(&self, reg: usize) -> u32 {
        let plain = u32::from_le_bytes([
            self.config[reg],
            self.config[reg + 1],
            self.config[reg + 2],
            self.config[reg + 3],
        ]);
        match reg {
            0x10 if self.bar0_probe[0] => !(BAR0_SIZE as u32 - 1) | 0b100,
            0x10 => (self.bar0 as u32 & !0xf) | 0b100,
            0x14 if self.bar0_probe[1] => 0xffff_ffff,
            0x14 => (self.bar0 >> 32) as u32,
            MSIX_CAP => (plain & 0xffff) | u32::from(self.msix.message_control()) << 16,
            _ => plain,
        }
    }

    /// A guest write of `value` to the bytes of dword `reg` that `mask` selects.
    pub fn config_write(&mut self, reg: usize, value: u32, mask: u32) {
        let merged = (self.config_read(reg) & !mask) | (value & mask);
        match reg {
            0x10 | 0x14 => {
                let half = (reg - 0x10) / 4;
                // The size probe writes all ones; anything else is an address.
                let probe = if half == 0 {
                    merged | 0xf == 0xffff_ffff
                } else {
                    merged == 0xffff_ffff
                };
                self.bar0_probe[half] = probe;
                if !probe {
                    self.bar0 = if half == 0 {
                        (self.bar0 & !0xffff_ffff) | u64::from(merged & !(BAR0_SIZE as u32 - 1))
                    } else {
                        (self.bar0 & 0xffff_ffff) | (u64::from(merged) << 32)
                    };
                }
            }
            MSIX_CAP if mask & 0xffff_0000 != 0 => {
                let _ = self.msix.write_message_control((merged >> 16) as u16);
            }
            // The command register (decoding is always on) and everything else is read-only.
            _ => {}
        }
    }

    /// A guest read in BAR 0 at `offset`.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if (MSIX_TABLE..MSIX_PBA).contains(&offset) {
            let _ = self.msix.table_read(offset - MSIX_TABLE, data);
        } else if offset >= MSIX_PBA {
            let _ = self.msix.pba_read(offset - MSIX_PBA, data);
        } else if offset < COMMON_LEN {
            let n = data.len().min(8);
            data[..n].copy_from_slice(&self.common_read(offset).to_le_bytes()[..n]);
        } else if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&offset) {
            let at = (offset - DEVICE_CFG) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.device_config.get(at + i).copied().unwrap_or(0);
            }
        }
        // ISR reads 0: the interrupts are MSI-X, never INTx.
    }

    /// Whether `offset` in BAR 0 is in the notify region (whose writes are ioeventfds: one that
    /// exits to the VMM is a kick the kernel did not take).
    pub fn is_notify(&self, offset: u64) -> bool {
        (NOTIFY..NOTIFY + 0x1000).contains(&offset)
    }

    /// A guest write in BAR 0 at `offset`. The notify region is an ioeventfd that takes every
    /// write; one that came here anyway is handed to `PciNotify::write`, so it still kicks.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        if self.is_notify(offset) {
            let _ = self.notify.write(self.bar0() + offset, data);
            return;
        }
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let value = u64::from_le_bytes(b);
        if (MSIX_TABLE..MSIX_PBA).contains(&offset) {
            let _ = self.msix.table_write(offset - MSIX_TABLE, data);
        } else if offset < COMMON_LEN {
            self.common_write(offset, value);
        }
    }

    /// Every feature offered.
    fn offered(&self) -> u64 {
        let event_idx = if self.event_idx {
            VIRTIO_RING_F_EVENT_IDX
        } else {
            0
        };
        #[cfg(feature = "vhost-user")]
        if let Some(frontend) = &self.vhost {
            return frontend.features() & (VIRTIO_F_VERSION_1 | event_idx);
        }
        VIRTIO_F_VERSION_1
            | event_idx
            | self
                .device
                .as_ref()
                .map_or(self.offered_at_start, D::features)
    }

    fn common_read(&self, offset: u64) -> u64 {
        let c = &self.common;
        let queue0 = c.queue_select == 0;
        match offset {
            0x00 => c.device_feature_select.into(),
            0x04 => {
                (self.offered() >> (32 * u64::from(c.device_feature_select.min(2)))) & 0xffff_ffff
            }
            0x08 => c.driver_feature_select.into(),
            0x0c => {
                (c.driver_features >> (32 * u64::from(c.driver_feature_select.min(1))))
                    & 0xffff_ffff
            }
            0x10 => c.config_vector.into(),
            0x12 => 1, // num_queues
            0x14 => c.status.into(),
            0x15 => 0, // config_generation
            0x16 => c.queue_select.into(),
            0x18 if queue0 => c.size.into(),
            0x1a if queue0 => self.notify.queue_vector(0).unwrap_or(NO_VECTOR).into(),
            0x1c if queue0 => c.ready.into(),
            0x1e => 0, // queue_notify_off
            0x20 => c.desc & 0xffff_ffff,
            0x24 => c.desc >> 32,
            0x28 => c.driver & 0xffff_ffff,
            0x2c => c.driver >> 32,
            0x30 => c.device & 0xffff_ffff,
            0x34 => c.device >> 32,
            0x1a => NO_VECTOR.into(),
            _ => 0,
        }
    }

    fn common_write(&mut self, offset: u64, value: u64) {
        let lo = |old: u64| (old & !0xffff_ffff) | (value & 0xffff_ffff);
        let hi = |old: u64| (old & 0xffff_ffff) | (value << 32);
        let queue0 = self.common.queue_select == 0;
        match offset {
            0x10 => self.common.config_vector = self.notify.set_config_vector(value as u16),
            0x1a if queue0 => {
                let _ = self.notify.set_queue_vector(0, value as u16);
            }
            0x1c if queue0 && value == 1 => {
                self.common.ready = true;
                self.start();
            }
            0x14 if value == 0 && !self.started => {
                // A reset before the queue ran: back to the initial configuration. (A reset of a
                // running queue is not supported; Linux resets at probe time, before.)
                self.common = Common::default();
                let _ = self.notify.set_queue_vector(0, NO_VECTOR);
            }
            _ => {
                let offered = self.offered();
                let c = &mut self.common;
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
                    0x18 if queue0 => c.size = (value as u16).clamp(1, QUEUE_MAX),
                    0x20 if queue0 => c.desc = lo(c.desc),
                    0x24 if queue0 => c.desc = hi(c.desc),
                    0x28 if queue0 => c.driver = lo(c.driver),
                    0x2c if queue0 => c.driver = hi(c.driver),
                    0x30 if queue0 => c.device = lo(c.device),
                    0x34 if queue0 => c.device = hi(c.device),
                    _ => {}
                }
            }
        }
    }

    /// The queue is ready: its device thread starts serving it.
    fn start(&mut self) {
        if self.started {
            return;
        }
        let (Some(queue), Ok(mut ring)) = (self.notify.queue(0), Queue::new(QUEUE_MAX)) else {
            return;
        };
        #[cfg(feature = "vhost-user")]
        if let Some(frontend) = self.vhost.as_mut() {
            let c = &self.common;
            let vector = self.notify.queue_vector(0).unwrap_or(NO_VECTOR);
            let Ok(call) = self.msix.handle(vector.into()) else {
                return;
            };
            let layout = vm_notify::virtio::VringLayout {
                index: 0,
                size: c.size,
                desc_table: c.desc,
                avail_ring: c.driver,
                used_ring: c.device,
            };
            // The backend learns what the driver accepted (EVENT_IDX among it) before the queue.
            if let Err(e) = frontend.set_acked_features(c.driver_features) {
                eprintln!("linux_vmm: vhost-user SET_FEATURES: {e}");
                return;
            }
            match frontend.start_queue(layout, queue, call) {
                Ok(()) => self.started = true,
                Err(e) => eprintln!("linux_vmm: vhost-user start_queue: {e}"),
            }
            return;
        }
        let Some(device) = self.device.take() else {
            return;
        };
        self.offered_at_start = device.features();
        let c = &self.common;
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        ring.set_size(c.size);
        let (lo, hi) = split(c.desc);
        ring.set_desc_table_address(lo, hi);
        let (lo, hi) = split(c.driver);
        ring.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(c.device);
        ring.set_used_ring_address(lo, hi);
        ring.set_event_idx(c.driver_features & VIRTIO_RING_F_EVENT_IDX != 0);
        ring.set_ready(true);
        let (mem, stats) = (self.mem.clone(), self.stats.clone());
        let spawned = thread::Builder::new()
            .name(D::NAME.into())
            .spawn(move || serve(device, queue, ring, mem, &stats));
        self.started = spawned.is_ok();
    }
}

/// The device thread: each wake-up of the kick notifier, complete every available chain (with
/// kicks suppressed meanwhile, when EVENT_IDX was negotiated), signalling a used buffer only when
/// the driver asked for an interrupt at that point (`used_event`, with EVENT_IDX).
fn serve<D: VirtioDevice>(
    mut device: D,
    queue: VirtQueueNotify,
    mut ring: Queue,
    mem: GuestMemoryMmap,
    stats: &DeviceStats,
) {
    while let Ok(kicks) = queue.kicks().read() {
        stats.kicks.fetch_add(kicks, Ordering::Relaxed);
        loop {
            if ring.disable_notification(&mem).is_err() {
                return;
            }
            while let Some(chain) = ring.pop_descriptor_chain(&mem) {
                let head = chain.head_index();
                let (started, faults) = (std::time::Instant::now(), thread_faults());
                let Some(len) = device.complete(&mem, chain, stats) else {
                    return;
                };
                let busy = started.elapsed().as_nanos() as u64;
                stats.busy_ns.fetch_add(busy, Ordering::Relaxed);
                stats
                    .faults
                    .fetch_add(thread_faults() - faults, Ordering::Relaxed);
                if ring.add_used(&mem, head, len).is_err() {
                    return;
                }
                stats.requests.fetch_add(1, Ordering::Relaxed);
                // Interrupt as soon as the driver asked for it (`used_event`), not after the
                // whole batch: the guest starts on this buffer while the next one is served.
                if ring.needs_notification(&mem).unwrap_or(true) {
                    stats.signals.fetch_add(1, Ordering::Relaxed);
                    let _ = queue.trigger();
                }
            }
            // Kicks back on; a buffer made available meanwhile is served now, not at a kick.
            match ring.enable_notification(&mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(_) => return,
            }
        }
    }
}

/// virtio-rng: fills every writable buffer with bytes from the host's /dev/urandom.
pub struct Rng {
    urandom: File,
    buf: Vec<u8>,
}

impl Rng {
    pub fn new() -> std::io::Result<Rng> {
        Ok(Rng {
            urandom: File::open("/dev/urandom")?,
            buf: vec![0; 4096],
        })
    }
}

impl VirtioDevice for Rng {
    const TYPE: u16 = 4;
    const NAME: &'static str = "virtio-rng";

    fn features(&self) -> u64 {
        0
    }

    fn config(&self) -> Vec<u8> {
        Vec::new()
    }

    fn complete(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        stats: &DeviceStats,
    ) -> Option<u32> {
        let mut len = 0u32;
        for desc in chain.writable() {
            let n = (desc.len() as usize).min(self.buf.len());
            self.urandom.read_exact(&mut self.buf[..n]).ok()?;
            mem.write_slice(&self.buf[..n], desc.addr()).ok()?;
            len += n as u32;
        }
        stats.bytes.fetch_add(u64::from(len), Ordering::Relaxed);
        Some(len)
    }
}

/// The host bridge's config space dword `reg`: an Intel bridge, class 06/00.
pub fn host_bridge_read(reg: usize) -> u32 {
    match reg {
        0x00 => 0x0d57_8086,
        0x08 => 0x0600_0000,
        _ => 0,
    }
}
