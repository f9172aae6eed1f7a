//! allam-membership.
