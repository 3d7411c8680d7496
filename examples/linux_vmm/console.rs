//! The console's output: the guest's serial lines go to standard output, and the two lines
//! between which the guest reads its `/proc/interrupts` are watched, so each device's
//! deliveries are noted around the guest's count.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use crate::lock;

/// The console lines between which the guest reads its `/proc/interrupts`.
const SNAPSHOT_BEGINS: &[u8] = b"L2: interrupts snapshot begins";
const SNAPSHOT_ENDS: &[u8] = b"L2: interrupts snapshot ends";

/// A device's count of the interrupts the guest has taken from it: its MSI-X deliveries, or on a
/// level line the EOIs that resampled it (one per interrupt taken).
pub type Delivered = Box<dyn Fn() -> u64 + Send>;

/// Devices whose deliveries are noted when the guest announces its interrupt snapshot and when
/// it has taken it. A driver may start a request at any time (virtio-rng refills its buffer
/// ahead of the reader), so the guest's count is checked to lie between the two.
#[derive(Default)]
pub struct Watched {
    pub devices: Vec<(&'static str, Delivered)>,
    /// Per device: deliveries at the first line, then at the second.
    pub snapshot: Vec<(&'static str, u64, Option<u64>)>,
}

/// The serial console's output: stdout, watching for the snapshot lines.
pub struct Output {
    line: Vec<u8>,
    watched: Arc<Mutex<Watched>>,
}

impl Output {
    pub fn new(watched: Arc<Mutex<Watched>>) -> Self {
        Output {
            line: Vec::new(),
            watched,
        }
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            let has = |mark: &[u8]| self.line.windows(mark.len()).any(|w| w == mark);
            if has(SNAPSHOT_BEGINS) {
                let mut watched = lock(&self.watched);
                let snapshot = watched
                    .devices
                    .iter()
                    .map(|(name, delivered)| (*name, delivered(), None))
                    .collect();
                watched.snapshot = snapshot;
            } else if has(SNAPSHOT_ENDS) {
                let mut watched = lock(&self.watched);
                let ends: Vec<u64> = watched
                    .devices
                    .iter()
                    .map(|(_, delivered)| delivered())
                    .collect();
                for (noted, end) in watched.snapshot.iter_mut().zip(ends) {
                    noted.2 = Some(end);
                }
            }
            self.line.clear();
        }
        io::stdout().write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stdout().flush()
    }
}
