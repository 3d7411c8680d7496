//! A Linux-booting VMM on vm-notify, built the way the crate asks VMMs to be built: every exit is
//! routed once, through a rust-vmm `vm_device::IoManager`; the legacy devices are vm-superio's;
//! each virtio queue is served by vm-notify's `QueueServer` on a device thread the VMM starts,
//! stops and joins; the constants come from virtio-bindings.
//!
//! ```sh
//! cargo run --release --example linux_vmm -- --kernel bzImage --initrd initrd.cpio.gz \
//!     [--disk image] [--vhost-rng socket] [--net-tap tap0] [--vhost-vsock socket] \
//!     [--no-event-idx] [--cmdline "..." | --append "..."] \
//!     [--mem-mib 256] [--vcpus 1] [--mmio] [--split-irqchip] [--timeout-s 120] \
//!     [--policy kernel|auto|userspace] [--no-ioeventfd] [--blk-moderation off|K,MICROS] \
//!     [--disk-direct] [--blk-io uring|sync] [--blk-poll auto|off|MICROS] \
//!     [--snapshot DIR] [--restore DIR]
//! ```
//!
//! `--vhost-rng` serves the entropy queue from an external vhost-user backend (feature
//! `vhost-user`; on virtio-mmio a device thread relays the backend's calls to the status line,
//! vm-notify's `CallRelay`); `--net-tap NAME` adds a virtio-net function (virtio-pci, MSI-X)
//! whose two queues the host kernel's vhost-net serves on the tap NAME (feature `vhost-net`;
//! vm-notify's `VhostNetFrontend`: no VMM thread, no packet or notification in the VMM);
//! `--vhost-vsock SOCKET` adds a virtio-vsock function (virtio-pci, MSI-X, the guest context 3)
//! whose queues the vhost-user backend at SOCKET serves (rust-vmm's vhost-device-vsock);
//! `--no-event-idx` offers the drivers no `VIRTIO_RING_F_EVENT_IDX`; `--vcpus`
//! (1 to 4) gives the guest that many CPUs, each a thread running its vCPU, all routing their
//! exits through the one `IoManager`; `--mmio` puts the devices on virtio-mmio (described in the
//! DSDT, each interrupting on a level IOAPIC pin) instead of PCI; `--split-irqchip` leaves KVM
//! the local APICs only and serves the IOAPIC from vm-notify (`KVM_CAP_SPLIT_IRQCHIP`). Every
//! PCI function also has INTA#, routed by the DSDT's `_PRT` to its own IOAPIC pin: a guest that
//! leaves MSI-X off (`--append pci=nomsi`) gets its interrupts there, behind the ISR status.
//! `--policy` says where vm-notify puts kicks and interrupts (`kernel`, the default: ioeventfd
//! and irqfd; `userspace`: every kick exits and every interrupt goes through vm-notify's
//! injector thread); `--no-ioeventfd` takes kicks as exits but leaves interrupts in the kernel.
//! `--blk-moderation K,MICROS` has the block queue's `QueueServer` hold up to K interrupts for at
//! most MICROS while more requests wait in the ring (`off`, the default: none held).
//! `--disk-direct` opens the disk image with `O_DIRECT`, past the host's page cache. The block
//! device moves its data through an io_uring per queue (`--blk-io sync`: a synchronous
//! `preadv`/`pwritev` per request instead), and its queue's server watches the ring for up to
//! 1 ms (a self-tuning window) before asking the driver for kicks again, where the host has a
//! CPU to spare for that (`--blk-poll auto`; `off`, or a window in microseconds). These
//! defaults are what measured fastest under fio (`scripts/linux-bench`, docs/PERFORMANCE.md).
//!
//! `--snapshot DIR` moves the guest out: on `SIGUSR1` the VMM pauses it, lets the devices finish
//! what they began, saves the machine in DIR (its memory, each vCPU, the irqchip — KVM's, or on
//! the split irqchip vm-notify's IOAPIC — the clock, the serial port and each virtio-pci
//! function with vm-notify's notification state) and exits; `--restore DIR` (with the same
//! devices, vCPUs and memory, no kernel) runs the guest saved there on (`snapshot.rs`). Both
//! take virtio-pci devices the VMM serves only.
//!
//! The guest's console goes to standard output. The run ends when the guest resets through the
//! keyboard controller (`reboot -f` with `reboot=k`), or at the timeout. The end-of-run figures
//! are one line, `linux_vmm-summary {json}`, which `scripts/linux-guest` parses (how the run
//! ended, the exits, and per device its features, kicks, requests, bytes, MSI-X counts, its
//! deliveries — MSI-X messages, or the EOIs of its level line — around the guest's
//! `/proc/interrupts` snapshot and how its thread ended).
//!
//! The files, one concern each: `boot.rs` (memory, the boot protocol, the vCPU), `acpi.rs` (the
//! tables), `legacy.rs` (serial, i8042, CMOS), `console.rs` (the console's output), `pci.rs`
//! (bus 0 and configuration mechanism #1), `snapshot.rs` (saving and restoring the machine),
//! `virtio_pci.rs` (a virtio-pci function and its device
//! thread), and a file per device (`rng.rs`, `blk.rs`, `net.rs`, `vsock.rs`): a new device is one file implementing
//! `virtio_pci::VirtioDevice` and two lines here.
//!
//! Linux cannot boot on the instruction-emulating `/dev/kvm` of this project's machines; it boots
//! on hardware KVM, and here one level down, inside a QEMU TCG guest whose kvm_amd provides
//! `/dev/kvm` (see `scripts/linux-guest`).

mod acpi;
mod blk;
mod boot;
mod console;
mod legacy;
#[cfg(feature = "vhost-net")]
mod net;
mod pci;
mod rng;
mod snapshot;
mod virtio_mmio;
mod virtio_pci;
#[cfg(feature = "vhost-user")]
mod vsock;

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::{self, Relaxed};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::DeviceMmio;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vm_notify::fallback::Policy;
use vm_notify::io::IoRegion;
use vm_notify::irqchip::{Ioapic, IOAPIC_BASE, IOAPIC_SIZE};
use vm_notify::virtio::Moderation;
use vm_notify::{Capability, Vm};

use pci::PciFunction;
use virtio_mmio::VirtioMmio;
use virtio_pci::{DeviceStats, Saved, VirtioDevice, VirtioPci};

type Error = Box<dyn std::error::Error>;

/// BAR 0's parts of a function, as `VirtioPci::regions` gives them.
type Regions = Vec<(u64, u64, Arc<dyn DeviceMmio + Send + Sync>)>;

