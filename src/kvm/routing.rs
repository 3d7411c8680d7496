//! [`GsiRouter`]: the VM's GSI routing table, owned in one place.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, and KVM cannot read it back. After
//! `KVM_CREATE_IRQCHIP` on x86 the kernel installs default routes (GSI 0–15 to the PIC pin and the
//! IOAPIC pin of the same number, GSI 16–23 to the IOAPIC only); the first `KVM_SET_GSI_ROUTING`
//! that leaves them out removes them. The router therefore keeps a shadow of the whole table,
//! seeded with those defaults, and sends all of it on every commit.
//!
//! Each `KVM_SET_GSI_ROUTING` waits for an SRCU grace period in the kernel, so many changes should
//! share one call: a [`Transaction`] collects them and commits once. A transaction holds no lock
//! between calls: each change is checked against the committed table when it is made, the GSIs it
//! allocates are reserved so no other transaction takes them, and the commit applies the changes
//! to the table as it is then. The router can therefore be used freely, on any thread, while a
//! transaction is open.
//!
//! The router also knows which GSIs have irqfds bound, so it refuses an irqfd on a GSI with no
//! route (KVM would accept it and drop every interrupt) and refuses to remove a route that still
//! has an irqfd (the irqfd must be deassigned first).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_IRQ_ROUTES,
};
use kvm_ioctls::VmFd;

use crate::error::{Capability, Error, Result};
use crate::sys::{self, Capabilities};

/// A global system interrupt number: what an irqfd injects.
pub type Gsi = u32;

/// The number of GSIs KVM accepts on x86 (`KVM_MAX_IRQ_ROUTES`); GSIs are below it.
pub const GSI_LIMIT: u32 = KVM_MAX_IRQ_ROUTES as u32;

/// The most entries one routing table can hold (`KVM_MAX_IRQ_ROUTES`).
pub(crate) const ROUTE_TABLE_LIMIT: usize = KVM_MAX_IRQ_ROUTES;

/// GSIs 0..24 are the legacy irqchip pins; allocation starts above them.
pub(crate) const IRQCHIP_GSIS: u32 = 24;

/// An in-kernel interrupt controller a GSI can be routed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IrqChip {
    /// The master 8259 PIC (pins 0–7).
    PicMaster,
    /// The slave 8259 PIC (pins 0–7, IRQ 8–15).
    PicSlave,
    /// The IOAPIC (pins 0–23).
    Ioapic,
}

impl IrqChip {
    fn id(self) -> u32 {
        match self {
            IrqChip::PicMaster => KVM_IRQCHIP_PIC_MASTER,
            IrqChip::PicSlave => KVM_IRQCHIP_PIC_SLAVE,
            IrqChip::Ioapic => KVM_IRQCHIP_IOAPIC,
        }
    }
}

/// An MSI message: what a device writes, and where, to interrupt a CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct MsiMessage {
    /// The message address (`0xfee0_0000 | dest_apic_id << 12` on x86).
    pub address: u64,
    /// The message data (vector in bits 0–7 on x86).
    pub data: u32,
}

impl MsiMessage {
    /// A fixed-delivery, edge-triggered x86 MSI of `vector` to the local APIC `apic_id`.
    pub fn x86(apic_id: u8, vector: u8) -> Self {
        MsiMessage {
            address: 0xfee0_0000 | (u64::from(apic_id) << 12),
            data: u32::from(vector),
        }
    }
}

/// One entry of the routing table for a GSI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Route {
    /// To a pin of an in-kernel interrupt controller.
    Irqchip {
        /// The controller.
        chip: IrqChip,
        /// The pin on it.
        pin: u32,
    },
    /// As an MSI message to the local APICs.
    Msi(MsiMessage),
}

