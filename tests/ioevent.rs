//! Guest writes → ioeventfd → notifier, with a real guest: counts, datamatch, widths,
//! unregistration.

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use iced_x86::code_asm::*;
use vm_notify::testkit::{kvm_or_skip, layout, GuestExit, GuestProgram, TinyVm};
use vm_notify::{Attempt, Error, IoEvent, IoEventAddress, Mode, Notifier, Width, WriteMatch};

const N: u64 = 100_000;
const TIMEOUT: Duration = Duration::from_secs(120);
const MMIO: u64 = 0xd000_0000;
const PORT: u16 = 0x510;

/// Emits one guest write of `width` to `addr` (MMIO through `rdi`, PIO through `dx`), carrying
/// `value`. Clobbers rax, rdi, rdx.
fn emit_write(p: &mut GuestProgram, addr: IoEventAddress, width: Width, value: u64) {
    let a = p.asm();
    a.mov(rax, value).unwrap();
    match addr {
        IoEventAddress::Mmio(m) => {
            a.mov(rdi, m).unwrap();
            match width {
                Width::W1 => a.mov(byte_ptr(rdi), al).unwrap(),
                Width::W2 => a.mov(word_ptr(rdi), ax).unwrap(),
                Width::W4 => a.mov(dword_ptr(rdi), eax).unwrap(),
                Width::W8 | Width::Any => a.mov(qword_ptr(rdi), rax).unwrap(),
            }
        }
        IoEventAddress::Pio(port) => {
            a.mov(edx, port as u32).unwrap();
            match width {
                Width::W1 => a.out(dx, al).unwrap(),
                Width::W2 => a.out(dx, ax).unwrap(),
                _ => a.out(dx, eax).unwrap(),
            }
        }
    }
}

/// The guest writes `N` times to `addr` while a device thread reads the notifier; returns
/// (guest's own count, device's total, number of reads).
fn write_loop(addr: IoEventAddress, width: Width, mode: Mode) -> (u64, u64, u64) {
    let mut vm = TinyVm::new().unwrap();
    let kicks = Notifier::new(mode).unwrap();
    let _reg = IoEvent::register(vm.vm(), WriteMatch::at(addr).width(width), &kicks).unwrap();

    let mut p = GuestProgram::new().unwrap();
    p.repeat(N, |p| {
        p.count(0)?;
        emit_write(p, addr, width, 0x5a);
        Ok(())
    })
    .unwrap();
    p.exit().unwrap();

    let device = thread::spawn(move || {
        let (mut total, mut reads) = (0u64, 0u64);
        while total < N {
            match kicks.read_timeout(TIMEOUT).unwrap() {
                Attempt::Done(v) => {
                    if mode == Mode::Semaphore {
                        assert_eq!(v, 1, "a semaphore read returns 1");
                    }
                    total += v;
                    reads += 1;
                }
                Attempt::WouldBlock => break,
            }
        }
        // Nothing more arrives after the guest's N writes.
        assert!(kicks.try_read().unwrap().would_block());
        (total, reads)
    });
    let report = vm.run(p, TIMEOUT).unwrap().done().unwrap();
    let (total, reads) = device.join().unwrap();
    assert!(
        report.exits.is_empty(),
        "the writes must stay in the kernel: {report}"
    );
    let guest = vm.data(0).unwrap();
    eprintln!("{addr} {width:?} {mode:?}: guest wrote {guest}, device read {total} in {reads} read(s), {} exit(s), {:?}", report.exits.len(), report.elapsed);
    (guest, total, reads)
}

#[test]
fn mmio_counter_mode_counts_every_write() {
    if !kvm_or_skip("mmio_counter_mode_counts_every_write") {
        return;
    }
    let (guest, device, reads) = write_loop(IoEventAddress::Mmio(MMIO), Width::W4, Mode::Counter);
    assert_eq!(guest, N);
    assert_eq!(device, N);
    assert!((1..=N).contains(&reads));
}

