//! Automatic choice of path: where the kernel cannot take a registration, the backend serves it in
//! userspace, the guest's writes and the device's interrupts are still counted, and the reason is
//! kept in the registration.

use std::sync::Arc;
use std::time::Duration;

use vm_notify::fallback::{Fallback, Placement, Policy};
use vm_notify::kvm::MsiMessage;
use vm_notify::Vm;
use vm_notify::{Capability, Mode, Notifier, Width, WriteMatch};
use vm_notify_testkit::{kvm_test, Eoi, GuestExit, GuestProgram, TinyVm};

const TIMEOUT: Duration = Duration::from_secs(60);
const NOTIFY: u64 = 0xd000_0050;

/// Runs `p`, handing every exit to `backend`'s dispatcher; returns the exits nothing took.
fn run(vm: &mut TinyVm, backend: &Vm, p: GuestProgram) -> usize {
    let untaken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (d, u) = (backend.dispatcher().clone(), untaken.clone());
    vm.start(p, move |e: &GuestExit, _: &mut [u8]| {
        if !e.dispatch(&d).unwrap() {
            u.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    })
    .unwrap()
    .wait(TIMEOUT)
    .done()
    .unwrap();
    untaken.load(std::sync::atomic::Ordering::Relaxed)
}

#[test]
fn missing_ioeventfd_capability_falls_back_and_counts() {
    kvm_test!();
    let mut vm = TinyVm::new().unwrap();
    let backend = vm
        .notify()
        .with_policy(Policy::Auto)
        .disable(Capability::IoEventFd);
    vm.run_injector(&backend).unwrap();
    let kicks = Notifier::new(Mode::Counter).unwrap();
    let reg = backend
        .ioevent(WriteMatch::mmio(NOTIFY).width(Width::W4), &kicks)
        .unwrap();
    assert_eq!(
        reg.placement(),
        &Placement::Userspace(Fallback::Disabled(Capability::IoEventFd))
    );
    eprintln!("registration path: {}", reg.placement());
    let mut p = GuestProgram::new().unwrap();
    p.repeat(500, |p| p.mmio_write(NOTIFY, 0, 4)).unwrap();
    p.exit().unwrap();
    assert_eq!(run(&mut vm, &backend, p), 0);
    assert_eq!(kicks.read().unwrap(), 500);
}

/// The kernel refuses a registration the backend did not cause: an overlapping ioeventfd made
/// outside it (EEXIST). The fallback serves the writes the kernel's own registration does not
/// take; the refusal is the recorded reason.
#[test]
fn kernel_refusal_falls_back_with_the_reason() {
    kvm_test!();
    let mut vm = TinyVm::new().unwrap();
    let outside = Notifier::new(Mode::Counter).unwrap();
    let _outside = vm
        .notify()
        .ioevent(
            WriteMatch::mmio(NOTIFY).width(Width::W4).datamatch(1),
            &outside,
        )
        .unwrap();
    let backend = vm.notify().with_policy(Policy::Auto);
    vm.run_injector(&backend).unwrap();
    let kicks = Notifier::new(Mode::Counter).unwrap();
    let reg = backend
        .ioevent(WriteMatch::mmio(NOTIFY).width(Width::W4), &kicks)
        .unwrap();
    match reg.placement() {
        Placement::Userspace(Fallback::KernelRefused(why)) => {
            assert!(why.contains("EEXIST"), "{why}")
        }
        other => panic!("expected a kernel refusal, got {other:?}"),
    }
    eprintln!("registration path: {}", reg.placement());
    // Values 1 go to the kernel's registration; 2 and 3 exit and reach the fallback.
    let mut p = GuestProgram::new().unwrap();
    p.repeat(100, |p| {
        for v in [1, 2, 3] {
            p.mmio_write(NOTIFY, v, 4)?;
        }
        Ok(())
    })
    .unwrap();
    p.exit().unwrap();
    assert_eq!(run(&mut vm, &backend, p), 0);
    assert_eq!(outside.read().unwrap(), 100);
    assert_eq!(kicks.read().unwrap(), 200);
}

#[test]
fn missing_irqfd_capability_falls_back_to_the_injector() {
    kvm_test!();
    const ROUNDS: u64 = 1000;
    let mut vm = TinyVm::new().unwrap();
    let backend = vm
        .notify()
        .with_policy(Policy::Auto)
        .disable(Capability::IrqFd);
    vm.run_injector(&backend).unwrap();
    let gsi = vm.router().route_msi(MsiMessage::x86(0, 0x45)).unwrap();
    let irq = backend.irqfd(gsi).unwrap();
    assert_eq!(
        irq.placement(),
        &Placement::Userspace(Fallback::Disabled(Capability::IrqFd))
    );
    // The guest kicks through a kernel ioeventfd; the device answers through the injector.
    let kicks = Notifier::new(Mode::Counter).unwrap();
    let _kick = backend
        .ioevent(WriteMatch::mmio(NOTIFY).width(Width::W4), &kicks)
        .unwrap();
    let mut p = GuestProgram::new().unwrap();
    p.enable_lapic().unwrap();
    p.on_interrupt(0x45, Eoi::Lapic);
    p.repeat(ROUNDS, |p| p.kick_and_wait(NOTIFY, 0, None))
        .unwrap();
    p.exit().unwrap();
    let device = std::thread::spawn(move || {
        let mut raised = 0;
        while raised < ROUNDS {
            kicks.read().unwrap();
            irq.trigger().unwrap();
            raised += 1;
        }
        raised
    });
    assert_eq!(run(&mut vm, &backend, p), 0);
    assert_eq!(device.join().unwrap(), ROUNDS);
    assert_eq!(vm.irq_count(0x45).unwrap(), ROUNDS);
}

/// The exit dispatcher routed as a VMM with an `IoManager` routes every exit: an `IoRegion`
/// over the ranges of the userspace registrations, MMIO and port I/O. Every guest write the
/// registrations match reaches its notifier through vm-device's dispatch, exactly; a write
/// outside every range finds no device and stays the VMM's.
#[test]
fn the_dispatcher_serves_exits_from_an_io_manager() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
    use vm_device::device_manager::{IoManager, MmioManager, PioManager};
    use vm_notify::io::IoRegion;

    const PORT: u16 = 0x510;
    const ELSEWHERE: u64 = 0xd000_1000;
    kvm_test!();
    let mut vm = TinyVm::new().unwrap();
    let backend = vm.notify().with_policy(Policy::Userspace);
    let (mmio_kicks, pio_kicks) = (
        Notifier::new(Mode::Counter).unwrap(),
        Notifier::new(Mode::Counter).unwrap(),
    );
    let _mmio = backend
        .ioevent(WriteMatch::mmio(NOTIFY).width(Width::W4), &mmio_kicks)
        .unwrap();
    let _pio = backend
        .ioevent(WriteMatch::pio(PORT.into()).width(Width::W2), &pio_kicks)
        .unwrap();
    let region = Arc::new(IoRegion::dispatcher(backend.dispatcher()));
    let mut io = IoManager::new();
    io.register_mmio(
        MmioRange::new(MmioAddress(NOTIFY), 4).unwrap(),
        region.clone(),
    )
    .unwrap();
    io.register_pio(PioRange::new(PioAddress(PORT), 2).unwrap(), region.clone())
        .unwrap();

    let mut p = GuestProgram::new().unwrap();
    p.repeat(500, |p| p.mmio_write(NOTIFY, 0, 4)).unwrap();
    p.repeat(300, |p| p.pio_write(PORT, 7, 2)).unwrap();
    p.repeat(20, |p| p.mmio_write(ELSEWHERE, 0, 4)).unwrap();
    p.exit().unwrap();
    let unrouted = Arc::new(AtomicU64::new(0));
    let u = unrouted.clone();
    vm.start(p, move |e: &GuestExit, _: &mut [u8]| {
        let routed = match *e {
            GuestExit::MmioWrite { addr, data, len } => io
                .mmio_write(MmioAddress(addr), &data.to_le_bytes()[..usize::from(len)])
                .is_ok(),
            GuestExit::PioWrite { port, data, len } => io
                .pio_write(PioAddress(port), &data.to_le_bytes()[..usize::from(len)])
                .is_ok(),
            _ => false,
        };
        if !routed {
            u.fetch_add(1, Ordering::Relaxed);
        }
    })
    .unwrap()
    .wait(TIMEOUT)
    .done()
    .unwrap();
    assert_eq!(mmio_kicks.read().unwrap(), 500);
    assert_eq!(pio_kicks.read().unwrap(), 300);
    assert_eq!(unrouted.load(Ordering::Relaxed), 20);
    assert!(region.take_error().is_none());
    assert_eq!(region.error_count(), 0);
}

