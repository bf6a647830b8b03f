// Public value types of the netswap C# client.
using System;
using System.Globalization;

namespace Netswap
{
    /// <summary>A network pointer: the random, non-zero 64-bit name of a record.
    /// Knowing it is the capability to use the record. Shown as 16 hex digits.</summary>
    public struct Pointer : IEquatable<Pointer>
    {
        /// <summary>The raw value (never 0 for a real record).</summary>
        public readonly ulong Value;

        /// <summary>Wraps a raw value.</summary>
        /// <exception cref="ArgumentException">When <paramref name="value"/> is 0.</exception>
        public Pointer(ulong value)
        {
            if (value == 0) throw new ArgumentException("0 is never a valid pointer", "value");
            Value = value;
        }

        /// <summary>16 lowercase hex digits, e.g. "00000000deadbeef".</summary>
        public override string ToString() { return Value.ToString("x16", CultureInfo.InvariantCulture); }

        /// <summary>Parses 1 to 16 hex digits, optionally prefixed with "0x".</summary>
        /// <exception cref="FormatException">When the text is not a valid pointer.</exception>
        public static Pointer Parse(string text)
        {
            Pointer p;
            if (!TryParse(text, out p))
                throw new FormatException("a pointer is 1 to 16 hex digits (not 0), optionally prefixed with 0x: \"" + text + "\"");
            return p;
        }

        /// <summary>Parses like <see cref="Parse"/>; false instead of an exception.</summary>
        public static bool TryParse(string text, out Pointer pointer)
        {
            pointer = default(Pointer);
            if (text == null) return false;
            string digits = text.StartsWith("0x", StringComparison.OrdinalIgnoreCase) ? text.Substring(2) : text;
            if (digits.Length == 0 || digits.Length > 16) return false;
            foreach (char c in digits)
                if (!Uri.IsHexDigit(c)) return false;
            ulong v = ulong.Parse(digits, NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture);
            if (v == 0) return false;
            pointer = new Pointer(v);
            return true;
        }

        /// <inheritdoc/>
        public bool Equals(Pointer other) { return Value == other.Value; }
        /// <inheritdoc/>
        public override bool Equals(object obj) { return obj is Pointer && Equals((Pointer)obj); }
        /// <inheritdoc/>
        public override int GetHashCode() { return Value.GetHashCode(); }
        /// <summary>Equality.</summary>
        public static bool operator ==(Pointer a, Pointer b) { return a.Value == b.Value; }
        /// <summary>Inequality.</summary>
        public static bool operator !=(Pointer a, Pointer b) { return a.Value != b.Value; }
    }

    /// <summary>What identities other than the owner may do with a record.</summary>
    [Flags]
    public enum Access : byte
    {
        /// <summary>Nothing: only the owner may use the record.</summary>
        None = 0,
        /// <summary>Others may read, inspect and watch.</summary>
        Read = 0x01,
        /// <summary>Others may replace and write.</summary>
        Write = 0x02,
        /// <summary>Others may take ownership (which clears this flag).</summary>
        Takeover = 0x04,
    }

    /// <summary>What happened to a watched record.</summary>
    public enum WatchEventKind : byte
    {
        /// <summary>Its data changed.</summary>
        Changed = 1,
        /// <summary>It was deleted or expired; no more events follow.</summary>
        Deleted = 2,
        /// <summary>Its owner changed.</summary>
        OwnerChanged = 3,
        /// <summary>Its access flags changed.</summary>
        AccessChanged = 4,
    }

    /// <summary>One change to a watched record.</summary>
    public struct WatchEvent
    {
        /// <summary>What happened.</summary>
        public readonly WatchEventKind Kind;
        /// <summary>The record.</summary>
        public readonly Pointer Pointer;
        /// <summary>Its version after the event (the last version when deleted).</summary>
        public readonly ulong Version;

        internal WatchEvent(WatchEventKind kind, Pointer pointer, ulong version)
        {
            Kind = kind;
            Pointer = pointer;
            Version = version;
        }

        /// <inheritdoc/>
        public override string ToString() { return Kind + " " + Pointer + " version " + Version; }
    }

