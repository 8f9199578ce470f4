//! Health checking: probe kinds, their settings, and (in `engine`) the
//! scheduler that runs them and feeds verdicts into the reconcile step.

pub mod command;
pub mod engine;
pub mod path;
pub mod probe;
mod wheel;

pub use engine::{Engine, ProbeStatus};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::model::Forward;

/// What a probe does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    /// A TCP connect.
    #[default]
    Tcp,
    /// An HTTP GET with an expected status (and optional body substring).
    Http,
    /// The HTTP check over TLS (rustls), with SNI and optional verification.
    Https,
    /// A UDP datagram that must be answered (optionally with a substring).
    Udp,
    /// A command (keepalived's `MISC_CHECK`): exit code 0 passes.
    Exec,
    /// No probing: the real is always healthy.
    None,
}

/// Where a probe is sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// To the real's own address, by the balancer's network stack.
    #[default]
    Real,
    /// To the VIP, the way the data path forwards client traffic: through
    /// the tunnel to the real (TUN) or at the real's MAC (DR). Proves the
    /// real's decapsulation (TUN) or its VIP on `lo` (DR) as well.
    Vip,
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Real => "real",
            Self::Vip => "vip",
        })
    }
}

impl std::str::FromStr for Via {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "real" => Ok(Self::Real),
            "vip" => Ok(Self::Vip),
            _ => Err(format!("'{s}' is not real or vip")),
        }
    }
}

/// How a `tcp` check probes the real's own address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TcpMode {
    /// A full connect (SYN, SYN-ACK, ACK), then a reset: what keepalived's
    /// `TCP_CHECK` does.
    #[default]
    Connect,
    /// Half-open: a SYN crafted on a raw socket; a SYN-ACK passes (the
    /// balancer's kernel resets the half-open connection), a RST fails.
    /// Needs `CAP_NET_RAW` at start-up; far cheaper per probe.
    Syn,
}

impl TcpMode {
    fn is_connect(&self) -> bool {
        *self == Self::Connect
    }
}

impl std::fmt::Display for TcpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Connect => "connect",
            Self::Syn => "syn",
        })
    }
}

impl std::str::FromStr for TcpMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "connect" => Ok(Self::Connect),
            "syn" => Ok(Self::Syn),
            _ => Err(format!("'{s}' is not connect or syn")),
        }
    }
}

/// A real to probe: its check, the port probed, and how its VIP forwards
/// to it (what a `via: vip` probe imitates).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    /// The check that applies to the real.
    pub check: HealthCheck,
    /// The port probed: the check's, else the VIP's.
    pub port: u16,
    /// The VIP's forwarding mode.
    pub forward: Forward,
}

/// Health-check settings of a service (or of one real).
///
/// Read through [`CheckFile`], whose `timeout_ms` may be left out: it then
/// follows the interval.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "CheckFile")]
pub struct HealthCheck {
    /// The probe kind.
    pub kind: ProbeKind,
    /// Port to probe (default: the service port).
    pub port: Option<u16>,
    /// Where probes go: the real's address (default) or the VIP through the
    /// forwarding path (tcp checks only).
    pub via: Via,
    /// `tcp` checks: a full connect (default) or a half-open SYN probe.
    /// Left out of what is written when it is the default.
    #[serde(skip_serializing_if = "TcpMode::is_connect")]
    pub mode: TcpMode,
    /// Time between probes of one real, milliseconds.
    pub interval_ms: u64,
    /// Time a probe may take, milliseconds (default: 1000, or the interval
    /// when shorter).
    pub timeout_ms: u64,
    /// Consecutive successes that bring a down real back.
    pub rise: u32,
    /// Consecutive failures that take an up real out.
    pub fall: u32,
    /// Random spread of each interval, percent (so reals are not probed in lockstep).
    pub jitter_percent: u32,
    /// HTTP: the path requested.
    pub path: String,
    /// HTTP: the Host header (default: the real's address).
    pub host: Option<String>,
    /// HTTP: accepted status codes, `200-399` or `200`.
    pub expect_status: String,
    /// HTTP: a substring the body must contain.
    pub expect_body: Option<String>,
    /// HTTPS: the server name sent (SNI) and verified (default: `host`
    /// when it is a name, else none and the certificate must name the real's address).
    pub sni: Option<String>,
    /// HTTPS: whether the server's certificate is verified.
    pub tls_verify: bool,
    /// HTTPS: a PEM file of the CA certificates to trust instead of the system's.
    pub tls_ca: Option<PathBuf>,
    /// Exec: the program (an absolute path) and its arguments; no shell.
    pub command: Vec<String>,
    /// Whether a real starts up or down until its first verdict (keepalived's `alpha`).
    pub start: Start,
    /// Slow start: a real that comes up (or is added) ramps from a small
    /// share of its weight to all of it over this many milliseconds (0: off).
    pub slow_start_ms: u64,
    /// A command run when a real's verdict turns up.
    pub notify_up: Vec<String>,
    /// A command run when a real's verdict turns down.
    pub notify_down: Vec<String>,
    /// Time a notify command may take, milliseconds.
    pub notify_timeout_ms: u64,
    /// UDP: the payload sent.
    pub send: Option<String>,
    /// UDP: a substring the answer must contain.
    pub expect: Option<String>,
}

