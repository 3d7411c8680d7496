//! Level-triggered lines with a real guest, on both paths. The device keeps a count of pending
//! interrupt units; each interrupt the guest takes, its handler acknowledges one unit at the
//! device's acknowledge register (an exit the VMM handles on the vCPU thread, like virtio-mmio
//! InterruptACK) and then EOIs. The line must stay asserted while units remain and drop when the
//! last is acknowledged: the guest takes exactly one interrupt per unit.
//!
//! The device code is the same on both paths: `trigger` when units arrive, re-`trigger` on resample
//! while units remain, `deassert` when the last is acknowledged. On the kernel path KVM lowers the
//! line at each EOI and signals resample (the device re-asserts); on the injector path the line is
//! held high and the irqchip re-delivers at the EOI, until `deassert` lowers it.
//!
//! On a PIC line (EOI to the 8259) both paths run this device and give the same counts. On an
//! IOAPIC pin this host's KVM processes the level interrupt's EOI when it injects it, before the
//! guest's handler runs (`ioapic_level_eoi_precedes_the_handler_on_this_host` shows it): a device
//! that re-asserts on resample while its condition holds then gets an extra interrupt, on the
//! kernel path too. The IOAPIC tests therefore use a cautious device: one unit at a time, and the
//! next one only once the guest has acknowledged it and the line was lowered.
//!
//! On the split irqchip the IOAPIC is vm-notify's own ([`vm_notify::irqchip::Ioapic`]): it sees
//! each EOI as `KVM_EXIT_IOAPIC_EOI`, lowers the pin and signals resample there, as KVM's
//! resampler does. The same tests run on it, parameterised by the kit's `Irqchip`, with the same
//! exact counts. This host EOIs a level interrupt when it injects it on the split irqchip too
//! (KVM reports the EOI at the vCPU's next exit, usually the handler's acknowledgement, sometimes
//! before it), so the pin keeps the cautious device there as well. The PIC tests run on the
//! in-kernel irqchip only: the split irqchip has no PIC.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use iced_x86::code_asm::*;
use vm_notify::fallback::{Fallback, Placement, Policy};
use vm_notify::kvm::{IrqChip, MsiMessage, Route};
use vm_notify::wait::EventLoop;
use vm_notify::Vm;
use vm_notify::{Attempt, Capability, Error, LevelIrqFd, Mode, Notifier};
use vm_notify_testkit::{kvm_test, layout, Eoi, GuestExit, GuestProgram, Irqchip, TinyVm};

/// A port the handler writes first, when a test asks for it: an exit at the handler's start.
const PROBE_PORT: u16 = 0x80;

const TIMEOUT: Duration = Duration::from_secs(120);
/// The device's interrupt-acknowledge register (like virtio-mmio InterruptACK); not registered,
/// so each write is an exit.
const INTERRUPT_ACK: u64 = 0xd000_0064;
/// Rounds of interrupt units; every third round raises two units at once.
const ROUNDS: u64 = 2000;

/// The backend with `policy` that serves the machine's lines (on the split irqchip, one that
/// has its IOAPIC).
fn backend(vm: &TinyVm, policy: Policy) -> Vm {
    let backend = vm.notify().with_policy(policy);
    vm.run_injector(&backend).unwrap();
    backend
}

/// How the device raises, and what the handler does.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Style {
    /// Every third round raises two units; the device re-asserts on resample while units remain.
    Level,
    /// One unit per round; the next round only once the unit is acknowledged and the line was
    /// lowered; never re-asserts on resample.
    Cautious,
    /// `Cautious`, and the handler first makes an exit at PROBE_PORT, where the test records
    /// whether the line was already resampled.
    CautiousProbed,
}

impl Style {
    fn units(self, round: u64) -> u64 {
        match self {
            Style::Level if round % 3 == 0 => 2,
            _ => 1,
        }
    }

    fn total(self) -> u64 {
        (0..ROUNDS).map(|r| self.units(r)).sum()
    }
}

#[derive(Clone, Copy, Debug)]
enum Line {
    /// IRQ `irq` of the master 8259, level-triggered through the ELCR; vectors from 0x20.
    Pic { irq: u8 },
    /// IOAPIC pin `pin`, delivering `vector`; both PICs masked.
    Ioapic { pin: u8, vector: u8 },
    /// IOAPIC pin `pin`, programmed edge-triggered by the guest, delivering `vector`: a level
    /// line is still resampled at each EOI of the vector.
    IoapicEdge { pin: u8, vector: u8 },
}

