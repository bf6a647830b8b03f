// NUnit tests of the C# client against a real server, whose address is in
// NETSWAP_TEST_SERVER (started by bindings/csharp/test.sh with
// --max-record-bytes 1600000 --quota-bytes 2000000). Identities: 127.0.0.2, .3, .4, .9.
using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Net;
using System.Text;
using System.Text.RegularExpressions;
using System.Threading;
using System.Threading.Tasks;
using NUnit.Framework;

namespace Netswap.Tests
{
    [TestFixture]
    public class NetswapClientTests
    {
        static string Server { get { return Environment.GetEnvironmentVariable("NETSWAP_TEST_SERVER") ?? "127.0.0.1:7420"; } }

        static NetswapClient From(string local)
        {
            return NetswapClient.Connect(Server, new ConnectOptions { LocalAddress = local });
        }

        static byte[] B(string s) { return Encoding.UTF8.GetBytes(s); }
        static string S(byte[] b) { return Encoding.UTF8.GetString(b); }

        [Test]
        public void EveryOperation()
        {
            using (var a = From("127.0.0.2"))
            using (var b = From("127.0.0.3"))
            {
                Assert.AreEqual(1, a.ServerInfo.Protocol);
                Assert.AreEqual(1600000UL, a.ServerInfo.MaxRecordBytes);
                Assert.AreEqual(32, a.Identity.Length);
                Assert.IsFalse(a.Identity.SequenceEqual(b.Identity), "different addresses, different identities");

                var p = a.Create(B("hello world"), Access.Read);
                Assert.AreEqual("hello world", S(b.Read(p)));
                Assert.AreEqual("world", S(a.ReadRange(p, 6, 100)));
                Assert.AreEqual(2UL, a.WriteAt(p, 11, B("!")));
                Assert.AreEqual(3UL, a.Replace(p, B("v3")));
                Assert.AreEqual(4UL, a.ReplaceIf(p, 3, B("v4")));
                var info = b.Info(p);
                Assert.AreEqual(2UL, info.Size);
                Assert.AreEqual(4UL, info.Version);
                Assert.AreEqual(Access.Read, info.Access);
                Assert.IsFalse(info.Owned);

                a.SetAccess(p, Access.Read | Access.Takeover);
                b.Takeover(p);
                Assert.IsTrue(b.Info(p).Owned);
                Assert.AreEqual(Access.Read, b.Info(p).Access, "takeover clears the flag");
                b.Transfer(p, IPAddress.Parse("127.0.0.2"));
                Assert.IsTrue(a.Info(p).Owned);
                a.Transfer(p, b.Identity);
                Assert.IsTrue(b.Info(p).Owned);
                b.Delete(p);
                Assert.Throws<NetswapAddressFaultException>(() => b.Info(p));

                var empty = a.Create(new byte[0]);
                Assert.AreEqual(0, a.Read(empty).Length);
                var part = a.Create(B("xxabcxx"), 2, 3);
                Assert.AreEqual("abc", S(a.Read(part)));
            }
        }

        [Test]
        public void EachErrorIsItsOwnExceptionWithTheServersReason()
        {
            using (var a = From("127.0.0.2"))
            using (var b = From("127.0.0.3"))
            {
                var p = a.Create(B("secret"));
                var av = Assert.Throws<NetswapAccessViolationException>(() => b.Read(p));
                Assert.AreEqual(ResultCode.AccessViolation, av.Code);
                // The library's message, once: not "AccessViolation: access violation: …".
                Assert.AreEqual("access violation: the record's READ bit is not set", av.Message);
                Assert.IsInstanceOf<NetswapException>(av);

                var af = Assert.Throws<NetswapAddressFaultException>(() => a.ReadRange(p, 100, 1));
                StringAssert.Contains("past the end", af.Message);
                Assert.Throws<NetswapAddressFaultException>(() => a.Read(new Pointer(0x1234)));

                var conflict = Assert.Throws<NetswapConflictException>(() => a.ReplaceIf(p, 9, B("x")));
                Assert.AreEqual(1UL, conflict.CurrentVersion);

                var tl = Assert.Throws<NetswapTooLargeException>(() => a.Create(new byte[1600001]));
                StringAssert.Contains("1600000", tl.Message);

                Assert.Throws<ArgumentException>(() => new Pointer(0));
                Assert.Throws<ArgumentNullException>(() => a.Create(null));
                Assert.Throws<ArgumentOutOfRangeException>(() => a.Create(new byte[2], 1, 5));
            }
            // Quota: 2,000,000 bytes per identity.
            using (var q = From("127.0.0.9"))
            {
                var big = q.Create(new byte[1500000]);
                var qe = Assert.Throws<NetswapQuotaExceededException>(() => q.Create(new byte[1500000]));
                StringAssert.Contains("quota", qe.Message);
                q.Delete(big);
            }
            // No server: an I/O error.
            var io = Assert.Throws<NetswapIOException>(() => NetswapClient.Connect("127.0.0.1:1"));
            Assert.AreEqual(ResultCode.IO, io.Code);
        }

