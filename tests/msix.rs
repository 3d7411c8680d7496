//! MSI-X vectors with a real guest that programs its own table: per-vector delivery, retargeting
//! while interrupts flow, save and restore onto a fresh VM, and the table's access rules.

use std::thread;
use std::time::{Duration, Instant};

use iced_x86::code_asm::{qword_ptr, rax};
use vm_device::bus::MmioAddress;
use vm_device::DeviceMmio;
use vm_memory::{Bytes, GuestAddress};
use vm_notify::io::IoRegion;
use vm_notify::kvm::MsiMessage;
use vm_notify::msix::{MsixState, MsixVectors, MSIX_ENABLE, MSIX_FUNCTION_MASK};
use vm_notify::Error;
use vm_notify_testkit::{kvm_test, layout, Eoi, GuestExit, GuestProgram, MsixBar, TinyVm};

const TIMEOUT: Duration = Duration::from_secs(120);
const BAR: u64 = 0xe000_0000;
const LAPIC_ADDRESS: u64 = 0xfee0_0000;
const BASE_VECTOR: u8 = 0x40;

/// Guest code: program entry `index` with `vector` and the given mask, with two 8-byte writes.
fn program_entry(p: &mut GuestProgram, bar: &MsixBar, index: usize, vector: u8, masked: bool) {
    p.mmio_write(bar.entry(index), LAPIC_ADDRESS, 8).unwrap();
    let control = u64::from(masked) << 32;
    p.mmio_write(bar.entry(index) + 8, u64::from(vector) | control, 8)
        .unwrap();
}

/// An exit handler that serves the MSI-X window and ignores everything else.
fn serve(bar: &MsixBar) -> impl FnMut(&GuestExit, &mut [u8]) + Send + 'static {
    let bar = bar.clone();
    move |e: &GuestExit, reply: &mut [u8]| {
        bar.handle(e, reply);
    }
}

/// The device side of "each raise after the guest handled the previous one on that vector":
/// raises vector `v` whenever the guest's count for its interrupt vector equals the raises so
/// far, until every target is met.
fn raise_in_lockstep(
    msix: MsixVectors,
    memory: vm_memory::GuestMemoryMmap,
    targets: Vec<u64>,
    guest_vector: impl Fn(usize) -> Vec<u8> + Send + 'static,
) -> thread::JoinHandle<Vec<u64>> {
    thread::spawn(move || {
        let count = |vectors: &[u8]| -> u64 {
            vectors
                .iter()
                .map(|&x| {
                    memory
                        .read_obj::<u64>(GuestAddress(layout::IRQ_COUNTS + 8 * u64::from(x)))
                        .unwrap()
                })
                .sum()
        };
        let mut raised = vec![0u64; targets.len()];
        let deadline = Instant::now() + TIMEOUT;
        while raised != targets && Instant::now() < deadline {
            let mut progress = false;
            for v in 0..targets.len() {
                if raised[v] < targets[v] && count(&guest_vector(v)) == raised[v] {
                    msix.trigger(v).unwrap();
                    raised[v] += 1;
                    progress = true;
                }
            }
            if !progress {
                thread::yield_now();
            }
        }
        raised
    })
}

#[test]
fn sixty_four_vectors_each_count_exactly() {
    kvm_test!();
    const N: usize = 64;
    let mut vm = TinyVm::new().unwrap();
    let msix = vm.notify().msix(N).unwrap();
    let bar = MsixBar::new(msix.clone(), BAR);
    let targets: Vec<u64> = (0..N as u64).map(|i| 1 + (i * 7) % 13).collect();
    let total: u64 = targets.iter().sum();

    let mut p = GuestProgram::new().unwrap();
    p.enable_lapic().unwrap();
    for i in 0..N {
        p.on_interrupt(BASE_VECTOR + i as u8, Eoi::Lapic);
        program_entry(&mut p, &bar, i, BASE_VECTOR + i as u8, false);
    }
    // MSI-X enable in message control: all 64 routes in one commit.
    p.mmio_write(bar.control(), u64::from(MSIX_ENABLE), 2)
        .unwrap();
    p.repeat(total, |p| p.wait_for_interrupt()).unwrap();
    p.exit().unwrap();

    let device = raise_in_lockstep(msix.clone(), vm.memory().clone(), targets.clone(), |v| {
        vec![BASE_VECTOR + v as u8]
    });
    let report = vm.start(p, serve(&bar)).unwrap().wait(TIMEOUT);
    let raised = device.join().unwrap();
    let report = report.done().unwrap();
    assert!(bar.errors().is_empty(), "{:?}", bar.errors());
    assert_eq!(raised, targets);
    for (i, &target) in targets.iter().enumerate() {
        let got = vm.irq_count(BASE_VECTOR + i as u8).unwrap();
        assert_eq!(got, target, "vector {i}");
    }
    assert_eq!(
        report.exits.len(),
        2 * N + 1,
        "only table and control accesses exit"
    );
    let stats = msix.stats();
    eprintln!("64 vectors: {total} raises, guest counted each vector exactly; {stats:?}");
    assert_eq!(stats.raised, total);
    assert_eq!(stats.delivered + stats.pending_at_unmask, total);
    for i in 0..N {
        assert!(msix.gsi(i).unwrap().is_some());
    }
}

