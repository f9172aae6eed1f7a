//! Integration tests: the real `allam` binary, real etcd, real clients, on loopback.

mod bad_input;
mod cli;
mod clients;
mod cluster;
mod etcd_outage;
mod fault_soak;
mod local_cluster;
mod otlp;
mod slow_clients;
mod soak;
mod support;
mod tidy;
mod tls;
mod tp;
