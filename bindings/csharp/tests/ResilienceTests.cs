// NUnit tests of what survives the network: reconnection across a server killed with
// SIGKILL and restarted (records, watches and mirrors come back and tell what changed
// meanwhile), deadlines, CancellationTokens, truly asynchronous calls, mirrors, and
// handlers that throw. Servers are started from NETSWAP_SERVER_BIN.
using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.IO;
using System.Linq;
using System.Net;
using System.Net.Sockets;
using System.Text;
using System.Threading;
using System.Threading.Tasks;
using NUnit.Framework;

namespace Netswap.Tests
{
    [TestFixture]
    public class ResilienceTests
    {
        static string Server { get { return Environment.GetEnvironmentVariable("NETSWAP_TEST_SERVER") ?? "127.0.0.1:7420"; } }
        static string ServerBin { get { return Environment.GetEnvironmentVariable("NETSWAP_SERVER_BIN") ?? "netswap-server"; } }

        static byte[] B(string s) { return Encoding.UTF8.GetBytes(s); }
        static string S(byte[] b) { return Encoding.UTF8.GetString(b); }
        static string S(ReadOnlyMemory<byte> b) { return Encoding.UTF8.GetString(b.ToArray()); }

        static int FreePort()
        {
            var l = new TcpListener(IPAddress.Loopback, 0);
            l.Start();
            int port = ((IPEndPoint)l.LocalEndpoint).Port;
            l.Stop();
            return port;
        }

        /// <summary>A netswap-server process with a data directory, whose log lines are kept.</summary>
        sealed class ServerProcess
        {
            public readonly Process Process;
            readonly List<string> log = new List<string>();

            public ServerProcess(string dir, int port)
            {
                var psi = new ProcessStartInfo(ServerBin,
                    "--listen 127.0.0.1:" + port + " --threads 1 --snapshot-interval 0 --orphan-grace 60" +
                    " --data-dir " + Path.Combine(dir, "data") + " --identity-key " + Path.Combine(dir, "identity.key"))
                {
                    UseShellExecute = false,
                    RedirectStandardOutput = true,
                    RedirectStandardError = true,
                };
                Process = Process.Start(psi);
                Process.ErrorDataReceived += (s, e) => { if (e.Data != null) lock (log) log.Add(e.Data); };
                Process.BeginErrorReadLine();
                var first = Process.StandardOutput.ReadLine();
                StringAssert.StartsWith("netswap-server listening on", first);
            }

            public void Signal(string sig)
            {
                using (var kill = Process.Start("kill", sig + " " + Process.Id)) kill.WaitForExit();
            }

            public void Snapshot()
            {
                int before;
                lock (log) before = log.Count(l => l.Contains("snapshot written"));
                Signal("-USR1");
                var until = DateTime.UtcNow.AddSeconds(30);
                while (true)
                {
                    lock (log) if (log.Count(l => l.Contains("snapshot written")) > before) return;
                    Assert.Less(DateTime.UtcNow, until, "no snapshot was written");
                    Thread.Sleep(20);
                }
            }

            public void KillHard()
            {
                Process.Kill(); // SIGKILL
                Process.WaitForExit();
            }

            public void Stop()
            {
                Signal("-TERM");
                Assert.IsTrue(Process.WaitForExit(30000));
                Assert.AreEqual(0, Process.ExitCode);
            }
        }

        /// <summary>Answers HELLO on each connection, then reads and never answers.</summary>
        static int SilentServer()
        {
            var listener = new TcpListener(IPAddress.Loopback, 0);
            listener.Start();
            int port = ((IPEndPoint)listener.LocalEndpoint).Port;
            var thread = new Thread(() =>
            {
                while (true)
                {
                    TcpClient c;
                    try { c = listener.AcceptTcpClient(); } catch (Exception) { return; }
                    var t = new Thread(() =>
                    {
                        try
                        {
                            var s = c.GetStream();
                            var header = new byte[10];
                            int got = 0;
                            while (got < 10) got += s.Read(header, got, 10 - got);
                            // HELLO has no payload: answer it (XID echoed, status OK, 53 bytes).
                            var reply = new byte[10 + 53];
                            Array.Copy(header, 0, reply, 0, 4);
                            reply[9] = 53;
                            reply[10] = 1; // protocol 1
                            reply[10 + 6] = 0x10; // max record bytes 1 MiB
                            reply[10 + 14] = 0x10; // max message bytes 1 MiB
                            reply[10 + 20] = 1; // grace 1 s
                            s.Write(reply, 0, reply.Length);
                            var sink = new byte[65536];
                            while (s.Read(sink, 0, sink.Length) > 0) { }
                        }
                        catch (Exception) { }
                    }) { IsBackground = true };
                    t.Start();
                }
            }) { IsBackground = true };
            thread.Start();
            return port;
        }

