//! [`ExitDispatcher`]: the userspace path for guest writes the kernel did not take.
//!
//! Where a registration lives in userspace, the guest's write exits to the VMM as
//! `KVM_EXIT_MMIO` / `KVM_EXIT_IO`; the VMM hands it to [`ExitDispatcher::mmio_write`] or
//! [`ExitDispatcher::pio_write`], which finds the registration by the kernel's own rules and adds
//! 1 to its notifier. The device cannot tell which path carried the kick.
//!
//! Matching, as KVM's ioeventfd does it: the write's address must equal the registration's; an
//! any-width registration matches every write there; a sized one only writes of its width; a
//! datamatch compares the written value. Registration refuses overlaps by KVM's EEXIST rule (same
//! address and either side any-width, or equal widths with either side without datamatch or equal
//! datamatches), so at most one registration matches a write.
//!
//! The hot path takes a read lock, makes at most three ordered-map lookups (O(log n)) and one
//! eventfd write; it allocates nothing.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::bus::IoEventAddress;
use crate::error::{Error, Result};
use crate::kvm::WriteMatch;
use crate::notifier::Notifier;

/// A registration's identity in the dispatcher, ordered so that one address's entries are
/// adjacent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Key {
    pio: bool,
    addr: u64,
    len: u32,
    datamatch: Option<u64>,
}

impl Key {
    fn of(write: &WriteMatch) -> Key {
        Key {
            pio: matches!(write.address(), IoEventAddress::Pio(_)),
            addr: write.address().raw(),
            len: write.write_width().bytes(),
            datamatch: write.data(),
        }
    }

    /// KVM's EEXIST rule between two registrations at the same address.
    fn overlaps(&self, other: &Key) -> bool {
        self.pio == other.pio
            && self.addr == other.addr
            && (self.len == 0
                || other.len == 0
                || (self.len == other.len
                    && (self.datamatch.is_none()
                        || other.datamatch.is_none()
                        || self.datamatch == other.datamatch)))
    }
}

struct Entry {
    notifier: Notifier,
    /// Held by the kernel: recorded for the overlap rule only, never matched here.
    in_kernel: bool,
}

/// Finds the registration a guest write matches and signals its notifier. Cheap to clone;
/// clones share one table.
#[derive(Clone, Default)]
pub struct ExitDispatcher {
    table: Arc<RwLock<BTreeMap<Key, Entry>>>,
}

impl fmt::Debug for ExitDispatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.read();
        f.debug_struct("ExitDispatcher")
            .field("userspace", &t.values().filter(|e| !e.in_kernel).count())
            .field("in_kernel", &t.values().filter(|e| e.in_kernel).count())
            .finish()
    }
}

impl ExitDispatcher {
    /// An empty dispatcher.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<Key, Entry>> {
        // Entries are inserted and removed whole; a panic elsewhere leaves the map consistent.
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<Key, Entry>> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `write` with its notifier. `in_kernel` entries only take part in the overlap
    /// check.
    pub(crate) fn insert(
        &self,
        write: &WriteMatch,
        notifier: Notifier,
        in_kernel: bool,
    ) -> Result<Key> {
        self.insert_checked(write, notifier, in_kernel, false)
            .map(|key| key.expect("inserted without the shadow check"))
    }

    /// Records `write` as held in the kernel unless the kernel would mishandle it next to the
    /// kernel-held entries (see `shadows`): `None` then.
    /// The check and the record are one step, so two registrations made at once cannot both
    /// pass the check before either is recorded.
    pub(crate) fn insert_in_kernel(
        &self,
        write: &WriteMatch,
        notifier: Notifier,
    ) -> Result<Option<Key>> {
        self.insert_checked(write, notifier, true, true)
    }

    fn insert_checked(
        &self,
        write: &WriteMatch,
        notifier: Notifier,
        in_kernel: bool,
        shadow_check: bool,
    ) -> Result<Option<Key>> {
        write.validate()?;
        let key = Key::of(write);
        let mut t = self.write();
        let first = Key {
            len: 0,
            datamatch: None,
            ..key
        };
        if t.range(first..)
            .take_while(|(k, _)| k.pio == key.pio && k.addr == key.addr)
            .any(|(k, _)| k.overlaps(&key))
        {
            return Err(Error::IoEventExists {
                addr: write.address(),
            });
        }
        if shadow_check && shadows(&t, &key) {
            return Ok(None);
        }
        t.insert(
            key,
            Entry {
                notifier,
                in_kernel,
            },
        );
        Ok(Some(key))
    }

