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

const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const LENS: u64 = 0x3000;
const SUBMITTED: u64 = 0x3800;
const MISMATCHES: u64 = 0x3808;
const SLEEPS: u64 = 0x3810;
const BUFFERS: u64 = 0x4000;

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
    /// 16), descriptor `i` holding `lengths[i % lengths.len()]` bytes (1 to [`MAX_BUFFER`]).
    ///
    /// # Errors
    ///
    /// [`Error::Memory`] naming what does not fit.
    pub fn new(slot: u16, size: u16, lengths: &[u32]) -> Result<SplitQueue> {
        if slot >= MAX_QUEUES || !size.is_power_of_two() || size > 16 || lengths.is_empty() {
            return Err(Error::Memory(format!(
                "queue slot {slot} (below {MAX_QUEUES}), size {size} (a power of two up to 16), {} lengths (at least 1)",
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
        vm.write_u64(self.region + SUBMITTED, 0)?;
        vm.write_u64(self.region + SLEEPS, 0)?;
        vm.write_u64(self.region + MISMATCHES, 0)
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
        let mut nonzero = a.create_label();
        a.mov(rdx, base + vm_notify::virtio::MMIO_INTERRUPT_STATUS)?;
        a.mov(eax, dword_ptr(rdx))?;
        a.or(qword_ptr(super::layout::data_slot(seen_slot)), rax)?;
        a.test(eax, eax)?;
        a.jnz(nonzero)?;
        a.inc(qword_ptr(super::layout::data_slot(zero_slot)))?;
        a.set_label(&mut nonzero)?;
        a.mov(rdx, base + vm_notify::virtio::MMIO_INTERRUPT_ACK)?;
        a.mov(dword_ptr(rdx), eax)?;
        Ok(())
    }
}
