//! Descriptors per queue: a virtio-pci device with 256 queues, each notified through a kernel
//! ioeventfd and interrupting on its own delivering MSI-X vector, costs the process exactly two
//! descriptors a queue — the kick's eventfd and the vector's — however many registrations refer
//! to them. Counted in `/proc/self/fd`, alone in its test binary so nothing else opens or closes
//! descriptors meanwhile.

use vm_notify::fallback::Policy;
use vm_notify::kvm::MsiMessage;
use vm_notify::virtio::PciLayout;
use vm_notify::Vm;
use vm_notify_testkit::kvm_test;

const QUEUES: usize = 256;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn a_queue_costs_two_descriptors() {
    kvm_test!();
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let fd = std::sync::Arc::new(kvm.create_vm().unwrap());
    fd.create_irq_chip().unwrap();
    let vm = Vm::new(fd, Policy::Kernel).unwrap();
    let before = open_fds();
    {
        let msix = vm.msix(QUEUES).unwrap();
        let entries: Vec<_> = (0..QUEUES)
            .map(|i| (i, MsiMessage::x86(0, 0x40 + (i % 160) as u8), false))
            .collect();
        msix.configure(&entries).unwrap();
        msix.set_enabled(true).unwrap();
        let layout = PciLayout {
            notify_base: 0xe000_0000,
            notify_off_multiplier: 4,
            queue_notify_off: (0..QUEUES as u16).collect(),
        };
        let pci = vm.virtio_pci(&layout, &msix).unwrap();
        for q in 0..QUEUES as u16 {
            assert_eq!(pci.set_queue_vector(q, q), Some(q));
        }
        // What a device thread takes per queue: its notifications, the kicks and the interrupt.
        let queues: Vec<_> = (0..QUEUES as u16).map(|q| pci.queue(q).unwrap()).collect();
        for (q, queue) in queues.iter().enumerate() {
            assert!(queue.signal_used().unwrap(), "queue {q} delivers");
        }
        let held = open_fds() - before;
        eprintln!(
            "{QUEUES} queues (kernel ioeventfd + delivering MSI-X vector each): {held} descriptors, {:.2} per queue",
            held as f64 / QUEUES as f64
        );
        assert_eq!(held, 2 * QUEUES, "descriptors for {QUEUES} queues");
        drop(queues);
        drop(pci);
        drop(msix);
    }
    assert_eq!(open_fds(), before, "every descriptor back after teardown");
}
