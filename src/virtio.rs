//! The notification half of the virtio transports: queue notifications in, used-buffer and
//! configuration-change interrupts out, for virtio-mmio and virtio-pci.
//!
//! The device side is the same for both: per queue a [`VirtQueueNotify`] with the notifier the
//! guest's queue notifications add to ([`kick`](VirtQueueNotify::kick)) and
//! [`signal_used`](VirtQueueNotify::signal_used), which does what the transport needs.
//!
//! * **virtio-mmio** ([`MmioNotify`]): one ioeventfd per queue on `QueueNotify` (offset `0x050`,
//!   4-byte writes, the queue index as datamatch), and one level interrupt line tied to
//!   `InterruptStatus` / `InterruptACK` (offsets `0x060` / `0x064`). The line is asserted while any
//!   status bit is set: `signal_used` sets bit 0 ([`INT_VRING`]) and asserts, an ACK clears the
//!   bits it names and, when none is left, the line drops; an ACK that leaves a bit set keeps it
//!   asserted, so the guest takes another interrupt. The VMM's MMIO exit handler passes reads and
//!   writes of the two registers to [`MmioNotify::read`] / [`MmioNotify::write`]; the device's
//!   loop passes resample wake-ups to [`MmioInterrupt::on_resample`].
//! * **virtio-pci** ([`PciNotify`]): each queue's notify address is `notify_base +
//!   queue_notify_off * notify_off_multiplier` (2-byte writes of the queue index), and each
//!   queue's interrupt is the MSI-X vector the guest picked in `queue_msix_vector` (`0xFFFF`,
//!   [`NO_VECTOR`], raises nothing), raised on the function's [`MsixVectors`]; the
//!   configuration-change vector likewise.
//!
//! Coalescing, as the virtio spec allows it: used-buffer notifications are not counted. On
//! virtio-mmio a `signal_used` while bit 0 is still set (not yet acknowledged) adds no interrupt;
//! on virtio-pci the vector's irqfd coalesces writes made before its injection. A driver must
//! therefore process every used buffer per interrupt, which virtio drivers do.

use std::fmt;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::backend::{Backend, Path};
use crate::error::{Error, Result};
use crate::ioevent::{IoEvent, Width, WriteMatch};
use crate::irq::LevelIrqFd;
use crate::msi::MsixVectors;
use crate::notifier::{Mode, Notifier};
use crate::routing::{Gsi, GsiRouter};

/// virtio-mmio `QueueNotify` offset.
pub const MMIO_QUEUE_NOTIFY: u64 = 0x050;
/// virtio-mmio `InterruptStatus` offset (read-only).
pub const MMIO_INTERRUPT_STATUS: u64 = 0x060;
/// virtio-mmio `InterruptACK` offset (write-only).
pub const MMIO_INTERRUPT_ACK: u64 = 0x064;
/// `InterruptStatus` bit: a used buffer was added to a queue.
pub const INT_VRING: u32 = 1;
/// `InterruptStatus` bit: the device configuration changed.
pub const INT_CONFIG: u32 = 2;
/// virtio-pci `queue_msix_vector` / `config_msix_vector` value for "no vector".
pub const NO_VECTOR: u16 = 0xffff;

/// How a queue's used-buffer notification reaches the guest.
#[derive(Debug)]
enum Signal {
    Mmio(Arc<MmioInterrupt>),
    Pci {
        vectors: Arc<MsixVectors>,
        vector: Arc<AtomicU16>,
    },
}

/// One queue's notifications, device side: the kick notifier to wait on and the used-buffer
/// signal. Cheap to clone; hand clones to device threads.
#[derive(Clone, Debug)]
pub struct VirtQueueNotify {
    inner: Arc<QueueInner>,
}

#[derive(Debug)]
struct QueueInner {
    index: u16,
    kick: Notifier,
    signal: Signal,
}

impl VirtQueueNotify {
    /// The queue's index.
    pub fn index(&self) -> u16 {
        self.inner.index
    }

    /// The notifier the guest's queue notifications add to (through an ioeventfd, or the
    /// userspace path of the [`Backend`] that registered it).
    pub fn kick(&self) -> &Notifier {
        &self.inner.kick
    }

