//! Every notification path against its baselines, side by side, in one run.
//!
//! ```text
//! cargo bench --bench notify              # the full run
//! cargo bench --bench notify -- --quick   # under 2 minutes
//! cargo bench --bench notify -- --plot docs/roundtrip.svg
//! ```
//!
//! A plain harness (`harness = false`). Each repetition runs every variant of a case one after the
//! other, so machine noise hits them alike; a case's figure per repetition is the operation's mean
//! over that repetition's run, and the case reports the median, min and max over repetitions.
//! Output: a table, one JSON object per case and line, then `ratio <name> = <value>` lines, each a
//! quotient of medians. The round trips of all runs of a variant, timed one by one on the device
//! thread (on the vCPU thread for the exit path), give its latency percentiles and an SVG plot of
//! the distributions (`target/notify-bench/roundtrip.svg` unless `--plot` says otherwise).
//!
//! Every vCPU thread runs on CPU 0 and every device (or echo) thread on CPU 1: unpinned, the
//! figures depend on whether the scheduler put both on one CPU, where the vCPU's halt-polling
//! delays the device thread.
//!
//! The raw baselines (`*/raw`) use kvm-ioctls and vmm-sys-util directly — registrations, eventfds,
//! routing, the `KVM_RUN` loop and the device thread — and borrow only the machine from the test
//! kit (its memory, page tables, registers and the assembled guest), so the guest runs the very
//! same instructions.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use iced_x86::code_asm::{dword_ptr, dx, eax, edx, rdx};
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_msi, KvmIrqRouting,
    KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VcpuExit, VcpuFd};
use vm_notify::kvm::MsiMessage;
use vm_notify::wait::{AdaptivePoll, EventLoop};
use vm_notify::{Attempt, Mode, Notifier, Width, WriteMatch};
use vm_notify_testkit::{kvm_test, layout, Eoi, GuestExit, GuestProgram, TinyVm};
use vmm_sys_util::eventfd::EventFd;

mod common;
use common::stats;

const TIMEOUT: Duration = Duration::from_secs(120);
const NOTIFY: u64 = 0xd000_0050;
const NOTIFY_PORT: u16 = 0x510;
const VECTOR: u8 = 0x41;
/// The MSI route the raw baseline programs.
const RAW_GSI: u32 = 24;
/// Kick runs per repetition.
const KICK_RUNS: usize = 3;
/// Runs of each round-trip variant per repetition.
const PING_PONG_RUNS: usize = 3;
/// The adaptive waiter's largest window.
const POLL_MAX: Duration = Duration::from_micros(200);

struct Sizes {
    reps: usize,
    kicks: u64,
    round_trips: u64,
    interrupts: u64,
    bus: &'static [usize],
    vectors: usize,
    idle: Duration,
}

const FULL: Sizes = Sizes {
    reps: 7,
    kicks: 50_000,
    round_trips: 5000,
    interrupts: 20_000,
    bus: &[1, 100, 1000, 5000],
    vectors: 1024,
    idle: Duration::from_millis(500),
};

const QUICK: Sizes = Sizes {
    reps: 5,
    kicks: 20_000,
    round_trips: 2000,
    interrupts: 5000,
    bus: &[1, 100, 1000],
    vectors: 1024,
    idle: Duration::from_millis(250),
};

/// Per-repetition values of every case, latency samples, and extra figures.
#[derive(Default)]
struct Results {
    cases: BTreeMap<&'static str, (&'static str, Vec<f64>)>,
    latencies: BTreeMap<&'static str, Vec<f64>>,
}

impl Results {
    fn add(&mut self, case: &'static str, unit: &'static str, value: f64) {
        self.cases
            .entry(case)
            .or_insert((unit, Vec::new()))
            .1
            .push(value);
    }

    fn median(&self, case: &str) -> f64 {
        stats(&self.cases[case].1).0
    }

    fn ratio(&self, num: &str, den: &str) -> f64 {
        self.median(num) / self.median(den)
    }
}

fn ns_per(d: Duration, ops: u64) -> f64 {
    d.as_nanos() as f64 / ops as f64
}

