//! The libc calls behind a segment: `shm_open` (create exclusively / open), `fchmod` and
//! `shm_unlink` for named segments; `memfd_create`, seals and close-on-exec for anonymous ones;
//! `madvise` to populate a mapping once it was validated.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

fn c_name(name: &str) -> io::Result<CString> {
    CString::new(format!("/{name}")).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Creates `name` exclusively (`O_CREAT | O_EXCL | O_RDWR`) with mode 0600, regardless of umask.
pub(super) fn create(name: &str) -> io::Result<File> {
    let c = c_name(name)?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let fd = unsafe {
        libc::shm_open(
            c.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_RDWR | libc::O_CLOEXEC,
            0o600 as libc::mode_t,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: shm_open returned a new descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // The umask can only remove bits from 0600; fchmod makes the mode exact anyway.
    // SAFETY: fd is open (owned above).
    if unsafe { libc::fchmod(fd, 0o600) } != 0 {
        let e = io::Error::last_os_error();
        let _ = unlink(name);
        return Err(e);
    }
    Ok(File::from(owned))
}

/// Opens an existing `name`, read-write or read-only.
pub(super) fn open(name: &str, write: bool) -> io::Result<File> {
    let c = c_name(name)?;
    let flags = if write { libc::O_RDWR } else { libc::O_RDONLY };
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let fd = unsafe { libc::shm_open(c.as_ptr(), flags | libc::O_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: shm_open returned a new descriptor that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Removes `name`.
pub(super) fn unlink(name: &str) -> io::Result<()> {
    let c = c_name(name)?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    if unsafe { libc::shm_unlink(c.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The seals a launched plugin's segment carries: its size is fixed (neither side can shrink it
/// under the other's mapping, nor grow it), and no seal can be added or removed.
pub(super) const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Creates an anonymous memory file (`memfd_create`, close-on-exec, sealable). `name` only shows
/// in `/proc/<pid>/fd` and `/proc/<pid>/maps`; nothing can open the file by it.
pub(super) fn memfd(name: &str) -> io::Result<File> {
    let c = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let fd = unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Adds [`SEALS`] to a memory file.
pub(super) fn seal(file: &File) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS takes an int argument; the descriptor is open (borrowed from `file`).
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, SEALS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The seals of a file (`F_GET_SEALS`); an error for a file that cannot carry seals (not a
/// memory file).
pub(super) fn seals(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // SAFETY: F_GET_SEALS takes no argument; the descriptor is open for the borrow's lifetime.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(seals)
}

/// Whether descriptor `fd` is open in this process.
pub(super) fn is_open(fd: std::os::fd::RawFd) -> bool {
    // SAFETY: F_GETFD takes no argument and only reads the descriptor table; a closed `fd`
    // yields EBADF.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Sets close-on-exec on a descriptor, so a process this one starts does not inherit it.
pub(super) fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFD takes no argument; the descriptor is open for the borrow's lifetime.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFD takes an int argument; the descriptor is open.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags | libc::FD_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Faults in every page of a mapping now, for writing (`MADV_POPULATE_WRITE`, Linux 5.14), so
/// the first ticks pay no page faults; on older kernels asks for read-ahead (`MADV_WILLNEED`).
/// Best effort: a failure only means later page faults.
///
/// Called only on a mapping whose size was validated.
pub(super) fn populate(ptr: *mut u8, len: usize) {
    // SAFETY: madvise only changes how the kernel backs [ptr, ptr + len), a mapping the caller
    // owns; populating reads no byte and writes none (it faults pages in, which a shared file
    // mapping allows), and a failure is returned, not raised.
    let r = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_POPULATE_WRITE) };
    if r != 0 {
        // SAFETY: as above; WILLNEED is a hint.
        let _ = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_WILLNEED) };
    }
}
