//! A guest's entropy queue served by an external vhost-user backend (rust-vmm's
//! `vhost-device-rng`), with no VMM thread in the notification path.
//!
//! The VMM registers the queue's kick notifier as an ioeventfd on QueueNotify and binds its call
//! notifier as an irqfd, then hands both eventfds to the backend (`SET_VRING_KICK`,
//! `SET_VRING_CALL`) with the shared guest memory. The guest driver makes a descriptor available,
//! kicks, waits for the interrupt, checks the used ring, and repeats; kicks go from KVM to the
//! backend and calls from the backend to KVM.
//!
//! Run: `cargo run --release --features vhost-user --example vhost_user_rng [requests]`. The
//! backend is installed on first use with `cargo install --locked` into `target/vhost-backends`
//! (or `$VM_NOTIFY_BACKEND_CACHE`). It ends with a `summary:` line and exits non-zero if a count
//! disagrees.

#[path = "../tests/common/vhost_backend.rs"]
mod vhost_backend;

use std::process::ExitCode;
use std::time::Duration;

use vm_notify::vhost_user::VhostUserFrontend;
use vm_notify::{Mode, Notifier, Width, WriteMatch};
use vm_notify_testkit::{Eoi, GuestExit, GuestProgram, SplitQueue, TinyVm};

const BASE: u64 = 0xd000_0000;
/// virtio-mmio `QueueNotify`, from virtio-bindings.
const MMIO_QUEUE_NOTIFY: u64 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
const IRQ: u8 = 6;
const VECTOR: u8 = 0x20 + IRQ;
const LENGTHS: [u32; 4] = [16, 64, 256, 512];
/// VIRTIO_F_VERSION_1 only: the guest keeps no used_event, so no VIRTIO_RING_F_EVENT_IDX.
const FEATURES: u64 = 1 << 32;

fn run(requests: u64) -> Result<bool, Box<dyn std::error::Error>> {
    let mut vm = TinyVm::with_shared_memory()?;
    let queue = SplitQueue::new(0, 16, &LENGTHS)?;
    queue.lay_out(&vm)?;
    let backend = vhost_backend::Backend::start("example");
    let mut frontend = VhostUserFrontend::connect(&backend.socket, 1, vm.memory(), FEATURES)?;
    let kick = vm.notify().ioevent(
        WriteMatch::mmio(BASE + MMIO_QUEUE_NOTIFY)
            .width(Width::W4)
            .datamatch(0),
        &Notifier::new(Mode::Counter)?,
    )?;
    let call = vm.notify().irqfd(IRQ.into())?;
    // An edge irqfd has its eventfd: the backend's calls go straight into KVM, and there is no
    // `CallRelay` to run (a virtio-mmio status line would need one).
    if frontend.start_queue(queue.vring(0), kick, call)?.is_some() {
        return Err("an irqfd's calls were relayed".into());
    }

    let mut p = GuestProgram::new()?;
    p.init_pic(0x20, !((1u16 << IRQ) | (1 << 2)), 0)?;
    p.on_interrupt(VECTOR, Eoi::PicMaster);
    p.repeat(requests, |p| {
        p.virtq_submit(&queue)?;
        p.mmio_write(BASE + MMIO_QUEUE_NOTIFY, 0, 4)?;
        p.virtq_wait_used(&queue)
    })?;
    p.exit()?;
    // The VMM handles no notification: any exit would be counted in the report.
    let report = vm
        .start(p, |_: &GuestExit, _: &mut [u8]| {})?
        .wait(Duration::from_secs(120))
        .done()?;

    let completed = u64::from(queue.used_idx(&vm)?);
    let bytes: u64 = (0..completed)
        .map(|r| u64::from(LENGTHS[(r % 4) as usize]))
        .sum();
    let guest_irqs = vm.irq_count(VECTOR)?;
    let sleeps = queue.sleeps(&vm)?;
    let mismatches = queue.mismatches(&vm)?;
    let distinct = queue.distinct_words(&vm)?;
    let per = report.elapsed.as_secs_f64() * 1e6 / requests as f64;
    println!(
        "vm-notify vhost-user entropy queue: backend vhost-device-rng at {}",
        backend.socket.display()
    );
    println!(
        "  negotiated features:             {:#x}",
        frontend.features()
    );
    println!("  requests completed:              {completed} of {requests}");
    println!(
        "  bytes received:                  {bytes} ({} distinct 8-byte words in the final buffers; {mismatches} length mismatches)",
        distinct
    );
    println!(
        "  interrupts taken by the guest:   {guest_irqs} (it slept {sleeps} times waiting for a used buffer)"
    );
    println!("  round trip:                      {per:.1} us per request");
    println!(
        "  notifications the VMM handled:   {} (exits to userspace; the VMM runs no device thread)",
        report.exits.len()
    );
    println!(
        "summary: requests={requests} completed={completed} bytes={bytes} guest_irqs={guest_irqs} vmm_notifications={}",
        report.exits.len()
    );
    Ok(completed == requests
        && mismatches == 0
        && sleeps <= guest_irqs
        && guest_irqs <= completed
        && report.exits.is_empty()
        && distinct > 100)
}

fn main() -> ExitCode {
    let requests: u64 = match std::env::args().nth(1).map(|a| a.parse()) {
        None => 1000,
        Some(Ok(n)) if (1..65536).contains(&n) => n,
        Some(_) => {
            eprintln!("usage: vhost_user_rng [requests, 1 to 65535]");
            return ExitCode::from(2);
        }
    };
    match run(requests) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("vhost_user_rng: counts disagree");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("vhost_user_rng: {e}");
            ExitCode::FAILURE
        }
    }
}
