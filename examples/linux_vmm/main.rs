//! A Linux-booting VMM on vm-notify: boots a stock bzImage with an initramfs on one vCPU, with an
//! 8250 serial console (vm-superio) whose interrupt is a vm-notify irqfd on GSI 4, and modern
//! virtio-pci entropy and block devices (`pci.rs`, `blk.rs`) whose queue notifies are ioeventfds
//! and whose interrupts are MSI-X vectors, all through vm-notify's `Vm` root. The kernel, the
//! initramfs and the command line are arguments:
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
//! keyboard controller (`reboot -f` with `reboot=k`), or at the timeout; the last lines say how
//! the run ended, the exits seen, and what each device did (kicks, requests, bytes, MSI-X
//! deliveries, queue-notify exits).
//!
//! The machine: RAM from 0, ACPI tables (RSDP, XSDT, a hardware-reduced FADT, a DSDT declaring
//! COM1, a MADT with the local APIC and the IOAPIC) pointed at by the zero page, the in-kernel
//! irqchip and PIT, CPUID from `KVM_GET_SUPPORTED_CPUID` with the hypervisor bit (so Linux uses
//! kvmclock), and the 64-bit boot protocol. Ports other than COM1 read as 0xff (CMOS as 0); the
//! keyboard controller's reset ends the run. PCI: configuration mechanism #1, a host bridge and
//! the virtio-rng function, declared to Linux through the DSDT's `PCI0`.
//!
//! Linux cannot boot on the instruction-emulating `/dev/kvm` of this project's machines; it boots
//! on hardware KVM, and here one level down, inside a QEMU TCG guest whose kvm_amd provides
//! `/dev/kvm` (see `scripts/linux-guest`).

mod blk;
mod pci;

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_pit_config, kvm_regs, kvm_segment, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{bzimage::BzImage, load_cmdline, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vm_notify::fallback::Policy;
use vm_notify::msix::MsixVectors;
use vm_notify::{IrqFd, Vm};

type Error = Box<dyn std::error::Error>;

/// Guest-physical layout of the boot structures (below 1 MiB, as the boot protocol wants).
const GDT: u64 = 0x500;
const IDT: u64 = 0x520;
const ZERO_PAGE: u64 = 0x7000;
const BOOT_STACK: u64 = 0x8ff0;
const PML4: u64 = 0x9000;
const PDPT: u64 = 0xa000;
const PD: u64 = 0xb000;
const CMDLINE: u64 = 0x20000;
const CMDLINE_MAX: usize = 0x10000;
const EBDA_START: u64 = 0x9fc00;
const HIMEM: u64 = 0x10_0000;
/// Where the ACPI tables go (the BIOS area Linux would scan; the zero page points at the RSDP).
const ACPI_TABLES: u64 = 0xe_0000;
const IOAPIC_ADDRESS: u32 = 0xfec0_0000;
const LAPIC_ADDRESS: u32 = 0xfee0_0000;
/// The serial port's base and its legacy interrupt line.
const COM1: u16 = 0x3f8;
const COM1_GSI: u32 = 4;
/// The CMOS/RTC data port.
const CMOS_DATA: u16 = 0x71;
/// The keyboard controller's command port: 0xfe there resets the machine.
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 \
     i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

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

/// The 8250's interrupt: a vm-notify edge irqfd on GSI 4.
struct SerialIrq(IrqFd);

impl vm_superio::Trigger for SerialIrq {
    type E = vm_notify::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.trigger()
    }
}

/// Identity-maps the first GiB with 2 MiB pages and writes a flat 64-bit GDT.
fn write_tables(mem: &GuestMemoryMmap) -> Result<(), Error> {
    mem.write_obj(PDPT | 0x3, GuestAddress(PML4))?;
    mem.write_obj(PD | 0x3, GuestAddress(PDPT))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD + i * 8))?;
    }
    // null, 64-bit code, data, TSS (unused but present, as the CPU checks TR).
    let gdt: [u64; 4] = [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x0080_8b00_0000_ffff,
    ];
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT))?;
    Ok(())
}

