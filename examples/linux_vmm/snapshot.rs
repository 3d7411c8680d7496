//! Moving a running guest between processes (`--snapshot DIR`, `--restore DIR`): on `SIGUSR1`
//! the VMM pauses its vCPUs (each exit it made completed), lets every device finish the requests
//! it had begun and saves the whole machine in `DIR` — `memory` (guest memory as it is) and
//! `state.json` (each vCPU, the irqchip, the clock, the serial port, and each virtio-pci
//! function with vm-notify's saved notification state) — then exits. A fresh process started
//! with `--restore DIR` and the same devices builds the machine from it and runs the guest on.
//!
//! The order is the one the state asks for. Saving: the vCPUs stop first (nothing new reaches
//! the devices), then the devices finish and report their rings' positions, and only then are the
//! vCPUs' local APICs, the irqchip and memory read (the devices' last completions are in them).
//! Restoring: memory, the clock and the in-kernel irqchip, then each vCPU (its local APIC before
//! its MSRs, for the TSC deadline), then the split irqchip's IOAPIC, then the devices' notification
//! state (an MSI-X message pending at the save is delivered now, into the restored local APICs),
//! and last the serial port.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::kvm_msr_entry;
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vm_notify::irqchip::{Ioapic, IoapicState};
use vm_superio::serial::SerialState;

use crate::virtio_pci::Saved;
use crate::Error;

/// Set by `SIGUSR1`: the run loop pauses the guest and saves it.
static PAUSE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_pause(_: i32, _: *mut libc::siginfo_t, _: *mut std::ffi::c_void) {
    PAUSE.store(true, Ordering::SeqCst);
}

/// Makes `SIGUSR1` ask for the pause (`requested` then says so).
pub fn on_signal() -> Result<(), Error> {
    // `on_pause` stores to an atomic, which is async-signal-safe.
    vmm_sys_util::signal::register_signal_handler(libc::SIGUSR1, on_pause)?;
    Ok(())
}

/// Whether `SIGUSR1` asked for the pause.
pub fn requested() -> bool {
    PAUSE.load(Ordering::SeqCst)
}

/// One vCPU's state: everything KVM keeps for it that a Linux guest depends on.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    debugregs: kvm_debugregs,
    lapic: kvm_lapic_state,
    events: kvm_vcpu_events,
    mp_state: kvm_mp_state,
    /// Every MSR KVM lists that it could read: (index, value).
    msrs: Vec<(u32, u64)>,
}

impl VcpuState {
    /// How many MSRs it holds.
    pub fn msrs(&self) -> usize {
        self.msrs.len()
    }

    /// The vectors its local APIC held: requested and not yet taken (IRR), and in service
    /// (ISR, the guest in their handlers).
    pub fn interrupts_held(&self) -> (Vec<u8>, Vec<u8>) {
        let held = |base| {
            (0..=255u8)
                .filter(|&v| apic_bit(&self.lapic, base, v))
                .collect()
        };
        (held(0x200), held(0x100))
    }

    /// Its local APIC ID.
    pub fn apic_id(&self) -> u8 {
        self.lapic.regs[0x23] as u8
    }
}

/// Whether vector `v`'s bit is set in the local APIC register array at `base` (ISR at 0x100,
/// IRR at 0x200: eight 32-bit words, 16 bytes apart).
fn apic_bit(lapic: &kvm_lapic_state, base: usize, v: u8) -> bool {
    let at = base + usize::from(v / 32) * 0x10;
    let word = u32::from_le_bytes([
        lapic.regs[at] as u8,
        lapic.regs[at + 1] as u8,
        lapic.regs[at + 2] as u8,
        lapic.regs[at + 3] as u8,
    ]);
    word >> (v % 32) & 1 != 0
}

/// On the split irqchip, the EOIs a pause may have kept from the VMM: KVM makes a level
/// interrupt's EOI exit at the vCPU's next entry, and the `KVM_RUN` with `immediate_exit` that
/// completes a paused vCPU's last exit returns before that. A level entry whose remote IRR is set
/// while no local APIC holds its vector (requested or in service) had its EOI: it is completed
/// here, on this IOAPIC, before it is saved. Returns how many were.
pub fn complete_eois(ioapic: &Ioapic, vcpus: &[&VcpuFd]) -> Result<u32, Error> {
    let lapics = vcpus
        .iter()
        .map(|vcpu| vcpu.get_lapic())
        .collect::<Result<Vec<_>, _>>()?;
    let held = |v: u8| {
        lapics
            .iter()
            .any(|l| apic_bit(l, 0x100, v) || apic_bit(l, 0x200, v))
    };
    let mut completed = 0;
    for entry in (0..).map_while(|pin| ioapic.entry(pin)) {
        if entry.level() && entry.remote_irr() && !held(entry.vector()) {
            ioapic.end_of_interrupt(entry.vector())?;
            completed += 1;
        }
    }
    Ok(completed)
}

