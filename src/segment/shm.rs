//! The four libc calls behind a segment: `shm_open` (create exclusively / open), `fchmod`,
//! and `shm_unlink`.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

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
