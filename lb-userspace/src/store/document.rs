//! The fleet's desired state as one YAML document in the store: the
//! `hash_seed:` and `services:` that `xlb apply` takes (docs/config.md), plus the
//! `overrides:` set by hand (`xlb real set|drain|disable|enable`), which are
//! fleet-wide in store mode. An operator reads it with `etcdctl get`.
//!
//! Parsing reads the text once and reuses [`Config::from_file`] for the
//! services and [`Spec::set_override`] for the overrides, so the document is
//! validated exactly like a configuration file and an `xlb real set`.

use std::{collections::HashMap, net::IpAddr};

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
#[serde(
    deny_unknown_fields,
    expecting = "a mapping of `daemon`, `hash_seed`, `services` and `overrides`"
)]
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
    config::check_document(name, text)?;
    build(name, read(name, text)?)
}

/// The services of the last document [`Parts::parse`] read, by the text of
/// each: a change of one weight changes one service's text, and only that
/// service is parsed again (a document of 1,000 VIPs is about 500 KiB of
/// YAML, most of a node's work per change).
#[derive(Default)]
pub struct Parts {
    services: HashMap<String, ServiceConfig>,
}

impl Parts {
    /// What [`parse`] makes of `text`, reading again only the services
    /// whose text is not one of the last document's. A document not in
    /// block style (see [`split`]), or one that does not read or validate
    /// in parts, is read whole: its errors are [`parse`]'s.
    pub fn parse(&mut self, name: &str, text: &str) -> Result<Spec, DocumentError> {
        config::check_document(name, text)?;
        if let Some(spec) = self.read(text).and_then(|doc| build(name, doc).ok()) {
            return Ok(spec);
        }
        self.services.clear();
        build(name, read(name, text)?)
    }

    /// The document read in parts, keeping the services' parses for the
    /// next one; `None` when it cannot be read that way.
    fn read(&mut self, text: &str) -> Option<DocumentIn> {
        let (rest, items) = split(text)?;
        let mut doc = serde_yaml_ng::from_str::<DocumentIn>(&rest).ok()?;
        if !doc.services.is_empty() {
            return None;
        }
        let mut kept = HashMap::with_capacity(items.len());
        for item in items {
            let service = match self.services.remove(&item) {
                Some(s) => s,
                None => {
                    let mut one = serde_yaml_ng::from_str::<Vec<ServiceConfig>>(&item).ok()?;
                    (one.len() == 1).then(|| one.remove(0))?
                }
            };
            doc.services.push(service.clone());
            kept.insert(item, service);
        }
        self.services = kept;
        Some(doc)
    }
}

/// A block-style document split into the text of each item of its
/// `services:` (dedented to column 0, so that each reads as a list of one)
/// and the rest with `services: []` in their place; `None` for any other
/// shape (flow style, a comment or anything unexpected at the list's level).
fn split(text: &str) -> Option<(String, Vec<String>)> {
    let mut rest = String::with_capacity(256);
    let mut items: Vec<String> = Vec::new();
    let mut lines = text.split_inclusive('\n').peekable();
    let mut seen = false;
    while let Some(line) = lines.next() {
        if line.trim_end() != "services:" {
            rest.push_str(line);
            continue;
        }
        if seen {
            return None;
        }
        seen = true;
        rest.push_str("services: []\n");
        // The list's indentation: that of its first item.
        let first = lines.peek()?;
        let indent = first.len() - first.trim_start_matches(' ').len();
        if !first[indent..].starts_with("- ") {
            return None;
        }
        while let Some(line) = lines.peek() {
            let spaces = line.len() - line.trim_start_matches(' ').len();
            let body = &line[spaces..];
            if body.trim().is_empty() {
                // A blank line belongs to the item it is in (its spaces past
                // the list's indentation kept: a block scalar may hold them).
                items.last_mut()?.push_str(&line[spaces.min(indent)..]);
            } else if spaces == indent && body.starts_with("- ") {
                items.push(line[indent..].to_owned());
            } else if spaces > indent {
                items.last_mut()?.push_str(&line[indent..]);
            } else if spaces == 0 && body.starts_with(|c: char| c.is_ascii_alphabetic()) {
                // The next top-level key.
                break;
            } else {
                return None;
            }
            lines.next();
        }
    }
    seen.then_some((rest, items))
}

