//! The fuzz targets of `fuzz/` on stable: every input of the committed corpus, then seeded random
//! inputs (`VM_NOTIFY_FUZZ_SEED`, `VM_NOTIFY_FUZZ_INPUTS`; the seed is printed). Each input runs
//! the exit dispatcher against a plain model of KVM's rules; a disagreement or a panic fails.
#![cfg(feature = "fuzzing")]

use std::path::Path;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    inputs.sort();
    inputs
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn dispatcher_corpus_and_random_inputs_match_the_model() {
    let inputs = corpus("dispatcher");
    assert!(!inputs.is_empty(), "the committed corpus is empty");
    for (name, data) in &inputs {
        let r = std::panic::catch_unwind(|| vm_notify::fuzz::dispatcher(data));
        assert!(r.is_ok(), "corpus input {name} failed");
    }
    let seed = env_u64("VM_NOTIFY_FUZZ_SEED", 0x5eed_2026_1125);
    let count = env_u64("VM_NOTIFY_FUZZ_INPUTS", 20_000);
    eprintln!(
        "replayed {} corpus inputs; now {count} random inputs from seed {seed:#x}",
        inputs.len()
    );
    let mut x = seed | 1;
    let mut next = move || {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..count {
        let len = (next() % 256) as usize;
        let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let r = std::panic::catch_unwind(|| vm_notify::fuzz::dispatcher(&data));
        assert!(
            r.is_ok(),
            "random input {i} (seed {seed:#x}) failed: {data:02x?}"
        );
    }
}
