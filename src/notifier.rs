//! [`Notifier`]: an eventfd counter with its kernel semantics as types.
//!
//! An eventfd holds a `u64` counter. A write adds to it; the counter's maximum is
//! `0xffff_ffff_ffff_fffe`, and a write that would pass it waits (or, non-blocking, is refused)
//! until a read makes room. In [`Mode::Counter`] a read returns the whole counter and zeroes it:
//! the number of notifications since the last read, however they were coalesced. In
//! [`Mode::Semaphore`] a read returns 1 and decrements. A read of a zero counter waits (or,
//! non-blocking, is refused). The descriptor is readable for poll/epoll while the counter is not
//! zero.
//!
//! The descriptor is always opened `EFD_NONBLOCK | EFD_CLOEXEC`; the blocking calls wait with
//! `poll(2)` and retry, so one notifier serves both kinds of caller and a clone never changes the
//! behaviour of another (`O_NONBLOCK` is shared by every clone of a descriptor).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK, EFD_SEMAPHORE};

use crate::error::{Error, Result};
use crate::fault::{hit, Syscall};

/// The largest value an eventfd counter can hold.
pub const COUNTER_MAX: u64 = u64::MAX - 1;

/// How a read consumes the counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// A read returns the whole counter and zeroes it (coalesced notifications).
    Counter,
    /// A read returns 1 and decrements the counter (`EFD_SEMAPHORE`): one notification at a time.
    Semaphore,
}

/// The outcome of a non-blocking operation: done, or it would have had to wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[must_use]
pub enum Attempt<T> {
    /// The operation completed with this value.
    Done(T),
    /// The operation would block: a read found the counter at zero, or a write would pass
    /// [`COUNTER_MAX`].
    WouldBlock,
}

impl<T> Attempt<T> {
    /// The value, if the operation completed.
    pub fn done(self) -> Option<T> {
        match self {
            Attempt::Done(v) => Some(v),
            Attempt::WouldBlock => None,
        }
    }
}

/// An eventfd counter: the handle both directions of notification are made of.
///
/// Guest writes to a registered address add 1 to it (see [`IoEvent`](crate::IoEvent)); a
/// device adds to it to inject an interrupt (see [`IrqFd`](crate::IrqFd)).
///
/// # Example
///
/// ```
/// use vm_notify::{Attempt, Mode, Notifier};
///
/// let kicks = Notifier::new(Mode::Counter)?;
/// kicks.notify()?;
/// kicks.add(2)?;
/// assert_eq!(kicks.read()?, 3); // coalesced
/// assert_eq!(kicks.try_read()?, Attempt::WouldBlock);
/// # Ok::<(), vm_notify::Error>(())
/// ```
///
/// # Handles and descriptors
///
/// A `Notifier` is a handle to one eventfd. [`clone`](Clone::clone) makes another handle to the
/// same descriptor (no new descriptor; the eventfd closes when the last handle goes), which is
/// what every registration keeps of the notifier it was made with: a queue's kick and its
/// interrupt cost two descriptors however many registrations refer to them.
/// [`dup`](Self::dup) makes a second descriptor, for code that needs one of its own.
#[derive(Debug, Clone)]
pub struct Notifier {
    fd: Arc<EventFd>,
    mode: Mode,
    /// The open file is blocking and shared with a peer (adopted by [`from_fd`](Self::from_fd)),
    /// so its `O_NONBLOCK` is not ours to set: reads and writes here must not block on it.
    blocking: bool,
}

impl Notifier {
    /// Creates a notifier with a zero counter.
    ///
    /// # Errors
    ///
    /// [`Error::FdExhausted`] when no descriptor is left, [`Error::Notifier`] otherwise.
    pub fn new(mode: Mode) -> Result<Self> {
        let mut flags = EFD_NONBLOCK | EFD_CLOEXEC;
        if mode == Mode::Semaphore {
            flags |= EFD_SEMAPHORE;
        }
        let fd = hit(Syscall::EventFdCreate)
            .and_then(|()| EventFd::new(flags))
            .map_err(|e| Error::eventfd("create", e))?;
        Ok(Notifier {
            fd: Arc::new(fd),
            mode,
            blocking: false,
        })
    }

