//! Integration-test support for xlb: network-namespace topologies, packet fixtures,
//! the test real server (`xlb-testsrv`) and the demo (`xlb-demo`).
//!
//! # Layout
//!
//! - [`netns`]: namespaces and the client / balancer / reals topology;
//! - [`packet`]: crafted packets for the BPF_PROG_TEST_RUN fixtures;
//! - [`harness`]: the processes of an end-to-end run (daemon, real servers, CLI);
//! - [`cluster`]: two balancers behind a BIRD/ECMP router or as a keepalived pair, and a
//!   client load that counts broken connections;
//! - [`capture`]: an AF_PACKET tap that shows which MAC really sent a frame;
//! - [`etcd`]: a real etcd server in a namespace, for the fleet tests and benchmark.

pub mod capture;
pub mod cluster;
pub mod etcd;
pub mod harness;
pub mod netns;
pub mod packet;
