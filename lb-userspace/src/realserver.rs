//! `xlb realserver setup|teardown`: prepares a real server to accept VIP
//! traffic in DR or TUN mode, the way LVS real servers are set up:
//!
//! - each VIP goes on `lo` as a host address (/32 or /128), so the kernel
//!   accepts packets for it;
//! - `arp_ignore=1` and `arp_announce=2` (all interfaces), so the real never
//!   answers ARP for the VIP (the balancer must attract VIP traffic) nor uses
//!   it as an ARP source;
//! - `rp_filter=2` (loose) on all interfaces, so decapsulated TUN packets and
//!   DR packets from clients routed elsewhere are not dropped by reverse-path
//!   filtering.
//!
//! Setup records the sysctl values it replaced in a state file; teardown
//! removes the VIPs and restores them.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::cli::error::bad_input;

/// Sysctls set by setup, with the value each needs.
const SYSCTLS: [(&str, &str); 4] = [
    ("net/ipv4/conf/all/arp_ignore", "1"),
    ("net/ipv4/conf/all/arp_announce", "2"),
    ("net/ipv4/conf/all/rp_filter", "2"),
    ("net/ipv4/conf/lo/rp_filter", "2"),
];

/// What setup changed, so teardown can undo exactly that.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Applied {
    /// VIPs added to `lo` by setup.
    pub vips: Vec<IpAddr>,
    /// Previous values of the sysctls setup changed.
    pub sysctls: BTreeMap<String, String>,
}

/// Default state file.
pub const STATE_FILE: &str = "/run/xlb/realserver.json";

fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key)
}

fn read_sysctl(key: &str) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(sysctl_path(key))
        .with_context(|| format!("reading sysctl {key}"))?
        .trim()
        .to_owned())
}

fn write_sysctl(key: &str, value: &str) -> anyhow::Result<()> {
    std::fs::write(sysctl_path(key), value).with_context(|| format!("setting sysctl {key}={value}"))
}

async fn lo_index(handle: &rtnetlink::Handle) -> anyhow::Result<u32> {
    use futures::TryStreamExt as _;
    let link = handle
        .link()
        .get()
        .match_name("lo".to_owned())
        .execute()
        .try_next()
        .await
        .context("looking up lo")?
        .context("no lo interface")?;
    Ok(link.header.index)
}

/// The prefix length a VIP gets on `lo`: a host address, /32 or /128.
fn host_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

/// `lo`'s addresses with their prefix lengths, and the messages that name them
/// (what a removal takes).
async fn lo_addresses(
    handle: &rtnetlink::Handle,
    lo: u32,
) -> anyhow::Result<Vec<(IpAddr, u8, netlink_packet_route::address::AddressMessage)>> {
    use futures::TryStreamExt as _;
    use netlink_packet_route::address::AddressAttribute;
    let mut found = Vec::new();
    let mut addrs = handle.address().get().set_link_index_filter(lo).execute();
    while let Some(msg) = addrs.try_next().await.context("listing lo's addresses")? {
        let ip = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        if let Some(ip) = ip {
            found.push((ip, msg.header.prefix_len, msg));
        }
    }
    Ok(found)
}

/// Removes the host addresses (/32, /128) of `vips` from `lo`; the same
/// address with another prefix (put there by someone else) stays.
async fn remove_from_lo(
    handle: &rtnetlink::Handle,
    lo: u32,
    vips: &[IpAddr],
) -> anyhow::Result<()> {
    for (ip, len, msg) in lo_addresses(handle, lo).await? {
        if vips.contains(&ip) && len == host_prefix(ip) {
            handle
                .address()
                .del(msg)
                .execute()
                .await
                .with_context(|| format!("removing {ip}/{len} from lo"))?;
        }
    }
    Ok(())
}

/// The state file `state` holds `text`: what earlier setups changed. One
/// that is not a state file is bad input (exit 2), never overwritten.
fn parse_state(state: &Path, text: &str) -> anyhow::Result<Applied> {
    serde_json::from_str(text).map_err(|e| {
        bad_input(format!(
            "{} is not a realserver state file: {e}",
            state.display()
        ))
    })
}

