//! `xlb top`: a live view of every VIP and real (packets/s, bytes/s, new
//! flows/s, active flows, health, weight), read from `GET /v1/status` every
//! interval and drawn with ratatui. Keys: `p` `b` `f` `a` `n` sort by
//! packets/s, bytes/s, new flows/s, active flows, address; `r` reverses;
//! `q` (or Esc, Ctrl-C) quits.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use hyper::Method;
use ratatui::{
    DefaultTerminal, Frame,
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Style, Stylize as _},
    widgets::{Block, Paragraph, Row, Table},
};
use tokio::time::Instant;

use super::{
    rate::{Rates, RealRate, VipRate, between},
    render,
};
use crate::{api::Status, client::Client, model::Vip, views::VipView};

/// What the rows are sorted by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    /// Packets per second.
    Packets,
    /// Bytes per second.
    Bytes,
    /// New flows per second.
    Flows,
    /// Active flows.
    Active,
    /// Address.
    Name,
}

impl SortKey {
    /// The key that selects it.
    fn from_key(c: char) -> Option<Self> {
        Some(match c {
            'p' => Self::Packets,
            'b' => Self::Bytes,
            'f' => Self::Flows,
            'a' => Self::Active,
            'n' => Self::Name,
            _ => return None,
        })
    }

    fn label(self) -> &'static str {
        match self {
            Self::Packets => "pkt/s",
            Self::Bytes => "bytes/s",
            Self::Flows => "flows/s",
            Self::Active => "active",
            Self::Name => "address",
        }
    }
}

/// The keys, as the screen's title lists them.
const KEYS: &str = "p pkt/s  b bytes/s  f flows/s  a active  n address  r reverse  q quit";

/// One line of the table: a VIP, or a real under it.
#[derive(Clone, Debug, PartialEq)]
pub struct Line {
    /// `203.0.113.10:80/tcp`, or `  -> 198.51.100.11`.
    pub name: String,
    /// Packets per second.
    pub packets: f64,
    /// Bytes per second.
    pub bytes: f64,
    /// New flows per second.
    pub flows: f64,
    /// Active flows.
    pub active: u64,
    /// Health: `up`, `DOWN`, `pending`, `-`.
    pub health: String,
    /// Weight in the live table (`-`: out of it), admin state.
    pub weight: String,
}

/// Orders `a` and `b` by `key` (largest first; names in address order).
fn order<T: PartialOrd>(a: T, b: T, name: std::cmp::Ordering, desc: bool) -> std::cmp::Ordering {
    let o = a.partial_cmp(&b).unwrap_or(std::cmp::Ordering::Equal);
    (if desc { o.reverse() } else { o }).then(name)
}

/// What a row is sorted by: packets/s, bytes/s, new flows/s, active flows.
type Figures = (f64, f64, f64, u64);

fn figures(v: &VipRate) -> Figures {
    (
        v.packets_per_s,
        v.bytes_per_s,
        v.flows_per_s,
        v.active_flows,
    )
}

fn real_figures(r: &RealRate) -> Figures {
    (
        r.packets_per_s,
        r.bytes_per_s,
        r.flows_per_s,
        r.active_flows,
    )
}

/// The table's lines: VIPs sorted by `key`, each followed by its reals sorted
/// the same way; `reverse` flips the order.
pub fn lines(
    rates: &Rates,
    health: &BTreeMap<(Vip, IpAddr), String>,
    key: SortKey,
    reverse: bool,
) -> Vec<Line> {
    let cmp = |a: Figures, b: Figures, name| {
        let o = match key {
            SortKey::Packets => order(a.0, b.0, name, true),
            SortKey::Bytes => order(a.1, b.1, name, true),
            SortKey::Flows => order(a.2, b.2, name, true),
            SortKey::Active => order(a.3, b.3, name, true),
            SortKey::Name => name,
        };
        if reverse { o.reverse() } else { o }
    };
    let mut vips: Vec<_> = rates.vips.iter().collect();
    vips.sort_by(|a, b| cmp(figures(a), figures(b), a.vip.cmp(&b.vip)));
    let mut out = Vec::new();
    for v in vips {
        out.push(Line {
            name: v.vip.to_string(),
            packets: v.packets_per_s,
            bytes: v.bytes_per_s,
            flows: v.flows_per_s,
            active: v.active_flows,
            health: String::new(),
            weight: String::new(),
        });
        let mut reals: Vec<_> = v.reals.iter().collect();
        reals.sort_by(|a, b| cmp(real_figures(a), real_figures(b), a.addr.cmp(&b.addr)));
        for r in reals {
            out.push(Line {
                name: format!("  -> {}", r.addr),
                packets: r.packets_per_s,
                bytes: r.bytes_per_s,
                flows: r.flows_per_s,
                active: r.active_flows,
                health: health
                    .get(&(v.vip, r.addr))
                    .cloned()
                    .unwrap_or_else(|| "-".to_owned()),
                weight: format!(
                    "{} {}",
                    r.effective_weight
                        .map_or_else(|| "-".to_owned(), |w| w.to_string()),
                    r.admin
                ),
            });
        }
    }
    out
}

/// What the screen shows.
struct Screen {
    socket: String,
    interval: Duration,
    rates: Rates,
    health: BTreeMap<(Vip, IpAddr), String>,
    key: SortKey,
    reverse: bool,
    error: Option<String>,
}

