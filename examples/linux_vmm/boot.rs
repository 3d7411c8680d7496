//! Booting Linux: guest memory, the 64-bit boot protocol (kernel, command line, initramfs, zero
//! page with the e820 map and the RSDP), identity page tables and a flat GDT, and the vCPU's
//! long-mode state with CPUID from KVM.

use std::fs::File;
use std::io;
use std::path::Path;

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{bzimage::BzImage, load_cmdline, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::Error;

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

/// What [`load_linux`] placed: the 64-bit entry point, and the kernel's extent for the log.
pub struct Loaded {
    pub entry: u64,
    pub kernel_load: u64,
    pub kernel_end: u64,
}

/// Loads `kernel` (a bzImage), the command line and `initrd` into `mem` (`mem_size` bytes from
/// 0), writes the zero page (e820 map, the ACPI tables' RSDP) and the page tables and GDT.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    vcpus: u8,
    mmio: &[(u64, u32)],
) -> Result<Loaded, Error> {
    let loaded = BzImage::load(
        mem,
        None,
        &mut File::open(kernel)?,
        Some(GuestAddress(HIMEM)),
    )?;
    let mut line = Cmdline::new(CMDLINE_MAX)?;
    line.insert_str(cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE), &line)?;
    let mut params = boot_params::default();
    if let Some(hdr) = loaded.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    params.hdr.kernel_alignment = 0x100_0000;
    if let Some(path) = initrd {
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
    params.acpi_rsdp_addr = crate::acpi::write(mem, vcpus, mmio)?;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )?;
    write_tables(mem)?;
    Ok(Loaded {
        // The 64-bit entry point of a bzImage is 0x200 past its protected-mode code.
        entry: loaded.kernel_load.raw_value() + 0x200,
        kernel_load: loaded.kernel_load.raw_value(),
        kernel_end: loaded.kernel_end,
    })
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

/// CPUID from KVM for vCPU `id` of `vcpus`: its APIC ID where the leaves carry one, and the
/// hypervisor bit.
pub fn set_cpuid(kvm: &Kvm, vcpu: &VcpuFd, id: u8, vcpus: u8) -> Result<(), Error> {
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // Running under a hypervisor: Linux then finds KVM's leaves (kvmclock).
                e.ecx |= 1 << 31;
                // The initial APIC ID, and the logical processors the package has.
                e.ebx = (e.ebx & 0xffff) | (u32::from(vcpus) << 16) | (u32::from(id) << 24);
                if vcpus > 1 {
                    e.edx |= 1 << 28; // HTT: the count above is valid
                }
            }
            // The x2APIC ID (extended topology), and AMD's extended APIC ID.
            0xb | 0x1f => e.edx = u32::from(id),
            0x8000_001e => e.eax = u32::from(id),
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid)?;
    Ok(())
}

/// The bootstrap vCPU: long mode, paging on, at the kernel's 64-bit entry with the zero page in
/// `rsi`. (The others wait, as KVM made them, for the INIT and start-up IPIs Linux sends.)
pub fn setup_vcpu(kvm: &Kvm, vcpu: &VcpuFd, entry: u64, vcpus: u8) -> Result<(), Error> {
    set_cpuid(kvm, vcpu, 0, vcpus)?;

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
pub fn memfd(size: u64) -> Result<File, Error> {
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
pub fn guest_memory(
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
