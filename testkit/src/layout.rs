//! Where the tiny guest keeps things: guest-physical addresses and ports.
//!
//! The guest runs in 64-bit long mode with the first 4 GiB identity-mapped by 2 MiB pages, so
//! every address below is both guest-physical and guest-virtual, and MMIO addresses up to 4 GiB
//! (device registers, the local APIC at `0xfee0_0000`, the IOAPIC at `0xfec0_0000`) are reachable.

/// Size of guest RAM, from guest-physical 0.
pub const MEM_SIZE: usize = 4 << 20;

/// The PML4 table (one page).
pub const PML4: u64 = 0x1000;
/// The page-directory-pointer table (one page).
pub const PDPT: u64 = 0x2000;
/// Four page directories of 2 MiB pages, mapping 0..4 GiB.
pub const PD: u64 = 0x3000;
/// The GDT: null, 64-bit code at selector 0x08, data at 0x10.
pub const GDT: u64 = 0x7000;
/// The IDT: 256 64-bit interrupt gates.
pub const IDT: u64 = 0x8000;

/// Where [`wait_for_interrupt`](super::GuestProgram::wait_for_interrupt) stores the address a
/// handler returns to.
pub const RESUME_SLOT: u64 = 0x9000;
/// Where [`wait_for_interrupt`](super::GuestProgram::wait_for_interrupt) stores the stack pointer
/// a handler restores.
pub const SAVED_RSP_SLOT: u64 = 0x9008;
/// 256 `u64` counters, one per interrupt vector, incremented by the kit's handlers.
pub const IRQ_COUNTS: u64 = 0xa000;
/// The vCPU's index (0 for the first), written by the host; read by
/// [`on_vcpu`](super::GuestProgram::on_vcpu).
pub const VCPU_INDEX_SLOT: u64 = 0x9010;

/// The most vCPUs a [`TinyVm`](super::TinyVm) can have.
pub const MAX_VCPUS: usize = 8;
/// Where the per-vCPU copies of the kit's slots ([`RESUME_SLOT`], [`SAVED_RSP_SLOT`],
/// [`VCPU_INDEX_SLOT`], [`IRQ_COUNTS`]) of vCPUs 1 and up live, [`PERCPU_STRIDE`] bytes each,
/// between the stack top and the code. The kit's code reaches them through the GS segment,
/// whose base is [`gs_base`] of the vCPU; vCPU 0's base is 0, so its slots are the ones named
/// above.
pub const PERCPU_BASE: u64 = 0x8_0000;
/// Bytes of per-vCPU slots each vCPU from 1 has.
pub const PERCPU_STRIDE: u64 = 0x2000;
/// Bytes of stack each vCPU has, below [`STACK_TOP`] for vCPU 0 and below that for the next.
pub const STACK_STRIDE: u64 = 0x4000;

/// vCPU `index`'s GS base: the kit's slot addresses plus it are that vCPU's copies.
pub const fn gs_base(index: usize) -> u64 {
    if index == 0 {
        0
    } else {
        (PERCPU_BASE + (index as u64 - 1) * PERCPU_STRIDE).wrapping_sub(RESUME_SLOT)
    }
}

/// vCPU `index`'s copy of the kit slot at `addr` ([`IRQ_COUNTS`] + 8 × vector, say).
pub const fn per_vcpu(index: usize, addr: u64) -> u64 {
    addr.wrapping_add(gs_base(index))
}

/// vCPU `index`'s initial stack pointer.
pub const fn stack_top(index: usize) -> u64 {
    STACK_TOP - index as u64 * STACK_STRIDE
}

/// The program's own data: [`DATA_SLOTS`] `u64` slots the host can read and write.
pub const DATA: u64 = 0x1_0000;
/// Number of `u64` slots at [`DATA`].
pub const DATA_SLOTS: usize = 0x2000;

/// The stack grows down from here.
pub const STACK_TOP: u64 = 0x8_0000;
/// Where the program's code is loaded and starts.
pub const CODE: u64 = 0x10_0000;
/// The most code a program can hold.
pub const CODE_MAX: usize = MEM_SIZE - CODE as usize;

/// Selector of the 64-bit code segment.
pub const CODE_SELECTOR: u16 = 0x08;
/// Selector of the data segment.
pub const DATA_SELECTOR: u16 = 0x10;

/// A 32-bit write to this port ends the run successfully ([`Outcome::Done`](crate::Outcome::Done)).
pub const DONE_PORT: u16 = 0xf4;
/// A 32-bit write to this port hands its value to the host's exit handler and goes on.
pub const HOST_PORT: u16 = 0xf0;
/// The kit's handler for a vector the program did not expect writes the vector here; the run
/// ends with a fault naming it.
pub const UNEXPECTED_VECTOR_PORT: u16 = 0xf8;

/// The local APIC's MMIO base.
pub const LAPIC: u64 = 0xfee0_0000;
/// The IOAPIC's MMIO base.
pub const IOAPIC: u64 = 0xfec0_0000;

/// The guest-physical address of data slot `slot`.
pub const fn data_slot(slot: usize) -> u64 {
    DATA + 8 * slot as u64
}
