//! Level and edge interrupts on an IOAPIC pin: the in-kernel irqchip against the split irqchip
//! (vm-notify's userspace IOAPIC), side by side in one run.
//!
//! ```text
//! cargo bench --bench irqchip
//! ```
//!
//! * **level round trip**: the device asserts pin 10 (a `LevelIrqFd`); the guest's handler
//!   acknowledges at a device register (an exit) and EOIs; the device waits for the resample and
//!   the acknowledgement, then asserts again. In-kernel: a kernel resample irqfd, KVM's IOAPIC
//!   lowers the pin and signals the resample inside the kernel. Split: the injector thread asserts
//!   the pin on the userspace IOAPIC (`KVM_SIGNAL_MSI`), and the EOI comes back as
//!   `KVM_EXIT_IOAPIC_EOI`, on which the IOAPIC lowers the pin and signals the resample.
//! * **edge round trip**: the guest kicks (a kernel ioeventfd), the device pulses pin 4 (an
//!   `IrqFd`), the guest's handler EOIs and kicks again. In-kernel: a kernel irqfd. Split: the
//!   injector thread pulses the pin on the userspace IOAPIC.
//!
//! Rounds alternate between the irqchips so machine noise hits both; each figure is the median
//! of the runs, per round trip. On this nested host the figures are ratios, not absolutes.
//! `-- --quick` runs each case once (what `.ci/run` does: it checks the counts, never the times).
//! Every run asserts the guest took every interrupt, and that the split irqchip reported exactly
//! one EOI per level interrupt to userspace and the in-kernel one none.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use iced_x86::code_asm::{dword_ptr, rax};
use vm_notify::fallback::Policy;
use vm_notify::{Attempt, Mode, Notifier, Width, WriteMatch};
use vm_notify_testkit::{layout, Eoi, GuestExit, GuestProgram, Irqchip, TinyVm};

mod common;
use common::{median, rounds, us};

const TIMEOUT: Duration = Duration::from_secs(120);
const ROUNDS: usize = 7;
const LEVEL_TRIPS: u64 = 2000;
const EDGE_TRIPS: u64 = 3000;
/// The device's acknowledge register: unregistered, so each write is an exit.
const ACK: u64 = 0xd000_0064;
/// The guest's kick address (a kernel ioeventfd).
const KICK: u64 = 0xd000_0000;

fn wait(n: &Notifier, what: &str) {
    match n.read_timeout(TIMEOUT).unwrap() {
        Attempt::Done(_) => {}
        Attempt::WouldBlock => panic!("no {what} in {TIMEOUT:?}"),
    }
}

/// `LEVEL_TRIPS` level round trips on pin 10; the time per trip and the EOI exits per trip.
fn level(chip: Irqchip) -> (Duration, f64) {
    let (pin, vector) = (10u8, 0x3au8);
    let mut vm = TinyVm::with_irqchip(chip, 1).unwrap();
    let line = vm
        .notify()
        .with_policy(Policy::Kernel)
        .level_irqfd(pin.into())
        .unwrap();
    let acks = Notifier::new(Mode::Counter).unwrap();
    let mut p = GuestProgram::new().unwrap();
    p.take_ioapic_pin(chip, pin, vector, true).unwrap();
    p.on_interrupt_with(vector, Eoi::Lapic, |a| {
        a.mov(rax, ACK)?;
        a.mov(dword_ptr(rax), 1u32)?;
        Ok(())
    });
    p.signal_host(1).unwrap();
    p.repeat(LEVEL_TRIPS, |p| p.wait_for_interrupt()).unwrap();
    p.exit().unwrap();
    let (ready_tx, ready_rx) = mpsc::channel();
    let device_acks = acks.dup().unwrap();
    let device = thread::spawn(move || {
        ready_rx.recv_timeout(TIMEOUT).unwrap();
        let start = Instant::now();
        for _ in 0..LEVEL_TRIPS {
            line.trigger().unwrap();
            wait(line.resample(), "resample");
            wait(&device_acks, "acknowledgement");
        }
        start.elapsed()
    });
    let report = vm
        .start(p, move |e: &GuestExit, _: &mut [u8]| match e {
            GuestExit::PioWrite {
                port: layout::HOST_PORT,
                ..
            } => ready_tx.send(()).unwrap(),
            GuestExit::MmioWrite { addr: ACK, .. } => acks.notify().unwrap(),
            other => panic!("unexpected exit {other:?}"),
        })
        .unwrap()
        .wait(TIMEOUT)
        .done()
        .unwrap();
    let elapsed = device.join().unwrap();
    assert_eq!(vm.irq_count(vector).unwrap(), LEVEL_TRIPS);
    let eois = report.ioapic_eois(vector) as f64 / LEVEL_TRIPS as f64;
    (elapsed / LEVEL_TRIPS as u32, eois)
}