/// [`HealthCheck`] as a file or a request gives it: every field but `kind`
/// may be left out; a left-out `timeout_ms` follows the interval.
#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a health check: a mapping with `kind` (and `port`, `interval_ms`, ...)"
)]
struct CheckFile {
    #[serde(default)]
    kind: ProbeKind,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    via: Via,
    #[serde(default)]
    mode: TcpMode,
    #[serde(default = "defaults::interval_ms")]
    interval_ms: u64,
    #[serde(default, deserialize_with = "given_timeout")]
    timeout_ms: Option<u64>,
    #[serde(default = "defaults::rise")]
    rise: u32,
    #[serde(default = "defaults::fall")]
    fall: u32,
    #[serde(default = "defaults::jitter_percent")]
    jitter_percent: u32,
    #[serde(default = "defaults::path")]
    path: String,
    #[serde(default)]
    host: Option<String>,
    #[serde(default = "defaults::expect_status")]
    expect_status: String,
    #[serde(default)]
    expect_body: Option<String>,
    #[serde(default)]
    sni: Option<String>,
    #[serde(default = "defaults::tls_verify")]
    tls_verify: bool,
    #[serde(default)]
    tls_ca: Option<PathBuf>,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    start: Start,
    #[serde(default)]
    slow_start_ms: u64,
    #[serde(default)]
    notify_up: Vec<String>,
    #[serde(default)]
    notify_down: Vec<String>,
    #[serde(default = "defaults::notify_timeout_ms")]
    notify_timeout_ms: u64,
    #[serde(default)]
    send: Option<String>,
    #[serde(default)]
    expect: Option<String>,
}

/// Defaults (GLB's: probe every 2 s, 1 s timeout, 3 to flip).
pub mod defaults {
    /// Milliseconds between probes.
    pub fn interval_ms() -> u64 {
        2000
    }
    /// Probe timeout, milliseconds: 1000, or the interval when shorter.
    pub fn timeout_ms(interval_ms: u64) -> u64 {
        interval_ms.min(1000)
    }
    /// Successes to come back.
    pub fn rise() -> u32 {
        3
    }
    /// Failures to go out.
    pub fn fall() -> u32 {
        3
    }
    /// Interval jitter, percent.
    pub fn jitter_percent() -> u32 {
        10
    }
    /// HTTP path.
    pub fn path() -> String {
        "/".to_owned()
    }
    /// Accepted HTTP statuses.
    pub fn expect_status() -> String {
        "200-399".to_owned()
    }
    /// HTTPS certificates are verified.
    pub fn tls_verify() -> bool {
        true
    }
    /// Notify commands get 5 s.
    pub fn notify_timeout_ms() -> u64 {
        5000
    }
}

/// Timeouts beyond this many milliseconds are no timeouts: no clock adds
/// them to an instant.
const TIMEOUT_MAX: u64 = i64::MAX as u64;

/// A `timeout_ms` given in a file or a request.
fn given_timeout<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v = u64::deserialize(d)?;
    if v > TIMEOUT_MAX {
        return Err(serde::de::Error::custom(format!(
            "timeout_ms {v} is not a timeout in milliseconds"
        )));
    }
    Ok(Some(v))
}

impl From<CheckFile> for HealthCheck {
    fn from(f: CheckFile) -> Self {
        let timeout_ms = f
            .timeout_ms
            .unwrap_or_else(|| defaults::timeout_ms(f.interval_ms));
        Self {
            kind: f.kind,
            port: f.port,
            via: f.via,
            mode: f.mode,
            interval_ms: f.interval_ms,
            timeout_ms,
            rise: f.rise,
            fall: f.fall,
            jitter_percent: f.jitter_percent,
            path: f.path,
            host: f.host,
            expect_status: f.expect_status,
            expect_body: f.expect_body,
            sni: f.sni,
            tls_verify: f.tls_verify,
            tls_ca: f.tls_ca,
            command: f.command,
            start: f.start,
            slow_start_ms: f.slow_start_ms,
            notify_up: f.notify_up,
            notify_down: f.notify_down,
            notify_timeout_ms: f.notify_timeout_ms,
            send: f.send,
            expect: f.expect,
        }
    }
}

