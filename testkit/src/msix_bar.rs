//! [`MsixBar`]: the MMIO window of an emulated MSI-X capability, for guests that program their
//! vectors themselves.

use std::fmt;
use std::sync::{Arc, Mutex};

use crate::exit::GuestExit;
use vm_device::bus::{MmioAddress, MmioRange};
use vm_device::device_manager::{IoManager, MmioManager};
use vm_notify::io::IoRegion;
use vm_notify::msix::MsixVectors;

/// Offset of the MSI-X table in the window (room for 2048 entries).
pub const TABLE_OFFSET: u64 = 0;
/// Offset of the PBA in the window.
pub const PBA_OFFSET: u64 = 0x8000;
/// Offset of the message control register (in a real device it sits in PCI configuration space;
/// here a 2- or 4-byte MMIO register stands in for it).
pub const CONTROL_OFFSET: u64 = 0x9000;
/// Size of the window.
pub const WINDOW_LEN: u64 = 0xa000;

/// Emulates an MSI-X table, PBA and message control register at `base` for a [`TinyVm`]'s exit
/// handler: guest reads and writes there become calls on [`MsixVectors`].
///
/// [`TinyVm`]: super::TinyVm
#[derive(Clone)]
pub struct MsixBar {
    vectors: MsixVectors,
    base: u64,
    region: Arc<IoRegion>,
    io: Arc<IoManager>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl fmt::Debug for MsixBar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MsixBar")
            .field("base", &format_args!("{:#x}", self.base))
            .field("vectors", &self.vectors)
            .finish()
    }
}

impl MsixBar {
    /// A window at guest-physical `base` for `vectors`.
    pub fn new(vectors: MsixVectors, base: u64) -> Self {
        let region = Arc::new(IoRegion::msix(&vectors, TABLE_OFFSET, PBA_OFFSET));
        let mut io = IoManager::new();
        // The table and PBA part of the window (message control above them is the kit's own).
        // A range of a nonzero size at a base that cannot wrap is always taken.
        if let Ok(range) = MmioRange::new(MmioAddress(base), CONTROL_OFFSET) {
            let _ = io.register_mmio(range, region.clone());
        }
        MsixBar {
            vectors,
            base,
            region,
            io: Arc::new(io),
            errors: Arc::default(),
        }
    }

    /// The vectors behind the window.
    pub fn vectors(&self) -> &MsixVectors {
        &self.vectors
    }

    /// The guest-physical address of table entry `index`.
    pub fn entry(&self, index: usize) -> u64 {
        self.base + TABLE_OFFSET + index as u64 * vm_notify::msix::MSIX_ENTRY_SIZE
    }

    /// The guest-physical address of vector control of entry `index` (bit 0: mask).
    pub fn vector_control(&self, index: usize) -> u64 {
        self.entry(index) + 12
    }

    /// The guest-physical address of the PBA.
    pub fn pba(&self) -> u64 {
        self.base + PBA_OFFSET
    }

    /// The guest-physical address of the message control register.
    pub fn control(&self) -> u64 {
        self.base + CONTROL_OFFSET
    }

    /// Every access the vectors refused or failed to apply, in order (they read as 0 / are
    /// dropped, as hardware would).
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// Handles `exit` if it falls in the window; returns whether it did.
    pub fn handle(&self, exit: &GuestExit, reply: &mut [u8]) -> bool {
        let (addr, len, write) = match *exit {
            GuestExit::MmioWrite { addr, data, len } => (addr, len as usize, Some(data)),
            GuestExit::MmioRead { addr, len } => (addr, len as usize, None),
            _ => return false,
        };
        let Some(offset) = addr.checked_sub(self.base).filter(|o| *o < WINDOW_LEN) else {
            return false;
        };
        let v = &self.vectors;
        let bytes = write.map(|d| d.to_le_bytes());
        let data = bytes.as_ref().map(|b| &b[..len.min(8)]);
        // Message control lives in config space on real hardware; the kit keeps it in the
        // window. The table and the PBA go through the library's `IoRegion` in an `IoManager`,
        // as a VMM routes them.
        let result = match (offset, data) {
            (o, Some(d)) if o >= CONTROL_OFFSET => {
                v.write_message_control(d[0] as u16 | (d.get(1).copied().unwrap_or(0) as u16) << 8)
            }
            (o, None) if o >= CONTROL_OFFSET => {
                let c = v.message_control().to_le_bytes();
                for (i, b) in reply.iter_mut().enumerate() {
                    *b = c.get(i).copied().unwrap_or(0);
                }
                Ok(())
            }
            (_, Some(d)) => {
                let at = MmioAddress(addr);
                let _ = self.io.mmio_write(at, d);
                self.region.take_error().map_or(Ok(()), Err)
            }
            (_, None) => {
                let at = MmioAddress(addr);
                let _ = self.io.mmio_read(at, reply);
                self.region.take_error().map_or(Ok(()), Err)
            }
        };
        if let Err(e) = result {
            if let Ok(mut errors) = self.errors.lock() {
                errors.push(format!("{exit:?}: {e}"));
            }
        }
        true
    }
}
