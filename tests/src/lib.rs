//! Integration-test support for xlb: network-namespace topologies, packet fixtures and
//! the test real server (`xlb-testsrv`).

pub mod netns;
pub mod packet;