impl Route {
    fn entry(&self, gsi: Gsi) -> kvm_irq_routing_entry {
        let mut e = kvm_irq_routing_entry {
            gsi,
            ..Default::default()
        };
        match *self {
            Route::Irqchip { chip, pin } => {
                e.type_ = KVM_IRQ_ROUTING_IRQCHIP;
                e.u.irqchip.irqchip = chip.id();
                e.u.irqchip.pin = pin;
            }
            Route::Msi(m) => {
                e.type_ = KVM_IRQ_ROUTING_MSI;
                e.u.msi.address_lo = m.address as u32;
                e.u.msi.address_hi = (m.address >> 32) as u32;
                e.u.msi.data = m.data;
            }
        }
        e
    }
}

/// The default table KVM installs with `KVM_CREATE_IRQCHIP` on x86.
fn default_routes() -> BTreeMap<Gsi, Vec<Route>> {
    let mut t = BTreeMap::new();
    for gsi in 0..IRQCHIP_GSIS {
        let mut routes = vec![Route::Irqchip {
            chip: IrqChip::Ioapic,
            pin: gsi,
        }];
        if gsi < 16 {
            let chip = if gsi < 8 {
                IrqChip::PicMaster
            } else {
                IrqChip::PicSlave
            };
            routes.push(Route::Irqchip { chip, pin: gsi % 8 });
        }
        t.insert(gsi, routes);
    }
    t
}

#[derive(Debug, Default)]
struct Table {
    /// What the kernel has.
    routes: BTreeMap<Gsi, Vec<Route>>,
    /// irqfds bound per GSI.
    irqfds: HashMap<Gsi, usize>,
    /// GSIs allocated by open transactions, not yet committed.
    reserved: HashSet<Gsi>,
    /// The number of entries in `routes`.
    entries: usize,
    /// Commits made so far.
    commits: u64,
    /// The commit that created each allocated GSI's route: a message change made for one route
    /// must not land on another that reused its GSI meanwhile.
    born: HashMap<Gsi, u64>,
    /// GSIs whose removal a commit is sending to KVM (the table lock is not held across the
    /// ioctl): no irqfd may bind to them meanwhile.
    removing: HashSet<Gsi>,
}

fn count_entries(routes: &BTreeMap<Gsi, Vec<Route>>) -> usize {
    routes.values().map(Vec::len).sum()
}

struct Shared {
    vm: Arc<VmFd>,
    table: Mutex<Table>,
    /// Held by a commit from its check to its end, across `KVM_SET_GSI_ROUTING`: commits reach
    /// KVM in the order they apply to the table. The table lock itself is never held across an
    /// ioctl, so lookups (the injector's), irqfd bookkeeping and the building of other
    /// transactions do not wait for one.
    committing: Mutex<()>,
    caps: Capabilities,
    /// The split irqchip: GSIs below [`IRQCHIP_GSIS`] are the userspace IOAPIC's pins.
    split: bool,
}

/// The owner of a VM's GSI routing table. Cheap to clone: clones share one table.
///
/// A [`Vm`](crate::Vm) holds one ([`Vm::router`](crate::Vm::router)); make every
/// routing change through it: one change at a time with [`route_msi`](Self::route_msi),
/// [`set_msi`](Self::set_msi) and [`remove`](Self::remove), or many in one
/// `KVM_SET_GSI_ROUTING` with a [`transaction`](Self::transaction).
///
/// ```
/// # if !vm_notify_testkit::kvm_or_skip("doc example") { return Ok(()); }
/// use std::sync::Arc;
/// use vm_notify::fallback::Policy;
/// use vm_notify::kvm::MsiMessage;
/// use vm_notify::Vm;
///
/// let kvm = kvm_ioctls::Kvm::new()?;
/// let fd = Arc::new(kvm.create_vm()?);
/// fd.create_irq_chip()?;
/// let vm = Vm::new(fd, Policy::Kernel)?;
/// // One KVM_SET_GSI_ROUTING, the irqchip's default routes included.
/// let gsi = vm.router().route_msi(MsiMessage::x86(0, 0x40))?;
/// let irq = vm.irqfd(gsi)?;
/// irq.trigger()?; // the guest's vector 0x40 handler runs
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct GsiRouter {
    shared: Arc<Shared>,
}

