//! netns end-to-end, the balancer in a cluster: two balancers announce the VIP through
//! BIRD over BGP to a router that spreads flows over both by ECMP; `xlb drain` takes one
//! out under load without breaking a connection; a VIP without a real that can serve is
//! withdrawn; `xlb ready` and `xlb role` as keepalived's hooks call them.
//!
//! ```text
//!   out (192.0.2.2) ── router (192.0.2.1 | 198.51.100.2, BIRD, ECMP)
//!                              │ bridge 198.51.100.0/24
//!          lb1 (.1, xlb + BIRD) ┤ lb2 (.3, xlb + BIRD) ┤ rs1 (.11) ┤ rs2 (.12)
//! ```
//!
//! Needs root, BIRD 2 (`./x setup` installs bird2) and runs one test at a time.

use std::collections::BTreeMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use etherparse::PacketBuilder;
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, sendto, socket,
};
use xlb_tests::harness::{
    Daemon, KeepAlive, Proc, RunDir, VIP, balanced_topology, http_get, json, keep_alive_from,
    metric_samples, pass_on_switch_port, path_str, require_root, scrape_metrics, start_reals,
    wait_until,
};
use xlb_tests::netns::{Host, Netns, Topology, unique_prefix};

const SERVICE: &str = "203.0.113.10:80/tcp";
const TIMEOUT: Duration = Duration::from_secs(2);
const ROUTER: &str = "198.51.100.2";

/// BFD on the segment (as the shipped examples): a balancer whose link is cut loses
/// its routes in about 0.3 s instead of the BGP hold time.
const BFD: &str = "protocol bfd {\n  interface \"eth0\" { min rx interval 100 ms; \
                   min tx interval 100 ms; multiplier 3; };\n}\n";

/// A BIRD daemon in `ns`, in the foreground, its socket and log in `dir`.
fn bird(ns: &Netns, dir: &Path, name: &str, conf: &str) -> Proc {
    let conf_path = dir.join(format!("{name}.conf"));
    let conf = conf.replace(
        "LOG",
        &dir.join(format!("{name}.log")).display().to_string(),
    );
    std::fs::write(&conf_path, conf).expect("writing a BIRD config");
    let sock = dir.join(format!("{name}.ctl"));
    let pid = dir.join(format!("{name}.pid"));
    let mut cmd = ns.command("bird");
    cmd.arg("-f")
        .arg("-c")
        .arg(&conf_path)
        .arg("-s")
        .arg(&sock)
        .arg("-P")
        .arg(&pid);
    Proc::spawn(&format!("bird {name}"), &mut cmd)
}

/// The router's BIRD: BGP with both balancers, multipath routes into the kernel.
fn router_conf() -> String {
    let mut conf = format!(
        "log \"LOG\" all;\nrouter id {ROUTER};\nprotocol device {{ scan time 1; }}\n\
         protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths on; }}\n{BFD}"
    );
    for (name, addr, asn) in [
        ("lb1", "198.51.100.1", 64513),
        ("lb2", "198.51.100.3", 64514),
    ] {
        conf.push_str(&format!(
            "protocol bgp {name} {{\n  local {ROUTER} as 64512;\n  neighbor {addr} as {asn};\n  \
             bfd on;\n  hold time 3;\n  connect retry time 1;\n  error wait time 1, 2;\n  \
             ipv4 {{ import all; export none; }};\n}}\n"
        ));
    }
    conf
}

/// A balancer's BIRD: the fragment xlb writes, exported to the router (the example of
/// docs/cluster.md, with short timers).
fn balancer_conf(addr: &str, asn: u32, fragment_dir: &Path) -> String {
    format!(
        "log \"LOG\" all;\nrouter id {addr};\nprotocol device {{ scan time 1; }}\n\
         include \"{}/bird-vips*.conf\";\n{BFD}\
         protocol bgp edge {{\n  local {addr} as {asn};\n  neighbor {ROUTER} as 64512;\n  \
         bfd on;\n  hold time 3;\n  connect retry time 1;\n  error wait time 1, 2;\n  \
         ipv4 {{ import none; export where proto = \"xlb_vips4\"; }};\n}}\n",
        fragment_dir.display()
    )
}

/// How a [`Cluster`]'s balancers run.
#[derive(Clone, Copy)]
struct Setup {
    /// Real servers in the topology (`.11`, `.12`, ...).
    reals: usize,
    /// How many of them the VIP has at start.
    in_vip: usize,
    /// Flow sync between the balancers.
    sync: bool,
}

/// The flow sync port of every balancer.
const SYNC_PORT: u16 = 9815;
/// The balancers' metrics port (in their own namespaces).
const METRICS_PORT: u16 = 9814;

/// Two balancers behind a BGP router, two reals; everything dropped in a safe order.
struct Cluster {
    daemons: Vec<Daemon>,
    birds: Vec<Proc>,
    _servers: Vec<Proc>,
    out: Netns,
    lb2: Host,
    topo: Topology,
    dirs: Vec<RunDir>,
    setup: Setup,
}

