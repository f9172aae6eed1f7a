//! allam-kernels.