const MAX_VCPUS: u8 = 4;
/// The longest ring-polling window of `--blk-poll auto`.
const BLK_POLL_MAX: Duration = Duration::from_millis(1);

const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 \
     i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Args {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: String,
    mem_mib: u64,
    timeout: Duration,
    disk: Option<PathBuf>,
    vhost_rng: Option<PathBuf>,
    net_tap: Option<String>,
    vhost_vsock: Option<PathBuf>,
    event_idx: bool,
    vcpus: u8,
    mmio: bool,
    split_irqchip: bool,
    policy: Policy,
    ioeventfd: bool,
    blk_moderation: Option<Moderation>,
    disk_direct: bool,
    blk_io: blk::BlkIo,
    /// `None`: decided at start (`--blk-poll auto`).
    blk_poll: Option<Option<Duration>>,
    /// `--snapshot DIR`: on SIGUSR1, pause the guest, save it here and exit.
    snapshot: Option<PathBuf>,
    /// `--restore DIR`: run the guest saved there instead of booting.
    restore: Option<PathBuf>,
}

fn args() -> Result<Args, Error> {
    let mut a = Args {
        kernel: PathBuf::new(),
        initrd: None,
        cmdline: DEFAULT_CMDLINE.into(),
        mem_mib: 256,
        timeout: Duration::from_secs(120),
        disk: None,
        vhost_rng: None,
        net_tap: None,
        vhost_vsock: None,
        event_idx: true,
        vcpus: 1,
        mmio: false,
        split_irqchip: false,
        policy: Policy::Kernel,
        ioeventfd: true,
        blk_moderation: None,
        disk_direct: false,
        blk_io: blk::BlkIo::Uring,
        blk_poll: None,
        snapshot: None,
        restore: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--kernel" => a.kernel = value()?.into(),
            "--initrd" => a.initrd = Some(value()?.into()),
            "--cmdline" => a.cmdline = value()?,
            "--append" => a.cmdline = format!("{} {}", a.cmdline, value()?),
            "--mem-mib" => a.mem_mib = value()?.parse()?,
            "--timeout-s" => a.timeout = Duration::from_secs(value()?.parse()?),
            "--disk" => a.disk = Some(value()?.into()),
            "--vhost-rng" => a.vhost_rng = Some(value()?.into()),
            "--net-tap" => a.net_tap = Some(value()?),
            "--vhost-vsock" => a.vhost_vsock = Some(value()?.into()),
            "--no-event-idx" => a.event_idx = false,
            "--vcpus" => a.vcpus = value()?.parse()?,
            "--mmio" => a.mmio = true,
            "--split-irqchip" => a.split_irqchip = true,
            "--policy" => {
                a.policy = match value()?.as_str() {
                    "kernel" => Policy::Kernel,
                    "auto" => Policy::Auto,
                    "userspace" => Policy::Userspace,
                    other => {
                        return Err(format!("--policy {other}: kernel, auto or userspace").into())
                    }
                }
            }
            "--no-ioeventfd" => a.ioeventfd = false,
            "--blk-moderation" => a.blk_moderation = moderation(&value()?)?,
            "--disk-direct" => a.disk_direct = true,
            "--snapshot" => a.snapshot = Some(value()?.into()),
            "--restore" => a.restore = Some(value()?.into()),
            "--blk-poll" => {
                a.blk_poll = match value()?.as_str() {
                    "auto" => None,
                    "off" => Some(None),
                    micros => Some(Some(Duration::from_micros(micros.parse()?))),
                }
            }
            "--blk-io" => {
                a.blk_io = match value()?.as_str() {
                    "sync" => blk::BlkIo::Sync,
                    "uring" => blk::BlkIo::Uring,
                    other => return Err(format!("--blk-io {other}: sync or uring").into()),
                }
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if a.kernel.as_os_str().is_empty() && a.restore.is_none() {
        return Err("--kernel is required (or --restore)".into());
    }
    let moving = a.snapshot.is_some() || a.restore.is_some();
    let external = a.vhost_rng.is_some() || a.net_tap.is_some() || a.vhost_vsock.is_some();
    if moving && (a.mmio || external) {
        return Err(
            "--snapshot, --restore: virtio-pci devices the VMM serves only (no --mmio, no vhost)"
                .into(),
        );
    }
    if !(1..=MAX_VCPUS).contains(&a.vcpus) {
        return Err(format!("--vcpus {}: 1 to {MAX_VCPUS}", a.vcpus).into());
    }
    #[cfg(not(feature = "vhost-user"))]
    if let Some(socket) = &a.vhost_rng {
        return Err(format!(
            "--vhost-rng {}: build with --features vhost-user",
            socket.display()
        )
        .into());
    }
    #[cfg(not(feature = "vhost-net"))]
    if let Some(tap) = &a.net_tap {
        return Err(format!("--net-tap {tap}: build with --features vhost-net").into());
    }
    #[cfg(not(feature = "vhost-user"))]
    if let Some(socket) = &a.vhost_vsock {
        return Err(format!(
            "--vhost-vsock {}: build with --features vhost-user",
            socket.display()
        )
        .into());
    }
    if a.mmio && (a.net_tap.is_some() || a.vhost_vsock.is_some()) {
        return Err("--net-tap, --vhost-vsock: on virtio-pci only (leave out --mmio)".into());
    }
    if !a.ioeventfd && a.policy == Policy::Kernel {
        // Kicks go where the kernel cannot take them: the exits.
        a.policy = Policy::Auto;
    }
    Ok(a)
}

/// `--vhost-rng`'s backend, connected (with the entropy device's features on offer); `None`
/// without the flag.
#[cfg(feature = "vhost-user")]
fn vhost_rng(
    args: &Args,
    mem: &vm_memory::GuestMemoryMmap,
) -> Result<Option<vm_notify::vhost_user::VhostUserFrontend>, Error> {
    let features = virtio_pci::F_VERSION_1 | virtio_pci::F_EVENT_IDX;
    let Some(socket) = &args.vhost_rng else {
        return Ok(None);
    };
    Ok(Some(vm_notify::vhost_user::VhostUserFrontend::connect(
        socket, 1, mem, features,
    )?))
}

/// The block queues' ring polling: as `--blk-poll` says, or with `auto` (the default) up to
/// `BLK_POLL_MAX` where the host has a CPU beyond the vCPUs for the device thread to watch the
/// ring on, and none where it has not (there the watching thread would keep a vCPU from
/// running, and the driver from making the requests it waits for).
fn blk_poll(flag: Option<Option<Duration>>, vcpus: u8) -> Option<Duration> {
    flag.unwrap_or_else(|| {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        (cpus > usize::from(vcpus)).then_some(BLK_POLL_MAX)
    })
}

/// `--blk-moderation`: `off`, or `K,MICROS` (at most K interrupts held, none for longer).
fn moderation(value: &str) -> Result<Option<Moderation>, Error> {
    if value == "off" {
        return Ok(None);
    }
    let (held, micros) = value
        .split_once(',')
        .ok_or(format!("--blk-moderation {value}: off or K,MICROS"))?;
    Ok(Some(Moderation {
        max_held: held.parse()?,
        budget: Duration::from_micros(micros.parse()?),
    }))
}

/// The virtio-pci function in PCI slot `slot + 1` (its BAR 0 and INTx pin follow from the
/// slot): new, or restored from `saved`.
fn pci_function<D: VirtioDevice>(
    vm: &Vm,
    mem: &vm_memory::GuestMemoryMmap,
    slot: u64,
    device: D,
    event_idx: bool,
    saved: Option<&Saved>,
) -> Result<VirtioPci<D>, Error> {
    let bar0 = virtio_pci::BAR0_BASE + slot * virtio_pci::BAR0_SIZE;
    let intx = pci::intx_gsi(slot as u8 + 1);
    VirtioPci::new(vm, mem.clone(), bar0, intx, device, event_idx, saved)
}

/// Registers a device's MMIO parts at `base` (a function's BAR 0, where it stays: see
/// `VirtioPci`'s config space; a virtio-mmio device's window).
fn map_regions(io: &mut IoManager, base: u64, regions: &Regions) -> Result<(), Error> {
    for (offset, len, device) in regions {
        io.register_mmio(
            MmioRange::new(MmioAddress(base + offset), *len)?,
            device.clone(),
        )?;
    }
    Ok(())
}

/// A virtio device (a PCI function or a virtio-mmio device), as the run loop and the report see it.
trait Function {
    fn name(&self) -> &'static str;
    /// Where its MMIO parts start: BAR 0, or the virtio-mmio window.
    fn base(&self) -> u64;
    /// What its threads did.
    fn stats(&self) -> &DeviceStats;
    /// The features the driver accepted.
    fn driver_features(&self) -> u64;
    fn queues(&self) -> u16;
    /// The backend outside the VMM that served it (`vhost-user`, `vhost-net`), if one did (then
    /// it has no device thread).
    fn vhost(&self) -> Option<&'static str>;
    /// The figures only its transport has, as a JSON object.
    fn transport_figures(&self) -> serde_json::Value;
    fn stop(&self) -> Result<(), String>;
    /// Saves it, its vCPUs paused: its threads finish what they began and stop.
    fn save(&self) -> Result<Saved, String>;
    fn notify_exits(&self) -> u64;

    /// Its end-of-run figures: what its threads did, its deliveries around the guest's
    /// `/proc/interrupts` snapshot, its queue-notify exits, how its threads ended, and its
    /// transport's own figures.
    fn summary(
        &self,
        snapshot: Option<(u64, Option<u64>)>,
        thread: &Result<(), String>,
    ) -> serde_json::Value {
        let (stats, features) = (self.stats(), self.driver_features());
        let mut figures = serde_json::json!({
            "name": self.name(),
            "vhost_user": self.vhost() == Some("vhost-user"),
            "backend": self.vhost().unwrap_or("vmm"),
            "features": format!("{features:#x}"),
            "queues": self.queues(),
            "event_idx": features & virtio_pci::F_EVENT_IDX != 0,
            "kicks": stats.kicks.load(Relaxed),
            "requests": stats.requests.load(Relaxed),
            "bytes": stats.bytes.load(Relaxed),
            "malformed": stats.malformed.load(Relaxed),
            "interrupts": stats.interrupts.load(Relaxed),
            "resamples": stats.resamples.load(Relaxed),
            "reasserts": stats.reasserts.load(Relaxed),
            "polled": stats.polled.load(Relaxed),
            "poll_preempted": stats.poll_preempted.load(Relaxed),
            "poll_backed_off": stats.poll_backed_off.load(Relaxed),
            "poll_ran_out": stats.poll_ran_out.load(Relaxed),
            "poll_cut": stats.poll_cut.load(Relaxed),
            "relayed_calls": stats.relayed_calls.load(Relaxed),
            "drained": stats.drained.load(Relaxed),
            "reads": stats.reads.load(Relaxed),
            "writes": stats.writes.load(Relaxed),
            "flushes": stats.flushes.load(Relaxed),
            "deliveries_around_guest_snapshot": snapshot.map(|(before, after)| {
                serde_json::json!({ "before": before, "after": after })
            }),
            "queue_notify_exits": self.notify_exits(),
            "thread": match (thread, self.vhost()) {
                // virtio-mmio: a VMM thread relayed the backend's calls to the status line.
                (Ok(()), Some(backend)) if stats.relayed_calls.load(Relaxed) > 0 => {
                    format!("the {backend} backend served the queue; its calls' relay stopped and joined")
                }
                (Ok(()), Some(backend)) => format!("none: the {backend} backend served the queues"),
                (Ok(()), None) => "stopped and joined".to_string(),
                (Err(e), _) => format!("error: {e}"),
            },
        });
        if let (Some(all), serde_json::Value::Object(own)) =
            (figures.as_object_mut(), self.transport_figures())
        {
            all.extend(own);
        }
        figures
    }
}

impl<D: VirtioDevice> Function for VirtioPci<D> {
    fn name(&self) -> &'static str {
        D::NAME
    }

    fn base(&self) -> u64 {
        VirtioPci::bar0(self)
    }

    fn stats(&self) -> &DeviceStats {
        VirtioPci::stats(self)
    }

    fn driver_features(&self) -> u64 {
        VirtioPci::driver_features(self)
    }

    fn queues(&self) -> u16 {
        VirtioPci::queues(self)
    }

    fn vhost(&self) -> Option<&'static str> {
        VirtioPci::vhost(self)
    }

    fn transport_figures(&self) -> serde_json::Value {
        let stats = VirtioPci::stats(self);
        let (queue_vector, config_vector, msix) = self.vectors();
        serde_json::json!({
            "transport": "pci",
            "busy_ms": stats.busy_ns.load(Relaxed) as f64 / 1e6,
            "page_faults": stats.faults.load(Relaxed),
            "queue_vector": queue_vector,
            "config_vector": config_vector,
            "interrupt": if self.msix_enabled() { "msi-x" } else { "intx" },
            "msix": {
                "raised": msix.raised,
                "delivered": msix.delivered,
                "raised_while_masked": msix.raised_while_masked,
                "pending_at_unmask": msix.pending_at_unmask,
            },
        })
    }

    fn stop(&self) -> Result<(), String> {
        VirtioPci::stop(self)
    }

    fn save(&self) -> Result<Saved, String> {
        VirtioPci::save(self)
    }

    fn notify_exits(&self) -> u64 {
        VirtioPci::notify_exits(self)
    }
}