fn segment(selector: u16, type_: u8, s: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(type_ != 0xb && selector != 0x8),
        s,
        l: u8::from(selector == 0x8),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Writes RSDP, XSDT, a hardware-reduced FADT with an empty DSDT, and a MADT naming the one
/// local APIC and the IOAPIC; returns the RSDP's address.
fn write_acpi(mem: &GuestMemoryMmap) -> Result<u64, Error> {
    use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic};
    use acpi_tables::{aml, fadt, madt, rsdp, sdt, xsdt, Aml};
    const OEM: [u8; 6] = *b"VMNTFY";
    const TABLE: [u8; 8] = *b"LINUXVMM";
    let bytes = |table: &dyn Aml| {
        let mut v = Vec::new();
        table.to_aml_bytes(&mut v);
        v
    };
    let mut at = ACPI_TABLES + 0x40; // the RSDP first
    let mut place = |data: Vec<u8>| -> Result<u64, Error> {
        let here = at;
        mem.write_slice(&data, GuestAddress(here))?;
        at = (here + data.len() as u64 + 7) & !7;
        Ok(here)
    };
    // The DSDT declares COM1 (with a hardware-reduced FADT Linux sets up no legacy IRQs, so the
    // serial port's interrupt comes from here).
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let irq = aml::Interrupt::new(true, true, false, false, COM1_GSI);
    let ports = aml::IO::new(COM1, COM1, 1, 8);
    let crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![&irq, &ports]),
    );
    let com1 = aml::Device::new("_SB_.COM1".into(), vec![&hid, &uid, &crs]);
    // The PCI host bridge: bus 0, config ports 0xcf8-0xcff, the I/O ports around them, and the
    // MMIO window the virtio-pci BAR sits in.
    let pci_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A03"));
    let pci_adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let pci_seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let pci_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let pci_bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let config_ports = aml::IO::new(pci::CONFIG_ADDRESS, pci::CONFIG_ADDRESS, 1, 8);
    let io_low = aml::AddressSpace::new_io(0u16, 0xcf7u16, None);
    let io_high = aml::AddressSpace::new_io(0xd00u16, 0xffffu16, None);
    let window = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        pci::MMIO_WINDOW.0,
        pci::MMIO_WINDOW.1,
        None,
    );
    let pci_res = aml::ResourceTemplate::new(vec![&bus, &config_ports, &io_low, &io_high, &window]);
    let pci_crs = aml::Name::new("_CRS".into(), &pci_res);
    let pci0 = aml::Device::new(
        "_SB_.PCI0".into(),
        vec![&pci_hid, &pci_adr, &pci_seg, &pci_uid, &pci_bbn, &pci_crs],
    );
    let mut dsdt = sdt::Sdt::new(*b"DSDT", 36, 6, OEM, TABLE, 1);
    dsdt.append_slice(&bytes(&com1));
    dsdt.append_slice(&bytes(&pci0));
    let dsdt = place(dsdt.as_slice().to_vec())?;
    let fadt = fadt::FADTBuilder::new(OEM, TABLE, 1)
        .flag(fadt::Flags::HwReducedAcpi)
        .dsdt_64(dsdt)
        .finalize();
    let fadt = place(bytes(&fadt))?;
    let mut madt = madt::MADT::new(
        OEM,
        TABLE,
        1,
        LocalInterruptController::Address(LAPIC_ADDRESS),
    );
    madt.add_structure(ProcessorLocalApic::new(0, 0, EnabledStatus::Enabled));
    madt.add_structure(IoApic::new(0, IOAPIC_ADDRESS, 0));
    // MADT flags bit 0, PCAT_COMPAT: the dual 8259s are there too, so Linux maps the ISA IRQs
    // (the serial port's 4) one to one onto IOAPIC pins. The crate has no setter for the flags:
    // set the bit in the bytes and take it out of the checksum.
    let mut madt = bytes(&madt);
    madt[40] |= 1;
    madt[9] = madt[9].wrapping_sub(1);
    let madt = place(madt)?;
    let mut xsdt = xsdt::XSDT::new(OEM, TABLE, 1);
    xsdt.add_entry(fadt);
    xsdt.add_entry(madt);
    let xsdt = place(bytes(&xsdt))?;
    mem.write_slice(
        &bytes(&rsdp::Rsdp::new(OEM, xsdt)),
        GuestAddress(ACPI_TABLES),
    )?;
    Ok(ACPI_TABLES)
}

