//! virtio-blk over a host file: reads, writes, flushes and the device ID, 512-byte sectors.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::sync::atomic::Ordering;

use virtio_queue::{desc::split::Descriptor, DescriptorChain};
use vm_memory::{Bytes, GuestMemoryMmap};

use crate::pci::{DeviceStats, VirtioDevice};

const SECTOR: u64 = 512;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// VIRTIO_BLK_F_SEG_MAX: requests of up to `SEG_MAX` data segments (without it Linux sends one).
const F_SEG_MAX: u64 = 1 << 2;
const SEG_MAX: u32 = 126;
/// VIRTIO_BLK_F_FLUSH: the driver sends flushes, which become `fdatasync` of the file.
const F_FLUSH: u64 = 1 << 9;
const ID: &[u8; 20] = b"vm-notify-blk\0\0\0\0\0\0\0";

/// A block device backed by `file`; its capacity is the file's size in sectors.
pub struct Blk {
    file: File,
    sectors: u64,
}

impl Blk {
    pub fn new(file: File) -> std::io::Result<Blk> {
        let sectors = file.metadata()?.len() / SECTOR;
        Ok(Blk { file, sectors })
    }

    /// Moves one data buffer between the file at `offset` and guest memory, with no copy in
    /// between; returns the bytes written into guest memory.
    fn data(
        &mut self,
        mem: &GuestMemoryMmap,
        kind: u32,
        desc: &Descriptor,
        offset: u64,
    ) -> Result<u32, u8> {
        let len = desc.len() as usize;
        let end = offset.checked_add(len as u64).ok_or(S_IOERR)?;
        if end > self.sectors * SECTOR {
            return Err(S_IOERR);
        }
        self.file
            .seek(SeekFrom::Start(offset))
            .map_err(|_| S_IOERR)?;
        match kind {
            T_IN if desc.is_write_only() => {
                mem.read_exact_volatile_from(desc.addr(), &mut self.file, len)
                    .map_err(|_| S_IOERR)?;
                Ok(len as u32)
            }
            T_OUT if !desc.is_write_only() => {
                mem.write_all_volatile_to(desc.addr(), &mut self.file, len)
                    .map_err(|_| S_IOERR)?;
                Ok(0)
            }
            _ => Err(S_IOERR),
        }
    }
}

impl VirtioDevice for Blk {
    const TYPE: u16 = 2;
    const NAME: &'static str = "virtio-blk";

    fn features(&self) -> u64 {
        F_FLUSH | F_SEG_MAX
    }

    fn config(&self) -> Vec<u8> {
        // capacity (u64, in 512-byte sectors), size_max (u32, unused), seg_max (u32).
        let mut c = self.sectors.to_le_bytes().to_vec();
        c.extend_from_slice(&0u32.to_le_bytes());
        c.extend_from_slice(&SEG_MAX.to_le_bytes());
        c
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
            T_IN | T_OUT => {
                // A sector past the end (or one whose byte offset overflows) is an I/O error.
                let mut offset = sector.saturating_mul(SECTOR);
                let mut r = Ok(());
                for desc in data {
                    match self.data(mem, kind, desc, offset) {
                        Ok(w) => {
                            written += w;
                            offset += u64::from(desc.len());
                            moved += u64::from(desc.len());
                        }
                        Err(s) => {
                            r = Err(s);
                            break;
                        }
                    }
                }
                r
            }
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

use vm_memory::Address as _;
