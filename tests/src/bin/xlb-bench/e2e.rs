//! Section 3, end to end: wrk from a client namespace through xlb (DR, TUN), HAProxy
//! and nginx stream on the balancer namespace, against three nginx reals, and
//! straight to one real (the ceiling).

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use xlb_tests::harness::{self, Daemon, DecapProc, Proc, RunDir, VIP, balanced_topology};
use xlb_tests::netns::{Netns, Topology, unique_prefix};

use crate::report::{E2e, Scenario, Spread, WrkRun};

const THREADS: u32 = 2;
const CONNECTIONS: u32 = 50;
const BODY_BYTES: usize = 1024;
const REALS: usize = 3;
const SERVICE: &str = "203.0.113.10:80/tcp";

/// The scenarios, in the order each round runs them.
const SCENARIOS: [&str; 5] = ["ceiling", "xlb-dr", "xlb-tun", "haproxy", "nginx"];

pub fn run(quick: bool) -> E2e {
    for tool in ["wrk", "nginx", "haproxy", "ss"] {
        assert!(
            which(tool),
            "{tool} is not installed: ./x bench installs wrk, nginx and haproxy (apt)"
        );
    }
    let (seconds, runs) = if quick { (3, 1) } else { (10, 3) };
    let dir = RunDir::new(&format!("xlb-bench-e2e-{}", std::process::id()));
    let www = dir.path().join("www");
    std::fs::create_dir_all(&www).expect("www dir");
    let body: String = "x".repeat(BODY_BYTES - 1) + "\n";
    std::fs::write(www.join("index.html"), body).expect("index.html");

    let topo = balanced_topology(&unique_prefix("be"), REALS);
    // The proxies open a connection to a real per client connection: give the
    // balancer the same port range and TIME-WAIT reuse as the client.
    topo.lb.ns.sysctl("net.ipv4.tcp_tw_reuse", "1");
    topo.lb
        .ns
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535");
    let _reals: Vec<Proc> = topo
        .reals
        .iter()
        .enumerate()
        .map(|(i, h)| start_real_nginx(&h.ns, dir.path(), &www, i))
        .collect();
    for h in &topo.reals {
        wait_http(&topo.client.ns, SocketAddr::from((h.ipv4, 80)));
    }
    // Kernel run-time statistics of BPF programs while this fd is open.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .unwrap_or_else(|e| panic!("enabling BPF run-time statistics: {e}"));

    let mut scenarios: Vec<Scenario> = Vec::new();
    for conn in ["keep-alive", "close"] {
        let mut by_name: Vec<Vec<WrkRun>> = vec![Vec::new(); SCENARIOS.len()];
        for round in 0..runs {
            for (i, name) in SCENARIOS.iter().enumerate() {
                harness::check_interrupted();
                let r = scenario_run(&topo, dir.path(), name, conn, seconds);
                eprintln!(
                    "xlb-bench:   {name} {conn} run {}: {:.0} req/s, p99 {:.2} ms, {} errors, \
                     TIME-WAIT {} ({} new)",
                    round + 1,
                    r.requests_per_s,
                    r.p99_ms,
                    r.errors,
                    r.time_wait,
                    r.time_wait_new
                );
                by_name[i].push(r);
            }
        }
        let ceiling: Vec<f64> = by_name[0].iter().map(|r| r.requests_per_s).collect();
        for (i, name) in SCENARIOS.iter().enumerate() {
            let ratios: Vec<f64> = by_name[i]
                .iter()
                .zip(&ceiling)
                .map(|(r, c)| r.requests_per_s / c)
                .collect();
            scenarios.push(Scenario {
                name: (*name).to_owned(),
                connection: conn.to_owned(),
                runs: by_name[i].clone(),
                ratio_ceiling: Spread::of(&ratios),
            });
        }
    }
    E2e {
        versions: versions(),
        threads: THREADS,
        connections: CONNECTIONS,
        seconds,
        runs,
        body_bytes: BODY_BYTES,
        scenarios,
    }
}

