//! xlb userspace: the daemon, the control API and the CLI of the xlb XDP load
//! balancer.
//!
//! # Layout
//!
//! - [`dataplane`]: loads the XDP object, typed handles on its maps.
//! - [`maglev`]: the consistent-hashing table builder.
//! - [`model`]: operator-facing types (`Vip`, `Proto`, `Scheduler`), parsed at the edge.
//! - [`state`]: configured services, id allocation, ordered map updates.
//! - [`neighbor`]: the interface and the real servers' MACs.
//! - [`config`]: the startup YAML file.
//! - [`api`] / [`client`]: HTTP+JSON over the control socket, both sides.
//! - [`decap`]: `xlb decap`, the real-server decapsulator for TUN mode.
//! - [`realserver`]: `xlb realserver setup|teardown`.
//! - [`daemon`]: `xlb run`. [`cli`]: the command line.

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod decap;
pub mod maglev;
pub mod model;
pub mod neighbor;
pub mod realserver;
pub mod state;
