//! The interrupt fallback: where an irqfd cannot be used, an [`Injector`] reads the device's
//! trigger notifiers and injects with `KVM_IRQ_LINE` or `KVM_SIGNAL_MSI`. The library starts no
//! thread for it: the VMM runs it, on a thread it spawns ([`Injector::spawn`], or
//! [`Injector::run`] on a thread of its own making), as it runs its device threads.
//!
//! The device-facing contract is the irqfd one:
//!
//! * **edge, irqchip route**: each wake-up of the trigger notifier (however many writes it
//!   coalesced) pulses the line: `KVM_IRQ_LINE` high, then low — one edge, as one irqfd injection.
//! * **edge, MSI route**: each wake-up sends the route's message with `KVM_SIGNAL_MSI`.
//! * **level, irqchip route**: a wake-up asserts the line (`KVM_IRQ_LINE` high) and the line
//!   *stays* high: the irqchip re-delivers at each EOI while it is. With an in-kernel irqchip
//!   userspace sees no EOI, so the line is lowered when the device says its condition cleared
//!   ([`LevelIrqFd::deassert`](crate::LevelIrqFd::deassert)); that lowering also drains a trigger
//!   not yet taken and adds 1 to the resample notifier, so a device written for KVM's resampler
//!   (re-assert on resample while the condition holds) runs unchanged.
//! * **a pin of the split irqchip's IOAPIC**: a wake-up pulses the pin (edge) or asserts it
//!   (level) on the VM's [`Ioapic`], which delivers, and at the guest's EOI lowers a level pin
//!   and signals its resample notifiers.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use kvm_ioctls::VmFd;

use crate::error::{Error, Result};
use crate::irqchip::Ioapic;
use crate::kvm::{Gsi, GsiRouter, Route};
use crate::notifier::{Attempt, Notifier};
use crate::sys;
use crate::wait::{EventLoop, StopHandle, Wake};

struct Line {
    gsi: Gsi,
    /// Read only under the lines lock, by `fire`, `deassert` or the final flush in `remove`, so
    /// each write is injected exactly once.
    trigger: Notifier,
    /// Set for a level line.
    level: Option<Level>,
    /// A pin of the split irqchip's IOAPIC, and this line's source token there.
    pin: Option<(Ioapic, u64)>,
}

/// A level line's state.
struct Level {
    resample: Notifier,
    /// Whether this injector holds the line high.
    asserted: bool,
}

struct Shared {
    vm: Arc<VmFd>,
    router: GsiRouter,
    events: EventLoop,
    lines: Mutex<HashMap<u64, Line>>,
    next: AtomicU64,
    health: Mutex<Health>,
}

/// What went wrong, for the VMM to see: the loop is the injector's and has no caller.
#[derive(Default)]
struct Health {
    stats: InjectorStats,
    /// The last injection that failed on every attempt, until taken.
    failure: Option<Error>,
    /// The errno a loop ended on, until a loop runs again.
    ended: Option<io::Error>,
}

/// What an [`Injector`] has done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InjectorStats {
    /// Injections made (a pulse, an MSI, a level assertion, a pin's pulse or assertion).
    pub injected: u64,
    /// Attempts that failed and were made again (a transient `KVM_IRQ_LINE` or
    /// `KVM_SIGNAL_MSI` error).
    pub retried: u64,
    /// Injections that failed on every attempt: the interrupt is lost, and the error kept for
    /// [`Injector::take_error`].
    pub failed: u64,
}

/// Attempts at one injection before it counts as failed.
const ATTEMPTS: usize = 3;

/// Serves the interrupts a [`Vm`](crate::Vm) placed in userspace ([`Vm::injector`](crate::Vm::injector)): it waits on their
/// trigger notifiers and injects (the contract is in the [`fallback`](super) docs). Cheap to clone.
///
/// The library starts no thread: until the VMM runs it, triggers wait in their notifiers (none
/// is lost; each is injected once the injector runs). [`spawn`](Self::spawn) starts a thread and
/// returns its handle, which stops and joins it when dropped; [`run`](Self::run) is the loop
/// itself, for a thread the VMM makes; [`serve_pending`](Self::serve_pending) is one pass
/// without waiting, for a VMM loop that polls its descriptor (`AsRawFd`), and with the feature
/// `event-manager` the injector is a `MutEventSubscriber` for the VMM's `EventManager`. A
/// stopped run can be followed by another: a VMM that pauses (for a snapshot, say) stops its
/// thread and spawns one again; triggers written meanwhile wait in their notifiers.
///
/// ```
/// # if !vm_notify_testkit::kvm_or_skip("doc example") { return Ok(()); }
/// use std::sync::Arc;
/// use vm_notify::fallback::Policy;
/// use vm_notify::Vm;
///
/// let kvm = kvm_ioctls::Kvm::new()?;
/// let fd = Arc::new(kvm.create_vm()?);
/// fd.create_irq_chip()?;
/// let vm = Vm::new(fd, Policy::Userspace)?;
/// // The VMM's thread for interrupts placed in userspace, stopped and joined when dropped:
/// let injector = vm.injector()?.spawn()?;
/// let irq = vm.irqfd(4)?;
/// irq.trigger()?; // the injector pulses GSI 4
/// injector.stop()?; // or drop it
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Injector {
    shared: Arc<Shared>,
}

