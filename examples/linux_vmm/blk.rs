//! virtio-blk over a host file: reads, writes, flushes and the device ID, 512-byte sectors.
//! A read or write moves data between the file and the guest's buffers with no copy in between,
//! asynchronously through an io_uring per queue (the default): the requests the device takes
//! go to the kernel together in one `io_uring_enter`, and the completions the ring's eventfd
//! announces go back to the guest together, with at most one interrupt for them. With
//! `--blk-io sync`, each request is one `preadv`/`pwritev` in the device thread instead.
//!
//! While the queue's server polls the ring (`--blk-poll`), completions wait: at depth the
//! guest keeps making requests without kicks, and a burst's completions go back together, with
//! one interrupt, when the polling window runs out. A lone request's goes back at once when the
//! driver makes one request at a time, or once the ring has been quiet for 200 µs after it when
//! the driver has been making bursts (so a burst's first request does not end the batch); the
//! device learns which from how many completions went back together lately.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{desc::split::Descriptor, DescriptorChain};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vm_notify::virtio::{Moderation, QueueServer};
use vm_notify::{Mode, Notifier};

use crate::virtio_pci::{Begun, DeviceStats, VirtioDevice, QUEUE_MAX};

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

/// How the block device moves data.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum BlkIo {
    /// A `preadv`/`pwritev` per request, in the device thread.
    Sync,
    /// An io_uring per queue.
    Uring,
}

/// A block device backed by `file`; its capacity is the file's size in sectors. With more than
/// one request queue, each queue's thread has its own handle on the file (the I/O is
/// positional, so they never share an offset) and, with io_uring, its own ring.
pub struct Blk {
    file: File,
    sectors: u64,
    queues: u16,
    moderation: Option<Moderation>,
    poll: Option<Duration>,
    io: BlkIo,
    uring: Option<Uring>,
}

/// A queue's io_uring: the requests in flight, each in a slot whose index is its `user_data`.
struct Uring {
    ring: IoUring,
    /// The eventfd the kernel signals when it posts completions.
    done: Notifier,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// Requests queued on the submission ring but not yet handed to the kernel.
    unsubmitted: usize,
    /// When the last request was taken.
    last_taken: Instant,
    /// Whether the driver makes requests in bursts (completions came back several at once
    /// lately): then a lone request's completion waits `LONE_QUIET` for the rest of a burst.
    bursting: bool,
    /// Lone completions in a row; `LONE_STREAK` of them end bursting.
    lone_streak: u32,
    /// Lone completions since the last probe; every `PROBE_EVERY`th request waits as in a
    /// burst, to find out whether the driver has started making bursts.
    since_probe: u32,
}

/// How long the ring stays quiet after a lone request before its completion goes back while
/// the server still polls, when the driver makes bursts: longer than the gap between its
/// requests at depth (about 100 µs of guest time here), so a burst's first request does not end
/// its batch. Otherwise a lone request's completion goes back at once.
const LONE_QUIET: Duration = Duration::from_micros(200);
const LONE_STREAK: u32 = 8;
const PROBE_EVERY: u32 = 128;

/// A read or write the kernel is working on.
struct InFlight {
    head: u16,
    status: GuestAddress,
    into_guest: bool,
    /// The guest buffers; the kernel reads this array until the request completes, so it lives
    /// here (a `Vec`'s buffer does not move with the `Vec`).
    iovs: Vec<libc::iovec>,
    offset: u64,
    total: u64,
}

// SAFETY: the iovecs point into guest memory, which every thread of the VMM may touch (the
// mapping outlives the device); an `InFlight` is only ever used by the thread that owns its ring.
unsafe impl Send for InFlight {}

impl Blk {
    /// With `moderation`, each queue's server holds interrupts back while requests wait; with
    /// `poll`, it watches the ring for up to that long before asking for kicks again.
    pub fn new(
        file: File,
        queues: u16,
        moderation: Option<Moderation>,
        poll: Option<Duration>,
        io: BlkIo,
    ) -> std::io::Result<Blk> {
        // The end of a file, or of a block device (whose metadata says 0 bytes).
        let sectors = (&file).seek(SeekFrom::End(0))? / SECTOR;
        let uring = match io {
            // A host without io_uring (an old kernel, a sandbox that forbids it) still serves
            // the disk, synchronously.
            BlkIo::Uring => Uring::new()
                .inspect_err(|e| {
                    eprintln!("linux_vmm: virtio-blk: no io_uring ({e}): synchronous I/O instead")
                })
                .ok(),
            BlkIo::Sync => None,
        };
        Ok(Blk {
            file,
            sectors,
            queues,
            moderation,
            poll,
            io,
            uring,
        })
    }

