//! The fleet's desired state as one YAML document in the store: the
//! `hash_seed:` and `services:` that `xlb apply` takes (docs/config.md), plus the
//! `overrides:` set by hand (`xlb real set|drain|disable|enable`), which are
//! fleet-wide in store mode. An operator reads it with `etcdctl get`.
//!
//! Parsing reads the text once and reuses [`Config::from_file`] for the
//! services and [`Spec::set_override`] for the overrides, so the document is
//! validated exactly like a configuration file and an `xlb real set`.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{
    config::{self, Config, ConfigError, ConfigFile, SeedField, ServiceConfig},
    desired::{Admin, Override, Overrides, Spec},
    health::HealthCheck,
    model::Vip,
};

/// Why a stored document is not a desired state.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    /// The services part is not a valid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The document is not YAML of the right shape.
    #[error("{key}: {message}")]
    Shape {
        /// The key (or `(document)`).
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// One override as stored.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OverrideDoc {
    vip: String,
    real: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    admin: Option<Admin>,
}

/// One real as stored (the configuration file's shape).
#[derive(Serialize)]
struct RealDoc<'a> {
    address: IpAddr,
    weight: u32,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    drain: bool,
    #[serde(skip_serializing_if = "is_true")]
    enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    health_check: Option<&'a HealthCheck>,
}

fn is_true(b: &bool) -> bool {
    *b
}

/// One service as stored (the configuration file's shape).
#[derive(Serialize)]
struct ServiceDoc<'a> {
    vip: String,
    scheduler: String,
    forward: String,
    table_size: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    health_check: Option<&'a HealthCheck>,
    reals: Vec<RealDoc<'a>>,
}

#[derive(Serialize)]
struct DocumentOut<'a> {
    #[serde(skip_serializing_if = "crate::desired::is_zero")]
    hash_seed: u64,
    services: Vec<ServiceDoc<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    overrides: Vec<OverrideDoc>,
}

/// A stored document as written: a configuration's keys plus `overrides:`,
/// read in one pass (a document of 1,000 VIPs is about 500 KiB of YAML).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DocumentIn {
    /// Refused when present: daemon settings are per node.
    #[serde(default)]
    daemon: Present,
    #[serde(default)]
    hash_seed: SeedField,
    #[serde(default)]
    services: Vec<ServiceConfig>,
    #[serde(default)]
    overrides: Vec<OverrideDoc>,
}

/// Whether a key was written, whatever its value (`null` too).
#[derive(Default)]
struct Present(bool);

impl<'de> Deserialize<'de> for Present {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| Self(true))
    }
}

/// Parses and validates a stored document (`name` names it in errors).
pub fn parse(name: &str, text: &str) -> Result<Spec, DocumentError> {
    let shape = |key: &str, message: String| DocumentError::Shape {
        key: format!("{name}: {key}"),
        message,
    };
    config::check_document(name, text)?;
    let doc = if text.trim().is_empty() {
        DocumentIn {
            daemon: Present(false),
            hash_seed: SeedField::default(),
            services: Vec::new(),
            overrides: Vec::new(),
        }
    } else {
        serde_yaml_ng::from_str::<DocumentIn>(text).map_err(|error| ConfigError::Parse {
            file: name.to_owned(),
            error,
        })?
    };
    if doc.daemon.0 {
        return Err(shape(
            "daemon",
            "daemon settings are per node: set them in each node's configuration file, not in \
             the store"
                .to_owned(),
        ));
    }
    // The services part: the same checks as `xlb apply` (which validate the
    // whole base, so it is taken as it is).
    let raw = ConfigFile {
        daemon: serde_yaml_ng::Value::Null,
        hash_seed: doc.hash_seed,
        services: doc.services,
    };
    let mut spec = Spec {
        base: Config::from_file(name, &raw)?.desired,
        overrides: Overrides::default(),
    };
    // An override changes only a weight or an admin state, which
    // `set_override` checks: the state stays valid as a whole.
    for (i, o) in doc.overrides.into_iter().enumerate() {
        let at = format!("overrides[{i}]");
        let vip: Vip = o
            .vip
            .parse()
            .map_err(|e| shape(&format!("{at}.vip"), format!("{e}")))?;
        let real = crate::model::parse_real(&o.real)
            .map_err(|e| shape(&format!("{at}.real"), format!("{e}")))?;
        spec.set_override(vip, real, o.weight, o.admin)
            .map_err(|e| shape(&at, e.to_string()))?;
    }
    Ok(spec)
}