/// `EDGE_TRIPS` kick → edge interrupt round trips on pin 4; the time per trip.
fn edge(chip: Irqchip) -> Duration {
    let (pin, vector) = (4u8, 0x34u8);
    let mut vm = TinyVm::with_irqchip(chip, 1).unwrap();
    let root = vm.notify().with_policy(Policy::Kernel);
    let kicks = Notifier::new(Mode::Counter).unwrap();
    let _kick = root
        .ioevent(WriteMatch::mmio(KICK).width(Width::W4), &kicks)
        .unwrap();
    let irq = root.irqfd(pin.into()).unwrap();
    let mut p = GuestProgram::new().unwrap();
    p.take_ioapic_pin(chip, pin, vector, false).unwrap();
    p.on_interrupt(vector, Eoi::Lapic);
    p.repeat(EDGE_TRIPS, |p| p.kick_and_wait(KICK, 0, None))
        .unwrap();
    p.exit().unwrap();
    let device = thread::spawn(move || {
        let mut start = None;
        for _ in 0..EDGE_TRIPS {
            wait(&kicks, "kick");
            start.get_or_insert_with(Instant::now);
            irq.trigger().unwrap();
        }
        start.map(|s| s.elapsed()).unwrap_or_default()
    });
    vm.start(p, |_: &GuestExit, _: &mut [u8]| {})
        .unwrap()
        .wait(TIMEOUT)
        .done()
        .unwrap();
    let elapsed = device.join().unwrap();
    assert_eq!(vm.irq_count(vector).unwrap(), EDGE_TRIPS);
    elapsed / (EDGE_TRIPS - 1) as u32
}

fn main() {
    if !vm_notify_testkit::kvm_or_skip("bench irqchip") {
        return;
    }
    let rounds = rounds(ROUNDS);
    let mut level_times = [Vec::new(), Vec::new()];
    let mut edge_times = [Vec::new(), Vec::new()];
    let mut eois = [0.0; 2];
    for _ in 0..rounds {
        for (i, chip) in Irqchip::ALL.into_iter().enumerate() {
            let (t, e) = level(chip);
            level_times[i].push(t);
            eois[i] = e;
            let expected = if chip == Irqchip::Split { 1.0 } else { 0.0 };
            assert_eq!(e, expected, "{chip:?}: EOI exits per level interrupt");
            edge_times[i].push(edge(chip));
        }
    }
    let [level_kernel, level_split] = level_times.map(median);
    let [edge_kernel, edge_split] = edge_times.map(median);
    println!("IOAPIC pin round trips, median of {rounds} runs (cargo bench --bench irqchip):");
    println!(
        "| round trip | in-kernel irqchip | split irqchip (userspace IOAPIC) | split / in-kernel |"
    );
    println!("|---|---|---|---|");
    println!(
        "| level: assert, guest ack + EOI, resample ({LEVEL_TRIPS} trips) | {:.1} us | {:.1} us | {:.2} |",
        us(level_kernel),
        us(level_split),
        us(level_split) / us(level_kernel)
    );
    println!(
        "| edge: kick, pulse, guest EOI ({EDGE_TRIPS} trips) | {:.1} us | {:.1} us | {:.2} |",
        us(edge_kernel),
        us(edge_split),
        us(edge_split) / us(edge_kernel)
    );
    println!(
        "EOI exits to userspace per level interrupt: in-kernel {:.2}, split {:.2}",
        eois[0], eois[1]
    );
}
