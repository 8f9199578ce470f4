//! Network-namespace topologies for root integration tests and the demo.
//!
//! Every test builds its own little network inside namespaces it creates and deletes
//! (see the rules for test networks in docs/development.md): nothing is configured in the root
//! namespace, every address comes from a documentation prefix, and every namespace name
//! starts with a per-test prefix from [`unique_prefix`] so parallel or leftover runs never
//! collide.
//!
//! # Layout
//!
//! ```text
//!                         switch namespace ("{prefix}-sw")
//!                 ┌──────────────────── br0 ─────────────────────┐
//!                 c             lb             r1     ...        rN      (switch ports)
//!                 │              │              │                 │
//!               eth0           eth0           eth0              eth0
//!        "{prefix}-client" "{prefix}-lb"  "{prefix}-rs1" ... "{prefix}-rsN"
//!         198.51.100.2      198.51.100.1   198.51.100.11       198.51.100.(10+N)
//!         2001:db8:100::2   2001:db8:100::1 2001:db8:100::11   2001:db8:100::(10+N)
//! ```
//!
//! One L2 segment: the client reaches the VIP range 203.0.113.0/24 (and
//! 2001:db8:203::/64) through the balancer, the balancer forwards to the reals at L2
//! (direct return), and the reals answer the client directly from the VIP they hold on `lo`.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

/// Where `ip netns add` leaves the bind mount that keeps a named namespace alive.
const NETNS_RUN_DIR: &str = "/run/netns";

/// How long [`Netns`]'s Drop waits for the processes it signalled to leave the namespace
/// before escalating from SIGTERM to SIGKILL (and, after SIGKILL, before giving up).
const KILL_GRACE: Duration = Duration::from_secs(1);

/// Name of the bridge inside the switch namespace.
const BRIDGE: &str = "br0";

/// Name of every host's interface towards the switch.
const HOST_IF: &str = "eth0";

/// A short namespace-name prefix that no other run, parallel or leftover, is using.
///
/// The result is `x{tag}{pid % 10000, four digits}{counter}`, e.g. `xt04211`: the
/// fixed-width pid keeps two (pid, counter) pairs from spelling the same string, and a
/// candidate is skipped when any namespace named `{candidate}-...` already exists, which
/// covers a recycled pid meeting leftovers of a crashed run.
///
/// `tag` should be one to three ASCII letters naming the test file or scenario; letters
/// only, so that the digits after it cannot be confused with part of the tag.
pub fn unique_prefix(tag: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    assert!(
        !tag.is_empty() && tag.len() <= 3 && tag.bytes().all(|b| b.is_ascii_alphabetic()),
        "unique_prefix tag {tag:?} must be 1 to 3 ASCII letters"
    );
    let pid = std::process::id() % 10_000;
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let candidate = format!("x{tag}{pid:04}{n}");
        if !prefix_in_use(&candidate) {
            return candidate;
        }
    }
}

/// Whether any named namespace already starts with `{prefix}-`.
fn prefix_in_use(prefix: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(NETNS_RUN_DIR) else {
        // No /run/netns yet means no named namespaces at all.
        return false;
    };
    let with_dash = format!("{prefix}-");
    entries
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with(&with_dash))
}

/// Runs `cmd` and panics, naming the command and quoting its stderr, unless it succeeds.
fn run_checked(cmd: &mut Command) -> Output {
    let output = run(cmd);
    if !output.status.success() {
        panic!(
            "`{}` failed ({}): {}",
            describe(cmd),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    output
}

/// Runs `cmd` to completion; panics only when it cannot be started at all (missing tool).
fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run `{}`: {e} (are iproute2, ethtool and procps installed?)",
            describe(cmd)
        )
    })
}

