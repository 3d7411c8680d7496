//! Teardown order.
//!
//! * Registrations dropped from another thread while the guest writes: every write is either
//!   counted by the notifier or reaches the VMM as an exit, none lost, on both paths.
//! * The owner tears the VM down (stops the guest, drops every registration and the VM) while
//!   device threads block on their notifiers: nothing hangs or crashes, and the device threads
//!   learn of it the documented way — the owner stops their `EventLoop`s (a dropped registration
//!   does not wake a device's notifier: the device holds its own descriptor of it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use iced_x86::code_asm::qword_ptr;
use vm_memory::{Bytes, GuestAddress};
use vm_notify::fallback::Policy;
use vm_notify::kvm::MsiMessage;
use vm_notify::wait::{EventLoop, Wake};
use vm_notify::{IrqFd, Mode, Notifier, Width, WriteMatch};
use vm_notify_testkit::{kvm_test, layout, Eoi, GuestExit, GuestProgram, TinyVm};

const ADDR: u64 = 0xd000_0050;
/// Writes before the guest asks for the drop.
const HALF: u64 = 10_000;
/// Data slots: the writes the guest made, and the flag that ends its writing.
const WRITTEN: usize = 0;
const STOP: usize = 1;

/// The guest writes [`HALF`] times, asks the host to drop the registration (a thread of its own
/// drops it while the guest goes on writing), and writes on until the first write that exits
/// unregistered, which the exit handler answers by setting the stop flag. Every write is either
/// counted by the notifier or reaches the VMM as an exit; the drop lands mid-run by construction.
fn drop_while_writing(kind: Policy) {
    let mut vm = TinyVm::new().unwrap();
    let backend = vm.notify().with_policy(kind);
    vm.run_injector(&backend).unwrap();
    let kicks = Notifier::new(Mode::Counter).unwrap();
    let reg = backend
        .ioevent(WriteMatch::mmio(ADDR).width(Width::W4), &kicks)
        .unwrap();
    let mut p = GuestProgram::new().unwrap();
    p.repeat(HALF, |p| {
        p.mmio_write(ADDR, 1, 4)?;
        p.count(WRITTEN)
    })
    .unwrap();
    p.signal_host(1).unwrap();
    let a = p.asm();
    let mut again = a.create_label();
    a.set_label(&mut again).unwrap();
    p.mmio_write(ADDR, 1, 4).unwrap();
    p.count(WRITTEN).unwrap();
    let a = p.asm();
    a.cmp(qword_ptr(layout::DATA + 8 * STOP as u64), 0).unwrap();
    a.je(again).unwrap();
    p.exit().unwrap();
    let exits = Arc::new(AtomicU64::new(0));
    let (drop_tx, drop_rx) = mpsc::channel::<()>();
    let dropper = thread::spawn(move || {
        drop_rx.recv().unwrap();
        drop(reg);
    });
    let (d, e, memory) = (
        backend.dispatcher().clone(),
        exits.clone(),
        vm.memory().clone(),
    );
    vm.start(p, move |x: &GuestExit, _: &mut [u8]| match x {
        GuestExit::PioWrite {
            port: layout::HOST_PORT,
            ..
        } => drop_tx.send(()).unwrap(),
        GuestExit::MmioWrite { addr: ADDR, .. } => {
            if !x.dispatch(&d).unwrap() {
                e.fetch_add(1, Ordering::Relaxed);
                memory
                    .write_obj(1u64, GuestAddress(layout::DATA + 8 * STOP as u64))
                    .unwrap();
            }
        }
        other => panic!("unexpected exit {other:?}"),
    })
    .unwrap()
    .wait(Duration::from_secs(120))
    .done()
    .unwrap();
    dropper.join().unwrap();
    let written = vm.data(WRITTEN).unwrap();
    let counted = kicks.try_read().unwrap().done().unwrap_or(0);
    let exited = exits.load(Ordering::Relaxed);
    eprintln!(
        "{kind:?}: {written} written: {counted} counted before the drop, {exited} exits after"
    );
    assert_eq!(counted + exited, written, "writes lost or doubled");
    assert!(
        counted >= HALF,
        "the writes before the drop was asked for are counted"
    );
    assert!(
        exited >= 1,
        "the guest stops at its first unregistered write"
    );
}

#[test]
fn dropping_a_registration_mid_run_loses_no_write() {
    kvm_test!();
    drop_while_writing(Policy::Kernel);
    drop_while_writing(Policy::Userspace);
}

