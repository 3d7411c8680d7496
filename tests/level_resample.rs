//! Level-triggered irqfd with resample, with a real guest: the device keeps an interrupt
//! condition, the guest acknowledges each interrupt at the device and EOIs the line, KVM signals
//! resample, and the device re-asserts while its condition holds. Once on a PIC line (EOI to the
//! 8259), once on an IOAPIC pin (redirection entry programmed level-triggered by the guest, EOI
//! through the local APIC).

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use iced_x86::code_asm::*;
use vm_notify::testkit::{kvm_or_skip, layout, Eoi, GuestExit, GuestProgram, TinyVm};
use vm_notify::{
    Attempt, Backend, BackendKind, Capability, Error, IrqChip, LevelIrqFd, Mode, MsiMessage,
    Notifier, Path, Route, Width, WriteMatch,
};

const TIMEOUT: Duration = Duration::from_secs(120);
/// The device's interrupt-acknowledge register (like virtio-mmio InterruptACK).
const INTERRUPT_ACK: u64 = 0xd000_0064;
const EVENTS: u64 = 5000;

#[derive(Clone, Copy, Debug)]
enum Line {
    /// IRQ `irq` of the master 8259, level-triggered through the ELCR; vectors from 0x20.
    Pic { irq: u8 },
    /// IOAPIC pin `pin`, delivering `vector`; both PICs masked.
    Ioapic { pin: u8, vector: u8 },
}

