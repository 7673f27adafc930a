//! The data directory of the embedded spool: private to the gateway's user, and owned by one
//! process at a time.
//!
//! Invariants and failure semantics:
//! - A directory the gateway creates is created with mode 0700. An existing one keeps its
//!   owner and group; access for other users (the `o` bits) is removed, since the spool
//!   holds event payloads and the ids of every user. Access for a group is kept (Kubernetes'
//!   `fsGroup` gives the volume to the pod's own group) and only logged as a warning when
//!   the group is not the process's own.
//! - While a [`DataDirLock`] lives, this process holds an exclusive advisory lock (`flock`)
//!   on `<data_dir>/LOCK`, and the file names its pid. A second process trying to take it
//!   fails at once with [`DataDirError::Locked`], naming the directory and the holder, before
//!   it opens anything else in the directory: two processes on one spool would lease, ack
//!   and dead-letter each other's events.
//! - The kernel drops the lock with the last descriptor of the file: when the lock is
//!   dropped, and when the process dies in any way (SIGKILL included), so a crash never
//!   leaves a stale lock to clean up. The pid in the file is information, not the lock.
//! - `flock` locks belong to the open file, not the process: a second [`DataDirLock`] on the
//!   same directory in the same process is refused too (tests rely on this).
//! - Not a guard against two machines sharing a network file system: `flock` over NFS is
//!   not reliable. One volume belongs to one node (`ReadWriteOnce`).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The lock file's name inside the data directory.
pub const LOCK_FILE: &str = "LOCK";

/// Why the data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("cannot create the data directory {}: {source}", dir.display())]
    Create { dir: PathBuf, source: io::Error },
    #[error("the data directory {} is not a directory", dir.display())]
    NotADirectory { dir: PathBuf },
    #[error("cannot lock the data directory {}: {source}", dir.display())]
    Lock { dir: PathBuf, source: io::Error },
    #[error(
        "the data directory {} is in use by another gateway process{}; only one process may use a data directory (stop the other one, or give this one its own data_dir)",
        dir.display(),
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    Locked { dir: PathBuf, holder: Option<u32> },
}

/// The exclusive lock on a data directory, held until dropped.
#[derive(Debug)]
pub struct DataDirLock {
    dir: PathBuf,
    /// Holding the descriptor holds the lock.
    _file: File,
}

impl DataDirLock {
    /// Creates `dir` if missing (mode 0700), tightens it (see the module header) and takes
    /// its lock, or says which process holds it.
    pub fn acquire(dir: &Path) -> Result<DataDirLock, DataDirError> {
        prepare(dir)?;
        let path = dir.join(LOCK_FILE);
        let lock_error = |source| DataDirError::Lock {
            dir: dir.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(lock_error)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(DataDirError::Locked {
                    dir: dir.to_path_buf(),
                    holder: holder_pid(&mut file),
                })
            }
            Err(fs::TryLockError::Error(source)) => return Err(lock_error(source)),
        }
        write_pid(&mut file).map_err(lock_error)?;
        Ok(DataDirLock {
            dir: dir.to_path_buf(),
            _file: file,
        })
    }

    /// The locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Creates `dir` with mode 0700 if missing; otherwise removes other users' access to it and
/// warns when a foreign group can read it.
pub fn prepare(dir: &Path) -> Result<(), DataDirError> {
    let create_error = |source| DataDirError::Create {
        dir: dir.to_path_buf(),
        source,
    };
    match fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => {
            return Err(DataDirError::NotADirectory {
                dir: dir.to_path_buf(),
            })
        }
        Ok(meta) => tighten(dir, &meta),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Parents are created as the umask says; only the data directory itself is
            // made private.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(parent).map_err(create_error)?;
            }
            match DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => {}
                // Created meanwhile by someone else: treat it as an existing directory.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let meta = fs::metadata(dir).map_err(create_error)?;
                    tighten(dir, &meta);
                }
                Err(e) => return Err(create_error(e)),
            }
        }
        Err(e) => return Err(create_error(e)),
    }
    Ok(())
}