    /// Adopts an eventfd made elsewhere — the kick or call fd a vhost-user backend receives over
    /// its socket, say — with the same counter semantics as one made here. The mode is the
    /// descriptor's own (`EFD_SEMAPHORE`, read from `/proc/self/fdinfo`; counter mode on kernels
    /// that do not show it).
    ///
    /// The open file's flags are left as they are: `O_NONBLOCK` belongs to the open file, which
    /// the peer that sent the descriptor shares, and setting it would change that peer's reads.
    /// On a blocking one this notifier still never blocks where it says it does not: its reads
    /// ask the kernel not to wait (`preadv2` with `RWF_NOWAIT`, Linux 5.12 and later; before,
    /// a poll first, where a concurrent reader taking the count between the two can make the
    /// read wait for the next write), and its writes poll for room first.
    ///
    /// # Errors
    ///
    /// [`Error::NotAnEventFd`] when `fd` is not an eventfd; [`Error::Notifier`] if its flags
    /// cannot be read.
    pub fn from_fd(fd: std::os::fd::OwnedFd) -> Result<Self> {
        use std::os::fd::{AsRawFd as _, FromRawFd as _, IntoRawFd as _};
        let raw = fd.as_raw_fd();
        let info = fdinfo(raw)?;
        if fdinfo_field(&info, "eventfd-count").is_none() {
            return Err(Error::NotAnEventFd { fd: raw });
        }
        let mode = match fdinfo_field(&info, "eventfd-semaphore") {
            Some("1") => Mode::Semaphore,
            _ => Mode::Counter,
        };
        // SAFETY: fcntl F_GETFL on a descriptor `fd` owns; it only reads the flags.
        let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        if flags < 0 {
            return Err(Error::Notifier {
                op: "read the flags",
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: the descriptor comes from an `OwnedFd`, so it is open and owned by nothing
        // else; the `EventFd` takes that ownership.
        let fd = unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) };
        Ok(Notifier {
            fd: Arc::new(fd),
            mode,
            blocking: flags & libc::O_NONBLOCK == 0,
        })
    }

    /// The read mode chosen at creation.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Adds 1 to the counter: one notification. Waits only if the counter is at its maximum.
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`] if the write fails.
    pub fn notify(&self) -> Result<()> {
        self.add(1)
    }

    /// Adds `value` to the counter, waiting while that would pass [`COUNTER_MAX`].
    ///
    /// # Errors
    ///
    /// [`Error::NotifierValue`] for `u64::MAX`, [`Error::Notifier`] if the write fails.
    pub fn add(&self, value: u64) -> Result<()> {
        loop {
            match self.try_add(value)? {
                Attempt::Done(()) => return Ok(()),
                Attempt::WouldBlock => self.wait(libc::POLLOUT, None)?,
            };
        }
    }

    /// Adds `value` to the counter unless that would pass [`COUNTER_MAX`], in which case the
    /// counter is left unchanged and [`Attempt::WouldBlock`] is returned.
    ///
    /// # Errors
    ///
    /// [`Error::NotifierValue`] for `u64::MAX`, [`Error::Notifier`] if the write fails.
    pub fn try_add(&self, value: u64) -> Result<Attempt<()>> {
        if value == u64::MAX {
            return Err(Error::NotifierValue { value });
        }
        if self.blocking && self.poll(libc::POLLOUT, 0)? & libc::POLLOUT == 0 {
            return Ok(Attempt::WouldBlock);
        }
        match hit(Syscall::EventFdWrite).and_then(|()| self.fd.write(value)) {
            Ok(()) => Ok(Attempt::Done(())),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Attempt::WouldBlock),
            Err(e) => Err(Error::eventfd("write", e)),
        }
    }

    /// Reads the counter, waiting until it is not zero.
    ///
    /// In [`Mode::Counter`] returns the counter and zeroes it; in [`Mode::Semaphore`] returns 1
    /// and decrements it.
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`] if the read fails.
    pub fn read(&self) -> Result<u64> {
        loop {
            match self.try_read()? {
                Attempt::Done(v) => return Ok(v),
                Attempt::WouldBlock => self.wait(libc::POLLIN, None)?,
            };
        }
    }