/// The injector is the VMM's to run, and a run can follow a stopped one: 100 round trips on each
/// of a spawned thread (stopped and joined), the VMM's own thread running `Injector::run` (then
/// stopped), one-pass `serve_pending` calls when the injector's descriptor is readable, and a
/// thread spawned again. The guest waits for every interrupt, so a run that did not serve would
/// stall it; the counts are exact.
#[test]
fn the_injector_runs_again_after_a_stop_on_every_path() {
    use std::os::fd::AsRawFd;
    kvm_test!();
    const PER_PHASE: u64 = 100;
    const PHASES: u64 = 4;
    let mut vm = TinyVm::new().unwrap();
    let backend = vm.notify().with_policy(Policy::Userspace);
    let injector = backend.injector().unwrap();
    let gsi = vm.router().route_msi(MsiMessage::x86(0, 0x46)).unwrap();
    let irq = backend.irqfd(gsi).unwrap();
    let kicks = Notifier::new(Mode::Counter).unwrap();
    let _kick = vm
        .notify()
        .ioevent(WriteMatch::mmio(NOTIFY).width(Width::W4), &kicks)
        .unwrap();
    let mut p = GuestProgram::new().unwrap();
    p.enable_lapic().unwrap();
    p.on_interrupt(0x46, Eoi::Lapic);
    p.repeat(PER_PHASE * PHASES, |p| p.kick_and_wait(NOTIFY, 0, None))
        .unwrap();
    p.exit().unwrap();
    let device = std::thread::spawn(move || {
        let rounds = |n: u64, after_trigger: &dyn Fn()| {
            for _ in 0..n {
                kicks.read().unwrap();
                irq.trigger().unwrap();
                after_trigger();
            }
        };
        // A spawned thread, stopped and joined.
        let thread = injector.spawn().unwrap();
        rounds(PER_PHASE, &|| {});
        thread.stop().unwrap();
        // The VMM's own thread running the loop, stopped through its handle.
        let own = {
            let injector = injector.clone();
            std::thread::spawn(move || injector.run())
        };
        rounds(PER_PHASE, &|| {});
        injector.stop_handle().stop().unwrap();
        own.join().unwrap().unwrap();
        // One pass each time the injector's descriptor is readable, as from the VMM's epoll.
        rounds(PER_PHASE, &|| {
            let mut pfd = libc::pollfd {
                fd: injector.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the duration of the call.
            let ready = unsafe { libc::poll(&mut pfd, 1, 10_000) };
            assert_eq!(ready, 1, "trigger pending");
            assert_eq!(injector.serve_pending().unwrap(), 1);
        });
        // A thread spawned again.
        let again = injector.spawn().unwrap();
        rounds(PER_PHASE, &|| {});
        drop(again);
    });
    assert_eq!(run(&mut vm, &backend, p), 0);
    device.join().unwrap();
    assert_eq!(vm.irq_count(0x46).unwrap(), PER_PHASE * PHASES);
}
