//! Entry points for the fuzz targets in `fuzz/` and for their corpus replay (cargo feature
//! `fuzzing`; not a stable API).
//!
//! [`dispatcher`] reads a sequence of operations from arbitrary bytes — registrations with any
//! address, width and datamatch (valid or not), removals, and guest writes — and runs them on an
//! [`ExitDispatcher`] and on a plain model of KVM's rules written independently of it (a list,
//! scanned linearly). It panics when they disagree: on a registration's outcome, on whether a
//! write is taken, or on any notifier's count. Any panic inside the library would surface the
//! same way.

use crate::bus::Width;
use crate::error::Error;
use crate::fallback::{ExitDispatcher, Key};
use crate::kvm::WriteMatch;
use crate::notifier::{Attempt, Mode, Notifier};

/// A registration as the model keeps it.
struct Reg {
    pio: bool,
    addr: u64,
    len: u32,
    datamatch: Option<u64>,
    in_kernel: bool,
    notifier: Notifier,
    key: Key,
    expected: u64,
    live: bool,
}

/// KVM's EEXIST rule (`ioeventfd_check_collision`).
fn collides(a: &Reg, pio: bool, addr: u64, len: u32, datamatch: Option<u64>) -> bool {
    a.live
        && a.pio == pio
        && a.addr == addr
        && (a.len == 0
            || len == 0
            || (a.len == len
                && (a.datamatch.is_none() || datamatch.is_none() || a.datamatch == datamatch)))
}

/// KVM's match rule (`ioeventfd_in_range`); kernel-held entries are never matched here.
fn matches(a: &Reg, pio: bool, addr: u64, len: u32, value: u64) -> bool {
    a.live
        && !a.in_kernel
        && a.pio == pio
        && a.addr == addr
        && (a.len == 0 || (a.len == len && a.datamatch.map_or(true, |d| d == value)))
}

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn u64(&mut self, n: usize) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..n.min(8) {
            v |= u64::from(self.u8()?) << (8 * i);
        }
        Some(v)
    }
}

/// Addresses cluster on a few values so registrations collide and writes hit them; sometimes
/// they come from the input whole, to reach the edges (wrapping, ports past 0xffff).
fn address(b: &mut Bytes<'_>) -> Option<u64> {
    let sel = b.u8()?;
    Some(match sel % 4 {
        0 => u64::MAX - u64::from(sel >> 2),
        1 => b.u64(8)?,
        _ => 0x100 + u64::from(sel >> 4) * 2,
    })
}

/// A value: from `n` input bytes when `wide`, else one of 0..=3 (so registrations and writes meet).
fn value(b: &mut Bytes<'_>, wide: bool, n: usize) -> Option<u64> {
    if wide {
        b.u64(n)
    } else {
        b.u8().map(|v| u64::from(v % 4))
    }
}

/// Runs the operations encoded in `data` against the dispatcher and the model (see the module
/// docs). Panics on a disagreement.
pub fn dispatcher(data: &[u8]) {
    let d = ExitDispatcher::new();
    let mut regs: Vec<Reg> = Vec::new();
    let mut b = Bytes(data);
    while let Some(op) = b.u8() {
        match op % 4 {
            0 | 3 => {
                let Some(addr) = address(&mut b) else { break };
                let Some(w) = b.u8() else { break };
                // Bits 0-2: width; 5: a value from 8 input bytes (else 0..=3, so writes match);
                // 6: a datamatch; 7: port I/O.
                let pio = w & 0x80 != 0;
                let width = [Width::Any, Width::W1, Width::W2, Width::W4, Width::W8]
                    [usize::from(w & 7) % 5];
                let datamatch = if w & 0x40 != 0 {
                    let Some(v) = value(&mut b, w & 0x20 != 0, 8) else {
                        break;
                    };
                    Some(v)
                } else {
                    None
                };
                let mut m = if pio {
                    WriteMatch::pio(addr)
                } else {
                    WriteMatch::mmio(addr)
                }
                .width(width);
                if let Some(v) = datamatch {
                    m = m.datamatch(v);
                }
                let in_kernel = op % 4 == 3;
                let notifier = Notifier::new(Mode::Counter).expect("eventfd");
                let got = d.insert(&m, notifier.clone(), in_kernel);
                match m.validate() {
                    Err(e) => assert!(
                        got.as_ref().is_err_and(|g| g.to_string() == e.to_string()),
                        "{m:?}: validation said {e}, insert said {got:?}"
                    ),
                    Ok(()) => {
                        let len = width.bytes();
                        let exists = regs.iter().any(|r| collides(r, pio, addr, len, datamatch));
                        match got {
                            Err(Error::IoEventExists { .. }) => {
                                assert!(exists, "{m:?}: refused, but nothing collides")
                            }
                            Err(e) => panic!("{m:?}: unexpected error {e}"),
                            Ok(key) => {
                                assert!(!exists, "{m:?}: accepted over a collision");
                                regs.push(Reg {
                                    pio,
                                    addr,
                                    len,
                                    datamatch,
                                    in_kernel,
                                    notifier,
                                    key,
                                    expected: 0,
                                    live: true,
                                });
                            }
                        }
                    }
                }
            }
            1 => {
                let Some(addr) = address(&mut b) else { break };
                let Some(l) = b.u8() else { break };
                // Bits 0-3: length (0 to 8); 5: a value from the input (else 0..=3); 7: port I/O.
                let pio = l & 0x80 != 0;
                let len = usize::from(l & 0xf) % 9;
                let Some(value) = value(&mut b, l & 0x20 != 0, len) else {
                    break;
                };
                let data = &value.to_le_bytes()[..len];
                let (addr, got) = if pio {
                    let port = addr as u16;
                    (u64::from(port), d.pio_write(port, data))
                } else {
                    (addr, d.mmio_write(addr, data))
                };
                let got = got.expect("eventfd write");
                let hit = (1..=8)
                    .contains(&len)
                    .then(|| {
                        regs.iter_mut()
                            .find(|r| matches(r, pio, addr, len as u32, value))
                    })
                    .flatten();
                assert_eq!(
                    got,
                    hit.is_some(),
                    "write of {len} bytes at {addr:#x} (pio {pio})"
                );
                if let Some(r) = hit {
                    r.expected += 1;
                }
            }
            _ => {
                let Some(i) = b.u8() else { break };
                let live: Vec<usize> = (0..regs.len()).filter(|&j| regs[j].live).collect();
                if let Some(&j) = live.get(usize::from(i) % live.len().max(1)) {
                    d.remove(&regs[j].key);
                    regs[j].live = false;
                }
            }
        }
    }
    assert_eq!(
        d.len(),
        regs.iter().filter(|r| r.live && !r.in_kernel).count()
    );
    for r in &regs {
        let count = match r.notifier.try_read().expect("eventfd read") {
            Attempt::Done(n) => n,
            Attempt::WouldBlock => 0,
        };
        assert_eq!(count, r.expected, "notifier of {:#x}", r.addr);
    }
}
