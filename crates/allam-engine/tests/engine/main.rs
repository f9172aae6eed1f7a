//! Engine tests through its boundary (`EngineHandle`): `fake` drives scheduling, caching,
//! preemption, sampling and stopping with a fast fake model that detects KV mistakes;
//! `goldens` runs the tiny fixture models on the CPU backend against transformers' outputs.

mod backpressure;
mod fake;
mod goldens;
mod support;
