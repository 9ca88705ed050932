//! Aggregation kernels over arena slots; the GIL is released while they run.

use emberfl_core::{aggregate, pool, Out};
use numpy::{PyArray1, PyArrayMethods, PyReadwriteArray1};
use pyo3::prelude::*;

use crate::arena::Arena;
use crate::errors::{kernel_error, CoreError};
use crate::run_detached;

fn thread_pool(num_threads: usize) -> PyResult<std::sync::Arc<rayon::ThreadPool>> {
    Ok(pool::pool(num_threads).map_err(CoreError)?)
}

/// Run an output-producing kernel with `out` either a slot index or a float32 array.
fn with_out(
    py: Python<'_>,
    arena: &Arena,
    slots: &[usize],
    out: &Bound<'_, PyAny>,
    kernel: impl FnOnce(&[&[f32]], &mut [f32]) -> emberfl_core::Result<()> + Send,
) -> PyResult<()> {
    let work = slots.len() * arena.inner.dim();
    let result = if let Ok(slot) = out.extract::<usize>() {
        run_detached(py, work, || {
            arena.inner.with_output(slots, Out::Slot(slot), kernel)
        })?
    } else {
        let array = out.cast::<PyArray1<f32>>()?;
        let mut rw: PyReadwriteArray1<'_, f32> = array.try_readwrite()?;
        let buf = rw.as_slice_mut()?;
        run_detached(py, work, || {
            arena.inner.with_output(slots, Out::Buffer(buf), kernel)
        })?
    };
    result.map_err(|e| kernel_error(py, e, slots))
}

/// `out = sum_k w_k * slot_k / sum_k w_k`; `out` is a slot index or a float32 array.
#[pyfunction]
#[pyo3(signature = (arena, slots, weights, out, *, num_threads))]
pub fn weighted_mean(
    py: Python<'_>,
    arena: &Bound<'_, Arena>,
    slots: Vec<usize>,
    weights: Vec<f64>,
    out: &Bound<'_, PyAny>,
    num_threads: usize,
) -> PyResult<()> {
    let p = thread_pool(num_threads)?;
    with_out(py, arena.get(), &slots, out, |x, o| {
        aggregate::weighted_mean(x, &weights, o, &p)
    })
}

/// Coordinate-wise median of `slots` into `out`.
#[pyfunction]
#[pyo3(signature = (arena, slots, out, *, num_threads))]
pub fn median(
    py: Python<'_>,
    arena: &Bound<'_, Arena>,
    slots: Vec<usize>,
    out: &Bound<'_, PyAny>,
    num_threads: usize,
) -> PyResult<()> {
    let p = thread_pool(num_threads)?;
    with_out(py, arena.get(), &slots, out, |x, o| {
        aggregate::median(x, o, &p)
    })
}

/// Coordinate-wise trimmed mean of `slots` into `out`.
#[pyfunction]
#[pyo3(signature = (arena, slots, out, beta, *, num_threads))]
pub fn trimmed_mean(
    py: Python<'_>,
    arena: &Bound<'_, Arena>,
    slots: Vec<usize>,
    out: &Bound<'_, PyAny>,
    beta: f64,
    num_threads: usize,
) -> PyResult<()> {
    let p = thread_pool(num_threads)?;
    with_out(py, arena.get(), &slots, out, |x, o| {
        aggregate::trimmed_mean(x, o, beta, &p)
    })
}

/// L2 norms (float64) of `slots`.
#[pyfunction]
#[pyo3(signature = (arena, slots, *, num_threads))]
pub fn norms<'py>(
    py: Python<'py>,
    arena: &Bound<'py, Arena>,
    slots: Vec<usize>,
    num_threads: usize,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let p = thread_pool(num_threads)?;
    let a = &arena.get().inner;
    let work = slots.len() * a.dim();
    let r = run_detached(py, work, || {
        a.with_slots(&slots, |x| aggregate::norms(x, &p))
            .and_then(|r| r)
    })?;
    let v = r.map_err(|e| kernel_error(py, e, &slots))?;
    Ok(PyArray1::from_vec(py, v))
}

/// Squared distances between all pairs of `slots`, flattened row-major (K*K float64).
#[pyfunction]
#[pyo3(signature = (arena, slots, *, num_threads))]
pub fn pairwise_sq_dists<'py>(
    py: Python<'py>,
    arena: &Bound<'py, Arena>,
    slots: Vec<usize>,
    num_threads: usize,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let p = thread_pool(num_threads)?;
    let a = &arena.get().inner;
    let work = slots.len() * slots.len() * a.dim();
    let r = run_detached(py, work, || {
        a.with_slots(&slots, |x| aggregate::pairwise_sq_dists(x, &p))
            .and_then(|r| r)
    })?;
    let v = r.map_err(|e| kernel_error(py, e, &slots))?;
    Ok(PyArray1::from_vec(py, v))
}
