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
//! - [`config`]: the YAML configuration (desired state and daemon settings).
//! - [`health`]: health checks of the reals.
//! - [`api`] / [`client`]: HTTP+JSON over the control socket, both sides.
//! - [`pin`]: bpffs pins, adoption by a restarted daemon, teardown.
//! - [`decap`]: `xlb decap`, the real-server decapsulator for TUN mode.
//! - [`realserver`]: `xlb realserver setup|teardown`.
//! - [`generate`]: man pages and shell completions for packaging.
//! - [`metrics`]: Prometheus metrics.
//! - [`bench`]: the floor programs `./x bench` compares against.
//! - [`daemon`]: `xlb run`. [`cli`]: the command line.

pub mod api;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod decap;
pub mod generate;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod neighbor;
pub mod pin;
pub mod realserver;
pub mod state;
