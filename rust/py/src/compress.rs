//! Compression kernels for client updates; the GIL is released while they run.

use emberfl_core::compress;
use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::CoreError;
use crate::run_detached;

/// Indices (uint32, ascending) of the `k` entries of `x` with the largest magnitude.
#[pyfunction]
pub fn top_k<'py>(
    py: Python<'py>,
    x: PyReadonlyArray1<'py, f32>,
    k: usize,
) -> PyResult<Bound<'py, PyArray1<u32>>> {
    let x = x.as_slice()?;
    let r = run_detached(py, x.len(), || compress::top_k(x, k))?;
    Ok(PyArray1::from_vec(py, r.map_err(CoreError)?))
}

/// Pack `values` (each below `2**bits`) into `bits` bits each, least significant first.
#[pyfunction]
pub fn pack_bits<'py>(
    py: Python<'py>,
    values: PyReadonlyArray1<'py, u32>,
    bits: u32,
) -> PyResult<Bound<'py, PyBytes>> {
    let v = values.as_slice()?;
    if !(1..=32).contains(&bits) || v.iter().any(|&x| bits < 32 && x >> bits != 0) {
        return Err(CoreError(emberfl_core::Error::InvalidArgument(format!(
            "pack_bits: every value must fit in bits={bits} (1..32)"
        )))
        .into());
    }
    let out = run_detached(py, v.len(), || compress::pack(v, bits))?;
    Ok(PyBytes::new(py, &out))
}

/// Unpack `count` values of `bits` bits each (the inverse of `pack_bits`).
#[pyfunction]
pub fn unpack_bits<'py>(
    py: Python<'py>,
    data: &[u8],
    count: usize,
    bits: u32,
) -> PyResult<Bound<'py, PyArray1<u32>>> {
    let r = run_detached(py, count, || compress::unpack(data, count, bits))?;
    Ok(PyArray1::from_vec(py, r.map_err(CoreError)?))
}

/// QSGD: `(norm, packed bytes)` of `x` with `levels` levels and the uniforms `u`.
#[pyfunction]
pub fn qsgd_encode<'py>(
    py: Python<'py>,
    x: PyReadonlyArray1<'py, f32>,
    levels: u32,
    uniforms: PyReadonlyArray1<'py, f64>,
) -> PyResult<(f32, Bound<'py, PyBytes>)> {
    let (x, u) = (x.as_slice()?, uniforms.as_slice()?);
    let r = run_detached(py, x.len(), || compress::qsgd_encode(x, levels, u))?;
    let (norm, bytes) = r.map_err(CoreError)?;
    Ok((norm, PyBytes::new(py, &bytes)))
}

/// Decode `qsgd_encode`'s output into `count` float32 values.
#[pyfunction]
pub fn qsgd_decode<'py>(
    py: Python<'py>,
    norm: f32,
    data: &[u8],
    count: usize,
    levels: u32,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let r = run_detached(py, count, || {
        compress::qsgd_decode(norm, data, count, levels)
    })?;
    Ok(PyArray1::from_vec(py, r.map_err(CoreError)?))
}
