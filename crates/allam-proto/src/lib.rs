//! allam-proto.
