//! allam-router.
