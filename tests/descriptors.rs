//! Descriptors per queue: a virtio-pci device with 256 queues, each notified through a kernel
//! ioeventfd and interrupting on its own delivering MSI-X vector, costs the process exactly two
//! descriptors a queue — the kick's eventfd and the vector's — however many registrations refer
//! to them. And 10^3 snapshot/restore cycles of a device leave no descriptor or route behind.
//! Counted in `/proc/self/fd`, one test at a time, in a binary of their own so nothing else opens
//! or closes descriptors meanwhile.

use vm_notify::fallback::Policy;
use vm_notify::kvm::MsiMessage;
use vm_notify::virtio::{PciLayout, PciNotify};
use vm_notify::Vm;
use vm_notify_testkit::kvm_test;

const QUEUES: usize = 256;

/// The tests here count the process's descriptors: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// A VM with its in-kernel irqchip.
fn new_vm() -> Vm {
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let fd = std::sync::Arc::new(kvm.create_vm().unwrap());
    fd.create_irq_chip().unwrap();
    Vm::new(fd, Policy::Kernel).unwrap()
}

/// A virtio-pci function on `vm` of `queues` queues on as many delivering MSI-X vectors, queue
/// `i` on vector `i`, and a configuration vector, masked (no eventfd until it is used).
fn device(vm: &Vm, queues: u16) -> PciNotify {
    let count = usize::from(queues) + 1;
    let msix = vm.msix(count).unwrap();
    let entries: Vec<_> = (0..count)
        .map(|i| {
            (
                i,
                MsiMessage::x86(0, 0x40 + (i % 160) as u8),
                i == count - 1,
            )
        })
        .collect();
    msix.configure(&entries).unwrap();
    msix.write_message_control(vm_notify::msix::MSIX_ENABLE)
        .unwrap();
    let layout = PciLayout {
        notify_base: 0xe000_0000,
        notify_off_multiplier: 4,
        queue_notify_off: (0..queues).collect(),
        intx: None,
    };
    let pci = vm.virtio_pci(&layout, &msix).unwrap();
    for q in 0..queues {
        assert_eq!(pci.set_queue_vector(q, q), Some(q));
    }
    pci.set_config_vector(queues);
    pci
}

#[test]
fn a_queue_costs_two_descriptors() {
    // Before the KVM probe, which opens and closes a descriptor.
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    kvm_test!();
    let vm = new_vm();
    let before = open_fds();
    {
        let pci = device(&vm, QUEUES as u16);
        // What a device thread takes per queue: its notifications, the kicks and the interrupt.
        let queues: Vec<_> = (0..QUEUES as u16).map(|q| pci.queue(q).unwrap()).collect();
        for (q, queue) in queues.iter().enumerate() {
            assert!(queue.trigger().unwrap(), "queue {q} delivers");
        }
        let held = open_fds() - before;
        eprintln!(
            "{QUEUES} queues (kernel ioeventfd + delivering MSI-X vector each): {held} descriptors, {:.2} per queue",
            held as f64 / QUEUES as f64
        );
        assert_eq!(held, 2 * QUEUES, "descriptors for {QUEUES} queues");
        drop((queues, pci));
    }
    assert_eq!(open_fds(), before, "every descriptor back after teardown");
}

/// 10^3 cycles of saving a device's notification state (a virtio-pci device with 8 queues and 9
/// MSI-X vectors, one queue with an unread kick, one vector masked with its pending bit, and a
/// level line with an unread resample), dropping the device and restoring it on the same VM: the
/// descriptors and the routing table end as they were after the first cycle, and the unread kick,
/// the pending bit and the resample come through every cycle exactly as they were, neither lost
/// nor doubled. Then two states that do not fit themselves are refused, leaving nothing made.
#[test]
fn snapshot_cycles_leak_nothing() {
    // Before the KVM probe, which opens and closes a descriptor.
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    kvm_test!();
    let vm = new_vm();
    let mut pci = device(&vm, 8);
    assert!(
        pci.trigger_config().unwrap(),
        "pending on the masked vector"
    );
    pci.queue(3).unwrap().kicks().notify().unwrap();
    // A resample the device had not read yet.
    let mut line = vm.level_irqfd(5).unwrap();
    line.resample().notify().unwrap();
    let mut baseline = None;
    for cycle in 0..1000 {
        let state = pci.save().unwrap();
        let line_state = line.save().unwrap();
        let unread: Vec<u64> = state.queues.iter().map(|q| q.unread_kicks).collect();
        assert_eq!(unread, [0, 0, 0, 1, 0, 0, 0, 0], "cycle {cycle}");
        assert!(state.msix.vectors[8].pending, "cycle {cycle}");
        assert_eq!(line_state.unread_resamples, 1, "cycle {cycle}");
        drop((pci, line));
        pci = vm.restore_virtio_pci(&state).unwrap();
        line = vm.restore_level_irqfd(&line_state).unwrap();
        let now = (open_fds(), vm.router().entries());
        match baseline {
            None => baseline = Some(now),
            Some(b) => assert_eq!(now, b, "cycle {cycle}: descriptors and route entries"),
        }
    }
    // A state that does not fit itself is refused before anything is made.
    let mut bad = pci.save().unwrap();
    bad.queues.push(bad.queues[0]);
    let mut far = pci.save().unwrap();
    far.queues[2].vector = 9;
    // An ISR status on a function without an INTx line.
    let mut orphan = pci.save().unwrap();
    orphan.isr = 1;
    for state in [bad, far, orphan] {
        let e = vm.restore_virtio_pci(&state).unwrap_err();
        assert!(matches!(e, vm_notify::Error::SavedState { .. }), "{e:?}");
        assert_eq!((open_fds(), vm.router().entries()), baseline.unwrap());
    }
    eprintln!(
        "1000 snapshot/restore cycles: {} descriptors and {} route entries throughout",
        baseline.unwrap().0,
        baseline.unwrap().1
    );
}