#[test]
fn reprogramming_while_interrupts_flow_loses_nothing() {
    kvm_test!();
    const PHASES: u64 = 40;
    const PER_PHASE: u64 = 50;
    const A: u8 = 0x50;
    const B: u8 = 0x51;
    let mut vm = TinyVm::new().unwrap();
    let msix = vm.notify().msix(1).unwrap();
    let bar = MsixBar::new(msix.clone(), BAR);

    let mut p = GuestProgram::new().unwrap();
    p.enable_lapic().unwrap();
    p.on_interrupt(A, Eoi::Lapic);
    p.on_interrupt(B, Eoi::Lapic);
    program_entry(&mut p, &bar, 0, A, false);
    p.mmio_write(bar.control(), u64::from(MSIX_ENABLE), 2)
        .unwrap();
    for phase in 0..PHASES {
        p.repeat(PER_PHASE, |p| p.wait_for_interrupt()).unwrap();
        // Retarget the unmasked vector in place: a 4-byte write of the data word.
        let next = if phase % 2 == 0 { B } else { A };
        p.mmio_write(bar.entry(0) + 8, u64::from(next), 4).unwrap();
    }
    p.exit().unwrap();

    let device = raise_in_lockstep(
        msix.clone(),
        vm.memory().clone(),
        vec![PHASES * PER_PHASE],
        |_| vec![A, B],
    );
    let report = vm.start(p, serve(&bar)).unwrap().wait(TIMEOUT);
    let raised = device.join().unwrap();
    report.done().unwrap();
    assert!(bar.errors().is_empty(), "{:?}", bar.errors());
    let (a, b) = (vm.irq_count(A).unwrap(), vm.irq_count(B).unwrap());
    eprintln!(
        "retarget: raised {} delivered {} on {A:#x} + {} on {B:#x} across {PHASES} message changes",
        raised[0], a, b
    );
    assert_eq!(raised[0], PHASES * PER_PHASE);
    assert_eq!(a + b, PHASES * PER_PHASE, "every raise delivered once");
    assert!(a > 0 && b > 0, "both messages were used");
}

