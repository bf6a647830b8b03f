//! Small value types shared by requests, replies and the store.

use std::fmt;
use std::str::FromStr;

/// A network pointer: the random, non-zero 64-bit name of a record.
///
/// Knowing a pointer is the capability to use the record, so pointers are drawn from
/// a cryptographic RNG and never sequential. Displayed and parsed as 16 hex digits
/// (an optional `0x` prefix is accepted when parsing).
///
/// ```
/// use netswap_proto::Pointer;
/// let p: Pointer = "0x00000000deadbeef".parse().unwrap();
/// assert_eq!(p.get(), 0xdead_beef);
/// assert_eq!(p.to_string(), "00000000deadbeef");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pointer(u64);

impl Pointer {
    /// Wraps a raw value; `None` for 0, which is never a valid pointer.
    pub const fn new(raw: u64) -> Option<Pointer> {
        if raw == 0 { None } else { Some(Pointer(raw)) }
    }
    /// The raw 64-bit value.
    pub const fn get(self) -> u64 {
        self.0
    }
    /// The 8 big-endian bytes as sent on the wire.
    pub const fn to_be_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }
}

impl fmt::Display for Pointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Hex, like [`Display`](fmt::Display) (pointers are shown as hex everywhere):
/// `Pointer(00000000deadbeef)`.
impl fmt::Debug for Pointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pointer({:016x})", self.0)
    }
}

impl fmt::LowerHex for Pointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

/// Why a string is not a [`Pointer`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParsePointerError {
    /// Not 1 to 16 hex digits.
    #[error("a pointer is 1 to 16 hex digits, optionally prefixed with 0x")]
    Syntax,
    /// The value 0.
    #[error("0 is never a valid pointer")]
    Zero,
}

impl FromStr for Pointer {
    type Err = ParsePointerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s
            .strip_prefix("0x")
            .or_else(|| s.strip_prefix("0X"))
            .unwrap_or(s);
        if digits.is_empty() || digits.len() > 16 || !digits.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(ParsePointerError::Syntax);
        }
        let raw = u64::from_str_radix(digits, 16).map_err(|_| ParsePointerError::Syntax)?;
        Pointer::new(raw).ok_or(ParsePointerError::Zero)
    }
}

bitflags::bitflags! {
    /// What clients other than the owner may do with a record. The owner may always
    /// do everything. Bits other than these three are reserved (MALFORMED if set).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct Access: u8 {
        /// Others may READ, INFO and WATCH.
        const READ = 0x01;
        /// Others may REPLACE, WRITE_AT and REPLACE_IF.
        const WRITE = 0x02;
        /// Others may TAKEOVER (which clears this bit).
        const TAKEOVER = 0x04;
    }
}

impl Access {
    /// Parses access bits from a wire `ARG`, refusing reserved bits.
    pub fn from_wire(arg: u8) -> Option<Access> {
        Access::from_bits(arg)
    }
}

/// A record's version: 1 at creation, +1 on every change of its data.
pub type Version = u64;

/// Request opcodes (the `OP` byte of a request).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// Create a record.
    Create = 0x00,
    /// Change a record's access bits.
    SetAccess = 0x01,
    /// Read a record or a range of it.
    Read = 0x02,
    /// Replace a record's data.
    Replace = 0x03,
    /// Write bytes at an offset.
    WriteAt = 0x04,
    /// Delete a record.
    Delete = 0x05,
    /// Take ownership of a record whose TAKEOVER bit is set.
    Takeover = 0x06,
    /// Hand a record to another identity.
    Transfer = 0x07,
    /// Size, version, access and ownership of a record.
    Info = 0x08,
    /// Server parameters and the caller's identity.
    Hello = 0x09,
    /// Subscribe to changes of a record.
    Watch = 0x0A,
    /// End a subscription.
    Unwatch = 0x0B,
    /// Replace only if the version matches (compare-and-swap).
    ReplaceIf = 0x0C,
    /// The server's counters.
    Stats = 0x0D,
}

impl Opcode {
    /// Every opcode, in wire order.
    pub const ALL: [Opcode; 14] = [
        Opcode::Create,
        Opcode::SetAccess,
        Opcode::Read,
        Opcode::Replace,
        Opcode::WriteAt,
        Opcode::Delete,
        Opcode::Takeover,
        Opcode::Transfer,
        Opcode::Info,
        Opcode::Hello,
        Opcode::Watch,
        Opcode::Unwatch,
        Opcode::ReplaceIf,
        Opcode::Stats,
    ];

    /// The opcode for a wire byte, if it is one.
    pub fn from_u8(b: u8) -> Option<Opcode> {
        Opcode::ALL.get(b as usize).copied()
    }

    /// The upper-case protocol name, e.g. `"WRITE_AT"`.
    pub fn name(self) -> &'static str {
        match self {
            Opcode::Create => "CREATE",
            Opcode::SetAccess => "SET_ACCESS",
            Opcode::Read => "READ",
            Opcode::Replace => "REPLACE",
            Opcode::WriteAt => "WRITE_AT",
            Opcode::Delete => "DELETE",
            Opcode::Takeover => "TAKEOVER",
            Opcode::Transfer => "TRANSFER",
            Opcode::Info => "INFO",
            Opcode::Hello => "HELLO",
            Opcode::Watch => "WATCH",
            Opcode::Unwatch => "UNWATCH",
            Opcode::ReplaceIf => "REPLACE_IF",
            Opcode::Stats => "STATS",
        }
    }
}

