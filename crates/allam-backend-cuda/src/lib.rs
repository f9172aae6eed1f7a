//! allam-backend-cuda.
