//! A device served from a rust-vmm `event-manager` loop, on each backend path, with the same
//! device code.
//!
//! The device has four queues on one virtio-mmio style QueueNotify register (4-byte writes, the
//! queue index as datamatch). Its `NotifierSubscriber` gets `(queue, kicks)` from the loop and
//! answers every wake-up with one used-buffer interrupt on an MSI vector. On the userspace path
//! the backend's `Injector` is a subscriber of the same loop: the VMM's one thread serves the
//! device and injects its interrupts. The guest kicks queue
//! `q` and waits for the interrupt, round-robin over the queues, and counts both in its memory.
//!
//! Run: `cargo run --release --features event-manager --example event_manager_device [rounds]`
//! (`cargo test --all-features` builds it). It ends with a `summary:` line and exits non-zero if
//! any count disagrees.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_notify::fallback::Policy;
use vm_notify::kvm::MsiMessage;
use vm_notify::wait::NotifierSubscriber;
use vm_notify::{IrqFd, Mode, Notifier, Width, WriteMatch};
use vm_notify_testkit::{Eoi, GuestExit, GuestProgram, TinyVm};

const QUEUE_NOTIFY: u64 = 0xd000_0050;
const QUEUES: u32 = 4;
const VECTOR: u8 = 0x41;
const KICKS_SLOT: usize = 0;
const TIMEOUT: Duration = Duration::from_secs(120);

/// What one run saw.
struct Figures {
    path: String,
    per_queue: Vec<u64>,
    guest_kicks: u64,
    irqs_raised: u64,
    guest_irqs: u64,
    exits: usize,
    wall: Duration,
}

fn run(kind: Policy, rounds: u64) -> Result<Figures, Box<dyn std::error::Error>> {
    let mut vm = TinyVm::new()?;
    let backend = vm.notify().with_policy(kind);
    // The injector of the interrupts placed in userspace joins the device in the VMM's one
    // event-manager loop below: no thread of its own.
    let injector = backend.injector()?;
    let gsi = vm.router().route_msi(MsiMessage::x86(0, VECTOR))?;
    let irq: IrqFd = backend.irqfd(gsi)?;
    let irq_path = format!("{:?}", irq.placement());

    // The device: one subscriber watching every queue; its callback is all the device code.
    let per_queue: Arc<Vec<AtomicU64>> = Arc::new((0..QUEUES).map(|_| AtomicU64::new(0)).collect());
    let raised = Arc::new(AtomicU64::new(0));
    let mut subscriber = {
        let (per_queue, raised) = (per_queue.clone(), raised.clone());
        NotifierSubscriber::new(move |queue, kicks| {
            per_queue[queue as usize].fetch_add(kicks, Ordering::Relaxed);
            if irq.trigger().is_ok() {
                raised.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut registrations = Vec::new();
    for q in 0..QUEUES {
        let kicks = Notifier::new(Mode::Counter)?;
        let notify = WriteMatch::mmio(QUEUE_NOTIFY)
            .width(Width::W4)
            .datamatch(q.into());
        registrations.push(backend.ioevent(notify, &kicks)?);
        subscriber.watch(q, &kicks)?;
    }
    let queue_path = format!("{:?}", registrations[0].placement());

    let stop = Arc::new(AtomicBool::new(false));
    let device = {
        let stop = stop.clone();
        thread::spawn(move || -> Result<(), String> {
            let mut manager = EventManager::<Box<dyn MutEventSubscriber + Send>>::new()
                .map_err(|e| format!("{e:?}"))?;
            manager.add_subscriber(Box::new(subscriber));
            manager.add_subscriber(Box::new(injector));
            while !stop.load(Ordering::Relaxed) {
                manager.run_with_timeout(50).map_err(|e| format!("{e:?}"))?;
            }
            Ok(())
        })
    };

    let mut p = GuestProgram::new()?;
    p.enable_lapic()?;
    p.on_interrupt(VECTOR, Eoi::Lapic);
    p.repeat(rounds, |p| {
        for q in 0..QUEUES {
            p.kick_and_wait(QUEUE_NOTIFY, q, Some(KICKS_SLOT))?;
        }
        Ok(())
    })?;
    p.exit()?;
    // On the userspace path the kicks arrive as exits; the dispatcher turns them into the same
    // notifier counts. On the kernel path nothing reaches this handler.
    let dispatcher = backend.dispatcher().clone();
    let running = vm.start(p, move |e: &GuestExit, _: &mut [u8]| {
        let _ = e.dispatch(&dispatcher);
    })?;
    let report = running.wait(TIMEOUT);
    stop.store(true, Ordering::Relaxed);
    device.join().map_err(|_| "device thread panicked")??;
    let report = report.done()?;
    Ok(Figures {
        path: format!("queues {queue_path}, interrupt {irq_path}"),
        per_queue: per_queue
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect(),
        guest_kicks: vm.data(KICKS_SLOT)?,
        irqs_raised: raised.load(Ordering::Relaxed),
        guest_irqs: vm.irq_count(VECTOR)?,
        exits: report.exits.len(),
        wall: report.elapsed,
    })
}

fn main() -> ExitCode {
    let rounds: u64 = match std::env::args().nth(1).map(|a| a.parse()) {
        None => 2000,
        Some(Ok(r)) if r > 0 => r,
        Some(_) => {
            eprintln!("usage: event_manager_device [rounds > 0]");
            return ExitCode::from(2);
        }
    };
    let mut agree = true;
    let mut totals = (0, 0, 0, 0);
    println!("vm-notify device in an event-manager loop: {QUEUES} queues, {rounds} rounds each");
    for kind in [Policy::Kernel, Policy::Userspace] {
        let f = match run(kind, rounds) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("event_manager_device: the {kind:?} run failed: {e}");
                return ExitCode::FAILURE;
            }
        };
        let device_kicks: u64 = f.per_queue.iter().sum();
        println!("  {kind:?} backend ({})", f.path);
        println!("    kicks per queue, device: {:?}", f.per_queue);
        println!(
            "    guest kicks {} / device kicks {device_kicks}; interrupts raised {} / taken by the guest {}",
            f.guest_kicks, f.irqs_raised, f.guest_irqs
        );
        println!(
            "    exits to userspace {}; {:.1} us per round trip",
            f.exits,
            f.wall.as_secs_f64() * 1e6 / (rounds * u64::from(QUEUES)) as f64
        );
        agree &= f.per_queue.iter().all(|&k| k == rounds)
            && f.guest_kicks == device_kicks
            && f.irqs_raised == f.guest_irqs;
        totals.0 += f.guest_kicks;
        totals.1 += device_kicks;
        totals.2 += f.irqs_raised;
        totals.3 += f.guest_irqs;
    }
    println!(
        "summary: guest_kicks={} device_kicks={} irqs_raised={} guest_irqs={}",
        totals.0, totals.1, totals.2, totals.3
    );
    if agree {
        ExitCode::SUCCESS
    } else {
        eprintln!("event_manager_device: counts disagree");
        ExitCode::FAILURE
    }
}
