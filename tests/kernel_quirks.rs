//! Kernel behaviour the differential test found, kept as a reproducer.
//!
//! Three registrations on one bus: a 2-byte one at A-4, an any-width one at A, and a 4-byte one
//! at A-4 (its range reaches A). Registered in some orders, KVM never signals the any-width one
//! for a write at A — its I/O bus orders zero-length ranges inconsistently against ranges that end
//! at their address, and the lookup stops before it. Other orders work. The userspace dispatcher
//! takes the write in every order, as KVM's documented matching says.
//!
//! `Policy::Auto` keeps the pattern out of the kernel (the registration that would complete
//! it goes to userspace, `Fallback::KernelWouldMiss`), so it takes the write in every order too.
//! This test asserts both and reports the bare kernel's behaviour, so a kernel that fixes the
//! lookup shows here.

use std::time::Duration;

use vm_notify::fallback::Policy;
use vm_notify::{Mode, Notifier, Width, WriteMatch};
use vm_notify_testkit::{kvm_test, GuestExit, GuestProgram, TinyVm};

const ORDERS: [[usize; 3]; 6] = [
    [0, 1, 2],
    [0, 2, 1],
    [1, 0, 2],
    [1, 2, 0],
    [2, 0, 1],
    [2, 1, 0],
];

/// Registers the three matches in `order` on a backend of `kind`, writes one byte at A, and
/// returns how many times the any-width registration was signalled.
fn any_width_count(kind: Policy, pio: bool, order: [usize; 3]) -> u64 {
    let a: u64 = if pio { 0x604 } else { 0xd000_0004 };
    let at = |x| {
        if pio {
            WriteMatch::pio(x)
        } else {
            WriteMatch::mmio(x)
        }
    };
    let matches = [
        at(a - 4).width(Width::W2),
        at(a),
        at(a - 4).width(Width::W4).datamatch(3),
    ];
    let mut vm = TinyVm::new().unwrap();
    let backend = vm.notify().with_policy(kind);
    vm.run_injector(&backend).unwrap();
    let notifiers: Vec<_> = matches
        .iter()
        .map(|_| Notifier::new(Mode::Counter).unwrap())
        .collect();
    let _regs: Vec<_> = order
        .iter()
        .map(|&i| backend.ioevent(matches[i], &notifiers[i]).unwrap())
        .collect();
    let mut p = GuestProgram::new().unwrap();
    if pio {
        p.pio_write(a as u16, 1, 1).unwrap();
    } else {
        p.mmio_write(a, 1, 1).unwrap();
    }
    p.exit().unwrap();
    let d = backend.dispatcher().clone();
    vm.start(p, move |e: &GuestExit, _: &mut [u8]| {
        e.dispatch(&d).unwrap();
    })
    .unwrap()
    .wait(Duration::from_secs(30))
    .done()
    .unwrap();
    notifiers[1].try_read().unwrap().done().unwrap_or(0)
}

#[test]
fn any_width_registration_next_to_sized_ones() {
    kvm_test!();
    let mut lost = Vec::new();
    for pio in [true, false] {
        for order in ORDERS {
            assert_eq!(
                any_width_count(Policy::Userspace, pio, order),
                1,
                "the dispatcher takes the write (pio {pio}, order {order:?})"
            );
            assert_eq!(
                any_width_count(Policy::Auto, pio, order),
                1,
                "the automatic backend keeps the pattern out of the kernel (pio {pio}, order {order:?})"
            );
            if any_width_count(Policy::Kernel, pio, order) == 0 {
                lost.push((if pio { "PIO" } else { "MMIO" }, order));
            }
        }
    }
    eprintln!(
        "kernel: the any-width ioeventfd missed the write in {} of 12 registration orders: {lost:?}",
        lost.len()
    );
}

/// Two threads register the two halves of the pattern at once (a 4-byte match at A-4 and an
/// any-width one at A), many times: `Policy::Auto` never puts both in the kernel (issue 22: the
/// shadow check and the dispatcher's record of the registration were separate steps, so two
/// concurrent registrations could each pass the check before the other was recorded).
#[test]
fn concurrent_registrations_never_form_the_pattern_in_the_kernel() {
    kvm_test!();
    const ROUNDS: u64 = 2_000;
    let vm = TinyVm::new().unwrap();
    let auto = vm.notify().with_policy(Policy::Auto);
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let half = |sized: bool| {
        let (auto, barrier) = (auto.clone(), barrier.clone());
        std::thread::spawn(move || {
            let n = Notifier::new(Mode::Counter).unwrap();
            let mut kernel = Vec::new();
            for round in 0..ROUNDS {
                let a = 0xd100_0000 + 0x100 * round;
                let m = match sized {
                    true => WriteMatch::mmio(a - 4).width(Width::W4),
                    false => WriteMatch::mmio(a),
                };
                barrier.wait();
                let reg = auto.ioevent(m, &n).unwrap();
                kernel.push(matches!(
                    reg.placement(),
                    vm_notify::fallback::Placement::Kernel
                ));
                // Both halves stand until both threads have placed theirs.
                barrier.wait();
                drop(reg);
            }
            kernel
        })
    };
    let (sized, any) = (half(true), half(false));
    let (sized, any) = (sized.join().unwrap(), any.join().unwrap());
    let both = sized.iter().zip(&any).filter(|(s, a)| **s && **a).count();
    let one = sized.iter().zip(&any).filter(|(s, a)| **s != **a).count();
    eprintln!("{ROUNDS} rounds: one half in the kernel {one} times, both {both} times");
    assert_eq!(
        both, 0,
        "the pattern KVM mishandles was formed in the kernel"
    );
}
