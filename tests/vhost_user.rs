//! vhost-user hand-off against a real external backend (rust-vmm's `vhost-device-rng`, installed
//! by the test setup on first use): the guest's kicks go from KVM straight to the backend and the
//! backend's calls straight back into KVM as interrupts; no VMM thread handles a notification.
#![cfg(feature = "vhost-user")]

mod common;

use std::time::{Duration, Instant};

use common::vhost_backend;
use vm_notify::vhost_user::VhostUserFrontend;
use vm_notify::{Error, Mode, Notifier, Width, WriteMatch};
use vm_notify_testkit::{kvm_test, Eoi, GuestExit, GuestProgram, SplitQueue, TinyVm};

const TIMEOUT: Duration = Duration::from_secs(120);
const BASE: u64 = 0xd000_0000;
/// virtio-mmio `QueueNotify`, from virtio-bindings.
const MMIO_QUEUE_NOTIFY: u64 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// PIC IRQ 6, edge-triggered: the backend's calls are edges (vector 0x26).
const IRQ: u8 = 6;
const VECTOR: u8 = 0x20 + IRQ;
const LENGTHS: [u32; 4] = [16, 64, 256, 512];
/// VIRTIO_F_VERSION_1. The guest does not maintain used_event, so no VIRTIO_RING_F_EVENT_IDX.
const FEATURES: u64 = 1 << 32;

/// The tests here run one at a time: the leak test counts the process's descriptors, which the
/// others would change under it.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

struct Setup {
    vm: TinyVm,
    queue: SplitQueue,
    frontend: VhostUserFrontend,
    backend: vhost_backend::Backend,
}

/// A shared-memory VM with queue 0 laid out, handed to a freshly started backend: the kick is an
/// ioeventfd on QueueNotify (4-byte writes of 0), the call an edge irqfd on IRQ.
fn setup(name: &str) -> Setup {
    let vm = TinyVm::with_shared_memory().unwrap();
    let queue = SplitQueue::new(0, 16, &LENGTHS).unwrap();
    queue.lay_out(&vm).unwrap();
    let backend = vhost_backend::Backend::start(name);
    let mut frontend =
        VhostUserFrontend::connect(&backend.socket, 1, vm.memory(), FEATURES).unwrap();
    assert_eq!(frontend.features() & FEATURES, FEATURES, "{frontend:?}");
    let kick = vm
        .notify()
        .ioevent(
            WriteMatch::mmio(BASE + MMIO_QUEUE_NOTIFY)
                .width(Width::W4)
                .datamatch(0),
            &Notifier::new(Mode::Counter).unwrap(),
        )
        .unwrap();
    let call = vm.notify().irqfd(IRQ.into()).unwrap();
    let relay = frontend.start_queue(queue.vring(0), kick, call).unwrap();
    assert!(relay.is_none(), "an irqfd takes the calls itself");
    Setup {
        vm,
        queue,
        frontend,
        backend,
    }
}