/// Reply status codes (the `OP` byte of a reply).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    /// Success; payload depends on the request.
    Ok = 0x00,
    /// The caller may not do this to this record.
    AccessViolation = 0x01,
    /// No such record, or a range outside it.
    AddressFault = 0x02,
    /// Success of READ: the bytes.
    Data = 0x03,
    /// The request is not well formed.
    Malformed = 0x04,
    /// Over the server's message or record size limit.
    TooLarge = 0x05,
    /// Over the identity's record-count or byte quota.
    QuotaExceeded = 0x06,
    /// REPLACE_IF saw another version; payload is the current one.
    Conflict = 0x07,
    /// Server push for a watch.
    Notify = 0x08,
    /// The framing is broken; the server closes the connection.
    ProtocolError = 0x09,
    /// A server limit on in-flight work; retry later.
    Busy = 0x0A,
}

impl Status {
    /// Every status, in wire order.
    pub const ALL: [Status; 11] = [
        Status::Ok,
        Status::AccessViolation,
        Status::AddressFault,
        Status::Data,
        Status::Malformed,
        Status::TooLarge,
        Status::QuotaExceeded,
        Status::Conflict,
        Status::Notify,
        Status::ProtocolError,
        Status::Busy,
    ];

    /// The status for a wire byte, if it is one.
    pub fn from_u8(b: u8) -> Option<Status> {
        Status::ALL.get(b as usize).copied()
    }

    /// The upper-case protocol name, e.g. `"ACCESS_VIOLATION"`.
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::AccessViolation => "ACCESS_VIOLATION",
            Status::AddressFault => "ADDRESS_FAULT",
            Status::Data => "DATA",
            Status::Malformed => "MALFORMED",
            Status::TooLarge => "TOO_LARGE",
            Status::QuotaExceeded => "QUOTA_EXCEEDED",
            Status::Conflict => "CONFLICT",
            Status::Notify => "NOTIFY",
            Status::ProtocolError => "PROTOCOL_ERROR",
            Status::Busy => "BUSY",
        }
    }

    /// True for the statuses whose payload is a UTF-8 reason.
    pub fn carries_reason(self) -> bool {
        matches!(
            self,
            Status::AccessViolation
                | Status::AddressFault
                | Status::Malformed
                | Status::TooLarge
                | Status::QuotaExceeded
                | Status::ProtocolError
                | Status::Busy
        )
    }
}

/// The event a NOTIFY carries in its `ARG`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Event {
    /// The record's data changed (payload: the new version).
    Changed = 1,
    /// The record was deleted or expired; the watch has ended.
    Deleted = 2,
    /// The record has a new owner.
    OwnerChanged = 3,
    /// The record's access bits changed.
    AccessChanged = 4,
}

impl Event {
    /// The event for a wire byte, if it is one.
    pub fn from_u8(b: u8) -> Option<Event> {
        match b {
            1 => Some(Event::Changed),
            2 => Some(Event::Deleted),
            3 => Some(Event::OwnerChanged),
            4 => Some(Event::AccessChanged),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_debug_is_hex_like_display() {
        let p = Pointer::new(0xdead_beef).unwrap();
        assert_eq!(format!("{p:?}"), "Pointer(00000000deadbeef)");
        assert_eq!(format!("{:?}", Some(p)), "Some(Pointer(00000000deadbeef))");
    }

    #[test]
    fn pointer_parse_and_display() {
        assert_eq!("1".parse::<Pointer>().unwrap().get(), 1);
        assert_eq!(
            "FFFFFFFFFFFFFFFF".parse::<Pointer>().unwrap().get(),
            u64::MAX
        );
        assert_eq!("0".parse::<Pointer>(), Err(ParsePointerError::Zero));
        assert_eq!("".parse::<Pointer>(), Err(ParsePointerError::Syntax));
        assert_eq!("0x".parse::<Pointer>(), Err(ParsePointerError::Syntax));
        assert_eq!(
            "10000000000000000".parse::<Pointer>(),
            Err(ParsePointerError::Syntax)
        );
        assert_eq!("+1".parse::<Pointer>(), Err(ParsePointerError::Syntax));
        assert_eq!(Pointer::new(0xab).unwrap().to_string(), "00000000000000ab");
    }

    #[test]
    fn codes_round_trip() {
        for op in Opcode::ALL {
            assert_eq!(Opcode::from_u8(op as u8), Some(op));
        }
        assert_eq!(Opcode::from_u8(0x0E), None);
        for s in Status::ALL {
            assert_eq!(Status::from_u8(s as u8), Some(s));
        }
        assert_eq!(Status::from_u8(0x0B), None);
        assert_eq!(Access::from_wire(0x08), None);
        assert_eq!(Access::from_wire(0x07), Some(Access::all()));
    }
}