#[test]
fn tearing_down_under_blocked_device_threads_neither_hangs_nor_crashes() {
    kvm_test!();
    let mut vm = TinyVm::new().unwrap();
    let backend = vm.notify().with_policy(Policy::Auto);
    vm.run_injector(&backend).unwrap();
    let mut regs = Vec::new();
    let mut irqs = Vec::new();
    let mut stops = Vec::new();
    let mut devices = Vec::new();
    for q in 0..4u64 {
        let kicks = Notifier::new(Mode::Counter).unwrap();
        regs.push(
            backend
                .ioevent(WriteMatch::mmio(ADDR).width(Width::W4).datamatch(q), &kicks)
                .unwrap(),
        );
        let gsi = vm.router().route_msi(MsiMessage::x86(0, 0x41)).unwrap();
        let irq: IrqFd = backend.irqfd(gsi).unwrap();
        let trigger = irq.notifier().dup().unwrap();
        irqs.push(irq);
        let events = EventLoop::new().unwrap();
        events.add(q, &kicks).unwrap();
        stops.push(events.stop_handle());
        devices.push(thread::spawn(move || {
            let mut fired = Vec::new();
            let mut served = 0u64;
            loop {
                match events.wait(None, &mut fired).unwrap() {
                    Wake::Stopped => return served,
                    _ => {
                        served += fired.iter().map(|&(_, n)| n).sum::<u64>();
                        // The device's own descriptor of the trigger outlives the irqfd.
                        trigger.notify().unwrap();
                    }
                }
            }
        }));
    }
    // A guest that kicks each queue once, then waits for an interrupt that will not come.
    let mut p = GuestProgram::new().unwrap();
    p.enable_lapic().unwrap();
    p.on_interrupt(0x41, Eoi::Lapic);
    for q in 0..4 {
        p.mmio_write(ADDR, q, 4).unwrap();
    }
    p.repeat(1_000_000, |p| p.wait_for_interrupt()).unwrap();
    p.exit().unwrap();
    let d = backend.dispatcher().clone();
    let running = vm
        .start(p, move |x: &GuestExit, _: &mut [u8]| {
            let _ = x.dispatch(&d);
        })
        .unwrap();
    thread::sleep(Duration::from_millis(200));

    // The owner tears down: the guest stops, every registration goes, the VM goes.
    let start = Instant::now();
    let report = running.wait(Duration::from_millis(100));
    assert!(!report.is_done());
    drop(regs);
    drop(irqs);
    drop(backend);
    drop(vm);
    // The device threads are still blocked; they learn the VM is gone when the owner stops
    // their loops.
    for s in &stops {
        s.stop().unwrap();
    }
    let served: Vec<u64> = devices.into_iter().map(|t| t.join().unwrap()).collect();
    let took = start.elapsed();
    eprintln!("teardown with 4 blocked device threads took {took:?}; kicks served {served:?}");
    assert_eq!(served, [1, 1, 1, 1]);
    assert!(took < Duration::from_secs(10), "teardown hung for {took:?}");
}

/// The VMM tears a virtio-pci device down (drops its `PciNotify` and its MSI-X vectors) while a
/// device thread still holds a queue handle: the vectors' irqfds and routes go at once, and the
/// device's next trigger is an error that says so (issue 22: the handle kept every irqfd and
/// route alive, and its triggers still reached the guest).
#[test]
fn a_torn_down_device_keeps_no_vector_alive_through_its_queue_handles() {
    kvm_test!();
    let vm = TinyVm::new().unwrap();
    let root = vm.notify();
    let entries = root.router().entries();
    let vectors = root.msix(2).unwrap();
    vectors
        .configure(&[(0, MsiMessage::x86(0, 0x48), false)])
        .unwrap();
    vectors
        .write_message_control(vm_notify::msix::MSIX_ENABLE)
        .unwrap();
    let layout = vm_notify::virtio::PciLayout {
        notify_base: 0xe000_0000,
        notify_off_multiplier: 4,
        queue_notify_off: vec![0],
        intx: None,
    };
    let pci = root.virtio_pci(&layout, &vectors).unwrap();
    pci.set_queue_vector(0, 0);
    let queue = pci.queue(0).unwrap(); // the device thread's handle
    assert!(queue.trigger().unwrap());
    let gsi = vectors.gsi(0).unwrap().expect("vector 0 delivers");
    assert_eq!(root.router().irqfds(gsi), 1);
    drop((pci, vectors));
    assert_eq!(
        root.router().irqfds(gsi),
        0,
        "the vector's irqfd outlived the device"
    );
    assert_eq!(
        root.router().entries(),
        entries,
        "the vector's route outlived the device"
    );
    let e = queue.trigger().unwrap_err();
    assert!(matches!(e, vm_notify::Error::Unplugged { .. }), "{e:?}");
}
