//! [`Ioapic`]: the split irqchip's IOAPIC, in userspace.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::VmFd;

use super::registers::{Redirection, Registers, Written, IOAPIC_PINS};
use crate::error::{Error, Result};
use crate::kvm::{Gsi, GsiRouter, MsiMessage};
use crate::notifier::Notifier;
use crate::sys;

/// What the IOAPIC has done since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoapicStats {
    /// Interrupts a local APIC took (`KVM_SIGNAL_MSI` answered that one did).
    pub delivered: u64,
    /// Interrupts no local APIC took (no such destination, or its LAPIC software-disabled):
    /// dropped, as the hardware drops them; a level pin does not wait for an EOI then.
    pub not_taken: u64,
    /// EOIs that ended a level pin's interrupt (cleared its remote IRR).
    pub eois: u64,
    /// Resample notifications sent to level sources at those EOIs.
    pub resamples: u64,
    /// Redirection-table changes that changed KVM's routes (one `KVM_SET_GSI_ROUTING` each).
    pub route_commits: u64,
    /// Deliveries `KVM_SIGNAL_MSI` failed: returned to the caller as [`Error::SignalMsi`] where
    /// there is one, counted here always (a source dropped has no caller).
    pub failed: u64,
}

/// A device's line on a pin.
struct Source {
    pin: usize,
    /// A level source: its resample notifier, and whether it holds the line asserted.
    level: Option<(Notifier, bool)>,
}

struct State {
    regs: Registers,
    /// The routes KVM has for the pins.
    routes: [Option<MsiMessage>; IOAPIC_PINS],
    sources: HashMap<u64, Source>,
    next: u64,
    stats: IoapicStats,
}

impl State {
    /// Whether a level source other than `except` holds `pin` asserted.
    fn held(&self, pin: usize, except: u64) -> bool {
        self.sources
            .iter()
            .any(|(&t, s)| t != except && s.pin == pin && matches!(s.level, Some((_, true))))
    }
}

struct Shared {
    vm: Arc<VmFd>,
    router: GsiRouter,
    state: Mutex<State>,
}

/// The IOAPIC of a VM on the split irqchip (`KVM_CAP_SPLIT_IRQCHIP`): the redirection table the
/// guest programs, edge and level pins with remote IRR, each pin's interrupt sent to the local
/// APICs as the MSI its entry makes. Cheap to clone: clones are one IOAPIC.
///
/// [`Vm::with_split_irqchip`](crate::Vm::with_split_irqchip) makes it, and every interrupt the
/// VM's backend makes on a GSI below 24 goes through it: an [`IrqFd`](crate::IrqFd) pulses its
/// pin, a [`LevelIrqFd`](crate::LevelIrqFd) holds its pin asserted until the guest's EOI, when the
/// pin is lowered and the resample notifier signalled — the contract of a kernel resample irqfd,
/// with exact counts. The VMM's vCPU loop gives it two things:
///
/// * the guest's MMIO accesses to [`IOAPIC_BASE`](super::IOAPIC_BASE)`..+`[`IOAPIC_SIZE`](super::IOAPIC_SIZE),
///   through an [`IoRegion::ioapic`](crate::io::IoRegion::ioapic) in its `IoManager`;
/// * `KVM_EXIT_IOAPIC_EOI`: [`end_of_interrupt`](Self::end_of_interrupt).
///
/// KVM reports the EOI of a vector only when a route on a pin below the reserved count is a
/// level-triggered MSI to that local APIC, so the IOAPIC keeps one such route for each
/// level-triggered entry (committed when the guest changes the entry, not per interrupt).
#[derive(Clone)]
pub struct Ioapic {
    shared: Arc<Shared>,
}

impl fmt::Debug for Ioapic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.lock();
        f.debug_struct("Ioapic")
            .field("sources", &s.sources.len())
            .field("stats", &s.stats)
            .finish()
    }
}

