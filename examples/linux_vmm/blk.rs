//! virtio-blk over a host file: reads, writes, flushes and the device ID, 512-byte sectors.
//! Each read or write request is one `preadv`/`pwritev` between the file and the guest's
//! buffers, with no copy in between.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{desc::split::Descriptor, DescriptorChain};
use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryMmap};

use crate::virtio_pci::{DeviceStats, VirtioDevice, QUEUE_MAX};

const SECTOR: u64 = 512;
const T_IN: u32 = VIRTIO_BLK_T_IN;
const T_OUT: u32 = VIRTIO_BLK_T_OUT;
const T_FLUSH: u32 = VIRTIO_BLK_T_FLUSH;
const T_GET_ID: u32 = VIRTIO_BLK_T_GET_ID;
const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
/// VIRTIO_BLK_F_SEG_MAX: requests of up to `SEG_MAX` data segments (without it Linux sends one).
/// A chain holds the segments plus the header and the status, and fits the queue.
const F_SEG_MAX: u64 = 1 << VIRTIO_BLK_F_SEG_MAX;
const SEG_MAX: u32 = QUEUE_MAX as u32 - 2;
/// VIRTIO_BLK_F_FLUSH: the driver sends flushes, which become `fdatasync` of the file.
const F_FLUSH: u64 = 1 << VIRTIO_BLK_F_FLUSH;
/// VIRTIO_BLK_F_MQ: more than one request queue (`num_queues` in the configuration).
const F_MQ: u64 = 1 << VIRTIO_BLK_F_MQ;
/// Where `num_queues` sits in the configuration space (struct virtio_blk_config).
const CONFIG_NUM_QUEUES: usize = 34;
const ID: &[u8; VIRTIO_BLK_ID_BYTES as usize] = b"vm-notify-blk\0\0\0\0\0\0\0";

/// A block device backed by `file`; its capacity is the file's size in sectors. With more than
/// one request queue, each queue's thread has its own handle on the file (the I/O is
/// positional, so they never share an offset).
pub struct Blk {
    file: File,
    sectors: u64,
    queues: u16,
}

impl Blk {
    pub fn new(file: File, queues: u16) -> std::io::Result<Blk> {
        let sectors = file.metadata()?.len() / SECTOR;
        Ok(Blk {
            file,
            sectors,
            queues,
        })
    }

    /// Moves a read's or write's data buffers between the file at `offset` and guest memory in
    /// one vectored call (more only if the kernel moves less); returns the bytes moved.
    fn data(
        &self,
        mem: &GuestMemoryMmap,
        kind: u32,
        data: &[Descriptor],
        offset: u64,
    ) -> Result<u64, u8> {
        // The device writes a read's buffers and reads a write's: each must say so.
        let into_guest = kind == T_IN;
        let mut iovs: Vec<libc::iovec> = Vec::with_capacity(data.len());
        let mut total = 0u64;
        for desc in data {
            if desc.is_write_only() != into_guest {
                return Err(S_IOERR);
            }
            for slice in mem.get_slices(desc.addr(), desc.len() as usize) {
                let slice = slice.map_err(|_| S_IOERR)?;
                iovs.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
                total += slice.len() as u64;
            }
        }
        let end = offset.checked_add(total).ok_or(S_IOERR)?;
        if end > self.sectors * SECTOR {
            return Err(S_IOERR);
        }
        let fd = self.file.as_raw_fd();
        let (mut first, mut at) = (0, offset);
        while first < iovs.len() {
            let iov = &iovs[first..];
            let count = iov.len().min(1024) as libc::c_int;
            let pos = at as libc::off_t;
            // SAFETY: every iovec names guest memory inside a region of `mem`, which stays
            // mapped while `mem` is borrowed here; the kernel writes (preadv) or reads (pwritev)
            // at most `iov_len` bytes at each, and `count` does not exceed `iov.len()`.
            let n = unsafe {
                if into_guest {
                    libc::preadv(fd, iov.as_ptr(), count, pos)
                } else {
                    libc::pwritev(fd, iov.as_ptr(), count, pos)
                }
            };
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if n <= 0 {
                return Err(S_IOERR);
            }
            // A short transfer: skip what moved, go on from the rest.
            let mut moved = n as usize;
            at += moved as u64;
            while moved > 0 {
                let v = &mut iovs[first];
                if moved >= v.iov_len {
                    moved -= v.iov_len;
                    first += 1;
                } else {
                    // SAFETY: `moved < iov_len`, so the new base stays inside the same buffer.
                    v.iov_base = unsafe { v.iov_base.cast::<u8>().add(moved).cast() };
                    v.iov_len -= moved;
                    moved = 0;
                }
            }
        }
        Ok(total)
    }
}

impl VirtioDevice for Blk {
    const TYPE: u32 = VIRTIO_ID_BLOCK;
    const NAME: &'static str = "virtio-blk";

    fn features(&self) -> u64 {
        let mq = if self.queues > 1 { F_MQ } else { 0 };
        F_FLUSH | F_SEG_MAX | mq
    }

    fn config(&self) -> Vec<u8> {
        // capacity (u64, in 512-byte sectors), size_max (u32, unused), seg_max (u32), the
        // geometry and topology (unused), then num_queues (u16).
        let mut c = vec![0u8; CONFIG_NUM_QUEUES + 2];
        c[0..8].copy_from_slice(&self.sectors.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[CONFIG_NUM_QUEUES..].copy_from_slice(&self.queues.to_le_bytes());
        c
    }

    fn queues(&self) -> u16 {
        self.queues
    }

    fn for_queue(&self) -> std::io::Result<Self> {
        Ok(Blk {
            file: self.file.try_clone()?,
            sectors: self.sectors,
            queues: self.queues,
        })
    }

    fn complete(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        stats: &DeviceStats,
    ) -> Option<u32> {
        let descs: Vec<Descriptor> = chain.collect();
        let (header, rest) = descs.split_first()?;
        let (status, data) = rest.split_last()?;
        let kind: u32 = mem.read_obj(header.addr()).ok()?;
        let sector: u64 = mem.read_obj(header.addr().unchecked_add(8)).ok()?;
        let mut written = 0u32;
        let mut moved = 0u64;
        let result = match kind {
            // A sector past the end (or one whose byte offset overflows) is an I/O error.
            T_IN | T_OUT => match self.data(mem, kind, data, sector.saturating_mul(SECTOR)) {
                Ok(n) => {
                    moved = n;
                    if kind == T_IN {
                        written = n as u32;
                    }
                    Ok(())
                }
                Err(s) => Err(s),
            },
            T_FLUSH => self.file.sync_data().map_err(|_| S_IOERR),
            T_GET_ID => match data.first() {
                Some(d) if d.is_write_only() => {
                    let n = (d.len() as usize).min(ID.len());
                    mem.write_slice(&ID[..n], d.addr()).ok()?;
                    written += n as u32;
                    Ok(())
                }
                _ => Err(S_IOERR),
            },
            _ => Err(S_UNSUPP),
        };
        let code = result.err().unwrap_or(S_OK);
        mem.write_obj(code, status.addr()).ok()?;
        stats.bytes.fetch_add(moved, Ordering::Relaxed);
        Some(written + 1)
    }
}
