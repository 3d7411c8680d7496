//! The virtio transports' notification half with a real guest driver.
//!
//! virtio-mmio: a virtio-rng device served with `virtio-queue`; the tiny guest is its driver (it
//! makes descriptors available, kicks through QueueNotify, waits for the interrupt, reads
//! InterruptStatus and acknowledges it in its handler, and checks the used ring). Then the
//! InterruptStatus/ACK rules on their own, and virtio-pci notify addressing and vectors.

mod common;

use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::virtio_rng::{RngDevice, RngStats};
use iced_x86::code_asm::*;
use virtio_bindings::virtio_mmio;
use vm_device::bus::{MmioAddress, MmioRange};
use vm_device::device_manager::{IoManager, MmioManager};
use vm_notify::fallback::Policy;
use vm_notify::io::IoRegion;
use vm_notify::kvm::MsiMessage;
use vm_notify::virtio::{MmioLayout, MmioNotify, PciLayout, NO_VECTOR};
use vm_notify::{Notifier, Vm};
use vm_notify::{Width, WriteMatch};
use vm_notify_testkit::{
    kvm_test, layout, Eoi, GuestExit, GuestProgram, Irqchip, SplitQueue, TinyVm,
};

const TIMEOUT: Duration = Duration::from_secs(120);
/// The device's virtio-mmio window.
const BASE: u64 = 0xd000_0000;

// The virtio-mmio registers and interrupt status bits, from virtio-bindings.
const MMIO_QUEUE_NOTIFY: u64 = virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
const MMIO_INTERRUPT_STATUS: u64 = virtio_mmio::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
const MMIO_INTERRUPT_ACK: u64 = virtio_mmio::VIRTIO_MMIO_INTERRUPT_ACK as u64;
const INT_VRING: u32 = virtio_mmio::VIRTIO_MMIO_INT_VRING;
const INT_CONFIG: u32 = virtio_mmio::VIRTIO_MMIO_INT_CONFIG;
/// PIC IRQ 5, level-triggered: vector 0x25.
const IRQ: u8 = 5;
const VECTOR: u8 = 0x20 + IRQ;
/// Data slots the guest's handler writes: the status bits it saw, and reads of 0.
const SEEN: usize = 0;
const ZERO_READS: usize = 1;
/// Buffer lengths the descriptors cycle through.
const LENGTHS: [u32; 4] = [16, 64, 256, 512];

struct Outcome {
    stats: RngStats,
    guest_irqs: u64,
    zero_reads: u64,
    exits: usize,
    /// InterruptStatus when the guest exited: INT_VRING still set means an interrupt was due that
    /// the guest had no more reason to wait for.
    status_at_exit: u32,
}

/// The device's notification registers (QueueNotify to InterruptACK) as the VMM routes them:
/// vm-notify's `IoRegion` in an `IoManager`.
fn notify_io(notify: &Arc<MmioNotify>) -> (IoManager, Arc<IoRegion>) {
    let region = Arc::new(IoRegion::mmio_notify(notify.clone()));
    let mut io = IoManager::new();
    let window = MmioRange::new(MmioAddress(BASE + MMIO_QUEUE_NOTIFY), 0x18).unwrap();
    io.register_mmio(window, region.clone()).unwrap();
    (io, region)
}

/// The rng device's notification half on `vm`, with `queues` queues, placed by `kind`; with the
/// root that placed it (its dispatcher takes the userspace path's kicks).
fn mmio_device(vm: &TinyVm, kind: Policy, queues: u16) -> (Vm, Arc<MmioNotify>) {
    let device = MmioLayout {
        base: BASE,
        queues,
        gsi: IRQ.into(),
    };
    let root = vm.notify().with_policy(kind);
    vm.run_injector(&root).unwrap();
    let notify = Arc::new(root.virtio_mmio(&device).unwrap());
    (root, notify)
}

