//! Notification suppression both ways, with real guest code on both sides of the ring: the tiny
//! guest's driver (`GuestProgram::virtq_batches`) and `QueueServer` on the device thread, over a
//! virtio-pci queue (an any-width ioeventfd for kicks, an MSI-X vector for interrupts).
//!
//! 10^5 requests in batches of random depth (1 to 64) per mode — suppression off, the flags,
//! EVENT_IDX — crossing the 16-bit index wrap-around. Every request completes with its
//! descriptor's length and nothing hangs (a lost wake-up on either side would: the timeout
//! catches it); kicks are counted exactly on both sides; interrupts are bounded on both sides by
//! what the guest itself counted (see `check`).

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

mod common;

use common::virtio_rng::device_queue;
use vm_notify::kvm::MsiMessage;
use vm_notify::virtio::{Moderation, PciLayout, QueueServer, ServeStats};
use vm_notify::wait::EventLoop;
use vm_notify_testkit::{
    kvm_test, layout, Eoi, GuestExit, GuestProgram, SplitQueue, Suppression, TinyVm,
};

const TIMEOUT: Duration = Duration::from_secs(600);
const REQUESTS: u64 = 100_000;
const NOTIFY_BASE: u64 = 0xd100_0000;
const VECTOR: u8 = 0x50;
/// The marker vector of the final drain (a lower priority class than `VECTOR`).
const MARKER: u8 = 0x30;
const SIZE: u16 = 64;

/// Batch depths from 1 to 64 adding up to at least `REQUESTS`, from a fixed seed.
fn depths(seed: u64) -> Vec<u8> {
    let mut x = seed;
    let mut out = Vec::new();
    let mut total = 0u64;
    while total < REQUESTS {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let d = (x % u64::from(SIZE)) as u8 + 1;
        out.push(d);
        total += u64::from(d);
    }
    out
}

/// What both sides counted in one run.
#[derive(Debug)]
struct Counts {
    requests: u64,
    batches: u64,
    submitted: u64,
    used_idx: u16,
    mismatches: u64,
    guest_kicks: u64,
    device_kicks: u64,
    sleeps: u64,
    races: u64,
    guest_irqs: u64,
    device: ServeStats,
    moderated: bool,
}

fn run(mode: Suppression, moderation: Option<Moderation>) -> Counts {
    let depths = depths(0x9e37_79b9_7f4a_7c15);
    let requests: u64 = depths.iter().map(|&d| u64::from(d)).sum();
    let mut vm = TinyVm::new().unwrap();
    let root = vm.notify();
    let msix = root.msix(1).unwrap();
    msix.set_message(0, MsiMessage::x86(0, VECTOR)).unwrap();
    msix.set_masked(0, false).unwrap();
    msix.set_enabled(true).unwrap();
    let layout = PciLayout {
        notify_base: NOTIFY_BASE,
        notify_off_multiplier: 4,
        queue_notify_off: vec![0],
    };
    let pci = root.virtio_pci(&layout, &msix).unwrap();
    pci.set_queue_vector(0, 0);
    let q = SplitQueue::new(0, SIZE, &[16, 64, 200, 512]).unwrap();
    q.lay_out(&vm).unwrap();
    q.write_depths(&vm, &depths).unwrap();

    // The device: kicks through an event loop, every wake-up one `serve`.
    let event_idx = matches!(mode, Suppression::EventIdx | Suppression::EventIdxEach);
    let mut server = QueueServer::new(pci.queue(0).unwrap(), device_queue(&q, event_idx));
    server.moderate(moderation).unwrap();
    let events = EventLoop::new().unwrap();
    events.add(0, server.notify().kicks()).unwrap();
    let stop = events.stop_handle();
    let published = Arc::new(Mutex::new(ServeStats::default()));
    let (mem, seen) = (vm.memory().clone(), published.clone());
    let device = thread::spawn(move || {
        let mut kicks = 0;
        events
            .run(|_, count| {
                kicks += count;
                server.serve(&mem, |chain| chain.writable().map(|d| d.len()).sum())?;
                *seen.lock().unwrap() = server.stats();
                Ok(())
            })
            .unwrap();
        (kicks, server.stats())
    });

    let mut p = GuestProgram::new().unwrap();
    p.enable_lapic().unwrap();
    p.on_interrupt(VECTOR, Eoi::Lapic);
    p.virtq_batches(&q, depths.len(), (NOTIFY_BASE, 0, 2), mode)
        .unwrap();
    // The host waits until the device has served everything (and signalled what it would);
    // then the guest takes whatever interrupt is still pending.
    p.signal_host(1).unwrap();
    p.drain_interrupts(MARKER).unwrap();
    p.exit().unwrap();
    vm.start(p, move |e: &GuestExit, _: &mut [u8]| match *e {
        GuestExit::PioWrite {
            port: layout::HOST_PORT,
            ..
        } => {
            let started = Instant::now();
            while published.lock().unwrap().chains < requests {
                assert!(started.elapsed() < TIMEOUT, "the device never finished");
                thread::sleep(Duration::from_millis(1));
            }
        }
        ref other => panic!("unexpected exit {other:?}"),
    })
    .unwrap()
    .wait(TIMEOUT)
    .done()
    .unwrap();
    stop.stop().unwrap();
    let (device_kicks, device) = device.join().unwrap();
    Counts {
        requests,
        batches: depths.len() as u64,
        submitted: q.submitted(&vm).unwrap(),
        used_idx: q.used_idx(&vm).unwrap(),
        mismatches: q.mismatches(&vm).unwrap(),
        guest_kicks: q.kicks(&vm).unwrap(),
        device_kicks,
        sleeps: q.sleeps(&vm).unwrap(),
        races: q.races(&vm).unwrap(),
        guest_irqs: vm.irq_count(VECTOR).unwrap(),
        device,
        moderated: moderation.is_some(),
    }
}

