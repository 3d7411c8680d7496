//! Registration and teardown of many queues, side by side in one run.
//!
//! ```text
//! cargo bench --bench scale
//! ```
//!
//! A queue here is what a virtio-pci queue needs: its kick (a kernel MMIO ioeventfd) and its
//! interrupt (an MSI route with an irqfd). For 256 queues on one VM:
//!
//! * **register**: `Vm::batch` (every route in one commit) against one queue at a time
//!   (`ioevent`, `route_msi`, `irqfd_with`: a routing commit per queue);
//! * **teardown**: dropping the batch (ioeventfds, then irqfds back to back, then one commit
//!   removing every route) against one queue at a time (its ioeventfd, its irqfd, then
//!   `GsiRouter::remove`: a commit per queue);
//! * **ioeventfd teardown order**: 256 ioeventfds unregistered in registration order against in
//!   reverse order;
//! * **one unregistration**: the first ioeventfd unregistration a VM makes, against the second.
//!
//! Each variant runs on a fresh VM, alternating, 7 rounds; medians.
//!
//! Then **many VMs**: 1, 16 and as many VMs of 256 queues as the descriptor limit allows in one
//! process, and the same number of processes with one VM each (what a VMM does). For each: the
//! registration time per queue (`Vm::batch`), the descriptors and the resident memory each queue
//! adds, one device thread per process serving every queue while every guest kicks each of its
//! queues in turn and waits for that kick's interrupt (round trips per second; the counts are
//! asserted exact in the guests), and the teardown time per queue.
//!
//! The figures are ratios on a shared, nested host. `-- --quick` runs every variant once, with
//! fewer VMs (what `.ci/run` does).

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use iced_x86::code_asm::{dword_ptr, eax, r12};
use vm_notify::kvm::MsiMessage;
use vm_notify::wait::{EventLoop, Wake};
use vm_notify::{Mode, Notifier, Vm, Width, WriteMatch};
use vm_notify_testkit::{Eoi, GuestExit, GuestProgram, Running, TinyVm};

mod common;
use common::{median, rounds, us};

const QUEUES: usize = 256;
const ROUNDS: usize = 7;
const NOTIFY: u64 = 0xd100_0000;

fn kick_match(i: usize) -> WriteMatch {
    WriteMatch::mmio(NOTIFY + 8 * i as u64).width(Width::W4)
}

fn message(i: usize) -> MsiMessage {
    MsiMessage::x86(0, 0x40 + (i % 160) as u8)
}

fn notifiers() -> Vec<Notifier> {
    (0..QUEUES)
        .map(|_| Notifier::new(Mode::Counter).unwrap())
        .collect()
}

/// Registers `QUEUES` queues with `Vm::batch` and drops the batch; (register, teardown).
fn batched(root: &Vm) -> (Duration, Duration) {
    let (kicks, calls) = (notifiers(), notifiers());
    let kick_list: Vec<_> = kicks
        .iter()
        .enumerate()
        .map(|(i, n)| (kick_match(i), n))
        .collect();
    let call_list: Vec<_> = calls
        .iter()
        .enumerate()
        .map(|(i, n)| (message(i), n))
        .collect();
    let entries = root.router().entries();
    let start = Instant::now();
    let batch = root.batch(&kick_list, &call_list).unwrap();
    let register = start.elapsed();
    assert_eq!(root.router().entries(), entries + QUEUES);
    let start = Instant::now();
    batch.teardown().unwrap();
    let teardown = start.elapsed();
    assert_eq!(root.router().entries(), entries);
    (register, teardown)
}