/// Reads a document that passed [`config::check_document`].
fn read(name: &str, text: &str) -> Result<DocumentIn, DocumentError> {
    Ok(if text.trim().is_empty() {
        DocumentIn {
            daemon: Present(false),
            hash_seed: SeedField::default(),
            services: Vec::new(),
            overrides: Vec::new(),
        }
    } else {
        serde_yaml_ng::from_str::<DocumentIn>(text)
            .map_err(|error| ConfigError::parse(name, text, error))?
    })
}

/// Validates a document read from text, as `xlb apply` and `xlb real set` do.
fn build(name: &str, doc: DocumentIn) -> Result<Spec, DocumentError> {
    let shape = |key: &str, message: String| DocumentError::Shape {
        key: format!("{name}: {key}"),
        message,
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
    fn a_document_read_in_parts_is_the_whole_parse() {
        let spec = parse("store", DOC).expect("valid");
        let rendered = render(&spec);
        // Both shapes a document comes in (a file's, indented, and the
        // rendered one, not) split into their two services.
        for text in [DOC, rendered.as_str()] {
            let (rest, items) = split(text).expect("block style");
            assert_eq!(items.len(), 2, "{text}");
            assert!(
                rest.contains("services: []\n") && rest.contains("overrides:"),
                "{rest}"
            );
        }
        let mut parts = Parts::default();
        let weight = |t: &str| t.replace("weight: 2", "weight: 3");
        let changed = [
            DOC.to_owned(),
            weight(DOC),
            rendered.clone(),
            render(&parse("store", &weight(DOC)).expect("valid")),
            rendered.clone(),
            DOC.replace("hash_seed: 7\n", ""),
            DOC.replace("overrides:\n", "overrides: []\n").replace(
                "  - { vip: 203.0.113.10:80/tcp, real: 198.51.100.11, weight: 0, admin: drain }\n",
                "",
            ),
            // Blank lines and comments inside a service, one service twice
            // (refused), flow style, a comment at the list's level.
            DOC.replace("    reals:\n", "\n \n    # the reals\n    reals:\n"),
            format!("{DOC}services:\n  - vip: 203.0.113.11:80/tcp\n"),
            DOC.replace("  - vip: '[2001", "  # v6\n  - vip: '[2001"),
            "services: [ { vip: 203.0.113.10:80/tcp, reals: [ { address: 198.51.100.11 } ] } ]\n"
                .to_owned(),
            DOC.replace("weight: 2", "weight: 70000"),
            DOC.replace("table_size: 251", "table_size: big"),
            "services:\n- vip: 203.0.113.10:80/tcp\n- vip: 203.0.113.10:80/tcp\n".to_owned(),
            String::new(),
            DOC.to_owned(),
        ];
        for text in &changed {
            let whole = parse("store", text).map_err(|e| e.to_string());
            assert_eq!(
                parts.parse("store", text).map_err(|e| e.to_string()),
                whole,
                "{text}"
            );
        }
    }

    #[test]
    fn only_services_whose_text_changed_are_read_again() {
        let mut parts = Parts::default();
        parts.parse("store", DOC).expect("valid");
        let (_, items) = split(DOC).expect("block style");
        // What is kept for the unchanged service is taken without reading
        // it (a kept parse made different here to show it).
        let kept = parts.services.get_mut(&items[1]).expect("kept");
        kept.table_size = Some(509);
        let next = DOC.replace("weight: 2", "weight: 3");
        let spec = parts.parse("store", &next).expect("valid");
        let v6: Vip = "[2001:db8::10]:53/udp".parse().expect("VIP");
        let v4: Vip = "203.0.113.10:80/tcp".parse().expect("VIP");
        assert_eq!(spec.base.services[&v6].options.table_size, 509);
        let real = "198.51.100.11".parse().expect("addr");
        assert_eq!(spec.base.services[&v4].reals[&real].weight, 3);
        // Only the services of the last document are kept.
        let (_, now) = split(&next).expect("block style");
        let mut keys: Vec<&String> = parts.services.keys().collect();
        keys.sort();
        let mut want: Vec<&String> = now.iter().collect();
        want.sort();
        assert_eq!(keys, want);
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