/// Ends the process if a run hangs: a guard that only catches a hang, never a timing check.
struct Watchdog(Option<mpsc::Sender<()>>, Option<JoinHandle<()>>);

impl Watchdog {
    fn arm(what: &'static str) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        let t = thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(TIMEOUT) {
                eprintln!("notify bench: {what} hung for {TIMEOUT:?}");
                std::process::exit(1);
            }
        });
        Watchdog(Some(tx), Some(t))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.0.take());
        if let Some(t) = self.1.take() {
            let _ = t.join();
        }
    }
}

/// The CPU of every vCPU thread, and of every device (or echo) thread.
const VCPU_CPU: usize = 0;
const DEVICE_CPU: usize = 1;

/// Restricts the calling thread to `cpu` (all CPUs for `None`). Threads inherit the mask of the
/// thread that spawns them, so pinning the bench thread around `TinyVm::start` pins the vCPU.
fn pin(cpu: Option<usize>) {
    // SAFETY: `cpu_set_t` is plain bits; CPU_ZERO/CPU_SET write inside it, and
    // `sched_setaffinity` reads `size_of::<cpu_set_t>()` bytes of it. A failure (a machine with
    // one CPU) leaves the thread unpinned, which the bench's header reports.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        match cpu {
            Some(c) => libc::CPU_SET(c, &mut set),
            None => (0..libc::CPU_SETSIZE as usize).for_each(|c| libc::CPU_SET(c, &mut set)),
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Pins the bench thread to the vCPU's CPU while it exists (around `start`/`run`), so the vCPU
/// thread it spawns lands there; then lets it run anywhere again.
struct OnVcpuCpu;

impl OnVcpuCpu {
    fn new() -> OnVcpuCpu {
        pin(Some(VCPU_CPU));
        OnVcpuCpu
    }
}

impl Drop for OnVcpuCpu {
    fn drop(&mut self) {
        pin(None);
    }
}

/// Spawns a device thread pinned to DEVICE_CPU.
fn spawn_device<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    thread::spawn(move || {
        pin(Some(DEVICE_CPU));
        f()
    })
}

/// CPU time (user + system) of the calling thread.
fn thread_cpu() -> Duration {
    // SAFETY: `getrusage` writes one `rusage` into the zeroed value it is given and reads
    // nothing else.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

// ---------------------------------------------------------------------------------------------
// Guest programs.

/// Where the kick loop writes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Target {
    Mmio,
    Pio,
    /// A plain store to guest RAM: the loop's own cost, for reference.
    Ram,
}

/// Writes per loop iteration: the loop's `dec`/`jnz` add 0.2 instructions per write.
const UNROLL: u64 = 10;

/// `kicks` 4-byte writes to `target`, unrolled: the address and value are loaded once, so each
/// kick is the one store or `out` instruction.
fn kick_loop(kicks: u64, target: Target) -> GuestProgram {
    assert_eq!(kicks % UNROLL, 0);
    let mut p = GuestProgram::new().unwrap();
    let a = p.asm();
    a.xor(eax, eax).unwrap();
    match target {
        Target::Mmio => a.mov(rdx, NOTIFY).unwrap(),
        Target::Pio => a.mov(edx, u32::from(NOTIFY_PORT)).unwrap(),
        Target::Ram => a.mov(rdx, layout::data_slot(0)).unwrap(),
    }
    p.repeat(kicks / UNROLL, |p| {
        let a = p.asm();
        for _ in 0..UNROLL {
            match target {
                Target::Pio => a.out(dx, eax)?,
                Target::Mmio | Target::Ram => a.mov(dword_ptr(rdx), eax)?,
            }
        }
        Ok(())
    })
    .unwrap();
    p.exit().unwrap();
    p
}

fn ping_pong_guest(round_trips: u64) -> GuestProgram {
    let mut p = GuestProgram::new().unwrap();
    p.enable_lapic().unwrap();
    p.on_interrupt(VECTOR, Eoi::Lapic);
    p.repeat(round_trips, |p| p.kick_and_wait(NOTIFY, 0, None))
        .unwrap();
    p.exit().unwrap();
    p
}

