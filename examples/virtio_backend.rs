//! An in-process virtio-rng device on virtio-mmio, driven by a tiny guest.
//!
//! The device thread waits on its queue's kick notifier (an ioeventfd on QueueNotify) and on the
//! interrupt's resample notifier with an `EventLoop`; on a kick it pops every available descriptor
//! chain with the rust-vmm `virtio-queue` crate, fills the buffers with random bytes, adds them to
//! the used ring and calls `trigger` (InterruptStatus bit 0, level line asserted). The guest is
//! the driver: it makes a descriptor available, kicks, waits for the interrupt, reads
//! InterruptStatus and acknowledges it in its handler, checks the used ring, and repeats.
//!
//! Run: `cargo run --release --example virtio_backend [requests]`. It ends with a `summary:` line
//! and exits non-zero if a count disagrees.

#[path = "../tests/common/virtio_rng.rs"]
mod virtio_rng;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use virtio_rng::RngDevice;
use vm_device::bus::{MmioAddress, MmioRange};
use vm_device::device_manager::{IoManager, MmioManager};
use vm_notify::fallback::{Placement, Policy};
use vm_notify::io::IoRegion;
use vm_notify::virtio::MmioLayout;
use vm_notify_testkit::{Eoi, GuestExit, GuestProgram, SplitQueue, TinyVm};

const BASE: u64 = 0xd000_0000;
/// virtio-mmio `QueueNotify`, from virtio-bindings.
const MMIO_QUEUE_NOTIFY: u64 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// `InterruptStatus` bit: a used buffer was added.
const INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
const IRQ: u8 = 5;
const VECTOR: u8 = 0x20 + IRQ;
const SEEN_SLOT: usize = 0;
const ZERO_SLOT: usize = 1;
const LENGTHS: [u32; 4] = [16, 64, 256, 512];
const TIMEOUT: Duration = Duration::from_secs(120);

fn run(requests: u64) -> Result<bool, Box<dyn std::error::Error>> {
    let mut vm = TinyVm::new()?;
    let device = MmioLayout {
        base: BASE,
        queues: 1,
        gsi: IRQ.into(),
    };
    let root = vm.notify().with_policy(Policy::Auto);
    vm.run_injector(&root)?;
    let notify = Arc::new(root.virtio_mmio(&device)?);
    let queue = SplitQueue::new(0, 16, &LENGTHS)?;
    queue.lay_out(&vm)?;

    // The driver.
    let mut p = GuestProgram::new()?;
    p.init_pic(0x20, !((1u16 << IRQ) | (1 << 2)), 1 << IRQ)?;
    p.on_interrupt_with(VECTOR, Eoi::PicMaster, |a| {
        GuestProgram::virtio_mmio_ack(a, BASE, SEEN_SLOT, ZERO_SLOT)
    });
    p.repeat(requests, |p| {
        p.virtq_submit(&queue)?;
        p.mmio_write(BASE + MMIO_QUEUE_NOTIFY, 0, 4)?;
        p.virtq_wait_used(&queue)
    })?;
    p.exit()?;

    // The device.
    let queues = [(notify.queue(0).ok_or("no queue 0")?, queue.clone())];
    let (stop, device) = RngDevice::new(
        vm.memory().clone(),
        &queues,
        Some(notify.interrupt().clone()),
    )
    .spawn();

    // The VMM's exits, routed once through its `IoManager`: the device's notification registers
    // (QueueNotify to InterruptACK) are vm-notify's `IoRegion`; on the userspace path the queue
    // notification is the dispatcher's first.
    let mut io = IoManager::new();
    io.register_mmio(
        MmioRange::new(MmioAddress(BASE + MMIO_QUEUE_NOTIFY), 0x18)?,
        Arc::new(IoRegion::mmio_notify(notify.clone())),
    )?;
    let dispatcher = root.dispatcher().clone();
    let report = vm
        .start(p, move |e: &GuestExit, data: &mut [u8]| {
            // Other reads read as 0 (the run loop zeroes `data`); other writes are dropped.
            if !e.dispatch(&dispatcher).unwrap_or(false) {
                e.route(&io, data);
            }
        })?
        .wait(TIMEOUT);
    stop.stop()?;
    let stats = device.join().map_err(|_| "device thread panicked")?;
    let report = report.done()?;

    let completed = queue.used_idx(&vm)?;
    let submitted = queue.submitted(&vm)?;
    let guest_irqs = vm.irq_count(VECTOR)?;
    let zero_reads = vm.data(ZERO_SLOT)?;
    let untaken = notify.interrupt().status() & INT_VRING != 0;
    let distinct = queue.distinct_words(&vm)?;
    let elapsed = report.elapsed.as_secs_f64();
    println!("vm-notify virtio-rng on virtio-mmio at {BASE:#x}, PIC IRQ {IRQ} (level, resample)");
    let queue_path = notify
        .queue_placement(0)
        .map_or_else(|| "none".to_string(), |p| format!("{p:?}"));
    println!(
        "  paths: queue notify {queue_path}, interrupt {:?}",
        notify.line_placement().unwrap()
    );
    println!("  requests submitted by the guest: {submitted}, used: {completed}");
    println!(
        "  bytes written by the device:     {} ({} distinct 8-byte words in the final buffers)",
        stats.bytes, distinct
    );
    println!(
        "  used-length mismatches (guest):  {}",
        queue.mismatches(&vm)?
    );
    println!(
        "  kicks seen by the device:        {} in {} wake-ups",
        stats.kicks, stats.wakeups
    );
    println!(
        "  used-buffer signals:             {} ({} needed a new interrupt; the others found INT_VRING still set)",
        stats.signals, stats.new_interrupts
    );
    println!(
        "  resamples:                       {} ({} re-asserted the line)",
        stats.resamples, stats.reasserts
    );
    println!(
        "  interrupts taken by the guest:   {guest_irqs} ({zero_reads} with nothing to report; {} due at exit, not waited for)",
        u8::from(untaken)
    );
    // A kernel irqfd's assertions can land late (see `check_interrupts`).
    let late = *notify.line_placement().unwrap() == Placement::Kernel;
    let interrupts = stats.check_interrupts(guest_irqs, zero_reads, untaken, late);
    if let Err(e) = &interrupts {
        println!("  interrupt accounting:            WRONG: {e}");
    }
    println!(
        "  exits to userspace:              {} (InterruptStatus reads and InterruptACK writes)",
        report.exits.len()
    );
    println!(
        "  guest run time:                  {elapsed:.3} s, {:.1} us per request",
        elapsed * 1e6 / requests as f64
    );
    println!(
        "summary: requests={requests} completed={completed} bytes={} device_kicks={} used_signals={} new_interrupts={} guest_irqs={guest_irqs}",
        stats.bytes, stats.kicks, stats.signals, stats.new_interrupts
    );
    Ok(submitted == requests
        && u64::from(completed) == requests % 65536
        && queue.mismatches(&vm)? == 0
        && stats.requests == [requests]
        && interrupts.is_ok()
        && distinct > 100)
}

fn main() -> ExitCode {
    let requests: u64 = match std::env::args().nth(1).map(|a| a.parse()) {
        None => 1000,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("usage: virtio_backend [requests > 0]");
            return ExitCode::from(2);
        }
    };
    match run(requests) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("virtio_backend: counts disagree");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("virtio_backend: {e}");
            ExitCode::FAILURE
        }
    }
}