/// Runs `rounds` rounds on `queues` queues (each round submits and kicks one request per queue,
/// then waits for all of them) against the rng device on `kind`'s path, on `chip`: the
/// device's line is PIC IRQ 5 on the in-kernel irqchip, IOAPIC pin 5 on the split one.
fn rng(chip: Irqchip, kind: Policy, queues: u16, rounds: u64) -> Outcome {
    let mut vm = TinyVm::with_irqchip(chip, 1).unwrap();
    let (root, notify) = mmio_device(&vm, kind, queues);
    let layouts: Vec<_> = (0..queues)
        .map(|i| {
            let q = SplitQueue::new(i, 16, &LENGTHS).unwrap();
            q.lay_out(&vm).unwrap();
            (notify.queue(i).unwrap(), q)
        })
        .collect();

    let mut p = GuestProgram::new().unwrap();
    let eoi = take_line(&mut p, chip);
    p.on_interrupt_with(VECTOR, eoi, |a| {
        GuestProgram::virtio_mmio_ack(a, BASE, SEEN, ZERO_READS)
    });
    p.repeat(rounds, |p| {
        for (i, (_, q)) in layouts.iter().enumerate() {
            p.virtq_submit(q)?;
            p.mmio_write(BASE + MMIO_QUEUE_NOTIFY, i as u64, 4)?;
        }
        for (_, q) in &layouts {
            p.virtq_wait_used(q)?;
        }
        Ok(())
    })
    .unwrap();
    p.exit().unwrap();

    let (stop, device) = RngDevice::new(
        vm.memory().clone(),
        &layouts,
        Some(notify.interrupt().clone()),
    )
    .spawn();
    // The notification registers as the VMM routes them; the userspace path's kicks go to the
    // dispatcher.
    let (io, region) = notify_io(&notify);
    let dispatcher = root.dispatcher().clone();
    let report = vm
        .start(p, move |e: &GuestExit, data: &mut [u8]| {
            let served = e.dispatch(&dispatcher).unwrap() || e.route(&io, data);
            assert!(served, "unexpected exit {e:?}");
        })
        .unwrap()
        .wait(TIMEOUT)
        .done()
        .unwrap();
    stop.stop().unwrap();
    let stats = device.join().unwrap();
    let status_at_exit = notify.interrupt().status();
    assert!(region.take_error().is_none());

    // Every request completed with the right length, and the bytes are not constant.
    for (_, q) in &layouts {
        assert_eq!(q.submitted(&vm).unwrap(), rounds);
        assert_eq!(q.used_idx(&vm).unwrap(), rounds as u16);
        assert_eq!(q.mismatches(&vm).unwrap(), 0, "used lengths");
        let distinct = q.distinct_words(&vm).unwrap();
        assert!(
            distinct > 100,
            "buffer contents look constant: {distinct} distinct words"
        );
    }
    assert_eq!(stats.requests, vec![rounds; usize::from(queues)]);
    Outcome {
        guest_irqs: vm.irq_count(VECTOR).unwrap(),
        zero_reads: vm.data(ZERO_READS).unwrap(),
        exits: report.handler_exits(),
        stats,
        status_at_exit,
    }
}

/// The accounting every rng test checks: every byte; the interrupts
/// (`RngStats::check_interrupts`); `exits_per_irq` exits per interrupt (virtio-mmio's status
/// read and ACK, virtio-pci's ISR read), plus the kicks on the userspace path. A re-assertion can
/// land after the guest's ACK where a kernel irqfd raises the pin (from a work queue), and on the
/// split irqchip where this host reports an EOI before the handler's ACK (see
/// tests/level_resample.rs): there an interrupt may find the status 0, one per re-assertion at
/// most.
fn check(chip: Irqchip, kind: Policy, queues: u16, rounds: u64, o: &Outcome, exits_per_irq: u64) {
    // Request r of a queue uses descriptor r % 16, of LENGTHS[r % 4] bytes.
    let per_queue: u64 = (0..rounds)
        .map(|r| u64::from(LENGTHS[(r % 4) as usize]))
        .sum();
    let bytes = per_queue * u64::from(queues);
    eprintln!(
        "{chip:?} irqchip, {kind:?}, {queues} queue(s), {rounds} rounds: {:?}, guest_irqs={} zero_reads={} exits={} status_at_exit={}",
        o.stats, o.guest_irqs, o.zero_reads, o.exits, o.status_at_exit
    );
    assert_eq!(o.stats.bytes, bytes);
    let untaken = o.status_at_exit & INT_VRING != 0;
    let late = kind == Policy::Kernel || chip == Irqchip::Split;
    if let Err(e) = o
        .stats
        .check_interrupts(o.guest_irqs, o.zero_reads, untaken, late)
    {
        panic!("{kind:?}: {e}");
    }
    let kicks = if kind == Policy::Kernel {
        0
    } else {
        rounds * u64::from(queues)
    };
    assert_eq!(o.exits as u64, exits_per_irq * o.guest_irqs + kicks);
}