    /// <summary>Size, version, access flags and ownership of a record.</summary>
    public struct RecordInfo
    {
        /// <summary>Data size in bytes.</summary>
        public readonly ulong Size;
        /// <summary>Version: 1 at creation, +1 on every write.</summary>
        public readonly ulong Version;
        /// <summary>What other identities may do.</summary>
        public readonly Access Access;
        /// <summary>True when this client's identity owns the record.</summary>
        public readonly bool Owned;

        internal RecordInfo(ulong size, ulong version, Access access, bool owned)
        {
            Size = size;
            Version = version;
            Access = access;
            Owned = owned;
        }
    }

    /// <summary>The server's limits and this client's identity.</summary>
    public sealed class ServerInfo
    {
        /// <summary>Protocol version (1).</summary>
        public byte Protocol { get; internal set; }
        /// <summary>Largest record the server stores.</summary>
        public ulong MaxRecordBytes { get; internal set; }
        /// <summary>Largest request message the server accepts.</summary>
        public ulong MaxMessageBytes { get; internal set; }
        /// <summary>Seconds an orphaned record survives.</summary>
        public uint OrphanGraceSeconds { get; internal set; }
        /// <summary>This client's 32-byte identity (salted hash of its IP address).</summary>
        public byte[] Identity { get; internal set; }
    }

    /// <summary>How to connect.</summary>
    public sealed class ConnectOptions
    {
        /// <summary>Local IP address to connect from (null: any). On one machine 127.0.0.2,
        /// 127.0.0.3, … are different identities.</summary>
        public string LocalAddress { get; set; }
        /// <summary>How long each connection attempt may take.</summary>
        public TimeSpan ConnectTimeout { get; set; }
        /// <summary>How long each call waits for its reply, waiting for a reconnection
        /// included (TimeSpan.Zero: no limit). <see cref="NetswapClient.WithTimeout"/>
        /// makes a handle with another deadline.</summary>
        public TimeSpan RequestTimeout { get; set; }
        /// <summary>What happens when the connection drops.</summary>
        public ReconnectOptions Reconnect { get; set; }
        /// <summary>After this long without a byte from the server, ask it something; no
        /// answer within as long means the connection is dead and it is replaced
        /// (TimeSpan.Zero: never).</summary>
        public TimeSpan Keepalive { get; set; }
        /// <summary>The socket's receive buffer in bytes (SO_RCVBUF; 0, the default: the
        /// kernel's autotuning). A small one (e.g. 262,144) bounds how long a small reply
        /// can wait behind a large one on a LAN, at the cost of throughput over long
        /// round trips.</summary>
        public uint ReceiveBuffer { get; set; }

        /// <summary>Defaults: any local address, 10 s to connect, 30 s per call,
        /// reconnection on, keepalives after 15 s of silence.</summary>
        public ConnectOptions()
        {
            ConnectTimeout = TimeSpan.FromSeconds(10);
            RequestTimeout = TimeSpan.FromSeconds(30);
            Reconnect = new ReconnectOptions();
            Keepalive = TimeSpan.FromSeconds(15);
        }
    }

    /// <summary>Automatic reconnection: exponential backoff with full jitter (attempt n
    /// waits a random time up to min(MaxDelay, InitialDelay × 2^(n−1))), so a thousand
    /// clients of a restarted server do not come back at once. Watches and mirrors are
    /// registered again and tell what changed meanwhile; reads in flight are sent again
    /// once; other calls in flight fail with <see cref="NetswapDisconnectedException"/>
    /// (their outcome is unknown).</summary>
    public sealed class ReconnectOptions
    {
        /// <summary>Reconnect at all (default true).</summary>
        public bool Enabled { get; set; }
        /// <summary>The first backoff window (default 100 ms).</summary>
        public TimeSpan InitialDelay { get; set; }
        /// <summary>The largest backoff window (default 5 s).</summary>
        public TimeSpan MaxDelay { get; set; }
        /// <summary>Failed attempts in a row before the client closes for good (0, the
        /// default: never).</summary>
        public uint MaxAttempts { get; set; }

