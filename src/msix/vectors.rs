//! [`MsixVectors`]: the vector state machine (see the module docs of [`msix`](crate::msix)).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::device::{GuestInterrupt, MaskableInterrupt};
use crate::error::{Error, Result};
use crate::kvm::irqfd::Binding;
use crate::kvm::{Gsi, GsiRouter, MsiMessage};
use crate::msix::table::{self, Entry, MSIX_MAX_VECTORS};
use crate::notifier::{Attempt, Mode, Notifier};

/// One vector's state, as saved and restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct VectorState {
    /// The message address and data from the table.
    pub message: MsiMessage,
    /// The vector control mask bit.
    pub masked: bool,
    /// The PBA pending bit.
    pub pending: bool,
}

impl Default for VectorState {
    /// A vector after reset: masked, message zero, not pending.
    fn default() -> Self {
        VectorState {
            message: MsiMessage::default(),
            masked: true,
            pending: false,
        }
    }
}

/// The whole MSI-X state of a function, for snapshot and migration.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct MsixState {
    /// Message control: MSI-X enable.
    pub enabled: bool,
    /// Message control: function mask.
    pub function_masked: bool,
    /// Every vector, in table order.
    pub vectors: Vec<VectorState>,
}

/// Counters of what the vectors did, for reports and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsixStats {
    /// Calls of [`MsixVectors::trigger`].
    pub raised: u64,
    /// Raises injected at once (the vector was delivering).
    pub delivered: u64,
    /// Raises that set the pending bit (masked, function masked, or disabled).
    pub raised_while_masked: u64,
    /// Unmasks (or enables) that found the pending bit set and injected one interrupt.
    pub pending_at_unmask: u64,
}

#[derive(Default)]
struct Counters {
    raised: AtomicU64,
    delivered: AtomicU64,
    raised_while_masked: AtomicU64,
    pending_at_unmask: AtomicU64,
}

/// Where a vector's eventfd is: owned while detached, inside the irqfd while delivering.
enum Line {
    /// Never needed an eventfd yet.
    None,
    /// Detached: writes stay in the counter.
    Detached(Notifier),
    /// Assigned as an irqfd: writes inject.
    Attached(Binding),
}

struct Vector {
    state: VectorState,
    /// Copy of the function's "enabled and not function-masked", so `trigger` needs one lock.
    function_open: bool,
    /// The vector's MSI route and the message committed in it.
    route: Option<(Gsi, MsiMessage)>,
    line: Line,
}

impl Vector {
    fn delivers(&self) -> bool {
        self.function_open && !self.state.masked
    }

    /// Moves the counter of a detached eventfd into the pending bit.
    fn drain(&mut self) -> Result<()> {
        if let Line::Detached(n) = &self.line {
            if let Attempt::Done(c) = n.try_read()? {
                if c > 0 {
                    self.state.pending = true;
                }
            }
        }
        Ok(())
    }

    fn detach(&mut self) -> Result<()> {
        if let Line::Attached(_) = self.line {
            if let Line::Attached(b) = std::mem::replace(&mut self.line, Line::None) {
                self.line = Line::Detached(b.detach());
            }
        }
        self.drain()
    }

    /// Assigns the irqfd (route already committed with the current message) and delivers the
    /// pending bit.
    fn attach(&mut self, router: &GsiRouter, counters: &Counters) -> Result<()> {
        let Some((gsi, _)) = self.route else {
            return Ok(());
        };
        if let Line::Attached(_) = self.line {
            return Ok(());
        }
        // Events written while detached become the pending bit; the irqfd is then assigned on an
        // empty counter, so KVM's assign-time poll finds nothing to inject.
        self.drain()?;
        let notifier = match std::mem::replace(&mut self.line, Line::None) {
            Line::Detached(n) => n,
            _ => Notifier::new(Mode::Counter)?,
        };
        match Binding::assign(router, gsi, notifier, None) {
            Ok(b) => self.line = Line::Attached(b),
            Err((e, n)) => {
                self.line = Line::Detached(n);
                return Err(e);
            }
        }
        if self.state.pending {
            // Cleared only once the interrupt is on its way: a failed write keeps the bit.
            if let Line::Attached(b) = &self.line {
                b.trigger().notify()?;
            }
            self.state.pending = false;
            counters.pending_at_unmask.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn is_pending(&self) -> Result<bool> {
        Ok(self.state.pending
            || match &self.line {
                Line::Detached(n) => n.is_pending()?,
                _ => false,
            })
    }
}

struct Function {
    enabled: bool,
    masked: bool,
}

struct Inner {
    router: GsiRouter,
    /// Held by every reconfiguration (mask, message, function bits, `configure`) from start to
    /// end, so they run one at a time; a device's trigger never takes it.
    config: Mutex<()>,
    function: Mutex<Function>,
    vectors: Box<[Mutex<Vector>]>,
    counters: Counters,
}

impl Inner {
    fn vector(&self, index: usize) -> Result<MutexGuard<'_, Vector>> {
        let v = self.vectors.get(index).ok_or(Error::MsixVectorIndex {
            index,
            count: self.vectors.len(),
        })?;
        Ok(lock(v))
    }

    fn function(&self) -> MutexGuard<'_, Function> {
        lock(&self.function)
    }

