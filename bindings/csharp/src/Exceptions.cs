// Exceptions: one type per result code, all deriving from NetswapException.
using System;

namespace Netswap
{
    /// <summary>The outcome of a native call (mirrors netswap_result).</summary>
    public enum ResultCode : uint
    {
        /// <summary>Success.</summary>
        Ok = 0,
        /// <summary>The caller may not do this to this record.</summary>
        AccessViolation = 1,
        /// <summary>No such record, or a range outside it.</summary>
        AddressFault = 2,
        /// <summary>The server found the request malformed.</summary>
        Malformed = 4,
        /// <summary>Over the server's message or record size limit.</summary>
        TooLarge = 5,
        /// <summary>Over the owner's record-count or byte quota.</summary>
        QuotaExceeded = 6,
        /// <summary>ReplaceIf found another version.</summary>
        Conflict = 7,
        /// <summary>The server found the framing broken.</summary>
        ProtocolError = 9,
        /// <summary>A server limit on in-flight work; retry later.</summary>
        Busy = 10,
        /// <summary>Connecting, reading or writing failed.</summary>
        IO = 100,
        /// <summary>No reply within the timeout.</summary>
        Timeout = 101,
        /// <summary>The connection is closed.</summary>
        Disconnected = 102,
        /// <summary>The server sent something the client cannot understand.</summary>
        BadReply = 103,
        /// <summary>An invalid argument.</summary>
        InvalidArgument = 104,
        /// <summary>An internal error in the native library.</summary>
        Panic = 105,
    }

    /// <summary>Base of every netswap error; <see cref="Reason"/> is the server's (or the
    /// library's) short explanation.</summary>
    public class NetswapException : Exception
    {
        /// <summary>The result code.</summary>
        public ResultCode Code { get; private set; }
        /// <summary>The short reason.</summary>
        public string Reason { get; private set; }

        /// <summary>An exception for <paramref name="code"/>.</summary>
        public NetswapException(ResultCode code, string reason)
            : base(code + ": " + reason)
        {
            Code = code;
            Reason = reason;
        }

        internal static NetswapException For(ResultCode code, string reason, ulong currentVersion)
        {
            switch (code)
            {
                case ResultCode.AccessViolation: return new NetswapAccessViolationException(reason);
                case ResultCode.AddressFault: return new AddressFaultException(reason);
                case ResultCode.Malformed: return new MalformedRequestException(reason);
                case ResultCode.TooLarge: return new TooLargeException(reason);
                case ResultCode.QuotaExceeded: return new QuotaExceededException(reason);
                case ResultCode.Conflict: return new ConflictException(reason, currentVersion);
                case ResultCode.ProtocolError: return new ProtocolErrorException(reason);
                case ResultCode.Busy: return new BusyException(reason);
                case ResultCode.IO: return new NetswapIOException(reason);
                case ResultCode.Timeout: return new NetswapTimeoutException(reason);
                case ResultCode.Disconnected: return new DisconnectedException(reason);
                case ResultCode.BadReply: return new BadReplyException(reason);
                default: return new NetswapException(code, reason);
            }
        }
    }

    /// <summary>The caller may not do this to this record (ACCESS_VIOLATION).</summary>
    public class NetswapAccessViolationException : NetswapException
    {
        /// <summary>Creates it.</summary>
        public NetswapAccessViolationException(string reason) : base(ResultCode.AccessViolation, reason) { }
    }

    /// <summary>No such record, or a range outside it (ADDRESS_FAULT).</summary>
    public class AddressFaultException : NetswapException
    {
        /// <summary>Creates it.</summary>
        public AddressFaultException(string reason) : base(ResultCode.AddressFault, reason) { }
    }

    /// <summary>The server found the request malformed (MALFORMED).</summary>
    public class MalformedRequestException : NetswapException
    {
        /// <summary>Creates it.</summary>
        public MalformedRequestException(string reason) : base(ResultCode.Malformed, reason) { }
    }

    /// <summary>Over the server's message or record size limit (TOO_LARGE).</summary>
    public class TooLargeException : NetswapException
    {
        /// <summary>Creates it.</summary>
        public TooLargeException(string reason) : base(ResultCode.TooLarge, reason) { }
    }

    /// <summary>Over the owner's record-count or byte quota (QUOTA_EXCEEDED).</summary>
    public class QuotaExceededException : NetswapException
    {
        /// <summary>Creates it.</summary>
        public QuotaExceededException(string reason) : base(ResultCode.QuotaExceeded, reason) { }
    }

    /// <summary>ReplaceIf found another version (CONFLICT).</summary>
    public class ConflictException : NetswapException
    {
        /// <summary>The record's current version.</summary>
        public ulong CurrentVersion { get; private set; }
        /// <summary>Creates it.</summary>
        public ConflictException(string reason, ulong currentVersion) : base(ResultCode.Conflict, reason)
        {
            CurrentVersion = currentVersion;
        }
    }

    /// <summary>The server found the framing broken and closed the connection (PROTOCOL_ERROR).</summary>
    public class ProtocolErrorException : NetswapException
    {
        /// <summary>Creates it.</summary>
        public ProtocolErrorException(string reason) : base(ResultCode.ProtocolError, reason) { }
    }

    /// <summary>A server limit on in-flight work; retry later (BUSY).</summary>
    public class BusyException : NetswapException
    {
        /// <summary>Creates it.</summary>
        public BusyException(string reason) : base(ResultCode.Busy, reason) { }
    }

    /// <summary>Connecting, reading or writing failed.</summary>
    public class NetswapIOException : NetswapException
    {
        /// <summary>Creates it.</summary>
        public NetswapIOException(string reason) : base(ResultCode.IO, reason) { }
    }

    /// <summary>No reply within the request timeout.</summary>
    public class NetswapTimeoutException : NetswapException
    {
        /// <summary>Creates it.</summary>
        public NetswapTimeoutException(string reason) : base(ResultCode.Timeout, reason) { }
    }

    /// <summary>The connection is closed.</summary>
    public class DisconnectedException : NetswapException
    {
        /// <summary>Creates it.</summary>
        public DisconnectedException(string reason) : base(ResultCode.Disconnected, reason) { }
    }

    /// <summary>The server sent something the client cannot understand.</summary>
    public class BadReplyException : NetswapException
    {
        /// <summary>Creates it.</summary>
        public BadReplyException(string reason) : base(ResultCode.BadReply, reason) { }
    }
}