impl<D: VirtioDevice> Function for VirtioMmio<D> {
    fn name(&self) -> &'static str {
        D::NAME
    }

    fn base(&self) -> u64 {
        VirtioMmio::base(self)
    }

    fn stats(&self) -> &DeviceStats {
        VirtioMmio::stats(self)
    }

    fn driver_features(&self) -> u64 {
        VirtioMmio::driver_features(self)
    }

    fn queues(&self) -> u16 {
        VirtioMmio::queues(self)
    }

    fn vhost(&self) -> Option<&'static str> {
        VirtioMmio::vhost(self)
    }

    fn transport_figures(&self) -> serde_json::Value {
        serde_json::json!({ "transport": "mmio", "gsi": self.gsi() })
    }

    fn stop(&self) -> Result<(), String> {
        VirtioMmio::stop(self)
    }

    fn save(&self) -> Result<Saved, String> {
        Err(format!("{}: virtio-mmio devices are not saved", D::NAME))
    }

    fn notify_exits(&self) -> u64 {
        VirtioMmio::notify_exits(self)
    }
}

/// What the vCPU threads share: every exit's routing, the reset line, the stop and the counts.
struct Machine {
    io: IoManager,
    /// The split irqchip's IOAPIC, which takes the guest's EOIs of level interrupts.
    ioapic: Option<Ioapic>,
    reset: legacy::Reset,
    /// Set when one vCPU's loop ended: the others end theirs.
    stop: AtomicBool,
    /// Set to pause the guest for a snapshot: each loop completes its vCPU's last exit and ends.
    pause: AtomicBool,
    deadline: Instant,
    pio_exits: AtomicU64,
    mmio_exits: AtomicU64,
    /// Per vCPU, the exit its thread is handling (`Handling`), 0 while it runs the guest: what a
    /// thread that never came back was doing.
    handling: Vec<AtomicU64>,
}