    fn configuring(&self) -> MutexGuard<'_, ()> {
        lock(&self.config)
    }

    /// Brings the routes of `vectors` up to date in one routing transaction and then assigns
    /// the irqfds of those that deliver. The guards must be held by the caller.
    fn sync(&self, vectors: &mut [MutexGuard<'_, Vector>]) -> Result<()> {
        let mut changed = Vec::new();
        {
            let mut tx = self.router.transaction();
            for (i, v) in vectors.iter().enumerate() {
                if !v.delivers() {
                    continue;
                }
                let msg = v.state.message;
                match v.route {
                    Some((_, routed)) if routed == msg => {}
                    Some((gsi, _)) => {
                        tx.set_msi(gsi, msg)?;
                        changed.push((i, gsi, msg));
                    }
                    None => changed.push((i, tx.add_msi(msg)?, msg)),
                }
            }
            if !changed.is_empty() {
                tx.commit()?;
            }
        }
        for (i, gsi, msg) in changed {
            vectors[i].route = Some((gsi, msg));
        }
        for v in vectors.iter_mut() {
            if v.delivers() {
                v.attach(&self.router, &self.counters)?;
            }
        }
        Ok(())
    }

    fn lock_all(&self) -> Vec<MutexGuard<'_, Vector>> {
        self.vectors.iter().map(lock).collect()
    }

    /// Applies a new function state to every vector: detach those that stop delivering, attach
    /// those that start.
    fn set_function(&self, change: impl FnOnce(&mut Function)) -> Result<()> {
        let _config = self.configuring();
        let open = {
            let mut f = self.function();
            change(&mut f);
            f.enabled && !f.masked
        };
        self.reconfigure(|_, v| v.function_open = open)
    }

    /// Applies `change` to every vector and brings them all up to date: those that stop
    /// delivering detached, the routes of those that deliver in one commit, their irqfds
    /// attached. The caller holds `config`. Each vector is locked only while it is looked at or
    /// attached, never across the commit, so a device's trigger waits at most for its own
    /// vector's detach or attach (a trigger meanwhile on a vector not yet attached becomes its
    /// pending bit, delivered as it attaches).
    fn reconfigure(&self, mut change: impl FnMut(usize, &mut Vector)) -> Result<()> {
        // The routes to make: (vector, its committed GSI if any, the message).
        let mut stale = Vec::new();
        for (i, slot) in self.vectors.iter().enumerate() {
            let mut v = lock(slot);
            change(i, &mut v);
            if !v.delivers() {
                v.detach()?;
                continue;
            }
            match v.route {
                Some((_, routed)) if routed == v.state.message => {}
                route => stale.push((i, route.map(|(gsi, _)| gsi), v.state.message)),
            }
        }
        let mut made = Vec::with_capacity(stale.len());
        if !stale.is_empty() {
            let mut tx = self.router.transaction();
            for &(i, committed, msg) in &stale {
                let gsi = match committed {
                    Some(gsi) => {
                        tx.set_msi(gsi, msg)?;
                        gsi
                    }
                    None => tx.add_msi(msg)?,
                };
                made.push((i, gsi, msg));
            }
            tx.commit()?;
        }
        // Every committed route recorded, whatever an attach says.
        let mut made = made.into_iter().peekable();
        let mut first = Ok(());
        for (i, slot) in self.vectors.iter().enumerate() {
            let mut v = lock(slot);
            if let Some((_, gsi, msg)) = made.next_if(|&(j, ..)| j == i) {
                v.route = Some((gsi, msg));
            }
            if v.delivers() {
                if let (Err(e), Ok(())) = (v.attach(&self.router, &self.counters), &first) {
                    first = Err(e);
                }
            }
        }
        first
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Deassign every irqfd before its route goes, then remove the routes in one commit.
        let mut gsis = Vec::new();
        for v in self.vectors.iter() {
            let mut v = lock(v);
            let _ = v.detach();
            if let Some((gsi, _)) = v.route.take() {
                gsis.push(gsi);
            }
        }
        if !gsis.is_empty() {
            let _ = self.router.remove_all(&gsis);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every state change is made before anything that can fail returns, so a poisoned lock still
    // guards consistent state.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A function's MSI-X vectors. Cheap to clone: the device thread raises, the VMM thread emulates
/// the table, both on clones of one set.
///
/// ```
/// # if !vm_notify_testkit::kvm_or_skip("doc example") { return Ok(()); }
/// # use std::sync::Arc;
/// use vm_notify::fallback::Policy;
/// use vm_notify::kvm::MsiMessage;
/// use vm_notify::msix::MSIX_ENABLE;
/// use vm_notify::Vm;
/// # let kvm = kvm_ioctls::Kvm::new()?;
/// # let fd = Arc::new(kvm.create_vm()?);
/// # fd.create_irq_chip()?;
/// let vm = Vm::new(fd, Policy::Kernel)?;
/// let msix = vm.msix(4)?;
/// // What a guest driver does through the table and the capability:
/// msix.set_message(0, MsiMessage::x86(0, 0x41))?;
/// msix.set_masked(0, false)?;
/// msix.write_message_control(MSIX_ENABLE)?;
/// // The device:
/// msix.trigger(0)?; // injected
/// msix.set_masked(0, true)?;
/// msix.trigger(0)?; // held: the PBA bit is set
/// assert!(msix.vector(0)?.pending);
/// msix.set_masked(0, false)?; // exactly one interrupt now
/// assert!(!msix.vector(0)?.pending);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct MsixVectors {
    inner: Arc<Inner>,
}

/// A handle to a function's vectors that does not keep them: once every [`MsixVectors`] is
/// dropped, the routes and irqfds go, whoever still holds one of these (a device thread's queue
/// interrupt).
#[derive(Clone)]
pub(crate) struct WeakVectors {
    inner: std::sync::Weak<Inner>,
    len: usize,
}

impl WeakVectors {
    /// The vectors, while an owner holds them.
    pub(crate) fn upgrade(&self) -> Option<MsixVectors> {
        self.inner.upgrade().map(|inner| MsixVectors { inner })
    }

    /// The number of vectors.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl fmt::Debug for MsixVectors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let func = self.inner.function();
        f.debug_struct("MsixVectors")
            .field("vectors", &self.inner.vectors.len())
            .field("enabled", &func.enabled)
            .field("function_masked", &func.masked)
            .field("stats", &self.stats())
            .finish()
    }
}

