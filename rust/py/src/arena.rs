//! The `Arena` class: shared-memory slots exported through the buffer protocol.

use std::ffi::c_int;
use std::path::PathBuf;

use emberfl_core::{Backing, Handle, Location};
use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;

use crate::errors::CoreError;

/// `(kind, pid, fd, path, token0, token1, num_slots, dim)`.
pub type HandleTuple = (String, u32, i32, String, u64, u64, usize, usize);

/// A `num_slots` x `dim` float32 arena in shared memory. The memory stays mapped while this
/// object or any buffer exported from it is alive.
#[pyclass(frozen, module = "emberfl._core")]
pub struct Arena {
    pub(crate) inner: emberfl_core::Arena,
}

#[pymethods]
impl Arena {
    /// Create a zero-filled arena; `backing` is `"memfd"` or `"shm"` (a file in `shm_dir`).
    #[staticmethod]
    #[pyo3(signature = (num_slots, dim, *, backing = "memfd", shm_dir = None))]
    fn create(
        py: Python<'_>,
        num_slots: usize,
        dim: usize,
        backing: &str,
        shm_dir: Option<PathBuf>,
    ) -> PyResult<Self> {
        let backing = match backing {
            "memfd" => Backing::Memfd,
            "shm" => Backing::Shm {
                dir: shm_dir.unwrap_or_else(|| PathBuf::from("/dev/shm")),
            },
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown backing {other:?}: use \"memfd\" or \"shm\""
                )))
            }
        };
        let inner = py
            .detach(|| emberfl_core::Arena::create(num_slots, dim, &backing))
            .map_err(CoreError)?;
        Ok(Self { inner })
    }

    /// Attach to the arena described by a handle tuple (see `handle`); `private` maps it
    /// copy-on-write (this process's writes stay here).
    #[staticmethod]
    #[pyo3(signature = (handle, *, private = false))]
    fn attach(handle: HandleTuple, private: bool) -> PyResult<Self> {
        let (kind, pid, fd, path, t0, t1, num_slots, dim) = handle;
        let location = match kind.as_str() {
            "memfd" => Location::Memfd { pid, fd },
            "shm" => Location::Shm {
                path: PathBuf::from(path),
            },
            other => {
                return Err(PyValueError::new_err(format!(
                    "invalid arena handle: unknown kind {other:?}"
                )))
            }
        };
        let handle = Handle {
            location,
            token: [t0, t1],
            num_slots,
            dim,
        };
        let inner = if private {
            emberfl_core::Arena::attach_private(&handle)
        } else {
            emberfl_core::Arena::attach(&handle)
        }
        .map_err(CoreError)?;
        Ok(Self { inner })
    }

    /// The handle tuple another process attaches with.
    fn handle(&self) -> HandleTuple {
        let h = self.inner.handle();
        let (kind, pid, fd, path) = match h.location {
            Location::Memfd { pid, fd } => ("memfd", pid, fd, String::new()),
            Location::Shm { path } => ("shm", 0, -1, path.display().to_string()),
        };
        (
            kind.to_string(),
            pid,
            fd,
            path,
            h.token[0],
            h.token[1],
            h.num_slots,
            h.dim,
        )
    }

    /// Number of slots.
    #[getter]
    fn num_slots(&self) -> usize {
        self.inner.num_slots()
    }

    /// Parameters per slot.
    #[getter]
    fn dim(&self) -> usize {
        self.inner.dim()
    }

    /// Address of the first slot (to recognise tensors that view the arena).
    #[getter]
    fn data_address(&self) -> usize {
        self.inner.data_ptr().0 as usize
    }

    /// Bytes of all slots.
    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.data_ptr().1
    }

    /// File descriptor of the backing file in this process.
    #[getter]
    fn fd(&self) -> i32 {
        self.inner.raw_fd()
    }

    /// Remove a named arena's file (no-op for memfd); attached processes keep their mapping.
    fn unlink(&self) -> PyResult<()> {
        self.inner.unlink().map_err(CoreError)?;
        Ok(())
    }

    /// Copy slot `src` into slot `dst`.
    fn copy_slot(&self, py: Python<'_>, src: usize, dst: usize) -> PyResult<()> {
        let dim = self.inner.dim();
        crate::run_detached(py, dim, || self.inner.copy_slot(src, dst))?.map_err(CoreError)?;
        Ok(())
    }

    /// Export all slots as one writable byte buffer (`num_slots * dim * 4` bytes).
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let (ptr, len) = slf.get().inner.data_ptr();
        // SAFETY: `view` is the valid Py_buffer the interpreter passed us; `ptr`/`len` describe
        // the arena's slots, which stay mapped while `slf` is alive, and `PyBuffer_FillInfo`
        // stores a new reference to `slf` in `view->obj`, so every exported buffer keeps the
        // mapping alive.
        let rc = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                ptr.cast(),
                len as ffi::Py_ssize_t,
                0,
                flags,
            )
        };
        if rc != 0 {
            return Err(PyErr::take(slf.py())
                .unwrap_or_else(|| PyBufferError::new_err("cannot export the arena's buffer")));
        }
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!(
            "Arena(num_slots={}, dim={})",
            self.inner.num_slots(),
            self.inner.dim()
        )
    }
}
