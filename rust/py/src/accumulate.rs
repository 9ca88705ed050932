//! The `Accumulator` class: a streaming float64 weighted sum; the GIL is released while it adds.

use std::sync::Mutex;

use emberfl_core::pool;
use numpy::{PyArray1, PyReadonlyArray1, PyReadwriteArray1};
use pyo3::prelude::*;

use crate::errors::CoreError;
use crate::run_detached;

/// `sum_k w_k x_k` (float64) and `sum_k w_k` of the float32 vectors added so far, in order.
#[pyclass(frozen, module = "emberfl._core")]
pub struct Accumulator {
    inner: Mutex<emberfl_core::Accumulator>,
}

impl Accumulator {
    fn lock(&self) -> std::sync::MutexGuard<'_, emberfl_core::Accumulator> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Accumulator {
    /// Run an output kernel (`mean_into` / `sum_into`) into `out` with the GIL released.
    fn write(
        &self,
        py: Python<'_>,
        mut out: PyReadwriteArray1<'_, f32>,
        num_threads: usize,
        kernel: fn(
            &emberfl_core::Accumulator,
            &mut [f32],
            &rayon::ThreadPool,
        ) -> emberfl_core::Result<()>,
    ) -> PyResult<()> {
        let p = thread_pool(num_threads)?;
        let o = out.as_slice_mut()?;
        let r = run_detached(py, o.len(), || kernel(&self.lock(), o, &p))?;
        Ok(r.map_err(CoreError)?)
    }
}

fn thread_pool(num_threads: usize) -> PyResult<std::sync::Arc<rayon::ThreadPool>> {
    Ok(pool::pool(num_threads).map_err(CoreError)?)
}

#[pymethods]
impl Accumulator {
    /// An empty accumulator for vectors of `dim` float32 values.
    #[new]
    fn new(dim: usize) -> PyResult<Self> {
        let inner = emberfl_core::Accumulator::new(dim).map_err(CoreError)?;
        Ok(Self {
            inner: Mutex::new(inner),
        })
    }

    /// Elements per vector.
    #[getter]
    fn dim(&self) -> usize {
        self.lock().dim()
    }

    /// Sum of the weights added so far.
    #[getter]
    fn weight(&self) -> f64 {
        self.lock().weight()
    }

    /// Number of vectors added so far.
    #[getter]
    fn count(&self) -> usize {
        self.lock().count()
    }

    /// Add `weight * x`; a non-finite value or bad weight raises and changes nothing.
    #[pyo3(signature = (x, weight, *, num_threads))]
    fn add(
        &self,
        py: Python<'_>,
        x: PyReadonlyArray1<'_, f32>,
        weight: f64,
        num_threads: usize,
    ) -> PyResult<()> {
        let p = thread_pool(num_threads)?;
        let x = x.as_slice()?;
        let r = run_detached(py, x.len(), || self.lock().add(x, weight, &p))?;
        Ok(r.map_err(CoreError)?)
    }

    /// Add another accumulator's sums, weight and count.
    #[pyo3(signature = (other, *, num_threads))]
    fn merge(
        &self,
        py: Python<'_>,
        other: &Bound<'_, Accumulator>,
        num_threads: usize,
    ) -> PyResult<()> {
        let p = thread_pool(num_threads)?;
        let snapshot = other.get().lock().clone();
        let dim = snapshot.dim();
        let r = run_detached(py, dim, || self.lock().merge(&snapshot, &p))?;
        Ok(r.map_err(CoreError)?)
    }

    /// Write `float32(sum / weight)` into `out`.
    #[pyo3(signature = (out, *, num_threads))]
    fn mean(
        &self,
        py: Python<'_>,
        out: PyReadwriteArray1<'_, f32>,
        num_threads: usize,
    ) -> PyResult<()> {
        self.write(py, out, num_threads, emberfl_core::Accumulator::mean_into)
    }

    /// Write `float32(sum)` into `out`.
    #[pyo3(signature = (out, *, num_threads))]
    fn sum(
        &self,
        py: Python<'_>,
        out: PyReadwriteArray1<'_, f32>,
        num_threads: usize,
    ) -> PyResult<()> {
        self.write(py, out, num_threads, emberfl_core::Accumulator::sum_into)
    }

    /// A float64 copy of the running sum.
    fn sum64<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        PyArray1::from_slice(py, self.lock().sum())
    }

    /// Forget every vector.
    fn reset(&self) {
        self.lock().reset();
    }
}