        [Test]
        public void EveryResultCodeHasItsExceptionType()
        {
            var expected = new Dictionary<ResultCode, Type>
            {
                { ResultCode.AccessViolation, typeof(NetswapAccessViolationException) },
                { ResultCode.AddressFault, typeof(NetswapAddressFaultException) },
                { ResultCode.Malformed, typeof(NetswapMalformedException) },
                { ResultCode.TooLarge, typeof(NetswapTooLargeException) },
                { ResultCode.QuotaExceeded, typeof(NetswapQuotaExceededException) },
                { ResultCode.Conflict, typeof(NetswapConflictException) },
                { ResultCode.ProtocolError, typeof(NetswapProtocolErrorException) },
                { ResultCode.Busy, typeof(NetswapBusyException) },
                { ResultCode.IO, typeof(NetswapIOException) },
                { ResultCode.Timeout, typeof(NetswapTimeoutException) },
                { ResultCode.Disconnected, typeof(NetswapDisconnectedException) },
                { ResultCode.BadReply, typeof(NetswapBadReplyException) },
                { ResultCode.Panic, typeof(NetswapException) },
                { ResultCode.Cancelled, typeof(NetswapException) },
            };
            foreach (var kv in expected)
            {
                var e = NetswapException.For(kv.Key, "why", 7);
                Assert.AreEqual(kv.Value, e.GetType(), kv.Key.ToString());
                Assert.AreEqual(kv.Key, e.Code);
                Assert.AreEqual("why", e.Message);
                StringAssert.StartsWith("Netswap", e.GetType().Name, "one naming rule for every exception");
            }
            Assert.AreEqual(7UL, ((NetswapConflictException)NetswapException.For(ResultCode.Conflict, "", 7)).CurrentVersion);
            // The native codes are the same numbers.
            foreach (ResultCode code in Enum.GetValues(typeof(ResultCode)))
                Assert.AreEqual(code.ToString().ToUpperInvariant(), ((Netswap.Native.netswap_result)code).ToString().Replace("NETSWAP_", "").Replace("_", ""));
            // And the same numbers as the protocol's statuses in the test vectors.
            var root = Environment.GetEnvironmentVariable("NETSWAP_VECTORS") ?? "../../tests/vectors";
            var replies = File.ReadAllText(Path.Combine(root, "replies.json"));
            var statuses = 0;
            foreach (Match m in Regex.Matches(replies, "\"status\": (\\d+),\\s*\"status_name\": \"([A-Z_]+)\""))
            {
                var name = m.Groups[2].Value.Replace("_", "");
                ResultCode code;
                if (!Enum.TryParse(name, true, out code)) continue; // OK, DATA and NOTIFY are not errors
                Assert.AreEqual(int.Parse(m.Groups[1].Value), (int)code, name);
                statuses++;
            }
            Assert.GreaterOrEqual(statuses, 4);
        }

        [Test]
        public void ASmallReceiveBufferStillReadsALargeRecordWhole()
        {
            using (var a = NetswapClient.Connect(Server, new ConnectOptions { LocalAddress = "127.0.0.4", ReceiveBuffer = 65536 }))
            {
                var big = new byte[1500000];
                for (int i = 0; i < big.Length; i++) big[i] = (byte)(i % 253);
                var p = a.Create(big);
                CollectionAssert.AreEqual(big, a.Read(p));
                a.Delete(p);
            }
        }

