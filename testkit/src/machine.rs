//! [`TinyVm`]: the machine — 4 MiB of RAM, an in-kernel irqchip, one vCPU (or up to
//! [`MAX_VCPUS`](crate::layout::MAX_VCPUS)) in long mode.

use std::fmt;
use std::os::fd::FromRawFd;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vm_notify::fallback::{InjectorThread, Policy};
use vm_notify::kvm::GsiRouter;
use vm_notify::Vm;

use crate::exit::{ExitHandler, GuestExit};
use crate::layout::{
    self, CODE, CODE_SELECTOR, DATA_SELECTOR, GDT, IDT, IRQ_COUNTS, MEM_SIZE, PD, PDPT, PML4,
};
use crate::program::{AssembledProgram, GuestProgram};
use crate::report::{Outcome, RunReport};
use crate::run::{install_kick_handler, run_loop, Control, IoapicBus, Running};
use crate::{Error, Result};

/// A tiny x86-64 VM: 4 MiB of RAM, an in-kernel irqchip (PIC, IOAPIC, LAPIC), one vCPU in long
/// mode, and a [`GsiRouter`] for its routing table.
///
/// A `TinyVm` runs one program: [`start`](Self::start) moves the vCPU onto its own thread.
///
/// ```
/// # if !vm_notify_testkit::kvm_or_skip("TinyVm example") { return Ok(()); }
/// use std::time::Duration;
/// use vm_notify_testkit::{GuestProgram, TinyVm};
///
/// let mut vm = TinyVm::new()?;
/// let mut p = GuestProgram::new()?;
/// p.repeat(10, |p| p.count(0))?;
/// p.exit()?;
/// let report = vm.run(p, Duration::from_secs(10))?.done()?;
/// assert_eq!(vm.data(0)?, 10);
/// assert!(report.exits.is_empty());
/// # Ok::<(), vm_notify_testkit::Error>(())
/// ```
pub struct TinyVm {
    /// The injectors this machine runs, as a VMM would (its own root's on the split irqchip,
    /// and those given to [`run_injector`](Self::run_injector)); stopped first when it drops.
    injectors: Mutex<Vec<InjectorThread>>,
    vm: Arc<VmFd>,
    notify: Vm,
    memory: GuestMemoryMmap,
    vcpu: Option<VcpuFd>,
    /// vCPUs 1 and up ([`with_vcpus`](Self::with_vcpus)), in order.
    others: Vec<VcpuFd>,
}

impl fmt::Debug for TinyVm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TinyVm")
            .field("memory_bytes", &MEM_SIZE)
            .field("notify", &self.notify)
            .field("vcpus", &(1 + self.others.len()))
            .field("started", &self.vcpu.is_none())
            .finish()
    }
}

impl TinyVm {
    /// Creates the VM: memory, irqchip, router, and a vCPU in long mode with the CPUID KVM
    /// supports. The program is given later, to [`start`](Self::start) or [`run`](Self::run).
    ///
    /// # Errors
    ///
    /// [`Error::Kvm`] naming the step that failed (opening `/dev/kvm` first among them).
    pub fn new() -> Result<TinyVm> {
        TinyVm::build(None, 1, Irqchip::Kernel)
    }

    /// As [`with_vcpus`](Self::with_vcpus), on the split irqchip (`KVM_CAP_SPLIT_IRQCHIP`,
    /// through [`Vm::with_split_irqchip`]): local APICs in the kernel, no PIC, the IOAPIC in
    /// userspace. MSIs (routes, irqfds, MSI-X vectors) work as on the in-kernel irqchip; the
    /// legacy pins are the [`Vm::ioapic`]'s, which the run loop serves: the guest's accesses to
    /// its registers and each `KVM_EXIT_IOAPIC_EOI` ([`GuestExit::IoapicEoi`], recorded in the
    /// report, not handed to the exit handler). A program for it must not touch the 8259 ports:
    /// they exit to the handler like any unclaimed port.
    ///
    /// # Errors
    ///
    /// Those of [`with_vcpus`](Self::with_vcpus), and [`Error::Notify`] naming
    /// `KVM_CAP_SPLIT_IRQCHIP` when KVM refuses it.
    pub fn with_split_irqchip(count: usize) -> Result<TinyVm> {
        TinyVm::build(None, count, Irqchip::Split)
    }

    /// A machine with `count` vCPUs on `irqchip`: [`with_vcpus`](Self::with_vcpus) or
    /// [`with_split_irqchip`](Self::with_split_irqchip).
    ///
    /// # Errors
    ///
    /// Theirs.
    pub fn with_irqchip(irqchip: Irqchip, count: usize) -> Result<TinyVm> {
        TinyVm::build(None, count, irqchip)
    }