impl Cluster {
    fn start(tag: &str) -> Cluster {
        Self::start_with(
            tag,
            Setup {
                reals: 2,
                in_vip: 2,
                sync: false,
            },
        )
    }

    fn start_with(tag: &str, setup: Setup) -> Cluster {
        let mut topo = balanced_topology(&unique_prefix(tag), setup.reals);
        let servers = start_reals(&topo, &["--http", "0.0.0.0:80"]);
        let lb2 = topo.add_host("lb2", "lb2", 3);
        pass_on_switch_port(&mut topo, "lb2");

        // The router: the topology's client, with a second link to the outside client.
        let router = &topo.client.ns;
        let out = Netns::new(&format!("{}-out", topo.prefix()));
        router.ip(&format!(
            "link add name eth1 type veth peer name eth0 netns {}",
            out.name()
        ));
        router.ip("addr add 192.0.2.1/24 dev eth1");
        router.ip("link set dev eth1 up");
        router.ip("route del 203.0.113.0/24");
        router.sysctl("net.ipv4.ip_forward", "1");
        router.sysctl("net.ipv4.fib_multipath_hash_policy", "1");
        router.sysctl("net.ipv4.conf.all.rp_filter", "0");
        out.ip("link set dev lo up");
        out.ip("addr add 192.0.2.2/24 dev eth0");
        out.ip("link set dev eth0 up");
        out.ip("route add default via 192.0.2.1");
        // Complete checksums: the balancers' XDP forwards the frames as they are.
        out.exec(&["ethtool", "-K", "eth0", "tx", "off"]);
        out.sysctl("net.ipv4.tcp_tw_reuse", "1");
        for real in &topo.reals {
            real.ns.ip(&format!("route add 192.0.2.0/24 via {ROUTER}"));
        }

        let router_dir = RunDir::new(&format!("xlb-{}-router", topo.prefix()));
        let mut cluster = Cluster {
            daemons: Vec::new(),
            birds: Vec::new(),
            _servers: servers,
            out,
            lb2,
            topo,
            dirs: Vec::new(),
            setup,
        };
        for i in 0..2 {
            let dir = RunDir::new(&format!("xlb-{}-lb{}", cluster.topo.prefix(), i + 1));
            let (daemon, bird) = cluster.balancer(i, dir.path(), setup.in_vip);
            cluster.daemons.push(daemon);
            cluster.birds.push(bird);
            cluster.dirs.push(dir);
        }
        cluster.birds.push(bird(
            &cluster.topo.client.ns,
            router_dir.path(),
            "bird",
            &router_conf(),
        ));
        cluster.dirs.push(router_dir);
        cluster
    }

    /// Balancer `i`'s host.
    fn host(&self, i: usize) -> &Host {
        if i == 0 { &self.topo.lb } else { &self.lb2 }
    }

    /// Starts balancer `i` (xlb and its BIRD) in `dir`, its VIP with the first
    /// `in_vip` reals from a config file, flow sync to the other when the setup says so.
    fn balancer(&self, i: usize, dir: &Path, in_vip: usize) -> (Daemon, Proc) {
        let host = self.host(i);
        let other = self.host(1 - i);
        let mut yaml = format!("services:\n  - vip: {SERVICE}\n    reals:\n");
        for real in &self.topo.reals[..in_vip] {
            yaml.push_str(&format!("      - address: {}\n", real.ipv4));
        }
        let config = dir.join("xlb.yaml");
        std::fs::write(&config, yaml).expect("writing the balancer's config");
        let sock = dir.join("bird.ctl");
        let routes = dir.join("bird-vips.conf");
        let metrics = format!("{}:{METRICS_PORT}", host.ipv4);
        let mut args: Vec<String> = [
            "--no-pin",
            "--config",
            path_str(&config),
            "--bird-socket",
            path_str(&sock),
            "--bird-routes",
            path_str(&routes),
            "--metrics-addr",
            &metrics,
        ]
        .map(str::to_owned)
        .to_vec();
        if self.setup.sync {
            args.extend(sync_args(host, other, dir));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let daemon = Daemon::start_in(&host.ns, "eth0", dir, &args);
        let asn = 64513 + u32::try_from(i).expect("two balancers");
        let conf = balancer_conf(&host.ipv4.to_string(), asn, dir);
        (daemon, bird(&host.ns, dir, "bird", &conf))
    }

    /// Kills balancer `i` as a crash would: xlb (SIGKILL: its program goes with it)
    /// and its BIRD (the router drops its routes when the session closes).
    fn kill(&mut self, i: usize) {
        self.daemons[i].kill();
        self.birds[i].kill();
    }

    /// Restarts killed balancer `i` with every real of the topology in its VIP.
    fn restart(&mut self, i: usize) {
        let dir = self.dirs[i].path().to_owned();
        let (daemon, bird) = self.balancer(i, &dir, self.topo.reals.len());
        self.daemons[i] = daemon;
        self.birds[i] = bird;
    }

    /// Balancer `i`'s metrics.
    fn metrics(&self, i: usize) -> BTreeMap<String, f64> {
        let addr = SocketAddr::from((self.host(i).ipv4, METRICS_PORT));
        metric_samples(&scrape_metrics(self.host(i), addr))
    }

    /// The next hops the router's kernel has for the VIP, sorted.
    fn hops(&self) -> Vec<String> {
        let out = self.topo.client.ns.ip(&format!("-j route show {VIP}/32"));
        let routes = json(&String::from_utf8_lossy(&out.stdout), "ip -j route show");
        let mut hops: Vec<String> = routes
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|r| match r["nexthops"].as_array() {
                Some(n) => n.iter().map(|h| h["gateway"].clone()).collect(),
                None => vec![r["gateway"].clone()],
            })
            .filter_map(|g| g.as_str().map(str::to_owned))
            .collect();
        hops.sort();
        hops
    }

