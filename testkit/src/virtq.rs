//! A tiny guest as a virtio driver: split virtqueues in guest memory, and the guest code that
//! makes buffers available, kicks, and waits for them to be used.
//!
//! The host lays the queue out before the run ([`SplitQueue::lay_out`]): descriptor `i` is one
//! device-writable buffer of [`SplitQueue::buffer_len`]`(i)` bytes, and the table of expected
//! used lengths the guest checks against. The guest then, per request:
//! [`GuestProgram::virtq_submit`] puts the next descriptor in the available ring and publishes
//! the new index; the caller kicks (a queue-notify write); [`GuestProgram::virtq_wait_used`]
//! sleeps in interrupt windows until the used index catches up, then checks the last used
//! element's length, counting mismatches in guest memory ([`SplitQueue::mismatches`]).
//!
//! Descriptors are reused in ring order, so at most `size` requests may be outstanding.
//!
//! [`GuestProgram::virtq_batches`] is a whole driver loop with notification suppression: batches
//! of requests at the depths a host-written table says, kicking only when the device asks and
//! asking for an interrupt only before it sleeps ([`Suppression`]), counting its kicks, sleeps,
//! and the times the device finished between its asking and its sleeping.

use iced_x86::code_asm::*;

use super::program::GuestProgram;
use super::{Error, Result};
use crate::machine::TinyVm;

/// First guest-physical address of the queue regions (below the stack, above the data slots).
pub const QUEUES_BASE: u64 = 0x2_0000;
/// Bytes of guest memory each queue takes, from `QUEUES_BASE + index * QUEUE_REGION`.
pub const QUEUE_REGION: u64 = 0x1_0000;
/// How many queue regions fit below the stack.
pub const MAX_QUEUES: u16 = 4;
/// The largest buffer length.
pub const MAX_BUFFER: u32 = 512;
/// The largest queue size.
pub const MAX_SIZE: u16 = 64;
/// The most batches [`GuestProgram::virtq_batches`] can run (its depth table's length).
pub const MAX_BATCHES: usize = 0x4000;

const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const LENS: u64 = 0x3000;
const SUBMITTED: u64 = 0x3800;
const MISMATCHES: u64 = 0x3808;
const SLEEPS: u64 = 0x3810;
const KICKS: u64 = 0x3818;
const RACES: u64 = 0x3820;
const BUFFERS: u64 = 0x4000;
/// One byte per batch: its depth (after `MAX_SIZE` buffers of `MAX_BUFFER` bytes).
const DEPTHS: u64 = 0xc000;

/// `VRING_AVAIL_F_NO_INTERRUPT` and `VRING_USED_F_NO_NOTIFY`.
const F_NO_INTERRUPT: u16 = 1;
const F_NO_NOTIFY: u16 = 1;

/// How the guest's driver suppresses notifications (the virtio spec's split virtqueue rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Suppression {
    /// None: a kick for every request, and interrupts always welcome.
    Off,
    /// The flags: a kick only while the used ring's `VRING_USED_F_NO_NOTIFY` is clear;
    /// `VRING_AVAIL_F_NO_INTERRUPT` set except while the driver waits.
    Flags,
    /// `VIRTIO_RING_F_EVENT_IDX`: a kick only when `vring_need_event(avail_event, new, old)`;
    /// `used_event` pointed at the batch's last buffer just before the driver waits, and left
    /// behind the used index otherwise.
    EventIdx,
    /// `VIRTIO_RING_F_EVENT_IDX` as Linux's `virtqueue_enable_cb` uses it: before waiting,
    /// `used_event` is the used index the driver has seen, asking for an interrupt at the next
    /// used buffer (so a device without moderation interrupts once per buffer used while the
    /// driver waits). Kicks as [`EventIdx`](Self::EventIdx).
    EventIdxEach,
}

/// `VIRTQ_DESC_F_WRITE`: the device writes the buffer.
const DESC_F_WRITE: u16 = 2;

/// A split virtqueue in the tiny guest's memory (see the module docs).
#[derive(Debug, Clone)]
pub struct SplitQueue {
    region: u64,
    size: u16,
    lengths: Vec<u32>,
}

