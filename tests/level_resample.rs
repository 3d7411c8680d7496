//! Level-triggered irqfd with resample, with a real guest: the device keeps an interrupt
//! condition, the guest acknowledges each interrupt at the device and EOIs the line, KVM signals
//! resample, and the device re-asserts while its condition holds.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use iced_x86::code_asm::*;
use vm_notify::testkit::{kvm_or_skip, layout, Eoi, GuestExit, GuestProgram, TinyVm};
use vm_notify::{
    Attempt, Error, IoEvent, LevelIrqFd, Mode, MsiMessage, Notifier, Width, WriteMatch,
};

const TIMEOUT: Duration = Duration::from_secs(120);
/// The device's interrupt-acknowledge register (like virtio-mmio InterruptACK).
const INTERRUPT_ACK: u64 = 0xd000_0064;
const IRQ: u8 = 5;
const PIC_BASE: u8 = 0x20;

#[test]
fn level_irqfd_resamples_at_eoi_and_device_reasserts() {
    if !kvm_or_skip("level_irqfd_resamples_at_eoi_and_device_reasserts") {
        return;
    }
    const EVENTS: u64 = 5000;
    let mut vm = TinyVm::new().unwrap();
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
        IRQ.into(),
        &Notifier::new(Mode::Counter).unwrap(),
        &resample,
    )
    .unwrap();

    let mut p = GuestProgram::new().unwrap();
    // IRQ 5 unmasked and level-triggered in the ELCR.
    p.init_pic(PIC_BASE, !((1u16 << IRQ) | (1 << 2)), 1 << IRQ)
        .unwrap();
    // Handler: acknowledge at the device, then EOI (the kit sends it after the body).
    p.on_interrupt_with(PIC_BASE + IRQ, Eoi::PicMaster, |a| {
        a.mov(rax, INTERRUPT_ACK)?;
        a.mov(dword_ptr(rax), 1u32)?;
        Ok(())
    });
    // Tell the device the line is set up: re-initialising the PIC acks a line that is already
    // asserted (KVM signals resample for it), so the device asserts only from here on.
    p.signal_host(1).unwrap();
    p.repeat(EVENTS, |p| p.wait_for_interrupt()).unwrap();
    p.exit().unwrap();
    let (ready_tx, ready_rx) = mpsc::channel();

    // The device: EVENTS interrupts are due; it asserts the line while any is unacknowledged.
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
            // The guest acknowledged before its EOI, so the ack is already counted.
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
    let guest_irqs = vm.irq_count(PIC_BASE + IRQ).unwrap();
    eprintln!(
        "level GSI {IRQ}: raised={raised} guest_irqs={guest_irqs} acked={acked} resamples={resamples} exits={} in {:?}",
        report.exits.len(),
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

#[test]
fn resample_on_an_msi_route_is_refused() {
    if !kvm_or_skip("resample_on_an_msi_route_is_refused") {
        return;
    }
    let vm = TinyVm::new().unwrap();
    let gsi = vm.router().route_msi(MsiMessage::x86(0, 0x40)).unwrap();
    let n = Notifier::new(Mode::Counter).unwrap();
    let e = LevelIrqFd::new(vm.router(), gsi, &n, &n.try_clone().unwrap()).unwrap_err();
    assert!(
        matches!(e, Error::ResampleNeedsIrqchip { gsi: g } if g == gsi),
        "{e:?}"
    );
    assert_eq!(vm.router().irqfds(gsi), 0);
}