    /// Notifies the guest of used buffers: on virtio-mmio sets [`INT_VRING`] and asserts the line;
    /// on virtio-pci raises the queue's MSI-X vector. Returns whether this asked for a new
    /// interrupt: `false` on virtio-pci for a queue with [`NO_VECTOR`], and on virtio-mmio when
    /// `INT_VRING` was still set (the guest finds these buffers with the interrupt it has yet to
    /// acknowledge).
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`] if the notifier write fails; [`Error::MsixVectorIndex`] cannot
    /// happen (vectors are checked when set).
    pub fn signal_used(&self) -> Result<bool> {
        match &self.inner.signal {
            Signal::Mmio(irq) => irq.raise(INT_VRING),
            Signal::Pci { vectors, vector } => {
                raise_vector(vectors, vector.load(Ordering::Acquire))
            }
        }
    }
}

/// A device's queues: the device-side handles and their notify registrations, index for index.
#[derive(Debug, Default)]
struct Queues {
    handles: Vec<VirtQueueNotify>,
    registrations: Vec<IoEvent>,
}

impl Queues {
    /// Registers the next queue's notifications at `at` with `backend`; its used buffers go to
    /// `signal`.
    fn add(&mut self, backend: &Backend, at: WriteMatch, signal: Signal) -> Result<()> {
        let index = self.handles.len() as u16;
        let kick = Notifier::new(Mode::Counter)?;
        self.registrations
            .push(backend.register(at.datamatch(index.into()), &kick)?);
        self.handles.push(VirtQueueNotify {
            inner: Arc::new(QueueInner {
                index,
                kick,
                signal,
            }),
        });
        Ok(())
    }

    fn get(&self, index: u16) -> Option<VirtQueueNotify> {
        self.handles.get(usize::from(index)).cloned()
    }

    fn path(&self, index: u16) -> Option<&Path> {
        self.registrations
            .get(usize::from(index))
            .map(IoEvent::path)
    }
}

fn raise_vector(vectors: &MsixVectors, vector: u16) -> Result<bool> {
    if vector == NO_VECTOR {
        return Ok(false);
    }
    vectors.raise(vector.into()).map(|()| true)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A virtio-mmio device's interrupt: `InterruptStatus` and the level line it drives.
pub struct MmioInterrupt {
    line: LevelIrqFd,
    status: Mutex<u32>,
}

impl fmt::Debug for MmioInterrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmioInterrupt")
            .field("gsi", &self.line.gsi())
            .field("status", &self.status())
            .field("path", self.line.path())
            .finish()
    }
}

impl MmioInterrupt {
    /// Sets `bits` in `InterruptStatus`, asserting the line if no bit was set before; returns
    /// whether a bit was newly set.
    ///
    /// While any bit is set the line is already asserted, an assertion is on its way, or a
    /// resample is (and `on_resample` re-asserts): another trigger would add nothing the guest
    /// needs, and on the kernel path, where KVM raises the line from a work queue after the
    /// write, it could land after the guest acknowledged everything — an interrupt with status 0.
    fn raise(&self, bits: u32) -> Result<bool> {
        let mut status = lock(&self.status);
        let new = *status & bits != bits;
        let was_clear = *status == 0;
        *status |= bits;
        if was_clear {
            self.line.trigger()?;
        }
        Ok(new)
    }

    /// Notifies the guest of a configuration change ([`INT_CONFIG`]); returns whether the bit was
    /// newly set (as [`VirtQueueNotify::signal_used`]).
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`] if the notifier write fails.
    pub fn signal_config(&self) -> Result<bool> {
        self.raise(INT_CONFIG)
    }

    /// `InterruptStatus` now.
    pub fn status(&self) -> u32 {
        *lock(&self.status)
    }

    /// The guest's write of `bits` to `InterruptACK`: clears them; with none left, the line drops.
    ///
    /// # Errors
    ///
    /// Those of [`LevelIrqFd::deassert`].
    pub fn ack(&self, bits: u32) -> Result<()> {
        let mut status = lock(&self.status);
        *status &= !bits;
        if *status == 0 {
            self.line.deassert()?;
        }
        Ok(())
    }

    /// The notifier signalled when the line was lowered (at the guest's EOI on a kernel irqfd);
    /// the device's loop waits on it and calls [`on_resample`](Self::on_resample).
    pub fn resample(&self) -> &Notifier {
        self.line.resample()
    }

    /// After a resample: asserts the line again if a status bit is still set. Returns whether it
    /// did. Reads nothing from the resample notifier; the caller's wait did.
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`] if the notifier write fails.
    pub fn on_resample(&self) -> Result<bool> {
        let status = lock(&self.status);
        if *status == 0 {
            return Ok(false);
        }
        self.line.trigger().map(|()| true)
    }

    /// The level line.
    pub fn line(&self) -> &LevelIrqFd {
        &self.line
    }
}

/// The notification half of a virtio-mmio device at `base`: queue notifications as ioeventfds
/// and the interrupt registers. Dropping it unregisters everything.
#[derive(Debug)]
pub struct MmioNotify {
    base: u64,
    queues: Queues,
    irq: Arc<MmioInterrupt>,
}

impl MmioNotify {
    /// Registers `queues` queue notifications at `base + 0x050` (4-byte writes, datamatch = queue
    /// index) with `backend`, and a level interrupt on `gsi` (an irqchip pin the guest programs
    /// level-triggered).
    ///
    /// # Errors
    ///
    /// Those of [`Backend::register`] and [`Backend::level_irqfd`].
    pub fn new(
        backend: &Backend,
        router: &GsiRouter,
        base: u64,
        queues: u16,
        gsi: Gsi,
    ) -> Result<MmioNotify> {
        let line = backend.level_irqfd(
            router,
            gsi,
            &Notifier::new(Mode::Counter)?,
            &Notifier::new(Mode::Counter)?,
        )?;
        let irq = Arc::new(MmioInterrupt {
            line,
            status: Mutex::new(0),
        });
        let mut handles = Queues::default();
        for _ in 0..queues {
            let at = WriteMatch::mmio(base + MMIO_QUEUE_NOTIFY).width(Width::W4);
            handles.add(backend, at, Signal::Mmio(irq.clone()))?;
        }
        Ok(MmioNotify {
            base,
            queues: handles,
            irq,
        })
    }

    /// Queue `index`'s notifications, if it exists.
    pub fn queue(&self, index: u16) -> Option<VirtQueueNotify> {
        self.queues.get(index)
    }

    /// Where queue `index`'s notifications are taken (kernel ioeventfd, or the backend's
    /// dispatcher, and why).
    pub fn queue_path(&self, index: u16) -> Option<&Path> {
        self.queues.path(index)
    }

    /// The device's interrupt.
    pub fn interrupt(&self) -> &Arc<MmioInterrupt> {
        &self.irq
    }

    /// A guest read at `addr`: fills `data` with `InterruptStatus` (little-endian) and returns
    /// `true` for a 4-byte read of it; returns `false` for any other address, for the VMM.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        if addr != self.base + MMIO_INTERRUPT_STATUS || data.len() != 4 {
            return false;
        }
        data.copy_from_slice(&self.irq.status().to_le_bytes());
        true
    }

    /// A guest write at `addr`: acknowledges the written bits for a 4-byte write to `InterruptACK`
    /// and returns `true`; returns `false` for any other address, for the VMM. (Queue
    /// notifications do not come here: they are ioeventfds, or the backend's dispatcher.)
    ///
    /// # Errors
    ///
    /// Those of [`MmioInterrupt::ack`].
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<bool> {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return Ok(false);
        };
        if addr != self.base + MMIO_INTERRUPT_ACK {
            return Ok(false);
        }
        self.irq.ack(u32::from_le_bytes(bytes))?;
        Ok(true)
    }
}

/// The notification half of a virtio-pci device: per-queue notify addresses and MSI-X vectors.
/// Dropping it unregisters the notify addresses.
#[derive(Debug)]
pub struct PciNotify {
    notify_base: u64,
    multiplier: u32,
    offsets: Vec<u16>,
    queues: Queues,
    queue_vectors: Vec<Arc<AtomicU16>>,
    config_vector: AtomicU16,
    vectors: Arc<MsixVectors>,
}

impl PciNotify {
    /// Registers one notify address per queue: queue `i` at `notify_base + queue_notify_off[i] *
    /// notify_off_multiplier`, 2-byte writes of `i` (its datamatch, so queues may share an address
    /// when the multiplier is 0). Every queue and the configuration start with [`NO_VECTOR`].
    ///
    /// # Errors
    ///
    /// [`Error::VirtioQueueCount`] for more than 65535 queues, [`Error::AddressWraps`] when an
    /// address overflows, and those of [`Backend::register`].
    pub fn new(
        backend: &Backend,
        notify_base: u64,
        notify_off_multiplier: u32,
        queue_notify_off: &[u16],
        vectors: Arc<MsixVectors>,
    ) -> Result<PciNotify> {
        if queue_notify_off.len() > usize::from(u16::MAX) {
            return Err(Error::VirtioQueueCount {
                count: queue_notify_off.len(),
            });
        }
        let mut queues = Queues::default();
        let mut queue_vectors = Vec::with_capacity(queue_notify_off.len());
        for &off in queue_notify_off {
            let addr = notify_address(notify_base, notify_off_multiplier, off)?;
            let vector = Arc::new(AtomicU16::new(NO_VECTOR));
            let signal = Signal::Pci {
                vectors: vectors.clone(),
                vector: vector.clone(),
            };
            queues.add(backend, WriteMatch::mmio(addr).width(Width::W2), signal)?;
            queue_vectors.push(vector);
        }
        Ok(PciNotify {
            notify_base,
            multiplier: notify_off_multiplier,
            offsets: queue_notify_off.to_vec(),
            queues,
            queue_vectors,
            config_vector: AtomicU16::new(NO_VECTOR),
            vectors,
        })
    }

    /// Queue `index`'s notifications, if it exists.
    pub fn queue(&self, index: u16) -> Option<VirtQueueNotify> {
        self.queues.get(index)
    }

    /// Where queue `index`'s notifications are taken (kernel ioeventfd, or the backend's
    /// dispatcher, and why).
    pub fn queue_path(&self, index: u16) -> Option<&Path> {
        self.queues.path(index)
    }

    /// The guest-physical address queue `index` is notified at.
    pub fn notify_address(&self, index: u16) -> Option<u64> {
        let off = *self.offsets.get(usize::from(index))?;
        notify_address(self.notify_base, self.multiplier, off).ok()
    }

    /// The guest's write of `queue_msix_vector` for queue `index`. Returns what the register reads
    /// back: `vector` when the function has it, otherwise [`NO_VECTOR`] (the spec's way of
    /// refusing a mapping). `None` for a queue that does not exist.
    pub fn set_queue_vector(&self, index: u16, vector: u16) -> Option<u16> {
        let slot = self.queue_vectors.get(usize::from(index))?;
        let value = self.checked(vector);
        slot.store(value, Ordering::Release);
        Some(value)
    }

    /// Queue `index`'s `queue_msix_vector`.
    pub fn queue_vector(&self, index: u16) -> Option<u16> {
        Some(
            self.queue_vectors
                .get(usize::from(index))?
                .load(Ordering::Acquire),
        )
    }

    /// The guest's write of `config_msix_vector`; returns what it reads back (as
    /// [`set_queue_vector`](Self::set_queue_vector)).
    pub fn set_config_vector(&self, vector: u16) -> u16 {
        let value = self.checked(vector);
        self.config_vector.store(value, Ordering::Release);
        value
    }

    /// Notifies the guest of a configuration change on the configuration vector. Returns `false`
    /// when it is [`NO_VECTOR`].
    ///
    /// # Errors
    ///
    /// Those of [`MsixVectors::raise`].
    pub fn signal_config(&self) -> Result<bool> {
        raise_vector(&self.vectors, self.config_vector.load(Ordering::Acquire))
    }

    /// The function's MSI-X vectors.
    pub fn vectors(&self) -> &Arc<MsixVectors> {
        &self.vectors
    }

    fn checked(&self, vector: u16) -> u16 {
        if usize::from(vector) < self.vectors.len() {
            vector
        } else {
            NO_VECTOR
        }
    }
}

fn notify_address(base: u64, multiplier: u32, off: u16) -> Result<u64> {
    u64::from(off)
        .checked_mul(multiplier.into())
        .and_then(|o| base.checked_add(o))
        .ok_or(Error::AddressWraps {
            addr: crate::ioevent::IoEventAddress::Mmio(base),
            width: 2,
        })
}
