//! The vCPU thread: [`Running`], and the run loop that sorts every exit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::exit::{ExitHandler, GuestExit};
use crate::layout::{DONE_PORT, UNEXPECTED_VECTOR_PORT};
use crate::report::{Outcome, RunReport};
use crate::{Error, Result};
use vm_device::bus::{MmioAddress, MmioRange};
use vm_device::device_manager::{IoManager, MmioManager};
use vm_notify::io::IoRegion;
use vm_notify::irqchip::{Ioapic, IOAPIC_BASE, IOAPIC_SIZE};

/// What the run's owner tells the vCPU threads, and where paused vCPUs are handed back.
#[derive(Debug, Clone, Default)]
pub(crate) struct Control {
    /// Stop now (a timeout).
    stop: Arc<AtomicBool>,
    /// Stop with every exit completed, handing the vCPU back ([`Running::pause`]).
    pause: Arc<AtomicBool>,
    /// The paused vCPUs, by index.
    parked: Arc<Mutex<Vec<Option<VcpuFd>>>>,
}

impl Control {
    /// Room for `count` paused vCPUs.
    pub(crate) fn park(&self, count: usize) {
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        parked.clear();
        parked.resize_with(count, || None);
    }

    /// A paused vCPU handed back.
    pub(crate) fn put(&self, index: usize, vcpu: VcpuFd) {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())[index] = Some(vcpu);
    }
}

/// A program running on its vCPU threads (one per vCPU).
#[derive(Debug)]
pub struct Running {
    pub(crate) threads: Vec<JoinHandle<()>>,
    pub(crate) control: Control,
    pub(crate) rx: mpsc::Receiver<RunReport>,
}

/// A run stopped by [`Running::pause`]: the vCPUs, handed back with every exit completed, and
/// the report of the run so far. [`TinyVm::snapshot`](crate::TinyVm::snapshot) saves them.
#[derive(Debug)]
pub struct Paused {
    pub(crate) vcpus: Vec<VcpuFd>,
    /// The run so far.
    pub report: RunReport,
}

impl Running {
    /// Waits for the program to end on every vCPU, at most `timeout`; then stops the vCPUs and
    /// reports [`Outcome::TimedOut`]. The timeout only guards against a hang: pick it
    /// generously. With several vCPUs the report is theirs together: done when every vCPU
    /// was, the first fault otherwise, every vCPU's exits (vCPU by vCPU, in the order they
    /// ended), and the longest run's time.
    pub fn wait(self, timeout: Duration) -> RunReport {
        self.collect(timeout, false)
    }

    /// Stops every vCPU where it is, with any exit it made completed (`KVM_RUN` with
    /// `immediate_exit`, as KVM asks before saving a vCPU), and hands the vCPUs back for
    /// [`TinyVm::snapshot`](crate::TinyVm::snapshot). A vCPU that ends (or faults) first is not
    /// paused.
    ///
    /// # Errors
    ///
    /// [`Error::Guest`] when a vCPU did not pause (it ended, faulted, or did not stop within
    /// `timeout`), with the report.
    pub fn pause(self, timeout: Duration) -> Result<Paused> {
        let parked = self.control.parked.clone();
        let report = self.collect(timeout, true);
        let vcpus: Option<Vec<VcpuFd>> =
            std::mem::take(&mut *parked.lock().unwrap_or_else(|e| e.into_inner()))
                .into_iter()
                .collect();
        match vcpus {
            Some(vcpus) if report.outcome == Outcome::Paused => Ok(Paused { vcpus, report }),
            _ => Err(Error::Guest(format!("not paused: {report}"))),
        }
    }

