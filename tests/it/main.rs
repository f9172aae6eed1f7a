//! Integration tests: the real `allam` binary, real etcd, real clients, on loopback.

mod support;
mod tidy;
mod cli;
mod cluster;
mod clients;
mod otlp;
mod etcd_outage;
mod local_cluster;
mod tp;
