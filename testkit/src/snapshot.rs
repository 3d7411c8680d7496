//! Saving a paused tiny VM and restoring it onto a fresh one: guest memory, each vCPU's
//! registers, local APIC and pending events, and the in-kernel PIC and IOAPIC or, on the split
//! irqchip, vm-notify's IOAPIC.

use kvm_bindings::{
    kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};
use vm_notify::irqchip::IoapicState;

use crate::layout::MEM_SIZE;
use crate::machine::TinyVm;
use crate::run::Paused;
use crate::{Error, Result};

/// One vCPU's saved state.
#[derive(Clone)]
struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    lapic: kvm_lapic_state,
    events: kvm_vcpu_events,
    mp_state: kvm_mp_state,
}

/// A paused tiny VM, saved by [`TinyVm::snapshot`]: what [`TinyVm::restore`] needs to go on
/// running its program on a fresh VM.
#[derive(Clone)]
pub struct MachineState {
    memory: Vec<u8>,
    vcpus: Vec<VcpuState>,
    /// The in-kernel irqchip: PIC master, PIC slave, IOAPIC.
    irqchip: Option<[kvm_irqchip; 3]>,
    /// The split irqchip: vm-notify's IOAPIC.
    ioapic: Option<IoapicState>,
}

impl std::fmt::Debug for MachineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineState")
            .field("memory_bytes", &self.memory.len())
            .field("vcpus", &self.vcpus.len())
            .finish()
    }
}

const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

fn save_vcpu(vcpu: &VcpuFd) -> Result<VcpuState> {
    Ok(VcpuState {
        regs: vcpu.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?,
        lapic: vcpu.get_lapic().map_err(Error::kvm("KVM_GET_LAPIC"))?,
        events: vcpu
            .get_vcpu_events()
            .map_err(Error::kvm("KVM_GET_VCPU_EVENTS"))?,
        mp_state: vcpu
            .get_mp_state()
            .map_err(Error::kvm("KVM_GET_MP_STATE"))?,
    })
}

fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState) -> Result<()> {
    vcpu.set_sregs(&s.sregs)
        .map_err(Error::kvm("KVM_SET_SREGS"))?;
    vcpu.set_regs(&s.regs).map_err(Error::kvm("KVM_SET_REGS"))?;
    vcpu.set_lapic(&s.lapic)
        .map_err(Error::kvm("KVM_SET_LAPIC"))?;
    vcpu.set_mp_state(s.mp_state)
        .map_err(Error::kvm("KVM_SET_MP_STATE"))?;
    vcpu.set_vcpu_events(&s.events)
        .map_err(Error::kvm("KVM_SET_VCPU_EVENTS"))
}

impl TinyVm {
    /// Saves the machine a [`Running::pause`](crate::Running::pause) stopped: its memory, every
    /// vCPU's registers, local APIC (with the interrupts pending and in service there) and
    /// pending events, and the in-kernel PIC and IOAPIC, or on the split irqchip vm-notify's
    /// IOAPIC ([`Ioapic::save`](vm_notify::irqchip::Ioapic::save)). The paused vCPUs are consumed; the
    /// machine itself is left as it is (drop it, or keep it to compare).
    ///
    /// Notifications are not part of it: save them with vm-notify (the device's kicks, vectors
    /// and lines), and restore them onto the new machine's [`notify`](Self::notify) root.
    ///
    /// # Errors
    ///
    /// [`Error::Kvm`] naming the ioctl that failed; [`Error::Memory`].
    pub fn snapshot(&self, paused: Paused) -> Result<MachineState> {
        let vcpus = paused
            .vcpus
            .iter()
            .map(save_vcpu)
            .collect::<Result<Vec<_>>>()?;
        let ioapic = self.notify().ioapic().map(|ioapic| ioapic.save());
        let irqchip = match ioapic {
            Some(_) => None,
            None => {
                let mut chips = [kvm_irqchip::default(); 3];
                for (chip, id) in chips.iter_mut().zip(CHIPS) {
                    chip.chip_id = id;
                    self.vm()
                        .get_irqchip(chip)
                        .map_err(Error::kvm("KVM_GET_IRQCHIP"))?;
                }
                Some(chips)
            }
        };
        let mut memory = vec![0u8; MEM_SIZE];
        self.memory()
            .read_slice(&mut memory, GuestAddress(0))
            .map_err(|e| Error::Memory(e.to_string()))?;
        Ok(MachineState {
            memory,
            vcpus,
            irqchip,
            ioapic,
        })
    }

    /// A fresh machine (a new VM, the same number of vCPUs, the irqchip it was on) in the state
    /// `state` saved: [`resume`](Self::resume) runs the paused program on. On the split irqchip
    /// the IOAPIC is restored after the vCPUs, before anything else is made on the machine:
    /// restore the device's level lines after this, and they take over the lines that were
    /// asserted.
    ///
    /// # Errors
    ///
    /// Those of [`with_irqchip`](Self::with_irqchip), [`Error::Kvm`] naming the ioctl that
    /// failed, [`Error::Memory`], and those of
    /// [`Ioapic::restore`](vm_notify::irqchip::Ioapic::restore) ([`Error::Notify`]).
    pub fn restore(state: &MachineState) -> Result<TinyVm> {
        let irqchip = match state.ioapic {
            Some(_) => crate::Irqchip::Split,
            None => crate::Irqchip::Kernel,
        };
        let vm = TinyVm::with_irqchip(irqchip, state.vcpus.len())?;
        vm.memory()
            .write_slice(&state.memory, GuestAddress(0))
            .map_err(|e| Error::Memory(e.to_string()))?;
        for chip in state.irqchip.iter().flatten() {
            vm.vm()
                .set_irqchip(chip)
                .map_err(Error::kvm("KVM_SET_IRQCHIP"))?;
        }
        for (vcpu, saved) in vm.vcpu_fds().zip(&state.vcpus) {
            restore_vcpu(vcpu, saved)?;
        }
        // After the local APICs: an interrupt the restore delivers (a line asserted on an
        // unmasked entry that no local APIC had taken) would be overwritten by KVM_SET_LAPIC.
        if let (Some(saved), Some(ioapic)) = (&state.ioapic, vm.notify().ioapic()) {
            ioapic.restore(saved)?;
        }
        Ok(vm)
    }
}