    fn collect(self, timeout: Duration, pause: bool) -> RunReport {
        if pause {
            self.control.pause.store(true, Ordering::SeqCst);
            for thread in &self.threads {
                let _ = thread.kill(kick_signal());
            }
        }
        let deadline = Instant::now() + timeout;
        let mut reports = Vec::with_capacity(self.threads.len());
        // A pause does not wait for the program: it kicks until every vCPU has stopped.
        while !pause && reports.len() < self.threads.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(report) => reports.push(report),
                Err(_) => break,
            }
        }
        let timed_out = !pause && reports.len() < self.threads.len();
        if timed_out || pause {
            if timed_out {
                self.control.stop.store(true, Ordering::SeqCst);
            }
            // The kick only interrupts KVM_RUN if it lands while the vCPU is inside it: repeat.
            while reports.len() < self.threads.len() {
                if pause && Instant::now() > deadline {
                    // A vCPU that does not pause is stopped instead.
                    self.control.stop.store(true, Ordering::SeqCst);
                }
                for thread in &self.threads {
                    let _ = thread.kill(kick_signal());
                }
                if let Ok(report) = self.rx.recv_timeout(Duration::from_millis(5)) {
                    reports.push(report);
                    continue;
                }
                if self.threads.iter().all(|t| t.is_finished()) {
                    while let Ok(report) = self.rx.try_recv() {
                        reports.push(report);
                    }
                    if reports.len() < self.threads.len() {
                        reports.push(RunReport {
                            outcome: Outcome::Fault("vCPU thread ended without a report".into()),
                            exits: Vec::new(),
                            elapsed: Duration::ZERO,
                        });
                    }
                }
            }
        }
        for thread in self.threads {
            let _ = thread.join();
        }
        let mut merged = RunReport {
            outcome: Outcome::Done,
            exits: Vec::new(),
            elapsed: Duration::ZERO,
        };
        for report in reports {
            if merged.outcome == Outcome::Done && report.outcome != Outcome::Done {
                merged.outcome = report.outcome;
            }
            merged.exits.extend(report.exits);
            merged.elapsed = merged.elapsed.max(report.elapsed);
        }
        if timed_out && merged.outcome != Outcome::Done {
            merged.outcome = Outcome::TimedOut;
        }
        merged
    }
}

fn kick_signal() -> i32 {
    SIGRTMIN() + 1
}

pub(crate) fn install_kick_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
        result = register_signal_handler(kick_signal(), on_kick).map_err(|e| Error::Kvm {
            step: "install the vCPU kick signal handler",
            source: std::io::Error::from_raw_os_error(e.errno()),
        });
    });
    result
}

fn le_value(data: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    let n = data.len().min(8);
    buf[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(buf)
}

/// The split irqchip's IOAPIC as a VMM wires it: its window an [`IoRegion`] in an [`IoManager`]
/// (every guest access to it goes through vm-device's dispatch), its EOIs handed to it.
pub(crate) struct IoapicBus {
    ioapic: Ioapic,
    region: Arc<IoRegion>,
    io: IoManager,
}

impl IoapicBus {
    pub(crate) fn new(ioapic: &Ioapic) -> Option<IoapicBus> {
        let region = Arc::new(IoRegion::ioapic(ioapic));
        let mut io = IoManager::new();
        let range = MmioRange::new(MmioAddress(IOAPIC_BASE), IOAPIC_SIZE).ok()?;
        io.register_mmio(range, region.clone()).ok()?;
        Some(IoapicBus {
            ioapic: ioapic.clone(),
            region,
            io,
        })
    }

    /// A guest write: `None` when `addr` is not in the window; else what the IOAPIC said.
    fn write(&self, addr: u64, data: &[u8]) -> Option<std::result::Result<(), String>> {
        self.io.mmio_write(MmioAddress(addr), data).ok()?;
        Some(
            self.region
                .take_error()
                .map_or(Ok(()), |e| Err(e.to_string())),
        )
    }

    /// A guest read: `false` when `addr` is not in the window.
    fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.io.mmio_read(MmioAddress(addr), data).is_ok()
    }
}

