//! allam-worker.
