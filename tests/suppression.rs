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

use common::suppression::{check, random_depths, run, Counts, Serving};
use vm_notify::virtio::{Moderation, ServeStats};
use vm_notify_testkit::{kvm_test, Suppression};

const REQUESTS: u64 = 100_000;
const SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// A run of `REQUESTS` at random depths, which crosses the 16-bit index wrap-around.
fn run_mode(mode: Suppression, serving: Serving) -> Counts {
    let c = run(
        mode,
        serving,
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
    check(
        Suppression::Off,
        &run_mode(Suppression::Off, Serving::Serve(None)),
    );
}

#[test]
fn event_idx_interrupts_once_per_wait_and_kicks_only_when_asked() {
    kvm_test!();
    check(
        Suppression::EventIdx,
        &run_mode(Suppression::EventIdx, Serving::Serve(None)),
    );
}

#[test]
fn flags_suppress_both_ways() {
    kvm_test!();
    check(
        Suppression::Flags,
        &run_mode(Suppression::Flags, Serving::Serve(None)),
    );
}

/// A driver that asks for an interrupt at the next used buffer whenever it waits (as Linux's
/// does): without moderation the device interrupts for each buffer used while the driver
/// sleeps; with it, the interrupts of a batch still in the ring are held and go as one. The
/// counts stay exact either way; moderation never holds one past the call that served it.
#[test]
fn moderation_merges_the_interrupts_an_eager_driver_asks_for() {
    kvm_test!();
    let plain = run_mode(Suppression::EventIdxEach, Serving::Serve(None));
    check(Suppression::EventIdxEach, &plain);
    let moderation = Moderation {
        max_held: 32,
        budget: Duration::from_millis(1),
    };
    let moderated = run_mode(Suppression::EventIdxEach, Serving::Serve(Some(moderation)));
    check(Suppression::EventIdxEach, &moderated);
    let per_request = |c: &Counts| c.device.interrupts as f64 / c.requests as f64;
    eprintln!(
        "interrupts per request: {:.4} without moderation, {:.4} with",
        per_request(&plain),
        per_request(&moderated)
    );
}

/// An asynchronous backend's way: every chain of a wake-up taken, then completed later, out of
/// order (last taken first), as one batch. Against the eager driver of the test above, a batch
/// costs at most one interrupt, every request still completes with its length, and no wake-up
/// is lost on either side.
#[test]
fn chains_completed_later_a_batch_at_a_time_cost_one_interrupt_a_batch() {
    kvm_test!();
    let deferred = run_mode(Suppression::EventIdxEach, Serving::Deferred);
    check(Suppression::EventIdxEach, &deferred);
    assert!(deferred.device.interrupts <= deferred.device.wakeups);
    eprintln!(
        "interrupts per request: {:.4}, per wake-up {:.4}",
        deferred.device.interrupts as f64 / deferred.requests as f64,
        deferred.device.interrupts as f64 / deferred.device.wakeups as f64
    );
}

/// Ring polling: after the ring runs dry the device watches it a while with kicks still off, so
/// buffers the guest makes available meanwhile need no kick (no exit). Every request completes,
/// the guest's kicks still equal the device's exactly, and polling caught buffers the guest
/// did not kick for.
#[test]
fn ring_polling_takes_buffers_the_guest_did_not_kick_for() {
    kvm_test!();
    let plain = run_mode(Suppression::EventIdx, Serving::Serve(None));
    let polled = run_mode(
        Suppression::EventIdx,
        Serving::Polled(Duration::from_micros(200)),
    );
    check(Suppression::EventIdx, &polled);
    assert!(polled.device.polled > 0, "polling caught nothing");
    let per_request = |c: &Counts| c.guest_kicks as f64 / c.requests as f64;
    eprintln!(
        "kicks per request: {:.4} without polling, {:.4} with ({} caught while polling)",
        per_request(&plain),
        per_request(&polled),
        polled.device.polled
    );
}

/// Ring polling on a CPU another thread wants: the device thread, pinned beside a thread that
/// takes the CPU whenever it wakes, polls what little it runs (its windows shrink when they catch
/// nothing, and back off when they are preempted) and every count still holds. The same run on a
/// free CPU is printed beside it. (`virtio::serve`'s unit test
/// `a_watch_that_loses_its_cpu_backs_polling_off` pins the back-off itself down.)
#[test]
fn ring_polling_gives_way_where_its_cpu_is_taken() {
    kvm_test!();
    let max = Duration::from_micros(200);
    let free = run_mode(Suppression::EventIdx, Serving::Polled(max));
    let taken = run_mode(Suppression::EventIdx, Serving::PolledBesideHog(max));
    check(Suppression::EventIdx, &taken);
    let d = taken.device;
    assert!(
        d.poll_ran_out + d.poll_preempted + d.poll_backed_off > 0,
        "polling was not on: {d:?}"
    );
    let per_wake_up = |s: &ServeStats| s.polled as f64 / s.wakeups as f64;
    eprintln!(
        "buffers caught while polling per wake-up: {:.3} on a free CPU ({} watches preempted, {} \
         wake-ups backed off), {:.3} beside the other thread ({} preempted, {} backed off)",
        per_wake_up(&free.device),
        free.device.poll_preempted,
        free.device.poll_backed_off,
        per_wake_up(&d),
        d.poll_preempted,
        d.poll_backed_off
    );
}
