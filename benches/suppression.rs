//! Notification suppression, side by side in one run: kicks and interrupts per request, requests
//! per second and batch round trips, at queue depths 1, 8 and 64, for each way the driver and the
//! device can suppress notifications.
//!
//! ```text
//! cargo bench --features virtio-queue --bench suppression              # 3 repetitions
//! cargo bench --features virtio-queue --bench suppression -- --quick   # 1, fewer requests
//! ```
//!
//! The driver is the tiny guest's (`GuestProgram::virtq_batches`), the device `QueueServer`, over
//! a virtio-pci queue; every run's counts are checked as `tests/suppression.rs` checks them. A
//! batch is `depth` requests made available one after another, each kicking unless suppressed;
//! its round trip runs from before the first is made available until the guest sees the last
//! used, timed with the guest's time-stamp counter. Requests per second are over the batches' summed round trips. The variants:
//!
//! * `off`: a kick for every request, an interrupt for every used buffer;
//! * `flags`: `VRING_USED_F_NO_NOTIFY` / `VRING_AVAIL_F_NO_INTERRUPT`;
//! * `event_idx`: EVENT_IDX, the driver asking for an interrupt at the next used buffer whenever
//!   it waits (as Linux's `virtqueue_enable_cb`);
//! * `event_idx+moderation`: the same driver, the device moderating (`QueueServer::moderate`);
//! * `event_idx_delayed`: EVENT_IDX, the driver asking for one interrupt at its batch's last
//!   buffer (as Linux's `virtqueue_enable_cb_delayed` does, roughly).
//!
//! Each repetition runs every variant of a depth one after the other, so machine noise hits
//! them alike; figures are medians over repetitions, and the `ratio` lines quotients of them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use vm_notify::virtio::Moderation;
use vm_notify_testkit::{kvm_test, Suppression};

#[path = "../tests/common/mod.rs"]
#[allow(dead_code)]
mod common;
use common::suppression::{check, run, Counts, Serving};

const DEPTHS: [u8; 3] = [1, 8, 64];
/// The device's time per request in the two regimes: none (the device, native, is far faster
/// than the guest's driver, whose every instruction is emulated here), and 20 µs (slower than
/// the driver's ~15 µs per request: the device is the bottleneck, as a backend doing I/O is).
const WORK: [Duration; 2] = [Duration::ZERO, Duration::from_micros(20)];

/// The variants, by name.
fn variants() -> Vec<(&'static str, Suppression, Option<Moderation>)> {
    vec![
        ("off", Suppression::Off, None),
        ("flags", Suppression::Flags, None),
        ("event_idx", Suppression::EventIdxEach, None),
        (
            "event_idx+moderation",
            Suppression::EventIdxEach,
            Some(Moderation::default()),
        ),
        ("event_idx_delayed", Suppression::EventIdx, None),
    ]
}

/// The host's time-stamp counter rate (the guest's runs at it too under KVM without TSC
/// scaling), measured over 200 ms.
fn tsc_hz() -> f64 {
    // SAFETY: RDTSC has no preconditions on x86-64.
    let read = || unsafe { core::arch::x86_64::_rdtsc() };
    let (t0, c0) = (Instant::now(), read());
    std::thread::sleep(Duration::from_millis(200));
    let (t1, c1) = (Instant::now(), read());
    (c1 - c0) as f64 / (t1 - t0).as_secs_f64()
}

/// One variant's figures in one run.
#[derive(Debug, Clone, Copy)]
struct Figures {
    kicks: f64,
    interrupts: f64,
    taken: f64,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
}

fn figures(c: &Counts, hz: f64) -> Figures {
    let requests = c.requests as f64;
    let mut ticks: Vec<u32> = c.ticks.clone();
    ticks.sort_unstable();
    let at = |q: f64| {
        let i = ((ticks.len() as f64 - 1.0) * q).round() as usize;
        f64::from(ticks[i]) / hz * 1e6
    };
    let total: f64 = c.ticks.iter().map(|&t| f64::from(t)).sum::<f64>() / hz;
    Figures {
        kicks: c.guest_kicks as f64 / requests,
        interrupts: c.device.interrupts as f64 / requests,
        taken: c.guest_irqs as f64 / requests,
        rps: requests / total,
        p50_us: at(0.5),
        p99_us: at(0.99),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    kvm_test!();
    let quick = std::env::args().any(|a| a == "--quick");
    let (reps, batches) = if quick { (1, 200) } else { (3, 2000) };
    let hz = tsc_hz();
    println!(
        "suppression bench: {reps} repetition(s), {batches} batches per run, TSC {:.0} MHz",
        hz / 1e6
    );
    for work in WORK {
        report(work, reps, batches, hz);
    }
}

/// Runs and prints one regime.
fn report(work: Duration, reps: usize, batches: usize, hz: f64) {
    let w = work.as_micros();
    println!("\ndevice work per request: {w} µs");
    let mut all: BTreeMap<(u8, &'static str), Vec<Figures>> = BTreeMap::new();
    for rep in 0..reps {
        for depth in DEPTHS {
            let depths = vec![depth; batches];
            for (name, mode, moderation) in variants() {
                let c = run(mode, Serving::Serve(moderation), &depths, true, work);
                check(mode, &c);
                let f = figures(&c, hz);
                eprintln!("rep {rep} work {w} µs depth {depth} {name}: {f:?}");
                all.entry((depth, name)).or_default().push(f);
            }
        }
    }
    println!(
        "{:>5}  {:<22} {:>14} {:>14} {:>14} {:>12} {:>10} {:>10}",
        "depth", "variant", "kicks/req", "irqs/req", "taken/req", "req/s", "p50 µs", "p99 µs"
    );
    let med = |depth: u8, name: &'static str, f: fn(&Figures) -> f64| {
        median(all[&(depth, name)].iter().map(f).collect())
    };
    for depth in DEPTHS {
        for (name, _, _) in variants() {
            println!(
                "{depth:>5}  {name:<22} {:>14.4} {:>14.4} {:>14.4} {:>12.0} {:>10.1} {:>10.1}",
                med(depth, name, |f| f.kicks),
                med(depth, name, |f| f.interrupts),
                med(depth, name, |f| f.taken),
                med(depth, name, |f| f.rps),
                med(depth, name, |f| f.p50_us),
                med(depth, name, |f| f.p99_us),
            );
        }
    }
    println!();
    println!(
        "ratio work{w}us_kicks_per_request_event_idx_depth64 = {:.4}",
        med(64, "event_idx", |f| f.kicks)
    );
    println!(
        "ratio work{w}us_interrupts_per_request_event_idx_moderation_depth64 = {:.4}",
        med(64, "event_idx+moderation", |f| f.interrupts)
    );
    for name in [
        "flags",
        "event_idx",
        "event_idx+moderation",
        "event_idx_delayed",
    ] {
        println!(
            "ratio work{w}us_p50_depth1_{name}_vs_off = {:.3}",
            med(1, name, |f| f.p50_us) / med(1, "off", |f| f.p50_us)
        );
        println!(
            "ratio work{w}us_rps_depth64_{name}_vs_off = {:.3}",
            med(64, name, |f| f.rps) / med(64, "off", |f| f.rps)
        );
    }
}