    /// Reads the counter, or returns [`Attempt::WouldBlock`] at once if it is zero.
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`] if the read fails.
    pub fn try_read(&self) -> Result<Attempt<u64>> {
        let read = || match self.blocking {
            false => self.fd.read(),
            true => self.read_nowait(),
        };
        match hit(Syscall::EventFdRead).and_then(|()| read()) {
            Ok(v) => Ok(Attempt::Done(v)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Attempt::WouldBlock),
            Err(e) => Err(Error::eventfd("read", e)),
        }
    }

    /// Reads the counter, waiting at most `timeout` for it to become non-zero.
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`] if the read or the wait fails.
    pub fn read_timeout(&self, timeout: Duration) -> Result<Attempt<u64>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Attempt::Done(v) = self.try_read()? {
                return Ok(Attempt::Done(v));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Attempt::WouldBlock);
            }
            self.wait(libc::POLLIN, Some(left))?;
        }
    }

    /// Whether the counter is not zero right now (what poll/epoll report as readable).
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`] if `poll(2)` fails.
    pub fn is_pending(&self) -> Result<bool> {
        Ok(self.poll(libc::POLLIN, 0)? & libc::POLLIN != 0)
    }

    /// The counter's value, read without changing it: `/proc/self/fdinfo` shows the count the
    /// kernel holds, taken under the eventfd's lock, so the read is atomic and nothing is written
    /// back — a notification arriving meanwhile stays in the counter (a read followed by a
    /// write-back could lose or reorder one against a concurrent reader). For snapshots.
    ///
    /// # Errors
    ///
    /// [`Error::Notifier`] if fdinfo cannot be read or shows no count.
    #[cfg(feature = "kvm")]
    pub(crate) fn peek(&self) -> Result<u64> {
        let info = fdinfo(self.fd.as_raw_fd())?;
        fdinfo_field(&info, "eventfd-count")
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .ok_or_else(|| Error::Notifier {
                op: "read the count in fdinfo",
                source: io::Error::from(io::ErrorKind::InvalidData),
            })
    }

    /// A second descriptor for the same counter (`dup`), for code that needs a descriptor of its
    /// own (to set flags on, or to hand to a process); [`clone`](Clone::clone) costs none.
    ///
    /// # Errors
    ///
    /// [`Error::FdExhausted`] when no descriptor is left, [`Error::Notifier`] otherwise.
    pub fn dup(&self) -> Result<Self> {
        let fd = hit(Syscall::Dup)
            .and_then(|()| self.fd.try_clone())
            .map_err(|e| Error::eventfd("clone", e))?;
        Ok(Notifier {
            fd: Arc::new(fd),
            mode: self.mode,
            blocking: self.blocking,
        })
    }

    /// The underlying vmm-sys-util eventfd, for the code in this crate that hands it to KVM.
    #[cfg(feature = "kvm")]
    pub(crate) fn as_event_fd(&self) -> &EventFd {
        &self.fd
    }

    /// A read of a blocking open file that does not wait: `preadv2(RWF_NOWAIT)`, or where the
    /// kernel does not take that flag on an eventfd (before Linux 5.12), a poll first.
    fn read_nowait(&self) -> io::Result<u64> {
        let mut buf = [0u8; 8];
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: one iovec over `buf`, which outlives the call; offset -1 reads at the file's
        // position (an eventfd has none); the return value is checked.
        let n = unsafe { libc::preadv2(self.fd.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT) };
        if n == 8 {
            return Ok(u64::from_ne_bytes(buf));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::EINVAL) => {
                let ready = self.poll(libc::POLLIN, 0).map_err(|e| match e {
                    Error::Notifier { source, .. } => source,
                    other => io::Error::other(other.to_string()),
                })?;
                if ready & libc::POLLIN == 0 {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                self.fd.read()
            }
            _ if n >= 0 => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            _ => Err(e),
        }
    }

    fn wait(&self, events: libc::c_short, timeout: Option<Duration>) -> Result<()> {
        let ms = match timeout {
            None => -1,
            // Round up so a short remaining time still waits instead of spinning.
            Some(t) => t.as_millis().saturating_add(1).min(i32::MAX as u128) as i32,
        };
        self.poll(events, ms).map(|_| ())
    }

    fn poll(&self, events: libc::c_short, timeout_ms: i32) -> Result<libc::c_short> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events,
            revents: 0,
        };
        loop {
            // SAFETY: `pfd` is a valid pollfd for the duration of the call and we pass a count
            // of exactly one; the descriptor is owned by `self` and open.
            let ret = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
            if ret >= 0 {
                return Ok(pfd.revents);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(Error::eventfd("poll", err));
            }
        }
    }
}

impl AsRawFd for Notifier {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The underlying vmm-sys-util eventfd, for APIs that take one (vhost's `set_vring_call`, say).
impl AsRef<EventFd> for Notifier {
    fn as_ref(&self) -> &EventFd {
        &self.fd
    }
}

impl AsFd for Notifier {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor is owned by `self.fd` and stays open while the borrow of `self`
        // lives.
        unsafe { BorrowedFd::borrow_raw(self.fd.as_raw_fd()) }
    }
}

/// `/proc/self/fdinfo/<fd>`: what the kernel shows of a descriptor.
fn fdinfo(fd: RawFd) -> Result<String> {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).map_err(|source| Error::Notifier {
        op: "read fdinfo",
        source,
    })
}

/// The value of `name` in fdinfo text (`name: value`), trimmed.
fn fdinfo_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    /// The descriptor behind a notifier is open.
    fn is_open(fd: RawFd) -> bool {
        // SAFETY: F_GETFD reads the descriptor flags of `fd`, or fails with EBADF; nothing else.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        flags >= 0
    }

    #[test]
    fn peek_reads_without_consuming() {
        for mode in [Mode::Counter, Mode::Semaphore] {
            let n = Notifier::new(mode).unwrap();
            assert_eq!(n.peek().unwrap(), 0);
            n.add(0x1234_5678_9abc).unwrap();
            assert_eq!(n.peek().unwrap(), 0x1234_5678_9abc);
            assert_eq!(n.peek().unwrap(), 0x1234_5678_9abc, "still there");
            n.add(COUNTER_MAX - 0x1234_5678_9abc).unwrap();
            assert_eq!(n.peek().unwrap(), COUNTER_MAX);
        }
    }

    #[test]
    fn shared_handles_are_one_descriptor_and_one_counter() {
        let a = Notifier::new(Mode::Counter).unwrap();
        let b = a.clone();
        assert_eq!(a.as_raw_fd(), b.as_raw_fd(), "no new descriptor");
        b.add(3).unwrap();
        assert_eq!(a.read().unwrap(), 3);
        let c = a.dup().unwrap();
        assert_ne!(c.as_raw_fd(), a.as_raw_fd(), "dup opens one");
        let fd = a.as_raw_fd();
        drop(a);
        assert!(is_open(fd), "open while a handle is left");
        c.notify().unwrap();
        assert_eq!(b.read().unwrap(), 1);
        // That the last handle closes it is counted in tests/descriptors.rs, alone in its
        // process: here another test's descriptor could take the number at once.
    }

    /// A descriptor of an eventfd made elsewhere (here: a plain blocking eventfd, as a backend
    /// library might make, duplicated as if received over a socket) keeps the counter and the
    /// mode; anything else is refused with a typed error.
    #[test]
    fn adopted_eventfds_keep_counter_and_mode() {
        use std::os::fd::{FromRawFd, OwnedFd};
        for (flags, mode) in [(0, Mode::Counter), (libc::EFD_SEMAPHORE, Mode::Semaphore)] {
            let theirs = EventFd::new(flags).unwrap();
            // SAFETY: dup returns a new descriptor (checked) that nothing else owns.
            let dup = unsafe { libc::dup(theirs.as_raw_fd()) };
            assert!(dup >= 0);
            // SAFETY: `dup` is a fresh, open descriptor owned by nothing else.
            let ours = Notifier::from_fd(unsafe { OwnedFd::from_raw_fd(dup) }).unwrap();
            assert_eq!(ours.mode(), mode);
            // The open file the peer shares keeps its flags (issue 22: it was made
            // non-blocking, and the peer's blocking reads returned EAGAIN).
            // SAFETY: F_GETFL on an open descriptor only reads its flags.
            let flags = unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_GETFL) };
            assert_eq!(
                flags & libc::O_NONBLOCK,
                0,
                "the peer's file was made non-blocking"
            );
            assert_eq!(
                ours.try_read().unwrap(),
                Attempt::WouldBlock,
                "an empty read waited"
            );
            theirs.write(3).unwrap();
            let expect = if mode == Mode::Counter { 3 } else { 1 };
            assert_eq!(ours.read().unwrap(), expect);
            ours.add(5).unwrap();
            // Their read sees our write: the whole count, or one in semaphore mode.
            assert_eq!(
                theirs.read().unwrap(),
                if mode == Mode::Counter { 5 } else { 1 }
            );
            // Without waiting on the blocking file: an empty counter is WouldBlock, not a hang.
            while ours.try_read().unwrap() != Attempt::WouldBlock {}
            assert_eq!(ours.try_add(1).unwrap(), Attempt::Done(()));
            assert_eq!(theirs.read().unwrap(), 1);
        }
        let file = std::fs::File::open("/dev/null").unwrap();
        let e = Notifier::from_fd(OwnedFd::from(file)).unwrap_err();
        assert!(matches!(e, Error::NotAnEventFd { .. }), "{e:?}");
    }

    #[test]
    fn counter_mode_coalesces_and_zeroes() {
        let n = Notifier::new(Mode::Counter).unwrap();
        for _ in 0..5 {
            n.notify().unwrap();
        }
        n.add(10).unwrap();
        assert_eq!(n.read().unwrap(), 15);
        assert_eq!(n.try_read().unwrap(), Attempt::WouldBlock);
    }

    #[test]
    fn semaphore_mode_reads_ones() {
        let n = Notifier::new(Mode::Semaphore).unwrap();
        n.add(3).unwrap();
        assert_eq!(n.mode(), Mode::Semaphore);
        for _ in 0..3 {
            assert_eq!(n.try_read().unwrap(), Attempt::Done(1));
        }
        assert!(n.try_read().unwrap().done().is_none());
    }

    #[test]
    fn overflow_is_refused_and_counter_kept() {
        let n = Notifier::new(Mode::Counter).unwrap();
        n.add(COUNTER_MAX).unwrap();
        assert_eq!(n.try_add(1).unwrap(), Attempt::WouldBlock);
        assert_eq!(n.read().unwrap(), COUNTER_MAX);
        n.add(1).unwrap();
        assert_eq!(n.read().unwrap(), 1);
    }

    #[test]
    fn u64_max_is_a_typed_error() {
        let n = Notifier::new(Mode::Counter).unwrap();
        match n.try_add(u64::MAX) {
            Err(Error::NotifierValue { value }) => assert_eq!(value, u64::MAX),
            other => panic!("expected NotifierValue, got {other:?}"),
        }
        match n.add(u64::MAX) {
            Err(Error::NotifierValue { .. }) => {}
            other => panic!("expected NotifierValue, got {other:?}"),
        }
        // Nothing was added.
        assert!(n.try_read().unwrap().done().is_none());
    }

    #[test]
    fn blocking_write_waits_for_room() {
        let n = Arc::new(Notifier::new(Mode::Counter).unwrap());
        n.add(COUNTER_MAX).unwrap();
        let writer = {
            let n = n.clone();
            thread::spawn(move || n.add(7).unwrap())
        };
        thread::sleep(Duration::from_millis(50));
        assert!(
            !writer.is_finished(),
            "the write must wait while the counter is full"
        );
        assert_eq!(n.read().unwrap(), COUNTER_MAX);
        writer.join().unwrap();
        assert_eq!(n.read().unwrap(), 7);
    }

    #[test]
    fn blocking_read_waits_for_a_write() {
        let n = Notifier::new(Mode::Counter).unwrap();
        let writer = n.dup().unwrap();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(30));
            writer.add(4).unwrap();
        });
        assert_eq!(n.read().unwrap(), 4);
        t.join().unwrap();
    }

    #[test]
    fn read_timeout_expires_on_zero() {
        let n = Notifier::new(Mode::Counter).unwrap();
        let start = Instant::now();
        assert!(n
            .read_timeout(Duration::from_millis(20))
            .unwrap()
            .done()
            .is_none());
        assert!(start.elapsed() >= Duration::from_millis(20));
        n.notify().unwrap();
        assert_eq!(
            n.read_timeout(Duration::from_millis(20)).unwrap(),
            Attempt::Done(1)
        );
    }

    #[test]
    fn clone_shares_the_counter_and_mode() {
        let a = Notifier::new(Mode::Semaphore).unwrap();
        let b = a.dup().unwrap();
        assert_ne!(a.as_raw_fd(), b.as_raw_fd());
        a.add(2).unwrap();
        assert_eq!(b.mode(), Mode::Semaphore);
        assert_eq!(b.read().unwrap(), 1);
        assert_eq!(a.read().unwrap(), 1);
    }

    #[test]
    fn readiness_follows_the_counter() {
        let n = Notifier::new(Mode::Counter).unwrap();
        assert!(!n.is_pending().unwrap());
        n.notify().unwrap();
        assert!(n.is_pending().unwrap());
        n.read().unwrap();
        assert!(!n.is_pending().unwrap());
    }

    #[test]
    fn descriptors_are_close_on_exec() {
        let n = Notifier::new(Mode::Counter).unwrap();
        let c = n.dup().unwrap();
        for fd in [n.as_raw_fd(), c.as_fd().as_raw_fd()] {
            // SAFETY: F_GETFD on a descriptor we own reads its flags and changes nothing.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            assert!(flags >= 0);
            assert_ne!(flags & libc::FD_CLOEXEC, 0, "fd {fd} lacks FD_CLOEXEC");
        }
    }

    /// What the child run of [`fd_exhaustion_in_a_process_of_its_own`] prints on success.
    const EXHAUSTED: &str = "fd exhaustion: FdExhausted";

    #[test]
    fn fd_exhaustion_is_typed() {
        // The soft limit is lowered in a process of its own (this test binary again, running
        // only the test below), so this process keeps its limit; no fork of the multithreaded
        // harness.
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--ignored",
                "--exact",
                "notifier::tests::fd_exhaustion_in_a_process_of_its_own",
                "--nocapture",
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(EXHAUSTED),
            "the child did not see FdExhausted: {stdout}"
        );
    }

    /// Run by [`fd_exhaustion_is_typed`] in a process of its own: lowers this process's soft
    /// descriptor limit to 0 and makes a notifier.
    #[test]
    #[ignore = "run in a process of its own by fd_exhaustion_is_typed"]
    fn fd_exhaustion_in_a_process_of_its_own() {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit with a valid struct; only this process is affected.
        let set = unsafe {
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            lim.rlim_cur = 0;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim)
        };
        assert_eq!(set, 0);
        let e = Notifier::new(Mode::Counter).unwrap_err();
        assert!(matches!(e, Error::FdExhausted { .. }), "{e:?}");
        println!("{EXHAUSTED}");
    }
}
