//! allam-engine.
