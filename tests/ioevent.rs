//! Guest writes → notifier, with a real guest: counts, datamatch, widths, unregistration,
//! overlaps — each on the kernel path (ioeventfd) and on the userspace path (exit dispatcher).

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use vm_notify::fallback::{Placement, Policy};
use vm_notify::kvm::IoEventAddress;
use vm_notify::Vm;
use vm_notify::{Attempt, Error, IoEvent, Mode, Notifier, Width, WriteMatch};
use vm_notify_testkit::{kvm_test, layout, GuestExit, GuestProgram, RunReport, TinyVm};

const N: u64 = 100_000;
const TIMEOUT: Duration = Duration::from_secs(120);
const MMIO: u64 = 0xd000_0000;
const PORT: u16 = 0x510;
/// Every test here runs once per path: the device code and the counts must not change.
const KINDS: [Policy; 2] = [Policy::Kernel, Policy::Userspace];

/// One guest write of `width` to `addr` carrying `value` (any-width writes are 8 bytes on MMIO,
/// 4 on ports). Clobbers rax, rdx.
fn emit_write(p: &mut GuestProgram, addr: IoEventAddress, width: Width, value: u64) {
    let bytes = match (width, addr) {
        (Width::Any, IoEventAddress::Mmio(_)) => 8,
        (Width::Any | Width::W8, IoEventAddress::Pio(_)) => 4,
        (w, _) => w.bytes() as usize,
    };
    p.write_to(addr, value, bytes).unwrap();
}

/// A VM and a backend of `kind` on it.
fn setup(kind: Policy) -> (TinyVm, Vm) {
    let vm = TinyVm::new().unwrap();
    let backend = vm.notify().with_policy(kind);
    vm.run_injector(&backend).unwrap();
    (vm, backend)
}

/// The exits that reached userspace and that no registration took, shared with the handler.
type Unhandled = Arc<Mutex<Vec<GuestExit>>>;

/// An exit handler that hands writes to the backend's dispatcher (what a VMM's vCPU loop does)
/// and records the exits nothing took.
fn dispatching(
    backend: &Vm,
) -> (
    impl FnMut(&GuestExit, &mut [u8]) + Send + 'static,
    Unhandled,
) {
    let unhandled = Unhandled::default();
    let (d, u) = (backend.dispatcher().clone(), unhandled.clone());
    let handler = move |e: &GuestExit, _: &mut [u8]| {
        if !e.dispatch(&d).unwrap() {
            u.lock().unwrap().push(*e);
        }
    };
    (handler, unhandled)
}

/// Runs `p` with the dispatching handler; returns the report and the unhandled exits.
fn run(vm: &mut TinyVm, backend: &Vm, p: GuestProgram) -> (RunReport, Vec<GuestExit>) {
    let (handler, unhandled) = dispatching(backend);
    let report = vm.start(p, handler).unwrap().wait(TIMEOUT).done().unwrap();
    let unhandled = unhandled.lock().unwrap().clone();
    (report, unhandled)
}

/// Checks where the registrations of `kind` live and what reached userspace: nothing for the
/// kernel path, exactly the `taken` writes plus the unhandled ones for the userspace path.
fn assert_paths(kind: Policy, regs: &[&IoEvent], report: &RunReport, unhandled: usize, taken: u64) {
    for r in regs {
        match kind {
            Policy::Kernel => assert_eq!(r.placement(), &Placement::Kernel),
            _ => assert!(
                matches!(r.placement(), Placement::Userspace(_)),
                "{:?}",
                r.placement()
            ),
        }
    }
    let expected = match kind {
        Policy::Kernel => unhandled,
        _ => unhandled + taken as usize,
    };
    assert_eq!(report.exits.len(), expected, "{kind:?}: {report}");
}

/// The guest writes `N` times to `addr` while a device thread reads the notifier; returns
/// (guest's own count, device's total, number of reads).
fn write_loop(kind: Policy, addr: IoEventAddress, width: Width, mode: Mode) -> (u64, u64, u64) {
    let (mut vm, backend) = setup(kind);
    let kicks = Notifier::new(mode).unwrap();
    let reg = backend
        .ioevent(WriteMatch::at(addr).width(width), &kicks)
        .unwrap();

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
        assert!(kicks.try_read().unwrap().done().is_none());
        (total, reads)
    });
    let (report, unhandled) = run(&mut vm, &backend, p);
    let (total, reads) = device.join().unwrap();
    assert!(unhandled.is_empty(), "every write is taken: {unhandled:?}");
    assert_paths(kind, &[&reg], &report, 0, N);
    let guest = vm.data(0).unwrap();
    eprintln!(
        "{kind:?} {addr} {width:?} {mode:?}: guest wrote {guest}, device read {total} in {reads} read(s), {} exit(s), {:?}",
        report.exits.len(),
        report.elapsed
    );
    (guest, total, reads)
}

#[test]
fn mmio_counter_mode_counts_every_write() {
    kvm_test!();
    for kind in KINDS {
        let (guest, device, reads) =
            write_loop(kind, IoEventAddress::Mmio(MMIO), Width::W4, Mode::Counter);
        assert_eq!(guest, N);
        assert_eq!(device, N);
        assert!((1..=N).contains(&reads));
    }
}

