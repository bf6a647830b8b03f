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
        /// <summary>The call was cancelled before it completed.</summary>
        Cancelled = 106,
    }

    /// <summary>Base of every netswap error. <see cref="Code"/> says which it is (each
    /// code also has its own subclass, all named <c>Netswap…Exception</c>);
    /// <see cref="Exception.Message"/> is the server's (or the library's) explanation,
    /// e.g. "access violation: the record's READ bit is not set".</summary>
    public class NetswapException : Exception
    {
        /// <summary>The result code.</summary>
        public ResultCode Code { get; private set; }

        /// <summary>An exception for <paramref name="code"/> with <paramref name="message"/>.</summary>
        public NetswapException(ResultCode code, string message) : base(message)
        {
            Code = code;
        }

        internal static NetswapException For(ResultCode code, string message, ulong currentVersion)
        {
            switch (code)
            {
                case ResultCode.AccessViolation: return new NetswapAccessViolationException(message);
                case ResultCode.AddressFault: return new NetswapAddressFaultException(message);
                case ResultCode.Malformed: return new NetswapMalformedException(message);
                case ResultCode.TooLarge: return new NetswapTooLargeException(message);
                case ResultCode.QuotaExceeded: return new NetswapQuotaExceededException(message);
                case ResultCode.ProtocolError: return new NetswapProtocolErrorException(message);
                case ResultCode.Busy: return new NetswapBusyException(message);
                case ResultCode.IO: return new NetswapIOException(message);
                case ResultCode.Timeout: return new NetswapTimeoutException(message);
                case ResultCode.Disconnected: return new NetswapDisconnectedException(message);
                case ResultCode.BadReply: return new NetswapBadReplyException(message);
                case ResultCode.Conflict: return new NetswapConflictException(message, currentVersion);
                default: return new NetswapException(code, message);
            }
        }
    }

    /// <summary>The caller may not do this to this record (ACCESS_VIOLATION).</summary>
    public class NetswapAccessViolationException : NetswapException
    {
        /// <summary>Creates it.</summary>
        public NetswapAccessViolationException(string message) : base(ResultCode.AccessViolation, message) { }
    }

    /// <summary>No such record, or a range outside it (ADDRESS_FAULT).</summary>
    public class NetswapAddressFaultException : NetswapException
    {
        /// <summary>Creates it.</summary>
        public NetswapAddressFaultException(string message) : base(ResultCode.AddressFault, message) { }
    }

    /// <summary>The server found the request malformed (MALFORMED).</summary>
    public class NetswapMalformedException : NetswapException
    {
        /// <summary>Creates it.</summary>
        public NetswapMalformedException(string message) : base(ResultCode.Malformed, message) { }
    }

    /// <summary>Over the server's message or record size limit (TOO_LARGE).</summary>
    public class NetswapTooLargeException : NetswapException
    {
        /// <summary>Creates it.</summary>
        public NetswapTooLargeException(string message) : base(ResultCode.TooLarge, message) { }
    }

    /// <summary>Over the owner's record-count or byte quota (QUOTA_EXCEEDED).</summary>
    public class NetswapQuotaExceededException : NetswapException
    {
        /// <summary>Creates it.</summary>
        public NetswapQuotaExceededException(string message) : base(ResultCode.QuotaExceeded, message) { }
    }

    /// <summary>The server found the framing broken and closed the connection (PROTOCOL_ERROR).</summary>
    public class NetswapProtocolErrorException : NetswapException
    {
        /// <summary>Creates it.</summary>
        public NetswapProtocolErrorException(string message) : base(ResultCode.ProtocolError, message) { }
    }

    /// <summary>A server limit on in-flight work; retry later (BUSY).</summary>
    public class NetswapBusyException : NetswapException
    {
        /// <summary>Creates it.</summary>
        public NetswapBusyException(string message) : base(ResultCode.Busy, message) { }
    }

    /// <summary>Connecting, reading or writing failed.</summary>
    public class NetswapIOException : NetswapException
    {
        /// <summary>Creates it.</summary>
        public NetswapIOException(string message) : base(ResultCode.IO, message) { }
    }

    /// <summary>No reply within the call's deadline; the message says what it waited for, how long, and how many requests were in flight.</summary>
    public class NetswapTimeoutException : NetswapException
    {
        /// <summary>Creates it.</summary>
        public NetswapTimeoutException(string message) : base(ResultCode.Timeout, message) { }
    }

    /// <summary>The client is closed, or the connection dropped while a request that is not a read was in flight: its outcome is unknown (it is never re-sent blindly).</summary>
    public class NetswapDisconnectedException : NetswapException
    {
        /// <summary>Creates it.</summary>
        public NetswapDisconnectedException(string message) : base(ResultCode.Disconnected, message) { }
    }

    /// <summary>The server sent something the client cannot understand.</summary>
    public class NetswapBadReplyException : NetswapException
    {
        /// <summary>Creates it.</summary>
        public NetswapBadReplyException(string message) : base(ResultCode.BadReply, message) { }
    }

    /// <summary>ReplaceIf found another version (CONFLICT).</summary>
    public class NetswapConflictException : NetswapException
    {
        /// <summary>The record's current version.</summary>
        public ulong CurrentVersion { get; private set; }
        /// <summary>Creates it.</summary>
        public NetswapConflictException(string message, ulong currentVersion) : base(ResultCode.Conflict, message)
        {
            CurrentVersion = currentVersion;
        }
    }
}
