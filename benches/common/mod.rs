//! What the benches share: the median and spread of repeated runs.

use std::time::Duration;

/// The median of `v` (the upper one for an even count).
#[allow(dead_code)] // each bench uses one of the two
pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// (median, min, max) of `values`.
#[allow(dead_code)]
pub fn stats(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// `d` in microseconds.
#[allow(dead_code)]
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The rounds a bench runs: `full`, or 1 with `--quick` on its command line (what `.ci/run`
/// passes: every case once, for the counts).
#[allow(dead_code)]
pub fn rounds(full: usize) -> usize {
    if std::env::args().any(|a| a == "--quick") {
        1
    } else {
        full
    }
}