/// Long mode, paging on, at the kernel's 64-bit entry with the zero page in `rsi`.
fn setup_vcpu(kvm: &Kvm, vcpu: &VcpuFd, entry: u64) -> Result<(), Error> {
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    for e in cpuid.as_mut_slice() {
        if e.function == 1 {
            // Running under a hypervisor: Linux then finds KVM's leaves (kvmclock).
            e.ecx |= 1 << 31;
        }
    }
    vcpu.set_cpuid2(&cpuid)?;

    let mut sregs = vcpu.get_sregs()?;
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = IDT;
    sregs.idt.limit = 7;
    sregs.cs = segment(0x8, 0xb, 1);
    let data = segment(0x10, 0x3, 1);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment(0x18, 0xb, 0);
    sregs.cr3 = PML4;
    sregs.cr4 |= 1 << 5; // PAE
    sregs.cr0 |= 0x8000_0001; // PG | PE
    sregs.efer |= 0x500; // LME | LMA
    vcpu.set_sregs(&sregs)?;

    vcpu.set_fpu(&kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    })?;
    let msrs = Msrs::from_entries(&[
        // IA32_APIC_BASE: the LAPIC at its default address, enabled, this the bootstrap CPU.
        kvm_msr_entry {
            index: 0x1b,
            data: 0xfee0_0000 | (1 << 11) | (1 << 8),
            ..Default::default()
        },
        // IA32_MISC_ENABLE: fast strings.
        kvm_msr_entry {
            index: 0x1a0,
            data: 1,
            ..Default::default()
        },
        // MTRR default type: MTRRs enabled, write-back.
        kvm_msr_entry {
            index: 0x2ff,
            data: (1 << 11) | 6,
            ..Default::default()
        },
    ])?;
    vcpu.set_msrs(&msrs)?;

    vcpu.set_regs(&kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        ..Default::default()
    })?;

    // LINT0 takes the PIC's ExtINT, LINT1 NMIs, as on a PC.
    let mut lapic = vcpu.get_lapic()?;
    let set = |regs: &mut [std::os::raw::c_char], offset: usize, mode: u32| {
        let mut b = [0u8; 4];
        for (i, v) in b.iter_mut().enumerate() {
            *v = regs[offset + i] as u8;
        }
        let value = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, v) in value.to_le_bytes().iter().enumerate() {
            regs[offset + i] = *v as std::os::raw::c_char;
        }
    };
    set(&mut lapic.regs, 0x350, 7);
    set(&mut lapic.regs, 0x360, 4);
    vcpu.set_lapic(&lapic)?;
    Ok(())
}