/// The device's level line, GSI 5, as the guest takes it on `chip`: PIC IRQ 5 (level, by the
/// ELCR) on the in-kernel irqchip, pin 5 of vm-notify's IOAPIC on the split one. Returns the
/// EOI its handler sends.
fn take_line(p: &mut GuestProgram, chip: Irqchip) -> Eoi {
    match chip {
        Irqchip::Kernel => p
            .init_pic(0x20, !((1u16 << IRQ) | (1 << 2)), 1 << IRQ)
            .map(|()| Eoi::PicMaster),
        Irqchip::Split => p
            .take_ioapic_pin(chip, IRQ, VECTOR, true)
            .map(|()| Eoi::Lapic),
    }
    .unwrap()
}

/// `rng` and `check` on the kernel path, then on the userspace path, on `chip`.
fn rng_on_both_paths(chip: Irqchip, queues: u16, rounds: u64) {
    for kind in [Policy::Kernel, Policy::Userspace] {
        let o = rng(chip, kind, queues, rounds);
        check(chip, kind, queues, rounds, &o, 2);
    }
}

#[test]
fn virtio_mmio_rng_serves_1000_requests_on_one_queue() {
    kvm_test!();
    rng_on_both_paths(Irqchip::Kernel, 1, 1000);
}

/// The same device and driver on the split irqchip: the device's level line is pin 5 of
/// vm-notify's IOAPIC, resampled at the EOIs KVM reports.
#[test]
fn virtio_mmio_rng_on_the_split_irqchip() {
    kvm_test!();
    rng_on_both_paths(Irqchip::Split, 1, 1000);
}

#[test]
fn virtio_mmio_rng_serves_two_queues_with_interleaved_kicks() {
    kvm_test!();
    rng_on_both_paths(Irqchip::Kernel, 2, 500);
}