impl SplitQueue {
    /// Queue region `slot` (below [`MAX_QUEUES`]) with `size` descriptors (a power of two up to
    /// [`MAX_SIZE`]), descriptor `i` holding `lengths[i % lengths.len()]` bytes (1 to [`MAX_BUFFER`]).
    ///
    /// # Errors
    ///
    /// [`Error::Memory`] naming what does not fit.
    pub fn new(slot: u16, size: u16, lengths: &[u32]) -> Result<SplitQueue> {
        if slot >= MAX_QUEUES || !size.is_power_of_two() || size > MAX_SIZE || lengths.is_empty() {
            return Err(Error::Memory(format!(
                "queue slot {slot} (below {MAX_QUEUES}), size {size} (a power of two up to {MAX_SIZE}), {} lengths (at least 1)",
                lengths.len()
            )));
        }
        if let Some(&bad) = lengths.iter().find(|&&l| l == 0 || l > MAX_BUFFER) {
            return Err(Error::Memory(format!(
                "buffer length {bad}: 1 to {MAX_BUFFER} bytes"
            )));
        }
        Ok(SplitQueue {
            region: QUEUES_BASE + u64::from(slot) * QUEUE_REGION,
            size,
            lengths: (0..size)
                .map(|i| lengths[usize::from(i) % lengths.len()])
                .collect(),
        })
    }

    /// The number of descriptors.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest-physical address of the descriptor table.
    pub fn desc_table(&self) -> u64 {
        self.region
    }

    /// Guest-physical address of the available ring.
    pub fn avail_ring(&self) -> u64 {
        self.region + AVAIL
    }

    /// Guest-physical address of the used ring.
    pub fn used_ring(&self) -> u64 {
        self.region + USED
    }

    /// Guest-physical address of descriptor `i`'s buffer.
    pub fn buffer(&self, i: u16) -> u64 {
        self.region + BUFFERS + u64::from(i % self.size) * u64::from(MAX_BUFFER)
    }

    /// Descriptor `i`'s buffer length: the used length the device must report for it.
    pub fn buffer_len(&self, i: u16) -> u32 {
        self.lengths[usize::from(i % self.size)]
    }

    /// The queue's layout as queue `index` of a device, for
    /// vm-notify's `VhostUserFrontend::start_queue` (its feature `vhost-user`).
    pub fn vring(&self, index: u16) -> vm_notify::virtio::VringLayout {
        vm_notify::virtio::VringLayout {
            index,
            size: self.size,
            desc_table: self.desc_table(),
            avail_ring: self.avail_ring(),
            used_ring: self.used_ring(),
        }
    }

    /// Writes the descriptor table, zeroed rings and the expected lengths into `vm`'s memory.
    ///
    /// # Errors
    ///
    /// [`Error::Memory`].
    pub fn lay_out(&self, vm: &TinyVm) -> Result<()> {
        for i in 0..self.size {
            let at = self.region + 16 * u64::from(i);
            vm.write_u64(at, self.buffer(i))?;
            // len (u32), flags (u16), next (u16).
            let word = u64::from(self.buffer_len(i)) | (u64::from(DESC_F_WRITE) << 32);
            vm.write_u64(at + 8, word)?;
            vm.write_u64(
                self.region + LENS + 8 * u64::from(i),
                self.buffer_len(i).into(),
            )?;
        }
        for ring in [AVAIL, USED] {
            for off in (0..4 + 8 * u64::from(self.size) + 8).step_by(8) {
                vm.write_u64(self.region + ring + off, 0)?;
            }
        }
        for slot in [SUBMITTED, SLEEPS, MISMATCHES, KICKS, RACES] {
            vm.write_u64(self.region + slot, 0)?;
        }
        Ok(())
    }