/// The exit a vCPU thread is handling, packed for `Machine::handling`: the kind in the top
/// byte, the address, port or vector below.
struct Handling;

impl Handling {
    const PIO: u64 = 1 << 56;
    const MMIO_READ: u64 = 2 << 56;
    const MMIO_WRITE: u64 = 3 << 56;
    const IOAPIC_EOI: u64 = 4 << 56;

    fn describe(v: u64) -> String {
        let at = v & ((1 << 56) - 1);
        match v & !((1 << 56) - 1) {
            0 => "running the guest".into(),
            Self::PIO => format!("port {at:#x}"),
            Self::MMIO_READ => format!("an MMIO read at {at:#x}"),
            Self::MMIO_WRITE => format!("an MMIO write at {at:#x}"),
            Self::IOAPIC_EOI => format!("the IOAPIC EOI of vector {at:#x}"),
            _ => format!("{v:#x}"),
        }
    }
}

/// The signal that takes a vCPU thread out of `KVM_RUN` (its handler does nothing: the ioctl
/// returns `EINTR` and the loop looks at `Machine::stop`).
fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: i32, _: *mut libc::siginfo_t, _: *mut std::ffi::c_void) {}

/// One vCPU's loop: runs it and routes its exits until the guest resets, something ends the run,
/// or another vCPU's loop ended. Returns how it ended.
fn run_vcpu(id: usize, vcpu: &mut kvm_ioctls::VcpuFd, m: &Machine) -> &'static str {
    loop {
        if m.pause.load(Ordering::Acquire) {
            // KVM completes the exit the vCPU made (an MMIO or port read's data) at the next
            // KVM_RUN, before it looks at `immediate_exit`: then the vCPU's state is whole.
            vcpu.set_kvm_immediate_exit(1);
            let completed = vcpu.run().err().map(|e| e.errno());
            vcpu.set_kvm_immediate_exit(0);
            if completed == Some(libc::EINTR) {
                break "paused";
            }
            eprintln!("linux_vmm: vCPU {id}: completing its last exit: {completed:?}");
            break "KVM_RUN failed";
        }
        if m.reset.requested() {
            break "reset";
        }
        if m.stop.load(Ordering::Acquire) {
            break "stopped";
        }
        if Instant::now() > m.deadline {
            break "timed out";
        }
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            // Kicked (or another signal): look at the stop flag again. A CPU Linux has not
            // started yet waits in KVM_RUN and returns EAGAIN when an event wakes it (its INIT
            // and start-up IPIs among them): run it again.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => {
                eprintln!("linux_vmm: KVM_RUN: {e}");
                break "KVM_RUN failed";
            }
        };
        let doing = match &exit {
            VcpuExit::IoOut(port, _) | VcpuExit::IoIn(port, _) => Handling::PIO | u64::from(*port),
            VcpuExit::MmioRead(addr, _) => Handling::MMIO_READ | addr,
            VcpuExit::MmioWrite(addr, _) => Handling::MMIO_WRITE | addr,
            VcpuExit::IoapicEoi(vector) => Handling::IOAPIC_EOI | u64::from(*vector),
            _ => 0,
        };
        m.handling[id].store(doing, Relaxed);
        match exit {
            VcpuExit::IoOut(port, data) => {
                m.pio_exits.fetch_add(1, Relaxed);
                // A port no device claims takes writes and drops them.
                let _ = m.io.pio_write(PioAddress(port), data);
            }
            VcpuExit::IoIn(port, data) => {
                m.pio_exits.fetch_add(1, Relaxed);
                // A port no device claims reads as all ones, as on an ISA bus.
                data.fill(0xff);
                let _ = m.io.pio_read(PioAddress(port), data);
            }
            VcpuExit::MmioRead(addr, data) => {
                m.mmio_exits.fetch_add(1, Relaxed);
                data.fill(0xff);
                let _ = m.io.mmio_read(MmioAddress(addr), data);
            }
            VcpuExit::MmioWrite(addr, data) => {
                m.mmio_exits.fetch_add(1, Relaxed);
                let _ = m.io.mmio_write(MmioAddress(addr), data);
            }
            VcpuExit::IoapicEoi(vector) => {
                if let Some(Err(e)) = m.ioapic.as_ref().map(|io| io.end_of_interrupt(vector)) {
                    eprintln!("linux_vmm: IOAPIC EOI of vector {vector:#x}: {e}");
                }
            }
            VcpuExit::Hlt => break "halted",
            VcpuExit::Shutdown => {
                // A triple fault: where the CPU was, for the report.
                match (vcpu.get_regs(), vcpu.get_sregs()) {
                    (Ok(r), Ok(s)) => eprintln!(
                        "linux_vmm: vCPU {id} shut down (triple fault) at rip {:#x}, rsp {:#x}, \
                         cr2 {:#x}, cr3 {:#x}, idt {:#x}+{:#x}",
                        r.rip, r.rsp, s.cr2, s.cr3, s.idt.base, s.idt.limit
                    ),
                    _ => eprintln!("linux_vmm: vCPU {id} shut down (triple fault)"),
                }
                break "shutdown";
            }
            other => {
                eprintln!("linux_vmm: unexpected exit {other:?}");
                break "unexpected exit";
            }
        }
        m.handling[id].store(0, Relaxed);
    }
}

