//! allam-model.
