//! # vm-notify-testkit
//!
//! The tiny-guest test kit of `vm-notify`: boot a small x86-64 guest on `/dev/kvm` and prove
//! notifications end to end — the counter the device reads equals the writes the guest made, and
//! the interrupts the guest's handler counted equal what the device raised.
//!
//! * [`TinyVm`]: guest memory (vm-memory), an in-kernel irqchip, a [`vm_notify::Vm`] root,
//!   one vCPU in long mode with the CPUID KVM supports, run on its own thread; or up to
//!   eight ([`TinyVm::with_vcpus`]), each with its own local APIC, stack and interrupt counts,
//!   running the same program ([`GuestProgram::on_vcpu`] gives each its part).
//! * [`GuestProgram`]: the guest's code, assembled with iced-x86, plus counting interrupt
//!   handlers, a wait for an interrupt, PIC/LAPIC set-up and ports to talk to the host.
//! * [`RunReport`]: how the run ended and every exit the kernel did not absorb.
//! * [`kvm_test!`]: the gate every KVM test opens with (it names the test itself), over
//!   [`kvm_or_skip`].
//!
//! The kit is a crate of its own so that vm-notify's public API carries none of its
//! dependencies (iced-x86). vm-notify's `docs/GUEST_TESTKIT.md` walks through writing a device
//! test with it.
#![deny(
    missing_docs,
    missing_debug_implementations,
    clippy::undocumented_unsafe_blocks
)]

mod exit;
mod machine;
mod msix_bar;
mod program;
mod report;
mod run;
mod snapshot;
mod virtq;

pub mod layout;

pub use exit::{ExitHandler, GuestExit};
pub use machine::{Irqchip, TinyVm};
pub use msix_bar::{MsixBar, CONTROL_OFFSET, PBA_OFFSET, TABLE_OFFSET, WINDOW_LEN};
pub use program::{AssembledProgram, Eoi, GuestProgram};
pub use report::{Outcome, RunReport};
pub use run::{Paused, Running};
pub use snapshot::MachineState;
pub use virtq::{
    SplitQueue, Suppression, MAX_BATCHES, MAX_BUFFER, MAX_QUEUES, MAX_SIZE, QUEUES_BASE,
    QUEUE_REGION,
};

/// Set to `1` to make a missing or unusable `/dev/kvm` fail the tests instead of skipping them.
pub const REQUIRE_KVM_ENV: &str = "VM_NOTIFY_REQUIRE_KVM";

/// Result type of the test kit.
pub type Result<T> = std::result::Result<T, Error>;

/// What can go wrong while building or running a tiny guest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A KVM or system call failed during set-up.
    #[error("{step} failed: {source}")]
    Kvm {
        /// The step that failed.
        step: &'static str,
        /// The errno.
        source: std::io::Error,
    },
    /// A notifier, registration or routing error from the library.
    #[error(transparent)]
    Notify(#[from] vm_notify::Error),
    /// Guest memory could not be set up, read or written.
    #[error("guest memory: {0}")]
    Memory(String),
    /// iced-x86 refused an instruction or could not assemble the program.
    #[error("assembling the guest program: {0}")]
    Assemble(#[from] iced_x86::IcedError),
    /// The program does not fit in guest memory.
    #[error("the guest program is {bytes} bytes; at most {max} fit")]
    ProgramTooLarge {
        /// The program's size.
        bytes: usize,
        /// The room there is.
        max: usize,
    },
    /// An access width the guest cannot make.
    #[error("a guest memory access is 1, 2, 4 or 8 bytes, not {0}")]
    Width(usize),
    /// A `TinyVm` runs one program; it was already started.
    #[error("this TinyVm already ran its program; create another")]
    AlreadyStarted,
    /// The run did not end at the program's `exit`.
    #[error("the guest did not finish: {0}")]
    Guest(String),
    /// What the kit does not do yet.
    #[error("not supported by the test kit: {0}")]
    Unsupported(&'static str),
}

impl Error {
    pub(crate) fn kvm(step: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |e| Error::Kvm {
            step,
            source: std::io::Error::from_raw_os_error(e.errno()),
        }
    }
}

/// Whether a KVM test can run here. Returns `true` when `/dev/kvm` opens and can create a VM.
///
/// Otherwise prints a loud SKIPPING line naming `test` and returns `false` — unless
/// `VM_NOTIFY_REQUIRE_KVM=1` is set, in which case it panics, so a CI run that must exercise KVM
/// cannot pass by skipping.
///
/// ```
/// if !vm_notify_testkit::kvm_or_skip("doc example") {
///     return;
/// }
/// // ... boot a TinyVm ...
/// ```
pub fn kvm_or_skip(test: &str) -> bool {
    let usable = kvm_ioctls::Kvm::new()
        .and_then(|kvm| kvm.create_vm().map(|_| ()))
        .map_err(|e| e.to_string());
    match usable {
        Ok(()) => true,
        Err(why) => {
            if std::env::var(REQUIRE_KVM_ENV).as_deref() == Ok("1") {
                panic!("{test}: {REQUIRE_KVM_ENV}=1 but /dev/kvm is not usable: {why}");
            }
            eprintln!(
                "\n*** SKIPPING {test}: /dev/kvm is not usable ({why}). \
                 Set {REQUIRE_KVM_ENV}=1 to make this a failure. ***\n"
            );
            false
        }
    }
}

/// Opens a KVM test: returns from the enclosing function (the test) when `/dev/kvm` is not
/// usable, after a loud SKIPPING line that names the test — or fails it where
/// `VM_NOTIFY_REQUIRE_KVM=1` (see [`kvm_or_skip`]). The test's name is taken from the function
/// the macro stands in, so it is never retyped.
///
/// ```
/// fn a_kvm_test() {
///     vm_notify_testkit::kvm_test!();
///     // ... boot a TinyVm ...
/// }
/// # a_kvm_test();
/// ```
///
/// In a function that returns a `Result`, give the value to return on a skip:
/// `kvm_test!(Ok(()))`.
#[macro_export]
macro_rules! kvm_test {
    () => {
        $crate::kvm_test!(())
    };
    ($skipped:expr) => {{
        fn here() {}
        if !$crate::kvm_or_skip($crate::test_name(::std::any::type_name_of_val(&here))) {
            return $skipped;
        }
    }};
}

/// The test's path from the type name of a function defined inside it (`crate::test::here`):
/// the crate name and the inner function's name dropped.
#[doc(hidden)]
pub fn test_name(inner: &str) -> &str {
    let path = inner.strip_suffix("::here").unwrap_or(inner);
    path.split_once("::").map_or(path, |(_, rest)| rest)
}

#[cfg(test)]
mod tests {
    #[test]
    fn test_names_drop_the_crate_and_the_marker() {
        assert_eq!(
            super::test_name("ioevent::mmio_writes::here"),
            "mmio_writes"
        );
        assert_eq!(super::test_name("errors::a::b::here"), "a::b");
        assert_eq!(super::test_name("lonely"), "lonely");
    }
}
