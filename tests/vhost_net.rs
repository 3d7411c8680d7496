//! Kernel vhost-net hand-off: what can be shown without a tap and a guest network. The guest-facing
//! proof, Linux's virtio_net driver on a `VhostNetFrontend` moving packets through a tap, is
//! `scripts/linux-guest`'s NET run (these machines' own host has no `/dev/vhost-net`; the L1
//! Linux it boots loads `vhost_net`), which `.ci/run` checks.
#![cfg(feature = "vhost-net")]

use std::path::Path;

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vm_notify::vhost_net::VhostNetFrontend;
use vm_notify::Error;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Where the host has no `/dev/vhost-net`, opening says so, naming the module to load, and keeps
/// no descriptor (the tap it was given is closed with it). Where it has one, the kernel offers
/// `VIRTIO_F_VERSION_1` and `VIRTIO_RING_F_EVENT_IDX` and the frontend negotiates them.
#[test]
fn opening_vhost_net_negotiates_or_says_which_module_is_missing() {
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let wanted = (1 << 32) | (1 << 29);
    let before = open_fds();
    let tap = std::fs::File::open("/dev/null").unwrap();
    match VhostNetFrontend::open(&memory, tap, wanted) {
        Err(e) => {
            assert!(
                !Path::new("/dev/vhost-net").exists(),
                "/dev/vhost-net exists, yet: {e}"
            );
            assert!(
                matches!(&e, Error::VhostNet { op, .. } if op.contains("vhost_net module")),
                "{e:?}"
            );
            eprintln!("no /dev/vhost-net here: {e}");
        }
        Ok(frontend) => {
            assert_eq!(frontend.features() & wanted, wanted, "{frontend:?}");
            eprintln!("/dev/vhost-net here: {frontend:?}");
        }
    }
    assert_eq!(open_fds(), before, "a descriptor was left open");
}