/// virtio-pci with MSI-X left disabled, as a driver without MSI-X support (Linux with
/// `pci=nomsi`) runs it: the rng device's used-buffer interrupts set the ISR status and assert the
/// function's INTx line, GSI 5 (level), where `PciLayout::intx` put it: PIC IRQ 5 on the
/// in-kernel irqchip (this host's in-kernel IOAPIC reports a level EOI before the handler runs,
/// see tests/level_resample.rs), pin 5 of vm-notify's IOAPIC on the split one. The guest is the
/// driver: it submits, kicks at the queue's notify address, waits; its handler reads the ISR byte
/// (the VMM answers the read with `PciNotify::read_isr`, which clears it and lowers the line) and
/// EOIs; the device re-asserts at a resample while the status is still set. Counts
/// as the virtio-mmio run's: every interrupt the guest took was one the device newly set, but for
/// re-assertions landing after the guest's read.
fn rng_intx(chip: Irqchip, kind: Policy, rounds: u64) -> Outcome {
    const NOTIFY_BASE: u64 = 0xd100_0000;
    const ISR: u64 = 0xd100_1000;
    let mut vm = TinyVm::with_irqchip(chip, 1).unwrap();
    let root = vm.notify().with_policy(kind);
    vm.run_injector(&root).unwrap();
    // The function's MSI-X vectors exist, but the guest never enables them.
    let vectors = root.msix(2).unwrap();
    let layout = PciLayout {
        notify_base: NOTIFY_BASE,
        notify_off_multiplier: 4,
        queue_notify_off: vec![0],
        intx: Some(IRQ.into()),
    };
    let notify = Arc::new(root.virtio_pci(&layout, &vectors).unwrap());
    assert!(notify.intx_placement().is_some());
    // A vector chosen while MSI-X is off is not used: INTx is.
    assert_eq!(notify.set_queue_vector(0, 0), Some(0));
    let q = SplitQueue::new(0, 16, &LENGTHS).unwrap();
    q.lay_out(&vm).unwrap();
    let layouts = [(notify.queue(0).unwrap(), q)];

    let mut p = GuestProgram::new().unwrap();
    let eoi = take_line(&mut p, chip);
    p.on_interrupt_with(VECTOR, eoi, |a| {
        GuestProgram::virtio_pci_isr(a, ISR, SEEN, ZERO_READS)
    });
    let (_, q) = &layouts[0];
    p.repeat(rounds, |p| {
        p.virtq_submit(q)?;
        p.mmio_write(NOTIFY_BASE, 0, 2)?;
        p.virtq_wait_used(q)
    })
    .unwrap();
    p.exit().unwrap();

    let (stop, device) =
        RngDevice::new(vm.memory().clone(), &layouts, notify.intx().cloned()).spawn();
    let region = Arc::new(IoRegion::pci_notify(notify.clone()));
    let mut io = IoManager::new();
    io.register_mmio(
        MmioRange::new(MmioAddress(NOTIFY_BASE), 4).unwrap(),
        region.clone(),
    )
    .unwrap();
    let (vmm, dispatcher) = (notify.clone(), root.dispatcher().clone());
    let report = vm
        .start(p, move |e: &GuestExit, data: &mut [u8]| match *e {
            GuestExit::MmioRead { addr: ISR, len: 1 } => data[0] = vmm.read_isr().unwrap(),
            ref other => {
                let served = other.dispatch(&dispatcher).unwrap() || other.route(&io, data);
                assert!(served, "unexpected exit {other:?}");
            }
        })
        .unwrap()
        .wait(TIMEOUT)
        .done()
        .unwrap();
    stop.stop().unwrap();
    let stats = device.join().unwrap();
    assert!(region.take_error().is_none());
    let (_, q) = &layouts[0];
    assert_eq!(q.submitted(&vm).unwrap(), rounds);
    assert_eq!(q.used_idx(&vm).unwrap(), rounds as u16);
    assert_eq!(q.mismatches(&vm).unwrap(), 0, "used lengths");
    assert_eq!(vectors.stats().raised, 0, "no MSI-X vector was raised");
    // The guest saw only the used-buffer bit.
    assert_eq!(vm.data(SEEN).unwrap() & !u64::from(INT_VRING), 0);
    Outcome {
        guest_irqs: vm.irq_count(VECTOR).unwrap(),
        zero_reads: vm.data(ZERO_READS).unwrap(),
        exits: report.handler_exits(),
        status_at_exit: notify.intx().unwrap().status(),
        stats,
    }
}

/// `rng_intx` on both irqchips and both paths, with `check`'s accounting (one exit per
/// interrupt, the ISR read, where virtio-mmio has two); every run saw resamples.
#[test]
fn virtio_pci_intx_serves_the_rng_device_on_a_level_line() {
    kvm_test!();
    const ROUNDS: u64 = 500;
    for chip in [Irqchip::Kernel, Irqchip::Split] {
        for kind in [Policy::Kernel, Policy::Userspace] {
            let o = rng_intx(chip, kind, ROUNDS);
            check(chip, kind, 1, ROUNDS, &o, 1);
            assert!(o.stats.resamples > 0, "no resample reached the device");
        }
    }
}

