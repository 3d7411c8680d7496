//! Bad input against a real VM: each refusal is a typed error that names what was wrong, and
//! leaves nothing registered behind.

use std::sync::Arc;

use vm_notify::fallback::{Fallback, Placement, Policy};
use vm_notify::kvm::{IoEventAddress, MsiMessage, GSI_LIMIT};
use vm_notify::Vm;

/// KVM's route table size (`KVM_MAX_IRQ_ROUTES`): as many entries as there are GSIs.
const ROUTE_TABLE_LIMIT: usize = GSI_LIMIT as usize;
use vm_notify::{Capability, Error, Mode, Notifier, Width, WriteMatch};
use vm_notify_testkit::{kvm_test, TinyVm};

fn notifier() -> Notifier {
    Notifier::new(Mode::Counter).unwrap()
}

#[test]
fn invalid_matches_are_refused_before_kvm() {
    kvm_test!();
    let vm = TinyVm::new().unwrap();
    let n = notifier();
    type Expect = fn(&Error) -> bool;
    let cases: [(WriteMatch, Expect); 6] = [
        (WriteMatch::mmio(0x1000).datamatch(1), |e| {
            matches!(
                e,
                Error::DatamatchWithoutWidth {
                    addr: IoEventAddress::Mmio(0x1000)
                }
            )
        }),
        (
            WriteMatch::mmio(0x1000).width(Width::W1).datamatch(0x1ff),
            |e| {
                matches!(
                    e,
                    Error::DatamatchTooWide {
                        value: 0x1ff,
                        width: 1,
                        ..
                    }
                )
            },
        ),
        (WriteMatch::pio(0x10000), |e| {
            matches!(
                e,
                Error::PortOutOfRange {
                    addr: IoEventAddress::Pio(0x10000)
                }
            )
        }),
        (WriteMatch::pio(0x60).width(Width::W8), |e| {
            matches!(
                e,
                Error::PioWidth {
                    addr: IoEventAddress::Pio(0x60)
                }
            )
        }),
        (WriteMatch::mmio(u64::MAX - 1).width(Width::W2), |e| {
            matches!(e, Error::AddressWraps { width: 2, .. })
        }),
        (WriteMatch::pio(0xfffe).width(Width::W4), |e| {
            matches!(
                e,
                Error::AddressWraps {
                    addr: IoEventAddress::Pio(0xfffe),
                    width: 4
                }
            )
        }),
    ];
    for (m, expect) in cases {
        let e = vm.notify().ioevent(m, &n).unwrap_err();
        assert!(expect(&e), "{m:?}: {e:?}");
        // The message names the address at fault.
        let at = format!("{:#x}", m.address().raw());
        assert!(e.to_string().contains(&at), "{m:?}: {e}");
        // The refused match can be registered nowhere: a valid one at the same address works.
        let ok = WriteMatch::at(m.address()).width(Width::W1);
        if ok.validate().is_ok() {
            drop(vm.notify().ioevent(ok, &n).unwrap());
        }
    }
    // What validation lets through, KVM takes: the last byte of MMIO space, the last port.
    for m in [
        WriteMatch::mmio(u64::MAX - 1).width(Width::W1),
        WriteMatch::pio(0xffff).width(Width::W1),
        WriteMatch::pio(0xfffc).width(Width::W4),
    ] {
        drop(vm.notify().ioevent(m, &n).unwrap());
    }
}

/// Roots made with `Vm::with_policy` share the VM's one exit dispatcher: an overlap between
/// them is refused, as within one root, so the one dispatcher the vCPU loop consults takes every
/// userspace registration.
#[test]
fn roots_of_one_vm_refuse_each_others_overlaps() {
    kvm_test!();
    let vm = TinyVm::new().unwrap();
    let (a, b) = (
        vm.notify().with_policy(Policy::Userspace),
        vm.notify().with_policy(Policy::Userspace),
    );
    let at = WriteMatch::mmio(0xd000_0050).width(Width::W4);
    let _first = a.ioevent(at, &notifier()).unwrap();
    assert!(matches!(
        b.ioevent(at, &notifier()),
        Err(Error::IoEventExists { .. })
    ));
    // The write reaches the first registration through the root's own dispatcher.
    let kicks = notifier();
    let _second = b
        .ioevent(WriteMatch::mmio(0xd000_0060).width(Width::W4), &kicks)
        .unwrap();
    assert!(vm
        .notify()
        .dispatcher()
        .mmio_write(0xd000_0060, &0u32.to_le_bytes())
        .unwrap());
    assert_eq!(kicks.read().unwrap(), 1);
}