/// Phase 1 (fresh VM): the guest programs 8 vectors, masks 2 and 5, and stops; the host raises 2
/// (through `raise`) and 5 (through the vector's eventfd, as a vhost-user backend would), then
/// saves and drops the VM. Phase 2 (new VM, same program, restored state): the guest unmasks
/// everything and sees exactly the two pending interrupts.
#[test]
fn saved_pending_interrupts_are_delivered_after_restore() {
    kvm_test!();
    const N: usize = 8;
    const RESTORED_SLOT: usize = 0;
    const PENDING: [usize; 2] = [2, 5];
    const DRAIN_MARKER: u8 = 0x30;

    let program = |bar: &MsixBar| {
        let mut p = GuestProgram::new().unwrap();
        p.enable_lapic().unwrap();
        for i in 0..N {
            p.on_interrupt(BASE_VECTOR + i as u8, Eoi::Lapic);
        }
        // Phase 1 unless the host marked this run as restored.
        let mut restored = p.asm().create_label();
        p.asm()
            .cmp(qword_ptr(layout::data_slot(RESTORED_SLOT)), 0)
            .unwrap();
        p.asm().jne(restored).unwrap();
        for i in 0..N {
            program_entry(&mut p, bar, i, BASE_VECTOR + i as u8, false);
        }
        p.mmio_write(bar.control(), u64::from(MSIX_ENABLE), 2)
            .unwrap();
        for i in PENDING {
            p.mmio_write(bar.vector_control(i), 1, 4).unwrap();
        }
        p.signal_host(1).unwrap(); // the host raises, saves and stops the VM here
        p.exit().unwrap();
        // Phase 2: unmask all, take what is pending, then take anything extra: a self-IPI of a
        // lower priority class is delivered only after every pending vector above it.
        p.asm().set_label(&mut restored).unwrap();
        for i in 0..N {
            p.mmio_write(bar.vector_control(i), 0, 4).unwrap();
        }
        p.repeat(PENDING.len() as u64, |p| p.wait_for_interrupt())
            .unwrap();
        p.drain_interrupts(DRAIN_MARKER).unwrap();
        p.exit().unwrap();
        p
    };

    // Phase 1.
    let saved: MsixState = {
        let mut vm = TinyVm::new().unwrap();
        let msix = vm.notify().msix(N).unwrap();
        let bar = MsixBar::new(msix.clone(), BAR);
        let external = msix.handle(5).unwrap().notifier().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let inner = bar.clone();
        let run = vm
            .start(program(&bar), move |e: &GuestExit, reply: &mut [u8]| {
                if inner.handle(e, reply) {
                    return;
                }
                if let GuestExit::PioWrite {
                    port: layout::HOST_PORT,
                    ..
                } = e
                {
                    let m = inner.vectors();
                    m.trigger(2).unwrap();
                    m.trigger(2).unwrap();
                    external.add(3).unwrap(); // sits in the detached eventfd's counter
                    tx.send(m.save().unwrap()).unwrap();
                }
            })
            .unwrap();
        let report = run.wait(TIMEOUT).done().unwrap();
        assert!(bar.errors().is_empty(), "{:?}", bar.errors());
        for i in 0..N {
            assert_eq!(vm.irq_count(BASE_VECTOR + i as u8).unwrap(), 0);
        }
        drop(report);
        rx.recv().unwrap()
    };
    assert!(saved.enabled && !saved.function_masked);
    for (i, v) in saved.vectors.iter().enumerate() {
        assert_eq!(
            v.pending,
            PENDING.contains(&i),
            "vector {i} pending at save"
        );
        assert_eq!(v.masked, PENDING.contains(&i), "vector {i} masked at save");
        assert_eq!(v.message, MsiMessage::x86(0, BASE_VECTOR + i as u8));
    }

    // Phase 2, on a fresh VM.
    let mut vm = TinyVm::new().unwrap();
    let msix = vm.notify().restore_msix(&saved).unwrap();
    assert_eq!(msix.save().unwrap(), saved, "restore reproduces the state");
    let bar = MsixBar::new(msix.clone(), BAR);
    vm.write_u64(layout::data_slot(RESTORED_SLOT), 1).unwrap();
    let report = vm.start(program(&bar), serve(&bar)).unwrap().wait(TIMEOUT);
    report.done().unwrap();
    assert!(bar.errors().is_empty(), "{:?}", bar.errors());
    for i in 0..N {
        let expected = u64::from(PENDING.contains(&i));
        assert_eq!(
            vm.irq_count(BASE_VECTOR + i as u8).unwrap(),
            expected,
            "vector {i}"
        );
    }
    assert_eq!(msix.stats().pending_at_unmask, PENDING.len() as u64);
    for i in 0..N {
        assert!(!msix.vector(i).unwrap().pending);
    }
}

/// Where the PBA sits in the test's BAR: the table is at 0.
const PBA: u64 = 0x800;

/// A function's MSI-X table and PBA as a VMM reaches them: vm-notify's `IoRegion`, with the
/// error it keeps for each access.
struct Bar(IoRegion);

impl Bar {
    fn new(msix: &MsixVectors) -> Bar {
        Bar(IoRegion::msix(msix, 0, PBA))
    }

    fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), Error> {
        self.0.mmio_read(MmioAddress(0), offset, data);
        self.0.take_error().map_or(Ok(()), Err)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.0.mmio_write(MmioAddress(0), offset, data);
        self.0.take_error().map_or(Ok(()), Err)
    }
}