#[test]
fn mmio_semaphore_mode_reads_ones() {
    if !kvm_or_skip("mmio_semaphore_mode_reads_ones") {
        return;
    }
    let (guest, device, reads) =
        write_loop(IoEventAddress::Mmio(MMIO), Width::Any, Mode::Semaphore);
    assert_eq!(guest, N);
    assert_eq!(device, N);
    assert_eq!(reads, N, "one read per write in semaphore mode");
}

#[test]
fn pio_counter_mode_counts_every_write() {
    if !kvm_or_skip("pio_counter_mode_counts_every_write") {
        return;
    }
    let (guest, device, _) = write_loop(IoEventAddress::Pio(PORT.into()), Width::W1, Mode::Counter);
    assert_eq!(guest, N);
    assert_eq!(device, N);
}

#[test]
fn pio_semaphore_mode_reads_ones() {
    if !kvm_or_skip("pio_semaphore_mode_reads_ones") {
        return;
    }
    let (guest, device, reads) =
        write_loop(IoEventAddress::Pio(PORT.into()), Width::W2, Mode::Semaphore);
    assert_eq!(guest, N);
    assert_eq!(device, N);
    assert_eq!(reads, N);
}

/// virtio-mmio QueueNotify: four registrations on one register, datamatch = queue 0..3.
#[test]
fn datamatch_routes_each_value_to_its_notifier() {
    if !kvm_or_skip("datamatch_routes_each_value_to_its_notifier") {
        return;
    }
    const NOTIFY: u64 = MMIO + 0x50;
    const ROUNDS: u64 = 1000;
    // Per round: queue 0 once, 1 twice, 2 three times, 3 four times, and 4 (unregistered) once.
    const SEQUENCE: [u64; 11] = [0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4];

    let mut vm = TinyVm::new().unwrap();
    let queues: Vec<Notifier> = (0..4)
        .map(|_| Notifier::new(Mode::Counter).unwrap())
        .collect();
    let _regs: Vec<IoEvent> = queues
        .iter()
        .enumerate()
        .map(|(q, n)| {
            IoEvent::register(
                vm.vm(),
                WriteMatch::mmio(NOTIFY)
                    .width(Width::W4)
                    .datamatch(q as u64),
                n,
            )
            .unwrap()
        })
        .collect();

    let mut p = GuestProgram::new().unwrap();
    p.repeat(ROUNDS, |p| {
        for value in SEQUENCE {
            emit_write(p, IoEventAddress::Mmio(NOTIFY), Width::W4, value);
            p.count(value as usize)?;
        }
        Ok(())
    })
    .unwrap();
    p.exit().unwrap();
    let report = vm.run(p, TIMEOUT).unwrap().done().unwrap();

    for (q, n) in queues.iter().enumerate() {
        let expected = ROUNDS * (q as u64 + 1);
        assert_eq!(vm.data(q).unwrap(), expected, "guest writes of {q}");
        assert_eq!(n.read().unwrap(), expected, "notifier of queue {q}");
    }
    let unmatched = report.count(|e| {
        matches!(
            e,
            GuestExit::MmioWrite {
                addr: NOTIFY,
                data: 4,
                len: 4
            }
        )
    });
    assert_eq!(unmatched as u64, vm.data(4).unwrap());
    assert_eq!(
        unmatched as u64, ROUNDS,
        "value 4 has no registration: it exits"
    );
    assert_eq!(report.exits.len(), unmatched, "no other exit: {report}");
}