impl fmt::Debug for GsiRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.lock();
        f.debug_struct("GsiRouter")
            .field("routed_gsis", &t.routes.len())
            .field("entries", &t.entries)
            .field("bound_irqfds", &t.irqfds.values().sum::<usize>())
            .finish()
    }
}

impl GsiRouter {
    /// Takes charge of `vm`'s routing table, seeded with the irqchip's default routes.
    ///
    /// # Errors
    ///
    /// [`Error::MissingCapability`] when the VM has no in-kernel irqchip or KVM lacks
    /// `KVM_CAP_IRQ_ROUTING`.
    pub(crate) fn new(vm: Arc<VmFd>) -> Result<Self> {
        let caps = Capabilities::probe(&vm);
        caps.require([Capability::IrqRouting, Capability::Irqchip])?;
        let routes = default_routes();
        let table = Table {
            entries: count_entries(&routes),
            routes,
            ..Table::default()
        };
        Ok(GsiRouter {
            shared: Arc::new(Shared {
                vm,
                table: Mutex::new(table),
                committing: Mutex::new(()),
                caps,
                split: false,
            }),
        })
    }

    /// Takes charge of the routing table of `vm`, which runs the split irqchip
    /// (`KVM_CAP_SPLIT_IRQCHIP`): local APICs in the kernel, no PIC or IOAPIC there, so no
    /// default routes. GSIs below 24 stay reserved for a userspace IOAPIC's pins; MSI routes
    /// are allocated above them, as with the in-kernel irqchip. Only the VM's
    /// [`Ioapic`](crate::irqchip::Ioapic) routes a pin (as its redirection entry says), and an
    /// irqfd bound here on a pin is refused with [`Error::IoapicPin`]: interrupts on pins are
    /// made from the [`Vm`](crate::Vm), whose backend serves them through the IOAPIC.
    ///
    /// # Errors
    ///
    /// [`Error::MissingCapability`] when KVM lacks `KVM_CAP_IRQ_ROUTING` or
    /// `KVM_CAP_SPLIT_IRQCHIP`.
    pub(crate) fn split(vm: Arc<VmFd>) -> Result<Self> {
        let caps = Capabilities::probe(&vm);
        caps.require([Capability::IrqRouting, Capability::SplitIrqchip])?;
        Ok(GsiRouter {
            shared: Arc::new(Shared {
                vm,
                table: Mutex::new(Table::default()),
                committing: Mutex::new(()),
                caps,
                split: true,
            }),
        })
    }

    /// The VM this router routes.
    pub(crate) fn vm(&self) -> &Arc<VmFd> {
        &self.shared.vm
    }

    /// Whether `gsi` is a pin of the split irqchip's IOAPIC.
    pub(crate) fn is_pin(&self, gsi: Gsi) -> bool {
        self.shared.split && gsi < IRQCHIP_GSIS
    }

    /// [`Error::IoapicPin`] for a pin of the split irqchip's IOAPIC.
    fn refuse_pin(&self, gsi: Gsi) -> Result<()> {
        if self.is_pin(gsi) {
            return Err(Error::IoapicPin { gsi });
        }
        Ok(())
    }

    /// Sets the routes of IOAPIC pins on the split irqchip, in one commit: `Some` routes the pin
    /// as that MSI, `None` removes its route. For the IOAPIC only.
    pub(crate) fn set_pin_routes(&self, pins: &[(Gsi, Option<MsiMessage>)]) -> Result<()> {
        let mut tx = self.transaction();
        {
            let table = self.lock();
            for &(gsi, msg) in pins {
                debug_assert!(self.shared.split && gsi < IRQCHIP_GSIS);
                match msg {
                    Some(m) => tx.record(&table, gsi, Change::Pin(m)),
                    None if table.routes.contains_key(&gsi) => {
                        tx.record(&table, gsi, Change::Remove(table.born.get(&gsi).copied()))
                    }
                    None => {}
                }
            }
        }
        tx.commit()
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic elsewhere while holding the lock leaves the table consistent: the committed
        // routes change in one assignment, after the ioctl succeeded.
        self.shared.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a batch of route changes, sent together by [`Transaction::commit`] in one
    /// `KVM_SET_GSI_ROUTING`. The transaction holds no lock: the router (and irqfds on it) can
    /// be used while it is open, on this thread or another.
    pub fn transaction(&self) -> Transaction<'_> {
        Transaction {
            router: self,
            changes: BTreeMap::new(),
            delta: 0,
            next_free: IRQCHIP_GSIS,
        }
    }

