//! Snapshot and restore in the middle of a storm, onto a fresh VM, with the guest going on.
//!
//! A virtio-pci device with four queues (each kicked by the guest through a kernel ioeventfd,
//! each answered on its own MSI-X vector), a configuration vector the device raised while it was
//! masked (a pending bit), and a level line on PIC IRQ 5 held asserted while the guest has the
//! IRQ masked. The guest kicks the four queues and takes their four interrupts, round after
//! round. Mid-storm the device stops (its thread is quiesced, so the guest's next kicks stay
//! unread), then the vCPU is paused; the device's notification state is saved — through JSON, as a
//! migration stream would carry it — with the machine's; everything is dropped, and a fresh VM is
//! restored from the two. The guest goes on to its end, takes the configuration interrupt when
//! the host unmasks it, unmasks IRQ 5 and takes the level interrupt, then drains anything pending.
//!
//! Checked in the guest's own counters: every request the guest made, before and after the
//! snapshot, was served exactly once; every interrupt owed was delivered exactly once (each queue
//! vector once per round, the configuration vector once, IRQ 5 once); nothing extra.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use vm_notify::fallback::LevelLineState;
use vm_notify::kvm::MsiMessage;
use vm_notify::virtio::{PciLayout, PciNotify, PciNotifyState};
use vm_notify::wait::{EventLoop, StopHandle, Wake};
use vm_notify::{Attempt, LevelIrqFd};
use vm_notify_testkit::{kvm_test, layout, Eoi, GuestExit, GuestProgram, TinyVm};

const TIMEOUT: Duration = Duration::from_secs(120);
const QUEUES: usize = 4;
const ROUNDS: u64 = 400;
const QUEUE_VECTOR: u8 = 0x40;
const CONFIG_VECTOR: u8 = 0x48;
const CONFIG: usize = QUEUES;
const IRQ: u8 = 5;
const IRQ_VECTOR: u8 = 0x20 + IRQ;
/// The level device's acknowledge register (an exit).
const ACK: u64 = 0xd000_0064;

fn layout() -> PciLayout {
    PciLayout {
        notify_base: 0xe000_0000,
        notify_off_multiplier: 4,
        queue_notify_off: (0..QUEUES as u16).collect(),
        intx: None,
    }
}

/// The device: what it served, and its level interrupt's condition. Lives across the snapshot
/// (a VMM would save it with the device).
#[derive(Default)]
struct Device {
    served: [AtomicU64; QUEUES],
    asserted: AtomicBool,
}

/// Runs the device on `pci`'s queues and `line` until stopped: a kick is served and answered
/// on the queue's vector; a resample re-asserts the line while the condition holds.
fn spawn(
    device: &Arc<Device>,
    pci: &PciNotify,
    line: &Arc<LevelIrqFd>,
) -> (StopHandle, JoinHandle<()>) {
    let events = EventLoop::new().unwrap();
    let queues: Vec<_> = (0..QUEUES as u16).map(|q| pci.queue(q).unwrap()).collect();
    for (i, q) in queues.iter().enumerate() {
        events.add(i as u64, q.kicks()).unwrap();
    }
    events.add(QUEUES as u64, line.resample()).unwrap();
    let stop = events.stop_handle();
    let (device, line) = (device.clone(), line.clone());
    let thread = thread::spawn(move || {
        let mut ready = Vec::new();
        while events.wait(None, &mut ready).unwrap() == Wake::Ready {
            for &(token, count) in &ready {
                let token = token as usize;
                if token == QUEUES {
                    if device.asserted.load(Ordering::SeqCst) {
                        line.trigger().unwrap();
                    }
                    continue;
                }
                // One request per kick: the guest waits for each answer before kicking again.
                assert_eq!(count, 1, "queue {token}: kicks ran ahead of answers");
                device.served[token].fetch_add(count, Ordering::SeqCst);
                assert!(
                    queues[token].trigger().unwrap(),
                    "queue {token} has a vector"
                );
            }
        }
    });
    (stop, thread)
}

