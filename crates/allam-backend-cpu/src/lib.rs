//! allam-backend-cpu.
