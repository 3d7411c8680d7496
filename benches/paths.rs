//! The two notification paths side by side, in one run.
//!
//! ```text
//! cargo bench --bench paths
//! ```
//!
//! * `ExitDispatcher` lookup with 1, 100 and 1000 registrations: a write nothing matches (the
//!   lookup alone) and a matching one (lookup plus the eventfd write);
//! * kick/interrupt ping-pong through a guest on the kernel path (ioeventfd + irqfd) and on the
//!   userspace path (exit dispatcher + injector thread).
//!
//! A plain harness with its own statistics: medians of several rounds, variants alternating.

use std::hint::black_box;
use std::time::{Duration, Instant};

use vm_notify::fallback::{ExitDispatcher, Policy};
use vm_notify::kvm::MsiMessage;
use vm_notify::{Mode, Notifier, Width, WriteMatch};
use vm_notify_testkit::{kvm_test, Eoi, GuestExit, GuestProgram, TinyVm};

mod common;
use common::median;

const ROUNDS: usize = 7;
const LOOKUPS: u32 = 200_000;
const PING_PONGS: u64 = 5000;
const BASE: u64 = 0xd000_0000;
const NOTIFY: u64 = 0xd100_0000;

/// Nanoseconds per dispatch of a 4-byte write to `addr`, over `LOOKUPS` writes.
fn dispatch(d: &ExitDispatcher, addr: u64) -> Duration {
    let data = 7u32.to_le_bytes();
    let start = Instant::now();
    for _ in 0..LOOKUPS {
        black_box(d.mmio_write(black_box(addr), &data).unwrap());
    }
    start.elapsed() / LOOKUPS
}

/// Microseconds per kick → interrupt round trip on `kind`'s path.
fn ping_pong(kind: Policy) -> Duration {
    let mut vm = TinyVm::new().unwrap();
    let backend = vm.notify().with_policy(kind);
    vm.run_injector(&backend).unwrap();
    let kicks = Notifier::new(Mode::Counter).unwrap();
    let _kick = backend
        .ioevent(WriteMatch::mmio(NOTIFY).width(Width::W4), &kicks)
        .unwrap();
    let gsi = vm.router().route_msi(MsiMessage::x86(0, 0x40)).unwrap();
    let irq = backend.irqfd(gsi).unwrap();
    let mut p = GuestProgram::new().unwrap();
    p.enable_lapic().unwrap();
    p.on_interrupt(0x40, Eoi::Lapic);
    p.repeat(PING_PONGS, |p| p.kick_and_wait(NOTIFY, 0, None))
        .unwrap();
    p.exit().unwrap();
    let device = std::thread::spawn(move || {
        for _ in 0..PING_PONGS {
            kicks.read().unwrap();
            irq.trigger().unwrap();
        }
    });
    let d = backend.dispatcher().clone();
    let report = vm
        .start(p, move |e: &GuestExit, _: &mut [u8]| {
            e.dispatch(&d).unwrap();
        })
        .unwrap()
        .wait(Duration::from_secs(120))
        .done()
        .unwrap();
    device.join().unwrap();
    assert_eq!(vm.irq_count(0x40).unwrap(), PING_PONGS);
    report.elapsed / PING_PONGS as u32
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("paths bench: run with `cargo bench --bench paths`");
        return;
    }
    println!("vm-notify paths bench: medians of {ROUNDS} rounds, variants alternating");
    println!("| measurement | median |");
    println!("|---|---|");
    for n in [1u64, 100, 1000] {
        let backend_vm = TinyVm::new().unwrap();
        let backend = backend_vm.notify().with_policy(Policy::Userspace);
        backend_vm.run_injector(&backend).unwrap();
        let notifiers: Vec<_> = (0..n)
            .map(|_| Notifier::new(Mode::Counter).unwrap())
            .collect();
        let regs: Vec<_> = notifiers
            .iter()
            .enumerate()
            .map(|(i, notifier)| {
                let m = WriteMatch::mmio(BASE + 8 * i as u64).width(Width::W4);
                backend.ioevent(m, notifier).unwrap()
            })
            .collect();
        let d = backend.dispatcher();
        let hit = BASE + 8 * (n / 2);
        let (mut misses, mut hits) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            misses.push(dispatch(d, BASE + 8 * n + 4));
            hits.push(dispatch(d, hit));
            // Keep the counter far from its maximum.
            let _ = notifiers[(n / 2) as usize].try_read();
        }
        println!(
            "| dispatcher, {n} registrations: write nothing matches (lookup) | {} ns |",
            median(misses).as_nanos()
        );
        println!(
            "| dispatcher, {n} registrations: matching write (lookup + eventfd write) | {} ns |",
            median(hits).as_nanos()
        );
        drop(regs);
    }
    kvm_test!();
    let (mut kernel, mut user) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        kernel.push(ping_pong(Policy::Kernel));
        user.push(ping_pong(Policy::Userspace));
    }
    let (k, u) = (median(kernel), median(user));
    println!(
        "| ping-pong round trip, kernel path (ioeventfd + irqfd) | {:.1} us |",
        k.as_secs_f64() * 1e6
    );
    println!(
        "| ping-pong round trip, userspace path (exit + dispatcher + injector) | {:.1} us |",
        u.as_secs_f64() * 1e6
    );
    println!(
        "| ratio userspace / kernel | {:.2} |",
        u.as_secs_f64() / k.as_secs_f64()
    );
}