impl MsixVectors {
    /// `count` vectors in their reset state (all masked, MSI-X disabled), routed through
    /// `router`. No GSI is used until a vector first delivers.
    ///
    /// # Errors
    ///
    /// [`Error::MsixVectorCount`] unless `1 <= count <= 2048`.
    pub(crate) fn new(router: &GsiRouter, count: usize) -> Result<Self> {
        let state = MsixState {
            enabled: false,
            function_masked: false,
            vectors: vec![VectorState::default(); count],
        };
        Self::build(router, &state)
    }

    /// Vectors with a saved state, on `router`'s VM (a new VM after migration). Re-registers
    /// every delivering vector; a pending bit on a delivering vector is delivered now, on a masked
    /// one when the guest unmasks it.
    ///
    /// # Errors
    ///
    /// [`Error::MsixVectorCount`], and the routing and irqfd errors of registering.
    pub(crate) fn restore(router: &GsiRouter, state: &MsixState) -> Result<Self> {
        let v = Self::build(router, state)?;
        let mut all = v.inner.lock_all();
        v.inner.sync(&mut all)?;
        drop(all);
        Ok(v)
    }

    fn build(router: &GsiRouter, state: &MsixState) -> Result<Self> {
        let count = state.vectors.len();
        if !(1..=MSIX_MAX_VECTORS).contains(&count) {
            return Err(Error::MsixVectorCount { count });
        }
        let open = state.enabled && !state.function_masked;
        let vectors = state
            .vectors
            .iter()
            .map(|&s| {
                Mutex::new(Vector {
                    state: s,
                    function_open: open,
                    route: None,
                    line: Line::None,
                })
            })
            .collect();
        Ok(MsixVectors {
            inner: Arc::new(Inner {
                router: router.clone(),
                config: Mutex::new(()),
                function: Mutex::new(Function {
                    enabled: state.enabled,
                    masked: state.function_masked,
                }),
                vectors,
                counters: Counters::default(),
            }),
        })
    }

