//! The IOAPIC's registers and pin logic, with no KVM: the register window a guest programs,
//! redirection entries, the interrupt request latch of edge pins and the remote IRR of level
//! pins. Every method returns what must be delivered; [`Ioapic`](super::Ioapic) delivers it.

use crate::kvm::MsiMessage;

/// The IOAPIC's pins (its redirection entries).
pub(crate) const IOAPIC_PINS: usize = 24;

/// Where the IOAPIC's registers sit in guest-physical memory on a PC.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;

/// The size of the IOAPIC's MMIO window: IOREGSEL at 0x00, IOWIN at 0x10.
pub const IOAPIC_SIZE: u64 = 0x20;

/// Offset of the register select (IOREGSEL).
const IOREGSEL: u64 = 0x00;
/// Offset of the register window (IOWIN).
const IOWIN: u64 = 0x10;

const REG_ID: u8 = 0x00;
const REG_VERSION: u8 = 0x01;
const REG_ARBITRATION: u8 = 0x02;
const REG_TABLE: u8 = 0x10;

/// Version 0x11 (an 82093AA: no EOI register) with 24 entries (maximum entry 23 in bits 16–23).
const VERSION: u32 = 0x11 | ((IOAPIC_PINS as u32 - 1) << 16);

/// A redirection entry's bits (low dword, then the destination in bits 56–63).
const VECTOR: u64 = 0xff;
const DELIVERY_MODE: u64 = 0x7 << 8;
const DEST_LOGICAL: u64 = 1 << 11;
const DELIVERY_STATUS: u64 = 1 << 12;
const REMOTE_IRR: u64 = 1 << 14;
const LEVEL: u64 = 1 << 15;
const MASKED: u64 = 1 << 16;
/// Bits the guest writes; delivery status and remote IRR are the IOAPIC's.
const WRITABLE: u64 = !(DELIVERY_STATUS | REMOTE_IRR);

/// A redirection entry, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Redirection(pub u64);

impl Redirection {
    /// The vector delivered.
    pub fn vector(self) -> u8 {
        (self.0 & VECTOR) as u8
    }

    /// Level-triggered (else edge).
    pub fn level(self) -> bool {
        self.0 & LEVEL != 0
    }

    /// Masked.
    pub fn masked(self) -> bool {
        self.0 & MASKED != 0
    }

    /// A level interrupt delivered and not yet EOIed.
    pub fn remote_irr(self) -> bool {
        self.0 & REMOTE_IRR != 0
    }

    /// The destination: an APIC ID (physical mode) or a logical destination.
    pub fn destination(self) -> u8 {
        (self.0 >> 56) as u8
    }

    /// The MSI this entry sends: destination and destination mode in the address, vector,
    /// delivery mode and trigger mode in the data (the translation an interrupt remapping-less
    /// PC does, as KVM's in-kernel IOAPIC does).
    pub fn message(self) -> MsiMessage {
        let logical = if self.0 & DEST_LOGICAL != 0 {
            1 << 2
        } else {
            0
        };
        let level = if self.level() {
            (1 << 15) | (1 << 14)
        } else {
            1 << 14
        };
        MsiMessage {
            address: 0xfee0_0000 | (u64::from(self.destination()) << 12) | logical,
            data: (self.0 & (VECTOR | DELIVERY_MODE)) as u32 | level,
        }
    }
}

/// The IOAPIC's state as a guest and its devices see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Registers {
    select: u8,
    id: u32,
    entries: [u64; IOAPIC_PINS],
    /// Edge pins: an edge seen while masked, delivered at unmask.
    latched: u32,
    /// Level pins: the line is asserted.
    lines: u32,
    /// Pins whose deliveries are held while KVM's route for them changes.
    held: u32,
    /// Held level entries: a pulse seen during the hold, made at its release.
    pulsed: u32,
}

