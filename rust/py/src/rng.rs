//! `Stream` and the Philox block functions.

use std::sync::Mutex;

use emberfl_core::rng::{self, StreamState};
use numpy::PyArray1;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::run_detached;

/// The Philox4x64-10 block function: 4 counter words, 2 key words -> 4 words.
#[pyfunction]
pub fn philox4x64_10(counter: [u64; 4], key: [u64; 2]) -> [u64; 4] {
    rng::philox4x64_10(counter, key)
}

/// The Philox4x32-10 block function: 4 counter words, 2 key words -> 4 words.
#[pyfunction]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    rng::philox4x32_10(counter, key)
}

/// A Philox4x64-10 stream keyed by `[seed, purpose]`, counter `[0, client, round, 0]`.
#[pyclass(frozen, module = "emberfl._core")]
pub struct Stream {
    inner: Mutex<rng::Stream>,
}

type StateTuple = (u64, u64, u64, u64, u64, u64, usize, bool, u32);

impl Stream {
    fn with<T>(&self, f: impl FnOnce(&mut rng::Stream) -> T) -> T {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }
}

#[pymethods]
impl Stream {
    #[new]
    #[pyo3(signature = (seed, *, purpose = 0, client = 0, round = 0))]
    fn new(seed: u64, purpose: u64, client: u64, round: u64) -> Self {
        Self {
            inner: Mutex::new(rng::Stream::for_client(seed, purpose, client, round)),
        }
    }

    /// `n` raw 64-bit words.
    fn random_raw<'py>(&self, py: Python<'py>, n: usize) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let v = run_detached(py, n, || self.with(|s| s.raw_vec(n)))?;
        Ok(PyArray1::from_vec(py, v))
    }

    /// `n` doubles uniform in [0, 1).
    fn random<'py>(&self, py: Python<'py>, n: usize) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let v = run_detached(py, n, || self.with(|s| s.random_vec(n)))?;
        Ok(PyArray1::from_vec(py, v))
    }

    /// `n` standard normal doubles.
    fn normal<'py>(&self, py: Python<'py>, n: usize) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let v = run_detached(py, n, || {
            let mut v = vec![0f64; n];
            self.with(|s| s.fill_normal(&mut v));
            v
        })?;
        Ok(PyArray1::from_vec(py, v))
    }

    /// `n` int64 values uniform in `[low, high)`.
    fn integers<'py>(
        &self,
        py: Python<'py>,
        low: i64,
        high: i64,
        n: usize,
    ) -> PyResult<Bound<'py, PyArray1<i64>>> {
        if low >= high {
            return Err(PyValueError::new_err(format!(
                "integers: low={low} must be smaller than high={high}"
            )));
        }
        let v = run_detached(py, n, || {
            let mut v = vec![0i64; n];
            self.with(|s| s.fill_integers(low, high, &mut v));
            v
        })?;
        Ok(PyArray1::from_vec(py, v))
    }

    /// A random permutation of `0..n`.
    fn permutation<'py>(&self, py: Python<'py>, n: usize) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let v = run_detached(py, n, || self.with(|s| s.permutation(n)))?;
        Ok(PyArray1::from_vec(py, v))
    }

    /// `k` distinct values of `0..n` in random order.
    fn choice<'py>(
        &self,
        py: Python<'py>,
        n: usize,
        k: usize,
    ) -> PyResult<Bound<'py, PyArray1<i64>>> {
        if k > n {
            return Err(PyValueError::new_err(format!(
                "choice: cannot pick k={k} distinct values out of n={n}"
            )));
        }
        let v = run_detached(py, k, || self.with(|s| s.choice(n, k)))?;
        Ok(PyArray1::from_vec(py, v))
    }

    /// A 64-bit seed for `torch.Generator.manual_seed`.
    fn torch_seed(&self) -> u64 {
        self.with(|s| s.seed_u64())
    }

    /// The full state, as a tuple accepted by `Stream.from_state`.
    fn state(&self) -> StateTuple {
        let s = self.with(|s| s.state());
        (
            s.key[0],
            s.key[1],
            s.counter[0],
            s.counter[1],
            s.counter[2],
            s.counter[3],
            s.buffer_pos,
            s.has_uint32,
            s.uinteger,
        )
    }

    /// Rebuild a stream from `state()`.
    #[staticmethod]
    fn from_state(state: StateTuple) -> PyResult<Self> {
        let (k0, k1, c0, c1, c2, c3, pos, has, u) = state;
        if pos > 4 {
            return Err(PyValueError::new_err(format!(
                "invalid stream state: buffer position {pos} is greater than 4"
            )));
        }
        Ok(Self {
            inner: Mutex::new(rng::Stream::from_state(StreamState {
                key: [k0, k1],
                counter: [c0, c1, c2, c3],
                buffer_pos: pos,
                has_uint32: has,
                uinteger: u,
            })),
        })
    }

    /// An independent copy at the same position.
    fn copy(&self) -> Self {
        Self {
            inner: Mutex::new(self.with(|s| s.clone())),
        }
    }

    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let ctor = slf.get_type().getattr("from_state")?;
        let args = PyTuple::new(slf.py(), [slf.get().state()])?;
        Ok((ctor, args))
    }

    fn __repr__(&self) -> String {
        let s = self.with(|s| s.state());
        format!(
            "Stream(key=[{}, {}], counter=[{}, {}, {}, {}])",
            s.key[0], s.key[1], s.counter[0], s.counter[1], s.counter[2], s.counter[3]
        )
    }
}