/// The driver: `requests` times, make a descriptor available, kick, wait for it to be used.
fn driver(queue: &SplitQueue, requests: u64) -> GuestProgram {
    let mut p = GuestProgram::new().unwrap();
    p.init_pic(0x20, !((1u16 << IRQ) | (1 << 2)), 0).unwrap();
    p.on_interrupt(VECTOR, Eoi::PicMaster);
    p.repeat(requests, |p| {
        p.virtq_submit(queue)?;
        p.mmio_write(BASE + MMIO_QUEUE_NOTIFY, 0, 4)?;
        p.virtq_wait_used(queue)
    })
    .unwrap();
    p.exit().unwrap();
    p
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn a_real_backend_serves_1000_requests_with_no_vmm_thread_in_the_path() {
    // Before the KVM probe too: it opens descriptors.
    let _serial = serial();
    kvm_test!();
    const N: u64 = 1000;
    let Setup {
        mut vm,
        queue,
        mut frontend,
        backend: _backend,
    } = setup("serve");
    // A level line cannot take the backend's calls: nothing would deassert it.
    let level = vm.notify().level_irqfd(5).unwrap();
    let e = frontend.set_call(0, level).unwrap_err();
    assert!(
        matches!(e, Error::VhostUser { op: "SET_VRING_CALL", ref reason } if reason.contains("level")),
        "{e:?}"
    );
    let report = vm
        .start(driver(&queue, N), |e: &GuestExit, _: &mut [u8]| {
            panic!("an exit reached the VMM: {e:?}")
        })
        .unwrap()
        .wait(TIMEOUT)
        .done()
        .unwrap();
    let irqs = vm.irq_count(VECTOR).unwrap();
    let sleeps = queue.sleeps(&vm).unwrap();
    let distinct = queue.distinct_words(&vm).unwrap();
    eprintln!(
        "{N} requests in {:?}: used idx {}, mismatches {}, guest slept {sleeps} times, took {irqs} interrupts, {} distinct words, {} exits; {frontend:?}",
        report.elapsed,
        queue.used_idx(&vm).unwrap(),
        queue.mismatches(&vm).unwrap(),
        distinct,
        report.exits.len()
    );
    assert_eq!(queue.submitted(&vm).unwrap(), N);
    assert_eq!(u64::from(queue.used_idx(&vm).unwrap()), N);
    assert_eq!(queue.mismatches(&vm).unwrap(), 0, "used lengths");
    assert!(distinct > 100, "the bytes look constant");
    // At least one interrupt per wait, never more than completions.
    assert!(sleeps <= irqs && irqs <= N, "sleeps {sleeps}, irqs {irqs}");
    assert_eq!(report.exits.len(), 0);
}

#[test]
fn a_killed_backend_is_reported_and_leaves_nothing_behind() {
    // Before the KVM probe too: it opens descriptors.
    let _serial = serial();
    kvm_test!();
    // Install the backend before counting descriptors.
    vhost_backend::binary();
    let fds_before = open_fds();
    {
        let Setup {
            mut vm,
            queue,
            frontend,
            mut backend,
        } = setup("kill");
        // Still connected: the wait times out quietly.
        frontend.wait_disconnect(Duration::from_millis(50)).unwrap();
        let running = vm
            .start(driver(&queue, 1_000_000), |e: &GuestExit, _: &mut [u8]| {
                panic!("an exit reached the VMM: {e:?}")
            })
            .unwrap();
        let start = Instant::now();
        while queue.used_idx(&vm).unwrap() < 100 {
            assert!(start.elapsed() < TIMEOUT, "the backend served nothing");
            std::thread::sleep(Duration::from_millis(1));
        }
        backend.kill();
        let killed = Instant::now();
        let e = frontend.wait_disconnect(TIMEOUT).unwrap_err();
        let seen_after = killed.elapsed();
        assert!(matches!(e, Error::VhostUserDisconnected), "{e:?}");
        eprintln!(
            "backend killed after {} requests; disconnect seen after {seen_after:?}",
            queue.used_idx(&vm).unwrap()
        );
        // The guest now waits forever for a used buffer: stop it.
        let report = running.wait(Duration::from_millis(500));
        assert!(!report.is_done());
        // Dropping the frontend unregisters the kick and the call: the same registrations
        // succeed again on the same VM.
        drop(frontend);
        assert_eq!(vm.router().irqfds(IRQ.into()), 0);
        let again = vm.notify().ioevent(
            WriteMatch::mmio(BASE + MMIO_QUEUE_NOTIFY)
                .width(Width::W4)
                .datamatch(0),
            &Notifier::new(Mode::Counter).unwrap(),
        );
        assert!(again.is_ok(), "{again:?}");
    }
    assert_eq!(open_fds(), fds_before, "descriptors leaked");
}

/// virtio-pci with MSI-X, the backend holding the vector's eventfd: while the guest has the
/// queue's vector masked, the backend's call sets the pending bit the guest reads in the PBA, and
/// unmasking delivers it, once. Then the guest moves the queue to another vector and the backend's
/// calls follow.
#[test]
fn msix_pending_bit_and_retarget_hold_with_the_backend_owning_the_call_fd() {
    // Before the KVM probe too: it opens descriptors.
    let _serial = serial();
    kvm_test!();
    use vm_notify::msix::MSIX_ENABLE;
    use vm_notify_testkit::{layout, MsixBar};
    const NOTIFY: u64 = 0xd100_0000;
    const BAR: u64 = 0xe000_0000;
    const VECTORS: [u8; 2] = [0x45, 0x46];
    const AFTER: u64 = 200;
    const PBA_SLOT: usize = 0;

    let mut vm = TinyVm::with_shared_memory().unwrap();
    let queue = SplitQueue::new(0, 16, &LENGTHS).unwrap();
    queue.lay_out(&vm).unwrap();
    let vectors = vm.notify().msix(2).unwrap();
    let bar = MsixBar::new(vectors.clone(), BAR);
    let backend = vhost_backend::Backend::start("msix");
    let mut frontend =
        VhostUserFrontend::connect(&backend.socket, 1, vm.memory(), FEATURES).unwrap();
    let kick = vm
        .notify()
        .ioevent(
            WriteMatch::mmio(NOTIFY).width(Width::W2).datamatch(0),
            &Notifier::new(Mode::Counter).unwrap(),
        )
        .unwrap();
    frontend
        .start_queue(queue.vring(0), kick, vectors.handle(0).unwrap())
        .unwrap();

    let mut p = GuestProgram::new().unwrap();
    p.enable_lapic().unwrap();
    for v in VECTORS {
        p.on_interrupt(v, Eoi::Lapic);
    }
    // Program both table entries (unmasked) and enable MSI-X, as a driver does.
    for (i, v) in VECTORS.iter().enumerate() {
        p.mmio_write(bar.entry(i), 0xfee0_0000, 8).unwrap();
        p.mmio_write(bar.entry(i) + 8, u64::from(*v), 8).unwrap();
    }
    p.mmio_write(bar.control(), u64::from(MSIX_ENABLE), 2)
        .unwrap();
    // Mask vector 0, make one request and spin (no interrupt can come) until it is used.
    p.mmio_write(bar.vector_control(0), 1, 4).unwrap();
    p.virtq_submit(&queue).unwrap();
    p.mmio_write(NOTIFY, 0, 2).unwrap();
    {
        let a = p.asm();
        let mut spin = a.create_label();
        use iced_x86::code_asm::*;
        a.set_label(&mut spin).unwrap();
        a.mov(rdx, queue.used_ring() + 2).unwrap();
        a.movzx(eax, word_ptr(rdx)).unwrap();
        a.cmp(eax, 1).unwrap();
        a.jne(spin).unwrap();
    }
    // Read the PBA into a data slot, then unmask: the pending interrupt arrives.
    p.mmio_read(bar.pba(), 8).unwrap();
    p.asm()
        .mov(
            iced_x86::code_asm::qword_ptr(layout::data_slot(PBA_SLOT)),
            iced_x86::code_asm::rax,
        )
        .unwrap();
    p.mmio_write(bar.vector_control(0), 0, 4).unwrap();
    p.wait_for_interrupt().unwrap();
    // The guest moves the queue to vector 1 (a queue_msix_vector write); the host hands the
    // backend vector 1's eventfd.
    p.signal_host(1).unwrap();
    p.repeat(AFTER, |p| {
        p.virtq_submit(&queue)?;
        p.mmio_write(NOTIFY, 0, 2)?;
        p.virtq_wait_used(&queue)
    })
    .unwrap();
    // Take every interrupt still pending (the last call's, at least): all on vector 1.
    p.drain_interrupts(0x30).unwrap();
    p.exit().unwrap();

    let (tx, rx) = std::sync::mpsc::channel();
    let handler_bar = bar.clone();
    let retarget = std::sync::Mutex::new(Some(tx));
    let running = vm
        .start(p, move |e: &GuestExit, data: &mut [u8]| {
            if let GuestExit::PioWrite {
                port: layout::HOST_PORT,
                ..
            } = e
            {
                // Hand the frontend back to the test thread to retarget, and wait for it.
                let (done_tx, done_rx) = std::sync::mpsc::channel();
                retarget
                    .lock()
                    .unwrap()
                    .take()
                    .unwrap()
                    .send(done_tx)
                    .unwrap();
                done_rx.recv().unwrap();
            } else {
                assert!(handler_bar.handle(e, data), "unexpected exit {e:?}");
            }
        })
        .unwrap();
    let t0 = Instant::now();
    let done: std::sync::mpsc::Sender<()> = rx.recv_timeout(TIMEOUT).unwrap();
    eprintln!("retarget signal after {:?}", t0.elapsed());
    let pending_seen_by_guest = vm.data(PBA_SLOT).unwrap();
    let first = vm.irq_count(VECTORS[0]).unwrap();
    frontend.set_call(0, vectors.handle(1).unwrap()).unwrap();
    done.send(()).unwrap();
    let report = running.wait(TIMEOUT).done().unwrap();
    eprintln!("run done after {:?}", t0.elapsed());
    let irqs: Vec<u64> = VECTORS.iter().map(|&v| vm.irq_count(v).unwrap()).collect();
    let sleeps = queue.sleeps(&vm).unwrap();
    eprintln!(
        "PBA read by the guest while masked: {pending_seen_by_guest:#x}; vector 0 interrupts at unmask: {first}; after the retarget: {irqs:?}, {sleeps} sleeps, {AFTER} requests; bar errors {:?}",
        bar.errors()
    );
    assert_eq!(pending_seen_by_guest & 1, 1, "the PBA bit of vector 0");
    assert_eq!(first, 1);
    assert_eq!(
        irqs[0], 1,
        "no call went to the old vector after the retarget"
    );
    assert!(
        sleeps.max(1) <= irqs[1] && irqs[1] <= AFTER,
        "{irqs:?}, sleeps {sleeps}"
    );
    assert_eq!(u64::from(queue.used_idx(&vm).unwrap()), 1 + AFTER);
    assert_eq!(queue.mismatches(&vm).unwrap(), 0);
    assert!(bar.errors().is_empty());
    // Only MSI-X table/PBA accesses and the retarget signal reached the VMM: no queue notify.
    assert_eq!(report.mmio_writes(NOTIFY), 0);
}

/// No backend at the socket: a typed error naming the step, and nothing registered.
#[test]
fn connecting_to_no_backend_is_a_typed_error() {
    let _serial = serial();
    kvm_test!();
    let vm = TinyVm::with_shared_memory().unwrap();
    let missing =
        std::env::temp_dir().join(format!("vm-notify-{}-nobody.sock", std::process::id()));
    let e = VhostUserFrontend::connect(&missing, 1, vm.memory(), FEATURES).unwrap_err();
    assert!(matches!(e, Error::VhostUser { op: "connect", .. }), "{e:?}");
    eprintln!("{e}");
}

/// Hand-off cycles against one running backend: connect, share memory, hand over a queue's kick
/// (a userspace registration here; a kernel one costs a grace period to remove) and call, drop.
/// Descriptors and routing entries come back to where they were. `VM_NOTIFY_VHOST_CYCLES` sets
/// the count.
#[test]
fn hand_off_cycles_leave_no_descriptor_or_registration_behind() {
    let _serial = serial();
    kvm_test!();
    use vm_notify::fallback::Policy;

    let cycles: u32 = std::env::var("VM_NOTIFY_VHOST_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    vhost_backend::binary();
    let vm = TinyVm::with_shared_memory().unwrap();
    let queue = SplitQueue::new(0, 16, &LENGTHS).unwrap();
    queue.lay_out(&vm).unwrap();
    let backend = vhost_backend::Backend::start("cycles");
    let user = vm.notify().with_policy(Policy::Userspace);
    vm.run_injector(&user).unwrap();
    let kick = Notifier::new(Mode::Counter).unwrap();
    let call = Notifier::new(Mode::Counter).unwrap();
    let entries = vm.router().entries();
    let at = WriteMatch::mmio(BASE + MMIO_QUEUE_NOTIFY)
        .width(Width::W4)
        .datamatch(0);
    let before = open_fds();
    let start = Instant::now();
    let mut retries = 0u64;
    for _ in 0..cycles {
        // The backend listens again after each disconnect; connect when it does. Until then a
        // connection is refused, or (when it lands on the old listener as it closes) accepted
        // and then reset during the handshake: both are retried.
        let mut frontend = loop {
            match VhostUserFrontend::connect(&backend.socket, 1, vm.memory(), FEATURES) {
                Ok(f) => break f,
                Err(Error::VhostUser { .. }) => {
                    retries += 1;
                    assert!(
                        start.elapsed() < Duration::from_secs(600),
                        "the backend stopped listening"
                    );
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(e) => panic!("{e}"),
            }
        };
        let reg = user.ioevent(at, &kick).unwrap();
        let irq = vm.notify().irqfd_with(IRQ.into(), &call).unwrap();
        frontend.start_queue(queue.vring(0), reg, irq).unwrap();
        drop(frontend);
    }
    let each = start.elapsed() / cycles;
    let after = open_fds();
    eprintln!("{cycles} vhost-user hand-off cycles, {each:?} each ({retries} connect retries); open fds {before} -> {after}");
    assert_eq!(before, after, "descriptors leaked");
    assert_eq!(vm.router().irqfds(IRQ.into()), 0);
    assert_eq!(vm.router().entries(), entries);
    assert!(user.dispatcher().is_empty());
}

/// A vhost-user backend in this process that speaks just enough of the protocol for a hand-off
/// (replies to `GET_FEATURES` and `GET_PROTOCOL_FEATURES`; closes every descriptor it is sent)
/// and hangs up after `cut` messages. Returns its socket path and the count of messages it read.
fn backend_lost_after(cut: usize) -> (std::path::PathBuf, std::thread::JoinHandle<usize>) {
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const GET_FEATURES: u32 = 1;
    const GET_PROTOCOL_FEATURES: u32 = 15;
    /// Version 1, a reply.
    const REPLY: u32 = 0x1 | 0x4;
    /// VIRTIO_F_VERSION_1 and VHOST_USER_F_PROTOCOL_FEATURES.
    const OFFERED: u64 = (1 << 32) | (1 << 30);
    /// VHOST_USER_PROTOCOL_F_MQ.
    const PROTOCOL: u64 = 1;

    let path = std::env::temp_dir().join(format!(
        "vm-notify-{}-lost-after-{cut}.sock",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let served = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut read = 0;
        while read < cut {
            // The header, with any descriptors the message carries.
            let mut header = [0u8; 12];
            let mut control = [0u8; 256];
            let mut iov = libc::iovec {
                iov_base: header.as_mut_ptr().cast(),
                iov_len: header.len(),
            };
            // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = control.len() as _;
            // SAFETY: `msg` describes `header` and `control`, both live and writable.
            let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_WAITALL) };
            if n != header.len() as isize {
                break; // the frontend hung up
            }
            // SAFETY: `msg` was filled by recvmsg; the CMSG macros walk its control buffer.
            let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
            while !cmsg.is_null() {
                // SAFETY: `cmsg` points into `control`, as CMSG_FIRSTHDR/NXTHDR returned it.
                let (level, kind, len) =
                    unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type, (*cmsg).cmsg_len) };
                if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
                    // SAFETY: as above; CMSG_LEN(0) is the header's length.
                    let bytes = len - unsafe { libc::CMSG_LEN(0) } as usize;
                    // SAFETY: the data holds `bytes / 4` descriptors, now this process's.
                    let fds = unsafe { libc::CMSG_DATA(cmsg) }.cast::<i32>();
                    for i in 0..bytes / 4 {
                        // SAFETY: each received descriptor is owned by nobody else: closed here.
                        drop(unsafe { OwnedFd::from_raw_fd(fds.add(i).read_unaligned()) });
                    }
                }
                // SAFETY: as above.
                cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
            }
            let request = u32::from_le_bytes(header[0..4].try_into().unwrap());
            let size = u32::from_le_bytes(header[8..12].try_into().unwrap());
            let mut body = vec![0u8; size as usize];
            if stream.read_exact(&mut body).is_err() {
                break;
            }
            read += 1;
            let value = match request {
                GET_FEATURES => OFFERED,
                GET_PROTOCOL_FEATURES => PROTOCOL,
                _ => continue,
            };
            let mut reply = Vec::with_capacity(20);
            reply.extend_from_slice(&request.to_le_bytes());
            reply.extend_from_slice(&REPLY.to_le_bytes());
            reply.extend_from_slice(&8u32.to_le_bytes());
            reply.extend_from_slice(&value.to_le_bytes());
            if stream.write_all(&reply).is_err() {
                break;
            }
        }
        read
    });
    (path, served)
}