/// What one setup call changed so far: undone when a later step fails.
#[derive(Default)]
struct Changes {
    /// VIPs this call put on `lo`.
    vips: Vec<IpAddr>,
    /// Sysctls this call wrote, with the values they had.
    sysctls: Vec<(&'static str, String)>,
}

impl Changes {
    /// Takes the changes back: the sysctls get their old values (last
    /// written first), the VIPs leave `lo`. Tries every step; the first
    /// failure is returned.
    async fn undo(&self, handle: &rtnetlink::Handle, lo: u32) -> anyhow::Result<()> {
        let mut first = Ok(());
        for (key, old) in self.sysctls.iter().rev() {
            if let Err(e) = write_sysctl(key, old) {
                first = first.and(Err(e));
            }
        }
        if let Err(e) = remove_from_lo(handle, lo, &self.vips).await {
            first = first.and(Err(e));
        }
        first
    }
}

/// Puts `vips` on `lo` and sets the sysctls; records what it changed in `state`.
/// A VIP already on `lo` (with any prefix) is left alone and not recorded.
/// All or nothing: when a step fails, what this call changed before it (VIPs
/// added, sysctls written) is undone.
pub async fn setup(vips: &[IpAddr], state: &Path) -> anyhow::Result<Applied> {
    if vips.is_empty() {
        bail!("give at least one --vip");
    }
    let applied: Applied = match std::fs::read_to_string(state) {
        Ok(text) => parse_state(state, &text)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Applied::default(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", state.display())),
    };
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    let task = tokio::spawn(conn);
    let result = async {
        let lo = lo_index(&handle).await?;
        let mut changes = Changes::default();
        match apply(&handle, lo, vips, applied, state, &mut changes).await {
            Ok(applied) => Ok(applied),
            Err(err) => Err(match changes.undo(&handle, lo).await {
                Ok(()) => anyhow::anyhow!("{err:#}; nothing was changed"),
                Err(e) => anyhow::anyhow!(
                    "{err:#}; and undoing what was changed before it (VIPs {:?}, sysctls {:?}) \
                     failed too: {e:#}",
                    changes.vips,
                    changes.sysctls.iter().map(|(k, _)| k).collect::<Vec<_>>()
                ),
            }),
        }
    }
    .await;
    task.abort();
    result
}

/// The steps of [`setup`], each recorded in `changes` as it is made.
async fn apply(
    handle: &rtnetlink::Handle,
    lo: u32,
    vips: &[IpAddr],
    mut applied: Applied,
    state: &Path,
    changes: &mut Changes,
) -> anyhow::Result<Applied> {
    let present: Vec<IpAddr> = lo_addresses(handle, lo)
        .await?
        .into_iter()
        .map(|(ip, _, _)| ip)
        .collect();
    for &vip in vips {
        if present.contains(&vip) || changes.vips.contains(&vip) {
            continue;
        }
        let prefix = host_prefix(vip);
        handle
            .address()
            .add(lo, vip, prefix)
            .execute()
            .await
            .with_context(|| format!("adding {vip}/{prefix} to lo"))?;
        changes.vips.push(vip);
        if !applied.vips.contains(&vip) {
            applied.vips.push(vip);
        }
    }
    for (key, value) in SYSCTLS {
        let old = read_sysctl(key)?;
        if old != value {
            write_sysctl(key, value)?;
            changes.sysctls.push((key, old.clone()));
            applied.sysctls.entry(key.to_owned()).or_insert(old);
        }
    }
    if let Some(dir) = state.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(state, serde_json::to_vec_pretty(&applied)?)
        .with_context(|| format!("writing {}", state.display()))?;
    Ok(applied)
}

/// Undoes what setup recorded in `state`.
pub async fn teardown(state: &Path) -> anyhow::Result<Applied> {
    let text = std::fs::read_to_string(state).with_context(|| {
        format!(
            "no realserver state at {} (nothing was set up, or another --state was used)",
            state.display()
        )
    })?;
    let applied = parse_state(state, &text)?;
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    let task = tokio::spawn(conn);
    let lo = lo_index(&handle).await?;
    remove_from_lo(&handle, lo, &applied.vips).await?;
    task.abort();
    for (key, value) in &applied.sysctls {
        write_sysctl(key, value)?;
    }
    std::fs::remove_file(state).with_context(|| format!("removing {}", state.display()))?;
    Ok(applied)
}
