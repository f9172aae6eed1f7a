//! allam-http.