    /// Writes the depth of each batch [`GuestProgram::virtq_batches`] runs: 1 to the queue's
    /// size, at most [`MAX_BATCHES`] of them.
    ///
    /// # Errors
    ///
    /// [`Error::Memory`] naming a depth or a count out of range.
    pub fn write_depths(&self, vm: &TinyVm, depths: &[u8]) -> Result<()> {
        if depths.len() > MAX_BATCHES {
            return Err(Error::Memory(format!(
                "{} batches: at most {MAX_BATCHES}",
                depths.len()
            )));
        }
        if let Some(&bad) = depths.iter().find(|&&d| d == 0 || u16::from(d) > self.size) {
            return Err(Error::Memory(format!(
                "batch depth {bad}: 1 to the queue size, {}",
                self.size
            )));
        }
        for (i, chunk) in depths.chunks(8).enumerate() {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            vm.write_u64(
                self.region + DEPTHS + 8 * i as u64,
                u64::from_le_bytes(word),
            )?;
        }
        Ok(())
    }

    /// The kicks (queue notify writes) the guest made.
    ///
    /// # Errors
    ///
    /// [`Error::Memory`].
    pub fn kicks(&self, vm: &TinyVm) -> Result<u64> {
        vm.read_u64(self.region + KICKS)
    }

    /// The times the guest asked for an interrupt and then, checking the used ring once more
    /// before sleeping, found its requests done: the device may have raised that interrupt
    /// anyway, and the guest takes it at its next sleep (where the local APIC may merge it with
    /// the next one).
    ///
    /// # Errors
    ///
    /// [`Error::Memory`].
    pub fn races(&self, vm: &TinyVm) -> Result<u64> {
        vm.read_u64(self.region + RACES)
    }

    /// Where the driver publishes `used_event` (EVENT_IDX): after the available ring's entries.
    pub fn used_event(&self) -> u64 {
        self.avail_ring() + 4 + 2 * u64::from(self.size)
    }

    /// Where the device publishes `avail_event` (EVENT_IDX): after the used ring's entries.
    pub fn avail_event(&self) -> u64 {
        self.used_ring() + 4 + 8 * u64::from(self.size)
    }

    /// Requests the guest has submitted so far.
    ///
    /// # Errors
    ///
    /// [`Error::Memory`].
    pub fn submitted(&self, vm: &TinyVm) -> Result<u64> {
        vm.read_u64(self.region + SUBMITTED)
    }

    /// Completions whose used length differed from the descriptor's, as the guest counted them.
    ///
    /// # Errors
    ///
    /// [`Error::Memory`].
    pub fn mismatches(&self, vm: &TinyVm) -> Result<u64> {
        vm.read_u64(self.region + MISMATCHES)
    }

    /// How many times the guest slept in [`GuestProgram::virtq_wait_used`] (each sleep ends with
    /// an interrupt).
    ///
    /// # Errors
    ///
    /// [`Error::Memory`].
    pub fn sleeps(&self, vm: &TinyVm) -> Result<u64> {
        vm.read_u64(self.region + SLEEPS)
    }

    /// How many distinct 8-byte words the buffers hold now: with entropy in them, about as many
    /// as there are words; with constant bytes, one.
    ///
    /// # Errors
    ///
    /// [`Error::Memory`].
    pub fn distinct_words(&self, vm: &TinyVm) -> Result<usize> {
        let mut words = std::collections::BTreeSet::new();
        for i in 0..self.size {
            for off in (0..u64::from(self.buffer_len(i))).step_by(8) {
                words.insert(vm.read_u64(self.buffer(i) + off)?);
            }
        }
        Ok(words.len())
    }

    /// The used ring's index, as the device left it.
    ///
    /// # Errors
    ///
    /// [`Error::Memory`].
    pub fn used_idx(&self, vm: &TinyVm) -> Result<u16> {
        Ok((vm.read_u64(self.used_ring())? >> 16) as u16)
    }
}

impl GuestProgram {
    /// Makes the next descriptor of `q` available: writes its index into the available ring and
    /// publishes the new available index. Clobbers `rax`, `rcx` and `rdx`.
    ///
    /// # Errors
    ///
    /// [`Error::Assemble`].
    pub fn virtq_submit(&mut self, q: &SplitQueue) -> Result<()> {
        let a = self.asm();
        a.mov(rax, qword_ptr(q.region + SUBMITTED))?;
        a.mov(rcx, rax)?;
        a.and(ecx, u32::from(q.size - 1))?;
        a.mov(rdx, q.avail_ring() + 4)?;
        a.mov(word_ptr(rdx + rcx * 2), cx)?;
        a.inc(rax)?;
        a.mov(qword_ptr(q.region + SUBMITTED), rax)?;
        a.mov(rdx, q.avail_ring() + 2)?;
        a.mov(word_ptr(rdx), ax)?;
        Ok(())
    }

