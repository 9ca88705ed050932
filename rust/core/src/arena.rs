//! The shared-memory parameter arena: `num_slots` x `dim` float32 parameters in one mapping.
//!
//! This is the only module of the core with `unsafe` code: it maps shared memory (a memfd or a
//! file under `/dev/shm`) and hands out slices of it. The mapping lives as long as any
//! [`Arena`] (or clone of its inner `Arc`) does, so a slice can never outlive its memory.
//!
//! Layout of the mapping: a 4 KiB header (magic, a random 128-bit token, `num_slots`, `dim`)
//! followed by the slots, each `dim` float32 values, slot `i` at `HEADER + 4 * dim * i`.
//! Attaching checks the header against the handle, so a handle whose arena is gone (or whose
//! file-descriptor number was reused) is refused instead of mapping foreign memory.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, RwLock};

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"EMBRFL01";
/// Bytes before the first slot.
pub const HEADER_LEN: usize = 4096;

/// Where the arena's memory comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backing {
    /// An anonymous `memfd_create` file: freed by the kernel when the last process using it
    /// exits, even after a crash. Other processes attach through `/proc/PID/fd/FD`, so the
    /// creating process must be alive when they attach.
    Memfd,
    /// A named file in a tmpfs directory (normally `/dev/shm`): attachable by name; removed
    /// by [`Arena::unlink`] or when the creating arena is dropped.
    Shm {
        /// The tmpfs directory.
        dir: PathBuf,
    },
}

/// Where an attaching process finds the arena's memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// File descriptor `fd` of process `pid` (a memfd).
    Memfd {
        /// Creating process.
        pid: u32,
        /// Its file descriptor.
        fd: i32,
    },
    /// A named file.
    Shm {
        /// Path of the file.
        path: PathBuf,
    },
}

/// Everything another process needs to attach to an arena.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handle {
    /// Where the memory is.
    pub location: Location,
    /// Random token written in the header; must match.
    pub token: [u64; 2],
    /// Number of slots.
    pub num_slots: usize,
    /// Parameters per slot.
    pub dim: usize,
}

struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    file: File,
    /// Path to unlink on drop (named backing, creating side only).
    unlink_on_drop: RwLock<Option<PathBuf>>,
    /// The process that mapped it: a forked child drops its inherited copy without
    /// unlinking the parent's file.
    mapped_by: u32,
}

// SAFETY: the mapping is plain shared memory; it is not tied to a thread. All accesses to
// its contents go through the slice constructors below, whose aliasing rules are enforced by
// `Arena`'s lock (Rust side) and documented for the Python side.
unsafe impl Send for Mapping {}
// SAFETY: see `Send`; `&Mapping` only exposes the pointer and the file.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn map(file: File, len: usize) -> Result<Self> {
        Self::map_with(file, len, libc::MAP_SHARED)
    }

    /// `MAP_SHARED` (writes reach every process) or `MAP_PRIVATE` (copy-on-write: this
    /// process's writes stay in this mapping, which still reads the others' pages until it
    /// writes them).
    fn map_with(file: File, len: usize, flags: libc::c_int) -> Result<Self> {
        // SAFETY: a fresh mapping of `len` bytes of `file`, which is at least `len` bytes long
        // (the caller has sized or checked it). No existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Os {
                op: "mmap",
                target: format!("{len} bytes of shared memory"),
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| Error::Os {
            op: "mmap",
            target: "shared memory".into(),
            source: io::Error::other("null mapping"),
        })?;
        Ok(Self {
            ptr,
            len,
            file,
            unlink_on_drop: RwLock::new(None),
            mapped_by: std::process::id(),
        })
    }

    fn bytes(&self, offset: usize, len: usize) -> Vec<u8> {
        assert!(offset + len <= self.len);
        let mut out = vec![0u8; len];
        // SAFETY: `offset + len <= self.len`, so the source range is inside the mapping; the
        // destination is a fresh vector of `len` bytes; the ranges cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(offset), out.as_mut_ptr(), len);
        }
        out
    }

    fn write_bytes(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.len);
        // SAFETY: the destination range is inside the mapping (asserted); the source is a
        // separate Rust slice, so the ranges cannot overlap. Only the header is written this
        // way, before the arena is shared.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len());
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what `mmap` returned; the mapping is dropped only
        // when the last `Arc<Mapping>` goes, so no slice into it is alive.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
        let path = self
            .unlink_on_drop
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(path) = path {
            if std::process::id() == self.mapped_by {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Destination of a kernel that writes one slot's worth of values.
pub enum Out<'a> {
    /// A slot of the arena.
    Slot(usize),
    /// A caller-owned buffer of `dim` values (must not overlap the arena).
    Buffer(&'a mut [f32]),
}

/// A `num_slots` x `dim` float32 shared-memory arena.
pub struct Arena {
    map: Arc<Mapping>,
    num_slots: usize,
    dim: usize,
    token: [u64; 2],
    location: Location,
    /// Serialises kernels on this arena: writers take it exclusively.
    lock: RwLock<()>,
}

fn random_token() -> Result<[u64; 2]> {
    let mut buf = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|source| Error::Os {
            op: "read",
            target: "/dev/urandom".into(),
            source,
        })?;
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&buf[..8]);
    b.copy_from_slice(&buf[8..]);
    Ok([u64::from_le_bytes(a), u64::from_le_bytes(b)])
}

fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn fs_available(dir: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: `statvfs` only writes into the zeroed struct we pass; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path pointer and a valid out-pointer to `st`.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

fn reserve(file: &File, len: u64, location: &str, available: Option<u64>) -> Result<()> {
    file.set_len(len).map_err(|source| Error::Os {
        op: "ftruncate",
        target: location.to_string(),
        source,
    })?;
    // SAFETY: plain syscall on a file descriptor we own; no memory is passed.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
    match rc {
        0 => Ok(()),
        libc::ENOSPC | libc::ENOMEM | libc::EFBIG => Err(Error::OutOfSharedMemory {
            requested: len,
            available: available.unwrap_or(0),
            location: location.to_string(),
        }),
        errno => Err(Error::Os {
            op: "posix_fallocate",
            target: location.to_string(),
            source: io::Error::from_raw_os_error(errno),
        }),
    }
}

impl Arena {
    /// Bytes the mapping of a `num_slots` x `dim` arena takes.
    pub fn total_len(num_slots: usize, dim: usize) -> Result<usize> {
        num_slots
            .checked_mul(dim)
            .and_then(|n| n.checked_mul(4))
            .and_then(|n| n.checked_add(HEADER_LEN))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "an arena of {num_slots} x {dim} floats is too large"
                ))
            })
    }

    /// Create a zero-filled arena and reserve its memory up front, so running out of memory
    /// is reported here rather than as a SIGBUS on first touch.
    pub fn create(num_slots: usize, dim: usize, backing: &Backing) -> Result<Self> {
        if num_slots == 0 || dim == 0 {
            return Err(Error::InvalidArgument(format!(
                "an arena needs at least one slot and one parameter, got num_slots={num_slots}, dim={dim}"
            )));
        }
        let len = Self::total_len(num_slots, dim)?;
        let token = random_token()?;
        let (file, location, unlink) = match backing {
            Backing::Memfd => {
                let name = c"emberfl-arena";
                let available = mem_available();
                if let Some(avail) = available {
                    if len as u64 > avail {
                        return Err(Error::OutOfSharedMemory {
                            requested: len as u64,
                            available: avail,
                            location: "memory (memfd)".into(),
                        });
                    }
                }
                // SAFETY: `name` is a valid C string; the flags are valid memfd flags.
                let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
                if fd < 0 {
                    return Err(Error::Os {
                        op: "memfd_create",
                        target: "arena".into(),
                        source: io::Error::last_os_error(),
                    });
                }
                // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
                let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                reserve(&file, len as u64, "memory (memfd)", available)?;
                let location = Location::Memfd {
                    pid: std::process::id(),
                    fd,
                };
                (file, location, None)
            }
            Backing::Shm { dir } => {
                let available = fs_available(dir);
                if let Some(avail) = available {
                    // Checked first: reserving more than the file system has would fill it
                    // up before failing.
                    if len as u64 > avail {
                        return Err(Error::OutOfSharedMemory {
                            requested: len as u64,
                            available: avail,
                            location: dir.display().to_string(),
                        });
                    }
                }
                let path = dir.join(format!("emberfl-{:016x}{:016x}", token[0], token[1]));
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|source| Error::Os {
                        op: "open",
                        target: path.display().to_string(),
                        source,
                    })?;
                let where_ = dir.display().to_string();
                if let Err(e) = reserve(&file, len as u64, &where_, available) {
                    let _ = std::fs::remove_file(&path);
                    return Err(e);
                }
                (file, Location::Shm { path: path.clone() }, Some(path))
            }
        };
        let map = match Mapping::map(file, len) {
            Ok(m) => m,
            Err(e) => {
                if let Some(p) = &unlink {
                    let _ = std::fs::remove_file(p);
                }
                return Err(e);
            }
        };
        *map.unlink_on_drop
            .write()
            .unwrap_or_else(|e| e.into_inner()) = unlink;
        let mut header = Vec::with_capacity(40);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&token[0].to_le_bytes());
        header.extend_from_slice(&token[1].to_le_bytes());
        header.extend_from_slice(&(num_slots as u64).to_le_bytes());
        header.extend_from_slice(&(dim as u64).to_le_bytes());
        map.write_bytes(0, &header);
        Ok(Self {
            map: Arc::new(map),
            num_slots,
            dim,
            token,
            location,
            lock: RwLock::new(()),
        })
    }

    /// Map the arena described by `handle` (from this or another process).
    pub fn attach(handle: &Handle) -> Result<Self> {
        Self::attach_with(handle, false)
    }

    /// Map the arena described by `handle` copy-on-write: reads see the arena (as of each
    /// page's first write here, later writes by others for pages not yet written), writes
    /// stay private to this mapping and never reach the arena or other processes. The file
    /// is opened read-only.
    pub fn attach_private(handle: &Handle) -> Result<Self> {
        Self::attach_with(handle, true)
    }

    fn attach_with(handle: &Handle, private: bool) -> Result<Self> {
        let path = match &handle.location {
            Location::Memfd { pid, fd } => PathBuf::from(format!("/proc/{pid}/fd/{fd}")),
            Location::Shm { path } => path.clone(),
        };
        let describe = || match &handle.location {
            Location::Memfd { pid, fd } => format!("memfd {fd} of process {pid}"),
            Location::Shm { path } => path.display().to_string(),
        };
        let file = match OpenOptions::new().read(true).write(!private).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::StaleHandle(format!(
                    "{} no longer exists (the creating process exited, or the arena was closed or unlinked)",
                    describe()
                )))
            }
            Err(source) => {
                return Err(Error::Os {
                    op: "open",
                    target: describe(),
                    source,
                })
            }
        };
        let len = Self::total_len(handle.num_slots, handle.dim)?;
        let actual = file
            .metadata()
            .map_err(|source| Error::Os {
                op: "fstat",
                target: describe(),
                source,
            })?
            .len();
        if actual != len as u64 {
            return Err(Error::StaleHandle(format!(
                "{} is {actual} bytes, but the handle describes a {len}-byte arena: it belongs to something else",
                describe()
            )));
        }
        let flags = if private {
            libc::MAP_PRIVATE
        } else {
            libc::MAP_SHARED
        };
        let map = Mapping::map_with(file, len, flags)?;
        let header = map.bytes(0, 40);
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[i..i + 8]);
            u64::from_le_bytes(b)
        };
        if &header[..8] != MAGIC
            || word(8) != handle.token[0]
            || word(16) != handle.token[1]
            || word(24) != handle.num_slots as u64
            || word(32) != handle.dim as u64
        {
            return Err(Error::StaleHandle(format!(
                "{} is not the arena this handle was made for (token mismatch)",
                describe()
            )));
        }
        Ok(Self {
            map: Arc::new(map),
            num_slots: handle.num_slots,
            dim: handle.dim,
            token: handle.token,
            location: handle.location.clone(),
            lock: RwLock::new(()),
        })
    }

    /// The handle another process attaches with.
    pub fn handle(&self) -> Handle {
        Handle {
            location: self.location.clone(),
            token: self.token,
            num_slots: self.num_slots,
            dim: self.dim,
        }
    }

    /// Number of slots.
    pub fn num_slots(&self) -> usize {
        self.num_slots
    }

    /// Parameters per slot.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Remove the arena's name from the file system (named backing only; no-op for memfd).
    /// Processes already attached keep their mapping; new ones can no longer attach.
    pub fn unlink(&self) -> Result<()> {
        if let Location::Shm { path } = &self.location {
            let mut guard = self
                .map
                .unlink_on_drop
                .write()
                .unwrap_or_else(|e| e.into_inner());
            *guard = None;
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(Error::Os {
                        op: "unlink",
                        target: path.display().to_string(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// Pointer to the first slot and the byte length of all slots, for exporting the memory
    /// (e.g. through Python's buffer protocol). Valid while this arena (or a clone of its
    /// mapping) is alive.
    pub fn data_ptr(&self) -> (*mut u8, usize) {
        // SAFETY: HEADER_LEN < len, so the pointer stays inside the mapping.
        let ptr = unsafe { self.map.ptr.as_ptr().add(HEADER_LEN) };
        (ptr, self.num_slots * self.dim * 4)
    }

    /// Whether `[ptr, ptr + len)` overlaps the arena's memory.
    pub fn overlaps(&self, ptr: *const u8, len: usize) -> bool {
        let start = self.map.ptr.as_ptr() as usize;
        let end = start + self.map.len;
        let p = ptr as usize;
        p < end && p.saturating_add(len) > start
    }

    /// Check a slot index.
    pub fn check_slot(&self, index: usize) -> Result<()> {
        if index >= self.num_slots {
            return Err(Error::SlotIndex {
                index,
                num_slots: self.num_slots,
            });
        }
        Ok(())
    }

    fn slot_ptr(&self, index: usize) -> *mut f32 {
        debug_assert!(index < self.num_slots);
        // SAFETY: index < num_slots, so the offset is inside the mapping, and it is 4-byte
        // aligned (page-aligned base + HEADER_LEN + 4 * dim * index).
        unsafe {
            self.map
                .ptr
                .as_ptr()
                .add(HEADER_LEN + 4 * self.dim * index)
                .cast::<f32>()
        }
    }

    /// Run `f` on read-only views of `slots` (validated). Kernels on the same arena that
    /// write take the lock exclusively, so no slot seen here is being written by Rust code.
    pub fn with_slots<R>(&self, slots: &[usize], f: impl FnOnce(&[&[f32]]) -> R) -> Result<R> {
        for &s in slots {
            self.check_slot(s)?;
        }
        let _guard = self.lock.read().unwrap_or_else(|e| e.into_inner());
        let views: Vec<&[f32]> = slots
            .iter()
            // SAFETY: each slot is `dim` f32 values inside the live mapping (checked index);
            // the read lock excludes Rust writers for the lifetime of the views.
            .map(|&s| unsafe { std::slice::from_raw_parts(self.slot_ptr(s), self.dim) })
            .collect();
        Ok(f(&views))
    }

    /// Run `f` on read-only views of `inputs` and a scratch output of `dim` values; if `f`
    /// succeeds, copy the scratch into `out`. On error `out` is left untouched, and `out` may
    /// be one of the inputs.
    pub fn with_output<R>(
        &self,
        inputs: &[usize],
        out: Out<'_>,
        f: impl FnOnce(&[&[f32]], &mut [f32]) -> Result<R>,
    ) -> Result<R> {
        for &s in inputs {
            self.check_slot(s)?;
        }
        match &out {
            Out::Slot(s) => self.check_slot(*s)?,
            Out::Buffer(buf) => {
                if buf.len() != self.dim {
                    return Err(Error::Length {
                        what: "the output buffer",
                        got: buf.len(),
                        expected: self.dim,
                    });
                }
                if self.overlaps(buf.as_ptr().cast(), buf.len() * 4) {
                    return Err(Error::InvalidArgument(
                        "the output buffer lies inside the arena; pass its slot index instead"
                            .into(),
                    ));
                }
            }
        }
        let _guard = self.lock.write().unwrap_or_else(|e| e.into_inner());
        let mut scratch = vec![0f32; self.dim];
        let result = {
            let views: Vec<&[f32]> = inputs
                .iter()
                // SAFETY: as in `with_slots`; the write lock excludes all other Rust access,
                // and the only mutable memory in this scope is `scratch`, a separate vector.
                .map(|&s| unsafe { std::slice::from_raw_parts(self.slot_ptr(s), self.dim) })
                .collect();
            f(&views, &mut scratch)?
        };
        match out {
            Out::Slot(s) => {
                // SAFETY: slot `s` is inside the mapping; the input views are dropped and we
                // hold the write lock, so this is the only Rust reference to the slot.
                let dst = unsafe { std::slice::from_raw_parts_mut(self.slot_ptr(s), self.dim) };
                dst.copy_from_slice(&scratch);
            }
            Out::Buffer(buf) => buf.copy_from_slice(&scratch),
        }
        Ok(result)
    }

    /// Copy slot `src` into slot `dst`.
    pub fn copy_slot(&self, src: usize, dst: usize) -> Result<()> {
        self.check_slot(src)?;
        self.check_slot(dst)?;
        if src == dst {
            return Ok(());
        }
        let _guard = self.lock.write().unwrap_or_else(|e| e.into_inner());
        // SAFETY: distinct, in-range slots never overlap; the write lock excludes other Rust
        // access for the duration of the copy.
        unsafe {
            std::ptr::copy_nonoverlapping(self.slot_ptr(src), self.slot_ptr(dst), self.dim);
        }
        Ok(())
    }

    /// Raw fd of the backing file (for diagnostics and tests).
    pub fn raw_fd(&self) -> i32 {
        self.map.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_write_attach_read() {
        let a = Arena::create(3, 5, &Backing::Memfd).unwrap();
        a.with_output(&[], Out::Slot(1), |_, out| {
            for (i, x) in out.iter_mut().enumerate() {
                *x = i as f32;
            }
            Ok(())
        })
        .unwrap();
        let b = Arena::attach(&a.handle()).unwrap();
        let got = b.with_slots(&[1], |v| v[0].to_vec()).unwrap();
        assert_eq!(got, vec![0.0, 1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn private_attach_keeps_its_writes() {
        let fill = |arena: &Arena, value: f32| {
            arena
                .with_output(&[], Out::Slot(0), |_, out| {
                    out.fill(value);
                    Ok(())
                })
                .unwrap();
        };
        for backing in [
            Backing::Memfd,
            Backing::Shm {
                dir: std::env::temp_dir(),
            },
        ] {
            let a = Arena::create(2, 2048, &backing).unwrap();
            fill(&a, 1.0);
            let p = Arena::attach_private(&a.handle()).unwrap();
            assert_eq!(p.with_slots(&[0], |v| v[0][7]).unwrap(), 1.0);
            fill(&p, 5.0);
            assert_eq!(p.with_slots(&[0], |v| v[0][7]).unwrap(), 5.0);
            assert_eq!(a.with_slots(&[0], |v| v[0][7]).unwrap(), 1.0);
            let q = Arena::attach_private(&a.handle()).unwrap();
            assert_eq!(q.with_slots(&[0], |v| v[0][7]).unwrap(), 1.0);
            // Pages this mapping never wrote still show the arena's later writes.
            a.with_output(&[], Out::Slot(1), |_, out| {
                out.fill(3.0);
                Ok(())
            })
            .unwrap();
            assert_eq!(p.with_slots(&[1], |v| v[0][0]).unwrap(), 3.0);
        }
    }

    #[test]
    fn named_backing_is_unlinked() {
        let dir = std::env::temp_dir();
        let a = Arena::create(2, 4, &Backing::Shm { dir: dir.clone() }).unwrap();
        let Location::Shm { path } = a.handle().location else {
            panic!("expected a named arena")
        };
        assert!(path.exists());
        let b = Arena::attach(&a.handle()).unwrap();
        a.unlink().unwrap();
        assert!(!path.exists());
        assert!(b.with_slots(&[0], |v| v[0].len()).unwrap() == 4);
        assert!(matches!(
            Arena::attach(&a.handle()),
            Err(Error::StaleHandle(_))
        ));
    }

    #[test]
    fn foreign_handle_is_refused() {
        let a = Arena::create(2, 4, &Backing::Memfd).unwrap();
        let mut h = a.handle();
        h.token[0] ^= 1;
        assert!(matches!(Arena::attach(&h), Err(Error::StaleHandle(_))));
        let mut h = a.handle();
        h.dim = 5;
        assert!(matches!(Arena::attach(&h), Err(Error::StaleHandle(_))));
    }

    #[test]
    fn output_untouched_on_error() {
        let a = Arena::create(2, 3, &Backing::Memfd).unwrap();
        a.with_output(&[], Out::Slot(0), |_, o| {
            o.fill(7.0);
            Ok(())
        })
        .unwrap();
        let r: Result<()> = a.with_output(&[0], Out::Slot(0), |_, o| {
            o.fill(1.0);
            Err(Error::InvalidArgument("boom".into()))
        });
        assert!(r.is_err());
        assert_eq!(a.with_slots(&[0], |v| v[0].to_vec()).unwrap(), vec![7.0; 3]);
    }

    #[test]
    fn bad_indices() {
        let a = Arena::create(2, 3, &Backing::Memfd).unwrap();
        assert!(matches!(
            a.check_slot(2),
            Err(Error::SlotIndex {
                index: 2,
                num_slots: 2
            })
        ));
        assert!(Arena::create(0, 3, &Backing::Memfd).is_err());
        assert!(matches!(
            Arena::create(1 << 40, 1 << 10, &Backing::Memfd),
            Err(Error::OutOfSharedMemory { .. })
        ));
    }
}
