//! Integration tests: the real `allam` binary, real etcd, real clients, on loopback.

mod support;
mod tidy;
mod cli;
mod cluster;
mod clients;
