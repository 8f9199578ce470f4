//! Two balancers in front of three reals, as the cluster tests and the flow sync
//! benchmark run them: behind a BIRD router that spreads flows by ECMP ([`Cluster`]),
//! or as a keepalived (VRRP) pair ([`Pair`]); a client load that counts broken
//! connections ([`Load`]). Needs root, BIRD 2 and keepalived.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::harness::{
    Daemon, KeepAlive, Proc, RunDir, VIP, balanced_topology, http_get, json, keep_alive_from,
    metric_samples, pass_on_switch_port, path_str, require_root, scrape_metrics, start_reals,
    wait_until,
};
use crate::netns::{Host, Netns, Topology, unique_prefix};

pub const SERVICE: &str = "203.0.113.10:80/tcp";
pub const TIMEOUT: Duration = Duration::from_secs(2);
pub const ROUTER: &str = "198.51.100.2";

/// BFD on the segment (as the shipped examples): a balancer whose link is cut loses
/// its routes in about 0.3 s instead of the BGP hold time.
pub const BFD: &str = "protocol bfd {\n  interface \"eth0\" { min rx interval 100 ms; \
                   min tx interval 100 ms; multiplier 3; };\n}\n";

/// A BIRD daemon in `ns`, in the foreground, its socket and log in `dir`.
pub fn bird(ns: &Netns, dir: &Path, name: &str, conf: &str) -> Proc {
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
pub fn router_conf() -> String {
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
pub fn balancer_conf(addr: &str, asn: u32, fragment_dir: &Path) -> String {
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
pub struct Setup {
    /// Real servers in the topology (`.11`, `.12`, ...).
    pub reals: usize,
    /// How many of them the VIP has at start.
    pub in_vip: usize,
    /// Flow sync between the balancers.
    pub sync: bool,
}

/// The flow sync port of every balancer.
pub const SYNC_PORT: u16 = 9815;
/// The balancers' metrics port (in their own namespaces).
pub const METRICS_PORT: u16 = 9814;

/// Two balancers behind a BGP router, two reals; everything dropped in a safe order.
pub struct Cluster {
    /// lb1's and lb2's daemons.
    pub daemons: Vec<Daemon>,
    /// lb1's, lb2's and the router's BIRD.
    pub birds: Vec<Proc>,
    _servers: Vec<Proc>,
    /// The outside client's namespace (behind the router).
    pub out: Netns,
    /// The second balancer's host (the first is `topo.lb`).
    pub lb2: Host,
    /// The segment, the router (`topo.client`), lb1 and the reals.
    pub topo: Topology,
    dirs: Vec<RunDir>,
    setup: Setup,
}

impl Cluster {
    pub fn start(tag: &str) -> Cluster {
        Self::start_with(
            tag,
            Setup {
                reals: 2,
                in_vip: 2,
                sync: false,
            },
        )
    }

    pub fn start_with(tag: &str, setup: Setup) -> Cluster {
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
    pub fn host(&self, i: usize) -> &Host {
        if i == 0 { &self.topo.lb } else { &self.lb2 }
    }

    /// Starts balancer `i` (xlb and its BIRD) in `dir`, its VIP with the first
    /// `in_vip` reals from a config file, flow sync to the other when the setup says so.
    pub fn balancer(&self, i: usize, dir: &Path, in_vip: usize) -> (Daemon, Proc) {
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
    pub fn kill(&mut self, i: usize) {
        self.daemons[i].kill();
        self.birds[i].kill();
    }

    /// Restarts killed balancer `i` with every real of the topology in its VIP.
    pub fn restart(&mut self, i: usize) {
        let dir = self.dirs[i].path().to_owned();
        let (daemon, bird) = self.balancer(i, &dir, self.topo.reals.len());
        self.daemons[i] = daemon;
        self.birds[i] = bird;
    }

    /// Balancer `i`'s metrics.
    pub fn metrics(&self, i: usize) -> BTreeMap<String, f64> {
        let addr = SocketAddr::from((self.host(i).ipv4, METRICS_PORT));
        metric_samples(&scrape_metrics(self.host(i), addr))
    }

    /// The next hops the router's kernel has for the VIP, sorted.
    pub fn hops(&self) -> Vec<String> {
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

    pub fn wait_hops(&self, want: &[&str]) {
        wait_until(
            &format!("the router's next hops for {VIP} are {want:?}"),
            || self.hops() == want,
        );
    }

    pub fn vip_packets(&self, i: usize) -> u64 {
        stats_packets(&self.daemons[i])
    }

    pub fn node(&self, i: usize) -> serde_json::Value {
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
pub struct Load {
    stop: Arc<AtomicBool>,
    /// Every new connection: when it started, how long it took, whether it was answered.
    attempts: Arc<Mutex<Vec<(Instant, Duration, bool)>>>,
    broken: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(out: &Netns, conns: usize) -> Load {
        let to = SocketAddr::from((VIP, 80));
        let opened = keep_alive_from(out, to, conns, TIMEOUT);
        let stop = Arc::new(AtomicBool::new(false));
        let broken = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let attempts = Arc::new(Mutex::new(Vec::new()));
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
            let attempts = attempts.clone();
            let out_name = out.name().to_owned();
            threads.push(thread::spawn(move || {
                // This thread joins the outside namespace: its sockets are made there.
                Netns::enter(&out_name);
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let ok = match http_get(to, TIMEOUT) {
                        Ok(_) => {
                            answered.fetch_add(1, Ordering::Relaxed);
                            true
                        }
                        Err(e) => {
                            eprintln!("new connection failed: {e}");
                            failed.fetch_add(1, Ordering::Relaxed);
                            false
                        }
                    };
                    attempts
                        .lock()
                        .expect("attempts lock")
                        .push((started, started.elapsed(), ok));
                    thread::sleep(Duration::from_millis(50));
                }
            }));
        }
        Load {
            stop,
            attempts,
            broken,
            failed,
            answered,
            threads,
        }
    }

    /// How long after `since` the first new connection started after it was
    /// answered (`None`: none was).
    pub fn recovered(&self, since: Instant) -> Option<Duration> {
        self.attempts
            .lock()
            .expect("attempts lock")
            .iter()
            .filter(|(started, _, ok)| *ok && *started >= since)
            .map(|(started, took, _)| (*started + *took) - since)
            .min()
    }

    pub fn finish(self) -> (usize, usize, usize) {
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

/// keepalived (VRRPv3, 100 ms adverts) for a pair: `xlb ready` as its `vrrp_script`,
/// `xlb role` as its notify hooks.
pub fn keepalived(ns: &Netns, dir: &Path, socket: &Path, priority: u8) -> Proc {
    let xlb = crate::harness::xlb_bin();
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

pub fn stats_packets(daemon: &Daemon) -> u64 {
    let stats = json(&daemon.cli_ok(&["stats", "--json"]), "xlb stats --json");
    stats["vips"]
        .as_array()
        .and_then(|v| v.iter().find(|s| s["vip"] == SERVICE))
        .and_then(|v| v["packets"].as_u64())
        .unwrap_or_else(|| panic!("no packets for {SERVICE} in {stats}"))
}

/// What a balancer failure did to the load.
pub struct Failover {
    /// Connections opened before a real was added: broken, of how many.
    pub broken: usize,
    /// Connections opened 200 ms before the kill: broken.
    pub late_broken: usize,
    /// New connections that failed, and answered.
    pub failed: usize,
    pub answered: usize,
    /// From the failure until a new connection started after it was answered.
    pub recovered: Option<Duration>,
}

impl Failover {
    /// Flow sync's promise for scenarios 1-3: no kept-alive connection broke (also
    /// none of those opened 200 ms before the failure), no new connection failed, and
    /// the load ran (more than 20 new connections answered).
    pub fn assert_nothing_broke(&self) {
        assert_eq!(self.broken, 0, "kept-alive connections broken");
        assert_eq!(
            self.late_broken, 0,
            "connections opened 200 ms before the failure broken"
        );
        assert_eq!(self.failed, 0, "new connections failed");
        assert!(
            self.answered > 20,
            "the load hardly ran: {} answered",
            self.answered
        );
    }
}

/// `xlb run`'s flow sync flags for `host` with `other` as its peer, the key in `dir`.
pub fn sync_args(host: &Host, other: &Host, dir: &Path) -> Vec<String> {
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
pub enum Failure {
    /// `kill -9` of xlb and its BIRD: the router's BGP session closes.
    Kill,
    /// Its link goes down: BFD tells the router.
    Cut,
}

/// Scenario 1 and 2 of flow sync: 40 kept-alive connections spread over both balancers,
/// a third real added to the VIP (every balancer's Maglev choice changes for about a
/// third of the flows), 8 more connections 200 ms before lb1 fails; the load runs 3 s
/// on after the router dropped lb1's routes.
pub fn add_a_real_then_fail_lb1(cluster: &mut Cluster, failure: Failure) -> (Load, Load, Instant) {
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
    let failed_at = Instant::now();
    match failure {
        Failure::Kill => cluster.kill(0),
        Failure::Cut => {
            cluster.host(0).ns.ip("link set dev eth0 down");
        }
    }
    cluster.wait_hops(&[lb2]);
    thread::sleep(Duration::from_secs(3));
    (load, late, failed_at)
}

/// Stops both loads: what the failure at `failed_at` did to them.
pub fn finish(load: Load, late: Load, failed_at: Instant) -> Failover {
    let recovered = load.recovered(failed_at);
    let (broken, failed, answered) = load.finish();
    let (late_broken, late_failed, late_answered) = late.finish();
    Failover {
        broken,
        late_broken,
        failed: failed + late_failed,
        answered: answered + late_answered,
        recovered,
    }
}

/// Scenario 5: a keepalived (VRRP) pair on one segment with three reals (two in the
/// VIP), lb1 master, lb2 backup; flow sync between them when `sync`.
pub struct Pair {
    vrrp: Vec<Proc>,
    /// lb1's and lb2's daemons.
    pub daemons: Vec<Daemon>,
    _servers: Vec<Proc>,
    dirs: Vec<RunDir>,
    lb2: Host,
    topo: Topology,
}

impl Pair {
    pub fn start(tag: &str, sync: bool) -> Pair {
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
        Pair {
            vrrp,
            daemons,
            _servers,
            dirs,
            lb2,
            topo,
        }
    }

    /// Balancer `i`'s VRRP role as `xlb role` recorded it.
    pub fn role(&self, i: usize) -> serde_json::Value {
        json(
            &self.daemons[i].cli_ok(&["status", "--json"]),
            "xlb status --json",
        )["node"]["role"]["role"]
            .clone()
    }

    /// 24 kept-alive connections through lb1, a third real added on both, then lb1's
    /// link goes down and lb2 takes the VIP; the load runs 2.5 s on. What it did, and
    /// how long lb2 took to become master.
    pub fn fail_over(&mut self) -> (Failover, Duration) {
        let load = Load::start(&self.topo.client.ns, 24);
        thread::sleep(Duration::from_millis(300));
        let rs3 = self.topo.reals[2].ipv4.to_string();
        for d in &self.daemons {
            d.cli_ok(&["real", "add", SERVICE, &rs3]);
        }
        thread::sleep(Duration::from_millis(300));
        // The master's link goes: its adverts stop, lb2 takes the VIP.
        let cut = Instant::now();
        self.topo.lb.ns.ip("link set dev eth0 down");
        wait_until("lb2 becomes VRRP master", || self.role(1) == "master");
        let took = cut.elapsed();
        let before = stats_packets(&self.daemons[1]);
        wait_until("lb2 forwards the VIP's traffic", || {
            stats_packets(&self.daemons[1]) > before
        });
        thread::sleep(Duration::from_millis(2500));
        let recovered = load.recovered(cut);
        let (broken, failed, answered) = load.finish();
        let f = Failover {
            broken,
            late_broken: 0,
            failed,
            answered,
            recovered,
        };
        (f, took)
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        // keepalived and the daemons before their directories and namespaces.
        self.vrrp.clear();
        self.daemons.clear();
        self.dirs.clear();
        let _ = (&self.lb2, &self.topo);
    }
}