/// A memfd of `size` bytes, for guest memory another process can map.
fn memfd(size: u64) -> Result<File, Error> {
    // SAFETY: the name is a NUL-terminated string; memfd_create returns a new descriptor or -1,
    // which is checked before the descriptor is owned.
    let fd = unsafe { libc::memfd_create(c"linux_vmm guest memory".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error().into());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

/// Guest memory from address 0: `size` bytes, anonymous or `file`'s, mapped at a 2 MiB-aligned
/// host address. KVM maps a guest page with one 2 MiB nested page-table entry only where the host
/// address and the guest address agree modulo 2 MiB and the host page is huge (here
/// transparently, asked for with MADV_HUGEPAGE); with a 4 KiB-aligned mapping every first touch of
/// guest memory costs a fault per 4 KiB. The mapping lives until the process exits.
fn guest_memory(
    size: usize,
    file: Option<vm_memory::FileOffset>,
) -> Result<GuestMemoryMmap, Error> {
    const HUGE: usize = 2 << 20;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: a fresh reservation anywhere (no MAP_FIXED) touches no existing mapping; the
    // result is checked.
    let reserved = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size + HUGE,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if reserved == libc::MAP_FAILED {
        return Err(io::Error::last_os_error().into());
    }
    let start = (reserved as usize).next_multiple_of(HUGE);
    let (fd, flags) = match &file {
        Some(f) => (std::os::fd::AsRawFd::as_raw_fd(f.file()), libc::MAP_SHARED),
        None => (
            -1,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        ),
    };
    // SAFETY: `start..start + size` lies inside the reservation made above, which nothing else
    // uses, so MAP_FIXED replaces only it; the result is checked.
    let addr = unsafe { libc::mmap(start as *mut _, size, rw, flags | libc::MAP_FIXED, fd, 0) };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error().into());
    }
    let (head, tail) = (
        start - reserved as usize,
        HUGE - (start - reserved as usize),
    );
    // SAFETY: the head and tail are the parts of the reservation outside the guest memory;
    // nothing refers to them. A failure only leaves reserved address space behind.
    unsafe {
        if head > 0 {
            libc::munmap(reserved, head);
        }
        if tail > 0 {
            libc::munmap((start + size) as *mut _, tail);
        }
        libc::madvise(addr, size, libc::MADV_HUGEPAGE);
    }
    let builder = vm_memory::mmap::MmapRegionBuilder::new(size)
        .with_mmap_prot(rw)
        .with_mmap_flags(flags);
    let builder = match file {
        Some(f) => builder.with_file_offset(f),
        None => builder,
    };
    // SAFETY: `addr..addr + size` is the mapping made above, which stays for the process's life.
    let region = unsafe { builder.with_raw_mmap_pointer(addr.cast()) }.build()?;
    let region = vm_memory::GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or("guest memory does not fit the guest address space")?;
    Ok(GuestMemoryMmap::from_regions(vec![region])?)
}

/// The offset of `addr` in the BAR 0 at `bar0`, if it is inside.
fn in_bar(bar0: u64, addr: u64) -> Option<u64> {
    addr.checked_sub(bar0).filter(|&o| o < pci::BAR0_SIZE)
}

/// Which function and dword a config data access at `port` reaches: `Some((device, reg))` on bus
/// 0 function 0 with the enable bit set, and the byte shift of the port within the dword.
fn config_target(address: u32, port: u16) -> (Option<(u32, usize)>, u32) {
    let shift = 8 * u32::from(port - pci::CONFIG_DATA);
    let enabled = address & (1 << 31) != 0;
    let (bus, device, function) = (
        (address >> 16) & 0xff,
        (address >> 11) & 0x1f,
        (address >> 8) & 7,
    );
    let reg = (address & 0xfc) as usize;
    let target = (enabled && bus == 0 && function == 0 && device <= 2).then_some((device, reg));
    (target, shift)
}

/// The value and byte mask of a config write of `data` at byte `shift` within its dword.
fn place_bytes(data: &[u8], shift: u32) -> (u32, u32) {
    let mut v = [0u8; 4];
    let n = data.len().min(4);
    v[..n].copy_from_slice(&data[..n]);
    let mask = if n == 4 {
        u32::MAX
    } else {
        (1u32 << (8 * n)) - 1
    };
    (u32::from_le_bytes(v) << shift, mask << shift)
}

/// The console lines between which the guest reads its `/proc/interrupts`.
const SNAPSHOT_BEGINS: &[u8] = b"L2: interrupts snapshot begins";
const SNAPSHOT_ENDS: &[u8] = b"L2: interrupts snapshot ends";