#[test]
fn table_and_pba_follow_the_pci_rules() {
    kvm_test!();
    let vm = TinyVm::new().unwrap();
    let msix = vm.notify().msix(70).unwrap();
    let bar = Bar::new(&msix);
    assert_eq!(msix.table_len(), 70 * 16);
    assert_eq!(msix.pba_len(), 16, "70 bits in two QWORDs");
    assert_eq!(
        msix.message_control(),
        69,
        "table size - 1, disabled, unmasked"
    );

    // Reset state: every vector masked, message 0.
    let mut word = [0u8; 4];
    bar.read(12, &mut word).unwrap();
    assert_eq!(u32::from_le_bytes(word), 1);

    // 4-byte writes: address bits 0-1 and vector control bits 1-31 are reserved.
    bar.write(16, &0xfee0_1003u32.to_le_bytes()).unwrap();
    bar.write(20, &0x1u32.to_le_bytes()).unwrap();
    bar.write(24, &0x4041u32.to_le_bytes()).unwrap();
    bar.write(28, &0xffff_fffeu32.to_le_bytes()).unwrap();
    let mut entry = [0u8; 8];
    bar.read(16, &mut entry).unwrap();
    assert_eq!(u64::from_le_bytes(entry), 0x1_fee0_1000);
    bar.read(24, &mut entry).unwrap();
    assert_eq!(
        u64::from_le_bytes(entry),
        0x4041,
        "unmasked, reserved bits read 0"
    );
    let v = msix.vector(1).unwrap();
    assert_eq!(
        v.message,
        MsiMessage {
            address: 0x1_fee0_1000,
            data: 0x4041
        }
    );
    assert!(!v.masked);

    // 8-byte write of data + control.
    bar.write(40, &(0x1_0000_0042u64).to_le_bytes()).unwrap();
    assert!(msix.vector(2).unwrap().masked);
    assert_eq!(msix.vector(2).unwrap().message.data, 0x42);

    // Malformed accesses are refused with the offset, and change nothing; an access between
    // the table and the PBA reaches neither and is ignored, as a BAR's reserved space is.
    bar.write(70 * 16, &[0xff; 4]).unwrap();
    for (offset, len) in [(2u64, 4usize), (4, 8), (0, 2), (0, 1), (16 * 69 + 12, 8)] {
        let e = bar.write(offset, &vec![0xff; len]).unwrap_err();
        assert!(
            matches!(e, Error::MsixAccess { offset: o, len: l, .. } if o == offset && l == len),
            "{e:?}"
        );
    }
    assert_eq!(msix.vector(1).unwrap().message.data, 0x4041);
    assert!(matches!(
        bar.read(PBA + 12, &mut [0u8; 8]),
        Err(Error::MsixAccess { .. })
    ));

    // PBA: raises while disabled set pending bits; bits past vector 69 read 0; writes ignored.
    for i in [0usize, 63, 64, 69] {
        msix.trigger(i).unwrap();
    }
    let mut q = [0u8; 8];
    bar.read(PBA, &mut q).unwrap();
    assert_eq!(u64::from_le_bytes(q), 1 | 1 << 63);
    bar.read(PBA + 8, &mut q).unwrap();
    assert_eq!(u64::from_le_bytes(q), 1 | 1 << 5);
    let mut d = [0u8; 4];
    bar.read(PBA + 12, &mut d).unwrap();
    assert_eq!(u32::from_le_bytes(d), 0);
    bar.write(PBA, &[0u8; 8]).unwrap();
    assert!(msix.vector(0).unwrap().pending, "the PBA is read-only");

    // Message control: enable and function mask apply; the table size is read-only.
    msix.write_message_control(MSIX_ENABLE | MSIX_FUNCTION_MASK | 3)
        .unwrap();
    assert_eq!(
        msix.message_control(),
        MSIX_ENABLE | MSIX_FUNCTION_MASK | 69
    );
    assert!(matches!(
        vm.notify().msix(2049),
        Err(Error::MsixVectorCount { count: 2049 })
    ));
    assert!(matches!(
        vm.notify().msix(0),
        Err(Error::MsixVectorCount { count: 0 })
    ));
    assert!(matches!(
        msix.trigger(70),
        Err(Error::MsixVectorIndex {
            index: 70,
            count: 70
        })
    ));
}

