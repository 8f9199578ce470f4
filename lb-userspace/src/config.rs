//! The YAML configuration: the whole desired state (`services`) and the
//! daemon's settings (`daemon`). `xlb run --config FILE` starts from it,
//! SIGHUP reloads it, `xlb apply FILE` sends its services to a running daemon.
//! The schema is documented with a complete example in docs/config.md.
//!
//! Every error names the file, the place in the document and what is wrong.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use serde::{Deserialize, Serialize};

use crate::{
    desired::{
        Admin, Desired, MAX_WEIGHT, RealSpec, ServiceSpec, VipOptions, check_family,
        check_table_size,
    },
    health::HealthCheck,
    model::{Forward, Scheduler, Vip},
    settings::Settings,
};

/// A configuration that could not be used, naming the file and the place in it.
///
/// The message carries the whole story: the underlying errors are part of it, not
/// `source()`s, so an error chain (`{:#}`) prints them once.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: {error}")]
    Read {
        /// The file.
        file: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// The YAML does not match the schema.
    #[error("{file}: {}{}", placed(error), if *tab { TAB_HINT } else { "" })]
    Parse {
        /// The file.
        file: String,
        /// What serde found, with the place, line and column.
        error: serde_yaml_ng::Error,
        /// The error's place holds a tab, which YAML never allows in
        /// indentation: said, since the parser's message does not.
        tab: bool,
    },
    /// A value is out of range or inconsistent.
    #[error("{file}: {path}: {message}")]
    Invalid {
        /// The file.
        file: String,
        /// Where in the document, e.g. `services[0].reals[1].weight`.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// What a parse error at a tab adds to the parser's message.
const TAB_HINT: &str = " (a tab: YAML indents with spaces only)";

impl ConfigError {
    /// The parse error of `file`, whose text is `text`.
    pub(crate) fn parse(file: &str, text: &str, error: serde_yaml_ng::Error) -> Self {
        Self::Parse {
            file: file.to_owned(),
            tab: at_tab(text, &error),
            error,
        }
    }
}

/// Whether the text at the error's line and column (1-based) is a tab.
fn at_tab(text: &str, error: &serde_yaml_ng::Error) -> bool {
    error.location().is_some_and(|at| {
        text.lines()
            .nth(at.line().saturating_sub(1))
            .and_then(|line| line.chars().nth(at.column().saturating_sub(1)))
            == Some('\t')
    })
}

/// serde's message, which names the line and column, except at the very
/// start of the document (a document that is one string, say), where it
/// names none: there it is added, in serde's own form. An error without a
/// location keeps its message as it is.
fn placed(error: &serde_yaml_ng::Error) -> String {
    match error.location() {
        Some(at) if at.line() == 1 && at.column() == 1 => format!("{error} at line 1 column 1"),
        _ => error.to_string(),
    }
}

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping of `daemon`, `hash_seed` and `services`"
)]
pub struct ConfigFile {
    /// Daemon settings (used by `xlb run`; command-line flags win), read
    /// into [`Settings`] key by key so that an error names its key.
    #[serde(default)]
    pub daemon: serde_yaml_ng::Value,
    /// The seed of the Maglev permutations, or why what is written is not one.
    #[serde(default)]
    pub hash_seed: SeedField,
    /// The virtual services.
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
}

/// The `hash_seed` key as written: the seed (absent or null: 0, no seed), or
/// why the value is not an unsigned 64-bit integer. Read this way so that
/// any value (a negative, a float, a number past 64 bits, a string) gets a
/// message naming the key rather than the YAML parser's.
#[derive(Debug)]
pub struct SeedField(pub Result<u64, String>);

impl Default for SeedField {
    fn default() -> Self {
        Self(Ok(0))
    }
}