/// InterruptStatus/ACK: with both bits set, the guest acknowledges only INT_VRING: the line stays
/// asserted (INT_CONFIG is still set) and the guest takes another interrupt. It then acknowledges
/// everything, and the line drops: when the guest next reports, InterruptStatus is 0 and the
/// PIC's request bit for the pin is clear. The guest's handler records the status it read.
fn ack_rules(kind: Policy) {
    const MASK: usize = 2;
    const STATUS_LOG: usize = 3;
    let mut vm = TinyVm::new().unwrap();
    let (_, notify) = mmio_device(&vm, kind, 1);

    let mut p = GuestProgram::new().unwrap();
    p.init_pic(0x20, !((1u16 << IRQ) | (1 << 2)), 1 << IRQ)
        .unwrap();
    p.on_interrupt_with(VECTOR, Eoi::PicMaster, |a| {
        a.mov(rdx, BASE + MMIO_INTERRUPT_STATUS)?;
        a.mov(eax, dword_ptr(rdx))?;
        // Log the status at slot STATUS_LOG + (this interrupt's number, from 1).
        a.mov(rcx, qword_ptr(layout::IRQ_COUNTS + 8 * u64::from(VECTOR)))?;
        a.mov(rdx, layout::data_slot(STATUS_LOG))?;
        a.mov(qword_ptr(rdx + rcx * 8), rax)?;
        a.and(eax, dword_ptr(layout::data_slot(MASK)))?;
        a.mov(rdx, BASE + MMIO_INTERRUPT_ACK)?;
        a.mov(dword_ptr(rdx), eax)?;
        Ok(())
    });
    let set_mask = |p: &mut GuestProgram, mask: u32| {
        p.asm()
            .mov(qword_ptr(layout::data_slot(MASK)), mask as i32)
            .unwrap()
    };
    set_mask(&mut p, INT_VRING);
    p.signal_host(1).unwrap(); // the host raises both bits
    p.wait_for_interrupt().unwrap();
    set_mask(&mut p, u32::MAX);
    p.wait_for_interrupt().unwrap();
    p.signal_host(2).unwrap(); // the host looks at the line
    p.exit().unwrap();

    let (stop, device) =
        RngDevice::new(vm.memory().clone(), &[], Some(notify.interrupt().clone())).spawn();
    let (tx, rx) = mpsc::channel();
    let (vmm, raw) = (notify.clone(), vm.vm().clone());
    let (io, region) = notify_io(&notify);
    vm.start(p, move |e: &GuestExit, data: &mut [u8]| match *e {
        GuestExit::PioWrite {
            port: layout::HOST_PORT,
            data: 1,
            ..
        } => {
            assert!(vmm.queue(0).unwrap().trigger().unwrap());
            assert!(vmm.interrupt().trigger_config().unwrap());
        }
        GuestExit::PioWrite {
            port: layout::HOST_PORT,
            data: 2,
            ..
        } => {
            let mut pic = kvm_bindings::kvm_irqchip {
                chip_id: kvm_bindings::KVM_IRQCHIP_PIC_MASTER,
                ..Default::default()
            };
            raw.get_irqchip(&mut pic).unwrap();
            // SAFETY: for the master PIC, KVM fills the `pic` member of the union.
            let irr = unsafe { pic.chip.pic }.irr;
            tx.send((vmm.interrupt().status(), irr & (1 << IRQ)))
                .unwrap();
        }
        ref other => assert!(other.route(&io, data), "unexpected exit {other:?}"),
    })
    .unwrap()
    .wait(TIMEOUT)
    .done()
    .unwrap();
    assert!(region.take_error().is_none());
    stop.stop().unwrap();
    let stats = device.join().unwrap();
    let (status, pin_requested) = rx.try_recv().unwrap();
    let log: Vec<u64> = (1..=3).map(|n| vm.data(STATUS_LOG + n).unwrap()).collect();
    eprintln!(
        "{kind:?}: statuses read {log:?}, irqs {}, then status {status} and PIC request bit {pin_requested}; device {stats:?}",
        vm.irq_count(VECTOR).unwrap()
    );
    assert_eq!(vm.irq_count(VECTOR).unwrap(), 2);
    let both = u64::from(INT_VRING | INT_CONFIG);
    assert_eq!(log, [both, u64::from(INT_CONFIG), 0]);
    assert_eq!((status, pin_requested), (0, 0));
}

#[test]
fn virtio_mmio_ack_keeps_the_line_asserted_until_every_bit_is_acknowledged() {
    kvm_test!();
    ack_rules(Policy::Kernel);
    ack_rules(Policy::Userspace);
}

