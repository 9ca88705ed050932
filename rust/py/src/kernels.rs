//! Aggregation kernels over arena slots; the GIL is released while they run.

use emberfl_core::{aggregate, maxpool, pool, Out};
use numpy::{
    PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray3, PyReadwriteArray1,
    PyReadwriteArray3, PyUntypedArrayMethods,
};
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

/// Squared distances (float64) from each of `slots` to `point` (float32, `dim` elements).
#[pyfunction]
#[pyo3(signature = (arena, slots, point, *, num_threads))]
pub fn sq_dists_to<'py>(
    py: Python<'py>,
    arena: &Bound<'py, Arena>,
    slots: Vec<usize>,
    point: PyReadonlyArray1<'py, f32>,
    num_threads: usize,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let p = thread_pool(num_threads)?;
    let a = &arena.get().inner;
    let point = point.as_slice()?;
    let work = slots.len() * a.dim();
    let r = run_detached(py, work, || {
        a.with_slots(&slots, |x| aggregate::sq_dists_to(x, point, &p))
            .and_then(|r| r)
    })?;
    let v = r.map_err(|e| kernel_error(py, e, &slots))?;
    Ok(PyArray1::from_vec(py, v))
}

fn pool_shape(dims: &[usize]) -> maxpool::Planes {
    maxpool::Planes {
        planes: dims[0],
        h: dims[1],
        w: dims[2],
    }
}

fn pool_window(kernel: (usize, usize), stride: (usize, usize)) -> maxpool::Window {
    maxpool::Window {
        kh: kernel.0,
        kw: kernel.1,
        sh: stride.0,
        sw: stride.1,
    }
}

/// Max-pool `input` (planes, h, w) into `out`, with each window's arg-max in `argmax`.
#[pyfunction]
#[pyo3(signature = (input, kernel, stride, out, argmax, *, num_threads))]
pub fn max_pool2d_forward(
    py: Python<'_>,
    input: PyReadonlyArray3<'_, f32>,
    kernel: (usize, usize),
    stride: (usize, usize),
    mut out: PyReadwriteArray3<'_, f32>,
    mut argmax: PyReadwriteArray3<'_, u8>,
    num_threads: usize,
) -> PyResult<()> {
    let p = thread_pool(num_threads)?;
    let shape = pool_shape(input.shape());
    let x = input.as_slice()?;
    let o = out.as_slice_mut()?;
    let a = argmax.as_slice_mut()?;
    run_detached(py, x.len(), || {
        maxpool::max_pool2d_forward(x, shape, pool_window(kernel, stride), o, a, &p)
    })?
    .map_err(|e| CoreError(e).into())
}

/// The gradient of `max_pool2d_forward`: `grad_in` (planes, h, w) is overwritten.
#[pyfunction]
#[pyo3(signature = (grad_out, argmax, kernel, stride, grad_in, *, num_threads))]
pub fn max_pool2d_backward(
    py: Python<'_>,
    grad_out: PyReadonlyArray3<'_, f32>,
    argmax: PyReadonlyArray3<'_, u8>,
    kernel: (usize, usize),
    stride: (usize, usize),
    mut grad_in: PyReadwriteArray3<'_, f32>,
    num_threads: usize,
) -> PyResult<()> {
    let p = thread_pool(num_threads)?;
    let shape = pool_shape(grad_in.shape());
    let g = grad_out.as_slice()?;
    let a = argmax.as_slice()?;
    let gi = grad_in.as_slice_mut()?;
    run_detached(py, gi.len(), || {
        maxpool::max_pool2d_backward(g, a, shape, pool_window(kernel, stride), gi, &p)
    })?
    .map_err(|e| CoreError(e).into())
}