/// The command line of `cmd`, for error messages.
fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A named network namespace that is deleted, with everything still running in it,
/// when dropped.
///
/// Dropping kills the processes inside first (SIGTERM, then SIGKILL a second later): a
/// namespace outlives `ip netns del` for as long as a process is in it, and with it its
/// veths and addresses, so a leaked server would keep the topology alive after the test.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace with `ip netns add NAME`; panics if it already exists.
    pub fn new(name: &str) -> Netns {
        run_checked(Command::new("ip").args(["netns", "add", name]));
        Netns {
            name: name.to_owned(),
        }
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `args` inside the namespace and panics with the command and its stderr if it
    /// exits non-zero.
    pub fn exec(&self, args: &[&str]) -> Output {
        let (program, rest) = split_args(args);
        run_checked(self.command(program).args(rest))
    }

    /// Runs `args` inside the namespace and returns its output whatever the exit status,
    /// for commands whose failure the caller wants to inspect.
    pub fn try_exec(&self, args: &[&str]) -> Output {
        let (program, rest) = split_args(args);
        run(self.command(program).args(rest))
    }

    /// A [`Command`] that runs `program` inside the namespace (`ip netns exec NAME
    /// program`), for long-running servers the caller spawns and owns.
    ///
    /// `ip netns exec` execs the program in place, so the child's pid is the program's
    /// own and killing the [`std::process::Child`] stops it.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `f` on a fresh thread that has joined this namespace and returns its result;
    /// a panic in `f` is re-raised on the caller's thread with its original payload.
    ///
    /// setns(CLONE_NEWNET) only moves the calling thread, and sockets stay in the
    /// namespace they were created in, so anything `f` opens (a `TcpStream`, an aya
    /// program attached by interface name) lives in this namespace, while the caller's
    /// thread never leaves the one it was in.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("{NETNS_RUN_DIR}/{}", self.name);
        thread::scope(|scope| {
            let handle = scope.spawn(|| {
                let ns = File::open(&path)
                    .unwrap_or_else(|e| panic!("cannot open namespace {path}: {e}"));
                nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns into {path}: {e} (needs root)"));
                drop(ns);
                f()
            });
            handle
                .join()
                .unwrap_or_else(|payload| std::panic::resume_unwind(payload))
        })
    }

    /// Moves the calling thread into namespace `name` for good: for a thread the
    /// caller spawned that must outlive a [`Netns::run_in`] scope (a load generator).
    pub fn enter(name: &str) {
        let path = format!("{NETNS_RUN_DIR}/{name}");
        let ns = File::open(&path).unwrap_or_else(|e| panic!("cannot open namespace {path}: {e}"));
        nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns into {path}: {e} (needs root)"));
    }

    /// Runs `ip ARGS` inside the namespace, `args` split on whitespace (so no argument
    /// may contain a space), and panics like [`Netns::exec`] on failure. Reads like the
    /// command line it stands for: `ns.ip("link set dev eth0 up")`.
    pub fn ip(&self, args: &str) -> Output {
        let argv: Vec<&str> = std::iter::once("ip")
            .chain(args.split_whitespace())
            .collect();
        self.exec(&argv)
    }

    /// Sets a sysctl inside the namespace (`sysctl -w KEY=VALUE`); `net.*` keys are per
    /// namespace, so this never touches the root namespace's settings.
    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")]);
    }

    /// A counter of the namespace's `Tcp:` lines in /proc/net/snmp, e.g. `OutSegs`
    /// or `PassiveOpens`; panics when there is no such counter.
    pub fn tcp_counter(&self, name: &str) -> u64 {
        let out = self.exec(&["cat", "/proc/net/snmp"]);
        let text = String::from_utf8_lossy(&out.stdout);
        let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
        let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
            panic!("no Tcp lines in /proc/net/snmp of {}:\n{text}", self.name);
        };
        names
            .split_whitespace()
            .position(|n| n == name)
            .and_then(|i| values.split_whitespace().nth(i))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no Tcp counter {name} in /proc/net/snmp of {}", self.name))
    }

    /// Pids of the processes in the namespace, without our own (which can show up if
    /// some caller moved the main thread in).
    fn pids(&self) -> Vec<i32> {
        let output = run(Command::new("ip").args(["netns", "pids", &self.name]));
        let own = std::process::id();
        String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
            .filter(|&p| p != own)
            .filter_map(|p| i32::try_from(p).ok())
            .collect()
    }

    /// Signals everything in the namespace, escalating to SIGKILL, and waits (bounded)
    /// for it to leave. Zombies count as gone: they have already released the namespace.
    fn kill_all(&self) {
        for sig in [Signal::SIGTERM, Signal::SIGKILL] {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                // ESRCH just means it exited on its own meanwhile.
                let _ = signal::kill(Pid::from_raw(pid), sig);
            }
            let deadline = Instant::now() + KILL_GRACE;
            while Instant::now() < deadline {
                if self.pids().is_empty() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        eprintln!(
            "netns {}: processes still inside after SIGKILL: {:?}",
            self.name,
            self.pids()
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.kill_all();
        // No panic here: Drop also runs while a failed test unwinds, and a second panic
        // would abort before the remaining namespaces are deleted.
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "ip netns del {} failed ({}): {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("cannot run ip netns del {}: {e}", self.name),
        }
    }
}