/// The document of `spec`, in the shape [`parse`] reads.
pub fn render(spec: &Spec) -> String {
    let services = spec
        .base
        .services
        .iter()
        .map(|(vip, s)| ServiceDoc {
            vip: vip.to_string(),
            scheduler: s.options.scheduler.to_string(),
            forward: s.options.forward.to_string(),
            table_size: s.options.table_size,
            health_check: s.health.as_ref(),
            reals: s
                .reals
                .iter()
                .map(|(addr, r)| RealDoc {
                    address: *addr,
                    weight: r.weight,
                    drain: r.admin == Admin::Drain,
                    enabled: r.admin != Admin::Disabled,
                    health_check: r.health.as_ref(),
                })
                .collect(),
        })
        .collect();
    let overrides = spec
        .overrides
        .0
        .iter()
        .map(|((vip, real), Override { weight, admin })| OverrideDoc {
            vip: vip.to_string(),
            real: real.to_string(),
            weight: *weight,
            admin: *admin,
        })
        .collect();
    serde_yaml_ng::to_string(&DocumentOut {
        hash_seed: spec.base.hash_seed,
        services,
        overrides,
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
hash_seed: 7
services:
  - vip: 203.0.113.10:80/tcp
    health_check: { kind: http, path: /healthz, interval_ms: 500, timeout_ms: 200 }
    reals:
      - { address: 198.51.100.11, weight: 2 }
      - { address: 198.51.100.12, drain: true }
      - { address: 198.51.100.13, enabled: false }
  - vip: '[2001:db8::10]:53/udp'
    forward: tun
    table_size: 251
    reals:
      - { address: '2001:db8:1::11' }
overrides:
  - { vip: 203.0.113.10:80/tcp, real: 198.51.100.11, weight: 0, admin: drain }
";

    #[test]
    fn a_document_round_trips_through_render() {
        let spec = parse("store", DOC).expect("valid");
        assert_eq!(spec.base.services.len(), 2);
        assert_eq!(spec.base.hash_seed, 7);
        assert_eq!(spec.overrides.0.len(), 1);
        assert!(
            render(&spec).starts_with("hash_seed: 7\n"),
            "{}",
            render(&spec)
        );
        let again = parse("store", &render(&spec)).expect("rendered is valid");
        assert_eq!(again, spec);
    }

    #[test]
    fn an_empty_document_is_an_empty_state() {
        assert_eq!(parse("store", "").expect("empty"), Spec::default());
        assert_eq!(
            parse("store", &render(&Spec::default())).expect("rendered"),
            Spec::default()
        );
    }

    #[test]
    fn errors_name_the_place() {
        let bad_weight = DOC.replace("weight: 2", "weight: 70000");
        let err = parse("store", &bad_weight).expect_err("weight").to_string();
        assert!(err.contains("services[0].reals[0].weight"), "{err}");
        let bad_override = DOC.replace("real: 198.51.100.11", "real: 198.51.100.99");
        let err = parse("store", &bad_override).expect_err("real").to_string();
        assert!(
            err.contains("overrides[0]") && err.contains("198.51.100.99 is not in VIP"),
            "{err}"
        );
        let err = parse("store", &DOC.replace("hash_seed: 7", "hash_seed: -7"))
            .expect_err("seed")
            .to_string();
        assert!(err.contains("store: hash_seed: -7 is negative"), "{err}");
        for daemon in [
            "daemon: {}\n",
            "daemon:\n",
            "services: []\ndaemon: { iface: eth0 }\n",
        ] {
            let err = parse("store", daemon).expect_err(daemon).to_string();
            assert!(err.contains("daemon settings are per node"), "{err}");
        }
        let unknown = DOC.replace("weight: 0, admin", "colour: red, admin");
        let err = parse("store", &unknown).expect_err("unknown").to_string();
        assert!(
            err.starts_with("store: overrides[0]: unknown field `colour`"),
            "{err}"
        );
        let err = parse("store", &DOC.replace("table_size: 251", "table_size: big"))
            .expect_err("size")
            .to_string();
        assert!(
            err.starts_with("store: services[1].table_size: invalid type"),
            "{err}"
        );
        let err = parse("store", &format!("{DOC}colour: red\n"))
            .expect_err("top")
            .to_string();
        assert!(err.starts_with("store: unknown field `colour`"), "{err}");
        let err = parse("store", &DOC.replace("hash_seed: 7", "hash_seed: &a 7"))
            .expect_err("anchor")
            .to_string();
        assert!(err.contains("store: line 1: YAML anchors"), "{err}");
    }
}
