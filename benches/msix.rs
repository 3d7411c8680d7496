//! MSI-X routing and masking costs, measured side by side in one run.
//!
//! ```text
//! cargo bench --bench msix
//! ```
//!
//! * configuring 1024 vectors with one routing commit (`MsixVectors::configure`) against one
//!   commit per vector (`set_message` + `set_masked` each), irqfd assignment included in both;
//! * the same for bare routes (`GsiRouter::transaction` against `route_msi` per route);
//! * one `KVM_SET_GSI_ROUTING` with 1 entry and with 1024;
//! * one mask + unmask pair of a delivering vector.
//!
//! A plain harness with its own statistics (median of several rounds, rounds alternating between
//! the variants so machine noise hits both): the figures are ratios on a shared, nested host.

use std::time::{Duration, Instant};

use vm_notify::kvm::{GsiRouter, MsiMessage};
use vm_notify::msix::MsixVectors;
use vm_notify::{Mode, Notifier, Vm};
use vm_notify_testkit::TinyVm;

mod common;
use common::median;

const VECTORS: usize = 1024;
const ROUNDS: usize = 7;
const MASK_PAIRS: usize = 2000;

fn message(i: usize) -> MsiMessage {
    MsiMessage::x86(0, 0x40 + (i % 160) as u8)
}

/// Adds `count` MSI routes in one transaction.
fn add_routes(router: &GsiRouter, count: usize) -> Vec<u32> {
    let mut tx = router.transaction();
    let gsis = (0..count)
        .map(|i| tx.add_msi(message(i)).unwrap())
        .collect();
    tx.commit().unwrap();
    gsis
}

/// Removes `gsis` in one transaction.
fn remove_routes(router: &GsiRouter, gsis: Vec<u32>) {
    let mut tx = router.transaction();
    for gsi in gsis {
        tx.remove(gsi).unwrap();
    }
    tx.commit().unwrap();
}

fn configure_batched(vm: &Vm) -> Duration {
    let msix = vm.msix(VECTORS).unwrap();
    msix.write_message_control(vm_notify::msix::MSIX_ENABLE)
        .unwrap();
    let entries: Vec<_> = (0..VECTORS).map(|i| (i, message(i), false)).collect();
    let start = Instant::now();
    msix.configure(&entries).unwrap();
    let t = start.elapsed();
    assert!(msix.gsi(VECTORS - 1).unwrap().is_some());
    t
}

fn configure_one_by_one(vm: &Vm) -> Duration {
    let msix = vm.msix(VECTORS).unwrap();
    msix.write_message_control(vm_notify::msix::MSIX_ENABLE)
        .unwrap();
    let start = Instant::now();
    for i in 0..VECTORS {
        msix.set_message(i, message(i)).unwrap();
        msix.set_masked(i, false).unwrap();
    }
    let t = start.elapsed();
    assert!(msix.gsi(VECTORS - 1).unwrap().is_some());
    t
}

fn routes_batched(router: &GsiRouter) -> Duration {
    let start = Instant::now();
    let mut tx = router.transaction();
    let gsis: Vec<_> = (0..VECTORS)
        .map(|i| tx.add_msi(message(i)).unwrap())
        .collect();
    tx.commit().unwrap();
    let t = start.elapsed();
    remove_routes(router, gsis);
    t
}

fn routes_one_by_one(router: &GsiRouter) -> Duration {
    let start = Instant::now();
    let gsis: Vec<_> = (0..VECTORS)
        .map(|i| router.route_msi(message(i)).unwrap())
        .collect();
    let t = start.elapsed();
    remove_routes(router, gsis);
    t
}

/// Assigning 1024 irqfds on committed routes, eventfds created beforehand: the part of a batched
/// configuration that batching the routes cannot remove.
fn irqfds_alone(vm: &Vm) -> Duration {
    let router = vm.router();
    let gsis = add_routes(router, VECTORS);
    let notifiers: Vec<_> = (0..VECTORS)
        .map(|_| Notifier::new(Mode::Counter).unwrap())
        .collect();
    let start = Instant::now();
    let irqfds: Vec<_> = gsis
        .iter()
        .zip(&notifiers)
        .map(|(&gsi, n)| vm.irqfd_with(gsi, n).unwrap())
        .collect();
    let t = start.elapsed();
    drop(irqfds);
    remove_routes(router, gsis);
    t
}

/// Creating 1024 eventfds (descriptor table already grown by earlier rounds).
fn eventfds_alone() -> Duration {
    let start = Instant::now();
    let notifiers: Vec<_> = (0..VECTORS)
        .map(|_| Notifier::new(Mode::Counter).unwrap())
        .collect();
    let t = start.elapsed();
    drop(notifiers);
    t
}