// ---------------------------------------------------------------------------------------------
// The raw kvm-ioctls baseline: what a VMM author writes without the library. docs/PERFORMANCE.md
// shows the code between the markers (`.ci/docs-in-sync` keeps the two equal).

// BEGIN raw baseline

/// Runs the vCPU on its own thread, as a VMM does, until the guest's `out` to the done port;
/// returns the time in the loop. Any other exit is a failure: nothing here should exit.
fn raw_run(mut vcpu: VcpuFd) -> Duration {
    thread::spawn(move || {
        pin(Some(VCPU_CPU));
        raw_loop(&mut vcpu)
    })
    .join()
    .unwrap()
}

fn raw_loop(vcpu: &mut VcpuFd) -> Duration {
    let start = Instant::now();
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, _)) if port == layout::DONE_PORT => break,
            Ok(exit) => panic!("raw baseline: unexpected exit {exit:?}"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => panic!("raw baseline: KVM_RUN failed: {e}"),
        }
    }
    start.elapsed()
}

/// Guest MMIO kicks into an ioeventfd registered with kvm-ioctls; ns per kick.
fn raw_kicks(kicks: u64) -> f64 {
    let mut vm = TinyVm::new().unwrap();
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    vm.vm()
        .register_ioevent(&kick, &IoEventAddress::Mmio(NOTIFY), NoDatamatch)
        .unwrap();
    let vcpu = vm.take_vcpu(kick_loop(kicks, Target::Mmio)).unwrap();
    let _w = Watchdog::arm("raw kicks");
    let t = raw_run(vcpu);
    assert_eq!(kick.read().unwrap(), kicks);
    ns_per(t, kicks)
}

/// Ping-pong with a hand-made MSI route, ioeventfd, irqfd and a device thread on blocking
/// eventfds; ns per round trip, and the device's gaps between kicks (µs).
fn raw_ping_pong(round_trips: u64) -> (f64, Vec<f64>) {
    let mut vm = TinyVm::new().unwrap();
    let raw = vm.vm().clone();
    let kick = EventFd::new(0).unwrap();
    let call = EventFd::new(0).unwrap();
    raw.register_ioevent(&kick, &IoEventAddress::Mmio(NOTIFY), NoDatamatch)
        .unwrap();
    let mut routing = KvmIrqRouting::new(0).unwrap();
    routing
        .push(kvm_irq_routing_entry {
            gsi: RAW_GSI,
            type_: KVM_IRQ_ROUTING_MSI,
            u: kvm_irq_routing_entry__bindgen_ty_1 {
                msi: kvm_irq_routing_msi {
                    address_lo: 0xfee0_0000,
                    address_hi: 0,
                    data: u32::from(VECTOR),
                    ..Default::default()
                },
            },
            ..Default::default()
        })
        .unwrap();
    raw.set_gsi_routing(&routing).unwrap();
    raw.register_irqfd(&call, RAW_GSI).unwrap();
    let device = {
        let (kick, call) = (kick.try_clone().unwrap(), call.try_clone().unwrap());
        spawn_device(move || {
            let mut gaps = Vec::with_capacity(round_trips as usize);
            let mut last = None;
            for _ in 0..round_trips {
                kick.read().unwrap();
                let now = Instant::now();
                if let Some(l) = last.replace(now) {
                    gaps.push((now - l).as_secs_f64() * 1e6);
                }
                call.write(1).unwrap();
            }
            gaps
        })
    };
    let vcpu = vm.take_vcpu(ping_pong_guest(round_trips)).unwrap();
    let _w = Watchdog::arm("raw ping-pong");
    let t = raw_run(vcpu);
    let gaps = device.join().unwrap();
    assert_eq!(vm.irq_count(VECTOR).unwrap(), round_trips);
    (ns_per(t, round_trips), gaps)
}

// END raw baseline