fn program() -> GuestProgram {
    let mut p = GuestProgram::new().unwrap();
    // IRQ 5 level-triggered and masked for now; only the cascade open.
    p.init_pic(0x20, !(1u16 << 2), 1 << IRQ).unwrap();
    p.enable_lapic().unwrap();
    for q in 0..QUEUES as u8 {
        p.on_interrupt(QUEUE_VECTOR + q, Eoi::Lapic);
    }
    p.on_interrupt(CONFIG_VECTOR, Eoi::Lapic);
    p.on_interrupt_with(IRQ_VECTOR, Eoi::PicMaster, |a| {
        a.mov(rax, ACK)?;
        a.mov(dword_ptr(rax), 1u32)?;
        Ok(())
    });
    p.signal_host(1).unwrap(); // the device asserts its line now
    p.repeat(ROUNDS, |p| {
        for q in 0..QUEUES as u64 {
            p.mmio_write(layout().notify_base + 4 * q, q, 2)?;
        }
        (0..QUEUES).try_for_each(|_| p.wait_for_interrupt())
    })
    .unwrap();
    p.wait_for_interrupt().unwrap(); // the configuration change, once the host unmasks it
                                     // Unmask IRQ 5: the level line the device has held since the start.
    p.asm()
        .mov(al, (!(1u32 << 2 | 1 << IRQ)) as u8 as u32)
        .unwrap();
    p.asm().out(0x21, al).unwrap();
    p.wait_for_interrupt().unwrap();
    p.drain_interrupts(0x30).unwrap(); // anything extra is counted here
    p.exit().unwrap();
    p
}

/// The exit handler of both machines: the ready signal, and the level device's acknowledge.
fn handler(
    device: Arc<Device>,
    line: Arc<LevelIrqFd>,
    ready: Option<mpsc::Sender<()>>,
) -> impl FnMut(&GuestExit, &mut [u8]) + Send + 'static {
    move |e: &GuestExit, _: &mut [u8]| match *e {
        GuestExit::PioWrite {
            port: layout::HOST_PORT,
            ..
        } => ready.as_ref().expect("one ready signal").send(()).unwrap(),
        GuestExit::MmioWrite { addr: ACK, .. } => {
            device.asserted.store(false, Ordering::SeqCst);
            line.deassert().unwrap();
        }
        ref other => panic!("unexpected exit {other:?}"),
    }
}

fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_device_snapshot_mid_storm_restores_onto_a_fresh_vm_exactly() {
    kvm_test!();
    let device = Arc::new(Device::default());

    // The first machine, with the device wired as a VMM would.
    let mut first = TinyVm::new().unwrap();
    let root = first.notify().clone();
    let msix = root.msix(QUEUES + 1).unwrap();
    let mut entries: Vec<_> = (0..QUEUES)
        .map(|q| (q, MsiMessage::x86(0, QUEUE_VECTOR + q as u8), false))
        .collect();
    entries.push((CONFIG, MsiMessage::x86(0, CONFIG_VECTOR), true));
    msix.configure(&entries).unwrap();
    msix.write_message_control(vm_notify::msix::MSIX_ENABLE)
        .unwrap();
    let pci = root.virtio_pci(&layout(), &msix).unwrap();
    for q in 0..QUEUES as u16 {
        pci.set_queue_vector(q, q);
    }
    pci.set_config_vector(CONFIG as u16);
    // A configuration change while its vector is masked: the pending bit.
    assert!(pci.trigger_config().unwrap());
    let line = Arc::new(root.level_irqfd(IRQ.into()).unwrap());

    let (ready_tx, ready_rx) = mpsc::channel();
    let (stop, device_thread) = spawn(&device, &pci, &line);
    let running = first
        .start(
            program(),
            handler(device.clone(), line.clone(), Some(ready_tx)),
        )
        .unwrap();
    ready_rx.recv_timeout(TIMEOUT).unwrap();
    device.asserted.store(true, Ordering::SeqCst);
    line.trigger().unwrap();

    // Mid-storm: quiesce the device, let the guest kick into it and block, pause the vCPU.
    wait_until("half the rounds", || {
        device.served[0].load(Ordering::SeqCst) >= ROUNDS / 2
    });
    stop.stop().unwrap();
    device_thread.join().unwrap();
    thread::sleep(Duration::from_millis(50));
    let paused = running.pause(TIMEOUT).unwrap();

    let pci_state = pci.save().unwrap();
    let line_state = line.save().unwrap();
    let served_before: Vec<u64> = device
        .served
        .iter()
        .map(|s| s.load(Ordering::SeqCst))
        .collect();
    let unread: Vec<u64> = pci_state.queues.iter().map(|q| q.unread_kicks).collect();
    let config = pci_state.msix.vectors[CONFIG];
    eprintln!(
        "snapshot: served {served_before:?}, unread kicks {unread:?}, config vector masked={} pending={}, level line {line_state:?}",
        config.masked, config.pending
    );
    assert!(
        config.masked && config.pending,
        "the configuration change is pending"
    );
    assert!(
        unread.iter().sum::<u64>() >= 1,
        "the guest kicked the quiesced device"
    );
    assert!(unread.iter().all(|&n| n <= 1), "one kick per queue at most");
    // Through JSON, as a migration stream would carry it.
    let wire = serde_json::to_string(&(&pci_state, &line_state)).unwrap();
    let (pci_state, line_state): (PciNotifyState, LevelLineState) =
        serde_json::from_str(&wire).unwrap();
    let machine = first.snapshot(paused).unwrap();
    drop((pci, msix, line, root, first));

    // The second machine: the guest's state, then the device's notifications.
    let mut second = TinyVm::restore(&machine).unwrap();
    let root = second.notify().clone();
    let pci = root.restore_virtio_pci(&pci_state).unwrap();
    let line = Arc::new(root.restore_level_irqfd(&line_state).unwrap());
    if device.asserted.load(Ordering::SeqCst) {
        // The device's condition holds: it asserts its line on the new VM.
        line.trigger().unwrap();
    }
    let (stop, device_thread) = spawn(&device, &pci, &line);
    let running = second
        .resume(handler(device.clone(), line.clone(), None))
        .unwrap();

    // Once the guest has taken every queue interrupt, it unmasks the configuration vector (the
    // host plays its MSI-X table write).
    let queue_irqs = |vm: &TinyVm| -> u64 {
        (0..QUEUES as u8)
            .map(|q| vm.irq_count(QUEUE_VECTOR + q).unwrap())
            .sum()
    };
    wait_until("every queue interrupt", || {
        queue_irqs(&second) == ROUNDS * QUEUES as u64
    });
    pci.vectors().set_masked(CONFIG, false).unwrap();
    let report = running.wait(TIMEOUT);
    stop.stop().unwrap();
    device_thread.join().unwrap();
    report.done().unwrap();

    let served: Vec<u64> = device
        .served
        .iter()
        .map(|s| s.load(Ordering::SeqCst))
        .collect();
    let per_vector: Vec<u64> = (0..QUEUES as u8)
        .map(|q| second.irq_count(QUEUE_VECTOR + q).unwrap())
        .collect();
    let (config_irqs, level_irqs) = (
        second.irq_count(CONFIG_VECTOR).unwrap(),
        second.irq_count(IRQ_VECTOR).unwrap(),
    );
    eprintln!(
        "after restore: served {served:?}, queue interrupts {per_vector:?}, configuration {config_irqs}, IRQ {IRQ} {level_irqs}"
    );
    assert_eq!(served, vec![ROUNDS; QUEUES], "every request served once");
    assert_eq!(
        per_vector,
        vec![ROUNDS; QUEUES],
        "every answer delivered once"
    );
    assert_eq!(config_irqs, 1, "the pending configuration change, once");
    assert_eq!(level_irqs, 1, "the level line, once");
    // Nothing left over for the device to read.
    for q in 0..QUEUES as u16 {
        assert_eq!(
            pci.queue(q).unwrap().kicks().try_read().unwrap(),
            Attempt::WouldBlock
        );
    }
}