/// A vCPU whose loop ended, with how.
type Ended = (&'static str, kvm_ioctls::VcpuFd);

/// Runs each vCPU on a thread of its own until the first loop ends, or until `SIGUSR1` asks for
/// a pause (with `pausable`); then stops the others (kicking them out of `KVM_RUN` until they
/// have) and joins them. Returns how the first ended ("paused" for a pause) and the vCPUs, each
/// with how its own loop ended.
fn run_vcpus(
    vcpus: Vec<kvm_ioctls::VcpuFd>,
    machine: &Arc<Machine>,
    pausable: bool,
) -> Result<(&'static str, Vec<Ended>), Error> {
    // `on_kick` does nothing, which is async-signal-safe.
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)?;
    let (ended, first) = std::sync::mpsc::channel();
    let mut threads = Vec::new();
    for (id, mut vcpu) in vcpus.into_iter().enumerate() {
        let (m, ended) = (machine.clone(), ended.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let outcome = run_vcpu(id, &mut vcpu, &m);
                    m.stop.store(true, Ordering::Release);
                    let _ = ended.send(outcome);
                    (outcome, vcpu)
                })?,
        );
    }
    // A guest whose vCPUs all wait in the kernel (halted, its timers in KVM's local APICs) makes
    // no exit, so no loop sees the deadline: it is watched here too.
    // A pause is asked for by a signal, which this thread looks for between waits.
    let outcome = loop {
        let left = machine.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            machine.stop.store(true, Ordering::Release);
            break "timed out";
        }
        if pausable && snapshot::requested() {
            machine.pause.store(true, Ordering::Release);
            break "paused";
        }
        match first.recv_timeout(left.min(Duration::from_millis(20))) {
            Ok(outcome) => break outcome,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break "ended",
        }
    };
    let mut ended = Vec::with_capacity(threads.len());
    for (id, thread) in threads.into_iter().enumerate() {
        // A vCPU halted in the guest stays in KVM_RUN until a signal: kick until it has left.
        // One that does not leave within 10 s is stuck in the VMM, not in the guest: say where,
        // and end the process (its thread cannot be joined).
        let kicked = Instant::now();
        while !thread.is_finished() {
            use vmm_sys_util::signal::Killable;
            if kicked.elapsed() > Duration::from_secs(10) {
                let doing = Handling::describe(machine.handling[id].load(Relaxed));
                eprintln!("linux_vmm: vCPU {id} did not stop in 10 s: its thread is stuck handling {doing}");
                let _ = io::stdout().flush();
                std::process::exit(3);
            }
            let _ = thread.kill(kick_signal());
            std::thread::sleep(Duration::from_millis(1));
        }
        ended.push(thread.join().map_err(|_| "a vCPU thread panicked")?);
    }
    Ok((outcome, ended))
}

/// The machine's parts a save reads besides the vCPUs and devices.
struct Guest<'a> {
    kvm: &'a Kvm,
    fd: &'a kvm_ioctls::VmFd,
    ioapic: Option<&'a Ioapic>,
    mem: &'a vm_memory::GuestMemoryMmap,
    mem_bytes: u64,
}