/// 1-, 2-, 4- and 8-byte writes each hit only the registration of their width.
#[test]
fn width_selects_the_registration() {
    if !kvm_or_skip("width_selects_the_registration") {
        return;
    }
    const SIZED: u64 = MMIO + 0x1000; // one registration per width, no datamatch
    const ANY: u64 = MMIO + 0x2000; // one any-width registration
    const ONLY4: u64 = MMIO + 0x3000; // only a 4-byte registration
    let widths = [Width::W1, Width::W2, Width::W4, Width::W8];
    let times = |w: Width| 100 * u64::from(w.len()); // 100, 200, 400, 800 writes

    let mut vm = TinyVm::new().unwrap();
    let sized: Vec<Notifier> = widths
        .iter()
        .map(|_| Notifier::new(Mode::Counter).unwrap())
        .collect();
    let mut regs: Vec<IoEvent> = widths
        .iter()
        .zip(&sized)
        .map(|(&w, n)| IoEvent::register(vm.vm(), WriteMatch::mmio(SIZED).width(w), n).unwrap())
        .collect();
    let any = Notifier::new(Mode::Counter).unwrap();
    regs.push(IoEvent::register(vm.vm(), WriteMatch::mmio(ANY), &any).unwrap());
    let only4 = Notifier::new(Mode::Counter).unwrap();
    regs.push(
        IoEvent::register(vm.vm(), WriteMatch::mmio(ONLY4).width(Width::W4), &only4).unwrap(),
    );
    // Port I/O: widths 1, 2 and 4; 8 is refused before KVM is asked.
    let ports: Vec<Notifier> = widths[..3]
        .iter()
        .map(|_| Notifier::new(Mode::Counter).unwrap())
        .collect();
    for (&w, n) in widths.iter().zip(&ports) {
        regs.push(IoEvent::register(vm.vm(), WriteMatch::pio(PORT.into()).width(w), n).unwrap());
    }
    let refused = IoEvent::register(vm.vm(), WriteMatch::pio(PORT.into()).width(Width::W8), &any);
    assert!(
        matches!(
            refused,
            Err(Error::PioWidth {
                addr: IoEventAddress::Pio(0x510)
            })
        ),
        "{refused:?}"
    );

    let mut p = GuestProgram::new().unwrap();
    for &w in &widths {
        p.repeat(times(w), |p| {
            emit_write(p, IoEventAddress::Mmio(SIZED), w, 0x1234);
            emit_write(p, IoEventAddress::Mmio(ANY), w, 0x1234);
            Ok(())
        })
        .unwrap();
    }
    for &w in &widths[..3] {
        p.repeat(times(w), |p| {
            emit_write(p, IoEventAddress::Pio(PORT.into()), w, 0x77);
            Ok(())
        })
        .unwrap();
    }
    // A 2-byte write where only a 4-byte registration exists exits to userspace, 5 times.
    p.repeat(5, |p| {
        emit_write(p, IoEventAddress::Mmio(ONLY4), Width::W2, 0x99);
        Ok(())
    })
    .unwrap();
    p.exit().unwrap();
    let report = vm.run(p, TIMEOUT).unwrap().done().unwrap();

    for (&w, n) in widths.iter().zip(&sized) {
        assert_eq!(n.read().unwrap(), times(w), "MMIO {w:?} registration");
    }
    let all: u64 = widths.iter().map(|&w| times(w)).sum();
    assert_eq!(
        any.read().unwrap(),
        all,
        "the any-width registration sees every write"
    );
    for (&w, n) in widths.iter().zip(&ports) {
        assert_eq!(n.read().unwrap(), times(w), "PIO {w:?} registration");
    }
    assert!(
        only4.try_read().unwrap().would_block(),
        "2-byte writes must not match width 4"
    );
    assert_eq!(report.mmio_writes(ONLY4), 5);
    assert_eq!(report.exits.len(), 5, "{report}");
    drop(regs);
}

