//! The PCI MSI-X table, PBA and message control as bytes: what a guest's access reads and what
//! its write changes. Pure functions over plain values; the vector state machine applies the
//! result.

use crate::error::{Error, Result};
use crate::kvm::MsiMessage;

/// The most vectors an MSI-X capability can have (table size field of 11 bits).
pub(crate) const MSIX_MAX_VECTORS: usize = 2048;
/// Bytes per MSI-X table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Message control: MSI-X enable.
pub const MSIX_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: mask bit.
pub(crate) const MSIX_VECTOR_MASKED: u32 = 1;

/// One table entry's guest-visible fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub message: MsiMessage,
    pub masked: bool,
}

/// The size of a table of `count` vectors, in bytes.
pub(crate) fn table_len(count: usize) -> u64 {
    count as u64 * MSIX_ENTRY_SIZE
}

/// The size of the PBA of `count` vectors, in bytes (whole QWORDs).
pub(crate) fn pba_len(count: usize) -> u64 {
    (count as u64).div_ceil(64) * 8
}

/// Checks a guest access of `len` bytes at `offset` in a region of `size` bytes: 4 or 8 bytes,
/// naturally aligned, inside the region.
pub(crate) fn check_access(offset: u64, len: usize, size: u64) -> Result<()> {
    let fits = offset
        .checked_add(len as u64)
        .is_some_and(|end| end <= size);
    if (len == 4 || len == 8) && offset % len as u64 == 0 && fits {
        Ok(())
    } else {
        Err(Error::MsixAccess { offset, len, size })
    }
}

/// The vector a checked table access at `offset` falls in.
pub(crate) fn entry_index(offset: u64) -> usize {
    (offset / MSIX_ENTRY_SIZE) as usize
}

/// The entry's four dwords as the guest reads them; reserved bits read as 0.
fn dwords(e: &Entry) -> [u32; 4] {
    [
        e.message.address as u32 & !0x3,
        (e.message.address >> 32) as u32,
        e.message.data,
        if e.masked { MSIX_VECTOR_MASKED } else { 0 },
    ]
}

/// Fills `data` with a checked read at table `offset` of entry `e`.
pub(crate) fn read_entry(e: &Entry, offset: u64, data: &mut [u8]) {
    let words = dwords(e);
    let first = ((offset % MSIX_ENTRY_SIZE) / 4) as usize;
    for (i, chunk) in data.chunks_mut(4).enumerate() {
        chunk.copy_from_slice(&words[first + i].to_le_bytes());
    }
}

/// Entry `e` after a checked write of `data` at table `offset`. Writes to reserved bits
/// (address bits 0–1, vector control bits 1–31) are dropped.
pub(crate) fn write_entry(e: Entry, offset: u64, data: &[u8]) -> Entry {
    let mut out = e;
    let first = ((offset % MSIX_ENTRY_SIZE) / 4) as usize;
    for (i, chunk) in data.chunks(4).enumerate() {
        let mut b = [0u8; 4];
        b.copy_from_slice(chunk);
        let w = u32::from_le_bytes(b);
        let m = &mut out.message;
        match first + i {
            0 => m.address = (m.address & !0xffff_ffff) | u64::from(w & !0x3),
            1 => m.address = (m.address & 0xffff_ffff) | (u64::from(w) << 32),
            2 => m.data = w,
            _ => out.masked = w & MSIX_VECTOR_MASKED != 0,
        }
    }
    out
}

/// Fills `data` with a checked PBA read at `offset`: bit `n` of the PBA is `pending(n)` for the
/// `count` vectors, 0 past them.
pub(crate) fn read_pba(
    count: usize,
    offset: u64,
    data: &mut [u8],
    mut pending: impl FnMut(usize) -> Result<bool>,
) -> Result<()> {
    let first = (offset * 8) as usize;
    let mut bits = 0u64;
    for bit in 0..data.len() * 8 {
        let index = first + bit;
        if index < count && pending(index)? {
            bits |= 1 << bit;
        }
    }
    data.copy_from_slice(&bits.to_le_bytes()[..data.len()]);
    Ok(())
}

/// The capability's message control: enable (bit 15), function mask (bit 14), table size − 1
/// (bits 0–10).
pub(crate) fn message_control(count: usize, enabled: bool, function_masked: bool) -> u16 {
    let mut v = (count - 1) as u16;
    if enabled {
        v |= MSIX_ENABLE;
    }
    if function_masked {
        v |= MSIX_FUNCTION_MASK;
    }
    v
}

