//! The ACPI tables Linux finds the machine in: RSDP, XSDT, a hardware-reduced FADT, a DSDT
//! declaring COM1 and the PCI host bridge (with its functions' INTx routing), and a MADT with a local APIC per vCPU and the IOAPIC.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::legacy::{COM1, COM1_GSI};
use crate::pci;
use crate::Error;

/// Where the ACPI tables go (the BIOS area Linux would scan; the zero page points at the RSDP).
const ACPI_TABLES: u64 = 0xe_0000;
const IOAPIC_ADDRESS: u32 = 0xfec0_0000;
const LAPIC_ADDRESS: u32 = 0xfee0_0000;

/// Writes RSDP, XSDT, a hardware-reduced FADT with a DSDT (COM1, the PCI host bridge, and a
/// virtio-mmio device per `mmio` window and IOAPIC pin), and a MADT naming `vcpus` local APICs
/// (APIC IDs 0 to `vcpus - 1`) and the IOAPIC; returns the RSDP's address.
pub fn write(mem: &GuestMemoryMmap, vcpus: u8, mmio: &[(u64, u32)]) -> Result<u64, Error> {
    use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic};
    use acpi_tables::{aml, fadt, madt, rsdp, sdt, xsdt, Aml};
    const OEM: [u8; 6] = *b"VMNTFY";
    const TABLE: [u8; 8] = *b"LINUXVMM";
    let bytes = |table: &dyn Aml| {
        let mut v = Vec::new();
        table.to_aml_bytes(&mut v);
        v
    };
    let mut at = ACPI_TABLES + 0x40; // the RSDP first
    let mut place = |data: Vec<u8>| -> Result<u64, Error> {
        let here = at;
        mem.write_slice(&data, GuestAddress(here))?;
        at = (here + data.len() as u64 + 7) & !7;
        Ok(here)
    };
    // The DSDT declares COM1 (with a hardware-reduced FADT Linux sets up no legacy IRQs, so the
    // serial port's interrupt comes from here).
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let irq = aml::Interrupt::new(true, true, false, false, COM1_GSI);
    let ports = aml::IO::new(COM1, COM1, 1, 8);
    let crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![&irq, &ports]),
    );
    let com1 = aml::Device::new("_SB_.COM1".into(), vec![&hid, &uid, &crs]);
    // The PCI host bridge: bus 0, config ports 0xcf8-0xcff, the I/O ports around them, and the
    // MMIO window the virtio-pci BAR sits in.
    let pci_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A03"));
    let pci_adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let pci_seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let pci_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let pci_bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let config_ports = aml::IO::new(pci::CONFIG_ADDRESS, pci::CONFIG_ADDRESS, 1, 8);
    let io_low = aml::AddressSpace::new_io(0u16, 0xcf7u16, None);
    let io_high = aml::AddressSpace::new_io(0xd00u16, 0xffffu16, None);
    let window = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        pci::MMIO_WINDOW.0,
        pci::MMIO_WINDOW.1,
        None,
    );
    let pci_res = aml::ResourceTemplate::new(vec![&bus, &config_ports, &io_low, &io_high, &window]);
    let pci_crs = aml::Name::new("_CRS".into(), &pci_res);
    // Where each function's INTx pin goes (`_PRT`): device n's INTA# to its own IOAPIC pin
    // (a GSI, so the source is 0), which Linux programs level-triggered, active-low.
    let routes: Vec<(u32, u32)> = (1..=pci::INTX_DEVICES)
        .map(|device| ((u32::from(device) << 16) | 0xffff, pci::intx_gsi(device)))
        .collect();
    let pin: u8 = 0; // INTA#
    let entries: Vec<aml::Package> = routes
        .iter()
        .map(|(address, gsi)| aml::Package::new(vec![address, &pin, &aml::ZERO, gsi]))
        .collect();
    let prt = aml::Package::new(entries.iter().map(|e| e as &dyn Aml).collect());
    let pci_prt = aml::Name::new("_PRT".into(), &prt);
    let pci0 = aml::Device::new(
        "_SB_.PCI0".into(),
        vec![
            &pci_hid, &pci_adr, &pci_seg, &pci_uid, &pci_bbn, &pci_crs, &pci_prt,
        ],
    );
    let mut dsdt = sdt::Sdt::new(*b"DSDT", 36, 6, OEM, TABLE, 1);
    dsdt.append_slice(&bytes(&com1));
    dsdt.append_slice(&bytes(&pci0));
    // virtio-mmio devices, as Linux's virtio_mmio driver finds them: _HID LNRO0005, the register
    // window and a level-triggered, active-high interrupt on the IOAPIC pin.
    for (i, &(base, gsi)) in mmio.iter().enumerate() {
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid = aml::Name::new("_UID".into(), &(i as u32));
        let window = aml::Memory32Fixed::new(true, base as u32, crate::virtio_mmio::WINDOW as u32);
        let irq = aml::Interrupt::new(true, false, false, false, gsi);
        let crs = aml::Name::new(
            "_CRS".into(),
            &aml::ResourceTemplate::new(vec![&window, &irq]),
        );
        let dev = aml::Device::new(
            format!("_SB_.VR{i:02}").as_str().into(),
            vec![&hid, &uid, &crs],
        );
        dsdt.append_slice(&bytes(&dev));
    }
    let dsdt = place(dsdt.as_slice().to_vec())?;
    let fadt = fadt::FADTBuilder::new(OEM, TABLE, 1)
        .flag(fadt::Flags::HwReducedAcpi)
        .dsdt_64(dsdt)
        .finalize();
    let fadt = place(bytes(&fadt))?;
    let mut madt = madt::MADT::new(
        OEM,
        TABLE,
        1,
        LocalInterruptController::Address(LAPIC_ADDRESS),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDRESS, 0));
    // MADT flags bit 0, PCAT_COMPAT: the dual 8259s are there too, so Linux maps the ISA IRQs
    // (the serial port's 4) one to one onto IOAPIC pins. The crate has no setter for the flags:
    // set the bit in the bytes and take it out of the checksum.
    let mut madt = bytes(&madt);
    madt[40] |= 1;
    madt[9] = madt[9].wrapping_sub(1);
    let madt = place(madt)?;
    let mut xsdt = xsdt::XSDT::new(OEM, TABLE, 1);
    xsdt.add_entry(fadt);
    xsdt.add_entry(madt);
    let xsdt = place(bytes(&xsdt))?;
    mem.write_slice(
        &bytes(&rsdp::Rsdp::new(OEM, xsdt)),
        GuestAddress(ACPI_TABLES),
    )?;
    Ok(ACPI_TABLES)
}