    pub(crate) fn remove(&self, key: &Key) {
        self.write().remove(key);
    }

    /// The number of registrations served here (kernel-held ones excluded).
    pub fn len(&self) -> usize {
        self.read().values().filter(|e| !e.in_kernel).count()
    }

    /// Whether no registration is served here.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A guest MMIO write of `data` (1 to 8 bytes, little-endian) at `addr`. Returns whether a
    /// registration took it; if not, the VMM emulates the write as usual.
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`] if the eventfd write fails.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> Result<bool> {
        self.dispatch(false, addr, data)
    }

    /// A guest port write of `data` (1, 2 or 4 bytes, little-endian) to `port`. Returns whether a
    /// registration took it.
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`] if the eventfd write fails.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> Result<bool> {
        self.dispatch(true, port.into(), data)
    }

    fn dispatch(&self, pio: bool, addr: u64, data: &[u8]) -> Result<bool> {
        let len = data.len();
        if len == 0 || len > 8 {
            return Ok(false);
        }
        let mut bytes = [0u8; 8];
        bytes[..len].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        let t = self.read();
        let key = |len: u32, datamatch: Option<u64>| Key {
            pio,
            addr,
            len,
            datamatch,
        };
        let sized = len as u32;
        let found = t
            .get(&key(0, None))
            .or_else(|| t.get(&key(sized, Some(value))))
            .or_else(|| t.get(&key(sized, None)));
        match found {
            Some(e) if !e.in_kernel => {
                e.notifier.notify()?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

/// Whether `new` in the kernel would form, with the kernel-held entries of `table`, the pattern
/// KVM's I/O bus mishandles: an any-width registration at A and a sized one on the same bus
/// starting below A and reaching A (`tests/kernel_quirks.rs`). Conservative: the kernel misses
/// writes only in some registration orders.
fn shadows(table: &BTreeMap<Key, Entry>, new: &Key) -> bool {
    let reaches = |sized: &Key, any: &Key| {
        sized.pio == any.pio
            && sized.len > 0
            && any.len == 0
            && sized.addr < any.addr
            && sized.addr.saturating_add(u64::from(sized.len)) >= any.addr
    };
    table
        .iter()
        .filter(|(_, e)| e.in_kernel)
        .any(|(k, _)| reaches(k, new) || reaches(new, k))
}

/// An entry of a dispatcher, removed when this is dropped.
pub(crate) struct Registered {
    dispatcher: ExitDispatcher,
    key: Key,
}

impl Registered {
    /// Records `write` in `dispatcher` (see [`ExitDispatcher::insert`]).
    pub(crate) fn insert(
        dispatcher: &ExitDispatcher,
        write: &WriteMatch,
        notifier: Notifier,
        in_kernel: bool,
    ) -> Result<Registered> {
        let key = dispatcher.insert(write, notifier, in_kernel)?;
        Ok(Registered {
            dispatcher: dispatcher.clone(),
            key,
        })
    }

    /// Records `write` as held in the kernel, unless that would shadow (see
    /// [`ExitDispatcher::insert_in_kernel`]).
    pub(crate) fn insert_in_kernel(
        dispatcher: &ExitDispatcher,
        write: &WriteMatch,
        notifier: Notifier,
    ) -> Result<Option<Registered>> {
        Ok(dispatcher
            .insert_in_kernel(write, notifier)?
            .map(|key| Registered {
                dispatcher: dispatcher.clone(),
                key,
            }))
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.dispatcher.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Width;
    use crate::notifier::{Attempt, Mode};

    fn counter() -> Notifier {
        Notifier::new(Mode::Counter).unwrap()
    }

    #[test]
    fn matches_by_the_kernel_rules() {
        let d = ExitDispatcher::new();
        let (any, w4, q1, q2, port) = (counter(), counter(), counter(), counter(), counter());
        d.insert(&WriteMatch::mmio(0x1000), any.clone(), false)
            .unwrap();
        d.insert(
            &WriteMatch::mmio(0x2000).width(Width::W4),
            w4.clone(),
            false,
        )
        .unwrap();
        d.insert(
            &WriteMatch::mmio(0x3000).width(Width::W2).datamatch(1),
            q1.clone(),
            false,
        )
        .unwrap();
        d.insert(
            &WriteMatch::mmio(0x3000).width(Width::W2).datamatch(2),
            q2.clone(),
            false,
        )
        .unwrap();
        d.insert(
            &WriteMatch::pio(0x1000).width(Width::W1),
            port.clone(),
            false,
        )
        .unwrap();
        assert_eq!(d.len(), 5);

        assert!(d.mmio_write(0x1000, &[1]).unwrap());
        assert!(d.mmio_write(0x1000, &[1; 8]).unwrap());
        assert!(d.mmio_write(0x2000, &[0; 4]).unwrap());
        assert!(!d.mmio_write(0x2000, &[0; 2]).unwrap(), "width 2 is not 4");
        assert!(
            !d.mmio_write(0x2001, &[0; 4]).unwrap(),
            "addresses match exactly"
        );
        assert!(d.mmio_write(0x3000, &[1, 0]).unwrap());
        assert!(d.mmio_write(0x3000, &[2, 0]).unwrap());
        assert!(d.mmio_write(0x3000, &[2, 0]).unwrap());
        assert!(!d.mmio_write(0x3000, &[3, 0]).unwrap());
        assert!(
            !d.mmio_write(0x3000, &[1, 0, 0, 0]).unwrap(),
            "datamatch needs the width"
        );
        assert!(d.pio_write(0x1000, &[9]).unwrap());
        assert!(!d.mmio_write(0x1000 + 0x10, &[9]).unwrap());
        assert!(!d.pio_write(0x2000, &[0; 4]).unwrap(), "buses are separate");

        assert_eq!(any.read().unwrap(), 2);
        assert_eq!(w4.read().unwrap(), 1);
        assert_eq!(q1.read().unwrap(), 1);
        assert_eq!(q2.read().unwrap(), 2);
        assert_eq!(port.read().unwrap(), 1);
    }

    #[test]
    fn overlaps_are_refused_by_the_eexist_rule() {
        let d = ExitDispatcher::new();
        let n = counter();
        let w4 = WriteMatch::mmio(0x50).width(Width::W4);
        d.insert(&w4.datamatch(1), n.clone(), false).unwrap();
        for clash in [w4, w4.datamatch(1), WriteMatch::mmio(0x50)] {
            assert!(
                matches!(
                    d.insert(&clash, n.clone(), false),
                    Err(Error::IoEventExists { .. })
                ),
                "{clash:?}"
            );
        }
        d.insert(&w4.datamatch(2), n.clone(), false).unwrap();
        d.insert(
            &WriteMatch::mmio(0x50).width(Width::W2).datamatch(1),
            n.clone(),
            false,
        )
        .unwrap();
        d.insert(&WriteMatch::pio(0x50), n.clone(), false).unwrap();
        // Kernel-held entries count for overlaps but are never matched here.
        d.insert(&WriteMatch::mmio(0x60), n.clone(), true).unwrap();
        assert!(matches!(
            d.insert(&WriteMatch::mmio(0x60).width(Width::W1), n.clone(), false),
            Err(Error::IoEventExists { .. })
        ));
        assert!(!d.mmio_write(0x60, &[0]).unwrap());
        assert_eq!(n.try_read().unwrap(), Attempt::WouldBlock);
    }

    #[test]
    fn removal_frees_the_address() {
        let d = ExitDispatcher::new();
        let n = counter();
        let key = d.insert(&WriteMatch::mmio(0x50), n.clone(), false).unwrap();
        d.remove(&key);
        assert!(!d.mmio_write(0x50, &[0]).unwrap());
        assert!(d.is_empty());
        d.insert(&WriteMatch::mmio(0x50), n.clone(), false).unwrap();
    }
}