/// Sets scenario `name` up, runs wrk once, measures, tears it down.
fn scenario_run(topo: &Topology, dir: &Path, name: &str, conn: &str, seconds: u32) -> WrkRun {
    let vip = SocketAddr::from((VIP, 80));
    let reals: Vec<Ipv4Addr> = topo.reals.iter().map(|h| h.ipv4).collect();
    let lb = &topo.lb.ns;
    // Whatever runs the scenario; dropped (stopped) at the end of this function.
    let mut daemon = None;
    let mut decaps: Vec<DecapProc> = Vec::new();
    let mut proxy = None;
    let mut vip_on_lo = false;
    let target = match name {
        "ceiling" => SocketAddr::from((reals[0], 80)),
        "xlb-dr" | "xlb-tun" => {
            let d = Daemon::start(lb, "eth0");
            let forward = if name == "xlb-tun" { "tun" } else { "dr" };
            d.cli_ok(&["vip", "add", SERVICE, "--forward", forward]);
            for r in &reals {
                d.cli_ok(&["real", "add", SERVICE, &r.to_string()]);
            }
            if name == "xlb-tun" {
                decaps = topo
                    .reals
                    .iter()
                    .map(|h| DecapProc::start(h, &[]))
                    .collect();
            }
            daemon = Some(d);
            vip
        }
        "haproxy" | "nginx" => {
            lb.ip(&format!("addr add {VIP}/32 dev lo"));
            vip_on_lo = true;
            proxy = Some(if name == "haproxy" {
                start_haproxy(lb, dir, &reals)
            } else {
                start_nginx_stream(lb, dir, &reals)
            });
            vip
        }
        other => panic!("unknown scenario {other}"),
    };
    wait_http(&topo.client.ns, target);
    let xdp_prog = daemon.as_ref().map(|_| xdp_prog_id(lb));
    let xdp_before = xdp_prog.map(bpf_run_time);
    let cpu_before = ns_cpu_seconds(lb);
    // TIME-WAIT sockets of earlier runs then have timers at least this much
    // shorter than the ones this run creates (ss shows whole seconds).
    std::thread::sleep(Duration::from_millis(1500));
    let stat_before = proc_stat();
    let start = Instant::now();
    let out = wrk(&topo.client.ns, target, conn, seconds);
    let elapsed = start.elapsed();
    let stat_after = proc_stat();
    let cpu_after = ns_cpu_seconds(lb);
    let xdp_after = xdp_prog.map(bpf_run_time);
    let (time_wait, time_wait_new) = time_wait(lb, elapsed);
    let mut run =
        parse_wrk(&out).unwrap_or_else(|e| panic!("{name} {conn}: {e}; wrk said:\n{out}"));
    run.balancer_process_cpu_s = cpu_after - cpu_before;
    run.xdp_cpu_s = xdp_before
        .zip(xdp_after)
        .map(|(b, a)| a.saturating_sub(b).as_secs_f64());
    run.machine_softirq_s = stat_after.softirq - stat_before.softirq;
    run.machine_system_s = stat_after.system - stat_before.system;
    run.time_wait = time_wait;
    run.time_wait_new = time_wait_new;
    drop(decaps);
    drop(daemon);
    drop(proxy);
    if vip_on_lo {
        lb.ip(&format!("addr del {VIP}/32 dev lo"));
    }
    run
}

/// First lines of `haproxy -v`, `nginx -v` and `wrk -v`.
fn versions() -> Vec<String> {
    [("haproxy", "-v"), ("nginx", "-v"), ("wrk", "-v")]
        .iter()
        .filter_map(|(tool, arg)| {
            let out = Command::new(tool).arg(arg).output().ok()?;
            // nginx prints to stderr, wrk exits non-zero: take whatever it said.
            let text = [out.stdout, out.stderr].concat();
            let first = String::from_utf8_lossy(&text)
                .lines()
                .next()?
                .trim()
                .to_owned();
            Some(first)
        })
        .collect()
}