/// The verdict of a real before its first probes (keepalived's `alpha`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Start {
    /// In the table at once; out after `fall` failures.
    #[default]
    Up,
    /// Out of the table until `rise` probes pass.
    Down,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            kind: ProbeKind::Tcp,
            port: None,
            via: Via::Real,
            mode: TcpMode::Connect,
            interval_ms: defaults::interval_ms(),
            timeout_ms: defaults::timeout_ms(defaults::interval_ms()),
            rise: defaults::rise(),
            fall: defaults::fall(),
            jitter_percent: defaults::jitter_percent(),
            path: defaults::path(),
            host: None,
            expect_status: defaults::expect_status(),
            expect_body: None,
            sni: None,
            tls_verify: defaults::tls_verify(),
            tls_ca: None,
            command: Vec::new(),
            start: Start::Up,
            slow_start_ms: 0,
            notify_up: Vec::new(),
            notify_down: Vec::new(),
            notify_timeout_ms: defaults::notify_timeout_ms(),
            send: None,
            expect: None,
        }
    }
}

/// A health-check setting, as the configuration file and the API's JSON name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckField {
    /// `port`.
    Port,
    /// `via`.
    Via,
    /// `mode`.
    Mode,
    /// `interval_ms`.
    IntervalMs,
    /// `timeout_ms`.
    TimeoutMs,
    /// `rise`.
    Rise,
    /// `fall`.
    Fall,
    /// `jitter_percent`.
    JitterPercent,
    /// `path`.
    Path,
    /// `host`.
    Host,
    /// `expect_status`.
    ExpectStatus,
    /// `sni`.
    Sni,
    /// `command`.
    Command,
    /// `notify_up`.
    NotifyUp,
    /// `notify_down`.
    NotifyDown,
    /// `notify_timeout_ms`.
    NotifyTimeoutMs,
    /// `slow_start_ms`.
    SlowStartMs,
}

impl CheckField {
    /// Every field [`HealthCheck::validate`] can refuse.
    pub const ALL: [Self; 17] = [
        Self::Port,
        Self::Via,
        Self::Mode,
        Self::IntervalMs,
        Self::TimeoutMs,
        Self::Rise,
        Self::Fall,
        Self::JitterPercent,
        Self::Path,
        Self::Host,
        Self::ExpectStatus,
        Self::Sni,
        Self::Command,
        Self::NotifyUp,
        Self::NotifyDown,
        Self::NotifyTimeoutMs,
        Self::SlowStartMs,
    ];

    /// The key of the field in a `health_check` (file and JSON alike).
    pub fn key(self) -> &'static str {
        match self {
            Self::Port => "port",
            Self::Via => "via",
            Self::Mode => "mode",
            Self::IntervalMs => "interval_ms",
            Self::TimeoutMs => "timeout_ms",
            Self::Rise => "rise",
            Self::Fall => "fall",
            Self::JitterPercent => "jitter_percent",
            Self::Path => "path",
            Self::Host => "host",
            Self::ExpectStatus => "expect_status",
            Self::Sni => "sni",
            Self::Command => "command",
            Self::NotifyUp => "notify_up",
            Self::NotifyDown => "notify_down",
            Self::NotifyTimeoutMs => "notify_timeout_ms",
            Self::SlowStartMs => "slow_start_ms",
        }
    }
}

/// A health-check setting [`HealthCheck::validate`] refuses: which field, and
/// why (the message names the field by its key, so it reads on its own).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CheckError {
    /// The field at fault; each front end names it its own way (the CLI by its flag).
    pub field: CheckField,
    /// What is wrong with it.
    pub message: String,
}