/// The same queues one at a time; (register, teardown).
fn one_by_one(root: &Vm) -> (Duration, Duration) {
    let (kicks, calls) = (notifiers(), notifiers());
    let entries = root.router().entries();
    let start = Instant::now();
    let queues: Vec<_> = (0..QUEUES)
        .map(|i| {
            let kick = root.ioevent(kick_match(i), &kicks[i]).unwrap();
            let gsi = root.router().route_msi(message(i)).unwrap();
            (kick, root.irqfd_with(gsi, &calls[i]).unwrap(), gsi)
        })
        .collect();
    let register = start.elapsed();
    assert_eq!(root.router().entries(), entries + QUEUES);
    let start = Instant::now();
    for (kick, irq, gsi) in queues {
        drop((kick, irq));
        root.router().remove(gsi).unwrap();
    }
    let teardown = start.elapsed();
    assert_eq!(root.router().entries(), entries);
    (register, teardown)
}

/// `QUEUES` ioeventfds unregistered in registration order, or in reverse.
fn ioevent_teardown(root: &Vm, reverse: bool) -> Duration {
    let kicks = notifiers();
    let mut regs: Vec<_> = (0..QUEUES)
        .map(|i| root.ioevent(kick_match(i), &kicks[i]).unwrap())
        .collect();
    if reverse {
        regs.reverse();
    }
    let start = Instant::now();
    drop(regs);
    start.elapsed()
}

/// The first and the second ioeventfd unregistration on a fresh VM.
fn first_and_second_unregistration() -> (Duration, Duration) {
    let vm = TinyVm::new().unwrap();
    let kicks = notifiers();
    let a = vm.notify().ioevent(kick_match(0), &kicks[0]).unwrap();
    let b = vm.notify().ioevent(kick_match(1), &kicks[1]).unwrap();
    let start = Instant::now();
    drop(a);
    let first = start.elapsed();
    let start = Instant::now();
    drop(b);
    (first, start.elapsed())
}

fn per_queue(d: Duration) -> f64 {
    us(d) / QUEUES as f64
}

/// Descriptors the process holds.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The process's resident memory, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Kick-and-wait rounds over every queue, per guest.
const TRIPS_ROUNDS: u64 = 2;
const VECTOR: u8 = 0x40;

/// What one configuration of VMs in one process measured.
#[derive(Debug, Default, Clone, Copy)]
struct Scale {
    register_us_per_queue: f64,
    fds_per_queue: f64,
    rss_kib_per_queue: f64,
    round_trips_per_s: f64,
    trips: u64,
    teardown_us_per_queue: f64,
}

/// `vms` tiny VMs of `QUEUES` queues each in this process, one device thread serving them all.
fn vms_in_this_process(vms: usize) -> Scale {
    let mut machines: Vec<TinyVm> = (0..vms).map(|_| TinyVm::new().unwrap()).collect();
    let queues = vms * QUEUES;
    let (fds, rss) = (open_fds(), rss_kib());
    let kicks: Vec<Notifier> = (0..queues)
        .map(|_| Notifier::new(Mode::Counter).unwrap())
        .collect();
    let calls: Vec<Notifier> = (0..queues)
        .map(|_| Notifier::new(Mode::Counter).unwrap())
        .collect();
    let start = Instant::now();
    let batches: Vec<_> = machines
        .iter()
        .enumerate()
        .map(|(v, vm)| {
            let own = v * QUEUES..(v + 1) * QUEUES;
            let kick_list: Vec<_> = kicks[own.clone()]
                .iter()
                .enumerate()
                .map(|(i, n)| (kick_match(i), n))
                .collect();
            let call_list: Vec<_> = calls[own]
                .iter()
                .map(|n| (MsiMessage::x86(0, VECTOR), n))
                .collect();
            vm.notify().batch(&kick_list, &call_list).unwrap()
        })
        .collect();
    let register = start.elapsed();
    let (fds_after, rss_after) = (open_fds(), rss_kib());

    // One device thread: a kick on any queue raises that queue's interrupt.
    let events = EventLoop::new().unwrap();
    for (token, n) in kicks.iter().enumerate() {
        events.add(token as u64, n).unwrap();
    }
    let stop = events.stop_handle();
    let raise: Vec<Notifier> = calls.to_vec();
    let device = thread::spawn(move || {
        let mut served = 0u64;
        let mut ready = Vec::new();
        while events.wait(None, &mut ready).unwrap() == Wake::Ready {
            for &(q, count) in &ready {
                served += count;
                raise[q as usize].notify().unwrap();
            }
        }
        served
    });
    let start = Instant::now();
    let runs: Vec<Running> = machines
        .iter_mut()
        .map(|vm| {
            vm.start(program(), |e: &GuestExit, _: &mut [u8]| {
                panic!("unexpected exit {e:?}")
            })
            .unwrap()
        })
        .collect();
    for run in runs {
        run.wait(Duration::from_secs(600)).done().unwrap();
    }
    let elapsed = start.elapsed();
    stop.stop().unwrap();
    let served = device.join().unwrap();
    let trips = TRIPS_ROUNDS * queues as u64;
    assert_eq!(served, trips, "kicks served");
    for vm in &machines {
        assert_eq!(
            vm.irq_count(VECTOR).unwrap(),
            TRIPS_ROUNDS * QUEUES as u64,
            "interrupts a guest took"
        );
    }
    let start = Instant::now();
    for batch in batches {
        batch.teardown().unwrap();
    }
    let teardown = start.elapsed();
    Scale {
        register_us_per_queue: per(register, queues),
        fds_per_queue: (fds_after - fds) as f64 / queues as f64,
        rss_kib_per_queue: rss_after.saturating_sub(rss) as f64 / queues as f64,
        round_trips_per_s: trips as f64 / elapsed.as_secs_f64(),
        trips,
        teardown_us_per_queue: per(teardown, queues),
    }
}

