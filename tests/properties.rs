//! No panics on bad input: arbitrary values at the public constructors and registration calls,
//! each returning `Ok` or a typed error, and leaving nothing registered when it fails. The
//! registrations run against one real VM per property.

use std::sync::OnceLock;

use proptest::prelude::*;
use vm_device::bus::MmioAddress;
use vm_device::DeviceMmio;
use vm_notify::io::IoRegion;
use vm_notify::kvm::{IoEventAddress, MsiMessage, GSI_LIMIT};
use vm_notify::{Error, Mode, Notifier, Width, WriteMatch};
use vm_notify_testkit::{kvm_or_skip, TinyVm};

const CASES: u32 = 512;

fn width() -> impl Strategy<Value = Width> {
    prop_oneof![
        Just(Width::Any),
        Just(Width::W1),
        Just(Width::W2),
        Just(Width::W4),
        Just(Width::W8)
    ]
}

/// Addresses near the interesting edges, and anywhere.
fn address() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..0x1_0010,
        0xfff0u64..0x1_0008,
        (u64::MAX - 16)..=u64::MAX,
        any::<u64>(),
        Just(0xd000_0000u64)
    ]
}

fn write_match() -> impl Strategy<Value = WriteMatch> {
    (
        any::<bool>(),
        address(),
        width(),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(pio, addr, w, dm)| {
            let m = if pio {
                WriteMatch::pio(addr)
            } else {
                WriteMatch::mmio(addr)
            }
            .width(w);
            match dm {
                Some(v) => m.datamatch(v),
                None => m,
            }
        })
}

/// What a registration may be, stated independently of `validate`: KVM's own rules, plus one
/// of ours that is stricter than the kernel (a port range must end by 0x10000: KVM would take a
/// 4-byte match at port 0xfffd, but no port write can reach past the last port).
fn acceptable(m: &WriteMatch) -> bool {
    let len = u64::from(m.write_width().bytes());
    let (pio, addr) = match m.address() {
        IoEventAddress::Pio(p) => (true, p),
        IoEventAddress::Mmio(a) => (false, a),
    };
    let fits = match (m.data(), len) {
        (None, _) => true,
        (Some(_), 0) => false,
        (Some(_), 8) => true,
        (Some(v), l) => v >> (8 * l) == 0,
    };
    // KVM's own check: the range's end, addr + len, must not wrap (an any-width match has
    // length 0, so it may sit at the very last address).
    let end = addr.checked_add(len);
    let port_ok = !pio || (addr <= 0xffff && len != 8 && end.is_some_and(|e| e <= 0x1_0000));
    fits && end.is_some() && port_ok
}

