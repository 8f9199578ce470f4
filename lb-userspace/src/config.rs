//! The startup configuration file (`xlb run --config FILE`): the services to
//! create before the program is attached, so traffic is balanced from the first
//! packet.
//!
//! ```yaml
//! services:
//!   - vip: 203.0.113.10:80/tcp
//!     scheduler: maglev        # or maglev-src; default maglev
//!     forward: dr              # or tun; default dr
//!     table_size: 65537        # prime; default 65537
//!     reals:
//!       - address: 198.51.100.11
//!         weight: 1            # 0..=65535; default 1
//! ```

use std::{net::IpAddr, path::Path};

use serde::Deserialize;

use crate::{
    maglev,
    model::{Forward, Scheduler, Vip},
    state::MAX_WEIGHT,
};

/// A configuration that could not be used, naming the file and the place in it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Read {
        /// The file.
        file: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The YAML does not match the schema.
    #[error("{file}: {source}")]
    Parse {
        /// The file.
        file: String,
        /// What serde found, with the line and column.
        source: serde_yaml_ng::Error,
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

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The virtual services.
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
}

/// One virtual service.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// The VIP.
    pub vip: Vip,
    /// The scheduler.
    #[serde(default)]
    pub scheduler: Scheduler,
    /// The forwarding mode.
    #[serde(default)]
    pub forward: Forward,
    /// The Maglev table size.
    #[serde(default = "default_table_size")]
    pub table_size: u32,
    /// The real servers.
    #[serde(default)]
    pub reals: Vec<RealConfig>,
}

/// One real server of a service.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RealConfig {
    /// Its address.
    pub address: IpAddr,
    /// Its weight.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_table_size() -> u32 {
    lb_common::RING_SIZE_DEFAULT
}

fn default_weight() -> u32 {
    1
}

impl ConfigFile {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Self::parse(&file, &text)
    }

    /// Parses and validates `text` (named `file` in errors).
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let config: Self = serde_yaml_ng::from_str(text).map_err(|source| ConfigError::Parse {
            file: file.to_owned(),
            source,
        })?;
        let invalid = |path: String, message: String| ConfigError::Invalid {
            file: file.to_owned(),
            path,
            message,
        };
        let mut seen = std::collections::BTreeSet::new();
        for (i, s) in config.services.iter().enumerate() {
            if !seen.insert(s.vip) {
                return Err(invalid(
                    format!("services[{i}].vip"),
                    format!("VIP {} is listed twice", s.vip),
                ));
            }
            if !maglev::is_prime(s.table_size) || s.table_size > lb_common::RING_SIZE_MAX {
                return Err(invalid(
                    format!("services[{i}].table_size"),
                    format!(
                        "{} is not a prime between 2 and {}",
                        s.table_size,
                        lb_common::RING_SIZE_MAX
                    ),
                ));
            }
            let mut reals = std::collections::BTreeSet::new();
            for (j, r) in s.reals.iter().enumerate() {
                if r.weight > MAX_WEIGHT {
                    return Err(invalid(
                        format!("services[{i}].reals[{j}].weight"),
                        format!("{} is out of range (0-{MAX_WEIGHT})", r.weight),
                    ));
                }
                let family_ok = match s.forward {
                    Forward::Dr => r.address.is_ipv4() == s.vip.addr.is_ipv4(),
                    // IPv4 VIPs may use IPv6 reals (4in6); not the reverse.
                    Forward::Tun => s.vip.addr.is_ipv4() || r.address.is_ipv6(),
                };
                if !family_ok {
                    return Err(invalid(
                        format!("services[{i}].reals[{j}].address"),
                        format!(
                            "{} is not of an IP family the VIP can use in {} mode",
                            r.address, s.forward
                        ),
                    ));
                }
                if !reals.insert(r.address) {
                    return Err(invalid(
                        format!("services[{i}].reals[{j}].address"),
                        format!("{} is listed twice in this service", r.address),
                    ));
                }
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_example_parses_with_defaults() {
        let c = ConfigFile::parse(
            "x.yaml",
            "services:\n  - vip: 203.0.113.10:80/tcp\n    reals:\n      - address: 198.51.100.11\n      - address: 198.51.100.12\n        weight: 3\n",
        )
        .expect("valid config");
        assert_eq!(c.services.len(), 1);
        let s = &c.services[0];
        assert_eq!(s.table_size, 65537);
        assert_eq!(s.scheduler, Scheduler::Maglev);
        assert_eq!(s.reals[0].weight, 1);
        assert_eq!(s.reals[1].weight, 3);
    }

    #[test]
    fn errors_name_file_path_and_problem() {
        let cases = [
            (
                "services:\n  - vip: 203.0.113.10:99999/tcp\n",
                "x.yaml: services[0]: invalid VIP '203.0.113.10:99999/tcp': port 99999 is out of range (1-65535) at line 2",
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
                "x.yaml: services[0].reals[0].address: 2001:db8::1 is not of an IP family the VIP can use in dr mode",
            ),
            (
                "services:\n  - vip: 203.0.113.10:80/tcp\n    colour: blue\n",
                "unknown field `colour`",
            ),
        ];
        for (text, want) in cases {
            let err = ConfigFile::parse("x.yaml", text).unwrap_err().to_string();
            assert!(err.contains(want), "got {err:?}, want {want:?}");
        }
    }
}
