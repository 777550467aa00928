//! The free-space guard: writes are refused while the disk holding the data directory has
//! less than `[engine] min_free_disk_bytes` free, as VictoriaMetrics'
//! `-storage.minFreeDiskSpaceBytes` does.
//!
//! The reserve is what lets a full disk be a state the store recovers from on its own. Our
//! own files (the WAL, segments) handle a write that fails for want of space, but RocksDB
//! does not always: after a failed write to its log, the next write can abort the process
//! (an assertion in Debian's build). So nothing the store does reaches the last bytes: the
//! write path ([`crate::Store::write`]) and every index write check the guard first, and a
//! flush or compaction whose commit is refused removes the segment files it wrote. Queries
//! keep working, and writes are taken again once space is freed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::{Error, Result};

/// Refuses writes while `path`'s filesystem has less than `min_free` bytes free.
#[derive(Debug)]
pub struct DiskGuard {
    path: PathBuf,
    min_free: u64,
    /// How long a reading is trusted.
    fresh: Duration,
    /// The last reading: when, and the bytes free then.
    last: Mutex<Option<(Instant, u64)>>,
}

impl DiskGuard {
    /// A guard of `path`'s filesystem that trusts a reading for `fresh`; `min_free` 0 turns
    /// it off. The write path reads at most every 100 ms (a WAL write that fails for want of
    /// space is cut back and refused, so a stale reading costs nothing); the index reads
    /// before every write, since RocksDB must not meet a full disk at all.
    pub fn new(path: &Path, min_free: u64, fresh: Duration) -> Self {
        Self {
            path: path.to_path_buf(),
            min_free,
            fresh,
            last: Mutex::new(None),
        }
    }

    /// A guard that lets everything through.
    pub fn off() -> Self {
        Self::new(Path::new("/"), 0, Duration::ZERO)
    }

    /// `Ok` while the disk has room; [`Error::LowDiskSpace`] while it has not.
    pub fn check(&self) -> Result<()> {
        if self.min_free == 0 {
            return Ok(());
        }
        let free = {
            let mut last = self.last.lock();
            match *last {
                Some((at, free)) if at.elapsed() < self.fresh => free,
                _ => {
                    // A filesystem that cannot be asked is not refused for it.
                    let free = free_bytes(&self.path).unwrap_or(u64::MAX);
                    *last = Some((Instant::now(), free));
                    free
                }
            }
        };
        if free < self.min_free {
            return Err(Error::LowDiskSpace {
                path: self.path.clone(),
                free,
                min_free: self.min_free,
            });
        }
        Ok(())
    }
}

/// The bytes an unprivileged user may still write on `path`'s filesystem (statvfs(3)).
#[allow(unsafe_code)]
fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("a path with a NUL byte"))?;
    // SAFETY: an all-zero statvfs is a valid value of a plain C struct of integers.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated string and `s` a writable statvfs, both alive for
    // the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((s.f_bavail as u64).saturating_mul(s.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserve_larger_than_the_disk_refuses_and_none_lets_through() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        assert!(free > 0);
        let e = DiskGuard::new(dir.path(), u64::MAX, Duration::ZERO)
            .check()
            .unwrap_err();
        assert!(e.is_storage_full(), "{e}");
        assert!(e.to_string().contains("min_free_disk_bytes"), "{e}");
        DiskGuard::new(dir.path(), 1, Duration::ZERO)
            .check()
            .unwrap();
        DiskGuard::off().check().unwrap();
    }
}