#[test]
fn mmio_semaphore_mode_reads_ones() {
    kvm_test!();
    for kind in KINDS {
        let (guest, device, reads) = write_loop(
            kind,
            IoEventAddress::Mmio(MMIO),
            Width::Any,
            Mode::Semaphore,
        );
        assert_eq!(guest, N);
        assert_eq!(device, N);
        assert_eq!(reads, N, "one read per write in semaphore mode");
    }
}

#[test]
fn pio_counter_mode_counts_every_write() {
    kvm_test!();
    for kind in KINDS {
        let (guest, device, _) = write_loop(
            kind,
            IoEventAddress::Pio(PORT.into()),
            Width::W1,
            Mode::Counter,
        );
        assert_eq!(guest, N);
        assert_eq!(device, N);
    }
}

#[test]
fn pio_semaphore_mode_reads_ones() {
    kvm_test!();
    for kind in KINDS {
        let (guest, device, reads) = write_loop(
            kind,
            IoEventAddress::Pio(PORT.into()),
            Width::W2,
            Mode::Semaphore,
        );
        assert_eq!(guest, N);
        assert_eq!(device, N);
        assert_eq!(reads, N);
    }
}

/// virtio-mmio QueueNotify: four registrations on one register, datamatch = queue 0..3.
#[test]
fn datamatch_routes_each_value_to_its_notifier() {
    kvm_test!();
    const NOTIFY: u64 = MMIO + 0x50;
    const ROUNDS: u64 = 1000;
    // Per round: queue 0 once, 1 twice, 2 three times, 3 four times, and 4 (unregistered) once.
    const SEQUENCE: [u64; 11] = [0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4];

    for kind in KINDS {
        let (mut vm, backend) = setup(kind);
        let queues: Vec<Notifier> = (0..4)
            .map(|_| Notifier::new(Mode::Counter).unwrap())
            .collect();
        let regs: Vec<IoEvent> = queues
            .iter()
            .enumerate()
            .map(|(q, n)| {
                let m = WriteMatch::mmio(NOTIFY)
                    .width(Width::W4)
                    .datamatch(q as u64);
                backend.ioevent(m, n).unwrap()
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
        let (report, unhandled) = run(&mut vm, &backend, p);

        let mut taken = 0;
        for (q, n) in queues.iter().enumerate() {
            let expected = ROUNDS * (q as u64 + 1);
            assert_eq!(vm.data(q).unwrap(), expected, "guest writes of {q}");
            assert_eq!(
                n.read().unwrap(),
                expected,
                "{kind:?}: notifier of queue {q}"
            );
            taken += expected;
        }
        let unmatched = GuestExit::MmioWrite {
            addr: NOTIFY,
            data: 4,
            len: 4,
        };
        assert_eq!(unhandled.len() as u64, vm.data(4).unwrap());
        assert_eq!(
            unhandled.len() as u64,
            ROUNDS,
            "value 4 has no registration"
        );
        assert!(unhandled.iter().all(|e| *e == unmatched), "{unhandled:?}");
        let regs: Vec<&IoEvent> = regs.iter().collect();
        assert_paths(kind, &regs, &report, unhandled.len(), taken);
    }
}

/// 1-, 2-, 4- and 8-byte writes each hit only the registration of their width.
#[test]
fn width_selects_the_registration() {
    kvm_test!();
    const SIZED: u64 = MMIO + 0x1000; // one registration per width, no datamatch
    const ANY: u64 = MMIO + 0x2000; // one any-width registration
    const ONLY4: u64 = MMIO + 0x3000; // only a 4-byte registration
    let widths = [Width::W1, Width::W2, Width::W4, Width::W8];
    let times = |w: Width| 100 * u64::from(w.bytes()); // 100, 200, 400, 800 writes

    for kind in KINDS {
        let (mut vm, backend) = setup(kind);
        let counter = || Notifier::new(Mode::Counter).unwrap();
        let sized: Vec<Notifier> = widths.iter().map(|_| counter()).collect();
        let mut regs: Vec<IoEvent> = widths
            .iter()
            .zip(&sized)
            .map(|(&w, n)| {
                backend
                    .ioevent(WriteMatch::mmio(SIZED).width(w), n)
                    .unwrap()
            })
            .collect();
        let any = counter();
        regs.push(backend.ioevent(WriteMatch::mmio(ANY), &any).unwrap());
        let only4 = counter();
        regs.push(
            backend
                .ioevent(WriteMatch::mmio(ONLY4).width(Width::W4), &only4)
                .unwrap(),
        );
        // Port I/O: widths 1, 2 and 4; 8 is refused before KVM is asked.
        let ports: Vec<Notifier> = widths[..3].iter().map(|_| counter()).collect();
        for (&w, n) in widths.iter().zip(&ports) {
            regs.push(
                backend
                    .ioevent(WriteMatch::pio(PORT.into()).width(w), n)
                    .unwrap(),
            );
        }
        let refused = backend.ioevent(WriteMatch::pio(PORT.into()).width(Width::W8), &any);
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
        // A 2-byte write where only a 4-byte registration exists is not taken, 5 times.
        p.repeat(5, |p| {
            emit_write(p, IoEventAddress::Mmio(ONLY4), Width::W2, 0x99);
            Ok(())
        })
        .unwrap();
        p.exit().unwrap();
        let (report, unhandled) = run(&mut vm, &backend, p);

        for (&w, n) in widths.iter().zip(&sized) {
            assert_eq!(
                n.read().unwrap(),
                times(w),
                "{kind:?}: MMIO {w:?} registration"
            );
        }
        let all: u64 = widths.iter().map(|&w| times(w)).sum();
        assert_eq!(
            any.read().unwrap(),
            all,
            "the any-width registration sees every write"
        );
        let mut pio_all = 0;
        for (&w, n) in widths.iter().zip(&ports) {
            assert_eq!(
                n.read().unwrap(),
                times(w),
                "{kind:?}: PIO {w:?} registration"
            );
            pio_all += times(w);
        }
        assert!(
            only4.try_read().unwrap().done().is_none(),
            "2-byte writes must not match width 4"
        );
        assert_eq!(unhandled.len(), 5, "{unhandled:?}");
        assert!(unhandled.iter().all(|e| matches!(
            e,
            GuestExit::MmioWrite {
                addr: ONLY4,
                len: 2,
                ..
            }
        )));
        let refs: Vec<&IoEvent> = regs.iter().collect();
        assert_paths(kind, &refs, &report, 5, 2 * all + pio_all);
    }
}

/// After the guard drops, the same guest write is no longer taken; registering again works.
#[test]
fn dropping_the_guard_unregisters() {
    kvm_test!();
    const ADDR: u64 = MMIO + 0x4000;
    const M: u64 = 500;
    for kind in KINDS {
        let (mut vm, backend) = setup(kind);
        let kicks = Notifier::new(Mode::Counter).unwrap();
        let write = WriteMatch::mmio(ADDR).width(Width::W4);
        let reg = backend.ioevent(write, &kicks).unwrap();

        // Phase 1: registered. Phase 2: after the host drops the guard. Phase 3: registered
        // again.
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
        let kicks2 = kicks.dup().unwrap();
        let seen_by_phase = Arc::new(Mutex::new(vec![0u64; 4]));
        let (slot2, seen2, backend2) = (slot.clone(), seen_by_phase.clone(), backend.clone());
        let (mut dispatch, unhandled) = dispatching(&backend);
        let mut phase = 1usize;
        let run = vm
            .start(p, move |e: &GuestExit, reply: &mut [u8]| {
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
                        *slot = Some(backend2.ioevent(write, &kicks2).unwrap());
                    }
                } else {
                    dispatch(e, reply);
                }
            })
            .unwrap();
        run.wait(TIMEOUT).done().unwrap();
        let seen = seen_by_phase.lock().unwrap().clone();
        assert_eq!(seen[1], M, "{kind:?} phase 1: registered");
        assert_eq!(
            seen[2], 0,
            "{kind:?} phase 2: unregistered, nothing counted"
        );
        let unhandled = unhandled.lock().unwrap();
        assert_eq!(
            unhandled.len() as u64,
            M,
            "{kind:?}: phase 2 writes are not taken"
        );
        assert_eq!(
            kicks.read().unwrap(),
            M,
            "{kind:?} phase 3: registered again"
        );
        assert!(slot.lock().unwrap().is_some());
    }
}

