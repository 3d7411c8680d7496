//! A device's interrupt while the VMM reconfigures other interrupts as fast as it can: the p50 and
//! p99 of one trigger, idle and under each kind of churn, measured side by side in one run.
//!
//! ```text
//! cargo bench --bench contention
//! ```
//!
//! * **MSI-X trigger**: `MsixVectors::trigger` on a delivering vector (its kernel irqfd), the
//!   device's call alone;
//! * **injected MSI**: a trigger of an irqfd the VMM placed in userspace, from the device's write
//!   to the injector's `KVM_SIGNAL_MSI` (the injector looks the route up in the routing table);
//! * **route lookup**: that lookup alone (`GsiRouter::routes`), which waits whenever another
//!   thread holds the routing table's lock.
//!
//! The churn runs on another thread: masking, unmasking and retargeting the function's other
//! vectors (each a routing commit and irqfd deassign/assign), making and dropping irqfds on
//! another route, or masking and unmasking the whole function (every vector detached and
//! attached again, the device's own included). On this 2-CPU host the churn also takes a CPU
//! from the device, so the ratios include that; what the bench is for is a trigger never waiting
//! behind another vector's commit or an irqfd's teardown. The wait for an injection yields the
//! CPU as it polls (a spinning wait would take the injector's CPU while the churn has the other).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vm_notify::fallback::Policy;
use vm_notify::kvm::MsiMessage;
use vm_notify::msix::{MSIX_ENABLE, MSIX_FUNCTION_MASK};
use vm_notify::Vm;
use vm_notify_testkit::TinyVm;

mod common;
use common::us;

const VECTORS: usize = 16;

/// What runs beside the device.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Churn {
    Idle,
    /// The function's other vectors masked, unmasked and retargeted in turn.
    Vectors,
    /// Kernel irqfds made and dropped on another route.
    Irqfds,
    /// The function masked and unmasked through its message control, as a guest's driver does
    /// around a reconfiguration (every vector detached and attached again).
    Function,
}

/// The p50 and p99 of `samples`.
fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| us(samples[((samples.len() - 1) as f64 * q) as usize]);
    (at(0.50), at(0.99))
}

/// Runs `churn` on a thread until the returned flag is set.
fn start_churn(
    churn: Churn,
    root: &Vm,
    vectors: &vm_notify::msix::MsixVectors,
) -> (Arc<AtomicBool>, Option<thread::JoinHandle<u64>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let (root, vectors) = (root.clone(), vectors.clone());
    let handle = match churn {
        Churn::Idle => None,
        Churn::Vectors => Some(thread::spawn(move || {
            let mut ops = 0u64;
            while !flag.load(Ordering::Relaxed) {
                for i in 1..VECTORS {
                    vectors.set_masked(i, true).unwrap();
                    vectors.set_masked(i, false).unwrap();
                    let apic = (ops % 2) as u8;
                    vectors
                        .set_message(i, MsiMessage::x86(apic, 0x50 + i as u8))
                        .unwrap();
                    ops += 3;
                }
            }
            ops
        })),
        Churn::Function => Some(thread::spawn(move || {
            let mut ops = 0u64;
            while !flag.load(Ordering::Relaxed) {
                vectors
                    .write_message_control(MSIX_ENABLE | MSIX_FUNCTION_MASK)
                    .unwrap();
                vectors.write_message_control(MSIX_ENABLE).unwrap();
                ops += 2;
                // The device's vector is masked half the time: let it deliver between toggles.
                thread::sleep(Duration::from_micros(200));
            }
            ops
        })),
        Churn::Irqfds => Some(thread::spawn(move || {
            let gsi = root.router().route_msi(MsiMessage::x86(0, 0x70)).unwrap();
            let mut ops = 0u64;
            while !flag.load(Ordering::Relaxed) {
                drop(root.irqfd(gsi).unwrap());
                ops += 1;
            }
            root.router().remove(gsi).unwrap();
            ops
        })),
    };
    (stop, handle)
}

fn main() {
    // `cargo test --benches` runs this with --bench absent: keep that quick.
    if !std::env::args().any(|a| a == "--bench") {
        println!("contention bench: run with `cargo bench --bench contention`");
        return;
    }
    if !vm_notify_testkit::kvm_or_skip("contention bench") {
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let (direct_samples, injected_samples) = if quick { (500, 100) } else { (20_000, 4_000) };
    let vm = TinyVm::new().unwrap();
    let root = vm.notify().clone();
    let user = root.with_policy(Policy::Userspace);
    let injector = user.injector().unwrap();
    let _thread = injector.spawn().unwrap();
    let vectors = root.msix(VECTORS).unwrap();
    let entries: Vec<_> = (0..VECTORS)
        .map(|i| (i, MsiMessage::x86(0, 0x50 + i as u8), false))
        .collect();
    vectors.configure(&entries).unwrap();
    vectors.write_message_control(MSIX_ENABLE).unwrap();
    let gsi = user.router().route_msi(MsiMessage::x86(0, 0x60)).unwrap();
    let injected = user.irqfd(gsi).unwrap();

    println!(
        "| churn | MSI-X trigger p50 | p99 | injected MSI p50 | p99 | route lookup p50 | p99 | churn ops/s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut idle_p99 = (0.0, 0.0, 0.0);
    for churn in [Churn::Idle, Churn::Vectors, Churn::Irqfds, Churn::Function] {
        let (stop, handle) = start_churn(churn, &root, &vectors);
        let began = Instant::now();
        let direct: Vec<Duration> = (0..direct_samples)
            .map(|_| {
                let t = Instant::now();
                vectors.trigger(0).unwrap();
                t.elapsed()
            })
            .collect();
        let mut via_injector = Vec::with_capacity(injected_samples);
        for _ in 0..injected_samples {
            let before = injector.stats().injected;
            let t = Instant::now();
            injected.trigger().unwrap();
            while injector.stats().injected == before {
                // Give the CPU up: a device does not spin on its interrupt, and on two CPUs a
                // spinning wait would take the injector's while the churn has the other.
                thread::yield_now();
            }
            via_injector.push(t.elapsed());
        }
        let lookups: Vec<Duration> = (0..direct_samples)
            .map(|_| {
                let t = Instant::now();
                assert_eq!(user.router().routes(gsi).len(), 1);
                t.elapsed()
            })
            .collect();
        let elapsed = began.elapsed();
        stop.store(true, Ordering::Relaxed);
        let ops = handle.map_or(0, |h| h.join().unwrap());
        let (d50, d99) = percentiles(direct);
        let (i50, i99) = percentiles(via_injector);
        let (l50, l99) = percentiles(lookups);
        if churn == Churn::Idle {
            idle_p99 = (d99, i99, l99);
        }
        println!(
            "| {churn:?} | {d50:.1} µs | {d99:.1} µs ({:.2}x idle) | {i50:.1} µs | {i99:.1} µs ({:.2}x idle) | {l50:.2} µs | {l99:.2} µs ({:.1}x idle) | {:.0} |",
            d99 / idle_p99.0,
            i99 / idle_p99.1,
            l99 / idle_p99.2,
            ops as f64 / elapsed.as_secs_f64()
        );
    }
    let stats = injector.stats();
    assert_eq!(stats.failed, 0, "{stats:?}");
}