impl<'de> Deserialize<'de> for SeedField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{self, IgnoredAny, MapAccess, SeqAccess};
        struct Visitor;
        fn not(what: impl std::fmt::Display, why: &str) -> SeedField {
            SeedField(Err(format!(
                "{what} {why}: the seed is an unsigned integer from 0 to {}",
                u64::MAX
            )))
        }
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = SeedField;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an unsigned integer")
            }
            fn visit_u64<E>(self, v: u64) -> Result<SeedField, E> {
                Ok(SeedField(Ok(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<SeedField, E> {
                Ok(u64::try_from(v).map_or_else(|_| not(v, "is negative"), |v| SeedField(Ok(v))))
            }
            fn visit_u128<E>(self, v: u128) -> Result<SeedField, E> {
                Ok(u64::try_from(v).map_or_else(|_| not(v, "is too large"), |v| SeedField(Ok(v))))
            }
            fn visit_i128<E>(self, v: i128) -> Result<SeedField, E> {
                Ok(match u64::try_from(v) {
                    Ok(v) => SeedField(Ok(v)),
                    Err(_) if v < 0 => not(v, "is negative"),
                    Err(_) => not(v, "is too large"),
                })
            }
            fn visit_f64<E>(self, v: f64) -> Result<SeedField, E> {
                // Integers past 128 bits reach here as floats.
                Ok(match v {
                    _ if v.fract() != 0.0 || !v.is_finite() => not(v, "is not an integer"),
                    _ if v < 0.0 => not(format!("{v:e}"), "is negative"),
                    _ if v >= u64::MAX as f64 => not(format!("{v:e}"), "is too large"),
                    _ => not(v, "is not an integer"),
                })
            }
            fn visit_bool<E>(self, v: bool) -> Result<SeedField, E> {
                Ok(not(v, "is not an integer"))
            }
            fn visit_str<E>(self, v: &str) -> Result<SeedField, E> {
                Ok(not(format!("{v:?}"), "is not an integer"))
            }
            fn visit_unit<E>(self) -> Result<SeedField, E> {
                Ok(SeedField::default())
            }
            fn visit_none<E>(self) -> Result<SeedField, E> {
                Ok(SeedField::default())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SeedField, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(not("a list", "is not an integer"))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SeedField, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(not("a mapping", "is not an integer"))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// One virtual service.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a service: a mapping with `vip` (and `reals`, `health_check`, ...)"
)]
pub struct ServiceConfig {
    /// The VIP, `203.0.113.10:80/tcp`.
    pub vip: String,
    /// The scheduler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    /// The forwarding mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward: Option<String>,
    /// The Maglev table size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_size: Option<u32>,
    /// The health check of its reals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// The real servers.
    #[serde(default)]
    pub reals: Vec<RealConfig>,
}

/// One real server of a service.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a real: a mapping with `address` (and `weight`, `enabled`, ...)"
)]
pub struct RealConfig {
    /// Its address.
    pub address: String,
    /// Its weight (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// false: out of the table, its flows moved elsewhere (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// true: no new flows, tracked flows stay (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<bool>,
    /// This real's own health check (overrides the service's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
}

/// A saved desired state: the `hash_seed:` and `services:` parts of a
/// configuration file.
#[derive(Debug, Serialize)]
pub struct Saved {
    /// The seed of the Maglev permutations, when one is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash_seed: Option<u64>,
    /// The services, in VIP order, every setting written out.
    pub services: Vec<ServiceConfig>,
}

/// `desired` as a configuration document (`xlb save`): [`Config::parse`]
/// reads it back as the same desired state.
pub fn document(desired: &Desired) -> Saved {
    let services = desired
        .services
        .iter()
        .map(|(vip, s)| ServiceConfig {
            vip: vip.to_string(),
            scheduler: Some(s.options.scheduler.to_string()),
            forward: Some(s.options.forward.to_string()),
            table_size: Some(s.options.table_size),
            health_check: s.health.clone(),
            reals: s
                .reals
                .iter()
                .map(|(addr, r)| RealConfig {
                    address: addr.to_string(),
                    weight: Some(r.weight),
                    enabled: (r.admin == Admin::Disabled).then_some(false),
                    drain: (r.admin == Admin::Drain).then_some(true),
                    health_check: r.health.clone(),
                })
                .collect(),
        })
        .collect();
    Saved {
        hash_seed: (desired.hash_seed != 0).then_some(desired.hash_seed),
        services,
    }
}

/// The first lines of `xlb save`'s output.
const SAVED_HEADER: &str = "\
# The desired state of an xlb daemon (its base), written by `xlb save`; `xlb apply` takes it back.
# Not in it: the daemon: section, and values set by hand (xlb real set, drain, disable, enable),
# which stay in the daemon and keep winning over these until `xlb real reset-override`.
";

/// `desired` as the YAML `xlb save` prints: a header comment, then the
/// document of [`document`] without empty values.
pub fn to_yaml(desired: &Desired) -> Result<String, serde_yaml_ng::Error> {
    fn strip_nulls(v: &mut serde_yaml_ng::Value) {
        match v {
            serde_yaml_ng::Value::Mapping(m) => {
                m.retain(|_, v| !v.is_null());
                m.values_mut().for_each(strip_nulls);
            }
            serde_yaml_ng::Value::Sequence(s) => s.iter_mut().for_each(strip_nulls),
            _ => {}
        }
    }
    let mut value = serde_yaml_ng::to_value(document(desired))?;
    strip_nulls(&mut value);
    Ok(format!(
        "{SAVED_HEADER}{}",
        serde_yaml_ng::to_string(&value)?
    ))
}

/// A validated configuration.
#[derive(Debug, Default)]
pub struct Config {
    /// The daemon settings, checked.
    pub daemon: Settings,
    /// The services, their reals and health checks.
    pub desired: Desired,
}

/// Largest configuration accepted, bytes (a complete 1,024-VIP file is far smaller).
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

/// Deepest nesting accepted (flow collections, or indentation levels of two spaces).
const MAX_DEPTH: usize = 32;

/// Refuses, before any deserialising, a document too big or too deep, and
/// YAML anchors and aliases (`&name`, `*name`: a few hundred bytes of nested
/// aliases expand into gigabytes). Errors are (place, message).
fn check_text(text: &str) -> Result<(), (String, String)> {
    if text.len() > MAX_CONFIG_BYTES {
        return Err((
            "(document)".to_owned(),
            format!(
                "{} bytes; a configuration holds at most {MAX_CONFIG_BYTES} bytes",
                text.len()
            ),
        ));
    }
    let mut flow = 0usize;
    for (n, line) in text.lines().enumerate() {
        let at = || format!("line {}", n + 1);
        // What YAML does not allow in a document: control characters other
        // than tab and line ends, and the non-characters U+FFFE and U+FFFF
        // (the parser's own message for those names no place).
        if let Some(c) = line.chars().find(|c| {
            (c.is_control() && !matches!(c, '\t' | '\r')) || matches!(c, '\u{fffe}' | '\u{ffff}')
        }) {
            let kind = if c.is_control() {
                "control character"
            } else {
                "non-character"
            };
            return Err((
                at(),
                format!("the {kind} U+{:04X} is not allowed", u32::from(c)),
            ));
        }
        let indent = line.len() - line.trim_start_matches(' ').len();
        if indent / 2 > MAX_DEPTH {
            return Err((at(), format!("nested deeper than {MAX_DEPTH} levels")));
        }
        let (mut single, mut double, mut escaped) = (false, false, false);
        let mut prev = ' ';
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            let token_start = prev.is_whitespace() || matches!(prev, '[' | '{' | ',');
            if double {
                match c {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '"' => double = false,
                    _ => {}
                }
            } else if single {
                if c == '\'' {
                    single = false;
                }
            } else {
                match c {
                    '"' if token_start => double = true,
                    '\'' if token_start => single = true,
                    '#' if token_start => break,
                    '&' | '*'
                        if token_start
                            && chars
                                .peek()
                                .is_some_and(|n| n.is_alphanumeric() || matches!(n, '_' | '-')) =>
                    {
                        return Err((
                            at(),
                            "YAML anchors and aliases (&name, *name) are not accepted; write \
                             each value out"
                                .to_owned(),
                        ));
                    }
                    '[' | '{' => {
                        flow += 1;
                        if flow > MAX_DEPTH {
                            return Err((at(), format!("nested deeper than {MAX_DEPTH} levels")));
                        }
                    }
                    ']' | '}' => flow = flow.saturating_sub(1),
                    _ => {}
                }
            }
            prev = c;
        }
    }
    Ok(())
}

