//! [`GuestProgram`]: a guest program assembled in Rust with iced-x86's code assembler.
//!
//! The program is 64-bit code. The kit adds what every test needs and KVM's instruction emulator
//! on nested hosts can run: counting interrupt handlers, a wait for an interrupt, PIC and LAPIC
//! set-up, and ports to talk to the host.
//!
//! Handlers cannot return with `IRETQ` (the emulator on these hosts fails on IRET outside real
//! mode), so interrupts are only taken inside [`GuestProgram::wait_for_interrupt`]: it records a
//! resume address and the stack pointer, then runs `sti; hlt`. A handler counts the interrupt,
//! runs its body, sends the EOI, restores the stack pointer and jumps to the resume address with
//! interrupts disabled again.

use std::collections::BTreeMap;
use std::fmt;

use iced_x86::code_asm::{
    al, ax, byte_ptr, dword_ptr, dx, eax, edx, ptr, qword_ptr, r13, r15, rax, rdx, rsp, word_ptr,
    CodeAssembler, CodeLabel,
};
use iced_x86::BlockEncoderOptions;

use super::layout::{
    data_slot, CODE, CODE_MAX, DONE_PORT, HOST_PORT, IOAPIC, IRQ_COUNTS, LAPIC, RESUME_SLOT,
    SAVED_RSP_SLOT, UNEXPECTED_VECTOR_PORT, VCPU_INDEX_SLOT,
};
use super::{Error, Result};

/// How a handler ends the interrupt at its controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eoi {
    /// No EOI (the handler's body does it, or the source needs none).
    None,
    /// Non-specific EOI to the master 8259 (IRQ 0–7).
    PicMaster,
    /// Non-specific EOI to the slave and then the master 8259 (IRQ 8–15).
    PicSlave,
    /// EOI to the local APIC (MSI and IOAPIC interrupts).
    Lapic,
}

type Body = Box<dyn FnOnce(&mut CodeAssembler) -> Result<()> + Send>;
type Hook = Box<dyn Fn(&mut CodeAssembler) -> Result<()> + Send>;

struct Handler {
    eoi: Eoi,
    body: Option<Body>,
}

/// A guest program under construction.
///
/// ```
/// use iced_x86::code_asm::*;
/// use vm_notify_testkit::{layout, Eoi, GuestProgram};
///
/// let mut p = GuestProgram::new()?;
/// p.init_pic(0x20, 0b1111_1111_1110_1011, 0)?; // IRQ 2 (cascade) and 4 unmasked
/// p.on_interrupt(0x24, Eoi::PicMaster);
/// p.repeat(3, |p| {
///     p.asm().mov(rdi, 0xd000_0000u64)?;
///     p.asm().mov(dword_ptr(rdi), eax)?; // kick the device
///     p.wait_for_interrupt()                // until it answers on IRQ 4
/// })?;
/// p.exit()?;
/// let code = p.assemble()?;
/// assert!(code.handler(0x24).is_some());
/// # Ok::<(), vm_notify_testkit::Error>(())
/// ```
pub struct GuestProgram {
    asm: CodeAssembler,
    handlers: BTreeMap<u8, Handler>,
    before_sti: Option<Hook>,
}

