//! A minimal VMM built on vm-notify: boots a tiny guest that kicks a device queue and waits for
//! the device's interrupt, round after round, while a device thread serves it through an
//! ioeventfd (guest → device) and an irqfd on an MSI route (device → guest).
//!
//! For comparison it then runs the same guest with no ioeventfd, so each kick exits to userspace
//! and the vCPU thread raises the interrupt itself, and reports both round-trip times.
//!
//! ```text
//! cargo run --release --example minimal_vmm [-- --round-trips N]
//! ```
//!
//! The last line is `summary: guest_kicks=N device_kicks=N irqs_raised=M guest_irqs=M`, with the
//! guest's counts read from its own memory; the process exits non-zero if the counts disagree.

use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use iced_x86::code_asm::{dword_ptr, eax, rdi};
use vm_notify::kvm::MsiMessage;
use vm_notify::wait::EventLoop;
use vm_notify::{Mode, Notifier, Width, WriteMatch};
use vm_notify_testkit::{Eoi, GuestExit, GuestProgram, TinyVm};

/// The device's registers: a virtio-mmio style window; QueueNotify at +0x50.
const DEVICE_BASE: u64 = 0xd000_0000;
const QUEUE_NOTIFY: u64 = DEVICE_BASE + 0x50;
const QUEUE: u64 = 0;
/// The MSI vector the device interrupts on.
const VECTOR: u8 = 0x40;
/// The guest counts its kicks in this data slot.
const KICKS_SLOT: usize = 0;
/// Generous: only catches a hang.
const TIMEOUT: Duration = Duration::from_secs(300);

struct Figures {
    guest_kicks: u64,
    device_kicks: u64,
    device_reads: u64,
    irqs_raised: u64,
    guest_irqs: u64,
    exits: usize,
    wall: Duration,
    gsi: u32,
}

/// The guest: enable the LAPIC, then `rounds` times count a kick, write the queue index to
/// QueueNotify and wait for the device's interrupt.
fn guest_program(rounds: u64) -> Result<GuestProgram, vm_notify_testkit::Error> {
    let mut p = GuestProgram::new()?;
    p.enable_lapic()?;
    p.on_interrupt(VECTOR, Eoi::Lapic);
    p.repeat(rounds, |p| {
        p.kick_and_wait(QUEUE_NOTIFY, QUEUE as u32, Some(KICKS_SLOT))
    })?;
    p.exit()?;
    Ok(p)
}

/// The library's path: kicks stay in the kernel (ioeventfd), a device thread answers (irqfd).
fn run_with_notifiers(rounds: u64) -> Result<Figures, Box<dyn std::error::Error>> {
    let mut vm = TinyVm::new()?;
    let kicks = Notifier::new(Mode::Counter)?;
    let _notify = vm.notify().ioevent(
        WriteMatch::mmio(QUEUE_NOTIFY)
            .width(Width::W4)
            .datamatch(QUEUE),
        &kicks,
    )?;
    let gsi = vm.router().route_msi(MsiMessage::x86(0, VECTOR))?;
    let irq = vm.notify().irqfd(gsi)?;

    // The device thread waits on its queue notifiers with the event loop; each wake-up gives
    // the kicks since the last one. The device processes its queue and signals used buffers
    // with one interrupt.
    let events = Arc::new(EventLoop::new()?);
    events.add(QUEUE, &kicks)?;
    let stop = events.stop_handle();
    let device = {
        let events = events.clone();
        thread::spawn(move || -> vm_notify::Result<(u64, u64, u64)> {
            let (mut kicked, mut reads, mut raised) = (0, 0, 0);
            events.run(|_queue, n| {
                kicked += n;
                reads += 1;
                raised += 1;
                irq.trigger()
            })?;
            Ok((kicked, reads, raised))
        })
    };
    let report = vm.run(guest_program(rounds)?, TIMEOUT)?;
    stop.stop()?;
    let (device_kicks, device_reads, irqs_raised) =
        device.join().map_err(|_| "device thread panicked")??;
    let report = report.done()?;
    Ok(Figures {
        wall: report.elapsed,
        guest_kicks: vm.data(KICKS_SLOT)?,
        device_kicks,
        device_reads,
        irqs_raised,
        guest_irqs: vm.irq_count(VECTOR)?,
        exits: report.exits.len(),
        gsi,
    })
}

/// The baseline: no ioeventfd, so every kick exits to userspace; the vCPU thread sees the MMIO
/// write and raises the interrupt before resuming the guest.
fn run_with_exits(rounds: u64) -> Result<Figures, Box<dyn std::error::Error>> {
    let mut vm = TinyVm::new()?;
    let gsi = vm.router().route_msi(MsiMessage::x86(0, VECTOR))?;
    let irq = vm.notify().irqfd(gsi)?;
    let run = vm.start(
        guest_program(rounds)?,
        move |e: &GuestExit, _: &mut [u8]| {
            if let GuestExit::MmioWrite {
                addr: QUEUE_NOTIFY,
                data: QUEUE,
                ..
            } = e
            {
                // Only an eventfd write can fail here, and the guest would then hang until the
                // timeout, which the report shows.
                let _ = irq.trigger();
            }
        },
    )?;
    let report = run.wait(TIMEOUT).done()?;
    let kicks = report.mmio_writes(QUEUE_NOTIFY) as u64;
    Ok(Figures {
        guest_kicks: vm.data(KICKS_SLOT)?,
        device_kicks: kicks,
        device_reads: kicks,
        irqs_raised: kicks,
        guest_irqs: vm.irq_count(VECTOR)?,
        exits: report.exits.len(),
        wall: report.elapsed,
        gsi,
    })
}