/// The guest: `TRIPS_ROUNDS` times, kick each queue in turn and wait for the interrupt.
fn program() -> GuestProgram {
    let mut p = GuestProgram::new().unwrap();
    p.enable_lapic().unwrap();
    p.on_interrupt(VECTOR, Eoi::Lapic);
    p.repeat(TRIPS_ROUNDS, |p| {
        p.asm().mov(r12, NOTIFY)?;
        p.repeat(QUEUES as u64, |p| {
            p.asm().mov(dword_ptr(r12), eax)?;
            p.wait_for_interrupt()?;
            p.asm().add(r12, 8)?;
            Ok(())
        })
    })
    .unwrap();
    p.exit().unwrap();
    p
}

fn per(d: Duration, n: usize) -> f64 {
    us(d) / n as f64
}

const CHILD: &str = "VM_NOTIFY_SCALE_CHILD";

/// `n` processes at once, each this bench with one VM; their figures, and the wall time.
fn processes(n: usize) -> (Vec<Scale>, Duration) {
    let start = Instant::now();
    let children: Vec<_> = (0..n)
        .map(|_| {
            Command::new(std::env::current_exe().unwrap())
                .env(CHILD, "1")
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let rows = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success(), "a child failed");
            let text = String::from_utf8(out.stdout).unwrap();
            let f: Vec<f64> = text
                .trim()
                .rsplit_once("child ")
                .unwrap()
                .1
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect();
            Scale {
                register_us_per_queue: f[0],
                fds_per_queue: f[1],
                rss_kib_per_queue: f[2],
                round_trips_per_s: f[3],
                trips: f[4] as u64,
                teardown_us_per_queue: f[5],
            }
        })
        .collect();
    (rows, start.elapsed())
}

fn mean(rows: &[Scale], f: impl Fn(&Scale) -> f64) -> f64 {
    rows.iter().map(f).sum::<f64>() / rows.len() as f64
}