/// An overlapping registration is refused by KVM's own rule, with a typed error, on both paths.
#[test]
fn overlap_is_a_typed_error() {
    kvm_test!();
    for kind in KINDS {
        let (_vm, backend) = setup(kind);
        let a = Notifier::new(Mode::Counter).unwrap();
        let b = Notifier::new(Mode::Counter).unwrap();
        let w4 = WriteMatch::mmio(MMIO).width(Width::W4);
        let _first = backend.ioevent(w4.datamatch(1), &a).unwrap();
        // Same width, one side without datamatch: overlaps.
        let e = backend.ioevent(w4, &b).unwrap_err();
        assert!(
            matches!(
                e,
                Error::IoEventExists {
                    addr: IoEventAddress::Mmio(MMIO)
                }
            ),
            "{kind:?}: {e:?}"
        );
        assert!(e.to_string().contains("0xd0000000"), "{e}");
        // Same width, same datamatch: overlaps.
        assert!(matches!(
            backend.ioevent(w4.datamatch(1), &b),
            Err(Error::IoEventExists { .. })
        ));
        // Any width against anything at the address: overlaps.
        assert!(matches!(
            backend.ioevent(WriteMatch::mmio(MMIO), &b),
            Err(Error::IoEventExists { .. })
        ));
        // Another value, or another width with the same value: fine.
        let _v2 = backend.ioevent(w4.datamatch(2), &b).unwrap();
        let _w2 = backend
            .ioevent(WriteMatch::mmio(MMIO).width(Width::W2).datamatch(1), &b)
            .unwrap();
    }
}
