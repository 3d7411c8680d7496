//! The suppression harness: the tiny guest's driver (`GuestProgram::virtq_batches`) against
//! `QueueServer` on a device thread, over a virtio-pci queue (an any-width ioeventfd for kicks,
//! an MSI-X vector for interrupts). Shared by `tests/suppression.rs` and `benches/suppression.rs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;
use vm_notify::kvm::MsiMessage;
use vm_notify::virtio::{Moderation, PciLayout, QueueServer, ServeStats};
use vm_notify::wait::EventLoop;
use vm_notify_testkit::{
    layout, Eoi, GuestExit, GuestProgram, SplitQueue, Suppression, TinyVm, QUEUES_BASE,
    QUEUE_REGION,
};

use super::virtio_rng::device_queue;

const TIMEOUT: Duration = Duration::from_secs(600);
const NOTIFY_BASE: u64 = 0xd100_0000;
const VECTOR: u8 = 0x50;
/// The marker vector of the final drain (a lower priority class than `VECTOR`).
const MARKER: u8 = 0x30;
/// The queue's size: the deepest batch.
pub const SIZE: u16 = 64;
/// Where the guest keeps each batch's time (the second queue region, unused by the queue).
const TIMES: u64 = QUEUES_BASE + QUEUE_REGION;

/// Batch depths from 1 to `SIZE` adding up to at least `requests`, from a fixed seed.
pub fn random_depths(seed: u64, requests: u64) -> Vec<u8> {
    let mut x = seed;
    let mut out = Vec::new();
    let mut total = 0u64;
    while total < requests {
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

/// How the device thread completes what the guest makes available.
#[derive(Debug, Clone, Copy)]
pub enum Serving {
    /// `QueueServer::serve` on each wake-up, with this moderation or none.
    Serve(Option<Moderation>),
    /// `QueueServer::serve` with ring polling up to this window (`QueueServer::poll`).
    Polled(Duration),
    /// As `Polled`, with the device thread pinned to one CPU beside a thread that wants it two
    /// thirds of the time and takes it whenever it wants (spins 2 ms, sleeps 1 ms, the device
    /// thread `SCHED_IDLE`): a core that is not free, where polling must back off.
    PolledBesideHog(Duration),
    /// As an asynchronous backend: `QueueServer::take_at_most` takes every available chain,
    /// then the wake-up's chains are completed, last taken first, in one
    /// `QueueServer::complete`.
    Deferred,
}

/// What both sides counted in one run.
#[derive(Debug)]
pub struct Counts {
    pub requests: u64,
    pub batches: u64,
    pub submitted: u64,
    pub used_idx: u16,
    pub mismatches: u64,
    pub guest_kicks: u64,
    pub device_kicks: u64,
    pub sleeps: u64,
    pub races: u64,
    pub guest_irqs: u64,
    pub device: ServeStats,
    pub moderated: bool,
    /// Completed by `QueueServer::complete`, a batch at a time.
    pub deferred: bool,
    /// With timing: the time-stamp counter ticks each batch took, in order.
    pub ticks: Vec<u32>,
    /// The run's wall time, from the guest's start to its end.
    pub wall: Duration,
}

/// One run: the guest's driver with `mode` at `depths`, the device serving as `serving` says,
/// spending `work` on each request (spinning, as a backend doing the request's I/O would be
/// busy); with `timed`, each batch's time-stamp-counter ticks.
pub fn run(
    mode: Suppression,
    serving: Serving,
    depths: &[u8],
    timed: bool,
    work: Duration,
) -> Counts {
    let requests: u64 = depths.iter().map(|&d| u64::from(d)).sum();
    let mut vm = TinyVm::new().unwrap();
    let root = vm.notify();
    let msix = root.msix(1).unwrap();
    msix.set_message(0, MsiMessage::x86(0, VECTOR)).unwrap();
    msix.set_masked(0, false).unwrap();
    msix.write_message_control(vm_notify::msix::MSIX_ENABLE)
        .unwrap();
    let layout = PciLayout {
        notify_base: NOTIFY_BASE,
        notify_off_multiplier: 4,
        queue_notify_off: vec![0],
        intx: None,
    };
    let pci = root.virtio_pci(&layout, &msix).unwrap();
    pci.set_queue_vector(0, 0);
    let q = SplitQueue::new(0, SIZE, &[16, 64, 200, 512]).unwrap();
    q.lay_out(&vm).unwrap();
    q.write_depths(&vm, depths).unwrap();

    // The device: kicks through an event loop, every wake-up one `serve`.
    let event_idx = matches!(mode, Suppression::EventIdx | Suppression::EventIdxEach);
    let mut server = QueueServer::new(pci.queue(0).unwrap(), device_queue(&q, event_idx));
    let moderation = match serving {
        Serving::Serve(moderation) => moderation,
        Serving::Polled(_) | Serving::PolledBesideHog(_) | Serving::Deferred => None,
    };
    server.moderate(moderation).unwrap();
    if let Serving::Polled(max) | Serving::PolledBesideHog(max) = serving {
        server.poll(Some(max));
    }
    let events = EventLoop::new().unwrap();
    events.add(0, server.notify().kicks()).unwrap();
    let stop = events.stop_handle();
    let published = Arc::new(Mutex::new(ServeStats::default()));
    let (mem, seen) = (vm.memory().clone(), published.clone());
    let device = thread::spawn(move || {
        let _hog = matches!(serving, Serving::PolledBesideHog(_)).then(Hog::beside_this_thread);
        let mut kicks = 0;
        events
            .run(|_, count| {
                kicks += count;
                let complete = |chain: DescriptorChain<&GuestMemoryMmap>| {
                    let started = Instant::now();
                    while started.elapsed() < work {
                        std::hint::spin_loop();
                    }
                    (chain.head_index(), chain.writable().map(|d| d.len()).sum())
                };
                match serving {
                    Serving::Serve(_) | Serving::Polled(_) | Serving::PolledBesideHog(_) => {
                        server.serve(&mem, |chain| complete(chain).1).map(drop)?
                    }
                    Serving::Deferred => {
                        let mut taken = Vec::new();
                        server.take_at_most(
                            &mem,
                            u64::MAX,
                            |chain| taken.push(complete(chain)),
                            || false,
                        )?;
                        server.complete(&mem, taken.into_iter().rev())?;
                    }
                }
                *seen.lock().unwrap() = server.stats();
                Ok(())
            })
            .unwrap();
        (kicks, server.stats())
    });

    let mut p = GuestProgram::new().unwrap();
    p.enable_lapic().unwrap();
    p.on_interrupt(VECTOR, Eoi::Lapic);
    let times = timed.then_some(TIMES);
    p.virtq_batches_timed(&q, depths.len(), (NOTIFY_BASE, 0, 2), mode, times)
        .unwrap();
    // The host waits until the device has served everything (and signalled what it would);
    // then the guest takes whatever interrupt is still pending.
    p.signal_host(1).unwrap();
    p.drain_interrupts(MARKER).unwrap();
    p.exit().unwrap();
    let started = Instant::now();
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
    let wall = started.elapsed();
    stop.stop().unwrap();
    let (device_kicks, device) = device.join().unwrap();
    let ticks = if timed {
        (0..depths.len() as u64)
            .map(|i| {
                let word = vm.read_u64(TIMES + 4 * (i & !1)).unwrap();
                (word >> (32 * (i & 1))) as u32
            })
            .collect()
    } else {
        Vec::new()
    };
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
        deferred: matches!(serving, Serving::Deferred),
        ticks,
        wall,
    }
}

/// The counts both sides must agree on, by mode.
///
/// * Requests: all submitted, all used (the used index matches across the wrap-around), every
///   length right.
/// * Kicks: the guest's kick writes equal the counts the device read from the ioeventfd,
///   exactly. Without suppression one per request; with it, at most that.
/// * Interrupts: the guest takes interrupts only while asleep, one per sleep, plus at most the
///   one left pending at the end, which the final drain takes. Each guest interrupt came from a
///   device signal; the local APIC merges a signal into one still pending, so the device may
///   have signalled more. How many more, by mode: without suppression the device signals every
///   used buffer; with EVENT_IDX at most once per `used_event` the guest published (once per
///   sleep, or per race); with the flags, only while the guest had them clear.
pub fn check(mode: Suppression, c: &Counts) {
    eprintln!(
        "{mode:?}{}: {} requests in {} batches; kicks guest {} device {}; interrupts guest {} device {} \
         (suppressed {}, held {}); sleeps {}, races {}, device wake-ups {}, re-checks {}",
        if c.moderated {
            " with moderation"
        } else if c.deferred {
            " completed a batch at a time"
        } else {
            ""
        },
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
    if c.deferred {
        // One interrupt decision a batch of completions, and no batch larger than a wake-up.
        assert!(c.device.interrupts + c.device.suppressed <= c.device.wakeups);
    } else if !c.moderated {
        assert_eq!(c.device.interrupts + c.device.suppressed, c.requests);
    }
    match mode {
        Suppression::Off => {
            assert_eq!(c.guest_kicks, c.requests);
            assert_eq!(
                c.device.interrupts, c.requests,
                "every used buffer interrupts"
            );
        }
        Suppression::EventIdx | Suppression::EventIdxEach => {
            assert!(c.guest_kicks <= c.requests);
            assert!(
                c.device.interrupts <= c.sleeps + c.races,
                "interrupts the driver never asked for"
            );
        }
        Suppression::Flags => {
            assert!(c.guest_kicks <= c.requests);
        }
    }
}

/// A thread on the CPU of the thread that made it, both pinned there, until dropped: it spins
/// 2 ms and sleeps 1 ms in turn, and the thread that made it drops to `SCHED_IDLE`, so the hog
/// takes the CPU each time it wakes.
struct Hog {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Hog {
    fn beside_this_thread() -> Hog {
        // SAFETY: sched_getcpu takes no arguments and only returns a number.
        let cpu = unsafe { libc::sched_getcpu() };
        assert!(
            cpu >= 0,
            "sched_getcpu: {}",
            std::io::Error::last_os_error()
        );
        pin_to(cpu as usize);
        // SAFETY: sched_setscheduler reads the parameter block it is given (priority 0, as
        // SCHED_IDLE requires) and changes only the calling thread's policy (pid 0); moving to
        // SCHED_IDLE needs no privilege.
        let rc = unsafe {
            let param = libc::sched_param { sched_priority: 0 };
            libc::sched_setscheduler(0, libc::SCHED_IDLE, &param)
        };
        assert_eq!(
            rc,
            0,
            "sched_setscheduler: {}",
            std::io::Error::last_os_error()
        );
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            pin_to(cpu as usize);
            while !flag.load(Ordering::Relaxed) {
                let started = Instant::now();
                while started.elapsed() < Duration::from_millis(2) {
                    std::hint::spin_loop();
                }
                thread::sleep(Duration::from_millis(1));
            }
        });
        Hog {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) {
    // SAFETY: an all-zero cpu_set_t is an empty set; CPU_SET writes a bit inside the set it is
    // given (cpu is below the kernel's count of CPUs, well within the set's 1024 bits), and
    // sched_setaffinity reads the set for the size passed.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(
        rc,
        0,
        "sched_setaffinity: {}",
        std::io::Error::last_os_error()
    );
}
