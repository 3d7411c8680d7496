//! Device → irqfd → guest handler, with a real guest: edge interrupts on a PIC line, on an IOAPIC
//! pin and on an MSI route, and kick/interrupt ping-pong — each on the kernel path (ioeventfd +
//! irqfd) and on the userspace path (exit dispatcher + injector thread). The IOAPIC pin and the
//! MSI route run on both irqchips: on the split one the pin is vm-notify's IOAPIC's whatever the
//! policy (the injector pulses it there).

use std::thread;
use std::time::{Duration, Instant};

use vm_notify::fallback::{Fallback, Placement, Policy};
use vm_notify::kvm::{Gsi, MsiMessage};
use vm_notify::{Attempt, Mode, Notifier, Width, WriteMatch};
use vm_notify_testkit::{kvm_test, Eoi, GuestExit, GuestProgram, Irqchip, TinyVm};

const TIMEOUT: Duration = Duration::from_secs(120);
const ACK: u64 = 0xd000_0000;
const KICK_SLOT: usize = 0;
/// Every test here runs once per path.
const KINDS: [Policy; 2] = [Policy::Kernel, Policy::Userspace];

/// Where the device's interrupts come from, and how the guest handles them.
#[derive(Clone, Copy, Debug)]
enum Line {
    /// A legacy GSI through the default route to the master PIC.
    Pic { irq: u8 },
    /// An MSI route to the local APIC.
    Msi { vector: u8 },
    /// An IOAPIC pin, edge-triggered, delivering `vector` to the local APIC.
    Ioapic { pin: u8, vector: u8 },
}

const PIC_BASE: u8 = 0x20;

struct RoundTrips {
    guest_kicks: u64,
    device_kicks: u64,
    raised: u64,
    guest_irqs: u64,
    exits: usize,
    elapsed: Duration,
}

/// `rounds` times: the guest kicks (ioeventfd), the device reads the kick and raises one
/// interrupt, the guest's handler takes it, and the guest kicks again.
fn round_trips(chip: Irqchip, kind: Policy, line: Line, rounds: u64) -> RoundTrips {
    let mut vm = TinyVm::with_irqchip(chip, 1).unwrap();
    let backend = vm.notify().with_policy(kind);
    vm.run_injector(&backend).unwrap();
    let (gsi, vector, eoi): (Gsi, u8, Eoi) = match line {
        Line::Pic { irq } => (irq.into(), PIC_BASE + irq, Eoi::PicMaster),
        Line::Msi { vector } => {
            let gsi = vm.router().route_msi(MsiMessage::x86(0, vector)).unwrap();
            (gsi, vector, Eoi::Lapic)
        }
        Line::Ioapic { pin, vector } => (pin.into(), vector, Eoi::Lapic),
    };
    let kicks = Notifier::new(Mode::Counter).unwrap();
    let ack = backend
        .ioevent(WriteMatch::mmio(ACK).width(Width::W4), &kicks)
        .unwrap();
    let irq = backend.irqfd(gsi).unwrap();
    let on_kernel = kind == Policy::Kernel;
    assert_eq!(ack.placement() == &Placement::Kernel, on_kernel);
    let pin_on_split = chip == Irqchip::Split && matches!(line, Line::Ioapic { .. });
    let expected = match (on_kernel, pin_on_split) {
        (_, true) => Placement::Userspace(Fallback::SplitIrqchip),
        (true, false) => Placement::Kernel,
        (false, false) => Placement::Userspace(Fallback::Requested),
    };
    assert_eq!(irq.placement(), &expected);

    let mut p = GuestProgram::new().unwrap();
    match line {
        Line::Pic { irq } => {
            // Unmask only this IRQ (and the cascade).
            let mask = !((1u16 << irq) | (1 << 2));
            p.init_pic(PIC_BASE, mask, 0).unwrap();
        }
        Line::Msi { .. } => p.enable_lapic().unwrap(),
        Line::Ioapic { pin, vector } => p.take_ioapic_pin(chip, pin, vector, false).unwrap(),
    }
    p.on_interrupt(vector, eoi);
    p.repeat(rounds, |p| p.kick_and_wait(ACK, 0, Some(KICK_SLOT)))
        .unwrap();
    p.exit().unwrap();

    let device = thread::spawn(move || {
        let (mut device_kicks, mut raised) = (0u64, 0u64);
        while device_kicks < rounds {
            match kicks.read_timeout(TIMEOUT).unwrap() {
                Attempt::Done(n) => {
                    // The guest waits for each interrupt before kicking again.
                    assert_eq!(n, 1, "kicks must not run ahead of interrupts");
                    device_kicks += n;
                    irq.trigger().unwrap();
                    raised += 1;
                }
                Attempt::WouldBlock => break,
            }
        }
        (device_kicks, raised)
    });
    let start = Instant::now();
    let dispatcher = backend.dispatcher().clone();
    let report = vm
        .start(p, move |e: &GuestExit, _: &mut [u8]| {
            e.dispatch(&dispatcher).unwrap();
        })
        .unwrap()
        .wait(TIMEOUT);
    let elapsed = start.elapsed();
    let (device_kicks, raised) = device.join().unwrap();
    let report = report.done().unwrap();
    let result = RoundTrips {
        guest_kicks: vm.data(KICK_SLOT).unwrap(),
        device_kicks,
        raised,
        guest_irqs: vm.irq_count(vector).unwrap(),
        exits: report.handler_exits(),
        elapsed,
    };
    drop(ack);
    eprintln!(
        "{chip:?} irqchip, {kind:?} {line:?}: guest_kicks={} device_kicks={} raised={} guest_irqs={} exits={} in {:?} ({:.1} us per round trip)",
        result.guest_kicks,
        result.device_kicks,
        result.raised,
        result.guest_irqs,
        result.exits,
        result.elapsed,
        result.elapsed.as_secs_f64() * 1e6 / rounds as f64
    );
    result
}