/// The backend goes away after each message of a hand-off in turn (connect, then handing over a
/// queue: every message the frontend sends): each time the frontend returns a typed error naming
/// the step, and once it is dropped nothing is left — no descriptor, no irqfd, no ioeventfd (the
/// same registration is made again). A backend that stays answers all of them.
#[test]
fn a_backend_lost_at_any_message_leaves_nothing_behind() {
    let _serial = serial();
    kvm_test!();
    let vm = TinyVm::with_shared_memory().unwrap();
    let queue = SplitQueue::new(0, 16, &LENGTHS).unwrap();
    queue.lay_out(&vm).unwrap();
    let at = WriteMatch::mmio(BASE + MMIO_QUEUE_NOTIFY)
        .width(Width::W4)
        .datamatch(0);
    let hand_off = |socket: &std::path::Path| -> vm_notify::Result<()> {
        let kick = vm.notify().ioevent(at, &Notifier::new(Mode::Counter)?)?;
        let call = vm.notify().irqfd(IRQ.into())?;
        let mut frontend = VhostUserFrontend::connect(socket, 1, vm.memory(), FEATURES)?;
        let relay = frontend.start_queue(queue.vring(0), kick, call)?;
        assert!(relay.is_none(), "an irqfd takes the calls itself");
        Ok(())
    };

    // A backend that never hangs up: how many messages a hand-off takes.
    let (socket, served) = backend_lost_after(usize::MAX);
    hand_off(&socket).unwrap();
    let messages = served.join().unwrap();
    let _ = std::fs::remove_file(&socket);
    assert!(messages >= 12, "a hand-off of {messages} messages");

    let entries = vm.router().entries();
    let mut steps = Vec::new();
    for cut in 0..messages {
        let before = open_fds();
        let (socket, served) = backend_lost_after(cut);
        let e = hand_off(&socket).expect_err("the backend hung up: the hand-off cannot succeed");
        let Error::VhostUser { op, .. } = e else {
            panic!("after {cut} messages: {e:?}")
        };
        steps.push(op);
        assert_eq!(served.join().unwrap(), cut);
        let _ = std::fs::remove_file(&socket);
        assert_eq!(
            open_fds(),
            before,
            "descriptors left after {cut} messages ({op})"
        );
        assert_eq!(vm.router().irqfds(IRQ.into()), 0, "an irqfd left ({op})");
        assert_eq!(vm.router().entries(), entries, "a route left ({op})");
        // The kick's ioeventfd is gone from KVM: the same registration is made again.
        let again = vm
            .notify()
            .ioevent(at, &Notifier::new(Mode::Counter).unwrap());
        assert!(again.is_ok(), "after {cut} messages ({op}): {again:?}");
    }
    eprintln!(
        "a backend lost after each of {messages} messages: {messages} typed errors, at {steps:?}"
    );
}