    /// Allocates the lowest free GSI above the irqchip pins, routes it to `msg` and commits.
    ///
    /// # Errors
    ///
    /// Those of [`Transaction::add_msi`] and [`Transaction::commit`].
    pub fn route_msi(&self, msg: MsiMessage) -> Result<Gsi> {
        let mut tx = self.transaction();
        let gsi = tx.add_msi(msg)?;
        tx.commit()?;
        Ok(gsi)
    }

    /// Changes the message of an MSI route and commits. Irqfds bound to it stay bound and
    /// deliver the new message from then on.
    ///
    /// # Errors
    ///
    /// Those of [`Transaction::set_msi`] and [`Transaction::commit`].
    pub fn set_msi(&self, gsi: Gsi, msg: MsiMessage) -> Result<()> {
        let mut tx = self.transaction();
        tx.set_msi(gsi, msg)?;
        tx.commit()
    }

    /// Removes every route of `gsi` and commits.
    ///
    /// # Errors
    ///
    /// Those of [`Transaction::remove`] and [`Transaction::commit`].
    pub fn remove(&self, gsi: Gsi) -> Result<()> {
        let mut tx = self.transaction();
        tx.remove(gsi)?;
        tx.commit()
    }

    /// Removes the routes of `gsis` in one commit, for a teardown (a drop, the unwinding of a
    /// failed registration): a commit that fails is tried again, up to
    /// [`UNDO_ATTEMPTS`](crate::sys::UNDO_ATTEMPTS) times, as nobody can act on its error. A
    /// GSI that cannot go (an irqfd still bound to it) is kept, and the first such refusal
    /// reported.
    pub(crate) fn remove_all(&self, gsis: &[Gsi]) -> Result<()> {
        let mut attempt = 1;
        loop {
            let mut tx = self.transaction();
            let mut refused = Ok(());
            for &gsi in gsis {
                if let (Err(e), Ok(())) = (tx.remove(gsi), &refused) {
                    refused = Err(e);
                }
            }
            match tx.commit() {
                Ok(()) => return refused,
                Err(_) if attempt < crate::sys::UNDO_ATTEMPTS => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// The committed routes of `gsi` (empty when it has none).
    pub fn routes(&self, gsi: Gsi) -> Vec<Route> {
        self.lock().routes.get(&gsi).cloned().unwrap_or_default()
    }

    /// The number of entries in the committed table.
    pub fn entries(&self) -> usize {
        self.lock().entries
    }

    /// The number of irqfds (kernel or injected) bound to `gsi` through this router. The split
    /// irqchip's IOAPIC pins are not bound here: the [`Ioapic`](crate::irqchip::Ioapic) keeps
    /// their sources.
    pub fn irqfds(&self, gsi: Gsi) -> usize {
        self.lock().irqfds.get(&gsi).copied().unwrap_or(0)
    }

    /// What KVM offers on this VM, asked once when the router was created.
    pub(crate) fn capabilities(&self) -> &Capabilities {
        &self.shared.caps
    }

    /// Runs `assign` with the table locked if `gsi` has a committed route (an irqchip route when
    /// `level`), and records one more irqfd on it. The one place an irqfd's GSI is checked,
    /// whichever path then serves it.
    pub(crate) fn bind<T>(
        &self,
        gsi: Gsi,
        level: bool,
        assign: impl FnOnce(&VmFd) -> Result<T>,
    ) -> Result<T> {
        if gsi >= GSI_LIMIT {
            return Err(Error::GsiOutOfRange {
                gsi,
                limit: GSI_LIMIT,
            });
        }
        self.refuse_pin(gsi)?;
        {
            let mut t = self.lock();
            let routes = t
                .routes
                .get(&gsi)
                .filter(|r| !r.is_empty() && !t.removing.contains(&gsi))
                .ok_or(Error::UnroutedGsi { gsi })?;
            if level && routes.iter().any(|r| matches!(r, Route::Msi(_))) {
                return Err(Error::ResampleNeedsIrqchip { gsi });
            }
            // Counted before the ioctl, which runs unlocked: from here the route cannot be
            // removed (`GsiBusy`) until the irqfd is made or its making failed.
            *t.irqfds.entry(gsi).or_insert(0) += 1;
        }
        assign(&self.shared.vm).inspect_err(|_| self.uncount(gsi))
    }

    /// Runs `deassign` (unlocked: KVM's deassign waits for its irqfd work to drain) and then
    /// records one irqfd fewer on `gsi`; until then the route cannot be removed.
    pub(crate) fn unbind(&self, gsi: Gsi, deassign: impl FnOnce(&VmFd)) {
        deassign(&self.shared.vm);
        self.uncount(gsi);
    }

    fn uncount(&self, gsi: Gsi) {
        let mut t = self.lock();
        if let Some(n) = t.irqfds.get_mut(&gsi) {
            *n -= 1;
            if *n == 0 {
                t.irqfds.remove(&gsi);
            }
        }
    }
}

/// One change a transaction will make to a GSI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// A GSI this transaction allocated (reserved in the table) and routes to the message.
    Add(MsiMessage),
    /// A new message for a committed MSI route, made when the route was the one created by
    /// the given commit.
    Set(MsiMessage, Option<u64>),
    /// Every route of a committed GSI removed, made when the GSI's routes were the ones created
    /// by the given commit (`None`: routes no transaction added, the irqchip's defaults or a
    /// pin's).
    Remove(Option<u64>),
    /// An IOAPIC pin of the split irqchip routed as the MSI its redirection entry makes.
    Pin(MsiMessage),
}

impl Change {
    /// The entries `gsi` holds with this change applied to `table`, minus those it held before.
    fn delta(self, table: &Table, gsi: Gsi) -> isize {
        let before = || table.routes.get(&gsi).map_or(0, Vec::len) as isize;
        match self {
            // An allocated GSI has no committed route.
            Change::Add(_) => 1,
            Change::Set(..) | Change::Pin(_) => 1 - before(),
            Change::Remove(_) => -before(),
        }
    }

    /// The routes `gsi` holds with this change applied, or `None` when it has none.
    fn routes(self) -> Option<Vec<Route>> {
        match self {
            Change::Add(msg) | Change::Set(msg, _) | Change::Pin(msg) => {
                Some(vec![Route::Msi(msg)])
            }
            Change::Remove(_) => None,
        }
    }
}

/// A batch of route changes committed in one `KVM_SET_GSI_ROUTING`.
///
/// KVM replaces the whole table on each call and waits for an SRCU grace period, so 1024 changes
/// in one transaction cost one call instead of 1024. Limits are checked as changes are made, and
/// again at the commit against the table as it is then. Dropping a transaction without committing
/// discards its changes and frees the GSIs it allocated.
///
/// The order that is safe for the kernel is enforced: a route with irqfds bound cannot be removed
/// ([`Error::GsiBusy`]: deassign first), and an irqfd can only bind to a committed route (assign
/// after the commit).
///
/// ```
/// # if !vm_notify_testkit::kvm_or_skip("doc example") { return Ok(()); }
/// use vm_notify::kvm::MsiMessage;
/// # use std::sync::Arc;
/// # use vm_notify::{fallback::Policy, Vm};
/// # let kvm = kvm_ioctls::Kvm::new()?;
/// # let fd = Arc::new(kvm.create_vm()?);
/// # fd.create_irq_chip()?;
/// # let vm = Vm::new(fd, Policy::Kernel)?;
/// let router = vm.router();
/// let mut tx = router.transaction();
/// let gsis = (0..64)
///     .map(|v| tx.add_msi(MsiMessage::x86(0, 0x40 + v)))
///     .collect::<Result<Vec<_>, _>>()?;
/// // The router stays usable while the transaction is open.
/// assert!(router.routes(gsis[0]).is_empty());
/// tx.commit()?; // one ioctl for 64 routes
/// assert_eq!(router.routes(gsis[63]).len(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[must_use = "a transaction does nothing until it is committed"]
pub struct Transaction<'a> {
    router: &'a GsiRouter,
    /// Each change, with the entries it adds to the table (negative: removes).
    changes: BTreeMap<Gsi, (Change, isize)>,
    /// The sum of the changes' entries.
    delta: isize,
    /// Where the search for a free GSI resumes.
    next_free: Gsi,
}

impl fmt::Debug for Transaction<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction")
            .field("changes", &self.changes.len())
            .finish()
    }
}

