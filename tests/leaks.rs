//! No leaked descriptor or kernel registration after many register/drop cycles.
//!
//! One test in this file on purpose: it counts the process's open descriptors, so no other test
//! may run beside it in the same process.

use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use vm_notify::fallback::Policy;
use vm_notify::kvm::MsiMessage;
use vm_notify::{Error, Mode, Notifier, Width, WriteMatch};
use vm_notify_testkit::{kvm_test, GuestProgram, TinyVm};

/// Kernel ioeventfd cycles: each unregistration waits for an SRCU grace period (about 8 ms).
const CYCLES: usize = 1000;
/// Cycles of every other kind.
const MANY: usize = 10_000;
const ADDR: u64 = 0xd000_0000;

/// Runs `cycle` `n` times; returns the time per cycle.
fn cycles(n: usize, mut cycle: impl FnMut()) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        cycle();
    }
    start.elapsed() / n as u32
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn register_drop_cycles_leave_no_fd_or_registration_behind() {
    kvm_test!();
    let mut vm = TinyVm::new().unwrap();
    let kicks = Notifier::new(Mode::Counter).unwrap();
    let write = WriteMatch::mmio(ADDR).width(Width::W4);
    let gsi = vm.router().route_msi(MsiMessage::x86(0, 0x40)).unwrap();
    let irq_notifier = Notifier::new(Mode::Counter).unwrap();
    // The VM's one injector (its epoll), which every root shares and the VM keeps: made first,
    // so what is counted below is what the registrations and the injector's thread take.
    vm.notify().injector().unwrap();
    let before = open_fds();

    let user = vm.notify().with_policy(Policy::Userspace);
    // The injector's thread, as a VMM runs it: stopped and joined when the handle drops, with
    // its descriptors (the epoll and its stop notifier).
    let injector = user.injector().unwrap().spawn().unwrap();
    let resample = Notifier::new(Mode::Counter).unwrap();
    let entries = vm.router().entries();
    let mut report = Vec::new();
    report.push((
        "kernel ioeventfd",
        CYCLES,
        cycles(CYCLES, || drop(vm.notify().ioevent(write, &kicks).unwrap())),
    ));
    report.push((
        "userspace ioeventfd (dispatcher)",
        MANY,
        cycles(MANY, || drop(user.ioevent(write, &kicks).unwrap())),
    ));
    report.push((
        "kernel irqfd (MSI route)",
        MANY,
        cycles(MANY, || {
            drop(vm.notify().irqfd_with(gsi, &irq_notifier).unwrap())
        }),
    ));
    report.push((
        "injected irqfd (userspace path)",
        MANY,
        cycles(MANY, || drop(user.irqfd_with(gsi, &irq_notifier).unwrap())),
    ));
    report.push((
        "kernel level irqfd with resample (IOAPIC pin 10)",
        MANY,
        cycles(MANY, || {
            drop(
                vm.notify()
                    .level_irqfd_with(10, &irq_notifier, &resample)
                    .unwrap(),
            )
        }),
    ));
    report.push((
        "injected level irqfd (userspace path)",
        MANY,
        cycles(MANY, || {
            drop(user.level_irqfd_with(10, &irq_notifier, &resample).unwrap())
        }),
    ));
    report.push((
        "MSI-X vector: table of 1, configured, enabled, raised",
        MANY,
        cycles(MANY, || {
            let v = vm.notify().msix(1).unwrap();
            v.configure(&[(0, MsiMessage::x86(0, 0x41), false)])
                .unwrap();
            v.write_message_control(vm_notify::msix::MSIX_ENABLE)
                .unwrap();
            v.trigger(0).unwrap();
        }),
    ));
    // Refused registrations release what they took, too.
    let held = vm.notify().ioevent(write, &kicks).unwrap();
    for _ in 0..100 {
        assert!(matches!(
            vm.notify().ioevent(write, &kicks),
            Err(Error::IoEventExists { .. })
        ));
        assert!(matches!(
            vm.notify().irqfd_with(3000, &irq_notifier),
            Err(Error::UnroutedGsi { gsi: 3000 })
        ));
    }
    drop(held);
    drop((injector, user, resample));
    let after = open_fds();
    for (kind, n, each) in &report {
        eprintln!("{n} register/drop cycles of {kind}: {each:?} each");
    }
    eprintln!(
        "open fds {before} -> {after}; routing entries {entries} -> {}",
        vm.router().entries()
    );
    assert_eq!(before, after, "descriptors leaked");
    assert_eq!(vm.router().irqfds(gsi), 0);
    assert_eq!(vm.router().irqfds(10), 0);
    assert_eq!(vm.router().entries(), entries, "routes leaked");

    // The address registers again, and a guest write to it is counted in the kernel.
    let _reg = vm.notify().ioevent(write, &kicks).unwrap();
    let mut p = GuestProgram::new().unwrap();
    p.repeat(10, |p| {
        p.asm().mov(rdi, ADDR)?;
        p.asm().mov(dword_ptr(rdi), eax)?;
        Ok(())
    })
    .unwrap();
    p.exit().unwrap();
    let report = vm.run(p, Duration::from_secs(60)).unwrap().done().unwrap();
    assert_eq!(kicks.read().unwrap(), 10);
    assert!(report.exits.is_empty(), "{report}");
}
