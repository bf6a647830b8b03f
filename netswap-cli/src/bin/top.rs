//! `netswap top`: the server's counters, live, in the terminal (ratatui over
//! crossterm, so it works over SSH). Asks STATS every interval and shows each counter
//! with its rate per second, the requests per second by opcode, and the gauges.
//! `q`, Esc or Ctrl-C quits and restores the terminal.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crossterm::event::{Event, EventStream, KeyCode, KeyEventKind, KeyModifiers};
use netswap_client::{Client, Error};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table};
use tokio_stream_compat::next_event;

/// Counters that only grow (shown with a rate); the others are gauges.
fn is_counter(name: &str) -> bool {
    name.starts_with("requests")
        || matches!(
            name,
            "connections_accepted"
                | "connections_refused"
                | "orphans_reaped"
                | "bytes_in"
                | "bytes_out"
                | "busy"
                | "protocol_errors"
                | "misses"
                | "throttled"
                | "notifications_sent"
                | "notifications_merged"
                | "snapshots_written"
        )
}

fn human(v: f64) -> String {
    match v.abs() {
        x if x >= 1e9 => format!("{:.2}G", v / 1e9),
        x if x >= 1e6 => format!("{:.2}M", v / 1e6),
        x if x >= 1e4 => format!("{:.1}k", v / 1e3),
        _ => format!("{v:.0}"),
    }
}

struct View {
    server: String,
    now: Vec<(String, u64)>,
    rates: HashMap<String, f64>,
    error: Option<String>,
}

fn draw(f: &mut ratatui::Frame, v: &View) {
    let [title, body] =
        Layout::vertical([Constraint::Length(1), Constraint::Min(3)]).areas(f.area());
    let head = match &v.error {
        Some(e) => format!("netswap top — {} — {e} — q to quit", v.server),
        None => format!("netswap top — {} — q to quit", v.server),
    };
    f.render_widget(
        Paragraph::new(Line::from(head).style(Style::default().add_modifier(Modifier::BOLD))),
        title,
    );
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(body);
    let counters: Vec<Row> = v
        .now
        .iter()
        .filter(|(k, _)| is_counter(k) && !k.starts_with("requests_"))
        .map(|(k, val)| {
            Row::new(vec![
                Cell::from(k.clone()),
                Cell::from(human(*val as f64)),
                Cell::from(format!("{}/s", human(*v.rates.get(k).unwrap_or(&0.0)))),
            ])
        })
        .collect();
    let mut ops: Vec<(String, f64, u64)> = v
        .now
        .iter()
        .filter(|(k, _)| k.starts_with("requests_"))
        .map(|(k, val)| {
            (
                k.trim_start_matches("requests_").to_uppercase(),
                *v.rates.get(k).unwrap_or(&0.0),
                *val,
            )
        })
        .collect();
    ops.sort_by(|a, b| b.1.total_cmp(&a.1).then(b.2.cmp(&a.2)));
    let ops: Vec<Row> = ops
        .into_iter()
        .map(|(k, r, total)| {
            Row::new(vec![
                Cell::from(k),
                Cell::from(format!("{}/s", human(r))),
                Cell::from(human(total as f64)),
            ])
        })
        .collect();
    let gauges: Vec<Row> = v
        .now
        .iter()
        .filter(|(k, _)| !is_counter(k))
        .map(|(k, val)| Row::new(vec![Cell::from(k.clone()), Cell::from(human(*val as f64))]))
        .collect();
    let bold = Style::default().add_modifier(Modifier::BOLD);
    f.render_widget(
        Table::new(
            counters,
            [
                Constraint::Percentage(50),
                Constraint::Percentage(25),
                Constraint::Percentage(25),
            ],
        )
        .header(Row::new(vec!["counter", "total", "rate"]).style(bold))
        .block(Block::default().borders(Borders::ALL).title("counters")),
        left,
    );
    let [top, bottom] =
        Layout::vertical([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(right);
    f.render_widget(
        Table::new(
            ops,
            [
                Constraint::Percentage(40),
                Constraint::Percentage(30),
                Constraint::Percentage(30),
            ],
        )
        .header(Row::new(vec!["opcode", "rate", "total"]).style(bold))
        .block(
            Block::default()
                .borders(Borders::ALL)
                .title("requests by opcode"),
        ),
        top,
    );
    f.render_widget(
        Table::new(
            gauges,
            [Constraint::Percentage(60), Constraint::Percentage(40)],
        )
        .header(Row::new(vec!["gauge", "now"]).style(bold))
        .block(Block::default().borders(Borders::ALL).title("now")),
        bottom,
    );
}

/// Runs the live view until q, Esc or Ctrl-C.
pub async fn run(client: Client, interval: Duration) -> Result<(), Error> {
    let mut terminal = ratatui::try_init().map_err(Error::Io)?;
    let result = live(&client, interval, &mut terminal).await;
    ratatui::restore();
    result
}

async fn live(
    client: &Client,
    interval: Duration,
    terminal: &mut ratatui::DefaultTerminal,
) -> Result<(), Error> {
    let mut events = EventStream::new();
    let mut view = View {
        server: client.peer_addr().to_string(),
        now: Vec::new(),
        rates: HashMap::new(),
        error: None,
    };
    let mut last: Option<(Instant, HashMap<String, u64>)> = None;
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                match client.stats().await {
                    Ok(now) => {
                        let at = Instant::now();
                        let map: HashMap<String, u64> = now.iter().cloned().collect();
                        if let Some((t0, before)) = &last {
                            let dt = at.duration_since(*t0).as_secs_f64().max(1e-3);
                            view.rates = map
                                .iter()
                                .filter(|(k, _)| is_counter(k))
                                .map(|(k, v)| (k.clone(), v.saturating_sub(*before.get(k).unwrap_or(v)) as f64 / dt))
                                .collect();
                        }
                        last = Some((at, map));
                        view.now = now;
                        view.error = None;
                    }
                    Err(e) => view.error = Some(e.to_string()),
                }
                terminal.draw(|f| draw(f, &view)).map_err(Error::Io)?;
            }
            e = next_event(&mut events) => match e {
                Some(Ok(Event::Key(k))) if k.kind == KeyEventKind::Press => {
                    let ctrl_c = k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if ctrl_c || matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) {
                        return Ok(());
                    }
                }
                Some(Ok(Event::Resize(..))) => {
                    terminal.draw(|f| draw(f, &view)).map_err(Error::Io)?;
                }
                Some(Err(e)) => return Err(Error::Io(e)),
                None => return Ok(()),
                _ => {}
            },
        }
    }
}

/// `EventStream` is a `futures::Stream`; this takes its next item without pulling in
/// another stream crate.
mod tokio_stream_compat {
    use std::future::poll_fn;
    use std::pin::Pin;

    use crossterm::event::{Event, EventStream};
    use futures_core::Stream;

    pub async fn next_event(s: &mut EventStream) -> Option<std::io::Result<Event>> {
        poll_fn(|cx| Pin::new(&mut *s).poll_next(cx)).await
    }
}
