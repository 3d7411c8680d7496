//! SMP, on the in-kernel irqchip and on the split irqchip alike (and, on the split one, IOAPIC
//! pins addressed to each vCPU): a tiny VM with four vCPUs
//! (local APIC IDs 0 to 3), each with its own MSI-X vector
//! addressed to it (physical destination mode). Each vCPU kicks its own queue (an ioeventfd at
//! its own address) and waits for its interrupt; one device thread serves the four queues and
//! raises the kicking vCPU's vector. Every vCPU counts what it took in its own interrupt
//! counters: exactly its rounds, of its own vector, and nothing of the others'.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use iced_x86::code_asm::qword_ptr;
use vm_memory::{Bytes, GuestAddress};
use vm_notify::kvm::{MsiMessage, WriteMatch};
use vm_notify::wait::{EventLoop, StopHandle, Wake};
use vm_notify::{IoEvent, Mode, Notifier, Vm};
use vm_notify_testkit::{kvm_test, Eoi, GuestExit, GuestProgram, TinyVm};

const TIMEOUT: Duration = Duration::from_secs(120);
const VCPUS: usize = 4;
const ROUNDS: u64 = 500;
const NOTIFY: u64 = 0xd200_0000;
/// vCPU `i` takes vector `VECTOR + i`.
const VECTOR: u8 = 0x50;

/// The machine: `count` vCPUs on the in-kernel irqchip, or on the split irqchip (local APICs in
/// the kernel, no PIC or IOAPIC there), where MSIs must work the same.
fn machine(split: bool, count: usize) -> TinyVm {
    if split {
        TinyVm::with_split_irqchip(count).unwrap()
    } else {
        TinyVm::with_vcpus(count).unwrap()
    }
}

/// Each vCPU's queue: a kernel ioeventfd at `NOTIFY + 8 * i`, and one device thread that serves
/// every queue, calling `raise(i)` for each kick of queue `i`. Returns the registrations, the
/// device's stop handle and its thread (which returns the kicks served per queue).
fn per_vcpu_device(
    root: &Vm,
    raise: impl Fn(usize) + Send + 'static,
) -> (Vec<IoEvent>, StopHandle, JoinHandle<[u64; VCPUS]>) {
    let kicks: Vec<Notifier> = (0..VCPUS)
        .map(|_| Notifier::new(Mode::Counter).unwrap())
        .collect();
    let registrations = kicks
        .iter()
        .enumerate()
        .map(|(i, n)| {
            root.ioevent(WriteMatch::mmio(NOTIFY + 8 * i as u64), n)
                .unwrap()
        })
        .collect();
    let events = EventLoop::new().unwrap();
    for (i, n) in kicks.iter().enumerate() {
        events.add(i as u64, n).unwrap();
    }
    let stop = events.stop_handle();
    let device = thread::spawn(move || {
        let mut served = [0u64; VCPUS];
        let mut ready = Vec::new();
        while events.wait(None, &mut ready).unwrap() == Wake::Ready {
            for &(queue, count) in &ready {
                served[queue as usize] += count;
                raise(queue as usize);
            }
        }
        served
    });
    (registrations, stop, device)
}

/// Each vCPU's part of the program: `ROUNDS` times, kick its queue and wait for an interrupt.
fn kick_own_queue(p: &mut GuestProgram) {
    for i in 0..VCPUS {
        p.on_vcpu(i, |p| {
            p.repeat(ROUNDS, |p| {
                p.kick_and_wait(NOTIFY + 8 * i as u64, i as u32, None)
            })
        })
        .unwrap();
    }
}