#[test]
fn dropping_the_vectors_releases_irqfds_and_routes() {
    kvm_test!();
    let vm = TinyVm::new().unwrap();
    let router = vm.router();
    let before = router.entries();
    let msix = vm.notify().msix(16).unwrap();
    let entries: Vec<_> = (0..16)
        .map(|i| (i, MsiMessage::x86(0, 0x40 + i as u8), false))
        .collect();
    msix.configure(&entries).unwrap();
    msix.write_message_control(vm_notify::msix::MSIX_ENABLE)
        .unwrap();
    let gsi = msix.gsi(3).unwrap().unwrap();
    assert_eq!(router.irqfds(gsi), 1);
    assert_eq!(router.entries(), before + 16);
    drop(msix);
    assert_eq!(router.irqfds(gsi), 0);
    assert_eq!(router.entries(), before);
}

/// With a quiet device, each unmask of a vector with its pending bit set delivers exactly one
/// interrupt, however many raises the mask held back, and the pending bit is then clear.
#[test]
fn unmask_delivers_exactly_one_pending_interrupt() {
    kvm_test!();
    const CYCLES: u64 = 200;
    const DRAIN: u8 = 0x30;
    const PBA_SLOT: usize = 0; // PBA bits seen set before each unmask, summed
    const PBA_AFTER_SLOT: usize = 1; // PBA bits seen set after each unmask, summed
    let mut vm = TinyVm::new().unwrap();
    let msix = vm.notify().msix(1).unwrap();
    let bar = MsixBar::new(msix.clone(), BAR);
    let mut p = GuestProgram::new().unwrap();
    p.enable_lapic().unwrap();
    p.on_interrupt(BASE_VECTOR, Eoi::Lapic);
    program_entry(&mut p, &bar, 0, BASE_VECTOR, false);
    p.mmio_write(bar.control(), u64::from(MSIX_ENABLE), 2)
        .unwrap();
    p.repeat(CYCLES, |p| {
        p.mmio_write(bar.vector_control(0), 1, 4)?;
        p.signal_host(1)?; // the host raises 1 to 3 times while the vector is masked
        p.mmio_read(bar.pba(), 4)?;
        p.asm().add(qword_ptr(layout::data_slot(PBA_SLOT)), rax)?;
        p.mmio_write(bar.vector_control(0), 0, 4)?;
        p.drain_interrupts(DRAIN)?; // takes the one pending interrupt, and anything extra
        p.mmio_read(bar.pba(), 4)?;
        p.asm()
            .add(qword_ptr(layout::data_slot(PBA_AFTER_SLOT)), rax)?;
        Ok(())
    })
    .unwrap();
    p.exit().unwrap();
    let inner = bar.clone();
    let mut cycle = 0u64;
    let run = vm
        .start(p, move |e: &GuestExit, reply: &mut [u8]| {
            if inner.handle(e, reply) {
                return;
            }
            if let GuestExit::PioWrite {
                port: layout::HOST_PORT,
                ..
            } = e
            {
                cycle += 1;
                for _ in 0..=cycle % 3 {
                    inner.vectors().trigger(0).unwrap();
                }
            }
        })
        .unwrap();
    run.wait(TIMEOUT).done().unwrap();
    assert!(bar.errors().is_empty(), "{:?}", bar.errors());
    let stats = msix.stats();
    eprintln!("unmask with pending, {CYCLES} cycles: {stats:?}");
    assert_eq!(
        vm.irq_count(BASE_VECTOR).unwrap(),
        CYCLES,
        "one interrupt per unmask"
    );
    assert_eq!(vm.irq_count(DRAIN).unwrap(), CYCLES);
    assert_eq!(
        vm.data(PBA_SLOT).unwrap(),
        CYCLES,
        "pending before every unmask"
    );
    assert_eq!(vm.data(PBA_AFTER_SLOT).unwrap(), 0, "never pending after");
    assert_eq!(stats.pending_at_unmask, CYCLES);
    assert_eq!(stats.raised_while_masked, stats.raised);
    assert_eq!(stats.delivered, 0);
}