        [Test]
        public void AsyncForms()
        {
            using (var a = NetswapClient.ConnectAsync(Server, new ConnectOptions { LocalAddress = "127.0.0.2" }).Result)
            {
                var p = a.CreateAsync(B("async"), Access.Read).Result;
                Assert.AreEqual("async", S(a.ReadAsync(p).Result));
                Assert.AreEqual(2UL, a.ReplaceAsync(p, B("two")).Result);
                Assert.AreEqual(3UL, a.WriteAtAsync(p, 3, B("!")).Result);
                Assert.AreEqual("two!", S(a.ReadRangeAsync(p, 0, 10).Result));
                Assert.AreEqual(4UL, a.ReplaceIfAsync(p, 3, B("four")).Result);
                Assert.AreEqual(4UL, a.InfoAsync(p).Result.Version);
                Assert.AreEqual(1, a.HelloAsync().Result.Protocol);
                a.SetAccessAsync(p, Access.Takeover).Wait();
                a.TakeoverAsync(p).Wait();
                a.TransferAsync(p, a.Identity).Wait();
                var failed = Assert.Throws<AggregateException>(() => a.ReplaceIfAsync(p, 1, B("x")).Wait());
                Assert.IsInstanceOf<NetswapConflictException>(failed.InnerException);
                a.DeleteAsync(p).Wait();
                // Many at once.
                var tasks = Enumerable.Range(0, 50).Select(i => a.CreateAsync(B("n" + i))).ToArray();
                Task.WaitAll(tasks);
                Assert.AreEqual(50, tasks.Select(t => t.Result).Distinct().Count());
                foreach (var t in tasks) a.Delete(t.Result);
            }
        }

        [Test]
        public void WatchDeliversEventsInOrderAndStopsOnDispose()
        {
            using (var a = From("127.0.0.2"))
            using (var b = From("127.0.0.3"))
            {
                var p = a.Create(B("v1"), Access.Read);
                var events = new List<WatchEvent>();
                var got = new SemaphoreSlim(0);
                var w = b.Watch(p, e =>
                {
                    lock (events) events.Add(e);
                    // The handler runs on the thread pool and may use the client.
                    b.Info(p);
                    got.Release();
                });
                Assert.AreEqual(p, w.Pointer);
                a.Replace(p, B("v2"));
                a.Replace(p, B("v3"));
                a.SetAccess(p, Access.Read | Access.Write);
                for (int i = 0; i < 3; i++) Assert.IsTrue(got.Wait(10000), "event " + i);
                lock (events)
                {
                    Assert.AreEqual(WatchEventKind.Changed, events[0].Kind);
                    Assert.AreEqual(2UL, events[0].Version);
                    Assert.AreEqual(3UL, events[1].Version);
                    Assert.AreEqual(WatchEventKind.AccessChanged, events[2].Kind);
                }
                w.Dispose();
                w.Dispose();
                a.Replace(p, B("v4"));
                Assert.IsFalse(got.Wait(300), "no event after Dispose");

                // Collections while a watch is active do not break the callback.
                var deleted = new ManualResetEventSlim();
                using (b.Watch(p, e => { if (e.Kind == WatchEventKind.Deleted) deleted.Set(); }))
                {
                    GC.Collect();
                    GC.WaitForPendingFinalizers();
                    a.Delete(p);
                    Assert.IsTrue(deleted.Wait(10000));
                }
            }
        }

        [Test]
        public void DisposeSemantics()
        {
            var a = From("127.0.0.2");
            var p = a.Create(B("x"));
            var w = a.Watch(p, e => { });
            a.Dispose();
            a.Dispose();
            w.Dispose();
            Assert.Throws<ObjectDisposedException>(() => a.Read(p));
            Assert.Throws<ObjectDisposedException>(() => a.Hello());
        }

        [Test]
        public void SeveralThreadsShareOneClient()
        {
            using (var a = From("127.0.0.2"))
            {
                var shared = a.Create(B("0"), Access.Read | Access.Write);
                var errors = 0;
                var threads = Enumerable.Range(0, 4).Select(t => new Thread(() =>
                {
                    try
                    {
                        for (int i = 0; i < 100; i++)
                        {
                            var text = "thread " + t + " item " + i;
                            var p = a.Create(B(text));
                            if (S(a.Read(p)) != text) Interlocked.Increment(ref errors);
                            a.Delete(p);
                            a.WriteAt(shared, 0, B("x"));
                        }
                    }
                    catch (Exception) { Interlocked.Increment(ref errors); }
                })).ToList();
                threads.ForEach(t => t.Start());
                threads.ForEach(t => t.Join());
                Assert.AreEqual(0, errors);
                Assert.AreEqual(401UL, a.Info(shared).Version);
                a.Delete(shared);
            }
        }

        [Test]
        public void PointerTextMatchesTheVectors()
        {
            var p = Pointer.Parse("0x00000000DEADBEEF");
            Assert.AreEqual(0xdeadbeefUL, p.Value);
            Assert.AreEqual("00000000deadbeef", p.ToString());
            Pointer q;
            Assert.IsFalse(Pointer.TryParse("0", out q));
            Assert.IsFalse(Pointer.TryParse("12345678901234567", out q));
            Assert.IsFalse(Pointer.TryParse("xyz", out q));
            Assert.Throws<FormatException>(() => Pointer.Parse(""));
            var root = Environment.GetEnvironmentVariable("NETSWAP_VECTORS") ?? "../../tests/vectors";
            var json = File.ReadAllText(Path.Combine(root, "requests.json"));
            var seen = 0;
            foreach (Match m in Regex.Matches(json, "\"ptr\": \"([0-9a-f]{16})\""))
            {
                Assert.AreEqual(m.Groups[1].Value, Pointer.Parse(m.Groups[1].Value).ToString());
                seen++;
            }
            Assert.GreaterOrEqual(seen, 10);
        }