fn assert_all_equal(kind: Policy, r: &RoundTrips, n: u64) {
    assert_eq!(r.guest_kicks, n, "guest kicks");
    assert_eq!(r.device_kicks, n, "device kicks");
    assert_eq!(r.raised, n, "interrupts raised");
    assert_eq!(r.guest_irqs, n, "interrupts the guest's handler counted");
    let exits = if kind == Policy::Kernel {
        0
    } else {
        n as usize
    };
    assert_eq!(
        r.exits, exits,
        "{kind:?}: exits to userspace (the kicks, on that path)"
    );
}

#[test]
fn edge_irqfd_on_a_pic_line() {
    kvm_test!();
    let k = 5000;
    for kind in KINDS {
        assert_all_equal(
            kind,
            &round_trips(Irqchip::Kernel, kind, Line::Pic { irq: 4 }, k),
            k,
        );
    }
}

#[test]
fn edge_irqfd_on_an_ioapic_pin_on_both_irqchips() {
    kvm_test!();
    let k = 3000;
    let line = Line::Ioapic {
        pin: 4,
        vector: 0x34,
    };
    for chip in Irqchip::ALL {
        for kind in KINDS {
            assert_all_equal(kind, &round_trips(chip, kind, line, k), k);
        }
    }
}

#[test]
fn edge_irqfd_on_an_msi_route() {
    kvm_test!();
    let k = 3000;
    for chip in Irqchip::ALL {
        for kind in KINDS {
            let line = Line::Msi { vector: 0x41 };
            assert_all_equal(kind, &round_trips(chip, kind, line, k), k);
        }
    }
}

#[test]
fn ping_pong_kick_and_interrupt() {
    kvm_test!();
    let n = 20_000;
    for kind in KINDS {
        let line = Line::Msi { vector: 0x40 };
        assert_all_equal(kind, &round_trips(Irqchip::Kernel, kind, line, n), n);
    }
}

/// Edge irqfd writes made while the guest has interrupts disabled coalesce into one interrupt:
/// the host raises 5 times while the vCPU is stopped at an exit, the guest takes one interrupt and
/// then drains everything still pending (a self-IPI of a lower priority class is delivered only
/// after every pending vector above it), and counts exactly one delivery.
#[test]
fn edge_triggers_coalesce_while_the_guest_is_busy() {
    kvm_test!();
    let mut vm = TinyVm::new().unwrap();
    let gsi = vm.router().route_msi(MsiMessage::x86(0, 0x42)).unwrap();
    let irq = vm.notify().irqfd(gsi).unwrap();
    let mut p = GuestProgram::new().unwrap();
    p.enable_lapic().unwrap();
    p.on_interrupt(0x42, Eoi::Lapic);
    p.signal_host(1).unwrap(); // the host raises 5 times here
    p.wait_for_interrupt().unwrap(); // taken once
    p.drain_interrupts(0x30).unwrap(); // a second delivery would be counted here
    p.exit().unwrap();
    let run = vm
        .start(p, move |_: &vm_notify_testkit::GuestExit, _: &mut [u8]| {
            for _ in 0..5 {
                irq.trigger().unwrap();
            }
        })
        .unwrap();
    let report = run.wait(TIMEOUT).done().unwrap();
    assert_eq!(report.exits.len(), 1, "{report}");
    assert_eq!(vm.irq_count(0x42).unwrap(), 1);
}