/// The split irqchip: vm-notify's IOAPIC saved with the machine and restored onto a fresh VM.
///
/// The guest programs three IOAPIC pins: 5 level-triggered (vector 0x35, masked), 6
/// edge-triggered (0x36, masked) and 7 edge-triggered (0x37, unmasked), then halts. The device
/// asserts its level line on pin 5 and pulses pin 6 while both are masked: the line held, the
/// edge latched. The machine is paused and saved — the IOAPIC through JSON, with the level line's
/// state — and a fresh VM restored from it. There an edge on pin 7 wakes the guest (the entry
/// the guest programmed on the first VM routes it), which unmasks pins 5 and 6: the held line is
/// delivered once, and its handler's acknowledge lowers it through the restored line, which took
/// it over; the latched edge is delivered once; the line's EOI resamples the restored line once.
#[test]
fn a_split_irqchip_machine_restores_its_ioapic_entries_latched_edge_and_held_line() {
    use vm_notify::irqchip::IoapicState;

    kvm_test!();
    const LEVEL_PIN: u8 = 5;
    const EDGE_PIN: u8 = 6;
    const GO_PIN: u8 = 7;
    const LEVEL_VECTOR: u8 = 0x35;
    const EDGE_VECTOR: u8 = 0x36;
    const GO_VECTOR: u8 = 0x37;
    const MASKED: u64 = 1 << 16;
    const LEVEL: u64 = 1 << 15;
    let entry = |p: &mut GuestProgram, pin: u8, low: u64| {
        p.mmio_write(layout::IOAPIC, 0x10 + 2 * u64::from(pin), 4)
            .unwrap();
        p.mmio_write(layout::IOAPIC + 0x10, low, 4).unwrap();
    };
    let mut p = GuestProgram::new().unwrap();
    p.enable_lapic().unwrap();
    p.on_interrupt_with(LEVEL_VECTOR, Eoi::Lapic, |a| {
        a.mov(rax, ACK)?;
        a.mov(dword_ptr(rax), 1u32)?;
        Ok(())
    });
    p.on_interrupt(EDGE_VECTOR, Eoi::Lapic);
    p.on_interrupt(GO_VECTOR, Eoi::Lapic);
    // Destination APIC 0 (the high dwords' reset value), masked.
    entry(&mut p, LEVEL_PIN, u64::from(LEVEL_VECTOR) | LEVEL | MASKED);
    entry(&mut p, EDGE_PIN, u64::from(EDGE_VECTOR) | MASKED);
    p.route_ioapic_pin(GO_PIN, GO_VECTOR, false).unwrap();
    p.signal_host(1).unwrap();
    p.wait_for_interrupt().unwrap(); // the go edge, on the restored machine
    entry(&mut p, LEVEL_PIN, u64::from(LEVEL_VECTOR) | LEVEL);
    entry(&mut p, EDGE_PIN, u64::from(EDGE_VECTOR));
    p.wait_for_interrupt().unwrap();
    p.drain_interrupts(0x21).unwrap(); // the other one, and anything extra
    p.exit().unwrap();

    let device = Arc::new(Device::default());
    let mut first = TinyVm::with_split_irqchip(1).unwrap();
    let root = first.notify().clone();
    first.run_injector(&root).unwrap();
    let line = Arc::new(root.level_irqfd(LEVEL_PIN.into()).unwrap());
    let edge = root.irqfd(EDGE_PIN.into()).unwrap();
    let (ready_tx, ready_rx) = mpsc::channel();
    let running = first
        .start(p, handler(device.clone(), line.clone(), Some(ready_tx)))
        .unwrap();
    ready_rx.recv_timeout(TIMEOUT).unwrap();
    device.asserted.store(true, Ordering::SeqCst);
    line.trigger().unwrap();
    edge.trigger().unwrap();
    let ioapic = root.ioapic().unwrap().clone();
    wait_until("the held line and the latched edge", || {
        let s = ioapic.save();
        s.lines & (1 << LEVEL_PIN) != 0 && s.latched & (1 << EDGE_PIN) != 0
    });
    let paused = running.pause(TIMEOUT).unwrap();
    let machine = first.snapshot(paused).unwrap();
    let saved = ioapic.save();
    eprintln!("saved IOAPIC: {saved:?}");
    assert_eq!(
        (saved.entries[usize::from(GO_PIN)] & 0xff) as u8,
        GO_VECTOR,
        "the guest's entries are in the state"
    );
    // Through JSON, as a migration stream would carry it.
    let wire = serde_json::to_string(&(&saved, &line.save().unwrap())).unwrap();
    let (_, line_state): (IoapicState, LevelLineState) = serde_json::from_str(&wire).unwrap();
    drop((edge, line, ioapic, root, first));

    let mut second = TinyVm::restore(&machine).unwrap();
    let root = second.notify().clone();
    second.run_injector(&root).unwrap();
    assert_eq!(
        root.ioapic().unwrap().save(),
        saved,
        "the IOAPIC came back as saved"
    );
    let line = Arc::new(root.restore_level_irqfd(&line_state).unwrap());
    let go = root.irqfd(GO_PIN.into()).unwrap();
    let running = second
        .resume(handler(device.clone(), line.clone(), None))
        .unwrap();
    go.trigger().unwrap();
    running.wait(TIMEOUT).done().unwrap();

    let counts: Vec<u64> = [LEVEL_VECTOR, EDGE_VECTOR, GO_VECTOR]
        .iter()
        .map(|&v| second.irq_count(v).unwrap())
        .collect();
    let resamples = match line.resample().try_read().unwrap() {
        Attempt::Done(n) => n,
        Attempt::WouldBlock => 0,
    };
    eprintln!(
        "after restore: level, edge, go interrupts {counts:?}; resamples {resamples}; IOAPIC {:?}",
        root.ioapic().unwrap().stats()
    );
    assert_eq!(
        counts,
        vec![1, 1, 1],
        "each owed interrupt once, nothing extra"
    );
    assert!(
        !device.asserted.load(Ordering::SeqCst),
        "the guest acknowledged the level device"
    );
    assert_eq!(
        resamples, 1,
        "the line's EOI resampled the restored line once"
    );
    assert!(
        !root.ioapic().unwrap().line(LEVEL_PIN.into()),
        "the line is low"
    );
}