/// [`check_text`] naming `file`: run on any text before deserialising it
/// as a configuration.
pub fn check_document(file: &str, text: &str) -> Result<(), ConfigError> {
    check_text(text).map_err(|(path, message)| ConfigError::Invalid {
        file: file.to_owned(),
        path,
        message,
    })
}

/// The `daemon:` section as [`Settings`]; an error names the key: (path, message).
fn daemon_settings(section: &serde_yaml_ng::Value) -> Result<Settings, (String, String)> {
    use serde_yaml_ng::{Mapping, Value, from_value};
    if section.is_null() {
        return Ok(Settings::default());
    }
    from_value::<Settings>(section.clone()).map_err(|whole| {
        if let Value::Mapping(m) = section {
            for (key, value) in m {
                let one = Value::Mapping(Mapping::from_iter([(key.clone(), value.clone())]));
                if let Err(e) = from_value::<Settings>(one) {
                    let name = key
                        .as_str()
                        .map_or_else(|| format!("{key:?}"), str::to_owned);
                    return (format!("daemon.{name}"), e.to_string());
                }
            }
        }
        ("daemon".to_owned(), whole.to_string())
    })
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            file: file.clone(),
            error,
        })?;
        Self::parse(&file, &text)
    }

    /// Parses and validates `text` (named `file` in errors).
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        check_document(file, text)?;
        let raw: ConfigFile = if text.trim().is_empty() {
            ConfigFile::default()
        } else {
            serde_yaml_ng::from_str(text).map_err(|error| ConfigError::parse(file, text, error))?
        };
        Self::from_file(file, &raw)
    }

    /// Validates a document already deserialised from text that passed
    /// [`check_document`] (named `file` in errors): what [`Config::parse`]
    /// does after deserialising.
    pub fn from_file(file: &str, raw: &ConfigFile) -> Result<Self, ConfigError> {
        let invalid = |path: String, message: String| ConfigError::Invalid {
            file: file.to_owned(),
            path,
            message,
        };
        let daemon =
            daemon_settings(&raw.daemon).map_err(|(path, message)| invalid(path, message))?;
        let mut desired = Desired {
            hash_seed: raw
                .hash_seed
                .0
                .clone()
                .map_err(|message| invalid("hash_seed".to_owned(), message))?,
            ..Desired::default()
        };
        for (i, s) in raw.services.iter().enumerate() {
            let at = |field: &str| format!("services[{i}].{field}");
            let vip: Vip = s
                .vip
                .parse()
                .map_err(|e| invalid(at("vip"), format!("{e}")))?;
            if desired.services.contains_key(&vip) {
                return Err(invalid(at("vip"), format!("VIP {vip} is listed twice")));
            }
            let mut options = VipOptions::default();
            if let Some(sch) = &s.scheduler {
                options.scheduler = sch
                    .parse::<Scheduler>()
                    .map_err(|e| invalid(at("scheduler"), e.to_string()))?;
            }
            if let Some(f) = &s.forward {
                options.forward = f
                    .parse::<Forward>()
                    .map_err(|e| invalid(at("forward"), e.to_string()))?;
            }
            if let Some(size) = s.table_size {
                if check_table_size(size).is_err() {
                    return Err(invalid(
                        at("table_size"),
                        format!(
                            "{size} is not a prime between 2 and {}",
                            lb_common::RING_SIZE_MAX
                        ),
                    ));
                }
                options.table_size = size;
            }
            if let Some(hc) = &s.health_check {
                hc.validate()
                    .map_err(|e| invalid(at("health_check"), e.message))?;
            }
            let mut reals = BTreeMap::new();
            for (j, r) in s.reals.iter().enumerate() {
                let at = |field: &str| format!("services[{i}].reals[{j}].{field}");
                let addr: IpAddr = r.address.parse().map_err(|_| {
                    invalid(
                        at("address"),
                        format!("'{}' is not an IPv4 or IPv6 address", r.address),
                    )
                })?;
                let weight = r.weight.unwrap_or(1);
                if weight > MAX_WEIGHT {
                    return Err(invalid(
                        at("weight"),
                        format!("{weight} is out of range (0-{MAX_WEIGHT})"),
                    ));
                }
                check_family(&vip, options.forward, addr)
                    .map_err(|e| invalid(at("address"), e.to_string()))?;
                let admin = match (r.enabled.unwrap_or(true), r.drain.unwrap_or(false)) {
                    (false, _) => Admin::Disabled,
                    (true, true) => Admin::Drain,
                    (true, false) => Admin::Enabled,
                };
                if let Some(hc) = &r.health_check {
                    hc.validate()
                        .map_err(|e| invalid(at("health_check"), e.message))?;
                }
                let spec = RealSpec {
                    weight,
                    admin,
                    health: r.health_check.clone(),
                };
                if reals.insert(addr, spec).is_some() {
                    return Err(invalid(
                        at("address"),
                        format!("{addr} is listed twice in this service"),
                    ));
                }
            }
            desired.services.insert(
                vip,
                ServiceSpec {
                    options,
                    health: s.health_check.clone(),
                    reals,
                },
            );
        }
        desired
            .validate()
            .map_err(|e| invalid("services".into(), e.to_string()))?;
        Ok(Self { daemon, desired })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../docs/examples/xlb.yaml");

    #[test]
    fn documented_example_parses() {
        let c = Config::parse("xlb.yaml", EXAMPLE).expect("docs/examples/xlb.yaml is valid");
        assert!(!c.desired.services.is_empty());
        assert_eq!(c.daemon.iface.as_deref(), Some("eth0"));
    }

    #[test]
    fn config_md_shows_the_example_and_its_yaml_parses() {
        let doc = include_str!("../../docs/config.md");
        assert!(
            doc.contains(EXAMPLE),
            "docs/config.md must show docs/examples/xlb.yaml verbatim"
        );
        let blocks: Vec<&str> = doc
            .split("```yaml\n")
            .skip(1)
            .map(|b| b.split("```").next().unwrap_or(b))
            .collect();
        assert!(blocks.len() >= 2, "no YAML examples in docs/config.md");
        for yaml in blocks {
            if let Err(e) = Config::parse("docs/config.md", yaml) {
                panic!("a YAML block of docs/config.md is invalid: {e}\n{yaml}");
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Any edit of the documented example parses or is refused with a
        /// message that names the file and the place: never a panic.
        #[test]
        fn mangled_documents_never_panic_and_errors_name_the_place(
            cuts in proptest::collection::vec((0usize..4000, 0usize..40, ".{0,12}"), 1..4),
        ) {
            let mut text = EXAMPLE.to_owned();
            for (at, len, with) in cuts {
                let at = at % (text.len() + 1);
                let end = (at + len).min(text.len());
                if text.is_char_boundary(at) && text.is_char_boundary(end) {
                    text.replace_range(at..end, &with);
                }
            }
            if let Err(e) = Config::parse("x.yaml", &text) {
                let msg = e.to_string();
                proptest::prop_assert!(msg.starts_with("x.yaml: "), "{msg}");
                let placed = ["services", "daemon", "line ", "(document)", "unknown field", "missing field"]
                    .iter()
                    .any(|p| msg.contains(p));
                proptest::prop_assert!(placed, "no place in {msg:?} for:\n{text}");
            }
        }

        /// A VIP written any way parses or is refused naming what was given.
        #[test]
        fn any_vip_text_parses_or_is_refused_naming_it(text in ".{0,40}") {
            if let Err(e) = text.parse::<Vip>() {
                let msg = e.to_string();
                proptest::prop_assert!(msg.starts_with("invalid"), "{msg}");
            }
        }
    }

    #[test]
    fn a_saved_state_parses_back_to_the_same_state_and_the_same_text() {
        let c = Config::parse("xlb.yaml", EXAMPLE).expect("docs/examples/xlb.yaml is valid");
        let saved = to_yaml(&c.desired).expect("yaml");
        let back = Config::parse("saved.yaml", &saved)
            .unwrap_or_else(|e| panic!("the saved state does not parse: {e}\n{saved}"));
        assert_eq!(back.desired, c.desired, "{saved}");
        assert_eq!(to_yaml(&back.desired).expect("yaml"), saved);
        assert!(
            saved.starts_with("# The desired state of an xlb daemon"),
            "{saved}"
        );
    }

    #[test]
    fn a_hash_seed_is_read_saved_and_read_back() {
        let text = format!("hash_seed: {}\n{EXAMPLE}", u64::MAX);
        let c = Config::parse("xlb.yaml", &text).expect("valid");
        assert_eq!(c.desired.hash_seed, u64::MAX);
        let saved = to_yaml(&c.desired).expect("yaml");
        assert!(
            saved.contains(&format!("\nhash_seed: {}\nservices:\n", u64::MAX)),
            "{saved}"
        );
        let back = Config::parse("saved.yaml", &saved).expect("the saved state parses");
        assert_eq!(back.desired, c.desired);
        // No seed, or seed 0, is no seed: nothing is written.
        for text in ["hash_seed: 0\n", "hash_seed:\n", ""] {
            let c = Config::parse("x.yaml", text).expect("valid");
            assert_eq!(c.desired.hash_seed, 0);
            assert!(!to_yaml(&c.desired).expect("yaml").contains("hash_seed"));
        }
    }

    /// A document that is one string (a comment whose `#` was lost) is
    /// refused naming its place, which serde's message leaves out there.
    #[test]
    fn a_document_of_the_wrong_type_is_refused_naming_the_document() {
        // The case proptest found: the first line's `# ... configuration: ` cut.
        let text = EXAMPLE.replacen("# A complete xlb configuration: ", "A ", 1);
        let err = Config::parse("x.yaml", &text).unwrap_err().to_string();
        assert!(
            err.starts_with("x.yaml: invalid type: string")
                && err.ends_with(
                    "expected a mapping of `daemon`, `hash_seed` and `services` at line 1 column 1"
                ),
            "{err}"
        );
    }

    /// A section of the wrong type is refused naming what belongs there,
    /// never an internal type's name.
    #[test]
    fn a_section_of_the_wrong_type_names_what_belongs_there() {
        for (text, expected) in [
            (
                "services:\n  - services\n",
                "x.yaml: services[0]: invalid type: string \"services\", expected a service: \
                 a mapping with `vip` (and `reals`, `health_check`, ...) at line 2 column 5",
            ),
            (
                "services:\n  - vip: 203.0.113.10:80/tcp\n    reals: [x]\n",
                "x.yaml: services[0].reals[0]: invalid type: string \"x\", expected a real: a \
                 mapping with `address` (and `weight`, `enabled`, ...) at line 3 column 13",
            ),
            (
                "services:\n  - vip: 203.0.113.10:80/tcp\n    health_check: tcp\n",
                "x.yaml: services[0].health_check: invalid type: string \"tcp\", expected a \
                 health check: a mapping with `kind` (and `port`, `interval_ms`, ...) at line 3 \
                 column 19",
            ),
        ] {
            let err = Config::parse("x.yaml", text).unwrap_err().to_string();
            assert_eq!(err, expected);
        }
    }

    /// An address key that is no ADDRESS:PORT says the form and shows the
    /// value, as its flag does; a left-out or null one is not set.
    #[test]
    fn a_bad_socket_address_shows_the_form_and_the_value() {
        for (text, expected) in [
            (
                "daemon:\n  metrics_address: nope\n",
                "x.yaml: daemon.metrics_address: 'nope' is not ADDRESS:PORT, e.g. \
                 192.0.2.1:9815 or [2001:db8::1]:9815",
            ),
            (
                "daemon:\n  sync_listen: 192.0.2.1:9815\n  sync_peers: [192.0.2.2:9815, 192.0.2.3]\n",
                "x.yaml: daemon.sync_peers: '192.0.2.3' is not ADDRESS:PORT, e.g. \
                 192.0.2.1:9815 or [2001:db8::1]:9815",
            ),
        ] {
            let err = Config::parse("x.yaml", text).unwrap_err().to_string();
            assert_eq!(err, expected);
        }
        let c = Config::parse(
            "x.yaml",
            "daemon:\n  metrics_address: '[2001:db8::1]:9814'\n",
        )
        .expect("valid");
        assert_eq!(
            c.daemon.metrics_addr,
            Some("[2001:db8::1]:9814".parse().expect("an address"))
        );
        let c = Config::parse("x.yaml", "daemon:\n  metrics_address:\n").expect("valid");
        assert_eq!(c.daemon.metrics_addr, None);
    }

    /// A tab where the parser stops is named as one: YAML never indents
    /// with tabs, and the parser's own message does not say so.
    #[test]
    fn a_tab_in_the_indentation_is_named() {
        let err = Config::parse("x.yaml", "services:\n\t- vip: 203.0.113.10:80/tcp\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("x.yaml: found character that cannot start any token at line 2")
                && err.ends_with(" (a tab: YAML indents with spaces only)"),
            "{err}"
        );
        // Any other stray character keeps the parser's message alone.
        let err = Config::parse("x.yaml", "services:\n@ x\n")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("a tab"), "{err}");
    }

    #[test]
    fn big_or_deep_documents_are_refused_before_parsing() {
        let big = format!("# {}\n", "x".repeat(MAX_CONFIG_BYTES));
        let err = Config::parse("x.yaml", &big).unwrap_err().to_string();
        assert!(err.contains("at most 1048576 bytes"), "{err}");
        let deep = format!("services: {}{}\n", "[".repeat(40), "]".repeat(40));
        let err = Config::parse("x.yaml", &deep).unwrap_err().to_string();
        assert!(err.contains("line 1: nested deeper than 32"), "{err}");
        // Quoted and commented & and * are text, not anchors.
        Config::parse(
            "x.yaml",
            "# &not an anchor\nservices:\n  - vip: 203.0.113.10:80/tcp # *nor an alias\n    health_check:\n      kind: udp\n      send: \"*ping&\"\n      expect: '&pong*'\n",
        )
        .expect("quotes and comments are not anchors");
    }

    #[test]
    fn the_log_format_is_a_daemon_setting() {
        let c = Config::parse("x.yaml", "daemon:\n  log_format: json\n").expect("valid");
        assert_eq!(c.daemon.log_format, Some(crate::settings::LogFormat::Json));
        let err = Config::parse("x.yaml", "daemon:\n  log_format: xml\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("daemon.log_format: unknown variant `xml`, expected `plain` or `json`"),
            "{err}"
        );
    }

    #[test]
    fn defaults_fill_in() {
        let c = Config::parse(
            "x.yaml",
            "services:\n  - vip: 203.0.113.10:80/tcp\n    reals:\n      - address: 198.51.100.11\n      - address: 198.51.100.12\n        weight: 3\n        drain: true\n",
        )
        .expect("valid config");
        let s = &c.desired.services[&"203.0.113.10:80/tcp".parse().expect("vip")];
        assert_eq!(s.options, VipOptions::default());
        let r: Vec<_> = s.reals.values().collect();
        assert_eq!((r[0].weight, r[0].admin), (1, Admin::Enabled));
        assert_eq!((r[1].weight, r[1].admin), (3, Admin::Drain));
    }

    #[test]
    fn errors_name_file_path_and_problem() {
        let cases = [
            (
                "services:\n  - vip: 203.0.113.10:99999/tcp\n",
                "x.yaml: services[0].vip: invalid VIP '203.0.113.10:99999/tcp': port 99999 is out of range (1-65535)",
            ),
            (
                "services:\n  - vip: 203.0.113.10:80/tcp\n    table_size: 65536\n",
                "x.yaml: services[0].table_size: 65536 is not a prime",
            ),
            (
                "services:\n  - vip: 203.0.113.10:80/tcp\n    reals:\n      - address: 198.51.100.11\n        weight: 70000\n",
                "x.yaml: services[0].reals[0].weight: 70000 is out of range (0-65535)",
            ),
            (
                "services:\n  - vip: 203.0.113.10:80/tcp\n    reals:\n      - address: 2001:db8::1\n",
                "x.yaml: services[0].reals[0].address: real 2001:db8::1 cannot serve 203.0.113.10:80/tcp in dr mode",
            ),
            (
                "services:\n  - vip: 203.0.113.10:80/tcp\n    reals:\n      - address: 198.51.100.300\n",
                "x.yaml: services[0].reals[0].address: '198.51.100.300' is not an IPv4 or IPv6 address",
            ),
            (
                "services:\n  - vip: 203.0.113.10:80/tcp\n    forward: gre\n",
                "x.yaml: services[0].forward: invalid forwarding mode 'gre'",
            ),
            (
                "services:\n  - vip: 203.0.113.10:80/tcp\n  - vip: 203.0.113.10:80/tcp\n",
                "x.yaml: services[1].vip: VIP 203.0.113.10:80/tcp is listed twice",
            ),
            (
                "services:\n  - vip: 203.0.113.10:80/tcp\n    colour: blue\n",
                "x.yaml: services[0]: unknown field `colour`",
            ),
            (
                "daemon:\n  tunnel_source: 192.0.2.0/33\n",
                "x.yaml: daemon.tunnel_source: prefix length '33' is not 0-32",
            ),
            (
                "base: &b\n  vip: 203.0.113.10:80/tcp\nservices:\n  - *b\n",
                "x.yaml: line 1: YAML anchors and aliases (&name, *name) are not accepted",
            ),
            (
                "services:\n  - vip: 203.0.113.10:80/tcp\n    health_check:\n      kind: http\n      path: \"/a\\r\\nX: y\"\n",
                "x.yaml: services[0].health_check: path \"/a\\r\\nX: y\" holds a control character",
            ),
            (
                "services:\n  - vip: 0.0.0.0:80/tcp\n",
                "x.yaml: services: invalid VIP 0.0.0.0:80/tcp: 0.0.0.0 is the unspecified address",
            ),
            (
                "daemon:\n  min_healthy: 1.5\n",
                "x.yaml: daemon.min_healthy: 1.5 is not between 0.0 and 1.0",
            ),
            (
                "daemon:\n  conntrack_size: 0\n",
                "x.yaml: daemon.conntrack_size: 0 is not between 1024 and 134217728",
            ),
            (
                "daemon:\n  mtu: 10\n",
                "x.yaml: daemon.mtu: 10 is not between 1280 and 65535",
            ),
            (
                "daemon:\n  udp_idle_timeout: 0\n",
                "x.yaml: daemon.udp_idle_timeout: 0 is not between 1 and 86400",
            ),
            (
                "daemon:\n  resolve_timeout: 0\n",
                "x.yaml: daemon.resolve_timeout: 0 is not between 1 and 60",
            ),
            (
                "daemon:\n  store_interval_ms: 18446744073709551615\n",
                "x.yaml: daemon.store_interval_ms: 18446744073709551615 is not between 1 and 60000",
            ),
            (
                "daemon:\n  sync_multicast_ttl: 0\n",
                "x.yaml: daemon.sync_multicast_ttl: 0 is not between 1 and 255",
            ),
            (
                "daemon:\n  mtu: 1500.5\n",
                "x.yaml: daemon.mtu: invalid type",
            ),
            (
                "hash_seed: -1\n",
                "x.yaml: hash_seed: -1 is negative: the seed is an unsigned integer from 0 to \
                 18446744073709551615",
            ),
            (
                "hash_seed: 1.5\n",
                "x.yaml: hash_seed: 1.5 is not an integer: the seed is an unsigned integer",
            ),
            (
                "hash_seed: seven\n",
                "x.yaml: hash_seed: \"seven\" is not an integer",
            ),
            (
                "hash_seed: [7]\n",
                "x.yaml: hash_seed: a list is not an integer",
            ),
            (
                "hash_seed: 18446744073709551616\n",
                "x.yaml: hash_seed: 18446744073709551616 is too large",
            ),
            (
                "hash_seed: 1000000000000000000000000000000000000000000\n",
                "x.yaml: hash_seed: 1e42 is too large",
            ),
            (
                "daemon:\n  colour: blue\n",
                "x.yaml: daemon.colour: unknown field `colour`",
            ),
            (
                "daemon:\n  xdp_mode: turbo\n",
                "x.yaml: daemon.xdp_mode: unknown variant `turbo`, expected one of `native`, `skb`, `auto`",
            ),
            (
                "services:\n  - vip: 203.0.113.10:80/tcp\n    health_check:\n      kind: http\n      interval_ms: 0\n",
                "x.yaml: services[0].health_check: interval_ms must be at least 100",
            ),
        ];
        for (text, want) in cases {
            let err = Config::parse("x.yaml", text).unwrap_err().to_string();
            assert!(err.contains(want), "got {err:?}, want {want:?}");
        }
    }
}
