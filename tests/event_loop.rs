//! A device thread waits on 64 queue notifiers with the event loop while a guest kicks them in a
//! known pattern; the loop reports each queue's count exactly, and stopping it from another thread
//! makes it return promptly.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vm_notify::wait::EventLoop;
use vm_notify::{Mode, Notifier, Width, WriteMatch};
use vm_notify_testkit::{kvm_test, GuestProgram, TinyVm};

const QUEUES: u64 = 64;
const ROUNDS: u64 = 20;
const NOTIFY: u64 = 0xd000_0050;

/// Kicks per round of queue `q`: 1 to 5.
fn kicks(q: u64) -> u64 {
    q % 5 + 1
}

#[test]
fn event_loop_counts_64_queues_and_stops_promptly() {
    kvm_test!();
    let mut vm = TinyVm::new().unwrap();
    let events = Arc::new(EventLoop::new().unwrap());
    let mut regs = Vec::new();
    for q in 0..QUEUES {
        // virtio-mmio QueueNotify: one register, the queue index as datamatch.
        let n = Notifier::new(Mode::Counter).unwrap();
        let m = WriteMatch::mmio(NOTIFY).width(Width::W4).datamatch(q);
        regs.push(vm.notify().ioevent(m, &n).unwrap());
        events.add(q, &n).unwrap();
    }
    assert_eq!(events.len(), QUEUES as usize);

    // The device thread: count what the loop reports until stopped.
    let counts: Arc<Vec<AtomicU64>> = Arc::new((0..QUEUES).map(|_| AtomicU64::new(0)).collect());
    let wakes = Arc::new(AtomicU64::new(0));
    let device = {
        let (events, counts, wakes) = (events.clone(), counts.clone(), wakes.clone());
        thread::spawn(move || {
            events.run(|token, count| {
                counts[token as usize].fetch_add(count, Ordering::Relaxed);
                wakes.fetch_add(1, Ordering::Relaxed);
                Ok(())
            })
        })
    };

    let mut p = GuestProgram::new().unwrap();
    p.repeat(ROUNDS, |p| {
        for q in 0..QUEUES {
            for _ in 0..kicks(q) {
                p.mmio_write(NOTIFY, q, 4)?;
            }
        }
        Ok(())
    })
    .unwrap();
    p.exit().unwrap();
    let report = vm.run(p, Duration::from_secs(60)).unwrap().done().unwrap();
    assert!(report.exits.is_empty(), "{report}");

    // Wait for the loop to report everything (a generous bound that only catches a hang).
    let expected = |q: u64| ROUNDS * kicks(q);
    let total: u64 = (0..QUEUES).map(expected).sum();
    let deadline = Instant::now() + Duration::from_secs(10);
    while counts
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum::<u64>()
        < total
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(1));
    }
    let stopped_at = Instant::now();
    events.stop_handle().stop().unwrap();
    device.join().unwrap().unwrap();
    let stop_took = stopped_at.elapsed();
    for q in 0..QUEUES {
        assert_eq!(
            counts[q as usize].load(Ordering::Relaxed),
            expected(q),
            "queue {q}"
        );
    }
    eprintln!(
        "event loop: {QUEUES} queues, {total} kicks reported in {} wake-ups; stop took {stop_took:?}",
        wakes.load(Ordering::Relaxed)
    );
    assert!(
        stop_took < Duration::from_secs(2),
        "the loop must stop promptly"
    );
    drop(regs);
}