/// The counts both sides must agree on, by mode.
///
/// * Requests: all submitted, all used (the used index matches across the wrap-around), every
///   length right.
/// * Kicks: the guest's kick writes equal the counts the device read from the ioeventfd,
///   exactly. Without suppression one per batch; with it, at most that.
/// * Interrupts: the guest takes interrupts only while asleep, one per sleep, plus at most the
///   one left pending at the end, which the final drain takes. Each guest interrupt came from a
///   device signal; the local APIC merges a signal into one still pending, so the device may
///   have signalled more. How many more, by mode: without suppression the device signals every
///   used buffer; with EVENT_IDX at most once per `used_event` the guest published (once per
///   sleep, or per race); with the flags, only while the guest had them clear.
fn check(mode: Suppression, c: &Counts) {
    eprintln!(
        "{mode:?}{}: {} requests in {} batches; kicks guest {} device {}; interrupts guest {} device {} \
         (suppressed {}, held {}); sleeps {}, races {}, device wake-ups {}, re-checks {}",
        if c.moderated { " with moderation" } else { "" },
        c.requests,
        c.batches,
        c.guest_kicks,
        c.device_kicks,
        c.guest_irqs,
        c.device.interrupts,
        c.device.suppressed,
        c.device.held,
        c.sleeps,
        c.races,
        c.device.wakeups,
        c.device.rechecks
    );
    assert_eq!(c.submitted, c.requests);
    assert_eq!(c.device.chains, c.requests);
    assert_eq!(c.used_idx, c.requests as u16);
    assert!(
        c.requests > 65536,
        "the run must cross the 16-bit wrap-around"
    );
    assert_eq!(c.mismatches, 0, "used lengths differ from the descriptors'");
    assert_eq!(c.guest_kicks, c.device_kicks, "kicks");
    assert!(
        c.guest_irqs >= c.sleeps && c.guest_irqs <= c.sleeps + 1,
        "one interrupt a sleep"
    );
    assert!(
        c.guest_irqs <= c.device.interrupts,
        "an interrupt the device never raised"
    );
    if !c.moderated {
        assert_eq!(c.device.interrupts + c.device.suppressed, c.requests);
    }
    match mode {
        Suppression::Off => {
            assert_eq!(c.guest_kicks, c.batches);
            assert_eq!(
                c.device.interrupts, c.requests,
                "every used buffer interrupts"
            );
        }
        Suppression::EventIdx | Suppression::EventIdxEach => {
            assert!(c.guest_kicks <= c.batches);
            assert!(
                c.device.interrupts <= c.sleeps + c.races,
                "interrupts the driver never asked for"
            );
        }
        Suppression::Flags => {
            assert!(c.guest_kicks <= c.batches);
        }
    }
}

#[test]
fn suppression_off_every_buffer_interrupts_and_every_batch_kicks() {
    kvm_test!();
    check(Suppression::Off, &run(Suppression::Off, None));
}

#[test]
fn event_idx_interrupts_once_per_wait_and_kicks_only_when_asked() {
    kvm_test!();
    check(Suppression::EventIdx, &run(Suppression::EventIdx, None));
}

#[test]
fn flags_suppress_both_ways() {
    kvm_test!();
    check(Suppression::Flags, &run(Suppression::Flags, None));
}

/// A driver that asks for an interrupt at the next used buffer whenever it waits (as Linux's
/// does): without moderation the device interrupts for each buffer used while the driver
/// sleeps; with it, the interrupts of a batch still in the ring are held and go as one. The
/// counts stay exact either way; moderation never holds one past the call that served it.
#[test]
fn moderation_merges_the_interrupts_an_eager_driver_asks_for() {
    kvm_test!();
    let plain = run(Suppression::EventIdxEach, None);
    check(Suppression::EventIdxEach, &plain);
    let moderation = Moderation {
        max_held: 32,
        budget: Duration::from_millis(1),
    };
    let moderated = run(Suppression::EventIdxEach, Some(moderation));
    check(Suppression::EventIdxEach, &moderated);
    let per_request = |c: &Counts| c.device.interrupts as f64 / c.requests as f64;
    eprintln!(
        "interrupts per request: {:.4} without moderation, {:.4} with",
        per_request(&plain),
        per_request(&moderated)
    );
}