impl Default for Registers {
    fn default() -> Self {
        Registers {
            select: 0,
            id: 0,
            // Every entry starts masked, as after reset.
            entries: [MASKED; IOAPIC_PINS],
            latched: 0,
            lines: 0,
            held: 0,
            pulsed: 0,
        }
    }
}

/// The IOAPIC's state, for a snapshot or a migration: what the guest programmed (the ID, the
/// register select, every redirection entry with its remote IRR) and what waits on the pins
/// (edges latched while masked, level lines asserted). [`Ioapic::save`](super::Ioapic::save)
/// takes it, [`Ioapic::restore`](super::Ioapic::restore) puts it on a fresh IOAPIC.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct IoapicState {
    /// The IOAPIC ID register (the ID in bits 24–27).
    pub id: u32,
    /// IOREGSEL: the register the guest selected last.
    pub select: u8,
    /// The redirection entries, pin 0 first (24 of them), remote IRR included.
    pub entries: Vec<u64>,
    /// Edge pins with an edge latched while masked (bit per pin).
    pub latched: u32,
    /// Level lines asserted (bit per pin).
    pub lines: u32,
}

/// What a register write changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Written {
    /// Nothing a route or a delivery depends on.
    Nothing,
    /// Redirection entry `pin`: its route may have changed, and an interrupt waiting on it may
    /// now be delivered.
    Entry(usize),
}

impl Registers {
    /// The state a snapshot keeps (with nothing held: see [`Ioapic::save`](super::Ioapic::save)).
    pub(crate) fn save(&self) -> IoapicState {
        IoapicState {
            id: self.id,
            select: self.select,
            entries: self.entries.to_vec(),
            latched: self.latched,
            lines: self.lines,
        }
    }

    /// The registers `state` saved, or what does not fit: the entry count, a remote IRR on an
    /// edge entry, bits of pins past the last.
    pub(crate) fn restored(state: &IoapicState) -> std::result::Result<Registers, String> {
        let entries: [u64; IOAPIC_PINS] = state.entries.as_slice().try_into().map_err(|_| {
            format!(
                "{} IOAPIC redirection entries, expected {IOAPIC_PINS}",
                state.entries.len()
            )
        })?;
        if let Some(pin) = (0..IOAPIC_PINS)
            .find(|&pin| entries[pin] & REMOTE_IRR != 0 && entries[pin] & LEVEL == 0)
        {
            return Err(format!("IOAPIC pin {pin}: remote IRR on an edge entry"));
        }
        let pins = (1u32 << IOAPIC_PINS) - 1;
        if (state.latched | state.lines) & !pins != 0 || state.id & !0x0f00_0000 != 0 {
            return Err(format!(
                "IOAPIC bits past its {IOAPIC_PINS} pins or its ID: latched {:#x}, lines {:#x}, id {:#x}",
                state.latched, state.lines, state.id
            ));
        }
        Ok(Registers {
            select: state.select,
            id: state.id,
            entries,
            latched: state.latched,
            lines: state.lines,
            held: 0,
            pulsed: 0,
        })
    }

    /// Redirection entry `pin`.
    pub(crate) fn entry(&self, pin: usize) -> Redirection {
        Redirection(self.entries[pin])
    }

    /// Whether the line of `pin` is asserted.
    pub(crate) fn line(&self, pin: usize) -> bool {
        self.lines & (1 << pin) != 0
    }

    /// Whether an edge on `pin` waits for its unmask.
    pub(crate) fn latched(&self, pin: usize) -> bool {
        self.latched & (1 << pin) != 0
    }

    /// Whether `pin`'s deliveries are held.
    fn is_held(&self, pin: usize) -> bool {
        self.held & (1 << pin) != 0
    }

    /// Holds `pin`'s deliveries while KVM's route for it changes: nothing is delivered until
    /// [`release`](Self::release), and nothing is lost meanwhile (edges latch, lines stay
    /// asserted, a pulse on a level entry is kept).
    pub(crate) fn hold(&mut self, pin: usize) {
        self.held |= 1 << pin;
    }