/// Kicks `pci_notify`'s guest makes on queue 0 and queue 1.
const PCI_KICKS: [u64; 2] = [30, 20];
/// High half of a `VIRTIO_F_NOTIFICATION_DATA` notify write: next_wrap set, next_off 3.
const NEXT: u64 = 0x8003 << 16;

/// virtio-pci with two queues at offsets 0 and 1: with `multiplier` 4 each has its own address,
/// with 0 they share one. The guest kicks each queue (2-byte writes of its index, or with
/// `notification_data` 4-byte writes with the next position above the index), and writes an
/// index no queue has at queue 0's address. Every kick reaches exactly its queue's notifier
/// (through the ioeventfd, or as an exit the VMM hands to `PciNotify::write`), the stray writes
/// none; queue 0 on vector 0 raises it, queue 1 with NO_VECTOR raises nothing. Returns the kicks
/// that exited.
fn pci_notify(kind: Policy, multiplier: u32, notification_data: bool) -> usize {
    const NOTIFY_BASE: u64 = 0xd100_0000;
    const STRAY: u64 = 10;
    const VECTORS: [u8; 2] = [0x45, 0x46];
    let mut vm = TinyVm::new().unwrap();
    let root = vm.notify().with_policy(kind);
    vm.run_injector(&root).unwrap();
    let vectors = root.msix(2).unwrap();
    for (i, v) in VECTORS.iter().enumerate() {
        vectors.set_message(i, MsiMessage::x86(0, *v)).unwrap();
        vectors.set_masked(i, false).unwrap();
    }
    vectors
        .write_message_control(vm_notify::msix::MSIX_ENABLE)
        .unwrap();
    let layout = PciLayout {
        notify_base: NOTIFY_BASE,
        notify_off_multiplier: multiplier,
        queue_notify_off: vec![0, 1],
        intx: None,
    };
    let notify = Arc::new(root.virtio_pci(&layout, &vectors).unwrap());
    let step = u64::from(multiplier);
    assert_eq!(notify.notify_address(0), Some(NOTIFY_BASE));
    assert_eq!(notify.notify_address(1), Some(NOTIFY_BASE + step));
    // An address of its own takes any write; a shared one, 2-byte writes of the index.
    for q in 0..2u16 {
        let expected = if multiplier > 0 {
            WriteMatch::mmio(NOTIFY_BASE + step * u64::from(q))
        } else {
            WriteMatch::mmio(NOTIFY_BASE)
                .width(Width::W2)
                .datamatch(q.into())
        };
        assert_eq!(notify.queue_match(q), Some(expected));
    }
    assert_eq!(notify.set_queue_vector(0, 0), Some(0));
    // A vector the function does not have reads back as NO_VECTOR.
    assert_eq!(notify.set_queue_vector(1, 7), Some(NO_VECTOR));
    assert_eq!(notify.set_queue_vector(1, NO_VECTOR), Some(NO_VECTOR));
    assert_eq!(notify.set_queue_vector(2, 0), None);

    let mut p = GuestProgram::new().unwrap();
    p.enable_lapic().unwrap();
    for v in VECTORS {
        p.on_interrupt(v, Eoi::Lapic);
    }
    for (q, kicks) in PCI_KICKS.iter().enumerate() {
        let addr = notify.notify_address(q as u16).unwrap();
        p.repeat(*kicks, |p| match notification_data {
            false => p.mmio_write(addr, q as u64, 2),
            true => p.mmio_write(addr, q as u64 | NEXT, 4),
        })
        .unwrap();
    }
    // With an address per queue these are queue 0's kicks; at a shared address, nobody's.
    p.repeat(STRAY, |p| p.mmio_write(NOTIFY_BASE, 7, 2))
        .unwrap();
    p.signal_host(1).unwrap(); // the device signals both queues
    p.wait_for_interrupt().unwrap();
    p.drain_interrupts(0x30).unwrap();
    p.exit().unwrap();

    let (vmm, dispatcher) = (notify.clone(), root.dispatcher().clone());
    // The notify region as the VMM routes it: an `IoRegion` in its `IoManager`, over the queues'
    // addresses (the writes that exit reach their queues through vm-device's dispatch).
    let region = Arc::new(IoRegion::pci_notify(notify.clone()));
    let mut io = IoManager::new();
    let span = NOTIFY_BASE..NOTIFY_BASE + step + 4;
    io.register_mmio(
        MmioRange::new(MmioAddress(span.start), span.end - span.start).unwrap(),
        region.clone(),
    )
    .unwrap();
    let (tx, rx) = mpsc::channel();
    let report = vm
        .start(p, move |e: &GuestExit, _: &mut [u8]| match *e {
            GuestExit::PioWrite {
                port: layout::HOST_PORT,
                ..
            } => {
                let raised = (
                    vmm.queue(0).unwrap().trigger().unwrap(),
                    vmm.queue(1).unwrap().trigger().unwrap(),
                );
                tx.send(raised).unwrap();
            }
            GuestExit::MmioWrite { addr, data, len } => {
                if !e.dispatch(&dispatcher).unwrap() {
                    let bytes = &data.to_le_bytes()[..usize::from(len)];
                    assert!(span.contains(&addr), "{e:?} is no notify write");
                    io.mmio_write(MmioAddress(addr), bytes).unwrap();
                }
            }
            ref other => panic!("unexpected exit {other:?}"),
        })
        .unwrap()
        .wait(TIMEOUT)
        .done()
        .unwrap();
    let kicks: Vec<u64> = (0..2)
        .map(|q| {
            let queue = notify.queue(q).unwrap();
            let n: &Notifier = queue.kicks();
            n.try_read().unwrap().done().unwrap_or(0)
        })
        .collect();
    let exited = |data: u64| {
        report.count(|e| matches!(e, GuestExit::MmioWrite { data: d, .. } if *d == data))
    };
    let kick_exits = exited(0) + exited(1) + exited(NEXT) + exited(1 | NEXT);
    let stray_exits = exited(7);
    let irqs: Vec<u64> = VECTORS.iter().map(|&v| vm.irq_count(v).unwrap()).collect();
    eprintln!(
        "{kind:?}, multiplier {multiplier}, NOTIFICATION_DATA {notification_data}: kicks {kicks:?}, \
         kick exits {kick_exits}, stray exits {stray_exits}, interrupts {irqs:?}"
    );
    let queue0 = if multiplier > 0 { STRAY } else { 0 };
    assert_eq!(kicks, [PCI_KICKS[0] + queue0, PCI_KICKS[1]]);
    assert!(region.take_error().is_none());
    assert_eq!(rx.try_recv().unwrap(), (true, false));
    assert_eq!(irqs, [1, 0]);
    // A stray write exits unless an any-width ioeventfd in the kernel takes it.
    let stray_in_kernel = multiplier > 0 && matches!(kind, Policy::Kernel);
    assert_eq!(stray_exits as u64, if stray_in_kernel { 0 } else { STRAY });
    kick_exits
}