/// After the guard drops, the same guest write exits to userspace; registering again works.
#[test]
fn dropping_the_guard_unregisters() {
    if !kvm_or_skip("dropping_the_guard_unregisters") {
        return;
    }
    const ADDR: u64 = MMIO + 0x4000;
    const M: u64 = 500;
    let mut vm = TinyVm::new().unwrap();
    let kicks = Notifier::new(Mode::Counter).unwrap();
    let write = WriteMatch::mmio(ADDR).width(Width::W4);
    let reg = IoEvent::register(vm.vm(), write, &kicks).unwrap();

    // Phase 1: registered. Phase 2: after the host drops the guard. Phase 3: registered again.
    let mut p = GuestProgram::new().unwrap();
    for phase in 1..=3u32 {
        p.repeat(M, |p| {
            emit_write(p, IoEventAddress::Mmio(ADDR), Width::W4, 7);
            Ok(())
        })
        .unwrap();
        if phase < 3 {
            p.signal_host(phase).unwrap();
        }
    }
    p.exit().unwrap();

    let slot = Arc::new(Mutex::new(Some(reg)));
    let (vm_fd, kicks2) = (vm.vm().clone(), kicks.try_clone().unwrap());
    let seen_by_phase = Arc::new(Mutex::new(vec![0u64; 4]));
    let (slot2, seen2) = (slot.clone(), seen_by_phase.clone());
    let mut phase = 1usize;
    let run = vm
        .start(p, move |e: &GuestExit, _: &mut [u8]| {
            if let GuestExit::PioWrite {
                port: layout::HOST_PORT,
                data,
                ..
            } = *e
            {
                // Record what the notifier saw in the phase that just ended.
                seen2.lock().unwrap()[phase] = kicks2.try_read().unwrap().done().unwrap_or(0);
                phase = data as usize + 1;
                let mut slot = slot2.lock().unwrap();
                if data == 1 {
                    drop(slot.take());
                } else {
                    *slot = Some(IoEvent::register(&vm_fd, write, &kicks2).unwrap());
                }
            }
        })
        .unwrap();
    let report = run.wait(TIMEOUT).done().unwrap();
    let seen = seen_by_phase.lock().unwrap().clone();
    assert_eq!(seen[1], M, "phase 1: registered");
    assert_eq!(seen[2], 0, "phase 2: unregistered, nothing counted");
    assert_eq!(
        report.mmio_writes(ADDR) as u64,
        M,
        "phase 2 writes exit: {report}"
    );
    assert_eq!(kicks.read().unwrap(), M, "phase 3: registered again");
    assert!(slot.lock().unwrap().is_some());
}

/// An overlapping registration is refused by KVM's own rule, with a typed error.
#[test]
fn overlap_is_a_typed_error() {
    if !kvm_or_skip("overlap_is_a_typed_error") {
        return;
    }
    let vm = TinyVm::new().unwrap();
    let a = Notifier::new(Mode::Counter).unwrap();
    let b = Notifier::new(Mode::Counter).unwrap();
    let w4 = WriteMatch::mmio(MMIO).width(Width::W4);
    let _first = IoEvent::register(vm.vm(), w4.datamatch(1), &a).unwrap();
    // Same width, one side without datamatch: overlaps.
    let e = IoEvent::register(vm.vm(), w4, &b).unwrap_err();
    assert!(
        matches!(
            e,
            Error::IoEventExists {
                addr: IoEventAddress::Mmio(MMIO)
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("0xd0000000"), "{e}");
    // Same width, same datamatch: overlaps.
    assert!(matches!(
        IoEvent::register(vm.vm(), w4.datamatch(1), &b),
        Err(Error::IoEventExists { .. })
    ));
    // Any width against anything at the address: overlaps.
    assert!(matches!(
        IoEvent::register(vm.vm(), WriteMatch::mmio(MMIO), &b),
        Err(Error::IoEventExists { .. })
    ));
    // Another value, or another width with the same value: fine.
    let _v2 = IoEvent::register(vm.vm(), w4.datamatch(2), &b).unwrap();
    let _w2 = IoEvent::register(
        vm.vm(),
        WriteMatch::mmio(MMIO).width(Width::W2).datamatch(1),
        &b,
    )
    .unwrap();
}