#[test]
fn router_without_irqchip_is_refused() {
    kvm_test!();
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = Arc::new(kvm.create_vm().unwrap());
    let e = Vm::new(vm, Policy::Kernel).unwrap_err();
    assert!(
        matches!(e, Error::MissingCapability(Capability::Irqchip)),
        "{e:?}"
    );
    assert!(e.to_string().contains("irqchip"), "{e}");
}

/// The split irqchip on a VM that already has the in-kernel one is KVM's EEXIST, typed. On a
/// split-irqchip VM the legacy pins are the userspace IOAPIC's: the root serves irqfds on them
/// through it, while a kernel irqfd bound straight on the router, a backend without the IOAPIC,
/// or a route change on a pin is refused with `IoapicPin` before KVM is asked.
#[test]
fn split_irqchip_refusals_are_typed() {
    kvm_test!();
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = Arc::new(kvm.create_vm().unwrap());
    vm.create_irq_chip().unwrap();
    let e = vm_notify::Vm::with_split_irqchip(vm, Policy::Kernel).unwrap_err();
    assert!(
        matches!(&e, Error::SplitIrqchip { source } if source.raw_os_error() == Some(libc::EEXIST)),
        "{e:?}"
    );
    assert!(e.to_string().contains("KVM_CAP_SPLIT_IRQCHIP"), "{e}");

    let split = TinyVm::with_split_irqchip(1).unwrap();
    let router = split.router();
    let auto = split.notify().with_policy(Policy::Auto);
    for pin in [4, 10, 23] {
        let level = split.notify().level_irqfd(pin).unwrap();
        assert_eq!(
            level.placement(),
            &Placement::Userspace(Fallback::SplitIrqchip)
        );
        let pinned = |e: Error| matches!(e, Error::IoapicPin { gsi } if gsi == pin);
        // Every root of the VM serves the pins through its IOAPIC, whatever its policy.
        assert_eq!(
            auto.irqfd(pin).unwrap().placement(),
            &Placement::Userspace(Fallback::SplitIrqchip)
        );
        assert!(pinned(
            router.set_msi(pin, MsiMessage::x86(0, 0x40)).unwrap_err()
        ));
        assert!(pinned(router.remove(pin).unwrap_err()));
    }
    // Above the pins, MSI routes work as on the in-kernel irqchip.
    let gsi = split.router().route_msi(MsiMessage::x86(0, 0x40)).unwrap();
    assert!(gsi >= 24);
    assert_eq!(
        split.notify().irqfd(gsi).unwrap().placement(),
        &Placement::Kernel
    );
}

#[test]
fn unknown_and_out_of_range_gsis_are_refused() {
    kvm_test!();
    let vm = TinyVm::new().unwrap();
    let router = vm.router();
    let n = notifier();
    // KVM would take GSI 100 silently and drop its interrupts.
    let e = vm.notify().irqfd_with(100, &n).unwrap_err();
    assert!(matches!(e, Error::UnroutedGsi { gsi: 100 }), "{e:?}");
    assert!(e.to_string().contains("GSI 100"), "{e}");
    let e = vm.notify().irqfd_with(5000, &n).unwrap_err();
    assert!(
        matches!(
            e,
            Error::GsiOutOfRange {
                gsi: 5000,
                limit: GSI_LIMIT
            }
        ),
        "{e:?}"
    );
    // A route that is not committed is not a route: a transaction dropped uncommitted leaves
    // nothing behind.
    let gsi = {
        let mut tx = router.transaction();
        tx.add_msi(MsiMessage::x86(0, 0x40)).unwrap()
    };
    assert!(matches!(
        vm.notify().irqfd_with(gsi, &n),
        Err(Error::UnroutedGsi { .. })
    ));
    assert_eq!(router.route_msi(MsiMessage::x86(0, 0x40)).unwrap(), gsi);
    let irq = vm.notify().irqfd_with(gsi, &n).unwrap();
    assert_eq!(router.irqfds(gsi), 1);
    drop(irq);
    assert_eq!(router.irqfds(gsi), 0);
}

#[test]
fn a_notifier_injects_one_gsi_only() {
    kvm_test!();
    let vm = TinyVm::new().unwrap();
    let n = notifier();
    let _first = vm.notify().irqfd_with(4, &n).unwrap();
    let e = vm.notify().irqfd_with(5, &n).unwrap_err();
    assert!(matches!(e, Error::IrqFdBusy { gsi: 5 }), "{e:?}");
    assert_eq!(
        vm.router().irqfds(5),
        0,
        "the refused binding is not counted"
    );
    let e = vm
        .notify()
        .level_irqfd_with(6, &n, &notifier())
        .unwrap_err();
    assert!(matches!(e, Error::IrqFdBusy { gsi: 6 }), "{e:?}");
}