impl fmt::Debug for Injector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Injector")
            .field("lines", &self.shared.lock().len())
            .finish()
    }
}

/// The injector's descriptor: readable while a trigger waits to be injected, for a VMM that
/// serves the injector from a loop of its own (epoll, event-manager) with
/// [`serve_pending`](Injector::serve_pending) when it fires.
impl AsRawFd for Injector {
    fn as_raw_fd(&self) -> RawFd {
        self.shared.events.as_raw_fd()
    }
}

/// The injector as a rust-vmm `event-manager` subscriber (feature `event-manager`): added to the
/// VMM's `EventManager`, it injects on the loop's thread, and no thread of its own runs.
#[cfg(feature = "event-manager")]
#[cfg_attr(docsrs, doc(cfg(feature = "event-manager")))]
impl event_manager::MutEventSubscriber for Injector {
    fn process(&mut self, _events: event_manager::Events, _ops: &mut event_manager::EventOps) {
        // An epoll failure has no caller here: it is recorded, so registrations on the
        // userspace path report it until a pass succeeds again.
        if let Err(e) = self.serve_pending() {
            self.shared.ended(e);
        }
    }

    fn init(&mut self, ops: &mut event_manager::EventOps) {
        // A failed add leaves the injector unserved, as a VMM that never ran it would; the
        // interrupts wait in their notifiers.
        let _ = ops.add(event_manager::Events::new(
            self,
            event_manager::EventSet::IN,
        ));
    }
}

/// A thread running an [`Injector`], as [`Injector::spawn`] started it. Dropping it stops that
/// thread and joins it; other runs of the injector go on.
#[derive(Debug)]
#[must_use = "dropping the handle stops the injector"]
pub struct InjectorThread {
    injector: Injector,
    /// Set to stop this thread (the event loop's stop only wakes it).
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl InjectorThread {
    /// Stops the injector and joins its thread; returns how its loop ended.
    ///
    /// # Errors
    ///
    /// Those of [`Injector::run`], and [`Error::EventLoop`] if the thread panicked.
    pub fn stop(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.stopping.store(true, Ordering::Release);
        let events = &self.injector.shared.events;
        // Wake the thread until it has gone: another run may take the stop back first.
        while !thread.is_finished() {
            events.stop_handle().stop()?;
            thread::sleep(Duration::from_millis(1));
        }
        // The stop was for this thread alone: take it back, so the injector runs on.
        events.rearm()?;
        thread.join().unwrap_or_else(|_| {
            Err(Error::EventLoop {
                op: "join the injector thread",
                source: std::io::Error::other("the injector thread panicked"),
            })
        })
    }
}

impl Drop for InjectorThread {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

impl Injector {
    pub(crate) fn new(vm: Arc<VmFd>, router: GsiRouter) -> Result<Injector> {
        Ok(Injector {
            shared: Arc::new(Shared {
                vm,
                router,
                events: EventLoop::new()?,
                lines: Mutex::new(HashMap::new()),
                next: AtomicU64::new(0),
                health: Mutex::default(),
            }),
        })
    }

    /// Serves until stopped (by [`stop_handle`](Self::stop_handle)): the injector's loop, for a
    /// thread the VMM makes. It takes the stop back as it returns, so the injector can run again;
    /// run one such loop at a time ([`spawn`](Self::spawn) for more).
    ///
    /// # Errors
    ///
    /// [`Error::EventLoop`] when epoll fails; the loop ends then.
    pub fn run(&self) -> Result<()> {
        self.run_until(None)
    }