/// Kicks on the kernel path never exit where each queue has its own address (the any-width
/// ioeventfd takes NOTIFICATION_DATA writes too), nor at a shared address without
/// NOTIFICATION_DATA; with it, a shared address's kicks exit and `PciNotify::write` counts them.
/// On the userspace path every kick exits. The counts are exact in every case.
#[test]
fn virtio_pci_notify_addresses_vectors_and_notification_data() {
    kvm_test!();
    let all = PCI_KICKS.iter().sum::<u64>() as usize;
    for multiplier in [4, 0] {
        for nd in [false, true] {
            let kernel_exits = pci_notify(Policy::Kernel, multiplier, nd);
            let expected = if multiplier == 0 && nd { all } else { 0 };
            assert_eq!(
                kernel_exits, expected,
                "kernel, multiplier {multiplier}, ND {nd}"
            );
            assert_eq!(pci_notify(Policy::Userspace, multiplier, nd), all);
        }
    }
}

/// Kicks `mmio_notification_data`'s guest makes per queue as the index alone.
const PLAIN: u64 = 15;

/// virtio-mmio with `VIRTIO_F_NOTIFICATION_DATA`: kicks on two queues, some as the index alone
/// (taken by the datamatch ioeventfd on the kernel path) and some with the next position above
/// the index (no datamatch matches: they exit and `MmioNotify::write` counts them). Every kick
/// reaches its queue exactly once. Returns (kicks per queue, kicks that exited).
fn mmio_notification_data(kind: Policy) -> (Vec<u64>, usize) {
    const WITH_DATA: [u64; 2] = [25, 35];
    let mut vm = TinyVm::new().unwrap();
    let (root, notify) = mmio_device(&vm, kind, 2);
    let mut p = GuestProgram::new().unwrap();
    for (q, n) in WITH_DATA.iter().enumerate() {
        p.repeat(PLAIN, |p| {
            p.mmio_write(BASE + MMIO_QUEUE_NOTIFY, q as u64, 4)
        })
        .unwrap();
        p.repeat(*n, |p| {
            p.mmio_write(BASE + MMIO_QUEUE_NOTIFY, q as u64 | NEXT, 4)
        })
        .unwrap();
    }
    p.exit().unwrap();
    let dispatcher = root.dispatcher().clone();
    let (io, region) = notify_io(&notify);
    let report = vm
        .start(p, move |e: &GuestExit, data: &mut [u8]| {
            if !e.dispatch(&dispatcher).unwrap() {
                assert!(e.route(&io, data), "unexpected exit {e:?}");
            }
        })
        .unwrap()
        .wait(TIMEOUT)
        .done()
        .unwrap();
    assert!(region.take_error().is_none());
    let kicks = (0..2)
        .map(|q| {
            let queue = notify.queue(q).unwrap();
            let n: &Notifier = queue.kicks();
            n.try_read().unwrap().done().unwrap_or(0)
        })
        .collect::<Vec<u64>>();
    let exits = report.count(|e| matches!(e, GuestExit::MmioWrite { .. }));
    eprintln!("{kind:?}: kicks {kicks:?}, {exits} exited");
    let expected: Vec<u64> = WITH_DATA.iter().map(|n| n + PLAIN).collect();
    assert_eq!(kicks, expected);
    (kicks, exits)
}