/// Two host threads bouncing one count through two blocking eventfds; ns per round trip.
fn threads_ping_pong(round_trips: u64) -> (f64, Vec<f64>) {
    let (ping, pong) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    let echo = {
        let (ping, pong) = (ping.try_clone().unwrap(), pong.try_clone().unwrap());
        spawn_device(move || {
            for _ in 0..round_trips {
                ping.read().unwrap();
                pong.write(1).unwrap();
            }
        })
    };
    let _w = Watchdog::arm("threads ping-pong");
    let _pinned = OnVcpuCpu::new();
    let mut gaps = Vec::with_capacity(round_trips as usize);
    let start = Instant::now();
    let mut last = start;
    for _ in 0..round_trips {
        ping.write(1).unwrap();
        pong.read().unwrap();
        let now = Instant::now();
        gaps.push((now - last).as_secs_f64() * 1e6);
        last = now;
    }
    let t = start.elapsed();
    echo.join().unwrap();
    (ns_per(t, round_trips), gaps)
}

// ---------------------------------------------------------------------------------------------
// The library's paths.

/// Guest kicks with an ioeventfd (`register`) or as exits the VMM turns into a notifier write;
/// ns per kick. `Target::Ram` measures the loop alone.
fn kicks(kicks: u64, target: Target, register: bool) -> f64 {
    let mut vm = TinyVm::new().unwrap();
    let n = Notifier::new(Mode::Counter).unwrap();
    let at = match target {
        Target::Pio => WriteMatch::pio(NOTIFY_PORT.into()),
        _ => WriteMatch::mmio(NOTIFY),
    };
    let _reg = register.then(|| vm.notify().ioevent(at, &n).unwrap());
    let vmm = n.dup().unwrap();
    let pinned = OnVcpuCpu::new();
    let running = vm
        .start(
            kick_loop(kicks, target),
            move |e: &GuestExit, _: &mut [u8]| match e {
                GuestExit::MmioWrite { addr: NOTIFY, .. }
                | GuestExit::PioWrite {
                    port: NOTIFY_PORT, ..
                } => vmm.notify().unwrap(),
                other => panic!("kicks: unexpected exit {other:?}"),
            },
        )
        .unwrap();
    drop(pinned);
    let report = running.wait(TIMEOUT).done().unwrap();
    let (counted, exits) = match (target, register) {
        (Target::Ram, _) => (0, 0),
        (_, true) => (kicks, 0),
        (_, false) => (kicks, kicks),
    };
    assert_eq!(n.try_read().unwrap().done().unwrap_or(0), counted);
    assert_eq!(report.exits.len() as u64, exits);
    ns_per(report.elapsed, kicks)
}

/// How the library's device thread waits for a kick.
#[derive(Clone, Copy, Debug, PartialEq)]
enum DeviceWait {
    /// `Notifier::read`.
    Blocking,
    /// `EventLoop::wait` over the one queue.
    EventLoop,
    /// `AdaptivePoll::wait`.
    Adaptive,
    /// Spinning on `Notifier::try_read` and never sleeping: the floor any polling can reach,
    /// at a whole CPU's cost.
    BusyPoll,
    /// No device thread: the kick exits and the vCPU thread triggers the irqfd.
    Exit,
}

/// What a library ping-pong run measured.
struct PingPong {
    ns_per_round_trip: f64,
    gaps_us: Vec<f64>,
    /// Device thread CPU time per second of the busy run, and per second of an idle wait after it.
    cpu_busy: f64,
    cpu_idle: f64,
}

