//! Soak with conservation: 10^6 guest kicks over 4 queues and 10^6 interrupts from 4 device
//! threads, while 4 other threads register and unregister ioeventfds at other addresses, in the
//! kernel and in userspace. Every count must be conserved: each queue's device reads = the
//! guest's kicks on it, each vector's guest handler count = its device's triggers.
//!
//! Marked `#[ignore]` (it runs for about a minute here); `.ci/run` runs it with `--ignored`.
//! `VM_NOTIFY_SOAK_ROUNDS` (default 250000, 4 kicks and 4 interrupts each) scales it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use vm_notify::fallback::Policy;
use vm_notify::kvm::MsiMessage;
use vm_notify::{Mode, Notifier, Width, WriteMatch};
use vm_notify_testkit::{kvm_test, layout, Eoi, GuestProgram, TinyVm};

const QUEUES: u64 = 4;
const NOTIFY: u64 = 0xd000_0050;
const VECTORS: [u8; 4] = [0x41, 0x42, 0x43, 0x44];
/// Data slot counting the interrupts the guest has waited for so far.
const TARGET: usize = 8;

#[test]
#[ignore = "a minute of soak; .ci/run runs it"]
fn a_million_kicks_and_interrupts_are_conserved_under_registration_churn() {
    kvm_test!();
    let rounds: u64 = std::env::var("VM_NOTIFY_SOAK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(250_000);
    let mut vm = TinyVm::new().unwrap();

    // Four queues, four devices, four vectors.
    let mut regs = Vec::new();
    let mut devices = Vec::new();
    for q in 0..QUEUES {
        let kicks = Notifier::new(Mode::Counter).unwrap();
        let at = WriteMatch::mmio(NOTIFY).width(Width::W4).datamatch(q);
        regs.push(vm.notify().ioevent(at, &kicks).unwrap());
        let gsi = vm
            .router()
            .route_msi(MsiMessage::x86(0, VECTORS[q as usize]))
            .unwrap();
        let irq = vm.notify().irqfd(gsi).unwrap();
        devices.push(thread::spawn(move || {
            let (mut read, mut raised) = (0u64, 0u64);
            while read < rounds {
                read += kicks.read().unwrap();
                irq.trigger().unwrap();
                raised += 1;
            }
            (read, raised)
        }));
    }

    // Churn: four threads registering and dropping other addresses, kernel and userspace.
    let stop = Arc::new(AtomicBool::new(false));
    let churned = Arc::new(AtomicU64::new(0));
    let churn: Vec<_> = (0..4u64)
        .map(|t| {
            let (stop, churned) = (stop.clone(), churned.clone());
            let kind = if t % 2 == 0 {
                Policy::Kernel
            } else {
                Policy::Userspace
            };
            let backend = vm.notify().with_policy(kind);
            thread::spawn(move || {
                let n = Notifier::new(Mode::Counter).unwrap();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let at =
                        WriteMatch::mmio(0xd100_0000 + 0x1000 * t + 8 * (i % 64)).width(Width::W4);
                    drop(backend.ioevent(at, &n).unwrap());
                    churned.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                    if kind == Policy::Userspace {
                        // A userspace cycle takes a microsecond; unthrottled, two such threads
                        // would take both CPUs from the guest and the devices.
                        thread::sleep(Duration::from_micros(200));
                    }
                }
            })
        })
        .collect();

    // The guest: each round kicks every queue (counting its kicks per queue), then waits until
    // the four interrupts of the round have been handled.
    let mut p = GuestProgram::new().unwrap();
    p.enable_lapic().unwrap();
    for v in VECTORS {
        p.on_interrupt(v, Eoi::Lapic);
    }
    p.repeat(rounds, |p| {
        for q in 0..QUEUES {
            p.count(q as usize)?;
            p.mmio_write(NOTIFY, q, 4)?;
        }
        p.asm().add(qword_ptr(layout::data_slot(TARGET)), 4)?;
        let mut check = p.asm().create_label();
        let mut done = p.asm().create_label();
        p.asm().set_label(&mut check)?;
        p.asm().xor(rax, rax)?;
        for v in VECTORS {
            p.asm()
                .add(rax, qword_ptr(layout::IRQ_COUNTS + 8 * u64::from(v)))?;
        }
        p.asm().cmp(rax, qword_ptr(layout::data_slot(TARGET)))?;
        p.asm().jae(done)?;
        p.wait_for_interrupt()?;
        p.asm().jmp(check)?;
        p.asm().set_label(&mut done)?;
        p.asm().zero_bytes()?;
        Ok(())
    })
    .unwrap();
    p.exit().unwrap();

    let start = Instant::now();
    let report = vm.run(p, Duration::from_secs(600)).unwrap();
    stop.store(true, Ordering::Relaxed);
    for c in churn {
        c.join().unwrap();
    }
    let report = report.done().unwrap();
    let device: Vec<(u64, u64)> = devices.into_iter().map(|d| d.join().unwrap()).collect();
    let guest_kicks: Vec<u64> = (0..QUEUES).map(|q| vm.data(q as usize).unwrap()).collect();
    let guest_irqs: Vec<u64> = VECTORS.iter().map(|&v| vm.irq_count(v).unwrap()).collect();
    let kicks: u64 = guest_kicks.iter().sum();
    let irqs: u64 = guest_irqs.iter().sum();
    let conserved = device.iter().map(|d| d.0).collect::<Vec<_>>() == guest_kicks
        && device.iter().map(|d| d.1).collect::<Vec<_>>() == guest_irqs;
    eprintln!(
        "soak: {kicks} guest kicks, {irqs} guest interrupts in {:?}; device (read, raised) per queue {device:?}; \
         {} registrations made and dropped meanwhile; {} exits; conserved: {}",
        start.elapsed(),
        churned.load(Ordering::Relaxed),
        report.exits.len(),
        if conserved { "yes" } else { "NO" }
    );
    assert_eq!(guest_kicks, vec![rounds; QUEUES as usize]);
    assert!(conserved);
    assert!(report.exits.is_empty(), "{report}");
    drop(regs);
}