/// Runs EVENTS level interrupts through `line` on `kind`'s path; returns
/// (raised, guest_irqs, acked, resamples).
fn run(kind: BackendKind, line: Line) -> (u64, u64, u64, u64) {
    let mut vm = TinyVm::new().unwrap();
    let backend = Backend::new(vm.vm().clone(), kind);
    let acks = Notifier::new(Mode::Counter).unwrap();
    let _ack = backend
        .register(WriteMatch::mmio(INTERRUPT_ACK).width(Width::W4), &acks)
        .unwrap();
    let (gsi, vector, eoi) = match line {
        Line::Pic { irq } => (irq, 0x20 + irq, Eoi::PicMaster),
        Line::Ioapic { pin, vector } => (pin, vector, Eoi::Lapic),
    };
    let resample = Notifier::new(Mode::Counter).unwrap();
    let level = backend
        .level_irqfd(
            vm.router(),
            gsi.into(),
            &Notifier::new(Mode::Counter).unwrap(),
            &resample,
        )
        .unwrap();
    assert_eq!(level.path() == &Path::Kernel, kind == BackendKind::Kernel);

    let mut p = GuestProgram::new().unwrap();
    match line {
        Line::Pic { irq } => p.init_pic(0x20, !((1u16 << irq) | (1 << 2)), 1 << irq),
        Line::Ioapic { pin, vector } => {
            // Legacy GSIs also reach the PICs through the default routes: mask both.
            p.init_pic(0x20, 0xffff, 0).unwrap();
            p.enable_lapic().unwrap();
            p.route_ioapic_pin(pin, vector, true)
        }
    }
    .unwrap();
    // Handler: acknowledge at the device, then EOI (the kit sends it after the body).
    p.on_interrupt_with(vector, eoi, |a| {
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

    // The device: EVENTS interrupts are due, one at a time; each is acknowledged by the guest at
    // INTERRUPT_ACK before its EOI. The device asserts the next one once the line has been
    // resampled (KVM lowered it at the EOI) and the previous one is acknowledged. Both are
    // waited for: on the IOAPIC path here the resample is often visible before the ack that
    // precedes the EOI in the guest's program order.
    let device = thread::spawn(move || {
        let (mut raised, mut resamples, mut acked) = (0u64, 0u64, 0u64);
        ready_rx.recv_timeout(TIMEOUT).unwrap();
        level.trigger().unwrap();
        raised += 1;
        // Silence this long means the guest is done (on the injector path a re-delivered
        // interrupt can finish the guest's count before the device's last assertion is taken).
        let quiet = Duration::from_secs(2);
        while acked < EVENTS {
            // This assertion's resample, then its acknowledgement.
            while resamples < raised {
                match level.resample().read_timeout(quiet).unwrap() {
                    Attempt::Done(n) => resamples += n,
                    Attempt::WouldBlock => return (raised, resamples, acked),
                }
            }
            while acked < raised {
                match acks.read_timeout(quiet).unwrap() {
                    Attempt::Done(n) => acked += n,
                    Attempt::WouldBlock => return (raised, resamples, acked),
                }
            }
            if acked < EVENTS {
                level.trigger().unwrap();
                raised += 1;
            }
        }
        (raised, resamples, acked)
    });
    let dispatcher = backend.dispatcher().clone();
    let run = vm
        .start(p, move |e: &GuestExit, _: &mut [u8]| {
            if let GuestExit::PioWrite {
                port: layout::HOST_PORT,
                ..
            } = e
            {
                ready_tx.send(()).unwrap();
            } else {
                e.dispatch(&dispatcher).unwrap();
            }
        })
        .unwrap();
    let report = run.wait(TIMEOUT).done().unwrap();
    let (raised, resamples, acked) = device.join().unwrap();
    let guest_irqs = vm.irq_count(vector).unwrap();
    eprintln!(
        "{kind:?} {line:?}: raised={raised} guest_irqs={guest_irqs} acked={acked} resamples={resamples} exits={} in {:?}",
        report.exits.len(),
        report.elapsed
    );
    // The ready signal, and on the userspace path each acknowledgement.
    let acks_exit = if kind == BackendKind::Kernel {
        0
    } else {
        guest_irqs as usize
    };
    assert_eq!(report.exits.len(), 1 + acks_exit, "{report}");
    (raised, guest_irqs, acked, resamples)
}

#[test]
fn level_irqfd_on_a_pic_line_resamples_at_eoi() {
    if !kvm_or_skip("level_irqfd_on_a_pic_line_resamples_at_eoi") {
        return;
    }
    assert_eq!(
        run(BackendKind::Kernel, Line::Pic { irq: 5 }),
        (EVENTS, EVENTS, EVENTS, EVENTS)
    );
}

#[test]
fn level_irqfd_on_an_ioapic_pin_resamples_at_lapic_eoi() {
    if !kvm_or_skip("level_irqfd_on_an_ioapic_pin_resamples_at_lapic_eoi") {
        return;
    }
    let vm = TinyVm::new().unwrap();
    assert!(vm.router().routes(10).contains(&Route::Irqchip {
        chip: IrqChip::Ioapic,
        pin: 10
    }));
    drop(vm);
    let line = Line::Ioapic {
        pin: 10,
        vector: 0x3a,
    };
    assert_eq!(
        run(BackendKind::Kernel, line),
        (EVENTS, EVENTS, EVENTS, EVENTS)
    );
}

/// Level lines have no userspace path: the backend says so with a typed error instead of
/// emulating a resample it cannot time (see `docs/ARCHITECTURE.md`).
#[test]
fn level_lines_refuse_the_userspace_path() {
    if !kvm_or_skip("level_lines_refuse_the_userspace_path") {
        return;
    }
    let vm = TinyVm::new().unwrap();
    let n = Notifier::new(Mode::Counter).unwrap();
    let r = Notifier::new(Mode::Counter).unwrap();
    let user = Backend::new(vm.vm().clone(), BackendKind::Userspace);
    let e = user.level_irqfd(vm.router(), 10, &n, &r).unwrap_err();
    assert!(matches!(e, Error::LevelFallback { gsi: 10 }), "{e:?}");
    let auto = Backend::new(vm.vm().clone(), BackendKind::Auto).disable(Capability::IrqFdResample);
    assert!(matches!(
        auto.level_irqfd(vm.router(), 10, &n, &r),
        Err(Error::LevelFallback { gsi: 10 })
    ));
    // Where the kernel can, Auto takes the kernel path.
    let auto = Backend::new(vm.vm().clone(), BackendKind::Auto);
    let level = auto.level_irqfd(vm.router(), 10, &n, &r).unwrap();
    assert_eq!(level.path(), &Path::Kernel);
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