        /// <summary>A watch interval over the limit is MALFORMED with the reason of the
        /// test vector.</summary>
        [Test]
        public void WatchIntervalOverTheLimitMatchesTheVector()
        {
            var root = Environment.GetEnvironmentVariable("NETSWAP_VECTORS") ?? "../../tests/vectors";
            var json = File.ReadAllText(Path.Combine(root, "malformed.json"));
            var m = Regex.Match(json,
                "\"name\": \"watch-interval-over-a-minute\".*?\"payload\": \"[0-9a-f]{16}([0-9a-f]{8})\".*?\"reason\": \"([^\"]*)\"",
                RegexOptions.Singleline);
            Assert.IsTrue(m.Success, "the vector is there");
            var ms = Convert.ToInt32(m.Groups[1].Value, 16);
            Assert.AreEqual(60001, ms);
            using (var a = From("127.0.0.2"))
            {
                var p = a.Create(B("tick"), Access.Read);
                var e = Assert.Throws<NetswapMalformedException>(() => a.Watch(p, ev => { }, TimeSpan.FromMilliseconds(ms)));
                Assert.AreEqual("malformed request: " + m.Groups[2].Value, e.Message);
                e = Assert.Throws<NetswapMalformedException>(() => a.Mirror(p, TimeSpan.FromMilliseconds(ms)));
                Assert.AreEqual("malformed request: " + m.Groups[2].Value, e.Message);
                using (var mirror = a.Mirror(p, TimeSpan.FromMilliseconds(ms - 1)))
                    Assert.AreEqual("tick", S(mirror.Data.ToArray()));
            }
        }

        static byte[] Hex(string h)
        {
            var b = new byte[h.Length / 2];
            for (int i = 0; i < b.Length; i++) b[i] = Convert.ToByte(h.Substring(2 * i, 2), 16);
            return b;
        }

        /// <summary>The mirror's own delta code turns each delta vector's "before" into
        /// its "after".</summary>
        [Test]
        public unsafe void MirrorDeltasMatchTheVectors()
        {
            var root = Environment.GetEnvironmentVariable("NETSWAP_VECTORS") ?? "../../tests/vectors";
            var json = File.ReadAllText(Path.Combine(root, "replies.json"));
            var vectors = Regex.Matches(json,
                "\"size\": \"(\\d+)\",\\s*\"ranges\": \\[(.*?)\\]\\s*\\},\\s*\"mirror\": \\{\\s*\"before\": \"([0-9a-f]*)\",\\s*\"after\": \"([0-9a-f]*)\"",
                RegexOptions.Singleline);
            foreach (Match v in vectors)
            {
                var ranges = Regex.Matches(v.Groups[2].Value, "\\[\\s*\"(\\d+)\",\\s*\"([0-9a-f]*)\"\\s*\\]");
                var bytes = new byte[ranges.Count][];
                var handles = new System.Runtime.InteropServices.GCHandle[ranges.Count];
                var native = new Netswap.Native.netswap_range[ranges.Count];
                try
                {
                    for (int i = 0; i < ranges.Count; i++)
                    {
                        bytes[i] = Hex(ranges[i].Groups[2].Value);
                        handles[i] = System.Runtime.InteropServices.GCHandle.Alloc(bytes[i], System.Runtime.InteropServices.GCHandleType.Pinned);
                        native[i].offset = ulong.Parse(ranges[i].Groups[1].Value);
                        native[i].data = (byte*)handles[i].AddrOfPinnedObject();
                        native[i].len = (UIntPtr)bytes[i].Length;
                    }
                    fixed (Netswap.Native.netswap_range* r = native)
                    {
                        var after = Mirror.ApplyDelta(Hex(v.Groups[3].Value), ulong.Parse(v.Groups[1].Value), r, native.Length);
                        CollectionAssert.AreEqual(Hex(v.Groups[4].Value), after, v.Value);
                    }
                }
                finally
                {
                    foreach (var h in handles) if (h.IsAllocated) h.Free();
                }
            }
            Assert.GreaterOrEqual(vectors.Count, 5, "the delta vectors were found");
        }
    }
}