    /// As [`new`](Self::new), with `count` vCPUs (1 to [`MAX_VCPUS`](crate::layout::MAX_VCPUS)),
    /// all runnable from the start. vCPU `i` has local APIC ID `i` (KVM's default, and CPUID
    /// says so), its own stack ([`layout::stack_top`]) and its own copies of the kit's slots and
    /// interrupt counts ([`layout::per_vcpu`], read with [`irq_count_on`](Self::irq_count_on)).
    /// Every vCPU runs the same program from the start; [`GuestProgram::on_vcpu`] gives each its
    /// own part. [`start`](Self::start) runs them together, a thread each, sharing the exit
    /// handler (one exit at a time), and the run ends when every vCPU has ended.
    ///
    /// # Errors
    ///
    /// Those of [`new`](Self::new), and [`Error::Memory`] for a `count` out of range.
    pub fn with_vcpus(count: usize) -> Result<TinyVm> {
        TinyVm::build(None, count, Irqchip::Kernel)
    }

    /// As [`new`](Self::new), with guest memory in a memfd mapped shared, so another process
    /// (a vhost-user backend) can map the same memory from the file descriptor
    /// ([`memory`](Self::memory)'s region has a `file_offset`).
    ///
    /// # Errors
    ///
    /// Those of [`new`](Self::new); [`Error::Kvm`] if the memfd cannot be made.
    pub fn with_shared_memory() -> Result<TinyVm> {
        let name = c"vm-notify-tiny-guest";
        // SAFETY: `name` is a NUL-terminated string; memfd_create returns a new descriptor or -1
        // and touches no memory of ours.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Kvm {
                step: "memfd_create",
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = std::fs::File::from(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        file.set_len(MEM_SIZE as u64).map_err(|source| Error::Kvm {
            step: "size the guest memory memfd",
            source,
        })?;
        TinyVm::build(
            Some(vm_memory::FileOffset::new(file, 0)),
            1,
            Irqchip::Kernel,
        )
    }

    fn build(
        file: Option<vm_memory::FileOffset>,
        vcpus: usize,
        irqchip: Irqchip,
    ) -> Result<TinyVm> {
        if vcpus == 0 || vcpus > layout::MAX_VCPUS {
            return Err(Error::Memory(format!(
                "{vcpus} vCPUs: 1 to {}",
                layout::MAX_VCPUS
            )));
        }
        let kvm = Kvm::new().map_err(Error::kvm("open /dev/kvm"))?;
        let vm = Arc::new(kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?);
        vm.set_tss_address(0xfffb_d000)
            .map_err(Error::kvm("KVM_SET_TSS_ADDR"))?;
        if irqchip == Irqchip::Kernel {
            vm.create_irq_chip()
                .map_err(Error::kvm("KVM_CREATE_IRQCHIP"))?;
        }
        let memory =
            GuestMemoryMmap::<()>::from_ranges_with_files(&[(GuestAddress(0), MEM_SIZE, file)])
                .map_err(|e| Error::Memory(e.to_string()))?;
        let host = memory
            .get_host_address(GuestAddress(0))
            .map_err(|e| Error::Memory(e.to_string()))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: host as u64,
        };
        // SAFETY: `host` is the start of a MEM_SIZE mapping owned by `memory`, which lives as
        // long as the VM: `TinyVm` holds it, and the vCPU thread holds a clone while it runs.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
        let notify = match irqchip {
            Irqchip::Kernel => Vm::new(vm.clone(), Policy::Kernel)?,
            Irqchip::Split => Vm::with_split_irqchip(vm.clone(), Policy::Kernel)?,
        };

        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let mut all = Vec::with_capacity(vcpus);
        for index in 0..vcpus {
            let vcpu = vm
                .create_vcpu(index as u64)
                .map_err(Error::kvm("KVM_CREATE_VCPU"))?;
            vcpu.set_cpuid2(&with_apic_id(&cpuid, index as u32))
                .map_err(Error::kvm("KVM_SET_CPUID2"))?;
            if index > 0 {
                // An application processor waits for INIT/SIPI unless told it may run.
                vcpu.set_mp_state(kvm_bindings::kvm_mp_state {
                    mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
                })
                .map_err(Error::kvm("KVM_SET_MP_STATE"))?;
            }
            all.push(vcpu);
        }
        let mut all = all.into_iter();
        // The split irqchip's pins are served by the root's injector whatever the policy: this
        // machine, the VMM here, runs it.
        let injectors = match irqchip {
            Irqchip::Kernel => Vec::new(),
            Irqchip::Split => vec![notify.injector()?.spawn()?],
        };
        let tiny = TinyVm {
            injectors: Mutex::new(injectors),
            vm,
            notify,
            memory,
            vcpu: all.next(),
            others: all.collect(),
        };
        tiny.write_tables()?;
        if let Some(vcpu) = &tiny.vcpu {
            tiny.enter_long_mode(vcpu, 0)?;
        }
        for (i, vcpu) in tiny.others.iter().enumerate() {
            tiny.enter_long_mode(vcpu, i + 1)?;
        }
        Ok(tiny)
    }