/// Splits an argument list into program and arguments; an empty list is a caller bug.
fn split_args<'a>(args: &'a [&'a str]) -> (&'a str, &'a [&'a str]) {
    args.split_first()
        .map(|(program, rest)| (*program, rest))
        .expect("Netns::exec needs at least a program name")
}

/// What a test needs to know about one host of a [`Topology`].
#[derive(Debug)]
pub struct Host {
    /// The host's own namespace; its only link is `eth0`.
    pub ns: Netns,
    /// MAC address of the host's `eth0`, e.g. the destination a DR rewrite must write.
    pub mac: [u8; 6],
    /// The host's address on the 198.51.100.0/24 segment.
    pub ipv4: Ipv4Addr,
    /// The host's address on the 2001:db8:100::/64 segment.
    pub ipv6: Ipv6Addr,
    /// Name of the veth peer of `eth0` inside the switch namespace (enslaved to `br0`).
    pub switch_port: String,
}

impl Host {
    /// Packets received and sent on `eth0` so far, as `(rx_packets, tx_packets)`.
    ///
    /// Hosts also send a few IPv6 neighbour and multicast-listener packets of their own,
    /// so compare deltas with some slack rather than exact totals.
    pub fn link_stats(&self) -> (u64, u64) {
        let output = self.ns.ip(&format!("-j -s link show {HOST_IF}"));
        let link = first_link(&self.ns, &output);
        let count = |dir: &str| {
            link["stats64"][dir]["packets"].as_u64().unwrap_or_else(|| {
                panic!(
                    "no stats64.{dir}.packets for {HOST_IF} in {}: {link}",
                    self.ns.name()
                )
            })
        };
        (count("rx"), count("tx"))
    }

    /// Creates the host's namespace and its veth to the switch, with addresses but with
    /// `eth0` still down, so role settings (ARP behaviour, offloads) are in place before
    /// the first packet.
    fn attach(
        sw: &Netns,
        ns_name: &str,
        switch_port: &str,
        ipv4: Ipv4Addr,
        ipv6: Ipv6Addr,
    ) -> Host {
        let ns = Netns::new(ns_name);
        // Links created from now on skip duplicate address detection, so IPv6 (link-local
        // included) works the moment the link is up instead of ~1 s later.
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0");
        // Created from inside the switch namespace with the peer placed straight into the
        // host namespace: nothing ever appears in the root namespace. `name` is spelled
        // out because `ip link add c ...` would read `c` as an abbreviation.
        sw.ip(&format!(
            "link add name {switch_port} type veth peer name {HOST_IF} netns {ns_name}"
        ));
        sw.ip(&format!("link set dev {switch_port} master {BRIDGE} up"));
        ns.ip("link set dev lo up");
        ns.ip(&format!("addr add {ipv4}/24 dev {HOST_IF}"));
        ns.ip(&format!("addr add {ipv6}/64 dev {HOST_IF} nodad"));
        let mac = read_mac(&ns, HOST_IF);
        Host {
            ns,
            mac,
            ipv4,
            ipv6,
            switch_port: switch_port.to_owned(),
        }
    }

    fn link_up(&self) {
        self.ns.ip(&format!("link set dev {HOST_IF} up"));
    }
}

/// The first object of an `ip -j link show` answer.
fn first_link(ns: &Netns, output: &Output) -> serde_json::Value {
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "`ip -j link show` in {} printed invalid JSON ({e}): {}",
            ns.name(),
            String::from_utf8_lossy(&output.stdout)
        )
    });
    json.get(0)
        .cloned()
        .unwrap_or_else(|| panic!("`ip -j link show` in {} listed no link: {json}", ns.name()))
}

/// The MAC address of `dev` in `ns`.
fn read_mac(ns: &Netns, dev: &str) -> [u8; 6] {
    let output = ns.ip(&format!("-j link show {dev}"));
    let link = first_link(ns, &output);
    let text = link["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address for {dev} in {}: {link}", ns.name()));
    parse_mac(text).unwrap_or_else(|| panic!("bad MAC {text:?} for {dev} in {}", ns.name()))
}

/// Parses `aa:bb:cc:dd:ee:ff`.
fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// What to build: see [`Topology::build`].
#[derive(Debug, Clone)]
pub struct TopologySpec {
    /// Namespace-name prefix, unique per test: use [`unique_prefix`].
    pub prefix: String,
    /// Number of real servers (`rs1..rsN`); at most 200 so addresses stay in the /24.
    pub reals: usize,
    /// VIP put on every real's `lo` (more with [`Topology::add_vip_on_reals`]).
    pub vip_v4: Ipv4Addr,
}