/// Runs the vCPU until the program ends, handing each exit to `handler`. On the split irqchip
/// (`ioapic` given) the kit serves the IOAPIC itself: MMIO in its window and
/// `KVM_EXIT_IOAPIC_EOI` go to the [`Ioapic`] and are recorded in the report, not handed on.
pub(crate) fn run_loop(
    vcpu: &mut VcpuFd,
    control: &Control,
    ioapic: Option<&IoapicBus>,
    mut handler: impl ExitHandler,
) -> RunReport {
    let start = Instant::now();
    let mut exits = Vec::new();
    let outcome = loop {
        if control.stop.load(Ordering::SeqCst) {
            break Outcome::TimedOut;
        }
        if control.pause.load(Ordering::SeqCst) {
            // Completes an exit the vCPU made (an MMIO or port read's data, a write's
            // retirement) and returns at once.
            vcpu.set_kvm_immediate_exit(1);
            let completed = match vcpu.run() {
                Err(e) if e.errno() == libc::EINTR => Ok(()),
                Err(e) => Err(format!("KVM_RUN to complete an exit failed: {e}")),
                Ok(exit) => Err(format!("an exit while pausing: {exit:?}")),
            };
            vcpu.set_kvm_immediate_exit(0);
            match completed {
                Ok(()) => break Outcome::Paused,
                Err(what) => break fault(vcpu, what),
            }
        }
        let exit = match vcpu.run() {
            Ok(VcpuExit::IoOut(DONE_PORT, _)) => break Outcome::Done,
            Ok(VcpuExit::IoOut(UNEXPECTED_VECTOR_PORT, data)) => {
                let vector = le_value(data);
                break fault(
                    vcpu,
                    format!("unexpected interrupt or exception, vector {vector}"),
                );
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                let exit = GuestExit::PioWrite {
                    port,
                    data: le_value(data),
                    len: data.len() as u8,
                };
                handler.handle(&exit, &mut []);
                exit
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                let exit = GuestExit::PioRead {
                    port,
                    len: data.len() as u8,
                };
                data.fill(0);
                handler.handle(&exit, data);
                exit
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                let exit = GuestExit::MmioWrite {
                    addr,
                    data: le_value(data),
                    len: data.len() as u8,
                };
                match ioapic.and_then(|io| io.write(addr, data)) {
                    Some(Err(e)) => break fault(vcpu, format!("IOAPIC write: {e}")),
                    Some(Ok(())) => {}
                    None => handler.handle(&exit, &mut []),
                }
                exit
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                let exit = GuestExit::MmioRead {
                    addr,
                    len: data.len() as u8,
                };
                data.fill(0);
                if !ioapic.is_some_and(|io| io.read(addr, data)) {
                    handler.handle(&exit, data);
                }
                exit
            }
            Ok(VcpuExit::IoapicEoi(vector)) => {
                let exit = GuestExit::IoapicEoi { vector };
                match ioapic {
                    Some(io) => {
                        if let Err(e) = io.ioapic.end_of_interrupt(vector) {
                            break fault(vcpu, format!("IOAPIC EOI: {e}"));
                        }
                    }
                    None => handler.handle(&exit, &mut []),
                }
                exit
            }
            Ok(VcpuExit::Shutdown) => break fault(vcpu, "shutdown (triple fault)".into()),
            Ok(VcpuExit::InternalError) => {
                break fault(vcpu, "KVM internal error (emulation failed)".into())
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                break fault(
                    vcpu,
                    format!("VM entry failed, reason {reason:#x} on cpu {cpu}"),
                )
            }
            Ok(other) => {
                let what = format!("unhandled exit {other:?}");
                break fault(vcpu, what);
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => break fault(vcpu, format!("KVM_RUN failed: {e}")),
        };
        exits.push(exit);
    };
    RunReport {
        outcome,
        exits,
        elapsed: start.elapsed(),
    }
}

fn fault(vcpu: &VcpuFd, what: String) -> Outcome {
    match vcpu.get_regs() {
        Ok(regs) => Outcome::Fault(format!("{what} at rip {:#x}", regs.rip)),
        Err(_) => Outcome::Fault(what),
    }
}
