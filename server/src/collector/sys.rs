//! The two system calls the collector needs that the standard library does not wrap.

use std::ffi::CString;
use std::path::Path;

/// A filesystem's size and inodes, from statvfs(3), in Telegraf's `disk` terms: `free` is
/// what unprivileged users may still use, `used` what is in use (so `used + free` is less
/// than `total` by the blocks reserved for root, as `df` shows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsUsage {
    pub total: u64,
    pub free: u64,
    pub used: u64,
    pub inodes_total: u64,
    pub inodes_free: u64,
    pub inodes_used: u64,
}

/// statvfs(3) of `path`.
#[allow(unsafe_code)]
pub fn statvfs(path: &Path) -> std::io::Result<FsUsage> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("a path with a NUL byte"))?;
    // SAFETY: an all-zero statvfs is a valid value of a plain C struct of integers.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated string and `s` a writable statvfs, both alive for
    // the call.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frsize = s.f_frsize as u64;
    let total = (s.f_blocks as u64).saturating_mul(frsize);
    let used = (s.f_blocks as u64)
        .saturating_sub(s.f_bfree as u64)
        .saturating_mul(frsize);
    let inodes_total = s.f_files as u64;
    let inodes_free = s.f_ffree as u64;
    Ok(FsUsage {
        total,
        free: (s.f_bavail as u64).saturating_mul(frsize),
        used,
        inodes_total,
        inodes_free,
        inodes_used: inodes_total.saturating_sub(inodes_free),
    })
}

/// The CPU time the calling thread has used, in microseconds.
#[allow(unsafe_code)]
pub fn thread_cpu_micros() -> u64 {
    // SAFETY: an all-zero timespec is valid.
    let mut t: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a writable timespec alive for the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    if rc != 0 {
        return 0;
    }
    (t.tv_sec as u64)
        .saturating_mul(1_000_000)
        .saturating_add(t.tv_nsec as u64 / 1_000)
}