/// The interrupts each vCPU (rows) took of each vCPU's vector (columns); asserts the diagonal is
/// `ROUNDS` and everything else 0.
fn check_per_vcpu(vm: &TinyVm) -> Vec<Vec<u64>> {
    let counts: Vec<Vec<u64>> = (0..VCPUS)
        .map(|cpu| {
            (0..VCPUS)
                .map(|v| vm.irq_count_on(cpu, VECTOR + v as u8).unwrap())
                .collect()
        })
        .collect();
    for (cpu, row) in counts.iter().enumerate() {
        for (v, &n) in row.iter().enumerate() {
            let expected = if cpu == v { ROUNDS } else { 0 };
            assert_eq!(n, expected, "vCPU {cpu}, vector {v}: {counts:?}");
        }
    }
    counts
}

#[test]
fn msix_vectors_reach_the_vcpu_each_is_addressed_to() {
    kvm_test!();
    msix_to_each_vcpu(false);
    msix_to_each_vcpu(true);
}

fn msix_to_each_vcpu(split: bool) {
    let mut vm = machine(split, VCPUS);
    let root = vm.notify();
    let msix = root.msix(VCPUS).unwrap();
    for i in 0..VCPUS {
        // Physical destination: local APIC ID i, which is vCPU i.
        msix.set_message(i, MsiMessage::x86(i as u8, VECTOR + i as u8))
            .unwrap();
        msix.set_masked(i, false).unwrap();
    }
    msix.write_message_control(vm_notify::msix::MSIX_ENABLE)
        .unwrap();
    let vectors = msix.clone();
    let (_registrations, stop, device) =
        per_vcpu_device(root, move |queue| vectors.trigger(queue).unwrap());

    let mut p = GuestProgram::new().unwrap();
    p.enable_lapic().unwrap();
    for i in 0..VCPUS {
        p.on_interrupt(VECTOR + i as u8, Eoi::Lapic);
    }
    kick_own_queue(&mut p);
    p.exit().unwrap();
    let report = vm.run(p, TIMEOUT).unwrap();
    stop.stop().unwrap();
    let served = device.join().unwrap();
    report.done().unwrap();

    let counts = check_per_vcpu(&vm);
    eprintln!(
        "split irqchip {split}: kicks served per queue {served:?}; interrupts per vCPU (rows) and vector {counts:?}; {:?}",
        msix.stats()
    );
    assert_eq!(served, [ROUNDS; VCPUS]);
}