fn ping_pong(round_trips: u64, wait: DeviceWait, idle: Duration) -> PingPong {
    let mut vm = TinyVm::new().unwrap();
    let kicks = Notifier::new(Mode::Counter).unwrap();
    let gsi = vm.router().route_msi(MsiMessage::x86(0, VECTOR)).unwrap();
    let irq = vm.notify().irqfd(gsi).unwrap();
    let guest = ping_pong_guest(round_trips);
    if wait == DeviceWait::Exit {
        let mut gaps = Vec::with_capacity(round_trips as usize);
        let mut last: Option<Instant> = None;
        let (tx, rx) = mpsc::channel();
        let pinned = OnVcpuCpu::new();
        let running = vm
            .start(guest, move |e: &GuestExit, _: &mut [u8]| {
                if let GuestExit::MmioWrite { addr: NOTIFY, .. } = e {
                    let now = Instant::now();
                    if let Some(l) = last.replace(now) {
                        gaps.push((now - l).as_secs_f64() * 1e6);
                    }
                    irq.trigger().unwrap();
                    if gaps.len() as u64 + 1 == round_trips {
                        let _ = tx.send(std::mem::take(&mut gaps));
                    }
                }
            })
            .unwrap();
        drop(pinned);
        let report = running.wait(TIMEOUT).done().unwrap();
        assert_eq!(vm.irq_count(VECTOR).unwrap(), round_trips);
        return PingPong {
            ns_per_round_trip: ns_per(report.elapsed, round_trips),
            gaps_us: rx.try_recv().unwrap_or_default(),
            cpu_busy: f64::NAN,
            cpu_idle: f64::NAN,
        };
    }
    let _reg = vm
        .notify()
        .ioevent(WriteMatch::mmio(NOTIFY), &kicks)
        .unwrap();
    let wake = kicks.dup().unwrap();
    let idle_started = Arc::new(AtomicBool::new(false));
    let device = {
        let idle_started = idle_started.clone();
        spawn_device(move || {
            let events = EventLoop::new().unwrap();
            events.add(0, &kicks).unwrap();
            let mut fired = Vec::new();
            let mut poll = AdaptivePoll::new(POLL_MAX);
            let mut wait_once = || match wait {
                DeviceWait::Blocking => kicks.read().unwrap(),
                DeviceWait::Adaptive => poll.wait(&kicks).unwrap(),
                DeviceWait::BusyPoll => loop {
                    if let Attempt::Done(n) = kicks.try_read().unwrap() {
                        break n;
                    }
                    std::hint::spin_loop();
                },
                DeviceWait::EventLoop => {
                    events.wait(None, &mut fired).unwrap();
                    fired.iter().map(|&(_, n)| n).sum()
                }
                DeviceWait::Exit => unreachable!(),
            };
            let mut gaps = Vec::with_capacity(round_trips as usize);
            let mut last: Option<Instant> = None;
            let (mut seen, mut busy_cpu, mut busy_wall) = (0, Duration::ZERO, Duration::ZERO);
            while seen < round_trips {
                seen += wait_once();
                let now = Instant::now();
                match last.replace(now) {
                    // CPU and wall time from the first kick on.
                    None => {
                        busy_cpu = thread_cpu();
                        busy_wall = Duration::ZERO;
                    }
                    Some(l) => {
                        gaps.push((now - l).as_secs_f64() * 1e6);
                        busy_wall += now - l;
                    }
                }
                irq.trigger().unwrap();
            }
            busy_cpu = thread_cpu() - busy_cpu;
            // Idle: one wait nobody answers for `idle` (the waiter's window is warm).
            let (cpu0, t0) = (thread_cpu(), Instant::now());
            idle_started.store(true, Ordering::SeqCst);
            wait_once();
            let (idle_cpu, idle_wall) = (thread_cpu() - cpu0, t0.elapsed());
            (
                gaps,
                busy_cpu.as_secs_f64() / busy_wall.as_secs_f64(),
                idle_cpu.as_secs_f64() / idle_wall.as_secs_f64(),
            )
        })
    };
    let report = {
        let _pinned = OnVcpuCpu::new();
        vm.run(guest, TIMEOUT).unwrap().done().unwrap()
    };
    while !idle_started.load(Ordering::SeqCst) {
        thread::yield_now();
    }
    thread::sleep(idle);
    wake.notify().unwrap();
    let (gaps_us, cpu_busy, cpu_idle) = device.join().unwrap();
    assert_eq!(vm.irq_count(VECTOR).unwrap(), round_trips);
    PingPong {
        ns_per_round_trip: ns_per(report.elapsed, round_trips),
        gaps_us,
        cpu_busy,
        cpu_idle,
    }
}

