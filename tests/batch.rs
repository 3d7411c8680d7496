//! Batch registration (`Vm::batch`): 64 queues' kicks (ioeventfds) and interrupts (MSI routes in
//! one commit, irqfds) made in one call, proven with a guest that kicks each queue and waits for
//! that queue's own vector; then torn down in one call, leaving no descriptor and no route, over
//! repeated cycles. Alone in its binary: it counts the process's descriptors.

use std::thread;
use std::time::Duration;

use vm_notify::kvm::MsiMessage;
use vm_notify::wait::{EventLoop, Wake};
use vm_notify::{Mode, Notifier, Width, WriteMatch};
use vm_notify_testkit::{kvm_test, Eoi, GuestExit, GuestProgram, TinyVm};

const TIMEOUT: Duration = Duration::from_secs(120);
const QUEUES: usize = 64;
const NOTIFY: u64 = 0xd400_0000;
const VECTOR: u8 = 0x40;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn notifiers(n: usize) -> Vec<Notifier> {
    (0..n)
        .map(|_| Notifier::new(Mode::Counter).unwrap())
        .collect()
}

#[test]
fn a_batch_registers_and_tears_down_every_queue_together() {
    kvm_test!();
    let mut vm = TinyVm::new().unwrap();
    let root = vm.notify().clone();
    let entries = root.router().entries();
    let (kicks, calls) = (notifiers(QUEUES), notifiers(QUEUES));
    let kick_list: Vec<_> = kicks
        .iter()
        .enumerate()
        .map(|(i, n)| (WriteMatch::mmio(NOTIFY + 8 * i as u64).width(Width::W4), n))
        .collect();
    let call_list: Vec<_> = calls
        .iter()
        .enumerate()
        .map(|(i, n)| (MsiMessage::x86(0, VECTOR + i as u8), n))
        .collect();
    let fds = open_fds();
    let batch = root.batch(&kick_list, &call_list).unwrap();
    assert_eq!(open_fds(), fds, "a batch opens no descriptor of its own");
    assert_eq!(root.router().entries(), entries + QUEUES);

    // The device: a kick on queue i raises queue i's interrupt.
    let events = EventLoop::new().unwrap();
    for (i, n) in kicks.iter().enumerate() {
        events.add(i as u64, n).unwrap();
    }
    let stop = events.stop_handle();
    let raise: Vec<Notifier> = calls.to_vec();
    let device = thread::spawn(move || {
        let mut served = [0u64; QUEUES];
        let mut ready = Vec::new();
        while events.wait(None, &mut ready).unwrap() == Wake::Ready {
            for &(q, count) in &ready {
                served[q as usize] += count;
                raise[q as usize].notify().unwrap();
            }
        }
        served
    });
    let mut p = GuestProgram::new().unwrap();
    p.enable_lapic().unwrap();
    for i in 0..QUEUES {
        p.on_interrupt(VECTOR + i as u8, Eoi::Lapic);
    }
    p.repeat(3, |p| {
        (0..QUEUES).try_for_each(|i| p.kick_and_wait(NOTIFY + 8 * i as u64, 0, None))
    })
    .unwrap();
    p.exit().unwrap();
    let report = vm
        .start(p, |_: &GuestExit, _: &mut [u8]| {})
        .unwrap()
        .wait(TIMEOUT);
    stop.stop().unwrap();
    let served = device.join().unwrap();
    let report = report.done().unwrap();
    assert_eq!(report.exits.len(), 0, "every kick in the kernel");
    assert_eq!(served, [3; QUEUES]);
    for i in 0..QUEUES {
        assert_eq!(vm.irq_count(VECTOR + i as u8).unwrap(), 3, "queue {i}");
    }

    batch.teardown().unwrap();
    assert_eq!(root.router().entries(), entries, "every route removed");
    for gsi in 24..24 + QUEUES as u32 {
        assert_eq!(root.router().irqfds(gsi), 0);
    }

    // Cycles leave nothing behind.
    let (fds, entries) = (open_fds(), root.router().entries());
    for _ in 0..200 {
        drop(root.batch(&kick_list, &call_list).unwrap());
    }
    assert_eq!((open_fds(), root.router().entries()), (fds, entries));
    drop(vm);
    a_refused_batch_leaves_nothing();
}

/// All or nothing: a batch refused at its last kick (an overlap), or at its last interrupt (a
/// notifier already an irqfd, after every route was committed), undoes what it had made: every
/// route removed, every address free again. (Called by the test above: one test in this binary,
/// which counts descriptors.)
fn a_refused_batch_leaves_nothing() {
    let vm = TinyVm::new().unwrap();
    let root = vm.notify();
    let (kicks, calls) = (notifiers(4), notifiers(4));
    let kick_list: Vec<_> = kicks
        .iter()
        .enumerate()
        .map(|(i, n)| (WriteMatch::mmio(NOTIFY + 8 * i as u64), n))
        .collect();
    let call_list: Vec<_> = calls
        .iter()
        .map(|n| (MsiMessage::x86(0, VECTOR), n))
        .collect();
    let entries = root.router().entries();
    let mut overlapping = kick_list.clone();
    overlapping[3].0 = WriteMatch::mmio(NOTIFY);
    let e = root.batch(&overlapping, &call_list).unwrap_err();
    assert!(matches!(e, vm_notify::Error::IoEventExists { .. }), "{e:?}");
    assert_eq!(root.router().entries(), entries);
    let mut busy = call_list.clone();
    busy[3].1 = &calls[0];
    let e = root.batch(&kick_list, &busy).unwrap_err();
    assert!(matches!(e, vm_notify::Error::IrqFdBusy { .. }), "{e:?}");
    assert_eq!(
        root.router().entries(),
        entries,
        "the committed routes removed"
    );
    // Every address and notifier is free again.
    let again = root.batch(&kick_list, &call_list).unwrap();
    assert_eq!(again.ioevents().len(), 4);
    assert_eq!(again.irqfds().len(), 4);
}
