//! [`RunReport`]: how a run ended and every exit the kernel did not absorb.

use std::fmt;
use std::time::Duration;

use crate::exit::GuestExit;
use crate::{Error, Result};

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The program wrote [`DONE_PORT`](super::layout::DONE_PORT).
    Done,
    /// The run did not end within its timeout; the vCPU was stopped.
    TimedOut,
    /// [`Running::pause`](crate::Running::pause) stopped the vCPU, with any exit it had made
    /// completed, so its state can be saved and the run resumed.
    Paused,
    /// The guest stopped in a way a test program should not: an unexpected interrupt vector, a
    /// triple fault, an emulator failure. The text says which, with the guest's RIP.
    Fault(String),
}

/// What a run did: how it ended, every exit that reached userspace, and how long it took.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// How the run ended.
    pub outcome: Outcome,
    /// Every exit that reached userspace, in order (the final `DONE_PORT` write excluded).
    pub exits: Vec<GuestExit>,
    /// Wall time from the first `KVM_RUN` to the end.
    pub elapsed: Duration,
}

impl RunReport {
    /// Whether the program ran to its [`exit`](crate::GuestProgram::exit).
    pub fn is_done(&self) -> bool {
        self.outcome == Outcome::Done
    }

    /// The report if the program ran to its end, else [`Error::Guest`].
    ///
    /// # Errors
    ///
    /// [`Error::Guest`] with the outcome.
    pub fn done(self) -> Result<RunReport> {
        if self.is_done() {
            Ok(self)
        } else {
            Err(Error::Guest(self.to_string()))
        }
    }

    /// The number of exits that `pred` accepts.
    pub fn count(&self, pred: impl Fn(&GuestExit) -> bool) -> usize {
        self.exits.iter().filter(|e| pred(e)).count()
    }

    /// The number of MMIO writes to `addr` that reached userspace.
    pub fn mmio_writes(&self, addr: u64) -> usize {
        self.count(|e| matches!(e, GuestExit::MmioWrite { addr: a, .. } if *a == addr))
    }

    /// The number of port writes to `port` that reached userspace.
    pub fn pio_writes(&self, port: u16) -> usize {
        self.count(|e| matches!(e, GuestExit::PioWrite { port: p, .. } if *p == port))
    }

    /// The number of exits the kit served for the split irqchip's IOAPIC (register accesses
    /// and `KVM_EXIT_IOAPIC_EOI`); always 0 on the in-kernel irqchip.
    pub fn ioapic_exits(&self) -> usize {
        self.count(GuestExit::is_ioapic)
    }

    /// The number of `KVM_EXIT_IOAPIC_EOI` exits for `vector`.
    pub fn ioapic_eois(&self, vector: u8) -> usize {
        self.count(|e| matches!(e, GuestExit::IoapicEoi { vector: v } if *v == vector))
    }

    /// The number of exits handed to the exit handler: all but [`ioapic_exits`](Self::ioapic_exits).
    pub fn handler_exits(&self) -> usize {
        self.exits.len() - self.ioapic_exits()
    }
}

impl fmt::Display for RunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "outcome {:?} after {:?}, {} exit(s) to userspace",
            self.outcome,
            self.elapsed,
            self.exits.len()
        )?;
        if let Some(last) = self.exits.last() {
            write!(f, ", last {last:?}")?;
        }
        Ok(())
    }
}
