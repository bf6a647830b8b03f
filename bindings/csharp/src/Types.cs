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
        /// <summary>How long connecting may take.</summary>
        public TimeSpan ConnectTimeout { get; set; }
        /// <summary>How long each call waits for its reply (TimeSpan.Zero: no limit).</summary>
        public TimeSpan RequestTimeout { get; set; }

        /// <summary>Defaults: any local address, 10 s to connect, 30 s per call.</summary>
        public ConnectOptions()
        {
            ConnectTimeout = TimeSpan.FromSeconds(10);
            RequestTimeout = TimeSpan.FromSeconds(30);
        }
    }
}