    /// Waits, in interrupt windows, until the device has used every buffer submitted on `q`;
    /// then compares the last used element's length with its descriptor's and counts a mismatch.
    /// Clobbers `rax`, `rcx` and `rdx`.
    ///
    /// # Errors
    ///
    /// [`Error::Assemble`].
    pub fn virtq_wait_used(&mut self, q: &SplitQueue) -> Result<()> {
        let mut check = self.asm().create_label();
        let mut done = self.asm().create_label();
        let mut same = self.asm().create_label();
        let a = self.asm();
        a.set_label(&mut check)?;
        a.mov(rdx, q.used_ring() + 2)?;
        a.movzx(eax, word_ptr(rdx))?;
        a.mov(rcx, qword_ptr(q.region + SUBMITTED))?;
        a.cmp(ax, cx)?;
        a.je(done)?;
        a.inc(qword_ptr(q.region + SLEEPS))?;
        self.wait_for_interrupt()?;
        let a = self.asm();
        a.jmp(check)?;
        a.set_label(&mut done)?;
        a.dec(rcx)?;
        a.and(ecx, u32::from(q.size - 1))?;
        a.mov(rdx, q.used_ring() + 4)?;
        a.mov(eax, dword_ptr(rdx + rcx * 8 + 4))?;
        a.mov(rdx, q.region + LENS)?;
        a.cmp(eax, dword_ptr(rdx + rcx * 8))?;
        a.je(same)?;
        a.inc(qword_ptr(q.region + MISMATCHES))?;
        a.set_label(&mut same)?;
        a.zero_bytes()?;
        Ok(())
    }

    /// A whole driver on `q`: `batches` batches, each of the depth
    /// [`SplitQueue::write_depths`] gave it. A batch makes its requests available one by one,
    /// as independent requests come: each is put in the available ring, the index published, and
    /// a kick made (`notify_value`, `width` bytes, written to `notify`) unless `mode` lets the
    /// driver skip it. Then it waits until every request is used: it asks for an interrupt as
    /// `mode` says, checks the used ring once more, and sleeps only if requests are still
    /// outstanding. Then it checks every used element's length against its descriptor's.
    /// Counts kicks, sleeps, races and mismatches in the queue's slots. Clobbers `rax`, `rbx`,
    /// `rcx`, `rdx`, `rsi`, `r8` and `r9`.
    ///
    /// # Errors
    ///
    /// [`Error::Assemble`], [`Error::Width`] for a notify width other than 1, 2 or 4, and
    /// [`Error::Memory`] for more than [`MAX_BATCHES`] batches.
    pub fn virtq_batches(
        &mut self,
        q: &SplitQueue,
        batches: usize,
        notify: (u64, u64, usize),
        mode: Suppression,
    ) -> Result<()> {
        self.virtq_batches_timed(q, batches, notify, mode, None)
    }

