//! A virtio-mmio device (virtio 1.x, version 2 of the register layout) with the queues of any
//! [`VirtioDevice`], as Firecracker serves every device: one 0x200-byte register window, found by
//! Linux's `virtio_mmio` driver through the DSDT (`LNRO0005`).
//!
//! What vm-notify does here: `Vm::virtio_mmio` registers each queue's notification (a 4-byte
//! write of its index to `QueueNotify`) as an ioeventfd and makes the device's interrupt, a level
//! line (`LevelIrqFd`) behind `InterruptStatus`. The registers vm-notify owns (`QueueNotify` to
//! `InterruptACK`) are its `IoRegion::mmio_notify`; the rest of the window is this file's. Each
//! queue's device thread serves its ring with `QueueServer`, whose interrupt sets
//! `InterruptStatus` and asserts the line; the guest's handler reads the status and acknowledges
//! it (the line drops), and at its EOI the kernel's resample wakes the thread, which asserts the
//! line again if a status bit is still set.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_mmio as reg;
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::DeviceMmio;
use vm_memory::GuestMemoryMmap;
use vm_notify::io::IoRegion;
use vm_notify::kvm::Gsi;
use vm_notify::virtio::{MmioLayout, MmioNotify};
use vm_notify::Vm;

use crate::lock;
use crate::virtio_pci::{
    stop_workers, DeviceStats, NotifyRegion, QueueConfig, VirtioDevice, Worker, F_EVENT_IDX,
    F_VERSION_1, QUEUE_MAX,
};

/// The register window's size.
pub const WINDOW: u64 = 0x200;
/// Where the first device's window goes, and how far apart the windows are (a page each).
pub const FIRST_BASE: u64 = 0xd000_0000;
pub const WINDOW_STRIDE: u64 = 0x1000;
/// The first device's IOAPIC pin (the next device the next pin): clear of the serial port's 4.
pub const FIRST_GSI: u32 = 5;
/// "virt", the magic value.
const MAGIC: u32 = 0x7472_6976;
/// The register layout of virtio 1.x.
const VERSION: u32 = 2;
const VENDOR: u32 = 0x1af4;
/// vm-notify's registers: `QueueNotify` (0x50) through `InterruptACK` (0x64).
const NOTIFY_REGS: (u64, u64) = (reg::VIRTIO_MMIO_QUEUE_NOTIFY as u64, 0x18);
const CONFIG: u64 = reg::VIRTIO_MMIO_CONFIG as u64;

/// What the guest changes.
struct State<D> {
    devices: Vec<Option<D>>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    queue_sel: u32,
    queues: Vec<QueueConfig>,
    workers: Vec<Option<Worker>>,
    /// When set, an external vhost-user backend serves queue 0, and a VMM thread relays its
    /// calls to the status line (the queue's worker).
    #[cfg(feature = "vhost-user")]
    vhost: Option<vm_notify::vhost_user::VhostUserFrontend>,
}

/// A virtio-mmio device serving the queues of `D`, its window at `base`, its line on `gsi`.
pub struct VirtioMmio<D: VirtioDevice> {
    base: u64,
    gsi: Gsi,
    state: Mutex<State<D>>,
    offered: u64,
    device_config: Vec<u8>,
    notify: Arc<MmioNotify>,
    mem: GuestMemoryMmap,
    stats: Arc<DeviceStats>,
    /// Queue notifications that exited to the VMM (0 while the ioeventfds take them).
    notify_exits: Arc<AtomicU64>,
}

impl<D: VirtioDevice> VirtioMmio<D> {
    /// The device at `base` with its interrupt on `gsi`, its notifications and line made on
    /// `vm`; `event_idx` says whether VIRTIO_RING_F_EVENT_IDX is offered.
    pub fn new(
        vm: &Vm,
        mem: GuestMemoryMmap,
        base: u64,
        gsi: Gsi,
        device: D,
        event_idx: bool,
    ) -> Result<Self, crate::Error> {
        let queues = device.queues();
        let notify = Arc::new(vm.virtio_mmio(&MmioLayout { base, queues, gsi })?);
        let offered = F_VERSION_1 | if event_idx { F_EVENT_IDX } else { 0 } | device.features();
        let device_config = device.config();
        let mut devices = Vec::with_capacity(queues.into());
        for _ in 1..queues {
            devices.push(Some(device.for_queue()?));
        }
        devices.insert(0, Some(device));
        let queue = QueueConfig {
            size: QUEUE_MAX,
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        };
        Ok(VirtioMmio {
            base,
            gsi,
            state: Mutex::new(State {
                devices,
                device_features_sel: 0,
                driver_features_sel: 0,
                driver_features: 0,
                status: 0,
                queue_sel: 0,
                queues: vec![queue; queues.into()],
                workers: (0..queues).map(|_| None).collect(),
                #[cfg(feature = "vhost-user")]
                vhost: None,
            }),
            offered,
            device_config,
            notify,
            mem,
            stats: Arc::default(),
            notify_exits: Arc::default(),
        })
    }

