//! No leaked descriptor or kernel registration after many register/drop cycles.
//!
//! One test in this file on purpose: it counts the process's open descriptors, so no other test
//! may run beside it in the same process.

use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use vm_notify::testkit::{kvm_or_skip, GuestProgram, TinyVm};
use vm_notify::{Error, IoEvent, IrqFd, Mode, MsiMessage, Notifier, Width, WriteMatch};

const CYCLES: usize = 1000;
const ADDR: u64 = 0xd000_0000;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn register_drop_cycles_leave_no_fd_or_registration_behind() {
    if !kvm_or_skip("register_drop_cycles_leave_no_fd_or_registration_behind") {
        return;
    }
    let mut vm = TinyVm::new().unwrap();
    let kicks = Notifier::new(Mode::Counter).unwrap();
    let write = WriteMatch::mmio(ADDR).width(Width::W4);
    let gsi = vm.router().route_msi(MsiMessage::x86(0, 0x40)).unwrap();
    let irq_notifier = Notifier::new(Mode::Counter).unwrap();
    let before = open_fds();

    let start = Instant::now();
    for _ in 0..CYCLES {
        let reg = IoEvent::register(vm.vm(), write, &kicks).unwrap();
        drop(reg);
    }
    let ioevent_time = start.elapsed();
    let start = Instant::now();
    for _ in 0..CYCLES {
        let irq = IrqFd::new(vm.router(), gsi, &irq_notifier).unwrap();
        drop(irq);
    }
    let irqfd_time = start.elapsed();
    // Refused registrations release what they took, too.
    let held = IoEvent::register(vm.vm(), write, &kicks).unwrap();
    for _ in 0..100 {
        assert!(matches!(
            IoEvent::register(vm.vm(), write, &kicks),
            Err(Error::IoEventExists { .. })
        ));
        assert!(matches!(
            IrqFd::new(vm.router(), 3000, &irq_notifier),
            Err(Error::UnroutedGsi { gsi: 3000 })
        ));
    }
    drop(held);
    let after = open_fds();
    eprintln!(
        "{CYCLES} ioeventfd register/drop cycles in {ioevent_time:?} ({:.2} ms each), \
         {CYCLES} irqfd cycles in {irqfd_time:?}; open fds {before} -> {after}",
        ioevent_time.as_secs_f64() * 1e3 / CYCLES as f64
    );
    assert_eq!(before, after, "descriptors leaked");
    assert_eq!(vm.router().irqfds(gsi), 0);

    // The address registers again, and a guest write to it is counted in the kernel.
    let _reg = IoEvent::register(vm.vm(), write, &kicks).unwrap();
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