/// Devices whose MSI-X deliveries are noted when the guest announces its interrupt snapshot and
/// when it has taken it. A driver may start a request at any time (virtio-rng refills its
/// buffer ahead of the reader), so the guest's count is checked to lie between the two.
#[derive(Default)]
struct Watched {
    devices: Vec<(&'static str, MsixVectors)>,
    /// Per device: deliveries at the first line, then at the second.
    snapshot: Vec<(&'static str, u64, Option<u64>)>,
}

/// The serial console's output: stdout, watching for the snapshot lines.
struct Console {
    line: Vec<u8>,
    watched: Arc<Mutex<Watched>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            let has = |mark: &[u8]| self.line.windows(mark.len()).any(|w| w == mark);
            if has(SNAPSHOT_BEGINS) {
                let mut watched = lock(&self.watched);
                let snapshot = watched
                    .devices
                    .iter()
                    .map(|(name, msix)| (*name, msix.stats().delivered, None))
                    .collect();
                watched.snapshot = snapshot;
            } else if has(SNAPSHOT_ENDS) {
                let mut watched = lock(&self.watched);
                let ends: Vec<u64> = watched
                    .devices
                    .iter()
                    .map(|(_, msix)| msix.stats().delivered)
                    .collect();
                for (noted, end) in watched.snapshot.iter_mut().zip(ends) {
                    noted.2 = Some(end);
                }
            }
            self.line.clear();
        }
        io::stdout().write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stdout().flush()
    }
}