    /// As [`virtq_batches`](Self::virtq_batches), and with `times` the time-stamp counter ticks
    /// each batch took, from before its first buffer was made available until the guest saw
    /// the last one used, as `u32`s from guest-physical `times` (batch `i` at `times + 4 * i`;
    /// 4 bytes a batch, which the caller keeps free). Also clobbers `r10`.
    ///
    /// # Errors
    ///
    /// As [`virtq_batches`](Self::virtq_batches).
    pub fn virtq_batches_timed(
        &mut self,
        q: &SplitQueue,
        batches: usize,
        notify: (u64, u64, usize),
        mode: Suppression,
        times: Option<u64>,
    ) -> Result<()> {
        if batches > MAX_BATCHES {
            return Err(Error::Memory(format!(
                "{batches} batches: at most {MAX_BATCHES}"
            )));
        }
        let (notify, notify_value, width) = notify;
        if !matches!(width, 1 | 2 | 4) {
            return Err(Error::Width(width));
        }
        let mask = u32::from(q.size - 1);
        let (avail, used) = (q.avail_ring(), q.used_ring());
        let slot = |s: u64| qword_ptr(q.region + s);
        let a = self.asm();
        let mut batch = a.create_label();
        let mut submit = a.create_label();
        let mut no_kick = a.create_label();
        let mut wait = a.create_label();
        let mut raced = a.create_label();
        let mut moved = a.create_label();
        let mut done = a.create_label();
        let mut check = a.create_label();
        let mut same = a.create_label();
        // Interrupts unwelcome until the driver waits.
        match mode {
            Suppression::Off => {}
            Suppression::Flags => a.mov(word_ptr(avail), u32::from(F_NO_INTERRUPT))?,
            Suppression::EventIdx | Suppression::EventIdxEach => {
                a.mov(word_ptr(q.used_event()), 0xffffu32)?
            }
        }
        a.xor(ebx, ebx)?;
        a.set_label(&mut batch)?;
        if times.is_some() {
            // r10: the time stamp at the batch's start.
            a.rdtsc()?;
            a.shl(rdx, 32)?;
            a.or(rax, rdx)?;
            a.mov(r10, rax)?;
        }
        // r8: the batch's requests still to make available; r9: the available index before it.
        a.mov(rdx, q.region + DEPTHS)?;
        a.movzx(r8d, byte_ptr(rdx + rbx))?;
        a.mov(r9, slot(SUBMITTED))?;
        // Each request on its own, as independent requests come: made available, the index
        // published, then a kick unless the device said it needs none.
        a.set_label(&mut submit)?;
        a.mov(rax, slot(SUBMITTED))?;
        a.mov(edx, eax)?;
        a.and(edx, mask)?;
        a.mov(rsi, avail + 4)?;
        a.mov(word_ptr(rsi + rdx * 2), dx)?;
        a.inc(rax)?;
        a.mov(slot(SUBMITTED), rax)?;
        a.mov(word_ptr(avail + 2), ax)?;
        // The index must be visible before the device's wish is read.
        a.mfence()?;
        match mode {
            Suppression::Off => {}
            Suppression::Flags => {
                a.test(word_ptr(used), u32::from(F_NO_NOTIFY))?;
                a.jnz(no_kick)?;
            }
            Suppression::EventIdx | Suppression::EventIdxEach => {
                // vring_need_event(event, new, old = new - 1): (u16)(new - event - 1) < 1,
                // that is, the device asked to be kicked once this very index is published.
                a.movzx(ecx, word_ptr(q.avail_event()))?;
                a.inc(ecx)?;
                a.cmp(ax, cx)?;
                a.jne(no_kick)?;
            }
        }
        a.inc(slot(KICKS))?;
        self.mmio_write(notify, notify_value, width)?;
        let a = self.asm();
        a.set_label(&mut no_kick)?;
        a.dec(r8)?;
        a.jnz(submit)?;
        a.set_label(&mut wait)?;
        a.movzx(eax, word_ptr(used + 2))?;
        a.cmp(ax, word_ptr(avail + 2))?;
        a.je(done)?;
        match mode {
            Suppression::Off => {}
            Suppression::Flags => a.mov(word_ptr(avail), 0u32)?,
            Suppression::EventIdx => {
                a.movzx(edx, word_ptr(avail + 2))?;
                a.dec(edx)?;
                a.mov(word_ptr(q.used_event()), dx)?;
            }
            Suppression::EventIdxEach => a.mov(word_ptr(q.used_event()), ax)?,
        }
        a.mfence()?;
        if mode == Suppression::EventIdxEach {
            // Asked for an interrupt past the used index it saw: if that index has moved since,
            // the interrupt may have come and gone before the request; look again instead.
            a.cmp(ax, word_ptr(used + 2))?;
            a.jne(moved)?;
        } else {
            a.movzx(eax, word_ptr(used + 2))?;
            a.cmp(ax, word_ptr(avail + 2))?;
            a.je(raced)?;
        }
        a.inc(slot(SLEEPS))?;
        self.wait_for_interrupt()?;
        let a = self.asm();
        if mode == Suppression::Flags {
            a.mov(word_ptr(avail), u32::from(F_NO_INTERRUPT))?;
        }
        a.jmp(wait)?;
        a.set_label(&mut moved)?;
        a.inc(slot(RACES))?;
        a.jmp(wait)?;
        a.set_label(&mut raced)?;
        a.zero_bytes()?;
        if mode != Suppression::Off {
            a.inc(slot(RACES))?;
        }
        if mode == Suppression::Flags {
            a.mov(word_ptr(avail), u32::from(F_NO_INTERRUPT))?;
        }
        a.set_label(&mut done)?;
        a.zero_bytes()?;
        if let Some(times) = times {
            a.rdtsc()?;
            a.shl(rdx, 32)?;
            a.or(rax, rdx)?;
            a.sub(rax, r10)?;
            a.mov(rdx, times)?;
            a.mov(dword_ptr(rdx + rbx * 4), eax)?;
        }
        // Every used element of the batch: its length against its descriptor's.
        a.mov(rcx, r9)?;
        a.set_label(&mut check)?;
        a.mov(edx, ecx)?;
        a.and(edx, mask)?;
        a.mov(rsi, used + 4)?;
        a.mov(eax, dword_ptr(rsi + rdx * 8))?;
        a.mov(edx, dword_ptr(rsi + rdx * 8 + 4))?;
        a.mov(rsi, q.region + LENS)?;
        a.cmp(edx, dword_ptr(rsi + rax * 8))?;
        a.je(same)?;
        a.inc(slot(MISMATCHES))?;
        a.set_label(&mut same)?;
        a.inc(rcx)?;
        a.cmp(rcx, slot(SUBMITTED))?;
        a.jne(check)?;
        a.inc(rbx)?;
        a.cmp(rbx, batches as i32)?;
        a.jb(batch)?;
        Ok(())
    }