fn vm() -> Option<&'static TinyVm> {
    static VM: OnceLock<Option<TinyVm>> = OnceLock::new();
    VM.get_or_init(|| kvm_or_skip("properties").then(|| TinyVm::new().unwrap()))
        .as_ref()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn validation_is_total_and_matches_the_kernel_rules(m in write_match()) {
        let r = m.validate();
        prop_assert_eq!(r.is_ok(), acceptable(&m), "{:?}: {:?}", m, r);
    }

    #[test]
    fn notifier_adds_are_total(values in proptest::collection::vec(any::<u64>(), 1..8)) {
        let n = Notifier::new(Mode::Counter).unwrap();
        for v in values {
            match n.try_add(v) {
                Ok(_) => {}
                Err(Error::NotifierValue { value }) => prop_assert_eq!(value, u64::MAX),
                Err(e) => prop_assert!(false, "{e}"),
            }
        }
    }

    #[test]
    fn registrations_are_ok_or_typed_and_leave_nothing_when_refused(m in write_match()) {
        let Some(vm) = vm() else { return Ok(()) };
        let n = Notifier::new(Mode::Counter).unwrap();
        match vm.notify().ioevent(m, &n) {
            Ok(_reg) => prop_assert!(acceptable(&m), "{:?} registered", m),
            Err(e) => {
                prop_assert!(!acceptable(&m) || matches!(e, Error::IoEventExists { .. }), "{:?}: {}", m, e);
            }
        }
        // Dropped (or never made): the same match registers again when it is valid.
        if acceptable(&m) {
            prop_assert!(vm.notify().ioevent(m, &n).is_ok());
        }
    }

    #[test]
    fn irqfds_on_any_gsi_are_ok_or_typed(gsi in prop_oneof![0u32..64, any::<u32>()]) {
        let Some(vm) = vm() else { return Ok(()) };
        let n = Notifier::new(Mode::Counter).unwrap();
        match vm.notify().irqfd_with(gsi, &n) {
            Ok(irq) => prop_assert!(gsi < GSI_LIMIT && !vm.router().routes(gsi).is_empty(), "{:?}", irq),
            Err(Error::GsiOutOfRange { .. }) => prop_assert!(gsi >= GSI_LIMIT),
            Err(Error::UnroutedGsi { .. }) => prop_assert!(vm.router().routes(gsi).is_empty()),
            Err(e) => prop_assert!(false, "GSI {gsi}: {e}"),
        }
        prop_assert_eq!(vm.router().irqfds(gsi), 0);
    }

    #[test]
    fn msix_accesses_are_ok_or_typed(
        count in 0usize..2100,
        offset in prop_oneof![0u64..0x100, any::<u64>()],
        len in 0usize..16,
        value in any::<u64>(),
    ) {
        let Some(vm) = vm() else { return Ok(()) };
        match vm.notify().msix(count) {
            Err(Error::MsixVectorCount { .. }) => prop_assert!(count == 0 || count > 2048),
            Err(e) => prop_assert!(false, "{e}"),
            Ok(v) => {
                // The table at 0 and the PBA above the largest table, as a VMM's BAR has them,
                // reached through vm-notify's `IoRegion`.
                const PBA: u64 = 0x8000;
                let bar = IoRegion::msix(&v, 0, PBA);
                let read = |offset: u64, data: &mut [u8]| {
                    bar.mmio_read(MmioAddress(0), offset, data);
                    bar.take_error().map_or(Ok(()), Err)
                };
                let write = |offset: u64, data: &[u8]| {
                    bar.mmio_write(MmioAddress(0), offset, data);
                    bar.take_error().map_or(Ok(()), Err)
                };
                let mut buf = vec![0u8; len];
                let bytes = value.to_le_bytes();
                let data: Vec<u8> = (0..len).map(|i| bytes[i % 8]).collect();
                for r in [
                    read(offset, &mut buf),
                    write(offset, &data),
                    read(PBA.wrapping_add(offset), &mut buf),
                ] {
                    if let Err(e) = r {
                        prop_assert!(matches!(e, Error::MsixAccess { .. }), "{e}");
                    }
                }
                // Read after write: a table write that was taken reads back as written, less
                // the reserved bits (address bits 0-1, vector control bits 1-31).
                let in_table = offset.checked_add(len as u64).is_some_and(|end| end <= v.table_len());
                if in_table && write(offset, &data).is_ok() {
                    let mut back = vec![0u8; len];
                    prop_assert!(read(offset, &mut back).is_ok());
                    let first = (offset % 16 / 4) as usize;
                    for (i, (got, put)) in back.chunks(4).zip(data.chunks(4)).enumerate() {
                        let writable = match first + i {
                            0 => !0x3u32,
                            3 => 1,
                            _ => u32::MAX,
                        };
                        let put = u32::from_le_bytes(put.try_into().unwrap()) & writable;
                        let got = u32::from_le_bytes(got.try_into().unwrap());
                        prop_assert_eq!(got, put, "dword {} at offset {:#x}", first + i, offset);
                    }
                }
                let _ = v.set_message(count, MsiMessage::x86(0, 0x40));
            }
        }
    }
}