/// What a virtio function did, on one line.
fn report<D: pci::VirtioDevice>(name: &str, f: &pci::VirtioPci<D>) {
    use std::sync::atomic::Ordering::Relaxed;
    let stats = f.stats();
    let (queue_vector, config_vector, msix) = f.vectors();
    eprintln!(
        "linux_vmm: {name}: features {:#x} (EVENT_IDX {}), kicks {} requests {} bytes {} signals {}; \
         device busy {:.1} ms, {} page faults; queue vector {queue_vector}, config vector {config_vector}; MSI-X {msix:?}",
        f.driver_features(),
        if f.driver_features() & (1 << 29) != 0 { "negotiated" } else { "not offered" },
        stats.kicks.load(Relaxed),
        stats.requests.load(Relaxed),
        stats.bytes.load(Relaxed),
        stats.signals.load(Relaxed),
        stats.busy_ns.load(Relaxed) as f64 / 1e6,
        stats.faults.load(Relaxed),
    );
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

    // Memory: one region from 0.
    let mem_size = args.mem_mib << 20;
    // With a vhost-user backend, guest memory is a memfd mapped shared, so the backend can map it.
    let file = match args.vhost_rng {
        Some(_) => Some(vm_memory::FileOffset::new(memfd(mem_size)?, 0)),
        None => None,
    };
    let mem = guest_memory(mem_size as usize, file)?;
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

    // The kernel, the command line, the initramfs, the zero page.
    let loaded = BzImage::load(
        &mem,
        None,
        &mut File::open(&args.kernel)?,
        Some(GuestAddress(HIMEM)),
    )?;
    let mut cmdline = Cmdline::new(CMDLINE_MAX)?;
    cmdline.insert_str(&args.cmdline)?;
    load_cmdline(&mem, GuestAddress(CMDLINE), &cmdline)?;
    let mut params = boot_params::default();
    if let Some(hdr) = loaded.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = args.cmdline.len() as u32 + 1;
    params.hdr.kernel_alignment = 0x100_0000;
    if let Some(path) = &args.initrd {
        let image = std::fs::read(path)?;
        let max = u64::from(params.hdr.initrd_addr_max).min(mem_size - 1);
        let at = (max + 1 - image.len() as u64) & !0xfff;
        if at < loaded.kernel_end {
            return Err("the initramfs does not fit above the kernel".into());
        }
        mem.write_slice(&image, GuestAddress(at))?;
        params.hdr.ramdisk_image = at as u32;
        params.hdr.ramdisk_size = image.len() as u32;
    }
    // RAM below the EBDA and above 1 MiB; the BIOS area between, with the ACPI tables, reserved.
    let map = [
        (0, EBDA_START, 1),
        (EBDA_START, HIMEM - EBDA_START, 2),
        (HIMEM, mem_size - HIMEM, 1),
    ];
    for (i, &(addr, size, kind)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    params.e820_entries = map.len() as u8;
    params.acpi_rsdp_addr = write_acpi(&mem)?;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE)),
        &mem,
    )?;
    write_tables(&mem)?;

    let mut vcpu = fd.create_vcpu(0)?;
    // The 64-bit entry point of a bzImage is 0x200 past its protected-mode code.
    setup_vcpu(&kvm, &vcpu, loaded.kernel_load.raw_value() + 0x200)?;

    // The console: an 8250 on COM1 whose interrupt is an irqfd on GSI 4.
    let watched = Arc::new(Mutex::new(Watched::default()));
    let console = Console {
        line: Vec::new(),
        watched: watched.clone(),
    };
    let mut serial = vm_superio::Serial::new(SerialIrq(vm.irqfd(COM1_GSI)?), console);
    // PCI: the host bridge, the virtio-rng function (00:01.0) and, with --disk, virtio-blk
    // (00:02.0), each with its own BAR 0.
    let mut rng = pci::VirtioPci::new(&vm, mem.clone(), pci::BAR0_BASE, pci::Rng::new()?)?;
    if let Some(socket) = &args.vhost_rng {
        #[cfg(feature = "vhost-user")]
        {
            let frontend = vm_notify::vhost_user::VhostUserFrontend::connect(
                socket,
                1,
                &mem,
                pci::VIRTIO_F_VERSION_1 | pci::VIRTIO_RING_F_EVENT_IDX,
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
    let mut blk = match &args.disk {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)?;
            let bar0 = pci::BAR0_BASE + pci::BAR0_SIZE;
            Some(pci::VirtioPci::new(
                &vm,
                mem.clone(),
                bar0,
                blk::Blk::new(file)?,
            )?)
        }
        None => None,
    };
    if !args.event_idx {
        rng = rng.without_event_idx();
        blk = blk.map(pci::VirtioPci::without_event_idx);
    }
    {
        let mut watched = lock(&watched);
        if !rng.is_vhost() {
            watched.devices.push(("virtio-rng", rng.msix().clone()));
        }
        if let Some(blk) = &blk {
            watched.devices.push(("virtio-blk", blk.msix().clone()));
        }
    }
    let mut config_address = 0u32;

    eprintln!(
        "linux_vmm: {} MiB, kernel {} ({} bytes at {:#x}), cmdline {:?}",
        args.mem_mib,
        args.kernel.display(),
        loaded.kernel_end - loaded.kernel_load.raw_value(),
        loaded.kernel_load.raw_value(),
        args.cmdline
    );
    let deadline = started + args.timeout;
    let (mut io_exits, mut mmio_exits, mut notify_exits) = (0u64, 0u64, 0u64);
    let mut reset = false;
    let outcome = loop {
        if Instant::now() > deadline {
            break "timed out".to_string();
        }
        match vcpu.run()? {
            VcpuExit::IoOut(port, data) => {
                io_exits += 1;
                if (COM1..COM1 + 8).contains(&port) {
                    serial.write((port - COM1) as u8, data[0])?;
                } else if port == pci::CONFIG_ADDRESS && data.len() == 4 {
                    config_address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                } else if (pci::CONFIG_DATA..pci::CONFIG_DATA + 4).contains(&port) {
                    let (reg, shift) = config_target(config_address, port);
                    let (value, mask) = place_bytes(data, shift);
                    match (reg, blk.as_mut()) {
                        (Some((1, reg)), _) => rng.config_write(reg, value, mask),
                        (Some((2, reg)), Some(blk)) => blk.config_write(reg, value, mask),
                        _ => {}
                    }
                } else if port == I8042_COMMAND && data[0] == I8042_RESET {
                    reset = true;
                    break "the guest reset the machine (i8042)".to_string();
                }
            }
            VcpuExit::IoIn(port, data) => {
                io_exits += 1;
                if (COM1..COM1 + 8).contains(&port) {
                    data[0] = serial.read((port - COM1) as u8);
                } else if port == pci::CONFIG_ADDRESS && data.len() == 4 {
                    data.copy_from_slice(&config_address.to_le_bytes());
                } else if (pci::CONFIG_DATA..pci::CONFIG_DATA + 4).contains(&port) {
                    let (reg, shift) = config_target(config_address, port);
                    let dword = match reg {
                        Some((0, reg)) => pci::host_bridge_read(reg),
                        Some((1, reg)) => rng.config_read(reg),
                        Some((2, reg)) => blk.as_ref().map_or(0xffff_ffff, |b| b.config_read(reg)),
                        _ => 0xffff_ffff,
                    };
                    let bytes = (dword >> shift).to_le_bytes();
                    let n = data.len();
                    data.copy_from_slice(&bytes[..n]);
                } else if port == CMOS_DATA {
                    // No RTC: every CMOS register reads 0 (so "update in progress" is never set).
                    data.fill(0);
                } else {
                    data.fill(0xff);
                }
            }
            VcpuExit::MmioRead(addr, data) => {
                mmio_exits += 1;
                if let Some(offset) = in_bar(rng.bar0(), addr) {
                    rng.mmio_read(offset, data);
                } else if let Some((b, offset)) = blk
                    .as_ref()
                    .and_then(|b| Some((b, in_bar(b.bar0(), addr)?)))
                {
                    b.mmio_read(offset, data);
                } else {
                    data.fill(0xff);
                }
            }
            VcpuExit::MmioWrite(addr, data) => {
                mmio_exits += 1;
                if let Some(offset) = in_bar(rng.bar0(), addr) {
                    notify_exits += u64::from(rng.is_notify(offset));
                    rng.mmio_write(offset, data);
                } else if let Some(b) = blk.as_mut() {
                    if let Some(offset) = in_bar(b.bar0(), addr) {
                        notify_exits += u64::from(b.is_notify(offset));
                        b.mmio_write(offset, data);
                    }
                }
            }
            VcpuExit::Hlt => break "the vCPU halted".to_string(),
            VcpuExit::Shutdown => break "the guest shut down (triple fault or reset)".to_string(),
            other => break format!("unexpected exit {other:?}"),
        }
    };
    io::stdout().flush()?;
    eprintln!(
        "linux_vmm: {outcome} after {:.2} s; {io_exits} port exits, {mmio_exits} MMIO exits",
        started.elapsed().as_secs_f64()
    );
    if rng.is_vhost() {
        let features = rng.driver_features();
        eprintln!(
            "linux_vmm: virtio-rng: served by the vhost-user backend, no VMM thread in the path; \
             features {features:#x} (EVENT_IDX {})",
            if features & pci::VIRTIO_RING_F_EVENT_IDX != 0 {
                "negotiated"
            } else {
                "not negotiated"
            }
        );
    } else {
        report("virtio-rng", &rng);
    }
    if let Some(blk) = &blk {
        report("virtio-blk", blk);
    }
    for (name, begins, ends) in &lock(&watched).snapshot {
        let ends = ends.map_or("?".to_string(), |n| n.to_string());
        eprintln!(
            "linux_vmm: {name}: MSI-X deliveries around the guest's interrupt snapshot: {begins} before, {ends} after"
        );
    }
    eprintln!("linux_vmm: queue-notify exits {notify_exits}");
    if reset {
        Ok(())
    } else {
        Err(format!("the guest did not reset the machine: {outcome}").into())
    }
}