impl Transaction<'_> {
    /// The entries `table` would hold with these changes.
    fn entries_in(&self, table: &Table) -> usize {
        (table.entries as isize + self.delta).max(0) as usize
    }

    /// Records `change` for `gsi` (replacing an earlier one), keeping the entry count.
    fn record(&mut self, table: &Table, gsi: Gsi, change: Change) {
        let added = change.delta(table, gsi);
        if let Some((_, old)) = self.changes.insert(gsi, (change, added)) {
            self.delta -= old;
        }
        self.delta += added;
    }

    /// The routes `gsi` has with these changes applied to `table`.
    fn effective(&self, table: &Table, gsi: Gsi) -> Option<MsiOrOther> {
        match self.changes.get(&gsi).map(|(c, _)| c) {
            Some(Change::Add(_) | Change::Set(..) | Change::Pin(_)) => Some(MsiOrOther::Msi),
            Some(Change::Remove(_)) => None,
            None => match table.routes.get(&gsi).map(Vec::as_slice) {
                None | Some([]) => None,
                Some([Route::Msi(_)]) => Some(MsiOrOther::Msi),
                Some(_) => Some(MsiOrOther::Other),
            },
        }
    }

    /// Allocates the lowest free GSI above the irqchip pins and routes it to `msg`.
    ///
    /// # Errors
    ///
    /// [`Error::RouteTableFull`] when the table would hold more than KVM's 4096 entries
    /// (`KVM_MAX_IRQ_ROUTES`), [`Error::GsiExhausted`] when no GSI below [`GSI_LIMIT`] is free.
    pub fn add_msi(&mut self, msg: MsiMessage) -> Result<Gsi> {
        let mut table = self.router.lock();
        let entries = self.entries_in(&table) + 1;
        if entries > ROUTE_TABLE_LIMIT {
            return Err(Error::RouteTableFull {
                entries,
                limit: ROUTE_TABLE_LIMIT,
            });
        }
        let gsi = (self.next_free..GSI_LIMIT)
            .find(|g| {
                !table.routes.contains_key(g)
                    && !table.reserved.contains(g)
                    && !self.changes.contains_key(g)
            })
            .ok_or(Error::GsiExhausted { limit: GSI_LIMIT })?;
        table.reserved.insert(gsi);
        self.record(&table, gsi, Change::Add(msg));
        self.next_free = gsi + 1;
        Ok(gsi)
    }

    /// Changes the message of the MSI route of `gsi`.
    ///
    /// # Errors
    ///
    /// [`Error::NotMsiRoute`] when `gsi` is not a single MSI route; [`Error::IoapicPin`] for a
    /// pin of the split irqchip's IOAPIC.
    pub fn set_msi(&mut self, gsi: Gsi, msg: MsiMessage) -> Result<()> {
        self.router.refuse_pin(gsi)?;
        let table = self.router.lock();
        if self.effective(&table, gsi) != Some(MsiOrOther::Msi) {
            return Err(Error::NotMsiRoute { gsi });
        }
        let change = match self.changes.get(&gsi) {
            Some((Change::Add(_), _)) => Change::Add(msg),
            _ => Change::Set(msg, table.born.get(&gsi).copied()),
        };
        self.record(&table, gsi, change);
        Ok(())
    }

    /// Removes every route of `gsi`.
    ///
    /// # Errors
    ///
    /// [`Error::GsiBusy`] while irqfds are bound to `gsi` (drop them first); [`Error::IoapicPin`]
    /// for a pin of the split irqchip's IOAPIC;
    /// [`Error::UnroutedGsi`] when it has no route.
    pub fn remove(&mut self, gsi: Gsi) -> Result<()> {
        self.router.refuse_pin(gsi)?;
        let mut table = self.router.lock();
        if let Some(&irqfds) = table.irqfds.get(&gsi) {
            return Err(Error::GsiBusy { gsi, irqfds });
        }
        if self.effective(&table, gsi).is_none() {
            return Err(Error::UnroutedGsi { gsi });
        }
        if let Some((Change::Add(_), added)) = self.changes.get(&gsi).copied() {
            // Allocated by this transaction: it never reaches the kernel.
            self.changes.remove(&gsi);
            self.delta -= added;
            table.reserved.remove(&gsi);
            self.next_free = self.next_free.min(gsi);
        } else {
            let born = table.born.get(&gsi).copied();
            self.record(&table, gsi, Change::Remove(born));
        }
        Ok(())
    }

    /// The number of entries the table will hold when committed (as it is now).
    pub fn entries(&self) -> usize {
        self.entries_in(&self.router.lock())
    }

    /// Applies the changes to the table as it is now and sends the whole table to KVM in one
    /// `KVM_SET_GSI_ROUTING`.
    ///
    /// # Errors
    ///
    /// Checked again against the table as it is now: [`Error::NotMsiRoute`] for a message change
    /// whose route another transaction removed, [`Error::GsiBusy`] for a removal whose GSI got
    /// an irqfd meanwhile, [`Error::RouteTableFull`]. [`Error::SetRouting`] with the errno. The
    /// committed table is unchanged by a failed commit.
    pub fn commit(mut self) -> Result<()> {
        let router = self.router;
        let _serial = router
            .shared
            .committing
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut table = router.lock();
        // A removal whose routes went meanwhile (removed by another transaction, the GSI maybe
        // routed anew since) has nothing left to remove: it must not take a newer route.
        self.changes.retain(|gsi, (change, _)| match change {
            Change::Remove(born) => table.born.get(gsi).copied() == *born,
            _ => true,
        });
        // Checked again against the table as it is now.
        for (&gsi, &(change, _)) in &self.changes {
            match change {
                Change::Add(_) | Change::Pin(_) => {}
                Change::Set(_, born) => {
                    let same_route = table.born.get(&gsi).copied() == born;
                    let msi = matches!(
                        table.routes.get(&gsi).map(Vec::as_slice),
                        Some([Route::Msi(_)])
                    );
                    if !(msi && same_route) {
                        return Err(Error::NotMsiRoute { gsi });
                    }
                }
                Change::Remove(_) => {
                    if let Some(&irqfds) = table.irqfds.get(&gsi) {
                        return Err(Error::GsiBusy { gsi, irqfds });
                    }
                }
            }
        }
        // The whole table with the changes applied, in GSI order: the committed routes and the
        // changes merged, without copying the table.
        let mut entries: Vec<kvm_irq_routing_entry> = Vec::with_capacity(self.entries_in(&table));
        let mut committed = table.routes.iter().peekable();
        let mut changes = self.changes.iter().peekable();
        let push = |entries: &mut Vec<kvm_irq_routing_entry>, gsi: Gsi, routes: &[Route]| {
            entries.extend(routes.iter().map(|r| r.entry(gsi)));
        };
        loop {
            let committed_first = match (committed.peek(), changes.peek()) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some(&(&g, _)), Some(&(&c, _))) => g < c,
            };
            if committed_first {
                if let Some((&gsi, routes)) = committed.next() {
                    push(&mut entries, gsi, routes);
                }
            } else if let Some((&gsi, &(change, _))) = changes.next() {
                // A change replaces the committed routes of its GSI.
                if committed.peek().is_some_and(|&(&g, _)| g == gsi) {
                    committed.next();
                }
                if let Some(routes) = change.routes() {
                    push(&mut entries, gsi, &routes);
                }
            }
        }
        let n = entries.len();
        if n > ROUTE_TABLE_LIMIT {
            return Err(Error::RouteTableFull {
                entries: n,
                limit: ROUTE_TABLE_LIMIT,
            });
        }
        let kvm_table =
            KvmIrqRouting::from_entries(&entries).map_err(|_| Error::RouteTableFull {
                entries: n,
                limit: ROUTE_TABLE_LIMIT,
            })?;
        // The ioctl runs with the table unlocked; the removals it makes are marked, so no irqfd
        // binds to them meanwhile (commits themselves are serialized by `committing`).
        let removing: Vec<Gsi> = self
            .changes
            .iter()
            .filter(|(_, (change, _))| matches!(change, Change::Remove(_)))
            .map(|(&gsi, _)| gsi)
            .collect();
        table.removing.extend(&removing);
        drop(table);
        let sent = sys::set_gsi_routing(&router.shared.vm, &kvm_table, n);
        let mut table = router.lock();
        for gsi in &removing {
            table.removing.remove(gsi);
        }
        sent?;
        // Only now does the committed table change.
        let commit = table.commits;
        for (gsi, (change, _)) in std::mem::take(&mut self.changes) {
            match change.routes() {
                Some(routes) => {
                    table.routes.insert(gsi, routes);
                }
                None => {
                    table.routes.remove(&gsi);
                    table.born.remove(&gsi);
                }
            }
            if let Change::Add(_) = change {
                table.reserved.remove(&gsi);
                table.born.insert(gsi, commit);
            }
        }
        table.entries = n;
        table.commits += 1;
        Ok(())
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if self.changes.is_empty() {
            return;
        }
        let mut table = self.router.lock();
        for (gsi, (change, _)) in &self.changes {
            if let Change::Add(_) = change {
                table.reserved.remove(gsi);
            }
        }
    }
}