/// The interrupt controllers: KVM's own (PICs, IOAPIC and the PIT), or the split irqchip's
/// IOAPIC, vm-notify's (the local APICs are in each vCPU's state).
#[derive(Serialize, Deserialize)]
pub enum Chips {
    Kernel(Box<KernelChips>),
    Split(IoapicState),
}

/// KVM's PICs, IOAPIC and PIT.
#[derive(Serialize, Deserialize)]
pub struct KernelChips {
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
}

/// The 8250's registers and its receive buffer: vm-superio's `SerialState`, which has no serde of
/// its own, described to serde here.
#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState")]
struct SerialStateDef {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// Everything but guest memory: `state.json`.
#[derive(Serialize, Deserialize)]
pub struct MachineState {
    pub mem_bytes: u64,
    pub vcpus: Vec<VcpuState>,
    pub chips: Chips,
    pub clock: kvm_clock_data,
    #[serde(with = "SerialStateDef")]
    pub serial: SerialState,
    /// The virtio-pci functions, in the order the VMM makes them.
    pub functions: Vec<Saved>,
    /// How many times this guest has moved before this save (0 on the first).
    pub moves: u32,
}

const PIC_MASTER: u32 = KVM_IRQCHIP_PIC_MASTER;
const PIC_SLAVE: u32 = KVM_IRQCHIP_PIC_SLAVE;
const IOAPIC: u32 = KVM_IRQCHIP_IOAPIC;

/// The MSRs KVM says it saves and restores.
pub fn msr_indices(kvm: &Kvm) -> Result<Vec<u32>, Error> {
    Ok(kvm.get_msr_index_list()?.as_slice().to_vec())
}

/// Reads `indices` on `vcpu`: those KVM reads (`KVM_GET_MSRS` stops at the first it cannot, which
/// is skipped and the rest read on).
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, Error> {
    let mut read = Vec::with_capacity(indices.len());
    let mut left = indices;
    while !left.is_empty() {
        let entries: Vec<kvm_msr_entry> = left
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)?;
        let n = vcpu.get_msrs(&mut msrs)?;
        read.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        left = &left[(n + 1).min(left.len())..];
    }
    Ok(read)
}

/// Writes `saved` to `vcpu`; an MSR KVM refuses is named on stderr and the rest written on.
/// Returns how many were refused.
fn write_msrs(vcpu: &VcpuFd, saved: &[(u32, u64)]) -> Result<usize, Error> {
    let mut refused = 0;
    let mut left = saved;
    while !left.is_empty() {
        let entries: Vec<kvm_msr_entry> = left
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let n = vcpu.set_msrs(&Msrs::from_entries(&entries)?)?;
        if let Some(&(index, data)) = left.get(n) {
            eprintln!("linux_vmm: restore: KVM refused MSR {index:#x} = {data:#x}");
            refused += 1;
        }
        left = &left[(n + 1).min(left.len())..];
    }
    Ok(refused)
}

/// Saves a paused vCPU (its last exit completed).
pub fn save_vcpu(vcpu: &VcpuFd, msrs: &[u32]) -> Result<VcpuState, Error> {
    Ok(VcpuState {
        regs: vcpu.get_regs()?,
        sregs: vcpu.get_sregs()?,
        xsave: vcpu.get_xsave()?,
        xcrs: vcpu.get_xcrs()?,
        debugregs: vcpu.get_debug_regs()?,
        lapic: vcpu.get_lapic()?,
        events: vcpu.get_vcpu_events()?,
        mp_state: vcpu.get_mp_state()?,
        msrs: read_msrs(vcpu, msrs)?,
    })
}

