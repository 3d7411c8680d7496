//! A level irqfd with resample on an IOAPIC pin: the guest programs the redirection entry
//! level-triggered, EOIs through the local APIC, and KVM signals resample at that EOI.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use iced_x86::code_asm::*;
use vm_notify::testkit::{kvm_or_skip, layout, Eoi, GuestExit, GuestProgram, TinyVm};
use vm_notify::{Attempt, IoEvent, IrqChip, LevelIrqFd, Mode, Notifier, Route, Width, WriteMatch};

const TIMEOUT: Duration = Duration::from_secs(120);
const INTERRUPT_ACK: u64 = 0xd000_0064;
const PIN: u8 = 10;
const VECTOR: u8 = 0x3a;

#[test]
fn ioapic_level_line_resamples_at_lapic_eoi() {
    if !kvm_or_skip("ioapic_level_line_resamples_at_lapic_eoi") {
        return;
    }
    const EVENTS: u64 = 5000;
    let mut vm = TinyVm::new().unwrap();
    assert!(vm.router().routes(PIN.into()).contains(&Route::Irqchip {
        chip: IrqChip::Ioapic,
        pin: PIN.into()
    }));
    let acks = Notifier::new(Mode::Counter).unwrap();
    let _ack = IoEvent::register(
        vm.vm(),
        WriteMatch::mmio(INTERRUPT_ACK).width(Width::W4),
        &acks,
    )
    .unwrap();
    let resample = Notifier::new(Mode::Counter).unwrap();
    let line = LevelIrqFd::new(
        vm.router(),
        PIN.into(),
        &Notifier::new(Mode::Counter).unwrap(),
        &resample,
    )
    .unwrap();

    let mut p = GuestProgram::new().unwrap();
    // GSI 10 also reaches the slave PIC through the default routes: mask both PICs entirely.
    p.init_pic(0x20, 0xffff, 0).unwrap();
    p.enable_lapic().unwrap();
    p.route_ioapic_pin(PIN, VECTOR, true).unwrap();
    // Acknowledge at the device, then EOI the LAPIC, which EOIs the IOAPIC's level entry.
    p.on_interrupt_with(VECTOR, Eoi::Lapic, |a| {
        a.mov(rax, INTERRUPT_ACK)?;
        a.mov(dword_ptr(rax), 1u32)?;
        Ok(())
    });
    p.signal_host(1).unwrap();
    p.repeat(EVENTS, |p| p.wait_for_interrupt()).unwrap();
    p.exit().unwrap();

    let (ready_tx, ready_rx) = mpsc::channel();
    let device = thread::spawn(move || {
        let (mut pending, mut raised, mut resamples, mut acked) = (EVENTS, 0u64, 0u64, 0u64);
        ready_rx.recv_timeout(TIMEOUT).unwrap();
        line.trigger().unwrap();
        raised += 1;
        while pending > 0 {
            match line.resample().read_timeout(TIMEOUT).unwrap() {
                Attempt::Done(n) => resamples += n,
                Attempt::WouldBlock => break,
            }
            let n = acks.try_read().unwrap().done().unwrap_or(0);
            acked += n;
            pending -= n;
            if pending > 0 {
                line.trigger().unwrap();
                raised += 1;
            }
        }
        (raised, resamples, acked)
    });
    let run = vm
        .start(p, move |e: &GuestExit, _: &mut [u8]| {
            if let GuestExit::PioWrite {
                port: layout::HOST_PORT,
                ..
            } = e
            {
                ready_tx.send(()).unwrap();
            }
        })
        .unwrap();
    let report = run.wait(TIMEOUT).done().unwrap();
    let (raised, resamples, acked) = device.join().unwrap();
    let guest_irqs = vm.irq_count(VECTOR).unwrap();
    eprintln!(
        "IOAPIC pin {PIN} level: raised={raised} guest_irqs={guest_irqs} acked={acked} resamples={resamples} in {:?}",
        report.elapsed
    );
    assert_eq!(guest_irqs, EVENTS);
    assert_eq!(raised, EVENTS);
    assert_eq!(acked, EVENTS);
    assert_eq!(resamples, EVENTS);
    assert_eq!(
        report.exits.len(),
        1,
        "only the ready signal exits: {report}"
    );
}
