//! Image locking compatible with QEMU's file-posix.
//!
//! QEMU expresses a node's permissions as OFD read locks on single bytes of
//! the image file: byte `100 + i` for each permission bit `i` it holds, and
//! byte `200 + i` for each permission it does not share. A process that
//! wants permission `i` tests byte `200 + i` (does anyone refuse to share
//! it?); one that refuses to share `i` tests byte `100 + i` (does anyone
//! hold it?). Using the same bytes and OFD locks means Strata and QEMU
//! refuse each other exactly as two QEMUs do.

use std::os::fd::RawFd;

use block_core::{Error, Perm, Result};

/// First lock byte for held permissions.
pub const LOCK_PERM_BASE: i64 = 100;
/// First lock byte for unshared permissions.
pub const LOCK_SHARED_BASE: i64 = 200;

fn flock(
    fd: RawFd,
    cmd: libc::c_int,
    ty: libc::c_short,
    start: i64,
) -> std::io::Result<libc::flock> {
    let mut fl = libc::flock {
        l_type: ty,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start as libc::off_t,
        l_len: 1,
        l_pid: 0,
    };
    // SAFETY: fcntl with a lock command and a pointer to a live flock struct.
    let r = unsafe { libc::fcntl(fd, cmd, &mut fl) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(fl)
    }
}

/// Whether another open file description holds a lock on `byte`.
fn byte_taken(fd: RawFd, byte: i64) -> std::io::Result<bool> {
    let fl = flock(fd, libc::F_OFD_GETLK, libc::F_WRLCK as libc::c_short, byte)?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Checks that taking `perm` and refusing `!shared` conflicts with no other
/// process (QEMU's raw_check_lock_bytes).
pub fn check(fd: RawFd, path: &str, perm: Perm, shared: Perm) -> Result<()> {
    for (i, p) in Perm::LOCKABLE.iter().enumerate() {
        let err = |e: std::io::Error| Error::io(path, "testing image lock", e);
        if perm.contains(*p) && byte_taken(fd, LOCK_SHARED_BASE + i as i64).map_err(err)? {
            return Err(Error::Locked {
                path: path.to_owned(),
                shared: false,
                perm: p.name(),
            });
        }
    }
    for (i, p) in Perm::LOCKABLE.iter().enumerate() {
        let err = |e: std::io::Error| Error::io(path, "testing image lock", e);
        if !shared.contains(*p) && byte_taken(fd, LOCK_PERM_BASE + i as i64).map_err(err)? {
            return Err(Error::Locked {
                path: path.to_owned(),
                shared: true,
                perm: p.name(),
            });
        }
    }
    Ok(())
}

/// Takes the lock bytes for `perm`/`!shared` and releases the others
/// (QEMU's raw_apply_lock_bytes with unlock).
pub fn apply(fd: RawFd, perm: Perm, shared: Perm) {
    for (i, p) in Perm::LOCKABLE.iter().enumerate() {
        let ty = |on: bool| {
            if on {
                libc::F_RDLCK as libc::c_short
            } else {
                libc::F_UNLCK as libc::c_short
            }
        };
        // Failures are not fatal here: check() already proved there is no
        // conflict, and an unlock cannot meaningfully fail.
        let _ = flock(
            fd,
            libc::F_OFD_SETLK,
            ty(perm.contains(*p)),
            LOCK_PERM_BASE + i as i64,
        );
        let _ = flock(
            fd,
            libc::F_OFD_SETLK,
            ty(!shared.contains(*p)),
            LOCK_SHARED_BASE + i as i64,
        );
    }
}
