//! [`RecordingInterrupt`]: a [`GuestInterrupt`] for unit tests without `/dev/kvm`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::device::{GuestInterrupt, LevelInterrupt, MaskableInterrupt};
use crate::error::{Error, Result};
use crate::notifier::{Attempt, Mode, Notifier};

/// A [`GuestInterrupt`] that records what the device asked for (feature `test-utils`). Its
/// eventfd is a real one: writes to it by another party are counted by
/// [`eventfd_writes`](Self::eventfd_writes). It implements [`vm_superio::Trigger`], so a
/// vm-superio device can be tested with it too.
#[derive(Debug)]
pub struct RecordingInterrupt {
    triggers: AtomicU64,
    eventfd: Notifier,
    level: Option<RecordedLevel>,
    mask: RecordedMask,
}

/// The level line of a [`RecordingInterrupt::level`].
#[derive(Debug)]
struct RecordedLevel {
    resample: Notifier,
    deasserts: AtomicU64,
}

/// The mask of a [`RecordingInterrupt`]: triggers while masked are held as one pending bit.
#[derive(Debug, Default)]
struct RecordedMask {
    masked: AtomicBool,
    pending: AtomicBool,
    deliveries_at_unmask: AtomicU64,
}

impl RecordingInterrupt {
    /// An edge interrupt.
    ///
    /// # Errors
    ///
    /// Those of [`Notifier::new`].
    pub fn edge() -> Result<Self> {
        Ok(RecordingInterrupt {
            triggers: AtomicU64::new(0),
            eventfd: Notifier::new(Mode::Counter)?,
            level: None,
            mask: RecordedMask::default(),
        })
    }

    /// A level line with a resample notifier ([`eoi`](Self::eoi) signals it).
    ///
    /// # Errors
    ///
    /// Those of [`Notifier::new`].
    pub fn level() -> Result<Self> {
        Ok(RecordingInterrupt {
            level: Some(RecordedLevel {
                resample: Notifier::new(Mode::Counter)?,
                deasserts: AtomicU64::new(0),
            }),
            ..RecordingInterrupt::edge()?
        })
    }

    /// How many times the device called [`trigger`](GuestInterrupt::trigger) (masked or not).
    pub fn triggers(&self) -> u64 {
        self.triggers.load(Ordering::Relaxed)
    }

    /// How many times the device lowered the level line ([`LevelInterrupt::deassert`]).
    pub fn deasserts(&self) -> u64 {
        self.level
            .as_ref()
            .map_or(0, |l| l.deasserts.load(Ordering::Relaxed))
    }

    /// How many times an unmask delivered a trigger held pending.
    pub fn deliveries_at_unmask(&self) -> u64 {
        self.mask.deliveries_at_unmask.load(Ordering::Relaxed)
    }

    /// What other writers added to the eventfd since the last call (read and cleared).
    ///
    /// # Errors
    ///
    /// Those of [`Notifier::try_read`].
    pub fn eventfd_writes(&self) -> Result<u64> {
        Ok(match self.eventfd.try_read()? {
            Attempt::Done(n) => n,
            Attempt::WouldBlock => 0,
        })
    }

    /// What the guest's EOI of a level line does: adds 1 to the resample notifier. Does nothing
    /// on an edge interrupt.
    ///
    /// # Errors
    ///
    /// Those of [`Notifier::notify`].
    pub fn eoi(&self) -> Result<()> {
        match &self.level {
            Some(l) => l.resample.notify(),
            None => Ok(()),
        }
    }
}

impl GuestInterrupt for RecordingInterrupt {
    fn trigger(&self) -> Result<bool> {
        self.triggers.fetch_add(1, Ordering::Relaxed);
        if self.mask.masked.load(Ordering::Relaxed) {
            self.mask.pending.store(true, Ordering::Relaxed);
        }
        Ok(true)
    }

    fn eventfd(&self) -> Result<Option<Notifier>> {
        Ok(Some(self.eventfd.clone()))
    }

    fn level(&self) -> Option<&dyn LevelInterrupt> {
        self.level.as_ref().map(|l| l as &dyn LevelInterrupt)
    }

    fn mask(&self) -> Option<&dyn MaskableInterrupt> {
        Some(&self.mask)
    }
}

impl LevelInterrupt for RecordedLevel {
    fn deassert(&self) -> Result<bool> {
        self.deasserts.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    fn resample(&self) -> &Notifier {
        &self.resample
    }
}

impl MaskableInterrupt for RecordedMask {
    fn set_masked(&self, masked: bool) -> Result<()> {
        self.masked.store(masked, Ordering::Relaxed);
        if !masked && self.pending.swap(false, Ordering::Relaxed) {
            self.deliveries_at_unmask.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn is_masked(&self) -> bool {
        self.masked.load(Ordering::Relaxed)
    }

    fn is_pending(&self) -> bool {
        self.pending.load(Ordering::Relaxed)
    }
}

impl vm_superio::Trigger for RecordingInterrupt {
    type E = Error;

    fn trigger(&self) -> Result<()> {
        GuestInterrupt::trigger(self).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_masked_trigger_is_delivered_once_at_unmask() {
        let irq = RecordingInterrupt::edge().unwrap();
        let mask = irq.mask().unwrap();
        mask.set_masked(true).unwrap();
        irq.trigger().unwrap();
        irq.trigger().unwrap();
        assert!(mask.is_pending());
        mask.set_masked(false).unwrap();
        mask.set_masked(false).unwrap();
        assert_eq!((irq.triggers(), irq.deliveries_at_unmask()), (2, 1));
        assert!(!mask.is_pending());
    }

    #[test]
    fn only_a_level_interrupt_has_a_line() {
        assert!(RecordingInterrupt::edge().unwrap().level().is_none());
        let irq = RecordingInterrupt::level().unwrap();
        let line = irq.level().unwrap();
        assert!(line.deassert().unwrap());
        irq.eoi().unwrap();
        assert_eq!((irq.deasserts(), line.resample().read().unwrap()), (1, 1));
    }
}
