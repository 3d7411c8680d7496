//! virtio-net served by the host kernel's vhost-net worker (`--net-tap`, feature `vhost-net`):
//! this file gives the device its identity (type, MAC address, two queues) and opens the tap;
//! the packets and the notifications go between the guest and the kernel, through vm-notify's
//! `VhostNetFrontend`, and no VMM thread serves the queues.

use std::fs::File;
use std::os::fd::AsRawFd;

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;

use crate::virtio_pci::VirtioDevice;

/// The guest's MAC address: locally administered, unicast.
pub const MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];

/// The virtio-net header the driver uses with `VIRTIO_F_VERSION_1`
/// (`struct virtio_net_hdr_v1`), which the tap carries in front of every packet.
const VNET_HDR_LEN: libc::c_int = 12;

/// The device: one receive and one transmit queue, a MAC address, no offloads.
#[derive(Clone)]
pub struct Net;

impl VirtioDevice for Net {
    const TYPE: u32 = VIRTIO_ID_NET;
    const NAME: &'static str = "virtio-net";

    fn features(&self) -> u64 {
        1 << VIRTIO_NET_F_MAC
    }

    fn config(&self) -> Vec<u8> {
        // mac, then status (not offered: the link is up) and the rest, all zero.
        let mut config = MAC.to_vec();
        config.resize(12, 0);
        config
    }

    fn queues(&self) -> u16 {
        2
    }

    fn for_queue(&self) -> std::io::Result<Self> {
        Ok(Net)
    }
}

/// Opens (or creates) the tap `name` for vhost-net: a tap without packet information, with the
/// virtio-net header in front of each packet (12 bytes: the driver's header with
/// `VIRTIO_F_VERSION_1`), and no offloads (the device offers the driver none).
pub fn open_tap(name: &str) -> std::io::Result<File> {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: an all-zero ifreq is a valid value (an empty name, no flags).
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= request.ifr_name.len() || name.contains('\0') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("tap name {name:?}: at most 15 bytes, no NUL"),
        ));
    }
    for (to, from) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *to = from as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    let check = |rc: libc::c_int| match rc {
        0.. => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    };
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `request` is; `tun` is open.
    check(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut request) })?;
    // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which points at one.
    check(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETVNETHDRSZ, &VNET_HDR_LEN) })?;
    // SAFETY: TUNSETOFFLOAD takes its flags (none) by value.
    check(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETOFFLOAD, 0 as libc::c_ulong) })?;
    Ok(tun)
}