/// The device raises as fast as it can while the guest takes `interrupts` interrupts; returns
/// (ns per delivered interrupt, raised, delivered).
fn interrupt_throughput(interrupts: u64) -> (f64, u64, u64) {
    let mut vm = TinyVm::new().unwrap();
    let gsi = vm.router().route_msi(MsiMessage::x86(0, VECTOR)).unwrap();
    let irq = vm.notify().irqfd(gsi).unwrap();
    let mut p = GuestProgram::new().unwrap();
    p.enable_lapic().unwrap();
    p.on_interrupt(VECTOR, Eoi::Lapic);
    p.repeat(interrupts, |p| p.wait_for_interrupt()).unwrap();
    p.exit().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let raised = Arc::new(AtomicU64::new(0));
    let device = {
        let (done, raised) = (done.clone(), raised.clone());
        spawn_device(move || {
            while !done.load(Ordering::Relaxed) {
                irq.trigger().unwrap();
                raised.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let report = {
        let _pinned = OnVcpuCpu::new();
        vm.run(p, TIMEOUT).unwrap()
    };
    done.store(true, Ordering::Relaxed);
    device.join().unwrap();
    let report = report.done().unwrap();
    let delivered = vm.irq_count(VECTOR).unwrap();
    (
        ns_per(report.elapsed, delivered),
        raised.load(Ordering::Relaxed),
        delivered,
    )
}

/// Registers `n` MMIO ioeventfds on a fresh VM, then drops them; (ns per registration, ns per
/// unregistration).
fn registration(n: usize) -> (f64, f64) {
    let vm = TinyVm::new().unwrap();
    let notifiers: Vec<_> = (0..n)
        .map(|_| Notifier::new(Mode::Counter).unwrap())
        .collect();
    let _w = Watchdog::arm("registration");
    let start = Instant::now();
    let regs: Vec<_> = notifiers
        .iter()
        .enumerate()
        .map(|(i, notifier)| {
            let m = WriteMatch::mmio(0xd100_0000 + 8 * i as u64).width(Width::W4);
            vm.notify().ioevent(m, notifier).unwrap()
        })
        .collect();
    let reg = start.elapsed();
    let start = Instant::now();
    drop(regs);
    let unreg = start.elapsed();
    (ns_per(reg, n as u64), ns_per(unreg, n as u64))
}

/// `count` MSI routes in one transaction, or one `route_msi` each; ns per route.
fn routing(count: usize, batched: bool) -> f64 {
    let vm = TinyVm::new().unwrap();
    let router = vm.router();
    let message = |i: usize| MsiMessage::x86(0, 0x30 + (i % 200) as u8);
    let start = Instant::now();
    let gsis: Vec<_> = if batched {
        let mut tx = router.transaction();
        let gsis = (0..count)
            .map(|i| tx.add_msi(message(i)).unwrap())
            .collect();
        tx.commit().unwrap();
        gsis
    } else {
        (0..count)
            .map(|i| router.route_msi(message(i)).unwrap())
            .collect()
    };
    let t = start.elapsed();
    assert_eq!(gsis.len(), count);
    ns_per(t, count as u64)
}

// ---------------------------------------------------------------------------------------------
// Output.

fn print_results(r: &Results, ratios: &[(&str, f64)]) {
    println!();
    println!("| case | unit | median | min | max | reps |");
    println!("|---|---|---|---|---|---|");
    for (case, (unit, values)) in &r.cases {
        let (med, min, max) = stats(values);
        println!(
            "| {case} | {unit} | {med:.1} | {min:.1} | {max:.1} | {} |",
            values.len()
        );
    }
    println!();
    for (case, (unit, values)) in &r.cases {
        let (med, min, max) = stats(values);
        println!(
            "{{\"case\":\"{case}\",\"unit\":\"{unit}\",\"median\":{med:.1},\"min\":{min:.1},\"max\":{max:.1},\"reps\":{}}}",
            values.len()
        );
    }
    println!();
    for (case, samples) in &r.latencies {
        let mut v = samples.clone();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            continue;
        }
        let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize];
        println!(
            "latency {case}: p50 {:.1} us, p90 {:.1} us, p99 {:.1} us, max {:.1} us ({} round trips, all runs)",
            at(0.5),
            at(0.9),
            at(0.99),
            v[v.len() - 1],
            v.len()
        );
    }
    println!();
    for (name, value) in ratios {
        println!("ratio {name} = {value:.3}");
    }
}

/// Cumulative distributions of the round-trip samples, on a log axis from 1 µs to 10 ms, drawn
/// with plotters; the legend sits inside the plot, so no label is cut off.
fn plot(r: &Results, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let root = SVGBackend::new(path, (760, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Round-trip latency, cumulative (vm-notify benches/notify.rs)",
            ("sans-serif", 16),
        )
        .margin(12)
        .margin_right(36)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((1f64..10_000f64).log_scale(), 0f64..1f64)?;
    chart
        .configure_mesh()
        .x_desc("round trip (µs)")
        .x_label_formatter(&|us| format!("{us:.0}"))
        .y_desc("fraction of round trips")
        .draw()?;
    for (i, (name, samples)) in r.latencies.iter().enumerate() {
        let mut s = samples.clone();
        s.sort_by(f64::total_cmp);
        if s.is_empty() {
            continue;
        }
        let n = s.len() as f64;
        let median = s[s.len() / 2];
        let color = Palette99::pick(i).stroke_width(2);
        // About 400 points a curve (and the last sample) draw it as well as all of them.
        let step = (s.len() / 400).max(1);
        let points = s
            .iter()
            .enumerate()
            .step_by(step)
            .chain(std::iter::once((s.len() - 1, &s[s.len() - 1])))
            .map(|(k, &us)| (us.clamp(1.0, 10_000.0), (k + 1) as f64 / n));
        chart
            .draw_series(LineSeries::new(points, color))?
            .label(format!("{name} (median {median:.1} µs)"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("notify bench: run with `cargo bench --bench notify [-- --quick]`");
        return;
    }
    kvm_test!();
    let quick = args.iter().any(|a| a == "--quick");
    let plot_path = args
        .iter()
        .position(|a| a == "--plot")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/notify-bench/roundtrip.svg"));
    let s = if quick { QUICK } else { FULL };
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        println!("note: {cpus} CPU available: vCPU and device threads share it (not pinned apart)");
    }
    let started = Instant::now();
    println!(
        "vm-notify notify bench ({}): {} repetitions; kicks {} per run, round trips {}, interrupts {}",
        if quick { "quick" } else { "full" },
        s.reps,
        s.kicks,
        s.round_trips,
        s.interrupts
    );
    let mut r = Results::default();
    let (mut raised, mut delivered) = (0u64, 0u64);
    for rep in 0..s.reps {
        // Kick runs are short: three of each per repetition.
        for _ in 0..KICK_RUNS {
            r.add(
                "kick_mmio/ioeventfd",
                "ns/op",
                kicks(s.kicks, Target::Mmio, true),
            );
            r.add("kick_mmio/raw", "ns/op", raw_kicks(s.kicks));
            r.add(
                "kick_mmio/exit",
                "ns/op",
                kicks(s.kicks, Target::Mmio, false),
            );
            r.add(
                "kick_pio/ioeventfd",
                "ns/op",
                kicks(s.kicks, Target::Pio, true),
            );
            r.add("kick_pio/exit", "ns/op", kicks(s.kicks, Target::Pio, false));
            r.add(
                "kick_ram/loop_only",
                "ns/op",
                kicks(s.kicks, Target::Ram, false),
            );
        }

        // Round-trip runs vary with where the scheduler puts the threads: several short runs
        // of every variant per repetition, alternating.
        for _ in 0..PING_PONG_RUNS {
            for (case, wait) in [
                ("pingpong/library", DeviceWait::Blocking),
                ("pingpong/event_loop", DeviceWait::EventLoop),
                ("pingpong/adaptive", DeviceWait::Adaptive),
                ("pingpong/busy_poll", DeviceWait::BusyPoll),
                ("pingpong/exit", DeviceWait::Exit),
            ] {
                let idle = match wait {
                    DeviceWait::Blocking | DeviceWait::Adaptive => s.idle,
                    _ => Duration::ZERO,
                };
                let pp = ping_pong(s.round_trips, wait, idle);
                r.add(case, "ns/op", pp.ns_per_round_trip);
                let cpu = match wait {
                    DeviceWait::Blocking => Some(("cpu_busy/blocking", "cpu_idle/blocking")),
                    DeviceWait::Adaptive => Some(("cpu_busy/adaptive", "cpu_idle/adaptive")),
                    _ => None,
                };
                if let Some((busy, idle)) = cpu {
                    r.add(busy, "ms_cpu/s", pp.cpu_busy * 1e3);
                    r.add(idle, "ms_cpu/s", pp.cpu_idle * 1e3);
                }
                r.latencies.entry(case).or_default().extend(pp.gaps_us);
            }
            let (ns, gaps) = raw_ping_pong(s.round_trips);
            r.add("pingpong/raw", "ns/op", ns);
            let (ns_threads, thread_gaps) = threads_ping_pong(s.round_trips);
            r.add("pingpong/threads", "ns/op", ns_threads);
            r.latencies.entry("pingpong/raw").or_default().extend(gaps);
            r.latencies
                .entry("pingpong/threads")
                .or_default()
                .extend(thread_gaps);
        }

        let (ns, up, down) = interrupt_throughput(s.interrupts);
        r.add("interrupts/delivered", "ns/op", ns);
        raised += up;
        delivered += down;

        for &n in s.bus {
            let (reg, unreg) = registration(n);
            r.add(bus_case(n, true), "ns/op", reg);
            r.add(bus_case(n, false), "ns/op", unreg);
        }
        r.add("routing/batched", "ns/op", routing(s.vectors, true));
        r.add("routing/per_vector", "ns/op", routing(s.vectors, false));
        eprintln!(
            "repetition {} of {} done at {:?}",
            rep + 1,
            s.reps,
            started.elapsed()
        );
    }
    let largest = *s.bus.last().unwrap();
    let ratios = [
        (
            "ioevent_vs_exit_mmio",
            r.ratio("kick_mmio/exit", "kick_mmio/ioeventfd"),
        ),
        (
            "ioevent_vs_exit_pio",
            r.ratio("kick_pio/exit", "kick_pio/ioeventfd"),
        ),
        (
            "library_overhead_ioevent",
            r.ratio("kick_mmio/ioeventfd", "kick_mmio/raw"),
        ),
        (
            "library_overhead_pingpong",
            r.ratio("pingpong/library", "pingpong/raw"),
        ),
        (
            "event_loop_vs_blocking",
            r.ratio("pingpong/event_loop", "pingpong/library"),
        ),
        (
            "adaptive_poll_vs_blocking",
            r.ratio("pingpong/adaptive", "pingpong/library"),
        ),
        (
            "adaptive_poll_vs_busy_poll",
            r.ratio("pingpong/adaptive", "pingpong/busy_poll"),
        ),
        (
            "busy_poll_vs_blocking",
            r.ratio("pingpong/busy_poll", "pingpong/library"),
        ),
        (
            "pingpong_exit_vs_ioevent",
            r.ratio("pingpong/exit", "pingpong/library"),
        ),
        (
            "pingpong_threads_vs_ioevent",
            r.ratio("pingpong/threads", "pingpong/library"),
        ),
        (
            "interrupt_coalescing",
            raised as f64 / delivered.max(1) as f64,
        ),
        (
            "interrupts_per_second",
            1e9 / r.median("interrupts/delivered"),
        ),
        (
            "registration_growth",
            r.ratio(bus_case(largest, true), bus_case(1, true)),
        ),
        (
            "routing_per_vector_vs_batched",
            r.ratio("routing/per_vector", "routing/batched"),
        ),
    ];
    print_results(&r, &ratios);
    match plot(&r, &plot_path) {
        Ok(()) => println!("plot: {}", plot_path.display()),
        Err(e) => eprintln!("plot: cannot write {}: {e}", plot_path.display()),
    }
    println!("total time {:.1} s", started.elapsed().as_secs_f64());
}

fn bus_case(n: usize, register: bool) -> &'static str {
    match (n, register) {
        (1, true) => "register/bus_1",
        (100, true) => "register/bus_100",
        (1000, true) => "register/bus_1000",
        (5000, true) => "register/bus_5000",
        (1, false) => "unregister/bus_1",
        (100, false) => "unregister/bus_100",
        (1000, false) => "unregister/bus_1000",
        (5000, false) => "unregister/bus_5000",
        _ => unreachable!("bus sizes are 1, 100, 1000 and 5000"),
    }
}
