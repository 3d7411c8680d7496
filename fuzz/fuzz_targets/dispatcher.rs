//! Arbitrary registrations, removals and guest writes on the userspace exit dispatcher, checked
//! against a plain model of KVM's rules (`vm_notify::fuzz::dispatcher`). On stable, the corpus
//! replays as `tests/fuzz_replay.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vm_notify::fuzz::dispatcher(data));