fn which(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// nginx on a real: one worker serving `www` on port 80.
fn start_real_nginx(ns: &Netns, dir: &Path, www: &Path, i: usize) -> Proc {
    let conf = dir.join(format!("nginx-rs{}.conf", i + 1));
    let text = format!(
        "daemon off;\nuser root;\nworker_processes 1;\npid {dir}/nginx-rs{n}.pid;\n\
         error_log {dir}/nginx-rs{n}.log warn;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n\
         client_body_temp_path {dir}/tmp-rs{n};\n  proxy_temp_path {dir}/tmp-rs{n};\n\
         fastcgi_temp_path {dir}/tmp-rs{n};\n  uwsgi_temp_path {dir}/tmp-rs{n};\n\
         scgi_temp_path {dir}/tmp-rs{n};\n\
         server {{ listen 80 backlog=8192; root {www}; }}\n}}\n",
        dir = dir.display(),
        n = i + 1,
        www = www.display()
    );
    std::fs::write(&conf, text).expect("writing the nginx config");
    let log = dir.join(format!("nginx-rs{}.log", i + 1));
    let mut cmd = ns.command("nginx");
    cmd.arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(&log)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    Proc::spawn(&format!("nginx in {}", ns.name()), &mut cmd)
}

fn start_haproxy(ns: &Netns, dir: &Path, reals: &[Ipv4Addr]) -> Proc {
    let conf = dir.join("haproxy.cfg");
    let mut text = String::from(
        "global\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
         timeout client 30s\n  timeout server 30s\n",
    );
    text.push_str(&format!(
        "frontend fe\n  bind {VIP}:80\n  default_backend be\nbackend be\n  balance roundrobin\n"
    ));
    for (i, r) in reals.iter().enumerate() {
        text.push_str(&format!("  server rs{} {r}:80\n", i + 1));
    }
    std::fs::write(&conf, text).expect("writing the HAProxy config");
    let mut cmd = ns.command("haproxy");
    cmd.arg("-db")
        .arg("-f")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    Proc::spawn(&format!("haproxy in {}", ns.name()), &mut cmd)
}

fn start_nginx_stream(ns: &Netns, dir: &Path, reals: &[Ipv4Addr]) -> Proc {
    let conf = dir.join("nginx-stream.conf");
    let servers: String = reals
        .iter()
        .map(|r| format!("    server {r}:80;\n"))
        .collect();
    let text = format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         daemon off;\nuser root;\nworker_processes auto;\nworker_rlimit_nofile 65536;\n\
         pid {dir}/nginx-stream.pid;\nerror_log {dir}/nginx-stream.log warn;\n\
         events {{ worker_connections 16384; }}\n\
         stream {{\n  upstream reals {{\n{servers}  }}\n\
         server {{ listen {VIP}:80 backlog=8192; proxy_pass reals; }}\n}}\n",
        dir = dir.display()
    );
    std::fs::write(&conf, text).expect("writing the nginx stream config");
    let mut cmd = ns.command("nginx");
    cmd.arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("nginx-stream.log"))
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    Proc::spawn(&format!("nginx stream in {}", ns.name()), &mut cmd)
}

/// Waits until `GET /` to `to` from `ns` answers 200.
fn wait_http(ns: &Netns, to: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = String::new();
    while Instant::now() < deadline {
        harness::check_interrupted();
        match ns.run_in(|| http_ok(to)) {
            Ok(()) => return,
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{to} did not answer HTTP 200 from {} within 15 s: {last}",
        ns.name()
    );
}

fn http_ok(to: SocketAddr) -> Result<(), String> {
    let timeout = Duration::from_secs(1);
    let mut s = TcpStream::connect_timeout(&to, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    if answer.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!(
            "answer {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(40)])
        ))
    }
}

fn wrk(ns: &Netns, to: SocketAddr, conn: &str, seconds: u32) -> String {
    let mut cmd = ns.command("wrk");
    cmd.args([
        &format!("-t{THREADS}"),
        &format!("-c{CONNECTIONS}"),
        &format!("-d{seconds}s"),
        "--latency",
    ]);
    if conn == "close" {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://{to}/"));
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run wrk: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "wrk failed ({}): {}{}",
        out.status,
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// A wrk latency like `1.23ms`, `850.00us` or `1.02s`, in milliseconds.
fn latency_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("m") {
        (n, 60_000.0)
    } else {
        (s.strip_suffix('s')?, 1000.0)
    };
    num.parse::<f64>().ok().map(|v| v * scale)
}

/// Requests/s, p50, p99 and errors from wrk's `--latency` output.
fn parse_wrk(out: &str) -> Result<WrkRun, String> {
    let mut run = WrkRun::default();
    let mut have_rps = false;
    for line in out.lines() {
        let l = line.trim();
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            run.requests_per_s = v.trim().parse().map_err(|e| format!("Requests/sec: {e}"))?;
            have_rps = true;
        } else if let Some(v) = l.strip_prefix("50%") {
            run.p50_ms = latency_ms(v).ok_or("bad 50% latency")?;
        } else if let Some(v) = l.strip_prefix("99%") {
            run.p99_ms = latency_ms(v).ok_or("bad 99% latency")?;
        } else if let Some(v) = l.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            run.errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1))
                .filter_map(|n| n.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            run.errors += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    if have_rps {
        Ok(run)
    } else {
        Err("no Requests/sec in wrk's output".to_owned())
    }
}

