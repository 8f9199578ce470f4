//! xlb userspace: the daemon, the control API and the CLI of the xlb XDP load
//! balancer.
//!
//! # Layout
//!
//! - [`model`]: operator-facing types (`Vip`, `Proto`, `Scheduler`), parsed at the edge.
//! - [`desired`]: the desired state (base + overrides) and its edits.
//! - [`diff`]: what differs between two desired states (`xlb apply --dry-run`, the log).
//! - [`state`]: the model of the maps and the one reconcile step (plan + commit, undo).
//! - [`controller`]: the task that owns the state and the maps; everything
//!   else sends it events and reads its published snapshots.
//! - [`dataplane`]: loads the XDP object, typed handles on its maps.
//! - [`counters`]: read-only handles on the counters and the conntrack table.
//! - [`views`]: what status, lists and metrics show (snapshot + counters).
//! - [`maglev`]: the consistent-hashing table builder.
//! - [`neighbor`]: the interface, the reals' MACs, neighbour events.
//! - [`settings`] / [`config`]: the daemon's settings and the YAML file.
//! - [`health`]: health checks of the reals.
//! - [`api`] / [`client`]: HTTP+JSON over the control socket, both sides.
//! - [`metrics`]: Prometheus metrics.
//! - [`node`]: the node in a cluster: VIP announcement through BIRD, drain, VRRP role.
//! - [`store`]: store mode, a fleet of balancers sharing one desired state in etcd.
//! - [`pin`]: bpffs pins, teardown.
//! - [`decap`]: `xlb decap`, the real-server decapsulator for TUN mode.
//! - [`realserver`]: `xlb realserver setup|teardown`.
//! - [`generate`]: `xlb generate` (hidden): man pages and completions for packaging.
//! - [`bench`]: the floor programs `./x bench` compares against.
//! - [`daemon`]: `xlb run`. [`cli`]: the command line.
//! - [`chain`]: an error and its causes on one line, each said once.

/// The commit this build comes from (`unknown` when it was built outside a
/// git checkout without `XLB_COMMIT` set).
pub const COMMIT: &str = env!("XLB_COMMIT");

/// What `xlb --version` prints after the name.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("XLB_COMMIT"),
    ")"
);

pub mod api;
pub mod bench;
pub mod chain;
pub mod cli;
pub mod client;
pub mod config;
pub mod conntrack;
pub mod controller;
pub mod counters;
pub mod daemon;
pub mod dataplane;
pub mod decap;
pub mod desired;
pub mod diff;
pub mod flowsync;
pub mod generate;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod neighbor;
pub mod node;
pub mod pin;
pub mod privileges;
pub mod realserver;
pub mod settings;
pub mod state;
pub mod store;
pub mod views;