/// `(enabled, function_masked)` from a guest's write of message control; the table size is
/// read-only.
pub(crate) fn decode_message_control(value: u16) -> (bool, bool) {
    (value & MSIX_ENABLE != 0, value & MSIX_FUNCTION_MASK != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            message: MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x4041,
            },
            masked: true,
        }
    }

    #[test]
    fn accesses_are_4_or_8_bytes_aligned_and_inside() {
        assert!(check_access(0, 4, 32).is_ok());
        assert!(check_access(8, 8, 32).is_ok());
        assert!(check_access(28, 4, 32).is_ok());
        for (offset, len) in [
            (0, 2),
            (0, 1),
            (2, 4),
            (4, 8),
            (32, 4),
            (28, 8),
            (u64::MAX, 4),
        ] {
            assert!(
                matches!(
                    check_access(offset, len, 32),
                    Err(Error::MsixAccess { size: 32, .. })
                ),
                "{offset:#x}+{len}"
            );
        }
    }

    #[test]
    fn entry_reads_dword_by_dword_and_as_qwords() {
        let e = entry();
        let mut d = [0u8; 4];
        let expect = [0xfee0_1000u32, 1, 0x4041, 1];
        for (i, want) in expect.into_iter().enumerate() {
            read_entry(&e, 16 + 4 * i as u64, &mut d);
            assert_eq!(u32::from_le_bytes(d), want, "dword {i}");
        }
        let mut q = [0u8; 8];
        read_entry(&e, 8, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1_0000_4041);
        // Reserved address bits read as 0.
        let odd = Entry {
            message: MsiMessage {
                address: 0xfee0_0003,
                data: 0,
            },
            masked: false,
        };
        read_entry(&odd, 0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xfee0_0000);
    }

    #[test]
    fn writes_change_one_field_and_drop_reserved_bits() {
        let e = entry();
        let w = write_entry(e, 0, &0xfee0_2003u32.to_le_bytes());
        assert_eq!(
            w.message.address, 0x1_fee0_2000,
            "low dword, bits 0-1 dropped"
        );
        assert_eq!((w.message.data, w.masked), (0x4041, true));
        let w = write_entry(e, 4, &0u32.to_le_bytes());
        assert_eq!(w.message.address, 0xfee0_1000);
        let w = write_entry(e, 8, &0x4242u32.to_le_bytes());
        assert_eq!(w.message.data, 0x4242);
        let w = write_entry(e, 12, &0xffff_fffeu32.to_le_bytes());
        assert!(!w.masked, "only bit 0 of vector control is writable");
        // One 8-byte write of data and vector control.
        let w = write_entry(e, 8, &0x0000_0000_0000_4343u64.to_le_bytes());
        assert_eq!((w.message.data, w.masked), (0x4343, false));
        // Read after write returns what was written (reserved bits aside).
        let mut q = [0u8; 8];
        read_entry(&w, 8, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x4343);
    }

    #[test]
    fn pba_bits_follow_pending_and_stop_at_count() {
        let mut d = [0u8; 8];
        read_pba(70, 0, &mut d, |i| Ok(i % 3 == 0)).unwrap();
        let bits = u64::from_le_bytes(d);
        assert_eq!(
            bits,
            (0..64).filter(|i| i % 3 == 0).fold(0, |b, i| b | 1 << i)
        );
        // The second QWORD holds vectors 64..70; bits past 70 read 0.
        read_pba(70, 8, &mut d, |_| Ok(true)).unwrap();
        assert_eq!(u64::from_le_bytes(d), 0x3f);
        let mut hi = [0u8; 4];
        read_pba(70, 12, &mut hi, |_| Ok(true)).unwrap();
        assert_eq!(u32::from_le_bytes(hi), 0);
        assert_eq!(pba_len(70), 16);
        assert_eq!(pba_len(64), 8);
        assert_eq!(table_len(70), 70 * 16);
    }

    #[test]
    fn message_control_round_trips() {
        assert_eq!(message_control(1, false, false), 0);
        assert_eq!(
            message_control(2048, true, true),
            0x7ff | MSIX_ENABLE | MSIX_FUNCTION_MASK
        );
        assert_eq!(decode_message_control(MSIX_ENABLE | 0x7ff), (true, false));
        assert_eq!(decode_message_control(MSIX_FUNCTION_MASK), (false, true));
    }
}