    /// Has `frontend`'s backend serve queue 0 (the entropy queue) instead of a device thread.
    #[cfg(feature = "vhost-user")]
    pub fn with_vhost(self, frontend: vm_notify::vhost_user::VhostUserFrontend) -> Self {
        lock(&self.state).vhost = Some(frontend);
        self
    }

    /// The backend outside the VMM that serves the queue (`vhost-user`), if one does.
    pub fn vhost(&self) -> Option<&'static str> {
        #[cfg(feature = "vhost-user")]
        return lock(&self.state).vhost.is_some().then_some("vhost-user");
        #[cfg(not(feature = "vhost-user"))]
        None
    }

    /// The window's base.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The GSI of its line.
    pub fn gsi(&self) -> Gsi {
        self.gsi
    }

    /// How many queues it has.
    pub fn queues(&self) -> u16 {
        lock(&self.state).queues.len() as u16
    }

    /// The features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        lock(&self.state).driver_features
    }

    /// What the device threads did.
    pub fn stats(&self) -> &DeviceStats {
        &self.stats
    }

    /// The interrupts the guest has taken from the device so far, as the device counts them:
    /// the EOIs that resampled its level line, one per interrupt taken.
    pub fn delivered(self: Arc<Self>) -> crate::console::Delivered {
        Box::new(move || self.stats.resamples.load(Ordering::Relaxed))
    }

    /// Queue notifications that exited to the VMM.
    pub fn notify_exits(&self) -> u64 {
        self.notify_exits.load(Ordering::Relaxed)
    }

    /// The window's parts as vm-device regions: (offset, length, device). vm-notify's
    /// notification registers in the middle; this device's registers around them.
    pub fn regions(self: &Arc<Self>) -> Vec<(u64, u64, Arc<dyn DeviceMmio + Send + Sync>)> {
        let (at, len) = NOTIFY_REGS;
        let notify = NotifyRegion {
            region: IoRegion::mmio_notify(self.notify.clone()),
            exits: self.notify_exits.clone(),
            notify_at: Some(0), // QueueNotify, the region's first register
        };
        vec![
            (0, at, Arc::new(Registers(self.clone())) as _),
            (at, len, Arc::new(notify) as _),
            (
                at + len,
                WINDOW - at - len,
                Arc::new(Registers(self.clone())) as _,
            ),
        ]
    }

    /// Stops every queue's thread and joins it (an error for a queue whose thread never ran).
    pub fn stop(&self) -> Result<(), String> {
        let workers: Vec<_> = lock(&self.state)
            .workers
            .iter_mut()
            .map(Option::take)
            .collect();
        stop_workers(workers, D::NAME)
    }

    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG {
            let at = (offset - CONFIG) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.device_config.get(at + i).copied().unwrap_or(0);
            }
            return;
        }
        let state = lock(&self.state);
        let queue = state.queues.get(state.queue_sel as usize);
        let value: u32 = match offset as u32 {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            reg::VIRTIO_MMIO_VERSION => VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => D::TYPE,
            reg::VIRTIO_MMIO_VENDOR_ID => VENDOR,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => match state.device_features_sel {
                0 => self.offered as u32,
                1 => (self.offered >> 32) as u32,
                _ => 0,
            },
            // No such queue: QueueNumMax 0 tells the driver so.
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |_| QUEUE_MAX.into()),
            reg::VIRTIO_MMIO_QUEUE_READY => queue.is_some_and(|q| q.ready).into(),
            reg::VIRTIO_MMIO_STATUS => state.status,
            reg::VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(b);
        let mut state = lock(&self.state);
        let sel = state.queue_sel as usize;
        let lo = |old: u64| (old & !0xffff_ffff) | u64::from(value);
        let hi = |old: u64| (old & 0xffff_ffff) | (u64::from(value) << 32);
        match offset as u32 {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => state.device_features_sel = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => state.driver_features_sel = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES => {
                let f = match state.driver_features_sel {
                    0 => lo(state.driver_features),
                    1 => hi(state.driver_features),
                    _ => state.driver_features,
                };
                state.driver_features = f & self.offered;
            }
            reg::VIRTIO_MMIO_QUEUE_SEL => state.queue_sel = value,
            reg::VIRTIO_MMIO_STATUS => {
                let running = state.workers.iter().any(Option::is_some);
                if value == 0 && !running {
                    // A reset before the queues ran (Linux resets at probe time).
                    state.driver_features = 0;
                    for q in state.queues.iter_mut() {
                        q.ready = false;
                    }
                }
                state.status = value;
            }
            reg::VIRTIO_MMIO_QUEUE_READY if value == 1 && sel < state.queues.len() => {
                state.queues[sel].ready = true;
                self.start(&mut state, sel as u16);
            }
            other => {
                let Some(q) = state.queues.get_mut(sel) else {
                    return;
                };
                match other {
                    reg::VIRTIO_MMIO_QUEUE_NUM => q.size = (value as u16).clamp(1, QUEUE_MAX),
                    reg::VIRTIO_MMIO_QUEUE_DESC_LOW => q.desc = lo(q.desc),
                    reg::VIRTIO_MMIO_QUEUE_DESC_HIGH => q.desc = hi(q.desc),
                    reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.driver = lo(q.driver),
                    reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => q.driver = hi(q.driver),
                    reg::VIRTIO_MMIO_QUEUE_USED_LOW => q.device = lo(q.device),
                    reg::VIRTIO_MMIO_QUEUE_USED_HIGH => q.device = hi(q.device),
                    _ => {}
                }
            }
        }
    }

    /// Queue `q` is ready: its device thread starts serving it.
    fn start(&self, state: &mut State<D>, q: u16) {
        let i = usize::from(q);
        if state.workers[i].is_some() {
            return;
        }
        let Some(queue) = self.notify.queue(q) else {
            return;
        };
        let (config, features) = (state.queues[i], state.driver_features);
        #[cfg(feature = "vhost-user")]
        if let Some(frontend) = state.vhost.as_mut() {
            let layout = vm_notify::virtio::VringLayout {
                index: q,
                size: config.size,
                desc_table: config.desc,
                avail_ring: config.driver,
                used_ring: config.device,
            };
            let line = self.notify.interrupt().clone();
            let started = frontend
                .set_acked_features(features)
                .map_err(|e| format!("SET_FEATURES: {e}"))
                .and_then(|_| {
                    frontend
                        .start_queue(layout, queue, line.clone())
                        .map_err(|e| format!("start_queue: {e}"))
                })
                .and_then(|relay| {
                    // The status line has no eventfd: the frontend hands the backend one of its
                    // own, and this VMM's thread relays it.
                    let relay = relay.ok_or("the status line took the calls itself")?;
                    crate::virtio_pci::relay_calls(D::NAME, q, relay, line, &self.stats)
                });
            match started {
                Ok(worker) => state.workers[i] = Some(worker),
                Err(e) => eprintln!("linux_vmm: {}: vhost-user: {e}", D::NAME),
            }
            return;
        }
        let (mem, stats) = (&self.mem, &self.stats);
        let resample = Some(self.notify.interrupt().clone());
        match Worker::start(
            q,
            &mut state.devices[i],
            queue,
            &config,
            features,
            None,
            mem,
            stats,
            resample,
        ) {
            Ok(worker) => state.workers[i] = Some(worker),
            Err(e) => eprintln!("linux_vmm: {}: {e}", D::NAME),
        }
    }
}

/// The device's own registers (both parts of the window around vm-notify's).
struct Registers<D: VirtioDevice>(Arc<VirtioMmio<D>>);

impl<D: VirtioDevice> DeviceMmio for Registers<D> {
    fn mmio_read(&self, base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.0.read(base.0 - self.0.base + offset, data);
    }

    fn mmio_write(&self, base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.0.write(base.0 - self.0.base + offset, data);
    }
}