fn main() {
    if std::env::var_os(CHILD).is_some() {
        let s = vms_in_this_process(1);
        println!(
            "child {} {} {} {} {} {}",
            s.register_us_per_queue,
            s.fds_per_queue,
            s.rss_kib_per_queue,
            s.round_trips_per_s,
            s.trips,
            s.teardown_us_per_queue
        );
        return;
    }
    if !vm_notify_testkit::kvm_or_skip("bench scale") {
        return;
    }
    let rounds = rounds(ROUNDS);
    let mut t: [Vec<Duration>; 8] = Default::default();
    for _ in 0..rounds {
        let vm = TinyVm::new().unwrap();
        let (r, d) = batched(vm.notify());
        t[0].push(r);
        t[1].push(d);
        let vm = TinyVm::new().unwrap();
        let (r, d) = one_by_one(vm.notify());
        t[2].push(r);
        t[3].push(d);
        let vm = TinyVm::new().unwrap();
        t[4].push(ioevent_teardown(vm.notify(), false));
        let vm = TinyVm::new().unwrap();
        t[5].push(ioevent_teardown(vm.notify(), true));
        let (first, second) = first_and_second_unregistration();
        t[6].push(first);
        t[7].push(second);
    }
    let [reg_b, down_b, reg_1, down_1, fwd, rev, first, second] = t.map(median);
    println!("Registration and teardown, {QUEUES} queues (kick ioeventfd + MSI route and irqfd), median of {rounds} (cargo bench --bench scale):");
    println!("| measurement | batched (`Vm::batch`) | one queue at a time | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| register, per queue | {:.1} us | {:.1} us | {:.1}x |",
        per_queue(reg_b),
        per_queue(reg_1),
        us(reg_1) / us(reg_b)
    );
    println!(
        "| teardown, per queue | {:.1} us | {:.1} us | {:.1}x |",
        per_queue(down_b),
        per_queue(down_1),
        us(down_1) / us(down_b)
    );
    println!(
        "ioeventfd teardown, per registration: in registration order {:.1} us, in reverse {:.1} us (reverse / forward {:.2})",
        per_queue(fwd),
        per_queue(rev),
        us(rev) / us(fwd)
    );
    println!(
        "one ioeventfd unregistration on a fresh VM: the first {:.1} us, the second {:.1} us",
        us(first),
        us(second)
    );

    // Many VMs: as many as the descriptor limit allows, two descriptors a queue plus a few per VM.
    let limit = raise_fd_limit();
    let fit = ((limit as usize).saturating_sub(256) / (2 * QUEUES + 8)).max(1);
    let quick = rounds == 1;
    let asked = if quick { vec![1, 4] } else { vec![1, 16, 64] };
    // In one process the descriptor limit caps the VMs; each process has a limit of its own.
    let mut counts: Vec<usize> = asked.iter().map(|&c| c.min(fit)).collect();
    counts.dedup();
    println!();
    println!(
        "Many VMs of {QUEUES} queues (descriptor limit {limit}: at most {fit} VMs in one process):"
    );
    println!("| VMs | where | register / queue | descriptors / queue | RSS / queue | round trips / s (one device thread per process) | teardown / queue |");
    println!("|---|---|---|---|---|---|---|");
    for (&asked, &n) in asked
        .iter()
        .zip(counts.iter().chain(std::iter::repeat(&fit)))
    {
        let n = n.min(asked);
        let s = vms_in_this_process(n);
        println!(
            "| {n} | one process | {:.1} us | {:.2} | {:.2} KiB | {:.0} ({} trips, exact) | {:.1} us |",
            s.register_us_per_queue,
            s.fds_per_queue,
            s.rss_kib_per_queue,
            s.round_trips_per_s,
            s.trips,
            s.teardown_us_per_queue
        );
        let (rows, wall) = processes(asked);
        let trips: u64 = rows.iter().map(|r| r.trips).sum();
        println!(
            "| {asked} | {asked} processes, one VM each | {:.1} us | {:.2} | {:.2} KiB | {:.0} in all ({trips} trips, exact; {:.0} per process) | {:.1} us |",
            mean(&rows, |r| r.register_us_per_queue),
            mean(&rows, |r| r.fds_per_queue),
            mean(&rows, |r| r.rss_kib_per_queue),
            trips as f64 / wall.as_secs_f64(),
            mean(&rows, |r| r.round_trips_per_s),
            mean(&rows, |r| r.teardown_us_per_queue),
        );
    }
}

/// Raises the soft descriptor limit to the hard one; returns it.
fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or write one valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    lim.rlim_cur
}