/// Clock ticks per second of /proc's CPU times.
fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// User + system CPU seconds of every process in `ns` (threads included).
fn ns_cpu_seconds(ns: &Netns) -> f64 {
    let out = Command::new("ip")
        .args(["netns", "pids", ns.name()])
        .output()
        .expect("ip netns pids");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .filter_map(process_cpu_seconds)
        .sum()
}

/// utime + stime of a process, seconds (None when it is gone).
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    process_cpu_split(pid).map(|(u, s)| u + s)
}

/// (utime, stime) of a process, seconds (None when it is gone).
pub fn process_cpu_split(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime / clk_tck(), stime / clk_tck()))
}

struct ProcStat {
    system: f64,
    softirq: f64,
}

/// Machine-wide system and softirq CPU seconds so far.
fn proc_stat() -> ProcStat {
    let text = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let cpu: Vec<f64> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let tck = clk_tck();
    // user nice system idle iowait irq softirq ...
    ProcStat {
        system: cpu.get(2).copied().unwrap_or(0.0) / tck,
        softirq: cpu.get(6).copied().unwrap_or(0.0) / tck,
    }
}

/// Id of the XDP program attached to eth0 in `ns`.
fn xdp_prog_id(ns: &Netns) -> u32 {
    let out = ns.ip("-j -d link show eth0");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j prints JSON");
    let link = &json[0];
    link["xdp"]["prog"]["id"]
        .as_u64()
        .or_else(|| {
            link["xdp"]["attached"]
                .as_array()
                .and_then(|a| a.first())
                .and_then(|p| p["prog"]["id"].as_u64())
        })
        .and_then(|id| u32::try_from(id).ok())
        .unwrap_or_else(|| panic!("no XDP program on eth0 in {}: {link}", ns.name()))
}

/// Run time of BPF program `id` so far (needs the statistics enabled).
fn bpf_run_time(id: u32) -> Duration {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .map(|p| p.run_time())
        .unwrap_or_else(|| panic!("BPF program {id} is not loaded"))
}

/// Sockets in TIME-WAIT in `ns`, and how many have more than 60 s − `run`
/// left on their timer (created during the run just ended).
fn time_wait(ns: &Netns, run: Duration) -> (u64, u64) {
    let out = ns.exec(&["ss", "-tan", "-o", "state", "time-wait"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let fresh_ms = 60_000u64.saturating_sub(run.as_millis() as u64 + 1000);
    let mut total = 0;
    let mut new = 0;
    for l in text.lines() {
        let Some((_, rest)) = l.split_once("timer:(timewait,") else {
            continue;
        };
        total += 1;
        let left = rest.split(',').next().map_or(0, timer_ms);
        if left >= fresh_ms {
            new += 1;
        }
    }
    (total, new)
}

/// `1min2sec300ms` → milliseconds.
fn timer_ms(s: &str) -> u64 {
    let mut total = 0;
    let mut num = 0u64;
    let mut unit = String::new();
    let flush = |num: u64, unit: &str| match unit {
        "min" => num * 60_000,
        "sec" => num * 1000,
        "ms" => num,
        _ => 0,
    };
    for c in s.chars() {
        if c.is_ascii_digit() {
            if !unit.is_empty() {
                total += flush(num, &unit);
                unit.clear();
                num = 0;
            }
            num = num * 10 + u64::from(c.to_digit(10).unwrap_or(0));
        } else {
            unit.push(c);
        }
    }
    total + flush(num, &unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_parsed() {
        let out = "Running 10s test @ http://203.0.113.10/\n  2 threads and 50 connections\n  \
                   Latency Distribution\n     50%  612.00us\n     75%    1.00ms\n     99%    \
                   3.50ms\n  1000 requests in 10.00s, 1.00MB read\n  Socket errors: connect 1, \
                   read 2, write 0, timeout 3\n  Non-2xx or 3xx responses: 4\nRequests/sec:  \
                   12345.67\n";
        let r = parse_wrk(out).expect("parses");
        assert!((r.requests_per_s - 12345.67).abs() < 1e-6);
        assert!((r.p50_ms - 0.612).abs() < 1e-9);
        assert!((r.p99_ms - 3.5).abs() < 1e-9);
        assert_eq!(r.errors, 10);
    }

    #[test]
    fn ss_timers_are_read() {
        assert_eq!(timer_ms("59sec"), 59_000);
        assert_eq!(timer_ms("1min"), 60_000);
        assert_eq!(timer_ms("1min2sec300ms"), 62_300);
        assert_eq!(timer_ms("850ms"), 850);
    }
}
