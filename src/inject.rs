//! The interrupt fallback: where an irqfd cannot be used, a thread reads the device's trigger
//! notifiers and injects with `KVM_IRQ_LINE` or `KVM_SIGNAL_MSI`.
//!
//! The device-facing contract is the irqfd one:
//!
//! * **edge, irqchip route**: each wake-up of the trigger notifier (however many writes it
//!   coalesced) pulses the line: `KVM_IRQ_LINE` high, then low — one edge, as one irqfd injection.
//! * **edge, MSI route**: each wake-up sends the route's message with `KVM_SIGNAL_MSI`.
//!
//! Level lines have no fallback here. With an in-kernel irqchip userspace sees no EOI, so it
//! cannot lower the line at the EOI as KVM's resampler does; polling the irqchip state from this
//! thread was tried and measured: a guest EOI that lands between the assertion and the lowering
//! re-delivers, and on these hosts that happened for most interrupts under load (557 assertions
//! gave 5000 deliveries). `Backend::level_irqfd` refuses the userspace path with a typed error.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};

use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;

use crate::error::{Error, Result};
use crate::event_loop::{EventLoop, StopHandle, Wake};
use crate::notifier::{Attempt, Notifier};
use crate::routing::{Gsi, GsiRouter, Route};

struct Line {
    gsi: Gsi,
    /// Read only under the lines lock, by `fire` or by the final flush in `remove`, so each
    /// write is injected exactly once.
    trigger: Notifier,
}

struct Shared {
    vm: Arc<VmFd>,
    router: GsiRouter,
    events: EventLoop,
    lines: Mutex<HashMap<u64, Line>>,
    next: AtomicU64,
}

struct Worker {
    stop: StopHandle,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A thread injecting interrupts for the notifiers registered with it. Cheap to clone; the
/// thread stops when the last clone and the last line go.
#[derive(Clone)]
pub(crate) struct Injector {
    shared: Arc<Shared>,
    _worker: Arc<Worker>,
}

impl fmt::Debug for Injector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Injector")
            .field("lines", &self.shared.lock().len())
            .finish()
    }
}

impl Injector {
    pub(crate) fn new(vm: Arc<VmFd>, router: GsiRouter) -> Result<Injector> {
        let shared = Arc::new(Shared {
            vm,
            router,
            events: EventLoop::new()?,
            lines: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        });
        let stop = shared.events.stop_handle();
        let thread = {
            let shared = shared.clone();
            thread::Builder::new()
                .name("vm-notify-inject".into())
                .spawn(move || shared.run())
                .map_err(|source| Error::EventLoop {
                    op: "spawn the injector thread",
                    source,
                })?
        };
        Ok(Injector {
            shared,
            _worker: Arc::new(Worker {
                stop,
                thread: Some(thread),
            }),
        })
    }

    /// Injects `gsi` whenever `trigger` is written.
    pub(crate) fn add(&self, gsi: Gsi, trigger: &Notifier) -> Result<u64> {
        let token = self.shared.next.fetch_add(1, Ordering::Relaxed);
        let line = Line {
            gsi,
            trigger: trigger.try_clone()?,
        };
        self.shared.lock().insert(token, line);
        if let Err(e) = self.shared.events.add(token, trigger) {
            self.shared.lock().remove(&token);
            return Err(e);
        }
        Ok(token)
    }

    /// Stops serving `token`. A trigger written before is still injected, as a kernel irqfd
    /// would have injected it at the write.
    pub(crate) fn remove(&self, token: u64) {
        let _ = self.shared.events.remove(token);
        let mut lines = self.shared.lock();
        self.shared.fire(&mut lines, token);
        lines.remove(&token);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Line>> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self) {
        let mut ready = Vec::new();
        loop {
            match self.events.wait_tokens(None, &mut ready) {
                Ok(Wake::Stopped) | Err(_) => return,
                Ok(_) => {}
            }
            let mut lines = self.lock();
            for &token in &ready {
                self.fire(&mut lines, token);
            }
        }
    }

    /// Reads `token`'s trigger; if it was written, one injection, however many writes it
    /// coalesced.
    fn fire(&self, lines: &mut HashMap<u64, Line>, token: u64) {
        let Some(line) = lines.get_mut(&token) else {
            return;
        };
        if !matches!(line.trigger.try_read(), Ok(Attempt::Done(_))) {
            return;
        }
        let gsi = line.gsi;
        let msi = self.router.routes(gsi).into_iter().find_map(|r| match r {
            Route::Msi(m) => Some(m),
            Route::Irqchip { .. } => None,
        });
        match msi {
            Some(m) => {
                let msg = kvm_msi {
                    address_lo: m.address as u32,
                    address_hi: (m.address >> 32) as u32,
                    data: m.data,
                    ..Default::default()
                };
                let _ = self.vm.signal_msi(msg);
            }
            None => {
                let _ = self.vm.set_irq_line(gsi, true);
                let _ = self.vm.set_irq_line(gsi, false);
            }
        }
    }
}