#[test]
fn virtio_mmio_takes_notification_data_kicks_through_the_exit_path() {
    kvm_test!();
    let (kicks, exits) = mmio_notification_data(Policy::Kernel);
    // On the kernel path only the writes carrying more than the index exit.
    assert_eq!(exits as u64, kicks.iter().sum::<u64>() - 2 * PLAIN);
    let (kicks, exits) = mmio_notification_data(Policy::Userspace);
    assert_eq!(exits as u64, kicks.iter().sum::<u64>());
}

/// More queues than virtio has, and a notify address past the end of the address space, are
/// typed errors; nothing stays registered.
#[test]
fn pci_notify_refuses_bad_layouts() {
    kvm_test!();
    let vm = TinyVm::new().unwrap();
    let root = vm.notify();
    let vectors = root.msix(1).unwrap();
    let many = PciLayout {
        notify_base: 0xd100_0000,
        notify_off_multiplier: 0,
        queue_notify_off: vec![0u16; 65536],
        intx: None,
    };
    let e = root.virtio_pci(&many, &vectors).unwrap_err();
    assert!(
        matches!(e, vm_notify::Error::VirtioQueueCount { count: 65536 }),
        "{e:?}"
    );
    let wrapping = PciLayout {
        notify_base: u64::MAX - 8,
        notify_off_multiplier: 4,
        queue_notify_off: vec![0, 4],
        intx: None,
    };
    let e = root.virtio_pci(&wrapping, &vectors).unwrap_err();
    assert!(matches!(e, vm_notify::Error::AddressWraps { .. }), "{e:?}");
    // Queue 0 (at u64::MAX - 8) was registered before queue 1 failed; it is gone again: the
    // same address registers anew.
    let n = Notifier::new(vm_notify::Mode::Counter).unwrap();
    let again = vm.notify().ioevent(
        vm_notify::WriteMatch::mmio(u64::MAX - 8)
            .width(vm_notify::Width::W2)
            .datamatch(0),
        &n,
    );
    assert!(again.is_ok(), "{again:?}");
}