    /// A virtio-mmio interrupt handler body for the device at `base`: reads `InterruptStatus`,
    /// ORs it into data slot `seen_slot`, counts a read of 0 in data slot `zero_slot` (an
    /// interrupt with nothing to report), and writes the bits read to `InterruptACK`. Use it
    /// inside [`on_interrupt_with`](Self::on_interrupt_with).
    ///
    /// # Errors
    ///
    /// [`Error::Assemble`] (inside the handler body).
    pub fn virtio_mmio_ack(
        a: &mut CodeAssembler,
        base: u64,
        seen_slot: usize,
        zero_slot: usize,
    ) -> Result<()> {
        a.mov(
            rdx,
            base + u64::from(virtio_bindings::virtio_mmio::VIRTIO_MMIO_INTERRUPT_STATUS),
        )?;
        a.mov(eax, dword_ptr(rdx))?;
        Self::record_status(a, seen_slot, zero_slot)?;
        a.mov(
            rdx,
            base + u64::from(virtio_bindings::virtio_mmio::VIRTIO_MMIO_INTERRUPT_ACK),
        )?;
        a.mov(dword_ptr(rdx), eax)?;
        Ok(())
    }

    /// A virtio-pci INTx interrupt handler body: reads the ISR status byte at `isr` (the read
    /// clears it and lowers the line), ORs it into data slot `seen_slot` and counts a read of 0
    /// in data slot `zero_slot` (an interrupt with nothing to report). Use it inside
    /// [`on_interrupt_with`](Self::on_interrupt_with).
    ///
    /// # Errors
    ///
    /// [`Error::Assemble`] (inside the handler body).
    pub fn virtio_pci_isr(
        a: &mut CodeAssembler,
        isr: u64,
        seen_slot: usize,
        zero_slot: usize,
    ) -> Result<()> {
        a.mov(rdx, isr)?;
        a.movzx(eax, byte_ptr(rdx))?;
        Self::record_status(a, seen_slot, zero_slot)
    }

    /// The status bits read into `eax`: ORed into data slot `seen_slot`, a read of 0 counted in
    /// data slot `zero_slot`.
    fn record_status(a: &mut CodeAssembler, seen_slot: usize, zero_slot: usize) -> Result<()> {
        let mut nonzero = a.create_label();
        a.or(qword_ptr(super::layout::data_slot(seen_slot)), rax)?;
        a.test(eax, eax)?;
        a.jnz(nonzero)?;
        a.inc(qword_ptr(super::layout::data_slot(zero_slot)))?;
        a.set_label(&mut nonzero)?;
        Ok(())
    }
}