/// Puts a saved vCPU's state on a fresh one whose CPUID is set. Returns the MSRs KVM refused.
pub fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState) -> Result<usize, Error> {
    vcpu.set_mp_state(s.mp_state)?;
    vcpu.set_regs(&s.regs)?;
    vcpu.set_sregs(&s.sregs)?;
    // SAFETY: the buffer is a whole kvm_xsave (4096 bytes), which KVM_GET_XSAVE filled on a vCPU
    // with the same CPUID: the state components its header enables fit in it, so KVM reads
    // nothing past its end.
    unsafe { vcpu.set_xsave(&s.xsave)? };
    vcpu.set_xcrs(&s.xcrs)?;
    vcpu.set_debug_regs(&s.debugregs)?;
    // The local APIC before the MSRs: the TSC deadline MSR is kept only in TSC-deadline mode.
    vcpu.set_lapic(&s.lapic)?;
    let refused = write_msrs(vcpu, &s.msrs)?;
    vcpu.set_vcpu_events(&s.events)?;
    Ok(refused)
}

/// The in-kernel irqchip and PIT, or the split irqchip's IOAPIC.
pub fn save_chips(vm: &VmFd, ioapic: Option<&Ioapic>) -> Result<Chips, Error> {
    if let Some(ioapic) = ioapic {
        return Ok(Chips::Split(ioapic.save()));
    }
    let chip = |chip_id| -> Result<kvm_irqchip, Error> {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip)?;
        Ok(chip)
    };
    Ok(Chips::Kernel(Box::new(KernelChips {
        pic_master: chip(PIC_MASTER)?,
        pic_slave: chip(PIC_SLAVE)?,
        ioapic: chip(IOAPIC)?,
        pit: vm.get_pit2()?,
    })))
}

/// Restores the in-kernel irqchip and PIT (before the vCPUs); the split IOAPIC is restored
/// after them (`restore_split`).
pub fn restore_kernel_chips(vm: &VmFd, chips: &Chips) -> Result<(), Error> {
    if let Chips::Kernel(saved) = chips {
        for chip in [&saved.pic_master, &saved.pic_slave, &saved.ioapic] {
            vm.set_irqchip(chip)?;
        }
        vm.set_pit2(&saved.pit)?;
    }
    Ok(())
}

/// The split irqchip's IOAPIC, after the vCPUs' local APICs: an interrupt its restore delivers
/// would otherwise be overwritten by `KVM_SET_LAPIC`.
pub fn restore_split(ioapic: Option<&Ioapic>, chips: &Chips) -> Result<(), Error> {
    match (ioapic, chips) {
        (Some(ioapic), Chips::Split(saved)) => Ok(ioapic.restore(saved)?),
        (None, Chips::Kernel(_)) => Ok(()),
        _ => Err("--restore: the saved guest ran on the other irqchip (--split-irqchip)".into()),
    }
}

/// The clock the guest reads (kvm-clock), for `KVM_SET_CLOCK` on the new VM: the guest's time
/// stands still while it moves.
pub fn save_clock(vm: &VmFd) -> Result<kvm_clock_data, Error> {
    let mut clock = vm.get_clock()?;
    // KVM_SET_CLOCK takes the time alone; the flags KVM_GET_CLOCK reports (TSC stable, the host's
    // real time) describe this host.
    clock.flags = 0;
    Ok(clock)
}

/// Writes `state` and guest memory to `dir`.
pub fn write(dir: &Path, state: &MachineState, mem: &GuestMemoryMmap) -> Result<(), Error> {
    std::fs::create_dir_all(dir)?;
    let mut memory = File::create(dir.join("memory"))?;
    mem.write_all_volatile_to(GuestAddress(0), &mut memory, state.mem_bytes as usize)?;
    memory.sync_all()?;
    let json = serde_json::to_vec(state)?;
    std::fs::write(dir.join("state.json"), json)?;
    Ok(())
}

/// Reads `dir`'s `state.json`.
pub fn read_state(dir: &Path) -> Result<MachineState, Error> {
    let json = std::fs::read(dir.join("state.json"))
        .map_err(|e| format!("--restore {}: state.json: {e}", dir.display()))?;
    Ok(serde_json::from_slice(&json)?)
}

/// Fills guest memory from `dir`'s `memory`.
pub fn read_memory(dir: &Path, mem: &GuestMemoryMmap) -> Result<(), Error> {
    let mut memory = File::open(dir.join("memory"))?;
    let len = memory.metadata()?.len();
    if len != mem.last_addr().0 + 1 {
        return Err(format!(
            "--restore {}: {len} bytes of memory saved, the guest has {}",
            dir.display(),
            mem.last_addr().0 + 1
        )
        .into());
    }
    mem.read_exact_volatile_from(GuestAddress(0), &mut memory, len as usize)?;
    Ok(())
}