    /// The loop: serves until a stop, which ends it when it is for every run (`stopping` is
    /// `None`) or for this one (its flag set).
    fn run_until(&self, stopping: Option<&AtomicBool>) -> Result<()> {
        let events = &self.shared.events;
        let mut ready = Vec::new();
        self.shared.health().ended = None;
        loop {
            let wake = match events.wait_tokens(None, &mut ready) {
                Ok(wake) => wake,
                Err(e) => return Err(self.shared.ended(e)),
            };
            self.shared.fire_all(&ready);
            if wake != Wake::Stopped {
                continue;
            }
            match stopping {
                None => return events.rearm(),
                Some(flag) if flag.load(Ordering::Acquire) => return Ok(()),
                // Another thread's stop: it is taken back once that thread has gone.
                Some(_) => thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// One pass without waiting: injects for every trigger written since the last pass, and
    /// returns how many trigger notifiers were ready. For a VMM loop that polls the injector's
    /// descriptor instead of giving it a thread.
    ///
    /// # Errors
    ///
    /// [`Error::EventLoop`] when epoll fails.
    pub fn serve_pending(&self) -> Result<usize> {
        let mut ready = Vec::new();
        // A stop is for the runs that loop; this pass serves what is ready whatever it says.
        let _ = self
            .shared
            .events
            .wait_tokens(Some(Duration::ZERO), &mut ready)?;
        self.shared.health().ended = None;
        self.shared.fire_all(&ready);
        Ok(ready.len())
    }

    /// What the injector has done: injections, retries, failures.
    pub fn stats(&self) -> InjectorStats {
        self.shared.health().stats
    }

    /// The last injection that failed on every attempt ([`Error::Inject`]), if one did since the
    /// last call: an interrupt lost, which the loop, having no caller, reports here (and counts
    /// in [`InjectorStats::failed`]).
    pub fn take_error(&self) -> Option<Error> {
        self.shared.health().failure.take()
    }

    /// A handle that stops [`run`](Self::run) from any thread.
    pub fn stop_handle(&self) -> StopHandle {
        self.shared.events.stop_handle()
    }

    /// Runs the injector on a new thread named `vm-notify-inject`; the handle stops and joins
    /// it.
    ///
    /// # Errors
    ///
    /// [`Error::EventLoop`] if the thread cannot be spawned.
    pub fn spawn(&self) -> Result<InjectorThread> {
        let injector = self.clone();
        let stopping = Arc::new(AtomicBool::new(false));
        let flag = stopping.clone();
        let thread = thread::Builder::new()
            .name("vm-notify-inject".into())
            .spawn(move || injector.run_until(Some(&flag)))
            .map_err(|source| Error::EventLoop {
                op: "spawn the injector thread",
                source,
            })?;
        Ok(InjectorThread {
            injector: self.clone(),
            stopping,
            thread: Some(thread),
        })
    }

    /// Injects `gsi` whenever `trigger` is written: an edge (or an MSI) each time, or, with
    /// `resample`, a level held high until [`deassert`](Self::deassert). With `ioapic`, `gsi`
    /// is a pin of that IOAPIC and the line is one of its sources.
    pub(crate) fn add(
        &self,
        gsi: Gsi,
        trigger: &Notifier,
        resample: Option<&Notifier>,
        ioapic: Option<&Ioapic>,
    ) -> Result<u64> {
        if let Some(e) = &self.shared.health().ended {
            return Err(Error::InjectorEnded {
                source: io::Error::new(e.kind(), e.to_string()),
            });
        }
        let token = self.shared.next.fetch_add(1, Ordering::Relaxed);
        // On a pin, `level` only marks the line a level one: its state is the IOAPIC's.
        let level = resample.map(|r| Level {
            resample: r.clone(),
            asserted: false,
        });
        let trigger_clone = trigger.clone();
        let pin = match ioapic {
            Some(io) => Some((io.clone(), io.attach(gsi, resample)?)),
            None => None,
        };
        let line = Line {
            gsi,
            trigger: trigger_clone,
            level,
            pin,
        };
        self.shared.lock().insert(token, line);
        if let Err(e) = self.shared.events.add(token, trigger) {
            if let Some(line) = self.shared.lock().remove(&token) {
                if let Some((io, source)) = line.pin {
                    // The source never asserted: there is nothing to deliver.
                    let _ = io.detach(source);
                }
            }
            return Err(e);
        }
        Ok(token)
    }

    /// The device's condition for level line `token` cleared: drains a trigger not yet taken
    /// and, if the line is held high, lowers it and adds 1 to its resample notifier. Returns
    /// whether the line was lowered.
    ///
    /// Called on the vCPU thread while it handles the guest's acknowledge (an exit), the line is
    /// low before the guest can EOI, so the irqchip does not deliver again.
    pub(crate) fn deassert(&self, token: u64) -> Result<bool> {
        let mut lines = self.shared.lock();
        let Some(line) = lines.get_mut(&token) else {
            return Ok(false);
        };
        let _ = line.trigger.try_read()?;
        if let Some((io, source)) = &line.pin {
            // The IOAPIC resamples at the guest's EOI; here the source only stops holding.
            return io.deassert(*source);
        }
        let gsi = line.gsi;
        let Some(level) = line.level.as_mut().filter(|l| l.asserted) else {
            return Ok(false);
        };
        level.asserted = false;
        level.resample.notify()?;
        // A line shared with another asserted level source stays high.
        if !held(&lines, gsi) {
            sys::set_irq_line(&self.shared.vm, gsi, false)?;
        }
        Ok(true)
    }

    /// Stops serving `token`. On an edge line a trigger written before is still injected, as a
    /// kernel irqfd would have injected it at the write; a level line is lowered, as KVM lowers
    /// it when a resample irqfd is deassigned.
    pub(crate) fn remove(&self, token: u64) {
        let _ = self.shared.events.remove(token);
        let mut lines = self.shared.lock();
        let level = lines
            .get(&token)
            .and_then(|l| l.level.as_ref().map(|level| (l.gsi, level.asserted)));
        if level.is_none() {
            self.shared.fire(&mut lines, token);
        }
        if let Some((io, source)) = lines.remove(&token).and_then(|l| l.pin) {
            // A drop has no caller to tell; the IOAPIC counts a delivery that failed.
            let _ = io.detach(source);
            return;
        }
        if let Some((gsi, true)) = level {
            if !held(&lines, gsi) {
                let _ = sys::set_irq_line(&self.shared.vm, gsi, false);
            }
        }
    }
}

/// Whether a level line on `gsi` is held high: KVM keeps one level per GSI for all of
/// userspace, so a shared line is lowered only when its last asserted source clears.
fn held(lines: &HashMap<u64, Line>, gsi: Gsi) -> bool {
    lines
        .values()
        .any(|l| l.gsi == gsi && l.level.as_ref().is_some_and(|level| level.asserted))
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Line>> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fire_all(&self, ready: &[u64]) {
        let mut lines = self.lock();
        for &token in ready {
            self.fire(&mut lines, token);
        }
    }

    fn health(&self) -> MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that a loop ended on `e`, and returns the error for the loop to return.
    fn ended(&self, e: Error) -> Error {
        let errno = match &e {
            Error::EventLoop { source, .. } | Error::Notifier { source, .. } => {
                io::Error::new(source.kind(), source.to_string())
            }
            other => io::Error::other(other.to_string()),
        };
        self.health().ended = Some(errno);
        e
    }

    /// Makes one injection, trying a failed one again up to [`ATTEMPTS`] times; a failure on
    /// every attempt is counted and kept, as the loop has no caller.
    fn inject(&self, gsi: Gsi, op: &'static str, mut once: impl FnMut() -> Result<()>) {
        let mut attempt = 1;
        let outcome = loop {
            match once() {
                Err(_) if attempt < ATTEMPTS => {
                    attempt += 1;
                    self.health().stats.retried += 1;
                }
                done => break done,
            }
        };
        let mut health = self.health();
        match outcome {
            Ok(()) => health.stats.injected += 1,
            Err(e) => {
                health.stats.failed += 1;
                let source = match e {
                    Error::IrqLine { source, .. } | Error::SignalMsi { source, .. } => source,
                    other => io::Error::other(other.to_string()),
                };
                health.failure = Some(Error::Inject { gsi, op, source });
            }
        }
    }

    /// Reads `token`'s trigger; if it was written, one injection, however many writes it
    /// coalesced (on a level line, the assertion if the line is low).
    fn fire(&self, lines: &mut HashMap<u64, Line>, token: u64) {
        let Some(line) = lines.get_mut(&token) else {
            return;
        };
        if !matches!(line.trigger.try_read(), Ok(Attempt::Done(_))) {
            return;
        }
        let gsi = line.gsi;
        if let Some((io, source)) = &line.pin {
            let level = line.level.is_some();
            self.inject(gsi, "the IOAPIC's delivery", || match level {
                true => io.assert(*source),
                false => io.pulse(*source),
            });
            return;
        }
        if let Some(level) = line.level.as_mut() {
            if !level.asserted {
                let mut asserted = false;
                self.inject(gsi, "KVM_IRQ_LINE", || {
                    sys::set_irq_line(&self.vm, gsi, true)?;
                    asserted = true;
                    Ok(())
                });
                level.asserted = asserted;
            }
            return;
        }
        let msi = self.router.routes(gsi).into_iter().find_map(|r| match r {
            Route::Msi(m) => Some(m),
            Route::Irqchip { .. } => None,
        });
        match msi {
            Some(m) => self.inject(gsi, "KVM_SIGNAL_MSI", || {
                sys::signal_msi(&self.vm, m.address, m.data)
                    .map(drop)
                    .map_err(|source| Error::SignalMsi {
                        pin: gsi,
                        address: m.address,
                        data: m.data,
                        source,
                    })
            }),
            None => {
                let held = held(lines, gsi);
                let mut raised = false;
                self.inject(gsi, "KVM_IRQ_LINE", || {
                    if !raised {
                        sys::set_irq_line(&self.vm, gsi, true)?;
                        raised = true;
                    }
                    if !held {
                        sys::set_irq_line(&self.vm, gsi, false)?;
                    }
                    Ok(())
                });
            }
        }
    }
}
