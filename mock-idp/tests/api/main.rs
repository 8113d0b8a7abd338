//! Integration tests: a real mock-idp on a loopback port, driven by a real HTTP client.

mod admin;
mod faults;
mod helpers;
mod jwt;
mod server;
mod token;