        /// <summary>The defaults.</summary>
        public ReconnectOptions()
        {
            Enabled = true;
            InitialDelay = TimeSpan.FromMilliseconds(100);
            MaxDelay = TimeSpan.FromSeconds(5);
        }
    }

    /// <summary>Where a client's connection stands.</summary>
    public enum ConnectionState
    {
        /// <summary>Connected.</summary>
        Connected = 0,
        /// <summary>The connection dropped; connecting again (calls wait, up to their
        /// deadline).</summary>
        Reconnecting = 1,
        /// <summary>Closed for good.</summary>
        Closed = 2,
    }

    /// <summary>A change of <see cref="NetswapClient.State"/>.</summary>
    public sealed class ConnectionStateChangedEventArgs : EventArgs
    {
        /// <summary>The new state.</summary>
        public ConnectionState State { get; private set; }
        /// <summary>The reconnection attempt (Reconnecting; else 0).</summary>
        public uint Attempt { get; private set; }
        /// <summary>Why (empty when connected).</summary>
        public string Reason { get; private set; }

        internal ConnectionStateChangedEventArgs(ConnectionState state, uint attempt, string reason)
        {
            State = state;
            Attempt = attempt;
            Reason = reason;
        }

        /// <inheritdoc/>
        public override string ToString() { return State + (Reason.Length > 0 ? ": " + Reason : ""); }
    }

    /// <summary>An exception thrown by a watch or mirror handler (or a StateChanged
    /// handler); see <see cref="NetswapClient.HandlerFailed"/>.</summary>
    public sealed class HandlerFailedEventArgs : EventArgs
    {
        /// <summary>What the handler threw.</summary>
        public Exception Exception { get; private set; }
        /// <summary>The record whose handler threw (null for a StateChanged handler).</summary>
        public Pointer? Pointer { get; private set; }

        internal HandlerFailedEventArgs(Exception e, Pointer? pointer)
        {
            Exception = e;
            Pointer = pointer;
        }
    }

    /// <summary>What happened to a <see cref="Mirror"/>'s copy.</summary>
    public enum MirrorEventKind : byte
    {
        /// <summary>A change (or several merged) was applied; <see cref="MirrorEvent.Changed"/>
        /// lists the ranges.</summary>
        Updated = 1,
        /// <summary>The copy was replaced by a fresh one (after a gap or a reconnect).</summary>
        Reloaded = 2,
        /// <summary>The owner changed.</summary>
        OwnerChanged = 3,
        /// <summary>The access flags changed.</summary>
        AccessChanged = 4,
        /// <summary>The record is gone; the copy keeps its last bytes; no more events.</summary>
        Deleted = 5,
    }

    /// <summary>A range of bytes that changed in a mirror's copy.</summary>
    public struct ChangedRange
    {
        /// <summary>Where.</summary>
        public readonly ulong Offset;
        /// <summary>How many bytes.</summary>
        public readonly int Length;

        internal ChangedRange(ulong offset, int length)
        {
            Offset = offset;
            Length = length;
        }

        /// <inheritdoc/>
        public override string ToString() { return Offset + "+" + Length; }
    }

    /// <summary>One event of a <see cref="Mirror"/>, with the copy exactly as it was right
    /// after it.</summary>
    public sealed class MirrorEvent : EventArgs
    {
        /// <summary>What happened.</summary>
        public MirrorEventKind Kind { get; private set; }
        /// <summary>The copy's version after it.</summary>
        public ulong Version { get; private set; }
        /// <summary>The bytes after it (an immutable snapshot).</summary>
        public ReadOnlyMemory<byte> Data { get; private set; }
        /// <summary>Updated: the ranges that changed.</summary>
        public ChangedRange[] Changed { get; private set; }

        internal MirrorEvent(MirrorEventKind kind, ulong version, ReadOnlyMemory<byte> data, ChangedRange[] changed)
        {
            Kind = kind;
            Version = version;
            Data = data;
            Changed = changed;
        }

        /// <inheritdoc/>
        public override string ToString() { return Kind + " version " + Version + " (" + Data.Length + " bytes)"; }
    }
}