    /// A handle that does not keep the vectors.
    pub(crate) fn downgrade(&self) -> WeakVectors {
        WeakVectors {
            inner: Arc::downgrade(&self.inner),
            len: self.len(),
        }
    }

    /// The number of vectors.
    pub fn len(&self) -> usize {
        self.inner.vectors.len()
    }

    /// Always false: a table has at least one vector.
    pub fn is_empty(&self) -> bool {
        self.inner.vectors.is_empty()
    }

    /// Triggers vector `index`: injected now if it delivers, else its pending bit is set.
    ///
    /// # Errors
    ///
    /// [`Error::MsixVectorIndex`], or [`Error::Notifier`] if the eventfd write fails.
    pub fn trigger(&self, index: usize) -> Result<()> {
        let c = &self.inner.counters;
        let mut v = self.inner.vector(index)?;
        c.raised.fetch_add(1, Ordering::Relaxed);
        if let Line::Attached(b) = &v.line {
            b.trigger().notify()?;
            c.delivered.fetch_add(1, Ordering::Relaxed);
        } else {
            v.state.pending = true;
            c.raised_while_masked.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// A handle to vector `index`'s eventfd, for a writer outside this process's trigger path
    /// (a vhost-user backend's call fd, a VFIO interrupt). Writes to it deliver while the vector
    /// delivers and become the pending bit while it does not.
    ///
    /// # Errors
    ///
    /// [`Error::MsixVectorIndex`], [`Error::FdExhausted`].
    pub(crate) fn notifier(&self, index: usize) -> Result<Notifier> {
        let mut v = self.inner.vector(index)?;
        match &v.line {
            Line::Attached(b) => Ok(b.trigger().clone()),
            Line::Detached(n) => Ok(n.clone()),
            Line::None => {
                let n = Notifier::new(Mode::Counter)?;
                let shared = n.clone();
                v.line = Line::Detached(n);
                Ok(shared)
            }
        }
    }

    /// Sets vector `index`'s mask bit. Masking detaches its irqfd; unmasking re-attaches it and
    /// delivers one interrupt if the pending bit is set.
    ///
    /// # Errors
    ///
    /// [`Error::MsixVectorIndex`], and the routing, irqfd and eventfd errors of (re)attaching.
    /// An unmask that fails leaves the vector masked with its pending bit, as before the call.
    pub fn set_masked(&self, index: usize, masked: bool) -> Result<()> {
        let _config = self.inner.configuring();
        let mut v = self.inner.vector(index)?;
        if v.state.masked == masked {
            return Ok(());
        }
        v.state.masked = masked;
        if masked {
            return v.detach();
        }
        let unmasked = self.inner.sync(std::slice::from_mut(&mut v));
        if unmasked.is_err() {
            // All or nothing: the vector stays masked, with its pending bit (events the
            // half-made irqfd took go back into it), so the guest's next unmask tries again.
            v.state.masked = true;
            let _ = v.detach();
        }
        unmasked
    }

    /// Sets vector `index`'s message. A delivering vector's route is updated at once (its irqfd
    /// stays assigned); a masked one's when it next delivers.
    ///
    /// # Errors
    ///
    /// [`Error::MsixVectorIndex`], and routing errors.
    pub fn set_message(&self, index: usize, message: MsiMessage) -> Result<()> {
        let _config = self.inner.configuring();
        let mut v = self.inner.vector(index)?;
        v.state.message = message;
        self.inner.sync(std::slice::from_mut(&mut v))
    }

    /// Sets many vectors' messages and masks with one routing commit.
    ///
    /// # Errors
    ///
    /// [`Error::MsixVectorIndex`] (nothing is changed then), and routing and irqfd errors.
    pub fn configure(&self, vectors: &[(usize, MsiMessage, bool)]) -> Result<()> {
        let count = self.len();
        if let Some(&(index, _, _)) = vectors.iter().find(|(i, _, _)| *i >= count) {
            return Err(Error::MsixVectorIndex { index, count });
        }
        let mut wanted = vec![None; count];
        for &(index, message, masked) in vectors {
            wanted[index] = Some((message, masked));
        }
        let _config = self.inner.configuring();
        self.inner.reconfigure(|i, v| {
            if let Some((message, masked)) = wanted[i] {
                v.state.message = message;
                v.state.masked = masked;
            }
        })
    }

    /// Vector `index`'s state.
    ///
    /// # Errors
    ///
    /// [`Error::MsixVectorIndex`], or [`Error::Notifier`] if polling fails.
    pub fn vector(&self, index: usize) -> Result<VectorState> {
        let v = self.inner.vector(index)?;
        Ok(VectorState {
            pending: v.is_pending()?,
            ..v.state
        })
    }

    /// The GSI vector `index` delivers through, once it has delivered.
    ///
    /// # Errors
    ///
    /// [`Error::MsixVectorIndex`].
    pub fn gsi(&self, index: usize) -> Result<Option<Gsi>> {
        Ok(self.inner.vector(index)?.route.map(|(gsi, _)| gsi))
    }

    /// The capability's message control register: enable (bit 15), function mask (bit 14),
    /// table size − 1 (bits 0–10).
    pub fn message_control(&self) -> u16 {
        let f = self.inner.function();
        table::message_control(self.len(), f.enabled, f.masked)
    }

    /// A guest write of the message control register: applies bits 15 and 14; the table size is
    /// read-only.
    ///
    /// # Errors
    ///
    /// Routing and irqfd errors of attaching the vectors that start delivering.
    pub fn write_message_control(&self, value: u16) -> Result<()> {
        let (enabled, masked) = table::decode_message_control(value);
        self.inner.set_function(|f| {
            f.enabled = enabled;
            f.masked = masked;
        })
    }

    /// The size of the MSI-X table in bytes.
    pub fn table_len(&self) -> u64 {
        table::table_len(self.len())
    }

    /// The size of the PBA in bytes (whole QWORDs).
    pub fn pba_len(&self) -> u64 {
        table::pba_len(self.len())
    }

    /// A guest read of the MSI-X table at `offset` into `data` (4 or 8 bytes, naturally
    /// aligned). Reserved bits read as 0.
    ///
    /// # Errors
    ///
    /// [`Error::MsixAccess`] for any other size, alignment or an offset past the table; `data`
    /// is then left as it was.
    pub(crate) fn table_read(&self, offset: u64, data: &mut [u8]) -> Result<()> {
        table::check_access(offset, data.len(), self.table_len())?;
        let s = self.inner.vector(table::entry_index(offset))?.state;
        let entry = Entry {
            message: s.message,
            masked: s.masked,
        };
        table::read_entry(&entry, offset, data);
        Ok(())
    }

    /// A guest write of the MSI-X table at `offset` (4 or 8 bytes, naturally aligned). Writes
    /// to reserved bits (address bits 0–1, vector control bits 1–31) are dropped. The message and
    /// mask change together, under the vector's lock, with at most one routing commit: an
    /// 8-byte write of data and vector control is one change, as the device sees it.
    ///
    /// # Errors
    ///
    /// [`Error::MsixAccess`] for any other size, alignment or an offset past the table (nothing
    /// is written then), and the errors of applying the change.
    pub(crate) fn table_write(&self, offset: u64, data: &[u8]) -> Result<()> {
        table::check_access(offset, data.len(), self.table_len())?;
        let _config = self.inner.configuring();
        let mut v = self.inner.vector(table::entry_index(offset))?;
        let before = Entry {
            message: v.state.message,
            masked: v.state.masked,
        };
        let after = table::write_entry(before, offset, data);
        // Applied even when nothing changed: a rewrite retries an attach that failed before.
        v.state.message = after.message;
        v.state.masked = after.masked;
        if !v.delivers() {
            v.detach()?;
        }
        self.inner.sync(std::slice::from_mut(&mut v))
    }

    /// A guest read of the PBA at `offset` into `data` (4 or 8 bytes, naturally aligned): bit
    /// `n` is vector `n`'s pending bit; bits past the last vector read as 0.
    ///
    /// # Errors
    ///
    /// [`Error::MsixAccess`] for any other size, alignment or an offset past the PBA.
    pub(crate) fn pba_read(&self, offset: u64, data: &mut [u8]) -> Result<()> {
        table::check_access(offset, data.len(), self.pba_len())?;
        table::read_pba(self.len(), offset, data, |i| {
            self.inner.vector(i)?.is_pending()
        })
    }

    /// A guest write of the PBA: read-only to software, so nothing changes.
    ///
    /// # Errors
    ///
    /// [`Error::MsixAccess`] for a malformed access.
    pub(crate) fn pba_write(&self, offset: u64, data: &[u8]) -> Result<()> {
        table::check_access(offset, data.len(), self.pba_len())
    }

    /// A handle on vector `index`, for a device that triggers one vector (it implements
    /// [`GuestInterrupt`]).
    ///
    /// # Errors
    ///
    /// [`Error::MsixVectorIndex`].
    pub fn handle(&self, index: usize) -> Result<MsixVector> {
        if index >= self.len() {
            return Err(Error::MsixVectorIndex {
                index,
                count: self.len(),
            });
        }
        Ok(MsixVector {
            vectors: self.clone(),
            index,
        })
    }

    /// The whole state, for snapshot or migration. Events sitting in the counter of a detached
    /// eventfd (written by an external writer while masked) are moved into their pending bits
    /// first, so the state holds them.
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`] if reading a counter fails.
    pub fn save(&self) -> Result<MsixState> {
        let f = self.inner.function();
        let mut all = self.inner.lock_all();
        let mut vectors = Vec::with_capacity(all.len());
        for v in all.iter_mut() {
            v.drain()?;
            vectors.push(v.state);
        }
        Ok(MsixState {
            enabled: f.enabled,
            function_masked: f.masked,
            vectors,
        })
    }

    /// What the vectors did so far.
    pub fn stats(&self) -> MsixStats {
        let c = &self.inner.counters;
        MsixStats {
            raised: c.raised.load(Ordering::Relaxed),
            delivered: c.delivered.load(Ordering::Relaxed),
            raised_while_masked: c.raised_while_masked.load(Ordering::Relaxed),
            pending_at_unmask: c.pending_at_unmask.load(Ordering::Relaxed),
        }
    }
}

/// One vector of a function's [`MsixVectors`]: what a device holds to trigger it, as a
/// [`GuestInterrupt`] that has an eventfd and can be masked. Cheap to clone.
#[derive(Debug, Clone)]
pub struct MsixVector {
    vectors: MsixVectors,
    index: usize,
}

impl MsixVector {
    /// The vector's index in the table.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The function's vectors.
    pub fn vectors(&self) -> &MsixVectors {
        &self.vectors
    }

    /// Triggers the vector (see [`MsixVectors::trigger`]).
    ///
    /// # Errors
    ///
    /// Those of [`MsixVectors::trigger`].
    pub fn trigger(&self) -> Result<()> {
        self.vectors.trigger(self.index)
    }

    /// A handle to the vector's eventfd, for a writer outside this process's trigger path
    /// (a vhost-user backend's call fd, a VFIO interrupt). Writes to it deliver while the vector
    /// delivers and become the pending bit while it does not.
    ///
    /// # Errors
    ///
    /// [`Error::FdExhausted`](crate::Error::FdExhausted).
    pub fn notifier(&self) -> Result<Notifier> {
        self.vectors.notifier(self.index)
    }
}

impl GuestInterrupt for MsixVector {
    fn trigger(&self) -> Result<bool> {
        MsixVector::trigger(self).map(|()| true)
    }

    fn eventfd(&self) -> Result<Option<Notifier>> {
        self.notifier().map(Some)
    }

    fn mask(&self) -> Option<&dyn MaskableInterrupt> {
        Some(self)
    }
}

impl MaskableInterrupt for MsixVector {
    fn set_masked(&self, masked: bool) -> Result<()> {
        self.vectors.set_masked(self.index, masked)
    }

    fn is_masked(&self) -> bool {
        self.vectors.vector(self.index).is_ok_and(|v| v.masked)
    }

    fn is_pending(&self) -> bool {
        self.vectors.vector(self.index).is_ok_and(|v| v.pending)
    }
}

impl vm_superio::Trigger for MsixVector {
    type E = Error;

    fn trigger(&self) -> Result<()> {
        MsixVector::trigger(self)
    }
}
