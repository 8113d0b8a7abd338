//! Integration tests: real `redis-server`s, real HTTP over loopback, `mock-idp` as upstream.
//! One binary, one module per capability.

mod helpers;

mod abuse;
mod admin;
mod binary;
mod caching;
mod cluster;
mod cluster_flight;
mod failover;
mod fault_proxy;
mod freshness;
mod inbound;
mod layout;
mod leaks;
mod purge;
mod raw_socket;
mod read_pipeline;
mod redis_faults;
mod redis_iam;
mod redis_tls;
mod relay;
mod rotation;
mod sealing;
mod slow_clients;
mod strictness;
mod upstream_errors;
mod upstreams;
