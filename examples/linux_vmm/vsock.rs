//! virtio-vsock served by an external vhost-user backend (`--vhost-vsock`, feature
//! `vhost-user`; rust-vmm's vhost-device-vsock): this file gives the device its identity (type,
//! the guest's context ID, three queues); the backend serves the receive and transmit queues
//! through vm-notify's `VhostUserFrontend`, and no VMM thread serves them.

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;

use crate::virtio_pci::VirtioDevice;

/// The device: receive, transmit and event queues, and the guest's context ID.
#[derive(Clone)]
pub struct Vsock {
    pub guest_cid: u64,
}

impl VirtioDevice for Vsock {
    const TYPE: u32 = VIRTIO_ID_VSOCK;
    const NAME: &'static str = "virtio-vsock";

    fn features(&self) -> u64 {
        0
    }

    fn config(&self) -> Vec<u8> {
        // struct virtio_vsock_config: le64 guest_cid.
        self.guest_cid.to_le_bytes().to_vec()
    }

    fn queues(&self) -> u16 {
        3
    }

    fn for_queue(&self) -> std::io::Result<Self> {
        Ok(self.clone())
    }
}
