//! allam-comm.