impl Screen {
    fn draw(&self, frame: &mut Frame) {
        let [title, body, footer] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Min(0),
            Constraint::Length(1),
        ])
        .areas(frame.area());
        frame.render_widget(
            Paragraph::new(format!(
                "xlb top  {}  every {:.1} s  sorted by {}{}",
                self.socket,
                self.interval.as_secs_f64(),
                self.key.label(),
                if self.reverse { " (reversed)" } else { "" }
            ))
            .bold(),
            title,
        );
        let rows = lines(&self.rates, &self.health, self.key, self.reverse)
            .into_iter()
            .map(|l| {
                Row::new([
                    l.name,
                    format!("{:.0}", l.packets),
                    format!("{:.0}", l.bytes),
                    format!("{:.0}", l.flows),
                    l.active.to_string(),
                    l.health,
                    l.weight,
                ])
            });
        let header = Row::new([
            "VIP / real",
            "pkt/s",
            "bytes/s",
            "flows/s",
            "active",
            "health",
            "weight",
        ])
        .style(Style::new().reversed());
        let widths = [
            Constraint::Min(30),
            Constraint::Length(10),
            Constraint::Length(12),
            Constraint::Length(9),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(16),
        ];
        frame.render_widget(
            Table::new(rows, widths)
                .header(header)
                .block(Block::bordered()),
            body,
        );
        let status = match &self.error {
            Some(e) => format!("daemon: {e} (retrying)"),
            None => format!("keys: {KEYS}"),
        };
        frame.render_widget(Paragraph::new(status), footer);
    }

    /// Takes a new reading: rates since `last`, health words.
    fn update(&mut self, status: &Status, last: &[VipView], elapsed: Duration) {
        let views: Vec<VipView> = status.vips.iter().map(|v| v.view.clone()).collect();
        self.rates = between(last, &views, elapsed);
        self.health = render::real_health(status);
        self.error = None;
    }
}

async fn read(client: &Client) -> anyhow::Result<Status> {
    client.call(Method::GET, "/v1/status", None::<&()>).await
}

/// Runs `xlb top` until `q`.
pub async fn run(
    client: &Client,
    socket: &std::path::Path,
    interval: Duration,
) -> anyhow::Result<()> {
    // The first reading is taken before the screen: an unreachable daemon is
    // an error like in every other command.
    let first = read(client).await?;
    let mut screen = Screen {
        socket: socket.display().to_string(),
        interval,
        rates: Rates::default(),
        health: BTreeMap::new(),
        key: SortKey::Packets,
        reverse: false,
        error: None,
    };
    let mut last: Vec<VipView> = first.vips.iter().map(|v| v.view.clone()).collect();
    screen.update(&first, &last, interval);
    let mut terminal = ratatui::init();
    let result = event_loop(&mut terminal, client, &mut screen, &mut last).await;
    ratatui::restore();
    result
}

async fn event_loop(
    terminal: &mut DefaultTerminal,
    client: &Client,
    screen: &mut Screen,
    last: &mut Vec<VipView>,
) -> anyhow::Result<()> {
    let mut taken = Instant::now();
    let mut next = taken + screen.interval;
    loop {
        terminal.draw(|f| screen.draw(f))?;
        let wait = next.saturating_duration_since(Instant::now());
        // Waiting for a key blocks this thread, not the runtime.
        if tokio::task::block_in_place(|| event::poll(wait))? {
            if let Event::Key(k) = event::read()?
                && k.kind == KeyEventKind::Press
            {
                match k.code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                        return Ok(());
                    }
                    KeyCode::Char('r') => screen.reverse = !screen.reverse,
                    KeyCode::Char(c) => {
                        if let Some(key) = SortKey::from_key(c) {
                            screen.key = key;
                        }
                    }
                    _ => {}
                }
            }
            continue;
        }
        next += screen.interval;
        match read(client).await {
            Ok(status) => {
                let now = Instant::now();
                screen.update(&status, last, now - taken);
                *last = status.vips.iter().map(|v| v.view.clone()).collect();
                taken = now;
            }
            Err(e) => screen.error = Some(format!("{e:#}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real(n: u8, packets: f64, active: u64) -> RealRate {
        RealRate {
            addr: IpAddr::from([198, 51, 100, n]),
            packets_per_s: packets,
            bytes_per_s: packets * 100.0,
            flows_per_s: 0.0,
            active_flows: active,
            effective_weight: Some(1),
            admin: crate::desired::Admin::Enabled,
            healthy: true,
        }
    }

    #[test]
    fn keys_sort_the_reals_within_their_vip() {
        let rates = Rates {
            interval_s: 1.0,
            vips: vec![VipRate {
                vip: "203.0.113.10:80/tcp".parse().expect("vip"),
                packets_per_s: 30.0,
                bytes_per_s: 3000.0,
                flows_per_s: 0.0,
                active_flows: 9,
                reals: vec![real(11, 10.0, 7), real(12, 20.0, 2)],
            }],
        };
        let names = |key, reverse| -> Vec<String> {
            lines(&rates, &BTreeMap::new(), key, reverse)
                .into_iter()
                .map(|l| l.name)
                .collect()
        };
        let vip = "203.0.113.10:80/tcp".to_owned();
        let (a, b) = (
            "  -> 198.51.100.11".to_owned(),
            "  -> 198.51.100.12".to_owned(),
        );
        assert_eq!(
            names(SortKey::Packets, false),
            [vip.clone(), b.clone(), a.clone()]
        );
        assert_eq!(
            names(SortKey::Active, false),
            [vip.clone(), a.clone(), b.clone()]
        );
        assert_eq!(
            names(SortKey::Packets, true),
            [vip.clone(), a.clone(), b.clone()]
        );
        assert_eq!(names(SortKey::Name, false), [vip, a, b]);
    }
}