    fn wait_hops(&self, want: &[&str]) {
        wait_until(
            &format!("the router's next hops for {VIP} are {want:?}"),
            || self.hops() == want,
        );
    }

    fn vip_packets(&self, i: usize) -> u64 {
        stats_packets(&self.daemons[i])
    }

    fn node(&self, i: usize) -> serde_json::Value {
        json(
            &self.daemons[i].cli_ok(&["status", "--json"]),
            "xlb status --json",
        )["node"]
            .clone()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for dir in &self.dirs {
                let path = dir.path().join("bird.log");
                if let Ok(log) = std::fs::read_to_string(&path) {
                    eprintln!("--- {} ---\n{log}", path.display());
                }
            }
        }
        self.daemons.clear();
        self.birds.clear();
    }
}

/// Load from the outside client: `conns` kept-alive connections asking every 100 ms
/// (broken: an error, or an answer from another real) and a new connection every 50 ms
/// (failed: no answer). Runs until `stop`; returns (broken, failed, answered).
struct Load {
    stop: Arc<AtomicBool>,
    broken: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(out: &Netns, conns: usize) -> Load {
        let to = SocketAddr::from((VIP, 80));
        let opened = keep_alive_from(out, to, conns, TIMEOUT);
        let stop = Arc::new(AtomicBool::new(false));
        let broken = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        {
            let (stop, broken) = (stop.clone(), broken.clone());
            threads.push(thread::spawn(move || {
                let mut conns: Vec<Option<(KeepAlive, String)>> =
                    opened.into_iter().map(Some).collect();
                while !stop.load(Ordering::Relaxed) {
                    for slot in &mut conns {
                        let Some((c, real)) = slot else { continue };
                        match c.get() {
                            Ok(a) if a.real == *real => {}
                            Ok(a) => {
                                eprintln!("connection moved from {real} to {}", a.real);
                                broken.fetch_add(1, Ordering::Relaxed);
                                *slot = None;
                            }
                            Err(e) => {
                                eprintln!("connection broken: {e}");
                                broken.fetch_add(1, Ordering::Relaxed);
                                *slot = None;
                            }
                        }
                    }
                    thread::sleep(Duration::from_millis(100));
                }
            }));
        }
        {
            let (stop, failed, answered) = (stop.clone(), failed.clone(), answered.clone());
            let out_name = out.name().to_owned();
            threads.push(thread::spawn(move || {
                // This thread joins the outside namespace: its sockets are made there.
                Netns::enter(&out_name);
                while !stop.load(Ordering::Relaxed) {
                    match http_get(to, TIMEOUT) {
                        Ok(_) => answered.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            eprintln!("new connection failed: {e}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    thread::sleep(Duration::from_millis(50));
                }
            }));
        }
        Load {
            stop,
            broken,
            failed,
            answered,
            threads,
        }
    }

    fn finish(self) -> (usize, usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("load thread panicked");
        }
        (
            self.broken.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.answered.load(Ordering::Relaxed),
        )
    }
}

#[test]
fn bird_announces_serving_vips_and_drain_withdraws_without_breaking_connections() {
    require_root();
    let cluster = Cluster::start("cbg");
    let (lb1, lb2) = ("198.51.100.1", "198.51.100.3");
    cluster.wait_hops(&[lb1, lb2]);
    let node = cluster.node(0);
    assert_eq!(
        node["bird"]["announced"],
        serde_json::json!([VIP.to_string()]),
        "{node}"
    );
    assert_eq!(node["bird"]["in_sync"], true, "{node}");

    let load = Load::start(&cluster.out, 24);
    // ECMP spreads the flows: both balancers carry VIP traffic before the drain.
    let before = [cluster.vip_packets(0), cluster.vip_packets(1)];
    wait_until("both balancers forward VIP packets", || {
        cluster.vip_packets(0) > before[0] && cluster.vip_packets(1) > before[1]
    });

    let drained = cluster.daemons[0].cli_ok(&["drain", "--quiet", "1", "--timeout", "25"]);
    assert!(drained.contains("routes withdrawn from BIRD"), "{drained}");
    assert!(drained.contains("safe to stop"), "{drained}");
    assert_eq!(
        cluster.hops(),
        [lb2],
        "the router still sends VIP traffic to lb1"
    );
    let node = cluster.node(0);
    assert_eq!(node["drain"]["safe_to_stop"], true, "{node}");
    assert_eq!(node["bird"]["announced"], serde_json::json!([]), "{node}");
    // keepalived's check fails on a draining node, not on the other.
    let ready = cluster.daemons[0].cli(&["ready"]);
    assert!(
        !ready.status.success(),
        "xlb ready succeeded on a draining node"
    );
    assert!(
        String::from_utf8_lossy(&ready.stderr).contains("draining"),
        "{ready:?}"
    );
    assert!(
        cluster.daemons[1]
            .cli_ok(&["ready"])
            .contains("ready: serving 203.0.113.10")
    );

    // Nothing reaches lb1 any more, and the load goes on through lb2 alone.
    let after_drain = cluster.vip_packets(0);
    thread::sleep(Duration::from_millis(500));
    let (broken, failed, answered) = load.finish();
    assert_eq!(
        cluster.vip_packets(0),
        after_drain,
        "lb1 still receives VIP packets"
    );
    assert_eq!(broken, 0, "kept-alive connections broken by the drain");
    assert_eq!(failed, 0, "new connections failed during the drain");
    assert!(
        answered > 10,
        "the load hardly ran: {answered} new connections"
    );

    let cancelled = cluster.daemons[0].cli_ok(&["drain", "--cancel"]);
    assert!(cancelled.contains("announced again"), "{cancelled}");
    cluster.wait_hops(&[lb1, lb2]);

    // A VIP without a real that can serve is withdrawn; one real back announces it.
    for real in &cluster.topo.reals {
        cluster.daemons[1].cli_ok(&["real", "disable", SERVICE, &real.ipv4.to_string()]);
    }
    cluster.wait_hops(&[lb1]);
    let ready = cluster.daemons[1].cli(&["ready"]);
    assert!(
        !ready.status.success(),
        "xlb ready succeeded without a serving real"
    );
    assert!(
        String::from_utf8_lossy(&ready.stderr).contains("no VIP has a real that can serve"),
        "{ready:?}"
    );
    let rs1 = cluster.topo.reals[0].ipv4.to_string();
    cluster.daemons[1].cli_ok(&["real", "enable", SERVICE, &rs1]);
    cluster.wait_hops(&[lb1, lb2]);
}

#[test]
fn bird_down_is_reported_and_retried_and_role_is_recorded() {
    require_root();
    let mut cluster = Cluster::start("cbr");
    cluster.wait_hops(&["198.51.100.1", "198.51.100.3"]);
    // lb1's BIRD stops: announcing fails and says so, forwarding goes on.
    cluster.birds.remove(0);
    cluster.daemons[0].cli_ok(&[
        "real",
        "disable",
        SERVICE,
        &cluster.topo.reals[0].ipv4.to_string(),
    ]);
    cluster.daemons[0].cli_ok(&[
        "real",
        "disable",
        SERVICE,
        &cluster.topo.reals[1].ipv4.to_string(),
    ]);
    wait_until("lb1 reports BIRD out of sync", || {
        cluster.node(0)["bird"]["in_sync"] == false
    });
    let status = cluster.daemons[0].cli_ok(&["status"]);
    assert!(
        status.contains("BIRD NOT IN SYNC: BIRD's control socket"),
        "{status}"
    );
    let metrics_free = cluster.node(0);
    assert!(
        metrics_free["bird"]["error_since"].as_u64().is_some(),
        "{metrics_free}"
    );

    // `xlb role` as keepalived's notify hooks call it.
    cluster.daemons[1].cli_ok(&["role", "backup"]);
    assert_eq!(cluster.node(1)["role"]["role"], "backup");
    cluster.daemons[1].cli_ok(&["role", "master"]);
    assert_eq!(cluster.node(1)["role"]["role"], "master");
    let bad = cluster.daemons[1].cli(&["role", "primary"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("invalid value 'primary'"),
        "{bad:?}"
    );
}

/// keepalived (VRRPv3, 100 ms adverts) for a pair: `xlb ready` as its `vrrp_script`,
/// `xlb role` as its notify hooks.
fn keepalived(ns: &Netns, dir: &Path, socket: &Path, priority: u8) -> Proc {
    let xlb = xlb_tests::harness::xlb_bin();
    let xlb = format!("{} --socket {}", xlb.display(), socket.display());
    let conf = format!(
        "global_defs {{\n  enable_script_security\n  script_user root\n}}\n\
         vrrp_script xlb_ready {{\n  script \"{xlb} ready\"\n  interval 1\n  timeout 2\n  \
         fall 2\n  rise 1\n}}\n\
         vrrp_instance edge {{\n  state BACKUP\n  nopreempt\n  interface eth0\n  \
         virtual_router_id 51\n  priority {priority}\n  version 3\n  advert_int 0.1\n  \
         virtual_ipaddress {{\n    {VIP}/32 dev eth0\n  }}\n  track_script {{\n    xlb_ready\n  }}\n  \
         notify_master \"{xlb} role master\"\n  notify_backup \"{xlb} role backup\"\n  \
         notify_fault \"{xlb} role fault\"\n}}\n"
    );
    let conf_path = dir.join("keepalived.conf");
    std::fs::write(&conf_path, conf).expect("writing keepalived.conf");
    let mut cmd = ns.command("keepalived");
    cmd.args(["--dont-fork", "--log-console", "--vrrp", "-f"])
        .arg(&conf_path)
        .arg("-p")
        .arg(dir.join("keepalived.pid"))
        .arg("-r")
        .arg(dir.join("vrrp.pid"))
        .stdout(std::fs::File::create(dir.join("keepalived.log")).expect("log file"))
        .stderr(std::process::Stdio::null());
    Proc::spawn("keepalived", &mut cmd)
}

#[test]
fn keepalived_pair_with_flow_sync_fails_over_without_breaking_connections() {
    let (broken, failed, answered) = keepalived_failover("cvr", true);
    assert_eq!(broken, 0, "kept-alive connections broken by the failover");
    assert_eq!(failed, 0, "new connections failed during the failover");
    assert!(
        answered > 10,
        "the load hardly ran: {answered} new connections"
    );
}

#[test]
fn keepalived_pair_without_flow_sync_breaks_connections_once_a_real_was_added() {
    let (broken, ..) = keepalived_failover("cvo", false);
    assert!(
        broken > 0,
        "no connection broke without flow sync: the scenario proves nothing"
    );
}

/// Scenario 5: a keepalived (VRRP) pair, lb1 master; 24 kept-alive connections through
/// it, a third real added on both, then lb1's link goes down and lb2 takes the VIP.
/// Then keepalived's check on lb2: a draining node is not ready. Returns (broken,
/// failed, answered).
fn keepalived_failover(tag: &str, sync: bool) -> (usize, usize, usize) {
    require_root();
    let mut topo = balanced_topology(&unique_prefix(tag), 3);
    let _servers = start_reals(&topo, &["--http", "0.0.0.0:80"]);
    let lb2 = topo.add_host("lb2", "lb2", 3);
    pass_on_switch_port(&mut topo, "lb2");
    // The client reaches the VIP on the segment: whoever answers ARP for it gets it.
    topo.client.ns.ip("route del 203.0.113.0/24");
    topo.client.ns.ip(&format!("route add {VIP}/32 dev eth0"));

    let mut dirs = Vec::new();
    let mut daemons = Vec::new();
    let mut vrrp = Vec::new();
    for (host, other, priority) in [(&topo.lb, &lb2, 100), (&lb2, &topo.lb, 90)] {
        let dir = RunDir::new(&format!("xlb-{}-vrrp{priority}", topo.prefix()));
        // The master holds the VIP address: changes must still be accepted there.
        let mut args = vec!["--no-pin".to_owned(), "--allow-local-vips".to_owned()];
        if sync {
            args.extend(sync_args(host, other, dir.path()));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let daemon = Daemon::start_in(&host.ns, "eth0", dir.path(), &args);
        daemon.cli_ok(&["vip", "add", SERVICE]);
        for real in &topo.reals[..2] {
            daemon.cli_ok(&["real", "add", SERVICE, &real.ipv4.to_string()]);
        }
        daemons.push(daemon);
        dirs.push(dir);
    }
    // Both ready before keepalived runs (with sync, lb1's start-up pull waits for
    // lb2): with `nopreempt`, whichever is ready first would stay master.
    for d in &daemons {
        wait_until("the balancer is ready (xlb ready)", || {
            d.cli(&["ready"]).status.success()
        });
    }
    let role = |i: usize| {
        json(
            &daemons[i].cli_ok(&["status", "--json"]),
            "xlb status --json",
        )["node"]["role"]["role"]
            .clone()
    };
    // lb1's keepalived first, master before lb2's starts (two starting at once race
    // for the role, and `nopreempt` keeps whoever won).
    vrrp.push(keepalived(
        &topo.lb.ns,
        dirs[0].path(),
        daemons[0].socket(),
        100,
    ));
    wait_until("lb1 becomes VRRP master (xlb role)", || role(0) == "master");
    vrrp.push(keepalived(&lb2.ns, dirs[1].path(), daemons[1].socket(), 90));
    wait_until("lb1 becomes VRRP master and lb2 backup (xlb role)", || {
        role(0) == "master" && role(1) == "backup"
    });

    let load = Load::start(&topo.client.ns, 24);
    thread::sleep(Duration::from_millis(300));
    let rs3 = topo.reals[2].ipv4.to_string();
    for d in &daemons {
        d.cli_ok(&["real", "add", SERVICE, &rs3]);
    }
    thread::sleep(Duration::from_millis(300));
    // The master's link goes: its adverts stop, lb2 takes the VIP.
    let cut = std::time::Instant::now();
    topo.lb.ns.ip("link set dev eth0 down");
    wait_until("lb2 becomes VRRP master", || role(1) == "master");
    let took = cut.elapsed();
    let before = stats_packets(&daemons[1]);
    wait_until("lb2 forwards the VIP's traffic", || {
        stats_packets(&daemons[1]) > before
    });
    thread::sleep(Duration::from_millis(2500));
    let (broken, failed, answered) = load.finish();
    eprintln!(
        "VRRP failover, sync {}: lb2 master {:.2} s after the cut; {broken} of 24 connections \
         broken, {failed} new connections failed, {answered} answered",
        if sync { "on" } else { "off" },
        took.as_secs_f64()
    );
    // keepalived's check: a draining node is not ready, so it would give the VIP up.
    let ready = daemons[1].cli(&["ready"]);
    assert!(ready.status.success(), "{ready:?}");
    daemons[1].cli_ok(&["drain", "--no-wait"]);
    let ready = daemons[1].cli(&["ready"]);
    assert!(
        !ready.status.success(),
        "xlb ready succeeded on a draining node"
    );
    drop(vrrp);
    drop(daemons);
    drop(dirs);
    (broken, failed, answered)
}

fn stats_packets(daemon: &Daemon) -> u64 {
    let stats = json(&daemon.cli_ok(&["stats", "--json"]), "xlb stats --json");
    stats["vips"]
        .as_array()
        .and_then(|v| v.iter().find(|s| s["vip"] == SERVICE))
        .and_then(|v| v["packets"].as_u64())
        .unwrap_or_else(|| panic!("no packets for {SERVICE} in {stats}"))
}

/// What a balancer failure did to the load.
struct Failover {
    /// Connections opened before a real was added: broken, of how many.
    broken: usize,
    /// Connections opened 200 ms before the kill: broken.
    late_broken: usize,
    /// New connections that failed, and answered.
    failed: usize,
    answered: usize,
}

/// `xlb run`'s flow sync flags for `host` with `other` as its peer, the key in `dir`.
fn sync_args(host: &Host, other: &Host, dir: &Path) -> Vec<String> {
    let key = dir.join("sync.key");
    std::fs::write(&key, "a shared key of the test cluster\n").expect("writing the key");
    vec![
        "--sync-listen".to_owned(),
        format!("{}:{SYNC_PORT}", host.ipv4),
        "--sync-peer".to_owned(),
        format!("{}:{SYNC_PORT}", other.ipv4),
        "--sync-key-file".to_owned(),
        path_str(&key).to_owned(),
        "--sync-pull-timeout-ms".to_owned(),
        "3000".to_owned(),
        "--node-name".to_owned(),
        host.ns.name().to_owned(),
    ]
}

/// How lb1 fails.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// `kill -9` of xlb and its BIRD: the router's BGP session closes.
    Kill,
    /// Its link goes down: BFD tells the router.
    Cut,
}

/// Scenario 1 and 2 of flow sync: 40 kept-alive connections spread over both balancers,
/// a third real added to the VIP (every balancer's Maglev choice changes for about a
/// third of the flows), 8 more connections 200 ms before lb1 fails; the load runs 3 s
/// on after the router dropped lb1's routes.
fn add_a_real_then_fail_lb1(cluster: &mut Cluster, failure: Failure) -> (Load, Load) {
    let (lb1, lb2) = ("198.51.100.1", "198.51.100.3");
    cluster.wait_hops(&[lb1, lb2]);
    let load = Load::start(&cluster.out, 40);
    let before = [cluster.vip_packets(0), cluster.vip_packets(1)];
    wait_until("both balancers forward VIP packets", || {
        cluster.vip_packets(0) > before[0] && cluster.vip_packets(1) > before[1]
    });
    let rs3 = cluster.topo.reals[2].ipv4.to_string();
    for d in &cluster.daemons {
        d.cli_ok(&["real", "add", SERVICE, &rs3]);
    }
    thread::sleep(Duration::from_millis(300));
    let late = Load::start(&cluster.out, 8);
    thread::sleep(Duration::from_millis(200));
    match failure {
        Failure::Kill => cluster.kill(0),
        Failure::Cut => {
            cluster.host(0).ns.ip("link set dev eth0 down");
        }
    }
    cluster.wait_hops(&[lb2]);
    thread::sleep(Duration::from_secs(3));
    (load, late)
}

fn finish(load: Load, late: Load) -> Failover {
    let (broken, failed, answered) = load.finish();
    let (late_broken, late_failed, late_answered) = late.finish();
    Failover {
        broken,
        late_broken,
        failed: failed + late_failed,
        answered: answered + late_answered,
    }
}

#[test]
fn without_flow_sync_a_killed_balancer_breaks_connections_once_a_real_was_added() {
    failover_without_sync("cfo", Failure::Kill);
}

#[test]
fn without_flow_sync_a_cut_link_breaks_connections_once_a_real_was_added() {
    failover_without_sync("cfc", Failure::Cut);
}

fn failover_without_sync(tag: &str, failure: Failure) {
    require_root();
    let mut cluster = Cluster::start_with(
        tag,
        Setup {
            reals: 3,
            in_vip: 2,
            sync: false,
        },
    );
    let (load, late) = add_a_real_then_fail_lb1(&mut cluster, failure);
    let f = finish(load, late);
    eprintln!(
        "sync off, lb1 {}: {} of 40 connections broken (+{} of 8 late ones), {} new \
         connections failed, {} answered",
        if failure == Failure::Kill {
            "killed"
        } else {
            "cut off"
        },
        f.broken,
        f.late_broken,
        f.failed,
        f.answered
    );
    // The scenario bites: lb2's table sends some of lb1's flows to the new real.
    assert!(
        f.broken > 0,
        "no connection broke without flow sync: the scenario proves nothing"
    );
}

#[test]
fn with_flow_sync_a_cut_link_breaks_no_connection() {
    require_root();
    let mut cluster = Cluster::start_with(
        "cfk",
        Setup {
            reals: 3,
            in_vip: 2,
            sync: true,
        },
    );
    let (load, late) = add_a_real_then_fail_lb1(&mut cluster, Failure::Cut);
    let f = finish(load, late);
    eprintln!(
        "sync on, lb1 cut off: {} of 40 connections broken (+{} of 8 late ones), {} new \
         connections failed, {} answered",
        f.broken, f.late_broken, f.failed, f.answered
    );
    assert_eq!(f.broken, 0, "kept-alive connections broken");
    assert_eq!(
        f.late_broken, 0,
        "connections opened 200 ms before the cut broken"
    );
    assert_eq!(f.failed, 0, "new connections failed");
    assert!(
        f.answered > 20,
        "the load hardly ran: {} answered",
        f.answered
    );
}

#[test]
fn with_flow_sync_killed_and_restarted_balancers_break_no_connection() {
    require_root();
    let mut cluster = Cluster::start_with(
        "cfs",
        Setup {
            reals: 3,
            in_vip: 2,
            sync: true,
        },
    );
    let (load, late) = add_a_real_then_fail_lb1(&mut cluster, Failure::Kill);
    let lb2 = cluster.metrics(1);
    assert!(
        lb2["xlb_sync_flows_received_total"] > 0.0,
        "lb2 heard of none of lb1's flows: {lb2:?}"
    );
    assert!(
        lb2[r#"xlb_conntrack_events_total{event="peer_hit"}"#] > 0.0,
        "lb2 never took a flow from lb1's reports"
    );

    // Scenario 3: lb1 comes back, pulls every flow from lb2 before BIRD announces
    // it, takes its share of the flows; then lb2 dies.
    cluster.restart(0);
    cluster.wait_hops(&["198.51.100.1", "198.51.100.3"]);
    let node = cluster.node(0);
    assert_eq!(node["sync"]["ready"], true, "{node}");
    assert_eq!(
        node["sync"]["pulled_from"],
        format!("198.51.100.3:{SYNC_PORT}"),
        "{node}"
    );
    assert!(
        node["sync"]["pulled_flows"].as_u64() >= Some(48),
        "the restarted lb1 pulled too few flows: {node}"
    );
    let text = cluster.daemons[0].cli_ok(&["status"]);
    assert!(
        text.contains(&format!(
            "flow sync on 198.51.100.1:{SYNC_PORT} with 198.51.100.3:{SYNC_PORT}"
        )) && text.contains(&format!("flows from 198.51.100.3:{SYNC_PORT}")),
        "{text}"
    );
    let before = cluster.vip_packets(0);
    wait_until("the restarted lb1 forwards VIP packets", || {
        cluster.vip_packets(0) > before
    });
    thread::sleep(Duration::from_millis(500));
    cluster.kill(1);
    cluster.wait_hops(&["198.51.100.1"]);
    thread::sleep(Duration::from_secs(3));
    let f = finish(load, late);
    eprintln!(
        "sync on, lb1 killed, restarted, lb2 killed: {} of 40 connections broken (+{} of 8 \
         late ones), {} new connections failed, {} answered",
        f.broken, f.late_broken, f.failed, f.answered
    );
    assert_eq!(f.broken, 0, "kept-alive connections broken");
    assert_eq!(
        f.late_broken, 0,
        "connections opened 200 ms before the kill broken"
    );
    assert_eq!(f.failed, 0, "new connections failed");
    assert!(
        f.answered > 20,
        "the load hardly ran: {} answered",
        f.answered
    );

    forged_messages_and_a_syn_flood(&cluster);
}

/// Scenario 6, against lb1 (lb2 is dead, its address is still a peer's): messages
/// with another key, of another cluster, replayed, or from a source that is no peer
/// are dropped and counted; a SYN flood makes no sync traffic.
fn forged_messages_and_a_syn_flood(cluster: &Cluster) {
    use lb_userspace::flowsync::wire::{self, Entry, Header, Key, Kind, Op};
    let to = SocketAddr::from((cluster.host(0).ipv4, SYNC_PORT));
    let key = Key::new(b"a shared key of the test cluster").expect("the test key");
    let wrong = Key::new(b"a shared key of another cluster").expect("a key");
    let mut src = [0u8; 16];
    src[..4].copy_from_slice(&[192, 0, 2, 77]);
    let mut dst = [0u8; 16];
    dst[..4].copy_from_slice(&VIP.octets());
    let entry = Entry {
        op: Op::New,
        flow: lb_common::FlowKey {
            src,
            dst,
            ports: (40_000 << 16) | 80,
            proto: 6,
            family: lb_common::FAMILY_V4,
            _pad: [0; 2],
        },
        real: cluster.topo.reals[0].ipv4.into(),
        at_ns: 0,
    };
    let header = |cluster_id, seq| Header {
        kind: Kind::Flows,
        cluster: cluster_id,
        node: 99,
        epoch: 1,
        seq,
        sent_ns: 0,
    };
    let send_from = |ns: &Netns, msg: &[u8]| {
        ns.run_in(|| {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
            socket.send_to(msg, to).expect("sending a sync message");
        });
    };
    let before = cluster.metrics(0);
    let good = wire::encode(&key, &header(1, 5), &[entry]);
    send_from(
        &cluster.lb2.ns,
        &wire::encode(&wrong, &header(1, 1), &[entry]),
    );
    send_from(
        &cluster.lb2.ns,
        &wire::encode(&key, &header(2, 2), &[entry]),
    );
    send_from(&cluster.lb2.ns, &good);
    send_from(&cluster.lb2.ns, &good);
    send_from(&cluster.topo.client.ns, &good);
    let grew = |m: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>, series: &str| {
        m[series] - before[series]
    };
    let dropped = |reason: &str| format!(r#"xlb_sync_dropped_total{{reason="{reason}"}}"#);
    wait_until("lb1 counted the forged messages", || {
        let m = cluster.metrics(0);
        grew(&m, &before, &dropped("replay")) >= 1.0
            && grew(&m, &before, &dropped("unknown_peer")) >= 1.0
    });
    let m = cluster.metrics(0);
    for (series, want) in [
        (dropped("bad_tag"), 1.0),
        (dropped("foreign"), 1.0),
        (dropped("replay"), 1.0),
        (dropped("unknown_peer"), 1.0),
        ("xlb_sync_messages_received_total".to_owned(), 1.0),
    ] {
        assert_eq!(grew(&m, &before, &series), want, "{series}");
    }

    // 500 SYNs from addresses that exist nowhere (the reals' answers die on the
    // way back): tracked, never confirmed, never reported. The reports of the
    // load's last connections (their ends) are out first.
    let sent = || cluster.metrics(0)["xlb_sync_flows_sent_total"];
    wait_until("lb1's flow reports settle", || {
        let a = sent();
        thread::sleep(Duration::from_millis(300));
        sent() == a
    });
    let before = cluster.metrics(0);
    send_syns(&cluster.out, 500);
    thread::sleep(Duration::from_millis(500));
    let m = cluster.metrics(0);
    assert!(
        grew(&m, &before, r#"xlb_conntrack_events_total{event="new"}"#) >= 500.0,
        "the SYN flood did not reach lb1"
    );
    assert_eq!(
        grew(&m, &before, "xlb_sync_flows_sent_total"),
        0.0,
        "a SYN flood became sync traffic: {:?}",
        m.iter()
            .filter(|(k, _)| k.contains("sync") || k.contains("conntrack_events"))
            .map(|(k, v)| (k, v - before[k]))
            .filter(|(_, d)| *d != 0.0)
            .collect::<Vec<_>>()
    );
}

/// Sends `n` TCP SYNs to the VIP from `ns`, each from another port of addresses in
/// 192.0.2.100-199, which no host has.
fn send_syns(ns: &Netns, n: u16) {
    ns.run_in(|| {
        // IPPROTO_RAW: we write the IP header (the kernel fills in its id and checksum).
        let fd = socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::Raw,
        )
        .expect("a raw socket (needs root)");
        let dest = SockaddrIn::from(SocketAddrV4::new(VIP, 80));
        for i in 0..n {
            let src = [192, 0, 2, 100 + u8::try_from(i % 100).expect("below 100")];
            let mut packet = Vec::with_capacity(64);
            PacketBuilder::ipv4(src, VIP.octets(), 64)
                .tcp(20_000 + i, 80, u32::from(i), 64240)
                .syn()
                .write(&mut packet, &[])
                .expect("building a SYN");
            sendto(fd.as_raw_fd(), &packet, &dest, MsgFlags::empty()).expect("sending a SYN");
            if i % 50 == 49 {
                thread::sleep(Duration::from_millis(5));
            }
        }
    });
}
