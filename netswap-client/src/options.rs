//! How a client connects, how long it waits, and how it comes back after the network
//! failed it.

use std::net::IpAddr;
use std::time::Duration;

/// Connection options.
#[derive(Clone, Debug)]
pub struct Options {
    /// Local address to bind before connecting (port 0 = any). On one machine,
    /// 127.0.0.2, 127.0.0.3, … act as different identities.
    pub local_addr: Option<IpAddr>,
    /// How long connecting (and the initial HELLO) may take, each attempt.
    pub connect_timeout: Duration,
    /// How long each call waits for its reply by default (`None` = no limit), waiting
    /// for a reconnection included. [`crate::Client::with_timeout`] overrides it.
    pub request_timeout: Option<Duration>,
    /// What to do when the connection drops.
    pub reconnect: Reconnect,
    /// When nothing has come from the server for this long, ask it something (HELLO);
    /// no answer within the same time means the connection is dead (a half-open TCP
    /// connection after a network failure sends no error), and it is replaced.
    /// `None`: never.
    pub keepalive: Option<Duration>,
    /// The connection's socket receive buffer in bytes (`SO_RCVBUF`, set before
    /// connecting; `None` = the kernel's autotuning). A small one (e.g. 256 KiB)
    /// bounds how much of a large reply can queue in this client's socket ahead of a
    /// small reply (head-of-line latency on a LAN), at the cost of throughput on links
    /// with a long round trip. Capped by the kernel's `net.core.rmem_max`.
    pub receive_buffer: Option<u32>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            local_addr: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Some(Duration::from_secs(30)),
            reconnect: Reconnect::default(),
            keepalive: Some(Duration::from_secs(15)),
            receive_buffer: None,
        }
    }
}

/// Automatic reconnection: on by default, with exponential backoff and full jitter, so
/// that a thousand clients of a restarted server do not come back in the same
/// millisecond.
///
/// Attempt `n` (from 1) waits a random time between 0 and
/// `min(max_delay, initial_delay × 2^(n−1))` before connecting.
#[derive(Clone, Debug)]
pub struct Reconnect {
    /// Reconnect at all. Off: a dropped connection closes the client.
    pub enabled: bool,
    /// The first backoff window.
    pub initial_delay: Duration,
    /// The largest backoff window.
    pub max_delay: Duration,
    /// Give up (and close the client) after this many failed attempts in a row
    /// (`None` = never give up).
    pub max_attempts: Option<u32>,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            enabled: true,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            max_attempts: None,
        }
    }
}

impl Reconnect {
    /// No reconnection: the client closes with its connection.
    pub fn disabled() -> Reconnect {
        Reconnect {
            enabled: false,
            ..Reconnect::default()
        }
    }

    /// The backoff window of attempt `n` (from 1).
    pub fn window(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(20);
        self.initial_delay
            .saturating_mul(factor)
            .min(self.max_delay)
    }
}

/// Where a client's connection stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectionState {
    /// Connected; calls go out at once.
    Connected,
    /// The connection dropped: the client is connecting again (`attempt` counts from
    /// 1). Calls wait for it, up to their deadline.
    Reconnecting {
        /// The attempt under way.
        attempt: u32,
        /// Why the last connection ended, or why the last attempt failed.
        reason: String,
    },
    /// Closed for good (by [`crate::Client::close`], with reconnection off, or after
    /// `max_attempts`): every call fails with [`crate::Error::Disconnected`].
    Closed {
        /// Why.
        reason: String,
    },
}

impl ConnectionState {
    /// A stable upper-case name: `CONNECTED`, `RECONNECTING` or `CLOSED`.
    pub fn name(&self) -> &'static str {
        match self {
            ConnectionState::Connected => "CONNECTED",
            ConnectionState::Reconnecting { .. } => "RECONNECTING",
            ConnectionState::Closed { .. } => "CLOSED",
        }
    }

    /// The reason, for the states that have one.
    pub fn reason(&self) -> Option<&str> {
        match self {
            ConnectionState::Connected => None,
            ConnectionState::Reconnecting { reason, .. } | ConnectionState::Closed { reason } => {
                Some(reason)
            }
        }
    }
}

impl std::fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectionState::Connected => f.write_str("connected"),
            ConnectionState::Reconnecting { attempt, reason } => {
                write!(f, "reconnecting (attempt {attempt}): {reason}")
            }
            ConnectionState::Closed { reason } => write!(f, "closed: {reason}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_window_doubles_up_to_its_cap() {
        let r = Reconnect::default();
        assert_eq!(r.window(1), Duration::from_millis(100));
        assert_eq!(r.window(2), Duration::from_millis(200));
        assert_eq!(r.window(6), Duration::from_millis(3200));
        assert_eq!(r.window(7), Duration::from_secs(5));
        assert_eq!(r.window(1000), Duration::from_secs(5));
    }
}
