//! Snapshots of the embedded store on disk (`--data-dir`, docs/SNAPSHOT.md).
//!
//! A snapshot is written to `netswap.snapshot.tmp` in the data directory, fsynced,
//! renamed over `netswap.snapshot` and the directory fsynced: a crash at any moment
//! leaves the previous snapshot whole. A snapshot that cannot be read is never
//! deleted or replaced at start: the server refuses to start and says which file and
//! which byte is wrong. The encoding is [`netswap_proto::snapshot`]; this module only
//! handles files.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use netswap_proto::snapshot::{SnapshotLimits, SnapshotReader, SnapshotWriter};
use netswap_proto::{IdentityKey, Store};
use tracing::{info, warn};

/// The snapshot in a data directory.
pub const SNAPSHOT_FILE: &str = "netswap.snapshot";
/// Where a snapshot is written before it replaces the last one.
pub const TEMP_FILE: &str = "netswap.snapshot.tmp";
/// Held (locked) while a server uses the directory.
pub const LOCK_FILE: &str = "netswap.lock";

/// Buffer size for reading and writing snapshots.
const IO_BUFFER: usize = 1 << 20;

/// What a load or a save did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotReport {
    /// Records in the snapshot.
    pub records: u64,
    /// Data bytes in the snapshot.
    pub bytes: u64,
    /// How long it took.
    pub elapsed: Duration,
}

/// Why the snapshot could not be loaded; the server does not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file is damaged, truncated, of another format version or identity key, or
    /// claims more than the limits allow.
    #[error(
        "snapshot {path} cannot be loaded {cause}; it was left as it is (move it away to start empty)"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong, at which byte.
        cause: String,
    },
    /// The data directory cannot be used.
    #[error("data directory {path}: {source}")]
    Dir {
        /// The directory or file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// The data directory of a running server: holds its lock for as long as it lives.
#[derive(Debug)]
pub struct DataDir {
    dir: PathBuf,
    _lock: File,
}

impl DataDir {
    /// Creates the directory if needed and locks it, so that two servers never write
    /// snapshots into one directory; removes the unfinished snapshot a crash may have
    /// left behind.
    pub fn open(dir: &Path) -> Result<DataDir, LoadError> {
        let err = |path: PathBuf| move |source| LoadError::Dir { path, source };
        fs::create_dir_all(dir).map_err(err(dir.to_path_buf()))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(err(lock_path.clone()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(LoadError::Dir {
                    path: lock_path,
                    source: io::Error::new(
                        io::ErrorKind::WouldBlock,
                        "another netswap-server is using this data directory",
                    ),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(err(lock_path)(e)),
        }
        let tmp = dir.join(TEMP_FILE);
        if tmp.exists() {
            warn!(file = %tmp.display(), "discarding an unfinished snapshot (a write was interrupted); the last complete snapshot is kept");
            fs::remove_file(&tmp).map_err(err(tmp.clone()))?;
        }
        Ok(DataDir {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    /// The snapshot file.
    pub fn snapshot_path(&self) -> PathBuf {
        self.dir.join(SNAPSHOT_FILE)
    }

    /// Loads the snapshot, if there is one, into `store` (which must be empty). Its
    /// records' orphan grace starts `now`.
    pub fn load(
        &self,
        store: &Store,
        key: &IdentityKey,
        now: Instant,
    ) -> Result<Option<SnapshotReport>, LoadError> {
        let path = self.snapshot_path();
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(LoadError::Dir { path, source }),
        };
        let started = Instant::now();
        let corrupt = |cause: String| LoadError::Corrupt {
            path: path.clone(),
            cause,
        };
        let limits = SnapshotLimits {
            max_record_bytes: store.config().max_record_bytes,
        };
        let mut reader =
            SnapshotReader::new(BufReader::with_capacity(IO_BUFFER, file), key, limits)
                .map_err(|e| corrupt(e.to_string()))?;
        let mut restore = store.restore();
        loop {
            match reader.next_record() {
                Ok(Some(r)) => restore
                    .add(r)
                    .map_err(|e| corrupt(format!("at byte {}: {e}", reader.record_offset())))?,
                Ok(None) => break,
                Err(e) => return Err(corrupt(e.to_string())),
            }
        }
        let (records, bytes) = restore.finish(now);
        Ok(Some(SnapshotReport {
            records,
            bytes,
            elapsed: started.elapsed(),
        }))
    }

    /// Writes a snapshot of `store` and makes it the current one (blocking: call it
    /// from a blocking thread). On failure the previous snapshot stays.
    pub fn save(&self, store: &Store, key: &IdentityKey) -> io::Result<SnapshotReport> {
        let started = Instant::now();
        let tmp = self.dir.join(TEMP_FILE);
        let result = (|| {
            let file = File::create(&tmp)?;
            let created = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let mut writer =
                SnapshotWriter::new(BufWriter::with_capacity(IO_BUFFER, file), key, created)?;
            store.export(|chunk| {
                for r in &chunk {
                    writer.write(r)?;
                }
                Ok::<_, io::Error>(())
            })?;
            let (totals, out) = writer.finish()?;
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            drop(file);
            fs::rename(&tmp, self.snapshot_path())?;
            File::open(&self.dir)?.sync_all()?;
            Ok(totals)
        })();
        match result {
            Ok(totals) => Ok(SnapshotReport {
                records: totals.records,
                bytes: totals.bytes,
                elapsed: started.elapsed(),
            }),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }
}

/// Logs a finished snapshot.
pub fn log_saved(why: &str, r: &SnapshotReport) {
    info!(
        why,
        records = r.records,
        bytes = r.bytes,
        seconds = r.elapsed.as_secs_f64(),
        "snapshot written"
    );
}