/// A saved IOAPIC state that does not fit is refused before anything changes.
#[test]
fn a_saved_ioapic_state_that_does_not_fit_is_refused() {
    kvm_test!();
    let vm = TinyVm::with_split_irqchip(1).unwrap();
    let ioapic = vm.notify().ioapic().unwrap();
    let fresh = ioapic.save();
    let mut short = fresh.clone();
    short.entries.pop();
    let mut edge_irr = fresh.clone();
    edge_irr.entries[3] = 0x33 | (1 << 14);
    let mut past = fresh.clone();
    past.lines = 1 << 24;
    for bad in [short, edge_irr, past] {
        let e = ioapic.restore(&bad).unwrap_err();
        assert!(matches!(e, vm_notify::Error::SavedState { .. }), "{e:?}");
        eprintln!("{e}");
        assert_eq!(ioapic.save(), fresh, "nothing changed");
    }
}

/// A level interrupt in its handler when the split-irqchip machine is saved: the guest's handler
/// has taken it and has not yet acknowledged the device or sent the EOI. On the restored VM the
/// handler goes on: its acknowledge lowers the line through the restored level line, and the
/// interrupt is not delivered again.
///
/// Where the host keeps the interrupt in service until the guest's EOI, the saved entry has its
/// remote IRR and the EOI reaches the restored IOAPIC (whose restore committed the level route
/// KVM reports EOIs through), which resamples the restored line. These hosts end a level
/// interrupt when they inject it and report its EOI at the vCPU's next exit (docs/HOST_NOTES.md):
/// the pause's exit brings it, the line's resample is signalled on the first VM, and the saved
/// line carries it unread to the second. Either way the device reads one resample.
#[test]
fn a_level_interrupt_in_its_handler_at_the_snapshot_ends_once_on_the_restored_split_irqchip() {
    use vm_memory::{Bytes, GuestAddress};

    kvm_test!();
    const PIN: u8 = 5;
    const VECTOR: u8 = 0x35;
    let go = layout::data_slot(0);
    let mut p = GuestProgram::new().unwrap();
    p.enable_lapic().unwrap();
    p.on_interrupt_with(VECTOR, Eoi::Lapic, move |a| {
        // Tell the host the handler runs, then wait for the host's go (given on the new VM).
        a.mov(dx, u32::from(layout::HOST_PORT))?;
        a.mov(eax, 2u32)?;
        a.out(dx, eax)?;
        let mut spin = a.create_label();
        a.set_label(&mut spin)?;
        a.mov(rax, go)?;
        a.cmp(qword_ptr(rax), 0)?;
        a.je(spin)?;
        a.mov(rax, ACK)?;
        a.mov(dword_ptr(rax), 1u32)?;
        Ok(())
    });
    p.route_ioapic_pin(PIN, VECTOR, true).unwrap();
    p.signal_host(1).unwrap();
    p.wait_for_interrupt().unwrap();
    p.drain_interrupts(0x21).unwrap();
    p.exit().unwrap();

    let device = Arc::new(Device::default());
    let mut first = TinyVm::with_split_irqchip(1).unwrap();
    let root = first.notify().clone();
    first.run_injector(&root).unwrap();
    let line = Arc::new(root.level_irqfd(PIN.into()).unwrap());
    let (signal_tx, signal_rx) = mpsc::channel();
    let running = first
        .start(p, move |e: &GuestExit, _: &mut [u8]| match *e {
            GuestExit::PioWrite {
                port: layout::HOST_PORT,
                data,
                ..
            } => signal_tx.send(data).unwrap(),
            GuestExit::IoapicEoi { .. } => {}
            ref other => panic!("unexpected exit {other:?}"),
        })
        .unwrap();
    assert_eq!(signal_rx.recv_timeout(TIMEOUT).unwrap(), 1);
    device.asserted.store(true, Ordering::SeqCst);
    line.trigger().unwrap();
    assert_eq!(
        signal_rx.recv_timeout(TIMEOUT).unwrap(),
        2,
        "the handler runs"
    );
    // Let the vCPU enter the guest again: an EOI exit KVM has queued is made at that entry,
    // and a pause landing before it would leave it queued in the old vCPU (KVM_RUN with
    // immediate_exit returns before serving requests).
    thread::sleep(Duration::from_millis(50));
    let paused = running.pause(TIMEOUT).unwrap();
    let ioapic = root.ioapic().unwrap().clone();
    let saved = ioapic.save();
    let in_service = vm_notify::irqchip::Redirection(saved.entries[usize::from(PIN)]).remote_irr();
    let line_state = line.save().unwrap();
    eprintln!(
        "saved: in service {in_service}, line {line_state:?}, IOAPIC {:?}",
        ioapic.stats()
    );
    assert_eq!(
        line_state.unread_resamples,
        u64::from(!in_service),
        "a resample was signalled exactly when the EOI came before the snapshot"
    );
    let machine = first.snapshot(paused).unwrap();
    drop((line, ioapic, root, first));

    let mut second = TinyVm::restore(&machine).unwrap();
    let root = second.notify().clone();
    second.run_injector(&root).unwrap();
    let line = Arc::new(root.restore_level_irqfd(&line_state).unwrap());
    second.memory().write_obj(1u64, GuestAddress(go)).unwrap();
    let running = second
        .resume(handler(device.clone(), line.clone(), None))
        .unwrap();
    running.wait(TIMEOUT).done().unwrap();

    let irqs = second.irq_count(VECTOR).unwrap();
    let resamples = match line.resample().try_read().unwrap() {
        Attempt::Done(n) => n,
        Attempt::WouldBlock => 0,
    };
    let stats = root.ioapic().unwrap().stats();
    eprintln!(
        "after restore: {irqs} interrupt(s) handled; resamples {resamples}; IOAPIC {stats:?}"
    );
    assert_eq!(irqs, 1, "the one interrupt, none again");
    assert_eq!(stats.delivered, 0, "nothing delivered anew");
    assert_eq!(
        stats.eois,
        u64::from(in_service),
        "the EOI reached the restored IOAPIC if it was owed"
    );
    assert_eq!(resamples, 1, "the device reads one resample");
    assert!(!device.asserted.load(Ordering::SeqCst));
    assert!(!root.ioapic().unwrap().line(PIN.into()), "the line is low");
}