/// A client, a balancer and N real servers on one bridged L2 segment, each in its own
/// namespace; see the module docs for the picture.
///
/// Dropping it deletes every namespace, also while a failed test unwinds. Fields drop in
/// declaration order: `guards` first (XDP programs and the like must go while their
/// interfaces still exist), then the hosts, then the switch.
pub struct Topology {
    /// Things to drop before any namespace is deleted.
    ///
    /// XDP_TX frames from the balancer's `eth0` only reach the bridge if the switch-side
    /// peer (`lb.switch_port` in `sw`) has an XDP program attached (see
    /// docs/development.md). The topology does not attach one itself, so it needs no
    /// eBPF object: the caller attaches a pass-through (XDP_PASS) program there, e.g.
    /// from `sw.run_in(...)`, and pushes whatever keeps it attached (the loaded `Ebpf`,
    /// a link) onto this vector.
    pub guards: Vec<Box<dyn std::any::Any + Send>>,
    /// The traffic source; routes the VIP ranges via the balancer.
    pub client: Host,
    /// The host the balancer runs on.
    pub lb: Host,
    /// The real servers, `rs1..rsN` in order.
    pub reals: Vec<Host>,
    /// The switch: bridge `br0` and the peer of every host's `eth0`.
    pub sw: Netns,
    prefix: String,
}

impl Topology {
    /// Segment the hosts share.
    pub const LAN_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 0);
    /// IPv6 segment the hosts share (/64).
    pub const LAN_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0);
    /// VIP range the client routes through the balancer.
    pub const VIP_NET_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 0);
    /// IPv6 VIP range (/64) the client routes through the balancer.
    pub const VIP_NET_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x203, 0, 0, 0, 0, 0);

    /// Builds the topology; panics with the failing command if any step fails, deleting
    /// whatever it had created so far.
    pub fn build(spec: &TopologySpec) -> Topology {
        assert!(
            (1..=200).contains(&spec.reals),
            "TopologySpec.reals must be 1..=200, got {}",
            spec.reals
        );
        let p = &spec.prefix;

        let sw = Netns::new(&format!("{p}-sw"));
        // The switch only forwards frames; without IPv6 on its ports and bridge it adds no
        // router solicitations or MLD reports of its own to what the hosts see.
        sw.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
        sw.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
        sw.ip("link set dev lo up");
        // STP is off by default, so ports forward as soon as they are up.
        sw.ip(&format!("link add name {BRIDGE} type bridge"));
        sw.ip(&format!("link set dev {BRIDGE} up"));

        let client = Host::attach(&sw, &format!("{p}-client"), "c", lan_v4(2), lan_v6(2));
        // veth otherwise hands out packets with only a partial checksum, which the real
        // drops once the frame went through XDP (docs/development.md).
        client.ns.exec(&["ethtool", "-K", HOST_IF, "tx", "off"]);
        // Load generators in the client would otherwise spend their time searching for a
        // free source port (docs/development.md).
        client.ns.sysctl("net.ipv4.tcp_tw_reuse", "1");
        let range = "1024 65535";
        client.ns.sysctl("net.ipv4.ip_local_port_range", range);

        let lb = Host::attach(&sw, &format!("{p}-lb"), "lb", lan_v4(1), lan_v6(1));

        let mut reals = Vec::with_capacity(spec.reals);
        for i in 1..=spec.reals {
            let host_id = u8::try_from(10 + i).expect("reals bounded above");
            let real = Host::attach(
                &sw,
                &format!("{p}-rs{i}"),
                &format!("r{i}"),
                lan_v4(host_id),
                lan_v6(host_id),
            );
            // The VIP sits on lo: the real accepts traffic for it but must neither answer
            // ARP for it on eth0 (arp_ignore) nor use it as the source of its own ARP
            // requests (arp_announce), or it would steal the VIP from the balancer.
            real.ns.sysctl("net.ipv4.conf.all.arp_ignore", "1");
            real.ns.sysctl("net.ipv4.conf.all.arp_announce", "2");
            // Packets for the VIP arrive on eth0 while the VIP lives on lo; replies leave
            // from the VIP. Strict reverse-path filtering has no business here (the kernel
            // uses the max of `all` and the device's value, so both go to 0).
            real.ns.sysctl("net.ipv4.conf.all.rp_filter", "0");
            let eth0_rp_filter = format!("net.ipv4.conf.{HOST_IF}.rp_filter");
            real.ns.sysctl(&eth0_rp_filter, "0");
            reals.push(real);
        }

        for host in std::iter::once(&client).chain([&lb]).chain(&reals) {
            host.link_up();
        }
        // Routes via the balancer's address: the client resolves it with ARP/NDP and sends
        // VIP traffic to the balancer's MAC, as a router or upstream switch would. Only
        // now: a gateway must be reachable through a link that is up.
        client.ns.ip("route add 203.0.113.0/24 via 198.51.100.1");
        let v6_route = "-6 route add 2001:db8:203::/64 via 2001:db8:100::1";
        client.ns.ip(v6_route);

        let topology = Topology {
            guards: Vec::new(),
            client,
            lb,
            reals,
            sw,
            prefix: spec.prefix.clone(),
        };
        topology.add_vip_on_reals(IpAddr::V4(spec.vip_v4));
        topology
    }

    /// The prefix every namespace of this topology starts with (`{prefix}-...`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Puts another VIP (IPv4 /32 or IPv6 /128) on every real's `lo`, so the reals accept
    /// and answer traffic for it in direct-return mode.
    ///
    /// An IPv6 address on `lo` is not answered by neighbour discovery on `eth0`, so IPv6
    /// VIPs need no equivalent of `arp_ignore`.
    pub fn add_vip_on_reals(&self, vip: IpAddr) {
        let args = match vip {
            IpAddr::V4(v4) => format!("addr add {v4}/32 dev lo"),
            IpAddr::V6(v6) => format!("addr add {v6}/128 dev lo nodad"),
        };
        for real in &self.reals {
            real.ns.ip(&args);
        }
    }

    /// Attaches one more host to the segment (e.g. another balancer, an etcd
    /// server) as namespace `{prefix}-{suffix}`, at 198.51.100.HOST_ID and
    /// 2001:db8:100::HOST_ID (11 and up are the reals': pick another), link up.
    /// The caller owns it; dropping it deletes its namespace.
    pub fn add_host(&self, suffix: &str, switch_port: &str, host_id: u8) -> Host {
        let host = Host::attach(
            &self.sw,
            &format!("{}-{suffix}", self.prefix),
            switch_port,
            lan_v4(host_id),
            lan_v6(host_id),
        );
        host.link_up();
        host
    }

    /// The host with the given namespace name suffix (`client`, `lb`, `rs1`, ...).
    pub fn host(&self, suffix: &str) -> Option<&Host> {
        let name = format!("{}-{suffix}", self.prefix);
        std::iter::once(&self.client)
            .chain([&self.lb])
            .chain(&self.reals)
            .find(|h| h.ns.name() == name)
    }
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology")
            .field("prefix", &self.prefix)
            .field("guards", &self.guards.len())
            .field("client", &self.client)
            .field("lb", &self.lb)
            .field("reals", &self.reals)
            .field("sw", &self.sw)
            .finish()
    }
}