#[test]
fn routes_with_irqfds_cannot_be_removed() {
    kvm_test!();
    let vm = TinyVm::new().unwrap();
    let router = vm.router();
    let gsi = router.route_msi(MsiMessage::x86(0, 0x40)).unwrap();
    let irq = vm.notify().irqfd_with(gsi, &notifier()).unwrap();
    let e = router.remove(gsi).unwrap_err();
    assert!(
        matches!(e, Error::GsiBusy { gsi: g, irqfds: 1 } if g == gsi),
        "{e:?}"
    );
    drop(irq);
    router.remove(gsi).unwrap();
    assert!(router.routes(gsi).is_empty());
    assert!(matches!(router.remove(gsi), Err(Error::UnroutedGsi { .. })));
    // Only MSI routes take a message.
    assert!(matches!(
        router.set_msi(4, MsiMessage::x86(0, 0x41)),
        Err(Error::NotMsiRoute { gsi: 4 })
    ));
}

#[test]
fn full_route_table_is_a_typed_error_before_the_ioctl() {
    kvm_test!();
    let vm = TinyVm::new().unwrap();
    let router = vm.router();
    let defaults = router.entries();
    assert_eq!(defaults, 40, "16 PIC+IOAPIC pairs and 8 IOAPIC-only pins");
    let mut tx = router.transaction();
    let mut added = 0;
    let err = loop {
        match tx.add_msi(MsiMessage::x86(0, 0x40 + (added % 64) as u8)) {
            Ok(_) => added += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(added, ROUTE_TABLE_LIMIT - defaults);
    assert!(
        matches!(err, Error::RouteTableFull { entries, limit } if entries == ROUTE_TABLE_LIMIT + 1 && limit == ROUTE_TABLE_LIMIT),
        "{err:?}"
    );
    // The full table itself is one KVM accepts, in one call.
    assert_eq!(tx.entries(), ROUTE_TABLE_LIMIT);
    tx.commit().unwrap();
    assert_eq!(router.entries(), ROUTE_TABLE_LIMIT);
    // The irqchip's defaults survived the commit: an irqfd on a legacy line still binds.
    let _legacy = vm.notify().irqfd_with(4, &notifier()).unwrap();
}

#[test]
fn gsi_exhaustion_is_a_typed_error() {
    kvm_test!();
    let vm = TinyVm::new().unwrap();
    let router = vm.router();
    // Without the 40 default entries the table has room for more routes than there are GSIs.
    let mut tx = router.transaction();
    for gsi in 0..24 {
        tx.remove(gsi).unwrap();
    }
    let mut added = 0u32;
    let err = loop {
        match tx.add_msi(MsiMessage::x86(0, 0x40)) {
            Ok(_) => added += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(added, GSI_LIMIT - 24);
    assert!(
        matches!(err, Error::GsiExhausted { limit: GSI_LIMIT }),
        "{err:?}"
    );
    drop(tx); // uncommitted: nothing changes
    assert_eq!(router.entries(), 40);
}

/// A kernel without an ioeventfd or irqfd capability, simulated at the backend seam: a
/// `Kernel` backend names the missing capability, and nothing is registered.
#[test]
fn missing_capabilities_are_typed_at_the_backend_seam() {
    kvm_test!();
    use vm_notify::fallback::Policy;
    let vm = TinyVm::new().unwrap();
    let kernel = |cap| vm.notify().with_policy(Policy::Kernel).disable(cap);
    let n = notifier();
    let sized = WriteMatch::mmio(0xd000_0000).width(Width::W4);
    let any = WriteMatch::mmio(0xd000_0000);
    for (cap, m) in [
        (Capability::IoEventFd, sized),
        (Capability::IoEventFdAnyLength, any),
    ] {
        let e = kernel(cap).ioevent(m, &n).unwrap_err();
        assert!(
            matches!(e, Error::MissingCapability(c) if c == cap),
            "{e:?}"
        );
    }
    // The address is free: the refusals registered nothing.
    drop(vm.notify().ioevent(any, &n).unwrap());
    let e = kernel(Capability::IrqFd).irqfd_with(4, &n).unwrap_err();
    assert!(
        matches!(e, Error::MissingCapability(Capability::IrqFd)),
        "{e:?}"
    );
    let e = kernel(Capability::IrqFdResample)
        .level_irqfd_with(10, &n, &notifier())
        .unwrap_err();
    assert!(
        matches!(e, Error::MissingCapability(Capability::IrqFdResample)),
        "{e:?}"
    );
    assert_eq!(vm.router().irqfds(4), 0);
    assert_eq!(vm.router().irqfds(10), 0);
}

#[test]
fn set_msi_on_an_irqchip_route_is_refused() {
    kvm_test!();
    let vm = TinyVm::new().unwrap();
    let before = vm.router().routes(4);
    let e = vm
        .router()
        .set_msi(4, MsiMessage::x86(0, 0x40))
        .unwrap_err();
    assert!(matches!(e, Error::NotMsiRoute { gsi: 4 }), "{e:?}");
    assert_eq!(vm.router().routes(4), before);
}

#[test]
fn a_vector_past_the_table_is_refused() {
    kvm_test!();
    let vm = TinyVm::new().unwrap();
    let v = vm.notify().msix(2).unwrap();
    for r in [
        v.trigger(2),
        v.set_masked(7, false),
        v.set_message(2, MsiMessage::x86(0, 0x40)),
    ] {
        assert!(
            matches!(r, Err(Error::MsixVectorIndex { index, count: 2 }) if index >= 2),
            "{r:?}"
        );
    }
}

const FD_CHILD: &str = "VM_NOTIFY_FD_EXHAUSTION_CHILD";

/// The lowest descriptor number not in use: with the soft limit set to it, the next descriptor
/// cannot be made.
fn lowest_free_fd() -> u64 {
    // SAFETY: dup returns the lowest free descriptor (checked), closed again at once.
    let fd = unsafe { libc::dup(0) };
    assert!(fd >= 0);
    // SAFETY: `fd` was just made here and nothing else uses it.
    unsafe { libc::close(fd) };
    fd as u64
}

fn set_fd_limit(soft: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one valid struct; only this (child) process
    // is affected.
    let ok = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && {
            lim.rlim_cur = soft;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0
        }
    };
    assert!(ok, "setrlimit");
}

/// Runs in a child process (this test binary again): with no descriptor left, each registration
/// kind fails with `FdExhausted`, and once descriptors are back the same registrations succeed —
/// nothing half-made was left in the kernel or the router.
fn fd_exhaustion_child() {
    use vm_notify::fallback::Policy;

    let vm = TinyVm::new().unwrap();
    let n = notifier();
    let user = vm.notify().with_policy(Policy::Userspace);
    vm.run_injector(&user).unwrap();
    let gsi = vm.router().route_msi(MsiMessage::x86(0, 0x40)).unwrap();
    let vectors = vm.notify().msix(1).unwrap();
    vectors.set_message(0, MsiMessage::x86(0, 0x41)).unwrap();
    let sized = WriteMatch::mmio(0xd000_0000).width(Width::W4);
    let entries = vm.router().entries();
    let saved = {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one valid struct.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
        lim.rlim_cur
    };
    set_fd_limit(lowest_free_fd());
    let results: Vec<(&str, Result<(), Error>)> = vec![
        ("kernel ioeventfd", vm.notify().ioevent(sized, &n).map(drop)),
        ("userspace ioeventfd", user.ioevent(sized, &n).map(drop)),
        ("irqfd", vm.notify().irqfd_with(gsi, &n).map(drop)),
        (
            "level irqfd",
            vm.notify().level_irqfd_with(10, &n, &n).map(drop),
        ),
        ("MSI-X vector unmask", vectors.set_masked(0, false)),
        ("notifier", Notifier::new(Mode::Counter).map(drop)),
    ];
    set_fd_limit(saved);
    // Each either needs no new descriptor (and succeeds) or is refused with FdExhausted.
    for (what, r) in &results {
        println!("fd exhaustion: {what}: {r:?}");
        assert!(
            matches!(r, Ok(()) | Err(Error::FdExhausted { .. })),
            "{what}: {r:?}"
        );
    }
    let refused = results.iter().filter(|(_, r)| r.is_err()).count();
    assert!(refused >= 1);
    // Nothing half-made: every one of them succeeds now.
    drop(vm.notify().ioevent(sized, &n).unwrap());
    drop(user.ioevent(sized, &n).unwrap());
    drop(vm.notify().irqfd_with(gsi, &n).unwrap());
    drop(vm.notify().level_irqfd_with(10, &n, &n).unwrap());
    vectors.set_masked(0, false).unwrap();
    assert_eq!(vm.router().irqfds(gsi), 0);
    assert_eq!(vm.router().irqfds(10), 0);
    assert!(vm.router().entries() >= entries);
    println!(
        "fd exhaustion child: {refused} of {} calls refused with FdExhausted, then all made",
        results.len()
    );
}

#[test]
fn fd_exhaustion_leaves_no_half_made_registration() {
    if std::env::var_os(FD_CHILD).is_some() {
        fd_exhaustion_child();
        return;
    }
    kvm_test!();
    // In a child process, so the limit is lowered for nothing else.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "fd_exhaustion_leaves_no_half_made_registration",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(FD_CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("fd exhaustion child:"), "{stdout}");
    for line in stdout
        .lines()
        .filter_map(|l| l.find("fd exhaustion").map(|i| &l[i..]))
    {
        eprintln!("{line}");
    }
}

/// A transaction holds no lock between calls: on its own thread the router answers, irqfds bind
/// and drop while it is open (each of these hung when a transaction held the router's lock). Two
/// open transactions never allocate the same GSI, and a commit checks its changes again against
/// the table as it is then.
#[test]
fn transactions_never_block_and_recheck_at_commit() {
    kvm_test!();
    let vm = TinyVm::new().unwrap();
    let root = vm.notify().clone();
    let router = root.router().clone();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let routed = router.route_msi(MsiMessage::x86(0, 0x40)).unwrap();
        let mut tx = router.transaction();
        let a = tx.add_msi(MsiMessage::x86(0, 0x41)).unwrap();
        // The same thread, while `tx` is open:
        assert!(router.routes(a).is_empty(), "not committed yet");
        let irq = root.irqfd(routed).unwrap();
        let mut other = router.transaction();
        let b = other.add_msi(MsiMessage::x86(0, 0x42)).unwrap();
        assert_ne!(a, b, "reserved GSIs are not handed out twice");
        other.commit().unwrap();
        drop(irq);
        tx.commit().unwrap();
        assert_eq!(router.routes(a).len(), 1);

        // Checked again at commit: a message change whose route went meanwhile...
        let mut late = router.transaction();
        late.set_msi(b, MsiMessage::x86(0, 0x43)).unwrap();
        router.remove(b).unwrap();
        let e = late.commit().unwrap_err();
        assert!(matches!(e, Error::NotMsiRoute { gsi } if gsi == b), "{e:?}");
        // ...and a removal whose GSI got an irqfd meanwhile.
        let mut removal = router.transaction();
        removal.remove(a).unwrap();
        let irq = root.irqfd(a).unwrap();
        let e = removal.commit().unwrap_err();
        assert!(
            matches!(e, Error::GsiBusy { gsi, irqfds: 1 } if gsi == a),
            "{e:?}"
        );
        assert_eq!(router.routes(a).len(), 1, "a failed commit changes nothing");
        drop(irq);
        // ...and a message change whose GSI was removed and handed to a new route meanwhile:
        // it must not land on the new route.
        let g = router.route_msi(MsiMessage::x86(0, 0x44)).unwrap();
        let mut stale = router.transaction();
        stale.set_msi(g, MsiMessage::x86(0, 0x45)).unwrap();
        router.remove(g).unwrap();
        let reused = router.route_msi(MsiMessage::x86(0, 0x46)).unwrap();
        assert_eq!(reused, g, "the lowest free GSI is handed out again");
        let e = stale.commit().unwrap_err();
        assert!(matches!(e, Error::NotMsiRoute { gsi } if gsi == g), "{e:?}");
        assert_eq!(
            router.routes(g),
            [vm_notify::kvm::Route::Msi(MsiMessage::x86(0, 0x46))]
        );
        // ...nor a removal whose route was removed and its GSI handed to a new route meanwhile
        // (issue 22): the stale removal has nothing left to do, and the new route stays.
        let mut stale_removal = router.transaction();
        stale_removal.remove(g).unwrap();
        router.remove(g).unwrap();
        assert_eq!(router.route_msi(MsiMessage::x86(0, 0x47)).unwrap(), g);
        stale_removal.commit().unwrap();
        assert_eq!(
            router.routes(g),
            [vm_notify::kvm::Route::Msi(MsiMessage::x86(0, 0x47))],
            "a stale removal took the GSI's new route"
        );
        done_tx.send(()).unwrap();
    });
    done_rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the transaction test finished (a hang means a lock was held)");
}
