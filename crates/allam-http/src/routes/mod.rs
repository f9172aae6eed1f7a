//! The endpoint handlers, one module per concern; `crate::app` wires them to paths.

pub(crate) mod generation;
pub(crate) mod models;
pub(crate) mod probes;
pub(crate) mod score;
pub(crate) mod tokenize;