/// virtio-mmio's line, PIC IRQ 5 made level-triggered (ELCR): vector 0x25.
const MMIO_IRQ: u8 = 5;
const MMIO_VECTOR: u8 = 0x20 + MMIO_IRQ;
/// Data slots the guest's handler writes: the status bits it saw, and reads of 0.
const SEEN: usize = 0;
const ZERO_READS: usize = 1;

/// On virtio-mmio the queue's interrupt is the device's status line, which has no eventfd: the
/// frontend hands the backend one of its own and returns a `CallRelay`, which this test's "VMM
/// thread" waits on (with the line's resamples) and delivers. The guest's handler reads
/// `InterruptStatus` and acknowledges it, as Linux's `vm_interrupt` does: every interrupt that
/// is not a late re-assertion finds "used buffers" set — none of the status-0 interrupts that a
/// call written straight into an irqfd would give — and the backend serves 1000 requests.
#[test]
fn virtio_mmio_takes_the_backends_calls_through_a_relay_that_sets_the_status() {
    use common::virtio_rng::RngStats;
    use vm_device::bus::{MmioAddress, MmioRange};
    use vm_device::device_manager::{IoManager, MmioManager};
    use vm_notify::io::IoRegion;
    use vm_notify::virtio::MmioLayout;
    use vm_notify::wait::{EventLoop, Wake};

    let _serial = serial();
    kvm_test!();
    const N: u64 = 1000;
    const CALLS: u64 = 0;
    const RESAMPLE: u64 = 1;
    let mut vm = TinyVm::with_shared_memory().unwrap();
    let queue = SplitQueue::new(0, 16, &LENGTHS).unwrap();
    queue.lay_out(&vm).unwrap();
    let backend = vhost_backend::Backend::start("mmio-relay");
    let mut frontend =
        VhostUserFrontend::connect(&backend.socket, 1, vm.memory(), FEATURES).unwrap();
    let device = MmioLayout {
        base: BASE,
        queues: 1,
        gsi: MMIO_IRQ.into(),
    };
    let notify = std::sync::Arc::new(vm.notify().virtio_mmio(&device).unwrap());
    let line = notify.interrupt().clone();
    let relay = frontend
        .start_queue(queue.vring(0), notify.queue(0).unwrap(), line.clone())
        .unwrap()
        .expect("a status line has no eventfd: its calls are relayed");

    // The VMM's thread: the backend's calls and the line's resamples, in one loop.
    let events = EventLoop::new().unwrap();
    events.add(CALLS, relay.calls()).unwrap();
    events
        .add(RESAMPLE, line.resample().expect("a level line"))
        .unwrap();
    let stop = events.stop_handle();
    let vmm = std::thread::spawn(move || -> vm_notify::Result<RngStats> {
        let (mut ready, mut stats) = (Vec::new(), RngStats::default());
        loop {
            if events.wait(None, &mut ready)? == Wake::Stopped {
                return Ok(stats);
            }
            for &(token, _) in &ready {
                if token == CALLS {
                    stats.signals += 1;
                    stats.new_interrupts += u64::from(relay.deliver()?);
                } else {
                    stats.resamples += 1;
                    stats.reasserts += u64::from(line.on_resample()?);
                }
            }
        }
    });

    let mut p = GuestProgram::new().unwrap();
    p.init_pic(0x20, !((1u16 << MMIO_IRQ) | (1 << 2)), 1 << MMIO_IRQ)
        .unwrap();
    p.on_interrupt_with(MMIO_VECTOR, Eoi::PicMaster, |a| {
        GuestProgram::virtio_mmio_ack(a, BASE, SEEN, ZERO_READS)
    });
    p.repeat(N, |p| {
        p.virtq_submit(&queue)?;
        p.mmio_write(BASE + MMIO_QUEUE_NOTIFY, 0, 4)?;
        p.virtq_wait_used(&queue)
    })
    .unwrap();
    p.exit().unwrap();
    // The status read and the ACK are the only exits: vm-notify's registers, as a VMM routes
    // them.
    let region = std::sync::Arc::new(IoRegion::mmio_notify(notify.clone()));
    let mut io = IoManager::new();
    let window = MmioRange::new(MmioAddress(BASE + MMIO_QUEUE_NOTIFY), 0x18).unwrap();
    io.register_mmio(window, region.clone()).unwrap();
    let report = vm
        .start(p, move |e: &GuestExit, data: &mut [u8]| {
            assert!(e.route(&io, data), "unexpected exit {e:?}");
        })
        .unwrap()
        .wait(TIMEOUT)
        .done()
        .unwrap();
    stop.stop().unwrap();
    let stats = vmm.join().unwrap().unwrap();
    assert!(region.take_error().is_none());

    let irqs = vm.irq_count(MMIO_VECTOR).unwrap();
    let zero_reads = vm.data(ZERO_READS).unwrap();
    let untaken = notify.interrupt().status() & 1 != 0;
    eprintln!(
        "{N} requests on virtio-mmio in {:?}: {stats:?}, guest took {irqs} interrupts, {zero_reads} found status 0, {} exits",
        report.elapsed,
        report.handler_exits()
    );
    assert_eq!(queue.submitted(&vm).unwrap(), N);
    assert_eq!(u64::from(queue.used_idx(&vm).unwrap()), N);
    assert_eq!(queue.mismatches(&vm).unwrap(), 0, "used lengths");
    assert!(
        queue.distinct_words(&vm).unwrap() > 100,
        "the bytes look constant"
    );
    assert_eq!(
        vm.data(SEEN).unwrap() & !1,
        0,
        "only used-buffer interrupts"
    );
    // Every interrupt found the status set, but for late re-assertions (KVM raises the pin from a
    // work queue after the irqfd write); one per call that set the status anew.
    stats
        .check_interrupts(irqs, zero_reads, untaken, true)
        .unwrap();
    assert!(irqs > 0 && stats.signals <= N, "{stats:?}");
    // Two exits per interrupt (status read, ACK); no kick reached the VMM.
    assert_eq!(report.handler_exits() as u64, 2 * irqs);
}