    /// The vCPUs not running, in order.
    pub(crate) fn vcpu_fds(&self) -> impl Iterator<Item = &VcpuFd> {
        self.vcpu.iter().chain(&self.others)
    }

    /// Runs `vm`'s [`Injector`](vm_notify::fallback::Injector) on a thread for as long as this
    /// machine lives, as a VMM runs the injector of the interrupts it places in userspace. A test
    /// that makes a root of its own with [`Policy::Userspace`] or [`Policy::Auto`]
    /// ([`Vm::with_policy`]) calls this for it. (Roots of one VM share their injector, and a
    /// second thread on it is harmless: each trigger is read once, under the injector's lock.)
    ///
    /// # Errors
    ///
    /// Those of [`Vm::injector`] and [`Injector::spawn`](vm_notify::fallback::Injector::spawn).
    pub fn run_injector(&self, vm: &Vm) -> Result<()> {
        let thread = vm.injector()?.spawn()?;
        self.injectors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(thread);
        Ok(())
    }

    /// How many vCPUs the machine has.
    pub fn vcpus(&self) -> usize {
        1 + self.others.len()
    }

    /// How many times the guest's handler for `vector` ran on vCPU `index`.
    ///
    /// # Errors
    ///
    /// [`Error::Memory`] only if guest memory is broken.
    pub fn irq_count_on(&self, index: usize, vector: u8) -> Result<u64> {
        self.read_u64(layout::per_vcpu(index, IRQ_COUNTS + 8 * u64::from(vector)))
    }

    /// The VM descriptor (`KVM_*` ioctls of a test's own).
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// The VM's routing table.
    pub fn router(&self) -> &GsiRouter {
        self.notify.router()
    }

    /// The VM's notifications root (kernel placement), sharing [`router`](Self::router).
    pub fn notify(&self) -> &Vm {
        &self.notify
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Reads the `u64` at guest-physical `addr`.
    ///
    /// # Errors
    ///
    /// [`Error::Memory`] when `addr` is outside RAM.
    pub fn read_u64(&self, addr: u64) -> Result<u64> {
        self.memory
            .read_obj::<u64>(GuestAddress(addr))
            .map_err(|e| Error::Memory(e.to_string()))
    }

    /// Writes the `u64` at guest-physical `addr`.
    ///
    /// # Errors
    ///
    /// [`Error::Memory`] when `addr` is outside RAM.
    pub fn write_u64(&self, addr: u64, value: u64) -> Result<()> {
        self.memory
            .write_obj(value, GuestAddress(addr))
            .map_err(|e| Error::Memory(e.to_string()))
    }

    /// Data slot `slot` (see [`layout::DATA`](super::layout::DATA)), as the guest left it.
    ///
    /// # Errors
    ///
    /// [`Error::Memory`] when `slot` is out of range.
    pub fn data(&self, slot: usize) -> Result<u64> {
        self.read_u64(layout::data_slot(slot))
    }

    /// How many times the guest's handler for `vector` ran.
    ///
    /// # Errors
    ///
    /// [`Error::Memory`] only if guest memory is broken.
    pub fn irq_count(&self, vector: u8) -> Result<u64> {
        self.read_u64(IRQ_COUNTS + 8 * u64::from(vector))
    }

    /// Loads `program`, and runs it on its own thread, giving `handler` every exit that reaches
    /// userspace. Returns at once; [`Running::wait`] collects the report.
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyStarted`] on a second call, [`Error::Assemble`] and friends from
    /// assembling, [`Error::Kvm`] when the vCPU thread cannot be set up.
    pub fn start(&mut self, program: GuestProgram, handler: impl ExitHandler) -> Result<Running> {
        let assembled = program.assemble()?;
        let vcpu = self.vcpu.take().ok_or(Error::AlreadyStarted)?;
        self.load(&assembled)?;
        install_kick_handler()?;
        self.launch(vcpu, handler)
    }

    /// Runs the vCPUs on their threads from the state they are in (no program loaded): after
    /// [`restore`](Self::restore), the paused program goes on.
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyStarted`] when the vCPUs are running or gone, [`Error::Kvm`] when a vCPU
    /// thread cannot be set up.
    pub fn resume(&mut self, handler: impl ExitHandler) -> Result<Running> {
        let vcpu = self.vcpu.take().ok_or(Error::AlreadyStarted)?;
        install_kick_handler()?;
        self.launch(vcpu, handler)
    }