/// `198.51.100.{host}`.
fn lan_v4(host: u8) -> Ipv4Addr {
    let [a, b, c, _] = Topology::LAN_V4.octets();
    Ipv4Addr::new(a, b, c, host)
}

/// `2001:db8:100::{host}`, written the way the IPv4 address is (`::11` for `.11`), so the
/// two are easy to match up when reading captures.
fn lan_v6(host: u8) -> Ipv6Addr {
    let mut segments = Topology::LAN_V6.segments();
    segments[7] =
        u16::from_str_radix(&host.to_string(), 16).expect("decimal digits are hex digits");
    Ipv6Addr::from(segments)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parses_six_hex_bytes_only() {
        assert_eq!(
            parse_mac("76:db:76:31:dd:b4"),
            Some([0x76, 0xdb, 0x76, 0x31, 0xdd, 0xb4])
        );
        assert_eq!(parse_mac("76:db:76:31:dd"), None);
        assert_eq!(parse_mac("76:db:76:31:dd:b4:00"), None);
        assert_eq!(parse_mac("76:db:76:31:dd:zz"), None);
    }

    #[test]
    fn lan_addresses_follow_the_documented_plan() {
        assert_eq!(lan_v4(11), Ipv4Addr::new(198, 51, 100, 11));
        assert_eq!(lan_v6(11), "2001:db8:100::11".parse::<Ipv6Addr>().unwrap());
        assert_eq!(lan_v6(1), "2001:db8:100::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            lan_v6(210),
            "2001:db8:100::210".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn unique_prefixes_differ_and_stay_short() {
        let a = unique_prefix("t");
        let b = unique_prefix("t");
        assert_ne!(a, b);
        assert!(a.len() <= 8, "{a} too long");
    }
}
