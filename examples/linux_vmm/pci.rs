//! PCI bus 0 through configuration mechanism #1 (ports 0xcf8-0xcff), a vm-device `DevicePio`:
//! a host bridge at 00:00.0 and the functions after it (00:01.0, 00:02.0, ...).

use std::sync::{Arc, Mutex};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

use crate::lock;

/// The config address port; the data ports follow it.
pub const CONFIG_ADDRESS: u16 = 0xcf8;
/// The MMIO window the host bridge declares (ACPI `_CRS`), holding the functions' BAR 0.
pub const MMIO_WINDOW: (u32, u32) = (0xe000_0000, 0xfebf_ffff);
/// The functions' INTx lines: device `n`'s INTA# on IOAPIC pin `FIRST_INTX_GSI + n - 1` (the
/// DSDT's `_PRT` says so; pins 16-23 are the IOAPIC's PCI pins, level-triggered, active-low).
pub const FIRST_INTX_GSI: u32 = 16;
/// The most functions behind the host bridge that have an INTx pin of their own.
pub const INTX_DEVICES: u8 = 8;

/// The IOAPIC pin device `n`'s (1 to [`INTX_DEVICES`]) INTA# is routed to.
pub fn intx_gsi(device: u8) -> u32 {
    FIRST_INTX_GSI + u32::from(device) - 1
}

/// A function's configuration space, as the bus reaches it.
pub trait PciFunction: Send + Sync {
    /// Config space dword `reg` (4-aligned) as the guest reads it.
    fn config_read(&self, reg: usize) -> u32;
    /// A guest write of `value` to the bytes of dword `reg` that `mask` selects.
    fn config_write(&self, reg: usize, value: u32, mask: u32);
}

/// Configuration mechanism #1 over bus 0.
pub struct PciBus {
    address: Mutex<u32>,
    functions: Vec<Arc<dyn PciFunction>>,
}

impl PciBus {
    /// Bus 0 with `functions` at devices 1, 2, ... (the host bridge is device 0).
    pub fn new(functions: Vec<Arc<dyn PciFunction>>) -> Self {
        PciBus {
            address: Mutex::new(0),
            functions,
        }
    }

    /// The function and dword the config data port at `offset` (4-7) reaches, with the byte
    /// shift of the port within the dword: bus 0, function 0, the enable bit set.
    fn target(&self, offset: u64) -> (Option<(usize, usize)>, u32) {
        let address = *lock(&self.address);
        let shift = 8 * (offset as u32 - 4);
        let enabled = address & (1 << 31) != 0;
        let (bus, device, function) = (
            (address >> 16) & 0xff,
            (address >> 11) & 0x1f,
            (address >> 8) & 7,
        );
        let reg = (address & 0xfc) as usize;
        let target = (enabled && bus == 0 && function == 0).then_some((device as usize, reg));
        (target, shift)
    }
}

/// The host bridge's config space dword `reg`: an Intel bridge, class 06/00.
fn host_bridge_read(reg: usize) -> u32 {
    match reg {
        0x00 => 0x0d57_8086,
        0x08 => 0x0600_0000,
        _ => 0,
    }
}

impl DevicePio for PciBus {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let offset = u64::from(offset);
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                data.copy_from_slice(&lock(&self.address).to_le_bytes());
            }
            return;
        }
        let (target, shift) = self.target(offset);
        let dword = match target {
            Some((0, reg)) => host_bridge_read(reg),
            Some((device, reg)) => self
                .functions
                .get(device - 1)
                .map_or(0xffff_ffff, |f| f.config_read(reg)),
            None => 0xffff_ffff,
        };
        let bytes = (dword >> shift).to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let offset = u64::from(offset);
        if offset < 4 {
            if let Ok(bytes) = <[u8; 4]>::try_from(data) {
                *lock(&self.address) = u32::from_le_bytes(bytes);
            }
            return;
        }
        let (target, shift) = self.target(offset);
        let Some((device, reg)) = target.filter(|(d, _)| *d > 0) else {
            return;
        };
        let Some(function) = self.functions.get(device - 1) else {
            return;
        };
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        let mask = if n == 4 {
            u32::MAX
        } else {
            (1u32 << (8 * n)) - 1
        };
        let (value, mask) = (u32::from_le_bytes(v) << shift, mask << shift);
        function.config_write(reg, value, mask);
    }
}