/// IOAPIC pins on the split irqchip, one per vCPU: pin `16 + i` is level-triggered and addressed
/// to vCPU `i` (physical destination). Each vCPU kicks its queue and
/// waits; the device asserts that vCPU's pin; the handler acknowledges at the device (which
/// lowers the source) and EOIs. KVM reports each EOI on the vCPU that took the interrupt, so the
/// IOAPIC's level route for each pin must carry its own destination. Every vCPU takes exactly its
/// rounds of its own vector, and every interrupt's EOI comes back once. The device asserts only
/// at kicks, so this host's early EOIs (ARCHITECTURE.md, host notes) cannot add an interrupt.
#[test]
fn ioapic_pins_reach_the_vcpu_each_is_addressed_to_on_the_split_irqchip() {
    kvm_test!();
    const PIN: u8 = 16;
    const ACK: u64 = 0xd300_0000;
    let mut vm = machine(true, VCPUS);
    let root = vm.notify().clone();
    let lines: Arc<Vec<_>> = Arc::new(
        (0..VCPUS)
            .map(|i| root.level_irqfd(u32::from(PIN) + i as u32).unwrap())
            .collect(),
    );
    let device_lines = lines.clone();
    let (_registrations, stop, device) =
        per_vcpu_device(&root, move |queue| device_lines[queue].trigger().unwrap());

    let mut p = GuestProgram::new().unwrap();
    p.enable_lapic().unwrap();
    for i in 0..VCPUS {
        p.on_interrupt_with(VECTOR + i as u8, Eoi::Lapic, move |a| {
            a.mov(iced_x86::code_asm::rax, ACK + 8 * i as u64)?;
            a.mov(iced_x86::code_asm::dword_ptr(iced_x86::code_asm::rax), 1u32)?;
            Ok(())
        });
    }
    // vCPU 0 programs every pin: IOREGSEL/IOWIN is one register pair for all vCPUs, so
    // concurrent programming would need a lock in the guest. A kick that comes before its pin is
    // unmasked holds the line, and the unmask delivers it.
    p.on_vcpu(0, |p| {
        (0..VCPUS as u8).try_for_each(|i| p.route_ioapic_pin_to(PIN + i, VECTOR + i, true, i))
    })
    .unwrap();
    kick_own_queue(&mut p);
    p.exit().unwrap();
    let acks = Arc::new(AtomicU64::new(0));
    let (acking, acked) = (lines.clone(), acks.clone());
    let report = vm
        .start(p, move |e: &GuestExit, _: &mut [u8]| match *e {
            GuestExit::MmioWrite { addr, .. } if (ACK..ACK + 8 * VCPUS as u64).contains(&addr) => {
                acking[((addr - ACK) / 8) as usize].deassert().unwrap();
                acked.fetch_add(1, Ordering::Relaxed);
            }
            ref other => panic!("unexpected exit {other:?}"),
        })
        .unwrap()
        .wait(TIMEOUT);
    stop.stop().unwrap();
    let served = device.join().unwrap();
    let report = report.done().unwrap();

    let counts = check_per_vcpu(&vm);
    let eois: Vec<usize> = (0..VCPUS)
        .map(|v| report.ioapic_eois(VECTOR + v as u8))
        .collect();
    let resamples: Vec<u64> = lines
        .iter()
        .map(|l| match l.resample().try_read().unwrap() {
            vm_notify::Attempt::Done(n) => n,
            vm_notify::Attempt::WouldBlock => 0,
        })
        .collect();
    let stats = root.ioapic().unwrap().stats();
    eprintln!(
        "split irqchip IOAPIC pins: kicks served {served:?}; interrupts per vCPU (rows) and vector {counts:?}; EOI exits per vector {eois:?}; resamples {resamples:?}; {stats:?}"
    );
    let total = ROUNDS * VCPUS as u64;
    assert_eq!(served, [ROUNDS; VCPUS]);
    assert_eq!(eois, vec![ROUNDS as usize; VCPUS]);
    assert_eq!(resamples, vec![ROUNDS; VCPUS]);
    assert_eq!(acks.load(Ordering::Relaxed), total);
    assert_eq!(
        (stats.delivered, stats.eois, stats.resamples),
        (total, total, total)
    );
}

/// Retargeting under fire: one MSI-X vector, raised one interrupt at a time as fast as the
/// guest takes them, while another host thread moves its destination between vCPU 0 and vCPU 1
/// as fast as it can. Both vCPUs sleep waiting for it; whichever takes a raise counts it (its
/// own counter, and a shared one with a locked add). The device raises the next only once the
/// shared count shows the last one taken, so no two raises can merge: every raise must be taken
/// exactly once, by one vCPU — a lost one stalls the run (the timeout), a doubled one shows as a
/// shared count above the raises.
#[test]
fn a_vector_moved_between_vcpus_while_raised_delivers_every_raise_once() {
    kvm_test!();
    retarget_storm(false);
    retarget_storm(true);
}

