use std::sync::Arc;
use vm_notify::fallback::Policy;
use vm_notify::kvm::MsiMessage;
use vm_notify::msix::MSIX_ENABLE;
use vm_notify::virtio::PciLayout;
use vm_notify::Vm;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kvm = kvm_ioctls::Kvm::new()?;
    let fd = Arc::new(kvm.create_vm()?);
    fd.create_irq_chip()?;

    // The wiring: one virtio-pci queue notified at 0xe000_0000, interrupting on MSI-X vector 0.
    let vm = Vm::new(fd, Policy::Auto)?;
    let msix = vm.msix(1)?;
    let layout = PciLayout {
        notify_base: 0xe000_0000,
        notify_off_multiplier: 4,
        queue_notify_off: vec![0],
        intx: None,
    };
    let pci = vm.virtio_pci(&layout, &msix)?;
    // What the guest's driver programs (a VMM routes its MMIO writes to an `IoRegion::msix` and
    // the common configuration's `queue_msix_vector` to `pci.set_queue_vector`):
    msix.set_message(0, MsiMessage::x86(0, 0x40))?;
    msix.set_masked(0, false)?;
    msix.write_message_control(MSIX_ENABLE)?;
    pci.set_queue_vector(0, 0);

    // The device thread: `queue.kicks().read()?` waits for the guest's notify writes to
    // 0xe000_0000 and returns how many came; after serving the queue, one interrupt.
    let queue = pci.queue(0).ok_or("no queue 0")?;
    assert!(queue.trigger()?, "vector 0x40 on CPU 0");
    println!(
        "queue 0: notify at {:#x}, {:?}",
        layout.notify_base,
        pci.queue_placement(0)
    );
    Ok(())
}
