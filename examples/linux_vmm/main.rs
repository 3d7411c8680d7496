//! A Linux-booting VMM on vm-notify, built the way the crate asks VMMs to be built: every exit is
//! routed once, through a rust-vmm `vm_device::IoManager`; the legacy devices are vm-superio's;
//! each virtio queue is served by vm-notify's `QueueServer` on a device thread the VMM starts,
//! stops and joins; the constants come from virtio-bindings.
//!
//! ```sh
//! cargo run --release --example linux_vmm -- --kernel bzImage --initrd initrd.cpio.gz \
//!     [--disk image] [--vhost-rng socket] [--no-event-idx] [--cmdline "..." | --append "..."] \
//!     [--mem-mib 256] [--timeout-s 120]
//! ```
//!
//! `--vhost-rng` serves the entropy queue from an external vhost-user backend (feature
//! `vhost-user`); `--no-event-idx` offers the drivers no `VIRTIO_RING_F_EVENT_IDX`.
//!
//! The guest's console goes to standard output. The run ends when the guest resets through the
//! keyboard controller (`reboot -f` with `reboot=k`), or at the timeout. The end-of-run figures
//! are one line, `linux_vmm-summary {json}`, which `scripts/linux-guest` parses (how the run
//! ended, the exits, and per device its features, kicks, requests, bytes, MSI-X counts, its
//! deliveries around the guest's `/proc/interrupts` snapshot and how its thread ended).
//!
//! The files, one concern each: `boot.rs` (memory, the boot protocol, the vCPU), `acpi.rs` (the
//! tables), `legacy.rs` (serial, i8042, CMOS), `console.rs` (the console's output), `pci.rs`
//! (bus 0 and configuration mechanism #1), `virtio_pci.rs` (a virtio-pci function and its device
//! thread), and a file per device (`rng.rs`, `blk.rs`): a new device is one file implementing
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
mod pci;
mod rng;
mod virtio_pci;

use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::DeviceMmio;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vm_notify::fallback::Policy;
use vm_notify::Vm;

use pci::PciFunction;
use virtio_pci::{VirtioDevice, VirtioPci};

type Error = Box<dyn std::error::Error>;

/// BAR 0's parts of a function, as `VirtioPci::regions` gives them.
type Regions = Vec<(u64, u64, Arc<dyn DeviceMmio + Send + Sync>)>;

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
    event_idx: bool,
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
        event_idx: true,
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
            "--no-event-idx" => a.event_idx = false,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if a.kernel.as_os_str().is_empty() {
        return Err("--kernel is required".into());
    }
    Ok(a)
}

/// Registers a function's BAR 0 parts at `bar0` (where they stay: see `VirtioPci`'s config
/// space).
fn map_bar(io: &mut IoManager, bar0: u64, regions: &Regions) -> Result<(), Error> {
    for (offset, len, device) in regions {
        io.register_mmio(
            MmioRange::new(MmioAddress(bar0 + offset), *len)?,
            device.clone(),
        )?;
    }
    Ok(())
}

/// A virtio function, as the run loop and the report see it.
trait Function {
    fn name(&self) -> &'static str;
    fn bar0(&self) -> u64;
    fn summary(
        &self,
        snapshot: Option<(u64, Option<u64>)>,
        thread: &Result<(), String>,
    ) -> serde_json::Value;
    fn stop(&self) -> Result<(), String>;
    fn notify_exits(&self) -> u64;
}