/// The cost of a kick alone: the guest writes QueueNotify `kicks` times with nobody waiting,
/// through an ioeventfd (`registered`) or as exits to userspace. Returns (KVM_RUN time, kicks
/// the device saw, exits).
fn kick_cost(
    kicks: u64,
    registered: bool,
) -> Result<(Duration, u64, usize), Box<dyn std::error::Error>> {
    let mut vm = TinyVm::new()?;
    let counter = Notifier::new(Mode::Counter)?;
    let _notify = registered
        .then(|| {
            vm.notify().ioevent(
                WriteMatch::mmio(QUEUE_NOTIFY)
                    .width(Width::W4)
                    .datamatch(QUEUE),
                &counter,
            )
        })
        .transpose()?;
    let mut p = GuestProgram::new()?;
    p.asm().mov(rdi, QUEUE_NOTIFY)?;
    p.asm().mov(eax, QUEUE as u32)?;
    p.repeat(kicks, |p| {
        p.asm().mov(dword_ptr(rdi), eax)?;
        Ok(())
    })?;
    p.exit()?;
    let report = vm.run(p, TIMEOUT)?.done()?;
    let seen = if registered {
        counter.try_read()?.done().unwrap_or(0)
    } else {
        report.mmio_writes(QUEUE_NOTIFY) as u64
    };
    Ok((report.elapsed, seen, report.exits.len()))
}

fn parse_args() -> Result<u64, String> {
    let mut rounds = 10_000;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--round-trips" | "-n" => {
                let v = args.next().ok_or("--round-trips needs a number")?;
                rounds = v
                    .parse()
                    .map_err(|_| format!("--round-trips: not a number: {v}"))?;
                if rounds == 0 {
                    return Err("--round-trips must be at least 1".into());
                }
            }
            "--help" | "-h" => {
                println!("usage: minimal_vmm [--round-trips N]   (default 10000)");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument: {other} (try --help)")),
        }
    }
    Ok(rounds)
}

fn micros_per(d: Duration, n: u64) -> f64 {
    d.as_secs_f64() * 1e6 / n as f64
}

fn main() -> ExitCode {
    let rounds = match parse_args() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("minimal_vmm: {e}");
            return ExitCode::from(2);
        }
    };
    let main_run = match run_with_notifiers(rounds) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("minimal_vmm: the guest run failed: {e}");
            eprintln!("(needs read/write access to /dev/kvm on Linux x86-64)");
            return ExitCode::FAILURE;
        }
    };
    let f = &main_run;
    println!("vm-notify minimal VMM: one long-mode vCPU, in-kernel irqchip");
    println!(
        "  device: QueueNotify at {QUEUE_NOTIFY:#x} (ioeventfd, 4-byte writes of {QUEUE}); \
         interrupts on MSI vector {VECTOR:#x} via GSI {} (irqfd)",
        f.gsi
    );
    println!("  round trips requested:  {rounds}");
    println!(
        "  guest kicks:            {} (counted by the guest in its memory)",
        f.guest_kicks
    );
    println!(
        "  device kicks:           {} (read from the ioeventfd in {} reads)",
        f.device_kicks, f.device_reads
    );
    println!(
        "  interrupts raised:      {} (irqfd triggers)",
        f.irqs_raised
    );
    println!(
        "  guest interrupts:       {} (counted by the guest's handler)",
        f.guest_irqs
    );
    println!("  exits to userspace:     {}", f.exits);
    println!(
        "  guest run time:         {:.3} s, {:.1} us per round trip",
        f.wall.as_secs_f64(),
        micros_per(f.wall, rounds)
    );
    match run_with_exits(rounds) {
        Ok(b) => println!(
            "  baseline, kick exits to userspace and the vCPU thread raises the interrupt: \
             {} round trips, {} exits, {:.1} us per round trip \
             (time ratio baseline / ioeventfd path = {:.2})",
            b.guest_irqs,
            b.exits,
            micros_per(b.wall, rounds),
            b.wall.as_secs_f64() / f.wall.as_secs_f64()
        ),
        Err(e) => println!("  baseline run failed: {e}"),
    }
    match (kick_cost(rounds, true), kick_cost(rounds, false)) {
        (Ok((fast, fast_seen, fast_exits)), Ok((slow, slow_seen, slow_exits))) => println!(
            "  kicks alone, no device thread waiting: ioeventfd {:.2} us per kick ({fast_seen} counted, \
             {fast_exits} exits), exit to userspace {:.2} us per kick ({slow_seen} counted, \
             {slow_exits} exits): time ratio exit / ioeventfd = {:.2}",
            micros_per(fast, rounds),
            micros_per(slow, rounds),
            slow.as_secs_f64() / fast.as_secs_f64()
        ),
        (Err(e), _) | (_, Err(e)) => println!("  kick cost run failed: {e}"),
    }
    let agree = f.guest_kicks == rounds
        && f.device_kicks == f.guest_kicks
        && f.irqs_raised == f.guest_irqs
        && f.exits == 0;
    println!(
        "summary: guest_kicks={} device_kicks={} irqs_raised={} guest_irqs={}",
        f.guest_kicks, f.device_kicks, f.irqs_raised, f.guest_irqs
    );
    if agree {
        ExitCode::SUCCESS
    } else {
        eprintln!("minimal_vmm: the counts disagree");
        ExitCode::FAILURE
    }
}
