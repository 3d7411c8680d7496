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
//!     [--disk-direct] [--blk-io uring|sync] [--blk-poll auto|off|MICROS]
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
//! The guest's console goes to standard output. The run ends when the guest resets through the
//! keyboard controller (`reboot -f` with `reboot=k`), or at the timeout. The end-of-run figures
//! are one line, `linux_vmm-summary {json}`, which `scripts/linux-guest` parses (how the run
//! ended, the exits, and per device its features, kicks, requests, bytes, MSI-X counts, its
//! deliveries — MSI-X messages, or the EOIs of its level line — around the guest's
//! `/proc/interrupts` snapshot and how its thread ended).
//!
//! The files, one concern each: `boot.rs` (memory, the boot protocol, the vCPU), `acpi.rs` (the
//! tables), `legacy.rs` (serial, i8042, CMOS), `console.rs` (the console's output), `pci.rs`
//! (bus 0 and configuration mechanism #1), `virtio_pci.rs` (a virtio-pci function and its device
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
mod virtio_mmio;
mod virtio_pci;
#[cfg(feature = "vhost-user")]
mod vsock;

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
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
use virtio_pci::{DeviceStats, VirtioDevice, VirtioPci};

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
    if a.kernel.as_os_str().is_empty() {
        return Err("--kernel is required".into());
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

/// Runs each vCPU on a thread of its own until the first loop ends; then stops the others
/// (kicking them out of `KVM_RUN` until they have) and joins them. Returns how the first ended.
fn run_vcpus(
    vcpus: Vec<kvm_ioctls::VcpuFd>,
    machine: &Arc<Machine>,
) -> Result<&'static str, Error> {
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
                })?,
        );
    }
    // A guest whose vCPUs all wait in the kernel (halted, its timers in KVM's local APICs) makes
    // no exit, so no loop sees the deadline: it is watched here too.
    let left = machine.deadline.saturating_duration_since(Instant::now());
    let outcome = match first.recv_timeout(left) {
        Ok(outcome) => outcome,
        Err(_) => {
            machine.stop.store(true, Ordering::Release);
            "timed out"
        }
    };
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
        thread.join().map_err(|_| "a vCPU thread panicked")?;
    }
    Ok(outcome)
}

fn main() -> Result<(), Error> {
    let args = args()?;
    let started = Instant::now();
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
    let loaded = boot::load_linux(
        &mem,
        mem_size,
        &args.kernel,
        args.initrd.as_deref(),
        &args.cmdline,
        args.vcpus,
        &mmio_slots,
    )?;
    // Every vCPU exists before the first runs: Linux starts the others with IPIs to the APIC IDs
    // the MADT names.
    let mut vcpus = Vec::new();
    for id in 0..args.vcpus {
        let vcpu = fd.create_vcpu(id.into())?;
        match id {
            0 => boot::setup_vcpu(&kvm, &vcpu, loaded.entry, args.vcpus)?,
            _ => boot::set_cpuid(&kvm, &vcpu, id, args.vcpus)?,
        }
        vcpus.push(vcpu);
    }

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
        let mut rng = VirtioPci::new(
            &vm,
            mem.clone(),
            virtio_pci::BAR0_BASE,
            pci::intx_gsi(1),
            rng::Rng::new()?,
            args.event_idx,
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
            let bar0 = virtio_pci::BAR0_BASE + virtio_pci::BAR0_SIZE;
            let blk = VirtioPci::new(
                &vm,
                mem.clone(),
                bar0,
                pci::intx_gsi(2),
                blk,
                args.event_idx,
            );
            let blk = Arc::new(blk?);
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
            let net = VirtioPci::new(
                &vm,
                mem.clone(),
                virtio_pci::BAR0_BASE + slot * virtio_pci::BAR0_SIZE,
                pci::intx_gsi(slot as u8 + 1),
                net::Net,
                args.event_idx,
            )?
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
            let vsock = VirtioPci::new(
                &vm,
                mem.clone(),
                virtio_pci::BAR0_BASE + slot * virtio_pci::BAR0_SIZE,
                pci::intx_gsi(slot as u8 + 1),
                vsock::Vsock { guest_cid: 3 },
                args.event_idx,
            )?
            .with_vhost(virtio_pci::External::User(backend));
            let vsock = Arc::new(vsock);
            functions.push((vsock.clone(), vsock.regions()));
            pci_functions.push(vsock);
        }
    }

    // Every exit is routed once, here.
    let mut io = IoManager::new();
    let serial = legacy::Console::new(
        vm.irqfd(legacy::COM1_GSI)?,
        console::Output::new(watched.clone()),
    );
    io.register_pio(
        PioRange::new(PioAddress(legacy::COM1), 8)?,
        Arc::new(serial),
    )?;
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

    eprintln!(
        "linux_vmm: {} MiB, kernel {} ({} bytes at {:#x}), cmdline {:?}",
        args.mem_mib,
        args.kernel.display(),
        loaded.kernel_end - loaded.kernel_load,
        loaded.kernel_load,
        args.cmdline
    );
    let machine = Arc::new(Machine {
        io,
        ioapic: ioapic.clone(),
        reset,
        stop: AtomicBool::new(false),
        deadline: started + args.timeout,
        pio_exits: AtomicU64::new(0),
        mmio_exits: AtomicU64::new(0),
        handling: (0..args.vcpus).map(|_| AtomicU64::new(0)).collect(),
    });
    let outcome = run_vcpus(vcpus, &machine)?;
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
            let thread = f.stop();
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
        "reset" => Ok(()),
        other => Err(format!("the guest did not reset the machine: {other}").into()),
    }
}
