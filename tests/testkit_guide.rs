//! The complete test from docs/GUEST_TESTKIT.md, kept here so the guide's code is known to run.

use iced_x86::code_asm::*;
use std::time::Duration;
use vm_notify::kvm::MsiMessage;
use vm_notify::{Mode, Notifier, Width, WriteMatch};
use vm_notify_testkit::{kvm_test, Eoi, GuestProgram, TinyVm};

#[test]
fn my_device_answers_every_kick() {
    kvm_test!(); // a loud SKIPPING line without KVM; a failure when VM_NOTIFY_REQUIRE_KVM=1
    let mut vm = TinyVm::new().unwrap();

    // Wire the device: QueueNotify in, MSI vector 0x40 out.
    let notify = vm.notify(); // the VM's vm_notify::Vm root
    let kicks = Notifier::new(Mode::Counter).unwrap();
    let at = WriteMatch::mmio(0xd000_0050).width(Width::W4).datamatch(0);
    let _queue = notify.ioevent(at, &kicks).unwrap();
    let irq = notify
        .irqfd(notify.router().route_msi(MsiMessage::x86(0, 0x40)).unwrap())
        .unwrap();

    // The guest: 100 times, count a kick in data slot 0, kick, wait for the interrupt.
    let mut p = GuestProgram::new().unwrap();
    p.enable_lapic().unwrap();
    p.on_interrupt(0x40, Eoi::Lapic); // counts into the vector's counter, EOIs the LAPIC
    p.repeat(100, |p| {
        p.count(0)?;
        p.asm().mov(rdi, 0xd000_0050u64)?;
        p.asm().mov(eax, 0u32)?;
        p.asm().mov(dword_ptr(rdi), eax)?;
        p.wait_for_interrupt()
    })
    .unwrap();
    p.exit().unwrap();

    // The device, on its own thread.
    let device = std::thread::spawn(move || {
        let mut seen = 0;
        while seen < 100 {
            seen += kicks.read().unwrap();
            irq.trigger().unwrap();
        }
        seen
    });

    let report = vm.run(p, Duration::from_secs(60)).unwrap().done().unwrap();
    assert_eq!(device.join().unwrap(), 100);
    assert_eq!(vm.data(0).unwrap(), 100); // the guest's own count of its kicks
    assert_eq!(vm.irq_count(0x40).unwrap(), 100); // the guest handler's count
    assert!(report.exits.is_empty()); // nothing reached userspace
}