    /// The iovecs of a read's or write's data buffers at `offset`, with their total length,
    /// checked: each buffer says the right direction, lies in guest memory, and the whole
    /// transfer ends inside the disk.
    fn iovecs(
        &self,
        mem: &GuestMemoryMmap,
        into_guest: bool,
        data: &[Descriptor],
        offset: u64,
    ) -> Result<(Vec<libc::iovec>, u64), u8> {
        let mut iovs: Vec<libc::iovec> = Vec::with_capacity(data.len());
        let mut total = 0u64;
        for desc in data {
            // The device writes a read's buffers and reads a write's: each must say so.
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
        Ok((iovs, total))
    }

    /// A request's header, data buffers and status, or `None` for a chain too short to be one.
    fn parse(
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Option<(u32, u64, Vec<Descriptor>, Descriptor)> {
        let mut descs: Vec<Descriptor> = chain.collect();
        let header = *descs.first()?;
        let status = descs.pop()?;
        if descs.is_empty() {
            return None;
        }
        descs.remove(0);
        let kind: u32 = mem.read_obj(header.addr()).ok()?;
        let sector: u64 = mem.read_obj(header.addr().unchecked_add(8)).ok()?;
        Some((kind, sector, descs, status))
    }

    /// Serves a request that is not a read or write, or whose read or write the device does
    /// now: returns its status and the bytes written into the guest's buffers.
    fn serve_now(
        &mut self,
        mem: &GuestMemoryMmap,
        kind: u32,
        sector: u64,
        data: &[Descriptor],
    ) -> Option<(u8, u32)> {
        match kind {
            // A sector past the end (or one whose byte offset overflows) is an I/O error.
            T_IN | T_OUT => {
                let into_guest = kind == T_IN;
                let offset = sector.saturating_mul(SECTOR);
                match self.iovecs(mem, into_guest, data, offset) {
                    Ok((mut iovs, total)) => {
                        let status = transfer(&self.file, into_guest, &mut iovs, offset, 0);
                        let written = if into_guest { total as u32 } else { 0 };
                        Some((status, if status == S_OK { written } else { 0 }))
                    }
                    Err(s) => Some((s, 0)),
                }
            }
            T_FLUSH => Some((self.file.sync_data().map_or(S_IOERR, |()| S_OK), 0)),
            T_GET_ID => match data.first() {
                Some(d) if d.is_write_only() => {
                    let n = (d.len() as usize).min(ID.len());
                    mem.write_slice(&ID[..n], d.addr()).ok()?;
                    Some((S_OK, n as u32))
                }
                _ => Some((S_IOERR, 0)),
            },
            _ => Some((S_UNSUPP, 0)),
        }
    }
}

/// Counts a request the device took by its type.
fn count(kind: u32, stats: &DeviceStats) {
    let counter = match kind {
        T_IN => &stats.reads,
        T_OUT => &stats.writes,
        T_FLUSH => &stats.flushes,
        _ => return,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Moves the bytes of `iovs` between `file` at `offset` and guest memory, the first `skip` of
/// them already moved, in as few vectored calls as the kernel allows; returns the status.
fn transfer(file: &File, into_guest: bool, iovs: &mut [libc::iovec], offset: u64, skip: u64) -> u8 {
    let fd = file.as_raw_fd();
    let (mut first, mut at) = (0, offset);
    let mut moved = skip as usize;
    loop {
        // Skip what moved, go on from the rest.
        at += moved as u64;
        while moved > 0 && first < iovs.len() {
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
        if first == iovs.len() {
            return S_OK;
        }
        let iov = &iovs[first..];
        let count = iov.len().min(1024) as libc::c_int;
        let pos = at as libc::off_t;
        // SAFETY: every iovec names guest memory inside a region of the VM's memory, which stays
        // mapped while the VMM runs; the kernel writes (preadv) or reads (pwritev) at most
        // `iov_len` bytes at each, and `count` does not exceed `iov.len()`.
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
            return S_IOERR;
        }
        moved = n as usize;
    }
}

impl Uring {
    fn new() -> std::io::Result<Uring> {
        let ring = IoUring::new(QUEUE_MAX.into())?;
        let done = Notifier::new(Mode::Counter).map_err(std::io::Error::other)?;
        ring.submitter().register_eventfd(done.as_raw_fd())?;
        Ok(Uring {
            ring,
            done,
            slots: Vec::new(),
            free: Vec::new(),
            unsubmitted: 0,
            last_taken: Instant::now(),
            bursting: true,
            lone_streak: 0,
            since_probe: 0,
        })
    }

    /// Queues a read or write on the submission ring (handed to the kernel at `submit`).
    fn push(&mut self, file: &File, request: InFlight) -> std::io::Result<()> {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let fd = types::Fd(file.as_raw_fd());
        let (iovs, len) = (request.iovs.as_ptr(), request.iovs.len() as u32);
        let entry = if request.into_guest {
            opcode::Readv::new(fd, iovs, len)
                .offset(request.offset)
                .build()
        } else {
            opcode::Writev::new(fd, iovs, len)
                .offset(request.offset)
                .build()
        };
        let entry = entry.user_data(slot as u64);
        self.last_taken = Instant::now();
        self.slots[slot] = Some(request);
        // The submission ring holds QUEUE_MAX entries and a queue at most as many requests, so
        // it has room unless the kernel has not taken earlier ones: hand those over first.
        if self.ring.submission().is_full() {
            self.submit()?;
        }
        // SAFETY: the entry names `file`'s descriptor, which the device keeps open, and the
        // iovec array in `slots[slot]`, which stays there (its buffer unmoved) until the
        // completion is reaped — `Drop` waits for every request in flight — and the guest
        // memory it names stays mapped while the VMM runs.
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| std::io::Error::other("the submission ring is full"))?;
        self.unsubmitted += 1;
        Ok(())
    }

    /// Hands the queued requests to the kernel, in one system call.
    fn submit(&mut self) -> std::io::Result<()> {
        while self.unsubmitted > 0 {
            match self.ring.submit() {
                Ok(n) => self.unsubmitted -= n.min(self.unsubmitted),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Whether the driver waits for a lone request that has finished: the only one held, and
    /// the ring quiet since (for `LONE_QUIET` while the driver makes bursts, or on a probe).
    /// With more held, the driver is making a burst, and its completions go back together when
    /// the server's polling window runs out.
    fn driver_waits(&mut self) -> bool {
        let quiet = if self.bursting || self.since_probe >= PROBE_EVERY {
            LONE_QUIET
        } else {
            Duration::ZERO
        };
        self.in_flight() == 1
            && self.last_taken.elapsed() >= quiet
            && !self.ring.completion().is_empty()
    }

    /// Learns from `n` completions that go back together whether the driver makes bursts.
    fn went_back(&mut self, n: usize) {
        match n {
            0 => {}
            1 => {
                self.lone_streak += 1;
                self.since_probe += 1;
                if self.lone_streak >= LONE_STREAK {
                    self.bursting = false;
                }
                if self.since_probe > PROBE_EVERY {
                    // The probe found a lone request again.
                    self.since_probe = 0;
                }
            }
            _ => {
                self.bursting = true;
                self.lone_streak = 0;
                self.since_probe = 0;
            }
        }
    }
}

impl Drop for Uring {
    /// Waits for every request in flight: the kernel must be done with their iovecs and the
    /// guest's buffers before they go.
    fn drop(&mut self) {
        let _ = self.submit();
        while self.in_flight() > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    eprintln!("linux_vmm: virtio-blk: waiting for the requests in flight: {e}");
                    // Leaking them is the only safe way on: the kernel may still write there.
                    std::mem::forget(std::mem::take(&mut self.slots));
                    return;
                }
            }
            let finished: Vec<u64> = self.ring.completion().map(|c| c.user_data()).collect();
            for slot in finished {
                if let Some(s) = self.slots.get_mut(slot as usize) {
                    if s.take().is_some() {
                        self.free.push(slot as usize);
                    }
                }
            }
        }
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
        Blk::new(
            self.file.try_clone()?,
            self.queues,
            self.moderation,
            self.poll,
            self.io,
        )
    }

    fn configure(&self, server: &mut QueueServer) -> vm_notify::Result<()> {
        server.moderate(self.moderation)?;
        server.poll(self.poll);
        Ok(())
    }

    fn complete(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        stats: &DeviceStats,
    ) -> Option<u32> {
        let (kind, sector, data, status) = Blk::parse(mem, chain)?;
        count(kind, stats);
        let (code, written) = self.serve_now(mem, kind, sector, &data)?;
        mem.write_obj(code, status.addr()).ok()?;
        if code == S_OK && matches!(kind, T_IN | T_OUT) {
            let moved: u64 = data.iter().map(|d| u64::from(d.len())).sum();
            stats.bytes.fetch_add(moved, Ordering::Relaxed);
        }
        Some(written + 1)
    }

    fn completions(&self) -> Option<&Notifier> {
        self.uring.as_ref().map(|u| &u.done)
    }

    fn begin(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        stats: &DeviceStats,
    ) -> Begun {
        if self.uring.is_none() {
            return Begun::Done(self.complete(mem, chain, stats));
        }
        let head = chain.head_index();
        let Some((kind, sector, data, status)) = Blk::parse(mem, chain) else {
            return Begun::Done(None);
        };
        count(kind, stats);
        let offset = sector.saturating_mul(SECTOR);
        let into_guest = kind == T_IN;
        let iovecs = match kind {
            T_IN | T_OUT => self.iovecs(mem, into_guest, &data, offset),
            _ => Err(S_UNSUPP),
        };
        let (iovs, total) = match iovecs {
            Ok(found) => found,
            // Not a read or write (served here), or a bad one (its error status is written).
            Err(_) => {
                let done = self
                    .serve_now(mem, kind, sector, &data)
                    .and_then(|(code, n)| {
                        mem.write_obj(code, status.addr()).ok()?;
                        Some(n + 1)
                    });
                return Begun::Done(done);
            }
        };
        let request = InFlight {
            head,
            status: status.addr(),
            into_guest,
            iovs,
            offset,
            total,
        };
        let Some(uring) = self.uring.as_mut() else {
            return Begun::Done(None);
        };
        match uring.push(&self.file, request) {
            Ok(()) => Begun::Pending,
            Err(e) => {
                eprintln!("linux_vmm: virtio-blk: io_uring: {e}");
                Begun::Done(mem.write_obj(S_IOERR, status.addr()).ok().map(|()| 1))
            }
        }
    }

    fn submit(&mut self) -> std::io::Result<()> {
        self.uring.as_mut().map_or(Ok(()), Uring::submit)
    }

    /// The ring is dry while the server polls it: what was taken goes to the kernel, and the
    /// server stops polling once a lone request has finished and the driver has gone quiet
    /// (see `Uring::driver_waits`).
    fn idle(&mut self) -> bool {
        let Some(uring) = self.uring.as_mut() else {
            return false;
        };
        if let Err(e) = uring.submit() {
            eprintln!("linux_vmm: virtio-blk: io_uring: {e}");
            return true;
        }
        uring.driver_waits()
    }

    /// Hands the kernel what it has not taken and waits until every request in flight has
    /// finished, reaping each as it does.
    fn drain(&mut self, mem: &GuestMemoryMmap, stats: &DeviceStats, done: &mut Vec<(u16, u32)>) {
        loop {
            let Some(uring) = self.uring.as_mut() else {
                return;
            };
            if uring.in_flight() == 0 {
                return;
            }
            let waited = uring.submit().and_then(|()| uring.ring.submit_and_wait(1));
            match waited {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Those left are waited for when the ring goes (`Uring`'s drop); the guest
                    // does not get them back.
                    eprintln!("linux_vmm: virtio-blk: draining the requests in flight: {e}");
                    return;
                }
            }
            self.reap(mem, stats, done);
        }
    }

    fn reap(&mut self, mem: &GuestMemoryMmap, stats: &DeviceStats, done: &mut Vec<(u16, u32)>) {
        let Some(uring) = self.uring.as_mut() else {
            return;
        };
        let finished: Vec<(u64, i32)> = uring
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        uring.went_back(finished.len());
        for (slot, result) in finished {
            let Some(mut request) = uring.slots.get_mut(slot as usize).and_then(Option::take)
            else {
                continue;
            };
            uring.free.push(slot as usize);
            let code = match result {
                n if n < 0 => S_IOERR,
                n if n as u64 >= request.total => S_OK,
                // A short transfer: the rest, here.
                n => transfer(
                    &self.file,
                    request.into_guest,
                    &mut request.iovs,
                    request.offset,
                    n as u64,
                ),
            };
            let written = if code == S_OK && request.into_guest {
                request.total as u32
            } else {
                0
            };
            if code == S_OK {
                stats.bytes.fetch_add(request.total, Ordering::Relaxed);
            }
            match mem.write_obj(code, request.status) {
                Ok(()) => done.push((request.head, written + 1)),
                Err(_) => {
                    stats.malformed.fetch_add(1, Ordering::Relaxed);
                    done.push((request.head, 0));
                }
            }
        }
    }
}