    fn launch(&mut self, vcpu: VcpuFd, handler: impl ExitHandler) -> Result<Running> {
        let control = Control::default();
        let (tx, rx) = mpsc::channel();
        let others = std::mem::take(&mut self.others);
        control.park(1 + others.len());
        if others.is_empty() {
            let thread = self.spawn_vcpu(vcpu, 0, handler, &control, tx)?;
            return Ok(Running {
                threads: vec![thread],
                control,
                rx,
            });
        }
        // Every vCPU's thread hands its exits to the one handler, one at a time.
        let shared = Shared(Arc::new(Mutex::new(handler)));
        let mut threads = Vec::with_capacity(1 + others.len());
        for (index, vcpu) in std::iter::once(vcpu).chain(others).enumerate() {
            threads.push(self.spawn_vcpu(vcpu, index, shared.clone(), &control, tx.clone())?);
        }
        Ok(Running {
            threads,
            control,
            rx,
        })
    }

    fn spawn_vcpu(
        &self,
        mut vcpu: VcpuFd,
        index: usize,
        handler: impl ExitHandler,
        control: &Control,
        tx: mpsc::Sender<RunReport>,
    ) -> Result<thread::JoinHandle<()>> {
        let control = control.clone();
        let memory = self.memory.clone();
        let vm = self.vm.clone();
        let ioapic = self.notify.ioapic().and_then(IoapicBus::new);
        thread::Builder::new()
            .name(format!("tiny-vcpu{index}"))
            .spawn(move || {
                let report = run_loop(&mut vcpu, &control, ioapic.as_ref(), handler);
                if report.outcome == Outcome::Paused {
                    control.put(index, vcpu);
                } else {
                    // The VM, its memory and the vCPU go away only after the run.
                    drop(vcpu);
                }
                drop((memory, vm));
                let _ = tx.send(report);
            })
            .map_err(|e| Error::Kvm {
                step: "spawn the vCPU thread",
                source: e,
            })
    }