impl fmt::Debug for GuestProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestProgram")
            .field("instructions", &self.asm.instructions().len())
            .field("handlers", &self.handlers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl GuestProgram {
    /// An empty 64-bit program.
    ///
    /// # Errors
    ///
    /// [`Error::Assemble`] only if iced-x86 refuses 64-bit mode.
    pub fn new() -> Result<Self> {
        Ok(GuestProgram {
            asm: CodeAssembler::new(64)?,
            handlers: BTreeMap::new(),
            before_sti: None,
        })
    }

    /// The assembler, for the program's own instructions.
    pub fn asm(&mut self) -> &mut CodeAssembler {
        &mut self.asm
    }

    /// Runs `body` `n` times, counting in `r15` (saved on the stack, so repeats nest). The body
    /// must leave `r15` and the stack as it found them. Emits nothing for `n == 0`.
    ///
    /// # Errors
    ///
    /// Those of `body`, or [`Error::Assemble`].
    pub fn repeat(
        &mut self,
        n: u64,
        body: impl FnOnce(&mut GuestProgram) -> Result<()>,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let mut top = self.asm.create_label();
        self.asm.push(r15)?;
        self.asm.mov(r15, n)?;
        self.asm.set_label(&mut top)?;
        body(self)?;
        self.asm.dec(r15)?;
        self.asm.jnz(top)?;
        self.asm.pop(r15)?;
        Ok(())
    }

    /// Adds 1 to data slot `slot` (see [`layout::DATA`](super::layout::DATA)).
    ///
    /// # Errors
    ///
    /// [`Error::Assemble`].
    pub fn count(&mut self, slot: usize) -> Result<()> {
        self.asm.inc(qword_ptr(data_slot(slot)))?;
        Ok(())
    }

    /// Enables interrupts and halts until one arrives; its handler resumes after this point with
    /// interrupts disabled. Clobbers `rax`.
    ///
    /// An interrupt raised while the program was elsewhere (interrupts are disabled outside this
    /// wait) stays pending in its controller and is taken here at once.
    ///
    /// # Errors
    ///
    /// [`Error::Assemble`].
    pub fn wait_for_interrupt(&mut self) -> Result<()> {
        self.with_interrupts(|a| {
            let mut halt = a.create_label();
            a.set_label(&mut halt)?;
            // `sti` delays interrupts by one instruction, so none can slip in before `hlt`.
            a.hlt()?;
            // Woken without an interrupt (nothing else wakes a halted vCPU here): halt again.
            a.jmp(halt)?;
            Ok(())
        })
    }

    /// Emits: record the resume point and stack pointer, the `before_sti` hook, `sti`, `body`,
    /// `cli`, and the resume point that handlers jump to. Clobbers `rax`.
    fn with_interrupts(
        &mut self,
        body: impl FnOnce(&mut CodeAssembler) -> Result<()>,
    ) -> Result<()> {
        let mut resume = self.asm.create_label();
        self.asm.mov(qword_ptr(SAVED_RSP_SLOT).gs(), rsp)?;
        self.asm.lea(rax, ptr(resume))?;
        self.asm.mov(qword_ptr(RESUME_SLOT).gs(), rax)?;
        self.emit_before_sti()?;
        self.asm.sti()?;
        body(&mut self.asm)?;
        self.asm.cli()?;
        self.asm.set_label(&mut resume)?;
        // Zero bytes carry the label, so the caller may put its own label next.
        self.asm.zero_bytes()?;
        Ok(())
    }

    /// Enables interrupts for `nops` instructions without halting, then disables them again; an
    /// interrupt delivered meanwhile runs its handler, and the program goes on after the window
    /// either way. Clobbers `rax`.
    ///
    /// A pending interrupt is not guaranteed to be delivered within such a window (on an emulating
    /// host delivery can wait for a halt; vm-notify's docs/ARCHITECTURE.md, host notes). To take
    /// everything pending, use [`drain_interrupts`](Self::drain_interrupts).
    ///
    /// # Errors
    ///
    /// [`Error::Assemble`].
    pub fn interrupt_window(&mut self, nops: u32) -> Result<()> {
        self.with_interrupts(|a| {
            for _ in 0..nops {
                a.nop()?;
            }
            Ok(())
        })
    }

    /// Takes every interrupt pending in the local APIC at a higher priority class than
    /// `marker`, deterministically: sends a self-IPI of vector `marker`, then halts until the
    /// marker's handler has run. The LAPIC delivers pending vectors highest class first, so
    /// everything of a higher class that was pending before the IPI has been handled by then.
    /// Installs a counting handler with a LAPIC EOI for `marker` unless the program has one.
    /// Needs the LAPIC enabled; clobbers `rax` and `r13`.
    ///
    /// # Errors
    ///
    /// [`Error::Assemble`].
    pub fn drain_interrupts(&mut self, marker: u8) -> Result<()> {
        self.handlers.entry(marker).or_insert(Handler {
            eoi: Eoi::Lapic,
            body: None,
        });
        let count = IRQ_COUNTS + 8 * u64::from(marker);
        let mut again = self.asm.create_label();
        self.asm.mov(r13, qword_ptr(count).gs())?;
        // ICR low: fixed delivery, level assert, destination shorthand "self".
        self.asm.mov(rax, LAPIC + 0x300)?;
        self.asm
            .mov(dword_ptr(rax), (1u32 << 18) | (1 << 14) | u32::from(marker))?;
        self.asm.set_label(&mut again)?;
        self.wait_for_interrupt()?;
        self.asm.cmp(qword_ptr(count).gs(), r13)?;
        self.asm.je(again)?;
        Ok(())
    }

    /// Emits `body` for vCPU `index` alone: the other vCPUs of a
    /// [`TinyVm::with_vcpus`](super::TinyVm::with_vcpus) machine skip it (every vCPU runs the
    /// same program, from the start). Clobbers nothing but what `body` does.
    ///
    /// # Errors
    ///
    /// [`Error::Assemble`], and those of `body`.
    pub fn on_vcpu(
        &mut self,
        index: usize,
        body: impl FnOnce(&mut GuestProgram) -> Result<()>,
    ) -> Result<()> {
        let mut skip = self.asm.create_label();
        self.asm
            .cmp(qword_ptr(VCPU_INDEX_SLOT).gs(), index as i32)?;
        self.asm.jne(skip)?;
        body(self)?;
        self.asm.set_label(&mut skip)?;
        self.asm.zero_bytes()?;
        Ok(())
    }

    /// Writes `value` to the MMIO address `addr` with a write of `width` bytes (1, 2, 4 or 8).
    /// Clobbers `rax` and `rdx`.
    ///
    /// # Errors
    ///
    /// [`Error::Assemble`], or [`Error::Width`] for another width.
    pub fn mmio_write(&mut self, addr: u64, value: u64, width: usize) -> Result<()> {
        let a = &mut self.asm;
        a.mov(rdx, addr)?;
        a.mov(rax, value)?;
        match width {
            1 => a.mov(byte_ptr(rdx), al)?,
            2 => a.mov(word_ptr(rdx), ax)?,
            4 => a.mov(dword_ptr(rdx), eax)?,
            8 => a.mov(qword_ptr(rdx), rax)?,
            _ => return Err(Error::Width(width)),
        }
        Ok(())
    }

    /// One round of the kick/interrupt ping-pong: count a kick in data slot `count` (if given),
    /// write `value` to the 4-byte register `notify` (a queue notify), then wait for the device's
    /// interrupt. Clobbers `rax` and `rdx`. Repeat it with [`repeat`](Self::repeat).
    ///
    /// # Errors
    ///
    /// [`Error::Assemble`].
    pub fn kick_and_wait(&mut self, notify: u64, value: u32, count: Option<usize>) -> Result<()> {
        if let Some(slot) = count {
            self.count(slot)?;
        }
        self.mmio_write(notify, value.into(), 4)?;
        self.wait_for_interrupt()
    }

    /// Writes `value` to port `port` with an `out` of `width` bytes (1, 2 or 4). Clobbers `rax`
    /// and `rdx`.
    ///
    /// # Errors
    ///
    /// [`Error::Assemble`], or [`Error::Width`] for another width.
    pub fn pio_write(&mut self, port: u16, value: u32, width: usize) -> Result<()> {
        let a = &mut self.asm;
        a.mov(edx, u32::from(port))?;
        a.mov(eax, value)?;
        match width {
            1 => a.out(dx, al)?,
            2 => a.out(dx, ax)?,
            4 => a.out(dx, eax)?,
            _ => return Err(Error::Width(width)),
        }
        Ok(())
    }

    /// One guest write of `width` bytes carrying `value` to `addr`, on its bus (MMIO or port
    /// I/O; a port address is taken modulo 2^16). Clobbers `rax` and `rdx`.
    ///
    /// # Errors
    ///
    /// [`Error::Assemble`], or [`Error::Width`] for a width the bus has not.
    pub fn write_to(
        &mut self,
        addr: vm_notify::kvm::IoEventAddress,
        value: u64,
        width: usize,
    ) -> Result<()> {
        match addr {
            vm_notify::kvm::IoEventAddress::Mmio(a) => self.mmio_write(a, value, width),
            vm_notify::kvm::IoEventAddress::Pio(p) => self.pio_write(p as u16, value as u32, width),
        }
    }

    /// Reads `width` bytes (1, 2, 4 or 8) from the MMIO address `addr` into `rax`,
    /// zero-extended. Clobbers `rax` and `rdx`.
    ///
    /// # Errors
    ///
    /// [`Error::Assemble`], or [`Error::Width`] for another width.
    pub fn mmio_read(&mut self, addr: u64, width: usize) -> Result<()> {
        let a = &mut self.asm;
        a.mov(rdx, addr)?;
        match width {
            1 => a.movzx(eax, byte_ptr(rdx))?,
            2 => a.movzx(eax, word_ptr(rdx))?,
            4 => a.mov(eax, dword_ptr(rdx))?,
            8 => a.mov(rax, qword_ptr(rdx))?,
            _ => return Err(Error::Width(width)),
        }
        Ok(())
    }

    /// Programs IOAPIC redirection entry `pin`: `vector`, fixed delivery to APIC 0, active
    /// high, level- or edge-triggered, unmasked. Clobbers `rax` and `rdx`.
    ///
    /// # Errors
    ///
    /// [`Error::Assemble`].
    pub fn route_ioapic_pin(&mut self, pin: u8, vector: u8, level: bool) -> Result<()> {
        self.route_ioapic_pin_to(pin, vector, level, 0)
    }

    /// As [`route_ioapic_pin`](Self::route_ioapic_pin), delivering to local APIC `apic_id`
    /// (physical destination mode).
    ///
    /// # Errors
    ///
    /// [`Error::Assemble`].
    pub fn route_ioapic_pin_to(
        &mut self,
        pin: u8,
        vector: u8,
        level: bool,
        apic_id: u8,
    ) -> Result<()> {
        let low = u64::from(vector) | if level { 1 << 15 } else { 0 };
        let select = IOAPIC;
        let window = IOAPIC + 0x10;
        self.mmio_write(select, 0x11 + 2 * u64::from(pin), 4)?;
        self.mmio_write(window, u64::from(apic_id) << 24, 4)?;
        self.mmio_write(select, 0x10 + 2 * u64::from(pin), 4)?;
        self.mmio_write(window, low, 4)
    }

    /// Takes IOAPIC pin `pin` as `vector` (fixed delivery to APIC 0, level- or edge-triggered)
    /// on `irqchip`: on the in-kernel one both 8259s are masked first (the default routes send
    /// legacy GSIs to them too); on the split one there is no PIC to mask. Then enables the local
    /// APIC and programs the redirection entry. Clobbers `rax`, `rdx`, `al` and `dx`.
    ///
    /// # Errors
    ///
    /// [`Error::Assemble`].
    pub fn take_ioapic_pin(
        &mut self,
        irqchip: crate::Irqchip,
        pin: u8,
        vector: u8,
        level: bool,
    ) -> Result<()> {
        if irqchip == crate::Irqchip::Kernel {
            self.init_pic(0x20, 0xffff, 0)?;
        }
        self.enable_lapic()?;
        self.route_ioapic_pin(pin, vector, level)
    }

    /// Writes `value` to [`HOST_PORT`]: the host's exit handler sees it, and the program goes
    /// on. Clobbers `eax`.
    ///
    /// # Errors
    ///
    /// [`Error::Assemble`].
    pub fn signal_host(&mut self, value: u32) -> Result<()> {
        self.asm.mov(eax, value)?;
        self.asm.out(u32::from(HOST_PORT), eax)?;
        Ok(())
    }

    /// Ends the run: writes [`DONE_PORT`] and halts with interrupts disabled.
    ///
    /// # Errors
    ///
    /// [`Error::Assemble`].
    pub fn exit(&mut self) -> Result<()> {
        let mut stop = self.asm.create_label();
        self.asm.cli()?;
        self.asm.out(u32::from(DONE_PORT), eax)?;
        self.asm.set_label(&mut stop)?;
        self.asm.hlt()?;
        self.asm.jmp(stop)?;
        Ok(())
    }

    /// Initialises both 8259 PICs: vectors `base..base+16`, the IRQs whose bit is clear in
    /// `mask` unmasked (keep bit 2, the cascade, clear to reach IRQ 8–15), and the IRQs whose bit
    /// is set in `level` level-triggered (ELCR). Clobbers `al` and `dx`.
    ///
    /// # Errors
    ///
    /// [`Error::Assemble`].
    pub fn init_pic(&mut self, base: u8, mask: u16, level: u16) -> Result<()> {
        let a = &mut self.asm;
        let out = |a: &mut CodeAssembler, port: u32, v: u8| -> Result<()> {
            a.mov(al, u32::from(v))?;
            a.out(port, al)?;
            Ok(())
        };
        // ICW1: edge/level per ELCR, cascade, ICW4 follows.
        out(a, 0x20, 0x11)?;
        out(a, 0xa0, 0x11)?;
        // ICW2: vector bases.
        out(a, 0x21, base)?;
        out(a, 0xa1, base.wrapping_add(8))?;
        // ICW3: slave on master's IRQ 2; slave identity 2.
        out(a, 0x21, 0x04)?;
        out(a, 0xa1, 0x02)?;
        // ICW4: 8086 mode.
        out(a, 0x21, 0x01)?;
        out(a, 0xa1, 0x01)?;
        // OCW1: masks.
        out(a, 0x21, mask as u8)?;
        out(a, 0xa1, (mask >> 8) as u8)?;
        // ELCR at 0x4d0/0x4d1 is above 0xff: it needs the port in dx.
        for (port, bits) in [(0x4d0u32, level as u8), (0x4d1, (level >> 8) as u8)] {
            a.mov(dx, port)?;
            a.mov(al, u32::from(bits))?;
            a.out(dx, al)?;
        }
        Ok(())
    }

    /// Software-enables the local APIC (SVR bit 8, spurious vector 0xff) so it accepts MSIs and
    /// IOAPIC interrupts. Clobbers `rax`.
    ///
    /// # Errors
    ///
    /// [`Error::Assemble`].
    pub fn enable_lapic(&mut self) -> Result<()> {
        self.asm.mov(rax, LAPIC + 0xf0)?;
        self.asm.mov(dword_ptr(rax), 0x1ffu32)?;
        Ok(())
    }

    /// Emits `hook` right before every `sti` the kit emits from here on (in
    /// [`wait_for_interrupt`](Self::wait_for_interrupt), [`interrupt_window`](Self::interrupt_window)
    /// and [`drain_interrupts`](Self::drain_interrupts)): a point that precedes every interrupt
    /// the following wait can take, for a test that records state there. The hook may clobber
    /// `rax`.
    pub fn before_enabling_interrupts(
        &mut self,
        hook: impl Fn(&mut CodeAssembler) -> Result<()> + Send + 'static,
    ) {
        self.before_sti = Some(Box::new(hook));
    }

    fn emit_before_sti(&mut self) -> Result<()> {
        match &self.before_sti {
            Some(hook) => hook(&mut self.asm),
            None => Ok(()),
        }
    }

    /// Handles `vector`: count it in [`IRQ_COUNTS`] and send `eoi`.
    pub fn on_interrupt(&mut self, vector: u8, eoi: Eoi) {
        self.handlers.insert(vector, Handler { eoi, body: None });
    }

    /// Handles `vector`: count it, run `body` (which must leave the stack as it found it), then
    /// send `eoi`.
    pub fn on_interrupt_with(
        &mut self,
        vector: u8,
        eoi: Eoi,
        body: impl FnOnce(&mut CodeAssembler) -> Result<()> + Send + 'static,
    ) {
        self.handlers.insert(
            vector,
            Handler {
                eoi,
                body: Some(Box::new(body)),
            },
        );
    }

    /// Appends the handlers and a stub for every other vector, and assembles at
    /// [`CODE`](super::layout::CODE).
    ///
    /// # Errors
    ///
    /// [`Error::Assemble`], or [`Error::ProgramTooLarge`].
    pub fn assemble(mut self) -> Result<AssembledProgram> {
        let mut handled = [false; 256];
        let mut labels: Vec<CodeLabel> = Vec::with_capacity(256);
        let mut handlers = std::mem::take(&mut self.handlers);
        for vector in 0..=255u8 {
            let mut label = self.asm.create_label();
            self.asm.set_label(&mut label)?;
            match handlers.remove(&vector) {
                Some(h) => {
                    handled[usize::from(vector)] = true;
                    self.emit_handler(vector, h)?;
                }
                None => self.emit_unexpected(vector)?,
            }
            labels.push(label);
        }
        let result = self
            .asm
            .assemble_options(CODE, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
        let mut vectors = [0u64; 256];
        for (entry, label) in vectors.iter_mut().zip(&labels) {
            *entry = result.label_ip(label)?;
        }
        let code = result.inner.code_buffer;
        if code.len() > CODE_MAX {
            return Err(Error::ProgramTooLarge {
                bytes: code.len(),
                max: CODE_MAX,
            });
        }
        Ok(AssembledProgram {
            code,
            vectors,
            handled,
        })
    }

    fn emit_handler(&mut self, vector: u8, h: Handler) -> Result<()> {
        let a = &mut self.asm;
        a.inc(qword_ptr(IRQ_COUNTS + 8 * u64::from(vector)).gs())?;
        if let Some(body) = h.body {
            body(a)?;
        }
        match h.eoi {
            Eoi::None => {}
            Eoi::PicMaster | Eoi::PicSlave => {
                a.mov(al, 0x20u32)?;
                if h.eoi == Eoi::PicSlave {
                    a.out(0xa0u32, al)?;
                }
                a.out(0x20u32, al)?;
            }
            Eoi::Lapic => {
                a.mov(rax, LAPIC + 0xb0)?;
                a.mov(dword_ptr(rax), 0u32)?;
            }
        }
        // Drop the interrupt frame and go back to the wait that took the interrupt.
        a.mov(rsp, qword_ptr(SAVED_RSP_SLOT).gs())?;
        a.jmp(qword_ptr(RESUME_SLOT).gs())?;
        Ok(())
    }

    fn emit_unexpected(&mut self, vector: u8) -> Result<()> {
        let a = &mut self.asm;
        a.mov(eax, u32::from(vector))?;
        a.out(u32::from(UNEXPECTED_VECTOR_PORT), eax)?;
        a.hlt()?;
        Ok(())
    }
}

/// A program ready to load: its code and the address of each vector's handler.
#[derive(Debug, Clone)]
pub struct AssembledProgram {
    code: Vec<u8>,
    vectors: [u64; 256],
    handled: [bool; 256],
}

impl AssembledProgram {
    /// The machine code, to be loaded at [`CODE`](super::layout::CODE).
    pub fn code(&self) -> &[u8] {
        &self.code
    }

    /// The entry point of every vector's handler (the kit's stub for unexpected vectors).
    pub fn vectors(&self) -> &[u64; 256] {
        &self.vectors
    }

    /// The address of the program's own handler for `vector`, if it has one.
    pub fn handler(&self, vector: u8) -> Option<u64> {
        let v = usize::from(vector);
        self.handled[v].then_some(self.vectors[v])
    }
}
