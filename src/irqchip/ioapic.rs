//! [`Ioapic`]: the split irqchip's IOAPIC, in userspace.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use kvm_ioctls::VmFd;

use super::registers::{IoapicState, Redirection, Registers, Written, IOAPIC_PINS};
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
    /// Per pin, the changes waiting for their route to be committed (or committing): the pin's
    /// deliveries are held while any is.
    settling: [u32; IOAPIC_PINS],
    /// Pins with a routing commit in flight (made outside the lock, one per pin at a time).
    committing: u32,
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

    /// The route `pin` needs now (see [`Ioapic`]'s docs).
    fn route_needed(&self, pin: usize) -> Option<MsiMessage> {
        let resampled = self
            .sources
            .values()
            .any(|s| s.pin == pin && s.level.is_some());
        self.regs.route(pin, resampled)
    }
}

struct Shared {
    vm: Arc<VmFd>,
    router: GsiRouter,
    state: Mutex<State>,
    /// Signalled as a pin's routing commit ends.
    committed: Condvar,
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
/// level-triggered entry (committed when the guest changes the entry, not per interrupt). The
/// commit is made outside the IOAPIC's lock: interrupts on other pins are delivered meanwhile,
/// and those on the entry's own pin wait for it (nothing lost), so none is delivered before KVM
/// can report its EOI.
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
                    settling: [0; IOAPIC_PINS],
                    committing: 0,
                    sources: HashMap::new(),
                    next: 0,
                    stats: IoapicStats::default(),
                }),
                committed: Condvar::new(),
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
    /// that changes its level-triggered message changes KVM's route for the pin first (the
    /// pin's interrupts wait for it, other pins' do not); an unmask then delivers what waited
    /// (an edge latched while masked, a level line held).
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
        let (committed, delivered) = self.settle(state, pin);
        committed.and(delivered)
    }

    /// After a change to `pin`'s entry or sources: commits the route the pin needs now (see the
    /// type's docs) if it changed, then delivers what waits on the pin.
    ///
    /// The commit (`KVM_SET_GSI_ROUTING`, which waits for KVM's readers) is made without the
    /// lock, so other pins' deliveries go on; this pin's are held until the route is in place,
    /// as a level interrupt delivered before it would never have its EOI reported. Commits for one
    /// pin are made one at a time, each for the entry as it is then; the last change waiting
    /// releases the pin. A failed commit leaves KVM's route as it was and still releases the pin:
    /// the error goes to the caller, the interrupts waiting are delivered.
    ///
    /// Returns the commit's outcome and the delivery's.
    fn settle<'a>(
        &'a self,
        mut state: MutexGuard<'a, State>,
        pin: usize,
    ) -> (Result<()>, Result<()>) {
        let bit = 1 << pin;
        if state.settling[pin] == 0 && state.route_needed(pin) == state.routes[pin] {
            let msg = state.regs.service(pin);
            return (Ok(()), self.deliver(&mut state, pin, msg));
        }
        state.settling[pin] += 1;
        state.regs.hold(pin);
        while state.committing & bit != 0 {
            state = self
                .shared
                .committed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        let route = state.route_needed(pin);
        let mut committed = Ok(());
        if route != state.routes[pin] {
            state.committing |= bit;
            drop(state);
            committed = self.shared.router.set_pin_routes(&[(pin as Gsi, route)]);
            state = self.lock();
            state.committing &= !bit;
            self.shared.committed.notify_all();
            if committed.is_ok() {
                state.routes[pin] = route;
                state.stats.route_commits += 1;
            }
        }
        state.settling[pin] -= 1;
        if state.settling[pin] > 0 {
            return (committed, Ok(()));
        }
        let msg = state.regs.release(pin);
        (committed, self.deliver(&mut state, pin, msg))
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

    /// The IOAPIC's state, for a snapshot (take it with the vCPUs stopped, so the guest changes
    /// nothing meanwhile). A route change in flight is waited for first, so no pin is held and
    /// nothing kept for its release is left out. The level lines saved are those the sources
    /// assert; each source saves its own side ([`LevelIrqFd::save`](crate::LevelIrqFd::save)).
    pub fn save(&self) -> IoapicState {
        let mut state = self.lock();
        while state.settling.iter().any(|&n| n > 0) {
            state = self
                .shared
                .committed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        state.regs.save()
    }

    /// Puts `saved` on this IOAPIC, a fresh one (after the vCPUs' local APICs are restored, as
    /// it may deliver, and before the guest runs): the guest's entries
    /// with their remote IRR, the latched edges and the asserted lines, and the routes KVM
    /// needs for the level entries (so the EOI of an interrupt delivered before the snapshot
    /// still reaches the IOAPIC, and its line's sources get their resample). A level source
    /// attached afterwards to a pin whose line came back asserted holds that line, as the
    /// source it replaces did ([`Vm::restore_level_irqfd`](crate::Vm::restore_level_irqfd)).
    ///
    /// # Errors
    ///
    /// [`Error::SavedState`] for a state that does not fit (not 24 entries, a remote IRR on an
    /// edge entry, bits past the pins), before anything changes; those of a routing commit
    /// ([`Error::SetRouting`], [`Error::RouteTableFull`]) and [`Error::SignalMsi`], after the
    /// registers are in place.
    pub fn restore(&self, saved: &IoapicState) -> Result<()> {
        let regs = Registers::restored(saved).map_err(|what| Error::SavedState { what })?;
        self.lock().regs = regs;
        let mut first = Ok(());
        for pin in 0..IOAPIC_PINS {
            let (committed, delivered) = self.settle(self.lock(), pin);
            if first.is_ok() {
                first = committed.and(delivered);
            }
        }
        first
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
        // A level source on a pin whose line is up and held by no source (a restored state
        // left it asserted) holds the line, as the source it replaces did: lowered at the EOI
        // or at its deassert.
        let adopt = is_level && state.regs.line(pin) && !state.held(pin, token);
        let level = level.map(|(notifier, _)| (notifier, adopt));
        state.sources.insert(token, Source { pin, level });
        if !is_level {
            return Ok(token);
        }
        // A failed delivery of what waited on the pin is counted (`failed`) and is not this
        // source's: it is attached once its route is in place.
        match self.settle(state, pin).0 {
            Ok(()) => Ok(token),
            Err(e) => {
                self.lock().sources.remove(&token);
                Err(e)
            }
        }
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
        // A line another source holds leaves the pin's route as it is: delivered first.
        let delivered = self.deliver(&mut state, s.pin, msg);
        let (routed, served) = match s.level {
            Some(_) => self.settle(state, s.pin),
            None => (Ok(()), Ok(())),
        };
        routed.and(delivered).and(served)
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