/// What a save did, for the summary.
struct SaveReport {
    /// The guest's moves before this one.
    moves: u32,
    /// Level interrupts the guest had EOIed whose EOI exit the pause kept (split irqchip),
    /// completed here.
    eois_completed: u32,
    /// MSRs saved per vCPU.
    msrs: Vec<usize>,
    /// Per vCPU, its APIC ID and the vectors its local APIC held when saved: requested, in
    /// service.
    lapic_held: Vec<(u8, Vec<u8>, Vec<u8>)>,
    /// Per function, its running queues as the save left them (`Saved::rings_at_save`).
    rings: Vec<(&'static str, Vec<serde_json::Value>)>,
    /// Per function, the requests it completed after the vCPUs had paused (the guest's
    /// requests in flight at the pause), and the kicks it had not read when it was saved.
    in_flight: Vec<(&'static str, u64, u64)>,
    /// How long the save took.
    ms: f64,
}

/// Saves the paused guest in `dir`, in the order `snapshot.rs` gives: the split irqchip's
/// EOIs the pause kept, the devices (their threads finish what they began and stop), then the
/// vCPUs, the irqchip, the clock, the serial port and memory.
fn save_guest<W: Write + Send>(
    dir: &Path,
    guest: &Guest,
    vcpus: &[Ended],
    functions: &[(Arc<dyn Function>, Regions)],
    serial: &legacy::Console<W>,
    moves: u32,
) -> Result<SaveReport, Error> {
    let began = Instant::now();
    if let Some((ended, _)) = vcpus.iter().find(|(ended, _)| *ended != "paused") {
        return Err(format!("a vCPU did not pause: its loop ended {ended}").into());
    }
    let vcpus: Vec<&kvm_ioctls::VcpuFd> = vcpus.iter().map(|(_, vcpu)| vcpu).collect();
    // Where a save that never ends stopped: a line per step.
    eprintln!("linux_vmm: save: the vCPUs are paused");
    let eois_completed = match guest.ioapic {
        Some(ioapic) => snapshot::complete_eois(ioapic, &vcpus)?,
        None => 0,
    };
    let mut saved = Vec::with_capacity(functions.len());
    let mut in_flight = Vec::with_capacity(functions.len());
    for (f, _) in functions {
        let before = f.stats().requests.load(Relaxed);
        let function = f.save()?;
        let unread = function.unread_kicks();
        in_flight.push((f.name(), f.stats().requests.load(Relaxed) - before, unread));
        saved.push(function);
        eprintln!("linux_vmm: save: {} saved", f.name());
    }
    // The devices' last interrupts reach the local APICs through their irqfds, which KVM may
    // inject from a work item: let it run before the local APICs are read.
    std::thread::sleep(Duration::from_millis(20));
    let msr_indices = snapshot::msr_indices(guest.kvm)?;
    let states = vcpus
        .iter()
        .map(|vcpu| snapshot::save_vcpu(vcpu, &msr_indices))
        .collect::<Result<Vec<_>, _>>()?;
    eprintln!("linux_vmm: save: the vCPUs saved");
    let state = snapshot::MachineState {
        mem_bytes: guest.mem_bytes,
        vcpus: states,
        chips: snapshot::save_chips(guest.fd, guest.ioapic)?,
        clock: snapshot::save_clock(guest.fd)?,
        serial: serial.state(),
        functions: saved,
        moves,
    };
    eprintln!("linux_vmm: save: the irqchip, the clock and the serial port saved");
    snapshot::write(dir, &state, guest.mem)?;
    Ok(SaveReport {
        moves,
        eois_completed,
        msrs: state.vcpus.iter().map(snapshot::VcpuState::msrs).collect(),
        lapic_held: state
            .vcpus
            .iter()
            .map(|v| {
                let (irr, isr) = v.interrupts_held();
                (v.apic_id(), irr, isr)
            })
            .collect(),
        rings: functions
            .iter()
            .zip(&state.functions)
            .map(|((f, _), saved)| (f.name(), saved.rings_at_save(guest.mem)))
            .collect(),
        in_flight,
        ms: began.elapsed().as_secs_f64() * 1e3,
    })
}

fn main() -> Result<(), Error> {
    let args = args()?;
    let started = Instant::now();
    // A guest saved by another process: it runs on from there.
    let restored = args
        .restore
        .as_deref()
        .map(snapshot::read_state)
        .transpose()?;
    if args.snapshot.is_some() {
        snapshot::on_signal()?;
    }
    let kvm = Kvm::new()?;
    let fd = Arc::new(kvm.create_vm()?);
    fd.set_tss_address(0xfffb_d000)?;
    // The irqchip: KVM's (local APICs, IOAPIC and PIC, with a PIT), or split (KVM keeps the
    // local APICs, the IOAPIC is vm-notify's in userspace, there is no PIC or PIT: the guest's
    // hardware-reduced ACPI asks for no legacy timer).
    let vm = if args.split_irqchip {
        Vm::with_split_irqchip(fd.clone(), args.policy)?
    } else {
        fd.create_irq_chip()?;
        fd.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })?;
        Vm::new(fd.clone(), args.policy)?
    };
    let vm = match args.ioeventfd {
        true => vm,
        false => vm.disable(Capability::IoEventFd),
    };