fn retarget_storm(split: bool) {
    const RAISES: u64 = 3000;
    const MOVING: u8 = 0x60;
    /// Wakes each vCPU at the end (routed to each, one route per vCPU).
    const WAKE: u8 = 0x70;
    const TOTAL: usize = 0; // data slot: deliveries of MOVING on any vCPU
    const FINISHED: usize = 1; // data slot: set by the host when the raises are done
    const READY: usize = 2; // data slot: vCPUs whose local APIC is enabled (an interrupt sent
                            // to a software-disabled one is dropped)
    let mut vm = machine(split, 2);
    let root = vm.notify();
    let msix = root.msix(1).unwrap();
    msix.set_message(0, MsiMessage::x86(0, MOVING)).unwrap();
    msix.set_masked(0, false).unwrap();
    msix.write_message_control(vm_notify::msix::MSIX_ENABLE)
        .unwrap();
    let wakes: Vec<_> = (0..2u8)
        .map(|cpu| {
            let gsi = root.router().route_msi(MsiMessage::x86(cpu, WAKE)).unwrap();
            root.irqfd(gsi).unwrap()
        })
        .collect();

    let total = vm_notify_testkit::layout::data_slot(TOTAL);
    let finished = vm_notify_testkit::layout::data_slot(FINISHED);
    let ready = vm_notify_testkit::layout::data_slot(READY);
    let mut p = GuestProgram::new().unwrap();
    p.enable_lapic().unwrap();
    p.asm().lock().inc(qword_ptr(ready)).unwrap();
    p.on_interrupt_with(MOVING, Eoi::Lapic, move |a| {
        a.lock().inc(qword_ptr(total))?;
        Ok(())
    });
    p.on_interrupt(WAKE, Eoi::Lapic);
    let mut again = p.asm().create_label();
    p.asm().set_label(&mut again).unwrap();
    p.wait_for_interrupt().unwrap();
    p.asm().cmp(qword_ptr(finished), 0).unwrap();
    p.asm().je(again).unwrap();
    p.exit().unwrap();
    let running = vm.start(p, |_: &GuestExit, _: &mut [u8]| {}).unwrap();

    // The retargeting thread: vCPU 0, vCPU 1, vCPU 0, ... until the raises are done. It
    // publishes its count, and each raise waits for a move since the one before, so every raise
    // meets a fresh retarget however the scheduler treats the mover (a starved mover made only
    // 33 moves in one CI run).
    let moving = msix.clone();
    let done = Arc::new(AtomicBool::new(false));
    let moved = Arc::new(AtomicU64::new(0));
    let (stop_moving, count_moves) = (done.clone(), moved.clone());
    let mover = thread::spawn(move || {
        let mut moves = 0u64;
        while !stop_moving.load(Ordering::Acquire) {
            moves += 1;
            moving
                .set_message(0, MsiMessage::x86((moves % 2) as u8, MOVING))
                .unwrap();
            count_moves.store(moves, Ordering::Release);
        }
        moves
    });
    let mem = vm.memory().clone();
    let read = |addr: u64| mem.read_obj::<u64>(GuestAddress(addr)).unwrap();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while read(ready) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the vCPUs never got ready"
        );
        thread::yield_now();
    }
    for raise in 1..=RAISES {
        while moved.load(Ordering::Acquire) < raise {
            assert!(std::time::Instant::now() < deadline, "the mover stalled");
            thread::yield_now();
        }
        msix.trigger(0).unwrap();
        while read(total) < raise {
            assert!(
                std::time::Instant::now() < deadline,
                "raise {raise} was never taken (taken so far: {})",
                read(total)
            );
            std::hint::spin_loop();
        }
    }
    done.store(true, Ordering::Release);
    let moves = mover.join().unwrap();
    // Let a doubled last delivery land before the count is read, then end the guests.
    thread::sleep(Duration::from_millis(50));
    mem.write_obj(1u64, GuestAddress(finished)).unwrap();
    for wake in &wakes {
        wake.trigger().unwrap();
    }
    running.wait(TIMEOUT).done().unwrap();

    let per_cpu: Vec<u64> = (0..2)
        .map(|cpu| vm.irq_count_on(cpu, MOVING).unwrap())
        .collect();
    let taken = vm.data(TOTAL).unwrap();
    eprintln!(
        "split irqchip {split}: {RAISES} raises while the destination moved {moves} times: taken {taken} \
         ({per_cpu:?} by vCPU); {:?}",
        msix.stats()
    );
    assert!(moves >= RAISES, "only {moves} moves during {RAISES} raises");
    assert_eq!(taken, RAISES, "every raise taken once");
    assert_eq!(per_cpu.iter().sum::<u64>(), RAISES);
    assert!(
        per_cpu.iter().all(|&n| n > 0),
        "both vCPUs took some: {per_cpu:?}"
    );
}
