//! Notification suppression both ways, with real guest code on both sides of the ring: the tiny
//! guest's driver (`GuestProgram::virtq_batches`) and `QueueServer` on the device thread, over a
//! virtio-pci queue (an any-width ioeventfd for kicks, an MSI-X vector for interrupts).
//!
//! 10^5 requests in batches of random depth (1 to 64) per mode — suppression off, the flags,
//! EVENT_IDX — crossing the 16-bit index wrap-around. Every request completes with its
//! descriptor's length and nothing hangs (a lost wake-up on either side would: the timeout
//! catches it); kicks are counted exactly on both sides; interrupts are bounded on both sides by
//! what the guest itself counted (see `check`).

use std::time::Duration;

mod common;

use common::suppression::{check, random_depths, run, Counts};
use vm_notify::virtio::Moderation;
use vm_notify_testkit::{kvm_test, Suppression};

const REQUESTS: u64 = 100_000;
const SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// A run of `REQUESTS` at random depths, which crosses the 16-bit index wrap-around.
fn run_mode(mode: Suppression, moderation: Option<Moderation>) -> Counts {
    let c = run(
        mode,
        moderation,
        &random_depths(SEED, REQUESTS),
        false,
        Duration::ZERO,
    );
    assert!(
        c.requests > 65536,
        "the run must cross the 16-bit wrap-around"
    );
    c
}

#[test]
fn suppression_off_every_buffer_interrupts_and_every_batch_kicks() {
    kvm_test!();
    check(Suppression::Off, &run_mode(Suppression::Off, None));
}

#[test]
fn event_idx_interrupts_once_per_wait_and_kicks_only_when_asked() {
    kvm_test!();
    check(
        Suppression::EventIdx,
        &run_mode(Suppression::EventIdx, None),
    );
}

#[test]
fn flags_suppress_both_ways() {
    kvm_test!();
    check(Suppression::Flags, &run_mode(Suppression::Flags, None));
}

/// A driver that asks for an interrupt at the next used buffer whenever it waits (as Linux's
/// does): without moderation the device interrupts for each buffer used while the driver
/// sleeps; with it, the interrupts of a batch still in the ring are held and go as one. The
/// counts stay exact either way; moderation never holds one past the call that served it.
#[test]
fn moderation_merges_the_interrupts_an_eager_driver_asks_for() {
    kvm_test!();
    let plain = run_mode(Suppression::EventIdxEach, None);
    check(Suppression::EventIdxEach, &plain);
    let moderation = Moderation {
        max_held: 32,
        budget: Duration::from_millis(1),
    };
    let moderated = run_mode(Suppression::EventIdxEach, Some(moderation));
    check(Suppression::EventIdxEach, &moderated);
    let per_request = |c: &Counts| c.device.interrupts as f64 / c.requests as f64;
    eprintln!(
        "interrupts per request: {:.4} without moderation, {:.4} with",
        per_request(&plain),
        per_request(&moderated)
    );
}
