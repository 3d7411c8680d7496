# What scripts/linux-guest and scripts/linux-bench share: packages, Debian's cloud kernel and its
# modules, and the busybox initramfs trees the L1 and L2 Linux boot from. Sourced (bash) with
# $root (the repository) and $work (the work directory) set.

# need_packages PKG...: installs with apt-get the Debian packages that are not installed yet.
need_packages() {
    local need=() p
    for p in "$@"; do
        dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
    done
    if [ ${#need[@]} -gt 0 ]; then
        echo "$(basename "$0"): installing ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
}

# The kernel: $LINUX_GUEST_KERNEL, else the one Debian's cloud meta-package points at now. A
# package list older than the archive can name a kernel whose package is gone from it (seen: the
# list named 6.1.0-48, the archive kept only the signed image, and later ABIs): then the list is
# refreshed and the choice made again.
kernel_of() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null | grep -o 'linux-image-[0-9.]*-[0-9]*-cloud-amd64' | awk 'NR == 1'
}
available() { apt-cache policy "$1" 2>/dev/null | grep 'Candidate: [0-9]' >/dev/null; }

# kernel_package: the kernel and its modules, from Debian's package (the unsigned image, else the
# signed one: the same kernel and modules, with signatures nothing here checks), unpacked in
# $work/kernel. Sets $kver, $vmlinuz, $mods (the modules' tree), $l1mods (kvm and kvm_amd) and
# $l2mods (the virtio drivers), the last two as src:dest pairs for `tree`.
kernel_package() {
    local pkg image m
    if [ -z "${LINUX_GUEST_KERNEL:-}" ]; then
        pkg=$(kernel_of || true)
        if [ -z "$pkg" ] || ! available "$pkg-unsigned"; then
            apt-get update -qq
            pkg=$(kernel_of)
        fi
        LINUX_GUEST_KERNEL=${pkg#linux-image-}
    fi
    kver=$LINUX_GUEST_KERNEL
    if [ ! -f "$work/kernel/boot/vmlinuz-$kver" ]; then
        image="linux-image-$kver-unsigned"
        available "$image" || image="linux-image-$kver"
        (cd "$work" && rm -f linux-image-*.deb && apt-get download -q "$image" 2>&1 | tail -n 1)
        rm -rf "$work/kernel" && dpkg-deb -x "$work"/linux-image-*.deb "$work/kernel"
    fi
    vmlinuz="$work/kernel/boot/vmlinuz-$kver"
    mods="$work/kernel/lib/modules/$kver/kernel"
    l1mods=("$mods/virt/lib/irqbypass.ko:mods/irqbypass.ko" "$mods/arch/x86/kvm/kvm.ko:mods/kvm.ko"
        "$mods/arch/x86/kvm/kvm-amd.ko:mods/kvm-amd.ko")
    # The tap and the kernel's vhost-net, in load order.
    for m in drivers/net/tun drivers/net/tap drivers/vhost/vhost_iotlb drivers/vhost/vhost \
        drivers/vhost/vhost_net; do
        l1mods+=("$mods/$m.ko:mods/$(basename "$m").ko")
    done
    l2mods=()
    for m in drivers/virtio/virtio drivers/virtio/virtio_ring drivers/virtio/virtio_pci_modern_dev \
        drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci drivers/virtio/virtio_mmio \
        drivers/char/hw_random/virtio-rng drivers/block/virtio_blk net/core/failover \
        drivers/net/net_failover drivers/net/virtio_net net/vmw_vsock/vsock \
        net/vmw_vsock/vmw_vsock_virtio_transport_common net/vmw_vsock/vmw_vsock_virtio_transport; do
        l2mods+=("$mods/$m.ko:mods/$(basename "$m").ko")
    done
}

# tree DIR SRC:DEST...: an initramfs tree with busybox and the listed files.
tree() {
    local dir=$1 a pair
    shift
    rm -rf "$dir" && mkdir -p "$dir"/{bin,proc,sys,dev,tmp,mods}
    cp "$(command -v busybox)" "$dir/bin/busybox"
    for a in sh mount insmod poweroff reboot cat echo ls dmesg sleep grep head tail dd wc cut \
        md5sum sync tr awk sed taskset readlink timeout time kill ip nc ping tunctl mv rm mkfifo seq; do
        ln -sf busybox "$dir/bin/$a"
    done
    for pair in "$@"; do
        mkdir -p "$dir/$(dirname "${pair#*:}")"
        cp "${pair%%:*}" "$dir/${pair#*:}"
    done
}

# pack DIR FILE: DIR as a gzipped cpio archive.
pack() { (cd "$1" && find . | cpio -o -H newc 2>/dev/null | gzip -1) > "$2"; }

# libs_of BIN...: the shared libraries the binaries load, as src:dest pairs at the same paths.
libs_of() {
    ldd "$@" | grep -o '/[^ ]*\.so[^ ]*' | sort -u | sed 's/.*/&:&/'
}

# qemu_files: QEMU's binary and the firmware it loads for -kernel on q35 and pc, as src:dest
# pairs (the firmware is found relative to the binary), with its libraries.
qemu_files() {
    local qemu f
    qemu=$(command -v qemu-system-x86_64)
    libs_of "$qemu"
    for f in /usr/share/seabios/bios-256k.bin /usr/share/qemu/linuxboot_dma.bin /usr/share/qemu/kvmvapic.bin; do
        echo "$(readlink -f "$f"):${f#/}"
    done
    echo "$qemu:usr/bin/qemu-system-x86_64"
}

# boot_l1 INITRD LOG RUNS [BOOT_S] [ALL_S]: boots the L1 (QEMU TCG, -cpu max, $L1_SMP CPUs (2
# by default), 2 GiB, and $L1_QEMU_ARGS if set) from INITRD, its kernel command line naming RUNS (runs=A,B,...; its /init makes them, each
# bracketed by "L1: run NAME begins" and "L1: run NAME ended" lines), its console in LOG.
# This L1 (TCG running kvm_amd) crashes now and then, most often under a two-vCPU L2 on the
# split irqchip: its own kernel takes an interrupt right after VMRUN returns, before KVM has
# restored the host's GS, and faults until its stack overflows ("stack guard page was hit";
# seen 2 of 3 times in the split irqchip's virtio-mmio cell, whose level interrupts reach the
# vCPUs as KVM_SIGNAL_MSI from the injector thread on the other CPU), or it resets silently
# (seen on both irqchips). Then it is booted
# again for the runs that had not ended, each run begun at most three times; the console
# shows each boot ("L1-BOOT: ") and the check notes where the L1 died. A boot is cut off
# after BOOT_S, 900 by default (linux-guest's runs take about 300; seen once: an L1 that
# stopped making progress after such a crash had been recovered from), and none starts after
# ALL_S, 1800 by default.
boot_l1() {
    local initrd=$1 log=$2 remaining=$3 per=${4:-900} all=${5:-1800} boot ended started
    started=$(date +%s.%N)
    : > "$log"
    for boot in 1 2 3 4 5 6; do
        [ -z "$remaining" ] && break
        if [ "$(echo "$(date +%s.%N) - $started > $all" | bc)" = 1 ]; then
            echo "L1-BOOT: no boot $boot: $all s have gone; not run: $remaining" | tee -a "$log"
            break
        fi
        if [ "$boot" -gt 1 ]; then
            echo "L1-BOOT: boot $boot for the runs that had not ended: $remaining" | tee -a "$log"
        fi
        # shellcheck disable=SC2086 # L1_QEMU_ARGS is a list of arguments
        timeout "$per" qemu-system-x86_64 -accel tcg -cpu max -m 2048 -smp "${L1_SMP:-2}" \
            -nographic -no-reboot -kernel "$vmlinuz" -initrd "$initrd" ${L1_QEMU_ARGS:-} \
            -append "console=ttyS0 panic=-1 quiet runs=$(echo $remaining | tr ' ' ,)" |
            tee -a "$log" || true
        ended=$(sed -n 's/^L1: run \([^ ]*\) ended at.*/\1/p' "$log")
        remaining=$(for r in $remaining; do
            begun=$(grep -c "^L1: run $r begins" "$log" || true)
            echo "$ended" | grep -qx "$r" || [ "$begun" -ge 3 ] || echo "$r"
        done | xargs)
    done
}
