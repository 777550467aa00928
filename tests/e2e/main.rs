//! End-to-end tests: each starts the real `forestall` binary on 127.0.0.1 with a temporary
//! data directory and talks to it over HTTP, the way users do.

mod harness;

mod allocation;
mod auth;
mod cli;
mod clients;
mod collector;
mod console;
mod continuous;
mod crash;
mod differential;
mod disk_full;
mod fuzz;
mod limits;
mod pg;
mod prometheus;
mod query;
mod serve;