        [Test]
        public void DeadlinesAndCancellationTokensEndCallsToAServerThatNeverAnswers()
        {
            int port = SilentServer();
            using (var c = NetswapClient.Connect("127.0.0.1:" + port, new ConnectOptions
            {
                RequestTimeout = TimeSpan.FromMilliseconds(300),
                Keepalive = TimeSpan.Zero,
            }))
            {
                var p = new Pointer(7);
                var sw = Stopwatch.StartNew();
                var t = Assert.Throws<NetswapTimeoutException>(() => c.Read(p));
                Assert.GreaterOrEqual(sw.ElapsedMilliseconds, 290);
                StringAssert.Contains("READ of 0000000000000007", t.Message);
                StringAssert.Contains("in flight", t.Message);

                using (var quick = c.WithTimeout(TimeSpan.FromMilliseconds(50)))
                {
                    sw.Restart();
                    Assert.Throws<NetswapTimeoutException>(() => quick.Info(p));
                    Assert.Less(sw.ElapsedMilliseconds, 290);
                    var ex = Assert.Throws<AggregateException>(() => quick.InfoAsync(p).Wait());
                    Assert.IsInstanceOf<NetswapTimeoutException>(ex.InnerException);
                }
                Assert.AreEqual(ConnectionState.Connected, c.State, "disposing a timeout handle keeps the connection");

                // A CancellationToken ends a call at once, as a cancelled Task.
                using (var patient = c.WithTimeout(TimeSpan.Zero))
                {
                    var cts = new CancellationTokenSource();
                    var pending = patient.ReadAsync(p, cts.Token);
                    Assert.IsFalse(pending.Wait(100), "no answer comes");
                    cts.Cancel();
                    var agg = Assert.Throws<AggregateException>(() => pending.Wait(5000));
                    Assert.IsInstanceOf<TaskCanceledException>(agg.InnerException);
                    Assert.IsTrue(pending.IsCanceled);

                    // A token cancelled before the call: cancelled at once.
                    var done = new CancellationTokenSource();
                    done.Cancel();
                    Assert.IsTrue(patient.ReplaceAsync(p, B("x"), done.Token).ContinueWith(x => x.IsCanceled).Result);

                    // Many calls, one token: every one ends, none hangs.
                    var many = new CancellationTokenSource();
                    var tasks = Enumerable.Range(0, 1000).Select(i => patient.WriteAtAsync(p, (ulong)i, B("y"), many.Token)).ToArray();
                    many.Cancel();
                    Assert.IsTrue(Task.WhenAll(tasks).ContinueWith(_ => true).Wait(10000), "every cancelled call ended");
                    Assert.IsTrue(tasks.All(x => x.IsCanceled));
                }
            }
        }

        [Test]
        public void TwoThousandAsyncCallsInFlightAtOnce()
        {
            using (var a = NetswapClient.Connect(Server, new ConnectOptions { LocalAddress = "127.0.0.2" }))
            {
                var p = a.Create(B("0"), Access.Read | Access.Write);
                // Completed by the native library's callbacks: no thread waits for them.
                var tasks = Enumerable.Range(0, 2000).Select(i => a.ReadAsync(p)).ToArray();
                Task.WaitAll(tasks);
                Assert.IsTrue(tasks.All(t => S(t.Result) == "0"));
                a.Delete(p);
            }
        }

        [Test]
        public void AMirrorStaysExactUnderWritesAndTellsEachChange()
        {
            using (var a = NetswapClient.Connect(Server, new ConnectOptions { LocalAddress = "127.0.0.2" }))
            using (var b = NetswapClient.Connect(Server, new ConnectOptions { LocalAddress = "127.0.0.3" }))
            {
                var p = a.Create(new byte[256], Access.Read);
                using (var m = b.Mirror(p))
                {
                    Assert.AreEqual(1UL, m.Version);
                    Assert.AreEqual(256, m.Data.Length);
                    var events = new List<MirrorEvent>();
                    m.Changed += (s, e) => { lock (events) events.Add(e); };
                    var rng = new Random(5);
                    ulong last = 0;
                    for (int i = 0; i < 200; i++)
                    {
                        var bytes = new byte[rng.Next(1, 16)];
                        rng.NextBytes(bytes);
                        last = a.WriteAt(p, (ulong)rng.Next(0, 256 - bytes.Length), bytes);
                    }
                    last = a.Replace(p, B("the end"));
                    var until = DateTime.UtcNow.AddSeconds(10);
                    while (m.Version < last && DateTime.UtcNow < until) Thread.Sleep(10);
                    Assert.AreEqual(last, m.Version);
                    Assert.AreEqual("the end", S(m.Data));
                    Assert.AreEqual(S(a.Read(p)), S(m.Data));
                    until = DateTime.UtcNow.AddSeconds(10);
                    while (DateTime.UtcNow < until) { lock (events) if (events.Count > 0 && events.Last().Version == last) break; Thread.Sleep(10); }
                    lock (events)
                    {
                        Assert.AreEqual(MirrorEventKind.Updated, events.Last().Kind);
                        Assert.AreEqual("the end", S(events.Last().Data));
                        Assert.AreEqual(0UL, events.Last().Changed[0].Offset);
                        for (int i = 1; i < events.Count; i++) Assert.Greater(events[i].Version, events[i - 1].Version);
                    }
                }
                a.Delete(p);
            }
        }