impl CheckError {
    fn new(field: CheckField, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

/// Why `port` cannot be probed (0, or past 65535 where a number is parsed).
pub fn bad_port(port: &str) -> String {
    format!("port must be 1-65535, not {port}")
}

/// The shortest interval between two probes of a real, milliseconds.
pub const MIN_INTERVAL_MS: u64 = 100;

impl HealthCheck {
    /// Checks the settings; the error says which field is at fault.
    pub fn validate(&self) -> Result<(), CheckError> {
        use CheckField as F;
        if self.interval_ms < MIN_INTERVAL_MS {
            return Err(CheckError::new(
                F::IntervalMs,
                format!(
                    "interval_ms must be at least {MIN_INTERVAL_MS}, not {}",
                    self.interval_ms
                ),
            ));
        }
        if self.timeout_ms == 0 || self.timeout_ms > self.interval_ms {
            return Err(CheckError::new(
                F::TimeoutMs,
                format!(
                    "timeout_ms must be between 1 and interval_ms ({}), not {}",
                    self.interval_ms, self.timeout_ms
                ),
            ));
        }
        for (field, value) in [(F::Rise, self.rise), (F::Fall, self.fall)] {
            if value == 0 {
                let key = field.key();
                return Err(CheckError::new(
                    field,
                    format!("{key} must be at least 1, not 0"),
                ));
            }
        }
        if self.jitter_percent > 50 {
            return Err(CheckError::new(
                F::JitterPercent,
                format!("jitter_percent must be 0-50, not {}", self.jitter_percent),
            ));
        }
        if !self.path.starts_with('/') {
            return Err(CheckError::new(
                F::Path,
                format!("path '{}' must start with /", self.path),
            ));
        }
        let control = |v: &str| v.chars().any(|c| c.is_control());
        if control(&self.path) {
            return Err(CheckError::new(
                F::Path,
                format!(
                    "path {:?} holds a control character (CR, LF, ...)",
                    self.path
                ),
            ));
        }
        if let Some(host) = &self.host
            && (host.is_empty() || control(host) || host.contains(' '))
        {
            return Err(CheckError::new(
                F::Host,
                format!("host {host:?} must be a host name without spaces or control characters"),
            ));
        }
        if self.via == Via::Vip && self.kind != ProbeKind::Tcp {
            return Err(CheckError::new(
                F::Via,
                format!(
                    "via: vip probes with a TCP handshake sent through the forwarding path: it \
                     serves kind tcp only, not {}",
                    format!("{:?}", self.kind).to_lowercase()
                ),
            ));
        }
        if self.mode == TcpMode::Syn && self.kind != ProbeKind::Tcp {
            return Err(CheckError::new(
                F::Mode,
                format!(
                    "mode: syn is a half-open TCP probe: it serves kind tcp only, not {}",
                    format!("{:?}", self.kind).to_lowercase()
                ),
            ));
        }
        if self.port == Some(0) {
            return Err(CheckError::new(F::Port, bad_port("0")));
        }
        self.status_range()
            .map_err(|m| CheckError::new(F::ExpectStatus, m))?;
        let name = match self.kind {
            ProbeKind::Https => self.server_name(),
            _ => self.sni.as_deref(),
        };
        if let Some(name) = name
            && rustls::pki_types::ServerName::try_from(name).is_err()
        {
            // An HTTPS check without `sni` takes its server name from `host`.
            let field = if self.sni.is_some() { F::Sni } else { F::Host };
            let key = field.key();
            return Err(CheckError::new(
                field,
                format!("{key} {name:?} is not a host name"),
            ));
        }
        if self.kind == ProbeKind::Exec && self.command.is_empty() {
            return Err(CheckError::new(
                F::Command,
                "kind exec needs a command: [/path/to/program, args...]",
            ));
        }
        for (field, argv) in [
            (F::Command, &self.command),
            (F::NotifyUp, &self.notify_up),
            (F::NotifyDown, &self.notify_down),
        ] {
            let key = field.key();
            if let Some(program) = argv.first()
                && !program.starts_with('/')
            {
                return Err(CheckError::new(
                    field,
                    format!(
                        "{key}: the program {program:?} must be an absolute path (no shell, no PATH lookup)"
                    ),
                ));
            }
            if argv.iter().any(|a| a.contains('\0')) {
                return Err(CheckError::new(
                    field,
                    format!("{key}: an argument holds a NUL byte"),
                ));
            }
        }
        if self.notify_timeout_ms == 0 || self.notify_timeout_ms > 600_000 {
            return Err(CheckError::new(
                F::NotifyTimeoutMs,
                format!(
                    "notify_timeout_ms must be 1-600000, not {}",
                    self.notify_timeout_ms
                ),
            ));
        }
        if self.slow_start_ms > 3_600_000 {
            return Err(CheckError::new(
                F::SlowStartMs,
                format!(
                    "slow_start_ms must be at most 3600000 (an hour), not {}",
                    self.slow_start_ms
                ),
            ));
        }
        Ok(())
    }

    /// The server name of an HTTPS check: `sni`, else `host` when it is a
    /// DNS name (not an address), else none.
    pub fn server_name(&self) -> Option<&str> {
        self.sni.as_deref().or_else(|| {
            self.host
                .as_deref()
                .filter(|h| !h.starts_with('[') && h.parse::<std::net::IpAddr>().is_err())
        })
    }

    /// The accepted HTTP status range.
    pub fn status_range(&self) -> Result<(u16, u16), String> {
        let bad = || {
            format!(
                "expect_status '{}' is not a status (200) or a range (200-399)",
                self.expect_status
            )
        };
        let (lo, hi) = match self.expect_status.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (self.expect_status.trim(), self.expect_status.trim()),
        };
        let lo: u16 = lo.parse().map_err(|_| bad())?;
        let hi: u16 = hi.parse().map_err(|_| bad())?;
        if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
            return Err(bad());
        }
        Ok((lo, hi))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_left_out_timeout_is_1000_ms_or_the_interval_when_shorter() {
        let parse = |text: &str| serde_yaml_ng::from_str::<HealthCheck>(text).expect(text);
        let short = parse("kind: tcp\ninterval_ms: 500\n");
        assert_eq!((short.interval_ms, short.timeout_ms), (500, 500));
        assert_eq!(short.validate(), Ok(()));
        assert_eq!(parse("kind: tcp\ninterval_ms: 5000\n").timeout_ms, 1000);
        assert_eq!(parse("kind: tcp\n").timeout_ms, 1000);
        assert_eq!(HealthCheck::default().timeout_ms, 1000);
        // The API's JSON the same way; a timeout given is kept, and checked.
        let json: HealthCheck =
            serde_json::from_str(r#"{"kind":"tcp","interval_ms":300}"#).expect("parses");
        assert_eq!(json.timeout_ms, 300);
        let given = parse("kind: tcp\ninterval_ms: 500\ntimeout_ms: 1000\n");
        assert_eq!(
            given.validate(),
            Err(CheckError::new(
                CheckField::TimeoutMs,
                "timeout_ms must be between 1 and interval_ms (500), not 1000"
            ))
        );
        let err = serde_yaml_ng::from_str::<HealthCheck>("timeout_ms: 18446744073709551615\n")
            .expect_err("the marker is not a timeout");
        assert!(err.to_string().contains("is not a timeout"), "{err}");
        // Written back with its timeout, which reads back the same.
        let text = serde_yaml_ng::to_string(&short).expect("serialises");
        assert!(text.contains("timeout_ms: 500"), "{text}");
        assert_eq!(parse(&text), short);
    }

    #[test]
    fn via_vip_serves_tcp_checks_only() {
        let tcp = HealthCheck {
            via: Via::Vip,
            ..HealthCheck::default()
        };
        assert_eq!(tcp.validate(), Ok(()));
        let http = HealthCheck {
            kind: ProbeKind::Http,
            ..tcp.clone()
        };
        assert_eq!(
            http.validate(),
            Err(CheckError::new(
                CheckField::Via,
                "via: vip probes with a TCP handshake sent through the forwarding path: it \
                 serves kind tcp only, not http"
            ))
        );
        let parsed: HealthCheck =
            serde_yaml_ng::from_str("kind: tcp\nvia: vip\n").expect("via: vip parses");
        assert_eq!(parsed.via, Via::Vip);
        let err = serde_yaml_ng::from_str::<HealthCheck>("via: tunnel\n").expect_err("bad via");
        assert!(
            err.to_string().contains("unknown variant `tunnel`"),
            "{err}"
        );
    }

    #[test]
    fn mode_syn_serves_tcp_checks_only_and_connect_is_not_written() {
        let syn: HealthCheck = serde_yaml_ng::from_str("kind: tcp\nmode: syn\n").expect("parses");
        assert_eq!(syn.mode, TcpMode::Syn);
        assert_eq!(syn.validate(), Ok(()));
        let text = serde_yaml_ng::to_string(&syn).expect("writes");
        assert!(text.contains("mode: syn"), "{text}");
        let text = serde_yaml_ng::to_string(&HealthCheck::default()).expect("writes");
        assert!(!text.contains("mode"), "{text}");
        let http = HealthCheck {
            kind: ProbeKind::Http,
            ..syn
        };
        assert_eq!(
            http.validate(),
            Err(CheckError::new(
                CheckField::Mode,
                "mode: syn is a half-open TCP probe: it serves kind tcp only, not http"
            ))
        );
        let err = serde_yaml_ng::from_str::<HealthCheck>("mode: half\n").expect_err("bad mode");
        assert!(err.to_string().contains("unknown variant `half`"), "{err}");
    }
}
