//! virtio-rng: fills every writable buffer with bytes from the host's /dev/urandom.

use std::fs::File;
use std::io::Read;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemoryMmap};

use crate::virtio_pci::{DeviceStats, VirtioDevice};

pub struct Rng {
    urandom: File,
    buf: Vec<u8>,
}

impl Rng {
    pub fn new() -> std::io::Result<Rng> {
        Ok(Rng {
            urandom: File::open("/dev/urandom")?,
            buf: vec![0; 4096],
        })
    }
}

impl VirtioDevice for Rng {
    const TYPE: u32 = VIRTIO_ID_RNG;
    const NAME: &'static str = "virtio-rng";

    fn features(&self) -> u64 {
        0
    }

    fn config(&self) -> Vec<u8> {
        Vec::new()
    }

    fn complete(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        stats: &DeviceStats,
    ) -> Option<u32> {
        let mut len = 0u32;
        for desc in chain.writable() {
            let n = (desc.len() as usize).min(self.buf.len());
            self.urandom.read_exact(&mut self.buf[..n]).ok()?;
            mem.write_slice(&self.buf[..n], desc.addr()).ok()?;
            len += n as u32;
        }
        stats.bytes.fetch_add(u64::from(len), Ordering::Relaxed);
        Some(len)
    }
}
