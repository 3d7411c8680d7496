//! The legacy devices Linux looks for, each a vm-device `DevicePio`: the 8250 console (vm-superio,
//! its interrupt a vm-notify irqfd on GSI 4), the keyboard controller (vm-superio's i8042, whose
//! CPU reset ends the run) and a CMOS with no RTC behind it.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;
use vm_notify::IrqFd;
use vm_superio::{I8042Device, Serial, Trigger};

use crate::lock;

/// COM1: the serial port's base and its legacy interrupt line.
pub const COM1: u16 = 0x3f8;
pub const COM1_GSI: u32 = 4;
/// The i8042's ports: data at 0x60, command and status at 0x64.
pub const I8042: u16 = 0x60;
/// The CMOS index and data ports.
pub const CMOS: u16 = 0x70;

/// The 8250 on COM1; its interrupt is the `IrqFd` itself (a `vm_superio::Trigger`).
pub struct Console<W: Write + Send>(Mutex<Serial<IrqFd, vm_superio::serial::NoEvents, W>>);

impl<W: Write + Send> Console<W> {
    pub fn new(irq: IrqFd, out: W) -> Self {
        Console(Mutex::new(Serial::new(irq, out)))
    }

    /// The port in a saved state (its interrupt raised again if the state has one pending).
    pub fn restore(
        irq: IrqFd,
        out: W,
        state: &vm_superio::serial::SerialState,
    ) -> Result<Self, String> {
        Serial::from_state(state, irq, vm_superio::serial::NoEvents, out)
            .map(|serial| Console(Mutex::new(serial)))
            .map_err(|e| format!("the serial port's saved state: {e:?}"))
    }

    /// Its registers and receive buffer, for a snapshot.
    pub fn state(&self) -> vm_superio::serial::SerialState {
        lock(&self.0).state()
    }
}

impl<W: Write + Send> DevicePio for Console<W> {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = lock(&self.0).read(offset as u8);
        }
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let Some(&b) = data.first() {
            if let Err(e) = lock(&self.0).write(offset as u8, b) {
                eprintln!("linux_vmm: serial write: {e:?}");
            }
        }
    }
}

/// The reset line of the keyboard controller: set when the guest asks for a CPU reset.
#[derive(Debug, Default, Clone)]
pub struct Reset(Arc<AtomicBool>);

impl Reset {
    pub fn requested(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

impl Trigger for Reset {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::Release);
        Ok(())
    }
}

/// vm-superio's i8042 over ports 0x60-0x64: 0xfe to the command port resets the machine.
///
/// Reads answer all ones, as an absent controller's floating bus does, not vm-superio's 0: Linux
/// probes the controller at boot, and a status of 0 makes it wait for a configuration byte that
/// never comes ("i8042: Can't read CTR while initializing i8042", 1.5 s of a 6 s boot in the TCG
/// L1), where all ones ends the probe at once ("No controller found"). The reset still works:
/// Linux's `reboot=k` writes the command whatever the probe found.
pub struct Keyboard(Mutex<I8042Device<Reset>>);

impl Keyboard {
    pub fn new(reset: Reset) -> Self {
        Keyboard(Mutex::new(I8042Device::new(reset)))
    }
}

impl DevicePio for Keyboard {
    fn pio_read(&self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let Some(&b) = data.first() {
            let _ = lock(&self.0).write(offset as u8, b);
        }
    }
}

/// A CMOS without an RTC: every register reads 0 (so "update in progress" is never set).
pub struct Cmos;

impl DevicePio for Cmos {
    fn pio_read(&self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&self, _base: PioAddress, _offset: PioAddressOffset, _data: &[u8]) {}
}