    /// Loads `program` and hands the vCPU over, for a caller that runs `KVM_RUN` itself — a
    /// benchmark's raw baseline, which then shares only the machine with the kit (memory, page
    /// tables, registers, the assembled guest). The program ends with an `out` to
    /// [`DONE_PORT`](super::layout::DONE_PORT); an unexpected vector shows as an `out` to
    /// [`UNEXPECTED_VECTOR_PORT`](super::layout::UNEXPECTED_VECTOR_PORT).
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyStarted`] once the vCPU is gone, and those of assembling.
    pub fn take_vcpu(&mut self, program: GuestProgram) -> Result<VcpuFd> {
        let assembled = program.assemble()?;
        if self.vcpu.is_none() {
            return Err(Error::AlreadyStarted);
        }
        self.load(&assembled)?;
        self.vcpu.take().ok_or(Error::AlreadyStarted)
    }

    /// Runs `program` to its end (or `timeout`) with no exit handler, and returns the report.
    ///
    /// # Errors
    ///
    /// Those of [`start`](Self::start).
    pub fn run(&mut self, program: GuestProgram, timeout: Duration) -> Result<RunReport> {
        Ok(self
            .start(program, |_: &GuestExit, _: &mut [u8]| {})?
            .wait(timeout))
    }

    fn load(&self, program: &AssembledProgram) -> Result<()> {
        let mem = |e: vm_memory::GuestMemoryError| Error::Memory(e.to_string());
        self.memory
            .write_slice(program.code(), GuestAddress(CODE))
            .map_err(mem)?;
        for (vector, &handler) in program.vectors().iter().enumerate() {
            // 64-bit interrupt gate: present, DPL 0, type 0xe, selector CODE_SELECTOR, no IST.
            let low = (handler & 0xffff)
                | (u64::from(CODE_SELECTOR) << 16)
                | (0x8e00u64 << 32)
                | ((handler >> 16) & 0xffff) << 48;
            let high = handler >> 32;
            let at = IDT + 16 * vector as u64;
            self.memory.write_obj(low, GuestAddress(at)).map_err(mem)?;
            self.memory
                .write_obj(high, GuestAddress(at + 8))
                .map_err(mem)?;
        }
        Ok(())
    }

    fn write_tables(&self) -> Result<()> {
        let mem = |e: vm_memory::GuestMemoryError| Error::Memory(e.to_string());
        let w = |addr: u64, v: u64| self.memory.write_obj(v, GuestAddress(addr)).map_err(mem);
        // Identity map 0..4 GiB: PML4[0] -> PDPT; PDPT[0..4] -> 4 page directories of 2 MiB pages.
        w(PML4, PDPT | 0x3)?;
        for i in 0..4u64 {
            w(PDPT + 8 * i, (PD + 0x1000 * i) | 0x3)?;
            for j in 0..512u64 {
                // Present, writable, 2 MiB page.
                w(PD + 0x1000 * i + 8 * j, ((i * 512 + j) << 21) | 0x83)?;
            }
        }
        // GDT: null; 64-bit code (P, S, type execute/read, L); data (P, S, type read/write).
        w(GDT, 0)?;
        w(GDT + 8, 0x0020_9a00_0000_0000)?;
        w(GDT + 16, 0x00cf_9200_0000_ffff)?;
        Ok(())
    }

    fn enter_long_mode(&self, vcpu: &VcpuFd, index: usize) -> Result<()> {
        self.write_u64(
            layout::per_vcpu(index, layout::VCPU_INDEX_SLOT),
            index as u64,
        )?;
        let mut sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: CODE_SELECTOR,
            type_: 0xb,
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = kvm_segment {
            selector: DATA_SELECTOR,
            type_: 0x3,
            db: 1,
            l: 0,
            ..code
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        // The kit's slots of this vCPU (its resume point, stack pointer, interrupt counts) are
        // reached through GS.
        sregs.gs = kvm_segment {
            base: layout::gs_base(index),
            ..data
        };
        sregs.ss = data;
        sregs.tr = kvm_segment {
            selector: 0x18,
            limit: 0x67,
            type_: 0xb,
            s: 0,
            db: 0,
            g: 0,
            ..data
        };
        sregs.gdt.base = GDT;
        sregs.gdt.limit = 3 * 8 - 1;
        sregs.idt.base = IDT;
        sregs.idt.limit = 256 * 16 - 1;
        sregs.cr3 = PML4;
        sregs.cr4 = 1 << 5; // PAE
        sregs.cr0 = 1 | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31); // PE MP ET NE WP PG
        sregs.efer = (1 << 8) | (1 << 10); // LME LMA
        vcpu.set_sregs(&sregs)
            .map_err(Error::kvm("KVM_SET_SREGS"))?;
        let mut regs = vcpu.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?;
        regs.rip = CODE;
        regs.rsp = layout::stack_top(index);
        regs.rflags = 2;
        vcpu.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))?;
        Ok(())
    }
}

/// `cpuid` with `apic_id` as the initial APIC ID (leaf 1, EBX bits 31–24) and x2APIC ID
/// (leaf 0xB, EDX).
fn with_apic_id(cpuid: &kvm_bindings::CpuId, apic_id: u32) -> kvm_bindings::CpuId {
    let mut out = cpuid.clone();
    for entry in out.as_mut_slice() {
        match entry.function {
            1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | (apic_id << 24),
            0xb => entry.edx = apic_id,
            _ => {}
        }
    }
    out
}

/// One exit handler for every vCPU thread, called one exit at a time.
struct Shared<H>(Arc<Mutex<H>>);

impl<H> Clone for Shared<H> {
    fn clone(&self) -> Self {
        Shared(self.0.clone())
    }
}

impl<H: ExitHandler> ExitHandler for Shared<H> {
    fn handle(&mut self, exit: &GuestExit, reply: &mut [u8]) {
        let mut handler = self.0.lock().unwrap_or_else(|e| e.into_inner());
        handler.handle(exit, reply);
    }
}

/// Where the machine's irqchip lives: what a test runs over when it is parameterised by irqchip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Irqchip {
    /// PIC, IOAPIC and local APICs in the kernel (`KVM_CREATE_IRQCHIP`).
    Kernel,
    /// Local APICs in the kernel, the IOAPIC vm-notify's (`KVM_CAP_SPLIT_IRQCHIP`), no PIC.
    Split,
}

impl Irqchip {
    /// Both, in-kernel first.
    pub const ALL: [Irqchip; 2] = [Irqchip::Kernel, Irqchip::Split];
}