impl<D: VirtioDevice> Function for VirtioPci<D> {
    fn name(&self) -> &'static str {
        D::NAME
    }

    fn bar0(&self) -> u64 {
        VirtioPci::bar0(self)
    }

    fn summary(
        &self,
        snapshot: Option<(u64, Option<u64>)>,
        thread: &Result<(), String>,
    ) -> serde_json::Value {
        let stats = self.stats();
        let (queue_vector, config_vector, msix) = self.vectors();
        let features = self.driver_features();
        serde_json::json!({
            "name": D::NAME,
            "vhost_user": self.is_vhost(),
            "features": format!("{features:#x}"),
            "event_idx": features & virtio_pci::F_EVENT_IDX != 0,
            "kicks": stats.kicks.load(Relaxed),
            "requests": stats.requests.load(Relaxed),
            "bytes": stats.bytes.load(Relaxed),
            "malformed": stats.malformed.load(Relaxed),
            "busy_ms": stats.busy_ns.load(Relaxed) as f64 / 1e6,
            "page_faults": stats.faults.load(Relaxed),
            "queue_vector": queue_vector,
            "config_vector": config_vector,
            "msix": {
                "raised": msix.raised,
                "delivered": msix.delivered,
                "raised_while_masked": msix.raised_while_masked,
                "pending_at_unmask": msix.pending_at_unmask,
            },
            "deliveries_around_guest_snapshot": snapshot.map(|(before, after)| {
                serde_json::json!({ "before": before, "after": after })
            }),
            "queue_notify_exits": self.notify_exits(),
            "thread": match thread {
                Ok(()) if self.is_vhost() => "none: the vhost-user backend served the queue".to_string(),
                Ok(()) => "stopped and joined".to_string(),
                Err(e) => format!("error: {e}"),
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

fn main() -> Result<(), Error> {
    let args = args()?;
    let started = Instant::now();
    let kvm = Kvm::new()?;
    let fd = Arc::new(kvm.create_vm()?);
    fd.set_tss_address(0xfffb_d000)?;
    fd.create_irq_chip()?;
    fd.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })?;
    let vm = Vm::new(fd.clone(), Policy::Kernel)?;

    // Memory: one region from 0. With a vhost-user backend, guest memory is a memfd mapped
    // shared, so the backend can map it.
    let mem_size = args.mem_mib << 20;
    let file = match args.vhost_rng {
        Some(_) => Some(vm_memory::FileOffset::new(boot::memfd(mem_size)?, 0)),
        None => None,
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
    let loaded = boot::load_linux(
        &mem,
        mem_size,
        &args.kernel,
        args.initrd.as_deref(),
        &args.cmdline,
    )?;
    let mut vcpu = fd.create_vcpu(0)?;
    boot::setup_vcpu(&kvm, &vcpu, loaded.entry)?;

    // The devices. PCI: the virtio-rng function (00:01.0) and, with --disk, virtio-blk
    // (00:02.0), each with its own BAR 0.
    #[cfg_attr(not(feature = "vhost-user"), allow(unused_mut))]
    let mut rng = VirtioPci::new(
        &vm,
        mem.clone(),
        virtio_pci::BAR0_BASE,
        rng::Rng::new()?,
        args.event_idx,
    )?;
    if let Some(socket) = &args.vhost_rng {
        #[cfg(feature = "vhost-user")]
        {
            let frontend = vm_notify::vhost_user::VhostUserFrontend::connect(
                socket,
                1,
                &mem,
                virtio_pci::F_VERSION_1 | virtio_pci::F_EVENT_IDX,
            )?;
            rng = rng.with_vhost(frontend);
        }
        #[cfg(not(feature = "vhost-user"))]
        return Err(format!(
            "--vhost-rng {}: build with --features vhost-user",
            socket.display()
        )
        .into());
    }
    let rng = Arc::new(rng);
    let blk = match &args.disk {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)?;
            let bar0 = virtio_pci::BAR0_BASE + virtio_pci::BAR0_SIZE;
            let blk = blk::Blk::new(file)?;
            Some(Arc::new(VirtioPci::new(
                &vm,
                mem.clone(),
                bar0,
                blk,
                args.event_idx,
            )?))
        }
        None => None,
    };
    let watched = Arc::new(Mutex::new(console::Watched::default()));
    let mut functions: Vec<(Arc<dyn Function>, Regions)> = vec![(rng.clone(), rng.regions())];
    let mut pci_functions: Vec<Arc<dyn PciFunction>> = vec![rng.clone()];
    if !rng.is_vhost() {
        lock(&watched)
            .devices
            .push((rng.name(), rng.msix().clone()));
    }
    if let Some(blk) = &blk {
        functions.push((blk.clone(), blk.regions()));
        pci_functions.push(blk.clone());
        lock(&watched)
            .devices
            .push((blk.name(), blk.msix().clone()));
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
        map_bar(&mut io, f.bar0(), regions)?;
    }

    eprintln!(
        "linux_vmm: {} MiB, kernel {} ({} bytes at {:#x}), cmdline {:?}",
        args.mem_mib,
        args.kernel.display(),
        loaded.kernel_end - loaded.kernel_load,
        loaded.kernel_load,
        args.cmdline
    );
    let deadline = started + args.timeout;
    let (mut pio_exits, mut mmio_exits) = (0u64, 0u64);
    let outcome = loop {
        if reset.requested() {
            break "reset";
        }
        if Instant::now() > deadline {
            break "timed out";
        }
        match vcpu.run()? {
            VcpuExit::IoOut(port, data) => {
                pio_exits += 1;
                // A port no device claims takes writes and drops them.
                let _ = io.pio_write(PioAddress(port), data);
            }
            VcpuExit::IoIn(port, data) => {
                pio_exits += 1;
                // A port no device claims reads as all ones, as on an ISA bus.
                data.fill(0xff);
                let _ = io.pio_read(PioAddress(port), data);
            }
            VcpuExit::MmioRead(addr, data) => {
                mmio_exits += 1;
                data.fill(0xff);
                let _ = io.mmio_read(MmioAddress(addr), data);
            }
            VcpuExit::MmioWrite(addr, data) => {
                mmio_exits += 1;
                let _ = io.mmio_write(MmioAddress(addr), data);
            }
            VcpuExit::Hlt => break "halted",
            VcpuExit::Shutdown => break "shutdown",
            other => {
                eprintln!("linux_vmm: unexpected exit {other:?}");
                break "unexpected exit";
            }
        }
    };
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
        "devices": devices,
    });
    eprintln!("linux_vmm-summary {summary}");
    match outcome {
        "reset" => Ok(()),
        other => Err(format!("the guest did not reset the machine: {other}").into()),
    }
}
