//! The client's error type: one variant per failure status, carrying the server's
//! reason, plus connection and protocol failures.

use netswap_proto::{Status, Version};

/// Everything a netswap call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller may not do this to this record (ACCESS_VIOLATION).
    #[error("access violation: {0}")]
    AccessViolation(String),
    /// No such record, or a range outside it (ADDRESS_FAULT).
    #[error("address fault: {0}")]
    AddressFault(String),
    /// The request was not well formed (MALFORMED).
    #[error("malformed request: {0}")]
    Malformed(String),
    /// Over the server's message or record size limit (TOO_LARGE).
    #[error("too large: {0}")]
    TooLarge(String),
    /// Over the owner's record-count or byte quota (QUOTA_EXCEEDED).
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    /// REPLACE_IF found another version (CONFLICT).
    #[error("conflict: the record is at version {current}")]
    Conflict {
        /// The record's current version.
        current: Version,
    },
    /// The server found the framing broken and closed the connection (PROTOCOL_ERROR).
    #[error("protocol error reported by the server: {0}")]
    ProtocolError(String),
    /// A server limit on in-flight work; retry later (BUSY).
    #[error("server busy: {0}")]
    Busy(String),
    /// Connecting, reading or writing failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// No reply within the call's deadline (or no connection within the connect
    /// timeout). Says what it waited for.
    #[error("timed out after {} ms waiting for {what} ({in_flight} requests in flight on the connection)", waited.as_millis())]
    Timeout {
        /// What the call waited for, e.g. `"READ of 9c1f03e27a4b5d10"` or `"the
        /// connection"`.
        what: String,
        /// How long it waited.
        waited: std::time::Duration,
        /// Requests in flight on the connection when it gave up (itself included).
        in_flight: usize,
    },
    /// The connection is gone: the client is closed, or the connection dropped while
    /// a request that is not idempotent was in flight. Its outcome is unknown (it may
    /// or may not have been applied); it is never re-sent blindly. Reads (READ, INFO,
    /// HELLO, STATS, WATCH) are re-sent once on the new connection instead.
    #[error("disconnected: {0}")]
    Disconnected(String),
    /// The server sent something this client cannot understand.
    #[error("bad reply: {0}")]
    BadReply(String),
    /// An argument the client refuses before sending anything.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    /// The protocol status behind this error, if it came from the server.
    pub fn status(&self) -> Option<Status> {
        Some(match self {
            Error::AccessViolation(_) => Status::AccessViolation,
            Error::AddressFault(_) => Status::AddressFault,
            Error::Malformed(_) => Status::Malformed,
            Error::TooLarge(_) => Status::TooLarge,
            Error::QuotaExceeded(_) => Status::QuotaExceeded,
            Error::Conflict { .. } => Status::Conflict,
            Error::ProtocolError(_) => Status::ProtocolError,
            Error::Busy(_) => Status::Busy,
            _ => return None,
        })
    }

    /// A stable upper-case code for wrappers and scripts: the status name
    /// (`"ACCESS_VIOLATION"`, …) or `"IO"`, `"TIMEOUT"`, `"DISCONNECTED"`,
    /// `"BAD_REPLY"`, `"INVALID_ARGUMENT"`.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Io(_) => "IO",
            Error::Timeout { .. } => "TIMEOUT",
            Error::Disconnected(_) => "DISCONNECTED",
            Error::BadReply(_) => "BAD_REPLY",
            Error::InvalidArgument(_) => "INVALID_ARGUMENT",
            other => other.status().expect("server statuses").name(),
        }
    }

    pub(crate) fn from_status(status: Status, reason: String) -> Error {
        match status {
            Status::AccessViolation => Error::AccessViolation(reason),
            Status::AddressFault => Error::AddressFault(reason),
            Status::Malformed => Error::Malformed(reason),
            Status::TooLarge => Error::TooLarge(reason),
            Status::QuotaExceeded => Error::QuotaExceeded(reason),
            Status::ProtocolError => Error::ProtocolError(reason),
            Status::Busy => Error::Busy(reason),
            s => Error::BadReply(format!("unexpected {} reply: {reason}", s.name())),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_status_has_its_variant_and_code() {
        for status in Status::ALL {
            let e = Error::from_status(status, "why".into());
            match status {
                Status::Ok | Status::Data | Status::Notify | Status::Conflict => {
                    assert!(matches!(e, Error::BadReply(_)), "{status:?}");
                }
                s => {
                    assert_eq!(e.status(), Some(s));
                    assert_eq!(e.code(), s.name());
                    assert!(e.to_string().ends_with("why"), "{e}");
                }
            }
        }
        assert_eq!(Error::Conflict { current: 3 }.code(), "CONFLICT");
        let t = Error::Timeout {
            what: "READ of 0000000000000001".into(),
            waited: std::time::Duration::from_millis(2500),
            in_flight: 3,
        };
        assert_eq!(t.code(), "TIMEOUT");
        assert_eq!(
            t.to_string(),
            "timed out after 2500 ms waiting for READ of 0000000000000001 (3 requests in flight on the connection)"
        );
        assert_eq!(Error::Disconnected("x".into()).code(), "DISCONNECTED");
        assert_eq!(
            Error::InvalidArgument("x".into()).code(),
            "INVALID_ARGUMENT"
        );
    }
}