/// One commit of the table as it stands plus `extra` routes (1 entry changed vs 1024 added).
fn one_commit(router: &GsiRouter, extra: usize) -> Duration {
    let gsis = add_routes(router, extra);
    // Time a commit of the same table size: change one message, send everything.
    let mut tx = router.transaction();
    if let Some(&gsi) = gsis.first() {
        tx.set_msi(gsi, message(1)).unwrap();
    }
    let start = Instant::now();
    tx.commit().unwrap();
    let t = start.elapsed();
    remove_routes(router, gsis);
    t
}

/// One vector, unmasked and enabled: delivering.
fn delivering_vector(vm: &Vm) -> MsixVectors {
    let msix = vm.msix(1).unwrap();
    msix.configure(&[(0, message(0), false)]).unwrap();
    msix.write_message_control(vm_notify::msix::MSIX_ENABLE)
        .unwrap();
    msix
}

fn mask_unmask(vm: &Vm) -> Duration {
    let msix = delivering_vector(vm);
    let start = Instant::now();
    for _ in 0..MASK_PAIRS {
        msix.set_masked(0, true).unwrap();
        msix.set_masked(0, false).unwrap();
    }
    start.elapsed() / MASK_PAIRS as u32
}

/// One retarget of a delivering vector (its message's destination moved between APIC 0 and 1):
/// the time per `set_message`, which is one routing commit.
fn retarget(vm: &Vm) -> Duration {
    let msix = delivering_vector(vm);
    let start = Instant::now();
    for i in 0..MASK_PAIRS {
        msix.set_message(0, MsiMessage::x86((i % 2) as u8, 0x40))
            .unwrap();
    }
    start.elapsed() / MASK_PAIRS as u32
}

fn main() {
    // `cargo test --benches` runs this with --bench absent: keep that quick.
    if !std::env::args().any(|a| a == "--bench") {
        println!("msix bench: run with `cargo bench --bench msix`");
        return;
    }
    if !vm_notify_testkit::kvm_or_skip("msix bench") {
        return;
    }
    let vm = TinyVm::new().unwrap();
    let router = vm.router();
    let (mut batched, mut single) = (Vec::new(), Vec::new());
    let (mut routes_tx, mut routes_single) = (Vec::new(), Vec::new());
    let (mut commit_small, mut commit_large) = (Vec::new(), Vec::new());
    let mut pairs = Vec::new();
    let mut retargets = Vec::new();
    let mut irqfds = Vec::new();
    let mut eventfds = Vec::new();
    for round in 0..ROUNDS {
        eprintln!("round {}/{ROUNDS}", round + 1);
        batched.push(configure_batched(vm.notify()));
        single.push(configure_one_by_one(vm.notify()));
        routes_tx.push(routes_batched(router));
        routes_single.push(routes_one_by_one(router));
        commit_small.push(one_commit(router, 1));
        commit_large.push(one_commit(router, VECTORS));
        pairs.push(mask_unmask(vm.notify()));
        retargets.push(retarget(vm.notify()));
        irqfds.push(irqfds_alone(vm.notify()));
        eventfds.push(eventfds_alone());
    }
    let (b, s) = (median(batched), median(single));
    let (rt, rs) = (median(routes_tx), median(routes_single));
    let (c1, c1024) = (median(commit_small), median(commit_large));
    let pair = median(pairs);
    let moved = median(retargets);
    let assign = median(irqfds);
    let create = median(eventfds);
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("vm-notify msix bench: median of {ROUNDS} rounds, variants alternating");
    println!("| measurement | median |");
    println!("|---|---|");
    println!(
        "| configure {VECTORS} vectors, one commit (`configure`) | {:.0} us |",
        us(b)
    );
    println!(
        "| configure {VECTORS} vectors, one commit per vector | {:.0} us |",
        us(s)
    );
    println!(
        "| **ratio per-vector / batched** | **{:.0}x** |",
        s.as_secs_f64() / b.as_secs_f64()
    );
    println!(
        "| {VECTORS} irqfd assignments alone (in both configurations) | {:.0} us |",
        us(assign)
    );
    println!(
        "| {VECTORS} eventfd creations alone (in both configurations) | {:.0} us |",
        us(create)
    );
    println!(
        "| {VECTORS} MSI routes, one transaction | {:.0} us |",
        us(rt)
    );
    println!(
        "| {VECTORS} MSI routes, `route_msi` each | {:.0} us |",
        us(rs)
    );
    println!("| ratio | {:.0}x |", rs.as_secs_f64() / rt.as_secs_f64());
    println!("| one KVM_SET_GSI_ROUTING, 41 entries | {:.0} us |", us(c1));
    println!(
        "| one KVM_SET_GSI_ROUTING, {} entries | {:.0} us |",
        40 + VECTORS,
        us(c1024)
    );
    println!(
        "| mask + unmask of a delivering vector | {:.1} us |",
        us(pair)
    );
    println!(
        "| retarget of a delivering vector (`set_message`, another APIC ID) | {:.1} us |",
        us(moved)
    );
}
