//! Every descriptor the library makes is close-on-exec: with a VM, notifiers, registrations on
//! both paths, level and edge irqfds, MSI-X vectors, an event loop and an injector thread alive, a
//! child started with `exec` sees none of them.

use std::os::fd::AsRawFd;
use std::process::Command;

use vm_notify::fallback::Policy;
use vm_notify::kvm::MsiMessage;
use vm_notify::wait::EventLoop;
use vm_notify::{Mode, Notifier, WriteMatch};
use vm_notify_testkit::{kvm_test, TinyVm};

/// Descriptors open without close-on-exec: the ones this process was started with that children
/// inherit on purpose (cargo's jobserver pipe, say).
fn inheritable(fds: &[u32]) -> Vec<u32> {
    fds.iter()
        .copied()
        .filter(|&fd| {
            // SAFETY: F_GETFD only reads the descriptor's flags; a closed one returns -1.
            let flags = unsafe { libc::fcntl(fd as i32, libc::F_GETFD) };
            flags >= 0 && flags & libc::FD_CLOEXEC == 0
        })
        .collect()
}

fn own_fds() -> Vec<u32> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

#[test]
fn no_descriptor_survives_exec() {
    kvm_test!();
    let before = own_fds();
    let inherited = inheritable(&before);
    let vm = TinyVm::with_shared_memory().unwrap();
    let n = || Notifier::new(Mode::Counter).unwrap();
    let kick = n();
    let _kernel = vm
        .notify()
        .ioevent(WriteMatch::mmio(0xd000_0050), &kick)
        .unwrap();
    let user = vm.notify().with_policy(Policy::Userspace);
    vm.run_injector(&user).unwrap();
    let _user = user.ioevent(WriteMatch::mmio(0xd000_0060), &n()).unwrap();
    let _edge = vm.notify().irqfd_with(4, &n()).unwrap();
    let _injected = user.irqfd_with(3, &n()).unwrap();
    let _level = vm.notify().level_irqfd_with(5, &n(), &n()).unwrap();
    let vectors = vm.notify().msix(4).unwrap();
    vectors.set_message(0, MsiMessage::x86(0, 0x40)).unwrap();
    vectors.set_masked(0, false).unwrap();
    vectors
        .write_message_control(vm_notify::msix::MSIX_ENABLE)
        .unwrap();
    let vector_fd = vectors.handle(0).unwrap().notifier().unwrap();
    let events = EventLoop::new().unwrap();
    events.add(1, &kick).unwrap();

    let parent = own_fds();
    let ours: Vec<u32> = parent
        .iter()
        .copied()
        .filter(|fd| !before.contains(fd))
        .collect();
    // Every descriptor made since the start carries FD_CLOEXEC...
    assert_eq!(inheritable(&ours), Vec::<u32>::new(), "of {ours:?}");
    // `ls` lists its own descriptors: 0, 1, 2, and the one it reads the directory with.
    let out = Command::new("ls")
        .arg("/proc/self/fd")
        .output()
        .expect("run ls");
    assert!(out.status.success());
    let child: Vec<u32> = String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect();
    eprintln!(
        "the library opened {} descriptors; the exec'd child sees {child:?} (inherited on purpose by this process: {inherited:?})",
        ours.len()
    );
    // The checked set holds what the library made here: the notifiers, the vector's eventfd,
    // the event loop's and the injector's epoll, and the VM itself.
    let made = [
        kick.as_raw_fd(),
        vector_fd.as_raw_fd(),
        events.as_raw_fd(),
        user.injector().unwrap().as_raw_fd(),
        vm.vm().as_raw_fd(),
    ];
    for fd in made {
        assert!(ours.contains(&(fd as u32)), "fd {fd} not among {ours:?}");
    }
    // ...and none reaches the child: it has its standard three, the one `ls` reads the directory
    // with, and what this process itself inherited.
    let leaked: Vec<u32> = child
        .iter()
        .copied()
        .filter(|fd| *fd > 3 && !inherited.contains(fd))
        .collect();
    assert!(
        leaked.is_empty(),
        "descriptors leaked across exec: {leaked:?} of {child:?}"
    );
}