/// Removes the `o` bits of an existing data directory and warns about a foreign group's
/// access. Failing to change the mode (not the owner) is a warning, not an error: the
/// directory still works.
fn tighten(dir: &Path, meta: &fs::Metadata) {
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o007 != 0 {
        let tightened = mode & !0o007;
        match fs::set_permissions(dir, fs::Permissions::from_mode(tightened)) {
            Ok(()) => tracing::warn!(
                data_dir = %dir.display(),
                from = format!("{mode:o}"),
                to = format!("{tightened:o}"),
                "the data directory was open to other users; their access was removed"
            ),
            Err(e) => tracing::warn!(
                data_dir = %dir.display(),
                mode = format!("{mode:o}"),
                error = %e,
                "the data directory is open to other users and its mode cannot be changed"
            ),
        }
    }
    if mode & 0o070 != 0 && !is_own_group(meta.gid()) {
        tracing::warn!(
            data_dir = %dir.display(),
            mode = format!("{mode:o}"),
            gid = meta.gid(),
            "members of the data directory's group can read the spool (event payloads)"
        );
    }
}

/// Whether `gid` is the process's effective group or one of its supplementary groups.
fn is_own_group(gid: u32) -> bool {
    // SAFETY: getegid has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    let egid = unsafe { libc::getegid() };
    if egid == gid {
        return true;
    }
    let mut groups = vec![0 as libc::gid_t; 256];
    // SAFETY: the buffer holds `groups.len()` entries; getgroups writes at most that many
    // and returns how many it wrote, or -1 (then none are used).
    #[allow(unsafe_code)]
    let count = unsafe { libc::getgroups(groups.len() as libc::c_int, groups.as_mut_ptr()) };
    usize::try_from(count)
        .map(|n| groups[..n.min(groups.len())].contains(&gid))
        .unwrap_or(false)
}

/// Replaces the lock file's content with this process's pid.
fn write_pid(file: &mut File) -> io::Result<()> {
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(format!("{}\n", std::process::id()).as_bytes())?;
    file.flush()
}

/// The pid the holder wrote, if the file names one.
fn holder_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn a_new_directory_is_private_and_names_its_holder() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("nested").join("data");
        let lock = DataDirLock::acquire(&dir).expect("first lock");
        assert_eq!(lock.dir(), dir);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(LOCK_FILE)), 0o600);
        let text = fs::read_to_string(dir.join(LOCK_FILE)).expect("lock file");
        assert_eq!(text.trim(), std::process::id().to_string());

        let err = DataDirLock::acquire(&dir).expect_err("second lock");
        match &err {
            DataDirError::Locked { holder, .. } => {
                assert_eq!(*holder, Some(std::process::id()))
            }
            other => panic!("unexpected error: {other}"),
        }
        let message = err.to_string();
        assert!(message.contains(&dir.display().to_string()), "{message}");
        assert!(
            message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );

        drop(lock);
        let again = DataDirLock::acquire(&dir).expect("lock after release");
        drop(again);
    }

    #[test]
    fn an_existing_directory_loses_other_users_access_and_keeps_the_group() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("data");
        fs::create_dir(&dir).expect("mkdir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o775)).expect("chmod");
        let _lock = DataDirLock::acquire(&dir).expect("lock");
        assert_eq!(mode(&dir), 0o770);
    }

    #[test]
    fn a_file_in_place_of_the_directory_is_refused() {
        let root = tempfile::tempdir().expect("tempdir");
        let path = root.path().join("data");
        fs::write(&path, b"not a directory").expect("write");
        let err = DataDirLock::acquire(&path).expect_err("a file");
        assert!(matches!(err, DataDirError::NotADirectory { .. }), "{err}");
    }
}
