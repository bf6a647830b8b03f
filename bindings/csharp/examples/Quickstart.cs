// The README's example: compiles with Mono's mcs (C# 7.2) and the .NET SDK alike.
using System;
using System.Text;
using System.Threading;
using System.Threading.Tasks;
using Netswap;

static class Quickstart
{
    static void Main()
    {
        // C# 7.2 has no async Main: run the async part and wait for it.
        Run().GetAwaiter().GetResult();
    }

    static async Task Run()
    {
        string server = Environment.GetEnvironmentVariable("NETSWAP_SERVER") ?? "127.0.0.1:7420";
        using (var client = NetswapClient.Connect(server))
        {
            Pointer ptr = await client.CreateAsync(Encoding.UTF8.GetBytes("level 1"), Access.Read | Access.Write);
            Console.WriteLine("pointer: " + ptr);                  // send this to your peers
            Console.WriteLine(Encoding.UTF8.GetString(await client.ReadAsync(ptr)));   // level 1

            ulong version = await client.WriteAtAsync(ptr, 0, Encoding.UTF8.GetBytes("LEVEL"));
            try
            {
                await client.ReplaceIfAsync(ptr, version - 1, Encoding.UTF8.GetBytes("stale"));
            }
            catch (NetswapConflictException e)
            {
                Console.WriteLine(e.Message + " (" + e.CurrentVersion + ")");   // conflict: ... (2)
            }

            // A watch: events arrive in order on the thread pool. Wait for one.
            var changed = new TaskCompletionSource<WatchEvent>();
            using (client.Watch(ptr, e => changed.TrySetResult(e)))
            {
                await client.ReplaceAsync(ptr, Encoding.UTF8.GetBytes("level 2"));
                Console.WriteLine("watch: " + await changed.Task);  // watch: Changed ... version 3
            }

            // A mirror: a local copy the server keeps exact by pushing each change's bytes.
            using (var mirror = client.Mirror(ptr))
            {
                ulong target = await client.WriteAtAsync(ptr, 6, Encoding.UTF8.GetBytes("3"));
                while (mirror.Version < target) await Task.Delay(1);
                Console.WriteLine("mirror: " + Encoding.UTF8.GetString(mirror.Data.ToArray()));   // mirror: level 3
            }

            // Every async call takes a CancellationToken.
            using (var cts = new CancellationTokenSource(TimeSpan.FromSeconds(5)))
                await client.InfoAsync(ptr, cts.Token);
        }
    }
}
