//! Conversion of core errors into the exceptions of `emberfl.errors`, in one place.

use emberfl_core::Error;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyType;

/// A core error on its way to Python.
pub struct CoreError(pub Error);

impl From<Error> for CoreError {
    fn from(e: Error) -> Self {
        Self(e)
    }
}

fn exception_name(e: &Error) -> &'static str {
    match e {
        Error::SlotIndex { .. } => "SlotIndexError",
        Error::EmptySlots { .. } | Error::InvalidArgument(_) => "InvalidArgumentError",
        Error::InvalidWeights(_) => "InvalidWeightsError",
        Error::NonFinite { .. } => "NonFiniteError",
        Error::Length { .. } => "TensorMismatchError",
        Error::OutOfSharedMemory { .. } | Error::Os { .. } => "SharedMemoryError",
        Error::StaleHandle(_) => "StaleHandleError",
    }
}

/// Build the Python exception for `e`, with `message` as its text.
pub fn to_pyerr(py: Python<'_>, e: &Error, message: String) -> PyErr {
    let name = exception_name(e);
    let class = py
        .import("emberfl.errors")
        .and_then(|m| m.getattr(name))
        .and_then(|c| c.cast_into::<PyType>().map_err(PyErr::from));
    match class {
        Ok(cls) => PyErr::from_type(cls, message),
        Err(_) => PyRuntimeError::new_err(message),
    }
}

impl From<CoreError> for PyErr {
    fn from(err: CoreError) -> Self {
        Python::attach(|py| to_pyerr(py, &err.0, err.0.to_string()))
    }
}

/// Map a kernel error whose `NonFinite::slot` is a position in `slots` to the slot id.
pub fn kernel_error(py: Python<'_>, e: Error, slots: &[usize]) -> PyErr {
    match e {
        Error::NonFinite { slot, index, value } => {
            let id = slots.get(slot).copied().unwrap_or(slot);
            let e2 = Error::NonFinite {
                slot: id,
                index,
                value,
            };
            let msg = e2.to_string();
            to_pyerr(py, &e2, msg)
        }
        other => {
            let msg = other.to_string();
            to_pyerr(py, &other, msg)
        }
    }
}