    // Memory: one region from 0. With a vhost-user backend, guest memory is a memfd mapped
    // shared, so the backend can map it.
    let mem_size = args.mem_mib << 20;
    let file = match args.vhost_rng.is_some() || args.vhost_vsock.is_some() {
        true => Some(vm_memory::FileOffset::new(boot::memfd(mem_size)?, 0)),
        false => None,
    };
    let mem = boot::guest_memory(mem_size as usize, file)?;
    let host = mem.get_host_address(GuestAddress(0))?;
    // SAFETY: `host` is the start of a `mem_size` mapping owned by `mem`, which lives until the
    // end of `main`, after the last KVM_RUN.
    unsafe {
        fd.set_user_memory_region(kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: mem_size,
            userspace_addr: host as u64,
        })?;
    }
    // With --mmio, the devices' windows and lines (the DSDT describes them): the entropy device
    // first, then the disk.
    let mmio_slots: Vec<(u64, u32)> = match args.mmio {
        true => (0..1 + u32::from(args.disk.is_some()))
            .map(|i| {
                (
                    virtio_mmio::FIRST_BASE + u64::from(i) * virtio_mmio::WINDOW_STRIDE,
                    virtio_mmio::FIRST_GSI + i,
                )
            })
            .collect(),
        false => Vec::new(),
    };
    let loaded = match (&restored, &args.restore) {
        (Some(saved), Some(dir)) => {
            if saved.vcpus.len() != usize::from(args.vcpus) || saved.mem_bytes != mem_size {
                return Err(format!(
                    "--restore: the guest was saved with {} vCPUs and {} MiB",
                    saved.vcpus.len(),
                    saved.mem_bytes >> 20
                )
                .into());
            }
            snapshot::read_memory(dir, &mem)?;
            eprintln!("linux_vmm: restore: memory read");
            fd.set_clock(&saved.clock)?;
            snapshot::restore_kernel_chips(&fd, &saved.chips)?;
            None
        }
        _ => Some(boot::load_linux(
            &mem,
            mem_size,
            &args.kernel,
            args.initrd.as_deref(),
            &args.cmdline,
            args.vcpus,
            &mmio_slots,
        )?),
    };
    // Every vCPU exists before the first runs: Linux starts the others with IPIs to the APIC IDs
    // the MADT names.
    let mut vcpus = Vec::new();
    let mut msrs_refused = 0;
    for id in 0..args.vcpus {
        let vcpu = fd.create_vcpu(id.into())?;
        match (&loaded, &restored) {
            (Some(loaded), _) if id == 0 => {
                boot::setup_vcpu(&kvm, &vcpu, loaded.entry, args.vcpus)?
            }
            (_, Some(saved)) => {
                boot::set_cpuid(&kvm, &vcpu, id, args.vcpus)?;
                msrs_refused += snapshot::restore_vcpu(&vcpu, &saved.vcpus[usize::from(id)])?;
            }
            _ => boot::set_cpuid(&kvm, &vcpu, id, args.vcpus)?,
        }
        vcpus.push(vcpu);
    }
    if let Some(saved) = &restored {
        eprintln!("linux_vmm: restore: the vCPUs restored");
        snapshot::restore_split(vm.ioapic(), &saved.chips)?;
    }
    // A restored function takes its saved state, in the order the functions are made.
    let saved_function = |slot: usize| -> Result<Option<&Saved>, Error> {
        match &restored {
            None => Ok(None),
            Some(saved) => match saved.functions.get(slot) {
                Some(function) => Ok(Some(function)),
                None => Err(format!("--restore: no saved function {slot}").into()),
            },
        }
    };

    // The devices: virtio-rng and, with --disk, virtio-blk (a request queue per vCPU, as QEMU
    // and Cloud Hypervisor give SMP guests). On PCI: functions 00:01.0 and 00:02.0, each with its
    // own BAR 0; with --mmio: virtio-mmio windows the DSDT describes.
    let disk = match &args.disk {
        Some(path) => {
            let direct = if args.disk_direct { libc::O_DIRECT } else { 0 };
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(direct)
                .open(path)?;
            Some(blk::Blk::new(
                file,
                args.vcpus.into(),
                args.blk_moderation,
                blk_poll(args.blk_poll, args.vcpus),
                args.blk_io,
            )?)
        }
        None => None,
    };
    let watched = Arc::new(Mutex::new(console::Watched::default()));
    let mut functions: Vec<(Arc<dyn Function>, Regions)> = Vec::new();
    let mut pci_functions: Vec<Arc<dyn PciFunction>> = Vec::new();
    if args.mmio {
        let (base, gsi) = mmio_slots[0];
        #[cfg_attr(not(feature = "vhost-user"), allow(unused_mut))]
        let mut rng = VirtioMmio::new(
            &vm,
            mem.clone(),
            base,
            gsi,
            rng::Rng::new()?,
            args.event_idx,
        )?;
        #[cfg(feature = "vhost-user")]
        if let Some(frontend) = vhost_rng(&args, &mem)? {
            rng = rng.with_vhost(frontend);
        }
        let rng = Arc::new(rng);
        functions.push((rng.clone(), rng.regions()));
        lock(&watched)
            .devices
            .push((rng.name(), rng.clone().delivered()));
        if let (Some(blk), Some(&(base, gsi))) = (disk, mmio_slots.get(1)) {
            let blk = Arc::new(VirtioMmio::new(
                &vm,
                mem.clone(),
                base,
                gsi,
                blk,
                args.event_idx,
            )?);
            functions.push((blk.clone(), blk.regions()));
            lock(&watched)
                .devices
                .push((blk.name(), blk.clone().delivered()));
        }
    } else {
        #[cfg_attr(not(feature = "vhost-user"), allow(unused_mut))]
        let mut rng = pci_function(
            &vm,
            &mem,
            0,
            rng::Rng::new()?,
            args.event_idx,
            saved_function(0)?,
        )?;
        #[cfg(feature = "vhost-user")]
        if let Some(frontend) = vhost_rng(&args, &mem)? {
            rng = rng.with_vhost(virtio_pci::External::User(frontend));
        }
        let rng = Arc::new(rng);
        functions.push((rng.clone(), rng.regions()));
        pci_functions.push(rng.clone());
        if rng.vhost().is_none() {
            lock(&watched)
                .devices
                .push((rng.name(), rng.clone().delivered()));
        }
        if let Some(blk) = disk {
            let blk = pci_function(&vm, &mem, 1, blk, args.event_idx, saved_function(1)?)?;
            let blk = Arc::new(blk);
            functions.push((blk.clone(), blk.regions()));
            pci_functions.push(blk.clone());
            lock(&watched)
                .devices
                .push((blk.name(), blk.clone().delivered()));
        }
        // virtio-net on the next function, its queues served by the host kernel's vhost-net on
        // the tap: no device thread, and nothing of it in the console's delivery report.
        #[cfg(feature = "vhost-net")]
        if let Some(tap) = &args.net_tap {
            let slot = pci_functions.len() as u64;
            let tap = net::open_tap(tap).map_err(|e| format!("--net-tap {tap}: {e}"))?;
            // The ring features the guest may have: those vhost-net offers among these.
            let ring_features =
                virtio_pci::F_VERSION_1 | virtio_pci::F_EVENT_IDX | virtio_pci::F_INDIRECT_DESC;
            let backend = vm_notify::vhost_net::VhostNetFrontend::open(&mem, tap, ring_features)?;
            let net = pci_function(&vm, &mem, slot, net::Net, args.event_idx, None)?
                .with_vhost(virtio_pci::External::Net(backend));
            let net = Arc::new(net);
            functions.push((net.clone(), net.regions()));
            pci_functions.push(net);
        }
        // virtio-vsock on the next function, its queues served by the vhost-user backend at
        // the socket (the guest is context 3).
        #[cfg(feature = "vhost-user")]
        if let Some(socket) = &args.vhost_vsock {
            let slot = pci_functions.len() as u64;
            let ring_features = virtio_pci::F_VERSION_1 | virtio_pci::F_EVENT_IDX;
            let backend =
                vm_notify::vhost_user::VhostUserFrontend::connect(socket, 3, &mem, ring_features)?;
            let vsock = vsock::Vsock { guest_cid: 3 };
            let vsock = pci_function(&vm, &mem, slot, vsock, args.event_idx, None)?
                .with_vhost(virtio_pci::External::User(backend));
            let vsock = Arc::new(vsock);
            functions.push((vsock.clone(), vsock.regions()));
            pci_functions.push(vsock);
        }
    }

    if restored.is_some() {
        eprintln!("linux_vmm: restore: the devices restored");
    }
    // Every exit is routed once, here.
    let mut io = IoManager::new();
    let (serial_irq, output) = (
        vm.irqfd(legacy::COM1_GSI)?,
        console::Output::new(watched.clone()),
    );
    let serial = Arc::new(match &restored {
        Some(saved) => legacy::Console::restore(serial_irq, output, &saved.serial)?,
        None => legacy::Console::new(serial_irq, output),
    });
    io.register_pio(PioRange::new(PioAddress(legacy::COM1), 8)?, serial.clone())?;
    let reset = legacy::Reset::default();
    let keyboard = legacy::Keyboard::new(reset.clone());
    io.register_pio(
        PioRange::new(PioAddress(legacy::I8042), 5)?,
        Arc::new(keyboard),
    )?;
    io.register_pio(
        PioRange::new(PioAddress(legacy::CMOS), 2)?,
        Arc::new(legacy::Cmos),
    )?;
    let pci = Arc::new(pci::PciBus::new(pci_functions));
    io.register_pio(
        PioRange::new(PioAddress(pci::CONFIG_ADDRESS), 8)?,
        pci.clone(),
    )?;
    for (f, regions) in &functions {
        map_regions(&mut io, f.base(), regions)?;
    }
    // On the split irqchip: the IOAPIC's window, and the injector that serves its pins (the
    // interrupts of the serial port and the virtio-mmio lines), a thread this VMM runs; the
    // injector also runs when --policy places interrupts in userspace.
    let ioapic = vm.ioapic().cloned();
    if let Some(ioapic) = &ioapic {
        io.register_mmio(
            MmioRange::new(MmioAddress(IOAPIC_BASE), IOAPIC_SIZE)?,
            Arc::new(IoRegion::ioapic(ioapic)),
        )?;
    }
    let injector = match ioapic.is_some() || args.policy != Policy::Kernel {
        true => Some(vm.injector()?.spawn()?),
        false => None,
    };

    // How long the restore took, from the start of the process to the guest's first instruction.
    let restore_ms = started.elapsed().as_secs_f64() * 1e3;
    if let Some(saved) = &restored {
        if saved.functions.len() != functions.len() {
            return Err(format!(
                "--restore: {} functions saved, {} made",
                saved.functions.len(),
                functions.len()
            )
            .into());
        }
    }
    match &loaded {
        Some(loaded) => eprintln!(
            "linux_vmm: {} MiB, kernel {} ({} bytes at {:#x}), cmdline {:?}",
            args.mem_mib,
            args.kernel.display(),
            loaded.kernel_end - loaded.kernel_load,
            loaded.kernel_load,
            args.cmdline
        ),
        None => eprintln!(
            "linux_vmm: {} MiB, restored from {} (moved {} times before), {msrs_refused} MSRs refused",
            args.mem_mib,
            args.restore.as_deref().unwrap_or(Path::new("")).display(),
            restored.as_ref().map_or(0, |s| s.moves),
        ),
    }
    let machine = Arc::new(Machine {
        io,
        ioapic: ioapic.clone(),
        reset,
        stop: AtomicBool::new(false),
        pause: AtomicBool::new(false),
        deadline: started + args.timeout,
        pio_exits: AtomicU64::new(0),
        mmio_exits: AtomicU64::new(0),
        handling: (0..args.vcpus).map(|_| AtomicU64::new(0)).collect(),
    });
    let (mut outcome, vcpus) = run_vcpus(vcpus, &machine, args.snapshot.is_some())?;
    // A pause saves the guest (while the injector still serves the split irqchip's pins: the
    // devices' last completions may raise a level line); how each function's threads ended is
    // its save's outcome.
    let mut saved = None;
    if let (Some(dir), "paused") = (&args.snapshot, outcome) {
        let moves = restored.as_ref().map_or(0, |s| s.moves + 1);
        let guest = Guest {
            kvm: &kvm,
            fd: &fd,
            ioapic: ioapic.as_ref(),
            mem: &mem,
            mem_bytes: mem_size,
        };
        let threads = save_guest(dir, &guest, &vcpus, &functions, &serial, moves)?;
        outcome = "saved";
        saved = Some(threads);
    }
    let injector = injector.map(|thread| thread.stop().map_err(|e| e.to_string()));
    let (pio_exits, mmio_exits) = (
        machine.pio_exits.load(Relaxed),
        machine.mmio_exits.load(Relaxed),
    );
    io::stdout().flush()?;

    // The device threads stop and are joined; how each ended goes into the summary.
    let snapshot = lock(&watched).snapshot.clone();
    let devices: Vec<serde_json::Value> = functions
        .iter()
        .map(|(f, _)| {
            // A saved function's threads were stopped by its save, which succeeded.
            let thread = match &saved {
                Some(_) => Ok(()),
                None => f.stop(),
            };
            if let Err(e) = &thread {
                eprintln!("linux_vmm: {}: {e}", f.name());
            }
            let around = snapshot
                .iter()
                .find(|(name, _, _)| *name == f.name())
                .map(|&(_, before, after)| (before, after));
            f.summary(around, &thread)
        })
        .collect();
    let queue_notify_exits: u64 = functions.iter().map(|(f, _)| f.notify_exits()).sum();
    let summary = serde_json::json!({
        "outcome": outcome,
        "moved": restored.as_ref().map(|s| serde_json::json!({
            "moves_before": s.moves,
            "msrs_refused": msrs_refused,
            "ms": restore_ms,
        })),
        "saved": saved.as_ref().map(|s| serde_json::json!({
            "moves": s.moves,
            "vcpus": vcpus.iter().map(|(ended, _)| *ended).collect::<Vec<_>>(),
            "eois_completed": s.eois_completed,
            "msrs": s.msrs,
            "lapics": s.lapic_held.iter().map(|(id, irr, isr)| serde_json::json!({
                "apic_id": id, "irr": irr, "isr": isr,
            })).collect::<Vec<_>>(),
            "rings": s.rings.iter().map(|(name, rings)| serde_json::json!({
                "name": name, "queues": rings,
            })).collect::<Vec<_>>(),
            "ms": s.ms,
            "in_flight": s.in_flight.iter().map(|(name, completed, unread)| serde_json::json!({
                "name": name,
                "completed_after_pause": completed,
                "unread_kicks": unread,
            })).collect::<Vec<_>>(),
        })),
        "seconds": started.elapsed().as_secs_f64(),
        "exits": { "pio": pio_exits, "mmio": mmio_exits },
        "queue_notify_exits": queue_notify_exits,
        "policy": format!("{:?}", args.policy),
        "ioeventfd": args.ioeventfd,
        "devices": devices,
        "irqchip": match &ioapic {
            None => serde_json::json!({
                "kind": "in-kernel",
                "injector": injector.as_ref().map(|stopped| match stopped {
                    Ok(()) => "stopped and joined".to_string(),
                    Err(e) => format!("error: {e}"),
                }),
            }),
            Some(io) => {
                let st = io.stats();
                serde_json::json!({
                    "kind": "split",
                    "ioapic": {
                        "delivered": st.delivered,
                        "not_taken": st.not_taken,
                        "eois": st.eois,
                        "resamples": st.resamples,
                        "route_commits": st.route_commits,
                        "failed": st.failed,
                    },
                    "injector": injector.as_ref().map(|stopped| match stopped {
                        Ok(()) => "stopped and joined".to_string(),
                        Err(e) => format!("error: {e}"),
                    }),
                })
            }
        },
    });
    eprintln!("linux_vmm-summary {summary}");
    match outcome {
        "reset" | "saved" => Ok(()),
        other => Err(format!("the guest did not reset the machine: {other}").into()),
    }
}
