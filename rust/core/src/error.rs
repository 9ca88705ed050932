//! The core's one error type.

use std::io;

/// Everything that can go wrong in the core. Messages are short and name the offending item.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A slot index outside the arena.
    #[error("slot {index} is out of range: the arena has {num_slots} slots (0..{num_slots})")]
    SlotIndex {
        /// The offending index.
        index: usize,
        /// Number of slots in the arena.
        num_slots: usize,
    },
    /// An empty list of slots.
    #[error("{what}: the slot list is empty; pass at least one slot")]
    EmptySlots {
        /// The operation.
        what: &'static str,
    },
    /// Weights that are NaN, negative, all zero or of the wrong length.
    #[error("{0}")]
    InvalidWeights(String),
    /// A non-finite value in an input slot.
    #[error("slot {slot} holds a non-finite value ({value}) at parameter index {index}")]
    NonFinite {
        /// The slot holding the value.
        slot: usize,
        /// Flat parameter index inside the slot.
        index: usize,
        /// The value (NaN or +-inf).
        value: f32,
    },
    /// A buffer of the wrong length.
    #[error("{what} has {got} elements, expected {expected}")]
    Length {
        /// Which buffer.
        what: &'static str,
        /// Its length.
        got: usize,
        /// The expected length.
        expected: usize,
    },
    /// Any other invalid argument.
    #[error("{0}")]
    InvalidArgument(String),
    /// Not enough memory to reserve the arena.
    #[error(
        "cannot reserve {requested} bytes of shared memory in {location}: only {available} bytes \
         are available; use fewer slots, a smaller model, or free memory (for /dev/shm, remount \
         it larger)"
    )]
    OutOfSharedMemory {
        /// Bytes asked for.
        requested: u64,
        /// Bytes available.
        available: u64,
        /// Where (e.g. `/dev/shm` or `memory (memfd)`).
        location: String,
    },
    /// A system call on shared memory failed.
    #[error("{op} failed for {target}: {source}")]
    Os {
        /// The call.
        op: &'static str,
        /// What it was applied to.
        target: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An arena handle that no longer refers to a live arena, or to another one.
    #[error("stale arena handle: {0}")]
    StaleHandle(String),
}

/// The core's result type.
pub type Result<T> = std::result::Result<T, Error>;