impl Ioapic {
    /// The IOAPIC of the split-irqchip VM `router` routes, in its reset state (every pin masked).
    pub(crate) fn new(router: &GsiRouter) -> Ioapic {
        Ioapic {
            shared: Arc::new(Shared {
                vm: router.vm().clone(),
                router: router.clone(),
                state: Mutex::new(State {
                    regs: Registers::default(),
                    routes: [None; IOAPIC_PINS],
                    sources: HashMap::new(),
                    next: 0,
                    stats: IoapicStats::default(),
                }),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change is made whole under the lock; a panic elsewhere leaves it consistent.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `msg` for `pin`. A level interrupt no local APIC took (KVM answers 0, or fails)
    /// leaves the pin not awaiting an EOI, as KVM's own IOAPIC does; only one taken is counted.
    fn deliver(&self, state: &mut State, pin: usize, msg: Option<MsiMessage>) -> Result<()> {
        let Some(msg) = msg else { return Ok(()) };
        match sys::signal_msi(&self.shared.vm, msg.address, msg.data) {
            Ok(true) => {
                state.stats.delivered += 1;
                Ok(())
            }
            Ok(false) => {
                state.regs.not_taken(pin);
                state.stats.not_taken += 1;
                Ok(())
            }
            Err(source) => {
                state.regs.not_taken(pin);
                state.stats.failed += 1;
                Err(Error::SignalMsi {
                    pin: pin as u32,
                    address: msg.address,
                    data: msg.data,
                    source,
                })
            }
        }
    }

    /// A guest read at `offset` from [`IOAPIC_BASE`](super::IOAPIC_BASE): fills `data`.
    pub(crate) fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        self.lock().regs.read(offset, data);
    }

    /// A guest write at `offset` from [`IOAPIC_BASE`](super::IOAPIC_BASE). A redirection entry
    /// that changes its level-triggered message changes KVM's route for the pin first; an
    /// unmask then delivers what waited (an edge latched while masked, a level line held).
    ///
    /// # Errors
    ///
    /// Those of a routing commit ([`Error::SetRouting`], [`Error::RouteTableFull`]) and
    /// [`Error::SignalMsi`]. The register keeps the guest's value either way.
    pub(crate) fn mmio_write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut state = self.lock();
        let Written::Entry(pin) = state.regs.write(offset, data) else {
            return Ok(());
        };
        self.sync_route(&mut state, pin)?;
        let msg = state.regs.service(pin);
        self.deliver(&mut state, pin, msg)
    }

    /// Commits the route `pin` needs now (see the module docs), if it changed.
    fn sync_route(&self, state: &mut State, pin: usize) -> Result<()> {
        let resampled = state
            .sources
            .values()
            .any(|s| s.pin == pin && s.level.is_some());
        let route = state.regs.route(pin, resampled);
        if route != state.routes[pin] {
            self.shared.router.set_pin_routes(&[(pin as Gsi, route)])?;
            state.routes[pin] = route;
            state.stats.route_commits += 1;
        }
        Ok(())
    }

    /// `KVM_EXIT_IOAPIC_EOI` for `vector`: each level pin awaiting that EOI has its remote IRR
    /// cleared, its line lowered and each of its sources' resample notifiers signalled (the
    /// device re-asserts while its condition holds). An edge pin with that vector and level
    /// sources is acknowledged the same way (lowered, resampled), as KVM's IOAPIC acknowledges
    /// every pin of the vector.
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`] if a resample write fails.
    pub fn end_of_interrupt(&self, vector: u8) -> Result<()> {
        let mut state = self.lock();
        // Every state change first, then the signals: a failed write leaves nothing half-done.
        let mut resample = Vec::new();
        let mut pins = state.regs.end_of_interrupt(vector);
        pins.extend(state.regs.edge_pins(vector).into_iter().filter(|&pin| {
            state
                .sources
                .values()
                .any(|s| s.pin == pin && s.level.is_some())
        }));
        for pin in pins {
            state.stats.eois += 1;
            for source in state.sources.values_mut().filter(|s| s.pin == pin) {
                if let Some((notifier, asserted)) = source.level.as_mut() {
                    *asserted = false;
                    resample.push(notifier.clone());
                }
            }
            // Lowering never delivers.
            let _ = state.regs.set_line(pin, false);
        }
        state.stats.resamples += resample.len() as u64;
        // A full counter (2^64 - 2 resamples unread) already tells the device to look.
        let mut first = Ok(());
        for notifier in resample {
            if let (Err(e), Ok(())) = (notifier.try_add(1).map(drop), &first) {
                first = Err(e);
            }
        }
        first
    }

    /// Redirection entry `pin` as the guest programmed it (with the IOAPIC's remote IRR), or
    /// `None` past the last pin.
    pub fn entry(&self, pin: usize) -> Option<Redirection> {
        (pin < IOAPIC_PINS).then(|| self.lock().regs.entry(pin))
    }

    /// Whether `pin`'s line is asserted.
    pub fn line(&self, pin: usize) -> bool {
        pin < IOAPIC_PINS && self.lock().regs.line(pin)
    }

    /// What the IOAPIC has done.
    pub fn stats(&self) -> IoapicStats {
        self.lock().stats
    }

    /// A source on `pin`: an edge one, or with `resample` a level one (whose pin then reports
    /// its EOIs, whatever the guest programs). Returns its token.
    ///
    /// # Errors
    ///
    /// Those of the routing commit a level source's first EOI report needs.
    pub(crate) fn attach(&self, pin: Gsi, resample: Option<&Notifier>) -> Result<u64> {
        let level = resample.map(|r| (r.clone(), false));
        let is_level = level.is_some();
        let mut state = self.lock();
        let token = state.next;
        state.next += 1;
        let pin = pin as usize;
        debug_assert!(pin < IOAPIC_PINS);
        state.sources.insert(token, Source { pin, level });
        if is_level {
            if let Err(e) = self.sync_route(&mut state, pin) {
                state.sources.remove(&token);
                return Err(e);
            }
        }
        Ok(token)
    }

    /// Removes source `token`; a level source's assertion goes with it, and the pin's EOI report
    /// with its last level source (on an edge entry). Where another source still holds the pin,
    /// its line is delivered if it waits (an earlier message nobody took).
    ///
    /// # Errors
    ///
    /// Those of the routing commit and [`Error::SignalMsi`]; the source is removed either way.
    pub(crate) fn detach(&self, token: u64) -> Result<()> {
        let mut state = self.lock();
        let Some(s) = state.sources.remove(&token) else {
            return Ok(());
        };
        let msg = if matches!(s.level, Some((_, true))) {
            let held = state.held(s.pin, token);
            state.regs.set_line(s.pin, held)
        } else {
            None
        };
        let routed = match s.level {
            Some(_) => self.sync_route(&mut state, s.pin),
            None => Ok(()),
        };
        let delivered = self.deliver(&mut state, s.pin, msg);
        routed.and(delivered)
    }

    /// Edge source `token` fired: one edge on its pin.
    pub(crate) fn pulse(&self, token: u64) -> Result<()> {
        let mut state = self.lock();
        let Some(pin) = state.sources.get(&token).map(|s| s.pin) else {
            return Ok(());
        };
        let msg = state.regs.pulse(pin);
        self.deliver(&mut state, pin, msg)
    }

    /// Level source `token` asserts its pin (until the EOI, or [`deassert`](Self::deassert)).
    pub(crate) fn assert(&self, token: u64) -> Result<()> {
        let mut state = self.lock();
        let Some(source) = state.sources.get_mut(&token) else {
            return Ok(());
        };
        let pin = source.pin;
        if let Some((_, asserted)) = source.level.as_mut() {
            *asserted = true;
        }
        let msg = state.regs.set_line(pin, true);
        self.deliver(&mut state, pin, msg)
    }

    /// Level source `token`'s condition cleared: it stops holding its pin (the pin stays
    /// asserted while another source holds it, and is delivered if it waits: an earlier message
    /// nobody took). Returns whether it held it.
    ///
    /// # Errors
    ///
    /// [`Error::SignalMsi`] for the delivery of a line another source holds.
    pub(crate) fn deassert(&self, token: u64) -> Result<bool> {
        let mut state = self.lock();
        let Some(source) = state.sources.get_mut(&token) else {
            return Ok(false);
        };
        let pin = source.pin;
        let Some((_, asserted)) = source.level.as_mut().filter(|(_, a)| *a) else {
            return Ok(false);
        };
        *asserted = false;
        let held = state.held(pin, token);
        let msg = state.regs.set_line(pin, held);
        self.deliver(&mut state, pin, msg)?;
        Ok(true)
    }
}