        [Test]
        public void AHandlerThatThrowsIsReportedNotSwallowed()
        {
            using (var a = NetswapClient.Connect(Server, new ConnectOptions { LocalAddress = "127.0.0.2" }))
            {
                var p = a.Create(B("x"));
                var reported = new TaskCompletionSource<HandlerFailedEventArgs>();
                a.HandlerFailed += (s, e) => reported.TrySetResult(e);
                int calls = 0;
                using (a.Watch(p, e => { Interlocked.Increment(ref calls); throw new InvalidOperationException("boom"); }))
                {
                    a.Replace(p, B("y"));
                    Assert.IsTrue(reported.Task.Wait(10000));
                    Assert.IsInstanceOf<InvalidOperationException>(reported.Task.Result.Exception);
                    Assert.AreEqual(p, reported.Task.Result.Pointer);
                    // The watch goes on.
                    a.Replace(p, B("z"));
                    var until = DateTime.UtcNow.AddSeconds(10);
                    while (Volatile.Read(ref calls) < 2 && DateTime.UtcNow < until) Thread.Sleep(10);
                    Assert.AreEqual(2, calls);
                }
                a.Delete(p);
            }
        }

        [Test]
        public void AfterASigkillAndARestartRecordsWatchesAndMirrorsComeBack()
        {
            var dir = Path.Combine(Path.GetTempPath(), "netswap-cs-restart-" + Process.GetCurrentProcess().Id);
            if (Directory.Exists(dir)) Directory.Delete(dir, true);
            Directory.CreateDirectory(dir);
            int port = FreePort();
            var server = new ServerProcess(dir, port);
            var states = new List<ConnectionState>();
            var options = new ConnectOptions
            {
                LocalAddress = "127.0.0.2",
                RequestTimeout = TimeSpan.FromSeconds(10),
                Reconnect = new ReconnectOptions { InitialDelay = TimeSpan.FromMilliseconds(50), MaxDelay = TimeSpan.FromMilliseconds(300) },
            };
            using (var c = NetswapClient.Connect("127.0.0.1:" + port, options))
            {
                c.StateChanged += (s, e) => { lock (states) states.Add(e.State); };
                var p = c.Create(B("before"), Access.Read | Access.Write);
                var changes = new List<WatchEvent>();
                using (c.Watch(p, e => { lock (changes) changes.Add(e); }))
                using (var m = c.Mirror(p))
                {
                    server.Snapshot();
                    server.KillHard();
                    var until = DateTime.UtcNow.AddSeconds(10);
                    while (DateTime.UtcNow < until) { lock (states) if (states.Contains(ConnectionState.Reconnecting)) break; Thread.Sleep(10); }
                    lock (states) Assert.Contains(ConnectionState.Reconnecting, states);

                    // Meanwhile another server on the same data changes the record.
                    int other = FreePort();
                    var meanwhile = new ServerProcess(dir, other);
                    ulong changedTo;
                    using (var w = NetswapClient.Connect("127.0.0.1:" + other, new ConnectOptions { LocalAddress = "127.0.0.3" }))
                        changedTo = w.Replace(p, B("changed meanwhile"));
                    meanwhile.Stop();

                    server = new ServerProcess(dir, port);
                    until = DateTime.UtcNow.AddSeconds(15);
                    while (DateTime.UtcNow < until)
                    {
                        lock (changes) if (changes.Any(e => e.Kind == WatchEventKind.Changed && e.Version == changedTo)) break;
                        Thread.Sleep(10);
                    }
                    lock (changes) Assert.IsTrue(changes.Any(e => e.Kind == WatchEventKind.Changed && e.Version == changedTo),
                        "the watch tells the change made while it was away");
                    until = DateTime.UtcNow.AddSeconds(10);
                    while (m.Version != changedTo && DateTime.UtcNow < until) Thread.Sleep(10);
                    Assert.AreEqual("changed meanwhile", S(m.Data));
                    Assert.AreEqual("changed meanwhile", S(c.Read(p)));
                    Assert.AreEqual(ConnectionState.Connected, c.State);
                    lock (states) Assert.AreEqual(ConnectionState.Connected, states.Last());
                }
            }
            server.Stop();
            Directory.Delete(dir, true);
        }
    }
}