/// What a GSI is routed to, as far as a message change cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MsiOrOther {
    Msi,
    Other,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_table_matches_the_kernel() {
        let t = default_routes();
        assert_eq!(t.len(), 24);
        assert_eq!(t.values().map(Vec::len).sum::<usize>(), 16 * 2 + 8);
        assert!(t[&9].contains(&Route::Irqchip {
            chip: IrqChip::PicSlave,
            pin: 1
        }));
        assert_eq!(
            t[&20],
            vec![Route::Irqchip {
                chip: IrqChip::Ioapic,
                pin: 20
            }]
        );
    }

    #[test]
    fn msi_entry_layout() {
        let e = Route::Msi(MsiMessage {
            address: 0x1_fee0_1000,
            data: 0x4041,
        })
        .entry(30);
        assert_eq!(e.gsi, 30);
        assert_eq!(e.type_, KVM_IRQ_ROUTING_MSI);
        // SAFETY: the entry was built as an MSI entry, so `msi` is the initialised member.
        let msi = unsafe { e.u.msi };
        assert_eq!(msi.address_lo, 0xfee0_1000);
        assert_eq!(msi.address_hi, 1);
        assert_eq!(msi.data, 0x4041);
        assert_eq!(MsiMessage::x86(3, 0x41).address, 0xfee0_3000);
    }
}
