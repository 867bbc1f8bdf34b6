//! Strata's block engine (work in progress).
pub mod error;
pub use error::{Error, ErrorKind, Result};