    /// Ends `pin`'s hold. Returns the message for what waited: a pulse kept, a latched edge, or
    /// a level line asserted, as the entry now lets them through.
    pub(crate) fn release(&mut self, pin: usize) -> Option<MsiMessage> {
        self.held &= !(1 << pin);
        if self.pulsed & (1 << pin) != 0 {
            self.pulsed &= !(1 << pin);
            if let Some(msg) = self.pulse(pin) {
                return Some(msg);
            }
        }
        self.service(pin)
    }

    /// The register IOREGSEL selects.
    fn read_register(&self) -> u32 {
        match self.select {
            REG_ID => self.id,
            REG_VERSION => VERSION,
            REG_ARBITRATION => self.id,
            r if r >= REG_TABLE && usize::from(r - REG_TABLE) < 2 * IOAPIC_PINS => {
                let n = usize::from(r - REG_TABLE);
                let entry = self.entries[n / 2];
                if n % 2 == 0 {
                    entry as u32
                } else {
                    (entry >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    /// A guest read at `offset` in the MMIO window; `data` is filled (little-endian). Reads of
    /// anything but the two registers return zeros.
    pub(crate) fn read(&self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            IOREGSEL => u32::from(self.select),
            IOWIN => self.read_register(),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    /// A guest write at `offset` in the MMIO window (little-endian `data`, 1 to 8 bytes; the
    /// registers are 32 bits wide and take the low four).
    pub(crate) fn write(&mut self, offset: u64, data: &[u8]) -> Written {
        let mut buf = [0u8; 4];
        let n = data.len().min(4);
        buf[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(buf);
        match offset {
            IOREGSEL => {
                self.select = value as u8;
                Written::Nothing
            }
            IOWIN => self.write_register(value),
            _ => Written::Nothing,
        }
    }

    fn write_register(&mut self, value: u32) -> Written {
        match self.select {
            REG_ID => {
                // The APIC ID is bits 24–27.
                self.id = value & 0x0f00_0000;
                Written::Nothing
            }
            r if r >= REG_TABLE && usize::from(r - REG_TABLE) < 2 * IOAPIC_PINS => {
                let n = usize::from(r - REG_TABLE);
                let pin = n / 2;
                let old = self.entries[pin];
                let new = if n % 2 == 0 {
                    (old & !0xffff_ffff) | u64::from(value)
                } else {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                };
                self.entries[pin] = (new & WRITABLE) | (old & !WRITABLE);
                if !Redirection(self.entries[pin]).level() {
                    // An edge pin has no remote IRR.
                    self.entries[pin] &= !REMOTE_IRR;
                }
                Written::Entry(pin)
            }
            _ => Written::Nothing,
        }
    }

    /// Delivers what waits on `pin` if its entry now lets it (and it is not held): a latched
    /// edge, or an asserted level line with no remote IRR. Returns the message to send.
    pub(crate) fn service(&mut self, pin: usize) -> Option<MsiMessage> {
        let e = self.entry(pin);
        if e.masked() || self.is_held(pin) {
            return None;
        }
        if e.level() {
            if self.line(pin) && !e.remote_irr() {
                self.entries[pin] |= REMOTE_IRR;
                return Some(e.message());
            }
            None
        } else if self.latched(pin) {
            self.latched &= !(1 << pin);
            Some(e.message())
        } else {
            None
        }
    }

    /// Sets the line of `pin` (the OR of its level sources). Returns the message to send: on a
    /// level entry when the line is asserted, unmasked and not awaiting an EOI; on an edge entry
    /// at a rising edge (latched instead while masked).
    pub(crate) fn set_line(&mut self, pin: usize, high: bool) -> Option<MsiMessage> {
        let was = self.line(pin);
        if high {
            self.lines |= 1 << pin;
        } else {
            self.lines &= !(1 << pin);
        }
        let e = self.entry(pin);
        if e.level() {
            return if high { self.service(pin) } else { None };
        }
        if high && !was {
            self.latched |= 1 << pin;
            return self.service(pin);
        }
        None
    }

    /// One edge on `pin` from an edge source (the line itself does not stay up). On an edge
    /// entry it is delivered, or latched while masked; on a level entry it is delivered as a
    /// line raised and lowered at once, if the entry is unmasked and not awaiting an EOI.
    pub(crate) fn pulse(&mut self, pin: usize) -> Option<MsiMessage> {
        let e = self.entry(pin);
        if e.level() {
            if e.masked() || e.remote_irr() {
                return None;
            }
            if self.is_held(pin) {
                self.pulsed |= 1 << pin;
                return None;
            }
            self.entries[pin] |= REMOTE_IRR;
            return Some(e.message());
        }
        self.latched |= 1 << pin;
        self.service(pin)
    }

    /// The guest's local APIC took an EOI for `vector`: clears the remote IRR of each level
    /// entry with that vector and returns those pins, whose lines the caller then resamples.
    pub(crate) fn end_of_interrupt(&mut self, vector: u8) -> Vec<usize> {
        (0..IOAPIC_PINS)
            .filter(|&pin| {
                let e = self.entry(pin);
                let hit = e.level() && e.remote_irr() && e.vector() == vector;
                if hit {
                    self.entries[pin] &= !REMOTE_IRR;
                }
                hit
            })
            .collect()
    }

    /// A level interrupt on `pin` that no local APIC took: it awaits no EOI (KVM's IOAPIC sets
    /// remote IRR only for an interrupt delivered), so the line is served again at the next
    /// change.
    pub(crate) fn not_taken(&mut self, pin: usize) {
        self.entries[pin] &= !REMOTE_IRR;
    }

    /// The edge entries that deliver `vector`: an EOI of it acknowledges them too, which a level
    /// source on such a pin (a resample irqfd on an edge-programmed pin) is told of, as KVM's
    /// IOAPIC tells a pin's ack notifiers whatever its trigger mode.
    pub(crate) fn edge_pins(&self, vector: u8) -> Vec<usize> {
        (0..IOAPIC_PINS)
            .filter(|&pin| {
                let e = self.entry(pin);
                !e.level() && e.vector() == vector
            })
            .collect()
    }

    /// The route KVM must have for `pin` on the split irqchip so that it reports the EOIs of the
    /// pin's vector: the entry's message marked level-triggered, for a level entry or when
    /// `resampled` (level sources wait for the pin's EOIs); none otherwise (an edge pin's EOIs
    /// need not exit).
    pub(crate) fn route(&self, pin: usize, resampled: bool) -> Option<MsiMessage> {
        let e = self.entry(pin);
        (e.level() || resampled).then(|| Redirection(e.0 | LEVEL).message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(r: &mut Registers, reg: u8) {
        assert_eq!(r.write(IOREGSEL, &[reg]), Written::Nothing);
    }

    fn program(r: &mut Registers, pin: usize, low: u32, dest: u8) {
        select(r, REG_TABLE + 2 * pin as u8 + 1);
        r.write(IOWIN, &(u32::from(dest) << 24).to_le_bytes());
        select(r, REG_TABLE + 2 * pin as u8);
        assert_eq!(r.write(IOWIN, &low.to_le_bytes()), Written::Entry(pin));
    }

    fn read(r: &Registers, reg: u8) -> u32 {
        let mut r = r.clone();
        select(&mut r, reg);
        let mut data = [0u8; 4];
        r.read(IOWIN, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn registers_read_back() {
        let mut r = Registers::default();
        assert_eq!(read(&r, REG_VERSION), 0x0017_0011);
        assert_eq!(read(&r, REG_TABLE), MASKED as u32, "reset: masked");
        program(&mut r, 10, 0x3a | (1 << 15), 3);
        assert_eq!(read(&r, REG_TABLE + 20), 0x3a | (1 << 15));
        assert_eq!(read(&r, REG_TABLE + 21), 3 << 24);
        let mut sel = [0u8; 4];
        r.read(IOREGSEL, &mut sel);
        assert_eq!(sel[0], REG_TABLE + 20);
        select(&mut r, REG_ID);
        r.write(IOWIN, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(read(&r, REG_ID), 0x0f00_0000);
        assert_eq!(read(&r, 0x7f), 0, "past the table");
    }

    #[test]
    fn messages_carry_destination_vector_and_trigger() {
        let level = Redirection(0x3a | LEVEL | (5u64 << 56));
        assert_eq!(
            level.message(),
            MsiMessage {
                address: 0xfee0_5000,
                data: 0x3a | (1 << 14) | (1 << 15)
            }
        );
        let logical_lowest = Redirection(0x41 | (1 << 8) | DEST_LOGICAL | (0x0fu64 << 56));
        assert_eq!(
            logical_lowest.message(),
            MsiMessage {
                address: 0xfee0_f004,
                data: 0x141 | (1 << 14)
            }
        );
    }

    #[test]
    fn level_pin_delivers_once_until_eoi() {
        let mut r = Registers::default();
        program(&mut r, 10, 0x3a | (1 << 15), 0);
        assert!(r.set_line(10, true).is_some());
        assert!(r.entry(10).remote_irr());
        // Asserted again before the EOI: nothing more.
        assert!(r.set_line(10, true).is_none());
        assert_eq!(
            r.end_of_interrupt(0x3b),
            Vec::<usize>::new(),
            "other vector"
        );
        assert_eq!(r.end_of_interrupt(0x3a), vec![10]);
        assert!(!r.entry(10).remote_irr());
        // Still asserted: the caller resamples (lowers) or services again.
        assert!(r.service(10).is_some());
        assert_eq!(r.end_of_interrupt(0x3a), vec![10]);
        assert!(r.set_line(10, false).is_none());
        assert!(r.service(10).is_none());
        // The guest cannot write remote IRR.
        program(&mut r, 10, 0x3a | (1 << 15) | (1 << 14), 0);
        assert!(!r.entry(10).remote_irr());
    }

    #[test]
    fn masked_pins_wait_for_unmask() {
        let mut r = Registers::default();
        program(&mut r, 4, 0x24 | (1 << 16), 0);
        assert!(r.pulse(4).is_none());
        assert!(r.pulse(4).is_none(), "two edges while masked latch as one");
        program(&mut r, 4, 0x24, 0);
        assert!(r.service(4).is_some(), "the latched edge, once");
        assert!(r.service(4).is_none());

        program(&mut r, 10, 0x3a | (1 << 15) | (1 << 16), 0);
        assert!(r.set_line(10, true).is_none());
        program(&mut r, 10, 0x3a | (1 << 15), 0);
        assert!(r.service(10).is_some(), "a held level line at unmask");
        // Lowered while masked: nothing at unmask.
        program(&mut r, 11, 0x3b | (1 << 15) | (1 << 16), 0);
        r.set_line(11, true);
        r.set_line(11, false);
        program(&mut r, 11, 0x3b | (1 << 15), 0);
        assert!(r.service(11).is_none());
    }

    #[test]
    fn edge_entries_deliver_rising_edges_and_pulses() {
        let mut r = Registers::default();
        program(&mut r, 3, 0x23, 1);
        assert_eq!(
            r.pulse(3),
            Some(MsiMessage {
                address: 0xfee0_1000,
                data: 0x23 | (1 << 14)
            })
        );
        assert!(r.pulse(3).is_some(), "each pulse an edge");
        assert!(r.set_line(3, true).is_some(), "rising edge");
        assert!(r.set_line(3, true).is_none(), "no edge while high");
        assert!(
            !r.entry(3).remote_irr(),
            "edge entries never set remote IRR"
        );
        assert!(r.end_of_interrupt(0x23).is_empty());
        assert_eq!(r.route(3, false), None, "no EOI report for an edge entry");
        let reported = r.route(3, true).unwrap();
        assert_eq!(
            reported.data,
            0x23 | (1 << 14) | (1 << 15),
            "marked level for KVM"
        );
        assert_eq!(r.edge_pins(0x23), vec![3]);
        program(&mut r, 3, 0x23 | (1 << 15), 1);
        assert_eq!(r.route(3, false), Some(r.entry(3).message()));
        assert!(r.edge_pins(0x23).is_empty());
    }

    #[test]
    fn a_held_pin_delivers_what_waited_at_release() {
        let mut r = Registers::default();
        program(&mut r, 2, 0x22, 0);
        r.hold(2);
        assert!(r.pulse(2).is_none());
        assert!(r.pulse(2).is_none(), "two edges held deliver as one");
        assert!(r.release(2).is_some(), "the latched edge");
        assert!(r.release(2).is_none(), "once");

        program(&mut r, 9, 0x39 | (1 << 15), 0);
        r.hold(9);
        assert!(r.pulse(9).is_none());
        assert!(!r.entry(9).remote_irr(), "nothing delivered while held");
        assert!(r.release(9).is_some(), "the pulse kept");
        assert!(r.entry(9).remote_irr());
        assert_eq!(r.end_of_interrupt(0x39), vec![9]);
        assert!(r.release(9).is_none(), "a pulse leaves the line low");

        r.hold(9);
        assert!(r.set_line(9, true).is_none());
        program(&mut r, 9, 0x3a | (1 << 15), 0);
        assert!(r.service(9).is_none(), "an entry written while held");
        let msg = r.release(9).expect("the line held");
        assert_eq!(msg.data & 0xff, 0x3a, "as the entry now says");

        // Masked meanwhile: a pulse on a masked level entry is lost, as without the hold.
        program(&mut r, 11, 0x3b | (1 << 15), 0);
        r.hold(11);
        assert!(r.pulse(11).is_none());
        program(&mut r, 11, 0x3b | (1 << 15) | (1 << 16), 0);
        assert!(r.release(11).is_none());
        program(&mut r, 11, 0x3b | (1 << 15), 0);
        assert!(r.service(11).is_none());
    }

    #[test]
    fn pulse_on_a_level_entry_waits_for_eoi() {
        let mut r = Registers::default();
        program(&mut r, 9, 0x39 | (1 << 15), 0);
        assert!(r.pulse(9).is_some());
        assert!(r.pulse(9).is_none(), "remote IRR set");
        assert_eq!(r.end_of_interrupt(0x39), vec![9]);
        assert!(r.service(9).is_none(), "a pulse leaves the line low");
        assert!(r.pulse(9).is_some());
    }

    #[test]
    fn saved_state_restores_what_waits_and_what_awaits_an_eoi() {
        let mut r = Registers::default();
        // Pin 4 level, delivered and awaiting its EOI; pin 6 edge, masked with an edge latched;
        // pin 8 level, masked with its line held.
        program(&mut r, 4, 0x34 | LEVEL as u32, 1);
        assert!(r.set_line(4, true).is_some());
        program(&mut r, 6, 0x36 | MASKED as u32, 0);
        assert!(r.pulse(6).is_none());
        program(&mut r, 8, 0x38 | (LEVEL | MASKED) as u32, 0);
        assert!(r.set_line(8, true).is_none());
        let saved = r.save();
        let mut back = Registers::restored(&saved).unwrap();
        assert_eq!(back, r);
        assert!(back.pulse(4).is_none(), "pin 4 still awaits its EOI");
        assert_eq!(back.end_of_interrupt(0x34), vec![4]);
        program(&mut back, 6, 0x36, 0);
        assert_eq!(back.service(6).map(|m| m.data & 0xff), Some(0x36));
        program(&mut back, 8, 0x38 | LEVEL as u32, 0);
        assert_eq!(back.service(8).map(|m| m.data & 0xff), Some(0x38));
    }
}