/// A device with a level interrupt: asserted while it has unacknowledged units.
struct Device {
    line: LevelIrqFd,
    pending: Mutex<u64>,
    triggers: AtomicU64,
    acked: AtomicU64,
    /// Acknowledgements with nothing pending: an interrupt the line should not have delivered.
    spurious: AtomicU64,
    /// Signalled at each acknowledgement.
    acks: Notifier,
    /// Handler starts (probe exits) that found the line already resampled.
    resampled_at_probe: AtomicU64,
}

impl Device {
    fn new(backend: &Vm, gsi: u8) -> Arc<Device> {
        Arc::new(Device {
            line: backend.level_irqfd(gsi.into()).unwrap(),
            pending: Mutex::new(0),
            triggers: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            spurious: AtomicU64::new(0),
            acks: Notifier::new(Mode::Counter).unwrap(),
            resampled_at_probe: AtomicU64::new(0),
        })
    }

    fn trigger(&self) {
        self.line.trigger().unwrap();
        self.triggers.fetch_add(1, Ordering::Relaxed);
    }

    fn raise(&self, units: u64) {
        let mut pending = self.pending.lock().unwrap();
        *pending += units;
        self.trigger();
    }

    /// The guest's write to INTERRUPT_ACK, on the vCPU thread.
    fn ack(&self) {
        let mut pending = self.pending.lock().unwrap();
        if *pending == 0 {
            self.spurious.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *pending -= 1;
        self.acked.fetch_add(1, Ordering::Relaxed);
        if *pending == 0 {
            self.line.deassert().unwrap();
        }
        self.acks.notify().unwrap();
    }

    /// The handler's first exit: was the line already resampled (on the kernel path, lowered
    /// at an EOI the guest has not made yet)?
    fn probe(&self) {
        if self.line.resample().is_pending().unwrap() {
            self.resampled_at_probe.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn left(&self) -> u64 {
        *self.pending.lock().unwrap()
    }

    /// The line was lowered: re-assert while units remain. Returns the units left.
    fn resampled(&self) -> u64 {
        let pending = self.pending.lock().unwrap();
        if *pending > 0 {
            self.trigger();
        }
        *pending
    }
}

#[derive(Debug, PartialEq)]
struct Counts {
    units: u64,
    guest_irqs: u64,
    acked: u64,
    spurious: u64,
    triggers: u64,
    resamples: u64,
}

fn wait(n: &Notifier, what: &str) -> u64 {
    match n.read_timeout(TIMEOUT).unwrap() {
        Attempt::Done(k) => k,
        Attempt::WouldBlock => panic!("no {what} in {TIMEOUT:?}"),
    }
}

/// Runs ROUNDS rounds of level interrupts through `line` on `backend`'s path; returns the counts
/// and how many handler starts found the line already resampled (`Style::CautiousProbed`).
fn run(vm: &mut TinyVm, backend: &Vm, line: Line, style: Style) -> (Counts, u64) {
    let (gsi, vector, eoi) = match line {
        Line::Pic { irq } => (irq, 0x20 + irq, Eoi::PicMaster),
        Line::Ioapic { pin, vector } | Line::IoapicEdge { pin, vector } => {
            (pin, vector, Eoi::Lapic)
        }
    };
    let device = Device::new(backend, gsi);
    let total = style.total();

    let chip = match vm.notify().ioapic() {
        Some(_) => Irqchip::Split,
        None => Irqchip::Kernel,
    };
    let mut p = GuestProgram::new().unwrap();
    match line {
        Line::Pic { irq } => p.init_pic(0x20, !((1u16 << irq) | (1 << 2)), 1 << irq),
        Line::Ioapic { pin, vector } => p.take_ioapic_pin(chip, pin, vector, true),
        Line::IoapicEdge { pin, vector } => p.take_ioapic_pin(chip, pin, vector, false),
    }
    .unwrap();
    // Handler: acknowledge one unit at the device, then EOI (the kit sends it after the body).
    let probed = style == Style::CautiousProbed;
    p.on_interrupt_with(vector, eoi, move |a| {
        if probed {
            a.out(u32::from(PROBE_PORT), al)?;
        }
        a.mov(rax, INTERRUPT_ACK)?;
        a.mov(dword_ptr(rax), 1u32)?;
        Ok(())
    });
    // Tell the device the line is set up: re-initialising the PIC acks a line that is already
    // asserted (KVM signals resample for it), so the device asserts only from here on.
    p.signal_host(1).unwrap();
    p.repeat(total, |p| p.wait_for_interrupt()).unwrap();
    p.exit().unwrap();
    let (ready_tx, ready_rx) = mpsc::channel();

    // The device thread: a round raises its units and ends when the line has been lowered with
    // none left (Level: the resample after the last acknowledgement; Cautious: the resample and
    // the acknowledgement, in either order).
    let device_thread = {
        let device = device.clone();
        thread::spawn(move || {
            let mut resamples = 0;
            ready_rx.recv_timeout(TIMEOUT).unwrap();
            for round in 0..ROUNDS {
                device.raise(style.units(round));
                if style == Style::Level {
                    loop {
                        resamples += wait(device.line.resample(), "resample");
                        if device.resampled() == 0 {
                            break;
                        }
                    }
                } else {
                    resamples += wait(device.line.resample(), "resample");
                    wait(&device.acks, "acknowledgement");
                }
            }
            resamples
        })
    };
    let handler_device = device.clone();
    let run = vm
        .start(p, move |e: &GuestExit, _: &mut [u8]| match e {
            GuestExit::PioWrite {
                port: layout::HOST_PORT,
                ..
            } => ready_tx.send(()).unwrap(),
            GuestExit::MmioWrite {
                addr: INTERRUPT_ACK,
                ..
            } => handler_device.ack(),
            GuestExit::PioWrite {
                port: PROBE_PORT, ..
            } => handler_device.probe(),
            other => panic!("unexpected exit {other:?}"),
        })
        .unwrap();
    let report = run.wait(TIMEOUT);
    let report = report.done().unwrap();
    let resamples = device_thread.join().unwrap();
    let counts = Counts {
        units: total,
        guest_irqs: vm.irq_count(vector).unwrap(),
        acked: device.acked.load(Ordering::Relaxed),
        spurious: device.spurious.load(Ordering::Relaxed),
        triggers: device.triggers.load(Ordering::Relaxed),
        resamples,
    };
    eprintln!(
        "{:?} {line:?}: {counts:?}, {} exits in {:?}",
        device.line.placement(),
        report.exits.len(),
        report.elapsed
    );
    let probes = if probed { total } else { 0 };
    assert_eq!(
        report.handler_exits() as u64,
        1 + total + probes,
        "{report}"
    );
    if let Some(io) = vm.notify().ioapic() {
        // Every interrupt the IOAPIC sent was EOIed, reported once, and resampled once.
        let stats = io.stats();
        eprintln!(
            "  IOAPIC: {stats:?}; EOI exits before the handler's acknowledgement: {}",
            eois_before_ack(&report)
        );
        assert_eq!(
            report.ioapic_eois(vector) as u64,
            counts.guest_irqs,
            "{report}"
        );
        assert_eq!(
            (stats.delivered, stats.eois, stats.resamples),
            (counts.guest_irqs, counts.guest_irqs, counts.resamples)
        );
    }
    (counts, device.resampled_at_probe.load(Ordering::Relaxed))
}

/// The counts each path must give: one interrupt per unit and no spurious one. In `Level` the
/// kernel (and the split irqchip's IOAPIC) lowers the line at every EOI (a resample and a
/// re-assertion per unit) while the injector on the in-kernel irqchip holds it until the last
/// unit of a round is acknowledged (one assertion and one resample per round); `Cautious` rounds
/// have one unit, so both make one of each per round.
fn expected(lowered_at_eoi: bool, style: Style) -> Counts {
    let total = style.total();
    let per_line_change = if lowered_at_eoi { total } else { ROUNDS };
    Counts {
        units: total,
        guest_irqs: total,
        acked: total,
        spurious: 0,
        triggers: per_line_change,
        resamples: per_line_change,
    }
}

fn level_test(chip: Irqchip, kind: Policy, line: Line, style: Style) {
    let mut vm = TinyVm::with_irqchip(chip, 1).unwrap();
    let backend = backend(&vm, kind);
    let (counts, _) = run(&mut vm, &backend, line, style);
    let lowered_at_eoi = kind == Policy::Kernel || chip == Irqchip::Split;
    assert_eq!(counts, expected(lowered_at_eoi, style));
}

const PIC_LINE: Line = Line::Pic { irq: 5 };
const IOAPIC_LINE: Line = Line::Ioapic {
    pin: 10,
    vector: 0x3a,
};

#[test]
fn level_irqfd_on_a_pic_line_resamples_at_eoi() {
    kvm_test!();
    level_test(Irqchip::Kernel, Policy::Kernel, PIC_LINE, Style::Level);
}

#[test]
fn injected_level_line_on_a_pic_line_is_held_until_deasserted() {
    kvm_test!();
    level_test(Irqchip::Kernel, Policy::Userspace, PIC_LINE, Style::Level);
}

/// Where the kernel lacks `KVM_CAP_IRQFD_RESAMPLE`, `Auto` takes the injector path, says why,
/// and the guest sees the same counts; where it has it, `Auto` takes the kernel path.
#[test]
fn auto_level_line_falls_back_without_resample() {
    kvm_test!();
    let mut vm = TinyVm::new().unwrap();
    let auto = vm
        .notify()
        .with_policy(Policy::Auto)
        .disable(Capability::IrqFdResample);
    vm.run_injector(&auto).unwrap();
    let n = Notifier::new(Mode::Counter).unwrap();
    let probe = auto.level_irqfd_with(5, &n, &n).unwrap();
    assert_eq!(
        probe.placement(),
        &Placement::Userspace(Fallback::Disabled(Capability::IrqFdResample))
    );
    drop(probe);
    let (counts, _) = run(&mut vm, &auto, PIC_LINE, Style::Level);
    assert_eq!(counts, expected(false, Style::Level));

    let vm = TinyVm::new().unwrap();
    let auto = vm.notify().with_policy(Policy::Auto);
    vm.run_injector(&auto).unwrap();
    let level = auto.level_irqfd_with(10, &n, &n).unwrap();
    assert_eq!(level.placement(), &Placement::Kernel);
    assert!(!level.deassert().unwrap());
}

#[test]
fn level_irqfd_on_an_ioapic_pin_resamples_at_lapic_eoi() {
    kvm_test!();
    let vm = TinyVm::new().unwrap();
    assert!(vm.router().routes(10).contains(&Route::Irqchip {
        chip: IrqChip::Ioapic,
        pin: 10
    }));
    drop(vm);
    level_test(
        Irqchip::Kernel,
        Policy::Kernel,
        IOAPIC_LINE,
        Style::Cautious,
    );
}

/// On the split irqchip the pin is vm-notify's IOAPIC's, whatever the policy, and the cautious
/// device gets the same exact counts as on the in-kernel IOAPIC, with every interrupt's EOI
/// reported to userspace and resampled once. (The plain device, re-asserting on resample while
/// units remain, meets this host's early EOI there too: see the diagnostic after this test.)
#[test]
fn level_line_on_a_split_irqchip_ioapic_pin_resamples_at_each_eoi() {
    kvm_test!();
    for kind in [Policy::Kernel, Policy::Userspace, Policy::Auto] {
        let vm = TinyVm::with_split_irqchip(1).unwrap();
        let line = vm.notify().with_policy(kind).level_irqfd(10).unwrap();
        assert_eq!(
            line.placement(),
            &Placement::Userspace(Fallback::SplitIrqchip)
        );
        drop(line);
        level_test(Irqchip::Split, kind, IOAPIC_LINE, Style::Cautious);
    }
}

/// A level line on a pin the guest programmed edge-triggered: each assertion is an edge, and the
/// line is lowered and resampled at each EOI of the vector, as KVM's IOAPIC acknowledges every
/// pin of a vector (on the split irqchip the IOAPIC keeps an EOI-reporting route for such a pin
/// while it has level sources). Both irqchips, the cautious device, the same exact counts.
#[test]
fn level_line_on_an_edge_programmed_ioapic_pin_resamples_at_each_eoi() {
    kvm_test!();
    let line = Line::IoapicEdge {
        pin: 11,
        vector: 0x3b,
    };
    for chip in Irqchip::ALL {
        level_test(chip, Policy::Kernel, line, Style::Cautious);
    }
}

/// A host fact the IOAPIC tests work around, kept as a reproducer: KVM's documented behaviour is
/// to resample a level line at the guest's EOI, which the handler here sends after its
/// acknowledgement. Each handler first makes an exit; the test counts how many found the resample
/// already signalled. It asserts the cautious device's exact counts and reports the timing, so a
/// host that resamples at the EOI shows `resampled_at_handler_start=0` here. On the split
/// irqchip it also counts the EOI exits that came before the handler's acknowledgement (the
/// guest's EOI write comes after it, so a host with KVM's timing shows 0). A host diagnostic,
/// not a check of the library: run it with `--ignored` (docs/ARCHITECTURE.md, host notes).
#[test]
#[ignore = "host diagnostic: prints when this host resamples an IOAPIC level line; run with --ignored"]
fn ioapic_level_eoi_precedes_the_handler_on_this_host() {
    kvm_test!();
    for chip in [Irqchip::Kernel, Irqchip::Split] {
        let mut vm = TinyVm::with_irqchip(chip, 1).unwrap();
        let backend = backend(&vm, Policy::Kernel);
        let (counts, early) = run(&mut vm, &backend, IOAPIC_LINE, Style::CautiousProbed);
        eprintln!(
            "IOAPIC level line, {chip:?} irqchip: resampled_at_handler_start={early} of {}",
            counts.guest_irqs
        );
        assert_eq!(counts, expected(true, Style::CautiousProbed));
    }
}

/// `KVM_EXIT_IOAPIC_EOI` exits that came before the acknowledgement of the interrupt they end:
/// each handler acknowledges, then EOIs, so with KVM's documented timing every EOI exit follows
/// an acknowledgement made since the one before.
fn eois_before_ack(report: &vm_notify_testkit::RunReport) -> u64 {
    let mut acked = false;
    let mut early = 0;
    for e in &report.exits {
        match e {
            GuestExit::MmioWrite {
                addr: INTERRUPT_ACK,
                ..
            } => acked = true,
            GuestExit::IoapicEoi { .. } => {
                early += u64::from(!acked);
                acked = false;
            }
            _ => {}
        }
    }
    early
}

/// Two devices share one PIC line (as PCI INTx lines are shared), and each round both raise one
/// unit. The guest's handler acknowledges one unit per interrupt, at the first device that has
/// one (a driver polling each device's status). The line must stay asserted until both are
/// acknowledged: two interrupts per round. On the injector path the first `deassert` must not
/// lower the line the second device still holds; on the kernel path the shared resampler
/// signals both devices and the second re-asserts. Same device code on both.
fn shared_line(kind: Policy) {
    const SHARED_ROUNDS: u64 = 500;
    let mut vm = TinyVm::new().unwrap();
    let backend = vm.notify().with_policy(kind);
    vm.run_injector(&backend).unwrap();
    let Line::Pic { irq } = PIC_LINE else {
        unreachable!()
    };
    let devices = [Device::new(&backend, irq), Device::new(&backend, irq)];
    let mut p = GuestProgram::new().unwrap();
    p.init_pic(0x20, !((1u16 << irq) | (1 << 2)), 1 << irq)
        .unwrap();
    p.on_interrupt_with(0x20 + irq, Eoi::PicMaster, |a| {
        a.mov(rax, INTERRUPT_ACK)?;
        a.mov(dword_ptr(rax), 1u32)?;
        Ok(())
    });
    p.signal_host(1).unwrap();
    p.repeat(2 * SHARED_ROUNDS, |p| p.wait_for_interrupt())
        .unwrap();
    p.exit().unwrap();
    let (ready_tx, ready_rx) = mpsc::channel();
    let device_thread = {
        let devices = devices.clone();
        thread::spawn(move || {
            let events = EventLoop::new().unwrap();
            for (token, d) in devices.iter().enumerate() {
                events.add(token as u64, d.line.resample()).unwrap();
            }
            let mut fired = Vec::new();
            ready_rx.recv_timeout(TIMEOUT).unwrap();
            // The resamples a round brings each device: on the kernel path the two irqfds share
            // KVM's resampler, which signals both at each of the round's two EOIs; on the
            // injector path each device's own deassert lowers its line once. A round ends only
            // when all of them are read: one left unread would be taken for the next round's
            // and re-assert a line nobody owes (an extra interrupt, seen once in CI as a run
            // that ended a round early).
            let per_round = if kind == Policy::Kernel { 2 } else { 1 };
            for round in 0..SHARED_ROUNDS {
                devices.iter().for_each(|d| d.raise(1));
                let mut lowered = [0u64; 2];
                while !(lowered == [per_round; 2] && devices.iter().all(|d| d.left() == 0)) {
                    let wake = events.wait(Some(TIMEOUT), &mut fired).unwrap();
                    assert!(!fired.is_empty(), "round {round}: no resample ({wake:?})");
                    for &(token, count) in &fired {
                        devices[token as usize].resampled();
                        lowered[token as usize] += count;
                    }
                    assert!(
                        lowered.iter().all(|&n| n <= per_round),
                        "round {round}: resamples {lowered:?}, at most {per_round} each"
                    );
                }
            }
        })
    };
    let acking = devices.clone();
    let run = vm
        .start(p, move |e: &GuestExit, _: &mut [u8]| match e {
            GuestExit::PioWrite {
                port: layout::HOST_PORT,
                ..
            } => ready_tx.send(()).unwrap(),
            GuestExit::MmioWrite {
                addr: INTERRUPT_ACK,
                ..
            } => match acking.iter().find(|d| d.left() > 0) {
                Some(d) => d.ack(),
                None => acking[0].ack(),
            },
            other => panic!("unexpected exit {other:?}"),
        })
        .unwrap();
    run.wait(TIMEOUT).done().unwrap();
    device_thread.join().unwrap();
    let guest_irqs = vm.irq_count(0x20 + irq).unwrap();
    let acked: Vec<u64> = devices
        .iter()
        .map(|d| d.acked.load(Ordering::Relaxed))
        .collect();
    let spurious: u64 = devices
        .iter()
        .map(|d| d.spurious.load(Ordering::Relaxed))
        .sum();
    eprintln!("{kind:?} shared line: guest_irqs={guest_irqs} acked={acked:?} spurious={spurious}");
    assert_eq!(
        (guest_irqs, acked, spurious),
        (2 * SHARED_ROUNDS, vec![SHARED_ROUNDS; 2], 0)
    );
}

#[test]
fn shared_level_line_stays_asserted_until_every_device_is_acknowledged() {
    kvm_test!();
    shared_line(Policy::Kernel);
    shared_line(Policy::Userspace);
}

#[test]
fn resample_on_an_msi_route_is_refused_on_both_paths() {
    kvm_test!();
    let vm = TinyVm::new().unwrap();
    let gsi = vm.router().route_msi(MsiMessage::x86(0, 0x40)).unwrap();
    let n = Notifier::new(Mode::Counter).unwrap();
    let e = vm
        .notify()
        .level_irqfd_with(gsi, &n, &n.dup().unwrap())
        .unwrap_err();
    assert!(
        matches!(e, Error::ResampleNeedsIrqchip { gsi: g } if g == gsi),
        "{e:?}"
    );
    assert_eq!(vm.router().irqfds(gsi), 0);
    let user = vm.notify().with_policy(Policy::Userspace);
    vm.run_injector(&user).unwrap();
    let e = user.level_irqfd_with(gsi, &n, &n).unwrap_err();
    assert!(
        matches!(e, Error::ResampleNeedsIrqchip { gsi: g } if g == gsi),
        "{e:?}"
    );
}

/// On the split irqchip a level interrupt no local APIC takes (the guest addressed the pin to an
/// APIC ID that does not exist) is dropped without leaving the pin waiting for an EOI that cannot
/// come: once the guest re-addresses the pin to its own APIC, the line still asserted is
/// delivered, once.
#[test]
fn a_split_irqchip_level_interrupt_nobody_takes_does_not_wedge_the_pin() {
    kvm_test!();
    let (pin, vector) = (10u8, 0x3au8);
    let mut vm = TinyVm::with_split_irqchip(1).unwrap();
    let line = Arc::new(vm.notify().level_irqfd(pin.into()).unwrap());
    let io = vm.notify().ioapic().unwrap().clone();
    let mut p = GuestProgram::new().unwrap();
    p.enable_lapic().unwrap();
    p.route_ioapic_pin_to(pin, vector, true, 7).unwrap(); // no APIC 7 here
    p.on_interrupt_with(vector, Eoi::Lapic, |a| {
        a.mov(rax, INTERRUPT_ACK)?;
        a.mov(dword_ptr(rax), 1u32)?;
        Ok(())
    });
    p.signal_host(1).unwrap(); // the device asserts; the IOAPIC's MSI reaches nobody
    p.route_ioapic_pin_to(pin, vector, true, 0).unwrap();
    p.wait_for_interrupt().unwrap();
    p.drain_interrupts(0x30).unwrap();
    p.exit().unwrap();
    let (handler_line, handler_io) = (line.clone(), io.clone());
    let report = vm
        .start(p, move |e: &GuestExit, _: &mut [u8]| match e {
            GuestExit::PioWrite {
                port: layout::HOST_PORT,
                ..
            } => {
                handler_line.trigger().unwrap();
                let deadline = std::time::Instant::now() + TIMEOUT;
                while handler_io.stats().not_taken == 0 {
                    assert!(std::time::Instant::now() < deadline, "never sent");
                    thread::yield_now();
                }
                let entry = handler_io.entry(pin.into()).unwrap();
                assert!(
                    !entry.remote_irr(),
                    "an undelivered interrupt awaits no EOI"
                );
            }
            GuestExit::MmioWrite {
                addr: INTERRUPT_ACK,
                ..
            } => {
                handler_line.deassert().unwrap();
            }
            other => panic!("unexpected exit {other:?}"),
        })
        .unwrap()
        .wait(TIMEOUT);
    report.done().unwrap();
    let stats = io.stats();
    eprintln!("IOAPIC after a message nobody took: {stats:?}");
    assert_eq!(vm.irq_count(vector).unwrap(), 1);
    assert_eq!((stats.not_taken, stats.delivered), (1, 1));
}

/// On the split irqchip, a pin two level sources hold, whose interrupt no local APIC took (the
/// guest's LAPIC was still software-disabled): when one source lets go while the other still
/// holds the line, the IOAPIC delivers the held line to the now-enabled LAPIC, once, instead of
/// marking it as awaiting an EOI that can never come (issue 22: `deassert` discarded the message
/// the line change asked for, and the guest waited forever).
#[test]
fn a_split_irqchip_pin_still_held_by_another_source_is_delivered_when_one_lets_go() {
    kvm_test!();
    let (pin, vector) = (10u8, 0x3bu8);
    let mut vm = TinyVm::with_split_irqchip(1).unwrap();
    let first = Arc::new(vm.notify().level_irqfd(pin.into()).unwrap());
    let second = Arc::new(vm.notify().level_irqfd(pin.into()).unwrap());
    let io = vm.notify().ioapic().unwrap().clone();
    let mut p = GuestProgram::new().unwrap();
    // Addressed to this vCPU's APIC, which is software-disabled until `enable_lapic`.
    p.route_ioapic_pin_to(pin, vector, true, 0).unwrap();
    p.on_interrupt_with(vector, Eoi::Lapic, |a| {
        a.mov(rax, INTERRUPT_ACK)?;
        a.mov(dword_ptr(rax), 1u32)?;
        Ok(())
    });
    p.signal_host(1).unwrap(); // both sources assert; nobody takes the message
    p.enable_lapic().unwrap();
    p.signal_host(2).unwrap(); // the first source lets go; the second still holds the pin
    p.wait_for_interrupt().unwrap();
    p.drain_interrupts(0x30).unwrap();
    p.exit().unwrap();
    let (h_first, h_second, h_io) = (first.clone(), second.clone(), io.clone());
    let report = vm
        .start(p, move |e: &GuestExit, _: &mut [u8]| match e {
            GuestExit::PioWrite {
                port: layout::HOST_PORT,
                data,
                ..
            } if *data == 1 => {
                h_first.trigger().unwrap();
                h_second.trigger().unwrap();
                let deadline = std::time::Instant::now() + TIMEOUT;
                while h_io.stats().not_taken < 2 {
                    assert!(std::time::Instant::now() < deadline, "never sent");
                    thread::yield_now();
                }
            }
            GuestExit::PioWrite {
                port: layout::HOST_PORT,
                ..
            } => {
                h_first.deassert().unwrap();
            }
            GuestExit::MmioWrite {
                addr: INTERRUPT_ACK,
                ..
            } => {
                h_second.deassert().unwrap();
            }
            other => panic!("unexpected exit {other:?}"),
        })
        .unwrap()
        .wait(TIMEOUT);
    report.done().unwrap();
    let stats = io.stats();
    eprintln!("IOAPIC with one of two holders letting go: {stats:?}");
    assert_eq!(vm.irq_count(vector).unwrap(), 1);
    assert_eq!((stats.not_taken, stats.delivered), (2, 1));
    assert!(!io.entry(pin.into()).unwrap().remote_irr(), "the EOI came");
}
